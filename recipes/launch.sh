# Shared launcher of every recipe: sourced (never run) by recipes/*.sbatch after they set RECIPE.
# shellcheck shell=bash
#
#   sbatch recipes/<recipe>.sbatch [PRECISION] [extra pretraining flags...]
#   DRY_RUN=1 bash recipes/<recipe>.sbatch [PRECISION] [...]     # on a login node, no GPU, no SLURM
#
# PRECISION is one of the recipe's precisions (recipes/models.sh; default: the first one).
# Extra flags go last on the command line, so they override the recipe (argparse: last one wins).
#
# What it does, in order:
#   1. model + parallel layout from recipes/models.sh (the one place where configs live)
#   2. topology from SLURM: nodes, one task per GPU (per rank on CPU), MASTER_ADDR = first node
#   3. NCCL / NVSHMEM environment for InfiniBand clusters (GPU recipes), each documented below
#   4. a per-job run dir: runs/<job-name>-<job-id>/{checkpoints,logs}; the job id survives a
#      requeue, so a requeued job finds its checkpoints and resumes from the latest one
#   5. srun one task per rank with RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* (what torchrun would set)
#   6. near the time limit (SIGUSR1 from `#SBATCH --signal=B:USR1@...`) it requeues itself
#
# Environment knobs (all optional):
#   DRY_RUN=1        check the arguments and count parameters (DRY_RUN=print: show the command only)
#   NNODES           dry run: another node count than the #SBATCH header's
#   DEEPEP_RUN_ROOT  where run dirs go (default <repo>/runs); CKPT_DIR: resume another job's checkpoints
#   MASTER_PORT      rendezvous port (default 20000 + job id % 20000)
#   PROFILE=torch|nsys, PROFILE_STEPS=N:M (default 10:12), PROFILE_RANKS (nsys; default 0)
#   DATA_PATH        indexed dataset prefix(es) to train on instead of mock data
#   FP8_RECIPE       fp8 precision's TE recipe (default blockwise; mxfp8 on Blackwell)
#   DEEPEP_PYTHON    the Python interpreter (default: python3 from PATH), resolved once to its full
#                    path: the entry, the dry run and the logged command all use that one
#   ENTRY            the training command (default "$DEEPEP_PYTHON -m deepep_megatron.pretrain");
#                    it gets the Megatron-style flags

set -euo pipefail

_die() { echo "launch.sh: $*" >&2; exit 1; }
[[ ${BASH_SOURCE[0]} != "$0" ]] || _die "source this from a recipe (recipes/*.sbatch), do not run it"
[[ -n ${RECIPE:-} ]] || _die "the recipe must set RECIPE=<name> before sourcing launch.sh"

RECIPES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$RECIPES_DIR")
# shellcheck source=recipes/models.sh
source "$RECIPES_DIR/models.sh"

# ---- 1. model, layout, precision -----------------------------------------------------------------
recipe_config "$RECIPE"   # sets DEVICE, PRECISIONS, MODEL_ARGS, LAYOUT_ARGS, TRAIN_ARGS
PRECISION=${PRECISIONS%% *}
if [[ $# -gt 0 && $1 != -* ]]; then PRECISION=$1; shift; fi
[[ " $PRECISIONS " == *" $PRECISION "* ]] ||
    _die "recipe $RECIPE has precisions {${PRECISIONS// /,}}, not '$PRECISION'"
precision_args "$PRECISION"   # sets PRECISION_ARGS
EXTRA_ARGS=("$@")
# DATA_PATH="prefix [prefix...]": pre-tokenized indexed data instead of the recipe's mock data
# (the entry takes exactly one of the two).
if [[ -n ${DATA_PATH:-} ]]; then
    read -r -a _data <<<"$DATA_PATH"
    _kept=()
    for _a in "${TRAIN_ARGS[@]}"; do [[ $_a == --mock-data ]] || _kept+=("$_a"); done
    TRAIN_ARGS=("${_kept[@]}" --data-path "${_data[@]}")
fi

# ---- 2. topology --------------------------------------------------------------------------------
_header_value() {  # value of `#SBATCH --$1=V` in the recipe file (dry runs outside SLURM)
    sed -n "s/^#SBATCH[[:space:]]\{1,\}--$1=\([0-9]\{1,\}\).*/\1/p" "$0" | head -n1
}
if [[ -n ${SLURM_JOB_ID:-} && -z ${DRY_RUN:-} ]]; then
    NNODES=$SLURM_JOB_NUM_NODES
    RANKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-}
    [[ -n $RANKS_PER_NODE ]] || _die "the recipe must set #SBATCH --ntasks-per-node (one task per GPU)"
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    if [[ $DEVICE == gpu ]]; then
        gpus=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE##*:}}
        [[ -n $gpus && $gpus == "$RANKS_PER_NODE" ]] ||
            _die "one task per GPU: --ntasks-per-node=$RANKS_PER_NODE but ${gpus:-no} GPUs per node"
    fi
    JOB_ID=$SLURM_JOB_ID JOB_NAME=${SLURM_JOB_NAME:-$RECIPE}
else
    NNODES=${NNODES:-$(_header_value nodes)}
    RANKS_PER_NODE=${RANKS_PER_NODE:-$(_header_value ntasks-per-node)}
    [[ -n $NNODES && -n $RANKS_PER_NODE ]] ||
        _die "outside SLURM: $0 needs '#SBATCH --nodes=N' and '#SBATCH --ntasks-per-node=K' lines"
    MASTER_ADDR=127.0.0.1
    JOB_ID=local-$$ JOB_NAME=$RECIPE
fi
WORLD_SIZE=$((NNODES * RANKS_PER_NODE))
# One port per job id, so two jobs sharing a first node do not collide.
MASTER_PORT=${MASTER_PORT:-$((20000 + ${JOB_ID//[^0-9]/} % 20000))}
export MASTER_ADDR MASTER_PORT WORLD_SIZE

# ---- 3. environment -------------------------------------------------------------------------------
export PYTHONUNBUFFERED=1                      # log lines reach the job log as they happen
export PYTHONPATH=$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}   # the checkout, installed or not
if [[ $DEVICE == cpu ]]; then
    # Ranks share the node's cores: one thread each, or they fight over them.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
    # Every default below is `: ${X:=...}`: a site can export its own value before sbatch.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
    # Megatron needs in-order kernel issue on one hardware queue for TP/EP comm-compute overlap.
    : "${CUDA_DEVICE_MAX_CONNECTIONS:=1}"
    # NVLink multicast (NVLS) stays off: on shared/virtualised hosts a program using it can take the
    # host's GPUs out of service, and DeepEP's kernels do not need it. A site that owns its nodes
    # and wants NCCL's NVLS all-reduce may export NCCL_NVLS_ENABLE=1 before sbatch.
    : "${NCCL_NVLS_ENABLE:=0}" "${NVSHMEM_DISABLE_NVLS:=1}" "${TORCH_SYMM_MEM_DISABLE_MULTICAST:=1}"
    # A failed NCCL collective raises (and kills the job) instead of hanging until the time limit.
    : "${TORCH_NCCL_ASYNC_ERROR_HANDLING:=1}"
    : "${NCCL_DEBUG:=WARN}"
    # --- InfiniBand (site specific; unset = NCCL/NVSHMEM autodetect) ---
    # NCCL_IB_HCA=mlx5_0,mlx5_1,...   the compute NICs only (leave out storage/management NICs)
    # NCCL_SOCKET_IFNAME=ib0|eth0     interface for NCCL's TCP bootstrap
    # NCCL_IB_GID_INDEX=3             RoCE v2 only: the GID index of the RoCE v2 address
    # NCCL_IB_TIMEOUT=22              IB retransmit timeout exponent: large fabrics need > default
    : "${NCCL_IB_TIMEOUT:=22}"
    # NVSHMEM (DeepEP's internode and low-latency kernels). The Buffer sets these itself, so they
    # are not exported here: NVSHMEM_IB_ENABLE_IBGDA=1 (GPU-initiated RDMA, the low-latency path),
    # NVSHMEM_IBGDA_NUM_RC_PER_PE (= Buffer's num_qps_per_rank), NVSHMEM_QP_DEPTH, NVSHMEM_MAX_TEAMS,
    # NVSHMEM_CUMEM_GRANULARITY. The site may need:
    # NVSHMEM_ENABLE_NIC_PE_MAPPING=1 + NVSHMEM_HCA_PE_MAPPING="mlx5_0:1:2,..."  pin each GPU to its
    #                                 nearest NIC (PCIe switch) when autodetection picks wrong
    # NVSHMEM_IB_GID_INDEX=3          RoCE v2, as NCCL_IB_GID_INDEX
    # NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=ib0  interface of the unique-id bootstrap (as NCCL's)
    # IBGDA needs the nvidia_peermem module (or dma-buf) and, on older drivers,
    # `options nvidia NVreg_EnableStreamMemOPs=1 NVreg_RegistryDwords="PeerMappingOverride=1;"`.
    export CUDA_DEVICE_MAX_CONNECTIONS NCCL_NVLS_ENABLE NVSHMEM_DISABLE_NVLS \
        TORCH_SYMM_MEM_DISABLE_MULTICAST TORCH_NCCL_ASYNC_ERROR_HANDLING NCCL_DEBUG NCCL_IB_TIMEOUT
fi

# ---- 4. run dir, checkpoints, resume ----------------------------------------------------------------
RUN_DIR=${DEEPEP_RUN_ROOT:-$REPO_ROOT/runs}/$JOB_NAME-$JOB_ID
CKPT_DIR=${CKPT_DIR:-$RUN_DIR/checkpoints}
LOG_DIR=$RUN_DIR/logs
RESTART=${SLURM_RESTART_COUNT:-0}
LOG=$LOG_DIR/train.restart$RESTART.log
RUN_ARGS=(--save "$CKPT_DIR")
# A requeued job (or CKPT_DIR) with a checkpoint resumes from the latest one (the entry's tracker
# file names it, as in Megatron-LM).
RESUME=
if [[ -f $CKPT_DIR/latest_checkpointed_iteration.txt ]]; then
    RESUME=", resuming from $CKPT_DIR (iteration $(<"$CKPT_DIR/latest_checkpointed_iteration.txt"))"
    RUN_ARGS+=(--load "$CKPT_DIR")
fi

# PROFILE=torch: a torch.profiler trace per rank into the run dir (scripts/trace_summary.py reads
# them); PROFILE=nsys: each rank under scripts/profile_nsys.sh (rank 0 by default, PROFILE_RANKS).
PROFILE_STEPS=${PROFILE_STEPS:-10:12}
case ${PROFILE:-} in
    "") ;;
    torch) RUN_ARGS+=(--profile --profile-step-start "${PROFILE_STEPS%:*}" --profile-step-end "${PROFILE_STEPS#*:}"
                      --profile-dir "$RUN_DIR/profile") ;;
    nsys) ;;
    *) _die "PROFILE must be torch or nsys, got '$PROFILE'" ;;
esac

PYTHON=$(command -v "${DEEPEP_PYTHON:-python3}") ||
    _die "no Python interpreter '${DEEPEP_PYTHON:-python3}': set DEEPEP_PYTHON to the one deepep_megatron is installed in"
read -r -a ENTRY_CMD <<<"${ENTRY:-$PYTHON -m deepep_megatron.pretrain}"
FLAGS=("${MODEL_ARGS[@]}" "${LAYOUT_ARGS[@]}" "${TRAIN_ARGS[@]}" "${PRECISION_ARGS[@]}" "${RUN_ARGS[@]}"
       "${EXTRA_ARGS[@]}")
TRAIN_CMD=("${ENTRY_CMD[@]}" "${FLAGS[@]}")
if [[ ${PROFILE:-} == nsys ]]; then
    TRAIN_CMD=("$REPO_ROOT/scripts/profile_nsys.sh" --out "$RUN_DIR/nsys" --steps "$PROFILE_STEPS"
               --ranks "${PROFILE_RANKS:-0}" -- "${TRAIN_CMD[@]}")
fi

# ---- dry run: resolve and check the arguments on this machine, start nothing -------------------
if [[ -n ${DRY_RUN:-} ]]; then
    echo "recipe=$RECIPE precision=$PRECISION nodes=$NNODES ranks_per_node=$RANKS_PER_NODE world_size=$WORLD_SIZE"
    printf 'command:'; printf ' %q' "${TRAIN_CMD[@]}"; echo
    [[ $DRY_RUN != print ]] || exit 0   # DRY_RUN=print: the command only, no Python
    # The dry-run module takes the entry's own flags plus the world size it would run on.
    exec "$PYTHON" -m deepep_megatron.megatron.dry_run --world-size "$WORLD_SIZE" \
        "${FLAGS[@]}"
fi

# ---- 5. launch ------------------------------------------------------------------------------
mkdir -p "$CKPT_DIR" "$LOG_DIR"
printf '%q ' "${TRAIN_CMD[@]}" >"$RUN_DIR/command.restart$RESTART.sh"
echo "[$(date -Is)] job $JOB_ID restart $RESTART: $RECIPE/$PRECISION on $NNODES node(s) x $RANKS_PER_NODE" \
     "rank(s), master $MASTER_ADDR:$MASTER_PORT, log $LOG$RESUME" | tee -a "$LOG"

# Each task maps SLURM's ids to the variables torch.distributed's env:// init reads.
# --cpus-per-task is repeated: srun of SLURM 22.05-23.02 does not inherit it from sbatch, and a
# rank bound to one core starves its data loading and kernel launches.
# shellcheck disable=SC2016  # $SLURM_* must expand in each task, not here
srun --kill-on-bad-exit=1 --ntasks="$WORLD_SIZE" --ntasks-per-node="$RANKS_PER_NODE" \
    --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --label \
    bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; exec "$@"' \
    rank "${TRAIN_CMD[@]}" > >(tee -a "$LOG") 2>&1 &
SRUN_PID=$!

# ---- 6. requeue near the time limit --------------------------------------------------------------
# sbatch --signal=B:USR1@T sends USR1 to this script T seconds before the limit. Requeueing puts
# the job back in the queue under the same id (same run dir); SLURM then stops the current steps
# (SIGTERM, then SIGKILL after KillWait). The next start resumes from the latest checkpoint, so
# at most --save-interval iterations are redone.
# shellcheck disable=SC2317  # reached through the trap
_requeue() {
    echo "[$(date -Is)] time limit near: requeueing job $JOB_ID" | tee -a "$LOG"
    scontrol requeue "$JOB_ID" || echo "launch.sh: scontrol requeue failed (was --requeue set?)" >&2
}
trap _requeue USR1
# A trapped signal interrupts `wait`: wait again until srun is gone, then take its exit status
# (bash keeps the status of a reaped background job for a later `wait`).
while kill -0 "$SRUN_PID" 2>/dev/null; do wait "$SRUN_PID" || true; done
wait "$SRUN_PID" && rc=0 || rc=$?
echo "[$(date -Is)] job $JOB_ID restart $RESTART: training exited with $rc" | tee -a "$LOG"
exit "$rc"
