"""The preconditioner hook on real LoRA layers and optimizers, against float64 references."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn

from modules.lora.layers import LoRAConv2d, LoRALinear
from modules.lora.preconditioning.adaprelora import AdafactorWeights
from modules.lora.preconditioning.coverage import find_coverage
from modules.lora.preconditioning.linalg import Damping
from modules.lora.preconditioning.preconditioner import (
    LoRAPair,
    LoRAPreconditioner,
    PreconditionerSettings,
)
from modules.lora.preconditioning.sketch import LayerSketch, ProbeSource, install_tap
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


def _pairs(model: TwoLayers) -> list[LoRAPair]:
    return [
        LoRAPair(a=m.lora_down.weight, b=m.lora_up.weight, scale=m.scale, adapter=m)
        for m in model.adapters
    ]


def _inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 6, generator=g), torch.randn(2, 2, 5, 5, generator=g)


def test_step_applies_the_float64_directions_to_linear_and_conv_layers() -> None:
    model = TwoLayers(alpha=3.0)
    damping = Damping(relative=0.05, absolute=1e-6)
    optimizer = torch.optim.SGD(model.lora_parameters(), lr=1.0)
    LoRAPreconditioner(_pairs(model), PreconditionerSettings(damping=damping)).attach(optimizer)
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


def test_packed_factors_stay_packed_and_survive_what_trainers_do_to_parameters() -> None:
    model = TwoLayers()
    optimizer = torch.optim.AdamW(model.lora_parameters(), lr=1e-2)
    preconditioner = LoRAPreconditioner(_pairs(model), PreconditionerSettings())
    preconditioner.attach(optimizer)
    for _ in range(2):
        model(*_inputs()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    assert all(group.refresh() == 0 for group in preconditioner.groups)  # no repacking needed
    # set_to_none and a state-dict load with assign=True move tensors: the next step repacks
    state = copy.deepcopy(model.adapters[0].state_dict())
    model.adapters[0].load_state_dict(state, assign=True)
    optimizer.zero_grad(set_to_none=True)
    model(*_inputs()).backward()
    optimizer.step()  # the optimizer still updates its own (original) Parameter objects
    assert all(group.refresh() == 0 for group in preconditioner.groups)
    assert model.adapters[0].lora_down.weight._lora_pair is model.adapters[0].lora_up.weight
    # a gradient replaced by another tensor (not None) is found and copied into its slot too
    up = model.adapters[1].lora_up.weight
    up.grad = torch.full_like(up, 7.0)
    assert sum(group.refresh() for group in preconditioner.groups) == 1
    assert up.grad.eq(7.0).all() and any(
        group.grad_b.eq(7.0).any() for group in preconditioner.groups
    )
    assert all(group.refresh() == 0 for group in preconditioner.groups)


def test_huge_damping_with_adam_reproduces_plain_adamw() -> None:
    def run(precondition: bool) -> list[torch.Tensor]:
        model = TwoLayers().double()
        eps = 1e-20 if precondition else 1e-8  # the preconditioned gradient is g / 1e12
        optimizer = torch.optim.AdamW(model.lora_parameters(), lr=1e-2, eps=eps)
        if precondition:
            settings = PreconditionerSettings(damping=Damping(relative=0.0, absolute=1e12))
            LoRAPreconditioner(_pairs(model), settings).attach(optimizer)
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
        settings = PreconditionerSettings(method=method, sketch_size=4)
        preconditioner = LoRAPreconditioner(_pairs(model), settings)
        preconditioner.attach(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer)
        pipeline = _accelerated(model, optimizer, accumulation)
        pipeline.on_zero_grad.append(preconditioner.zero_)
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
    pairs = [
        LoRAPair(a=m.lora_down.weight, b=m.lora_up.weight, scale=m.scale, adapter=m)
        for m in adapters
    ]
    damping = Damping(relative=0.0, absolute=reg)  # PEFT: absolute damping, no s
    LoRAPreconditioner(pairs, PreconditionerSettings(damping=damping)).attach(optimizer)

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
    preconditioner = LoRAPreconditioner(_pairs(model), PreconditionerSettings())
    preconditioner.attach(optimizer)
    x, image = _inputs()
    for _ in range(200):
        model(x.bfloat16(), image.bfloat16()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    assert all(torch.isfinite(p).all() for p in model.lora_parameters())
    assert model.adapters[0].lora_down.weight.dtype == torch.bfloat16


def test_a_step_the_fp16_scaler_skips_never_reaches_the_preconditioner() -> None:
    model = TwoLayers()
    optimizer = torch.optim.SGD(model.lora_parameters(), lr=0.1)
    preconditioner = LoRAPreconditioner(_pairs(model), PreconditionerSettings())
    preconditioner.attach(optimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    x, image = _inputs()
    scaler.scale(model(x * float("inf"), image)).backward()
    before = [p.detach().clone() for p in model.lora_parameters()]
    scaler.step(optimizer)
    scaler.update()
    assert preconditioner.applied_steps == 0
    assert all(torch.equal(p, q) for p, q in zip(model.lora_parameters(), before, strict=True))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_adaprelora_sketch_estimates_the_exact_gradient_energies(kind: str) -> None:
    torch.manual_seed(0)
    if kind == "linear":
        layer = nn.Linear(12, 9)
        inputs = torch.randn(4, 5, 12)
    else:
        layer = nn.Conv2d(3, 4, kernel_size=3, padding=1, stride=2)
        inputs = torch.randn(2, 3, 8, 8)
    m, n = layer.weight.shape[0], layer.weight[0].numel()
    probes = ProbeSource(size=4096, seed=1)
    rows, cols = torch.zeros(m, 4096), torch.zeros(4096, n)
    handle = install_tap(LayerSketch(rows=rows, cols=cols, base=layer, probes=probes))
    for _ in range(2):  # two micro-batches: the sketch of their summed gradient
        layer(inputs).sin().sum().backward()
    handle.remove()
    full = layer.weight.grad.flatten(1).double()  # G accumulated over both micro-batches
    torch.testing.assert_close(
        rows.double().square().mean(-1), full.square().sum(1), rtol=0.1, atol=1e-6
    )
    torch.testing.assert_close(
        cols.double().square().mean(0), full.square().sum(0), rtol=0.1, atol=1e-6
    )


def test_adaprelora_state_round_trips_and_rejects_another_method() -> None:
    model = TwoLayers()
    optimizer = torch.optim.AdamW(model.lora_parameters(), lr=1e-2)
    settings = PreconditionerSettings(method="adaprelora", sketch_size=4)
    preconditioner = LoRAPreconditioner(_pairs(model), settings)
    preconditioner.attach(optimizer)
    model(*_inputs()).backward()
    optimizer.step()
    preconditioner.zero_()
    state = preconditioner.state_dict()
    assert state["applied_steps"] == 1 and state["rows"][0].abs().sum() > 0
    fresh = LoRAPreconditioner(_pairs(TwoLayers()), settings)
    fresh.load_state_dict(state)
    assert fresh.statistics is not None and fresh.statistics.cycle == 1
    torch.testing.assert_close(fresh.moments[0].rows, preconditioner.moments[0].rows)
    other = LoRAPreconditioner(_pairs(TwoLayers()), PreconditionerSettings())
    with pytest.raises(ValueError, match="adaprelora"):
        other.load_state_dict(state)


def test_adaprelora_refreshes_its_statistics_every_n_steps() -> None:
    """With `statistics_every=3` the taps sketch only steps 0, 3, 6; the moments take those with
    Adafactor's decay over three steps and stay put in between."""
    model = TwoLayers()
    optimizer = torch.optim.SGD(model.lora_parameters(), lr=1e-2)
    settings = PreconditionerSettings(
        method="adaprelora", sketch_size=4, beta2=0.9, statistics_every=3
    )
    preconditioner = LoRAPreconditioner(_pairs(model), settings)
    preconditioner.attach(optimizer)
    statistics = preconditioner.statistics
    assert statistics is not None
    for step in range(7):
        model(*_inputs(seed=step)).backward()
        sketched = [bool(rows.abs().sum() > 0) for rows, _ in statistics.sketches]
        assert sketched == [step % 3 == 0] * len(sketched)  # the taps skip the other steps
        energy = statistics.energies(0)[0].clone()
        before = preconditioner.moments[0].rows.clone()
        optimizer.step()
        after = preconditioner.moments[0].rows
        if step % 3 == 0:
            torch.testing.assert_close(after, 0.9**3 * before + (1 - 0.9**3) * (energy + 1e-30))
        else:
            assert torch.equal(after, before)
        optimizer.zero_grad(set_to_none=False)
        preconditioner.zero_()
    assert preconditioner.statistics_updates == 3
    assert all(torch.isfinite(p).all() for p in model.lora_parameters())


def test_adaprelora_weights_are_overwritten_in_place_by_updates_and_resume() -> None:
    """The pass, and so a CUDA graph recorded from it, reads each group's Adafactor weights from
    buffers that statistics updates and a resume overwrite and never replace; they always hold
    the weights of the bias-corrected moments, also when a run resumes a backup taken after as
    many statistics updates as it has made itself."""
    settings = PreconditionerSettings(
        method="adaprelora", sketch_size=4, beta2=0.9, statistics_every=2
    )

    def pointers(preconditioner: LoRAPreconditioner) -> list[tuple[int, int]]:
        return [(w.left.data_ptr(), w.right.data_ptr()) for w in preconditioner.weights]

    def train(seed: int) -> LoRAPreconditioner:
        model = TwoLayers(seed=seed)
        optimizer = torch.optim.SGD(model.lora_parameters(), lr=1e-2)
        preconditioner = LoRAPreconditioner(_pairs(model), settings)
        preconditioner.attach(optimizer)
        buffers = pointers(preconditioner)
        for step in range(5):
            model(*_inputs(seed=seed * 10 + step)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
            preconditioner.zero_()
            assert pointers(preconditioner) == buffers
            correction = 1 - 0.9 ** (2 * preconditioner.statistics_updates)
            layers = zip(preconditioner.weights, preconditioner.moments, strict=True)
            for weights, moments in layers:
                expected = AdafactorWeights.from_moments(
                    moments.rows / correction, moments.cols / correction
                )
                torch.testing.assert_close(weights.left, expected.left)
                torch.testing.assert_close(weights.right, expected.right)
        assert preconditioner.statistics_updates == 3
        return preconditioner

    original, resumed = train(seed=0), train(seed=1)
    assert not torch.allclose(original.weights[0].left, resumed.weights[0].left)
    buffers = pointers(resumed)
    resumed.load_state_dict(original.state_dict())
    resumed.adafactor_weights()  # what its next step does first
    assert pointers(resumed) == buffers
    for mine, theirs in zip(resumed.weights, original.weights, strict=True):
        assert torch.equal(mine.left, theirs.left) and torch.equal(mine.right, theirs.right)


def test_adaprelora_before_its_first_statistics_uses_unit_weights() -> None:
    """A first applied step between two statistics steps (the fp16 scaler skipped step 0) has no
    moments yet: unit Adafactor weights, finite directions."""
    model = TwoLayers()
    optimizer = torch.optim.SGD(model.lora_parameters(), lr=1e-2)
    settings = PreconditionerSettings(method="adaprelora", statistics_every=2)
    preconditioner = LoRAPreconditioner(_pairs(model), settings)
    preconditioner.attach(optimizer)
    preconditioner.zero_()  # what the trainer does after a skipped step: cycle 1 is not sketched
    model(*_inputs()).backward()
    optimizer.step()
    assert preconditioner.statistics_updates == 0
    assert all(torch.isfinite(p).all() and p.abs().sum() > 0 for p in model.lora_parameters())


def test_coverage_names_what_is_left_out_and_finds_pairs_by_links_not_names() -> None:
    model = TwoLayers()
    model.magnitude = nn.Parameter(torch.ones(6))  # like a DoRA magnitude: trainable, unpaired
    renamed = dict(model.named_parameters())
    coverage = find_coverage(
        ((f"tensor{i}", p) for i, p in enumerate(renamed.values())),  # names carry no hint
        modules=model.modules(),
        part_of={"first": "unet", "second": "unet", "conv": "unet"},
        needs_layer=True,
    )
    assert len(coverage.pairs) == 3
    assert [reason for _, reason in coverage.left_out] == [
        "not a linked LoRA factor, e.g. a DoRA magnitude, an embedding or a LoHa factor"
    ]
    summary = coverage.summary("adaprelora")
    assert "3 LoRA layers (unet: 3 layers at rank 2)" in summary
    assert "NOT preconditioned: 1 tensors" in summary


def test_switching_it_on_with_nothing_to_serve_is_a_user_error() -> None:
    from accelerate import Accelerator

    from modules.config.schema import TrainConfig
    from modules.errors import UserError
    from modules.lora.network import LoRANetwork
    from modules.training.preconditioning import attach_preconditioner

    model = TwoLayers()
    adapters = list(model.adapters)
    for adapter in adapters:  # adapters of a kind the preconditioner does not know (unlinked)
        for param in adapter.parameters():
            del param._lora_role, param._lora_pair
    network = LoRANetwork(
        adapters,
        part_of={a.name: "unet" for a in adapters},
        module_path={a.name: a.name for a in adapters},
        export_path={a.name: a.name for a in adapters},
    )
    config = TrainConfig.model_validate(
        {"model": {"base_model": "x"}, "lora": {"preconditioner": "riemannian"}}
    )
    optimizer = torch.optim.AdamW(network.parameters())
    with pytest.raises(UserError, match="no trainable tensor is a linked LoRA"):
        attach_preconditioner(
            config=config, network=network, optimizer=optimizer, accelerator=Accelerator()
        )
    assert not optimizer._optimizer_step_pre_hooks
