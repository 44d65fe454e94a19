"""Horovod's helpers for an identical start: broadcast_parameters, broadcast_optimizer_state,
broadcast_object, allgather_object. All collective: every rank calls them in the same order.

Tensors travel as raw bytes, fused into one buffer per dtype. Objects travel as JSON, never
pickle (unpickling what another process sent can run arbitrary code), so broadcast_object
takes JSON-serializable values: numbers, strings, None, lists, and dicts with string keys
(tuples arrive as lists).
"""
from __future__ import annotations

import json
from collections.abc import Iterable

import torch

from ringtrain.horovod.ops import allgather, broadcast_, global_process_set, rank


def _fused_broadcast_(tensors, root_rank, name) -> None:
    """Every tensor in `tensors` (any device, any layout) becomes root's, one broadcast per dtype."""
    by_dtype: dict = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for dtype in sorted(by_dtype, key=str):  # the same order on every rank
        group = by_dtype[dtype]
        flat = torch.cat([t.detach().reshape(-1).cpu() for t in group]) if group else torch.empty(0, dtype=dtype)
        broadcast_(flat, root_rank, name=f"{name}.{str(dtype).replace('torch.', '')}")
        offset = 0
        with torch.no_grad():
            for t in group:
                n = t.numel()
                t.copy_(flat[offset : offset + n].view_as(t))
                offset += n


def broadcast_parameters(params, root_rank, process_set=global_process_set) -> None:
    """Make `params` on every rank equal root_rank's, in place. `params`: a state_dict
    (model.state_dict()), a list of tensors or (name, tensor) pairs, or model.named_parameters().
    A dict is taken in sorted key order, like Horovod; lists in their order."""
    if isinstance(params, dict):
        items = sorted(params.items())
    elif isinstance(params, Iterable):
        items = [p if isinstance(p, tuple) else (None, p) for p in params]
    else:
        raise ValueError(f"invalid params of type {type(params).__name__}: pass model.state_dict() or a list of tensors")
    tensors = []
    for pname, t in items:
        if not torch.is_tensor(t):
            raise ValueError(f"broadcast_parameters: {pname or 'an entry'} is a {type(t).__name__}, not a tensor")
        tensors.append(t.data if isinstance(t, torch.nn.Parameter) else t)
    _fused_broadcast_(tensors, root_rank, "broadcast_parameters")


def _base_step(optimizer) -> None:
    """optimizer.step() without a DistributedOptimizer's gradient exchange (a local step)."""
    base = getattr(optimizer, "_hvd_base_step", None)
    base() if base is not None else optimizer.step()


def _numbers(value, out: list) -> bool:
    """Append the numbers in `value` (a number or a nest of tuples/lists of numbers) to out;
    False if it holds anything else (None, strings), which is then not broadcast."""
    if isinstance(value, (bool, int, float)):
        out.append(float(value))
        return True
    if isinstance(value, (tuple, list)):
        mark = len(out)
        if all(_numbers(v, out) for v in value):
            return True
        del out[mark:]
    return False


def _rebuild(template, values, pos):
    """Inverse of _numbers: a value shaped and typed like `template` from values[pos:]."""
    if isinstance(template, bool):
        return bool(values[pos]), pos + 1
    if isinstance(template, int):
        return int(values[pos]), pos + 1
    if isinstance(template, float):
        return float(values[pos]), pos + 1
    items = []
    for t in template:
        v, pos = _rebuild(t, values, pos)
        items.append(v)
    return type(template)(items), pos


def broadcast_optimizer_state(optimizer, root_rank, model=None, process_set=global_process_set) -> None:
    """Make the optimizer's state and hyperparameters on every rank equal root_rank's.

    Typical use: rank 0 restored a checkpoint, the others start fresh. A rank whose state is
    still empty first creates it with one local step on zero gradients (as Horovod does),
    but here the parameters and gradients are restored afterwards, so weight decay does not
    move them. State tensors (momentum buffers, Adam moments and steps) are broadcast in
    place, fused per dtype; numeric hyperparameters (lr, momentum, betas, ...) and numeric
    per-parameter scalars travel in one float64 buffer. Non-numeric options (None, strings)
    are left as each rank has them.
    """
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError("cannot broadcast torch.optim.LBFGS state (its state is nested and holds None values)")
    if len(optimizer.state_dict()["state"]) == 0:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        saved = [(p, p.detach().clone(), p.grad) for p in params]
        for p in params:
            p.grad = torch.zeros_like(p)
        _base_step(optimizer)
        with torch.no_grad():
            for p, data, grad in saved:
                p.copy_(data)
                p.grad = grad
    sd = optimizer.state_dict()
    if len(sd["state"]) == 0:
        return  # a stateless optimizer (plain SGD): only hyperparameters to agree on

    tensors, numbers, setters = [], [], []
    for index, group in enumerate(sd["param_groups"]):
        for key in sorted(k for k in group if k != "params"):
            mark = len(numbers)
            if _numbers(group[key], numbers):
                setters.append((mark, group[key], lambda v, i=index, k=key: optimizer.param_groups[i].__setitem__(k, v)))
        for pid in group["params"]:
            if pid not in sd["state"]:
                continue
            st = sd["state"][pid]  # the optimizer's own dict: assignments below update it
            for key in sorted(st, key=str):
                val = st[key]
                if torch.is_tensor(val):
                    tensors.append(val)
                else:
                    mark = len(numbers)
                    if _numbers(val, numbers):
                        setters.append((mark, val, lambda v, d=st, k=key: d.__setitem__(k, v)))
    _fused_broadcast_(tensors, root_rank, "broadcast_optimizer_state")
    buf = torch.tensor(numbers, dtype=torch.float64)
    broadcast_(buf, root_rank, name="broadcast_optimizer_state.scalars")
    values = buf.tolist()
    for mark, template, assign in setters:
        assign(_rebuild(template, values, mark)[0])


def broadcast_object(obj, root_rank=0, name=None, process_set=global_process_set):
    """root_rank's `obj` on every rank. JSON-serializable objects only (no pickle)."""
    name = name or "broadcast_object"
    length = torch.zeros(1, dtype=torch.int64)
    payload = b""
    if rank() == root_rank:
        try:
            payload = json.dumps(obj, allow_nan=True).encode()
            length[0] = len(payload)
        except (TypeError, ValueError) as e:
            length[0] = -1
            error = e
    broadcast_(length, root_rank, name=f"{name}.length")
    n = int(length[0])
    if n < 0:
        raise TypeError(
            f"broadcast_object: rank {root_rank}'s object is not JSON-serializable"
            + (f" ({error})" if rank() == root_rank else "")
            + "; ringtrain.horovod sends objects as JSON, never pickle. Send tensors with broadcast_."
        )
    buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if rank() == root_rank else torch.empty(n, dtype=torch.uint8)
    broadcast_(buf, root_rank, name=f"{name}.data")
    return json.loads(bytes(buf.numpy()).decode())


def allgather_object(obj, name=None, process_set=global_process_set) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank. JSON-serializable objects only."""
    name = name or "allgather_object"
    try:
        payload = json.dumps(obj, allow_nan=True).encode()
        ok = 1
    except (TypeError, ValueError):
        payload, ok = b"", 0
    lengths = allgather(torch.tensor([len(payload) if ok else -1], dtype=torch.int64), name=f"{name}.lengths")
    bad = [r for r, n in enumerate(lengths.tolist()) if n < 0]
    if bad:
        raise TypeError(f"allgather_object: the objects of ranks {bad} are not JSON-serializable (no pickle is used)")
    data = allgather(torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.empty(0, dtype=torch.uint8),
                     name=f"{name}.data")
    raw = bytes(data.numpy())
    out, offset = [], 0
    for n in lengths.tolist():
        out.append(json.loads(raw[offset : offset + n].decode()))
        offset += n
    return out
