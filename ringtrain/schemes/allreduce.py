"""Bucketed gradient all-reduce with overlap: the shared machinery of ring, mpi, horovod, none.

Buckets. Parameters are taken in reverse registration order (roughly the order backward
produces their gradients) and packed into buckets of at most `bucket_cap_mb` MiB of one
dtype, like DDP's bucket_cap_mb or Horovod's fusion threshold. Each bucket owns one flat
contiguous buffer, so one all-reduce moves many small gradients.

Overlap. A post-accumulate-grad hook copies each gradient into its bucket as soon as
autograd has produced it. When a bucket is full its all-reduce starts at once (on the
scheme's background thread) while backward goes on computing earlier layers. Buckets are
started strictly in index order, so every rank issues the same collectives in the same
order even if hooks fired in a different order. `end_backward` starts whatever is left
(parameters that got no gradient contribute zeros), waits for all, and points each
param.grad at its averaged slice of the bucket.

Timers (where they could lie):
  t_comm          sum over buckets of each all-reduce's own execution time on the background
                  thread (from when it began executing, not when it was queued).
  t_comm_exposed  wall time from the end of backward until the last bucket is reduced: the
                  only communication the step really waited for.
  t_wait_peers    time the step's first all-reduce spent in its collective layout check,
                  i.e. waiting for the slowest rank to arrive (nan with --layout-check
                  always/never, whose check, if any, travels with the data: no separate wait).

Waiting. While backward runs beside the exchange, a background thread that polls MPI at full
speed takes the core from backward (on a node with one core per rank, half of it). With
comm_wait "auto" (the default) the exchange therefore waits politely while backward runs
(MPI_Test plus short sleeps, ringtrain.ring.Waiter) and at full speed from the end of
backward, when nothing else is left to run. "spin" and "sleep" fix one mode for the whole step.

Subclasses implement `_start(flat, name) -> handle` and `_wait(handle) -> (bytes_sent,
bytes_recv)`, and `_set_polite(flag)` if their exchange can wait politely. A handle with
t_begin/t_end attributes (ringtrain.engine.Handle) reports its own execution time; for
others the time from _start to the end of _wait is used.
"""
from __future__ import annotations

import math

import torch

from ringtrain.broadcast import broadcast_module_state, broadcast_optimizer_state
from ringtrain.schemes.base import Scheme, StepStats, now


class Bucket:
    __slots__ = ("index", "params", "offsets", "flat", "dev", "token", "ready", "handle", "t_start", "launched")

    def __init__(self, index, params, dtype, staging=None, alloc=None):
        self.index = index
        self.params = params
        self.offsets = []
        total = 0
        for p in params:
            self.offsets.append(total)
            total += p.numel()
        # flat: the buffer the all-reduce reads and writes (host memory, zero-filled): from
        # `alloc(count, dtype)` when given (a scheme's own memory, e.g. the ring's shared
        # buffers). With staging, the gradients are first packed into `dev` (on the
        # parameters' device) and copied over into pinned host memory.
        if staging:
            self.flat = staging.host_buffer(total, dtype)
        else:
            self.flat = alloc(total, dtype) if alloc else torch.zeros(total, dtype=dtype)
        self.dev = staging.device_buffer(total, dtype, params[0].device) if staging else None
        self.token = None
        self.ready = 0
        self.handle = None
        self.t_start = 0.0
        self.launched = False

    def view(self, i):
        """Where param i's gradient is packed: the device buffer when staging, else the host one."""
        p = self.params[i]
        buf = self.dev if self.dev is not None else self.flat
        return buf[self.offsets[i] : self.offsets[i] + p.numel()].view_as(p)

    @property
    def nbytes(self):
        return self.flat.numel() * self.flat.element_size()


def make_buckets(params, cap_bytes: int, staging=None, alloc=None) -> list[Bucket]:
    """Group params (already in launch order) into buckets of <= cap_bytes and one dtype.
    A parameter larger than the cap gets a bucket of its own. `alloc`: see Bucket."""
    buckets, current, size, dtype = [], [], 0, None
    for p in params:
        nbytes = p.numel() * p.element_size()
        if current and (size + nbytes > cap_bytes or p.dtype != dtype):
            buckets.append(Bucket(len(buckets), current, dtype, staging, alloc))
            current, size = [], 0
        current.append(p)
        size += nbytes
        dtype = p.dtype
    if current:
        buckets.append(Bucket(len(buckets), current, dtype, staging, alloc))
    return buckets


class BucketedAllreduce(Scheme):
    """Base for all-reduce schemes. Config keys: bucket_cap_mb (float, default 4),
    overlap (bool, default True), comm_wait ("auto", "spin" or "sleep"; see module docstring)."""

    name = "allreduce-base"
    counts_bytes = "measured"  # or "cost model" where the library reports nothing

    def __init__(self, world, config=None):
        super().__init__(world, config)
        self.bucket_cap_mb = float(self.config.get("bucket_cap_mb", 4.0))
        self.overlap = bool(self.config.get("overlap", True))
        self.comm_wait = self.config.get("comm_wait", "auto")
        if self.comm_wait not in ("auto", "spin", "sleep"):
            raise ValueError(f"comm_wait must be auto, spin or sleep, got {self.comm_wait!r}")
        self.buckets: list[Bucket] = []
        self._bucket_of = {}
        self._next_launch = 0
        self._stats = StepStats()
        self._hooks = []
        self.grad_bytes = 0
        self.staging = None

    # ---- what subclasses provide ------------------------------------------------------

    def _start(self, flat: torch.Tensor, name: str):
        raise NotImplementedError

    def _wait(self, handle) -> tuple[int, int]:
        raise NotImplementedError

    def _set_polite(self, flag: bool) -> None:
        """Called on the main thread: True when backward starts beside the exchange, False
        when nothing else runs on this rank. Schemes whose library cannot wait politely
        ignore it."""

    def _broadcast_comm(self):
        """Communicator for the initial broadcast (MPI); None to skip it."""
        return self.world.comm

    def _alloc(self):
        """How the host buckets are allocated: None for torch's allocator, or a function
        (count, dtype) -> zero-filled tensor, called by every rank for the same buckets in
        the same order (so it may be collective)."""
        return None

    # ---- Scheme interface -------------------------------------------------------------

    def setup(self, model, optimizer):
        comm = self._broadcast_comm()
        if comm is not None:
            broadcast_module_state(model, comm)
            broadcast_optimizer_state(optimizer, comm)
        params = [p for p in model.parameters() if p.requires_grad]
        self.grad_bytes = sum(p.numel() * p.element_size() for p in params)
        if self.needs_host_buffers():
            from ringtrain.staging import make_staging

            self.staging = make_staging(params[0].device, force=bool(self.config.get("stage_through_host")))
        self.buckets = make_buckets(list(reversed(params)), int(self.bucket_cap_mb * 2**20), self.staging, self._alloc())
        self._bucket_of_flat = {id(b.flat): b for b in self.buckets}
        for b in self.buckets:
            for i, p in enumerate(b.params):
                self._bucket_of[p] = (b, i)
        if self.overlap:
            for p in params:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad_ready))
        return model

    def begin_step(self, step: int) -> None:
        self._stats = StepStats()
        self._next_launch = 0
        for b in self.buckets:
            b.ready, b.handle, b.launched = 0, None, False
        self._set_polite(self.comm_wait == "sleep" or (self.comm_wait == "auto" and self.overlap))

    def _on_grad_ready(self, p) -> None:
        # Runs inside autograd, on the thread that runs backward, once per parameter.
        b, i = self._bucket_of[p]
        view = b.view(i)
        if p.grad.data_ptr() != view.data_ptr():
            view.copy_(p.grad)
        b.ready += 1
        if b.ready == len(b.params):
            self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next_launch < len(self.buckets) and self.buckets[self._next_launch].ready == len(
            self.buckets[self._next_launch].params
        ):
            self._launch(self.buckets[self._next_launch])
            self._next_launch += 1

    def _launch(self, b: Bucket) -> None:
        b.t_start = now()
        if self.staging is not None:
            b.token = self.staging.to_host_async(b.flat, b.dev)
        b.handle = self._start(b.flat, f"bucket{b.index}")
        b.launched = True

    def needs_host_buffers(self) -> bool:
        """True for schemes whose library reduces host memory only (ring; MPI unless CUDA-aware)."""
        return True

    def wait_staged(self, flat) -> None:
        """Called by subclasses on their communication thread before touching `flat`: waits
        for the device-to-host copy of that bucket (no-op without staging)."""
        if self.staging is not None:
            self.staging.wait(self._bucket_of_flat[id(flat)].token)

    def end_backward(self) -> None:
        t_end_backward = now()
        if self.comm_wait == "auto":
            self._set_polite(False)  # backward is over: the exchange may have the core
        # Without overlap (or for gradients the hooks never saw), pack now.
        for b in self.buckets:
            if b.ready == len(b.params):
                continue
            for i, p in enumerate(b.params):
                view = b.view(i)
                if p.grad is None:
                    view.zero_()  # unused parameter: contributes nothing, but every rank still reduces it
                elif p.grad.data_ptr() != view.data_ptr():
                    view.copy_(p.grad)
            b.ready = len(b.params)
        self._launch_ready()
        st = self._stats
        t_comm = 0.0
        for k, b in enumerate(self.buckets):
            sent, recv = self._wait(b.handle)
            st.bytes_sent += sent
            st.bytes_recv += recv
            h = b.handle
            t_begin, t_end = getattr(h, "t_begin", None), getattr(h, "t_end", None)
            if t_begin is None or math.isnan(t_begin):
                t_begin, t_end = b.t_start, now()
            t_comm += t_end - t_begin
            if k == 0:
                info = getattr(h, "info", None) or {}
                s = info.get("stats")
                st.t_wait_peers = getattr(s, "t_wait_peers", float("nan"))
        st.t_comm = t_comm
        st.t_comm_exposed = now() - t_end_backward
        if self.staging is not None:  # host -> device, then the compute stream waits for it
            for b in self.buckets:
                self.staging.to_device(b.dev, b.flat)
            self.staging.finish()
        for b in self.buckets:
            for i, p in enumerate(b.params):
                p.grad = b.view(i)  # the averaged gradient, without a copy

    def end_step(self) -> StepStats:
        st, self._stats = self._stats, StepStats()
        return st

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def manifest(self) -> dict:
        return {
            "bucket_cap_mb": self.bucket_cap_mb,
            "num_buckets": len(self.buckets),
            "bucket_bytes": [b.nbytes for b in self.buckets],
            "overlap": self.overlap,
            "comm_wait": self.comm_wait,
            "bytes_counted_by": self.counts_bytes,
            "staging": self.staging.kind if self.staging is not None else "none",
        }

    def expected_bytes_per_step(self, grad_bytes: int) -> tuple[float, float]:
        n = self.num_workers
        b = 2 * (n - 1) / n * grad_bytes if n > 1 else 0.0
        return b, b
