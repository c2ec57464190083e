"""Reading image files: probing them at scan time, and decoding them into bucket-sized tensors.

Every problem becomes an `ImageError` whose message is the one-line reason the scan report shows,
so a bad file is named and skipped instead of stopping a run.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageColor, ImageOps, UnidentifiedImageError

from modules.data.buckets import Placement, Size

IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".webp")
# Image files we recognise but do not read: reported as skipped rather than silently ignored.
UNSUPPORTED_SUFFIXES = {
    ".avif", ".cr2", ".dng", ".gif", ".heic", ".heif", ".ico", ".jp2", ".jxl", ".nef", ".psd",
    ".svg", ".tga", ".tif", ".tiff",
}  # fmt: skip
# Pillow's warning for images over ~89 Mpx: the scan judges such files itself (JPEGs decode at
# reduced scale; headers promising more pixels than the data holds are skipped and reported)
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
FORMATS = {"BMP", "JPEG", "MPO", "PNG", "WEBP"}  # MPO: the multi-picture JPEG of many cameras
MASK_SUFFIX = "-mask"
# The most pixels a byte of each format can encode: a JPEG codes at least one bit per 8x8 block
# for its DC term (<= 512 px/byte), a PNG at best 1-bit pixels at deflate's 1032:1 (~8,300).
# A header promising more describes data that is not there (libjpeg fills it with flat grey) or
# a decompression bomb. Lossless WebP codes a flat image in almost no bits: no bound.
MAX_PIXELS_PER_BYTE = {"JPEG": 1024, "MPO": 1024, "PNG": 10_000}
_EXIF_ORIENTATION = 0x0112


class ImageError(Exception):
    """A file that cannot be trained on; str() is the reason shown in the scan report."""


@dataclass(frozen=True)
class ImageInfo:
    sha256: str
    size: Size  # (width, height) after EXIF rotation
    has_alpha: bool


def background_rgb(color: str) -> tuple[int, int, int]:
    return ImageColor.getrgb(color)[:3]


def describe(error: BaseException) -> str:
    """The scan report's reason for a Pillow/OS error."""
    if isinstance(error, ImageError):
        return str(error)
    if isinstance(error, Image.DecompressionBombError):
        return f"too large: {str(error).split(', could')[0]}; downscale it"
    if isinstance(error, UnidentifiedImageError):
        return "unreadable: not an image file Pillow can identify"
    message = str(error)
    if isinstance(error, EOFError) or "truncated" in message or "broken PNG" in message:
        return f"truncated: {message or 'unexpected end of file'}"
    if isinstance(error, FileNotFoundError):
        return "unreadable: the file is gone"
    if isinstance(error, OSError) and error.strerror:
        return f"unreadable: {error.strerror}"
    return f"unreadable: {message or type(error).__name__}"


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def open_rgb(
    source: Path | BinaryIO, *, need: Size | None, background: tuple[int, int, int]
) -> tuple[Image.Image, Size, bool]:
    """(RGB image, full size after EXIF rotation, had transparency).

    EXIF orientation is applied and transparency composited on `background`. `need` is the size
    the image will be resized to: JPEGs are decoded at the smallest DCT scale that still covers
    it, several times faster for large photos.
    """
    with Image.open(source) as image:
        if image.format not in FORMATS:
            raise ImageError(f"unsupported format {image.format}; convert it to png or jpg")
        rotated = image.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
        width, height = image.size
        full = (height, width) if rotated else (width, height)
        if need is not None and image.format in ("JPEG", "MPO"):
            image.draft("RGB", (need[1], need[0]) if rotated else need)
        alpha = _has_alpha(image)
        image = ImageOps.exif_transpose(image)
        if not alpha:
            return image.convert("RGB"), full, False
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB"), full, True


def probe(path: Path, *, background: tuple[int, int, int]) -> ImageInfo:
    """Hash and fully decode `path` (at reduced scale for JPEG) so broken files fail here."""
    try:
        data = path.read_bytes()
        if not data:
            raise ImageError("empty file (0 bytes)")
        with Image.open(io.BytesIO(data)) as header:  # reads the header only
            width, height = header.size
            limit = MAX_PIXELS_PER_BYTE.get(header.format or "")
        if limit is not None and width * height > limit * len(data):
            raise ImageError(
                f"the header claims {width}x{height} px but the file holds only {len(data)} "
                "bytes: truncated data or a decompression bomb; re-export it"
            )
        _, size, alpha = open_rgb(io.BytesIO(data), need=(1, 1), background=background)
    except ImageError:
        raise
    except Exception as error:  # any decoder failure is a reason to skip the file
        raise ImageError(describe(error)) from None
    return ImageInfo(sha256=hashlib.sha256(data).hexdigest(), size=size, has_alpha=alpha)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(C, H, W) float in [-1, 1] for RGB, [0, 1] for a single-channel mask."""
    array = torch.from_numpy(np.array(image))
    if array.ndim == 2:
        return array.unsqueeze(0).float() / 255
    return array.permute(2, 0, 1).float() / 127.5 - 1


def _fit(image: Image.Image, placement: Placement, resample: Image.Resampling) -> Image.Image:
    if image.size != placement.resized:
        image = image.resize(placement.resized, resample)
    left, top = placement.left, placement.top
    image = image.crop((left, top, left + placement.bucket[0], top + placement.bucket[1]))
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if placement.flip else image


def load_pixels(
    path: Path, placement: Placement, *, background: tuple[int, int, int]
) -> torch.Tensor:
    """The image resized, cropped (and mirrored) into its bucket: (3, H, W) in [-1, 1]."""
    try:
        image, _, _ = open_rgb(path, need=placement.resized, background=background)
        return to_tensor(_fit(image, placement, Image.Resampling.LANCZOS))
    except ImageError:
        raise
    except Exception as error:
        raise ImageError(describe(error)) from None


def load_mask(path: Path, placement: Placement) -> torch.Tensor:
    """The mask stretched over the image, cropped like it: (1, H, W) in [0, 1]."""
    try:
        with Image.open(path) as opened:
            mask = ImageOps.exif_transpose(opened).convert("L")
        return to_tensor(_fit(mask, placement, Image.Resampling.BILINEAR))
    except Exception as error:
        raise ImageError(describe(error)) from None


def mask_path(image: Path) -> Path:
    return image.with_name(f"{image.stem}{MASK_SUFFIX}.png")
