"""train.py end to end on CPU: it learns, resumes exactly, survives SIGTERM and NaN losses, and
writes what evaluation, TensorBoard and visualization read."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import clip_model as cm
import data_loader
import train
from errors import OutputError, TrainingError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return {"train": data_loader.create_sample_dataset(folder / "train", num_samples=480, seed=0),
            "val": data_loader.create_sample_dataset(folder / "val", num_samples=100, seed=1)}


def run_args(data, out, *extra):
    return ["--data_dir", str(data["train"]["index"]), "--val_data", str(data["val"]["index"]),
            "--checkpoint_dir", str(out / "ckpt"), "--log_dir", str(out / "logs"),
            "--results_dir", str(out / "results"), "--num_workers", "0", "--batch_size", "32",
            "--log_every", "5", "--warmup_steps", "5", *extra]


@pytest.fixture(scope="module")
def learned_run(data, tmp_path_factory):
    """One short training run shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    result = train.main(run_args(data, out, "--run_name", "learn", "--num_epochs", "8",
                                 "--learning_rate", "2e-3", "--eval_every", "30"))
    return out, result


def test_a_short_run_learns_far_above_chance(learned_run):
    out, result = learned_run
    final = result["history"]["val"][-1]["retrieval"]
    # 100 validation images: chance is R@1 = 1% and R@10 = 10%
    assert final["text_to_image"]["R@10"] > 40
    assert final["image_to_text"]["R@10"] > 40
    losses = [e["loss"] for e in result["history"]["train"]]
    assert losses[-1] < losses[0] - 0.5


def test_a_run_writes_checkpoints_results_and_curves(learned_run):
    out, result = learned_run
    assert (out / "ckpt/learn/last.pt").is_file() and (out / "ckpt/learn/best.pt").is_file()
    saved = json.loads((out / "ckpt/learn/config.json").read_text())
    assert saved["num_epochs"] == 8 and saved["learning_rate"] == 2e-3
    results = json.loads((out / "results/learn/training_results.json").read_text())
    assert results["best"]["metric"] == "rsum" and results["best"]["step"] is not None
    assert results["final"]["step"] == result["step"]
    assert (out / "results/learn/training_curves.png").stat().st_size > 10_000
    best = cm.load_checkpoint(out / "ckpt/learn/best.pt")
    assert best["step"] == results["best"]["step"]
    assert best["config"]["batch_size"] == 32


def test_tensorboard_events_are_readable_by_tensorboard(learned_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, result = learned_run
    events = EventAccumulator(str(out / "logs/learn")).Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/logit_scale", "train/grad_norm",
                "train/samples_per_s", "train/data_wait", "val/rsum", "val/text_to_image/R@1",
                "val/image_to_text/R@10"):
        assert tag in tags, tag
    assert [e.step for e in events.Scalars("train/loss")][:2] == [5, 10]
    assert (out / "logs/learn/train.log").read_text().count("validation") >= 2


def test_the_checkpoint_is_consumed_by_evaluation(learned_run, data, tmp_path):
    out, _ = learned_run
    output = tmp_path / "eval.json"
    subprocess.run([sys.executable, "evaluation.py", "--checkpoint", str(out / "ckpt/learn/best.pt"),
                    "--data", str(data["val"]["index"]), "--output", str(output)],
                   cwd=ROOT, check=True, capture_output=True)
    metrics = json.loads(output.read_text())
    assert metrics["num_images"] == 100
    assert metrics["retrieval"]["text_to_image"]["R@10"] > 40


def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(data, tmp_path):
    common = ("--max_steps", "14", "--eval_every", "6", "--save_every", "1000")
    whole = train.main(run_args(data, tmp_path, "--run_name", "whole", *common))
    first = train.main(run_args(data, tmp_path, "--run_name", "split", "--stop_at_step", "9", *common))
    assert first["step"] == 9 and "stop_at_step" in first["stop_reason"]
    second = train.main(run_args(data, tmp_path, "--run_name", "split", "--resume", "auto", *common))
    assert second["step"] == 14
    a = cm.load_checkpoint(tmp_path / "ckpt/whole/last.pt")
    b = cm.load_checkpoint(tmp_path / "ckpt/split/last.pt")
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    assert a["best"] == b["best"]
    assert [e["step"] for e in a["history"]["val"]] == [e["step"] for e in b["history"]["val"]]


def test_an_existing_run_is_not_overwritten_without_resume(data, tmp_path):
    train.main(run_args(data, tmp_path, "--run_name", "once", "--max_steps", "2"))
    with pytest.raises(OutputError, match="last.pt exists.*--resume auto"):
        train.main(run_args(data, tmp_path, "--run_name", "once", "--max_steps", "2"))


def test_nan_losses_are_skipped_and_a_run_of_them_stops_cleanly(data, tmp_path, monkeypatch):
    real_forward = cm.ContrastiveLoss.forward
    calls = {"n": 0}

    def sometimes_nan(self, *args, **kwargs):
        calls["n"] += 1
        loss = real_forward(self, *args, **kwargs)
        # step 3 is one bad step; from step 7 on every loss is NaN
        return loss * float("nan") if calls["n"] == 3 or calls["n"] >= 7 else loss
    monkeypatch.setattr(cm.ContrastiveLoss, "forward", sometimes_nan)
    with pytest.raises(TrainingError, match="stopped at step 9: 3 non-finite losses in a row"):
        train.main(run_args(data, tmp_path, "--run_name", "nan", "--max_steps", "30",
                            "--max_bad_steps", "3", "--save_every", "4"))
    checkpoint = cm.load_checkpoint(tmp_path / "ckpt/nan/last.pt")
    assert checkpoint["step"] == 9
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())
    log = (tmp_path / "logs/nan/train.log").read_text()
    assert "step 2: non-finite loss" in log and log.count("update skipped") == 4


def test_sigterm_saves_a_loadable_last_checkpoint(data, tmp_path):
    args = run_args(data, tmp_path, "--run_name", "term", "--num_epochs", "1000",
                    "--save_every", "100000")
    process = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "logs/term/train.log"
    deadline = time.time() + 120
    while time.time() < deadline and "training" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.5)
    time.sleep(3)                                    # a few steps into training
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert "SIGTERM received" in output
    checkpoint = cm.load_checkpoint(tmp_path / "ckpt/term/last.pt")
    assert checkpoint["step"] > 0
    assert "--resume auto" in output


def test_zero_shot_on_the_generated_shape_classes_is_far_above_chance(learned_run, data):
    import evaluation
    out, _ = learned_run
    setup, _ = cm.model_from_checkpoint(out / "ckpt/learn/best.pt")
    zeroshot = evaluation.evaluate_zeroshot(setup, data["val"]["zeroshot"])
    chance = 100 / len(zeroshot["classnames"])
    assert zeroshot["top1"] > 3 * chance
    assert zeroshot["top5"] > 3 * 5 * chance
