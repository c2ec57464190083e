"""The architecture of the tiny world's pretrained Flux.1-shaped base model, randomly initialised.

`scripts/pretrain_tiny_world.py --family flux` trains it and writes it to
`resources/tiny-world-flux` in FLUX.1 [dev]'s diffusers folder layout, which
`modules/models/flux/loading.py` loads like a user's model. Everything Flux.1 has is here at a
small scale: a transformer of double-stream and single-stream blocks with rotary positions and
[dev]'s embedded guidance, a VAE with Flux's shift and scaling (factor 4 instead of 8, so 64 px
images make 16 x 16 latents, 64 packed tokens; 4 latent channels instead of 16, see
`LATENT_CHANNELS`), CLIP-L's pooled vector and T5's token embeddings as the text conditioning,
and their tokenizers. The CLIP tokenizer is the SDXL world's
(`world_tokenizer`: one token per world word); the T5 tokenizer is a SentencePiece-style Unigram
tokenizer whose pieces are the world's words (each one token) and single characters (any other
text, a trigger word included, is spelled in characters).
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from modules.models.flux.tiny import FLUX_MODEL_INDEX, factor4_vae, scheduler_for
from modules.models.sdxl.tiny_world import world_tokenizer
from modules.models.tiny_text import character_t5_tokenizer

CLIP_WIDTH = 32  # CLIP-L's place (768): its pooled output is the transformer's vector input
T5_WIDTH = 64  # T5-XXL's place (4096): the transformer's text tokens
# 4, not Flux.1's 16: packed 2x2 that is a 16-wide token in the 96-wide transformer, which passes
# the noise through to its output (Flux.1: 64 of 3072). The 16-channel world models drew the
# asked colour and place but every shape as a blob; this one draws the shapes (docs/benchmarks.md)
LATENT_CHANNELS = 4
HEADS = 4  # 24 in Flux.1
HEAD_DIM = 24  # 128 in Flux.1; the rotary axes split it as (16, 56, 56) does 128
AXES_DIMS_ROPE = (4, 10, 10)
DOUBLE_BLOCKS = 2  # 19 in Flux.1
SINGLE_BLOCKS = 4  # 38 in Flux.1
CLIP_MAX_TOKENS = 77
# the T5 length the model was pretrained with: the world's captions are at most 16 T5 tokens
T5_MAX_LENGTH = 32


def build_text_encoders(clip_vocab: int, t5_vocab: int) -> tuple[CLIPTextModel, T5EncoderModel]:
    clip = CLIPTextConfig(
        vocab_size=clip_vocab,
        hidden_size=CLIP_WIDTH,
        intermediate_size=4 * CLIP_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_TOKENS,
        projection_dim=CLIP_WIDTH,
        hidden_act="gelu",
        bos_token_id=clip_vocab - 2,
        eos_token_id=clip_vocab - 1,
        pad_token_id=clip_vocab - 1,
    )
    t5 = T5Config(  # T5 v1.1's encoder (gated GELU), as T5-XXL
        vocab_size=t5_vocab,
        d_model=T5_WIDTH,
        d_kv=T5_WIDTH // 4,
        d_ff=2 * T5_WIDTH,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    return CLIPTextModel(clip), T5EncoderModel(t5)


def build_tokenizers(words: list[str]):
    """The CLIP and T5 tokenizers; "an" (the article before vowels) joins the world's words."""
    return world_tokenizer(words), character_t5_tokenizer(words=[*words, "an"])


def build_transformer() -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        num_layers=DOUBLE_BLOCKS,
        num_single_layers=SINGLE_BLOCKS,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=CLIP_WIDTH,
        axes_dims_rope=AXES_DIMS_ROPE,
        guidance_embeds=True,  # as FLUX.1 [dev]
    )


def build_vae() -> AutoencoderKL:
    """Unnormalised: the pretrain script sets the shift and scaling from the trained encoder's
    latents, as Flux.1's 0.1159 and 0.3611 were."""
    return factor4_vae(scaling_factor=1.0, shift_factor=0.0, latent_channels=LATENT_CHANNELS)


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1 [dev]'s scheduler: the resolution-dependent shift."""
    return scheduler_for(guidance_embeds=True)


def loading_settings(folder: str | Path) -> dict:
    """The `model` settings that load the world model as pretrained: float32 parts (it is small,
    and bfloat16 on a CPU is slower) and the T5 length it learned with (512, [dev]'s, would pad
    every caption with hundreds of tokens it never saw)."""
    float32 = {"weight_dtype": "float32"}
    return {
        "model": {
            "family": "flux",
            "base_model": str(folder),
            "transformer": float32,
            "text_encoder": float32,
            "text_encoder_2": float32,
            "t5_max_length": T5_MAX_LENGTH,
        }
    }


def write_model_index(folder: Path) -> None:
    (folder / "model_index.json").write_text(json.dumps(FLUX_MODEL_INDEX, indent=2) + "\n")
