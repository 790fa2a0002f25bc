"""WebDataset shards: stream training samples from tar files, and convert any data set into them.

A shard is a tar file (the container open_clip streams LAION from); the files of one sample share
a key, `KEY.jpg`, `KEY.txt`, ... Two layouts are read as they are:
  - img2dataset's (LAION, DataComp, CC3M/CC12M as people download them): `KEY.jpg|jpeg|png|webp`
    (the image), `KEY.txt` (the caption), `KEY.json` (metadata, not needed), and beside every
    `NNNNN.tar` a `NNNNN_stats.json` whose "successes" is the number of samples in the shard.
  - ours, written by `python shards.py --to_webdataset SRC OUT`: `KEY.jpg|png` and `KEY.json`
    holding {"captions": [every caption of the image], "image": its original name}, KEY the
    image's number in SRC, and `_info.json` beside the shards with every shard's sample count.
Train on them with `--data_dir 'DIR/{00000..00123}.tar'` (or the shards' folder); several
sources are joined with `::` and mixed (`WebDatasetTrain` says how). Validation and evaluation
read shards whole into an index instead (data_loader.py, format 6), and the reading of a shard's
samples is data_loader's (`shard_samples`, `shard_sample_text`).

Why sample counts matter: a stream cannot be counted without reading it, and training needs the
length of an epoch and, on many processes, the same number of samples on every rank (a rank that
runs out early leaves the others waiting forever in the all-gather of features). Counts come from
`_info.json`, else from img2dataset's `*_stats.json`, else the epoch's length is given with
`--train_num_samples` (as open_clip's `--train-num-samples`).

CLI: `python shards.py --to_webdataset SRC OUT` converts a data set; `--inspect PATTERN` shows what
a shard set holds and how its samples are counted.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from tqdm import tqdm

import data_loader
from data_loader import decode_image
from errors import DataError

SHARD_INFO = "_info.json"          # our converter's counts, beside the shards
STATS_SUFFIX = "_stats.json"       # img2dataset's, one per shard: NNNNN.tar -> NNNNN_stats.json
# Samples each reader mixes before yielding: shards hold a random mix of their set already (our
# converter shuffles; img2dataset keeps the order of its URL lists, which is arbitrary), so this
# only has to vary the batches from epoch to epoch.
SHUFFLE_BUFFER = 1000
# A sample id is `source number << SOURCE_SHIFT | id within the source` (see sample_id).
SOURCE_SHIFT, MAX_SOURCES = 55, 256


# ----------------------------------------------------------------------------- shard sets

@dataclass(frozen=True)
class ShardSet:
    """One source: its shard files and their sample counts (-1 where unknown)."""
    pattern: str
    urls: tuple[str, ...]
    counts: np.ndarray   # int64 [len(urls)]
    numbered: bool       # written by our converter: a sample's key is its image's number


def _read_info(folder: str) -> dict[str, int] | None:
    """{shard name: count} from our converter's _info.json in folder, or None without one."""
    path = os.path.join(folder, SHARD_INFO)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return {shard["name"]: int(shard["count"]) for shard in json.load(f)["shards"]}
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: expected {{\"shards\": [{{\"name\": ..., \"count\": ...}}, ...]}} "
                        f"({type(e).__name__}: {e})") from e


def _stats_count(url: str) -> int:
    """The sample count img2dataset wrote beside a shard ("successes" of NNNNN_stats.json), or -1."""
    path = url[:-len(".tar")] + STATS_SUFFIX
    if not os.path.isfile(path):
        return -1
    try:
        with open(path, encoding="utf-8") as f:
            return int(json.load(f)["successes"])
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: expected img2dataset's shard statistics with \"successes\", the "
                        f"shard's sample count ({type(e).__name__}: {e}); delete the file to count "
                        f"with --train_num_samples instead") from e


def read_shard_set(pattern: str) -> ShardSet:
    """The shard files of a brace pattern, a .tar file or a folder, with their sample counts."""
    urls = data_loader.shard_files(pattern)
    infos = {folder: _read_info(folder) for folder in {os.path.dirname(url) for url in urls}}
    counts = []
    for url in urls:
        folder, name = os.path.split(url)
        if infos[folder] is None:
            counts.append(_stats_count(url))
        elif name in infos[folder]:
            counts.append(infos[folder][name])
        else:
            raise DataError(f"{url}: not listed in {os.path.join(folder, SHARD_INFO)}; convert the set again")
    numbered = all(info is not None for info in infos.values())
    return ShardSet(pattern, tuple(urls), np.asarray(counts, dtype=np.int64), numbered)


def sample_id(source: int, shard_set: ShardSet, url: str, key: str) -> int:
    """A sample's integer id: what seeds its caption draw and augmentation, (seed, epoch, id), and
    what the loss compares.

    clip_model.ContrastiveLoss takes two rows of a batch with the same id for two captions of one
    image (positives of each other, never negatives), so different images must never share an id.
    Our converter's keys are the image numbers of the converted set, unique within it, and kept
    as ids: as the first source, a set trains on exactly the samples TrainDataset gives the
    original. Other keys
    (img2dataset's "000120034", or any text) are hashed with the shard's file name, which makes
    them unique across shards that restart their keys and stable when the data moves: 55 bits,
    so two images of a batch of 32,768 share an id with a probability of about 1.5e-8. The
    source's number goes into the top bits: sources whose keys coincide stay apart. (A sample
    drawn twice into one batch, as resampling can, is two rows with the same id, and the same
    caption and crop: the loss rightly counts them as one image.)
    """
    if shard_set.numbered:
        if not key.isdigit():
            raise DataError(f"{url}, sample {key}: our converter's keys are image numbers; "
                            f"convert the set again")
        local = int(key)
    else:
        digest = hashlib.blake2b(f"{os.path.basename(url)}/{key}".encode("utf-8"), digest_size=8).digest()
        local = int.from_bytes(digest, "little")
    return source << SOURCE_SHIFT | local & ((1 << SOURCE_SHIFT) - 1)


# ----------------------------------------------------------------------------- an epoch's shards

def _deal_shards(counts: np.ndarray, seed: int, epoch: int, start: int, readers: int) -> list[np.ndarray]:
    """Each reader's shards for an epoch: in an order seeded with (seed, epoch), the shards that
    the first `start` samples of that order fill are skipped, the last len % readers sit the epoch
    out, and the rest go round-robin to the readers."""
    order = np.random.default_rng((seed, epoch)).permutation(len(counts))
    order = order[np.searchsorted(np.cumsum(counts[order]), start, side="right"):]
    order = order[:len(order) // readers * readers]
    return [order[r::readers] for r in range(readers)]


def _shuffled(samples, seed: str):
    """The samples through a shuffle buffer of SHUFFLE_BUFFER, seeded."""
    return wds.shuffle(SHUFFLE_BUFFER, SHUFFLE_BUFFER, seed=seed)(samples)


def _draw(shards: np.ndarray, probabilities: np.ndarray, rng: np.random.Generator):
    """Shards drawn with replacement, endlessly."""
    while True:
        yield shards[rng.choice(len(shards), p=probabilities)]


def _mix(streams: list, weights: np.ndarray, rng: np.random.Generator):
    """Each next sample from stream s with probability weights[s]: sources mix sample by sample."""
    while True:
        yield next(streams[rng.choice(len(streams), p=weights)])


def _shard_table(sources: list[ShardSet], num_samples: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Every shard of every source: (files, source numbers, sample counts). Unknown counts (no
    _info.json, no _stats.json) are taken as an even share of num_samples, which they require;
    shards known to be empty (img2dataset's, when every download failed) are left out."""
    urls = [url for source in sources for url in source.urls]
    source_of = np.concatenate([np.full(len(source.urls), k) for k, source in enumerate(sources)])
    counts = np.concatenate([source.counts for source in sources])
    unknown = np.flatnonzero(counts < 0)
    if len(unknown) and not num_samples:
        url = urls[unknown[0]]
        raise DataError(f"{url}: the shard's sample count is unknown (no {SHARD_INFO} and no "
                        f"{os.path.basename(url)[:-len('.tar')]}{STATS_SUFFIX} beside it): keep "
                        f"img2dataset's *{STATS_SUFFIX} files with the shards, or give the epoch's "
                        f"length with --train_num_samples N")
    counts = np.where(counts < 0, max(1, round(num_samples / len(counts))), counts)
    keep = counts > 0
    for k, source in enumerate(sources):
        if not keep[source_of == k].any():
            raise DataError(f"{source.pattern}: its shards hold no sample")
    return [url for url, kept in zip(urls, keep) if kept], source_of[keep], counts[keep]


def _source_weights(weights: str, resampled: bool, sources: list[ShardSet], shard_source: np.ndarray,
                    counts: np.ndarray) -> np.ndarray:
    """Each source's share of the samples: --data_weights normalised, else by size."""
    if not weights:
        sizes = np.array([counts[shard_source == k].sum() for k in range(len(sources))], dtype=np.float64)
        return sizes / sizes.sum()
    if not resampled:
        raise DataError("--data_weights needs --data_resampled: without replacement every sample is "
                        "read once per epoch, so the sources mix in proportion to their sizes")
    try:
        values = np.array([float(w) for w in weights.split(",")])
    except ValueError:
        raise DataError(f"--data_weights {weights!r}: expected numbers separated by commas, "
                        f"e.g. 1,3") from None
    if len(values) != len(sources) or not (values > 0).all() or not np.isfinite(values).all():
        raise DataError(f"--data_weights {weights!r}: expected {len(sources)} positive numbers, one per "
                        f"source of --data_dir ({data_loader.SOURCE_SEPARATOR.join(s.pattern for s in sources)})")
    return values / values.sum()


class WebDatasetTrain(IterableDataset):
    """TrainDataset's samples (data_loader.train_sample) or FailedSamples, streamed from tar shards.

    A sample's caption (one of its captions, for our converter's shards) and augmentation are
    drawn with (seed, epoch, id), as TrainDataset does, whatever reads it; `sample_id` says how
    ids are made. A sample without a caption or with an unreadable image is a FailedSample: the
    training loop skips and names it, or stops with --strict_data.

    Sharing out an epoch. The readers are the world_size ranks x DataLoader workers, and every
    reader yields the same number of samples (ranks must make the same number of batches).
      - Without resampling, every shard of every source is read at most once per epoch. The
        shards, in an order seeded with (seed, epoch), are dealt round-robin to the readers; the
        last len % readers of that order sit the epoch out (different ones each epoch). A reader
        streams its shards through a shuffle buffer and yields as many samples as the reader with
        the fewest has, so those left out are the sat-out shards plus the surplus of the fuller
        readers: with equal shards fewer than 2 x readers x shard size; keep the shards >= 10 x
        readers to leave out < 10%. Sources mix in proportion to their sizes.
      - With `num_samples` (--train_num_samples) the epoch has that many samples instead: a
        reader that finishes its shards starts them over in a new order.
      - With `resampled` (--data_resampled, as open_clip), each reader draws shards with
        replacement, independently of the others: any number of shards serves any number of
        readers, and `weights` set each source's share of the samples (sources are drawn sample by
        sample; within a source a shard's chance is proportional to its count). An epoch is then
        `num_samples` draws (default: the sources' total).
    (The DataLoader also drops each worker's last partial batch.) `len()` is the epoch's length.

    Resuming mid-epoch (`set_epoch(epoch, start)`, start = samples consumed by all ranks together).
    Without resampling the shards that the first `start` samples of the epoch's order fill are
    skipped unread; the readers had been reading their shards in parallel (and through the
    buffer), so up to about readers x (shard_size + SHUFFLE_BUFFER) samples are seen twice or not
    at all in that epoch. With resampling the rest of the epoch is drawn afresh (seeded with
    start too). An epoch started from 0 is the same for the same number of readers.
    """

    yields_train_samples = True  # build_dataloader collates them with data_loader.collate_batch

    def __init__(self, data_dir, augmentation, tokenizer, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_samples: int = 0, weights: str = "", resampled: bool = False, teacher_view=None):
        self.data_dir, self.augmentation, self.tokenizer = str(data_dir), augmentation, tokenizer
        self.teacher_view = teacher_view   # augmentation.TeacherView: the teacher's inputs too
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.resampled, self.num_samples = resampled, num_samples
        self.sources = [read_shard_set(pattern) for pattern in data_loader.split_sources(self.data_dir)]
        if len(self.sources) > MAX_SOURCES:
            raise DataError(f"{len(self.sources)} sources: at most {MAX_SOURCES} can be mixed")
        # one entry per shard of every source: its file, its source's number, its count
        self.urls, self.shard_source, self.counts = _shard_table(self.sources, num_samples)
        self.weights = _source_weights(weights, resampled, self.sources, self.shard_source, self.counts)
        # epoch and start, in shared memory so that persistent DataLoader workers see them
        self._position = torch.zeros(2, dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int, start: int = 0):
        self._position[0], self._position[1] = epoch, start

    def __len__(self) -> int:
        return int(self.num_samples or self.counts.sum())

    def __iter__(self):
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        readers, reader = self.world_size * num_workers, self.rank * num_workers + worker_id
        epoch, start = (int(v) for v in self._position)
        if self.resampled:
            samples = self._resampled_stream(epoch, start, reader)
            quota, exact = (len(self) - start) // readers, False
        else:
            samples, quota, exact = self._dealt_stream(epoch, start, readers, reader)
        count = 0
        for sample in itertools.islice(samples, quota):
            count += 1
            yield self._sample(sample, epoch)
        if exact and count < quota:
            raise DataError(f"{self.data_dir}: reader {reader} found {count} samples in its shards, "
                            f"fewer than their counts say ({quota} or more); the shards changed after "
                            f"their counts were written")

    def _dealt_stream(self, epoch: int, start: int, readers: int, reader: int):
        """This reader's samples without replacement, the number it yields, and whether the counts
        promise that many (with num_samples they need not: the shards are read again, pass after
        pass, each pass in a new order and through its own shuffle buffer, so that no sample comes
        twice before every one came once)."""
        if len(self.urls) < readers:
            raise DataError(f"{self.data_dir}: {len(self.urls)} shards cannot be shared by {readers} readers "
                            f"({self.world_size} ranks x readers per rank); use fewer DataLoader workers, "
                            f"more shards, or --data_resampled")
        dealt = _deal_shards(self.counts, self.seed, epoch, start, readers)
        mine, rng = dealt[reader], np.random.default_rng((self.seed, epoch, reader))

        def passes():
            for n in itertools.count() if self.num_samples else range(1):
                order = mine if n == 0 else rng.permutation(mine)
                yield from _shuffled(self._read(order, len(order)), f"{self.seed}-{epoch}-{reader}-{n}")
        if self.num_samples:
            return passes(), (len(self) - start) // readers, False
        return passes(), int(min(self.counts[s].sum() for s in dealt)) if len(mine) else 0, True

    def _resampled_stream(self, epoch: int, start: int, reader: int):
        """This reader's samples drawn with replacement, sources mixed by their weights."""
        rng = np.random.default_rng((self.seed, epoch, start, reader))
        streams = []
        for k in range(len(self.sources)):
            shards = np.flatnonzero(self.shard_source == k)
            chance = self.counts[shards] / self.counts[shards].sum()
            # patience: a source of 1% non-empty shards still yields within 10 x its shard count
            streams.append(self._read(_draw(shards, chance, rng), 10 * len(shards)))
        return _shuffled(_mix(streams, self.weights, rng), f"{self.seed}-{epoch}-{start}-{reader}")

    def _read(self, shard_numbers, patience: int):
        """The samples of the given shards in turn. DataError if `patience` shards in a row hold
        none: an endless stream of empty shards would otherwise hang the run without a word."""
        empty = 0
        for k in shard_numbers:
            found = False
            for sample in data_loader.shard_samples(self.urls[k]):
                found = True
                yield {**sample, "__source__": int(self.shard_source[k])}
            empty = 0 if found else empty + 1
            if empty >= patience:
                raise DataError(f"{self.data_dir}: {empty} shards in a row hold no sample (the last: "
                                f"{self.urls[k]})")

    def _sample(self, sample: dict, epoch: int):
        url, key, source = sample["__url__"], sample["__key__"], sample["__source__"]
        i = sample_id(source, self.sources[source], url, key)
        captions, image_name, _ = data_loader.shard_sample_text(sample)
        problem = data_loader.shard_sample_problem(sample, captions, image_name)
        if problem:
            return data_loader.FailedSample(i, problem)
        image = next(sample[key] for key in data_loader.SHARD_IMAGE_KEYS if key in sample)
        try:
            pixels = self.augmentation.prepare(decode_image(image, image_name))
        except DataError as e:
            return data_loader.FailedSample(i, str(e))
        (choice,), (draw,) = data_loader.draw_samples(self, epoch, np.array([i]), np.array([-1]),
                                                      np.array([len(captions)]), [pixels.shape[:2]])
        return data_loader.train_sample(self, i, int(choice), pixels, draw, captions[choice])


# ----------------------------------------------------------------------------- the converter

def _shard_image(index: data_loader.CaptionIndex, i: int, resize: int) -> tuple[str, bytes]:
    """Image i for a shard as (extension, bytes): the stored bytes if they are JPEG or PNG and need
    no resizing (pixels stay exactly as they were), else decoded, resized and encoded again."""
    data = index.image_bytes(i)
    image = decode_image(data, index._label(i))  # decoded even when copied: a bad image is caught now
    with Image.open(io.BytesIO(data)) as header:
        kind = header.format
    extension, shorter = "png" if kind == "PNG" else "jpg", min(image.size)
    if kind in ("JPEG", "PNG") and not 0 < resize < shorter:
        return extension, data
    if 0 < resize < shorter:
        image = image.resize((round(image.width * resize / shorter), round(image.height * resize / shorter)),
                             Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG" if extension == "png" else "JPEG", quality=95)
    return extension, buffer.getvalue()


def convert_to_webdataset(src, out_dir, shard_size: int = 10000, resize: int = 0, seed: int = 0,
                          **read) -> dict:
    """Write a data set that load_caption_index reads (`read`: its options) as WebDataset shards
    out_dir/00000.tar, 00001.tar, ... of shard_size samples, and out_dir/_info.json.

    One sample per image: `<key>.jpg` or `.png` and `<key>.json` with all its captions and the
    original image name; the key is the image's number in the source. Images go into the shards
    in a seeded random order, so that every shard is a random sample of the set (a reader streams
    one shard at a time). resize > 0 scales images whose shorter side is longer down to it,
    keeping the aspect ratio. Unreadable images are left out and listed in _info.json, which
    also records every shard's sample count. Returns that info.
    """
    out_dir = str(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir}: folder exists and is not empty; choose a new folder or delete it")
    index = data_loader.load_caption_index(src, **read)
    os.makedirs(out_dir, exist_ok=True)
    shards, skipped, tar = [], [], None
    for i in tqdm(np.random.default_rng(seed).permutation(index.num_images), desc="converting", unit="image"):
        try:
            extension, data = _shard_image(index, int(i), resize)
        except DataError as e:
            skipped.append(str(e))
            continue
        if tar is None or shards[-1]["count"] == shard_size:
            if tar is not None:
                tar.close()
            shards.append({"name": f"{len(shards):05d}.tar", "count": 0})
            tar = wds.TarWriter(os.path.join(out_dir, shards[-1]["name"]), encoder=False, mtime=0)
        captions = [index.caption(int(j)) for j in index.captions_of(i)]
        tar.write({"__key__": f"{i:09d}", extension: data,
                   "json": json.dumps({"captions": captions, "image": index.image_name(i)},
                                      ensure_ascii=False).encode("utf-8")})
        shards[-1]["count"] += 1
    if tar is None:
        raise DataError(f"{src}: no readable image ({len(skipped)} failed; first: {skipped[0]})")
    tar.close()
    info = {"source": index.source, "total": sum(s["count"] for s in shards), "shards": shards,
            "resize": resize or None, "seed": seed, "skipped": skipped}
    with open(os.path.join(out_dir, SHARD_INFO), "w", encoding="utf-8") as f:
        json.dump(info, f, ensure_ascii=False, indent=1)
    return info


# ----------------------------------------------------------------------------- command line

def inspect(data_dir, shown: int = 3) -> str:
    """What `--inspect` prints: each source's shards and how they are counted, and a few samples."""
    lines = []
    for k, pattern in enumerate(data_loader.split_sources(data_dir)):
        source = read_shard_set(pattern)
        known = source.counts[source.counts >= 0]
        how = (SHARD_INFO if source.numbered else f"*{STATS_SUFFIX}") if len(known) == len(source.counts) \
            else f"{len(source.counts) - len(known)} shards without counts: train with --train_num_samples"
        lines.append(f"source {k}: {pattern}: {len(source.urls)} shards, {int(known.sum())} samples "
                     f"counted ({how})")
        for sample in itertools.islice(data_loader.shard_samples(source.urls[0]), shown):
            captions, name, _ = data_loader.shard_sample_text(sample)
            files = ", ".join(sorted(key for key in sample if not key.startswith("__")))
            lines.append(f"  {name} [{files}]: {' | '.join(captions) or '(no caption)'}")
    return "\n".join(lines)


def build_parser():
    parser = argparse.ArgumentParser(description="Convert a data set to WebDataset shards, or show what "
                                                 "a set of shards holds (ours or img2dataset's).")
    add = parser.add_argument
    add("--to_webdataset", nargs=2, metavar=("SRC", "OUT"),
        help="convert data set SRC (any format data_loader.py reads) to shards in folder OUT")
    add("--shard_size", type=int, default=10000, help="samples per shard of --to_webdataset")
    add("--resize", type=int, default=0, help="--to_webdataset scales images whose shorter side is longer "
                                              "down to this many pixels; 0 keeps them as they are")
    add("--seed", type=int, default=0, help="seed of the order of images in the shards")
    add("--image_column", default="filepath", help="image column of a CSV/TSV SRC")
    add("--caption_column", default="title", help="caption column of a CSV/TSV SRC")
    add("--split", default="train", help="split of a Chinese-CLIP SRC folder")
    add("--inspect", metavar="PATTERN", help="show the shards of PATTERN ('dir/{00000..00099}.tar', a "
                                             "folder, or sources joined with '::'): counts and a few samples")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.to_webdataset or args.inspect):
        parser.error("give --to_webdataset SRC OUT or --inspect PATTERN")
    try:
        if args.to_webdataset:
            src, out = args.to_webdataset
            info = convert_to_webdataset(src, out, args.shard_size, args.resize, args.seed,
                                         image_column=args.image_column,
                                         caption_column=args.caption_column, split=args.split)
            for reason in info["skipped"][:5]:
                print(f"skipped {reason}")
            pattern = os.path.join(out, "{00000..%05d}.tar" % (len(info["shards"]) - 1))
            print(f"wrote {info['total']} samples in {len(info['shards'])} shards ({len(info['skipped'])} "
                  f"unreadable images skipped); train on them with --data_dir '{pattern}'")
        if args.inspect:
            print(inspect(args.inspect))
    except (DataError, FileExistsError) as e:
        sys.exit(f"shards.py: error: {e}")


if __name__ == "__main__":
    main()
