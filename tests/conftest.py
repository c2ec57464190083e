"""Shared fixtures: tiny SDXL and Flux base models and a tiny captioned dataset, built offline."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads that spin while they wait make a CPU step ~15x slower when other processes
# share the cores (measured: 2.3 s against 0.16 s per tiny Flux step at load 9 on 2 cores)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# cuBLAS's deterministic mode needs this before CUDA starts (see `deterministic_kernels`)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest
import torch
from diffusers import FluxPipeline

from modules.data.demo_dataset import write_demo_dataset
from modules.lora.network import LoRANetwork
from modules.models.flux.tiny import build_tiny_flux
from modules.models.sdxl.tiny import build_tiny_sdxl
from tests.flux_networks import BOTH_PARTS, make_network
from tests.helpers import TinyModel

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# the trainer window for the GUI tests (test_gui_window.py, test_gui_runs.py)
pytest_plugins = ["tests.gui_window_fixtures"]


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers folder of a randomly initialised ~1M-parameter SDXL-shaped model."""
    return build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_flux_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers folder of a randomly initialised Flux.1-dev-shaped model (490k-parameter
    transformer of two double and two single blocks, 16-channel VAE, CLIP-L and T5)."""
    return build_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux")


# Each family's extra `model` settings in the family-parametrised tests: Flux's T5 pads to 16
# tokens (not 512) so a step of the tiny model stays a fraction of a second, and its frozen parts
# are float32 as SDXL's are by default (tests/test_flux_training.py covers its bfloat16 default).
_FLOAT32 = {"weight_dtype": "float32"}
FAMILY_SETTINGS: dict[str, dict] = {
    "sdxl": {},
    "flux": {
        "family": "flux",
        "t5_max_length": 16,
        "transformer": _FLOAT32,
        "text_encoder": _FLOAT32,
        "text_encoder_2": _FLOAT32,
    },
}


@pytest.fixture(params=sorted(FAMILY_SETTINGS))
def tiny_model(request: pytest.FixtureRequest) -> TinyModel:
    """The tiny model of each family, for the tests that must hold for every family."""
    path = request.getfixturevalue(f"tiny_{request.param}_path")
    return TinyModel(family=request.param, path=path, model=FAMILY_SETTINGS[request.param])


@pytest.fixture(scope="module")
def flux_pipe(tiny_flux_path: Path) -> FluxPipeline:
    """The tiny Flux as a FluxPipeline; networks made on it are detached after each test."""
    return FluxPipeline.from_pretrained(tiny_flux_path)


@pytest.fixture
def flux_network_on(flux_pipe: FluxPipeline) -> Iterator[Callable[..., LoRANetwork]]:
    """Make LoRA networks (tests/flux_networks.py: make_network) on flux_pipe's transformer and
    CLIP-L; they come off again when the test ends."""
    made: list[LoRANetwork] = []

    def make(**kwargs) -> LoRANetwork:
        parts = {part: getattr(flux_pipe, part) for part in BOTH_PARTS}
        made.append(make_network(parts, **kwargs))
        return made[-1]

    yield make
    for network in made:
        network.detach()


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
