"""train.py's settings: one schema makes config.json's defaults, the command-line flags, their
checks, the settings table of the docs, and the default folders every script reads.

    python -c 'import settings; print(settings.settings_markdown())'     # the docs' table

Precedence: the schema's defaults, then the config file (config.json by default), then the flags.
A setting has one home here; a key that is unknown, of the wrong type, out of its range or in the
wrong section of the config file is an error that names it.
"""
import argparse
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from errors import SettingsError

DEFAULT_DATA_DIR = "data/sample"


@dataclass(frozen=True)
class Setting:
    section: str
    name: str
    default: object
    help: str
    choices: tuple = None
    valid: str = None        # range of a number (">= 1", "> 0", "[0, 1)", "[0, cores]"), "folder name",
    #                          "duration", or "comma list" (any of the choices, comma-separated)


SCHEMA = [
    # model
    Setting("model", "model_name", "tiny-vit-64", "open_clip model name (ViT-B-32, RN50, "
            "coca_ViT-B-32, ...), a preset of ours (tiny-vit-64, small-vit-128, simple-rn18, tiny-coca-64), "
            "an open_clip config .json, or a Chinese-CLIP model (cn-clip:RN50, cn-clip:ViT-B-16, cn-clip:ViT-L-14, "
            "cn-clip:ViT-L-14-336, cn-clip:ViT-H-14, cn-clip:VISION@TEXT)"),
    Setting("model", "pretrained", "", "'' for random init, an open_clip pretrained tag (openai, "
            "laion2b_s34b_b79k, ...) or chinese-clip for a cn-clip model, or a local weights file or checkpoint "
            "(Chinese-CLIP's released .pt files too)"),
    Setting("model", "loss", "clip", "clip: softmax InfoNCE; siglip: sigmoid loss", ("clip", "siglip")),
    Setting("model", "local_loss", False, "with many processes, compute the loss of local rows "
            "against the global batch only (less memory, same gradient on average)"),
    Setting("model", "caption_loss_weight", 2.0, "captioners (CoCa: tiny-coca-64, coca_ViT-B-32): loss = "
            "contrastive + w x caption, the caption term the cross-entropy of each caption token "
            "(open_clip's weight: 2); 0 trains the two towers alone, the text decoder frozen", valid=">= 0"),
    Setting("model", "freeze_backbone", False, "train only the two projections and the temperature (and "
            "a captioner's text decoder)"),
    Setting("model", "lock_image", -1, "train only the image tower's last N blocks (and the "
            "norm and projection after them); 0 freezes it (LiT); -1 leaves it trainable",
            valid=">= -1"),
    Setting("model", "lock_text", -1, "train only the text tower's last N blocks (and the norm "
            "and projection after them); 0 freezes it; -1 leaves it trainable", valid=">= -1"),
    Setting("model", "grad_checkpointing", False, "recompute activations in backward to save memory"),
    Setting("model", "patch_dropout", 0.0, "fraction of image patches dropped in training (FLIP); "
            "ViT towers only", valid="[0, 1)"),
    Setting("model", "patch_dropout_tail", 0.0, "share of the run's last steps trained with every "
            "patch (FLIP's unmasked tuning, after training with patch_dropout)", valid="[0, 1)"),
    Setting("model", "context_length", 0, "tokens the text tower reads; 0 = the model's own "
            "(Chinese needs about 3 tokens per character)", valid=">= 0"),
    Setting("model", "compile", False, "torch.compile the model"),
    # model: distillation, a teacher the student learns from (clip_model.DistillationLoss)
    Setting("model", "distill_from", "", "distillation teacher: a checkpoint of ours, an open_clip "
            "model folder (open_clip_config.json and weights), or a model name as model_name takes it "
            "with distill_pretrained; '' = no distillation"),
    Setting("model", "distill_pretrained", "", "the teacher's weights when distill_from is a model "
            "name: a pretrained tag as pretrained takes it, or a local weights file"),
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
    Setting("data", "val_data", "", "validation data in any of those formats (shards too: a "
            "held-out shard such as 'dir/00099.tar'); '' splits val_fraction of the images off data_dir"),
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
    Setting("data", "val_captions", 100, "captioners (CoCa): the validation at the end of the run also "
            "writes a caption of each of the first N validation images and scores them against the images' "
            "captions (BLEU, CIDEr-D); not at every validation (beam search costs many times what retrieval "
            "does), nor in a time_budget run (its plan cannot foresee their time); 0 = off", valid=">= 0"),
    Setting("data", "strict_data", False, "stop at the first unreadable image (missing or "
            "corrupt) instead of skipping it and counting it"),
    Setting("data", "num_workers", 2, "DataLoader worker processes per training process, which "
            "read and decode images (on a CPU-only run with the images cached, training batches are "
            "built in the training process itself); at most the CPU cores this process may use "
            "(at least 2)", valid="[0, cores]"),
    # training
    Setting("training", "batch_size", 64, "images per process per micro-batch", valid=">= 1"),
    Setting("training", "accum_steps", 1, "micro-batches per optimiser step; the loss still sees "
            "the negatives of all of them", valid=">= 1"),
    Setting("training", "num_epochs", 10, "passes over the training data", valid=">= 1"),
    Setting("training", "max_steps", 0, "optimiser steps to train for; 0 = num_epochs decides",
            valid=">= 0"),
    Setting("training", "time_budget", "", "train for this wall time instead of num_epochs: 90m, "
            "2h, 1h30m, 45s or seconds; the steps are planned, and planned again as the run measures "
            "itself, so that warm-up and decay end inside it, start-up, validations and checkpoints "
            "included ('' = off; not with max_steps)", valid="duration"),
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
            valid="[0, 4294967295]"),
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
    Setting("logging", "log_every", 10, "steps between log lines and points of the curves",
            valid=">= 1"),
    Setting("logging", "checkpoint_dir", "model-checkpoint", "folder of the runs' checkpoints"),
    Setting("logging", "log_dir", "logs", "folder of the runs' logs, TensorBoard events and offline "
            "W&B runs"),
    Setting("logging", "results_dir", "results", "folder of the runs' results and plots"),
    Setting("logging", "tensorboard_pairs", 8, "validation pairs whose similarity heatmap and "
            "retrieval examples TensorBoard (and W&B) show at every validation (the same pairs each time, "
            "chosen with the seed); 0 = no pictures", valid="[0, 16]"),
    Setting("logging", "projector_pairs", 256, "validation pairs whose image and caption features "
            "TensorBoard's Embedding Projector shows, with thumbnails, written at the end; 0 = none",
            valid="[0, 10000]"),
    Setting("logging", "projector_every_validation", False, "write the projector at every "
            "validation too (each one is about 2 x projector_pairs x the embedding width x 20 bytes of text)"),
    Setting("logging", "report_to", "tensorboard", "where the curves, pictures, settings and best "
            "metrics go: tensorboard, wandb (Weights & Biases) or both, comma-separated",
            ("tensorboard", "wandb"), valid="comma list"),
    Setting("logging", "wandb_project", "clip-training", "the W&B project of the run (report_to wandb)"),
    Setting("logging", "wandb_entity", "", "the W&B team or user the run goes to; '' = your default entity"),
    Setting("logging", "wandb_tags", "", "tags of the W&B run, comma-separated"),
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
    """docs/settings.md's table of train.py's settings, generated from the schema."""
    rows = ["| flag | section | default | valid | meaning |", "|---|---|---|---|---|"]
    for s in SCHEMA:
        flag = f"`--{s.name}` / `--no-{s.name}`" if isinstance(s.default, bool) else f"`--{s.name}`"
        choices = " \\| ".join(s.choices or ())
        valid = f"`{s.valid}` of {choices}" if s.valid and s.choices else f"`{s.valid}`" if s.valid else choices
        rows.append(f"| {flag} | {s.section} | `{json.dumps(s.default)}` | {valid} | {s.help} |")
    return "\n".join(rows)


def usable_cores():
    """The CPU cores this process may run on (its affinity, as a scheduler or taskset sets it),
    and at least 2, so that the default of num_workers fits every machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(2, cores)


def in_range(value, valid):
    """Whether a number lies in a range written as '>= 1', '> 0', '[0, 1)', '(0, 1)' or
    '[0, cores]' (cores: usable_cores())."""
    if valid.startswith((">=", ">")):
        bound = float(valid.lstrip(">= "))
        return value >= bound if valid.startswith(">=") else value > bound
    low, high = (usable_cores() if x.strip() == "cores" else float(x) for x in valid[1:-1].split(","))
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
        try:
            value = float(value)
        except OverflowError:               # an integer beyond float's range: 1e309 and up
            value = math.inf
    if type(value) is not expected:
        raise SettingsError(f"{where}: {name} must be {expected.__name__}, got {value!r}")
    if setting.valid == "comma list":
        if not comma_list(value) or any(item not in setting.choices for item in comma_list(value)):
            raise SettingsError(f"{where}: {name} must be one or more of {', '.join(setting.choices)}, "
                                f"comma-separated, got {value!r}")
        return value
    if setting.choices and value not in setting.choices:
        raise SettingsError(f"{where}: {name} must be one of {', '.join(setting.choices)}, got {value!r}")
    if setting.valid == "folder name":
        return check_folder_name(value, where)
    if setting.valid == "duration":
        if value and parse_duration(value, where) <= 0:
            raise SettingsError(f"{where}: {name} must be more than 0 seconds, got {value!r}")
        return value
    if expected is float and not math.isfinite(value):
        raise SettingsError(f"{where}: {name} must be a finite number, got {value!r}")
    if setting.valid and not in_range(value, setting.valid):
        bound = f" (this machine: {usable_cores()} cores)" if "cores" in setting.valid else ""
        raise SettingsError(f"{where}: {name} must be {setting.valid}{bound}, got {value!r}")
    return value


DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?")


def parse_duration(text, where="time_budget"):
    """Seconds of '90m', '2h', '1h30m', '45s' or '3600'; '' is 0 (none)."""
    match = DURATION.fullmatch(text.strip().lower())
    if not text:
        return 0.0
    if not match or not any(match.groups()):
        raise SettingsError(f"{where}: {text!r} is not a duration; write e.g. 90m, 2h, 1h30m, 45s or 3600")
    hours, minutes, seconds = (float(group) if group else 0.0 for group in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def comma_list(value):
    """The items of a comma-separated setting ('tensorboard, wandb' -> ['tensorboard', 'wandb'])."""
    return [item.strip() for item in value.split(",") if item.strip()]


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
        if section not in SECTIONS:
            raise SettingsError(f"{path}: unknown section {section!r}; sections are {', '.join(SECTIONS)}")
        if not isinstance(settings, dict):
            raise SettingsError(f"{path}: section {section!r} must be a JSON object of settings, got "
                                f"{type(settings).__name__}")
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
                     else {"type": kind, "choices": s.choices if s.valid != "comma list" else None,
                           "metavar": kind.__name__.upper()})
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
    if config["time_budget"] and config["max_steps"]:
        raise SettingsError(f"time_budget {config['time_budget']!r} and max_steps {config['max_steps']}: "
                            f"both decide where the run ends; give one (max_steps 0 with a time budget)")
    if args.print_config:
        print(json.dumps(config, indent=2))
        raise SystemExit(0)
    return argparse.Namespace(**config)


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
