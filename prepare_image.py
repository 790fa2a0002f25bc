"""How an image becomes a CLIP model's input, with Pillow and numpy alone. export.py copies this
file into every export folder, and its check runs that copy: what a client runs is what was checked.

    from PIL import Image
    import prepare_image
    image = prepare_image.rgb(Image.open(path))        # the RGB picture training saw
    x = prepare_image.pixels(image, onnx_config)       # float32 [3, H, W] for image_encoder.onnx

rgb() is the conversion of training's decoder (data_loader.decode_image calls it): a photo stored
sideways with an EXIF orientation tag is turned upright, transparent pixels are composited on
white (dropping alpha, as Image.convert("RGB") does, would show whatever colour they hold,
often black), and 16-bit grey is scaled to 8 bits. open_clip's `preprocess` does none of this:
give it rgb(Image.open(path)), not the opened file.

pixels() is open_clip's evaluation transform (torchvision's Resize and CenterCrop on a PIL image,
ToTensor, Normalize) written out, down to its rounding: the shorter side is resized to the image
size and the longer one to int(size * long / short), truncated, not rounded (a 96 x 80 image goes
to 76 x 64, not 77 x 64: one pixel of scale, 1 - cosine up to 8e-4); the crop starts at
round((side - size) / 2), Python's round, half to even. The same float32 operations in the same
order give the same pixels, bit for bit (tests/test_export.py).
"""
import numpy as np
from PIL import Image, ImageOps

BACKGROUND = (255, 255, 255)     # what transparent pixels are composited on
RESAMPLING = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def rgb(image: Image.Image) -> Image.Image:
    """The image upright (EXIF orientation), transparency composited on white, in RGB."""
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I"):
        # 16-bit (and 32-bit integer) grey: Pillow's convert("L") clips at 255, so almost every
        # pixel would turn white. Integer images are taken as 16-bit, 0..65535.
        values = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(values, 0, 255).round().astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...: Pillow's own conversions are right


def resized_size(width, height, config) -> tuple:
    """(width, height) the image is resized to before the crop, as open_clip's transform does for
    config's resize_mode: "shortest" (the shorter side to the size, the default), "squash" (to
    the size exactly) or "longest" (the longer side to the size, then padding)."""
    target_height, target_width = config["image_size"]
    mode = config.get("resize_mode", "shortest")
    if mode == "squash":
        return target_width, target_height
    if mode == "shortest" and target_height == target_width:
        # torchvision's Resize(size): int() truncates the longer side
        short, long = sorted((width, height))
        new_short, new_long = target_height, int(target_height * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)
    if mode not in ("shortest", "longest"):
        raise ValueError(f"resize_mode {mode!r}: expected shortest, squash or longest")
    # open_clip's ResizeKeepRatio: one scale for both sides, rounded
    ratios = (height / target_height, width / target_width)
    ratio = max(ratios) if mode == "longest" else min(ratios)
    return round(width / ratio), round(height / ratio)


def centre_crop(image: Image.Image, height, width, fill) -> Image.Image:
    """torchvision's CenterCrop (open_clip's CenterCropOrPad for "longest"): pad a side shorter
    than the crop with `fill`, then crop from round((side - size) / 2)."""
    if width > image.width or height > image.height:
        left, top = max(width - image.width, 0) // 2, max(height - image.height, 0) // 2
        padded = Image.new("RGB", (max(width, image.width), max(height, image.height)), (fill,) * 3)
        padded.paste(image, (left, top))
        image = padded
    left, top = int(round((image.width - width) / 2.0)), int(round((image.height - height) / 2.0))
    return image.crop((left, top, left + width, top + height))


def pixels(image: Image.Image, config) -> np.ndarray:
    """float32 [3, H, W]: an RGB image resized and cropped as config says (onnx_config.json's
    image_size, resize_mode, interpolation, fill_color), scaled to [0, 1], (x - mean) / std."""
    height, width = config["image_size"]
    size = resized_size(image.width, image.height, config)
    method = config.get("interpolation", "bicubic")
    if config.get("resize_mode", "shortest") == "shortest" and height != width:
        method = "bicubic"   # open_clip builds this resize (ResizeKeepRatio) without the setting
    if size != image.size:
        image = image.resize(size, RESAMPLING[method])
    image = centre_crop(image, height, width, config.get("fill_color", 0))
    x = np.asarray(image, dtype=np.float32) / np.float32(255)
    mean, std = (np.asarray(config[key], dtype=np.float32) for key in ("mean", "std"))
    return ((x - mean) / std).transpose(2, 0, 1)
