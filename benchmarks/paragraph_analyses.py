"""Time per paragraph of the paragraph analyses of Stoehr et al. (prefix perturbation, parameter and
activation gradients, ...) on the embedded model and on a random-weight GPT-Neo-125M-config model.

Usage::

    python benchmarks/paragraph_analyses.py [--models tiny gpt-neo-125m] [--n-paragraphs 2] [--device cpu]

Analyses are rows of ``ANALYSES``: ``(name, callable(model, tokens, prefix_len) -> None)``.  Add a
row for a new analysis (contrastive objective, memorization-head statistics, ...) and it is timed
on every model.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memloc import load_model, load_paragraphs  # noqa: E402
from memloc.gradients import activation_gradients, parameter_gradients  # noqa: E402
from memloc.contrastive import contrastive_gradients, sparse_finetune  # noqa: E402
from memloc.heads import rare_token_attention, unigram_counts_from_tokens  # noqa: E402
from memloc.perturb import perturbation_profile  # noqa: E402

Analysis = Callable[[Any, torch.Tensor, int], Any]


def _perturbation(model, tokens, prefix_len):
    return perturbation_profile(model, tokens, prefix_len, n_samples=1, seed=0, batch_size=64, progress_bar=False)


def _param_grads(model, tokens, prefix_len):
    return parameter_gradients(model, tokens, prefix_len, batch_size=8, progress_bar=False)


def _param_grads_per_paragraph(model, tokens, prefix_len):
    return parameter_gradients(model, tokens, prefix_len, per_paragraph=True, batch_size=8, progress_bar=False)


def _act_grads(model, tokens, prefix_len):
    return activation_gradients(model, tokens, prefix_len, batch_size=8, progress_bar=False)


def _nmps(model, tokens):
    """A non-memorized batch for the contrastive KL term: the paragraphs rolled by one token id."""
    return (tokens + 1) % model.cfg.d_vocab


def _contrastive_grads(model, tokens, prefix_len):
    return contrastive_gradients(model, tokens, _nmps(model, tokens), prefix_len, objective="unlearn",
                                 n_nmp_per_batch=min(4, len(tokens)), progress_bar=False)


def _sparse_unlearning(model, tokens, prefix_len):
    return sparse_finetune(model, tokens, _nmps(model, tokens), prefix_len, objective="unlearn", mask="top",
                           steps=3, progress_bar=False)


def _rare_tokens(model, tokens, prefix_len):
    freq = unigram_counts_from_tokens(tokens, model.cfg.d_vocab)
    return rare_token_attention(model, tokens, prefix_len, freq, progress_bar=False)


#: (name, callable(model, tokens, prefix_len)) rows; other analyses append theirs here.
ANALYSES: list[tuple[str, Analysis]] = [
    ("perturbation (50 positions x 1 sample)", _perturbation),
    ("parameter gradients (set, Eq. 1-2)", _param_grads),
    ("parameter gradients (per paragraph)", _param_grads_per_paragraph),
    ("activation gradients (Eq. 5)", _act_grads),
    ("contrastive gradients (CO unlearn, Eq. 3)", _contrastive_grads),
    ("sparse unlearning (top 0.1%, 3 steps + EM)", _sparse_unlearning),
    ("rare-token attention (Fig. 7)", _rare_tokens),
]


def _model_and_tokens(name: str, n: int, device: str | None):
    if name == "tiny":
        model = load_model("tiny", device=device)
        ps = load_paragraphs("tiny")
        mem = torch.as_tensor((ps.table.em_ref == 50).to_numpy(copy=True))
        tokens = ps.tokens[mem][:n] if int(mem.sum()) >= n else ps.tokens[:n]
        return model, tokens, ps.prefix_len
    if name == "gpt-neo-125m":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from factories import build_random_model

        path = build_random_model("gpt-neo-125m", Path(tempfile.mkdtemp(prefix="memloc-bench-")))
        model = load_model(path, device=device)
        ps = load_paragraphs("gpt-neo-125m")
        return model, ps.tokens[:n], ps.prefix_len
    raise SystemExit(f"unknown model {name!r} (tiny, gpt-neo-125m)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["tiny", "gpt-neo-125m"])
    p.add_argument("--n-paragraphs", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--only", nargs="*", default=None, help="substrings of analysis names to run")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared 2-core machine more threads are slower)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MEMLOC_PROGRESS", "0")
    rows = []
    print(f"{'model':<14} {'analysis':<42} {'n':>3} {'total s':>9} {'s/paragraph':>12}", flush=True)
    for name in args.models:
        model, tokens, prefix_len = _model_and_tokens(name, args.n_paragraphs, args.device)
        for label, fn in ANALYSES:
            if args.only and not any(s in label for s in args.only):
                continue
            t0 = time.perf_counter()
            fn(model, tokens, prefix_len)
            dt = time.perf_counter() - t0
            rows.append((name, label, len(tokens), dt))
            print(f"{name:<14} {label:<42} {len(tokens):>3} {dt:>9.2f} {dt / len(tokens):>12.2f}", flush=True)
        del model
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
