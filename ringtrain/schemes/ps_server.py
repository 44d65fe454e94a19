"""The server side of the parameter-server schemes (ringtrain/schemes/ps.py): one
`ShardServer` per shard of the flat parameter vector, and its HDF5 log.

A shard server owns a float32 copy of its slice of the parameters and an optimizer built
like the workers' (same class, same param_groups hyperparameters; see `build_optimizer`).
It runs on a dedicated server rank (`serve()`, main thread) or on a worker rank's
background thread (colocated placement). Only one thread of a server touches MPI.

Wire protocol on the scheme's own communicator (buffers only, no pickle):

    worker -> shard   TAG_HDR   int64[4]  (kind, step, version the gradient was computed on, count)
                      TAG_DATA  float32[count]  the gradient slice (kind == PUSH only)
    shard -> worker   TAG_RHDR  int64[2]  (version of the parameters sent, staleness)
                      TAG_RDATA float32[count]  the parameter slice

A worker sends PUSH once per step and DONE once at the end (or its death is detected, under
ULFM). The server returns when every worker it serves is done or dead.

Modes:
    sync         wait for one push from every live worker, average them in worker order
                 (deterministic), apply one optimizer step, reply to all: one all-reduce step.
    async        apply each push as it arrives (gradient / N), then reply (Downpour-style).
    reply-first  reply with the current parameters at once, queue the gradient; an applier
                 thread applies queued gradients under a lock. The reply's staleness is that
                 of this worker's previous update (the current one is not applied yet).
    hogwild      the server does nothing on the data path: workers Accumulate into its MPI
                 window (ps.py). It only waits for DONE and samples the version counter.

Server log RUN_DIR/server-SSSSS.h5 (SWMR, like the step log), one row per applied update
(per round in sync mode): see SERVER_COLUMNS. RUN_DIR/server-SSSSS.json gets the totals,
the staleness histogram and the workers that were dropped.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import queue
import threading
import time

import numpy as np
import torch

TAG_INIT, TAG_HDR, TAG_DATA, TAG_RHDR, TAG_RDATA = 7301, 7302, 7303, 7304, 7305
KIND_PUSH, KIND_DONE = 1, 2

SERVER_COLUMNS = {
    "time": np.float64,  # rank 0's clock when the update was applied
    "version": np.int64,  # shard version after the update (number of updates applied)
    "worker": np.int32,  # worker whose gradient this was; -1 for a sync round
    "grads": np.int32,  # gradients in this update (sync: live workers; async: 1)
    "staleness": np.int64,  # versions applied between the worker's pull and this update
    "queue_depth": np.int32,  # pushes waiting when this one was taken
    "t_wait": np.float64,  # idle: waiting for the push(es) of this update
    "t_apply": np.float64,  # averaging + optimizer step
    "t_lock_wait": np.float64,  # waiting for the parameter lock (reply-first)
    "bytes_in": np.int64,  # gradient payload received for this update
    "bytes_out": np.int64,  # parameter payload sent for this update
}


class PeerFailure(RuntimeError):
    pass


# --------------------------------------------------------------------------- helpers


def proc_failed(exc) -> bool:
    """True for the ULFM errors that mean 'a peer died' (only raised under --with-ft ulfm)."""
    from mpi4py import MPI

    try:
        return exc.Get_error_class() in (MPI.ERR_PROC_FAILED, MPI.ERR_PROC_FAILED_PENDING, MPI.ERR_REVOKED)
    except Exception:
        return False


def failed_ranks(comm) -> list[int]:
    """Acknowledge failures on `comm` and return the ranks (of comm) known to be dead."""
    from mpi4py import MPI

    comm.Ack_failed()
    g = comm.Get_failed()
    try:
        return [r for r in MPI.Group.Translate_ranks(g, list(range(g.Get_size())), comm.Get_group()) if r >= 0]
    finally:
        g.Free()


def poll(test, timeout: float | None = None, what: str = "", max_sleep: float = 5e-4) -> None:
    """Call `test()` until it returns True, sleeping 10 us doubling to `max_sleep` between
    tries. Polling instead of MPI's blocking wait leaves the core to other ranks when ranks
    share cores, and keeps a dead peer from hanging us forever (TimeoutError after `timeout`)."""
    delay, t0 = 1e-5, time.monotonic()
    while not test():
        if timeout is not None and time.monotonic() - t0 > timeout:
            raise TimeoutError(f"no answer after {timeout:.0f} s: {what}")
        time.sleep(delay)
        delay = min(2 * delay, max_sleep)


def describe_optimizer(optimizer) -> dict:
    """The optimizer class and hyperparameters as JSON-able values (no tensors, no state)."""

    def plain(d):
        out = {}
        for k, v in d.items():
            if k == "params":
                continue
            if isinstance(v, tuple):
                v = list(v)
            try:
                json.dumps(v)
            except TypeError:
                continue  # tensors (a tensor lr) and objects: the constructor default stands
            out[k] = v
        return out

    cls = type(optimizer)
    return {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "defaults": plain(optimizer.defaults),
        "groups": [plain(g) for g in optimizer.param_groups],
    }


def build_optimizer(desc: dict, groups_of_pieces: list[list[torch.Tensor]]):
    """Build the worker's optimizer class over `groups_of_pieces` (one list per param group).
    Only elementwise optimizers (SGD, Adam, AdamW, RMSprop, Adagrad, ...) give the same result
    on a slice of a tensor as on the whole tensor, which sharding relies on."""
    module, _, name = desc["class"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    accepted = set(inspect.signature(cls.__init__).parameters)
    fix = lambda d: {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}  # noqa: E731
    defaults = {k: v for k, v in fix(desc["defaults"]).items() if k in accepted}
    groups = [{**fix(h), "params": ps} for h, ps in zip(desc["groups"], groups_of_pieces) if ps]
    return cls(groups, **defaults)


class ServerLog:
    """SWMR HDF5 table, one row per update; buffered, flushed every `flush_every` rows."""

    def __init__(self, path: str | None, manifest: dict, flush_every: int = 50):
        self.path = path
        self.rows: list[tuple] = []
        self.flush_every = flush_every
        self.f = None
        if not path:
            return
        import h5py

        self.f = h5py.File(path, "w", libver="latest")
        for k, v in manifest.items():
            self.f.attrs[k] = json.dumps(v) if isinstance(v, (dict, list, tuple)) else v
        self.f.attrs["columns"] = json.dumps(list(SERVER_COLUMNS))
        self.dsets = {n: self.f.create_dataset(n, shape=(0,), maxshape=(None,), dtype=dt, chunks=(1024,)) for n, dt in SERVER_COLUMNS.items()}
        self.f.swmr_mode = True

    def append(self, *row) -> None:
        if self.f is None:
            return
        self.rows.append(row)
        if len(self.rows) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if self.f is None or not self.rows:
            return
        cols = list(zip(*self.rows))
        for (name, d), col in zip(self.dsets.items(), cols):
            n0 = d.shape[0]
            d.resize((n0 + len(col),))
            d[n0:] = np.asarray(col, dtype=d.dtype)
            d.flush()
        self.rows = []

    def close(self) -> None:
        if self.f is not None:
            self.flush()
            self.f.close()
            self.f = None


# --------------------------------------------------------------------------- the server


class ShardServer:
    """Serves shard `shard` (parameters `values`, pieces of each param group) to `workers`
    (ranks of `comm`). `run()` returns when every worker sent DONE or died."""

    version_source = None  # hogwild: reads the version counter from the RMA window

    def __init__(self, comm, shard: int, values: torch.Tensor, pieces_by_group, desc: dict, workers: list[int],
                 mode: str, num_workers: int, clock=time.time, run_dir: str | None = None, manifest: dict | None = None,
                 timeout: float | None = None):
        self.comm = comm
        self.shard = shard
        self.mode = mode
        self.workers = list(workers)
        self.worker_index = {r: i for i, r in enumerate(self.workers)}
        self.live = set(self.workers)
        self.dropped: list[dict] = []
        self.num_workers = num_workers
        self.clock = clock
        self.timeout = timeout
        self.n = values.numel()
        self.params = values  # float32, contiguous; pieces are views of it
        self.grad = torch.zeros_like(values)
        pieces = []
        for group in pieces_by_group:
            ps = []
            for a, b in group:
                p = torch.nn.Parameter(self.params[a:b], requires_grad=True)  # shares storage
                p.grad = self.grad[a:b]
                ps.append(p)
            pieces.append(ps)
        self.optimizer = build_optimizer(desc, pieces) if self.n else None
        self.version = 0
        self.stale_of = {r: 0 for r in self.workers}  # staleness of each worker's last applied update
        self.hist: dict[int, int] = {}
        self.bytes_in = self.bytes_out = 0
        self.updates = 0
        self.t_apply_total = self.t_wait_total = self.t_lock_total = 0.0
        path = os.path.join(run_dir, f"server-{shard:05d}.h5") if run_dir else None
        self.run_dir = run_dir
        self.log = ServerLog(path, {**(manifest or {}), "shard": shard, "mode": mode, "shard_elements": self.n, "workers": self.workers})
        self.hdr = np.zeros(4, np.int64)
        self.lock = threading.Lock()

    # ---- receiving --------------------------------------------------------------------

    def _recv_header(self):
        """Next header from any live worker: (source, kind, step, version, count), or None
        when no worker is left. A worker that died (ULFM) is dropped and logged."""
        from mpi4py import MPI

        while self.live:
            st = MPI.Status()
            req = self.comm.Irecv(self.hdr, source=MPI.ANY_SOURCE, tag=TAG_HDR)
            while True:
                try:
                    poll(lambda: req.Test(st), what=f"shard {self.shard} waiting for workers {sorted(self.live)}")
                    break
                except MPI.Exception as e:
                    if not proc_failed(e):
                        raise
                    self._drop(failed_ranks(self.comm))
                    if not self.live:
                        req.Cancel()
                        return None
            src = st.Get_source()
            kind, step, ver, count = (int(v) for v in self.hdr)
            if src not in self.live:
                raise RuntimeError(f"shard {self.shard}: message from rank {src}, which is not a live worker of this shard")
            if kind == KIND_PUSH and count != self.n:
                raise ValueError(f"shard {self.shard}: worker rank {src} pushed {count} elements, this shard holds {self.n}; "
                                 "all ranks must build the same model")
            return src, kind, step, ver, count
        return None

    def _drop(self, dead: list[int]) -> None:
        for r in dead:
            if r in self.live:
                self.live.discard(r)
                self.dropped.append({"rank": r, "worker": self.worker_index[r], "version": self.version, "time": self.clock()})
                import sys

                sys.stderr.write(f"[rank {self.comm.Get_rank()}, server shard {self.shard}] worker {self.worker_index[r]} (rank {r}) died; dropped at version {self.version}, "
                                 f"{len(self.live)} worker(s) go on\n")
                sys.stderr.flush()

    def _recv_data(self, src: int, out: torch.Tensor) -> bool:
        """The gradient that follows src's header; False if src died meanwhile (dropped)."""
        from mpi4py import MPI

        try:
            self.comm.Recv([out.numpy(), self.n], source=src, tag=TAG_DATA)
        except MPI.Exception as e:
            if not proc_failed(e):
                raise
            self._drop(failed_ranks(self.comm))
            return False
        self.bytes_in += self.n * 4
        return True

    def _reply(self, dst: int, values: np.ndarray, version: int, staleness: int) -> None:
        from mpi4py import MPI

        try:
            self.comm.Send(np.array([version, staleness], np.int64), dest=dst, tag=TAG_RHDR)
            self.comm.Send([values, self.n], dest=dst, tag=TAG_RDATA)
        except MPI.Exception as e:
            if not proc_failed(e):
                raise
            self._drop(failed_ranks(self.comm))
            return
        self.bytes_out += self.n * 4

    def _waiting(self) -> int:
        """Workers whose next push is already here (queue depth), by probing each one."""
        from mpi4py import MPI

        try:
            return sum(1 for r in self.live if self.comm.Iprobe(source=r, tag=TAG_HDR))
        except MPI.Exception as e:
            if not proc_failed(e):
                raise
            self._drop(failed_ranks(self.comm))
            return -1

    def _record(self, staleness: int, count: int = 1) -> None:
        self.hist[staleness] = self.hist.get(staleness, 0) + count

    # ---- modes ------------------------------------------------------------------------

    def run(self) -> None:
        try:
            {"sync": self._run_sync, "async": self._run_async, "reply-first": self._run_reply_first, "hogwild": self._run_hogwild}[self.mode]()
        finally:
            self.log.close()
            self._write_summary()

    def _run_sync(self) -> None:
        slots = {r: torch.zeros(self.n) for r in self.workers}
        pending: dict[int, int] = {}  # worker -> version its gradient was computed on
        t_idle = time.perf_counter()
        while True:
            msg = self._recv_header()
            if msg is None:
                break
            src, kind, step, ver, _ = msg
            if kind == KIND_DONE:
                self.live.discard(src)
            elif self._recv_data(src, slots[src]):
                pending[src] = ver
            for r in [r for r in pending if r not in self.live]:
                del pending[r]  # died after pushing: its gradient is dropped with it
            if pending and set(pending) >= self.live:
                t_wait = time.perf_counter() - t_idle
                t0 = time.perf_counter()
                order = sorted(pending)  # worker order: the same sum on every run
                self.grad.copy_(slots[order[0]])
                for r in order[1:]:
                    self.grad.add_(slots[r])
                self.grad.div_(len(order))
                if self.optimizer is not None:
                    self.optimizer.step()
                self.version += 1
                t_apply = time.perf_counter() - t0
                out = self.params.numpy()
                for r in order:
                    self._reply(r, out, self.version, 0)
                self._record(0, len(order))
                self._account(-1, len(order), 0, 0, t_wait, t_apply, 0.0, len(order))
                pending.clear()
                t_idle = time.perf_counter()

    def _run_async(self) -> None:
        buf = torch.zeros(self.n)
        scale = 1.0 / self.num_workers
        while True:
            t0 = time.perf_counter()
            msg = self._recv_header()
            if msg is None:
                break
            src, kind, step, ver, _ = msg
            if kind == KIND_DONE:
                self.live.discard(src)
                continue
            depth = self._waiting()
            if not self._recv_data(src, buf):
                continue
            t1 = time.perf_counter()
            torch.mul(buf, scale, out=self.grad)
            if self.optimizer is not None:
                self.optimizer.step()
            stale = self.version - ver
            self.version += 1
            t2 = time.perf_counter()
            self._reply(src, self.params.numpy(), self.version, stale)
            self._record(stale)
            self._account(src, 1, stale, depth, t1 - t0, t2 - t1, 0.0, 1)

    def _run_reply_first(self) -> None:
        free: queue.Queue = queue.Queue()
        for _ in range(2 * len(self.workers)):
            free.put(torch.zeros(self.n))
        todo: queue.Queue = queue.Queue()
        scale = 1.0 / self.num_workers
        snapshot = torch.zeros(self.n)
        errors = []

        def applier():
            try:
                while True:
                    item = todo.get()
                    if item is None:
                        return
                    src, ver, g, depth, t_wait = item
                    t0 = time.perf_counter()
                    with self.lock:
                        t1 = time.perf_counter()
                        torch.mul(g, scale, out=self.grad)
                        if self.optimizer is not None:
                            self.optimizer.step()
                        stale = self.version - ver
                        self.version += 1
                        self.stale_of[src] = stale
                    t2 = time.perf_counter()
                    free.put(g)
                    self._record(stale)
                    self._account(src, 1, stale, depth, t_wait, t2 - t1, t1 - t0, 0)
            except BaseException as e:  # handed to the communication thread
                errors.append(e)

        th = threading.Thread(target=applier, name=f"ringtrain-ps-apply-{self.shard}", daemon=True)
        th.start()
        try:
            while True:
                t0 = time.perf_counter()
                msg = self._recv_header()
                if errors:
                    raise errors[0]
                if msg is None:
                    break
                src, kind, step, ver, _ = msg
                if kind == KIND_DONE:
                    self.live.discard(src)
                    continue
                g = free.get()  # blocks only when 2N gradients are queued (back-pressure)
                if not self._recv_data(src, g):
                    free.put(g)
                    continue
                t_wait = time.perf_counter() - t0
                t1 = time.perf_counter()
                with self.lock:
                    self.t_lock_total += time.perf_counter() - t1
                    snapshot.copy_(self.params)
                    version, stale = self.version, self.stale_of[src]
                self._reply(src, snapshot.numpy(), version, stale)
                todo.put((src, ver, g, todo.qsize(), t_wait))
        finally:
            todo.put(None)
            th.join()
        if errors:
            raise errors[0]

    def _run_hogwild(self, version_of=None) -> None:
        """Workers update the window themselves; wait for DONE, nothing else."""
        while True:
            msg = self._recv_header()
            if msg is None:
                break
            src, kind, *_ = msg
            if kind == KIND_DONE:
                self.live.discard(src)
            else:
                raise RuntimeError(f"shard {self.shard}: worker rank {src} pushed to a hogwild server (mixed --backend?)")

    # ---- bookkeeping -------------------------------------------------------------------

    def _account(self, worker, grads, stale, depth, t_wait, t_apply, t_lock, replies) -> None:
        self.updates += 1
        self.t_wait_total += t_wait
        self.t_apply_total += t_apply
        self.t_lock_total += t_lock
        nb = self.n * 4
        self.log.append(self.clock(), self.version, worker, grads, stale, depth, t_wait, t_apply, t_lock, grads * nb, max(replies, 1) * nb)

    def _write_summary(self) -> None:
        if self.version_source is not None:
            self.version = self.version_source()
        if not self.run_dir:
            return
        doc = {
            "shard": self.shard,
            "mode": self.mode,
            "shard_elements": self.n,
            "shard_bytes": self.n * 4,
            "workers": self.workers,
            "updates": self.updates,
            "final_version": self.version,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "t_apply_total": self.t_apply_total,
            "t_wait_total": self.t_wait_total,
            "t_lock_wait_total": self.t_lock_total,
            "staleness_histogram": {str(k): v for k, v in sorted(self.hist.items())},
            "dropped_workers": self.dropped,
        }
        path = os.path.join(self.run_dir, f"server-{self.shard:05d}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(doc, f, indent=2)
        os.replace(path + ".tmp", path)
