"""The two factor updates, each written once, batched over k LoRA layers of one shape.

Training calls them in float32 on the stacked factors of each shape group, with the r x r Grams
of all groups inverted in one batched call; the tests call the same functions in float64 and check them against explicit linear algebra (solves, projections, normal
equations), so the pass and its reference cannot drift apart.

Shapes: A (k, r, n), B (k, m, r), g_A like A, g_B like B, s (k,). A LoRA adds `s B A` to W, so
with G = dL/dW the factor gradients are `g_A = s B^T G` and `g_B = s G A^T`. Conv2d factors are
flattened to these matrices by the caller. Results come back in the compute dtype: float32, or
float64 for float64 inputs (a bf16 Gram keeps about three significant digits). Nothing here reads
a tensor value on the host, so a step never waits for the GPU.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

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
    # a failed factorisation's partial factor gives garbage here, which the mask below replaces
    inverse_factor = torch.linalg.solve_triangular(factor, eye, upper=False)
    inverse = inverse_factor.mT @ inverse_factor
    usable = (info == 0) & torch.isfinite(inverse.sum(dim=(-2, -1)))
    return torch.where(usable[:, None, None], inverse, eye)


def damped_inverses(grams: Sequence[torch.Tensor], damping: Damping) -> list[torch.Tensor]:
    """`damped_inverse` of several stacks, one call for all stacks of one size, dtype and device.

    The shape groups of a network mostly share the rank, so a step inverts all its Grams at once
    instead of paying one factorisation call per group; the damping is per Gram, so joining the
    stacks changes no number."""
    joined: dict[tuple, list[int]] = defaultdict(list)
    for index, gram in enumerate(grams):
        joined[(gram.shape[-1], gram.dtype, gram.device)].append(index)
    inverses: list[torch.Tensor] = [torch.empty(0)] * len(grams)
    for indices in joined.values():
        parts = damped_inverse(torch.cat([grams[i] for i in indices]), damping)
        sizes = [grams[i].shape[0] for i in indices]
        for index, part in zip(indices, parts.split(sizes), strict=True):
            inverses[index] = part
    return inverses


@dataclass(frozen=True)
class Factors:
    """k same-shaped layers' A (k, r, n), B (k, m, r) and s (k,), in the compute dtype."""

    a: torch.Tensor
    b: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def of(cls, *, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> Factors:
        dtype = compute_dtype(a.dtype)
        return cls(a=a.to(dtype), b=b.to(dtype), scale=scale.to(dtype))

    @property
    def squares(self) -> torch.Tensor:
        """s^2 as (k, 1, 1), to scale a stack of Grams."""
        return self.scale.square()[:, None, None]

    def join(self, b_side: torch.Tensor, a_side: torch.Tensor) -> torch.Tensor:
        """(2k, r, r): s^2 times the k B-side Grams, then s^2 times the k A-side ones."""
        return (torch.stack([b_side, a_side]) * self.squares).flatten(0, 1)


class Method(Protocol):
    """One factor update in two parts: the r x r Grams it inverts, then the directions from
    their inverses. Split so that a step inverts the Grams of every shape group together, while
    holding only one group's stacked gradients at a time."""

    reads_factors: bool  # whether `directions` needs the factors as well as the gradients

    def grams(self, f: Factors) -> torch.Tensor:
        """(2k, r, r): the B-side Grams of the k layers, then their A-side Grams."""
        ...

    def directions(
        self, inverse: torch.Tensor, grad_a: torch.Tensor, grad_b: torch.Tensor, f: Factors | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(dA, dB) from the damped inverses and the gradients, in the compute dtype."""
        ...


def directions_of(
    method: Method, f: Factors, grad_a: torch.Tensor, grad_b: torch.Tensor, damping: Damping
) -> tuple[torch.Tensor, torch.Tensor]:
    """`method`'s directions for one stack of layers."""
    inverse = damped_inverse(method.grams(f), damping)
    return method.directions(inverse, grad_a.to(f.a.dtype), grad_b.to(f.a.dtype), f)


class Riemannian:
    """Scaled gradient descent on the factors (Zhang & Pilanci 2024):
    `dA = (s^2 B^T B + lam I)^-1 g_A` and `dB = g_B (s^2 A A^T + lam I)^-1`.

    With s inside the Grams and lam -> 0 the W-step `s (B dA + dB A)` is `P_B G + G P_A`, whatever
    alpha, the rank or the split of W between the factors; an SGD learning rate keeps its meaning.
    """

    reads_factors = False

    def grams(self, f: Factors) -> torch.Tensor:
        return f.join(f.b.mT @ f.b, f.a @ f.a.mT)

    def directions(
        self, inverse: torch.Tensor, grad_a: torch.Tensor, grad_b: torch.Tensor, f: Factors | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k = grad_a.shape[0]
        return inverse[:k] @ grad_a, grad_b @ inverse[k:]


def riemannian_directions(
    *,
    a: torch.Tensor,
    b: torch.Tensor,
    grad_a: torch.Tensor,
    grad_b: torch.Tensor,
    scale: torch.Tensor,
    damping: Damping,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`Riemannian` directions of one stack of layers."""
    f = Factors.of(a=a, b=b, scale=scale)
    return directions_of(Riemannian(), f, grad_a, grad_b, damping)


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


@dataclass(frozen=True)
class AdaPreLoRA:
    """AdaPreLoRA: the factor step whose W-step is the H-weighted projection of the Adafactor
    direction `L^-1 G R^-1` onto the tangent space at W, with the overlap split evenly:

        dA = S_B^-1 g_A R^-1 - 1/2 s^2 S_B^-1 (g_A A^T) S_A^-1 A
        dB = L^-1 g_B S_A^-1 - 1/2 s^2 B S_B^-1 (B^T g_B) S_A^-1

    with `S_B = s^2 B^T L B + lam I` and `S_A = s^2 A R A^T + lam I` (derivation in
    shared/reference/preconditioning.md). With L = R = I and lam -> 0 the W-step is the Frobenius
    projection `P_B G + G P_A - P_B G P_A`.
    """

    weights: AdafactorWeights
    reads_factors = True

    def _weights(self, f: Factors) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weights.left.to(f.a.dtype), self.weights.right.to(f.a.dtype)

    def grams(self, f: Factors) -> torch.Tensor:
        left, right = self._weights(f)
        return f.join(f.b.mT @ (left[:, :, None] * f.b), (f.a * right[:, None, :]) @ f.a.mT)

    def directions(
        self, inverse: torch.Tensor, grad_a: torch.Tensor, grad_b: torch.Tensor, f: Factors | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        left, right = self._weights(f)
        k = grad_a.shape[0]
        inv_b, inv_a = inverse[:k], inverse[k:]
        # -1/2 s^2 S_B^-1 C S_A^-1 for the r x r overlaps C_A = g_A A^T and C_B = B^T g_B at once
        overlaps = torch.stack([grad_a @ f.a.mT, f.b.mT @ grad_b])
        corrections = (inv_b @ overlaps @ inv_a) * (-0.5 * f.squares)
        direction_a = inv_b @ (grad_a / right[:, None, :]) + corrections[0] @ f.a
        direction_b = (grad_b / left[:, :, None]) @ inv_a + f.b @ corrections[1]
        return direction_a, direction_b


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
    """`AdaPreLoRA` directions of one stack of layers."""
    f = Factors.of(a=a, b=b, scale=scale)
    return directions_of(AdaPreLoRA(weights), f, grad_a, grad_b, damping)
