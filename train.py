"""Train CLIP: `python train.py [--config config.json] [--flag value ...]`.

Reads top to bottom in the order training happens: settings, processes and device, data, model,
optimiser and schedule, resume, the loop (with validation and checkpoints), and the results.
Under `torchrun` the same script trains on many GPUs or machines.
"""
import argparse
import contextlib
import datetime
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT_DATA_DIR = "data/sample"


# ----------------------------------------------------------------------------------------------
# Settings: one schema makes both config.json's defaults and the command-line flags.

@dataclass(frozen=True)
class Setting:
    section: str
    name: str
    default: object
    help: str
    choices: tuple = None


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
    Setting("model", "lock_image", -1, "lock the image tower except its last N layer groups "
            "(LiT); -1 leaves it trainable"),
    Setting("model", "lock_text", -1, "lock the text tower except its last N layers; -1 leaves "
            "it trainable"),
    Setting("model", "grad_checkpointing", False, "recompute activations in backward to save memory"),
    Setting("model", "patch_dropout", 0.0, "fraction of image patches dropped in training (FLIP); "
            "ViT towers only"),
    Setting("model", "context_length", 0, "tokens the text tower reads; 0 = the model's own "
            "(Chinese needs about 3 tokens per character)"),
    Setting("model", "compile", False, "torch.compile the model"),
    # data
    Setting("data", "data_dir", DEFAULT_DATA_DIR, "training data: JSON index, images/+captions/ "
            "folder, CSV/TSV, Chinese-CLIP folder or LMDB, or WebDataset shards "
            "('dir/{00000..00099}.tar', sources joined with '::'); the default is generated if missing"),
    Setting("data", "val_data", "", "validation data in any of those formats; '' splits "
            "val_fraction of the images off data_dir"),
    Setting("data", "val_fraction", 0.1, "share of images held out for validation when val_data is ''"),
    Setting("data", "image_column", "filepath", "CSV/TSV column of image paths"),
    Setting("data", "caption_column", "title", "CSV/TSV column of captions"),
    Setting("data", "split", "train", "split of a Chinese-CLIP folder (train, valid, test)"),
    Setting("data", "train_num_samples", 0, "shards: samples per epoch; needed when the shards' "
            "counts are unknown (no _info.json or img2dataset *_stats.json); 0 = the shards' total"),
    Setting("data", "data_weights", "", "shards: each source's share of the samples, e.g. 1,3 for "
            "two sources (with data_resampled); '' = in proportion to their sizes"),
    Setting("data", "data_resampled", False, "shards: draw shards with replacement (any number of "
            "shards for any number of workers; sources mixed by data_weights)"),
    Setting("data", "augment", True, "random resized crop and colour jitter in training (no flips)"),
    Setting("data", "strict_data", False, "stop at the first unreadable image instead of skipping it"),
    Setting("data", "num_workers", 2, "DataLoader worker processes per training process"),
    # training
    Setting("training", "batch_size", 64, "images per process per micro-batch"),
    Setting("training", "accum_steps", 1, "micro-batches per optimiser step; the loss still sees "
            "the negatives of all of them"),
    Setting("training", "num_epochs", 10, "passes over the training data"),
    Setting("training", "max_steps", 0, "optimiser steps to train for; 0 = num_epochs decides"),
    Setting("training", "learning_rate", 5e-4, "peak learning rate of AdamW"),
    Setting("training", "weight_decay", 0.1, "AdamW weight decay (not on 1-D tensors)"),
    Setting("training", "beta1", 0.9, "AdamW beta1"),
    Setting("training", "beta2", 0.98, "AdamW beta2 (0.98 as in CLIP, steadier than 0.999)"),
    Setting("training", "eps", 1e-6, "AdamW epsilon"),
    Setting("training", "warmup_steps", 100, "linear warmup steps before the cosine decay"),
    Setting("training", "grad_clip_norm", 1.0, "clip the global gradient norm; 0 = no clipping"),
    Setting("training", "precision", "auto", "auto (amp on CUDA, else fp32), fp32, amp (fp16 "
            "with loss scaling, CUDA), bf16", ("auto", "fp32", "amp", "bf16")),
    Setting("training", "device", "auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps"),
    Setting("training", "seed", 0, "seed of model init, data order, captions and augmentation"),
    Setting("training", "max_bad_steps", 5, "stop after this many non-finite losses in a row"),
    Setting("training", "eval_every", 0, "validate every N steps; 0 = at the end of each epoch"),
    Setting("training", "best_metric", "rsum", "validation metric that picks best.pt: rsum, "
            "mean_recall, image_to_text/R@1, text_to_image/R@5, ..."),
    Setting("training", "early_stopping_patience", 0, "stop after N validations without a new "
            "best; 0 = never"),
    Setting("training", "resume", "", "'auto' continues the run's last.pt; or a checkpoint path"),
    Setting("training", "stop_at_step", 0, "save and stop after this step without changing the "
            "schedule (split a run into jobs); 0 = off"),
    # logging
    Setting("logging", "run_name", "", "name of the run's folders; '' = model name and time"),
    Setting("logging", "save_every", 500, "write last.pt every N steps (and at the end)"),
    Setting("logging", "log_every", 10, "steps between log lines and TensorBoard points"),
    Setting("logging", "checkpoint_dir", "model-checkpoint", "folder of the runs' checkpoints"),
    Setting("logging", "log_dir", "logs", "folder of the runs' logs and TensorBoard events"),
    Setting("logging", "results_dir", "results", "folder of the runs' results and plots"),
]
SETTINGS = {s.name: s for s in SCHEMA}
SECTIONS = list(dict.fromkeys(s.section for s in SCHEMA))


def default_config():
    """config.json's content: every setting's default, by section."""
    return {section: {s.name: s.default for s in SCHEMA if s.section == section}
            for section in SECTIONS}


def settings_markdown():
    """The README's table of train.py's settings, generated from the schema."""
    rows = ["| flag | section | default | meaning |", "|---|---|---|---|"]
    for s in SCHEMA:
        flag = f"`--{s.name}` / `--no-{s.name}`" if isinstance(s.default, bool) else f"`--{s.name}`"
        rows.append(f"| {flag} | {s.section} | `{json.dumps(s.default)}` | {s.help} |")
    return "\n".join(rows)


def _check_value(name, value, where):
    setting = SETTINGS.get(name)
    if setting is None:
        raise SystemExit(f"{where}: unknown setting {name!r}. Known: {', '.join(SETTINGS)}")
    expected = type(setting.default)
    if expected is float and type(value) is int:
        value = float(value)
    if type(value) is not expected:
        raise SystemExit(f"{where}: {name} must be {expected.__name__}, got {value!r}")
    if setting.choices and value not in setting.choices:
        raise SystemExit(f"{where}: {name} must be one of {', '.join(setting.choices)}, got {value!r}")
    return value


def read_config_file(path):
    """Settings from a config file, by section, each key checked against the schema."""
    try:
        sections = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"--config {path}: {error}")
    values = {}
    for section, settings in sections.items():
        if section not in SECTIONS or not isinstance(settings, dict):
            raise SystemExit(f"{path}: unknown section {section!r}; sections are {', '.join(SECTIONS)}")
        for name, value in settings.items():
            values[name] = _check_value(name, value, f"{path}, section {section}")
            if SETTINGS[name].section != section:
                raise SystemExit(f"{path}: {name} belongs in section {SETTINGS[name].section!r}")
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
            # default=None marks "not given", so the config file's value survives
            group.add_argument(f"--{s.name}", default=None, help=f"{s.help} (default: {s.default!r})",
                               **extra)
    return parser


def parse_config(argv=None):
    """Resolve settings: schema defaults, then the config file, then flags."""
    args = build_parser().parse_args(argv)
    config = {s.name: s.default for s in SCHEMA}
    config_path = Path(args.config)
    if config_path.is_file():
        config.update(read_config_file(config_path))
    elif args.config != "config.json":
        raise SystemExit(f"--config {args.config}: file not found")
    config.update({k: v for k, v in vars(args).items() if k in SETTINGS and v is not None})
    if args.print_config:
        print(json.dumps(config, indent=2))
        raise SystemExit(0)
    return argparse.Namespace(**config)


# ----------------------------------------------------------------------------------------------
# Small helpers

def pick_device(requested, local_rank=0):
    import torch
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_precision(requested, device):
    if requested == "auto":
        return "amp" if device.type == "cuda" else "fp32"
    if requested == "amp" and device.type != "cuda":
        raise SystemExit(f"precision amp needs CUDA (device is {device}); use bf16 or fp32")
    return requested


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


def metric_value(metrics, name):
    """A validation metric by path: 'rsum' or 'image_to_text/R@1'."""
    value = metrics["retrieval"]
    for key in name.split("/"):
        if key not in value:
            raise SystemExit(f"best_metric {name!r}: no such metric; try rsum, mean_recall, "
                             f"image_to_text/R@1, text_to_image/R@10")
        value = value[key]
    return value


def flatten_metrics(metrics, prefix="val"):
    """{'retrieval': {'image_to_text': {'R@1': ..}}} -> {'val/image_to_text/R@1': ..}"""
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}/{key}" if key != "retrieval" else prefix
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, name))
        elif isinstance(value, (int, float)):
            flat[name] = value
    return flat


def setup_logging(log_file, is_main):
    """Our own logger (open_clip logs chatty INFO lines to the root logger); only rank 0 writes
    the log file, other ranks print warnings only."""
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stdout)]
    if is_main:
        log_file.parent.mkdir(parents=True, exist_ok=True)
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
    last.pt and exits cleanly instead of dying mid-update."""

    def __init__(self):
        self.reason = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.reason is not None:          # a second Ctrl-C: stop right now
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name


# ----------------------------------------------------------------------------------------------
# One optimiser step

def backward_step(model, loss_fn, micro_batches, scaler, precision, device):
    """Forward and backward for one optimiser step; returns the loss (a tensor, not synced).

    One micro-batch: the plain CLIP step. Several: gradient accumulation that keeps every
    negative of the accumulated batch (Gao et al. 2021, "gradient caching"; as open_clip and
    Chinese-CLIP do). First every micro-batch's features are computed without gradient; then each
    micro-batch is recomputed with gradient and the loss is taken over all features, its own live
    and the others cached. The gradients of the micro-batches add up to exactly the gradient of
    one big batch, at the memory cost of one micro-batch. The temperature gets its gradient only
    once (from the first micro-batch): every pass sees the same full loss, so counting it in each
    would multiply its gradient by the number of micro-batches.
    """
    import torch
    from clip_model import autocast
    ids = torch.cat([b["image_ids"] for b in micro_batches]).to(device)
    if len(micro_batches) == 1:
        batch = micro_batches[0]
        with autocast(device, precision):
            out = model(batch["images"], batch["texts"])
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], ids,
                           out.get("logit_bias"))
        scaler.scale(loss).backward()
        return loss.detach()

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
                if j > 0:
                    scale, bias = scale.detach(), bias.detach() if bias is not None else None
                loss = loss_fn(image_features, text_features, scale, ids, bias)
            scaler.scale(loss).backward()
    return loss.detach()


# ----------------------------------------------------------------------------------------------
# Training

def main(argv=None):
    cfg = parse_config(argv)

    # Processes and device. torchrun sets RANK / WORLD_SIZE / LOCAL_RANK for every process.
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    import clip_model
    import data_loader
    import evaluation
    import shards

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(cfg.device, local_rank)
    if distributed:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # Validation runs on rank 0 while the others wait: allow it more than the default timeout.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=2))
    rank, world_size = clip_model.world_info()
    is_main = rank == 0
    precision = pick_precision(cfg.precision, device)

    run_name = [cfg.run_name or f"{Path(cfg.model_name).stem}-{time.strftime('%Y%m%d-%H%M%S')}"]
    if distributed:
        dist.broadcast_object_list(run_name, src=0)     # every rank uses rank 0's timestamp
    run_name = run_name[0]
    checkpoint_dir = Path(cfg.checkpoint_dir) / run_name
    log_dir, results_dir = Path(cfg.log_dir) / run_name, Path(cfg.results_dir) / run_name
    log = setup_logging(log_dir / "train.log", is_main)
    resume_path = None
    if cfg.resume == "auto":
        resume_path = checkpoint_dir / "last.pt"
        if not resume_path.is_file():
            log.info(f"--resume auto: no {resume_path} yet, starting run {run_name} from scratch")
            resume_path = None
    elif cfg.resume:
        resume_path = Path(cfg.resume)
    elif (checkpoint_dir / "last.pt").exists():
        raise SystemExit(f"{checkpoint_dir / 'last.pt'} exists: continue that run with --resume "
                         f"auto, or pick another --run_name")
    if is_main:
        for folder in (checkpoint_dir, log_dir, results_dir):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "config.json").write_text(json.dumps(vars(cfg), indent=2))
    log.info(f"run {run_name}: device {device}, precision {precision}, {world_size} process(es)")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)

    # Data. The default data set is generated on first use so that a fresh clone trains at once.
    if cfg.data_dir == DEFAULT_DATA_DIR and not Path(cfg.data_dir).exists():
        if is_main:
            log.info(f"{cfg.data_dir} not found: generating the sample data set there")
            data_loader.create_sample_dataset(cfg.data_dir, num_samples=2000, seed=0)
        if distributed:
            dist.barrier()
    read = dict(image_column=cfg.image_column, caption_column=cfg.caption_column)
    # WebDataset shards (a brace pattern, .tar or folder of shards) are streamed, not indexed,
    # so they cannot be split into training and validation images.
    streamed = shards.is_webdataset(cfg.data_dir)
    if streamed and not cfg.val_data:
        raise SystemExit(f"--data_dir {cfg.data_dir} is a set of WebDataset shards, which are streamed "
                         f"and cannot be split: give --val_data (any format data_loader reads)")
    if not streamed and (cfg.train_num_samples or cfg.data_weights or cfg.data_resampled):
        raise SystemExit("train_num_samples, data_weights and data_resampled apply to WebDataset shards; "
                         f"--data_dir {cfg.data_dir} is read whole, one sample per image per epoch")
    train_index = None if streamed else data_loader.load_captions(cfg.data_dir, split=cfg.split, **read)
    if cfg.val_data:
        val_index = data_loader.load_captions(cfg.val_data, split="valid", **read)
    else:
        train_index, val_index = data_loader.split_by_image(train_index, cfg.val_fraction, cfg.seed)
    training_data = (f"WebDataset shards {cfg.data_dir}" if streamed else
                     f"{train_index.num_images} training images ({train_index.num_captions} captions)")
    log.info(f"data: {training_data}, {val_index.num_images} validation images "
             f"({val_index.num_captions} captions)")

    # Model.
    setup = clip_model.build_model(cfg.model_name, cfg.pretrained, device=device, loss=cfg.loss,
                                   patch_dropout=cfg.patch_dropout,
                                   grad_checkpointing=cfg.grad_checkpointing,
                                   context_length=cfg.context_length)
    clip_model.freeze_for_finetuning(setup.model, cfg.freeze_backbone, cfg.lock_image, cfg.lock_text)
    model = setup.model
    log.info(f"model {setup.model_name}: {clip_model.count_parameters(model) / 1e6:.1f}M parameters, "
             f"{clip_model.count_parameters(model, trainable_only=True) / 1e6:.1f}M trainable")
    transform = data_loader.image_transform(setup.preprocess_cfg, train=True, augment=cfg.augment)
    if streamed:  # the dataset shares the shards out across ranks and workers itself
        train_set = shards.WebDatasetTrain(cfg.data_dir, transform, setup.tokenizer, seed=cfg.seed,
                                           rank=rank, world_size=world_size, strict=cfg.strict_data,
                                           num_samples=cfg.train_num_samples, weights=cfg.data_weights,
                                           resampled=cfg.data_resampled)
        sampler = None
    else:
        train_set = data_loader.TrainDataset(train_index, transform, setup.tokenizer, seed=cfg.seed,
                                             strict=cfg.strict_data)
        sampler = data_loader.EpochSampler(len(train_set), seed=cfg.seed, rank=rank, world_size=world_size)
    loader = data_loader.build_dataloader(train_set, cfg.batch_size, sampler=sampler,
                                          num_workers=cfg.num_workers, seed=cfg.seed, train=True,
                                          pin_memory=device.type == "cuda")
    global_batch = cfg.batch_size * cfg.accum_steps * world_size
    steps_per_epoch = len(train_set) // global_batch
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(train_set)} training images are fewer than one global batch "
                         f"(batch_size {cfg.batch_size} x accum_steps {cfg.accum_steps} x "
                         f"{world_size} processes = {global_batch}); lower batch_size")
    total_steps = cfg.max_steps or cfg.num_epochs * steps_per_epoch
    if cfg.compile:
        model = torch.compile(model)
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None)
    loss_fn = clip_model.create_loss(cfg.loss, local_loss=cfg.local_loss)

    # Optimiser and schedule.
    # fused=True updates all parameters in one kernel instead of a Python loop over tensors
    # (measured ~15% more samples/s for the tiny preset on CPU; bench/README.md).
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
                                  betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                  fused=device.type in ("cuda", "cpu"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(total_steps, cfg.warmup_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "amp")

    # Resume: weights, optimiser, schedule, loss scale, position in the data and RNG states.
    step, epoch, samples_in_epoch = 0, 0, 0
    best = {"metric": cfg.best_metric, "value": None, "step": None}
    history = {"train": [], "val": []}
    evals_without_gain = 0
    if resume_path is not None:
        state = clip_model.load_checkpoint(resume_path)
        clip_model.unwrap(model).load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, samples_in_epoch = state["step"], state["epoch"], state["samples_in_epoch"]
        best, history = state["best"], state["history"]
        evals_without_gain = state["evals_without_gain"]
        clip_model.set_rng_state(state["rng"])
        log.info(f"resumed {resume_path} at step {step} (epoch {epoch}, {samples_in_epoch} samples in)")

    writer = SummaryWriter(str(log_dir)) if is_main else None
    stop = StopRequest()

    def save(name):
        if not is_main:
            return
        weights = clip_model.unwrap(model).state_dict().values()
        if not all(torch.isfinite(w).all() for w in weights if w.is_floating_point()):
            log.error(f"weights are not finite at step {step}: {name} NOT written, the previous "
                      f"file is kept")
            return
        clip_model.save_checkpoint(
            checkpoint_dir / name, setup, step=step, epoch=epoch, samples_in_epoch=samples_in_epoch,
            optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict(), best=best, history=history,
            evals_without_gain=evals_without_gain, rng=clip_model.rng_state(), config=vars(cfg))

    def validate():
        """Full retrieval metrics on the validation set, computed once (on rank 0)."""
        nonlocal evals_without_gain
        improved = False
        if is_main:
            started = time.time()
            metrics = evaluation.evaluate_model(
                clip_model.ClipSetup(clip_model.unwrap(model), setup.tokenizer, setup.preprocess_cfg,
                                     setup.model_name, setup.model_config),
                val_index, batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=device,
                precision=precision)
            model.train()
            history["val"].append({"step": step, "epoch": epoch, **metrics})
            for name, value in flatten_metrics(metrics).items():
                writer.add_scalar(name, value, step)
            value = metric_value(metrics, cfg.best_metric)
            improved = best["value"] is None or value > best["value"]
            if improved:
                best.update(value=value, step=step)
                evals_without_gain = 0
            else:
                evals_without_gain += 1
            r = metrics["retrieval"]
            log.info(f"step {step} validation ({time.time() - started:.1f}s): "
                     f"image->text R@1/5/10 {r['image_to_text']['R@1']:.1f}/"
                     f"{r['image_to_text']['R@5']:.1f}/{r['image_to_text']['R@10']:.1f}, "
                     f"text->image {r['text_to_image']['R@1']:.1f}/{r['text_to_image']['R@5']:.1f}/"
                     f"{r['text_to_image']['R@10']:.1f}, {cfg.best_metric} {value:.2f}"
                     f"{' (best)' if improved else ''}")
            write_results(results_dir / "training_results.json", cfg, history, best,
                          checkpoint_dir / "best.pt")
        if improved:
            save("best.pt")
        patience_over = cfg.early_stopping_patience > 0 and \
            evals_without_gain >= cfg.early_stopping_patience
        return agree(patience_over)

    def agree(flag):
        """Every process takes rank 0's decision (to stop, for instance)."""
        if not distributed:
            return flag
        decision = torch.tensor([int(flag)], device=device if device.type == "cuda" else "cpu")
        dist.broadcast(decision, src=0)
        return bool(decision.item())

    # The loop.
    model.train()
    bad_steps, failed_images, stop_reason = 0, 0, None
    log.info(f"training {total_steps} steps ({steps_per_epoch} per epoch) with a global batch of "
             f"{global_batch}")
    while step < total_steps and stop_reason is None:
        if sampler is None:
            train_set.set_epoch(epoch, start=samples_in_epoch)
        else:
            sampler.set_epoch(epoch, start=samples_in_epoch)
            train_set.set_epoch(epoch)
        batches = iter(loader)
        progress = tqdm(total=steps_per_epoch, initial=samples_in_epoch // global_batch,
                        desc=f"epoch {epoch}", disable=not is_main, dynamic_ncols=True)
        window = {"loss": torch.zeros((), device=device), "steps": 0, "samples": 0,
                  "wait": 0.0, "start": time.perf_counter()}
        while step < total_steps and stop_reason is None:
            waited = time.perf_counter()
            micro_batches = []
            for batch in batches:
                failed_images += len(batch["failed"])
                if batch["failed"] and failed_images <= 5 * len(batch["failed"]):
                    log.warning(f"skipped unreadable images: {', '.join(batch['failed'])}")
                if len(batch["image_ids"]) == 0:
                    continue
                micro_batches.append({k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                                      for k, v in batch.items()})
                if len(micro_batches) == cfg.accum_steps:
                    break
            window["wait"] += time.perf_counter() - waited
            if len(micro_batches) < cfg.accum_steps:
                break                                          # end of the epoch

            loss = backward_step(model, loss_fn, micro_batches, scaler, precision, device)
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), cfg.grad_clip_norm if cfg.grad_clip_norm > 0 else float("inf"))
            # One host-device sync per step: the price of never applying a non-finite update.
            # With amp an infinite gradient is the loss scaler's business (it skips and retries
            # with a smaller scale); only a non-finite loss counts as a bad step.
            finite = bool(torch.isfinite(loss)) and (precision == "amp" or bool(torch.isfinite(grad_norm)))
            if finite:
                scaler.step(optimizer)
                bad_steps = 0
            else:
                bad_steps += 1
                log.warning(f"step {step}: non-finite loss or gradient, update skipped "
                            f"({bad_steps} in a row)")
                if writer:
                    writer.add_scalar("train/skipped_step", 1, step)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            clip_model.clamp_logit_scale(clip_model.unwrap(model))
            step += 1
            samples_in_epoch += global_batch
            progress.update(1)
            if finite:
                window["loss"] += loss
            window["steps"] += int(finite)
            window["samples"] += global_batch
            if bad_steps >= cfg.max_bad_steps:
                stop_reason = f"{bad_steps} non-finite losses in a row"
                break

            if step % cfg.log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - window["start"]
                entry = {"step": step, "epoch": epoch,
                         "loss": (window["loss"] / max(1, window["steps"])).item(),
                         "lr": scheduler.get_last_lr()[0],
                         "logit_scale": clip_model.unwrap(model).logit_scale.exp().item(),
                         "grad_norm": grad_norm.item(),
                         "samples_per_s": window["samples"] / elapsed,
                         "data_wait": window["wait"] / elapsed}
                history["train"].append(entry)
                if writer:
                    for key, value in entry.items():
                        if key not in ("step", "epoch"):
                            writer.add_scalar(f"train/{key}", value, step)
                progress.set_postfix(loss=f"{entry['loss']:.3f}", lr=f"{entry['lr']:.1e}",
                                     scale=f"{entry['logit_scale']:.1f}",
                                     sps=f"{entry['samples_per_s']:.0f}")
                window.update(loss=torch.zeros((), device=device), steps=0, samples=0, wait=0.0,
                              start=time.perf_counter())
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                if validate():
                    stop_reason = f"no gain in {cfg.best_metric} for " \
                                  f"{cfg.early_stopping_patience} validations"
            if step % cfg.save_every == 0:
                save("last.pt")
            if agree(stop.reason is not None):
                stop_reason = f"{stop.reason or 'signal'} received"
            elif cfg.stop_at_step and step >= cfg.stop_at_step:
                stop_reason = f"stop_at_step {cfg.stop_at_step} reached"
        progress.close()
        if step < total_steps and stop_reason is None:
            epoch, samples_in_epoch = epoch + 1, 0
            if not cfg.eval_every and validate():
                stop_reason = f"no gain in {cfg.best_metric} for {cfg.early_stopping_patience} " \
                              f"validations"

    # The end: a final validation (unless this step was just validated), last.pt and results.
    finished = step >= total_steps
    if finished and (not history["val"] or history["val"][-1]["step"] != step):
        validate()
    save("last.pt")
    if writer:
        writer.close()
    if failed_images:
        log.warning(f"{failed_images} unreadable images were skipped in total")
    if stop_reason and "non-finite" in stop_reason:
        raise SystemExit(f"stopped at step {step}: {stop_reason}. Lower --learning_rate, check the "
                         f"data, or try --precision fp32; {checkpoint_dir / 'last.pt'} holds the "
                         f"last finite weights")
    if is_main:
        results = write_results(results_dir / "training_results.json", cfg, history, best,
                                checkpoint_dir / "best.pt")
        plot_curves(results, results_dir / "training_curves.png", log)
        log.info(f"{'finished' if finished else 'stopped: ' + stop_reason} at step {step}; "
                 f"best {cfg.best_metric} {best['value']} at step {best['step']}; "
                 f"checkpoints in {checkpoint_dir}, TensorBoard: tensorboard --logdir {cfg.log_dir}")
        if not finished:
            log.info(f"continue with: python train.py --run_name {run_name} --resume auto")
    if distributed:
        dist.destroy_process_group()
    return {"run_name": run_name, "step": step, "best": best, "history": history,
            "checkpoint_dir": checkpoint_dir, "results_dir": results_dir, "stop_reason": stop_reason}


def write_results(path, cfg, history, best, best_path):
    results = {"config": vars(cfg), "history": history,
               "final": history["val"][-1] if history["val"] else None,
               "best": best, "checkpoint": str(best_path)}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, path)
    return results


def plot_curves(results, path, log):
    # visualization.py sits above train.py; it is imported only here, at the very end.
    from visualization import plot_training_curves, save_figure
    save_figure(plot_training_curves(results), path)
    log.info(f"training curves: {path}")


if __name__ == "__main__":
    try:
        main()
    except Exception as error:
        # Mistakes in data, model names or checkpoints get one clear line, not a traceback.
        import clip_model
        import data_loader
        if isinstance(error, (data_loader.DataError, clip_model.ModelError,
                              clip_model.CheckpointError, clip_model.PretrainedUnavailable)):
            sys.exit(f"train.py: error: {error}")
        raise
