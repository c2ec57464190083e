"""The tiny world: procedurally drawn, captioned images of simple shapes.

Every image is one shape of one colour and size at one place on a plain background, drawn with
anti-aliased edges from signed distance functions, and captioned with the words that describe
it ("a small red circle on the left, on a white background"; some words are left out at random,
so the model also learns to fill them in). A seed fixes every image and caption, so the
pretraining set, the demo's concept and the benchmarks' data are reproducible bit for bit.

The base model is pretrained on `WORLD_SHAPES`; `NOVEL_SHAPE` (a heart) never appears there and is
what the demo's LoRA teaches, under the trigger word `TRIGGER_WORD`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SIZE = 64

WORLD_SHAPES = ("circle", "square", "triangle", "diamond", "cross")
NOVEL_SHAPE = "heart"
TRIGGER_WORD = "zorb"  # stands for the heart in captions; not a word of the world

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.10, 0.70, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.98, 0.85, 0.10),
    "purple": (0.60, 0.20, 0.80),
    "orange": (1.00, 0.55, 0.05),
}
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "white": (0.95, 0.95, 0.95),
    "black": (0.06, 0.06, 0.06),
    "gray": (0.50, 0.50, 0.50),
}
# centre of the shape as (x, y) in [-1, 1] image coordinates (y down)
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.0, 0.0),
    "left": (-0.5, 0.0),
    "right": (0.5, 0.0),
    "top": (0.0, -0.5),
    "bottom": (0.0, 0.5),
}
POSITION_PHRASES = {
    "center": "in the center",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
SIZES: dict[str, float] = {"small": 0.24, "large": 0.40}  # half-extent in [-1, 1] units

# every word a caption can use, for a word-level tokenizer
CAPTION_WORDS = sorted(
    {
        "a",
        "on",
        "the",
        "in",
        "at",
        "background",
        *WORLD_SHAPES,
        *COLOURS,
        *BACKGROUNDS,
        *SIZES,
        *(word for phrase in POSITION_PHRASES.values() for word in phrase.split()),
    }
)


@dataclass(frozen=True)
class Scene:
    """One image's content; the jitter fields make images with equal captions differ."""

    shape: str
    colour: str
    size: str
    position: str
    background: str
    dx: float = 0.0  # offset from the position's centre, [-1, 1] units
    dy: float = 0.0
    scale: float = 1.0  # multiplies the size's half-extent
    shade: float = 1.0  # multiplies the colour's brightness

    def caption(self, *, noun: str | None = None, keep: tuple[bool, ...] = (True,) * 4) -> str:
        """`a [size] [colour] <noun> [position][, on a <bg> background]`; `keep` switches the
        optional parts (size, colour, position, background) on or off."""
        size, colour, position, background = keep
        words = []
        if size:
            words.append(self.size)
        if colour:
            words.append(self.colour)
        words.append(noun or self.shape)
        if position:
            words.append(POSITION_PHRASES[self.position])
        article = "an" if words[0][0] in "aeiou" else "a"
        text = " ".join([article, *words])
        if background:
            text += f", on a {self.background} background"
        return text


def random_scenes(
    count: int,
    *,
    seed: int,
    shapes: tuple[str, ...] = WORLD_SHAPES,
    jitter: float = 0.1,
) -> list[Scene]:
    """`count` scenes with every attribute drawn uniformly from a generator seeded with `seed`."""
    rng = np.random.default_rng(seed)

    def pick(options) -> str:
        options = list(options)
        return options[int(rng.integers(len(options)))]

    scenes = []
    for _ in range(count):
        scenes.append(
            Scene(
                shape=pick(shapes),
                colour=pick(COLOURS),
                size=pick(SIZES),
                position=pick(POSITIONS),
                background=pick(BACKGROUNDS),
                dx=float(rng.uniform(-jitter, jitter)),
                dy=float(rng.uniform(-jitter, jitter)),
                scale=float(rng.uniform(0.9, 1.1)),
                shade=float(rng.uniform(0.9, 1.0)),
            )
        )
    return scenes


def random_captions(scenes: list[Scene], *, seed: int, keep_probability: float = 0.8) -> list[str]:
    """Captions that leave out each optional part with probability 1 - keep_probability."""
    rng = np.random.default_rng(seed)
    keeps = rng.random((len(scenes), 4)) < keep_probability
    return [
        scene.caption(keep=tuple(bool(k) for k in keep))
        for scene, keep in zip(scenes, keeps, strict=True)
    ]


# -- drawing ----------------------------------------------------------------------------------------


def _box(x: torch.Tensor, y: torch.Tensor, half_w: float, half_h: float) -> torch.Tensor:
    qx, qy = x.abs() - half_w, y.abs() - half_h
    outside = torch.sqrt(qx.clamp_min(0) ** 2 + qy.clamp_min(0) ** 2)
    return outside + torch.maximum(qx, qy).clamp_max(0)


def _triangle(x: torch.Tensor, y: torch.Tensor, r: float) -> torch.Tensor:
    """Equilateral triangle pointing up with circumradius r, centred on its centroid.

    The largest of the three edges' signed distances: exact inside and along the edges, which
    is all that anti-aliasing needs.
    """
    k = math.sqrt(3.0) / 2
    base = y - r / 2
    right = k * x - 0.5 * y - r / 2
    left = -k * x - 0.5 * y - r / 2
    return torch.maximum(base, torch.maximum(right, left))


def _heart(x: torch.Tensor, y: torch.Tensor, r: float) -> torch.Tensor:
    """Inigo Quilez's heart, scaled to half-extent about r and centred."""
    s = 1.6 * r
    px = x.abs() / s
    py = (-y / s) + 0.55  # image y points down; shift the heart's centre to the origin
    upper = (px + py) > 1.0
    d_upper = torch.sqrt((px - 0.25) ** 2 + (py - 0.75) ** 2) - math.sqrt(2.0) / 4.0
    m = 0.5 * (px + py).clamp_min(0)
    d_lower_a = px**2 + (py - 1.0) ** 2
    d_lower_b = (px - m) ** 2 + (py - m) ** 2
    d_lower = torch.sqrt(torch.minimum(d_lower_a, d_lower_b)) * torch.sign(px - py)
    return torch.where(upper, d_upper, d_lower) * s


def shape_distance(shape: str, x: torch.Tensor, y: torch.Tensor, r: float) -> torch.Tensor:
    """Signed distance (negative inside) of `shape` with half-extent r, centred at the origin."""
    if shape == "circle":
        return torch.sqrt(x**2 + y**2) - r
    if shape == "square":
        return _box(x, y, 0.85 * r, 0.85 * r)
    if shape == "triangle":
        return _triangle(x, y - 0.2 * r, 1.25 * r)
    if shape == "diamond":
        return (x.abs() + y.abs() - 1.1 * r) / math.sqrt(2.0)
    if shape == "cross":
        arm = 0.33 * r
        return torch.minimum(_box(x, y, r, arm), _box(x, y, arm, r))
    if shape == "heart":
        return _heart(x, y, r)
    raise ValueError(f"unknown shape {shape!r}")


def render(scenes: list[Scene], *, size: int = IMAGE_SIZE) -> torch.Tensor:
    """The scenes as a float32 (N, 3, size, size) batch in [0, 1], edges anti-aliased."""
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    pixel = 2.0 / size
    images = torch.empty(len(scenes), 3, size, size)
    for index, scene in enumerate(scenes):
        cx, cy = POSITIONS[scene.position]
        r = SIZES[scene.size] * scene.scale
        distance = shape_distance(scene.shape, gx - cx - scene.dx, gy - cy - scene.dy, r)
        coverage = (0.5 - distance / pixel).clamp(0, 1)
        colour = torch.tensor(COLOURS[scene.colour]) * scene.shade
        background = torch.tensor(BACKGROUNDS[scene.background])
        images[index] = background[:, None, None] + coverage * (colour - background)[:, None, None]
    return images


def to_pil(image: torch.Tensor) -> Image.Image:
    array = (image.clamp(0, 1).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(array)


def write_dataset(
    folder: str | Path, scenes: list[Scene], captions: list[str], *, size: int = IMAGE_SIZE
) -> Path:
    """PNG images with same-name .txt captions, as a user's dataset folder looks."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for index, (image, caption) in enumerate(zip(render(scenes, size=size), captions, strict=True)):
        to_pil(image).save(folder / f"{index:03d}.png")
        (folder / f"{index:03d}.txt").write_text(caption, encoding="utf-8")
    return folder


def concept_scenes(count: int, *, seed: int) -> list[Scene]:
    """Scenes of the novel shape (the demo's concept), attributes drawn like the world's."""
    return random_scenes(count, seed=seed, shapes=(NOVEL_SHAPE,))


def write_concept_dataset(folder: str | Path, *, count: int = 12, seed: int = 0) -> Path:
    """`count` images of the novel shape, captioned with the trigger word in place of its name."""
    scenes = concept_scenes(count, seed=seed)
    captions = [scene.caption(noun=TRIGGER_WORD) for scene in scenes]
    return write_dataset(folder, scenes, captions)
