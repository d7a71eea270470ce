#!/usr/bin/env bash
# The ONE prepared script for a session with a GPU: environment, install, CUDA tests, parity
# tests, benchmark, accuracy.  Usage (on the GPU machine): bash benchmarks/gpu_check.sh
#
# Every stage has its own timeout and runs whatever the earlier ones did (no `pytest -x`);
# the stage timeouts plus their kill-after add up to at most 480 s (tests/test_gpu_check.py
# checks the sum).  After EACH stage, $OUT/gpu_check.json (benchmarks/gpu_check_summary.py)
# is rewritten with every finished stage's exit status, seconds and key figures, so a run cut
# short still returns what finished.  $OUT (default ./gpu-out) receives at most 8 files: that
# summary, one log per stage, and gpu_epoch.json; the rest stays in a scratch folder.
#
# The package needs no install to import: fastlstm/kernels (with its .cu sources) lies inside
# the package, so PYTHONPATH=$PWD suffices and every stage runs with it; the install stage
# only checks that the editable install works there.
#
# Environment: GPU_CHECK_SCALE_PERCENT (default 100) scales every timeout (at least 1 s each:
# a quick run of the script itself, as its test does); GPU_CHECK_SKIP names stages to skip
# (recorded as skipped), e.g. GPU_CHECK_SKIP="install accuracy".
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$PWD/gpu-out}"
SCALE_PERCENT="${GPU_CHECK_SCALE_PERCENT:-100}"
SKIP=" ${GPU_CHECK_SKIP:-} "
KILL_AFTER=5
SUMMARY="$OUT/gpu_check.json"
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
mkdir -p "$OUT"
rm -f "$SUMMARY"
status=0

scaled() {  # scaled SECONDS: SECONDS times GPU_CHECK_SCALE_PERCENT, at least 1
    local s=$(( $1 * SCALE_PERCENT / 100 ))
    echo $(( s > 0 ? s : 1 ))
}

stage() {  # stage NAME SECONDS FIGURES COMMAND...  (FIGURES: its JUnit XML or JSON, or -)
    local name=$1 seconds figures=$3
    seconds=$(scaled "$2")
    shift 3
    local summary=(python3 benchmarks/gpu_check_summary.py record "$SUMMARY" "$name"
                   --command "$*" --timeout "$seconds" --meta scale_percent "$SCALE_PERCENT"
                   --meta pythonpath "$PYTHONPATH")
    if [[ "$SKIP" == *" $name "* ]]; then
        echo "=== $name: skipped (GPU_CHECK_SKIP)"
        "${summary[@]}" --skipped "GPU_CHECK_SKIP"
        return
    fi
    echo "=== $name (timeout ${seconds}s): $*"
    local start rc
    start=$(date +%s.%N)
    timeout --kill-after="$(scaled $KILL_AFTER)" "$seconds" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    tail -n 20 "$OUT/$name.log"
    echo "=== $name: exit $rc"
    [ $rc -eq 0 ] || status=1
    [ "$figures" = - ] || summary+=(--figures "$figures")
    "${summary[@]}" --rc "$rc" --log "$OUT/$name.log" \
        --seconds "$(echo "$(date +%s.%N) $start" | awk '{print $1 - $2}')"
}

# The tests that need a GPU: test_cuda_*.py (but the emulated and compile ones, which run
# here too) and the cases of the `backend` fixture (tests/conftest.py) whose id is "cuda",
# found with: grep -lE "def test_\w+\((.*, )?backend(,|\))" tests/*.py.  `-k cuda` keeps
# those cases and every test of a file whose name holds "cuda".
CUDA_TESTS=(tests/test_cuda_backend.py tests/test_cuda_availability.py tests/test_ragged_parity.py
            tests/test_dropout.py tests/test_numerical_safety.py tests/test_torch_equivalence.py)
PYTEST=(python3 -m pytest -v -rfEs -p no:cacheprovider)

stage environment 20 "$SCRATCH/environment.json" \
    bash -c 'nvidia-smi; python3 benchmarks/gpu_environment.py "$1"' environment \
    "$SCRATCH/environment.json"
stage install 40 - python3 -m pip install -q --no-deps --no-build-isolation --no-index -e .
stage test-cuda 120 "$SCRATCH/test-cuda.xml" \
    "${PYTEST[@]}" --junitxml="$SCRATCH/test-cuda.xml" -k cuda "${CUDA_TESTS[@]}"
stage test-parity 75 "$SCRATCH/test-parity.xml" \
    "${PYTEST[@]}" --junitxml="$SCRATCH/test-parity.xml" tests/test_backend_parity.py
stage benchmark 140 "$OUT/gpu_epoch.json" python3 benchmarks/gpu_epoch.py "$OUT/gpu_epoch.json"
stage accuracy 45 "$SCRATCH/accuracy.json" \
    python3 benchmarks/gpu_accuracy.py "$SCRATCH/accuracy.json" --epochs 2
echo "=== summary ($SUMMARY):"
python3 benchmarks/gpu_check_summary.py finish "$SUMMARY"
exit $status
