"""The training script runs end to end on a tiny configuration (so it cannot rot)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def test_train_tiny_runs(tmp_path):
    spec = importlib.util.spec_from_file_location("train_tiny", ROOT / "scripts" / "train_tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "model"
    summary = mod.main(["--max-docs", "30", "--steps", "3", "--n-layer", "2", "--d-model", "32", "--n-head", "4",
                        "--d-mlp", "64", "--vocab-size", "400", "--n-windows", "20", "--max-count", "4",
                        "--batch-size", "4", "--out", str(out), "--threads", "1"])
    for f in ["model.safetensors", "config.json", "tokenizer.json", "paragraphs.safetensors", "paragraphs.csv",
              "training_log.json"]:
        assert (out / f).exists(), f
    files = load_file(str(out / "paragraphs.safetensors"))
    assert files["tokens"].shape == (20, 100)
    counts = files["counts"]
    assert (counts[:10] >= 1).all() and (counts[10:] == 0).all() and counts.max() <= 4
    assert files["unigram_counts"].sum() > 0
    assert json.loads((out / "training_log.json").read_text())["planted_em50"] == summary["planted_em50"]
    # deterministic: the same seed gives the same windows and counts
    spec.loader.exec_module(mod)
    out2 = tmp_path / "model2"
    mod.main(["--max-docs", "30", "--steps", "1", "--n-layer", "1", "--d-model", "32", "--n-head", "4",
              "--d-mlp", "64", "--vocab-size", "400", "--n-windows", "20", "--max-count", "4",
              "--batch-size", "4", "--out", str(out2), "--threads", "1"])
    files2 = load_file(str(out2 / "paragraphs.safetensors"))
    assert torch.equal(files["tokens"], files2["tokens"]) and torch.equal(files["counts"], files2["counts"])
