"""Batched r x r algebra of the preconditioners, on stacks of k same-shaped LoRA layers.

The Riemannian method lives here with the shared pieces (damping, chunking, batching by rank);
AdaPreLoRA's weighted variant, built on them, in `adaprelora`.

Shapes: A (k, r, n), B (k, m, r), g_A like A, g_B like B, s (k,). Everything is computed in
float32 (or float64 when the inputs are float64, which the tests use as the reference) and returned
in that dtype; the caller casts back to the gradient's dtype. Nothing here reads a tensor value on
the host: a failed factorisation is fixed up with masked fills, never branched on, so one call never
synchronises with the GPU.

Both passes run on the calling thread. Splitting a pass's groups over a second Python thread gave
bitwise-equal results but was 2.5x slower on the 2-core CPU (1.8 ms against 4.4-5.1 ms for
AdaPreLoRA on the tiny model): each thread's OpenMP team competes for the same cores. With one
intra-op thread per half it was still slower, 45 against 39 ms at SDXL size (passes repeated in
blocks; alternated with the plain pass it looked 15% faster, because each plain pass then paid
for waking the OpenMP thread the split had left idle).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

# On the CPU the gradient products run in chunks of whole layers of about this many entries
# (4 MiB of float32): each chunk's result is copied back into the gradient while it is still in
# cache, so the pass costs one read and one write of the gradients from memory, not two of each
# (measured on 2 cores: about 1.4x faster than whole groups; 2-8 MiB chunks within a few percent).
# A GPU takes a whole group at once (launch count matters there, not cache).
CPU_CHUNK_ELEMENTS = 1 << 20
# Groups of one rank share one batched damped inverse; on the CPU batches stop growing past this
# many bytes of Grams so that the inverse's passes over them stay in cache (a GPU takes all).
CPU_GRAM_BYTES = 8 << 20
# On a GPU a Gram sums over m (B^T B) or n (A A^T) in pieces of this many entries, as a batch of
# partial Grams added up after: cuBLAS gives a 16 x 16 Gram with a long inner dimension one thread
# block per layer (whole, the B-Grams took 0.57 ms of a 1.5 ms pass at SDXL size on an H100;
# pieced, 0.14 ms).
GPU_GRAM_PIECE = 128


@dataclass(frozen=True)
class Damping:
    """`lam = relative * mean eigenvalue of the Gram + absolute`, added to the Gram's diagonal.

    `identity_below`: while the mean eigenvalue of the partner's Gram is below this, the factor
    keeps its plain gradient (the B = 0 start); 0 turns the fallback off.
    """

    relative: float = 0.1
    absolute: float = 1e-8
    identity_below: float = 0.0


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def damped_inverse(
    gram: torch.Tensor, damping: Damping, *, potri: bool | None = None
) -> torch.Tensor:
    """`(gram + lam I)^-1` for a stack of SPD r x r Grams, through a Cholesky factorisation.

    A layer whose factorisation fails (non-finite weights) or whose Gram is below
    `damping.identity_below` gets the identity, so its gradient passes through unchanged and the
    result is never NaN or inf by our doing. The failures are fixed up in place, on the diagonal
    and with one masked fill: a `torch.where` against a broadcast identity writes a second stack
    and took a fifth of the time at SDXL size (1444 Grams of 16 x 16) on the CPU.

    `potri`: invert through LAPACK's potri (default on the CPU) or through a triangular solve
    (default elsewhere); the tests take both paths on the CPU.
    """
    r = gram.shape[-1]
    mean_eig = gram.diagonal(dim1=-2, dim2=-1).sum(-1) / r
    lam = damping.relative * mean_eig + damping.absolute
    shifted = gram.clone()
    shifted.diagonal(dim1=-2, dim2=-1).add_(lam[:, None])
    inverse, failed = _spd_inverse(
        shifted, potri=gram.device.type == "cpu" if potri is None else potri
    )
    # a matrix with an inf or NaN entry has a non-finite sum: one reduction, no full-size mask
    unusable = failed | ~torch.isfinite(inverse.sum(dim=(-2, -1)))
    if damping.identity_below > 0:
        unusable = unusable | (mean_eig < damping.identity_below)
    inverse.masked_fill_(unusable[:, None, None], 0.0)
    inverse.diagonal(dim1=-2, dim2=-1).add_(unusable[:, None].to(inverse.dtype))
    return inverse


def _spd_inverse(matrices: torch.Tensor, *, potri: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`(M^-1, failed)` through a Cholesky factorisation; where it failed, M^-1 is meaningless
    (but computed without error) and the caller replaces it."""
    r = matrices.shape[-1]
    factor, info = torch.linalg.cholesky_ex(matrices)
    failed = info != 0
    # a failed factorisation leaves a partial factor: a unit diagonal makes it invertible, so
    # neither potri nor the triangular solve below ever meets a zero pivot
    factor.diagonal(dim1=-2, dim2=-1).masked_fill_(failed[:, None], 1.0)
    if potri:
        # LAPACK's potri, 1.4-1.7x faster on the CPU than the solve and product below. It checks
        # L's diagonal for a zero, which costs no sync there and never fails (see above)
        return torch.cholesky_inverse(factor), failed
    # (L L^T)^-1 = L^-T L^-1 through a triangular solve: unlike cholesky_inverse it never checks
    # for singularity, so it never stops to ask the GPU
    eye = torch.eye(r, dtype=matrices.dtype, device=matrices.device)
    inverse_factor = torch.linalg.solve_triangular(factor, eye.expand_as(factor), upper=False)
    return inverse_factor.mT @ inverse_factor, failed


class Scratch:
    """Flat buffers reused by every chunk of every group in one pass, so a pass allocates a few
    chunk-sized buffers once instead of temporaries per group and chunk."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        numel = shape.numel()
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
            buffer = torch.empty(numel, dtype=dtype, device=self.device)
            self.buffers[name] = buffer
        return buffer[:numel].view(shape)

    def convert(self, name: str, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`x` itself when it already has `dtype`, else a converted copy in a scratch buffer."""
        if x.dtype == dtype:
            return x
        return self.take(name, x.shape, dtype).copy_(x)


def chunk_elements(device: torch.device) -> int | None:
    """How many entries the in-place products take at a time on `device` (None: all)."""
    return CPU_CHUNK_ELEMENTS if device.type == "cpu" else None


def layer_slices(k: int, per_layer: int, budget: int | None) -> Iterator[slice]:
    step = k if budget is None else max(1, budget // per_layer)
    for start in range(0, k, step):
        yield slice(start, min(k, start + step))


def gram_piece(device: torch.device) -> int | None:
    """Entries of the inner dimension per partial Gram on `device` (None: no split)."""
    return GPU_GRAM_PIECE if device.type == "cuda" else None


def gram_into(
    factor: torch.Tensor,
    out: torch.Tensor,
    *,
    columns: bool,
    budget: int | None = None,
    piece: int | None = None,
) -> None:
    """`out <- F^T F` (columns: B, (k, m, r)) or `F F^T` (rows: A, (k, r, n)), both r x r.

    Computed in `out`'s dtype; a factor of another dtype (bf16, fp16) is converted a chunk of
    layers at a time on the CPU. With `piece` (on a GPU, see `GPU_GRAM_PIECE`) the inner
    dimension is split into pieces whose Grams are summed, and the stack converted whole.
    """
    inner = factor.shape[1] if columns else factor.shape[2]
    if piece is not None and piece // 4 <= math.gcd(inner, piece) < inner:  # no tiny pieces
        _pieced_gram_into(factor, out, columns=columns, piece=math.gcd(inner, piece))
        return
    if factor.dtype == out.dtype:
        budget = None  # nothing to convert, nothing to chunk
    for layers in layer_slices(factor.shape[0], factor[0].numel(), budget):
        x = factor[layers].to(out.dtype)
        if columns:
            torch.bmm(x.mT, x, out=out[layers])
        else:
            torch.bmm(x, x.mT, out=out[layers])


def _pieced_gram_into(
    factor: torch.Tensor, out: torch.Tensor, *, columns: bool, piece: int
) -> None:
    """`gram_into` as k * c partial Grams over pieces of `piece` entries, summed into `out`."""
    k, r = out.shape[0], out.shape[-1]
    if columns:  # B (k, m, r): a piece is `piece` consecutive rows, so the pieces are a view
        x = factor.reshape(-1, piece, r).to(out.dtype)
        partial = torch.bmm(x.mT, x)
    else:  # A (k, r, n): gather the column pieces into a stack, converting on the way
        c = factor.shape[2] // piece
        x = torch.empty(k, c, r, piece, dtype=out.dtype, device=factor.device)
        x.copy_(factor.view(k, r, c, piece).transpose(1, 2))
        x = x.view(k * c, r, piece)
        partial = torch.bmm(x, x.mT)
    torch.sum(partial.view(k, -1, r, r), dim=1, out=out)


def multiply_(
    grad: torch.Tensor,
    operator: torch.Tensor,
    *,
    left: bool,
    budget: int | None,
    scratch: Scratch,
) -> None:
    """In place: `grad <- operator @ grad` (left) or `grad @ operator`, in operator's dtype.

    Each chunk's product goes to a scratch buffer and is copied (and cast) back into `grad`.
    """
    dtype = operator.dtype
    for layers in layer_slices(grad.shape[0], grad[0].numel(), budget):
        chunk = grad[layers]
        x = scratch.convert("staged", chunk, dtype)
        out = scratch.take("result", chunk.shape, dtype)
        if left:
            torch.bmm(operator[layers], x, out=out)
        else:
            torch.bmm(x, operator[layers], out=out)
        chunk.copy_(out)


def riemannian_grams_into(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    out: torch.Tensor,
    *,
    budget: int | None = None,
) -> None:
    """`out[:k] <- s^2 B^T B` and `out[k:] <- s^2 A A^T`: the factors are read once, unscaled."""
    k, r = a.shape[0], a.shape[1]
    gram_into(b, out[:k], columns=True, budget=budget)
    gram_into(a, out[k:], columns=False, budget=budget)
    out.view(2, k, r, r).mul_(scale.to(out.dtype).square()[:, None, None])


def riemannian_operators(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, damping: Damping
) -> tuple[torch.Tensor, torch.Tensor]:
    """`((s^2 B^T B + lam)^-1, (s^2 A A^T + lam)^-1)`: the r x r matrices for g_A and g_B.

    With lam -> 0 the resulting W-step `s (B dA + dB A)` is `P_B G + G P_A`, whatever alpha, rank
    or the split of W between the factors.
    """
    k, r = a.shape[0], a.shape[1]
    grams = torch.empty(2 * k, r, r, dtype=compute_dtype(a.dtype), device=a.device)
    riemannian_grams_into(a, b, scale, grams)
    inverse = damped_inverse(grams, damping)
    return inverse[:k], inverse[k:]


class FactorStacks(Protocol):
    """A group of k same-shaped layers: A (k, r, n), B (k, m, r), their gradients, s (k,)."""

    a: torch.Tensor
    b: torch.Tensor
    grad_a: torch.Tensor
    grad_b: torch.Tensor
    scale: torch.Tensor


def rank_batches(groups: Sequence[FactorStacks]) -> Iterator[list[int]]:
    """Indices of groups of one rank, device and compute dtype, in batches of at most
    CPU_GRAM_BYTES of Grams on the CPU (a group larger than that alone) and whole on a GPU."""
    by_key: dict[tuple, list[int]] = {}
    for index, group in enumerate(groups):
        key = (group.a.shape[1], group.a.device, compute_dtype(group.a.dtype))
        by_key.setdefault(key, []).append(index)
    for (r, device, dtype), members in by_key.items():
        limit = CPU_GRAM_BYTES if device.type == "cpu" else None
        per_layer = 2 * r * r * torch.finfo(dtype).bits // 8
        batch: list[int] = []
        size = 0
        for index in members:
            grams = per_layer * groups[index].a.shape[0]
            if batch and limit is not None and size + grams > limit:
                yield batch
                batch, size = [], 0
            batch.append(index)
            size += grams
        yield batch


def riemannian_precondition_(groups: Sequence[FactorStacks], damping: Damping) -> None:
    """`riemannian_directions` of every group, written over its gradients (in their dtype).

    The cost is memory traffic: A and B are read once for the Grams, the gradients read and
    written once, in cache-sized chunks on the CPU (see `multiply_`), and the r x r inverses of
    many groups are taken in one batched call.
    """
    for indices in rank_batches(groups):
        batch = [groups[index] for index in indices]
        first = batch[0].a
        r, device, dtype = first.shape[1], first.device, compute_dtype(first.dtype)
        budget, piece = chunk_elements(device), gram_piece(device)
        sizes = [group.a.shape[0] for group in batch]
        grams = torch.empty(2 * sum(sizes), r, r, dtype=dtype, device=device)
        starts = [2 * sum(sizes[:index]) for index in range(len(batch))]
        for group, k, start in zip(batch, sizes, starts, strict=True):
            common = {"budget": budget, "piece": piece}
            gram_into(group.b, grams[start : start + k], columns=True, **common)
            gram_into(group.a, grams[start + k : start + 2 * k], columns=False, **common)
        # s^2 B^T B and s^2 A A^T of every layer in one product: each group's s twice, in order
        squares = torch.cat([group.scale for group in batch for _ in range(2)]).to(dtype).square()
        grams.mul_(squares[:, None, None])
        inverse = damped_inverse(grams, damping)
        scratch = Scratch(device)
        for group, k, start in zip(batch, sizes, starts, strict=True):
            common = {"budget": budget, "scratch": scratch}
            multiply_(group.grad_a, inverse[start : start + k], left=True, **common)
            multiply_(group.grad_b, inverse[start + k : start + 2 * k], left=False, **common)


def riemannian_directions(
    *,
    a: torch.Tensor,
    b: torch.Tensor,
    grad_a: torch.Tensor,
    grad_b: torch.Tensor,
    scale: torch.Tensor,
    damping: Damping,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled-GD directions `(S_B^-1 g_A, g_B S_A^-1)` (Zhang & Pilanci 2024)."""
    inv_b, inv_a = riemannian_operators(a, b, scale, damping)
    dtype = inv_a.dtype
    return inv_b @ grad_a.to(dtype), grad_b.to(dtype) @ inv_a
