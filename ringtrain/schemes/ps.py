"""`--backend ps-*`: the parameter-server baseline, synchronous and asynchronous.

    # 1 dedicated server (rank 0) + 3 workers, synchronous: the same SGD step as ring
    mpirun -n 4 python -m ringtrain train --backend ps-sync --model mlp-wide
    # 2 dedicated servers, each holding half of the parameters (balanced by bytes)
    mpirun -n 5 python -m ringtrain train --backend ps-sync --ps-servers 2
    # no dedicated server: 4 workers, the 2 shards live on workers 0 and 1 (server thread)
    mpirun -n 4 python -m ringtrain train --backend ps-async --ps-servers 0 --ps-shards 2
    # lock-free: workers MPI_Accumulate their update into the server's RMA window
    mpirun -n 4 --mca osc ^ucx python -m ringtrain train --backend ps-hogwild

Variants (the server side is in ps_server.py):
    ps-sync               every worker pushes its gradient; each shard server averages all N,
                          applies ONE optimizer step, every worker pulls the new parameters.
                          Equivalent to one all-reduce step (DESIGN §2, tested against ring).
    ps-async              apply-then-reply: the server applies each gradient (scaled by 1/N, so
                          N pushes move as far as one sync step at the same --lr) as it
                          arrives, then sends the worker the parameters it now holds.
    ps-async-reply-first  the server replies with its current parameters at once and queues
                          the gradient; an applier thread applies the queue under a lock.
    ps-hogwild            no server code on the data path: each worker runs its own optimizer
                          (worker-local momentum) on its gradient / N, MPI_Accumulate(SUM)s the
                          parameter change into the server's RMA window and MPI_Gets the
                          parameters back, all under one shared Lock_all epoch (no mutual
                          exclusion: MPI makes each element's accumulate atomic, a Get may see
                          a half-applied update, as in Hogwild!). A version counter in a second
                          window, bumped with Fetch_and_op, gives the staleness.

Placement and sharding (recorded in the manifest): shard s of K lives on world rank s.
`--ps-servers K` (default 1): ranks 0..K-1 are dedicated servers (`is_worker` False,
driven by `serve()`), ranks K.. train; there are K shards. `--ps-servers 0`: colocated,
every rank trains and ranks 0..K-1 (K = `--ps-shards`) also serve a shard from a background
thread. Shards are contiguous slices of the flat float32 parameter vector, equal to within
one element, so bytes are balanced exactly. The server optimizer is built from the workers'
(class and param_groups hyperparameters) over views of its slice; that is exact only for
elementwise optimizers (SGD, Adam, AdamW, RMSprop, Adagrad; not LARS/LAMB).

Cost model (DESIGN §2). Per worker and step: push S bytes of gradients, pull S bytes of
parameters, whatever N and K are: `expected_bytes_per_step` = (S, S). Per server shard:
N·S/K in and N·S/K out. With one dedicated server the server's link carries N·S each way,
so a bandwidth-bound step takes N·S/B, while the ring moves 2(N-1)/N·S per rank in
parallel: PS time / ring time ≈ (N·S) / (2(N-1)/N·S) = N²/(2(N-1)) (N=4: 2.7x, N=16: 8.5x).
K shards on K distinct hosts divide the PS time by K.

What the step log records (per worker): t_comm = t_comm_exposed = push + server + pull wall
time, inside `end_backward` (the optimizer step happens on the server, so t_optimizer is
about zero; for ps-hogwild the local optimizer step shows as "other"). bytes_sent/recv =
payload (S up, S down) through MPI, including a colocated shard's messages to its own rank;
the 32-byte headers are not counted. Extra columns: `staleness` (largest over shards of the
number of updates other workers applied between this worker's pull and the application of
its gradient; 0 for ps-sync; for ps-async-reply-first, that of the previous step's gradient,
which is the latest one applied when the reply leaves) and `ps_version`.

Faults. Every wait polls with a timeout (`--ps-timeout`) and names the server ranks it waited
for; an exception on any rank aborts the job with its rank (world.install_abort_on_error).
A worker that dies: without ULFM, mpirun ends the whole job (nothing to do in-process). Under
`mpirun --with-ft ulfm --mca btl tcp,self`, the async servers (and ps-sync, which then averages
over the survivors) see the failure, drop the worker, write it to server-SSSSS.json and stderr,
and the other workers train on; the end-of-run metrics shrink the worker communicator. Not
covered: a dead server (the workers time out with its rank), and ps-hogwild (RMA windows are
not fault tolerant in Open MPI).

Snapshots: the worker model is saved (it holds the pulled parameters), but the optimizer state
lives on the servers: a resumed PS run restarts momentum from zero (ps-hogwild excepted).
"""
from __future__ import annotations

import json
import threading

import numpy as np
import torch

from ringtrain.broadcast import broadcast_module_state, broadcast_optimizer_state
from ringtrain.schemes.base import Scheme, StepStats, now
from ringtrain.schemes.ps_server import (
    KIND_DONE, KIND_PUSH, TAG_DATA, TAG_HDR, TAG_INIT, TAG_RDATA, TAG_RHDR,
    ShardServer, describe_optimizer, failed_ranks, poll, proc_failed,
)

MODES = {"ps-sync": "sync", "ps-async": "async", "ps-async-reply-first": "reply-first", "ps-hogwild": "hogwild"}


def shard_bounds(total: int, shards: int) -> list[tuple[int, int]]:
    """K contiguous [a, b) ranges covering 0..total, sizes differing by at most one element."""
    base, extra = divmod(total, shards)
    out, a = [], 0
    for s in range(shards):
        b = a + base + (1 if s < extra else 0)
        out.append((a, b))
        a = b
    return out


def shard_pieces(sizes, group_of, a: int, b: int, groups: int) -> list[list[tuple[int, int]]]:
    """For shard [a, b): per param group, the [start, end) ranges (relative to a) of each
    parameter's part that falls in the shard."""
    out = [[] for _ in range(groups)]
    off = 0
    for size, g in zip(sizes, group_of):
        lo, hi = max(off, a), min(off + size, b)
        if lo < hi:
            out[g].append((lo - a, hi - a))
        off += size
    return out


class ParameterServer(Scheme):
    """Config: ps_servers (dedicated server ranks, default 1; 0 = colocated), ps_shards
    (default ps_servers, or 1 when colocated), ps_timeout (seconds a worker waits for a
    server before failing, default 600)."""

    name = "ps-sync"
    averages_gradients = False  # each worker pushes its own; see Scheme.averages_gradients

    def __init__(self, world, config=None):
        super().__init__(world, config)
        self.mode = MODES[self.name]
        self.servers = int(self.config.get("ps_servers", 1) if self.config.get("ps_servers") is not None else 1)
        shards = self.config.get("ps_shards")
        self.shards = int(shards) if shards else max(1, self.servers)
        self.timeout = float(self.config.get("ps_timeout") or 600.0)
        n = world.size
        if self.servers < 0 or self.shards < 1:
            raise ValueError(f"--ps-servers must be >= 0 and --ps-shards >= 1 (got {self.servers}, {self.shards})")
        if self.servers and self.shards != self.servers:
            raise ValueError(f"with {self.servers} dedicated server rank(s) there is one shard per server: pass "
                             f"--ps-shards {self.servers} (or omit it), or --ps-servers 0 for colocated shards")
        if self.servers >= n:
            raise ValueError(f"--ps-servers {self.servers} leaves no worker in a world of {n} rank(s): "
                             f"launch with mpirun -n {self.servers + 1} or more, or pass --ps-servers 0 (colocated)")
        if self.shards > n:
            raise ValueError(f"--ps-shards {self.shards} needs at least {self.shards} ranks (world has {n})")
        self.placement = "dedicated" if self.servers else "colocated"
        self.is_worker = world.rank >= self.servers
        self.worker_rank = world.rank - self.servers
        self.num_workers = n - self.servers
        self.hosts_shard = world.rank < self.shards
        self.server: ShardServer | None = None
        self._thread = None
        self._stats = StepStats()
        self._failed_workers = 0
        self.comm = self.wcomm = None
        self.win = self.cwin = None

    # ---- set-up (collective over the world: workers in setup(), servers in serve()) -----

    def _connect(self, model=None, optimizer=None) -> None:
        from mpi4py import MPI

        world = self.world
        self.comm = world.comm.Dup()
        self.wcomm = world.comm.Split(0 if self.is_worker else MPI.UNDEFINED, key=world.rank)
        root = self.servers  # world rank of worker 0
        desc = None
        if self.is_worker:
            # Identical start on the workers (their optimizer only matters for ps-hogwild).
            broadcast_module_state(model, self.wcomm)
            broadcast_optimizer_state(optimizer, self.wcomm)
            params = [p for p in model.parameters() if p.requires_grad]
            if any(p.device.type != "cpu" for p in params):
                raise NotImplementedError(f"rank {world.rank}: the parameter-server schemes exchange host (CPU) tensors; "
                                          "run them with --device cpu, or use ring/mpi/ddp/horovod on GPUs")
            bad = sorted({str(p.dtype) for p in params} - {"torch.float32"})
            if bad:
                raise TypeError(f"rank {world.rank}: the parameter-server schemes move float32 parameters; the model has {', '.join(bad)}")
            group_of_id = {id(p): g for g, grp in enumerate(optimizer.param_groups) for p in grp["params"]}
            desc = {
                "sizes": [p.numel() for p in params],
                "group_of": [group_of_id.get(id(p), 0) for p in params],
                "optimizer": describe_optimizer(optimizer),
            }
        text = world.bcast_bytes(json.dumps(desc).encode() if world.rank == root else None, root=root)
        self.desc = json.loads(text.decode())
        self.total = sum(self.desc["sizes"])
        self.grad_bytes = 4 * self.total
        self.bounds = shard_bounds(self.total, self.shards)

        if self.is_worker:
            # The model's parameters become views of one flat buffer, so pulled parameters
            # land in place (like DDP's gradient_as_bucket_view, for the values).
            self.params = [p for p in model.parameters() if p.requires_grad]
            self.flat = torch.cat([p.detach().reshape(-1) for p in self.params]) if self.params else torch.zeros(0)
            self.offsets, off = [], 0
            for p in self.params:
                p.data = self.flat[off : off + p.numel()].view_as(p)
                self.offsets.append((off, off + p.numel()))
                off += p.numel()
            self.flat_grad = torch.zeros_like(self.flat)
            self.versions = np.zeros(self.shards, np.int64)
            self.optimizer = optimizer

        # Each shard host gets its initial slice: dedicated servers from worker 0, colocated
        # hosts from their own (already identical) parameters.
        values = None
        if self.hosts_shard:
            lo, hi = self.bounds[world.rank]
            values = torch.zeros(hi - lo)
        reqs = []
        if self.servers and world.rank == root:
            for s, (a, b) in enumerate(self.bounds):
                reqs.append(self.comm.Isend([self.flat[a:b].numpy(), MPI.FLOAT], dest=s, tag=TAG_INIT))
        if self.hosts_shard:
            if self.servers:
                self.comm.Recv([values.numpy(), MPI.FLOAT], source=root, tag=TAG_INIT)
            else:
                values.copy_(self.flat[lo:hi])
        MPI.Request.Waitall(reqs)

        if self.mode == "hogwild":
            self._make_windows(values)

        if self.hosts_shard:
            s = world.rank
            groups = len(self.desc["optimizer"]["groups"])
            pieces = shard_pieces(self.desc["sizes"], self.desc["group_of"], *self.bounds[s], groups)
            workers = list(range(self.servers, world.size))
            self.server = ShardServer(
                self.comm, s, values, pieces, self.desc["optimizer"], workers, self.mode, self.num_workers,
                clock=world.now, run_dir=self.config.get("run_dir"), manifest=self._server_manifest(),
            )
            if self.mode == "hogwild":
                self.server.version_source = lambda: int(np.frombuffer(self.cwin.tomemory(), np.int64)[0])

    def _make_windows(self, values) -> None:
        from mpi4py import MPI

        nbytes = 4 * values.numel() if values is not None else 0
        self.win = MPI.Win.Allocate(nbytes, 4, comm=self.comm)
        self.cwin = MPI.Win.Allocate(8 if values is not None else 0, 8, comm=self.comm)
        if values is not None:
            np.frombuffer(self.win.tomemory(), np.float32)[:] = values.numpy()
            np.frombuffer(self.cwin.tomemory(), np.int64)[:] = 0
        self.comm.Barrier()  # windows initialised before any worker reads them
        if self.is_worker:
            self.win.Lock_all()
            self.cwin.Lock_all()
            self.prev = torch.zeros_like(self.flat)
            self.delta = torch.zeros_like(self.flat)

    def _server_manifest(self) -> dict:
        return {"scheme": self.name, "world_size": self.world.size, "num_workers": self.num_workers,
                "hostname": self.world.hostname, "rank": self.world.rank, "clock_offset": self.world.clock_offset,
                "config": json.dumps(self.config, default=str), **{f"scheme_{k}": v for k, v in self.manifest().items()}}

    # ---- worker side --------------------------------------------------------------------

    def setup(self, model, optimizer):
        self._connect(model, optimizer)
        if self.server is not None:  # colocated shard: serve it from a background thread
            self._thread = threading.Thread(target=self.server.run, name=f"ringtrain-ps-shard-{self.world.rank}", daemon=True)
            self._thread.start()
        return model

    def begin_step(self, step: int) -> None:
        self._stats = StepStats()
        self._step = step

    def end_backward(self) -> None:
        for p, (a, b) in zip(self.params, self.offsets):
            if p.grad is None:
                self.flat_grad[a:b].zero_()  # unused parameter: contributes zeros
            else:
                self.flat_grad[a:b].copy_(p.grad.reshape(-1))
        if self.mode == "hogwild":
            self._exchange_rma()
        else:
            self._exchange_p2p()
        # Every param.grad points at the gradient this worker pushed (the parameters are
        # already updated).
        for p, (a, b) in zip(self.params, self.offsets):
            p.grad = self.flat_grad[a:b].view_as(p)

    def _exchange_p2p(self) -> None:
        from mpi4py import MPI

        t0 = now()
        comm, reqs = self.comm, []
        self._hdrs = np.zeros((self.shards, 4), np.int64)
        self._rhdrs = np.zeros((self.shards, 2), np.int64)
        for s, (a, b) in enumerate(self.bounds):
            self._hdrs[s] = (KIND_PUSH, self._step, self.versions[s], b - a)
            reqs.append(comm.Isend(self._hdrs[s], dest=s, tag=TAG_HDR))
            reqs.append(comm.Isend([self.flat_grad[a:b].numpy(), MPI.FLOAT], dest=s, tag=TAG_DATA))
            reqs.append(comm.Irecv(self._rhdrs[s], source=s, tag=TAG_RHDR))
            reqs.append(comm.Irecv([self.flat[a:b].numpy(), MPI.FLOAT], source=s, tag=TAG_RDATA))
        poll(lambda: MPI.Request.Testall(reqs), timeout=self.timeout,
             what=f"worker rank {self.world.rank} (step {self._step}) waiting for parameter server rank(s) {list(range(self.shards))}")
        t = now() - t0
        self.versions[:] = self._rhdrs[:, 0]
        st = self._stats
        st.t_comm = st.t_comm_exposed = t
        st.bytes_sent = st.bytes_recv = self.grad_bytes
        st.extra = {"staleness": int(self._rhdrs[:, 1].max()), "ps_version": int(self.versions.min())}

    def _exchange_rma(self) -> None:
        from mpi4py import MPI

        # The worker's own optimizer turns its gradient / N into a parameter change ...
        for p in self.params:
            if p.grad is not None:
                p.grad.mul_(1.0 / self.num_workers)
        self.prev.copy_(self.flat)
        self.optimizer.step()
        torch.sub(self.flat, self.prev, out=self.delta)
        # ... which is added into each shard's window; then the parameters are read back.
        t0 = now()
        one, old = np.ones(1, np.int64), np.zeros((self.shards, 1), np.int64)
        ver = np.zeros((self.shards, 1), np.int64)
        for s, (a, b) in enumerate(self.bounds):
            self.win.Accumulate([self.delta[a:b].numpy(), MPI.FLOAT], s, op=MPI.SUM)
        for s in range(self.shards):
            self.win.Flush(s)
            self.cwin.Fetch_and_op(one, old[s], s, op=MPI.SUM)
        for s, (a, b) in enumerate(self.bounds):
            self.win.Get([self.flat[a:b].numpy(), MPI.FLOAT], s)
            self.cwin.Flush(s)
        for s in range(self.shards):
            self.win.Flush(s)
            self.cwin.Fetch_and_op(one, ver[s], s, op=MPI.NO_OP)
            self.cwin.Flush(s)
        t = now() - t0
        stale = int((old[:, 0] - self.versions).max())
        self.versions[:] = ver[:, 0]
        st = self._stats
        st.t_comm = st.t_comm_exposed = t
        st.bytes_sent = st.bytes_recv = self.grad_bytes
        st.extra = {"staleness": stale, "ps_version": int(self.versions.min())}

    def optimizer_step(self, optimizer) -> None:
        """Nothing: the update was applied by the server (or into its window) in end_backward."""

    def end_step(self) -> StepStats:
        st, self._stats = self._stats, StepStats()
        return st

    # ---- server side --------------------------------------------------------------------

    def serve(self) -> None:
        """Dedicated server rank: serve shard `rank` until every worker is done or dead."""
        self._connect()
        self.server.run()

    # ---- both ---------------------------------------------------------------------------

    def close(self) -> None:
        from mpi4py import MPI

        if self.comm is None:
            return
        if self.is_worker:
            if self.win is not None:
                self.win.Unlock_all()
                self.cwin.Unlock_all()
            hdr = np.array([KIND_DONE, -1, 0, 0], np.int64)
            for s in range(self.shards):
                self.comm.Send(hdr, dest=s, tag=TAG_HDR)
            if self._thread is not None:
                self._thread.join()
        if self.win is not None:
            self.win.Free()
            self.cwin.Free()
            self.win = self.cwin = None
        if self.server is not None and self.server.dropped or self._failed_workers:
            return  # a communicator with a dead member: freeing it could block; exit frees it
        self.comm.Free()
        if self.wcomm not in (None, MPI.COMM_NULL):
            self.wcomm.Free()
        self.comm = None

    def allreduce_metrics(self, values) -> np.ndarray:
        """Sum over the live workers. A worker that died (ULFM) is left out: the worker
        communicator is revoked and shrunk, and the sum is taken over the survivors."""
        from mpi4py import MPI

        a = np.ascontiguousarray(values, dtype=np.float64)
        out = np.empty_like(a)
        while True:
            try:
                self.wcomm.Allreduce(a, out, op=MPI.SUM)
                return out
            except MPI.Exception as e:
                if not proc_failed(e):
                    raise
                self._shrink_workers()

    def broadcast_metrics(self, values) -> np.ndarray:
        a = np.ascontiguousarray(values, dtype=np.float64).copy()
        self.wcomm.Bcast(a, root=0)
        return a

    def _shrink_workers(self) -> None:
        before = self.wcomm.Get_size()
        failed_ranks(self.wcomm)
        self.wcomm.Revoke()
        self.wcomm = self.wcomm.Shrink()
        self._failed_workers += before - self.wcomm.Get_size()
        import sys

        sys.stderr.write(f"[rank {self.world.rank}] {before - self.wcomm.Get_size()} worker(s) died; "
                         f"metrics over the {self.wcomm.Get_size()} survivors\n")

    def manifest(self) -> dict:
        return {
            "ps_mode": self.mode,
            "ps_placement": self.placement,
            "ps_servers": self.servers,
            "ps_shards": self.shards,
            "ps_server_ranks": list(range(self.shards)),
            "ps_shard_bytes": [4 * (b - a) for a, b in getattr(self, "bounds", [])],
            "ps_transport": "MPI RMA windows: Accumulate(SUM) + Get under Lock_all" if self.mode == "hogwild"
            else "MPI point-to-point Isend/Irecv (buffers)",
            "ps_async_gradient_scale": "1" if self.mode == "sync" else "1/num_workers",
            "bytes_counted_by": "payload: S of gradients up, S of parameters down per step (headers not counted)",
        }

    def extra_columns(self) -> dict:
        return {"staleness": np.int64, "ps_version": np.int64}

    def expected_bytes_per_step(self, grad_bytes: int) -> tuple[float, float]:
        return float(grad_bytes), float(grad_bytes)


class PsSync(ParameterServer):
    name = "ps-sync"


class PsAsync(ParameterServer):
    name = "ps-async"


class PsAsyncReplyFirst(ParameterServer):
    name = "ps-async-reply-first"


class PsHogwild(ParameterServer):
    name = "ps-hogwild"
