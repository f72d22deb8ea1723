"""Which memloc paths hold on a model placed by ``device_map`` (issue 14, "Beyond one GPU").

Loads the embedded model twice, once plainly on one device and once through
``memloc.load_model(device_map=...)`` (accelerate places the modules; offloaded ones stay on
``meta`` and are loaded per call), runs every public analysis on both and compares:

* each localization method of ``METHODS`` (ZERO-OUT on layers 2-3, masks at 30 steps) and the
  path it took (the ``memloc_path`` log record);
* teacher-forced accuracy, greedy exact match, ``ablate`` of the top 5 % ZERO-OUT neurons;
* activation gradients, parameter gradients, INJ's injection, sparse fine-tuning, which either
  match or must refuse an offloaded model with a ``ValueError`` (they write or train weights).

``python -m benchmarks.placement --map cpu-disk`` (CPU; what CI tests), ``--map cuda`` (an all-GPU
map through accelerate, on a GPU machine), ``--map cuda-cpu`` (GPU with CPU offload: TransformerLens
4.3 refuses such a map at boot, recorded as the outcome).  ``--json PATH`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import traceback
from typing import Any, Callable

import pandas as pd
import torch

import memloc
from memloc import localize as loc
from memloc.placement import offloaded_modules

MAPS = ("cpu-disk", "cuda", "cuda-cpu")
PREFIX = 50


def device_map_for(kind: str, n_layers: int = 4) -> tuple[str, dict[str, Any]]:
    """(plain device, device_map) of a placement kind for the embedded GPT-Neo model."""
    blocks = [f"transformer.h.{l}" for l in range(n_layers)]
    head = ["transformer.wte", "transformer.wpe"]
    tail = ["transformer.ln_f", "lm_head"]
    if kind == "cpu-disk":  # the later half of the blocks on disk: loaded for each call
        return "cpu", {**{m: "cpu" for m in head + blocks[: n_layers // 2] + tail},
                       **{m: "disk" for m in blocks[n_layers // 2:]}}
    if kind == "cuda":
        return "cuda", {m: 0 for m in head + blocks + tail}
    if kind == "cuda-cpu":
        return "cuda", {**{m: 0 for m in head + blocks[: n_layers // 2] + tail},
                        **{m: "cpu" for m in blocks[n_layers // 2:]}}
    raise ValueError(f"kind must be one of {MAPS}, got {kind!r}")


class _Paths(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.paths: list[str] = []
        self.warnings: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "memloc_path"):
            self.paths.append(record.memloc_path)
        if record.levelno >= logging.WARNING:
            self.warnings.append(record.getMessage()[:160])


def _diff(a: Any, b: Any) -> float:
    """Largest |a - b| where both are numbers; inf where one is NaN and the other not."""
    if isinstance(a, pd.DataFrame):
        num = a.select_dtypes("number").columns
        a, b = a[num].to_numpy(float), b[num].to_numpy(float)
    a, b = torch.as_tensor(a).double().cpu(), torch.as_tensor(b).double().cpu()
    if a.shape != b.shape or not torch.equal(a.isnan(), b.isnan()):
        return float("inf")
    both = ~a.isnan()
    return float((a[both] - b[both]).abs().max()) if both.any() else 0.0


def analyses(tokens: torch.Tensor, others: torch.Tensor) -> dict[str, Callable[[Any], Any]]:
    """name -> function of the model: every analysis the comparison runs."""
    seq = tokens[0]
    fast_masks = {"max_steps": 30}

    def zero_out(m):
        return loc.zero_out(m, seq, PREFIX, layers=[2, 3], progress_bar=False)

    def ablated_accuracy(m):
        z = loc.zero_out(m, seq, PREFIX, layers=[1, 2, 3], progress_bar=False).nan_to_num(float("-inf"))
        with memloc.ablate(m, memloc.select_top_k(z.cpu(), 0.05, exclude_layers=[0])):
            return memloc.teacher_forced_accuracy(m, tokens, PREFIX)

    def inject(m):
        from memloc.benchmarks.injection import injected, sample_injection_mask

        mask = sample_injection_mask(int(m.cfg.n_layers), int(m.cfg.d_mlp), 0.001, seed=0)
        with injected(m, tokens[:1], mask, max_steps=5) as res:
            return torch.tensor([res.final_loss])

    def finetune(m):
        from memloc.finetune import sparse_finetune

        df = sparse_finetune(m, tokens, others, PREFIX, steps=2, progress_bar=False)
        return df.drop(columns=[c for c in df.columns if "time" in c or "second" in c])

    out: dict[str, Callable[[Any], Any]] = {}
    for method in loc.METHODS:
        if method == "zero_out":
            out[method] = zero_out
        else:
            kw = dict(fast_masks) if method in ("slimming", "hard_concrete") else {}
            if "progress_bar" in loc.METHODS[method].defaults:
                kw["progress_bar"] = False
            out[method] = (lambda name, kw: lambda m: loc.METHODS[name](m, seq, PREFIX, **kw))(method, kw)
    out.update({
        "teacher_forced_accuracy": lambda m: memloc.teacher_forced_accuracy(m, tokens, PREFIX),
        "exact_match": lambda m: memloc.exact_match(m, tokens, PREFIX),
        "ablate(top 5% ZERO-OUT)": ablated_accuracy,
        "activation_gradients": lambda m: memloc.gradients.activation_gradients(m, tokens, PREFIX,
                                                                                progress_bar=False),
        "parameter_gradients": lambda m: memloc.gradients.parameter_gradients(m, tokens, PREFIX, progress_bar=False),
        "INJ injection": inject,
        "sparse_finetune": finetune,
    })
    return out


def compare(kind: str, dtype: torch.dtype = torch.float32) -> pd.DataFrame:
    """One row per analysis: ``outcome`` (``match`` / ``differs`` / ``refused`` (a ValueError on the
    placed model) / ``error``), ``max_abs_diff`` against the plainly loaded model, ``path`` taken
    on the placed model and its WARNINGs, seconds on each."""
    device, dmap = device_map_for(kind)
    plain = memloc.load_model("tiny", device=device, dtype=dtype)
    ps = memloc.load_paragraphs("tiny")
    order = ps.table.sort_values("em_ref", kind="stable").index
    tokens = ps.tokens[list(order[-2:])].to(device)       # two memorized paragraphs (EM 50)
    others = ps.tokens[list(order[:4])].to(device)        # four never-memorized ones
    rows = []
    with tempfile.TemporaryDirectory() as offload:
        try:
            placed = memloc.load_model("tiny", device_map=dmap, offload_folder=offload, dtype=dtype)
        except Exception as exc:  # recorded: the point is which placements TransformerLens accepts
            return pd.DataFrame([{"map": kind, "analysis": "load_model", "outcome": "refused at boot",
                                  "detail": f"{type(exc).__name__}: {str(exc)[:300]}"}])
        offloaded = len(offloaded_modules(placed))
        handler = _Paths()
        log = logging.getLogger("memloc")
        level = log.level
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        try:
            for name, fn in analyses(tokens, others).items():
                t0 = time.perf_counter()
                ref = fn(plain)
                t_plain = time.perf_counter() - t0
                handler.paths.clear(), handler.warnings.clear()
                t0 = time.perf_counter()
                row = {"map": kind, "analysis": name, "offloaded_modules": offloaded}
                try:
                    got = fn(placed)
                    diff = _diff(got, ref)
                    row.update(outcome="match" if diff <= 1e-4 else "differs", max_abs_diff=diff)
                except ValueError as exc:
                    row.update(outcome="refused", detail=str(exc)[:200])
                except Exception as exc:
                    row.update(outcome="error", detail=f"{type(exc).__name__}: {str(exc)[:200]}",
                               trace=traceback.format_exc()[-600:])
                row.update(seconds=time.perf_counter() - t0, plain_seconds=t_plain,
                           path=",".join(dict.fromkeys(handler.paths)), warnings=" | ".join(handler.warnings))
                rows.append(row)
        finally:
            log.removeHandler(handler)
            log.setLevel(level)
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--map", default="cpu-disk", help=f"comma-separated among {','.join(MAPS)}")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    df = pd.concat([compare(k.strip(), getattr(torch, args.dtype)) for k in args.map.split(",")],
                   ignore_index=True)
    cols = [c for c in ("map", "analysis", "outcome", "max_abs_diff", "path", "seconds", "plain_seconds", "detail")
            if c in df]
    print(df[cols].to_string(index=False, max_colwidth=90))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(df.to_dict(orient="records"), f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
