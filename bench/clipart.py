"""A real image-caption data set for the quality benchmarks, built from Debian's clip art.

    apt-get install -y openclipart-png
    .venv/bin/python bench/clipart.py                   # writes bench/out/clipart-128px-seed0/

The package holds about 8,000 PNG drawings (mostly RGBA or palette images with transparency)
in about 160 category folders (animals/birds, food/fruit, signs_and_symbols/flags/europe, ...).
Nobody wrote captions for them: like the alt text of web images, ours are made from what the
files say about themselves, the file name and its folders, and are as noisy. A file
`animals/birds/acquila_architetto_franc_01.png` becomes the title "acquila architetto franc"
(an Italian word, a truncated author name) and its folders "animals", "birds"; each image gets 2
to 4 captions drawn from templates such as "acquila architetto franc", "birds: acquila architetto
franc", "animals birds acquila architetto franc". The same file stored in several folders (about
900 files are) is one image with a caption from each copy's folder as well, and can never sit in
two splits.

The split is by category folder: every folder gives val_fraction of its images to validation,
as many other images to test, and the rest to training (folders of fewer than MIN_SPLIT_FOLDER
images train only), so validation and test hold different pictures of the categories training
has seen. A folder keeps at most max_per_folder images (seeded draw): shapes/stars alone holds
1,378 machine-made star polygons captioned "star 73pt17step"; uncapped they would be a fifth of
the test queries, near-identical pictures told apart only by a number.

Pixels. Both trainers of bench_quality.py must see the same pixels, and the package's files
are not neutral about that: transparent pixels hide colours (often black) that open_clip's
loader reveals (it drops the alpha channel) while ours composites on white, as a viewer shows
them; and files reach 16,000 px (seconds and gigabytes to decode one). So every image is
decoded once here, with data_loader.decode_image (composited on white), scaled so that its
shorter side is `size` pixels (never enlarged), and stored as an RGB PNG: the kind of copy a web
data set pipeline makes at download time. Both trainers and the evaluation then read identical
RGB files, and still pay for a PNG decode per sample. 128 px is twice the tiny preset's 64 px
input: the smallest RandomResizedCrop of our augmentation (80% of the area at aspect 3/4, about
0.77 of the side) is still scaled down to 64 px, never up. Images larger than Pillow's
decompression-bomb limit (Image.MAX_IMAGE_PIXELS, 89 million pixels) or unreadable are left out
and listed in info.json.

Output, under bench/out/clipart-<size>px-seed<seed>/: images/NNNNN.png; train/, val/ and test/
each with data.json (our JSON index, paths relative to it) and data.csv (`filepath,title`, one
row per caption, absolute paths, for open_clip_train); info.json (counts, settings, left out).
The same seed gives the same files.
"""
import argparse
import csv
import hashlib
import json
import re
import shutil
import sys
import warnings
from collections import defaultdict
from multiprocessing import Pool
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
SOURCE = Path("/usr/share/openclipart/png")
SPLITS = ("train", "val", "test")
FORMAT = 2            # raise it when the output changes: a set built by older code is then rebuilt
MIN_SPLIT_FOLDER = 5
# Caption templates: {title} from the file name, {leaf} its folder, {path} and {folders} all its
# folders ("animals birds", "animals / birds").
FOLDER_TEMPLATES = ("{title}, {leaf}", "{leaf}: {title}", "{path} {title}", "clip art of {title} ({leaf})",
                    "{title} - {folders}")
TEMPLATES = ("{title}", "{title} clipart", *FOLDER_TEMPLATES)


def words(name: str) -> str:
    """File or folder name as text: separators become spaces, a trailing copy number goes
    ("plush_tux_anita_01" -> "plush tux anita", "signs_and_symbols" -> "signs and symbols")."""
    name = re.sub(r"[_\-\s]+\d{0,2}$", "", name)
    return re.sub(r"[_\-\s]+", " ", name).strip() or name


def captions_of(copies: list, rng: np.random.Generator) -> list:
    """Captions of an image stored at the given relative paths (its copies): 2-4 templates drawn
    for the first copy, and one naming its folder for each further copy; duplicates dropped."""
    captions = []
    for k, relative in enumerate(copies):
        folders = [words(part) for part in Path(relative).parent.parts] or ["clip art"]
        fields = {"title": words(Path(relative).stem), "leaf": folders[-1], "path": " ".join(folders),
                  "folders": " / ".join(folders)}
        templates = TEMPLATES if k == 0 else FOLDER_TEMPLATES
        drawn = rng.choice(len(templates), size=rng.integers(2, 5) if k == 0 else 1, replace=False)
        captions += [templates[t].format(**fields) for t in drawn]
    return list(dict.fromkeys(captions))


def find_images(source: Path) -> list:
    """Every PNG under source, grouped by content: a list of sorted lists of relative paths."""
    groups = defaultdict(list)
    for path in sorted(source.rglob("*.png")):
        groups[hashlib.sha1(path.read_bytes()).hexdigest()].append(str(path.relative_to(source)))
    return sorted(groups.values())


def split_by_folder(images: list, val_fraction: float, max_per_folder: int, seed: int) -> dict:
    """Split name -> images (lists of copies): per folder of the first copy, a seeded shuffle,
    at most max_per_folder kept, round(val_fraction * n) to val, as many to test."""
    rng = np.random.default_rng(seed)
    folders = defaultdict(list)
    for copies in images:
        folders[str(Path(copies[0]).parent)].append(copies)
    splits = {name: [] for name in SPLITS}
    for folder in sorted(folders):
        members = [folders[folder][k] for k in rng.permutation(len(folders[folder]))][:max_per_folder]
        held = round(val_fraction * len(members)) if len(members) >= MIN_SPLIT_FOLDER else 0
        splits["val"] += members[:held]
        splits["test"] += members[held:2 * held]
        splits["train"] += members[2 * held:]
    return splits


def convert(job) -> str:
    """Decode source (white behind transparency), scale its shorter side down to size, save an
    RGB PNG at target. Returns '' or why the image was left out."""
    from PIL import Image

    import data_loader
    from errors import DataError
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # checked below
    source, target, size = job
    try:
        with Image.open(source) as header:   # reads the size only; Pillow refuses 2 x the limit
            if header.width * header.height > Image.MAX_IMAGE_PIXELS:
                return f"{header.width} x {header.height} px, over Pillow's decompression-bomb limit"
    except Exception as error:   # Pillow raises several types for what it cannot read
        return f"{type(error).__name__}: {error}"
    try:
        image = data_loader.decode_image(Path(source).read_bytes(), source)
    except DataError as error:
        return str(error)
    scale = size / min(image.size)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BICUBIC)
    image.save(target, format="PNG")
    return ""


def write_split(folder: Path, entries: list):
    """data.json (paths relative to it) and data.csv (absolute paths, one row per caption)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.json").write_text(json.dumps(
        [{"image_path": f"../images/{e['file']}", "captions": e["captions"]} for e in entries],
        ensure_ascii=False, indent=0), encoding="utf-8")
    with open(folder / "data.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title"])
        for e in entries:
            writer.writerows([str((folder.parent / "images" / e["file"]).resolve()), caption]
                             for caption in e["captions"])


def build(out: Path = None, size: int = 128, seed: int = 0, val_fraction: float = 0.1,
          max_per_folder: int = 300, source: Path = SOURCE, workers: int = 2) -> Path:
    """Build the data set (or reuse the one built with the same settings); returns its folder."""
    settings = {"format": FORMAT, "source": str(source), "size": size, "seed": seed,
                "val_fraction": val_fraction, "max_per_folder": max_per_folder}
    out = Path(out or BENCH / "out" / f"clipart-{size}px-seed{seed}")
    if (out / "info.json").is_file() and json.loads((out / "info.json").read_text())["settings"] == settings:
        return out
    if not source.is_dir():
        sys.exit(f"clipart.py: {source} not found: install the clip art with "
                 f"`apt-get install -y openclipart-png` (or give --source)")
    if out.exists():
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)
    splits = split_by_folder(find_images(source), val_fraction, max_per_folder, seed)
    rng = np.random.default_rng([seed, 1])
    entries = {name: [{"copies": copies, "file": f"{name}-{k:05d}.png", "captions": captions_of(copies, rng)}
                      for k, copies in enumerate(members)] for name, members in splits.items()}
    jobs = [(str(source / e["copies"][0]), str(out / "images" / e["file"]), size)
            for name in SPLITS for e in entries[name]]
    with Pool(workers) as pool:
        reasons = dict(zip((job[0] for job in jobs), pool.map(convert, jobs, chunksize=16)))
    left_out = {path: reason for path, reason in reasons.items() if reason}
    info = {"settings": settings, "left_out": left_out}
    for name in SPLITS:
        kept = [e for e in entries[name] if not left_out.get(str(source / e["copies"][0]))]
        write_split(out / name, kept)
        info[name] = {"images": len(kept), "captions": sum(len(e["captions"]) for e in kept),
                      "folders": len({str(Path(e["copies"][0]).parent) for e in kept})}
    (out / "info.json").write_text(json.dumps(info, indent=1, ensure_ascii=False))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="output folder (default bench/out/clipart-<size>px-seed<seed>)")
    parser.add_argument("--size", type=int, default=128, help="shorter side of the stored images, px")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the captions")
    parser.add_argument("--val_fraction", type=float, default=0.1,
                        help="share of each folder's images in validation, and again in test")
    parser.add_argument("--max_per_folder", type=int, default=300, help="images kept per folder")
    parser.add_argument("--source", default=str(SOURCE), help="the clip art's PNG folder")
    args = parser.parse_args()
    out = build(args.out and Path(args.out), args.size, args.seed, args.val_fraction,
                args.max_per_folder, Path(args.source))
    info = json.loads((out / "info.json").read_text())
    for name in SPLITS:
        print(f"{name:5}: {info[name]['images']} images, {info[name]['captions']} captions, "
              f"{info[name]['folders']} folders: {out / name}")
    print(f"left out: {len(info['left_out'])} images (see {out / 'info.json'})")


if __name__ == "__main__":
    main()
