"""ringtrain.horovod's collectives and DistributedOptimizer, run inside `mpirun -n N` (every
rank runs this file; launched by tests/test_horovod_compat.py). Results are checked against
closed forms: rank r contributes values built from r, so sums and averages are known."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ringtrain.horovod as hvd

SIZES = [0, 1, 2, 3, 4, 5, 7, 13, 1000, 65537]


@pytest.fixture(scope="module", autouse=True)
def horovod():
    hvd.init()
    yield
    hvd.barrier()


def contribution(n, r, dtype=torch.float32):
    return (torch.arange(n, dtype=torch.float64) * 0.5 + r).to(dtype)


def expected_sum(n, size):
    return torch.arange(n, dtype=torch.float64) * 0.5 * size + size * (size - 1) / 2


# ---------------------------------------------------------------- allreduce


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_allreduce_sum_and_average(n, dtype):
    r, size = hvd.rank(), hvd.size()
    x = contribution(n, r, dtype)
    s = hvd.allreduce(x, op=hvd.Sum, name=f"sum{n}")
    a = hvd.allreduce(x, name=f"avg{n}")  # Average is the default
    assert torch.equal(x, contribution(n, r, dtype)), "out-of-place allreduce changed its input"
    torch.testing.assert_close(s.double(), expected_sum(n, size), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.double(), expected_sum(n, size) / size, rtol=1e-6, atol=1e-6)
    assert s.dtype == dtype and s.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_allreduce_16_bit(dtype):
    size = hvd.size()
    x = torch.full((1001,), 0.25 * (hvd.rank() + 1), dtype=dtype)
    out = hvd.allreduce_(x, op=hvd.Sum)
    assert out is x and x.dtype == dtype
    assert torch.all(x.float() == 0.25 * size * (size + 1) / 2)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8])
def test_allreduce_integers(dtype):
    r, size = hvd.rank(), hvd.size()
    x = torch.tensor([r + 1, 2 * r, 7], dtype=dtype)
    assert hvd.allreduce(x, op=hvd.Sum).tolist() == [size * (size + 1) // 2, size * (size - 1), 7 * size]
    assert hvd.allreduce(x, op=hvd.Max).tolist() == [size, 2 * (size - 1), 7]
    assert hvd.allreduce(x, op=hvd.Min).tolist() == [1, 0, 7]
    assert hvd.allreduce(x, op=hvd.Product).tolist()[0] == math.factorial(size) % (256 if dtype == torch.uint8 else 2**63)


def test_allreduce_float_min_max_product():
    r, size = hvd.rank(), hvd.size()
    x = torch.tensor([r + 1.0, -r - 1.0])
    assert hvd.allreduce(x, op=hvd.Max).tolist() == [size, -1.0]
    assert hvd.allreduce(x, op=hvd.Min).tolist() == [1.0, -size]
    assert hvd.allreduce(x, op=hvd.Product)[0].item() == float(math.factorial(size))


def test_prescale_postscale_and_deprecated_average_flag():
    size = hvd.size()
    x = torch.ones(10)
    torch.testing.assert_close(hvd.allreduce(x, op=hvd.Sum, prescale_factor=2.0, postscale_factor=0.5), torch.full((10,), float(size)))
    torch.testing.assert_close(hvd.allreduce(x, op=hvd.Average, prescale_factor=3.0), torch.full((10,), 3.0))
    torch.testing.assert_close(hvd.allreduce(x, average=False), torch.full((10,), float(size)))
    with pytest.raises(ValueError):
        hvd.allreduce(x, average=True, op=hvd.Sum)


def test_in_place_on_a_non_contiguous_tensor():
    size = hvd.size()
    base = torch.ones(6, 4)
    view = base.t()  # not contiguous
    hvd.allreduce_(view, op=hvd.Sum)
    assert torch.all(base == size)


def test_many_async_then_synchronize_in_any_order():
    size = hvd.size()
    xs = [torch.full((257 * (i + 1),), float(hvd.rank() + i)) for i in range(6)]
    handles = [hvd.allreduce_async_(x, name=f"async{i}", op=hvd.Sum) for i, x in enumerate(xs)]
    for i in reversed(range(6)):
        out = hvd.synchronize(handles[i])
        assert out is xs[i]
        assert hvd.poll(handles[i])
        assert torch.all(out == sum(r + i for r in range(size)))
    h = hvd.allreduce_async(torch.ones(3))
    assert torch.all(hvd.synchronize(h) == 1)
    assert hvd.synchronize(h) is hvd.synchronize(h)  # idempotent


def test_compression_fp16_keeps_dtype():
    x = torch.full((100,), 0.5)
    out = hvd.allreduce(x, compression=hvd.Compression.fp16, op=hvd.Sum)
    assert out.dtype == torch.float32 and torch.all(out == 0.5 * hvd.size())


def test_grouped_allreduce():
    size = hvd.size()
    outs = hvd.grouped_allreduce([torch.ones(3), torch.ones(5, dtype=torch.float64)], op=hvd.Sum)
    assert [o.tolist() for o in outs] == [[float(size)] * 3, [float(size)] * 5]


# ---------------------------------------------------------------- broadcast, allgather


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.bool, torch.bfloat16])
def test_broadcast_from_every_root(dtype):
    for root in range(hvd.size()):
        mine = torch.full((3, 5), hvd.rank() % 2 if dtype == torch.bool else hvd.rank() + 1).to(dtype)
        out = hvd.broadcast(mine, root_rank=root)
        assert torch.equal(out, torch.full((3, 5), root % 2 if dtype == torch.bool else root + 1).to(dtype))
        assert torch.equal(mine, torch.full((3, 5), hvd.rank() % 2 if dtype == torch.bool else hvd.rank() + 1).to(dtype))
        hvd.broadcast_(mine, root_rank=root)
        assert torch.equal(mine, out)


def test_allgather_uneven_rows():
    r, size = hvd.rank(), hvd.size()
    out = hvd.allgather(torch.full((r, 3), float(r)))  # rank 0 sends no rows
    assert out.shape == (size * (size - 1) // 2, 3)
    assert out[:, 0].tolist() == [float(k) for k in range(size) for _ in range(k)]
    assert hvd.allgather(torch.tensor(r)).tolist() == list(range(size))


def test_objects_travel_as_json():
    obj = hvd.broadcast_object({"epoch": 3 + hvd.rank(), "tags": ["a", 1.5, None]}, root_rank=0)
    assert obj == {"epoch": 3, "tags": ["a", 1.5, None]}
    assert hvd.allgather_object({"r": hvd.rank()}) == [{"r": k} for k in range(hvd.size())]
    with pytest.raises(TypeError, match="JSON"):
        hvd.broadcast_object(object(), root_rank=0)


def test_broadcast_parameters_and_optimizer_state():
    torch.manual_seed(hvd.rank())  # different weights on every rank
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.001 * (hvd.rank() + 1), betas=(0.8 + 0.01 * hvd.rank(), 0.99))
    if hvd.rank() == 0:  # only the root has stepped (as after restoring a checkpoint)
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(16, 4)).sum().backward()
            opt.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    # Everyone now holds rank 0's values: compare against rank 0's, gathered.
    for k, v in model.state_dict().items():
        root = hvd.broadcast(v, root_rank=0)
        assert torch.equal(v, root), k
        if hvd.rank() == 0:
            assert torch.equal(v, before[k])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.001)
    assert opt.param_groups[0]["betas"] == pytest.approx((0.8, 0.99)) and isinstance(opt.param_groups[0]["betas"], tuple)
    for p in model.parameters():
        st = opt.state[p]
        assert float(st["step"]) == 3.0
        assert torch.equal(st["exp_avg"], hvd.broadcast(st["exp_avg"], root_rank=0))


def test_broadcast_optimizer_state_does_not_move_parameters():
    model = nn.Linear(3, 3)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    before = [p.clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.5)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
        assert p.grad is None


# ---------------------------------------------------------------- errors and join


def test_mismatched_sizes_raise_on_every_rank():
    if hvd.size() == 1:
        pytest.skip("needs two ranks to disagree")
    x = torch.ones(10 + hvd.rank())
    with pytest.raises(hvd.HorovodMismatchError, match="rank 1: allreduce of 11"):
        hvd.allreduce(x, name="mismatch")
    # The ranks are still in step afterwards.
    assert hvd.allreduce(torch.ones(2), op=hvd.Sum).tolist() == [hvd.size()] * 2


def test_join_with_uneven_work():
    r, size = hvd.rank(), hvd.size()
    # Rank k does k all-reduces, then joins; joined ranks contribute zeros.
    for i in range(r):
        out = hvd.allreduce(torch.ones(5), op=hvd.Sum, name=f"join{i}")
        active = sum(1 for k in range(size) if k > i)
        assert out.tolist() == [float(active)] * 5
        avg = hvd.allreduce(torch.ones(2), name=f"joinavg{i}")
        torch.testing.assert_close(avg, torch.full((2,), active / size))
        mx = hvd.allreduce(torch.tensor([-5.0 - r]), op=hvd.Max, name=f"joinmax{i}")
        assert mx.item() == -5.0 - (i + 1)  # the smallest active rank's value; joined ranks add nothing
    last = hvd.join()
    assert last == size - 1
    assert hvd.allreduce(torch.ones(1), op=hvd.Sum).item() == size  # usable again after join


def test_unsupported_options_raise_clearly():
    with pytest.raises(NotImplementedError, match="Adasum"):
        hvd.allreduce(torch.ones(2), op=hvd.Adasum)
    with pytest.raises(NotImplementedError, match="alltoall"):
        hvd.alltoall(torch.ones(2))
    with pytest.raises(NotImplementedError):
        hvd.DistributedOptimizer(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), op=hvd.Adasum)


# ---------------------------------------------------------------- DistributedOptimizer


class Branchy(nn.Module):
    """A model with a branch that only some ranks use (its gradient is missing there)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 16)
        self.b = nn.Linear(16, 3)
        self.extra = nn.Linear(16, 16)

    def forward(self, x, use_extra):
        h = torch.tanh(self.a(x))
        if use_extra:
            h = h + self.extra(h)
        return self.b(h)


def reference_and_distributed(steps, per_rank, passes=1, compression=None, op=None, opt_cls=torch.optim.SGD, **kw):
    """Train the same model (a) in this process on the union of all ranks' data and (b)
    data-parallel with DistributedOptimizer, where odd ranks skip a branch on even steps;
    return both models. (a) equals (b) only at N = 1; at any N every rank must end equal."""
    r, size = hvd.rank(), hvd.size()
    torch.manual_seed(0)
    ref = Branchy()
    dist = Branchy()
    dist.load_state_dict(ref.state_dict())
    lr = 0.1
    opt_ref = opt_cls(ref.parameters(), lr=lr, **kw)
    opt = hvd.DistributedOptimizer(
        opt_cls(dist.parameters(), lr=lr, **kw),
        named_parameters=dist.named_parameters(),
        backward_passes_per_step=passes,
        compression=compression or hvd.Compression.none,
        op=hvd.Average if op is None else op,
    )
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        xs = [torch.randn(size * per_rank, 6, generator=g) for _ in range(passes)]
        ys = [torch.randint(0, 3, (size * per_rank,), generator=g) for _ in range(passes)]
        use_extra = step % 2 == 0
        opt_ref.zero_grad()
        for x, y in zip(xs, ys):
            F.cross_entropy(ref(x, use_extra), y).backward()
        if op == hvd.Sum:
            for p in ref.parameters():
                if p.grad is not None:
                    p.grad.mul_(size)
        opt_ref.step()
        opt.zero_grad()
        for x, y in zip(xs, ys):
            mine = slice(r * per_rank, (r + 1) * per_rank)
            # Odd ranks skip the extra branch on even steps: their gradient for it is missing.
            F.cross_entropy(dist(x[mine], use_extra and r % 2 == 0), y[mine]).backward()
        opt.step()
    return ref, dist


def _same_everywhere(model, rtol=0.0):
    for k, v in model.state_dict().items():
        root = hvd.broadcast(v, root_rank=0)
        torch.testing.assert_close(v, root, rtol=rtol, atol=0.0, msg=f"{k} differs from rank 0's")


def test_large_batch_equivalence_without_branches():
    """N ranks with batch b take the same SGD steps as one process with batch N*b."""
    r, size = hvd.rank(), hvd.size()
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    dist = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    dist.load_state_dict(ref.state_dict())
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.2, momentum=0.9)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(dist.parameters(), lr=0.2, momentum=0.9),
                                   named_parameters=dist.named_parameters())
    g = torch.Generator().manual_seed(3)
    b = 4
    for _ in range(20):
        x, y = torch.randn(size * b, 5, generator=g), torch.randn(size * b, 2, generator=g)
        opt_ref.zero_grad()
        F.mse_loss(ref(x), y).backward()
        opt_ref.step()
        opt.zero_grad()
        F.mse_loss(dist(x[r * b:(r + 1) * b]), y[r * b:(r + 1) * b]).backward()
        opt.step()
    for (k, a), c in zip(ref.state_dict().items(), dist.state_dict().values()):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6, msg=k)
    _same_everywhere(dist)


@pytest.mark.parametrize("passes", [1, 2])
def test_missing_gradients_and_accumulation_keep_ranks_in_step(passes):
    _, dist = reference_and_distributed(5, 4, passes=passes, momentum=0.5)
    _same_everywhere(dist)


def test_sum_op_and_fp16_compression_keep_ranks_in_step():
    _, dist = reference_and_distributed(3, 4, op=hvd.Sum)
    _same_everywhere(dist)
    _, dist = reference_and_distributed(3, 4, compression=hvd.Compression.fp16, opt_cls=torch.optim.Adam)
    _same_everywhere(dist)


def test_fusion_buckets_match_one_big_bucket(monkeypatch):
    """Small fusion buckets (many all-reduces in flight during backward) give the same result."""
    _, one = reference_and_distributed(3, 4)
    monkeypatch.setenv("HOROVOD_FUSION_THRESHOLD", "256")
    _, many = reference_and_distributed(3, 4)
    for a, b in zip(one.parameters(), many.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_misuse_raises():
    model = nn.Linear(3, 1)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters())
    assert isinstance(opt, torch.optim.SGD)
    model(torch.ones(2, 3)).sum().backward()
    if hvd.size() > 1:
        with pytest.raises(AssertionError, match="more than backward_passes_per_step"):
            model(torch.ones(2, 3)).sum().backward()
        with pytest.raises(AssertionError, match="zero_grad"):
            opt.zero_grad()
    opt.step()
    with pytest.raises(ValueError, match="unique"):
        hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                 named_parameters=[("w", model.weight), ("w", model.bias)])


def test_broadcast_from_a_joined_root_raises_everywhere():
    if hvd.size() == 1:
        pytest.skip("needs a rank that joins while another broadcasts")
    if hvd.rank() == 0:
        with pytest.raises(hvd.HorovodInternalError, match="cannot be the root"):
            hvd.join()
        hvd.join()  # the others join next
    else:
        with pytest.raises(hvd.HorovodInternalError, match="cannot be the root"):
            hvd.broadcast(torch.ones(3), root_rank=0)
        hvd.join()
