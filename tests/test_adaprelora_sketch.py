"""AdaPreLoRA's sketches, taken by a tap on each adapted layer, against the layer's exact weight
gradient G: `G Omega` and `Psi^T G` with the step's probes, and in expectation G's row and column
energies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modules.lora.layers import LoRAConv2d, LoRALinear, LoRAModule
from modules.lora.preconditioning.statistics import GroupStatistics, ProbeSource


def _adapter(kind: str, *, dtype: torch.dtype = torch.float32, dropout: float = 0.0) -> LoRAModule:
    """A LoRA on a layer whose own weight takes a gradient too: that gradient is the exact G."""
    torch.manual_seed(0)
    if kind == "linear":
        base: nn.Module = nn.Linear(12, 9)
        adapter: LoRAModule = LoRALinear(base=base, name="lin", rank=3, alpha=6.0, dropout=dropout)
    else:
        base = nn.Conv2d(3, 4, kernel_size=3, padding=1, stride=2)
        adapter = LoRAConv2d(base=base, name="conv", rank=2, alpha=2.0, dropout=dropout)
    nn.init.normal_(adapter.lora_up.weight, std=0.5)
    base.to(dtype)
    adapter.to(dtype)
    adapter.attach()
    return adapter


def _inputs(kind: str, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (2, 4, 12) if kind == "linear" else (2, 3, 8, 8)
    return torch.randn(*shape, generator=g).to(dtype)


def _expected_sketches(
    adapter: LoRAModule, probes: ProbeSource
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(G Omega, Psi^T G)` in float64 from the base layer's accumulated weight gradient."""
    full = adapter.base.weight.grad.double().flatten(1)
    like = torch.empty((), dtype=torch.float64)
    omega = probes.probes(full.shape[1], left=False, like=like)
    psi = probes.probes(full.shape[0], left=True, like=like)
    return full @ omega, psi.mT @ full


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("dropout", [0.0, 0.5], ids=["plain", "lora-dropout"])
def test_sketches_of_two_micro_batches_are_those_of_their_summed_gradient(
    kind: str, dropout: float
) -> None:
    """LoRA dropout masks the LoRA's hidden features, not the layer's G = dY^T x, so the sketches
    are the same either way."""
    adapter = _adapter(kind, dropout=dropout)
    probes = ProbeSource(size=5, seed=3)
    statistics = GroupStatistics([adapter], probes)
    for seed in range(2):
        adapter.base(_inputs(kind, seed)).sin().sum().backward()
    rows, cols = _expected_sketches(adapter, probes)
    torch.testing.assert_close(statistics.sketch_rows[0].double(), rows, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(statistics.sketch_cols[0].double(), cols, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_bf16_layers_give_float32_sketches_close_to_float64(kind: str) -> None:
    exact, low = _adapter(kind, dtype=torch.float64), _adapter(kind, dtype=torch.bfloat16)
    probes = ProbeSource(size=5, seed=3)
    exact_statistics = GroupStatistics([exact], probes)
    low_statistics = GroupStatistics([low], probes)
    x = _inputs(kind, 0, torch.float64)
    exact.base(x).sin().sum().backward()
    low.base(x.bfloat16()).float().sin().sum().backward()
    assert low_statistics.sketch_rows.dtype == torch.float32
    for ours, theirs in (
        (low_statistics.sketch_rows, exact_statistics.sketch_rows),
        (low_statistics.sketch_cols, exact_statistics.sketch_cols),
    ):
        error = (ours.double() - theirs.double()).norm() / theirs.norm()
        assert error < 0.02  # bf16 rounding of x, W, A, B and dY


def test_autocast_sketches_in_its_dtype_close_to_float32() -> None:
    plain, autocast = _adapter("linear"), _adapter("linear")
    probes = ProbeSource(size=5, seed=3)
    reference, ours = GroupStatistics([plain], probes), GroupStatistics([autocast], probes)
    x = _inputs("linear", 0)
    plain.base(x).sin().sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = autocast.base(x)
    y.float().sin().sum().backward()
    error = (ours.sketch_rows - reference.sketch_rows).norm() / reference.sketch_rows.norm()
    assert 0 < error < 0.02


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_energies_estimate_the_exact_row_and_column_energies(kind: str) -> None:
    adapter = _adapter(kind)
    statistics = GroupStatistics([adapter], ProbeSource(size=4096, seed=1))
    for seed in range(2):
        adapter.base(_inputs(kind, seed)).sin().sum().backward()
    full = adapter.base.weight.grad.flatten(1).double()
    rows, cols = statistics.energies()
    torch.testing.assert_close(rows[0].double(), full.square().mean(1), rtol=0.1, atol=1e-7)
    torch.testing.assert_close(cols[0].double(), full.square().mean(0), rtol=0.1, atol=1e-7)


def test_taps_take_nothing_without_autograd_or_in_an_inactive_step_and_come_off() -> None:
    adapter = _adapter("linear")
    probes = ProbeSource(size=4, seed=0)
    statistics = GroupStatistics([adapter], probes)
    assert len(adapter.base._forward_hooks) == 2  # the LoRA's delta and the tap
    with torch.no_grad():  # sampling, validation
        adapter.base(_inputs("linear", 0))
    probes.set_cycle(1, active=False)
    adapter.base(_inputs("linear", 0)).sum().backward()
    assert statistics.sketch_rows.abs().sum() == 0
    probes.set_cycle(2, active=True)
    adapter.base(_inputs("linear", 0)).sum().backward()
    assert statistics.sketch_rows.abs().sum() > 0
    statistics.remove()
    assert len(adapter.base._forward_hooks) == 1
