"""Specification of train.py: its settings, schedule, parameter groups and accumulated-batch
step; and whole runs on CPU: it learns, resumes exactly, survives NaN losses, and
writes what evaluation, TensorBoard and visualization read. (Faults: test_train_faults.py.)"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import budget
import clip_model as cm
import data_loader
import evaluation
import runtime
import sample_data
import settings
import train
import train_step
from errors import OutputError, SettingsError, TrainingError

ROOT = Path(__file__).resolve().parent.parent


def write_config(tmp_path, sections):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(sections))
    return str(path)


# ---- settings -----------------------------------------------------------------------------------

def test_config_json_holds_exactly_the_schema_defaults():
    assert json.loads((ROOT / "config.json").read_text()) == settings.default_config()


@pytest.mark.slow
def test_every_setting_is_a_flag_of_train_py_with_its_help_and_default():
    # What `python train.py --help` prints, compared without the line breaks argparse adds.
    shown = "".join(subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, check=True,
                                   capture_output=True, text=True).stdout.split())
    for s in settings.SCHEMA:
        flag = f"--{s.name},--no-{s.name}" if isinstance(s.default, bool) else \
            f"--{s.name}{type(s.default).__name__.upper()}"
        valid = f",valid:{s.valid}" if s.valid else ""
        entry = "".join(f"{flag}{s.help}(default:{s.default!r}{valid})".split())
        assert entry in shown, f"--{s.name}: its help is not what the schema says"


def test_precedence_is_defaults_then_config_file_then_flags(tmp_path):
    path = write_config(tmp_path, {"training": {"batch_size": 16, "learning_rate": 0.01},
                                   "logging": {"run_name": "from-file"}})
    cfg = settings.parse_config(["--config", path, "--batch_size", "8"])
    assert cfg.batch_size == 8                     # flag beats file
    assert cfg.learning_rate == 0.01               # file beats default
    assert cfg.run_name == "from-file"
    assert cfg.weight_decay == settings.SETTINGS["weight_decay"].default   # default stays


def test_boolean_flags_turn_settings_on_and_off(tmp_path):
    path = write_config(tmp_path, {"data": {"augment": False}})
    assert settings.parse_config(["--config", path]).augment is False
    assert settings.parse_config(["--config", path, "--augment"]).augment is True
    assert settings.parse_config(["--config", path, "--no-augment"]).augment is False


def test_unknown_key_in_the_config_file_is_an_error_naming_it(tmp_path):
    path = write_config(tmp_path, {"training": {"batch_sise": 16}})
    with pytest.raises(SettingsError, match="unknown setting 'batch_sise'"):
        settings.parse_config(["--config", path])


def test_wrong_type_in_the_config_file_is_an_error_naming_the_key(tmp_path):
    path = write_config(tmp_path, {"training": {"batch_size": "64"}})
    with pytest.raises(SettingsError, match="batch_size must be int, got '64'"):
        settings.parse_config(["--config", path])


def test_key_in_the_wrong_section_is_an_error(tmp_path):
    path = write_config(tmp_path, {"model": {"batch_size": 64}})
    with pytest.raises(SettingsError, match="batch_size belongs in section 'training'"):
        settings.parse_config(["--config", path])


def test_invalid_choice_and_unknown_flag_are_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit):
        settings.parse_config(["--precision", "fp8"])
    with pytest.raises(SystemExit):
        settings.parse_config(["--batch_sise", "3"])
    assert "unrecognized arguments: --batch_sise" in capsys.readouterr().err


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(SettingsError, match="nope.json: file not found"):
        settings.parse_config(["--config", str(tmp_path / "nope.json")])


@pytest.mark.parametrize("name", ["..", ".", "../../tmp/x", "/tmp/abs", "a/b", "a\\b", "a\nb", ".hidden",
                                  "a b", "x" * 129])
def test_a_run_name_that_is_not_one_plain_folder_name_is_refused(name, tmp_path):
    with pytest.raises(SettingsError, match="--run_name: .* is not a plain folder name"):
        settings.parse_config(["--run_name", name])
    path = write_config(tmp_path, {"logging": {"run_name": name}})
    with pytest.raises(SettingsError, match="not a plain folder name"):
        settings.parse_config(["--config", path])


@pytest.mark.parametrize("name", ["run-1", "my_run.v2", "a+b=c@d", "运行1", "x" * 128])
def test_plain_run_names_of_any_script_are_accepted(name):
    assert settings.parse_config(["--run_name", name]).run_name == name


def test_a_default_run_name_from_a_config_file_path_is_a_plain_folder_name():
    cfg = settings.parse_config(["--model_name", "../my configs/.odd model.json"])
    name = runtime.run_name(cfg, distributed=False)
    assert settings.FOLDER_NAME.fullmatch(name) and name.startswith("odd-model-")


@pytest.mark.slow
def test_run_name_dot_dot_leaves_the_projects_config_json_alone(tmp_path):
    # The red team's case: every output of `--run_name ..` landed in the project folder itself.
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.json").write_text("{}")
    for script, flags in (("train.py", []), ("demo.py", ["--num_samples", "4", "--val_samples", "2"]),
                          ("visualization.py", [])):
        done = subprocess.run([sys.executable, str(ROOT / script), "--run_name", "..", *flags],
                              cwd=project, capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and done.stderr.strip().splitlines() == [
            f"{script}: error: --run_name: '..' is not a plain folder name; use letters, digits and "
            ". _ - + = @ (not starting with '.'), at most 128 characters"], done.stderr
    assert (project / "config.json").read_text() == "{}"
    assert sorted(p.name for p in project.iterdir()) == ["config.json", "data"]   # demo's data only


@pytest.mark.parametrize("flags,message", [
    (["--seed", str(2 ** 70)], "seed must be [0, 4294967295], got 1180591620717411303424"),
    (["--learning_rate", "inf"], "learning_rate must be a finite number, got inf"),
    (["--learning_rate", "nan"], "learning_rate must be a finite number, got nan"),
    (["--num_workers", "1000000"], "num_workers must be [0, cores] (this machine: "),
])
def test_out_of_range_numbers_are_refused_naming_the_setting(flags, message):
    with pytest.raises(SettingsError, match=re.escape(f"--{flags[0][2:]}: {message}")):
        settings.parse_config(flags)


def test_num_workers_may_use_the_cores_this_process_has():
    cores = settings.usable_cores()
    assert cores >= 2 and settings.parse_config(["--num_workers", str(cores)]).num_workers == cores
    with pytest.raises(SettingsError, match=f"this machine: {cores} cores"):
        settings.parse_config(["--num_workers", str(cores + 1)])


@pytest.mark.parametrize("sections,message", [
    ({"model": []}, "section 'model' must be a JSON object of settings, got list"),
    ({"training": {"learning_rate": 10 ** 400}}, "learning_rate must be a finite number, got inf"),
    ({"training": {"seed": 2 ** 70}}, "seed must be [0, 4294967295]"),
])
def test_a_config_file_with_a_wrong_shape_or_number_is_refused_in_one_line(sections, message, tmp_path):
    with pytest.raises(SettingsError, match=re.escape(message)):
        settings.parse_config(["--config", write_config(tmp_path, sections)])


# ---- schedule and optimiser ---------------------------------------------------------------------

def test_no_weight_decay_on_biases_norms_and_the_logit_scale():
    model = cm.build_model("tiny-vit-64").model
    decay, no_decay = train_step.parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "logit_scale" in no_decay_names
    assert "ln_final.weight" in no_decay_names and "visual.conv1.weight" not in no_decay_names
    assert all(n.endswith(("bias", "weight")) or n in ("logit_scale", "visual.class_embedding")
               for n in no_decay_names)
    assert all(torch.is_tensor(p) and p.ndim >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1


def test_metric_paths_and_flattening():
    metrics = {"retrieval": {"image_to_text": {"R@1": 10.0}, "rsum": 55.0},
               "similarity": {"gap": 0.2}, "num_images": 4}
    assert settings.metric_value(metrics, "image_to_text/R@1") == 10.0
    assert settings.metric_value(metrics, "rsum") == 55.0
    with pytest.raises(SettingsError, match="best_metric 'R@7'"):
        settings.metric_value(metrics, "R@7")
    assert evaluation.flatten_metrics(metrics) == {"val/image_to_text/R@1": 10.0, "val/rsum": 55.0,
                                              "val/similarity/gap": 0.2, "val/num_images": 4}


# ---- gradient accumulation ----------------------------------------------------------------------

def batch_of(setup, start, n):
    g = torch.Generator().manual_seed(start)
    return {"images": torch.randn(n, 3, 64, 64, generator=g),
            "texts": setup.tokenizer([f"caption {i} of a shape" for i in range(start, start + n)]),
            "image_ids": torch.arange(start, start + n)}


def gradients_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_four_accumulated_batches_of_8_give_the_update_of_one_batch_of_32():
    torch.manual_seed(0)
    setup = cm.build_model("tiny-vit-64")        # LayerNorm only: batch composition is irrelevant
    model, loss_fn = setup.model.train(), cm.ContrastiveLoss()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    big = batch_of(setup, 0, 32)
    micro = [{k: v[i * 8:(i + 1) * 8] for k, v in big.items()} for i in range(4)]

    big_loss = train_step.backward_step(model, loss_fn, [big], scaler, "fp32", "cpu")["loss"]
    expected = gradients_of(model)
    model.zero_grad()
    accumulated_loss = train_step.backward_step(model, loss_fn, micro, scaler, "fp32", "cpu")["loss"]
    got = gradients_of(model)

    assert accumulated_loss.item() == pytest.approx(big_loss.item(), rel=1e-5)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-7, msg=name)
    # plain accumulation of per-micro-batch losses would NOT match: it sees 8 negatives, not 32
    model.zero_grad()
    for b in micro:
        train_step.backward_step(model, loss_fn, [b], scaler, "fp32", "cpu")
    naive = gradients_of(model)
    assert not torch.allclose(naive["visual.proj"], expected["visual.proj"], rtol=1e-2)


# ---- whole runs -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return {"train": sample_data.create_sample_dataset(folder / "train", num_samples=480, seed=0),
            "val": sample_data.create_sample_dataset(folder / "val", num_samples=100, seed=1)}


def run_args(data, out, *extra):
    return ["--data_dir", str(data["train"]["index"]), "--val_data", str(data["val"]["index"]),
            "--checkpoint_dir", str(out / "ckpt"), "--log_dir", str(out / "logs"),
            "--results_dir", str(out / "results"), "--num_workers", "0", "--batch_size", "32",
            "--log_every", "5", "--warmup_steps", "5",
            # the pictures and projector cost ~2 s a validation; tests/test_tensorboard_views.py tests them
            "--tensorboard_pairs", "0", "--projector_pairs", "0", *extra]


@pytest.fixture(scope="module")
def learned_run(data, tmp_path_factory):
    """One short training run shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    result = train.main(run_args(data, out, "--run_name", "learn", "--num_epochs", "2",
                                 "--learning_rate", "2e-3", "--eval_every", "30"))
    return out, result


class StepClock:
    """train.py's clock, on which each training step takes `step_s` and nothing else takes time:
    plans that do not depend on how busy the machine running the test is."""

    def __init__(self, monkeypatch, step_s):
        self.steps, self.step_s = 0, step_s
        real_step = train.optimizer_step

        def counted_step(job, micro_batches):
            self.steps += 1
            return real_step(job, micro_batches)
        monkeypatch.setattr(train, "optimizer_step", counted_step)
        monkeypatch.setattr(train, "time", SimpleNamespace(perf_counter=self))
        monkeypatch.setattr(budget, "run_clock", lambda started, count_imports: self)

    def __call__(self):
        return self.steps * self.step_s


def ends_at(plan):
    """When a plan (of training_results.json) expects its run to end."""
    return (plan["elapsed_s"] + (plan["total_steps"] - plan["step"]) * plan["step_s"] + plan["end_s"]
            + plan["validations"] * plan["validation_s"] + plan["checkpoints"] * plan["checkpoint_s"])


@pytest.mark.slow
def test_a_run_with_a_time_budget_plans_its_steps_ends_decayed_and_resumes_with_what_is_left(
        data, tmp_path, monkeypatch):
    args = run_args(data, tmp_path, "--run_name", "budget", "--time_budget", "20s", "--warmup_steps", "2")
    StepClock(monkeypatch, step_s=0.5)                    # 40 steps would fill 20 s
    first = train.main([*args, "--stop_at_step", "12"])
    assert first["step"] == 12 and first["stop_reason"] == "stop_at_step 12 reached"
    results = json.loads((tmp_path / "results/budget/training_results.json").read_text())
    assert results["time_budget"]["budget_s"] == 20
    plan = results["time_budget"]["plans"][0]
    assert plan["step"] == budget.PLAN_AFTER + 1 and plan["step_s"] == 0.5
    assert ends_at(plan) <= 20 < ends_at(plan) + 0.5      # the last step that fits
    used_first = results["time_budget"]["used_s"]
    assert used_first == 12 * 0.5                         # (the rest takes no time on this clock)

    StepClock(monkeypatch, step_s=1.0)                    # the resumed part runs on a slower machine
    result = train.main([*args, "--resume", "auto"])
    results = json.loads((tmp_path / "results/budget/training_results.json").read_text())
    plans = results["time_budget"]["plans"]
    assert plans[-1]["step"] > 12 and plans[-1]["elapsed_s"] > used_first   # counts the first part's time
    assert ends_at(plans[-1]) <= 20 < ends_at(plans[-1]) + 1.0
    assert result["stop_reason"] is None and result["step"] == plans[-1]["total_steps"]
    last = result["history"]["train"][-1]
    assert last["step"] == result["step"] and last["lr"] == pytest.approx(0.0, abs=1e-9)   # decayed
    assert results["time_budget"]["used_s"] == pytest.approx(used_first + (result["step"] - 12) * 1.0)


@pytest.mark.slow
def test_a_short_run_learns_far_above_chance(learned_run):
    out, result = learned_run
    final = result["history"]["val"][-1]["retrieval"]
    # 100 validation images: chance is R@1 = 1% and R@10 = 10%
    assert final["text_to_image"]["R@10"] > 40
    assert final["image_to_text"]["R@10"] > 40
    losses = [e["loss"] for e in result["history"]["train"]]
    assert losses[-1] < losses[0] - 0.5


@pytest.mark.slow
def test_a_run_writes_checkpoints_results_and_curves(learned_run):
    out, result = learned_run
    assert (out / "ckpt/learn/last.pt").is_file() and (out / "ckpt/learn/best.pt").is_file()
    saved = json.loads((out / "ckpt/learn/config.json").read_text())
    assert saved["num_epochs"] == 2 and saved["learning_rate"] == 2e-3
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


@pytest.mark.slow
def test_the_checkpoint_is_consumed_by_evaluation(learned_run, data, tmp_path):
    out, _ = learned_run
    output = tmp_path / "eval.json"
    subprocess.run([sys.executable, "evaluation.py", "--checkpoint", str(out / "ckpt/learn/best.pt"),
                    "--data", str(data["val"]["index"]), "--output", str(output)],
                   cwd=ROOT, check=True, capture_output=True)
    metrics = json.loads(output.read_text())
    assert metrics["num_images"] == 100
    assert metrics["retrieval"]["text_to_image"]["R@10"] > 40


@pytest.mark.slow
def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(data, tmp_path):
    common = ("--max_steps", "14", "--eval_every", "6", "--save_every", "1000")
    whole = train.main(run_args(data, tmp_path, "--run_name", "whole", *common))
    assert whole["step"] == 14
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


@pytest.mark.slow
def test_the_image_and_caption_caches_and_workers_change_nothing_a_run_learns(data, tmp_path):
    common = ("--max_steps", "2", "--eval_every", "2", "--num_workers", "1")
    train.main(run_args(data, tmp_path, "--run_name", "cached", *common))
    train.main(run_args(data, tmp_path, "--run_name", "decoded", "--no-cache_images", *common))
    log = (tmp_path / "logs/cached/train.log").read_text()
    # cached on a CPU: batches built in this process; decoded: in a DataLoader worker
    assert "tokenised captions" in log and "batches are built from the cache in this process" in log
    a = cm.load_checkpoint(tmp_path / "ckpt/cached/last.pt")["state_dict"]
    b = cm.load_checkpoint(tmp_path / "ckpt/decoded/last.pt")["state_dict"]
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name


@pytest.mark.parametrize("sample_by", ["caption", "image"])
def test_an_epoch_has_a_step_per_batch_of_captions_or_of_images(sample_by, data, tmp_path):
    import data_loader
    index = data_loader.load_caption_index(data["train"]["index"])
    train.main(run_args(data, tmp_path, "--run_name", "epoch", "--sample_by", sample_by,
                        "--num_epochs", "2", "--stop_at_step", "1"))
    per_epoch = (index.num_captions if sample_by == "caption" else index.num_images) // 32
    assert f"training {2 * per_epoch} steps ({per_epoch} per epoch)" in (tmp_path / "logs/epoch/train.log").read_text()
    assert index.num_captions > index.num_images


def test_an_existing_run_is_not_overwritten_without_resume(data, tmp_path):
    train.main(run_args(data, tmp_path, "--run_name", "once", "--max_steps", "2"))
    with pytest.raises(OutputError, match="last.pt exists.*--resume auto"):
        train.main(run_args(data, tmp_path, "--run_name", "once", "--max_steps", "2"))


@pytest.mark.slow
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


def test_zero_shot_on_the_generated_shape_classes_is_far_above_chance(learned_run, data):
    import evaluation
    out, _ = learned_run
    setup, _ = cm.model_from_checkpoint(out / "ckpt/learn/best.pt")
    zeroshot = evaluation.evaluate_zeroshot(setup, data["val"]["zeroshot"])
    chance = 100 / len(zeroshot["classnames"])
    assert zeroshot["top1"] > 3 * chance
    assert zeroshot["top5"] > 3 * 5 * chance


# ---- fine-tuning: the moving average of the weights, zero-shot during training -------------------

def test_the_moving_average_copies_constant_buffers_such_as_the_causal_mask():
    # The average of -inf and -inf is NaN: a mask averaged like a weight made every text feature
    # of the average NaN (found when evaluation began to refuse NaN features).
    model = cm.build_model("tiny-vit-64").model
    ema = train_step.build_ema(SimpleNamespace(ema_decay=0.9), model)
    for _ in range(3):
        ema.update_parameters(model)
    assert torch.equal(ema.module.attn_mask, model.attn_mask)
    with torch.no_grad():
        features = ema.module.encode_text(torch.randint(1, 49000, (2, 32)))
    assert torch.isfinite(features).all()


def test_the_moving_average_follows_its_formula_with_a_warming_decay():
    model = torch.nn.Linear(3, 2)
    cfg = train.argparse.Namespace(ema_decay=0.8)
    ema = train_step.build_ema(cfg, model)
    expected = {name: p.detach().clone() for name, p in model.named_parameters()}   # the first copy
    ema.update_parameters(model)
    for n in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        decay = min(0.8, (1 + n) / (10 + n))
        for name, p in model.named_parameters():
            expected[name] = decay * expected[name] + (1 - decay) * p.detach()
        ema.update_parameters(model)
    for name, p in ema.module.named_parameters():
        torch.testing.assert_close(p, expected[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("tail,dropout_at_74,dropout_at_75", [(0.25, 0.5, 0.0), (0.0, 0.5, 0.5)])
def test_the_last_share_of_a_run_sees_every_patch(tail, dropout_at_74, dropout_at_75):
    model = cm.build_model("tiny-vit-64", patch_dropout=0.5).model
    job = SimpleNamespace(cfg=SimpleNamespace(patch_dropout_tail=tail), total_steps=100, raw_model=model,
                          run=SimpleNamespace(log=SimpleNamespace(info=lambda message: None)))
    train.unmask_tail(job, SimpleNamespace(step=74))
    assert model.visual.patch_dropout.prob == dropout_at_74
    train.unmask_tail(job, SimpleNamespace(step=75))
    assert model.visual.patch_dropout.prob == dropout_at_75


def best_rule_job(num_images=100, num_captions=100, total_steps=100):
    return SimpleNamespace(cfg=SimpleNamespace(best_metric="text_to_image/R@1"), total_steps=total_steps,
                           val_index=SimpleNamespace(num_images=num_images, num_captions=num_captions),
                           run=SimpleNamespace(log=SimpleNamespace(info=lambda message: None)))


def recall_at_1(p):
    return {"retrieval": {"text_to_image": {"R@1": p}}}


@pytest.mark.parametrize("step,value,expected", [
    (50, 52.0, False),     # 2 points above the best of 50: inside the noise of 100 queries (5.0)
    (50, 55.5, True),      # beyond it
    (100, 46.0, True),     # the last step, decayed: kept unless the best beats it by more than the noise
    (100, 44.0, False),
])
def test_a_new_best_must_beat_the_noise_and_the_final_weights_win_within_it(step, value, expected):
    state = SimpleNamespace(step=step, best={"value": 50.0, "step": 40})
    # SE of a recall of p percent over 100 queries: sqrt(p (100 - p) / 100), 5.0 at p = 50
    assert train.is_new_best(best_rule_job(), state, value, recall_at_1(value)) is expected


def test_the_noise_of_rsum_adds_the_recalls_of_a_direction_and_the_directions_in_quadrature():
    metrics = {"retrieval": {"image_to_text": {"R@1": 20.0, "R@5": 50.0, "R@10": 80.0},
                             "text_to_image": {"R@1": 10.0, "R@5": 50.0, "R@10": 90.0}}}
    images, captions = 400, 900
    i2t = (20 * 80 / 400) ** 0.5 + (50 * 50 / 400) ** 0.5 + (80 * 20 / 400) ** 0.5    # 2 + 2.5 + 2
    t2i = (10 * 90 / 900) ** 0.5 + (50 * 50 / 900) ** 0.5 + (90 * 10 / 900) ** 0.5    # 1 + 5/3 + 1
    assert evaluation.standard_error(metrics, "rsum", images, captions) == pytest.approx((i2t ** 2 + t2i ** 2) ** 0.5)
    assert evaluation.standard_error(metrics, "mean_recall", images, captions) == \
        pytest.approx((i2t ** 2 + t2i ** 2) ** 0.5 / 6)
    assert evaluation.standard_error(metrics, "image_to_text/R@5", images, captions) == pytest.approx(2.5)


@pytest.mark.slow
def test_ema_is_validated_beside_the_weights_and_resumes_exactly(data, tmp_path):
    common = ("--max_steps", "6", "--eval_every", "3", "--ema_decay", "0.9", "--save_every", "1000")
    whole = train.main(run_args(data, tmp_path, "--run_name", "whole", *common))
    train.main(run_args(data, tmp_path, "--run_name", "split", "--stop_at_step", "3", *common))
    train.main(run_args(data, tmp_path, "--run_name", "split", "--resume", "auto", *common))
    a, b = (cm.load_checkpoint(tmp_path / f"ckpt/{run}/last.pt") for run in ("whole", "split"))
    for name, tensor in a["ema"].items():
        assert torch.equal(tensor, b["ema"][name]), name
    val = data_loader.load_caption_index(data["val"]["index"])
    best_seen = None       # the rule (train.is_new_best): the better of the two, if it beats the best so
    for validation in whole["history"]["val"]:    # far by more than the noise, or is the last within it
        assert validation["retrieval"]["rsum"] > 0 and validation["ema"]["retrieval"]["rsum"] > 0
        candidates = [("raw", validation), ("ema", validation["ema"])]
        weights, scored = max(candidates, key=lambda candidate: candidate[1]["retrieval"]["rsum"])
        value = scored["retrieval"]["rsum"]
        noise = evaluation.standard_error(scored, "rsum", val.num_images, val.num_captions)
        last = validation["step"] == whole["step"]
        if best_seen is None or value > best_seen[0] + noise or (last and value >= best_seen[0] - noise):
            best_seen = (value, validation["step"], weights)
    best = cm.load_checkpoint(tmp_path / "ckpt/whole/best.pt")
    assert (best["best"]["value"], best["step"], best["best"]["weights"]) == best_seen
    if best_seen[1:] == (6, "ema"):      # then best.pt holds the average of the last step
        averaged = {k[len("module."):]: v for k, v in a["ema"].items() if k.startswith("module.")}
        assert all(torch.equal(best["state_dict"][k], averaged[k]) for k in best["state_dict"])


@pytest.mark.slow
def test_zero_shot_is_tracked_at_every_validation_and_can_pick_best_pt(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    result = train.main(run_args(data, tmp_path, "--run_name", "zs", "--max_steps", "4", "--eval_every", "2",
                                 "--val_zeroshot", data["val"]["zeroshot"], "--best_metric", "zeroshot/top1"))
    for validation in result["history"]["val"]:
        assert set(validation["zeroshot"]) == {"top1", "top5", "mean_per_class_recall"}
        assert 0 <= validation["zeroshot"]["top1"] <= validation["zeroshot"]["top5"] <= 100
    assert result["best"]["metric"] == "zeroshot/top1"
    assert result["best"]["value"] == max(v["zeroshot"]["top1"] for v in result["history"]["val"])
    events = EventAccumulator(str(tmp_path / "logs/zs")).Reload()
    assert [e.step for e in events.Scalars("val/zeroshot/top1")] == [2, 4]
    with pytest.raises(SettingsError, match="best_metric zeroshot/top1 needs --val_zeroshot"):
        train.main(run_args(data, tmp_path, "--run_name", "zs2", "--best_metric", "zeroshot/top1"))


@pytest.mark.slow
def test_a_captioners_last_validation_scores_its_captions_and_the_earlier_ones_do_not(data, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    asked, evaluate_captions = [], evaluation.evaluate_captions

    def short_captions(setup, index, **options):     # an untrained decoder's captions run long
        asked.append(options["num_images"])
        return evaluate_captions(setup, index, cm.CaptionSettings(max_length=4, num_beams=2), **options)
    monkeypatch.setattr(evaluation, "evaluate_captions", short_captions)
    few = sample_data.create_sample_dataset(tmp_path / "few", num_samples=4, seed=2)["index"]
    result = train.main(run_args(data, tmp_path, "--run_name", "coca", "--model_name", "tiny-coca-64",
                                 "--val_data", few, "--max_steps", "2", "--eval_every", "1", "--batch_size", "8",
                                 "--val_captions", "3"))
    first, last = result["history"]["val"]
    assert asked == [3] and "captioning" not in first
    assert set(last["captioning"]) == {"BLEU-1_x100", "BLEU-2_x100", "BLEU-3_x100", "BLEU-4_x100",
                                       "CIDEr-D_x100", "num_images"} and last["captioning"]["num_images"] == 3
    events = EventAccumulator(str(tmp_path / "logs/coca")).Reload()
    assert [e.step for e in events.Scalars("val/captioning/CIDEr-D_x100")] == [2]


@pytest.mark.slow
def test_hard_negative_batches_resume_exactly_mid_epoch(data, tmp_path):
    # epochs of images (15 steps), so that 18 steps cross one; groups of captions of one image
    # (sample_by caption) are left out by data_loader.neighbourhood_order, tested on its own
    common = ("--max_steps", "18", "--hard_negatives", "0.5", "--eval_every", "1000", "--save_every", "1000",
              "--sample_by", "image")
    train.main(run_args(data, tmp_path, "--run_name", "whole", *common))
    train.main(run_args(data, tmp_path, "--run_name", "split", "--stop_at_step", "7", *common))
    result = train.main(run_args(data, tmp_path, "--run_name", "split", "--resume", "auto", *common))
    assert result["step"] == 18 and result["timing"]["mining_s"] > 0
    a, b = (cm.load_checkpoint(tmp_path / f"ckpt/{run}/last.pt") for run in ("whole", "split"))
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    assert a["epoch_order"][0] == 1 and torch.equal(a["epoch_order"][1], b["epoch_order"][1])
    log = (tmp_path / "logs/whole/train.log").read_text()
    assert "epoch 0: hard-negative batches mined from 480 captions" in log and "epoch 1: hard-negative" in log


@pytest.mark.slow
@pytest.mark.parametrize("users_setting", [None, "131072"])
def test_a_steps_freed_buffers_are_reused_without_page_faults_unless_the_user_set_malloc(users_setting):
    """A step allocates and frees buffers of 4-24 MiB (76 MiB, 19,456 pages), as a training step
    does with its activations. After runtime.tune_malloc the freed pages stay in the process for the
    next step. A malloc setting of the user's own wins: here one that serves every block over
    128 KiB with fresh pages, so each step faults all its pages in again."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    if users_setting:
        env["MALLOC_MMAP_THRESHOLD_"] = users_setting
    code = ("import resource, torch, runtime\n"
            "runtime.tune_malloc()\n"
            "def step(): return [torch.empty(mib << 18).fill_(1.0) for mib in (8, 16, 24, 8, 4, 16)]\n"
            "step()\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for _ in range(20): step()\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    faults_per_step = float(out.stdout)
    if users_setting:
        assert faults_per_step > 19_000
    else:
        assert faults_per_step < 1_000


@pytest.mark.parametrize("cache,users_value,seen", [("--cache_images", None, ["None"]),
                                                     ("--no-cache_images", None, ["None", "1000"]),
                                                     ("--no-cache_images", "250000", ["250000"])])
@pytest.mark.slow
def test_openmp_threads_spin_briefly_beside_workers_unless_the_user_chose(cache, users_value, seen, tmp_path):
    """GOMP_SPINCOUNT must be in the environment when torch loads OpenMP, which is before
    train.main runs: when workers will decode beside the model (uncached images), the train.py
    process starts again, once, with the setting; a value the user exported is kept as it is."""
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if users_value:
        env["GOMP_SPINCOUNT"] = users_value
    code = ("import os, train; print(os.environ.get('GOMP_SPINCOUNT'), flush=True); "
            "train.run_script(train.main, 'train.py')")
    out = subprocess.run([sys.executable, "-c", code, cache, "--num_workers", "1", "--data_dir",
                          str(tmp_path / "absent")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.stdout.split() == seen                       # each start of the process prints once
    assert out.returncode == 1 and "absent: no such file or folder" in out.stderr
