# Model configs, parallel layouts and precisions of every recipe: the one place they live.
# shellcheck shell=bash disable=SC2034  # the variables set here are read by launch.sh
# Sourced by recipes/launch.sh. `recipe_config NAME` sets
#   DEVICE       cpu | gpu
#   PRECISIONS   the precisions the recipe offers, the first is the default
#   MODEL_ARGS   architecture (layers, widths, attention, experts, router)
#   LAYOUT_ARGS  parallel layout and batch (TP/EP, micro/global batch)
#   TRAIN_ARGS   optimisation, data, dispatcher, logging, checkpoint interval
# `precision_args P` sets PRECISION_ARGS. The layouts assume the node counts in each recipe's
# #SBATCH header (8 GPUs per node); `DRY_RUN=1 NNODES=N bash recipes/X.sbatch` checks another.
#
# The "-like" models keep their namesakes' published widths, head and expert counts, top-k and
# vocabulary, on mock data. The entry (deepep_megatron/megatron/arguments.py) has no pipeline
# parallelism, grouped-query or multi-latent attention, SwiGLU/RMSNorm/RoPE, shared experts, dense
# first layers or group-limited routing yet, so each model says what waits for those flags; what
# is kept is what sets the communication (hidden size, expert count and width, top-k, tokens per
# step). Without PP the layouts use EP and the distributed optimizer to fit; `DRY_RUN=1` prints
# the memory per GPU.

# Shared by the GPU recipes: the deepep dispatcher, mock data (launch.sh swaps in DATA_PATH), a
# checkpoint every 100 iterations (what a requeue redoes at most), optimizer state sharded over
# data-parallel ranks.
_gpu_training() {
    TRAIN_ARGS=(
        --moe-token-dispatcher deepep --mock-data --seed 1234 --use-distributed-optimizer
        --train-iters "$1" --lr "$2" --min-lr "$(awk "BEGIN { print $2 / 10 }")"
        --lr-warmup-iters 100 --lr-decay-style cosine --weight-decay 0.1 --clip-grad 1.0
        --save-interval 100
    )
}

recipe_config() {
    case $1 in
    tiny_cpu)
        # A tiny MoE on CPU, 2 gloo ranks, EP=2 (smaller than the README's main job: docs/recipes.md); the loss falls within 30 steps.
        DEVICE=cpu PRECISIONS="fp32"
        MODEL_ARGS=(--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64
                    --num-experts 4 --moe-router-topk 2)
        LAYOUT_ARGS=(--tensor-model-parallel-size 1 --expert-model-parallel-size 2
                     --micro-batch-size 4 --global-batch-size 8)
        TRAIN_ARGS=(--moe-token-dispatcher deepep --mock-data --seed 1234
                    --train-iters 30 --lr 1e-3 --save-interval 10)
        ;;
    mixtral_8x7b)
        # Mixtral-8x7B: 32 layers, d=4096, 8 experts of width 14336, top-2, 32k vocabulary.
        # Waits for: --num-query-groups 8, --swiglu, --normalization RMSNorm, RoPE (base 1e6).
        # 16 nodes x 8 GPUs: EP=8 inside each node (NVLink), DP=128, experts sharded 16 ways.
        DEVICE=gpu PRECISIONS="bf16 fp8"
        MODEL_ARGS=(--num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336
                    --num-attention-heads 32 --seq-length 4096 --vocab-size 32000
                    --num-experts 8 --moe-router-topk 2)
        LAYOUT_ARGS=(--tensor-model-parallel-size 1 --expert-model-parallel-size 8
                     --micro-batch-size 1 --global-batch-size 512)
        _gpu_training 2000 3e-4
        ;;
    deepseek_v3)
        # DeepSeek-V3 widths: d=7168, 128 heads, 256 routed experts of width 2048, top-8, 129k
        # vocabulary; 8 layers instead of 61. Waits for: multi-latent attention, 1 shared expert,
        # dense first layers (ffn 18432), sigmoid group-limited routing (8 groups, top-4), MTP.
        # 8 nodes x 8 GPUs: EP=64 spans all nodes (the internode path), 4 experts per GPU.
        DEVICE=gpu PRECISIONS="bf16 fp8"
        MODEL_ARGS=(--num-layers 8 --hidden-size 7168 --num-attention-heads 128
                    --seq-length 4096 --vocab-size 129280
                    --num-experts 256 --moe-router-topk 8 --moe-ffn-hidden-size 2048)
        LAYOUT_ARGS=(--tensor-model-parallel-size 1 --expert-model-parallel-size 64
                     --micro-batch-size 1 --global-batch-size 512)
        _gpu_training 2000 2.2e-4
        ;;
    qwen3_moe)
        # Qwen3-30B-A3B: 48 layers, d=2048, 32 heads, 128 experts of width 768, top-8, 152k
        # vocabulary. Waits for: --num-query-groups 4, --kv-channels 128, --qk-layernorm, SwiGLU,
        # RMSNorm, RoPE. 2 nodes x 8 GPUs: EP=16 spans both nodes, 8 experts per GPU.
        DEVICE=gpu PRECISIONS="bf16 fp8"
        MODEL_ARGS=(--num-layers 48 --hidden-size 2048 --num-attention-heads 32
                    --seq-length 4096 --vocab-size 151936
                    --num-experts 128 --moe-router-topk 8 --moe-ffn-hidden-size 768)
        LAYOUT_ARGS=(--tensor-model-parallel-size 1 --expert-model-parallel-size 16
                     --micro-batch-size 1 --global-batch-size 256)
        _gpu_training 2000 3e-4
        ;;
    *)
        echo "models.sh: unknown recipe '$1' (tiny_cpu, mixtral_8x7b, deepseek_v3, qwen3_moe)" >&2
        return 1
        ;;
    esac
}

precision_args() {
    case $1 in
    fp32) PRECISION_ARGS=() ;;
    bf16) PRECISION_ARGS=(--bf16) ;;
    # Transformer Engine FP8: hybrid = e4m3 forward, e5m2 gradients. blockwise (128-channel
    # scales) is what the deepep dispatcher can send as FP8 as is; on Blackwell use FP8_RECIPE=mxfp8.
    fp8) PRECISION_ARGS=(--bf16 --transformer-impl transformer_engine --fp8-format hybrid
                         --fp8-recipe "${FP8_RECIPE:-blockwise}") ;;
    *) echo "models.sh: unknown precision '$1'" >&2; return 1 ;;
    esac
}
