"""A newcomer's first steps (issue 12): inputs that do not compose fail with a ValueError saying
what is expected; the install carries no licence deprecation warnings; the Makefile opens the
notebooks and cites only files that exist."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from memloc.metrics import split_memorization

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("bad", [torch.tensor([50, 3, 20]), [50, 3, 20], pd.Series([50, 3]),
                                 pd.DataFrame({"exact_match": [50]}), None])
def test_split_memorization_says_what_it_expects(bad):
    with pytest.raises(ValueError, match="memloc.memorization.*'em' column"):
        split_memorization(bad)


def test_split_memorization_checks_thresholds_and_dtype():
    with pytest.raises(ValueError, match="exact-match counts"):
        split_memorization(pd.DataFrame({"em": ["a", "b"]}))
    with pytest.raises(ValueError, match="memorized_min_em must be an int"):
        split_memorization(pd.DataFrame({"em": [1]}), memorized_min_em=49.5)
    out = split_memorization(pd.DataFrame({"em": [50, 10, 11]}, index=[7, 8, 9]))
    assert out.tolist() == ["memorized", "non-memorized", "partial"] and out.index.tolist() == [7, 8, 9]


def test_package_metadata_has_an_spdx_licence_and_no_setuptools_warning(tmp_path):
    """`pip install` builds this metadata: no `project.license` table deprecation warning."""
    code = ("import warnings, setuptools.build_meta as b; warnings.simplefilter('always'); "
            f"print(b.prepare_metadata_for_build_wheel({str(tmp_path)!r}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "SetuptoolsDeprecationWarning" not in out.stderr + out.stdout, out.stderr[-2000:]
    meta = next(tmp_path.glob("*.dist-info")) / "METADATA"
    text = meta.read_text()
    assert "License-Expression: Apache-2.0" in text and "License-File: LICENSE" in text
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")


def test_makefile_opens_the_notebooks_and_cites_existing_files():
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"^notebooks: install\n(\t\$\(BIN\)/pip install .*\n)?\t\$\(BIN\)/jupyter lab notebooks/", make, re.M)
    for cited in re.findall(r"\b([A-Za-z_]+\.md)\b", make):
        assert (ROOT / cited).exists(), f"the Makefile cites {cited}, which is not in the repository"
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for need in ("ipywidgets", "nbconvert"):  # the executed notebooks' widgets and `jupyter nbconvert`
        assert any(d.startswith(need) for d in extras["dev"]), need
    for need in ("jupyterlab", "ipywidgets"):  # `make notebooks` installs the notebooks extra
        assert any(d.startswith(need) for d in extras["notebooks"]), need
    assert '.[dev,notebooks]' in make


def test_jupyter_widgets_and_nbconvert_are_installed():
    """The dev extras bring widgets for tqdm bars and nbconvert (the front end, JupyterLab, is the
    notebooks extra that `make notebooks` installs)."""
    import ipywidgets  # noqa: F401

    out = subprocess.run([sys.executable, "-m", "nbconvert", "--version"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-1000:]


def test_pandas_selections_make_no_read_only_array_warning(tiny_paragraphs):
    """pandas >= 3 hands out read-only arrays; converting them must not trigger torch's warning."""
    import warnings

    from memloc.heads import unigram_counts_from_tokens

    mask = tiny_paragraphs.table["count"] > 100
    ro = tiny_paragraphs.table.index[mask].to_numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        by_mask = tiny_paragraphs.subset(mask)
        by_ids = tiny_paragraphs.subset(ro)
        counts = unigram_counts_from_tokens(tiny_paragraphs.tokens[:2].numpy().copy().view(), 4096)
    assert len(by_mask) == int(mask.sum()) == len(by_ids) > 0
    assert int(counts.sum()) == tiny_paragraphs.tokens[:2].numel()
