#!/usr/bin/env bash
# Set up on a fresh machine and run the whole test suite (real mpirun jobs of 1-4 ranks).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec python -m pytest -q -p no:cacheprovider --timeout=900 tests "$@"
