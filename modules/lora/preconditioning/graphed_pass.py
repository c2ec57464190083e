"""Replay a preconditioning pass on a GPU as one CUDA graph instead of ~100 kernel launches.

Both passes over the packed stacks are fixed sequences of small batched kernels (Grams,
Cholesky, triangular solves, products) on tensors that never move: `FactorGroup.refresh` copies a
moved parameter back into its slot, it never replaces a stack, and AdaPreLoRA's Adafactor weights
are overwritten in place (`LoRAPreconditioner.adafactor_weights`). On a GPU a pass is bound by
launching those kernels from Python, not by the arithmetic: at SDXL size (722 layers, rank 16,
bf16) on an H100 the Riemannian pass takes 4.6 to 7.0 ms launched kernel by kernel and about 2 ms
replayed, of which 1.1 ms is GPU time (docs/benchmarks.md). A CUDA graph records the launches
once and replays them with one call.

The first call runs the pass for real, on the stream the graph is then captured on (so cuBLAS and
cuSOLVER have set up their handles and workspaces for it), and records the graph without running
it again. Before trusting the graph it replays it once on the same gradients and compares with
what the eager pass wrote: a graph that computes anything else (beyond rounding) is dropped with a
warning and the pass runs eagerly from then on, as it does when capture fails (a driver or library
that cannot record one of the kernels). The check holds two copies of the gradients for a moment,
less than the AdamW state that the first optimizer step allocates right after it. Every later call
replays it. The pass must read nothing from the host that changes between calls (the damping is a
constant, the scales live on the GPU) and must never sync, which `tests/test_preconditioner_cuda.py`
checks. Recording and the check synchronize with the GPU once (`torch.cuda.graph` also empties the
allocator's cache); the graph then keeps the pass's float32 working buffers in a memory pool of its
own (75 MiB for SDXL at rank 16, about twice that for AdaPreLoRA).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

log = logging.getLogger(__name__)


# how far a replay may land from the eager pass, relative to the largest entry of each tensor:
# the same kernels give the same bits; this only allows for a library picking another algorithm
REPLAY_TOLERANCE = 1e-3


class GraphedPass:
    """`run()` eagerly on the CPU (or when not `enabled`); on a CUDA device, once eagerly and
    then as a replayed graph. `outputs()`: the tensors the pass overwrites (the gradients)."""

    def __init__(
        self,
        run: Callable[[], None],
        *,
        device: torch.device,
        enabled: bool,
        outputs: Callable[[], Sequence[torch.Tensor]],
    ) -> None:
        self._run = run
        self._outputs = outputs
        self._device = device
        self._graph: torch.cuda.CUDAGraph | None = None
        self._eager = not enabled or device.type != "cuda"

    @property
    def graphed(self) -> bool:
        return self._graph is not None

    def __call__(self) -> None:
        if self._graph is not None:
            self._graph.replay()
        elif self._eager:
            self._run()
        else:
            self._run_and_capture()

    def _run_and_capture(self) -> None:
        current = torch.cuda.current_stream(self._device)
        stream = torch.cuda.Stream(self._device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            inputs = [tensor.clone() for tensor in self._outputs()]
            self._run()  # this step's pass, for real
        current.wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the data loader's threads may use CUDA while this thread records
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                self._run()  # recorded, not run
        except RuntimeError as error:
            self._eager = True
            log.warning(
                "preconditioner: could not record the pass as a CUDA graph (%s); it runs "
                "without one, a few milliseconds slower per step at SDXL size",
                str(error).splitlines()[0],
            )
            return
        if self.replay_matches(graph.replay, inputs):
            self._graph = graph
            return
        self._eager = True
        log.warning(
            "preconditioner: the pass replayed as a CUDA graph differs from the pass itself; "
            "it runs without one, a few milliseconds slower per step at SDXL size"
        )

    def replay_matches(self, replay: Callable[[], None], inputs: Sequence[torch.Tensor]) -> bool:
        """Whether `replay()` from `inputs` writes what the eager pass just wrote to the outputs
        (which then hold it again either way). One host sync."""
        outputs = self._outputs()
        expected = [tensor.clone() for tensor in outputs]
        for tensor, start in zip(outputs, inputs, strict=True):
            tensor.copy_(start)
        replay()
        verdicts = []
        for got, want in zip(outputs, expected, strict=True):
            got32, want32 = got.float(), want.float()
            size = want32.abs().nan_to_num(nan=0.0, posinf=0.0).amax()
            # equal (infinities too), both NaN, or within the tolerance
            close = (got32 == want32) | (got32.isnan() & want32.isnan())
            close |= (got32 - want32).abs() <= REPLAY_TOLERANCE * size
            verdicts.append(close.all())
            got.copy_(want)
        return bool(torch.stack(verdicts).all())
