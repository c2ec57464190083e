"""Block offloading: outputs and LoRA gradients equal the run with every block resident, and the
blocks' weights are away (empty placeholders) whenever they do not run.

On the CPU the "device" copies are real copies in the same memory, so what is checked here is
the bookkeeping: which weights are installed when, through forward, checkpoint recompute and
backward. The GPU test (skipped without CUDA) checks the memory it saves.
"""

from __future__ import annotations

import functools

import pytest
import torch
from memory_helpers import flux_inputs, lora_on_blocks, run, tiny_flux
from torch import nn

from modules.models.flux.memory import KEEP_PRECISE
from modules.models.offload import BlockOffloader, spread
from modules.models.quantize import quantize_frozen_linears


def blocks_of(model) -> list[nn.Module]:
    return [*model.transformer_blocks, *model.single_transformer_blocks]


def installed(block: nn.Module) -> bool:
    return all(p.numel() > 0 for p in block.parameters())


def train_steps(model, *, steps: int = 2, checkpointing: bool = True):
    """Outputs, losses and LoRA gradients of a few AdamW steps on a fixed batch."""
    network = lora_on_blocks(model)
    if checkpointing:
        model.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-2)
    inputs = flux_inputs()
    target = torch.randn(run(model, inputs).shape, generator=torch.Generator().manual_seed(9))
    losses, grads = [], []
    for _ in range(steps):
        loss = (run(model, inputs) - target).square().mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append({name: p.grad.clone() for name, p in network.named_parameters()})
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        output = run(model, inputs)
    return output, losses, grads


@functools.cache
def resident_run(*, checkpointing: bool = True, kind: str | None = None):
    """The reference: the same training with every block on the device."""
    model = tiny_flux()
    if kind is not None:
        quantize_frozen_linears(model, kind, keep=KEEP_PRECISE)
    return train_steps(model, checkpointing=checkpointing)


def assert_same_run(actual, expected) -> None:
    out, losses, grads = actual
    ref_out, ref_losses, ref_grads = expected
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(losses, ref_losses, rtol=0, atol=0)
    for step, ref_step in zip(grads, ref_grads, strict=True):
        assert step.keys() == ref_step.keys()
        for name in step:
            torch.testing.assert_close(step[name], ref_step[name], rtol=0, atol=0)


@pytest.mark.parametrize("checkpointing", [True, False])
@pytest.mark.parametrize("count", [4, 2])
def test_offloaded_run_equals_the_resident_one(count: int, checkpointing: bool) -> None:
    model = tiny_flux()
    blocks = blocks_of(model)
    offloader = BlockOffloader(blocks, spread(count, len(blocks)))
    assert len(offloader.offloaded) == count
    assert not any(installed(blocks[i]) for i in offloader.offloaded)
    seen: list[tuple[int, bool, int]] = []
    for index, block in enumerate(blocks):  # runs after the offloader's own pre-hook
        block.register_forward_pre_hook(
            lambda m, a, i=index: seen.append((i, installed(m), len(offloader.resident())))
        )
    expected = resident_run(checkpointing=checkpointing)
    assert_same_run(train_steps(model, checkpointing=checkpointing), expected)
    assert all(ready for _, ready, _ in seen)  # every block had its weights when it ran
    assert max(resident for _, _, resident in seen) <= 2  # the running one and the next
    # a no-grad forward ends with every offloaded block back in CPU memory
    assert offloader.resident() == set()
    assert offloader.offloaded_bytes == sum(
        offloader.block_bytes(i) for i in spread(count, len(blocks))
    )


def test_backward_leaves_at_most_one_block_on_the_device() -> None:
    """Checkpointing's recompute stops before a block's post-forward hook; the next block's
    arrival sends it back, so after backward only the last recomputed block is still there."""
    model = tiny_flux()
    network = lora_on_blocks(model)
    model.enable_gradient_checkpointing()
    blocks = blocks_of(model)
    offloader = BlockOffloader(blocks, range(len(blocks)))
    run(model, flux_inputs()).square().mean().backward()
    assert len(offloader.resident()) <= 1
    assert all(p.grad is not None for p in network.parameters())


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantized_blocks_offload_too(kind: str) -> None:
    model = tiny_flux()
    quantize_frozen_linears(model, kind, keep=KEEP_PRECISE)
    BlockOffloader(blocks_of(model), [0, 2, 3])
    assert_same_run(train_steps(model), resident_run(kind=kind))


def test_remove_puts_the_weights_back() -> None:
    model = tiny_flux()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    offloader = BlockOffloader(blocks_of(model), [1, 3])
    assert model.transformer_blocks[1].attn.to_q.weight.numel() == 0
    offloader.remove()
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0)
    torch.testing.assert_close(run(model, flux_inputs()), run(tiny_flux(), flux_inputs()))


def test_trainable_weights_are_refused() -> None:
    model = tiny_flux()
    model.transformer_blocks[0].ff.requires_grad_(True)
    with pytest.raises(ValueError, match="trainable; only frozen weights can be offloaded"):
        BlockOffloader(blocks_of(model), [0])


def test_spread_spaces_blocks_evenly() -> None:
    assert spread(0, 57) == []
    assert spread(57, 57) == list(range(57))
    assert spread(3, 57) == [9, 28, 47]
    assert len(set(spread(40, 57))) == 40
    with pytest.raises(ValueError, match="cannot offload 58 of 57 blocks"):
        spread(58, 57)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_offloading_saves_gpu_memory_and_keeps_results() -> None:
    device = torch.device("cuda")

    def peak_and_result(offload: bool):
        model = tiny_flux().to(device)
        if offload:
            blocks = blocks_of(model)
            BlockOffloader(blocks, range(len(blocks)))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        inputs = {k: v.to(device) for k, v in flux_inputs().items()}
        network = lora_on_blocks(model).to(device)
        model.enable_gradient_checkpointing()
        loss = run(model, inputs).square().mean()
        loss.backward()
        torch.cuda.synchronize()
        grads = [p.grad.cpu() for p in network.parameters()]
        return torch.cuda.max_memory_allocated(), start, loss.item(), grads

    resident_peak, resident_start, loss, grads = peak_and_result(False)
    offload_peak, offload_start, offload_loss, offload_grads = peak_and_result(True)
    assert offload_start < resident_start / 2  # the blocks' weights left the GPU
    assert offload_peak < resident_peak
    assert offload_loss == pytest.approx(loss, rel=1e-5)
    for grad, offload_grad in zip(grads, offload_grads, strict=True):
        torch.testing.assert_close(offload_grad, grad, rtol=1e-4, atol=1e-6)
