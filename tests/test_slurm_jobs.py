"""jobs/*.sbatch under a real single-node SLURM (scripts/slurm_up.sh), at toy scale.

Needs root (the daemons run as root) and either SLURM already installed or apt-get to
install it; skips with the reason otherwise. The jobs are submitted together and run side
by side (the node declares 8 CPUs), so the module takes about as long as its slowest job.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

h5py = pytest.importorskip("h5py")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM_DIR = os.environ.get("RINGTRAIN_SLURM_DIR", "/tmp/ringtrain-slurm")
SLURM_CONF = os.path.join(SLURM_DIR, "slurm.conf")
JOB_TIMEOUT = 600
TOY = {"STEPS": "3", "MODEL": "mlp", "EPOCHS": "1", "BATCH_SIZE": "16"}


def _slurm_env(**extra):
    env = dict(os.environ, SLURM_CONF=SLURM_CONF, RINGTRAIN_HOME=ROOT, RINGTRAIN_PYTHON=sys.executable,
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def _slurm_running() -> bool:
    if not shutil.which("sinfo") or not os.path.exists(SLURM_CONF):
        return False
    p = subprocess.run(["sinfo", "-h", "-o", "%t"], env=_slurm_env(), capture_output=True, text=True, timeout=30)
    return p.returncode == 0 and p.stdout.strip().startswith(("idle", "mix", "alloc"))


@pytest.fixture(scope="session")
def slurm():
    """A running single-node SLURM; started (and afterwards stopped) here unless one is up."""
    if os.geteuid() != 0:
        pytest.skip("needs root: scripts/slurm_up.sh starts munged, slurmctld and slurmd as root")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and there is no apt-get to install it")
    was_up = _slurm_running()
    if not was_up:
        p = subprocess.run([os.path.join(ROOT, "scripts", "slurm_up.sh")], env=_slurm_env(),
                           capture_output=True, text=True, timeout=600)
        if p.returncode != 0:
            if not shutil.which("slurmctld"):
                pytest.skip(f"could not install SLURM with apt-get: {p.stderr.strip()[-300:]}")
            pytest.fail(f"scripts/slurm_up.sh failed:\n{p.stdout}\n{p.stderr}")
    yield SLURM_CONF
    if not was_up:
        subprocess.run([os.path.join(ROOT, "scripts", "slurm_down.sh")], capture_output=True, timeout=120)


def _backend_listed(name: str) -> bool:
    p = subprocess.run([sys.executable, "-m", "ringtrain", "train", "--help"], env=_slurm_env(),
                       capture_output=True, text=True, timeout=120)
    return name in p.stdout


JOBS = {
    # name: (script, ntasks, extra environment, backend that must exist or None)
    "ring": ("train_ring.sbatch", 2, TOY, None),
    "horovod": ("train_horovod.sbatch", 2, TOY, "horovod"),
    "ps": ("train_ps.sbatch", 3, TOY, "ps-sync"),
    "bench": ("bench_allreduce.sbatch", 2, {"BACKENDS": "ring,mpi", "SIZES": "64K,1M", "ITERS": "2"}, None),
    "sweep": ("scaling_sweep.sbatch", 4, TOY, None),
}


@pytest.fixture(scope="module")
def finished_jobs(slurm, tmp_path_factory):
    """Submit every runnable job at once with `sbatch --wait`; {name: (returncode, output, run_dir, job_id)}."""
    base = tmp_path_factory.mktemp("jobs")
    procs = {}
    for name, (script, n, extra, backend) in JOBS.items():
        if backend and not _backend_listed(backend):
            continue
        run_dir = str(base / name)
        out = str(base / f"{name}.out")
        env = _slurm_env(RUN_DIR=run_dir, **extra)
        procs[name] = (subprocess.Popen(
            ["sbatch", "--wait", "--parsable", "-n", str(n), "-J", f"test-{name}", "-o", out,
             os.path.join("jobs", script)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), out, run_dir)
    results = {}
    for name, (p, out, run_dir) in procs.items():
        try:
            stdout, stderr = p.communicate(timeout=JOB_TIMEOUT)
        except subprocess.TimeoutExpired:
            p.kill()
            job = (p.stdout.read() if p.stdout else "").strip()
            if job:
                subprocess.run(["scancel", job], env=_slurm_env(), capture_output=True)
            stdout, stderr = job, f"timed out after {JOB_TIMEOUT}s"
        text = open(out, errors="replace").read() if os.path.exists(out) else ""
        results[name] = (p.returncode, text + stderr, run_dir, stdout.strip().split(";")[0])
    return results


def _job(finished_jobs, name):
    if name not in finished_jobs:
        backend = JOBS[name][3]
        pytest.skip(f"`python -m ringtrain train --help` does not list the {backend} backend yet")
    rc, out, run_dir, job_id = finished_jobs[name]
    assert rc == 0, f"jobs/{JOBS[name][0]} failed (rc {rc}):\n{out[-3000:]}"
    return out, run_dir, job_id


def _check_run_dir(run_dir, nranks, job_id, servers=0):
    """Step logs of every worker; dedicated parameter servers (ranks 0..servers-1) write
    server-SSSSS.h5 instead."""
    for s in range(servers):
        assert os.path.exists(os.path.join(run_dir, f"server-{s:05d}.h5")), f"missing server log {s}"
    for r in range(servers, nranks):
        path = os.path.join(run_dir, f"rank-{r:05d}.h5")
        assert os.path.exists(path), f"missing {path}"
        with h5py.File(path, "r") as f:
            assert len(f["step"]) > 0
            assert f.attrs["launcher"] == "mpirun"
            assert int(f.attrs["world_size"]) == nranks
            if "slurm_job_id" in f.attrs:
                assert str(f.attrs["slurm_job_id"]) == job_id


@pytest.mark.parametrize("name", ["ring", "horovod", "ps"])
def test_train_jobs(finished_jobs, name):
    out, run_dir, job_id = _job(finished_jobs, name)
    # train_ps.sbatch runs the ps backend's default: one dedicated server, rank 0.
    _check_run_dir(run_dir, JOBS[name][1], job_id, servers=1 if name == "ps" else 0)
    assert os.path.exists(os.path.join(run_dir, "summary.json"))


def test_bench_job(finished_jobs):
    out, run_dir, _ = _job(finished_jobs, "bench")
    rows = json.load(open(os.path.join(run_dir, "bench.json")))
    assert {r["backend"] for r in rows} == {"ring", "mpi"}
    assert {r["size_bytes"] for r in rows} == {64 << 10, 1 << 20}
    assert all(r["nranks"] == 2 and r["wrong"] == 0 and r["busbw_GBps"] > 0 for r in rows)


def test_scaling_sweep_job(finished_jobs):
    out, run_dir, job_id = _job(finished_jobs, "sweep")
    for n in (1, 2, 4):
        _check_run_dir(os.path.join(run_dir, f"n{n}"), n, job_id)
    assert os.path.exists(os.path.join(run_dir, "report.json"))
    assert "== N=4" in out


def test_srun_singletons_fail_with_how_to_launch(slurm):
    """`srun -n 2` with an MPI that has no SLURM PMI starts two singletons: World.init must refuse."""
    code = "from ringtrain.world import World; w = World.init(); print('WORLD', w.rank, w.size)"
    p = subprocess.run(["srun", "-n", "2", sys.executable, "-c", code], env=_slurm_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    if "WORLD 0 2" in p.stdout:
        pytest.skip("this MPI connects srun's tasks through PMI, so there are no singletons to catch")
    assert p.returncode != 0, p.stdout + p.stderr
    assert "singleton" in p.stderr and "mpirun -n $SLURM_NTASKS" in p.stderr, p.stderr
