"""Real faults for tests: a disk that fills up (RLIMIT_FSIZE), files damaged after writing."""

from __future__ import annotations

import contextlib
import resource
import signal
from collections.abc import Callable, Iterator


def _limit(max_bytes: int) -> None:
    """Writes past `max_bytes` fail with EFBIG ("File too large"), as on a full disk they fail
    with ENOSPC: the OS refuses them, and writers see exactly that error."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, hard))


def file_size_limit_for_child(max_bytes: int) -> Callable[[], None]:
    """A subprocess `preexec_fn` that fills the child's disk at `max_bytes` per file."""
    return lambda: _limit(max_bytes)


@contextlib.contextmanager
def file_size_limit(max_bytes: int) -> Iterator[None]:
    """In this process: no file grows past `max_bytes` until the block ends."""
    before = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.getsignal(signal.SIGXFSZ)
    _limit(max_bytes)
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, before)
        signal.signal(signal.SIGXFSZ, handler)
