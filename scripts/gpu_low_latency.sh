#!/usr/bin/env bash
# GPU checks of the NVSHMEM low-latency kernels, from the repository root on a GPU machine:
#   build with NVSHMEM, the NVSHMEM heap test, tests/gpu/test_low_latency.py (EP2/4/8 on one GPU under
#   MPS), scripts/bench_low_latency.py (EP2). Logs go to $OUT (or /tmp/gpu_ll); a summary is printed last.
#   STEPS=build,heap,test,bench,soak (default; add sanitize for scripts/sanitize_low_latency.py, which
#   runs before MPS starts and needs two GPUs); TEST_ARGS / BENCH_ARGS / SOAK_ARGS pass extra arguments
#   (the soak: scripts/soak_low_latency.py, 10^4 rounds at EP2 by default).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
source scripts/mps.sh
OUT=${OUT:-/tmp/gpu_ll}
mkdir -p "$OUT"
STEPS=${STEPS:-build,heap,test,bench,soak}
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-16}
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
step() {  # step NAME SECONDS COMMAND...: run under a timeout, log to $OUT/NAME.log, record status and seconds
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "=== $name: $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  printf '%-10s rc=%-3s %4ss\n' "$name" "$rc" "$((SECONDS - start))" >>"$SUMMARY"
  return $rc
}
want() { [[ ",$STEPS," == *",$1,"* ]]; }
trap mps_stop EXIT

if want build; then
  rm -rf build deepep_megatron/_C*.so
  step build 300 env DEEPEP_MEGATRON_BUILD_CUDA=1 DEEPEP_MEGATRON_NVSHMEM=1 python3 setup.py build_ext --inplace ||
    { cat "$SUMMARY"; exit 1; }
  step import 60 python3 -c 'import deepep_megatron._C as c; print("nvshmem", c.HAS_NVSHMEM, "ll bytes", c.low_latency_layout_bytes(128, 7168, 2, 64))' ||
    { cat "$SUMMARY"; exit 1; }
fi
if want sanitize; then
  step sanitize 600 python3 scripts/sanitize_low_latency.py || true
fi
mps_start
# shellcheck disable=SC2086  # the *_ARGS are lists of flags
{
  want heap && step heap 90 python3 -m pytest -q -x tests/gpu/test_nvshmem_heap.py -rs -p no:cacheprovider
  want test && step test "${TEST_TIMEOUT:-240}" python3 -m pytest -q -s tests/gpu/test_low_latency.py -rs -p no:cacheprovider ${TEST_ARGS:-}
  want bench && step bench "${BENCH_TIMEOUT:-150}" python3 scripts/bench_low_latency.py --out "$OUT/bench.md" ${BENCH_ARGS:-}
  want soak && step soak "${SOAK_TIMEOUT:-600}" python3 scripts/soak_low_latency.py --out "$OUT/soak.md" ${SOAK_ARGS:---ranks 2 --rounds 10000}
} || true
echo "=== summary"
cat "$SUMMARY"
[[ -f $OUT/bench.md ]] && cat "$OUT/bench.md"
[[ -f $OUT/soak.md ]] && cat "$OUT/soak.md"
