"""`ringtrain bench allreduce` and `ringtrain bench train`.

How the numbers are made (machines here are shared and noisy, DESIGN §6):
  - backends alternate inside one run: every iteration runs each backend once, in an order
    that rotates, so a burst of noise hits all of them alike;
  - an iteration's time is the slowest rank's (a collective is done when its last rank is);
  - the reported time is the median over iterations;
  - algbw = S / t and busbw = algbw * 2(N-1)/N, as nccl-tests define them for all-reduce;
  - every result is checked against the closed form; '#wrong' counts bad elements.

    mpirun -n 2 python -m ringtrain bench allreduce --backends ring,mpi,gloo --sizes 64K,1M,16M
    mpirun -n 2 python -m ringtrain bench train --backends ring,mpi,ddp --model resnet18
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

from ringtrain.cli import parse_size

# ---------------------------------------------------------------------------- all-reduce


class _Backend:
    """One all-reduce implementation under test: op(tensor) reduces in place (sum or average)."""

    def __init__(self, name, op, close=lambda: None, ring=None):
        self.name, self.op, self.close = name, op, close
        self.ring = ring  # the Ring behind "ring"


def _make_backends(names, world, args):
    from mpi4py import MPI

    from ringtrain.ring import Ring

    made = []
    for name in names:
        if name == "ring":
            ring = Ring(world.comm, chunk_bytes=args.chunk_bytes, check=args.check, polite=args.comm_wait == "sleep")
            made.append(_Backend("ring", lambda t, ring=ring: ring.allreduce_(t, op=args.op), ring.close, ring))
        elif name == "mpi":
            from ringtrain.schemes.mpi import mpi_allreduce_average_

            from ringtrain.ring import Waiter

            comm = world.comm.Dup()
            waiter = Waiter(True) if args.comm_wait == "sleep" else None  # the same waiting as the ring

            def allreduce_sum(a, comm=comm):
                if waiter is not None:
                    waiter.waitall([comm.Iallreduce(MPI.IN_PLACE, a, op=MPI.SUM)])
                else:
                    comm.Allreduce(MPI.IN_PLACE, a, op=MPI.SUM)

            def mpi_op(t, comm=comm):
                if args.op == "average":
                    mpi_allreduce_average_(comm, t, check=False, waiter=waiter)
                elif t.dtype in (torch.float32, torch.float64):
                    allreduce_sum(t.numpy())
                else:
                    wide = t.float()
                    allreduce_sum(wide.numpy())
                    t.copy_(wide)

            made.append(_Backend("mpi", mpi_op, comm.Free))
        elif name == "gloo":
            import torch.distributed as dist

            from ringtrain.world import init_torch_distributed

            init_torch_distributed(world, "gloo")

            def gloo_op(t):
                dist.all_reduce(t)
                if args.op == "average":
                    t.div_(world.size)

            # Closed before the interpreter exits: gloo's worker threads still hold tensors
            # otherwise, and one that releases its last reference during interpreter shutdown
            # aborts the process (SIGABRT, "terminate called without an active exception").
            made.append(_Backend("gloo", gloo_op, dist.destroy_process_group))
        elif name == "horovod":
            made.append(horovod_backend(world, args))
        else:
            raise ValueError(f"unknown all-reduce backend {name!r}; choose from ring, mpi, gloo, horovod")
    return made


def horovod_backend(world, args) -> _Backend:
    """Horovod's allreduce_ with the CPU operations it was started with (MPI under mpirun).
    Started on `world`'s ranks, and checked to see the same world (see schemes/horovod.py)."""
    from ringtrain.schemes.horovod import init_horovod

    hvd, started = init_horovod(world)
    op = hvd.Average if args.op == "average" else hvd.Sum
    return _Backend("horovod", lambda t: hvd.allreduce_(t, op=op, name="bench"), hvd.shutdown if started else lambda: None)


def _pattern(count, dtype, rank):
    # Small integers: every partial sum is exact in every dtype, so results can be compared exactly.
    base = (torch.arange(count, dtype=torch.int64) % 3 + 1).to(dtype)
    return base * (rank + 1), base


def _buffer(count, dtype, where: str, ring=None) -> torch.Tensor:
    """An uninitialised 1-D tensor from torch's allocator, or from numpy's ('hugepage'): numpy
    advises the kernel to back arrays of 4 MiB and more with transparent huge pages; or the
    ring's shared memory ('shared': Ring.empty, collective)."""
    if where == "shared":
        return ring.empty(count, dtype)
    if where == "hugepage":
        return torch.from_numpy(np.empty(count * dtype.itemsize, dtype=np.uint8)).view(dtype)
    return torch.empty(count, dtype=dtype)


def bench_allreduce(args) -> list[dict]:
    from mpi4py import MPI

    from ringtrain.world import World, install_abort_on_error

    install_abort_on_error()
    world = World.init(align_clocks=False)
    torch.set_num_threads(1)
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    dtype = getattr(torch, args.dtype)
    itemsize = torch.tensor([], dtype=dtype).element_size()
    backends = _make_backends(names, world, args)
    # --buffers shared: every backend's buffers come from one ring's shared memory (Ring.empty)
    alloc_ring = extra_ring = None
    if args.buffers == "shared":
        from ringtrain.ring import Ring

        alloc_ring = next((b.ring for b in backends if b.name == "ring"), None)
        if alloc_ring is None:  # no ring under test: one just to allocate, closed at the end
            alloc_ring = extra_ring = Ring(world.comm)
    n = world.size
    buffers = args.buffers
    if buffers == "shared" and (n == 1 or not alloc_ring.one_node):
        buffers = "shared (private memory here: one rank, or ranks on several nodes)"
    rows = []
    if world.rank == 0:
        print(f"# ringtrain bench allreduce: {n} ranks, op {args.op}, dtype {args.dtype}, {args.iters} iterations (median of the slowest rank), backends alternate, {buffers} buffers")
        print(f"# {'size':>10} {'count':>12} {'type':>9} {'backend':>8} {'time':>10} {'algbw':>8} {'busbw':>8} {'#wrong':>7}")
        print(f"# {'(B)':>10} {'(elements)':>12} {'':>9} {'':>8} {'(us)':>10} {'(GB/s)':>8} {'(GB/s)':>8} {'':>7}")
    for size in sizes:
        count = max(1, size // itemsize)
        src, base = _pattern(count, dtype, world.rank)
        total = n * (n + 1) / 2
        expect = (base.double() * total / (n if args.op == "average" else 1)).to(dtype)
        bufs = {b.name: _buffer(count, dtype, args.buffers, alloc_ring) for b in backends}
        # The check below runs between timed calls and must allocate nothing: large temporary
        # tensors are mmap'ed and unmapped by malloc, and the page faults and cache misses
        # that leaves behind doubled the time of the next timed all-reduce (measured at 1 MiB).
        mask = torch.empty(count, dtype=torch.bool)
        diff = torch.empty(count, dtype=dtype)
        tol = expect.abs() * 1e-2  # relative tolerance for "average" (a division rounds)
        times = {b.name: np.zeros(args.iters) for b in backends}
        wrong = {b.name: 0 for b in backends}
        for it in range(args.warmup + args.iters):
            shift = it % len(backends)
            for b in backends[shift:] + backends[:shift]:
                buf = bufs[b.name]
                buf.copy_(src)
                world.comm.Barrier()
                t0 = time.perf_counter()
                b.op(buf)
                dt = time.perf_counter() - t0
                if it >= args.warmup:
                    times[b.name][it - args.warmup] = dt
                    if args.op == "sum":  # small integers: every partial sum is exact
                        torch.ne(buf, expect, out=mask)
                    else:
                        torch.sub(buf, expect, out=diff).abs_()
                        torch.gt(diff, tol, out=mask)
                    wrong[b.name] += int(mask.sum())
        for b in backends:
            slowest = np.empty_like(times[b.name])
            world.comm.Allreduce(times[b.name], slowest, op=MPI.MAX)
            w = np.array([wrong[b.name]], dtype=np.int64)
            wsum = np.empty_like(w)
            world.comm.Allreduce(w, wsum, op=MPI.SUM)
            t = float(np.median(slowest))
            nbytes = count * itemsize
            algbw = nbytes / t / 1e9
            row = {
                "backend": b.name, "nranks": n, "size_bytes": nbytes, "count": count, "dtype": args.dtype, "op": args.op,
                "time_s": t, "algbw_GBps": algbw, "busbw_GBps": algbw * 2 * (n - 1) / n if n > 1 else algbw,
                "wrong": int(wsum[0]), "iters": args.iters, "buffers": buffers,
                "times_s": slowest.tolist(),  # per iteration, slowest rank: pairs with other backends' by index
            }
            rows.append(row)
            if world.rank == 0:
                print(f"  {nbytes:>10} {count:>12} {args.dtype:>9} {b.name:>8} {t * 1e6:>10.1f} {row['algbw_GBps']:>8.3f} {row['busbw_GBps']:>8.3f} {row['wrong']:>7}", flush=True)
    if world.rank == 0:
        _print_ratios(rows, names)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)
            print(f"# rows written to {args.json}")
    for b in backends:
        b.close()
    if extra_ring is not None:
        extra_ring.close()
    return rows


def _print_ratios(rows, names):
    """Ring's busbw over each other backend's, per size: the ratio of the medians, and the
    median [quartiles] of the ratio within each iteration. Backends alternate inside an
    iteration, seconds apart at most, so pairing cancels the machine's slow drifts."""
    if "ring" not in names or len(names) < 2:
        return
    print("# busbw of ring relative to each other backend, same run (>1: ring is faster):")
    print("# ratio of medians, then paired: median [quartiles] over iterations of the ratio within one")
    by = {(r["backend"], r["size_bytes"]): r for r in rows}
    for size in sorted({r["size_bytes"] for r in rows}):
        parts = []
        ring = by[("ring", size)]
        for other in names:
            if other != "ring" and (other, size) in by:
                o = by[(other, size)]
                paired = np.array(o["times_s"]) / np.array(ring["times_s"])
                q1, med, q3 = np.percentile(paired, [25, 50, 75])
                parts.append(f"ring/{other} {ring['busbw_GBps'] / o['busbw_GBps']:.2f} (paired {med:.2f} [{q1:.2f}, {q3:.2f}])")
        print(f"  {size:>10}  " + "  ".join(parts))


# ---------------------------------------------------------------------------- training


def bench_train(args) -> dict:
    """Train one model copy per backend in the same job, alternating blocks of steps."""
    from ringtrain.data import ShardedLoader, make_synthetic
    from ringtrain.models import build_model
    from ringtrain.schemes import make_scheme
    from ringtrain.steplog import NullLog, StepLog, rank_file
    from ringtrain.trainer import Trainer, TrainConfig
    from ringtrain.world import World, install_abort_on_error

    install_abort_on_error()
    world = World.init()
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // max(1, world.local_size)))
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    data = make_synthetic(tuple(args.synthetic_shape), samples=args.batch_size * world.size * 8, seed=0)
    trainers = {}
    for name in names:
        scheme_name, _, variant = name.partition("+")
        variants = set(variant.split("+")) if variant else set()
        unknown = variants - {"nolog", "nooverlap", "spin", "sleep", "private"}
        if unknown:
            raise ValueError(f"unknown variant {'+'.join(sorted(unknown))!r} in {name!r}: use BACKEND, BACKEND+nolog, BACKEND+nooverlap, BACKEND+spin, BACKEND+sleep, ring+private")
        base = name.replace("+nolog", "")
        if "nolog" in variants and base in names:
            # Same trainer, same model, log switched off for its rounds: isolates what logging costs.
            trainers[name] = {"shared": base, "log": NullLog()}
            continue
        torch.manual_seed(0)
        model = build_model(args.model, data.shape, data.classes)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        config = {"bucket_cap_mb": args.bucket_cap_mb, "overlap": args.overlap and "nooverlap" not in variants, "comm_wait": next((v for v in ("spin", "sleep") if v in variants), args.comm_wait),
                  "grad_buffers": "private" if "private" in variants else "shared"}
        scheme = make_scheme(scheme_name, world, config)
        loader = ShardedLoader(data.x_train, data.y_train, args.batch_size, scheme.worker_rank, scheme.num_workers, seed=0)
        cfg = TrainConfig(batch_size=args.batch_size, progress=False, nonfinite="off", warmup_steps=0)
        tr = Trainer(model, opt, torch.nn.CrossEntropyLoss(), scheme, loader, None, NullLog(), cfg, clock=world.now)
        log = NullLog()
        if "nolog" not in variants:
            run_dir = os.path.join(args.run_dir, name) if args.run_dir else None
            if run_dir is None:
                import tempfile

                run_dir = tempfile.mkdtemp(prefix=f"ringtrain-bench-{name}-")
            os.makedirs(run_dir, exist_ok=True)
            manifest = {"backend": scheme_name, "rank": world.rank, "world_size": world.size, "model": args.model, "batch_size": args.batch_size,
                        "grad_bytes": getattr(scheme, "grad_bytes", 0), "dataset": "synthetic", "num_workers": scheme.num_workers,
                        "expected_bytes_per_step": list(scheme.expected_bytes_per_step(sum(p.numel() * 4 for p in model.parameters())))}
            log = StepLog(rank_file(run_dir, world.rank), manifest, scheme.extra_columns())
        trainers[name] = {"trainer": tr, "it": iter(()), "log": log}
    for name, t in trainers.items():
        if "shared" in t:
            t["trainer"] = trainers[t["shared"]]["trainer"]
    rows = {name: [] for name in names}

    def next_batch(name):
        t = trainers[t_name(name)]
        try:
            return next(t["it"])
        except StopIteration:
            t["it"] = iter(t["trainer"].loader)
            return next(t["it"])

    def t_name(name):
        return trainers[name].get("shared", name)

    def run_steps(name, k, timed):
        t = trainers[name]
        tr = t["trainer"]
        tr.log = t["log"]
        start = len(tr.rows)
        for _ in range(k):
            t0 = time.perf_counter()
            x, y = next_batch(name)
            tr._run_batch(x, y, 0, world.now(), time.perf_counter() - t0)
        if timed:
            rows[name].extend(tr.rows[start:])

    for name in names:  # warm-up, untimed
        run_steps(name, args.warmup, timed=False)
    for rnd in range(args.rounds):
        shift = rnd % len(names)
        for name in names[shift:] + names[:shift]:
            world.barrier()
            run_steps(name, args.steps_per_round, timed=True)
    results = {}
    for name in names:
        tr = trainers[name]["trainer"]
        steps = rows[name]
        t_step = np.array([r["t_step"] for r in steps])
        slowest = np.empty_like(t_step)
        from mpi4py import MPI

        world.comm.Allreduce(t_step, slowest, op=MPI.MAX)
        phases = {}
        for k in ("t_forward", "t_backward", "t_comm", "t_comm_exposed", "t_optimizer"):
            v = np.array([float(np.median([r[k] for r in steps]))])
            world.comm.Allreduce(MPI.IN_PLACE, v, op=MPI.SUM)
            phases[k] = float(v[0] / world.size)
        samples = args.batch_size * tr.scheme.num_workers * len(steps)
        # Per-round time (sum of the round's steps): rounds of different backends that ran
        # next to each other are compared pairwise below, which cancels slow drifts of the
        # machine's speed that a median over the whole run would keep.
        k = args.steps_per_round
        round_s = [float(slowest[i * k : (i + 1) * k].sum()) for i in range(len(slowest) // k)]
        results[name] = {
            "round_s": round_s,
            "median_step_s": float(np.median(slowest)),
            "samples_per_s": samples / float(np.sum(slowest)),
            "samples_per_s_median": args.batch_size * tr.scheme.num_workers / float(np.median(slowest)),
            "steps": len(steps),
            **{f"median_{k}": v for k, v in phases.items()},
        }
    for name, t in trainers.items():
        t["log"].close()
        if "shared" not in t:
            t["trainer"].scheme.close()
    if world.rank == 0:
        print(f"# ringtrain bench train: {args.model}, batch {args.batch_size}/rank, {world.size} ranks, {args.rounds} rounds x {args.steps_per_round} steps, backends alternate; slowest rank per step")
        print(f"  {'backend':<12}{'step ms':>9}{'samples/s':>11}{'fwd':>8}{'bwd':>8}{'comm':>8}{'exposed':>9}{'opt':>7}")
        for name, r in results.items():
            print(f"  {name:<12}{1e3 * r['median_step_s']:>9.2f}{r['samples_per_s_median']:>11.1f}{1e3 * r['median_t_forward']:>8.2f}{1e3 * r['median_t_backward']:>8.2f}"
                  f"{1e3 * r['median_t_comm']:>8.2f}{1e3 * r['median_t_comm_exposed']:>9.2f}{1e3 * r['median_t_optimizer']:>7.2f}")
        first = names[0]
        print(f"  samples/s {first} / other: ratio of medians; paired: median [quartiles] over rounds of the ratio within a round")
        for name in names[1:]:
            paired = np.array(results[name]["round_s"]) / np.array(results[first]["round_s"])
            q1, med, q3 = np.percentile(paired, [25, 50, 75])
            results[name][f"paired_ratio_{first}"] = {"median": float(med), "q1": float(q1), "q3": float(q3)}
            print(f"  samples/s {first} / {name}: {results[first]['samples_per_s_median'] / results[name]['samples_per_s_median']:.3f}"
                  f"   paired {med:.3f} [{q1:.3f}, {q3:.3f}]")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": {k: v for k, v in vars(args).items() if k != "func"}, "nranks": world.size, "results": results}, f, indent=2, default=str)
    return results


def run(args) -> int:
    if args.bench == "allreduce":
        bench_allreduce(args)
    elif args.bench == "train":
        bench_train(args)
    return 0
