"""Specification of sample_data.py: the generated data set of coloured shapes with captions."""
import json
import os
import re

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import augmentation
import data_loader as dl
import sample_data


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return sample_data.create_sample_dataset(tmp_path_factory.mktemp("sample") / "set", num_samples=12, seed=0)


def _files(folder):
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}


def test_sample_dataset_is_deterministic_for_a_seed(tmp_path):
    first, again, other = (_files(sample_data.create_sample_dataset(tmp_path / name, 6, seed)["folder"])
                           for name, seed in (("a", 3), ("b", 3), ("c", 4)))
    assert first == again
    assert first.keys() == other.keys() and first["data.json"] != other["data.json"]
    assert first["images/00000.png"] != other["images/00000.png"]


def test_sample_dataset_layouts_captions_and_zeroshot_classes(sample):
    entries = json.load(open(sample["index"], encoding="utf-8"))
    colours, shapes = set(sample_data.SAMPLE_COLOURS), set(sample_data.SAMPLE_SHAPES)
    for k, entry in enumerate(entries):
        assert entry["image_path"] == f"images/{k:05d}.png"
        caption_file = os.path.join(sample["folder"], "captions", f"{k:05d}.txt")
        assert open(caption_file, encoding="utf-8").read() == "\n".join(entry["captions"]) + "\n"
        assert 2 <= len(set(entry["captions"])) == len(entry["captions"]) <= 3  # distinct paraphrases
        for caption in entry["captions"]:
            words = re.findall(r"[a-z]+", caption)
            named_colours = [w for w in words if w in colours]
            named_shapes = [w for w in words if w in shapes]
            assert len(named_colours) in (1, 2) and len(named_shapes) == len(named_colours)
            assert len(named_colours) == 2 or {"small", "little", "tiny", "large", "big", "huge"} & set(words)
    classes = sorted(os.listdir(sample["zeroshot"]))
    assert len(classes) == 20 and "red circle" in classes
    red = np.asarray(Image.open(os.path.join(sample["zeroshot"], "red circle", "000.png")), int)
    assert (np.abs(red - sample_data.SAMPLE_COLOURS["red"][0]).max(axis=2) < 10).sum() > 150  # a visible red shape


def test_chinese_sample_captions_are_chinese_and_tokenised(tmp_path):
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    paths = sample_data.create_sample_dataset(tmp_path / "zh", num_samples=8, seed=0, language="zh")
    index = dl.load_caption_index(paths["index"])
    colour_names = [zh for _, zh in sample_data.SAMPLE_COLOURS.values()]
    assert all(any(c in caption for c in colour_names) for caption in index.captions())
    assert "红色圆形" in os.listdir(paths["zeroshot"])
    first, second = (tokenizer([index.caption(j)])[0] for j in (0, index.num_captions - 1))
    assert (first != 0).sum() > 2 and not torch.equal(first, second)  # more than start + end tokens
    dataset = dl.TrainDataset(index, augmentation.TrainAugmentation({"size": 32}, augment=False), tokenizer)
    assert (dataset[0][1] != 0).sum() > 2


def test_a_set_of_some_colours_names_only_those_and_classifies_only_their_shapes(tmp_path):
    paths = sample_data.create_sample_dataset(tmp_path / "rb", num_samples=30, seed=0, colours=("red", "blue"))
    captions = " ".join(dl.load_caption_index(paths["index"]).captions())
    assert "red" in captions and "blue" in captions
    assert not any(colour in captions for colour in ("green", "yellow", "purple"))
    assert sorted(os.listdir(paths["zeroshot"])) == sorted(f"{c} {s}" for c in ("red", "blue")
                                                           for s in sample_data.SAMPLE_SHAPES)


def test_fine_grained_families_are_near_twins_whose_captions_differ_by_one_word(tmp_path):
    paths = sample_data.create_fine_grained_set(tmp_path / "fg", num_families=10, seed=0)
    entries = json.load(open(paths["index"], encoding="utf-8"))
    assert len(entries) == 40
    for family in range(10):
        base, *variants = [entry["caption"].split() for entry in entries[4 * family:4 * family + 4]]
        for words in variants:
            differing = [a != b for a, b in zip(base, words)] + [len(base) != len(words)]
            assert sum(differing) in (1, 2)      # one word, or "on the left" -> "at the top" (one phrase)
        assert len({" ".join(w) for w in [base, *variants]}) == 4
