"""One process of a real training run for tests/test_preconditioner_ddp.py.

`python tests/ddp_worker.py CONFIG.json OUT_DIR`, alone or under `accelerate launch`: trains the
config with `TrainingRun(...).run()` and writes this rank's final LoRA tensors (and AdaPreLoRA's
row/column moments) to `OUT_DIR/rank<N>.safetensors`, with the LoRA tensors it started
from under `start.<name>`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from safetensors.torch import save_file

from modules.config.loading import load_config
from modules.training.trainer import TrainingRun


def lora_weights(run: TrainingRun) -> list[tuple[str, torch.nn.Parameter]]:
    return list(run.network.named_parameters())


def main(config_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    config = load_config(raw=json.loads(Path(config_path).read_text(encoding="utf-8")))
    run = TrainingRun(config)
    rank = run.accelerator.process_index  # read now: end_training() ends the process group
    start = {name: param.detach().float().cpu().clone() for name, param in lora_weights(run)}
    result = run.run()
    assert not result.interrupted and result.steps == config.training.max_steps
    tensors = {f"start.{name}": tensor for name, tensor in start.items()}
    tensors |= {name: param.detach().float().cpu().clone() for name, param in lora_weights(run)}
    if run.preconditioner is not None:  # AdaPreLoRA's moments, as a backup stores them
        state = run.preconditioner.state_dict()
        for side in ("rows", "cols"):
            for index, moments in enumerate(state[side]):
                tensors[f"moments.{side}.{index}"] = moments.float().clone()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / f"rank{rank}.safetensors"))


if __name__ == "__main__":
    main(*sys.argv[1:])
