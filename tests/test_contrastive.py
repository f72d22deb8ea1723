"""Contrastive objective (Stoehr Eq. 3-4), contrastive gradient attribution and sparse fine-tuning."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from memloc import load_model
from memloc.contrastive import (contrastive_gradients, contrastive_loss, eligible_parameters, finetune_mask,
                                reference_logits, sparse_finetune, top_components)
from memloc.metrics import exact_match

PREFIX = 8
SEQ = 20
T = SEQ - PREFIX


@pytest.fixture(scope="module")
def neo(random_model_dir):
    return load_model(random_model_dir("gpt-neo"))


def tokens(model, n, seed):
    return torch.randint(0, model.cfg.d_vocab, (n, SEQ), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# slow, obvious references
# ---------------------------------------------------------------------------------------------

def ref_nll(model, x, prefix_len):
    """Mean over paragraphs and continuation tokens of -log p(x_t | x_<t), one token at a time."""
    logp = model(x).float().log_softmax(-1)
    terms = []
    for b in range(x.shape[0]):
        for t in range(prefix_len, x.shape[1]):
            terms.append(-logp[b, t - 1, x[b, t]])
    return torch.stack(terms).mean()


def ref_kl(model, x, prefix_len, ref):
    """Mean over NMPs and continuation positions of sum_v p_θ(v) (log p_θ(v) - log p_θ0(v))."""
    logp = model(x).float().log_softmax(-1)
    terms = []
    for b in range(x.shape[0]):
        for j, t in enumerate(range(prefix_len, x.shape[1])):
            p = logp[b, t - 1].exp()
            q = ref[b, j].log_softmax(-1)
            terms.append((p * (logp[b, t - 1] - q)).sum())
    return torch.stack(terms).mean()


def ref_blocks(model, name, grad):
    """GPT-Neo parameter -> [(layer, component, head, block)], heads split as in the attention."""
    H, dh = model.cfg.n_heads, model.cfg.d_head
    layer = int(name.split("transformer.h.")[1].split(".")[0])
    for proj, comp in (("q_proj", "W_Q"), ("k_proj", "W_K"), ("v_proj", "W_V")):
        if f".{proj}." in name:   # nn.Linear weight [H*dh, d_model]: head h owns rows h*dh:(h+1)*dh
            return [(layer, comp, h, grad[h * dh:(h + 1) * dh]) for h in range(H)]
    if ".out_proj." in name:      # [d_model, H*dh]: head h owns columns
        return [(layer, "W_O", h, grad[:, h * dh:(h + 1) * dh]) for h in range(H)]
    if ".c_fc." in name:
        return [(layer, "W_in", -1, grad)]
    if ".c_proj." in name:
        return [(layer, "W_out", -1, grad)]
    raise AssertionError(name)


# ---------------------------------------------------------------------------------------------
# the objective
# ---------------------------------------------------------------------------------------------

def test_loss_matches_hand_computation(neo):
    mp, nmp = tokens(neo, 3, 0), tokens(neo, 4, 1)
    ref = torch.randn(4, T, neo.cfg.d_vocab, generator=torch.Generator().manual_seed(2))
    loss, terms = contrastive_loss(neo, mp, nmp, PREFIX, reference_logits=ref, return_terms=True)
    nll, kl = ref_nll(neo, mp, PREFIX), ref_kl(neo, nmp, PREFIX, ref)
    assert kl > 0.1
    assert terms["nll"].item() == pytest.approx(nll.item(), rel=1e-5)
    assert terms["kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert loss.item() == pytest.approx(-nll.item() + kl.item(), rel=1e-5)       # CO↓ = -NLL + KL (Eq. 3)
    # CO↔ (Eq. 4): + NLL of the edit paragraph; [n, T] targets follow the MP prefix, [n, seq] are used as is
    new = tokens(neo, 3, 3)
    edit = contrastive_loss(neo, mp, nmp, PREFIX, objective="edit", edit_targets=new[:, PREFIX:],
                            reference_logits=ref)
    spliced = torch.cat([mp[:, :PREFIX], new[:, PREFIX:]], dim=1)
    assert edit.item() == pytest.approx(ref_nll(neo, spliced, PREFIX).item() + kl.item(), rel=1e-5)
    edit_full = contrastive_loss(neo, mp, nmp, PREFIX, objective="edit", edit_targets=new, reference_logits=ref)
    assert edit_full.item() == pytest.approx(ref_nll(neo, new, PREFIX).item() + kl.item(), rel=1e-5)


def test_kl_vanishes_at_theta0_with_its_gradient(neo):
    mp, nmp = tokens(neo, 2, 4), tokens(neo, 3, 5)
    loss, terms = contrastive_loss(neo, mp, nmp, PREFIX, return_terms=True)
    assert abs(terms["kl"].item()) < 1e-6
    ref = reference_logits(neo, nmp, PREFIX)
    assert ref.shape == (3, T, neo.cfg.d_vocab) and not ref.requires_grad
    _, terms2 = contrastive_loss(neo, mp, nmp, PREFIX, reference_logits=ref, return_terms=True)
    assert abs(terms2["kl"].item()) < 1e-6
    # sign conventions: unlearning lowers the likelihood, editing towards the MP itself raises it
    same = contrastive_loss(neo, mp, nmp, PREFIX, objective="edit", edit_targets=mp[:, PREFIX:])
    assert loss.item() < 0 and same.item() == pytest.approx(-loss.item(), rel=1e-6)
    # the KL is at its minimum: the gradient of CO equals the gradient of -NLL alone
    names = eligible_parameters(neo)
    params = dict(neo.named_parameters())
    g_co = torch.autograd.grad(loss, [params[n] for n in names])
    g_nll = torch.autograd.grad(-ref_nll(neo, mp, PREFIX), [params[n] for n in names])
    for a, b in zip(g_co, g_nll):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_eligible_parameters(neo):
    names = eligible_parameters(neo)
    params = dict(neo.named_parameters())
    assert all(params[n].ndim == 2 for n in names)
    assert not any("wte" in n or "wpe" in n or "bias" in n or "ln_" in n for n in names)
    # 4 attention matrices + 2 MLP matrices per layer
    assert len(names) == 6 * neo.cfg.n_layers


# ---------------------------------------------------------------------------------------------
# gradient attribution
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("aggregate", ["gradient", "score"])
def test_contrastive_gradients_match_autograd_reference(neo, unchanged, aggregate):
    mp, nmp = tokens(neo, 3, 6), tokens(neo, 6, 7)
    with unchanged(neo):
        df = contrastive_gradients(neo, mp, nmp, PREFIX, n_nmp_per_batch=2, seed=0, pooling="max",
                                   aggregate=aggregate, progress_bar=False)
    assert {"layer", "component", "head", "value"} <= set(df.columns)
    names = eligible_parameters(neo)
    params = dict(neo.named_parameters())
    per_mp = []
    for i in range(len(mp)):
        # the KL term's gradient vanishes at θ0, so per MP the CO gradient is that of -NLL(x_n^M)
        per_mp.append(torch.autograd.grad(-ref_nll(neo, mp[i:i + 1], PREFIX), [params[n] for n in names]))
    acc: dict = {}
    if aggregate == "gradient":      # mean signed gradient over MPs, then max |.| per block
        mean = [sum(g[j] for g in per_mp) / len(mp) for j in range(len(names))]
        for n, g in zip(names, mean):
            for layer, comp, head, block in ref_blocks(neo, n, g):
                acc[(layer, comp, head)] = block.abs().max().item()
    else:                            # max |.| per block per MP, then the mean over MPs
        for grads in per_mp:
            for n, g in zip(names, grads):
                for layer, comp, head, block in ref_blocks(neo, n, g):
                    acc[(layer, comp, head)] = acc.get((layer, comp, head), 0.0) + block.abs().max().item() / len(mp)
    got = {(int(r.layer), r.component, int(r.head)): r.value for r in df.itertuples()}
    assert set(got) == set(acc)
    for key, value in acc.items():
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-9), key
    top = top_components(df, k=3)
    assert len(top) == 3 and top.value.iloc[0] == df.value.max()
    # the NMP batches only enter through the KL term, whose gradient is 0 at θ0: seed-invariant
    df2 = contrastive_gradients(neo, mp, nmp, PREFIX, n_nmp_per_batch=2, seed=5, pooling="max",
                                aggregate=aggregate, progress_bar=False)
    np.testing.assert_allclose(df2.value.to_numpy(), df.value.to_numpy(), rtol=1e-5)
    # sum pooling and the edit objective run through the same path
    edit = contrastive_gradients(neo, mp, nmp, PREFIX, objective="edit", edit_targets=tokens(neo, 3, 8)[:, PREFIX:],
                                 n_nmp_per_batch=2, pooling="sum", aggregate=aggregate, progress_bar=False)
    assert len(edit) == len(df) and (edit.value > 0).all()


# ---------------------------------------------------------------------------------------------
# sparse fine-tuning
# ---------------------------------------------------------------------------------------------

def test_masks(neo, unchanged):
    mp, nmp = tokens(neo, 2, 9), tokens(neo, 3, 10)
    n_eligible = sum(p.numel() for n, p in neo.named_parameters() if n in set(eligible_parameters(neo)))
    with unchanged(neo):
        top = finetune_mask(neo, mp, nmp, PREFIX, mask="top", fraction=0.01)
        r1 = finetune_mask(neo, mp, nmp, PREFIX, mask="random", fraction=0.01, seed=1)
        r1b = finetune_mask(neo, mp, nmp, PREFIX, mask="random", fraction=0.01, seed=1)
        r2 = finetune_mask(neo, mp, nmp, PREFIX, mask="random", fraction=0.01, seed=2)
        full = finetune_mask(neo, mp, nmp, PREFIX, mask="all")
    k = round(0.01 * n_eligible)
    assert sum(int(m.sum()) for m in top.values()) == k
    assert sum(int(m.sum()) for m in r1.values()) == k
    assert sum(int(m.sum()) for m in full.values()) == n_eligible
    assert all(torch.equal(r1[n], r1b[n]) for n in r1)
    assert not all(torch.equal(r1[n], r2[n]) for n in r1)
    # top: every selected |gradient| >= every unselected one, jointly over all parameters
    params = dict(neo.named_parameters())
    loss = contrastive_loss(neo, mp, nmp, PREFIX)
    grads = dict(zip(top, torch.autograd.grad(loss, [params[n] for n in top])))
    sel = torch.cat([grads[n].abs()[top[n]] for n in top])
    rest = torch.cat([grads[n].abs()[~top[n]] for n in top])
    assert sel.min() >= rest.max()
    assert len({n for n in top if top[n].any()}) > 1       # not a per-parameter top-k


def test_sparse_finetune_changes_only_masked_weights(neo, unchanged):
    mp, nmp = tokens(neo, 3, 11), tokens(neo, 3, 12)
    p0 = next(iter(neo.parameters()))
    p0.grad = torch.full_like(p0, 7.0)      # a caller's gradient must survive
    try:
        with unchanged(neo):
            df, state = sparse_finetune(neo, mp, nmp, PREFIX, mask="top", fraction=0.005, steps=3, lr=1e-2,
                                        return_state=True, progress_bar=False)
        assert p0.grad is not None and bool((p0.grad == 7.0).all())
    finally:
        p0.grad = None
    mask = finetune_mask(neo, mp, nmp, PREFIX, mask="top", fraction=0.005)
    assert set(state["mask"]) == set(mask)
    changed = 0
    for n, delta in state["delta"].items():
        if n in mask:
            assert torch.equal(state["mask"][n], mask[n].cpu())
            assert not delta[~mask[n].cpu()].any(), f"unmasked weights of {n} changed"
            changed += int((delta != 0).sum())
        else:
            assert not delta.any(), f"ineligible parameter {n} changed"
    assert changed > 0.9 * sum(int(m.sum()) for m in mask.values())
    # trajectory table
    assert sorted(df.step.unique()) == [0, 1, 2, 3]
    assert set(df.split) == {"memorized", "non-memorized"} and len(df) == 4 * 6
    s0 = df[df.step == 0]
    assert (s0[s0.split == "non-memorized"].em == T).all()          # against the model's own continuation
    em = exact_match(neo, mp, PREFIX)
    assert s0[s0.split == "memorized"].sort_values("id").em.tolist() == em.tolist()
    assert s0.loss.iloc[0] == pytest.approx(contrastive_loss(neo, mp, nmp, PREFIX).item(), rel=1e-5)
    assert df[df.step == 3].loss.isna().all()
    mp_nll = df[df.split == "memorized"].groupby("step").nll.mean()
    assert mp_nll[3] > mp_nll[0]                                     # unlearning raises the MP NLL
    assert set(df["mask"]) == {"top"} and set(df["objective"]) == {"unlearn"}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_sparse_finetune_other_architectures(kind, random_model_dir, unchanged):
    """GPT-2 (the bridge keeps an unused fused c_attn beside the split q/k/v) and a gated,
    grouped-query Llama: masks cover only weights that receive gradients."""
    model = load_model(random_model_dir(kind))
    mp, nmp = tokens(model, 2, 22), tokens(model, 2, 23)
    with unchanged(model):
        df, state = sparse_finetune(model, mp, nmp, PREFIX, mask="top", fraction=0.01, steps=2, lr=1e-2,
                                    return_state=True, progress_bar=False)
    assert not any("c_attn" in n for n in state["mask"])
    for n, delta in state["delta"].items():
        outside = ~state["mask"][n] if n in state["mask"] else torch.ones_like(delta, dtype=torch.bool)
        assert not delta[outside].any(), n
    assert sum(int((d != 0).sum()) for d in state["delta"].values()) > 0
    assert df[df.step == 0].em[df.split == "non-memorized"].eq(T).all()


def test_sparse_finetune_edit_all_and_random(neo, unchanged):
    mp, nmp = tokens(neo, 2, 13), tokens(neo, 3, 14)
    new = tokens(neo, 2, 15)[:, PREFIX:]
    with unchanged(neo):
        df = sparse_finetune(neo, mp, nmp, PREFIX, objective="edit", edit_targets=new, mask="all", steps=2,
                             lr=1e-3, progress_bar=False)
        a = sparse_finetune(neo, mp, nmp, PREFIX, mask="random", fraction=0.01, steps=1, seed=3, n_nmp_per_batch=2,
                            progress_bar=False)
        b = sparse_finetune(neo, mp, nmp, PREFIX, mask="random", fraction=0.01, steps=1, seed=3, n_nmp_per_batch=2,
                            progress_bar=False)
        c = sparse_finetune(neo, mp, nmp, PREFIX, mask="random", fraction=0.01, steps=3, eval_every=2,
                            progress_bar=False)
    assert sorted(c.step.unique()) == [0, 2, 3]
    assert c[c.step == 2].loss.notna().all() and c[c.step == 3].loss.isna().all()
    edit_nll = df[df.split == "memorized"].groupby("step").edit_nll.mean()
    assert edit_nll[2] < edit_nll[0]                                  # editing lowers the target's NLL
    pd.testing.assert_frame_equal(a, b)                               # seeded: reproducible


def test_model_restored_when_training_fails(neo, unchanged, monkeypatch):
    import memloc.finetune as C  # sparse_finetune and its _evaluate live here

    mp, nmp = tokens(neo, 2, 16), tokens(neo, 2, 17)
    real = C._evaluate

    def failing(model, step, *args, **kwargs):
        if step == 2:
            model.hook_dict["blocks.0.hook_resid_pre"].add_hook(lambda act, hook: act)
            raise RuntimeError("boom")
        return real(model, step, *args, **kwargs)

    monkeypatch.setattr(C, "_evaluate", failing)
    with unchanged(neo):
        with pytest.raises(RuntimeError, match="boom"):
            sparse_finetune(neo, mp, nmp, PREFIX, mask="all", steps=3, lr=1e-2, progress_bar=False)


def test_bad_inputs_fail_before_work(neo, unchanged):
    mp, nmp = tokens(neo, 2, 18), tokens(neo, 3, 19)
    calls = []
    bad = [
        lambda: contrastive_loss(neo, mp[:0], nmp, PREFIX),
        lambda: contrastive_loss(neo, mp, nmp[:, :-1][:, :PREFIX], PREFIX),
        lambda: contrastive_loss(neo, mp, nmp, PREFIX, objective="forget"),
        lambda: contrastive_loss(neo, mp, nmp, PREFIX, objective="edit"),
        lambda: contrastive_loss(neo, mp, nmp, PREFIX, objective="edit", edit_targets=mp[:, :3]),
        lambda: contrastive_loss(neo, mp, nmp, PREFIX, edit_targets=mp),
        lambda: contrastive_loss(neo, mp, nmp, PREFIX, reference_logits=torch.zeros(3, T, 5)),
        lambda: contrastive_loss(neo, mp, nmp, SEQ),
        lambda: contrastive_gradients(neo, mp, nmp, PREFIX, n_nmp_per_batch=4),
        lambda: contrastive_gradients(neo, mp, nmp, PREFIX, pooling="median"),
        lambda: contrastive_gradients(neo, mp, nmp, PREFIX, n_nmp_per_batch=2, aggregate="sum"),
        lambda: contrastive_gradients(neo, mp, nmp[:0], PREFIX),
        lambda: finetune_mask(neo, mp, nmp, PREFIX, mask="best"),
        lambda: sparse_finetune(neo, mp, nmp, PREFIX, mask="sparse"),
        lambda: sparse_finetune(neo, mp, nmp, PREFIX, fraction=0.0),
        lambda: sparse_finetune(neo, mp, nmp, PREFIX, fraction=1.5),
        lambda: sparse_finetune(neo, mp, nmp, PREFIX, steps=-1),
        lambda: sparse_finetune(neo, mp, nmp, PREFIX, lr=0),
        lambda: sparse_finetune(neo, mp, nmp, PREFIX, seed="a"),
        lambda: sparse_finetune(neo, mp, nmp, PREFIX, n_nmp_per_batch=9),
        lambda: sparse_finetune(neo, mp, nmp, PREFIX, eval_every=0),
        lambda: sparse_finetune(neo, mp, nmp, PREFIX, objective="edit", edit_targets=nmp),
        lambda: sparse_finetune(neo, mp.float(), nmp, PREFIX),
    ]
    with unchanged(neo), neo.hooks(fwd_hooks=[("hook_embed", lambda act, hook: calls.append(1))]):
        for fn in bad:
            with pytest.raises(ValueError):
                fn()
    assert calls == [], "a forward pass ran before the input was rejected"


# ---------------------------------------------------------------------------------------------
# acceptance on the embedded model (Stoehr Fig. 5)
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_top_gradient_mask_beats_random_on_tiny(tiny, tiny_paragraphs, unchanged):
    """Stoehr Fig. 5 on the embedded model: 8 MPs (EM = 50), 8 NMPs (EM <= 10), 10 Adam steps.
    Sparse fine-tuning of the top-0.1% |∂CO/∂θ| weights lowers the MPs' EM far more than the
    same number of random weights, for unlearning (Eq. 3) and for editing into PMPs (Eq. 4)."""
    from memloc.perturb import make_pmps, perturbation_profile

    table = tiny_paragraphs.table
    mp_ids = table.index[(table.em_ref == 50)][:8].to_numpy()
    nmp_ids = table.index[(table.em_ref <= 10)][:8].to_numpy()
    assert len(mp_ids) == 8 and len(nmp_ids) == 8
    toks = tiny_paragraphs.tokens
    mp, nmp = toks[mp_ids], toks[nmp_ids]
    prefix = tiny_paragraphs.prefix_len
    res = perturbation_profile(tiny, mp, prefix, positions=[prefix - 1], progress_bar=False)
    pmps = make_pmps(tiny, mp, prefix, result=res, drop_unchanged=False, progress_bar=False)
    edit_targets = pmps.perturbed[:, prefix:]      # the PMP continuation after the MP's own prefix
    final, runs = {}, {}
    with unchanged(tiny):
        for objective in ("unlearn", "edit"):
            for mask in ("top", "random"):
                df = sparse_finetune(tiny, mp, nmp, prefix, objective=objective, mask=mask, steps=10, lr=3e-3,
                                     seed=0, eval_every=10, edit_targets=edit_targets if objective == "edit" else None,
                                     progress_bar=False)
                runs[objective, mask] = df
                final[objective, mask] = df[(df.step == 10) & (df.split == "memorized")].em.mean()
    for df in runs.values():
        s0 = df[df.step == 0]
        assert (s0.em == 50).all()          # MPs fully memorized; NMPs match their own continuation
    assert final["unlearn", "top"] < final["unlearn", "random"] - 15, final
    assert final["unlearn", "top"] < 20, final
    assert final["edit", "top"] < final["edit", "random"] - 10, final


def test_sparse_finetune_teacher_forced_em_equals_greedy(tiny, tiny_paragraphs, unchanged):
    """Speed path: every EM of the trajectory (MP, NMP, edit target) read off the teacher-forced pass
    equals the greedily decoded one, and a precomputed NMP continuation gives the same table."""
    from memloc.metrics import greedy_continuation

    em = tiny_paragraphs.table["em_ref"].to_numpy()
    mp = tiny_paragraphs.tokens[np.flatnonzero(em == 50)[:3]]
    nmp = tiny_paragraphs.tokens[np.flatnonzero(em <= 10)[:4]]
    pmp = mp.clone()
    pmp[:, 49] = (pmp[:, 49] + 7) % tiny.cfg.d_vocab                    # a perturbed prefix ...
    pmp[:, 50:] = greedy_continuation(tiny, pmp, 50)                   # ... and its continuation
    kw = dict(fraction=0.01, steps=2, lr=1e-2, seed=0, progress_bar=False)
    with unchanged(tiny):
        # [n, T] edit targets after the MP prefix (the reproduce setting) and [n, seq] whole PMPs
        for objective, targets, mask in (("unlearn", None, "all"), ("edit", pmp[:, 50:], "all"), ("edit", pmp, "top")):
            fast = sparse_finetune(tiny, mp, nmp, 50, objective=objective, edit_targets=targets, mask=mask, **kw)
            slow = sparse_finetune(tiny, mp, nmp, 50, objective=objective, edit_targets=targets, mask=mask,
                                   em_via="greedy", **kw)
            pd.testing.assert_frame_equal(fast, slow)
            if objective == "unlearn":
                assert set(fast.em[fast.split == "memorized"]) != {50}       # EM changed: not a trivial case
            if objective == "edit" and mask == "all":
                nll = fast[fast.split == "memorized"].groupby("step").edit_nll.mean()
                assert nll.nunique() == 3                                         # the weights moved every step
        ref = greedy_continuation(tiny, nmp, 50)
        pre = sparse_finetune(tiny, mp, nmp, 50, mask="top", non_memorized_continuation=ref, **kw)
    pd.testing.assert_frame_equal(pre, sparse_finetune(tiny, mp, nmp, 50, mask="top", **kw))
    # the partial forwards (blocks re-run from the fixed embedding output) vs full forwards
    import memloc.localize._common as C

    calls = []
    real = C.partial_forward
    C.partial_forward = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        part = sparse_finetune(tiny, mp, nmp, 50, objective="edit", edit_targets=pmp[:, 50:], mask="all", **kw)
        C.partial_forward = lambda *a, **k: None
        full = sparse_finetune(tiny, mp, nmp, 50, objective="edit", edit_targets=pmp[:, 50:], mask="all", **kw)
    finally:
        C.partial_forward = real
    assert len(calls) == 2                                                   # training and evaluation
    pd.testing.assert_frame_equal(part, full, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="non_memorized_continuation"):
        sparse_finetune(tiny, mp, nmp, 50, non_memorized_continuation=ref[:, :3], **kw)
    with pytest.raises(ValueError, match="em_via"):
        sparse_finetune(tiny, mp, nmp, 50, em_via="bogus", **kw)
