"""Quantize the frozen Linear layers of a base model in place: int8 / fp8 weight-only (torchao)
or nf4 (bitsandbytes), and the helpers that see through quantized tensors.

LoRA adapters add their delta through a forward hook and never read the base weight, so they
train unchanged on top; the input gradient (which LoRA on earlier layers and gradient
checkpointing need) flows through the quantized forward. Weight-only formats keep activations
in the compute dtype: torchao dequantizes inside the matmul, bitsandbytes' 4-bit Linear
dequantizes blocks of 64 weights.

Quantize before LoRA adapters are attached: nf4 replaces the Linear modules (and with them any
hooks on them); int8 and fp8 swap the weight tensor only.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from modules.util.sizes import format_bytes

KINDS: tuple[str, ...] = ("int8", "fp8", "nf4")
LABELS = {"int8": "int8 (torchao)", "fp8": "fp8 e4m3 (torchao)", "nf4": "nf4 (bitsandbytes)"}
NF4_BLOCK = 64  # weights per absmax (bitsandbytes' default)
NF4_NESTED_BLOCK = 256  # absmaxes per float32 scale of the double quantization


def _params4bit_class() -> type | None:
    """bitsandbytes' 4-bit Parameter class, if bitsandbytes is loaded (no tensor is one if not)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb.nn.Params4bit if bnb is not None else None


def is_quantized(tensor: torch.Tensor) -> bool:
    """A torchao or bitsandbytes quantized weight (not a plain tensor)."""
    params4bit = _params4bit_class()
    if params4bit is not None and isinstance(tensor, params4bit):
        return True
    return hasattr(tensor, "__tensor_flatten__")


def storage_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors a (possibly quantized) tensor keeps its data in."""
    found: list[torch.Tensor] = []
    map_storage(tensor, lambda plain: found.append(plain) or plain)
    return found


def map_storage(tensor: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The same (possibly quantized) tensor rebuilt with `fn` applied to each plain tensor it
    holds: `fn` = a copy to another device, `pin_memory`, ...

    torchao's tensors follow torch's subclass protocol (`__tensor_flatten__` /
    `__tensor_unflatten__`); bitsandbytes' 4-bit weights keep their packed data in the Parameter
    and their block scales in a QuantState, which is copied, never changed in place.
    """
    params4bit = _params4bit_class()
    if params4bit is not None and isinstance(tensor, params4bit):
        return params4bit(
            data=fn(tensor.data),
            requires_grad=False,
            quant_state=_map_quant_state(tensor.quant_state, fn),
            blocksize=tensor.blocksize,
            compress_statistics=tensor.compress_statistics,
            quant_type=tensor.quant_type,
            quant_storage=tensor.quant_storage,
            module=tensor.module,
            bnb_quantized=tensor.bnb_quantized,
        )
    if hasattr(tensor, "__tensor_flatten__"):
        names, context = tensor.__tensor_flatten__()
        inner = {name: map_storage(getattr(tensor, name), fn) for name in names}
        return type(tensor).__tensor_unflatten__(inner, context, tensor.size(), tensor.stride())
    return fn(tensor.data if isinstance(tensor, nn.Parameter) else tensor)


def _map_quant_state(state, fn):
    """A copy of a bitsandbytes QuantState whose tensors went through `fn`."""
    if state is None:
        return None
    copied = type(state).__new__(type(state))
    copied.__dict__.update(state.__dict__)
    for name, value in state.__dict__.items():
        if isinstance(value, torch.Tensor):
            setattr(copied, name, fn(value))
        elif isinstance(value, type(state)):  # the nested state of the double quantization
            setattr(copied, name, _map_quant_state(value, fn))
    return copied


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a (possibly quantized) tensor occupies."""
    return sum(t.numel() * t.element_size() for t in storage_tensors(tensor))


def quantized_weight_bytes(shape: Sequence[int], kind: str) -> int:
    """Bytes of one Linear weight of `shape` (out, in) quantized as `kind`: the codes and the
    scales each format keeps (torchao: one float32 scale per output row, int8 also an int8 zero
    point; nf4: one uint8 absmax per 64 weights, double-quantized with a float32 scale per 256
    of them, and its two code books)."""
    rows, numel = shape[0], math.prod(shape)
    if kind == "int8":
        return numel + rows * (4 + 1)
    if kind == "fp8":
        return numel + rows * 4
    if kind == "nf4":
        blocks = math.ceil(numel / NF4_BLOCK)
        nested = math.ceil(blocks / NF4_NESTED_BLOCK)
        code_books = (16 + 256) * 4 + 4  # nf4 code, the nested 8-bit code, their offset
        return math.ceil(numel / 2) + blocks + nested * 4 + code_books
    raise ValueError(f"unknown quantization {kind!r}; one of {KINDS}")


def kept_by(path: str, keep: Iterable[str]) -> bool:
    """Whether `path` is one of the module paths in `keep` or inside one of them."""
    return any(path == prefix or path.startswith(prefix + ".") for prefix in keep)


@dataclass(frozen=True)
class QuantizationReport:
    """What `quantize_frozen_linears` did to one module."""

    kind: str
    layers: int  # Linear layers quantized
    kept: tuple[str, ...]  # paths of the frozen Linear layers left in their dtype
    keep: tuple[str, ...]  # the module paths asked to stay precise
    bytes_before: int  # of the quantized layers' weights
    bytes_after: int

    def line(self, label: str) -> str:
        kept = ""
        if self.kept:
            held = [prefix for prefix in self.keep if any(kept_by(p, [prefix]) for p in self.kept)]
            kept = f"; {len(self.kept)} kept as they were ({', '.join(held)})"
        return (
            f"{label}: {self.layers} Linear layers quantized to {LABELS[self.kind]}, their "
            f"weights {format_bytes(self.bytes_before)} -> {format_bytes(self.bytes_after)}{kept}"
        )


def quantizable_linears(
    module: nn.Module, keep: Iterable[str] = ()
) -> tuple[list[tuple[str, nn.Linear]], list[str]]:
    """(path, layer) of the frozen, not yet quantized Linear layers outside `keep`, and the
    paths of those `keep` holds back."""
    keep = tuple(keep)
    chosen, kept = [], []
    for path, layer in module.named_modules():
        if not isinstance(layer, nn.Linear) or layer.weight.requires_grad:
            continue
        if is_quantized(layer.weight):
            continue
        (kept if kept_by(path, keep) else chosen).append((path, layer))
    return chosen, [path for path, _ in kept]


def quantize_frozen_linears(
    module: nn.Module,
    kind: str,
    *,
    keep: Iterable[str] = (),
    work_device: torch.device | str | None = None,
) -> QuantizationReport:
    """Quantize the frozen Linear layers of `module` in place, except the module paths in `keep`
    (and what lies inside them): embedders and output layers that must stay precise.

    Each layer is quantized on `work_device` (a GPU quantizes in a fraction of the CPU's time)
    and goes back to the device it came from, so the whole model never needs to fit there.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown quantization {kind!r}; one of {KINDS}")
    keep = tuple(keep)
    chosen, kept = quantizable_linears(module, keep)
    before = sum(tensor_bytes(layer.weight) for _, layer in chosen)
    quantize_layer = _nf4_layer if kind == "nf4" else _torchao_layer(kind)
    modules = dict(module.named_modules())
    for path, layer in chosen:
        if not path:
            raise ValueError("quantize the module that holds the Linear layer, not the layer")
        home = layer.weight.device
        work = torch.device(work_device) if work_device is not None else home
        quantized = quantize_layer(layer.to(work)).to(home)
        if quantized is not layer:
            parent_path, _, name = path.rpartition(".")
            setattr(modules[parent_path], name, quantized)
    modules = dict(module.named_modules())  # nf4 replaced layers
    after = sum(tensor_bytes(modules[path].weight) for path, _ in chosen)
    return QuantizationReport(
        kind=kind,
        layers=len(chosen),
        kept=tuple(kept),
        keep=tuple(keep),
        bytes_before=before,
        bytes_after=after,
    )


def _torchao_layer(kind: str) -> Callable[[nn.Linear], nn.Linear]:
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    config = Int8WeightOnlyConfig() if kind == "int8" else Float8WeightOnlyConfig()

    def quantize(layer: nn.Linear) -> nn.Linear:
        quantize_(layer, config)  # swaps the weight for a torchao tensor, keeps the module
        return layer

    return quantize


def _nf4_layer(layer: nn.Linear) -> nn.Linear:
    """A bitsandbytes 4-bit Linear (a subclass of nn.Linear) computing in the layer's dtype."""
    import bitsandbytes as bnb

    dtype = layer.weight.dtype
    replacement = bnb.nn.Linear4bit(
        layer.in_features,
        layer.out_features,
        bias=layer.bias is not None,
        compute_dtype=dtype,
        compress_statistics=True,
        quant_type="nf4",
        device="meta",  # no throwaway float32 weight
    )
    replacement.weight = bnb.nn.Params4bit(
        layer.weight.data,
        requires_grad=False,
        quant_type="nf4",
        compress_statistics=True,
        module=replacement,
    )
    replacement.bias = layer.bias
    # bitsandbytes quantizes a Params4bit when it is moved to a device
    replacement.weight = replacement.weight.to(layer.weight.device)
    replacement.train(layer.training)
    return replacement
