"""The optimizer factory's pieces that the trainer and the convergence benchmark share."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modules.config.schema import SchedulerConfig, TrainConfig
from modules.lora.network import LoRANetwork, LoRATarget
from modules.training.optimizers import create_optimizer, create_scheduler, lora_param_groups


@pytest.mark.parametrize("name", ["constant", "linear", "cosine"])
def test_every_schedule_warms_up_linearly(name: str):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    config = SchedulerConfig(name=name, warmup_steps=4)
    scheduler = create_scheduler(config, optimizer, total_steps=100)
    seen = []
    for _ in range(5):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[:4] == pytest.approx([0.0, 0.25, 0.5, 0.75])
    assert seen[4] == pytest.approx(1.0, abs=0.01)


def test_loraplus_gives_b_its_ratio_of_the_learning_rate():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    target = LoRATarget(part="unet", kohya_prefix="lora_unet", model=model)
    network = LoRANetwork.inject([(target, ["0", "1"])], rank=2, alpha=2, dropout=0.0)
    config = TrainConfig.model_validate(
        {"optimizer": {"learning_rate": 1e-3}, "lora": {"loraplus_ratio": 16}}
    )
    groups = lora_param_groups(network=network, config=config)
    assert [(g["name"], g["lr"]) for g in groups] == [("unet", 1e-3), ("unet_up", 16e-3)]
    ups = [b for _, b in network.pairs("unet")]
    assert all(any(p is b for b in ups) for p in groups[1]["params"])
    assert len(groups[0]["params"]) == len(groups[1]["params"]) == 2
    optimizer = create_optimizer(config.optimizer, groups)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 16e-3]
