"""Evaluate a CLIP model: image-text retrieval, similarity analysis, zero-shot classification, and
the captions a captioning model writes (BLEU, CIDEr-D: caption_metrics).

    python evaluation.py --checkpoint model-checkpoint/<run>/best.pt --data data/sample
    python evaluation.py --model_name ViT-B-32 --pretrained openai --data captions.csv
    python evaluation.py --embeddings results/<run>/embeddings        (no model needed)

Retrieval, measured the way Flickr30K and COCO papers measure it. Each image has several
captions (five in both sets). Every caption is a query over all images (text -> image) and every
image is a query over all captions (image -> text); candidates are ranked by cosine similarity.
The rank of a query is the 1-based position of its first correct item:
  - text -> image: one item is correct, the caption's own image.
  - image -> text: every caption of the image is correct. Each is an equally valid description,
    so retrieving any one of them is a success; the rank is that of the best-placed one.
R@K is the percentage of queries with rank <= K. Papers report R@1, R@5 and R@10 both ways, their
sum (rsum) and their mean (mean_recall, the "MR" of Chinese-CLIP).

Ties are broken by index, lower first, so every run gives the same ranks:
    rank = 1 + #(score > s) + #(score == s and index < correct index)
They do occur: duplicate captions ("a dog.") have identical vectors. Features must be finite
(require_finite): no comparison with NaN is true, so a NaN score has nothing ahead of it, and
all-NaN features would score a perfect rsum of 600.

Scale. The N x M score matrix is never built (100k images x 500k captions would be 200 GB in
float32). A rank needs only a count of the items that score ahead of the correct one, so scores
are computed one tile (chunk_size images x chunk_size captions) at a time; each tile adds to the
counts of both directions and is dropped. Memory is O((N + M) * D + chunk_size^2).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from open_clip import zero_shot_metadata
from tqdm import tqdm

import clip_model
import data_loader
import files
from errors import DataError, MissingInputError, report_skipped, run_script, skipped_summary

RECALL_AT = (1, 5, 10)
EMBEDDING_FILES = ("image_features.npy", "text_features.npy", "caption_image.npy", "meta.json")

# Zero-shot prompts. A sentence describes a class better than its bare name (training captions are
# sentences), and the mean over several sentences ("prompt ensembling") better still: CLIP paper,
# section 3.1.4. `{}` is where the class name goes.
TEMPLATES = {
    "en": ["a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a photo of the {}.",
           "a close-up photo of a {}.", "a photo of a small {}.", "a photo of a large {}.",
           "a drawing of a {}."],
    "zh": ["{}的照片。", "一张{}的照片。", "一张包含{}的图片。", "这是一张{}的照片。", "{}的图片。",
           "一张小{}的照片。", "一张大{}的照片。", "一幅{}的画。"],
}

# open_clip's own prompt sets and class names (open_clip/zero_shot_metadata.py), used as they ship:
# "openai" is the 80 ImageNet prompts of the CLIP paper, "simple" the 7 of them that open_clip found
# to do as well; "imagenet" is the 1000 ImageNet class names in the order of the class index.
OPEN_CLIP_TEMPLATES = {"openai": "OPENAI_IMAGENET_TEMPLATES", "simple": "SIMPLE_IMAGENET_TEMPLATES"}
OPEN_CLIP_CLASSNAMES = {"imagenet": "IMAGENET_CLASSNAMES"}

# Scores are computed exactly. Each feature is normalised and rounded to a multiple of 2^-24 (the
# resolution of float32 near 1), held in float64. A product of two such numbers is a multiple of
# 2^-48, and no partial sum of a dot product of unit vectors exceeds 1 in size (Cauchy-Schwarz),
# so every partial sum fits in float64's 53-bit mantissa and no addition ever rounds. A score is
# then the same bits whatever order the matrix multiply adds in (any chunk size, BLAS or device):
# chunked equals unchunked, identical vectors tie exactly, and the score of a correct pair taken
# from a row-wise dot product equals its entry in the matrix. On this CPU float64 costs 2x float32.
# (Exact for the vectors given: two vectors that differ only in length normalise to the same
# direction, but its rounding may differ by one step of the grid, enough to break a tie.)
GRID = 2.0 ** 24


def require_finite(features, what):
    """features as a tensor, after checking that every value is finite; DataError naming `what`
    and the first row that is not. Wherever features are scored or compared, NaN would pass
    unseen: every comparison with it is false, so it ranks ahead of nothing (perfect recall) and
    passes a check such as `cosine < minimum` (export.py)."""
    x = torch.as_tensor(features)
    finite = torch.isfinite(x).flatten(1).all(dim=1) if x.ndim > 1 else torch.isfinite(x).reshape(-1)
    if not bool(finite.all()):
        rows = torch.nonzero(~finite)[:, 0]
        raise DataError(f"{what}: {len(rows)} of {len(finite)} rows hold NaN or infinite values (the "
                        f"first: row {int(rows[0])}), which no ranking or comparison can use; a model "
                        f"whose weights hold NaN or inf gives them: use a checkpoint from before its "
                        f"training diverged")
    return x


def _unit_rows(features, what):
    """Rows normalised and rounded to the exact grid, float64 [n, D] (a new tensor)."""
    x = require_finite(features, what)
    if x.device.type == "mps":  # MPS has no float64
        x = x.cpu()
    x = x.to(torch.float64, copy=True)
    x.div_(x.norm(dim=1, keepdim=True).clamp_min_(1e-12))
    return x.mul_(GRID).round_().div_(GRID)


def _caption_owner(image_features, text_features, caption_image):
    """caption_image as a LongTensor [M], after checking that the inputs describe one data set."""
    image_shape, text_shape = tuple(image_features.shape), tuple(text_features.shape)
    owner = torch.as_tensor(caption_image, dtype=torch.long)
    n, m = image_shape[0], text_shape[0]
    if len(image_shape) != 2 or len(text_shape) != 2 or image_shape[1] != text_shape[1] \
            or n == 0 or m == 0 or owner.shape != (m,):
        raise DataError(f"image features {image_shape}, text features {text_shape} and caption_image "
                         f"{tuple(owner.shape)}: expected [N, D], [M, D] and [M] with N, M > 0")
    if owner.min() < 0 or owner.max() >= n:
        bad = int(owner[(owner < 0) | (owner >= n)][0])
        raise DataError(f"caption_image holds image {bad}, but images are numbered 0..{n - 1}")
    counts = torch.bincount(owner, minlength=n)
    if (counts == 0).any():
        raise DataError(f"image {int(torch.nonzero(counts == 0)[0])} has no caption; image->text "
                         f"retrieval needs one or more per image (evaluate index.subset(...) of "
                         f"the captioned images)")
    return owner


def _positive_scores(images, texts, owner, chunk_size):
    """Score of every caption with its own image, [M], a chunk of captions at a time."""
    # Written into one preallocated tensor: small results kept between the chunk's large
    # temporaries would fragment the heap and grow the process by a chunk's size per chunk.
    positive = torch.empty(len(texts), dtype=texts.dtype, device=texts.device)
    for j in range(0, len(texts), chunk_size):
        positive[j:j + chunk_size] = (texts[j:j + chunk_size] * images[owner[j:j + chunk_size]]).sum(1)
    return positive


def _count_ahead(scores, correct_score, ids, correct_id, dim):
    """How many items along `dim` rank ahead of the correct one (higher score, or equal score and
    lower index). Shapes broadcast against scores."""
    return ((scores > correct_score) | ((scores == correct_score) & (ids < correct_id))).sum(dim)


def _rank_summary(ranks) -> dict:
    summary = {f"R@{k}": 100.0 * int((ranks <= k).sum()) / len(ranks) for k in RECALL_AT}
    summary["mean_rank"] = float(ranks.double().mean())
    summary["median_rank"] = float(np.median(ranks.cpu().numpy()))  # mean of the middle two if even
    return summary


def retrieval_metrics(image_features, text_features, caption_image, chunk_size=1024) -> dict:
    """Recall@1/5/10 (percent), mean and median rank in both directions, rsum and mean_recall.

    image_features [N, D] and text_features [M, D] (numpy or torch; normalised here, so any scale
    will do); caption j describes image caption_image[j]. Captions need not be grouped by image.
    """
    owner = _caption_owner(image_features, text_features, caption_image)
    images, texts = _unit_rows(image_features, "image features"), _unit_rows(text_features, "text features")
    owner = owner.to(images.device)
    num_images, num_texts = len(images), len(texts)
    image_ids = torch.arange(num_images, device=images.device)
    text_ids = torch.arange(num_texts, device=images.device)
    positive = _positive_scores(images, texts, owner, chunk_size)  # [M]

    # Image -> text. In ranking order the first correct caption of image i is its best-scoring
    # caption (the lowest-numbered among equals): no other caption of i can rank ahead of it, so
    # its rank is 1 + the number of captions of any image ahead of it.
    best = torch.full((num_images,), -math.inf, dtype=torch.float64, device=images.device)
    best.scatter_reduce_(0, owner, positive, "amax")
    is_best = positive == best[owner]
    best_text = torch.full((num_images,), num_texts, device=images.device)
    best_text.scatter_reduce_(0, owner[is_best], text_ids[is_best], "amin")

    texts_ahead = torch.zeros(num_texts, dtype=torch.long, device=images.device)
    images_ahead = torch.zeros(num_images, dtype=torch.long, device=images.device)
    for i in range(0, num_images, chunk_size):
        rows = slice(i, i + chunk_size)
        for j in range(0, num_texts, chunk_size):
            cols = slice(j, j + chunk_size)
            scores = images[rows] @ texts[cols].T  # (images of the tile, captions of the tile)
            # Down each column: images of this tile ahead of the caption's own image.
            texts_ahead[cols] += _count_ahead(scores, positive[cols], image_ids[rows, None],
                                              owner[cols], dim=0)
            # Along each row: captions of this tile ahead of the image's best caption.
            images_ahead[rows] += _count_ahead(scores, best[rows, None], text_ids[cols],
                                               best_text[rows, None], dim=1)

    result = {"image_to_text": _rank_summary(images_ahead + 1),
              "text_to_image": _rank_summary(texts_ahead + 1)}
    recalls = [result[direction][f"R@{k}"] for direction in ("image_to_text", "text_to_image")
               for k in RECALL_AT]
    result["rsum"] = sum(recalls)
    result["mean_recall"] = result["rsum"] / len(recalls)
    return result


def standard_error(metrics, name, num_images, num_captions) -> float:
    """The sampling noise of a validation metric (settings.BEST_METRICS), in its own units, from
    the number of queries behind it: a recall p (percent) over n queries is a binomial proportion,
    SE = sqrt(p (100 - p) / n). The R@1/5/10 of one direction count nested events of the same
    queries and move together, so their errors add; the two directions ask different queries
    (images, captions) and add in quadrature. rsum sums the six recalls, mean_recall is their
    mean. Zero-shot metrics are not counted here: 0."""
    if name.startswith("zeroshot/"):
        return 0.0
    retrieval = metrics["retrieval"]

    def error(direction, k):
        p, n = retrieval[direction][f"R@{k}"], num_images if direction == "image_to_text" else num_captions
        return math.sqrt(p * (100 - p) / max(1, n))
    if "/" in name:
        direction, k = name.split("/")
        return error(direction, int(k[2:]))
    rsum = math.sqrt(sum(sum(error(direction, k) for k in RECALL_AT) ** 2
                         for direction in ("image_to_text", "text_to_image")))
    return rsum if name == "rsum" else rsum / (2 * len(RECALL_AT))


def similarity_stats(image_features, text_features, caption_image, chunk_size=1024) -> dict:
    """Mean cosine similarity of matching pairs (positive_mean, over captions), of all
    non-matching image-caption pairs (negative_mean), and the gap between them.

    Recall only says whether matches come first; the gap says by how much they stand out.
    negative_mean is nan when there is a single image (no non-matching pair exists).
    """
    owner = _caption_owner(image_features, text_features, caption_image)
    images, texts = _unit_rows(image_features, "image features"), _unit_rows(text_features, "text features")
    positive_sum = float(_positive_scores(images, texts, owner.to(images.device), chunk_size).sum())
    # The sum over all N*M pairs needs no N x M matrix: the dot product is bilinear, so
    #     sum_i sum_j x_i . y_j = (sum_i x_i) . (sum_j y_j),
    # O((N + M) * D). The M matching pairs are among them; taking their sum away leaves the
    # N*M - M non-matching ones.
    all_pairs_sum = float(images.sum(0) @ texts.sum(0))
    num_negative = len(images) * len(texts) - len(texts)
    positive_mean = positive_sum / len(texts)
    negative_mean = (all_pairs_sum - positive_sum) / num_negative if num_negative else math.nan
    return {"positive_mean": positive_mean, "negative_mean": negative_mean,
            "gap": positive_mean - negative_mean}


def nearest_neighbours(features, k, chunk_size=1024, pool_size=65536, seed=0):
    """[N, k] the k most similar items of each of N feature rows (cosine, nearest first; the item
    itself left out), found within pools of at most pool_size items.

    Memory stays linear in N: a tile of chunk_size x pool_size scores at a time. Time is
    N x pool_size dot products: with N above pool_size the items are split at random into pools
    and each looks for neighbours in its own (an approximation that keeps a million items
    tractable; below pool_size the search is exact).
    """
    x = torch.nn.functional.normalize(torch.as_tensor(features, dtype=torch.float32), dim=1)
    n = len(x)
    if n <= k:
        raise ValueError(f"{n} items have fewer than {k} neighbours each")
    neighbours = torch.empty(n, k, dtype=torch.long)
    pools = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tensor_split(
        math.ceil(n / pool_size)) if n > pool_size else [torch.arange(n)]   # equal pools, all > k
    for pool in pools:
        members = x[pool]
        for start in range(0, len(pool), chunk_size):
            rows = pool[start:start + chunk_size]
            scores = x[rows] @ members.T
            scores[torch.arange(len(rows)), torch.arange(start, start + len(rows))] = -math.inf
            neighbours[rows] = pool[scores.topk(k, dim=1).indices]
    return neighbours


def flatten_metrics(metrics, prefix="val"):
    """Metric names as TensorBoard tags: {'retrieval': {'image_to_text': {'R@1': ..}}} ->
    {'val/image_to_text/R@1': ..}; other parts keep their name ('val/similarity/gap')."""
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}/{key}" if key != "retrieval" else prefix
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = value
    return flat


def recall_summary(metrics) -> str:
    """One line of the recalls both ways: 'image->text R@1/5/10 a/b/c, text->image d/e/f'."""
    r = metrics["retrieval"]
    return ", ".join(f"{label} R@1/5/10 " + "/".join(f"{r[key][f'R@{k}']:.1f}" for k in RECALL_AT)
                     for key, label in (("image_to_text", "image->text"), ("text_to_image", "text->image")))


# ----------------------------------------------------------------------------- zero-shot

def zeroshot_classifier(prompt_features):
    """Class vectors [C, D] from the embeddings of each class's prompts [C, T, D]:
    w_c = normalise(mean_t normalise(e_ct)), one prompt per template t.

    This is how CLIP classifies without training a classifier: the text tower writes the weights
    of a linear classifier from class names, and an image goes to the class whose vector is most
    similar to it.
    """
    prompts = F.normalize(torch.as_tensor(prompt_features), dim=-1)
    return F.normalize(prompts.mean(dim=1), dim=-1)


def zeroshot_metrics(image_features, labels, classifier, classnames, chunk_size=1024) -> dict:
    """Top-1 and top-5 accuracy (percent), per-class top-1 accuracy (None for a class without
    images), their mean over the classes with images (mean_per_class_recall, "balanced
    accuracy": top-1 counts every image once, so a large class outweighs a small one; this counts
    every class once) and the confusion matrix (rows: true class, columns: predicted class).

    Zero-shot classification is retrieval with the image as query over the C class vectors: the
    prediction is the best-scoring class, and the true class's rank (ties: lower index first, as
    in retrieval) decides the top-k hits.
    """
    images, weights = _unit_rows(image_features, "image features"), _unit_rows(classifier, "class vectors")
    labels = torch.as_tensor(labels, dtype=torch.long, device=images.device)
    num_classes = len(weights)
    if len(classnames) != num_classes or labels.shape != (len(images),) or len(images) == 0:
        raise ValueError(f"{len(images)} images with {tuple(labels.shape)} labels, {num_classes} "
                         f"class vectors and {len(classnames)} class names do not fit together")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be class numbers 0..{num_classes - 1}")
    class_ids = torch.arange(num_classes, device=images.device)
    ranks, predicted = torch.empty_like(labels), torch.empty_like(labels)
    for i in range(0, len(images), chunk_size):
        scores = images[i:i + chunk_size] @ weights.T  # (images, classes)
        true = labels[i:i + chunk_size, None]
        ranks[i:i + chunk_size] = 1 + _count_ahead(scores, scores.gather(1, true), class_ids, true, dim=1)
        predicted[i:i + chunk_size] = scores.argmax(dim=1)  # first of equal maxima: the rank-1 class
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=images.device)
    confusion.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
    counts, correct = confusion.sum(dim=1).tolist(), confusion.diagonal().tolist()
    per_class = {name: 100.0 * correct[c] / counts[c] if counts[c] else None
                 for c, name in enumerate(classnames)}
    recalls = [recall for recall in per_class.values() if recall is not None]
    return {"top1": 100.0 * int((ranks <= 1).sum()) / len(ranks),
            "top5": 100.0 * int((ranks <= 5).sum()) / len(ranks),
            "mean_per_class_recall": sum(recalls) / len(recalls),
            "per_class": per_class, "classnames": list(classnames), "confusion": confusion.tolist()}


def clip_benchmark_record(zeroshot: dict, dataset: str, model: str, pretrained: str) -> dict:
    """A zero-shot result in the form of CLIP_benchmark's JSON output (its `eval` writes one per
    run; `clip_benchmark build` tables them): metrics are fractions, not percent, and acc5 is
    undefined (null) below 5 classes. `language` is that of the prompts."""
    language = "zh" if any(_has_cjk(t) for t in zeroshot["templates"]) else "en"
    return {"dataset": dataset, "model": model, "pretrained": pretrained,
            "task": "zeroshot_classification",
            "metrics": {"acc1": zeroshot["top1"] / 100,
                        "acc5": zeroshot["top5"] / 100 if len(zeroshot["classnames"]) >= 5 else None,
                        "mean_per_class_recall": zeroshot["mean_per_class_recall"] / 100},
            "language": language}


# CJK ideographs (Chinese characters): the unified block, extension A, compatibility ideographs.
CJK = "\u4e00-\u9fff\u3400-\u4dbf\uf900-\ufaff"


def _has_cjk(text: str) -> bool:
    return re.search(f"[{CJK}]", text) is not None


def _open_clip_metadata(table: dict, name: str) -> list:
    return list(getattr(zero_shot_metadata, table[name]))


def choose_templates(classnames, language="auto", templates=None) -> list[str]:
    """Prompt templates, each with `{}` where the class name goes: open_clip's set `templates`
    ("openai", "simple"), or the lines of the file `templates`, else our built-in set of the
    language ("auto" picks Chinese when a class name holds CJK characters)."""
    if templates in OPEN_CLIP_TEMPLATES:
        # open_clip keeps each template as a function of the class name: given "{}", it writes it
        return [template("{}") for template in _open_clip_metadata(OPEN_CLIP_TEMPLATES, templates)]
    if templates:
        if not os.path.isfile(templates):
            raise DataError(f"--templates {templates}: neither a file nor one of open_clip's template "
                            f"sets ({', '.join(OPEN_CLIP_TEMPLATES)})")
        with open(templates, encoding="utf-8") as f:
            lines = [(k, line.strip()) for k, line in enumerate(f, 1) if line.strip()]
        for k, line in lines:
            if "{}" not in line:
                raise DataError(f"{templates}, line {k}: template {line!r} has no '{{}}' for "
                                f"the class name (write e.g. 'a photo of a {{}}.')")
        if not lines:
            raise DataError(f"{templates}: no templates (one per line, each with '{{}}')")
        return [line for _, line in lines]
    if language == "auto":
        language = "zh" if any(_has_cjk(name) for name in classnames) else "en"
    return TEMPLATES[language]


def load_zeroshot_folder(directory, classnames=None) -> tuple[list[str], list[str], list[int]]:
    """(class names, image paths, labels) of a folder holding one folder of images per class.

    Classes are numbered in the sorted order of the folder names. The names are, one per folder in
    that same order: open_clip's list `classnames` ("imagenet": the folders of an ImageNet
    validation set, n01440764 ..., sort into the order of its class index), or the lines of the
    file `classnames`, or of DIRECTORY/classnames.txt when it exists, else the folder names.
    """
    if not os.path.isdir(directory):
        raise DataError(f"--zeroshot_dir {directory}: no such folder")
    folders = sorted(entry.name for entry in os.scandir(directory)
                     if entry.is_dir() and not entry.name.startswith("."))  # not .ipynb_checkpoints
    if not folders:
        raise DataError(f"{directory}: no class folders (expected one folder of images per class)")
    names_file = os.path.join(directory, "classnames.txt")
    source = classnames or (names_file if os.path.isfile(names_file) else None)
    classnames, published = folders, source in OPEN_CLIP_CLASSNAMES
    if published:
        classnames = [str(name) for name in _open_clip_metadata(OPEN_CLIP_CLASSNAMES, source)]
        source = f"--classnames {source} (open_clip's class names)"
    elif source:
        if not os.path.isfile(source):
            raise DataError(f"--classnames {source}: neither a file nor one of open_clip's lists of "
                            f"class names ({', '.join(OPEN_CLIP_CLASSNAMES)})")
        with open(source, encoding="utf-8") as f:
            classnames = [line.strip() for line in f if line.strip()]
    if len(classnames) != len(folders):
        raise DataError(f"{source}: {len(classnames)} names for {len(folders)} class folders of "
                        f"{directory}; give one name per folder, in the sorted order of the "
                        f"folders ({', '.join(folders[:3])}, ...)")
    repeated = [name for name, count in Counter(classnames).items() if count > 1]
    if repeated and not published:  # (the published lists keep theirs: see _distinct)
        raise DataError(f"{directory}: class name {repeated[0]!r} is used twice; per-class results "
                        f"need distinct names (edit classnames.txt)")
    paths, labels = [], []
    for label, folder in enumerate(folders):
        files = sorted(f for f in os.listdir(os.path.join(directory, folder))
                       if f.lower().endswith(data_loader.IMAGE_EXTENSIONS))
        paths += [os.path.join(directory, folder, f) for f in files]
        labels += [label] * len(files)
    if not paths:
        raise DataError(f"{directory}: the class folders hold no images ({', '.join(data_loader.IMAGE_EXTENSIONS)})")
    return classnames, paths, labels


def encode_image_files(setup, source, batch_size=64, num_workers=0, device="cpu", precision="fp32",
                       strict=False):
    """Features [n, D] of the readable images of a CaptionIndex or a list of files, the numbers
    of those images [n] (in order), and the (number, message) of each unreadable one.

    Unreadable images are treated as training treats them: skipped and reported, or, with
    strict, a DataError naming the first one (raised here, in the main process, in one line).
    """

    transform = data_loader.image_transform(setup.preprocess_cfg)
    loader = data_loader.build_dataloader(data_loader.ImageDataset(source, transform), batch_size,
                                          num_workers=num_workers, train=False)
    kept, failed = [], []

    def readable_batches():
        for batch in loader:
            if batch["failed"] and strict:
                raise DataError(batch["failed"][0][1])
            failed.extend(batch["failed"])
            if len(batch["indices"]):
                kept.append(batch["indices"])
                yield batch["images"]
    features = clip_model.encode_images(setup.model, readable_batches(), device, precision)
    if not kept:
        raise DataError(f"no readable image among {len(failed)}; first: {failed[0][1]}")
    return features, torch.cat(kept), failed


def evaluate_zeroshot(setup, directory, batch_size=64, num_workers=0, device="cpu",
                      precision="fp32", templates=None, language="auto",
                      chunk_size=1024, classnames=None, strict=False) -> dict:
    """Zero-shot classification of the images of `directory` (see load_zeroshot_folder and
    choose_templates for `classnames` and `templates`). Unreadable images are left out and
    counted, as in retrieval."""
    classnames, paths, labels = load_zeroshot_folder(directory, classnames)
    templates = choose_templates(classnames, language, templates)
    prompts = [template.replace("{}", name) for name in classnames for template in templates]
    prompt_features = clip_model.encode_texts(setup.model, setup.tokenizer, prompts, device,
                                              batch_size, precision)
    classifier = zeroshot_classifier(prompt_features.view(len(classnames), len(templates), -1))
    image_features, kept, failed = encode_image_files(setup, paths, batch_size, num_workers, device,
                                                      precision, strict)
    metrics = zeroshot_metrics(image_features, [labels[i] for i in kept.tolist()], classifier,
                               _distinct(classnames), chunk_size)
    return {**metrics, "templates": templates,
            "skipped_images": skipped_summary([message for _, message in failed])}


def _distinct(classnames: list[str]) -> list[str]:
    """Names for per-class results, a repeated name followed by its class number. open_clip's
    ImageNet list, like the CLIP paper's, names two pairs of classes alike ("missile",
    "sunglasses"); the prompts keep the names as published, so that scores stay comparable."""
    counts = Counter(classnames)
    return [f"{name} ({c})" if counts[name] > 1 else name for c, name in enumerate(classnames)]


# ----------------------------------------------------------------------------- captioning

# Generated captions are scored as the COCO caption evaluation (pycocoevalcap) scores them, written
# out here from the papers and checked against that code's numbers (tests/test_caption_metrics.py).
# Not imported: its package is 104 MB, nearly all Java (METEOR, SPICE, the tokenizer) that these two
# scores do not use. Not copied: its BLEU file's licence forbids redistribution.
CAPTION_SCORES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr-D")
CAPTION_KEYS = tuple(f"{name}_x100" for name in CAPTION_SCORES)   # their keys in caption_metrics's dict

# COCO's tokenizer is Stanford's PTBTokenizer (Java), lower-casing, followed by dropping punctuation
# tokens. These rules give its tokens on ordinary captions: clitics split off ("isn't" -> is n't,
# "dog's" -> dog 's), acronyms keep their dots (u.s.), words keep inner hyphens, dots, slashes and
# colons (t-shirt, 3.5, black/white, 5:30), any other character is a token of its own ($ 200,
# 50 %), and . , ? ! : ; - ' ` " are dropped. Brackets stay, as PTB spells them (-lrb-): COCO's
# list of what to drop spells them in upper case, after the tokenizer has lower-cased them. Rare
# in captions, where PTB differs: abbreviations keep their dot (mr., etc.), gonna splits (gon na),
# 1,000 stays one number.
_CLITIC = re.compile(r"(?<=\w)(n't|'s|'m|'d|'re|'ve|'ll)\b")
_TOKEN = re.compile(r"n't|'(?:s|m|d|re|ve|ll)\b|(?:[a-z]\.){2,}|[^\W_]+(?:[-./:&'][^\W_]+)*|\S")
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_DROPPED = set(".,?!:;-'`\"")


def caption_tokens(caption: str) -> list[str]:
    """The words BLEU and CIDEr-D count: COCO's tokenization (see _TOKEN above), and Chinese
    character by character.

    Chinese has no spaces between words. Each CJK character is a token, as sacreBLEU's "zh"
    tokenizer does for translation: exact and needs no word segmenter (AI Challenger's caption
    benchmark segments words with jieba instead, so its scores are not comparable with these).
    Non-ASCII punctuation (，。“” — …) is dropped, as PTB drops what it turns these into in English.
    """
    text = re.sub(f"([{CJK}])", r" \1 ", caption.lower().replace("\u2019", "'"))
    text = _CLITIC.sub(r" \1", re.sub(r"\bcannot\b", "can not", text))
    tokens = [_BRACKETS.get(token, token) for token in _TOKEN.findall(text)]
    return [token for token in tokens if token not in _DROPPED
            and not (len(token) == 1 and not token.isascii() and unicodedata.category(token).startswith("P"))]


def _ngram_counts(tokens: list[str], max_n: int = 4) -> Counter:
    """Every n-gram of a caption for n = 1..max_n (a tuple of n tokens) with its count."""
    return Counter(tuple(tokens[i:i + n]) for n in range(1, max_n + 1) for i in range(len(tokens) - n + 1))


def bleu(candidates: list[list[str]], references: list[list[list[str]]], max_n: int = 4) -> list[float]:
    """Corpus BLEU-1..max_n of tokenized captions (Papineni et al. 2002), each in 0..1.

    p_n, the modified n-gram precision: of all the n-grams of all candidates, the fraction found in
    the references, each counted at most as often as it occurs in one reference (clipping: "the the
    the" earns one "the" from "the cat"). Counts are summed over the corpus before dividing, so
    BLEU is not a mean of per-caption scores.
        BLEU-N = BP * exp((log p_1 + ... + log p_N) / N)     (the geometric mean of p_1..p_N)
        BP = min(1, exp(1 - r / c))
    c is the number of candidate tokens, r the sum over images of the reference length closest to
    the candidate's (the shorter on a tie). Precision rewards a caption that says only what it is
    sure of; the brevity penalty BP charges for saying too little.
    """
    matched, total = [0] * max_n, [0] * max_n
    c = r = 0
    for candidate, refs in zip(candidates, references):
        counts, most = _ngram_counts(candidate, max_n), Counter()
        for ref in refs:
            most |= _ngram_counts(ref, max_n)  # | keeps the larger count: the most any one reference has
        for gram, count in (counts & most).items():  # & keeps the smaller count: the clipping
            matched[len(gram) - 1] += count
        for n in range(1, max_n + 1):
            total[n - 1] += max(0, len(candidate) - n + 1)
        c += len(candidate)
        r += min((abs(len(ref) - len(candidate)), len(ref)) for ref in refs)[1]
    if c == 0:
        return [0.0] * max_n
    brevity = min(1.0, math.exp(1 - r / c))
    scores, log_precisions = [], 0.0
    for n in range(1, max_n + 1):
        if matched[n - 1] == 0:  # log 0: this and every longer BLEU are 0
            return scores + [0.0] * (max_n - n + 1)
        log_precisions += math.log(matched[n - 1] / total[n - 1])
        scores.append(brevity * math.exp(log_precisions / n))
    return scores


def _tf_idf(counts: Counter, idf, max_n: int) -> list[dict]:
    """The caption's vector of each n: n-gram -> count in the caption * idf."""
    vectors = [{} for _ in range(max_n)]
    for gram, count in counts.items():
        vectors[len(gram) - 1][gram] = count * idf(gram)
    return vectors


def _clipped_cosine(candidate: dict, reference: dict) -> float:
    """sum_g min(c_g, r_g) * r_g / (|c| |r|); 0 where either vector is 0."""
    norms = math.sqrt(sum(v * v for v in candidate.values()) * sum(v * v for v in reference.values()))
    if norms == 0:
        return 0.0
    return sum(min(v, reference.get(gram, 0.0)) * reference.get(gram, 0.0)
               for gram, v in candidate.items()) / norms


def cider_d(candidates: list[list[str]], references: list[list[list[str]]], max_n: int = 4,
            sigma: float = 6.0) -> list[float]:
    """CIDEr-D of each tokenized candidate (Vedantam et al. 2015), 0..10, as COCO computes it.

    CIDEr asks whether a caption says what most of the image's references say. Each caption
    becomes, for each n, a TF-IDF vector over n-grams: count in the caption * idf, where
        idf(g) = log(number of images / number of images whose references contain g)
    An n-gram that every image's references use ("a", "in the") weighs 0; one that only this
    image's references use weighs most. The candidate c is compared with each reference s:
        CIDEr-D = 10 / #refs * sum_s exp(-(len c - len s)^2 / (2 sigma^2))
                  * 1/max_n * sum_n sum_g min(c_g, s_g) s_g / (|c_n| |s_n|)
    the mean over n of a cosine of the n-gram vectors, times a Gaussian penalty on the difference
    in length (sigma = 6 tokens), averaged over the references, times 10 (COCO's factor, to bring
    it near the scale of other metrics). CIDEr-D is CIDEr made hard to game: the length penalty,
    and the clipping of the candidate's side by the reference ("dog dog" points where "dog" does,
    a cosine of 1, but earns one "dog"). The count is the raw one, as in COCO's code; the paper
    divides it by the caption's number of n-grams, which the cosine ignores but the clipping not.

    The idf comes from the references of the captions scored here, so a score depends on the
    rest of the set: with one image every idf is log(1/1) = 0 and CIDEr-D is 0. Compare CIDEr-D
    only between runs on the same references.
    """
    reference_counts = [[_ngram_counts(ref, max_n) for ref in refs] for refs in references]
    images_with = Counter(gram for counts in reference_counts for gram in set().union(*counts))
    log_images = math.log(len(references))
    idf = lambda gram: log_images - math.log(max(1, images_with[gram]))  # an unseen n-gram: as if seen once
    scores = []
    for candidate, refs, counts in zip(candidates, references, reference_counts):
        candidate_vectors = _tf_idf(_ngram_counts(candidate, max_n), idf, max_n)
        total = 0.0
        for ref, ref_counts in zip(refs, counts):
            similarity = sum(_clipped_cosine(c, s) for c, s in
                             zip(candidate_vectors, _tf_idf(ref_counts, idf, max_n))) / max_n
            total += similarity * math.exp(-(len(candidate) - len(ref)) ** 2 / (2 * sigma ** 2))
        scores.append(10 * total / len(refs))
    return scores


def caption_metrics(generated: list[str], references: list[list[str]]) -> dict:
    """BLEU-1..4 and CIDEr-D of generated captions, generated[i] against the references of the
    same image, references[i]; all x100, as captioning papers print them (COCO's code returns
    BLEU-4 0.403 and CIDEr-D 1.367 for what papers print as 40.3 and 136.7): the keys say so,
    BLEU-4_x100. Captions are tokenized by caption_tokens; an empty generated caption scores 0."""
    if len(generated) != len(references):
        raise ValueError(f"{len(generated)} generated captions and {len(references)} lists of "
                         f"references: give one list of reference captions per generated caption")
    if not generated:
        raise ValueError("no captions to score")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"references[{i}] is {refs!r}: give each image a list of one or more "
                             "reference captions, e.g. ['a dog runs on the beach']")
    candidates = [caption_tokens(caption) for caption in generated]
    refs = [[caption_tokens(caption) for caption in captions] for captions in references]
    cider = cider_d(candidates, refs)
    values = [*bleu(candidates, refs), sum(cider) / len(cider)]
    return {**{key: 100 * value for key, value in zip(CAPTION_KEYS, values)},
            "num_images": len(generated)}


def evaluate_captions(setup, index, settings=None, num_images=None, batch_size=64, num_workers=0,
                      precision="fp32") -> dict:
    """A captioner's captions of the first num_images images of a CaptionIndex (all when None),
    scored against each image's own captions: every caption of an image is one of its
    references, as COCO's five are. Returns caption_metrics with the CaptionSettings used
    ("settings") and every image's caption beside its references ("captions": image, generated,
    references), which visualization.py draws.

    Generating costs far more than encoding: beam search runs the decoder once per token for each
    of num_beams candidates, where retrieval runs each tower once. Hence num_images. The images
    are the first ones, not a random draw, so that a smaller run scores a part of a larger one; but
    CIDEr-D's idf comes from the references scored, so compare scores of equal num_images only.
    An image that cannot be read is left out (evaluate the readable part: encode_index's index).
    The model runs where its weights are.
    """
    settings = settings or clip_model.CaptionSettings()
    count = index.num_images if num_images is None else min(num_images, index.num_images)
    part = index.subset(np.arange(count))
    dataset = data_loader.ImageDataset(part, data_loader.image_transform(setup.preprocess_cfg))
    loader = data_loader.build_dataloader(dataset, batch_size, num_workers=num_workers, train=False)
    rows = []
    with tqdm(total=part.num_images, desc="captions", unit="image", disable=None, dynamic_ncols=True) as progress:
        for batch in loader:
            if len(batch["indices"]):
                generated = clip_model.generate_captions(setup, None, batch["images"], settings, precision)
                rows += [{"image": part.image_name(i), "generated": caption,
                          "references": [part.caption(j) for j in part.captions_of(i)]}
                         for i, caption in zip(batch["indices"].tolist(), generated)]
            progress.update(len(batch["indices"]) + len(batch["failed"]))
    if not rows:
        raise DataError(f"{index.source}: no readable image to caption")
    metrics = caption_metrics([row["generated"] for row in rows], [row["references"] for row in rows])
    return {**metrics, "settings": dataclasses.asdict(settings), "captions": rows}


# ----------------------------------------------------------------------------- embeddings

def encode_index(setup, index, batch_size=64, num_workers=0, device="cpu", precision="fp32",
                 strict=False):
    """L2-normalised float32 embeddings of every readable image [N, D] and of its captions
    [M, D], with the index they belong to: `index` itself, or the part of it without the
    unreadable images (listed in its `skipped`)."""
    image_features, kept, failed = encode_image_files(setup, index, batch_size, num_workers, device,
                                                      precision, strict)
    if failed:
        skipped = index.skipped + [message for _, message in failed]
        index = index.subset(kept.numpy())
        index.skipped = skipped
    text_features = clip_model.encode_texts(setup.model, setup.tokenizer, index.captions(), device,
                                            batch_size, precision)
    return image_features, text_features, index


def evaluate_features(image_features, text_features, caption_image, chunk_size=1024) -> dict:
    """Retrieval and similarity metrics of embeddings: the evaluation without a model."""
    return {"retrieval": retrieval_metrics(image_features, text_features, caption_image, chunk_size),
            "similarity": similarity_stats(image_features, text_features, caption_image, chunk_size),
            "num_images": len(image_features), "num_texts": len(text_features)}


def evaluate_model(setup, index, batch_size=64, num_workers=0, device="cpu", precision="fp32",
                   chunk_size=1024, strict=False) -> dict:
    """Retrieval and similarity metrics of a model (a ClipSetup) on a CaptionIndex; train.py
    validates with this. Unreadable images are left out, with their captions, and counted."""
    image_features, text_features, index = encode_index(setup, index, batch_size, num_workers,
                                                        device, precision, strict)
    return {**evaluate_features(image_features, text_features, index.caption_image, chunk_size),
            "skipped_images": skipped_summary(index.skipped)}


def save_embeddings(directory, image_features, text_features, caption_image, meta: dict):
    """Write the four files of EMBEDDING_FILES; meta holds image_names, captions, data, checkpoint."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / "image_features.npy", np.asarray(image_features, dtype=np.float32))
    np.save(directory / "text_features.npy", np.asarray(text_features, dtype=np.float32))
    np.save(directory / "caption_image.npy", np.asarray(caption_image, dtype=np.int64))
    (directory / "meta.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")


def load_embeddings(directory) -> dict:
    """The files of save_embeddings as a dict: image_features, text_features, caption_image, meta.
    What save_embeddings did not write is refused with a DataError naming the file: arrays of
    other types or shapes, features that are not finite (require_finite), captions of images
    that are not there, a meta.json that is not a JSON object."""
    directory = Path(directory)
    missing = [name for name in EMBEDDING_FILES if not (directory / name).is_file()]
    if missing:
        raise MissingInputError(f"--embeddings {directory}: {', '.join(missing)} missing (write "
                                f"them with: python evaluation.py ... --save_embeddings {directory})")
    saved = {name[:-4]: _load_numbers(directory / name, kinds)
             for name, kinds in zip(EMBEDDING_FILES[:3], ("fiu", "fiu", "iu"))}
    images, texts, owner = saved["image_features"], saved["text_features"], saved["caption_image"]
    if images.ndim != 2 or texts.ndim != 2 or owner.shape != (len(texts),):
        raise DataError(f"{directory}: image_features {images.shape}, text_features {texts.shape} "
                        f"and caption_image {owner.shape} should be [N, D], [M, D] and [M]; "
                        f"save the embeddings again")
    for name in ("image_features", "text_features"):
        require_finite(saved[name], directory / f"{name}.npy")
    outside = np.flatnonzero((owner < 0) | (owner >= len(images)))
    if len(outside):
        raise DataError(f"{directory / 'caption_image.npy'}: caption {outside[0]} belongs to image "
                        f"{owner[outside[0]]}, but image_features.npy holds images 0..{len(images) - 1} "
                        f"({len(outside)} captions point outside); save the embeddings again")
    saved["meta"] = _load_meta(directory / "meta.json")
    return saved


def _load_numbers(path, kinds):
    """A .npy array of numbers of the given dtype kinds ('f' float, 'i' signed, 'u' unsigned).
    It is never unpickled (an object array is a pickle, refused), and it is mapped before it is
    copied, so that a header promising more than the file holds is refused, not allocated."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        reason = (str(error).splitlines() or [""])[0][:120]
        raise DataError(f"{path}: not an array of numbers as --save_embeddings writes it ({reason}); "
                        f"save the embeddings again") from None
    if array.dtype.kind not in kinds:
        wanted = "integers" if kinds == "iu" else "numbers"
        raise DataError(f"{path}: holds {array.dtype} values, not {wanted}; save the embeddings again")
    return np.array(array)


def _load_meta(path) -> dict:
    """meta.json: a JSON object; its "skipped" (unreadable images) a list of messages."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not JSON ({error}); save the embeddings again") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("skipped", []), list):
        raise DataError(f"{path}: expected a JSON object with image_names, captions, data and "
                        f"skipped (a list), as --save_embeddings writes it; save the embeddings again")
    return meta


# ----------------------------------------------------------------------------- command line

def format_results(results: dict) -> str:
    """The readable table printed by the command line."""
    lines = []
    if "retrieval" in results:
        r = results["retrieval"]
        lines += [f"Retrieval: {results['num_images']} images, {results['num_texts']} captions",
                  f"  {'':15}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'mean rank':>11}{'median rank':>13}"]
        for key, label in (("image_to_text", "image -> text"), ("text_to_image", "text -> image")):
            m = r[key]
            lines.append(f"  {label:15}{m['R@1']:8.2f}{m['R@5']:8.2f}{m['R@10']:8.2f}"
                         f"{m['mean_rank']:11.1f}{m['median_rank']:13.1f}")
        lines.append(f"  rsum {r['rsum']:.2f}, mean recall {r['mean_recall']:.2f}")
    if "similarity" in results:
        s = results["similarity"]
        lines.append(f"Cosine similarity: matching pairs {s['positive_mean']:.4f}, non-matching "
                     f"{s['negative_mean']:.4f}, gap {s['gap']:.4f}")
    if "zeroshot" in results:
        z = results["zeroshot"]
        lines.append(f"Zero-shot: {len(z['classnames'])} classes, {sum(map(sum, z['confusion']))} "
                     f"images, {len(z['templates'])} templates: top-1 {z['top1']:.2f}, "
                     f"top-5 {z['top5']:.2f}, mean per-class recall {z['mean_per_class_recall']:.2f}")
        shown = sorted(z["per_class"].items(), key=lambda item: -1 if item[1] is None else item[1])
        lines.append("  top-1 per class, worst first:")
        for name, accuracy in shown[:20]:
            lines.append(f"  {name:30} {'no images' if accuracy is None else f'{accuracy:6.2f}'}")
        if len(shown) > 20:
            lines.append(f"  ... the 20 worst classes of {len(shown)}; all are in the --output JSON")
    if "captioning" in results:
        c = results["captioning"]
        lines += [f"Captioning: {c['num_images']} generated captions against their references (x100, as "
                  f"papers print them)",
                  "  " + "  ".join(f"{name} {c[key]:.2f}" for name, key in zip(CAPTION_SCORES, CAPTION_KEYS))]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Evaluate a CLIP model: retrieval R@1/5/10 both ways, cosine similarity of "
                    "matching and non-matching pairs, zero-shot classification; a captioner's "
                    "captions (BLEU, CIDEr-D).")
    add = parser.add_argument
    add("--checkpoint", help="checkpoint written by train.py, e.g. model-checkpoint/<run>/best.pt")
    add("--model_name", help="open_clip model or preset (e.g. ViT-B-32, tiny-vit-64), or a Chinese-CLIP "
                             "model (e.g. cn-clip:ViT-B-16), to evaluate without a checkpoint of ours; "
                             "weights from --pretrained")
    add("--pretrained", default="", help="with --model_name: a pretrained tag (e.g. openai; chinese-clip for "
                                         "a cn-clip model) or a local weights file; empty = random weights")
    add("--data", help="captioned images to retrieve, in any format data_loader.py reads, WebDataset "
                       "shards too ('dir/{00000..00004}.tar', one .tar or a folder of them)")
    add("--image_column", default="filepath", help="image column of a CSV/TSV --data file")
    add("--caption_column", default="title", help="caption column of a CSV/TSV --data file")
    add("--split", default="train", help="split of a Chinese-CLIP --data folder ({split}_texts.jsonl)")
    add("--embeddings", metavar="DIR", help="evaluate embeddings saved by --save_embeddings instead "
                                            "of --data; needs no model")
    add("--save_embeddings", metavar="DIR", help="write the image and text embeddings of --data "
                                                 "(with image names and captions) to DIR")
    add("--zeroshot_dir", metavar="DIR", help="zero-shot classification of DIR/<class>/*.jpg; "
                                              "class names from the folders or DIR/classnames.txt")
    add("--templates", metavar="NAME|FILE", help="zero-shot prompt templates: openai (the CLIP paper's "
                                                 "80 ImageNet prompts) or simple (7 of them), from "
                                                 "open_clip's package; or a FILE, one per line, '{}' "
                                                 "standing for the class name (default: the built-in "
                                                 "set of --language)")
    add("--classnames", metavar="NAME|FILE", help="zero-shot class names, one per class folder in "
                                                  "sorted order: imagenet (open_clip's 1000 ImageNet "
                                                  "names) or a FILE, one per line (default: "
                                                  "DIR/classnames.txt, else the folder names)")
    add("--dataset_name", help="the data set's name in the --benchmark_output record (default: the "
                               "--zeroshot_dir folder's name)")
    add("--benchmark_output", metavar="FILE", help="write the zero-shot result as CLIP_benchmark's "
                                                   "JSON (dataset, model, pretrained, task, metrics: "
                                                   "acc1, acc5, mean_per_class_recall; language)")
    add("--language", choices=("auto", "en", "zh"), default="auto",
        help="built-in template set; auto = Chinese if class names contain CJK characters")
    add("--output", metavar="FILE", help="write the results as JSON to FILE")
    add("--batch_size", type=int, default=64, help="images or texts encoded per batch")
    add("--num_workers", type=int, default=2, help="data loading worker processes")
    add("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    add("--precision", choices=("auto", "fp32", "amp", "bf16"), default="auto",
        help="encoding precision: auto (amp on CUDA, else fp32), fp32, amp (float16 autocast, "
             "CUDA) or bf16 (bfloat16 autocast)")
    add("--strict_data", action="store_true", help="stop at the first unreadable image instead of "
                                                   "skipping it (and its captions)")
    add("--chunk_size", type=int, default=1024, help="rows and columns of one tile of the score "
                                                     "matrix; memory ~ 8 * chunk_size^2 bytes")
    add("--caption_images", type=int, metavar="N", help="a captioner (CoCa) also writes a caption of "
        "each --data image, scored against the image's captions (BLEU, CIDEr-D): of the first N "
        "images only (default: all; 0: no captions). Generating is slow: beam search runs the "
        "decoder once per token and beam")
    clip_model.CaptionSettings.add_arguments(parser)
    return parser


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    for wrong, message in [
            (args.checkpoint and args.model_name, "give --checkpoint or --model_name, not both"),
            (args.pretrained and not args.model_name, "--pretrained needs --model_name"),
            (args.embeddings and args.data, "give --data (with a model) or --embeddings, not both"),
            (args.save_embeddings and not args.data, "--save_embeddings needs --data"),
            (not (args.data or args.embeddings or args.zeroshot_dir),
             "nothing to evaluate: give --data, --embeddings or --zeroshot_dir"),
            ((args.data or args.zeroshot_dir) and not (args.checkpoint or args.model_name),
             "--data and --zeroshot_dir need a model: --checkpoint or --model_name"),
            (args.chunk_size < 1 or args.batch_size < 1, "--chunk_size and --batch_size must be > 0"),
            (args.num_workers < 0, "--num_workers must be >= 0"),
            (args.caption_images is not None and args.caption_images < 0, "--caption_images must be >= 0"),
            ((args.classnames or args.benchmark_output or args.dataset_name) and not args.zeroshot_dir,
             "--classnames, --dataset_name and --benchmark_output need --zeroshot_dir")]:
        if wrong:
            parser.error(message)
    clip_model.CaptionSettings.from_args(args)     # checks the --caption_ values before a model loads
    results = run_evaluation(args)
    print(format_results(results))
    for path, content in ((args.output, results),
                          (args.benchmark_output, results.get("zeroshot", {}).get("clip_benchmark"))):
        if path:
            files.write_json(path, content)
            print(f"results written to {path}")
    return results


def _load_model(args, device):
    """The ClipSetup of --checkpoint or of --model_name/--pretrained."""
    if args.checkpoint:
        return clip_model.model_from_checkpoint(args.checkpoint, device)[0]
    return clip_model.build_model(args.model_name, args.pretrained, device)


def warn(message):
    """The command line's warnings (skipped images) go to stderr, its results to stdout."""
    print(message, file=sys.stderr)


def run_evaluation(args) -> dict:
    """Everything the command line asks for; the model is loaded only when something needs it."""
    results = {}
    if args.data or args.zeroshot_dir:
        device = clip_model.pick_device(args.device)
        precision = clip_model.pick_precision(args.precision, device)
        setup = _load_model(args, device)
    else:
        device, precision, setup = None, None, None
    model = {"checkpoint": args.checkpoint or args.pretrained or None,
             "model": setup.model_name if setup else None}
    if args.embeddings:
        saved = load_embeddings(args.embeddings)
        results = evaluate_features(saved["image_features"], saved["text_features"],
                                    saved["caption_image"], args.chunk_size)
        results.update(checkpoint=saved["meta"].get("checkpoint"), data=saved["meta"].get("data"),
                       model=saved["meta"].get("model"),
                       skipped_images=skipped_summary(saved["meta"].get("skipped", [])))
    elif args.data:
        index = data_loader.load_caption_index(args.data, args.image_column, args.caption_column, args.split,
                                    strict=args.strict_data)
        image_features, text_features, index = encode_index(
            setup, index, args.batch_size, args.num_workers, device, precision, args.strict_data)
        report_skipped(warn, "unreadable image", index.skipped, total=len(index.skipped))
        data = data_loader.SOURCE_SEPARATOR.join(map(os.path.abspath, data_loader.split_sources(args.data)))
        if args.save_embeddings:
            meta = {"image_names": [index.image_name(i) for i in range(index.num_images)],
                    "captions": index.captions(), "data": data, "split": args.split,
                    "image_column": args.image_column, "caption_column": args.caption_column,
                    "skipped": index.skipped, **model}
            save_embeddings(args.save_embeddings, image_features, text_features,
                            index.caption_image, meta)
        results = evaluate_features(image_features, text_features, index.caption_image,
                                    args.chunk_size)
        results.update(data=data, split=args.split, image_column=args.image_column,
                       caption_column=args.caption_column, skipped_images=skipped_summary(index.skipped),
                       **model)
        if clip_model.is_captioner(setup.model) and args.caption_images != 0:
            results["captioning"] = evaluate_captions(
                setup, index, clip_model.CaptionSettings.from_args(args), args.caption_images,
                args.batch_size, args.num_workers, precision)
    if args.zeroshot_dir:
        zeroshot = evaluate_zeroshot(setup, args.zeroshot_dir, args.batch_size, args.num_workers,
                                     device, precision, args.templates, args.language,
                                     args.chunk_size, args.classnames, args.strict_data)
        skipped = zeroshot["skipped_images"]
        report_skipped(warn, "unreadable image", skipped["first"], total=skipped["count"])
        dataset = args.dataset_name or Path(args.zeroshot_dir).resolve().name
        zeroshot["clip_benchmark"] = clip_benchmark_record(zeroshot, dataset, setup.model_name,
                                                           args.pretrained or args.checkpoint or "")
        results["zeroshot"] = zeroshot
        for key, value in model.items():
            results.setdefault(key, value)
    return results


if __name__ == "__main__":
    run_script(main, "evaluation.py")
