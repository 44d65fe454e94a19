"""Training snapshots: one torch.save dict, written atomically by rank 0.

Keys (the first two are those of PyTorch's DDP tutorial, so its readers feel at home):
    MODEL_STATE      model.state_dict()
    EPOCHS_RUN       epochs completed
    OPTIMIZER_STATE  optimizer.state_dict()
    STEP             global steps completed
    BATCH_IN_EPOCH   batches completed in the unfinished epoch (0 at an epoch boundary)
    RNG_STATE        {"torch": torch.get_rng_state()} (the trainer also reseeds every step
                     from (seed, rank, step), which is what makes resumption exact)
    MODEL_NAME, CONFIG, RINGTRAIN_VERSION

Loading uses torch.load(weights_only=True): a snapshot cannot run code.
"""
from __future__ import annotations

import os
import pickle
import re
import tempfile

import torch

from ringtrain import __version__


class SnapshotError(ValueError):
    """The snapshot is unreadable or belongs to another model."""


def save_snapshot(path, model, optimizer, epochs_run, step, batch_in_epoch, model_name, config) -> None:
    """Write to a temporary file in the same directory, fsync, then rename: a crash while
    saving leaves the previous snapshot intact, never a half-written one."""
    snap = {
        "MODEL_STATE": model.state_dict(),
        "EPOCHS_RUN": int(epochs_run),
        "OPTIMIZER_STATE": optimizer.state_dict(),
        "STEP": int(step),
        "BATCH_IN_EPOCH": int(batch_in_epoch),
        "RNG_STATE": {"torch": torch.get_rng_state()},
        "MODEL_NAME": model_name,
        "CONFIG": {k: v for k, v in (config or {}).items() if isinstance(v, (int, float, str, bool, type(None)))},
        "RINGTRAIN_VERSION": __version__,
    }
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".snapshot-", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(snap, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_snapshot(path, model, optimizer, model_name: str) -> dict:
    """Load into `model` and `optimizer` in place; returns the snapshot dict.
    Raises SnapshotError naming the file and the problem."""
    try:
        snap = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SnapshotError(f"snapshot {path} does not exist") from None
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found is None:
            raise SnapshotError(f"snapshot {path} is corrupt or not a ringtrain snapshot (UnpicklingError)") from None
        raise SnapshotError(
            f"snapshot {path} refused: it refers to the Python object {found.group(1)}, and loading it could run code "
            f"(snapshots are read with torch.load(weights_only=True): tensors and plain values only). Use a snapshot "
            f"written by ringtrain."
        ) from None
    except Exception as e:
        raise SnapshotError(f"snapshot {path} is corrupt or not a ringtrain snapshot ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(snap, dict) or "MODEL_STATE" not in snap or "EPOCHS_RUN" not in snap:
        raise SnapshotError(f"snapshot {path} has no MODEL_STATE/EPOCHS_RUN: not a training snapshot")
    saved = snap.get("MODEL_NAME")
    if saved and model_name and saved != model_name:
        raise SnapshotError(f"snapshot {path} is of model {saved!r}, but this run trains {model_name!r}; pass --model {saved} or another --snapshot")
    own = model.state_dict()
    theirs = snap["MODEL_STATE"]
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    shapes = [f"{k}: {tuple(theirs[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in theirs and tuple(theirs[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        detail = "; ".join(
            x for x in (
                f"missing {missing[:3]}" if missing else "",
                f"unexpected {unexpected[:3]}" if unexpected else "",
                f"shape mismatch {shapes[:3]}" if shapes else "",
            ) if x
        )
        raise SnapshotError(f"snapshot {path} does not fit this model ({detail}); it was written for another model or dataset shape")
    model.load_state_dict(theirs)
    if "OPTIMIZER_STATE" in snap:
        try:
            optimizer.load_state_dict(snap["OPTIMIZER_STATE"])
        except Exception as e:
            raise SnapshotError(f"snapshot {path}: optimizer state does not fit ({e})") from None
    if "RNG_STATE" in snap and "torch" in snap["RNG_STATE"]:
        torch.set_rng_state(snap["RNG_STATE"]["torch"])
    snap.setdefault("STEP", 0)
    return snap
