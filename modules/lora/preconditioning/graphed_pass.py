"""Replay a preconditioning pass on a GPU as one CUDA graph instead of ~100 kernel launches.

The Riemannian pass over the packed stacks is a fixed sequence of small batched kernels (Grams,
Cholesky, triangular solves, products) on tensors that never move: `FactorGroup.refresh` copies a
moved parameter back into its slot, it never replaces a stack. On a GPU the pass is bound by
launching those kernels from Python, not by the arithmetic: at SDXL size (722 layers, rank 16,
bf16) on an H100 it takes 4.6 to 7.0 ms launched kernel by kernel and about 2 ms replayed, of
which 1.1 ms is GPU time (docs/benchmarks.md). A CUDA graph records the launches once and replays
them with one call.

The first call runs the pass for real, on the stream the graph is then captured on (so cuBLAS and
cuSOLVER have set up their handles and workspaces for it), and records the graph without running
it again; every later call replays it. The pass must read nothing from the host that changes
between calls (the damping is a constant, the scales live on the GPU) and must never sync, which
`tests/test_preconditioner_cuda.py` checks. Recording synchronizes with the GPU and empties the
allocator's cache once (`torch.cuda.graph` does both); the graph then keeps the pass's float32
working buffers in a memory pool of its own (75 MiB for SDXL at rank 16). If capture fails (a
driver or library that cannot record one of the kernels), the pass runs eagerly from then on and
says so once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)


class GraphedPass:
    """`run()` eagerly on the CPU (or when not `enabled`); on a CUDA device, once eagerly and
    then as a replayed graph."""

    def __init__(self, run: Callable[[], None], *, device: torch.device, enabled: bool) -> None:
        self._run = run
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
        self._graph = graph
