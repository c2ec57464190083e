"""Both preconditioners against explicit float64 linear algebra on small random matrices, and the
training pass (stacked float32 over real Parameters) against those float64 references."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from modules.lora.preconditioning.directions import (
    AdafactorWeights,
    Damping,
    adaprelora_directions,
    damped_inverse,
    riemannian_directions,
)
from modules.lora.preconditioning.preconditioner import PairGroup, precondition_pairs_

EXACT = Damping(relative=0.0, absolute=0.0)


def _layer(k=3, m=7, n=5, r=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(k, r, n, generator=g, dtype=torch.float64)
    b = torch.randn(k, m, r, generator=g, dtype=torch.float64)
    big_g = torch.randn(k, m, n, generator=g, dtype=torch.float64)  # dL/dW per layer
    scale = torch.tensor([0.5, 1.0, 2.0][:k], dtype=torch.float64)
    s = scale[:, None, None]
    return a, b, big_g, scale, s * b.mT @ big_g, s * big_g @ a.mT


def _projector(x):  # orthogonal projector onto the column space of x
    return x @ torch.linalg.inv(x.mT @ x) @ x.mT


def test_riemannian_matches_the_explicit_formula_with_damping() -> None:
    a, b, _, scale, grad_a, grad_b = _layer()
    damping = Damping(relative=0.1, absolute=1e-3)
    da, db = riemannian_directions(
        a=a, b=b, grad_a=grad_a, grad_b=grad_b, scale=scale, damping=damping
    )
    eye = torch.eye(2, dtype=torch.float64)
    for i in range(3):
        s2 = scale[i] ** 2
        gram_b, gram_a = s2 * b[i].T @ b[i], s2 * a[i] @ a[i].T
        lam_b = 0.1 * torch.trace(gram_b) / 2 + 1e-3
        lam_a = 0.1 * torch.trace(gram_a) / 2 + 1e-3
        torch.testing.assert_close(
            da[i], torch.linalg.solve(gram_b + lam_b * eye, grad_a[i]), rtol=1e-10, atol=1e-12
        )
        expected_b = torch.linalg.solve(gram_a + lam_a * eye, grad_b[i].T).T
        torch.testing.assert_close(db[i], expected_b, rtol=1e-10, atol=1e-12)


def test_riemannian_w_step_is_the_sum_of_both_projections() -> None:
    a, b, big_g, scale, grad_a, grad_b = _layer()
    da, db = riemannian_directions(
        a=a, b=b, grad_a=grad_a, grad_b=grad_b, scale=scale, damping=EXACT
    )
    s = scale[:, None, None]
    w_step = s * (b @ da + db @ a)
    expected = _projector(b) @ big_g + big_g @ _projector(a.mT)
    torch.testing.assert_close(w_step, expected, rtol=1e-9, atol=1e-10)


def test_adaprelora_with_unit_weights_is_the_tangent_space_projection() -> None:
    a, b, big_g, scale, grad_a, grad_b = _layer()
    unit = AdafactorWeights(left=torch.ones(3, 7), right=torch.ones(3, 5))
    da, db = adaprelora_directions(
        a=a, b=b, grad_a=grad_a, grad_b=grad_b, scale=scale, weights=unit, damping=EXACT
    )
    s = scale[:, None, None]
    p_b, p_a = _projector(b), _projector(a.mT)
    expected = p_b @ big_g + big_g @ p_a - p_b @ big_g @ p_a
    torch.testing.assert_close(s * (b @ da + db @ a), expected, rtol=1e-9, atol=1e-10)


def test_adaprelora_solves_the_weighted_normal_equations_with_an_even_split() -> None:
    a, b, _, scale, grad_a, grad_b = _layer(seed=3)
    gen = torch.Generator().manual_seed(1)
    left = torch.rand(3, 7, generator=gen, dtype=torch.float64) + 0.2
    right = torch.rand(3, 5, generator=gen, dtype=torch.float64) + 0.2
    weights = AdafactorWeights(left=left, right=right)
    da, db = adaprelora_directions(
        a=a, b=b, grad_a=grad_a, grad_b=grad_b, scale=scale, weights=weights, damping=EXACT
    )
    s = scale[:, None, None]
    w_step = s * (b @ da + db @ a)
    weighted = left[:, :, None] * w_step * right[:, None, :]  # L dW R
    # normal equations of min |L^1/2 (dW - L^-1 G R^-1) R^1/2|: B^T L dW R = B^T G, L dW R A^T = G A^T
    torch.testing.assert_close(b.mT @ weighted, grad_a / s, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(weighted @ a.mT, grad_b / s, rtol=1e-9, atol=1e-10)
    # the chosen member of the solution family splits the overlap evenly: B dA and dB A carry
    # the same H-weighted share, so B^T L (B dA - dB A) R A^T = 0
    imbalance = left[:, :, None] * (b @ da - db @ a) * right[:, None, :]
    torch.testing.assert_close(b.mT @ imbalance @ a.mT, torch.zeros(3, 2, 2, dtype=torch.float64))


def test_adaprelora_h_weighted_projection_is_exact_on_the_tangent_space() -> None:
    # a direction D already in the tangent space is reproduced exactly
    a, b, _, scale, _, _ = _layer(seed=5)
    gen = torch.Generator().manual_seed(2)
    left = torch.rand(3, 7, generator=gen, dtype=torch.float64) + 0.5
    right = torch.rand(3, 5, generator=gen, dtype=torch.float64) + 0.5
    s = scale[:, None, None]
    x = torch.randn(3, 2, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(3, 7, 2, generator=gen, dtype=torch.float64)
    direction = b @ x + y @ a
    big_g = left[:, :, None] * direction * right[:, None, :]  # D = L^-1 G R^-1
    da, db = adaprelora_directions(
        a=a,
        b=b,
        grad_a=s * b.mT @ big_g,
        grad_b=s * big_g @ a.mT,
        scale=scale,
        weights=AdafactorWeights(left=left, right=right),
        damping=EXACT,
    )
    torch.testing.assert_close(s * (b @ da + db @ a), direction, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("relative", [0.0, 0.05])
def test_scaled_gd_w_trajectory_is_invariant_to_rebalancing_the_factors(relative: float) -> None:
    target = torch.randn(6, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def trajectory(c: float, *, precondition: bool) -> list[torch.Tensor]:
        a, b, _, _, _, _ = _layer(k=1, m=6, n=4, r=2, seed=9)
        b, a = c * b, a / c
        scale = torch.tensor([0.5], dtype=torch.float64)
        out = []
        for _ in range(5):
            w = 0.5 * b[0] @ a[0]
            big_g = (w - target)[None]
            grad_a, grad_b = 0.5 * b.mT @ big_g, 0.5 * big_g @ a.mT
            if precondition:
                grad_a, grad_b = riemannian_directions(
                    a=a,
                    b=b,
                    grad_a=grad_a,
                    grad_b=grad_b,
                    scale=scale,
                    damping=Damping(relative=relative, absolute=0.0),
                )
            a, b = a - 0.1 * grad_a, b - 0.1 * grad_b
            out.append(0.5 * b[0] @ a[0])
        return out

    for w_1, w_c in zip(
        trajectory(1.0, precondition=True), trajectory(7.0, precondition=True), strict=True
    ):
        torch.testing.assert_close(w_1, w_c, rtol=1e-9, atol=1e-11)
    plain_1, plain_c = trajectory(1.0, precondition=False), trajectory(7.0, precondition=False)
    assert (plain_1[-1] - plain_c[-1]).abs().max() > 1e-2  # plain GD is not invariant


def test_failed_factorisation_falls_back_to_the_identity() -> None:
    spd = torch.tensor([[4.0, 1.0, 0.5], [1.0, 3.0, 0.2], [0.5, 0.2, 2.0]])
    indefinite_late = spd.clone()
    indefinite_late[2, 2] = -2.0  # the factorisation fails at the last pivot, after real work
    grams = torch.stack(
        [
            spd,
            torch.full((3, 3), float("nan")),
            torch.zeros(3, 3),
            indefinite_late,
            torch.tensor([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]]),
            spd.clone().fill_diagonal_(float("inf")),
        ]
    )
    inverse = damped_inverse(grams, Damping(relative=0.0, absolute=0.0))
    assert torch.isfinite(inverse).all()
    torch.testing.assert_close(inverse[0], torch.linalg.inv(spd))
    for failed in range(1, len(grams)):
        torch.testing.assert_close(inverse[failed], torch.eye(3))
    # with damping the zero Gram factorises: lam I, inverted; the others still fail
    inverse = damped_inverse(grams, Damping(relative=0.0, absolute=0.5))
    torch.testing.assert_close(inverse[2], torch.eye(3) * 2)
    torch.testing.assert_close(inverse[0], torch.linalg.inv(spd + 0.5 * torch.eye(3)))
    for failed in (1, 3, 4, 5):
        torch.testing.assert_close(inverse[failed], torch.eye(3))


def test_relative_damping_is_a_fraction_of_the_mean_eigenvalue() -> None:
    gram = torch.diag(torch.tensor([4.0, 2.0], dtype=torch.float64))[None]
    inverse = damped_inverse(gram, Damping(relative=0.5, absolute=0.25))
    lam = 0.5 * 3.0 + 0.25  # mean eigenvalue 3
    expected = torch.diag(torch.tensor([1 / (4 + lam), 1 / (2 + lam)], dtype=torch.float64))
    torch.testing.assert_close(inverse[0], expected)


def test_computes_in_float32_for_half_precision_inputs() -> None:
    a, b, _, scale, grad_a, grad_b = _layer()
    half = {
        name: t.to(torch.bfloat16)
        for name, t in {"a": a, "b": b, "grad_a": grad_a, "grad_b": grad_b}.items()
    }
    da, db = riemannian_directions(**half, scale=scale.float(), damping=Damping())
    assert da.dtype == torch.float32 and db.dtype == torch.float32
    reference, _ = riemannian_directions(
        **{k: v.double() for k, v in half.items()}, scale=scale, damping=Damping()
    )
    torch.testing.assert_close(da.double(), reference, rtol=1e-4, atol=1e-5)


# -- the training pass: stacked in the compute dtype, written back into each Parameter's .grad ----


def _pairs(
    dtype: torch.dtype, seed: int = 11
) -> list[tuple[list[tuple[nn.Parameter, nn.Parameter]], torch.Tensor, AdafactorWeights]]:
    """Shape groups of Parameters with gradients, as the preconditioner stacks them: three of
    rank 2, one of rank 3, and a Conv2d one (A: (r, in, 3, 3), B: (out, r, 1, 1)), with each
    group's s and Adafactor weights from random moments."""
    gen = torch.Generator().manual_seed(seed)

    def param(*shape: int) -> nn.Parameter:
        weight = nn.Parameter(torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype))
        weight.grad = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
        return weight

    groups = []
    for k, a_shape, b_shape in [
        (3, (2, 5), (7, 2)),
        (4, (2, 6), (9, 2)),
        (1, (2, 4), (5, 2)),
        (2, (3, 8), (8, 3)),
        (2, (2, 4, 3, 3), (6, 2, 1, 1)),
    ]:
        pairs = [(param(*a_shape), param(*b_shape)) for _ in range(k)]
        scale = torch.rand(k, generator=gen) + 0.5
        m, n = b_shape[0], math.prod(a_shape[1:])
        rows, cols = torch.rand(k, m, generator=gen) + 0.1, torch.rand(k, n, generator=gen) + 0.1
        groups.append((pairs, scale, AdafactorWeights.from_moments(rows, cols)))
    return groups


def _expected(
    pairs: list[tuple[nn.Parameter, nn.Parameter]],
    scale: torch.Tensor,
    weights: AdafactorWeights | None,
    damping: Damping,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference in float64 from the same (possibly rounded) values."""

    def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([t.detach().double().flatten(1) for t in tensors])

    inputs = {
        "a": stack([a for a, _ in pairs]),
        "b": stack([b for _, b in pairs]),
        "grad_a": stack([a.grad for a, _ in pairs]),
        "grad_b": stack([b.grad for _, b in pairs]),
        "scale": scale.double(),
        "damping": damping,
    }
    if weights is None:
        return riemannian_directions(**inputs)
    return adaprelora_directions(**inputs, weights=weights)


def _assert_pass_equals_reference(
    dtype: torch.dtype, method: str, damping: Damping, tolerance: dict, break_layers=None
) -> list:
    groups = _pairs(dtype)
    if break_layers is not None:
        break_layers(groups)
    expected, pass_groups = [], []
    for pairs, scale, weights in groups:
        chosen = weights if method == "adaprelora" else None
        expected.append(_expected(pairs, scale, chosen, damping))
        pass_groups.append(PairGroup(pairs=pairs, scale=scale, weights=chosen))
    precondition_pairs_(pass_groups, damping=damping)  # one call: Grams of one rank join
    for (pairs, _, _), (direction_a, direction_b) in zip(groups, expected, strict=True):
        for (a, b), want_a, want_b in zip(pairs, direction_a, direction_b, strict=True):
            assert a.grad.dtype == dtype and a.grad.shape == a.shape
            torch.testing.assert_close(
                a.grad.double().flatten(1), want_a, equal_nan=True, **tolerance
            )
            torch.testing.assert_close(
                b.grad.double().flatten(1), want_b, equal_nan=True, **tolerance
            )
    return groups


EXACT_TOLERANCE = {"rtol": 1e-10, "atol": 1e-12}
# float32 algebra, then one rounding to bf16 (relative error at most 2^-9)
BF16_TOLERANCE = {"rtol": 4e-3, "atol": 1e-6}


@pytest.mark.parametrize("method", ["riemannian", "adaprelora"])
@pytest.mark.parametrize("damping", [EXACT, Damping()], ids=["undamped", "default-damping"])
def test_the_pass_equals_the_float64_reference(method: str, damping: Damping) -> None:
    def zero_b(groups: list) -> None:  # B = 0: S_B is singular; undamped, its Cholesky fails
        with torch.no_grad():
            groups[0][0][1][1].zero_()

    groups = _assert_pass_equals_reference(
        torch.float64, method, damping, EXACT_TOLERANCE, break_layers=zero_b
    )
    for pairs, _, _ in groups:
        assert all(torch.isfinite(p.grad).all() for pair in pairs for p in pair)


@pytest.mark.parametrize("method", ["riemannian", "adaprelora"])
def test_the_pass_on_bf16_factors_computes_in_float32(method: str) -> None:
    _assert_pass_equals_reference(torch.bfloat16, method, Damping(), BF16_TOLERANCE)


def test_a_nan_weight_spoils_only_its_own_rows() -> None:
    """A NaN Adafactor weight of one row makes S_B non-finite (identity instead): that layer's
    rows of dB are NaN, as in the reference, and nothing else is."""

    def nan_weight(groups: list) -> None:
        groups[1][2].left[0, 2] = float("nan")

    groups = _assert_pass_equals_reference(
        torch.float64, "adaprelora", EXACT, EXACT_TOLERANCE, break_layers=nan_weight
    )
    a, b = groups[1][0][0]
    assert torch.isnan(b.grad[2]).all() and torch.isfinite(a.grad).all()
    assert torch.isfinite(b.grad[[0, 1, 3, 4, 5, 6, 7, 8]]).all()
    others = [p for pairs, _, _ in groups for pair in pairs for p in pair]
    assert sum(not torch.isfinite(p.grad).all() for p in others) == 1


def test_a_missing_gradient_counts_as_zero_and_stays_missing() -> None:
    (pairs, scale, _), *_ = _pairs(torch.float64)
    missing = pairs[1][1]  # B of layer 1 took no gradient this step
    missing.grad = torch.zeros_like(missing)
    expected_a, expected_b = _expected(pairs, scale, None, Damping())
    missing.grad = None
    precondition_pairs_([PairGroup(pairs=pairs, scale=scale)], damping=Damping())
    assert missing.grad is None
    for (a, b), want_a, want_b in zip(pairs, expected_a, expected_b, strict=True):
        torch.testing.assert_close(a.grad.flatten(1), want_a, **EXACT_TOLERANCE)
        if b is not missing:
            torch.testing.assert_close(b.grad.flatten(1), want_b, **EXACT_TOLERANCE)
