"""Train CLIP: `python train.py [--config config.json] [--flag value ...]`.

`main()` is the table of contents: settings, processes and run folder, data, model, optimiser and
schedule, resume, the loop, the results. Each step is a function below it, in that order. Under
`torchrun` the same script trains on many GPUs or machines.
"""
import argparse
import contextlib
import datetime
import json
import logging
import math
import os
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import distillation
from errors import DataError, OutputError, SettingsError, TrainingError, disk_full_message, is_disk_full

DEFAULT_DATA_DIR = "data/sample"


# ----------------------------------------------------------------------------------------------
# Settings: one schema makes config.json's defaults, the command-line flags, their checks and the
# README's table.

@dataclass(frozen=True)
class Setting:
    section: str
    name: str
    default: object
    help: str
    choices: tuple = None
    valid: str = None        # range of a number: ">= 1", "> 0", "[0, 1)", "(0, 1)"


SCHEMA = [
    # model
    Setting("model", "model_name", "tiny-vit-64", "open_clip model name (ViT-B-32, RN50, ...), a "
            "preset of ours (tiny-vit-64, small-vit-128, simple-rn18) or an open_clip config .json"),
    Setting("model", "pretrained", "", "'' for random init, an open_clip pretrained tag (openai, "
            "laion2b_s34b_b79k, ...), or a local weights file or checkpoint"),
    Setting("model", "loss", "clip", "clip: softmax InfoNCE; siglip: sigmoid loss", ("clip", "siglip")),
    Setting("model", "local_loss", False, "with many processes, compute the loss of local rows "
            "against the global batch only (less memory, same gradient on average)"),
    Setting("model", "freeze_backbone", False, "train only the two projections and the temperature"),
    Setting("model", "lock_image", -1, "train only the image tower's last N blocks (and the "
            "norm and projection after them); 0 freezes it (LiT); -1 leaves it trainable",
            valid=">= -1"),
    Setting("model", "lock_text", -1, "train only the text tower's last N blocks (and the norm "
            "and projection after them); 0 freezes it; -1 leaves it trainable", valid=">= -1"),
    Setting("model", "grad_checkpointing", False, "recompute activations in backward to save memory"),
    Setting("model", "patch_dropout", 0.0, "fraction of image patches dropped in training (FLIP); "
            "ViT towers only", valid="[0, 1)"),
    Setting("model", "context_length", 0, "tokens the text tower reads; 0 = the model's own "
            "(Chinese needs about 3 tokens per character)", valid=">= 0"),
    Setting("model", "compile", False, "torch.compile the model"),
    # model: distillation, a teacher the student learns from (clip_model.DistillationLoss)
    Setting("model", "distill_from", "", "distillation teacher: a checkpoint of ours, an open_clip "
            "model folder (open_clip_config.json and weights), or an open_clip model name or preset "
            "with distill_pretrained; '' = no distillation"),
    Setting("model", "distill_pretrained", "", "the teacher's weights when distill_from is a model "
            "name: an open_clip pretrained tag or a local weights file"),
    Setting("model", "distill_weight", 0.5, "share w of the distillation term: loss = (1 - w) x "
            "contrastive + w x distillation; 0 = no distillation", valid="[0, 1]"),
    Setting("model", "distill_temperature", 4.0, "temperature T that softens both models' "
            "similarity distributions before they are compared (the term is scaled by T^2)",
            valid="> 0"),
    Setting("model", "distill_features", True, "also pull the student's features towards the "
            "teacher's, through a learned linear map when their widths differ (dropped after training)"),
    Setting("model", "distill_cache", False, "compute the teacher's features of every training image "
            "and caption once, up front, instead of at every step; needs --no-augment (each image is "
            "then seen one way only) and indexed data (not shards)"),
    # data
    Setting("data", "data_dir", DEFAULT_DATA_DIR, "training data: JSON index, images/+captions/ "
            "folder, CSV/TSV, Chinese-CLIP folder or LMDB, or WebDataset shards "
            "('dir/{00000..00099}.tar', sources joined with '::'); the default is generated if missing"),
    Setting("data", "val_data", "", "validation data in any of those formats; '' splits "
            "val_fraction of the images off data_dir"),
    Setting("data", "val_fraction", 0.1, "share of images held out for validation when val_data "
            "is ''", valid="(0, 1)"),
    Setting("data", "image_column", "filepath", "CSV/TSV column of image paths"),
    Setting("data", "caption_column", "title", "CSV/TSV column of captions"),
    Setting("data", "split", "train", "split of a Chinese-CLIP folder (train, valid, test)"),
    Setting("data", "train_num_samples", 0, "shards: samples per epoch; needed when the shards' "
            "counts are unknown (no _info.json or img2dataset *_stats.json); 0 = the shards' total",
            valid=">= 0"),
    Setting("data", "data_weights", "", "shards: each source's share of the samples, e.g. 1,3 for "
            "two sources (with data_resampled); '' = in proportion to their sizes"),
    Setting("data", "data_resampled", False, "shards: draw shards with replacement (any number of "
            "shards for any number of workers; sources mixed by data_weights)"),
    Setting("data", "augment", True, "random resized crops (and colour jitter, see colour_jitter) in "
            "training, no flips; off: each image resized and centre-cropped as for evaluation"),
    Setting("data", "crop_min_scale", 0.9, "the smallest share of an image's area a random crop keeps "
            "(crops keep crop_min_scale to all of it, as RandomResizedCrop's scale)", valid="(0, 1]"),
    Setting("data", "colour_jitter", 0.0, "share of training images whose brightness, contrast and "
            "saturation are jittered (by up to 30%, hue kept: captions name colours)", valid="[0, 1]"),
    Setting("data", "sample_by", "caption", "what an epoch goes through once: caption (each caption with "
            "its image, so an image comes as often as it has captions, as in open_clip's trainer) or image "
            "(each image, with one of its captions drawn anew each epoch); indexed data only: shards "
            "always show each image with one drawn caption", ("caption", "image")),
    Setting("data", "cache_images", True, "decode each training image once, shrunk to just above the "
            "model's input, and tokenise each caption once; keep both in memory (when the images fit in "
            "a quarter of the free memory)"),
    Setting("data", "val_zeroshot", "", "a folder of one image folder per class: zero-shot top-1/top-5 "
            "at every validation, so that forgetting shows while it happens; '' = off"),
    Setting("data", "strict_data", False, "stop at the first unreadable image (missing or "
            "corrupt) instead of skipping it and counting it"),
    Setting("data", "num_workers", 2, "DataLoader worker processes per training process, which "
            "read and decode images (on a CPU-only run with the images cached, training batches are "
            "built in the training process itself)", valid=">= 0"),
    # training
    Setting("training", "batch_size", 64, "images per process per micro-batch", valid=">= 1"),
    Setting("training", "accum_steps", 1, "micro-batches per optimiser step; the loss still sees "
            "the negatives of all of them", valid=">= 1"),
    Setting("training", "num_epochs", 10, "passes over the training data", valid=">= 1"),
    Setting("training", "max_steps", 0, "optimiser steps to train for; 0 = num_epochs decides",
            valid=">= 0"),
    Setting("training", "learning_rate", 5e-4, "peak learning rate of AdamW", valid="> 0"),
    Setting("training", "weight_decay", 0.1, "AdamW weight decay (not on 1-D tensors)", valid=">= 0"),
    Setting("training", "beta1", 0.9, "AdamW beta1", valid="[0, 1)"),
    Setting("training", "beta2", 0.98, "AdamW beta2 (0.98 as in CLIP, steadier than 0.999)",
            valid="[0, 1)"),
    Setting("training", "eps", 1e-6, "AdamW epsilon", valid="> 0"),
    Setting("training", "warmup_steps", 100, "linear warmup steps before the cosine decay; at "
            "most half the run (a longer one is shortened, with a warning)", valid=">= 0"),
    Setting("training", "grad_clip_norm", 1.0, "clip the global gradient norm; 0 = no clipping",
            valid=">= 0"),
    Setting("training", "hard_negatives", 0.0, "share of each global batch made of groups of "
            "similar items (an item and its nearest neighbours by caption, mined with the model at "
            "each epoch start) so that the loss sees hard negatives; 0 = random batches",
            valid="[0, 1)"),
    Setting("training", "ema_decay", 0.0, "keep an exponential moving average of the weights with "
            "this decay (e.g. 0.999), validate it beside the weights, and save the better as best.pt; "
            "0 = off", valid="[0, 1)"),
    Setting("training", "precision", "auto", "auto (amp on CUDA, else fp32), fp32, amp (fp16 "
            "with loss scaling, CUDA), bf16", ("auto", "fp32", "amp", "bf16")),
    Setting("training", "device", "auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps"),
    Setting("training", "seed", 0, "seed of model init, data order, captions and augmentation",
            valid=">= 0"),
    Setting("training", "max_bad_steps", 5, "stop after this many non-finite losses in a row",
            valid=">= 1"),
    Setting("training", "eval_every", 0, "validate every N steps; 0 = at the end of each epoch",
            valid=">= 0"),
    Setting("training", "best_metric", "rsum", "validation metric that picks best.pt: rsum, "
            "mean_recall, image_to_text/R@1, text_to_image/R@5, ..."),
    Setting("training", "early_stopping_patience", 0, "stop after N validations without a new "
            "best; 0 = never", valid=">= 0"),
    Setting("training", "resume", "", "'auto' continues the run's last.pt; or a checkpoint path"),
    Setting("training", "stop_at_step", 0, "save and stop after this step without changing the "
            "schedule (split a run into jobs); 0 = off", valid=">= 0"),
    # logging
    Setting("logging", "run_name", "", "name of the run's folders: letters, digits and . _ - + = @, "
            "not starting with '.'; '' = model name and time", valid="folder name"),
    Setting("logging", "save_every", 500, "write last.pt every N steps (and at the end)",
            valid=">= 1"),
    Setting("logging", "log_every", 10, "steps between log lines and TensorBoard points",
            valid=">= 1"),
    Setting("logging", "checkpoint_dir", "model-checkpoint", "folder of the runs' checkpoints"),
    Setting("logging", "log_dir", "logs", "folder of the runs' logs and TensorBoard events"),
    Setting("logging", "results_dir", "results", "folder of the runs' results and plots"),
    Setting("logging", "tensorboard_pairs", 8, "validation pairs whose similarity heatmap and "
            "retrieval examples TensorBoard shows at every validation (the same pairs each time, "
            "chosen with the seed); 0 = no pictures", valid="[0, 16]"),
    Setting("logging", "projector_pairs", 256, "validation pairs whose image and caption features "
            "TensorBoard's Embedding Projector shows, with thumbnails, written at the end; 0 = none",
            valid="[0, 10000]"),
    Setting("logging", "projector_every_validation", False, "write the projector at every "
            "validation too (each one is about 2 x projector_pairs x the embedding width x 20 bytes of text)"),
]
SETTINGS = {s.name: s for s in SCHEMA}
SECTIONS = list(dict.fromkeys(s.section for s in SCHEMA))

# Settings that decide the architecture: a resumed run must keep them.
ARCHITECTURE_SETTINGS = ("model_name", "loss", "context_length")


def default_config():
    """config.json's content: every setting's default, by section."""
    return {section: {s.name: s.default for s in SCHEMA if s.section == section}
            for section in SECTIONS}


def settings_markdown():
    """The README's table of train.py's settings, generated from the schema."""
    rows = ["| flag | section | default | valid | meaning |", "|---|---|---|---|---|"]
    for s in SCHEMA:
        flag = f"`--{s.name}` / `--no-{s.name}`" if isinstance(s.default, bool) else f"`--{s.name}`"
        valid = f"`{s.valid}`" if s.valid else " \\| ".join(s.choices) if s.choices else ""
        rows.append(f"| {flag} | {s.section} | `{json.dumps(s.default)}` | {valid} | {s.help} |")
    return "\n".join(rows)


def in_range(value, valid):
    """Whether a number lies in a range written as '>= 1', '> 0', '[0, 1)' or '(0, 1)'."""
    if valid.startswith((">=", ">")):
        bound = float(valid.lstrip(">= "))
        return value >= bound if valid.startswith(">=") else value > bound
    low, high = (float(x) for x in valid[1:-1].split(","))
    return (value >= low if valid[0] == "[" else value > low) and \
        (value <= high if valid[-1] == "]" else value < high)


# A run name becomes one folder in each of checkpoint_dir, log_dir and results_dir, so it must be a
# plain name: "..", "a/b" or an absolute path would write elsewhere (".." over the project's own
# config.json). Letters and digits of any script, and . _ - + = @; at most 128 characters.
FOLDER_NAME = re.compile(r"\w[\w.+=@-]{0,127}")


def check_folder_name(value, where):
    if value and not FOLDER_NAME.fullmatch(value):
        raise SettingsError(f"{where}: {value!r} is not a plain folder name; use letters, digits and "
                            f". _ - + = @ (not starting with '.'), at most 128 characters")
    return value


def check_value(name, value, where):
    """A setting's value checked against the schema: known name, type, choices, range."""
    setting = SETTINGS.get(name)
    if setting is None:
        raise SettingsError(f"{where}: unknown setting {name!r}. Known: {', '.join(SETTINGS)}")
    expected = type(setting.default)
    if expected is float and type(value) is int:
        value = float(value)
    if type(value) is not expected:
        raise SettingsError(f"{where}: {name} must be {expected.__name__}, got {value!r}")
    if setting.choices and value not in setting.choices:
        raise SettingsError(f"{where}: {name} must be one of {', '.join(setting.choices)}, got {value!r}")
    if setting.valid == "folder name":
        return check_folder_name(value, where)
    if setting.valid and not (math.isfinite(value) and in_range(value, setting.valid)):
        raise SettingsError(f"{where}: {name} must be {setting.valid}, got {value!r}")
    return value


def read_config_file(path):
    """Settings from a config file, by section, each key checked against the schema."""
    try:
        sections = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SettingsError(f"--config {path}: {error}") from None
    if not isinstance(sections, dict):
        raise SettingsError(f"{path}: expected sections {', '.join(SECTIONS)} as a JSON object")
    values = {}
    for section, settings in sections.items():
        if section not in SECTIONS or not isinstance(settings, dict):
            raise SettingsError(f"{path}: unknown section {section!r}; sections are {', '.join(SECTIONS)}")
        for name, value in settings.items():
            values[name] = check_value(name, value, f"{path}, section {section}")
            if SETTINGS[name].section != section:
                raise SettingsError(f"{path}: {name} belongs in section {SETTINGS[name].section!r}")
    return values


def build_parser():
    parser = argparse.ArgumentParser(
        description="Train CLIP. Settings come from the built-in defaults, then the config file, "
                    "then these flags.")
    parser.add_argument("--config", default="config.json", help="JSON file of settings by section")
    parser.add_argument("--print_config", action="store_true",
                        help="print the resolved settings as JSON and exit")
    for section in SECTIONS:
        group = parser.add_argument_group(section)
        for s in (s for s in SCHEMA if s.section == section):
            kind = type(s.default)
            extra = ({"action": argparse.BooleanOptionalAction} if kind is bool
                     else {"type": kind, "choices": s.choices, "metavar": kind.__name__.upper()})
            valid = f", valid: {s.valid}" if s.valid else ""
            # default=None marks "not given", so the config file's value survives
            group.add_argument(f"--{s.name}", default=None,
                               help=f"{s.help} (default: {s.default!r}{valid})".replace("%", "%%"),
                               **extra)
    return parser


def parse_config(argv=None):
    """Resolve settings: schema defaults, then the config file, then flags; each one checked."""
    args = build_parser().parse_args(argv)
    config = {s.name: s.default for s in SCHEMA}
    config_path = Path(args.config)
    if config_path.is_file():
        config.update(read_config_file(config_path))
    elif args.config != "config.json":
        raise SettingsError(f"--config {args.config}: file not found")
    for name, value in vars(args).items():
        if name in SETTINGS and value is not None:
            config[name] = check_value(name, value, f"--{name}")
    check_best_metric(config["best_metric"])
    if args.print_config:
        print(json.dumps(config, indent=2))
        raise SystemExit(0)
    return argparse.Namespace(**config)


# ----------------------------------------------------------------------------------------------
# Validation metrics that can pick best.pt: higher is better for all of them.

BEST_METRICS = ("rsum", "mean_recall") + tuple(
    f"{direction}/R@{k}" for direction in ("image_to_text", "text_to_image") for k in (1, 5, 10)) + (
    "zeroshot/top1", "zeroshot/top5", "zeroshot/mean_per_class_recall")
ZEROSHOT_METRICS = ("top1", "top5", "mean_per_class_recall")   # what validation keeps of zero-shot


def check_best_metric(name):
    if name not in BEST_METRICS:
        raise SettingsError(f"best_metric {name!r}: no such metric; use one of {', '.join(BEST_METRICS)}")


def metric_value(metrics, name):
    """A validation metric by path: 'rsum', 'image_to_text/R@1' or 'zeroshot/top1'."""
    check_best_metric(name)
    value = metrics if name.startswith("zeroshot/") else metrics["retrieval"]
    for key in name.split("/"):
        value = value[key]
    return value


# ----------------------------------------------------------------------------------------------
# The schedule and the optimiser's parameter groups

def cosine_with_warmup(total_steps, warmup_steps):
    """Learning-rate factor per step: linear warmup to 1, then cosine decay to 0.

    A warmup longer than the run is capped at the run's length, and every denominator is at
    least 1, so no combination of settings divides by zero.
    """
    warmup = min(warmup_steps, total_steps)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def warmup_for(total_steps, warmup_steps):
    """The warmup actually used: at most half the run, so that the other half can decay (a
    warmup as long as the run would end it at the peak rate). Returns (steps, warning or None)."""
    cap = total_steps // 2
    if warmup_steps <= cap:
        return warmup_steps, None
    return cap, (f"warmup_steps {warmup_steps} is more than half of this {total_steps}-step run: "
                 f"warming up for {cap} steps instead, so that the rate decays over the other half")


def parameter_groups(model, weight_decay):
    """AdamW groups by rule: tensors of fewer than 2 dimensions (biases, norm gains and offsets,
    the logit scale and bias) get no weight decay; shrinking them towards 0 has no regularising
    meaning and hurts (a LayerNorm gain of 0 switches its layer off)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------------------------
# One optimiser step

def backward_step(model, loss_fn, micro_batches, scaler, precision, device, distill=None):
    """Forward and backward for one optimiser step; returns the loss terms (loss_terms: tensors,
    not synced).

    One micro-batch: the plain CLIP step. Several: gradient accumulation that keeps every
    negative of the accumulated batch (Gao et al. 2021, "gradient caching"; as open_clip and
    Chinese-CLIP do). First every micro-batch's features are computed without gradient; then each
    micro-batch is recomputed with gradient and the loss is taken over all features, its own live
    and the others cached. The gradients of the micro-batches add up to the gradient of one big
    batch, at the memory cost of one micro-batch. The temperature gets its gradient only once
    (from the last micro-batch): every pass sees the same full loss, so counting it in each would
    multiply its gradient by the number of micro-batches. It is the last pass because under DDP
    that is the one that synchronises gradients, and DDP expects every parameter in it.

    "The gradient of one big batch" holds when the cached and the live pass compute the same
    features: it does not hold exactly with patch dropout (each pass drops other patches) or with
    BatchNorm in training mode (batch statistics of a micro-batch, and running statistics updated
    by both passes); LayerNorm towers (ViTs, the text transformer) are exact.

    With a teacher (distill, a Distillation), its features of every micro-batch are computed
    once, before the passes, and serve all of them: it is frozen, there is nothing to recompute.
    The distillation's feature map, like the temperature, gets its gradient in the last pass.
    """
    import torch

    from clip_model import autocast
    ids = torch.cat([b["image_ids"] for b in micro_batches]).to(device)
    teacher = distill.teacher_outputs(micro_batches, device, precision) if distill else None
    if len(micro_batches) == 1:
        batch = micro_batches[0]
        with autocast(device, precision):
            out = model(batch["images"], batch["texts"])
            terms = loss_terms(loss_fn, out, ids, distill, teacher)
        scaler.scale(terms["loss"]).backward()
        return {name: value.detach() for name, value in terms.items()}

    with torch.no_grad(), autocast(device, precision):
        cached = [model(b["images"], b["texts"]) for b in micro_batches]
    for j, batch in enumerate(micro_batches):
        last = j == len(micro_batches) - 1
        # DDP: synchronise gradients across processes only on the last backward
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(device, precision):
                out = model(batch["images"], batch["texts"])
                image_features = torch.cat([out["image_features"] if i == j else c["image_features"]
                                            for i, c in enumerate(cached)])
                text_features = torch.cat([out["text_features"] if i == j else c["text_features"]
                                           for i, c in enumerate(cached)])
                scale, bias = out["logit_scale"], out.get("logit_bias")
                if not last:
                    scale, bias = scale.detach(), bias.detach() if bias is not None else None
                whole = {"image_features": image_features, "text_features": text_features,
                         "logit_scale": scale, "logit_bias": bias}
                terms = loss_terms(loss_fn, whole, ids, distill, teacher, last)
            scaler.scale(terms["loss"]).backward()
    return {name: value.detach() for name, value in terms.items()}


def loss_terms(loss_fn, out, ids, distill=None, teacher=None, last=True):
    """The loss of the model's output `out`: {"loss": the contrastive loss}, or with a teacher
    {"loss": (1 - w) x contrastive + w x distillation, "contrastive": ..., "distillation": ...},
    w = --distill_weight. `last`: the pass that trains the distillation's feature map."""
    contrastive = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], ids,
                          out.get("logit_bias"))
    if distill is None:
        return {"loss": contrastive}
    distill_term = distill.loss_fn(out, teacher, train_map=last)
    return {"loss": (1 - distill.weight) * contrastive + distill.weight * distill_term,
            "contrastive": contrastive, "distillation": distill_term}


@dataclass
class StepResult:
    loss: object          # tensor: the loss of the step (not synced)
    grad_norm: object     # tensor: the global gradient norm before clipping
    finite: bool          # False: the update was skipped
    terms: dict = field(default_factory=dict)   # the loss's parts, when it has several


def optimizer_step(job, micro_batches):
    """One optimiser step: backward, unscale, clip, finiteness check, step, schedule, clamp."""
    import torch

    import clip_model
    terms = backward_step(job.model, job.loss_fn, micro_batches, job.scaler, job.run.precision,
                          job.run.device, job.distill)
    loss = terms.pop("loss")
    job.scaler.unscale_(job.optimizer)
    clip = job.cfg.grad_clip_norm if job.cfg.grad_clip_norm > 0 else float("inf")
    trained = [param for group in job.optimizer.param_groups for param in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(trained, clip)
    # One host-device sync per step: the price of never applying a non-finite update. With amp
    # an infinite gradient is the loss scaler's business (it skips and retries with a smaller
    # scale); only a non-finite loss counts as a bad step.
    finite = bool(torch.isfinite(loss)) and (job.run.precision == "amp" or bool(torch.isfinite(grad_norm)))
    if finite:
        job.scaler.step(job.optimizer)
    job.scaler.update()
    job.optimizer.zero_grad(set_to_none=True)
    job.scheduler.step()
    clip_model.clamp_logit_scale(job.raw_model)
    if finite and job.ema is not None:
        job.ema.update_parameters(job.raw_model)
    return StepResult(loss, grad_norm, finite, terms)


def build_ema(cfg, model):
    """An exponential moving average of the weights (and buffers), or None when ema_decay is 0.

    Averaging the weights of the last few hundred steps smooths out the noise of single steps:
    the average often scores better than the weights themselves, above all late in a short run
    or in fine-tuning. After n updates the decay is min(ema_decay, (1 + n) / (10 + n)): early on
    the average follows the weights closely instead of remembering the random initial ones (as
    TensorFlow's ExponentialMovingAverage with num_updates does). torch's AveragedModel keeps
    the copy on the model's device.
    """
    if not cfg.ema_decay:
        return None
    import torch
    from torch.optim.swa_utils import AveragedModel

    @torch.no_grad()
    def update(averages, weights, updates):
        decay = min(cfg.ema_decay, (1 + int(updates)) / (10 + int(updates)))
        if averages[0].is_floating_point():
            torch._foreach_lerp_(averages, weights, 1 - decay)
        else:                             # integer buffers (BatchNorm's step counter): the latest
            torch._foreach_copy_(averages, weights)
    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)


# ----------------------------------------------------------------------------------------------
# What a run is made of

@dataclass
class TrainState:
    """Where training stands: what a checkpoint saves beside the weights and optimiser, and all
    that a resumed run restores."""
    step: int = 0
    epoch: int = 0
    samples_in_epoch: int = 0         # consumed by all processes together in this epoch
    best: dict = field(default_factory=lambda: {"metric": None, "value": None, "step": None, "weights": None})
    history: dict = field(default_factory=lambda: {"train": [], "val": []})
    evals_without_gain: int = 0
    bad_steps: int = 0                # non-finite losses in a row
    unreadable: list = field(default_factory=list)   # messages of the images skipped, once each
    epoch_order: tuple = None         # (epoch, order) of hard-negative batches (hard_negatives)

    @classmethod
    def from_checkpoint(cls, checkpoint):
        return cls(**{f.name: checkpoint[f.name] for f in fields(cls) if f.name in checkpoint})


@dataclass
class Run:
    """The processes, device and folders of a run, and where it reports."""
    name: str
    device: object
    precision: str
    rank: int
    world_size: int
    checkpoint_dir: Path
    log_dir: Path
    results_dir: Path
    log: logging.Logger
    writer: object = None              # TensorBoard SummaryWriter, rank 0 only
    lock: object = None                # the run folder's lock, rank 0 only

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


@dataclass
class Timing:
    """Where a run's time went, in seconds: what main() reports, for benchmarks among others."""
    startup_s: float = 0.0        # from main() to the first step: data, model, cache, resume
    loop_s: float = 0.0           # the loop: steps, validations, checkpoints, epoch boundaries
    validation_s: float = 0.0
    data_wait_s: float = 0.0      # waiting for the next batch
    checkpoint_s: float = 0.0
    mining_s: float = 0.0         # hard-negative mining
    tensorboard_s: float = 0.0    # TensorBoard's pictures at validations (a part of validation_s)
    tensorboard_end_s: float = 0.0  # TensorBoard's projector and HParams at the end
    samples: int = 0              # trained, by all processes together

    @property
    def train_samples_per_s(self):
        return self.samples / max(1e-9, self.loop_s - self.validation_s)


@dataclass
class Job:
    """Everything the loop works with, built once by main()."""
    cfg: argparse.Namespace
    run: Run
    setup: object                      # clip_model.ClipSetup of the bare model
    model: object                      # the model as trained: wrapped by DDP / torch.compile
    loss_fn: object
    optimizer: object
    scheduler: object
    scaler: object
    loader: object                     # data_loader.EpochLoader: batches of an epoch, resumable
    val_index: object
    steps_per_epoch: int
    total_steps: int
    global_batch: int
    ema: object = None                 # AveragedModel of the weights (ema_decay > 0), else None
    views: object = None               # tensorboard_views.Views, rank 0 only
    timing: Timing = field(default_factory=Timing)
    distill: object = None             # Distillation: the teacher and its term; None without

    @property
    def raw_model(self):
        return self.setup.model


# ----------------------------------------------------------------------------------------------
# Training

def main(argv=None):
    """Train CLIP; returns the run's summary (its folders, step, best, history and timings)."""
    started = time.perf_counter()
    cfg = parse_config(argv)
    tune_openmp(cfg)
    tune_malloc()
    run = start_run(cfg)
    try:
        import torch
        torch.manual_seed(cfg.seed)
        train_index, val_index = load_data(cfg, run)
        setup, model, loss_fn = build_model(cfg, run)
        distill = distillation.build_distillation(cfg, run, setup)
        loader, train_index, steps_per_epoch, global_batch = build_loader(cfg, run, setup, train_index,
                                                                          distill)
        if distill and cfg.distill_cache:
            distillation.cache_teacher_features(cfg, run, distill, loader.dataset)
        total_steps = cfg.max_steps or cfg.num_epochs * steps_per_epoch
        optimizer, scheduler, scaler = build_optimizer(cfg, run, model, total_steps, distill)
        job = Job(cfg, run, setup, model, loss_fn, optimizer, scheduler, scaler, loader, val_index,
                  steps_per_epoch, total_steps, global_batch, ema=build_ema(cfg, setup.model),
                  distill=distill)
        state = resume(job, train_index)
        job.views = start_views(job, train_index, state)
        job.timing.startup_s = time.perf_counter() - started
        stop_reason = train(job, state)
        return finish(job, state, stop_reason)
    finally:
        close_run(run)


def tune_openmp(cfg):
    """How long the model's OpenMP threads spin, on a CPU, before they sleep.

    After each parallel region GNU OpenMP's threads spin for ~300,000 rounds before they sleep:
    the fastest when the model has the cores to itself, as it does when batches are built from
    the image cache in this process (the default; 0-8% faster than spinning briefly on idle
    cores, bench_data.py's thread table, and measured ~10% faster in train.py itself). Beside busy
    DataLoader workers, which read and decode images in every epoch when the images are not
    cached, the spinning holds the cores the workers need: two threads beside one busy process
    keep 0.32 of their idle speed, or 0.59 with 1000 rounds (bench/bench_data.py's thread table
    in bench/README.md). OpenMP reads the setting once, when torch loads it, so this runs before
    torch is imported; a value of the user's own wins. (Shards and images too large to cache are
    known only later: build_loader says what to set then.)"""
    if cfg.num_workers and not cfg.cache_images:
        os.environ.setdefault("GOMP_SPINCOUNT", "1000")


# glibc's mallopt parameters
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 << 20    # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit systems
KEEP_FREED = 1 << 30


def tune_malloc():
    """Keep the memory a training step frees for the next step (glibc's malloc only).

    A step allocates and frees the same activation buffers every time. By default glibc serves
    large blocks with fresh pages from the kernel (mmap, under an adaptive threshold) and gives
    the top of its heap back to the kernel once more than twice that threshold is free, so every
    step faults its buffers in again and the kernel zeroes each page: ~50,000 page faults a step
    in train.py on a CPU (tiny-vit-64, batch 128; 200 MB zeroed), about a tenth of the step.
    Fixed thresholds -- blocks up to 32 MiB from the heap, up to 1 GiB of free heap kept --
    leave the buffers in place for the next step (a few hundred faults a step): train.py went
    from 0.89 to 1.01 of the bare loop's samples/s (bench/bench_peer.py), its peak memory up
    ~90 MiB (of 1.5 GiB). A setting of the user's own (MALLOC_*_ or GLIBC_TUNABLES in the
    environment) wins; without glibc (macOS, musl) nothing changes."""
    if any(name.startswith("MALLOC_") or name == "GLIBC_TUNABLES" for name in os.environ):
        return
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREED)
    except (OSError, AttributeError):
        pass


def train(job, state):
    """The loop: epochs until the run is done or stopped. Returns why it stopped early, or None.

    Any error after the first step saves last.pt (if the weights are finite) before it is
    reported: no error loses the steps already trained.
    """
    run, cfg = job.run, job.cfg
    run.log.info(f"training {job.total_steps} steps ({job.steps_per_epoch} per epoch) with a global "
                 f"batch of {job.global_batch}")
    started, stop_reason = time.perf_counter(), None
    stop = StopRequest()
    try:
        while state.step < job.total_steps and stop_reason is None:
            stop_reason = train_one_epoch(job, state, stop)
            if stop_reason is None and state.step < job.total_steps:
                state.epoch, state.samples_in_epoch = state.epoch + 1, 0
                if not cfg.eval_every:
                    stop_reason = validate(job, state)
        if state.step >= job.total_steps and (not state.history["val"] or
                                              state.history["val"][-1]["step"] != state.step):
            validate(job, state)
    except Exception as error:
        if state.step > 0:
            save_last(job, state, after_error=error)
        raise
    finally:
        stop.restore()
    save_last(job, state)
    job.timing.loop_s = time.perf_counter() - started
    return stop_reason


def train_one_epoch(job, state, stop):
    """Steps through (the rest of) one epoch; returns why the run must stop, or None."""
    from tqdm import tqdm
    run, cfg = job.run, job.cfg
    job.loader.set_epoch(state.epoch, start=state.samples_in_epoch, order=epoch_order(job, state))
    batches = iter(job.loader)
    progress = tqdm(total=job.steps_per_epoch, initial=state.samples_in_epoch // job.global_batch,
                    desc=f"epoch {state.epoch}", disable=not run.is_main, dynamic_ncols=True)
    window = Window(run.device)
    job.model.train()
    try:
        while state.step < job.total_steps:
            waited = time.perf_counter()
            micro_batches = next_micro_batches(job, state, batches)
            window.wait += time.perf_counter() - waited
            job.timing.data_wait_s += time.perf_counter() - waited
            if micro_batches is None:
                return None                                        # the end of the epoch
            result = optimizer_step(job, micro_batches)
            count_step(job, state, result, window)
            job.timing.samples += job.global_batch
            progress.update(1)
            if state.step % cfg.log_every == 0 or state.step == job.total_steps:
                log_train(job, state, result, window, progress)
            reason = after_step(job, state, result, stop)
            if reason:
                return reason
    finally:
        progress.close()
    return None


def epoch_order(job, state):
    """The epoch's order with hard-negative batches (hard_negatives > 0), or None for the
    sampler's own random order. Mined on rank 0 at the start of the epoch and sent to every rank,
    so that all compose the same global batches; kept in the TrainState, so that a run resumed
    mid-epoch continues the same order (the weights it was mined with are gone by then)."""
    if not job.cfg.hard_negatives:
        return None
    if state.epoch_order is None or state.epoch_order[0] != state.epoch:
        import torch
        order = torch.empty(len(job.loader.dataset) // job.global_batch * job.global_batch, dtype=torch.long)
        if job.run.is_main:
            order[:] = torch.from_numpy(mine_hard_batches(job, state.epoch))
        if job.run.distributed:
            import torch.distributed as dist
            dist.broadcast(order, src=0)
        state.epoch_order = (state.epoch, order)
    return state.epoch_order[1]


HARD_NEIGHBOURS = 3     # a hard group: an item and its 3 nearest neighbours


def mine_hard_batches(job, epoch):
    """Embed the caption every training item shows this epoch with the current weights, find
    each one's nearest neighbours, and order the epoch into hard-negative batches
    (data_loader.neighbourhood_order). Its cost is logged and counted in the timing."""
    import numpy as np

    import clip_model
    import data_loader
    import evaluation
    started = time.perf_counter()
    dataset = job.loader.dataset
    captions = dataset.captions_shown(epoch)
    features = clip_model.encode_texts(job.raw_model, job.setup.tokenizer, captions, job.run.device,
                                       precision=job.run.precision)
    job.model.train()
    neighbours = evaluation.nearest_neighbours(features, HARD_NEIGHBOURS, seed=job.cfg.seed + epoch).numpy()
    images = dataset.images_and_captions(np.arange(len(dataset)))[0]
    order = data_loader.neighbourhood_order(neighbours, captions, images, job.global_batch, job.cfg.hard_negatives,
                                            np.random.default_rng((job.cfg.seed, epoch)))
    elapsed = time.perf_counter() - started
    job.timing.mining_s += elapsed
    job.run.log.info(f"epoch {epoch}: hard-negative batches mined from {len(captions)} captions in "
                     f"{elapsed:.1f}s")
    return order


def next_micro_batches(job, state, batches):
    """The micro-batches of the next step, on the device, their uint8 images normalised there
    (augmentation.TrainAugmentation.normalise: the student's, and the teacher's for its view);
    None at the end of the epoch. Unreadable images are counted, and named the first time
    (strict_data: DataError)."""
    micro_batches = []
    normalise = {"images": job.loader.dataset.augmentation.normalise}
    if job.distill:                                  # (its images are in batches unless cached)
        normalise["teacher_images"] = job.distill.view.augmentation.normalise
    for batch in batches:
        report_unreadable(job, state, batch["failed"])
        if len(batch["image_ids"]) == 0:
            continue
        batch = {k: v.to(job.run.device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}
        micro_batches.append({**batch, **{k: f(batch[k]) for k, f in normalise.items() if k in batch}})
        if len(micro_batches) == job.cfg.accum_steps:
            return micro_batches
    return None


def report_unreadable(job, state, messages):
    new = [m for m in messages if m not in state.unreadable]
    if new and job.cfg.strict_data:
        raise DataError(f"{new[0]} (--strict_data stops at the first unreadable image)")
    for message in new:
        state.unreadable.append(message)
        if len(state.unreadable) <= 5:
            job.run.log.warning(f"skipped unreadable image: {message}")


class Window:
    """Sums over the steps between two log lines."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        import torch
        self.loss, self.steps, self.samples, self.wait = torch.zeros((), device=self.device), 0, 0, 0.0
        self.terms = {}                       # sums of the loss's parts (StepResult.terms)
        self.start = time.perf_counter()


def count_step(job, state, result, window):
    state.step += 1
    state.samples_in_epoch += job.global_batch
    window.samples += job.global_batch
    if result.finite:
        state.bad_steps = 0
        window.loss += result.loss
        for name, value in result.terms.items():
            window.terms[name] = window.terms.get(name, 0) + value
        window.steps += 1
    else:
        state.bad_steps += 1
        job.run.log.warning(f"step {state.step - 1}: non-finite loss or gradient, update skipped "
                            f"({state.bad_steps} in a row)")
        if job.run.writer:
            job.run.writer.add_scalar("train/skipped_step", 1, state.step - 1)


def log_train(job, state, result, window, progress):
    """A point of the training curves: history, TensorBoard and the progress bar; resets window."""
    elapsed = time.perf_counter() - window.start
    entry = {"step": state.step, "epoch": state.epoch,
             "loss": (window.loss / max(1, window.steps)).item(),
             **{name: (total / max(1, window.steps)).item() for name, total in window.terms.items()},
             "lr": job.scheduler.get_last_lr()[0],
             "logit_scale": job.raw_model.logit_scale.exp().item(),
             "grad_norm": result.grad_norm.item(),
             "samples_per_s": window.samples / elapsed,
             "data_wait": window.wait / elapsed}
    state.history["train"].append(entry)
    if job.run.writer:
        for key, value in entry.items():
            if key not in ("step", "epoch"):
                job.run.writer.add_scalar(f"train/{key}", value, state.step)
    parts = {name: f"{entry[name]:.3f}" for name in window.terms}
    progress.set_postfix(loss=f"{entry['loss']:.3f}", **parts, lr=f"{entry['lr']:.1e}",
                         scale=f"{entry['logit_scale']:.1f}", sps=f"{entry['samples_per_s']:.0f}")
    window.reset()


def after_step(job, state, result, stop):
    """Validation, checkpoint and the stop decisions that follow a step; returns why to stop."""
    cfg = job.cfg
    if state.bad_steps >= cfg.max_bad_steps:
        return f"{state.bad_steps} non-finite losses in a row"
    reason = None
    if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < job.total_steps:
        reason = validate(job, state)
    if state.step % cfg.save_every == 0:
        save_last(job, state)
    if agree(job.run, stop.reason is not None):
        reason = f"{stop.reason or 'signal'} received"
    elif cfg.stop_at_step and state.step >= cfg.stop_at_step:
        reason = reason or f"stop_at_step {cfg.stop_at_step} reached"
    return reason


def validate(job, state):
    """Retrieval metrics on the validation set (and zero-shot accuracy with val_zeroshot), of the
    weights and of their moving average (ema_decay), computed once, on rank 0. Saves best.pt when
    either beats the best so far. Returns the early-stopping reason, or None."""
    import evaluation
    run, cfg = job.run, job.cfg
    stop = None
    if run.is_main:
        started = time.perf_counter()
        metrics = evaluate_weights(job, job.setup)
        if job.ema is not None:
            metrics["ema"] = evaluate_weights(job, ema_setup(job))
        improved = record_validation(job, state, metrics)
        show_validation(job, state)
        job.model.train()
        elapsed = time.perf_counter() - started
        job.timing.validation_s += elapsed
        for name, part in (("", metrics), (" EMA", metrics.get("ema"))):
            if part is not None:
                run.log.info(f"step {state.step} validation{name} ({elapsed:.1f}s): "
                             f"{evaluation.recall_summary(part)}, {cfg.best_metric} "
                             f"{metric_value(part, cfg.best_metric):.2f}")
        if improved:
            run.log.info(f"new best {cfg.best_metric} {state.best['value']:.2f} "
                         f"({state.best['weights']} weights)")
            save_best(job, state, metrics)       # the weights first: a results file can wait
        write_results(job, state)
        if cfg.early_stopping_patience and state.evals_without_gain >= cfg.early_stopping_patience:
            stop = f"no gain in {cfg.best_metric} for {cfg.early_stopping_patience} validations"
    return stop if agree(run, stop is not None) else None


def evaluate_weights(job, setup):
    """The validation metrics of one set of weights: retrieval, and zero-shot with val_zeroshot."""
    import evaluation
    cfg, run = job.cfg, job.run
    options = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=run.device,
                   precision=run.precision, strict=cfg.strict_data)
    metrics = evaluation.evaluate_model(setup, job.val_index, **options)
    if cfg.val_zeroshot:
        zeroshot = evaluation.evaluate_zeroshot(setup, cfg.val_zeroshot, **options)
        metrics["zeroshot"] = {key: zeroshot[key] for key in ZEROSHOT_METRICS}
    return metrics


def start_views(job, train_index, state):
    """TensorBoard's views beyond the scalars (rank 0): the settings, data and HParams now,
    pictures at each validation, the projector at the end. tensorboard_views.py sits above
    train.py (it draws with visualization.py), so it is imported here, when the run starts."""
    if job.run.writer is None:
        return None
    import tensorboard_views
    return tensorboard_views.Views.start(job, train_index, state, SCHEMA)


def show_validation(job, state):
    """TensorBoard's pictures of this validation, timed apart (they are a part of validation_s)."""
    if job.views is not None:
        started = time.perf_counter()
        job.views.validation(job, state)
        job.timing.tensorboard_s += time.perf_counter() - started


def ema_setup(job):
    """The ClipSetup of the moving average of the weights."""
    import clip_model
    return clip_model.ClipSetup(job.ema.module, job.setup.tokenizer, job.setup.preprocess_cfg,
                                job.setup.model_name, job.setup.model_config)


def record_validation(job, state, metrics):
    """Add a validation to the history and TensorBoard; returns whether it is a new best (of the
    weights or of their average)."""
    import evaluation
    state.history["val"].append({"step": state.step, "epoch": state.epoch, **metrics})
    if job.run.writer:
        for name, value in evaluation.flatten_metrics(metrics).items():
            job.run.writer.add_scalar(name, value, state.step)
    if len(state.history["val"]) == 1 and metrics["skipped_images"]["count"]:
        job.run.log.warning(f"validation skips {metrics['skipped_images']['count']} unreadable "
                            f"images: {'; '.join(metrics['skipped_images']['first'])}")
    candidates = [("raw", metric_value(metrics, job.cfg.best_metric))]
    if "ema" in metrics:
        candidates.append(("ema", metric_value(metrics["ema"], job.cfg.best_metric)))
    weights, value = max(candidates, key=lambda candidate: candidate[1])
    improved = state.best["value"] is None or value > state.best["value"]
    if improved:
        state.best.update(metric=job.cfg.best_metric, value=value, step=state.step, weights=weights)
        state.evals_without_gain = 0
    else:
        state.evals_without_gain += 1
    return improved


def agree(run, flag):
    """Every process takes rank 0's decision (to stop, for instance)."""
    if not run.distributed:
        return flag
    import torch
    import torch.distributed as dist
    decision = torch.tensor([int(flag)], device=run.device if run.device.type == "cuda" else "cpu")
    dist.broadcast(decision, src=0)
    return bool(decision.item())


# ----------------------------------------------------------------------------------------------
# Checkpoints and results

def weights_are_finite(model):
    import torch
    return all(torch.isfinite(w).all() for w in model.state_dict().values() if w.is_floating_point())


def save_last(job, state, after_error=None):
    """last.pt: everything a resumed run needs. Never written from non-finite weights; after an
    error it is attempted once and its own failure is logged, not raised over the first error."""
    import clip_model
    run = job.run
    if not run.is_main:
        return
    if not weights_are_finite(job.raw_model):
        run.log.error(f"weights are not finite at step {state.step}: last.pt NOT written, the "
                      f"previous file is kept")
        return
    started = time.perf_counter()
    try:
        clip_model.save_checkpoint(
            run.checkpoint_dir / "last.pt", job.setup, **asdict(state),
            optimizer=job.optimizer.state_dict(), scheduler=job.scheduler.state_dict(),
            scaler=job.scaler.state_dict(), rng=clip_model.rng_state(), config=vars(job.cfg),
            ema=job.ema.state_dict() if job.ema is not None else None,
            distillation=job.distill.loss_fn.state_dict() if job.distill else {})  # never the teacher
    except Exception as error:
        if after_error is None:
            raise
        run.log.error(f"last.pt could not be written after the error: {error}")
        return
    job.timing.checkpoint_s += time.perf_counter() - started
    if after_error is not None:
        run.log.error(f"error at step {state.step} ({type(after_error).__name__}: {after_error}); "
                      f"last.pt saved: continue with {resume_command(job)}")


def save_best(job, state, metrics):
    """best.pt: the weights that scored best (the weights or their moving average: `best` says
    which), with their config and metrics; no optimiser state (nothing that reads best.pt needs
    it, and it is twice the size of the weights)."""
    import clip_model
    started = time.perf_counter()
    if state.best["weights"] == "ema":
        setup, metrics = ema_setup(job), metrics["ema"]
    else:
        setup, metrics = job.setup, {k: v for k, v in metrics.items() if k != "ema"}
    if weights_are_finite(setup.model):
        clip_model.save_checkpoint(job.run.checkpoint_dir / "best.pt", setup, step=state.step,
                                   epoch=state.epoch, best=state.best, metrics=metrics,
                                   config=vars(job.cfg))
    job.timing.checkpoint_s += time.perf_counter() - started


def write_results(job, state):
    """results/<run>/training_results.json: settings, history, best, and the unreadable images."""
    import evaluation
    results = {"config": vars(job.cfg), "history": state.history,
               "final": state.history["val"][-1] if state.history["val"] else None,
               "best": state.best, "checkpoint": str(job.run.checkpoint_dir / "best.pt"),
               "unreadable_images": evaluation.skipped_summary(state.unreadable)}
    evaluation.write_json(job.run.results_dir / "training_results.json", results)
    return results


def resume_command(job):
    return f"python train.py --run_name {job.run.name} --resume auto (with the same settings)"


def finish(job, state, stop_reason):
    """The end: the last results and curves, a summary line, and what the run measured."""
    run = job.run
    if state.unreadable:
        run.log.warning(f"{len(state.unreadable)} unreadable images were skipped in total")
    if stop_reason and "non-finite" in stop_reason:
        raise TrainingError(f"stopped at step {state.step}: {stop_reason}. Lower --learning_rate, "
                            f"check the data, or try --precision fp32; "
                            f"{run.checkpoint_dir / 'last.pt'} holds the last finite weights")
    finished = state.step >= job.total_steps
    if run.is_main:
        results = write_results(job, state)
        plot_curves(results, run.results_dir / "training_curves.png", run.log)
        if job.views is not None:
            started = time.perf_counter()
            job.views.end(job, state)
            job.timing.tensorboard_end_s = time.perf_counter() - started
        run.log.info(f"{'finished' if finished else 'stopped: ' + stop_reason} at step {state.step}; "
                     f"best {job.cfg.best_metric} {state.best['value']} at step {state.best['step']}; "
                     f"checkpoints in {run.checkpoint_dir}, TensorBoard: tensorboard --logdir "
                     f"{job.cfg.log_dir}")
        if not finished:
            run.log.info(f"continue with: {resume_command(job)}")
    return {"run_name": run.name, "step": state.step, "best": state.best, "history": state.history,
            "checkpoint_dir": run.checkpoint_dir, "results_dir": run.results_dir,
            "log_dir": run.log_dir, "stop_reason": stop_reason,
            "timing": {**asdict(job.timing), "train_samples_per_s": job.timing.train_samples_per_s}}


def plot_curves(results, path, log):
    # visualization.py sits above train.py; it is imported only here, at the very end.
    from visualization import plot_training_curves, save_figure
    save_figure(plot_training_curves(results), path)
    log.info(f"training curves: {path}")


# ----------------------------------------------------------------------------------------------
# The steps main() takes before the loop

def start_run(cfg):
    """Processes, device and precision, the run's name, folders, lock and log.

    Everything that can be known to be wrong before the data and model are loaded is checked
    here: the device, the precision, the paths given, the distillation settings, the output folders.
    """
    import clip_model
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = clip_model.pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    precision = clip_model.pick_precision(cfg.precision, device)
    check_paths(cfg)
    distillation.check_distillation(cfg)
    if distributed:
        init_distributed(device)
    rank, world_size = clip_model.world_info()
    name = run_name(cfg, distributed)
    folders = [Path(cfg.checkpoint_dir) / name, Path(cfg.log_dir) / name, Path(cfg.results_dir) / name]
    lock = prepare_folders(cfg, folders) if rank == 0 else None
    log = setup_logging(folders[1] / "train.log", rank == 0)
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(folders[1]))
    log.info(f"run {name}: device {device}, precision {precision}, {world_size} process(es)")
    return Run(name, device, precision, rank, world_size, *folders, log=log, writer=writer, lock=lock)


def check_paths(cfg):
    """The input paths given exist (the default data set is generated on first use)."""
    import shards
    for name in ("data_dir", "val_data"):
        value = getattr(cfg, name)
        if value and value != DEFAULT_DATA_DIR and not shards.is_webdataset(value) and not Path(value).exists():
            raise SettingsError(f"{name} {value}: no such file or folder")
    if cfg.val_zeroshot and not Path(cfg.val_zeroshot).is_dir():
        raise SettingsError(f"val_zeroshot {cfg.val_zeroshot}: no such folder (one folder of images per class)")
    if cfg.best_metric.startswith("zeroshot/") and not cfg.val_zeroshot:
        raise SettingsError(f"best_metric {cfg.best_metric} needs --val_zeroshot DIR")
    if cfg.resume not in ("", "auto") and not Path(cfg.resume).is_file():
        raise SettingsError(f"resume {cfg.resume}: no such checkpoint file (or use --resume auto)")
    if looks_like_a_file(cfg.pretrained) and not Path(cfg.pretrained).is_file():
        raise SettingsError(f"pretrained {cfg.pretrained}: no such weights file")
    # a teacher's path that is not there reads as a model name; its weights' path matters only
    # then (distillation.check_distillation says what does not fit together)
    if cfg.distill_from and distillation.teacher_kind(cfg.distill_from) == "name":
        if looks_like_a_file(cfg.distill_from) and not Path(cfg.distill_from).exists():
            raise SettingsError(f"distill_from {cfg.distill_from}: no such checkpoint, model folder or "
                                f"config file")
        if looks_like_a_file(cfg.distill_pretrained) and not Path(cfg.distill_pretrained).is_file():
            raise SettingsError(f"distill_pretrained {cfg.distill_pretrained}: no such weights file")


def looks_like_a_file(value):
    """Whether a setting that takes a name or a path (a pretrained tag or a weights file, a model
    name or a checkpoint) was given a path."""
    return os.sep in value or value.endswith((".pt", ".pth", ".bin", ".safetensors"))


def init_distributed(device):
    import torch
    import torch.distributed as dist
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # Validation runs on rank 0 while the others wait: allow it more than the default timeout.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(hours=2))


def run_name(cfg, distributed):
    model = re.sub(r"[^\w.+=@-]", "-", Path(cfg.model_name).stem).lstrip(".") or "run"
    name = [cfg.run_name or f"{model}-{time.strftime('%Y%m%d-%H%M%S')}"]
    if distributed:
        import torch.distributed as dist
        dist.broadcast_object_list(name, src=0)        # every rank uses rank 0's timestamp
    return name[0]


def prepare_folders(cfg, folders):
    """Create the run's folders, take the run's lock, refuse to overwrite a finished or running
    run, and write the settings into each folder. Returns the lock (held until the run ends)."""
    checkpoint_dir = folders[0]
    for folder, setting in zip(folders, ("checkpoint_dir", "log_dir", "results_dir")):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(f"cannot create {folder} ({error.strerror}); choose another "
                              f"--{setting}") from None
    lock = lock_run_folder(checkpoint_dir)
    for stale in checkpoint_dir.glob(".*.tmp"):        # left by a run killed while saving
        stale.unlink()
    if not cfg.resume and (checkpoint_dir / "last.pt").exists():
        raise OutputError(f"{checkpoint_dir / 'last.pt'} exists: continue that run with --resume "
                          f"auto, or pick another --run_name")
    for folder, setting in zip(folders, ("checkpoint_dir", "log_dir", "results_dir")):
        try:
            (folder / "config.json").write_text(json.dumps(vars(cfg), indent=2))
        except OSError as error:
            reason = disk_full_message(error, folder) if is_disk_full(error) else \
                f"{folder} is not writable ({error.strerror}); choose another --{setting}"
            raise OutputError(reason) from None
    return lock


def lock_run_folder(folder):
    """Hold an exclusive lock on the run's checkpoint folder while the run lives, so that a second
    run with the same name is refused instead of mixing its files with this one's. The kernel
    releases the lock when the process ends, however it ends: a killed run leaves no stale lock."""
    import fcntl
    handle = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(handle)
        raise OutputError(f"run folder {folder} is in use by another running train.py; wait for it "
                          f"to end, or choose another --run_name") from None
    return handle


def close_run(run):
    if run.writer:
        run.writer.close()
    if run.lock is not None:
        os.close(run.lock)                               # releases the lock
    if run.distributed:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def setup_logging(log_file, is_main):
    """Our own logger (open_clip logs chatty INFO lines to the root logger); only rank 0 writes
    the log file, other ranks print warnings only."""
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stdout)]
    if is_main:
        handlers.append(logging.FileHandler(log_file))
    log = logging.getLogger("train")
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    for handler in handlers:
        handler.setFormatter(formatter)
        log.addHandler(handler)
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False
    return log


class StopRequest:
    """Turns SIGTERM and Ctrl-C into a flag the loop checks after each step, so the run saves
    last.pt and exits cleanly instead of dying mid-update. DataLoader workers run in process
    groups of their own (data_loader._init_worker), so a signal to the whole process group, as
    schedulers and `timeout` send, reaches this process alone. A second signal aborts at once."""

    def __init__(self):
        self.reason = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if self.reason is not None:          # a second Ctrl-C: stop right now
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def load_data(cfg, run):
    """The training index (None when streaming shards) and the validation index."""
    import data_loader
    import sample_data
    import shards
    if cfg.data_dir == DEFAULT_DATA_DIR and not Path(cfg.data_dir).exists():
        if run.is_main:
            run.log.info(f"{cfg.data_dir} not found: generating the sample data set there")
            sample_data.create_sample_dataset(cfg.data_dir, num_samples=2000, seed=0)
        if run.distributed:
            import torch.distributed as dist
            dist.barrier()
    read = dict(image_column=cfg.image_column, caption_column=cfg.caption_column, strict=cfg.strict_data)
    # WebDataset shards (a brace pattern, .tar or folder of shards) are streamed, not indexed,
    # so they cannot be split into training and validation images.
    streamed = shards.is_webdataset(cfg.data_dir)
    if streamed and not cfg.val_data:
        raise SettingsError(f"data_dir {cfg.data_dir} is a set of WebDataset shards, which are "
                            f"streamed and cannot be split: give --val_data (any format data_loader "
                            f"reads)")
    if streamed and cfg.hard_negatives:
        raise SettingsError("hard_negatives composes batches from an index of the whole data set; "
                            "WebDataset shards are streamed: use an index (JSON, CSV, ...) for it")
    if not streamed and (cfg.train_num_samples or cfg.data_weights or cfg.data_resampled):
        raise SettingsError(f"train_num_samples, data_weights and data_resampled apply to WebDataset "
                            f"shards; data_dir {cfg.data_dir} is read whole, one sample per image per "
                            f"epoch")
    train_index = None if streamed else data_loader.load_caption_index(cfg.data_dir, split=cfg.split, **read)
    if cfg.val_data:
        val_index = data_loader.load_caption_index(cfg.val_data, split="valid", **read)
    else:
        train_index, val_index = data_loader.split_by_image(train_index, cfg.val_fraction, cfg.seed)
    for index in (train_index, val_index):
        for message in (index.skipped if index else [])[:5]:
            run.log.warning(f"skipped missing image: {message}")
        if index and len(index.skipped) > 5:
            run.log.warning(f"... {len(index.skipped)} images of {index.source} are missing in all")
    training = (f"WebDataset shards {cfg.data_dir}" if streamed else
                f"{train_index.num_images} training images ({train_index.num_captions} captions)")
    run.log.info(f"data: {training}, {val_index.num_images} validation images "
                 f"({val_index.num_captions} captions)")
    return train_index, val_index


def build_model(cfg, run):
    """The model with its trainable parts chosen, wrapped for compile and DDP; and the loss."""
    import torch

    import clip_model
    setup = clip_model.build_model(cfg.model_name, cfg.pretrained, device=run.device, loss=cfg.loss,
                                   patch_dropout=cfg.patch_dropout,
                                   grad_checkpointing=cfg.grad_checkpointing,
                                   context_length=cfg.context_length)
    clip_model.freeze_for_finetuning(setup.model, cfg.freeze_backbone, cfg.lock_image, cfg.lock_text)
    run.log.info(f"model {setup.model_name}: {clip_model.count_parameters(setup.model) / 1e6:.1f}M "
                 f"parameters, {clip_model.count_parameters(setup.model, True) / 1e6:.1f}M trainable")
    model = torch.compile(setup.model) if cfg.compile else setup.model
    if run.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[run.device] if run.device.type == "cuda" else None)
    return setup, model, clip_model.create_loss(cfg.loss, local_loss=cfg.local_loss)


def build_loader(cfg, run, setup, train_index, distill=None):
    """The training batches, the training index (without the images found unreadable), and the
    steps of an epoch at the global batch size. The images of an index are decoded once into an
    ImageCache and its captions tokenised once when they fit in memory (cached_data). With a
    teacher, the images are prepared large enough for both models, and each sample brings the
    teacher's inputs too (its TeacherView) unless the teacher's features are cached."""
    import data_loader
    from augmentation import TrainAugmentation
    augmentation = TrainAugmentation(setup.preprocess_cfg, augment=cfg.augment,
                                     min_side=distill.view.augmentation.side if distill else 0,
                                     crop_min_scale=cfg.crop_min_scale, colour_jitter=cfg.colour_jitter)
    teacher_view = distill.view if distill and not cfg.distill_cache else None
    cache = None
    if train_index is None:   # streamed: the dataset shares the shards out across ranks and workers
        import shards
        dataset = shards.WebDatasetTrain(cfg.data_dir, augmentation, setup.tokenizer, seed=cfg.seed,
                                         rank=run.rank, world_size=run.world_size,
                                         num_samples=cfg.train_num_samples, weights=cfg.data_weights,
                                         resampled=cfg.data_resampled, teacher_view=teacher_view)
    else:
        train_index, cache, tokens = cached_data(cfg, run, train_index, augmentation, setup.tokenizer)
        dataset = data_loader.TrainDataset(train_index, augmentation, setup.tokenizer, seed=cfg.seed,
                                           cache=cache, tokens=tokens, teacher_view=teacher_view,
                                           by_caption=cfg.sample_by == "caption")
    # From the cache a batch is a few milliseconds of work (crops, resizes, token lookups). On a
    # CPU the training process builds it between steps: DataLoader workers beside it would take
    # the cores the model's threads are using (bench/README.md, bench_peer.py). A GPU leaves the
    # CPU idle, so there the workers build the next batches while the GPU computes.
    in_process = cache is not None and run.device.type == "cpu"
    if in_process and cfg.num_workers:
        run.log.info("training batches are built from the cache in this process (no DataLoader "
                     "workers beside the model's threads on a CPU)")
    elif run.device.type == "cpu" and cfg.num_workers and "GOMP_SPINCOUNT" not in os.environ:
        run.log.warning("DataLoader workers read the images beside the model's threads, which spin "
                        "after each operation and hold the cores the workers need: start train.py "
                        "with GOMP_SPINCOUNT=1000 in the environment (README: Slow training on a CPU)")
    loader = data_loader.EpochLoader(dataset, cfg.batch_size, num_workers=0 if in_process else cfg.num_workers,
                                     seed=cfg.seed, rank=run.rank, world_size=run.world_size,
                                     pin_memory=run.device.type == "cuda")
    global_batch = cfg.batch_size * cfg.accum_steps * run.world_size
    steps_per_epoch = len(dataset) // global_batch
    if steps_per_epoch == 0:
        raise SettingsError(f"{len(dataset)} training samples are fewer than one global batch "
                            f"(batch_size {cfg.batch_size} x accum_steps {cfg.accum_steps} x "
                            f"{run.world_size} processes = {global_batch}); lower batch_size")
    return loader, train_index, steps_per_epoch, global_batch


def cached_data(cfg, run, train_index, augmentation, tokenizer):
    """(index, ImageCache or None, token table or None): the images decoded once and the captions
    tokenised once (data_loader.cache_training_data) when cache_images is on and the images fit in
    a quarter of the memory available (shared by the processes of this machine); unreadable
    images found on the way are left out of the index, and named."""
    import data_loader
    if not cfg.cache_images:
        return train_index, None, None
    needed = data_loader.cache_estimate(train_index, augmentation)
    budget = available_memory() // 4 // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if needed > budget:
        run.log.info(f"not caching the training images: about {needed / 2**30:.1f} GiB at "
                     f"{augmentation.side} px, more than a quarter of the free memory "
                     f"({budget / 2**30:.1f} GiB); they are decoded every epoch (shards written with "
                     f"--resize {augmentation.side} make that cheaper)")
        return train_index, None, None
    started, before = time.perf_counter(), len(train_index.skipped)
    train_index, cache, tokens = data_loader.cache_training_data(train_index, augmentation, tokenizer,
                                                                 cfg.num_workers, strict=cfg.strict_data)
    for message in train_index.skipped[before:before + 5]:
        run.log.warning(f"skipped unreadable image: {message}")
    run.log.info(f"cached {len(cache)} training images at {augmentation.side} px "
                 f"({cache.nbytes / 2**20:.0f} MiB) and {len(tokens)} tokenised captions "
                 f"({tokens.nbytes / 2**20:.0f} MiB) in {time.perf_counter() - started:.1f} s")
    return train_index, cache, tokens


def available_memory():
    """Bytes of memory available to new allocations (Linux: MemAvailable; else the free pages)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def build_optimizer(cfg, run, model, total_steps, distill=None):
    """AdamW over the trainable parameters (the distillation's feature map too), the
    warmup-cosine schedule, the fp16 loss scaler."""
    import torch
    trained = torch.nn.ModuleList([model, distill.loss_fn]) if distill else model
    warmup, warning = warmup_for(total_steps, cfg.warmup_steps)
    if warning:
        run.log.warning(warning)
    # fused=True updates all parameters in one kernel instead of a Python loop over tensors
    # (measured ~15% more samples/s for the tiny preset on CPU; bench/README.md).
    optimizer = torch.optim.AdamW(parameter_groups(trained, cfg.weight_decay), lr=cfg.learning_rate,
                                  betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                  fused=run.device.type in ("cuda", "cpu"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total_steps, warmup))
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.precision == "amp")
    return optimizer, scheduler, scaler


def resume(job, train_index):
    """A new TrainState, or the one of the checkpoint to resume (--resume auto or a path) with
    its weights, optimiser, schedule, loss scale and random generators restored."""
    import clip_model
    cfg, run = job.cfg, job.run
    path = run.checkpoint_dir / "last.pt" if cfg.resume == "auto" else cfg.resume and Path(cfg.resume)
    if cfg.resume == "auto" and not path.is_file():
        run.log.info(f"--resume auto: no {path} yet, starting run {run.name} from scratch")
        path = None
    if not path:
        return TrainState(best={"metric": cfg.best_metric, "value": None, "step": None, "weights": None},
                          unreadable=list(train_index.skipped) if train_index else [])
    checkpoint = clip_model.load_checkpoint(path)
    check_resumed_settings(cfg, checkpoint.get("config", {}), path, run.log)
    clip_model.load_weights(job.raw_model, checkpoint["state_dict"], path, job.setup.model_name)
    distillation.restore_distillation(job, checkpoint, path)
    job.optimizer.load_state_dict(checkpoint["optimizer"])
    job.scheduler.load_state_dict(checkpoint["scheduler"])
    job.scaler.load_state_dict(checkpoint["scaler"])
    if job.ema is not None:
        if checkpoint.get("ema") is None:
            raise SettingsError(f"resume {path}: the run trained without ema_decay; its average "
                                f"cannot be resumed (resume without --ema_decay, or start a new run)")
        job.ema.load_state_dict(checkpoint["ema"])
    clip_model.set_rng_state(checkpoint["rng"])
    state = TrainState.from_checkpoint(checkpoint)
    run.log.info(f"resumed {path} at step {state.step} (epoch {state.epoch}, "
                 f"{state.samples_in_epoch} samples in)")
    return state


def check_resumed_settings(cfg, saved, path, log):
    """Settings that differ from the checkpoint's are listed in the log; those that decide the
    architecture cannot change (the weights would not fit)."""
    changed = {name: (saved[name], getattr(cfg, name)) for name in SETTINGS
               if name in saved and saved[name] != getattr(cfg, name) and name not in ("resume",)}
    fixed = [name for name in ARCHITECTURE_SETTINGS if name in changed]
    if fixed:
        raise SettingsError(f"resume {path}: {', '.join(f'{n} {changed[n][0]!r} -> {changed[n][1]!r}' for n in fixed)}"
                            f": the checkpoint's model cannot change; resume with its settings")
    if changed:
        log.warning("resuming with changed settings: " +
                    ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in changed.items()))


if __name__ == "__main__":
    from errors import run_script
    run_script(main, "train.py")
