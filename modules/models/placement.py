"""Moving a base model to the training device while some of its modules stay in CPU memory.

The trainer fills the latent and text caches before the denoiser comes to the device, then moves
the model there without the encoders it no longer needs (modules/data/caching.py decides which),
so the encoders and the denoiser never share the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def to_device_except(
    module: nn.Module, device: torch.device | str, *, away: Sequence[nn.Module] = ()
) -> None:
    """Move `module` to `device` except the submodules in `away`, which stay where they are.

    Subtrees without such a submodule move with `Module.to` (quantized weights move as their
    own types do); a module holding one moves its own tensors and visits its children.
    """
    away_ids = {id(m) for m in away}
    if not away_ids:
        module.to(device)
        return
    device = torch.device(device)

    def visit(current: nn.Module) -> None:
        if id(current) in away_ids:
            return
        if not any(id(sub) in away_ids for sub in current.modules()):
            current.to(device)
            return
        for name, parameter in list(current.named_parameters(recurse=False)):
            moved = parameter.to(device)
            if moved is not parameter:
                setattr(current, name, nn.Parameter(moved, requires_grad=parameter.requires_grad))
        for name, buffer in list(current.named_buffers(recurse=False)):
            setattr(current, name, buffer.to(device))
        for child in current.children():
            visit(child)

    visit(module)
