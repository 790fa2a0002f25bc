"""Train CLIP: `python train.py [--config config.json] [--flag value ...]`.

`main()` is the table of contents, and the functions below it follow a run in its order: the
model, resume, the loop and its validations, the checkpoints and the results. The settings are in
settings.py, the process around the run (folders, lock, log, signals, torchrun) in runtime.py, its
data (indexes, cache, loader) in train_data.py, and the optimiser step in train_step.py. Under
`torchrun` the same script trains on many GPUs or machines.
"""
import argparse
import enum
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import clip_model
import data_loader
import distillation
import evaluation
import files
import runtime
import tensorboard_views
import train_data
from errors import DataError, SettingsError, TrainingError, report_skipped, run_script, skipped_summary
from runtime import Run
from settings import (
    ARCHITECTURE_SETTINGS,
    SETTINGS,
    ZEROSHOT_METRICS,
    metric_value,
    parse_config,
)
from train_step import build_ema, build_optimizer, optimizer_step
from visualization import plot_training_curves, save_figure

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


class StopKind(enum.Enum):
    NON_FINITE = "non-finite losses in a row"
    SIGNAL = "a stop signal"
    STOP_AT_STEP = "stop_at_step reached"
    NO_GAIN = "no gain in the best metric (early stopping)"


@dataclass(frozen=True)
class Stop:
    """Why a run ends before its last step: the kind decides what happens next (a non-finite
    run is an error), the message is what the log says."""
    kind: StopKind
    message: str

    def __str__(self):
        return self.message


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
    runtime.tune_openmp(cfg, relaunch=argv is None)
    runtime.tune_malloc()
    run = runtime.start_run(cfg)
    try:
        torch.manual_seed(cfg.seed)
        train_index, val_index = train_data.load_data(cfg, run)
        setup, model, loss_fn = prepare_model(cfg, run)
        distill = distillation.build_distillation(cfg, run, setup)
        loader, train_index, steps_per_epoch, global_batch = train_data.build_loader(
            cfg, run, setup, train_index, distill)
        if distill and cfg.distill_cache:
            distillation.cache_teacher_features(cfg, run, distill, loader.dataset)
        total_steps = cfg.max_steps or cfg.num_epochs * steps_per_epoch
        optimizer, scheduler, scaler = build_optimizer(cfg, run, model, total_steps, distill)
        job = Job(cfg, run, setup, model, loss_fn, optimizer, scheduler, scaler, loader, val_index,
                  steps_per_epoch, total_steps, global_batch, ema=build_ema(cfg, setup.model),
                  distill=distill)
        state = resume(job, train_index)
        runtime.open_tensorboard(run)
        job.views = start_views(job, train_index, state)
        job.timing.startup_s = time.perf_counter() - started
        stop_reason = train(job, state)
        return finish(job, state, stop_reason)
    finally:
        runtime.close_run(run)


# ----------------------------------------------------------------------------------------------
# Before the loop: the model, resume, TensorBoard's views


def prepare_model(cfg, run):
    """The model with its trainable parts chosen, wrapped for compile and DDP; and the loss."""
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


def resume(job, train_index):
    """A new TrainState, or the one of the checkpoint to resume (--resume auto or a path) with
    its weights, optimiser, schedule, loss scale and random generators restored."""
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


def start_views(job, train_index, state):
    """TensorBoard's views beyond the scalars (rank 0): the settings, data and HParams now,
    pictures at each validation, the projector at the end."""
    if job.run.writer is None:
        return None
    return tensorboard_views.Views.start(job, train_index, state)


# ----------------------------------------------------------------------------------------------
# The loop

def train(job, state):
    """The loop: epochs until the run is done or stopped. Returns why it stopped early, or None.

    Any error after the first step saves last.pt (if the weights are finite) before it is
    reported: no error loses the steps already trained.
    """
    run, cfg = job.run, job.cfg
    run.log.info(f"training {job.total_steps} steps ({job.steps_per_epoch} per epoch) with a global "
                 f"batch of {job.global_batch}")
    started, stop_reason = time.perf_counter(), None
    stop = runtime.StopRequest()
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
    run, cfg = job.run, job.cfg
    job.loader.set_epoch(state.epoch, start=state.samples_in_epoch, order=epoch_order(job, state))
    batches = iter(job.loader)
    progress = tqdm(total=job.steps_per_epoch, initial=state.samples_in_epoch // job.global_batch,
                    desc=f"epoch {state.epoch}", disable=not run.is_main, dynamic_ncols=True)
    window = Window(run.device)
    job.model.train()
    try:
        while state.step < job.total_steps:
            asked = time.perf_counter()
            micro_batches = next_micro_batches(job, state, batches)
            waited = time.perf_counter() - asked
            window.wait += waited
            job.timing.data_wait_s += waited
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
        order = torch.empty(len(job.loader.dataset) // job.global_batch * job.global_batch, dtype=torch.long)
        if job.run.is_main:
            order[:] = torch.from_numpy(mine_hard_batches(job, state.epoch))
        if job.run.distributed:
            dist.broadcast(order, src=0)
        state.epoch_order = (state.epoch, order)
    return state.epoch_order[1]


HARD_NEIGHBOURS = 3     # a hard group: an item and its 3 nearest neighbours


def mine_hard_batches(job, epoch):
    """Embed the caption every training item shows this epoch with the current weights, find
    each one's nearest neighbours, and order the epoch into hard-negative batches
    (data_loader.neighbourhood_order). Its cost is logged and counted in the timing."""
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
    new = list(dict.fromkeys(m for m in messages if m not in state.unreadable))
    if new and job.cfg.strict_data:
        raise DataError(f"{new[0]} (--strict_data stops at the first unreadable image)")
    report_skipped(job.run.log.warning, "unreadable image", new, named_before=len(state.unreadable))
    state.unreadable.extend(new)


class Window:
    """Sums over the steps between two log lines."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
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
        return Stop(StopKind.NON_FINITE, f"{state.bad_steps} non-finite losses in a row")
    reason = None
    if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < job.total_steps:
        reason = validate(job, state)
    if state.step % cfg.save_every == 0:
        save_last(job, state)
    if runtime.agree(job.run, stop.reason is not None):
        reason = Stop(StopKind.SIGNAL, f"{stop.reason or 'signal'} received")
    elif cfg.stop_at_step and state.step >= cfg.stop_at_step:
        reason = reason or Stop(StopKind.STOP_AT_STEP, f"stop_at_step {cfg.stop_at_step} reached")
    return reason


def validate(job, state):
    """Retrieval metrics on the validation set (and zero-shot accuracy with val_zeroshot), of the
    weights and of their moving average (ema_decay), computed once, on rank 0. Saves best.pt when
    either beats the best so far. Returns the early-stopping reason, or None."""
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
            stop = Stop(StopKind.NO_GAIN, f"no gain in {cfg.best_metric} for "
                                          f"{cfg.early_stopping_patience} validations")
    if runtime.agree(run, stop is not None):     # every rank stops, not only the one that decided
        return stop or Stop(StopKind.NO_GAIN, "rank 0 stopped early: no gain in the best metric")
    return None


def evaluate_weights(job, setup):
    """The validation metrics of one set of weights: retrieval, and zero-shot with val_zeroshot."""
    cfg, run = job.cfg, job.run
    options = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=run.device,
                   precision=run.precision, strict=cfg.strict_data)
    metrics = evaluation.evaluate_model(setup, job.val_index, **options)
    if cfg.val_zeroshot:
        zeroshot = evaluation.evaluate_zeroshot(setup, cfg.val_zeroshot, **options)
        metrics["zeroshot"] = {key: zeroshot[key] for key in ZEROSHOT_METRICS}
    return metrics


def show_validation(job, state):
    """TensorBoard's pictures of this validation, timed apart (they are a part of validation_s)."""
    if job.views is not None:
        started = time.perf_counter()
        job.views.validation(job, state)
        job.timing.tensorboard_s += time.perf_counter() - started


def ema_setup(job):
    """The ClipSetup of the moving average of the weights."""
    return clip_model.ClipSetup(job.ema.module, job.setup.tokenizer, job.setup.preprocess_cfg,
                                job.setup.model_name, job.setup.model_config)


def record_validation(job, state, metrics):
    """Add a validation to the history and TensorBoard; returns whether it is a new best (of the
    weights or of their average)."""
    state.history["val"].append({"step": state.step, "epoch": state.epoch, **metrics})
    if job.run.writer:
        for name, value in evaluation.flatten_metrics(metrics).items():
            job.run.writer.add_scalar(name, value, state.step)
    if len(state.history["val"]) == 1:
        skipped = metrics["skipped_images"]
        report_skipped(job.run.log.warning, "unreadable validation image", skipped["first"], skipped["count"])
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


# ----------------------------------------------------------------------------------------------
# Checkpoints and results

def weights_are_finite(model):
    return all(torch.isfinite(w).all() for w in model.state_dict().values() if w.is_floating_point())


def save_last(job, state, after_error=None):
    """last.pt: everything a resumed run needs. Never written from non-finite weights; after an
    error it is attempted once and its own failure is logged, not raised over the first error."""
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
    results = {"config": vars(job.cfg), "history": state.history,
               "final": state.history["val"][-1] if state.history["val"] else None,
               "best": state.best, "checkpoint": str(job.run.checkpoint_dir / "best.pt"),
               "unreadable_images": skipped_summary(state.unreadable)}
    files.write_json(job.run.results_dir / "training_results.json", results)
    return results


def resume_command(job):
    return f"python train.py --run_name {job.run.name} --resume auto (with the same settings)"


def finish(job, state, stop_reason):
    """The end: the last results and curves, a summary line, and what the run measured."""
    run = job.run
    if state.unreadable:
        run.log.warning(f"{len(state.unreadable)} unreadable images were skipped in total")
    if stop_reason and stop_reason.kind is StopKind.NON_FINITE:
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
        run.log.info(f"{'finished' if finished else f'stopped: {stop_reason}'} at step {state.step}; "
                     f"best {job.cfg.best_metric} {state.best['value']} at step {state.best['step']}; "
                     f"checkpoints in {run.checkpoint_dir}, TensorBoard: tensorboard --logdir "
                     f"{job.cfg.log_dir}")
        if not finished:
            run.log.info(f"continue with: {resume_command(job)}")
    return {"run_name": run.name, "step": state.step, "best": state.best, "history": state.history,
            "checkpoint_dir": run.checkpoint_dir, "results_dir": run.results_dir,
            "log_dir": run.log_dir, "stop_reason": str(stop_reason) if stop_reason else None,
            "timing": {**asdict(job.timing), "train_samples_per_s": job.timing.train_samples_per_s}}


def plot_curves(results, path, log):
    save_figure(plot_training_curves(results), path)
    log.info(f"training curves: {path}")


if __name__ == "__main__":
    run_script(main, "train.py")
