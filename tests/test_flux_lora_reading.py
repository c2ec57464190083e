"""Flux LoRA files read back: ours exactly in every layout, and other trainers' (sd-scripts'
plain LoRAs on fused layers, OneTrainer's names) split or refused with what to change."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

from modules.errors import UserError
from modules.lora.formats import load_lora_into, save_lora
from modules.lora.network import LoRANetwork
from modules.models.flux.lora_layouts import KOHYA_FLUX
from tests.flux_networks import PRESETS


@pytest.mark.parametrize("layout", ["kohya", "comfyui", "diffusers"])
@pytest.mark.parametrize("preset", PRESETS)
def test_every_layout_reads_back_exactly(
    layout: str, preset: str, flux_network_on, tmp_path: Path
) -> None:
    saved = flux_network_on(preset=preset, seed=1)
    file = tmp_path / "lora.safetensors"
    save_lora(saved, file, layout=layout, metadata={}, dtype=torch.float32)
    saved.detach()
    loaded = flux_network_on(preset=preset, seed=2)
    assert load_lora_into(loaded, file) == layout
    for name, adapter in loaded.adapters.items():
        expected = saved.adapters[name].merged_delta_weight()
        torch.testing.assert_close(adapter.merged_delta_weight(), expected, rtol=1e-6, atol=1e-7)
        if layout != "diffusers":  # kohya-style files keep A and B as they are
            assert torch.equal(adapter.lora_down.weight, saved.adapters[name].lora_down.weight)
            assert torch.equal(adapter.lora_up.weight, saved.adapters[name].lora_up.weight)


def _fused_delta(network: LoRANetwork, members: list[str]) -> torch.Tensor:
    """The fused layer's delta: its members' deltas stacked in output order."""
    return torch.cat([network.adapters[name].merged_delta_weight() for name in members])


def _sd_scripts_file(network: LoRANetwork, path: Path, *, rank: int, alpha: float) -> dict:
    """A LoRA as sd-scripts trains Flux: one plain (dense) LoRA per BFL layer, fused or not."""
    generator = torch.Generator().manual_seed(5)
    tensors = {}
    for stem, layer in KOHYA_FLUX.layers(network).items():
        some = network.adapters[next(iter(layer.adapters.values()))]
        width = some.lora_down.weight.shape[1]
        fused = layer.bfl is not None and layer.bfl.fused
        rows = sum(size for _, size in layer.rows(width)) if fused else some.base.out_features
        tensors[f"{stem}.lora_down.weight"] = torch.randn(rank, width, generator=generator)
        tensors[f"{stem}.lora_up.weight"] = torch.randn(rows, rank, generator=generator)
        tensors[f"{stem}.alpha"] = torch.tensor(alpha)
    safetensors.torch.save_file(tensors, path)
    return tensors


def test_a_plain_lora_on_fused_layers_splits_exactly(flux_network_on, tmp_path: Path) -> None:
    """Other trainers' fused LoRAs (dense B): every member takes A and its rows of B."""
    network = flux_network_on(preset="attn-mlp", rank=4, alpha=4)
    file = tmp_path / "sd-scripts.safetensors"
    tensors = _sd_scripts_file(network, file, rank=4, alpha=1.0)
    assert load_lora_into(network, file) == "kohya"
    layers = KOHYA_FLUX.layers(network)
    stem = "lora_unet_single_blocks_1_linear1"
    members = [layers[stem].adapters[index] for index in sorted(layers[stem].adapters)]
    assert len(members) == 4  # q, k, v and the MLP input
    expected = 0.25 * tensors[f"{stem}.lora_up.weight"] @ tensors[f"{stem}.lora_down.weight"]
    torch.testing.assert_close(_fused_delta(network, members), expected, rtol=1e-5, atol=1e-6)


def test_foreign_files_that_do_not_fit_say_what_to_change(flux_network_on, tmp_path: Path) -> None:
    network = flux_network_on(preset="attn-mlp", rank=4)
    dense = tmp_path / "rank8.safetensors"
    _sd_scripts_file(network, dense, rank=8, alpha=8.0)
    with pytest.raises(UserError, match=r"rank-8 LoRA per layer .* set lora.rank to 8"):
        load_lora_into(network, dense)

    ours = tmp_path / "ours.safetensors"
    save_lora(network, ours, layout="kohya", metadata={})
    wider = flux_network_on(preset="attn-mlp", rank=8)
    with pytest.raises(UserError, match=r"rank-4 LoRA per layer where this config has rank 8"):
        load_lora_into(wider, ours)

    linear1 = flux_network_on(
        patterns=[r"re:^single_transformer_blocks\.0\.(attn\.to_[qkv]|proj_mlp)$"]
    )
    save_lora(linear1, ours, layout="kohya", metadata={})
    qkv_only = flux_network_on(patterns=[r"re:^single_transformer_blocks\.0\.attn\.to_[qkv]$"])
    with pytest.raises(UserError, match=r"also trains single_transformer_blocks\.0\.proj_mlp"):
        load_lora_into(qkv_only, ours)


def test_onetrainer_names_are_read(flux_network_on, tmp_path: Path) -> None:
    """kohya suffixes on diffusers' module names (`lora_transformer_...`), as OneTrainer writes."""
    saved = flux_network_on(preset="attn", seed=3)
    tensors = {}
    for name, adapter in saved.adapters.items():
        tensors[f"{name}.lora_down.weight"] = adapter.lora_down.weight.detach().clone()
        tensors[f"{name}.lora_up.weight"] = adapter.lora_up.weight.detach().clone()
        tensors[f"{name}.alpha"] = adapter.alpha.clone()
    assert any(key.startswith("lora_transformer_transformer_blocks_0_attn_to_q") for key in tensors)
    file = tmp_path / "onetrainer.safetensors"
    safetensors.torch.save_file(tensors, file)
    saved.detach()
    loaded = flux_network_on(preset="attn", seed=4)
    assert load_lora_into(loaded, file) == "kohya-diffusers-names"
    for name, adapter in loaded.adapters.items():
        assert torch.equal(
            adapter.merged_delta_weight(), saved.adapters[name].merged_delta_weight()
        )
