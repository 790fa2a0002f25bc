"""export.py: the open_clip folder loads in plain open_clip, the ONNX encoders give PyTorch's
features to a client that follows onnx_config.json, the transformers folder loads in transformers,
images prepared as each part documents are the images training saw, and a broken export fails its
check."""
import dataclasses
import json
import os
import stat
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
import prepare_image
import train
import transformers_export
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
                          "--quantize", "int8", "--transformers", "--check_data", str(check_data)])
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


def run_without_this_repository(script, folder, check_data, cwd):
    """Run a client's script where this repository cannot be imported: isolated mode (-I: no
    PYTHONPATH, no current folder on sys.path), another folder, no bytecode written into the export
    (-B). Its arguments: the export folder and the check data's index."""
    result = subprocess.run([sys.executable, "-I", "-B", "-c", script, str(folder), str(check_data)], cwd=cwd,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_an_export_writes_every_file_and_passes_its_check(exported):
    folder, report = exported
    for name in ["open_clip_config.json", "open_clip_model.safetensors", "README.md", "prepare_image.py",
                 "image_encoder.onnx", "text_encoder.onnx", "onnx_config.json", "image_encoder.int8.onnx",
                 "text_encoder.int8.onnx", "export_report.json", *transformers_export.FILES]:
        assert (folder / name).is_file(), name
    assert json.loads((folder / "export_report.json").read_text()) == report
    for part in ("open_clip_folder", "onnx", "transformers"):
        assert report[part]["passed"] and not report[part]["failures"]
        for tower in ("image", "text"):   # float32 round-off, far inside the tolerance
            assert 1 - report[part][tower]["min_cosine"] < 1e-9
        assert report[part]["recall"] == report["pytorch"]["recall"]
    for part in ("open_clip_folder", "onnx"):   # non-square, transparent, EXIF-rotated, as documented
        assert 1 - report[part]["prepared_images"]["min_cosine"] < 1e-9
    assert report["images"] == 40 and report["onnx"]["opset"] == export.DEFAULT_OPSET
    assert (folder / "prepare_image.py").read_bytes() == Path(prepare_image.__file__).read_bytes()


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
    run_without_this_repository(script, folder, check_data, tmp_path)
    entries = json.loads(Path(check_data).read_text())[:6]
    images, texts = reference_features(trained, entries, Path(check_data).parent)
    np.testing.assert_allclose(np.load(tmp_path / "images.npy"), images, atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "texts.npy"), texts, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 5])
def test_the_onnx_encoders_give_pytorchs_features_to_a_client(exported, trained, check_data, batch):
    folder, _ = exported
    config = json.loads((folder / "onnx_config.json").read_text())
    entries = json.loads(Path(check_data).read_text())[:batch]
    root = Path(check_data).parent
    pixels = np.stack([prepare_image.pixels(prepare_image.rgb(Image.open(root / e["image_path"])), config)
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


@pytest.mark.slow
def test_an_onnx_client_without_this_repository_follows_onnx_config_to_pytorchs_features(
        exported, trained, check_data, tmp_path):
    # Only what the folder ships and onnx_config.json names: prepare_image.py, the tokenizer's call.
    folder, _ = exported
    script = """
import json, os, sys
import numpy as np, onnxruntime, open_clip
from PIL import Image
folder, data = sys.argv[1], sys.argv[2]
sys.path.insert(0, folder)
import prepare_image
config = json.load(open(os.path.join(folder, "onnx_config.json")))
entries = json.load(open(data))[:6]
images = [prepare_image.rgb(Image.open(os.path.join(os.path.dirname(data), e["image_path"]))) for e in entries]
pixels = np.stack([prepare_image.pixels(image, config) for image in images])
call = config["tokenizer"]["call"].replace("<this folder>", folder)
tokens = eval(call, {"open_clip": open_clip, "texts": [e["captions"][0] for e in entries]})
run = lambda name, feed: onnxruntime.InferenceSession(os.path.join(folder, config[name])).run(None, feed)[0]
np.save("images.npy", run("image_encoder", {"pixels": pixels}))
np.save("texts.npy", run("text_encoder", {"tokens": tokens}))
ours = [m for m in ("data_loader", "export", "clip_model") if m in sys.modules]
assert not ours and config["tokenizer"]["install"] == "pip install open_clip_torch", ours
"""
    run_without_this_repository(script, folder, check_data, tmp_path)
    entries = json.loads(Path(check_data).read_text())[:6]
    images, texts = reference_features(trained, entries, Path(check_data).parent)
    np.testing.assert_allclose(np.load(tmp_path / "images.npy"), images, atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "texts.npy"), texts, atol=1e-5)


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
                 "Retrieval on the validation set of", "at step 3", "| text -> image |",
                 "preprocess(prepare_image.rgb(Image.open(", "CLIPModel.from_pretrained(",
                 "## Preparing an image as training did", "PIL.ImageOps.exif_transpose",
                 "composite transparent pixels on white (255, 255, 255)", "int(64 * long / short), truncated"):
        assert text in card, text


@pytest.mark.slow
def test_the_model_card_of_best_pt_gives_the_metrics_best_pt_holds(trained, check_data, tmp_path):
    # best.pt keeps its validation in "metrics", not in a history: its card said none was recorded.
    best = trained.parent / "best.pt"
    checkpoint = torch.load(best, weights_only=True)
    export.main(["--checkpoint", str(best), "--output", str(tmp_path), "--check_data", str(check_data),
                 "--check_images", "5"])
    card = (tmp_path / "README.md").read_text()
    retrieval = checkpoint["metrics"]["retrieval"]
    assert f"validation set of {checkpoint['metrics']['num_images']} images at step {checkpoint['step']} " in card
    for direction, label in (("image_to_text", "image -> text"), ("text_to_image", "text -> image")):
        r = retrieval[direction]
        assert f"| {label} | {r['R@1']:.1f} | {r['R@5']:.1f} | {r['R@10']:.1f} |" in card
    assert "No validation" not in card


def test_the_card_says_when_the_moving_average_of_the_weights_scored_best():
    recall = {"R@1": 12.5, "R@5": 50.0, "R@10": 75.0}
    metrics = {"retrieval": {"image_to_text": recall, "text_to_image": recall}, "num_images": 8}
    lines = export.validation_lines({"step": 9, "metrics": metrics, "best": {"weights": "ema", "step": 9}})
    assert lines[0] == ("Retrieval on the validation set of 8 images at step 9 (the moving average of the "
                        "weights, which scored best) (percent):")
    assert lines[-1] == "| text -> image | 12.5 | 50.0 | 75.0 |"
    assert export.validation_lines({"step": 3}) == ["No validation of these weights is recorded in the checkpoint."]


def test_every_file_of_an_export_has_the_mode_of_a_new_file(exported):
    # open_clip_model.safetensors was 0600 (safetensors' save_file), the other files 0644.
    folder, _ = exported
    umask = os.umask(0)
    os.umask(umask)
    modes = {path.name: oct(stat.S_IMODE(path.stat().st_mode)) for path in folder.iterdir()}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes   # and no folder (a __pycache__) among them


def test_onnx_config_names_what_a_client_installs_and_calls_to_prepare_an_image_and_tokenise(exported):
    folder, _ = exported
    config = json.loads((folder / "onnx_config.json").read_text())
    assert "CaptionTokenizer" not in json.dumps(config)   # a class of ours, which a client cannot have
    assert config["tokenizer"]["install"] == "pip install open_clip_torch"
    assert config["tokenizer"]["call"] == "open_clip.get_tokenizer('local-dir:<this folder>', context_length=32)" \
                                          "(texts).numpy()"
    for text in ("PIL.ImageOps.exif_transpose", "on white (255, 255, 255)", "int(64 * long / short), truncated",
                 "round((side - size) / 2)", "prepare_image.py in this folder"):
        assert text in config["prepare"], text


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


# ----------------------------------------------------------------------------- preparing an image

PROBE_SIZES = [(96, 80), (80, 96), (131, 67), (67, 131), (1003, 701), (64, 64), (33, 47), (225, 224)]
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


@pytest.mark.parametrize("resize_mode", ["shortest", "squash", "longest"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("size", [(64, 64), (64, 96)])
def test_the_recipe_gives_the_pixels_of_our_evaluation_transform_bit_for_bit(resize_mode, interpolation, size):
    preprocess = {"size": size, "mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": interpolation,
                  "resize_mode": resize_mode}
    config = {**preprocess, "image_size": list(size)}
    transform = data_loader.image_transform(preprocess)
    rng = np.random.default_rng(0)
    for width, height in PROBE_SIZES:
        image = Image.fromarray(export.texture(width, height, rng))
        assert np.array_equal(prepare_image.pixels(image, config), transform(image).numpy()), (width, height)


def test_the_longer_side_is_truncated_as_torchvision_does():
    config = {"image_size": [64, 64]}
    assert prepare_image.resized_size(96, 80, config) == (76, 64)     # 76.8: rounding made 77
    assert prepare_image.resized_size(80, 96, config) == (64, 76)
    assert prepare_image.resized_size(131, 67, config) == (125, 64)


def ship_recipe(monkeypatch, tmp_path, old, new):
    """Make the export ship prepare_image.py with `old` replaced by `new`: a recipe gone wrong."""
    source = Path(prepare_image.__file__).read_text()
    assert old in source
    path = tmp_path / "recipe" / "prepare_image.py"
    path.parent.mkdir()
    path.write_text(source.replace(old, new))
    monkeypatch.setattr(prepare_image, "__file__", str(path))


@pytest.mark.slow
def test_the_check_fails_a_recipe_that_rounds_the_longer_side(trained, check_data, tmp_path, monkeypatch):
    # The README's ONNX client rounded (77 x 64 px for 96 x 80): on the check's square images of the
    # model's size it changed nothing, so only non-square images show it.
    ship_recipe(monkeypatch, tmp_path, "int(target_height * long / short)", "round(target_height * long / short)")
    with pytest.raises(export.ExportError) as stop:
        export.main(["--checkpoint", str(trained), "--output", str(tmp_path / "out"), "--onnx",
                     "--check_data", str(check_data), "--check_images", "5"])
    assert "the ONNX encoders failed" in str(stop.value)
    assert "images prepared as its users are told to: 1 - cosine up to" in str(stop.value)
    report = json.loads((tmp_path / "out/export_report.json").read_text())
    assert report["onnx"]["prepared_images"]["worst"] in {"96x80.png", "80x96.png", "131x67.png", "67x131.png",
                                                          "1003x701.png"}
    assert report["onnx"]["image"]["min_cosine"] > 1 - 1e-9   # the square check images agree
    assert report["open_clip_folder"]["passed"]   # open_clip resizes by itself; only rgb() is ours there


@pytest.mark.slow
@pytest.mark.parametrize("old, new, shown_by", [
    ("    image = ImageOps.exif_transpose(image)\n", "", {"exif_rotated.jpg"}),
    ('    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:', "    if False:",
     {"transparent.png", "palette_transparent.png"})])
def test_the_check_fails_a_recipe_that_does_not_see_the_image_as_training_did(old, new, shown_by, trained,
                                                                              check_data, tmp_path, monkeypatch):
    # open_clip's preprocess alone: convert("RGB"), which shows transparent pixels' hidden colours
    # and a sideways photo sideways.
    ship_recipe(monkeypatch, tmp_path, old, new)
    with pytest.raises(export.ExportError) as stop:
        export.main(["--checkpoint", str(trained), "--output", str(tmp_path / "out"),
                     "--check_data", str(check_data), "--check_images", "5"])
    assert "the open_clip folder failed" in str(stop.value)
    report = json.loads((tmp_path / "out/export_report.json").read_text())
    assert report["open_clip_folder"]["prepared_images"]["worst"] in shown_by
    assert not (tmp_path / "out/prepare_image.py").exists()


def test_the_probe_images_hold_what_they_are_named_for(tmp_path):
    probes = export.write_probe_images(tmp_path)
    with Image.open(probes["transparent.png"]) as image:
        alpha = np.asarray(image)[..., 3]
        assert image.mode == "RGBA" and alpha.min() == 0 and alpha.max() == 255
    with Image.open(probes["palette_transparent.png"]) as image:
        assert image.mode == "P" and "transparency" in image.info
    with Image.open(probes["exif_rotated.jpg"]) as image:
        assert image.getexif()[0x0112] == 6 and image.size == (90, 120)
        assert prepare_image.rgb(image).size == (120, 90)
    with Image.open(probes["96x80.png"]) as image:
        assert image.size == (96, 80)


# ----------------------------------------------------------------------------- transformers

CAPTIONS = ["a red circle", "A Big, RED circle!!! on the left...", "héllo wörld ✓ naïve café", "日本語のキャプション",
            "emoji 🐱🐶 and a cat", "  spaces\tand\nnewlines  ", "don't it's we're I'm you'll he'd",
            "number 12345 and 3.14", "a" + " very" * 60 + " long caption", "x" * 300, "Straße ÄÖÜ", "e-mail@x.org?"]


@pytest.fixture(scope="module")
def tiny_setup():
    torch.manual_seed(0)
    return cm.build_model("tiny-vit-64")


def test_transformers_tokenizer_gives_open_clips_token_ids(tiny_setup):
    tokenizer = transformers_export.tokenizer(32)
    ours = tiny_setup.tokenizer(CAPTIONS)
    theirs = tokenizer(CAPTIONS, padding="max_length", truncation=True, return_tensors="pt")["input_ids"]
    assert export.token_differences(ours, theirs) == []
    assert (theirs[ours == 0] == transformers_export.EOS_ID).all()   # only the padding differs


def test_text_that_ftfy_or_html_unescaping_change_gets_other_tokens_from_transformers(tiny_setup):
    # what docs/export.md and the model card warn of; the check names such a caption
    captions = ["“curly quotes”", "ﬁne ligature", "ＦＵＬＬ width", "tom &amp; jerry"]
    theirs = transformers_export.tokenizer(32)(captions, padding="max_length", truncation=True,
                                               return_tensors="pt")["input_ids"]
    assert export.token_differences(tiny_setup.tokenizer(captions), theirs) == [0, 1, 2, 3]


def transformers_model(setup):
    import transformers
    model = transformers.CLIPModel(transformers.CLIPConfig(**transformers_export.hf_config(setup))).eval()
    model.load_state_dict(transformers_export.hf_state_dict(setup.model), strict=True)
    return transformers_export.TransformersModel(model)


@pytest.mark.parametrize("variant", [{}, {"quick_gelu": True}, {"custom_text": True},
                                     {"vision_cfg": {"norm_kwargs": {"eps": 1e-6}, "final_ln_after_pool": True}}])
def test_clipmodel_computes_what_open_clip_computes(variant):
    config = json.loads(json.dumps(open_clip.get_model_config("tiny-vit-64")))
    for key, value in variant.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    torch.manual_seed(0)
    setup = cm.build_model("tiny-vit-64", model_config=config)
    assert transformers_export.unsupported(setup) is None
    hf = transformers_model(setup)
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    tokens = setup.tokenizer(CAPTIONS[:3])
    with torch.no_grad():
        assert (hf.encode_image(pixels) - setup.model.encode_image(pixels, normalize=True)).abs().max() < 1e-6
        assert (hf.encode_text(tokens) - setup.model.encode_text(tokens, normalize=True)).abs().max() < 1e-6
    assert hf.model.config.text_config.hidden_act == ("quick_gelu" if variant.get("quick_gelu") else "gelu")


def test_clipmodel_pools_at_the_first_end_of_text_token_whatever_follows_it(tiny_setup):
    # open_clip pads with 0, transformers' tokenizer with the end-of-text token: the same features
    hf = transformers_model(tiny_setup)
    ours = tiny_setup.tokenizer(CAPTIONS[:4])
    padded_with_end = torch.where(ours == 0, transformers_export.EOS_ID, ours)
    with torch.no_grad():
        assert torch.allclose(hf.encode_text(ours), hf.encode_text(padded_with_end), atol=1e-7)
    assert hf.model.config.text_config.eos_token_id == transformers_export.EOS_ID != 2   # 2: the older argmax rule


@pytest.mark.parametrize("change, named", [
    ({"vision_cfg": {"attentional_pool": True}}, "vision_cfg.attentional_pool=True"),
    ({"vision_cfg": {"no_ln_pre": True}}, "vision_cfg.no_ln_pre=True"),
    ({"vision_cfg": {"ls_init_value": 0.1}}, "vision_cfg.ls_init_value=0.1"),
    ({"vision_cfg": {"pool_type": "avg"}}, "vision_cfg.pool_type='avg'"),
    ({"text_cfg": {"proj_bias": True}}, "text_cfg.proj_bias=True"),
    ({"text_cfg": {"pool_type": "last"}}, "text_cfg.pool_type='last'"),
    ({"text_cfg": {"no_causal_mask": True}}, "text_cfg.no_causal_mask=True"),
    ({"text_cfg": {"act_kwargs": {"approximate": "tanh"}}}, "text_cfg.act_kwargs"),
    ({"init_logit_bias": -10.0}, "a SigLIP model"),
    ({"vision_cfg": {"layers": [1, 1, 1, 1]}}, "a ResNet image tower"),
    ({"text_cfg": {"hf_model_name": "bert-base-uncased"}}, "the Hugging Face text tower bert-base-uncased"),
    ({"text_cfg": {"tokenizer_kwargs": {"clean": "canonicalize"}}}, "text_cfg.tokenizer_kwargs")])
def test_what_clipmodel_cannot_express_is_refused_naming_the_setting(tiny_setup, change, named):
    config = json.loads(json.dumps(tiny_setup.model_config))
    for key, value in change.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    reason = transformers_export.unsupported(dataclasses.replace(tiny_setup, model_config=config))
    assert reason is not None and named in reason, reason


def test_an_architecture_transformers_cannot_hold_is_refused_in_one_line_before_writing(check_data, tmp_path):
    torch.manual_seed(0)
    cm.save_checkpoint(tmp_path / "rn.pt", cm.build_model("simple-rn18"), step=0)
    with pytest.raises(export.ExportError) as refused:
        export.main(["--checkpoint", str(tmp_path / "rn.pt"), "--output", str(tmp_path / "out"),
                     "--transformers", "--check_data", str(check_data)])
    assert str(refused.value) == ("--transformers: simple-rn18 cannot be written as transformers' CLIPModel, "
                                  "the timm image tower resnet18: CLIPModel's is CLIP's own ViT; export without "
                                  "--transformers")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_transformers_check_measures_the_processor_and_fails_a_wrong_one(exported, trained, check_data,
                                                                             tmp_path, monkeypatch):
    _, report = exported
    processor = report["transformers"]["processor"]
    # 1003 x 701 and 100 x 70 at 64 px: resized to 91 x 64, and 91 - 64 = 27 is 3 (mod 4): the crop a
    # pixel off; the other 6 probe images are resized (and the check images are not: 64 x 64 already)
    assert processor["pil"]["crop_one_pixel_off"] == 2 and processor["pil"]["min_cosine_crop_off"] < 1 - 1e-6
    assert processor["pil"]["max_pixel_difference"] <= export.PIXEL_TOLERANCE
    real = transformers_export.image_processor_settings
    monkeypatch.setattr(transformers_export, "image_processor_settings",
                        lambda cfg: {**real(cfg), "resample": transformers_export.RESAMPLE["bilinear"]})
    with pytest.raises(export.ExportError, match="transformers' image processor gives other pixels than our "
                                                 "preprocessing on 6 images, e.g. 96x80.png"):
        export.main(["--checkpoint", str(trained), "--output", str(tmp_path), "--transformers",
                     "--check_data", str(check_data), "--check_images", "5"])
    assert not (tmp_path / "model.safetensors").exists() and (tmp_path / "open_clip_model.safetensors").exists()


@pytest.mark.slow
def test_the_transformers_folder_loads_where_this_repository_is_unknown(exported, trained, check_data, tmp_path):
    folder, _ = exported
    script = """
import json, os, sys
import numpy as np, torch
from PIL import Image
from transformers import AutoProcessor, CLIPModel, pipeline
folder, data = sys.argv[1], sys.argv[2]
sys.path.insert(0, folder)
import prepare_image
entries = json.load(open(data))[:6]
paths = [os.path.join(os.path.dirname(data), e["image_path"]) for e in entries]
model = CLIPModel.from_pretrained(folder).eval()
processor = AutoProcessor.from_pretrained(folder, backend="pil")
inputs = processor(text=[e["captions"][0] for e in entries], images=[prepare_image.rgb(Image.open(p)) for p in paths],
                   padding="max_length", return_tensors="pt")
with torch.no_grad():
    out = model(**inputs)
np.save("images.npy", out.image_embeds.numpy())
np.save("texts.npy", out.text_embeds.numpy())
classify = pipeline("zero-shot-image-classification", model=folder)
scores = classify(prepare_image.rgb(Image.open(paths[0])), candidate_labels=["red circle", "blue square", "star"])
json.dump({s["label"]: s["score"] for s in scores}, open("scores.json", "w"))
ours = [m for m in ("data_loader", "export", "clip_model", "transformers_export") if m in sys.modules]
assert not ours, ours
"""
    run_without_this_repository(script, folder, check_data, tmp_path)
    entries = json.loads(Path(check_data).read_text())[:6]
    images, texts = reference_features(trained, entries, Path(check_data).parent)
    np.testing.assert_allclose(np.load(tmp_path / "images.npy"), images, atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "texts.npy"), texts, atol=1e-6)
    # the pipeline's scores: softmax over the labels of logit_scale * cosine, its prompt "This is a photo of {}."
    setup, _ = cm.model_from_checkpoint(trained)
    labels = ["red circle", "blue square", "star"]
    prompts = cm.encode_texts(setup.model, setup.tokenizer, [f"This is a photo of {label}." for label in labels], "cpu")
    expected = (setup.model.logit_scale.detach().exp() * torch.from_numpy(images[:1]) @ prompts.T).softmax(dim=1)[0]
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert [scores[label] for label in labels] == pytest.approx(expected.tolist(), abs=1e-5)
