"""`--backend ring`: gradients averaged with ringtrain's own pure mpi4py ring (ringtrain/ring.py)."""
from __future__ import annotations

from ringtrain.ring import Ring
from ringtrain.schemes.allreduce import BucketedAllreduce


class RingScheme(BucketedAllreduce):
    """Config: chunk_bytes (pipeline chunk; None: chosen by locality, see Ring), check ("collective" (default: measures arrival skew) | "always" | "never", see Ring), grad_buffers ("shared" (default): the buckets come from Ring.empty, so on one node the ring reduces straight out of its peers' buckets; "private": torch's allocator), plus the bucket options."""

    name = "ring"

    def setup(self, model, optimizer):
        self.ring = Ring(
            self.world.comm,
            chunk_bytes=self.config.get("chunk_bytes"),
            check=self.config.get("check", "collective"),
            polite=self.comm_wait != "spin",  # same on every rank: it fixes the check's collective kind
        )
        return super().setup(model, optimizer)

    def _alloc(self):
        grad_buffers = self.config.get("grad_buffers", "shared")
        if grad_buffers not in ("shared", "private"):
            raise ValueError(f"grad_buffers must be shared or private, got {grad_buffers!r}")
        return self.ring.empty if grad_buffers == "shared" else None

    def _start(self, flat, name):
        if self.staging is not None:
            # The copy to host runs on a side stream: the ring must wait for it on its own thread.
            return self.ring.allreduce_async_(flat, op="average", name=name, before=lambda: self.wait_staged(flat))
        return self.ring.allreduce_async_(flat, op="average", name=name)

    def _set_polite(self, flag):
        self.ring.polite = flag

    def _wait(self, handle):
        handle.wait()
        s = handle.info["stats"]
        return s.bytes_sent, s.bytes_recv

    def close(self) -> None:
        super().close()
        self.ring.close()

    def manifest(self) -> dict:
        shared = bool(self.buckets) and self.ring.is_shared(self.buckets[0].flat)
        return {**super().manifest(), "chunk_bytes": self.ring.chunk_bytes, "layout_check": self.ring.check, "grad_buffers": "shared" if shared else "private"}
