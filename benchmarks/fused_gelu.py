# python benchmarks/fused_gelu.py > benchmarks/results/fused_gelu.txt
"""``load_model(fused_gelu=True)`` (the default) against Hugging Face's ``gelu_new`` module
(``fused_gelu=False``) on the embedded model, on the three workloads that dominate a default
``memloc reproduce``: exact ZERO-OUT of one DEL target (Chang et al. Eq. 7, layers 1-3), one sparse
fine-tuning run (Stoehr Fig. 5, top 0.1 %, 10 steps) and teacher forcing + greedy decoding of 256
perturbed-size prefixes (Stoehr Fig. 3).  2 torch threads; the two models alternate, median of 3;
the CPU steal of the run (``memloc.reproduce.runner.cpu_steal_counter``) is printed because a shared VM's steal moves wall times
far more than run-to-run noise."""
import statistics
import time

import torch

torch.set_num_threads(2)
from memloc import load_model  # noqa: E402
from memloc.data import load_paragraphs  # noqa: E402
from memloc.finetune import sparse_finetune  # noqa: E402
from memloc.localize import zero_out  # noqa: E402
from memloc.metrics import greedy_decode, teacher_forced  # noqa: E402
from memloc.reproduce.runner import cpu_steal_counter as steal  # noqa: E402

ps = load_paragraphs("tiny")
p = ps.prefix_len
x = ps.tokens[:256]
models = {"fused (default)": load_model("tiny"), "gelu_new": load_model("tiny", fused_gelu=False)}
work = {
    "ZERO-OUT, one 100-token target, layers 1-3": lambda m: zero_out(m, x[:1], p, layers=[1, 2, 3],
                                                                       progress_bar=False),
    "sparse fine-tuning, 16 MPs + 32 NMPs, 10 steps": lambda m: sparse_finetune(
        m, x[:16], x[16:48], p, steps=10, progress_bar=False),
    "teacher forcing + greedy decoding, 256 prefixes": lambda m: (
        teacher_forced(m, x, p), greedy_decode(m, x[:, :p], x.shape[1] - p)),
}
s0, t0 = steal()
for name, fn in work.items():
    times = {k: [] for k in models}
    for _ in range(3):
        for k, m in models.items():
            t = time.perf_counter()
            fn(m)
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{name}: " + ", ".join(f"{k} {v:.2f} s" for k, v in med.items())
          + f"; gelu_new / fused = {med['gelu_new'] / med['fused (default)']:.2f}x")
s1, t1 = steal()
print(f"CPU steal during the run: {100 * (s1 - s0) / max(1, t1 - t0):.1f}%")
