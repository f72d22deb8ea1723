"""memloc.architectures: the adapter of each family, checked against the models' own forward passes."""

from __future__ import annotations

import pytest
import torch

from memloc import architectures as arch
from memloc import load_model


@pytest.fixture(scope="module")
def models(random_model_dir):
    return {k: load_model(random_model_dir(k)) for k in ("gpt-neo", "gpt2", "neox", "llama")}


def test_adapter_for(models, tiny):
    assert {k: arch.adapter_for(m).family for k, m in models.items()} == {
        "gpt-neo": "gpt_neo", "gpt2": "gpt2", "neox": "gpt_neox", "llama": "llama"}
    assert arch.adapter_for(tiny) is arch.GPT_NEO and arch.model_type(tiny) == "gpt_neo"


@pytest.mark.parametrize("kind", ["gpt-neo", "gpt2"])
def test_attention_geometry_reproduces_the_attention_pattern(models, kind):
    """softmax(scale * q·k + causal/window mask) from hook_q/hook_k equals the bridge's hook_pattern.

    The GPT-Neo model alternates global and local layers with window 32, shorter than the sequence."""
    model = models[kind]
    geo = arch.adapter_for(model).attention_geometry(model)
    seq = 48
    x = torch.randint(0, model.cfg.d_vocab, (1, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, cache = model.run_with_cache(x)
    if kind == "gpt-neo":
        assert geo.scales == [1.0, 1.0] and geo.windows == [None, 32]
    else:
        assert geo.scales == [pytest.approx(model.cfg.d_head ** -0.5)] * 2 and geo.windows == [None, None]
    qpos, kpos = torch.arange(seq)[:, None], torch.arange(seq)[None]
    for l in range(model.cfg.n_layers):
        q, k = cache[f"blocks.{l}.attn.hook_q"][0], cache[f"blocks.{l}.attn.hook_k"][0]  # [pos, head, d_head]
        scores = torch.einsum("qhd,khd->hqk", q, k) * geo.scales[l]
        allowed = kpos <= qpos
        if geo.windows[l] is not None:
            allowed &= (qpos - kpos) < geo.windows[l]
        pattern = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        torch.testing.assert_close(pattern, cache[f"blocks.{l}.attn.hook_pattern"][0], atol=1e-5, rtol=1e-4)


def test_no_hand_written_attention_for_other_families(models):
    assert arch.adapter_for(models["llama"]).attention_geometry(models["llama"]) is None
    assert arch.adapter_for(models["neox"]).attention_geometry(models["neox"]) is None


def test_weight_layout():
    from transformers.pytorch_utils import Conv1D

    assert arch.weight_layout(torch.nn.Linear(3, 5)) == "out_in"
    conv = Conv1D(5, 3)                                   # nx=3 inputs, nf=5 outputs: weight [3, 5]
    assert arch.weight_layout(conv) == "in_out" and conv.weight.shape == (3, 5)
    x = torch.randn(2, 3)
    torch.testing.assert_close(conv(x), x @ conv.weight + conv.bias)
    assert arch.weight_layout(torch.nn.Embedding(3, 5)) is None


def test_parameter_names_and_block_arguments():
    from transformers import DynamicCache

    name = "transformer.h.3._original_component.mlp._original_component.c_fc._original_component.weight"
    assert arch.layer_of(name) == 3 and arch.layer_of("lm_head.weight") is None
    assert arch.module_path(name) == ["transformer", "h", "3", "mlp", "c_fc", "weight"]
    args, kwargs = arch.replayable_block_arguments((DynamicCache(), 1), {"past_key_values": DynamicCache(),
                                                                       "use_cache": True, "position_ids": 7})
    assert args == (None, 1) and kwargs == {"past_key_values": None, "use_cache": False, "position_ids": 7}


def test_component_names(models):
    assert arch.GPT2.component("c_attn", in_attention=True, in_mlp=False) == "fused"
    assert arch.GPT2.component("c_proj", in_attention=True, in_mlp=False) == "W_O"
    assert arch.GPT2.component("c_proj", in_attention=False, in_mlp=True) == "W_out"
    assert arch.LLAMA.component("gate_proj", in_attention=False, in_mlp=True) == "W_gate"
    assert arch.GPT_NEO.component("c_attn", in_attention=True, in_mlp=False) is None
    assert arch.GENERIC.component("query_key_value", in_attention=True, in_mlp=False) == "fused"
