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

import json
import tempfile
from pathlib import Path

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TEXT_WIDTH = 32  # CLIP-L's place
TEXT_WIDTH_2 = 64  # OpenCLIP-G's place: its own width, as in SDXL
POOLED_DIM = 64
TIME_EMBED_DIM = 16
MAX_TOKENS = 77
LATENT_SIZE = 16


def world_tokenizer(words: list[str]) -> CLIPTokenizer:
    """A CLIP tokenizer whose merges make each of `words` a single token.

    The merges are learned with the tokenizers library's BPE trainer on the words themselves,
    so they are consistent with how BPE applies them; the byte-level symbols (with and without
    CLIP's end-of-word mark) stay in the vocabulary so any other text still tokenizes.
    """
    trainer_model = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    trainer_model.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,
        min_frequency=1,
        initial_alphabet=sorted(ByteLevel.alphabet()),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    trainer_model.train_from_iterator([" ".join(sorted(set(words)))], trainer)
    with tempfile.TemporaryDirectory() as folder:
        trainer_model.model.save(folder)
        lines = Path(folder, "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#")]
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
