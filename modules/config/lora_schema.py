"""The lora section of the training config: the adapters and how their gradients are treated."""

from __future__ import annotations

from typing import Literal

from modules.config.fields import PathInput, Section, Toggle, option
from modules.config.local_paths import LocalPath

# lora.precondition_damping when it is left empty, by optimizer (docs/benchmarks.md, "Preconditioner
# damping by optimizer": with Adam-type optimizers less damping failed where the LoRA's rank
# exceeds the update's; SGD converged faster and over a wider band at 0.01)
DEFAULT_DAMPING = {"sgd": 0.01}
ADAM_TYPE_DAMPING = 0.1


class LoRAConfig(Section):
    rank: int = option(
        16,
        help="LoRA rank (network dim): capacity and file size grow with it. 8-32 suits most "
        "character and style LoRAs.",
        tab="lora",
        label="Rank",
        ge=1,
        le=1024,
    )
    alpha: float = option(
        16.0,
        help="LoRA alpha; the update is scaled by alpha / rank. alpha = rank keeps scale 1, "
        "alpha = 1 needs a higher learning rate.",
        tab="lora",
        label="Alpha",
        gt=0,
    )
    dropout: float = option(
        0.0,
        help="Dropout on the LoRA bottleneck; 0.05-0.1 can reduce overfitting on tiny datasets.",
        tab="lora",
        label="Dropout",
        ge=0,
        lt=1,
    )
    layer_preset: Literal["attn", "attn-mlp", "full"] = option(
        "attn-mlp",
        help="Which layers of the denoiser (SDXL's UNet, Flux's transformer) get LoRA; the names "
        "mean the same in every family. attn = the attention projections (Flux: q/k/v and "
        "outputs of the double blocks, q/k/v of the single blocks); attn-mlp = attention and "
        "feed-forward layers (SDXL: every Linear of the transformer blocks, proj_in/proj_out "
        "included, the set sd-scripts trains by default; Flux: adds the MLPs and the single "
        "blocks' fused output projection, which is sd-scripts' default without the blocks' "
        "modulation); full = every layer a LoRA can adapt (SDXL adds the ResNet convolutions, "
        "time projections and resamplers; Flux adds the blocks' modulation, the embedders and "
        "the final layer). Text encoders take their attention and MLP layers.",
        tab="lora",
        label="Layer preset",
    )
    layer_patterns: list[str] = option(
        [],
        help="Custom denoiser layer selection replacing the preset: substrings of module paths, "
        "or regular expressions prefixed with 're:'. Each must match at least one layer.",
        tab="lora",
        label="Layer patterns",
        advanced=True,
    )
    init_from: LocalPath = option(
        "",
        help="A LoRA .safetensors to continue training from: one of ours, or an SDXL LoRA from "
        "sd-scripts, ai-toolkit, OneTrainer or diffusers' training scripts. Training continues "
        "on exactly the file's layers at the file's ranks; layer_preset, layer_patterns and rank "
        "apply only to trained parts the file has no layers for, and a part the file has layers "
        "of must be trained (model.<part>.train).",
        tab="lora",
        label="Continue from LoRA",
        widget=PathInput("file", must_exist=True, suffixes=(".safetensors",)),
    )
    preconditioner: Literal["none", "riemannian", "adaprelora"] = option(
        "none",
        help="Riemannian Preconditioning: before each optimizer step, precondition every LoRA "
        "pair's gradients with two r x r matrices so that any optimizer follows the geometry "
        "of W = B A. riemannian = scaled gradient descent on the factors (Zhang & Pilanci "
        "2024): the step in W no longer depends on how W is split between A and B, or on "
        "alpha; adaprelora = its Adafactor-weighted variant (Liu, Bian & Cai 2026), which "
        "also weights rows and columns of the weight gradient by their running energy; none = "
        "the plain optimizer. Measured (docs/benchmarks.md, Convergence): on ill-conditioned "
        "low-rank targets it reaches errors plain AdamW, SGD and Prodigy do not, over a wider "
        "band of learning rates, and it lets SGD train from the B = 0 start; on the tiny "
        "world's concept fine-tune it ended level with or slightly above plain AdamW, so it "
        "pays most with SGD-type optimizers and ill-conditioned updates; "
        "adaprelora was slower than riemannian on the ill-conditioned problems. The README says "
        "what it costs.",
        tab="lora",
        label="Riemannian Preconditioning",
        widget=Toggle(off="none", on="riemannian"),
    )
    precondition_damping: float | None = option(
        None,
        help="Damping relative to each r x r Gram's mean eigenvalue. Larger is closer to the "
        "plain optimizer and steadier; smaller follows the geometry more strictly. Empty: "
        "0.01 with SGD, 0.1 with every other (Adam-type) optimizer, the best of each in "
        "docs/benchmarks.md (Preconditioner damping by optimizer).",
        tab="lora",
        label="Damping (relative)",
        applies_when={"preconditioner": ("riemannian", "adaprelora")},
        ge=0,
        le=100,
    )
    precondition_damping_floor: float = option(
        1e-8,
        help="Absolute damping added on top, so a factor whose partner is still zero (B at the "
        "start) stays finite. Rarely worth changing.",
        tab="lora",
        label="Damping floor",
        applies_when={"preconditioner": ("riemannian", "adaprelora")},
        advanced=True,
        gt=0,
    )
    adaprelora_beta2: float = option(
        0.999,
        help="AdaPreLoRA: decay of the running row/column gradient energies (Adafactor's beta2).",
        tab="lora",
        label="AdaPreLoRA beta2",
        applies_when={"preconditioner": "adaprelora"},
        advanced=True,
        gt=0,
        lt=1,
    )
    adaprelora_probes: int = option(
        8,
        help="AdaPreLoRA: random probes per layer and step that estimate the gradient energies. "
        "More is less noisy and costs more backward time.",
        tab="lora",
        label="AdaPreLoRA probes",
        applies_when={"preconditioner": "adaprelora"},
        advanced=True,
        ge=1,
        le=256,
    )
    adaprelora_statistics_every: int = option(
        1,
        help="AdaPreLoRA: sketch the gradient energies only every n-th optimizer step (the "
        "Adafactor moments average over about 1000 steps, so they change slowly). The sketches' "
        "backward cost drops n-fold; see docs/benchmarks.md for the measured effect on training.",
        tab="lora",
        label="AdaPreLoRA statistics every n steps",
        applies_when={"preconditioner": "adaprelora"},
        advanced=True,
        ge=1,
        le=100,
    )
    loraplus_ratio: float = option(
        1.0,
        help="LoRA+: learning rate of the up (B) factor = ratio x that of the down (A) factor; "
        "kohya users know it around 16. 1 turns it off. Combines with the preconditioner.",
        tab="lora",
        label="LoRA+ ratio",
        ge=1,
        le=1000,
    )

    def damping_for(self, optimizer: str) -> float:
        """The relative damping a run uses: the set one, or the measured best for `optimizer`."""
        if self.precondition_damping is not None:
            return self.precondition_damping
        return DEFAULT_DAMPING.get(optimizer, ADAM_TYPE_DAMPING)
