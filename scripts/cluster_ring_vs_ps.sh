#!/usr/bin/env bash
# Ring all-reduce vs a parameter server where bandwidth is scarce: the comparison of the KTH
# thesis (DistNet), repeated on an emulated cluster of hosts joined by 1 Gbit/s links.
#
#   sudo scripts/cluster_ring_vs_ps.sh [OUT_DIR]        # from the ringtrain checkout, as root
#
# What it does:
#   1. `ringtrain cluster up`: HOSTS emulated hosts (network namespaces, one rank each) on a
#      switch, every link limited to BANDWIDTH each way (tc tbf).
#   2. `bench allreduce` (ring, mpi) at N = 2, 3, 4: large-message ring busbw against the link.
#   3. `train` with a communication-heavy model at N = 2, 3, 4 workers:
#        ring                      N ranks on N hosts
#        ps-sync, dedicated server N workers + 1 server rank, on N+1 hosts (--ps-servers 1)
#        ps-sync, colocated        N ranks, the one shard served by worker 0 (--ps-servers 0)
#   4. A table of median communication and step times (slowest worker per step) beside the
#      cost model, written to OUT_DIR/results.md and OUT_DIR/results.json.
# Cost model per step, S = gradient bytes, B = link rate (bytes/s each way):
#   ring             each rank sends and receives 2(N-1)/N*S at once: 2(N-1)/N * S/B
#   dedicated PS     the server's link carries N*S in (push), then N*S out (pull): 2N * S/B;
#                    counting bytes only (in and out overlapped): N * S/B
#   colocated PS     worker 0's link carries (N-1)*S in, then (N-1)*S out: 2(N-1) * S/B
#   so PS/ring = N^2/(N-1) for a push-then-pull server, N^2/(2(N-1)) counting bytes only.
# Time: about 10 minutes with the defaults on 2 cores. The cluster is removed at the end,
# also on error or Ctrl-C.
#
# Knobs: BANDWIDTH (1gbit) HOSTS (5: enough for 4 workers and a server) NS ("2 3 4")
# MODEL (mlp-wide) DATASET (digits) BATCH_SIZE (32) STEPS (25) SKIP (5 warm-up steps left out)
# TRAIN_ARGS ("--no-overlap --bucket-cap-mb 64": one all-reduce of the whole gradient after
# backward, so t_comm is communication alone, as in the cost model)
# BENCH_SIZES (1M,16M,64M) BENCH_ITERS (5) BENCH_WAIT (sleep: ranks wait in MPI_Test plus
# sleeps, so that with more ranks than cores a waiting rank leaves the core to one that has
# data to move; spin: blocking MPI calls) RINGTRAIN_PYTHON (.venv/bin/python or python3).
set -euo pipefail
cd "$(dirname "$0")/.."
HOME_DIR=$(pwd)
OUT=${1:-runs/cluster-ring-vs-ps-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BANDWIDTH=${BANDWIDTH:-1gbit}
HOSTS=${HOSTS:-5}
NS=${NS:-2 3 4}
MODEL=${MODEL:-mlp-wide}
DATASET=${DATASET:-digits}
BATCH_SIZE=${BATCH_SIZE:-32}
STEPS=${STEPS:-25}
SKIP=${SKIP:-5}
TRAIN_ARGS=${TRAIN_ARGS:---no-overlap --bucket-cap-mb 64}
BENCH_SIZES=${BENCH_SIZES:-1M,16M,64M}
BENCH_ITERS=${BENCH_ITERS:-5}
BENCH_WAIT=${BENCH_WAIT:-sleep}
PREFIX=${CLUSTER_PREFIX:-rtps}
if [ -z "${RINGTRAIN_PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then RINGTRAIN_PYTHON=$HOME_DIR/.venv/bin/python; else RINGTRAIN_PYTHON=$(command -v python3); fi
fi
PY=$RINGTRAIN_PYTHON
export PATH=$(dirname "$PY"):$PATH PYTHONPATH=$HOME_DIR${PYTHONPATH:+:$PYTHONPATH}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1

if [ "$(id -u)" != 0 ]; then echo "cluster_ring_vs_ps.sh: needs root (network namespaces)" >&2; exit 1; fi
if ! "$PY" -m ringtrain train --help | grep -q ps-sync; then
    echo "cluster_ring_vs_ps.sh: this ringtrain has no ps-sync backend" >&2; exit 1
fi

"$PY" -m ringtrain cluster up --hosts "$HOSTS" --slots 1 --bandwidth "$BANDWIDTH" \
    --prefix "$PREFIX" --dir "$OUT/cluster" | tee "$OUT/cluster.txt"
trap '"$PY" -m ringtrain cluster down --prefix "$PREFIX" --dir "$OUT/cluster" >/dev/null' EXIT
MPIRUN="$OUT/cluster/mpirun"

run() {  # run NAME NRANKS ARGS...: one mpirun, output kept in OUT/NAME.log
    local name=$1 n=$2; shift 2
    echo "== $name: $n ranks"
    "$MPIRUN" -n "$n" "$PY" -m ringtrain "$@" >"$OUT/$name.log" 2>&1 || {
        echo "failed: see $OUT/$name.log" >&2; tail -n 20 "$OUT/$name.log" >&2; return 1; }
}

for n in $NS; do
    run "bench-n$n" "$n" bench allreduce --backends ring,mpi --sizes "$BENCH_SIZES" --iters "$BENCH_ITERS" \
        --comm-wait "$BENCH_WAIT" --json "$OUT/bench-n$n.json"
done

# shellcheck disable=SC2206
train=(train --model "$MODEL" --dataset "$DATASET" --batch-size "$BATCH_SIZE" --steps "$STEPS" --no-progress --threads 1
       $TRAIN_ARGS)
for n in $NS; do
    run "ring-n$n" "$n" "${train[@]}" --backend ring --run-dir "$OUT/ring-n$n"
    if [ $((n + 1)) -le "$HOSTS" ]; then
        run "ps1-n$n" $((n + 1)) "${train[@]}" --backend ps-sync --ps-servers 1 --run-dir "$OUT/ps1-n$n"
    fi
    run "ps0-n$n" "$n" "${train[@]}" --backend ps-sync --ps-servers 0 --run-dir "$OUT/ps0-n$n"
done

"$PY" - "$OUT" "$BANDWIDTH" "$SKIP" "$NS" <<'EOF'
import glob, json, os, sys
import h5py
import numpy as np
from ringtrain.cluster import parse_rate

out, bandwidth, skip, ns = sys.argv[1], sys.argv[2], int(sys.argv[3]), [int(n) for n in sys.argv[4].split()]
B = parse_rate(bandwidth) / 8  # bytes/s each way


def median_slowest(run_dir, col):
    """Median over steps (after the warm-up) of the slowest worker's value; and S."""
    per_rank, S = [], None
    for path in sorted(glob.glob(os.path.join(run_dir, "rank-*.h5"))):
        with h5py.File(path, "r") as f:
            if "step" not in f or len(f["step"]) == 0:
                continue
            per_rank.append(np.asarray(f[col][skip:], dtype=float))
            S = int(f.attrs["grad_bytes"])
    if not per_rank:
        return None, None
    m = min(len(a) for a in per_rank)
    return float(np.median(np.max([a[:m] for a in per_rank], axis=0))), S


rows, lines = [], []
for n in ns:
    row = {"N": n}
    for key in ("ring", "ps1", "ps0"):
        d = os.path.join(out, f"{key}-n{n}")
        comm, S = median_slowest(d, "t_comm") if os.path.isdir(d) else (None, None)
        step, _ = median_slowest(d, "t_step") if os.path.isdir(d) else (None, None)
        row[f"{key}_comm_ms"] = comm and comm * 1e3
        row[f"{key}_step_ms"] = step and step * 1e3
        row["grad_bytes"] = row.get("grad_bytes") or S
    S = row["grad_bytes"]
    row["model_ring_ms"] = 2 * (n - 1) / n * S / B * 1e3
    row["model_ps1_ms"] = 2 * n * S / B * 1e3
    row["model_ps0_ms"] = 2 * (n - 1) * S / B * 1e3
    row["ratio_ps1_model_seq"] = n * n / (n - 1)
    row["ratio_ps1_model_bytes"] = n * n / (2 * (n - 1))
    for key in ("ps1", "ps0"):
        a, b = row.get(f"{key}_comm_ms"), row.get("ring_comm_ms")
        row[f"ratio_{key}_measured"] = a / b if a and b else None
    bench = os.path.join(out, f"bench-n{n}.json")
    if os.path.exists(bench):
        big = [r for r in json.load(open(bench)) if r["backend"] in ("ring", "mpi")]
        top = max(r["size_bytes"] for r in big)
        for r in big:
            if r["size_bytes"] == top:
                row[f"bench_{r['backend']}_busbw_frac"] = r["busbw_GBps"] * 1e9 / B
        row["bench_size_bytes"] = top
    rows.append(row)


def f(x, fmt="{:.0f}"):
    return "-" if x is None else fmt.format(x)


S = rows[0]["grad_bytes"]
lines.append(f"Links {bandwidth} each way; gradients S = {S / 2**20:.1f} MiB; medians of the slowest worker per step "
             f"(first {skip} steps left out). Communication time t_comm in ms; model = bytes / link rate.")
lines.append("")
lines.append("| N | ring comm (model) | PS dedicated comm (model) | PS colocated comm (model) | PS ded./ring measured | model N²/(N-1) | model N²/(2(N-1)) | PS coloc./ring measured | ring step | PS ded. step | ring busbw / link | mpi busbw / link |")
lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    lines.append(
        f"| {r['N']} | {f(r['ring_comm_ms'])} ({f(r['model_ring_ms'])}) | {f(r['ps1_comm_ms'])} ({f(r['model_ps1_ms'])}) "
        f"| {f(r['ps0_comm_ms'])} ({f(r['model_ps0_ms'])}) | {f(r['ratio_ps1_measured'], '{:.2f}')} "
        f"| {r['ratio_ps1_model_seq']:.2f} | {r['ratio_ps1_model_bytes']:.2f} | {f(r['ratio_ps0_measured'], '{:.2f}')} "
        f"| {f(r['ring_step_ms'])} | {f(r['ps1_step_ms'])} "
        f"| {f(r.get('bench_ring_busbw_frac'), '{:.0%}')} | {f(r.get('bench_mpi_busbw_frac'), '{:.0%}')} |")
text = "\n".join(lines) + "\n"
open(os.path.join(out, "results.md"), "w").write(text)
json.dump(rows, open(os.path.join(out, "results.json"), "w"), indent=1)
print(text)
EOF
echo "results: $OUT/results.md (bench rows: $OUT/bench-n*.json, step logs: $OUT/{ring,ps1,ps0}-nN/)"
