"""TensorBoard as a user sees it: a short run's pictures, projector, HParams and text, read back
with TensorBoard's own readers; then `tensorboard --logdir` served and opened in Chromium."""
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clip_model
import data_loader
import sample_data
import tensorboard_views
import train
import visualization

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = Path(tempfile.gettempdir())
PAIRS, PROJECTED = 6, 20
RUN = "tb-views"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """4 steps of the tiny model, validated at steps 2 and 4, with one unreadable validation
    image (the samples must pass over it)."""
    out = tmp_path_factory.mktemp("tensorboard")
    train_set = sample_data.create_sample_dataset(out / "train", num_samples=160, seed=0)
    val_set = sample_data.create_sample_dataset(out / "val", num_samples=30, seed=1)
    val_index = data_loader.load_caption_index(val_set["index"])
    order = np.random.default_rng(0).permutation(val_index.num_images)
    Path(val_index.image_name(int(order[1]))).write_bytes(b"not an image")
    result = train.main([
        "--data_dir", train_set["index"], "--val_data", val_set["index"], "--run_name", RUN,
        "--checkpoint_dir", str(out / "ckpt"), "--log_dir", str(out / "logs"),
        "--results_dir", str(out / "results"), "--num_workers", "0", "--batch_size", "32",
        "--max_steps", "4", "--eval_every", "2", "--warmup_steps", "1", "--learning_rate", "2e-3",
        "--tensorboard_pairs", str(PAIRS), "--projector_pairs", str(PROJECTED)])
    return {"out": out, "logs": out / "logs" / RUN, "result": result, "val_index": val_index,
            "order": order}


@pytest.fixture(scope="module")
def events(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    guidance = {"images": 0, "tensors": 0, "scalars": 0}   # 0 = keep every event
    return EventAccumulator(str(run["logs"]), size_guidance=guidance).Reload()


# ----------------------------------------------------------------------------------------------
# What the event files hold

@pytest.mark.slow
def test_both_pictures_are_written_at_every_validation(run, events):
    for tag in ("val/similarity_heatmap", "val/retrieval_examples"):
        pictures = events.Images(tag)
        assert [p.step for p in pictures] == [2, 4], tag
        for picture in pictures:
            image = Image.open(io.BytesIO(picture.encoded_image_string))
            assert (image.width, image.height) == (picture.width, picture.height)
            assert image.width > 800 and image.height > 800
    # the weights changed between the two validations, and so did the heatmap
    first, last = (p.encoded_image_string for p in events.Images("val/similarity_heatmap"))
    assert first != last


@pytest.mark.slow
def test_the_pictures_show_the_first_readable_pairs_of_the_seeded_order(run):
    index, order = run["val_index"], run["order"]
    pairs = tensorboard_views.load_pairs(index, order, PAIRS)
    expected = [int(order[0])] + [int(i) for i in order[2:PAIRS + 1]]    # order[1] is unreadable
    assert [pairs.index.image_name(k) for k in range(PAIRS)] == [index.image_name(i) for i in expected]
    assert pairs.captions == [index.caption(int(index.captions_of(i)[0])) for i in expected]
    assert all(max(t.size) <= tensorboard_views.PICTURE_THUMBNAIL for t in pairs.thumbnails)
    other = tensorboard_views.load_pairs(index, np.random.default_rng(1).permutation(index.num_images), PAIRS)
    assert other.captions != pairs.captions


def test_the_projector_holds_the_final_features_of_images_and_captions(run):
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig
    config = text_format.Parse((run["logs"] / "projector_config.pbtxt").read_text(), ProjectorConfig())
    [embedding] = config.embeddings
    assert embedding.tensor_name == "val_pairs:00004"
    rows = np.loadtxt(run["logs"] / embedding.tensor_path, delimiter="\t")
    metadata = [line.split("\t") for line in
                (run["logs"] / embedding.metadata_path).read_text().splitlines()]
    assert metadata[0] == ["caption", "modality", "image"]
    assert [m[1] for m in metadata[1:]] == ["image"] * PROJECTED + ["caption"] * PROJECTED
    assert rows.shape[0] == 2 * PROJECTED
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1, atol=1e-5)
    # the rows are the final weights' features of the images and first captions the labels name
    setup, _ = clip_model.model_from_checkpoint(run["out"] / "ckpt" / RUN / "last.pt")
    index = run["val_index"]
    by_name = {os.path.basename(index.image_name(i)): i for i in range(index.num_images)}
    chosen = [by_name[name] for _, _, name in metadata[1:PROJECTED + 1]]
    assert int(run["order"][1]) not in chosen                    # the unreadable image
    images = torch.stack([data_loader.image_transform(setup.preprocess_cfg)(index.load_image(i))
                          for i in chosen])
    expected = clip_model.encode_images(setup.model, [images], "cpu")
    np.testing.assert_allclose(rows[:PROJECTED], expected.numpy(), atol=1e-5)
    captions = [caption for caption, _, _ in metadata[PROJECTED + 1:]]
    assert captions == [caption for caption, _, _ in metadata[1:PROJECTED + 1]]
    assert captions == [index.caption(int(index.captions_of(i)[0])) for i in chosen]
    expected = clip_model.encode_texts(setup.model, setup.tokenizer, captions, "cpu")
    np.testing.assert_allclose(rows[PROJECTED:], expected.numpy(), atol=1e-5)
    sprite = Image.open(run["logs"] / embedding.sprite.image_path)
    side = int(np.ceil(np.sqrt(2 * PROJECTED))) * tensorboard_views.PROJECTOR_TILE
    assert sprite.size == (side, side)
    assert list(embedding.sprite.single_image_dim) == [48, 48]


def test_hparams_hold_the_settings_and_the_best_metrics(run, events):
    from tensorboard.plugins.hparams import api_pb2, metadata
    content = events.SummaryMetadata(metadata.EXPERIMENT_TAG).plugin_data.content
    experiment = metadata.parse_experiment_plugin_data(content)
    assert [m.name.tag for m in experiment.metric_infos] == \
        [f"best/{name}" for name in tensorboard_views.BEST_SHOWN]
    infos = {info.name: info for info in experiment.hparam_infos}
    assert "learning_rate" in infos and "log_dir" not in infos         # logging is not an hparam
    assert infos["augment"].type == api_pb2.DATA_TYPE_BOOL
    assert list(infos["loss"].domain_discrete) == ["clip", "siglip"]
    start = metadata.parse_session_start_info_plugin_data(
        events.SummaryMetadata(metadata.SESSION_START_INFO_TAG).plugin_data.content)
    assert start.hparams["learning_rate"].number_value == 2e-3
    assert start.hparams["augment"].bool_value is True
    assert start.hparams["model_name"].string_value == "tiny-vit-64"
    end = metadata.parse_session_end_info_plugin_data(
        events.SummaryMetadata(metadata.SESSION_END_INFO_TAG).plugin_data.content)
    assert end.status == api_pb2.STATUS_SUCCESS
    rsum = [e.value for e in events.Scalars("val/rsum")]
    assert [(e.step, e.value) for e in events.Scalars("best/rsum")] == \
        [(2, pytest.approx(rsum[0])), (4, pytest.approx(max(rsum)))]
    assert "best/zeroshot/top1" not in events.Tags()["scalars"]       # no --val_zeroshot


def test_the_settings_and_the_data_are_text_at_the_start(run, events):
    def text(tag):
        [event] = events.Tensors(f"{tag}/text_summary")
        return event.step, event.tensor_proto.string_val[0].decode()
    step, settings = text("run/settings")
    assert step == 0
    assert "| training | max_steps | **`4`** | `0` |" in settings
    assert "| training | learning_rate | **`0.002`** | `0.0005` |" in settings
    assert '| model | model_name | `"tiny-vit-64"` | |' in settings
    assert "| logging | tensorboard_pairs | **`6`** | `8` |" in settings
    step, data = text("run/data")
    assert step == 0
    val = run["val_index"]
    assert f"| validation | 30 | {val.num_captions} |" in data
    assert "| training | 160 |" in data
    assert "Global batch 32" in data and "steps per epoch" in data


def test_the_time_of_the_pictures_is_measured_apart(run):
    timing = run["result"]["timing"]
    assert 0 < timing["tensorboard_s"] < timing["validation_s"]
    assert timing["tensorboard_end_s"] > 0


def test_a_picture_that_fails_to_draw_is_logged_and_the_run_goes_on(run, monkeypatch):
    warnings = []
    views = tensorboard_views.Views(reports=None, log=type("Log", (), {"warning": warnings.append}),
                                    val_index=run["val_index"], order=run["order"],
                                    pictures=tensorboard_views.load_pairs(run["val_index"], run["order"], 2))
    monkeypatch.setattr(tensorboard_views, "write_best", lambda *args: None)
    monkeypatch.setattr(views, "write_pictures", lambda job, step: 1 / 0)
    job = type("Job", (), {"cfg": type("Cfg", (), {"projector_every_validation": False})})
    state = type("State", (), {"history": {"val": []}, "step": 7})
    views.validation(job, state)
    views.validation(job, state)
    assert views.failed and len(warnings) == 1
    assert "step 7 (ZeroDivisionError" in warnings[0] and "--tensorboard_pairs 0" in warnings[0]


def test_figure_pixels_are_the_png_that_save_figure_writes(tmp_path):
    def heatmap():     # a new figure each time: every drawing refines a constrained layout
        rng = np.random.default_rng(0)
        images = [Image.new("RGB", (40, 30), colour) for colour in ("red", "green", "blue")]
        return visualization.plot_similarity_heatmap(images, ["a", "b", "c"], rng.normal(size=(3, 4)),
                                                     rng.normal(size=(3, 4)))
    pixels = visualization.figure_pixels(heatmap())
    saved = np.asarray(Image.open(visualization.save_figure(heatmap(), tmp_path / "h.png")).convert("RGB"))
    assert pixels.dtype == np.uint8 and pixels.shape == saved.shape
    assert np.array_equal(pixels, saved)


# ----------------------------------------------------------------------------------------------
# TensorBoard itself, in a browser

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tensorboard(run):
    """`tensorboard --logdir` on a free port, once it lists the run."""
    import json
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir",
                                str(run["logs"].parent), "--host", "127.0.0.1", "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            if process.poll() is not None:
                pytest.fail(f"tensorboard stopped: {process.stdout.read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/data/runs", timeout=5) as response:
                    if RUN in json.load(response):
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail("tensorboard did not list the run in 90 s")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM}: setup.sh installs Debian's chromium where it can "
                    f"(sudo apt-get install chromium); the event-file tests above run without it")
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield browser
        browser.close()


@pytest.mark.slow
def test_tensorboard_serves_the_pictures_of_the_run(tensorboard, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{tensorboard}/#images")
    page.locator(f"text={RUN}").first.wait_for(timeout=60_000)            # the run is listed
    for tag in ("val/similarity_heatmap", "val/retrieval_examples"):
        page.locator(f"text=tag: {tag}").wait_for(timeout=60_000)
    pictures = page.locator("img[src*='individualImage']")
    pictures.nth(1).wait_for(timeout=60_000)          # the cards are drawn before their images
    assert pictures.count() == 2
    widths = [pictures.nth(i).evaluate("img => img.decode().then(() => img.naturalWidth)")
              for i in range(2)]
    assert min(widths) > 800
    page.screenshot(path=str(SCREENSHOTS / "tensorboard_images.png"))


@pytest.mark.slow
def test_tensorboard_serves_the_projector_of_the_run(tensorboard, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{tensorboard}/#projector")
    projector = page.frame_locator("iframe").frame_locator("iframe")   # the plugin's frame, its app's
    projector.locator(".numDataPoints", has_text=str(2 * PROJECTED)).wait_for(timeout=60_000)
    projector.locator("paper-item", has_text="val_pairs:00004").wait_for(state="attached")
    page.wait_for_timeout(2000)                    # the points fly into place
    page.screenshot(path=str(SCREENSHOTS / "tensorboard_projector.png"))
