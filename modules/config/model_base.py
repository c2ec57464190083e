"""What every model family's `model` section shares: the base model, per-part settings, parts.

A family declares its section as a subclass of `FamilyModelConfig` (in its own package under
`modules/models/`), with one `model_part()` field per part of the base model and `option()`
fields for its own settings. Everything outside the family reads parts through `parts()`, so no
code outside `modules/models/` names a part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator
from pydantic.fields import FieldInfo

from modules.config.fields import PathInput, Section, option
from modules.config.local_paths import LocalPath, LocalPathOrRepoId

Dtype = Literal["float32", "bfloat16", "float16"]
# what model.base_model may name, as an empty one's message says
BASE_MODEL_KINDS = "a diffusers folder, repo id or .safetensors file"


class ModelPartConfig(Section):
    """Settings of one part of the base model (a denoiser or a text encoder)."""

    train: bool = option(
        True,
        help="Put LoRA on this part and train it.",
        tab="lora",
        label="Parts to train",
    )
    learning_rate: float | None = option(
        None,
        help="Learning rate for this part's LoRA; empty uses optimizer.learning_rate. Text "
        "encoders usually want 0.25x-0.5x of the denoiser's rate.",
        tab="training",
        label="Learning rate per part",
        gt=0,
        applies_when={"train": True},
    )
    weight_dtype: Dtype = option(
        "float32",
        help="Dtype of the frozen base weights. bfloat16 halves memory on GPUs that support it.",
        tab="model",
        label="Base weight dtype per part",
    )


@dataclass(frozen=True)
class PartSpec:
    """One part of a base model as files and reports name it."""

    name: str  # the config key, and the part's prefix in diffusers/PEFT files ("unet")
    label: str  # for people: "UNet", "CLIP-L text encoder"
    kohya_prefix: str  # prefix of its adapters' names, as kohya files write them ("lora_unet")
    text_encoder: bool  # a text encoder (its outputs can be cached when it is not trained)
    trainable: bool  # False: always frozen (Flux's T5); `train` must stay false


def model_part(
    *,
    label: str,
    kohya_prefix: str,
    train: bool,
    help: str,  # noqa: A002 - reads like option()
    text_encoder: bool = False,
    trainable: bool = True,
    weight_dtype: Dtype = "float32",
) -> Any:
    """Declare one part of a family's base model as a field of its `model` section."""
    return Field(
        default_factory=lambda: ModelPartConfig(train=train, weight_dtype=weight_dtype),
        description=help,
        json_schema_extra={
            "part": {
                "label": label,
                "kohya_prefix": kohya_prefix,
                "text_encoder": text_encoder,
                "trainable": trainable,
            },
        },
    )


def part_spec(name: str, field_info: FieldInfo) -> PartSpec | None:
    """The PartSpec declared by `model_part()` on a field, or None for any other field."""
    extra = field_info.json_schema_extra
    part = extra.get("part") if isinstance(extra, dict) else None
    return PartSpec(name=name, **part) if part else None


class FamilyModelConfig(Section):
    """Base of every family's `model` section; subclasses set `family` to a Literal of their name."""

    # the LoRA file layouts this family writes and reads (`output.format`)
    lora_formats: ClassVar[tuple[str, ...]] = ("kohya", "diffusers")

    family: str
    base_model: LocalPathOrRepoId = option(
        "",
        help="Base model: a local diffusers folder, a Hugging Face repo id (online only), or a "
        ".safetensors single-file checkpoint (pickled .ckpt files are refused).",
        tab="model",
        label="Base model",
        widget=PathInput("file_or_folder", suffixes=(".safetensors",), required=BASE_MODEL_KINDS),
    )
    single_file_config: LocalPath = option(
        "",
        help="For single-file checkpoints: a local diffusers folder of the same architecture "
        "whose configs, tokenizers and missing parts are used (SDXL: needed offline; Flux: "
        "always, its single files hold only the transformer; online a repo id works too).",
        tab="model",
        label="Single-file config folder",
        widget=PathInput("folder"),
        advanced=True,
    )
    train_dtype: Dtype = option(
        "float32",
        help="Dtype of the LoRA weights themselves. Keep float32 unless memory is very tight.",
        tab="model",
        label="LoRA weight dtype",
        advanced=True,
    )

    @classmethod
    def narrowed_choices(cls) -> dict[str, tuple[str, ...]]:
        """Other sections' choices this family takes (config key -> values): the GUI offers
        only these; TrainConfig's own checks refuse the rest."""
        return {"output.format": cls.lora_formats}

    @classmethod
    def part_specs(cls) -> list[PartSpec]:
        """The family's parts, in declaration order."""
        specs = (part_spec(name, info) for name, info in cls.model_fields.items())
        return [spec for spec in specs if spec is not None]

    def parts(self) -> dict[str, ModelPartConfig]:
        """Part name -> its settings, in declaration order."""
        return {spec.name: getattr(self, spec.name) for spec in self.part_specs()}

    def trained_parts(self) -> list[str]:
        return [name for name, part in self.parts().items() if part.train]

    def trains_text_encoder(self) -> bool:
        return any(
            spec.text_encoder and self.parts()[spec.name].train for spec in self.part_specs()
        )

    @model_validator(mode="before")
    @classmethod
    def _part_defaults(cls, data: Any) -> Any:
        """A part given only in part (`"text_encoder": {"weight_dtype": "bfloat16"}`) keeps its
        declared defaults for the rest, not ModelPartConfig's: `train` stays false for a text
        encoder instead of turning on."""
        if not isinstance(data, dict):
            return data
        merged = dict(data)
        for name, info in cls.model_fields.items():
            given = data.get(name)
            if isinstance(given, dict) and part_spec(name, info) is not None:
                declared = info.default_factory().model_dump()
                merged[name] = {**declared, **given}
        return merged

    @model_validator(mode="after")
    def _parts_valid(self) -> FamilyModelConfig:
        specs = self.part_specs()
        for spec in specs:
            if not spec.trainable and getattr(self, spec.name).train:
                raise ValueError(
                    f"model.{spec.name}.train: the {spec.label} of {self.family} stays frozen; "
                    "set it to false"
                )
        if not self.trained_parts():
            names = [f"model.{spec.name}.train" for spec in specs if spec.trainable]
            listed = ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]
            raise ValueError(f"nothing to train: set {listed} to true")
        return self
