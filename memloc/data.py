"""Paragraph sets and data sets that ship with memloc (all offline).

* ``"tiny"``: the embedded model's paragraphs: 100-token windows (50 prefix + 50 continuation)
  with their duplication count in the training stream (0 = never seen), the EM/NLL measured on
  the shipped model, and the training stream's unigram counts (for the rare-token analysis).
* ``"gpt-neo-125m"`` (and the EM-bin variants): GPT-Neo 125M's memorized Pile paragraphs as
  GPT-2 token ids, from Stoehr et al. (googleinterns/localizing-paragraph-memorization,
  Apache-2.0, see NOTICE).
* ECBD-2021 definitions (Onoe et al. 2022, via terarachang/MemPi, Apache-2.0): the INJ
  benchmark's injected sequences.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from safetensors.torch import load_file
from torch import Tensor

from ._checks import check_choice
from .models import Model

__all__ = ["ParagraphSet", "load_paragraphs", "load_ecbd", "tokenize_texts", "unigram_counts", "retokenized_paragraphs",
           "random_sequences", "tuned_hyperparameters", "tuning_dev_ids",
           "PARAGRAPH_SETS", "BundledProfile", "PROFILES", "bundled_profile", "default_paragraphs", "select_groups",
           "subset_evenly", "concat_paragraph_sets"]

_ASSETS = Path(str(resources.files("memloc") / "assets"))
PARAGRAPH_SETS = ("tiny", "gpt-neo-125m", "gpt-neo-125m-em30-49", "gpt-neo-125m-em11-29",
                  "gpt-neo-125m-perturbed")


@dataclass(frozen=True)
class ParagraphSet:
    """A set of token paragraphs, split into prefix and continuation at ``prefix_len``.

    Attributes:
        name: the set's name.
        tokens: Int[Tensor, "n seq"] token ids.
        prefix_len: number of prefix tokens (50 in Stoehr et al.).
        table: one row per paragraph: ``id`` and whatever the source records (``count``,
            ``seen``, reference ``em``/``nll``, ...).
        perturbed: for ``gpt-neo-125m-perturbed``, the perturbed paragraphs (PMPs) aligned
            with ``tokens``.
        tokenizer: which tokenizer the ids belong to.
    """

    name: str
    tokens: Int[Tensor, "n seq"]
    prefix_len: int
    table: pd.DataFrame
    tokenizer: str
    perturbed: Tensor | None = None
    notes: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tokens)

    def subset(self, mask_or_ids: Any) -> "ParagraphSet":
        """The paragraphs selected by a boolean mask or index list (table rows follow)."""
        # np.array copies: pandas (copy-on-write) hands out read-only arrays, which torch warns about
        idx = mask_or_ids if isinstance(mask_or_ids, torch.Tensor) else torch.as_tensor(np.array(mask_or_ids))
        if idx.dtype == torch.bool:
            if len(idx) != len(self):
                raise ValueError(f"mask has {len(idx)} entries for {len(self)} paragraphs")
            idx = idx.nonzero().flatten()
        idx = idx.long()
        return ParagraphSet(self.name, self.tokens[idx], self.prefix_len, self.table.iloc[idx.numpy()].reset_index(drop=True),
                            self.tokenizer, None if self.perturbed is None else self.perturbed[idx], dict(self.notes))


def _validate(tokens: Tensor, name: str, seq: int | None = None) -> Tensor:
    if tokens.ndim != 2:
        raise ValueError(f"paragraph set {name!r}: tokens must be 2-D [n, seq], got {tuple(tokens.shape)}")
    if seq is not None and tokens.shape[1] != seq:
        raise ValueError(f"paragraph set {name!r}: expected {seq} tokens per paragraph, got {tokens.shape[1]}")
    if tokens.dtype != torch.long:
        raise ValueError(f"paragraph set {name!r}: expected int64 ids, got {tokens.dtype}")
    if len(tokens) and int(tokens.min()) < 0:
        raise ValueError(f"paragraph set {name!r}: negative token ids")
    return tokens


@lru_cache(maxsize=None)
def _tiny_files() -> dict[str, Tensor]:
    path = _ASSETS / "tiny" / "paragraphs.safetensors"
    if not path.exists():
        raise ValueError(f"the embedded paragraph set is missing ({path}); reinstall memloc")
    return load_file(str(path))


def load_paragraphs(name: str = "tiny") -> ParagraphSet:
    """Load a bundled paragraph set; ``name`` is one of :data:`PARAGRAPH_SETS`."""
    check_choice(name, "name", PARAGRAPH_SETS)
    if name == "tiny":
        files = _tiny_files()
        tokens = _validate(files["tokens"].long(), name, 100)
        table = pd.read_csv(_ASSETS / "tiny" / "paragraphs.csv")
        if len(table) != len(tokens):
            raise ValueError(f"paragraph set 'tiny': table has {len(table)} rows for {len(tokens)} paragraphs")
        table = table.rename(columns={"em": "em_ref", "nll": "nll_ref"})
        table["seen"] = table["seen"].astype(bool)
        return ParagraphSet(name, tokens, 50, table, "tiny")
    files = load_file(str(_ASSETS / "data" / "gpt_neo_125m_paragraphs.safetensors"))
    key = {"gpt-neo-125m": "em50", "gpt-neo-125m-em30-49": "em30_49", "gpt-neo-125m-em11-29": "em11_29",
           "gpt-neo-125m-perturbed": "perturb_memorized"}[name]
    tokens = _validate(files[key].long(), name, 100)
    table = pd.DataFrame({"id": range(len(tokens))})
    if name == "gpt-neo-125m":
        ref = pd.read_csv(_ASSETS / "data" / "gpt_neo_125m_memorized_paragraphs.csv")
        if len(ref) == len(tokens):
            table = table.join(ref[["count", "em", "nll"]].rename(columns={"em": "em_ref", "nll": "nll_ref"}))
            table["text"] = ref["paragraph"]
    perturbed = _validate(files["perturb_perturbed"].long(), name, 100) if key == "perturb_memorized" else None
    return ParagraphSet(name, tokens, 50, table, "gpt2", perturbed)


def unigram_counts(name: str = "tiny") -> Int[Tensor, "vocab"]:
    """Unigram token counts of the embedded model's training stream (for rare-token ranks, Stoehr §6.3)."""
    check_choice(name, "name", ("tiny",))
    return _tiny_files()["unigram_counts"].long()


def random_sequences(name: str = "tiny") -> Int[Tensor, "n seq"]:
    """Held-out validation text of the embedded model, as [n, 100] token blocks (DEL Rand-PPL)."""
    check_choice(name, "name", ("tiny",))
    files = _tiny_files()
    if "random_sequences" not in files:
        raise ValueError("this build of the embedded model has no random_sequences")
    return _validate(files["random_sequences"].long(), name)


def _tuning_record(name: str) -> tuple[Path, dict]:
    check_choice(name, "name", ("tiny",))
    path = _ASSETS / name / "hyperparameters.json"
    return path, json.loads(path.read_text())


def tuned_hyperparameters(name: str = "tiny") -> dict[str, dict]:
    """The embedded model's dev-set-selected localization hyperparameters (Chang et al. A.7),
    ``{method: {kwarg: value}}``, written by ``scripts/tune_tiny.py`` with
    :func:`memloc.benchmarks.tune_del`.  ``memloc reproduce`` and ``memloc bench`` use them on
    the embedded model; other models: run ``tune_del`` on a dev set of their own.

    A stored ``lam`` without a ``lam_scale`` is in the authors' parameterization (λ on the
    sparsity term *averaged* over the masked neurons: the record predates the per-neuron default),
    so the returned dict adds ``lam_scale="mean"`` to it: e.g. HARD CONCRETE's ``lam=30`` is 30 on
    the mean over the 3,072 masked neurons, i.e. 30 / 3,072 = 9.8e-3 per neuron.  The selection ran
    under the authors' stop criterion (sparsity alone), so it also gets ``stop_mem_margin=None`` and
    ``stop_mask_mean=None``.
    Passing the dict to the method therefore reproduces the selection exactly."""
    path, data = _tuning_record(name)
    methods = data.get("methods")
    if not isinstance(methods, dict) or not all(isinstance(v, dict) for v in methods.values()):
        raise ValueError(f"{path} has no 'methods' table {{method: {{kwarg: value}}}}")
    scale = data.get("lam_scale", "mean")
    # the selection ran under the authors' stop criterion (sparsity alone): keep it
    stop = data.get("stop_mem_margin", None)
    return {m: {**kw, "lam_scale": kw.get("lam_scale", scale), "stop_mem_margin": kw.get("stop_mem_margin", stop),
                "stop_mask_mean": kw.get("stop_mask_mean", None)}
            if "lam" in kw else dict(kw) for m, kw in methods.items()}


def tuning_dev_ids(name: str = "tiny") -> list[int]:
    """Paragraph ids (``load_paragraphs(name).table["id"]``) of the dev set on which
    :func:`tuned_hyperparameters` were selected; evaluations leave them out (Chang et al. A.7)."""
    path, data = _tuning_record(name)
    ids = data.get("dev_ids")
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise ValueError(f"{path} has no 'dev_ids' list of paragraph ids")
    return list(ids)


def load_ecbd(which: str = "2021") -> list[str]:
    """ECBD-2021 definition sentences (Onoe et al. 2022), the INJ benchmark's new sequences."""
    check_choice(which, "which", ("2021",))
    path = _ASSETS / "data" / "ecbd_2021_definitions.jsonl"
    out = []
    with open(path) as f:
        for i, line in enumerate(f):
            row = json.loads(line)
            if "definition" not in row or not isinstance(row["definition"], str):
                raise ValueError(f"{path.name} line {i + 1}: expected a 'definition' string")
            out.append(row["definition"])
    return out


def tokenize_texts(model: Model, texts: list[str], *, max_len: int | None = None, min_len: int = 2) -> list[Tensor]:
    """Tokenize texts with the model's tokenizer (no BOS), each truncated to ``max_len`` tokens
    (default: the model's context).  Returns a list of 1-D int64 tensors (lengths differ)."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("the model has no tokenizer; tokenize the texts yourself")
    if not texts:
        raise ValueError("texts is empty")
    max_len = int(max_len or model.cfg.n_ctx)
    out = []
    for i, t in enumerate(texts):
        ids = tok(t, add_special_tokens=False)["input_ids"][:max_len]
        if len(ids) < min_len:
            raise ValueError(f"texts[{i}] has {len(ids)} tokens; at least {min_len} are needed")
        out.append(torch.tensor(ids, dtype=torch.long))
    return out


# ------------------------------------------------------------------------------------ bundled profiles

@dataclass(frozen=True)
class BundledProfile:
    """What memloc ships for one model family: the one answer to "which bundled data fit this model".

    Attributes:
        name: ``"tiny"`` (the embedded model) or ``"gpt-neo-125m"`` (GPT-2's vocabulary).
        vocab_sizes: the vocabulary sizes that select it.
        paragraph_sets: the bundled paragraph sets (:data:`PARAGRAPH_SETS`) of its pool, in order.
        non_memorized_max_em: the NMP threshold on that pool (Stoehr et al.: EM <= 10).
        note: one line for reports saying what the pool is.
        tuned: whether dev-set-selected hyperparameters ship (:func:`tuned_hyperparameters`).
        corpus_counts: whether the training corpus's unigram counts ship (:func:`unigram_counts`).
        random_text: whether held-out text ships (:func:`random_sequences`, DEL's Rand-PPL).
    """

    name: str
    vocab_sizes: tuple[int, ...]
    paragraph_sets: tuple[str, ...]
    non_memorized_max_em: int
    note: str
    tuned: bool = False
    corpus_counts: bool = False
    random_text: bool = False


#: Every bundled profile by name.
PROFILES = {
    "tiny": BundledProfile("tiny", (4096,), ("tiny",), 10,
                           "embedded paragraph set (600 paragraphs; NMP: EM <= 10)",
                           tuned=True, corpus_counts=True, random_text=True),
    "gpt-neo-125m": BundledProfile(
        "gpt-neo-125m", (50257, 50304), ("gpt-neo-125m", "gpt-neo-125m-em30-49", "gpt-neo-125m-em11-29"), 29,
        "GPT-Neo-125M paragraph sets of Stoehr et al. (EM 50, 30-49, 11-29 as measured on the original model); "
        "no EM <= 10 set is bundled, so NMP = measured EM <= 29"),
}


def bundled_profile(model: Model, *, required: str | None = None) -> BundledProfile | None:
    """The bundled profile whose token ids ``model`` reads, chosen by its vocabulary size
    (``model.cfg.d_vocab``): 4096 is the embedded model, 50257/50304 GPT-2's vocabulary (GPT-Neo
    125M).  None for any other vocabulary: no bundled paragraphs or tuned settings fit it.

    Every place that picks the embedded model's tuned settings, paragraph set, corpus counts or
    held-out text asks this function (``memloc reproduce``, :func:`memloc.benchmarks.del_benchmark`).

    Args:
        required: if given, raise ValueError instead of returning None, ending with this hint
            (e.g. ``"pass --paragraphs"``).
    """
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(cfg, "d_vocab"):
        raise ValueError(f"model must be a TransformerLens model with cfg.d_vocab, got {type(model).__name__}")
    vocab = int(cfg.d_vocab)
    profile = next((p for p in PROFILES.values() if vocab in p.vocab_sizes), None)
    if profile is None and required is not None:
        raise ValueError(f"no bundled paragraph set matches a vocabulary of {vocab} tokens (the embedded model has "
                         f"4096, GPT-2/GPT-Neo 50257); {required}")
    return profile


def concat_paragraph_sets(names: Sequence[str]) -> ParagraphSet:
    """Bundled sets concatenated: a ``set`` column names each row's source set, ``set_id`` its id
    there, and ``id`` runs 0..n-1."""
    sets = [load_paragraphs(n) for n in names]
    if len(sets) == 1:
        return sets[0]
    tables = []
    for ps in sets:
        t = ps.table.copy()
        t.insert(0, "set", ps.name)
        tables.append(t)
    table = pd.concat(tables, ignore_index=True)
    table["set_id"] = table["id"]
    table["id"] = np.arange(len(table))
    return ParagraphSet("+".join(names), torch.cat([ps.tokens for ps in sets]), sets[0].prefix_len, table,
                        sets[0].tokenizer)


def default_paragraphs(model: Model) -> tuple[ParagraphSet, int, str]:
    """The bundled paragraphs for ``model`` (:func:`bundled_profile`).

    Returns ``(paragraphs, non_memorized_max_em, note)``: the embedded model's set (vocabulary
    4096; NMP = EM <= 10) or, for GPT-2-vocabulary models such as GPT-Neo 125M (50257), the
    three GPT-Neo sets EM = 50, 30-49 and 11-29 concatenated (NMP = measured EM <= 29, as no
    EM <= 10 set is bundled).

    Raises:
        ValueError: for other vocabularies when the model has no tokenizer (otherwise the GPT-Neo
            paragraphs' texts re-encoded with it, :func:`retokenized_paragraphs`; NMP = EM <= 10), pass
            ``paragraphs=`` to :func:`memloc.reproduce.reproduce`.
    """
    profile = bundled_profile(model)
    if profile is None and can_retokenize(model):
        ps = retokenized_paragraphs(model)
        return ps, 10, (f"no bundled token set matches a vocabulary of {int(model.cfg.d_vocab)}: the "
                        f"{ps.notes['n_kept']} of {ps.notes['n_source']} GPT-Neo-125M memorized Pile paragraphs "
                        "(Stoehr et al.) at least 100 tokens long under this model's tokenizer, re-encoded with it; "
                        "NMP: EM <= 10")
    profile = bundled_profile(model, required="and the model has no tokenizer to re-encode paragraph texts; pass "
                                              "paragraphs= (a memloc.data.ParagraphSet)")
    return concat_paragraph_sets(profile.paragraph_sets), profile.non_memorized_max_em, profile.note


def subset_evenly(n: int, k: int | None) -> np.ndarray:
    """Indices of ``k`` evenly spaced items of ``n`` (all of them if ``k`` is None or >= n)."""
    if k is None or k >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(int))


def select_groups(df: pd.DataFrame, n_mp: int, n_nmp: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of up to ``n_mp`` memorized and ``n_nmp`` non-memorized paragraphs of a
    memorization table with a ``split`` column (evenly spaced over each group, deterministic)."""
    if not isinstance(df, pd.DataFrame) or "split" not in df:
        raise ValueError("df must be a DataFrame with a 'split' column (memloc.split_memorization)")
    mp = np.flatnonzero((df["split"] == "memorized").to_numpy())
    nmp = np.flatnonzero((df["split"] == "non-memorized").to_numpy())
    return mp[subset_evenly(len(mp), n_mp)], nmp[subset_evenly(len(nmp), n_nmp)]


def can_retokenize(model: Model) -> bool:
    """Whether ``model`` has a tokenizer whose ids fit its vocabulary (so that bundled paragraph
    texts can be re-encoded for it with :func:`retokenized_paragraphs`)."""
    tok = getattr(model, "tokenizer", None)
    return tok is not None and len(tok) <= int(model.cfg.d_vocab)


def retokenized_paragraphs(model: Model, name: str = "gpt-neo-125m", *, prefix_len: int = 50,
                           seq_len: int = 100) -> ParagraphSet:
    """A bundled paragraph set re-encoded with ``model``'s own tokenizer, for models whose
    vocabulary no bundled token set matches (e.g. SmolLM2's 49,152 tokens).

    Only ``"gpt-neo-125m"`` carries its text (the 442 Pile paragraphs GPT-Neo 125M reproduces
    verbatim, Stoehr et al.; heavily duplicated web text: licences, code, boilerplate, so the
    likeliest memorization candidates for another web-trained model).  Each text is tokenized
    without special tokens; texts shorter than ``seq_len`` tokens are dropped, the others cut to
    their first ``seq_len`` tokens.  The table keeps the source ``id``, GPT-Neo's ``count`` and
    its measured ``em_ref``/``nll_ref`` (those refer to GPT-Neo, not to ``model``).

    Raises:
        ValueError: no tokenizer on the model, bad lengths, or no text long enough.
    """
    check_choice(name, "name", ("gpt-neo-125m",))
    for v, n in ((prefix_len, "prefix_len"), (seq_len, "seq_len")):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{n} must be a positive int, got {v!r}")
    if prefix_len >= seq_len:
        raise ValueError(f"prefix_len must be < seq_len ({seq_len}), got {prefix_len}")
    if getattr(model, "tokenizer", None) is None:
        raise ValueError("the model has no tokenizer; re-encoding the paragraph texts needs one")
    source = load_paragraphs(name)
    texts = source.table["text"].tolist()
    toks = tokenize_texts(model, texts, max_len=seq_len, min_len=1)
    keep = [i for i, t in enumerate(toks) if len(t) == seq_len]
    if not keep:
        raise ValueError(f"no paragraph of {name!r} has {seq_len} tokens under this model's tokenizer")
    tokens = torch.stack([toks[i] for i in keep])
    table = source.table.iloc[keep].reset_index(drop=True)
    tok_name = str(getattr(model.tokenizer, "name_or_path", "") or type(model.tokenizer).__name__)
    return ParagraphSet(f"{name}-retokenized", tokens, prefix_len, table, tok_name,
                        notes={"source": name, "n_source": len(texts), "n_kept": len(keep),
                               "dropped_short": len(texts) - len(keep)})
