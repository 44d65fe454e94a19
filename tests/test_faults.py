"""Faults under a real mpirun: a dead or failing rank never hangs the job, a crashed run
resumes exactly from its snapshot, the elastic ring survives a lost rank, and bad input
(NaN gradients, out-of-range options, unsafe snapshots) gets a clear error."""
import glob
import os
import re
import subprocess
import sys
import threading
import time

import h5py
import numpy as np
import pytest
import torch

from conftest import ROOT, fails_with, mpi_env, mpirun_prefix, ok, run_mpi, train

# Seconds from the failure until every rank has exited. mpirun needs well under 5 s on a
# quiet machine; the margin is for a heavily loaded one.
BOUND_S = 30

QUICK = ["--no-progress", "--model", "mlp", "--batch-size", "16", "--save-every", "0"]


def launch_and_time(n, args, extra=(), marker="injected failure", timeout=300):
    """Run `python -m ringtrain train ARGS` on n ranks, reading its output as it comes.
    Returns (returncode, output, seconds from the line containing `marker` to the exit)."""
    cmd = mpirun_prefix(n, extra) + [sys.executable, "-m", "ringtrain", "train", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=mpi_env(), cwd=ROOT)
    lines, t_mark = [], []

    def read():
        for line in proc.stdout:
            if marker in line and not t_mark:
                t_mark.append(time.monotonic())
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"{' '.join(cmd)} did not finish in {timeout} s (hang)\n{''.join(lines)[-4000:]}")
    t_end = time.monotonic()
    reader.join(10)
    out = "".join(lines)
    assert t_mark, f"no {marker!r} line in the output:\n{out[-4000:]}"
    return proc.returncode, out, t_end - t_mark[0]


def steps_in(path):
    with h5py.File(path, "r", swmr=True) as f:
        return f["step"][:].tolist()


# ---- 1. no hang, ever --------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["raise", "exit", "kill"])
@pytest.mark.parametrize("backend", ["ring", "mpi", "ddp"])
def test_a_failed_rank_ends_the_job_quickly_and_is_named(tmp_path, backend, mode):
    rc, out, after = launch_and_time(3, [*QUICK, "--backend", backend, "--steps", "40", "--run-dir", str(tmp_path / "r"),
                                         "--fail-rank", "1", "--fail-step", "3", "--fail-mode", mode])
    assert rc != 0, out[-3000:]
    assert after < BOUND_S, f"the job took {after:.1f} s to end after rank 1 failed\n{out[-3000:]}"
    # Who failed, as mpirun or our own error handler reports it (not only the injector's line).
    report = "\n".join(line for line in out.splitlines() if "injected failure at step" not in line)
    assert re.search(r"rank 1\b|@1,1\]", report), out[-3000:]
    assert "Summary:" not in out


AFTER_GLOO = r"""
import sys
from ringtrain.world import World, init_torch_distributed, install_abort_on_error

install_abort_on_error()
world = World.init(align_clocks=False)
init_torch_distributed(world, "gloo")  # wraps sys.excepthook and redirects stderr while ours runs
world.barrier()
if world.rank == 1:
    raise RuntimeError("boom on rank 1")
world.barrier()
"""


def test_an_error_after_torch_distributed_starts_is_still_printed():
    proc = run_mpi(2, ["-c", AFTER_GLOO], timeout=120)
    assert proc.returncode != 0
    assert "[rank 1] error: RuntimeError: boom on rank 1" in proc.stderr, proc.stderr[-3000:]


def test_lost_local_peers_names_exited_and_unreaped_processes(monkeypatch):
    """The error handler's evidence for "rank R had already exited": a peer process that is gone,
    or a zombie its launcher has not reaped yet; a live one is never named."""
    from ringtrain import world

    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        gone.wait()  # reaped: its pid no longer exists
        deadline = time.monotonic() + 30
        while os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is None:  # exited, not reaped
            assert time.monotonic() < deadline
            time.sleep(0.01)
        monkeypatch.setattr(world, "_LOCAL_PEERS", {1: alive.pid, 2: zombie.pid, 3: gone.pid})
        assert world.lost_local_peers() == [2, 3]
        monkeypatch.setattr(world, "_LOCAL_PEERS", {1: alive.pid})
        t0 = time.monotonic()
        assert world.lost_local_peers(wait_s=0.2) == [] and time.monotonic() - t0 >= 0.2
    finally:
        alive.kill()
        alive.wait()
        zombie.wait()


MISMATCH = r"""
import sys
import numpy as np
from mpi4py import MPI
from ringtrain.ring import Ring, RingMismatchError
from ringtrain.schemes.mpi import mpi_allreduce_average_
from ringtrain.world import install_abort_on_error

install_abort_on_error()
comm = MPI.COMM_WORLD
rank = comm.Get_rank()
ring = Ring(comm)
cases = {
    "size": lambda: ring.allreduce_(np.ones(10 + (rank == 2), np.float32)),
    "dtype": lambda: ring.allreduce_(np.ones(10, np.float64 if rank == 1 else np.float32)),
    "order": lambda: ring.allreduce_(np.ones(10, np.float32), name="b" if rank == 0 else "a"),
    "mpi": lambda: mpi_allreduce_average_(comm, np.ones(5 + rank, np.float32), seq=0),
}
for what, call in cases.items():
    try:
        call()
        print(f"[rank {rank}] {what}: no error", flush=True)
    except RingMismatchError as e:
        print(f"[rank {rank}] {what}: {e}", flush=True)
ring.allreduce_(np.ones(3 + rank, np.float32))  # uncaught: the job must end, not hang
"""


def test_mismatched_collectives_are_named_on_every_rank_and_end_the_job():
    proc = run_mpi(3, ["-c", MISMATCH], timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    for r in range(3):
        assert f"[rank {r}] size: all-reduce mismatch across ranks (element counts differ)" in out, out[-3000:]
        assert re.search(rf"\[rank {r}\] dtype: .*dtypes differ.*rank 1: 10 x float64", out), out[-3000:]
        assert re.search(rf"\[rank {r}\] order: .*tensor names differ", out), out[-3000:]
        assert re.search(rf"\[rank {r}\] mpi: .*element counts differ.*rank 2: 7 x float32", out), out[-3000:]
    assert "no error" not in out
    assert "error: RingMismatchError" in out
    assert re.search(r"rank 0: 3 x float32 .*; rank 1: 4 x float32 .*; rank 2: 5 x float32", out), out[-3000:]


# ---- 2. restart from the last snapshot ------------------------------------------------------


def test_resume_after_a_crash_matches_an_uninterrupted_run_and_keeps_the_crashed_logs(tmp_path):
    common = [*QUICK, "--backend", "ring", "--model", "cnn", "--steps", "20", "--log-flush-every", "3"]
    ok(train(2, *common, "--snapshot", str(tmp_path / "full.pt"), "--run-dir", str(tmp_path / "full")))

    crashed = tmp_path / "crashed"
    snap = str(tmp_path / "part.pt")
    rc, out, after = launch_and_time(2, [*common, "--snapshot", snap, "--save-every-steps", "4", "--run-dir", str(crashed),
                                         "--fail-rank", "1", "--fail-step", "10", "--fail-mode", "kill"])
    assert rc != 0 and after < BOUND_S
    assert torch.load(snap, weights_only=True)["STEP"] == 8  # the last snapshot before the crash
    # The crashed run's logs: readable, every step that reached a flush is there, in order.
    assert steps_in(crashed / "rank-00001.h5") == list(range(10))  # the failing rank flushed before dying
    s0 = steps_in(crashed / "rank-00000.h5")
    assert s0 == list(range(len(s0))) and len(s0) >= 9, s0  # flushed every 3 steps: at least 0..8
    before = {p: open(p, "rb").read() for p in glob.glob(str(crashed / "rank-*.h5"))}

    proc = ok(train(2, *common, "--snapshot", snap, "--save-every-steps", "4", "--run-dir", str(crashed), "--resume"))
    assert "Resuming training from snapshot at Epoch 0, step 8" in proc.stdout
    for r in range(2):
        assert steps_in(crashed / f"rank-{r:05d}.seg-001.h5") == list(range(8, 20))
    assert {p: open(p, "rb").read() for p in before} == before, "the resumed run rewrote the crashed run's logs"
    a = torch.load(tmp_path / "full.pt", weights_only=True)["MODEL_STATE"]
    b = torch.load(snap, weights_only=True)["MODEL_STATE"]
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed parameters differ from the uninterrupted run"


# ---- 3. the elastic ring -----------------------------------------------------------------

ULFM = ["--with-ft", "ulfm", "--mca", "btl", "tcp,self"]


@pytest.mark.parametrize("mode, lost", [("kill", 2), ("exit", 0)])  # rank 0 too: worker 1 then leads
def test_elastic_ring_survives_a_lost_rank(tmp_path, mode, lost):
    run_dir = tmp_path / "r"
    steps, fail_step = 30, 6
    rc, out, after = launch_and_time(4, [*QUICK, "--backend", "ring", "--elastic", "--epochs", "3", "--steps", str(steps),
                                         "--run-dir", str(run_dir), "--json", str(tmp_path / "s.json"),
                                         "--fail-rank", str(lost), "--fail-step", str(fail_step), "--fail-mode", mode], extra=ULFM)
    # mpirun reports the lost rank's own exit: 3 for --fail-mode exit; SIGKILL under ULFM gives 0.
    assert rc == (3 if mode == "exit" else 0), out[-4000:]
    assert f"step {fail_step}: lost rank(s) [{lost}]; continuing on 3 of 4 workers" in out, out[-4000:]
    assert "Summary: ring, 3 worker(s)" in out and f"{steps} steps" in out
    import json

    summary = json.load(open(tmp_path / "s.json"))
    assert summary["workers"] == 3 and summary["steps"] == steps and summary["test_accuracy"] > 0.2  # evaluate() works on the survivors (chance: 0.1)
    for r in sorted({0, 1, 2, 3} - {lost}):
        with h5py.File(run_dir / f"rank-{r:05d}.h5", "r", swmr=True) as f:
            assert f["step"][:].tolist() == list(range(steps))
            nw, rec = f["num_workers"][:], f["recover_s"][:]
        assert nw.tolist() == [4] * fail_step + [3] * (steps - fail_step)
        assert rec[fail_step] > 0 and np.all(np.delete(rec, fail_step) == 0)
    assert steps_in(run_dir / f"rank-{lost:05d}.h5") == list(range(fail_step))


def test_elastic_without_ulfm_is_a_clear_error(tmp_path):
    proc = train(2, *QUICK, "--elastic", "--steps", "2", "--run-dir", str(tmp_path / "r"), timeout=120)
    assert proc.returncode != 0
    assert "--elastic needs MPI fault tolerance (ULFM)" in proc.stderr and "mpirun --with-ft ulfm --mca btl tcp,self" in proc.stderr


def test_elastic_launch_check():
    from ringtrain.schemes.elastic import ElasticUnavailable, check_fault_tolerant_launch

    check_fault_tolerant_launch({"OMPI_MCA_mpi_ft_enable": "1", "OMPI_MCA_btl": "tcp,self"})
    check_fault_tolerant_launch({"OMPI_MCA_mpi_ft_enable": "1", "OMPI_MCA_btl": "^sm"})
    for env in ({}, {"OMPI_MCA_btl": "tcp,self"}, {"OMPI_MCA_mpi_ft_enable": "1"},
                {"OMPI_MCA_mpi_ft_enable": "1", "OMPI_MCA_btl": "sm,self"}, {"OMPI_MCA_mpi_ft_enable": "1", "OMPI_MCA_btl": "^tcp"}):
        with pytest.raises(ElasticUnavailable):
            check_fault_tolerant_launch(env)


# ---- 5. bad input --------------------------------------------------------------------------


def test_nonfinite_gradient_stop_names_step_and_rank(tmp_path):
    fails_with(train(2, *QUICK, "--steps", "10", "--run-dir", str(tmp_path / "r"), "--fail-rank", "1", "--fail-step", "4",
                     "--fail-mode", "nan", timeout=120),
               "non-finite gradient at step 4: NaN/Inf loss on rank(s) 1", "--nonfinite skip")


def test_nonfinite_gradient_skip_drops_the_step_and_goes_on(tmp_path):
    proc = ok(train(2, *QUICK, "--steps", "10", "--run-dir", str(tmp_path / "r"), "--fail-rank", "1", "--fail-step", "4",
                    "--fail-mode", "nan", "--nonfinite", "skip", "--snapshot", str(tmp_path / "s.pt"), timeout=120))
    assert "non-finite gradient at step 4: NaN/Inf loss on rank(s) 1; update skipped" in proc.stderr
    assert "Summary:" in proc.stdout
    snap = torch.load(tmp_path / "s.pt", weights_only=True)
    assert snap["STEP"] == 10 and all(torch.isfinite(t).all() for t in snap["MODEL_STATE"].values())


@pytest.mark.parametrize("backend", ["ps-sync", "ps-async", "none"])
def test_nonfinite_gradient_on_one_worker_of_a_scheme_without_averaging(tmp_path, backend):
    """A parameter server (and `none`) leaves each worker its own gradient, so only the NaN
    worker knows: stop must end the job naming it (it used to wait in a collective that the
    healthy workers never joined, until --ps-timeout), skip must keep its gradient from the
    server (it used to reach the server and poison every worker's parameters)."""
    common = [*QUICK, "--backend", backend, "--steps", "10", "--fail-rank", "1", "--fail-step", "4", "--fail-mode", "nan",
              "--ps-timeout", "60"]
    fails_with(train(3, *common, "--run-dir", str(tmp_path / "stop"), timeout=120),
               "non-finite gradient at step 4 on worker", "--nonfinite skip")
    proc = ok(train(3, *common, "--nonfinite", "skip", "--run-dir", str(tmp_path / "skip"), "--snapshot", str(tmp_path / "s.pt"),
                    timeout=120))
    assert re.search(r"\[worker \d\] non-finite gradient at step 4 on worker \d; its gradient is dropped", proc.stderr), proc.stderr
    snap = torch.load(tmp_path / "s.pt", weights_only=True)
    assert snap["STEP"] == 10 and all(torch.isfinite(t).all() for t in snap["MODEL_STATE"].values())
    for f in glob.glob(str(tmp_path / "skip" / "rank-*.h5")):
        with h5py.File(f, "r", swmr=True) as h:
            loss = h["loss"][:]
        if len(loss):  # a dedicated server rank logs no steps
            assert np.isfinite(np.delete(loss, 4)).all(), (f, loss)  # only the injected step's loss is NaN


def test_nonfinite_from_a_diverging_learning_rate(tmp_path):
    fails_with(train(2, *QUICK, "--steps", "10", "--lr", "1e30", "--run-dir", str(tmp_path / "r"), timeout=120),
               "non-finite gradient at step", "Lower --lr")


@pytest.mark.parametrize("args, needle", [
    (["--fail-rank", "5", "--fail-step", "2"], "--fail-rank 5 is not a worker of this job of 2 worker(s) (0..1)"),
    (["--backend", "ps-sync", "--fail-rank", "1", "--fail-step", "2"], "--fail-rank 1 is not a worker of this job of 1 worker(s) (0..0)"),
    (["--fail-rank", "1"], "--fail-rank 1 needs --fail-step"),
    (["--bucket-cap-mb", "0"], "argument --bucket-cap-mb: must be > 0"),
    (["--elastic", "--backend", "mpi"], "--elastic is available for --backend ring, not 'mpi'"),
])
def test_out_of_range_fault_options(tmp_path, args, needle):
    fails_with(train(2, *QUICK, "--steps", "2", "--run-dir", str(tmp_path / "r"), *args, timeout=120), needle)


def test_a_snapshot_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"MODEL_STATE": {}, "EPOCHS_RUN": 0, "EXTRA": Payload()}, tmp_path / "s.pt")
    fails_with(train(2, *QUICK, "--resume", "--snapshot", str(tmp_path / "s.pt"), "--run-dir", str(tmp_path / "r"), timeout=120),
               "refused: it refers to the Python object posix.system", "rank 0")
    assert not marker.exists()
