"""visualization.py: every plot is a real picture, the command line draws all of them from a
results folder, a missing or broken input costs only its own plot, and Chinese renders."""
import importlib.util
import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import sample_data
import visualization as viz

REPO = Path(__file__).resolve().parents[1]
HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None
PLOTS = ["training_curves.png", "model_metrics.png", "similarity_heatmap.png",
         "retrieval_examples.png", "embedding_space.png", "zeroshot_confusion.png"]


# --- inputs built by hand, in the shapes the contract gives ------------------------------------

def shape_images(count):
    colours = ["red", "green", "blue", "orange", "purple", "teal"]
    images = []
    for i in range(count):
        image = Image.new("RGB", (48, 40), "white")
        ImageDraw.Draw(image).ellipse([4 + i % 5, 4, 36, 34], fill=colours[i % len(colours)])
        images.append(image)
    return images


def paired_features(num_images, captions_per_image=2, dim=16, noise=0.3, seed=0):
    """Image features and caption features near their image's, as a trained model gives."""
    rng = np.random.default_rng(seed)
    image_features = rng.normal(size=(num_images, dim)).astype(np.float32)
    caption_image = np.repeat(np.arange(num_images), captions_per_image)
    text_features = image_features[caption_image] + noise * rng.normal(
        size=(len(caption_image), dim)).astype(np.float32)
    return image_features, text_features, caption_image


def retrieval(r1):
    image_to_text = {"R@1": r1, "R@5": min(100, r1 + 30), "R@10": min(100, r1 + 45),
                     "mean_rank": 3.0, "median_rank": 2.0}
    text_to_image = dict(image_to_text, **{"R@1": r1 - 5})
    rsum = sum(d[k] for d in (image_to_text, text_to_image) for k in ("R@1", "R@5", "R@10"))
    return {"image_to_text": image_to_text, "text_to_image": text_to_image, "rsum": rsum,
            "mean_recall": rsum / 6}


def training_results():
    train = [{"step": s, "epoch": s // 20, "loss": 4.0 / (1 + s / 10), "lr": 1e-3 * min(1, s / 5),
              "logit_scale": 14.3 + s / 10, "grad_norm": 1.0, "samples_per_s": 50.0,
              "data_wait": 0.01} for s in range(1, 61)]
    val = [{"step": s, "epoch": s // 20, "retrieval": retrieval(10 + s / 2),
            "similarity": {"positive_mean": 0.3, "negative_mean": 0.0, "gap": 0.3}}
           for s in (20, 40, 60)]
    return {"config": {"batch_size": 8}, "history": {"train": train, "val": val},
            "final": val[-1], "best": {"metric": "rsum", "value": val[-1]["retrieval"]["rsum"],
                                       "step": 60}, "checkpoint": "model-checkpoint/x/best.pt"}


def zeroshot_results(classnames=("circle", "square", "triangle")):
    k = len(classnames)
    confusion = (np.eye(k, dtype=int) * 8 + 1).tolist()
    return {"top1": 80.0, "top5": 100.0, "per_class": {c: 80.0 for c in classnames},
            "classnames": list(classnames), "confusion": confusion}


def eval_results(zeroshot=True):
    results = {"retrieval": retrieval(40.0),
               "similarity": {"positive_mean": 0.31, "negative_mean": 0.04, "gap": 0.27},
               "num_images": 12, "num_texts": 30, "checkpoint": "best.pt", "data": "data"}
    if zeroshot:
        results["zeroshot"] = zeroshot_results()
    return results


def write_embeddings(folder, data):
    """Saved embeddings in evaluation.py's format for the data set at `data`."""
    import data_loader

    index = data_loader.load_caption_index(data)
    caption_image = np.asarray(index.caption_image, dtype=np.int64)
    rng = np.random.default_rng(0)
    image_features = rng.normal(size=(index.num_images, 16)).astype(np.float32)
    text_features = image_features[caption_image] + 0.4 * rng.normal(
        size=(len(caption_image), 16)).astype(np.float32)
    folder.mkdir(parents=True)
    np.save(folder / "image_features.npy", image_features)
    np.save(folder / "text_features.npy", text_features)
    np.save(folder / "caption_image.npy", caption_image)
    meta = {"image_names": [index.image_name(i) for i in range(index.num_images)],
            "captions": index.captions(), "data": str(data), "checkpoint": "best.pt"}
    (folder / "meta.json").write_text(json.dumps(meta, ensure_ascii=False))


@pytest.fixture
def results_dir(tmp_path):
    """results/run/ as training and evaluation leave it, with its data set elsewhere."""

    run = tmp_path / "results" / "run"
    run.mkdir(parents=True)
    (run / "training_results.json").write_text(json.dumps(training_results()))
    (run / "eval_results.json").write_text(json.dumps(eval_results()))
    data = sample_data.create_sample_dataset(tmp_path / "data", num_samples=12)["index"]
    write_embeddings(run / "embeddings", data)
    return run


def assert_picture(path, size=None):
    """A PNG (of `size` if given) that holds a real drawing, not a blank or flat canvas."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        if size is not None:
            assert image.size == size
        assert 300 <= min(image.size) and max(image.size) <= 3000, image.size
        pixels = np.asarray(image.convert("RGB")).astype(np.int64)
    assert pixels.std() > 15
    colours = pixels @ np.array([1 << 16, 1 << 8, 1])  # one integer per distinct RGB colour
    assert len(np.unique(colours)) > 50


# --- each plot function --------------------------------------------------------------------------

def all_plots():
    image_features, text_features, caption_image = paired_features(10)
    captions = [f"caption {j} of image {i}" for j, i in enumerate(caption_image)]
    return {
        "training_curves": lambda: viz.plot_training_curves(training_results()),
        "model_metrics": lambda: viz.plot_model_metrics(eval_results()),
        "similarity_heatmap": lambda: viz.plot_similarity_heatmap(
            shape_images(6), captions[:12:2], image_features[:6], text_features[:12:2]),
        "retrieval_examples": lambda: viz.plot_retrieval_examples(
            shape_images(10), captions, image_features, text_features, caption_image),
        "embedding_space": lambda: viz.plot_embedding_space(
            image_features, text_features, caption_image),
        "zeroshot_confusion": lambda: viz.plot_zeroshot_confusion(zeroshot_results()),
        "captions": lambda: viz.plot_captions(shape_images(5), [f"a shape {i}" for i in range(5)],
                                              [[f"caption {j} of image {i}" for j in range(i % 3 + 1)]
                                               for i in range(5)]),
    }


@pytest.mark.parametrize("name", list(all_plots()))
def test_each_plot_saves_a_png_of_its_figure_size_with_real_content(name, tmp_path):
    figure = all_plots()[name]()
    width, height = figure.get_size_inches() * figure.dpi
    path = viz.save_figure(figure, tmp_path / "sub" / f"{name}.png")
    assert 100 <= figure.dpi <= 150
    assert_picture(path, (round(width), round(height)))


def test_heatmap_cells_are_the_cosine_similarity_of_each_caption_with_each_image():
    image_features, text_features, _ = paired_features(4, captions_per_image=1)
    figure = viz.plot_similarity_heatmap(shape_images(4), ["a", "b", "c", "d"],
                                         image_features * 3, text_features)
    shown = figure.axes[0].images[0].get_array()
    image_unit = image_features / np.linalg.norm(image_features, axis=1, keepdims=True)
    text_unit = text_features / np.linalg.norm(text_features, axis=1, keepdims=True)
    np.testing.assert_allclose(shown, text_unit @ image_unit.T, atol=1e-5)
    assert np.all(np.diag(shown) > 0.9)  # matching pairs light up the diagonal


def test_retrieval_examples_tick_exactly_the_right_answers():
    image_features, text_features, caption_image = paired_features(8, noise=0.0)
    figure = viz.plot_retrieval_examples(shape_images(8), [f"t{j}" for j in range(16)],
                                         image_features, text_features, caption_image,
                                         top_k=4, num_queries=3)
    text_part, image_part = figure.subfigs
    titles = [ax.get_title() for ax in text_part.axes if ax.get_title()]
    # a perfect model: each text query's own image first, the 3 others wrong
    assert [t.split()[:2] for t in titles] == [["✓", "#1"], ["✗", "#2"], ["✗", "#3"],
                                               ["✗", "#4"]] * 3
    lines = [text.get_text() for ax in image_part.axes for text in ax.texts]
    ticked = [line.split()[1] for line in lines if line.startswith("✓")]
    assert ticked == ["#1", "#2"] * 3  # each image's two captions rank first and second


def test_embedding_space_joins_every_caption_to_its_image():
    image_features, text_features, caption_image = paired_features(5, captions_per_image=3)
    figure = viz.plot_embedding_space(image_features, text_features, caption_image)
    ax = figure.axes[0]
    (lines,) = ax.collections[:1]
    image_points = ax.collections[1].get_offsets()
    segments = lines.get_segments()
    assert len(segments) == 15
    for segment, image_id in zip(segments, caption_image):
        np.testing.assert_allclose(segment[0], image_points[image_id])
    assert "PC 1" in ax.get_xlabel()


def test_pca_axes_report_the_share_of_variance_they_keep():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(50, 6)) * np.array([10, 3, 0.1, 0.1, 0.1, 0.1])
    points, variance = viz.project_2d(features)
    assert points.shape == (50, 2)
    assert variance[0] > 0.85 and variance[0] + variance[1] > 0.99


@pytest.mark.skipif(HAS_SKLEARN, reason="scikit-learn is installed, so t-SNE is available")
def test_tsne_without_scikit_learn_says_what_to_install():
    with pytest.raises(ImportError, match="scikit-learn"):
        viz.project_2d(np.eye(5), method="tsne")


def test_zeroshot_confusion_rows_are_shares_of_the_true_class():
    zeroshot = {"classnames": ["a", "b"], "confusion": [[3, 1], [0, 10]], "top1": 92.9}
    shown = viz.plot_zeroshot_confusion(zeroshot).axes[0].images[0].get_array()
    np.testing.assert_allclose(shown, [[0.75, 0.25], [0.0, 1.0]])


def test_zeroshot_confusion_that_is_not_square_names_the_problem():
    with pytest.raises(ValueError, match="square"):
        viz.plot_zeroshot_confusion({"classnames": ["a", "b"], "confusion": [[1, 2]]})


def write_scalars(logs_dir, series):
    """TensorBoard scalar events, written with tensorboard's own writer (what train.py's
    SummaryWriter produces), as {tag: {step: value}}."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    writer = EventFileWriter(str(logs_dir))
    for tag, values in series.items():
        for step, value in values.items():
            summary = Summary(value=[Summary.Value(tag=tag, simple_value=value)])
            writer.add_event(Event(step=step, wall_time=float(step), summary=summary))
    writer.close()


def test_training_curves_come_from_tensorboard_events_when_the_json_is_absent(tmp_path):
    write_scalars(tmp_path / "logs", {"train/loss": {s: 5.0 - s for s in range(1, 6)},
                                      "train/lr": {s: 1e-4 * s for s in range(1, 6)},
                                      "train/logit_scale": {s: 14.0 + s for s in range(1, 6)},
                                      "val/image_to_text/R@1": {5: 42.0}, "val/rsum": {5: 300.0}})
    results = viz.load_training_results(tmp_path / "results", tmp_path / "logs")
    train, val = results["history"]["train"], results["history"]["val"]
    assert [entry["step"] for entry in train] == [1, 2, 3, 4, 5]
    assert train[0]["loss"] == pytest.approx(4.0) and train[4]["logit_scale"] == 19.0
    assert val == [{"step": 5, "retrieval": {"image_to_text": {"R@1": 42.0}, "rsum": 300.0}}]
    assert_picture(viz.save_figure(viz.plot_training_curves(results), tmp_path / "c.png"))


# --- Chinese text ------------------------------------------------------------------------------

def missing_glyph_warnings(figure):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        figure.savefig(io.BytesIO(), format="png")
    return [w for w in caught if "missing from font" in str(w.message)]


def test_chinese_captions_render_as_characters_with_a_cjk_font():
    if viz.find_cjk_font() is None:
        pytest.skip("no CJK font installed (apt-get install fonts-noto-cjk)")
    from matplotlib.figure import Figure

    captions = ["一个红色的圆形", "蓝色正方形在左边", "绿色三角形", "两个黄色的形状"]
    image_features, text_features, _ = paired_features(4, captions_per_image=1)
    figure = viz.plot_similarity_heatmap(shape_images(4), captions, image_features, text_features)
    assert missing_glyph_warnings(figure) == []
    control = Figure()  # the check can see boxes: DejaVu Sans alone has no Chinese glyphs
    control.text(0.5, 0.5, captions[0], family="DejaVu Sans")
    assert missing_glyph_warnings(control)


def test_chinese_without_a_cjk_font_warns_once_and_still_draws(monkeypatch):
    monkeypatch.setattr(viz, "find_cjk_font", lambda: None)
    viz._warn_no_cjk_font.cache_clear()
    zeroshot = zeroshot_results(("圆形", "正方形"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        figures = [viz.plot_zeroshot_confusion(zeroshot) for _ in range(2)]
    ours = [w for w in caught if "no CJK font" in str(w.message)]
    assert len(ours) == 1 and "fonts-noto-cjk" in str(ours[0].message)
    assert all(figure.axes for figure in figures)
    viz._warn_no_cjk_font.cache_clear()


@pytest.fixture
def cjk_family_without_bold(monkeypatch):
    """The CJK family found, with its bold faces taken out of matplotlib's font list: a machine
    whose CJK font has a regular face only, as Droid Sans Fallback (fonts-droid-fallback) has."""
    from matplotlib import font_manager
    family = viz.find_cjk_font()
    if family is None:
        pytest.skip("no CJK font installed (apt-get install fonts-noto-cjk)")
    manager = font_manager.fontManager
    monkeypatch.setattr(manager, "ttflist", without_bold_faces(family))
    # the caches of the family found and of matplotlib's font lookups, before and after
    for clear in (viz.find_cjk_font.cache_clear, manager._findfont_cached.cache_clear):
        clear()
    yield family
    monkeypatch.undo()
    for clear in (viz.find_cjk_font.cache_clear, manager._findfont_cached.cache_clear):
        clear()


def without_bold_faces(family):
    from matplotlib import font_manager
    return [font for font in font_manager.fontManager.ttflist
            if font.name != family or viz._weight(font) < viz.BOLD]


def draw_validation_pictures():
    """The pictures of a validation (tensorboard_views.Views.write_pictures), drawn."""
    captions = ["a red circle", "a green square", "a blue triangle", "an orange star"]
    image_features, text_features, _ = paired_features(4, captions_per_image=1)
    for figure in (viz.plot_similarity_heatmap(shape_images(4), captions, image_features, text_features),
                   viz.plot_retrieval_examples(shape_images(4), captions, image_features, text_features,
                                               np.arange(4), top_k=3)):
        viz.figure_pixels(figure)


def test_validation_pictures_draw_without_findfont_warnings_when_the_cjk_font_has_no_bold(
        cjk_family_without_bold, caplog, monkeypatch):
    with caplog.at_level("WARNING", logger="matplotlib.font_manager"):
        draw_validation_pictures()
    assert [r.getMessage() for r in caplog.records if r.name == "matplotlib.font_manager"] == []
    # the check can see the warnings: without the regular face standing in for bold, they come
    from matplotlib import font_manager
    monkeypatch.setattr(font_manager.fontManager, "ttflist", without_bold_faces(cjk_family_without_bold))
    font_manager.fontManager._findfont_cached.cache_clear()
    with caplog.at_level("WARNING", logger="matplotlib.font_manager"):
        draw_validation_pictures()
    assert any(f"Failed to find font weight bold for {cjk_family_without_bold}" in r.getMessage()
               for r in caplog.records)


# --- command line ------------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_draws_every_plot_of_a_run_into_its_results_folder(results_dir, tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "visualization.py"), "--run_name", "run"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in PLOTS:
        assert f"wrote results/run/{name}" in done.stdout
        assert_picture(results_dir / name)


def test_missing_embeddings_skip_only_the_plots_that_need_them(results_dir, capsys):
    for path in (results_dir / "embeddings").iterdir():
        path.unlink()
    assert viz.main(["--results_dir", str(results_dir)]) == 0
    out = capsys.readouterr().out
    for name in ["similarity_heatmap.png", "retrieval_examples.png", "embedding_space.png"]:
        assert f"skipped {name}: " in out and "image_features.npy" in out
        assert not (results_dir / name).exists()
    for name in ["training_curves.png", "model_metrics.png", "zeroshot_confusion.png"]:
        assert_picture(results_dir / name)


@pytest.mark.parametrize("part", ["zeroshot", "retrieval"])
def test_evaluation_without_a_part_skips_only_the_plot_of_that_part(part, results_dir, tmp_path,
                                                                     capsys):
    results = eval_results()
    del results[part]
    (results_dir / "eval_results.json").write_text(json.dumps(results))
    no_embeddings = str(tmp_path / "none")  # leave the embedding plots out: they are not at stake
    assert viz.main(["--results_dir", str(results_dir), "--embeddings", no_embeddings]) == 0
    out = capsys.readouterr().out
    skipped, drawn = {"zeroshot": ("zeroshot_confusion.png", "model_metrics.png"),
                      "retrieval": ("model_metrics.png", "zeroshot_confusion.png")}[part]
    assert f"skipped {skipped}: " in out and f"no '{part}' part" in out
    assert not (results_dir / skipped).exists()
    assert_picture(results_dir / drawn)


def test_missing_data_set_skips_thumbnail_plots_but_draws_the_embedding_space(results_dir,
                                                                                 capsys):
    meta_path = results_dir / "embeddings" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(dict(meta, data=None)))
    assert viz.main(["--results_dir", str(results_dir)]) == 0
    out = capsys.readouterr().out
    assert "skipped similarity_heatmap.png: no data set for thumbnails" in out
    assert "skipped retrieval_examples.png: no data set for thumbnails" in out
    assert_picture(results_dir / "embedding_space.png")


@pytest.mark.slow
def test_a_broken_input_fails_its_plots_and_the_others_are_still_drawn(results_dir, capsys):
    (results_dir / "eval_results.json").write_text("{not json")
    assert viz.main(["--results_dir", str(results_dir)]) == 1
    out = capsys.readouterr().out
    for name in ["model_metrics.png", "zeroshot_confusion.png"]:
        assert f"failed {name}: ValueError: {results_dir / 'eval_results.json'} is not valid JSON" \
            in out
    for name in PLOTS[:1] + PLOTS[2:5]:
        assert_picture(results_dir / name)


def test_cli_reads_the_runs_tensorboard_events_when_training_results_json_is_absent(
        results_dir, tmp_path, monkeypatch, capsys):
    (results_dir / "training_results.json").unlink()
    write_scalars(tmp_path / "logs" / "run", {"train/loss": {1: 3.0, 2: 2.0, 3: 1.5}})
    monkeypatch.chdir(tmp_path)
    assert viz.main(["--run_name", "run", "--eval_json", "absent.json"]) == 0
    assert "wrote results/run/training_curves.png" in capsys.readouterr().out
    assert_picture(results_dir / "training_curves.png")


@pytest.mark.slow
@pytest.mark.skipif(HAS_SKLEARN, reason="scikit-learn is installed, so t-SNE is available")
def test_tsne_without_scikit_learn_falls_back_to_pca_and_says_so(results_dir, capsys):
    assert viz.main(["--results_dir", str(results_dir), "--tsne"]) == 0
    assert "t-SNE needs scikit-learn (pip install scikit-learn); drawing PCA instead" in \
        capsys.readouterr().out
    assert_picture(results_dir / "embedding_space.png")


# --- where the model looks ---------------------------------------------------------------------

def save_random_checkpoint(path, model_name):
    import clip_model
    clip_model.save_checkpoint(path, clip_model.build_model(model_name))
    return str(path)


@pytest.mark.slow
def test_relevance_maps_of_a_vit_checkpoint_are_drawn(results_dir, capsys):
    checkpoint = save_random_checkpoint(results_dir / "vit.pt", "tiny-vit-64")
    assert viz.main(["--results_dir", str(results_dir), "--checkpoint", checkpoint,
                     "--num_images", "6"]) == 0
    assert f"wrote {results_dir / 'relevance_maps.png'}" in capsys.readouterr().out
    assert_picture(results_dir / "relevance_maps.png")
    images = shape_images(2)
    maps = viz.relevance_maps(checkpoint, images, ["a red circle", "a green circle"])
    assert [m.shape for m in maps] == [(8, 8), (8, 8)]                  # 64 px in 8 px patches
    assert all(abs(m.sum() - 1) < 1e-5 and (m >= 0).all() for m in maps)


@pytest.mark.slow
def test_a_checkpoint_that_is_not_a_plain_vit_skips_only_the_relevance_maps(results_dir, capsys):
    checkpoint = save_random_checkpoint(results_dir / "rn18.pt", "simple-rn18")
    assert viz.main(["--results_dir", str(results_dir), "--checkpoint", checkpoint]) == 0
    out = capsys.readouterr().out
    assert f"skipped relevance_maps.png: {checkpoint}: minimal_clip writes out CLIP's plain ViT" in out
    assert not (results_dir / "relevance_maps.png").exists()
    assert_picture(results_dir / "similarity_heatmap.png")


# --- captions (a captioner's, from evaluation.py's `captioning` part) ----------------------------

def test_the_captions_plot_shows_each_written_caption_above_its_image_and_its_references_below():
    references = [["a red circle", "a round red shape"], ["a green circle"], ["one", "two", "three", "four"]]
    figure = viz.plot_captions(shape_images(3), ["a red dot", "a green dot", "a blue dot"], references)
    axes = [ax for ax in figure.axes if ax.images]
    assert [ax.get_title().replace("\n", " ") for ax in axes] == ["“a red dot”", "“a green dot”", "“a blue dot”"]
    below = [ax.get_xlabel().split("\n") for ax in axes]
    assert below[0] == ["references:", "· a red circle", "· a round red shape"]
    assert below[2] == ["references:", "· one", "· two", "· three", "  (and 1 more)"]
    with pytest.raises(ValueError, match="one generated caption and one list of references per image"):
        viz.plot_captions(shape_images(2), ["a"], [["b"], ["c"]])


def captioned(results_dir, count):
    """The evaluation JSON of results_dir with a `captioning` part of its data set's first `count`
    images, as evaluation.py writes it for a captioner."""
    import data_loader
    data = json.loads((results_dir / "embeddings/meta.json").read_text())["data"]
    index = data_loader.load_caption_index(data)
    rows = [{"image": index.image_name(i), "generated": f"written for image {i}",
             "references": [index.caption(j) for j in index.captions_of(i)]} for i in range(count)]
    results = dict(eval_results(), data=data, captioning={"num_images": count, "captions": rows})
    (results_dir / "eval_results.json").write_text(json.dumps(results))
    return index, rows


def test_cli_draws_the_captions_of_a_captioner_with_their_images(results_dir, monkeypatch, capsys):
    index, rows = captioned(results_dir, 10)
    drawn, plot = [], viz.plot_captions
    monkeypatch.setattr(viz, "plot_captions", lambda *inputs: drawn.append(inputs) or plot(*inputs))
    assert viz.main(["--results_dir", str(results_dir), "--num_images", "4"]) == 0
    assert f"wrote {results_dir / 'captions.png'}" in capsys.readouterr().out
    assert_picture(results_dir / "captions.png")
    images, generated, references = drawn[0]
    shown = [int(caption.split()[-1]) for caption in generated]
    assert shown == [0, 3, 6, 9]                                    # spread over the captioned images
    assert references == [rows[i]["references"] for i in shown]
    for image, i in zip(images, shown):
        assert np.array_equal(np.asarray(image), np.asarray(index.load_image(i)))


def test_cli_skips_the_captions_plot_without_captions_and_names_a_missing_image(results_dir, capsys):
    assert viz.main(["--results_dir", str(results_dir)]) == 0
    assert "skipped captions.png: " in capsys.readouterr().out and not (results_dir / "captions.png").exists()
    captioned(results_dir, 2)
    results = json.loads((results_dir / "eval_results.json").read_text())
    results["captioning"]["captions"][1]["image"] = "/elsewhere/gone.png"
    (results_dir / "eval_results.json").write_text(json.dumps(results))
    assert viz.main(["--results_dir", str(results_dir), "--embeddings", "none"]) == 0
    assert "skipped captions.png: image /elsewhere/gone.png, captioned by evaluation.py, is not in the data" \
        in capsys.readouterr().out
