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


@pytest.mark.parametrize("backends", ["ring,mpi,gloo", "mpi"])
def test_bench_allreduce_on_the_rings_shared_memory(tmp_path, backends):
    """--buffers shared: every backend's buffers from Ring.empty (also when no ring is timed),
    results checked as always, on 1K (the ring's messages) and 5M (the shared path), for a
    16-bit dtype too; the choice is recorded, and a one-rank run says that it got private memory."""
    import json

    for n, dtype in ((3, "float32"), (2, "bfloat16"), (1, "float32")):
        out = tmp_path / f"{n}-{dtype}.json"
        proc = ok(run_mpi(n, ["-m", "ringtrain", "bench", "allreduce", "--backends", backends, "--sizes", "1K,5M",
                              "--iters", "2", "--dtype", dtype, "--buffers", "shared", "--json", str(out)]))
        rows = json.load(open(out))
        assert len(rows) == 2 * len(backends.split(",")) and all(r["wrong"] == 0 for r in rows), rows
        expect = "shared" if n > 1 else "shared (private memory here: one rank, or ranks on several nodes)"
        assert all(r["buffers"] == expect for r in rows) and f"{expect} buffers" in proc.stdout
