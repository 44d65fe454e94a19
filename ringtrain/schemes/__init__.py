"""Gradient-exchange schemes, one module each, all behind ringtrain.schemes.base.Scheme.

The registry maps `--backend NAME` to "module:Class"; modules are imported only when chosen,
so a scheme whose library is missing (horovod) costs nothing until asked for.
"""
from __future__ import annotations

import importlib

SCHEMES = {
    "ring": "ringtrain.schemes.ring:RingScheme",
    "mpi": "ringtrain.schemes.mpi:MpiScheme",
    "ddp": "ringtrain.schemes.ddp:DdpScheme",
    "horovod": "ringtrain.schemes.horovod:HorovodScheme",
    "none": "ringtrain.schemes.none:NoExchange",
    "ps-sync": "ringtrain.schemes.ps:PsSync",
    "ps-async": "ringtrain.schemes.ps:PsAsync",
    "ps-async-reply-first": "ringtrain.schemes.ps:PsAsyncReplyFirst",
    "ps-hogwild": "ringtrain.schemes.ps:PsHogwild",
}

# `--elastic`: the variant of a backend that survives the loss of ranks (needs ULFM).
ELASTIC = {
    "ring": "ringtrain.schemes.elastic:ElasticRingScheme",
}


def scheme_names() -> list[str]:
    return list(SCHEMES)


def make_scheme(name: str, world, config: dict | None = None):
    """Construct the scheme registered as `name` (its elastic variant if config["elastic"]).
    Not collective (setup() is)."""
    if name not in SCHEMES:
        raise ValueError(f"unknown backend {name!r}; choose one of: {', '.join(SCHEMES)}")
    target = SCHEMES[name]
    if (config or {}).get("elastic"):
        if name not in ELASTIC:
            raise ValueError(f"--elastic is available for --backend {', '.join(ELASTIC)}, not {name!r}")
        target = ELASTIC[name]
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)(world, config)
