"""Plotly figures for memloc results: one function per figure kind, each taking the DataFrames
that the analysis functions return and returning a ``plotly.graph_objects.Figure``.

``save(fig, path)`` writes HTML and PNG (static export through kaleido and a headless Chromium);
``with png_session():`` keeps one browser for all the PNGs of the block (about 4x faster).
"""

from __future__ import annotations

from ._save import png_session, save
from .benchmarks import del_confusion_heatmap, del_table_figure, inj_recall_bars
from .contrastive import finetune_trajectories, patching_heatmap
from .gradients import (activation_gradient_heatmap, attention_vs_mlp_totals, gradient_heatmap,
                        gradient_heatmaps_by_group)
from .heads import head_token_heatmaps, rank_attention
from .memorization import memorization_scatter
from .perturbation import perturbation_bars, perturbation_by_position, token_labels

__all__ = [
    "save", "png_session",
    "memorization_scatter",
    "perturbation_bars", "perturbation_by_position", "token_labels",
    "gradient_heatmap", "gradient_heatmaps_by_group", "attention_vs_mlp_totals", "activation_gradient_heatmap",
    "finetune_trajectories", "patching_heatmap",
    "head_token_heatmaps", "rank_attention",
    "inj_recall_bars", "del_table_figure", "del_confusion_heatmap",
]
