#!/usr/bin/env bash
# GPU checks of the cuda backend, run on a GPU machine from the repository root:
#   scripts/gpu_ci.sh                     build, sanitizer, GPU tests, soak, benchmark (sanitizer and
#                                         soak also with the receive arena: the direct-write dispatch)
#   STEPS=build,test scripts/gpu_ci.sh    a subset (build, sanitize, test, soak, bench)
#   TESTS="tests/gpu/test_rail.py tests/gpu/test_internode.py" STEPS=build,test scripts/gpu_ci.sh
#                                         only these GPU tests (pytest paths and options; default tests/gpu)
#   BENCH_ARGS="--ranks 2 --sms 8,24" scripts/gpu_ci.sh
#   BUDGET_S=540 scripts/gpu_ci.sh        within one device call's limit: each step is cut at the
#                                         budget, and steps that no longer fit are listed as skipped
# Logs go to $OUT (or /tmp/gpu_ci); a short summary table is printed last.
#
# Order: build; the sanitizer and one-rank-per-GPU tests/benchmark without MPS; then MPS starts and
# the tests (and a benchmark with more ranks than GPUs) that put several ranks on one GPU run under
# it; MPS is stopped at the end. Exit status 1 when any step failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
source scripts/mps.sh
OUT=${OUT:-/tmp/gpu_ci}
mkdir -p "$OUT"
STEPS=${STEPS:-build,sanitize,test,soak,bench}
TESTS=${TESTS:-tests/gpu}  # pytest's paths and selection, e.g. TESTS="tests/gpu/test_rail.py tests/gpu/test_internode.py"
BUDGET_S=${BUDGET_S:-0}  # > 0: seconds for the whole run; a step gets what is left, none starts with < MIN_STEP_S
MIN_STEP_S=${MIN_STEP_S:-30}
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-16}
NUM_GPUS=$(nvidia-smi -L | wc -l)
BENCH_ARGS=${BENCH_ARGS:-"--ranks 2"}
# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
BENCH_UNDER_MPS=0 && needs_mps "$(ranks_in $BENCH_ARGS)" && BENCH_UNDER_MPS=1
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

FAILED=0
step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, record status and seconds
  local name=$1
  shift
  local start=$SECONDS
  local limit=()
  if ((BUDGET_S > 0)); then  # a device call has a hard limit: leave the summary room to print
    local left=$((BUDGET_S - SECONDS))
    if ((left < MIN_STEP_S)); then
      printf '%-22s skipped: %ss of BUDGET_S=%s left\n' "$name" "$left" "$BUDGET_S" >>"$SUMMARY"
      return 0
    fi
    limit=(timeout "$left")
  fi
  echo "=== $name: $*"
  "${limit[@]}" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 15 "$OUT/$name.log"
  printf '%-22s rc=%-3s %4ss\n' "$name" "$rc" "$((SECONDS - start))" >>"$SUMMARY"
  ((rc)) && FAILED=1
  return $rc
}
want() { [[ ",$STEPS," == *",$1,"* ]]; }

trap mps_stop EXIT

if want build; then
  rm -rf build deepep_megatron/_C*.so
  step build env DEEPEP_MEGATRON_BUILD_CUDA=1 DEEPEP_MEGATRON_NVSHMEM="${DEEPEP_MEGATRON_NVSHMEM:-1}" python3 setup.py build_ext --inplace || { cat "$SUMMARY"; exit 1; }
  step import python3 -c 'import deepep_megatron._C as c; print("extension ok, control bytes", c.CONTROL_BYTES)' ||
    { cat "$SUMMARY"; exit 1; }
fi

if want sanitize; then
  step sanitize timeout 300 python3 scripts/sanitize_intranode.py
  # the direct-write dispatch (receive arena): its kernels write into the peers' blocks
  step sanitize_arena env DEEPEP_MEGATRON_RECV_ARENA_BYTES=268435456 timeout 600 python3 scripts/sanitize_intranode.py
fi

if want test; then
  step test_no_mps python3 -m pytest -q -m gpu $TESTS -rs --timeout 320 -p no:cacheprovider
fi

if want bench && ((!BENCH_UNDER_MPS)); then
  step bench python3 scripts/bench_intranode.py $BENCH_ARGS --out "$OUT/bench_table.md"
fi

if want test || want soak || want bench; then
  mps_start
  if want test; then
    step test_mps env DEEPEP_MEGATRON_GPU_TESTS_ONLY_MPS=1 python3 -m pytest -q -m gpu $TESTS -rs --timeout 320 -p no:cacheprovider
  fi
  if want soak; then  # the randomized soak a kernel or runtime change must pass (10^4 rounds)
    step soak python3 scripts/soak_intranode.py --ranks 2 --rounds 10000 --backend cuda --out "$OUT/soak.md"
    step soak_arena python3 scripts/soak_intranode.py --ranks 2 --rounds 10000 --backend cuda --seed 2 \
      --recv-arena-bytes 1073741824 --out "$OUT/soak_arena.md"
    # node forwarding over 2 virtual nodes of 2, the NVLink leg on the kernels
    step soak_internode python3 scripts/soak_intranode.py --ranks 4 --ranks-per-node 2 --rounds 10000 --backend cuda \
      --seed 3 --out "$OUT/soak_internode.md"
    # the same over the NVSHMEM RDMA leg (needs the NVSHMEM build)
    step soak_internode_nvshmem python3 scripts/soak_intranode.py --ranks 4 --ranks-per-node 2 --rounds 10000 \
      --backend cuda --rdma-leg nvshmem --seed 5 --out "$OUT/soak_internode_nvshmem.md"
  fi
  if want bench && ((BENCH_UNDER_MPS)); then
    step bench python3 scripts/bench_intranode.py $BENCH_ARGS --out "$OUT/bench_table.md"
  fi
  if want bench; then  # node forwarding over 2 virtual nodes of 2 beside the intranode kernels at EP4
    step bench_internode python3 scripts/bench_internode.py --ranks 4 --ranks-per-node 2 --rdma-leg nvshmem --host-stages \
      --out "$OUT/bench_internode.md"
  fi
  mps_stop
fi

echo
echo "===== summary ($NUM_GPUS GPU(s): $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)) ====="
cat "$SUMMARY"
grep -hE "passed|failed|skipped|error" "$OUT"/test_*.log 2>/dev/null | tail -n 4
grep -hE "^(memcheck|racecheck):" "$OUT/sanitize.log" 2>/dev/null
grep -h "rounds in" "$OUT"/soak*.md 2>/dev/null
if [[ -f "$OUT/bench_table.md" ]]; then cat "$OUT/bench_table.md"; fi
if [[ -f "$OUT/bench_internode.md" ]]; then cat "$OUT/bench_internode.md"; fi
exit "$FAILED"
