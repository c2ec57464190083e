"""Ctrl-C handling: the first interrupt asks the loop to stop at the next step boundary."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class StopSignal:
    """Set by SIGINT (or by code); the training loop checks it after each optimizer step."""

    def __init__(self) -> None:
        self.requested = False

    def request(self) -> None:
        self.requested = True

    def _on_sigint(self, signum: int, frame: object) -> None:
        self.request()
        print(
            "\nstopping after this step and writing a backup (Ctrl-C again to abort now)",
            flush=True,
        )
        signal.signal(signal.SIGINT, signal.default_int_handler)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignal]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)
