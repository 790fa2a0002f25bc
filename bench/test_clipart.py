"""Specification of bench/clipart.py: captions from file names, a split by category folder that
keeps copies of one file together, and images every trainer reads as the same RGB pixels.
Benchmark tooling, tested with the benchmarks: `.venv/bin/python -m pytest bench`."""
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import clipart  # noqa: E402

import data_loader  # noqa: E402


def test_file_and_folder_names_become_words():
    assert clipart.words("acquila_architetto_franc_01") == "acquila architetto franc"
    assert clipart.words("bat_orlando_karam_") == "bat orlando karam"
    assert clipart.words("signs_and_symbols") == "signs and symbols"
    assert clipart.words("pattern-dot-grid-0003") == "pattern dot grid 0003"   # not a copy number
    assert clipart.words("fc26") == "fc26"


def test_captions_come_from_every_copy_of_a_file():
    copies = ["animals/birds/eagle_01.png", "signs_and_symbols/eagle_01.png"]
    captions = clipart.captions_of(copies, np.random.default_rng(0))
    assert 3 <= len(captions) <= 5 and len(set(captions)) == len(captions)
    assert all("eagle" in caption for caption in captions)
    assert any("signs and symbols" in caption for caption in captions)   # the second copy's folder
    assert captions == clipart.captions_of(copies, np.random.default_rng(0))


def _png(path: Path, size, colour=(200, 30, 30), mode="RGBA"):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new(mode, size, (*colour, 255)[:len(mode)])
    if mode == "RGBA":  # the left half transparent, hiding black as drawing programs often do
        pixels = np.asarray(image).copy()
        pixels[:, : size[0] // 2] = 0
        image = Image.fromarray(pixels, "RGBA")
    image.save(path)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """10 birds (the first also filed under hazard), 6 fish, 2 stars, 1 huge and 1 broken file."""
    root = tmp_path_factory.mktemp("openclipart")
    for k in range(10):
        _png(root / "animals" / "birds" / f"bird_{k}_01.png", (40 + k, 300), colour=(k, 100, 200))
    (root / "signs" / "hazard").mkdir(parents=True)
    (root / "signs" / "hazard" / "bird_0_01.png").write_bytes((root / "animals/birds/bird_0_01.png").read_bytes())
    for k in range(6):
        _png(root / "animals" / "fish" / f"fish_{k}.png", (500, 200 + k), colour=(10, k, 10), mode="P")
    for k in range(2):
        _png(root / "shapes" / "stars" / f"star_{k}pt.png", (64, 64), colour=(k, 0, 0))
    (root / "shapes" / "broken.png").write_bytes(b"\x89PNG not really")
    return root


def build(source, out, seed=0, max_per_folder=300):
    return clipart.build(out, size=128, seed=seed, val_fraction=0.2, max_per_folder=max_per_folder,
                         source=source, workers=1)


def test_split_by_folder_keeps_copies_together(source, tmp_path):
    out = build(source, tmp_path / "set")
    info = json.loads((out / "info.json").read_text())
    splits = {name: json.loads((out / name / "data.json").read_text()) for name in clipart.SPLITS}
    assert [info[name]["images"] for name in clipart.SPLITS] == [12, 3, 3]   # 10 + 6 + 2 images
    # 20% of the birds and of the fish in each held-out split; the 2 stars (< 5) train only
    for name, (birds, fish, stars) in zip(clipart.SPLITS, ((6, 4, 2), (2, 1, 0), (2, 1, 0))):
        counts = [sum(word in e["captions"][0] for e in splits[name]) for word in ("bird", "fish", "star")]
        assert counts == [birds, fish, stars]
    files = [e["image_path"] for name in clipart.SPLITS for e in splits[name]]
    assert len(files) == len(set(files)) == 18
    assert list(info["left_out"]) == [str(source / "shapes" / "broken.png")]
    # the bird filed twice is one image, captioned from both folders
    both = [e for name in clipart.SPLITS for e in splits[name] if any("hazard" in c for c in e["captions"])]
    assert len(both) == 1 and any("birds" in c for c in both[0]["captions"])


def test_the_same_seed_gives_the_same_files(source, tmp_path):
    first, again, other = (build(source, tmp_path / name, seed) for name, seed in
                           (("a", 0), ("b", 0), ("c", 1)))
    read = lambda out: [(out / name / "data.json").read_text() for name in clipart.SPLITS]
    assert read(first) == read(again) and read(first) != read(other)
    assert sorted(p.read_bytes() for p in (first / "images").iterdir()) == \
        sorted(p.read_bytes() for p in (again / "images").iterdir())


def test_images_are_rgb_on_white_and_at_most_size_on_the_shorter_side(source, tmp_path):
    out = build(source, tmp_path / "set")
    sizes = {}
    for path in (out / "images").iterdir():
        with Image.open(path) as image:
            assert image.mode == "RGB"
            sizes[path.name] = image.size
            if image.size[0] < 128 and image.size[1] > 128:      # a bird: its left half was transparent
                left, right = image.getpixel((0, 0)), image.getpixel((image.size[0] - 1, 0))
                assert left == (255, 255, 255) and right[1:] == (100, 200)
    assert all(min(size) <= 128 for size in sizes.values())
    assert (128 * 500 // 200, 128) in sizes.values()              # a fish, scaled down, aspect kept
    assert (64, 64) in sizes.values()                              # a star, never enlarged


def test_json_and_csv_describe_the_same_pairs(source, tmp_path):
    out = build(source, tmp_path / "set")
    for name in clipart.SPLITS:
        from_json = data_loader.load_caption_index(out / name)
        from_csv = data_loader.load_caption_index(out / name / "data.csv")
        assert (from_json.num_images, from_json.captions()) == (from_csv.num_images, from_csv.captions())
        with open(out / name / "data.csv", newline="", encoding="utf-8") as f:
            assert all(Path(row["filepath"]).is_absolute() for row in csv.DictReader(f))


def test_a_folder_keeps_at_most_max_per_folder_images(source, tmp_path):
    out = build(source, tmp_path / "set", max_per_folder=4)
    info = json.loads((out / "info.json").read_text())
    assert sum(info[name]["images"] for name in clipart.SPLITS) == 4 + 4 + 2
