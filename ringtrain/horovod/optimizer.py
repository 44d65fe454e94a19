"""DistributedOptimizer: average gradients over all ranks during backward, step once.

    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    loss.backward()          # each bucket's all-reduce starts as soon as its gradients exist
    optimizer.step()         # waits for the rest, writes the averages into .grad, steps

Overlap and order. A post-accumulate-grad hook on every parameter marks its gradient
ready; parameters are packed, in reverse registration order (roughly the order backward
produces them), into fusion buckets of at most HOROVOD_FUSION_THRESHOLD bytes (default
4 MiB here; Horovod's own default of 64 MiB would leave nothing to overlap without its
cycle-time batching). A bucket's all-reduce starts the moment its last gradient arrives,
on the background thread, while backward goes on. Buckets start strictly in index order,
so every rank submits the same all-reduces in the same order (Horovod gets the same
guarantee from negotiation; a pure ring has to get it from the schedule).

backward_passes_per_step=k: gradients accumulate locally over k backward passes and are
exchanged on the k-th (summed over passes, averaged over ranks, as in Horovod); a (k+1)-th
pass before step() raises. Compression.fp16 halves the bytes on the wire.

Step log (opt-in): with RINGTRAIN_HOROVOD_RUN_DIR=DIR every rank writes ringtrain's per-step
HDF5 log, DIR/rank-NNNNN.h5, one row per step(). An optimizer cannot see where forward ends
and backward begins, so t_forward / t_backward are NaN and `t_compute` (extra column) holds
everything from the end of the previous step() to the start of the exchange wait (data,
forward, backward, user code); samples and loss are not known here either (0 / NaN).
"""
from __future__ import annotations

import atexit
import os
import time
import warnings
from contextlib import contextmanager

import torch

from ringtrain.horovod.compression import Compression
from ringtrain.horovod.ops import (
    Adasum,
    Average,
    _check_process_set,
    _st,
    allreduce_async_,
    comm_stats,
    global_process_set,
    size,
    synchronize,
)

DEFAULT_FUSION_BYTES = 4 << 20


def _fusion_bytes() -> int:
    v = os.environ.get("HOROVOD_FUSION_THRESHOLD")
    return int(v) if v else DEFAULT_FUSION_BYTES


class _Bucket:
    __slots__ = ("index", "params", "offsets", "numel", "dtype", "ready", "handle", "flat", "ctx", "direct")

    def __init__(self, index, params):
        self.index = index
        self.params = params
        self.offsets, n = [], 0
        for p in params:
            self.offsets.append(n)
            n += p.numel()
        self.numel = n
        self.dtype = params[0].dtype
        self.ready = 0
        self.handle = None
        self.flat = None
        self.ctx = None
        # A bucket of one parameter is reduced in its own .grad, without packing copies.
        self.direct = len(params) == 1


class _DistributedOptimizer(torch.optim.Optimizer):
    """Methods mixed into the user's optimizer class by DistributedOptimizer()."""

    def _hvd_setup(self, named_parameters, compression, backward_passes_per_step, op, gradient_predivide_factor,
                   sparse_as_dense):
        all_params = [p for g in self.param_groups for p in g["params"]]
        if named_parameters is not None:
            named = list(named_parameters)
            if any(not isinstance(x, tuple) for x in named):
                raise ValueError("named_parameters should be a sequence of (name, parameter) tuples, usually "
                                 "model.named_parameters()")
            names = [k for k, _ in named]
            dups = sorted({k for k in names if names.count(k) > 1})
            if dups:
                raise ValueError(f"parameter names in named_parameters must be unique; duplicates: {', '.join(dups)}")
            ids = {id(v) for _, v in named}
            unnamed = [p for p in all_params if id(p) not in ids]
            if unnamed:
                raise ValueError(f"named_parameters was given, but {len(unnamed)} optimizer parameter(s) are not in it")
            self._hvd_names = {id(v): k for k, v in named}
        else:
            self._hvd_names = {id(p): f"allreduce.noname.{i}" for i, p in enumerate(all_params)}
        self._hvd_compression = compression
        self.backward_passes_per_step = backward_passes_per_step
        self.op = op
        self.gradient_predivide_factor = gradient_predivide_factor
        self.sparse_as_dense = sparse_as_dense
        self._hvd_synchronized = False
        self._hvd_should_synchronize = True
        self._hvd_hooks = []
        params = [p for p in all_params if p.requires_grad]
        self._hvd_delay = {p: backward_passes_per_step for p in params}
        cap = _fusion_bytes()
        self._hvd_buckets = []
        current, nbytes = [], 0
        for p in reversed(params):
            b = p.numel() * p.element_size()
            if current and (nbytes + b > cap or p.dtype != current[0].dtype):
                self._hvd_buckets.append(_Bucket(len(self._hvd_buckets), current))
                current, nbytes = [], 0
            current.append(p)
            nbytes += b
        if current:
            self._hvd_buckets.append(_Bucket(len(self._hvd_buckets), current))
        self._hvd_bucket_of = {p: b for b in self._hvd_buckets for p in b.params}
        self._hvd_next = 0
        if size() > 1:
            for p in params:
                self._hvd_hooks.append(p.register_post_accumulate_grad_hook(self._hvd_on_grad))
        self._hvd_log = _open_step_log(self, params) if os.environ.get("RINGTRAIN_HOROVOD_RUN_DIR") else None
        self._hvd_step = 0
        self._hvd_t_iter = None  # perf_counter at the end of the previous step (start of this one)

    # ---- during backward -------------------------------------------------------------

    def _hvd_on_grad(self, p) -> None:
        if self._hvd_t_iter is None:
            self._hvd_t_iter = time.perf_counter()  # first step: start at the first gradient
        delay = self._hvd_delay[p]
        if delay <= 0:
            raise AssertionError(
                "Gradients were computed more than backward_passes_per_step times before call to step(). "
                "Increase backward_passes_per_step to accumulate gradients locally."
            )
        self._hvd_delay[p] = delay - 1
        if delay - 1 == 0:
            b = self._hvd_bucket_of[p]
            b.ready += 1
            if b.ready == len(b.params):
                self._hvd_launch_ready()

    def _hvd_launch_ready(self) -> None:
        buckets = self._hvd_buckets
        while self._hvd_next < len(buckets) and buckets[self._hvd_next].ready == len(buckets[self._hvd_next].params):
            self._hvd_launch(buckets[self._hvd_next])
            self._hvd_next += 1

    def _hvd_grad(self, p) -> torch.Tensor:
        if p.grad is None:
            # No gradient on this rank (a branch not taken): it still takes part, with zeros.
            p.grad = torch.zeros_like(p)
        g = p.grad
        if g.is_sparse:
            if not self.sparse_as_dense:
                raise NotImplementedError("ringtrain.horovod does not reduce sparse gradients; pass sparse_as_dense=True")
            g = p.grad = g.to_dense()
        return g

    def _hvd_launch(self, b: _Bucket) -> None:
        if b.direct:
            flat = self._hvd_grad(b.params[0])
            if not flat.is_contiguous():
                flat = b.params[0].grad = flat.contiguous()
        else:
            flat = torch.cat([self._hvd_grad(p).reshape(-1) for p in b.params])
        flat, b.ctx = self._hvd_compression.compress(flat)
        b.flat = flat
        if self.op == Average:
            pre, post = 1.0 / self.gradient_predivide_factor, self.gradient_predivide_factor
        else:
            pre, post = 1.0, 1.0
        names = self._hvd_names
        name = names[id(b.params[0])] if b.direct else f"bucket{b.index}.{names[id(b.params[0])]}"
        b.handle = allreduce_async_(flat, name=name, op=self.op, prescale_factor=pre, postscale_factor=post)

    # ---- public API ------------------------------------------------------------------

    def synchronize(self) -> None:
        """Start the exchanges that have not started yet (parameters without a gradient
        contribute zeros), wait for all, and write the averaged gradients into .grad."""
        t0 = time.perf_counter()
        self._hvd_t_sync = (t0, t0, 0.0)
        if size() == 1:
            self._hvd_synchronized = True
            return
        for b in self._hvd_buckets:
            b.ready = len(b.params)
        self._hvd_launch_ready()
        t_comm = 0.0
        for b in self._hvd_buckets:
            out = self._hvd_compression.decompress(synchronize(b.handle), b.ctx)
            t_comm += b.handle.t_end - b.handle.t_begin
            if b.direct:
                g = b.params[0].grad
                if out.data_ptr() != g.data_ptr():
                    g.copy_(out.view_as(g))
            else:
                for p, off in zip(b.params, b.offsets):
                    p.grad.copy_(out[off : off + p.numel()].view_as(p.grad))
            b.ready, b.handle, b.flat, b.ctx = 0, None, None, None
        self._hvd_next = 0
        for p in self._hvd_delay:
            self._hvd_delay[p] = self.backward_passes_per_step
        self._hvd_synchronized = True
        self._hvd_t_sync = (t0, time.perf_counter(), t_comm)

    @contextmanager
    def skip_synchronize(self):
        """For `optimizer.synchronize(); clip gradients; with optimizer.skip_synchronize(): optimizer.step()`."""
        self._hvd_should_synchronize = False
        try:
            yield
        finally:
            self._hvd_should_synchronize = True

    def step(self, closure=None):
        if self._hvd_should_synchronize:
            if self._hvd_synchronized:
                warnings.warn("optimizer.step() called without optimizer.skip_synchronize() context after "
                              "optimizer.synchronize(). This can cause training slowdown.")
            self.synchronize()
        self._hvd_synchronized = False
        if self._hvd_log is None:
            return super(self.__class__, self).step(closure)
        t_opt = time.perf_counter()
        result = super(self.__class__, self).step(closure)
        self._hvd_log_step(t_opt, time.perf_counter())
        return result

    def _hvd_log_step(self, t_opt, t_end) -> None:
        t_sync0, t_sync1, t_comm = getattr(self, "_hvd_t_sync", (t_opt, t_opt, 0.0))
        t_iter = self._hvd_t_iter if self._hvd_t_iter is not None else t_sync0
        st = comm_stats(reset=True)
        self._hvd_log.append({
            "step": self._hvd_step,
            "epoch": 0,
            "t_start": time.time() - (t_end - t_iter) + self._hvd_clock_offset,
            "t_compute": t_sync0 - t_iter,
            "t_comm": t_comm,
            "t_comm_exposed": t_sync1 - t_sync0,
            "t_optimizer": t_end - t_opt,
            "t_step": t_end - t_iter,
            "bytes_sent": st["bytes_sent"],
            "bytes_recv": st["bytes_recv"],
            "samples": 0,
            "num_workers": size(),
        })
        self._hvd_step += 1
        self._hvd_t_iter = t_end

    def _hvd_base_step(self, closure=None):
        """The wrapped optimizer's own step, without any exchange (a purely local step)."""
        return super(self.__class__, self).step(closure)

    def zero_grad(self, set_to_none: bool = True):
        if any(b.handle is not None for b in self._hvd_buckets):
            raise AssertionError("optimizer.zero_grad() was called after loss.backward() but before optimizer.step() "
                                 "or optimizer.synchronize(). This is prohibited as it can cause a race condition.")
        return super(self.__class__, self).zero_grad(set_to_none)

    def set_backward_passes_per_step(self, passes: int) -> None:
        self.backward_passes_per_step = passes
        for p in self._hvd_delay:
            self._hvd_delay[p] = passes

    def load_state_dict(self, *args, **kwargs):
        for b in self._hvd_buckets:
            b.ready, b.handle = 0, None
        self._hvd_next = 0
        self._hvd_synchronized = False
        self.set_backward_passes_per_step(self.backward_passes_per_step)
        return super(self.__class__, self).load_state_dict(*args, **kwargs)


def _open_step_log(opt, params):
    """Collective (clock alignment): every rank's StepLog under RINGTRAIN_HOROVOD_RUN_DIR."""
    import socket

    import numpy as np

    import ringtrain
    from ringtrain.steplog import StepLog, rank_file
    from ringtrain.world import detect_launcher, measure_clock_offset

    s = _st()
    comm = s.comm.Dup()
    opt._hvd_clock_offset, uncertainty = measure_clock_offset(comm)
    comm.Free()
    run_dir = os.environ["RINGTRAIN_HOROVOD_RUN_DIR"]
    os.makedirs(run_dir, exist_ok=True)
    grad_bytes = sum(p.numel() * p.element_size() for p in params)
    n = s.size
    model_bytes = 2 * (n - 1) / n * grad_bytes if n > 1 else 0.0
    manifest = {
        "scheme": "ringtrain.horovod",
        "backend": "ringtrain.horovod",
        "world_size": n,
        "num_workers": n,
        "rank": s.rank,
        "local_rank": s.local_rank,
        "hostname": socket.gethostname(),
        "launcher": detect_launcher().launcher,
        "optimizer": type(opt).__name__,
        "lr": opt.param_groups[0].get("lr", float("nan")),
        "param_count": sum(p.numel() for p in params),
        "grad_bytes": grad_bytes,
        "expected_bytes_per_step": [model_bytes, model_bytes],
        "bytes_counted_by": "the ring itself (all ringtrain.horovod collectives of the step)",
        "fusion_bytes": _fusion_bytes(),
        "num_buckets": len(opt._hvd_buckets),
        "backward_passes_per_step": opt.backward_passes_per_step,
        "compression": getattr(opt._hvd_compression, "__name__", str(opt._hvd_compression)),
        "clock_offset": opt._hvd_clock_offset,
        "clock_uncertainty": uncertainty,
        "versions": {"ringtrain": ringtrain.__version__, "torch": torch.__version__},
    }
    log = StepLog(rank_file(run_dir, s.rank), manifest, {"t_compute": np.float64})
    atexit.register(log.close)
    return log


def DistributedOptimizer(optimizer, named_parameters=None, compression=Compression.none, backward_passes_per_step=1,
                         op=Average, gradient_predivide_factor=1.0, num_groups=0, groups=None, sparse_as_dense=False,
                         process_set=global_process_set):
    """Wrap `optimizer` so that step() uses gradients averaged over all ranks.

    Returns an optimizer of a subclass of `optimizer`'s class that shares its parameter
    groups and state (isinstance checks and LR schedulers keep working). Every rank must
    wrap an optimizer over the same parameters, in the same order.

    named_parameters: (name, parameter) pairs naming the all-reduces (mismatches across
        ranks are reported by name). compression: Compression.none or Compression.fp16.
    backward_passes_per_step: local accumulation before each exchange. op: Average or Sum.
    gradient_predivide_factor: with Average, scale by 1/f before the sum and f/size after.
    num_groups / groups: accepted; fusion here is by size (HOROVOD_FUSION_THRESHOLD).
    Not supported (raise): op=Adasum, process sets other than the global one.
    """
    _check_process_set(process_set)
    if op == Adasum:
        raise NotImplementedError("ringtrain.horovod does not implement Adasum; use RINGTRAIN_HOROVOD=real")
    if gradient_predivide_factor != 1.0 and op != Average:
        raise ValueError("gradient_predivide_factor not supported with op != Average")
    if backward_passes_per_step <= 0:
        raise ValueError("backward_passes_per_step must be > 0")
    if num_groups or groups is not None:
        warnings.warn("ringtrain.horovod fuses gradients by size (HOROVOD_FUSION_THRESHOLD); num_groups/groups "
                      "only change performance and are ignored", stacklevel=2)
    if hasattr(optimizer, "_hvd_buckets"):
        raise ValueError("this optimizer is already a DistributedOptimizer")
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), dict(_DistributedOptimizer.__dict__))
    dist = cls.__new__(cls)
    # Shares param_groups, state and step hooks with `optimizer`. Optimizer.__init__ is not run
    # again: the parent class's step() already runs the step hooks, once, after the exchange.
    dist.__dict__.update(optimizer.__dict__)
    dist._hvd_setup(named_parameters, compression, backward_passes_per_step, op, gradient_predivide_factor,
                    sparse_as_dense)
    return dist
