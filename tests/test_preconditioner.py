"""The preconditioner hook on real LoRA layers and optimizers, against float64 references."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn

from modules.lora.layers import LoRAConv2d, LoRALinear
from modules.lora.network import LoRANetwork
from modules.lora.preconditioning import Damping, LoRAPreconditioner, Settings, find_coverage
from modules.training.gradient_pipeline import GradientPipeline


class TwoLayers(nn.Module):
    """Two Linear layers and a 3x3 conv with LoRA, as a model part would carry them."""

    def __init__(self, *, rank: int = 2, alpha: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.first = nn.Linear(6, 6)
        self.second = nn.Linear(6, 5)
        self.conv = nn.Conv2d(2, 3, kernel_size=3, padding=1)
        for p in self.parameters():
            p.requires_grad_(False)
        self.adapters = nn.ModuleList(
            [
                LoRALinear(base=self.first, name="first", rank=rank, alpha=alpha),
                LoRALinear(base=self.second, name="second", rank=rank, alpha=alpha),
                LoRAConv2d(base=self.conv, name="conv", rank=rank, alpha=alpha),
            ]
        )
        for adapter in self.adapters:
            adapter.attach()
            nn.init.normal_(adapter.lora_up.weight, std=0.3)  # mid-training: B is not zero

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x))).pow(2).mean() + self.conv(image).pow(2).mean()

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for adapter in self.adapters for p in adapter.parameters()]


def _network(model: TwoLayers) -> LoRANetwork:
    """The model's adapters as the trainer's LoRA network holds them (all in the unet part)."""
    adapters = list(model.adapters)
    names = {adapter.name: adapter.name for adapter in adapters}
    return LoRANetwork(
        adapters, part_of=dict.fromkeys(names, "unet"), module_path=names, export_path=names
    )


def _inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 6, generator=g), torch.randn(2, 2, 5, 5, generator=g)


def test_step_applies_the_float64_directions_to_linear_and_conv_layers() -> None:
    model = TwoLayers(alpha=3.0)
    damping = Damping(relative=0.05, absolute=1e-6)
    optimizer = torch.optim.SGD(model.lora_parameters(), lr=1.0)
    LoRAPreconditioner(model.adapters, Settings(damping=damping)).attach(optimizer)
    model(*_inputs()).backward()
    expected = []
    for adapter in model.adapters:  # explicit float64 on the flattened matrices
        a = adapter.lora_down.weight.detach().double().flatten(1)
        b = adapter.lora_up.weight.detach().double().flatten(1)
        ga = adapter.lora_down.weight.grad.double().flatten(1)
        gb = adapter.lora_up.weight.grad.double().flatten(1)
        s = adapter.scale
        eye = torch.eye(2, dtype=torch.float64)
        gram_b, gram_a = s * s * b.T @ b, s * s * a @ a.T
        lam_b = 0.05 * torch.trace(gram_b) / 2 + 1e-6
        lam_a = 0.05 * torch.trace(gram_a) / 2 + 1e-6
        da = torch.linalg.solve(gram_b + lam_b * eye, ga)
        db = torch.linalg.solve(gram_a + lam_a * eye, gb.T).T
        expected.append((a - da, b - db))
    optimizer.step()
    for adapter, (a, b) in zip(model.adapters, expected, strict=True):
        got_a = adapter.lora_down.weight.detach().double().flatten(1)
        torch.testing.assert_close(got_a, a, rtol=1e-5, atol=1e-6)
        got_b = adapter.lora_up.weight.detach().double().flatten(1)
        torch.testing.assert_close(got_b, b, rtol=1e-5, atol=1e-6)


def test_factors_stay_the_parameters_own_through_what_trainers_do() -> None:
    """No shared stacks: every factor keeps its own storage across steps and autograd makes the
    gradients as it would without the preconditioner; the hook's gradients have each factor's
    shape and dtype, zero_grad sets them to None, and a load with assign=True (new Parameter
    objects) is followed, since the preconditioner reads each adapter's factors at every step."""
    model = TwoLayers()
    damping = Damping(relative=0.05, absolute=1e-6)
    preconditioner = LoRAPreconditioner(model.adapters, Settings(damping=damping))

    def storages(tensors: list[torch.Tensor]) -> set[int]:
        return {t.untyped_storage().data_ptr() for t in tensors}

    for _ in range(2):
        optimizer = torch.optim.SGD(model.lora_parameters(), lr=0.1)
        preconditioner.attach(optimizer)
        model(*_inputs()).backward()
        factors = model.lora_parameters()
        assert len(storages([t for p in factors for t in (p, p.grad)])) == 12
        optimizer.step()
        assert len(storages(model.lora_parameters())) == 6
        assert all(p.grad.shape == p.shape and p.grad.dtype == p.dtype for p in factors)
        optimizer.zero_grad()  # set_to_none, torch's default
        assert all(p.grad is None for p in model.lora_parameters())
        preconditioner.detach()
        state = copy.deepcopy(model.adapters[0].state_dict())
        model.adapters[0].load_state_dict(state, assign=True)
    replaced = model.adapters[0].lora_down.weight
    model(*_inputs()).backward()
    raw = [
        (p.detach().double().flatten(1), p.grad.double().flatten(1))
        for p in model.adapters[0].factors
    ]
    preconditioner.precondition()
    (_, grad_a), (b, _) = raw
    s = model.adapters[0].scale
    gram = s * s * b.T @ b
    lam = 0.05 * torch.trace(gram) / 2 + 1e-6
    expected = torch.linalg.solve(gram + lam * torch.eye(2, dtype=torch.float64), grad_a)
    torch.testing.assert_close(replaced.grad.double().flatten(1), expected, rtol=1e-5, atol=1e-7)


def test_huge_damping_with_adam_reproduces_plain_adamw() -> None:
    def run(precondition: bool) -> list[torch.Tensor]:
        model = TwoLayers().double()
        eps = 1e-20 if precondition else 1e-8  # the preconditioned gradient is g / 1e12
        optimizer = torch.optim.AdamW(model.lora_parameters(), lr=1e-2, eps=eps)
        if precondition:
            settings = Settings(damping=Damping(relative=0.0, absolute=1e12))
            LoRAPreconditioner(model.adapters, settings).attach(optimizer)
        x, image = _inputs()
        for _ in range(5):
            model(x.double(), image.double()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
        return [p.detach().clone() for p in model.lora_parameters()]

    for plain, damped in zip(run(False), run(True), strict=True):
        torch.testing.assert_close(damped, plain, rtol=1e-7, atol=1e-9)


def _accelerated(model: nn.Module, optimizer, accumulation: int) -> GradientPipeline:
    AcceleratorState._reset_state(reset_partial_state=False)
    # on the CPU also where a GPU is present: the model, its inputs and the stacks live there
    accelerator = Accelerator(mixed_precision="no", cpu=True)
    prepared, prepared_optimizer = accelerator.prepare(model, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(prepared_optimizer, lambda step: 1.0)
    return GradientPipeline(
        accelerator=accelerator,
        model=prepared,
        optimizer=prepared_optimizer,
        scheduler=scheduler,
        parameters=model.lora_parameters(),
        accumulation_steps=accumulation,
        max_grad_norm=1.0,
    )


@pytest.mark.parametrize("method", ["riemannian", "adaprelora"])
def test_accumulated_micro_batches_equal_one_batch_of_the_same_samples(method: str) -> None:
    x, image = _inputs()

    def run(accumulation: int) -> list[torch.Tensor]:
        model = TwoLayers()
        optimizer = torch.optim.AdamW(model.lora_parameters(), lr=1e-2)
        settings = Settings(method=method, probes=4)
        LoRAPreconditioner(model.adapters, settings).attach(optimizer)
        pipeline = _accelerated(model, optimizer, accumulation)
        for _ in range(3):
            for part in range(accumulation):
                rows = slice(part * 8 // accumulation, (part + 1) * 8 // accumulation)
                with pipeline.micro_batch():
                    loss = pipeline.model(
                        x[rows], image[part % 2 :: 2] if accumulation == 2 else image
                    )
                pipeline.backward(loss)
            pipeline.step()
        return [p.detach().clone() for p in model.lora_parameters()]

    for one, split in zip(run(1), run(2), strict=True):
        torch.testing.assert_close(split, one, rtol=2e-5, atol=1e-6)


def test_matches_peft_riemannian_optimizer_as_an_oracle() -> None:
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_riemannian_optimizer

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    reference = copy.deepcopy(base)
    config = peft.LoraConfig(r=3, lora_alpha=3, target_modules=["0", "2"], init_lora_weights=False)
    peft_model = peft.get_peft_model(reference, config)
    reg = 1e-2
    peft_optimizer = create_riemannian_optimizer(
        peft_model, torch.optim.AdamW, lr=1e-2, reg=reg, weight_decay=0.0
    )

    ours = copy.deepcopy(base)
    for p in ours.parameters():
        p.requires_grad_(False)
    adapters = []
    for index in ("0", "2"):
        layer = peft_model.base_model.model.get_submodule(index)
        adapter = LoRALinear(base=ours.get_submodule(index), name=index, rank=3, alpha=3)
        with torch.no_grad():  # same starting factors as PEFT's (s = alpha / r = 1)
            adapter.lora_down.weight.copy_(layer.lora_A["default"].weight)
            adapter.lora_up.weight.copy_(layer.lora_B["default"].weight)
        adapter.attach()
        adapters.append(adapter)
    params = [p for adapter in adapters for p in adapter.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    damping = Damping(relative=0.0, absolute=reg)  # PEFT: absolute damping, no s
    LoRAPreconditioner(adapters, Settings(damping=damping)).attach(optimizer)

    data = torch.randn(16, 6, generator=torch.Generator().manual_seed(3))
    target = torch.randn(16, 4, generator=torch.Generator().manual_seed(4))
    for _ in range(4):
        for model, opt in ((peft_model, peft_optimizer), (ours, optimizer)):
            (model(data) - target).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    for index, adapter in zip(("0", "2"), adapters, strict=True):
        layer = peft_model.base_model.model.get_submodule(index)
        torch.testing.assert_close(
            adapter.lora_down.weight, layer.lora_A["default"].weight, rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(
            adapter.lora_up.weight, layer.lora_B["default"].weight, rtol=1e-5, atol=1e-6
        )


def test_bf16_factors_stay_finite_for_200_steps_at_a_high_learning_rate() -> None:
    model = TwoLayers().to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.lora_parameters(), lr=5e-2)
    preconditioner = LoRAPreconditioner(model.adapters, Settings())
    preconditioner.attach(optimizer)
    x, image = _inputs()
    for _ in range(200):
        model(x.bfloat16(), image.bfloat16()).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.isfinite(p).all() for p in model.lora_parameters())
    assert model.adapters[0].lora_down.weight.dtype == torch.bfloat16


def test_a_step_the_fp16_scaler_skips_never_reaches_the_preconditioner() -> None:
    model = TwoLayers()
    optimizer = torch.optim.SGD(model.lora_parameters(), lr=0.1)
    preconditioner = LoRAPreconditioner(model.adapters, Settings())
    preconditioner.attach(optimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    x, image = _inputs()
    scaler.scale(model(x * float("inf"), image)).backward()
    before = [p.detach().clone() for p in model.lora_parameters()]
    scaler.step(optimizer)
    scaler.update()
    assert preconditioner.applied_steps == 0
    assert all(torch.equal(p, q) for p, q in zip(model.lora_parameters(), before, strict=True))


def _statistics_run(
    settings: Settings, steps: int, *, skipped: tuple[int, ...] = ()
) -> tuple[TwoLayers, LoRAPreconditioner]:
    """SGD steps on TwoLayers with AdaPreLoRA; the backward passes in `skipped` are followed by
    zero_grad without a step, as after a step the fp16 scaler skipped."""
    model = TwoLayers()
    optimizer = torch.optim.SGD(model.lora_parameters(), lr=1e-2)
    preconditioner = LoRAPreconditioner(model.adapters, settings)
    preconditioner.attach(optimizer)
    for step in range(steps):
        model(*_inputs(seed=step)).backward()
        if step not in skipped:
            optimizer.step()
        optimizer.zero_grad()
    return model, preconditioner


ADAPRELORA = Settings(method="adaprelora", probes=4, beta2=0.9)


def test_adaprelora_state_round_trips_and_a_resumed_run_continues_exactly() -> None:
    """Moments and the step count (which seeds the probes) travel in the state: a fresh
    preconditioner loaded from it continues as the original does, bit for bit."""
    settings = replace(ADAPRELORA, statistics_every=2)
    straight, _ = _statistics_run(settings, 5)
    model, stopped = _statistics_run(settings, 3)
    state = stopped.state_dict()
    assert state["applied_steps"] == 3 and state["statistics_updates"] == 2
    assert state["rows"][0].abs().sum() > 0
    resumed = TwoLayers()
    resumed.load_state_dict(model.state_dict())
    optimizer = torch.optim.SGD(resumed.lora_parameters(), lr=1e-2)
    preconditioner = LoRAPreconditioner(resumed.adapters, settings)
    preconditioner.load_state_dict(state)
    preconditioner.attach(optimizer)
    for step in (3, 4):
        resumed(*_inputs(seed=step)).backward()
        optimizer.step()
        optimizer.zero_grad()
    for mine, theirs in zip(resumed.lora_parameters(), straight.lora_parameters(), strict=True):
        assert torch.equal(mine, theirs)
    other = LoRAPreconditioner(TwoLayers().adapters, Settings())
    with pytest.raises(ValueError, match="adaprelora"):
        other.load_state_dict(state)


def test_adaprelora_takes_statistics_every_n_steps() -> None:
    """With `statistics_every=3` the taps sketch only steps 0, 3, 6; the moments take those with
    Adafactor's decay over three steps and stay put in between."""
    model = TwoLayers()
    optimizer = torch.optim.SGD(model.lora_parameters(), lr=1e-2)
    preconditioner = LoRAPreconditioner(model.adapters, replace(ADAPRELORA, statistics_every=3))
    preconditioner.attach(optimizer)
    statistics = [group.statistics for group in preconditioner.groups]
    for step in range(7):
        model(*_inputs(seed=step)).backward()
        sketched = [bool(group.sketch_rows.abs().sum() > 0) for group in statistics]
        assert sketched == [step % 3 == 0] * len(sketched)  # the taps skip the other steps
        energy = statistics[0].energies()[0].clone()
        before = statistics[0].moment_rows.clone()
        optimizer.step()
        after = statistics[0].moment_rows
        if step % 3 == 0:
            torch.testing.assert_close(after, 0.9**3 * before + (1 - 0.9**3) * (energy + 1e-30))
            assert all(group.sketch_rows.abs().sum() == 0 for group in statistics)  # emptied
        else:
            assert torch.equal(after, before)
        optimizer.zero_grad()
    assert preconditioner.statistics_updates == 3
    assert all(torch.isfinite(p).all() for p in model.lora_parameters())


def test_adaprelora_drops_the_sketches_of_a_step_that_was_not_taken() -> None:
    """A backward pass whose step was not taken (the fp16 scaler skipped it; here: zero_grad
    without a step) leaves sketches behind; the next step's statistics are those of its own
    backward pass alone, as in a run that never saw the skipped batch."""
    model, preconditioner = _statistics_run(ADAPRELORA, 3, skipped=(1,))
    reference = TwoLayers()
    optimizer = torch.optim.SGD(reference.lora_parameters(), lr=1e-2)
    clean = LoRAPreconditioner(reference.adapters, ADAPRELORA)
    clean.attach(optimizer)
    for step in (0, 2):
        reference(*_inputs(seed=step)).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert preconditioner.applied_steps == clean.applied_steps == 2
    for mine, theirs in zip(preconditioner.groups, clean.groups, strict=True):
        torch.testing.assert_close(mine.statistics.moment_rows, theirs.statistics.moment_rows)
        torch.testing.assert_close(mine.statistics.moment_cols, theirs.statistics.moment_cols)
    for mine, theirs in zip(model.lora_parameters(), reference.lora_parameters(), strict=True):
        torch.testing.assert_close(mine, theirs)


def test_coverage_names_what_is_left_out_and_finds_pairs_by_adapter_not_names() -> None:
    model = TwoLayers()
    network = _network(model)
    network.magnitude = nn.Parameter(torch.ones(6))  # like a DoRA magnitude: trainable, unpaired
    model.adapters[1].lora_up.weight.requires_grad_(False)  # its partner, A, stays trainable
    coverage = find_coverage(network)
    assert [adapter.name for adapter in coverage.adapters] == ["first", "conv"]
    assert sorted(coverage.left_out) == [
        ("adapters.second.lora_down.weight", "a LoRA factor whose partner is frozen"),
        (
            "magnitude",
            "not a LoRA factor pair, e.g. a DoRA magnitude, an embedding or a LoHa factor",
        ),
    ]
    summary = coverage.summary("adaprelora")
    assert "2 LoRA layers (unet: 2 layers at rank 2)" in summary
    assert "NOT preconditioned: 2 tensors" in summary


def test_switching_it_on_with_nothing_to_serve_is_a_user_error() -> None:
    from modules.config.schema import TrainConfig
    from modules.errors import UserError
    from modules.training.preconditioning import attach_preconditioner

    model = TwoLayers()
    for adapter in model.adapters:  # only the down factors train
        adapter.lora_up.weight.requires_grad_(False)
    network = _network(model)
    config = TrainConfig.model_validate(
        {"model": {"base_model": "x"}, "lora": {"preconditioner": "riemannian"}}
    )
    optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad])
    with pytest.raises(UserError, match="no LoRA layer has both factors trainable"):
        attach_preconditioner(
            config=config, network=network, optimizer=optimizer, accelerator=Accelerator()
        )
    assert not optimizer._optimizer_step_pre_hooks
