"""export.py: the open_clip folder loads in plain open_clip, the ONNX encoders give PyTorch's
features to a client that follows onnx_config.json, and a broken export fails its check."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import open_clip
import pytest
import torch
from PIL import Image

import clip_model as cm
import data_loader
import export
import train
from errors import DataError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def check_data(tmp_path_factory):
    return data_loader.create_sample_dataset(tmp_path_factory.mktemp("check"), num_samples=40, seed=1)["index"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint of a short train.py run (so it holds settings and a validation history)."""
    out = tmp_path_factory.mktemp("run")
    data = data_loader.create_sample_dataset(out / "data", num_samples=64, seed=0)["index"]
    train.main(["--data_dir", str(data), "--max_steps", "3", "--batch_size", "16", "--num_workers", "0",
                "--run_name", "x", "--checkpoint_dir", str(out / "ckpt"), "--log_dir", str(out / "logs"),
                "--results_dir", str(out / "results"), "--tensorboard_pairs", "0", "--projector_pairs", "0"])
    return out / "ckpt/x/last.pt"


@pytest.fixture(scope="module")
def exported(trained, check_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    report = export.main(["--checkpoint", str(trained), "--output", str(folder), "--onnx",
                          "--quantize", "int8", "--check_data", str(check_data)])
    return folder, report


def reference_features(checkpoint, entries, root):
    """PyTorch features of the first caption and the image of each data.json entry."""
    setup, _ = cm.model_from_checkpoint(checkpoint)
    transform = data_loader.image_transform(setup.preprocess_cfg)
    pixels = torch.stack([transform(data_loader.decode_image((root / e["image_path"]).read_bytes(), "x"))
                          for e in entries])
    loader = [(pixels, torch.arange(len(entries)))]
    texts = cm.encode_texts(setup.model, setup.tokenizer, [e["captions"][0] for e in entries], "cpu")
    return cm.encode_images(setup.model, loader, "cpu").numpy(), texts.numpy()


@pytest.mark.slow
def test_an_export_writes_every_file_and_passes_its_check(exported):
    folder, report = exported
    for name in ["open_clip_config.json", "open_clip_model.safetensors", "README.md", "image_encoder.onnx",
                 "text_encoder.onnx", "onnx_config.json", "image_encoder.int8.onnx",
                 "text_encoder.int8.onnx", "export_report.json"]:
        assert (folder / name).is_file(), name
    assert json.loads((folder / "export_report.json").read_text()) == report
    for part in ("open_clip_folder", "onnx"):
        assert report[part]["passed"] and not report[part]["failures"]
        for tower in ("image", "text"):   # float32 round-off, far inside the tolerance
            assert 1 - report[part][tower]["min_cosine"] < 1e-9
        assert report[part]["recall"] == report["pytorch"]["recall"]
    assert report["images"] == 40 and report["onnx"]["opset"] == export.DEFAULT_OPSET


@pytest.mark.slow
def test_the_open_clip_folder_loads_where_this_repository_is_unknown(exported, trained, check_data,
                                                                      tmp_path):
    folder, _ = exported
    script = """
import json, os, sys
import numpy as np, open_clip, torch
from PIL import Image
folder, data = sys.argv[1], sys.argv[2]
entries = json.load(open(data))[:6]
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + folder)
tokenizer = open_clip.get_tokenizer("local-dir:" + folder)
images = torch.stack([preprocess(Image.open(os.path.join(os.path.dirname(data), e["image_path"])))
                      for e in entries])
with torch.no_grad():
    np.save("images.npy", model.encode_image(images, normalize=True).numpy())
    np.save("texts.npy", model.encode_text(tokenizer([e["captions"][0] for e in entries]),
                                           normalize=True).numpy())
ours = [m for m in ("augmentation", "clip_model", "data_loader", "export", "train") if m in sys.modules]
assert not ours and not open_clip.get_model_config("tiny-vit-64"), ours
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script, str(folder), str(check_data)], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    entries = json.loads(Path(check_data).read_text())[:6]
    images, texts = reference_features(trained, entries, Path(check_data).parent)
    np.testing.assert_allclose(np.load(tmp_path / "images.npy"), images, atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "texts.npy"), texts, atol=1e-6)


def client_pixels(image, config):
    """What onnx_config.json tells a client without PyTorch to do with an image (numpy, PIL)."""
    height, width = config["image_size"]
    scale = max(height / image.height, width / image.width)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    pixels = np.asarray(image.crop((left, top, left + width, top + height)), dtype=np.float32) / 255
    return ((pixels - config["mean"]) / config["std"]).transpose(2, 0, 1).astype(np.float32)


@pytest.mark.parametrize("batch", [1, 5])
def test_the_onnx_encoders_give_pytorchs_features_to_a_client(exported, trained, check_data, batch):
    folder, _ = exported
    config = json.loads((folder / "onnx_config.json").read_text())
    entries = json.loads(Path(check_data).read_text())[:batch]
    root = Path(check_data).parent
    pixels = np.stack([client_pixels(Image.open(root / e["image_path"]).convert("RGB"), config)
                       for e in entries])
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}", context_length=config["context_length"])
    tokens = tokenizer([e["captions"][0] for e in entries]).numpy()
    images = onnxruntime.InferenceSession(str(folder / config["image_encoder"])).run(None, {"pixels": pixels})[0]
    texts = onnxruntime.InferenceSession(str(folder / config["text_encoder"])).run(None, {"tokens": tokens})[0]
    reference_images, reference_texts = reference_features(trained, entries, root)
    np.testing.assert_allclose(images, reference_images, atol=1e-5)
    np.testing.assert_allclose(texts, reference_texts, atol=1e-5)
    setup, _ = cm.model_from_checkpoint(trained)
    assert config["logit_scale"] == pytest.approx(setup.model.logit_scale.exp().item())
    assert tokens.shape == (batch, 32) and config["embed_dim"] == images.shape[1] == 128


def test_int8_encoders_are_smaller_and_their_recall_change_is_measured(exported):
    _, report = exported
    files = {**report["onnx"]["files"], **report["int8"]["files"]}
    for tower in ("image_encoder", "text_encoder"):
        assert files[f"{tower}.int8.onnx"] < 0.4 * files[f"{tower}.onnx"]
    assert set(report["int8"]["recall_change"]) == set(report["pytorch"]["recall"])
    for tower in ("image", "text"):   # close to the fp32 features, not equal
        assert 0.99 < report["int8"][tower]["min_cosine"] < 1 - 1e-7


def test_the_model_card_says_what_the_model_is_and_how_it_was_trained(exported):
    folder, _ = exported
    card = (folder / "README.md").read_text()
    for text in ("library_name: open_clip", "tiny-vit-64", "trained for 3 steps", "`batch_size`: 16",
                 'create_model_and_transforms("local-dir:', "64 x 64 px", "context length | 32",
                 "Retrieval on the validation set at step 3", "| text -> image |"):
        assert text in card, text


def features_at_angles(query_angles, item_angles):
    """Unit vectors in the plane of (1, 0, 0) and (0, 1, 0): queries (texts) and items (images)."""
    def unit(angles):
        angles = torch.tensor(angles, dtype=torch.float64)
        return torch.stack([angles.cos(), angles.sin(), torch.zeros_like(angles)], dim=1)
    recall = {"image_to_text/R@1": 0.0, "text_to_image/R@1": 0.0}
    return export.Features(images=unit(item_angles), texts=unit(query_angles), recall=recall)


def test_a_changed_best_match_fails_even_within_the_cosine_tolerance():
    # The caption at angle 0 prefers the image at 1.2 rad over the one at 1.2001 (scores apart by
    # sin(1.2) * 1e-4 = 9e-5, a clear preference). Turning the second image by 2e-4 rad costs
    # only 2e-8 of cosine, far inside the tolerance, yet swaps the caption's best match.
    reference = features_at_angles([0.0], [1.2, 1.2001])
    candidate = features_at_angles([0.0], [1.2, 1.1999])
    result = export.compare(reference, candidate, [])
    assert 1 - result["image"]["min_cosine"] < 1e-7
    assert result["top1"]["changed"] == 1 and result["top1"]["near_ties"] == 0
    assert any("found another best match" in failure for failure in result["failures"])


def test_a_near_tie_may_swap_its_order():
    # Scores 9e-7 apart: float32 round-off can order them either way, and either order is right.
    reference = features_at_angles([0.0], [1.2, 1.2 + 1e-6])
    candidate = features_at_angles([0.0], [1.2, 1.2 - 1e-6])
    result = export.compare(reference, candidate, [])
    assert result["top1"]["changed"] == result["top1"]["near_ties"] == 1 and not result["failures"]


def break_pixel_normalisation(monkeypatch):
    real = export.onnx_config
    monkeypatch.setattr(export, "onnx_config", lambda setup, opset: {**real(setup, opset),
                                                                      "mean": [0, 0, 0], "std": [1, 1, 1]})


def break_feature_normalisation(monkeypatch):
    monkeypatch.setattr(export.ImageEncoder, "forward",
                        lambda self, pixels: self.model.encode_image(pixels, normalize=False))


@pytest.mark.parametrize("breaking, failure", [(break_pixel_normalisation, "image features: 1 - cosine"),
                                               (break_feature_normalisation, "not unit vectors")])
def test_a_broken_onnx_export_fails_its_check_and_is_deleted(breaking, failure, trained, check_data,
                                                             tmp_path, monkeypatch):
    breaking(monkeypatch)
    with pytest.raises(export.ExportError) as stop:
        export.main(["--checkpoint", str(trained), "--output", str(tmp_path), "--onnx",
                     "--quantize", "int8", "--check_data", str(check_data), "--check_images", "20"])
    message = str(stop.value)
    assert "the ONNX encoders failed the check" in message and failure in message, message
    assert not list(tmp_path.glob("*.onnx")) and not (tmp_path / "onnx_config.json").exists()
    report = json.loads((tmp_path / "export_report.json").read_text())
    assert report["open_clip_folder"]["passed"] and not report["onnx"]["passed"]
    assert "int8" not in report and (tmp_path / "open_clip_model.safetensors").is_file()


@pytest.mark.slow
def test_the_resnet_preset_exports_and_passes_its_check(check_data, tmp_path):
    torch.manual_seed(0)
    cm.save_checkpoint(tmp_path / "rn.pt", cm.build_model("simple-rn18"), step=0)
    report = export.main(["--checkpoint", str(tmp_path / "rn.pt"), "--output", str(tmp_path / "out"),
                          "--onnx", "--check_data", str(check_data), "--check_images", "20"])
    assert report["model"] == "simple-rn18"
    assert report["open_clip_folder"]["passed"] and report["onnx"]["passed"]
    assert (tmp_path / "out/image_encoder.onnx").is_file()


def test_an_operator_onnx_cannot_express_is_named_in_one_line(trained, check_data, tmp_path, capfd):
    # Attention became an ONNX operator in opset 14; below it the ViT tower cannot be exported.
    with pytest.raises(export.ExportError) as stop:
        export.main(["--checkpoint", str(trained), "--output", str(tmp_path), "--onnx", "--opset", "13",
                     "--check_data", str(check_data), "--check_images", "5"])
    assert str(stop.value) == ("image_encoder.onnx: Exporting the operator "
                               "'aten::scaled_dot_product_attention' to ONNX opset version 13 is not "
                               "supported; export with --opset 14")
    printed = capfd.readouterr()
    assert "graph(" not in printed.out + printed.err and "Traceback" not in printed.err
    assert not list(tmp_path.glob("*.onnx"))


def test_a_model_fine_tuned_from_quickgelu_weights_exports_with_quickgelu_and_its_tag_preprocessing(
        check_data, tmp_path, monkeypatch):
    # A tag like ViT-B-32/openai: QuickGELU and the tag's own mean and std, weights from the cache.
    weights = tmp_path / "weights.bin"
    torch.save(cm.build_model("tiny-vit-64").model.state_dict(), weights)
    tag = {"hf_hub": "someone/tiny/", "quick_gelu": True, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda name, pretrained: tag)
    monkeypatch.setattr(cm, "_cached_hf_file", lambda entry: str(weights))
    cm.save_checkpoint(tmp_path / "tuned.pt", cm.build_model("tiny-vit-64", pretrained="tag"), step=0)
    monkeypatch.undo()
    report = export.main(["--checkpoint", str(tmp_path / "tuned.pt"), "--output", str(tmp_path / "out"),
                          "--check_data", str(check_data), "--check_images", "10"])
    assert report["open_clip_folder"]["passed"]
    config = json.loads((tmp_path / "out/open_clip_config.json").read_text())
    assert config["model_cfg"]["quick_gelu"] is True and config["preprocess_cfg"]["std"] == [0.25] * 3
    model = open_clip.create_model(f"local-dir:{tmp_path / 'out'}")
    assert type(model.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert list(model.visual.preprocess_cfg["mean"]) == [0.5] * 3


def test_bad_input_is_one_line(tmp_path):
    with pytest.raises(cm.CheckpointError, match="checkpoint .*missing.pt not found"):
        export.main(["--checkpoint", str(tmp_path / "missing.pt"), "--output", str(tmp_path)])


# ----------------------------------------------------------------------------- what export refuses

def test_nan_features_fail_the_comparison_that_nan_would_otherwise_pass():
    # NaN < MIN_COSINE is false: the check is written so that a NaN figure fails.
    reference = features_at_angles([0.0], [1.2, 2.0])
    candidate = export.Features(reference.images * float("nan"), reference.texts, reference.recall)
    failures = export.compare(reference, candidate, [])["failures"]
    assert any(f.startswith("image features: 1 - cosine up to nan") for f in failures), failures
    assert any(f.startswith("image features are not unit vectors") for f in failures), failures


def test_a_nan_model_is_refused_in_one_line_before_the_output_folder_is_touched(check_data, tmp_path):
    setup = cm.build_model("tiny-vit-64")
    with torch.no_grad():
        setup.model.visual.proj.fill_(float("nan"))
    cm.save_checkpoint(tmp_path / "nan.pt", setup)
    with pytest.raises(DataError) as refused:
        export.main(["--checkpoint", str(tmp_path / "nan.pt"), "--output", str(tmp_path / "out"),
                     "--check_data", str(check_data), "--check_images", "5"])
    assert str(refused.value).startswith(f"checkpoint {tmp_path / 'nan.pt'}: image features of the check "
                                         f"data: 5 of 5 rows hold NaN or infinite values")
    assert not (tmp_path / "out").exists()


def test_a_folder_holding_files_export_did_not_write_is_refused_and_left_as_it_was(trained, check_data, tmp_path):
    # `--output .` in the repository replaced its README.md with the model card.
    own = {"README.md": "# my project\n", "export_report.json": "{\"mine\": true}", "notes.txt": "x"}
    for name, text in own.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(export.ExportError, match=r"--output .* holds files that export.py did not write "
                                                 r"\(README.md, export_report.json, notes.txt\).*new or empty"):
        export.main(["--checkpoint", str(trained), "--output", str(tmp_path), "--check_data", str(check_data),
                     "--check_images", "5"])
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == own


def test_an_earlier_exports_folder_is_exported_into_again_keeping_files_that_are_not_the_exports(
        trained, check_data, tmp_path):
    flags = ["--checkpoint", str(trained), "--output", str(tmp_path / "out"), "--check_data", str(check_data),
             "--check_images", "5"]
    export.main(flags)
    (tmp_path / "out/notes.txt").write_text("mine")
    (tmp_path / "out/README.md").write_text("stale card")
    report = export.main(flags)
    assert report["open_clip_folder"]["passed"] and (tmp_path / "out" / export.MARKER_FILE).is_file()
    assert (tmp_path / "out/README.md").read_text().startswith("---\nlibrary_name: open_clip")
    assert (tmp_path / "out/notes.txt").read_text() == "mine"
