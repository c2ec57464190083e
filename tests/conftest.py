"""Shared fixtures: a tiny SDXL base model and a tiny captioned dataset, built offline."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# cuBLAS's deterministic mode needs this before CUDA starts (see `deterministic_kernels`)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest
import torch

from modules.data.demo_dataset import write_demo_dataset
from modules.models.sdxl.tiny import build_tiny_sdxl

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers folder of a randomly initialised ~1M-parameter SDXL-shaped model."""
    return build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_dataset_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four 64x64 images with .txt captions."""
    return write_demo_dataset(tmp_path_factory.mktemp("data") / "concept", count=4, size=64)


@pytest.fixture
def deterministic_kernels() -> Iterator[None]:
    """Kernels that give the same bits on every run, for tests that compare two trainings bit
    for bit. On a GPU the default kernels accumulate with atomics in varying order: a resumed
    run on an H100 then ended 2.5e-5 (plain) and 1.5e-3 (AdaPreLoRA) from the uninterrupted one,
    and exactly on it in this mode. No change on the CPU."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)
