"""Figures shared by `ringtrain report --plot` and the notebooks in analysis/.

Every function takes loaded runs (ringtrain.analysis) and a matplotlib Axes or a path, and
draws; none computes anything the analysis module does not already expose.
"""
from __future__ import annotations

import os
import sys

import matplotlib

if "ipykernel" not in sys.modules:  # a notebook keeps its inline backend
    matplotlib.use("Agg")  # headless: report and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ringtrain import analysis  # noqa: E402
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


def _figure(obj):
    """The Figure behind an Axes, an array of Axes, or a Figure."""
    if isinstance(obj, Figure):
        return obj
    return np.ravel(obj)[0].figure if isinstance(obj, (np.ndarray, list, tuple)) else obj.figure


def save(ax, path, close=True):
    """Write the figure holding `ax` (an Axes, an array of them, or a Figure) as PNG to
    `path`, creating its folder. `close=False` keeps it open, for a notebook to show."""
    fig = _figure(ax)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    if close:
        plt.close(fig)
    return path


# ---- Figures of the notebooks in analysis/ ----------------------------------------------------

COMM_ISSUED_COLOR = "#e8a0a2"
SCHEME_STYLE = {
    "ring": ("#4c72b0", "o"), "mpi": ("#55a868", "s"), "ddp": ("#8172b2", "^"), "horovod": ("#937860", "D"), "none": ("#999999", "x"),
    "ps-sync": ("#c44e52", "v"), "ps-async": ("#dd8452", "<"), "ps-async-reply-first": ("#e0b040", ">"), "ps-hogwild": ("#da8bc3", "P"),
}


def _style(backend):
    if backend in SCHEME_STYLE:
        return SCHEME_STYLE[backend]
    return ("#c44e52", "v") if analysis.is_parameter_server(backend) else ("#da8bc3", "P")


def rank_breakdown(run, ax=None):
    """Stacked bars, one per rank: median ms of each phase. Unequal compute bars point at a
    slow rank; the others then show it as exposed communication (they wait for it)."""
    t = analysis.rank_phase_table(run)
    ax = ax or plt.subplots(figsize=(max(5.5, 0.7 * len(t) + 4), 4))[1]
    bottom = np.zeros(len(t))
    x = np.arange(len(t))
    for ph in PHASES:
        if ph in t:
            vals = t[ph].to_numpy() * 1e3
            ax.bar(x, vals, bottom=bottom, label=PHASE_LABELS[ph], color=PHASE_COLORS[ph])
            bottom += vals
    if "t_comm" in t:
        ax.scatter(x, t["t_comm"] * 1e3, marker="_", s=300, color="k", zorder=3, label="comm issued")
    ax.set_xticks(x, [str(r) for r in t.index])
    ax.set_xlabel("rank")
    ax.set_ylabel("median ms per step")
    ax.set_title(f"{run.label}: phases per rank")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return ax


def timeline_gantt(run, steps=None, ax=None):
    """A Horovod-timeline-like Gantt chart: one lane per rank, a few steps on rank 0's clock,
    compute phases and exposed communication as bars, the communication issued (overlapping
    backward, start approximate) as a thin bar above them."""
    tl = analysis.timeline(run, steps=steps)
    ranks = sorted(tl["rank"].unique()) if len(tl) else []
    ax = ax or plt.subplots(figsize=(9, 0.6 * len(ranks) + 1.8))[1]
    seen = set()
    for _, r in tl.iterrows():
        lane = ranks.index(r["rank"])
        w = (r["end"] - r["start"]) * 1e3
        if r["phase"] == "t_comm":
            kw = dict(height=0.18, color=COMM_ISSUED_COLOR, label="comm issued (approx. start)")
            y = lane + 0.42
        else:
            kw = dict(height=0.6, color=PHASE_COLORS[r["phase"]], label=PHASE_LABELS[r["phase"]])
            y = lane
        if kw["label"] in seen:
            kw["label"] = None
        else:
            seen.add(kw["label"])
        ax.barh(y, w, left=r["start"] * 1e3, **kw)
    for step, g in tl[tl["phase"] == "t_data"].groupby("step"):
        ax.axvline(g["start"].min() * 1e3, color="k", lw=0.5, ls=":")
        ax.text(g["start"].min() * 1e3, 1.0, f" step {step}", fontsize=7, va="bottom", transform=ax.get_xaxis_transform())
    ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlabel("ms on rank 0's clock")
    unc = analysis.clock_uncertainty(run)
    ax.set_title(f"{run.label}: timeline" + (f" (clocks aligned to about {unc * 1e6:.0f} us)" if unc == unc else ""), pad=14)
    ax.legend(fontsize=7, ncol=6, loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False)
    return ax


def schemes_vs_workers(metrics, model=None, axes=None):
    """Two panels against the number of workers N: median step time and throughput, measured
    (markers, one colour per scheme) beside the cost model (dashed, from `step_time_model`
    rows passed as `model`, optional)."""
    axes = axes if axes is not None else plt.subplots(1, 2, figsize=(10, 4))[1]
    df = pd.DataFrame(metrics)
    for backend, g in df.groupby("backend"):
        g = g.sort_values("workers")
        color, marker = _style(backend)
        axes[0].plot(g.workers, g.median_step_s * 1e3, marker=marker, color=color, label=f"{backend} measured")
        axes[1].plot(g.workers, g.throughput_samples_per_s, marker=marker, color=color, label=f"{backend} measured")
    if model is not None and len(model):
        for scheme, g in model.groupby("scheme"):
            color, _ = _style(scheme)
            axes[0].plot(g.workers, g.step_s * 1e3, "--", color=color, alpha=0.7, label=f"{scheme} model")
            axes[1].plot(g.workers, g.throughput, "--", color=color, alpha=0.7, label=f"{scheme} model")
    axes[0].set_ylabel("median step time, ms (slowest rank)")
    axes[1].set_ylabel("samples / s")
    axes[0].set_title("Step time vs workers")
    axes[1].set_title("Throughput vs workers")
    for a in axes:
        a.set_xlabel("workers N")
        a.xaxis.get_major_locator().set_params(integer=True)
        a.legend(fontsize=7)
    return axes


def scaling_efficiency(metrics, ax=None):
    """Scaling efficiency throughput(N) / (N * throughput(1)) per scheme; 1.0 is linear."""
    ax = ax or plt.subplots(figsize=(5, 4))[1]
    tab = scaling_table(metrics)
    for (backend, model), g in tab.groupby(["backend", "model"]):
        g = g.sort_values("workers")
        color, marker = _style(backend)
        ax.plot(g.workers, g.efficiency, marker=marker, color=color, label=f"{backend} ({model})")
    ax.axhline(1.0, color="gray", ls=":", lw=1)
    ax.set_ylim(0, max(1.1, float(np.nanmax(tab.efficiency)) * 1.1) if len(tab) and tab.efficiency.notna().any() else 1.1)
    ax.set_xlabel("workers N")
    ax.set_ylabel("efficiency")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title("Scaling efficiency (1 = linear)")
    ax.legend(fontsize=8)
    return ax


def bytes_measured_vs_predicted(table, ax=None):
    """Bars per run: payload bytes sent per worker per step as the scheme counted them, beside
    the cost model's prediction (hatched)."""
    ax = ax or plt.subplots(figsize=(max(5, 0.9 * len(table) + 2), 4))[1]
    x = np.arange(len(table))
    ax.bar(x - 0.2, table["sent"] / 1e3, 0.4, label="measured", color="#4c72b0")
    ax.bar(x + 0.2, table["sent_predicted"] / 1e3, 0.4, label="cost model", color="white", edgecolor="#4c72b0", hatch="//")
    ax.set_xticks(x, table["label"], rotation=20, ha="right")
    ax.set_ylabel("kB sent per worker per step")
    ax.set_title("Bytes: measured vs cost model")
    ax.legend(fontsize=8)
    return ax


def bandwidth_vs_size(bench, fit=None, link_GBps=None, link_label="link", axes=None):
    """Two panels against message size (log): all-reduce time with the alpha-beta fit
    (dashed), and bus bandwidth with the fit's prediction and the link's limit (a ring's
    busbw cannot exceed the bandwidth of one link)."""
    axes = axes if axes is not None else plt.subplots(1, 2, figsize=(11, 4))[1]
    for (backend, n), g in bench.groupby(["backend", "nranks"]):
        color, marker = _style(backend)
        lbl = f"{backend} N={n}"
        good = g[g["wrong"] <= 0]
        axes[0].plot(good.size_bytes, good.time_s * 1e6, marker, color=color, label=lbl)
        axes[1].plot(good.size_bytes, good.busbw_GBps, marker, color=color, label=lbl)
        bad = g[g["wrong"] > 0]
        if len(bad):
            axes[1].plot(bad.size_bytes, bad.busbw_GBps, "x", color="red", label=f"{lbl}: wrong result")
        if fit is not None:
            f = fit[(fit.backend == backend) & (fit.nranks == n)]
            if len(f):
                f = f.iloc[0]
                xs = np.geomspace(g.size_bytes.min(), g.size_bytes.max(), 60)
                t = analysis.alpha_beta_predict(f, xs)
                factor = 2 * (n - 1) / n if n > 1 else 1.0
                axes[0].plot(xs, t * 1e6, "--", color=color, alpha=0.7,
                             label=f"fit: {f.alpha_s * 1e6:.0f} us + S / {f.algbw_GBps:.2f} GB/s")
                axes[1].plot(xs, xs / t * factor / 1e9, "--", color=color, alpha=0.7)
    if link_GBps:
        axes[1].axhline(link_GBps, color="k", ls=":", label=f"{link_label} {link_GBps:.1f} GB/s")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("time per all-reduce, us")
    axes[0].set_title("All-reduce time (dashed: alpha-beta fit)")
    axes[1].set_ylabel("bus bandwidth, GB/s")
    axes[1].set_title("Bus bandwidth vs message size")
    for a in axes:
        a.set_xscale("log", base=2)
        a.set_xlabel("message size, bytes")
        a.legend(fontsize=7)
    return axes


def arrival_skew(run, ax=None):
    """Per rank: spread of its arrival skew (how late its gradients were ready compared with the
    first rank's, ms) over steps as a box, and the share of steps it arrived last."""
    a = analysis.arrival_skew(run)
    t = analysis.straggler_table(run)
    ranks = sorted(a["rank"].unique())
    ax = ax or plt.subplots(figsize=(max(4.5, 0.8 * len(ranks) + 2.5), 4))[1]
    ax.boxplot([a.loc[a["rank"] == r, "skew"] * 1e3 for r in ranks], positions=range(len(ranks)), showfliers=False)
    for i, r in enumerate(ranks):
        ax.text(i, ax.get_ylim()[1], f"last {100 * t.loc[r, 'last_share']:.0f}%", ha="center", va="bottom", fontsize=8)
    unc = t.attrs.get("clock_uncertainty_s")
    if unc and unc == unc:
        ax.axhline(unc * 1e3, color="gray", ls=":", lw=1, label="clock uncertainty")
        ax.legend(fontsize=8, loc="upper left")
    ax.set_xticks(range(len(ranks)), [str(r) for r in ranks])
    ax.set_xlabel("rank")
    ax.set_ylabel("arrival skew, ms (0 = first ready)")
    ax.set_title(f"{run.label}: arrival at the exchange", pad=16)
    return ax


def skew_over_steps(run, ax=None):
    """Arrival skew of every rank step by step (ms): a rank that is always late is a slow
    machine; spikes on all ranks in turn are noise (other jobs, the OS)."""
    a = analysis.arrival_skew(run)
    ax = ax or plt.subplots(figsize=(7, 3.5))[1]
    for r, g in a.groupby("rank"):
        ax.plot(g["step"], g["skew"] * 1e3, ".-", lw=0.8, label=f"rank {r}")
    ax.set_xlabel("step")
    ax.set_ylabel("arrival skew, ms")
    ax.set_title(f"{run.label}: skew per step")
    ax.legend(fontsize=7, ncol=4)
    return ax


def accuracy_vs_time(runs, axes=None):
    """Two panels: training loss against seconds of training (rank 0's clock; solid sync
    schemes, dashed async), and the held-out accuracy each run reached against how long it
    trained."""
    axes = axes if axes is not None else plt.subplots(1, 2, figsize=(11, 4))[1]
    for r in runs:
        wc = analysis.wall_clock(r)
        color, _ = _style(r.manifest.get("backend"))
        axes[0].plot(wc["time_s"], wc["loss"], "--" if analysis.is_async(r) else "-", color=color, alpha=0.8, label=r.label)
    tab = analysis.accuracy_vs_time(runs)
    for _, row in tab.iterrows():
        color, marker = _style(row.backend)
        axes[1].scatter(row.train_time_s, 100 * row.test_accuracy, color=color, marker=marker, facecolors=color if row.sync else "none")
        axes[1].annotate(row.label, (row.train_time_s, 100 * row.test_accuracy), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes[0].set_xlabel("seconds of training")
    axes[0].set_ylabel("training loss (mean over workers)")
    axes[0].set_title("Loss vs time (dashed: async)")
    axes[0].legend(fontsize=7)
    axes[1].set_xlabel("seconds of training")
    axes[1].set_ylabel("held-out accuracy at the end, %")
    axes[1].set_title("Accuracy vs time (hollow: async)")
    return axes


class Saver:
    """Writes notebook figures as PNG into one folder and leaves them open for the notebook to
    show: `save = Saver(FIG_DIR); save(ax, "timeline")` writes FIG_DIR/timeline.png."""

    def __init__(self, fig_dir):
        self.fig_dir = str(fig_dir)
        self.written = []
        os.makedirs(self.fig_dir, exist_ok=True)

    def __call__(self, ax, name) -> None:
        path = save(ax, os.path.join(self.fig_dir, name if name.endswith(".png") else name + ".png"), close="ipykernel" not in sys.modules)
        self.written.append(path)
        print(f"saved {path}")


def ps_over_ring(ratios, ax=None):
    """Measured PS/ring ratios of step time and exposed communication against N, beside the
    bandwidth-bound prediction N^2 / (2(N-1)) (rows of `analysis.ps_over_ring_table`)."""
    ax = ax or plt.subplots(figsize=(5, 4))[1]
    for backend, g in ratios.groupby("backend"):
        g = g.sort_values("workers")
        color, marker = _style(backend)
        ax.plot(g.workers, g.step_ratio, marker=marker, color=color, label=f"{backend}: step time")
        ax.plot(g.workers, g.comm_ratio, marker=marker, color=color, ls=":", label=f"{backend}: exposed comm")
    if len(ratios):
        ns = np.arange(2, max(int(ratios.workers.max()), 2) + 1)
        ax.plot(ns, [analysis.predicted_ps_over_ring(n) for n in ns], "k--", label="model N^2/(2(N-1))")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("workers N")
    ax.set_ylabel("parameter server / ring")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title("Parameter server over ring")
    ax.legend(fontsize=7)
    return ax


def slug(run) -> str:
    """A file-name-safe name for a run's figures: its directory's name."""
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(os.path.normpath(run.path))) or "run"
