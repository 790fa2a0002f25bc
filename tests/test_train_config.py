"""train.py's settings, schedule, parameter groups and the accumulated-batch step."""
import json
from pathlib import Path

import pytest
import torch

import clip_model as cm
import evaluation
import train
from errors import SettingsError

ROOT = Path(__file__).resolve().parent.parent


def write_config(tmp_path, sections):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(sections))
    return str(path)


# ---- settings -----------------------------------------------------------------------------------

def test_config_json_holds_exactly_the_schema_defaults():
    assert json.loads((ROOT / "config.json").read_text()) == train.default_config()


def test_every_setting_is_a_flag_with_help():
    help_text = train.build_parser().format_help()
    for setting in train.SCHEMA:
        assert f"--{setting.name}" in help_text


def test_precedence_is_defaults_then_config_file_then_flags(tmp_path):
    path = write_config(tmp_path, {"training": {"batch_size": 16, "learning_rate": 0.01},
                                   "logging": {"run_name": "from-file"}})
    cfg = train.parse_config(["--config", path, "--batch_size", "8"])
    assert cfg.batch_size == 8                     # flag beats file
    assert cfg.learning_rate == 0.01               # file beats default
    assert cfg.run_name == "from-file"
    assert cfg.weight_decay == train.SETTINGS["weight_decay"].default   # default stays


def test_boolean_flags_turn_settings_on_and_off(tmp_path):
    path = write_config(tmp_path, {"data": {"augment": False}})
    assert train.parse_config(["--config", path]).augment is False
    assert train.parse_config(["--config", path, "--augment"]).augment is True
    assert train.parse_config(["--config", path, "--no-augment"]).augment is False


def test_unknown_key_in_the_config_file_is_an_error_naming_it(tmp_path):
    path = write_config(tmp_path, {"training": {"batch_sise": 16}})
    with pytest.raises(SettingsError, match="unknown setting 'batch_sise'"):
        train.parse_config(["--config", path])


def test_wrong_type_in_the_config_file_is_an_error_naming_the_key(tmp_path):
    path = write_config(tmp_path, {"training": {"batch_size": "64"}})
    with pytest.raises(SettingsError, match="batch_size must be int, got '64'"):
        train.parse_config(["--config", path])


def test_key_in_the_wrong_section_is_an_error(tmp_path):
    path = write_config(tmp_path, {"model": {"batch_size": 64}})
    with pytest.raises(SettingsError, match="batch_size belongs in section 'training'"):
        train.parse_config(["--config", path])


def test_invalid_choice_and_unknown_flag_are_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.parse_config(["--precision", "fp8"])
    with pytest.raises(SystemExit):
        train.parse_config(["--batch_sise", "3"])
    assert "unrecognized arguments: --batch_sise" in capsys.readouterr().err


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(SettingsError, match="nope.json: file not found"):
        train.parse_config(["--config", str(tmp_path / "nope.json")])


# ---- schedule and optimiser ---------------------------------------------------------------------

def test_schedule_warms_up_linearly_then_decays_to_zero():
    factor = train.cosine_with_warmup(total_steps=110, warmup_steps=10)
    assert [factor(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.5)
    assert factor(110) == pytest.approx(0.0)


@pytest.mark.parametrize("total,warmup", [(1, 0), (1, 1), (1, 100), (5, 5), (3, 0), (7, 1000)])
def test_no_combination_of_steps_and_warmup_divides_by_zero(total, warmup):
    factor = train.cosine_with_warmup(total, warmup)
    values = [factor(s) for s in range(total + 1)]
    assert all(0 <= v <= 1 for v in values)
    assert max(values) == pytest.approx(1.0)       # a capped warmup still reaches the peak


def test_no_weight_decay_on_biases_norms_and_the_logit_scale():
    model = cm.build_model("tiny-vit-64").model
    decay, no_decay = train.parameter_groups(model, 0.1)
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
    assert train.metric_value(metrics, "image_to_text/R@1") == 10.0
    assert train.metric_value(metrics, "rsum") == 55.0
    with pytest.raises(SettingsError, match="best_metric 'R@7'"):
        train.metric_value(metrics, "R@7")
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

    big_loss = train.backward_step(model, loss_fn, [big], scaler, "fp32", "cpu")
    expected = gradients_of(model)
    model.zero_grad()
    accumulated_loss = train.backward_step(model, loss_fn, micro, scaler, "fp32", "cpu")
    got = gradients_of(model)

    assert accumulated_loss.item() == pytest.approx(big_loss.item(), rel=1e-5)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-7, msg=name)
    # plain accumulation of per-micro-batch losses would NOT match: it sees 8 negatives, not 32
    model.zero_grad()
    for b in micro:
        train.backward_step(model, loss_fn, [b], scaler, "fp32", "cpu")
    naive = gradients_of(model)
    assert not torch.allclose(naive["visual.proj"], expected["visual.proj"], rtol=1e-2)
