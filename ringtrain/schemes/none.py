"""`--backend none`: no gradient exchange at all. The compute-only baseline: a run with this
scheme shows what a step costs without communication (ranks drift apart; that is the point)."""
from __future__ import annotations

from ringtrain.broadcast import broadcast_module_state, broadcast_optimizer_state
from ringtrain.schemes.base import Scheme


class NoExchange(Scheme):
    name = "none"
    averages_gradients = False

    def setup(self, model, optimizer):
        # Same start as every other scheme, so a none run is a fair baseline.
        broadcast_module_state(model, self.world.comm)
        broadcast_optimizer_state(optimizer, self.world.comm)
        return model

    def manifest(self) -> dict:
        return {"bytes_counted_by": "none exchanged"}
