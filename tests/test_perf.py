"""``memloc perf`` (memloc.perf): ships in the package (no import of tests/), and its dtype
comparison columns are computed as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memloc import perf


def test_perf_imports_without_tests_or_checkout(tmp_path):
    """Imported from another directory, memloc.perf and the reference loops load no ``tests`` or
    ``benchmarks`` module."""
    code = ("import sys, memloc.perf, memloc.commands.perf, memloc.localize.reference; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tests', 'benchmarks')); "
            "assert not bad, bad; print('ok')")
    root = Path(perf.__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    assert not (root / "tests" / "reference_localize.py").exists()


def test_compare_dtypes_columns():
    rows = [dict(method="zero_out", model="m", dtype="float32", speedup=4.0),
            dict(method="zero_out", model="m", dtype="bfloat16", speedup=3.0),
            dict(method="integrated_gradients", model="m", dtype="float32", speedup=10.0),
            dict(method="integrated_gradients", model="m", dtype="bfloat16", speedup=9.0),
            dict(method="activations", model="m", dtype="float32", speedup=float("nan")),
            dict(method="activations", model="m", dtype="bfloat16", speedup=float("nan")),
            dict(method="slimming", model="m", dtype="bfloat16", speedup=1.0)]
    a = torch.arange(10.0)
    f32 = {"zero_out": a, "zero_out_reference": a, "integrated_gradients": a, "activations": a}
    bf16 = {"zero_out": a.flip(0), "zero_out_reference": a, "integrated_gradients": a ** 2,
            "activations": torch.tensor([0., 1, 2, 3, 4, 5, 6, 7, 9, 8])}
    perf._compare_dtypes(rows, {("m", "float32"): f32, ("m", "bfloat16"): bf16})
    zo, ig, act = rows[1], rows[3], rows[5]
    assert zo["speedup_over_fp32"] == pytest.approx(0.75) and zo["spearman_vs_fp32"] == pytest.approx(-1.0)
    assert zo["reference_spearman_vs_fp32"] == pytest.approx(1.0) and zo["target_met"] is False
    assert ig["speedup_over_fp32"] == pytest.approx(0.9) and ig["spearman_vs_fp32"] == pytest.approx(1.0)
    assert ig["target_met"] is True
    # one swapped pair of 10: rho = 1 - 6*2 / (10*99)
    assert act["spearman_vs_fp32"] == pytest.approx(1 - 12 / 990) and act["target_met"] is False
    assert "speedup_over_fp32" not in act and "target_met" not in rows[6] and "target_met" not in rows[0]


def test_run_perf_bad_arguments():
    with pytest.raises(ValueError, match="models"):
        perf.run_perf(["gpt-j"])
    with pytest.raises(ValueError, match="dtypes"):
        perf.run_perf(["tiny"], dtypes=["int8"])


def test_extrapolated_seconds_counts_the_fixed_cost_once():
    from memloc.perf import extrapolated_seconds

    # 2 s fixed + 0.5 s per unit: 4 s for 4 units, 6 s for 8, hence 2 + 0.5 * 64 = 34 s for 64
    assert extrapolated_seconds(4.0, 4, 6.0, 8, 64) == 34.0
    assert extrapolated_seconds(4.0, 4, 6.0, 8, 8) == 6.0           # nothing to extrapolate
    assert extrapolated_seconds(6.0, 4, 5.0, 8, 64) == 5.0 * 64 / 8  # noise: proportional fallback
