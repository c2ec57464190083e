"""The preconditioner on a CUDA GPU: half-precision factors, no host sync, float64 results.

CI has no GPU, so these skip there; on a machine with one they run with the rest of the suite.
`torch.cuda.set_sync_debug_mode("error")` turns any operation that makes the host wait for the
GPU (`.item()`, a copy to or from pageable host memory, a data-dependent shape) into an error, so
"no host sync inside the step" is checked, not assumed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

from modules.config.loading import load_config
from modules.lora.preconditioning import Damping, LoRAPreconditioner, Settings
from modules.lora.preconditioning.directions import (
    AdafactorWeights,
    adaprelora_directions,
    riemannian_directions,
)
from modules.lora.preconditioning.preconditioner import PairGroup, precondition_pairs_
from modules.training.trainer import TrainingRun
from tests.helpers import tiny_config
from tests.test_preconditioner import TwoLayers, _inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
# of the largest entry: one rounding of the result to the factors' dtype, and float32 algebra
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@contextmanager
def host_syncs_are_errors() -> Iterator[None]:
    torch.cuda.synchronize()  # what came before is not the code under test
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _stacks(pairs: list[tuple[nn.Parameter, nn.Parameter]]) -> dict[str, torch.Tensor]:
    """A group's factors and gradients, stacked, in float64 on the CPU."""

    def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([t.detach().double().cpu().flatten(1) for t in tensors])

    a, b = zip(*pairs, strict=True)
    return {
        "a": stack(a),
        "b": stack(b),
        "grad_a": stack([p.grad for p in a]),
        "grad_b": stack([p.grad for p in b]),
    }


def _assert_close_to(pairs, expected: tuple[torch.Tensor, torch.Tensor], dtype) -> None:
    a, b = zip(*pairs, strict=True)
    for factors, want in zip((a, b), expected, strict=True):
        got = torch.stack([p.grad.double().cpu().flatten(1) for p in factors])
        assert all(p.grad.dtype == dtype for p in factors)
        atol = TOLERANCE[dtype] * want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("method", ["riemannian", "adaprelora"])
def test_the_hook_on_cuda_never_syncs_and_matches_float64(method: str, dtype: torch.dtype) -> None:
    """Linear and Conv2d layers on the GPU in `dtype`: the hook (AdaPreLoRA's moment update
    included) runs without one host sync after the first step (which puts each group's s on the
    GPU), and its directions equal the float64 ones."""
    model = TwoLayers(rank=3, alpha=6.0).to(CUDA, dtype)
    settings = Settings(method=method, damping=Damping(relative=1e-2), probes=4)
    preconditioner = LoRAPreconditioner(model.adapters, settings)
    for step in range(3):  # later steps also read the moments the earlier ones left
        x, image = (t.to(CUDA, dtype) for t in _inputs(seed=step))
        model(x, image).float().backward()
        raw = [_stacks(group.pairs()) for group in preconditioner.groups]
        if step == 0:
            preconditioner.precondition()
        else:
            with host_syncs_are_errors():
                preconditioner.precondition()
        weights = preconditioner.adafactor_weights() if method == "adaprelora" else None
        for index, (group, stacks) in enumerate(zip(preconditioner.groups, raw, strict=True)):
            common = {**stacks, "scale": group.scale().double().cpu(), "damping": settings.damping}
            if weights is None:
                expected = riemannian_directions(**common)
            else:
                left, right = (
                    weights[index].left.double().cpu(),
                    weights[index].right.double().cpu(),
                )
                expected = adaprelora_directions(
                    **common, weights=AdafactorWeights(left=left, right=right)
                )
            _assert_close_to(group.pairs(), expected, dtype)
        for param in model.lora_parameters():
            param.grad = None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sdxl_widths_match_float64_without_syncs(dtype: torch.dtype) -> None:
    """At SDXL's widths (inner dimensions of 640 to 2048) the batched pass still equals the
    float64 directions, and never waits for the GPU."""
    gen = torch.Generator(device=CUDA).manual_seed(0)

    def param(*shape: int) -> nn.Parameter:
        weight = nn.Parameter(torch.randn(*shape, generator=gen, device=CUDA).to(dtype))
        weight.grad = torch.randn(*shape, generator=gen, device=CUDA).to(dtype)
        return weight

    damping = Damping(relative=1e-2)
    for k, m, n, r in [(3, 640, 2048, 16), (2, 1280, 640, 8)]:
        pairs = [(param(r, n), param(m, r)) for _ in range(k)]
        scale = torch.full((k,), 0.5, device=CUDA)
        expected = riemannian_directions(
            **_stacks(pairs), scale=scale.double().cpu(), damping=damping
        )
        with host_syncs_are_errors():
            precondition_pairs_([PairGroup(pairs=pairs, scale=scale)], damping=damping)
        _assert_close_to(pairs, expected, dtype)


@pytest.mark.parametrize(
    ("method", "precision"),
    [
        ("riemannian", "bf16"),
        ("adaprelora", "bf16"),
        ("riemannian", "fp16"),
        ("adaprelora", "fp16"),
    ],
)
def test_training_on_cuda_in_half_precision_runs_the_hook_without_host_syncs(
    method: str, precision: str, tiny_sdxl_path: Path, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    """The real trainer on the GPU with half-precision weights (bf16 autocast, or fp16 with loss
    scaling, whose scale AdaPreLoRA divides out on the GPU): every step's hook after the first
    runs with host syncs made errors, the loss and the LoRA stay finite, and the LoRA moves."""
    weights = {"weight_dtype": {"bf16": "bfloat16", "fp16": "float16"}[precision]}
    raw = tiny_config(
        tiny_sdxl_path,
        tiny_dataset_path,
        tmp_path,
        model={"unet": weights, "text_encoder": weights, "text_encoder_2": weights},
        lora={"rank": 4, "alpha": 8, "preconditioner": method},
        training={"max_steps": 6, "mixed_precision": precision},
    )
    run = TrainingRun(load_config(raw=raw))
    preconditioner = run.preconditioner
    assert preconditioner is not None
    assert preconditioner.groups[0].adapters[0].lora_down.weight.device.type == "cuda"
    precondition: Callable[[], None] = preconditioner.precondition

    def precondition_without_syncs() -> None:
        if preconditioner.applied_steps == 0:
            precondition()  # puts each group's s on the GPU once
            return
        with host_syncs_are_errors():
            precondition()

    preconditioner.precondition = precondition_without_syncs  # what the pre-hook calls
    start = [p.detach().clone() for p in run.network.parameters()]
    losses = []
    step = run.pipeline.step

    def recording_step():
        outcome = step()
        losses.append(outcome.loss)
        return outcome

    run.pipeline.step = recording_step
    run.run()
    assert preconditioner.applied_steps >= 4  # fp16 may skip its first steps
    assert losses and all(math.isfinite(loss) for loss in losses)
    end = list(run.network.parameters())
    assert all(torch.isfinite(p).all() for p in end)
    assert any(not torch.equal(p, q) for p, q in zip(end, start, strict=True))
