"""`--backend ddp`: torch.distributed DistributedDataParallel, gloo on CPU, nccl on GPU.

What most users would pick instead of ringtrain; here for comparison. DDP starts its bucket
all-reduces from inside backward and waits for them inside backward too, so its
communication is measured through a DDP comm hook:
  t_comm          sum over buckets of (future completed - all_reduce issued).
  t_comm_exposed  time from the last bucket's launch (which happens when backward's last
                  gradient is ready, i.e. compute is done) until the last bucket completed.
                  DDP hides this wait inside loss.backward(), so the trainer's t_backward
                  includes it; this column says how much of it was communication.
Bytes follow the ring cost model (gloo reports none), as the manifest says.
"""
from __future__ import annotations

import threading
import warnings


from ringtrain.broadcast import broadcast_optimizer_state
from ringtrain.schemes.base import Scheme, StepStats, now


class DdpScheme(Scheme):
    name = "ddp"

    def setup(self, model, optimizer):
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        from ringtrain.world import init_torch_distributed

        device = next(model.parameters()).device
        backend = self.config.get("ddp_backend") or ("nccl" if device.type == "cuda" else "gloo")
        init_torch_distributed(self.world, backend)
        self.backend = backend
        self.grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        self._lock = threading.Lock()
        self._events = []  # (t_issue, t_done) per bucket this step
        with warnings.catch_warnings():
            # broadcast_buffers=False is what we want (rank-local BN statistics, like every other
            # scheme); newer torch warns that the flag is deprecated.
            warnings.simplefilter("ignore", FutureWarning)
            ddp = DistributedDataParallel(
                model,
                device_ids=[device.index] if device.type == "cuda" else None,
                bucket_cap_mb=float(self.config.get("bucket_cap_mb", 4.0)),
                broadcast_buffers=False,
            )  # DDP broadcasts rank 0's parameters at construction
        broadcast_optimizer_state(optimizer, self.world.comm)
        world_size = self.world.size

        def hook(state, bucket):
            t_issue = now()
            buf = bucket.buffer()
            buf.div_(world_size)
            fut = dist.all_reduce(buf, async_op=True).get_future()

            def done(f):
                with self._lock:
                    self._events.append((t_issue, now()))
                return f.value()[0]

            return fut.then(done)

        ddp.register_comm_hook(None, hook)
        self.ddp = ddp
        return ddp

    def begin_step(self, step: int) -> None:
        with self._lock:
            self._events = []

    def end_step(self) -> StepStats:
        with self._lock:
            ev = list(self._events)
        st = StepStats()
        if ev:
            st.t_comm = sum(d - i for i, d in ev)
            st.t_comm_exposed = max(0.0, max(d for _, d in ev) - max(i for i, _ in ev))
        sent, recv = self.expected_bytes_per_step(self.grad_bytes)
        st.bytes_sent, st.bytes_recv = int(round(sent)), int(round(recv))
        return st

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    def manifest(self) -> dict:
        return {
            "ddp_backend": self.backend,
            "bucket_cap_mb": float(self.config.get("bucket_cap_mb", 4.0)),
            "overlap": True,
            "bytes_counted_by": "cost model 2(N-1)/N*S (gloo/nccl report no byte counts)",
        }

    def expected_bytes_per_step(self, grad_bytes: int) -> tuple[float, float]:
        n = self.num_workers
        b = 2 * (n - 1) / n * grad_bytes if n > 1 else 0.0
        return b, b
