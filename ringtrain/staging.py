"""Moving GPU gradients through host memory for MPI libraries that cannot read GPU memory.

The ring and MPI_Allreduce schemes reduce host buffers. When the model lives on a GPU:

    backward (GPU stream) --copy each grad into the bucket's device buffer-->
    bucket full: record an event; on a side copy stream wait for it, then copy device -> pinned
                 host buffer (asynchronous: backward keeps running on the compute stream)
    the scheme's background thread waits for the copy's event, then all-reduces the host buffer
    end_backward: copy host -> device on the copy stream; the compute stream waits for it

CUDA-aware MPI (which could take device pointers directly) is detected at run time and
recorded in the manifest; the PyPI Open MPI wheel is not CUDA-aware.

`HostStaging` is the CUDA implementation. `CopyStaging` does the same dance with ordinary
host tensors and no streams: it exists so the staged code path runs, and is tested, on
machines without a GPU (`--stage-through-host`).
"""
from __future__ import annotations

import os
import subprocess

import torch


def cuda_aware_mpi() -> bool:
    """True when the MPI library says it can read GPU memory. RINGTRAIN_CUDA_AWARE=0/1 overrides."""
    env = os.environ.get("RINGTRAIN_CUDA_AWARE")
    if env is not None:
        return env not in ("0", "", "false", "no")
    try:
        from mpi4py import MPI

        lib = MPI.Get_library_version()
    except Exception:
        return False
    if "Open MPI" in lib:
        try:  # ompi_info reports the build option; MPIX_Query_cuda_support is not wrapped by mpi4py
            out = subprocess.run(["ompi_info", "--parsable", "--all"], capture_output=True, text=True, timeout=20).stdout
            return "mpi_built_with_cuda_support:value:true" in out
        except Exception:
            return False
    return "CUDA" in lib and "MVAPICH" in lib


class CopyStaging:
    """Staging between two host tensors (no GPU): same calls, same order, plain copies."""

    kind = "host-copy"

    def host_buffer(self, numel: int, dtype) -> torch.Tensor:
        return torch.zeros(numel, dtype=dtype)

    def device_buffer(self, numel: int, dtype, device) -> torch.Tensor:
        return torch.zeros(numel, dtype=dtype, device=device)

    def to_host_async(self, host: torch.Tensor, dev: torch.Tensor):
        """Start dev -> host; returns a waitable (called on the thread running backward)."""
        host.copy_(dev)
        return None

    def wait(self, token) -> None:
        """Block until the copy behind `token` is done (called on the communication thread)."""

    def to_device(self, dev: torch.Tensor, host: torch.Tensor) -> None:
        dev.copy_(host)

    def finish(self) -> None:
        """Make the compute stream wait for every to_device copy."""


class HostStaging(CopyStaging):
    """CUDA: pinned host buffers, a side copy stream, and events to order the copies."""

    kind = "cuda-pinned"

    def __init__(self, device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def host_buffer(self, numel, dtype):
        return torch.zeros(numel, dtype=dtype, pin_memory=True)

    def to_host_async(self, host, dev):
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))  # the gradients are written
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            host.copy_(dev, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return done

    def wait(self, token):
        if token is not None:
            token.synchronize()

    def to_device(self, dev, host):
        with torch.cuda.stream(self.stream):
            dev.copy_(host, non_blocking=True)

    def finish(self):
        torch.cuda.current_stream(self.device).wait_stream(self.stream)


def make_staging(device: torch.device, force: bool = False):
    """HostStaging for CUDA parameters, CopyStaging when forced on CPU, else None (no staging)."""
    if device.type == "cuda":
        return HostStaging(device)
    return CopyStaging() if force else None
