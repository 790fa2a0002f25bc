"""Distillation: a trained teacher the student learns from (--distill_from; docs/distillation.md).

A small model trained on few pairs learns faster when it is also asked to match a big model's
judgement of each batch: the teacher's similarities between every image and every caption of the
batch hold more than the one right answer per row the contrastive loss gives (which caption is
nearly right, which image is far off). The term itself is clip_model.DistillationLoss; this
module is what a teacher adds to a run of train.py: its settings checked, the teacher loaded and
frozen, the view of each sample it reads (augmentation.TeacherView), its output for a batch, its
features cached once when every epoch shows an image the same way, and the learned feature map
restored on resume.
"""
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import clip_model
import data_loader
from augmentation import TeacherView, TrainAugmentation
from errors import SettingsError, UserError


@dataclass
class Distillation:
    """What a teacher adds to a run: the frozen teacher, the view of each sample it reads, its
    output for a batch, and the distillation term (clip_model.DistillationLoss) with its share."""
    teacher: object            # clip_model.ClipSetup: frozen, in eval mode, never checkpointed;
                               # None once the cache holds all that is needed of it
    view: object               # augmentation.TeacherView: the teacher's inputs of a sample
    loss_fn: object            # clip_model.DistillationLoss, holding the feature map if any
    weight: float              # w: loss = (1 - w) x contrastive + w x distillation
    cache: dict = None         # --distill_cache: "images" [N, D], "texts" [M, D], "first_caption" [N],
                               # and the teacher's "logit_scale" and "logit_bias"

    def teacher_outputs(self, micro_batches, device, precision):
        """The teacher's output for a step's micro-batches, concatenated: features computed once,
        without gradient, at the run's precision (or read from the cache), and its scale and bias."""

        if self.cache is not None:
            ids = torch.cat([b["image_ids"] for b in micro_batches])
            choices = torch.cat([b["caption_choices"] for b in micro_batches])
            return {"image_features": self.cache["images"][ids],
                    "text_features": self.cache["texts"][self.cache["first_caption"][ids] + choices],
                    "logit_scale": self.cache["logit_scale"], "logit_bias": self.cache["logit_bias"]}
        with torch.no_grad(), clip_model.autocast(device, precision):
            outs = [self.teacher.model(b["teacher_images"], b["teacher_texts"]) for b in micro_batches]
        return {"image_features": torch.cat([out["image_features"] for out in outs]),
                "text_features": torch.cat([out["text_features"] for out in outs]),
                **teacher_temperature(self.teacher.model)}


def teacher_temperature(model):
    """The teacher's logit scale (exponentiated, as its forward returns it) and bias (SigLIP)."""
    return {"logit_scale": model.logit_scale.exp().detach(),
            "logit_bias": None if model.logit_bias is None else model.logit_bias.detach()}


def check_distillation(cfg):
    """The distillation settings fit together; checked before anything is loaded."""
    if not cfg.distill_from:
        given = [name for name in ("distill_pretrained", "distill_cache") if getattr(cfg, name)]
        if given:
            raise SettingsError(f"{', '.join(given)} without distill_from: name the teacher with "
                                f"--distill_from, or drop {given[0]}")
        return
    if cfg.distill_cache and cfg.augment:
        raise SettingsError("distill_cache computes the teacher's features of each image once, which "
                            "holds only when every epoch shows the image the same way: add --no-augment, "
                            "or drop --distill_cache")
    if cfg.distill_cache and data_loader.is_webdataset(cfg.data_dir):
        raise SettingsError(f"distill_cache needs an indexed data set; {cfg.data_dir} is a set of "
                            f"WebDataset shards, streamed: drop --distill_cache")
    kind = teacher_kind(cfg.distill_from)
    if kind != "name" and cfg.distill_pretrained:
        raise SettingsError(f"distill_pretrained applies to a teacher named by model; {cfg.distill_from} "
                            f"is a {kind} holding its own weights: drop --distill_pretrained")
    if kind == "name" and not cfg.distill_pretrained:
        raise SettingsError(f"distill_from {cfg.distill_from} names an architecture, and a teacher of "
                            f"random weights teaches nothing: give its weights with --distill_pretrained "
                            f"TAG|FILE, or a checkpoint or model folder as --distill_from")


def build_distillation(cfg, run, setup):
    """The teacher and the distillation term, or None when the run has no teacher.

    The teacher is frozen and in eval mode, runs at the run's precision, and is never saved in
    a checkpoint (last.pt keeps only the feature map the term learns). It may differ from the
    student in everything: architecture, width, image size, normalisation, tokenizer; each model
    reads its own inputs of the same samples (augmentation.TeacherView)."""
    if not cfg.distill_from or cfg.distill_weight == 0:
        if cfg.distill_from:
            run.log.warning("distill_weight 0: the teacher is not loaded, the run trains alone")
        return None
    teacher = load_teacher(cfg, run.device)
    teacher.model.eval().requires_grad_(False)
    if cfg.loss == "siglip" and teacher.model.logit_bias is None:
        raise SettingsError(f"distill_from {cfg.distill_from} is a softmax CLIP (no logit bias): a "
                            f"SigLIP student learns the teacher's probability of each pair, which needs "
                            f"a SigLIP teacher. Use --loss clip, or a SigLIP teacher")
    widths = (setup.model_config["embed_dim"], teacher.model_config["embed_dim"])
    loss_fn = clip_model.DistillationLoss(cfg.distill_temperature, sigmoid=cfg.loss == "siglip",
                                          local_loss=cfg.local_loss,
                                          feature_dims=widths if cfg.distill_features else None).to(run.device)
    if run.distributed and loss_fn.map is not None:
        dist.broadcast(loss_fn.map.data, src=0)   # DDP does this for the model's parameters only
    teacher_augmentation = TrainAugmentation(teacher.preprocess_cfg, augment=cfg.augment,
                                             crop_min_scale=cfg.crop_min_scale)
    view = TeacherView(teacher_augmentation, teacher.tokenizer)
    mapped = "" if not cfg.distill_features else \
        f", features matched through a learned {widths[0]} -> {widths[1]} map" if loss_fn.map is not None \
        else ", features matched directly"
    run.log.info(f"distilling from {cfg.distill_from} ({teacher.model_name}, "
                 f"{clip_model.count_parameters(teacher.model) / 1e6:.1f}M parameters, "
                 f"{view.augmentation.size[0]} px, {teacher.tokenizer.context_length} tokens): weight "
                 f"{cfg.distill_weight}, temperature {cfg.distill_temperature}{mapped}")
    return Distillation(teacher, view, loss_fn, cfg.distill_weight)


def teacher_kind(distill_from):
    """What --distill_from names: a "folder" (an open_clip model folder), a "checkpoint" of ours
    (any other file but a .json), or a "name" (an open_clip model name, preset or config .json)."""
    source = Path(distill_from)
    return "folder" if source.is_dir() else "checkpoint" if source.is_file() and source.suffix != ".json" \
        else "name"


def load_teacher(cfg, device):
    """The model --distill_from names (teacher_kind), with --distill_pretrained TAG|FILE for a name;
    its weights checked to be finite (clip_model.check_finite_weights)."""
    kind = teacher_kind(cfg.distill_from)
    try:
        if kind == "folder":
            teacher = clip_model.model_from_folder(cfg.distill_from, device)
        elif kind == "checkpoint":
            teacher = clip_model.model_from_checkpoint(cfg.distill_from, device)[0]
        else:
            teacher = clip_model.build_model(cfg.distill_from, cfg.distill_pretrained, device=device)
    except UserError as error:
        raise type(error)(f"teacher (distill_from {cfg.distill_from}): {error}") from None
    clip_model.check_finite_weights(teacher.model, f"teacher (distill_from {cfg.distill_from})")
    return teacher


def cache_teacher_features(cfg, run, distill, dataset):
    """--distill_cache: the teacher's features of every training image and caption, computed
    once. Without augmentation the teacher sees an image the same way every epoch (its view of
    the prepared image, fitted and centre-cropped), so one pass replaces a teacher forward per
    sample per epoch, and the teacher itself is released. What it costs: no augmentation, one pass
    up front, and the tables (N images + M captions, rows of the teacher's width) on the device;
    each process computes all of it."""

    started, index, view = time.perf_counter(), dataset.index, distill.view
    images = data_loader.TrainDataset(index, view.augmentation, view.tokenizer, seed=cfg.seed,
                                      cache=dataset.cache)
    ids = []

    def batches():
        for batch in data_loader.build_dataloader(images, cfg.batch_size, num_workers=cfg.num_workers,
                                                  train=False):
            ids.append(batch["image_ids"])
            yield view.augmentation.normalise(batch["images"])
    features = clip_model.encode_images(distill.teacher.model, batches(), run.device, run.precision)
    image_table = torch.zeros(index.num_images, features.shape[1])
    image_table[torch.cat(ids)] = features                 # unreadable images keep a row of zeros
    text_table = clip_model.encode_texts(distill.teacher.model, view.tokenizer, index.captions(),
                                         run.device, cfg.batch_size, run.precision).clone()
    first_caption = index.caption_range(np.arange(index.num_images))[0]
    distill.cache = {"images": image_table.to(run.device), "texts": text_table.to(run.device),
                     "first_caption": torch.from_numpy(first_caption).to(run.device),
                     **teacher_temperature(distill.teacher.model)}
    distill.teacher = None                   # its memory is free for the student
    run.log.info(f"distill_cache: the teacher's features of {index.num_images} images and "
                 f"{index.num_captions} captions in {time.perf_counter() - started:.1f} s")


def restore_distillation(job, checkpoint, path):
    """A resumed run's distillation feature map (the optimiser state loaded next expects it)."""
    saved = checkpoint.get("distillation") or {}
    own = job.distill.loss_fn.state_dict() if job.distill else {}
    shapes = [{name: list(t.shape) for name, t in d.items()} for d in (saved, own)]
    if shapes[0] != shapes[1]:
        raise SettingsError(f"resume {path}: its distillation feature map {shapes[0] or '(none)'} does "
                            f"not fit this run's {shapes[1] or '(none)'}: resume with the checkpoint's "
                            f"distill_from and distill_features, or start a new run from its weights "
                            f"with --pretrained {path}")
    if own:
        job.distill.loss_fn.load_state_dict(saved)
