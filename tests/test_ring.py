"""Launch the ring's collective tests under a real mpirun at N = 1, 2, 3, 4."""
import pytest

from conftest import ok, run_mpi


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_ring_collectives_under_mpirun(n):
    proc = ok(run_mpi(n, ["-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout=120", "--timeout-method=thread",
                          "tests/mpi/test_ring_collective.py"], timeout=400))
    assert " passed" in proc.stdout and " failed" not in proc.stdout


@pytest.mark.parametrize("text, expect", [("auto", None), ("0", 0), ("16K", 16 << 10), ("1M", 1 << 20), ("4194304", 4 << 20)])
def test_chunk_bytes_option(text, expect):
    from ringtrain.cli import build_parser

    for argv in (["train", "--chunk-bytes", text], ["bench", "allreduce", "--chunk-bytes", text]):
        assert build_parser().parse_args(argv).chunk_bytes == expect
    assert build_parser().parse_args(["train"]).chunk_bytes is None  # chosen by locality


@pytest.mark.parametrize("text", ["-1", "fast", "1X"])
def test_chunk_bytes_option_refuses_nonsense(text, capsys):
    from ringtrain.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["train", "--chunk-bytes", text])
    assert e.value.code == 2 and "--chunk-bytes" in capsys.readouterr().err
