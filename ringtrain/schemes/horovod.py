"""`--backend horovod`: gradients averaged by Horovod (MPI or Gloo on CPU, NCCL on GPU nodes).

    mpirun -n 2 python -m ringtrain train --backend horovod ...
    horovodrun -np 2 --binding-args="--bind-to none --map-by slot" \
        python -m ringtrain train --backend horovod ...          # horovodrun's MPI controller

Same buckets, hooks and overlap as the ring scheme (schemes/allreduce.py); only the
all-reduce differs: each bucket goes to `hvd.allreduce_async_(..., op=hvd.Average)`, which
Horovod's own background thread negotiates, fuses (HOROVOD_FUSION_THRESHOLD) and executes.
Which library does the reduction on CPU is Horovod's choice at init time:
HOROVOD_CPU_OPERATIONS=mpi (default under mpirun) or =gloo.

Horovod reports no byte counts, so bytes_sent/bytes_recv are the ring cost model's
2(N-1)/N·S per bucket (what Horovod's ring-based MPI, Gloo and NCCL all-reduces move), and
the manifest says so. t_comm is each bucket's time from submission to completion, which for
Horovod includes its negotiation and fusion wait (there is no separate "began executing"
time to read).

`horovodrun --gloo` starts ranks without MPI, so ringtrain's MPI world sees each one as a
world of one; run ringtrain under `mpirun` or horovodrun's default MPI controller instead.
"""
from __future__ import annotations

import os

from ringtrain.schemes.allreduce import BucketedAllreduce


def import_horovod():
    """`horovod.torch`, or an ImportError that says how to install it."""
    try:
        import horovod.torch as hvd
    except ImportError as e:
        raise ImportError(
            f"--backend horovod needs Horovod with PyTorch support ({e}). Install it into this "
            f"environment with `bash scripts/install_horovod.sh` (builds Horovod 0.28.1 against the "
            f"installed torch; about 5 minutes once, cached afterwards)."
        ) from e
    return hvd


def init_horovod(world):
    """Collective: start Horovod on the ranks of `world` (no-op if already started), and check
    that it sees the same world. Returns (hvd module, whether this call started it)."""
    from mpi4py import MPI

    hvd = import_horovod()
    started = False
    if not hvd.is_initialized():
        if world.comm == MPI.COMM_WORLD:
            hvd.init()
        else:
            hvd.init(comm=world.comm)
        started = True
    if hvd.size() != world.size or hvd.rank() != world.rank:
        raise RuntimeError(
            f"rank {world.rank}: Horovod sees rank {hvd.rank()} of {hvd.size()} but the MPI world is rank "
            f"{world.rank} of {world.size}. Launch with `mpirun -n N` or `horovodrun -np N` (MPI controller), "
            f"not `horovodrun --gloo`."
        )
    return hvd, started


class _Submitted:
    """A Horovod handle plus what the cost model needs to count its bytes."""

    __slots__ = ("handle", "nbytes")

    def __init__(self, handle, nbytes):
        self.handle = handle
        self.nbytes = nbytes


class HorovodScheme(BucketedAllreduce):
    name = "horovod"
    counts_bytes = "cost model 2(N-1)/N*S (Horovod reports no byte counts)"

    def setup(self, model, optimizer):
        self.hvd, self._started_hvd = init_horovod(self.world)
        return super().setup(model, optimizer)

    def _start(self, flat, name):
        hvd = self.hvd
        h = hvd.allreduce_async_(flat, name=f"ringtrain.{name}", op=hvd.Average)
        return _Submitted(h, flat.numel() * flat.element_size())

    def _wait(self, sub):
        self.hvd.synchronize(sub.handle)
        n = self.num_workers
        b = int(round(2 * (n - 1) / n * sub.nbytes)) if n > 1 else 0
        return b, b

    def close(self) -> None:
        super().close()
        if self._started_hvd:
            self.hvd.shutdown()

    def manifest(self) -> dict:
        hvd = self.hvd
        return {
            **super().manifest(),
            "horovod_version": __import__("horovod").__version__,
            "horovod_cpu_operations": os.environ.get("HOROVOD_CPU_OPERATIONS", "mpi" if hvd.mpi_enabled() else "gloo"),
            "horovod_controller": "mpi" if hvd.mpi_enabled() else "gloo",
            "horovod_nccl_built": bool(hvd.nccl_built()),
            "horovod_fusion_threshold": os.environ.get("HOROVOD_FUSION_THRESHOLD", "default"),
            "horovod_cycle_time_ms": os.environ.get("HOROVOD_CYCLE_TIME", "default"),
        }
