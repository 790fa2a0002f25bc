"""search_app.py: a folder of photos indexed (and indexed again: only what changed), searched by
text and by image with a model that learned the generated shapes, the JSON API and its safety
(paths outside the index, upload size, decompression bombs, any query), faiss against exact
search, the demo, and the page driven in a real browser.

The photos are the generated zero-shot images: one shape per photo, in a folder named by what
it shows ('red circle/000.png', or '红色圆形/000.png' in Chinese), so a result's folder says
whether it is right. Two tiny models learn the shapes for a few dozen steps, one per language.
"""
import hashlib
import io
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sample_data
import search_app
import train
from errors import DataError, MissingInputError

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = Path(tempfile.gettempdir())
# A file name that is also HTML, with characters that must be escaped in a URL.
TRICKY_NAME = "<img src=x onerror=alert(1)> & 100%?#.png"


def trained_model(folder, language, steps):
    """A tiny CLIP trained for a few dozen steps on generated shapes: enough to tell colours
    and, most of the time, shapes apart. Returns its checkpoint."""
    train_set = sample_data.create_sample_dataset(folder / "train", 480, seed=0, language=language)
    val_set = sample_data.create_sample_dataset(folder / "val", 20, seed=2, language=language)
    context = ["--context_length", "64"] if language == "zh" else []   # ~3 tokens per character
    train.main(["--data_dir", train_set["index"], "--val_data", val_set["index"], "--run_name", "tiny",
                "--checkpoint_dir", str(folder / "ckpt"), "--log_dir", str(folder / "logs"),
                "--results_dir", str(folder / "results"), "--num_workers", "0", "--batch_size", "32",
                "--max_steps", str(steps), "--learning_rate", "2e-3", "--warmup_steps", "5",
                "--eval_every", "1000", "--tensorboard_pairs", "0", "--projector_pairs", "0", *context])
    return folder / "ckpt/tiny/last.pt"


def photo_folder(folder, language):
    """40 photos in 20 folders named by colour and shape (2 each)."""
    generated = sample_data.create_sample_dataset(folder, 100, seed=1, language=language)
    return Path(generated["zeroshot"])


def label(path):
    return path.rsplit("/", 1)[0]


@pytest.fixture(scope="module")
def english(tmp_path_factory):
    folder = tmp_path_factory.mktemp("english")
    checkpoint = trained_model(folder / "model", "en", 40)
    photos = photo_folder(folder / "generated", "en")
    shutil.copy(photos / "red circle/000.png", photos / "red circle" / TRICKY_NAME)
    index = folder / "photos.npz"
    spec = search_app.model_spec(checkpoint=str(checkpoint))
    search_app.build_index(photos, index, spec, num_workers=0)
    return {"checkpoint": checkpoint, "photos": photos, "index": index, "spec": spec}


@pytest.fixture(scope="module")
def service(english):
    return search_app.open_service(english["index"], {}, device="cpu")


@pytest.fixture(scope="module")
def client(service):
    from fastapi.testclient import TestClient
    return TestClient(search_app.create_app(service))


def top_paths(client, query, k):
    response = client.get("/api/search", params={"q": query, "k": k})
    assert response.status_code == 200, response.text
    return [result["path"] for result in response.json()["results"]]


# ----------------------------------------------------------------------------------------------
# Searching

def test_a_text_query_finds_the_photos_of_the_colour_and_shape_it_names(client):
    hits, right_colour = 0, 0
    for colour in sample_data.SAMPLE_COLOURS:
        for shape in sample_data.SAMPLE_SHAPES:
            top = top_paths(client, f"a {colour} {shape}", k=5)
            hits += any(label(path) == f"{colour} {shape}" for path in top)
            right_colour += sum(label(path).startswith(colour) for path in top)
    # 2 photos of each of 20 classes among 41: a random top 5 holds one in 23% of the queries,
    # and a fifth of its photos have the right colour.
    assert hits >= 10, f"the named photo is in the top 5 for only {hits} of 20 queries"
    assert right_colour / 100 >= 0.7


def test_an_uploaded_photo_finds_itself_first(client, english):
    path = "blue star/001.png"
    data = (english["photos"] / path).read_bytes()
    response = client.post("/api/search_image", files={"file": ("mine.png", data, "image/png")},
                           params={"k": 3})
    assert response.status_code == 200, response.text
    first = response.json()["results"][0]
    assert first["path"] == path and first["score"] > 0.99
    assert response.json()["took_ms"] >= 0


def test_a_click_on_a_result_searches_by_its_stored_feature(client):
    results = client.get("/api/search_like", params={"path": "green square/000.png", "k": 4}).json()
    first = results["results"][0]
    assert first == {"path": "green square/000.png", "score": pytest.approx(1.0, abs=2e-3)}
    assert client.get("/api/search_like", params={"path": "no/such.png"}).status_code == 404


def test_the_index_holds_paths_sizes_times_float16_unit_features_and_the_model(english, service):
    index = search_app.load_index(english["index"])
    files = sorted(str(p.relative_to(english["photos"])) for p in english["photos"].rglob("*.png"))
    assert index.paths == files and len(files) == 41
    stats = [(english["photos"] / p).stat() for p in files]
    assert index.sizes.tolist() == [s.st_size for s in stats]
    assert index.mtimes.tolist() == [s.st_mtime_ns for s in stats]
    assert index.features.dtype == np.float16
    assert np.allclose(np.linalg.norm(index.features.astype(np.float64), axis=1), 1, atol=2e-3)
    assert index.model.checkpoint == str(english["checkpoint"])
    assert index.model.sha256 == hashlib.sha256(english["checkpoint"].read_bytes()).hexdigest()
    # float16 storage moves a score by less than 1e-3: compare with float32 features computed anew
    import evaluation
    exact, _, _ = evaluation.encode_image_files(service.setup, [str(english["photos"] / p) for p in files])
    query = exact[7].numpy()
    assert np.abs(index.features.astype(np.float32) @ query - exact.numpy() @ query).max() < 1e-3


def test_indexing_again_encodes_only_new_and_changed_photos_and_drops_deleted_ones(english, tmp_path):
    photos, index_path = tmp_path / "photos", tmp_path / "index.npz"
    shutil.copytree(english["photos"], photos)
    first = search_app.build_index(photos, index_path, english["spec"], num_workers=0)
    assert (first.new, first.encoded, first.images) == (41, 41, 41)
    before = search_app.load_index(index_path)
    again = search_app.build_index(photos, index_path, english["spec"], num_workers=0)
    assert (again.new, again.changed, again.deleted, again.unchanged, again.encoded) == (0, 0, 0, 41, 0)

    (photos / "later").mkdir()
    shutil.copy(photos / "red star/000.png", photos / "later/a.png")
    shutil.copy(photos / "blue circle/000.png", photos / "later/b.png")
    changed = photos / "yellow square/000.png"           # now shows what 'purple star/001' shows
    changed.write_bytes((photos / "purple star/001.png").read_bytes())
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    for gone in ("green circle/000.png", "green circle/001.png", "blue square/001.png"):
        (photos / gone).unlink()
    report = search_app.build_index(photos, index_path, english["spec"], num_workers=0)
    assert (report.new, report.changed, report.deleted, report.unchanged) == (2, 1, 3, 37)
    assert report.encoded == 3 and report.images == 40

    after = search_app.load_index(index_path)
    row_before, row_after = before.paths.index, after.paths.index
    assert "green circle/000.png" not in after.paths and "later/a.png" in after.paths
    for path in ("red circle/000.png", "blue star/001.png"):     # unchanged: the very same bits
        assert np.array_equal(after.features[row_after(path)], before.features[row_before(path)])
    # the changed photo was encoded again: its feature is now that of the photo it copies
    new_feature = after.features[row_after("yellow square/000.png")].astype(np.float32)
    assert new_feature @ before.features[row_before("purple star/001.png")].astype(np.float32) > 0.99
    assert new_feature @ before.features[row_before("yellow square/000.png")].astype(np.float32) < 0.99


def test_an_interrupted_index_run_keeps_its_work_and_the_next_run_goes_on(english, tmp_path, monkeypatch):
    photos, index_path = tmp_path / "photos", tmp_path / "index.npz"
    shutil.copytree(english["photos"], photos)
    monkeypatch.setattr(search_app, "SAVE_EVERY", 16)
    encode, calls = search_app.encode_photos, []

    def interrupted_at_the_third_part(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return encode(*args, **kwargs)
    monkeypatch.setattr(search_app, "encode_photos", interrupted_at_the_third_part)
    with pytest.raises(KeyboardInterrupt):
        search_app.build_index(photos, index_path, english["spec"], num_workers=0)
    assert len(search_app.load_index(index_path)) == 32          # two parts of 16 were saved
    report = search_app.build_index(photos, index_path, english["spec"], num_workers=0)
    assert (report.unchanged, report.new, report.images) == (32, 9, 41)


def test_the_index_command_skips_and_lists_unreadable_files(english, tmp_path):
    photos = tmp_path / "photos"
    (photos / "album").mkdir(parents=True)
    shutil.copy(english["photos"] / "red circle/000.png", photos / "album/good.png")
    shutil.copy(english["photos"] / "blue star/000.png", photos / "good.PNG")
    (photos / "album/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    (photos / "empty.png").write_bytes(b"")
    (photos / "notes.txt").write_text("not an image")                     # ignored: not an image
    (photos / ".hidden.png").write_bytes((photos / "good.PNG").read_bytes())  # ignored: hidden
    index_path = tmp_path / "index.npz"
    result = subprocess.run([sys.executable, str(ROOT / "search_app.py"), "index", "--images",
                             str(photos), "--checkpoint", str(english["checkpoint"]), "--index",
                             str(index_path), "--num_workers", "1"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "indexed 2 images" in result.stdout and "2 new" in result.stdout
    assert "skipped 2 unreadable files" in result.stdout
    assert "broken.jpg" in result.stdout and "empty.png" in result.stdout
    index = search_app.load_index(index_path)
    assert index.paths == ["album/good.png", "good.PNG"]
    assert len(index.unreadable) == 2


def test_a_different_model_encodes_everything_again_and_a_different_folder_is_refused(english, tmp_path):
    photos, index_path = tmp_path / "photos", tmp_path / "index.npz"
    shutil.copytree(english["photos"] / "red circle", photos)
    search_app.build_index(photos, index_path, english["spec"], num_workers=0)
    other = tmp_path / "other.pt"
    checkpoint = train_checkpoint_with_other_weights(english["checkpoint"], other)
    report = search_app.build_index(photos, index_path, search_app.model_spec(checkpoint=str(checkpoint)),
                                    num_workers=0)
    assert report.model_changed and report.encoded == 3 and report.unchanged == 0
    with pytest.raises(DataError, match="holds the photos of .*another --index"):
        search_app.build_index(english["photos"], index_path, english["spec"], num_workers=0)


def train_checkpoint_with_other_weights(checkpoint, path):
    """A copy of a checkpoint whose weights differ a little (another model, to the index)."""
    import torch
    saved = torch.load(checkpoint, weights_only=True)
    saved["state_dict"]["logit_scale"] = saved["state_dict"]["logit_scale"] + 1
    torch.save(saved, path)
    return path


def test_serve_rebuilds_the_index_model_and_refuses_other_weights(english, tmp_path):
    moved = tmp_path / "moved.pt"
    shutil.copy(english["checkpoint"], moved)
    index_path = tmp_path / "index.npz"
    shutil.copy(english["index"], index_path)
    service = search_app.open_service(index_path, {"checkpoint": str(moved)})   # same bytes: fine
    assert service.index.model.describe() == f"checkpoint {english['checkpoint']}"
    train_checkpoint_with_other_weights(english["checkpoint"], moved)
    with pytest.raises(DataError, match="not those index .* was built with"):
        search_app.open_service(index_path, {"checkpoint": str(moved)})
    with pytest.raises(MissingInputError, match="not found"):
        search_app.open_service(tmp_path / "missing.npz", {})


# ----------------------------------------------------------------------------------------------
# Safety

def test_thumbnails_are_served_for_indexed_photos_only(client, service, english):
    original = english["photos"] / "red circle/001.png"
    before = (original.read_bytes(), original.stat().st_mtime_ns)
    response = client.get("/api/thumbnail", params={"path": "red circle/001.png"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(response.content)).size == (64, 64)      # never enlarged
    assert (original.read_bytes(), original.stat().st_mtime_ns) == before
    cached = list(service.thumbnails.glob("*.jpg"))
    assert len(cached) >= 1
    client.get("/api/thumbnail", params={"path": "red circle/001.png"})
    assert sorted(service.thumbnails.glob("*.jpg")) == sorted(cached)       # made once
    (english["photos"] / "secret.txt").write_text("not for the web")
    for path in ["../photos.npz", "../../../../../../etc/passwd", "/etc/passwd", str(original),
                 "red circle/../red circle/001.png", "./red circle/001.png", "secret.txt",
                 "red circle\\001.png", "", "%2e%2e/photos.npz"]:
        response = client.get("/api/thumbnail", params={"path": path})
        assert response.status_code == 404, path
        assert "not in the index" in response.json()["detail"]
    assert client.get("/api/thumbnail").status_code == 422


def test_uploads_above_the_limit_are_refused_with_413(service, english):
    from fastapi.testclient import TestClient
    small = TestClient(search_app.create_app(replace(service, max_upload_bytes=20_000)))
    photo = (english["photos"] / "red circle/000.png").read_bytes()
    assert len(photo) < 10_000
    assert small.post("/api/search_image", files={"file": ("a.png", photo)}).status_code == 200
    response = small.post("/api/search_image", files={"file": ("big.png", photo + bytes(30_000))})
    assert response.status_code == 413


def png_claiming(width, height):
    """A tiny PNG file whose header claims width x height pixels (a decompression bomb's header)."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data.index(b"IHDR")                 # chunk type, 13 bytes of data, then its CRC-32
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    return bytes(data)


@pytest.mark.parametrize("width, height, message", [
    (100_000, 100_000, "exceeds limit"),              # Pillow's own bomb check, at open
    (9_000, 8_000, "72 megapixels); the limit is 50")])  # below Pillow's limit, above ours
def test_a_decompression_bomb_gets_a_clear_400_at_once(client, width, height, message):
    started = time.perf_counter()
    response = client.post("/api/search_image", files={"file": ("bomb.png", png_claiming(width, height))})
    assert response.status_code == 400 and message in response.json()["detail"]
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize("data, message", [(b"", "empty"), (b"GIF89a but not really", "not an image"),
                                           (b"\x89PNG\r\n\x1a\n" + bytes(50), "not an image")])
def test_an_upload_that_is_not_an_image_gets_400(client, data, message):
    response = client.post("/api/search_image", files={"file": ("x.png", data)})
    assert response.status_code == 400 and message in response.json()["detail"]


def test_queries_of_any_length_and_content_are_answered_at_once(client, service):
    started = time.perf_counter()
    for query in ["x" * 10_000_000, "red " * 2_500_000]:     # cut before the tokenizer sees them
        assert len(service.search_text(query, 5)) == 5
    assert time.perf_counter() - started < 5
    for query in ["x" * 50_000, "red " * 12_000, "红色圆形" * 1_500, "\x00\x01 <script>alert(1)</script>",
                  "🙂🔴⚫️" * 100, "a red circle\n\ton the left", "%00%ff", "'; DROP TABLE photos; --"]:
        started = time.perf_counter()
        response = client.get("/api/search", params={"q": query, "k": 5})
        assert response.status_code == 200, (query[:40], response.text)
        assert len(response.json()["results"]) == 5
        assert time.perf_counter() - started < 5, query[:40]
    long_query = "a red circle " + "and more " * 500
    assert service.search_text(long_query, 5) == service.search_text(long_query[:search_app.MAX_QUERY_CHARS], 5)
    for blank in ["", "   ", "\n\t"]:
        response = client.get("/api/search", params={"q": blank})
        assert response.status_code == 400 and "empty query" in response.json()["detail"]
    assert client.get("/api/search", params={"q": "red", "k": 0}).status_code == 422
    assert client.get("/api/search", params={"q": "red", "k": 10**6}).status_code == 422
    assert len(client.get("/api/search", params={"q": "red", "k": 500}).json()["results"]) == 41


def test_the_server_listens_on_this_machine_only_by_default():
    args = search_app.build_parser().parse_args(["serve", "--index", "photos.npz"])
    assert args.host == "127.0.0.1"


# ----------------------------------------------------------------------------------------------
# Exact search, faiss, command line, demo

def assert_same_ranking(a, b, tolerance=1e-5):
    """Two (rows, scores) answers agree: the same scores, and the same rows wherever their
    scores are further apart than float32 rounding (both score the same float16 numbers)."""
    (rows_a, scores_a), (rows_b, scores_b) = a, b
    assert np.allclose(scores_a, scores_b, atol=tolerance)
    separated = np.diff(scores_a, prepend=np.inf, append=-np.inf)
    clear = (-separated[:-1] > tolerance) & (-separated[1:] > tolerance)
    assert np.array_equal(rows_a[clear], rows_b[clear])


def test_faiss_gives_the_same_results_as_exact_search():
    pytest.importorskip("faiss", reason="faiss is not installed (optional: pip install faiss-cpu)")
    rng = np.random.default_rng(0)
    features = rng.standard_normal((3000, 64)).astype(np.float32)
    features = (features / np.linalg.norm(features, axis=1, keepdims=True)).astype(np.float16)
    exact = search_app.Searcher(features, "exact")
    # nprobe covering every cluster turns the approximate index into an exhaustive one
    approximate = search_app.Searcher(features, "faiss", nprobe=10**6)
    assert (exact.method, approximate.method) == ("exact", "faiss")
    for query in rng.standard_normal((20, 64)).astype(np.float32):
        query /= np.linalg.norm(query)
        assert_same_ranking(exact.search(query, 10), approximate.search(query, 10))


def test_exact_search_returns_the_best_rows_best_first():
    r2, r3 = 1 / np.sqrt(2), 1 / np.sqrt(3)
    features = np.array([[0, 1, 0], [r2, r2, 0], [1, 0, 0], [r3, r3, r3], [-1, 0, 0]], np.float16)
    searcher = search_app.Searcher(features)
    rows, scores = searcher.search(np.array([1, 0, 0], np.float32), 3)
    # scores against e0 by hand: 0, 0.707, 1, 0.577, -1
    assert rows.tolist() == [2, 1, 3]
    assert scores == pytest.approx([1, r2, r3], abs=1e-3)
    assert len(searcher.search(np.array([1, 0, 0], np.float32), 99)[0]) == 5


def test_exact_search_orders_near_duplicates_that_float16_scores_would_tie():
    rng = np.random.default_rng(1)
    base = rng.standard_normal(64)
    rows = base + 0.006 * rng.standard_normal((6, 64))        # cosines of 0.9999 or so
    features = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float16)
    query = features[3].astype(np.float32)
    truth = features.astype(np.float64) @ query
    assert len(set(truth.astype(np.float16))) < 6            # float16 scores would tie
    found, scores = search_app.Searcher(features).search(query, 6)
    assert found.tolist() == np.argsort(-truth).tolist()
    assert scores == pytest.approx(truth[found], abs=1e-6)


def test_command_line_mistakes_are_one_line_errors(english, tmp_path, capsys):
    from errors import run_script

    def run(*argv):
        with pytest.raises(SystemExit) as stop:
            run_script(lambda: search_app.main(list(argv)), "search_app.py")
        return str(stop.value.code) + capsys.readouterr().err
    assert "no such folder" in run("index", "--images", str(tmp_path / "nope"), "--checkpoint",
                                   str(english["checkpoint"]), "--index", str(tmp_path / "i.npz"))
    assert "--checkpoint" in run("index", "--images", str(tmp_path), "--checkpoint", str(tmp_path / "x.pt"),
                                 "--index", str(tmp_path / "i.npz"))
    assert "index needs a model" in run("index", "--images", str(tmp_path), "--index", "i.npz")
    assert "needs --pretrained" in run("index", "--images", str(tmp_path), "--model_name", "tiny-vit-64",
                                       "--index", str(tmp_path / "i.npz"))
    assert "not found; build it with" in run("serve", "--index", str(tmp_path / "none.npz"))
    assert "not both" in run("serve", "--index", "a.npz", "--checkpoint", "a.pt", "--model_name", "b")


def test_serve_demo_indexes_the_validation_images_of_the_demo_run(english, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingInputError, match="run `python demo.py` first"):
        search_app.demo_index("en", "cpu", 64, 0)
    (tmp_path / "model-checkpoint/demo-en").mkdir(parents=True)
    shutil.copy(english["checkpoint"], tmp_path / "model-checkpoint/demo-en/best.pt")
    index_path = search_app.demo_index("en", "cpu", 64, 0)
    assert index_path == Path("results/demo-en/search_index.npz")
    index = search_app.load_index(index_path)
    # demo.py's 200 validation images and their 80 zero-shot images, in data/demo-en-2000/val
    assert len(index) == 280 and index.root == str(tmp_path / "data/demo-en-2000/val")


# ----------------------------------------------------------------------------------------------
# The page, in a real browser

def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`search_app.py serve` in a subprocess on a free port of 127.0.0.1."""

    def __init__(self, index, *flags):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "search_app.py"), "serve", "--index", str(index), "--port",
             str(self.port), *flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)

    def wait(self, timeout=180):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the server stopped: {self.process.stdout.read()[-3000:]}")
            try:
                return self.get("/api/info")
            except OSError:
                time.sleep(0.2)
        pytest.fail("the server did not answer in time")

    def get(self, path, **params):
        import json
        url = self.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.load(response)

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="module")
def chinese(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chinese")
    checkpoint = trained_model(folder / "model", "zh", 60)
    photos = photo_folder(folder / "generated", "zh")
    index = folder / "photos.npz"
    search_app.build_index(photos, index, search_app.model_spec(checkpoint=str(checkpoint)), num_workers=0)
    return {"photos": photos, "index": index}


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM}: setup.sh installs Debian's chromium where it can "
                    f"(sudo apt-get install chromium); the API tests above run without it")
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def servers(browser, english, chinese):
    """Both servers start at once (each takes seconds to import torch and load its model)."""
    started = {"en": Server(english["index"], "--max_upload_mb", "1"), "zh": Server(chinese["index"])}
    try:
        for server in started.values():
            server.wait()
        yield started
    finally:
        for server in started.values():
            server.stop()


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(url)
    page.dialogs = dialogs
    return page


def shown_paths(page):
    return [card.get_attribute("data-path") for card in page.query_selector_all("#results .card")]


def type_query(page, text):
    page.fill("#query", text)
    page.press("#query", "Enter")
    page.wait_for_function("document.querySelector('#status').textContent.includes('results')")


def test_in_the_browser_a_typed_query_shows_the_photos_it_names(browser, servers):
    page = open_page(browser, servers["en"].url)
    type_query(page, "a red circle")
    paths = shown_paths(page)
    expected = [r["path"] for r in servers["en"].get("/api/search", q="a red circle", k=24)["results"]]
    assert paths == expected and len(paths) == 24
    # colour is what a few dozen steps teach best; shape comes second (the API test above counts)
    assert sum(label(path).startswith("red") for path in paths[:5]) >= 4
    assert any(label(path) == "red circle" for path in paths[:8])
    page.wait_for_function("[...document.querySelectorAll('#results img')].slice(0, 6)"
                           ".every(img => img.complete && img.naturalWidth > 0)")
    assert "41 photos" in page.text_content("#info")
    page.screenshot(path=str(SCREENSHOTS / "search_app_en.png"))
    page.close()


def test_in_the_browser_an_uploaded_photo_comes_first_and_a_click_searches_by_a_result(browser, servers, english):
    page = open_page(browser, servers["en"].url)
    page.set_input_files("#file", str(english["photos"] / "yellow triangle/000.png"))
    page.wait_for_function("document.querySelector('#status').textContent.includes('results')")
    assert shown_paths(page)[0] == "yellow triangle/000.png"
    assert "000.png" in page.text_content("#status")
    third = shown_paths(page)[2]
    page.click("#results .card:nth-child(3)")
    page.wait_for_function("location.search.includes('like=')")
    page.wait_for_function("document.querySelector('#status').textContent.includes('results')")
    assert third in page.text_content("#status") and third in shown_paths(page)[:2]
    too_big = {"name": "huge.png", "mimeType": "image/png", "buffer": bytes(3 * 2**19)}
    page.set_input_files("#file", files=[too_big])                     # refused before sending
    page.wait_for_function("document.querySelector('#status .error') !== null")
    assert "is 1.5 MiB; this server accepts images up to 1.0 MiB" in page.text_content("#status .error")
    page.close()


def test_in_the_browser_a_file_name_is_text_never_html(browser, servers):
    tricky = f"red circle/{TRICKY_NAME}"
    page = open_page(browser, f"{servers['en'].url}/?like={urllib.parse.quote(tricky)}")
    page.wait_for_function("document.querySelector('#status').textContent.includes('results')")
    card = next(c for c in page.query_selector_all("#results .card") if c.get_attribute("data-path") == tricky)
    assert card.query_selector(".name").text_content() == TRICKY_NAME
    assert card.query_selector("img").evaluate("img => img.complete && img.naturalWidth > 0")
    assert page.dialogs == [] and page.query_selector("img[src='x']") is None
    page.close()


def test_over_http_a_query_longer_than_any_url_limit_is_answered_or_refused_at_once(servers):
    for length, statuses in [(100_000, {200}), (1_000_000, {200, 400, 414})]:
        url = f"{servers['en'].url}/api/search?k=3&q={'x' * length}"
        started = time.perf_counter()
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                status = response.status
        except urllib.error.HTTPError as error:
            status = error.code
        except ConnectionError:       # the server may close the connection after refusing
            status = 400
        assert status in statuses and time.perf_counter() - started < 5, (length, status)


def test_in_the_browser_a_chinese_query_finds_photos_with_a_chinese_trained_model(browser, servers):
    page = open_page(browser, servers["zh"].url)
    type_query(page, "一个红色圆形")
    paths = shown_paths(page)
    expected = [r["path"] for r in servers["zh"].get("/api/search", q="一个红色圆形", k=24)["results"]]
    assert paths == expected and len(paths) == 24
    assert sum(label(path).startswith("红色") for path in paths[:5]) >= 4
    assert any(label(path) == "红色圆形" for path in paths[:8])
    assert "一个红色圆形" in page.text_content("#status")
    page.screenshot(path=str(SCREENSHOTS / "search_app_zh.png"))
    page.close()
