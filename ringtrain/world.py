"""The MPI world a run lives in: who am I, how was I launched, what time is it on rank 0.

Everything that touches MPI outside the gradient-exchange schemes lives here, so that the
trainer can stay free of MPI. Collective functions must be called by every rank of the
communicator, in the same order; each says so.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

import numpy as np


def _mpi():
    # Imported lazily so that `ringtrain --help` and `ringtrain report` work without an MPI library.
    from mpi4py import MPI

    return MPI


# --------------------------------------------------------------------------- launcher


@dataclass
class LaunchInfo:
    """What the launcher told us through the environment (None where it said nothing)."""

    launcher: str  # mpirun | mpiexec-hydra | srun | horovodrun | torchrun | singleton
    env_rank: int | None = None
    env_size: int | None = None
    env_local_rank: int | None = None
    slurm_job_id: str | None = None
    slurm_ntasks: int | None = None
    # Which variables the rank and size came from, e.g. "OMPI_COMM_WORLD_RANK/SIZE"; for messages.
    source: str = ""
    in_slurm_step: bool = False  # started by srun (SLURM_STEP_ID is set)


def _int_env(*names: str, env=None) -> int | None:
    env = os.environ if env is None else env
    for n in names:
        v = env.get(n)
        if v not in (None, ""):
            try:
                return int(v)
            except ValueError:
                pass
    return None


def detect_launcher(env=None) -> LaunchInfo:
    """Read the launcher's environment variables (default os.environ). No MPI.

    The order matters because launchers nest: horovodrun runs mpirun; mpirun inside SLURM
    starts its daemons with srun, so ranks see SLURM_STEP_ID of that srun; MPICH's Hydra does
    the same. The most specific launcher, the one that started the ranks, wins:

        HOROVOD_RANK                  horovodrun (Gloo controller)
        OMPI_COMM_WORLD_RANK/SIZE     Open MPI's mpirun (horovodrun if HOROVOD_* is set too)
        PMI_RANK/SIZE                 MPICH/Intel MPI Hydra (MPI_LOCALRANKID), or srun --mpi=pmi2
        PMIX_RANK under srun          srun --mpi=pmix (size from SLURM_STEP_NUM_TASKS)
        SLURM_PROCID with a step      srun without PMI: the ranks will be MPI singletons
        RANK, LOCAL_RANK, WORLD_SIZE  torchrun (starts no MPI at all)
        none of these                 singleton (maybe directly in an sbatch script)
    """
    env = os.environ if env is None else env

    def i(*names):
        return _int_env(*names, env=env)

    slurm_job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    slurm_ntasks = i("SLURM_NTASKS", "SLURM_NPROCS")
    in_step = "SLURM_STEP_ID" in env or "SLURM_STEPID" in env
    step_tasks = i("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    horovod_env = any(k.startswith("HOROVOD_") for k in env)
    if "HOROVOD_RANK" in env:
        launcher, source = "horovodrun", "HOROVOD_RANK/SIZE"
        rank, size, local = i("HOROVOD_RANK"), i("HOROVOD_SIZE"), i("HOROVOD_LOCAL_RANK")
    elif "OMPI_COMM_WORLD_RANK" in env:
        # horovodrun's MPI controller sets no HOROVOD_* variable: look at the process tree too.
        by_horovodrun = horovod_env or (env is os.environ and _started_by_horovodrun())
        launcher, source = ("horovodrun" if by_horovodrun else "mpirun"), "OMPI_COMM_WORLD_RANK/SIZE"
        rank, size = i("OMPI_COMM_WORLD_RANK"), i("OMPI_COMM_WORLD_SIZE")
        local = i("OMPI_COMM_WORLD_LOCAL_RANK")
    elif "PMI_RANK" in env:
        hydra = "MPI_LOCALRANKID" in env or not in_step
        launcher, source = ("mpiexec-hydra" if hydra else "srun"), "PMI_RANK/SIZE"
        rank, size = i("PMI_RANK"), i("PMI_SIZE")
        local = i("MPI_LOCALRANKID", "SLURM_LOCALID")
    elif "PMIX_RANK" in env and in_step:
        launcher, source = "srun", "PMIX_RANK, SLURM_STEP_NUM_TASKS"
        rank, size, local = i("PMIX_RANK"), step_tasks, i("SLURM_LOCALID")
    elif "SLURM_PROCID" in env and in_step:
        launcher, source = "srun", "SLURM_PROCID, SLURM_STEP_NUM_TASKS"
        rank, size, local = i("SLURM_PROCID"), step_tasks, i("SLURM_LOCALID")
    elif "RANK" in env and "LOCAL_RANK" in env:
        launcher, source = "torchrun", "RANK/WORLD_SIZE"
        rank, size, local = i("RANK"), i("WORLD_SIZE"), i("LOCAL_RANK")
    else:
        launcher, source, rank, size, local = "singleton", "", None, None, None
    return LaunchInfo(launcher, rank, size, local, slurm_job, slurm_ntasks, source, in_step)


def _started_by_horovodrun(levels: int = 6) -> bool:
    """Whether horovodrun started this process. Its MPI controller sets no HOROVOD_* variable:
    it replaces itself (exec) with `/bin/sh -c "mpirun ... -mca btl_tcp_if_include NICS
    -x NCCL_SOCKET_IFNAME=NICS ..."`, so that shell among our ancestors is the sign."""
    try:
        import psutil

        p = psutil.Process().parent()
        for _ in range(levels):
            if p is None:
                return False
            cmd = p.cmdline()
            if any(os.path.basename(a) == "horovodrun" for a in cmd[:4]):
                return True
            if len(cmd) >= 3 and cmd[1] == "-c" and cmd[2].startswith("mpirun ") and "-x NCCL_SOCKET_IFNAME=" in cmd[2]:
                return True
            p = p.parent()
    except Exception:  # no psutil, or a parent we may not inspect
        return False
    return False


class LaunchError(RuntimeError):
    exit_code = 2


def _mpi_library() -> str:
    try:
        # "Open MPI v5.0.11, package: ..." / "MPICH Version: 4.2.0 ...": the name and version suffice.
        return _mpi().Get_library_version().split("\n")[0].split(",")[0].strip().rstrip("\x00")[:60]
    except Exception:  # no MPI loaded: only the message suffers
        return "unknown"


def check_launch(info: LaunchInfo, mpi_rank: int, mpi_size: int) -> None:
    """Fail loudly when MPI's view of the world disagrees with the launcher's.

    The common case: `srun -n 4 python -m ringtrain ...` with an MPI that was not built with
    SLURM's PMI support starts four independent singletons, each of which thinks it is rank 0
    of 1 and would silently train alone. Each message says how to launch instead.
    """
    where = f"rank {mpi_rank} of {mpi_size}"
    if info.env_size is not None and info.env_size != mpi_size:
        n = info.env_size
        if info.launcher == "torchrun":
            how = (f"torchrun starts processes but no MPI job; ringtrain's ranks come from MPI. Launch with "
                   f"`mpirun -n {n} python -m ringtrain ...` (the ddp backend then starts torch.distributed itself).")
        elif info.launcher == "horovodrun" and info.source.startswith("HOROVOD_"):
            how = (f"horovodrun started {n} processes with its Gloo controller, which starts no MPI job. Use "
                   f"`horovodrun --mpi -np {n} ...` or `mpirun -n {n} python -m ringtrain train --backend horovod`.")
        elif info.launcher == "srun":
            how = (f"srun started {n} tasks but this MPI ({_mpi_library()}) did not connect them, so each is a "
                   f"singleton. Inside the allocation use `mpirun -n $SLURM_NTASKS python -m ringtrain ...`, or "
                   f"`srun --mpi=pmix` if this MPI was built with PMIx support (`srun --mpi=list` shows what SLURM offers).")
        else:
            how = (f"{info.launcher} started {n} processes ({info.source}) but mpi4py's MPI ({_mpi_library()}) sees "
                   f"{mpi_size}: the launcher belongs to a different MPI library than the one mpi4py loaded. Use the "
                   f"mpirun/mpiexec of that library (`python -m mpi4py --mpi-library` names it).")
        raise LaunchError(f"{where}: {how}")
    if info.env_rank is not None and info.env_rank != mpi_rank:
        raise LaunchError(
            f"{where}: the launcher ({info.launcher}, {info.source}) says this is rank {info.env_rank}, MPI says "
            f"{mpi_rank}. Ranks must come from one launcher; do not nest them (e.g. srun inside mpirun).")
    if info.launcher == "singleton" and mpi_size == 1 and (info.slurm_ntasks or 1) > 1:
        raise LaunchError(
            f"{where}: started directly inside a SLURM job of {info.slurm_ntasks} tasks (SLURM_NTASKS), without a "
            f"launcher, so only this one process trains. Use `mpirun -n $SLURM_NTASKS python -m ringtrain ...` in the "
            f"batch script (or `mpirun -n 1` to run one rank on purpose).")


# --------------------------------------------------------------------------- world


@dataclass
class World:
    """One process's view of the job. Create with `World.init()` (collective over COMM_WORLD)."""

    comm: object  # mpi4py communicator; schemes duplicate it, nobody else sends on it
    rank: int
    size: int
    local_rank: int
    local_size: int
    hostname: str
    launch: LaunchInfo
    clock_offset: float = 0.0  # add to time.time() to get rank 0's clock
    clock_uncertainty: float = 0.0  # half the best ping-pong round trip, seconds
    extra: dict = field(default_factory=dict)

    @classmethod
    def init(cls, comm=None, align_clocks: bool = True) -> "World":
        """Collective: every rank of `comm` (default COMM_WORLD) must call it."""
        MPI = _mpi()
        comm = comm if comm is not None else MPI.COMM_WORLD
        info = detect_launcher()
        check_launch(info, comm.Get_rank(), comm.Get_size()) if comm == MPI.COMM_WORLD else None
        node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
        world = cls(
            comm=comm,
            rank=comm.Get_rank(),
            size=comm.Get_size(),
            local_rank=node.Get_rank(),
            local_size=node.Get_size(),
            hostname=socket.gethostname(),
            launch=info,
        )
        _note_local_peers(node, MPI.COMM_WORLD.Get_rank())  # the rank the error handler names
        node.Free()
        if align_clocks:
            world.clock_offset, world.clock_uncertainty = measure_clock_offset(comm)
        return world

    # Small helpers for control values. Buffer-based; collective over self.comm.
    def barrier(self) -> None:
        self.comm.Barrier()

    def allreduce_sum(self, values) -> np.ndarray:
        return self._allreduce(values, "SUM")

    def allreduce_max(self, values) -> np.ndarray:
        return self._allreduce(values, "MAX")

    def _allreduce(self, values, op: str) -> np.ndarray:
        a = np.ascontiguousarray(values, dtype=np.float64)
        out = np.empty_like(a)
        self.comm.Allreduce(a, out, op=getattr(_mpi(), op))
        return out

    def bcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        return bcast_bytes(self.comm, data, root)

    def now(self) -> float:
        """Seconds on rank 0's clock (time.time() plus the measured offset)."""
        return time.time() + self.clock_offset

    def abort(self, code: int = 1) -> None:
        self.comm.Abort(code)


def bcast_bytes(comm, data: bytes | None, root: int = 0) -> bytes:
    """Collective: root's small byte string (addresses, JSON) on every rank; `data` is
    ignored elsewhere. Length first, then the bytes; buffer-based, no pickle."""
    rank = comm.Get_rank()
    n = np.array([len(data) if rank == root else 0], dtype=np.int64)
    comm.Bcast(n, root=root)
    buf = np.frombuffer(data, dtype=np.uint8).copy() if rank == root else np.empty(int(n[0]), np.uint8)
    comm.Bcast(buf, root=root)
    return buf.tobytes()


def measure_clock_offset(comm, pings: int = 8) -> tuple[float, float]:
    """Collective: offset of this rank's time.time() to rank 0's, and its uncertainty.

    Each rank r > 0 in turn does `pings` ping-pongs with rank 0 and keeps the exchange with
    the smallest round trip (Cristian's algorithm): offset = t0_master - (t_send + t_recv)/2,
    uncertainty = rtt/2. Rank 0 returns (0, 0).
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    if size == 1:
        return 0.0, 0.0
    buf = np.zeros(1, dtype=np.float64)
    best_rtt, best_offset = float("inf"), 0.0
    if rank == 0:
        for peer in range(1, size):
            for _ in range(pings):
                comm.Recv(buf, source=peer, tag=7001)
                buf[0] = time.time()
                comm.Send(buf, dest=peer, tag=7002)
    else:
        for _ in range(pings):
            t0 = time.time()
            comm.Send(buf, dest=0, tag=7001)
            comm.Recv(buf, source=0, tag=7002)
            t1 = time.time()
            if t1 - t0 < best_rtt:
                best_rtt, best_offset = t1 - t0, float(buf[0]) - (t0 + t1) / 2
    comm.Barrier()
    return (best_offset, best_rtt / 2) if rank else (0.0, 0.0)


# --------------------------------------------------------------------------- errors


# Other ranks on this node, {rank: pid}, recorded by World.init. When a peer dies, the error
# this rank sees comes from its transport (gloo: "Connection closed by peer [127.0.0.1]:8600";
# MPI: a failed request) and names no rank; the error handler below looks here for a local
# peer whose process is gone, and names it.
_LOCAL_PEERS: dict[int, int] = {}

# How long the error handler waits for a local peer's exit to become visible: its sockets
# close (and this rank's transport fails) a moment before its process is gone. Only for a
# RuntimeError, the kind a lost peer raises (torch.distributed's errors and mpi4py's
# MPI.Exception are RuntimeErrors); a bad option or a missing file aborts at once.
LOST_PEER_WAIT_S = 0.5


def _note_local_peers(node, rank: int) -> None:
    """Collective over `node` (the ranks sharing this node): record every other rank's pid.
    Only pids this process can see as running are kept (a rank in another pid namespace,
    e.g. another container, would otherwise look dead)."""
    import psutil

    table = np.empty((node.Get_size(), 2), dtype=np.int64)
    node.Allgather(np.array([rank, os.getpid()], dtype=np.int64), table)
    _LOCAL_PEERS.clear()
    _LOCAL_PEERS.update({int(r): int(pid) for r, pid in table if r != rank and psutil.pid_exists(int(pid))})


def lost_local_peers(wait_s: float = 0.0) -> list[int]:
    """Ranks on this node (recorded by World.init) whose process has exited: gone, or a zombie
    not yet reaped. Polls for up to `wait_s` seconds until one shows; [] if none does."""
    import psutil

    def gone(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
        except psutil.NoSuchProcess:
            return True
        except psutil.Error:
            return False

    deadline = time.monotonic() + wait_s
    while True:
        lost = sorted(r for r, pid in _LOCAL_PEERS.items() if gone(pid))
        if lost or time.monotonic() >= deadline:
            return lost
        time.sleep(0.02)


def install_abort_on_error(comm=None) -> None:
    """Make an uncaught exception on any rank (main thread or a communication thread)
    print `[rank R] ...` and abort the whole job, instead of leaving the other ranks
    blocked in a collective forever (what happens under plain `python script.py`).

    When a rank on this node has exited (a crash, a kill), the line names it, since the error
    from the transport names none. The line goes to the process's own stderr (sys.__stderr__):
    torch.distributed's init_process_group wraps sys.excepthook and points sys.stderr at a
    buffer while the previous hook (this one) runs, to print it afterwards with a rank prefix;
    since this hook aborts, that buffer would never be printed.
    """
    MPI = _mpi()
    comm = comm if comm is not None else MPI.COMM_WORLD
    rank = comm.Get_rank()

    def _report_and_abort(exc_type, exc, tb):
        err = sys.__stderr__ or sys.stderr
        if exc_type is KeyboardInterrupt:
            err.write(f"[rank {rank}] interrupted\n")
        else:
            text = "".join(traceback.format_exception(exc_type, exc, tb)) if os.environ.get("RINGTRAIN_TRACEBACK") else ""
            wait_s = LOST_PEER_WAIT_S if issubclass(exc_type, RuntimeError) else 0.0
            lost = lost_local_peers(wait_s) if _LOCAL_PEERS else []
            cause = (f"\n[rank {rank}] the likely cause: rank{'s' if len(lost) > 1 else ''} {', '.join(map(str, lost))} "
                     f"on this node had already exited") if lost else ""
            err.write(f"{text}[rank {rank}] error: {exc_type.__name__}: {exc}{cause}\n")
        err.flush()
        if comm.Get_size() > 1:
            comm.Abort(getattr(exc, "exit_code", 1) or 1)
        os._exit(getattr(exc, "exit_code", 1) or 1)

    sys.excepthook = _report_and_abort
    threading.excepthook = lambda args: _report_and_abort(args.exc_type, args.exc_value, args.exc_traceback)


def init_torch_distributed(world: World, backend: str = "gloo", timeout_s: float = 120.0) -> None:
    """Collective: start torch.distributed on the same ranks as `world` (for gloo/nccl/DDP).

    Rank 0 picks a free TCP port and broadcasts its address over MPI, so no MASTER_ADDR /
    MASTER_PORT needs to be set by the user.
    """
    import datetime

    import torch.distributed as dist

    if dist.is_initialized():
        return
    if world.rank == 0:
        s = socket.socket()
        s.bind(("", 0))
        port = s.getsockname()[1]
        s.close()
        addr = os.environ.get("RINGTRAIN_MASTER_ADDR") or _routable_address()
        msg = f"{addr}:{port}".encode()
    else:
        msg = None
    addr, port = world.bcast_bytes(msg).decode().rsplit(":", 1)
    dist.init_process_group(
        backend,
        init_method=f"tcp://{addr}:{port}",
        rank=world.rank,
        world_size=world.size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def _routable_address() -> str:
    # The address other hosts reach us at; 127.0.0.1 is enough when every rank is local.
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
