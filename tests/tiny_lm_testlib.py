"""A tiny randomly initialised causal LM with a byte-level BPE tokenizer trained on given texts.

For tests and smoke runs of the report pipeline: it is built in about a second, offline, and has the
same interface as any Hugging Face causal LM directory.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class TinyLMConfig:
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    intermediate_size: int = 128
    vocab_size: int = 600
    max_positions: int = 1024
    seed: int = 0


def build_tiny_lm(directory: str | os.PathLike, texts: Iterable[str], config: TinyLMConfig | None = None) -> Path:
    """Write a LlamaForCausalLM + tokenizer to ``directory`` and return it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    cfg = config or TinyLMConfig()
    directory = Path(directory)
    specials = ["<|endoftext|>", "<pad>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(list(texts), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<pad>")
    torch.manual_seed(cfg.seed)
    lm = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_positions, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None, tie_word_embeddings=True,
    ))
    lm.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
