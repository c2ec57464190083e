"""Tiny tokenizers and text-encoder configs for the tiny built-in models (demo and tests).

Tokenizers need vocabulary files, and nothing may be downloaded, so these are built here from
fixed symbol sets and saved next to the tiny models like a real model's tokenizers.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTokenizer, T5Config, T5Tokenizer

CLIP_MAX_LENGTH = 77


def byte_level_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose vocabulary is just the 256 byte symbols (plus word ends)."""
    symbols = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for token in [*symbols, *(s + "</w>" for s in symbols), "<|startoftext|>", "<|endoftext|>"]:
        vocab[token] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


def clip_text_config(*, vocab_size: int, hidden_size: int, projection_dim: int) -> CLIPTextConfig:
    """A two-layer CLIP text encoder whose last two tokens are begin / end (as the tokenizer's)."""
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=projection_dim,
        hidden_act="gelu",
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def character_t5_tokenizer(
    *, words: Sequence[str] = (), model_max_length: int = 512
) -> T5Tokenizer:
    """A SentencePiece-style (Unigram, `▁` word starts) tokenizer over printable characters,
    with T5's special tokens: <pad> = 0, </s> = 1 appended to every sequence, <unk> = 2.

    Each of `words` is also a whole-word piece: Unigram picks the segmentation with the highest
    summed score, and a word piece scores 0 against -1 per character, so those words are always
    one token and anything else falls back to characters."""
    specials = ["<pad>", "</s>", "<unk>"]
    symbols = [*sorted(set(string.printable) - set(string.whitespace)), "▁"]
    pieces = [(token, 0.0) for token in specials]
    pieces += [(f"▁{word}", 0.0) for word in sorted(set(words))]
    pieces += [(symbol, -1.0) for symbol in symbols]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5Tokenizer(
        tokenizer_object=tokenizer,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
        model_max_length=model_max_length,
    )


def t5_encoder_config(*, vocab_size: int, d_model: int) -> T5Config:
    """A two-layer T5 v1.1 encoder (gated GELU, as T5-XXL) of width `d_model`."""
    return T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
    )
