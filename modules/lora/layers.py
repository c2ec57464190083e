"""LoRA adapters for nn.Linear and nn.Conv2d that leave the base module untouched.

Each adapter adds `scale * lora_up(dropout(lora_down(x)))` to its base layer's output through a
forward hook, so the base model keeps its own module tree (diffusers pipelines, `save_pretrained` and
gradient checkpointing see the model they expect). The adapter links its two factors: `factors` is
the (A, B) pair that the gradient preconditioner and LoRA+ treat as one layer, found without
parsing parameter names and without attributes on the Parameters.
"""

from __future__ import annotations

import abc
import math

import torch
from torch import nn


class LoRAModule(nn.Module, abc.ABC):
    """Low-rank residual `s * B A` on a frozen base layer; subclasses build the two factors."""

    def __init__(
        self,
        *,
        base: nn.Module,
        name: str,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        # Not a submodule: the base belongs to the model, the adapter only observes it.
        object.__setattr__(self, "_base", base)
        self.name = name
        self.rank = rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_down, self.lora_up = self._make_factors(base, rank)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        # read on every forward: a Python float, so a CUDA buffer is never synced to the host
        self._scale = float(alpha) / rank
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self.register_load_state_dict_post_hook(LoRAModule._scale_after_load)

    @property
    def base(self) -> nn.Module:
        return self._base

    @property
    def scale(self) -> float:
        return self._scale

    @property
    def factors(self) -> tuple[nn.Parameter, nn.Parameter]:
        """(A, B) = (lora_down.weight, lora_up.weight), read when needed: loading with
        `assign=True` or converting with swap_tensors may replace the Parameter objects."""
        return self.lora_down.weight, self.lora_up.weight

    @abc.abstractmethod
    def _make_factors(self, base: nn.Module, rank: int) -> tuple[nn.Module, nn.Module]:
        """Return (lora_down, lora_up) sized for `base`."""

    @staticmethod
    def _scale_after_load(module: LoRAModule, incompatible_keys: object) -> None:
        module._scale = float(module.alpha) / module.rank  # a loaded file brings its own alpha

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution for input `x`, in the dtype of `x`."""
        weight_dtype = self.lora_down.weight.dtype
        hidden = self.lora_down(x if torch.is_autocast_enabled() else x.to(weight_dtype))
        out = self.lora_up(self.dropout(hidden))
        return (out * self.scale).to(x.dtype)

    def attach(self) -> None:
        if self._hook is None:
            self._hook = self.base.register_forward_hook(self._add_delta)

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _add_delta(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        # in the base layer's output dtype, as PEFT returns it: under autocast a norm hands its
        # layer a float32 input, and a float32 sum would make every later activation (and what
        # autograd keeps of it) float32, twice the memory of bfloat16
        return (output + self.delta(args[0])).to(output.dtype)

    def merged_delta_weight(self) -> torch.Tensor:
        """`s * B A` shaped like the base weight (used to check files against other tools)."""
        down = self.lora_down.weight.flatten(1)
        up = self.lora_up.weight.flatten(1)
        return (self.scale * up @ down).reshape(up.shape[0], *self.lora_down.weight.shape[1:])


class LoRALinear(LoRAModule):
    def _make_factors(self, base: nn.Module, rank: int) -> tuple[nn.Module, nn.Module]:
        return (
            nn.Linear(base.in_features, rank, bias=False),
            nn.Linear(rank, base.out_features, bias=False),
        )


class LoRAConv2d(LoRAModule):
    """A is a conv with the base's kernel, stride and padding into `rank` channels; B is 1x1."""

    def _make_factors(self, base: nn.Module, rank: int) -> tuple[nn.Module, nn.Module]:
        down = nn.Conv2d(
            base.in_channels,
            rank,
            kernel_size=base.kernel_size,
            stride=base.stride,
            padding=base.padding,
            dilation=base.dilation,
            bias=False,
        )
        return down, nn.Conv2d(rank, base.out_channels, kernel_size=1, bias=False)


class UnsupportedLayerError(ValueError):
    """A layer that a plain LoRA cannot adapt (e.g. a grouped convolution)."""


def lora_for(base: nn.Module, *, name: str, rank: int, alpha: float, dropout: float) -> LoRAModule:
    """Build the adapter class that fits `base`."""
    if isinstance(base, nn.Linear):
        cls: type[LoRAModule] = LoRALinear
    elif isinstance(base, nn.Conv2d):
        if base.groups != 1:
            raise UnsupportedLayerError(f"{name}: grouped Conv2d (groups={base.groups})")
        cls = LoRAConv2d
    else:
        raise UnsupportedLayerError(f"{name}: {type(base).__name__} is not Linear or Conv2d")
    return cls(base=base, name=name, rank=rank, alpha=alpha, dropout=dropout)
