"""Ship a trained model: an open_clip model folder and ONNX encoders, each checked against PyTorch.

    python export.py --checkpoint model-checkpoint/<run>/best.pt --output exports/<run>
    python export.py --checkpoint model-checkpoint/<run>/best.pt --output exports/<run> --onnx --quantize int8

What leaves the repository:
  1. An open_clip model folder, always: open_clip_config.json (the full model config and the image
     preprocessing), open_clip_model.safetensors (the weights) and README.md (a model card). Plain
     open_clip loads it, no code of this repository needed:
     open_clip.create_model_and_transforms("local-dir:DIR"), or "hf-hub:user/repo" once uploaded.
  2. With --onnx, the two towers as ONNX graphs with a dynamic batch dimension, for any ONNX
     runtime (onnxruntime, TensorRT, ...):
       image_encoder.onnx  pixels [N, 3, H, W] float32, resized and normalised -> features [N, D]
       text_encoder.onnx   tokens [N, context_length] int64                    -> features [N, D]
     Both end with the L2 normalisation, so a dot product of their outputs is a cosine similarity.
     onnx_config.json holds what a client needs to prepare inputs without PyTorch: image size,
     mean, std, resizing, context length, tokenizer, and the logit scale.
  3. With --quantize int8, image_encoder.int8.onnx and text_encoder.int8.onnx (onnxruntime's
     dynamic quantisation), with their sizes and the change of recall measured, for the user to
     weigh.

Every export is checked before it is reported as written. The check encodes real inputs (the
images and captions of --check_data, by default a generated sample set) the way a user of the
export would: the folder through open_clip alone, the ONNX files through onnxruntime, each with the
preprocessing and tokenizer that its own config file describes. The features must match the
PyTorch model's row by row (MIN_COSINE, MAX_NORM_ERROR) and find the same best match for every
query, so the same retrieval R@1, up to near ties (TIE_MARGIN). A part
that fails is deleted, export_report.json says why, and the command exits non-zero. A model whose
features are not finite is refused before --output is touched, and --output must be new, empty
or an earlier export's (prepare_output): an export never deletes a file it did not write.
"""
import argparse
import contextlib
import json
import logging
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime
import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnxruntime.quantization import QuantType, quantize_dynamic
from safetensors.torch import save_file

import clip_model
import data_loader
import evaluation
from errors import UserError, run_script

# Tolerance of the check, on cosines computed in float64. The same network computed by other
# kernels (onnxruntime's matrix multiplies and attention instead of PyTorch's) differs by float32
# round-off only: features within about 1e-6 of each other, 1 - cosine about 1e-13 (measured on
# tiny-vit-64 and simple-rn18, random and trained; on eleven open_clip architectures, from ViT and
# ModifiedResNet to timm ConvNeXt and Swin, EVA, SigLIP, MobileCLIP, PE, CoCa and ViTamin, no
# feature moved by more than 3e-7). The mistakes an export can make are far larger: pixels
# normalised with ImageNet's mean and std instead of CLIP's give 1 - cosine of 1.4e-4 to 6.5e-4,
# GELU in place of the QuickGELU a model was trained with 1e-5 to 1.6e-4, no normalisation at all
# 0.015 to 0.57. 1 - 1e-6 lies between them: 10x below the smallest mistake, 10^7 above round-off.
# (Cosine 0.9999, an angle of 0.8 degrees, would let both subtle mistakes through on some models.)
MIN_COSINE = 1 - 1e-6
# Clients rank by dot products, which are cosines only for unit vectors; fp32 normalisation gives
# norms within 1e-6 of 1, an encoder that forgot to normalise is off by its features' scale.
MAX_NORM_ERROR = 1e-4
# Retrieval must find the same best match for every query, except near ties. Among the check's
# queries two items often score within 1e-6 of each other (about one query in a thousand here);
# round-off moves a score by up to twice the features' differences (~2e-6), enough to swap them.
TIE_MARGIN = 1e-5
# The TorchScript exporter writes opsets 7 to 20. 17 is the default: LayerNormalization is one
# operator from 17 on, and TensorRT 8.6 and most runtimes of the last years read it.
DEFAULT_OPSET, MAX_OPSET = 17, 20
CHECK_IMAGES = 200           # images of the check data used, with all their captions
CHECK_BATCH = 32             # not the export's example batch (2): the check tests the dynamic axis

CONFIG_FILE, WEIGHTS_FILE, CARD_FILE = "open_clip_config.json", "open_clip_model.safetensors", "README.md"
ONNX_FILES = {"image": "image_encoder.onnx", "text": "text_encoder.onnx"}
INT8_FILES = {"image": "image_encoder.int8.onnx", "text": "text_encoder.int8.onnx"}
ONNX_CONFIG, REPORT_FILE = "onnx_config.json", "export_report.json"
EXPORT_FILES = [CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, *ONNX_FILES.values(), *INT8_FILES.values(),
                ONNX_CONFIG, REPORT_FILE]
# Written first into every export folder: the files above may be replaced only where it is.
MARKER_FILE = ".export_folder"


class ExportError(UserError, RuntimeError):
    """A model that cannot be exported, or an export that failed its check."""


@dataclass
class Features:
    """What the check compares: features of the check data and the recalls they give."""
    images: torch.Tensor     # [N, D]
    texts: torch.Tensor      # [M, D]
    recall: dict             # "image_to_text/R@1" -> percent, ...


def encode(setup, index, label) -> Features:
    """Features of every image and caption of a CaptionIndex through a setup's own preprocessing,
    tokenizer and towers, and the retrieval recalls they give. Features that are not finite are
    refused (evaluation.require_finite, naming `label`): no comparison with NaN is true, so a NaN
    model would pass every check of this module."""
    images, texts, index = evaluation.encode_index(setup, index, batch_size=CHECK_BATCH, strict=True)
    for features, tower in ((images, "image"), (texts, "text")):
        evaluation.require_finite(features, f"{label}: {tower} features of the check data")
    metrics = evaluation.retrieval_metrics(images, texts, index.caption_image)
    recall = {f"{direction}/R@{k}": metrics[direction][f"R@{k}"] for k in evaluation.RECALL_AT
              for direction in ("image_to_text", "text_to_image")}
    return Features(images, texts, recall)


# ----------------------------------------------------------------------------------------------
# The open_clip model folder

def open_clip_config(setup) -> dict:
    """open_clip_config.json: the keys open_clip reads from a "local-dir:" or "hf-hub:" model."""
    model_cfg = dict(setup.model_config)
    if getattr(setup.model, "logit_bias", None) is not None:
        # A SigLIP model has a learned bias; open_clip creates the parameter only when the config
        # asks for one (the value is then overwritten by the weights).
        model_cfg["init_logit_bias"] = float(setup.model.logit_bias.detach())
    preprocess = {k: list(v) if isinstance(v, tuple) else v for k, v in setup.preprocess_cfg.items()}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess}


def write_open_clip_folder(setup, folder) -> list:
    """The config and the weights (safetensors: a file of tensors that, unlike a pickle, cannot
    run code when loaded). Returns the files written."""
    (folder / CONFIG_FILE).write_text(json.dumps(open_clip_config(setup), indent=2))
    weights = {name: tensor.contiguous() for name, tensor in setup.model.state_dict().items()}
    save_file(weights, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    files = [folder / CONFIG_FILE, folder / WEIGHTS_FILE]
    if isinstance(setup.tokenizer, open_clip.tokenizer.HFTokenizer):
        # open_clip reads a Hugging Face tokenizer of a "local-dir:" model from the folder itself.
        setup.tokenizer.save_pretrained(folder)
    return files


def load_open_clip_folder(folder) -> clip_model.ClipSetup:
    """The folder as plain open_clip loads it: model, tokenizer and preprocessing from its files."""
    name = f"local-dir:{folder}"
    model, _, _ = open_clip.create_model_and_transforms(name)
    return clip_model.ClipSetup(model=model, tokenizer=open_clip.get_tokenizer(name),
                                preprocess_cfg=dict(model.visual.preprocess_cfg), model_name=name,
                                model_config=open_clip.get_model_config(name))


def model_card(setup, checkpoint, checkpoint_path, check) -> str:
    """README.md of the folder: what the model is, how it was trained, how well, how to load it."""
    settings = checkpoint.get("config", {})
    name = settings.get("run_name") or setup.model_name
    cfg = setup.model_config
    lines = ["---", "library_name: open_clip", "pipeline_tag: zero-shot-image-classification",
             "tags: [clip]", "---", f"# {name}", "",
             f"A CLIP model: an image tower and a text tower that map images and captions into one "
             f"{cfg['embed_dim']}-dimensional space, where the cosine similarity of an image and a "
             f"caption says how well they match. Exported from the checkpoint `{checkpoint_path}`.", "",
             "```python", "import open_clip", "",
             'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:PATH/TO/THIS/FOLDER")',
             'tokenizer = open_clip.get_tokenizer("local-dir:PATH/TO/THIS/FOLDER")',
             '# uploaded to the Hugging Face hub: "hf-hub:USER/REPO" instead of "local-dir:..."', "```", "",
             "## Model", "", "| | |", "|---|---|",
             f"| architecture | `{setup.model_name}` (full config in `{CONFIG_FILE}`) |",
             f"| image size | {' x '.join(map(str, image_size(setup.preprocess_cfg)))} px |",
             f"| context length | {setup.tokenizer.context_length} tokens |",
             f"| parameters | {clip_model.count_parameters(setup.model):,} (image tower "
             f"{clip_model.count_parameters(setup.model.visual):,}) |",
             f"| logit scale | {float(setup.model.logit_scale.detach().exp()):.2f} |", "",
             "## Training", ""]
    shown = ("pretrained", "loss", "data_dir", "val_data", "batch_size", "accum_steps", "learning_rate",
             "weight_decay", "warmup_steps", "precision", "seed")
    lines += [f"- `{key}`: {settings[key]}" for key in shown if settings.get(key) not in (None, "")]
    if "step" in checkpoint:
        lines.append(f"- trained for {checkpoint['step']} steps")
    lines += ["", "## Validation", "", *validation_lines(checkpoint), "",
              "## Export check", "",
              f"Loaded from this folder by open_clip alone, the model gives the features of the training "
              f"checkpoint on {check['images']} images and {check['captions']} captions of "
              f"{check['data']}: 1 - cosine at most {1 - check['min_cosine']:.0e}.", ""]
    return "\n".join(lines)


def validation_lines(checkpoint) -> list:
    """The retrieval recalls of the checkpoint's own step, from the validation history it holds."""
    step = checkpoint.get("step")
    entries = [e for e in checkpoint.get("history", {}).get("val", []) if e.get("step") == step]
    if not entries:
        return ["No validation at this checkpoint's step is recorded in it."]
    retrieval = entries[-1]["retrieval"]
    lines = [f"Retrieval on the validation set at step {step} (percent):", "",
             "| | R@1 | R@5 | R@10 |", "|---|---:|---:|---:|"]
    for direction, label in (("image_to_text", "image -> text"), ("text_to_image", "text -> image")):
        r = retrieval[direction]
        lines.append(f"| {label} | {r['R@1']:.1f} | {r['R@5']:.1f} | {r['R@10']:.1f} |")
    return lines


# ----------------------------------------------------------------------------------------------
# ONNX

class ImageEncoder(nn.Module):
    """What image_encoder.onnx computes: normalised pixels [N, 3, H, W] -> unit features [N, D]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixels):
        return self.model.encode_image(pixels, normalize=True)


class TextEncoder(nn.Module):
    """What text_encoder.onnx computes: token ids [N, context_length] -> unit features [N, D]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        return self.model.encode_text(tokens, normalize=True)


def image_size(preprocess_cfg) -> tuple:
    size = preprocess_cfg["size"]
    return tuple(size) if isinstance(size, (list, tuple)) else (size, size)


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the TorchScript exporter: its warnings (tracer warnings about Python branches; the
    check tests the traced graph on real inputs instead) and the whole graph that, on failure, it
    prints from C++ to standard output, out of reach of sys.stdout, hence the file descriptors."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with open(os.devnull, "w") as sink, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fd in saved:
            os.dup2(sink.fileno(), fd)
        try:
            yield
        finally:
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)


def export_tower(tower, example, input_name, path, opset):
    """One tower to ONNX, with a dynamic batch dimension.

    torch.onnx.export(dynamo=False) is the TorchScript exporter: it traces the tower on the example
    input. The newer exporter (dynamo=True, torch's default since 2.9) needs the onnxscript package;
    on the eleven architectures of MIN_COSINE's note both gave the same features, to round-off,
    and the TorchScript one exported 2 to 5 times faster and names an operator it cannot translate
    in one line. torch marks it deprecated: when a release drops it, dynamo=True with
    dynamic_shapes in place of dynamic_axes is the replacement.
    """
    try:
        with _quiet_exporter():
            torch.onnx.export(tower.eval(), (example,), str(path), dynamo=False, opset_version=opset,
                              input_names=[input_name], output_names=["features"],
                              dynamic_axes={input_name: {0: "batch"}, "features": {0: "batch"}})
    except torch.onnx.errors.OnnxExporterError as error:
        message = str(error).strip().splitlines()[0]
        newer = re.search(r"added in version (\d+)", message)
        way_out = f"export with --opset {newer.group(1)}" if newer else \
            f"a newer --opset (up to {MAX_OPSET}) may have it; otherwise this architecture cannot be exported"
        raise ExportError(f"{path.name}: {message.split('. ')[0]}; {way_out}") from None


def export_onnx(setup, folder, opset) -> dict:
    """Both towers to ONNX (fp32) and onnx_config.json; returns {"image": path, "text": path}."""
    model = setup.model.eval()
    pixels = torch.randn(2, 3, *image_size(setup.preprocess_cfg), generator=torch.Generator().manual_seed(0))
    tokens = setup.tokenizer(["a photo of a red circle on the left", "a square"])
    files = {tower: folder / name for tower, name in ONNX_FILES.items()}
    try:
        export_tower(ImageEncoder(model), pixels, "pixels", files["image"], opset)
        export_tower(TextEncoder(model), tokens, "tokens", files["text"], opset)
    except ExportError:
        for path in files.values():
            path.unlink(missing_ok=True)
        raise
    (folder / ONNX_CONFIG).write_text(json.dumps(onnx_config(setup, opset), indent=2))
    return files


def onnx_config(setup, opset) -> dict:
    """onnx_config.json: how to feed the ONNX encoders, and what to do with their outputs."""
    preprocess, model = setup.preprocess_cfg, setup.model
    bias = getattr(model, "logit_bias", None)
    return {
        "image_encoder": ONNX_FILES["image"], "text_encoder": ONNX_FILES["text"], "opset": opset,
        "pixels": "float32 [N, 3, H, W]: RGB resized as resize_mode and interpolation say (shortest: "
                  "the shorter side to image_size), centre-cropped to image_size, scaled to [0, 1], "
                  "then (x - mean) / std per channel",
        "tokens": "int64 [N, context_length]: ids of the tokenizer below, as "
                  "open_clip.get_tokenizer('local-dir:<this folder>') makes them",
        "features": "float32 [N, embed_dim], L2-normalised: image . text is their cosine",
        "image_size": list(image_size(preprocess)), "mean": list(preprocess["mean"]),
        "std": list(preprocess["std"]), "interpolation": preprocess.get("interpolation", "bicubic"),
        "resize_mode": preprocess.get("resize_mode", "shortest"),
        "context_length": setup.tokenizer.context_length,
        "tokenizer": type(setup.tokenizer).__name__,
        "hf_tokenizer_name": setup.model_config["text_cfg"].get("hf_tokenizer_name", ""),
        "embed_dim": setup.model_config["embed_dim"],
        # logits = logit_scale * image_features @ text_features.T (+ logit_bias for SigLIP)
        "logit_scale": float(model.logit_scale.detach().exp()),
        "logit_bias": None if bias is None else float(bias.detach())}


class OnnxModel:
    """The ONNX encoders behind the two methods clip_model.encode_images and encode_texts call, so
    that ONNX features come from the same code path as PyTorch's. `normalize` is there for that
    interface: the graphs normalise already."""

    def __init__(self, image_file, text_file):
        self.sessions = {tower: onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                         for tower, path in (("image", image_file), ("text", text_file))}

    def eval(self):
        return self

    def encode_image(self, pixels, normalize=True):
        return torch.from_numpy(self.sessions["image"].run(None, {"pixels": pixels.numpy()})[0])

    def encode_text(self, tokens, normalize=True):
        return torch.from_numpy(self.sessions["text"].run(None, {"tokens": tokens.numpy()})[0])


def load_onnx(folder, files) -> clip_model.ClipSetup:
    """The ONNX encoders with the preprocessing and context length that onnx_config.json gives a
    client (a wrong mean or std written there fails the check like a wrong graph)."""
    config = json.loads((folder / ONNX_CONFIG).read_text())
    preprocess = {"size": tuple(config["image_size"]), "mean": config["mean"], "std": config["std"],
                  "interpolation": config["interpolation"], "resize_mode": config["resize_mode"]}
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}", context_length=config["context_length"])
    return clip_model.ClipSetup(model=OnnxModel(files["image"], files["text"]), tokenizer=tokenizer,
                                preprocess_cfg=preprocess, model_name="onnx", model_config={})


def quantize_int8(folder, files) -> dict:
    """Dynamic int8 quantisation with onnxruntime: the weights of matrix multiplies (MatMul, Gemm)
    and of the token embedding (Gather) are stored as int8, about 4x smaller, and activations are
    quantised on the fly, batch by batch. Convolutions stay float32: dynamically quantised, they
    gave features unrelated to the fp32 ones (cosine near 0) on the ResNet preset; they need
    static quantisation with calibration data."""
    quantized = {tower: folder / name for tower, name in INT8_FILES.items()}
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)   # its advice to pre-process the graph first, once per file
    try:
        for tower, path in quantized.items():
            quantize_dynamic(files[tower], path, op_types_to_quantize=["MatMul", "Gemm", "Gather"],
                             weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    return quantized


# ----------------------------------------------------------------------------------------------
# The check

def agreement(reference, candidate) -> dict:
    """How far candidate features [N, D] are from the reference ones, row by row. In float64: in
    float32 the cosine of a vector with itself can come out 1 - 1e-7, hiding the figure we want."""
    reference, candidate = reference.double(), candidate.double()
    return {"max_abs_diff": float((candidate - reference).abs().max()),
            "min_cosine": float(F.cosine_similarity(candidate, reference, dim=1).min()),
            "max_norm_error": float((candidate.norm(dim=1) - 1).abs().max()),
            "max_distance": float((candidate - reference).norm(dim=1).max())}


def compare(reference: Features, candidate: Features, files) -> dict:
    """The check of one export: agreement of both towers, recalls, and what fails, if anything."""
    result = {"files": {path.name: path.stat().st_size for path in files},
              "image": agreement(reference.images, candidate.images),
              "text": agreement(reference.texts, candidate.texts),
              "recall": candidate.recall,
              "recall_change": {k: candidate.recall[k] - reference.recall[k] for k in reference.recall}}
    failures = []
    for tower in ("image", "text"):
        figures = result[tower]
        # written as "not within": a NaN figure (features not finite) fails, as it must
        if not figures["min_cosine"] >= MIN_COSINE:
            failures.append(f"{tower} features: 1 - cosine up to {1 - figures['min_cosine']:.2g} "
                            f"(tolerance {1 - MIN_COSINE:.0e})")
        if not figures["max_norm_error"] <= MAX_NORM_ERROR:
            failures.append(f"{tower} features are not unit vectors (norm off by up to "
                            f"{figures['max_norm_error']:.3g})")
    result["top1"] = top1_changes(reference, candidate)
    if result["top1"]["changed"] > result["top1"]["near_ties"]:
        failures.append(f"{result['top1']['changed'] - result['top1']['near_ties']} of "
                        f"{result['top1']['queries']} queries found another best match than with "
                        f"PyTorch (not near ties), R@1 " + ", ".join(
                            f"{key} {candidate.recall[key]:.2f} vs {reference.recall[key]:.2f}"
                            for key in reference.recall if key.endswith("R@1")))
    result["failures"] = failures
    return result


def top1_changes(reference: Features, candidate: Features, chunk_size=1024) -> dict:
    """Queries (each caption searching the images, each image searching the captions) whose best
    match differs from the reference's, and how many of them are near ties: items the reference
    scores within TIE_MARGIN of each other, where either order is right. R@1 counts the right
    best matches, so it can differ only where a best match changed."""
    counts = {"queries": 0, "changed": 0, "near_ties": 0}
    for queries, items in (("texts", "images"), ("images", "texts")):
        reference_items = getattr(reference, items).double()
        candidate_items = getattr(candidate, items).double()
        for start in range(0, len(getattr(reference, queries)), chunk_size):
            rows = slice(start, start + chunk_size)
            scores = getattr(reference, queries)[rows].double() @ reference_items.T
            best = scores.argmax(1)
            candidate_best = (getattr(candidate, queries)[rows].double() @ candidate_items.T).argmax(1)
            gap = scores.gather(1, best[:, None])[:, 0] - scores.gather(1, candidate_best[:, None])[:, 0]
            changed = best != candidate_best
            counts["queries"] += len(best)
            counts["changed"] += int(changed.sum())
            counts["near_ties"] += int((changed & (gap <= TIE_MARGIN)).sum())
    return counts


def check_part(name, report, files, load, reference, index) -> dict:
    """Load a part as its user would (`load()`), compare its features with PyTorch's; a part that
    fails, or cannot even be loaded, has its files deleted. Returns its entry of the report."""
    try:
        result = compare(reference, encode(load(), index, name), files)
    except Exception as error:   # whatever stops the part from loading is the check failing
        result = {"files": {path.name: path.stat().st_size for path in files},
                  "failures": [f"cannot be loaded and encoded: {type(error).__name__}: {error}"]}
    result["passed"] = not result["failures"]
    if not result["passed"]:
        for path in files:
            path.unlink(missing_ok=True)
    report[name] = result
    return result


# ----------------------------------------------------------------------------------------------
# Command line

def build_parser():
    parser = argparse.ArgumentParser(
        description="Export a checkpoint as an open_clip model folder (and ONNX encoders), each "
                    "checked against the PyTorch model on real images and captions.")
    add = parser.add_argument
    add("--checkpoint", required=True, help="checkpoint written by train.py, e.g. model-checkpoint/<run>/best.pt")
    add("--output", required=True, metavar="DIR", help="folder to write into: a new or empty one, or "
                                                       "that of an earlier export, whose files are replaced")
    add("--onnx", action="store_true", help="also write image_encoder.onnx, text_encoder.onnx and onnx_config.json")
    add("--quantize", choices=("int8",), help="with --onnx: also write dynamically quantised int8 "
                                              "encoders and measure their recall change")
    add("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, 7 to {MAX_OPSET}")
    add("--check_data", metavar="DATA", help="images and captions to check the export on, in any format "
                                             "data_loader.py reads; default: a generated sample set")
    add("--check_images", type=int, default=CHECK_IMAGES, help="use the first N images of --check_data "
                                                               "(with all their captions); 0 = all")
    return parser


def check_data(path, limit, workdir):
    """The CaptionIndex the check runs on, and what to call it in the report."""
    label = path
    if not path:
        path = data_loader.create_sample_dataset(Path(workdir) / "check_data", num_samples=CHECK_IMAGES,
                                                 seed=1)["index"]
        label = f"the generated sample set (sample_data.py, {CHECK_IMAGES} images, seed 1)"
    index = data_loader.load_caption_index(path)
    if 0 < limit < index.num_images:
        index = index.subset(np.arange(limit))
    return index, label


def prepare_output(folder) -> Path:
    """--output, made ready: a folder that is new or empty, or that an earlier export wrote (it
    holds MARKER_FILE), whose export files are then removed (they would mix with this export's).
    Any other folder is refused: a README.md or export_report.json there is the user's own, and an
    export deletes no file it did not write."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ExportError(f"--output {folder} is a file; give a folder")
    if folder.is_dir() and not (folder / MARKER_FILE).is_file():
        found = sorted(path.name for path in folder.iterdir())
        if found:
            raise ExportError(f"--output {folder} holds files that export.py did not write "
                              f"({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}) and would "
                              f"replace some of them: give a new or empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER_FILE).write_text("This folder was written by export.py; a later export into it "
                                      "replaces the files of the export.\n")
    for name in EXPORT_FILES:
        (folder / name).unlink(missing_ok=True)
    return folder


def run(args, workdir) -> dict:
    """The export, part by part, each checked before the next; returns the report."""
    setup, checkpoint = clip_model.model_from_checkpoint(args.checkpoint)
    index, data = check_data(args.check_data, args.check_images, workdir)
    print(f"checking on {index.num_images} images and {index.num_captions} captions of {data}")
    reference = encode(setup, index, f"checkpoint {args.checkpoint}")   # before --output is touched
    folder = prepare_output(args.output)
    report = {"checkpoint": str(args.checkpoint), "model": setup.model_name, "check_data": data,
              "images": index.num_images, "captions": index.num_captions,
              "tolerance": {"min_cosine": MIN_COSINE, "max_norm_error": MAX_NORM_ERROR,
                            "best_match": f"the same as PyTorch's, but for ties within {TIE_MARGIN}"},
              "pytorch": {"recall": reference.recall}}
    files = write_open_clip_folder(setup, folder)
    folder_check = check_part("open_clip_folder", report, files, lambda: load_open_clip_folder(folder),
                              reference, index)
    if folder_check["passed"]:
        card = {"images": index.num_images, "captions": index.num_captions, "data": data,
                "min_cosine": min(folder_check[t]["min_cosine"] for t in ("image", "text"))}
        (folder / CARD_FILE).write_text(model_card(setup, checkpoint, args.checkpoint, card))
    if args.onnx and folder_check["passed"]:
        files = export_onnx(setup, folder, args.opset)
        onnx_check = check_part("onnx", report, [*files.values(), folder / ONNX_CONFIG],
                                lambda: load_onnx(folder, files), reference, index)
        onnx_check["opset"] = args.opset
        if args.quantize and onnx_check["passed"]:
            quantized = quantize_int8(folder, files)
            int8 = compare(reference, encode(load_onnx(folder, quantized), index, "int8"), quantized.values())
            int8["note"] = "measured, not checked: quantisation changes features on purpose"
            report["int8"] = int8
    return report


def print_report(report):
    """The check as a table: per tower the largest feature difference and 1 - the lowest cosine,
    then the queries whose best match changed (near ties in brackets) and R@1 both ways."""
    print(f"{'':18}{'image: max|diff|':>17}{'1-cos':>9}{'text: max|diff|':>17}{'1-cos':>9}"
          f"{'best match changed':>20}   R@1 image->text / text->image")
    recall = report["pytorch"]["recall"]
    print(f"{'PyTorch':18}{'reference':>52}{'':20}   {recall['image_to_text/R@1']:.2f} / "
          f"{recall['text_to_image/R@1']:.2f}")
    for key, label in (("open_clip_folder", "open_clip folder"), ("onnx", "ONNX fp32"), ("int8", "ONNX int8")):
        part = report.get(key)
        if not part or "image" not in part:
            continue
        image, text, recall, top1 = part["image"], part["text"], part["recall"], part["top1"]
        verdict = " (measured)" if key == "int8" else "  passed" if part["passed"] else "  FAILED"
        changed = f"{top1['changed']} ({top1['near_ties']}) of {top1['queries']}"
        print(f"{label:18}{image['max_abs_diff']:17.1e}{1 - image['min_cosine']:9.0e}"
              f"{text['max_abs_diff']:17.1e}{1 - text['min_cosine']:9.0e}{changed:>20}   "
              f"{recall['image_to_text/R@1']:.2f} / {recall['text_to_image/R@1']:.2f}{verdict}")
    if "int8" in report:
        sizes = {**report["onnx"]["files"], **report["int8"]["files"]}
        print("sizes: " + ", ".join(f"{name} {size / 2**20:.1f} MiB" for name, size in sizes.items()
                                     if name.endswith(".onnx")))
        change = report["int8"]["recall_change"]
        print("int8 recall change (points): " + ", ".join(f"{k} {v:+.2f}" for k, v in change.items()))


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quantize and not args.onnx:
        parser.error("--quantize needs --onnx")
    if args.check_images < 0:
        parser.error("--check_images must be >= 0 (0 = all)")
    if not 7 <= args.opset <= MAX_OPSET:
        parser.error(f"--opset {args.opset}: the exporter writes opsets 7 to {MAX_OPSET}")
    with tempfile.TemporaryDirectory(prefix="export_check_") as workdir:
        report = run(args, workdir)
    path = Path(args.output) / REPORT_FILE
    path.write_text(json.dumps(report, indent=2))
    print_report(report)
    for key, label in (("open_clip_folder", "the open_clip folder"), ("onnx", "the ONNX encoders")):
        if report.get(key, {}).get("passed") is False:
            raise ExportError(f"{label} failed the check against the PyTorch model: "
                              f"{'; '.join(report[key]['failures'])}. Their files were deleted; figures in {path}")
    print(f"written to {args.output}: " + ", ".join(sorted(p.name for p in Path(args.output).iterdir()
                                                            if p.name != MARKER_FILE)))
    return report


if __name__ == "__main__":
    run_script(main, "export.py")
