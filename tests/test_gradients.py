"""Parameter and activation gradients (Stoehr et al. §5.1 Eq. 1-2, §6.1 Eq. 5).

References here are computed independently of memloc.gradients' parameter mapping: weight
gradients from hook-point activations and their gradients (a linear map's weight gradient is
sum_pos input^T dL/doutput), activation gradients through an additive zero "delta" leaf.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from memloc import borrowed, load_model
from memloc.gradients import (ACTIVATION_COMPONENTS, activation_gradient_tensor, activation_gradients,
                              attention_mlp_totals, em_bins, parameter_components, parameter_gradient_tensor,
                              parameter_gradients, parameter_gradients_by_group)

KINDS = ["gpt-neo", "gpt2", "neox", "llama"]
PREFIX = 12
SEQ = 24


@pytest.fixture(scope="module")
def small_models(random_model_dir):
    return {k: load_model(random_model_dir(k)) for k in KINDS}


def _tokens(model, n=3, seq=SEQ, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, (n, seq), generator=g)


def _stacked(model):
    w = {"W_Q": model.W_Q, "W_K": model.W_K, "W_V": model.W_V, "W_O": model.W_O, "W_in": model.W_in,
         "W_out": model.W_out}
    if getattr(model.cfg, "gated_mlp", False):
        w["W_gate"] = model.W_gate
    return w


def _tl_block(c):
    """Component block in TransformerLens orientation [in, out]."""
    b = c.block().detach()
    return b.T if c.orientation == "out_in" else b


# ------------------------------------------------------------------ parameter layout


@pytest.mark.parametrize("kind", KINDS)
def test_components_equal_stacked_weights(small_models, kind):
    model = small_models[kind]
    comps = parameter_components(model)
    cfg = model.cfg
    n_kv = int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads)
    expect_heads = {"W_Q": cfg.n_heads, "W_K": n_kv, "W_V": n_kv, "W_O": cfg.n_heads}
    n_mlp = 3 if kind == "llama" else 2
    assert len(comps) == cfg.n_layers * (sum(expect_heads.values()) + n_mlp)
    stacked = _stacked(model)
    for c in comps:
        ref = stacked[c.component][c.layer, c.head] if c.head >= 0 else stacked[c.component][c.layer]
        assert torch.equal(_tl_block(c), ref.detach()), (kind, c.layer, c.label)
        assert "bias" not in c.name and "embed" not in c.name and "wte" not in c.name
    if kind == "llama":
        assert max(c.head for c in comps if c.component == "W_K") == n_kv - 1 == 1


@pytest.mark.parametrize("kind", ["gpt2", "neox"])
def test_fused_qkv_layouts(small_models, kind):
    """GPT-2 c_attn (q|k|v columns, Conv1D) and NeoX query_key_value (per-head interleaved rows)."""
    model = small_models[kind]
    comps = parameter_components(model, prefer_fused=True)
    assert any("qkv" in c.name for c in comps if c.component == "W_Q")
    stacked = _stacked(model)
    for c in comps:
        ref = stacked[c.component][c.layer, c.head] if c.head >= 0 else stacked[c.component][c.layer]
        assert torch.equal(_tl_block(c), ref.detach()), (kind, c.label, c.name)


@pytest.mark.parametrize("kind", KINDS)
def test_perturbing_one_head_block_changes_only_that_head(small_models, kind, unchanged):
    model = small_models[kind]
    x = _tokens(model, n=1)
    comps = parameter_components(model)
    layer = 1
    hooks = {"W_Q": "hook_q", "W_K": "hook_k", "W_V": "hook_v"}
    with unchanged(model):
        _, clean = model.run_with_cache(x)
        for comp, hook in hooks.items():
            c = [c for c in comps if c.layer == layer and c.component == comp and c.head == 1][0]
            with borrowed(model, restore_weights=[c.name]), torch.no_grad():
                c.block().add_(torch.randn(c.block().shape, generator=torch.Generator().manual_seed(0)))
                _, cache = model.run_with_cache(x)
            name = f"blocks.{layer}.attn.{hook}"
            diff = (cache[name] - clean[name]).abs().amax(dim=(0, 1, 3))
            assert diff[1] > 1e-3, (kind, comp)
            assert torch.all(diff[torch.arange(len(diff)) != 1] == 0), (kind, comp, diff)
            # earlier layers untouched
            assert torch.equal(cache[f"blocks.{layer - 1}.hook_resid_post"], clean[f"blocks.{layer - 1}.hook_resid_post"])
        # W_O head 2: attn_out changes by exactly z_h @ delta (TL orientation)
        c = [c for c in comps if c.layer == layer and c.component == "W_O" and c.head == 2][0]
        g = torch.Generator().manual_seed(1)
        delta = torch.randn(c.block().shape, generator=g) * 0.1
        with borrowed(model, restore_weights=[c.name]), torch.no_grad():
            c.block().add_(delta)
            _, cache = model.run_with_cache(x)
        d_tl = delta.T if c.orientation == "out_in" else delta
        expect = clean[f"blocks.{layer}.attn.hook_z"][0, :, 2] @ d_tl
        got = cache[f"blocks.{layer}.hook_attn_out"][0] - clean[f"blocks.{layer}.hook_attn_out"][0]
        torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------ parameter gradients vs reference


def _reference_weight_grads(model, x1, prefix_len):
    """{(layer, component, head): gradient in TL orientation} for one paragraph, from hook activations."""
    cfg = model.cfg
    acts = {}
    names = []
    for l in range(cfg.n_layers):
        for sub in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.in", "mlp.out") + (("mlp.gate",) if cfg.gated_mlp else ()):
            names += [f"blocks.{l}.{sub}.hook_in", f"blocks.{l}.{sub}.hook_out"]

    def keep(name):
        def f(act, hook):
            acts[name] = act
            return act
        return f

    with borrowed(model):
        for p in model.parameters():
            p.requires_grad_(True)
        with torch.enable_grad(), model.hooks(fwd_hooks=[(n, keep(n)) for n in names]):
            logits = model(x1)
            loss = F.cross_entropy(logits[0, prefix_len - 1:-1], x1[0, prefix_len:])
            outs = [n for n in names if n.endswith("hook_out")]
            grads = dict(zip(outs, torch.autograd.grad(loss, [acts[n] for n in outs])))
    ref = {}
    for l in range(cfg.n_layers):
        for comp, sub in (("W_Q", "q"), ("W_K", "k"), ("W_V", "v")):
            inp = acts[f"blocks.{l}.attn.{sub}.hook_in"][0]
            g = grads[f"blocks.{l}.attn.{sub}.hook_out"][0]          # [pos, head, d_head]
            for h in range(g.shape[1]):
                ref[(l, comp, h)] = inp.T @ g[:, h]
        z = acts[f"blocks.{l}.attn.o.hook_in"][0]                   # [pos, head, d_head]
        g = grads[f"blocks.{l}.attn.o.hook_out"][0]
        for h in range(z.shape[1]):
            ref[(l, "W_O", h)] = z[:, h].T @ g
        for comp, sub in (("W_in", "in"), ("W_gate", "gate"), ("W_out", "out")):
            if f"blocks.{l}.mlp.{sub}.hook_in" in acts:
                ref[(l, comp, -1)] = acts[f"blocks.{l}.mlp.{sub}.hook_in"][0].T @ grads[f"blocks.{l}.mlp.{sub}.hook_out"][0]
    return {k: v.detach() for k, v in ref.items()}


def _pool(t, pooling):
    a = t.abs()
    return {"max": a.max(), "sum": a.sum(), "mean": a.mean()}[pooling].item()


@pytest.mark.parametrize("kind", KINDS)
def test_parameter_gradients_match_reference(small_models, kind, unchanged):
    model = small_models[kind]
    x = _tokens(model, n=3)
    refs = [_reference_weight_grads(model, x[i:i + 1], PREFIX) for i in range(3)]
    with unchanged(model):
        for pooling in ("max", "sum"):
            df = parameter_gradients(model, x, PREFIX, pooling=pooling, batch_size=2, progress_bar=False)
            assert list(df.columns) == ["layer", "component", "head", "label", "block", "value"]
            expect = [_pool(sum(r[(l, c, h)] for r in refs) / 3, pooling)
                      for l, c, h in zip(df["layer"], df["component"], df["head"])]
            np.testing.assert_allclose(df.value.to_numpy(), expect, rtol=2e-4, atol=1e-9)
        per = parameter_gradients(model, x, PREFIX, pooling="max", per_paragraph=True, batch_size=2,
                                  progress_bar=False)
        assert sorted(per.paragraph.unique()) == [0, 1, 2]
        expect = [_pool(refs[p][(l, c, h)], "max") for p, l, c, h in zip(per["paragraph"], per["layer"], per["component"], per["head"])]
        np.testing.assert_allclose(per.value.to_numpy(), expect, rtol=2e-4, atol=1e-9)
    # Eq. 2 pools the gradient of the mean loss: not the mean of per-paragraph pooled scores
    mean_of_pooled = per.groupby(["layer", "component", "head"], sort=False).value.mean().to_numpy()
    set_level = parameter_gradients(model, x, PREFIX, progress_bar=False).value.to_numpy()
    assert np.all(set_level <= mean_of_pooled + 1e-9) and not np.allclose(set_level, mean_of_pooled)


def test_parameter_gradients_batching_and_grad_untouched(small_models, unchanged):
    model = small_models["gpt-neo"]
    x = _tokens(model, n=3)
    p0 = next(iter(model.parameters()))
    p0.grad = torch.full_like(p0, 7.0)
    try:
        with unchanged(model):
            a = parameter_gradients(model, x, PREFIX, batch_size=1, progress_bar=False)
            b = parameter_gradients(model, x, PREFIX, batch_size=3, progress_bar=False)
        assert torch.all(p0.grad == 7.0)
    finally:
        p0.grad = None
    np.testing.assert_allclose(a.value, b.value, rtol=1e-5)


def test_parameter_gradients_restore_model_on_exception(small_models, unchanged):
    model = small_models["gpt2"]
    x = _tokens(model, n=2)

    def boom(act, hook):
        raise RuntimeError("boom")

    for p in model.parameters():  # a non-default requires_grad pattern must come back too
        p.requires_grad_(False)
        break
    torch_hooks = {n: len(m._forward_hooks) for n, m in model.named_modules()}
    try:
        with unchanged(model):
            with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", boom)]):
                with pytest.raises(RuntimeError, match="boom"):
                    parameter_gradients(model, x, PREFIX, progress_bar=False)
                with pytest.raises(RuntimeError, match="boom"):
                    parameter_gradients(model, x, PREFIX, per_paragraph=True, progress_bar=False)
                with pytest.raises(RuntimeError, match="boom"):
                    activation_gradients(model, x, PREFIX, progress_bar=False)
        # torch module hooks of the per-sample path are gone
        assert {n: len(m._forward_hooks) for n, m in model.named_modules()} == torch_hooks
    finally:
        for p in model.parameters():
            p.requires_grad_(True)


def test_parameter_gradients_bad_input(small_models, unchanged):
    model = small_models["gpt-neo"]
    x = _tokens(model, n=2)
    with unchanged(model):
        for kwargs, match in [(dict(pooling="median"), "pooling"), (dict(batch_size=0), "batch_size"),
                              (dict(per_paragraph="yes"), "per_paragraph")]:
            with pytest.raises(ValueError, match=match):
                parameter_gradients(model, x, PREFIX, progress_bar=False, **kwargs)
        with pytest.raises(ValueError, match="prefix_len"):
            parameter_gradients(model, x, SEQ, progress_bar=False)
        with pytest.raises(ValueError, match="tokens"):
            parameter_gradients(model, x.float(), PREFIX, progress_bar=False)
        with pytest.raises(ValueError, match="vocabulary"):
            parameter_gradients(model, x + model.cfg.d_vocab, PREFIX, progress_bar=False)
        with pytest.raises(ValueError, match="groups"):
            parameter_gradients_by_group(model, x, PREFIX, ["a"], progress_bar=False)


# ------------------------------------------------------------------ helpers


def test_em_bins_and_tables():
    labels = em_bins([0, 10, 11, 29, 30, 49, 50, 51])
    assert labels.tolist() == ["0-10", "0-10", "11-29", "11-29", "30-49", "30-49", "50", None]
    df = pd.DataFrame({"layer": [0, 0, 0, 1, 1, 1], "component": ["W_Q", "W_Q", "W_in"] * 2,
                       "head": [0, 1, -1] * 2, "value": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]})
    mat, cols = parameter_gradient_tensor(df)
    assert cols == ["W_Q H0", "W_Q H1", "W_in"]
    assert torch.equal(mat, torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    tot = attention_mlp_totals(df)
    assert tot.set_index(["layer", "block"]).total.to_dict() == {(0, "attn"): 3.0, (0, "mlp"): 3.0,
                                                                 (1, "attn"): 9.0, (1, "mlp"): 6.0}
    with pytest.raises(ValueError, match="columns"):
        parameter_gradient_tensor(df.drop(columns="head"))


def test_parameter_gradients_by_group(small_models):
    model = small_models["gpt-neo"]
    x = _tokens(model, n=4)
    df = parameter_gradients_by_group(model, x, PREFIX, ["a", "b", "a", None], progress_bar=False)
    assert set(df.group) == {"a", "b"}
    ref_a = parameter_gradients(model, x[[0, 2]], PREFIX, progress_bar=False)
    np.testing.assert_allclose(df[df.group == "a"].value.to_numpy(), ref_a.value.to_numpy(), rtol=1e-6)
    assert df[df.group == "b"].n_paragraphs.iloc[0] == 1


# ------------------------------------------------------------------ activation gradients


def _reference_activation_grads(model, x1, prefix_len, hook_name):
    """Gradient of one paragraph's loss w.r.t. a hook activation via an additive zero delta leaf."""
    holder = {}

    def add_delta(act, hook):
        holder["delta"] = torch.zeros_like(act, requires_grad=True)
        return act + holder["delta"]

    with borrowed(model), torch.enable_grad(), model.hooks(fwd_hooks=[(hook_name, add_delta)]):
        logits = model(x1)
        loss = F.cross_entropy(logits[0, prefix_len - 1:-1], x1[0, prefix_len:])
        (g,) = torch.autograd.grad(loss, [holder["delta"]])
    return g[0].detach()


@pytest.mark.parametrize("kind", ["gpt-neo", "llama"])
def test_activation_gradients_match_reference(small_models, kind, unchanged):
    model = small_models[kind]
    x = _tokens(model, n=3)
    comps = ["q", "k", "v", "z", "result", "attn_out", "mlp_post", "resid_pre", "resid_post"]
    with unchanged(model):
        df = activation_gradients(model, x, PREFIX, components=comps, batch_size=2, progress_bar=False)
    assert list(df.columns) == ["paragraph", "layer", "component", "head", "position", "value"]
    for comp in ("q", "k", "z", "resid_pre", "mlp_post"):
        for layer in (0, 1):
            hook = {"q": "blocks.{l}.attn.hook_q", "k": "blocks.{l}.attn.hook_k", "z": "blocks.{l}.attn.hook_z",
                    "resid_pre": "blocks.{l}.hook_resid_pre", "mlp_post": "blocks.{l}.mlp.hook_post"}[comp].format(l=layer)
            for i in (0, 2):
                g = _reference_activation_grads(model, x[i:i + 1], PREFIX, hook).abs()
                ref = g.amax(-1)                                        # [pos, head] or [pos]
                if ref.ndim == 1:
                    ref = ref[:, None]
                t = activation_gradient_tensor(df, comp, paragraph=i)[layer]   # [head, pos]
                torch.testing.assert_close(t, ref.T.float(), rtol=1e-4, atol=1e-10)
    # tokens after the last predicted position get no gradient; result repeats attn_out per head
    last = df[(df.position == SEQ - 1) & (df.component != "resid_post")]
    assert (last.value == 0).all()
    res = activation_gradient_tensor(df, "result", paragraph=1)
    out = activation_gradient_tensor(df, "attn_out", paragraph=1)
    assert res.shape[1] == model.cfg.n_heads and torch.equal(res, out.expand_as(res))
    if kind == "llama":
        assert activation_gradient_tensor(df, "k").shape[1] == 2  # grouped-query: key/value heads


def test_activation_gradients_pooling_and_errors(small_models, unchanged):
    model = small_models["neox"]
    x = _tokens(model, n=2)
    with unchanged(model):
        df = activation_gradients(model, x, PREFIX, progress_bar=False)  # defaults skip resid_mid (parallel attn)
        assert "resid_mid" not in set(df.component) and "v" in set(df.component)
        s = activation_gradients(model, x, PREFIX, components=["v"], layers=[1], pooling="sum", progress_bar=False)
        g = _reference_activation_grads(model, x[1:2], PREFIX, "blocks.1.attn.hook_v").abs().sum(-1)
        torch.testing.assert_close(activation_gradient_tensor(s, "v", paragraph=1)[1], g.T.float(), rtol=1e-4, atol=1e-9)
        for kwargs, match in [(dict(components=["nope"]), "components"), (dict(layers=[5]), "layers"),
                              (dict(components=["resid_mid"]), "hook points"), (dict(pooling="l2"), "pooling")]:
            with pytest.raises(ValueError, match=match):
                activation_gradients(model, x, PREFIX, progress_bar=False, **kwargs)


# ------------------------------------------------------------------ embedded model ground truth


def test_tiny_memorized_paragraphs_have_smaller_gradients(tiny, tiny_paragraphs, unchanged):
    """Stoehr Fig. 4: the NLL gradients of memorized paragraphs are smaller than those of non-memorized ones."""
    t = tiny_paragraphs.table
    mp = torch.as_tensor(np.flatnonzero(t.em_ref.to_numpy() == 50)[:6])
    nmp = torch.as_tensor(np.flatnonzero((t.em_ref.to_numpy() <= 10) & (t["count"].to_numpy() == 0))[:6])
    assert len(mp) >= 4 and len(nmp) >= 4
    tokens = tiny_paragraphs.tokens[torch.cat([mp, nmp])]
    groups = ["memorized"] * len(mp) + ["non-memorized"] * len(nmp)
    with unchanged(tiny):
        df = parameter_gradients_by_group(tiny, tokens, 50, groups, pooling="sum", batch_size=6, progress_bar=False)
    total = df.groupby("group").value.sum()
    assert total["memorized"] < 0.5 * total["non-memorized"], total
    tot = attention_mlp_totals(df, by=["group"])
    assert set(tot.block) == {"attn", "mlp"} and len(tot) == 2 * 2 * tiny.cfg.n_layers
