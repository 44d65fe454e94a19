"""`ringtrain train`: build world, data, model, scheme and step log from the command line,
then run the Trainer. Launch under mpirun / srun / horovodrun:

    mpirun -n 4 python -m ringtrain train --backend ring --model cnn --dataset digits --epochs 3

Rank 0 prints progress and the summary; every rank writes RUN_DIR/rank-NNNNN.h5.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import time

import torch

from ringtrain import __version__


def versions() -> dict:
    from importlib import metadata

    v = {"ringtrain": __version__, "torch": torch.__version__, "python": sys.version.split()[0]}
    for pkg in ("mpi4py", "horovod", "h5py", "numpy"):
        try:
            v[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            v[pkg] = ""
    try:
        from mpi4py import MPI

        v["mpi_library"] = MPI.Get_library_version().splitlines()[0].strip()[:200]
    except Exception:
        v["mpi_library"] = ""
    return v


def choose_device(name: str, local_rank: int) -> torch.device:
    """auto: the GPU numbered local_rank % device_count when CUDA is present, else the CPU."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device (torch.cuda.is_available() is False)")
    dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(dev)
    return dev


def default_run_dir(backend: str, n: int) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{stamp}-{backend}-n{n}")


def run(args) -> int:
    from ringtrain.data import ShardedLoader, load_dataset
    from ringtrain.models import build_model
    from ringtrain.schemes import make_scheme
    from ringtrain.steplog import NullLog, StepLog, next_segment, rank_file
    from ringtrain.trainer import Trainer, TrainConfig
    from ringtrain.world import World, install_abort_on_error

    install_abort_on_error()
    world = World.init()
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, world.local_size))
    torch.set_num_threads(threads)
    device = choose_device(args.device, world.local_rank)

    # Data and model: every rank builds the same ones (the model's initial values are then
    # replaced by rank 0's in scheme.setup).
    data = load_dataset(args.dataset, args.data_dir, args.synthetic_shape, args.synthetic_samples, seed=args.seed)
    torch.manual_seed(args.seed)
    model = build_model(args.model, data.shape, data.classes).to(device)
    optimizer = make_optimizer(args, model)
    config = {k: v for k, v in vars(args).items() if k != "func"}
    scheme = make_scheme(args.backend, world, config)
    check_fault_options(args, scheme.num_workers)  # --fail-rank names a worker: servers do not train

    # The run directory: rank 0 names it (timestamps differ between ranks) and tells the others.
    run_dir = world.bcast_bytes((args.run_dir or default_run_dir(args.backend, world.size)).encode() if world.rank == 0 else None).decode()
    if world.rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        if not args.resume and os.path.exists(rank_file(run_dir, 0)):
            raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it (a new segment is added) or choose another --run-dir")
    world.barrier()
    segment = next_segment(run_dir, world.rank)
    scheme.config["run_dir"] = run_dir  # where parameter servers write server-SSSSS.h5

    if not scheme.is_worker:  # a dedicated parameter server: no trainer, no data
        scheme.serve()
        scheme.close()
        return 0

    loader = ShardedLoader(data.x_train, data.y_train, args.batch_size, scheme.worker_rank, scheme.num_workers, seed=args.seed)
    params = sum(p.numel() for p in model.parameters())
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    manifest = {
        "scheme": args.backend,
        "backend": args.backend,
        "world_size": world.size,
        "num_workers": scheme.num_workers,
        "rank": world.rank,
        "worker_rank": scheme.worker_rank,
        "local_rank": world.local_rank,
        "local_size": world.local_size,
        "hostname": world.hostname,
        "model": args.model,
        "param_count": params,
        "grad_bytes": grad_bytes,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "dataset": args.dataset,
        "launcher": world.launch.launcher,
        "slurm_job_id": world.launch.slurm_job_id or "",
        "versions": versions(),
        "config": json.dumps(config, default=str),
        "clock_offset": world.clock_offset,
        "clock_uncertainty": world.clock_uncertainty,
        "clock": "t_start: time.time() + clock_offset (rank 0's clock); durations: time.perf_counter()"
        + ("; CUDA phases synchronised before each reading" if device.type == "cuda" else ""),
        "device": str(device),
        "cuda_aware_mpi": _cuda_aware() if device.type == "cuda" else False,
        "threads": threads,
        "segment": segment,
        "steps_per_epoch": len(loader),
    }
    cfg = TrainConfig(
        epochs=args.epochs,
        max_steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        snapshot=args.snapshot,
        save_every=args.save_every,
        save_every_steps=args.save_every_steps,
        resume=args.resume,
        model_name=args.model,
        nonfinite=args.nonfinite,
        progress=not args.no_progress,
        fail_rank=args.fail_rank,
        fail_step=args.fail_step,
        fail_mode=args.fail_mode,
        extra={"model": args.model, "dataset": args.dataset, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed},
    )
    trainer = Trainer(
        model, optimizer, torch.nn.CrossEntropyLoss(), scheme, loader, (data.x_test, data.y_test),
        log=None, cfg=cfg, clock=world.now, device=device,
    )
    manifest.update({f"scheme_{k}": v for k, v in scheme.manifest().items()})
    manifest["expected_bytes_per_step"] = list(scheme.expected_bytes_per_step(grad_bytes))
    manifest["start_step"] = trainer.global_step
    log = NullLog() if args.no_log else StepLog(
        rank_file(run_dir, world.rank, segment), manifest, scheme.extra_columns(), flush_every=args.log_flush_every, flush_seconds=args.log_flush_seconds
    )
    trainer.log = log
    if scheme.worker_rank == 0:  # worker 0 (rank 0 may be a parameter server)
        _write_run_json(run_dir, manifest, None)
        print(
            f"[RANK0] {args.backend}: {scheme.num_workers} worker(s) of {world.size} rank(s), model {args.model} "
            f"({params/1e6:.2f} M params, {grad_bytes/2**20:.1f} MiB of gradients), dataset {args.dataset}, "
            f"device {device}, log {run_dir}",
            flush=True,
        )
    t0 = time.perf_counter()
    try:
        summary = trainer.train()
    finally:
        log.close()
    summary["wall_s"] = time.perf_counter() - t0
    summary["run_dir"] = run_dir
    scheme.close()
    if scheme.worker_rank == 0:
        _write_run_json(run_dir, manifest, summary)
        print(format_summary(args.backend, args.model, summary), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=2)
    return 0


def _cuda_aware() -> bool:
    from ringtrain.staging import cuda_aware_mpi

    return cuda_aware_mpi()


def check_fault_options(args, workers: int) -> None:
    """Fault-injection options name a worker and a step of this job, or nothing at all.
    Workers are numbered 0..workers-1: every rank under an all-reduce scheme; under dedicated
    parameter servers, the ranks after the servers."""
    r, k = args.fail_rank, args.fail_step
    if r == -1 and k == -1:
        return
    if not 0 <= r < workers:
        raise ValueError(f"--fail-rank {r} is not a worker of this job of {workers} worker(s) (0..{workers - 1})")
    if k < 0:
        raise ValueError(f"--fail-rank {r} needs --fail-step K >= 0 (the global step at whose start worker {r} fails)")


def make_optimizer(args, model):
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    if args.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    raise ValueError(f"unknown optimizer {args.optimizer!r}")


def _write_run_json(run_dir, manifest, summary) -> None:
    keep = {k: v for k, v in manifest.items() if k not in ("rank", "local_rank", "hostname", "worker_rank", "clock_offset", "clock_uncertainty")}
    doc = {"manifest": keep, "summary": summary, "status": "finished" if summary else "running"}
    path = os.path.join(run_dir, "run.json" if manifest.get("segment", 0) == 0 else f"run.seg-{manifest['segment']:03d}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2, default=str)
    os.replace(tmp, path)


def format_summary(backend: str, model: str, s: dict) -> str:
    n = s["workers"]
    per = s["mean_step_s"]
    step = per["t_step"] or float("nan")
    lines = [
        "",
        f"Summary: {backend}, {n} worker(s), {model}, {s['steps']} steps in {s['wall_s']:.1f} s  (log: {s['run_dir']})",
        f"  Img/sec per rank: {s['samples_per_sec_per_rank']:.1f} +-{s['samples_per_sec_per_rank_std']:.1f}",
        f"  Total img/sec on {n} rank(s): {s['samples_per_sec_total']:.1f}",
        f"  final loss {s['final_loss']:.4f}   held-out accuracy {100 * s['test_accuracy']:.2f}%",
        "",
        f"  {'phase':<16}{'ms/step':>10}{'share':>8}",
    ]
    other = step - sum(per[k] for k in ("t_data", "t_forward", "t_backward", "t_comm_exposed", "t_optimizer"))
    for label, v in (
        ("data", per["t_data"]),
        ("forward", per["t_forward"]),
        ("backward", per["t_backward"]),
        ("comm (exposed)", per["t_comm_exposed"]),
        ("optimizer", per["t_optimizer"]),
        ("other", max(0.0, other)),
        ("step", step),
    ):
        lines.append(f"  {label:<16}{1e3 * v:>10.3f}{100 * v / step:>7.1f}%")
    if per["t_comm"] > 0:
        hidden = 1 - per["t_comm_exposed"] / per["t_comm"]
        lines.append(f"  communication issued {1e3 * per['t_comm']:.3f} ms/step, {100 * max(0.0, hidden):.0f}% of it hidden behind backward")
    return "\n".join(lines)
