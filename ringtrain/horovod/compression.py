"""Gradient compression for allreduce, with Horovod's interface (compress -> (tensor, ctx),
decompress(tensor, ctx) -> tensor). Compression.fp16 halves the bytes on the wire; the
ring sums 16-bit values in float32 and rounds once per hop."""
from __future__ import annotations

import torch


class Compressor:
    """Interface: compress(tensor) -> (compressed, ctx); decompress(compressed, ctx) -> tensor."""

    @staticmethod
    def compress(tensor):
        raise NotImplementedError

    @staticmethod
    def decompress(tensor, ctx):
        raise NotImplementedError


class NoneCompressor(Compressor):
    """No compression (the default)."""

    @staticmethod
    def compress(tensor):
        return tensor, None

    @staticmethod
    def decompress(tensor, ctx):
        return tensor


class FP16Compressor(Compressor):
    """Floating-point tensors travel as float16; others are left alone."""

    @staticmethod
    def compress(tensor):
        if tensor.dtype.is_floating_point and tensor.dtype != torch.float16:
            return tensor.to(torch.float16), tensor.dtype
        return tensor, None

    @staticmethod
    def decompress(tensor, ctx):
        return tensor.to(ctx) if ctx is not None else tensor


class Compression:
    """Compression.none (default) or Compression.fp16."""

    none = NoneCompressor
    fp16 = FP16Compressor
