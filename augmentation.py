"""Training-time augmentation: what a training image goes through, and the random numbers that
decide how.

A training sample is an image the model has seen before, shown a little differently each epoch,
so that it learns what the caption says rather than the exact pixels: a random crop of most of the
picture, resized to the model's input, sometimes with its brightness, contrast and saturation
changed. Every random choice is made from numbers that are a function of the sample alone
(sample_uniforms: seed, epoch, image, caption), so a sample is the same whatever the number of
workers, the order of the data or an interruption and resume in between.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import open_clip
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

# Mild augmentation: crops keep most of the picture (captions say "on the left"), colour jitter
# keeps the hue (captions name colours), and no flips (they would swap left and right). How much
# of the picture a crop keeps and how often colours are jittered are train.py's settings
# crop_min_scale and colour_jitter; the shapes of crops and the jitter's strengths are fixed here.
CROP_RATIO = (3 / 4, 4 / 3)
COLOUR_JITTER = (0.3, 0.3, 0.3)   # brightness, contrast, saturation: factors from [1 - s, 1 + s]
CROP_TRIES = 10                   # RandomResizedCrop's tries before its central fallback box


class TrainAugmentation:
    """Training images: an image is first shrunk once (`prepare`: its shorter side to `side`
    pixels, uint8), then each epoch cropped, resized to the model's size and colour-jittered
    (`draw` the random choices, `apply` them; still uint8); a whole batch is normalised at once
    where the model runs (`normalise`).

    Why in two parts: decoding and shrinking a photo is most of the cost of a training sample, and
    its result does not change from epoch to epoch, so it can be done once (data_loader.ImageCache);
    `side` is just large enough that the smallest crop of RandomResizedCrop (scale and aspect ratio
    at their minimum) is never enlarged. The random choices of a whole batch are drawn at once, as
    numpy arrays, from each sample's own uniforms (sample_uniforms: a function of seed, epoch and
    sample alone), so that a sample depends on nothing else and no generator is seeded per sample. A
    sample stays uint8 until the batch reaches the model's device: a quarter of the bytes of float
    pixels to pass from DataLoader workers (and to copy to a GPU), and the float arithmetic of
    normalising runs once per batch, in place.
    The random choices (`draw`) are kept apart from applying them (`apply`), so that a second
    model -- a distillation teacher with its own image size and normalisation -- can be shown the
    same crop of the same picture (TeacherView); `min_side` then keeps enough pixels for both.
    With augment=False the image is only resized and centre-cropped as for evaluation.
    `crop_min_scale` and `colour_jitter` are train.py's settings of the same names (their defaults
    here are the schema's, tests/test_augmentation.py checks it).
    """

    # uniforms a draw reads per image: the crop's tries (area, aspect ratio), its position, then
    # whether to jitter, the jitter's order and its three factors
    DRAWS = 2 * CROP_TRIES + 2 + 1 + 3 + 3

    def __init__(self, preprocess_cfg: dict, augment: bool = True, min_side: int = 0,
                 crop_min_scale: float = 0.9, colour_jitter: float = 0.0):
        size = preprocess_cfg["size"]
        self.size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.augment = augment
        self.crop_scale, self.colour_jitter = (crop_min_scale, 1.0), colour_jitter
        self.mean = torch.tensor(preprocess_cfg.get("mean") or open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(preprocess_cfg.get("std") or open_clip.OPENAI_DATASET_STD).view(3, 1, 1)
        # (x / 255 - mean) / std as one multiply-add on uint8 values x
        self.scale, self.shift = 1 / (255 * self.std), -self.mean / self.std
        self.bilinear = preprocess_cfg.get("interpolation") == "bilinear"
        self.resize_mode = preprocess_cfg.get("resize_mode") or "shortest"
        shrink = math.sqrt(crop_min_scale * CROP_RATIO[0]) if augment else 1.0
        self.side = max(min_side, math.ceil(max(self.size) / shrink))

    def prepare(self, image: Image.Image) -> np.ndarray:
        """The image as uint8 [H, W, 3] with its shorter side `side` (never enlarged; the longer
        side at most 4 x `side`, so that a panorama does not take the memory of 16 images)."""
        width, height = image.size
        factor = min(self.side / min(width, height), 4 * self.side / max(width, height))
        if factor < 1:
            size = (max(1, round(width * factor)), max(1, round(height * factor)))
            image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        return np.asarray(image, dtype=np.uint8)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images [..., 3, height, width] -> the float pixels the model reads, normalised
        with the model's mean and std (in place on a new float tensor: out-of-place arithmetic on
        a batch allocates, and page-faults, a new batch per operation)."""
        return images.float().mul_(self.scale.to(images.device)).add_(self.shift.to(images.device))

    def draw(self, shapes: np.ndarray, uniforms: np.ndarray) -> list[AugmentationDraw]:
        """The random choices for prepared images of `shapes` ([n, 2]: height, width), made
        from their uniforms ([n, DRAWS], each row one image's own, in [0, 1))."""
        if not self.augment:
            return [AugmentationDraw()] * len(shapes)
        shapes = np.asarray(shapes, dtype=np.int64).reshape(-1, 2)
        boxes = _crop_boxes(shapes, self.crop_scale, uniforms[:, :2 * CROP_TRIES + 2])
        jitter = uniforms[:, 2 * CROP_TRIES + 2:]
        orders = np.argsort(jitter[:, 1:4], axis=1)       # a uniformly random order of the three
        strengths = np.asarray(COLOUR_JITTER)
        factors = 1 - strengths + 2 * strengths * jitter[:, 4:7]
        return [AugmentationDraw(tuple(box.tolist()),
                                 tuple((int(k), float(factors[n, k])) for k in orders[n])
                                 if jitter[n, 0] < self.colour_jitter else None)
                for n, box in enumerate(boxes)]

    def apply(self, pixels: np.ndarray, draw: AugmentationDraw) -> torch.Tensor:
        """The prepared image cropped, resized to this model's size and jittered as `draw` says
        (a draw made by another TrainAugmentation of the same image works too), uint8."""
        mode = TF.InterpolationMode.BILINEAR if self.bilinear else TF.InterpolationMode.BICUBIC
        if draw.box is not None:
            # RandomResizedCrop as one interpolate call on the uint8 crop in [H, W, 3] layout (a
            # copy of the crop alone: the cache is read-only): the same pixels as
            # TF.resized_crop on the whole image, at less than half its cost
            top, left, height, width = draw.box
            crop = torch.from_numpy(np.array(pixels[top:top + height, left:left + width])).permute(2, 0, 1)
            image = torch.nn.functional.interpolate(crop[None], size=self.size, mode=mode.value,
                                                    antialias=True)[0]
        else:
            image = self._fit(torch.from_numpy(np.array(pixels, copy=True)).permute(2, 0, 1), mode, TF)
        if draw.jitter is not None:
            image = _colour_jitter(image, draw.jitter, TF)
        return image

    def _fit(self, image, mode, TF):
        """Resize as open_clip's evaluation transform does: shortest side and centre crop,
        squash, or longest side and pad."""
        if self.resize_mode == "squash":
            return TF.resize(image, list(self.size), mode, antialias=True)
        height, width = image.shape[1:]
        shortest = self.resize_mode == "shortest"
        scale = (max if shortest else min)(self.size[0] / height, self.size[1] / width)
        image = TF.resize(image, [round(height * scale), round(width * scale)], mode, antialias=True)
        return TF.center_crop(image, list(self.size))       # pads with 0 when the image is smaller


def _crop_boxes(shapes: np.ndarray, scale: tuple, uniforms: np.ndarray) -> np.ndarray:
    """RandomResizedCrop's boxes [n, 4] (top, left, height, width) for images of `shapes`: a share
    of the image's area drawn from `scale`, an aspect ratio drawn log-uniformly from CROP_RATIO,
    the first of CROP_TRIES tries that fits, placed at random; else the central crop of the
    nearest allowed aspect ratio. torchvision's algorithm, for a whole batch at once; `uniforms`
    [n, 2 x CROP_TRIES + 2]: the tries' areas, their ratios, the position."""
    height, width = shapes[:, :1].astype(np.float64), shapes[:, 1:].astype(np.float64)
    areas = height * width * (scale[0] + (scale[1] - scale[0]) * uniforms[:, :CROP_TRIES])
    log_low, log_high = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    ratios = np.exp(log_low + (log_high - log_low) * uniforms[:, CROP_TRIES:2 * CROP_TRIES])
    w, h = np.round(np.sqrt(areas * ratios)), np.round(np.sqrt(areas / ratios))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    rows, first = np.arange(len(shapes)), fits.argmax(axis=1)
    w, h, found = w[rows, first], h[rows, first], fits.any(axis=1)
    # the fallback: the whole image, cut to the nearest allowed aspect ratio, centred
    height, width = height[:, 0], width[:, 0]
    fall_w = np.where(width / height > CROP_RATIO[1], np.round(height * CROP_RATIO[1]), width)
    fall_h = np.where(width / height < CROP_RATIO[0], np.round(width / CROP_RATIO[0]), height)
    w, h = np.where(found, w, fall_w), np.where(found, h, fall_h)
    top = np.where(found, np.floor(uniforms[:, -2] * (height - h + 1)), (height - h) // 2)
    left = np.where(found, np.floor(uniforms[:, -1] * (width - w + 1)), (width - w) // 2)
    return np.stack([top, left, h, w], axis=1).astype(np.int64)


def _colour_jitter(image: torch.Tensor, jitter: tuple, TF) -> torch.Tensor:
    """Brightness, contrast and saturation (k = 0, 1, 2) each scaled by its factor, in the order
    of `jitter` = ((k, factor), ...), both drawn by TrainAugmentation.draw: factors from
    [1 - s, 1 + s], a random order (torchvision's ColorJitter; the hue is left alone: captions
    name colours)."""
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for k, factor in jitter:
        image = adjust[k](image, factor)
    return image


@dataclass(frozen=True)
class AugmentationDraw:
    """The random choices of one training sample's augmentation."""
    box: tuple | None = None      # crop (top, left, height, width) in the prepared image; None: fit
    jitter: tuple | None = None   # colour jitter ((k, factor), ...) in the order applied; None: none


@dataclass(frozen=True)
class TeacherView:
    """What a distillation teacher reads of a training sample: the student's sample through the
    teacher's own image size, normalisation and tokenizer. Same prepared pixels, same crop box
    and colour jitter (the student's draw, applied by the teacher's TrainAugmentation), same
    caption: the two models judge the same picture and text, each in the form it was trained on."""
    augmentation: TrainAugmentation
    tokenizer: object

    def __call__(self, pixels: np.ndarray, draw: AugmentationDraw, caption: str) -> tuple:
        return self.augmentation.apply(pixels, draw), self.tokenizer([caption])[0]


def sample_uniforms(seed: int, epoch: int, images: np.ndarray, shown: np.ndarray, count: int) -> np.ndarray:
    """[n, count] numbers uniform in [0, 1): row k is a function of (seed, epoch, images[k],
    shown[k]) alone, column j of it and j alone -- a counter-based generator.

    Every random choice of a training sample is made from its row: which caption, where to
    crop, how to jitter. Seeding a generator per sample would cost more than the rest of the
    sample's draws (~20 us each); hashing the sample's coordinates costs nothing per sample and
    works on a whole batch at once. The hash is SplitMix64's finaliser (Steele et al., 2014),
    whose outputs look independent even for consecutive inputs: the key folds in each coordinate
    in turn, and column j hashes key + j x the golden-ratio constant. The top 53 bits of a
    64-bit hash make a double in [0, 1).
    """
    key = np.full(len(images), seed, dtype=np.int64).view(np.uint64)
    for part in (np.full(len(images), epoch, dtype=np.int64), images, shown):
        key = _mix64(key ^ _mix64(np.asarray(part, dtype=np.int64).view(np.uint64) + _GOLDEN))
    bits = _mix64(key[:, None] + _GOLDEN * np.arange(1, count + 1, dtype=np.uint64))
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)          # 2^64 / the golden ratio


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection of uint64 arrays that scatters every input bit over
    the output (arithmetic wraps modulo 2^64)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))
