"""Models placed with ``device_map`` (memloc.placement, load_model(device_map=...)): offloaded
weights read block by block, analyses that write weights refused, results equal to a plain load."""

from __future__ import annotations

import logging

import pytest
import torch

import memloc
from benchmarks.placement import compare, device_map_for
from memloc import localize as loc
from memloc.placement import offloaded_modules, stacked_mlp_param

PREFIX = 50


@pytest.fixture(scope="module")
def offloaded(tmp_path_factory):
    """The embedded model with blocks 2-3 offloaded to disk (accelerate loads them per call)."""
    _, dmap = device_map_for("cpu-disk")
    return memloc.load_model("tiny", device_map=dmap, offload_folder=tmp_path_factory.mktemp("offload"))


@pytest.fixture(scope="module")
def seqs(tiny_paragraphs):
    order = tiny_paragraphs.table.sort_values("em_ref", kind="stable").index
    return tiny_paragraphs.tokens[list(order[-2:])], tiny_paragraphs.tokens[list(order[:4])]


@pytest.mark.parametrize("kwargs, match", [
    (dict(device="cpu", device_map="auto"), "device and device_map exclude each other"),
    (dict(device_map={"transformer.h.0": "disk"}), "offload_folder"),
    (dict(device_map="auto", process_weights=True), "process_weights"),
    (dict(max_memory={"cpu": "1GiB"}), "only apply with device_map"),
    (dict(device_map=["cpu"]), "device_map must be"),
])
def test_placement_arguments_checked_before_loading(kwargs, match):
    with pytest.raises(ValueError, match=match):
        memloc.load_model("tiny", **kwargs)


def test_offloaded_weights_read_block_by_block(tiny, offloaded):
    assert offloaded_modules(tiny) == []
    names = offloaded_modules(offloaded)
    assert any(n.startswith(("blocks.2.", "blocks.3.")) for n in names), names[:5]
    assert not any(n.startswith(("blocks.0.", "blocks.1.")) for n in names), names[:5]
    assert {p.device.type for p in offloaded.parameters()} == {"cpu", "meta"}
    for name in ("W_in", "W_out", "b_in", "b_out"):
        assert torch.equal(stacked_mlp_param(offloaded, name), getattr(tiny, name).detach()), name
    with pytest.raises(ValueError, match="W_in, W_out, b_in, b_out"):
        stacked_mlp_param(tiny, "W_Q")


def _results(model, tokens, caplog) -> dict:
    """The analyses compared between a plain and a placed model (IG last, its log records kept)."""
    seq = tokens[0]
    out = {
        "activations": loc.activations(model, seq, PREFIX),
        "zero_out": loc.zero_out(model, seq, PREFIX, layers=[3], neurons=range(64), progress_bar=False),
        "hard_concrete": loc.hard_concrete(model, seq, PREFIX, max_steps=5, progress_bar=False),
        "accuracy": memloc.teacher_forced_accuracy(model, tokens, PREFIX),
        "em": memloc.exact_match(model, tokens, PREFIX),
    }
    caplog.clear()
    out["ig"] = loc.integrated_gradients(model, seq, PREFIX, layers=[2, 3], positions=[60, 80], progress_bar=False)
    return out


def test_offloaded_model_gives_the_plain_results(tiny, offloaded, seqs, unchanged, caplog):
    tokens, _ = seqs
    with unchanged(offloaded), caplog.at_level(logging.INFO, logger="memloc"):
        got = _results(offloaded, tokens, caplog)
    # the direct IG path needs resident weights: a WARNING names the reason, kv_cache is taken
    assert any(r.levelno == logging.WARNING and "offloaded" in r.getMessage() for r in caplog.records)
    assert [getattr(r, "memloc_path", None) for r in caplog.records if hasattr(r, "memloc_path")] == ["kv_cache"]
    for name, w in _results(tiny, tokens, caplog).items():
        assert torch.allclose(got[name], w, atol=1e-6, rtol=1e-5, equal_nan=True), name
    assert torch.equal(stacked_mlp_param(offloaded, "W_out"), tiny.W_out.detach())  # the offloaded ones too
    assert torch.isfinite(got["zero_out"][3, :64]).all()


def test_weight_writing_analyses_refuse_an_offloaded_model(offloaded, seqs, unchanged):
    from memloc.benchmarks.injection import injected, sample_injection_mask
    from memloc.contrastive import contrastive_gradients
    from memloc.finetune import finetune_mask, sparse_finetune

    mp, nmp = seqs
    mask = sample_injection_mask(4, 1024, 0.01, seed=0)
    calls = {
        "parameter_gradients": lambda: memloc.gradients.parameter_gradients(offloaded, mp, PREFIX),
        "contrastive_gradients": lambda: contrastive_gradients(offloaded, mp, nmp, PREFIX),
        "finetune_mask": lambda: finetune_mask(offloaded, mp, nmp, PREFIX),
        "sparse_finetune": lambda: sparse_finetune(offloaded, mp, nmp, PREFIX, steps=1),
        "INJ": lambda: injected(offloaded, mp[:1], mask).__enter__(),
    }
    for what, call in calls.items():
        with unchanged(offloaded), pytest.raises(ValueError, match="offloaded"):
            call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on a lent GPU machine)")
def test_all_gpu_device_map_matches_a_plain_cuda_load():
    df = compare("cuda")
    assert set(df["outcome"]) == {"match"}, df[df["outcome"] != "match"].to_string()
    refused = compare("cuda-cpu")
    assert refused["outcome"].tolist() == ["refused at boot"]


def test_ray_model_spec_reboots_a_placed_model(offloaded):
    """Ray workers load the model from its ModelSpec: a device_map load is recorded and replayed."""
    from memloc.executors import ModelSpec

    spec = ModelSpec.from_model(offloaded)
    assert spec.device_map == device_map_for("cpu-disk")[1] and spec.offload_folder is not None
    again = spec.load()
    assert offloaded_modules(again) == offloaded_modules(offloaded)


def test_half_precision_offloaded_model_is_left_as_found(tmp_path, seqs, unchanged):
    """ZERO-OUT re-runs a bfloat16 model's later blocks in float32; on offloaded blocks accelerate
    replaces the weights it loads for the call, and they must come back in bfloat16 (they stayed
    float32 before: every later forward then failed with a dtype mismatch)."""
    _, dmap = device_map_for("cpu-disk")
    placed = memloc.load_model("tiny", device_map=dmap, offload_folder=tmp_path, dtype=torch.bfloat16)
    plain = memloc.load_model("tiny", dtype=torch.bfloat16)
    tokens, _ = seqs
    kw = dict(layers=[2], neurons=range(32), progress_bar=False)
    with unchanged(placed):
        got = loc.zero_out(placed, tokens[0], PREFIX, **kw)
    torch.testing.assert_close(got, loc.zero_out(plain, tokens[0], PREFIX, **kw), rtol=0, atol=0, equal_nan=True)
    assert torch.isfinite(got[2, :32]).all()
    assert {p.dtype for p in placed.parameters()} == {torch.bfloat16}
    assert torch.equal(memloc.teacher_forced_accuracy(placed, tokens, PREFIX),
                       memloc.teacher_forced_accuracy(plain, tokens, PREFIX))
