# OMP_NUM_THREADS=1 python benchmarks/del_heldout.py > benchmarks/results/del_defaults_vs_tuned_heldout.txt
"""Held-out check of the 0.4 stop rule: DEL at 10 %/layer on targets 5-14 of the same 40-sequence set
(the rule was chosen on targets 0-4): library defaults vs the dev-set-tuned settings."""
import time
import torch
torch.set_num_threads(1)
import memloc
from memloc.benchmarks import del_benchmark, del_table
from memloc.data import tuned_hyperparameters
from memloc.localize import hard_concrete, slimming, random_scores
model = memloc.load_model()
tuned = tuned_hyperparameters("tiny")
fns = {"hard_concrete": hard_concrete, "hard_concrete (tuned)": hard_concrete, "slimming": slimming,
       "slimming (tuned)": slimming, "random": random_scores}
kw = {"hard_concrete": {"progress_bar": False}, "slimming": {"progress_bar": False},
      "hard_concrete (tuned)": {**tuned["hard_concrete"], "progress_bar": False},
      "slimming (tuned)": {**tuned["slimming"], "progress_bar": False}}
t0 = time.time()
res = del_benchmark(model, fns, set_size=40, targets=list(range(5, 15)), ratios=[0.1], n_random=16, method_kwargs=kw,
                    cache_dir=".memloc_cache", progress_bar=False)
t = del_table(res)
print(t.to_string())
print(f"{time.time()-t0:.0f} s")
res.rows.to_csv("benchmarks/results/del_defaults_vs_tuned_heldout.csv", index=False)
