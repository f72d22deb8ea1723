# python benchmarks/reproduce_mask_stop.py [CACHE_OF_A_FULL_RUN] > benchmarks/results/reproduce_mask_stop.txt
"""The INJ and DEL stages of the default ``memloc reproduce`` on the embedded model under three mask
settings, timed in one session: the tuned λ / lr with the authors' stop only (``stop_mask_mean=None``,
the default before 2026-11-28), the tuned λ / lr with the library's 0.4 stop
(``Settings.stop_mask_mean``, now the default), and the library defaults (no tuned values).

Only the mask trainings and the DEL evaluations differ between the variants, so each variant starts
from the same cache holding the memorization split and every other method's scores and injections,
copied from a full run's cache (argument; default ``.memloc_cache``): the times are those of the
mask trainings (INJ) and of the mask trainings plus all 90 DEL evaluations (DEL).  2 torch threads.
Prints the stage times and the verdict of every INJ / DEL claim per variant."""
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

torch.set_num_threads(2)
import memloc  # noqa: E402
from memloc.reproduce import context as C  # noqa: E402
from memloc.reproduce import reproduce  # noqa: E402

SOURCE = Path(sys.argv[1] if len(sys.argv) > 1 else ".memloc_cache")
SHARED = ["reproduce/memorization", "scores/zero_out", "scores/integrated_gradients", "scores/activations",
          "scores/random", "scores/inj_injection"]
tuning = C._tuning


def variant_tuning(name):
    def patched(profile, paragraphs, stages, notes):
        tuned, dev = tuning(profile, paragraphs, stages, notes)
        if name == "defaults":
            tuned = {m: {"max_steps": kw["max_steps"]} for m, kw in tuned.items()}
        return tuned, dev
    return patched


model = memloc.load_model("tiny")
rows = []
for name, stop in (("tuned, authors' stop", None), ("tuned + stop 0.4", 0.4), ("defaults", 0.4)):
    with tempfile.TemporaryDirectory() as tmp:
        for sub in SHARED:
            shutil.copytree(SOURCE / sub, Path(tmp) / "cache" / sub)
        C._tuning = variant_tuning(name)
        settings = memloc.reproduce.Settings(stop_mask_mean=stop)
        t = time.perf_counter()
        res = reproduce(model, Path(tmp) / "out", settings=settings, stages=["inj", "del"], cache_dir=Path(tmp) / "cache",
                        png=False, progress_bar=False)
        claims = res.claims.set_index("id")
        rows.append((name, res.timings["inj"], res.timings["del"],
                     {i: (claims.loc[i, "verdict"], claims.loc[i, "statistic"]) for i in claims.index
                      if i.startswith(("inj_", "del_", "not_seq"))}))
C._tuning = tuning
for name, inj, dele, claims in rows:
    print(f"== {name}: INJ mask trainings {inj:.1f} s, DEL mask trainings + evaluations {dele:.1f} s")
    for i, (verdict, stat) in claims.items():
        print(f"   {i}: {verdict} -- {stat}")
same = all(r[3][i][0] == rows[0][3][i][0] for r in rows for i in rows[0][3])
print("every INJ/DEL verdict the same in all variants:", same)
