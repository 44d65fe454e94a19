"""The training loop: Trainer.train -> _run_epoch -> _run_batch, with snapshots.

The trainer imports no MPI. Everything distributed goes through the scheme
(ringtrain/schemes/base.py): it makes all workers start alike, exchanges gradients during or
after backward, applies the update, and reports what the step cost in communication. The
trainer times the phases around those calls and hands one row per step to the step log.

Where a timer could lie:
  - t_backward includes the time hooks spend copying gradients into buckets and starting
    all-reduces (microseconds), and, for DDP, DDP's own wait for its last buckets.
  - t_comm_exposed is reported by the scheme; the trainer's own stopwatch around
    end_backward() measures the same wait plus a few microseconds of bookkeeping.
  - t_optimizer includes the non-finite-gradient check (one norm per gradient tensor) unless
    --nonfinite off; for schemes that keep each worker's own gradient (parameter server,
    none) the check runs between backward and end_backward instead, where no phase column
    holds it; only t_step includes it.
  - the first steps include one-off costs (allocations, thread start-up); reports skip them.
  - on CPU all timers are wall-clock perf_counter readings around synchronous work. On CUDA
    the trainer synchronises the device before reading a timer (see `_sync`), so queued
    kernels are charged to the phase that launched them, not to the next one.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ringtrain.schemes.base import WorkersChanged
from ringtrain.snapshot import load_snapshot, save_snapshot


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: int | None = None  # stop after this many steps in total (across epochs and resumes)
    batch_size: int = 32  # per rank
    seed: int = 0
    snapshot: str | None = None  # path of the snapshot file (rank 0 writes it)
    save_every: int = 0  # epochs between snapshots (0: only at the end, if --snapshot)
    save_every_steps: int = 0  # steps between snapshots, for long epochs
    resume: bool = False
    model_name: str = ""
    nonfinite: str = "stop"  # NaN/Inf gradients: "stop" | "skip" (drop the step) | "off"
    progress: bool = True  # progress bar on rank 0
    warmup_steps: int = 2  # steps left out of the throughput summary
    fail_rank: int = -1  # fault injection: this rank ...
    fail_step: int = -1  # ... dies at the start of this global step
    fail_mode: str = "exit"  # exit | kill | raise | nan (NaN loss and gradients on that rank)
    extra: dict = field(default_factory=dict)


class NonFiniteGradientError(RuntimeError):
    pass


class Trainer:
    """Collective: every worker constructs one and calls train()."""

    def __init__(self, model, optimizer, loss_fn, scheme, train_loader, test_set, log, cfg: TrainConfig, clock=time.time, device=None):
        self.model = model  # unwrapped: what snapshots save
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.scheme = scheme
        self.loader = train_loader
        self.test_set = test_set  # (x, y) held-out tensors, or None
        self.log = log
        self.cfg = cfg
        self.clock = clock  # seconds on rank 0's clock
        self.device = device or torch.device("cpu")
        self.rank = scheme.worker_rank
        self.world = scheme.num_workers
        self.first_rank = self.rank  # the worker rank --fail-rank refers to (ranks renumber after a loss)
        self.epochs_run = 0
        self.global_step = 0
        self.batch_in_epoch = 0  # batches already done in the current epoch (mid-epoch resume)
        self.rows: list[dict] = []  # this segment's steps, for the summary
        self._last_saved_step = -1
        if cfg.resume and cfg.snapshot and (self.rank != 0 or os.path.exists(cfg.snapshot)):
            self._load_snapshot()
        elif cfg.resume and cfg.snapshot and self.rank == 0:
            print(f"[RANK0] --resume: no snapshot at {cfg.snapshot}, starting from scratch", file=sys.stderr)
        # Rank 0's parameters and optimizer state reach every worker here (and DDP wraps).
        self.forward_model = scheme.setup(model, optimizer)
        where = scheme.broadcast_metrics([self.epochs_run, self.global_step, self.batch_in_epoch])
        self.epochs_run, self.global_step, self.batch_in_epoch = (int(v) for v in where)

    # ---- the loop -------------------------------------------------------------------------

    def train(self) -> dict:
        cfg = self.cfg
        for epoch in range(self.epochs_run, cfg.epochs):
            if self._done():
                break
            self._run_epoch(epoch)
            if self.batch_in_epoch == 0:  # the epoch ran to its end
                self.epochs_run = epoch + 1
                if cfg.snapshot and cfg.save_every and self.epochs_run % cfg.save_every == 0:
                    self._save_snapshot(epoch)
        if cfg.snapshot and self._last_saved_step != self.global_step:
            self._save_snapshot(max(0, self.epochs_run - 1) if self.batch_in_epoch == 0 else self.epochs_run)
        self.log.flush()
        return self.summary()

    def _done(self) -> bool:
        return self.cfg.max_steps is not None and self.global_step >= self.cfg.max_steps

    def _run_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)
        steps = len(self.loader)
        skip = self.batch_in_epoch
        if self.rank == 0:
            print(f"[RANK0] Epoch {epoch} | Batchsize: {self.loader.batch_size} | Steps: {steps}", flush=True)
        bar = None
        if self.rank == 0 and self.cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=steps, initial=skip, desc=f"Epoch {epoch}", unit="step", leave=False, dynamic_ncols=True, mininterval=0.5)
        self.model.train()
        batches = iter(self.loader)
        for _ in range(skip):  # resume mid-epoch: the shard order is deterministic, so skip
            next(batches)
        while True:
            if self._done():
                break
            t0 = time.perf_counter()
            t_start = self.clock()
            try:
                x, y = next(batches)
            except StopIteration:
                break
            t_data = time.perf_counter() - t0
            row = self._run_batch(x, y, epoch, t_start, t_data)
            self.batch_in_epoch += 1
            if row.get("recover_s"):  # workers were lost: our shard changed, restart the iterator
                steps = len(self.loader)
                batches = iter(self.loader)
                for _ in range(min(self.batch_in_epoch, steps)):
                    next(batches)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
            if self.cfg.snapshot and self.cfg.save_every_steps and self.global_step % self.cfg.save_every_steps == 0:
                self._save_snapshot(epoch)
        if bar is not None:
            bar.close()
        if self.batch_in_epoch >= steps:
            self.batch_in_epoch = 0

    def _run_batch(self, x, y, epoch: int, t_start: float, t_data: float) -> dict:
        cfg, scheme = self.cfg, self.scheme
        step = self.global_step
        inject = step == cfg.fail_step and self.first_rank == cfg.fail_rank
        if inject and cfg.fail_mode != "nan":
            self._inject_failure(step)
        # Dropout and friends draw from a generator seeded by (seed, rank, step), so a resumed
        # run replays exactly the random numbers the uninterrupted run would have drawn.
        torch.manual_seed(cfg.seed * 1_000_003 + self.rank * 7_919 + step)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

        t0 = time.perf_counter()
        scheme.begin_step(step)
        self.optimizer.zero_grad(set_to_none=True)
        out = self.forward_model(x)
        loss = self.loss_fn(out, y)
        if inject and cfg.fail_mode == "nan":  # fault injection: this rank's loss and gradients turn NaN
            loss = loss * float("nan")
        self._sync()
        t1 = time.perf_counter()
        loss.backward()
        self._sync()
        t2 = time.perf_counter()
        recover_s = 0.0
        if not scheme.averages_gradients:
            self._drop_own_nonfinite(step)  # before this worker's gradient leaves it
        try:
            scheme.end_backward()  # every param.grad now holds the average over workers
        except WorkersChanged as e:
            recover_s = self._on_workers_changed(e, step)
        t3 = time.perf_counter()
        loss_value = loss.item()  # once: on CUDA every .item() is a device sync
        local_nonfinite = not math.isfinite(loss_value)
        skip_update = recover_s > 0 or (scheme.averages_gradients and self._check_gradients(step, local_nonfinite))
        if not skip_update:
            scheme.optimizer_step(self.optimizer)
        self._sync()
        t4 = time.perf_counter()
        st = scheme.end_step()
        self.global_step += 1

        row = {
            "step": step,
            "epoch": epoch,
            "t_start": t_start,
            "t_data": t_data,
            "t_forward": t1 - t0,
            "t_backward": t2 - t1,
            "t_comm": st.t_comm,
            "t_comm_exposed": st.t_comm_exposed,
            "t_optimizer": t4 - t3,
            "t_step": t_data + (t4 - t0),
            "bytes_sent": st.bytes_sent,
            "bytes_recv": st.bytes_recv,
            "samples": int(y.shape[0]),
            "loss": loss_value,
            "t_wait_peers": st.t_wait_peers,
            "grad_nonfinite": int(local_nonfinite),
            "num_workers": self.world,
            "recover_s": recover_s,
            **st.extra,
        }
        self.log.append(row)
        self.rows.append(row)
        return row

    # ---- helpers --------------------------------------------------------------------------

    def _sync(self) -> None:
        # CUDA kernels run asynchronously: without this, a phase's timer would stop before its
        # kernels ran and the next phase would be charged for them.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _gradients_finite(self) -> bool:
        """True if every gradient this worker holds is finite (one norm per tensor)."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum()))

    def _drop_gradients(self) -> None:
        for p in self.model.parameters():
            p.grad = None

    def _check_gradients(self, step: int, local_nonfinite: bool) -> bool:
        """After the exchange every worker holds the same averaged gradient, so all of them
        reach the same verdict here without extra communication. Returns True to skip the update."""
        if self.cfg.nonfinite == "off" or self._gradients_finite():
            return False
        # Rare path: find out which ranks produced it (one small collective, on every worker).
        flags = np.zeros(self.world)
        flags[self.rank] = 1.0 if local_nonfinite else 0.0
        flags = self.scheme.allreduce_metrics(flags)
        culprits = [r for r in range(self.world) if flags[r] > 0] or ["unknown (local losses finite; gradient overflow)"]
        msg = f"non-finite gradient at step {step}: NaN/Inf loss on rank(s) {', '.join(map(str, culprits))}"
        if self.cfg.nonfinite == "skip":
            if self.rank == 0:
                print(f"[RANK0] {msg}; update skipped (--nonfinite skip)", file=sys.stderr, flush=True)
            self._drop_gradients()
            return True
        raise NonFiniteGradientError(msg + ". Lower --lr, or pass --nonfinite skip to drop such steps.")

    def _drop_own_nonfinite(self, step: int) -> None:
        """For schemes where every worker keeps its own gradient (parameter server, none):
        check this worker's gradient alone, before end_backward sends it anywhere. No
        collective: other workers may well be fine. --nonfinite stop raises (the job ends,
        naming this rank); skip drops the gradient (param.grad = None: a parameter server
        receives zeros from this worker for this step, and applies the others')."""
        if self.cfg.nonfinite == "off" or self._gradients_finite():
            return
        msg = f"non-finite gradient at step {step} on worker {self.rank}"
        if self.cfg.nonfinite == "skip":
            print(f"[worker {self.rank}] {msg}; its gradient is dropped for this step (--nonfinite skip)", file=sys.stderr, flush=True)
            self._drop_gradients()
            return
        raise NonFiniteGradientError(msg + ". Lower --lr, or pass --nonfinite skip to drop such gradients.")

    def _on_workers_changed(self, e: WorkersChanged, step: int) -> float:
        """Survivors of a rank loss: drop this step, take a new shard, go on (elastic schemes)."""
        old = self.world
        self.rank, self.world = self.scheme.worker_rank, self.scheme.num_workers
        self.loader.reshard(self.rank, self.world)
        for p in self.model.parameters():
            p.grad = None
        if self.rank == 0:
            print(f"[RANK0] step {step}: lost rank(s) {e.lost}; continuing on {self.world} of {old} workers "
                  f"(recovered in {e.recover_s:.2f} s, this step's update dropped)", flush=True)
        return max(e.recover_s, 1e-9)

    def _inject_failure(self, step: int) -> None:
        """Fault injection for tests and the fault-tolerance comparison (--fail-rank/--fail-step)."""
        self.log.flush()
        sys.stderr.write(f"[rank {self.rank}] injected failure at step {step} ({self.cfg.fail_mode})\n")
        sys.stderr.flush()
        if self.cfg.fail_mode == "kill":
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        if self.cfg.fail_mode == "raise":
            raise RuntimeError(f"injected failure on rank {self.rank} at step {step}")
        os._exit(3)

    def evaluate(self) -> float:
        """Held-out accuracy over all workers (each scores a disjoint slice). Collective."""
        if self.test_set is None:
            return float("nan")
        x, y = self.test_set
        x, y = x[self.rank :: self.world], y[self.rank :: self.world]
        self.model.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(x), 256):
                pred = self.model(x[i : i + 256].to(self.device)).argmax(1)
                correct += int((pred.cpu() == y[i : i + 256]).sum())
        self.model.train()
        c, n = self.scheme.allreduce_metrics([correct, len(x)])
        return float(c / n) if n else float("nan")

    def summary(self) -> dict:
        """Throughput, loss, accuracy and the time split. Collective over workers."""
        rows = self.rows[self.cfg.warmup_steps :] or self.rows
        phases = ("t_data", "t_forward", "t_backward", "t_comm_exposed", "t_optimizer", "t_step", "t_comm")
        local = {k: float(np.sum([r[k] for r in rows])) for k in phases}
        samples = float(np.sum([r["samples"] for r in rows]))
        last_loss = self.rows[-1]["loss"] if self.rows else float("nan")
        rate = samples / local["t_step"] if local["t_step"] > 0 else 0.0
        vec = [rate, rate * rate, last_loss, *(local[k] for k in phases), len(rows)]
        tot = self.scheme.allreduce_metrics(vec)
        n = self.world
        mean_rate = tot[0] / n
        std_rate = math.sqrt(max(0.0, tot[1] / n - mean_rate**2))
        steps = tot[-1] / n
        per_step = {k: tot[3 + i] / n / steps if steps else float("nan") for i, k in enumerate(phases)}
        acc = self.evaluate()
        return {
            "workers": n,
            "steps": self.global_step,
            "epochs_run": self.epochs_run,
            "samples_per_sec_per_rank": mean_rate,
            "samples_per_sec_per_rank_std": std_rate,
            "samples_per_sec_total": tot[0],
            "final_loss": tot[2] / n,
            "test_accuracy": acc,
            "mean_step_s": per_step,
        }

    # ---- snapshots ------------------------------------------------------------------------

    def _save_snapshot(self, epoch: int) -> None:
        self._last_saved_step = self.global_step
        if self.rank != 0 or not self.cfg.snapshot:
            return
        save_snapshot(
            self.cfg.snapshot,
            model=self.model,
            optimizer=self.optimizer,
            epochs_run=self.epochs_run,
            step=self.global_step,
            batch_in_epoch=self.batch_in_epoch,
            model_name=self.cfg.model_name,
            config=self.cfg.extra,
        )
        print(f"Epoch {epoch} | Training snapshot saved at {self.cfg.snapshot}", flush=True)

    def _load_snapshot(self) -> None:
        # Only rank 0 reads the file; setup() then broadcasts model and optimizer state, and
        # broadcast_metrics the position, so other hosts need not see the file.
        if self.rank != 0:
            return
        snap = load_snapshot(self.cfg.snapshot, self.model, self.optimizer, self.cfg.model_name)
        self.epochs_run = snap["EPOCHS_RUN"]
        self.global_step = snap["STEP"]
        self.batch_in_epoch = snap.get("BATCH_IN_EPOCH", 0)
        print(f"[RANK0] Resuming training from snapshot at Epoch {self.epochs_run}, step {self.global_step}", flush=True)
