"""Command line: `ringtrain train | bench | report | cluster` (also `python -m ringtrain`).

Each subcommand's work lives in its own module; this file only declares the options, so
`ringtrain SUBCOMMAND --help` explains everything in one place.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ringtrain",
        description="Data-parallel PyTorch training over MPI, with per-step compute and "
        "communication timings logged to HDF5. Launch `train` and `bench` under mpirun/srun/horovodrun.",
    )
    sub = p.add_subparsers(title="commands", metavar="COMMAND")
    from ringtrain.cluster import add_cluster_parser
    from ringtrain.hostfile import add_hostfile_parser

    add_hostfile_parser(sub)
    add_cluster_parser(sub)
    return p


if __name__ == "__main__":
    sys.exit(main())
