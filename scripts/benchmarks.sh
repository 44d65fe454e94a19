#!/usr/bin/env bash
# Every benchmark behind BENCHMARKS.md, on this machine, in one go (about 65 minutes on 2 cores).
# Each command alternates its backends inside one MPI job; ratios come from the same run.
#   OUT=bench-results bash scripts/benchmarks.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
[ "$(id -u)" = 0 ] && export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMP_NUM_THREADS=1
OUT=${OUT:-bench-results}
mkdir -p "$OUT"
MPIRUN="mpirun --oversubscribe --bind-to none"
run() { echo "\$ $*" | tee -a "$OUT/log.txt"; "$@" 2>&1 | grep -v Warning | tee -a "$OUT/log.txt"; }

# 1. all-reduce bandwidth: ring vs MPI_Allreduce vs torch gloo, N=2 and N=4, three runs in turn
#    (a single run's ratio at 1 MiB moves by +-0.1 on this machine)
#    then the same on the ring's shared memory (--buffers shared: where training keeps its
#    gradient buckets; every backend's buffers there alike)
for k in 1 2 3; do
    for n in 2 4; do
        run $MPIRUN -n $n python -m ringtrain bench allreduce --backends ring,mpi,gloo \
            --sizes 64K,256K,1M,4M,16M,64M --iters 50 --json "$OUT/allreduce-n$n-run$k.json"
    done
done
for k in 1 2 3; do
    for n in 2 4; do
        run $MPIRUN -n $n python -m ringtrain bench allreduce --backends ring,mpi,gloo \
            --sizes 64K,256K,1M,4M,16M,64M --iters 50 --buffers shared --json "$OUT/shared-n$n-run$k.json"
    done
done
# large messages on four ranks: page size, polite waiting, and single-copy shared memory off
for k in 1 2; do
    for n in 4 2; do
        for b in torch hugepage; do
            run $MPIRUN -n $n python -m ringtrain bench allreduce --backends ring,mpi,gloo --sizes 4M,16M,64M \
                --iters 30 --buffers $b --json "$OUT/buffers-$b-n$n-run$k.json"
        done
    done
    run $MPIRUN -n 4 python -m ringtrain bench allreduce --backends ring,mpi,gloo --sizes 4M,16M,64M \
        --iters 30 --comm-wait sleep --json "$OUT/sleep-n4-run$k.json"
done
run $MPIRUN -n 4 --mca smsc ^cma python -m ringtrain bench allreduce --backends ring,mpi,gloo --sizes 16M,64M --iters 15
# where one ring call's time goes at 1 MiB: bare mpi4py ring vs Ring vs MPI_Allreduce
run $MPIRUN -n 2 python scripts/ring_floor.py --size 1M --iters 500
run $MPIRUN -n 4 python scripts/ring_floor.py --size 1M --iters 200
# 2. training throughput, ResNet-18 on synthetic CIFAR-shaped data, batch 32 per rank, N=2
#    (with the ring's buckets in torch's memory too: ring+private); then the ring against
#    itself polling MPI at full speed during backward (ring+spin)
run $MPIRUN -n 2 python -m ringtrain bench train --backends ring,ring+private,ddp,mpi --model resnet18 \
    --batch-size 32 --rounds 24 --steps-per-round 2 --warmup 1 --threads 1 --json "$OUT/train-resnet18-n2.json"
run $MPIRUN -n 2 python -m ringtrain bench train --backends ring,ring+spin --model resnet18 \
    --batch-size 32 --rounds 12 --steps-per-round 2 --warmup 1 --threads 1 --json "$OUT/train-resnet18-spin-n2.json"
# 3. overlap on a communication-heavy MLP: exposed vs issued communication, with and without overlap
run $MPIRUN -n 2 python -m ringtrain bench train --backends ring,ring+spin,ring+nooverlap --model mlp-wide \
    --synthetic-shape 1,8,8 --batch-size 64 --rounds 10 --steps-per-round 5 --threads 1 --json "$OUT/train-overlap-n2.json"
# 4. what the HDF5 step log costs: the same training with and without it
run $MPIRUN -n 2 python -m ringtrain bench train --backends ring,ring+nolog --model cnn \
    --synthetic-shape 1,8,8 --batch-size 32 --rounds 30 --steps-per-round 20 --threads 1 --json "$OUT/train-logcost-n2.json"
