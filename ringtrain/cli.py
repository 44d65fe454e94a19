"""Command line: `ringtrain train | bench | report | cluster` (also `python -m ringtrain`).

Each subcommand's work lives in its own module; this file only declares the options, so
`ringtrain SUBCOMMAND --help` explains everything in one place.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ringtrain",
        description="Data-parallel PyTorch training over MPI, with per-step compute and "
        "communication timings logged to HDF5. Launch `train` and `bench` under mpirun/srun/horovodrun.",
    )
    sub = p.add_subparsers(title="commands", metavar="COMMAND")
    add_train_parser(sub)
    add_bench_parser(sub)
    add_report_parser(sub)
    from ringtrain.cluster import add_cluster_parser
    from ringtrain.hostfile import add_hostfile_parser

    add_hostfile_parser(sub)
    add_cluster_parser(sub)
    return p


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}


def parse_size(text: str) -> int:
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    unit = t[len(num):]
    if not num or unit not in _UNITS:
        raise ValueError(f"cannot read size {text!r}: use bytes with an optional K, M or G suffix, e.g. 64K,1M,16M")
    return int(float(num) * _UNITS[unit])


def _positive_int(text):
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return v


def _chunk_size(text):
    """--chunk-bytes: "auto" (None: chosen by locality, see ringtrain.ring.Ring), or a size in
    bytes with an optional K/M/G suffix; 0 sends each ring segment whole."""
    if text.strip().lower() == "auto":
        return None
    try:
        v = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def _nonneg_int(text):
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def _positive_float(text):
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def _shape(text):
    try:
        dims = tuple(int(x) for x in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W (e.g. 3,32,32), got {text!r}") from None
    if len(dims) != 3 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive sizes C,H,W, got {text!r}")
    return dims


def _run_train(args):
    from ringtrain.train import run

    return run(args)


def add_train_parser(sub):
    from ringtrain.models import MODELS
    from ringtrain.schemes import scheme_names

    t = sub.add_parser(
        "train",
        help="data-parallel training (run under mpirun/srun/horovodrun)",
        description="Train a model data-parallel. Every rank writes RUN_DIR/rank-NNNNN.h5 (per-step timings); "
        "rank 0 prints progress and a summary. Example: mpirun -n 2 python -m ringtrain train --backend ring",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = t.add_argument_group("what to train")
    g.add_argument("--backend", default="ring", choices=scheme_names(), help="gradient-exchange scheme: ring (ours), mpi (MPI_Allreduce), ddp (torch DDP), none (no exchange: compute-only baseline), ps-sync / ps-async / ps-async-reply-first / ps-hogwild (parameter server, see --ps-servers), and any others installed")
    g.add_argument("--model", default="cnn", choices=sorted(MODELS), help="model to train (mlp and mlp-wide are communication-heavy)")
    g.add_argument("--dataset", default="digits", choices=("digits", "cifar10", "cinic10", "synthetic"), help="digits ships with the install; cifar10/cinic10 read --data-dir")
    g.add_argument("--data-dir", default=None, help="directory of the cifar10 (python format) or cinic10 (folders) dataset")
    g.add_argument("--synthetic-shape", type=_shape, default=(3, 32, 32), help="C,H,W of synthetic images")
    g.add_argument("--synthetic-samples", type=_positive_int, default=2048, help="number of synthetic training images")
    g = t.add_argument_group("how long and how")
    g.add_argument("--batch-size", type=_positive_int, default=32, help="samples per rank per step (global batch = N x this)")
    g.add_argument("--epochs", type=_positive_int, default=1, help="epochs to train")
    g.add_argument("--steps", type=_positive_int, default=None, help="stop after this many steps in total, even mid-epoch")
    g.add_argument("--lr", type=_positive_float, default=0.05, help="learning rate (not scaled by N: pass what the global batch needs)")
    g.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"))
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0, help="seeds the model init, the shuffling and dropout")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA when present, GPU = local rank")
    g.add_argument("--threads", type=_nonneg_int, default=0, help="torch threads per rank (0: cores / ranks on the node)")
    g = t.add_argument_group("gradient exchange")
    g.add_argument("--bucket-cap-mb", type=_positive_float, default=4.0, help="bucket size for fused all-reduces, like DDP's bucket_cap_mb")
    g.add_argument("--no-overlap", dest="overlap", action="store_false", help="exchange after backward instead of during it (clean measurement)")
    g.add_argument("--comm-wait", default="auto", choices=("auto", "spin", "sleep"), help="how ring and mpi wait for peers: 'spin' polls MPI at full speed; 'sleep' tests and sleeps, leaving the core to backward; 'auto' sleeps while backward runs and spins after it")
    g.add_argument("--chunk-bytes", type=_chunk_size, default=None, metavar="SIZE|auto", help="ring pipeline chunk, e.g. 1M; 0 sends each segment whole; auto (the default): whole segments when all ranks share one node, 1M when the ring crosses nodes")
    g.add_argument("--grad-buffers", default="shared", choices=("shared", "private"), help="where --backend ring keeps its gradient buckets: 'shared' (default) in memory every rank on the node maps, so that on one node the ring sums straight out of its peers' buckets, with no messages (see ringtrain.ring.Ring.empty); 'private' torch's allocator, the ring's messages. Across nodes, and for GPU models (staged through pinned memory), always private")
    g.add_argument("--layout-check", dest="check", default="collective", choices=("collective", "always", "never"), help="how ranks check that every all-reduce has the same size/dtype/order (a mismatch raises on every rank instead of hanging): 'collective' (default) agrees first with a tiny all-reduce, which also measures arrival skew (t_wait_peers); 'always' is the cheapest safe check (on one node the ring carries it in its own messages: free, but no t_wait_peers); 'never' skips it. With the ring's shared gradient buffers (--grad-buffers shared, on one node) every call is checked collectively whatever this says: the shared path needs that barrier")
    g.add_argument("--ps-servers", type=_nonneg_int, default=1, help="parameter server (ps-sync: average N gradients, one optimizer step; ps-async: apply each push, then reply; ps-async-reply-first: reply at once, apply queued pushes under a lock; ps-hogwild: lock-free MPI_Accumulate into RMA windows): this many dedicated server ranks (ranks 0..K-1, one shard each); 0 = colocated, shards served from worker ranks' background threads")
    g.add_argument("--ps-shards", type=_nonneg_int, default=0, help="parameter shards, balanced by bytes (0: one per dedicated server, or 1 when colocated)")
    g.add_argument("--ps-timeout", type=_positive_float, default=600.0, help="seconds a worker waits for a parameter server before failing with the server's rank")
    g.add_argument("--stage-through-host", action="store_true", help="pack gradients in a separate buffer and copy them to the host buffer that is reduced, as on GPUs (always on for CUDA models; this flag forces it on CPU to exercise that path)")
    g = t.add_argument_group("logs and snapshots")
    g.add_argument("--run-dir", default=None, help="where the HDF5 logs go (default runs/<time>-<backend>-n<N>)")
    g.add_argument("--no-log", action="store_true", help="write no step log (for measuring what logging costs)")
    g.add_argument("--log-flush-every", type=_positive_int, default=200, help="write the buffered steps to HDF5 after this many steps ...")
    g.add_argument("--log-flush-seconds", type=_positive_float, default=1.0, help="... or after this many seconds, whichever comes first (a kill -9 loses at most that much)")
    g.add_argument("--snapshot", default=None, help="snapshot file written by rank 0 (atomically)")
    g.add_argument("--save-every", type=_nonneg_int, default=1, help="epochs between snapshots (0: only at the end)")
    g.add_argument("--save-every-steps", type=_nonneg_int, default=0, help="also snapshot every this many steps")
    g.add_argument("--resume", action="store_true", help="continue from --snapshot; logs go to a new segment of --run-dir")
    g.add_argument("--json", default=None, help="write the end-of-run summary as JSON here")
    g.add_argument("--no-progress", action="store_true", help="no progress bar on rank 0")
    g = t.add_argument_group("faults")
    g.add_argument("--nonfinite", default="stop", choices=("stop", "skip", "off"), help="on NaN/Inf gradients: stop with an error naming rank and step, skip the update, or do not check")
    g.add_argument("--fail-rank", type=int, default=-1, help="fault injection: this worker fails ... (workers are numbered from 0: every rank, or under dedicated parameter servers the ranks after them)")
    g.add_argument("--fail-step", type=int, default=-1, help="... at the start of this step")
    g.add_argument("--fail-mode", default="exit", choices=("exit", "kill", "raise", "nan"), help="how the injected failure happens: the process exits, is SIGKILLed, raises, or its loss and gradients become NaN for that step")
    g.add_argument("--elastic", action="store_true", help="survive lost ranks: the survivors shrink the ring and go on (--backend ring; "
                   "launch with mpirun --with-ft ulfm --mca btl tcp,self)")
    t.set_defaults(func=_run_train)


def _run_bench(args):
    from ringtrain.bench import run

    return run(args)


def add_bench_parser(sub):
    b = sub.add_parser("bench", help="benchmarks (run under mpirun)", description="Benchmarks. Compare schemes inside one run: they alternate, the slowest rank counts, medians are reported.")
    bsub = b.add_subparsers(title="benchmarks", metavar="BENCH")
    a = bsub.add_parser(
        "allreduce",
        help="all-reduce bandwidth per backend and size (nccl-tests style)",
        description="Sweep message sizes over all-reduce backends, alternating them within each size; print an nccl-tests-style table on rank 0.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a.add_argument("--backends", default="ring,mpi,gloo", help="comma list of: ring, mpi, gloo, horovod")
    a.add_argument("--sizes", default="64K,256K,1M,4M,16M", help="comma list of message sizes in bytes (K, M, G suffixes)")
    a.add_argument("--dtype", default="float32", choices=("float32", "float64", "float16", "bfloat16"))
    a.add_argument("--iters", type=_positive_int, default=20, help="timed iterations per backend and size")
    a.add_argument("--warmup", type=_nonneg_int, default=3, help="untimed iterations first")
    a.add_argument("--op", default="sum", choices=("sum", "average"))
    a.add_argument("--chunk-bytes", type=_chunk_size, default=None, metavar="SIZE|auto", help="ring pipeline chunk, e.g. 1M; 0 sends each segment whole; auto (the default): whole segments on one node, 1M across nodes")
    a.add_argument("--comm-wait", default="spin", choices=("spin", "sleep"), help="how ring and mpi wait: blocking MPI calls (spin), or MPI_Test plus sleeps, as during backward in training (sleep)")
    a.add_argument("--layout-check", dest="check", default="always", choices=("always", "collective", "never"), help="the ring's per-call layout check: 'always' (default) the cheapest safe one (on one node carried in the ring's own messages, free); 'collective' a tiny all-reduce first, as training does by default; 'never'")
    a.add_argument("--buffers", default="torch", choices=("torch", "hugepage", "shared"), help="where the timed buffers live, for every backend alike: 'torch' (default) torch's allocator, 4 KiB pages unless torch is told otherwise (THP_MEM_ALLOC_ENABLE=1); 'hugepage' numpy's, which asks the kernel for transparent huge pages (madvise) from 4 MiB up (single-copy shared-memory transfers (CMA) pin every page they move, so the page size shows at large sizes); 'shared' the ring's shared memory (Ring.empty, where training keeps its gradient buckets), on which the ring on one node sums straight out of its peers' buffers")
    a.add_argument("--json", default=None, help="write the rows here (backend, nranks, size_bytes, time_s, algbw_GBps, busbw_GBps, wrong, and times_s: every iteration's slowest-rank time)")
    a.set_defaults(func=_run_bench, bench="allreduce")
    tr = bsub.add_parser(
        "train",
        help="training throughput per backend, alternating in one run",
        description="Train the same model once per backend in one MPI job, alternating blocks of steps between backends, and report samples/s, step-time split and ratios.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    tr.add_argument("--backends", default="ring,mpi,ddp", help="comma list of backends; a suffix picks a variant: 'ring+nolog' (no HDF5 log: logging cost), 'ring+nooverlap' (exchange after backward), 'ring+spin' / 'ring+sleep' (one --comm-wait mode for the whole step), 'ring+private' (gradient buckets in torch's memory instead of the ring's shared memory)")
    tr.add_argument("--model", default="resnet18")
    tr.add_argument("--synthetic-shape", type=_shape, default=(3, 32, 32))
    tr.add_argument("--batch-size", type=_positive_int, default=32)
    tr.add_argument("--rounds", type=_positive_int, default=5, help="alternation rounds")
    tr.add_argument("--steps-per-round", type=_positive_int, default=5)
    tr.add_argument("--warmup", type=_nonneg_int, default=2, help="untimed steps per backend first")
    tr.add_argument("--bucket-cap-mb", type=_positive_float, default=4.0)
    tr.add_argument("--no-overlap", dest="overlap", action="store_false")
    tr.add_argument("--comm-wait", default="auto", choices=("auto", "spin", "sleep"), help="how ring and mpi wait for peers (see train --help)")
    tr.add_argument("--threads", type=_nonneg_int, default=0)
    tr.add_argument("--run-dir", default=None, help="also write each backend's step log here (one sub-directory each)")
    tr.add_argument("--json", default=None)
    tr.set_defaults(func=_run_bench, bench="train")
    b.set_defaults(func=lambda a: b.print_help() or 2)


def _run_report(args):
    from ringtrain.report import run

    return run(args)


def add_report_parser(sub):
    r = sub.add_parser(
        "report",
        help="summarise and compare run directories",
        description="Read the HDF5 step logs of one or more runs: step-time breakdown, throughput, communication, "
        "bytes vs the cost model, bus bandwidth, slowest rank; a comparison table and scaling efficiency across runs.",
    )
    r.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    r.add_argument("--json", default=None, help="write everything as JSON here")
    r.add_argument("--plot", default=None, metavar="DIR", help="write PNG figures into DIR")
    r.add_argument("--skip", type=_nonneg_int, default=2, help="leading steps to leave out (warm-up)")
    r.set_defaults(func=_run_report)


if __name__ == "__main__":
    sys.exit(main())
