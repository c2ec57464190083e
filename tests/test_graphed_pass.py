"""The check a recorded CUDA graph passes before the preconditioner trusts it.

Recording needs a GPU (`tests/test_preconditioner_cuda.py`); the check itself is tensor
arithmetic, so here a stand-in replay on the CPU plays a graph that computes the pass, one that
is off by rounding, and one that computes something else.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from modules.lora.preconditioning.graphed_pass import GraphedPass


def _gradients() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(3, 4, generator=g),
        torch.tensor([1.0, float("nan"), float("inf")]).to(torch.bfloat16),
    ]


def _scaling(tensors: list[torch.Tensor], factor: float) -> Callable[[], None]:
    def replay() -> None:
        for tensor in tensors:
            tensor.mul_(factor)

    return replay


def test_a_replay_is_trusted_only_when_it_writes_what_the_eager_pass_wrote() -> None:
    gradients = _gradients()
    graphed = GraphedPass(
        _scaling(gradients, 2.0),
        device=torch.device("cpu"),
        enabled=True,
        outputs=lambda: gradients,
    )
    inputs = [tensor.clone() for tensor in gradients]
    _scaling(gradients, 2.0)()  # the eager pass of this step
    eager = [tensor.clone() for tensor in gradients]

    def holds_the_eager_result() -> bool:
        pairs = zip(gradients, eager, strict=True)
        return all(torch.equal(t.nan_to_num(), e.nan_to_num()) for t, e in pairs)

    assert graphed.replay_matches(_scaling(gradients, 2.0), inputs)  # NaN and inf included
    assert holds_the_eager_result()
    assert graphed.replay_matches(_scaling(gradients, 2.0 * (1 + 1e-5)), inputs)  # rounding
    assert holds_the_eager_result()
    assert not graphed.replay_matches(_scaling(gradients, 2.01), inputs)
    assert holds_the_eager_result()  # the step keeps the eager pass's directions
