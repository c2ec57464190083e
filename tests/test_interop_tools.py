"""Our SDXL kohya files in other tools: every key reaches the layer it was trained on.

sd-scripts, A1111 and ComfyUI are driven through faithful reproductions of their key matching
(tests/interop_tools.py) on the original (SGM) checkpoint layout of a test model shaped like SDXL;
diffusers is the real library. Each tool's delta on each of its layers is compared with our
trainer's delta on the diffusers layer the single-file converter maps it to.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

from modules.lora.formats import save_lora
from modules.lora.layouts import GENERIC_LAYOUTS
from modules.lora.network import LoRANetwork
from modules.models.sdxl.keys import UNetPaths
from tests import interop_tools as tools
from tests.interop_models import build_sdxl_topology, make_network, sgm_modules_of
from tests.sgm_checkpoint import _unet_key, write_sgm_checkpoint
from tests.test_lora_formats import load_in_diffusers, rel_err, text_outs, unet_out

RANK = 4


@pytest.fixture(scope="module")
def sdxl_shaped(tiny_sdxl_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sdxl_topology(tiny_sdxl_path, tmp_path_factory.mktemp("models") / "sdxl-shaped")


@pytest.fixture(scope="module")
def pipe(sdxl_shaped: Path) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline.from_pretrained(sdxl_shaped)


@pytest.fixture(scope="module")
def checkpoint_modules(sdxl_shaped: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The layers of the single-file (SGM) checkpoint every one of these tools loads."""
    file = write_sgm_checkpoint(sdxl_shaped, tmp_path_factory.mktemp("sgm") / "model.safetensors")
    return tools.sgm_modules(safetensors.torch.load_file(file))


@pytest.fixture
def network_on(pipe: StableDiffusionXLPipeline) -> Iterator[Callable[..., LoRANetwork]]:
    made: list[LoRANetwork] = []

    def make(**kwargs) -> LoRANetwork:
        made.append(make_network(pipe, rank=RANK, **kwargs))
        return made[-1]

    yield make
    for network in made:
        network.detach()


def saved(network: LoRANetwork, folder: Path, layout: str = "kohya") -> dict[str, torch.Tensor]:
    file = folder / f"{layout}.safetensors"
    save_lora(network, file, layout=layout, metadata={}, dtype=torch.float32)
    return safetensors.torch.load_file(file)


def deltas_by_module(network: LoRANetwork, unet) -> dict[tuple[str, int | None], torch.Tensor]:
    """(checkpoint module, q/k/v third) -> our trainer's delta on the layer that becomes it."""
    modules = sgm_modules_of(network, unet)
    return {modules[name]: a.merged_delta_weight().detach() for name, a in network.adapters.items()}


# --- the name map itself ---------------------------------------------------------------------


def _linear_and_conv(unet: UNet2DConditionModel) -> list[str]:
    return [
        path
        for path, module in unet.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
    ]


@pytest.mark.parametrize("model", ["tiny", "sdxl-shaped"])
def test_sgm_names_are_the_original_checkpoints(
    model: str, tiny_sdxl_path: Path, sdxl_shaped: Path
) -> None:
    """Every layer of the UNet maps to the module the single-file checkpoint has, and back."""
    folder = tiny_sdxl_path if model == "tiny" else sdxl_shaped
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    paths = UNetPaths.from_config(unet.config)
    layers = _linear_and_conv(unet)
    per_block = unet.config.layers_per_block + 1
    with_attention = {i for i, kind in enumerate(unet.config.up_block_types) if "CrossAttn" in kind}
    for path in layers:
        expected = _unet_key(f"{path}.weight", per_block, with_attention).removesuffix(".weight")
        assert paths.to_sgm(path) == expected, path
        assert paths.to_diffusers(expected) == path, expected
    assert paths.to_sgm("down_blocks.9.resnets.0.conv1") is None
    assert paths.to_diffusers("input_blocks.99.0.in_layers.2") is None


# sd-scripts' `make_unet_conversion_map` (library/sdxl_model_util.py) for SDXL, as (SGM prefix,
# diffusers prefix): three levels, two ResNets per down level, three per up level, the upsampler
# of every up level at slot 2 (after its transformer).
def _sd_scripts_sdxl_map() -> list[tuple[str, str]]:
    pairs = []
    for i in range(3):
        for j in range(2):
            pairs.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            pairs.append((f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(3):
            pairs.append((f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            pairs.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        pairs.append((f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
        pairs.append((f"output_blocks.{3 * i + 2}.2.", f"up_blocks.{i}.upsamplers.0."))
    pairs.append(("middle_block.1.", "mid_block.attentions.0."))
    pairs += [(f"middle_block.{2 * j}.", f"mid_block.resnets.{j}.") for j in range(2)]
    return pairs


_SD_SCRIPTS_RESNET = [
    ("in_layers.2.", "conv1."),
    ("out_layers.3.", "conv2."),
    ("emb_layers.1.", "time_emb_proj."),
    ("skip_connection.", "conv_shortcut."),
]


def test_real_sdxl_names_agree_with_sd_scripts() -> None:
    """On the real SDXL UNet config (built on the meta device: no weights), every layer gets
    the name sd-scripts' own diffusers <-> SDXL conversion table gives it."""
    config = {
        "act_fn": "silu",
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280],
        "cross_attention_dim": 2048,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "layers_per_block": 2,
        "projection_class_embeddings_input_dim": 2816,
        "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "use_linear_projection": True,
    }
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    paths = UNetPaths.from_config(unet.config)
    checked = []
    for path in _linear_and_conv(unet):
        for sgm_prefix, diffusers_prefix in _sd_scripts_sdxl_map():
            if not (path + ".").startswith(diffusers_prefix):
                continue
            inside = (path + ".").removeprefix(diffusers_prefix)
            if "resnets" in diffusers_prefix:
                inside = next(s for s, d in _SD_SCRIPTS_RESNET if inside == d)
            assert paths.to_sgm(path) == (sgm_prefix + inside).rstrip("."), path
            checked.append(path)
    # every layer inside the blocks, once (conv_in, the embeddings and conv_out are outside)
    assert len(checked) == len(set(checked)) == len(_linear_and_conv(unet)) - 6 == 788
    assert paths.to_sgm("up_blocks.0.upsamplers.0.conv") == "output_blocks.2.2.conv"


# --- sd-scripts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("preset", "conv_dim"), [("attn-mlp", None), ("full", RANK)], ids=["default", "conv_dim"]
)
def test_sd_scripts_network_weights_takes_every_key(
    preset: str,
    conv_dim: int | None,
    network_on,
    pipe: StableDiffusionXLPipeline,
    checkpoint_modules: dict,
    tmp_path: Path,
) -> None:
    """`--network_weights` (load_state_dict, strict=False) on the network sd-scripts builds for
    the same settings: our attn-mlp file is its default network, `full` its conv_dim network;
    no key unexpected, none missing, every shape right."""
    tensors = saved(network_on(preset=preset), tmp_path)
    expected = tools.sd_scripts_network(checkpoint_modules, network_dim=RANK, conv_dim=conv_dim)
    for prefix, encoder in (("lora_te1", pipe.text_encoder), ("lora_te2", pipe.text_encoder_2)):
        expected |= tools.sd_scripts_text_encoder(encoder, prefix=prefix, network_dim=RANK)
    state = {
        f"{name}.{part}"
        for name in expected
        for part in ("lora_down.weight", "lora_up.weight", "alpha")
    }
    assert set(tensors) == state
    for name, (down, up) in expected.items():
        assert tuple(tensors[f"{name}.lora_down.weight"].shape) == down, name
        assert tuple(tensors[f"{name}.lora_up.weight"].shape) == up, name


def test_sd_scripts_ignored_every_unet_key_of_diffusers_names(
    network_on, checkpoint_modules: dict, tmp_path: Path
) -> None:
    """What the SGM names fix: a file with diffusers block names (our old kohya files, the
    generic layout) matches no UNet layer of sd-scripts' network, silently."""
    tensors = saved(network_on(preset="attn-mlp", layouts=GENERIC_LAYOUTS), tmp_path)
    network = tools.sd_scripts_network(checkpoint_modules, network_dim=RANK, conv_dim=None)
    unet_keys = {key for key in tensors if key.startswith("lora_unet_")}
    assert unet_keys and not {key.split(".")[0] for key in unet_keys} & set(network)


def test_sd_scripts_merge_puts_each_delta_on_its_layer(
    network_on, pipe: StableDiffusionXLPipeline, checkpoint_modules: dict, tmp_path: Path
) -> None:
    """sdxl_merge_lora.py: every UNet key finds its module, and the merged delta (up @ down *
    alpha / dim) is our trainer's delta on the same layer."""
    network = network_on(preset="full", parts={"unet"})
    tensors = saved(network, tmp_path)
    name_to_module = tools.sd_scripts_merge_modules(checkpoint_modules)
    ours = deltas_by_module(network, pipe.unet)
    merged = 0
    for key in tensors:
        if not key.endswith(".lora_down.weight"):
            continue
        stem = key.removesuffix(".lora_down.weight")
        assert stem in name_to_module, f"no module found for LoRA weight: {key}"
        module = name_to_module[stem]
        weights = {
            "lora_down.weight": tensors[key],
            "lora_up.weight": tensors[f"{stem}.lora_up.weight"],
        }
        weights["alpha"] = tensors[f"{stem}.alpha"]
        delta = tools.a1111_delta(weights, checkpoint_modules[module])
        torch.testing.assert_close(delta, ours[module, None], rtol=1e-5, atol=1e-7)
        merged += 1
    assert merged == len(network.adapters)


# --- A1111 -----------------------------------------------------------------------------------


def test_a1111_applies_every_key_of_a_full_file(
    network_on, pipe: StableDiffusionXLPipeline, checkpoint_modules: dict, tmp_path: Path
) -> None:
    network = network_on(preset="full")
    tensors = saved(network, tmp_path)
    load = tools.a1111_load(tensors, tools.a1111_layer_mapping(checkpoint_modules))
    assert load.failed == {}

    ours = deltas_by_module(network, pipe.unet)
    applied = 0
    for key, weights in load.matched.items():
        assert {"lora_down.weight", "lora_up.weight"} <= set(weights), key
        module = load.modules[key]
        layer = checkpoint_modules[module]
        third = None
        if layer.kind == "mha":  # OpenCLIP's fused attention takes q, k, v and out together
            base, projection, _ = key.rsplit("_", 2)
            assert all(f"{base}_{p}_proj" in load.matched for p in ("q", "k", "v", "out")), key
            third = "qkv".index(projection)
        delta = tools.a1111_delta(weights, layer)
        torch.testing.assert_close(delta, ours[module, third], rtol=1e-5, atol=1e-7)
        applied += 1
    assert applied == len(network.adapters)


def test_a1111_dropped_the_upsampler_of_diffusers_names(
    network_on, checkpoint_modules: dict, tmp_path: Path
) -> None:
    """With diffusers block names, A1111's SD1 numbering sends up_blocks.0's upsampler to a
    layer SDXL does not have: its three keys failed to match. SGM names (above) match all."""
    tensors = saved(network_on(preset="full", layouts=GENERIC_LAYOUTS), tmp_path)
    load = tools.a1111_load(tensors, tools.a1111_layer_mapping(checkpoint_modules))
    assert sorted(load.failed) == [
        f"lora_unet_up_blocks_0_upsamplers_0_conv.{part}"
        for part in ("alpha", "lora_down.weight", "lora_up.weight")
    ]


# --- ComfyUI / Forge -------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["attn-mlp", "full"])
def test_comfyui_loads_every_key(
    preset: str,
    network_on,
    pipe: StableDiffusionXLPipeline,
    checkpoint_modules: dict,
    tmp_path: Path,
) -> None:
    tensors = saved(network_on(preset=preset), tmp_path)
    layers = {
        "lora_te1": pipe.text_encoder.config.num_hidden_layers,
        "lora_te2": pipe.text_encoder_2.config.num_hidden_layers,
    }
    key_map = tools.comfyui_key_map(checkpoint_modules, layers)
    assert tools.comfyui_unloaded(tensors, key_map) == []
    assert tools.comfyui_unloaded({"lora_unet_nope.alpha": torch.ones(())}, key_map) != []


# --- diffusers (the real library) ------------------------------------------------------------


def test_diffusers_loads_sgm_names_on_sdxl_layout(
    network_on, pipe: StableDiffusionXLPipeline, sdxl_shaped: Path, tmp_path: Path
) -> None:
    """diffusers converts SGM names with the UNet's own layers per block (2, as SDXL)."""
    network = network_on(preset="full")
    file = tmp_path / "lora.safetensors"
    save_lora(network, file, layout="kohya", metadata={}, dtype=torch.float32)

    fresh, complaints = load_in_diffusers(sdxl_shaped, file)
    assert complaints == []
    assert rel_err(unet_out(fresh), unet_out(pipe)) < 1e-5
    fresh_text, ours = text_outs(fresh), text_outs(pipe)
    for what, ref in ours.items():
        assert rel_err(fresh_text[what], ref) < 1e-5, what
