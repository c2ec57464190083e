"""The two problems of scripts/benchmark_convergence.py, each training a LoRA the way a run does.

Every arm goes through the project's own pieces: the config schema (so an arm is a config),
`lora_param_groups` and `create_optimizer` (LoRA+ included), `attach_preconditioner` (the hook a
run installs) and `GradientPipeline` (clip, precondition, step). What is kept across runs is only
what a run would recompute identically: the frozen base model, encoded latents and captions, and
each seed's LoRA initialisation and data order, so all arms of a seed start from the same weights
and see the same batches and noise.

- E1, `LinearProblem`: a LoRA on a frozen linear layer learns a rank-4 correction dW* with a
  chosen condition number from regression data (full batch); the error is |dW - dW*| / |dW*|.
- E2, `ConceptProblem`: the tiny world's concept fine-tune (the `make demo` task): a LoRA on the
  pretrained tiny SDXL UNet learns the novel shape from 12 captioned images; the validation
  loss is measured on 8 held-out images of it at fixed timesteps and noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from modules.config.schema import TrainConfig
from modules.data import tiny_world
from modules.lora.network import LoRANetwork, LoRATarget
from modules.models.base import Batch
from modules.models.registry import get_family
from modules.training.gradient_pipeline import GradientPipeline
from modules.training.optimizers import create_optimizer, create_scheduler, lora_param_groups
from modules.training.preconditioning import attach_preconditioner


@dataclass(frozen=True)
class Curve:
    """Where a run's metric was measured (steps) and its values; stopped early when it reached
    `target` or left the finite range."""

    steps: list[int]
    values: list[float]

    @property
    def final(self) -> float:
        return self.values[-1]

    @property
    def best(self) -> float:
        return min(self.values)

    def steps_to(self, target: float) -> int | None:
        return next((s for s, v in zip(self.steps, self.values, strict=True) if v <= target), None)


def arm_config(
    *settings: dict[str, Any], lr: float, rank: int, base_model: str = "-"
) -> TrainConfig:
    """Sparse config sections (an arm's, an experiment's) merged at one learning rate and rank."""
    raw: dict[str, Any] = {
        "model": {"base_model": base_model},
        "lora": {"rank": rank, "alpha": rank},
        "optimizer": {"learning_rate": lr},
    }
    for sections in settings:
        for section, values in sections.items():
            raw.setdefault(section, {}).update(values)
    return TrainConfig.model_validate(raw)


class _Training:
    """The optimizer, preconditioner and gradient pipeline of one run over `network`."""

    def __init__(
        self, *, config: TrainConfig, network: LoRANetwork, model: nn.Module, accelerator
    ) -> None:
        self.optimizer = create_optimizer(
            config.optimizer, lora_param_groups(network=network, config=config)
        )
        scheduler = create_scheduler(config.scheduler, self.optimizer, total_steps=1)
        self.preconditioner = attach_preconditioner(
            config=config, network=network, optimizer=self.optimizer, accelerator=accelerator
        )
        self.pipeline = GradientPipeline(
            accelerator=accelerator,
            model=model,
            optimizer=self.optimizer,
            scheduler=scheduler,
            parameters=list(network.parameters()),
            accumulation_steps=config.training.gradient_accumulation_steps,
            max_grad_norm=config.training.max_grad_norm,
        )

    def step(self, loss_of_batch) -> bool:
        """Forward (`loss_of_batch()`), backward and update as a run's micro-batch does; False
        when the step was not finite (the run has diverged)."""
        with self.pipeline.micro_batch():
            loss = loss_of_batch()
        self.pipeline.backward(loss)
        return self.pipeline.step().finite

    def close(self) -> None:
        if self.preconditioner is not None:
            self.preconditioner.detach()


def _initial_state(network: LoRANetwork, seed: int) -> dict[str, torch.Tensor]:
    """The LoRA's start for `seed`: A as LoRAModule initialises it, B = 0."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, adapter in network.adapters.items():
        down = torch.empty_like(adapter.lora_down.weight)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
        state[f"adapters.{name}.lora_down.weight"] = down
        state[f"adapters.{name}.lora_up.weight"] = torch.zeros_like(adapter.lora_up.weight)
    return state


@torch.no_grad()
def _reset(network: LoRANetwork, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into the factors in place: packed factors stay views of their stacks."""
    params = dict(network.named_parameters())
    for key, value in state.items():
        params[key].copy_(value)
        params[key].grad = None


# -- E1 ---------------------------------------------------------------------------------------------


class _Layer(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.layer.weight.data.copy_(weight)
        self.layer.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class LinearProblem:
    """dW* of rank 4 with singular values from 1 down to 1/condition, on a frozen 64 x 64 layer."""

    size = 64
    samples = 256

    def __init__(self, *, condition: float, rank: int, seed: int, accelerator: Accelerator):
        generator = torch.Generator().manual_seed(seed)
        n = self.size
        u, _ = torch.linalg.qr(torch.randn(n, 4, generator=generator))
        v, _ = torch.linalg.qr(torch.randn(n, 4, generator=generator))
        singular = torch.logspace(0, -math.log10(condition), 4)
        self.target = u @ torch.diag(singular) @ v.T
        self.module = _Layer(torch.randn(n, n, generator=generator) / math.sqrt(n))
        self.inputs = torch.randn(self.samples, n, generator=generator)
        self.wanted = self.inputs @ (self.module.layer.weight + self.target).T
        target = LoRATarget(part="unet", kohya_prefix="lora_unet", model=self.module)
        self.network = LoRANetwork.inject([(target, ["layer"])], rank=rank, alpha=rank, dropout=0)
        self.start = _initial_state(self.network, seed)
        self.accelerator = accelerator
        (self.adapter,) = self.network.adapters.values()

    def error(self) -> float:
        with torch.no_grad():
            delta = self.adapter.merged_delta_weight()
            value = float((delta - self.target).norm() / self.target.norm())
        return value if math.isfinite(value) else math.inf

    def run(self, config: TrainConfig, *, steps: int, target: float) -> Curve:
        """Train from the seed's start until the error reaches `target` or `steps` run out."""
        _reset(self.network, self.start)
        training = _Training(
            config=config, network=self.network, model=self.module, accelerator=self.accelerator
        )
        points, values = [0], [self.error()]
        try:
            for step in range(1, steps + 1):
                finite = training.step(
                    lambda: (self.module(self.inputs) - self.wanted).square().sum(-1).mean()
                )
                points.append(step)
                values.append(self.error() if finite else math.inf)
                if values[-1] <= target or not values[-1] < 1e6:
                    break
        finally:
            training.close()
        return Curve(points, values)


# -- E2 ---------------------------------------------------------------------------------------------

VALIDATION_TIMESTEPS = (100, 250, 400, 550, 700, 850)


class ConceptProblem:
    """The demo's concept on the pretrained tiny world model, with everything encoded once."""

    def __init__(
        self,
        *,
        model: Path,
        rank: int,
        train_images: int = 12,
        validation_images: int = 8,
        batch_size: int = 4,
        accelerator: Accelerator,
    ) -> None:
        config = arm_config(lr=1e-3, rank=rank, base_model=str(model))
        self.family = get_family(config.model.family)
        self.base = self.family.load(config)
        self.accelerator = accelerator
        self.batch_size = batch_size
        self.train = self._encode(tiny_world.concept_scenes(train_images, seed=0))
        validation = self._encode(tiny_world.concept_scenes(validation_images, seed=1))
        self.validation = self._validation_batch(validation)
        self.fit = self._validation_batch(self.train)  # the training images, measured the same way
        self.network = LoRANetwork.inject(
            self.family.lora_targets(self.base, config), rank=rank, alpha=rank, dropout=0.0
        )
        self.base.train()
        self._starts: dict[int, dict[str, torch.Tensor]] = {}

    def _encode(self, scenes: list[tiny_world.Scene]) -> Batch:
        captions = [scene.caption(noun=tiny_world.TRIGGER_WORD) for scene in scenes]
        pixels = tiny_world.render(scenes) * 2 - 1
        mean, std = self.family.encode_latents(self.base, pixels)
        size = torch.tensor([[tiny_world.IMAGE_SIZE, tiny_world.IMAGE_SIZE]] * len(scenes))
        return Batch(
            captions=captions,
            original_sizes=size,
            crop_top_lefts=torch.zeros_like(size),
            target_size=(tiny_world.IMAGE_SIZE, tiny_world.IMAGE_SIZE),
            latent_mean=mean,
            latent_std=std,
            text=self.family.encode_text(self.base, captions),
        )

    @staticmethod
    def _select(batch: Batch, index: torch.Tensor) -> Batch:
        return Batch(
            captions=[batch.captions[i] for i in index.tolist()],
            original_sizes=batch.original_sizes[index],
            crop_top_lefts=batch.crop_top_lefts[index],
            target_size=batch.target_size,
            latent_mean=batch.latent_mean[index],
            latent_std=batch.latent_std[index],
            text={key: value[index] for key, value in batch.text.items()},
        )

    def _validation_batch(self, batch: Batch) -> tuple[Batch, torch.Tensor]:
        count = len(batch)
        index = torch.arange(count).repeat(len(VALIDATION_TIMESTEPS))
        timesteps = torch.tensor(VALIDATION_TIMESTEPS).repeat_interleave(count)
        return self._select(batch, index), timesteps

    def validation_loss(self, config: TrainConfig) -> float:
        """Every held-out image at every validation timestep, with the same noise every time."""
        return self.fixed_loss(config, self.validation)

    def training_set_loss(self, config: TrainConfig) -> float:
        """The same measurement on the training images: how closely the LoRA fits them."""
        return self.fixed_loss(config, self.fit)

    @torch.no_grad()
    def fixed_loss(self, config: TrainConfig, images: tuple[Batch, torch.Tensor]) -> float:
        batch, timesteps = images
        generator = torch.Generator().manual_seed(0)
        self.base.eval()
        try:
            loss = self.family.training_loss(
                self.base, batch, generator=generator, config=config, timesteps=timesteps
            )
        finally:
            self.base.train()
        value = float(loss)
        return value if math.isfinite(value) else math.inf

    def order(self, seed: int, steps: int) -> list[torch.Tensor]:
        """The seed's batches: shuffled epochs over the training images, a batch per step."""
        generator = torch.Generator().manual_seed(seed)
        count, batches, pool = len(self.train), [], []
        while len(batches) < steps:
            if len(pool) < self.batch_size:
                pool += torch.randperm(count, generator=generator).tolist()
            batches.append(torch.tensor(pool[: self.batch_size]))
            pool = pool[self.batch_size :]
        return batches

    def run(self, config: TrainConfig, *, seed: int, steps: int, every: int) -> Curve:
        """Train `steps` steps from the seed's start, measuring validation loss every `every`."""
        if seed not in self._starts:
            self._starts[seed] = _initial_state(self.network, seed)
        _reset(self.network, self._starts[seed])
        training = _Training(
            config=config, network=self.network, model=self.base, accelerator=self.accelerator
        )
        points, values = [0], [self.validation_loss(config)]
        noise = torch.Generator()
        try:
            for step, index in enumerate(self.order(seed, steps), start=1):
                noise.manual_seed(seed * 100_003 + step)
                batch = self._select(self.train, index)
                if not training.step(
                    lambda batch=batch: self.family.training_loss(
                        self.base, batch, generator=noise, config=config
                    )
                ):
                    points.append(step)
                    values.append(math.inf)
                    break
                if step % every == 0 or step == steps:
                    points.append(step)
                    values.append(self.validation_loss(config))
        finally:
            training.close()
        return Curve(points, values)
