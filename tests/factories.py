"""Locally built random-weight models with real architectures (no hub access needed)."""

from __future__ import annotations

from pathlib import Path

import torch

from memloc.models import tiny_model_dir

SMALL = dict(vocab=512, d_model=64, n_layers=2, n_heads=4, d_mlp=256, n_ctx=128)


def _save(model, path: Path) -> Path:
    from transformers import PreTrainedTokenizerFast

    model.save_pretrained(path, safe_serialization=True)
    PreTrainedTokenizerFast.from_pretrained(str(tiny_model_dir())).save_pretrained(path)
    return path


def build_random_model(kind: str, path: Path, seed: int = 0) -> Path:
    """Save a random-weight Hugging Face model of ``kind`` into ``path`` and return it.

    kinds: ``gpt-neo-125m`` (the real GPT-Neo-125M configuration), ``gpt-neo``, ``gpt2``,
    ``neox`` (Pythia family), ``llama`` (gated MLP, grouped-query attention).
    """
    from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoConfig, GPTNeoForCausalLM, GPTNeoXConfig,
                              GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM)

    torch.manual_seed(seed)
    s = SMALL
    if kind == "gpt-neo-125m":
        cfg = GPTNeoConfig(vocab_size=50257, max_position_embeddings=2048, hidden_size=768, num_layers=12,
                           num_heads=12, intermediate_size=None, window_size=256,
                           attention_types=[[["global", "local"], 6]], activation_function="gelu_new")
        model = GPTNeoForCausalLM(cfg)
    elif kind == "gpt-neo":
        cfg = GPTNeoConfig(vocab_size=s["vocab"], max_position_embeddings=s["n_ctx"], hidden_size=s["d_model"],
                           num_layers=s["n_layers"], num_heads=s["n_heads"], intermediate_size=s["d_mlp"],
                           window_size=32, attention_types=[[["global", "local"], 1]])
        model = GPTNeoForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = GPT2Config(vocab_size=s["vocab"], n_positions=s["n_ctx"], n_embd=s["d_model"], n_layer=s["n_layers"],
                         n_head=s["n_heads"], n_inner=s["d_mlp"])
        model = GPT2LMHeadModel(cfg)
    elif kind == "neox":
        cfg = GPTNeoXConfig(vocab_size=s["vocab"], max_position_embeddings=s["n_ctx"], hidden_size=s["d_model"],
                            num_hidden_layers=s["n_layers"], num_attention_heads=s["n_heads"],
                            intermediate_size=s["d_mlp"], rotary_pct=0.25, use_parallel_residual=True)
        model = GPTNeoXForCausalLM(cfg)
    elif kind == "llama":
        cfg = LlamaConfig(vocab_size=s["vocab"], max_position_embeddings=s["n_ctx"], hidden_size=s["d_model"],
                          num_hidden_layers=s["n_layers"], num_attention_heads=s["n_heads"], num_key_value_heads=2,
                          intermediate_size=s["d_mlp"])
        model = LlamaForCausalLM(cfg)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return _save(model, Path(path))
