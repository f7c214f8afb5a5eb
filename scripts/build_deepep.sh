#!/usr/bin/env bash
# DeepEP v1.2.1, the baseline of scripts/bench_vs_deepep.py: export its source, or build it in place.
#
#   scripts/build_deepep.sh --export [DIR]   (here, with the mirror) write the v1.2.1 source tree into DIR
#                                            (default .carry/DeepEP, git-ignored, so it can be carried)
#   scripts/build_deepep.sh [DIR]            (on the GPU machine) patch DIR/setup.py's include_dirs with the
#                                            CCCL headers, build in place, check `import deep_ep`; the last
#                                            line printed is the `export PYTHONPATH=...` to use
#
# Environment: DEEPEP_GIT_DIR (bare mirror, default /work/.mirror/deepseek-ai+DeepEP/repo), DEEPEP_TAG
# (v1.2.1), CCCL_DIR (default $CUDA_HOME/include/cccl, CUDA_HOME default /usr/local/cuda: NVSHMEM 3.4.5's
# headers include cuda/std/tuple, which g++ finds only there with CUDA 13), MAX_JOBS (8).
# NVSHMEM comes from the nvidia-nvshmem-cu13 wheel (DeepEP's setup.py finds it by itself).
# Exit status: 0 on success; 2 bad usage; 3 missing source; 4 setup.py not patchable; 5 build; 6 import.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEFAULT_DIR="$ROOT/.carry/DeepEP"
GIT_DIR_DEFAULT=/work/.mirror/deepseek-ai+DeepEP/repo
TAG=${DEEPEP_TAG:-v1.2.1}

die() {  # die STATUS MESSAGE
  echo "build_deepep: $2" >&2
  exit "$1"
}

export_source() {  # export_source DIR: the tagged tree, from the bare mirror, into DIR
  local dir=$1 git_dir=${DEEPEP_GIT_DIR:-$GIT_DIR_DEFAULT}
  git --git-dir="$git_dir" rev-parse --verify --quiet "$TAG^{commit}" >/dev/null ||
    die 3 "no tag $TAG in $git_dir (set DEEPEP_GIT_DIR to a DeepEP git dir)"
  mkdir -p "$dir"
  git --git-dir="$git_dir" archive "$TAG" | tar -x -C "$dir"
  [[ -f "$dir/setup.py" && -f "$dir/deep_ep/buffer.py" ]] || die 3 "export of $TAG into $dir has no setup.py / deep_ep/buffer.py"
  echo "$TAG $(git --git-dir="$git_dir" rev-parse "$TAG^{commit}")" >"$dir/.deepep_version"
  echo "exported DeepEP $TAG into $dir ($(du -sh "$dir" | cut -f1)); carry it, then run scripts/build_deepep.sh $dir on the GPU machine"
}

patch_setup() {  # patch_setup SETUP_PY CCCL: add CCCL to include_dirs once (idempotent)
  local setup=$1 cccl=$2
  python3 - "$setup" "$cccl" <<'EOF' || die 4 "could not add the CCCL include dir to $1 (see above)"
import sys

path, cccl = sys.argv[1], sys.argv[2]
text = open(path).read()
if cccl in text:
    print(f"setup.py already has {cccl} in include_dirs")
    sys.exit(0)
original = "include_dirs = ['csrc/']"
if text.count(original) != 1:
    print(f"setup.py: expected exactly one line `{original}` (DeepEP v1.2.1's), found {text.count(original)}", file=sys.stderr)
    sys.exit(1)
open(path, "w").write(text.replace(original, f"include_dirs = ['csrc/', {cccl!r}]"))
print(f"setup.py: include_dirs += {cccl}")
EOF
}

build() {  # build DIR: patch, build in place, import
  local dir
  dir=$(cd "$1" 2>/dev/null && pwd) || die 3 "no DeepEP source folder $1 (export it with: scripts/build_deepep.sh --export $1)"
  [[ -f "$dir/setup.py" && -d "$dir/deep_ep" ]] || die 3 "$dir has no setup.py and deep_ep/: not a DeepEP source tree"
  local cccl=${CCCL_DIR:-${CUDA_HOME:-/usr/local/cuda}/include/cccl}
  [[ -d "$cccl" ]] || echo "build_deepep: warning: $cccl does not exist; the host compile of NVSHMEM headers may fail" >&2
  patch_setup "$dir/setup.py" "$cccl"
  python3 -c 'import nvidia.nvshmem as m; print("NVSHMEM:", list(m.__path__)[0])' 2>/dev/null ||
    echo "build_deepep: warning: no nvidia-nvshmem wheel: DeepEP builds without internode/low-latency kernels" >&2
  local log="$dir/build_deepep.log" start=$SECONDS
  echo "building DeepEP in $dir (MAX_JOBS=${MAX_JOBS:-8}, log $log) ..."
  if ! (cd "$dir" && MAX_JOBS=${MAX_JOBS:-8} python3 setup.py build_ext --inplace) >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    die 5 "build failed after $((SECONDS - start)) s; full log: $log"
  fi
  echo "built in $((SECONDS - start)) s: $(cd "$dir" && ls deep_ep_cpp*.so)"
  # From /tmp, so only DIR (not this checkout, nor an installed deep_ep alias) provides deep_ep.
  (cd /tmp && PYTHONPATH="$dir" python3 -c '
import deep_ep, deep_ep_cpp, sys
if getattr(deep_ep, "PROVIDER", None) == "deepep_megatron":
    sys.exit("import deep_ep found the deepep_megatron alias, not this build")
print("import deep_ep ok:", deep_ep.__file__, "| SM90 features:", deep_ep.Buffer.is_sm90_compiled())
') || die 6 "the build does not import (see above)"
  echo "export PYTHONPATH=$dir\${PYTHONPATH:+:\$PYTHONPATH}"
}

case ${1:-} in
  --export) export_source "${2:-$DEFAULT_DIR}" ;;
  -h | --help) sed -n '2,16p' "$0" ;;
  -*) die 2 "unknown option $1 (use --export [DIR], DIR, or --help)" ;;
  *) build "${1:-$DEFAULT_DIR}" ;;
esac
