"""Memorization metrics on token tensors ``[batch, seq]`` split at ``prefix_len``.

Conventions: a paragraph ``x = (p, s)`` has prefix ``p = x[:prefix_len]`` and continuation
(suffix) ``s = x[prefix_len:]`` of ``T = seq - prefix_len`` tokens.  All metrics run batched,
under ``torch.no_grad()``, through the model's forward, so hooks that are active on the model
(e.g. :func:`memloc.ablation.ablate`) apply to them.

* exact match (Stoehr et al. §3.2): greedy tokens equal to the true continuation until the
  first mismatch; EM = T means fully memorized.
* NLL of the true continuation, mean over its tokens (Chang et al. Eq. 6, the memorization loss).
* teacher-forced accuracy (Chang et al. Eq. 4-5).
* character Levenshtein distance between a decoded and the true continuation, either from the
  teacher-forced argmax (Chang et al. Eq. 4) or from greedy decoding (Chang et al. Eq. 18).
* perplexity of a batch of sequences (Chang et al. Rand-PPL).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from rapidfuzz.distance import Levenshtein
from torch import Tensor

from ._checks import check_choice, check_positive_int, check_tokens
from ._progress import progress
from .models import Model

logger = logging.getLogger(__name__)

__all__ = [
    "suffix_nll", "token_nll", "continuation_nll", "teacher_forced_accuracy", "teacher_forced", "greedy_decode", "greedy_continuation",
    "exact_match", "exact_match_teacher_forced", "levenshtein_distance", "perplexity", "memorization", "split_memorization",
    "discover_memorized", "ngram_jaccard",
]


def _batches(n: int, batch_size: int):
    for i in range(0, n, batch_size):
        yield slice(i, min(n, i + batch_size))


def suffix_nll(logits: Float[Tensor, "batch T vocab"], targets: Int[Tensor, "#batch T"], *,
               per_token: bool = False) -> Float[Tensor, "batch"] | Float[Tensor, "batch T"]:
    """The memorization loss (Chang et al. Eq. 6; Stoehr et al. §3.2 ``L_NLL``): NLL of the suffix
    tokens, averaged over the suffix, one value per row.  The one implementation in memloc.

    ``logits`` are those at the suffix positions only (``prefix_len - 1 .. seq - 2`` of a full
    forward: the inputs ``[p, s_<t]`` that predict each ``s_t``), ``targets`` the suffix tokens
    ``tokens[:, prefix_len:]`` (a single row broadcasts over the batch).  Half-precision logits
    are upcast to float32 first.  ``per_token=True`` returns the ``[batch, T]`` token NLLs
    instead of their mean.  Differentiable.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    nll = token_nll(logits, targets.expand(logits.shape[0], -1))
    return nll if per_token else nll.mean(dim=1)


def token_nll(logits: Float[Tensor, "batch T vocab"], targets: Int[Tensor, "batch T"]) -> Float[Tensor, "batch T"]:
    """Per-token NLL ``-log softmax(logits)[target]`` (``F.cross_entropy``), computed on the
    ``[batch * T, vocab]`` rows.

    Why not ``F.cross_entropy(logits.transpose(1, 2), targets)``: torch reduces over a strided class
    dimension there; measured on 2 CPU threads with [64, 127, 4096] float32 logits it took 344 ms
    forward and 814 ms forward + backward against 112 ms and 302 ms on the rows, the same values
    (max difference 2e-6), and it cost more than the unembedding matmul itself in ZERO-OUT's
    re-runs.  Differentiable."""
    b, t, v = logits.shape
    return F.cross_entropy(logits.reshape(b * t, v), targets.reshape(b * t), reduction="none").view(b, t)


@torch.no_grad()
def teacher_forced(model: Model, tokens: Int[Tensor, "batch seq"], prefix_len: int, *, batch_size: int = 64,
                   progress_bar: bool = False) -> dict[str, Tensor]:
    """One teacher-forced forward per batch; returns per-paragraph continuation statistics.

    Returns a dict with ``nll`` Float[batch] (mean continuation NLL, Chang Eq. 6), ``accuracy``
    Float[batch] (Chang Eq. 5), ``argmax`` Int[batch, T] (Chang Eq. 4), ``token_nll``
    Float[batch, T] and ``em`` Int[batch]: the exact match of Stoehr §3.2 read off this one pass
    (see :func:`exact_match_teacher_forced`).
    """
    tokens = check_tokens(model, tokens, prefix_len)
    check_positive_int(batch_size, "batch_size")
    token_nll, argmax = [], []
    for sl in progress(list(_batches(len(tokens), batch_size)), enabled=progress_bar, desc="teacher forcing"):
        x = tokens[sl]
        logits = model(x)[:, prefix_len - 1:-1].float()
        target = x[:, prefix_len:]
        token_nll.append(suffix_nll(logits, target, per_token=True).cpu())
        argmax.append(logits.argmax(-1).cpu())
    token_nll_t, argmax_t = torch.cat(token_nll), torch.cat(argmax)
    target = tokens[:, prefix_len:].cpu()
    return {"nll": token_nll_t.mean(1), "accuracy": (argmax_t == target).float().mean(1),
            "argmax": argmax_t, "token_nll": token_nll_t, "em": em_from_generations(argmax_t, target)}


def continuation_nll(model: Model, tokens: Int[Tensor, "batch seq"], prefix_len: int, *,
                     batch_size: int = 64) -> Float[Tensor, "batch"]:
    """Mean NLL of the true continuation given the prefix (Chang et al. Eq. 6)."""
    return teacher_forced(model, tokens, prefix_len, batch_size=batch_size)["nll"]


def teacher_forced_accuracy(model: Model, tokens: Int[Tensor, "batch seq"], prefix_len: int, *,
                            batch_size: int = 64) -> Float[Tensor, "batch"]:
    """Fraction of continuation tokens equal to the teacher-forced argmax (Chang et al. Eq. 4-5)."""
    return teacher_forced(model, tokens, prefix_len, batch_size=batch_size)["accuracy"]


@torch.no_grad()
def greedy_decode(model: Model, prefix: Int[Tensor, "batch prefix"], n_new: int, *, batch_size: int = 64,
                  use_cache: bool = True, progress_bar: bool = False) -> Int[Tensor, "batch n_new"]:
    """Greedy (argmax) decoding of ``n_new`` tokens after each prefix, batched.

    All prefixes have the same length, so no padding is involved and batched decoding equals
    one-at-a-time decoding.  With ``use_cache`` the model's KV cache (a ``DynamicCache``) is
    used, so each step runs one token through the model; hooks then see one position per step.
    """
    prefix = check_tokens(model, prefix)
    check_positive_int(n_new, "n_new")
    check_positive_int(batch_size, "batch_size")
    if prefix.shape[1] + n_new > model.cfg.n_ctx:
        raise ValueError(f"prefix length {prefix.shape[1]} + n_new {n_new} exceeds the context n_ctx={model.cfg.n_ctx}")
    out = []
    for sl in progress(list(_batches(len(prefix), batch_size)), enabled=progress_bar, desc="greedy decoding"):
        out.append(_greedy_batch(model, prefix[sl], n_new, use_cache).cpu())
    return torch.cat(out)


def _greedy_batch(model: Model, prefix: Tensor, n_new: int, use_cache: bool) -> Tensor:
    if not use_cache:
        seq = prefix
        for _ in range(n_new):
            nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
        return seq[:, prefix.shape[1]:]
    from transformers import DynamicCache

    cache = DynamicCache()
    logits = model(prefix, past_key_values=cache, use_cache=True)
    if cache.get_seq_length() != prefix.shape[1]:
        logger.warning("greedy_decode: the model did not fill the KV cache (%d of %d prefix positions cached; a "
                       "bridge not built by memloc.load_model?); decoding without the cache, one full forward "
                       "per new token (~%d x the tokens processed)", cache.get_seq_length(), prefix.shape[1],
                       max(1, (prefix.shape[1] + n_new) // 2))
        return _greedy_batch(model, prefix, n_new, use_cache=False)
    new = [logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(n_new - 1):
        logits = model(new[-1], past_key_values=cache, use_cache=True)
        new.append(logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(new, dim=1)


def greedy_continuation(model: Model, tokens: Int[Tensor, "batch seq"], prefix_len: int, *, batch_size: int = 64,
                        use_cache: bool = True, progress_bar: bool = False) -> Int[Tensor, "batch T"]:
    """Greedy continuation of ``tokens[:, :prefix_len]`` with as many tokens as the true continuation."""
    tokens = check_tokens(model, tokens, prefix_len)
    return greedy_decode(model, tokens[:, :prefix_len], tokens.shape[1] - prefix_len, batch_size=batch_size,
                         use_cache=use_cache, progress_bar=progress_bar)


def em_from_generations(generated: Int[Tensor, "batch T"], target: Int[Tensor, "batch T"]) -> Int[Tensor, "batch"]:
    """Number of leading generated tokens equal to the target (until the first mismatch)."""
    match = (generated.cpu() == target.cpu()).long()
    return match.cumprod(dim=1).sum(dim=1)


def exact_match(model: Model, tokens: Int[Tensor, "batch seq"], prefix_len: int, *, batch_size: int = 64,
                use_cache: bool = True) -> Int[Tensor, "batch"]:
    """Exact match EM (Stoehr et al. §3.2): greedy tokens equal to the true continuation until the first mismatch."""
    tokens = check_tokens(model, tokens, prefix_len)
    gen = greedy_continuation(model, tokens, prefix_len, batch_size=batch_size, use_cache=use_cache)
    return em_from_generations(gen, tokens[:, prefix_len:])


def exact_match_teacher_forced(model: Model, tokens: Int[Tensor, "batch seq"], prefix_len: int, *,
                               batch_size: int = 64) -> Int[Tensor, "batch"]:
    """Exact match EM (Stoehr et al. §3.2) from one teacher-forced forward instead of T greedy steps.

    Equal to :func:`exact_match`: greedy decoding reproduces the continuation ``s`` up to its
    first mismatch, and while it does, its context at step t is exactly the teacher-forced
    context ``(p, s_<t)``, so its token at t is the teacher-forced argmax at t.  Hence the number
    of leading greedy tokens equal to ``s`` is the number of leading positions where the
    teacher-forced argmax equals ``s``.  The same holds for any continuation ``s`` (e.g. a
    model's own earlier greedy continuation, or an edit target): pass ``(p, s)`` as ``tokens``.
    (The two can only differ where two logits tie to within float rounding, since the KV-cache
    path and the full forward round differently; tests/test_metrics.py checks equality on the
    embedded model.)
    """
    return teacher_forced(model, tokens, prefix_len, batch_size=batch_size)["em"]


def _decode(model: Model, ids: Tensor, tokenizer: Any = None) -> list[str]:
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("character Levenshtein distance needs a tokenizer: the model has none, pass tokenizer=")
    return [tok.decode(row.tolist()) for row in ids]


def char_distances(model: Model, predicted: Int[Tensor, "batch T"], target: Int[Tensor, "batch T"],
                   tokenizer: Any = None) -> Int[Tensor, "batch"]:
    """Character Levenshtein distance between decoded ``predicted`` and ``target`` rows (rapidfuzz)."""
    pred_s, true_s = _decode(model, predicted, tokenizer), _decode(model, target, tokenizer)
    return torch.tensor([Levenshtein.distance(a, b) for a, b in zip(pred_s, true_s)], dtype=torch.long)


def levenshtein_distance(model: Model, tokens: Int[Tensor, "batch seq"], prefix_len: int, *,
                         decoding: Literal["teacher_forced", "greedy"] = "teacher_forced",
                         batch_size: int = 64, tokenizer: Any = None) -> Int[Tensor, "batch"]:
    """Character Levenshtein distance of the decoded to the true continuation.

    ``decoding="teacher_forced"`` uses the teacher-forced argmax (Chang et al. Eq. 4, the DEL
    benchmark's Dist); ``"greedy"`` uses free-running greedy decoding (Chang et al. Eq. 18, the
    data-collection filter).
    """
    check_choice(decoding, "decoding", ("teacher_forced", "greedy"))
    tokens = check_tokens(model, tokens, prefix_len)
    if decoding == "teacher_forced":
        pred = teacher_forced(model, tokens, prefix_len, batch_size=batch_size)["argmax"]
    else:
        pred = greedy_continuation(model, tokens, prefix_len, batch_size=batch_size)
    return char_distances(model, pred, tokens[:, prefix_len:], tokenizer)


@torch.no_grad()
def perplexity(model: Model, tokens: Int[Tensor, "batch seq"], *, batch_size: int = 32) -> float:
    """Perplexity exp(mean next-token NLL) over all positions of all sequences (Chang et al. Rand-PPL)."""
    tokens = check_tokens(model, tokens)
    if tokens.shape[1] < 2:
        raise ValueError("perplexity needs sequences of at least 2 tokens")
    check_positive_int(batch_size, "batch_size")
    total, count = 0.0, 0
    for sl in _batches(len(tokens), batch_size):
        x = tokens[sl]
        logits = model(x)[:, :-1].float()
        total += token_nll(logits, x[:, 1:]).sum().item()
        count += x[:, 1:].numel()
    return math.exp(total / count)


def memorization(model: Model, tokens: Int[Tensor, "batch seq"], prefix_len: int, *,
                 counts: Sequence[int] | np.ndarray | Tensor | None = None, batch_size: int = 64, levenshtein: bool = True,
                 progress_bar: bool = True) -> pd.DataFrame:
    """Per-paragraph memorization metrics as a tidy DataFrame.

    Columns: ``id`` (row index), ``em`` (Stoehr §3.2), ``nll`` (Chang Eq. 6), ``accuracy``
    (Chang Eq. 5), ``lev_tf`` (Chang Eq. 4 Levenshtein) and ``lev_greedy`` (Chang Eq. 18;
    both only with ``levenshtein=True`` and a tokenizer), ``n_distinct_suffix`` and, if given,
    ``count`` (training-set duplication count).
    """
    tokens = check_tokens(model, tokens, prefix_len)
    if counts is not None and len(counts) != len(tokens):
        raise ValueError(f"counts has {len(counts)} entries for {len(tokens)} paragraphs")
    tf = teacher_forced(model, tokens, prefix_len, batch_size=batch_size, progress_bar=progress_bar)
    target = tokens[:, prefix_len:].cpu()
    # EM comes from the teacher-forced pass (exact_match_teacher_forced); the greedy continuation is
    # only needed for lev_greedy, and it equals the true continuation where the teacher-forced argmax
    # matches every token (EM = T), so only the other rows are decoded.
    gen = target.clone()
    todo = torch.nonzero(tf["em"] < target.shape[1]).flatten()
    if len(todo) and levenshtein and getattr(model, "tokenizer", None) is not None:
        gen[todo] = greedy_continuation(model, tokens[todo.to(tokens.device)], prefix_len, batch_size=batch_size,
                                        progress_bar=progress_bar)
    df = pd.DataFrame({
        "id": np.arange(len(tokens)),
        "em": tf["em"].numpy(),
        "nll": tf["nll"].numpy(),
        "accuracy": tf["accuracy"].numpy(),
        "n_distinct_suffix": [len(set(r.tolist())) for r in target],
    })
    if levenshtein and getattr(model, "tokenizer", None) is not None:
        df["lev_tf"] = char_distances(model, tf["argmax"], target).numpy()
        df["lev_greedy"] = char_distances(model, gen, target).numpy()
    if counts is not None:
        df["count"] = counts.cpu().numpy() if isinstance(counts, Tensor) else np.array(counts)
    return df


def split_memorization(df: pd.DataFrame, *, memorized_min_em: int = 50, non_memorized_max_em: int = 10) -> pd.Series:
    """Label each row ``"memorized"`` (EM >= memorized_min_em, the paper's MP: EM = 50),
    ``"non-memorized"`` (EM <= non_memorized_max_em, the paper's NMP) or ``"partial"``."""
    if not isinstance(df, pd.DataFrame) or "em" not in df.columns:
        what = (f"a DataFrame with columns {list(df.columns)}" if isinstance(df, pd.DataFrame)
                else f"a {type(df).__name__}")
        raise ValueError(f"df must be the DataFrame of memloc.memorization (an integer 'em' column, one row per "
                         f"paragraph), got {what}")
    if not pd.api.types.is_numeric_dtype(df["em"]) or pd.api.types.is_bool_dtype(df["em"]):
        raise ValueError(f"df['em'] must hold exact-match counts (numbers), got dtype {df['em'].dtype}")
    for name, value in (("memorized_min_em", memorized_min_em), ("non_memorized_max_em", non_memorized_max_em)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if not 0 <= non_memorized_max_em < memorized_min_em:
        raise ValueError(f"need 0 <= non_memorized_max_em < memorized_min_em, got {non_memorized_max_em}, "
                         f"{memorized_min_em}")
    labels = np.where(df["em"] >= memorized_min_em, "memorized",
                      np.where(df["em"] <= non_memorized_max_em, "non-memorized", "partial"))
    return pd.Series(labels, index=df.index, name="split")


def _ngrams(ids: Sequence[int], n: int) -> set:
    return {tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)}


def ngram_jaccard(a: Sequence[int], b: Sequence[int], n: int = 5) -> float:
    """Jaccard index of the token n-gram sets of two sequences (Chang et al. §3.2 de-duplication)."""
    ga, gb = _ngrams(list(a), n), _ngrams(list(b), n)
    if not ga and not gb:
        return 1.0
    return len(ga & gb) / len(ga | gb)


def discover_memorized(model: Model, tokens: Int[Tensor, "batch seq"], prefix_len: int, *, min_accuracy: float = 0.9,
                       max_levenshtein: int = 20, min_distinct_suffix: int = 16, ngram: int = 5,
                       max_jaccard: float = 0.5, batch_size: int = 64, progress_bar: bool = True) -> pd.DataFrame:
    """Chang et al. §3.2 memorized-sequence discovery filters.

    Keeps candidates with teacher-forced accuracy >= ``min_accuracy`` (Eq. 5), greedy Levenshtein
    distance <= ``max_levenshtein`` characters (Eq. 18), and >= ``min_distinct_suffix`` distinct
    suffix tokens; then de-duplicates by ``ngram``-gram Jaccard index: of each group of
    near-duplicates (Jaccard > ``max_jaccard`` over the whole sequence) only the best memorized
    (highest accuracy, then lowest distance) is kept.  Returns the metrics DataFrame of the kept
    rows with a ``kept`` reason trail in ``filter``.
    """
    tokens = check_tokens(model, tokens, prefix_len)
    df = memorization(model, tokens, prefix_len, batch_size=batch_size, progress_bar=progress_bar)
    if "lev_greedy" not in df:
        raise ValueError("discover_memorized needs a tokenizer on the model for the Levenshtein filter")
    ok = (df["accuracy"] >= min_accuracy) & (df["lev_greedy"] <= max_levenshtein) & (
        df["n_distinct_suffix"] >= min_distinct_suffix)
    cand = df[ok].sort_values(["accuracy", "lev_greedy", "id"], ascending=[False, True, True])
    kept: list[int] = []
    grams = {i: _ngrams(tokens[i].tolist(), ngram) for i in cand["id"]}
    for i in cand["id"]:
        dup = False
        for j in kept:
            union = len(grams[i] | grams[j])
            if union and len(grams[i] & grams[j]) / union > max_jaccard:
                dup = True
                break
        if not dup:
            kept.append(int(i))
    return df.set_index("id").loc[sorted(kept)].reset_index()
