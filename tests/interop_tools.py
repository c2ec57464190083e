"""How other tools match the keys of an SDXL LoRA file to the layers of their own model.

Written from the tools' key-matching code (facts, not their code) so the tests can drive our files
through it offline. Each tool's model is the original (SGM) SDXL checkpoint layout, taken from the
file `tests/sgm_checkpoint.py` writes for a test model (the layout every one of these tools loads):
- sd-scripts (networks/lora.py `LoRANetwork.create_modules`, library/sdxl_original_unet.py,
  networks/sdxl_merge_lora.py): LoRA layers are the Linear and Conv2d children of its UNet's
  Transformer2DModel blocks, plus, with `conv_dim`, of its ResnetBlock2D / Downsample2D /
  Upsample2D blocks, named `lora_unet_<SGM path with _>`; text encoders are Hugging Face CLIP
  models whose CLIPAttention / CLIPMLP children get `lora_te1_` / `lora_te2_`. `--network_weights`
  loads a file with `load_state_dict(strict=False)`, so a key of no layer is silently ignored;
  `sdxl_merge_lora.py` skips a key whose module it cannot find.
- A1111 (extensions-builtin/Lora/networks.py, 1.7+): `convert_diffusers_name_to_compvis` turns
  diffusers-style names into SD1-style compvis names, then the name is looked up among the model's
  modules (`diffusion_model_<SGM path>`, CLIP-L `0_transformer_text_model_...`, OpenCLIP-G
  `1_model_transformer_resblocks_<n>_{attn,attn_out_proj,mlp_c_fc,mlp_c_proj}`), with fallbacks
  for names already in SGM form; what matches nothing is reported as failed and dropped.
- ComfyUI (comfy/lora.py `model_lora_keys_unet` / `model_lora_keys_clip`, also what Forge uses):
  a key map from `lora_unet_<SGM path with _>` and `lora_te1_` / `lora_te2_` CLIP names (32
  layers, attention and MLP projections); keys outside the map are "not loaded".
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import torch

UNET = "model.diffusion_model."
CLIP_L = "conditioner.embedders.0.transformer."
OPEN_CLIP_G = "conditioner.embedders.1.model."
_MEMBER = re.compile(r"(input_blocks\.\d+\.\d+|middle_block\.\d+|output_blocks\.\d+\.\d+)\.(.+)")


@dataclass(frozen=True)
class Layer:
    """A layer of the tool's model that a LoRA can change."""

    kind: str  # "linear", "conv" or "mha" (OpenCLIP's fused attention)
    shape: tuple[int, ...]  # its weight's shape (in_proj_weight for "mha")


def sgm_modules(checkpoint: Mapping[str, torch.Tensor]) -> dict[str, Layer]:
    """Module path (with its checkpoint prefix) -> layer, for every weight-bearing module."""
    modules = {}
    for key, value in checkpoint.items():
        if key.endswith(".in_proj_weight"):
            modules[key.removesuffix(".in_proj_weight")] = Layer("mha", tuple(value.shape))
        elif key.endswith(".weight") and value.dim() in (2, 4):
            kind = "linear" if value.dim() == 2 else "conv"
            modules[key.removesuffix(".weight")] = Layer(kind, tuple(value.shape))
    return modules


def lora_shapes(layer: Layer, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(down, up) shapes of a rank-`rank` LoRA on `layer` (kohya LoCon for convolutions)."""
    out_dim, in_dim, *kernel = layer.shape
    if layer.kind == "conv":
        return (rank, in_dim, *kernel), (out_dim, rank, 1, 1)
    return (rank, in_dim), (out_dim, rank)


# --- sd-scripts ------------------------------------------------------------------------------


def sd_scripts_unet_blocks(modules: Mapping[str, Layer]) -> dict[str, str]:
    """SGM block member path -> the class sd-scripts' SDXL UNet has there."""
    children: dict[str, set[str]] = defaultdict(set)
    for path in modules:
        if path.startswith(UNET) and (match := _MEMBER.fullmatch(path.removeprefix(UNET))):
            children[match[1]].add(match[2])
    kinds = {}
    for member, names in children.items():
        if any(name.startswith("transformer_blocks.") for name in names):
            kinds[member] = "Transformer2DModel"
        elif any(name.startswith("in_layers.") for name in names):
            kinds[member] = "ResnetBlock2D"
        elif names == {"op"}:
            kinds[member] = "Downsample2D"
        elif names == {"conv"}:
            kinds[member] = "Upsample2D"
    return kinds


def sd_scripts_network(
    modules: Mapping[str, Layer], *, network_dim: int, conv_dim: int | None
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """UNet lora_name -> (down, up) shapes of the network `networks/lora.py` creates for SDXL
    (no `conv_dim`: the Transformer2DModel blocks only; with it, the ResNets and resamplers too,
    their 3x3 convolutions at conv_dim)."""
    targets = {"Transformer2DModel"}
    if conv_dim is not None:
        targets |= {"ResnetBlock2D", "Downsample2D", "Upsample2D"}
    blocks = sd_scripts_unet_blocks(modules)
    network = {}
    for path, layer in modules.items():
        if not path.startswith(UNET) or layer.kind == "mha":
            continue
        match = _MEMBER.fullmatch(path.removeprefix(UNET))
        if match is None or blocks.get(match[1]) not in targets:
            continue
        pointwise = layer.kind == "linear" or layer.shape[2:] == (1, 1)
        dim = network_dim if pointwise else conv_dim
        if dim:
            name = "lora_unet_" + path.removeprefix(UNET).replace(".", "_")
            network[name] = lora_shapes(layer, dim)
    return network


def sd_scripts_text_encoder(
    text_encoder: torch.nn.Module, *, prefix: str, network_dim: int
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """sd-scripts loads both SDXL text encoders as Hugging Face CLIP models: LoRA names come from
    their own module paths (under `text_model.`), for the CLIPAttention and CLIPMLP Linears."""
    network = {}
    for path, module in text_encoder.named_modules():
        full = path if path.startswith("text_model.") else f"text_model.{path}"
        if isinstance(module, torch.nn.Linear) and _clip_projection(full):
            layer = Layer("linear", tuple(module.weight.shape))
            network[f"{prefix}_" + full.replace(".", "_")] = lora_shapes(layer, network_dim)
    return network


def _clip_projection(path: str) -> bool:
    return re.search(r"\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$", path) is not None


def sd_scripts_merge_modules(modules: Mapping[str, Layer]) -> dict[str, str]:
    """`name_to_module` of sdxl_merge_lora.py for the UNet: lora_name -> SGM module path (every
    Linear/Conv2d child of every target class, whatever the file's dims)."""
    blocks = sd_scripts_unet_blocks(modules)
    names = {}
    for path, layer in modules.items():
        match = _MEMBER.fullmatch(path.removeprefix(UNET)) if path.startswith(UNET) else None
        if match and layer.kind != "mha" and match[1] in blocks:
            names["lora_unet_" + path.removeprefix(UNET).replace(".", "_")] = path
    return names


# --- A1111 -----------------------------------------------------------------------------------

_SUFFIX_CONVERSION = {
    "attentions": {},
    "resnets": {
        "conv1": "in_layers_2",
        "conv2": "out_layers_3",
        "norm1": "in_layers_0",
        "norm2": "out_layers_0",
        "time_emb_proj": "emb_layers_1",
        "conv_shortcut": "skip_connection",
    },
}
_X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")


def _compvis(key: str) -> str:
    """`convert_diffusers_name_to_compvis(key, is_sd2=False)`: SD1 block numbering."""

    def match(pattern: str) -> list | None:
        found = re.match(pattern, key)
        return [int(g) if g.isdigit() else g for g in found.groups()] if found else None

    if (m := match(r"lora_unet_conv_in(.*)")) is not None:
        return f"diffusion_model_input_blocks_0_0{m[0]}"
    if (m := match(r"lora_unet_conv_out(.*)")) is not None:
        return f"diffusion_model_out_2{m[0]}"
    if m := match(r"lora_unet_time_embedding_linear_(\d+)(.*)"):
        return f"diffusion_model_time_embed_{m[0] * 2 - 2}{m[1]}"
    if m := match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = _SUFFIX_CONVERSION.get(m[1], {}).get(m[3], m[3])
        inner = 1 if m[1] == "attentions" else 0
        return f"diffusion_model_input_blocks_{1 + m[0] * 3 + m[2]}_{inner}_{suffix}"
    if m := match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)"):
        suffix = _SUFFIX_CONVERSION.get(m[0], {}).get(m[2], m[2])
        return f"diffusion_model_middle_block_{1 if m[0] == 'attentions' else m[1] * 2}_{suffix}"
    if m := match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = _SUFFIX_CONVERSION.get(m[1], {}).get(m[3], m[3])
        inner = 1 if m[1] == "attentions" else 0
        return f"diffusion_model_output_blocks_{m[0] * 3 + m[2]}_{inner}_{suffix}"
    if m := match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv"):
        return f"diffusion_model_input_blocks_{3 + m[0] * 3}_0_op"
    if m := match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv"):
        return f"diffusion_model_output_blocks_{2 + m[0] * 3}_{2 if m[0] > 0 else 1}_conv"
    if m := match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)"):
        return f"transformer_text_model_encoder_layers_{m[0]}_{m[1]}"
    if m := match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)"):
        rest = m[1]
        if "mlp_fc1" in rest:
            rest = rest.replace("mlp_fc1", "mlp_c_fc")
        elif "mlp_fc2" in rest:
            rest = rest.replace("mlp_fc2", "mlp_c_proj")
        else:
            rest = rest.replace("self_attn", "attn")
        return f"1_model_transformer_resblocks_{m[0]}_{rest}"
    return key


def a1111_layer_mapping(modules: Mapping[str, Layer]) -> dict[str, str]:
    """`network_layer_mapping` of an SDXL model (to the checkpoint's module path): embedder i's
    modules as `<i>_<path>`, the UNet's as `diffusion_model_<path>` (dots as underscores)."""
    mapping = {}
    for path in modules:
        for prefix, name in (
            (UNET, "diffusion_model_"),
            ("conditioner.embedders.0.", "0_"),
            ("conditioner.embedders.1.", "1_"),
        ):
            if path.startswith(prefix):
                mapping[name + path.removeprefix(prefix).replace(".", "_")] = path
    return mapping


@dataclass
class A1111Load:
    matched: dict[str, dict[str, torch.Tensor]]  # compvis name -> {network part: tensor}
    modules: dict[str, str]  # compvis name -> the checkpoint module path it was matched to
    failed: dict[str, str]  # file key -> the name A1111 looked for


def a1111_load(tensors: Mapping[str, torch.Tensor], mapping: Mapping[str, str]) -> A1111Load:
    """`load_network`'s matching of every key of a LoRA file."""
    result = A1111Load(matched=defaultdict(dict), modules={}, failed={})
    for key_network, weight in tensors.items():
        stem, _, network_part = key_network.partition(".")
        key = _compvis(stem)
        module = mapping.get(key)
        if module is None and (m := _X_PROJ.match(key)):
            module = mapping.get(m[1])
        if module is None and "lora_unet" in stem:
            key = stem.replace("lora_unet", "diffusion_model")
            module = mapping.get(key)
        elif module is None and "lora_te1_text_model" in stem:
            key = stem.replace("lora_te1_text_model", "0_transformer_text_model")
            module = mapping.get(key)
            if module is None:
                key = stem.replace("lora_te1_text_model", "transformer_text_model")
                module = mapping.get(key)
        if module is None:
            result.failed[key_network] = key
            continue
        result.matched[key][network_part] = weight
        result.modules[key] = module
    return result


def a1111_delta(weights: Mapping[str, torch.Tensor], layer: Layer) -> torch.Tensor:
    """network_lora's `calc_updown` for one matched layer: up @ down * alpha / dim, shaped like
    the layer's weight (for OpenCLIP's fused attention: one of q, k, v's third of it)."""
    down, up = weights["lora_down.weight"].float(), weights["lora_up.weight"].float()
    dim = down.shape[0]
    alpha = float(weights["alpha"]) if "alpha" in weights else dim
    delta = up.flatten(1) @ down.flatten(1) * (alpha / dim)
    if layer.kind == "mha":
        return delta.reshape(layer.shape[0] // 3, layer.shape[1])
    return delta.reshape(layer.shape)


# --- ComfyUI / Forge -------------------------------------------------------------------------

LORA_CLIP_MAP = {
    "mlp.fc1": "mlp_fc1",
    "mlp.fc2": "mlp_fc2",
    "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.q_proj": "self_attn_q_proj",
    "self_attn.v_proj": "self_attn_v_proj",
    "self_attn.out_proj": "self_attn_out_proj",
}


def comfyui_key_map(modules: Mapping[str, Layer], clip_layers: Mapping[str, int]) -> set[str]:
    """The LoRA names ComfyUI's SDXL key map knows (their module targets do not matter here):
    `lora_unet_<SGM path>` for every UNet weight, `lora_te1_` / `lora_te2_` names of the
    CLIP-L / CLIP-G layers (`clip_layers`: layer count of each), both with LORA_CLIP_MAP."""
    names = {
        "lora_unet_" + path.removeprefix(UNET).replace(".", "_")
        for path in modules
        if path.startswith(UNET)
    }
    for prefix, count in clip_layers.items():
        for block in range(min(count, 32)):
            for lora in LORA_CLIP_MAP.values():
                names.add(f"{prefix}_text_model_encoder_layers_{block}_{lora}")
    return names


def comfyui_unloaded(tensors: Mapping[str, torch.Tensor], key_map: set[str]) -> list[str]:
    """Keys `load_lora` leaves "not loaded": those of no name in the key map (kohya suffixes)."""
    loaded = set()
    for name in key_map:
        for suffix in (".lora_up.weight", ".lora_down.weight", ".alpha"):
            if name + suffix in tensors:
                loaded.add(name + suffix)
    return sorted(set(tensors) - loaded)
