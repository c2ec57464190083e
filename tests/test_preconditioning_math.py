"""Both preconditioners against explicit float64 linear algebra on small random matrices."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from modules.lora.preconditioning import adaprelora, linalg
from modules.lora.preconditioning.adaprelora import (
    AdafactorWeights,
    adaprelora_directions,
    adaprelora_precondition_,
)
from modules.lora.preconditioning.linalg import (
    Damping,
    damped_inverse,
    riemannian_directions,
    riemannian_precondition_,
)

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


@pytest.mark.parametrize("potri", [True, False], ids=["potri", "triangular-solve"])
def test_failed_factorisation_and_zero_partner_fall_back_to_the_identity(potri: bool) -> None:
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
    inverse = damped_inverse(
        grams, Damping(relative=0.0, absolute=0.0, identity_below=1e-6), potri=potri
    )
    assert torch.isfinite(inverse).all()
    torch.testing.assert_close(inverse[0], torch.linalg.inv(spd))
    for failed in range(1, len(grams)):
        torch.testing.assert_close(inverse[failed], torch.eye(3))
    # without the small-Gram fallback only the zero Gram changes: it factorises with lam > 0
    inverse = damped_inverse(grams, Damping(relative=0.0, absolute=0.5), potri=potri)
    torch.testing.assert_close(inverse[2], torch.eye(3) * 2)
    for failed in (1, 3, 4, 5):
        torch.testing.assert_close(inverse[failed], torch.eye(3))


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


@dataclass
class _Stacks:
    a: torch.Tensor
    b: torch.Tensor
    grad_a: torch.Tensor
    grad_b: torch.Tensor
    scale: torch.Tensor


def _groups(dtype: torch.dtype, seed: int = 11) -> tuple[list[_Stacks], list[AdafactorWeights]]:
    """Random groups: three of rank 2 (one batch), one of rank 3, and a Conv2d-shaped one
    (n = in * kh * kw), with Adafactor weights from random moments."""
    gen = torch.Generator().manual_seed(seed)
    groups, weights = [], []
    for k, m, n, r in [
        (3, 7, 5, 2),
        (4, 9, 6, 2),
        (1, 5, 4, 2),
        (2, 8, 8, 3),
        (2, 6, 4 * 3 * 3, 2),
    ]:

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen, dtype=torch.float64)

        stacks = _Stacks(rand(k, r, n), rand(k, m, r), rand(k, r, n), rand(k, m, r), rand(k).abs())
        for name in ("a", "b", "grad_a", "grad_b"):
            setattr(stacks, name, getattr(stacks, name).to(dtype))
        groups.append(stacks)
        rows = torch.rand(k, m, generator=gen) + 0.1
        weights.append(AdafactorWeights.from_moments(rows, torch.rand(k, n, generator=gen) + 0.1))
    return groups, weights


def _references(
    groups: list[_Stacks], weights: list[AdafactorWeights], damping: Damping
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        adaprelora_directions(
            a=g.a.double(),
            b=g.b.double(),
            grad_a=g.grad_a.double(),
            grad_b=g.grad_b.double(),
            scale=g.scale,
            weights=w,
            damping=damping,
        )
        for g, w in zip(groups, weights, strict=True)
    ]


@pytest.fixture(params=[None, 40], ids=["whole-groups", "chunks"])
def chunks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-place passes on whole groups, and in chunks of a few layers (AdaPreLoRA's: 40
    entries; the Riemannian pass's: 160), several per group, with scratch buffers that grow
    from group to group."""
    if request.param is not None:
        monkeypatch.setattr(linalg, "CPU_CHUNK_ELEMENTS", request.param * adaprelora.CHUNK_DIVISOR)


@pytest.fixture(params=[None, 4], ids=["whole-grams", "pieced-grams"])
def gram_pieces(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Grams in one product per layer (the CPU's way), and as sums of partial Grams over
    pieces of the inner dimension (a GPU's way; pieces of 4, or 2 where 4 does not divide)."""
    monkeypatch.setattr(linalg, "gram_piece", lambda device: request.param)


@pytest.mark.usefixtures("chunks", "gram_pieces")
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_riemannian_in_place_pass_equals_the_reference(dtype: torch.dtype) -> None:
    groups, _ = _groups(dtype)
    groups[0].b[1] = 0.0  # B = 0: S_B's factorisation fails undamped; its g_A passes through
    for damping in (EXACT, Damping()):
        expected = [
            riemannian_directions(
                a=g.a.double(),
                b=g.b.double(),
                grad_a=g.grad_a.double(),
                grad_b=g.grad_b.double(),
                scale=g.scale,
                damping=damping,
            )
            for g in groups
        ]
        saved = [(g.grad_a.clone(), g.grad_b.clone()) for g in groups]
        riemannian_precondition_(groups, damping)
        # float64: the same algebra; bf16: float32 algebra, then one rounding to bf16
        tolerance = {"rtol": 1e-10, "atol": 1e-12}
        if dtype == torch.bfloat16:
            tolerance = {"rtol": 4e-3, "atol": 1e-6}
        for group, (da, db) in zip(groups, expected, strict=True):
            assert group.grad_a.dtype == dtype and group.grad_b.dtype == dtype
            torch.testing.assert_close(group.grad_a.double(), da, **tolerance)
            torch.testing.assert_close(group.grad_b.double(), db, **tolerance)
        for group, (grad_a, grad_b) in zip(groups, saved, strict=True):
            group.grad_a.copy_(grad_a)
            group.grad_b.copy_(grad_b)


@pytest.mark.usefixtures("chunks")
def test_adaprelora_in_place_pass_equals_the_reference() -> None:
    groups, weights = _groups(torch.float64)
    # layer 1 of group 0: B = 0, so S_B is singular and (undamped) its Cholesky fails;
    # layer 0 of group 1: a NaN weight (its rows of dB are NaN in both, nothing else is)
    groups[0].b[1] = 0.0
    weights[1].left[0, 2] = float("nan")
    damping = Damping(relative=0.0, absolute=0.0)
    expected = _references(groups, weights, damping)
    adaprelora_precondition_(groups, weights, damping)
    for group, (da, db) in zip(groups, expected, strict=True):
        torch.testing.assert_close(group.grad_a, da, rtol=1e-10, atol=1e-12, equal_nan=True)
        torch.testing.assert_close(group.grad_b, db, rtol=1e-10, atol=1e-12, equal_nan=True)
    assert torch.isnan(groups[1].grad_b[0, 2]).all() and torch.isfinite(groups[1].grad_a).all()
    assert torch.isfinite(groups[0].grad_a).all() and torch.isfinite(groups[0].grad_b).all()


def test_adaprelora_in_place_pass_with_damping_and_identity_fallback() -> None:
    groups, weights = _groups(torch.float64, seed=12)
    groups[2].a.mul_(1e-6)  # A's Gram below identity_below: g_B keeps L^-1 g_B's shape
    damping = Damping(relative=0.05, absolute=1e-4, identity_below=1e-3)
    expected = _references(groups, weights, damping)
    adaprelora_precondition_(groups, weights, damping)
    for group, (da, db) in zip(groups, expected, strict=True):
        torch.testing.assert_close(group.grad_a, da, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(group.grad_b, db, rtol=1e-10, atol=1e-12)


@pytest.mark.usefixtures("chunks")
def test_adaprelora_in_place_pass_on_bf16_computes_in_float32() -> None:
    groups, weights = _groups(torch.bfloat16)
    damping = Damping()
    expected = _references(groups, weights, damping)  # float64 from the same bf16 values
    adaprelora_precondition_(groups, weights, damping)
    for group, (da, db) in zip(groups, expected, strict=True):
        assert group.grad_a.dtype == torch.bfloat16 and group.grad_b.dtype == torch.bfloat16
        # float32 algebra, then one rounding to bf16 (relative error at most 2^-9)
        torch.testing.assert_close(group.grad_a.double(), da, rtol=4e-3, atol=1e-6)
        torch.testing.assert_close(group.grad_b.double(), db, rtol=4e-3, atol=1e-6)
