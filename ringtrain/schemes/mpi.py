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
from ringtrain.ring import CallStats, as_wire_array, check_layout
from ringtrain.schemes.allreduce import BucketedAllreduce


def mpi_allreduce_average_(comm, buf, check=True, name=None, seq=0) -> None:
    """In-place MPI_Allreduce(SUM) then divide by the world size. 16-bit types are summed in
    float32 (MPI has no half-precision sum) and rounded back once. Collective."""
    from mpi4py import MPI

    arr, dtype = as_wire_array(buf)
    if check:
        check_layout(comm, arr.size, dtype, "average", name, seq)
    n = comm.Get_size()
    if dtype in ("float32", "float64"):
        comm.Allreduce(MPI.IN_PLACE, arr, op=MPI.SUM)
        np.divide(arr, n, out=arr)
    else:
        t = buf.detach().reshape(-1)
        wide = t.float().contiguous()
        comm.Allreduce(MPI.IN_PLACE, wide.numpy(), op=MPI.SUM)
        t.copy_(wide.div_(n))


class MpiScheme(BucketedAllreduce):
    name = "mpi"
    counts_bytes = "cost model 2(N-1)/N*S (MPI reports no byte counts)"

    def setup(self, model, optimizer):
        self.comm = self.world.comm.Dup()
        self.engine = Engine(f"ringtrain-mpi-{self.world.rank}")
        self.check = self.config.get("check", "always") == "always"
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
                check_layout(self.comm, arr.size, dtype, "average", name, seq)
            t1 = time.perf_counter()
            mpi_allreduce_average_(self.comm, flat, check=False)
            handle.info["stats"] = CallStats(count=flat.numel(), t_wait_peers=t1 - t0, t_ring=time.perf_counter() - t1)

        return self.engine.submit(run)

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
