"""One optimiser step of CLIP training, and what shapes it: the optimiser, the schedule, the
moving average of the weights.

Read in this order: `optimizer_step` (the step as a whole), `plain_backward` (the CLIP step of
minimal_clip.py, with mixed precision), then the extras: `cached_backward` (gradient
accumulation that keeps every negative), `loss_terms` (a teacher's term, a captioner's),
`build_ema`. A `job` is train.Job: the model, loss, optimiser, schedule, loss scaler and
settings of a run.
"""
import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch.optim.swa_utils import AveragedModel

import clip_model

# ----------------------------------------------------------------------------------------------
# The optimiser and the schedule


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


class WarmupCosine:
    """Learning-rate factor per step: linear warmup to 1, then cosine decay to 0 at `total`.

    The decay follows its progress p from 0 to 1, factor = (1 + cos(pi p)) / 2. p runs linearly
    from an anchor (step, p) to 1 at the last step: first from (warmup, 0), and replan() moves the
    end (a time budget that learns how fast the machine is) by anchoring p where it stands, so the
    rate of the current step stays and only the slope of the rest changes: no jump. An object
    rather than a closure, so that LambdaLR saves its plan in the checkpoint. A warmup longer than
    the run is capped at the run's length, and every denominator is at least 1.
    """

    def __init__(self, total_steps, warmup_steps):
        self.warmup = min(warmup_steps, total_steps)
        self.total = total_steps
        self.anchor = (self.warmup, 0.0)

    def progress(self, step):
        start, done = self.anchor
        return min(1.0, done + (step - start) / max(1, self.total - start) * (1 - done))

    def __call__(self, step):
        if step < self.warmup:
            return (step + 1) / self.warmup
        return 0.5 * (1 + math.cos(math.pi * self.progress(step)))

    def replan(self, step, total_steps):
        """End the decay at total_steps, continuing from the rate of `step`. Inside the warmup the
        decay has not started: only a warmup longer than half the new run is shortened (the one
        case where the rate rises faster than planned)."""
        if step < self.warmup:
            self.warmup = max(step + 1, min(self.warmup, total_steps // 2))
            self.anchor = (self.warmup, 0.0)
        else:
            self.anchor = (step, self.progress(step))
        self.total = total_steps


def warmup_for(total_steps, warmup_steps):
    """The warmup actually used: at most half the run, so that the other half can decay (a
    warmup as long as the run would end it at the peak rate). Returns (steps, warning or None)."""
    cap = total_steps // 2
    if warmup_steps <= cap:
        return warmup_steps, None
    return cap, (f"warmup_steps {warmup_steps} is more than half of this {total_steps}-step run: "
                 f"warming up for {cap} steps instead, so that the rate decays over the other half")


def build_optimizer(cfg, run, model, total_steps, distill=None):
    """AdamW over the trainable parameters (the distillation's feature map too), the
    warmup-cosine schedule, the fp16 loss scaler."""
    trained = torch.nn.ModuleList([model, distill.loss_fn]) if distill else model
    warmup, warning = warmup_for(total_steps, cfg.warmup_steps)
    if warning:
        run.log.warning(warning)
    # fused=True updates all parameters in one kernel instead of a Python loop over tensors
    # (faster on CPU and CUDA alike; bench/README.md).
    optimizer = torch.optim.AdamW(parameter_groups(trained, cfg.weight_decay), lr=cfg.learning_rate,
                                  betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                  fused=run.device.type in ("cuda", "cpu"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total_steps, warmup))
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.precision == "amp")
    return optimizer, scheduler, scaler


# ----------------------------------------------------------------------------------------------
# The step

@dataclass
class StepResult:
    loss: object          # tensor: the loss of the step (not synced)
    grad_norm: object     # tensor: the global gradient norm before clipping
    finite: bool          # False: the update was skipped
    terms: dict = field(default_factory=dict)   # the loss's parts, when it has several


def optimizer_step(job, micro_batches):
    """One optimiser step: backward, unscale, clip, finiteness check, step, schedule, clamp."""
    terms = backward_step(job.model, job.loss_fn, micro_batches, job.scaler, job.run.precision,
                          job.run.device, job.distill, job.caption)
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


def backward_step(model, loss_fn, micro_batches, scaler, precision, device, distill=None, caption=None):
    """Forward and backward for one optimiser step: the plain step for one micro-batch, gradient
    caching for several. Returns the loss terms (loss_terms: tensors, not synced). With a teacher
    (distill, a Distillation), its features of every micro-batch are computed once, before the
    passes, and serve all of them: it is frozen, there is nothing to recompute. With a captioner
    (caption, a clip_model.CaptionLoss), the label tokens of the whole step are counted before
    the passes: every pass divides by that count."""
    ids = torch.cat([b["image_ids"] for b in micro_batches]).to(device)
    teacher = distill.teacher_outputs(micro_batches, device, precision) if distill else None
    tokens = caption.label_tokens([b["texts"] for b in micro_batches]) if caption else None
    if len(micro_batches) == 1:
        return plain_backward(model, loss_fn, micro_batches[0], ids, scaler, precision, device,
                              distill, teacher, caption, tokens)
    return cached_backward(model, loss_fn, micro_batches, ids, scaler, precision, device,
                           distill, teacher, caption, tokens)


def plain_backward(model, loss_fn, batch, ids, scaler, precision, device, distill, teacher, caption, tokens):
    """The CLIP step: both towers on the batch, the contrastive loss, backward (through the loss
    scaler, which scales fp16 gradients up so that small ones do not underflow)."""
    with clip_model.autocast(device, precision):
        out = model(batch["images"], batch["texts"])
        terms = loss_terms(loss_fn, out, ids, distill, teacher, caption=caption, tokens=tokens)
    scaler.scale(terms["loss"]).backward()
    return {name: value.detach() for name, value in terms.items()}


def cached_backward(model, loss_fn, micro_batches, ids, scaler, precision, device, distill, teacher,
                    caption=None, tokens=None):
    """Gradient accumulation that keeps every negative of the accumulated batch (Gao et al. 2021,
    "gradient caching"; as open_clip and Chinese-CLIP do).

    First every micro-batch's features are computed without gradient; then each micro-batch is
    recomputed with gradient and the loss is taken over all features, its own live and the others
    cached. The gradients of the micro-batches add up to the gradient of one big batch, at the
    memory cost of one micro-batch. The temperature gets its gradient only once (from the last
    micro-batch): every pass sees the same full loss, so counting it in each would multiply its
    gradient by the number of micro-batches. It is the last pass because under DDP that is the
    one that synchronises gradients, and DDP expects every parameter in it. The distillation's
    feature map, like the temperature, gets its gradient in the last pass.

    "The gradient of one big batch" holds when the cached and the live pass compute the same
    features: it does not hold exactly with patch dropout (each pass drops other patches) or with
    BatchNorm in training mode (batch statistics of a micro-batch, and running statistics updated
    by both passes); LayerNorm towers (ViTs, the text transformer) are exact.

    A captioner's caption term is a sum over the tokens of each caption (clip_model.CaptionLoss):
    it needs no cache. Each pass adds its own micro-batch's cross-entropies, divided by the
    token count of the whole step, so the passes' gradients, and their terms, add up to the big
    batch's. The cached pass keeps only the features: the decoder's logits (B x T x 49,408 numbers
    a micro-batch), kept for every micro-batch, would cost more memory than accumulation saves.
    """
    with torch.no_grad(), clip_model.autocast(device, precision):
        cached = [{key: value for key, value in model(b["images"], b["texts"]).items() if key in FEATURES}
                  for b in micro_batches]
    caption_shares = []
    for j, batch in enumerate(micro_batches):
        last = j == len(micro_batches) - 1
        # DDP: synchronise gradients across processes only on the last backward
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with clip_model.autocast(device, precision):
                out = model(batch["images"], batch["texts"])
                image_features = torch.cat([out["image_features"] if i == j else c["image_features"]
                                            for i, c in enumerate(cached)])
                text_features = torch.cat([out["text_features"] if i == j else c["text_features"]
                                           for i, c in enumerate(cached)])
                scale, bias = out["logit_scale"], out.get("logit_bias")
                if not last:
                    scale, bias = scale.detach(), bias.detach() if bias is not None else None
                whole = {"image_features": image_features, "text_features": text_features,
                         "logit_scale": scale, "logit_bias": bias,
                         "logits": out.get("logits"), "labels": out.get("labels")}   # this pass's own
                terms = loss_terms(loss_fn, whole, ids, distill, teacher, last, caption, tokens)
            scaler.scale(terms["loss"]).backward()
        if caption is not None:
            caption_shares.append(terms["caption"].detach())
    terms = {name: value.detach() for name, value in terms.items()}
    if caption is not None:     # the last pass's terms hold its own share of the caption term
        share = sum(caption_shares)
        terms["loss"] = terms["loss"] + caption.weight * (share - terms["caption"])
        terms["caption"] = share
    return terms


# What a model's output holds of its features: all that the other micro-batches' passes need.
FEATURES = ("image_features", "text_features")


def loss_terms(loss_fn, out, ids, distill=None, teacher=None, last=True, caption=None, tokens=None):
    """The loss of the model's output `out`: {"loss": the contrastive loss}, or with a teacher
    {"loss": (1 - w) x contrastive + w x distillation, "contrastive": ..., "distillation": ...},
    w = --distill_weight. `last`: the pass that trains the distillation's feature map. A
    captioner (caption, a clip_model.CaptionLoss) adds w_c x its caption term over `tokens` label
    tokens (CaptionLoss.label_tokens), w_c = --caption_loss_weight: {..., "caption": ...}."""
    contrastive = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], ids,
                          out.get("logit_bias"))
    terms = {"loss": contrastive}
    if distill is not None:
        distill_term = distill.loss_fn(out, teacher, train_map=last)
        terms = {"loss": (1 - distill.weight) * contrastive + distill.weight * distill_term,
                 "contrastive": contrastive, "distillation": distill_term}
    if caption is not None:
        caption_term = caption(out["logits"], out["labels"], tokens)
        terms = {**terms, "loss": terms["loss"] + caption.weight * caption_term, "contrastive": contrastive,
                 "caption": caption_term}
    return terms


# ----------------------------------------------------------------------------------------------
# A moving average of the weights

def build_ema(cfg, model):
    """An exponential moving average of the weights (and buffers), or None when ema_decay is 0.

    Averaging the weights of the last few hundred steps smooths out the noise of single steps:
    the average often scores better than the weights themselves, above all late in a short run
    or in fine-tuning. After n updates the decay is min(ema_decay, (1 + n) / (10 + n)): early on
    the average follows the weights closely instead of remembering the random initial ones (as
    TensorFlow's ExponentialMovingAverage with num_updates does). torch's AveragedModel keeps
    the copy on the model's device. Buffers that are not saved with the weights (the text
    tower's causal mask, of -inf and 0) are constants, copied, not averaged: the average of -inf
    and -inf is NaN.
    """
    if not cfg.ema_decay:
        return None
    saved = set(model.state_dict())
    constants = {buffer.data_ptr() for name, buffer in model.named_buffers() if name not in saved}

    @torch.no_grad()
    def update(averages, weights, updates):
        decay = min(cfg.ema_decay, (1 + int(updates)) / (10 + int(updates)))
        averaged = [a.is_floating_point() and w.data_ptr() not in constants for a, w in zip(averages, weights)]
        if any(averaged):
            torch._foreach_lerp_([a for a, m in zip(averages, averaged) if m],
                                 [w for w, m in zip(weights, averaged) if m], 1 - decay)
        if not all(averaged):         # integer buffers (BatchNorm's step counter) and constants
            torch._foreach_copy_([a for a, m in zip(averages, averaged) if not m],
                                 [w for w, m in zip(weights, averaged) if not m])
    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)
