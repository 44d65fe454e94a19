"""Horovod's collectives (init, allreduce, broadcast, allgather, join, ...) on ringtrain's ring.

Execution model, as in Horovod: every collective is queued to one background thread per
process and executed there in submission order; `*_async*` calls return a handle at once,
`synchronize(handle)` waits for it. Unlike Horovod there is no negotiation that reorders
operations, so **every rank must submit the same collectives in the same order** (which
DistributedOptimizer guarantees for gradients). Before each operation the ranks agree on a
small header (kind, element count, dtype, op, root, name) with one tiny MPI_Allreduce, so a
rank that calls something different raises HorovodMismatchError on every rank instead of
hanging. The same agreement is what lets join() work: a joined rank keeps answering the
headers and contributes zeros (or the op's identity) to the others' reductions.

Data paths: float sums and averages go through ringtrain.ring.Ring (bandwidth-optimal
ring, 2(N-1)/N·S bytes per rank, counted by the ring itself); integer sums, Min, Max and
Product through MPI_Allreduce; broadcast through MPI_Bcast; allgather through
MPI_Allgatherv. All buffer-based (no pickle). CUDA tensors are staged through host memory.
"""
from __future__ import annotations

import atexit
import os
import threading
import time
import zlib

import numpy as np
import torch

from ringtrain.engine import Engine
from ringtrain.ring import Ring

# Reduction ops. Same values as Horovod's, so either module's constants work with either.
Average = 0
Sum = 1
Adasum = 2
Min = 3
Max = 4
Product = 5
_OP_NAMES = {Average: "Average", Sum: "Sum", Adasum: "Adasum", Min: "Min", Max: "Max", Product: "Product"}

# Operation kinds in the agreement header.
_ALLREDUCE, _BROADCAST, _ALLGATHER, _BARRIER = 1, 2, 3, 4
_KIND_NAMES = {_ALLREDUCE: "allreduce", _BROADCAST: "broadcast", _ALLGATHER: "allgather", _BARRIER: "barrier"}

# dtype <-> header code. The ring carries the float types; the rest use MPI's own reductions.
_DTYPE_CODES = {
    torch.float32: 1,
    torch.float64: 2,
    torch.float16: 3,
    torch.bfloat16: 4,
    torch.uint8: 5,
    torch.int8: 6,
    torch.int16: 7,
    torch.int32: 8,
    torch.int64: 9,
    torch.bool: 10,
}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}
_RING_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# A header field value below anything real: joined ranks send it so MAX picks the active ranks'.
_ABSENT = -(2**62)


class HorovodInternalError(RuntimeError):
    """Raised where Horovod would raise its HorovodInternalError."""


class HorovodMismatchError(HorovodInternalError):
    """Ranks submitted different collectives at the same position. Raised on every rank."""


class _GlobalProcessSet:
    """The only process set ringtrain.horovod supports: all ranks of the communicator."""

    process_set_id = 0

    def included(self) -> bool:
        return True

    def size(self) -> int:
        return size()

    def rank(self) -> int:
        return rank()

    def __repr__(self):
        return "ProcessSet(global)"


global_process_set = _GlobalProcessSet()


def _check_process_set(process_set) -> None:
    if process_set is not None and process_set is not global_process_set:
        if getattr(process_set, "process_set_id", 0) != 0:
            raise NotImplementedError(
                "ringtrain.horovod supports only the global process set; run with RINGTRAIN_HOROVOD=real "
                "to use Horovod's process sets"
            )


# --------------------------------------------------------------------------- state


class _State:
    def __init__(self, comm):
        from mpi4py import MPI

        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        cross = comm.Split(color=self.local_rank, key=self.rank)
        self.cross_rank, self.cross_size = cross.Get_rank(), cross.Get_size()
        cross.Free()
        sizes = np.empty(self.size, dtype=np.int64)
        comm.Allgather(np.array([self.local_size], dtype=np.int64), sizes)
        self.homogeneous = bool((sizes == sizes[0]).all())
        chunk = os.environ.get("RINGTRAIN_CHUNK_BYTES")  # unset: chosen by locality, see Ring
        chunk = int(chunk) if chunk else None
        self.ring = Ring(comm, chunk_bytes=chunk, check="never")  # headers are agreed here instead
        self.ctrl = comm.Dup()  # headers, and the non-ring collectives
        self.engine = Engine(f"ringtrain-horovod-{self.rank}")
        self.joined = False
        self.active_ops = 0  # operations this rank took part in with its own data
        self.lock = threading.Lock()
        self.stats = _Stats()

    def close(self) -> None:
        self.engine.close()
        self.ring.close()
        self.ctrl.Free()


class _Stats:
    """Running totals since the last reset (see comm_stats())."""

    def __init__(self):
        self.ops = 0
        self.t_comm = 0.0  # seconds executing collectives on the background thread
        self.t_wait_peers = 0.0  # seconds of that spent in the header agreement (arrival skew)
        self.bytes_sent = 0  # ring all-reduce payload, counted by the ring
        self.bytes_recv = 0

    def as_dict(self):
        return dict(self.__dict__)


_state: _State | None = None
_atexit_registered = False


def _st() -> _State:
    if _state is None:
        raise ValueError("ringtrain.horovod has not been initialized; call hvd.init() first")
    return _state


# --------------------------------------------------------------------------- basics


def init(comm=None, process_sets=None) -> None:
    """Collective over `comm` (default COMM_WORLD; or a list of world ranks): start the
    background thread and the ring. Calling it again is a no-op."""
    global _state, _atexit_registered
    if _state is not None:
        return
    if process_sets not in (None, []):
        raise NotImplementedError("ringtrain.horovod does not support process sets; use RINGTRAIN_HOROVOD=real")
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    if comm is None:
        comm = world
        _check_launch(world)
    elif isinstance(comm, (list, tuple)):
        ranks = [int(r) for r in comm]
        sub = world.Create_group(world.Get_group().Incl(ranks)) if ranks else MPI.COMM_NULL
        if sub == MPI.COMM_NULL:
            raise ValueError(f"rank {world.Get_rank()} is not among the ranks {ranks} given to hvd.init(comm=...)")
        comm = sub
    elif not isinstance(comm, MPI.Comm):
        raise TypeError(f"hvd.init(comm=...) takes an mpi4py communicator or a list of ranks, got {type(comm).__name__}")
    _state = _State(comm)
    if not _atexit_registered:
        atexit.register(_close_quietly)
        _atexit_registered = True


def _check_launch(world) -> None:
    env_size = os.environ.get("HOROVOD_SIZE")
    if env_size and int(env_size) != world.Get_size():
        raise HorovodInternalError(
            f"horovodrun started {env_size} processes but MPI sees a world of {world.Get_size()}: the ranks were "
            f"started without MPI (horovodrun --gloo). ringtrain.horovod runs on MPI: launch with `mpirun -n "
            f"{env_size}` or `horovodrun -np {env_size}` without --gloo, or set RINGTRAIN_HOROVOD=real to use "
            f"Horovod itself."
        )


def shutdown() -> None:
    """Wait for queued operations, stop the background thread and free the communicators.
    Collective. hvd.init() may be called again afterwards."""
    global _state
    if _state is not None:
        s, _state = _state, None
        s.close()


def _close_quietly() -> None:
    global _state
    if _state is not None:
        _state.engine.close()
        _state = None


def is_initialized() -> bool:
    return _state is not None


def rank() -> int:
    return _st().rank


def size() -> int:
    return _st().size


def local_rank() -> int:
    return _st().local_rank


def local_size() -> int:
    return _st().local_size


def cross_rank() -> int:
    return _st().cross_rank


def cross_size() -> int:
    return _st().cross_size


def is_homogeneous() -> bool:
    return _st().homogeneous


def mpi_threads_supported() -> bool:
    from mpi4py import MPI

    return MPI.Query_thread() == MPI.THREAD_MULTIPLE


def mpi_built(verbose: bool = False) -> bool:
    return True


def mpi_enabled() -> bool:
    return True


def gloo_built(verbose: bool = False) -> bool:
    return False


def gloo_enabled() -> bool:
    return False


def nccl_built(verbose: bool = False) -> int:
    return 0


def ddl_built(verbose: bool = False) -> bool:
    return False


def ccl_built(verbose: bool = False) -> bool:
    return False


def cuda_built(verbose: bool = False) -> bool:
    return False


def rocm_built(verbose: bool = False) -> bool:
    return False


def comm_stats(reset: bool = False) -> dict:
    """This rank's totals since init (or the last reset): ops, t_comm (seconds executing
    collectives), t_wait_peers (of which waiting for the slowest rank), bytes_sent /
    bytes_recv (ring all-reduce payload, counted by the ring)."""
    s = _st()
    with s.lock:
        d = s.stats.as_dict()
        if reset:
            s.stats = _Stats()
    return d


# --------------------------------------------------------------------------- handles


class Handle:
    """What the *_async functions return. Pass it to synchronize() or poll()."""

    __slots__ = ("_h", "_finish", "_output", "_done", "kind", "name")

    def __init__(self, h, finish, kind, name):
        self._h = h
        self._finish = finish  # runs on the caller's thread after the operation: copy back, cast
        self._output = None
        self._done = False
        self.kind = kind
        self.name = name

    @property
    def t_begin(self) -> float:
        return self._h.t_begin

    @property
    def t_end(self) -> float:
        return self._h.t_end

    def __repr__(self):
        return f"<ringtrain.horovod {self.kind} {self.name or ''} {'done' if self._h.done() else 'pending'}>"


def poll(handle: Handle) -> bool:
    """True once the operation has finished (synchronize() will not block)."""
    return handle._h.done()


def synchronize(handle: Handle):
    """Wait for an async operation; returns its output (the tensor, for in-place calls).
    Re-raises the operation's error on this rank."""
    if not isinstance(handle, Handle):
        raise TypeError(f"synchronize() takes a handle from a ringtrain.horovod *_async call, got {type(handle).__name__}")
    if not handle._done:
        try:
            handle._h.wait()
        except (HorovodInternalError, ValueError, TypeError, NotImplementedError):
            raise
        except Exception as e:  # MPI errors and the like
            raise HorovodInternalError(f"rank {_state.rank if _state else '?'}: {handle.kind} failed: {e}") from e
        handle._output = handle._finish(handle._h.result) if handle._finish else handle._h.result
        handle._done = True
        handle._finish = None
    return handle._output


def _submit(kind, name, fn, finish=None) -> Handle:
    s = _st()
    if s.joined:
        raise HorovodInternalError("collectives cannot be submitted while this rank is inside hvd.join()")
    return Handle(s.engine.submit(fn), finish, kind, name)


# --------------------------------------------------------------------------- agreement


def _name_hash(name) -> int:
    return zlib.crc32(name.encode()) if name else 0


def _agree(s: _State, header):
    """Collective on s.ctrl. `header` = [kind, count, dtype, op, root, name_hash, extra] of
    this rank's operation, or None for a joined rank. Returns (header every active rank
    agreed on, or None if every rank has joined; MAX of the last field). Raises
    HorovodMismatchError on every rank if the active ranks disagree."""
    from mpi4py import MPI

    k = 7
    if header is None:
        h = np.full(k, _ABSENT, dtype=np.int64)
        vec = np.concatenate([[0], h, h, [s.active_ops * s.size + s.rank]])
    else:
        h = np.asarray(header, dtype=np.int64)
        vec = np.concatenate([[1], h, -h, [s.active_ops * s.size + s.rank]])
    out = np.empty_like(vec)
    s.ctrl.Allreduce(vec, out, op=MPI.MAX)
    if out[0] == 0:
        return None, int(out[-1])
    hi, lo = out[1 : 1 + k], -out[1 + k : 1 + 2 * k]
    if not np.array_equal(hi, lo):
        table = np.empty((s.size, k), dtype=np.int64)
        mine = np.full(k, -1, dtype=np.int64) if header is None else np.asarray(header, dtype=np.int64)
        s.ctrl.Allgather(mine, table)
        rows = []
        for r, (kind, count, dt, op, root, nh, extra) in enumerate(table):
            if kind < 0:
                rows.append(f"rank {r}: joined")
                continue
            dtn = str(_CODE_DTYPES.get(int(dt), "?")).replace("torch.", "")
            rows.append(
                f"rank {r}: {_KIND_NAMES.get(int(kind), '?')} of {count} x {dtn} op={_OP_NAMES.get(int(op), op)} "
                f"root={root} name#{nh:08x}"
            )
        raise HorovodMismatchError(
            "ranks submitted different collectives at the same position (every rank must call the same "
            "collectives, with the same sizes, dtypes, ops and names, in the same order): " + "; ".join(rows)
        )
    return hi, int(out[-1])


# --------------------------------------------------------------------------- execution (background thread)


def _np(t: torch.Tensor) -> np.ndarray:
    """Numpy view of a contiguous CPU tensor's memory (bfloat16 and bool as raw bytes)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16).reshape(-1)
    if t.dtype == torch.bool:
        return t.view(torch.uint8).numpy().reshape(-1)
    return t.numpy().reshape(-1)


def _mpi_op(op):
    from mpi4py import MPI

    return {Sum: MPI.SUM, Average: MPI.SUM, Min: MPI.MIN, Max: MPI.MAX, Product: MPI.PROD}[op]


def _identity(dtype, op):
    if op in (Sum, Average):
        return 0
    if op == Product:
        return 1
    if dtype == torch.bool:
        return op == Min
    info = torch.finfo(dtype) if dtype.is_floating_point else torch.iinfo(dtype)
    return info.max if op == Min else info.min


def _run_allreduce(s: _State, buf: torch.Tensor, op, prescale, postscale):
    """buf: contiguous CPU tensor, reduced in place. Executes on the background thread,
    after the header agreement."""
    from mpi4py import MPI

    n = s.size
    if buf.numel() == 0:
        return
    if op in (Sum, Average) and buf.dtype in _RING_DTYPES:
        if prescale != 1.0:
            buf.mul_(prescale)
        plain_average = op == Average and postscale == 1.0
        s.ring.allreduce_(buf, op="average" if plain_average else "sum")
        scale = postscale / n if (op == Average and not plain_average) else postscale
        if scale != 1.0:
            buf.mul_(scale)
        return
    if buf.dtype in (torch.float16, torch.bfloat16):  # MPI has no 16-bit float reductions
        wide = buf.float()
        if prescale != 1.0:
            wide.mul_(prescale)
        s.ctrl.Allreduce(MPI.IN_PLACE, wide.numpy().reshape(-1), op=_mpi_op(op))
        buf.copy_(wide)
    else:
        if prescale != 1.0:
            buf.mul_(prescale)
        if buf.dtype == torch.bool:
            arr = buf.view(torch.uint8).numpy().reshape(-1)
            mop = {Sum: MPI.LOR, Max: MPI.LOR, Min: MPI.LAND, Product: MPI.LAND}.get(op)
            if mop is None:
                raise ValueError("bool tensors support only Sum, Min, Max and Product")
            s.ctrl.Allreduce(MPI.IN_PLACE, arr, op=mop)
        else:
            s.ctrl.Allreduce(MPI.IN_PLACE, _np(buf), op=_mpi_op(op))
    if op == Average:
        if buf.dtype.is_floating_point:
            buf.div_(n)
        else:
            buf.floor_divide_(n)  # what Horovod does for integer averages
    if postscale != 1.0:
        buf.mul_(postscale)


def _account(s: _State, t0: float, t1: float, sent0: int, recv0: int) -> None:
    with s.lock:
        st = s.stats
        st.ops += 1
        st.t_comm += time.perf_counter() - t0
        st.t_wait_peers += t1 - t0
        st.bytes_sent += s.ring.bytes_sent - sent0
        st.bytes_recv += s.ring.bytes_recv - recv0


def _execute_active(s: _State, kind, buf, op=Sum, root=0, name=None, prescale=1.0, postscale=1.0):
    """One operation of this rank, with its own data. Runs on the background thread."""
    t0 = time.perf_counter()
    sent0, recv0 = s.ring.bytes_sent, s.ring.bytes_recv
    count = 0 if buf is None else buf.numel()
    dcode = 0 if buf is None else _DTYPE_CODES[buf.dtype]
    extra = 0
    if kind == _ALLGATHER:  # first dimensions may differ: agree on the shape of one row
        count = _row_numel(buf)
        extra = _name_hash(str(tuple(buf.shape[1:])))
    header = [kind, count, dcode, op if kind == _ALLREDUCE else 0, root, _name_hash(name), extra]
    agreed, _ = _agree(s, header)
    t1 = time.perf_counter()
    s.active_ops += 1
    out = _execute(s, kind, buf, op, root, prescale, postscale)
    _account(s, t0, t1, sent0, recv0)
    return out


def _execute(s: _State, kind, buf, op, root, prescale=1.0, postscale=1.0):
    from mpi4py import MPI

    if kind == _ALLREDUCE:
        _run_allreduce(s, buf, op, prescale, postscale)
        return buf
    if kind == _BROADCAST:
        _check_root_active(s, root, joined=False)
        if buf.numel():
            s.ctrl.Bcast([buf.reshape(-1).view(torch.uint8).numpy(), MPI.BYTE], root=root)
        return buf
    if kind == _ALLGATHER:
        out = _allgather_rows(s, buf, buf.shape[0], _row_numel(buf), buf.dtype)
        return out.reshape((out.shape[0],) + tuple(buf.shape[1:]))
    if kind == _BARRIER:
        return None
    raise AssertionError(kind)


def _row_numel(buf: torch.Tensor) -> int:
    return int(np.prod(buf.shape[1:], dtype=np.int64))


def _allgather_rows(s: _State, buf, nrows: int, row_numel: int, dtype) -> torch.Tensor:
    """Allgatherv of `nrows` rows of `row_numel` elements from every rank: returns a
    (total_rows * row_numel,) tensor in rank order. Collective on s.ctrl."""
    from mpi4py import MPI

    all_rows = np.empty(s.size, dtype=np.int64)
    s.ctrl.Allgather(np.array([nrows], dtype=np.int64), all_rows)
    row_bytes = row_numel * torch.empty(0, dtype=dtype).element_size()
    counts = [int(r) * row_bytes for r in all_rows]
    displs = [0] + np.cumsum(counts)[:-1].astype(np.int64).tolist()
    out = torch.empty(int(all_rows.sum()) * row_numel, dtype=dtype)
    send = buf.reshape(-1).view(torch.uint8).numpy() if buf.numel() else np.empty(0, np.uint8)
    recv = out.view(torch.uint8).numpy() if out.numel() else np.empty(0, np.uint8)
    s.ctrl.Allgatherv([send, MPI.BYTE], [recv, (counts, displs), MPI.BYTE])
    return out.reshape(int(all_rows.sum()), row_numel)


def _check_root_active(s: _State, root: int, joined: bool) -> None:
    """Collective, for broadcasts only: raise on every rank if the root has joined (it has no
    data to send). One tiny Allreduce, because active ranks cannot tell who has joined."""
    from mpi4py import MPI

    flag = np.array([1 if joined and root == s.rank else 0], dtype=np.int64)
    out = np.empty_like(flag)
    s.ctrl.Allreduce(flag, out, op=MPI.MAX)
    if out[0]:
        raise HorovodInternalError(f"rank {root} has called join() and cannot be the root of a broadcast")


def _execute_joined(s: _State, agreed) -> None:
    """Take part, without data, in an operation the active ranks agreed on."""
    from mpi4py import MPI

    kind, count, dcode, op, root = (int(x) for x in agreed[:5])
    dtype = _CODE_DTYPES[dcode] if dcode else torch.float32
    if kind == _ALLREDUCE:
        buf = torch.full((count,), _identity(dtype, op), dtype=dtype)
        _run_allreduce(s, buf, op, 1.0, 1.0)
    elif kind == _BROADCAST:
        _check_root_active(s, root, joined=True)
        buf = torch.empty(count, dtype=dtype)
        if count:
            s.ctrl.Bcast([buf.view(torch.uint8).numpy(), MPI.BYTE], root=root)
    elif kind == _ALLGATHER:
        _allgather_rows(s, torch.empty(0, dtype=dtype), 0, count, dtype)  # contributes no rows
    # _BARRIER: nothing to do


def join(device=-1) -> int:
    """This rank has run out of data. Until every rank has joined, it takes part in the
    other ranks' collectives with zeros (Sum/Average; the identity for Min/Max/Product) and
    empty contributions to allgather; averages still divide by size(). Blocks until every
    rank has joined. Returns the rank that joined last. Collective (eventually) on all ranks.
    A joined rank cannot be the root of a broadcast."""
    s = _st()

    def run(handle):
        s.joined = True
        try:
            while True:
                agreed, last = _agree(s, None)
                if agreed is None:
                    return last % s.size
                _execute_joined(s, agreed)
        finally:
            s.joined = False

    # Queued behind this rank's own pending operations, so they complete first.
    return s.engine.submit(run).wait()


def barrier(process_set=global_process_set) -> None:
    """Returns once every rank has called barrier(). Collective."""
    _check_process_set(process_set)
    s = _st()
    synchronize(_submit("barrier", None, lambda h: _execute_active(s, _BARRIER, None)))


# --------------------------------------------------------------------------- tensors in and out


def _stage(tensor: torch.Tensor):
    """A contiguous CPU tensor to operate on, and whether results must be copied back."""
    if tensor.is_sparse:
        raise NotImplementedError("ringtrain.horovod does not reduce sparse tensors; densify them (sparse_as_dense=True)")
    if tensor.dtype not in _DTYPE_CODES:
        raise TypeError(f"ringtrain.horovod does not support tensors of dtype {tensor.dtype}")
    t = tensor.detach()
    if t.device.type == "cpu" and t.is_contiguous():
        return t, False
    return t.to("cpu", copy=True).contiguous(), True


def _resolve_op(average, op):
    if op is not None and average is not None:
        raise ValueError("the 'average' argument is deprecated in favour of 'op'; give one, not both")
    if op is None:
        op = Average if average in (None, True) else Sum
    if op == Adasum:
        raise NotImplementedError("ringtrain.horovod does not implement Adasum; use RINGTRAIN_HOROVOD=real")
    if op not in _OP_NAMES:
        raise ValueError(f"unknown reduction op {op!r}; use hvd.Average, hvd.Sum, hvd.Min, hvd.Max or hvd.Product")
    return op


def allreduce_async_(tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                     process_set=global_process_set) -> Handle:
    """Start reducing `tensor` in place over all ranks; returns a handle. `tensor` must not be
    touched until synchronize(handle). Collective: every rank submits the same call in the
    same order, with a tensor of the same size and dtype."""
    _check_process_set(process_set)
    op = _resolve_op(average, op)
    s = _st()
    work, copy_back = _stage(tensor)

    def run(handle):
        return _execute_active(s, _ALLREDUCE, work, op=op, name=name, prescale=prescale_factor, postscale=postscale_factor)

    def finish(_):
        if copy_back:
            tensor.data.copy_(work)
        return tensor

    return _submit("allreduce", name, run, finish)


def allreduce_(tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
               process_set=global_process_set):
    """In-place, blocking allreduce_async_ + synchronize. Returns `tensor`."""
    return synchronize(allreduce_async_(tensor, average, name, op, prescale_factor, postscale_factor, process_set))


def allreduce_async(tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                    process_set=global_process_set) -> Handle:
    """Out-of-place: synchronize(handle) returns a new tensor; `tensor` is left unchanged."""
    out = tensor.detach().clone()
    return allreduce_async_(out, average, name, op, prescale_factor, postscale_factor, process_set)


def allreduce(tensor, average=None, name=None, compression=None, op=None, prescale_factor=1.0,
              postscale_factor=1.0, process_set=global_process_set):
    """Out-of-place, blocking. Returns the reduced tensor (a new tensor, same dtype as the input).
    `compression` (e.g. Compression.fp16) is applied on the wire and undone on the result.
    Not differentiable (unlike Horovod's): use it on gradients and metrics."""
    from ringtrain.horovod.compression import Compression

    compression = compression or Compression.none
    compressed, ctx = compression.compress(tensor)
    out = synchronize(allreduce_async(compressed, average, name, op, prescale_factor, postscale_factor, process_set))
    return compression.decompress(out, ctx)


def grouped_allreduce_async_(tensors, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                             process_set=global_process_set):
    """Several in-place allreduces submitted together; synchronize returns the list."""
    hs = [allreduce_async_(t, average, f"{name}.{i}" if name else None, op, prescale_factor, postscale_factor,
                           process_set) for i, t in enumerate(tensors)]
    return _GroupHandle(hs)


def grouped_allreduce_(tensors, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                       process_set=global_process_set):
    return synchronize(grouped_allreduce_async_(tensors, average, name, op, prescale_factor, postscale_factor, process_set))


def grouped_allreduce_async(tensors, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                            process_set=global_process_set):
    return grouped_allreduce_async_([t.detach().clone() for t in tensors], average, name, op, prescale_factor,
                                    postscale_factor, process_set)


def grouped_allreduce(tensors, average=None, name=None, compression=None, op=None, prescale_factor=1.0,
                      postscale_factor=1.0, process_set=global_process_set):
    return [allreduce(t, average, f"{name}.{i}" if name else None, compression, op, prescale_factor, postscale_factor,
                      process_set) for i, t in enumerate(tensors)]


class _GroupHandle(Handle):
    __slots__ = ("handles",)

    def __init__(self, handles):
        self.handles = handles
        self._done = False
        self._output = None
        self.kind, self.name = "grouped_allreduce", None
        self._h = handles[-1]._h if handles else _DoneHandle()
        self._finish = lambda _: [synchronize(h) for h in self.handles]


class _DoneHandle:
    t_begin = t_end = float("nan")
    result = None

    def done(self):
        return True

    def wait(self):
        return None


def broadcast_async_(tensor, root_rank, name=None, process_set=global_process_set) -> Handle:
    """Start overwriting `tensor` on every rank with root_rank's; returns a handle. Collective."""
    _check_process_set(process_set)
    s = _st()
    if not 0 <= root_rank < s.size:
        raise ValueError(f"root_rank {root_rank} is outside 0..{s.size - 1}")
    work, copy_back = _stage(tensor)

    def run(handle):
        return _execute_active(s, _BROADCAST, work, root=root_rank, name=name)

    def finish(_):
        if copy_back:
            tensor.data.copy_(work)
        return tensor

    return _submit("broadcast", name, run, finish)


def broadcast_(tensor, root_rank, name=None, process_set=global_process_set):
    """In place, blocking. Returns `tensor`."""
    return synchronize(broadcast_async_(tensor, root_rank, name, process_set))


def broadcast_async(tensor, root_rank, name=None, process_set=global_process_set) -> Handle:
    return broadcast_async_(tensor.detach().clone(), root_rank, name, process_set)


def broadcast(tensor, root_rank, name=None, process_set=global_process_set):
    """Out-of-place, blocking: returns a new tensor holding root_rank's `tensor`."""
    return synchronize(broadcast_async(tensor, root_rank, name, process_set))


def allgather_async(tensor, name=None, process_set=global_process_set) -> Handle:
    """Concatenation of every rank's `tensor` along dim 0 (first dimensions may differ;
    the others must match). A 0-d tensor counts as one row."""
    _check_process_set(process_set)
    s = _st()
    work, _ = _stage(tensor)
    if work.dim() == 0:
        work = work.reshape(1)
    device = tensor.device

    def run(handle):
        return _execute_active(s, _ALLGATHER, work, name=name)

    return _submit("allgather", name, run, lambda out: out.to(device))


def allgather(tensor, name=None, process_set=global_process_set):
    return synchronize(allgather_async(tensor, name, process_set))


def grouped_allgather(tensors, name=None, process_set=global_process_set):
    return [allgather(t, f"{name}.{i}" if name else None, process_set) for i, t in enumerate(tensors)]


def _unsupported(what, hint="use RINGTRAIN_HOROVOD=real to run on Horovod itself"):
    def f(*args, **kwargs):
        raise NotImplementedError(f"ringtrain.horovod does not implement {what}; {hint}")

    f.__name__ = what
    f.__doc__ = f"Not implemented by ringtrain.horovod ({hint})."
    return f


alltoall = _unsupported("alltoall")
alltoall_async = _unsupported("alltoall_async")
reducescatter = _unsupported("reducescatter")
reducescatter_async = _unsupported("reducescatter_async")
grouped_reducescatter = _unsupported("grouped_reducescatter")
grouped_reducescatter_async = _unsupported("grouped_reducescatter_async")
grouped_allgather_async = _unsupported("grouped_allgather_async", "use grouped_allgather or allgather_async")
sparse_allreduce_async = _unsupported("sparse allreduce", "densify gradients (sparse_as_dense=True)")
start_timeline = _unsupported("start_timeline", "ringtrain logs per-step timings instead (comm_stats())")
stop_timeline = _unsupported("stop_timeline", "ringtrain logs per-step timings instead (comm_stats())")
add_process_set = _unsupported("process sets")
remove_process_set = _unsupported("process sets")
ProcessSet = _unsupported("process sets")
SyncBatchNorm = _unsupported("SyncBatchNorm")
