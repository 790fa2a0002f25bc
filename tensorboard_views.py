"""What a training run shows in TensorBoard besides its curves: `tensorboard --logdir logs`.

    Images     at every validation, the similarity heatmap and the retrieval examples of the same
               few validation pairs, drawn by visualization.py: the step slider shows them change
    Projector  at the end, the image and caption features of a few hundred validation pairs, with
               thumbnails as sprites and captions as labels, to explore with PCA, t-SNE or UMAP
    HParams    the run's settings beside the best value each validation metric reached, so that
               the runs of a sweep can be sorted and compared
    Text       the resolved settings and a summary of the data, when the run starts (or resumes)

train.py makes these views on rank 0 only (`Views.start`), then calls `validation` at each
validation and `end` once. The pictures and the best metrics go through the run's reports
(reporting.py), so a run that reports to W&B shows them there too; the rest is TensorBoard's own.
They stay small and cheap whatever the data: both samples are a fixed number of pairs
(tensorboard_pairs, projector_pairs), chosen once per run with its seed from the validation set,
and only they are encoded (one small batch for the pictures; the validation metrics have encoded
the whole set already, but threading all its features out of the evaluation for eight rows would
cost more code than the batch costs time: bench/bench_tensorboard.py).
"""
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from tensorboard.plugins.hparams.summary_v2 import hparams_pb

import clip_model
import evaluation
import visualization
from errors import DataError
from settings import SCHEMA

PROJECTOR_TILE = 48          # pixels of a thumbnail in the projector's sprite
PICTURE_THUMBNAIL = 128      # the pictures draw thumbnails of this size (visualization.thumbnail)
RETRIEVAL_TOP_K = 5
# The HParams table's metric columns: the best value each of these validation metrics reached in
# the run (of the weights or of their moving average), written as best/<name> at each validation.
BEST_SHOWN = ("rsum", "mean_recall", "image_to_text/R@1", "text_to_image/R@1", "zeroshot/top1")


@dataclass
class Pairs:
    """Validation images, each with its first caption: a CaptionIndex of them and thumbnails."""
    index: object            # data_loader.CaptionIndex of the chosen images (all their captions)
    thumbnails: list         # PIL images no larger than PICTURE_THUMBNAIL pixels
    first_captions: np.ndarray   # row of each image's first caption in index's captions

    @property
    def captions(self):
        return [self.index.caption(int(j)) for j in self.first_captions]


@dataclass
class Views:
    """The views of one run (rank 0): the samples and what has been written."""
    reports: object          # reporting.Reports of the run: TensorBoard, W&B or both
    log: object
    val_index: object
    order: np.ndarray        # the validation images in the run's seeded order; samples come first
    pictures: Pairs = None   # None: tensorboard_pairs is 0
    failed: bool = False     # drawing failed once: the run goes on without pictures
    projected_at: int = None  # the step of the last projector written

    @property
    def writer(self):
        """TensorBoard's SummaryWriter, for what only TensorBoard shows; None without it."""
        return self.reports.tensorboard

    @classmethod
    def start(cls, job, train_index, state):
        """Write the text and HParams views, choose the samples, and load the pictures' pairs."""
        cfg, run = job.cfg, job.run
        order = np.random.default_rng(cfg.seed).permutation(job.val_index.num_images)
        views = cls(run.reports, run.log, job.val_index, order)
        if views.writer is not None:
            views.writer.add_text("run/settings", settings_markdown(cfg), state.step)
            views.writer.add_text("run/data", data_markdown(job, train_index), state.step)
            write_hparams(views.writer, run.name, {s.name: getattr(cfg, s.name) for s in SCHEMA
                                                   if s.section != "logging"})
        if cfg.tensorboard_pairs:
            views.pictures = load_pairs(job.val_index, order, cfg.tensorboard_pairs)
        return views

    def validation(self, job, state):
        """The pictures of this validation, the best metrics so far, and the projector when asked
        at every validation. A failure to draw is logged and turns the pictures off: they must not
        end a run."""
        write_best(self.reports, state.history["val"], state.step)
        if self.pictures is not None and not self.failed:
            try:
                self.write_pictures(job, state.step)
            except Exception as error:
                self.failed = True
                self.log.warning(f"the validation pictures failed at step {state.step} "
                                 f"({type(error).__name__}: {error}); the run goes on without "
                                 f"them (--tensorboard_pairs 0 turns them off)")
        if job.cfg.projector_every_validation and self.writer is not None:
            self.write_projector(job, state.step)

    def end(self, job, state):
        """The projector of the final weights (unless the last validation wrote it at this
        step), and the end of the HParams session: TensorBoard's only."""
        if self.writer is None:
            return
        if job.cfg.projector_pairs and self.projected_at != state.step:
            self.write_projector(job, state.step)
        self.writer.file_writer.add_summary(hparams_session_end(), state.step)
        self.writer.flush()

    def write_pictures(self, job, step):
        image_features, text_features = encode_pairs(job, self.pictures.index)
        text_features = text_features[self.pictures.first_captions]
        captions = self.pictures.captions
        heatmap = visualization.plot_similarity_heatmap(self.pictures.thumbnails, captions,
                                                        image_features, text_features)
        self.reports.image("val/similarity_heatmap", visualization.figure_pixels(heatmap), step)
        examples = visualization.plot_retrieval_examples(
            self.pictures.thumbnails, captions, image_features, text_features,
            np.arange(len(captions)), top_k=RETRIEVAL_TOP_K)
        self.reports.image("val/retrieval_examples", visualization.figure_pixels(examples), step)

    def write_projector(self, job, step):
        """The image features of projector_pairs validation pairs and the features of their first
        captions, as 2 x pairs points of one embedding: images with their thumbnails, captions
        with the same thumbnail faded, labelled by caption."""
        started = time.perf_counter()
        pairs = load_pairs(self.val_index, self.order, job.cfg.projector_pairs, PROJECTOR_TILE)
        image_features, text_features = encode_pairs(job, pairs.index)
        features = torch.cat([image_features, text_features[pairs.first_captions]])
        tiles = np.stack([visualization.thumbnail(image, PROJECTOR_TILE) for image in pairs.thumbnails])
        faded = 255 - (255 - tiles.astype(np.float32)) * 0.35      # a caption: its image, faded
        sprites = torch.from_numpy(np.concatenate([tiles, faded]) / 255).permute(0, 3, 1, 2)
        names = [os.path.basename(pairs.index.image_name(i)) for i in range(pairs.index.num_images)]
        captions = [" ".join(caption.split()) for caption in pairs.captions]   # no tab or newline
        # the projector labels points by the first column, and can colour them by "modality"
        metadata = [[caption, "image", name] for name, caption in zip(names, captions)] + \
                   [[caption, "caption", name] for name, caption in zip(names, captions)]
        self.writer.add_embedding(features, metadata, sprites.float(), step, tag="val_pairs",
                                  metadata_header=["caption", "modality", "image"])
        self.projected_at = step
        self.log.info(f"projector: {len(features)} points (images and captions) at step {step} "
                      f"in {time.perf_counter() - started:.1f}s")


def load_pairs(index, order, count, thumbnail_size=PICTURE_THUMBNAIL):
    """The first `count` readable images of `order` (an unreadable one is passed over: the
    validation metrics count it), with thumbnails."""
    numbers, thumbnails = [], []
    for i in order:
        if len(numbers) == count:
            break
        try:
            image = index.load_image(int(i))
        except DataError:
            continue
        image.thumbnail((thumbnail_size, thumbnail_size))
        numbers.append(int(i))
        thumbnails.append(image)
    chosen = index.subset(numbers)
    first_captions = np.array([chosen.captions_of(k)[0] for k in range(chosen.num_images)], dtype=np.int64)
    return Pairs(chosen, thumbnails, first_captions)


def encode_pairs(job, index):
    """Unit image and caption features of a small index by the weights being trained, in
    batches of the validation's size; no worker processes for so few images."""
    image_features, text_features, encoded = evaluation.encode_index(
        job.setup, index, batch_size=job.cfg.batch_size, num_workers=0, device=job.run.device,
        precision=job.run.precision)
    if encoded.num_images != index.num_images:
        raise RuntimeError(f"{index.num_images - encoded.num_images} images of the sample became "
                           f"unreadable during the run")
    return image_features, text_features


# ----------------------------------------------------------------------------------------------
# Text and HParams

def settings_markdown(cfg):
    """The resolved settings as a Markdown table by section, in config.json's notation; a value
    that is not the default is in bold, with the default beside it."""
    rows = ["| section | setting | value | default |", "|---|---|---|---|"]
    for s in SCHEMA:
        value, default = json.dumps(getattr(cfg, s.name)), json.dumps(s.default)
        if value == default:
            rows.append(f"| {s.section} | {s.name} | `{value}` | |")
        else:
            rows.append(f"| {s.section} | {s.name} | **`{value}`** | `{default}` |")
    return "\n".join(rows)


def data_markdown(job, train_index):
    """Sizes and sources of the training and validation data, the batch and the schedule."""
    val = job.val_index
    if train_index is None:
        training = f"| training | {len(job.loader.dataset)} per epoch | (streamed) | {job.cfg.data_dir} |"
    else:
        training = f"| training | {train_index.num_images} | {train_index.num_captions} | {train_index.source} |"
    skipped = len(train_index.skipped) if train_index is not None else 0
    return "\n".join([
        "| set | images | captions | source |", "|---|---:|---:|---|", training,
        f"| validation | {val.num_images} | {val.num_captions} | {val.source} |", "",
        f"Image files found missing when the data was read, and left out: {skipped} of the training "
        f"set, {len(val.skipped)} of the validation set (unreadable ones found later are counted "
        f"in the log and in val/skipped_images/count).", "",
        f"Global batch {job.global_batch} (batch_size {job.cfg.batch_size} x accum_steps "
        f"{job.cfg.accum_steps} x {job.run.world_size} processes), {job.steps_per_epoch} steps per "
        f"epoch, {job.total_steps} steps.", "",
        f"Model {job.setup.model_name}: {clip_model.count_parameters(job.raw_model):,} parameters, "
        f"{clip_model.count_parameters(job.raw_model, True):,} trainable."])


def write_hparams(writer, run_name, values):
    """The HParams plugin's experiment (the settings as hyperparameters, typed, with the
    choices of those that have them; the best/* metrics as columns) and this run's session."""
    kinds = {bool: api_pb2.DATA_TYPE_BOOL, str: api_pb2.DATA_TYPE_STRING,
             int: api_pb2.DATA_TYPE_FLOAT64, float: api_pb2.DATA_TYPE_FLOAT64}
    infos = []
    for s in (s for s in SCHEMA if s.name in values):
        info = api_pb2.HParamInfo(name=s.name, type=kinds[type(s.default)], description=s.help)
        domain = (False, True) if type(s.default) is bool else s.choices
        if domain:
            info.domain_discrete.extend(domain)
        infos.append(info)
    metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=f"best/{name}"),
                                  description=f"the best validation {name} of the run so far")
               for name in BEST_SHOWN]
    experiment = plugin_data_pb2.HParamsPluginData(
        experiment=api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics))
    writer.file_writer.add_summary(_hparams_summary(metadata.EXPERIMENT_TAG, experiment))
    writer.file_writer.add_summary(hparams_pb(values, trial_id=run_name))


def hparams_session_end():
    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS, end_time_secs=time.time())
    return _hparams_summary(metadata.SESSION_END_INFO_TAG,
                            plugin_data_pb2.HParamsPluginData(session_end_info=end))


def _hparams_summary(tag, plugin_data):
    """A Summary that carries HParams plugin data, as the plugin's own summary_v2 builds one."""
    summary = summary_pb2.Summary()
    summary.value.add(tag=tag, metadata=metadata.create_summary_metadata(plugin_data),
                      tensor=metadata.NULL_TENSOR)
    return summary


def write_best(reports, validations, step):
    """best/<name>: the best value of each BEST_SHOWN metric over the validations so far, of the
    weights or of their moving average (what the HParams table shows)."""
    best = {}
    for entry in validations:
        flat = evaluation.flatten_metrics({k: v for k, v in entry.items() if k not in ("step", "epoch")})
        for name in BEST_SHOWN:
            values = [flat[tag] for tag in (f"val/{name}", f"val/ema/{name}") if tag in flat]
            if values:
                best[name] = max(best.get(name, -np.inf), *values)
    reports.scalars({f"best/{name}": value for name, value in best.items()}, step)
