// Memory-ordering and copy primitives of the kernels (PTX), nothing project-specific.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace deepep_megatron {

template <typename T>
__device__ __forceinline__ T* at(uint8_t* base, size_t offset) {
  return reinterpret_cast<T*>(base + offset);
}

__device__ __forceinline__ uint32_t ld_acquire_sys(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_release_sys(uint32_t* p, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// Add with release semantics at system scope (no result): a counter several writers bump.
__device__ __forceinline__ void red_release_sys_add(uint32_t* p, uint32_t v) {
  asm volatile("red.release.sys.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ uint64_t ld_acquire_sys_u64(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_release_sys_u64(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ uint32_t ld_volatile(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.volatile.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Read-only input (never written during the kernel): non-coherent path, no L1 allocation.
__device__ __forceinline__ int4 ld_input_int4(const int4* p) {
  int4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Ring slots are rewritten by peers from lap to lap: read them at L2 (never a stale L1 line).
__device__ __forceinline__ int4 ld_ring_int4(const int4* p) { return __ldcg(p); }

__device__ __forceinline__ void st_ring_int4(int4* p, const int4& v) { __stcg(p, v); }

// Programmatic dependent launch (sm_90). The primary kernel lets the kernel launched behind it with
// the programmatic-serialization attribute start early; a thread of that dependent kernel that
// must see the primary's results first waits for the primary to finish (its writes visible). Both
// are no-ops for kernels launched without the attribute.
__device__ __forceinline__ void pdl_launch_dependents() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }

__device__ __forceinline__ void pdl_wait_for_primary() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

// Named barrier for a group of warps of one block (id 1..15; 0 is __syncthreads).
__device__ __forceinline__ void group_barrier(int id, int num_threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(num_threads) : "memory");
}

}  // namespace deepep_megatron
