"""The `data` section of the training config: concepts, captions, buckets, caching, validation.

Kept beside schema.py (which composes it into TrainConfig) so each file stays readable; the
declarations follow the same `option()` rules as every other section.
"""

from __future__ import annotations

from typing import Literal

from PIL import ImageColor
from pydantic import Field, field_validator

from modules.config.fields import Section, option
from modules.config.local_paths import LocalPath


class ConceptConfig(Section):
    """One folder of training images and how its captions are built."""

    path: LocalPath = option("", help="Folder of training images.", tab="data", label="Folder")
    recursive: bool = option(
        False, help="Also take images from sub-folders.", tab="data", label="Include sub-folders"
    )
    repeats: float = option(
        1.0,
        help="How often each image is seen per epoch. Fractions weight a concept down: 0.5 takes "
        "a different half of its images each epoch.",
        tab="data",
        label="Repeats",
        gt=0,
    )
    loss_weight: float = option(
        1.0,
        help="Multiplies the loss of this concept's images (e.g. 0.5 for regularisation images).",
        tab="data",
        label="Loss weight",
        gt=0,
        advanced=True,
    )
    caption_source: Literal["txt", "filename", "prompt"] = option(
        "txt",
        help="Where captions come from: txt = a same-name sidecar file (img01.png + img01.txt), "
        "filename = the file name without extension, prompt = the fixed `prompt` below.",
        tab="data",
        label="Caption source",
    )
    caption_extension: str = option(
        ".txt",
        help="Extension of sidecar caption files (caption_source txt).",
        tab="data",
        label="Caption extension",
        advanced=True,
        min_length=1,
    )
    require_caption: bool = option(
        False,
        help="With caption_source txt: skip (and report) images without a caption file instead "
        "of training them with an empty caption.",
        tab="data",
        label="Require captions",
    )
    prompt: str = option(
        "",
        help="The caption of every image when caption_source is prompt.",
        tab="data",
        label="Fixed prompt",
    )
    trigger_word: str = option(
        "",
        help="Put first in every caption (unless the caption already starts with it); never "
        "shuffled or dropped by tag augmentation.",
        tab="data",
        label="Trigger word",
    )
    caption_dropout: float = option(
        0.0,
        help="Probability that an image is trained with an empty caption (helps CFG at sampling).",
        tab="data",
        label="Caption dropout",
        ge=0,
        le=1,
    )
    shuffle_tags: bool = option(
        False,
        help="Shuffle the comma-separated tags of each caption every time it is used.",
        tab="data",
        label="Shuffle tags",
    )
    keep_tags: int = option(
        0,
        help="Leading tags that stay in place and are never dropped (after the trigger word).",
        tab="data",
        label="Keep first N tags",
        ge=0,
    )
    tag_dropout: float = option(
        0.0,
        help="Probability that each tag (beyond the kept ones) is left out.",
        tab="data",
        label="Tag dropout",
        ge=0,
        lt=1,
    )
    tag_separator: str = option(
        ",",
        help="What separates tags in a caption.",
        tab="data",
        label="Tag separator",
        advanced=True,
        min_length=1,
    )


class ValidationConfig(Section):
    """A held-out concept whose loss is measured at fixed timesteps and noise."""

    concepts: list[ConceptConfig] = option(
        [],
        help="Image folders used only to measure validation loss (never trained on).",
        tab="data",
        label="Validation concepts",
    )
    every_n_steps: int = option(
        0,
        help="Measure validation loss every N optimizer steps; 0 measures it only at the end.",
        tab="data",
        label="Validate every N steps",
        ge=0,
    )
    timesteps: list[int] = option(
        [100, 300, 500, 700, 900],
        help="Fixed diffusion timesteps (0-999) each validation image is scored at; the loss "
        "is their mean.",
        tab="data",
        label="Validation timesteps",
        advanced=True,
        min_length=1,
    )
    seed: int = option(
        0,
        help="Seed of the fixed validation noise, so successive measurements compare.",
        tab="data",
        label="Validation seed",
        advanced=True,
        ge=0,
    )

    @field_validator("timesteps")
    @classmethod
    def _timesteps_in_range(cls, timesteps: list[int]) -> list[int]:
        for timestep in timesteps:
            if not 0 <= timestep <= 999:
                raise ValueError(f"each timestep must be in [0, 999], got {timestep}")
        return timesteps


class DataConfig(Section):
    concepts: list[ConceptConfig] = option(
        [], help="Image folders to train on.", tab="data", label="Concepts"
    )
    resolution: int = option(
        1024,
        help="Training resolution in pixels: buckets keep about resolution x resolution pixels "
        "at every aspect ratio. Also the sample size.",
        tab="data",
        label="Resolution",
        ge=64,
        le=4096,
        multiple_of=64,
    )
    extra_resolutions: list[int] = option(
        [],
        help="More resolutions for multi-resolution training: every image is also trained at "
        "each of these (multiples of 64), so an epoch sees it once per resolution.",
        tab="data",
        label="Extra resolutions",
        advanced=True,
    )
    bucketing: bool = option(
        True,
        help="Aspect-ratio buckets: each image goes to the bucket closest to its aspect ratio and "
        "batches come from one bucket. Off: every image is cropped square.",
        tab="data",
        label="Aspect-ratio bucketing",
    )
    bucket_max_aspect: float = option(
        4.0,
        help="Most elongated bucket (long side / short side); more extreme images are cropped.",
        tab="data",
        label="Max bucket aspect ratio",
        advanced=True,
        ge=1,
    )
    crop: Literal["center", "random"] = option(
        "center",
        help="How an image is cropped to its bucket after resizing. random varies per epoch, "
        "so its latents are encoded live instead of cached.",
        tab="data",
        label="Crop",
    )
    flip: bool = option(
        False,
        help="Randomly mirror images horizontally (both variants are cached).",
        tab="data",
        label="Random flip",
    )
    drop_last: bool = option(
        False,
        help="Drop each bucket's last partial batch every epoch instead of training it smaller.",
        tab="data",
        label="Drop last partial batch",
        advanced=True,
    )
    alpha_background: str = option(
        "white",
        help="Colour transparent images are composited on: a name or #rrggbb.",
        tab="data",
        label="Background for transparency",
        advanced=True,
    )
    min_image_side: int = option(
        64,
        help="Images whose shorter side is below this many pixels are skipped as too small.",
        tab="data",
        label="Min image side",
        advanced=True,
        ge=1,
    )
    masked_training: bool = option(
        False,
        help="Weight the loss by same-name mask images (img01.png + img01-mask.png; white = "
        "train, black = ignore). Images without a mask train everywhere.",
        tab="data",
        label="Masked training",
    )
    unmasked_weight: float = option(
        0.1,
        help="Loss weight of the black (masked-out) area with masked training.",
        tab="data",
        label="Unmasked weight",
        ge=0,
        le=1,
    )
    cache_latents: bool = option(
        True,
        help="Encode each image (and flip variant) once with the VAE and keep the latents on disk "
        "in the cache folder; unchanged images are never encoded again. Ignored with random crop.",
        tab="data",
        label="Cache latents",
    )
    cache_text_embeddings: bool = option(
        True,
        help="Cache the text encoders' outputs per caption, when the text encoders are not "
        "trained and the concept does not shuffle or drop tags.",
        tab="data",
        label="Cache text embeddings",
    )
    offload_encoders: bool = option(
        True,
        help="After caching, keep the VAE and (fully cached, untrained) text encoders in CPU "
        "memory; they visit the GPU only for sampling.",
        tab="data",
        label="Offload encoders after caching",
        advanced=True,
    )
    cache_dir: LocalPath = option(
        "",
        help="Folder for the latent and text caches; empty means <workspace>/cache. Runs that "
        "share it share cached entries.",
        tab="data",
        label="Cache folder",
        advanced=True,
    )
    workers: int = option(
        2,
        help="Background processes that read and decode images; 0 loads in the training process.",
        tab="data",
        label="Loader workers",
        advanced=True,
        ge=0,
    )
    validation: ValidationConfig = Field(default_factory=ValidationConfig)

    @field_validator("extra_resolutions")
    @classmethod
    def _resolutions_valid(cls, resolutions: list[int]) -> list[int]:
        for resolution in resolutions:
            if not 64 <= resolution <= 4096 or resolution % 64:
                raise ValueError(f"each must be a multiple of 64 in [64, 4096], got {resolution}")
        return resolutions

    @field_validator("alpha_background")
    @classmethod
    def _color_valid(cls, color: str) -> str:
        try:
            ImageColor.getrgb(color)
        except ValueError:
            raise ValueError(f"not a colour name or #rrggbb: {color!r}") from None
        return color
