"""The LoRA preconditioner under multi-process DDP: `accelerate launch`, 2 CPU processes, gloo.

DDP broadcasts the parameters once, at the start; after that every rank must compute the same
update from the all-reduced gradients. AdaPreLoRA also reads row/column statistics from sketches
each rank fills in its own backward pass; if those were not averaged over the ranks like the
gradients, the ranks' directions would differ and their LoRA weights would silently drift apart.

Two processes with per-rank batch 1 see the same global batch as one process with batch 1 and 2
accumulation steps: DataOrder gives rank r of micro-batch k the epoch's slot `2k + r`, the one
process its micro-batches `2k` and `2k + 1`, and seeds each sample's augmentations and each
micro-batch's diffusion noise by slot (`DataOrder.noise_seed`), so both runs take the same steps
up to float reduction order.

`accelerate launch --cpu --num_processes 2` would start ONE process (accelerate 1.x runs several
CPU processes only through mpirun), so the launch here is the multi-GPU launcher (torchrun) with
ACCELERATE_USE_CPU=true, which gives accelerate's MULTI_CPU state and DDP over gloo.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO, cli_env, free_port, tiny_config

WORKER = REPO / "tests" / "ddp_worker.py"
STEPS = 3


def _train(root: Path, name: str, raw: dict, *, processes: int) -> list[dict[str, torch.Tensor]]:
    """Run tests/ddp_worker.py on `processes` CPU processes; each rank's saved tensors."""
    config = root / f"{name}.json"
    config.write_text(json.dumps(raw), encoding="utf-8")
    launcher: tuple[str, ...] = (sys.executable,)
    if processes > 1:
        # not `--cpu`, which starts a single process: see the module docstring
        launcher += ("-m", "accelerate.commands.launch", "--multi_gpu")
        launcher += ("--num_processes", str(processes), "--num_machines", "1")
        launcher += ("--main_process_port", str(free_port()))
        launcher += ("--mixed_precision", "no", "--dynamo_backend", "no")
    out = root / f"{name}-out"
    result = subprocess.run(
        [*launcher, str(WORKER), str(config), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=cli_env(OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true"),
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = sorted(path.name for path in out.iterdir())
    assert saved == [f"rank{rank}.safetensors" for rank in range(processes)], saved
    return [load_file(out / f"rank{rank}.safetensors") for rank in range(processes)]


def _compared(saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What two runs must agree on: each LoRA tensor's change over the run (its update, which a
    relative check on the weights themselves would hide under A's random start) and the moments."""
    out = {}
    for key, value in saved.items():
        if key.startswith("moments."):
            out[key] = value
        elif not key.startswith("start."):
            out[key] = value - saved[f"start.{key}"]
    return out


def _worst(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The largest per-tensor relative difference |actual - expected| / |expected|, and where."""
    assert actual.keys() == expected.keys()
    return max(
        ((actual[k] - expected[k]).norm().item() / expected[k].norm().item(), k) for k in actual
    )


@pytest.mark.parametrize("method", ["riemannian", "adaprelora"])
def test_ranks_agree_and_match_one_process_with_accumulation(
    tiny_sdxl_path: Path, tiny_dataset_path: Path, tmp_path: Path, method: str
) -> None:
    def raw(name: str, processes: int) -> dict:
        return tiny_config(
            tiny_sdxl_path,
            tiny_dataset_path,
            tmp_path / name,
            lora={
                "rank": 2,
                "alpha": 2,
                "preconditioner": method,
            },
            # SGD: the update is linear in the preconditioned direction (Adam's first steps are
            # about lr * sign(direction), which would hide most of a wrong direction)
            optimizer={"name": "sgd", "learning_rate": 1e-2},
            training={
                "max_steps": STEPS,
                "batch_size": 1,
                "gradient_accumulation_steps": 2 // processes,
            },
        )

    rank0, rank1 = _train(tmp_path, "ddp", raw("ddp", 2), processes=2)
    (single,) = _train(tmp_path, "single", raw("single", 1), processes=1)

    ddp, other_rank, reference = (_compared(run) for run in (rank0, rank1, single))
    # the run trained something: every tensor moved (zero-initialised up factors included), and
    # AdaPreLoRA's moments were filled
    assert all(delta.norm() > 0 for delta in ddp.values())
    assert any(key.startswith("moments.") for key in ddp) == (method == "adaprelora")

    # 1. every rank ends with the same LoRA weights and AdaPreLoRA moments (bitwise in practice)
    worst, where = _worst(other_rank, ddp)
    assert worst <= 1e-6, f"ranks drifted apart: relative difference {worst:.3g} in {where}"
    for key in rank0:
        assert (rank0[key] - rank1[key]).abs().max() <= 1e-6, key

    # 2. ... and the same as one process seeing the same global batch by accumulation (only the
    # float reduction order differs: about 1e-5 relative in the updates)
    worst, where = _worst(ddp, reference)
    assert worst <= 1e-3, f"2 processes vs 1 with accumulation: {worst:.3g} in {where}"
