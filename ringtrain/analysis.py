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
        """Backend and workers, e.g. "ring n=4"; a parameter server adds its placement, which
        tells two runs of one PS mode apart: "ps-sync colocated n=4", "ps-sync 1 server n=4";
        a ring whose gradient buckets were not in shared memory says so: "ring private n=4"."""
        m = self.manifest
        name = m.get("backend", "?")
        if m.get("scheme_grad_buffers") == "private":
            name += " private"
        placement = m.get("scheme_ps_placement")
        if placement == "colocated":
            name += " colocated"
        elif placement == "dedicated":
            k = int(m.get("scheme_ps_servers", 1))
            name += f" {k} server{'s' if k > 1 else ''}"
        return f"{name} n={m.get('num_workers', m.get('world_size', '?'))}"

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
    except (OSError, KeyError, RuntimeError, ValueError) as e:
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


# ---- Finding runs ---------------------------------------------------------------------------


def expand_run_dirs(patterns) -> list[str]:
    """Paths or glob patterns (one string or a list) -> the run directories among them,
    sorted and without duplicates. A directory counts as a run when it holds rank-*.h5 logs;
    anything else a pattern matches (a figures folder, a bench JSON) is passed over."""
    import glob

    from ringtrain.steplog import rank_files

    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    found = []
    for p in patterns or []:
        p = os.path.expanduser(str(p))
        for d in sorted(glob.glob(p)) if glob.has_magic(p) else [p]:
            if os.path.isdir(d) and rank_files(d) and os.path.abspath(d) not in found:
                found.append(os.path.abspath(d))
    return found


def load_runs(patterns, skip: int = 0, require: bool = False) -> list[Run]:
    """`load_run` on every run directory `expand_run_dirs(patterns)` finds, ordered by
    backend and number of workers. A directory that cannot be read is left out with a warning
    naming it, so one broken run does not stop a notebook that compares ten. `require=True`
    raises RunError when no run at all is found (naming the patterns and the working folder)."""
    runs = []
    for d in expand_run_dirs(patterns):
        try:
            runs.append(load_run(d, skip=skip))
        except RunError as e:
            warnings.warn(str(e))
    if require and not runs:
        raise RunError(f"no readable run directory (one holding rank-*.h5) matches {patterns!r} from {os.getcwd()}; "
                       f"train one with `mpirun -n 2 python -m ringtrain train --run-dir runs/NAME` or pass RUN_DIRS")
    return sorted(runs, key=lambda r: (str(r.manifest.get("backend", "")), r.workers, r.path))


def workload_groups(runs) -> dict:
    """Runs grouped by what they train: {(model, dataset, batch_size): [runs]}, largest group
    first. Step times and throughputs compare only within a group."""
    groups: dict = {}
    for r in runs:
        m = r.manifest
        groups.setdefault((m.get("model", "?"), m.get("dataset", "?"), int(m.get("batch_size", 0) or 0)), []).append(r)
    return dict(sorted(groups.items(), key=lambda kv: -len(kv[1])))


def is_parameter_server(run_or_backend) -> bool:
    """True for the parameter-server schemes (backend names starting with `ps`)."""
    b = run_or_backend.manifest.get("backend", "") if isinstance(run_or_backend, Run) else run_or_backend
    return str(b).startswith("ps")


def is_async(run_or_backend) -> bool:
    """True for asynchronous schemes (a backend name containing `async`): their workers do
    not wait for each other, so steps of different workers are not aligned."""
    b = run_or_backend.manifest.get("backend", "") if isinstance(run_or_backend, Run) else run_or_backend
    return "async" in str(b)


# ---- Per rank and over time -------------------------------------------------------------------

COMPUTE_PHASES = ("t_data", "t_forward", "t_backward", "t_optimizer")


def rank_phase_table(run: Run) -> pd.DataFrame:
    """Per rank (index): the median seconds of every phase of DESIGN §3, plus t_comm (issued)
    and t_step. The phases of one rank add up to about its t_step."""
    cols = [c for c in (*PHASES, "t_comm", "t_step") if c in run.steps]
    return run.steps.groupby("rank")[cols].median()


def timeline(run: Run, steps=None, ranks=None) -> pd.DataFrame:
    """Per-rank phase intervals on rank 0's clock, for a Gantt chart of a few steps.

    Each step of each rank is laid out from its `t_start` (aligned to rank 0's clock at
    start-up) as data, forward, backward, exposed communication, optimizer, end to end.
    Rows: rank, step, phase, start, end (seconds since the earliest selected `t_start`).

    One extra row per step has phase `t_comm`: the communication issued during the step.
    The log holds its duration, not its start, so it is drawn ending where the exposed wait
    ends and reaching back into backward (overlap) - approximate, unlike the other phases.
    `steps` defaults to the last three steps logged; `ranks` to all.
    Clock alignment is good to the run's `clock_uncertainty` (manifest), typically tens of us.
    """
    s = run.steps
    if steps is None:
        steps = sorted(s["step"].unique())[-3:]
    sel = s[s["step"].isin(list(steps))]
    if ranks is not None:
        sel = sel[sel["rank"].isin(list(ranks))]
    if sel.empty:
        return pd.DataFrame(columns=["rank", "step", "phase", "start", "end"])
    t0 = float(sel["t_start"].min())
    rows = []
    for r in sel.itertuples(index=False):
        r = r._asdict()
        t = r["t_start"] - t0
        bounds = {}
        for ph in PHASES:
            d = float(r.get(ph, 0.0) or 0.0)
            d = 0.0 if math.isnan(d) else d
            bounds[ph] = (t, t + d)
            rows.append({"rank": int(r["rank"]), "step": int(r["step"]), "phase": ph, "start": t, "end": t + d})
            t += d
        comm = float(r.get("t_comm", 0.0) or 0.0)
        if comm > 0 and not math.isnan(comm):
            end = bounds["t_comm_exposed"][1]
            start = max(bounds["t_forward"][1], end - comm)
            rows.append({"rank": int(r["rank"]), "step": int(r["step"]), "phase": "t_comm", "start": start, "end": end})
    return pd.DataFrame(rows)


def arrival_skew(run: Run) -> pd.DataFrame:
    """When each rank had its gradients ready, compared with the other ranks, step by step.

    arrival = t_start + t_data + t_forward + t_backward on rank 0's clock: the moment this
    rank's backward ended. skew = arrival - the earliest arrival of that step (0 for the
    first rank to arrive; the last rank's skew is what the others wait). `last` marks the
    rank that arrived last. `t_wait_peers` (when logged) is what the scheme itself measured
    waiting for the slowest peer at its first exchange."""
    s = run.steps
    out = s[["step", "rank"]].copy()
    out["arrival"] = s["t_start"] + s[["t_data", "t_forward", "t_backward"]].sum(axis=1)
    first = out.groupby("step")["arrival"].transform("min")
    out["skew"] = out["arrival"] - first
    out["last"] = out["arrival"] == out.groupby("step")["arrival"].transform("max")
    out["compute"] = s[[c for c in COMPUTE_PHASES if c in s]].sum(axis=1)
    if "t_wait_peers" in s:
        out["t_wait_peers"] = s["t_wait_peers"]
    return out.reset_index(drop=True)


def clock_uncertainty(run: Run) -> float:
    """The largest clock-alignment uncertainty (s) over the run's ranks (each rank file
    records its own; rank 0's is 0 by definition). Differences between ranks' timestamps
    smaller than this are not measurable. NaN if no rank recorded one."""
    import h5py

    from ringtrain.steplog import rank_files

    vals = []
    for path in rank_files(run.path):
        try:
            with h5py.File(path, "r", libver="latest", swmr=True) as f:
                v = _decode(f.attrs.get("clock_uncertainty", float("nan")))
        except OSError:
            continue
        try:
            vals.append(float(v))
        except (TypeError, ValueError):
            pass
    vals = [v for v in vals if v == v]
    return max(vals) if vals else float("nan")


def straggler_table(run: Run) -> pd.DataFrame:
    """Per rank: median and p95 arrival skew (ms), the share of steps it arrived last, its
    median compute time and median wait for peers (ms). A straggler has a high skew and last
    share and a low wait. Skews below the run's clock uncertainty (in `.attrs`) are noise."""
    a = arrival_skew(run)
    n_ranks = a["rank"].nunique()
    g = a.groupby("rank")
    out = pd.DataFrame({
        "median_skew_ms": g["skew"].median() * 1e3,
        "p95_skew_ms": g["skew"].quantile(0.95) * 1e3,
        "last_share": g["last"].mean() if n_ranks > 1 else 0.0,
        "median_compute_ms": g["compute"].median() * 1e3,
    })
    if "t_wait_peers" in a:
        out["median_wait_peers_ms"] = g["t_wait_peers"].median() * 1e3
    out.attrs["clock_uncertainty_s"] = clock_uncertainty(run)
    return out


def wall_clock(run: Run) -> pd.DataFrame:
    """Per step: when it ended on rank 0's clock, in seconds since the run's first step began
    (`time_s`, the slowest rank's end), and the mean loss over workers. Unlike a running sum
    of t_step this includes anything between steps (evaluation, snapshots, waiting)."""
    s = run.steps
    end = (s["t_start"] + s["t_step"]).groupby(s["step"]).max()
    out = pd.DataFrame({"time_s": end - float(s["t_start"].min()), "loss": s.groupby("step")["loss"].mean()})
    out.index.name = "step"
    return out


def accuracy_vs_time(runs) -> pd.DataFrame:
    """One row per run: how long it trained (seconds on rank 0's clock from the first step's
    start to the last step's end), the final training loss and the held-out accuracy the run
    measured at its end (run.json; NaN if it did not finish). `sync` is False for
    asynchronous schemes. For the loss over time of each run, see `wall_clock`."""
    rows = []
    for r in runs:
        wc = wall_clock(r)
        rows.append({
            "label": r.label,
            "backend": r.manifest.get("backend", "?"),
            "workers": r.workers,
            "sync": not is_async(r),
            "train_time_s": float(wc["time_s"].iloc[-1]) if len(wc) else float("nan"),
            "steps": int(len(wc)),
            "final_loss": float(wc["loss"].iloc[-1]) if len(wc) else float("nan"),
            "test_accuracy": float((r.summary or {}).get("test_accuracy", float("nan"))),
        })
    return pd.DataFrame(rows)


# ---- Bytes: measured vs the cost model --------------------------------------------------------


def predicted_bytes_per_step(run: Run) -> tuple[float, float]:
    """(sent, received) payload bytes per worker per step that the cost model (DESIGN §2)
    predicts for this run: the scheme's own `expected_bytes_per_step` from the manifest, else
    the ring model for all-reduce schemes and push S / pull S for a parameter server."""
    m = run.manifest
    exp = m.get("expected_bytes_per_step")
    if isinstance(exp, (list, tuple)) and len(exp) == 2:
        return float(exp[0]), float(exp[1])
    s, n = float(m.get("grad_bytes", 0) or 0), run.workers
    if is_parameter_server(run):
        c = ps_cost_model(s, n)
        return c["worker_sent"], c["worker_recv"]
    if m.get("backend") == "none":
        return 0.0, 0.0
    b = ring_cost_model(s, n)
    return b, b


def bytes_table(runs) -> pd.DataFrame:
    """One row per run: median payload bytes per worker per step, sent and received, as the
    scheme counted them, beside the cost model's prediction and their ratio (1.0 = exact).
    `nic_sent` is what the host's network interfaces saw (0 for shared-memory MPI traffic,
    which no NIC carries)."""
    rows = []
    for r in runs:
        s = r.steps
        ps, pr = predicted_bytes_per_step(r)
        sent = float(s["bytes_sent"].median()) if "bytes_sent" in s else float("nan")
        recv = float(s["bytes_recv"].median()) if "bytes_recv" in s else float("nan")
        rows.append({
            "label": r.label,
            "backend": r.manifest.get("backend", "?"),
            "workers": r.workers,
            "grad_bytes": float(r.manifest.get("grad_bytes", 0) or 0),
            "sent": sent,
            "sent_predicted": ps,
            "sent_ratio": sent / ps if ps else float("nan"),
            "recv": recv,
            "recv_predicted": pr,
            "recv_ratio": recv / pr if pr else float("nan"),
            "nic_sent": float(s["nic_bytes_sent"].median()) if "nic_bytes_sent" in s else float("nan"),
        })
    return pd.DataFrame(rows)


# ---- All-reduce benchmark: alpha-beta model ---------------------------------------------------

BENCH_COLUMNS = ("backend", "nranks", "size_bytes", "time_s", "algbw_GBps", "busbw_GBps", "wrong")


class BenchError(ValueError):
    """A file is not a `ringtrain bench allreduce --json` result. The message says why."""


def load_bench(path: str) -> pd.DataFrame:
    """Read `ringtrain bench allreduce --json FILE` (DESIGN §4): one row per backend, world
    size and message size. Rows whose result was wrong (`wrong` > 0) are kept but flagged;
    `alpha_beta_fit` leaves them out."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except OSError as e:
        raise BenchError(f"{path}: cannot be read ({e.strerror})") from None
    except ValueError as e:
        raise BenchError(f"{path}: not valid JSON ({e})") from None
    rows = doc.get("rows", doc.get("results")) if isinstance(doc, dict) else doc
    if not isinstance(rows, list) or not rows:
        raise BenchError(f"{path}: expected a non-empty list of rows as written by `ringtrain bench allreduce --json`")
    df = pd.DataFrame(rows)
    missing = [c for c in BENCH_COLUMNS if c not in df]
    if missing:
        raise BenchError(f"{path}: rows lack the columns {missing} (have {list(df.columns)})")
    df["wrong"] = df["wrong"].fillna(0).astype(float)
    return df.sort_values(["backend", "nranks", "size_bytes"]).reset_index(drop=True)


def alpha_beta_fit(bench: pd.DataFrame, relative: bool = True) -> pd.DataFrame:
    """Least-squares fit of time = alpha + beta * bytes per (backend, nranks).

    alpha is the latency (s), beta the time per byte of message (s/B). `relative=True`
    minimises the relative error, so the latency-bound small messages count as much as the
    large ones (a plain fit is decided by the largest sizes alone). Negative coefficients are
    clamped to 0 and the other refitted. The implied bandwidths: algbw = 1/beta, and
    busbw = algbw * 2(N-1)/N, which compares with the link's bandwidth (DESIGN §2).
    `max_rel_err` is the fit's worst relative error over the sizes it saw."""
    rows = []
    ok = bench[bench["wrong"] <= 0] if "wrong" in bench else bench
    for (backend, n), g in ok.groupby(["backend", "nranks"]):
        x = g["size_bytes"].to_numpy(float)
        y = g["time_s"].to_numpy(float)
        w = 1.0 / y if relative else np.ones_like(y)
        alpha, beta = _lstsq_nonneg(x, y, w)
        pred = alpha + beta * x
        n = int(n)
        algbw = 1.0 / beta if beta > 0 else float("inf")
        rows.append({
            "backend": backend,
            "nranks": n,
            "alpha_s": alpha,
            "beta_s_per_byte": beta,
            "algbw_GBps": algbw / 1e9,
            "busbw_GBps": algbw * (2 * (n - 1) / n if n > 1 else 1.0) / 1e9,
            "points": int(len(g)),
            "max_rel_err": float(np.max(np.abs(pred - y) / y)) if len(y) else float("nan"),
        })
    return pd.DataFrame(rows)


def _lstsq_nonneg(x, y, w):
    if len(x) == 1:
        return 0.0, float(y[0] / x[0]) if x[0] else 0.0
    a = np.stack([np.ones_like(x), x], axis=1) * w[:, None]
    alpha, beta = np.linalg.lstsq(a, y * w, rcond=None)[0]
    if alpha < 0:  # through the origin
        alpha, beta = 0.0, float(np.sum(w * w * x * y) / np.sum(w * w * x * x))
    if beta < 0:  # pure latency
        alpha, beta = float(np.sum(w * w * y) / np.sum(w * w)), 0.0
    return float(alpha), float(beta)


def alpha_beta_predict(fit_row, size_bytes) -> np.ndarray:
    """The fitted all-reduce time (s) for the given message sizes."""
    return fit_row["alpha_s"] + fit_row["beta_s_per_byte"] * np.asarray(size_bytes, dtype=float)


def memcpy_bandwidth_GBps(nbytes: int = 64 << 20, repeats: int = 5) -> float:
    """This machine's memory copy rate (best of `repeats` copies of `nbytes`), GB/s. Ranks on
    one node exchange data through shared memory, so this is their "link" ceiling: a ring's
    busbw cannot beat it. Between nodes use the network's rate instead."""
    import time

    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


# ---- Step-time model: ring vs parameter server -------------------------------------------------


def link_from_fit(fit_row) -> tuple[float, float]:
    """(hop latency s, link bandwidth B/s) implied by an alpha-beta fit of an all-reduce at N
    ranks: a ring takes 2(N-1) hops (alpha / 2(N-1) each) and moves 2(N-1)/N*S over every link
    (so the link's rate is the fit's busbw)."""
    n = int(fit_row["nranks"])
    hops = 2 * (n - 1) if n > 1 else 1
    beta = float(fit_row["beta_s_per_byte"])
    link = (2 * (n - 1) / n if n > 1 else 1.0) / beta if beta > 0 else float("inf")
    return float(fit_row["alpha_s"]) / hops, link


def link_from_runs(runs) -> tuple[float, float]:
    """(hop latency, link bandwidth B/s) estimated from training runs when no benchmark is at
    hand: latency 0 and the median bus bandwidth that the all-reduce runs (N > 1) achieved
    during training (gradient bytes / t_comm, times 2(N-1)/N). t_comm includes waiting for
    slower peers, so this understates the link: a benchmark gives the better model. NaN
    bandwidth if no such run."""
    bws = []
    for r in runs:
        if r.workers > 1 and not is_parameter_server(r) and r.manifest.get("backend") != "none":
            m = run_metrics(r)
            if m["busbw_GBps"] == m["busbw_GBps"] and m["busbw_GBps"] > 0:
                bws.append(m["busbw_GBps"] * 1e9)
    return 0.0, float(np.median(bws)) if bws else float("nan")


def compute_time(runs) -> float:
    """Median seconds per step a rank spends outside communication (data, forward, backward,
    optimizer) over every rank-step of the given runs: the compute a step-time model adds its
    communication to. Pass runs of one model and per-rank batch size."""
    parts = [r.steps[[c for c in COMPUTE_PHASES if c in r.steps]].sum(axis=1) for r in runs]
    return float(pd.concat(parts).median()) if parts else float("nan")


def modeled_step_time(scheme: str, n: int, compute_s: float, grad_bytes: float, hop_latency_s: float, link_Bps: float, shards: int = 1) -> float:
    """Step time the cost model predicts: compute plus an unoverlapped gradient exchange.

    ring (and any all-reduce): 2(N-1) hops of latency, 2(N-1)/N*S bytes over each link.
    ps (one or `shards` dedicated servers): a push and a pull (2 latencies); the server links
    carry N*S/K each way, the bottleneck once N > 2. The ratio of the two bandwidth terms is
    `predicted_ps_over_ring`. Overlap with backward can only make a measured step shorter."""
    if n <= 1:
        return compute_s
    if is_parameter_server(scheme):
        comm = 2 * hop_latency_s + max(n * grad_bytes / shards, grad_bytes) / link_Bps
    else:
        comm = 2 * (n - 1) * hop_latency_s + ring_cost_model(grad_bytes, n) / link_Bps
    return compute_s + comm


def step_time_model(schemes, ns, compute_s: float, grad_bytes: float, hop_latency_s: float, link_Bps: float, batch_size: int, shards: int = 1) -> pd.DataFrame:
    """`modeled_step_time` over schemes x worker counts, with the throughput it implies
    (N * batch_size / step time). Rows: scheme, workers, step_s, throughput."""
    rows = []
    for sc in schemes:
        for n in ns:
            t = modeled_step_time(sc, int(n), compute_s, grad_bytes, hop_latency_s, link_Bps, shards)
            rows.append({"scheme": sc, "workers": int(n), "step_s": t, "throughput": int(n) * batch_size / t if t > 0 else float("nan")})
    return pd.DataFrame(rows)


def ps_over_ring_table(metrics) -> pd.DataFrame:
    """For every N with both a parameter-server run and a ring run (run_metrics dicts): the
    measured step-time ratio PS/ring, and the same ratio for the exposed communication alone,
    beside the bandwidth-bound prediction `predicted_ps_over_ring(N)` (communication only,
    one dedicated server). Empty when no such pair exists."""
    rows = []
    ring = {m["workers"]: m for m in metrics if m["backend"] == "ring"}
    for m in metrics:
        r = ring.get(m["workers"])
        if is_parameter_server(m["backend"]) and r is not None and m["workers"] > 1:
            rc = r["median_comm_exposed_s"]
            rows.append({
                "backend": m["backend"],
                "workers": m["workers"],
                "step_ratio": m["median_step_s"] / r["median_step_s"],
                "comm_ratio": m["median_comm_exposed_s"] / rc if rc and rc == rc else float("nan"),
                "predicted_comm_ratio": predicted_ps_over_ring(m["workers"]),
            })
    return pd.DataFrame(rows, columns=["backend", "workers", "step_ratio", "comm_ratio", "predicted_comm_ratio"])
