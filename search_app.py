"""Search a folder of photos by text (English or Chinese) or by an example image, in a web page.

    python search_app.py index --images DIR --checkpoint PATH --index FILE
    python search_app.py serve --index FILE [--host 127.0.0.1] [--port 8000]
    python search_app.py serve --demo

Search with CLIP. The image tower maps every photo to a unit vector x_i once, when the folder is
indexed. A query becomes a unit vector q in the same space: a text through the text tower, an
example image through the image tower. The cosine similarity of the query with every photo is
then one matrix-vector product, s = X q, and the results are the k photos with the largest s_i.
This is the retrieval that evaluation.py measures, turned into an application.

The index file (a numpy .npz, read without pickle) holds, for every photo, its path relative to
the folder, its size and modification time (so that indexing again encodes only new and changed
photos) and its feature in float16. Half precision halves the memory (a million 512-d features
take 1 GiB instead of 2) and moves a cosine by less than 1e-3 (each component is rounded by at
most 2^-11 of itself): only photos whose scores tie within that can swap places. The index also
records the model that made the features, with the sha256 of its weights, so that `serve`
rebuilds that very model: a text vector from another model means nothing next to these features.

Exact search is the product of the float16 matrix with the query (bench/README.md measures it
at 10,000 to 1,000,000 photos; Searcher says how near-ties are ordered). Beyond EXACT_LIMIT
photos, faiss (when installed) answers from an inverted-file index: the photos are clustered once
when the server starts, and a query scans only the --nprobe clusters nearest to it, which is
approximate.

Captions. When the index's model is a captioner (a CoCa), each result shows the caption the
model writes for it (clip_model.generate_captions), written on demand, the first time the page
asks, and cached beside the index like a thumbnail. Not at index time: beam search costs many
times an encoding (a folder would take ten times longer or more to index, for captions mostly
never looked at), and the index keeps its format, so an index made before captions existed
shows them too. The page asks for one caption at a time, in the order of the results, and stops
when a new search begins: a model busy with captions nobody waits for would delay the search.

Safety. The server listens on 127.0.0.1 (this machine only) unless --host says otherwise, and
answers only requests addressed to a name of that address or one given with --allowed_hosts: a
page of another site that points its own name at 127.0.0.1 (DNS rebinding) is refused. A
thumbnail is served only for a path found in the index, by lookup, never by joining user input to
a folder, and only if the file there now is a regular file inside the indexed folder (links
resolved) of at most MAX_PHOTO_BYTES, opened without blocking (read_photo). Every image decoded
(an upload, a photo for its thumbnail) is decoded on one of DECODE_SLOTS threads, no larger than
needed (a JPEG at reduced scale), and refused before decoding if it would decode to more than
MAX_DECODED_PIXELS: a decompression bomb, or many large uploads at once, cannot exhaust the
memory. Uploads are limited in bytes, and queries cut to MAX_QUERY_CHARS characters before they
reach the tokenizer. An index file is checked whole when it is opened (load_index), and `index`
locks it while it writes it. The page is told paths as the user typed them, never absolute ones.
"""
import argparse
import hashlib
import io
import json
import math
import os
import socket
import stat
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.responses import FileResponse, HTMLResponse
from PIL import Image
from starlette.middleware.trustedhost import TrustedHostMiddleware
from tqdm import tqdm

import clip_model
import data_loader
import demo
import files
import settings
from errors import DataError, MissingInputError, OutputError, SettingsError, run_script

INDEX_FORMAT = 1
EXACT_LIMIT = 1_000_000         # photos searched exactly even when faiss is installed
RESCORE_MARGIN = 2e-3           # > the error of a float16 product's score (rounding + query)
MAX_RESCORED = 100_000
MAX_QUERY_CHARS = 1000          # a query is cut here; the text tower reads 77 tokens at most anyway
# Decoding an image is what can take a server's memory: a 250 KB PNG can hold 49 megapixels.
MAX_DECODED_PIXELS = 50_000_000  # an upload or a photo decodes to at most this (a big phone photo)
DECODE_SLOTS = 2                # images decoded at once; the rest wait: the peak is at most
                                # 2 x 50 MP x 4 bytes x 2 copies (RGBA and its reduce) = 800 MB
MAX_PHOTO_BYTES = 200 * 2**20   # a larger file at an indexed path gets no thumbnail
THUMBNAIL_SIDE = 256
SAVE_EVERY = 50_000             # photos encoded between two saves of the index while indexing
DEFAULT_K, MAX_K = 24, 500
PAGE = Path(__file__).resolve().parent / "search_app.html"


class QueryError(ValueError):
    """A query the server cannot answer; `status` is its HTTP status (400, 404, ...)."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------------------------
# The model that made an index

@dataclass
class ModelSpec:
    """Which weights made an index's features, and how to build the model again."""
    checkpoint: str = ""   # one of our checkpoints (absolute path), or
    model_name: str = ""   # an open_clip model name or preset, with
    pretrained: str = ""   # a pretrained tag or a weights file (absolute path)
    sha256: str = ""       # of the weights file: the model's identity, whatever its path

    def describe(self, show=str):
        """The model in words; `show` writes a file's path (shown_path: never absolute)."""
        if self.checkpoint:
            return f"checkpoint {show(self.checkpoint)}"
        weights = show(self.pretrained) if os.path.isabs(self.pretrained) else self.pretrained
        return f"{self.model_name} with weights {weights}"


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_file(spec):
    """The file holding the weights of a ModelSpec (a pretrained tag resolves to the cache)."""
    if spec.checkpoint:
        return spec.checkpoint
    if os.path.isfile(spec.pretrained):
        return spec.pretrained
    name = clip_model.resolve_model_name(spec.model_name)
    return clip_model.resolve_pretrained(name, spec.pretrained)[0]


def model_spec(checkpoint="", model_name="", pretrained=""):
    """The ModelSpec of the command line's model flags, with the sha256 of its weights."""
    if checkpoint:
        if not os.path.isfile(checkpoint):
            raise MissingInputError(f"--checkpoint {checkpoint}: no such file")
        spec = ModelSpec(checkpoint=os.path.abspath(checkpoint))
    else:
        if not pretrained:
            raise SettingsError(f"--model_name {model_name} needs --pretrained (a tag or a weights "
                                f"file): the features of an untrained model find nothing")
        if os.sep in pretrained or os.path.splitext(pretrained)[1]:
            if not os.path.isfile(pretrained):
                raise MissingInputError(f"--pretrained {pretrained}: no such weights file")
            pretrained = os.path.abspath(pretrained)
        spec = ModelSpec(model_name=model_name, pretrained=pretrained)
    spec.sha256 = file_sha256(weights_file(spec))
    return spec


def load_model(spec, device):
    """The ClipSetup of a ModelSpec."""
    if spec.checkpoint:
        return clip_model.model_from_checkpoint(spec.checkpoint, device)[0]
    return clip_model.build_model(spec.model_name, spec.pretrained, device)


# ----------------------------------------------------------------------------------------------
# The index file

@dataclass
class PhotoIndex:
    """Every indexed photo: row i is paths[i], sizes[i], mtimes[i] and features[i]."""
    root: str                  # the indexed folder (absolute)
    paths: list                # relative to root, '/'-separated
    sizes: np.ndarray          # int64, bytes
    mtimes: np.ndarray         # int64, nanoseconds since the epoch
    features: np.ndarray       # float16 [N, D], unit rows
    model: ModelSpec
    unreadable: list = field(default_factory=list)   # messages of files skipped at the last run

    def __len__(self):
        return len(self.paths)


def save_index(index, path):
    """Write the index whole or not at all (files.atomic_write)."""
    path = Path(path)
    names = "\0".join(index.paths).encode("utf-8")   # NUL: the one character no file name holds
    meta = {"format": INDEX_FORMAT, "root": index.root, "model": asdict(index.model),
            "unreadable": index.unreadable}
    with files.atomic_write(path) as f:
        np.savez(f, paths=np.frombuffer(names, dtype=np.uint8), sizes=index.sizes,
                 mtimes=index.mtimes, features=index.features, meta=np.array(json.dumps(meta)))


@contextmanager
def index_lock(index_path):
    """Hold an exclusive lock on an index while `index` reads and writes it, as train.py locks a
    run folder: a second run on the same index is refused at once instead of racing the first
    (each would save only the photos it encoded). The lock is taken on a hidden file beside the
    index, left in place: deleting it would let a third run lock a new file while the second
    still holds the old one. The kernel releases it however the process ends."""
    path = Path(index_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = files.lock(path.with_name(f".{path.name}.lock"))
    if handle is None:
        raise OutputError(f"index {index_path} is being written by another running `search_app.py "
                          f"index`; wait for it to end, or choose another --index") from None
    try:
        yield
    finally:
        os.close(handle)                                 # releases the lock


INDEX_ARRAYS = ("paths", "sizes", "mtimes", "features", "meta")


def load_index(path):
    """The PhotoIndex in an index file, checked whole before anything is served from it: a file
    that is not an index, or one whose parts disagree, is one DataError naming the file and what
    is wrong, never a traceback or an HTTP 500 later."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"index {path} not found; build it with: python search_app.py "
                                f"index --images DIR --checkpoint CHECKPOINT --index {path}")
    arrays = read_index_arrays(path)
    meta = index_meta(arrays, path)
    paths = index_paths(arrays, path)
    check_index_arrays(arrays, len(paths), path)
    return PhotoIndex(meta["root"], paths, arrays["sizes"], arrays["mtimes"], arrays["features"],
                      ModelSpec(**meta["model"]), meta.get("unreadable", []))


def bad_index(path, problem):
    return DataError(f"index {path}: {problem}; build it again with: python search_app.py index "
                     f"--images DIR --checkpoint CHECKPOINT --index {path}")


def read_index_arrays(path):
    """{name: array} of an index file, read without pickle."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":
        raise bad_index(path, "not an index: an index is a numpy .npz archive (a zip file), and "
                              "this file " + (f"starts with {head!r}" if head else "is empty"))
    try:
        with np.load(path, allow_pickle=False) as saved:
            missing = [name for name in INDEX_ARRAYS if name not in saved.files]
            if missing:
                raise bad_index(path, f"no {', '.join(missing)} in it (an index holds "
                                      f"{', '.join(INDEX_ARRAYS)})")
            return {name: saved[name] for name in INDEX_ARRAYS}
    except DataError:
        raise
    except Exception as error:   # zipfile and numpy raise many types for a damaged or pickled archive
        raise bad_index(path, f"it cannot be read ({type(error).__name__}: {error})") from None


def index_meta(arrays, path):
    """The index's JSON header: its format, the folder (absolute) and the model that made it."""
    try:
        meta = json.loads(str(arrays["meta"]))
    except ValueError as error:
        raise bad_index(path, f"its meta is not JSON ({error})") from None
    if not isinstance(meta, dict) or "format" not in meta:
        raise bad_index(path, "no format number in its meta")
    if isinstance(meta["format"], int) and meta["format"] > INDEX_FORMAT:
        raise bad_index(path, f"format {meta['format']}, newer than this code reads (format "
                              f"{INDEX_FORMAT}; update search_app.py)")
    if meta["format"] != INDEX_FORMAT:
        raise bad_index(path, f"format {meta['format']!r} is not one this code knows (format "
                              f"{INDEX_FORMAT})")
    if not (isinstance(meta.get("root"), str) and os.path.isabs(meta["root"])):
        raise bad_index(path, f"its folder {meta.get('root')!r} is not an absolute path")
    model, known = meta.get("model"), {spec.name for spec in fields(ModelSpec)}
    if not (isinstance(model, dict) and set(model) <= known and model.get("sha256")
            and all(isinstance(value, str) for value in model.values())
            and (model.get("checkpoint") or model.get("model_name") and model.get("pretrained"))):
        raise bad_index(path, f"its model {model!r} is not a model description ({', '.join(sorted(known))})")
    unreadable = meta.get("unreadable", [])
    if not (isinstance(unreadable, list) and all(isinstance(m, str) for m in unreadable)):
        raise bad_index(path, "its list of unreadable files is not a list of messages")
    return meta


def index_paths(arrays, path):
    """The photos' paths: relative to the folder, '/'-separated, inside it, each once. A path
    that climbs out of the folder ('../x.png', '/etc/passwd') would have its file served."""
    names = arrays["paths"]
    if names.dtype != np.uint8 or names.ndim != 1:
        raise bad_index(path, f"its paths are {names.dtype} {list(names.shape)}, not utf-8 bytes")
    try:
        paths = names.tobytes().decode("utf-8").split("\0") if len(names) else []
    except UnicodeDecodeError as error:
        raise bad_index(path, f"its paths are not utf-8 ({error})") from None
    for photo in paths:
        if photo.startswith("/") or any(part in ("", ".", "..") for part in photo.split("/")):
            raise bad_index(path, f"photo path {photo!r} is not a plain path inside the folder")
    if len(set(paths)) != len(paths):
        raise bad_index(path, "a photo path is listed twice")
    return paths


def check_index_arrays(arrays, num_paths, path):
    """One row per photo in every array, of the types save_index writes; finite features."""
    if num_paths == 0:
        raise bad_index(path, "it holds no photo")
    features = arrays["features"]
    if features.dtype != np.float16 or features.ndim != 2 or features.shape[1] == 0:
        raise bad_index(path, f"its features are {features.dtype} {list(features.shape)}, not "
                              f"float16 [photos, dimension]")
    for name in ("sizes", "mtimes"):
        if arrays[name].dtype != np.int64 or arrays[name].ndim != 1:
            raise bad_index(path, f"its {name} are {arrays[name].dtype} {list(arrays[name].shape)}, "
                                  f"not int64 [photos]")
    lengths = {name: len(arrays[name]) for name in ("sizes", "mtimes", "features")}
    if set(lengths.values()) != {num_paths}:
        raise bad_index(path, f"{num_paths} photo paths but " +
                        ", ".join(f"{n} {name}" for name, n in lengths.items()))
    for start in range(0, num_paths, 65536):        # in parts: a boolean copy of a million rows is 0.5 GB
        if not np.isfinite(features[start:start + 65536]).all():
            raise bad_index(path, "its features hold NaN or infinite values")


# ----------------------------------------------------------------------------------------------
# Indexing: scan the folder, encode what is new or changed, keep the rest

def scan_folder(root):
    """{path relative to root: (size, mtime_ns)} of every image file under root, and the
    messages of files that cannot be indexed. Hidden files and folders (a name starting with
    '.', such as the thumbnail cache) are left out; symbolic links to folders are not followed.
    Only regular files inside the folder are indexed, the files `serve` shows (see read_photo):
    a FIFO would block the reader for good, and a link to a file elsewhere is not shown."""
    found, problems, folders = {}, [], [Path(root)]
    real_root = os.path.realpath(root)
    while folders:
        folder = folders.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as error:
            problems.append(f"folder '{folder}' cannot be listed: {error.strerror}")
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                folders.append(Path(entry.path))
            elif entry.name.lower().endswith(data_loader.IMAGE_EXTENSIONS):
                relative = os.path.relpath(entry.path, root).replace(os.sep, "/")
                try:
                    info = entry.stat()
                    relative.encode("utf-8")
                except OSError as error:
                    problems.append(f"image '{entry.path}' cannot be read: {error.strerror}")
                    continue
                except UnicodeEncodeError:
                    problems.append(f"image '{entry.path}': the file name is not valid UTF-8; "
                                    f"rename it")
                    continue
                if not stat.S_ISREG(info.st_mode):
                    problems.append(f"image '{entry.path}' is not a regular file (a FIFO, a device "
                                    f"or a folder)")
                    continue
                if entry.is_symlink() and not inside_folder(real_root, entry.path):
                    problems.append(f"image '{entry.path}' is a link to a file outside the "
                                    f"folder; copy the file into the folder to index it")
                    continue
                found[relative] = (info.st_size, info.st_mtime_ns)
    return dict(sorted(found.items())), problems


@dataclass
class UpdatePlan:
    """What indexing a folder again does to an existing index."""
    keep: np.ndarray       # rows of the old index that stay as they are
    encode: list           # paths to encode: the new ones, then the changed ones
    new: int
    changed: int
    deleted: int


def plan_update(old, found):
    """Compare the old index (or None) with the files found now (see scan_folder). A file whose
    size or modification time differs has changed and is encoded again; a file gone is dropped."""
    if old is None:
        return UpdatePlan(np.zeros(0, dtype=np.int64), list(found), len(found), 0, 0)
    row_of = {path: row for row, path in enumerate(old.paths)}
    keep, new, changed = [], [], []
    for path, (size, mtime) in found.items():
        row = row_of.get(path)
        if row is None:
            new.append(path)
        elif (old.sizes[row], old.mtimes[row]) == (size, mtime):
            keep.append(row)
        else:
            changed.append(path)
    deleted = len(old) - len(keep) - len(changed)
    return UpdatePlan(np.asarray(keep, dtype=np.int64), new + changed, len(new), len(changed), deleted)


def encode_photos(setup, files, batch_size=64, num_workers=2, device="cpu", precision="fp32",
                  progress=None):
    """Features [n, D] (float16) of the readable files, their positions in `files`, and the
    message of every unreadable one. DataLoader workers decode while the model encodes;
    `progress` (a tqdm bar) counts the files."""

    dataset = data_loader.ImageDataset(files, data_loader.image_transform(setup.preprocess_cfg))
    loader = data_loader.build_dataloader(dataset, batch_size, num_workers=num_workers, train=False)
    kept, failed = [], []

    def readable_batches():
        for batch in loader:
            failed.extend(message for _, message in batch["failed"])
            if progress is not None:
                progress.update(len(batch["indices"]) + len(batch["failed"]))
            if len(batch["indices"]):
                kept.append(batch["indices"])
                yield batch["images"]
    features = clip_model.encode_images(setup.model, readable_batches(), device, precision)
    if not kept:
        return np.zeros((0, 0), np.float16), np.zeros(0, np.int64), failed
    return features.half().numpy(), torch.cat(kept).numpy(), failed


@dataclass
class IndexReport:
    """What one run of `index` did; printed, and read by the benchmark. new and changed count
    the photos encoded; a file that cannot be read is in `unreadable` only."""
    images: int = 0
    new: int = 0
    changed: int = 0
    deleted: int = 0
    unchanged: int = 0
    encoded: int = 0
    model_changed: bool = False
    unreadable: list = field(default_factory=list)
    scan_s: float = 0.0
    encode_s: float = 0.0
    save_s: float = 0.0


def build_index(images, index_path, spec, device="cpu", precision="fp32", batch_size=64,
                num_workers=2):
    """Index the photos under `images` into index_path, encoding only what an existing index
    there lacks; the model is loaded only if something must be encoded. The index is saved
    every SAVE_EVERY photos, so an interrupted run keeps its work: run it again to go on.
    Returns an IndexReport. The index is locked meanwhile: a second run on it is refused."""
    root = os.path.abspath(images)
    if data_loader.is_webdataset(images) and not os.path.isdir(root):   # a .tar, a brace pattern
        raise DataError(shards_are_not_photos(images))
    if not os.path.isdir(root):
        raise MissingInputError(f"--images {root}: no such folder")
    with index_lock(index_path):
        return update_index(images, root, index_path, spec, device, precision, batch_size,
                            num_workers)


def update_index(images, root, index_path, spec, device, precision, batch_size, num_workers):
    """build_index's work, done while it holds the index's lock."""

    old = previous_index(index_path, root)
    report = IndexReport(model_changed=old is not None and old.model.sha256 != spec.sha256)
    if report.model_changed:   # features of two models cannot be compared: encode everything
        old = None
    started = time.perf_counter()
    found, report.unreadable = scan_folder(root)
    plan = plan_update(old, found)
    report.scan_s = time.perf_counter() - started
    report.unchanged, report.deleted = len(plan.keep), plan.deleted
    index = kept_photos(old, plan.keep, root, spec)
    setup = load_model(spec, device) if plan.encode else None
    with tqdm(total=len(plan.encode), unit="image", desc="encoding", disable=not plan.encode,
              dynamic_ncols=True) as progress:
        for start in range(0, len(plan.encode), SAVE_EVERY):
            paths = plan.encode[start:start + SAVE_EVERY]
            started = time.perf_counter()
            features, rows, failed = encode_photos(setup, [os.path.join(root, p) for p in paths],
                                                   batch_size, num_workers, device, precision,
                                                   progress)
            report.encode_s += time.perf_counter() - started
            index = add_photos(index, [paths[row] for row in rows], features, found)
            report.unreadable += failed
            report.encoded += len(rows)
            report.new += int((start + rows < plan.new).sum())  # plan.encode lists new ones first
            report.save_s += save_if_any(index, index_path, report.unreadable)
    if not len(index):
        raise DataError(shards_are_not_photos(images) if data_loader.is_webdataset(images) else
                        f"--images {images}: no readable image found (extensions: "
                        f"{', '.join(data_loader.IMAGE_EXTENSIONS)}; {len(report.unreadable)} "
                        f"unreadable files)")
    if not plan.encode and plan.deleted:
        report.save_s += save_if_any(index, index_path, report.unreadable)
    report.changed, report.images = report.encoded - report.new, len(index)
    return report


def shards_are_not_photos(images):
    """What --images of WebDataset shards gets: the app shows photos from their files, and
    indexes again only the files that changed, so it needs the images as files."""
    return (f"--images {images}: WebDataset shards; search_app.py searches a folder of photo files "
            f"(it shows them, and indexes again only those that changed): unpack the shards' images "
            f"into a folder and index that, e.g. mkdir photos && tar -xf SHARD.tar -C photos "
            f"--wildcards '*.jpg' '*.jpeg' '*.png' '*.webp'")


def previous_index(index_path, root):
    """The index already at index_path (None if there is none); it must be of the same folder."""
    if not Path(index_path).is_file():
        return None
    old = load_index(index_path)
    if old.root != root:
        raise DataError(f"index {index_path} holds the photos of {old.root}, not {root}; use "
                        f"another --index file for this folder")
    return old


def kept_photos(old, keep, root, spec):
    """The rows `keep` of the old index (an empty index when there is none)."""
    if old is None:
        return PhotoIndex(root, [], np.zeros(0, np.int64), np.zeros(0, np.int64),
                          np.zeros((0, 0), np.float16), spec)
    return PhotoIndex(root, [old.paths[row] for row in keep], old.sizes[keep], old.mtimes[keep],
                      old.features[keep], spec)


def add_photos(index, paths, features, found):
    """The index with newly encoded photos added, all sorted by path (`found`: their size and
    modification time, from scan_folder)."""
    if not paths:
        return index
    paths = index.paths + paths
    stacked = np.concatenate([index.features, features]) if len(index) else features
    order = sorted(range(len(paths)), key=paths.__getitem__)
    paths = [paths[k] for k in order]
    return PhotoIndex(index.root, paths, np.array([found[p][0] for p in paths], dtype=np.int64),
                      np.array([found[p][1] for p in paths], dtype=np.int64),
                      np.ascontiguousarray(stacked[order]), index.model)


def save_if_any(index, index_path, unreadable):
    """Save a non-empty index with the list of unreadable files; the seconds it took."""
    if not len(index):
        return 0.0
    started = time.perf_counter()
    index.unreadable = unreadable
    save_index(index, index_path)
    return time.perf_counter() - started


def print_report(report, index_path, root):
    print(f"indexed {report.images} images of {root}: {report.new} new, {report.changed} "
          f"changed, {report.deleted} deleted, {report.unchanged} unchanged")
    if report.model_changed:
        print("the model's weights differ from the ones the index was built with: every image "
              "was encoded again")
    if report.encoded:
        print(f"encoded {report.encoded} images in {report.encode_s:.1f} s "
              f"({report.encoded / max(report.encode_s, 1e-9):.0f} images/s)")
    if report.unreadable:
        print(f"skipped {len(report.unreadable)} unreadable files:")
        for message in report.unreadable[:20]:
            print(f"  {message}")
        if len(report.unreadable) > 20:
            print(f"  ... and {len(report.unreadable) - 20} more")
    if not (report.encoded or report.deleted):
        print(f"{index_path} was up to date")
        return
    size = Path(index_path).stat().st_size
    print(f"wrote {index_path} ({size / 2**20:.1f} MiB)" if size >= 2**20 else
          f"wrote {index_path} ({size / 2**10:.0f} KiB)")


# ----------------------------------------------------------------------------------------------
# Searching

class Searcher:
    """The top k rows of a float16 feature matrix X for a query vector q, by score X q.

    "exact" computes every score with torch's float16 product, whose results are rounded to
    float16: 2^-11 apart near 1, too coarse to order near-duplicates (a photo and its edited
    copy). So every row within RESCORE_MARGIN of the k-th float16 score is scored again in
    float32, and those scores decide: the top k of the float16 numbers stored, in float32. "faiss"
    (for more than EXACT_LIMIT photos, when faiss is installed) clusters the rows into about
    4 sqrt(N) lists and scans the nprobe lists whose centres are nearest to q: approximate,
    unless nprobe covers every list.
    """

    def __init__(self, features, method="auto", nprobe=32):
        if method == "auto":
            method = "faiss" if len(features) > EXACT_LIMIT and _has_faiss() else "exact"
        if method == "faiss" and not _has_faiss():
            raise SettingsError("--search faiss: faiss is not installed (pip install faiss-cpu)")
        self.method, self.num_rows = method, len(features)
        self.matrix = torch.from_numpy(features) if method == "exact" else None
        self.faiss = _faiss_index(features, nprobe) if method == "faiss" else None

    def search(self, query, k):
        """(rows, scores) of the k best rows, best first; query is a float32 vector [D]."""
        k = min(k, self.num_rows)
        if self.faiss is not None:
            scores, rows = self.faiss.search(np.asarray(query, np.float32)[None], k)
            keep = rows[0] >= 0
            return rows[0][keep].astype(np.int64), scores[0][keep]
        query = torch.as_tensor(query, dtype=torch.float32)
        rough = self.matrix @ query.to(self.matrix.dtype)
        kth = torch.topk(rough, k).values[-1]
        candidates = torch.nonzero(rough >= kth - RESCORE_MARGIN).squeeze(1)
        if len(candidates) > MAX_RESCORED:       # a folder of thousands of identical photos
            candidates = torch.topk(rough, MAX_RESCORED).indices
        best = torch.topk(self.matrix[candidates].float() @ query, k)
        return candidates[best.indices].numpy(), best.values.numpy()


def _has_faiss():
    try:
        import faiss  # noqa: F401
        return True
    except ImportError:
        return False


def _faiss_index(features, nprobe):
    """An inverted-file faiss index of the rows, stored in float16 like the exact matrix."""
    import faiss
    n, dim = features.shape
    lists = max(1, int(4 * math.sqrt(n)))
    quantizer = faiss.IndexFlatIP(dim)
    # (faiss's Python wrapper keeps the quantizer alive as long as the index)
    index = faiss.IndexIVFScalarQuantizer(quantizer, dim, lists, faiss.ScalarQuantizer.QT_fp16,
                                          faiss.METRIC_INNER_PRODUCT)
    index.by_residual = False     # store the rows themselves in float16, not their offsets
    sample = np.random.default_rng(0).choice(n, min(n, 64 * lists), replace=False)
    index.train(features[np.sort(sample)].astype(np.float32))
    for start in range(0, n, 65536):
        index.add(features[start:start + 65536].astype(np.float32))
    index.nprobe = min(nprobe, lists)
    return index


# ----------------------------------------------------------------------------------------------
# The service behind the web page: queries in, results out

@dataclass
class SearchService:
    index: PhotoIndex
    setup: object              # ClipSetup of the model that made the index
    device: object
    searcher: Searcher
    thumbnails: Path           # cache folder of the thumbnails and captions
    max_upload_bytes: int
    caption_settings: object = None   # clip_model.CaptionSettings when the model writes captions
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Every decode (an upload, a thumbnail) runs on one of DECODE_SLOTS threads of its own, however
    # many requests come at once; the others wait their turn. Threads, not a semaphore: glibc gives
    # each thread a memory arena and keeps what it frees there, so eight request threads decoding
    # one after another still kept 8 x 150 MB (1.5 GB measured, 0.4 GB with two decode threads).
    decoder: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(DECODE_SLOTS, thread_name_prefix="decode"))
    row_of: dict = field(init=False)

    def __post_init__(self):
        self.row_of = {path: row for row, path in enumerate(self.index.paths)}
        self.transform = data_loader.image_transform(self.setup.preprocess_cfg)
        size = self.setup.preprocess_cfg["size"]
        self.image_side = min(size) if isinstance(size, (list, tuple)) else size

    def info(self):
        """What the page shows of the index. Paths are shown as the user gave them, never
        absolute: a visitor need not learn the user's name and folders."""
        return {"images": len(self.index), "root": shown_path(self.index.root),
                "model": self.index.model.describe(shown_path),
                "dim": int(self.index.features.shape[1]), "search": self.searcher.method,
                "max_query_chars": MAX_QUERY_CHARS, "max_upload_bytes": self.max_upload_bytes,
                "max_k": MAX_K, "captions": self.caption_settings is not None}

    def search_text(self, text, k):
        text = " ".join(text[:MAX_QUERY_CHARS].split())
        if not text:
            raise QueryError("empty query: type what you are looking for")
        with self.lock:
            query = clip_model.encode_texts(self.setup.model, self.setup.tokenizer, [text],
                                            self.device)[0]
            return self._results(query, k)

    def search_image(self, upload, k, name="upload"):
        """Photos like an uploaded image; `upload` is a binary file, read by the decode thread (so
        that the bytes of the uploads waiting for one stay in the server's temporary files)."""
        image = self.decoder.submit(lambda: decode_upload(upload.read(), name, self.image_side)).result()
        with self.lock:
            query = clip_model.encode_images(self.setup.model, [self.transform(image)[None]],
                                             self.device)[0]
            return self._results(query, k)

    def search_like(self, path, k):
        """Photos like an indexed one: its stored feature is the query, nothing is encoded."""
        row = self.row_of.get(path)
        if row is None:
            raise QueryError(f"{path!r} is not in the index", 404)
        with self.lock:
            return self._results(self.index.features[row].astype(np.float32), k)

    def _results(self, query, k):
        rows, scores = self.searcher.search(np.asarray(query, np.float32), k)
        return [{"path": self.index.paths[row], "score": round(float(score), 4)}
                for row, score in zip(rows, scores)]

    def thumbnail(self, path):
        """The cached thumbnail of an indexed photo, made on first request. The path is looked
        up in the index: anything else (../.., /etc/passwd, a file not indexed) is refused."""
        cached = self.thumbnails / f"{self._photo_key(path)}.jpg"
        if not cached.is_file():
            self.decoder.submit(lambda: make_thumbnail(read_photo(self.index.root, path), path,
                                                       cached)).result()
        return cached

    def caption(self, path):
        """The caption the model writes for an indexed photo, written on first request and cached
        (its file names the photo as it is now and the caption settings)."""
        if self.caption_settings is None:
            raise QueryError(f"the model of this index ({self.index.model.describe(shown_path)}) writes "
                             f"no captions; a captioner (CoCa) does")
        settings = json.dumps(asdict(self.caption_settings), sort_keys=True)
        cached = self.thumbnails / f"{self._photo_key(path, settings)}.txt"
        if not cached.is_file():
            image = self.decoder.submit(lambda: decode_photo(read_photo(self.index.root, path), path,
                                                             self.image_side, "caption")).result()
            with self.lock:
                caption = clip_model.generate_captions(self.setup, None, self.transform(image)[None],
                                                       self.caption_settings)[0]
            with files.atomic_write(cached, sync=False) as f:   # a cache: a lost one is written again
                f.write(caption.encode("utf-8"))
        return cached.read_text(encoding="utf-8")

    def _photo_key(self, path, *more):
        """A cache file's name for an indexed photo as it is now (its size and modification time),
        and `more`. The path is looked up in the index: anything else (../.., /etc/passwd, a file
        not indexed) is refused."""
        row = self.row_of.get(path)
        if row is None:
            raise QueryError(f"{path!r} is not in the index", 404)
        key = "\0".join([path, str(self.index.sizes[row]), str(self.index.mtimes[row]), *more])
        return hashlib.sha1(key.encode("utf-8")).hexdigest()


def shown_path(path):
    """A path as a visitor is shown it: relative to the folder the server was started in when it
    lies inside it (data/shapes, as the user typed it), else its last name only."""
    relative = os.path.relpath(path)
    return Path(path).name if relative == ".." or relative.startswith(".." + os.sep) else relative


def decode_upload(data, name, side):
    """An uploaded image in RGB, decoded no larger than a model that reads side x side pixels
    needs (data_loader.decode_image: a JPEG at reduced scale, any image shrunk once decoded), and
    refused (QueryError, 400) if it is not an image or would decode to more than
    MAX_DECODED_PIXELS: a decompression bomb (a small file that claims gigapixels) is refused
    from its header, before anything is decoded."""

    if not data:
        raise QueryError("the upload is empty: choose an image file")
    try:
        Image.open(io.BytesIO(data)).close()        # reads the header only: is it an image?
    except Image.DecompressionBombError as error:
        raise QueryError(f"{name}: {error}") from None
    except Exception as error:   # Pillow raises many types for what is not an image
        raise QueryError(f"{name} is not an image ({type(error).__name__}: {error})") from None
    try:
        return data_loader.decode_image(data, name, side, MAX_DECODED_PIXELS)
    except DataError as error:
        raise QueryError(str(error)) from None


def read_photo(root, path):
    """The bytes of the file at an indexed path as it is now, read only if it is a regular file
    inside the indexed folder (resolved: a link may point elsewhere) of at most MAX_PHOTO_BYTES;
    QueryError otherwise. What the index recorded may have been replaced since: a FIFO would block
    an open() for good, a link to /dev/zero would be read without end, a link to a file outside
    the folder would be served. So the file is opened without following a last link and without
    blocking, and its fstat decides (the file opened, not a name looked up again)."""
    resolved = os.path.realpath(os.path.join(root, path))
    if not inside_folder(root, resolved):
        raise QueryError(f"{path!r} now leads outside the indexed folder; it is not served", 403)
    try:
        handle = os.open(resolved, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        raise QueryError(f"{path!r} cannot be read ({error.strerror}); index the folder "
                         f"again", 410) from None
    try:
        found = os.fstat(handle)
        if not stat.S_ISREG(found.st_mode):
            raise QueryError(f"{path!r} is no longer a regular file; index the folder again", 410)
        if found.st_size > MAX_PHOTO_BYTES:
            raise photo_too_large(path)
        with os.fdopen(handle, "rb", closefd=False) as photo:
            data = photo.read(MAX_PHOTO_BYTES + 1)  # + 1: a file that grew since fstat is seen
    except OSError as error:
        raise QueryError(f"{path!r} cannot be read ({error.strerror}); index the folder "
                         f"again", 410) from None
    finally:
        os.close(handle)
    if len(data) > MAX_PHOTO_BYTES:
        raise photo_too_large(path)
    return data


def inside_folder(folder, path):
    """Whether a path, its links followed, lies inside a folder (its links followed too)."""
    folder = os.path.realpath(folder)
    return os.path.commonpath([folder, os.path.realpath(path)]) == folder


def photo_too_large(path):
    return QueryError(f"{path!r} is larger than {MAX_PHOTO_BYTES:,} bytes; no thumbnail is made "
                      f"of it", 403)


def decode_photo(data, name, side, made):
    """An indexed photo's bytes decoded in RGB, no larger than `side` pixels on its short side
    need; QueryError (410) saying which thing cannot be `made` of it if they do not decode."""
    try:
        return data_loader.decode_image(data, name, side, MAX_DECODED_PIXELS)
    except DataError as error:
        raise QueryError(f"no {made}: {error}", 410) from None


def make_thumbnail(data, name, target):
    """A JPEG at most THUMBNAIL_SIDE pixels on a side, of an image file's bytes."""
    image = decode_photo(data, name, THUMBNAIL_SIDE, "thumbnail")
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    with files.atomic_write(target, sync=False) as f:    # a cache: a lost one is made again
        image.save(f, format="JPEG", quality=88)


# ----------------------------------------------------------------------------------------------
# The web application: the page and its JSON API

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")   # as a Host header names them


def allowed_hosts(host, extra=()):
    """The names a request may be addressed to (its Host header): those of the address the
    server listens on, and `extra` (--allowed_hosts; '*' accepts any). Why: a web page of another
    site can point its own name at 127.0.0.1 (DNS rebinding) and then call this API as if it were
    the same site; its requests still carry that site's name, and are refused."""
    if "*" in extra:
        return ["*"]
    if host in ("0.0.0.0", "::", ""):      # every address of this machine
        names = [*LOOPBACK_HOSTS, socket.gethostname(), socket.getfqdn()]
    elif host in ("localhost", "::1") or host.startswith("127."):
        names = [*LOOPBACK_HOSTS, *([host] if host.startswith("127.") else [])]
    else:
        names = [f"[{host}]" if ":" in host else host]
    return list(dict.fromkeys(name.lower() for name in [*names, *extra]))


def create_app(service, hosts=LOOPBACK_HOSTS):
    """FastAPI app: GET / (the page), /api/info, /api/search?q=&k=, POST /api/search_image
    (multipart, field `file`), /api/search_like?path=&k=, /api/thumbnail?path= and
    /api/caption?path=. A request addressed to a host not in `hosts` (see allowed_hosts) gets 400."""

    # The body limit makes FastAPI answer 413 as soon as an upload passes it, before it is read.
    app = FastAPI(title="Photo search", docs_url=None, redoc_url=None,
                  max_body_size=service.max_upload_bytes)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(hosts), www_redirect=False)

    def answer(search, *args):
        started = time.perf_counter()
        try:
            results = search(*args)
        except QueryError as error:
            raise HTTPException(error.status, str(error)) from None
        return {"results": results, "took_ms": round(1000 * (time.perf_counter() - started), 1)}

    @app.get("/", response_class=HTMLResponse)
    def page():
        return PAGE.read_text(encoding="utf-8")

    @app.get("/api/info")
    def info():
        return service.info()

    @app.get("/api/search")
    def search(q: str = "", k: int = Query(DEFAULT_K, ge=1, le=MAX_K)):
        return answer(service.search_text, q, k)

    @app.post("/api/search_image")
    def search_image(file: UploadFile = File(...), k: int = Query(DEFAULT_K, ge=1, le=MAX_K)):
        return answer(service.search_image, file.file, k, file.filename or "upload")

    @app.get("/api/search_like")
    def search_like(path: str, k: int = Query(DEFAULT_K, ge=1, le=MAX_K)):
        return answer(service.search_like, path, k)

    @app.get("/api/thumbnail")
    def thumbnail(path: str):
        try:
            cached = service.thumbnail(path)
        except QueryError as error:
            raise HTTPException(error.status, str(error)) from None
        return FileResponse(cached, media_type="image/jpeg", headers={"Cache-Control": "no-cache"})

    @app.get("/api/caption")
    def caption(path: str):
        try:
            return {"path": path, "caption": service.caption(path)}
        except QueryError as error:
            raise HTTPException(error.status, str(error)) from None

    return app


def open_service(index_path, model_args, device="cpu", search="auto", nprobe=32,
                 max_upload_mb=20.0, caption_settings=None):
    """Everything `serve` needs: the index, the model that made it, the searcher; a captioner
    writes captions with caption_settings (default: clip_model.CaptionSettings())."""
    index = load_index(index_path)
    if model_args.get("checkpoint") or model_args.get("model_name"):
        spec = model_spec(**model_args)     # the same weights at another path, checked below
    else:
        spec, weights = index.model, weights_file(index.model)
        if not os.path.isfile(weights):
            raise MissingInputError(f"{weights}, the weights index {index_path} was built with, is "
                                    f"gone; pass them with --checkpoint or --model_name/--pretrained")
        spec = replace(spec, sha256=file_sha256(weights))
    if spec.sha256 != index.model.sha256:
        raise DataError(f"the weights of {spec.describe()} are not those index {index_path} was "
                        f"built with; run `python search_app.py index` again to encode the photos "
                        f"with them")
    device = clip_model.pick_device(device)
    setup = load_model(spec, device)
    check_feature_dimension(index, setup, index_path, device)
    thumbnails = Path(index_path).with_name(f".{Path(index_path).name}.thumbnails")
    captions = (caption_settings or clip_model.CaptionSettings()) if clip_model.is_captioner(setup.model) else None
    return SearchService(index, setup, device, Searcher(index.features, search, nprobe),
                         thumbnails, int(max_upload_mb * 2**20), captions)


def check_feature_dimension(index, setup, index_path, device):
    """The model's features and the index's must have one dimension, or every query fails."""
    dim = clip_model.encode_texts(setup.model, setup.tokenizer, ["a photo"], device).shape[-1]
    if dim != index.features.shape[1]:
        raise bad_index(index_path, f"its features have {index.features.shape[1]} dimensions, and "
                                    f"those of its model ({index.model.describe()}) {dim}")


def demo_index(language, device, batch_size, num_workers):
    """Index the validation images of demo.py's run (in its results folder) and return the
    index's path. The run must exist: `python demo.py [--language zh]` makes it."""
    cfg = settings.parse_config(["--run_name", f"demo-{language}"])
    checkpoint = Path(cfg.checkpoint_dir) / cfg.run_name / "best.pt"
    if not checkpoint.is_file():
        flag = " --language zh" if language == "zh" else ""
        raise MissingInputError(f"{checkpoint} not found: serve --demo searches the validation "
                                f"images of demo.py's run; run `python demo.py{flag}` first "
                                f"(about two minutes)")
    data = demo.generate_data(demo.build_parser().parse_args(["--language", language]))
    index_path = Path(cfg.results_dir) / cfg.run_name / "search_index.npz"
    report = build_index(data["val"], index_path, model_spec(checkpoint=str(checkpoint)), device,
                         batch_size=batch_size, num_workers=num_workers)
    print_report(report, index_path, os.path.abspath(data["val"]))
    return index_path


# ----------------------------------------------------------------------------------------------
# Command line

def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\nSearch with CLIP")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{index,serve}")
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--checkpoint", default="", help="a checkpoint of ours, e.g. "
                                                         "model-checkpoint/<run>/best.pt")
    model.add_argument("--model_name", default="", help="an open_clip model or preset, or a Chinese-CLIP "
                                                        "model, instead of --checkpoint (e.g. ViT-B-32, "
                                                        "cn-clip:ViT-B-16)")
    model.add_argument("--pretrained", default="", help="with --model_name: a pretrained tag (e.g. "
                                                        "laion2b_s34b_b79k; chinese-clip for a cn-clip model) "
                                                        "or a weights file")
    model.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, mps")

    index = commands.add_parser("index", parents=[model], help="encode the photos of a folder "
                                "(again: only the new and changed ones)")
    index.add_argument("--images", required=True, help="folder of photo files, searched recursively "
                                                        "(WebDataset shards: unpack their images first)")
    index.add_argument("--index", required=True, help="index file to write (.npz); an existing "
                                                      "one is updated")
    index.add_argument("--batch_size", type=int, default=64, help="images encoded per batch")
    index.add_argument("--num_workers", type=int, default=2, help="DataLoader worker processes "
                                                                  "decoding images")
    index.add_argument("--precision", default="fp32", choices=("fp32", "amp", "bf16"),
                       help="encoding precision (amp needs CUDA)")

    serve = commands.add_parser("serve", parents=[model], help="the search page and its JSON API; "
                                "model flags only if the index's weights have moved")
    source = serve.add_mutually_exclusive_group(required=True)
    source.add_argument("--index", help="index file written by `index`")
    source.add_argument("--demo", nargs="?", const="en", choices=("en", "zh"),
                        help="index and search the validation images of demo.py's run "
                             "(language en or zh)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on; 127.0.0.1 "
                                                           "serves this machine only")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--allowed_hosts", nargs="+", default=[], metavar="HOST",
                       help="more names (or addresses) requests may be addressed to than those of "
                            "--host, e.g. the machine's name on the network; '*' accepts any")
    serve.add_argument("--search", default="auto", choices=("auto", "exact", "faiss"),
                       help=f"auto: exact up to {EXACT_LIMIT:,} photos, faiss above if installed")
    serve.add_argument("--nprobe", type=int, default=32, help="clusters faiss scans per query "
                                                              "(more: slower, closer to exact)")
    serve.add_argument("--max_upload_mb", type=float, default=20.0,
                       help="largest image upload accepted, in MiB")
    clip_model.CaptionSettings.add_arguments(serve)
    return parser


def check_args(parser, args):
    if args.checkpoint and args.model_name:
        parser.error("give --checkpoint or --model_name, not both")
    if args.pretrained and not args.model_name:
        parser.error("--pretrained needs --model_name")
    if args.command == "index":
        if not (args.checkpoint or args.model_name):
            parser.error("index needs a model: --checkpoint PATH, or --model_name NAME --pretrained TAG")
        if args.batch_size < 1 or args.num_workers < 0:
            parser.error("--batch_size must be > 0 and --num_workers >= 0")
    if args.command == "serve" and not (args.nprobe > 0 and 0 < args.max_upload_mb < math.inf):
        parser.error(f"--nprobe must be > 0 (it is {args.nprobe}) and --max_upload_mb a number of "
                     f"MiB > 0 (it is {args.max_upload_mb})")


def index_command(args):
    spec = model_spec(args.checkpoint, args.model_name, args.pretrained)
    device = clip_model.pick_device(args.device)
    precision = clip_model.pick_precision(args.precision, device)
    report = build_index(args.images, args.index, spec, device, precision, args.batch_size,
                         args.num_workers)
    print_report(report, args.index, os.path.abspath(args.images))
    return report


def serve_command(args):
    captions = clip_model.CaptionSettings.from_args(args)      # checked before anything loads
    device = clip_model.pick_device(args.device)    # once: --demo indexes with it, then serves
    index_path = demo_index(args.demo, device, 64, 2) if args.demo else args.index
    model_args = {"checkpoint": args.checkpoint, "model_name": args.model_name,
                  "pretrained": args.pretrained}
    service = open_service(index_path, model_args, device, args.search, args.nprobe,
                           args.max_upload_mb, captions)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: anyone who can reach this machine can search "
              f"the photos and see their thumbnails", file=sys.stderr)
    hosts = allowed_hosts(args.host, args.allowed_hosts)
    print(f"searching {len(service.index)} photos of {service.index.root} "
          f"({service.searcher.method} search) at http://{args.host}:{args.port}  (Ctrl-C stops)\n"
          f"answering requests addressed to {', '.join(hosts)} (--allowed_hosts adds names)",
          flush=True)
    uvicorn.run(create_app(service, hosts), host=args.host, port=args.port, log_level="warning")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    return index_command(args) if args.command == "index" else serve_command(args)


if __name__ == "__main__":
    run_script(main, "search_app.py")
