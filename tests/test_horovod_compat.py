"""ringtrain.horovod (Horovod's API on the ring) under a real mpirun, at N = 1, 2, 3.
Needs no Horovod installed; tests/test_horovod_real.py compares against Horovod itself."""
import re

import pytest

from conftest import mpi_env, ok, run_mpi


@pytest.mark.parametrize("n", [1, 2, 3])
def test_horovod_api_collectives_under_mpirun(n):
    proc = ok(run_mpi(n, ["-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout=300", "--timeout-method=thread",
                          "tests/mpi/test_horovod_collectives.py"], timeout=600, env=mpi_env(RINGTRAIN_HOROVOD="")))
    assert " passed" in proc.stdout and " failed" not in proc.stdout


def test_digits_example_learns():
    proc = ok(run_mpi(2, ["examples/horovod_digits.py", "--epochs", "4"], timeout=300,
                      env=mpi_env(RINGTRAIN_HOROVOD="")))
    accuracy = [float(a) for a in re.findall(r"accuracy ([\d.]+)%", proc.stdout)]
    assert len(accuracy) == 4, proc.stdout
    assert accuracy[-1] > 80.0, proc.stdout
    assert "collectives" in proc.stdout  # comm_stats() line, ringtrain.horovod only


def test_synthetic_benchmark_prints_horovod_style_throughput():
    proc = ok(run_mpi(2, ["examples/horovod_synthetic_benchmark.py", "--batch-size", "8", "--num-warmup-batches", "1",
                          "--num-batches-per-iter", "2", "--num-iters", "2"], timeout=300, env=mpi_env(RINGTRAIN_HOROVOD="")))
    assert re.search(r"Img/sec per (CPU|GPU): [\d.]+ \+-[\d.]+", proc.stdout), proc.stdout
    assert re.search(r"Total img/sec on 2 (CPU|GPU)\(s\): [\d.]+", proc.stdout), proc.stdout


def test_uncaught_error_on_one_rank_does_not_hang():
    # Rank 1 calls an all-reduce with another size: both ranks raise, mpi4py aborts the job.
    code = ("import torch, ringtrain.horovod as hvd; hvd.init(); "
            "hvd.allreduce(torch.ones(4 + hvd.rank()), name='grad')")
    proc = run_mpi(2, ["-m", "mpi4py", "-c", code], timeout=120, env=mpi_env(RINGTRAIN_HOROVOD=""))
    assert proc.returncode != 0
    assert "HorovodMismatchError" in proc.stderr and "rank 1: allreduce of 5 x float32" in proc.stderr, proc.stderr


def test_opt_in_step_log_is_readable_by_report(tmp_path):
    import h5py

    run_dir = tmp_path / "hvdlog"
    ok(run_mpi(2, ["examples/horovod_digits.py", "--epochs", "1", "--max-steps", "5"], timeout=300,
               env=mpi_env(RINGTRAIN_HOROVOD="", RINGTRAIN_HOROVOD_RUN_DIR=str(run_dir))))
    for rank in (0, 1):
        with h5py.File(run_dir / f"rank-{rank:05d}.h5", "r") as f:
            assert f.attrs["scheme"] == "ringtrain.horovod" and int(f.attrs["rank"]) == rank
            assert list(f["step"][:]) == [0, 1, 2, 3, 4]
            assert (f["t_step"][:] >= f["t_comm_exposed"][:]).all()
            assert (f["bytes_sent"][:] == int(f.attrs["grad_bytes"])).all()  # 2(N-1)/N * S = S at N = 2
    proc = ok(run_mpi(1, ["-m", "ringtrain", "report", str(run_dir)], timeout=120))
    assert "ringtrain.horovod" in proc.stdout
