"""Loading through TransformerLens: hook points memloc relies on exist with the expected shapes."""

from __future__ import annotations

import pytest
import torch

from memloc import load_model, model_facts
from memloc.models import neuron_hook_name

HOOKS = ["hook_resid_pre", "hook_resid_post", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z",
         "attn.hook_pattern", "mlp.hook_post"]


def check_hook_shapes(model, batch=2, seq=12):
    cfg = model.cfg
    tokens = torch.randint(0, cfg.d_vocab, (batch, seq))
    names = [f"blocks.{l}.{h}" for l in range(cfg.n_layers) for h in HOOKS]
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    assert logits.shape == (batch, seq, cfg.d_vocab)
    n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    for l in range(cfg.n_layers):
        b = f"blocks.{l}."
        assert cache[b + "hook_resid_pre"].shape == (batch, seq, cfg.d_model)
        assert cache[b + "hook_resid_post"].shape == (batch, seq, cfg.d_model)
        assert cache[b + "attn.hook_q"].shape == (batch, seq, cfg.n_heads, cfg.d_head)
        assert cache[b + "attn.hook_k"].shape[:2] == (batch, seq)
        assert cache[b + "attn.hook_k"].shape[2] in (cfg.n_heads, n_kv)
        assert cache[b + "attn.hook_v"].shape[2] in (cfg.n_heads, n_kv)
        assert cache[b + "attn.hook_z"].shape == (batch, seq, cfg.n_heads, cfg.d_head)
        pattern = cache[b + "attn.hook_pattern"]
        assert pattern.shape == (batch, cfg.n_heads, seq, seq)
        torch.testing.assert_close(pattern.sum(-1), torch.ones(batch, cfg.n_heads, seq), atol=1e-4, rtol=0)
        assert torch.all(pattern.triu(1) == 0), "attention must be causal"
        assert cache[neuron_hook_name(l)].shape == (batch, seq, cfg.d_mlp)


def test_tiny_facts_and_hooks(tiny):
    facts = model_facts(tiny)
    assert facts["n_layers"] == 4 and facts["n_heads"] == 8 and facts["d_model"] == 256
    assert facts["d_mlp"] == 1024 and facts["n_ctx"] == 128 and facts["d_vocab"] == 4096
    assert facts["attention_layers"] == ["global", "local", "global", "local"]
    check_hook_shapes(tiny, seq=100)


def test_tiny_local_attention_window(tiny):
    """Layer 1 is local (window 64): its first-token attention cannot reach back 64+ tokens."""
    tokens = torch.randint(0, 4096, (1, 100))
    _, cache = tiny.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    local = cache["blocks.1.attn.hook_pattern"][0]
    assert torch.all(local[:, 99, :36] == 0)
    assert torch.all(cache["blocks.0.attn.hook_pattern"][0][:, 99, :36] > 0)


@pytest.mark.parametrize("kind", ["gpt-neo", "gpt2", "neox", "llama"])
def test_random_architectures(random_model_dir, kind):
    model = load_model(random_model_dir(kind))
    check_hook_shapes(model)
    facts = model_facts(model)
    assert facts["gated_mlp"] == (kind == "llama")


def test_llama_grouped_query_weights(random_model_dir):
    model = load_model(random_model_dir("llama"))
    assert model.cfg.n_key_value_heads == 2
    assert model.W_V.shape[1] in (2, model.cfg.n_heads)


@pytest.mark.slow
def test_gpt_neo_125m_config(random_model_dir):
    model = load_model(random_model_dir("gpt-neo-125m"))
    facts = model_facts(model)
    assert (facts["n_layers"], facts["n_heads"], facts["d_model"], facts["d_mlp"]) == (12, 12, 768, 3072)
    assert facts["d_vocab"] == 50257
    assert facts["attention_layers"] == ["global", "local"] * 6
    check_hook_shapes(model, batch=1, seq=16)


def test_bridge_matches_huggingface(tiny):
    """The bridge (no weight processing) computes the same logits as the plain HF model."""
    from transformers import GPTNeoForCausalLM

    from memloc.models import tiny_model_dir

    hf = GPTNeoForCausalLM.from_pretrained(tiny_model_dir()).eval()
    tokens = torch.randint(0, 4096, (2, 100))
    with torch.no_grad():
        torch.testing.assert_close(tiny(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)


def test_unknown_model_offline_is_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="local directory"):
        load_model("no-such-org/no-such-model-xyz")


def test_bad_model_paths(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_model(tmp_path)
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        load_model(f)
    with pytest.raises(ValueError, match="dtype"):
        load_model("tiny", dtype=torch.int64)


def test_cli_info(tmp_path, capsys):
    import json

    from memloc.cli import main

    out = tmp_path / "info.json"
    assert main(["-q", "info", "--json", str(out)]) == 0
    facts = json.loads(out.read_text())
    assert facts["n_layers"] == 4 and facts["d_vocab"] == 4096 and facts["model"] == "tiny"
