"""Every public plot function returns a Figure on small synthetic DataFrames; ``save`` writes HTML
and a real PNG (static export through kaleido + Chromium)."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

import memloc.plots as plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _param_grads(groups=("MP", "NMP")) -> pd.DataFrame:
    rows = []
    for g_i, g in enumerate(groups):
        for layer in range(2):
            for comp in ("W_Q", "W_K", "W_V", "W_O"):
                for head in range(2):
                    rows.append(dict(group=g, layer=layer, component=comp, head=head, label=f"{comp} H{head}",
                                     block="attn", value=float(layer + head + g_i)))
            for comp in ("W_in", "W_out"):
                rows.append(dict(group=g, layer=layer, component=comp, head=-1, label=comp, block="mlp",
                                 value=float(2 * layer + g_i)))
    return pd.DataFrame(rows)


def _act_grads() -> pd.DataFrame:
    rows = [dict(paragraph=0, layer=l, component="v", head=h, position=p, value=float(l + h + p))
            for l in range(2) for h in range(2) for p in range(5)]
    return pd.DataFrame(rows)


def _figures() -> dict[str, go.Figure]:
    mem = pd.DataFrame({"id": range(6), "em": [50, 50, 3, 0, 20, 50], "nll": [0.1, 0.2, 3.0, 4.0, 1.5, 0.05],
                        "count": [100, 30, 0, 0, 5, 200]})
    mem["split"] = ["memorized", "memorized", "non-memorized", "non-memorized", "partial", "memorized"]
    profile = pd.DataFrame({"paragraph": 0, "position": range(4), "em_drop_mean": [0, 50, 3, 0],
                            "nll_change_mean": [0.1, 2.0, 0.3, 0.0], "em_drop_max": [0, 50, 3, 0]})
    by_pos = pd.DataFrame({"group": ["memorized"] * 3 + ["non-memorized"] * 3, "position": [0, 1, 2] * 2,
                           "mean": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], "sem": 0.5, "n": 2})
    ft = pd.DataFrame([dict(step=s, split=sp, id=i, em=50 - 10 * s if sp == "memorized" else 5, nll=1.0,
                            objective=o, mask=m)
                       for s in range(3) for sp in ("memorized", "non-memorized") for i in range(2)
                       for o in ("unlearn", "edit") for m in ("top", "random")])
    patch = pd.DataFrame([dict(id=0, direction=d, layer=l, component=c, head=h, value=0.1 * l - 0.05 * h)
                          for d in ("mp_to_pmp", "pmp_to_mp") for l in range(2)
                          for c, h in (("attn_out", -1), ("mlp_out", -1), ("z", 0), ("z", 1))])
    ranks = pd.DataFrame([dict(layer=l, head=h, rank=r, attention=1 / (r + 1 + h), n_tokens=3)
                          for l in range(2) for h in range(2) for r in range(5)])
    corr = pd.DataFrame([dict(layer=l, head=h, correlation=-0.5 - 0.1 * h) for l in range(2) for h in range(2)])
    inj = pd.DataFrame([dict(seq_id=s, method=m, ratio=0.01, k=0.01 * km, k_multiple=km, selection=sel,
                             recall=0.1 * km, n_injected=41)
                        for s in range(2) for m in ("activations", "random") for km in (1, 2)
                        for sel in ("per_layer", "across_layers")])
    del_rows = pd.DataFrame([dict(method=m, ratio=r, target_id=t, d_self_acc=-0.5, d_self_dist=10.0, d_neg_acc=-0.1,
                                  d_neg_dist=2.0, d_rand_ppl=0.3)
                             for m in ("activations", "random") for r in (0.01, 0.02) for t in range(2)])
    conf = pd.DataFrame(np.array([[-0.9, -0.1, 0.0], [-0.2, -0.8, -0.1]]), index=pd.Index([3, 7], name="target_id"),
                        columns=pd.Index([3, 7, 9], name="seq_id"))
    return {
        "memorization_scatter": plots.memorization_scatter(mem),
        "memorization_scatter_count": plots.memorization_scatter(mem, color="count"),
        "perturbation_bars": plots.perturbation_bars(profile, ["a", "b", "a", "c"]),
        "perturbation_by_position": plots.perturbation_by_position(by_pos),
        "gradient_heatmap": plots.gradient_heatmap(_param_grads(("MP",))),
        "gradient_heatmaps_by_group": plots.gradient_heatmaps_by_group(_param_grads()),
        "attention_vs_mlp_totals": plots.attention_vs_mlp_totals(_param_grads(), "group"),
        "activation_gradient_heatmap": plots.activation_gradient_heatmap(_act_grads(), "v", 1),
        "finetune_trajectories": plots.finetune_trajectories(ft),
        "patching_heatmap": plots.patching_heatmap(patch),
        "head_token_heatmaps": plots.head_token_heatmaps({"grad": torch.rand(2, 4), "att": torch.rand(2, 4)},
                                                         ["w", "x", "y", "z"]),
        "rank_attention": plots.rank_attention(ranks, (1, 1), correlations=corr),
        "inj_recall_bars": plots.inj_recall_bars(inj),
        "del_table_figure": plots.del_table_figure(del_rows),
        "del_confusion_heatmap": plots.del_confusion_heatmap(conf, {3: "a", 7: "b", 9: "b"}),
    }


def test_every_plot_function_returns_a_figure():
    figs = _figures()
    for name, fig in figs.items():
        assert isinstance(fig, go.Figure), name
        assert len(fig.data) > 0, f"{name} has no traces"
    # every public plot function (all but save/token_labels) is exercised above
    public = {n for n in plots.__all__ if n not in ("save", "png_session", "token_labels")}
    assert public <= {k.replace("_count", "") for k in figs}


def test_memorization_scatter_content():
    mem = pd.DataFrame({"em": [50, 0, 50], "nll": [0.1, 3.0, 0.2], "split": ["memorized", "non-memorized", "memorized"]})
    fig = plots.memorization_scatter(mem)
    names = sorted(t.name for t in fig.data)
    assert names == ["memorized (2)", "non-memorized (1)"]
    ys = {t.name: sorted(t.y) for t in fig.data}
    assert ys["memorized (2)"] == [0.1, 0.2]
    with pytest.raises(ValueError, match="count"):
        plots.memorization_scatter(mem, color="count")
    with pytest.raises(ValueError, match="em"):
        plots.memorization_scatter(pd.DataFrame({"nll": [1.0]}))
    with pytest.raises(ValueError, match="color"):
        plots.memorization_scatter(mem, color="bogus")


@pytest.mark.skipif(shutil.which("chromium") is None and shutil.which("google-chrome") is None,
                    reason="no Chromium for static export (`make browser` installs it)")
def test_save_writes_png_and_html(tmp_path):
    fig = plots.memorization_scatter(pd.DataFrame({"em": [50, 0], "nll": [0.1, 3.0],
                                                   "split": ["memorized", "non-memorized"]}))
    paths = plots.save(fig, tmp_path / "sub" / "fig.png")
    assert {p.suffix for p in paths} == {".html", ".png"}
    png = tmp_path / "sub" / "fig.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert png.stat().st_size > 1000
    assert "plotly" in (tmp_path / "sub" / "fig.html").read_text()[:5000].lower()
    with pytest.raises(ValueError, match="Figure"):
        plots.save("not a figure", tmp_path / "x")


def test_save_without_a_browser_raises_a_clear_error(tmp_path, monkeypatch):
    def no_browser(*a, **k):
        raise FileNotFoundError("chromium not found")

    monkeypatch.setattr(go.Figure, "write_image", no_browser)
    fig = go.Figure(go.Scatter(x=[0, 1], y=[1, 0]))
    with pytest.raises(RuntimeError, match="make browser"):
        plots.save(fig, tmp_path / "f")
    assert (tmp_path / "f.html").exists()  # the HTML is written first
    assert plots.save(fig, tmp_path / "g", png=False) == [tmp_path / "g.html"]


@pytest.mark.skipif(shutil.which("chromium") is None and shutil.which("google-chrome") is None,
                    reason="no Chromium for static export (`make browser` installs it)")
def test_png_session_keeps_one_browser_and_writes_the_same_bytes(tmp_path):
    from memloc.plots._save import _server

    fig = plots.memorization_scatter(pd.DataFrame({"em": [50, 0], "nll": [0.1, 3.0],
                                                   "split": ["memorized", "non-memorized"]}))
    plots.save(fig, tmp_path / "alone")  # its own browser
    assert not _server().is_running()
    with plots.png_session() as on:
        assert on and _server().is_running()  # the path taken: kaleido's persistent server
        plots.save(fig, tmp_path / "in_session")
        with plots.png_session() as nested:  # a running server is reused and left running
            assert nested
        assert _server().is_running()
    assert not _server().is_running()  # stopped on exit
    assert (tmp_path / "in_session.png").read_bytes() == (tmp_path / "alone.png").read_bytes()


def test_png_session_without_a_browser_warns_and_falls_back(tmp_path, monkeypatch, caplog):
    import kaleido._sync_server as sync_server

    from memloc.plots._save import _server

    class NoBrowser:
        def __init__(self, *a, **k):
            raise FileNotFoundError("chromium not found")

    monkeypatch.setattr(sync_server, "Kaleido", NoBrowser)  # the server thread dies at start-up
    with caplog.at_level("WARNING", logger="memloc.plots._save"), plots.png_session() as on:
        assert on is False
        assert not _server().is_running()  # exports go back to a browser per figure
    assert "could not keep one browser" in caplog.text and "browser did not start" in caplog.text
    assert not _server().is_running()


def _ft_with_edit() -> pd.DataFrame:
    rows = []
    for o in ("unlearn", "edit"):
        for m in ("top", "all"):
            for s in range(3):
                for i in range(4):
                    rows.append(dict(step=s, split="memorized", id=i, em=50 - 10 * s, nll=1.0, objective=o, mask=m,
                                     edit_em=(10 * s if m == "all" else 0) if o == "edit" else np.nan))
                for i in range(6):
                    rows.append(dict(step=s, split="non-memorized", id=i, em=40, nll=2.0, objective=o, mask=m,
                                     edit_em=np.nan))
    return pd.DataFrame(rows)


def test_finetune_plot_shows_the_edit_target_and_explains_error_bars():
    fig = plots.finetune_trajectories(_ft_with_edit())
    edit = [t for t in fig.data if "edit target" in t.name]
    assert sorted(t.name for t in edit) == ["all, edit target", "top, edit target"]
    all_edit = next(t for t in edit if t.name.startswith("all"))
    assert list(all_edit.y) == [0.0, 10.0, 20.0]                     # mean edit_em per step
    assert all(t.xaxis == "x2" for t in edit)                         # only in the editing facet
    assert all(t.error_y.array is not None for t in fig.data)
    title = fig.layout.title.text
    assert "standard error" in title and "4 MPs" in title and "6 NMPs" in title and "4 edit targets" in title
    assert "SEM" in fig.layout.yaxis.title.text
    # without edit_em (unlearning only) there is no edit-target line
    df = _ft_with_edit()
    fig2 = plots.finetune_trajectories(df[df.objective == "unlearn"].drop(columns="edit_em"))
    assert not any("edit target" in t.name for t in fig2.data)


def test_rank_attention_labels_the_highlighted_and_the_most_rare_focused_heads():
    ranks = pd.DataFrame([dict(layer=0, head=h, rank=r, attention=1 / (r + 1 + h), n_tokens=3, n=64)
                          for h in range(3) for r in range(5)])
    corr = pd.DataFrame([dict(layer=0, head=h, correlation=c) for h, c in ((0, -0.5), (1, -0.9), (2, -0.1))])
    fig = plots.rank_attention(ranks, {(0, 2): "memorization head"}, correlations=corr)
    notes = {a.text for a in fig.layout.annotations}
    assert "<b>L0H2</b> memorization head" in notes
    assert "<b>L0H1</b> most rare-token-focused head" in notes        # the most negative correlation
    names = [t.name for t in fig.data]
    assert "L0H1 (r=-0.90): most rare-token-focused head" in names and "L0H0 (r=-0.50)" in names
    assert "64 paragraphs" in fig.layout.title.text
    # a tuple or a list of heads still works; the same head gets both labels
    fig = plots.rank_attention(ranks, (0, 1), correlations=corr)
    assert [a.text for a in fig.layout.annotations] == ["<b>L0H1</b> most rare-token-focused head"]
    fig = plots.rank_attention(ranks, [(0, 0), (0, 2)], correlations=corr, mark_most_rare=False)
    assert len(fig.layout.annotations) == 2
    with pytest.raises(ValueError, match="highlight"):
        plots.rank_attention(ranks, (3, 3))


def test_del_table_is_sized_to_its_content():
    rows = pd.DataFrame([dict(method=m, ratio=r, target_id=t, d_self_acc=-0.5, d_self_dist=10.0, d_neg_acc=-0.1,
                              d_neg_dist=2.0, d_rand_ppl=0.3)
                         for m in ("hard_concrete", "slimming", "zero_out", "integrated_gradients", "activations",
                                   "random") for r in (0.005, 0.02, 0.1) for t in range(5)])
    fig = plots.del_table_figure(rows)
    table = fig.data[0]
    n_rows, n_cols = 6, 1 + 15
    assert len(table.header.values) == n_cols and len(table.cells.values[0]) == n_rows
    assert table.cells.font.size >= 14 and table.header.font.size >= 14
    content_h = table.header.height + n_rows * table.cells.height
    m = fig.layout.margin
    assert fig.layout.height - content_h - m.t - m.b <= 30            # no blank half below the table
    assert abs(fig.layout.width - (sum(table.columnwidth) + m.l + m.r)) <= 10
    assert "mean over 5 targets" in fig.layout.title.text


def test_colour_bars_have_units_and_error_bars_are_explained():
    g = plots.gradient_heatmap(_param_grads(("MP",)))
    assert "∂" in g.data[0].colorbar.title.text and "nats" in g.data[0].colorbar.title.text
    g = plots.gradient_heatmap(_param_grads(("MP",)), colorbar_title="max |∂CO/∂θ|")
    assert g.data[0].colorbar.title.text == "max |∂CO/∂θ|"
    gg = plots.gradient_heatmaps_by_group(_param_grads())
    assert "nats" in gg.layout.coloraxis.colorbar.title.text
    h = plots.head_token_heatmaps({"value-activation gradients, layer 0": torch.rand(2, 4),
                                   "attention of the first decoded token, layer 0": torch.rand(2, 4)})
    titles = [t.colorbar.title.text for t in h.data]
    assert "∂NLL" in titles[0] and "attention" in titles[1]
    h = plots.head_token_heatmaps({"a": torch.rand(2, 4), "b": torch.rand(2, 4)}, colorbar_titles=["u1", "u2"])
    assert [t.colorbar.title.text for t in h.data] == ["u1", "u2"]
    with pytest.raises(ValueError, match="colorbar_titles"):
        plots.head_token_heatmaps({"a": torch.rand(2, 4)}, colorbar_titles=["u1", "u2"])
    inj = pd.DataFrame([dict(seq_id=s, method="random", ratio=0.01, k=0.01, k_multiple=1, selection="per_layer",
                             recall=0.1 * s, n_injected=41) for s in range(3)])
    fig = plots.inj_recall_bars(inj)
    assert "SEM" in fig.layout.yaxis.title.text and "n = 3" in fig.layout.yaxis.title.text
    by_pos = pd.DataFrame({"group": ["memorized"] * 2 + ["non-memorized"] * 2, "position": [0, 1] * 2,
                           "mean": [1.0, 2.0, 3.0, 4.0], "sem": 0.5, "n": [16, 16, 12, 12]})
    fig = plots.perturbation_by_position(by_pos)
    assert "SEM" in fig.layout.yaxis.title.text and "non-memorized: 12" in fig.layout.title.text


# ----------------------------------------------------------------------------- plots of real results
# (figures drawn from what the analyses return on small random-weight models and the embedded model)

from memloc import load_model  # noqa: E402
from memloc.benchmarks import del_benchmark  # noqa: E402
from memloc.contrastive import sparse_finetune  # noqa: E402
from memloc.data import random_sequences  # noqa: E402
from memloc.patching import activation_patching  # noqa: E402
from memloc.perturb import em_drop_by_position, perturbation_profile  # noqa: E402
from memloc.plots import heads as heads_plots  # noqa: E402
from memloc.plots.contrastive import finetune_trajectories, patching_heatmap  # noqa: E402
from memloc.plots.gradients import (activation_gradient_heatmap, attention_vs_mlp_totals,  # noqa: E402
                                    gradient_heatmap, gradient_heatmaps_by_group)
from memloc.plots.perturbation import perturbation_bars, perturbation_by_position, token_labels  # noqa: E402

from .test_benchmarks import known_neurons, memorized  # noqa: E402,F401  (fixture)
from .test_contrastive import PREFIX as CONTRASTIVE_PREFIX  # noqa: E402
from .test_contrastive import tokens as contrastive_tokens  # noqa: E402
from .test_patching import PREFIX as PATCHING_PREFIX  # noqa: E402
from .test_patching import make_pairs  # noqa: E402
from .test_perturb import PREFIX as PERTURB_PREFIX  # noqa: E402
from .test_perturb import SEQ as PERTURB_SEQ  # noqa: E402
from .test_perturb import _tokens  # noqa: E402


@pytest.fixture(scope="module")
def neo(random_model_dir):
    return load_model(random_model_dir("gpt-neo"))


def test_head_token_heatmaps():
    vals = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    labels = ["a", ".", "a", "b"]  # repeated tokens stay separate columns
    fig = heads_plots.head_token_heatmaps(vals, labels, "t")
    assert len(fig.data) == 1
    np.testing.assert_array_equal(np.asarray(fig.data[0].z), vals.numpy())
    assert list(fig.layout.xaxis.ticktext) == labels and list(fig.layout.xaxis.tickvals) == [0, 1, 2, 3]
    df = pd.DataFrame([{"layer": 1, "head": h, "position": p, "attention": float(vals[h, p])}
                       for h in range(3) for p in range(4)])
    fig2 = heads_plots.head_token_heatmaps({"gradients": vals, "attention": df}, labels, "fig 6")
    assert len(fig2.data) == 2
    np.testing.assert_array_equal(np.asarray(fig2.data[1].z), vals.numpy())
    with pytest.raises(ValueError, match="token_labels"):
        heads_plots.head_token_heatmaps(vals, labels[:3])
    with pytest.raises(ValueError, match="layer"):
        heads_plots.head_token_heatmaps(pd.concat([df, df.assign(layer=2)]), labels)


def test_rank_attention_plot():
    df = pd.DataFrame([{"layer": l, "head": h, "rank": r, "attention": (r + 1) * (h + 1), "n_tokens": int(r != 2)}
                       for l in range(2) for h in range(2) for r in range(4)])
    corr = pd.DataFrame([{"layer": l, "head": h, "correlation": 0.5} for l in range(2) for h in range(2)])
    fig = heads_plots.rank_attention(df, highlight=(1, 0), correlations=corr)
    assert len(fig.data) == 4
    top = fig.data[-1]
    assert top.name.startswith("L1H0") and "0.50" in top.name and top.line.color == "crimson"
    assert list(top.x) == [0, 1, 3]  # rank 2 has no tokens
    with pytest.raises(ValueError, match="highlight"):
        heads_plots.rank_attention(df, highlight=(5, 0))


def test_perturbation_and_gradient_plots(neo):
    x = _tokens(neo, n=2, seq=PERTURB_SEQ)
    r = perturbation_profile(neo, x, PERTURB_PREFIX, positions=[0, 3, 9], progress_bar=False)
    labels = token_labels(neo, x[0, :PERTURB_PREFIX])
    assert labels == [neo.tokenizer.decode([int(t)]) for t in x[0, :PERTURB_PREFIX]]
    fig = perturbation_bars(r.profile[r.profile.paragraph == 0], labels)
    assert len(fig.data) == 2 and len(fig.data[0].x) == 3
    assert fig.data[0].x[1].rstrip("\u200b") in (labels[3], repr(labels[3]), labels[3].replace("\n", "\\n"))
    with pytest.raises(ValueError, match="several paragraphs"):
        perturbation_bars(r.profile, labels)
    fig = perturbation_by_position(em_drop_by_position(r.profile, ["memorized", "non-memorized"]))
    assert [t.name for t in fig.data] == ["memorized", "non-memorized"]
    from memloc.gradients import activation_gradients, parameter_gradients_by_group
    g = parameter_gradients_by_group(neo, x, PERTURB_PREFIX, ["a", "b"], pooling="sum", progress_bar=False)
    assert len(gradient_heatmap(g[g.group == "a"]).data) == 1
    assert len(gradient_heatmaps_by_group(g, "group").data) == 2
    assert len(attention_vs_mlp_totals(g, "group").data) == 4
    a = activation_gradients(neo, x[:1], PERTURB_PREFIX, components=["v"], progress_bar=False)
    fig = activation_gradient_heatmap(a, "v", 1, token_labels=token_labels(neo, x[0]))
    assert fig.data[0].z.shape == (neo.cfg.n_heads, PERTURB_SEQ)


def test_finetune_trajectories_plot(neo):
    mp, nmp = contrastive_tokens(neo, 2, 20), contrastive_tokens(neo, 2, 21)
    df = pd.concat([sparse_finetune(neo, mp, nmp, CONTRASTIVE_PREFIX, mask=m, fraction=0.01, steps=1, progress_bar=False)
                    for m in ("top", "random")])
    fig = finetune_trajectories(df)
    assert len(fig.data) == 4                          # 2 masks x 2 splits, one objective facet
    top_mp = [t for t in fig.data if t.legendgroup.startswith("top") and "MP" in t.name and "NMP" not in t.name][0]
    expect = df[(df["mask"] == "top") & (df.split == "memorized")].groupby("step").em.mean().to_numpy()
    np.testing.assert_allclose(np.asarray(top_mp.y, dtype=float), expect)
    with pytest.raises(ValueError):
        finetune_trajectories(df.drop(columns=["mask"]))


def test_heatmap(neo):
    mp, pmp, pos, first = make_pairs(neo, [2, 9], [0, 3])
    df = activation_patching(neo, mp, pmp, pos, first, PATCHING_PREFIX, components=("resid_pre", "z"), progress_bar=False)
    fig = patching_heatmap(df)
    assert len(fig.data) == 2
    z = fig.data[0].z
    assert z.shape == (neo.cfg.n_layers, 1 + neo.cfg.n_heads)
    expect = df[(df.direction == "mp_to_pmp") & (df.component == "resid_pre")].groupby("layer").value.mean()
    assert torch.allclose(torch.tensor(z[:, list(fig.data[0].x).index("resid_pre")]),
                          torch.tensor(expect.to_numpy()), atol=1e-9)
    with pytest.raises(ValueError):
        patching_heatmap(df.drop(columns=["value"]))


def test_figures(tiny, memorized, tmp_path):
    import plotly.graph_objects as go

    from memloc.plots import del_confusion_heatmap, del_table_figure, inj_recall_bars, save

    rows = []
    for s in range(3):
        for meth in ("hard_concrete", "random"):
            for r in (0.01, 0.005):
                for mult in (1, 2, 5):
                    for sel in ("per_layer", "across_layers"):
                        rows.append(dict(seq_id=s, method=meth, ratio=r, k=r * mult, k_multiple=mult, selection=sel,
                                         recall=0.5 if meth == "hard_concrete" else r * mult, n_injected=41))
    inj = pd.DataFrame(rows)
    fig = inj_recall_bars(inj)
    assert isinstance(fig, go.Figure) and len(fig.data) == 2 * 3
    assert list(fig.data[0].x) == ["HARD CONCRETE", "RANDOM"] and fig.data[0].y[0] == pytest.approx(50.0)
    tokens, prefix_len, ids = memorized
    res = del_benchmark(tiny, {"known": known_neurons}, tokens[:4], prefix_len, ids=ids[:4], ratios=(0.002,),
                        random_tokens=random_sequences("tiny")[:2], progress_bar=False)
    tf = del_table_figure(res)
    assert isinstance(tf.data[0], go.Table) and len(tf.data[0].cells.values) == 1 + 5
    hm = del_confusion_heatmap(res.matrices[("known", 0.002)])
    assert hm.data[0].z.shape == (4, 4)
    cats = {ids[0]: "b", ids[1]: "a", ids[2]: "b", ids[3]: "a"}
    hm2 = del_confusion_heatmap(res.matrices[("known", 0.002)], categories=cats)
    assert list(hm2.layout.xaxis.ticktext) == [f"b: {ids[0]}", f"b: {ids[2]}", f"a: {ids[1]}", f"a: {ids[3]}"]
    m = res.matrices[("known", 0.002)]
    assert hm2.data[0].z[0][1] == pytest.approx(m.loc[ids[0], ids[2]] * 100)
    assert len(hm2.layout.shapes) == 2
    with pytest.raises(ValueError):
        del_confusion_heatmap(m, categories={ids[0]: "a"})
    written = save(hm2, tmp_path / "confusion", png=False)
    assert written[0].suffix == ".html" and written[0].stat().st_size > 1000
