"""Acceptance of the shipped embedded model: planted memorization is ground truth."""

from __future__ import annotations

import json

import pytest
from scipy.stats import spearmanr

from memloc import memorization
from memloc.models import tiny_model_dir


@pytest.fixture(scope="module")
def measured(tiny, tiny_paragraphs):
    ps = tiny_paragraphs
    df = memorization(tiny, ps.tokens, ps.prefix_len, counts=ps.table["count"].to_numpy(), levenshtein=False,
                      batch_size=100)
    return df


def test_acceptance_counts(measured):
    assert (measured["em"] == 50).sum() >= 100
    assert (measured["em"] <= 10).sum() >= 100


def test_never_seen_paragraphs_are_not_memorized(measured):
    assert measured.loc[measured["count"] == 0, "em"].max() <= 10


def test_em_rises_with_duplication_count(measured):
    seen = measured[measured["count"] > 0]
    rho, p = spearmanr(seen["count"], seen["em"])
    assert rho > 0.5 and p < 1e-6
    bins = seen.groupby(seen["count"].clip(upper=64) // 8)["em"].mean()
    assert bins.iloc[-1] > bins.iloc[0]


def test_shipped_reference_metrics_match(measured, tiny_paragraphs):
    """paragraphs.csv records what the training script measured: the shipped weights reproduce it."""
    ref = tiny_paragraphs.table
    assert (measured["em"].to_numpy() == ref["em_ref"].to_numpy()).mean() > 0.99
    assert abs(measured["nll"] - ref["nll_ref"]).max() < 1e-3


def test_training_log_recorded():
    log = json.loads((tiny_model_dir() / "training_log.json").read_text())
    assert log["loss_curve"][-1]["loss"] < log["loss_curve"][0]["loss"]
    assert log["validation_perplexity"] > 1
