"""Pictures of what a CLIP run learned, drawn from the files training and evaluation write.

    python visualization.py --run_name my_run        # reads results/my_run/ and logs/my_run/
    python visualization.py --results_dir some/dir   # any folder laid out the same way

writes into the results folder:
    training_curves.png     loss, learning rate, logit scale and validation recalls per step
    model_metrics.png       recall@K in both directions and the similarity gap
    similarity_heatmap.png  N images against their N captions; a trained model lights the diagonal
    retrieval_examples.png  text -> image and image -> text searches, right answers in green
    embedding_space.png     images and captions projected to 2-D, matching pairs joined
    zeroshot_confusion.png  zero-shot classification confusion (when evaluated with --zeroshot_dir)
    relevance_maps.png      where a ViT looks in an image for its caption (minimal_clip.relevance_map)
    captions.png            a captioner's (CoCa's) captions of images beside the images' own captions

Every plot is also a function that takes arrays or dicts and returns a matplotlib Figure, for
notebooks: `save_figure(plot_similarity_heatmap(images, captions, img_f, txt_f), "h.png")`.
Figures are built without pyplot, so nothing here needs a display.
"""
import argparse
import contextlib
import dataclasses
import functools
import json
import textwrap
import unicodedata
import warnings
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib import font_manager
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import ImageOps
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import clip_model
import data_loader
import evaluation
import minimal_clip
from errors import MissingInputError, ModelError, UserError, run_script
from settings import SETTINGS, check_folder_name

DPI = 120
CORRECT, WRONG = "#2ca02c", "#d62728"
# Families that hold Chinese glyphs, best first, and the file names they ship under (used when
# matplotlib's font cache predates the font's installation).
CJK_FONT_FAMILIES = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans SC", "Source Han Sans SC",
                     "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "Droid Sans Fallback",
                     "AR PL UMing CN", "Microsoft YaHei", "SimHei", "PingFang SC", "Heiti SC")
_CJK_FILE_HINTS = ("cjk", "wqy", "droidsansfallback", "sourcehan", "msyh", "simhei", "pingfang")
REGULAR, BOLD = 400, 700  # font weights as matplotlib numbers them: "normal" and "bold"


# ---------------------------------------------------------------------------------------------
# Fonts and saving

@functools.cache
def find_cjk_font() -> str | None:
    """The name of an installed font family with Chinese glyphs, or None.

    matplotlib's default font (DejaVu Sans) has no CJK glyphs, so Chinese captions would draw as
    boxes. We keep DejaVu Sans first and add this family as a per-glyph fallback.
    On Debian/Ubuntu: `apt-get install fonts-noto-cjk` (or fonts-wqy-zenhei).
    """

    def installed():
        return {font.name for font in font_manager.fontManager.ttflist}

    if not installed().intersection(CJK_FONT_FAMILIES):
        # matplotlib caches its font list on first use; a font installed afterwards is missing
        # from that cache until its file is added by hand.
        for path in font_manager.findSystemFonts():
            if any(hint in Path(path).name.lower() for hint in _CJK_FILE_HINTS):
                try:
                    font_manager.fontManager.addfont(path)
                except (OSError, RuntimeError):
                    pass  # an unreadable font file is just not a candidate
    names = installed()
    family = next((family for family in CJK_FONT_FAMILIES if family in names), None)
    if family:
        _let_regular_stand_in_for_bold(family)
    return family


def _let_regular_stand_in_for_bold(family: str) -> None:
    """Register the regular face of `family` as its bold face too, if it has no bold one.

    Titles are bold. With a fallback family, matplotlib looks up every family of the list in the
    text's weight, for every text, Latin ones too; a family without a bold face (Droid Sans
    Fallback, the CJK font of many Debian machines, has a regular face only) then logs "findfont:
    Failed to find font weight bold for Droid Sans Fallback" at each figure, and draws the
    regular face anyway. Registering that face for bold says so once, without the warnings."""
    faces = [font for font in font_manager.fontManager.ttflist if font.name == family]
    if faces and not any(_weight(font) == BOLD for font in faces):
        regular = min(faces, key=lambda font: abs(_weight(font) - REGULAR))
        font_manager.fontManager.ttflist.append(dataclasses.replace(regular, weight=BOLD))


def _weight(font) -> int:
    """A font's weight as a number (the font list holds numbers, or names such as "bold")."""
    return font_manager.weight_dict.get(font.weight, font.weight)


@functools.cache
def _warn_no_cjk_font() -> None:
    warnings.warn("no CJK font found, so Chinese text draws as boxes; install one, e.g. "
                  "`apt-get install fonts-noto-cjk` on Debian/Ubuntu", stacklevel=3)


def _is_wide(char: str) -> bool:
    return unicodedata.east_asian_width(char) in "WF"


@contextlib.contextmanager
def _figure(figsize, texts=()):
    """A Figure whose fonts fall back to a CJK family, so captions in any language render.

    Text objects take their font family when they are created, so the fallback set while a
    plot function builds its figure stays with the figure wherever it is later drawn or saved.
    """

    cjk = find_cjk_font()
    if cjk is None and any(_is_wide(char) for text in texts for char in text):
        _warn_no_cjk_font()
    families = ["DejaVu Sans"] + ([cjk] if cjk else [])
    with matplotlib.rc_context({"font.family": families, "axes.titleweight": "bold"}):
        yield Figure(figsize=figsize, dpi=DPI, layout="constrained")


def save_figure(figure, path) -> Path:
    """Write `figure` as a PNG at its own size and dpi (creating the folder); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=figure.dpi, facecolor="white")
    return path


def figure_pixels(figure) -> np.ndarray:
    """The figure drawn as an RGB array [H, W, 3] of uint8 at its own size and dpi, as save_figure
    draws it: what TensorBoard's add_image takes (train.py's pictures, tensorboard_views.py)."""
    figure.set_facecolor("white")
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _wrap(text: str, width: int = 30, max_lines: int = 3) -> str:
    """Wrap a caption into lines; a Chinese character is twice as wide as a Latin one."""
    if sum(map(_is_wide, text)) > len(text) / 2:
        width = max(8, width // 2)
    lines = textwrap.wrap(text, width) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][:-1] + "…"
    return "\n".join(lines)


def thumbnail(image, size: int = 128) -> np.ndarray:
    """The image letterboxed on white into a size x size RGB array (aspect ratio kept): what the
    plots draw, and TensorBoard's projector shows as sprites."""
    return np.asarray(ImageOps.pad(image.convert("RGB"), (size, size), color="white"))


def _no_data(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", color="gray", transform=ax.transAxes)
    ax.set(xticks=[], yticks=[])


# ---------------------------------------------------------------------------------------------
# Training curves and metrics (inputs: training_results.json, TensorBoard events, evaluation JSON)

def read_tensorboard_history(logs_dir) -> dict:
    """The `history` of training_results.json rebuilt from a run's TensorBoard events.

    Tags `train/<name>` become fields of the train entries; `val/similarity/<name>` goes into
    each val entry's `similarity`, and every other `val/...` tag (`val/image_to_text/R@1`,
    `val/rsum`, ...) into its `retrieval`, nested at each "/".
    """

    accumulator = EventAccumulator(str(logs_dir), size_guidance={"scalars": 0})  # 0 = keep all
    accumulator.Reload()
    train, val = {}, {}
    for tag in accumulator.Tags()["scalars"]:
        group, _, name = tag.partition("/")
        for event in accumulator.Scalars(tag):
            if group == "train":
                train.setdefault(event.step, {"step": event.step})[name] = event.value
            elif group == "val":
                entry = val.setdefault(event.step, {"step": event.step})
                section = "similarity" if name.startswith("similarity/") else "retrieval"
                *parents, leaf = name.removeprefix("similarity/").split("/")
                node = entry.setdefault(section, {})
                for parent in parents:
                    node = node.setdefault(parent, {})
                node[leaf] = event.value
    return {"history": {"train": [train[s] for s in sorted(train)],
                        "val": [val[s] for s in sorted(val)]}}


def _read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); was it cut short?") from None


def load_training_results(results_dir, logs_dir=None) -> dict:
    """training_results.json of a run, or else its history read from TensorBoard events."""
    path = Path(results_dir) / "training_results.json"
    if path.is_file():
        return _read_json(path)
    if logs_dir is not None and any(Path(logs_dir).glob("events.out.tfevents.*")):
        return read_tensorboard_history(logs_dir)
    raise MissingInputError(f"no {path} and no TensorBoard events in {logs_dir or '(no --logs_dir)'}")


def _series(entries, *keys):
    """Steps and values of entries[i][keys[0]][keys[1]]... where that value exists."""
    steps, values = [], []
    for entry in entries:
        value = entry
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            steps.append(entry["step"])
            values.append(value)
    return np.asarray(steps), np.asarray(values, dtype=float)


def _plot_line(ax, steps, values, title, ylabel, color, smooth=False):
    if len(steps) == 0:
        return _no_data(ax, f"no {title.lower()} logged")
    window = len(values) // 25 if smooth and len(values) >= 100 else 0
    if window > 1:  # many noisy logs: faint raw values under a trailing moving average
        ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        kernel = np.ones(window) / window
        ax.plot(steps[window - 1:], np.convolve(values, kernel, "valid"), color=color,
                label=f"moving average of {window} logs")
        ax.legend(loc="upper right", fontsize=8)
    else:
        ax.plot(steps, values, color=color, marker="." if len(steps) < 30 else None)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)


def plot_training_curves(results: dict):
    """Loss, learning rate, logit scale (1/temperature) and validation recalls against steps.

    `results` is the content of training_results.json (or `read_tensorboard_history`'s output).
    """
    history = results.get("history", {})
    train, val = history.get("train", []), history.get("val", [])
    with _figure((12, 8)) as figure:
        (loss_ax, lr_ax), (scale_ax, recall_ax) = figure.subplots(2, 2)
        _plot_line(loss_ax, *_series(train, "loss"), "Training loss", "contrastive loss",
                   "C0", smooth=True)
        _plot_loss_terms(loss_ax, train)
        _plot_line(lr_ax, *_series(train, "lr"), "Learning rate", "learning rate", "C1")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        # CLIP learns its temperature: logits are cos(image, text) * logit_scale, clamped <= 100.
        _plot_line(scale_ax, *_series(train, "logit_scale"), "Temperature",
                   "logit scale (1 / temperature)", "C2")
        _plot_validation(recall_ax, val, results.get("best"))
        figure.suptitle("Training curves", fontsize=14, fontweight="bold")
    return figure


def _plot_loss_terms(ax, train):
    """The terms of a loss that has several (train_step.loss_terms: a teacher's, a captioner's),
    drawn thin beside their total."""
    terms = [(name, *_series(train, name), color) for name, color in
             (("contrastive", "C3"), ("distillation", "C4"), ("caption", "C5"))]
    terms = [term for term in terms if len(term[1])]
    if not terms:
        return
    names = {term[0] for term in terms}
    total = "(1 - w) x contrastive + w x distillation" if "distillation" in names else "contrastive"
    ax.get_lines()[0].set_label(total + (" + w_c x caption" if "caption" in names else ""))
    for name, steps, values, color in terms:
        ax.plot(steps, values, color=color, linewidth=0.8, label=f"{name} term")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right", fontsize=8)


def _plot_validation(ax, val, best):
    """Recalls both ways; zero-shot top-1 and top-5 when the run tracked them (--val_zeroshot),
    so that forgetting shows beside the gain; the moving average's text->image R@1 (--ema_decay)."""
    lines = [(("retrieval", direction, metric), style, color,
              f"{direction.replace('_to_', ' → ')} {metric}")
             for direction, style in (("image_to_text", "-"), ("text_to_image", "--"))
             for metric, color in (("R@1", "C0"), ("R@5", "C1"), ("R@10", "C2"))]
    lines += [(("zeroshot", "top1"), ":", "C3", "zero-shot top-1"),
              (("zeroshot", "top5"), ":", "C4", "zero-shot top-5"),
              (("ema", "retrieval", "text_to_image", "R@1"), "-.", "C5", "EMA text → image R@1")]
    drawn = False
    for path, style, color, label in lines:
        steps, values = _series(val, *path)
        if len(steps):
            ax.plot(steps, values, style, color=color, marker="o", markersize=3, label=label)
            drawn = True
    if not drawn:
        return _no_data(ax, "no validation logged")
    if best and best.get("step") is not None:
        ax.axvline(best["step"], color="gray", linestyle=":",
                   label=f"best {best.get('metric', '')} (step {best['step']})")
    ax.set(title="Validation", xlabel="step", ylabel="recall / accuracy (%)", ylim=(0, 102))
    # outside the axes: recall lines fill the whole height sooner or later
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    ax.grid(alpha=0.3)


def plot_model_metrics(eval_results: dict):
    """Recall@1/5/10 bars for both retrieval directions, and the similarity gap.

    `eval_results` is evaluation.py's output JSON (`retrieval`, `similarity`, counts).
    """
    retrieval, similarity = eval_results["retrieval"], eval_results.get("similarity")
    with _figure((12, 4.8)) as figure:
        recall_ax, gap_ax = figure.subplots(1, 2, width_ratios=[3, 2])
        ks = ["R@1", "R@5", "R@10"]
        x = np.arange(len(ks))
        for offset, direction, color in ((-0.2, "image_to_text", "C0"),
                                         (0.2, "text_to_image", "C1")):
            bars = recall_ax.bar(x + offset, [retrieval[direction][k] for k in ks], 0.4,
                                 color=color, label=direction.replace("_to_", " → "))
            recall_ax.bar_label(bars, fmt="%.1f", padding=2, fontsize=9)
        counts = f"{eval_results.get('num_images', '?')} images, " \
                 f"{eval_results.get('num_texts', '?')} captions"
        recall_ax.set(xticks=x, xticklabels=ks, ylim=(0, 110), ylabel="recall (%)",
                      title=f"Retrieval recall ({counts})")
        recall_ax.legend(loc="upper left")
        recall_ax.grid(axis="y", alpha=0.3)
        if similarity:
            _plot_similarity_gap(gap_ax, similarity)
        else:
            _no_data(gap_ax, "no similarity statistics")
        title = f"Model metrics: rsum {retrieval.get('rsum', float('nan')):.1f}"
        if "zeroshot" in eval_results:
            title += f", zero-shot top-1 {eval_results['zeroshot'].get('top1', float('nan')):.1f}%"
        figure.suptitle(title, fontsize=14, fontweight="bold")
    return figure


def plot_wise_ft(results: list):
    """WiSE-FT's trade-off (wise_ft.py's results): the fine-tuning task's mean recall against the
    zero-shot accuracy kept, one point per alpha (0 = pretrained, 1 = fine-tuned), joined in
    order. A curve bulging above the straight line between its ends is the point of WiSE-FT."""
    alphas = [r["alpha"] for r in results]
    zeroshot = [r["zeroshot"]["top1"] for r in results]
    task = [r["retrieval"]["mean_recall"] for r in results]
    with _figure((7, 5.5)) as figure:
        ax = figure.subplots()
        ax.plot(zeroshot, task, "-o", color="C0", label="weight-space mixes")
        ax.plot([zeroshot[0], zeroshot[-1]], [task[0], task[-1]], ":", color="gray",
                label="the straight line between the ends")
        for alpha, x, y in zip(alphas, zeroshot, task):
            ax.annotate(f"α={alpha:g}", (x, y), textcoords="offset points", xytext=(6, 6), fontsize=9)
        ax.set(xlabel="zero-shot top-1 (%): what is kept", ylabel="task mean recall (%): what is gained",
               title="WiSE-FT: interpolating pretrained (α=0) and fine-tuned (α=1) weights")
        ax.legend(loc="best", fontsize=9)
        ax.grid(alpha=0.3)
    return figure


def _plot_similarity_gap(ax, similarity):
    positive, negative = similarity["positive_mean"], similarity["negative_mean"]
    bars = ax.bar(["matching pairs", "non-matching pairs"], [positive, negative], 0.55,
                  color=[CORRECT, "gray"])
    ax.bar_label(bars, fmt="%.3f", padding=2)
    ax.annotate("", xy=(0.5, positive), xytext=(0.5, negative),
                arrowprops={"arrowstyle": "<->", "color": "black"})
    low, high = min(0.0, positive, negative), max(0.0, positive, negative)
    margin = 0.15 * max(high - low, 0.1)
    gap = similarity.get("gap", positive - negative)
    ax.text(0.5, max(positive, negative) + margin / 3, f"gap {gap:.3f}", ha="center")
    ax.set(ylim=(low - margin, high + margin), ylabel="mean cosine similarity",
           title="Similarity of image-caption pairs")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.grid(axis="y", alpha=0.3)


def plot_zeroshot_confusion(zeroshot: dict):
    """Zero-shot confusion matrix (rows = true class) normalised so that each row sums to 1.

    `zeroshot` is the `zeroshot` part of evaluation.py's JSON: `classnames`, `confusion`, `top1`.
    """
    names = list(zeroshot["classnames"])
    counts = np.asarray(zeroshot["confusion"], dtype=float)
    if counts.shape != (len(names), len(names)):
        raise ValueError(f"zeroshot: confusion has shape {counts.shape} but there are "
                         f"{len(names)} classnames; it must be square, one row per class")
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = min(16, 3 + 0.45 * len(names))
    with _figure((side + 1.5, side), texts=names) as figure:
        ax = figure.subplots()
        image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        figure.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
        ticks = np.arange(len(names))
        ax.set_xticks(ticks, names, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticks(ticks, names)
        ax.set(xlabel="predicted class", ylabel="true class")
        if len(names) <= 20:
            for (row, col), rate in np.ndenumerate(rates):
                if rate == 0:
                    continue  # blank, not "0.00": the mistakes that do happen stand out
                ax.text(col, row, f"{rate:.2f}", ha="center", va="center", fontsize=10,
                        color="white" if rate > 0.5 else "black")
        top1 = f" (top-1 {zeroshot['top1']:.1f}%)" if zeroshot.get("top1") is not None else ""
        ax.set_title(f"Zero-shot classification{top1}")
    return figure


# ---------------------------------------------------------------------------------------------
# Embedding plots (inputs: evaluation.py --save_embeddings DIR, and the data set for thumbnails)

def _normalise(features) -> np.ndarray:
    features = np.asarray(features, dtype=np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def plot_similarity_heatmap(images, captions, image_features, text_features):
    """Cosine similarity of N images (columns, thumbnails on top) and N captions (rows).

    Caption i belongs to image i, so a model that learned the pairing lights up the diagonal.
    """
    n = len(images)
    if not n == len(captions) == len(image_features) == len(text_features):
        raise ValueError(f"need one caption and one feature row per image; got {n} images, "
                         f"{len(captions)} captions, {len(image_features)} image and "
                         f"{len(text_features)} text features")

    similarity = _normalise(text_features) @ _normalise(image_features).T  # (captions, images)
    with _figure((3.8 + 1.05 * n, 1.8 + 0.95 * n), texts=captions) as figure:
        ax = figure.subplots()
        heat = ax.imshow(similarity, cmap="viridis", extent=(-0.5, n - 0.5, n - 0.5, -0.5))
        # Thumbnails sit in a row above the matrix, in its own coordinates, so each one lines
        # up with its column whatever the figure size.
        for col, image in enumerate(images):
            ax.imshow(thumbnail(image), extent=(col - 0.45, col + 0.45, -0.6, -1.5))
        low, high = similarity.min(), similarity.max()
        for (row, col), value in np.ndenumerate(similarity):
            bright = (value - low) / max(high - low, 1e-6) > 0.6
            ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=9,
                    color="black" if bright else "white", fontweight="bold" if row == col else None)
        for i in range(n):  # frame the matching pairs
            ax.add_patch(Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="white",
                                   linewidth=2.5))
        ax.set_xlim(-0.5, n - 0.5)
        ax.set_ylim(n - 0.5, -1.55)
        ax.set_yticks(range(n), [_wrap(c, 34) for c in captions], fontsize=9)
        ax.set_xticks(range(n), [f"image {i + 1}" for i in range(n)], fontsize=9)
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
        figure.colorbar(heat, ax=ax, shrink=0.7, label="cosine similarity")
        ax.set_title(f"Similarity of {n} images and their captions (diagonal = matching pairs)")
    return figure


def _spread(count: int, total: int) -> np.ndarray:
    """`count` indices spread evenly over range(total), so examples are not all from one end."""
    return np.unique(np.linspace(0, total - 1, min(count, total)).round().astype(int))


def plot_retrieval_examples(images, captions, image_features, text_features, caption_image,
                            top_k: int = 5, num_queries: int = 3):
    """Text queries with their top-k images, and image queries with their top-k captions.

    `images[i]` is image i (a list, or anything indexable that loads lazily); caption j belongs to
    image `caption_image[j]`. Right answers are framed and ticked in green, wrong ones in red.
    """
    image_features, text_features = _normalise(image_features), _normalise(text_features)
    caption_image = np.asarray(caption_image)
    top_k = min(top_k, len(image_features), len(text_features))
    text_queries = _spread(num_queries, len(text_features))
    image_queries = _spread(num_queries, len(image_features))
    texts = [captions[j] for j in text_queries]
    with _figure((3.2 + 1.75 * top_k, 2.1 * (len(text_queries) + len(image_queries)) + 1),
                     texts=texts) as figure:
        text_part, image_part = figure.subfigures(
            2, 1, height_ratios=[len(text_queries), len(image_queries)], hspace=0.04)
        text_part.suptitle("Text → image: top matches for a caption", fontweight="bold")
        grid = text_part.add_gridspec(len(text_queries), top_k + 1, width_ratios=[2] + [1] * top_k)
        for row, query in enumerate(text_queries):
            scores = image_features @ text_features[query]
            _draw_text_query(text_part, grid, row, captions[query], scores, caption_image[query],
                             images, top_k)
        image_part.suptitle("Image → text: top captions for an image", fontweight="bold")
        grid = image_part.add_gridspec(len(image_queries), 2, width_ratios=[1, top_k + 1])
        for row, query in enumerate(image_queries):
            scores = text_features @ image_features[query]
            _draw_image_query(image_part, grid, row, images[query], scores,
                              caption_image == query, captions, top_k)
    return figure


def _draw_text_query(part, grid, row, caption, scores, answer, images, top_k):
    ax = part.add_subplot(grid[row, 0])
    ax.axis("off")
    ax.text(0, 0.5, f"query:\n“{_wrap(caption, 30, 4)}”", va="center", fontsize=10)
    for rank, image_id in enumerate(np.argsort(-scores, kind="stable")[:top_k]):
        ax = part.add_subplot(grid[row, rank + 1])
        ax.imshow(thumbnail(images[image_id]))
        ax.set(xticks=[], yticks=[])
        correct = image_id == answer
        color = CORRECT if correct else WRONG
        for spine in ax.spines.values():
            spine.set(edgecolor=color, linewidth=4 if correct else 1.5)
        ax.set_title(f"{'✓' if correct else '✗'} #{rank + 1}  {scores[image_id]:.2f}",
                     color=color, fontsize=9)


def _draw_image_query(part, grid, row, image, scores, is_answer, captions, top_k):
    ax = part.add_subplot(grid[row, 0])
    ax.imshow(thumbnail(image))
    ax.set(xticks=[], yticks=[])
    ax.set_title("query image", fontsize=9, color="dimgray")
    ax = part.add_subplot(grid[row, 1])
    ax.axis("off")
    for rank, text_id in enumerate(np.argsort(-scores, kind="stable")[:top_k]):
        correct = bool(is_answer[text_id])
        line = f"{'✓' if correct else '✗'} #{rank + 1}  {scores[text_id]:.2f}   " \
               f"{_wrap(captions[text_id], 70, 1)}"
        ax.text(0, 1 - (rank + 0.5) / top_k, line, va="center", fontsize=10,
                color=CORRECT if correct else WRONG, fontweight="bold" if correct else None)


def project_2d(features, method: str = "pca", seed: int = 0):
    """Rows of `features` in 2-D, and the share of variance each PCA axis keeps (None for t-SNE).

    PCA is exact and needs only numpy. t-SNE keeps neighbourhoods instead of distances and needs
    scikit-learn, which this project does not install.
    """
    features = np.asarray(features, dtype=np.float64)
    if method == "tsne":
        try:
            from sklearn.manifold import TSNE
        except ImportError:
            raise ImportError("t-SNE needs scikit-learn, which is not installed "
                              "(pip install scikit-learn), or use method='pca'") from None
        perplexity = min(30.0, (len(features) - 1) / 3)
        return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
            features), None
    if method != "pca":
        raise ValueError(f"unknown projection {method!r}; use 'pca' or 'tsne'")
    centred = features - features.mean(axis=0)
    _, singular, axes = np.linalg.svd(centred, full_matrices=False)
    return centred @ axes[:2].T, (singular[:2] ** 2) / max((singular ** 2).sum(), 1e-12)


def plot_embedding_space(image_features, text_features, caption_image, method: str = "pca",
                         max_images: int = 60):
    """Images (circles) and captions (triangles) in one 2-D projection, each caption joined to
    its image by a line. Up to `max_images` images (spread over the set) with all their captions.

    CLIP models keep a "modality gap": all images sit in one cone of the shared space and all
    captions in another, so a plain projection shows two clouds and nothing else. Training only
    needs each caption closer to its own image than to the others, so we subtract each
    modality's mean (the gap, reported in the title) and look at the arrangement within it.
    """
    image_features, text_features = _normalise(image_features), _normalise(text_features)
    gap = np.linalg.norm(image_features.mean(axis=0) - text_features.mean(axis=0))
    caption_image = np.asarray(caption_image)
    chosen = _spread(max_images, len(image_features))
    keep = np.flatnonzero(np.isin(caption_image, chosen))
    points, variance = project_2d(np.concatenate([
        image_features[chosen] - image_features.mean(axis=0),
        text_features[keep] - text_features.mean(axis=0)]), method)
    image_xy, text_xy = points[:len(chosen)], points[len(chosen):]
    pair = np.searchsorted(chosen, caption_image[keep])  # row in image_xy of each caption's image
    colors = np.array([f"C{i % 10}" for i in range(len(chosen))])
    with _figure((9, 8)) as figure:

        ax = figure.subplots()
        segments = np.stack([image_xy[pair], text_xy], axis=1)
        ax.add_collection(LineCollection(segments, colors=colors[pair], alpha=0.45,
                                         linewidths=0.9, label="matching pair"))
        ax.scatter(*image_xy.T, c=colors, marker="o", s=40, edgecolors="black", linewidths=0.5,
                   label=f"image ({len(chosen)})")
        ax.scatter(*text_xy.T, c=colors[pair], marker="^", s=30, alpha=0.8,
                   label=f"caption ({len(keep)})")
        legend = ax.legend(loc="best")
        for handle in legend.legend_handles:  # grey in the legend: colour only marks pairs
            handle.set_color("gray")
        name = "t-SNE" if variance is None else "PC"
        ax.set(xlabel=f"{name} 1", ylabel=f"{name} 2")
        if variance is not None:
            ax.set(xlabel=f"PC 1 ({variance[0]:.0%} of variance)",
                   ylabel=f"PC 2 ({variance[1]:.0%} of variance)")
        ax.set_title(f"Embedding space ({'PCA' if variance is not None else 't-SNE'}) with each "
                     f"modality centred (modality gap {gap:.2f} removed)")
        ax.grid(alpha=0.3)
    return figure


# ---------------------------------------------------------------------------------------------
# Where the model looks (input: a checkpoint of a plain ViT, and images with captions)

def relevance_maps(checkpoint, images, captions) -> list:
    """The relevance map of each image for its caption (minimal_clip.relevance_map), computed by
    the written-out model of minimal_clip.py holding the checkpoint's weights."""
    setup, _ = clip_model.model_from_checkpoint(checkpoint)
    try:
        model = minimal_clip.from_open_clip(setup.model.state_dict(), setup.model_config)
    except ValueError as error:
        raise ModelError(f"{checkpoint}: {error}") from None
    prepare = data_loader.image_transform(setup.preprocess_cfg)
    return [minimal_clip.relevance_map(model, prepare(image), tokens).numpy()
            for image, tokens in zip(images, setup.tokenizer(list(captions)))]


def plot_relevance_maps(images, captions, maps):
    """Each image above the same image overlaid with its relevance map for its caption: the
    patches that made the image's embedding match the caption's (Chefer et al. 2021)."""
    n = len(images)
    with _figure((2.3 * n, 5.4), texts=captions) as figure:
        axes = figure.subplots(2, n, squeeze=False)
        for col, (image, caption, relevance) in enumerate(zip(images, captions, maps)):
            picture = np.asarray(image.convert("RGB"))
            height, width = picture.shape[:2]
            axes[0, col].imshow(picture)
            axes[0, col].set_title(_wrap(caption, 26, 4), fontsize=9)
            axes[1, col].imshow(picture)
            axes[1, col].imshow(relevance, cmap="inferno", alpha=0.6, interpolation="bilinear",
                                extent=(0, width, height, 0))
            for ax in axes[:, col]:
                ax.axis("off")
        figure.suptitle("Where the model looks: relevance of each patch to the caption",
                        fontweight="bold")
    return figure


# ---------------------------------------------------------------------------------------------
# Captions a captioner wrote (input: the `captioning` part of evaluation.py's JSON, and the images)

def plot_captions(images, generated, references, columns: int = 4):
    """Images in a grid, each with the caption the model wrote for it above (bold) and the
    image's own captions, the references it was scored against, below (grey)."""
    n = len(images)
    if not n == len(generated) == len(references):
        raise ValueError(f"need one generated caption and one list of references per image; got {n} "
                         f"images, {len(generated)} captions and {len(references)} lists of references")
    columns = min(columns, n)
    rows = -(-n // columns)
    texts = [*generated, *(caption for captions in references for caption in captions)]
    with _figure((3.1 * columns, 5.0 * rows), texts=texts) as figure:
        axes = figure.subplots(rows, columns, squeeze=False)
        for ax, image, caption, refs in zip(axes.flat, images, generated, references):
            ax.imshow(thumbnail(image))
            ax.set(xticks=[], yticks=[])
            ax.set_title(_wrap(f"“{caption}”", 30, 3), fontsize=10)
            shown = [f"· {_wrap(ref, 40, 2)}" for ref in refs[:3]]
            more = [f"  (and {len(refs) - 3} more)"] if len(refs) > 3 else []
            ax.set_xlabel("\n".join(["references:", *shown, *more]), fontsize=8, color="dimgray",
                          loc="left", linespacing=1.3)
        for ax in axes.flat[n:]:
            ax.axis("off")
        figure.suptitle("Captions the model wrote (above each image) and the image's own (below)",
                        fontweight="bold")
    return figure


# ---------------------------------------------------------------------------------------------
# Command line

def _evaluated_data(record: dict, data, where: str):
    """The CaptionIndex of the data set evaluation.py read (`data`, or the one `record` names),
    read as it was read (CSV columns, Chinese-CLIP split)."""
    data = data or record.get("data")
    if not data:
        raise MissingInputError(f"no data set for thumbnails: {where} has no 'data'; pass --data PATH")
    read = {k: record[k] for k in ("image_column", "caption_column", "split") if k in record}
    return data_loader.load_caption_index(data, **read)


def _load_images(saved: dict, data):
    """The data set the embeddings came from, as a lazily loading image sequence."""
    index = _evaluated_data(saved["meta"], data, "meta.json")
    names = saved["meta"].get("image_names")
    if saved["meta"].get("skipped") and names:   # evaluation left unreadable images out
        position = {index.image_name(i): i for i in range(index.num_images)}
        if all(name in position for name in names):
            index = index.subset([position[name] for name in names])
    if index.num_images != len(saved["image_features"]) or (
            names and [Path(n).name for n in names] !=
            [Path(index.image_name(i)).name for i in range(index.num_images)]):
        raise ValueError(f"data {data} ({index.num_images} images) is not the set the embeddings "
                         f"were made from ({len(saved['image_features'])} images); pass --data "
                         "with that set")
    return _LazyImages(index)


class _LazyImages:
    """images[i] loads image i of a CaptionIndex only when a plot shows it."""

    def __init__(self, index):
        self.index = index

    def __len__(self):
        return self.index.num_images

    def __getitem__(self, i):
        return self.index.load_image(int(i))


def _heatmap_inputs(saved, images, count):
    """`count` images spread over the set, each with its first caption."""
    with_captions, first = np.unique(saved["caption_image"], return_index=True)
    picked = _spread(count, len(with_captions))
    chosen, texts = with_captions[picked], first[picked]
    return ([images[i] for i in chosen], [saved["meta"]["captions"][j] for j in texts],
            saved["image_features"][chosen], saved["text_features"][texts])


def _caption_inputs(eval_results, data, count):
    """`count` of the images evaluation.py captioned, spread over them: the images, the
    captions written and the references of each."""
    rows = eval_results["captioning"]["captions"]
    rows = [rows[i] for i in _spread(count, len(rows))]
    index = _evaluated_data(eval_results, data, "the evaluation JSON")
    position = {index.image_name(i): i for i in range(index.num_images)}
    missing = [row["image"] for row in rows if row["image"] not in position]
    if missing:
        raise MissingInputError(f"image {missing[0]}, captioned by evaluation.py, is not in the data "
                                f"{data or eval_results['data']}; pass --data with the set it captioned")
    return ([index.load_image(position[row["image"]]) for row in rows], [row["generated"] for row in rows],
            [row["references"] for row in rows])


def _relevance_inputs(saved, images, checkpoint, count):
    """`count` images spread over the set with their first captions, and their relevance maps."""
    checkpoint = checkpoint or saved["meta"].get("checkpoint")
    if not checkpoint or not Path(checkpoint).is_file():
        raise MissingInputError(f"no checkpoint for the relevance maps ({checkpoint or 'none recorded'}); "
                           "pass --checkpoint FILE")
    images, captions, _, _ = _heatmap_inputs(saved, images, count)
    return images, captions, relevance_maps(checkpoint, images, captions)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--run_name", metavar="RUN",
                       help="run to plot: reads results/RUN/ and logs/RUN/, writes results/RUN/")
    where.add_argument("--results_dir", metavar="DIR", help="results folder to read and write into")
    add = parser.add_argument
    add("--logs_dir", metavar="DIR", help="TensorBoard events, read when training_results.json "
        "is absent (default: logs/RUN with --run_name)")
    add("--eval_json", metavar="FILE", help="evaluation.py --output JSON "
        "(default: RESULTS/eval_results.json)")
    add("--embeddings", metavar="DIR", help="folder written by evaluation.py --save_embeddings "
        "(default: RESULTS/embeddings)")
    add("--data", metavar="PATH", help="data set of the embeddings and of the captions (any format, "
        "shards too), for thumbnails (default: the 'data' recorded in the embeddings' meta.json "
        "and in the evaluation JSON)")
    add("--num_images", type=int, default=8, metavar="N",
        help="images in the similarity heatmap and the captions plot, half as many in the "
             "relevance maps (default: 8)")
    add("--top_k", type=int, default=5, metavar="K",
        help="matches shown per retrieval query (default: 5)")
    add("--num_queries", type=int, default=3, metavar="N",
        help="text queries and image queries shown (default: 3 of each)")
    add("--max_points", type=int, default=60, metavar="N",
        help="images, each with all its captions, in the embedding plot (default: 60)")
    add("--checkpoint", metavar="FILE", help="checkpoint of a plain ViT model, for the relevance "
        "maps (default: the 'checkpoint' recorded in the embeddings' meta.json)")
    add("--tsne", action="store_true",
        help="project embeddings with t-SNE instead of PCA (needs scikit-learn)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_folder_name(args.run_name, "--run_name")
    results_dir = Path(args.results_dir or Path(SETTINGS["results_dir"].default) / args.run_name)
    logs_dir = args.logs_dir or (Path(SETTINGS["log_dir"].default) / args.run_name if args.run_name else None)
    eval_path = Path(args.eval_json or results_dir / "eval_results.json")

    @functools.cache
    def eval_results():
        if not eval_path.is_file():
            raise MissingInputError(f"no evaluation JSON {eval_path} "
                               "(write it with evaluation.py --output)")
        return _read_json(eval_path)

    def evaluated(part, flag):
        """The evaluation JSON, when it has `part` (evaluation.py writes it when given `flag`)."""
        if part not in eval_results():
            raise MissingInputError(f"{eval_path} has no '{part}' part (evaluation.py {flag})")
        return eval_results()

    @functools.cache
    def saved():
        try:
            return evaluation.load_embeddings(args.embeddings or results_dir / "embeddings")
        except FileNotFoundError as missing:
            raise MissingInputError(missing) from None

    images = functools.cache(lambda: _load_images(saved(), args.data))
    method = "pca"
    if args.tsne:
        try:
            import sklearn  # noqa: F401
            method = "tsne"
        except ImportError:
            print("t-SNE needs scikit-learn (pip install scikit-learn); drawing PCA instead")
    plots = {
        "training_curves.png": lambda: plot_training_curves(
            load_training_results(results_dir, logs_dir)),
        "model_metrics.png": lambda: plot_model_metrics(evaluated("retrieval", "--data")),
        "similarity_heatmap.png": lambda: plot_similarity_heatmap(
            *_heatmap_inputs(saved(), images(), args.num_images)),
        "retrieval_examples.png": lambda: plot_retrieval_examples(
            images(), saved()["meta"]["captions"], saved()["image_features"],
            saved()["text_features"], saved()["caption_image"], args.top_k, args.num_queries),
        "embedding_space.png": lambda: plot_embedding_space(
            saved()["image_features"], saved()["text_features"], saved()["caption_image"],
            method, args.max_points),
        "zeroshot_confusion.png": lambda: plot_zeroshot_confusion(
            evaluated("zeroshot", "--zeroshot_dir")["zeroshot"]),
        "relevance_maps.png": lambda: plot_relevance_maps(*_relevance_inputs(
            saved(), images(), args.checkpoint, args.num_images // 2)),
        "captions.png": lambda: plot_captions(*_caption_inputs(
            evaluated("captioning", "--data with a captioner (CoCa)"), args.data, args.num_images)),
    }
    failures = 0
    for name, draw in plots.items():
        try:
            print(f"wrote {save_figure(draw(), results_dir / name)}")
        except UserError as reason:   # an input absent or unfit: that plot alone is skipped
            print(f"skipped {name}: {reason}")
        except Exception as error:  # one broken input must not cost the user the other plots
            print(f"failed {name}: {type(error).__name__}: {error}")
            failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(run_script(main, "visualization.py"))
