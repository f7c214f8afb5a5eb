#!/usr/bin/env bash
# Profile training steps N..M under Nsight Systems and print the NVTX range table.
#
#   scripts/profile_nsys.sh [--out DIR] [--steps N:M] [--ranks LIST] -- COMMAND [ARGS...]
#
# COMMAND is the pretraining entry (or anything that calls torch.cuda.profiler.start/stop), e.g.
#   scripts/profile_nsys.sh --steps 5:8 -- torchrun --nproc-per-node 8 -m deepep_megatron.pretrain ...
#   srun scripts/profile_nsys.sh --ranks 0,8 -- python -m deepep_megatron.pretrain ...   # per rank
# The script appends `--profile --profile-step-start N --profile-step-end M` to COMMAND (unless it
# already has --profile), so the entry calls cudaProfilerStart at step N and cudaProfilerStop after
# step M; nsys captures only that window (--capture-range=cudaProfilerApi) and lets training go on
# (--capture-range-end=stop). Traces: cuda, nvtx (the deepep/* and moe/* ranges), osrt.
#
# Run per rank (under srun: RANK/SLURM_PROCID set), only ranks in --ranks (default 0) are profiled;
# the others run COMMAND as is (a profile of every rank of a big job is mostly noise and gigabytes).
# Wrapping torchrun instead profiles all its local ranks into one report.
#
# Output: DIR/<name>.nsys-rep, DIR/<name>_nvtx_sum.csv and the table on stdout, where name is
# profile_rank<R> (or profile when no rank is known).
#
# Without nsys (our GPU machines and CI lack it) this fails with a clear message; the same flags
# then write a torch.profiler Chrome trace, summarised by scripts/trace_summary.py:
#   python -m deepep_megatron.pretrain ... --profile --profile-step-start 5 --profile-step-end 8 \
#       --profile-dir DIR && python scripts/trace_summary.py DIR
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-2}"; }

out_dir=${PROFILE_DIR:-nsys_profiles}
steps=${PROFILE_STEPS:-5:8}
ranks=${PROFILE_RANKS:-0}
while [[ $# -gt 0 ]]; do
    case $1 in
        --out) out_dir=$2; shift 2 ;;
        --steps) steps=$2; shift 2 ;;
        --ranks) ranks=$2; shift 2 ;;
        -h|--help) usage 0 ;;
        --) shift; break ;;
        *) echo "profile_nsys.sh: unknown option $1 (the command goes after --)" >&2; usage ;;
    esac
done
[[ $# -gt 0 ]] || { echo "profile_nsys.sh: no command given after --" >&2; usage; }
if [[ ! $steps =~ ^([0-9]+):([0-9]+)$ ]] || (( BASH_REMATCH[1] > BASH_REMATCH[2] )); then
    echo "profile_nsys.sh: --steps must be N:M with N <= M, got '$steps'" >&2; exit 2
fi
step_start=${BASH_REMATCH[1]} step_end=${BASH_REMATCH[2]}

cmd=("$@")
if [[ " ${cmd[*]} " != *" --profile "* ]]; then
    cmd+=(--profile --profile-step-start "$step_start" --profile-step-end "$step_end")
fi

rank=${RANK:-${SLURM_PROCID:-}}
if [[ -n $rank && $ranks != all && ",$ranks," != *",$rank,"* ]]; then
    exec "${cmd[@]}"  # not a profiled rank: run unchanged (it still calls cudaProfilerStart: harmless)
fi

if ! command -v nsys >/dev/null 2>&1; then
    cat >&2 <<EOF
profile_nsys.sh: nsys (Nsight Systems CLI) is not on PATH.
  Install it (https://developer.nvidia.com/nsight-systems; the CUDA toolkit's nsight-systems package),
  or profile without it: run the command with --profile --profile-dir DIR (a torch.profiler trace
  per rank) and summarise with: python scripts/trace_summary.py DIR
EOF
    exit 127
fi

mkdir -p "$out_dir"
name=profile${rank:+_rank$rank}
report=$out_dir/$name
nsys profile \
    --capture-range=cudaProfilerApi --capture-range-end=stop \
    -t cuda,nvtx,osrt --sample=none --cpuctxsw=none \
    --force-overwrite=true -o "$report" \
    "${cmd[@]}"

# nvtx_sum is the report's name since nsys 2023.x; older releases call it nvtxsum.
for rep in nvtx_sum nvtxsum; do
    if nsys stats --report "$rep" --format csv --force-export=true \
            --output "$out_dir/${name}" "$report.nsys-rep" >/dev/null 2>&1; then
        echo "== NVTX ranges, steps $step_start..$step_end ($report.nsys-rep) =="
        nsys stats --report "$rep" --format column "$report.nsys-rep"
        exit 0
    fi
done
echo "profile_nsys.sh: nsys stats could not summarise $report.nsys-rep (no NVTX ranges captured? " \
     "did the command reach step $step_start and call torch.cuda.profiler.start?)" >&2
exit 1
