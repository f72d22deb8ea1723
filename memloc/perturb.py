"""Prefix-token perturbation (Stoehr et al. §4, Fig. 3, Tab. 2, App. A.2).

Every prefix token of a paragraph ``x = (p, s)`` is replaced, one position at a time, by a random
vocabulary token; the model then greedily decodes ``T = seq - prefix_len`` tokens from the
perturbed prefix.  Per (paragraph, position, sample) we record

* ``em``: exact match of the new greedy continuation with the true continuation ``s``
  (Stoehr §3.2), ``em_drop = em_clean - em`` (Fig. 3 top);
* ``em_drop_generation = T - first_impacted``: the EM drop measured against the model's own
  *unperturbed* greedy continuation (whose EM with itself is ``T``).  For memorized paragraphs
  (clean greedy continuation = true continuation) both drops are equal; for non-memorized
  paragraphs, whose EM against the truth is already near 0, only this one can show how easily
  the continuation "slips off" (Stoehr §4, Fig. 3 bottom: NMPs are perturbed more easily);
* ``nll``: teacher-forced mean NLL of the true continuation given the perturbed prefix
  (Stoehr §3.2), ``nll_change = nll - nll_clean`` (Fig. 3 top);
* ``first_impacted``: the first continuation index at which the new greedy continuation differs
  from the *unperturbed* greedy continuation (the "impact token" of App. A.2; ``T`` if unchanged).

The paper draws one random token per position (§4); ``n_samples`` > 1 draws several, and the
aggregate reports their mean and max EM drop.  Replacement tokens are drawn uniformly from the
vocabulary *without* the original token (a perturbation always changes the prefix), from a
``torch.Generator`` seeded with ``seed`` (never the global RNG).

The perturbed memorized paragraphs (PMPs, §4 and A.2) come from :func:`make_pmps`: for every
memorized paragraph the single perturbation with the largest EM drop (ties: larger NLL change,
then earlier position, then lower sample index), its prefix and the model's new greedy
continuation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from ._checks import check_positive_int, check_seed, check_tokens
from ._progress import progress
from .borrow import borrowed
from .metrics import em_from_generations, greedy_decode, teacher_forced
from .models import Model

logger = logging.getLogger(__name__)

__all__ = ["PerturbationResult", "PMPSet", "random_replacements", "replacement_vocab_size", "perturbation_profile",
           "em_drop_by_position", "make_pmps"]


@dataclass(frozen=True)
class PerturbationResult:
    """Output of :func:`perturbation_profile`.

    Attributes:
        samples: one row per (paragraph, position, sample): ``paragraph, position, sample,
            original_token, token, em_clean, em, em_drop, em_drop_generation, nll_clean, nll,
            nll_change, first_impacted, changed``.
        profile: one row per (paragraph, position): ``paragraph, position, original_token,
            em_clean, em_drop_mean, em_drop_max, em_drop_generation_mean,
            em_drop_generation_max, nll_change_mean, nll_change_max, frac_changed``.
        clean: one row per paragraph: ``paragraph, em_clean, nll_clean``.
        clean_generation: Int[Tensor, "n T"] greedy continuation of the unperturbed prefixes.
        generations: Int[Tensor, "n position sample T"] greedy continuation of every perturbed prefix.
        replacements: Int[Tensor, "n position sample"] the token put at each position.
        positions: the perturbed prefix positions (index of the ``position`` axis).
        prefix_len: prefix length.
    """

    samples: pd.DataFrame
    profile: pd.DataFrame
    clean: pd.DataFrame
    clean_generation: Int[Tensor, "n T"]
    generations: Int[Tensor, "n position sample T"]
    replacements: Int[Tensor, "n position sample"]
    positions: list[int]
    prefix_len: int


@dataclass(frozen=True)
class PMPSet:
    """Perturbed memorized paragraphs (Stoehr §4, A.2), aligned row by row.

    Attributes:
        original: Int[Tensor, "n seq"] the memorized paragraphs (true prefix + true continuation).
        perturbed: Int[Tensor, "n seq"] the PMPs: perturbed prefix + the model's greedy
            continuation of it (same length as ``original``).
        position: Int[Tensor, "n"] the perturbed prefix position (the "perturbed token", A.2).
        token: Int[Tensor, "n"] the token placed there.
        original_token: Int[Tensor, "n"] the token it replaced.
        first_impacted: Int[Tensor, "n"] index *within the continuation* (0..T-1) of the first
            generated token that differs from the unperturbed continuation (the "impact token",
            A.2); its absolute position in the sequence is ``prefix_len + first_impacted``.
        em_drop: Int[Tensor, "n"] EM drop caused by the perturbation.
        table: one row per PMP: ``paragraph`` (row in the input tokens), ``position``, ``token``,
            ``original_token``, ``first_impacted``, ``first_impacted_abs``, ``em_clean``, ``em``,
            ``em_drop``, ``nll_change``.
        prefix_len: prefix length.
    """

    original: Int[Tensor, "n seq"]
    perturbed: Int[Tensor, "n seq"]
    position: Int[Tensor, "n"]
    token: Int[Tensor, "n"]
    original_token: Int[Tensor, "n"]
    first_impacted: Int[Tensor, "n"]
    em_drop: Int[Tensor, "n"]
    table: pd.DataFrame
    prefix_len: int

    def __len__(self) -> int:
        return len(self.original)


def replacement_vocab_size(model: Model) -> int:
    """How many token ids a perturbation draws replacements from (ids ``0..n-1``, the default
    ``vocab_size`` of :func:`perturbation_profile`): ``model.cfg.d_vocab``, or the tokenizer's
    length where that is smaller (padded embedding matrices have rows no token maps to)."""
    v = int(model.cfg.d_vocab)
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        try:
            v = min(v, len(tok))
        except TypeError:
            pass
    return v


def random_replacements(original: Int[Tensor, "n position"], n_samples: int, vocab_size: int, *,
                        seed: int = 0) -> Int[Tensor, "n position sample"]:
    """Random replacement tokens, uniform over ``[0, vocab_size)`` without the original token.

    Drawn from a CPU ``torch.Generator`` seeded with ``seed``, so the result depends only on the
    arguments (never on the global RNG).
    """
    check_positive_int(n_samples, "n_samples")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")
    check_seed(seed)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    orig = original.detach().cpu().long()
    draw = torch.randint(0, vocab_size - 1, (*orig.shape, n_samples), generator=gen)
    # skip the original id: values >= original shift up by one -> uniform over the other ids
    return draw + (draw >= orig.unsqueeze(-1)).long()


def _check_positions(positions: Sequence[int] | None, prefix_len: int) -> list[int]:
    if positions is None:
        return list(range(prefix_len))
    try:
        pos = [int(p) for p in positions]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"positions must be a sequence of ints in 0..{prefix_len - 1}, got {positions!r}") from exc
    if not pos:
        raise ValueError("positions is empty; pass at least one prefix position")
    bad = [p for p in pos if not 0 <= p < prefix_len]
    if bad:
        raise ValueError(f"positions {bad} are outside the prefix 0..{prefix_len - 1}")
    if len(set(pos)) != len(pos):
        raise ValueError(f"positions has duplicates: {pos}")
    return pos


def _first_difference(a: Tensor, b: Tensor) -> Tensor:
    """Index of the first differing column per row of ``a`` vs ``b`` (``T`` if none)."""
    same = (a == b).long().cumprod(-1)
    return same.sum(-1)


def perturbation_profile(model: Model, tokens: Int[Tensor, "n seq"], prefix_len: int, *, n_samples: int = 1,
                         seed: int = 0, positions: Sequence[int] | None = None, batch_size: int = 64,
                         vocab_size: int | None = None, progress_bar: bool = True) -> PerturbationResult:
    """Perturb every prefix token of every paragraph and measure EM drop and NLL change (Stoehr §4, Fig. 3).

    For each paragraph ``n``, position ``i`` in ``positions`` (default: the whole prefix) and
    sample ``j < n_samples``, ``tokens[n, i]`` is replaced by a random other token; all
    perturbed prefixes (of all paragraphs) are scored teacher-forced on the true continuation in
    batches of ``batch_size`` (NLL, and EM via :func:`memloc.metrics.exact_match_teacher_forced`),
    and greedily decoded (``memloc.metrics.greedy_decode``, KV cache) where needed: a perturbed
    prefix that still reproduces the whole true continuation of a paragraph whose unperturbed
    continuation is the true one continues exactly as the unperturbed one, so it is not decoded
    (on memorized paragraphs that is most prefixes).

    Args:
        model: the TransformerBridge (borrowed; hooks active on it apply).
        tokens: Int[Tensor, "n seq"] paragraphs.
        prefix_len: prefix length (50 in the paper); the continuation has ``seq - prefix_len`` tokens.
        n_samples: random replacement tokens per position (the paper: 1).
        seed: seed of the ``torch.Generator`` drawing the replacements.
        positions: prefix positions to perturb (default all ``0..prefix_len-1``).
        batch_size: sequences per decoding / teacher-forcing batch.
        vocab_size: replacements are drawn from ``[0, vocab_size)`` (default: the smaller of the
            model's ``d_vocab`` and its tokenizer's size).

    Returns:
        :class:`PerturbationResult` with the tidy per-sample and per-position tables.
    """
    tokens = check_tokens(model, tokens, prefix_len)
    check_positive_int(n_samples, "n_samples")
    check_positive_int(batch_size, "batch_size")
    check_seed(seed)
    pos = _check_positions(positions, prefix_len)
    vocab_size = _check_vocab_size(model, vocab_size)
    n, seq = tokens.shape
    T = seq - prefix_len
    P, S = len(pos), n_samples

    with borrowed(model):
        cpu_tokens = tokens.cpu()
        target = cpu_tokens[:, prefix_len:]
        pos_t = torch.tensor(pos, dtype=torch.long)
        original = cpu_tokens[:, pos_t]                                   # [n, P]
        repl = random_replacements(original, S, vocab_size, seed=seed)    # [n, P, S]

        clean_tf = teacher_forced(model, tokens, prefix_len, batch_size=batch_size)
        clean_gen = greedy_decode(model, tokens[:, :prefix_len], T, batch_size=batch_size)
        em_clean = em_from_generations(clean_gen, target)

        flat_prefix, flat_full = _perturbed_sequences(cpu_tokens, pos_t, repl, prefix_len)
        nll, em = _score_perturbed(model, flat_full, prefix_len, batch_size, tokens.device, progress_bar)
        nll, em = nll.view(n, P, S), em.view(n, P, S)
        reproduced = (clean_gen == target).all(1).view(n, 1, 1) & (em == T)
        gen = _decode_perturbed(model, flat_prefix, clean_gen, reproduced, batch_size, tokens.device, progress_bar)

    first = _first_difference(gen, clean_gen.view(n, 1, 1, T))
    samples = _sample_table(pos, original, repl, em_clean, em, clean_tf["nll"], nll, first, T)
    clean = pd.DataFrame({"paragraph": np.arange(n), "em_clean": em_clean.numpy(), "nll_clean": clean_tf["nll"].numpy()})
    return PerturbationResult(samples=samples, profile=_position_profile(samples), clean=clean,
                              clean_generation=clean_gen, generations=gen, replacements=repl, positions=pos,
                              prefix_len=prefix_len)


def _check_vocab_size(model: Model, vocab_size: Any) -> int:
    """``vocab_size`` of :func:`perturbation_profile`, validated; None: :func:`replacement_vocab_size` of the model."""
    if vocab_size is None:
        return replacement_vocab_size(model)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 2 <= vocab_size <= model.cfg.d_vocab:
        raise ValueError(f"vocab_size must be an int in 2..{model.cfg.d_vocab}, got {vocab_size!r}")
    return vocab_size


def _perturbed_sequences(cpu_tokens: Tensor, pos_t: Tensor, repl: Tensor, prefix_len: int) -> tuple[Tensor, Tensor]:
    """Every perturbed prefix of every paragraph, flattened (paragraph, position, sample):
    ``[n*P*S, prefix]``, and the same followed by the paragraph's true continuation ``[n*P*S, seq]``."""
    n, P, S = repl.shape
    target = cpu_tokens[:, prefix_len:]
    prefixes = cpu_tokens[:, :prefix_len].unsqueeze(1).unsqueeze(1).repeat(1, P, S, 1)   # [n, P, S, prefix]
    prefixes.scatter_(-1, pos_t.view(1, P, 1, 1).expand(n, P, S, 1), repl.unsqueeze(-1))
    flat_prefix = prefixes.reshape(n * P * S, prefix_len)
    flat_full = torch.cat([flat_prefix, target.repeat_interleave(P * S, dim=0)], dim=1)
    return flat_prefix, flat_full


def _score_perturbed(model: Model, flat_full: Tensor, prefix_len: int, batch_size: int, dev: Any,
                     progress_bar: bool) -> tuple[Tensor, Tensor]:
    """Teacher forcing scores the true continuation under every perturbed prefix (NLL, Stoehr §3.2)
    and gives the EM against it (:func:`memloc.metrics.exact_match_teacher_forced`); flat ``(nll, em)``."""
    nlls, ems = [], []
    chunks = list(range(0, len(flat_full), batch_size))
    for start in progress(chunks, enabled=progress_bar, desc="perturbed teacher forcing"):
        tf = teacher_forced(model, flat_full[start:start + batch_size].to(dev), prefix_len, batch_size=batch_size)
        nlls.append(tf["nll"])
        ems.append(tf["em"])
    return torch.cat(nlls), torch.cat(ems)


def _decode_perturbed(model: Model, flat_prefix: Tensor, clean_gen: Tensor, reproduced: Tensor, batch_size: int,
                      dev: Any, progress_bar: bool) -> Tensor:
    """The greedy continuation of every perturbed prefix, ``[n, P, S, T]``.

    Where the unperturbed greedy continuation is the true one and the perturbed prefix still
    reproduces all of it (``reproduced``: EM = T), the perturbed greedy continuation is that same
    continuation, so only the other prefixes are decoded."""
    n, P, S = reproduced.shape
    T = clean_gen.shape[1]
    gen = clean_gen.view(n, 1, 1, T).expand(n, P, S, T).clone().reshape(n * P * S, T)
    todo = torch.nonzero(~reproduced.reshape(-1)).flatten()
    chunks = list(range(0, len(todo), batch_size))
    for start in progress(chunks, enabled=progress_bar, desc="perturbed decoding"):
        rows = todo[start:start + batch_size]
        gen[rows] = greedy_decode(model, flat_prefix[rows].to(dev), T, batch_size=batch_size)
    logger.debug("perturbation_profile: decoded %d of %d perturbed prefixes", len(todo), n * P * S)
    return gen.view(n, P, S, T)


def _sample_table(pos: list[int], original: Tensor, repl: Tensor, em_clean: Tensor, em: Tensor, nll_clean: Tensor,
                  nll: Tensor, first: Tensor, T: int) -> pd.DataFrame:
    """``PerturbationResult.samples``: one row per (paragraph, position, sample)."""
    n, P, S = repl.shape
    em_drop = em_clean.view(n, 1, 1) - em
    nll_change = nll - nll_clean.view(n, 1, 1)
    idx_n, idx_p, idx_s = np.meshgrid(np.arange(n), np.arange(P), np.arange(S), indexing="ij")
    return pd.DataFrame({
        "paragraph": idx_n.ravel(),
        "position": np.asarray(pos)[idx_p.ravel()],
        "sample": idx_s.ravel(),
        "original_token": original.unsqueeze(-1).expand(n, P, S).reshape(-1).numpy(),
        "token": repl.reshape(-1).numpy(),
        "em_clean": em_clean.view(n, 1, 1).expand(n, P, S).reshape(-1).numpy(),
        "em": em.reshape(-1).numpy(),
        "em_drop": em_drop.reshape(-1).numpy(),
        "em_drop_generation": (T - first).reshape(-1).numpy(),
        "nll_clean": nll_clean.view(n, 1, 1).expand(n, P, S).reshape(-1).numpy(),
        "nll": nll.reshape(-1).numpy(),
        "nll_change": nll_change.reshape(-1).numpy(),
        "first_impacted": first.reshape(-1).numpy(),
        "changed": (first < T).reshape(-1).numpy(),
    })


def _position_profile(samples: pd.DataFrame) -> pd.DataFrame:
    """``PerturbationResult.profile``: the samples aggregated per (paragraph, position)."""
    return (samples.groupby(["paragraph", "position"], sort=True)
            .agg(original_token=("original_token", "first"), em_clean=("em_clean", "first"),
                 em_drop_mean=("em_drop", "mean"), em_drop_max=("em_drop", "max"),
                 em_drop_generation_mean=("em_drop_generation", "mean"),
                 em_drop_generation_max=("em_drop_generation", "max"),
                 nll_change_mean=("nll_change", "mean"), nll_change_max=("nll_change", "max"),
                 frac_changed=("changed", "mean"))
            .reset_index())


def em_drop_by_position(profile: pd.DataFrame, groups: pd.Series | Sequence | dict | None = None, *,
                        value: str = "em_drop_generation_mean") -> pd.DataFrame:
    """Mean EM drop per prefix position, per group of paragraphs (Stoehr Fig. 3 bottom: MP vs NMP).

    Args:
        profile: ``PerturbationResult.profile`` (columns ``paragraph, position`` and ``value``).
        groups: a label per paragraph (e.g. ``memloc.split_memorization(...)``): a Series or dict
            indexed by paragraph id, or a sequence aligned with paragraph ids ``0..n-1``.  Rows
            of paragraphs without a label are dropped.  ``None``: one group ``"all"``.
        value: the profile column to average: ``em_drop_generation_mean`` (default; EM drop against
            the model's unperturbed continuation, which compares MPs and NMPs as in Fig. 3
            bottom), ``em_drop_mean`` (against the true continuation), ``em_drop_max``,
            ``nll_change_mean``, ...

    Returns:
        DataFrame ``group, position, mean, sem, n`` (``sem`` = standard error over paragraphs).
    """
    if not isinstance(profile, pd.DataFrame) or not {"paragraph", "position", value} <= set(profile.columns):
        raise ValueError(f"profile must be a DataFrame with columns 'paragraph', 'position' and {value!r} "
                         "(PerturbationResult.profile)")
    df = profile[["paragraph", "position", value]].copy()
    if groups is None:
        df["group"] = "all"
    else:
        if isinstance(groups, dict):
            mapping = pd.Series(groups)
        elif isinstance(groups, pd.Series):
            mapping = groups
        else:
            mapping = pd.Series(list(groups))
        missing = set(df["paragraph"]) - set(mapping.index)
        if len(missing) == len(set(df["paragraph"])):
            raise ValueError("groups labels none of the profile's paragraphs; index it by paragraph id")
        df["group"] = df["paragraph"].map(mapping)
        df = df.dropna(subset=["group"])
    out = (df.groupby(["group", "position"], sort=True)[value]
           .agg(mean="mean", sem="sem", n="count").reset_index())
    out["sem"] = out["sem"].fillna(0.0)
    return out


def make_pmps(model: Model, tokens: Int[Tensor, "n seq"], prefix_len: int, *, n_samples: int = 1, seed: int = 0,
              positions: Sequence[int] | None = None, memorized_min_em: int | None = None, drop_unchanged: bool = True,
              result: PerturbationResult | None = None, batch_size: int = 64,
              progress_bar: bool = True) -> PMPSet:
    """Perturbed memorized paragraphs (Stoehr §4, Tab. 2, App. A.2).

    Runs :func:`perturbation_profile` (or reuses ``result`` computed on the same ``tokens``),
    keeps the memorized paragraphs (clean EM >= ``memorized_min_em``; default: the full
    continuation length, i.e. EM = 50 for the paper's split), and for each picks the perturbation
    with the maximum EM drop (ties: larger NLL change of the true continuation, then the earlier
    position, then the lower sample).  The PMP is that perturbed prefix followed by the model's
    greedy continuation of it; ``first_impacted`` is the first continuation index where that
    continuation departs from the unperturbed one.

    Args:
        positions: prefix positions that may be perturbed (default all).  On the embedded model
            perturbing the last prefix token almost always wins (EM drop 50, impact at the first
            generated token); pass e.g. ``range(prefix_len - 1)`` for PMPs whose perturbed and
            impact tokens are apart (App. A.2 analyses).
        drop_unchanged: drop paragraphs for which no perturbation changed the greedy continuation
            (their "PMP" would equal the MP); logged.  If False they are kept with
            ``first_impacted = T`` (no impact token).

    Returns:
        :class:`PMPSet` (tensors on CPU).
    """
    tokens = check_tokens(model, tokens, prefix_len)
    n, seq = tokens.shape
    T = seq - prefix_len
    if memorized_min_em is None:
        memorized_min_em = T
    if isinstance(memorized_min_em, bool) or not isinstance(memorized_min_em, int) or not 0 <= memorized_min_em <= T:
        raise ValueError(f"memorized_min_em must be an int in 0..{T}, got {memorized_min_em!r}")
    if result is None:
        result = perturbation_profile(model, tokens, prefix_len, n_samples=n_samples, seed=seed, positions=positions,
                                      batch_size=batch_size, progress_bar=progress_bar)
    elif not isinstance(result, PerturbationResult) or result.prefix_len != prefix_len or len(result.clean) != n:
        raise ValueError("result must be the PerturbationResult of perturbation_profile on the same tokens and prefix_len")
    s = result.samples
    if positions is not None:
        pos = _check_positions(positions, prefix_len)
        if not set(pos) & set(result.positions):
            raise ValueError(f"none of positions {pos} was perturbed in result (positions {result.positions})")
        s = s[s["position"].isin(pos)]  # candidates: the perturbed positions among ``positions``
    keep = s[s["em_clean"] >= memorized_min_em]
    best = (keep.sort_values(["paragraph", "em_drop", "nll_change", "position", "sample"],
                             ascending=[True, False, False, True, True])
            .groupby("paragraph", sort=True).head(1).reset_index(drop=True))
    if drop_unchanged:
        unchanged = best[~best["changed"]]
        if len(unchanged):
            logger.info("make_pmps: %d memorized paragraphs have no perturbation that changes the continuation; "
                        "dropped", len(unchanged))
        best = best[best["changed"]].reset_index(drop=True)
    pos_index = {p: i for i, p in enumerate(result.positions)}
    best = best.copy()
    par = torch.as_tensor(best["paragraph"].to_numpy(copy=True), dtype=torch.long)
    pidx = torch.as_tensor([pos_index[p] for p in best["position"]], dtype=torch.long)
    sidx = torch.as_tensor(best["sample"].to_numpy(copy=True), dtype=torch.long)
    original = tokens.cpu()[par]
    perturbed = original.clone()
    perturbed[:, prefix_len:] = result.generations[par, pidx, sidx]
    position = torch.as_tensor(best["position"].to_numpy(copy=True), dtype=torch.long)
    token = torch.as_tensor(best["token"].to_numpy(copy=True), dtype=torch.long)
    if len(best):
        perturbed[torch.arange(len(best)), position] = token
    table = pd.DataFrame({
        "paragraph": best["paragraph"].to_numpy(), "position": best["position"].to_numpy(),
        "token": best["token"].to_numpy(), "original_token": best["original_token"].to_numpy(),
        "first_impacted": best["first_impacted"].to_numpy(),
        "first_impacted_abs": best["first_impacted"].to_numpy() + prefix_len,
        "em_clean": best["em_clean"].to_numpy(), "em": best["em"].to_numpy(), "em_drop": best["em_drop"].to_numpy(),
        "nll_change": best["nll_change"].to_numpy(),
    })
    return PMPSet(original=original, perturbed=perturbed, position=position, token=token,
                  original_token=torch.as_tensor(best["original_token"].to_numpy(copy=True), dtype=torch.long),
                  first_impacted=torch.as_tensor(best["first_impacted"].to_numpy(copy=True), dtype=torch.long),
                  em_drop=torch.as_tensor(best["em_drop"].to_numpy(copy=True), dtype=torch.long), table=table,
                  prefix_len=prefix_len)
