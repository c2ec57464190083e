"""The memory estimate printed before training: what one training step holds on the device.

- Weights per part at their dtype or quantized size, counting only what stays on the device
  (encoders whose outputs are cached move to CPU memory, offloaded blocks visit one at a time).
- The caching phase before it: the encoders that fill the latent / text caches, alone on the
  device (the trainer moves the denoiser there afterwards); it can be the peak.
- LoRA weights, their gradients, optimizer and preconditioner state, from the LoRA layer shapes.
- Activations traced on the meta device at the run's resolution and batch
  (modules/training/activation_trace.py).

Families supply what is model-specific (`ModelFamily.memory_profile`): meta copies of their
modules, dummy inputs, where LoRA goes; the arithmetic here is generic. The GUI shows the same
`lines()`. How the estimate compares with measured peaks: docs/benchmarks.md.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from modules.config.schema import TrainConfig
from modules.data.captions import varies_per_use
from modules.lora.network import LoRANetwork
from modules.models.base import MemoryProfile, ModelFamily, WeightGroup
from modules.models.quantize import (
    LABELS,
    quantizable_linears,
    quantized_weight_bytes,
    tensor_bytes,
)
from modules.training.activation_trace import ActivationTrace, cast_floating, trace_activations
from modules.util.dtypes import DTYPES
from modules.util.sizes import format_bytes

log = logging.getLogger(__name__)

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class WeightLine:
    """One module's frozen weights."""

    label: str
    device_bytes: int  # on the training device during a step
    total_bytes: int  # all of them, wherever they live
    note: str
    leaves: bool = False  # on the device only until the caches are filled
    fills_caches: bool = False  # runs while the caches fill, before the denoiser comes


@dataclass(frozen=True)
class MemoryEstimate:
    weights: tuple[WeightLine, ...]
    lora_parameters: int
    lora: int  # LoRA weights
    gradients: int
    optimizer: int
    preconditioner: int
    activations: ActivationTrace
    setting: str  # "1024x1024, batch 1, gradient checkpointing"
    optimizer_name: str
    device: str  # "cuda", "cpu"
    available: int | None  # device memory this run can use (CUDA), None elsewhere
    advice: str  # what lowers the estimate, for the warning
    caching_advice: str = ""  # what lowers the caching phase, for the warning

    @property
    def total(self) -> int:
        weights = sum(line.device_bytes for line in self.weights)
        training = self.lora + self.gradients + self.optimizer + self.preconditioner
        return weights + training + self.activations.total

    @property
    def caching(self) -> int:
        """Device memory while the caches fill: the encoders that fill them, alone (the model
        and the LoRA weights come to the device once they are done)."""
        return sum(line.total_bytes for line in self.weights if line.fills_caches)

    @property
    def peak(self) -> int:
        return max(self.total, self.caching)

    def lines(self) -> list[str]:
        where = "the GPU" if self.device == "cuda" else f"the {self.device.upper()}"
        lines = [f"memory estimate for a training step on {where}:"]
        width = max(len(line.label) for line in self.weights)
        for line in self.weights:
            size = format_bytes(line.device_bytes)
            lines.append(f"  {line.label:<{width}}  {size}  {line.note}")
        lines.append(
            f"  LoRA ({self.lora_parameters / 1e6:.1f} M parameters): weights "
            f"{format_bytes(self.lora)}, gradients {format_bytes(self.gradients)}, "
            f"{self.optimizer_name} state {format_bytes(self.optimizer)}"
            + (
                f", preconditioner {format_bytes(self.preconditioner)}"
                if self.preconditioner
                else ""
            )
        )
        trace = self.activations
        recompute = (
            f" + {format_bytes(trace.recompute)} recomputed block" if trace.recompute else ""
        )
        lines.append(
            f"  activations at {self.setting}: {format_bytes(trace.kept)} kept{recompute} + "
            f"{format_bytes(trace.workspace)} gradients in flight"
        )
        if any(line.fills_caches for line in self.weights):
            lines.append(
                "  while the caches fill (their encoders alone, before the model): "
                + format_bytes(self.caching)
            )
        total = f"  training step: about {format_bytes(self.total)}"
        if self.available is not None:
            total += f" of the {format_bytes(self.available)} this GPU has free for the run"
        lines.append(total)
        warning = self.warning()
        if warning:
            lines.append(warning)
        return lines

    def warning(self) -> str | None:
        if self.available is None or self.peak <= self.available:
            return None
        if self.total >= self.caching:
            when, advice = "a training step", self.advice
        else:
            when, advice = "filling the caches (their encoders alone)", self.caching_advice
        return (
            f"warning: {when} needs about {format_bytes(self.peak)}, more than the "
            f"{format_bytes(self.available)} free on this GPU; the run will likely stop with "
            f"out-of-memory. {advice}"
        )


# -- weights ------------------------------------------------------------------------------------


def parameter_bytes(group: WeightGroup) -> dict[str, int]:
    """Bytes of each parameter and buffer of the group's module as the run stores it."""
    quantized = set()
    if group.quantize != "none":
        chosen, _ = quantizable_linears(group.module, group.keep_precise)
        quantized = {f"{path}.weight" for path, _ in chosen}
    sizes = {}
    for name, tensor in (*group.module.named_parameters(), *group.module.named_buffers()):
        if name in quantized:
            sizes[name] = quantized_weight_bytes(tensor.shape, group.quantize)
        else:
            sizes[name] = tensor_bytes(tensor)
    return sizes


def weight_line(
    group: WeightGroup, *, leaves_device: bool, reason: str, fills_caches: bool = False
) -> WeightLine:
    sizes = parameter_bytes(group)
    total = sum(sizes.values())
    note = DTYPE_NAMES.get(group.dtype, str(group.dtype))
    if group.quantize != "none":
        note = f"{LABELS[group.quantize]}, the rest {note}"
    if leaves_device:
        note = f"{note}; in CPU memory once the caches are filled ({reason})"
        return WeightLine(group.label, 0, total, note, leaves=True, fills_caches=fills_caches)
    on_device = total
    if group.offloaded_blocks:
        paths = {id(module): path for path, module in group.module.named_modules()}
        blocks = []
        for block in group.offloaded_blocks:
            prefix = paths[id(block)] + "."
            blocks.append(sum(size for name, size in sizes.items() if name.startswith(prefix)))
        staging = sum(sorted(blocks, reverse=True)[:2])  # the running block and the next
        on_device = total - sum(blocks) + staging
        away = format_bytes(sum(blocks))
        note += f"; {len(blocks)} blocks in CPU memory ({away}), streamed one at a time"
    return WeightLine(group.label, on_device, total, note, fills_caches=fills_caches)


def weight_lines(
    profile: MemoryProfile, config: TrainConfig, *, device: str
) -> tuple[WeightLine, ...]:
    """Every group's weights at its dtype (the meta copies are cast to it first)."""
    leaving = leaving_roles(config, device=device)
    caching = caching_roles(config)
    for group in profile.groups:
        group.module.to(dtype=group.dtype)
    return tuple(
        weight_line(
            group,
            leaves_device=group.role in leaving,
            reason=leaving.get(group.role, ""),
            fills_caches=group.role in caching,
        )
        for group in profile.groups
    )


def caching_roles(config: TrainConfig) -> set[str]:
    """Roles whose modules the data pipeline's `prepare` brings to the device to fill the
    caches, before the denoiser comes."""
    data = config.data
    roles = set()
    if data.cache_latents:
        roles.add("latent_encoder")
    if data.cache_text_embeddings and not config.model.trains_text_encoder():
        roles.add("text_encoder")
    return roles


def leaving_roles(config: TrainConfig, *, device: str) -> dict[str, str]:
    """Roles whose modules move to CPU memory once the caches are filled (as the data pipeline's
    `build_caches` decides), with the reason."""
    data = config.data
    if device != "cuda" or not data.offload_encoders:
        return {}
    roles = {}
    if data.cache_latents and data.crop != "random":
        roles["latent_encoder"] = "cached latents"
    varying = any(varies_per_use(concept) for concept in data.concepts)
    if data.cache_text_embeddings and not config.model.trains_text_encoder() and not varying:
        roles["text_encoder"] = "cached text embeddings"
    return roles


# -- LoRA, optimizer, preconditioner ------------------------------------------------------------


def optimizer_state_bytes(config: TrainConfig, shapes: list[torch.Size], dtype: torch.dtype) -> int:
    """What the configured optimizer keeps per LoRA parameter tensor of `shapes`."""
    size = torch.empty((), dtype=dtype).element_size()
    numel = sum(math.prod(shape) for shape in shapes)
    name = config.optimizer.name
    if name == "adamw":
        return 2 * numel * size  # exp_avg, exp_avg_sq
    if name == "adamw_8bit":
        return 2 * numel  # both moments in 8 bits (their block scales are negligible)
    if name == "prodigy":
        return 4 * numel * size  # exp_avg, exp_avg_sq, s, p0
    if name == "sgd":
        return numel * size if config.optimizer.momentum > 0 else 0
    if name == "adafactor":  # factored second moments: a row and a column vector per matrix
        return sum((shape[0] + math.prod(shape[1:])) * 4 for shape in shapes)
    raise ValueError(f"no memory model for optimizer {name!r}")


def preconditioner_bytes(config: TrainConfig, pairs: list[tuple[torch.Size, torch.Size]]) -> int:
    """The preconditioner's state and workspace for LoRA (A, B) pairs of these shapes: r x r
    Grams and a float32 copy of the gradients (held one shape group at a time, counted for all,
    so the bound holds whatever the grouping); AdaPreLoRA also keeps per-layer row / column
    moments and sketches of `adaprelora_probes` columns, and reads float32 copies of the
    factors."""
    method = config.lora.preconditioner
    if method == "none" or not pairs:
        return 0
    total = 0
    for shape_a, shape_b in pairs:
        r, n, m = shape_a[0], math.prod(shape_a[1:]), shape_b[0]
        total += 4 * r * r * 4 + (r * n + m * r) * 4
        if method == "adaprelora":
            p = config.lora.adaprelora_probes
            total += p * (m + n) * 4 + 2 * (m + n) * 4 + r * (n + m) * 4
    return total


# -- the estimate -------------------------------------------------------------------------------


def estimate_memory(
    profile: MemoryProfile,
    config: TrainConfig,
    *,
    device: str = "cuda",
    available: int | None = None,
) -> MemoryEstimate:
    """The estimate for `config` on `device` ("cuda": encoders with cached outputs move to CPU
    memory); `available`: the device memory the run can use, for the warning."""
    weights = weight_lines(profile, config, device=device)
    train_dtype = DTYPES[config.model.train_dtype]
    with torch.device("meta"):
        network = LoRANetwork.inject(
            profile.lora_targets,
            rank=config.lora.rank,
            alpha=config.lora.alpha,
            dropout=config.lora.dropout,
        )
    network.to(dtype=train_dtype)
    try:
        shapes = [p.shape for p in network.parameters()]
        pairs = [
            (adapter.lora_down.weight.shape, adapter.lora_up.weight.shape)
            for adapter in network.adapters.values()
        ]
        lora = sum(tensor_bytes(p) for p in network.parameters())
        activations = _activations(profile, config, network)
    finally:
        network.detach()
    resolution = max([config.data.resolution, *config.data.extra_resolutions])
    checkpointing = config.training.gradient_checkpointing
    setting = f"{resolution}x{resolution}, batch {config.training.batch_size}" + (
        ", gradient checkpointing" if checkpointing else ", no gradient checkpointing"
    )
    return MemoryEstimate(
        weights=weights,
        lora_parameters=sum(math.prod(shape) for shape in shapes),
        lora=lora,
        gradients=lora,
        optimizer=optimizer_state_bytes(config, shapes, train_dtype),
        preconditioner=preconditioner_bytes(config, pairs),
        activations=activations,
        setting=setting,
        optimizer_name=config.optimizer.name,
        device=device,
        available=available,
        advice=_advice(config, profile),
        caching_advice=_caching_advice(config),
    )


def _activations(
    profile: MemoryProfile, config: TrainConfig, network: LoRANetwork
) -> ActivationTrace:
    """Traces of the modules on the gradient path: the denoiser, and trained text encoders."""
    parts = config.model.parts()
    trains_text = config.model.trains_text_encoder()
    skip = {id(p) for p in network.parameters()}
    for group in profile.groups:
        skip.update(id(p) for p in group.module.parameters())
        skip.update(id(b) for b in group.module.buffers())
    resolution = max([config.data.resolution, *config.data.extra_resolutions])
    batch = config.training.batch_size
    autocast = AUTOCAST.get(config.training.mixed_precision)
    traces = []
    for group in profile.groups:
        trained = group.name in parts and parts[group.name].train
        if group.inputs is None or not (trained or group.role == "denoiser"):
            continue
        # floating inputs in the module's dtype, as the families' training losses feed them
        traces.append(
            trace_activations(
                group.module,
                cast_floating(group.inputs(batch, resolution, resolution), group.dtype),
                checkpointing=config.training.gradient_checkpointing,
                autocast=autocast,
                skip=skip,
                inputs_require_grad=group.role == "denoiser" and trains_text,
            )
        )
    return ActivationTrace(
        kept=sum(trace.kept for trace in traces),
        recompute=max((trace.recompute for trace in traces), default=0),
        largest=max((trace.largest for trace in traces), default=0),
    )


def _advice(config: TrainConfig, profile: MemoryProfile) -> str:
    steps = []
    if not config.training.gradient_checkpointing:
        steps.append("turn on training.gradient_checkpointing")
    if config.training.batch_size > 1:
        steps.append("lower training.batch_size (raise gradient_accumulation_steps instead)")
    steps.append("lower data.resolution")
    if profile.savings_hint:
        steps.append(profile.savings_hint)
    return "To fit: " + "; ".join(steps) + "."


def _caching_advice(config: TrainConfig) -> str:
    parts = config.model.parts()
    wide = [
        f"model.{spec.name}.weight_dtype"
        for spec in config.model.part_specs()
        if spec.text_encoder and parts[spec.name].weight_dtype == "float32"
    ]
    if wide and "text_encoder" in caching_roles(config):
        return f"To fit: set {', '.join(wide)} to bfloat16."
    return (
        "The VAE and text encoders need this much on their own: free memory on this GPU or use "
        "one with more."
    )


def device_memory_available(device: torch.device) -> int | None:
    """Memory a run on `device` can use from here on: free memory plus what this process's
    allocator already holds (the loaded weights are part of the estimate). None off CUDA."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device)


def memory_estimate(
    *, family: ModelFamily, base: nn.Module, config: TrainConfig, device: torch.device
) -> MemoryEstimate | None:
    """The estimate for this run, to print before its first step. A model the meta-device trace
    cannot run costs the run its estimate, not its training: the reason is logged instead."""
    try:
        profile = family.memory_profile(base, config)
        estimate = estimate_memory(
            profile, config, device=device.type, available=device_memory_available(device)
        )
    except (NotImplementedError, RuntimeError, TypeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        log.warning("no memory estimate for this model: %s", reason)
        return None
    return estimate
