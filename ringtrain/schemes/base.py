"""The one interface between the trainer and every gradient-exchange scheme.

The trainer drives a scheme through these calls, in this order, on every worker rank:

    model = scheme.setup(model, optimizer)     # once: broadcast rank 0's state, install hooks
    for each step:
        scheme.begin_step(step)
        loss.backward()                         # hooks may start exchanges during backward
        scheme.end_backward()                   # returns when every param.grad holds the average
        scheme.optimizer_step(optimizer)        # optimizer.step() for all-reduce schemes; PS pushes/pulls
        stats = scheme.end_step()               # this step's timings and byte counts
    scheme.close()

Ranks for which `scheme.is_worker` is False (dedicated parameter servers) never see the
trainer: the CLI calls `scheme.serve()` on them instead, which returns when the workers close.

A scheme owns its communication, its communicators and its byte counts. The trainer imports
no MPI; it reaches other workers only through `scheme.allreduce_metrics` (not timed as
gradient communication, never called inside a timed phase).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np


class WorkersChanged(RuntimeError):
    """Raised by an elastic scheme from end_backward() when workers were lost and the scheme
    has already rebuilt its communication among the survivors (and made their parameters
    agree again). Every survivor raises it at the same step. The trainer then drops that
    step's update, re-shards its data over the new `worker_rank` / `num_workers`, and goes on.

    lost      ranks (in the old numbering) that are gone
    recover_s seconds from detecting the failure to having a working communicator again
    """

    def __init__(self, lost, recover_s: float, message: str = ""):
        super().__init__(message or f"lost worker(s) {lost}")
        self.lost = list(lost)
        self.recover_s = recover_s


@dataclass
class StepStats:
    """What one step cost in communication, as measured by the scheme itself.

    t_comm          seconds inside gradient-exchange operations, summed over operations, each
                    from the moment it began executing to its completion ("issued" time). With
                    overlap this can exceed the step's exposed wait.
    t_comm_exposed  seconds the step waited for communication after backward ended.
    t_wait_peers    seconds this rank waited at the step's first exchange for the slowest
                    peer to arrive (arrival skew); NaN where the scheme cannot tell.
    bytes_sent/recv payload bytes this rank sent/received this step, counted by the scheme.
    extra           scheme-specific per-step numbers (staleness, queue depth, ...), logged as
                    extra HDF5 columns when declared in `extra_columns()`.
    """

    t_comm: float = 0.0
    t_comm_exposed: float = 0.0
    t_wait_peers: float = float("nan")
    bytes_sent: int = 0
    bytes_recv: int = 0
    extra: dict = field(default_factory=dict)


class Scheme:
    """Base class. Subclasses override what they need; defaults describe a scheme that does nothing."""

    name = "base"
    # True when end_backward leaves every worker holding the same averaged gradient (all-reduce
    # schemes). False when each worker keeps its own (a parameter server applies each
    # worker's gradient as it arrives; `none` exchanges nothing): the trainer then checks for
    # NaN/Inf gradients on each worker alone, before end_backward, since the workers' verdicts
    # can differ and no collective may depend on them.
    averages_gradients = True

    def __init__(self, world, config: dict | None = None):
        self.world = world
        self.config = dict(config or {})
        # Ranks that train. All-reduce schemes: every rank. Dedicated PS: all but the servers.
        self.is_worker = True
        self.worker_rank = world.rank
        self.num_workers = world.size
        self._t_backward_end = 0.0

    # ---- lifecycle -------------------------------------------------------------------

    def setup(self, model, optimizer):
        """Called once by every worker, before the first step. Makes every worker start from
        rank 0's parameters and optimizer state, installs hooks, and returns the model the
        trainer should run forward on (the same object unless the scheme wraps it, like DDP)."""
        return model

    def begin_step(self, step: int) -> None:
        """Called at the start of every step, before forward."""

    def end_backward(self) -> None:
        """Called right after loss.backward(). Returns once every parameter's .grad holds the
        gradient averaged over all workers (for synchronous schemes). An elastic scheme may
        raise WorkersChanged here instead."""

    def optimizer_step(self, optimizer) -> None:
        """Apply the update. All-reduce schemes: optimizer.step(). A parameter server pushes
        gradients and pulls parameters here instead."""
        optimizer.step()

    def end_step(self) -> StepStats:
        """Called once per step after optimizer_step; returns and resets this step's stats."""
        return StepStats()

    def serve(self) -> None:
        """Run on ranks with is_worker == False until the workers are done."""
        raise NotImplementedError(f"scheme {self.name} has no server ranks")

    def close(self) -> None:
        """Called once by every rank at the end (after serve() on servers). Collective."""

    # ---- helpers for the trainer -------------------------------------------------------

    def allreduce_metrics(self, values) -> np.ndarray:
        """Sum a few float64 values over the worker ranks (loss, correct counts, step
        index on resume). Collective over workers. Not gradient traffic: not counted."""
        return self.world.allreduce_sum(values)

    def broadcast_metrics(self, values) -> np.ndarray:
        """Worker 0's values on every worker (used on resume). Collective over workers."""
        a = np.ascontiguousarray(values, dtype=np.float64).copy()
        self.world.comm.Bcast(a, root=0)
        return a

    def manifest(self) -> dict:
        """Scheme-specific run attributes for the log manifest (placement, shards, buckets)."""
        return {}

    def extra_columns(self) -> dict:
        """{column name: numpy dtype} of the per-step extras this scheme reports in StepStats.extra."""
        return {}

    def expected_bytes_per_step(self, grad_bytes: int) -> tuple[float, float]:
        """The cost model's (sent, received) payload bytes per worker per step."""
        return 0.0, 0.0


def now() -> float:
    """The clock every scheme uses for durations. perf_counter: monotonic, sub-microsecond."""
    return time.perf_counter()
