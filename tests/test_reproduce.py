"""The reproduction pipeline (memloc.reproduce / ``memloc reproduce``).

* On the embedded model, with reduced quick settings: every stage runs, writes its figures
  (HTML + PNG) and CSV tables, and REPORT.md states findings that agree with the written tables;
  the model is left exactly as found; a rerun is served from the cache.
* On a random-weight GPT-Neo with GPT-2's vocabulary (so the bundled GPT-Neo-125M paragraph sets
  are chosen automatically): nothing is memorized, so the stages that need memorized paragraphs
  are skipped with a note and the others run.
* Bad input fails with ValueError before any work; an exception inside a stage leaves the model
  unchanged.
"""

from __future__ import annotations

import dataclasses
import re
import shutil

import pandas as pd
import pytest
import torch

from memloc import cli
from memloc.data import default_paragraphs, select_groups
from memloc.reproduce import QUICK, STAGES, Settings, reproduce

# even smaller than --quick: the test budget is about a minute on 2 cores
TINY_SETTINGS = dataclasses.replace(
    QUICK, max_paragraphs=60, n_mp=4, n_nmp=4, n_perturb=1, n_finetune=2, finetune_steps=1,
    finetune_masks=("top", "random"), inj_n=1, inj_ratios=(0.01,), inj_max_steps=60, del_set_size=4, del_targets=1,
    del_ratios=(0.1,), methods=("integrated_gradients", "activations", "random"), mask_steps=10, ig_steps=2,
    n_patching=1)
HAVE_CHROMIUM = shutil.which("chromium") is not None or shutil.which("google-chrome") is not None


@pytest.fixture(scope="module")
def tiny_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("figures")
    cache = tmp_path_factory.mktemp("cache")
    from tests.conftest import assert_same_state, model_state

    before = model_state(tiny)
    # PNG export (a headless Chromium per figure) is tested once in test_png_export below
    res = reproduce(tiny, out, settings=TINY_SETTINGS, cache_dir=cache, model_name="tiny", png=False,
                    progress_bar=False)
    assert_same_state(tiny, before)
    return res, out, cache


def test_every_stage_runs_and_writes(tiny_run):
    res, out, _ = tiny_run
    assert not res.skipped, res.skipped
    assert set(res.findings) == set(STAGES)
    for stage in STAGES:
        files = res.figures.get(stage, [])
        assert any(p.suffix == ".html" for p in files), stage
        assert all(p.exists() and p.parent == out for p in files)
    for name in ("memorization", "perturbation_by_position", "param_gradients_mp_vs_nmp", "contrastive_gradients",
                 "sparse_finetune", "memorization_heads", "rare_token_correlation", "inj_table2", "del_table3",
                 "del_confusion", "activation_patching"):
        assert (out / f"{name}.csv").exists(), name


@pytest.mark.skipif(not HAVE_CHROMIUM, reason="no Chromium for static export (`make browser` installs it)")
def test_png_export_and_report_links(tiny, tmp_path, unchanged):
    settings = dataclasses.replace(TINY_SETTINGS, max_paragraphs=20)
    with unchanged(tiny):
        res = reproduce(tiny, tmp_path, settings=settings, cache_dir=None, stages=["memorization"],
                        progress_bar=False)
    pngs = [p for p in res.figures["memorization"] if p.suffix == ".png"]
    assert len(pngs) == 2  # split and duplication-count colourings
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![{p.stem}]({p.name})" in res.report.read_text()


def test_png_failure_falls_back_to_html_with_a_note(tiny, tmp_path, monkeypatch):
    import plotly.graph_objects as go

    def no_browser(*a, **k):
        raise FileNotFoundError("chromium not found")

    monkeypatch.setattr(go.Figure, "write_image", no_browser)
    settings = dataclasses.replace(TINY_SETTINGS, max_paragraphs=20)
    res = reproduce(tiny, tmp_path, settings=settings, cache_dir=None, stages=["memorization"], progress_bar=False)
    assert [p.suffix for p in res.figures["memorization"]] == [".html", ".html"]
    report = res.report.read_text()
    assert "PNG export failed" in report and "make browser" in report


def test_report_findings_are_computed_from_the_tables(tiny_run, tiny_paragraphs):
    res, out, _ = tiny_run
    report = (out / "REPORT.md").read_text()
    mem = pd.read_csv(out / "memorization.csv")
    assert len(mem) == 60
    # memorization split: the counts in the report are those of the table, and agree with the
    # embedded set's reference EM (measured when the model was shipped)
    n_mp = int((mem["split"] == "memorized").sum())
    n_nmp = int((mem["split"] == "non-memorized").sum())
    assert f"{n_mp} memorized (EM = 50)" in report and f"{n_nmp} non-memorized (EM <= 10)" in report
    ref = tiny_paragraphs.table.set_index("id").loc[mem["id"], "em_ref"].to_numpy()
    assert (mem["em"].to_numpy() == ref).mean() > 0.95
    assert n_mp > 0 and n_nmp > 0
    # the memorization head of the report is the best-ranked head of the table
    heads = pd.read_csv(out / "memorization_heads.csv")
    head = f"L{int(heads.layer[0])}H{int(heads['head'][0])}"
    assert res.summary["memorization_head"] == head
    assert f"memorization head: {head}" in report
    # the contrastive top component is the largest value of its table
    c = pd.read_csv(out / "contrastive_gradients.csv").sort_values("value", ascending=False).iloc[0]
    assert f"top component of the contrastive gradient: L{int(c.layer)} {c.component}" in report
    # the best INJ method is the one with the largest Recall@r
    inj = pd.read_csv(out / "inj_table2.csv")
    top = inj["R@1r"].max()
    names = res.summary["inj_best"].split(" (")[0].split(" = ")
    assert set(names) == set(inj.loc[inj["R@1r"].map("{:.0f}".format) == f"{top:.0f}", "method"])
    assert f"best INJ method (Recall@r, per layer): {res.summary['inj_best']}" in report
    # every figure is linked from the report
    for stage in STAGES:
        for p in res.figures[stage]:
            assert f"({p.name})" in report, p.name
    assert set(re.findall(r"^## ", report, re.M)) and "Skipped" not in report


def test_rerun_is_served_from_the_cache(tiny, tiny_run, tmp_path, monkeypatch, unchanged):
    _, out, cache = tiny_run
    import memloc.contrastive
    import memloc.metrics
    import memloc.perturb

    def boom(*a, **k):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(memloc.metrics, "memorization", boom)
    monkeypatch.setattr(memloc.perturb, "perturbation_profile", boom)
    monkeypatch.setattr(memloc.contrastive, "sparse_finetune", boom)
    with unchanged(tiny):
        res = reproduce(tiny, tmp_path, settings=TINY_SETTINGS, cache_dir=cache, png=False, progress_bar=False,
                        stages=["perturbation", "finetune"])
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "memorization.csv"), pd.read_csv(out / "memorization.csv"))
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "sparse_finetune.csv"),
                                  pd.read_csv(out / "sparse_finetune.csv"))
    assert res.skipped["inj"] == "not requested (--stages)"


def test_exception_inside_a_stage_leaves_the_model_unchanged(tiny, tmp_path, monkeypatch, unchanged):
    import memloc.contrastive

    def fail(model, *a, **k):
        for p in model.parameters():  # mess with the model, then fail
            p.requires_grad_(False)
        model.train()
        raise RuntimeError("stage failed")

    monkeypatch.setattr(memloc.contrastive, "contrastive_gradients", fail)
    settings = dataclasses.replace(TINY_SETTINGS, max_paragraphs=30)
    with unchanged(tiny):
        with pytest.raises(RuntimeError, match="stage failed"):
            reproduce(tiny, tmp_path, settings=settings, cache_dir=None, png=False, progress_bar=False,
                      stages=["contrastive"])


def test_bad_input_fails_before_work(tiny, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="stages"):
        reproduce(tiny, tmp_path / "a", stages=["bogus"])
    with pytest.raises(ValueError, match="settings"):
        reproduce(tiny, tmp_path / "b", settings={"n_mp": 3})
    with pytest.raises(ValueError, match="settings.n_mp"):
        reproduce(tiny, tmp_path / "c", settings=Settings(n_mp=0))
    with pytest.raises(ValueError, match="paragraphs"):
        reproduce(tiny, tmp_path / "d", paragraphs=torch.zeros(2, 100, dtype=torch.long))
    with pytest.raises(ValueError, match="non_memorized_max_em"):
        reproduce(tiny, tmp_path / "h", non_memorized_max_em=50)
    with pytest.raises(ValueError, match="frequencies"):
        reproduce(tiny, tmp_path / "i", frequencies=torch.ones(10))
    with pytest.raises(ValueError, match="settings.stop_mask_mean must be a finite number in \\(0, 1\\)"):
        reproduce(tiny, tmp_path / "j", settings=Settings(stop_mask_mean=0.0))
    with pytest.raises(ValueError, match="settings.stop_mask_mean .* below HARD CONCRETE's mask_init"):
        reproduce(tiny, tmp_path / "k", settings=Settings(stop_mask_mean=0.6))
    for d in "acdhijk":
        assert not (tmp_path / d).exists()
    assert cli.main(["reproduce", "--model", "tiny", "--out", str(tmp_path / "e"), "--max-paragraphs", "0"]) == 2
    assert cli.main(["reproduce", "--model", "tiny", "--out", str(tmp_path / "f"), "--threads", "0"]) == 2
    # `memloc demo` runs this pipeline on the embedded model
    from memloc.commands import demo, reproduce as reproduce_cmd

    args = cli.build_parser().parse_args(["demo", "--quick", "--out", str(tmp_path / "g")])
    assert args.run is demo.run and args.quick
    seen = {}
    monkeypatch.setattr(reproduce_cmd, "run", lambda ns: seen.setdefault("ns", ns) and 0)
    assert demo.run(args) == 0
    assert seen["ns"].model == "tiny" and seen["ns"].out == str(tmp_path / "g") and seen["ns"].quick
    assert cli.build_parser().parse_args(["demo"]).out == "memloc-demo"


def test_select_groups_and_default_paragraphs(tiny):
    df = pd.DataFrame({"split": ["memorized", "non-memorized", "partial", "memorized", "non-memorized"]})
    mp, nmp = select_groups(df, 5, 1)
    assert mp.tolist() == [0, 3] and nmp.tolist() == [1]
    ps, max_em, note = default_paragraphs(tiny)
    assert ps.name == "tiny" and max_em == 10 and len(ps) == 600


@pytest.fixture(scope="module")
def neo_vocab_dir(tmp_path_factory):
    """A small random GPT-Neo with GPT-2's vocabulary (50257), like GPT-Neo 125M but fast."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    from tests.factories import _save

    torch.manual_seed(0)
    cfg = GPTNeoConfig(vocab_size=50257, max_position_embeddings=128, hidden_size=32, num_layers=2, num_heads=2,
                       intermediate_size=64, window_size=32, attention_types=[[["global", "local"], 1]])
    return _save(GPTNeoForCausalLM(cfg), tmp_path_factory.mktemp("neo50257"))


def test_random_gpt_neo_vocab_model_degrades_gracefully(neo_vocab_dir, tmp_path, capsys):
    out = tmp_path / "neo"
    rc = cli.main(["-q", "reproduce", "--model", str(neo_vocab_dir), "--out", str(out), "--quick", "--no-cache",
                   "--no-png", "--max-paragraphs", "12", "--batch-size", "16",  # INJ is covered on the tiny model
                   "--stages", *[st for st in STAGES if st != "inj"]])
    assert rc == 0
    report = (out / "REPORT.md").read_text()
    assert "GPT-Neo-125M paragraph sets" in report and "NMP = measured EM <= 29" in report
    assert "no paragraph is memorized" in report
    from memloc.reproduce import _TITLES

    sections = {title: body for title, body in re.findall(r"^## (.+?)\n(.*?)(?=^## |\Z)", report, re.M | re.S)}
    printed = capsys.readouterr().out
    for stage in STAGES:
        body = sections[_TITLES[stage]]
        if stage == "inj":
            assert "*Skipped:* not requested" in body
        elif stage in ("contrastive", "finetune", "del", "patching"):
            assert "*Skipped:*" in body and f"[{stage}] skipped" in printed, stage
        else:
            assert "**Finding:**" in body and "*Skipped:*" not in body, stage
    mem = pd.read_csv(out / "memorization.csv")
    assert len(mem) == 12 and set(mem["set"]) <= {"gpt-neo-125m", "gpt-neo-125m-em30-49", "gpt-neo-125m-em11-29"}
    assert (mem["split"] != "memorized").all()
    for name in ("perturbation_by_position", "param_gradients_em_bins", "memorization_heads",
                 "rare_token_correlation"):
        assert (out / f"{name}.csv").exists(), name
    assert (out / "fig7_rare_token_attention.html").exists()


def test_del_leaves_out_the_tuning_dev_set(tiny, tmp_path, monkeypatch):
    # on the embedded model INJ/DEL use the dev-selected mask hyperparameters (Chang A.7) and the
    # DEL set must not contain the dev paragraphs they were selected on
    import memloc.data

    settings = dataclasses.replace(TINY_SETTINGS, max_paragraphs=60, del_set_size=100,
                                   methods=("activations", "random"))
    first = reproduce(tiny, tmp_path / "a", settings=settings, cache_dir=None, png=False, progress_bar=False,
                      stages=["memorization", "del"])
    ids = set(pd.read_csv(tmp_path / "a" / "del_confusion.csv")["seq_id"])
    assert len(ids) >= 4
    assert "dev-set selection" in first.report.read_text()
    dev = sorted(ids)[:2]
    monkeypatch.setattr(memloc.data, "tuning_dev_ids", lambda name="tiny": dev)
    reproduce(tiny, tmp_path / "b", settings=settings, cache_dir=None, png=False, progress_bar=False,
              stages=["memorization", "del"])
    assert set(pd.read_csv(tmp_path / "b" / "del_confusion.csv")["seq_id"]) == ids - set(dev)


def test_rerun_writes_the_same_bytes(tiny, tiny_run, tmp_path):
    """Issue 12 finding 1: rerunning rewrote the tracked gallery (float digits, stage times in the
    report).  A cached rerun and an uncached recompute write byte-identical CSVs and REPORT.md;
    stage times go to timings.json only."""
    import json

    res, out, cache = tiny_run
    reproduce(tiny, tmp_path / "again", settings=TINY_SETTINGS, cache_dir=cache, model_name="tiny", png=False,
              progress_bar=False)
    written = sorted(p.name for p in out.iterdir() if p.suffix in (".csv", ".md"))
    assert "REPORT.md" in written and len(written) > 10
    assert written == sorted(p.name for p in (tmp_path / "again").iterdir() if p.suffix in (".csv", ".md"))
    for name in written:
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    timings = json.loads((tmp_path / "again" / "timings.json").read_text())
    assert set(timings["seconds"]) == set(STAGES)
    assert timings["cpu_steal_percent"] is None or 0 <= timings["cpu_steal_percent"] <= 100
    assert not re.search(r"\d s\b|seconds", (out / "REPORT.md").read_text())
    # recomputed without the cache, the cheap stages write the same bytes
    reproduce(tiny, tmp_path / "fresh", settings=TINY_SETTINGS, cache_dir=None, model_name="tiny", png=False,
              progress_bar=False, stages=["perturbation", "gradients"], timings_path=tmp_path / "t.json")
    assert (tmp_path / "t.json").exists() and not (tmp_path / "fresh" / "timings.json").exists()
    for name in ("memorization.csv", "perturbation_profile.csv", "perturbation_by_position.csv", "pmps.csv",
                 "param_gradients_mp_vs_nmp.csv", "param_gradients_em_bins.csv", "attention_vs_mlp_totals.csv"):
        assert (out / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name


def test_last_console_line_names_cpu_steal(monkeypatch, caplog):
    """A run slowed by a shared VM's host says so: the CPU steal since the clock started (psutil's
    counters, here simulated: 30 of 100 CPU seconds stolen) is named on the last line from 5 %."""
    import collections
    import logging

    import psutil

    from memloc.reproduce import StageClock

    times = iter([(0.0, 100.0), (30.0, 200.0), (30.0, 200.0)])

    def cpu_times():
        steal, total = next(times)
        return collections.namedtuple("scputimes", "user system idle steal")(total - steal, 0.0, 0.0, steal)

    monkeypatch.setattr(psutil, "cpu_times", cpu_times)
    with caplog.at_level(logging.INFO, logger="memloc.reproduce"):
        clock = StageClock(["a"], expected={"a": 10})
        clock.end("a", 12.0)
    assert "CPU steal 30%" in caplog.records[-1].getMessage()
    assert clock.steal_percent() == pytest.approx(30.0)


def test_demo_writes_outside_the_tracked_tree():
    """Issue 12 finding 1: `make demo` must leave `git status` clean: its default output directory
    (and the gallery's timings file) are git-ignored and untracked; only `make gallery` writes figures/."""
    import subprocess
    from pathlib import Path

    args = cli.build_parser().parse_args(["demo"])
    assert args.out != "figures" and cli.build_parser().parse_args(["reproduce"]).out != "figures"
    repo = Path(__file__).resolve().parents[1]
    makefile = (repo / "Makefile").read_text()
    demo_recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert "figures" not in demo_recipe
    assert "--out figures" in re.search(r"^gallery:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    if shutil.which("git") is None or not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    for path in (f"{args.out}/REPORT.md", f"{args.out}/memorization.csv", "memloc-out/REPORT.md",
                 "figures/timings.json"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=repo).returncode == 0, path
    tracked = subprocess.run(["git", "ls-files", args.out, "memloc-out"], cwd=repo, capture_output=True,
                             text=True).stdout
    assert tracked == ""


def test_console_line_per_stage_with_an_estimate(tiny, tmp_path, caplog, monkeypatch):
    """Issue 12 finding 2: one line per stage, `[i/n] stage … 10 s`, with what is left."""
    import logging

    from memloc.reproduce import StageClock, fmt_duration

    assert (fmt_duration(9.6), fmt_duration(185)) == ("10 s", "3 min 05 s")
    # no steal counted (a busy VM's real counters could put steal on the last line)
    monkeypatch.setattr("memloc.reproduce.runner.cpu_steal_counter", lambda: (0.0, 100.0))
    with caplog.at_level(logging.INFO, logger="memloc.reproduce"):
        clock = StageClock(["a", "b", "c"], expected={"a": 10, "b": 30, "c": 10})
        clock.end("a", 5.0)  # half the typical time: the 40 s left are scaled to 20 s
        clock.end("b", 0.0, "skipped: why")
        clock.end("c", 2.0)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[1] == "[1/3] a … 5 s (about 20 s left)"
    assert lines[2].startswith("[2/3] b … 0 s, skipped: why (about ")
    assert lines[3].startswith("[3/3] c … 2 s (done in ") and "steal" not in lines[3]
    caplog.clear()
    settings = dataclasses.replace(TINY_SETTINGS, max_paragraphs=12)
    with caplog.at_level(logging.INFO, logger="memloc.reproduce"):
        reproduce(tiny, tmp_path, settings=settings, cache_dir=None, png=False, progress_bar=False,
                  stages=["memorization", "patching"])
    done = [r.getMessage() for r in caplog.records if re.match(r"\[\d/\d\] \w+ … \d+ s", r.getMessage())]
    # patching requires the PMPs of the perturbation stage, which the runner adds
    assert [d.split(" … ")[0] for d in done] == ["[1/3] memorization", "[2/3] perturbation", "[3/3] patching"]


@pytest.mark.slow
def test_quiet_flag_silences_the_stage_lines(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "memloc.cli", "{q}", "reproduce", "--out", str(tmp_path / "o"), "--no-cache",
           "--no-png", "--quick", "--max-paragraphs", "8", "--stages", "memorization"]
    loud = subprocess.run([c for c in cmd if c != "{q}"], cwd=repo, env=env, capture_output=True, text=True)
    quiet = subprocess.run([c.replace("{q}", "-q") for c in cmd], cwd=repo, env=env, capture_output=True, text=True)
    assert loud.returncode == quiet.returncode == 0, loud.stderr + quiet.stderr
    assert "[1/1] memorization … " in loud.stderr and "[1/1]" not in quiet.stderr


def test_unknown_tokenizer_skips_paragraph_stages_with_a_reason(tmp_path, unchanged):
    """A model whose vocabulary matches no bundled paragraph set (e.g. SmolLM2's 49,152) gets no
    crash: the paragraph stages are skipped with the reason, the claims are `not applicable`."""
    from memloc.data import bundled_profile
    from memloc.models import load_model
    from tests.factories import build_random_model

    model = load_model(build_random_model("llama", tmp_path / "llama"))
    assert bundled_profile(model) is None
    with pytest.raises(ValueError, match="no bundled paragraph set"):
        default_paragraphs(model)
    with unchanged(model):
        res = reproduce(model, tmp_path / "out", cache_dir=tmp_path / "cache", png=False, progress_bar=False,
                        stages=["rare_tokens", "patching"])
    assert "no bundled paragraph set fits this model's vocabulary (512 tokens)" in res.skipped["memorization"]
    for stage in ("perturbation", "head", "rare_tokens", "patching"):
        assert res.skipped[stage].startswith("needs the memorization stage, which was skipped"), stage
    assert res.skipped["inj"] == "not requested (--stages)"
    assert set(res.claims["verdict"]) == {"not applicable"}
    report = res.report.read_text()
    assert "## Claims ledger" in report and "pass paragraphs=" in report


def test_claims_ledger_opens_the_report(tiny_run):
    """Issue 13 §2: REPORT.md opens with the claims ledger (also claims.csv); every claim is there,
    its numbers are those of the written tables, and a claim whose stages ran is not `not applicable`
    unless it says why."""
    from memloc.reproduce.claims import CLAIMS, DOES_NOT_HOLD, HOLDS, NOT_APPLICABLE

    res, out, _ = tiny_run
    ledger = pd.read_csv(out / "claims.csv")
    ledger[["statistic", "reason"]] = ledger[["statistic", "reason"]].fillna("")
    assert list(ledger["id"]) == [c.id for c in CLAIMS]
    assert set(ledger["verdict"]) <= {HOLDS, DOES_NOT_HOLD, NOT_APPLICABLE}
    report = (out / "REPORT.md").read_text()
    assert report.index("## Claims ledger") < report.index("## Headline") < report.index("## Memorized")
    for row in ledger.itertuples():
        assert f"| {row.claim} |" in report
        assert (row.verdict == NOT_APPLICABLE) == bool(row.reason), row.id
    by_id = ledger.set_index("id")
    # TINY_SETTINGS has IG, ACTIVATIONS and RANDOM: the ranking and the RANDOM baselines are testable
    for claim in ("perturbation_robust", "lower_layer_gradients", "top_contrastive_low_wv",
                  "head_attends_rare_tokens", "sparse_unlearning_beats_random", "inj_above_random", "inj_ranking"):
        assert by_id.loc[claim, "verdict"] != NOT_APPLICABLE, (claim, by_id.loc[claim, "reason"])
    # the lower-layer share difference is the one of the written gradient table (layers 0-1 of 4)
    g = pd.read_csv(out / "param_gradients_mp_vs_nmp.csv")
    lay = g.groupby(["group", "layer"])["value"].sum().unstack("layer")
    low = (lay[[0, 1]].sum(axis=1) / lay.sum(axis=1))
    assert abs(by_id.loc["lower_layer_gradients", "value"] - (low["MP"] - low["NMP"])) < 1e-4
    assert (by_id.loc["lower_layer_gradients", "verdict"] == HOLDS) == (low["MP"] - low["NMP"] >= 0.02)
    # the perturbation ratio is the one of the written per-position table
    p = pd.read_csv(out / "perturbation_by_position.csv").groupby("group")["mean"].mean()
    assert abs(by_id.loc["perturbation_robust", "value"] - p["memorized"] / p["non-memorized"]) < 1e-4
    pd.testing.assert_frame_equal(res.claims.drop(columns="value"), ledger.drop(columns="value"), check_dtype=False)


def test_bundled_profile_is_the_one_answer(tiny):
    """Issue 13 §1: one function says which bundled profile a model is; every choice of tuned
    settings, paragraph set, corpus counts and held-out text goes through it."""
    from pathlib import Path
    from types import SimpleNamespace
    from unittest.mock import MagicMock

    from transformer_lens.model_bridge import TransformerBridge

    from memloc.data import PROFILES, bundled_profile

    def bridge(d_vocab: int) -> MagicMock:
        """A TransformerBridge (to the runtime type check) with only a vocabulary size: no 125M-parameter model."""
        m = MagicMock(spec=TransformerBridge)
        m.cfg = SimpleNamespace(d_vocab=d_vocab)
        return m

    assert bundled_profile(tiny) is PROFILES["tiny"]
    assert bundled_profile(bridge(50257)) is PROFILES["gpt-neo-125m"]
    smol = bridge(49152)
    assert bundled_profile(smol) is None
    with pytest.raises(ValueError, match="49152 tokens.*pass --paragraphs"):
        bundled_profile(smol, required="pass --paragraphs")
    with pytest.raises(ValueError, match="model must be"):
        bundled_profile(object())
    # no module decides by the vocabulary size itself any more
    root = Path(__file__).resolve().parents[1] / "memloc"
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py") if p.name != "data.py"
                 and re.search(r"d_vocab\)?\s*(==|in)\s*\(?(4096|50257)", p.read_text())]
    assert offenders == []


def _failing_compute(ctx, inputs):
    raise ValueError("boom in a worker")


def test_stage_plan_is_list_scheduling_with_the_shortest_makespan():
    """The parallel runner's plan: a hand-computed makespan, and on the default run's stage times
    (the embedded model) the chosen order comes within 1 % of the bound, where the critical-path
    order queues fine-tuning behind INJ."""
    from memloc.reproduce.parallel import plan_order, planned_seconds
    from memloc.reproduce.runner import resolve
    from memloc.reproduce.stages import REGISTRY

    deps = {"a": (), "b": (), "c": ("a",)}
    assert planned_seconds(["a", "b", "c"], deps, {"a": 2, "b": 2, "c": 1}, 2) == 3
    assert planned_seconds(["b", "c", "a"], deps, {"a": 2, "b": 5, "c": 1}, 2) == 5  # c waits for a
    assert planned_seconds(["a", "b", "c"], deps, {"a": 2, "b": 2, "c": 1}, 1) == 5
    order = resolve(list(STAGES), REGISTRY)
    cost = {"memorization": 28, "perturbation": 54, "gradients": 14, "contrastive": 14, "finetune": 143, "head": 5,
            "rare_tokens": 3, "inj": 133, "del": 201, "patching": 17}
    from memloc.reproduce.parallel import _deps

    d = _deps(REGISTRY, order)
    critical_path = ["memorization", "del", "perturbation", "finetune", "inj", "patching", "contrastive", "gradients",
                     "head", "rare_tokens"]
    # INJ needs no split: it starts at once beside memorization; DEL takes the other worker at 28 s,
    # so perturbation and fine-tuning queue behind INJ: 133 + 54 + 143
    assert planned_seconds(critical_path, d, cost, 2) == 133 + 54 + 143
    best = plan_order(order, REGISTRY, cost, 2)
    assert sorted(best) == sorted(order)
    assert planned_seconds(best, d, cost, 2) <= 310  # 612 s of work on 2 workers: 306 s is the bound
    assert planned_seconds(best, d, cost, 1) == sum(cost.values())


def test_parallel_workers_write_the_same_bytes(tiny, tmp_path, caplog, unchanged):
    """Issue 12 finding 2: `memloc demo` computes independent stages on worker processes (each
    loads the model once).  CSVs, REPORT.md and findings equal a serial run's byte for byte, the
    results land in the cache, the path taken is logged, and the model is left unchanged."""
    import logging

    stages = ["perturbation", "gradients", "contrastive", "head", "patching"]
    kw = dict(settings=TINY_SETTINGS, model_name="tiny", png=False, progress_bar=False, stages=stages)
    serial = reproduce(tiny, tmp_path / "serial", cache_dir=None, **kw)
    with caplog.at_level(logging.INFO, logger="memloc.reproduce"):
        par = reproduce(tiny, tmp_path / "par", cache_dir=tmp_path / "cache", workers=2, **kw)
    assert any("2 worker processes" in r.getMessage() for r in caplog.records)
    assert par.findings == serial.findings and par.skipped == serial.skipped and not par.cached
    names = sorted(p.name for p in (tmp_path / "serial").iterdir() if p.suffix in (".csv", ".md"))
    assert "REPORT.md" in names and len(names) > 8
    assert names == sorted(p.name for p in (tmp_path / "par").iterdir() if p.suffix in (".csv", ".md"))
    for name in names:
        assert (tmp_path / "serial" / name).read_bytes() == (tmp_path / "par" / name).read_bytes(), name
    # every computed stage is in the cache: a serial rerun computes nothing
    again = reproduce(tiny, tmp_path / "again", cache_dir=tmp_path / "cache", **kw)
    assert sorted(again.cached) == sorted(["memorization", *stages])


def test_parallel_workers_bad_input_and_failure(tiny, tmp_path, unchanged):
    """workers is checked before any work (a model not from load_model cannot be reloaded in a
    worker); a stage that fails in a worker raises in the caller and leaves no process behind."""
    import multiprocessing

    from memloc.reproduce.context import build_context
    from memloc.reproduce.runner import run_stages
    from memloc.reproduce.stages import REGISTRY

    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="workers must be a positive int"):
            reproduce(tiny, tmp_path / "x", settings=TINY_SETTINGS, workers=bad, cache_dir=None)
    copy = type(tiny).__new__(type(tiny))  # a model load_model did not return
    with pytest.raises(ValueError, match="workers > 1 needs a model returned by memloc.load_model"):
        reproduce(copy, tmp_path / "x", settings=TINY_SETTINGS, workers=2, cache_dir=None)
    assert not (tmp_path / "x").exists()
    from memloc.ray_executor import ModelSpec

    ctx = build_context(tiny, tmp_path / "f", settings=TINY_SETTINGS, stages=["gradients"], paragraphs=None,
                        non_memorized_max_em=None, frequencies=None, cache_dir=None, png=False, model_name="tiny",
                        progress_bar=False, quick=False)
    registry = dict(REGISTRY, gradients=dataclasses.replace(REGISTRY["gradients"], compute=_failing_compute))
    with pytest.raises(ValueError, match="boom in a worker"):
        run_stages(ctx, ["memorization", "gradients", "contrastive"], registry, workers=2,
                   spec=ModelSpec.from_model(tiny), threads=1)
    assert multiprocessing.active_children() == []
