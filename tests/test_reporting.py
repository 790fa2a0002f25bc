"""Reports to Weights & Biases beside TensorBoard, with the real wandb package in its offline mode
(tests/conftest.py keeps every test offline): a short run and its resumed second part, read back
from the run files W&B writes, against TensorBoard's events of the same run."""
import io
import json
import logging
import re
import socket
import struct
import sys

import numpy as np
import pytest
from PIL import Image

import clip_model as cm
import reporting
import sample_data
import settings
import train
from errors import SettingsError, run_script

RUN = "wb"


# ---- reading an offline W&B run ---------------------------------------------------------------

LOG_BLOCK = 32 * 1024               # a piece of a record never crosses a block of the log
FULL, LAST = 1, 4                   # piece types; FIRST (2) and MIDDLE (3) are continued


def wandb_records(folder):
    """The records of an offline run's run-<id>.wandb file, as W&B's own protobuf messages.

    W&B's Go core writes the file, and wandb 0.31 no longer ships the Python reader of it. It is
    a LevelDB-style log: a 7-byte header (':W&B', magic, version), then blocks of 32 KiB, each
    holding pieces of records, each piece a 7-byte header (CRC-32, length, type) and its bytes.
    """
    from wandb.proto import wandb_internal_pb2  # the wandb package takes half a second to import
    [path] = folder.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    position, record = 7, b""
    while position + 7 <= len(data):
        left_in_block = LOG_BLOCK - position % LOG_BLOCK
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if left_in_block < 7 or kind == 0:           # the zero padding at a block's end
            position += left_in_block
            continue
        record += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (FULL, LAST):
            message = wandb_internal_pb2.Record()
            message.ParseFromString(record)
            yield message
            record = b""


def items(entries):
    """W&B's history or summary items as {name: value}; a picture as {name: {field: value}}."""
    found = {}
    for entry in entries:
        *parents, name = entry.nested_key or [entry.key]
        place = found
        for parent in parents:
            place = place.setdefault(parent, {})
        place[name] = json.loads(entry.value_json)
    return found


def read_offline_run(folder):
    """An offline run folder: its id, name, project, tags, config, history by step and summary."""
    run = {"history": {}, "summary": {}}
    for record in wandb_records(folder):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(id=record.run.run_id, name=record.run.display_name, project=record.run.project,
                       tags=list(record.run.tags), config=items(record.run.config.update))
        elif kind == "history":
            row = items(record.history.item)
            run["history"][row["_step"]] = row
        elif kind == "summary":
            run["summary"].update(items(record.summary.update))
    return run


def numbers(row):
    """The scalars of a history row, without W&B's own (_step, _runtime, _timestamp)."""
    return {name: value for name, value in row.items()
            if not name.startswith("_") and isinstance(value, (int, float))}


# ---- settings and the wandb package ------------------------------------------------------------

@pytest.mark.parametrize("value", ["tensorboard", "wandb", "tensorboard,wandb", "wandb, tensorboard"])
def test_report_to_takes_tensorboard_wandb_or_both(value):
    assert settings.parse_config(["--report_to", value]).report_to == value


@pytest.mark.parametrize("value", ["", ",", "mlflow", "tensorboard,mlflow"])
def test_report_to_refuses_anything_else_and_names_the_choices(value):
    with pytest.raises(SettingsError, match="--report_to: report_to must be one or more of tensorboard, wandb"):
        settings.parse_config(["--report_to", value])


def test_without_the_wandb_package_a_run_stops_before_its_first_step_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)       # `import wandb` raises ImportError
    args = ["--report_to", "tensorboard,wandb", "--checkpoint_dir", str(tmp_path / "ckpt"),
            "--log_dir", str(tmp_path / "logs"), "--results_dir", str(tmp_path / "results")]
    with pytest.raises(SystemExit) as stopped:
        run_script(lambda: train.main(args), "train.py")
    message = stopped.value.code
    assert message.startswith("train.py: error: report_to wandb: the wandb package is not installed")
    assert "pip install wandb" in message and "\n" not in message
    assert not (tmp_path / "ckpt").exists()      # before the run's folders, data and model


# ---- where the W&B run goes without an API key or a network -------------------------------------

@pytest.fixture
def wandb_online(monkeypatch):
    """W&B as a user has it, online unless told otherwise; W&B reads its settings from the
    environment once per process, so it is made to read them again, before and after."""
    import wandb
    monkeypatch.delenv("WANDB_MODE")
    wandb.teardown()
    yield wandb
    wandb.teardown()


def open_wandb_reports(folder, caplog):
    """Reports to W&B alone, and what they logged (W&B's own records left out)."""
    caplog.set_level(logging.INFO, logger="test_reporting")
    cfg = settings.parse_config(["--report_to", "wandb"])
    reports = reporting.open_reports(cfg, "offline", folder, logging.getLogger("test_reporting"))
    reports.close()
    return reports, [record.getMessage() for record in caplog.records if record.name == "test_reporting"]


def test_without_an_api_key_the_wandb_run_is_written_offline_and_the_log_says_so(wandb_online, tmp_path,
                                                                                caplog):
    reports, [message] = open_wandb_reports(tmp_path, caplog)
    assert reports.wandb.offline and reports.tensorboard is None
    assert "W&B run written offline (no API key: `wandb login`, or WANDB_API_KEY)" in message
    assert message.endswith(f"wandb sync {tmp_path}/wandb/offline-run-*-{reports.wandb.id}")
    assert list(tmp_path.glob(f"wandb/offline-run-*-{reports.wandb.id}/run-{reports.wandb.id}.wandb"))


@pytest.mark.slow
def test_when_wandb_cannot_be_reached_the_run_is_written_offline_and_the_log_says_so(wandb_online, tmp_path,
                                                                                    monkeypatch, caplog):
    with socket.socket() as s:                   # a port of this machine where nothing answers
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "2")
    reports, [message] = open_wandb_reports(tmp_path, caplog)
    assert reports.wandb.offline
    assert "W&B run written offline (W&B could not be reached: " in message and "wandb sync" in message


# ---- a run reported to W&B, then resumed --------------------------------------------------------

@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    """4 steps of the tiny model reported to TensorBoard and W&B, validated at steps 2 and 4 with
    their pictures, stopped after step 2 and resumed: two parts of one W&B run."""
    out = tmp_path_factory.mktemp("wandb-run")
    train_set = sample_data.create_sample_dataset(out / "train", num_samples=160, seed=0)
    val_set = sample_data.create_sample_dataset(out / "val", num_samples=30, seed=1)
    args = ["--data_dir", train_set["index"], "--val_data", val_set["index"], "--run_name", RUN,
            "--checkpoint_dir", str(out / "ckpt"), "--log_dir", str(out / "logs"),
            "--results_dir", str(out / "results"), "--num_workers", "0", "--batch_size", "32",
            "--max_steps", "4", "--eval_every", "2", "--log_every", "1", "--warmup_steps", "1",
            "--tensorboard_pairs", "2", "--projector_pairs", "0",
            "--report_to", "tensorboard,wandb", "--wandb_tags", "smoke,tiny"]
    first = train.main([*args, "--stop_at_step", "2"])
    second = train.main([*args, "--resume", "auto"])
    parts = sorted((out / "logs" / RUN / "wandb").glob("offline-run-*"))    # by their start time
    return {"out": out, "args": args, "first": first, "second": second, "parts": parts,
            "read": [read_offline_run(part) for part in parts]}


def test_wandb_holds_every_scalar_of_tensorboard_under_its_name_and_step(wandb_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(wandb_run["out"] / "logs" / RUN)).Reload()     # both parts
    tensorboard = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    wandb = {(name, step): value for part in wandb_run["read"] for step, row in part["history"].items()
             for name, value in numbers(row).items()}
    assert wandb.keys() == tensorboard.keys()
    for key, value in tensorboard.items():
        assert wandb[key] == pytest.approx(value, rel=1e-6), key     # TensorBoard keeps float32
    names = {name for name, _ in wandb}
    assert {"train/loss", "train/lr", "val/rsum", "val/text_to_image/R@1", "best/rsum"} <= names
    assert {step for _, step in wandb} == {1, 2, 3, 4}


def test_wandb_shows_the_pictures_of_every_validation_as_tensorboard_does(wandb_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(wandb_run["out"] / "logs" / RUN), size_guidance={"images": 0}).Reload()
    for tag in ("val/similarity_heatmap", "val/retrieval_examples"):
        shown = {p.step: np.asarray(Image.open(io.BytesIO(p.encoded_image_string)).convert("RGB"))
                 for p in events.Images(tag)}
        assert sorted(shown) == [2, 4]
        for part, step in zip(wandb_run["parts"], (2, 4)):
            row = read_offline_run(part)["history"][step]
            assert row[tag]["_type"] == "image-file"
            pixels = np.asarray(Image.open(part / "files" / row[tag]["path"]).convert("RGB"))
            assert np.array_equal(pixels, shown[step]), (tag, step)


def test_the_wandb_run_has_the_runs_name_tags_and_resolved_settings(wandb_run):
    first, second = wandb_run["read"]
    assert first["name"] == second["name"] == RUN
    assert first["project"] == "clip-training" and first["tags"] == ["smoke", "tiny"]
    resolved = vars(settings.parse_config([*wandb_run["args"], "--stop_at_step", "2"]))
    assert {k: v for k, v in first["config"].items() if k != "_wandb"} == resolved
    assert second["config"]["resume"] == "auto" and second["config"]["stop_at_step"] == 0


def test_the_wandb_summary_holds_the_final_and_best_metrics(wandb_run):
    summary = wandb_run["read"][1]["summary"]
    final = wandb_run["second"]["history"]["val"][-1]
    assert final["step"] == 4
    assert summary["val/rsum"] == final["retrieval"]["rsum"]
    assert summary["val/image_to_text/R@1"] == final["retrieval"]["image_to_text"]["R@1"]
    best = cm.load_checkpoint(wandb_run["out"] / "ckpt" / RUN / "best.pt")["best"]
    assert {key: summary[f"best_checkpoint/{key}"] for key in best} == best
    assert summary["best/rsum"] == max(v["retrieval"]["rsum"] for v in wandb_run["second"]["history"]["val"])


def test_a_resumed_run_continues_the_same_wandb_run(wandb_run):
    first, second = wandb_run["read"]
    wandb_id = cm.load_checkpoint(wandb_run["out"] / "ckpt" / RUN / "last.pt")["wandb_id"]
    assert first["id"] == second["id"] == wandb_id
    assert [part.name.endswith(f"-{wandb_id}") for part in wandb_run["parts"]] == [True, True]
    assert sorted(first["history"]) == [1, 2] and sorted(second["history"]) == [3, 4]
    # the log says where each part went, and one `wandb sync` names both
    log = (wandb_run["out"] / "logs" / RUN / "train.log").read_text()
    patterns = re.findall(r"W&B run written offline \(offline mode, chosen by WANDB_MODE.*with: wandb sync (\S+)",
                          log)
    assert len(patterns) == 2 and patterns[0] == patterns[1]
    folder, pattern = patterns[0].rsplit("/", 1)
    assert sorted(wandb_run["out"].joinpath(folder).glob(pattern)) == wandb_run["parts"]


@pytest.mark.slow
def test_a_run_reported_to_wandb_alone_writes_no_tensorboard_events_and_keeps_its_pictures(tmp_path):
    data = sample_data.create_sample_dataset(tmp_path / "data", num_samples=80, seed=0)
    train.main(["--data_dir", data["index"], "--run_name", "alone", "--checkpoint_dir", str(tmp_path / "ckpt"),
                "--log_dir", str(tmp_path / "logs"), "--results_dir", str(tmp_path / "results"),
                "--num_workers", "0", "--batch_size", "16", "--max_steps", "1", "--warmup_steps", "1",
                "--tensorboard_pairs", "1", "--projector_pairs", "4", "--report_to", "wandb"])
    assert not list((tmp_path / "logs/alone").glob("events.out.tfevents.*"))
    [part] = (tmp_path / "logs/alone/wandb").glob("offline-run-*")
    row = read_offline_run(part)["history"][1]
    assert row["val/similarity_heatmap"]["_type"] == "image-file" and "best/rsum" in row and "train/loss" in row
    assert "TensorBoard" not in (tmp_path / "logs/alone/train.log").read_text()
