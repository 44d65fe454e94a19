"""The ring all-reduce, checked against MPI_Allreduce and closed forms.

Runs inside an MPI job: every rank executes every test (launched by tests/test_ring.py under
mpirun -n 1, 2, 3, 4, and here also on COMM_SELF). Sizes are the awkward ones: 0, 1, N-1,
N+1, primes, and more than one pipeline chunk.
"""
import numpy as np
import pytest
import torch
from mpi4py import MPI

from ringtrain.ring import DEFAULT_CHUNK_BYTES, Ring, RingMismatchError, Waiter
from ringtrain.schemes.mpi import mpi_allreduce_average_

WORLD = MPI.COMM_WORLD
N = WORLD.Get_size()
R = WORLD.Get_rank()
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def sizes(n):
    return sorted({0, 1, 2, max(0, n - 1), n, n + 1, 7, 13, 97, 1009, 4099})


RINGS = ["world", "self", "world-polite", "world-polite-unchunked", "world-default", "world-polite-default", "world-collective"]


@pytest.fixture(scope="module", params=RINGS)
def ring(request):
    comm = MPI.COMM_SELF if request.param == "self" else WORLD
    # A tiny chunk so that even small sizes go through the multi-chunk pipeline (its layout
    # check is a collective); a large one sends every size here through the one-message-per-
    # step path, as does the default on one node (whose check rides on the ring's messages,
    # unless asked to be "collective"). "polite" waits in MPI_Test plus sleeps (as during
    # backward) instead of blocking calls.
    chunk = {"world-polite-unchunked": DEFAULT_CHUNK_BYTES, "world-default": None, "world-polite-default": None, "world-collective": 0}.get(request.param, 64)
    check = "collective" if request.param == "world-collective" else "always"
    r = Ring(comm, chunk_bytes=chunk, polite="polite" in request.param, check=check)
    yield r
    r.close()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["sum", "average"])
def test_identical_inputs_give_closed_form(ring, dtype, op):
    n = ring.size
    for count in sizes(n):
        g = torch.Generator().manual_seed(count)  # the same on every rank
        # Small integers: every partial sum is exact in every dtype, so the check is exact.
        x = torch.randint(-8, 9, (count,), generator=g).to(dtype)
        t = x.clone()
        ring.allreduce_(t, op=op)
        expect = x * n if op == "sum" else x
        assert torch.equal(t, expect), f"count {count}: {t[:5]} != {expect[:5]}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["sum", "average"])
def test_matches_mpi_allreduce(ring, dtype, op):
    comm, n = ring.comm, ring.size
    for count in sizes(n):
        g = torch.Generator().manual_seed(1000 * ring.rank + count)  # different on every rank
        x = torch.randn(count, generator=g).to(dtype)
        ref = x.double().numpy().copy()
        comm.Allreduce(MPI.IN_PLACE, ref, op=MPI.SUM)
        if op == "average":
            ref /= n
        t = x.clone()
        ring.allreduce_(t, op=op)
        np.testing.assert_allclose(t.double().numpy(), ref, rtol=TOL[dtype] * n, atol=TOL[dtype] * n, err_msg=f"count {count}")


def test_numpy_arrays_float32_float64(ring):
    for dt in (np.float32, np.float64):
        x = np.arange(1009, dtype=dt) * (ring.rank + 1)
        ring.allreduce_(x, op="sum")
        np.testing.assert_array_equal(x, np.arange(1009, dtype=dt) * ring.size * (ring.size + 1) / 2)


def test_in_place_on_torch_tensor_without_copy(ring):
    t = torch.ones(1000)
    ptr = t.data_ptr()
    out = ring.allreduce_(t, op="sum")
    assert out is t and t.data_ptr() == ptr
    assert torch.all(t == ring.size)


def test_refuses_what_it_cannot_reduce_in_place(ring):
    with pytest.raises(TypeError, match="contiguous"):
        ring.allreduce_(torch.ones(4, 4).t())
    with pytest.raises(TypeError, match="supports"):
        ring.allreduce_(torch.ones(4, dtype=torch.int32))


def test_counts_exact_bytes(ring):
    n = ring.size
    for count in (0, 1, n + 1, 4099):
        t = torch.ones(count)
        ring.allreduce_(t, op="sum")
        sent, recv = ring.last.bytes_sent, ring.last.bytes_recv
        both = np.array([sent, recv], dtype=np.int64)
        ring.comm.Allreduce(MPI.IN_PLACE, both, op=MPI.SUM)
        S = count * 4
        # Across ranks exactly 2(N-1)·S each way; per rank 2(N-1)/N·S up to segment rounding.
        assert both[0] == both[1] == 2 * (n - 1) * S
        if n > 1 and count >= n:
            assert abs(sent - 2 * (n - 1) / n * S) <= 2 * (n - 1) * 4
        if n == 1:
            assert sent == recv == 0


def test_default_chunk_follows_locality_and_large_buffers_reduce():
    # Every rank of this job is on one node: the default ring sends segments whole. (Across
    # nodes it pipelines in DEFAULT_CHUNK_BYTES chunks: tests/test_cluster.py checks that.)
    for chunk, expect in ((None, 0), (0, 0), (DEFAULT_CHUNK_BYTES, DEFAULT_CHUNK_BYTES)):
        r = Ring(WORLD, chunk_bytes=chunk)
        assert r.chunk_bytes == expect
        count = 1_000_003  # 4 MB, prime: segments of unequal size, each over one chunk at N < 4
        x = torch.full((count,), float(R + 1))
        x[-1] = -2.0 * (R + 1)
        r.allreduce_(x, op="sum")
        total = N * (N + 1) / 2
        assert torch.all(x[:-1] == total) and x[-1] == -2 * total
        r.close()
    with pytest.raises(ValueError, match="chunk_bytes"):
        Ring(MPI.COMM_SELF, chunk_bytes=-1)


def test_async_handles_overlap_and_complete_in_order(ring):
    bufs = [torch.full((k,), float(ring.rank + 1)) for k in (5, 1009, 3)]
    handles = [ring.allreduce_async_(b, op="sum", name=f"t{i}") for i, b in enumerate(bufs)]
    busy = sum(i * i for i in range(20000))  # the caller keeps working meanwhile
    for h, b in zip(handles, bufs):
        assert ring.synchronize(h) is b
        assert torch.all(b == ring.size * (ring.size + 1) / 2)
    assert busy > 0


def test_mismatched_lengths_raise_on_every_rank_naming_ranks(ring):
    if ring.size == 1:
        pytest.skip("a mismatch needs two ranks")
    count = 10 + (1 if ring.rank == ring.size - 1 else 0)
    with pytest.raises(RingMismatchError) as e:
        ring.allreduce_(torch.ones(count))
    msg = str(e.value)
    assert "element counts" in msg and f"rank {ring.size - 1}: 11" in msg and "rank 0: 10" in msg
    # Every message still found its receive, so the ring is usable afterwards.
    t = torch.ones(10)
    ring.allreduce_(t, op="sum")
    assert torch.all(t == ring.size)


def test_mismatched_dtypes_and_order_raise(ring):
    if ring.size == 1:
        pytest.skip("a mismatch needs two ranks")
    dt = torch.float64 if ring.rank == 0 else torch.float32
    with pytest.raises(RingMismatchError, match="dtypes"):
        ring.allreduce_(torch.ones(8, dtype=dt))
    name = "weights" if ring.rank == 0 else "bias"
    with pytest.raises(RingMismatchError, match="tensor names"):
        ring.allreduce_(torch.ones(8), name=name)


def test_every_kind_of_mismatch_raises_on_every_rank_and_the_ring_recovers(ring):
    """Longer and shorter messages than expected (a longer one is cut by MPI), an empty
    buffer against full ones, equal byte counts with different dtypes, different ops: each
    raises on every rank, whichever way the ring checks, and the next correct call works."""
    if ring.size == 1:
        pytest.skip("a mismatch needs two ranks")
    cases = {
        "element counts": lambda: torch.ones(10 * (R + 1) + R),
        "element counts ": lambda: torch.ones(0 if R == 0 else 4099),
        "dtypes": lambda: torch.ones(16, dtype=torch.float16) if R == 1 else torch.ones(8),
    }
    for what, make in cases.items():
        with pytest.raises(RingMismatchError, match=what.strip()):
            ring.allreduce_(make(), op="sum")
    with pytest.raises(RingMismatchError, match="ops"):
        ring.allreduce_(torch.ones(100), op="sum" if R == 0 else "average")
    for count in (4099, 0, 10):  # the same layouts as above, now matching: plans are reused
        t = torch.full((count,), float(ring.rank + 1))
        ring.allreduce_(t, op="sum")
        assert torch.all(t == ring.size * (ring.size + 1) / 2)


def test_only_a_collective_check_measures_the_wait_for_peers(ring):
    """t_wait_peers is the time spent in the collective layout check (arrival skew); a check
    carried in the ring's own messages has no such round, and says so with nan."""
    import math

    ring.allreduce_(torch.ones(10))
    collective = ring.check == "collective" or (ring.check == "always" and ring.chunk_bytes > 0)
    if collective:
        assert ring.last.t_wait_peers >= 0
    else:
        assert math.isnan(ring.last.t_wait_peers)


def test_reused_buffers_and_a_full_plan_cache_stay_correct(ring):
    """Plans are kept per buffer address and size: reusing a buffer, a new buffer of the same
    size, and more layouts than the cache holds must all reduce exactly."""
    from ringtrain.ring import PLAN_CACHE

    buf = torch.empty(1009)
    for it in range(3):
        buf.fill_(float(ring.rank + it))
        ring.allreduce_(buf, op="sum")
        assert torch.all(buf == sum(r + it for r in range(ring.size)))
    for k in range(PLAN_CACHE + 5):
        t = torch.full((k + 1,), float(ring.rank + 1))
        ring.allreduce_(t, op="sum", name=f"t{k}")
        assert torch.all(t == ring.size * (ring.size + 1) / 2), k
    assert len(ring._plans) <= PLAN_CACHE


def test_polite_wait_switched_off_midway_completes(ring):
    """Rank 0 arrives late; the others wait politely until another thread switches them to
    full-speed waiting (as end_backward does) while their wait is in flight."""
    import threading
    import time

    was = ring.polite
    ring.polite = True
    try:
        if ring.rank == 0:
            time.sleep(0.05)
            timer = None
        else:
            timer = threading.Timer(0.01, lambda: setattr(ring, "polite", False))
            timer.start()
        t = torch.full((4099,), float(ring.rank + 1))
        ring.allreduce_(t, op="sum")
        assert torch.all(t == ring.size * (ring.size + 1) / 2)
        if timer is not None:
            timer.join()
            assert ring.polite is False
    finally:
        ring.polite = was


@pytest.mark.parametrize("polite", [False, True], ids=["blocking", "polite"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mpi_scheme_allreduce_average_matches_closed_form(polite, dtype):
    for count in sizes(N):
        x = (torch.arange(count) % 5).to(dtype) * (R + 1)
        mpi_allreduce_average_(WORLD, x, name="t", waiter=Waiter(True) if polite else None)
        expect = ((torch.arange(count) % 5).double() * (N + 1) / 2).to(dtype)
        assert torch.equal(x, expect), f"count {count}"


# ---- shared memory (Ring.empty) ------------------------------------------------------------


@pytest.fixture(params=["blocking", "polite"])
def shared_ring(request):
    """A ring that hands out shared memory; counts the calls that took the shared path."""
    r = Ring(WORLD, polite=request.param == "polite")
    r.shared_calls = 0
    inner = r._shared_allreduce

    def counted(*args):
        r.shared_calls += 1
        return inner(*args)

    r._shared_allreduce = counted
    yield r
    r.close()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["sum", "average"])
def test_shared_buffers_match_closed_form_and_mpi_allreduce(shared_ring, dtype, op):
    ring = shared_ring
    for count in sizes(N) + [1_000_003]:
        t = ring.empty(count, dtype)
        assert t.dtype == dtype and t.shape == (count,) and not t.any()  # zero-filled
        assert ring.is_shared(t) == (N > 1 and count > 0)  # one node here
        g = torch.Generator().manual_seed(count)  # the same on every rank
        x = torch.randint(-8, 9, (count,), generator=g).to(dtype)
        t.copy_(x)
        ptr, before = t.data_ptr(), ring.shared_calls
        assert ring.allreduce_(t, op=op) is t and t.data_ptr() == ptr
        assert torch.equal(t, x * N if op == "sum" else x), f"closed form, count {count}"
        assert ring.shared_calls == before + (N > 1 and count > 0)
        y = torch.randn(count, generator=torch.Generator().manual_seed(1000 * R + count)).to(dtype)
        ref = y.double().numpy().copy()
        WORLD.Allreduce(MPI.IN_PLACE, ref, op=MPI.SUM)
        if op == "average":
            ref /= N
        t.copy_(y)
        ring.allreduce_(t, op=op)
        np.testing.assert_allclose(t.double().numpy(), ref, rtol=TOL[dtype] * N, atol=TOL[dtype] * N, err_msg=f"count {count}")


def test_shared_slices_async_calls_and_exact_bytes(shared_ring):
    ring = shared_ring
    t = ring.empty(5000)
    t.fill_(float(R + 1))
    part = t[1000:3003]  # the same slice on every rank: reduced via shared memory too
    ring.allreduce_(part, op="sum")
    total = N * (N + 1) / 2
    assert torch.all(t[1000:3003] == total) and torch.all(t[:1000] == R + 1) and torch.all(t[3003:] == R + 1)
    sent, recv = ring.last.bytes_sent, ring.last.bytes_recv
    both = np.array([sent, recv], dtype=np.int64)
    WORLD.Allreduce(MPI.IN_PLACE, both, op=MPI.SUM)
    assert both[0] == both[1] == 2 * (N - 1) * 2003 * 4  # across ranks, as for the ring
    bufs = [ring.empty(k) for k in (5, 1009, 3, 70001)]
    for b in bufs:
        b.fill_(float(R + 1))
    handles = [ring.allreduce_async_(b, op="sum", name=f"t{i}") for i, b in enumerate(bufs)]
    with pytest.raises(RuntimeError, match="pending"):
        ring.empty(10)
    for h, b in zip(handles, bufs):
        assert ring.synchronize(h) is b and torch.all(b == total)
    assert np.isnan(ring.last.t_wait_peers) == (N == 1)  # on shared memory the layout check is collective


def test_shared_and_private_buffers_mixed_across_ranks_raise_on_every_rank(shared_ring):
    ring = shared_ring
    if N == 1:
        pytest.skip("a mismatch needs two ranks")
    shared = ring.empty(100)
    mine = torch.ones(100) if R == 0 else shared.fill_(1.0)
    with pytest.raises(RingMismatchError, match="paths") as e:
        ring.allreduce_(mine, op="sum")
    assert "rank 0: 100 x float32 op=sum call #0 via messages" in str(e.value)
    with pytest.raises(RingMismatchError, match="shared-memory offsets"):
        ring.allreduce_(shared[R : R + 50], op="sum")  # a different slice on every rank
    with pytest.raises(RingMismatchError, match="element counts"):
        ring.allreduce_(shared[: 50 + R], op="sum")
    shared.fill_(float(R + 1))  # and the ring still works
    ring.allreduce_(shared, op="sum")
    assert torch.all(shared == N * (N + 1) / 2)


def test_shared_allocation_of_different_sizes_raises_on_every_rank():
    ring = Ring(WORLD)
    try:
        if N > 1:
            with pytest.raises(RingMismatchError, match=f"rank 0: 400 bytes; rank 1: 404 bytes"):
                ring.empty(100 + (R > 0))
        with pytest.raises(ValueError, match=">= 0"):
            ring.empty(-1)
        with pytest.raises(TypeError, match="supports"):
            ring.empty(4, torch.int32)
    finally:
        ring.close()


def test_shared_memory_outlives_the_ring_and_leaves_no_file():
    import glob

    ring = Ring(WORLD)
    t = ring.empty(1 << 20)
    t.fill_(float(R + 1))
    ring.allreduce_(t, op="sum")
    assert ring.is_shared(t) == (N > 1)
    ring.close()
    t += 1  # still mapped: no crash, and still this rank's own memory
    assert torch.all(t == N * (N + 1) / 2 + 1)
    WORLD.Barrier()
    assert not glob.glob("/dev/shm/ringtrain-*")  # unlinked as soon as every rank had mapped it
    solo = Ring(MPI.COMM_SELF)
    assert not solo.is_shared(solo.empty(10))  # one rank: ordinary memory
    solo.close()


def test_without_usable_shared_memory_the_ring_falls_back_to_private_memory(monkeypatch, capsys):
    import ringtrain.ring as ring_module

    monkeypatch.setattr(ring_module, "SHM_DIR", "/nonexistent-ringtrain-dir")
    monkeypatch.setattr(ring_module._SharedBlock, "warned", False)
    ring = Ring(WORLD)
    try:
        t = ring.empty(1 << 20)
        assert not ring.is_shared(t) and not t.any()
        t.fill_(float(R + 1))
        ring.allreduce_(t, op="sum")
        assert torch.all(t == N * (N + 1) / 2)
        err = capsys.readouterr().err
        if N > 1 and R == 0:
            assert "no shared memory" in err and "/nonexistent-ringtrain-dir" in err
    finally:
        ring.close()


def test_shared_buffer_rewritten_right_after_each_call_stays_exact(shared_ring):
    """The caller may write its buffer the moment a call returns: no peer still reads or
    writes it. Rank 0 lags after every call, so a peer that returned early would fill its
    buffer while rank 0's results were still on their way into it."""
    import time

    ring = shared_ring
    t = ring.empty(200_003)
    for it in range(12):
        t.fill_(float(R + it))
        ring.allreduce_(t, op="sum")
        assert torch.all(t == sum(r + it for r in range(N))), f"iteration {it}"
        if R == 0:
            time.sleep(0.003)
