"""Write the walk-through notebooks in notebooks/ (without outputs) with nbformat.

Usage::

    python scripts/make_notebooks.py

Each notebook starts with a ``MODEL`` and a ``QUICK`` parameter cell; CI (tests/test_notebooks.py)
executes them on the embedded model with ``QUICK = True``.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

OUT = Path(__file__).resolve().parents[1] / "notebooks"

PARAMS = '''MODEL = "tiny"   # the embedded model; "EleutherAI/gpt-neo-125M" for users with hub access
QUICK = True     # small sizes so the notebook runs in about a minute on a CPU; False for the full analysis'''

SETUP = '''import os
os.environ.setdefault("MEMLOC_PROGRESS", "0")   # no progress bars in the rendered notebook
import torch
torch.set_num_threads(1)   # the embedded model's small matrix products are fastest on one thread
import numpy as np
import pandas as pd
import memloc
from memloc import plots
from memloc.data import default_paragraphs, select_groups

model = memloc.load_model(MODEL)
ps, NMP_MAX_EM, note = default_paragraphs(model)
prefix_len = ps.prefix_len
T = ps.tokens.shape[1] - prefix_len
print(note)
print(memloc.model_facts(model))'''

SPLIT = '''# memorization metrics of (a subset of) the paragraph pool and the MP / NMP split
idx = np.linspace(0, len(ps) - 1, 120 if QUICK else len(ps)).round().astype(int)
pool = ps.subset(torch.as_tensor(np.unique(idx)))
counts = pool.table["count"] if "count" in pool.table else None
mem = memloc.memorization(model, pool.tokens, prefix_len, counts=counts, progress_bar=False)
mem["split"] = memloc.split_memorization(mem, memorized_min_em=T, non_memorized_max_em=NMP_MAX_EM)
mp_rows, nmp_rows = select_groups(mem, 8 if QUICK else 50, 8 if QUICK else 50)
MP, NMP = pool.tokens[mp_rows], pool.tokens[nmp_rows]
print(mem["split"].value_counts().to_dict(), "-> using", len(MP), "MPs and", len(NMP), "NMPs")'''


def nb(cells: list) -> nbformat.NotebookNode:
    for i, cell in enumerate(cells):  # stable ids: regenerating an unchanged notebook changes no byte
        cell.id = f"cell-{i:02d}"
    book = new_notebook(cells=cells)
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    book.metadata["language_info"] = {"name": "python"}
    return book


def md(text: str):
    return new_markdown_cell(text.strip())


def code(text: str):
    return new_code_cell(text.strip())


def notebook_01() -> nbformat.NotebookNode:
    return nb([
        md("""
# 1. Memorized paragraphs and how to measure memorization

This notebook follows **Stoehr et al. (2024), §3** and the metrics of **Chang et al. (2024), §2-3**.
A paragraph is 100 tokens: a 50-token *prefix* and a 50-token *continuation*. We feed the prefix and
ask how much of the continuation the model reproduces:

* **exact match (EM)** — number of greedy tokens equal to the true continuation before the first
  mismatch (Stoehr §3.2). EM = 50 means the paragraph is *memorized* (MP); EM ≤ 10 *non-memorized* (NMP);
* **NLL** — mean negative log-likelihood of the true continuation (Chang et al. Eq. 6);
* **teacher-forced accuracy** (Chang Eq. 5) and the **Levenshtein distance** of the decoded text
  (Chang Eq. 4 / Eq. 18).

The embedded model was trained with planted paragraphs repeated 1–200 times, so we know which ones
it *should* have memorized.
"""),
        md("## Parameters"),
        code(PARAMS),
        code(SETUP),
        md("""
## The MP / NMP split (Stoehr Fig. 2)

`memloc.memorization` runs one teacher-forced pass and one batched greedy decoding per batch and
returns one row per paragraph. `split_memorization` labels each row.
"""),
        code(SPLIT),
        code('''mem[["id", "em", "nll", "accuracy", "lev_tf", "lev_greedy"] + (["count"] if "count" in mem else [])].head()'''),
        md("""
Memorized paragraphs have EM = 50 and NLL near 0; the never-seen ones sit at low EM and high NLL.
Colouring by the training duplication count shows that memorization needs repetition.
"""),
        code('''fig = plots.memorization_scatter(mem)
fig.show()
if "count" in mem:
    plots.memorization_scatter(mem, color="count").show()
    seen = mem[mem["count"] > 0]
    print("Spearman(EM, count) over seen paragraphs:", round(seen[["em", "count"]].corr("spearman").iloc[0, 1], 3))'''),
        md("""
## One memorized paragraph, token by token

Decoding the prefix and the greedy continuation makes the metric concrete.
"""),
        code('''x = MP[:1]
gen = memloc.metrics.greedy_continuation(model, x, prefix_len)
tok = model.tokenizer
print("PREFIX:     ", repr(tok.decode(x[0, :prefix_len].tolist())))
print("TRUE CONT.: ", repr(tok.decode(x[0, prefix_len:].tolist())))
print("GREEDY:     ", repr(tok.decode(gen[0].tolist())))
print("EM =", int(memloc.metrics.em_from_generations(gen, x[:, prefix_len:])[0]))'''),
        md("""
## Prefix-token perturbation (Stoehr §4, Fig. 3)

Replacing a single prefix token by a random one can derail a memorized continuation. For every
prefix position we perturb the token, re-decode, and record the **EM drop** and the **NLL change**
of the true continuation. Fig. 3 (bottom) compares MPs and NMPs: the EM drop is measured against
the model's own unperturbed continuation, so NMPs can be compared too.
"""),
        code('''from memloc.perturb import em_drop_by_position, perturbation_profile

n = 1 if QUICK else 8
x = torch.cat([MP[:n], NMP[:n]])
res = perturbation_profile(model, x, prefix_len, batch_size=128, progress_bar=False)
labels = plots.token_labels(model, x[0, :prefix_len].tolist())
plots.perturbation_bars(res.profile[res.profile.paragraph == 0], labels,
                        title="Perturbing each prefix token of one MP").show()
by_pos = em_drop_by_position(res.profile, ["memorized"] * n + ["non-memorized"] * n)
plots.perturbation_by_position(by_pos).show()
by_pos.groupby("group")["mean"].mean()'''),
        md("""
**What to look for.** A few positions — often near the end of the prefix or distinctive (rare)
tokens — destroy the memorized continuation, while most perturbations leave it intact; NMP
continuations slip off more easily (Stoehr §4).
"""),
    ])


def notebook_02() -> nbformat.NotebookNode:
    return nb([
        md("""
# 2. Localizing memorized data in neurons and the two benchmarks

**Chang et al. (2024)** ask whether neuron-localization methods find the FFN neurons that store a
sequence. A *neuron* is one component of the MLP hidden state `blocks.{l}.mlp.hook_post`. Every
method is a function `(model, tokens, prefix_len) -> scores[layer, neuron]` (§4):
ACTIVATIONS, INTEGRATED GRADIENTS (IG), ZERO-OUT, SLIMMING and HARD CONCRETE, plus a RANDOM baseline.

Two benchmarks check them (§3):

* **INJ** — inject a new sequence into a random set of value vectors, then measure how many of
  those neurons a method recalls (Recall@k%, Table 2);
* **DEL** — drop out the neurons a method locates for a memorized sequence and measure how much the
  model forgets it (ΔSelf-Acc) versus other memorized sequences (ΔNeg-Acc) and random text (ΔRand-PPL)
  (Table 3, Fig. 2).
"""),
        md("## Parameters"),
        code(PARAMS),
        code(SETUP),
        code(SPLIT),
        md("""
## Scores of a few methods on one memorized paragraph

`select_top_k` turns scores into a neuron mask (top k% per layer, as in the paper), and
`ablate` zeroes those neurons while the context is open — every metric computed inside sees it.
"""),
        code('''from memloc.localize import METHODS
from memloc.ablation import ablate, select_top_k

x = MP[:1]
kwargs = {"integrated_gradients": {"steps": 4 if QUICK else 20, "progress_bar": False},
          "zero_out": {"progress_bar": False}}
names = ["activations", "integrated_gradients", "random"] + ([] if QUICK else ["zero_out"])
rows = []
for name in names:
    scores = METHODS[name](model, x, prefix_len, **kwargs.get(name, {}))
    mask = select_top_k(scores, 0.02, exclude_layers=[0])
    with ablate(model, mask):
        acc = memloc.teacher_forced_accuracy(model, x, prefix_len)
    rows.append({"method": name, "neurons dropped": int(mask.sum()), "accuracy after dropout": float(acc[0])})
print("accuracy before:", float(memloc.teacher_forced_accuracy(model, x, prefix_len)[0]))
pd.DataFrame(rows)'''),
        md("""
## INJ benchmark (Chang §3.1, Table 2)

An ECBD-2021 definition is injected into 1% of the value vectors by fine-tuning only those
(Algorithm 1); each method then scores the neurons on the injected model. Recall@k% is the fraction
of injected neurons among the top-k% per layer.
"""),
        code('''from memloc.benchmarks import inj_benchmark, inj_table

inj_methods = ["activations", "integrated_gradients", "random"]
inj = inj_benchmark(model, inj_methods, n=1 if QUICK else 8, ratios=[0.01],
                    method_kwargs={"integrated_gradients": {"steps": 4 if QUICK else 20, "progress_bar": False}},
                    max_steps=150 if QUICK else 500, progress_bar=False)
plots.inj_recall_bars(inj).show()
inj_table(inj)'''),
        md("""
## DEL benchmark (Chang §3.2, Table 3, Fig. 2)

Each target's top neurons are dropped out; a good method lowers the target's accuracy (ΔSelf-Acc
very negative) while leaving the other memorized sequences alone (ΔNeg-Acc near 0). The confusion
matrix shows ΔAcc of every sequence (columns) for every target's dropout (rows): a strong diagonal
means *specific* localization.
"""),
        code('''from memloc.benchmarks import del_benchmark, del_table

full = np.flatnonzero((mem["split"] == "memorized").to_numpy())   # rows of pool.tokens
X = pool.tokens[full[: 6 if QUICK else 40]]
res = del_benchmark(model, ["activations", "random"], X, prefix_len, n_targets=2 if QUICK else None,
                    ratios=[0.02], progress_bar=False)
plots.del_table_figure(res).show()
plots.del_confusion_heatmap(res.matrices[("activations", 0.02)]).show()
del_table(res)'''),
        md("""
## Hyperparameters of the mask methods (Chang A.7)

SLIMMING and HARD CONCRETE learn a mask with a sparsity penalty λ averaged over all masked neurons,
so a λ that suits a 48-layer model overwhelms a 4-layer one. The paper tunes them per model on 5
dev sequences; `tune_del` does that with the DEL criterion, and the embedded model ships its
selection. In DEL the masks are trained above the bottom layer (`start_layer=1`), which is never
dropped.
"""),
        code('''from memloc.data import tuned_hyperparameters

tuned = tuned_hyperparameters() if MODEL == "tiny" else {}
print(tuned)
kw = {**tuned.get("slimming", {}), "progress_bar": False}
if QUICK:
    kw["max_steps"] = 40
scores = METHODS["slimming"](model, x, prefix_len, start_layer=1, **kw)
with ablate(model, select_top_k(scores, 0.1, exclude_layers=[0])):
    print("accuracy after dropping SLIMMING's top 10% per layer:",
          float(memloc.teacher_forced_accuracy(model, x, prefix_len)[0]))'''),
        md("""
`memloc reproduce` (and `memloc bench inj|del`) run all five methods; see `figures/REPORT.md`
for the full tables on the embedded model.
"""),
    ])


def notebook_03() -> nbformat.NotebookNode:
    return nb([
        md("""
# 3. Parameter gradients, the contrastive objective, sparse unlearning and editing

**Stoehr et al. (2024), §5.** Which weights matter for memorized paragraphs?

* **Parameter gradients (Eq. 1-2, Fig. 4 top, Fig. 9).** The gradient of the continuation NLL with
  respect to every weight, |·| max-pooled per layer × component (W_Q, W_K, W_V, W_O per head;
  W_in, W_out per layer), for a set of MPs and a set of NMPs.
* **Contrastive objective (Eq. 3, Fig. 4 bottom).** CO↓ = −NLL(MP) + KL(NMP; θ ‖ θ₀): increase the
  NLL of a memorized paragraph while keeping the NMPs' predictions. Its gradient isolates what is
  specific to memorization.
* **Sparse fine-tuning (§5.3, Fig. 5).** Optimise CO↓ (unlearning) or CO↔ (Eq. 4, editing an MP into
  its perturbed alternative) on only the 0.1 % of weights with the largest CO gradient, compared
  with a random 0.1 % and with all weights.
"""),
        md("## Parameters"),
        code(PARAMS),
        code(SETUP),
        code(SPLIT),
        md("## Parameter gradients, MP vs NMP (Fig. 4 top)"),
        code('''from memloc.gradients import parameter_gradients_by_group

x = torch.cat([MP, NMP])
groups = ["MP"] * len(MP) + ["NMP"] * len(NMP)
g = parameter_gradients_by_group(model, x, prefix_len, groups, progress_bar=False)
plots.gradient_heatmaps_by_group(g, title="max |grad| per layer x component, MP vs NMP").show()
g.groupby(["group", "layer"])["value"].mean().unstack("layer")'''),
        md("""
NMPs have larger gradients everywhere (the model is less certain about them), so the raw maps are
hard to compare. The contrastive objective removes what MPs and NMPs share.
"""),
        code('''from memloc.contrastive import contrastive_gradients, top_components

c = contrastive_gradients(model, MP, NMP, prefix_len, n_nmp_per_batch=min(8, len(NMP)), progress_bar=False)
plots.gradient_heatmap(c, title="Contrastive (CO↓) gradient attribution").show()
top_components(c, 5)'''),
        md("""
## Sparse unlearning and editing (Fig. 5)

`sparse_finetune` borrows the model: it trains a masked copy of the weights and restores them
afterwards, returning per-step EM / NLL of the MPs and NMPs. Editing needs *perturbed memorized
paragraphs* (PMPs): for every MP the single-token prefix perturbation with the largest EM drop, and
the model's continuation of it (`make_pmps`, Stoehr §4).
"""),
        code('''from memloc.contrastive import sparse_finetune
from memloc.perturb import make_pmps

n_ft, steps = (3, 2) if QUICK else (16, 10)
masks = ["top", "random"] if QUICK else ["top", "random", "all"]
frames = [sparse_finetune(model, MP[:n_ft], NMP, prefix_len, objective="unlearn", mask=m, steps=steps,
                          progress_bar=False) for m in masks]
pmps = make_pmps(model, MP[:n_ft], prefix_len, positions=range(0, prefix_len, 10) if QUICK else None,
                 batch_size=128, progress_bar=False)
if len(pmps):
    frames += [sparse_finetune(model, pmps.original, NMP, prefix_len, objective="edit", mask=m, steps=steps,
                               edit_targets=pmps.perturbed[:, prefix_len:], progress_bar=False) for m in masks]
ft = pd.concat(frames, ignore_index=True)
plots.finetune_trajectories(ft).show()
ft[ft.step == steps].groupby(["objective", "mask", "split"])["em"].mean().unstack("split")'''),
        md("""
**Reading the result.** Unlearning on the top-gradient 0.1 % of weights lowers the MPs' EM with
little change to the NMPs; a random 0.1 % barely moves anything. Editing (making the PMP
continuation the model's new output) is harder than unlearning — as Stoehr et al. report.
"""),
    ])


def notebook_04() -> nbformat.NotebookNode:
    return nb([
        md("""
# 4. The memorization head

**Stoehr et al. (2024), §5.2 and §6.** In GPT-Neo 125M three independent pieces of evidence point
at one attention head, L1H2:

1. its value matrix W_V has the largest **contrastive gradient** (§5.2);
2. its **value-activation gradients** (Eq. 5) are large on distinctive prefix tokens (Fig. 6 top);
3. the first decoded token's **attention** from this head goes to the **rarest tokens** of the
   prefix (Fig. 6 bottom, Fig. 7; rank–attention correlation −0.97).

`memloc.heads.find_memorization_heads` computes all three per head and ranks heads by their mean
rank. Finally, **activation patching** (App. A.3, Fig. 11) swaps activations between an MP and its
perturbed version at the perturbed token.
"""),
        md("## Parameters"),
        code(PARAMS),
        code(SETUP),
        code(SPLIT),
        code('''from memloc.heads import find_memorization_heads

if MODEL == "tiny":
    freq = memloc.unigram_counts("tiny")          # the embedded model's training-corpus unigram counts
else:
    from memloc.heads import unigram_counts_from_tokens
    freq = unigram_counts_from_tokens(ps.tokens, model.cfg.d_vocab)  # a stand-in
heads = find_memorization_heads(model, MP, NMP, prefix_len, frequencies=freq,
                                contrastive_kwargs={"n_nmp_per_batch": min(8, len(NMP))}, progress_bar=False)
best = heads.iloc[0]
LAYER, HEAD = int(best["layer"]), int(best["head"])
print(f"memorization head: L{LAYER}H{HEAD}")
heads.head(5)'''),
        md("""
## Fig. 6: gradients and attention of the head's layer on one MP

Top: value-activation gradients per head and prefix token; bottom: the attention of the first
decoded token (query position 49) onto the prefix.
"""),
        code('''from memloc.gradients import activation_gradients
from memloc.heads import first_token_attention

x = MP[:1]
ag = activation_gradients(model, x, prefix_len, components=["v"], layers=[LAYER], progress_bar=False)
gmat = ag[ag.position < prefix_len].pivot_table(index="head", columns="position", values="value").to_numpy()
att = first_token_attention(model, x, prefix_len, layers=LAYER, progress_bar=False)[0]
labels = plots.token_labels(model, x[0, :prefix_len].tolist())
plots.head_token_heatmaps({"value-activation gradients": gmat, "first-token attention": att}, labels,
                          title=f"Layer {LAYER} (memorization head H{HEAD})").show()'''),
        md("""
## Fig. 7: attention per token-frequency rank

Every prefix token is ranked by its corpus frequency within its paragraph (0 = rarest); the
attention each head puts on each rank is summed and averaged over paragraphs. A negative
correlation between rank and attention means the head looks at rare tokens.
"""),
        code('''from memloc.heads import rare_token_attention, rare_token_correlation

ranks = rare_token_attention(model, torch.cat([MP, NMP]), prefix_len, freq, progress_bar=False)
corr = rare_token_correlation(ranks)
plots.rank_attention(ranks, (LAYER, HEAD), correlations=corr).show()
corr.sort_values("correlation").head()'''),
        md("""
## Fig. 11: activation patching between MPs and their perturbed versions

For each MP we build its PMP (single-token prefix perturbation with the largest EM drop), then
patch activations at the perturbed position from one run into the other and measure the NLL change
at the first token where their continuations diverge.
"""),
        code('''from memloc.patching import activation_patching
from memloc.perturb import make_pmps

n = 2 if QUICK else 16
pmps = make_pmps(model, MP[:n], prefix_len, positions=range(0, prefix_len, 10) if QUICK else None,
                 batch_size=128, progress_bar=False)
if len(pmps):
    patch = activation_patching(model, pmps.original, pmps.perturbed, pmps.position, pmps.first_impacted,
                                prefix_len, components=("resid_pre", "attn_out", "mlp_out", "z"), progress_bar=False)
    plots.patching_heatmap(patch).show()
    print(patch.groupby(["direction", "component"])["value"].mean().unstack("component").round(3))'''),
        md("""
On GPT-Neo 125M the paper finds that patching points to components other than L1H2 (App. A.3):
gradient-based and patching-based localization disagree. Compare the head found above with the
largest patching effects.
"""),
    ])


NOTEBOOKS = {
    "01_memorized_paragraphs_and_metrics.ipynb": notebook_01,
    "02_localization_and_benchmarks.ipynb": notebook_02,
    "03_gradients_unlearning_editing.ipynb": notebook_03,
    "04_memorization_head.ipynb": notebook_04,
}


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, make in NOTEBOOKS.items():
        nbformat.write(make(), OUT / name)
        print("wrote", OUT / name)


if __name__ == "__main__":
    main()
