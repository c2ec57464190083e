"""A minimal dataset: folders of images with same-name .txt captions, resized and center-cropped.

The data-pipeline issue replaces this with concepts, buckets and caching; the trainer only relies on
`scan_concepts` (which fails before any model is loaded) and `load_batch`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from modules.config.schema import DataConfig
from modules.errors import UserError
from modules.models.base import Batch

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


@dataclass(frozen=True)
class Sample:
    image: Path
    caption: str


def scan_concepts(config: DataConfig) -> list[Sample]:
    """Every image of every concept (repeated), or a UserError before any model is loaded."""
    if not config.concepts:
        raise UserError('data.concepts is empty: add at least one {"path": "<image folder>"}')
    samples: list[Sample] = []
    for index, concept in enumerate(config.concepts):
        folder = Path(concept.path).expanduser()
        if not folder.is_dir():
            raise UserError(f"data.concepts.{index}.path: folder {str(folder)!r} does not exist")
        found = []
        for image in sorted(folder.iterdir()):
            if image.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            caption_file = image.with_suffix(".txt")
            try:
                caption = (
                    caption_file.read_text(encoding="utf-8").strip()
                    if caption_file.exists()
                    else ""
                )
            except UnicodeDecodeError:
                log.warning("skipped %s: caption %s is not UTF-8", image, caption_file.name)
                continue
            found.append(Sample(image=image, caption=caption))
        if not found:
            raise UserError(
                f"data.concepts.{index}.path: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {str(folder)!r}"
            )
        samples.extend(found * concept.repeats)
    return samples


def load_image(
    path: Path, *, resolution: int
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Pixels in [-1, 1] at `resolution` squared, the original (h, w) and the crop's (top, left)."""
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    width, height = image.size
    scale = resolution / min(width, height)
    resized = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(resized, Image.Resampling.LANCZOS)
    left, top = (resized[0] - resolution) // 2, (resized[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    pixels = pixels.view(resolution, resolution, 3).permute(2, 0, 1).float() / 127.5 - 1
    return pixels, (height, width), (top, left)


def load_batch(samples: list[Sample], *, resolution: int) -> Batch | None:
    """Load a micro-batch; unreadable images are skipped with a warning (None if all fail)."""
    pixels, captions, sizes, crops = [], [], [], []
    for sample in samples:
        try:
            image, size, crop = load_image(sample.image, resolution=resolution)
        except (OSError, UnidentifiedImageError, ValueError) as error:
            log.warning("skipped %s: %s", sample.image, error)
            continue
        pixels.append(image)
        captions.append(sample.caption)
        sizes.append(size)
        crops.append(crop)
    if not pixels:
        return None
    return Batch(
        pixels=torch.stack(pixels),
        captions=captions,
        original_sizes=torch.tensor(sizes),
        crop_top_lefts=torch.tensor(crops),
    )
