"""Specification of augmentation.py: what a training image goes through, and the per-sample
random numbers that decide it."""
import dataclasses
import inspect
import math

import numpy as np
import pytest
import torch
from open_clip.transform import PreprocessCfg
from PIL import Image

import augmentation
import data_loader as dl
import sample_data
import settings

PREPROCESS = dataclasses.asdict(PreprocessCfg(size=32))  # the shape of model.visual.preprocess_cfg


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return sample_data.create_sample_dataset(tmp_path_factory.mktemp("sample") / "set", num_samples=4, seed=0)


def test_without_augmentation_a_training_image_is_the_evaluation_image(sample):
    image = dl.load_caption_index(sample["index"]).load_image(0).resize((48, 40))
    evaluate = dl.image_transform(PREPROCESS)
    plain = augmentation.TrainAugmentation(PREPROCESS, augment=False)
    assert evaluate(image).shape == (3, 32, 32) and plain.side == 32
    # the same pixels up to the resampling of torchvision's tensor resize and PIL's
    pixels = plain.apply(plain.prepare(image), augmentation.AugmentationDraw())
    assert pixels.dtype == torch.uint8                    # normalised per batch, where the model runs
    torch.testing.assert_close(plain.normalise(pixels), (pixels / 255 - plain.mean) / plain.std)
    torch.testing.assert_close(plain.normalise(pixels[None])[0], evaluate(image), atol=0.05, rtol=0)


def test_a_samples_uniforms_depend_on_its_own_coordinates_alone():
    images, shown = np.arange(2000), np.full(2000, -1)
    uniforms = augmentation.sample_uniforms(7, 3, images, shown, 30)
    assert uniforms.shape == (2000, 30) and uniforms.min() >= 0 and uniforms.max() < 1
    # uniform and uncorrelated: across samples, across columns, between neighbouring samples
    assert abs(uniforms.mean() - 0.5) < 0.005 and abs(uniforms.var() - 1 / 12) < 0.002
    assert np.histogram(uniforms, bins=10, range=(0, 1))[0].min() > 0.97 * uniforms.size / 10
    assert abs(np.corrcoef(uniforms[:, 0], uniforms[:, 1])[0, 1]) < 0.06
    assert abs(np.corrcoef(uniforms[:-1, 0], uniforms[1:, 0])[0, 1]) < 0.06
    # a row is the same in any batch, whatever its neighbours and however many columns are asked
    assert np.array_equal(augmentation.sample_uniforms(7, 3, images[[5, 9]], shown[[5, 9]], 4), uniforms[[5, 9], :4])
    for changed in ((8, 3, images, shown), (7, 4, images, shown), (7, 3, images + 1, shown),
                    (7, 3, images, shown + 1)):
        assert np.isclose(augmentation.sample_uniforms(*changed, 30), uniforms).mean() < 0.01, changed
    huge = np.array([2**62 + 5, 2**62 + 6])          # shard ids take 55 bits and more
    assert len(np.unique(augmentation.sample_uniforms(0, 0, huge, np.array([-1, -1]), 1))) == 2


def test_augmentation_is_drawn_from_the_samples_uniforms_alone(sample):
    image = dl.load_caption_index(sample["index"]).load_image(0)
    augment = augmentation.TrainAugmentation(PREPROCESS)
    pixels = augment.prepare(image)
    shapes = np.array([pixels.shape[:2]] * 2)

    def augmented(epoch):
        uniforms = augmentation.sample_uniforms(0, epoch, np.array([1, 2]), np.array([-1, -1]), augment.DRAWS)
        return [augment.apply(pixels, draw) for draw in augment.draw(shapes, uniforms)]
    first = augmented(0)
    torch.manual_seed(123)                                   # global generators play no part
    np.random.seed(123)
    assert first[0].shape == (3, 32, 32)
    assert all(torch.equal(a, b) for a, b in zip(first, augmented(0)))
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[0], augmented(1)[0])


def test_augmentation_defaults_are_the_settings_defaults():
    defaults = inspect.signature(augmentation.TrainAugmentation).parameters
    for name in ("crop_min_scale", "colour_jitter"):
        assert defaults[name].default == settings.SETTINGS[name].default, name


@pytest.mark.parametrize("height,width", [(100, 100), (60, 200), (200, 60), (37, 41)])
def test_crop_boxes_follow_random_resized_crop(height, width):
    uniforms = np.random.default_rng(0).random((300, 2 * augmentation.CROP_TRIES + 2))
    boxes = [tuple(box) for box in augmentation._crop_boxes(np.array([[height, width]] * 300), (0.5, 1.0), uniforms)]
    for top, left, h, w in boxes:
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
    areas = np.array([h * w / (height * width) for _, _, h, w in boxes])
    ratios = np.array([w / h for _, _, h, w in boxes])
    if height == width:     # every try succeeds: area and ratio in their ranges (up to rounding)
        assert areas.min() > 0.5 - 0.03 and areas.max() <= 1.0 and areas.min() < 0.55
        assert ratios.min() > augmentation.CROP_RATIO[0] - 0.03 and ratios.max() < augmentation.CROP_RATIO[1] + 0.03
    elif max(height, width) / min(height, width) > 2:   # too elongated: the central fallback box
        assert len(set(boxes)) == 1


@pytest.mark.parametrize("colour_jitter", [0.0, 0.5, 1.0])
def test_colour_jitter_is_drawn_for_its_share_of_images(colour_jitter):
    augment = augmentation.TrainAugmentation(PREPROCESS, colour_jitter=colour_jitter)
    pixels = np.zeros((40, 40, 3), dtype=np.uint8)
    draws = augment.draw(np.array([pixels.shape[:2]] * 400), np.random.default_rng(0).random((400, augment.DRAWS)))
    jittered = np.mean([draw.jitter is not None for draw in draws])
    assert abs(jittered - colour_jitter) < 0.08
    assert all(sorted(k for k, _ in draw.jitter) == [0, 1, 2] for draw in draws if draw.jitter)


@pytest.mark.parametrize("crop_min_scale", [0.9, 0.3])
def test_a_prepared_image_keeps_enough_pixels_for_the_smallest_crop(crop_min_scale):
    augment = augmentation.TrainAugmentation(PREPROCESS, crop_min_scale=crop_min_scale)
    big = Image.new("RGB", (400, 300))
    pixels = augment.prepare(big)
    assert pixels.shape == (augment.side, round(400 * augment.side / 300), 3)
    # the smallest crop (crop_min_scale at ratio 3/4) of the prepared image still covers 32 pixels
    assert math.sqrt(crop_min_scale * augmentation.CROP_RATIO[0]) * augment.side >= 32
    assert augment.prepare(Image.new("RGB", (20, 10))).shape == (10, 20, 3)       # never enlarged
    assert augment.prepare(Image.new("RGB", (4000, 100))).shape[1] == 4 * augment.side
