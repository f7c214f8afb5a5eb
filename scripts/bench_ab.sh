#!/usr/bin/env bash
# A/B benchmark of the intranode kernels: this tree against a baseline commit, built side by side and
# run alternately in one device session (run-to-run drift on a lent machine is as large as many
# changes, so only interleaved runs compare).
#
#   scripts/bench_ab.sh BASE_REV [bench_intranode.py args...]
#   ROUNDS=2 OUT=$OUT scripts/bench_ab.sh d0425ca --ranks 2 --sms 24,64 --shapes dsv3 --iters 20
#
# BASE_REV is unpacked with `git archive` into $AB_BASE_DIR (default .carry/ab_base-BASE_REV) when
# the checkout has git history; on a machine without it, unpack it there beforehand and carry the
# folder. The base runs its own copy of scripts/bench_intranode.py.
# With fewer GPUs than ranks the runs go under MPS (started and stopped here). Tables: $OUT/ab.md.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
source scripts/mps.sh
BASE_REV=${1:?usage: scripts/bench_ab.sh BASE_REV [bench_intranode.py args...]}
shift
OUT=${OUT:-/tmp/bench_ab}
ROUNDS=${ROUNDS:-2}
BASE_DIR=${AB_BASE_DIR:-$PWD/.carry/ab_base-$BASE_REV}  # one folder per revision: never a stale base
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT"

if [[ ! -f "$BASE_DIR/setup.py" ]]; then
  mkdir -p "$BASE_DIR"
  git archive "$BASE_REV" csrc deepep_megatron setup.py pyproject.toml scripts | tar -x -C "$BASE_DIR" ||
    { echo "bench_ab: cannot unpack $BASE_REV into $BASE_DIR" >&2; exit 2; }
fi
build() {  # build TREE: the extension in place, log in $OUT
  (cd "$1" && DEEPEP_MEGATRON_BUILD_CUDA=1 python3 setup.py build_ext --inplace >"$OUT/build_$2.log" 2>&1) ||
    { echo "bench_ab: build of $1 failed, see $OUT/build_$2.log" >&2; exit 1; }
}
build "$PWD" new
build "$BASE_DIR" base

trap mps_stop EXIT
needs_mps "$(ranks_in "$@")" && mps_start
: >"$OUT/ab.md"
for ((round = 1; round <= ROUNDS; round++)); do
  for side in new base; do
    tree=$PWD
    [[ $side == base ]] && tree=$BASE_DIR
    timeout 600 python3 "$tree/scripts/bench_intranode.py" "$@" --out "$OUT/${side}_$round.md" >"$OUT/${side}_$round.log" 2>&1
    # The base tree sits inside this checkout, so its script would label its table with our commit.
    [[ $side == base ]] && sed -i "s/ · commit [^·]* · / · commit $BASE_REV (base) · /" "$OUT/${side}_$round.md" 2>/dev/null
    { echo "### $side ($([[ $side == base ]] && echo "$BASE_REV" || echo this tree)), round $round"; echo
      cat "$OUT/${side}_$round.md" 2>/dev/null || tail -n 20 "$OUT/${side}_$round.log"; echo; } >>"$OUT/ab.md"
  done
done
cat "$OUT/ab.md"
