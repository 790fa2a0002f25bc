"""Data for CLIP: read (image, caption) pairs from any supported format and feed them to training.

CLIP learns a shared embedding space from pairs: an image and a sentence that describes it. Every
format is read into one `CaptionIndex` (images, their captions, which image each caption belongs
to); everything after loading works on that index only. Formats, detected from the path given:
  1. JSON index: a list of {"image_path": ..., "caption": "..."} or {..., "captions": [...]};
     relative image paths resolve against the index file's folder; or a folder holding data.json.
  2. A folder with images/NAME.ext and captions/NAME.txt (one caption per non-empty line).
  3. A CSV or TSV file with image and caption columns (default `filepath` and `title`, as in
     open_clip); the separator is the one that splits the header into those columns.
  4. The Chinese-CLIP layout (MUGE, Flickr30K-CN, COCO-CN): {split}_imgs.tsv holding
     `image_id<TAB>base64 image` plus {split}_texts.jsonl holding {"text_id", "text", "image_ids"}.
  5. Chinese-CLIP's LMDB folders, which its preprocessing makes of those files: lmdb/{split}/imgs
     (base64 images by image id) and lmdb/{split}/pairs (pickled (image_id, text_id, text)).
  6. WebDataset shards (img2dataset's or our converter's): a brace pattern such as
     'shards/{00000..00009}.tar', one .tar file or a folder of them, sources joined with '::'.
An image named more than once (COCO-style, one line per caption) is one image with several
captions: retrieval metrics must know that five captions describe the same picture.
Training streams shards instead of indexing them (shards.py): a set too large for one index.
What a training image goes through (crop, colour jitter) is augmentation.py's.
CLI: `python data_loader.py --make_sample DIR` writes a generated data set, `--inspect PATH` checks
that a data set loads.
"""
from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import os
import pickle
import random
import signal
import sys
import tarfile
from dataclasses import dataclass

import lmdb
import numpy as np
import open_clip
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, group_by_keys

import prepare_image
from augmentation import AugmentationDraw, TeacherView, TrainAugmentation, sample_uniforms
from errors import DataError, short_repr
from sample_data import create_sample_dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# ----------------------------------------------------------------------------- the index

def _gather_ranges(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """arange(starts[k], starts[k] + lengths[k]) for every k, concatenated without a Python loop,
    and the offset of each range in the result."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1]), offsets


@dataclass(frozen=True)
class PackedStrings:
    """Many strings stored as one utf-8 byte buffer plus offsets.

    Why not a list of str: a million Python strings cost ~60 bytes of overhead each, and every
    DataLoader worker that reads them touches their reference counts, which makes a forked worker
    copy the memory pages holding them: gigabytes across workers. Two numpy arrays are two objects
    whatever their length, so forked workers keep sharing them (and spawned ones get one copy).
    """
    buffer: np.ndarray   # uint8: every string utf-8 encoded, back to back
    offsets: np.ndarray  # int64[n + 1]: string k is buffer[offsets[k]:offsets[k + 1]]

    @classmethod
    def pack(cls, strings) -> PackedStrings:
        encoded = [s.encode("utf-8") for s in strings]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)), out=offsets[1:])
        return cls(np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, k: int) -> str:
        return self.buffer[self.offsets[k]:self.offsets[k + 1]].tobytes().decode("utf-8")

    def take(self, indices: np.ndarray) -> PackedStrings:
        starts = self.offsets[indices]
        positions, offsets = _gather_ranges(starts, self.offsets[indices + 1] - starts)
        return PackedStrings(self.buffer[positions], offsets)


class CaptionIndex:
    """Images and their captions, whatever format they were read from.

    Captions are stored grouped by image: image i owns captions first_caption[i] ..
    first_caption[i + 1] - 1, so `caption_image` (caption j -> its image, what retrieval metrics
    need) and `captions_of(i)` (what training draws from) are array lookups.
    Images are files (names resolved against `image_root`), or base64 text inside the TSV file
    `tsv_path` (Chinese-CLIP layout), where `tsv_spans[i]` is the byte range of image i, or in the
    LMDB database `lmdb_path` under the image's id, or members of the tar files `shard_paths`
    (WebDataset shards), where `shard_spans[i]` is (file number, start, end) of image i's bytes:
    read and decoded on demand, so no image is held in memory.
    """

    def __init__(self, names: PackedStrings, captions: PackedStrings, first_caption: np.ndarray, source: str,
                 image_root: str = "", tsv_path: str | None = None, tsv_spans: np.ndarray | None = None,
                 lmdb_path: str | None = None, shard_paths: tuple = (), shard_spans: np.ndarray | None = None,
                 skipped: tuple = ()):
        self._names, self._captions, self._first_caption = names, captions, first_caption
        self.skipped = list(skipped)  # messages of the images of the source left out as unreadable
        self.num_images, self.num_captions = len(names), len(captions)
        self.caption_image = np.repeat(np.arange(len(names), dtype=np.int64), np.diff(first_caption))
        self.source, self.image_root, self.tsv_path, self.tsv_spans = source, image_root, tsv_path, tsv_spans
        self.lmdb_path, self.shard_paths, self.shard_spans = lmdb_path, tuple(shard_paths), shard_spans

    def caption(self, j: int) -> str:
        return self._captions[j]

    def captions(self) -> list[str]:
        return [self._captions[j] for j in range(self.num_captions)]

    def captions_of(self, i: int) -> np.ndarray:
        return np.arange(self._first_caption[i], self._first_caption[i + 1], dtype=np.int64)

    def caption_range(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each image's first caption and its number of captions."""
        first = self._first_caption[images]
        return first, self._first_caption[images + 1] - first

    def image_name(self, i: int) -> str:
        """The image's path (resolved), its id inside the TSV file or LMDB database, or its
        sample in the shards (shard_sample_text)."""
        stored = self.tsv_path or self.lmdb_path or self.shard_paths
        return self._names[i] if stored else os.path.join(self.image_root, self._names[i])

    def image_bytes(self, i: int) -> bytes:
        """The stored bytes of image i: the file's content or the tar member's, or the base64
        text of the TSV or LMDB decoded."""
        if self.shard_paths:
            shard, start, end = self.shard_spans[i]
            return _read_span(self.shard_paths[shard], start, end)
        if self.lmdb_path is not None:
            encoded = _lmdb_value(self.lmdb_path, self._names[i], self._label(i))
        elif self.tsv_path is None:
            try:
                with open(self.image_name(i), "rb") as f:
                    return f.read()
            except OSError as e:
                raise DataError(f"image '{self.image_name(i)}' cannot be read: {e.strerror}") from e
        else:
            encoded = _read_span(self.tsv_path, *self.tsv_spans[i])
        try:  # Chinese-CLIP writes url-safe base64; this decodes the standard alphabet too
            return base64.urlsafe_b64decode(encoded)
        except ValueError as e:
            raise DataError(f"image '{self._label(i)}' is not valid base64 ({e})") from e

    def load_image(self, i: int) -> Image.Image:
        """Image i in RGB; DataError naming the image if it cannot be read or decoded."""
        return decode_image(self.image_bytes(i), self._label(i))

    def _label(self, i: int) -> str:
        store = self.tsv_path or self.lmdb_path
        return f"{store}, image id {self._names[i]}" if store else self.image_name(i)

    def subset(self, image_indices) -> CaptionIndex:
        """The given images, each with all its captions (train/val splits)."""
        images = np.asarray(image_indices, dtype=np.int64)
        starts = self._first_caption[images]
        caption_ids, first_caption = _gather_ranges(starts, self._first_caption[images + 1] - starts)
        return CaptionIndex(self._names.take(images), self._captions.take(caption_ids), first_caption,
                            f"{self.source} [{len(images)} of {self.num_images} images]", self.image_root,
                            self.tsv_path, None if self.tsv_spans is None else self.tsv_spans[images],
                            self.lmdb_path, self.shard_paths,
                            None if self.shard_spans is None else self.shard_spans[images])

    def __repr__(self) -> str:
        return f"CaptionIndex({self.source}: {self.num_images} images, {self.num_captions} captions)"


# ----------------------------------------------------------------------------- images

def decode_image(data: bytes, name: str, min_side: int = 0, max_pixels: int = 0) -> Image.Image:
    """Decode image bytes to RGB as prepare_image.rgb converts them (EXIF orientation: phone photos
    are often stored sideways with a flag saying so; transparency on white), the conversion every
    export ships to its users. DataError naming the image if the bytes are not an image.

    A caller that needs a small image only (a search query, a thumbnail) passes min_side, the
    shorter side it needs, and the memory follows that instead of the file: a JPEG is decoded at
    1/2 to 1/8 scale (Pillow's draft, done in the DCT), then any image is shrunk by a whole factor
    (a box average) that keeps its shorter side at least 2 * min_side, room for the caller's own
    resize. max_pixels refuses an image that would decode to more pixels (after the JPEG scaling)
    before any pixel is decoded."""
    if not data:
        raise DataError(f"image '{name}' is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:  # Pillow decodes lazily: convert inside the try
            if min_side:
                image.draft("RGB", (2 * min_side, 2 * min_side))
            width, height = image.size
            if max_pixels and width * height > max_pixels:
                raise DataError(f"image '{name}' is {width} x {height} pixels ({width * height / 1e6:.0f} "
                                f"megapixels); the limit is {max_pixels / 1e6:.0f} megapixels")
            if min_side:
                image = _shrink(image, 2 * min_side)
            return prepare_image.rgb(image)
    except DataError:
        raise
    except Exception as e:  # Pillow raises many types for corrupt data (OSError, SyntaxError, ...)
        raise DataError(f"image '{name}' cannot be decoded ({type(e).__name__}: {e})") from e


def _shrink(image: Image.Image, min_side: int) -> Image.Image:
    """The image reduced by the largest whole factor that keeps its shorter side >= min_side."""
    factor = min(image.size) // min_side
    if factor < 2:
        return image
    # A box average of palette indices, of 1-bit pixels or around a transparent colour key means
    # nothing, and Pillow's 16-bit grey has no reduce: convert those first (convert keeps EXIF).
    if image.mode.startswith("I;16"):
        image = image.convert("I")
    elif image.mode in ("1", "P", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")
    return image.reduce(factor)


# ----------------------------------------------------------------------------- readers

def _clean_caption(caption, where: str, image) -> str:
    if not isinstance(caption, str) or not caption.strip():
        raise DataError(f"{where}: empty caption for image '{image}'")
    return caption.strip()


def _make_index(names: list[str], captions: list[str], owner, source: str, **storage) -> CaptionIndex:
    """Pack names and captions; captions are reordered (stably) so that each image's are contiguous."""
    owner = np.asarray(owner, dtype=np.int64)
    first_caption = np.zeros(len(names) + 1, dtype=np.int64)
    np.cumsum(np.bincount(owner, minlength=len(names)), out=first_caption[1:])
    ordered = (captions[k] for k in np.argsort(owner, kind="stable"))
    return CaptionIndex(PackedStrings.pack(names), PackedStrings.pack(ordered), first_caption, source,
                        **storage)


def _index_from_pairs(index_file: str, pairs: list[tuple[int, str, str]], strict: bool = False) -> CaptionIndex:
    """Index of (entry number, image path, caption) triples; an image named twice is one image.

    Missing image files are found now, not hours into training. Like every unreadable image they
    are left out (with their captions) and listed in `index.skipped`; strict=True stops at the
    first one instead, naming the index file, the entry and the resolved path.
    """
    if not pairs:
        raise DataError(f"{index_file}: no entries")
    image_of_name, first_entry = {}, []
    for entry, name, _ in pairs:
        if name not in image_of_name:
            image_of_name[name] = len(first_entry)
            first_entry.append(entry)
    names, root = list(image_of_name), os.path.dirname(os.path.abspath(index_file))
    missing = _missing_files([os.path.join(root, name) for name in names])
    messages = [f"{index_file}, entry {first_entry[k]}: image '{names[k]}' not found (resolved to "
                f"{os.path.join(root, names[k])})" for k in missing]
    if messages and (strict or len(missing) == len(names)):
        more = f"; {len(missing) - 1} more images are missing" if len(missing) > 1 else ""
        raise DataError(messages[0] + more)
    keep = np.ones(len(names), dtype=bool)
    keep[missing] = False
    number = np.cumsum(keep) - 1                       # new number of each kept image
    kept_pairs = [(image_of_name[name], caption) for _, name, caption in pairs if keep[image_of_name[name]]]
    return _make_index([name for name, kept in zip(names, keep) if kept],
                       [caption for _, caption in kept_pairs], [number[i] for i, _ in kept_pairs],
                       index_file, image_root=root, skipped=messages)


def _missing_files(paths: list[str]) -> list[int]:
    """Positions of the paths that are not files. One directory listing per folder instead of one
    stat() per image: a million images in a few folders are checked in about a second; stat()
    still decides for names not in the listing (they may differ only in case)."""
    listings, missing = {}, []
    for k, path in enumerate(paths):
        folder, base = os.path.split(path)
        if folder not in listings:
            try:
                listings[folder] = set(os.listdir(folder))
            except OSError:                              # missing, unreadable, a symlink loop
                listings[folder] = set()
        if base not in listings[folder] and not os.path.isfile(path):
            missing.append(k)
    return missing


def _read_json(path: str, strict: bool) -> CaptionIndex:
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate a byte-order mark
            entries = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a JSON list of {{\"image_path\": ..., \"caption\": ...}}, "
                        f"found a {type(entries).__name__}")
    pairs = []
    for k, entry in enumerate(entries):
        where = f"{path}, entry {k}"
        if not isinstance(entry, dict) or not isinstance(entry.get("image_path"), str):
            raise DataError(f"{where}: missing 'image_path' (each entry needs 'image_path' and 'caption' "
                            f"or 'captions')")
        image, captions = entry["image_path"], entry.get("captions", [entry.get("caption")])
        if not isinstance(captions, list) or not captions:
            raise DataError(f"{where}: 'captions' of image '{image}' must be a non-empty list of strings")
        pairs += [(k, image, _clean_caption(caption, where, image)) for caption in captions]
    del entries  # the parsed JSON (a dict per entry) is the largest thing in memory: free it first
    return _index_from_pairs(path, pairs, strict)


def _read_table(path: str, image_column: str, caption_column: str, strict: bool) -> CaptionIndex:
    with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: Excel writes a byte-order mark
        try:
            header_line, pairs = f.readline(), []
            # The separator is the one that splits the header into the two columns we need; unlike
            # guessing from character counts, commas inside captions cannot fool it.
            for delimiter in ("\t", ",", ";", "|"):
                header = next(csv.reader([header_line], delimiter=delimiter), [])
                if image_column in header and caption_column in header:
                    break
            else:
                raise DataError(f"{path}: header {header_line.strip()!r} lacks the columns '{image_column}' "
                                f"and '{caption_column}' (separators tried: tab, comma, semicolon, pipe); "
                                f"set image_column and caption_column to the names your file uses")
            ic, cc = header.index(image_column), header.index(caption_column)
            for k, row in enumerate(csv.reader(f, delimiter=delimiter)):
                if not row:  # a blank line
                    continue
                if len(row) <= max(ic, cc):
                    raise DataError(f"{path}, entry {k}: {len(row)} fields, but the header has {len(header)}")
                pairs.append((k, row[ic], _clean_caption(row[cc], f"{path}, entry {k}", row[ic])))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    return _index_from_pairs(path, pairs, strict)


def _read_folder(folder: str) -> CaptionIndex:
    images_dir, captions_dir = os.path.join(folder, "images"), os.path.join(folder, "captions")
    files = sorted(f for f in os.listdir(images_dir) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise DataError(f"{images_dir}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    names, captions, owner = [], [], []
    for k, file in enumerate(files):
        caption_file = os.path.join(captions_dir, os.path.splitext(file)[0] + ".txt")
        where, image = f"{caption_file}, entry {k}", f"images/{file}"
        try:
            with open(caption_file, encoding="utf-8-sig") as f:
                lines = [line.strip() for line in f if line.strip()]
        except FileNotFoundError:
            raise DataError(f"{images_dir}, entry {k}: image '{file}' has no caption file "
                            f"(expected {caption_file})") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: caption file of image '{image}' is not UTF-8 text "
                            f"({e.reason} at byte {e.start})") from e
        _clean_caption("".join(lines), where, image)
        names.append(image)
        captions += lines
        owner += [k] * len(lines)
    return _make_index(names, captions, owner, folder, image_root=os.path.abspath(folder))


def _read_chinese_clip(texts_path: str) -> CaptionIndex:
    imgs_path = texts_path[:-len("_texts.jsonl")] + "_imgs.tsv"
    if not os.path.isfile(imgs_path):
        raise DataError(f"{texts_path}: the matching image file {imgs_path} is missing")
    # Scan the image TSV once, remembering where each image's base64 text starts and ends.
    image_of_id, spans, position = {}, [], 0
    with open(imgs_path, "rb") as f:
        for k, line in enumerate(f):
            tab = line.find(b"\t")
            if tab <= 0:
                raise DataError(f"{imgs_path}, entry {k}: expected 'image_id<TAB>base64 image'")
            image_of_id[line[:tab].decode("utf-8", "replace")] = len(spans)
            spans.append((position + tab + 1, position + len(line.rstrip(b"\r\n"))))
            position += len(line)
    captions, owner = [], []
    with open(texts_path, encoding="utf-8-sig") as f:
        try:
            for k, line in enumerate(f):
                if not line.strip():
                    continue
                where = f"{texts_path}, entry {k}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: not valid JSON ({e.msg})") from e
                image_ids = record.get("image_ids") if isinstance(record, dict) else None
                if not isinstance(image_ids, list) or not image_ids:
                    raise DataError(f"{where}: needs 'image_ids', a non-empty list of ids in {imgs_path}")
                # A text describing several images (common in retrieval test sets) becomes one
                # caption per image: in a CaptionIndex each caption belongs to exactly one image.
                for image_id in image_ids:
                    if str(image_id) not in image_of_id:
                        raise DataError(f"{where}: image id {image_id!r} is not in {imgs_path}")
                    captions.append(_clean_caption(record.get("text"), where, image_id))
                    owner.append(image_of_id[str(image_id)])
        except UnicodeDecodeError as e:
            raise DataError(f"{texts_path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    if not captions:
        raise DataError(f"{texts_path}: no texts")
    # Images that no text mentions can be neither trained on nor retrieved: leave them out.
    ids, used = list(image_of_id), np.flatnonzero(np.bincount(owner, minlength=len(image_of_id)))
    renumber = np.full(len(ids), -1, dtype=np.int64)
    renumber[used] = np.arange(len(used))
    return _make_index([ids[i] for i in used], captions, renumber[owner], texts_path, tsv_path=imgs_path,
                       tsv_spans=np.asarray(spans, dtype=np.int64).reshape(-1, 2)[used])


# Chinese-CLIP's LMDB folders (cn_clip/preprocess/build_lmdb_dataset.py writes them from the TSV and
# JSONL files): `imgs` maps an image id (utf-8 text) to its base64 image; `pairs` maps "0", "1", ...
# to a pickled (image_id, text_id, text), one per image a text describes, and b"num_samples" to
# their count.
_LMDB_ENVIRONMENTS = {}  # path -> this process's read-only environment


def _open_lmdb(path: str):
    """A read-only LMDB environment, opened once per process and kept."""
    if path not in _LMDB_ENVIRONMENTS:
        try:
            _LMDB_ENVIRONMENTS[path] = lmdb.open(path, readonly=True, lock=False, readahead=False,
                                                 meminit=False)
        except lmdb.Error as e:
            raise DataError(f"{path}: cannot be opened as an LMDB database ({e})") from e
    return _LMDB_ENVIRONMENTS[path]


def _close_lmdb_environments():
    """A process closes its environments before it forks (DataLoader workers): a child must not
    use its parent's (LMDB forbids it), and py-lmdb refuses to open one its parent holds open.
    Both reopen them on first use."""
    for environment in _LMDB_ENVIRONMENTS.values():
        environment.close()
    _LMDB_ENVIRONMENTS.clear()


if hasattr(os, "register_at_fork"):  # POSIX; elsewhere workers are spawned, not forked
    os.register_at_fork(before=_close_lmdb_environments)


def _read_span(path: str, start: int, end: int) -> bytes:
    """Bytes start..end of a file that holds many images (a TSV file, a tar shard)."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(end - start)
    except OSError as e:
        raise DataError(f"'{path}' cannot be read: {e.strerror}") from e


def _lmdb_value(path: str, key: str, label: str) -> bytes:
    with _open_lmdb(path).begin() as txn:
        value = txn.get(key.encode("utf-8"))
    if value is None:
        raise DataError(f"image '{label}' is not in the database")
    return value


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles plain data only. A pickle is a small program for a stack machine: it may name any
    importable function (os.system, say) and call it while it loads, so pickle.loads of a file
    from elsewhere can run anything. Every such name goes through find_class; refusing them all
    leaves only what the opcodes build by themselves (numbers, strings, bytes, tuples, lists,
    dicts, None, booleans), and nothing is called."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it names {module[:100]}.{name[:100]}; only plain data is accepted (tuples, "
                                     f"numbers, strings)")


def _read_pair(data: bytes, where: str) -> tuple[str, str]:
    """(image id, text) of one pickled (image_id, text_id, text) record of a pairs database: a
    tuple, as build_lmdb_dataset.py pickles it, of two ids (ints of at most 64 bits, or strings)
    and a string. Nothing else is accepted, and what was found is shown through short_repr: a
    286-byte record of lists nested 40 deep, each holding the next twice, has a repr of 2^40
    items."""
    try:
        record = _PlainDataUnpickler(io.BytesIO(data)).load()
    except Exception as e:  # corrupt pickles raise many types (UnpicklingError, EOFError, KeyError, ...)
        raise DataError(f"{where}: refused to unpickle the record: {str(e)[:200]}") from e
    if not (type(record) is tuple and len(record) == 3 and _is_id(record[0]) and _is_id(record[1])
            and type(record[2]) is str):
        raise DataError(f"{where}: expected a pickled (image_id, text_id, text), found {short_repr(record)}")
    return str(record[0]), record[2]


def _is_id(value) -> bool:
    # type(...) is: True is an int too. 64 bits: str() of an int of over 4300 digits raises.
    return type(value) is str or type(value) is int and -2 ** 63 <= value < 2 ** 63


def _is_lmdb_folder(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, db, "data.mdb")) for db in ("imgs", "pairs"))


def _read_lmdb(folder: str) -> CaptionIndex:
    """The pairs of a Chinese-CLIP LMDB folder; every image id they name must be in imgs."""
    pairs_path, imgs_path = os.path.join(folder, "pairs"), os.path.join(folder, "imgs")
    image_of_id, captions, owner = {}, [], []
    with _open_lmdb(pairs_path).begin() as txn:
        count = txn.get(b"num_samples")
        if count is None or not count.isdigit():
            raise DataError(f"{pairs_path}: no 'num_samples' entry (the number of pairs); is this "
                            f"Chinese-CLIP's pairs database?")
        for k in range(int(count)):
            where, data = f"{pairs_path}, key {k}", txn.get(str(k).encode("utf-8"))
            if data is None:
                raise DataError(f"{where}: missing, though num_samples is {int(count)}")
            image_id, text = _read_pair(data, where)
            captions.append(_clean_caption(text, where, image_id))
            owner.append(image_of_id.setdefault(image_id, len(image_of_id)))
    if not captions:
        raise DataError(f"{pairs_path}: no pairs")
    with _open_lmdb(imgs_path).begin(buffers=True) as txn:
        missing = [image_id for image_id in image_of_id if txn.get(image_id.encode("utf-8")) is None]
    if missing:
        raise DataError(f"{pairs_path}: image id {missing[0]!r} is not in {imgs_path}"
                        + (f" ({len(missing) - 1} more are missing)" if len(missing) > 1 else ""))
    return _make_index(list(image_of_id), captions, owner, folder, lmdb_path=imgs_path)


# WebDataset shards: tar files in which the files of one sample share a key (`KEY.jpg`,
# `KEY.txt`, ...); shards.py says which layouts (ours, img2dataset's) and streams them for training.
# Here they are read into an index, for validation and evaluation.
SOURCE_SEPARATOR = "::"
SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # a sample's image, under the first of these present


def split_sources(data_dir) -> list[str]:
    """The sources of a data argument: 'a/{0..9}.tar::b/' -> ['a/{0..9}.tar', 'b/']."""
    return [part for part in str(data_dir).split(SOURCE_SEPARATOR) if part]


def _is_shard_path(path: str) -> bool:
    return path.endswith(".tar") or os.path.isdir(path) and any(f.endswith(".tar") for f in os.listdir(path))


def is_webdataset(data_dir) -> bool:
    """True for a brace pattern such as `shards/{00000..00099}.tar`, one .tar file, a folder of
    .tar shards, or several of these joined with `::`."""
    return any(_is_shard_path(part) for part in split_sources(data_dir))


def shard_files(pattern: str) -> list[str]:
    """The tar files of one source: a brace pattern, a .tar file or a folder of them, in order."""
    if os.path.isdir(pattern):
        urls = sorted(os.path.join(pattern, f) for f in os.listdir(pattern) if f.endswith(".tar"))
    elif pattern.endswith(".tar"):
        urls = expand_urls(pattern)
    else:
        raise DataError(f"{pattern}: not WebDataset shards (a .tar file, a brace pattern such as "
                        f"'dir/{{00000..00099}}.tar' or a folder of .tar files); sources joined with "
                        f"'{SOURCE_SEPARATOR}' must all be shards")
    missing = [url for url in urls if not os.path.isfile(url)]
    if missing:
        more = f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""
        raise DataError(f"{pattern}: shard {missing[0]} not found{more}")
    if not urls:
        raise DataError(f"{pattern}: no .tar shards in this folder")
    return urls


def shard_samples(url: str, number: int | None = None):
    """The samples of one tar shard, grouped by key as webdataset groups them: dicts of
    `__key__`, `__url__` and the bytes of each file by its extension ("jpg", "txt", ...). With a
    shard `number`, an image is given as where its bytes lie, (number, start, end), not read:
    an uncompressed tar stores a member's bytes as they are, after its header.

    A shard that is truncated (a copy or download that stopped) raises DataError naming it,
    instead of losing the samples after the cut without a word. A tar file is a header block and
    the data blocks of each member in turn, then two blocks of zeros. The tar reader raises when
    a file ends inside a member's data, but takes a file that ends inside or just before a header
    for one that ends there. Those are caught by the end: the file is a whole number of blocks and
    ends with the two blocks of zeros (a cut just between two members, after a member ending in
    1 KiB of zeros, would pass: no image, caption or JSON ends so). One seek per shard, not a walk
    over every header of the shard."""
    def members(tar):
        for member in tar:
            if member.isreg():
                suffix = (base_plus_ext(member.name)[1] or "").lower()
                spanned = number is not None and suffix in SHARD_IMAGE_KEYS
                yield {"fname": member.name, "__url__": url,
                       "data": (number, member.offset_data, member.offset_data + member.size) if spanned
                       else tar.extractfile(member).read()}
    try:
        with tarfile.open(url, "r:") as tar:
            yield from group_by_keys(members(tar))
        truncated = not _ends_like_a_tar(url)
    except tarfile.ReadError:
        truncated = True
    if truncated:
        raise DataError(f"{url}: the shard is truncated (it ends before its end-of-archive blocks) or "
                        f"is not an uncompressed tar file, so samples are lost; copy or download it "
                        f"again, or convert the set again")


def _ends_like_a_tar(path: str) -> bool:
    size = os.path.getsize(path)
    if size < 2 * tarfile.BLOCKSIZE or size % tarfile.BLOCKSIZE:
        return False
    with open(path, "rb") as f:
        f.seek(size - 2 * tarfile.BLOCKSIZE)
        return f.read(2 * tarfile.BLOCKSIZE) == bytes(2 * tarfile.BLOCKSIZE)


def shard_sample_text(sample: dict) -> tuple[list[str], str, str]:
    """A shard sample's captions (none if it has none: the .txt, img2dataset's, else the
    "captions" of the .json, our converter's), the name that messages give its image, and what
    its image is: the source its .json names ("url" of img2dataset's, "image" of ours), else the
    sample itself (its name)."""
    where = f"{sample['__url__']}, sample {sample['__key__']}"
    try:
        meta = json.loads(sample.get("json", b"{}"))
        meta = meta if isinstance(meta, dict) else {}
    except (ValueError, TypeError):
        meta = {}
    name = f"{meta['image']} ({where})" if isinstance(meta.get("image"), str) else where
    image = next((meta[field] for field in ("url", "image") if isinstance(meta.get(field), str)), name)
    if "txt" in sample:
        try:
            text = sample["txt"].decode("utf-8").strip()
        except UnicodeDecodeError:
            text = ""
        return ([text] if text else []), name, image
    captions = meta.get("captions", [])
    captions = [c.strip() for c in captions if isinstance(c, str) and c.strip()] if isinstance(captions, list) else []
    return captions, name, image


def shard_sample_problem(sample: dict, captions: list[str], name: str) -> str | None:
    """Why a shard sample cannot be used (no caption, no image), or None."""
    if not captions:
        return f"{name}: no caption (.txt, or \"captions\" in .json)"
    if not any(key in sample for key in SHARD_IMAGE_KEYS):
        return f"{name}: no image (.{', .'.join(SHARD_IMAGE_KEYS)})"
    return None


def _read_shards(data_dir: str, strict: bool) -> CaptionIndex:
    """WebDataset shards (sources joined with `::` too) as an index: one pass reads every
    caption and where each image's bytes lie in its tar file, so memory holds the captions and
    three numbers per image, as for the other formats; images are read from the tar files when
    needed.

    An image is one picture however many samples show it: samples whose .json names the same
    source are one image with all their captions, in the order of the samples. img2dataset
    writes a sample per caption (an image with five captions comes five times, each time with
    the address it was downloaded from in its .json), our converter one per image. The first
    sample's bytes are the image. Samples without a caption or an image are left out and listed
    in `skipped` (strict: DataError)."""
    urls = [url for source in split_sources(data_dir) for url in shard_files(source)]
    image_of, names, spans, captions, owner, skipped = {}, [], [], [], [], []
    for number, url in enumerate(urls):
        for sample in shard_samples(url, number):
            texts, name, image = shard_sample_text(sample)
            problem = shard_sample_problem(sample, texts, name)
            if problem and strict:
                raise DataError(problem)
            if problem:
                skipped.append(problem)
                continue
            if image not in image_of:
                image_of[image] = len(names)
                names.append(name)
                spans.append(next(sample[key] for key in SHARD_IMAGE_KEYS if key in sample))
            captions += texts
            owner += [image_of[image]] * len(texts)
    if not names:
        raise DataError(f"{data_dir}: no sample with an image and a caption"
                        + (f" ({len(skipped)} without; first: {skipped[0]})" if skipped else ""))
    return _make_index(names, captions, owner, data_dir, shard_paths=urls,
                       shard_spans=np.asarray(spans, dtype=np.int64), skipped=skipped)


def load_caption_index(path, image_column: str = "filepath", caption_column: str = "title",
                        split: str = "train", strict: bool = False) -> CaptionIndex:
    """Read a data set in any supported format (see the top of this file) into a CaptionIndex.

    Images listed but missing are left out and named in `index.skipped` (strict: DataError)."""
    path = str(path)
    try:
        return _read_any(path, image_column, caption_column, split, strict)
    except OSError as e:  # unreadable files and folders, symlink loops
        raise DataError(f"{e.filename or path}: cannot be read ({e.strerror})") from e


def _read_any(path: str, image_column: str, caption_column: str, split: str, strict: bool) -> CaptionIndex:
    if is_webdataset(path):
        return _read_shards(path, strict)
    if os.path.isdir(path):
        texts = os.path.join(path, f"{split}_texts.jsonl")
        if os.path.isfile(os.path.join(path, "data.json")):
            return _read_json(os.path.join(path, "data.json"), strict)
        if os.path.isdir(os.path.join(path, "images")) and os.path.isdir(os.path.join(path, "captions")):
            return _read_folder(path)
        if os.path.isfile(texts):
            return _read_chinese_clip(texts)
        for folder in (path, os.path.join(path, split)):
            if _is_lmdb_folder(folder):
                return _read_lmdb(folder)
        raise DataError(f"{path}: found no data.json, no images/ + captions/ folders, no "
                        f"{split}_texts.jsonl + {split}_imgs.tsv, no LMDB imgs/ + pairs/ and no .tar "
                        f"shards (formats: the top of data_loader.py)")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file or folder")
    if path.endswith("_texts.jsonl"):
        return _read_chinese_clip(path)
    if path.lower().endswith(".json"):
        return _read_json(path, strict)
    return _read_table(path, image_column, caption_column, strict)


def split_by_image(index: CaptionIndex, val_fraction: float, seed: int) -> tuple[CaptionIndex, CaptionIndex]:
    """Split by image, not by caption: if captions of one picture landed on both sides, validation
    would measure memorisation of that picture instead of generalisation. The images that the
    index left out (its `skipped`: missing files) stay named, once, by the training part, which
    is what a run reports and counts."""
    num_val = round(val_fraction * index.num_images)
    if not 0 < num_val < index.num_images:
        raise DataError(f"val_fraction {val_fraction} of {index.num_images} images leaves "
                        f"{'no validation' if num_val == 0 else 'no training'} image; give --val_data, "
                        f"or a val_fraction that splits {index.num_images} images")
    order = np.random.default_rng(seed).permutation(index.num_images)
    train = index.subset(np.sort(order[num_val:]))
    train.skipped = list(index.skipped)
    return train, index.subset(np.sort(order[:num_val]))


# ----------------------------------------------------------------------------- training samples

@dataclass
class FailedSample:
    """What a dataset returns instead of a sample whose image cannot be read or decoded.

    Datasets never raise for a bad image: an exception inside a DataLoader worker reaches the
    main process wrapped in a multi-line worker traceback. The main process decides instead:
    skip and count (the default), or stop with the message (--strict_data).
    """
    index: int
    message: str   # DataError's message: names the image and what is wrong


class TrainDataset(Dataset):
    """Item i is image i with ONE of its captions, drawn anew each epoch; or, `by_caption`, item
    j is caption j with its image: an epoch then shows every caption once, and each image as
    often as it has captions (as open_clip's trainer iterates caption rows). Two captions of one
    image can then meet in a batch: the sample's image id tells the loss they are not negatives.

    The caption and the augmentation come from the sample's own uniforms (sample_uniforms of
    seed, epoch, image and the caption's number, by_caption), so an epoch's samples depend neither
    on worker count nor on order, and a resumed run sees exactly the samples the interrupted one
    would have. A DataLoader asks for a whole batch at once (`__getitems__`), whose random choices
    are then drawn together. With an ImageCache the image is taken from it instead of being read
    and decoded again; with `tokens` (tokenize_captions of the index) the caption's tokens are
    looked up instead of tokenised again. With a TeacherView each sample also carries the
    teacher's view of it (distillation).
    """

    yields_train_samples = True  # build_dataloader collates them with collate_batch

    def __init__(self, index: CaptionIndex, augmentation: TrainAugmentation, tokenizer, seed: int = 0,
                 cache: ImageCache | None = None, tokens: torch.Tensor | None = None,
                 teacher_view: TeacherView | None = None, by_caption: bool = False):
        self.index, self.augmentation, self.tokenizer, self.seed = index, augmentation, tokenizer, seed
        self.cache, self.tokens, self.teacher_view, self.by_caption = cache, tokens, teacher_view, by_caption
        # Persistent DataLoader workers keep their own copy of the dataset, so an epoch stored in
        # a plain attribute would never reach them; a shared-memory tensor does.
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int, start: int = 0):
        """(start: where the sampler resumes; each item is seeded by its own number, so this
        dataset needs only the epoch)"""
        self._epoch[0] = epoch

    def __len__(self) -> int:
        return self.index.num_captions if self.by_caption else self.index.num_images

    def images_and_captions(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The items' images and which of its captions each shows (-1: drawn each epoch)."""
        if not self.by_caption:
            return items, np.full(len(items), -1, dtype=np.int64)
        images = self.index.caption_image[items]
        return images, items - self.index.caption_range(images)[0]

    def captions_shown(self, epoch: int) -> list[str]:
        """The caption every item shows in `epoch` (what hard-negative mining embeds)."""
        images, shown = self.images_and_captions(np.arange(len(self)))
        first, count = self.index.caption_range(images)
        rows = first + np.where(shown >= 0, shown, draw_captions(self.seed, epoch, images, count))
        return [self.index.caption(int(j)) for j in rows]

    def __getitem__(self, k: int):
        return self.__getitems__([k])[0]

    def __getitems__(self, items: list[int]) -> list:
        """The samples of `items` (see train_sample), or FailedSamples for unreadable images."""
        images, shown = self.images_and_captions(np.asarray(items, dtype=np.int64))
        samples = [self._pixels(int(i)) for i in images]
        good = np.array([n for n, s in enumerate(samples) if not isinstance(s, FailedSample)], dtype=np.int64)
        first, count = self.index.caption_range(images[good])
        choices, draws = draw_samples(self, int(self._epoch[0]), images[good], shown[good], count,
                                      [samples[n].shape[:2] for n in good])
        rows = first + choices
        tokens = None if self.tokens is None else self.tokens[torch.from_numpy(rows)].long()
        for m, n in enumerate(good):
            samples[n] = train_sample(self, int(images[n]), int(choices[m]), samples[n], draws[m],
                                      self.index.caption(int(rows[m])), None if tokens is None else tokens[m])
        return samples

    def _pixels(self, i: int):
        """Image i prepared (from the cache, else read and decoded), or a FailedSample."""
        if self.cache is not None:
            return self.cache[i]
        try:
            return self.augmentation.prepare(self.index.load_image(i))
        except DataError as e:
            return FailedSample(i, str(e))


def draw_samples(dataset, epoch: int, images: np.ndarray, shown: np.ndarray, num_captions: np.ndarray,
                 shapes: list) -> tuple[np.ndarray, list]:
    """The random choices of a batch of samples: each one's caption (`shown`, or, where that is
    -1, one drawn from its `num_captions`) and its augmentation (dataset.augmentation.draw of the
    prepared images' `shapes`), all from the samples' own uniforms. Shared by TrainDataset and
    shards.WebDatasetTrain."""
    uniforms = sample_uniforms(dataset.seed, epoch, images, shown, 1 + TrainAugmentation.DRAWS)
    choices = np.where(shown >= 0, shown, draw_captions(dataset.seed, epoch, images, num_captions))
    return choices, dataset.augmentation.draw(np.reshape(shapes, (-1, 2)), uniforms[:, 1:])


def draw_captions(seed: int, epoch: int, images: np.ndarray, num_captions: np.ndarray) -> np.ndarray:
    """Which of their captions `images` train with in an epoch, when each draws one: from the
    first of each one's uniforms (sample_uniforms with no caption shown, -1), the column that
    draw_samples leaves to it."""
    uniforms = sample_uniforms(seed, epoch, images, np.full(len(images), -1), 1)
    return np.floor(uniforms[:, 0] * num_captions).astype(np.int64)


def train_sample(dataset, i: int, choice: int, pixels: np.ndarray, draw: AugmentationDraw, caption: str,
                 tokens: torch.Tensor | None = None) -> tuple:
    """Sample i, `(pixels, tokens, i, choice)` -- its prepared image through the drawn
    augmentation, its caption `choice` tokenised (looked up: `tokens`, else by dataset.tokenizer)
    -- then the teacher's `(pixels, tokens)` if the dataset has a teacher_view. The fields are
    named by TRAIN_SAMPLE_FIELDS."""
    text = dataset.tokenizer([caption])[0] if tokens is None else tokens
    sample = (dataset.augmentation.apply(pixels, draw), text, i, choice)
    if dataset.teacher_view is None:
        return sample
    return sample + dataset.teacher_view(pixels, draw, caption)


def neighbourhood_order(neighbours: np.ndarray, captions: list[str], images: np.ndarray, batch: int,
                        share: float, rng: np.random.Generator) -> np.ndarray:
    """An epoch's order of N items in which every run of `batch` items (one global batch) is
    `share` groups of similar items and the rest random items: hard-negative batches.

    The contrastive loss learns most from negatives that are hard to tell from the positive
    (a red car beside a red truck, not beside a cat). A group is a seed item and its nearest
    neighbours ([N, k] `neighbours`, nearest first) that no batch took yet, leaving out those
    whose caption is the seed's own text (a copy of its caption on another image is a false
    negative, not a hard one) and those of the seed's own image (`images`: each item's image;
    another caption of it is a positive). The random rest keeps the batch from being all
    near-duplicates. Each item comes at most once; the last partial batch is left out, as
    training does.
    """
    n = len(neighbours)
    used = np.zeros(n, dtype=bool)
    seeds, fillers = rng.permutation(n), rng.permutation(n)
    s = f = 0                                      # the next seed, the next filler to look at
    hard, order = round(share * batch), []
    for _ in range(n // batch):
        items = []
        while len(items) < hard and s < n:
            seed, s = seeds[s], s + 1
            if not used[seed]:
                group = [seed] + [j for j in neighbours[seed]
                                  if not used[j] and captions[j] != captions[seed] and images[j] != images[seed]]
                group = group[:hard - len(items)]
                used[group] = True
                items += group
        while len(items) < batch:                  # enough unused items remain: n // batch batches
            j, f = fillers[f], f + 1
            if not used[j]:
                used[j] = True
                items.append(j)
        order += items
    return np.asarray(order, dtype=np.int64)


# ----------------------------------------------------------------------------- caches

class ImageCache:
    """The training images decoded once and prepared (TrainAugmentation.prepare: small uint8
    arrays), packed back to back in one buffer, so that later epochs skip reading and decoding.

    One buffer and two index arrays, not a list of arrays: forked DataLoader workers read it
    without copying it (see PackedStrings). `cache[i]` is image i as a read-only [H, W, 3] view.
    """

    def __init__(self, buffer: np.ndarray, offsets: np.ndarray, shapes: np.ndarray):
        self.buffer, self.offsets, self.shapes = buffer, offsets, shapes

    def __getitem__(self, i: int) -> np.ndarray:
        height, width = self.shapes[i]
        return self.buffer[self.offsets[i]:self.offsets[i + 1]].reshape(height, width, 3)

    def __len__(self) -> int:
        return len(self.shapes)

    @property
    def nbytes(self) -> int:
        return int(self.offsets[-1])


class _Prepared(Dataset):
    """(i, prepared image) of every image of an index, or a FailedSample: what caching reads."""

    def __init__(self, index: CaptionIndex, augmentation: TrainAugmentation):
        self.index, self.augmentation = index, augmentation

    def __len__(self) -> int:
        return self.index.num_images

    def __getitem__(self, i: int):
        try:
            return i, self.augmentation.prepare(self.index.load_image(i))
        except DataError as e:
            return FailedSample(i, str(e))


def cache_estimate(index: CaptionIndex, augmentation: TrainAugmentation) -> int:
    """Bytes an ImageCache of the index will take, for images of aspect ratio 4:3."""
    return index.num_images * augmentation.side * round(augmentation.side * 4 / 3) * 3


def cache_images(index: CaptionIndex, augmentation: TrainAugmentation, num_workers: int = 0,
                 strict: bool = False) -> tuple[CaptionIndex, ImageCache]:
    """Read, decode and prepare every image of the index once, with DataLoader workers.

    Returns the index of the readable images (the others are left out with their captions and
    listed in its `skipped`; with strict, the first one raises DataError) and their ImageCache.
    """
    loader = DataLoader(_Prepared(index, augmentation), batch_size=64, num_workers=num_workers,
                        collate_fn=list, worker_init_fn=_init_worker)
    arrays, kept, failed = [], [], []
    for batch in loader:
        for item in batch:
            if isinstance(item, FailedSample):
                if strict:
                    raise DataError(item.message)
                failed.append(item.message)
            else:
                kept.append(item[0])
                arrays.append(item[1])
    if not arrays:
        raise DataError(f"{index.source}: no readable image ({len(failed)} failed; first: {failed[0]})")
    shapes = np.array([a.shape[:2] for a in arrays], dtype=np.int64)
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum(shapes[:, 0] * shapes[:, 1] * 3, out=offsets[1:])
    buffer = np.empty(offsets[-1], dtype=np.uint8)
    for k in range(len(arrays)):         # copied one by one and freed: the peak stays near 1x
        buffer[offsets[k]:offsets[k + 1]] = arrays[k].reshape(-1)
        arrays[k] = None
    buffer.flags.writeable = False
    if failed:
        skipped = index.skipped + failed
        index = index.subset(kept)
        index.skipped = skipped
    return index, ImageCache(buffer, offsets, shapes)


def cache_training_data(index: CaptionIndex, augmentation: TrainAugmentation, tokenizer, num_workers: int = 0,
                        strict: bool = False) -> tuple[CaptionIndex, ImageCache, torch.Tensor]:
    """Every image of the index decoded and prepared once (cache_images) and every caption of
    the readable ones tokenised once (tokenize_captions): the index of the readable images, their
    ImageCache and the token table, what TrainDataset takes as index, cache and tokens."""
    index, cache = cache_images(index, augmentation, num_workers, strict)
    return index, cache, tokenize_captions(index.captions(), tokenizer)


def tokenize_captions(captions: list[str], tokenizer, chunk: int = 4096) -> torch.Tensor:
    """Every caption tokenised once: int32 [len(captions), context_length], row j caption j.

    A DataLoader worker that tokenises the one caption a sample draws spends most of that time on
    the call itself (a tensor per caption: ~3x the per-caption cost of a batched call); looked up
    in this table, the caption costs nothing after the first epoch, and the workers' time is
    taken from the model's threads on a small machine. int32 halves the table (token ids are
    below 2^31); chunks bound the tokenizer's int64 intermediate.
    """
    table = torch.empty(len(captions), tokenizer.context_length, dtype=torch.int32)
    for start in range(0, len(captions), chunk):
        table[start:start + chunk] = tokenizer(captions[start:start + chunk])
    return table


# ----------------------------------------------------------------------------- evaluation images

def image_transform(preprocess_cfg: dict):
    """The model's own evaluation preprocessing (size, mean, std, resizing) from its
    `preprocess_cfg`: PIL image -> normalised tensor, exactly as open_clip prepares images."""
    options = {k: preprocess_cfg.get(k) for k in ("mean", "std", "interpolation", "resize_mode")}
    return open_clip.image_transform(preprocess_cfg["size"], is_train=False,
                                     fill_color=preprocess_cfg.get("fill_color", 0), **options)


class ImageDataset(Dataset):
    """Every image once, for evaluation: `(pixels, i)`, or a FailedSample. The images are those of
    a CaptionIndex, or a list of image files (zero-shot class folders)."""

    def __init__(self, source, transform):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return self.source.num_images if isinstance(self.source, CaptionIndex) else len(self.source)

    def __getitem__(self, i: int):
        try:
            image = self.source.load_image(i) if isinstance(self.source, CaptionIndex) else \
                load_image_file(self.source[i])
        except DataError as e:
            return FailedSample(i, str(e))
        return self.transform(image), i


def load_image_file(path: str) -> Image.Image:
    """An image file in RGB; DataError naming it if it cannot be read or decoded."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"image '{path}' cannot be read: {e.strerror}") from e
    return decode_image(data, path)


# The fields of a training sample (train_sample), which are the keys of a batch (collate_batch).
TRAIN_SAMPLE_FIELDS = ("images", "texts", "image_ids", "caption_choices", "teacher_images", "teacher_texts")


# ----------------------------------------------------------------------------- batches

def collate_batch(samples: list) -> dict:
    """Stack TrainDataset samples into a batch keyed by TRAIN_SAMPLE_FIELDS. Failed ones are
    dropped and their messages kept in "failed", so the training loop can count them and warn
    (or stop); a batch may end up empty."""
    good = [s for s in samples if not isinstance(s, FailedSample)]
    failed = [s.message for s in samples if isinstance(s, FailedSample)]
    if not good:
        return {"images": torch.empty(0, 3, 0, 0), "texts": torch.empty(0, 0, dtype=torch.long),
                "image_ids": torch.empty(0, dtype=torch.long),
                "caption_choices": torch.empty(0, dtype=torch.long), "failed": failed}
    batch = {name: torch.stack(column) if torch.is_tensor(column[0]) else torch.tensor(column, dtype=torch.long)
             for name, column in zip(TRAIN_SAMPLE_FIELDS, zip(*good))}
    return {**batch, "failed": failed}


def collate_images(samples: list) -> dict:
    """Stack ImageDataset samples: {"images", "indices", "failed": [(i, message), ...]}."""
    good = [s for s in samples if not isinstance(s, FailedSample)]
    failed = [(s.index, s.message) for s in samples if isinstance(s, FailedSample)]
    images = torch.stack([pixels for pixels, _ in good]) if good else torch.empty(0)
    return {"images": images, "indices": torch.tensor([i for _, i in good], dtype=torch.long),
            "failed": failed}


class EpochSampler(Sampler):
    """Seeded order of each epoch, shared out across ranks, resumable mid-epoch.

    The order of an epoch is randperm(num_samples) seeded with seed + epoch. `set_epoch(epoch,
    start)` skips its first `start` entries (consumed by all ranks together before a checkpoint),
    cuts the rest to a multiple of world_size, and rank r takes rest[r::world_size]. After k steps
    of batch B on W ranks exactly the first k*B*W entries are consumed, whatever W is, so a run
    resumes exactly on any number of ranks.
    """

    def __init__(self, num_samples: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.num_samples, self.seed, self.rank, self.world_size = num_samples, seed, rank, world_size
        self.set_epoch(0)

    def set_epoch(self, epoch: int, start: int = 0, order=None):
        """`order`: the epoch's order given instead of drawn (hard-negative batches)."""
        if order is None:
            generator = torch.Generator()
            generator.manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_samples, generator=generator)
        rest = torch.as_tensor(order)[start:]
        self._indices = rest[:len(rest) // self.world_size * self.world_size][self.rank::self.world_size]

    def __iter__(self):
        return iter(self._indices.tolist())

    def __len__(self) -> int:
        return len(self._indices)


def _init_worker(worker_id: int):
    """Runs first in every DataLoader worker.

    Stop signals belong to the main process. A scheduler's preemption, `timeout`, or Ctrl-C in a
    terminal signal the whole process group; a worker killed by it would take the run down with
    "DataLoader worker is killed by signal" before the main process could save. So each worker
    leaves the group for one of its own: the main process alone gets the signal, finishes its
    step, saves, and shuts the workers down. (Ignoring SIGTERM instead would hang the exit:
    multiprocessing stops its daemon children with SIGTERM and waits for them.) SIGINT, which a
    terminal sends, is ignored too, in case it reaches a worker some other way.

    DataLoader seeds torch in each worker (its generator's base seed + worker id); numpy and
    Python get the same seed so that transforms drawing from them are reproducible too.
    """
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_dataloader(dataset, batch_size: int, *, sampler=None, num_workers: int = 0, seed: int = 0,
                     train: bool = True, pin_memory: bool = False) -> DataLoader:
    """A DataLoader with seeded workers. Training drops the last incomplete batch (a tiny batch has
    few negatives and gives a noisy contrastive loss). Pass an EpochSampler (or DistributedSampler)
    to shard across ranks; without one, training shuffles with the seed. An IterableDataset (such
    as shards.WebDatasetTrain) shards and shuffles itself, so it takes neither. Datasets of
    training samples (`yields_train_samples`) are collated by collate_batch."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    collate = collate_batch if getattr(dataset, "yields_train_samples", False) else \
        collate_images if isinstance(dataset, ImageDataset) else None
    shuffle = train and sampler is None and not isinstance(dataset, IterableDataset)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=shuffle,
                      num_workers=num_workers, collate_fn=collate, pin_memory=pin_memory, drop_last=train,
                      worker_init_fn=_init_worker, generator=generator,
                      persistent_workers=train and num_workers > 0)   # evaluation reads once


class EpochLoader:
    """The training batches, epoch by epoch: `set_epoch(epoch, start)` then iterate.

    The one object to ask for a position in the data: it forwards the epoch, and the samples
    consumed before a checkpoint (`start`, by all ranks together), to whoever needs them -- the
    EpochSampler and the dataset of a map-style set, or the stream of WebDataset shards, which
    deals its shards itself.
    """

    def __init__(self, dataset, batch_size: int, *, num_workers: int = 0, seed: int = 0, rank: int = 0,
                 world_size: int = 1, pin_memory: bool = False):
        self.dataset = dataset
        self.sampler = None if isinstance(dataset, IterableDataset) else \
            EpochSampler(len(dataset), seed=seed, rank=rank, world_size=world_size)
        self.loader = build_dataloader(dataset, batch_size, sampler=self.sampler, num_workers=num_workers,
                                       seed=seed, train=True, pin_memory=pin_memory)

    def set_epoch(self, epoch: int, start: int = 0, order=None):
        """`order`: the epoch's order of a map-style set, when it is not the sampler's own draw."""
        if self.sampler is not None:
            self.sampler.set_epoch(epoch, start, order)
        self.dataset.set_epoch(epoch, start)

    def __iter__(self):
        return iter(self.loader)


# ----------------------------------------------------------------------------- command line

def build_parser():
    parser = argparse.ArgumentParser(description="Make a sample data set, or check that a data set loads. "
                                                 "(shards.py converts one to WebDataset shards.)")
    add = parser.add_argument
    add("--make_sample", metavar="DIR", help="write a generated data set into DIR (new or empty)")
    add("--num_samples", type=int, default=1000, help="images in the generated set")
    add("--seed", type=int, default=0, help="seed of the generated set (same seed, same files)")
    add("--language", choices=("en", "zh"), default="en", help="caption language of the generated set")
    add("--inspect", metavar="PATH", help="load a data set (any format); print counts and a few entries")
    add("--image_column", default="filepath", help="image column of a CSV/TSV file")
    add("--caption_column", default="title", help="caption column of a CSV/TSV file")
    add("--split", default="train", help="split of a Chinese-CLIP folder ({split}_texts.jsonl)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.make_sample or args.inspect):
        parser.error("give --make_sample DIR or --inspect PATH")
    read = dict(image_column=args.image_column, caption_column=args.caption_column, split=args.split)
    try:
        if args.make_sample:
            paths = create_sample_dataset(args.make_sample, args.num_samples, args.seed, args.language)
            print(f"wrote {args.num_samples} images: index {paths['index']}, folder layout "
                  f"{paths['folder']}, zero-shot classes {paths['zeroshot']}")
        if args.inspect:
            index = load_caption_index(args.inspect, **read)
            print(index)
            for i in range(min(3, index.num_images)):
                image = index.load_image(i)  # decoding a few images catches a wrong image format early
                print(f"  {index.image_name(i)} ({image.width}x{image.height}): " +
                      " | ".join(index.caption(j) for j in index.captions_of(i)))
    except (DataError, FileExistsError) as e:
        sys.exit(f"data error: {e}")


if __name__ == "__main__":
    main()
