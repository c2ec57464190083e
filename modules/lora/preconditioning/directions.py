"""The two factor updates, each written once, batched over k LoRA layers of one shape.

Training calls them in float32 on the stacked factors of a shape group; the tests call the same
functions in float64 and check them against explicit linear algebra (solves, projections, normal
equations), so the pass and its reference cannot drift apart.

Shapes: A (k, r, n), B (k, m, r), g_A like A, g_B like B, s (k,). A LoRA adds `s B A` to W, so
with G = dL/dW the factor gradients are `g_A = s B^T G` and `g_B = s G A^T`. Conv2d factors are
flattened to these matrices by the caller. Results come back in the compute dtype: float32, or
float64 for float64 inputs (a bf16 Gram keeps about three significant digits). Nothing here reads
a tensor value on the host, so a step never waits for the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Damping:
    """`lam = relative * mean eigenvalue of the Gram + absolute`, added to the Gram's diagonal.

    Relative damping grows with the partner factor, so the B = 0 start (g_A is exactly zero at
    step 1, B^T B tiny at step 2) needs no special case, and it keeps the rebalancing invariance
    of scaled gradient descent (evidence in docs/benchmarks.md)."""

    relative: float = 0.1
    absolute: float = 1e-8


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def damped_inverse(grams: torch.Tensor, damping: Damping) -> torch.Tensor:
    """`(gram + lam I)^-1` for a stack of symmetric positive semi-definite r x r Grams.

    Through a Cholesky factorisation and a triangular solve. Where the factorisation fails or the
    inverse is not finite (a NaN or inf weight, an undamped singular Gram) the layer gets the
    identity, so its gradient passes unchanged instead of turning into NaN. Decided by masks, not
    by branching on a value: `torch.cholesky_inverse` would check for singularity on the host.
    """
    r = grams.shape[-1]
    eye = torch.eye(r, dtype=grams.dtype, device=grams.device).expand_as(grams)
    lam = damping.relative * grams.diagonal(dim1=-2, dim2=-1).mean(-1) + damping.absolute
    factor, info = torch.linalg.cholesky_ex(grams + lam[:, None, None] * eye)
    failed = (info != 0)[:, None, None]
    # a failed factorisation leaves a partial factor with zero pivots: solve against I instead
    factor = torch.where(failed, eye, factor)
    inverse_factor = torch.linalg.solve_triangular(factor, eye, upper=False)
    inverse = inverse_factor.mT @ inverse_factor
    usable = ~failed & torch.isfinite(inverse.sum(dim=(-2, -1)))[:, None, None]
    return torch.where(usable, inverse, eye)


def _in_compute_dtype(*tensors: torch.Tensor) -> list[torch.Tensor]:
    dtype = compute_dtype(tensors[0].dtype)
    return [tensor.to(dtype) for tensor in tensors]


def riemannian_directions(
    *,
    a: torch.Tensor,
    b: torch.Tensor,
    grad_a: torch.Tensor,
    grad_b: torch.Tensor,
    scale: torch.Tensor,
    damping: Damping,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled gradient descent on the factors (Zhang & Pilanci 2024):
    `dA = (s^2 B^T B + lam I)^-1 g_A` and `dB = g_B (s^2 A A^T + lam I)^-1`.

    With s inside the Grams and lam -> 0 the W-step `s (B dA + dB A)` is `P_B G + G P_A`, whatever
    alpha, the rank or the split of W between the factors; an SGD learning rate keeps its meaning.
    """
    a, b, grad_a, grad_b, scale = _in_compute_dtype(a, b, grad_a, grad_b, scale)
    k = a.shape[0]
    squares = scale.square().repeat(2)[:, None, None]
    inverse = damped_inverse(torch.cat([b.mT @ b, a @ a.mT]) * squares, damping)
    return inverse[:k] @ grad_a, grad_b @ inverse[k:]


@dataclass(frozen=True)
class AdafactorWeights:
    """Adafactor's diagonal Kronecker factors `L` (k, m) and `R` (k, n): `V = (L R^T)^2`."""

    left: torch.Tensor
    right: torch.Tensor

    @classmethod
    def from_moments(
        cls, rows: torch.Tensor, cols: torch.Tensor, *, floor: float = 1e-3
    ) -> AdafactorWeights:
        """From the row and column second moments of G, (k, m) and (k, n), as Adafactor forms
        `V = rows cols^T / mean(rows)`. Entries are floored at `floor` times their layer's mean, so
        a row the estimate puts near zero cannot blow up its direction."""
        rows = torch.maximum(rows, floor * rows.mean(-1, keepdim=True))
        cols = torch.maximum(cols, floor * cols.mean(-1, keepdim=True))
        norm = rows.mean(-1, keepdim=True).pow(0.25)
        return cls(left=rows.sqrt() / norm, right=cols.sqrt() / norm)


def adaprelora_directions(
    *,
    a: torch.Tensor,
    b: torch.Tensor,
    grad_a: torch.Tensor,
    grad_b: torch.Tensor,
    scale: torch.Tensor,
    weights: AdafactorWeights,
    damping: Damping,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AdaPreLoRA: the factor step whose W-step is the H-weighted projection of the Adafactor
    direction `L^-1 G R^-1` onto the tangent space at W, with the overlap split evenly:

        dA = S_B^-1 g_A R^-1 - 1/2 s^2 S_B^-1 (g_A A^T) S_A^-1 A
        dB = L^-1 g_B S_A^-1 - 1/2 s^2 B S_B^-1 (B^T g_B) S_A^-1

    with `S_B = s^2 B^T L B + lam I` and `S_A = s^2 A R A^T + lam I` (derivation in
    shared/reference/preconditioning.md). With L = R = I and lam -> 0 the W-step is the Frobenius
    projection `P_B G + G P_A - P_B G P_A`.
    """
    a, b, grad_a, grad_b, scale = _in_compute_dtype(a, b, grad_a, grad_b, scale)
    left, right = weights.left.to(a.dtype), weights.right.to(a.dtype)
    k = a.shape[0]
    squares = scale.square()[:, None, None]
    grams = torch.cat([b.mT @ (left[:, :, None] * b), (a * right[:, None, :]) @ a.mT])
    inverse = damped_inverse(grams * squares.repeat(2, 1, 1), damping)
    inv_b, inv_a = inverse[:k], inverse[k:]
    # -1/2 s^2 S_B^-1 C S_A^-1 for the r x r overlaps C_A = g_A A^T and C_B = B^T g_B at once
    overlaps = torch.stack([grad_a @ a.mT, b.mT @ grad_b])
    corrections = (inv_b @ overlaps @ inv_a) * (-0.5 * squares)
    direction_a = inv_b @ (grad_a / right[:, None, :]) + corrections[0] @ a
    direction_b = (grad_b / left[:, :, None]) @ inv_a + b @ corrections[1]
    return direction_a, direction_b
