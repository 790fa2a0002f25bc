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
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample_data
import search_app
import train
from errors import DataError, MissingInputError, run_script

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


def api_client(service, **app_options):
    """A client of the app, its requests addressed to 127.0.0.1:8000 as a browser's would be."""
    from fastapi.testclient import TestClient
    return TestClient(search_app.create_app(service, **app_options), base_url="http://127.0.0.1:8000")


@pytest.fixture(scope="module")
def client(service):
    return api_client(service)


def top_paths(client, query, k):
    response = client.get("/api/search", params={"q": query, "k": k})
    assert response.status_code == 200, response.text
    return [result["path"] for result in response.json()["results"]]


# ----------------------------------------------------------------------------------------------
# Searching

@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_the_index_command_skips_and_lists_unreadable_files(english, tmp_path):
    photos = tmp_path / "photos"
    (photos / "album").mkdir(parents=True)
    shutil.copy(english["photos"] / "red circle/000.png", photos / "album/good.png")
    shutil.copy(english["photos"] / "blue star/000.png", photos / "good.PNG")
    (photos / "album/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    (photos / "empty.png").write_bytes(b"")
    (photos / "notes.txt").write_text("not an image")                     # ignored: not an image
    (photos / ".hidden.png").write_bytes((photos / "good.PNG").read_bytes())  # ignored: hidden
    os.mkfifo(photos / "album/pipe.png")                  # would block the reader for good
    (photos / "elsewhere.png").symlink_to(english["photos"] / "blue star/000.png")  # not served
    (photos / "album/again.png").symlink_to("../good.PNG")  # a link inside the folder: indexed
    index_path = tmp_path / "index.npz"
    result = subprocess.run([sys.executable, str(ROOT / "search_app.py"), "index", "--images",
                             str(photos), "--checkpoint", str(english["checkpoint"]), "--index",
                             str(index_path), "--num_workers", "1"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "indexed 3 images" in result.stdout and "3 new" in result.stdout
    assert "skipped 4 unreadable files" in result.stdout
    assert "broken.jpg" in result.stdout and "empty.png" in result.stdout
    assert "pipe.png' is not a regular file" in result.stdout
    assert "elsewhere.png' is a link to a file outside the folder" in result.stdout
    index = search_app.load_index(index_path)
    assert index.paths == ["album/again.png", "album/good.png", "good.PNG"]
    assert len(index.unreadable) == 4


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


# ----------------------------------------------------------------------------------------------
# Captions of a captioner's results (untrained models: the plumbing, not the words)

@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    """Indexes of three photos by an untrained CoCa and by an untrained CLIP."""
    import clip_model
    folder = tmp_path_factory.mktemp("captioner")
    photos = Path(sample_data.create_sample_dataset(folder / "generated", 3, seed=1)["index"]).parent / "images"
    made = {"photos": photos}
    for name in ("tiny-coca-64", "tiny-vit-64"):
        torch.manual_seed(0)
        clip_model.save_checkpoint(folder / f"{name}.pt", clip_model.build_model(name))
        made[name] = folder / f"{name}.npz"
        search_app.build_index(photos, made[name], search_app.model_spec(checkpoint=str(folder / f"{name}.pt")),
                               num_workers=0)
    return made


def test_a_captioners_result_gets_the_caption_the_model_writes_once_then_from_the_cache(captioner, monkeypatch):
    import clip_model
    short = clip_model.CaptionSettings(max_length=5, num_beams=2)
    service = search_app.open_service(captioner["tiny-coca-64"], {}, device="cpu", caption_settings=short)
    client = api_client(service)
    assert client.get("/api/info").json()["captions"] is True
    path = service.index.paths[1]
    answer = client.get("/api/caption", params={"path": path})
    assert answer.status_code == 200, answer.text
    photo = search_app.decode_photo((captioner["photos"] / path).read_bytes(), path, service.image_side, "caption")
    written = clip_model.generate_captions(service.setup, None, service.transform(photo)[None], short)[0]
    assert answer.json() == {"path": path, "caption": written}

    def no_model(*args, **kwargs):
        raise AssertionError("the cached caption is written again")
    monkeypatch.setattr(clip_model, "generate_captions", no_model)
    assert client.get("/api/caption", params={"path": path}).json()["caption"] == written
    missing = client.get("/api/caption", params={"path": "../photos.npz"})
    assert missing.status_code == 404 and "not in the index" in missing.json()["detail"]


def test_a_clip_writes_no_captions_and_says_so(captioner):
    client = api_client(search_app.open_service(captioner["tiny-vit-64"], {}, device="cpu"))
    assert client.get("/api/info").json()["captions"] is False
    refused = client.get("/api/caption", params={"path": "00000.png"})
    assert refused.status_code == 400 and "writes no captions; a captioner (CoCa) does" in refused.json()["detail"]


def test_uploads_above_the_limit_are_refused_with_413(service, english):
    small = api_client(replace(service, max_upload_bytes=20_000))
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


def test_indexing_shards_says_to_unpack_their_images(tmp_path):
    import clip_model
    import shards
    data = sample_data.create_sample_dataset(tmp_path / "data", num_samples=4, seed=0)["index"]
    shards.convert_to_webdataset(data, tmp_path / "shards", shard_size=2)
    clip_model.save_checkpoint(tmp_path / "random.pt", clip_model.build_model("tiny-vit-64"))
    for images in (tmp_path / "shards", tmp_path / "shards/00000.tar", tmp_path / "shards/{00000..00001}.tar"):
        with pytest.raises(DataError, match=r"WebDataset shards; .* unpack the shards' images .* tar -xf"):
            search_app.main(["index", "--images", str(images), "--checkpoint", str(tmp_path / "random.pt"),
                             "--index", str(tmp_path / "photos.npz")])


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
    """`search_app.py ARGUMENTS --port PORT` (ARGUMENTS: serve ...) in a subprocess, on a free
    port of 127.0.0.1."""

    def __init__(self, arguments, cwd=ROOT):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "search_app.py"), *arguments, "--port", str(self.port)],
            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

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
    started = {"en": Server(["serve", "--index", str(english["index"]), "--max_upload_mb", "1"]),
               "zh": Server(["serve", "--index", str(chinese["index"])])}
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_in_the_browser_a_captioners_results_show_the_captions_it_writes(browser, captioner):
    server = Server(["serve", "--index", str(captioner["tiny-coca-64"]), "--caption_max_length", "5",
                     "--caption_num_beams", "2"])
    try:
        server.wait()
        page = open_page(browser, f"{server.url}/?q={urllib.parse.quote('a red circle')}")   # searched at once
        page.wait_for_function("(nodes => nodes.length === 3 && [...nodes].every(node => node.textContent))"
                               "(document.querySelectorAll('#results .card .caption'))")
        for card in page.query_selector_all("#results .card"):
            written = server.get("/api/caption?path=" + urllib.parse.quote(card.get_attribute("data-path")))["caption"]
            assert card.query_selector(".caption").text_content() == f"“{written}”"
        assert "captions written by the model" in page.text_content("#info")
        page.screenshot(path=str(SCREENSHOTS / "search_app_captions.png"))
        page.close()
    finally:
        server.stop()


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


# ----------------------------------------------------------------------------------------------
# Red-team report, issue 36: memory, thumbnails, hosts, hostile indexes, concurrent indexing

def large_png(side=7000):
    """A PNG of side x side pixels (49 megapixels at 7000) that compresses to about 250 KB:
    small to send, 147 MB once decoded."""
    from PIL import ImageDraw
    image = Image.new("RGB", (side, side), (40, 90, 200))
    draw = ImageDraw.Draw(image)
    for k in range(20):
        draw.ellipse((300 * k, 200 * k, 300 * k + 1500, 200 * k + 1500), fill=(255, 12 * k, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def process_memory_mib(pid, field):
    """VmRSS (resident now) or VmHWM (peak resident) of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak_memory(pid):
    """Linux: writing 5 to clear_refs sets a process's peak resident memory to what it holds now."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@pytest.mark.slow
def test_many_large_uploads_at_once_raise_the_servers_memory_by_a_bounded_amount(english):
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("measures the server's peak memory through Linux's /proc")
    import httpx
    data, uploads = large_png(), 8
    server = Server(["serve", "--index", str(english["index"])])
    try:
        server.wait()
        small = (english["photos"] / "red circle/000.png").read_bytes()
        httpx.post(server.url + "/api/search_image", files={"file": ("a.png", small)}, timeout=60)
        pid = server.process.pid
        reset_peak_memory(pid)
        before = process_memory_mib(pid, "VmRSS")

        def upload(_):
            return httpx.post(server.url + "/api/search_image", files={"file": ("big.png", data)},
                              params={"k": 3}, timeout=120)
        with ThreadPoolExecutor(uploads) as pool:
            responses = list(pool.map(upload, range(uploads)))
        growth = process_memory_mib(pid, "VmHWM") - before
    finally:
        server.stop()
    assert [r.status_code for r in responses] == [200] * uploads, responses[0].text
    print(f"{uploads} uploads of 7000 x 7000 PNGs at once: peak memory +{growth:.0f} MiB")
    # Each decode holds 147 MB of pixels, DECODE_SLOTS of them at a time however many uploads wait.
    # Before the limit, the eight decoded at once took 4.4 GiB; with a semaphore instead of decode
    # threads, 1.5 GiB (memory freed by one request thread is kept for that thread).
    pixels_mib = 7000 * 7000 * 3 / 2**20                # 140 MiB of RGB per image being decoded
    assert growth < 1.15 * pixels_mib * search_app.DECODE_SLOTS + 250, f"peak memory grew by {growth:.0f} MiB"


def image_in_mode(mode, fmt):
    """A 1200 x 900 image with gradients and a disc, in a Pillow mode, saved as fmt; a JPEG says
    in its EXIF that it is to be turned (orientation 6), as a phone photo held upright does."""
    from PIL import ImageDraw
    x, y = np.meshgrid(np.linspace(0, 1, 1200), np.linspace(0, 1, 900))
    pixels = np.stack([255 * x, 255 * y, 255 * (1 - x) * y], axis=-1).astype(np.uint8)
    image = Image.fromarray(pixels)
    ImageDraw.Draw(image).ellipse((300, 200, 800, 700), fill=(250, 240, 20))
    options = {}
    if mode == "P":
        image, options["transparency"] = image.quantize(64), 0   # a palette with a colour key
    elif mode == "I;16":
        image = Image.fromarray((np.asarray(image.convert("L"), np.uint16) * 257))
    elif mode in ("RGBA", "LA"):
        image = image.convert(mode)
        image.putalpha(Image.fromarray((255 * x).astype(np.uint8)))
    else:
        image = image.convert(mode)
    if fmt == "JPEG":
        exif = Image.Exif()
        exif[0x0112] = 6
        options["exif"] = exif.tobytes()
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("mode, fmt", [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG"),
                                       ("P", "PNG"), ("RGBA", "PNG"), ("LA", "PNG"), ("I;16", "PNG"),
                                       ("1", "PNG"), ("RGB", "WEBP")])
def test_an_image_decoded_small_is_the_full_decode_made_small(mode, fmt):
    import data_loader
    data = image_in_mode(mode, fmt)
    full = data_loader.decode_image(data, "x")
    small = data_loader.decode_image(data, "x", min_side=64)
    assert full.size == ((900, 1200) if fmt == "JPEG" else (1200, 900))     # turned by its EXIF
    assert small.mode == "RGB" and 128 <= min(small.size) < 256           # >= 2 x 64, not more
    assert small.size[0] / small.size[1] == pytest.approx(full.size[0] / full.size[1], rel=0.02)
    # compared at a quarter of the small size: box edges and dithered 1-bit pixels fall apart
    # differently, but a wrong colour (a palette index averaged) shows at any scale
    coarse = (small.size[0] // 4, small.size[1] // 4)
    expected = np.asarray(full.resize(coarse, Image.Resampling.BOX), np.float32)
    assert np.abs(np.asarray(small.resize(coarse, Image.Resampling.BOX), np.float32) - expected).mean() < 3


def test_an_image_that_would_decode_to_more_pixels_than_the_limit_is_refused_before_decoding():
    import data_loader
    big_jpeg = io.BytesIO()
    Image.new("RGB", (8000, 8000), (200, 30, 30)).save(big_jpeg, format="JPEG")
    with pytest.raises(DataError, match="is 8000 x 8000 pixels .64 megapixels.; the limit is 50"):
        data_loader.decode_image(big_jpeg.getvalue(), "big.jpg", max_pixels=50_000_000)
    # decoded at 1/8 scale by the JPEG decoder itself, it is 1 megapixel: accepted (1000 x 1000,
    # then boxes of 7 x 7 keep a side of 128 or more)
    assert data_loader.decode_image(big_jpeg.getvalue(), "big.jpg", 64, 50_000_000).size == (143, 143)


def answer_within(seconds, request):
    """request() run in a thread; fails the test if it gives no answer in time (an open() that
    blocks for good would otherwise hang the whole test run)."""
    answers = []
    thread = threading.Thread(target=lambda: answers.append(request()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert answers, f"no answer in {seconds} s"
    return answers[0]


def test_a_thumbnail_is_made_only_of_a_regular_file_inside_the_indexed_folder(service, english, tmp_path,
                                                                             monkeypatch):
    photos, outside = tmp_path / "photos", tmp_path / "outside.png"
    shutil.copytree(english["photos"], photos)
    shutil.copy(photos / "blue star/000.png", outside)
    # the files at indexed paths, replaced after indexing
    (photos / "red circle/000.png").unlink()
    os.mkfifo(photos / "red circle/000.png")                      # an open() would wait for a writer
    (photos / "red circle/001.png").unlink()
    (photos / "red circle/001.png").symlink_to("/dev/zero")        # a read would never end
    (photos / "blue star/000.png").unlink()
    (photos / "blue star/000.png").symlink_to(outside)             # a file outside the folder
    (photos / "blue star/001.png").unlink()
    (photos / "blue star/001.png").mkdir()
    (photos / "green star/000.png").unlink()
    (photos / "green star/000.png").symlink_to("../blue circle/000.png")   # inside: fine
    hostile = [path if path != "yellow star/000.png" else "../outside.png" for path in service.index.paths]
    index = replace(service.index, root=str(photos), paths=hostile)
    client = api_client(replace(service, index=index, thumbnails=tmp_path / "thumbnails"))

    def thumbnail(path):
        return answer_within(10, lambda: client.get("/api/thumbnail", params={"path": path}))
    try:
        for _ in range(50):            # each would hold one of the server's threads for good
            response = thumbnail("red circle/000.png")
            assert response.status_code == 410 and "no longer a regular file" in response.json()["detail"]
        assert answer_within(10, lambda: client.get("/api/info")).status_code == 200
        for path, status, message in [("red circle/001.png", 403, "leads outside the indexed folder"),
                                      ("blue star/000.png", 403, "leads outside the indexed folder"),
                                      ("../outside.png", 403, "leads outside the indexed folder"),
                                      ("blue star/001.png", 410, "no longer a regular file")]:
            response = thumbnail(path)
            assert response.status_code == status and message in response.json()["detail"], path
            assert str(tmp_path) not in response.text        # the page never sees absolute paths
        assert thumbnail("green star/000.png").status_code == 200
        monkeypatch.setattr(search_app, "MAX_PHOTO_BYTES", 100)
        assert (photos / "green circle/000.png").stat().st_size > 100
        response = thumbnail("green circle/000.png")
        assert response.status_code == 403 and "larger than 100 bytes" in response.json()["detail"]
    finally:   # lets an open() that blocked on the FIFO go on, so that its thread ends
        try:
            os.close(os.open(photos / "red circle/000.png", os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass                 # nobody was waiting on it


def test_requests_addressed_to_another_host_are_refused(service):
    client = api_client(service, hosts=search_app.allowed_hosts("127.0.0.1"))
    for host in ["127.0.0.1:8000", "localhost:8000", "[::1]:8000", "LOCALHOST", "127.0.0.1"]:
        assert client.get("/api/info", headers={"host": host}).status_code == 200, host
    # DNS rebinding: a page of attacker.example, its name resolved to 127.0.0.1, calls the API
    for host in ["attacker.example:8000", "127.0.0.1.attacker.example", "www.localhost", ""]:
        response = client.get("/api/search", params={"q": "red"}, headers={"host": host})
        assert response.status_code == 400 and "Invalid host header" in response.text, host


def test_the_server_answers_the_names_of_the_address_it_listens_on_and_those_it_is_given():
    hosts = search_app.allowed_hosts
    assert sorted(hosts("127.0.0.1")) == ["127.0.0.1", "[::1]", "localhost"]
    assert sorted(hosts("localhost")) == ["127.0.0.1", "[::1]", "localhost"]
    assert hosts("192.168.1.5") == ["192.168.1.5"]
    assert hosts("fe80::1") == ["[fe80::1]"]
    assert hosts("192.168.1.5", ["Photos.lan", "10.0.0.2"]) == ["192.168.1.5", "photos.lan", "10.0.0.2"]
    assert socket.gethostname().lower() in hosts("0.0.0.0") and "localhost" in hosts("0.0.0.0")
    assert hosts("0.0.0.0", ["*"]) == ["*"]
    args = search_app.build_parser().parse_args(["serve", "--index", "i.npz", "--allowed_hosts", "a.lan", "b"])
    assert args.allowed_hosts == ["a.lan", "b"]


def test_info_shows_the_folder_and_model_as_the_user_gave_them_never_absolute(client, english, monkeypatch):
    info = client.get("/api/info").json()
    folder = english["photos"].parent.parent          # <tmp>/generated/zeroshot, <tmp>/model/...
    assert str(folder) not in json.dumps(info) and "/tmp" not in json.dumps(info)
    # started elsewhere: the names alone
    assert info["root"] == "zeroshot" and info["model"] == "checkpoint last.pt"
    monkeypatch.chdir(folder)                          # started where the user typed the paths
    info = client.get("/api/info").json()
    assert info["root"] == "generated/zeroshot" and info["model"] == "checkpoint model/ckpt/tiny/last.pt"


def rewritten_index(source, path, change):
    """A copy of an index file with change(arrays, meta) applied: a corrupt or hostile index."""
    with np.load(source) as saved:
        arrays = dict(saved)
    meta = json.loads(str(arrays["meta"]))
    change(arrays, meta)
    np.savez(path, **{**arrays, "meta": np.array(json.dumps(meta))})
    return path


def set_path(arrays, row, path):
    paths = bytes(arrays["paths"]).decode().split("\0")
    paths[row] = path
    arrays["paths"] = np.frombuffer("\0".join(paths).encode(), np.uint8)


def nan_feature(arrays, meta):
    arrays["features"] = arrays["features"].copy()
    arrays["features"][3, 5] = np.nan


CORRUPTIONS = {
    "no format": (lambda a, m: m.pop("format"), "no format number"),
    "unknown format": (lambda a, m: m.update(format="one"), "format 'one' is not one this code knows"),
    "newer format": (lambda a, m: m.update(format=2), "format 2, newer than this code reads"),
    "no features": (lambda a, m: a.pop("features"), "no features in it"),
    "a size short": (lambda a, m: a.update(sizes=a["sizes"][:-1]), "41 photo paths but 40 sizes"),
    "too few rows": (lambda a, m: a.update(features=a["features"][:10]), "41 photo paths but 41 sizes, "
                                                                         "41 mtimes, 10 features"),
    "NaN feature": (nan_feature, "features hold NaN"),
    "1-D features": (lambda a, m: a.update(features=a["features"][0]), "not float16 [photos, dimension]"),
    "float64 features": (lambda a, m: a.update(features=a["features"].astype(np.float64)), "float64"),
    "no photo": (lambda a, m: a.update(paths=a["paths"][:0], sizes=a["sizes"][:0], mtimes=a["mtimes"][:0],
                                       features=a["features"][:0]), "it holds no photo"),
    "a path out": (lambda a, m: set_path(a, 0, "../outside/x.png"), "'../outside/x.png' is not a plain path"),
    "an absolute path": (lambda a, m: set_path(a, 0, "/etc/passwd"), "'/etc/passwd' is not a plain path"),
    "a path twice": (lambda a, m: set_path(a, 0, "red circle/001.png"), "listed twice"),
    "relative folder": (lambda a, m: m.update(root="photos"), "its folder 'photos' is not an absolute path"),
    "no model": (lambda a, m: m.update(model={"sha256": "00"}), "is not a model description"),
    "pickled paths": (lambda a, m: a.update(paths=np.array([{"x": 1}], dtype=object)), "cannot be read"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_corrupt_or_hostile_index_is_refused_when_opened_naming_the_file_and_the_problem(english, tmp_path,
                                                                                         corruption):
    change, message = CORRUPTIONS[corruption]
    path = rewritten_index(english["index"], tmp_path / "index.npz", change)
    with pytest.raises(DataError) as error:
        search_app.load_index(path)
    assert str(error.value).startswith(f"index {path}: ") and message in str(error.value)
    assert "build it again with: python search_app.py index" in str(error.value)


@pytest.mark.parametrize("content, message", [(b"", "this file is empty"),
                                              (b"hello, not an index", "starts with b'hell'"),
                                              (b"PK\x03\x04 a zip cut short", "cannot be read")])
def test_a_file_that_is_no_index_is_refused_in_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "index.npz"
    path.write_bytes(content)
    with pytest.raises(SystemExit) as stop:
        run_script(lambda: search_app.main(["serve", "--index", str(path)]), "search_app.py")
    assert str(stop.value.code).startswith(f"search_app.py: error: index {path}: ")
    assert message in str(stop.value.code) and "\n" not in str(stop.value.code)


def test_an_index_whose_features_the_model_cannot_match_is_refused(english, tmp_path):
    def shorter_features(arrays, meta):
        arrays["features"] = np.ascontiguousarray(arrays["features"][:, :16])
    path = rewritten_index(english["index"], tmp_path / "index.npz", shorter_features)
    with pytest.raises(DataError, match="its features have 16 dimensions, and those of its model .* 128;"):
        search_app.open_service(path, {})


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-1"])
def test_an_upload_limit_that_is_not_a_positive_number_is_a_one_line_error(capsys, value):
    with pytest.raises(SystemExit) as stop:
        search_app.main(["serve", "--index", "photos.npz", "--max_upload_mb", value])
    assert stop.value.code == 2
    assert f"--max_upload_mb a number of MiB > 0 (it is {float(value)})" in capsys.readouterr().err


def test_a_second_index_run_on_one_index_is_refused_in_one_line_while_the_first_runs(english, tmp_path):
    index_path = tmp_path / "index.npz"
    command = ["index", "--images", str(english["photos"] / "red circle"), "--checkpoint",
               str(english["checkpoint"]), "--index", str(index_path), "--num_workers", "0"]
    with search_app.index_lock(index_path):           # the first run, holding the index
        with pytest.raises(SystemExit) as stop:
            run_script(lambda: search_app.main(command), "search_app.py")
    assert str(stop.value.code) == (f"search_app.py: error: index {index_path} is being written by another "
                                    f"running `search_app.py index`; wait for it to end, or choose another --index")
    assert not index_path.exists()
    assert search_app.main(command).images == 3       # once the first has ended
    assert sorted(p.name for p in tmp_path.iterdir()) == [".index.npz.lock", "index.npz"]


def test_saves_of_one_index_at_once_never_collide(english, tmp_path):
    index, path, failures = search_app.load_index(english["index"]), tmp_path / "index.npz", []

    def save_again_and_again():
        for _ in range(25):
            try:
                search_app.save_index(index, path)
            except Exception as error:     # with one temporary name: FileNotFoundError
                failures.append(error)
    writers = [threading.Thread(target=save_again_and_again) for _ in range(4)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    assert failures == []
    assert search_app.load_index(path).paths == index.paths
    assert [p.name for p in tmp_path.iterdir()] == ["index.npz"]       # no temporary file left


def readme_serve_commands():
    """The arguments of every `search_app.py serve` command in the README."""
    from test_readme import commands, script_and_args  # (imports every script: once, here)
    return [script_and_args(command)[1] for command in commands() if "search_app.py serve" in command]


@pytest.mark.slow
def test_every_serve_command_of_the_readme_answers_a_request(english, tmp_path):
    """As a new user types them, after the README's steps (demo.py's run; an index of a trained
    model), each on a free port, with the default --device auto."""
    (tmp_path / "results/shapes").mkdir(parents=True)
    shutil.copy(english["index"], tmp_path / "results/shapes/photos.npz")
    (tmp_path / "model-checkpoint/demo-en").mkdir(parents=True)
    shutil.copy(english["checkpoint"], tmp_path / "model-checkpoint/demo-en/best.pt")
    commands = readme_serve_commands()
    assert len(commands) >= 2 and any("--demo" in command for command in commands)
    servers = [Server(command, cwd=tmp_path) for command in commands]
    try:
        for server, command in zip(servers, commands):
            server.wait()
            results = server.get("/api/search", q="a red circle", k=3)["results"]
            assert len(results) == 3, command
            request = urllib.request.Request(server.url + "/api/info", headers={"Host": "attacker.example"})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=30)
            assert refused.value.code == 400, command
    finally:
        for server in servers:
            server.stop()
