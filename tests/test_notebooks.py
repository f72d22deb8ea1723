"""Every notebook in notebooks/ executes without a cell error on the embedded model (QUICK = True)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPECTED = {"01_memorized_paragraphs_and_metrics.ipynb", "02_localization_and_benchmarks.ipynb",
            "03_gradients_unlearning_editing.ipynb", "04_memorization_head.ipynb"}


def test_the_notebooks_are_there_with_parameter_cells():
    assert EXPECTED <= {p.name for p in NOTEBOOKS}
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c.source for c in nb.cells if c.cell_type == "code"]
        assert code and 'MODEL = "tiny"' in code[0] and "EleutherAI/gpt-neo-125M" in code[0], path.name
        assert "QUICK = True" in code[0], path.name
        assert sum(c.cell_type == "markdown" for c in nb.cells) >= 4, f"{path.name} needs explanations"
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{path.name} has outputs"


def test_kernel_runs_this_python():
    """The python3 kernelspec must resolve to the interpreter that has memloc installed."""
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    exe = spec.argv[0]
    assert exe in ("python", "python3", "{python}", sys.executable) or Path(exe).resolve() == Path(sys.executable).resolve(), exe


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, monkeypatch):
    monkeypatch.setenv("MEMLOC_PROGRESS", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                                     resources={"metadata": {"path": str(ROOT / "notebooks")}})
    client.execute()  # raises CellExecutionError on any cell error
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    # an executed notebook carries no warnings: nothing on stderr (TqdmWarning without ipywidgets,
    # NumPy's non-writable-array warning, deprecations ...) and no "Warning" in any text output
    noise = [(i, o.get("text", "")) for i, c in enumerate(nb.cells) if c.cell_type == "code"
             for o in c.get("outputs", []) if o.output_type == "stream" and o.name == "stderr"]
    assert not noise, "stderr in executed cells:\n" + "\n".join(f"cell {i}: {t[:500]}" for i, t in noise)
    texts = [(i, o.get("text", "") or str(o.get("data", {}).get("text/plain", ""))) for i, c in enumerate(nb.cells)
             if c.cell_type == "code" for o in c.get("outputs", [])]
    warned = [(i, t[:300]) for i, t in texts if "Warning:" in t]
    assert not warned, warned
