#!/usr/bin/env bash
# The ONE prepared script for a session with a GPU: install, CUDA tests, benchmark.
# Usage (from the repository root, on the GPU machine): bash benchmarks/gpu_check.sh
# Logs and JSON go to $OUT (default: ./gpu-out).  Each step has its own timeout, 7.5 minutes
# in all at worst.  A failing step is reported and the next ones still run.
set -u
export PYTHONUNBUFFERED=1
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
status=0

step() {  # step NAME SECONDS COMMAND...
    local name=$1 seconds=$2
    shift 2
    echo "=== $name (timeout ${seconds}s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$seconds" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$OUT/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - start))s"
    [ $rc -eq 0 ] || status=1
}

step environment 20 bash -c 'nvidia-smi; python3 -c "import cupy, torch; print(\"cupy\", cupy.__version__, \"torch\", torch.__version__)"'
step install 40 python3 -m pip install -q --no-deps --no-build-isolation --no-index -e .
# The CUDA-specific tests, then every backend's parity tests (both stop at the first failure).
step test-cuda 120 python3 -m pytest -x -q -rs tests/test_cuda_backend.py
step test-parity 60 python3 -m pytest -x -q -rs tests/test_backend_parity.py
step benchmark 150 python3 benchmarks/gpu_epoch.py "$OUT/gpu_epoch.json"
step accuracy 60 python3 benchmarks/gpu_accuracy.py "$OUT/gpu_accuracy.json" --epochs 2
exit $status
