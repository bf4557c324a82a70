#!/usr/bin/env bash
# The one prepared GPU check (see perf/gpu_check.py): bash perf/gpu_check.sh OUT_DIR [--parts ...] [--quick]
# On a machine that already has torch and triton but not this checkout installed, it installs the checkout
# itself first (editable, no dependencies, no download), so that the children can import horizon_triton.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
    echo "usage: bash perf/gpu_check.sh OUT_DIR [--parts NAMES] [--quick] [--budget-s S] [--list]" >&2
    exit 2
fi
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import horizon_triton.kernels.reference" 2>/dev/null; then
    echo "gpu_check: horizon_triton is not importable; installing this checkout:" \
         "$PYTHON -m pip install -q --no-deps --no-build-isolation -e ."
    "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . || exit 1
fi
# a Triton cache compiled ahead for sm_90a by perf/warm_cache.py (in the twin) and carried here: the kernels it
# holds are loaded instead of compiled (perf/RESULTS.md, "Triton's cache warmed without a GPU")
if [ -z "${TRITON_CACHE_DIR:-}" ] && [ -d .triton-cache ]; then
    export TRITON_CACHE_DIR="$PWD/.triton-cache"
    echo "gpu_check: using the pre-warmed Triton cache $TRITON_CACHE_DIR"
fi
export PYTHONUNBUFFERED=1
exec "$PYTHON" perf/gpu_check.py "$@"
