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
from typing import Any

import pandas as pd
import torch
from jaxtyping import Int
from safetensors.torch import load_file
from torch import Tensor

from ._checks import check_choice

__all__ = ["ParagraphSet", "load_paragraphs", "load_ecbd", "tokenize_texts", "unigram_counts", "retokenized_paragraphs",
           "random_sequences", "tuned_hyperparameters", "tuning_dev_ids",
           "PARAGRAPH_SETS"]

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
        idx = torch.as_tensor(pd.Series(mask_or_ids).to_numpy() if isinstance(mask_or_ids, pd.Series) else mask_or_ids)
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
    the embedded model; other models: run ``tune_del`` on a dev set of their own."""
    path, data = _tuning_record(name)
    methods = data.get("methods")
    if not isinstance(methods, dict) or not all(isinstance(v, dict) for v in methods.values()):
        raise ValueError(f"{path} has no 'methods' table {{method: {{kwarg: value}}}}")
    return {m: dict(kw) for m, kw in methods.items()}


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


def tokenize_texts(model: Any, texts: list[str], *, max_len: int | None = None, min_len: int = 2) -> list[Tensor]:
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


def retokenized_paragraphs(model: Any, name: str = "gpt-neo-125m", *, prefix_len: int = 50,
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
