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
An image named more than once (COCO-style, one line per caption) is one image with several
captions: retrieval metrics must know that five captions describe the same picture.
For sets too large for one index, training streams WebDataset tar shards instead: shards.py.
CLI: `python data_loader.py --make_sample DIR` writes a generated data set, `--inspect PATH` checks
that a data set loads.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import io
import json
import os
import pickle
import random
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from sample_data import SAMPLE_COLOURS, SAMPLE_SHAPES, create_sample_dataset  # noqa: F401 (used as data_loader.*)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DataError(ValueError):
    """A problem with the user's data; the message names the file, entry and path."""


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
    LMDB database `lmdb_path` under the image's id: read and decoded on demand, so no image is
    held in memory.
    """

    def __init__(self, names: PackedStrings, captions: PackedStrings, first_caption: np.ndarray, source: str,
                 image_root: str = "", tsv_path: str | None = None, tsv_spans: np.ndarray | None = None,
                 lmdb_path: str | None = None):
        self._names, self._captions, self._first_caption = names, captions, first_caption
        self.num_images, self.num_captions = len(names), len(captions)
        self.caption_image = np.repeat(np.arange(len(names), dtype=np.int64), np.diff(first_caption))
        self.source, self.image_root, self.tsv_path, self.tsv_spans = source, image_root, tsv_path, tsv_spans
        self.lmdb_path = lmdb_path

    def caption(self, j: int) -> str:
        return self._captions[j]

    def captions(self) -> list[str]:
        return [self._captions[j] for j in range(self.num_captions)]

    def captions_of(self, i: int) -> np.ndarray:
        return np.arange(self._first_caption[i], self._first_caption[i + 1], dtype=np.int64)

    def image_name(self, i: int) -> str:
        """The image's path (resolved), or its id inside the TSV file or LMDB database."""
        stored = self.tsv_path or self.lmdb_path
        return self._names[i] if stored else os.path.join(self.image_root, self._names[i])

    def image_bytes(self, i: int) -> bytes:
        """The stored bytes of image i: the file's content, or the base64 text of the TSV or LMDB
        decoded."""
        if self.lmdb_path is not None:
            encoded = _lmdb_value(self.lmdb_path, self._names[i], self._label(i))
        elif self.tsv_path is None:
            try:
                with open(self.image_name(i), "rb") as f:
                    return f.read()
            except OSError as e:
                raise DataError(f"image '{self.image_name(i)}' cannot be read: {e.strerror}") from e
        else:
            start, end = self.tsv_spans[i]
            with open(self.tsv_path, "rb") as f:
                f.seek(start)
                encoded = f.read(end - start)
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
                            self.lmdb_path)

    def __repr__(self) -> str:
        return f"CaptionIndex({self.source}: {self.num_images} images, {self.num_captions} captions)"


# ----------------------------------------------------------------------------- images

def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I"):
        # 16-bit (and 32-bit integer) grey: Pillow's convert("L") clips at 255, so almost every
        # pixel would turn white. Integer images are taken as 16-bit, 0..65535.
        values = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(values, 0, 255).round().astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        # Transparent pixels keep arbitrary colours that dropping alpha would reveal (often black).
        # Composite on white, as a viewer shows them.
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...: Pillow's own conversions are right


def decode_image(data: bytes, name: str) -> Image.Image:
    """Decode image bytes to RGB with the EXIF orientation applied (phone photos are often stored
    sideways with a flag saying so). DataError naming the image if the bytes are not an image."""
    if not data:
        raise DataError(f"image '{name}' is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:  # Pillow decodes lazily: convert inside the try
            return _to_rgb(ImageOps.exif_transpose(image))
    except Exception as e:  # Pillow raises many types for corrupt data (OSError, SyntaxError, ...)
        raise DataError(f"image '{name}' cannot be decoded ({type(e).__name__}: {e})") from e


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


def _index_from_pairs(index_file: str, pairs: list[tuple[int, str, str]]) -> CaptionIndex:
    """Index of (entry number, image path, caption) triples; an image named twice is one image.
    Every image must exist: a missing file is reported now, not hours into training."""
    if not pairs:
        raise DataError(f"{index_file}: no entries")
    image_of_name, first_entry = {}, []
    for entry, name, _ in pairs:
        if name not in image_of_name:
            image_of_name[name] = len(first_entry)
            first_entry.append(entry)
    names, root = list(image_of_name), os.path.dirname(os.path.abspath(index_file))
    # One directory listing per folder instead of one stat() per image: a million images in a few
    # folders are checked in about a second. stat() still decides for names not in the listing
    # (they may differ only in case on a case-insensitive file system).
    listings, missing = {}, []
    for k, name in enumerate(names):
        folder, base = os.path.split(os.path.join(root, name))
        if folder not in listings:
            listings[folder] = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        if base not in listings[folder] and not os.path.isfile(os.path.join(folder, base)):
            missing.append(k)
    if missing:
        k, more = missing[0], f"; {len(missing) - 1} more images are missing" if len(missing) > 1 else ""
        raise DataError(f"{index_file}, entry {first_entry[k]}: image '{names[k]}' not found "
                        f"(resolved to {os.path.join(root, names[k])}){more}")
    return _make_index(names, [caption for _, _, caption in pairs],
                       [image_of_name[name] for _, name, _ in pairs], index_file, image_root=root)


def _read_json(path: str) -> CaptionIndex:
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
    return _index_from_pairs(path, pairs)


def _read_table(path: str, image_column: str, caption_column: str) -> CaptionIndex:
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
    return _index_from_pairs(path, pairs)


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
    import lmdb
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
        raise pickle.UnpicklingError(f"it names {module}.{name}; only plain data is accepted (tuples, "
                                     f"numbers, strings)")


def _read_pair(data: bytes, where: str) -> tuple[str, str]:
    """(image id, text) of one pickled (image_id, text_id, text) record of a pairs database."""
    try:
        record = _PlainDataUnpickler(io.BytesIO(data)).load()
    except Exception as e:  # corrupt pickles raise many types (UnpicklingError, EOFError, KeyError, ...)
        raise DataError(f"{where}: refused to unpickle the record: {e}") from e
    if not (isinstance(record, tuple) and len(record) == 3 and isinstance(record[0], (int, str))
            and isinstance(record[1], (int, str)) and isinstance(record[2], str)):
        raise DataError(f"{where}: expected a pickled (image_id, text_id, text), found {record!r:.80}")
    return str(record[0]), record[2]


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


def load_captions(path, image_column: str = "filepath", caption_column: str = "title",
                  split: str = "train") -> CaptionIndex:
    """Read a data set in any supported format (see the top of this file) into a CaptionIndex."""
    path = str(path)
    if os.path.isdir(path):
        texts = os.path.join(path, f"{split}_texts.jsonl")
        if os.path.isfile(os.path.join(path, "data.json")):
            return _read_json(os.path.join(path, "data.json"))
        if os.path.isdir(os.path.join(path, "images")) and os.path.isdir(os.path.join(path, "captions")):
            return _read_folder(path)
        if os.path.isfile(texts):
            return _read_chinese_clip(texts)
        for folder in (path, os.path.join(path, split)):
            if _is_lmdb_folder(folder):
                return _read_lmdb(folder)
        raise DataError(f"{path}: found no data.json, no images/ + captions/ folders, no "
                        f"{split}_texts.jsonl + {split}_imgs.tsv and no LMDB imgs/ + pairs/ "
                        f"(formats: the top of data_loader.py)")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file or folder")
    if path.endswith("_texts.jsonl"):
        return _read_chinese_clip(path)
    if path.lower().endswith(".json"):
        return _read_json(path)
    return _read_table(path, image_column, caption_column)


def split_by_image(index: CaptionIndex, val_fraction: float, seed: int) -> tuple[CaptionIndex, CaptionIndex]:
    """Split by image, not by caption: if captions of one picture landed on both sides, validation
    would measure memorisation of that picture instead of generalisation."""
    num_val = round(val_fraction * index.num_images)
    if not 0 < num_val < index.num_images:
        raise ValueError(f"val_fraction {val_fraction} of {index.num_images} images leaves one side empty")
    order = np.random.default_rng(seed).permutation(index.num_images)
    return index.subset(np.sort(order[num_val:])), index.subset(np.sort(order[:num_val]))


# ----------------------------------------------------------------------------- training samples

# Mild augmentation: crops keep most of the picture (captions say "on the left"), colour jitter
# keeps the hue (captions name colours), and no flips (they would swap left and right).
TRAIN_AUGMENTATION = {"scale": (0.8, 1.0), "color_jitter": (0.3, 0.3, 0.3, 0.0), "color_jitter_prob": 0.8}


def image_transform(preprocess_cfg: dict, train: bool, augment: bool = True):
    """The model's own preprocessing (size, mean, std, resizing) from its `preprocess_cfg`, with
    training augmentation when train and augment are both set."""
    import open_clip
    options = {k: preprocess_cfg.get(k) for k in ("mean", "std", "interpolation", "resize_mode")}
    if not (train and augment):
        return open_clip.image_transform(preprocess_cfg["size"], is_train=False,
                                         fill_color=preprocess_cfg.get("fill_color", 0), **options)
    with warnings.catch_warnings():  # open_clip applies the colour jitter but warns it is "unused"
        warnings.filterwarnings("ignore", message="Unused augmentation cfg items")
        return open_clip.image_transform(preprocess_cfg["size"], is_train=True, aug_cfg=TRAIN_AUGMENTATION,
                                         **options)


@contextlib.contextmanager
def _seeded_random(seed: int):
    """Seed the global CPU torch and Python generators (torchvision and open_clip transforms draw
    from them) for one sample, then restore them: the augmentation depends only on the sample,
    and the caller's random streams (dropout, shuffling) are left as they were."""
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)


@dataclass
class FailedSample:
    """What TrainDataset returns instead of a sample whose image cannot be decoded (strict=False)."""
    image_name: str
    reason: str


class TrainDataset(Dataset):
    """Item i is image i with ONE of its captions, drawn anew each epoch.

    The caption and the augmentation come from a generator seeded with (seed, epoch, i), so an
    epoch's samples depend neither on worker count nor on order, and a resumed run sees exactly
    the samples the interrupted one would have.
    """

    yields_train_samples = True  # build_dataloader collates them with collate_batch

    def __init__(self, index: CaptionIndex, transform, tokenizer, seed: int = 0, strict: bool = False):
        self.index, self.transform, self.tokenizer = index, transform, tokenizer
        self.seed, self.strict = seed, strict
        # Persistent DataLoader workers keep their own copy of the dataset, so an epoch stored in
        # a plain attribute would never reach them; a shared-memory tensor does.
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int):
        self._epoch[0] = epoch

    def __len__(self) -> int:
        return self.index.num_images

    def __getitem__(self, i: int):
        captions = [self.index.caption(int(j)) for j in self.index.captions_of(i)]
        return train_sample(i, int(self._epoch[0]), captions, lambda: self.index.load_image(i),
                            self.index.image_name(i), self)


def train_sample(i: int, epoch: int, captions: list[str], load_image, image_name: str, dataset):
    """Sample i of an epoch, `(pixels, tokens, i)`: ONE caption and the augmentation, both drawn
    from a generator seeded with (seed, epoch, i); a FailedSample if the image cannot be read
    (DataError if the dataset is strict). Shared by TrainDataset and shards.WebDatasetTrain."""
    rng = np.random.default_rng((dataset.seed, epoch, i))
    caption = captions[rng.integers(len(captions))]
    try:
        image = load_image()
    except DataError as e:
        if dataset.strict:
            raise
        return FailedSample(image_name, str(e))
    with _seeded_random(int(rng.integers(2**63))):
        pixels = dataset.transform(image)
    return pixels, dataset.tokenizer([caption])[0], i


class ImageDataset(Dataset):
    """Every image once, for evaluation: `(image_tensor, i)`; a failing image raises DataError."""

    def __init__(self, index: CaptionIndex, transform):
        self.index, self.transform = index, transform

    def __len__(self) -> int:
        return self.index.num_images

    def __getitem__(self, i: int):
        return self.transform(self.index.load_image(i)), i


def collate_batch(samples: list) -> dict:
    """Stack TrainDataset samples. Failed ones are dropped and their image names reported, so the
    training loop can count them and warn; a batch may end up empty (check `image_ids`)."""
    good = [s for s in samples if not isinstance(s, FailedSample)]
    failed = [s.image_name for s in samples if isinstance(s, FailedSample)]
    if not good:
        return {"images": torch.empty(0, 3, 0, 0), "texts": torch.empty(0, 0, dtype=torch.long),
                "image_ids": torch.empty(0, dtype=torch.long), "failed": failed}
    images, texts, image_ids = zip(*good)
    return {"images": torch.stack(images), "texts": torch.stack(texts),
            "image_ids": torch.tensor(image_ids, dtype=torch.long), "failed": failed}


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

    def set_epoch(self, epoch: int, start: int = 0):
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        rest = torch.randperm(self.num_samples, generator=generator)[start:]
        self._indices = rest[:len(rest) // self.world_size * self.world_size][self.rank::self.world_size]

    def __iter__(self):
        return iter(self._indices.tolist())

    def __len__(self) -> int:
        return len(self._indices)


def _seed_worker(worker_id: int):
    # DataLoader seeds torch in each worker (its generator's base seed + worker id); give numpy
    # and Python the same seed so that transforms drawing from them are reproducible too.
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
    collate = collate_batch if getattr(dataset, "yields_train_samples", False) else None
    shuffle = train and sampler is None and not isinstance(dataset, IterableDataset)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=shuffle,
                      num_workers=num_workers, collate_fn=collate, pin_memory=pin_memory, drop_last=train,
                      worker_init_fn=_seed_worker, generator=generator, persistent_workers=num_workers > 0)


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
            index = load_captions(args.inspect, **read)
            print(index)
            for i in range(min(3, index.num_images)):
                image = index.load_image(i)  # decoding a few images catches a wrong image format early
                print(f"  {index.image_name(i)} ({image.width}x{image.height}): " +
                      " | ".join(index.caption(j) for j in index.captions_of(i)))
    except (DataError, FileExistsError) as e:
        sys.exit(f"data error: {e}")


if __name__ == "__main__":
    main()
