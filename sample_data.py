"""A generated CLIP data set: pictures of coloured shapes with captions that name them.

Small enough to train on a CPU in minutes, and made so that a model can only succeed by reading
both image and caption: the captions name colour, shape and position (and size), in several
paraphrases, in English or Chinese. `python data_loader.py --make_sample DIR` writes one from
the command line. `create_fine_grained_set` writes an evaluation set of near-twins, whose
captions differ by one word.
"""
from __future__ import annotations

import io
import json
import os

import numpy as np
from PIL import Image, ImageDraw

# Saturated colours far apart in hue, and shapes of 16 px or more in a 64 px image: a visual
# vocabulary that a 6M-parameter CLIP learns on a CPU in minutes.
SAMPLE_COLOURS = {"red": ((220, 30, 30), "红色"), "green": ((30, 160, 50), "绿色"),
                  "blue": ((35, 70, 225), "蓝色"), "yellow": ((240, 200, 0), "黄色"),
                  "purple": ((145, 50, 190), "紫色")}
SAMPLE_SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形"}
SAMPLE_IMAGE_SIZE = 64
_CENTRES = {"left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28), "bottom": (0.5, 0.72),
            "center": (0.5, 0.5)}
_RADIUS = {"small": 0.14, "large": 0.22, "pair": 0.17}  # fraction of the image side
_WORDS = {  # several phrasings of each position and size, so captions are paraphrases, not one template
    "en": {"left": ["on the left", "at the left side", "in the left half"],
           "right": ["on the right", "at the right side", "in the right half"],
           "top": ["at the top", "near the top", "in the upper half"],
           "bottom": ["at the bottom", "near the bottom", "in the lower half"],
           "center": ["in the center", "in the middle", "at the centre"],
           "small": ["small", "little", "tiny"], "large": ["large", "big", "huge"], "pair": [""]},
    "zh": {"left": ["左边", "左侧"], "right": ["右边", "右侧"], "top": ["上方", "上面"],
           "bottom": ["下方", "下面"], "center": ["中间", "中央"],
           "small": ["小"], "large": ["大"], "pair": [""]},
}
_TEMPLATES = {  # c = colour, s = shape, p = position, z = size; 1 and 2 number the shapes
    ("en", 1): ["a {z1} {c1} {s1} {p1}", "a {c1} {s1}, {z1}, {p1}", "{p1}, a {z1} {c1} {s1}",
                "there is a {z1} {c1} {s1} {p1}", "a picture of a {z1} {c1} {s1} {p1}"],
    ("en", 2): ["a {c1} {s1} {p1} and a {c2} {s2} {p2}", "a {c2} {s2} {p2} and a {c1} {s1} {p1}",
                "two shapes: a {c1} {s1} {p1}, a {c2} {s2} {p2}", "{p1} a {c1} {s1}, {p2} a {c2} {s2}"],
    ("zh", 1): ["{p1}有一个{z1}的{c1}{s1}", "一个{z1}的{c1}{s1}在{p1}",
                "{c1}{s1}，很{z1}，在图片{p1}", "图片{p1}是一个{z1}的{c1}{s1}"],
    ("zh", 2): ["{p1}是一个{c1}{s1}，{p2}是一个{c2}{s2}", "{p1}有{c1}{s1}，{p2}有{c2}{s2}",
                "一个{c1}{s1}在{p1}，一个{c2}{s2}在{p2}",
                "图中有{c1}{s1}和{c2}{s2}，分别在{p1}和{p2}"],
}


def _sample_image(rng: np.random.Generator, shapes: list[tuple]) -> bytes:
    """PNG bytes of shapes [(colour, shape, position, size)] on a plain background."""
    side = SAMPLE_IMAGE_SIZE
    background = rng.integers(185, 250) + rng.integers(-12, 13, 3)  # pale grey, slightly tinted
    image = Image.new("RGB", (side, side), tuple(int(v) for v in background))
    draw = ImageDraw.Draw(image)
    for colour, shape, position, size in shapes:
        cx, cy = (np.array(_CENTRES[position]) + rng.uniform(-0.03, 0.03, 2)) * side
        r, fill = _RADIUS[size] * side * rng.uniform(0.9, 1.1), SAMPLE_COLOURS[colour][0]
        if shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif shape == "square":  # 0.85 r: a square as wide as the circle would look bigger
            draw.rectangle((cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r), fill=fill)
        else:  # triangle: 3 corners at 1.15 r; star: 10 corners alternating between r and 0.45 r
            radii, n = ([1.15 * r], 3) if shape == "triangle" else ([r, 0.45 * r], 10)
            corners = [(radii[k % len(radii)], 2 * np.pi * k / n) for k in range(n)]
            draw.polygon([(cx + d * np.sin(a), cy - d * np.cos(a)) for d, a in corners], fill=fill)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _sample_captions(rng: np.random.Generator, shapes: list[tuple], language: str) -> list[str]:
    """Two or three different paraphrases naming each shape's colour, kind and position (and size)."""
    templates, words, captions = _TEMPLATES[language, len(shapes)], _WORDS[language], []
    for t in rng.choice(len(templates), size=int(rng.integers(2, 4)), replace=False):
        fields = {}
        for k, (colour, shape, position, size) in enumerate(shapes, 1):
            fields[f"c{k}"] = colour if language == "en" else SAMPLE_COLOURS[colour][1]
            fields[f"s{k}"] = shape if language == "en" else SAMPLE_SHAPES[shape]
            fields[f"p{k}"], fields[f"z{k}"] = rng.choice(words[position]), rng.choice(words[size])
        captions.append(templates[t].format(**fields))
    return captions


def _random_shapes(rng: np.random.Generator, count: int, colours=tuple(SAMPLE_COLOURS)) -> list[tuple]:
    looks = [(colour, shape) for colour in colours for shape in SAMPLE_SHAPES]
    if count == 1:
        position, size = list(_CENTRES)[rng.integers(len(_CENTRES))], ("small", "large")[rng.integers(2)]
        return [(*looks[rng.integers(len(looks))], position, size)]
    positions = (("left", "right"), ("top", "bottom"))[rng.integers(2)]  # side by side, never overlapping
    return [(*looks[look], position, "pair")
            for look, position in zip(rng.choice(len(looks), size=2, replace=False), positions)]


def _write(path: str, data: bytes | str):
    with open(path, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def create_sample_dataset(out_dir, num_samples: int = 1000, seed: int = 0, language: str = "en",
                          colours=tuple(SAMPLE_COLOURS)) -> dict:
    """Write a generated data set: images of one or two coloured shapes, each with two or three
    paraphrased captions naming colour, shape and position (and size), in English or Chinese.

    Written as out_dir/data.json and as the images/ + captions/ layout (the same images), plus
    out_dir/zeroshot/<class>/*.png (class = colour + shape, one shape per image) for zero-shot
    classification. `colours` limits the shapes to some of the colours (a shifted distribution,
    for fine-tuning experiments). The same seed gives the same bytes.
    """
    if language not in ("en", "zh"):
        raise ValueError(f"language must be 'en' or 'zh', not {language!r}")
    if not colours or not set(colours) <= set(SAMPLE_COLOURS):
        raise ValueError(f"colours must be some of {', '.join(SAMPLE_COLOURS)}, not {colours!r}")
    out_dir = str(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir}: folder exists and is not empty; choose a new folder or delete it")
    for sub in ("images", "captions", "zeroshot"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    rng, entries = np.random.default_rng([seed, 0]), []
    for k in range(num_samples):
        shapes = _random_shapes(rng, 2 if rng.random() < 0.25 else 1, colours)
        captions = _sample_captions(rng, shapes, language)
        _write(os.path.join(out_dir, "images", f"{k:05d}.png"), _sample_image(rng, shapes))
        _write(os.path.join(out_dir, "captions", f"{k:05d}.txt"), "\n".join(captions) + "\n")
        entries.append({"image_path": f"images/{k:05d}.png", "captions": captions})
    _write(os.path.join(out_dir, "data.json"), json.dumps(entries, ensure_ascii=False, indent=1))
    # Zero-shot images come from their own random stream: new pictures, never training ones.
    rng, per_class = np.random.default_rng([seed, 1]), max(2, min(20, num_samples // 50))
    for colour in colours:
        colour_zh = SAMPLE_COLOURS[colour][1]
        for shape, shape_zh in SAMPLE_SHAPES.items():
            name = f"{colour} {shape}" if language == "en" else colour_zh + shape_zh
            os.makedirs(os.path.join(out_dir, "zeroshot", name))
            for k in range(per_class):
                shapes = [(colour, shape, *_random_shapes(rng, 1)[0][2:])]  # a random position and size
                _write(os.path.join(out_dir, "zeroshot", name, f"{k:03d}.png"), _sample_image(rng, shapes))
    return {"index": os.path.join(out_dir, "data.json"), "folder": out_dir,
            "zeroshot": os.path.join(out_dir, "zeroshot")}


def create_fine_grained_set(out_dir, num_families: int = 100, seed: int = 0) -> dict:
    """Write an evaluation set of near-twins: families of four single-shape images, a base and
    three variants that each change one thing (the colour, the shape, or the position), every
    image with one caption of one template, so that the captions of a family differ by one word.
    Retrieval on it measures the fine distinctions hard negatives are meant to teach: a model that
    knows only roughly what is in a picture ranks the twins together and picks the wrong one."""
    out_dir = str(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir}: folder exists and is not empty; choose a new folder or delete it")
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    rng, entries = np.random.default_rng([seed, 2]), []
    for family in range(num_families):
        colour, shape, position, size = _random_shapes(rng, 1)[0]
        variants = [(colour, shape, position),
                    (rng.choice([c for c in SAMPLE_COLOURS if c != colour]), shape, position),
                    (colour, rng.choice([s for s in SAMPLE_SHAPES if s != shape]), position),
                    (colour, shape, rng.choice([p for p in _CENTRES if p != position]))]
        for k, (c, s, p) in enumerate(variants):
            name = f"images/{family:04d}-{k}.png"
            _write(os.path.join(out_dir, name), _sample_image(rng, [(str(c), str(s), str(p), size)]))
            caption = f"a {_WORDS['en'][size][0]} {c} {s} {_WORDS['en'][str(p)][0]}"
            entries.append({"image_path": name, "caption": caption})
    _write(os.path.join(out_dir, "data.json"), json.dumps(entries, indent=1))
    return {"index": os.path.join(out_dir, "data.json"), "folder": out_dir}
