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


def test_bench_allreduce_on_huge_page_buffers(tmp_path):
    """--buffers hugepage: the same checked results on numpy-allocated memory, for a 16-bit
    dtype too (the buffer is reinterpreted bytes), and the choice is recorded in the rows."""
    import json

    from ringtrain.bench import _buffer
    import torch

    t = _buffer(5, torch.bfloat16, "hugepage")
    assert t.dtype == torch.bfloat16 and t.shape == (5,) and t.is_contiguous()
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.json"
        proc = ok(run_mpi(2, ["-m", "ringtrain", "bench", "allreduce", "--backends", "ring,mpi", "--sizes", "1K,5M",
                              "--iters", "2", "--dtype", dtype, "--buffers", "hugepage", "--json", str(out)]))
        rows = json.load(open(out))
        assert len(rows) == 4 and all(r["wrong"] == 0 and r["buffers"] == "hugepage" for r in rows), rows
        assert "hugepage buffers" in proc.stdout
