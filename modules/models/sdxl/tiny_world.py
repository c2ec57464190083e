"""The architecture of the tiny world's pretrained SDXL-shaped base model, randomly initialised.

`scripts/pretrain_tiny_world.py` trains it and writes it to `resources/tiny-world-sdxl` in
SDXL's diffusers folder layout, which `modules/models/sdxl/loading.py` loads like a user's model.
Everything SDXL has is here at a small scale: a VAE (factor 4 instead of 8, so 64 px images make
16 x 16 latents), a three-level UNet with cross-attention in its two lower levels and SDXL's
size/pooled-text conditioning, two CLIP text encoders of different widths (the second gives the
pooled embedding) and CLIP tokenizers. The tokenizers' vocabulary is the 512 byte-level symbols
(any text tokenizes) plus BPE merges learned from the tiny world's caption words, so every word
of the world is one token and an unknown word (a trigger word) is spelled in smaller pieces.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TEXT_WIDTH = 32  # CLIP-L's place
TEXT_WIDTH_2 = 64  # OpenCLIP-G's place: its own width, as in SDXL
POOLED_DIM = 64
TIME_EMBED_DIM = 16
MAX_TOKENS = 77
LATENT_SIZE = 16


def _merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


def bpe_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE's greedy merges over `words` (each counted once) until every word is one symbol.

    The most frequent adjacent pair merges first, ties going to the alphabetically first pair,
    so the same words always give the same merges (the tokenizers library's trainer breaks ties
    in hash order, which differs from process to process: a resumed pretraining run would have
    renumbered the vocabulary under its text encoders). Applying the merges in this order, as
    BPE does, rebuilds each word.
    """
    spelled = [[*word[:-1], word[-1] + "</w>"] for word in sorted(set(words))]
    merges = []
    while counts := Counter(pair for s in spelled for pair in itertools.pairwise(s)):
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append(pair)
        spelled = [_merge(symbols, pair) for symbols in spelled]
    return merges


def world_tokenizer(words: list[str]) -> CLIPTokenizer:
    """A CLIP tokenizer whose merges (`bpe_merges`) make each of `words` a single token; the
    byte-level symbols (with and without CLIP's end-of-word mark) stay in the vocabulary so any
    other text still tokenizes."""
    merges = bpe_merges(words)
    symbols = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for token in [*symbols, *(s + "</w>" for s in symbols)]:
        vocab[token] = len(vocab)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def _text_config(*, vocab_size: int, width: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=3,  # the UNet reads the penultimate layer, as in SDXL
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=POOLED_DIM,
        hidden_act="gelu",
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 2, 4),  # diffusers' name for the number of heads
        norm_num_groups=8,
        cross_attention_dim=TEXT_WIDTH + TEXT_WIDTH_2,
        transformer_layers_per_block=1,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + POOLED_DIM,
    )


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=4 * LATENT_SIZE,
        scaling_factor=1.0,  # set from the trained encoder's latents (pretrain script)
    )


def build_text_encoders(
    tokenizer: CLIPTokenizer,
) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    vocab_size = len(tokenizer)
    return (
        CLIPTextModel(_text_config(vocab_size=vocab_size, width=TEXT_WIDTH)),
        CLIPTextModelWithProjection(_text_config(vocab_size=vocab_size, width=TEXT_WIDTH_2)),
    )


def build_scheduler() -> DDPMScheduler:
    """SDXL's training schedule."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=1,
    )


MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "_diffusers_version": "0.42.1",
    "force_zeros_for_empty_prompt": False,  # trained with empty captions for guidance
    "scheduler": ["diffusers", "DDPMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def write_model_index(folder: Path) -> None:
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
