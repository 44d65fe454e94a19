"""Launch the ring's collective tests under a real mpirun at N = 1, 2, 3, 4."""
import pytest

from conftest import ok, run_mpi


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_ring_collectives_under_mpirun(n):
    proc = ok(run_mpi(n, ["-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout=120", "--timeout-method=thread",
                          "tests/mpi/test_ring_collective.py"], timeout=400))
    assert " passed" in proc.stdout and " failed" not in proc.stdout
