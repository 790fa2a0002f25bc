"""Specification of data_loader.py: every format, bad input, the sample set, exact sampling."""
import base64
import csv
import dataclasses
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from open_clip.transform import PreprocessCfg
from PIL import Image

import augmentation
import data_loader as dl
import sample_data
import train
from errors import DataError

ROOT = Path(__file__).resolve().parent.parent

PREPROCESS = dataclasses.asdict(PreprocessCfg(size=32))  # the shape of model.visual.preprocess_cfg


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return sample_data.create_sample_dataset(tmp_path_factory.mktemp("sample") / "set", num_samples=12, seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-32")


def png_bytes(image: Image.Image, fmt="PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def write_png(path, colour=(255, 0, 0)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def write_json(path, entries):
    path.write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    return path


def contents(index):
    """{decoded pixels: sorted captions}: what a data set means, whatever the format."""
    return {index.load_image(i).tobytes(): sorted(index.caption(j) for j in index.captions_of(i))
            for i in range(index.num_images)}


def write_table(index, path, delimiter, relative_to=None):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(["filepath", "title"])
        for j in range(index.num_captions):
            name = index.image_name(index.caption_image[j])
            writer.writerow([os.path.relpath(name, relative_to) if relative_to else name, index.caption(j)])
    return path


def write_chinese_clip(index, folder, split="train"):
    folder.mkdir()
    with open(folder / f"{split}_imgs.tsv", "w") as f:
        for i in range(index.num_images):
            with open(index.image_name(i), "rb") as image:
                f.write(f"{1000 + i}\t{base64.urlsafe_b64encode(image.read()).decode()}\n")
    with open(folder / f"{split}_texts.jsonl", "w", encoding="utf-8") as f:
        for j in range(index.num_captions):
            image_id = 1000 + int(index.caption_image[j])
            f.write(json.dumps({"text_id": j, "text": index.caption(j), "image_ids": [image_id]}) + "\n")
    return folder


# ----------------------------------------------------------------------------- formats

def test_every_format_loads_the_same_samples(sample, tmp_path):
    reference = dl.load_caption_index(sample["index"])
    folder = tmp_path / "folder"  # the images/ + captions/ layout on its own (no data.json beside it)
    for sub in ("images", "captions"):
        shutil.copytree(os.path.join(sample["folder"], sub), folder / sub)
    cn = write_chinese_clip(reference, tmp_path / "cn")
    sources = [sample["folder"], folder, write_table(reference, tmp_path / "pairs.csv", ","),
               write_table(reference, tmp_path / "pairs.tsv", "\t", relative_to=tmp_path),
               cn, cn / "train_texts.jsonl"]
    expected = contents(reference)
    assert len(expected) == 12 and reference.num_captions >= 24
    for source in sources:
        index = dl.load_caption_index(source)
        assert (index.num_images, index.num_captions) == (12, reference.num_captions), source
        assert contents(index) == expected, source
    assert dl.load_caption_index(folder).source == str(folder)  # really read as the folder layout


def test_table_columns_are_configurable_and_the_separator_is_detected(tmp_path):
    write_png(tmp_path / "a.png")
    (tmp_path / "pairs.txt").write_text('id;img;text\n1;a.png;"a red square, small"\n2;a.png;red\n')
    index = dl.load_caption_index(tmp_path / "pairs.txt", image_column="img", caption_column="text")
    assert index.num_images == 1 and index.captions() == ["a red square, small", "red"]


def test_an_image_named_several_times_is_one_image_with_all_its_captions(tmp_path):
    write_png(tmp_path / "a.png"), write_png(tmp_path / "b.png")
    index = dl.load_caption_index(write_json(tmp_path / "data.json", [
        {"image_path": "a.png", "captions": ["a1", "a2"]}, {"image_path": "b.png", "caption": "b1"},
        {"image_path": "a.png", "caption": "a3"}]))
    assert (index.num_images, index.num_captions) == (2, 4)
    assert index.caption_image.tolist() == [0, 0, 0, 1]
    assert [index.caption(j) for j in index.captions_of(0)] == ["a1", "a2", "a3"]
    assert [index.caption(j) for j in index.captions_of(1)] == ["b1"]


def test_chinese_clip_text_of_several_images_belongs_to_each_and_unused_images_are_left_out(tmp_path):
    encoded = [base64.urlsafe_b64encode(png_bytes(Image.new("RGB", (4, 4), c))).decode()
               for c in ("red", "blue", "green")]
    (tmp_path / "valid_imgs.tsv").write_text("".join(f"{k}\t{e}\n" for k, e in zip((7, 8, 9), encoded)))
    (tmp_path / "valid_texts.jsonl").write_text(
        '{"text_id": 1, "text": "红色和蓝色", "image_ids": [7, 8]}\n'
        '{"text_id": 2, "text": "蓝色", "image_ids": [8]}\n',
        encoding="utf-8")
    index = dl.load_caption_index(tmp_path, split="valid")
    assert [index.image_name(i) for i in range(index.num_images)] == ["7", "8"]  # 9 has no text
    assert index.captions() == ["红色和蓝色", "红色和蓝色", "蓝色"]
    assert index.caption_image.tolist() == [0, 1, 1]
    assert index.load_image(1).getpixel((0, 0)) == (0, 0, 255)


def test_split_is_per_image_seeded_and_keeps_every_caption_with_its_image(sample):
    index = dl.load_caption_index(sample["index"])
    train, val = dl.split_by_image(index, 0.25, seed=1)
    names = lambda part: {part.image_name(i) for i in range(part.num_images)}  # noqa: E731
    assert val.num_images == 3 and train.num_images == 9
    assert not names(train) & names(val) and names(train) | names(val) == names(index)
    assert train.num_captions + val.num_captions == index.num_captions
    assert contents(train) | contents(val) == contents(index)  # captions travel with their image
    assert names(dl.split_by_image(index, 0.25, seed=1)[1]) == names(val)
    assert any(names(dl.split_by_image(index, 0.25, seed=s)[1]) != names(val) for s in (2, 3))


# ----------------------------------------------------------------------------- bad input

def test_invalid_json_names_the_file_and_line(tmp_path):
    (tmp_path / "data.json").write_text('[{"image_path": "a.png",\n "caption": }]')
    with pytest.raises(DataError, match=r"data\.json: not valid JSON \(line 2"):
        dl.load_caption_index(tmp_path)


def test_entry_without_image_path_is_named_by_number(tmp_path):
    write_png(tmp_path / "a.png")
    path = write_json(tmp_path / "train.json", [{"image_path": "a.png", "caption": "x"}, {"caption": "y"}])
    with pytest.raises(DataError, match=re.escape(f"{path}, entry 1: missing 'image_path'")):
        dl.load_caption_index(path)


def test_empty_caption_names_the_entry_and_image(tmp_path):
    write_png(tmp_path / "a.png"), write_png(tmp_path / "b.png")
    path = write_json(tmp_path / "train.json", [{"image_path": "a.png", "caption": "x"},
                                                {"image_path": "b.png", "captions": ["ok", "  "]}])
    with pytest.raises(DataError, match=re.escape(f"{path}, entry 1: empty caption for image 'b.png'")):
        dl.load_caption_index(path)


def test_missing_images_are_skipped_and_named_at_load_time_or_stop_a_strict_load(tmp_path):
    write_png(tmp_path / "img" / "0.png"), write_png(tmp_path / "img" / "3.png", (0, 0, 255))
    path = write_json(tmp_path / "train.json", [
        {"image_path": f"img/{k}.png", "captions": [f"caption {k}", f"other {k}"]} for k in range(5)])
    resolved = tmp_path / "img" / "1.png"
    message = f"{path}, entry 1: image 'img/1.png' not found (resolved to {resolved})"
    index = dl.load_caption_index(path)
    assert index.num_images == 2 and index.skipped[0] == message and len(index.skipped) == 3
    assert [index.image_name(i) for i in range(2)] == [str(tmp_path / "img/0.png"), str(tmp_path / "img/3.png")]
    assert index.captions() == ["caption 0", "other 0", "caption 3", "other 3"]
    assert index.caption_image.tolist() == [0, 0, 1, 1]
    with pytest.raises(DataError, match=re.escape(message + "; 2 more images are missing")):
        dl.load_caption_index(path, strict=True)


def test_an_index_whose_images_are_all_missing_is_an_error(tmp_path):
    path = write_json(tmp_path / "train.json", [{"image_path": "nowhere.png", "caption": "x"}])
    with pytest.raises(DataError, match="entry 0: image 'nowhere.png' not found"):
        dl.load_caption_index(path)


def test_a_symlink_loop_in_a_captions_folder_is_named_in_one_line(tmp_path):
    write_png(tmp_path / "images" / "cat.png")
    (tmp_path / "captions").mkdir()
    os.symlink(tmp_path / "captions" / "cat.txt", tmp_path / "captions" / "cat.txt")
    with pytest.raises(DataError, match="cat.txt: cannot be read \\(Too many levels of symbolic links"):
        dl.load_caption_index(tmp_path)


def test_caption_file_that_is_not_utf8_is_named(tmp_path):
    write_png(tmp_path / "images" / "cat.png")
    (tmp_path / "captions").mkdir()
    (tmp_path / "captions" / "cat.txt").write_bytes(b"a cat\n\xff\xfe caf\xe9\n")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'captions' / 'cat.txt'}, entry 0: caption "
                                                     f"file of image 'images/cat.png' is not UTF-8")):
        dl.load_caption_index(tmp_path)


def test_table_without_the_columns_shows_its_header(tmp_path):
    (tmp_path / "pairs.csv").write_text("path,text\na.png,x\n")
    with pytest.raises(DataError, match="header 'path,text' lacks the columns 'filepath' and 'title'"):
        dl.load_caption_index(tmp_path / "pairs.csv")


def test_chinese_clip_text_pointing_to_an_unknown_image_is_named(tmp_path):
    (tmp_path / "train_imgs.tsv").write_text("1\tAAAA\n")
    (tmp_path / "train_texts.jsonl").write_text('{"text_id": 1, "text": "x", "image_ids": [1]}\n'
                                                '{"text_id": 2, "text": "y", "image_ids": [5]}\n')
    with pytest.raises(DataError, match=r"train_texts\.jsonl, entry 1: image id 5 is not in .*train_imgs"):
        dl.load_caption_index(tmp_path)


BROKEN_IMAGES = {"empty": b"", "truncated": png_bytes(Image.new("RGB", (64, 64), "red"))[:60],
                 "not an image": b"<html>404 not found</html>"}
BROKEN_MESSAGES = {"empty": "is empty (0 bytes)", "truncated": "cannot be decoded",
                   "not an image": "cannot be decoded (UnidentifiedImageError"}


@pytest.fixture
def index_with_broken_image(tmp_path):
    write_png(tmp_path / "good1.png"), write_png(tmp_path / "good2.png", (0, 0, 255))
    (tmp_path / "broken.png").write_bytes(BROKEN_IMAGES["truncated"])
    return dl.load_caption_index(write_json(tmp_path / "data.json", [
        {"image_path": name, "caption": "a picture"} for name in ("good1.png", "broken.png", "good2.png")]))


@pytest.mark.parametrize("kind", BROKEN_IMAGES)
def test_undecodable_image_raises_data_error_naming_it(kind, tmp_path):
    (tmp_path / "x.png").write_bytes(BROKEN_IMAGES[kind])
    index = dl.load_caption_index(write_json(tmp_path / "data.json", [{"image_path": "x.png", "caption": "c"}]))
    message = f"image '{tmp_path / 'x.png'}' {BROKEN_MESSAGES[kind]}"
    with pytest.raises(DataError, match=re.escape(message)):
        index.load_image(0)


def test_a_failed_image_is_dropped_from_its_batch_and_its_message_kept_even_from_a_worker(
        index_with_broken_image, tokenizer):
    dataset = dl.TrainDataset(index_with_broken_image, augmentation.TrainAugmentation(PREPROCESS), tokenizer)
    batch = dl.collate_batch([dataset[i] for i in range(3)])
    assert batch["images"].shape == (2, 3, 32, 32) and batch["image_ids"].tolist() == [0, 2]
    assert batch["failed"] == [f"image '{index_with_broken_image.image_name(1)}' cannot be decoded "
                               f"(OSError: image file is truncated)"]
    # Workers never raise for a bad image: the main process decides (skip, or stop in one line).
    loader = dl.build_dataloader(dataset, 3, num_workers=1, train=False)
    assert next(iter(loader))["failed"] == batch["failed"]
    images = dl.ImageDataset(index_with_broken_image, dl.image_transform(PREPROCESS))
    batch = dl.collate_images([images[i] for i in range(3)])
    assert batch["indices"].tolist() == [0, 2] and batch["failed"][0][0] == 1


# ----------------------------------------------------------------------------- image modes

def _rgba():
    image = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    image.putpixel((1, 0), (255, 0, 0, 255))
    return png_bytes(image)


def _palette(transparent: bool):
    image = Image.new("P", (2, 1), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((1, 0), 1)
    return png_bytes(image, transparency=0) if transparent else png_bytes(image)


def _exif_rotated():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # stored: red left half, blue right half
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return png_bytes(image, "JPEG", exif=exif, quality=95)


MODES = {  # name: (encoded image, size expected, {pixel: colour expected})
    "RGBA": (_rgba(), (2, 1), {(0, 0): (255, 255, 255), (1, 0): (255, 0, 0)}),
    "LA": (png_bytes(Image.new("LA", (1, 1), (0, 0))), (1, 1), {(0, 0): (255, 255, 255)}),
    "P transparent": (_palette(True), (2, 1), {(0, 0): (255, 255, 255), (1, 0): (255, 0, 0)}),
    "P opaque": (_palette(False), (2, 1), {(0, 0): (0, 0, 0), (1, 0): (255, 0, 0)}),
    "I;16 max": (png_bytes(Image.fromarray(np.full((2, 2), 65535, np.uint16))), (2, 2), {(0, 0): (255,) * 3}),
    "I;16 mid": (png_bytes(Image.fromarray(np.full((2, 2), 128 * 257, np.uint16))), (2, 2),
                 {(0, 0): (128,) * 3}),
    "I 32-bit": (png_bytes(Image.fromarray(np.full((2, 2), 65535, np.int32)), "TIFF"), (2, 2),
                 {(0, 0): (255,) * 3}),
    "L": (png_bytes(Image.new("L", (1, 1), 100)), (1, 1), {(0, 0): (100, 100, 100)}),
    "CMYK": (png_bytes(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"), (8, 8), {(4, 4): (255, 0, 0)}),
    "EXIF rotated": (_exif_rotated(), (20, 40), {(10, 5): (255, 0, 0), (10, 34): (0, 0, 255)}),
}


@pytest.mark.parametrize("mode", MODES)
def test_every_image_mode_becomes_correct_rgb(mode):
    data, size, pixels = MODES[mode]
    image = dl.decode_image(data, mode)
    assert image.mode == "RGB" and image.size == size
    for xy, colour in pixels.items():
        assert np.abs(np.subtract(image.getpixel(xy), colour)).max() <= 8, (xy, image.getpixel(xy))


# ----------------------------------------------------------------------------- sampling

def test_cached_images_give_the_samples_of_uncached_ones_and_leave_out_broken_ones(
        index_with_broken_image, tokenizer):
    augment = augmentation.TrainAugmentation(PREPROCESS)
    index, cache = dl.cache_images(index_with_broken_image, augment, num_workers=1)
    assert index.num_images == 2 and len(cache) == 2 and "broken.png" in index.skipped[0]
    assert cache.nbytes == sum(a.size for a in (cache[0], cache[1])) and not cache[0].flags.writeable
    cached = dl.TrainDataset(index, augment, tokenizer, seed=3, cache=cache)
    decoded = dl.TrainDataset(index, augment, tokenizer, seed=3)
    for i in range(2):
        assert all(torch.equal(a, b) for a, b in zip(cached[i][:2], decoded[i][:2]))
    with pytest.raises(DataError, match="broken.png"):
        dl.cache_images(index_with_broken_image, augment, strict=True)


class NoPixels:
    """An augmentation that keeps nothing of the image: for tests of caption sampling."""

    def prepare(self, image):
        return np.zeros((1, 1, 3), dtype=np.uint8)

    def draw(self, shapes, uniforms):
        return [None] * len(shapes)

    def apply(self, pixels, draw):
        return torch.zeros(1)


def test_each_epoch_draws_one_seeded_caption_per_image(sample):
    index = dl.load_caption_index(sample["index"])
    dataset = dl.TrainDataset(index, NoPixels(), lambda texts: texts, seed=1)
    draws = []
    for epoch in range(6):
        dataset.set_epoch(epoch)
        draws.append([dataset[i][1] for i in range(index.num_images)])
    for i in range(index.num_images):
        own = {index.caption(j) for j in index.captions_of(i)}
        assert {epoch_draws[i] for epoch_draws in draws} <= own
    assert draws[0] != draws[1]
    dataset.set_epoch(0)
    assert [dataset[i][1] for i in range(index.num_images)] == draws[0]
    assert dataset.captions_shown(1) == draws[1]                                   # what mining embeds


def test_by_caption_an_epoch_shows_every_caption_once_with_its_own_image_and_crop(sample):
    index = dl.load_caption_index(sample["index"])
    augment = augmentation.TrainAugmentation(PREPROCESS, crop_min_scale=0.5)
    dataset = dl.TrainDataset(index, augment, lambda texts: texts, seed=1, by_caption=True)
    assert len(dataset) == index.num_captions > index.num_images
    dataset.set_epoch(2)
    samples = [dataset[k] for k in range(len(dataset))]
    assert [text for _, text, _, _ in samples] == index.captions()
    assert [i for _, _, i, _ in samples] == index.caption_image.tolist()      # the loss's image ids
    assert [index.captions_of(i)[choice] for _, _, i, choice in samples] == list(range(len(dataset)))
    assert len(index.captions_of(0)) > 1
    for k, j in zip(index.captions_of(0), index.captions_of(0)[1:]):       # own crops, same picture
        assert not torch.equal(samples[k][0], samples[j][0])
    assert torch.equal(dataset[3][0], samples[3][0]) and dataset.captions_shown(2)[3] == samples[3][1]
    dataset.set_epoch(3)
    assert not torch.equal(dataset[3][0], samples[3][0])                    # new crops each epoch


def test_tokenised_captions_give_the_samples_of_tokenising_each_draw(sample, tokenizer):
    index = dl.load_caption_index(sample["index"])
    tokens = dl.tokenize_captions(index.captions(), tokenizer, chunk=5)      # several chunks
    assert tokens.dtype == torch.int32 and torch.equal(tokens.long(), tokenizer(index.captions()))
    looked_up = dl.TrainDataset(index, NoPixels(), tokenizer, seed=1, tokens=tokens)
    tokenised = dl.TrainDataset(index, NoPixels(), tokenizer, seed=1)
    choices = []
    for epoch in range(3):
        looked_up.set_epoch(epoch), tokenised.set_epoch(epoch)
        for i in range(index.num_images):
            (_, a, _, choice), (_, b, _, same_choice) = looked_up[i], tokenised[i]
            assert choice == same_choice and a.dtype == torch.long and torch.equal(a, b)
            choices.append(choice)
    assert max(choices) > 0          # later captions of an image were drawn too


def test_train_batches_do_not_depend_on_worker_count(sample, tokenizer):
    index = dl.load_caption_index(sample["index"])

    def batches(num_workers):
        dataset = dl.TrainDataset(index, augmentation.TrainAugmentation(PREPROCESS), tokenizer, seed=5)
        sampler = dl.EpochSampler(len(dataset), seed=5)
        loader = dl.build_dataloader(dataset, 4, sampler=sampler, num_workers=num_workers, seed=5)
        result = []
        for epoch in (0, 1):  # the epoch must reach persistent workers too
            dataset.set_epoch(epoch)
            sampler.set_epoch(epoch)
            result += list(loader)
        return result

    serial, parallel = batches(0), batches(2)
    assert len(serial) == len(parallel) == 6
    dataset = dl.TrainDataset(index, augmentation.TrainAugmentation(PREPROCESS), tokenizer, seed=5)
    together, alone = dataset.__getitems__([4, 1, 6]), [dataset[k] for k in (4, 1, 6)]    # batch-mates
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(together, alone))
    for a, b in zip(serial, parallel):
        assert all(torch.equal(a[key], b[key]) for key in ("images", "texts", "image_ids"))
    assert not torch.equal(serial[0]["images"], serial[3]["images"])


def test_loader_drops_the_last_partial_batch_only_for_training(sample, tokenizer):
    index = dl.load_caption_index(sample["index"])
    evaluation = list(dl.build_dataloader(dl.ImageDataset(index, dl.image_transform(PREPROCESS)), 5,
                                          train=False))
    assert [len(batch["indices"]) for batch in evaluation] == [5, 5, 2]
    assert torch.cat([batch["indices"] for batch in evaluation]).tolist() == list(range(12))
    training = list(dl.build_dataloader(dl.TrainDataset(index, augmentation.TrainAugmentation(PREPROCESS), tokenizer),
                                        5, seed=0))
    assert [len(batch["image_ids"]) for batch in training] == [5, 5]


def test_epoch_sampler_resumes_exactly_after_a_checkpoint():
    sampler = dl.EpochSampler(50, seed=7)
    sampler.set_epoch(2)
    uninterrupted = list(sampler)
    sampler.set_epoch(2, start=20)
    assert uninterrupted[:20] + list(sampler) == uninterrupted
    assert sorted(uninterrupted) == list(range(50))
    sampler.set_epoch(3)
    assert list(sampler) != uninterrupted


def test_epoch_sampler_ranks_partition_an_epoch_without_overlap():
    ranks = [dl.EpochSampler(51, seed=7, rank=r, world_size=2) for r in (0, 1)]
    for sampler in ranks:
        sampler.set_epoch(1)
    first, second = (list(sampler) for sampler in ranks)
    assert len(first) == len(second) == len(ranks[0]) == 25  # cut to a multiple of the world size
    assert not set(first) & set(second)


def test_epoch_sampler_resumed_on_another_world_size_covers_exactly_the_rest():
    single = dl.EpochSampler(40, seed=3)
    order = list(single)
    ranks = [dl.EpochSampler(40, seed=3, rank=r, world_size=2) for r in (0, 1)]
    # 2 ranks, 3 steps of batch 4 each: together they consumed the first 24 entries of the order
    assert set(list(ranks[0])[:12]) | set(list(ranks[1])[:12]) == set(order[:24])
    for sampler in ranks:
        sampler.set_epoch(0, start=24)
    rest = [list(sampler) for sampler in ranks]
    assert not set(rest[0]) & set(rest[1]) and set(rest[0]) | set(rest[1]) == set(order[24:])
    single.set_epoch(0, start=24)  # and back on one process
    assert list(single) == order[24:]


# ----------------------------------------------------------------------------- Chinese-CLIP LMDB

def write_chinese_clip_lmdb(index, root, split="train", pairs=None):
    """root/lmdb/{split}/imgs and pairs as Chinese-CLIP's preprocessing writes them (read in its
    cn_clip/preprocess/build_lmdb_dataset.py): imgs maps str(image_id) to the url-safe base64 text
    of the image, plus b"num_images"; pairs maps "0", "1", ... to pickle.dumps((image_id, text_id,
    text)), plus b"num_samples". `pairs` replaces the records drawn from the index."""
    import lmdb
    folder = root / "lmdb" / split
    folder.mkdir(parents=True)
    with lmdb.open(str(folder / "imgs"), map_size=1 << 30) as env, env.begin(write=True) as txn:
        for i in range(index.num_images):
            with open(index.image_name(i), "rb") as image:
                txn.put(f"{1000 + i}".encode("utf-8"), base64.urlsafe_b64encode(image.read()))
        txn.put(b"num_images", f"{index.num_images}".encode("utf-8"))
    if pairs is None:
        pairs = [pickle.dumps((1000 + int(index.caption_image[j]), j, index.caption(j)))
                 for j in range(index.num_captions)]
    with lmdb.open(str(folder / "pairs"), map_size=1 << 30) as env, env.begin(write=True) as txn:
        for k, record in enumerate(pairs):
            txn.put(f"{k}".encode("utf-8"), record)
        txn.put(b"num_samples", f"{len(pairs)}".encode("utf-8"))
    return folder


def test_chinese_clip_lmdb_reads_like_the_files_it_was_made_from(sample, tmp_path):
    reference = dl.load_caption_index(sample["index"])
    folder = write_chinese_clip_lmdb(reference, tmp_path)
    for path, split in ((folder, "train"), (tmp_path / "lmdb", "train")):  # the split's folder, or lmdb/
        index = dl.load_caption_index(path, split=split)
        assert (index.num_images, index.num_captions) == (12, reference.num_captions)
        assert contents(index) == contents(reference)
        assert index.image_name(0) == "1000" and index.subset([3]).image_name(0) == "1003"


def test_an_image_id_missing_from_the_lmdb_images_is_named(sample, tmp_path):
    reference = dl.load_caption_index(sample["index"])
    folder = write_chinese_clip_lmdb(reference, tmp_path, pairs=[pickle.dumps((7, 0, "一只猫"))])
    with pytest.raises(DataError, match=r"pairs: image id '7' is not in .*imgs"):
        dl.load_caption_index(folder)


class _RunsCode:
    """A pickle that calls open(path, "w") when loaded: it would create the file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_malicious_pickle_in_the_lmdb_is_refused_and_runs_nothing(sample, tmp_path):
    marker = tmp_path / "created-by-the-pickle"
    payload = pickle.dumps((1000, 0, _RunsCode(str(marker))))
    pickle.loads(payload)  # control: plain pickle.loads runs it ...
    assert marker.exists()
    marker.unlink()
    folder = write_chinese_clip_lmdb(dl.load_caption_index(sample["index"]), tmp_path,
                                     pairs=[pickle.dumps((1000, 0, "a good record")), payload])
    with pytest.raises(DataError, match=r"pairs, key 1: refused to unpickle the record: it names "
                                           r"(io|builtins)\.open; only plain data"):
        dl.load_caption_index(folder)
    assert not marker.exists()  # ... our reader does not


def test_an_lmdb_record_that_is_not_image_text_id_and_text_is_named(sample, tmp_path):
    folder = write_chinese_clip_lmdb(dl.load_caption_index(sample["index"]), tmp_path,
                                     pairs=[pickle.dumps({"image_id": 1000, "text": "a dict"})])
    with pytest.raises(DataError, match=r"pairs, key 0: expected a pickled \(image_id, text_id, text\)"):
        dl.load_caption_index(folder)


@pytest.mark.slow
def test_train_runs_on_a_chinese_clip_lmdb_folder(tmp_path):
    root = tmp_path / "muge"
    for split, seed in (("train", 0), ("valid", 1)):
        sample = sample_data.create_sample_dataset(tmp_path / split, 24, seed, language="zh")
        index = dl.load_caption_index(sample["index"])
        write_chinese_clip_lmdb(index, root, split)
    result = train.main(["--data_dir", str(root / "lmdb/train"), "--val_data", str(root / "lmdb/valid"),
                         "--batch_size", "8", "--num_workers", "1", "--max_steps", "3", "--warmup_steps", "1",
                         "--context_length", "48", "--run_name", "cn", "--checkpoint_dir",
                         str(tmp_path / "ckpt"), "--log_dir", str(tmp_path / "logs"),
                         "--results_dir", str(tmp_path / "results")])
    assert result["step"] == 3 and result["history"]["val"][-1]["retrieval"]["rsum"] > 0
    assert "24 training images" in (tmp_path / "logs/cn/train.log").read_text()


# ----------------------------------------------------------------------------- hard-negative batches

def test_hard_negative_batches_are_neighbour_groups_then_random_items_each_item_once():
    rng = np.random.default_rng(0)
    n, batch, share = 103, 10, 0.4
    neighbours = np.array([rng.choice([j for j in range(n) if j != i], 3, replace=False) for i in range(n)])
    captions = [f"caption {i % 50}" for i in range(n)]          # items i and i + 50 share a caption
    images = np.arange(n) // 2                                  # items 2m and 2m + 1 share an image
    order = dl.neighbourhood_order(neighbours, captions, images, batch, share, np.random.default_rng(1))
    assert len(order) == n // batch * batch and len(set(order.tolist())) == len(order)
    again = dl.neighbourhood_order(neighbours, captions, images, batch, share, np.random.default_rng(1))
    assert np.array_equal(order, again)                         # deterministic for a generator
    grouped = 0
    for start in range(0, len(order), batch):
        seed, *rest = order[start:start + round(share * batch)].tolist()   # the hard part of a batch
        for j in rest:
            if j in neighbours[seed]:    # in the seed's group: a neighbour, with another caption and image
                assert captions[j] != captions[seed] and images[j] != images[seed]
                grouped += 1
            else:                        # the next group's seed
                seed = j
    # of the 30 places after a seed, random batches would put a neighbour of it in about 1
    assert grouped >= 15


def test_a_given_order_replaces_the_samplers_draw_and_resumes_in_it():
    order = torch.tensor([5, 3, 1, 0, 2, 4, 7, 6])
    sampler = dl.EpochSampler(8, seed=0, rank=1, world_size=2)
    sampler.set_epoch(0, start=2, order=order)
    assert list(sampler) == [0, 4, 6]                          # order[2:] = 1 0 2 4 7 6, rank 1 of 2


def nested_lists(depth):
    """Lists nested `depth` deep, each holding the next one twice: a pickle of ~7 bytes a level
    (the memo refers to the list again), a repr of 2^depth items."""
    record = []
    for _ in range(depth):
        record = [record, record]
    return record


# Reads the LMDB folder with the process's address space bounded to 1 GiB above what it holds
# once imports are done: a whole repr of the record would need terabytes and fail at once with
# MemoryError (a traceback, exit status 1) instead of swapping the machine.
BOUNDED_READ = """
import resource, sys
import data_loader
from errors import DataError
pages = int(open("/proc/self/statm").read().split()[0])
limit = pages * resource.getpagesize() + 2 ** 30
resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
try:
    data_loader.load_caption_index(sys.argv[1])
except DataError as error:
    print(error)
"""


@pytest.mark.slow
def test_an_lmdb_record_whose_repr_would_exhaust_memory_is_refused_in_one_short_line(sample, tmp_path):
    payload = pickle.dumps(nested_lists(40), protocol=2)
    assert len(payload) == 286
    folder = write_chinese_clip_lmdb(dl.load_caption_index(sample["index"]), tmp_path,
                                     pairs=[pickle.dumps((1000, 0, "a good record")), payload])
    done = subprocess.run([sys.executable, "-c", BOUNDED_READ, str(folder)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    message = done.stdout.strip()
    assert re.fullmatch(r".*pairs, key 1: expected a pickled \(image_id, text_id, text\), found \[\[\[.*", message)
    assert len(message) < len(str(folder)) + 150


@pytest.mark.parametrize("record", [[1000, 0, "a list"], (True, 0, "a boolean id"), (10 ** 5000, 0, "4300 digits"),
                                    (1000, 0, b"bytes"), (1000, 0, "text", "a fourth item")],
                         ids=["list", "bool", "huge int", "bytes", "four items"])
def test_only_the_exact_shape_of_chinese_clips_records_is_accepted(sample, tmp_path, record):
    folder = write_chinese_clip_lmdb(dl.load_caption_index(sample["index"]), tmp_path,
                                     pairs=[pickle.dumps(record)])
    with pytest.raises(DataError, match=r"pairs, key 0: expected a pickled \(image_id, text_id, text\)"):
        dl.load_caption_index(folder)
