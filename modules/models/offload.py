"""Block offloading: the frozen weights of chosen blocks live in CPU memory and visit the
compute device only while their block runs (its forward, and its recompute under gradient
checkpointing), so a transformer larger than the card still trains.

Not diffusers' group offloading (`enable_group_offload`), which is built for inference: it moves
a block back in a post-forward hook, and the recompute of non-reentrant checkpointing stops as
soon as the tensors the backward pass needs are rebuilt, before that hook; after one backward
pass every block sits on the GPU again. Its stream prefetch also follows the forward order, the
opposite of the backward pass's. Here a block leaves when another arrives, in either direction,
and the next offloaded block in the current direction is copied ahead on a side stream.

Saves memory in training only with gradient checkpointing: without it autograd keeps every
block's weights referenced until the backward pass. LoRA adapters are not part of the blocks'
modules (they observe them through hooks), so their weights stay on the GPU.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from modules.models.quantize import map_storage, tensor_bytes


def spread(count: int, total: int) -> list[int]:
    """`count` of `total` block indices, evenly spaced, so each copy can hide behind the
    compute of the resident blocks before it."""
    if not 0 <= count <= total:
        raise ValueError(f"cannot offload {count} of {total} blocks")
    return [round((k + 0.5) * total / count - 0.5) for k in range(count)]


@dataclass
class _Slot:
    """One frozen tensor of a block: where it is installed and its CPU copy."""

    module: nn.Module
    name: str
    is_parameter: bool
    home: torch.Tensor


class BlockOffloader:
    """Streams the frozen weights of `blocks[i]` for i in `offloaded` between CPU memory and
    the device the block's input is on.

    `blocks` are all blocks in the order the forward pass runs them: hooks on every block tell
    which one runs next, so the next offloaded one is prefetched while the others compute.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        offloaded: Iterable[int],
        *,
        pin_memory: bool | None = None,
        prefetch: bool = True,
    ) -> None:
        self.blocks = list(blocks)
        self.offloaded = sorted(set(offloaded))
        if self.offloaded and not 0 <= self.offloaded[0] <= self.offloaded[-1] < len(self.blocks):
            raise ValueError(f"block indices {self.offloaded} outside 0..{len(self.blocks) - 1}")
        self.prefetch = prefetch
        pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._slots = {index: self._take(self.blocks[index], pin=pin) for index in self.offloaded}
        self._resident: set[int] = set()  # offloaded blocks whose weights are installed now
        self._pending: dict[int, tuple[list[torch.Tensor], torch.cuda.Event | None]] = {}
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._last: int | None = None
        self._direction = 1
        self._handles = []
        for index, block in enumerate(self.blocks):
            self._handles.append(
                block.register_forward_pre_hook(self._pre_hook(index), with_kwargs=True)
            )
            if index in self._slots:
                self._handles.append(block.register_forward_hook(self._post_hook(index)))

    # -- sizes, for the memory estimate and reports ---------------------------------------------

    def block_bytes(self, index: int) -> int:
        return sum(tensor_bytes(slot.home) for slot in self._slots[index])

    @property
    def offloaded_bytes(self) -> int:
        """Bytes kept in CPU memory instead of on the device."""
        return sum(self.block_bytes(index) for index in self.offloaded)

    @property
    def staging_bytes(self) -> int:
        """Device bytes for offloaded weights at most: the running block and the prefetched one."""
        sizes = sorted((self.block_bytes(index) for index in self.offloaded), reverse=True)
        return sum(sizes[: 2 if self.prefetch else 1])

    def resident(self) -> set[int]:
        """The offloaded blocks whose weights are on the device now (tests and reports)."""
        return set(self._resident)

    # -- setup and teardown ---------------------------------------------------------------------

    @staticmethod
    def _take(block: nn.Module, *, pin: bool) -> list[_Slot]:
        """Move the block's frozen tensors to CPU memory and leave empty placeholders."""
        slots, homes = [], {}
        for module in block.modules():
            owned = [(name, p, True) for name, p in module.named_parameters(recurse=False)]
            owned += [(name, b, False) for name, b in module.named_buffers(recurse=False)]
            for name, tensor, is_parameter in owned:
                if is_parameter and tensor.requires_grad:
                    raise ValueError(
                        f"{type(module).__name__}.{name} is trainable; only frozen weights can "
                        "be offloaded"
                    )
                if id(tensor) not in homes:  # tied weights are copied once
                    home = map_storage(tensor, lambda t: t.to("cpu", copy=True))
                    homes[id(tensor)] = map_storage(home, torch.Tensor.pin_memory) if pin else home
                slot = _Slot(module, name, is_parameter, homes[id(tensor)])
                slots.append(slot)
                _install(slot, _placeholder(tensor))
        return slots

    def remove(self) -> None:
        """Remove the hooks and put every block's weights back, in CPU memory."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending.clear()
        for slots in self._slots.values():
            for slot in slots:
                _install(slot, slot.home)
        self._resident.clear()

    # -- the hooks ------------------------------------------------------------------------------

    def _pre_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._before(index, _input_device(args, kwargs))

        return hook

    def _post_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            self._release(index)  # anything autograd saved keeps its own reference

        return hook

    def _before(self, index: int, device: torch.device) -> None:
        if self._last is not None and index != self._last:
            self._direction = 1 if index > self._last else -1
        self._last = index
        upcoming = self._next_offloaded(index) if self.prefetch else None
        for other in self._resident | set(self._pending):
            if other not in (index, upcoming):
                self._release(other)  # also a block whose recompute never reached its post-hook
        if index in self._slots:
            self._bring(index, device)
        if upcoming is not None and upcoming not in self._resident | set(self._pending):
            self._pending[upcoming] = self._copy_ahead(upcoming, device)

    def _next_offloaded(self, index: int) -> int | None:
        later = [i for i in self.offloaded if (i - index) * self._direction > 0]
        if not later:
            return None
        return min(later) if self._direction > 0 else max(later)

    # -- moving weights -------------------------------------------------------------------------

    def _copies(self, index: int, device: torch.device) -> list[torch.Tensor]:
        return [
            map_storage(slot.home, lambda t: t.to(device, non_blocking=True, copy=True))
            for slot in self._slots[index]
        ]

    def _copy_ahead(
        self, index: int, device: torch.device
    ) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
        if device.type != "cuda":
            return self._copies(index, device), None
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        # after the work queued so far: memory freed by earlier blocks is reused only once
        # the kernels that read it have run
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            copies = self._copies(index, device)
            done = torch.cuda.Event()
            done.record(stream)
        return copies, done

    def _bring(self, index: int, device: torch.device) -> None:
        if index in self._resident:
            return
        if index in self._pending:
            copies, done = self._pending.pop(index)
            if done is not None:
                torch.cuda.current_stream(device).wait_event(done)
        else:
            copies = self._copies(index, device)
        for slot, tensor in zip(self._slots[index], copies, strict=True):
            _install(slot, tensor)
        self._resident.add(index)

    def _release(self, index: int) -> None:
        self._pending.pop(index, None)
        if index in self._resident:
            for slot in self._slots[index]:
                _install(slot, _placeholder(getattr(slot.module, slot.name)))
            self._resident.discard(index)


def _placeholder(tensor: torch.Tensor) -> torch.Tensor:
    """An empty stand-in of the tensor's dtype on its device (moves with the model)."""
    return torch.empty(0, dtype=tensor.dtype, device=tensor.device)


def _install(slot: _Slot, tensor: torch.Tensor) -> None:
    if slot.is_parameter and not isinstance(tensor, nn.Parameter):
        tensor = nn.Parameter(tensor, requires_grad=False)
    setattr(slot.module, slot.name, tensor)


def _input_device(args: tuple, kwargs: dict) -> torch.device:
    """Where the block computes: the device of its first tensor input."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    raise ValueError("an offloaded block was called without a tensor input")
