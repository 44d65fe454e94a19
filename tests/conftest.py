"""Shared test plumbing: launching real MPI jobs with a timeout.

Tests in tests/mpi/ are bodies that run *inside* an MPI job (every rank runs pytest on them);
the tests at this level launch them, and the CLI, under a real `mpirun -n N`, and a timeout
turns any deadlock into a failure instead of a hang.
"""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)

# The bodies in tests/mpi/ only make sense under mpirun; they are launched from here.
collect_ignore = [] if os.environ.get("RINGTRAIN_IN_MPI") else ["mpi"]


def mpirun_prefix(n: int, extra=()) -> list:
    exe = shutil.which("mpirun", path=BIN + os.pathsep + os.environ.get("PATH", ""))
    if exe is None:
        pytest.fail("no mpirun found: install the mpi extra (pip install -e '.[mpi]') or a system MPI")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    cmd = [exe, "-n", str(n)]
    if "Open MPI" in out or "OpenRTE" in out or "prte" in out.lower():
        # More ranks than cores here; threads of one rank may use any core.
        cmd += ["--oversubscribe", "--bind-to", "none"]
        if os.geteuid() == 0:
            cmd += ["--allow-run-as-root"]
    return cmd + list(extra)


def mpi_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
        RINGTRAIN_IN_MPI="1",
        PYTHONUNBUFFERED="1",
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_mpi(n, args, timeout=240, env=None, extra=(), cwd=None):
    """Run `python ARGS` on n ranks; returns CompletedProcess (text). A timeout fails the test."""
    cmd = mpirun_prefix(n, extra) + [sys.executable] + list(args)
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or mpi_env(), cwd=cwd or ROOT)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"mpirun -n {n} {' '.join(args)} did not finish in {timeout} s (deadlock?)\n{out[-3000:]}\n{err[-3000:]}")


def train(n, *args, timeout=240, env=None, extra=()):
    """`python -m ringtrain train ARGS` on n ranks, without progress bars."""
    return run_mpi(n, ["-m", "ringtrain", "train", "--no-progress", *args], timeout=timeout, env=env, extra=extra)


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}"
    return proc


def fails_with(proc, *needles):
    """A clear failure: non-zero exit, every needle in the output, no Python traceback."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    text = proc.stdout + proc.stderr
    for n in needles:
        assert n in text, f"expected {n!r} in:\n{text[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
