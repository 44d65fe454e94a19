"""Load run directories into pandas and compute what `ringtrain report` and the notebooks show.

    from ringtrain.analysis import load_run
    run = load_run("runs/20261123-ring-n4")
    run.steps          # one row per (rank, step): the DESIGN §3 columns + rank, segment
    run.manifest       # rank 0's attributes (model, world_size, grad_bytes, versions, ...)
    phase_table(run)   # median / p95 per phase across ranks
    run_metrics(run)   # throughput, comm fraction, bytes vs cost model, busbw, slowest rank

No logic lives only in a notebook or only in the report: both call these functions.
Files are opened read-only in SWMR mode, so a run still training can be read.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

PHASES = ("t_data", "t_forward", "t_backward", "t_comm_exposed", "t_optimizer")


class RunError(ValueError):
    """A directory is not a readable run. The message names the path and what is wrong."""


@dataclass
class Run:
    path: str
    manifest: dict
    steps: pd.DataFrame
    summary: dict | None = None
    servers: pd.DataFrame | None = None  # parameter-server side metrics, when present
    warnings: list = field(default_factory=list)

    @property
    def label(self) -> str:
        m = self.manifest
        return f"{m.get('backend', '?')} n={m.get('num_workers', m.get('world_size', '?'))}"

    @property
    def workers(self) -> int:
        return int(self.manifest.get("num_workers", self.manifest.get("world_size", 1)))


def _decode(v):
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, str) and v[:1] in "[{":
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v


def read_rank_file(path: str) -> tuple[dict, pd.DataFrame]:
    """One rank file -> (attributes, DataFrame). Raises RunError if it cannot be read."""
    import h5py

    try:
        with h5py.File(path, "r", libver="latest", swmr=True) as f:
            attrs = {k: _decode(v) for k, v in f.attrs.items()}
            cols = {}
            for name, d in f.items():
                if isinstance(d, h5py.Dataset) and d.ndim == 1:
                    d.refresh()
                    cols[name] = d[:]
    except (OSError, KeyError) as e:
        raise RunError(f"{path}: cannot be read as an HDF5 step log ({str(e).splitlines()[0][:160]}); it may be half-written or not a ringtrain log") from None
    n = min((len(c) for c in cols.values()), default=0)  # a reader may catch a block mid-write
    df = pd.DataFrame({k: v[:n] for k, v in cols.items()})
    return attrs, df


def load_run(run_dir: str, skip: int = 0) -> Run:
    """All ranks and segments of one run. `skip` drops each segment's first steps (warm-up)."""
    from ringtrain.steplog import rank_files

    if not os.path.isdir(run_dir):
        raise RunError(f"{run_dir}: no such directory")
    files = rank_files(run_dir)
    if not files:
        raise RunError(f"{run_dir}: not a ringtrain run directory (no rank-*.h5 step logs in it)")
    frames, manifest, notes = [], None, []
    for path in files:
        try:
            attrs, df = read_rank_file(path)
        except RunError as e:
            notes.append(str(e))
            continue
        rank = int(attrs.get("rank", -1))
        seg = int(attrs.get("segment", 0))
        df["rank"] = rank
        df["segment"] = seg
        if skip and len(df) > skip:
            df = df.iloc[skip:]
        frames.append(df)
        if rank == 0 and (manifest is None or seg == 0):
            manifest = attrs
        elif manifest is None:
            manifest = attrs
    if not frames:
        raise RunError(f"{run_dir}: none of its {len(files)} rank files could be read: " + "; ".join(notes))
    steps = pd.concat(frames, ignore_index=True).sort_values(["step", "rank"]).reset_index(drop=True)
    summary = None
    rj = os.path.join(run_dir, "run.json")
    if os.path.exists(rj):
        try:
            with open(rj) as f:
                summary = json.load(f).get("summary")
        except ValueError:
            notes.append(f"{rj}: not valid JSON, ignored")
    servers = None
    server_files = sorted(f for f in os.listdir(run_dir) if f.startswith("server-") and f.endswith(".h5"))
    if server_files:
        parts = []
        for fn in server_files:
            try:
                attrs, df = read_rank_file(os.path.join(run_dir, fn))
                df["server_rank"] = int(attrs.get("rank", -1))
                parts.append(df)
            except RunError as e:
                notes.append(str(e))
        servers = pd.concat(parts, ignore_index=True) if parts else None
    for n in notes:
        warnings.warn(n)
    return Run(os.path.abspath(run_dir), manifest or {}, steps, summary, servers, notes)


def per_step(run: Run) -> pd.DataFrame:
    """One row per global step: the slowest rank's time per phase (a synchronous step ends
    when its slowest rank does) and the samples of all ranks."""
    s = run.steps
    agg = {c: "max" for c in ("t_step", *PHASES, "t_comm") if c in s}
    agg.update({"samples": "sum", "loss": "mean", "bytes_sent": "mean", "bytes_recv": "mean"})
    return s.groupby("step").agg(agg)


def phase_table(run: Run) -> pd.DataFrame:
    """Median and p95 (over all ranks' steps) of every phase, in milliseconds."""
    s = run.steps
    rows = []
    for c in (*PHASES, "t_comm", "t_wait_peers", "t_step"):
        if c in s and s[c].notna().any():
            v = s[c].dropna() * 1e3
            rows.append({"phase": c, "median_ms": float(v.median()), "p95_ms": float(v.quantile(0.95)), "mean_ms": float(v.mean())})
    return pd.DataFrame(rows).set_index("phase")


def rank_table(run: Run) -> pd.DataFrame:
    """Per rank: median step time and median wait for peers (low wait = arrived last = straggler)."""
    g = run.steps.groupby("rank")
    out = pd.DataFrame({"median_step_ms": g["t_step"].median() * 1e3})
    if "t_wait_peers" in run.steps:
        out["median_wait_peers_ms"] = g["t_wait_peers"].median() * 1e3
    out["hostname"] = run.manifest.get("hostname", "")
    return out


def run_metrics(run: Run) -> dict:
    m = run.manifest
    ps = per_step(run)
    n = run.workers
    grad_bytes = float(m.get("grad_bytes", 0) or 0)
    t_step = float(ps["t_step"].median()) if len(ps) else float("nan")
    throughput = float(ps["samples"].sum() / ps["t_step"].sum()) if len(ps) and ps["t_step"].sum() > 0 else float("nan")
    comm = float(run.steps["t_comm"].median()) if "t_comm" in run.steps else float("nan")
    exposed = float(run.steps["t_comm_exposed"].median()) if "t_comm_exposed" in run.steps else float("nan")
    expected = m.get("expected_bytes_per_step") or [float("nan"), float("nan")]
    sent = float(run.steps["bytes_sent"].median()) if "bytes_sent" in run.steps else float("nan")
    recv = float(run.steps["bytes_recv"].median()) if "bytes_recv" in run.steps else float("nan")
    algbw = grad_bytes / comm if comm and comm > 0 and not math.isnan(comm) else float("nan")
    busbw = algbw * 2 * (n - 1) / n if n > 1 else float("nan")
    ranks = rank_table(run)
    slowest = int(ranks["median_step_ms"].idxmax()) if len(ranks) else -1
    straggler = int(ranks["median_wait_peers_ms"].idxmin()) if "median_wait_peers_ms" in ranks and ranks["median_wait_peers_ms"].notna().any() else slowest
    acc = (run.summary or {}).get("test_accuracy", float("nan"))
    return {
        "run": run.path,
        "label": run.label,
        "backend": m.get("backend", "?"),
        "model": m.get("model", "?"),
        "dataset": m.get("dataset", "?"),
        "workers": n,
        "batch_size": int(m.get("batch_size", 0) or 0),
        "steps": int(ps.shape[0]),
        "median_step_s": t_step,
        "throughput_samples_per_s": throughput,
        "median_comm_s": comm,
        "median_comm_exposed_s": exposed,
        "comm_fraction": exposed / t_step if t_step else float("nan"),
        "bytes_sent_per_step": sent,
        "bytes_recv_per_step": recv,
        "bytes_expected_per_step": float(expected[0]),
        "grad_bytes": grad_bytes,
        "algbw_GBps": algbw / 1e9,
        "busbw_GBps": busbw / 1e9,
        "slowest_rank": slowest,
        "straggler_rank": straggler,
        "final_loss": float(ps["loss"].iloc[-1]) if len(ps) else float("nan"),
        "test_accuracy": acc,
    }


def scaling_table(metrics: list[dict]) -> pd.DataFrame:
    """Scaling efficiency = throughput(N) / (N * throughput(1)), per (model, backend, batch).
    Single-worker runs of any backend serve as the baseline when a backend has none."""
    df = pd.DataFrame(metrics)
    if df.empty:
        return df
    rows = []
    for (model, batch), grp in df.groupby(["model", "batch_size"]):
        base_any = grp[grp.workers == 1]["throughput_samples_per_s"]
        for _, r in grp.iterrows():
            base = grp[(grp.workers == 1) & (grp.backend == r.backend)]["throughput_samples_per_s"]
            b = base.iloc[0] if len(base) else (base_any.iloc[0] if len(base_any) else float("nan"))
            rows.append({
                "backend": r.backend, "model": model, "workers": r.workers, "batch_size": batch,
                "throughput": r.throughput_samples_per_s,
                "efficiency": r.throughput_samples_per_s / (r.workers * b) if b == b and b else float("nan"),
            })
    return pd.DataFrame(rows).sort_values(["model", "backend", "workers"]).reset_index(drop=True)


def ring_cost_model(grad_bytes: float, n: int) -> float:
    """Bytes each rank sends (and receives) per ring all-reduce of grad_bytes."""
    return 2 * (n - 1) / n * grad_bytes if n > 1 else 0.0


def ps_cost_model(grad_bytes: float, n: int, shards: int = 1) -> dict:
    """Per worker: push S, pull S. Per server shard: N*S/K in and out."""
    return {"worker_sent": grad_bytes, "worker_recv": grad_bytes, "server_in": n * grad_bytes / shards, "server_out": n * grad_bytes / shards}


def predicted_ps_over_ring(n: int) -> float:
    """Bandwidth-bound step-time ratio of a single dedicated server to the ring: the server
    link carries N*S each way, a ring link 2(N-1)/N*S, so the ratio is N^2 / (2(N-1))."""
    return n * n / (2 * (n - 1)) if n > 1 else float("nan")
