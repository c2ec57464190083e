"""Activation memory by tracing: run a module on the meta device (no memory, no arithmetic)
and count every tensor autograd saves for the backward pass, once.

With gradient checkpointing only each checkpointed block's inputs stay, plus one block's
tensors while its backward recomputes them (diffusers models checkpoint through a function the
trace supplies, so it sees exactly which blocks they recompute); gradients in flight come in the
size of the largest saved tensor. Meta tensors have no autocast, and attention on them would
take the math path with its tokens x tokens matrix; the trace stands in for what a GPU does:
autocast's casts for the ops whose saved tensors dominate, and a flash / memory-efficient
attention kernel that keeps O(tokens) per head.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode


@dataclass(frozen=True)
class ActivationTrace:
    """What autograd keeps between the forward and the backward pass."""

    kept: int  # saved through the whole backward pass (checkpointing: each block's inputs)
    recompute: int  # checkpointing: the largest block's tensors, rebuilt for its backward
    largest: int  # the largest single saved tensor

    @property
    def workspace(self) -> int:
        """Gradients in flight during the backward pass: two of the largest activation."""
        return 2 * self.largest

    @property
    def total(self) -> int:
        return self.kept + self.recompute + self.workspace


class _Tracer:
    """Collects the tensors autograd saves, once each, separately per checkpointed block."""

    def __init__(self, skip: set[int]) -> None:
        self.skip = skip  # ids of weights: saved by reference, not activations
        self.kept: dict[int, torch.Tensor] = {}
        self.block_inputs: dict[int, torch.Tensor] = {}
        self.blocks: list[dict[int, torch.Tensor]] = []
        self._block: dict[int, torch.Tensor] | None = None

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        base = tensor if tensor._base is None else tensor._base
        if id(base) not in self.skip:
            (self._block if self._block is not None else self.kept)[id(base)] = base
        return tensor

    def checkpoint(self, block: nn.Module, *args):
        """Stands in for diffusers' gradient checkpointing function during the trace."""
        if self._block is not None:  # a checkpointed module inside another
            return block(*args)
        for value in _tensors(args):
            base = value if value._base is None else value._base
            if id(base) not in self.skip:
                self.block_inputs[id(base)] = base
        self._block = {}
        try:
            return block(*args)
        finally:
            self.blocks.append(self._block)
            self._block = None

    def result(self, *, checkpointing: bool) -> ActivationTrace:
        every = [self.kept, *self.blocks]
        largest = max((_nbytes(t) for saved in every for t in saved.values()), default=0)
        if not checkpointing:
            merged = {key: t for saved in every for key, t in saved.items()}
            return ActivationTrace(kept=_total(merged), recompute=0, largest=largest)
        kept = {**self.kept, **self.block_inputs}
        recompute = max(
            (_total({k: t for k, t in saved.items() if k not in kept}) for saved in self.blocks),
            default=0,
        )
        return ActivationTrace(kept=_total(kept), recompute=recompute, largest=largest)


def _tensors(values) -> Iterator[torch.Tensor]:
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (tuple, list)):
            yield from _tensors(value)
        elif isinstance(value, dict):
            yield from _tensors(value.values())


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _total(saved: dict[int, torch.Tensor]) -> int:
    return sum(_nbytes(t) for t in saved.values())


class _DeviceKernels(TorchFunctionMode):
    """What the GPU does that meta tensors do not: autocast's casts (for the ops whose saved
    tensors dominate: matmuls and attention in the low dtype, norms and softmax in float32)
    and an attention kernel that keeps O(tokens) per head (the meta device would pick the
    math path and its tokens x tokens matrix)."""

    LOW = (
        F.linear,
        F.conv2d,
        torch.matmul,
        torch.Tensor.matmul,
        torch.Tensor.__matmul__,
        torch.bmm,
        torch.baddbmm,
        torch.addmm,
        F.scaled_dot_product_attention,
    )
    FLOAT32 = (F.layer_norm, F.group_norm, F.softmax, torch.softmax, torch.Tensor.softmax)

    def __init__(self, tracer: _Tracer, autocast: torch.dtype | None) -> None:
        super().__init__()
        self.tracer, self.autocast = tracer, autocast

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.autocast is not None and func in self.LOW:
            args, kwargs = cast_floating(args, self.autocast), cast_floating(kwargs, self.autocast)
        elif self.autocast is not None and func in self.FLOAT32:
            args, kwargs = cast_floating(args, torch.float32), cast_floating(kwargs, torch.float32)
        if func is F.scaled_dot_product_attention:
            return self._attention(*args, **kwargs)
        return func(*args, **kwargs)

    def _attention(self, query, key, value, *args, **kwargs) -> torch.Tensor:
        """The output of flash / memory-efficient attention, and what it saves: its inputs, its
        output and a float32 log-sum-exp per query and head."""
        output = torch.empty(
            (*query.shape[:-1], value.shape[-1]), dtype=query.dtype, device=query.device
        )
        if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
            lse = torch.empty(query.shape[:-1], dtype=torch.float32, device=query.device)
            for tensor in (query, key, value, output, lse):
                self.tracer.pack(tensor)
            output.requires_grad_(True)
        return output


def cast_floating(values, dtype: torch.dtype):
    """`values` (tensors, nested in tuples, lists, dicts) with floating tensors in `dtype`."""
    if isinstance(values, torch.Tensor):
        return values.to(dtype) if values.is_floating_point() else values
    if isinstance(values, (tuple, list)):
        return type(values)(cast_floating(value, dtype) for value in values)
    if isinstance(values, dict):
        return {key: cast_floating(value, dtype) for key, value in values.items()}
    return values


@contextlib.contextmanager
def _autocast_flag(dtype: torch.dtype | None) -> Iterator[None]:
    """`torch.is_autocast_enabled()` as the real run sees it (code such as the LoRA layers
    asks), without autocast's kernels, which meta tensors lack anyway."""
    if dtype is None:
        yield
        return
    enabled, previous = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", enabled)
        torch.set_autocast_dtype("cuda", previous)


def trace_activations(
    module: nn.Module,
    inputs: dict,
    *,
    checkpointing: bool,
    autocast: torch.dtype | None,
    skip: set[int],
    inputs_require_grad: bool = False,
) -> ActivationTrace:
    """Run `module` on meta `inputs` and count what autograd saves (`skip`: ids of weights)."""
    tracer = _Tracer(skip)
    if inputs_require_grad:
        inputs = {
            key: value.detach().requires_grad_(True)
            if isinstance(value, torch.Tensor) and value.is_floating_point()
            else value
            for key, value in inputs.items()
        }
    checkpointed = checkpointing and getattr(module, "_supports_gradient_checkpointing", False)
    if checkpointed:  # diffusers models: its checkpointed blocks call the tracer
        module.enable_gradient_checkpointing(gradient_checkpointing_func=tracer.checkpoint)
    was_training = module.training
    module.train()
    try:
        with (
            torch.autograd.graph.saved_tensors_hooks(tracer.pack, lambda tensor: tensor),
            _DeviceKernels(tracer, autocast),
            _autocast_flag(autocast),
            torch.enable_grad(),
        ):
            module(**inputs)
    finally:
        module.train(was_training)
        if checkpointed:
            module.disable_gradient_checkpointing()
    return tracer.result(checkpointing=checkpointed)
