"""evaluation.py: retrieval, similarity and zero-shot metrics, saved embeddings, the command line."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluation as ev
import sample_data
from errors import DataError, MissingInputError, SettingsError

REPO = Path(__file__).resolve().parents[1]


def signs(*patterns):
    """Vectors of +1/-1 written as strings: '+-+-' -> [1, -1, 1, -1].

    All have the same length D, so cos(a, b) = 1 - 2 * hamming(a, b) / D exactly: ranking by
    cosine is ranking by Hamming distance, easy to do by hand, and equal distances tie exactly.
    """
    return torch.tensor([[1.0 if c == "+" else -1.0 for c in p] for p in patterns])


def one_hot(indices, dim):
    return torch.eye(dim)[torch.as_tensor(indices)]


def random_set(num_images=23, captions_per_image=(1, 4), dim=16, seed=0):
    """Random features with an uneven number of captions per image, plus exact duplicates
    (an image twice, a caption twice) so that ties occur."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(captions_per_image[0], captions_per_image[1] + 1, (num_images,), generator=g)
    owner = torch.repeat_interleave(torch.arange(num_images), counts)
    images = torch.randn(num_images, dim, generator=g)
    texts = images[owner] + 1.5 * torch.randn(len(owner), dim, generator=g)
    images[5] = images[2]
    texts[7] = texts[3]
    texts[-1] = images[0]
    return images, texts, owner


def brute_force_ranks(images, texts, owner):
    """Ranks from the full score matrix, each row sorted by (score descending, index ascending).
    One dot product per pair, so equal vectors give equal scores whatever their position."""
    x = (images.double() / images.double().norm(dim=1, keepdim=True)).numpy()
    y = (texts.double() / texts.double().norm(dim=1, keepdim=True)).numpy()
    scores, owner = np.array([[float(xi @ yj) for yj in y] for xi in x]), np.asarray(owner)
    text_ranks = []
    for j in range(len(owner)):
        order = np.lexsort((np.arange(len(x)), -scores[:, j]))
        text_ranks.append(1 + int(np.flatnonzero(order == owner[j])[0]))
    image_ranks = []
    for i in range(len(x)):
        order = np.lexsort((np.arange(len(y)), -scores[i]))
        image_ranks.append(1 + int(np.flatnonzero(owner[order] == i)[0]))
    return np.array(image_ranks), np.array(text_ranks)


def summary(ranks):
    ranks = np.asarray(ranks)
    return {"R@1": 100 * np.mean(ranks <= 1), "R@5": 100 * np.mean(ranks <= 5),
            "R@10": 100 * np.mean(ranks <= 10), "mean_rank": ranks.mean(), "median_rank": np.median(ranks)}


def assert_direction(measured, expected):
    assert measured == pytest.approx(expected, abs=1e-9)


# ---- retrieval on hand-built embeddings -------------------------------------------------------

def test_hand_computed_case_with_several_captions_per_image_and_ties():
    images = signs("++++", "++--", "-+-+")
    texts = signs("+++-", "-+--", "++-+", "--++", "-+-+")
    owner = [0, 0, 1, 2, 2]  # image 0 has captions 0 and 1, image 1 caption 2, image 2 captions 3, 4
    # Hamming distances (rows: captions, columns: images I0 I1 I2; smaller = more similar):
    #   T0 +++-   1  1  3    own image I0, tied with I1 (index 1 > 0)  -> rank 1
    #   T1 -+--   3  1  1    own image I0 is last                      -> rank 3
    #   T2 ++-+   1  1  1    own image I1, three-way tie, I0 ahead     -> rank 2
    #   T3 --++   2  4  2    own image I2, tied with I0 (index 0 < 2)  -> rank 2
    #   T4 -+-+   2  2  0    own image I2                              -> rank 1
    # Image -> text (correct captions in brackets):
    #   I0: [T0]=1 [T1]=3 T2=1 T3=2 T4=2 -> best own T0, T2 ties but comes later -> rank 1
    #   I1: T0=1 T1=1 [T2]=1 T3=4 T4=2   -> T0 and T1 tie with T2 and come first  -> rank 3
    #   I2: T0=3 T1=1 T2=1 [T3]=2 [T4]=0 -> best own T4                          -> rank 1
    result = ev.retrieval_metrics(images, texts, owner)
    assert_direction(result["text_to_image"], {"R@1": 40.0, "R@5": 100.0, "R@10": 100.0,
                                               "mean_rank": 9 / 5, "median_rank": 2.0})
    assert_direction(result["image_to_text"], {"R@1": 200 / 3, "R@5": 100.0, "R@10": 100.0,
                                               "mean_rank": 5 / 3, "median_rank": 1.0})
    six = [40.0, 100.0, 100.0, 200 / 3, 100.0, 100.0]
    assert result["rsum"] == pytest.approx(sum(six))
    assert result["mean_recall"] == pytest.approx(sum(six) / 6)


def test_perfect_model_has_every_recall_100_and_every_rank_1():
    owner = [0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 3, 4]
    images = one_hot(range(5), 8)
    texts = one_hot(owner, 8)  # every caption equals its image
    result = ev.retrieval_metrics(images, texts, owner)
    perfect = {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0, "mean_rank": 1.0, "median_rank": 1.0}
    assert result["image_to_text"] == perfect and result["text_to_image"] == perfect
    assert result["rsum"] == 600.0 and result["mean_recall"] == 100.0


def test_reversed_model_ranks_every_correct_item_last():
    # Image i is e_i and its two captions are -e_i: score -1 with their own image, 0 elsewhere.
    owner = torch.arange(12).repeat_interleave(2)
    images, texts = one_hot(range(12), 12), -one_hot(owner, 12)
    result = ev.retrieval_metrics(images, texts, owner)
    # text -> image: all 11 other images come first. image -> text: all 22 other captions come
    # first, so the better of the image's two captions has rank 23.
    assert result["text_to_image"] == {"R@1": 0.0, "R@5": 0.0, "R@10": 0.0, "mean_rank": 12.0,
                                       "median_rank": 12.0}
    assert result["image_to_text"] == {"R@1": 0.0, "R@5": 0.0, "R@10": 0.0, "mean_rank": 23.0,
                                       "median_rank": 23.0}
    assert result["rsum"] == 0.0


def test_ties_are_broken_by_index_lower_first():
    # Every score is equal, so order is index order: caption j's image i comes after the i images
    # before it (rank i + 1); image i's first caption is caption 2i (rank 2i + 1).
    owner = [0, 0, 1, 1, 2, 2]
    images, texts = torch.ones(3, 4), torch.ones(6, 4)
    result = ev.retrieval_metrics(images, texts, owner)
    assert_direction(result["text_to_image"], summary([1, 1, 2, 2, 3, 3]))
    assert_direction(result["image_to_text"], summary([1, 3, 5]))
    assert result["image_to_text"]["R@1"] == pytest.approx(100 / 3)


def test_image_to_text_is_a_hit_when_any_of_the_images_captions_is_in_the_top_k():
    # Image 0's captions are 0 and 2: caption 0 is its worst match of all four, caption 2 its best.
    images = one_hot([0, 1], 3)
    texts = torch.tensor([[-1.0, 0, 0], [0, 1, 0], [1, 0, 0.1], [0, 0.5, 1]])
    owner = [0, 1, 0, 1]
    result = ev.retrieval_metrics(images, texts, owner)
    assert result["image_to_text"]["R@1"] == 100.0
    # As a query, caption 0 itself still finds image 1 first (score 0 > -1): rank 2.
    assert result["text_to_image"]["mean_rank"] == (2 + 1 + 1 + 1) / 4


def test_median_rank_of_an_even_count_is_the_mean_of_the_middle_two():
    images = one_hot([0, 1, 2], 3)
    # Scores of each caption are its coordinates: own images 0, 1, 2, 2 get ranks 1, 2, 1, 3.
    texts = torch.tensor([[1.0, 0.1, 0.2], [1, 0.5, 0], [0, 0.1, 1], [1, 0.5, 0.2]])
    result = ev.retrieval_metrics(images, texts, [0, 1, 2, 2])
    assert result["text_to_image"]["median_rank"] == 1.5
    assert result["text_to_image"]["mean_rank"] == 7 / 4


def test_features_are_normalised_so_their_length_does_not_matter():
    images, texts, owner = random_set(seed=1)
    # Powers of two scale a float exactly, so the normalised vectors are the same bits; other
    # lengths would move scores by rounding and could flip near-ties.
    lengths = 2.0 ** torch.randint(-4, 5, (len(texts), 1), generator=torch.Generator().manual_seed(0))
    assert ev.retrieval_metrics(images, texts * lengths, owner) == ev.retrieval_metrics(images, texts, owner)


# ---- retrieval at scale: chunks and a brute-force reference -----------------------------------

@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, 16, 50])
def test_chunked_equals_unchunked_exactly(chunk_size):
    images, texts, owner = random_set(seed=2)
    unchunked = ev.retrieval_metrics(images, texts, owner, chunk_size=10_000)
    assert ev.retrieval_metrics(images, texts, owner, chunk_size=chunk_size) == unchunked


def test_ranks_equal_a_brute_force_sort_of_the_full_score_matrix():
    images, texts, owner = random_set(seed=3)
    image_ranks, text_ranks = brute_force_ranks(images, texts, owner)
    result = ev.retrieval_metrics(images, texts, owner, chunk_size=5)
    assert_direction(result["image_to_text"], summary(image_ranks))
    assert_direction(result["text_to_image"], summary(text_ranks))


def test_captions_need_not_be_grouped_by_image():
    g = torch.Generator().manual_seed(4)
    owner = torch.arange(10).repeat_interleave(3)
    images = torch.randn(10, 8, generator=g)
    texts = images[owner] + torch.randn(30, 8, generator=g)  # no ties: order cannot matter
    shuffle = torch.randperm(30, generator=g)
    assert (ev.retrieval_metrics(images, texts[shuffle], owner[shuffle].numpy())
            == ev.retrieval_metrics(images, texts, owner))


def test_inputs_that_do_not_fit_together_are_rejected_with_the_reason():
    images, texts = torch.randn(3, 4), torch.randn(4, 4)
    with pytest.raises(ValueError, match="image 2 has no caption"):
        ev.retrieval_metrics(images, texts, [0, 0, 1, 1])
    with pytest.raises(ValueError, match="holds image 3"):
        ev.retrieval_metrics(images, texts, [0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"image features \(3, 4\), text features \(4, 5\)"):
        ev.retrieval_metrics(images, torch.randn(4, 5), [0, 1, 2, 2])


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_features_that_are_not_finite_are_refused_naming_the_first_row(value):
    # No comparison with NaN is true: unchecked, all-NaN features would rank every right answer first.
    g = torch.Generator().manual_seed(3)
    images, texts, owner = torch.randn(5, 8, generator=g), torch.randn(6, 8, generator=g), [0, 1, 2, 3, 4, 4]
    broken = images.clone()
    broken[3, 0] = broken[4, 1] = value
    with pytest.raises(DataError, match=r"image features: 2 of 5 rows hold NaN or infinite values "
                                        r"\(the first: row 3\)"):
        ev.retrieval_metrics(broken, texts, owner)
    broken = texts.clone()
    broken[0, 7] = value
    with pytest.raises(DataError, match=r"text features: 1 of 6 rows .* \(the first: row 0\)"):
        ev.similarity_stats(images, broken, owner)
    classifier = torch.eye(3, 8)
    classifier[2, 2] = value
    with pytest.raises(DataError, match=r"class vectors: 1 of 3 rows .* \(the first: row 2\)"):
        ev.zeroshot_metrics(images, [0, 1, 2, 0, 1], classifier, ["a", "b", "c"])


def test_all_nan_features_would_otherwise_score_a_perfect_rsum():
    # The reason for the check: the rank counts scores greater than the right one's, and none is.
    nan = torch.full((4, 8), math.nan)
    ahead = ev._count_ahead(nan @ nan.T, torch.full((4,), math.nan), torch.arange(4), torch.arange(4), dim=0)
    assert ahead.tolist() == [0, 0, 0, 0]
    with pytest.raises(DataError, match="image features: 4 of 4 rows"):
        ev.retrieval_metrics(nan, nan, torch.arange(4))


# ---- similarity ----------------------------------------------------------------------------------

def test_similarity_stats_of_the_hand_computed_case():
    images = signs("++++", "++--", "-+-+")
    texts = signs("+++-", "-+--", "++-+", "--++", "-+-+")
    # cos = 1 - hamming / 2. Matching pairs: 0.5, -0.5, 0.5, 0, 1 -> mean 0.3. All 15 pairs sum to
    # 2.5, so the 10 non-matching pairs sum to 2.5 - 1.5 = 1.0 -> mean 0.1.
    stats = ev.similarity_stats(images, texts, [0, 0, 1, 2, 2])
    assert stats == pytest.approx({"positive_mean": 0.3, "negative_mean": 0.1, "gap": 0.2}, abs=1e-12)


def test_similarity_stats_equal_a_brute_force_mean_over_the_full_matrix():
    images, texts, owner = random_set(seed=5)
    x = images.double() / images.double().norm(dim=1, keepdim=True)
    y = texts.double() / texts.double().norm(dim=1, keepdim=True)
    cos = x @ y.T
    matching = torch.zeros_like(cos, dtype=torch.bool)
    matching[owner, torch.arange(len(owner))] = True
    stats = ev.similarity_stats(images, texts, owner)
    # Equal up to the 2^-24 grid features are rounded to (float32 resolution, see evaluation.GRID).
    assert stats["positive_mean"] == pytest.approx(cos[matching].mean().item(), abs=1e-7)
    assert stats["negative_mean"] == pytest.approx(cos[~matching].mean().item(), abs=1e-7)
    assert stats["gap"] == pytest.approx((cos[matching].mean() - cos[~matching].mean()).item(), abs=1e-7)


def test_a_single_image_has_no_non_matching_pairs():
    stats = ev.similarity_stats(torch.ones(1, 3), torch.ones(2, 3), [0, 0])
    assert stats["positive_mean"] == pytest.approx(1.0) and math.isnan(stats["negative_mean"])


# ---- zero-shot -------------------------------------------------------------------------------------

def test_zeroshot_classifier_is_the_normalised_mean_of_normalised_prompt_embeddings():
    prompts = torch.tensor([[[3.0, 0, 0], [0, 0.5, 0]],      # class 0: e0 and e1 after normalising
                            [[0, 0, 2.0], [0, 0, 7.0]]])     # class 1: e2 twice
    weights = ev.zeroshot_classifier(prompts)
    s = 1 / math.sqrt(2)
    assert torch.allclose(weights, torch.tensor([[s, s, 0], [0, 0, 1.0]]))


def test_zeroshot_metrics_of_hand_built_features():
    classifier = torch.eye(6)  # class c is e_c
    images = torch.tensor([[1.0, 0, 0, 0, 0, 0],     # class 0: rank 1
                           [3.0, 2, 0, 0, 0, 0],     # class 1: class 0 scores higher -> rank 2
                           [1.0, 1, -5, 1, 1, 1],    # class 2: every other class higher -> rank 6
                           [0, 0, 0, 1.0, 1, 0],     # class 3: tied with 4, lower index -> rank 1
                           [0, 0, 0, 1.0, 1, 0]])    # class 4: tied with 3, which wins -> rank 2
    names = ["a", "b", "c", "d", "e", "f"]
    result = ev.zeroshot_metrics(images, [0, 1, 2, 3, 4], classifier, names)
    assert result["top1"] == 40.0 and result["top5"] == 80.0
    assert result["per_class"] == {"a": 100.0, "b": 0.0, "c": 0.0, "d": 100.0, "e": 0.0, "f": None}
    expected = np.zeros((6, 6), dtype=int)
    for true, predicted in [(0, 0), (1, 0), (2, 0), (3, 3), (4, 3)]:
        expected[true, predicted] += 1
    assert result["confusion"] == expected.tolist() and result["classnames"] == names


@pytest.mark.parametrize("chunk_size", [1, 3])
def test_zeroshot_chunked_equals_unchunked(chunk_size):
    g = torch.Generator().manual_seed(6)
    classifier, images = torch.randn(7, 8, generator=g), torch.randn(20, 8, generator=g)
    images[4] = images[3]
    labels, names = torch.randint(0, 7, (20,), generator=g), list("abcdefg")
    assert (ev.zeroshot_metrics(images, labels, classifier, names, chunk_size)
            == ev.zeroshot_metrics(images, labels, classifier, names, 100))


def test_templates_built_in_by_language_detected_from_cjk_class_names(tmp_path):
    assert ev.choose_templates(["red circle"]) == ev.TEMPLATES["en"]
    assert ev.choose_templates(["红色圆形"]) == ev.TEMPLATES["zh"]
    assert ev.choose_templates(["红色圆形"], language="en") == ev.TEMPLATES["en"]
    assert all("{}" in t for templates in ev.TEMPLATES.values() for t in templates)
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("a photo of {}.\n\nart of the {}\n")
    bad.write_text("a photo of {}.\na photo of nothing\n")
    assert ev.choose_templates(["x"], templates=good) == ["a photo of {}.", "art of the {}"]
    with pytest.raises(ValueError, match=r"bad.txt, line 2: template 'a photo of nothing'"):
        ev.choose_templates(["x"], templates=bad)


def test_zeroshot_folder_names_classes_by_folder_or_by_classnames_txt(tmp_path):
    from PIL import Image
    for folder, count in [("b_dog", 2), ("a_cat", 1)]:
        (tmp_path / folder).mkdir()
        for k in range(count):
            Image.new("RGB", (4, 4)).save(tmp_path / folder / f"{k}.png")
    (tmp_path / "b_dog" / "notes.txt").write_text("not an image")
    (tmp_path / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    names, paths, labels = ev.load_zeroshot_folder(tmp_path)
    assert names == ["a_cat", "b_dog"] and labels == [0, 1, 1]
    assert [Path(p).relative_to(tmp_path).as_posix() for p in paths] == ["a_cat/0.png", "b_dog/0.png", "b_dog/1.png"]
    (tmp_path / "classnames.txt").write_text("cat\ndog\n")
    assert ev.load_zeroshot_folder(tmp_path)[0] == ["cat", "dog"]
    (tmp_path / "classnames.txt").write_text("cat\n")
    with pytest.raises(ValueError, match="classnames.txt: 1 names for 2 class folders"):
        ev.load_zeroshot_folder(tmp_path)
    (tmp_path / "classnames.txt").write_text("cat\ncat\n")
    with pytest.raises(ValueError, match="class name 'cat' is used twice"):
        ev.load_zeroshot_folder(tmp_path)


def test_openai_templates_and_imagenet_class_names_are_open_clips_own():
    from open_clip import zero_shot_metadata
    openai = ev.choose_templates(["x"], templates="openai")
    assert len(openai) == 80 and all(t.count("{}") == 1 for t in openai)  # the CLIP paper's 80
    assert openai[0] == "a bad photo of a {}." and "a photo of the large {}." in openai
    assert [t.replace("{}", "tench") for t in openai] == \
        [t("tench") for t in zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES]
    assert set(ev.choose_templates(["x"], templates="simple")) < set(openai)
    with pytest.raises(ValueError, match="--templates opeani: neither a file nor one of open_clip's"):
        ev.choose_templates(["x"], templates="opeani")


def test_mean_per_class_recall_counts_every_class_once():
    classifier = torch.eye(3)
    images = one_hot([0, 0, 0, 0, 0, 0, 1, 0], 3)  # class a: 6 images, all right; b: 2 images, 1 right
    result = ev.zeroshot_metrics(images, [0, 0, 0, 0, 0, 0, 1, 1], classifier, ["a", "b", "c"])
    assert result["top1"] == 87.5                   # 7 of 8 images
    assert result["mean_per_class_recall"] == 75.0  # (100 + 50) / 2; c has no image and no say


def test_clip_benchmark_record_has_its_keys_and_fractions():
    zeroshot = {"top1": 87.5, "top5": 100.0, "mean_per_class_recall": 75.0, "classnames": ["a", "b", "c"],
                "templates": ["a photo of a {}."]}
    record = ev.clip_benchmark_record(zeroshot, "shapes", "ViT-B-32", "openai")
    assert record == {"dataset": "shapes", "model": "ViT-B-32", "pretrained": "openai",
                      "task": "zeroshot_classification", "language": "en",
                      "metrics": {"acc1": 0.875, "acc5": None, "mean_per_class_recall": 0.75}}
    zeroshot.update(classnames=list("abcde"), templates=["{}的照片。"])
    record = ev.clip_benchmark_record(zeroshot, "shapes", "ViT-B-32", "openai")
    assert record["metrics"]["acc5"] == 1.0 and record["language"] == "zh"


@pytest.mark.slow
def test_imagenet_zeroshot_with_the_openai_templates_runs_offline(tmp_path, monkeypatch):
    """The protocol as published: 1000 ImageNet classes x the 80 prompts, all from open_clip's
    package, on a folder per class named by WordNet id. A model small enough for 80,000 prompts."""
    from open_clip import zero_shot_metadata
    from PIL import Image
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "val"
    for k in range(1000):
        (folder / f"n{k:08d}").mkdir(parents=True)
    for k in (0, 1, 999):
        Image.new("RGB", (16, 16), (k % 256, 0, 0)).save(folder / f"n{k:08d}" / "image.png")
    config = tmp_path / "micro-clip.json"
    config.write_text(json.dumps({"embed_dim": 16,
                                  "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1,
                                                 "head_width": 32},
                                  "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32,
                                               "heads": 1, "layers": 1}}))
    results = ev.main(["--model_name", str(config), "--zeroshot_dir", str(folder), "--templates", "openai",
                       "--classnames", "imagenet", "--benchmark_output", str(tmp_path / "bench.json"),
                       "--device", "cpu", "--num_workers", "0", "--batch_size", "2000"])
    zeroshot = results["zeroshot"]
    published = list(zero_shot_metadata.IMAGENET_CLASSNAMES)  # two names occur twice: told apart
    assert zeroshot["classnames"][:3] == published[:3] == ["tench", "goldfish", "great white shark"]
    assert [(c, name) for c, name in enumerate(zeroshot["classnames"]) if name != published[c]] == \
        [(657, "missile (657)"), (744, "missile (744)"), (836, "sunglasses (836)"), (837, "sunglasses (837)")]
    assert len(zeroshot["templates"]) == 80 and sum(map(sum, zeroshot["confusion"])) == 3
    assert zeroshot["per_class"]["tench"] in (0.0, 100.0)
    assert zeroshot["per_class"]["great white shark"] is None  # no image
    written = json.loads((tmp_path / "bench.json").read_text())
    assert written == zeroshot["clip_benchmark"]
    assert written["dataset"] == "val" and written["model"] == "micro-clip" and written["pretrained"] == ""
    assert written["metrics"]["acc1"] == zeroshot["top1"] / 100
    for name in ("a", "b"):
        (tmp_path / "two" / name).mkdir(parents=True)
    with pytest.raises(ValueError, match="open_clip's class names.*1000 names for 2 class folders"):
        ev.load_zeroshot_folder(tmp_path / "two", "imagenet")


# ---- saved embeddings -----------------------------------------------------------------------------

def test_saved_embeddings_load_back_unchanged(tmp_path):
    images, texts, owner = random_set(seed=7)
    meta = {"image_names": [f"{i}.png" for i in range(len(images))], "captions": ["x"] * len(texts),
            "data": "/data/set", "checkpoint": "best.pt"}
    ev.save_embeddings(tmp_path, images, texts, owner, meta)
    saved = ev.load_embeddings(tmp_path)
    assert np.array_equal(saved["image_features"], images.numpy())
    assert np.array_equal(saved["text_features"], texts.numpy())
    assert saved["caption_image"].dtype == np.int64 and np.array_equal(saved["caption_image"], owner)
    assert saved["meta"] == meta


def test_missing_embeddings_are_named_with_the_way_to_make_them(tmp_path):
    with pytest.raises(MissingInputError, match="image_features.npy.*--save_embeddings"):
        ev.main(["--embeddings", str(tmp_path)])


def saved_set(folder, **replace):
    """6 images and 8 captions as save_embeddings writes them, with some files' bytes replaced."""
    g = torch.Generator().manual_seed(1)
    images, texts, owner = torch.randn(6, 16, generator=g), torch.randn(8, 16, generator=g), [0, 1, 2, 3, 4, 5, 0, 1]
    ev.save_embeddings(folder, images, texts, owner, {"image_names": [], "captions": [], "skipped": []})
    for name, content in replace.items():
        (folder / name).write_bytes(content)
    return folder


def npy_bytes(array, allow_pickle=False):
    import io
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def huge_header():
    """An .npy header promising 10^12 x 512 floats (2 PB) before a few bytes of data."""
    import io
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (10 ** 12, 512)})
    return buffer.getvalue() + bytes(64)


HOSTILE_EMBEDDINGS = {
    "object array": ({"text_features.npy": npy_bytes(np.array([[1, "x"]], dtype=object), allow_pickle=True)},
                     r"text_features.npy: not an array of numbers .*Python objects"),
    "strings": ({"image_features.npy": npy_bytes(np.array([["a", "b"]]))},
                r"image_features.npy: holds <U1 values, not numbers"),
    "huge header": ({"image_features.npy": huge_header()}, r"image_features.npy: not an array of numbers"),
    "float indices": ({"caption_image.npy": npy_bytes(np.zeros(1, np.float32))},
                      r"caption_image.npy: holds float32 values, not integers"),
    "index out of range": ({"caption_image.npy": npy_bytes(np.array([0, 1, 2, 3, 4, 99, 0, 1]))},
                           r"caption_image.npy: caption 5 belongs to image 99, but image_features.npy "
                           r"holds images 0..5"),
    "negative index": ({"caption_image.npy": npy_bytes(np.array([-1, 1, 2, 3, 4, 5, 0, 1]))},
                       r"caption_image.npy: caption 0 belongs to image -1"),
    "nan": ({"image_features.npy": npy_bytes(np.full((6, 16), np.nan, np.float32))},
            r"image_features.npy: 6 of 6 rows hold NaN"),
    "meta not json": ({"meta.json": b"{not json"}, r"meta.json: not JSON"),
    "meta a list": ({"meta.json": b"[1, 2]"}, r"meta.json: expected a JSON object"),
    "skipped not a list": ({"meta.json": b'{"skipped": {"a": 1}}'}, r"meta.json: expected a JSON object"),
}


@pytest.mark.parametrize("name", HOSTILE_EMBEDDINGS)
def test_embeddings_not_as_save_embeddings_writes_them_are_refused_naming_the_file(tmp_path, name):
    replace, message = HOSTILE_EMBEDDINGS[name]
    folder = saved_set(tmp_path, **replace)
    with pytest.raises(DataError, match=message) as refused:
        ev.load_embeddings(folder)
    assert "\n" not in str(refused.value)


@pytest.mark.slow
def test_nan_embeddings_stop_the_command_in_one_line_instead_of_scoring_rsum_600(tmp_path):
    folder = saved_set(tmp_path, **HOSTILE_EMBEDDINGS["nan"][0])
    done = subprocess.run([sys.executable, "evaluation.py", "--embeddings", str(folder)], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 1 and "rsum" not in done.stdout, done.stdout
    assert done.stderr.startswith("evaluation.py: error: ") and len(done.stderr.strip().splitlines()) == 1, \
        done.stderr
    assert "image_features.npy: 6 of 6 rows hold NaN or infinite values" in done.stderr


# ---- the command line ---------------------------------------------------------------------------

@pytest.mark.slow
def test_help_lists_the_flags():
    shown = subprocess.run([sys.executable, "evaluation.py", "--help"], cwd=REPO, capture_output=True,
                           text=True, check=True)
    assert "--zeroshot_dir" in shown.stdout


def test_every_flag_has_help_text():
    actions = [a for a in ev.build_parser()._actions if a.option_strings and a.dest != "help"]
    flags = {a.option_strings[0] for a in actions}
    assert flags >= {"--checkpoint", "--data", "--model_name", "--pretrained", "--output",
                     "--batch_size", "--num_workers", "--device", "--precision", "--save_embeddings",
                     "--embeddings", "--zeroshot_dir", "--templates", "--language", "--chunk_size",
                     "--image_column", "--caption_column", "--split"}
    assert all(a.help for a in actions)


# ---- with a model (tiny-vit-64, random weights) on the generated data set -----------------------

@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    import clip_model
    import data_loader
    root = tmp_path_factory.mktemp("evaluation")
    paths = sample_data.create_sample_dataset(root / "data", num_samples=24, seed=0)
    torch.manual_seed(0)
    setup = clip_model.build_model("tiny-vit-64")
    clip_model.save_checkpoint(root / "best.pt", setup)
    return {"root": root, "setup": setup, "data": paths["index"], "zeroshot": paths["zeroshot"],
            "checkpoint": str(root / "best.pt"), "index": data_loader.load_caption_index(paths["index"])}


RUN = ["--device", "cpu", "--num_workers", "0", "--batch_size", "16"]


@pytest.fixture(scope="module")
def cli_run(sample):
    """One command-line evaluation of the checkpoint: retrieval, zero-shot, embeddings saved."""
    root = sample["root"]
    results = ev.main(["--checkpoint", sample["checkpoint"], "--data", sample["data"],
                       "--zeroshot_dir", sample["zeroshot"], "--save_embeddings", str(root / "embeddings"),
                       "--output", str(root / "results.json"), *RUN])
    return {"results": results, "embeddings": root / "embeddings", "output": root / "results.json"}


def test_evaluation_from_saved_embeddings_equals_evaluation_from_the_model(sample, cli_run):
    direct = ev.evaluate_model(sample["setup"], sample["index"], batch_size=16, num_workers=0,
                               device="cpu", precision="fp32")
    from_embeddings = ev.main(["--embeddings", str(cli_run["embeddings"]), "--chunk_size", "7"])
    assert direct["num_images"] == 24 and direct["num_texts"] == len(sample["index"].captions())
    for results in (cli_run["results"], from_embeddings):
        assert {k: results[k] for k in direct} == direct
        assert results["checkpoint"] == sample["checkpoint"] and results["model"] == "tiny-vit-64"
        assert results["data"] == str(Path(sample["data"]).resolve())
    meta = json.loads((cli_run["embeddings"] / "meta.json").read_text())
    assert meta["captions"] == sample["index"].captions() and len(meta["image_names"]) == 24


def test_output_json_has_the_shape_of_the_issue(cli_run):
    written = json.loads(cli_run["output"].read_text())
    assert written == json.loads(json.dumps(cli_run["results"]))
    assert {"retrieval", "similarity", "zeroshot", "num_images", "num_texts", "checkpoint",
            "data"} <= set(written)
    for direction in ("image_to_text", "text_to_image"):
        assert set(written["retrieval"][direction]) == {"R@1", "R@5", "R@10", "mean_rank", "median_rank"}
    assert set(written["similarity"]) == {"positive_mean", "negative_mean", "gap"}
    assert {"top1", "top5", "per_class", "classnames", "confusion"} <= set(written["zeroshot"])
    assert "captioning" not in written      # a CLIP writes no captions


# ---- a captioner (tiny-coca-64, random weights: the plumbing, not the quality) ------------------

@pytest.fixture(scope="module")
def coca(sample):
    import clip_model
    torch.manual_seed(0)
    setup = clip_model.build_model("tiny-coca-64")
    clip_model.save_checkpoint(sample["root"] / "coca.pt", setup)
    return str(sample["root"] / "coca.pt")


# An untrained decoder rarely writes the end token: short captions keep the test quick.
SHORT = ["--caption_max_length", "5", "--caption_num_beams", "2"]


def test_a_captioner_is_scored_on_the_first_n_images_against_all_the_captions_of_each(sample, coca, capsys):
    results = ev.main(["--checkpoint", coca, "--data", sample["data"], "--caption_images", "3", *SHORT, *RUN])
    captioning, index = results["captioning"], sample["index"]
    assert captioning["num_images"] == 3 and captioning["settings"]["max_length"] == 5
    rows = captioning["captions"]
    assert [row["image"] for row in rows] == [index.image_name(i) for i in range(3)]
    assert [row["references"] for row in rows] == [[index.caption(j) for j in index.captions_of(i)] for i in range(3)]
    assert any(len(row["references"]) > 1 for row in rows)
    scored = ev.caption_metrics([row["generated"] for row in rows], [row["references"] for row in rows])
    assert {key: captioning[key] for key in scored} == scored
    assert "Captioning: 3 generated captions" in capsys.readouterr().out


def test_caption_images_0_turns_captions_off_and_caption_settings_are_checked_before_the_model_loads(sample, coca):
    results = ev.main(["--checkpoint", coca, "--data", sample["data"], "--caption_images", "0", *RUN])
    assert "captioning" not in results and results["num_images"] == 24
    with pytest.raises(SettingsError, match="--caption_top_p must be"):
        ev.main(["--checkpoint", "no/such/checkpoint.pt", "--data", sample["data"], "--caption_top_p", "2"])


def test_pretrained_weights_load_from_a_local_file(sample, cli_run):
    weights = sample["root"] / "weights.pt"
    torch.save({"state_dict": sample["setup"].model.state_dict()}, weights)
    torch.manual_seed(123)  # a random init would now differ from the saved weights
    ev.main(["--model_name", "tiny-vit-64", "--pretrained", str(weights), "--data", sample["data"],
             "--save_embeddings", str(sample["root"] / "from_file"), *RUN])
    from_file = ev.load_embeddings(sample["root"] / "from_file")
    from_checkpoint = ev.load_embeddings(cli_run["embeddings"])
    for name in ("image_features", "text_features"):
        assert np.allclose(from_file[name], from_checkpoint[name], atol=1e-6)
    assert from_file["meta"]["checkpoint"] == str(weights)


def test_zeroshot_on_the_generated_classes_reports_every_class(sample, cli_run):
    zeroshot = cli_run["results"]["zeroshot"]
    names = sorted(p.name for p in Path(sample["zeroshot"]).iterdir())
    assert zeroshot["classnames"] == names and list(zeroshot["per_class"]) == names
    confusion = np.array(zeroshot["confusion"])
    assert confusion.shape == (20, 20) and confusion.sum(axis=1).tolist() == [2] * 20
    assert zeroshot["top1"] == pytest.approx(100 * np.trace(confusion) / 40)
    assert 0 <= zeroshot["top1"] <= zeroshot["top5"] <= 100
    assert zeroshot["templates"] == ev.TEMPLATES["en"]


def decompression_bomb_png(width=30000, height=30000):
    """A valid PNG header that declares 30000 x 30000 pixels: Pillow refuses to decode it."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def damaged(sample, tmp_path_factory):
    """The sample set with one image truncated and one replaced by a decompression bomb."""
    import shutil
    folder = tmp_path_factory.mktemp("damaged") / "data"
    shutil.copytree(Path(sample["data"]).parent, folder)
    entries = json.loads((folder / "data.json").read_text())
    truncated, bomb = folder / entries[3]["image_path"], folder / entries[7]["image_path"]
    truncated.write_bytes(truncated.read_bytes()[:50])
    bomb.write_bytes(decompression_bomb_png())
    return {"index": folder / "data.json", "bad": (3, 7), "names": (str(truncated), str(bomb))}


def test_unreadable_images_are_left_out_with_their_captions_and_named(sample, damaged):
    import data_loader
    index = data_loader.load_caption_index(damaged["index"])
    results = ev.evaluate_model(sample["setup"], index, batch_size=16, num_workers=2)
    good = [i for i in range(index.num_images) if i not in damaged["bad"]]
    reference = ev.evaluate_model(sample["setup"], index.subset(good), batch_size=16)
    assert results["skipped_images"]["count"] == 2
    first = results["skipped_images"]["first"]
    assert damaged["names"][0] in first[0] and "cannot be decoded" in first[0]
    assert damaged["names"][1] in first[1] and "DecompressionBombError" in first[1]
    assert results["retrieval"] == reference["retrieval"] and results["num_images"] == 22
    # (features of images encoded in other batches differ in the last bits: similarity is approx)
    assert results["similarity"] == pytest.approx(reference["similarity"], abs=1e-6)


@pytest.mark.slow
def test_strict_data_stops_at_the_first_unreadable_image_in_one_line(sample, damaged):
    result = subprocess.run([sys.executable, "evaluation.py", "--checkpoint", sample["checkpoint"],
                             "--data", str(damaged["index"]), "--strict_data", "--num_workers", "2"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"evaluation.py: error: image '{damaged['names'][0]}' "
                                                   f"cannot be decoded"), result.stderr


def test_nearest_neighbours_are_the_brute_force_ones_and_pools_keep_them_inside():
    features = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    found = ev.nearest_neighbours(features, 3, chunk_size=64)
    x = torch.nn.functional.normalize(features, dim=1)
    scores = x @ x.T
    scores.fill_diagonal_(-math.inf)
    assert torch.equal(found, scores.topk(3, dim=1).indices)
    pooled = ev.nearest_neighbours(features, 3, chunk_size=64, pool_size=100, seed=1)   # 3 pools
    pools = torch.randperm(300, generator=torch.Generator().manual_seed(1)).tensor_split(3)
    pool_of = {int(i): p for p, pool in enumerate(pools) for i in pool}
    assert all(pool_of[int(j)] == pool_of[i] for i in range(300) for j in pooled[i])
    assert all(i not in pooled[i].tolist() for i in range(300))
