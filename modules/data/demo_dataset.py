"""A small generated dataset of captioned images, so the demo and tests need no downloads."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

_SHAPES = ["red circle", "blue square", "green stripes", "yellow gradient"]


def _draw(kind: int, size: int, generator: torch.Generator) -> Image.Image:
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    image = torch.zeros(3, size, size)
    if kind == 0:
        image[0] = ((x**2 + y**2) < 0.5).float()
    elif kind == 1:
        image[2] = ((x.abs() < 0.6) & (y.abs() < 0.6)).float()
    elif kind == 2:
        image[1] = (torch.sin(x * 12) > 0).float()
    else:
        image[0] = image[1] = (x + 1) / 2
    image = (image + 0.05 * torch.randn(image.shape, generator=generator)).clamp(0, 1)
    array = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(array)


def write_demo_dataset(
    folder: str | Path, *, count: int = 8, size: int = 64, seed: int = 0
) -> Path:
    """Write `count` PNG images with same-name .txt captions into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for index in range(count):
        kind = index % len(_SHAPES)
        _draw(kind, size, generator).save(folder / f"{index:03d}.png")
        (folder / f"{index:03d}.txt").write_text(
            f"geodesic demo, a {_SHAPES[kind]}", encoding="utf-8"
        )
    return folder
