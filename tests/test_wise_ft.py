"""Specification of wise_ft.py: weight-space interpolation between a pretrained and a fine-tuned
checkpoint, exact at both ends, evaluated at each mix, refused between two architectures."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import clip_model as cm
import data_loader
import evaluation
import sample_data
import wise_ft
from errors import CheckpointError, SettingsError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory):
    """A 'pretrained' tiny model and a 'fine-tuned' one: the same architecture, other weights."""
    folder = tmp_path_factory.mktemp("wise")
    torch.manual_seed(0)
    start = cm.build_model("tiny-vit-64")
    cm.save_checkpoint(folder / "pretrained.pt", start)
    end = cm.build_model("tiny-vit-64")
    with torch.no_grad():
        for p, q in zip(end.model.parameters(), start.model.parameters()):
            p.copy_(q + 0.05 * torch.randn_like(q))
    cm.save_checkpoint(folder / "finetuned.pt", end)
    data = sample_data.create_sample_dataset(folder / "data", num_samples=24, seed=0)
    return {"folder": folder, "start": start, "end": end, "data": data}


def test_alpha_0_and_1_are_the_two_inputs_exactly_and_between_is_the_straight_line(endpoints):
    setup, start, end = wise_ft.load_endpoints(endpoints["folder"] / "pretrained.pt",
                                               endpoints["folder"] / "finetuned.pt", "cpu")
    for name, tensor in wise_ft.interpolate(start, end, 0.0).items():
        assert torch.equal(tensor, start[name]), name
    for name, tensor in wise_ft.interpolate(start, end, 1.0).items():
        assert torch.equal(tensor, end[name]), name
    middle = wise_ft.interpolate(start, end, 0.25)["visual.proj"]
    torch.testing.assert_close(middle, 0.75 * start["visual.proj"] + 0.25 * end["visual.proj"])


def test_each_mix_is_evaluated_drawn_and_a_chosen_one_saved(endpoints, tmp_path):
    data, folder = endpoints["data"], endpoints["folder"]
    output, saved = tmp_path / "wise.json", tmp_path / "mixed.pt"
    results = wise_ft.main([str(folder / "pretrained.pt"), str(folder / "finetuned.pt"), "--alpha", "0,0.5,1",
                            "--data", data["index"], "--zeroshot", data["zeroshot"], "--output", str(output),
                            "--save", "0.5", str(saved), "--num_workers", "0"])
    assert [r["alpha"] for r in results] == [0.0, 0.5, 1.0]
    direct = evaluation.evaluate_model(endpoints["start"], data_loader.load_caption_index(data["index"]))
    assert results[0]["retrieval"] == direct["retrieval"]            # alpha 0 is the pretrained model
    assert json.loads(output.read_text())["results"] == results
    assert output.with_suffix(".png").stat().st_size > 10_000
    mixed = cm.load_checkpoint(saved)
    assert mixed["wise_ft"]["alpha"] == 0.5
    torch.testing.assert_close(mixed["state_dict"]["text_projection"],
                               0.5 * endpoints["start"].model.text_projection.detach()
                               + 0.5 * endpoints["end"].model.text_projection.detach())


@pytest.mark.slow
def test_the_mixes_are_evaluated_on_shards_as_on_the_json_they_come_from(endpoints, tmp_path):
    from test_shards import write_img2dataset_of
    data, folder = endpoints["data"], endpoints["folder"]
    pattern = write_img2dataset_of(data["index"], tmp_path / "shards", per_shard=10)
    mixes = [wise_ft.main([str(folder / "pretrained.pt"), str(folder / "finetuned.pt"), "--alpha", "0.5",
                           "--data", source, "--num_workers", "0"]) for source in (data["index"], pattern)]
    assert mixes[0] == mixes[1] and mixes[0][0]["retrieval"]["rsum"] > 0


@pytest.mark.slow
def test_two_architectures_and_bad_alphas_are_refused_in_one_line(endpoints, tmp_path):
    cm.save_checkpoint(tmp_path / "other.pt", cm.build_model("simple-rn18"))
    with pytest.raises(CheckpointError, match="not two states of one architecture"):
        wise_ft.load_endpoints(tmp_path / "other.pt", endpoints["folder"] / "finetuned.pt", "cpu")
    with pytest.raises(SettingsError, match="every alpha must be in"):
        wise_ft.parse_alphas("0,1.5")
    done = subprocess.run([sys.executable, "wise_ft.py", str(tmp_path / "other.pt"),
                           str(endpoints["folder"] / "finetuned.pt"), "--save", "0.5", str(tmp_path / "x.pt")],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("wise_ft.py: error:")


@pytest.mark.slow
def test_a_pretrained_file_that_is_not_weights_is_refused_in_one_line(endpoints, tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"x": Evil()}, tmp_path / "pickle.pt")
    data = (endpoints["folder"] / "pretrained.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[:len(data) // 2])
    finetuned = endpoints["folder"] / "finetuned.pt"
    for pretrained, message in [(tmp_path / "pickle.pt", "pickle.pt was NOT loaded"),
                                (tmp_path / "truncated.pt", "truncated.pt cannot be read.*truncated"),
                                (Path("/etc/passwd"), "/etc/passwd cannot be read.*not a weights file")]:
        with pytest.raises(CheckpointError, match=message) as refused:
            wise_ft.load_endpoints(str(pretrained), finetuned, "cpu")
        assert "\n" not in str(refused.value)
    done = subprocess.run([sys.executable, "wise_ft.py", "/etc/passwd", str(finetuned), "--save", "0.5",
                           str(tmp_path / "x.pt")], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.startswith("wise_ft.py: error: /etc/passwd cannot be read")
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.slow
def test_a_nan_checkpoint_is_refused_in_one_line_instead_of_scoring_rsum_600(endpoints, tmp_path):
    nan = cm.build_model("tiny-vit-64")
    with torch.no_grad():
        nan.model.visual.proj.fill_(float("nan"))
    cm.save_checkpoint(tmp_path / "nan.pt", nan)
    done = subprocess.run([sys.executable, "wise_ft.py", str(tmp_path / "nan.pt"),
                           str(endpoints["folder"] / "finetuned.pt"), "--alpha", "0",
                           "--data", endpoints["data"]["index"], "--num_workers", "0"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1 and "600" not in done.stdout, done.stdout
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"wise_ft.py: error: the mix of alpha 0.0 of {tmp_path / 'nan.pt'} and ")
    assert "image features: 24 of 24 rows hold NaN or infinite values" in done.stderr
