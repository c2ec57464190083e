"""What a tiny-world image shows: the shape's mask, place, colour and which shape it is.

The tests read generated samples with these: a pretrained model must draw the shape, colour and
place its prompt asks for, and the demo's LoRA must draw the novel shape. Shapes are recognised
by the best overlap (IoU) of the image's mask with each shape's silhouette, drawn at the mask's
centre over a range of sizes.
"""

from __future__ import annotations

import colorsys

import torch

from modules.data import tiny_world


def background_of(image: torch.Tensor) -> torch.Tensor:
    """The median colour of the image's border pixels (shapes never reach the border)."""
    border = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], dim=1)
    return border.median(dim=1).values


def shape_mask(image: torch.Tensor, background: str | None = None) -> torch.Tensor:
    """Pixels that differ clearly from the background (named, or read from the border)."""
    if background is None:
        reference = background_of(image)
    else:
        reference = torch.tensor(tiny_world.BACKGROUNDS[background])
    return (image - reference[:, None, None]).abs().sum(0) > 0.3


def _coords(size: int) -> torch.Tensor:
    return (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1


def centroid(mask: torch.Tensor) -> tuple[float, float]:
    """(x, y) of the mask's centre of mass in [-1, 1] image coordinates."""
    coords = _coords(mask.shape[-1])
    weight = mask.float()
    total = weight.sum()
    return float((weight.sum(0) * coords).sum() / total), float(
        (weight.sum(1) * coords).sum() / total
    )


def hue(rgb: torch.Tensor) -> float:
    return colorsys.rgb_to_hsv(*rgb.tolist())[0]


def hue_distance(a: float, b: float) -> float:
    return min(abs(a - b), 1 - abs(a - b))


def nearest_colour(rgb: torch.Tensor) -> str:
    """The world's colour name whose hue is nearest to `rgb`'s."""
    seen = hue(rgb)
    return min(
        tiny_world.COLOURS,
        key=lambda name: hue_distance(hue(torch.tensor(tiny_world.COLOURS[name])), seen),
    )


def shape_scores(mask: torch.Tensor) -> dict[str, float]:
    """For every shape of the world and the novel one: the best IoU of the mask with that shape's
    silhouette centred near the mask's centroid, over sizes and small shifts."""
    if mask.sum() < 4:
        return {shape: 0.0 for shape in (*tiny_world.WORLD_SHAPES, tiny_world.NOVEL_SHAPE)}
    size = mask.shape[-1]
    coords = _coords(size)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    cx, cy = centroid(mask)
    shifts = torch.linspace(-0.08, 0.08, 5).tolist()
    scores = {}
    for shape in (*tiny_world.WORLD_SHAPES, tiny_world.NOVEL_SHAPE):
        best = 0.0
        for r in torch.linspace(0.12, 0.55, 16).tolist():
            for dx in shifts:
                for dy in shifts:
                    inside = tiny_world.shape_distance(shape, gx - cx - dx, gy - cy - dy, r) < 0
                    union = (inside | mask).sum()
                    best = max(best, float((inside & mask).sum() / union))
        scores[shape] = best
    return scores


def recognised_shape(image: torch.Tensor, background: str | None = None) -> str | None:
    """The shape the image shows best, or None when nothing stands out from the background."""
    scores = shape_scores(shape_mask(image, background))
    shape, score = max(scores.items(), key=lambda item: item[1])
    return shape if score > 0.5 else None
