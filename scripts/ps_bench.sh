#!/bin/sh
# Parameter server vs ring at N=4 workers, and the async variants' accuracy beside ps-sync.
#   sh scripts/ps_bench.sh [OUT_DIR] [ROUNDS]
# Step time: mlp-wide (4.3 M parameters, 17 MB of gradients per step) on digits, short runs
# alternated ROUNDS times so background load hits every scheme alike; compare medians with
# `ringtrain report`. Accuracy: mlp on digits for the same samples (3 epochs x 4 workers).
set -e
OUT=${1:-runs/ps-bench}
ROUNDS=${2:-2}
MPI="mpirun --oversubscribe --bind-to none --mca osc ^ucx"
export OMP_NUM_THREADS=1
T="python -m ringtrain train --no-progress --threads 1 --save-every 0"
mkdir -p "$OUT"
for r in $(seq 1 "$ROUNDS"); do
  $MPI -n 4 $T --backend ring    --model mlp-wide --epochs 3 --steps 30 --run-dir "$OUT/time-ring-$r"
  $MPI -n 5 $T --backend ps-sync --model mlp-wide --epochs 3 --steps 30 --run-dir "$OUT/time-ps-sync-dedicated-$r"
  $MPI -n 4 $T --backend ps-sync --model mlp-wide --epochs 3 --steps 30 --ps-servers 0 --ps-shards 4 --run-dir "$OUT/time-ps-sync-colocated4-$r"
done
python -m ringtrain report "$OUT"/time-* --json "$OUT/time.json"
for b in ps-sync ps-async ps-async-reply-first ps-hogwild; do
  $MPI -n 5 $T --backend $b --model mlp --epochs 3 --lr 0.05 --run-dir "$OUT/acc-$b" --json "$OUT/acc-$b.json"
done
$MPI -n 4 $T --backend ring --model mlp --epochs 3 --lr 0.05 --run-dir "$OUT/acc-ring" --json "$OUT/acc-ring.json"
python - "$OUT" <<'PY'
import glob, json, os, sys

import h5py
import numpy as np

for f in sorted(glob.glob(os.path.join(sys.argv[1], "acc-*.json"))):
    s = json.load(open(f))
    stale = []
    for r in sorted(glob.glob(os.path.join(f[:-5], "rank-*.h5"))):
        with h5py.File(r, "r") as h:
            if "staleness" in h:
                stale.append(h["staleness"][:])
    st = np.concatenate(stale) if stale else np.zeros(1)
    print(f"{os.path.basename(f)[4:-5]:<22} steps {s['steps']:>4}  loss {s['final_loss']:.4f}  "
          f"held-out acc {100*s['test_accuracy']:.2f}%  staleness mean {st.mean():.2f} max {st.max()}")
PY
