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

Safety. The server listens on 127.0.0.1 (this machine only) unless --host says otherwise. A
thumbnail is served only for a path found in the index, by lookup, never by joining user input
to a folder. Uploads are limited in bytes and in pixels: a decompression bomb (a small file that
claims gigapixels) is refused from its header, before anything is decoded. Queries are cut to
MAX_QUERY_CHARS characters before they reach the tokenizer.
"""
import argparse
import hashlib
import io
import json
import math
import os
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from errors import DataError, MissingInputError, SettingsError

INDEX_FORMAT = 1
EXACT_LIMIT = 1_000_000         # photos searched exactly even when faiss is installed
RESCORE_MARGIN = 2e-3           # > the error of a float16 product's score (rounding + query)
MAX_RESCORED = 100_000
MAX_QUERY_CHARS = 1000          # a query is cut here; the text tower reads 77 tokens at most anyway
MAX_UPLOAD_PIXELS = 50_000_000  # 50 megapixels: a big phone photo decodes to 150 MB of RGB
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

    def describe(self):
        return f"checkpoint {self.checkpoint}" if self.checkpoint else \
            f"{self.model_name} with weights {self.pretrained}"


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_file(spec):
    """The file holding the weights of a ModelSpec (a pretrained tag resolves to the cache)."""
    import clip_model
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
    import clip_model
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
    """Write the index whole or not at all: a temporary file beside it, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = "\0".join(index.paths).encode("utf-8")   # NUL: the one character no file name holds
    meta = {"format": INDEX_FORMAT, "root": index.root, "model": asdict(index.model),
            "unreadable": index.unreadable}
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, paths=np.frombuffer(names, dtype=np.uint8), sizes=index.sizes,
                 mtimes=index.mtimes, features=index.features, meta=np.array(json.dumps(meta)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_index(path):
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"index {path} not found; build it with: python search_app.py "
                                f"index --images DIR --checkpoint CHECKPOINT --index {path}")
    try:
        with np.load(path, allow_pickle=False) as saved:
            meta = json.loads(str(saved["meta"]))
            names = saved["paths"].tobytes().decode("utf-8")
            index = PhotoIndex(meta["root"], names.split("\0") if names else [], saved["sizes"],
                               saved["mtimes"], saved["features"], ModelSpec(**meta["model"]),
                               meta.get("unreadable", []))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"index {path} cannot be read ({type(error).__name__}: {error}); build it "
                        f"again with python search_app.py index ... --index {path}") from None
    if meta["format"] > INDEX_FORMAT:
        raise DataError(f"index {path} has format {meta['format']}, newer than this code reads")
    return index


# ----------------------------------------------------------------------------------------------
# Indexing: scan the folder, encode what is new or changed, keep the rest

def scan_folder(root):
    """{path relative to root: (size, mtime_ns)} of every image file under root, and the
    messages of files that cannot be indexed. Hidden files and folders (a name starting with
    '.', such as the thumbnail cache) are left out; symbolic links to folders are not followed."""
    import data_loader
    found, problems, folders = {}, [], [Path(root)]
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
                    stat = entry.stat()
                    relative.encode("utf-8")
                except OSError as error:
                    problems.append(f"image '{entry.path}' cannot be read: {error.strerror}")
                    continue
                except UnicodeEncodeError:
                    problems.append(f"image '{entry.path}': the file name is not valid UTF-8; "
                                    f"rename it")
                    continue
                found[relative] = (stat.st_size, stat.st_mtime_ns)
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
    import torch

    import clip_model
    import data_loader
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
    Returns an IndexReport."""
    from tqdm import tqdm

    import data_loader
    root = os.path.abspath(images)
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
        raise DataError(f"--images {images}: no readable image found (extensions: "
                        f"{', '.join(data_loader.IMAGE_EXTENSIONS)}; {len(report.unreadable)} "
                        f"unreadable files)")
    if not plan.encode and plan.deleted:
        report.save_s += save_if_any(index, index_path, report.unreadable)
    report.changed, report.images = report.encoded - report.new, len(index)
    return report


def previous_index(index_path, root):
    """The index already at index_path (None if there is none); it must be of the same folder."""
    if not os.path.isdir(root):
        raise MissingInputError(f"--images {root}: no such folder")
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
        import torch
        if method == "auto":
            method = "faiss" if len(features) > EXACT_LIMIT and _has_faiss() else "exact"
        if method == "faiss" and not _has_faiss():
            raise SettingsError("--search faiss: faiss is not installed (pip install faiss-cpu)")
        self.method, self.num_rows = method, len(features)
        self.matrix = torch.from_numpy(features) if method == "exact" else None
        self.faiss = _faiss_index(features, nprobe) if method == "faiss" else None

    def search(self, query, k):
        """(rows, scores) of the k best rows, best first; query is a float32 vector [D]."""
        import torch
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
    thumbnails: Path           # cache folder of the thumbnails
    max_upload_bytes: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    row_of: dict = field(init=False)

    def __post_init__(self):
        import data_loader
        self.row_of = {path: row for row, path in enumerate(self.index.paths)}
        self.transform = data_loader.image_transform(self.setup.preprocess_cfg)

    def info(self):
        return {"images": len(self.index), "root": self.index.root,
                "model": self.index.model.describe(), "dim": int(self.index.features.shape[1]),
                "search": self.searcher.method, "max_query_chars": MAX_QUERY_CHARS,
                "max_upload_bytes": self.max_upload_bytes, "max_k": MAX_K}

    def search_text(self, text, k):
        import clip_model
        text = " ".join(text[:MAX_QUERY_CHARS].split())
        if not text:
            raise QueryError("empty query: type what you are looking for")
        with self.lock:
            query = clip_model.encode_texts(self.setup.model, self.setup.tokenizer, [text],
                                            self.device)[0]
            return self._results(query, k)

    def search_image(self, data, k, name="upload"):
        import clip_model
        image = decode_upload(data, name)
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
        row = self.row_of.get(path)
        if row is None:
            raise QueryError(f"{path!r} is not in the index", 404)
        key = f"{path}\0{self.index.sizes[row]}\0{self.index.mtimes[row]}".encode("utf-8")
        cached = self.thumbnails / f"{hashlib.sha1(key).hexdigest()}.jpg"
        if not cached.is_file():
            make_thumbnail(os.path.join(self.index.root, path), cached)
        return cached


def decode_upload(data, name):
    """An uploaded image in RGB. Its size is read from the header first, so that a
    decompression bomb is refused before any pixel is decoded; QueryError (400) otherwise."""
    from PIL import Image

    import data_loader
    if not data:
        raise QueryError("the upload is empty: choose an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as header:   # reads the header only
                width, height = header.size
    except Image.DecompressionBombError as error:
        raise QueryError(f"{name}: {error}") from None
    except Exception as error:   # Pillow raises many types for what is not an image
        raise QueryError(f"{name} is not an image ({type(error).__name__}: {error})") from None
    if width * height > MAX_UPLOAD_PIXELS:
        raise QueryError(f"{name} is {width} x {height} pixels ({width * height / 1e6:.0f} "
                         f"megapixels); the limit is {MAX_UPLOAD_PIXELS / 1e6:.0f} megapixels")
    try:
        return data_loader.decode_image(data, name)
    except DataError as error:
        raise QueryError(str(error)) from None


def make_thumbnail(source, target):
    """A JPEG at most THUMBNAIL_SIDE pixels on a side; the original file is only read."""
    import data_loader
    try:
        image = data_loader.load_image_file(source)
    except DataError as error:
        raise QueryError(f"{error}; index the folder again", 410) from None
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".tmp", delete=False) as tmp:
        image.save(tmp, format="JPEG", quality=88)
    os.replace(tmp.name, target)


# ----------------------------------------------------------------------------------------------
# The web application: the page and its JSON API

def create_app(service):
    """FastAPI app: GET / (the page), /api/info, /api/search?q=&k=, POST /api/search_image
    (multipart, field `file`), /api/search_like?path=&k= and /api/thumbnail?path=."""
    from fastapi import FastAPI, File, HTTPException, Query, UploadFile
    from fastapi.responses import FileResponse, HTMLResponse

    # The body limit makes FastAPI answer 413 as soon as an upload passes it, before it is read.
    app = FastAPI(title="Photo search", docs_url=None, redoc_url=None,
                  max_body_size=service.max_upload_bytes)

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
        return answer(service.search_image, file.file.read(), k, file.filename or "upload")

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

    return app


def open_service(index_path, model_args, device="cpu", search="auto", nprobe=32,
                 max_upload_mb=20.0):
    """Everything `serve` needs: the index, the model that made it, the searcher."""
    import clip_model
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
    thumbnails = Path(index_path).with_name(f".{Path(index_path).name}.thumbnails")
    return SearchService(index, load_model(spec, device), device,
                         Searcher(index.features, search, nprobe), thumbnails,
                         int(max_upload_mb * 2**20))


def demo_index(language, device, batch_size, num_workers):
    """Index the validation images of demo.py's run (in its results folder) and return the
    index's path. The run must exist: `python demo.py [--language zh]` makes it."""
    import demo
    import settings
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
    model.add_argument("--model_name", default="", help="an open_clip model or preset instead of "
                                                        "--checkpoint (e.g. ViT-B-32)")
    model.add_argument("--pretrained", default="", help="with --model_name: a pretrained tag "
                                                        "(e.g. laion2b_s34b_b79k) or a weights file")
    model.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, mps")

    index = commands.add_parser("index", parents=[model], help="encode the photos of a folder "
                                "(again: only the new and changed ones)")
    index.add_argument("--images", required=True, help="folder of photos, searched recursively")
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
    serve.add_argument("--search", default="auto", choices=("auto", "exact", "faiss"),
                       help=f"auto: exact up to {EXACT_LIMIT:,} photos, faiss above if installed")
    serve.add_argument("--nprobe", type=int, default=32, help="clusters faiss scans per query "
                                                              "(more: slower, closer to exact)")
    serve.add_argument("--max_upload_mb", type=float, default=20.0,
                       help="largest image upload accepted, in MiB")
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
    if args.command == "serve" and not (args.nprobe > 0 and args.max_upload_mb > 0):
        parser.error("--nprobe and --max_upload_mb must be > 0")


def index_command(args):
    import clip_model
    spec = model_spec(args.checkpoint, args.model_name, args.pretrained)
    device = clip_model.pick_device(args.device)
    precision = clip_model.pick_precision(args.precision, device)
    report = build_index(args.images, args.index, spec, device, precision, args.batch_size,
                         args.num_workers)
    print_report(report, args.index, os.path.abspath(args.images))
    return report


def serve_command(args):
    import uvicorn
    index_path = demo_index(args.demo, args.device, 64, 2) if args.demo else args.index
    model_args = {"checkpoint": args.checkpoint, "model_name": args.model_name,
                  "pretrained": args.pretrained}
    service = open_service(index_path, model_args, args.device, args.search, args.nprobe,
                           args.max_upload_mb)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: anyone who can reach this machine can search "
              f"the photos and see their thumbnails", file=sys.stderr)
    print(f"searching {len(service.index)} photos of {service.index.root} "
          f"({service.searcher.method} search) at http://{args.host}:{args.port}  (Ctrl-C stops)",
          flush=True)
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="warning")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    return index_command(args) if args.command == "index" else serve_command(args)


if __name__ == "__main__":
    from errors import run_script
    run_script(main, "search_app.py")
