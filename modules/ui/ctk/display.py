"""A display to open the window on: $DISPLAY when set, else a private Xvfb (tests, the
screenshot and benchmark scripts on machines without a desktop)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator


class NoDisplayError(Exception):
    """Neither a desktop nor Xvfb is available."""


@contextlib.contextmanager
def virtual_display(size: str = "1600x1000x24") -> Iterator[str]:
    """Yield the display name; an Xvfb started here picks a free display number itself
    (-displayfd) and is stopped on exit, with $DISPLAY restored."""
    if os.environ.get("DISPLAY"):
        yield os.environ["DISPLAY"]
        return
    if shutil.which("Xvfb") is None:
        raise NoDisplayError("no $DISPLAY and no Xvfb (on Debian/Ubuntu: apt-get install xvfb)")
    read, write = os.pipe()
    server = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write), "-screen", "0", size, "-nolisten", "tcp"],
        pass_fds=[write],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write)
    with os.fdopen(read) as pipe:
        number = pipe.readline().strip()
    if not number:
        server.kill()
        server.wait()
        raise NoDisplayError("Xvfb did not start")
    os.environ["DISPLAY"] = f":{number}"
    try:
        yield os.environ["DISPLAY"]
    finally:
        del os.environ["DISPLAY"]
        server.terminate()
        server.wait(timeout=10)
