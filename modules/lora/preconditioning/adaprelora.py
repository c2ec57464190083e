"""AdaPreLoRA's factor step: Adafactor-weighted Grams, then an evenly split tangent projection.

`adaprelora_directions` is the readable out-of-place reference; `adaprelora_precondition_` is the
pass the optimizer hook runs, equal to it up to rounding. The pass never scales or weights a whole
stack: with `C_A = g_A A^T` and `C_B = B^T g_B` (r x r) the directions regroup as

    dA = S_B^-1 (g_A R^-1) - 1/2 s^2 (S_B^-1 C_A S_A^-1) A
    dB = (L^-1 g_B) S_A^-1 - 1/2 s^2 B (S_B^-1 C_B S_A^-1)

so one read of A, B and the gradients gives every r x r matrix (Grams and C), the inverses of
many groups are taken in one batched call, and a second read writes the directions over the
gradients in cache-sized chunks of whole layers. Same conventions as `linalg`: float32 (float64
for float64 inputs), no host sync.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from modules.lora.preconditioning.linalg import (
    Damping,
    FactorStacks,
    Scratch,
    chunk_elements,
    compute_dtype,
    damped_inverse,
    layer_slices,
    rank_batches,
)

# the pass's chunks, as a fraction of `linalg.CPU_CHUNK_ELEMENTS` (see `adaprelora_precondition_`)
CHUNK_DIVISOR = 4


@dataclass(frozen=True)
class AdafactorWeights:
    """Diagonal Kronecker weights `L` (k, m) and `R` (k, n) with `V = (L R^T)^2` (reference s.4)."""

    left: torch.Tensor
    right: torch.Tensor

    @classmethod
    def from_moments(
        cls, rows: torch.Tensor, cols: torch.Tensor, *, floor: float = 1e-3
    ) -> AdafactorWeights:
        """From Adafactor's row and column second moments (k, m) and (k, n).

        Entries are floored at `floor` times their layer's mean so that a row the estimate puts
        near zero cannot blow up its weight; `V = rows cols^T / mean(rows)` as in Adafactor.
        """
        rows = torch.maximum(rows, floor * rows.mean(-1, keepdim=True))
        cols = torch.maximum(cols, floor * cols.mean(-1, keepdim=True))
        norm = rows.mean(-1, keepdim=True).pow(0.25)
        return cls(left=rows.sqrt() / norm, right=cols.sqrt() / norm)


def scaled_factors(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(s A, s B)` in the compute dtype: the factors as the W = s B A product sees them."""
    dtype = compute_dtype(a.dtype)
    s = scale.to(dtype)[:, None, None]
    return a.to(dtype) * s, b.to(dtype) * s


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
    """AdaPreLoRA's factor step: the H-weighted tangent projection of `L^-1 G R^-1`, split evenly.

    `dA = S_B^-1 g_A R^-1 - 1/2 S_B^-1 (g_A sA^T) S_A^-1 sA` and
    `dB = L^-1 g_B S_A^-1 - 1/2 sB S_B^-1 (sB^T g_B) S_A^-1` with `S_B = s^2 B^T L B` and
    `S_A = s^2 A R A^T` (derivation in shared/reference/preconditioning.md, s folded into the
    factors). With L = R = I the W-step is `P_B G + G P_A - P_B G P_A`.
    """
    sa, sb = scaled_factors(a, b, scale)
    dtype = sa.dtype
    left = weights.left.to(dtype)
    right = weights.right.to(dtype)
    inv_b = damped_inverse(sb.mT @ (left[:, :, None] * sb), damping)
    inv_a = damped_inverse((sa * right[:, None, :]) @ sa.mT, damping)
    ga = grad_a.to(dtype)
    gb = grad_b.to(dtype)
    solved_a = inv_b @ ga
    solved_b = gb @ inv_a
    overlap_a = (solved_a @ sa.mT) @ inv_a
    overlap_b = inv_b @ (sb.mT @ solved_b)
    direction_a = solved_a / right[:, None, :] - 0.5 * overlap_a @ sa
    direction_b = solved_b / left[:, :, None] - 0.5 * sb @ overlap_b
    return direction_a, direction_b


def _products_into(
    factor: torch.Tensor,
    weight: torch.Tensor,
    grad: torch.Tensor,
    gram: torch.Tensor,
    cross: torch.Tensor,
    *,
    columns: bool,
    budget: int | None,
    scratch: Scratch,
) -> None:
    """Unscaled r x r products of one factor, read once: columns (B, L): `gram <- B^T L B`,
    `cross <- B^T g_B`; rows (A, R): `gram <- A R A^T`, `cross <- g_A A^T`."""
    dtype = gram.dtype
    for layers in layer_slices(factor.shape[0], factor[0].numel(), budget):
        x = scratch.convert("factor", factor[layers], dtype)
        g = scratch.convert("grad", grad[layers], dtype)
        w = weight[layers, :, None] if columns else weight[layers, None, :]
        weighted = torch.mul(x, w, out=scratch.take("weighted", x.shape, dtype))
        if columns:
            torch.bmm(x.mT, weighted, out=gram[layers])
            torch.bmm(x.mT, g, out=cross[layers])
        else:
            torch.bmm(weighted, x.mT, out=gram[layers])
            torch.bmm(g, x.mT, out=cross[layers])


def _directions_(
    grad: torch.Tensor,
    factor: torch.Tensor,
    reciprocal: torch.Tensor,
    inverse: torch.Tensor,
    correction: torch.Tensor,
    *,
    left: bool,
    budget: int | None,
    scratch: Scratch,
) -> None:
    """In place, a chunk of layers at a time: `g_A <- inverse (g_A R^-1) + correction A` (left)
    or `g_B <- (L^-1 g_B) inverse + B correction`, computed in `inverse`'s dtype.

    The weighted gradient goes to scratch, so a float32 gradient takes the product directly and
    needs no copy back; other dtypes go through a scratch result and are cast once.
    """
    dtype = inverse.dtype
    for layers in layer_slices(grad.shape[0], grad[0].numel(), budget):
        g = grad[layers]
        x = scratch.convert("factor", factor[layers], dtype)
        w = reciprocal[layers, None, :] if left else reciprocal[layers, :, None]
        weighted = torch.mul(g, w, out=scratch.take("weighted", g.shape, dtype))
        out = g if g.dtype == dtype else scratch.take("result", g.shape, dtype)
        if left:
            torch.bmm(inverse[layers], weighted, out=out)
            out.baddbmm_(correction[layers], x)
        else:
            torch.bmm(weighted, inverse[layers], out=out)
            out.baddbmm_(x, correction[layers])
        if out is not g:
            g.copy_(out)


def adaprelora_precondition_(
    groups: Sequence[FactorStacks], weights: Sequence[AdafactorWeights], damping: Damping
) -> None:
    """`adaprelora_directions` of every group with its weights, written over its gradients (in
    their dtype).

    Two reads of A, B and the gradients and one write of the gradients, in cache-sized chunks on
    the CPU; the r x r algebra of all groups of one rank (inverses, `S_B^-1 C S_A^-1`) is batched.
    """
    for indices in rank_batches(groups):
        first = groups[indices[0]].a
        r, device, dtype = first.shape[1], first.device, compute_dtype(first.dtype)
        budget = chunk_elements(device)
        if budget is not None:
            # three chunk-sized operands at once here (gradient, weighted copy, factor) where
            # `multiply_` has two: a quarter of its chunk stays in cache (about 5% faster than
            # the full chunk on this 2-core machine, 1 MiB to 2 MiB within noise)
            budget //= CHUNK_DIVISOR
        scratch = Scratch(device)
        sizes = [groups[index].a.shape[0] for index in indices]
        total = sum(sizes)
        offsets = [sum(sizes[:position]) for position in range(len(indices))]
        # [0]: S_B and C_A, [1]: S_A and C_B, so that one broadcast product pairs them up
        grams = torch.empty(2, total, r, r, dtype=dtype, device=device)
        cross = torch.empty(2, total, r, r, dtype=dtype, device=device)
        squares = torch.cat([groups[index].scale for index in indices]).to(dtype).square()
        for index, offset, k in zip(indices, offsets, sizes, strict=True):
            group, layers = groups[index], slice(offset, offset + k)
            common = {"budget": budget, "scratch": scratch}
            left, right = weights[index].left.to(dtype), weights[index].right.to(dtype)
            _products_into(
                group.b,
                left,
                group.grad_b,
                grams[0, layers],
                cross[1, layers],
                columns=True,
                **common,
            )
            _products_into(
                group.a,
                right,
                group.grad_a,
                grams[1, layers],
                cross[0, layers],
                columns=False,
                **common,
            )
        grams.mul_(squares[:, None, None])
        inverse = damped_inverse(grams.view(2 * total, r, r), damping).view(2, total, r, r)
        inv_b, inv_a = inverse[0], inverse[1]
        # -1/2 s^2 S_B^-1 C S_A^-1 for C_A and C_B at once
        correction = torch.matmul(torch.matmul(inv_b, cross), inv_a)
        correction.mul_((-0.5 * squares)[:, None, None])
        for index, offset, k in zip(indices, offsets, sizes, strict=True):
            group, layers = groups[index], slice(offset, offset + k)
            common = {"budget": budget, "scratch": scratch}
            _directions_(
                group.grad_a,
                group.a,
                weights[index].right.to(dtype).reciprocal(),
                inv_b[layers],
                correction[0, layers],
                left=True,
                **common,
            )
            _directions_(
                group.grad_b,
                group.b,
                weights[index].left.to(dtype).reciprocal(),
                inv_a[layers],
                correction[1, layers],
                left=False,
                **common,
            )
