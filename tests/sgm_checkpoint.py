"""Write a diffusers SDXL folder as one `.safetensors` file in the original Stability (SGM) layout.

Most SDXL models are shared as such single files, and `modules/models/sdxl/loading.py` loads them
through diffusers' single-file converter. No such file can be downloaded in the tests, so this is
the inverse of that converter (diffusers `loaders/single_file_utils.py`: `convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`), written
from its key rules, which turns the tiny test model into the file a user would have.

Layout written:
  UNet        model.diffusion_model.{input_blocks,middle_block,output_blocks,time_embed,label_emb,out}
  VAE         first_stage_model.{encoder,decoder}.{down,mid,up}..., 1x1-conv attention weights
  CLIP-L      conditioner.embedders.0.transformer.text_model....   (Hugging Face names)
  OpenCLIP-G  conditioner.embedders.1.model.{transformer.resblocks.N,positional_embedding,...}
              with q/k/v fused into attn.in_proj_weight / in_proj_bias and text_projection as a
              (hidden, projection) matrix.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
# diffusers' infer_diffusers_model_type() calls a file "xl_base" when this key exists. Real SDXL has
# 32 OpenCLIP-G layers; a model with fewer than 10 gets this one extra (ignored) tensor so the tiny
# file is still recognised the way a real one is.
XL_BASE_DETECTION_KEY = OPEN_CLIP_PREFIX + "transformer.resblocks.9.mlp.c_proj.bias"

_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_FIXED = {"conv_norm_out": "norm_out"}
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def write_sgm_checkpoint(diffusers_folder: Path, out_file: Path) -> Path:
    """Convert an SDXL diffusers folder (unet, vae, text_encoder, text_encoder_2) into `out_file`."""
    folder = Path(diffusers_folder)
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    state: dict[str, torch.Tensor] = {}
    state |= _unet(load_file(folder / "unet" / "diffusion_pytorch_model.safetensors"), unet_config)
    state |= _vae(load_file(folder / "vae" / "diffusion_pytorch_model.safetensors"), vae_config)
    state |= _clip_l(load_file(folder / "text_encoder" / "model.safetensors"))
    state |= _open_clip_g(load_file(folder / "text_encoder_2" / "model.safetensors"))
    if XL_BASE_DETECTION_KEY not in state:
        hidden = state[OPEN_CLIP_PREFIX + "ln_final.weight"].shape[0]
        state[XL_BASE_DETECTION_KEY] = torch.zeros(hidden)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, out_file)
    return out_file


def _unet(weights: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError("the SGM layout needs one layers_per_block for every UNet block")
    per_block = layers + 1  # LDM counts the down/upsampler as one more layer of each block
    up_has_attention = {
        int(m.group(1)) for k in weights if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))
    }
    out: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        out[UNET_PREFIX + _unet_key(key, per_block, up_has_attention)] = value
    return out


def _unet_key(key: str, per_block: int, up_has_attention: set[int]) -> str:
    module, _, param = key.rpartition(".")
    if module in _UNET_FIXED:
        return f"{_UNET_FIXED[module]}.{param}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + block * per_block + layer
        return _block_part(f"input_blocks.{index}", kind, rest)
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        index = 1 + int(m[1]) * per_block + per_block - 1
        return f"input_blocks.{index}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        kind, layer, rest = m[1], int(m[2]), m[3]
        index = 2 * layer if kind == "resnets" else 2 * layer + 1
        return _block_part(f"middle_block.{index}", kind, rest, nested=False)
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        return _block_part(f"output_blocks.{block * per_block + layer}", kind, rest)
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(m[1])
        slot = 2 if block in up_has_attention else 1
        return f"output_blocks.{block * per_block + per_block - 1}.{slot}.conv.{m[2]}"
    raise KeyError(f"no SGM name for UNet weight {key!r}")


def _block_part(prefix: str, kind: str, rest: str, *, nested: bool = True) -> str:
    """In input/output blocks a resnet is sub-module 0 and its transformer sub-module 1; middle
    block entries are the modules themselves. Transformers keep their diffusers inner names."""
    if kind == "attentions":
        return f"{prefix}.1.{rest}" if nested else f"{prefix}.{rest}"
    module, _, param = rest.rpartition(".")
    if module not in _UNET_RESNET:
        raise KeyError(f"no SGM name for UNet resnet weight {rest!r}")
    name = f"{_UNET_RESNET[module]}.{param}"
    return f"{prefix}.0.{name}" if nested else f"{prefix}.{name}"


def _vae(weights: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    num_up = len(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        new, is_attention = _vae_key(key, num_up)
        if is_attention and value.ndim == 2:
            value = value[:, :, None, None]  # the original VAE attention is made of 1x1 convs
        out[VAE_PREFIX + new] = value
    return out


def _vae_key(key: str, num_up: int) -> tuple[str, bool]:
    module, _, param = key.rpartition(".")
    if m := re.fullmatch(r"(encoder|decoder)\.(.+)", module):
        part, inner = m[1], m[2]
    else:
        return key, False  # quant_conv, post_quant_conv keep their names
    if inner in ("conv_in", "conv_out"):
        return key, False
    if inner in _VAE_FIXED:
        return f"{part}.{_VAE_FIXED[inner]}.{param}", False
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", inner):
        return f"{part}.down.{m[1]}.block.{m[2]}.{_vae_resnet(m[3])}.{param}", False
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", inner):
        return f"{part}.down.{m[1]}.downsample.conv.{param}", False
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", inner):
        block = num_up - 1 - int(m[1])  # the original decoder numbers its up blocks in reverse
        return f"{part}.up.{block}.block.{m[2]}.{_vae_resnet(m[3])}.{param}", False
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", inner):
        return f"{part}.up.{num_up - 1 - int(m[1])}.upsample.conv.{param}", False
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(\w+)", inner):
        return f"{part}.mid.block_{int(m[1]) + 1}.{_vae_resnet(m[2])}.{param}", False
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", inner):
        return f"{part}.mid.attn_1.{_VAE_ATTENTION[m[1]]}.{param}", True
    raise KeyError(f"no SGM name for VAE weight {key!r}")


def _vae_resnet(module: str) -> str:
    return "nin_shortcut" if module == "conv_shortcut" else module


def _clip_l(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP-L keeps the Hugging Face names under the `text_model.` wrapper of CLIPTextModel."""
    out: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        inner = key if key.startswith("text_model.") else f"text_model.{key}"
        out[CLIP_L_PREFIX + inner] = value
    return out


def _open_clip_g(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    out: dict[str, torch.Tensor] = {
        "positional_embedding": weights.pop("embeddings.position_embedding.weight"),
        "token_embedding.weight": weights.pop("embeddings.token_embedding.weight"),
        "ln_final.weight": weights.pop("final_layer_norm.weight"),
        "ln_final.bias": weights.pop("final_layer_norm.bias"),
        # OpenCLIP applies `x @ text_projection`; the Hugging Face Linear stores its transpose
        "text_projection": weights.pop("text_projection.weight").T.contiguous(),
    }
    weights.pop("embeddings.position_ids", None)
    layers = sorted({int(m[1]) for k in weights if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    for layer in layers:
        src, dst = f"encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        for param in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{param}"] = torch.cat(
                [weights.pop(f"{src}self_attn.{p}_proj.{param}") for p in ("q", "k", "v")]
            )
            for hf_name, clip_name in _OPEN_CLIP_LAYER.items():
                out[f"{dst}{clip_name}.{param}"] = weights.pop(f"{src}{hf_name}.{param}")
    if weights:
        raise KeyError(f"no SGM name for text_encoder_2 weights {sorted(weights)}")
    return {OPEN_CLIP_PREFIX + k: v for k, v in out.items()}
