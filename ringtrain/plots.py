"""Figures shared by `ringtrain report --plot` and the notebooks in analysis/.

Every function takes loaded runs (ringtrain.analysis) and a matplotlib Axes or a path, and
draws; none computes anything the analysis module does not already expose.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: report and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ringtrain.analysis import PHASES, per_step, rank_table, scaling_table  # noqa: E402

PHASE_LABELS = {"t_data": "data", "t_forward": "forward", "t_backward": "backward", "t_comm_exposed": "comm (exposed)", "t_optimizer": "optimizer"}
PHASE_COLORS = {"t_data": "#bbbbbb", "t_forward": "#4c72b0", "t_backward": "#55a868", "t_comm_exposed": "#c44e52", "t_optimizer": "#8172b2"}


def step_breakdown(runs, ax=None):
    """Stacked bars: median ms per phase, one bar per run."""
    ax = ax or plt.subplots(figsize=(max(4, 1.2 * len(runs) + 2), 4))[1]
    bottom = np.zeros(len(runs))
    for ph in PHASES:
        vals = np.array([r.steps[ph].median() * 1e3 if ph in r.steps else 0.0 for r in runs])
        ax.bar(range(len(runs)), vals, bottom=bottom, label=PHASE_LABELS[ph], color=PHASE_COLORS[ph])
        bottom += vals
    ax.set_xticks(range(len(runs)), [r.label for r in runs], rotation=20, ha="right")
    ax.set_ylabel("median ms per step")
    ax.set_title("Where a training step's time goes")
    ax.legend(fontsize=8)
    return ax


def scaling_curve(metrics, ax=None):
    """Throughput vs workers per backend, with ideal linear scaling dashed."""
    ax = ax or plt.subplots(figsize=(5, 4))[1]
    tab = scaling_table(metrics)
    for (backend, model), g in tab.groupby(["backend", "model"]):
        g = g.sort_values("workers")
        ax.plot(g.workers, g.throughput, "o-", label=f"{backend} ({model})")
        one = g[g.workers == 1]
        if len(one):
            ax.plot(g.workers, one.throughput.iloc[0] * g.workers, ":", color="gray")
    ax.set_xlabel("workers N")
    ax.set_ylabel("samples / s")
    ax.set_title("Scaling (dotted: ideal)")
    ax.legend(fontsize=8)
    return ax


def rank_skew(run, ax=None):
    """Per rank: median wait for the slowest peer at the first exchange (low = the straggler)."""
    ax = ax or plt.subplots(figsize=(5, 3.5))[1]
    t = rank_table(run)
    col = "median_wait_peers_ms" if "median_wait_peers_ms" in t else "median_step_ms"
    ax.bar(t.index.astype(str), t[col], color="#dd8452")
    ax.set_xlabel("rank")
    ax.set_ylabel("ms" if col != "median_step_ms" else "median step ms")
    ax.set_title(f"{run.label}: wait for slowest peer per rank")
    return ax


def loss_curve(runs, ax=None, x="step"):
    ax = ax or plt.subplots(figsize=(5, 3.5))[1]
    for r in runs:
        ps = per_step(r)
        xs = ps.index if x == "step" else ps["t_step"].cumsum()
        ax.plot(xs, ps["loss"], label=r.label)
    ax.set_xlabel("step" if x == "step" else "seconds of training")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=8)
    return ax


def save(ax, path):
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=110)
    plt.close(ax.figure)
    return path
