"""The one training config shared by the GUI, presets and the CLI.

Pydantic v2 models were chosen over dataclasses plus a hand validator: they give nested validation,
typed defaults, bounds and JSON round trips from one declaration, and their errors carry the key
path that our messages need. Bump CONFIG_VERSION and add a migration when a field moves or changes
meaning (modules/config/migrations.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from modules.config.data_schema import DataConfig
from modules.config.fields import SEED_MAX, PathInput, Section, option
from modules.config.local_paths import LocalPath
from modules.config.lora_schema import LoRAConfig
from modules.config.model_base import Dtype
from modules.models.registry import DEFAULT_FAMILY, FAMILIES

CONFIG_VERSION = 3


def _family_tag(value: Any) -> Any:
    """Which family section validates `value`; configs without `family` are SDXL."""
    if isinstance(value, dict):
        return value.get("family", DEFAULT_FAMILY)
    return getattr(value, "family", DEFAULT_FAMILY)


# The `model` section is the family's own: its parts and options (modules/models/<family>/).
ModelConfig = Annotated[
    Union[tuple(Annotated[config, Tag(name)] for name, (config, _) in FAMILIES.items())],  # noqa: UP007
    Discriminator(_family_tag),
]


class OptimizerConfig(Section):
    name: Literal["adamw", "adamw_8bit", "sgd", "adafactor", "prodigy"] = option(
        "adamw",
        help="Optimizer. adamw is the safe default; prodigy finds its own step size (use "
        "learning_rate 1.0); adamw_8bit saves memory on CUDA GPUs.",
        tab="training",
        label="Optimizer",
    )
    learning_rate: float = option(
        1e-4,
        help="Base learning rate. AdamW LoRA: 1e-4 to 4e-4; SGD needs far larger; Prodigy: 1.0.",
        tab="training",
        label="Learning rate",
        gt=0,
    )
    betas: tuple[float, float] = option(
        (0.9, 0.999),
        help="Adam-style betas (momentum, second moment).",
        tab="training",
        label="Betas",
        applies_when={"name": ("adamw", "adamw_8bit", "prodigy")},
        advanced=True,
    )
    weight_decay: float = option(
        0.01, help="Decoupled weight decay.", tab="training", label="Weight decay", ge=0
    )
    eps: float = option(
        1e-8,
        help="Adam epsilon.",
        tab="training",
        label="Epsilon",
        gt=0,
        advanced=True,
        applies_when={"name": ("adamw", "adamw_8bit", "prodigy")},
    )
    momentum: float = option(
        0.9,
        help="SGD momentum.",
        tab="training",
        label="Momentum (SGD)",
        ge=0,
        lt=1,
        applies_when={"name": "sgd"},
    )
    nesterov: bool = option(
        False,
        help="Nesterov momentum for SGD.",
        tab="training",
        label="Nesterov (SGD)",
        applies_when={"name": "sgd"},
    )
    extra_kwargs: dict[str, Any] = option(
        {},
        help="Extra keyword arguments passed to the optimizer class, e.g. "
        '{"d_coef": 0.5} for Prodigy.',
        tab="training",
        label="Extra arguments",
        advanced=True,
    )

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        for beta in betas:
            if not 0 <= beta < 1:
                raise ValueError(f"each beta must be in [0, 1), got {beta}")
        return betas


class SchedulerConfig(Section):
    name: Literal["constant", "linear", "cosine", "cosine_with_restarts"] = option(
        "constant",
        help="Learning-rate schedule after warmup.",
        tab="training",
        label="LR scheduler",
    )
    warmup_steps: int = option(
        0,
        help="Optimizer steps of linear warmup from 0 to the learning rate.",
        tab="training",
        label="Warmup steps",
        ge=0,
    )
    cycles: int = option(
        1,
        help="Number of restarts for cosine_with_restarts.",
        tab="training",
        label="Cycles",
        applies_when={"name": "cosine_with_restarts"},
        ge=1,
    )


class TrainingConfig(Section):
    epochs: int = option(10, help="Passes over the dataset.", tab="training", label="Epochs", ge=1)
    max_steps: int = option(
        0,
        help="Stop after this many optimizer steps; 0 trains for the given epochs.",
        tab="training",
        label="Max steps",
        ge=0,
    )
    batch_size: int = option(
        1, help="Images per micro-batch.", tab="training", label="Batch size", ge=1
    )
    gradient_accumulation_steps: int = option(
        1,
        help="Micro-batches per optimizer step; the effective batch is batch_size times this.",
        tab="training",
        label="Gradient accumulation",
        ge=1,
    )
    max_grad_norm: float = option(
        1.0,
        help="Clip the gradient norm to this value; 0 disables clipping.",
        tab="training",
        label="Max grad norm",
        ge=0,
    )
    seed: int = option(
        42,
        help="Seed for initialisation, noise and data order.",
        tab="training",
        label="Seed",
        ge=0,
        le=SEED_MAX,
    )
    gradient_checkpointing: bool = option(
        False,
        help="Recompute activations in the backward pass: much less memory, about 20-30% slower.",
        tab="training",
        label="Gradient checkpointing",
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = option(
        "no",
        help="Autocast precision of the forward pass. bf16 on recent GPUs; fp16 uses loss scaling.",
        tab="training",
        label="Mixed precision",
    )
    on_nonfinite: Literal["stop", "skip"] = option(
        "stop",
        help="When a loss or gradient is NaN/inf: stop the run (naming the last good backup) or "
        "skip the step and count it in the log.",
        tab="training",
        label="On NaN/inf",
        advanced=True,
    )


class SamplingConfig(Section):
    prompts: list[str] = option(
        [], help="Prompts sampled during training.", tab="sampling", label="Prompts"
    )
    negative_prompt: str = option(
        "", help="Negative prompt for all samples.", tab="sampling", label="Negative prompt"
    )
    every_n_steps: int = option(
        0,
        help="Sample every N optimizer steps; 0 samples only at the end.",
        tab="sampling",
        label="Sample every N steps",
        ge=0,
    )
    steps: int = option(
        25, help="Denoising steps per sample.", tab="sampling", label="Sampler steps", ge=1, le=1000
    )
    cfg_scale: float = option(
        7.0,
        help="Classifier-free guidance scale (SDXL). For Flux.1 [dev] it is the embedded "
        "guidance instead (3.5 is usual); [schnell] ignores it.",
        tab="sampling",
        label="CFG scale",
        ge=0,
    )
    seed: int = option(
        1,
        help="Seed of the sample noise (fixed so samples compare).",
        tab="sampling",
        label="Sample seed",
        ge=0,
        le=SEED_MAX,
    )
    at_end: bool = option(
        True, help="Also sample when training ends.", tab="sampling", label="Sample at end"
    )
    before_after: bool = option(
        False,
        help="When training ends, render every prompt with the LoRA off and on (same seeds) "
        "into <workspace>/samples/before_after.png: what the LoRA changed, side by side.",
        tab="sampling",
        label="Before/after grid",
    )


class BackupConfig(Section):
    every_n_steps: int = option(
        0,
        help="Write a resumable backup every N optimizer steps; 0 disables.",
        tab="backup",
        label="Backup every N steps",
        ge=0,
    )
    keep_last: int = option(
        2, help="How many backups to keep.", tab="backup", label="Keep last K backups", ge=1
    )
    on_interrupt: bool = option(
        True,
        help="Write a backup when the run is stopped early (Ctrl-C, or Stop in the GUI).",
        tab="backup",
        label="Backup on stop",
    )


class OutputConfig(Section):
    workspace_dir: LocalPath = option(
        "workspace/run",
        help="Folder for backups, samples, logs and the saved config.",
        tab="general",
        label="Workspace",
        widget=PathInput("folder"),
    )
    output_path: LocalPath = option(
        "",
        help="Where the final LoRA goes; empty means <workspace>/<name>.safetensors.",
        tab="general",
        label="Output path",
        widget=PathInput("file", suffixes=(".safetensors",)),
    )
    name: str = option(
        "lora",
        help="Name of the LoRA (file name and ss_output_name).",
        tab="general",
        label="Name",
        min_length=1,
    )
    format: Literal["kohya", "diffusers", "comfyui"] = option(
        "kohya",
        help="kohya (default): lora_down / lora_up / alpha keys with the original model's layer "
        "names (SDXL: the original UNet's blocks; Flux: BFL's, q/k/v fused), the layout A1111, "
        "Forge, ComfyUI, sd-scripts and diffusers load. diffusers: the diffusers/PEFT layout "
        "(lora_A / lora_B keys) for diffusers pipelines; for SDXL only diffusers loads it (A1111, "
        "Forge and ComfyUI miss its layers, sd-scripts ignores them). comfyui (Flux only): "
        "ComfyUI's own diffusion_model.* keys. The README's LoRA files section says which tool "
        "loads which layout.",
        tab="general",
        label="File layout",
    )
    save_dtype: Dtype = option(
        "float16",
        help="Precision of the saved LoRA weights; float16 halves the file, float32 keeps "
        "every bit (alpha is always stored in float32).",
        tab="general",
        label="Save precision",
        advanced=True,
    )
    save_every_n_steps: int = option(
        0,
        help="Also save an intermediate LoRA every N steps; 0 disables.",
        tab="backup",
        label="Save every N steps",
        ge=0,
    )
    trigger_phrase: str = option(
        "",
        help="Trigger phrase written into the file's metadata.",
        tab="general",
        label="Trigger phrase",
    )
    loss_curve: bool = option(
        True,
        help="When training ends, plot the training loss (raw and smoothed) and the validation "
        "loss by step from the run's logs into <workspace>/loss.png.",
        tab="backup",
        label="Loss curve PNG",
    )

    @field_validator("name")
    @classmethod
    def _plain_file_name(cls, name: str) -> str:
        """The name becomes a file name in the workspace: a folder part would write elsewhere,
        and a blank or control character only fails when the LoRA is saved, after training."""
        if not name.strip():
            raise ValueError('must not be blank; e.g. "my_lora"')
        if name in (".", "..") or "/" in name or "\\" in name:
            raise ValueError(
                "must be a plain file name, without folders; put the folder in "
                "output.workspace_dir or output.output_path"
            )
        if any(ord(char) < 32 or ord(char) == 127 for char in name):
            raise ValueError("contains a control character; use a plain file name")
        return name


class TrainConfig(Section):
    """The whole training config; every saved file carries its config_version."""

    config_version: int = CONFIG_VERSION
    model: ModelConfig = Field(default_factory=FAMILIES[DEFAULT_FAMILY][0])
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    backup: BackupConfig = Field(default_factory=BackupConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _format_fits_family(self) -> TrainConfig:
        if self.output.format not in self.model.lora_formats:
            raise ValueError(
                f"output.format {self.output.format!r} is not a layout {self.model.family} "
                f"LoRAs are saved in; choose one of {list(self.model.lora_formats)}"
            )
        return self
