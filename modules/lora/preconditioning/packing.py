"""Pack LoRA factors of the same shape into contiguous stacks, so one batched op serves them all.

The preconditioner's cost is memory traffic: it reads A, B and both gradients once and writes the
gradients once. Stacking them anew every step (`torch.stack`) would triple that. Instead each
group owns a (k, r, n) and a (k, m, r) tensor for the weights and another pair for the gradients,
and every LoRA parameter becomes a view into its slot (`param.data = slot`, same Parameter object,
so optimizers and DDP are unaffected). Autograd accumulates into an existing `.grad` in place, so
gradients land in the stacks as long as the trainer zeroes grads instead of setting them to None.

Anything may still replace a parameter's storage (`.to()`, loading with `assign=True`) or its
`.grad`: `refresh()` checks every slot by pointer each step (no device sync) and repacks what moved.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import nn

Pair = tuple[nn.Parameter, nn.Parameter]  # (A = lora_down, B = lora_up)


def matrix_shape(param: torch.Tensor) -> tuple[int, int]:
    """A parameter as the matrix the math sees: Conv2d weights flatten to (out, in*kh*kw)."""
    return param.shape[0], param[0].numel()


@dataclass
class FactorGroup:
    """k LoRA layers with A (r x n), B (m x r) of one dtype and device, packed."""

    pairs: list[Pair]
    scale: torch.Tensor  # (k,) alpha / rank of each layer, float32
    a: torch.Tensor = field(init=False)  # (k, r, n)
    b: torch.Tensor = field(init=False)  # (k, m, r)
    grad_a: torch.Tensor = field(init=False)
    grad_b: torch.Tensor = field(init=False)
    # per layer, where its A, g_A, B, g_B must point to be in its slots (checked every step)
    _slots: list[tuple[int, int, int, int]] = field(init=False, repr=False)
    # the fast check: A0, B0, A1, B1... with their data pointers and `.grad` tensors as packed
    _params: list[nn.Parameter] = field(init=False, repr=False)
    _packed_pointers: list[int] = field(init=False, repr=False)
    _packed_grads: list[torch.Tensor] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        first_a, first_b = self.pairs[0]
        k = len(self.pairs)
        self._slots = [(0, 0, 0, 0)] * k
        self._params = [param for pair in self.pairs for param in pair]
        (r, n), (m, _) = matrix_shape(first_a), matrix_shape(first_b)
        options = {"dtype": first_a.dtype, "device": first_a.device}
        self.a = torch.empty(k, r, n, **options)
        self.b = torch.empty(k, m, r, **options)
        self.grad_a = torch.zeros_like(self.a)
        self.grad_b = torch.zeros_like(self.b)
        self.repack_all()

    @property
    def key(self) -> tuple:
        return group_key(self.pairs[0])

    def repack_all(self) -> None:
        for index in range(len(self.pairs)):
            self._repack(index)
        self._remember_packing()

    def _remember_packing(self) -> None:
        self._packed_pointers = [param.data_ptr() for param in self._params]
        self._packed_grads = [param.grad for param in self._params]

    def _repack(self, index: int) -> None:
        param_a, param_b = self.pairs[index]
        for param, stack, grads in ((param_a, self.a, self.grad_a), (param_b, self.b, self.grad_b)):
            slot = stack[index].view(param.shape)
            with torch.no_grad():
                slot.copy_(param.data)
            param.data = slot
            _adopt_grad(param, grads[index].view(param.shape))
        self._slots[index] = _pointers(param_a, param_b)

    def refresh(self) -> int:
        """Re-pack layers whose weights or gradients left their slots; returns how many did.

        Compares data pointers only (no views made, no device sync). First in one sweep over
        the whole group: the weights' pointers, and each `.grad` by identity (autograd
        accumulates into it in place; a new or None gradient is another object; a storage
        swapped under the same object, `param.grad.data = t`, would go unseen). That is
        about a third of a microsecond a parameter; the layer-by-layer check below runs only
        when something moved. At SDXL size the checks are the host's share of a GPU step.
        """
        params = self._params
        if list(map(torch.Tensor.data_ptr, params)) == self._packed_pointers and all(
            map(operator.is_, [param.grad for param in params], self._packed_grads)
        ):
            return 0
        moved = 0
        for index, (param_a, param_b) in enumerate(self.pairs):
            if _pointers(param_a, param_b) != self._slots[index]:
                if matrix_shape(param_a) != tuple(self.a.shape[1:]) or (
                    param_a.dtype != self.a.dtype or param_a.device != self.a.device
                ):
                    raise RuntimeError("a LoRA factor changed shape, dtype or device; rebuild")
                self._repack(index)
                moved += 1
        self._remember_packing()
        return moved


def _pointers(param_a: torch.Tensor, param_b: torch.Tensor) -> tuple[int, int, int, int]:
    grad_a, grad_b = param_a.grad, param_b.grad
    return (
        param_a.data_ptr(),
        -1 if grad_a is None else grad_a.data_ptr(),
        param_b.data_ptr(),
        -1 if grad_b is None else grad_b.data_ptr(),
    )


def _adopt_grad(param: nn.Parameter, slot: torch.Tensor) -> None:
    """Make `slot` the parameter's `.grad`, keeping the gradient accumulated so far."""
    with torch.no_grad():
        if param.grad is None:
            slot.zero_()
        elif param.grad.data_ptr() != slot.data_ptr():
            slot.copy_(param.grad)
    param.grad = slot


def group_key(pair: Pair) -> tuple:
    param_a, param_b = pair
    return (matrix_shape(param_a), matrix_shape(param_b), param_a.dtype, param_a.device)


def pack_pairs(pairs: list[Pair], scales: list[float]) -> list[FactorGroup]:
    """Group `pairs` by (shapes, dtype, device), in first-seen order, and pack each group."""
    grouped: dict[tuple, list[int]] = {}
    for index, pair in enumerate(pairs):
        grouped.setdefault(group_key(pair), []).append(index)
    groups = []
    for indices in grouped.values():
        device = pairs[indices[0]][0].device
        scale = torch.tensor([scales[i] for i in indices], dtype=torch.float32, device=device)
        groups.append(FactorGroup(pairs=[pairs[i] for i in indices], scale=scale))
    return groups
