# shellcheck shell=bash
# Sourced by scripts/gpu_ci.sh and scripts/bench_ab.sh: the CUDA MPS daemon, for runs that put
# several ranks on one GPU (without it their processes time-slice the GPU and the kernels' peer
# waits crawl; tests/gpu/test_intranode.py skips such cases unless MPS runs).

mps_start() {
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mpslog
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  nvidia-cuda-mps-control -d && sleep 1
}

mps_stop() {  # safe to call when MPS was not started (callers also run it from an EXIT trap)
  if [[ -n "${CUDA_MPS_PIPE_DIRECTORY:-}" ]]; then
    echo quit | nvidia-cuda-mps-control
    sleep 1
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  fi
}

ranks_in() {  # ranks_in ARGS...: the value of --ranks N / --ranks=N among bench_intranode.py's args (default 2)
  local ranks=2
  while (($#)); do
    case $1 in
      --ranks) ranks=$2; shift ;;
      --ranks=*) ranks=${1#--ranks=} ;;
    esac
    shift
  done
  echo "$ranks"
}

needs_mps() {  # needs_mps RANKS: true when RANKS ranks outnumber this machine's GPUs
  (($(nvidia-smi -L | wc -l) < $1))
}
