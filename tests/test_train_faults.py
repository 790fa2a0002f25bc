"""Faults as they happen: a signal to the whole process group, a full disk, kill -9 while
saving, two runs with one name, unreadable images, wrong settings. Nothing already trained or
saved may be lost, and every known mistake is reported in one line."""
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import clip_model as cm
import sample_data
import settings
import train
from errors import DataError, OutputError, SettingsError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return {"train": sample_data.create_sample_dataset(folder / "train", num_samples=160, seed=0),
            "val": sample_data.create_sample_dataset(folder / "val", num_samples=40, seed=1)}


def run_args(data, out, *extra):
    return ["--data_dir", str(data["train"]["index"]), "--val_data", str(data["val"]["index"]),
            "--checkpoint_dir", str(out / "ckpt"), "--log_dir", str(out / "logs"),
            "--results_dir", str(out / "results"), "--num_workers", "0", "--batch_size", "16",
            "--log_every", "2", "--warmup_steps", "2",
            # the pictures and projector cost ~2 s a validation; tests/test_tensorboard_views.py tests them
            "--tensorboard_pairs", "0", "--projector_pairs", "0", *extra]


def start(args, **options):
    """train.py in a process group of its own, as a scheduler or a terminal starts it."""
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **options)


def wait_for(path, process, timeout=120):
    deadline = time.time() + timeout
    while not Path(path).exists():
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def error_lines(done):
    return [line for line in done.stdout.splitlines() + done.stderr.splitlines() if line.strip()]


# ---- stop signals -------------------------------------------------------------------------------

@pytest.mark.parametrize("signum,group", [(signal.SIGTERM, True), (signal.SIGINT, True), (signal.SIGTERM, False)],
                         ids=["SIGTERM to the group", "SIGINT to the group", "SIGTERM to the process"])
@pytest.mark.slow
def test_a_stop_signal_saves_a_run_that_resumes_exactly(data, tmp_path, signum, group):
    # To the group, as schedulers, `timeout` and Ctrl-C send it: DataLoader workers get it too and
    # must leave it to the main process. To the process alone, as `kill PID` sends it.
    args = run_args(data, tmp_path, "--run_name", "cut", "--num_workers", "2", "--max_steps", "2000",
                    "--eval_every", "1000", "--save_every", "3")
    process = start(args)
    wait_for(tmp_path / "ckpt/cut/last.pt", process)            # step 3 is done: mid-epoch
    (os.killpg if group else os.kill)(process.pid, signum)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-3000:]
    assert f"{signal.Signals(signum).name} received" in output and "--resume auto" in output
    assert "Traceback" not in output
    stopped = cm.load_checkpoint(tmp_path / "ckpt/cut/last.pt")["step"]
    assert f"stopped: {signal.Signals(signum).name} received at step {stopped};" in output   # saved on the signal
    end = str(stopped + 3)

    resumed = train.main(run_args(data, tmp_path, "--run_name", "cut", "--resume", "auto",
                                  "--max_steps", "2000", "--eval_every", "1000", "--save_every", "3",
                                  "--stop_at_step", end))
    whole = train.main(run_args(data, tmp_path, "--run_name", "whole", "--max_steps", "2000",
                                "--eval_every", "1000", "--save_every", "1000", "--stop_at_step", end))
    assert resumed["step"] == whole["step"] == stopped + 3
    a = cm.load_checkpoint(tmp_path / "ckpt/cut/last.pt")["state_dict"]
    b = cm.load_checkpoint(tmp_path / "ckpt/whole/last.pt")["state_dict"]
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_at_once_and_nothing_hangs(data, tmp_path):
    # Abort mid-step with busy DataLoader workers: the exit must not wait on them forever.
    args = run_args(data, tmp_path, "--run_name", "abort", "--num_workers", "2", "--max_steps", "2000",
                    "--eval_every", "1000", "--save_every", "2")
    process = start(args)
    wait_for(tmp_path / "ckpt/abort/last.pt", process)
    os.killpg(process.pid, signal.SIGINT)
    os.killpg(process.pid, signal.SIGINT)
    output, _ = process.communicate(timeout=60)           # aborted (or, if the step had ended, saved)
    assert process.returncode == 0 or "KeyboardInterrupt" in output
    assert cm.load_checkpoint(tmp_path / "ckpt/abort/last.pt")["step"] >= 2      # the saved file is intact


def _save_forever(setup, path, ready):
    ready.set()
    step = 0
    while True:
        step += 1
        cm.save_checkpoint(path, setup, step=step)


def test_kill_9_while_saving_never_leaves_an_unreadable_checkpoint(tmp_path):
    # A process saves in a loop; it is killed (SIGKILL) at moments spread over a save, over and
    # over. The savers are forked from this process, model built: no import of torch each time.
    fork = multiprocessing.get_context("fork")
    setup = cm.build_model("tiny-vit-64")
    path = tmp_path / "last.pt"
    steps = []
    for delay in (0.05, 0.2, 0.45):
        ready = fork.Event()
        saver = fork.Process(target=_save_forever, args=(setup, path, ready))
        saver.start()
        assert ready.wait(60)
        time.sleep(delay)
        saver.kill()
        saver.join()
        if path.exists():
            steps.append(cm.load_checkpoint(path)["step"])       # never a torn file
    assert steps and all(s >= 1 for s in steps)


def fill(disk, leave=0):
    """Fill a file system but for `leave` bytes."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    (disk / "filler").write_bytes(b"\0" * max(0, free - leave))


# ---- disks and folders ---------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 150 MB file system: room for a tiny model's best.pt and last.pt, not for a second last.pt
    beside them (it is written to a temporary file first)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=150m", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"a small file system cannot be mounted here (needs root): {mounted.stderr.strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.mark.slow
def test_a_full_disk_while_saving_loses_nothing_already_saved_and_says_so_in_one_line(data, tmp_path,
                                                                                       small_disk):
    args = run_args(data, tmp_path, "--run_name", "full", "--max_steps", "6", "--eval_every", "3",
                    "--save_every", "3", "--checkpoint_dir", str(small_disk))
    done = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"train.py: error: last.pt not written: no space left on the disk of {small_disk / 'full'} "
        f"(No space left on device); free some space or choose another folder, then run again")
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in (small_disk / "full").iterdir()) == ["best.pt", "config.json", "last.pt"]
    assert cm.load_checkpoint(small_disk / "full/last.pt")["step"] == 3      # the previous one, intact


def test_a_full_results_disk_costs_no_weights(data, tmp_path, small_disk):
    fill(small_disk, leave=8192)            # room for the run's config.json, not for its results
    args = run_args(data, tmp_path, "--run_name", "res", "--max_steps", "4", "--eval_every", "2",
                    "--results_dir", str(small_disk))
    with pytest.raises(OutputError, match="no space left on the disk of"):
        train.main(args)
    failed_at = int(re.search(r"error at step (\d+) \(OutputError", (tmp_path / "logs/res/train.log")
                              .read_text()).group(1))
    checkpoint = cm.load_checkpoint(tmp_path / "ckpt/res/last.pt")
    assert checkpoint["step"] == failed_at and (tmp_path / "ckpt/res/best.pt").is_file()
    assert not [p for p in (small_disk / "res").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_evaluation_output_on_a_full_disk_is_one_line(data, tmp_path, small_disk):
    setup = cm.build_model("tiny-vit-64")
    cm.save_checkpoint(tmp_path / "m.pt", setup)
    fill(small_disk)
    done = subprocess.run([sys.executable, "evaluation.py", "--checkpoint", str(tmp_path / "m.pt"),
                           "--data", str(data["val"]["index"]), "--num_workers", "0",
                           "--output", str(small_disk / "out.json")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "out.json not written: no space left on the disk of" in done.stderr
    assert not (small_disk / ".out.json.tmp").exists()


def test_output_folders_that_cannot_be_made_are_refused_before_anything_is_built(data, tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OutputError, match="cannot create .*a_file/.* choose another --results_dir"):
        train.main(run_args(data, tmp_path, "--run_name", "x", "--results_dir", str(tmp_path / "a_file/sub")))


# ---- two runs, one name --------------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_run_with_a_taken_name_is_refused_and_a_killed_runs_lock_is_gone(data, tmp_path):
    args = run_args(data, tmp_path, "--run_name", "twice", "--max_steps", "2000", "--save_every", "2",
                    "--eval_every", "1000")
    first = start(args)
    wait_for(tmp_path / "ckpt/twice/last.pt", first)
    second = subprocess.run([sys.executable, "train.py", *args, "--resume", "auto"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 1
    assert second.stderr.strip().splitlines() == [
        f"train.py: error: run folder {tmp_path / 'ckpt/twice'} is in use by another running train.py; "
        f"wait for it to end, or choose another --run_name"]
    assert first.poll() is None                                  # the first run goes on, undisturbed
    os.killpg(first.pid, signal.SIGKILL)                         # ... until it dies without cleaning up
    first.wait()
    third = train.main([*args, "--resume", "auto", "--stop_at_step", "1"])   # no stale lock
    assert third["step"] >= 2


# ---- unreadable images -----------------------------------------------------------------------------

def test_a_run_with_a_missing_training_image_and_a_corrupt_validation_image_finishes_naming_both(
        data, tmp_path):
    import shutil

    from test_evaluation import decompression_bomb_png
    train_dir, val_dir = tmp_path / "train", tmp_path / "val"
    shutil.copytree(Path(data["train"]["index"]).parent, train_dir)
    shutil.copytree(Path(data["val"]["index"]).parent, val_dir)
    entries = json.loads((train_dir / "data.json").read_text())
    (train_dir / entries[5]["image_path"]).unlink()
    val_entries = json.loads((val_dir / "data.json").read_text())
    (val_dir / val_entries[2]["image_path"]).write_bytes(decompression_bomb_png())
    args = run_args(data, tmp_path, "--run_name", "bad", "--max_steps", "4", "--data_dir",
                    str(train_dir / "data.json"), "--val_data", str(val_dir / "data.json"))
    result = train.main(args)
    assert result["step"] == 4
    results = json.loads((tmp_path / "results/bad/training_results.json").read_text())
    assert results["unreadable_images"]["count"] == 1
    assert entries[5]["image_path"] in results["unreadable_images"]["first"][0]
    assert results["final"]["skipped_images"]["count"] == 1
    assert "DecompressionBombError" in results["final"]["skipped_images"]["first"][0]
    assert results["final"]["num_images"] == 39
    log = (tmp_path / "logs/bad/train.log").read_text()
    assert "skipped missing image: " in log and "skipped unreadable validation image: " in log
    with pytest.raises(DataError, match=f"entry 5: image '{entries[5]['image_path']}' not found"):
        train.main([*args, "--run_name", "strict", "--strict_data"])


@pytest.mark.slow
def test_a_missing_training_image_is_named_when_validation_is_split_off_the_training_data(data, tmp_path):
    import shutil
    train_dir = tmp_path / "train"
    shutil.copytree(Path(data["train"]["index"]).parent, train_dir)
    entries = json.loads((train_dir / "data.json").read_text())
    (train_dir / entries[5]["image_path"]).unlink()
    train.main(run_args(data, tmp_path, "--run_name", "split", "--max_steps", "1", "--data_dir",
                        str(train_dir / "data.json"), "--val_data", "", "--val_fraction", "0.25"))
    results = json.loads((tmp_path / "results/split/training_results.json").read_text())
    assert results["unreadable_images"]["count"] == 1
    assert f"entry 5: image '{entries[5]['image_path']}' not found" in results["unreadable_images"]["first"][0]
    assert f"skipped missing image: {train_dir / 'data.json'}, entry 5" in \
        (tmp_path / "logs/split/train.log").read_text()


# ---- settings checked at start-up ------------------------------------------------------------------

BAD_SETTINGS = {
    "--batch_size 0": "--batch_size: batch_size must be >= 1, got 0",
    "--learning_rate -0.001": "--learning_rate: learning_rate must be > 0, got -0.001",
    "--val_fraction 1.0": "--val_fraction: val_fraction must be (0, 1), got 1.0",
    "--val_fraction 0.0": "--val_fraction: val_fraction must be (0, 1), got 0.0",
    "--accum_steps 0": "--accum_steps: accum_steps must be >= 1, got 0",
    "--save_every 0": "--save_every: save_every must be >= 1, got 0",
    "--log_every 0": "--log_every: log_every must be >= 1, got 0",
    "--max_bad_steps 0": "--max_bad_steps: max_bad_steps must be >= 1, got 0",
    "--best_metric rsm": "best_metric 'rsm': no such metric; use one of rsum, mean_recall",
    "--device cuda:3": "device 'cuda:3' is not available on this machine; use auto",
    "--precision amp": "precision amp needs CUDA (device is cpu); use bf16 or fp32",
    "--resume nowhere.pt": "resume nowhere.pt: no such checkpoint file",
    "--pretrained nowhere.pt": "pretrained nowhere.pt: no such weights file",
}


@pytest.mark.parametrize("flags", BAD_SETTINGS)
def test_a_wrong_setting_is_refused_before_the_model_is_built_naming_it(flags, data, tmp_path, monkeypatch):
    import clip_model
    monkeypatch.setattr(clip_model, "build_model", lambda *a, **k: pytest.fail("model built"))
    with pytest.raises((SettingsError, OutputError), match=re.escape(BAD_SETTINGS[flags])):
        train.main(run_args(data, tmp_path, "--run_name", "bad", *flags.split()))


@pytest.mark.slow
def test_a_wrong_setting_is_one_line_on_the_command_line_and_help_shows_every_range():
    done = subprocess.run([sys.executable, "train.py", "--batch_size", "0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == ["train.py: error: --batch_size: batch_size must be "
                                                ">= 1, got 0"]
    help_text = " ".join(settings.build_parser().format_help().split())
    for setting in settings.SCHEMA:
        if setting.valid:
            assert f"valid: {setting.valid}" in help_text, setting.name


def test_a_one_image_index_without_validation_data_is_one_line(data, tmp_path):
    index = tmp_path / "one.json"
    entry = json.loads(Path(data["train"]["index"]).read_text())[0]
    entry["image_path"] = str(Path(data["train"]["index"]).parent / entry["image_path"])
    index.write_text(json.dumps([entry]))
    with pytest.raises(DataError, match="val_fraction 0.1 of 1 images leaves"):
        train.main(run_args(data, tmp_path, "--run_name", "one", "--data_dir", str(index), "--val_data", ""))


@pytest.mark.parametrize("refusal", ["data", "batch"])
def test_a_run_refused_at_start_up_leaves_no_tensorboard_event_file(data, tmp_path, refusal):
    # TensorBoard lists every folder with an event file: failed runs would crowd its list
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    flags = {"data": ["--data_dir", str(bad)], "batch": ["--batch_size", "1000"]}[refusal]
    with pytest.raises((DataError, SettingsError)):
        train.main(run_args(data, tmp_path, "--run_name", "refused", *flags))
    assert (tmp_path / "logs/refused/train.log").is_file()
    assert not list((tmp_path / "logs").rglob("events.out.tfevents.*"))


@pytest.mark.slow
def test_resuming_with_changed_settings_says_which_and_refuses_another_model(data, tmp_path):
    train.main(run_args(data, tmp_path, "--run_name", "r", "--max_steps", "2"))
    result = train.main(run_args(data, tmp_path, "--run_name", "r", "--max_steps", "3",
                                 "--batch_size", "8", "--resume", "auto"))
    assert result["step"] == 3
    log = (tmp_path / "logs/r/train.log").read_text()
    assert "resuming with changed settings: batch_size 16 -> 8, max_steps 2 -> 3" in log
    with pytest.raises(SettingsError, match="model_name 'tiny-vit-64' -> 'simple-rn18'.*cannot change"):
        train.main(run_args(data, tmp_path, "--run_name", "r", "--max_steps", "4", "--resume", "auto",
                            "--model_name", "simple-rn18"))


@pytest.mark.slow
def test_a_warmup_longer_than_half_the_run_is_shortened_and_the_rate_decays(data, tmp_path):
    result = train.main(run_args(data, tmp_path, "--run_name", "w", "--max_steps", "8",
                                 "--warmup_steps", "100", "--log_every", "1", "--learning_rate", "1e-3"))
    rates = [entry["lr"] for entry in result["history"]["train"]]
    assert max(rates) == pytest.approx(1e-3) and rates[-1] < 0.5e-3
    assert "warmup_steps 100 is more than half of this 8-step run: warming up for 4 steps" in \
        (tmp_path / "logs/w/train.log").read_text()


def test_best_pt_holds_weights_config_and_metrics_but_no_optimiser_state(data, tmp_path):
    train.main(run_args(data, tmp_path, "--run_name", "b", "--max_steps", "2"))
    best = cm.load_checkpoint(tmp_path / "ckpt/b/best.pt")
    assert {"state_dict", "model_config", "config", "metrics", "step"} <= set(best)
    assert not {"optimizer", "scheduler", "scaler", "rng"} & set(best)
    assert (tmp_path / "ckpt/b/best.pt").stat().st_size < 0.5 * (tmp_path / "ckpt/b/last.pt").stat().st_size
    rebuilt, _ = cm.model_from_checkpoint(tmp_path / "ckpt/b/best.pt")
    assert rebuilt.model_name == "tiny-vit-64"
