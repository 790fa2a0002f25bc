"""Specification of shards.py: our converter's shards and img2dataset's train as they are, an epoch
is shared out among ranks and workers, sources mix by weight, and train.py runs on all of them."""
import io
import itertools
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import augmentation
import data_loader as dl
import sample_data
import shards
import train
from errors import DataError


def byte_tokens(captions):
    """A tokenizer that keeps the text: the caption's utf-8 bytes, padded to 96."""
    return torch.tensor([list(c.encode("utf-8")[:96].ljust(96, b"\0")) for c in captions])


def caption_of(tokens) -> str:
    return bytes(tokens.tolist()).rstrip(b"\0").decode("utf-8")


AUGMENT = augmentation.TrainAugmentation({"size": 32})


class Pixels:
    """An augmentation that keeps the decoded image as it is: uint8 [3, H, W]."""

    def prepare(self, image):
        return np.asarray(image)

    def draw(self, shapes, uniforms):
        return [None] * len(shapes)

    def apply(self, pixels, draw):
        return torch.from_numpy(np.array(pixels)).permute(2, 0, 1)


class NoPixels(Pixels):
    """An augmentation that keeps nothing of the image: for tests of what is read when."""

    def apply(self, pixels, draw):
        return torch.zeros(1)


no_pixels = NoPixels()


def image_bytes(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_img2dataset(folder, samples, per_shard=10, stats=True, urls=None):
    """Shards as img2dataset writes them (read in its writer.py, downloader.py and logger.py):
    NNNNN.tar holding KEY.<image format>, KEY.txt (the caption, '' when there is none) and
    KEY.json (metadata, indented, with the address the image was downloaded from), KEY = shard id
    * 10^4 + position in the shard, in 9 digits; and beside each shard NNNNN_stats.json, whose
    "successes" counts the samples written to the tar. `samples` are (extension, image bytes,
    caption or None); `urls` their addresses (default: one of its own for each)."""
    import webdataset as wds
    folder.mkdir(parents=True)
    for shard_id in range(math.ceil(len(samples) / per_shard)):
        chunk = samples[shard_id * per_shard:(shard_id + 1) * per_shard]
        with wds.TarWriter(str(folder / f"{shard_id:05d}.tar")) as tar:
            for position, (extension, data, caption) in enumerate(chunk):
                key = f"{shard_id * 10**4 + position:09d}"
                url = urls[shard_id * per_shard + position] if urls else f"https://example.com/{key}.{extension}"
                meta = {"url": url, "caption": caption, "key": key,
                        "status": "success", "error_message": None, "width": 64, "height": 64,
                        "original_width": 64, "original_height": 64}
                tar.write({"__key__": key, extension: data, "txt": caption or "",
                           "json": json.dumps(meta, indent=4)})
        if stats:
            (folder / f"{shard_id:05d}_stats.json").write_text(json.dumps({
                "count": len(chunk) + 1, "successes": len(chunk), "failed_to_download": 1,
                "failed_to_resize": 0, "duration": 1.5, "start_time": 1700000000.0,
                "end_time": 1700000001.5, "status_dict": {"success": len(chunk), "404": 1}}, indent=4))
    return str(folder / ("{00000..%05d}.tar" % shard_id))


def write_img2dataset_of(index_path, folder, per_shard=10):
    """The shards img2dataset downloads from a URL list of one row per caption (COCO's and
    Flickr30K's captions come so) made of a JSON index, the images served at their paths: a sample
    per caption in the index's order, each with its image's bytes and address. As img2dataset
    does when it keeps the bytes (disable_all_reencoding), a PNG is stored as KEY.jpg."""
    entries, root = json.loads(Path(index_path).read_text()), Path(index_path).parent
    samples, urls = [], []
    for entry in entries:
        data = (root / entry["image_path"]).read_bytes()
        for caption in entry.get("captions", [entry.get("caption")]):
            samples.append(("jpg", data, caption))
            urls.append(f"http://127.0.0.1:8000/{entry['image_path']}")
    return write_img2dataset(Path(folder), samples, per_shard, urls=urls)


def img2dataset_samples(index, prefix, count, broken=()):
    """(extension, bytes, caption) of the first `count` images of a CaptionIndex in img2dataset's
    image formats; each caption starts with prefix and its image's number, to trace it back."""
    formats = [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"), ("jpeg", "JPEG")]
    samples = []
    for i in range(count):
        extension, fmt = formats[i % len(formats)]
        caption = f"{prefix}{i}: {index.caption(int(index.captions_of(i)[0]))}"
        samples.append((extension, image_bytes(index.load_image(i), fmt), caption))
    for i, kind in broken:
        extension, data, caption = samples[i]
        samples[i] = (extension, b"\xff\xd8 not a jpeg", caption) if kind == "image" else (extension, data, None)
    return samples


@pytest.fixture(scope="module")
def sample_set(tmp_path_factory):
    return sample_data.create_sample_dataset(tmp_path_factory.mktemp("data") / "set", num_samples=200, seed=0)


@pytest.fixture(scope="module")
def shard_set(sample_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "set"
    info = shards.convert_to_webdataset(sample_set["index"], out, shard_size=10, seed=0)
    return {"pattern": str(out / "{00000..00019}.tar"), "folder": out, "info": info,
            "index": dl.load_caption_index(sample_set["index"])}


@pytest.fixture(scope="module")
def web_set(shard_set, tmp_path_factory):
    """img2dataset shards of 24 images in 3 shards; image 5 is not an image, image 14 has no caption."""
    folder = tmp_path_factory.mktemp("img2dataset") / "laion"
    samples = img2dataset_samples(shard_set["index"], "web ", 24, broken=[(5, "image"), (14, "caption")])
    return {"pattern": write_img2dataset(folder, samples), "folder": folder, "samples": samples}


def read_shards(folder):
    """{shard name: [(key, files)]} straight from the tar files."""
    import webdataset as wds
    names = sorted(f for f in os.listdir(folder) if f.endswith(".tar"))
    return {name: [(s["__key__"], s) for s in wds.tarfile_samples([{"url": str(folder / name)}])]
            for name in names}


def epoch_batches(dataset_args, epoch, world_size, num_workers, batch_size=5, start=0, **options):
    """Each rank's batches of an epoch, as collate_batch makes them."""
    ranks = []
    for rank in range(world_size):
        dataset = shards.WebDatasetTrain(*dataset_args, seed=0, rank=rank, world_size=world_size, **options)
        dataset.set_epoch(epoch, start)
        ranks.append(list(dl.build_dataloader(dataset, batch_size, num_workers=num_workers)))
    return ranks


def epoch_ids(pattern, epoch, world_size, num_workers, batch_size=5, start=0, loaders=None, **options):
    """The sample ids each rank's DataLoader yields in an epoch, batch by batch."""
    if loaders:
        for loader in loaders:
            loader.dataset.set_epoch(epoch, start)
        return [[batch["image_ids"].tolist() for batch in loader] for loader in loaders]
    return [[batch["image_ids"].tolist() for batch in batches] for batches in
            epoch_batches((pattern, no_pixels, byte_tokens), epoch, world_size, num_workers, batch_size,
                          start, **options)]


def flat(ranks):
    return [i for batches in ranks for batch in batches for i in batch]


# ----------------------------------------------------------------------------- our converter's shards

def test_shards_converted_from_a_json_index_hold_every_image_with_all_its_captions(shard_set):
    index, written = shard_set["index"], read_shards(shard_set["folder"])
    assert shard_set["info"]["total"] == index.num_images == 200
    assert [len(samples) for samples in written.values()] == [10] * 20
    keys = [key for samples in written.values() for key, _ in samples]
    assert sorted(int(key) for key in keys) == list(range(200))
    for samples in written.values():
        for key, files in samples:
            i, meta = int(key), json.loads(files["json"])
            assert meta["captions"] == [index.caption(j) for j in index.captions_of(i)]
            assert meta["image"] == index.image_name(i)
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(files["png"]))),
                                  np.asarray(index.load_image(i)))


def test_webdataset_train_yields_the_samples_train_dataset_gives_the_source(shard_set):
    streamed = shards.WebDatasetTrain(shard_set["pattern"], AUGMENT, byte_tokens, seed=3)
    indexed = dl.TrainDataset(shard_set["index"], AUGMENT, byte_tokens, seed=3)
    streamed.set_epoch(2)
    indexed.set_epoch(2)
    seen = []
    for pixels, tokens, i, choice in streamed:  # the same caption drawn, the same crop of the same pixels
        expected_pixels, expected_tokens, _, expected_choice = indexed[i]
        assert torch.equal(pixels, expected_pixels) and torch.equal(tokens, expected_tokens), i
        assert choice == expected_choice
        seen.append(i)
    assert sorted(seen) == list(range(200)) and len(streamed) == 200


def test_two_ranks_with_two_workers_each_read_every_sample_once_per_epoch(shard_set):
    loaders = []
    for rank in range(2):  # persistent workers, which must learn the new epoch
        dataset = shards.WebDatasetTrain(shard_set["pattern"], no_pixels, byte_tokens, rank=rank,
                                         world_size=2)
        loaders.append(dl.build_dataloader(dataset, 5, num_workers=2))
    orders = []
    for epoch in range(2):
        ranks = epoch_ids(shard_set["pattern"], epoch, 2, 2, loaders=loaders)
        assert len(ranks[0]) == len(ranks[1])  # ranks step together: DDP needs as many batches
        assert sorted(flat(ranks)) == list(range(200))  # 20 shards of 10 over 4 readers: nothing left out
        orders.append(flat(ranks))
    assert orders[0] != orders[1]


def test_shards_that_do_not_share_out_evenly_leave_out_less_than_documented_and_never_repeat(shard_set):
    ranks = epoch_ids(shard_set["pattern"], 0, world_size=3, num_workers=0)  # 20 shards, 3 readers
    assert len({len(batches) for batches in ranks}) == 1
    ids = flat(ranks)
    assert len(ids) == len(set(ids))
    assert len(ids) > 200 - 2 * 3 * 10  # the bound in WebDatasetTrain's docstring


def test_resuming_mid_epoch_skips_whole_shards_holding_the_consumed_samples(shard_set):
    shard_of = {int(key): name for name, samples in read_shards(shard_set["folder"]).items()
                for key, _ in samples}
    ids = flat(epoch_ids(shard_set["pattern"], 1, world_size=1, num_workers=0, start=100))
    assert len(ids) == len(set(ids)) == 100
    assert len({shard_of[i] for i in ids}) == 10  # 10 whole shards read, the other 10 skipped unread


def test_to_webdataset_resizes_skips_unreadable_images_and_prints_the_pattern(tmp_path, capsys):
    Image.new("RGB", (90, 60), (200, 10, 10)).save(tmp_path / "wide.jpg", quality=90)
    Image.new("RGB", (20, 10), (10, 10, 200)).save(tmp_path / "small.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    index = tmp_path / "data.json"
    index.write_text(json.dumps([{"image_path": name, "caption": f"a {name}"}
                                 for name in ("wide.jpg", "small.png", "broken.jpg")]))
    out = tmp_path / "shards"
    shards.main(["--to_webdataset", str(index), str(out), "--shard_size", "1", "--resize", "30"])
    printed = capsys.readouterr().out
    assert f"'{out}/{{00000..00001}}.tar'" in printed
    assert "1 unreadable" in printed and "broken.jpg" in printed
    files = {int(key): files for samples in read_shards(out).values() for key, files in samples}
    assert Image.open(io.BytesIO(files[0]["jpg"])).size == (45, 30)       # shorter side 60 -> 30
    assert files[1]["png"] == (tmp_path / "small.png").read_bytes()     # small enough: bytes kept
    assert dl.is_webdataset(f"{out}/{{00000..00001}}.tar") and dl.is_webdataset(out)
    assert dl.is_webdataset(f"{index}::{out}")  # a mixture: its non-shard part is refused later
    assert not dl.is_webdataset(index) and not dl.is_webdataset(tmp_path)


# ----------------------------------------------------------------------------- img2dataset's shards

def test_img2dataset_shards_train_as_written_skipping_and_naming_the_bad_samples(web_set):
    dataset = shards.WebDatasetTrain(web_set["pattern"], Pixels(), byte_tokens, seed=0)
    assert len(dataset) == 24  # the "successes" of the three _stats.json files
    batches = list(dl.build_dataloader(dataset, 4, train=False))
    failed = sorted(message for batch in batches for message in batch["failed"])
    folder = web_set["pattern"][:-len("{00000..00002}.tar")]
    assert len(failed) == 2
    assert failed[0].startswith(f"{folder}00001.tar, sample 000010004: no caption")
    assert failed[1].startswith(f"image '{folder}00000.tar, sample 000000005' cannot be decoded")
    seen = {}
    for batch in batches:
        for pixels, tokens, i in zip(batch["images"], batch["texts"], batch["image_ids"].tolist()):
            caption = caption_of(tokens)
            number = int(caption.split(":")[0].removeprefix("web "))
            extension, data, written = web_set["samples"][number]
            assert caption == written  # the caption of this very sample, with the image it came with
            assert torch.equal(pixels, torch.from_numpy(np.array(dl.decode_image(data, extension))).permute(2, 0, 1))
            seen[number] = i
    assert sorted(seen) == sorted(set(range(24)) - {5, 14})
    assert len(set(seen.values())) == 22  # one id per sample: the loss never merges two images
    again = shards.WebDatasetTrain(web_set["pattern"], no_pixels, byte_tokens, seed=0)
    again.set_epoch(3)
    assert {caption_of(t): i for _, t, i, _ in (s for s in again if not isinstance(s, dl.FailedSample))} == \
        {web_set["samples"][n][2]: i for n, i in seen.items()}  # ids are stable across runs and epochs


def test_sources_with_the_same_keys_mix_without_sharing_an_id(web_set):
    twice = f"{web_set['pattern']}::{web_set['folder']}"  # the same set as a pattern and as a folder
    ids = flat(epoch_ids(twice, 0, world_size=1, num_workers=0, batch_size=6))  # 48 samples, 4 bad
    assert len(ids) == len(set(ids)) == 2 * 22
    assert sorted(i >> shards.SOURCE_SHIFT for i in ids) == [0] * 22 + [1] * 22


def test_shards_without_counts_need_train_num_samples_and_then_give_every_rank_as_many(web_set, tmp_path):
    for shard in ("00000.tar", "00001.tar", "00002.tar"):
        shutil.copy(web_set["folder"] / shard, tmp_path / shard)
    pattern = str(tmp_path / "{00000..00002}.tar")
    with pytest.raises(DataError, match=r"00000.tar: .*unknown.*00000_stats.json.*--train_num_samples"):
        shards.WebDatasetTrain(pattern, no_pixels, byte_tokens)
    ranks = epoch_ids(pattern, 0, world_size=2, num_workers=0, batch_size=3, num_samples=30)
    assert [len(batches) for batches in ranks] == [5, 5]  # 15 samples a rank: its shards start over
    assert shards.WebDatasetTrain(pattern, no_pixels, byte_tokens, num_samples=30).__len__() == 30


def test_our_shards_without_their_info_file_count_with_train_num_samples(shard_set, tmp_path):
    shutil.copy(shard_set["folder"] / "00000.tar", tmp_path / "00000.tar")
    with pytest.raises(DataError, match="_stats.json.*--train_num_samples"):
        shards.WebDatasetTrain(tmp_path / "00000.tar", no_pixels, byte_tokens)
    dataset = shards.WebDatasetTrain(tmp_path / "00000.tar", no_pixels, byte_tokens, num_samples=10)
    ids = [i for _, _, i, _ in dataset]
    assert len(set(ids)) == 10


# ----------------------------------------------------------------------------- mixing and resampling

@pytest.fixture(scope="module")
def two_sources(shard_set, tmp_path_factory):
    """Source A: 20 samples in 2 shards; source B: 40 in 4 (img2dataset layout)."""
    folder, index = tmp_path_factory.mktemp("mix"), shard_set["index"]
    a = write_img2dataset(folder / "a", img2dataset_samples(index, "a", 20))
    b = write_img2dataset(folder / "b", img2dataset_samples(index, "b", 40))
    return f"{a}::{b}"


def source_share(ids, source=1):
    return sum(i >> shards.SOURCE_SHIFT == source for i in ids) / len(ids)


@pytest.mark.slow
def test_resampling_draws_each_source_by_its_weight(two_sources):
    weighted = flat(epoch_ids(two_sources, 0, 1, 0, num_samples=800, weights="1,3", resampled=True))
    assert len(weighted) == 800
    assert abs(source_share(weighted) - 0.75) < 0.06  # 4 standard deviations of 800 draws
    by_size = flat(epoch_ids(two_sources, 0, 1, 0, num_samples=800, resampled=True))
    assert abs(source_share(by_size) - 2 / 3) < 0.07


@pytest.mark.slow
def test_resampling_serves_more_readers_than_shards_and_differs_by_epoch(two_sources):
    a_only = two_sources.split("::")[0]  # 2 shards, 2 ranks x 2 workers
    epochs = [epoch_ids(a_only, epoch, 2, 2, num_samples=40, resampled=True) for epoch in range(2)]
    for ranks in epochs:
        assert [len(batches) for batches in ranks] == [4, 4]  # 2 workers x 10 samples, batches of 5
    assert flat(epochs[0]) != flat(epochs[1])
    assert flat(epochs[0]) == flat(epoch_ids(a_only, 0, 2, 2, num_samples=40, resampled=True))


def test_without_resampling_sources_are_one_pool_read_once(two_sources):
    ids = flat(epoch_ids(two_sources, 0, 2, 0))
    assert len(ids) == len(set(ids)) == 60


@pytest.mark.parametrize("options, message", [
    ({"weights": "1,3"}, "--data_weights needs --data_resampled"),
    ({"weights": "1", "resampled": True}, "expected 2 positive numbers"),
    ({"weights": "1,x", "resampled": True}, "numbers separated by commas"),
])
def test_wrong_weights_are_refused_with_the_way_out(two_sources, options, message):
    with pytest.raises(DataError, match=message):
        shards.WebDatasetTrain(two_sources, no_pixels, byte_tokens, **options)


def test_a_source_that_is_not_shards_is_refused(two_sources, sample_set):
    with pytest.raises(DataError, match="data.json: not WebDataset shards"):
        shards.WebDatasetTrain(f"{two_sources}::{sample_set['index']}", no_pixels, byte_tokens)


def test_inspect_shows_how_each_source_is_counted(two_sources, shard_set, capsys):
    shards.main(["--inspect", f"{two_sources}::{shard_set['folder']}"])
    printed = capsys.readouterr().out
    assert "source 0: " in printed and "2 shards, 20 samples counted (*_stats.json)" in printed
    assert "4 shards, 40 samples counted" in printed
    assert "20 shards, 200 samples counted (_info.json)" in printed
    assert "sample 000000000 [jpg, json, txt]: a0: " in printed


# ----------------------------------------------------------------------------- shards read into an index

def test_our_shards_read_into_an_index_from_a_pattern_a_folder_or_one_tar(shard_set):
    source = shard_set["index"]
    captions_of = {source.image_name(i): [source.caption(j) for j in source.captions_of(i)]
                   for i in range(source.num_images)}
    folder = shard_set["folder"]
    for data, count in ((shard_set["pattern"], 200), (str(folder), 200), (str(folder / "00003.tar"), 10)):
        index = dl.load_caption_index(data)
        assert index.num_images == count and not index.skipped, data
        for i in range(index.num_images):
            original, where = index.image_name(i).split(" (")         # "ORIGINAL (SHARD, sample KEY)"
            assert where.startswith(str(folder)) and [index.caption(j) for j in index.captions_of(i)] == \
                captions_of[original]
            assert index.image_bytes(i) == Path(original).read_bytes()  # kept as they were


def test_img2dataset_samples_of_one_address_are_one_image_with_all_its_captions(sample_set, tmp_path):
    source = dl.load_caption_index(sample_set["index"]).subset(np.arange(12))
    index_file = tmp_path / "data.json"
    index_file.write_text(json.dumps([{"image_path": source.image_name(i),
                                       "captions": [source.caption(j) for j in source.captions_of(i)]}
                                      for i in range(12)]))
    pattern = write_img2dataset_of(index_file, tmp_path / "web", per_shard=5)  # images straddle shards
    index = dl.load_caption_index(pattern)
    assert index.num_images == 12 and index.num_captions == source.num_captions > 12
    assert index.captions() == source.captions() and np.array_equal(index.caption_image, source.caption_image)
    assert all(index.image_bytes(i) == source.image_bytes(i) for i in range(12))
    assert index.image_name(0) == f"{tmp_path}/web/00000.tar, sample 000000000"


def test_img2dataset_samples_without_a_caption_are_left_out_and_named(web_set):
    index = dl.load_caption_index(web_set["pattern"])
    assert index.num_images == 23 and index.skipped == [        # 24 samples; sample 14 has no caption
        f"{web_set['folder']}/00001.tar, sample 000010004: no caption (.txt, or \"captions\" in .json)"]
    with pytest.raises(DataError, match="sample 000010004: no caption"):
        dl.load_caption_index(web_set["pattern"], strict=True)
    with pytest.raises(DataError, match=r"shard .*/00003.tar not found \(2 more missing\)"):
        dl.load_caption_index(f"{web_set['folder']}/{{00000..00005}}.tar")


def test_a_truncated_shard_read_into_an_index_is_named(shard_set, tmp_path):
    shard = tmp_path / "00000.tar"
    data = (shard_set["folder"] / "00000.tar").read_bytes()
    shard.write_bytes(data[:member_offsets(shard_set["folder"] / "00000.tar")[6][1] + 10])
    with pytest.raises(DataError, match=rf"^{shard}: the shard is truncated"):
        dl.load_caption_index(shard)


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory):
    import clip_model
    path = tmp_path_factory.mktemp("model") / "random.pt"
    torch.manual_seed(0)
    clip_model.save_checkpoint(path, clip_model.build_model("tiny-vit-64"))
    return str(path)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    """24 images with 2 or 3 captions each, and img2dataset's shards of them (7 samples a shard)."""
    folder = tmp_path_factory.mktemp("small")
    paths = sample_data.create_sample_dataset(folder / "set", num_samples=24, seed=2)
    return {"index": paths["index"], "pattern": write_img2dataset_of(paths["index"], folder / "web", 7),
            "folder": folder / "web"}


EVALUATE = ["--device", "cpu", "--num_workers", "0", "--batch_size", "16"]


def evaluated(results):
    return {key: results[key] for key in ("retrieval", "similarity", "num_images", "num_texts")}


@pytest.mark.slow
def test_evaluation_of_img2dataset_shards_equals_evaluation_of_the_json_they_come_from(
        small_set, random_checkpoint, tmp_path):
    import evaluation
    import visualization
    on_json = evaluation.main(["--checkpoint", random_checkpoint, "--data", small_set["index"], *EVALUATE])
    on_shards = evaluation.main(["--checkpoint", random_checkpoint, "--data", small_set["pattern"],
                                 "--save_embeddings", str(tmp_path / "embeddings"), *EVALUATE])
    assert evaluated(on_shards) == evaluated(on_json) and on_json["num_texts"] > on_json["num_images"] == 24
    # visualization.py finds the images of the embeddings in the shards their meta.json names
    assert visualization.main(["--results_dir", str(tmp_path), "--num_images", "4"]) == 0
    assert (tmp_path / "similarity_heatmap.png").is_file() and (tmp_path / "retrieval_examples.png").is_file()


@pytest.mark.slow
def test_shards_downloaded_by_img2dataset_evaluate_as_the_json_they_come_from(small_set, random_checkpoint,
                                                                             tmp_path):
    """img2dataset itself, where it is installed (it is no requirement of ours: it would hold
    webdataset below 0.3 and pandas below 3), downloads the images of the JSON index from a local
    HTTP server, from a URL list of one row per caption; evaluation of its shards (a folder of
    them) equals evaluation of the JSON."""
    pytest.importorskip("img2dataset")
    import functools
    import http.server
    import subprocess
    import sys
    import threading

    import evaluation

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    root = Path(small_set["index"]).parent
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=root))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    rows = [{"url": f"http://127.0.0.1:{server.server_address[1]}/{entry['image_path']}", "caption": caption}
            for entry in json.loads(Path(small_set["index"]).read_text()) for caption in entry["captions"]]
    (tmp_path / "urls.json").write_text(json.dumps(rows))
    # one download thread: img2dataset writes the samples in the order their downloads end
    download = (f"from img2dataset import download; download(url_list={str(tmp_path / 'urls.json')!r}, "
                f"input_format='json', url_col='url', caption_col='caption', output_format='webdataset', "
                f"output_folder={str(tmp_path / 'shards')!r}, processes_count=1, thread_count=1, "
                f"number_sample_per_shard=20, disable_all_reencoding=True, enable_wandb=False)")
    try:
        done = subprocess.run([sys.executable, "-c", download], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stderr[-2000:]
    on_json = evaluation.main(["--checkpoint", random_checkpoint, "--data", small_set["index"], *EVALUATE])
    on_shards = evaluation.main(["--checkpoint", random_checkpoint, "--data", str(tmp_path / "shards"), *EVALUATE])
    assert evaluated(on_shards) == evaluated(on_json) and on_json["num_texts"] > on_json["num_images"] == 24


def test_the_export_check_reads_its_data_from_a_folder_of_shards(small_set, tmp_path):
    import export
    index, label = export.check_data(str(small_set["folder"]), 6, tmp_path)
    assert index.num_images == 6 and label == str(small_set["folder"])
    assert index.captions()[:2] == dl.load_caption_index(small_set["index"]).captions()[:2]


# ----------------------------------------------------------------------------- train.py on shards

@pytest.fixture(scope="module")
def val_set(tmp_path_factory):
    return sample_data.create_sample_dataset(tmp_path_factory.mktemp("val") / "set", num_samples=16, seed=1)["index"]


def train_on(data_dir, val, out, *extra):
    return train.main(["--data_dir", data_dir, "--val_data", val, "--model_name", "tiny-vit-64",
                       "--batch_size", "8", "--num_workers", "0", "--max_steps", "3", "--warmup_steps", "1",
                       "--log_every", "1", "--run_name", "run", "--checkpoint_dir", str(out / "ckpt"),
                       "--log_dir", str(out / "logs"), "--results_dir", str(out / "results"),
                       "--tensorboard_pairs", "0", "--projector_pairs", "0", *extra])


def test_train_runs_on_img2dataset_shards_naming_the_skipped_samples(web_set, val_set, tmp_path):
    result = train_on(web_set["pattern"], val_set, tmp_path)
    assert result["step"] == 3 and all(math.isfinite(e["loss"]) for e in result["history"]["train"])
    log = (tmp_path / "logs/run/train.log").read_text()
    assert "sample 000000005" in log and "sample 000010004" in log and "2 unreadable images" in log


@pytest.mark.slow
def test_train_validates_on_a_held_out_shard(web_set, tmp_path):
    folder = web_set["folder"]
    result = train_on(f"{folder}/{{00000..00001}}.tar", f"{folder}/00002.tar", tmp_path)
    assert result["step"] == 3 and [v["num_images"] for v in result["history"]["val"]][-1] == 4


@pytest.mark.slow
def test_train_runs_on_mixed_resampled_sources(two_sources, shard_set, val_set, tmp_path):
    result = train_on(f"{shard_set['pattern']}::{two_sources}", val_set, tmp_path,
                      "--data_resampled", "--data_weights", "2,1,1", "--train_num_samples", "16")
    assert result["step"] == 3  # two steps per epoch: 16 samples, batches of 8
    assert [e["epoch"] for e in result["history"]["train"]] == [0, 0, 1]


# ----------------------------------------------------------------------------- damaged shards

def member_offsets(path):
    """(header offset, data offset) of every member of a tar file."""
    import tarfile
    with tarfile.open(path) as tar:
        return [(member.offset, member.offset_data) for member in tar]


@pytest.mark.parametrize("cut", ["between two samples", "inside a header", "inside an image", "before the end"])
@pytest.mark.parametrize("options", [{}, {"num_samples": 200}, {"resampled": True}], ids=["counted", "num_samples",
                                                                                       "resampled"])
def test_a_truncated_shard_is_named_and_said_to_be_truncated(shard_set, tmp_path, cut, options):
    # Cut short between samples or inside a header, a shard used to lose its samples silently:
    # the tar reader took the cut for the end (and a count short of _info.json's blamed the counts).
    folder = tmp_path / "set"
    shutil.copytree(shard_set["folder"], folder)
    shard = folder / "00007.tar"
    members = member_offsets(shard)
    header, data = members[6]                    # the 4th sample's image (.json and .png each)
    at = {"between two samples": header, "inside a header": header + 100, "inside an image": data + 10,
          "before the end": members[-1][1] + 512}[cut]
    shard.write_bytes(shard.read_bytes()[:at])
    dataset = shards.WebDatasetTrain(str(folder), no_pixels, byte_tokens, **options)
    with pytest.raises(DataError, match=rf"^{shard}: the shard is truncated .* copy or download it again"):
        for _ in itertools.islice(dataset, 2000):
            pass
