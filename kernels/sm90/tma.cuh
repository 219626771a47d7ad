// The Hopper data path: tensor-memory-accelerator (TMA) copies completing on shared-memory
// mbarriers, named barriers for a subset of the block, and the pipeline counter that the
// producer and the consumers of a ring of stages step through in the same order.
#pragma once
#include <stdint.h>

#include "mla_tma_map.cuh"

namespace mla {

__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Makes the initialised barriers visible to the async proxy (TMA) and the other threads.
__device__ __forceinline__ void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }

__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// One arrival that also announces `bytes` of TMA writes the phase must wait for.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ bool mbar_try_wait(uint32_t bar, uint32_t parity) {
    uint32_t done;
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.acquire.cta.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
    return done != 0;
}
// Waits until the phase of parity `parity` has completed. A fresh barrier counts its
// phase of parity 1 as completed, so a producer's first wait on an empty slot passes.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    while (!mbar_try_wait(bar, parity)) {
    }
}

// Thread block clusters: this CTA's rank and the cluster's size (1 for a launch without
// clusters), a barrier over all of the cluster's threads, and a barrier of another CTA.
__device__ __forceinline__ uint32_t cluster_rank() {
    uint32_t r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
    return r;
}
__device__ __forceinline__ uint32_t cluster_size() {
    uint32_t n;
    asm volatile("mov.u32 %0, %%cluster_nctarank;\n" : "=r"(n));
    return n;
}
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
// The shared::cluster address of the same offset as `addr` in CTA `rank` of the cluster.
__device__ __forceinline__ uint32_t cluster_addr(uint32_t addr, uint32_t rank) {
    uint32_t r;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(addr), "r"(rank));
    return r;
}
// An arrival on a barrier of any CTA of the cluster (`addr` from cluster_addr), with the
// default semantics (release, CTA scope): what it orders are this thread's waited-for
// wgmma reads, before the other CTA's TMA overwrites the stage. The reads have retired
// (wgmma_wait) before the arrive. Cluster scope on both sides (release.cluster here,
// acquire.cluster in the producer's wait) measured 15% slower on the clustered shapes
// (BENCHMARKS.md, 2026-12-03, row 16).
__device__ __forceinline__ void mbar_arrive_cluster(uint32_t addr) {
    asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];\n" ::"r"(addr) : "memory");
}

// L2 policy for data read once (the KV cache): evict it first.
__device__ __forceinline__ uint64_t l2_evict_first() {
    uint64_t pol;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(pol));
    return pol;
}

// L2 policy for data read again soon (q, read by every row tile and split): keep it.
__device__ __forceinline__ uint64_t l2_evict_last() {
    uint64_t pol;
    asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;\n" : "=l"(pol));
    return pol;
}

// 3-d tiled TMA load of one box at coordinates (c0, c1, c2) into shared memory at `dst`,
// completing `bytes` of the transaction on barrier `bar`.
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const TmaMap* map, int c0, int c1, int c2, uint32_t bar, uint64_t policy) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.L2::cache_hint"
        " [%0], [%1, {%2, %3, %4}], [%5], %6;\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar), "l"(policy)
        : "memory");
}
// The same box multicast to every CTA of the cluster in `mask` (sm_90a): it lands at the
// same offset in each one's shared memory and completes on the barrier at `bar`'s offset
// in each, so one L2 read feeds them all.
__device__ __forceinline__ void tma_load_3d_multicast(uint32_t dst, const TmaMap* map, int c0, int c1, int c2, uint32_t bar, uint16_t mask, uint64_t policy) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.multicast::cluster.L2::cache_hint"
        " [%0], [%1, {%2, %3, %4}], [%5], %6, %7;\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar), "h"(mask), "l"(policy)
        : "memory");
}
__device__ __forceinline__ void tma_prefetch_map(const TmaMap* map) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// Generic-proxy writes to shared memory ordered before later async-proxy (TMA, wgmma)
// accesses of the same bytes.
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Barrier over the first `threads` threads of the block (id 0 is __syncthreads').
template <int ID, int THREADS>
__device__ __forceinline__ void named_sync() {
    asm volatile("bar.sync %0, %1;\n" ::"n"(ID), "n"(THREADS) : "memory");
}

// Programmatic dependent launch: let the next kernel of the stream start its prologue,
// and wait for the previous one's memory before reading what it wrote.
__device__ __forceinline__ void pdl_launch_dependents() { asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory"); }
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }

// Moves registers between warpgroups (sm_90a): a producer warpgroup gives up what a
// consumer warpgroup then takes. Every warp of a warpgroup executes the same one.
template <int REGS>
__device__ __forceinline__ void regs_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(REGS)); }
template <int REGS>
__device__ __forceinline__ void regs_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(REGS)); }

// Position in a ring of N stages: the producer and every consumer step one of these
// through the same sequence of loads, so slot and phase always agree.
template <int N>
struct Ring {
    uint32_t i = 0;  // loads so far
    __device__ __forceinline__ int slot() const { return i % N; }
    __device__ __forceinline__ uint32_t phase() const { return (i / N) & 1; }
    __device__ __forceinline__ Ring next() const { return Ring{i + 1}; }
    __device__ __forceinline__ void step(int k = 1) { i += k; }
};

}  // namespace mla
