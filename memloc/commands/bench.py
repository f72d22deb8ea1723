"""``memloc bench inj|del``: the INJ and DEL benchmarks of Chang et al. (2024).

Writes tidy rows (``method``, the setting columns, the metric columns) to ``--json`` and prints
the table in the paper's layout (Table 2 for INJ, Table 3 for DEL).
"""

from __future__ import annotations

import argparse
import json

from . import add_model_arg, write_json

#: The paper's five methods and the random baseline (Chang et al. Tables 2 and 3).
DEFAULT_METHODS = ["hard_concrete", "slimming", "zero_out", "integrated_gradients", "activations", "random"]


EPILOG = """examples:
  memloc bench del --methods hard_concrete,slimming,random --n 4 --ratio 0.1
  memloc bench del --methods hard_concrete --n 2 --method-kwargs '{"hard_concrete": {"max_steps": 200, "lr": 0.05}}'
  memloc bench inj --methods ig,zero_out,random --n 4 --ratio 0.01 --json /tmp/inj.json
  memloc bench inj --methods integrated_gradients --n 2 --method-kwargs '{"integrated_gradients": {"steps": 8}}'
"""


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="the INJ and DEL localization benchmarks (Chang et al. 2024)",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("benchmark", choices=["inj", "del"], help="inj: recall of injected neurons; "
                   "del: forgetting after dropping out located neurons")
    add_model_arg(p)
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"localization methods (names in memloc.localize.METHODS, space or comma separated; "
                        f"default: {','.join(DEFAULT_METHODS)})")
    p.add_argument("--n", type=int, default=None,
                   help="number of sequences (INJ: first N ECBD definitions, default 8; DEL: first N memorized "
                        "targets, default all)")
    p.add_argument("--set-size", type=int, default=None,
                   help="DEL: size of the memorized set X (targets and negatives; default all memorized paragraphs)")
    p.add_argument("--n-random", type=int, default=64,
                   help="DEL: number of random held-out sequences for Rand-PPL (default 64)")
    p.add_argument("--ratio", type=float, nargs="+", default=None,
                   help="INJ: injection ratios r (default 0.01 0.005); DEL: dropout ratios k per layer "
                        "(default 0.005 0.05 0.1)")
    p.add_argument("--method-kwargs", default=None,
                   help='JSON dict of per-method hyperparameters, e.g. \'{"hard_concrete": {"max_steps": 200}}\' '
                        '(checked against each method\'s hyperparameters before any work: '
                        'memloc.localize.METHODS[name].defaults lists them)')
    p.add_argument("--authors-defaults", action="store_true",
                   help="use the authors' released SLIMMING / HARD CONCRETE settings (lam=1000 on the mean over the "
                        "masked neurons, stop on sparsity alone) instead of the embedded model's dev-set selection "
                        "(memloc.data.tuned_hyperparameters) or memloc's per-neuron defaults")
    p.add_argument("--compare-tuned", action="store_true",
                   help="embedded model: rows 'METHOD' with memloc's library defaults and 'METHOD (tuned)' with the "
                        "dev-set selection, for every method that has one (SLIMMING, HARD CONCRETE)")
    p.add_argument("--json", default=None, help="write the tidy rows (and the table) to this JSON file")
    p.add_argument("--cache-dir", default=None, help="cache attribution scores in this directory")
    p.add_argument("--max-steps", type=int, default=500, help="INJ: step cap of the injection fine-tuning")
    p.add_argument("--lr", type=float, default=None, help="INJ: Adam learning rate of the injection (default 1e-2)")
    add_executor_args(p)
    p.set_defaults(run=run)


def add_executor_args(p) -> None:
    """--executor / --ray-address / --ray-workers / --ray-gpus (memloc.executors)."""
    p.add_argument("--executor", choices=["serial", "ray"], default="serial",
                   help="serial (default): this process; ray: one Ray actor per worker, each loading the model once "
                        "(needs the extra memloc[ray]); with --cache-dir a stopped sweep resumes where it stopped")
    p.add_argument("--ray-address", default=None,
                   help="join a running Ray cluster at this address (host:port, ray://host:port or auto); "
                        "default: start a local Ray instance on this machine's CPUs")
    p.add_argument("--ray-workers", type=int, default=None,
                   help="number of Ray workers (default: as many as the cluster's CPUs, or GPUs, hold)")
    p.add_argument("--ray-gpus", type=float, default=0,
                   help="GPUs per Ray worker (default 0; with GPUs the workers load the model on cuda)")


def make_executor(args):
    """The executor the flags ask for; a missing Ray install is a usage error naming the extra."""
    from ..executors import RayExecutor, SerialExecutor

    if args.executor == "serial":
        if args.ray_address is not None or args.ray_workers is not None or args.ray_gpus:
            raise ValueError("--ray-address, --ray-workers and --ray-gpus need --executor ray")
        return SerialExecutor()
    try:
        ex = RayExecutor(args.ray_address, num_workers=args.ray_workers, num_gpus_per_worker=args.ray_gpus)
    except ImportError as exc:
        raise ValueError(str(exc)) from exc
    ex.preflight()
    return ex


def _methods(arg) -> list[str]:
    if not arg:
        from ..localize import METHODS

        return [m for m in DEFAULT_METHODS if m in METHODS]
    return [m.strip() for a in arg for m in a.split(",") if m.strip()]


def _kwargs(arg) -> dict | None:
    if arg is None:
        return None
    try:
        out = json.loads(arg)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--method-kwargs must be a JSON object: {exc}") from exc
    if not isinstance(out, dict):
        raise ValueError("--method-kwargs must be a JSON object {method: {name: value}}")
    return out


def _merge(tuned: dict, user: dict | None) -> dict:
    """The tuned kwargs under the user's: a user ``lam`` without ``lam_scale`` is in memloc's default
    (per-neuron) scale, so it drops the tuned record's ``lam_scale="mean"``."""
    user = dict(user or {})
    out = {**tuned, **user}
    if "lam" in user and "lam_scale" not in user:
        out.pop("lam_scale", None)
    return out


def check_args(args) -> tuple[dict, dict[str, dict]]:
    """Validate the options before any work (no model is loaded): the method names (aliases become
    canonical names) and every ``--method-kwargs`` hyperparameter against the method registry.  On
    the embedded model the dev-set-selected settings are merged in (``--compare-tuned``: as extra
    ``METHOD (tuned)`` rows beside memloc's defaults), unless ``--authors-defaults`` asks for the
    authors' released mask settings.  Returns ``(methods {label: function}, method_kwargs)``."""
    from ..benchmarks import check_method_kwargs, resolve_methods

    try:
        fns = resolve_methods(_methods(args.methods))
    except ValueError as exc:
        raise ValueError(f"--methods: {exc}") from exc
    try:
        user = check_method_kwargs(_kwargs(args.method_kwargs), fns)
    except ValueError as exc:
        raise ValueError(f"--method-kwargs: {exc}") from exc
    if args.n is not None and args.n <= 0:
        raise ValueError(f"--n must be a positive int, got {args.n}")
    tiny = args.model in (None, "tiny")
    if getattr(args, "compare_tuned", False) and (args.authors_defaults or not tiny):
        raise ValueError("--compare-tuned compares memloc's defaults with the embedded model's dev-set selection: "
                         "use it with --model tiny and without --authors-defaults")
    kwargs = dict(user)
    if args.authors_defaults:
        from ..localize._masks import AUTHORS_SETTINGS

        kwargs.update({m: {**AUTHORS_SETTINGS, **user[m]} for m in ("slimming", "hard_concrete") if m in fns})
    elif tiny:
        from ..data import tuned_hyperparameters

        tuned = {m: _merge(kw, user[m]) for m, kw in tuned_hyperparameters("tiny").items() if m in fns}
        if getattr(args, "compare_tuned", False):  # plain rows: library defaults; '(tuned)' rows: dev-set selection
            fns = {**fns, **{f"{m} (tuned)": fns[m] for m in tuned}}
            kwargs.update({f"{m} (tuned)": kw for m, kw in tuned.items()})
        else:
            kwargs.update(tuned)
        if tuned:
            print("dev-set-selected hyperparameters (Chang et al. A.7): "
                  + "; ".join(f"{m} {kw}" for m, kw in tuned.items()))
    return fns, {m: kw for m, kw in kwargs.items() if kw}


def run(args) -> int:
    import pandas as pd

    from ..benchmarks import DEFAULT_DEL_RATIOS, DEFAULT_INJ_RATIOS, del_benchmark, del_table, inj_benchmark, inj_table
    from ..models import load_model

    methods, kwargs = check_args(args)
    executor = make_executor(args)
    model = load_model(args.model, device=args.device)
    with pd.option_context("display.width", 200, "display.max_columns", 40, "display.float_format", "{:.2f}".format):
        if args.benchmark == "inj":
            ratios = args.ratio or list(DEFAULT_INJ_RATIOS)
            inj_kw = {} if args.lr is None else {"lr": args.lr}
            df = inj_benchmark(model, methods, n=args.n or 8, ratios=ratios, method_kwargs=kwargs,
                               max_steps=args.max_steps, cache_dir=args.cache_dir, executor=executor, **inj_kw)
            first = df.drop_duplicates(["seq_id", "ratio"])
            n_inj = first.groupby("ratio")["n_injected"].first().to_dict()
            print(f"INJ benchmark on {args.model}: {df['seq_id'].nunique()} sequences, injection ratios "
                  + ", ".join(f"{r:g} ({n} neurons)" for r, n in n_inj.items())
                  + f"; {int((~first['inj_converged']).sum())} of {len(first)} injections did not reach loss < 0.05; "
                  f"mean steps {first['inj_steps'].mean():.0f}")
            tables = {}
            for sel in ("per_layer", "across_layers"):
                t = inj_table(df, selection=sel)
                tables[sel] = t
                print(f"\nRecall@k x 100, top-k {'per layer (Table 2)' if sel == 'per_layer' else 'across layers (Table 6)'}:")
                print(t.to_string())
            write_json({"benchmark": "inj", "model": args.model, "rows": df.to_dict(orient="records"),
                        "tables": {k: v.reset_index().to_dict(orient="records") for k, v in tables.items()}},
                       args.json)
        else:
            ratios = args.ratio or list(DEFAULT_DEL_RATIOS)
            res = del_benchmark(model, methods, n_targets=args.n, set_size=args.set_size, ratios=ratios,
                                n_random=args.n_random, method_kwargs=kwargs, cache_dir=args.cache_dir,
                                executor=executor)
            t = del_table(res)
            shown = t.copy()
            shown.columns = pd.MultiIndex.from_tuples([(m, f"{r * 100:g}%") for m, r in t.columns],
                                                      names=["metric", "dropout"])
            print(f"DEL benchmark on {args.model}: {res.rows['target_id'].nunique()} targets, "
                  f"{len(res.ids)} memorized sequences, dropout ratios {ratios} per layer (bottom layer excluded); "
                  f"baseline acc {res.baseline['accuracy'].mean() * 100:.1f}%, rand-PPL {res.rand_ppl:.2f}\n")
            print(shown.to_string())
            flat = t.copy()
            flat.columns = [f"{m} @{r:g}" for m, r in flat.columns]
            write_json({"benchmark": "del", "model": args.model, "rows": res.rows.to_dict(orient="records"),
                        "table": flat.reset_index().to_dict(orient="records"),
                        "confusion": res.confusion_long().to_dict(orient="records"),
                        "baseline": res.baseline.to_dict(orient="records"), "rand_ppl": res.rand_ppl},
                       args.json)
    return 0
