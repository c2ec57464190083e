"""LoRA adapters: their factor pair, the exact residual they add, and where they are injected."""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from modules.errors import UserError
from modules.lora.layers import LoRAConv2d, LoRALinear, LoRAModule
from modules.lora.network import LoRANetwork, LoRATarget, select_layers
from modules.models.sdxl.layers import UNET_LAYER_PRESETS, sdxl_lora_targets

ADAPTERS = {
    "linear": lambda: LoRALinear(base=nn.Linear(6, 5), name="lin", rank=3, alpha=1.5),
    "conv": lambda: LoRAConv2d(
        base=nn.Conv2d(4, 6, 3, stride=2, padding=1), name="conv", rank=2, alpha=3.0
    ),
}


@pytest.fixture(params=sorted(ADAPTERS))
def adapter(request: pytest.FixtureRequest) -> LoRAModule:
    torch.manual_seed(0)
    return ADAPTERS[request.param]()


def assert_paired(adapter: LoRAModule) -> None:
    """`factors` is the live (A, B): the Parameters the adapter computes with right now, with
    nothing attached to them."""
    down, up = adapter.factors
    assert down is adapter.lora_down.weight and up is adapter.lora_up.weight
    assert down.shape[0] == up.shape[1] == adapter.rank
    assert not {"_lora_pair", "_lora_role"} & (set(vars(down)) | set(vars(up)))


def randomize_up(adapter: LoRAModule) -> None:
    with torch.no_grad():
        adapter.lora_up.weight.normal_(std=0.5)


# -- the factor pair --------------------------------------------------------------------------------


def test_factors_are_the_down_and_up_weights(adapter: LoRAModule) -> None:
    assert_paired(adapter)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_pair_follows_dtype_conversion(adapter: LoRAModule, dtype: torch.dtype) -> None:
    adapter.to(dtype)
    assert adapter.lora_down.weight.dtype == dtype
    assert_paired(adapter)


def test_pair_follows_swapping_conversion(adapter: LoRAModule) -> None:
    """With swap_tensors, `.to()` replaces each Parameter's contents, attributes included."""
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        adapter.to(torch.float64)
        adapter.to(torch.bfloat16)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
    assert torch.__future__.get_swap_module_params_on_conversion() == previous
    assert adapter.lora_down.weight.dtype == torch.bfloat16
    assert_paired(adapter)


def test_pair_follows_load_state_dict(adapter: LoRAModule) -> None:
    torch.manual_seed(1)
    other = ADAPTERS["linear" if isinstance(adapter, LoRALinear) else "conv"]()
    randomize_up(other)
    adapter.load_state_dict(other.state_dict())
    assert torch.equal(adapter.lora_up.weight, other.lora_up.weight)
    assert_paired(adapter)


def test_pair_follows_load_state_dict_assign(adapter: LoRAModule) -> None:
    state = {key: value.clone() for key, value in adapter.state_dict().items()}
    adapter.load_state_dict(state, assign=True)
    assert_paired(adapter)


def test_pair_follows_deepcopy(adapter: LoRAModule) -> None:
    assert_paired(copy.deepcopy(adapter))


def test_keyword_only_constructor() -> None:
    with pytest.raises(TypeError):
        LoRALinear(nn.Linear(4, 4), "x", 4, 4.0)
    with pytest.raises(TypeError):
        LoRAConv2d(nn.Conv2d(4, 4, 1), "x", 4, 4.0)


def test_rank_must_be_positive() -> None:
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoRALinear(base=nn.Linear(4, 4), name="x", rank=0, alpha=1.0)


# -- what the adapter adds ----------------------------------------------------------------------


def _input_for(adapter: LoRAModule) -> torch.Tensor:
    if isinstance(adapter, LoRALinear):
        return torch.randn(2, 3, adapter.base.in_features, dtype=torch.float64)
    return torch.randn(2, adapter.base.in_channels, 9, 9, dtype=torch.float64)


def test_up_starts_at_zero_so_output_is_unchanged(adapter: LoRAModule) -> None:
    assert torch.count_nonzero(adapter.lora_up.weight) == 0
    assert torch.count_nonzero(adapter.lora_down.weight) > 0
    adapter.base.double()
    adapter.double()
    x = _input_for(adapter)
    before = adapter.base(x)
    adapter.attach()
    assert torch.equal(adapter.base(x), before)


def test_linear_adds_scaled_low_rank_product() -> None:
    torch.manual_seed(0)
    base = nn.Linear(6, 5).double()
    adapter = LoRALinear(base=base, name="lin", rank=3, alpha=1.5).double()
    randomize_up(adapter)
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    base_out = base(x)
    adapter.attach()
    A, B = adapter.lora_down.weight, adapter.lora_up.weight
    assert adapter.scale == 1.5 / 3
    expected = 0.5 * torch.einsum("or,ri,bti->bto", B, A, x)
    torch.testing.assert_close(base(x) - base_out, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(adapter.merged_delta_weight(), 0.5 * B @ A, rtol=0, atol=1e-12)


def test_a_loaded_alpha_sets_the_scale_the_delta_uses() -> None:
    """Files bring their own alpha; the forward pass must use it (not the alpha at init)."""
    torch.manual_seed(0)
    base = nn.Linear(6, 5).double()
    adapter = LoRALinear(base=base, name="lin", rank=3, alpha=1.5).double()
    randomize_up(adapter)
    adapter.attach()
    x = torch.randn(4, 6, dtype=torch.float64)
    plain = F.linear(x, base.weight, base.bias)
    delta_before = base(x) - plain
    state = {key: value.clone() for key, value in adapter.state_dict().items()}
    state["alpha"] = torch.tensor(6.0, dtype=torch.float64)
    adapter.load_state_dict(state)
    assert adapter.scale == 6.0 / 3
    torch.testing.assert_close(base(x) - plain, 4 * delta_before, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=1),
        dict(kernel_size=3, padding=2, dilation=2, bias=False),
    ],
    ids=["3x3-stride2", "1x1", "3x3-dilated"],
)
def test_conv_matches_merged_weight(conv: dict) -> None:
    torch.manual_seed(0)
    base = nn.Conv2d(4, 6, **conv).double()
    adapter = LoRAConv2d(base=base, name="conv", rank=2, alpha=3.0).double()
    randomize_up(adapter)
    adapter.attach()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    merged = base.weight + adapter.merged_delta_weight()
    assert merged.shape == base.weight.shape
    expected = F.conv2d(
        x, merged, base.bias, stride=base.stride, padding=base.padding, dilation=base.dilation
    )
    torch.testing.assert_close(base(x), expected, rtol=0, atol=1e-12)


def test_dropout_only_in_train_mode() -> None:
    torch.manual_seed(0)
    base = nn.Linear(16, 8).double()
    adapter = LoRALinear(base=base, name="lin", rank=8, alpha=8.0, dropout=0.5).double()
    randomize_up(adapter)
    adapter.attach()
    x = torch.randn(4, 16, dtype=torch.float64)
    A, B = adapter.lora_down.weight, adapter.lora_up.weight
    exact = (x @ base.weight.T + base.bias) + adapter.scale * (x @ A.T @ B.T)
    adapter.eval()
    torch.testing.assert_close(base(x), exact, rtol=0, atol=1e-12)
    adapter.train()
    assert not torch.allclose(base(x), exact)
    adapter.eval()
    torch.testing.assert_close(base(x), exact, rtol=0, atol=1e-12)


def test_detach_removes_the_effect(adapter: LoRAModule) -> None:
    adapter.base.double()
    adapter.double()
    randomize_up(adapter)
    x = _input_for(adapter)
    plain = adapter.base(x)
    adapter.attach()
    adapter.attach()  # idempotent: one hook, one delta
    with_lora = adapter.base(x)
    assert not torch.allclose(with_lora, plain)
    adapter.detach()
    assert torch.equal(adapter.base(x), plain)
    adapter.detach()  # detaching twice is harmless
    adapter.attach()
    assert torch.equal(adapter.base(x), with_lora)


def test_grouped_conv_is_refused_with_user_error() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 1))
    target = LoRATarget(part="unet", kohya_prefix="lora_unet", model=model)
    with pytest.raises(
        UserError, match=r"cannot put LoRA on unet layer \S*0: grouped Conv2d \(groups=2\)"
    ):
        LoRANetwork.inject([(target, ["re:^0$"])], rank=2, alpha=2.0, dropout=0.0)
    assert not model[0]._forward_hooks


# -- injection into a tiny SDXL -----------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tiny_sdxl_path: Path) -> dict[str, nn.Module]:
    return {
        "unet": UNet2DConditionModel.from_pretrained(tiny_sdxl_path / "unet").eval(),
        "text_encoder": CLIPTextModel.from_pretrained(tiny_sdxl_path / "text_encoder").eval(),
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(
            tiny_sdxl_path / "text_encoder_2"
        ).eval(),
    }


@contextlib.contextmanager
def injected(
    models: dict[str, nn.Module],
    *,
    parts: set[str],
    preset: str = "attn-mlp",
    patterns: list[str] | None = None,
    dropout: float = 0.0,
) -> Iterator[LoRANetwork]:
    targets = sdxl_lora_targets(
        modules=models, train_parts=parts, layer_preset=preset, layer_patterns=patterns or []
    )
    network = LoRANetwork.inject(targets, rank=4, alpha=2.0, dropout=dropout)
    try:
        yield network
    finally:
        network.detach()
        for model in models.values():
            assert not any(module._forward_hooks for module in model.modules())


def _unet_paths(models: dict[str, nn.Module], preset: str) -> dict[str, str]:
    with injected(models, parts={"unet"}, preset=preset) as network:
        return dict(network.module_path)


def test_presets_grow(models: dict[str, nn.Module]) -> None:
    attn, attn_mlp, full = (_unet_paths(models, preset) for preset in ("attn", "attn-mlp", "full"))
    assert 0 < len(attn) < len(attn_mlp) < len(full)
    assert attn.items() <= attn_mlp.items() <= full.items()
    assert all(re.search(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$", p) for p in attn.values())
    assert all(name.startswith("lora_unet_") for name in full)
    mlp = set(attn_mlp.values()) - set(attn.values())
    assert mlp and all(re.search(r"(\.ff\.net\.(0\.proj|2)|proj_in|proj_out)$", p) for p in mlp)
    extra = set(full.values()) - set(attn_mlp.values())
    modules = dict(models["unet"].named_modules())
    assert any(isinstance(modules[p], nn.Conv2d) for p in extra)
    assert all(
        re.search(r"(conv1|conv2|conv_shortcut|time_emb_proj|samplers\.0\.conv)$", p) for p in extra
    )


def test_attn_mlp_is_sd_scripts_default_set(models: dict[str, nn.Module]) -> None:
    """sd-scripts' default SDXL LoRA adapts every Linear inside the Transformer2DModel blocks."""
    unet = models["unet"]
    expected = {
        f"{block_path}.{path}"
        for block_path, block in unet.named_modules()
        if type(block).__name__ == "Transformer2DModel"
        for path, module in block.named_modules()
        if isinstance(module, nn.Linear)
    }
    assert set(_unet_paths(models, "attn-mlp").values()) == expected


def test_attn_names_follow_kohya(models: dict[str, nn.Module]) -> None:
    paths = _unet_paths(models, "attn")
    for name, path in paths.items():
        assert name == "lora_unet_" + path.replace(".", "_")
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0" in paths, sorted(
        paths
    )


def test_text_encoder_names(models: dict[str, nn.Module]) -> None:
    with injected(models, parts={"text_encoder", "text_encoder_2"}) as network:
        assert network.parts() == ["text_encoder", "text_encoder_2"]
        te1 = [n for n in network.adapters if network.part_of[n] == "text_encoder"]
        te2 = [n for n in network.adapters if network.part_of[n] == "text_encoder_2"]
    # 2 layers x (q, k, v, out, fc1, fc2)
    assert len(te1) == len(te2) == 12
    assert all(n.startswith("lora_te1_text_model_encoder_layers_") for n in te1)
    assert all(n.startswith("lora_te2_text_model_encoder_layers_") for n in te2)
    assert "lora_te1_text_model_encoder_layers_1_self_attn_out_proj" in te1
    assert "lora_te2_text_model_encoder_layers_0_mlp_fc2" in te2


def test_network_pairs_every_adapter_by_part(models: dict[str, nn.Module]) -> None:
    with injected(models, parts={"unet", "text_encoder"}, preset="full") as network:
        pairs = network.pairs()
        expected = [(a.lora_down.weight, a.lora_up.weight) for a in network.adapters.values()]
        assert pairs == expected
        by_part = [p for part in network.parts() for pair in network.pairs(part) for p in pair]
        assert sorted(map(id, by_part)) == sorted(id(p) for pair in pairs for p in pair)
        for part in network.parts():
            part_params = network.parameters_of(part)
            assert [p for pair in network.pairs(part) for p in pair] == part_params
        network.to(torch.float64)
        assert all(a.dtype == b.dtype == torch.float64 for a, b in network.pairs())


def test_injected_unet_output(models: dict[str, nn.Module]) -> None:
    unet = models["unet"]
    torch.manual_seed(0)
    inputs = dict(
        sample=torch.randn(1, 4, 16, 16),
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 8, unet.config.cross_attention_dim),
        added_cond_kwargs={"text_embeds": torch.randn(1, 32), "time_ids": torch.randn(1, 6)},
    )
    with torch.no_grad():
        plain = unet(**inputs).sample
        with injected(models, parts={"unet"}, preset="full") as network:
            assert torch.equal(unet(**inputs).sample, plain)
            for adapter in network.adapters.values():
                randomize_up(adapter)
            assert not torch.allclose(unet(**inputs).sample, plain)
        assert torch.equal(unet(**inputs).sample, plain)


def test_patterns_by_substring(models: dict[str, nn.Module]) -> None:
    selected = select_layers(models["unet"], patterns=["attn2.to_k"], part="unet")
    assert [path for path, _ in selected] == [
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
        "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
        "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
    ]


def test_substring_pattern_selects_only_linear_and_conv(models: dict[str, nn.Module]) -> None:
    selected = select_layers(models["unet"], patterns=["mid_block.attentions.0."], part="unet")
    paths = [path for path, _ in selected]
    assert all(isinstance(module, (nn.Linear, nn.Conv2d)) for _, module in selected)
    assert "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0" in paths
    assert not any(path.endswith((".norm1", ".to_out.1")) for path in paths)


def test_patterns_by_regex(models: dict[str, nn.Module]) -> None:
    selected = select_layers(
        models["unet"],
        patterns=[r"re:^mid_block\..*\.to_(q|v)$", "up_blocks.1.resnets.1.conv2"],
        part="unet",
    )
    assert sorted(path for path, _ in selected) == [
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_v",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_q",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
        "up_blocks.1.resnets.1.conv2",
    ]


def test_user_patterns_replace_the_preset(models: dict[str, nn.Module]) -> None:
    with injected(
        models, parts={"unet", "text_encoder"}, preset="full", patterns=["attn2.to_k"]
    ) as network:
        unet = [n for n in network.adapters if network.part_of[n] == "unet"]
        te = [n for n in network.adapters if network.part_of[n] == "text_encoder"]
    assert len(unet) == 4 and all(n.endswith("_attn2_to_k") for n in unet)
    assert len(te) == 12  # text encoders keep their own layer list


@pytest.mark.parametrize(
    "pattern",
    [
        "nope",
        "to_(q|k)",  # without `re:` a pattern is a plain substring
        "transformer_blocks.0.norm1",  # matches only a LayerNorm
    ],
)
def test_unmatched_pattern_is_named(models: dict[str, nn.Module], pattern: str) -> None:
    with (
        pytest.raises(UserError) as info,
        injected(models, parts={"unet"}, patterns=["attn2.to_k", pattern]),
    ):
        pass
    message = str(info.value)
    assert message == (
        f"lora layer pattern(s) {pattern!r} match no Linear or Conv2d layer of the unet; "
        "check lora.layer_patterns or use a layer preset"
    )
    assert not any(m._forward_hooks for m in models["unet"].modules())


def test_invalid_regex_is_a_user_error(models: dict[str, nn.Module]) -> None:
    with pytest.raises(UserError, match=r"layer pattern 're:to_\(q' is not a valid regex: "):
        select_layers(models["unet"], patterns=["re:to_(q"], part="unet")


def test_every_preset_is_known() -> None:
    assert sorted(UNET_LAYER_PRESETS) == ["attn", "attn-mlp", "full"]
