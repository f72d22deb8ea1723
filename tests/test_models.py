"""Loading through TransformerLens: hook points memloc relies on exist with the expected shapes."""

from __future__ import annotations

from pathlib import Path

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


def test_fused_gelu_is_huggingfaces_gelu_new(tiny):
    """load_model swaps gelu_new for the fused gelu_pytorch_tanh (the faster path, asserted by module type and
    config names); the logits stay within float32 rounding of Hugging Face's own forward with gelu_new, and
    fused_gelu=False keeps Hugging Face's module."""
    from transformers import GPTNeoForCausalLM
    from transformers.activations import GELUTanh, NewGELUActivation

    from memloc.cache import model_fingerprint
    from memloc.models import tiny_model_dir

    assert all(type(b.mlp.original_component.act) is GELUTanh for b in tiny.blocks)
    assert tiny.cfg.act_fn == tiny.original_model.config.activation_function == "gelu_pytorch_tanh"
    plain = load_model("tiny", fused_gelu=False)
    assert all(type(b.mlp.original_component.act) is NewGELUActivation for b in plain.blocks)
    hf = GPTNeoForCausalLM.from_pretrained(tiny_model_dir()).eval()
    assert hf.config.activation_function == "gelu_new"
    tokens = torch.randint(0, 4096, (2, 100))
    with torch.no_grad():
        ref, unfused, fused = hf(tokens).logits, plain(tokens), tiny(tokens)
    assert not torch.equal(fused, unfused)  # a different kernel: equal only up to rounding
    torch.testing.assert_close(fused, ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(unfused, ref, atol=1e-4, rtol=1e-5)
    # results computed with one activation are never served from the cache to the other
    assert model_fingerprint(plain) != model_fingerprint(tiny)
    with pytest.raises(ValueError, match="fused_gelu"):
        load_model("tiny", fused_gelu="yes")


def _boot_must_not_run(monkeypatch):
    from transformer_lens.model_bridge import TransformerBridge

    def boom(*a, **k):
        raise AssertionError("TransformerBridge.boot_transformers must not be reached")

    monkeypatch.setattr(TransformerBridge, "boot_transformers", boom)


def test_unknown_model_offline_is_clear_error(monkeypatch):
    """HF_HUB_OFFLINE and a hub name that is not cached: the good message at once, no loading."""
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _boot_must_not_run(monkeypatch)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set.*not in the local Hugging Face cache.*local directory"):
        load_model("no-such-org/no-such-model-xyz")
    assert time.perf_counter() - t0 < 10  # loose: it used to retry for 23-28 s


def test_unreachable_hub_fails_fast_without_offline_flag(monkeypatch):
    """HF_HUB_OFFLINE unset and no network (the sandbox): one failed connection, then the message."""
    import time

    from huggingface_hub import constants

    from memloc.models import hub_offline_reason

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    reason = hub_offline_reason(timeout=3.0)
    if reason is None:
        pytest.skip("the Hugging Face hub is reachable from this machine")
    assert "cannot connect" in reason
    _boot_must_not_run(monkeypatch)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="cannot connect to .*not in the local Hugging Face cache.*local directory"):
        load_model("no-such-org/no-such-model-xyz")
    assert time.perf_counter() - t0 < 10  # loose: one probe of at most 3 s


@pytest.mark.slow
def test_cached_hub_model_loads_offline(random_model_dir, tmp_path):
    """A hub name found in the local Hugging Face cache still loads when the hub is unreachable."""
    import os
    import shutil
    import subprocess
    import sys

    snap = tmp_path / "hub" / "models--memloc-test--tiny-gpt2" / "snapshots" / ("0" * 40)
    shutil.copytree(random_model_dir("gpt2"), snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    code = ("import memloc; m = memloc.load_model('memloc-test/tiny-gpt2'); "
            "print('LAYERS', m.cfg.n_layers)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "LAYERS 2" in out.stdout


@pytest.mark.parametrize("name", ["./no/such/model", "../no/such/model", "/no/such/model", "~/no/such/model",
                                  "no/such/model", "no\\such"])
def test_missing_path_says_no_such_directory(name, monkeypatch):
    _boot_must_not_run(monkeypatch)
    with pytest.raises(ValueError, match="no such directory"):
        load_model(name)
    with pytest.raises(ValueError, match="no such directory"):
        load_model(Path("/no/such") / "model")


def test_load_model_hides_the_loading_bar_when_progress_is_off(monkeypatch, capfd):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # a CLI test's `-q` in this worker may have switched it off
    monkeypatch.setenv("MEMLOC_PROGRESS", "0")
    load_model("tiny")
    assert "Loading weights" not in capfd.readouterr().err
    monkeypatch.setenv("MEMLOC_PROGRESS", "1")
    load_model("tiny")
    assert "Loading weights" in capfd.readouterr().err  # the check above is not vacuous
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()  # restored


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
