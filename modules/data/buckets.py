"""Aspect-ratio buckets: which (width, height) each image trains at, and how it is cropped there.

Buckets keep about resolution x resolution pixels, with sides multiples of what the model family
needs (64 for SDXL), so a portrait photo is not squashed into a square. An image goes to the bucket
nearest its aspect ratio (on a log scale, so 2:1 and 1:2 are equally far from 1:1), is resized
to cover it and cropped; the crop offsets and original size feed SDXL's time ids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Size = tuple[int, int]  # (width, height)


def make_buckets(resolution: int, *, step: int, max_aspect: float, enabled: bool) -> list[Size]:
    """All buckets of one resolution, sorted; just the square when bucketing is off."""
    if not enabled:
        return [(resolution, resolution)]
    area = resolution * resolution
    buckets = {(resolution, resolution)}
    width = step
    while width * step <= area:
        height = (area // width) // step * step
        if height >= step and max(width / height, height / width) <= max_aspect:
            buckets.update({(width, height), (height, width)})  # portrait and landscape alike
        width += step
    return sorted(buckets)


def nearest_bucket(size: Size, buckets: list[Size]) -> Size:
    """The bucket whose aspect ratio is closest to `size`'s; ties go to the larger area."""
    aspect = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


@dataclass(frozen=True)
class Placement:
    """How one image lands in its bucket: resize to `resized`, crop at (top, left), maybe flip."""

    original: Size  # (width, height) after EXIF rotation
    resized: Size
    bucket: Size
    top: int
    left: int
    flip: bool

    @property
    def crop_top_left(self) -> tuple[int, int]:
        """(top, left) as SDXL's time ids want it, measured in the (possibly mirrored) image."""
        left = self.resized[0] - self.bucket[0] - self.left if self.flip else self.left
        return self.top, left


def cover_size(original: Size, bucket: Size) -> Size:
    """The smallest size with `original`'s aspect ratio that covers `bucket`."""
    scale = max(bucket[0] / original[0], bucket[1] / original[1])
    return (
        max(bucket[0], round(original[0] * scale)),
        max(bucket[1], round(original[1] * scale)),
    )


def place(
    original: Size, bucket: Size, *, random_crop: bool, flip: bool, draws: tuple[float, float]
) -> Placement:
    """Where the crop goes; `draws` are two uniform [0, 1) numbers used by the random crop."""
    resized = cover_size(original, bucket)
    spare_x, spare_y = resized[0] - bucket[0], resized[1] - bucket[1]
    if random_crop:
        left = min(spare_x, int(draws[0] * (spare_x + 1)))
        top = min(spare_y, int(draws[1] * (spare_y + 1)))
    else:
        left, top = spare_x // 2, spare_y // 2
    return Placement(
        original=original, resized=resized, bucket=bucket, top=top, left=left, flip=flip
    )
