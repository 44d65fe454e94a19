"""The per-step, per-rank HDF5 log (DESIGN §3): RUN_DIR/rank-00000.h5, one file per rank.

One file per rank so no rank ever waits for another to log. Written with h5py in SWMR mode:
a reader (a notebook, `ringtrain report`) can open it while training runs, and a writer
killed with `kill -9` leaves a file that opens and holds every step up to the last flush.

Cost: rows are buffered in memory and written in blocks, once `flush_seconds` (default 1 s)
have passed or `flush_every` steps are buffered, whichever comes first. Writing a block costs
about 5 ms here (each column dataset is resized and written), so the time bound keeps
logging near 0.5% of training time whatever the step time, and a kill -9 loses at most
about a second of steps. Logging adds no communication. System counters (CPU %, NIC bytes)
are sampled once per block, and every row of the block gets the block's per-step average.

A resumed run (`--resume`) writes a new segment, rank-00000.seg-001.h5, ..., never
overwriting an earlier one; readers concatenate segments by their `segment` attribute.
"""
from __future__ import annotations

import glob
import json
import os
import time

import numpy as np

# Per-step columns: name -> dtype. The names are a contract (DESIGN §3).
COLUMNS = {
    "step": np.int64,
    "epoch": np.int32,
    "t_start": np.float64,  # seconds on rank 0's clock (time.time() + measured offset)
    "t_data": np.float64,
    "t_forward": np.float64,
    "t_backward": np.float64,
    "t_comm": np.float64,
    "t_comm_exposed": np.float64,
    "t_optimizer": np.float64,
    "t_step": np.float64,
    "bytes_sent": np.int64,
    "bytes_recv": np.int64,
    "samples": np.int32,
    "loss": np.float32,
    # Beyond the contract:
    "t_wait_peers": np.float64,  # arrival skew: wait for the slowest rank at the first exchange
    "cpu_percent": np.float32,  # this process, averaged over the flush block (100 = one core)
    "nic_bytes_sent": np.float64,  # host NIC bytes per step over the block (all NICs but lo)
    "nic_bytes_recv": np.float64,
    "grad_nonfinite": np.int8,  # 1 if this rank's local loss was NaN/Inf this step
    "num_workers": np.int32,  # workers taking part in this step (changes only in elastic runs)
    "recover_s": np.float64,  # elastic runs: time to rebuild communication after a loss (else 0)
}


def rank_file(run_dir: str, rank: int, segment: int = 0) -> str:
    base = f"rank-{rank:05d}"
    return os.path.join(run_dir, f"{base}.h5" if segment == 0 else f"{base}.seg-{segment:03d}.h5")


def next_segment(run_dir: str, rank: int) -> int:
    """The first segment number with no file yet for this rank (0 for a new run dir)."""
    seg = 0
    while os.path.exists(rank_file(run_dir, rank, seg)):
        seg += 1
    return seg


def _nic_bytes():
    import psutil

    tot_s = tot_r = 0
    for name, c in psutil.net_io_counters(pernic=True).items():
        if name != "lo":
            tot_s += c.bytes_sent
            tot_r += c.bytes_recv
    return tot_s, tot_r


class StepLog:
    """Writer. Created by every rank after the run directory exists; `append` once per step;
    `close` at the end (a crash without close loses at most the unflushed block)."""

    def __init__(self, path: str, manifest: dict, extra_columns: dict | None = None, flush_every: int = 200, flush_seconds: float = 1.0):
        import h5py
        import psutil

        self.path = path
        self.columns = dict(COLUMNS)
        for k, v in (extra_columns or {}).items():
            self.columns.setdefault(k, v)
        self.flush_every = max(1, int(flush_every))
        self.flush_seconds = flush_seconds
        self._rows: list[dict] = []
        self._last_flush = time.monotonic()
        self._proc = psutil.Process()
        self._proc.cpu_percent(None)
        self._nic = _nic_bytes()
        self.f = h5py.File(path, "w", libver="latest")
        for k, v in manifest.items():
            self.f.attrs[k] = _attr(v)
        self.f.attrs["columns"] = json.dumps(list(self.columns))
        self.dsets = {
            name: self.f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dt, chunks=(1024,))
            for name, dt in self.columns.items()
        }
        # After this, no new datasets or attributes: readers may attach at any time.
        self.f.swmr_mode = True
        self.steps_written = 0

    def append(self, row: dict) -> None:
        self._rows.append(row)
        if len(self._rows) >= self.flush_every or time.monotonic() - self._last_flush > self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        n = len(self._rows)
        cpu = self._proc.cpu_percent(None)
        try:
            nic = _nic_bytes()
            nic_s, nic_r = (nic[0] - self._nic[0]) / n, (nic[1] - self._nic[1]) / n
            self._nic = nic
        except Exception:  # no /proc/net/dev (some containers): record NaN rather than fail
            nic_s = nic_r = float("nan")
        start = self.steps_written
        for name, d in self.dsets.items():
            if name == "cpu_percent":
                col = np.full(n, cpu, dtype=d.dtype)
            elif name == "nic_bytes_sent":
                col = np.full(n, nic_s, dtype=d.dtype)
            elif name == "nic_bytes_recv":
                col = np.full(n, nic_r, dtype=d.dtype)
            else:
                fill = np.nan if np.issubdtype(d.dtype, np.floating) else 0
                col = np.array([r.get(name, fill) for r in self._rows], dtype=d.dtype)
            d.resize((start + n,))
            d[start:] = col
            d.flush()
        self.steps_written += n
        self._rows = []
        self._last_flush = time.monotonic()

    def close(self) -> None:
        if self.f is not None:
            self.flush()
            self.f.close()
            self.f = None


class NullLog:
    """Stands in for StepLog when logging is off (--no-log, and the logging-cost benchmark)."""

    path = None
    steps_written = 0

    def append(self, row):
        pass

    def flush(self):
        pass

    def close(self):
        pass


def _attr(v):
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v)
    if v is None:
        return ""
    return v


def rank_files(run_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(run_dir, "rank-*.h5")))
