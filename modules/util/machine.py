"""One description of the machine a benchmark ran on, for every table in docs/benchmarks.md."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

import torch


def cpu_model() -> str:
    with contextlib.suppress(OSError):  # no /proc on macOS and Windows
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe_machine(device: torch.device | str = "cpu") -> str:
    """CPU model, cores, torch threads and load average now (call it before the run), the GPU
    when `device` is one, and the torch version."""
    load = "load average {:.1f}/{:.1f}/{:.1f} at the start".format(*os.getloadavg())
    host = f"{cpu_model()} ({os.cpu_count()} cores, torch using {torch.get_num_threads()} threads, {load})"
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, host {host}, torch {torch.__version__}"
    return f"{host}, torch {torch.__version__}"


def benchmark_header(script: str, device: torch.device | str = "cpu") -> str:
    """`Machine: ... Date: ... Command: ...` for the top of a benchmark's section."""
    command = " ".join(["python", script, *map(shlex.quote, sys.argv[1:])])
    return (
        f"Machine: {describe_machine(device)}. Date: {datetime.date.today().isoformat()}. "
        f"Command: `{command}`."
    )
