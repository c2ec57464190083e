"""The preconditioner on a CUDA GPU: half-precision factors, no host sync, float64 results, and
both passes replayed as CUDA graphs.

CI has no GPU, so these skip there; on a machine with one they run with the rest of the suite.
`torch.cuda.set_sync_debug_mode("error")` turns any operation that makes the host wait for the
GPU (`.item()`, a copy to or from pageable host memory, a data-dependent shape) into an error, so
"no host sync inside the step" is checked, not assumed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from modules.config.loading import load_config
from modules.lora.preconditioning import linalg
from modules.lora.preconditioning.adaprelora import AdafactorWeights, adaprelora_directions
from modules.lora.preconditioning.linalg import Damping, riemannian_directions
from modules.lora.preconditioning.preconditioner import LoRAPreconditioner, PreconditionerSettings
from modules.training.trainer import TrainingRun
from tests.helpers import tiny_config
from tests.test_preconditioner import TwoLayers, _inputs, _pairs
from tests.test_preconditioning_math import _Stacks

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


def _directions_in_float64(
    preconditioner: LoRAPreconditioner,
    raw: list[tuple[torch.Tensor, ...]],
    weights: list[AdafactorWeights] | None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each group's directions from its raw factors and gradients, in float64 on the CPU."""
    expected = []
    for index, (group, tensors) in enumerate(zip(preconditioner.groups, raw, strict=True)):
        a, b, grad_a, grad_b = (t.double().cpu() for t in tensors)
        common = {
            "a": a,
            "b": b,
            "grad_a": grad_a,
            "grad_b": grad_b,
            "scale": group.scale.double().cpu(),
            "damping": preconditioner.settings.damping,
        }
        if weights is None:
            expected.append(riemannian_directions(**common))
        else:
            left, right = weights[index].left, weights[index].right
            unit = AdafactorWeights(left=left.double().cpu(), right=right.double().cpu())
            expected.append(adaprelora_directions(**common, weights=unit))
    return expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("method", ["riemannian", "adaprelora"])
def test_the_pass_on_cuda_never_syncs_and_matches_float64(method: str, dtype: torch.dtype) -> None:
    """Linear and Conv2d layers on the GPU in `dtype`: the eager pass (AdaPreLoRA's moment update
    included) runs without one host sync, and its directions equal the float64 ones."""
    model = TwoLayers(rank=3, alpha=6.0).to(CUDA, dtype)
    settings = PreconditionerSettings(
        method=method, damping=Damping(relative=1e-2), sketch_size=4, cuda_graph=False
    )
    preconditioner = LoRAPreconditioner(_pairs(model), settings)
    for step in range(2):  # the second step also reads moments the first one left
        x, image = (t.to(CUDA, dtype) for t in _inputs(seed=step))
        model(x, image).float().backward()
        raw = [
            tuple(t.clone() for t in (g.a, g.b, g.grad_a, g.grad_b)) for g in preconditioner.groups
        ]
        with host_syncs_are_errors():
            preconditioner.precondition()
        weights = preconditioner.adafactor_weights() if method == "adaprelora" else None
        expected = _directions_in_float64(preconditioner, raw, weights)
        for group, (direction_a, direction_b) in zip(preconditioner.groups, expected, strict=True):
            for got, want in ((group.grad_a, direction_a), (group.grad_b, direction_b)):
                assert got.dtype == dtype
                atol = TOLERANCE[dtype] * want.abs().max().item()
                torch.testing.assert_close(got.double().cpu(), want, rtol=0, atol=atol)
        preconditioner.zero_()
        for param in model.lora_parameters():
            param.grad.zero_()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sdxl_widths_take_pieced_grams_and_match_float64(dtype: torch.dtype) -> None:
    """At SDXL's widths (inner dimensions of 640 and 2048, pieces of 128) the GPU's Grams are sums
    of partial Grams; the pass's directions still equal the float64 ones."""
    assert linalg.gram_piece(CUDA) == 128
    gen = torch.Generator(device=CUDA).manual_seed(0)
    groups = []
    for k, m, n, r in [(3, 640, 2048, 16), (2, 1280, 640, 8)]:
        a, b, grad_a, grad_b = (
            torch.randn(*shape, generator=gen, device=CUDA).to(dtype)
            for shape in ((k, r, n), (k, m, r), (k, r, n), (k, m, r))
        )
        groups.append(_Stacks(a, b, grad_a, grad_b, torch.full((k,), 0.5, device=CUDA)))
    damping = Damping(relative=1e-2)
    expected = [
        riemannian_directions(
            a=g.a.double().cpu(),
            b=g.b.double().cpu(),
            grad_a=g.grad_a.double().cpu(),
            grad_b=g.grad_b.double().cpu(),
            scale=g.scale.double().cpu(),
            damping=damping,
        )
        for g in groups
    ]
    with host_syncs_are_errors():
        linalg.riemannian_precondition_(groups, damping)
    for group, (direction_a, direction_b) in zip(groups, expected, strict=True):
        for got, want in ((group.grad_a, direction_a), (group.grad_b, direction_b)):
            atol = TOLERANCE[dtype] * want.abs().max().item()
            torch.testing.assert_close(got.double().cpu(), want, rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method", ["riemannian", "adaprelora"])
def test_the_replayed_cuda_graph_computes_what_the_eager_pass_does(
    method: str, dtype: torch.dtype
) -> None:
    """The pass recorded at the first step and replayed after it gives the eager pass's
    directions bit for bit, also after gradients set to None moved every layer out of its slot
    (refresh copies them back in, the graph's stacks stay put) and, for AdaPreLoRA, with new
    Adafactor weights at every step (copied into the buffers the graph reads), and replays never
    sync."""
    graphed_model = TwoLayers(rank=3, alpha=6.0).to(CUDA, dtype)
    eager_model = TwoLayers(rank=3, alpha=6.0).to(CUDA, dtype)  # the same seed: the same model
    settings = PreconditionerSettings(method=method, damping=Damping(relative=1e-2), sketch_size=4)
    graphed = LoRAPreconditioner(_pairs(graphed_model), settings)
    eager = LoRAPreconditioner(_pairs(eager_model), replace(settings, cuda_graph=False))
    previous_left: torch.Tensor | None = None  # AdaPreLoRA: the last step's weights
    for step in range(4):
        for model, preconditioner in ((graphed_model, graphed), (eager_model, eager)):
            if step == 2:  # what zero_grad(set_to_none=True) does
                for param in model.lora_parameters():
                    param.grad = None
            x, image = (t.to(CUDA, dtype) for t in _inputs(seed=step))
            model(x, image).float().backward()
            if preconditioner is graphed and step > 0:
                with host_syncs_are_errors():
                    preconditioner.precondition()
            else:
                preconditioner.precondition()
        assert graphed.graphed and not eager.graphed
        if method == "adaprelora":
            for mine, reference in zip(graphed.weights, eager.weights, strict=True):
                assert torch.equal(mine.left, reference.left)
            assert previous_left is None or not torch.equal(graphed.weights[0].left, previous_left)
            previous_left = graphed.weights[0].left.clone()
        for mine, reference in zip(graphed.groups, eager.groups, strict=True):
            assert torch.equal(mine.grad_a, reference.grad_a)
            assert torch.equal(mine.grad_b, reference.grad_b)
            assert mine.grad_b.abs().max() > 0
        for model in (graphed_model, eager_model):
            with torch.no_grad():  # a stand-in for the optimizer, so the factors change
                for param in model.lora_parameters():
                    param.sub_(0.1 * param.grad)
                    param.grad.zero_()
        for preconditioner in (graphed, eager):
            preconditioner.zero_()  # a new cycle: fresh probes, empty sketches


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
    scaling, whose scale AdaPreLoRA divides out on the GPU): every step's hook runs with host
    syncs made errors, the loss and the LoRA stay finite, and the LoRA moves."""
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
    assert run.preconditioner is not None
    assert run.preconditioner.groups[0].a.device.type == "cuda"
    preconditioner = run.preconditioner
    precondition: Callable[[], None] = preconditioner.precondition

    def precondition_without_syncs() -> None:
        if preconditioner.applied_steps == 0:
            precondition()  # records the CUDA graph and checks it, which synchronizes once
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
    assert preconditioner.graphed
    assert losses and all(math.isfinite(loss) for loss in losses)
    end = list(run.network.parameters())
    assert all(torch.isfinite(p).all() for p in end)
    assert any(not torch.equal(p, q) for p, q in zip(end, start, strict=True))
