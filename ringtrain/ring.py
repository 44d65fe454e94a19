"""Bandwidth-optimal ring all-reduce in pure mpi4py + numpy.

    ring = Ring(MPI.COMM_WORLD)                  # collective: duplicates the communicator
    ring.allreduce_(grad)                        # in place, blocking; average by default
    h = ring.allreduce_async_(grad, op="sum")    # in place, returns at once
    ...                                          # overlap other work here
    ring.synchronize(h)                          # grad now holds the sum over all ranks

Algorithm. The buffer of n elements is cut into N contiguous segments (sizes differ by at
most one element). Reduce-scatter: in N-1 steps every rank sends one segment to its right
neighbour and adds the one arriving from its left into place; afterwards rank r holds the
complete sum of segment (r+1) mod N. All-gather: N-1 more steps pass the complete segments
around. Per rank that is 2(N-1) messages and 2(N-1)/N·S bytes each way, independent of N:
the bandwidth-optimal schedule (Patarasuk & Yuan 2009; the one NCCL and Horovod use).

In step s (0 <= s < 2(N-1)) rank r receives segment (r-s-1) mod N from the left and sends
segment (r-s) mod N to the right, which is exactly the segment it finished in step s-1. So
each segment is split into chunks and every chunk is forwarded the moment it has been
reduced (or received): the pipeline runs across step boundaries and the transfer of chunk
k+1 overlaps the reduction of chunk k. That pays off across nodes; on one node the receiving
core does the copy itself, so there the default is one message per segment (see Ring).

Contract of every call: collective over the ring's communicator; every rank calls with the
same element count, dtype and op, in the same order (checked, see `check`). Buffers are
reduced in place; a torch tensor is used through a numpy view of its memory, never copied.
Only buffer-based MPI calls carry data (no pickle).
"""
from __future__ import annotations

import functools
import threading
import time
import zlib
from dataclasses import dataclass

import numpy as np

from ringtrain.engine import Engine, Handle

# Pipeline chunk when the ring crosses nodes. Large enough that per-chunk Python overhead (a
# few µs) is small against the transfer; small enough that a multi-MiB segment is split into
# several chunks, so the network moves chunk k+1 while this rank adds chunk k.
DEFAULT_CHUNK_BYTES = 1 << 20

# Polite waiting (see Waiter): first sleep and longest sleep between MPI_Test calls.
# The longest sleep bounds the latency a polite wait adds once the message is there.
POLL_FIRST_S = 20e-6
POLL_MAX_S = 0.5e-3

OPS = ("sum", "average")

# dtype name -> (code sent in the layout header, wire numpy dtype)
_DTYPES = {
    "float32": (1, np.float32),
    "float64": (2, np.float64),
    "float16": (3, np.float16),
    "bfloat16": (4, np.uint16),  # numpy has no bfloat16: carried as raw 16-bit words
}
_CODE_TO_DTYPE = {code: name for name, (code, _) in _DTYPES.items()}


class Waiter:
    """How a communication thread waits for its MPI requests: `waitall(reqs)` returns when all
    of them are complete.

    polite False: in MPI_Waitall, which polls at full speed on a core (lowest latency; right
    when nothing else wants the core). polite True: MPI_Testall calls (each also drives MPI's
    progress engine) separated by sleeps growing from POLL_FIRST_S to POLL_MAX_S, which leave
    the core to a backward pass running beside the exchange on the same rank. The flag may be
    set from another thread at any time; switching it off (at the end of backward) also wakes
    a polite wait in flight, which then finishes at full speed.
    """

    __slots__ = ("_fast",)

    def __init__(self, polite: bool = False):
        self._fast = threading.Event()  # set: wait at full speed; also the sleep to wake from
        self.polite = polite

    @property
    def polite(self) -> bool:
        return not self._fast.is_set()

    @polite.setter
    def polite(self, value: bool) -> None:
        if value:
            self._fast.clear()
        else:
            self._fast.set()

    def waitall(self, reqs) -> None:
        MPI = _mpi()
        fast = self._fast
        statuses = [MPI.Status() for _ in reqs]
        try:
            if fast.is_set():
                MPI.Request.Waitall(reqs, statuses)
                return
            delay = POLL_FIRST_S
            while not MPI.Request.Testall(reqs, statuses):
                if fast.wait(delay):  # woken: switched to full speed
                    MPI.Request.Waitall(reqs, statuses)
                    return
                delay = min(2 * delay, POLL_MAX_S)
        except MPI.Exception as e:
            # A list call reports ERR_IN_STATUS; raise the request's own error instead (e.g.
            # ERR_PROC_FAILED under ULFM, which the elastic scheme recovers from).
            if e.Get_error_class() == MPI.ERR_IN_STATUS:
                for st in statuses:
                    if st.Get_error() not in (MPI.SUCCESS, MPI.ERR_PENDING):
                        raise MPI.Exception(st.Get_error()) from e
            raise


class RingMismatchError(ValueError):
    """Ranks called the same all-reduce with different sizes, dtypes, ops or order.
    Raised on every rank at once, so none is left waiting."""


@dataclass
class CallStats:
    """What one all-reduce call did on this rank."""

    count: int = 0
    dtype: str = ""
    bytes_sent: int = 0
    bytes_recv: int = 0
    t_wait_peers: float = 0.0  # time in the layout check: waiting for the slowest rank to arrive
    t_ring: float = 0.0  # time in the ring proper


def _mpi():
    from mpi4py import MPI

    return MPI


_NUMPY_NAMES = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64", np.dtype(np.float16): "float16"}
_TORCH_NAMES: dict = {}  # torch.float32 -> "float32", ...; filled on first use (torch is imported lazily)


def as_wire_array(buf) -> tuple[np.ndarray, str]:
    """A 1-D numpy view of `buf`'s memory (no copy) and its dtype name.

    Accepts a numpy array or a torch CPU tensor, contiguous. Raises TypeError otherwise:
    an all-reduce that silently reduced a copy would leave the caller's buffer unchanged.
    """
    if isinstance(buf, np.ndarray):
        if not buf.flags.c_contiguous:
            raise TypeError("ring all-reduce needs a C-contiguous array (it reduces in place)")
        name = _NUMPY_NAMES.get(buf.dtype)
        if name is None:
            raise TypeError(f"ring all-reduce supports {sorted(_DTYPES)}, got numpy {buf.dtype}")
        return buf.reshape(-1), name
    import torch

    if not _TORCH_NAMES:
        _TORCH_NAMES.update({getattr(torch, name): name for name in _DTYPES})
    if not isinstance(buf, torch.Tensor):
        raise TypeError(f"ring all-reduce takes a numpy array or torch tensor, got {type(buf).__name__}")
    if buf.device.type != "cpu":
        raise TypeError(
            f"ring all-reduce got a tensor on {buf.device}; pass a CPU tensor, or use the staged "
            f"CUDA path (ringtrain.staging) which copies through pinned host memory"
        )
    if not buf.is_contiguous():
        raise TypeError("ring all-reduce needs a contiguous tensor (it reduces in place)")
    t = buf.detach()
    name = _TORCH_NAMES.get(t.dtype)
    if name is None:
        raise TypeError(f"ring all-reduce supports {sorted(_DTYPES)}, got {t.dtype}")
    if name == "bfloat16":
        return t.view(torch.int16).numpy().view(np.uint16).reshape(-1), name
    return t.numpy().reshape(-1), name


@functools.lru_cache(maxsize=None)
def _reducer(dtype: str):
    """(add(dst, src), scale(dst, n)) for a wire dtype; both in place on numpy views."""
    if dtype in ("float32", "float64"):

        def add(dst, src):
            np.add(dst, src, out=dst)

        def divide(dst, n):
            np.divide(dst, n, out=dst)

        return add, divide
    import torch

    # 16-bit types: torch computes each add in float32 and rounds once to the 16-bit result
    # (numpy's float16 arithmetic is far slower, and numpy has no bfloat16 at all).
    tdt = torch.float16 if dtype == "float16" else torch.bfloat16

    def view(a):
        t = torch.from_numpy(a)
        return t if dtype == "float16" else t.view(torch.int16).view(tdt)

    def add16(dst, src):
        view(dst).add_(view(src))

    def divide16(dst, n):
        v = view(dst)
        v.copy_(v.float().div_(n))

    return add16, divide16


@functools.lru_cache(maxsize=1024)
def _bounds(n: int, N: int) -> tuple[int, ...]:
    """Segment boundaries: segment i is [b[i], b[i+1]); sizes differ by at most one element."""
    return tuple((i * n) // N for i in range(N + 1))


class Ring:
    """A ring over a duplicate of `comm` (collective constructor: every rank calls it).

    chunk_bytes  pipeline chunk size in bytes; 0 sends each segment whole (no pipelining).
                 None (the default) picks by locality, once, at construction: whole segments
                 when every rank of `comm` is on this node, DEFAULT_CHUNK_BYTES otherwise.
                 Why: over shared memory the receiving rank's own core copies each message
                 (single-copy CMA), so on one core per rank the copy of chunk k+1 cannot run
                 beside the add of chunk k, and smaller chunks only add Python-to-MPI calls
                 (measured here: 8-12 % slower at 4-16 MiB with 1 MiB chunks). Over a network
                 the NIC and the kernel move the bytes, and the pipeline pays off.
    check        "always": every call first agrees on (count, dtype, op, name, call index)
                 with one tiny MPI_Allreduce, so a mismatch raises RingMismatchError on every
                 rank instead of hanging, and the time spent there measures how long this rank
                 waited for the slowest one. "never": skip it (15-45 µs per call at N = 2 on
                 one node, measured with scripts/ring_floor.py).

    polite       how the ring waits for its peers (see Waiter); an attribute that the owner
                 may flip at any time, e.g. on while backward computes beside the ring. The
                 constructor's value also fixes the kind of the layout check's collective on
                 this ring: non-blocking (waited on politely or not) when constructed polite,
                 the blocking MPI_Allreduce otherwise, which costs a third as much on one
                 node. Every rank must construct its ring alike: the two kinds do not match.
    """

    def __init__(self, comm=None, chunk_bytes: int | None = None, check: str = "always", polite: bool = False):
        MPI = _mpi()
        if check not in ("always", "never"):
            raise ValueError(f"check must be 'always' or 'never', got {check!r}")
        if chunk_bytes is not None and int(chunk_bytes) < 0:
            raise ValueError(f"chunk_bytes must be >= 0 (0: no pipelining), got {chunk_bytes}")
        self.comm = (comm if comm is not None else MPI.COMM_WORLD).Dup()
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.chunk_bytes = default_chunk_bytes(self.comm) if chunk_bytes is None else int(chunk_bytes)
        self.check = check
        self.waiter = Waiter(polite)
        self._check_waiter = self.waiter if polite else None  # fixed for the ring's life, see above
        self.calls = 0  # calls submitted so far (identical on every rank when used correctly)
        self.bytes_sent = 0  # running totals over all calls
        self.bytes_recv = 0
        self.last = CallStats()
        self._engine = Engine(f"ringtrain-ring-{self.rank}")
        self._tmp = np.empty(0, dtype=np.uint8)

    # ---- public API ---------------------------------------------------------------------

    def allreduce_(self, buf, op: str = "average", name: str | None = None):
        """Blocking, in place. Returns `buf`. Collective."""
        return self.synchronize(self._submit(buf, op, name, inline_if_idle=True))

    def allreduce_async_(self, buf, op: str = "average", name: str | None = None, before=None) -> Handle:
        """Start an in-place all-reduce on the background thread; returns a Handle at once.
        `buf` must not be read or written until `synchronize(handle)` returns. Collective:
        every rank must start the same calls in the same order. `before`, if given, runs on
        the background thread first (e.g. waiting for a device-to-host copy into `buf`)."""
        return self._submit(buf, op, name, inline_if_idle=False, before=before)

    def synchronize(self, handle: Handle):
        """Wait for an async call; returns its buffer, re-raises its error."""
        return handle.wait()

    def close(self) -> None:
        """Stop the background thread and free the communicator. Collective."""
        self._engine.close()
        if self.comm is not None:
            self.comm.Free()
            self.comm = None

    # ---- internals ------------------------------------------------------------------------

    def _submit(self, buf, op, name, inline_if_idle, before=None):
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")
        arr, dtype = as_wire_array(buf)
        seq = self.calls
        self.calls += 1
        if inline_if_idle and self._engine.idle:
            return self._engine.run_inline(self._call, buf, arr, dtype, op, name, seq, before)
        return self._engine.submit(self._call, buf, arr, dtype, op, name, seq, before)

    def _call(self, handle: Handle, buf, arr, dtype, op, name, seq, before=None):
        if before is not None:
            before()
        stats = CallStats(count=arr.size, dtype=dtype)
        t0 = time.perf_counter()
        if self.check == "always":
            self._check_layout(arr.size, dtype, op, name, seq)
        t1 = time.perf_counter()
        stats.t_wait_peers = t1 - t0
        if self.size > 1 and arr.size > 0:
            stats.bytes_sent, stats.bytes_recv = self._ring(arr, dtype, op == "average")
        stats.t_ring = time.perf_counter() - t1
        self.bytes_sent += stats.bytes_sent
        self.bytes_recv += stats.bytes_recv
        self.last = stats
        handle.info["stats"] = stats
        return buf

    def _check_layout(self, count, dtype, op, name, seq) -> None:
        check_layout(self.comm, count, dtype, op, name, seq, self._check_waiter)

    @property
    def polite(self) -> bool:
        return self.waiter.polite

    @polite.setter
    def polite(self, value: bool) -> None:
        self.waiter.polite = bool(value)

    def _ring(self, arr: np.ndarray, dtype: str, average: bool) -> tuple[int, int]:
        MPI = _mpi()
        comm, N, r = self.comm, self.size, self.rank
        n, isz = arr.size, arr.itemsize
        bounds = _bounds(n, N)
        chunk = max(1, self.chunk_bytes // isz) if self.chunk_bytes else n
        right, left = (r + 1) % N, (r - 1) % N
        nsteps = 2 * (N - 1)
        add, divide = _reducer(dtype)
        raw = arr.view(np.uint8)  # bytes go on the wire: [buffer, MPI.BYTE] works for every dtype

        max_seg = bounds[-1] - bounds[-2]  # segments grow by at most one element, the last is largest
        if self._tmp.nbytes < max_seg * isz:
            self._tmp = np.empty(max_seg * isz, dtype=np.uint8)
        tmp = self._tmp[: max_seg * isz].view(arr.dtype)

        def chunks(seg):
            lo, hi = bounds[seg], bounds[seg + 1]
            return [(a, min(a + chunk, hi)) for a in range(lo, hi, chunk)]

        if max_seg <= chunk:
            return self._ring_unchunked(comm, arr, raw, tmp, bounds, add, divide, average)

        sent = recv = 0
        send_reqs = []
        for a, b in chunks(r):  # step 0 sends this rank's own segment
            send_reqs.append(comm.Isend([raw[a * isz : b * isz], MPI.BYTE], right, tag=0))
            sent += (b - a) * isz
        for s in range(nsteps):
            seg = (r - s - 1) % N
            reduce_step = s < N - 1  # reduce-scatter: add into place; all-gather: copy into place
            lo = bounds[seg]
            cks = chunks(seg)
            if reduce_step:
                recv_reqs = [
                    comm.Irecv([tmp[a - lo : b - lo].view(np.uint8), MPI.BYTE], left, tag=s) for a, b in cks
                ]
            else:
                recv_reqs = [comm.Irecv([raw[a * isz : b * isz], MPI.BYTE], left, tag=s) for a, b in cks]
            next_sends = []
            for k, (a, b) in enumerate(cks):
                self.waiter.waitall(recv_reqs[k : k + 1])
                recv += (b - a) * isz
                if reduce_step:
                    add(arr[a:b], tmp[a - lo : b - lo])
                    if s == N - 2 and average:
                        divide(arr[a:b], N)  # this chunk is now final: average before passing it on
                if s + 1 < nsteps:  # forward what we just finished: next step's send segment
                    next_sends.append(comm.Isend([raw[a * isz : b * isz], MPI.BYTE], right, tag=s + 1))
                    sent += (b - a) * isz
            # This step's sends must be complete before any later step may write the region
            # they read from (the all-gather overwrites it N-1 steps later).
            self.waiter.waitall(send_reqs)
            send_reqs = next_sends
        self.waiter.waitall(send_reqs)
        return sent, recv

    def _ring_unchunked(self, comm, arr, raw, tmp, bounds, add, divide, average) -> tuple[int, int]:
        """The same schedule when every segment fits in one chunk: nothing to pipeline inside
        a step, so each step is one blocking Sendrecv (a quarter of the Python-to-MPI calls of
        the request-based path, which dominate at small sizes); when polite, an Irecv/Isend
        pair waited on politely."""
        MPI = _mpi()
        N, r = self.size, self.rank
        isz = arr.itemsize
        right, left = (r + 1) % N, (r - 1) % N
        sent = recv = 0
        for s in range(2 * (N - 1)):
            send_seg, seg = (r - s) % N, (r - s - 1) % N
            a, b = bounds[send_seg], bounds[send_seg + 1]
            lo, hi = bounds[seg], bounds[seg + 1]
            out = raw[a * isz : b * isz]
            into = tmp[: hi - lo].view(np.uint8) if s < N - 1 else raw[lo * isz : hi * isz]
            if self.polite:
                self.waiter.waitall([comm.Irecv(into, left, s), comm.Isend(out, right, s)])
            else:
                comm.Sendrecv(out, right, s, into, left, s)
            if s < N - 1:
                add(arr[lo:hi], tmp[: hi - lo])
                if s == N - 2 and average:
                    divide(arr[lo:hi], N)
            sent += (b - a) * isz
            recv += (hi - lo) * isz
        return sent, recv


def default_chunk_bytes(comm) -> int:
    """The pipeline chunk a Ring over `comm` uses by default: 0 (whole segments) when all of
    its ranks share this node, DEFAULT_CHUNK_BYTES when any link crosses nodes. Collective
    (MPI_Comm_split_type). Every rank gets the same answer without further agreement: either
    one node holds all ranks, and each sees it, or no node does."""
    MPI = _mpi()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    one_node = node.Get_size() == comm.Get_size()
    node.Free()
    return 0 if one_node else DEFAULT_CHUNK_BYTES


def check_layout(comm, count: int, dtype: str, op: str, name: str | None, seq: int, waiter: Waiter | None = None) -> None:
    """Collective agreement on one all-reduce's layout; raises RingMismatchError on every
    rank if any rank disagrees on element count, dtype, op, tensor name or call index.

    One Allreduce(MAX) of [h, -h] yields every field's max and -min in a single tiny
    collective; only when they differ are all headers gathered, to name the ranks. Because
    every rank blocks here until the last one arrives, the time spent here is this rank's
    wait for the slowest peer (arrival skew). With a `waiter` the Allreduce is the
    non-blocking kind, completed by the waiter (politely or not, whatever it is set to when
    the call comes); without one, the blocking kind. Every rank must pass a waiter or none
    alike: blocking and non-blocking collectives do not match each other.
    """
    MPI = _mpi()
    size = comm.Get_size()
    name_hash = zlib.crc32(name.encode()) if name else 0
    fields = [count, _DTYPES[dtype][0], OPS.index(op), name_hash, seq]
    both = np.array(fields + [-v for v in fields], dtype=np.int64)
    out = np.empty_like(both)
    if waiter is None:
        comm.Allreduce(both, out, op=MPI.MAX)
    else:
        waiter.waitall([comm.Iallreduce(both, out, op=MPI.MAX)])
    k = len(fields)
    got = out.tolist()
    if got[:k] == [-v for v in got[k:]]:
        return
    header = both[:k].copy()
    table = np.empty((size, k), dtype=np.int64)
    comm.Allgather(header, table)
    lines = [
        f"rank {r}: {c} x {_CODE_TO_DTYPE.get(int(dt), '?')} op={OPS[int(o)]} call #{sq}"
        for r, (c, dt, o, nh, sq) in enumerate(table)
    ]
    fields = ("element counts", "dtypes", "ops", "tensor names", "call order")
    what = [f for i, f in enumerate(fields) if out[i] != -out[k + i]]
    raise RingMismatchError(
        f"all-reduce mismatch across ranks ({', '.join(what)} differ"
        f"{f'; this rank called it {name!r}' if name else ''}): "
        + "; ".join(lines)
        + ". Every rank must all-reduce the same tensors, with the same sizes and dtypes, in the same order."
    )


# ---- module-level convenience over COMM_WORLD ---------------------------------------------

_default: Ring | None = None


def default_ring() -> Ring:
    """A process-wide ring over COMM_WORLD, created on first use (collective then)."""
    global _default
    if _default is None:
        _default = Ring()
    return _default


def allreduce_(buf, op: str = "average", name: str | None = None):
    """In-place ring all-reduce over COMM_WORLD. Collective."""
    return default_ring().allreduce_(buf, op, name)


def allreduce_async_(buf, op: str = "average", name: str | None = None) -> Handle:
    return default_ring().allreduce_async_(buf, op, name)


def synchronize(handle: Handle):
    return handle.wait()
