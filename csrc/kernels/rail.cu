// The rail exchange: the RDMA leg of node forwarding (backends/forwarding.py, backends/rail.py).
//
// Rank (home, local) sends send slab m (this call's packed rows for node m, written there by the
// caller) to receive slab `home` of the rank (m, local), for every other node m, and receives from
// each of them into its receive slab n (layout: deepep_megatron_layout.h, rail_layout).
//
// Who signals whom, for call q of the rail (every rank of the rail launches the same number of
// blocks B_q in call q; B may differ from call to call, as the operations' SM counts do):
//   1. block 0 first acks call q - 1: consumed[home] += 1 on every other node's rank of the rail
//      (the stream ran the caller's copy-out of the receive slabs before this kernel);
//   2. for each other node m, a block waits until consumed[m] >= q - 1 here (node m's rank has
//      taken the previous rows out of the slab this call overwrites), then puts its 1/B_q slice of
//      send slab m with nvshmemx_putmem_signal_nbi_block, the signal adding 1 to arrived[home] on
//      that rank (delivered after the slice); an empty slice adds the 1 alone;
//   3. block 0 waits until arrived[n] >= B_1 + ... + B_q (the host's running sum,
//      args.arrived_target) for every other node n (all of this call's rows are in), with acquire
//      loads; every block quiets its puts (the send slabs may be rewritten after the kernel).
// The kernel's end therefore orders the received rows before the caller's next work on the stream.
// Waits are bounded by ctx.timeout_ns, report a Diagnostic and raise the abort word, which stops
// the other waits of this rank.
#include <nvshmem.h>
#include <nvshmemx.h>

#include <stdexcept>
#include <string>

#include "diagnostic.cuh"
#include "launch.h"  // check_cuda
#include "ptx.cuh"
#include "rail.h"

namespace deepep_megatron {

namespace {

__device__ __forceinline__ uint32_t* rail_abort(const RailContext& ctx) {
  return reinterpret_cast<uint32_t*>(ctx.heap + kRailOffAbort);
}

__device__ __forceinline__ uint64_t* arrived(const RailContext& ctx, int node) {
  return reinterpret_cast<uint64_t*>(ctx.heap + kRailOffArrived) + node;
}

__device__ __forceinline__ uint64_t* consumed(const RailContext& ctx, int node) {
  return reinterpret_cast<uint64_t*>(ctx.heap + kRailOffConsumed) + node;
}

__device__ __forceinline__ int rail_pe(const RailContext& ctx, int node) { return node * ctx.ranks_per_node + ctx.local; }

// Spin until the u64 counter at `p` reaches `target`; false after a timeout (reported) or an abort.
__device__ bool wait_at_least(const RailContext& ctx, const uint64_t* p, uint64_t target, int code, int peer, int node) {
  uint64_t value = ld_acquire_sys_u64(p);
  if (value >= target) return true;
  const uint64_t start = global_timer_ns();
  for (uint32_t iter = 1;; ++iter) {
    value = ld_acquire_sys_u64(p);
    if (value >= target) return true;
    if ((iter & 63u) == 0u) {
      if (ld_volatile(rail_abort(ctx)) != 0u) return false;
      if (global_timer_ns() - start > ctx.timeout_ns) {
        // the channel field names the node waited for
        record_error(rail_abort(ctx), ctx.diagnostic, code, ctx.rank, peer, node, static_cast<int64_t>(target),
                     static_cast<int64_t>(value));
        return false;
      }
    }
  }
}

__global__ void __launch_bounds__(kRailThreads, 1) rail_exchange_kernel(RailContext ctx, RailExchangeArgs args) {
  __shared__ int ok;
  const int B = args.num_blocks, block = static_cast<int>(blockIdx.x);
  // 1. Ack the previous call's rows (one add per node and call).
  if (args.call > 1 && block == 0) {
    for (int n = threadIdx.x; n < ctx.num_nodes; n += blockDim.x) {
      if (n != ctx.home) nvshmemx_signal_op(consumed(ctx, ctx.home), 1, NVSHMEM_SIGNAL_ADD, rail_pe(ctx, n));
    }
  }
  if (threadIdx.x == 0) ok = 1;
  __syncthreads();
  // 2. This block's slice of every other node's slab, once that node took the previous rows.
  for (int step = 1; step < ctx.num_nodes; ++step) {
    const int m = (ctx.home + step) % ctx.num_nodes;  // a different first node per rank spreads the puts
    const int pe = rail_pe(ctx, m);
    if (threadIdx.x == 0 && ok) {
      ok = wait_at_least(ctx, consumed(ctx, m), args.call - 1, kWaitRailAck, pe, m) ? 1 : 0;
    }
    __syncthreads();
    if (!ok) break;
    const int64_t total = args.send_bytes[m];
    const int64_t slice = (total / 16 + B - 1) / B * 16;  // 16-byte multiples
    const int64_t begin = min(total, slice * block), end = min(total, begin + slice);
    const int64_t offset = ctx.layout.slab_bytes * m;
    uint8_t* src = ctx.heap + ctx.layout.off_send + offset;
    uint8_t* dst = ctx.heap + ctx.layout.off_recv + ctx.layout.slab_bytes * ctx.home;  // slab `home` on pe
    if (end > begin) {
      nvshmemx_putmem_signal_nbi_block(dst + begin, src + begin, static_cast<size_t>(end - begin),
                                       arrived(ctx, ctx.home), 1, NVSHMEM_SIGNAL_ADD, pe);
    } else if (threadIdx.x == 0) {
      nvshmemx_signal_op(arrived(ctx, ctx.home), 1, NVSHMEM_SIGNAL_ADD, pe);
    }
    __syncthreads();
  }
  // 3. Block 0: every other node's rows of this call are in.
  if (block == 0 && ok) {
    for (int n = threadIdx.x; n < ctx.num_nodes; n += blockDim.x) {
      if (n != ctx.home && !wait_at_least(ctx, arrived(ctx, n), args.arrived_target, kWaitRailData, rail_pe(ctx, n), n)) {
        break;
      }
    }
  }
  nvshmem_quiet();  // this block's puts are complete: the send slabs may be rewritten after the kernel
}

}  // namespace

void launch_rail_exchange(const RailContext& ctx, const RailExchangeArgs& args, cudaStream_t stream) {
  if (args.num_blocks < 1 || args.num_blocks > kRailMaxBlocks) {
    throw std::invalid_argument("rail exchange: num_blocks must be in 1.." + std::to_string(kRailMaxBlocks));
  }
  rail_exchange_kernel<<<args.num_blocks, kRailThreads, 0, stream>>>(ctx, args);
  check_cuda(cudaGetLastError(), "rail exchange launch");
}

}  // namespace deepep_megatron
