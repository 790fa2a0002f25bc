"""Ship a trained model: an open_clip model folder, ONNX encoders and a transformers folder, each
checked against PyTorch.

    python export.py --checkpoint model-checkpoint/<run>/best.pt --output exports/<run>
    python export.py --checkpoint model-checkpoint/<run>/best.pt --output exports/<run> --onnx --quantize int8
    python export.py --checkpoint model-checkpoint/<run>/best.pt --output exports/<run> --transformers

What leaves the repository:
  1. An open_clip model folder, always: open_clip_config.json (the full model config and the image
     preprocessing), open_clip_model.safetensors (the weights), README.md (a model card) and
     prepare_image.py (how to turn an image into what training saw). Plain open_clip loads it, no
     code of this repository needed: open_clip.create_model_and_transforms("local-dir:DIR"), or
     "hf-hub:user/repo" once uploaded (a Hugging Face text tower from the folder's config.json, and
     a Chinese-CLIP model's tokenizer without open_clip's text cleaning: the model card says how).
     A CoCa's folder holds its text decoder too, which writes captions: clip_model.generate_captions,
     or open_clip's model.generate with transformers 4 (it imports BeamSearchScorer, which
     transformers 5 removed).
  2. With --onnx, the two towers as ONNX graphs with a dynamic batch dimension, for any ONNX
     runtime (onnxruntime, TensorRT, ...); a CoCa's decoder is not exported (the folder writes
     captions):
       image_encoder.onnx  pixels [N, 3, H, W] float32, resized and normalised -> features [N, D]
       text_encoder.onnx   tokens [N, context_length] int64                    -> features [N, D]
     Both end with the L2 normalisation, so a dot product of their outputs is a cosine similarity.
     onnx_config.json holds what a client needs to prepare inputs without PyTorch: image size,
     mean, std, resizing, the tokenizer to install and call, context length, and the logit scale;
     prepare_image.pixels is its recipe in code (Pillow and numpy).
  3. With --quantize int8, image_encoder.int8.onnx and text_encoder.int8.onnx (onnxruntime's
     dynamic quantisation), with their sizes and the change of recall measured, for the user to
     weigh.
  4. With --transformers, the same folder in Hugging Face transformers' CLIP format too (config.json,
     model.safetensors, processor and tokenizer files: transformers_export.py), for the
     architectures transformers' CLIPModel expresses; the others are refused in one line.

Every export is checked before it is reported as written. The check encodes real inputs (the
images and captions of --check_data, by default a generated sample set) the way a user of the
export would: the folder through open_clip alone, the ONNX files through onnxruntime, the
transformers folder through transformers, each with the preprocessing and tokenizer that its own
config files describe. The features must match the PyTorch model's row by row (MIN_COSINE,
MAX_NORM_ERROR) and find the same best match for every query, so the same retrieval R@1, up to
near ties (TIE_MARGIN). Then images the check data rarely holds (write_probe_images: non-square
sizes, transparency, an EXIF orientation) go through the recipe each part documents, the copy of
prepare_image.py in the folder included, and must give the features of training's view of them
(our decoder and evaluation transform). A CoCa's folder must also give the token probabilities
of the PyTorch model's text decoder (decoder_check), so that it writes the same captions. A
part that fails is deleted, export_report.json says
why, and the command exits non-zero. A model whose features are not finite is refused before
--output is touched, and --output must be new, empty or an earlier export's (prepare_output):
an export never deletes a file it did not write.
"""
import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import types
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
from PIL import Image

import chinese_clip
import clip_model
import data_loader
import evaluation
import prepare_image
import transformers_export
from errors import UserError, run_script
from files import write_safetensors

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
CAPTION_CHECK_IMAGES = 8     # a CoCa's decoder is compared on the first caption of these images
# The same decoder computed twice differs by float32 round-off of log-probabilities of about -10:
# about 1e-6. A decoder with other weights or another architecture differs by whole units.
MAX_LOG_PROB_ERROR = 1e-4

# A pixel of the transformers processor's output may differ from ours by float32 round-off of the
# normalisation (about 1e-7); one grey level of difference is 1 / 255 / std, about 0.015.
PIXEL_TOLERANCE = 1e-5

CONFIG_FILE, WEIGHTS_FILE, CARD_FILE = "open_clip_config.json", "open_clip_model.safetensors", "README.md"
RECIPE_FILE = Path(prepare_image.__file__).name
ONNX_FILES = {"image": "image_encoder.onnx", "text": "text_encoder.onnx"}
INT8_FILES = {"image": "image_encoder.int8.onnx", "text": "text_encoder.int8.onnx"}
ONNX_CONFIG, REPORT_FILE = "onnx_config.json", "export_report.json"
EXPORT_FILES = list(dict.fromkeys([CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, RECIPE_FILE, *ONNX_FILES.values(),
                                 *INT8_FILES.values(), ONNX_CONFIG, *transformers_export.FILES,
                                 *clip_model.TEXT_FILES, REPORT_FILE]))
# What the report and the model card say of a CoCa's ONNX export.
ONNX_CAPTIONS = "ONNX covers the two encoders; a CoCa's captions need the open_clip folder (its text decoder)"
# Written first into every export folder: the files above may be replaced only where it is.
MARKER_FILE = ".export_folder"
PARTS = (("open_clip_folder", "open_clip folder"), ("onnx", "ONNX encoders"), ("transformers", "transformers folder"))


class ExportError(UserError, RuntimeError):
    """A model that cannot be exported, or an export that failed its check."""


@dataclass
class Features:
    """What the check compares: features of the check data and the recalls they give, and of the
    probe images (write_probe_images) prepared as the part's users are told to."""
    images: torch.Tensor     # [N, D]
    texts: torch.Tensor      # [M, D]
    recall: dict             # "image_to_text/R@1" -> percent, ...
    prepared: dict | None = None    # probe image name -> features [D]


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


def encode_part(part, index, probes, label) -> Features:
    """Features of a loaded part, (setup, prepared): the check data through its setup, and the
    probe files through `prepared`, its documented recipe (paths -> features [n, D])."""
    setup, prepared = part
    features = encode(setup, index, label)
    features.prepared = dict(zip(probes, prepared(list(probes.values()))))
    return features


# ----------------------------------------------------------------------------------------------
# Images the check data rarely holds

def texture(width, height, rng) -> np.ndarray:
    """uint8 [height, width, 3]: smooth colour patches and fine noise, so that a pixel of shift or
    of scale changes the features (a flat picture would hide both)."""
    coarse = Image.fromarray(rng.integers(0, 256, (height // 8 + 2, width // 8 + 2, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.BILINEAR), dtype=np.int16)
    return np.clip(smooth + rng.integers(-24, 25, smooth.shape), 0, 255).astype(np.uint8)


def write_probe_images(folder) -> dict:
    """Image files that tell a faithful preparation from a near miss, {name: path}: non-square
    sizes (the resize truncates the longer side: 96 x 80 goes to 76 x 64 at 64 px, 77 x 64 if
    rounded), a PNG whose transparent pixels hide colours, a palette PNG with a transparent
    colour, and a JPEG stored sideways with an EXIF orientation tag (6: turn 90 degrees clockwise)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = {}

    def save(name, image, **options):
        paths[name] = folder / name
        image.save(paths[name], **options)
    for width, height in ((96, 80), (80, 96), (131, 67), (67, 131), (1003, 701)):
        save(f"{width}x{height}.png", Image.fromarray(texture(width, height, rng)))
    alpha = np.tile(np.clip(np.linspace(-255, 510, 120), 0, 255).astype(np.uint8), (90, 1))  # clear, ramp, opaque
    save("transparent.png", Image.fromarray(np.dstack([texture(120, 90, rng), alpha]), "RGBA"))
    palette = Image.fromarray(texture(100, 70, rng)).quantize(32)
    save("palette_transparent.png", palette, transparency=int(np.asarray(palette)[0, 0]))
    exif = Image.Exif()
    exif[0x0112] = 6   # Orientation
    save("exif_rotated.jpg", Image.fromarray(texture(90, 120, rng)), exif=exif, quality=95)
    return paths


def training_view(setup, probes) -> dict:
    """{name: features [D]} of the probe files as training sees them: our decoder, the evaluation
    transform, the PyTorch model."""
    transform = data_loader.image_transform(setup.preprocess_cfg)
    pixels = torch.stack([transform(data_loader.load_image_file(str(path))) for path in probes.values()])
    return dict(zip(probes, clip_model.encode_images(setup.model, [pixels], "cpu")))


def load_recipe(folder):
    """prepare_image.py as the export folder holds it, run from there: the check runs the file its
    users get (compiled here, not imported, which would leave a __pycache__ folder in the export)."""
    path = Path(folder) / RECIPE_FILE
    module = types.ModuleType("exported_prepare_image")
    module.__file__ = str(path)
    exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), module.__dict__)
    return module


def open_rgb(recipe, path):
    with Image.open(path) as image:
        return recipe.rgb(image)


# ----------------------------------------------------------------------------------------------
# The open_clip model folder

def open_clip_config(setup) -> dict:
    """open_clip_config.json: the keys open_clip reads from a "local-dir:" or "hf-hub:" model."""
    model_cfg = dict(setup.model_config)
    if getattr(setup.model, "logit_bias", None) is not None:
        # A SigLIP model has a learned bias; open_clip creates the parameter only when the config
        # asks for one (the value is then overwritten by the weights).
        model_cfg["init_logit_bias"] = float(setup.model.logit_bias.detach())
    if model_cfg["text_cfg"].get("hf_model_name"):
        # the tower's weights are in this folder: none to fetch from the Hugging Face hub
        model_cfg["text_cfg"] = {**model_cfg["text_cfg"], "hf_model_pretrained": False}
    preprocess = {k: list(v) if isinstance(v, tuple) else v for k, v in setup.preprocess_cfg.items()}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess}


def write_open_clip_folder(setup, folder) -> list:
    """The config, the weights (safetensors: a file of tensors that, unlike a pickle, cannot run
    code when loaded), prepare_image.py, and a Hugging Face text tower's config and tokenizer
    files (the checkpoint's text_files). Returns the files written."""
    (folder / CONFIG_FILE).write_text(json.dumps(open_clip_config(setup), indent=2))
    weights = {name: tensor.contiguous() for name, tensor in setup.model.state_dict().items()}
    write_safetensors(folder / WEIGHTS_FILE, weights, metadata={"format": "pt"})
    shutil.copyfile(prepare_image.__file__, folder / RECIPE_FILE)
    files = [folder / CONFIG_FILE, folder / WEIGHTS_FILE, folder / RECIPE_FILE]
    for name, text in setup.text_files.items():
        # open_clip reads the Hugging Face tokenizer of a "local-dir:" model from the folder itself;
        # load_open_clip_folder builds the tower from its config.json here too
        (folder / name).write_text(text, encoding="utf-8", newline="")
        files.append(folder / name)
    return files


def load_open_clip_folder(folder, model_name):
    """The folder of a model as plain open_clip loads it (model, tokenizer and preprocessing from
    its files), and its recipe for an image file, as the model card gives them:
    preprocess(rgb(Image.open(path)))."""
    name = f"local-dir:{folder}"
    text_cfg = json.loads((folder / CONFIG_FILE).read_text())["model_cfg"]["text_cfg"]
    # open_clip builds a Hugging Face tower from the config its hf_model_name names (on the hub, or
    # the folder it was first built from); offline, it is the config.json of this folder
    offline = {"text_cfg": {**text_cfg, "hf_model_name": str(folder), "hf_model_pretrained": False}} \
        if text_cfg.get("hf_model_name") and (folder / "config.json").is_file() else {}
    model, _, preprocess = open_clip.create_model_and_transforms(name, **offline)
    setup = clip_model.ClipSetup(model=model, tokenizer=folder_tokenizer(folder, model_name),
                                 preprocess_cfg=dict(model.visual.preprocess_cfg), model_name=name,
                                 model_config=open_clip.get_model_config(name))
    recipe = load_recipe(folder)

    def prepared(paths):
        pixels = torch.stack([preprocess(open_rgb(recipe, path)) for path in paths])
        return clip_model.encode_images(model, [pixels], "cpu")
    return setup, prepared


def folder_tokenizer(folder, model_name, context_length=None):
    """open_clip's tokenizer of the folder, as the model card and onnx_config.json tell a user to
    make it: a Chinese-CLIP model's tokenizes the text as it is (chinese_clip.tokenize_raw_text)."""
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}", context_length=context_length)
    return chinese_clip.tokenize_raw_text(tokenizer) if chinese_clip.is_name(model_name) else tokenizer


# What the model card and onnx_config.json add for a Chinese-CLIP model's tokenizer (folder_tokenizer)
RAW_TEXT = "tokenizer.clean_fn = str"


def preparation(preprocess_cfg) -> str:
    """How to prepare an image to match training, in words (the model card, onnx_config.json):
    prepare_image.rgb, then open_clip's evaluation transform as prepare_image.pixels computes it."""
    height, width = image_size(preprocess_cfg)
    mode = preprocess_cfg.get("resize_mode", "shortest")
    interpolation = preprocess_cfg.get("interpolation", "bicubic")
    resize = {"squash": f"resize it to {width} x {height} px ({interpolation})",
              "longest": f"resize its longer side to fit {width} x {height} px ({interpolation}, the other side "
                         f"scaled by the same factor and rounded), pad it to {width} x {height} with grey level "
                         f"{preprocess_cfg.get('fill_color', 0)}",
              "shortest": f"resize its shorter side to {min(height, width)} px and its longer side to "
                          f"int({min(height, width)} * long / short), truncated, not rounded ({interpolation}), "
                          f"crop the centre {width} x {height} px starting at round((side - size) / 2)"}[mode]
    return (f"Apply the EXIF orientation (PIL.ImageOps.exif_transpose), composite transparent pixels on "
            f"white {prepare_image.BACKGROUND}, convert to RGB (16-bit grey scaled to 8 bits first); "
            f"{resize}; scale to [0, 1] and normalise each channel, (x - mean) / std, with mean "
            f"{list(preprocess_cfg['mean'])} and std {list(preprocess_cfg['std'])}. {RECIPE_FILE} in "
            f"this folder does it with Pillow and numpy: rgb(Image.open(path)) the first steps (open_clip's "
            f"preprocess does the rest), pixels(image, config) the rest, config being {ONNX_CONFIG}.")


def validation_of(checkpoint):
    """(step, metrics, which weights) of the validation that scored the checkpoint's weights, or
    None. best.pt holds its own metrics (of the moving average of the weights when that won);
    last.pt finds its step in the validation history it holds."""
    step = checkpoint.get("step")
    if checkpoint.get("metrics"):
        return step, checkpoint["metrics"], (checkpoint.get("best") or {}).get("weights")
    entries = [e for e in checkpoint.get("history", {}).get("val", []) if e.get("step") == step]
    return (step, entries[-1], "raw") if entries else None


def validation_lines(checkpoint) -> list:
    """The retrieval recalls the checkpoint's weights scored on the validation set."""
    found = validation_of(checkpoint)
    if found is None:
        return ["No validation of these weights is recorded in the checkpoint."]
    step, metrics, weights = found
    which = " (the moving average of the weights, which scored best)" if weights == "ema" else ""
    count = f" of {metrics['num_images']} images" if "num_images" in metrics else ""
    lines = [f"Retrieval on the validation set{count} at step {step}{which} (percent):", "",
             "| | R@1 | R@5 | R@10 |", "|---|---:|---:|---:|"]
    for direction, label in (("image_to_text", "image -> text"), ("text_to_image", "text -> image")):
        r = metrics["retrieval"][direction]
        lines.append(f"| {label} | {r['R@1']:.1f} | {r['R@5']:.1f} | {r['R@10']:.1f} |")
    return lines


def usage_lines(setup, report) -> list:
    """How to load each part the export wrote and checked (and a CoCa's captions), as
    load_open_clip_folder and load_onnx do."""
    captioner = clip_model.is_captioner(setup.model)
    create = ['model, _, preprocess = open_clip.create_model_and_transforms("local-dir:PATH/TO/THIS/FOLDER")']
    if "config.json" in setup.text_files:
        create = ['text_cfg = json.load(open("PATH/TO/THIS/FOLDER/open_clip_config.json"))["model_cfg"]["text_cfg"]',
                  "# the text tower is built from this folder's config.json, not from where it was trained",
                  'model, _, preprocess = open_clip.create_model_and_transforms(',
                  '    "local-dir:PATH/TO/THIS/FOLDER", text_cfg={**text_cfg, "hf_model_name": "PATH/TO/THIS/FOLDER"})']
    lines = ["```python", *["import json"] * ("config.json" in setup.text_files), "from PIL import Image",
             "import open_clip", f"import prepare_image   # {RECIPE_FILE} of this folder", "", *create,
             'tokenizer = open_clip.get_tokenizer("local-dir:PATH/TO/THIS/FOLDER")',
             *[f"{RAW_TEXT}   # Chinese-CLIP tokenizes the text as it is; open_clip would clean it with ftfy first"]
             * chinese_clip.is_name(setup.model_name),
             'image = preprocess(prepare_image.rgb(Image.open("photo.jpg"))).unsqueeze(0)   # not Image.open alone',
             '# uploaded to the Hugging Face hub: "hf-hub:USER/REPO" instead of "local-dir:..."', "```"]
    if captioner:
        lines += ["", "Captions: open_clip's `generate` needs transformers 4 (it imports `BeamSearchScorer`, which "
                      "transformers 5 removed); the training repository's `clip_model.generate_captions` needs "
                      "neither.", "", "```python", "generated = model.generate(image)",
                  'caption = open_clip.decode(generated[0]).split("<end_of_text>")[0].replace("<start_of_text>", "")',
                  "```"]
    if report.get("onnx", {}).get("passed"):
        lines += ["", f"ONNX: `{ONNX_FILES['image']}` takes `prepare_image.pixels(prepare_image.rgb(Image.open(path)), "
                      f"config)` with `config` read from `{ONNX_CONFIG}`, which names the tokenizer for "
                      f"`{ONNX_FILES['text']}`." + (f" {ONNX_CAPTIONS}." if captioner else "")]
    if report.get("transformers", {}).get("passed"):
        lines += ["", "transformers:", "", "```python",
                  "from transformers import AutoProcessor, CLIPModel", "",
                  'model = CLIPModel.from_pretrained("PATH/TO/THIS/FOLDER")',
                  'processor = AutoProcessor.from_pretrained("PATH/TO/THIS/FOLDER", backend="pil")',
                  'inputs = processor(text=["a photo of a cat"], images=prepare_image.rgb(Image.open("photo.jpg")),',
                  '                   padding="max_length", return_tensors="pt")', "```", "",
                  *transformers_caveats(report["transformers"])]
    return lines


def processor_summary(processor) -> str:
    """What the check measured of transformers' image processor, in a sentence."""
    pil, default = processor["pil"], processor["torchvision"]
    crop = "" if pil["min_cosine_crop_off"] is None else \
        f" (1 - cosine up to {1 - pil['min_cosine_crop_off']:.1g})"
    return (f"with backend=\"pil\" training's pixels on {pil['images'] - pil['crop_one_pixel_off']} of "
            f"{pil['images']} images (up to {pil['max_pixel_difference']:.0e} apart), the crop a pixel off on "
            f"{pil['crop_one_pixel_off']}{crop}; with its default backend, \"torchvision\", pixels up to "
            f"{default['max_pixel_difference']:.3f} apart where the crops agree (1 - cosine up to "
            f"{1 - default['min_cosine']:.1g})")


def transformers_caveats(part) -> list:
    """What transformers does otherwise than training, with the check's figures."""
    return ["- Give the processor `prepare_image.rgb(Image.open(path))`: transformers' `load_image`, which its "
            "pipeline calls on a path or an image, drops transparency with `convert(\"RGB\")`.",
            "- The processor's centre crop starts at int((side - size) / 2) where torchvision's rounds half to "
            "even: a pixel apart when the resized side exceeds the crop by 3 (mod 4). The check found it "
            + processor_summary(part["processor"]) + ".",
            "- Its tokenizer does not run ftfy nor unescape HTML as open_clip's does: captions with curly quotes, "
            "ligatures, full-width letters or `&amp;` get other tokens; clean them with "
            "`open_clip.tokenizer.basic_clean` first."]


def model_card(setup, checkpoint, checkpoint_path, report) -> str:
    """README.md of the folder: what the model is, how to load it and prepare an image, how it
    was trained, how well, and what the export's check found."""
    settings = checkpoint.get("config", {})
    name = settings.get("run_name") or setup.model_name
    cfg = setup.model_config
    captioner = clip_model.is_captioner(setup.model)
    tags = ["clip"] + ["coca"] * captioner + ["transformers"] * bool(report.get("transformers", {}).get("passed"))
    coca = " It is a CoCa (Contrastive Captioner): a text decoder reads the image and writes a caption." * captioner
    lines = ["---", "library_name: open_clip", "pipeline_tag: zero-shot-image-classification",
             f"tags: [{', '.join(tags)}]", "---", f"# {name}", "",
             f"A CLIP model: an image tower and a text tower that map images and captions into one "
             f"{cfg['embed_dim']}-dimensional space, where the cosine similarity of an image and a "
             f"caption says how well they match.{coca} Exported from the checkpoint `{checkpoint_path}`.", "",
             *usage_lines(setup, report), "",
             "## Preparing an image as training did", "", preparation(setup.preprocess_cfg), "",
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
    lines += ["", "## Validation", "", *validation_lines(checkpoint), "", "## Export check", "",
              f"Each part, loaded from this folder by its own library, gives the features of the training "
              f"checkpoint on {report['images']} images and {report['captions']} captions of "
              f"{report['check_data']}, and on {len(report['probe_images'])} images prepared as above "
              f"(non-square, transparent, EXIF-rotated):", ""]
    for key, label in PARTS:
        part = report.get(key)
        if part and part.get("passed"):
            worst = min(part[t]["min_cosine"] for t in ("image", "text", "prepared_images") if t in part)
            decoder = part.get("text_decoder")
            captions = (f"; its text decoder's log-probabilities at most {decoder['max_log_prob_diff']:.0e} apart on "
                        f"the caption tokens of {decoder['images']} images") if decoder else ""
            lines.append(f"- {label}: 1 - cosine at most {max(1 - worst, 0):.0e}{captions}")
    return "\n".join(lines) + "\n"


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
        "pixels": f"float32 [N, 3, H, W]: each image prepared as 'prepare' says; {RECIPE_FILE} of this "
                  f"folder does it: pixels(rgb(Image.open(path)), this config)",
        "prepare": preparation(preprocess),
        "tokens": "int64 [N, context_length]: the token ids of 'tokenizer'",
        "features": "float32 [N, embed_dim], L2-normalised: image . text is their cosine",
        "image_size": list(image_size(preprocess)), "mean": list(preprocess["mean"]),
        "std": list(preprocess["std"]), "interpolation": preprocess.get("interpolation", "bicubic"),
        "resize_mode": preprocess.get("resize_mode", "shortest"), "fill_color": preprocess.get("fill_color", 0),
        "context_length": setup.tokenizer.context_length,
        "tokenizer": tokenizer_entry(setup),
        "embed_dim": setup.model_config["embed_dim"],
        # logits = logit_scale * image_features @ text_features.T (+ logit_bias for SigLIP)
        "logit_scale": float(model.logit_scale.detach().exp()),
        "logit_bias": None if bias is None else float(bias.detach())}


def tokenizer_entry(setup) -> dict:
    """What a client installs and calls to make the text encoder's token ids (open_clip reads the
    tokenizer's settings, or a Hugging Face tokenizer's files, from the folder)."""
    hf_name = setup.model_config["text_cfg"].get("hf_tokenizer_name") or ""
    make = f"open_clip.get_tokenizer('local-dir:<this folder>', context_length={setup.tokenizer.context_length})"
    call = f"tokenizer = {make}; {RAW_TEXT}; tokenizer(texts).numpy()" if chinese_clip.is_name(setup.model_name) \
        else f"{make}(texts).numpy()"
    held = ", whose files this folder holds" if set(setup.text_files) - {"config.json"} else ""
    return {"install": "pip install open_clip_torch", "call": call,
            "vocabulary": f"the Hugging Face tokenizer {hf_name}{held}" if hf_name else
                          "CLIP's byte-pair encoding (open_clip's SimpleTokenizer: ftfy, HTML unescaped, "
                          "lower case; start 49406, end 49407, padded with 0)"}


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


def load_onnx(folder, files, model_name):
    """The ONNX encoders with the preprocessing and the tokenizer call that onnx_config.json gives
    a client (a wrong mean or std written there fails the check like a wrong graph), and the
    recipe for an image file it documents: prepare_image.pixels(rgb(Image.open(path)), config)."""
    config = json.loads((folder / ONNX_CONFIG).read_text())
    preprocess = {"size": tuple(config["image_size"]), "mean": config["mean"], "std": config["std"],
                  "interpolation": config["interpolation"], "resize_mode": config["resize_mode"]}
    tokenizer = folder_tokenizer(folder, model_name, config["context_length"])
    model = OnnxModel(files["image"], files["text"])
    recipe = load_recipe(folder)

    def prepared(paths):
        return model.encode_image(torch.from_numpy(np.stack([recipe.pixels(open_rgb(recipe, path), config)
                                                             for path in paths])))
    return clip_model.ClipSetup(model=model, tokenizer=tokenizer, preprocess_cfg=preprocess, model_name="onnx",
                                model_config={}), prepared


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
    if candidate.prepared is not None:
        result["prepared_images"] = prepared_agreement(reference.prepared, candidate.prepared)
        worst = result["prepared_images"]
        if not worst["min_cosine"] >= MIN_COSINE:
            failures.append(f"images prepared as its users are told to: 1 - cosine up to "
                            f"{1 - worst['min_cosine']:.2g} on {worst['worst']} (tolerance {1 - MIN_COSINE:.0e})")
    result["failures"] = failures
    return result


def prepared_agreement(reference: dict, candidate: dict) -> dict:
    """The lowest cosine between the features of each probe image as training sees it and as a
    part's recipe prepares it, and the image that has it."""
    names = list(reference)
    cosines = F.cosine_similarity(torch.stack([reference[n] for n in names]).double(),
                                  torch.stack([candidate[n] for n in names]).double(), dim=1)
    return {"images": len(names), "min_cosine": float(cosines.min()), "worst": names[int(cosines.argmin())]}


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


def check_part(name, report, files, check) -> dict:
    """Run a part's check (`check()`: its entry of the report, with "failures"); a part that fails,
    or cannot even be loaded, has its files deleted. Returns its entry of the report."""
    try:
        result = check()
    except Exception as error:   # whatever stops the part from loading is the check failing
        result = {"files": {path.name: path.stat().st_size for path in files if path.exists()},
                  "failures": [f"cannot be loaded and encoded: {type(error).__name__}: {error}"]}
    result["passed"] = not result["failures"]
    if not result["passed"]:
        for path in files:
            path.unlink(missing_ok=True)
    report[name] = result
    return result


def check_open_clip_folder(folder, setup, reference, index, probes, files) -> dict:
    """The folder, loaded by open_clip: its towers must give our features (compare), and a CoCa's
    decoder our token probabilities (decoder_check)."""
    part = load_open_clip_folder(folder, setup.model_name)
    result = compare(reference, encode_part(part, index, probes, "open_clip folder"), files)
    if clip_model.is_captioner(setup.model):
        result["text_decoder"] = decoder_check(setup, part[0], index)
        result["failures"] += result["text_decoder"].pop("failures")
    return result


def decoder_check(setup, candidate, index) -> dict:
    """A CoCa's text decoder in the candidate (the folder, loaded by open_clip) against PyTorch's:
    the log-probabilities of every token of the first caption of the first CAPTION_CHECK_IMAGES
    check images, given the image and the tokens before it (teacher forcing). Equal at every
    position, the two write the same captions whatever the decoding; one forward pass, where
    writing a caption takes one per token."""
    images = range(min(CAPTION_CHECK_IMAGES, index.num_images))
    transform = data_loader.image_transform(setup.preprocess_cfg)
    pixels = torch.stack([transform(index.load_image(i)) for i in images])
    texts = [index.caption(index.captions_of(i)[0]) for i in images]

    def log_probs(part):
        with torch.inference_mode():
            out = clip_model.unwrap(part.model).eval()(pixels, part.tokenizer(texts))
        return out["logits"].double().log_softmax(dim=-1)[out["labels"] != 0]      # [caption tokens, V]
    difference = float((log_probs(candidate) - log_probs(setup)).abs().max())
    failures = [] if difference <= MAX_LOG_PROB_ERROR else [
        f"its text decoder gives other token probabilities than the PyTorch model's (log-probabilities up to "
        f"{difference:.2g} apart, tolerance {MAX_LOG_PROB_ERROR:.0e})"]
    return {"images": len(images), "max_log_prob_diff": difference, "failures": failures}


def check_transformers(folder, setup, reference, index, probes, files) -> dict:
    """The transformers folder, loaded by transformers: its model must give our features on our
    pixels and on its tokenizer's token ids (compare), its tokenizer must give open_clip's ids,
    and its image processor our pixels, but for the crop it places otherwise (processor_check)."""
    model, processor = transformers_export.load(folder)
    tokenizer = transformers_export.TransformersTokenizer(processor)
    part = clip_model.ClipSetup(model=transformers_export.TransformersModel(model), tokenizer=tokenizer,
                                preprocess_cfg=setup.preprocess_cfg, model_name="transformers", model_config={})
    result = compare(reference, encode(part, index, "transformers"), files)
    captions = index.captions()
    differing = token_differences(setup.tokenizer(captions), tokenizer(captions))
    if differing:
        result["failures"].insert(0, f"transformers' CLIPTokenizer gives other token ids than open_clip's for "
                                     f"{len(differing)} of {len(captions)} captions, e.g. "
                                     f"{captions[differing[0]]!r} (it does not run ftfy nor unescape HTML); "
                                     f"check on other data (--check_data) or export without --transformers")
    result["processor"] = processor_check(folder, setup, index, probes)
    result["failures"] += result["processor"].pop("failures")
    return result


def token_differences(ours, theirs) -> list:
    """Rows whose ids differ up to the end-of-text token (after it, open_clip pads with 0 and
    transformers with the end-of-text token: the causal text tower pools at that token, which
    never sees what follows it)."""
    end = (ours == transformers_export.EOS_ID).int().argmax(dim=1, keepdim=True)
    kept = torch.arange(ours.shape[1])[None, :] <= end
    return torch.nonzero(((ours != theirs) & kept).any(dim=1)).flatten().tolist()


def processor_check(folder, setup, index, probes) -> dict:
    """transformers' image processor against our evaluation transform, pixel by pixel, on the check
    images and the probe files opened as documented (prepare_image.rgb: transformers' own
    load_image, which its pipeline calls, drops transparency with convert("RGB")). With
    backend="pil" the pixels must be ours, except where its crop sits a pixel off
    (transformers_export.crop_differs), whose feature agreement is measured; the default backend
    (torchvision) is measured."""
    transform = data_loader.image_transform(setup.preprocess_cfg)
    recipe = load_recipe(folder)
    # (name, the image as training decodes it, the image as the user gives it to the processor)
    sources = [(f"check image {i}", lambda i=i: (index.load_image(i),) * 2) for i in range(index.num_images)]
    sources += [(name, lambda path=path: (data_loader.load_image_file(str(path)), open_rgb(recipe, path)))
                for name, path in probes.items()]
    processors = {backend: transformers_export.load_processor(folder, backend) for backend in ("pil", "torchvision")}
    crop_off, differences, cosines = [], {b: [] for b in processors}, {b: [] for b in processors}
    for start in range(0, len(sources), CHECK_BATCH):
        pairs = [load() for _, load in sources[start:start + CHECK_BATCH]]
        ours = torch.stack([transform(decoded) for decoded, _ in pairs])
        reference = clip_model.encode_images(setup.model, [ours], "cpu").double()
        crop_off += [transformers_export.crop_differs(*given.size, setup.preprocess_cfg) for _, given in pairs]
        for backend, processor in processors.items():
            theirs = processor(images=[given for _, given in pairs], return_tensors="pt")["pixel_values"]
            differences[backend].append((theirs - ours).abs().flatten(1).max(dim=1).values)
            features = clip_model.encode_images(setup.model, [theirs], "cpu").double()
            cosines[backend].append(F.cosine_similarity(reference, features, dim=1))
    crop_off = torch.tensor(crop_off)
    result = {"failures": []}
    for backend in processors:
        # appended 0 and 1: the figures of no image (every crop off, or none)
        difference, cosine = torch.cat(differences[backend]), torch.cat(cosines[backend])
        result[backend] = {"images": len(sources), "crop_one_pixel_off": int(crop_off.sum()),
                           "max_pixel_difference": float(torch.cat([difference[~crop_off], torch.zeros(1)]).max()),
                           "min_cosine": float(torch.cat([cosine[~crop_off], torch.ones(1)]).min()),
                           "min_cosine_crop_off": float(cosine[crop_off].min()) if crop_off.any() else None}
    wrong = [name for (name, _), d, off in zip(sources, torch.cat(differences["pil"]), crop_off)
             if d > PIXEL_TOLERANCE and not off]
    if wrong:
        result["failures"].append(f"transformers' image processor gives other pixels than our preprocessing on "
                                  f"{len(wrong)} images, e.g. {wrong[0]} (up to "
                                  f"{result['pil']['max_pixel_difference']:.3g} apart)")
    return result


# ----------------------------------------------------------------------------------------------
# Command line

def build_parser():
    parser = argparse.ArgumentParser(
        description="Export a checkpoint as an open_clip model folder (and ONNX encoders, a transformers "
                    "folder), each checked against the PyTorch model on real images and captions and on "
                    "images prepared as its users are told to (prepare_image.py, shipped in the folder).")
    add = parser.add_argument
    add("--checkpoint", required=True, help="checkpoint written by train.py, e.g. model-checkpoint/<run>/best.pt")
    add("--output", required=True, metavar="DIR", help="folder to write into: a new or empty one, or "
                                                       "that of an earlier export, whose files are replaced")
    add("--onnx", action="store_true", help="also write image_encoder.onnx, text_encoder.onnx and onnx_config.json")
    add("--quantize", choices=("int8",), help="with --onnx: also write dynamically quantised int8 "
                                              "encoders and measure their recall change")
    add("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, 7 to {MAX_OPSET}")
    add("--transformers", action="store_true",
        help="also write the folder in Hugging Face transformers' CLIP format (config.json, model.safetensors, "
             "processor and tokenizer files) for CLIPModel, AutoProcessor and pipeline(); plain ViT models only")
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
    refused = args.transformers and transformers_export.unsupported(setup)
    if refused:
        raise ExportError(f"--transformers: {setup.model_name} cannot be written as transformers' CLIPModel, "
                          f"{refused}; export without --transformers")
    index, data = check_data(args.check_data, args.check_images, workdir)
    probes = write_probe_images(Path(workdir) / "probe_images")
    print(f"checking on {index.num_images} images and {index.num_captions} captions of {data}, "
          f"and {len(probes)} probe images")
    reference = encode(setup, index, f"checkpoint {args.checkpoint}")   # before --output is touched
    reference.prepared = training_view(setup, probes)
    folder = prepare_output(args.output)
    report = {"checkpoint": str(args.checkpoint), "model": setup.model_name, "check_data": data,
              "images": index.num_images, "captions": index.num_captions, "probe_images": list(probes),
              "tolerance": {"min_cosine": MIN_COSINE, "max_norm_error": MAX_NORM_ERROR,
                            "best_match": f"the same as PyTorch's, but for ties within {TIE_MARGIN}",
                            "transformers_pixels": PIXEL_TOLERANCE},
              "pytorch": {"recall": reference.recall}}

    def checked(load, files, label):
        return lambda: compare(reference, encode_part(load(), index, probes, label), files)
    files = write_open_clip_folder(setup, folder)
    if not check_part("open_clip_folder", report, files,
                      lambda: check_open_clip_folder(folder, setup, reference, index, probes, files))["passed"]:
        return report
    if args.onnx:
        onnx = export_onnx(setup, folder, args.opset)
        files = [*onnx.values(), folder / ONNX_CONFIG]
        onnx_check = check_part("onnx", report, files,
                                checked(lambda: load_onnx(folder, onnx, setup.model_name), files, "onnx"))
        onnx_check["opset"] = args.opset
        if clip_model.is_captioner(setup.model):
            onnx_check["note"] = ONNX_CAPTIONS
        if args.quantize and onnx_check["passed"]:
            quantized = quantize_int8(folder, onnx)
            int8 = compare(reference, encode_part(load_onnx(folder, quantized, setup.model_name), index, probes,
                                                  "int8"), quantized.values())
            int8["note"] = "measured, not checked: quantisation changes features on purpose"
            report["int8"] = int8
    if args.transformers:
        files = transformers_export.write_folder(setup, folder)
        check_part("transformers", report, files,
                   lambda: check_transformers(folder, setup, reference, index, probes, files))
    (folder / CARD_FILE).write_text(model_card(setup, checkpoint, args.checkpoint, report))
    return report


def print_report(report):
    """The check as a table: per tower the largest feature difference and 1 - the lowest cosine,
    then the queries whose best match changed (near ties in brackets) and R@1 both ways; then the
    probe images and transformers' processor."""
    print(f"{'':18}{'image: max|diff|':>17}{'1-cos':>9}{'text: max|diff|':>17}{'1-cos':>9}"
          f"{'best match changed':>20}   R@1 image->text / text->image")
    recall = report["pytorch"]["recall"]
    print(f"{'PyTorch':18}{'reference':>52}{'':20}   {recall['image_to_text/R@1']:.2f} / "
          f"{recall['text_to_image/R@1']:.2f}")
    for key, label in (*PARTS, ("int8", "ONNX int8")):
        part = report.get(key)
        if not part or "image" not in part:
            continue
        image, text, recall, top1 = part["image"], part["text"], part["recall"], part["top1"]
        verdict = " (measured)" if key == "int8" else "  passed" if part["passed"] else "  FAILED"
        changed = f"{top1['changed']} ({top1['near_ties']}) of {top1['queries']}"
        print(f"{label:18}{image['max_abs_diff']:17.1e}{1 - image['min_cosine']:9.0e}"
              f"{text['max_abs_diff']:17.1e}{1 - text['min_cosine']:9.0e}{changed:>20}   "
              f"{recall['image_to_text/R@1']:.2f} / {recall['text_to_image/R@1']:.2f}{verdict}")
    prepared = {label: report[key]["prepared_images"] for key, label in (*PARTS, ("int8", "ONNX int8"))
                if "prepared_images" in report.get(key, {})}
    if prepared:
        print(f"{len(report['probe_images'])} probe images prepared as documented, 1 - cosine (worst image): " +
              ", ".join(f"{label} {1 - p['min_cosine']:.0e} ({p['worst']})" for label, p in prepared.items()))
    decoder = report.get("open_clip_folder", {}).get("text_decoder")
    if decoder:
        print(f"text decoder: the folder's log-probabilities of the caption tokens of {decoder['images']} images "
              f"are at most {decoder['max_log_prob_diff']:.1e} from PyTorch's")
    if "note" in report.get("onnx", {}):
        print(report["onnx"]["note"])
    if "processor" in report.get("transformers", {}):
        print("transformers' image processor: " + processor_summary(report["transformers"]["processor"]))
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
    for key, label in PARTS:
        if report.get(key, {}).get("passed") is False:
            raise ExportError(f"the {label} failed the check against the PyTorch model: "
                              f"{'; '.join(report[key]['failures'])}. Its files were deleted; figures in {path}")
    print(f"written to {args.output}: " + ", ".join(sorted(p.name for p in Path(args.output).iterdir()
                                                            if p.name != MARKER_FILE)))
    return report


if __name__ == "__main__":
    run_script(main, "export.py")
