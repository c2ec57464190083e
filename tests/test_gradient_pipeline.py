"""The one gradient pipeline: accumulate, unscale, clip, pre-step hooks, step, schedule, zero."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn

from modules.training.gradient_pipeline import GradientPipeline


def _pipeline(*, accumulation: int, max_grad_norm: float) -> tuple[GradientPipeline, nn.Linear]:
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision="no")
    model = nn.Linear(3, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    model, optimizer = accelerator.prepare(model, optimizer)
    pipeline = GradientPipeline(
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        parameters=list(model.parameters()),
        accumulation_steps=accumulation,
        max_grad_norm=max_grad_norm,
    )
    return pipeline, model


def test_pre_step_hook_sees_the_accumulated_clipped_gradient_once_per_step() -> None:
    pipeline, model = _pipeline(accumulation=3, max_grad_norm=0.5)
    torch.manual_seed(0)
    inputs = [3 * torch.randn(2, 3) for _ in range(3)]
    weight = model.weight.detach().clone()
    # float64 reference: the mean of the three micro-batch gradients, then clipped to norm 0.5
    raw = (
        sum(
            torch.autograd.functional.jacobian(
                lambda w, x=x: (x.double() @ w.T).pow(2).mean(), weight.double()
            )
            for x in inputs
        )
        / 3
    )
    assert raw.norm() > 1.0  # so clipping matters and its place in the order is visible
    reference = raw * 0.5 / raw.norm()

    seen = []
    pipeline.optimizer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append(model.weight.grad.detach().double().clone())
    )
    for x in inputs:
        with pipeline.micro_batch():
            loss = model(x).pow(2).mean()
        pipeline.backward(loss)
        assert len(seen) == 0
    assert pipeline.ready
    outcome = pipeline.step()
    assert len(seen) == 1 and outcome.applied
    torch.testing.assert_close(seen[0], reference, rtol=1e-5, atol=1e-7)
    assert abs(outcome.grad_norm - raw.norm().item()) < 1e-4  # reported: the norm before clipping
    assert model.weight.grad is None  # zeroed after the step (set to None, torch's default)
    assert pipeline.scheduler.last_epoch == 1


def test_nonfinite_gradient_is_never_applied() -> None:
    pipeline, model = _pipeline(accumulation=1, max_grad_norm=1.0)
    before = model.weight.detach().clone()
    with pipeline.micro_batch():
        loss = model(torch.full((1, 3), float("inf"))).sum()
    pipeline.backward(loss)
    outcome = pipeline.step()
    assert not outcome.finite and not outcome.applied
    assert torch.equal(model.weight.detach(), before)
    assert pipeline.scheduler.last_epoch == 0
