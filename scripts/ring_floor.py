"""Where a ring all-reduce's time goes at one message size, against MPI_Allreduce.

    mpirun -n 2 --bind-to none python scripts/ring_floor.py --size 1M --iters 500

Times, per iteration (median of the slowest rank, after a barrier):
  sendrecv S/N        one ring step's transfer (MPI_Sendrecv of one segment)
  add S/N             one reduce-scatter step's reduction (numpy, in place)
  ring by hand        2(N-1) Sendrecvs and N-1 adds, straight mpi4py with nothing around
                      them: the floor for any Python ring over this MPI
  Ring.allreduce_     ringtrain's ring with its default layout check (carried in the ring's
                      message tags: free) and with the collective one (a tiny
                      MPI_Allreduce first, as training uses to measure arrival skew)
  MPI_Allreduce       the library, in place
  sendrecv S, add S   what MPI's one-round algorithm for two ranks costs (exchange the whole
                      buffer, add it): shown for N = 2 only

With one core per rank and single-copy shared memory (CMA), the receiving rank's core does
the copy, so copy and add cannot overlap: a ring step costs transfer + add, and a two-rank
ring takes two dependent steps where MPI takes one.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from mpi4py import MPI

from ringtrain.cli import parse_size
from ringtrain.ring import Ring


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1M", help="message size in bytes (K, M suffixes)")
    ap.add_argument("--iters", type=int, default=500)
    args = ap.parse_args()

    comm = MPI.COMM_WORLD
    N, r = comm.Get_size(), comm.Get_rank()
    right, left = (r + 1) % N, (r - 1) % N
    n = parse_size(args.size) // 4
    seg = -(-n // N)
    x = np.ones(n, np.float32)
    a = np.ones(seg, np.float32)
    b = np.empty(seg, np.float32)
    whole = np.empty(n, np.float32)
    ring_tags, ring_coll = Ring(comm), Ring(comm, check="collective")
    mpi = comm.Dup()

    def by_hand():
        bounds = [(i * n) // N for i in range(N + 1)]
        for s in range(2 * (N - 1)):
            out, into = (r - s) % N, (r - s - 1) % N
            lo, hi = bounds[into], bounds[into + 1]
            if s < N - 1:
                comm.Sendrecv(x[bounds[out] : bounds[out + 1]], right, s, b[: hi - lo], left, s)
                np.add(x[lo:hi], b[: hi - lo], out=x[lo:hi])
            else:
                comm.Sendrecv(x[bounds[out] : bounds[out + 1]], right, s, x[lo:hi], left, s)

    cases = {
        "sendrecv S/N": lambda: comm.Sendrecv(a, right, 0, b, left, 0),
        "add S/N": lambda: np.add(a, b, out=b),
        "ring by hand": by_hand,
        "Ring.allreduce_ (default)": lambda: ring_tags.allreduce_(x, op="sum"),
        "Ring.allreduce_ (collective)": lambda: ring_coll.allreduce_(x, op="sum"),
        "MPI_Allreduce": lambda: mpi.Allreduce(MPI.IN_PLACE, x, op=MPI.SUM),
    }
    if N == 2:
        cases["sendrecv S"] = lambda: comm.Sendrecv(x, right, 0, whole, left, 0)
        cases["add S"] = lambda: np.add(x, whole, out=whole)
    names = list(cases)
    times = {k: np.zeros(args.iters) for k in names}
    for it in range(args.iters + 20):
        shift = it % len(names)
        for k in names[shift:] + names[:shift]:  # alternate, rotating, as `bench` does
            x.fill(1.0)
            comm.Barrier()
            t0 = time.perf_counter()
            cases[k]()
            dt = time.perf_counter() - t0
            if it >= 20:
                times[k][it - 20] = dt
    med = {}
    for k in names:
        slowest = np.empty_like(times[k])
        comm.Allreduce(times[k], slowest, op=MPI.MAX)
        med[k] = float(np.median(slowest)) * 1e6
    if r == 0:
        print(f"# {N} ranks, {n * 4} bytes float32, median of the slowest rank over {args.iters} iterations")
        for k in names:
            print(f"  {k:<30} {med[k]:9.1f} us")
        print(f"  MPI_Allreduce / ring by hand    {med['MPI_Allreduce'] / med['ring by hand']:9.2f}   (the most a Python ring can reach here)")
        print(f"  MPI_Allreduce / Ring (default)  {med['MPI_Allreduce'] / med['Ring.allreduce_ (default)']:9.2f}   (what `bench allreduce` reports as ring/mpi)")
    ring_tags.close()
    ring_coll.close()
    mpi.Free()


if __name__ == "__main__":
    main()
