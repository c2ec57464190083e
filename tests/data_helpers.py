"""Builders of image files for the data tests: good ones of any shape, and every kind of bad one."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

EXIF_ORIENTATION = 0x0112


def noise_image(width: int, height: int, *, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = len(Image.new(mode, (1, 1)).getbands())
    array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode=mode)


def write_image(
    path: Path, width: int, height: int, *, seed: int = 0, caption: str | None = "a photo"
) -> Path:
    """A random image (format from the suffix) and, unless None, its .txt caption."""
    path.parent.mkdir(parents=True, exist_ok=True)
    noise_image(width, height, seed=seed).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def write_rotated_jpeg(path: Path, stored: tuple[int, int], *, orientation: int = 6) -> Path:
    """A JPEG stored at `stored` (w, h) whose EXIF says to rotate it (6: 90 degrees clockwise)."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    noise_image(*stored).save(path, exif=exif.tobytes())
    return path


def write_cmyk_jpeg(path: Path, size: int = 80) -> Path:
    """A pure red CMYK JPEG (C=0, M=Y=100%, K=0)."""
    Image.new("CMYK", (size, size), (0, 255, 255, 0)).save(path, quality=95)
    return path


def write_palette_png(path: Path, size: int = 80) -> Path:
    """A palette PNG: left half transparent (index 0), right half opaque blue (index 1)."""
    image = Image.new("P", (size, size), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    image.paste(1, (size // 2, 0, size, size))
    image.save(path, transparency=0)
    return path


def write_truncated_png(path: Path, size: int = 96) -> Path:
    buffer = io.BytesIO()
    noise_image(size, size).save(buffer, "PNG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def write_huge_png_header(path: Path, side: int = 30_000) -> Path:
    """A PNG whose header claims side x side pixels (a decompression bomb), with no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def write_header_only_jpeg(path: Path, side: int = 11_000) -> Path:
    """A JPEG whose header claims side x side pixels (121 Mpx by default) and whose scan stops
    right after it: libjpeg decodes it as flat grey without an error."""
    buffer = io.BytesIO()
    noise_image(16, 16).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    frame = data.index(b"\xff\xc0")  # SOF0: length, precision, then height and width
    struct.pack_into(">HH", data, frame + 5, side, side)
    scan = data.index(b"\xff\xda")  # SOS header, then entropy-coded data we leave out
    (length,) = struct.unpack(">H", data[scan + 2 : scan + 4])
    path.write_bytes(bytes(data[: scan + 2 + length]) + b"\xff\xd9")
    return path
