// Per-phase timing inside a kernel (issue 8: "a compile-time timing buffer"): compiled in
// only with -DMLA_PHASE_TIMING=1 (MLA_NVCC_FLAGS=-DMLA_PHASE_TIMING=1 at build time), so the
// production cubins carry none of it. One thread per role sums clock() intervals per phase
// in registers and adds them to a global once, at the end of the CTA: no printf, a call
// ptxas answers by serialising every wgmma of the kernel (C7510; row 4 lost its overlap so).
#pragma once
#include <stdint.h>

#ifndef MLA_PHASE_TIMING
#define MLA_PHASE_TIMING 0
#endif

#if MLA_PHASE_TIMING
// Per role (a kernel's own numbering, e.g. producer, consumer 0, consumer 1) 15 phase sums
// and a count; only timing builds define it, so its absence marks a production module.
extern "C" {
__device__ unsigned long long mla_phase_clock[3 * 16];
}
#endif

namespace mla {

template <int N>
struct PhaseClock {
#if MLA_PHASE_TIMING
    // The last mark lives in shared memory (`mark`, one word per warp: its lanes run in
    // step, and only lane 0's sums are kept): in a register, ptxas rematerialised it across
    // the wgmma issue by reading the clock again (its register was wanted for an
    // accumulator), and the time between the two reads was lost.
    volatile uint32_t* mark;
    uint32_t acc[N] = {};
    __device__ __forceinline__ static uint32_t now() {
        uint32_t c;
        asm volatile("mov.u32 %0, %%clock;\n" : "=r"(c)::"memory");
        return c;
    }
    __device__ __forceinline__ void start(uint32_t* slot) {
        mark = slot;
        *mark = now();
    }
    // Adds the time since the last mark to phase i (a constant) and marks now.
    __device__ __forceinline__ void lap(int i) {
        const uint32_t c = now();
        acc[i] += c - *mark;
        *mark = c;
    }
    __device__ __forceinline__ void add(int i, uint32_t v) { acc[i] += v; }
    // Adds this thread's sums to role `role`'s row of mla_phase_clock (its last slot counts
    // the threads that flushed), which the host reads and zeroes (Kernels::take_phase_clock).
    __device__ __forceinline__ void flush(int role) const {
        static_assert(N <= 15, "a role has 15 phases");
        for (int i = 0; i < N; ++i) atomicAdd(&mla_phase_clock[role * 16 + i], (unsigned long long)acc[i]);
        atomicAdd(&mla_phase_clock[role * 16 + 15], 1ull);
    }
#else
    __device__ __forceinline__ static uint32_t now() { return 0; }
    __device__ __forceinline__ void start(uint32_t*) {}
    __device__ __forceinline__ void lap(int) {}
    __device__ __forceinline__ void add(int, uint32_t) {}
    __device__ __forceinline__ void flush(int) const {}
#endif
};

}  // namespace mla
