"""Make every rank start from rank 0's model and optimizer state (DESIGN §2, identical start).

Collective over `comm`: every rank calls with a model/optimizer of the same architecture.
Tensors travel as raw bytes with MPI_Bcast; the only non-tensor message is a small JSON
description of the optimizer state's layout (no pickle).
"""
from __future__ import annotations

import json

import numpy as np
import torch

from ringtrain.world import bcast_bytes


def _bytes_view(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if not t.is_contiguous():
        raise ValueError("broadcast needs contiguous tensors")
    # reshape(-1) first: a 0-dim tensor (BatchNorm's num_batches_tracked, Adam's step) cannot
    # be viewed as bytes directly; its 1-element reshape shares the same memory.
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.empty(0, np.uint8)


def broadcast_tensor_(t: torch.Tensor, comm, root: int = 0) -> None:
    """In place: `t` on every rank becomes root's `t` (same shape and dtype on all ranks)."""
    from mpi4py import MPI

    if t.device.type != "cpu":
        host = t.detach().cpu()
        comm.Bcast([_bytes_view(host), MPI.BYTE], root=root)
        t.data.copy_(host)
        return
    comm.Bcast([_bytes_view(t), MPI.BYTE], root=root)


def broadcast_module_state(module: torch.nn.Module, comm, root: int = 0) -> None:
    """Parameters and buffers (BatchNorm statistics) of `module` from root, in state_dict order."""
    with torch.no_grad():
        for _, t in module.state_dict(keep_vars=True).items():
            broadcast_tensor_(t.data if isinstance(t, torch.nn.Parameter) else t, comm, root)


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, comm, root: int = 0) -> None:
    """Root's per-parameter optimizer state (momentum buffers, Adam moments, step counts).

    Non-root ranks keep their own param_groups (identical hyperparameters by construction)
    and take root's `state`. Works whether or not the state was initialised on other ranks.
    """
    rank = comm.Get_rank()
    sd = optimizer.state_dict()
    layout = None
    if rank == root:
        layout = {}
        for pid, st in sd["state"].items():
            entry = {}
            for key, val in st.items():
                if torch.is_tensor(val):
                    entry[key] = ["tensor", list(val.shape), str(val.dtype).replace("torch.", "")]
                else:
                    entry[key] = ["value", val]
            layout[str(pid)] = entry
        msg = json.dumps(layout).encode()
    else:
        msg = None
    layout = json.loads(bcast_bytes(comm, msg, root).decode())
    state = {}
    for pid, entry in layout.items():
        st = {}
        for key, (kind, *rest) in entry.items():
            if kind == "tensor":
                shape, dtype = rest
                t = sd["state"][int(pid)][key].contiguous() if rank == root else torch.zeros(shape, dtype=getattr(torch, dtype))
                broadcast_tensor_(t, comm, root)
                st[key] = t
            else:
                st[key] = rest[0]
        state[int(pid)] = st
    if rank != root:
        sd["state"] = state
        optimizer.load_state_dict(sd)
