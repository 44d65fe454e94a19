"""`--backend mpi`: the MPI library's own MPI_Allreduce, the reference point for the ring.

Runs on the same kind of background thread as the ring, with the same layout check, so the
two differ only in the all-reduce itself. MPI does not report bytes moved: the counts here
are the ring cost model's 2(N-1)/N·S (what Open MPI's large-message ring algorithm sends),
and the manifest says so.
"""
from __future__ import annotations

import time

import numpy as np

from ringtrain.engine import Engine
from ringtrain.ring import CallStats, Waiter, as_wire_array, check_layout
from ringtrain.schemes.allreduce import BucketedAllreduce


def mpi_allreduce_average_(comm, buf, check=True, name=None, seq=0, waiter: Waiter | None = None) -> None:
    """In-place MPI_Allreduce(SUM) then divide by the world size. 16-bit types are summed in
    float32 (MPI has no half-precision sum) and rounded back once. Collective.

    With a `waiter`, MPI_Iallreduce completed by it (politely or not, see Waiter) instead of
    the blocking call. Every rank must pass a waiter or none alike: blocking and non-blocking
    collectives do not match each other."""
    from mpi4py import MPI

    arr, dtype = as_wire_array(buf)
    if check:
        check_layout(comm, arr.size, dtype, "average", name, seq, waiter)
    n = comm.Get_size()

    def allreduce(a):
        if waiter is not None:
            waiter.waitall([comm.Iallreduce(MPI.IN_PLACE, a, op=MPI.SUM)])
        else:
            comm.Allreduce(MPI.IN_PLACE, a, op=MPI.SUM)

    if dtype in ("float32", "float64"):
        allreduce(arr)
        np.divide(arr, n, out=arr)
    else:
        t = buf.detach().reshape(-1)
        wide = t.float().contiguous()
        allreduce(wide.numpy())
        t.copy_(wide.div_(n))


class MpiScheme(BucketedAllreduce):
    name = "mpi"
    counts_bytes = "cost model 2(N-1)/N*S (MPI reports no byte counts)"

    def setup(self, model, optimizer):
        self.comm = self.world.comm.Dup()
        self.engine = Engine(f"ringtrain-mpi-{self.world.rank}")
        self.check = self.config.get("check", "collective") != "never"  # MPI_Allreduce has no cheaper way to check
        # Waiting politely needs the non-blocking MPI_Iallreduce on every rank for the whole
        # run (it does not match the blocking kind), so the kind is fixed by the config.
        self.waiter = None if self.comm_wait == "spin" else Waiter()
        self._seq = 0
        return super().setup(model, optimizer)

    def _start(self, flat, name):
        seq = self._seq
        self._seq += 1

        def run(handle):
            self.wait_staged(flat)
            t0 = time.perf_counter()
            if self.check:
                arr, dtype = as_wire_array(flat)
                check_layout(self.comm, arr.size, dtype, "average", name, seq, self.waiter)
            t1 = time.perf_counter()
            mpi_allreduce_average_(self.comm, flat, check=False, waiter=self.waiter)
            handle.info["stats"] = CallStats(count=flat.numel(), t_wait_peers=t1 - t0, t_ring=time.perf_counter() - t1)

        return self.engine.submit(run)

    def _set_polite(self, flag):
        if self.waiter is not None:
            self.waiter.polite = flag

    def _wait(self, handle):
        handle.wait()
        return 0, 0  # MPI reports nothing; end_backward fills in the cost model

    def end_backward(self) -> None:
        super().end_backward()
        # Bytes by the cost model, per bucket (see module docstring).
        sent, recv = self.expected_bytes_per_step(self.grad_bytes)
        self._stats.bytes_sent, self._stats.bytes_recv = int(round(sent)), int(round(recv))

    def close(self) -> None:
        super().close()
        self.engine.close()
        self.comm.Free()
