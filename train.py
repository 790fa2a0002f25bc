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
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import budget
import clip_model
import data_loader
import distillation
import evaluation
import files
import reporting
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
    parse_duration,
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
    budget: dict = None               # time_budget: {"budget_s", "used_s", "plans"}
    wandb_id: str = None              # the W&B run reported to (report_to wandb), continued on resume

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
    tensorboard_s: float = 0.0    # the pictures at validations, TensorBoard's and W&B's (a part of validation_s)
    tensorboard_end_s: float = 0.0  # TensorBoard's projector and HParams at the end
    validations: int = 0
    checkpoints: int = 0          # last.pt writes
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
    views: object = None               # tensorboard_views.Views: pictures and best metrics, rank 0 only
    timing: Timing = field(default_factory=Timing)
    distill: object = None             # Distillation: the teacher and its term; None without
    caption: object = None             # clip_model.CaptionLoss of a captioner (CoCa); None without
    budget: object = None              # budget.Budget of a time_budget run; None without

    @property
    def raw_model(self):
        return self.setup.model

    @property
    def schedule(self):
        return self.scheduler.lr_lambdas[0]          # train_step.WarmupCosine


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
        setup, model, loss_fn, caption = prepare_model(cfg, run)
        distill = distillation.build_distillation(cfg, run, setup)
        loader, train_index, steps_per_epoch, global_batch = train_data.build_loader(
            cfg, run, setup, train_index, distill)
        if distill and cfg.distill_cache:
            distillation.cache_teacher_features(cfg, run, distill, loader.dataset)
        total_steps = cfg.max_steps or (UNPLANNED if cfg.time_budget else cfg.num_epochs * steps_per_epoch)
        optimizer, scheduler, scaler = build_optimizer(cfg, run, model, total_steps, distill)
        job = Job(cfg, run, setup, model, loss_fn, optimizer, scheduler, scaler, loader, val_index,
                  steps_per_epoch, total_steps, global_batch, ema=build_ema(cfg, setup.model),
                  distill=distill, caption=caption)
        state = resume(job, train_index)
        open_reports(job, state)
        job.budget = start_budget(job, state, budget.run_clock(started, count_imports=argv is None))
        job.views = start_views(job, train_index, state)
        job.timing.startup_s = time.perf_counter() - started
        stop_reason = train(job, state)
        summary = finish(job, state, stop_reason)
    except BaseException:
        runtime.close_run(run, failed=True)
        raise
    runtime.close_run(run)
    return summary


# ----------------------------------------------------------------------------------------------
# Before the loop: the model, resume, the reports, the time budget, TensorBoard's views

UNPLANNED = 10 ** 9     # the last step of a time-budget run before its first plan


def prepare_model(cfg, run):
    """The model with its trainable parts chosen, wrapped for compile and DDP; the contrastive
    loss, and a captioner's caption loss (None for other models). A captioner trained with
    caption_loss_weight 0 has its decoder frozen: nothing would train it, and AdamW's weight
    decay would still shrink it."""
    setup = clip_model.build_model(cfg.model_name, cfg.pretrained, device=run.device, loss=cfg.loss,
                                   patch_dropout=cfg.patch_dropout,
                                   grad_checkpointing=cfg.grad_checkpointing,
                                   context_length=cfg.context_length)
    captions = clip_model.is_captioner(setup.model) and cfg.caption_loss_weight > 0
    clip_model.freeze_for_finetuning(setup.model, cfg.freeze_backbone, cfg.lock_image, cfg.lock_text,
                                     lock_decoder=clip_model.is_captioner(setup.model) and not captions)
    run.log.info(f"model {setup.model_name}: {clip_model.count_parameters(setup.model) / 1e6:.1f}M "
                 f"parameters, {clip_model.count_parameters(setup.model, True) / 1e6:.1f}M trainable")
    model = torch.compile(setup.model) if cfg.compile else setup.model
    if run.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[run.device] if run.device.type == "cuda" else None)
    caption = clip_model.CaptionLoss(cfg.caption_loss_weight, setup.model.pad_id) if captions else None
    return setup, model, clip_model.create_loss(cfg.loss, local_loss=cfg.local_loss), caption


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
    job.scheduler.load_state_dict(checkpoint["scheduler"])     # with the schedule's plan
    if cfg.time_budget:
        job.total_steps = job.schedule.total
    elif job.schedule.total != job.total_steps:                 # max_steps or epochs changed
        job.schedule.replan(checkpoint["step"], job.total_steps)
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


def open_reports(job, state):
    """TensorBoard and W&B as report_to asks (rank 0). A resumed run reports to the W&B run its
    checkpoint names, and every checkpoint keeps the id of the one it reports to."""
    run = job.run
    if run.is_main:
        run.reports = reporting.open_reports(job.cfg, run.name, run.log_dir, run.log, state.wandb_id)
        if run.reports.wandb is not None:
            state.wandb_id = run.reports.wandb.id


def start_budget(job, state, clock):
    """The budget of a time_budget run, or None; a resumed run goes on with the budget its earlier
    parts left (the time they used up to their last save)."""
    cfg = job.cfg
    if not cfg.time_budget:
        return None
    budget_s = parse_duration(cfg.time_budget)
    state.budget = {**(state.budget or {"used_s": 0.0, "plans": []}), "budget_s": budget_s}
    return budget.Budget(budget_s, state.budget["used_s"],
                         val_items=job.val_index.num_images + job.val_index.num_captions,
                         batch_size=cfg.batch_size,
                         projector_items=2 * min(cfg.projector_pairs, job.val_index.num_images), clock=clock)


def start_views(job, train_index, state):
    """What the reports show beyond the scalars (rank 0): TensorBoard's settings, data and
    HParams now, pictures at each validation, the projector at the end."""
    if job.run.reports is None:
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
    if job.budget:
        run.log.info(f"training for a time budget of {cfg.time_budget} ({budget.format_duration(job.budget.elapsed())} "
                     f"used), {job.steps_per_epoch} steps per epoch with a global batch of {job.global_batch}; "
                     f"the last step is planned after {budget.PLAN_AFTER + 1} steps")
    else:
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
            unmask_tail(job, state)
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
        if job.run.reports:
            job.run.reports.scalars({"train/skipped_step": 1}, state.step - 1)


def log_train(job, state, result, window, progress):
    """A point of the training curves: history, reports and the progress bar; resets window."""
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
    if job.run.reports:
        job.run.reports.scalars({f"train/{key}": value for key, value in entry.items()
                                 if key not in ("step", "epoch")}, state.step)
    parts = {name: f"{entry[name]:.3f}" for name in window.terms}
    progress.set_postfix(loss=f"{entry['loss']:.3f}", **parts, lr=f"{entry['lr']:.1e}",
                         scale=f"{entry['logit_scale']:.1f}", sps=f"{entry['samples_per_s']:.0f}")
    window.reset()


def after_step(job, state, result, stop):
    """Validation, checkpoint and the stop decisions that follow a step; returns why to stop."""
    cfg = job.cfg
    if state.bad_steps >= cfg.max_bad_steps:
        return Stop(StopKind.NON_FINITE, f"{state.bad_steps} non-finite losses in a row")
    follow_budget(job, state)
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


def follow_budget(job, state):
    """A time-budget run times each step and plans its last step again: rank 0 decides, every
    rank follows, so that all stop at the same step."""
    if job.budget is None or not job.budget.measure(state.step, job.timing):
        return
    plan = None
    if job.run.is_main:
        plan = job.budget.plan(state.step, job.timing,
                               lambda total: budget.validations_left(state.step, total, job.cfg.eval_every,
                                                                     job.steps_per_epoch),
                               lambda total: budget.checkpoints_left(state.step, total, job.cfg.save_every))
    total = max(state.step, runtime.share(job.run, plan.total_steps if plan else 0))
    if total == state.step < job.total_steps:
        job.run.log.warning(f"time budget {job.cfg.time_budget}: no time left for another step at step "
                            f"{state.step}; ending now, before the rate has decayed")
    job.schedule.replan(state.step, total)
    job.total_steps = total
    if plan is not None:
        record_plan(job, state, plan)


def record_plan(job, state, plan):
    """TensorBoard gets the plan at each log step; the log and training_results.json the plans
    that move the end."""
    run, plans = job.run, state.budget["plans"]
    if run.reports and state.step % job.cfg.log_every == 0:
        run.reports.scalars({"budget/planned_steps": plan.total_steps, "budget/seconds_per_step": plan.step_s},
                            state.step)
    if not plans or abs(plan.total_steps - plans[-1]["total_steps"]) > budget.LOG_CHANGE * plans[-1]["total_steps"]:
        plans.append(asdict(plan))
        run.log.info(plan.describe(job.budget.budget_s))


def unmask_tail(job, state):
    """FLIP's unmasked tuning: the run's last patch_dropout_tail share of steps sees every patch."""
    dropout = getattr(job.raw_model.visual, "patch_dropout", None)
    if (job.cfg.patch_dropout_tail and getattr(dropout, "prob", 0) > 0
            and state.step >= (1 - job.cfg.patch_dropout_tail) * job.total_steps):
        dropout.prob = 0.0
        job.run.log.info(f"step {state.step}: patch dropout off for the last "
                         f"{job.total_steps - state.step} steps (patch_dropout_tail)")


def validate(job, state):
    """Retrieval metrics on the validation set (and zero-shot accuracy with val_zeroshot), of the
    weights and of their moving average (ema_decay), computed once, on rank 0. Saves best.pt when
    either beats the best so far. Returns the early-stopping reason, or None."""
    run, cfg = job.run, job.cfg
    stop = None
    if run.is_main:
        started = time.perf_counter()
        metrics = evaluate_weights(job, job.setup, captions=state.step >= job.total_steps)
        if job.ema is not None:
            metrics["ema"] = evaluate_weights(job, ema_setup(job))
        improved = record_validation(job, state, metrics)
        show_validation(job, state)
        job.model.train()
        elapsed = time.perf_counter() - started
        job.timing.validation_s += elapsed
        job.timing.validations += 1
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


def evaluate_weights(job, setup, captions=False):
    """The validation metrics of one set of weights: retrieval, zero-shot with val_zeroshot, and
    with `captions` (the run's last validation) a captioner's captions (val_captions)."""
    cfg, run = job.cfg, job.run
    options = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=run.device,
                   precision=run.precision, strict=cfg.strict_data)
    metrics = evaluation.evaluate_model(setup, job.val_index, **options)
    if cfg.val_zeroshot:
        zeroshot = evaluation.evaluate_zeroshot(setup, cfg.val_zeroshot, **options)
        metrics["zeroshot"] = {key: zeroshot[key] for key in ZEROSHOT_METRICS}
    if captions and cfg.val_captions and not cfg.time_budget and clip_model.is_captioner(setup.model):
        scored = evaluation.evaluate_captions(setup, job.val_index, num_images=cfg.val_captions,
                                              batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                              precision=run.precision)
        metrics["captioning"] = {key: scored[key] for key in (*evaluation.CAPTION_KEYS, "num_images")}
        first = scored["captions"][0]
        run.log.info(f"captions of {scored['num_images']} validation images (x100): " +
                     ", ".join(f"{name} {scored[key]:.2f}" for name, key in
                               zip(evaluation.CAPTION_SCORES, evaluation.CAPTION_KEYS)) +
                     f"; the first: '{first['generated']}' (given: '{first['references'][0]}')")
    return metrics


def show_validation(job, state):
    """The pictures of this validation, timed apart (they are a part of validation_s)."""
    if job.views is not None:
        started = time.perf_counter()
        job.views.validation(job, state)
        job.timing.tensorboard_s += time.perf_counter() - started


def ema_setup(job):
    """The ClipSetup of the moving average of the weights: the run's, with the averaged model."""
    return replace(job.setup, model=job.ema.module)


def is_new_best(job, state, value, metrics):
    """Whether weights that score `value` replace best.pt. A validation set of a few hundred items
    measures recall with a noise (one standard error, evaluation.standard_error) larger than the
    differences between late checkpoints, so picking the highest score picks noise. A new best
    must beat the old one by more than that noise; and at the end of a finished run, whose rate
    has decayed to 0, the final weights win unless the best beats them by more than it."""
    best = state.best["value"]
    if best is None:
        return True
    noise = evaluation.standard_error(metrics, job.cfg.best_metric, job.val_index.num_images,
                                      job.val_index.num_captions)
    if state.step >= job.total_steps and value >= best - noise:
        if value <= best + noise:
            job.run.log.info(f"final weights kept as best.pt: {job.cfg.best_metric} {value:.2f} is within the "
                             f"noise (+-{noise:.2f}) of the best {best:.2f} at step {state.best['step']}")
        return True
    return value > best + noise


def record_validation(job, state, metrics):
    """Add a validation to the history and the reports; returns whether it is a new best (of the
    weights or of their average)."""
    state.history["val"].append({"step": state.step, "epoch": state.epoch, **metrics})
    if job.run.reports:
        job.run.reports.scalars(evaluation.flatten_metrics(metrics), state.step)
    if len(state.history["val"]) == 1:
        skipped = metrics["skipped_images"]
        report_skipped(job.run.log.warning, "unreadable validation image", skipped["first"], skipped["count"])
    candidates = [("raw", metrics)] + ([("ema", metrics["ema"])] if "ema" in metrics else [])
    weights, scored = max(candidates, key=lambda candidate: metric_value(candidate[1], job.cfg.best_metric))
    value = metric_value(scored, job.cfg.best_metric)
    improved = is_new_best(job, state, value, scored)
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
    if job.budget:
        state.budget["used_s"] = job.budget.elapsed()
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
    job.timing.checkpoints += 1
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
    if job.budget:
        state.budget["used_s"] = job.budget.elapsed()
    results = {"config": vars(job.cfg), "history": state.history,
               "final": state.history["val"][-1] if state.history["val"] else None,
               "best": state.best, "checkpoint": str(job.run.checkpoint_dir / "best.pt"),
               "unreadable_images": skipped_summary(state.unreadable), "time_budget": state.budget}
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
        run.reports.summary(final_and_best(state))
        tensorboard = f", TensorBoard: tensorboard --logdir {job.cfg.log_dir}" if run.reports.tensorboard else ""
        run.log.info(f"{'finished' if finished else f'stopped: {stop_reason}'} at step {state.step}; "
                     f"best {job.cfg.best_metric} {state.best['value']} at step {state.best['step']}; "
                     f"checkpoints in {run.checkpoint_dir}{tensorboard}")
        if job.budget:
            run.log.info(f"time budget {job.cfg.time_budget}: {budget.format_duration(job.budget.elapsed())} "
                         f"used, {state.step} steps")
        if not finished:
            run.log.info(f"continue with: {resume_command(job)}")
    return {"run_name": run.name, "step": state.step, "best": state.best, "history": state.history,
            "checkpoint_dir": run.checkpoint_dir, "results_dir": run.results_dir,
            "log_dir": run.log_dir, "stop_reason": str(stop_reason) if stop_reason else None,
            "timing": {**asdict(job.timing), "train_samples_per_s": job.timing.train_samples_per_s}}


def final_and_best(state):
    """The run's summary in the reports: the last validation's metrics, under their names in the
    curves (val/rsum, ...), and best.pt's metric, value, step and weights (best_checkpoint/...)."""
    final = state.history["val"][-1] if state.history["val"] else {}
    metrics = evaluation.flatten_metrics({k: v for k, v in final.items() if k not in ("step", "epoch")})
    return {**metrics, **{f"best_checkpoint/{key}": value for key, value in state.best.items()}}


def plot_curves(results, path, log):
    save_figure(plot_training_curves(results), path)
    log.info(f"training curves: {path}")


if __name__ == "__main__":
    run_script(main, "train.py")
