"""The per-image denoising loss every family uses, with the masked-training weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mse(
    prediction: torch.Tensor, target: torch.Tensor, masks: torch.Tensor | None, *, unmasked: float
) -> torch.Tensor:
    """Per-image MSE; with masks, the mean weighted by `unmasked + (1 - unmasked) * mask`.

    The mask is area-averaged down to the latent grid, and dividing by the mean weight keeps
    the loss scale independent of how much of the image a mask covers.
    """
    error = F.mse_loss(prediction.float(), target.float(), reduction="none")
    if masks is None:
        return error.mean(dim=(1, 2, 3))
    mask = F.interpolate(masks.to(error.device, torch.float32), size=error.shape[-2:], mode="area")
    weight = unmasked + (1 - unmasked) * mask
    return (error * weight).mean(dim=(1, 2, 3)) / weight.mean(dim=(1, 2, 3)).clamp_min(1e-6)
