"""Measuring a dropout for the DEL benchmark (Chang et al. §3.2, Eq. 4-5; A.8): teacher-forced
accuracy and Levenshtein distance of every sequence of the memorized set X and the perplexity on
random text D, under the top-k%-per-layer dropout of one method's scores (:func:`evaluate_dropout`,
one evaluation task of :func:`memloc.benchmarks.del_benchmark`), its cache entry, and the fast
measurer that re-runs only the droppable layers (:class:`DropoutMeasurer`)."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..ablation import ablate, select_top_k
from ..metrics import char_distances, perplexity, teacher_forced, token_nll
from ..models import Model

logger = logging.getLogger(__name__)

__all__ = ["DelSetting", "DropoutMeasurer", "measure", "evaluate_dropout", "eval_cache_path", "read_eval",
           "write_eval", "digest_tensor"]


def measure(model: Model, tokens: Tensor, prefix_len: int, random_tokens: Tensor | None, batch_size: int,
             tokenizer: Any) -> tuple[Tensor, Tensor, float]:
    tf = teacher_forced(model, tokens, prefix_len, batch_size=batch_size)
    dist = char_distances(model, tf["argmax"], tokens[:, prefix_len:].cpu(), tokenizer).double()
    ppl = perplexity(model, random_tokens, batch_size=batch_size) if random_tokens is not None else float("nan")
    return tf["accuracy"].double(), dist, ppl


class DropoutMeasurer:
    """ΔAcc/ΔDist/Rand-PPL under several dropout masks at once, re-running only the layers a mask can touch.

    Every mask of the benchmark leaves the excluded bottom layers ``< start`` intact, so the input of
    block ``start`` is the same under every dropout: it is cached once per sequence
    (:func:`memloc.localize._common.partial_forward`, checked against a full forward) and each
    measurement re-runs blocks ``start..L-1`` only, unembedding only the positions read (the
    suffix-predicting ones for Self/Neg, all but the last for Rand-PPL).  The masks are applied
    row-wise (one mask per copy of the set in the batch) by a multiplicative hook at
    ``blocks.{l}.mlp.hook_post`` (zero: ``h * keep``; mean: ``h * keep + mean * (1 - keep)``), so
    the ratios of one (method, target) share forwards (up to ``batch_size`` rows each).  Equal to measuring each
    mask under :func:`memloc.ablation.ablate` with full forwards (tests/test_benchmarks.py).
    """

    def __init__(self, model: Model, tokens: Tensor, prefix_len: int, random_tokens: Tensor | None, batch_size: int,
                 tokenizer: Any, start: int, means: Tensor | None) -> None:
        from ..localize._common import partial_forward, suffix_positions

        self.model, self.tokens, self.prefix_len, self.batch_size = model, tokens, prefix_len, batch_size
        self.tokenizer, self.start, self.means = tokenizer, start, means
        self.runs = []
        for part in (tokens, random_tokens):
            if part is None:
                self.runs.append(None)
                continue
            pos = suffix_positions(part.shape[1], prefix_len) if part is tokens else slice(0, part.shape[1] - 1)
            fns = []
            for i in range(0, len(part), batch_size):
                fn = partial_forward(model, part[i:i + batch_size], start, pos, what="DEL dropout measurement")
                if fn is None:
                    self.ok = False
                    return
                fns.append((i, fn))
            self.runs.append((part, fns))
        self.ok = True

    def _forward(self, which: int, keep: Tensor) -> list[Tensor]:
        """Logits of every copy r of set ``which`` under ``keep[r]`` [R, layer, neuron] (float)."""
        from ..models import neuron_hook_name

        part, fns = self.runs[which]
        n_layers = int(self.model.cfg.n_layers)
        current: dict[str, Tensor] = {}

        def hook(act, hook):
            k = current["keep"][:, int(hook.name.split(".")[1])].to(act.dtype).unsqueeze(1)  # [rows, 1, neuron]
            if self.means is None:
                return act * k
            m = self.means[int(hook.name.split(".")[1])].to(act.device, act.dtype)
            return act * k + m * (1 - k)

        out = [[] for _ in range(len(keep))]
        hooks = [(neuron_hook_name(l), hook) for l in range(self.start, n_layers)]
        with self.model.hooks(fwd_hooks=hooks), torch.no_grad():
            # rows (copy r, sequence i), batched over copies: each cached chunk runs once per copy group
            for i, fn in fns:
                resid = fn.resid
                b = len(resid)
                per = max(1, self.batch_size // b)
                for r0 in range(0, len(keep), per):
                    rs = list(range(r0, min(len(keep), r0 + per)))
                    current["keep"] = keep[rs].to(resid.device).repeat_interleave(b, dim=0)
                    logits = fn(resid.repeat(len(rs), 1, 1))
                    for j, r in enumerate(rs):
                        out[r].append(logits[j * b:(j + 1) * b])
        return [torch.cat(o) for o in out]

    def __call__(self, masks: list[Tensor]) -> list[tuple[Tensor, Tensor, float]]:
        import math

        keep = (~torch.stack([m.cpu() for m in masks])).float()
        target = self.tokens[:, self.prefix_len:]
        results = []
        tf_logits = self._forward(0, keep)
        ppls = [float("nan")] * len(masks)
        if self.runs[1] is not None:
            part = self.runs[1][0]
            for r, lg in enumerate(self._forward(1, keep)):
                total = token_nll(lg.float(), part[:, 1:]).sum().item()
                ppls[r] = math.exp(total / part[:, 1:].numel())
        for r, lg in enumerate(tf_logits):
            lg = lg.float()
            argmax = lg.argmax(-1).cpu()
            acc = (argmax == target.cpu()).float().mean(1)
            dist = char_distances(self.model, argmax, target.cpu(), self.tokenizer).double()
            results.append((acc.double(), dist, ppls[r]))
        return results


@dataclass(frozen=True)
class DelSetting:
    """Everything an evaluation task needs besides the scores (sent to the workers as it is)."""

    tokens: Tensor
    prefix_len: int
    random_tokens: Tensor | None
    batch_size: int
    tokenizer: Any
    exclude_layers: list
    mode: str
    means: Tensor | None
    start: int = 0
    fast: bool = True

    def key(self) -> list[str]:
        """The parts of an evaluation's cache key that come from the setting."""
        rand = "none" if self.random_tokens is None else digest_tensor(self.random_tokens)
        return [digest_tensor(self.tokens), str(int(self.prefix_len)), rand, str(int(self.batch_size)),
                repr(sorted(self.exclude_layers)), self.mode, repr(self.tokenizer is None)]

    def measurer(self, model: Model) -> "DropoutMeasurer | None":
        """The fast dropout measurer of this setting on ``model`` (built once per process and model:
        it caches the input of the first droppable block), or None for ``fast=False`` or when its
        self-check failed (then a WARNING was logged and full forwards run)."""
        if not self.fast:
            return None
        key = (id(model), digest_tensor(self.tokens), self.prefix_len, self.start, self.batch_size,
               None if self.random_tokens is None else digest_tensor(self.random_tokens), self.mode)
        if _MEASURERS.get("key") != key:
            m = DropoutMeasurer(model, self.tokens, self.prefix_len, self.random_tokens, self.batch_size,
                                 self.tokenizer, self.start, self.means)
            _MEASURERS.clear()
            _MEASURERS.update(key=key, measurer=m if m.ok else None)
        return _MEASURERS["measurer"]


#: The last-used fast measurer of this process (a worker keeps it across its evaluation tasks).
_MEASURERS: dict[str, Any] = {}


def digest_tensor(t: Tensor) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(str((t.dtype, tuple(t.shape))).encode())
    h.update(t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy())
    return h.hexdigest()


def evaluate_dropout(model: Model, s: DelSetting, scores: Tensor, r: float) -> tuple[Tensor, Tensor, float, int]:
    """Evaluation task: drop out the top-``r`` neurons of ``scores`` per layer (except the excluded
    layers) and measure accuracy and distance of every sequence of X and the Rand-PPL."""
    if r == 0:
        mask = torch.zeros_like(scores, dtype=torch.bool)
    else:
        mask = select_top_k(scores, r, per_layer=True, exclude_layers=s.exclude_layers)
    measurer = s.measurer(model)
    if measurer is not None:
        (acc, dist, ppl), = measurer([mask])
    else:
        with ablate(model, mask, mode=s.mode, means=s.means):
            acc, dist, ppl = measure(model, s.tokens, s.prefix_len, s.random_tokens, s.batch_size, s.tokenizer)
    return acc, dist, ppl, int(mask.sum())


def eval_cache_path(cache_dir: str | Path, fingerprint: str, scores: Tensor, r: float, setting: DelSetting) -> Path:
    h = hashlib.blake2b(digest_size=16)
    for part in [fingerprint, digest_tensor(scores), repr(float(r)), *setting.key()]:
        h.update(part.encode())
        h.update(b"\0")
    return Path(cache_dir) / "del_eval" / f"{h.hexdigest()}.safetensors"


def read_eval(path: Path) -> tuple[Tensor, Tensor, float, int] | None:
    if not path.exists():
        return None
    try:
        d = load_file(str(path))
        return d["acc"], d["dist"], float(d["ppl"][0]), int(d["n_dropped"][0])
    except Exception as exc:  # a truncated or foreign file: recompute and overwrite
        logger.warning("could not read DEL evaluation cache %s (%s); recomputing", path, exc)
        return None


def write_eval(path: Path, value: tuple[Tensor, Tensor, float, int]) -> None:
    acc, dist, ppl, n_dropped = value
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"acc": acc.contiguous(), "dist": dist.contiguous(), "ppl": torch.tensor([ppl], dtype=torch.float64),
               "n_dropped": torch.tensor([n_dropped], dtype=torch.long)}, str(tmp))
    tmp.replace(path)
