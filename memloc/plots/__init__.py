"""Plotly figures for memloc results: one function per figure kind, each taking the DataFrames
that the analysis functions return and returning a ``plotly.graph_objects.Figure``."""

from __future__ import annotations

from ._save import save

__all__ = ["save"]

from .benchmarks import del_confusion_heatmap, del_table_figure, inj_recall_bars  # noqa: E402

__all__ += ["inj_recall_bars", "del_table_figure", "del_confusion_heatmap"]
