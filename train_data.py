"""The data of a training run: the training and validation indexes (or streamed shards), the
images cached once in memory where they fit, and the loader that makes an epoch's batches.
"""
import os
import time
from pathlib import Path

import torch.distributed as dist

import data_loader
import runtime
import sample_data
import shards
from augmentation import TrainAugmentation
from errors import SettingsError, report_skipped
from settings import DEFAULT_DATA_DIR


def load_data(cfg, run):
    """The training index (None when streaming shards) and the validation index."""
    if cfg.data_dir == DEFAULT_DATA_DIR and not Path(cfg.data_dir).exists():
        if run.is_main:
            run.log.info(f"{cfg.data_dir} not found: generating the sample data set there")
            sample_data.create_sample_dataset(cfg.data_dir, num_samples=2000, seed=0)
        if run.distributed:
            dist.barrier()
    read = dict(image_column=cfg.image_column, caption_column=cfg.caption_column, strict=cfg.strict_data)
    # WebDataset shards (a brace pattern, .tar or folder of shards) are streamed, not indexed,
    # so they cannot be split into training and validation images; a held-out shard can validate.
    streamed = data_loader.is_webdataset(cfg.data_dir)
    if streamed and not cfg.val_data:
        raise SettingsError(f"data_dir {cfg.data_dir} is a set of WebDataset shards, which are "
                            f"streamed and cannot be split: give --val_data (any format data_loader "
                            f"reads; to hold out a shard, e.g. --data_dir 'shards/{{00000..00008}}.tar' "
                            f"--val_data shards/00009.tar)")
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
        if index:
            report_skipped(run.log.warning, "missing image", index.skipped, total=len(index.skipped))
    training = (f"WebDataset shards {cfg.data_dir}" if streamed else
                f"{train_index.num_images} training images ({train_index.num_captions} captions)")
    run.log.info(f"data: {training}, {val_index.num_images} validation images "
                 f"({val_index.num_captions} captions)")
    return train_index, val_index


def build_loader(cfg, run, setup, train_index, distill=None):
    """The training batches, the training index (without the images found unreadable), and the
    steps of an epoch at the global batch size. The images of an index are decoded once into an
    ImageCache and its captions tokenised once when they fit in memory (cached_data). With a
    teacher, the images are prepared large enough for both models, and each sample brings the
    teacher's inputs too (its TeacherView) unless the teacher's features are cached."""
    augmentation = TrainAugmentation(setup.preprocess_cfg, augment=cfg.augment,
                                     min_side=distill.view.augmentation.side if distill else 0,
                                     crop_min_scale=cfg.crop_min_scale, colour_jitter=cfg.colour_jitter)
    teacher_view = distill.view if distill and not cfg.distill_cache else None
    cache = None
    if train_index is None:   # streamed: the dataset shares the shards out across ranks and workers
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
                        "with GOMP_SPINCOUNT=1000 in the environment (docs/troubleshooting.md: Slow training on a CPU)")
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
    if not cfg.cache_images:
        return train_index, None, None
    needed = data_loader.cache_estimate(train_index, augmentation)
    budget = runtime.available_memory() // 4 // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if needed > budget:
        run.log.info(f"not caching the training images: about {needed / 2**30:.1f} GiB at "
                     f"{augmentation.side} px, more than a quarter of the free memory "
                     f"({budget / 2**30:.1f} GiB); they are decoded every epoch (shards written with "
                     f"--resize {augmentation.side} make that cheaper)")
        return train_index, None, None
    started, before = time.perf_counter(), len(train_index.skipped)
    train_index, cache, tokens = data_loader.cache_training_data(train_index, augmentation, tokenizer,
                                                                 cfg.num_workers, strict=cfg.strict_data)
    report_skipped(run.log.warning, "unreadable image", train_index.skipped[before:])
    run.log.info(f"cached {len(cache)} training images at {augmentation.side} px "
                 f"({cache.nbytes / 2**20:.0f} MiB) and {len(tokens)} tokenised captions "
                 f"({tokens.nbytes / 2**20:.0f} MiB) in {time.perf_counter() - started:.1f} s")
    return train_index, cache, tokens
