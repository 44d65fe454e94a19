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

Per-call cost. At 1-4 MiB on one node a call's Python is as long as its transfers, and it
runs cold (the transfers evict it from cache), so the unpipelined ring prepares each layout
once: persistent MPI requests for every step, kept per (buffer address, size, dtype, op,
name) and restarted on later calls. The layout check rides on those same messages: every
message's tag is a hash of the layout, and every receive's tag is compared
with this rank's own (see `_Plan`), so checking costs no extra message.

Shared memory. When every rank is on one node, `Ring.empty` hands out tensors in memory that
all ranks map. An all-reduce of such a tensor needs no messages: each rank sums its own
segment straight out of its peers' tensors, then writes the result into theirs
(`_shared_allreduce`). That saves the ring's scratch copy of every received segment and
the kernel's page pinning per message, and takes two synchronisations per call instead of
2(N-1) dependent steps; on four ranks sharing two cores it is 2.7-3.6x gloo from 4 MiB,
where the ring's messages are 1.5-2.1x (BENCHMARKS.md). The trainer's gradient buckets
come from there.
"""
from __future__ import annotations

import functools
import mmap
import os
import sys
import tempfile
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

# Where Ring.empty's memory lives: a tmpfs every rank of the node sees.
SHM_DIR = "/dev/shm"

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

    def waitall(self, reqs, statuses=None) -> None:
        """`statuses`, if given, is a list of MPI.Status (one per request) filled in place."""
        MPI = _mpi()
        fast = self._fast
        if statuses is None:
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
            err = request_error(e, statuses)
            if err is e:
                raise
            raise err from e


def request_error(e, statuses):
    """The error to raise for a failed list call (Waitall, Testall) on requests with these
    statuses: the failed request's own error instead of MPI_ERR_IN_STATUS (e.g.
    ERR_PROC_FAILED under ULFM, which the elastic scheme recovers from, or ERR_TRUNCATE)."""
    MPI = _mpi()
    if e.Get_error_class() == MPI.ERR_IN_STATUS:
        for st in statuses:
            if st.Get_error() not in (MPI.SUCCESS, MPI.ERR_PENDING):
                return MPI.Exception(st.Get_error())
    return e


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
    t_wait_peers: float = float("nan")  # time in a collective layout check, i.e. waiting for the slowest rank (nan: none ran)
    t_ring: float = 0.0  # time in the ring proper


_MPI = None


def _mpi():
    """mpi4py's MPI module, imported on first use (importing it initialises MPI)."""
    global _MPI
    if _MPI is None:
        from mpi4py import MPI

        _MPI = MPI
    return _MPI


_NUMPY_NAMES = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64", np.dtype(np.float16): "float16"}
_TORCH_NAMES: dict = {}  # torch.float32 -> "float32", ...; filled on first use (torch is imported lazily)
_TORCH_TENSOR = None  # torch.Tensor, once a tensor has been seen


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

    global _TORCH_TENSOR
    if not _TORCH_NAMES:
        _TORCH_NAMES.update({getattr(torch, name): name for name in _DTYPES})
        _TORCH_TENSOR = torch.Tensor
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
    """(add, divide) for a wire dtype, called ufunc-style on numpy views: add(dst, src,
    out=dst) and divide(dst, n, out=dst), both in place. For float32/64 they are numpy's
    ufuncs themselves (no Python frame between the ring and the C loop)."""
    if dtype in ("float32", "float64"):
        return np.add, np.divide
    import torch

    # 16-bit types: torch computes each add in float32 and rounds once to the 16-bit result
    # (numpy's float16 arithmetic is far slower, and numpy has no bfloat16 at all).
    tdt = torch.float16 if dtype == "float16" else torch.bfloat16

    def view(a):
        t = torch.from_numpy(a)
        return t if dtype == "float16" else t.view(torch.int16).view(tdt)

    def add16(dst, src, out):
        torch.add(view(dst), view(src), out=view(out))

    def divide16(dst, n, out):
        view(out).copy_(view(dst).float().div_(n))

    return add16, divide16


@functools.lru_cache(maxsize=1024)
def _bounds(n: int, N: int) -> tuple[int, ...]:
    """Segment boundaries: segment i is [b[i], b[i+1]); sizes differ by at most one element."""
    return tuple((i * n) // N for i in range(N + 1))


# Prepared layouts a ring keeps (least recently used dropped first). Each holds 4(N-1)
# persistent requests and no memory of the caller's.
PLAN_CACHE = 64
# Tag of a message from a rank that already knows the call is mismatched (layout tags are >= 1).
_POISON = 0


def _header(count: int, dtype: str, op: str, name: str | None, seq: int, place: tuple[int, int] | None = None) -> list[int]:
    """What every rank must agree on for one call, as integers: count, dtype code, op index,
    crc32 of the tensor name (0 if none), call index, and where the buffer lies: 1 + the
    index of the shared block it is in and its byte offset there (0, 0: private memory)."""
    k, off = (place[0] + 1, place[1]) if place is not None else (0, 0)
    return [count, _DTYPES[dtype][0], OPS.index(op), zlib.crc32(name.encode()) if name else 0, seq, k, off]


class _Plan:
    """One unpipelined ring call on one buffer, prepared once and restarted by later calls.

    steps: one tuple per ring step s, (reqs, statuses, dst, scratch, final):
        reqs      [receive from the left, send to the right], persistent (MPI_Recv_init and
                  MPI_Send_init), started together and completed together;
        dst       reduce-scatter: the segment of the buffer that `scratch` (where the
                  neighbour's segment arrives) is added into; all-gather: None (received in
                  place, nothing to add);
        final     the last reduce-scatter step, where an average divides.
    tag: the layout's tag, 1 + a hash of (count, dtype, op, name) modulo MPI_TAG_UB; every
    send carries it. Receives take any tag, and the tag that arrives is compared with this
    rank's own; a message longer than the receive fails with MPI_ERR_TRUNCATE, also a
    mismatch. So a mismatch between neighbours shows on the first step, without an extra
    message. (Two different layouts with equal hashes would go unnoticed: odds 1 in 2^31
    with Open MPI's tag range.)

    The requests and `dst` views name raw addresses, not the caller's array, so a plan keeps
    no memory alive; a plan is only started for a call whose buffer has exactly its address
    and size, that is when that memory is the caller's live buffer. (Every view and request
    is made once here: per call, slicing alone would cost as much as a step's add at 64 KiB.)
    """

    __slots__ = ("steps", "tag", "bounds", "count", "dtype", "itemsize", "sent", "recv", "add", "divide")

    def free(self) -> None:
        for step in self.steps:
            for req in step[0]:
                req.Free()
        self.steps = ()


class _SharedBlock:
    """The memory of one Ring.empty call, mapped by every rank of a one-node ring: a file in
    /dev/shm of N regions of `region` bytes (a whole number of pages), rank j's tensor at
    the start of region j, `nbytes` long. The file is unlinked as soon as every rank has
    mapped it (milliseconds after it was made), so a job that is killed later leaves nothing
    in /dev/shm; the memory goes when the last mapping does (the block's and every tensor's
    made from it)."""

    __slots__ = ("mm", "raw", "base", "region", "nbytes")
    warned = False  # class attribute: see create

    @classmethod
    def create(cls, comm, nbytes: int) -> "_SharedBlock | None":
        """Collective. None on every rank (with a warning from rank 0) when any rank could not
        map the file: the caller then falls back to private memory."""
        N, r = comm.Get_size(), comm.Get_rank()
        region = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
        path, err = None, None
        if r == 0:
            try:
                fd, path = tempfile.mkstemp(prefix="ringtrain-", dir=SHM_DIR)
                try:
                    # Reserve the pages now: a full tmpfs fails here (ENOSPC) instead of killing
                    # a rank with SIGBUS when it first touches a page.
                    os.posix_fallocate(fd, 0, N * region)
                finally:
                    os.close(fd)
            except OSError as e:
                err = f"{SHM_DIR}: {e}"
        path, err = comm.bcast((path, err), root=0)  # control values, not data: pickle is fine
        mm = None
        if err is None:
            try:
                fd = os.open(path, os.O_RDWR)
                try:
                    mm = mmap.mmap(fd, N * region)
                finally:
                    os.close(fd)
            except OSError as e:
                err = f"rank {r}: {e}"
        errs = comm.allgather(err)  # also the barrier after which the name is no longer needed
        if r == 0 and path is not None:
            os.unlink(path)
        failed = [e for e in errs if e is not None]
        if failed:
            if mm is not None:
                mm.close()
            if r == 0 and not cls.warned:
                cls.warned = True  # once per process: a full /dev/shm fails every later block too
                print(f"ringtrain: no shared memory for the ring's buffers ({failed[0]}); using private memory "
                      f"for what does not fit", file=sys.stderr, flush=True)
            return None
        block = cls()
        block.mm, block.region, block.nbytes = mm, region, nbytes
        block.raw = np.frombuffer(mm, dtype=np.uint8)  # every rank's regions, as bytes
        block.base = block.raw.__array_interface__["data"][0]
        return block


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
    check        how every call's layout (element count, dtype, op, tensor name, order) is
                 checked across ranks, so that a mismatch raises RingMismatchError on every
                 rank instead of hanging or reducing garbage:
                 "always" (default): the cheapest way that is safe. Unpipelined, the check
                     rides on the ring's own messages (a layout tag, compared on
                     receipt; a rank that finds a mismatch tags its remaining messages so that
                     within N-1 steps every rank knows). Costs nothing, but a mismatched call
                     leaves the buffers' contents undefined. Pipelined (chunk counts could
                     differ between ranks, so the messages would not pair up), as "collective".
                 "collective": every call first agrees on the layout with one tiny
                     MPI_Allreduce; buffers are untouched on a mismatch, and the time spent
                     there measures how long this rank waited for the slowest one (arrival
                     skew, the step log's t_wait_peers). 15-45 µs per call at N = 2 on one node.
                 "never": no agreement round. The unpipelined ring still compares tags (free);
                     a pipelined ring hangs or fails inside MPI on a mismatch.
    polite       how the ring waits for its peers (see Waiter); an attribute that the owner
                 may flip at any time, e.g. on while backward computes beside the ring. The
                 constructor's value also fixes the kind of the layout check's collective on
                 this ring: non-blocking (waited on politely or not) when constructed polite,
                 the blocking MPI_Allreduce otherwise, which costs a third as much on one
                 node. Every rank must construct its ring alike: the two kinds do not match.

    Shared memory: `empty()` hands out tensors whose all-reduce on one node needs no
    messages (see the module docstring and `empty`); the trainer keeps its gradient
    buckets there.
    """

    CHECKS = ("always", "collective", "never")

    def __init__(self, comm=None, chunk_bytes: int | None = None, check: str = "always", polite: bool = False):
        MPI = _mpi()
        if check not in self.CHECKS:
            raise ValueError(f"check must be one of {self.CHECKS}, got {check!r}")
        if chunk_bytes is not None and int(chunk_bytes) < 0:
            raise ValueError(f"chunk_bytes must be >= 0 (0: no pipelining), got {chunk_bytes}")
        self.comm = (comm if comm is not None else MPI.COMM_WORLD).Dup()
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.one_node = all_on_one_node(self.comm)
        self.chunk_bytes = default_chunk_bytes(self.comm, self.one_node) if chunk_bytes is None else int(chunk_bytes)
        self.check = check
        # Same on every rank (check and chunk_bytes are), as it must be: it decides whether a
        # collective precedes each call.
        self._collective_check = check == "collective" or (check == "always" and self.chunk_bytes > 0)
        self._plans_only = self.size > 1 and self.chunk_bytes == 0 and not self._collective_check
        self._tag_ub = self.comm.Get_attr(MPI.TAG_UB)
        self._buffer = getattr(MPI, "buffer", None) or MPI.memory  # raw-address buffers (mpi4py >= 4 / 3.x)
        self._startall, self._waitall = MPI.Prequest.Startall, MPI.Request.Waitall  # looked up once: see _ring_planned
        self.waiter = Waiter(polite)
        self._check_waiter = self.waiter if polite else None  # fixed for the ring's life, see above
        self.calls = 0  # calls submitted so far (identical on every rank when used correctly)
        self.bytes_sent = 0  # running totals over all calls
        self.bytes_recv = 0
        self.last = CallStats()
        self._engine = Engine(f"ringtrain-ring-{self.rank}")
        self._tmp = np.empty(0, dtype=np.uint8)  # scratch the reduce-scatter receives into
        self._plans: dict[tuple, _Plan] = {}  # insertion order = least recently used first
        self._blocks: list[_SharedBlock] = []  # shared memory handed out by empty(), in order

    # ---- public API ---------------------------------------------------------------------

    def allreduce_(self, buf, op: str = "average", name: str | None = None):
        """Blocking, in place. Returns `buf`. Collective.

        Runs on the calling thread when no async call is pending (no handle, no thread hop),
        else queues behind the pending calls and waits. A call on a buffer and layout seen
        before, on an unpipelined ring with no collective check, takes the shortest path: look
        up the plan by the buffer's address and run it (see `_fast_key` for why it is short)."""
        if self._plans_only and self._engine.idle:
            plan = self._cached_plan(self._fast_key(buf, op, name))
            if plan is not None:
                self.calls += 1
                t0 = time.perf_counter()
                self._ring_planned(plan, buf, op, name, self.calls - 1)
                self._record(CallStats(plan.count, plan.dtype, plan.sent, plan.recv, float("nan"), time.perf_counter() - t0))
                return buf
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")
        arr, dtype = as_wire_array(buf)
        seq = self.calls
        self.calls += 1
        if self._engine.idle:
            self._run(buf, arr, dtype, op, name, seq)
            return buf
        return self._engine.submit(self._call, buf, arr, dtype, op, name, seq, None).wait()

    def allreduce_async_(self, buf, op: str = "average", name: str | None = None, before=None) -> Handle:
        """Start an in-place all-reduce on the background thread; returns a Handle at once.
        `buf` must not be read or written until `synchronize(handle)` returns. Collective:
        every rank must start the same calls in the same order. `before`, if given, runs on
        the background thread first (e.g. waiting for a device-to-host copy into `buf`)."""
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")
        arr, dtype = as_wire_array(buf)
        seq = self.calls
        self.calls += 1
        return self._engine.submit(self._call, buf, arr, dtype, op, name, seq, before)

    def synchronize(self, handle: Handle):
        """Wait for an async call; returns its buffer, re-raises its error."""
        return handle.wait()

    def empty(self, count: int, dtype=None):
        """A zero-filled 1-D torch tensor of `count` elements (`dtype` float32 by default) for
        this ring's all-reduces, in shared memory when the ring is on one node. Collective:
        every rank calls it with the same count and dtype, while no async call is pending.

        When every rank of the ring shares this node, the tensors of one call lie in one file
        in /dev/shm that all ranks map (rank j's in the j-th page-aligned region), and an
        all-reduce of such a tensor, or of the same slice of it on every rank, takes the
        shared-memory path (`_shared_allreduce`): no messages and no scratch copy. Otherwise
        (ranks on several nodes, a single rank, /dev/shm unusable) it is an ordinary tensor
        and the ring runs as usual; both give the same sums.

        The tensor stays valid after close(): the mapping lives as long as any tensor on it.
        Once a ring has handed out shared memory, every call on it starts with the collective
        layout check, whatever `check` says: the shared path needs that barrier anyway (all
        inputs written before any rank reads its peers'), and a call in which some ranks pass
        shared memory and others do not must fail on every rank (RingMismatchError), not hang.
        """
        import torch

        dtype = torch.float32 if dtype is None else dtype
        if str(dtype).removeprefix("torch.") not in _DTYPES:
            raise TypeError(f"Ring.empty supports {sorted(_DTYPES)}, got {dtype}")
        count = int(count)
        if count < 0:
            raise ValueError(f"Ring.empty needs a count >= 0, got {count}")
        if not self._engine.idle:
            raise RuntimeError("Ring.empty is collective: call it while no async all-reduce is pending")
        nbytes = count * dtype.itemsize
        # Every rank must ask alike: a rank reads its peers' tensors at its own offset.
        sizes = self.comm.allgather(nbytes)  # control values, not data
        if len(set(sizes)) > 1:
            raise RingMismatchError(
                "Ring.empty called with different sizes across ranks: "
                + "; ".join(f"rank {r}: {b} bytes" for r, b in enumerate(sizes))
                + ". Every rank must allocate the same buffers in the same order."
            )
        block = None
        if self.size > 1 and self.one_node and nbytes > 0:
            block = _SharedBlock.create(self.comm, nbytes)
        if block is None:
            return torch.zeros(count, dtype=dtype)
        self._blocks.append(block)
        self._collective_check = True  # see above; the same on every rank (empty is collective)
        self._plans_only = False
        return torch.frombuffer(block.mm, dtype=dtype, count=count, offset=self.rank * block.region)

    def close(self) -> None:
        """Stop the background thread and free the communicator. Collective."""
        self._engine.close()
        self._drop_plans()
        self._blocks = []  # tensors from empty() keep their memory mapped while they live
        if self.comm is not None:
            self.comm.Free()
            self.comm = None

    @property
    def polite(self) -> bool:
        return self.waiter.polite

    @polite.setter
    def polite(self, value: bool) -> None:
        self.waiter.polite = bool(value)

    # ---- internals ------------------------------------------------------------------------

    def _call(self, handle: Handle, buf, arr, dtype, op, name, seq, before):
        """An async call, on the engine's thread."""
        if before is not None:
            before()
        handle.info["stats"] = self._run(buf, arr, dtype, op, name, seq)
        return buf

    def _run(self, buf, arr, dtype, op, name, seq) -> CallStats:
        """One call, start to end, on whichever thread executes it; records its CallStats.
        `arr` is the wire view of `buf` (as_wire_array)."""
        stats = CallStats(count=arr.size, dtype=dtype)
        t0 = time.perf_counter()
        collective = self._collective_check  # read once: empty() may switch it on between calls
        # Where the buffer lies, if in shared memory. It goes into the layout check, so ranks
        # that would take different paths (shared memory, messages) fail the check together.
        place = self._find_shared(arr) if self._blocks else None
        if collective:
            check_layout(self.comm, arr.size, dtype, op, name, seq, self._check_waiter, place)
            t1 = time.perf_counter()
            stats.t_wait_peers = t1 - t0
        else:
            t1 = t0
        if place is not None:  # the check above has shown every rank's buffer at this place
            stats.bytes_sent, stats.bytes_recv = self._shared_allreduce(arr, dtype, op, place)
        # An empty buffer moves no data, but unless a collective check has shown that every
        # rank's is empty, the ring runs its (empty) messages: they carry the check.
        elif self.size > 1 and (arr.size > 0 or not collective):
            stats.bytes_sent, stats.bytes_recv = self._ring(buf, arr, dtype, op, name, seq)
        stats.t_ring = time.perf_counter() - t1
        self._record(stats)
        return stats

    def _record(self, stats: CallStats) -> None:
        self.bytes_sent += stats.bytes_sent
        self.bytes_recv += stats.bytes_recv
        self.last = stats

    def _ring(self, buf, arr: np.ndarray, dtype: str, op: str, name, seq) -> tuple[int, int]:
        """The ring proper; returns (bytes sent, bytes received) by this rank. Pipelined in
        chunks when a segment spans more than one; otherwise (always when chunk_bytes is 0)
        the prepared plan for this buffer."""
        MPI = _mpi()
        comm, N, r = self.comm, self.size, self.rank
        n, isz = arr.size, arr.itemsize
        bounds = _bounds(n, N)
        max_seg = bounds[-1] - bounds[-2]  # segments grow by at most one element, the last is largest
        chunk = max(1, self.chunk_bytes // isz) if self.chunk_bytes else n
        if max_seg <= chunk:  # nothing to pipeline
            return self._ring_planned(self._plan(buf, arr, dtype, op, name), buf, op, name, seq)
        right, left = (r + 1) % N, (r - 1) % N
        nsteps = 2 * (N - 1)
        add, divide = _reducer(dtype)
        average = op == "average"
        raw = arr.view(np.uint8)  # bytes go on the wire: [buffer, MPI.BYTE] works for every dtype
        tmp = self._scratch(max_seg * isz).view(arr.dtype)

        def chunks(seg):
            lo, hi = bounds[seg], bounds[seg + 1]
            return [(a, min(a + chunk, hi)) for a in range(lo, hi, chunk)]

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
                    add(arr[a:b], tmp[a - lo : b - lo], out=arr[a:b])
                    if s == N - 2 and average:
                        divide(arr[a:b], N, out=arr[a:b])  # this chunk is now final: average before passing it on
                if s + 1 < nsteps:  # forward what we just finished: next step's send segment
                    next_sends.append(comm.Isend([raw[a * isz : b * isz], MPI.BYTE], right, tag=s + 1))
                    sent += (b - a) * isz
            # This step's sends must be complete before any later step may write the region
            # they read from (the all-gather overwrites it N-1 steps later).
            self.waiter.waitall(send_reqs)
            send_reqs = next_sends
        self.waiter.waitall(send_reqs)
        return sent, recv

    def _ring_planned(self, plan: _Plan, buf, op, name, seq) -> tuple[int, int]:
        """The ring with every segment in one message: per step, restart the plan's two
        persistent requests, wait for both, compare what arrived, add. The same schedule as
        the pipelined path, with one message per step instead of a pipeline."""
        add, tag, startall = plan.add, plan.tag, self._startall
        # Polite or not is read once per call (a flip to full speed still wakes a polite
        # wait in flight); when not polite, MPI's own Waitall, without the Waiter around it.
        waitall = self.waiter.waitall if self.waiter.polite else self._waitall
        for s, (reqs, statuses, dst, scratch, final) in enumerate(plan.steps):
            startall(reqs)
            try:
                waitall(reqs, statuses)
            except _MPI.Exception as e:
                err = request_error(e, statuses)
                if err.Get_error_class() != _MPI.ERR_TRUNCATE:  # truncated: a longer message than this rank's
                    raise err from (None if err is e else e)
                for req in reqs:
                    req.Wait()  # the send may still be pending; waiting on a completed one is free
                self._finish_mismatched(plan, buf, s + 1)
                raise self._mismatch(plan, op, name, seq) from None
            if statuses[0].tag != tag:
                self._finish_mismatched(plan, buf, s + 1)
                raise self._mismatch(plan, op, name, seq)
            if dst is not None:
                add(dst, scratch, out=dst)
                if final and op == "average":
                    plan.divide(dst, self.size, out=dst)  # this segment is now final: average before passing it on
        return plan.sent, plan.recv

    def _fast_key(self, buf, op, name):
        """The plan key of a C-contiguous numpy array or CPU tensor, read without making a
        numpy view, or None for anything else. Why: the few Python operations of a call run
        cold (the transfers evict them from cache), and there a torch-to-numpy view alone
        cost 50 µs of a 300 µs call at 1 MiB; a tensor's address, size and dtype cost little."""
        if type(buf) is np.ndarray:
            if buf.flags.c_contiguous:
                return (self._buffer(buf).address, buf.nbytes, buf.dtype, op, name)
        elif type(buf) is _TORCH_TENSOR:
            if buf.is_cpu and buf.is_contiguous():
                return (buf.data_ptr(), buf.nbytes, buf.dtype, op, name)
        return None

    def _plan(self, buf, arr, dtype, op, name) -> _Plan:
        """The prepared plan for this buffer and layout, made on first use (local: no
        communication), most recently used last. `arr` is buf's wire view."""
        addr = self._buffer(arr).address
        key = self._fast_key(buf, op, name) or (addr, arr.nbytes, dtype, op, name)
        plan = self._cached_plan(key)
        if plan is None:
            if len(self._plans) >= PLAN_CACHE:
                self._plans.pop(next(iter(self._plans))).free()
            plan = self._plans[key] = self._make_plan(arr, addr, dtype, op, name)
        return plan

    def _cached_plan(self, key) -> _Plan | None:
        """The plan kept under `key` (None if there is none), moved to most recently used."""
        plan = self._plans.pop(key, None)
        if plan is not None:
            self._plans[key] = plan
        return plan

    def _make_plan(self, arr, addr: int, dtype, op, name) -> _Plan:
        MPI = _mpi()
        comm, N, r = self.comm, self.size, self.rank
        n, isz = arr.size, arr.itemsize
        right, left = (r + 1) % N, (r - 1) % N
        bounds = _bounds(n, N)
        max_seg = bounds[-1] - bounds[-2]
        scratch = self._scratch(max_seg * isz)  # may drop older plans: do it before making this one
        scratch_addr = self._buffer(scratch).address
        scratch = scratch.view(arr.dtype)
        header = _header(n, dtype, op, name, 0)[:4]  # the call index is not in the tag: plans are reused
        plan = _Plan()
        plan.tag = 1 + zlib.crc32(np.array(header, dtype=np.int64).tobytes()) % self._tag_ub
        plan.bounds, plan.count, plan.dtype, plan.itemsize = bounds, n, dtype, isz
        plan.add, plan.divide = _reducer(dtype)
        at = self._buffer.fromaddress
        steps = []
        plan.sent = plan.recv = 0
        for s in range(2 * (N - 1)):
            send_seg, seg = (r - s) % N, (r - s - 1) % N  # send what step s-1 finished
            a, b = bounds[send_seg], bounds[send_seg + 1]
            lo, hi = bounds[seg], bounds[seg + 1]
            reduce_step = s < N - 1
            into = scratch_addr if reduce_step else addr + lo * isz
            reqs = [
                comm.Recv_init([at(into, (hi - lo) * isz), MPI.BYTE], left, MPI.ANY_TAG),
                comm.Send_init([at(addr + a * isz, (b - a) * isz), MPI.BYTE], right, plan.tag),
            ]
            dst = np.frombuffer(at(addr + lo * isz, (hi - lo) * isz), dtype=arr.dtype) if reduce_step else None
            steps.append((reqs, [MPI.Status(), MPI.Status()], dst, scratch[: hi - lo], s == N - 2))
            plan.sent += (b - a) * isz
            plan.recv += (hi - lo) * isz
        plan.steps = tuple(steps)
        return plan

    def _scratch(self, nbytes: int) -> np.ndarray:
        """The scratch buffer, grown to at least `nbytes`. Growing it drops every plan (they
        name its old address)."""
        if self._tmp.nbytes < nbytes:
            self._drop_plans()
            self._tmp = np.empty(nbytes, dtype=np.uint8)
        return self._tmp[:nbytes]

    def is_shared(self, buf) -> bool:
        """Whether an all-reduce of `buf` (numpy array or CPU tensor) on this ring takes the
        shared-memory path: it lies in memory from empty(). Local, no communication."""
        return bool(self._blocks) and self._find_shared(as_wire_array(buf)[0]) is not None

    def _find_shared(self, arr: np.ndarray) -> tuple[int, int] | None:
        """(index of the shared block, byte offset in this rank's region) when `arr` lies in
        memory from empty(), else None."""
        addr = arr.__array_interface__["data"][0]
        for k, block in enumerate(self._blocks):
            lo = block.base + self.rank * block.region
            if lo <= addr and addr + arr.nbytes <= lo + block.nbytes:
                return k, addr - lo
        return None

    def _barrier(self) -> None:
        """A barrier of the kind the layout check uses (non-blocking and waited on by the
        waiter when the ring was constructed polite)."""
        if self._check_waiter is not None:
            self._check_waiter.waitall([self.comm.Ibarrier()])
        else:
            self.comm.Barrier()

    def _shared_allreduce(self, arr: np.ndarray, dtype: str, op: str, place: tuple[int, int]) -> tuple[int, int]:
        """All-reduce of a buffer in shared memory, in place. Called by _run right after the
        collective layout check, which has shown every rank's buffer at the same `place` with
        the same layout, and, being collective, that every rank's input is written.

        1. Reduce: rank r owns segment r (the ring's segments) and adds its peers' segment r
           into its own, reading their memory directly.
        2. Push: rank r writes the finished segment r into every peer's segment r.
        3. Barrier: every rank has every segment, and no rank touches another's buffer
           again in this call, so the caller may write its buffer.
        Segment r of any rank's buffer is touched in this call by rank r alone (read in 1,
        written in 2), so no other barrier is needed: two collectives per call, the check
        and the barrier.

        Returns (bytes sent, bytes received) counted as the ring counts them, as bytes that
        move between this rank's buffer and its peers': sent = its other segments, read by
        their owners in 1, plus its pushes in 2; received = its reads in 1 plus the peers'
        pushes into it in 2. Both are 2(N-1)/N of the buffer give or take an element. Each
        add rounds to the buffer's dtype, as in the ring (which adds in another order).
        """
        N, r, isz, n = self.size, self.rank, arr.itemsize, arr.size
        block = self._blocks[place[0]]
        start = place[1]
        bounds = _bounds(n, N)
        add, divide = _reducer(dtype)
        lo, hi = bounds[r], bounds[r + 1]
        a = start + lo * isz
        peers = [block.raw[j * block.region + a : j * block.region + a + (hi - lo) * isz].view(arr.dtype) for j in range(N) if j != r]
        mine = arr[lo:hi]
        for p in peers:
            add(mine, p, out=mine)
        if op == "average":
            divide(mine, N, out=mine)
        for p in peers:
            np.copyto(p, mine)
        self._barrier()
        moved = ((N - 1) * (hi - lo) + n - (hi - lo)) * isz
        return moved, moved

    def _drop_plans(self) -> None:
        for plan in self._plans.values():
            plan.free()
        self._plans.clear()

    def _finish_mismatched(self, plan: _Plan, buf, first_step: int) -> None:
        """This rank found a mismatch before step `first_step`: run the remaining steps with
        the poison tag, so that every rank learns of it (each neighbour in turn, N-1 steps at
        most) and every message still pairs with its receive. Nothing is added; what arrives
        is dropped into the scratch buffer (a longer message is cut: expected here)."""
        MPI = _mpi()
        comm, N, r, isz, bounds = self.comm, self.size, self.rank, plan.itemsize, plan.bounds
        raw, scratch = as_wire_array(buf)[0].view(np.uint8), self._tmp
        for s in range(first_step, 2 * (N - 1)):
            a, b = bounds[(r - s) % N], bounds[(r - s) % N + 1]
            try:
                comm.Sendrecv([raw[a * isz : b * isz], MPI.BYTE], (r + 1) % N, _POISON,
                              [scratch, MPI.BYTE], (r - 1) % N, MPI.ANY_TAG)
            except MPI.Exception as e:
                if e.Get_error_class() != MPI.ERR_TRUNCATE:
                    raise

    def _mismatch(self, plan: _Plan, op, name, seq) -> "RingMismatchError":
        """Every rank calls this after a mismatched ring (all of them know by its end):
        gathers every rank's layout and returns the error that names them."""
        return _mismatch_error(self.comm, _header(plan.count, plan.dtype, op, name, seq), name)


def all_on_one_node(comm) -> bool:
    """Whether every rank of `comm` shares this node. Collective (MPI_Comm_split_type). Every
    rank gets the same answer without further agreement: either one node holds all ranks,
    and each sees it, or no node does."""
    MPI = _mpi()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    one_node = node.Get_size() == comm.Get_size()
    node.Free()
    return one_node


def default_chunk_bytes(comm, one_node: bool | None = None) -> int:
    """The pipeline chunk a Ring over `comm` uses by default: 0 (whole segments) when all of
    its ranks share this node, DEFAULT_CHUNK_BYTES when any link crosses nodes. Collective
    unless `one_node` (all_on_one_node's answer) is given."""
    if one_node is None:
        one_node = all_on_one_node(comm)
    return 0 if one_node else DEFAULT_CHUNK_BYTES


def check_layout(comm, count: int, dtype: str, op: str, name: str | None, seq: int, waiter: Waiter | None = None,
                 place: tuple[int, int] | None = None) -> None:
    """Collective agreement on one all-reduce's layout; raises RingMismatchError on every
    rank if any rank disagrees on element count, dtype, op, tensor name or call index.

    One Allreduce(MAX) of [h, -h] yields every field's max and -min in a single tiny
    collective; only when they differ are all headers gathered, to name the ranks. Because
    every rank blocks here until the last one arrives, the time spent here is this rank's
    wait for the slowest peer (arrival skew). With a `waiter` the Allreduce is the
    non-blocking kind, completed by the waiter (politely or not, whatever it is set to when
    the call comes); without one, the blocking kind. Every rank must pass a waiter or none
    alike: blocking and non-blocking collectives do not match each other. `place`: where the
    buffer lies in a ring's shared memory (see Ring.empty), None for private memory.
    """
    MPI = _mpi()
    fields = _header(count, dtype, op, name, seq, place)
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
    raise _mismatch_error(comm, fields, name)


def _mismatch_error(comm, header: list[int], name: str | None) -> RingMismatchError:
    """Collective: gathers every rank's header (see _header) and returns the error that
    names each rank's layout and the fields that differ."""
    table = np.empty((comm.Get_size(), len(header)), dtype=np.int64)
    comm.Allgather(np.array(header, dtype=np.int64), table)
    lines = [
        f"rank {r}: {c} x {_CODE_TO_DTYPE.get(int(dt), '?')} op={OPS[int(o)]} call #{sq}"
        + (f" via shared memory (block #{k - 1}, byte {off})" if k else (" via messages" if table[:, 5].any() else ""))
        for r, (c, dt, o, nh, sq, k, off) in enumerate(table)
    ]
    fields = ("element counts", "dtypes", "ops", "tensor names", "call order", "paths (shared memory or messages)", "shared-memory offsets")
    what = [f for i, f in enumerate(fields) if table[:, i].min() != table[:, i].max()] or ["layouts"]
    return RingMismatchError(
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
