// Probe (issue 9): why a decode that starts on an idle GPU costs the ws kernel ~10 us more
// than one queued behind other work. Three suspects, measured apart:
//  (1) the SM clock ramps up after the device idles: a spin kernel records, every 2000 SM
//      cycles, the global timer; ns per window gives the clock over the kernel's first 200 us;
//  (2) the launch itself: a kernel of fixed cycles, with 0 or 227 KiB of dynamic shared memory
//      (the ws kernel's carveout), timed by events after an idle gap or behind a fill kernel;
//  (3) the memory side: a kernel that streams 256 MiB, timed after an idle gap, behind a spin
//      kernel (SMs busy, memory idle) or behind another streaming kernel.
// Build and run there: nvcc -O2 -arch=sm_90a -o /tmp/idle_start scripts/probes/idle_start.cu && /tmp/idle_start
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>
#include <cuda_runtime.h>

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { printf("CUDA %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); return 1; } } while (0)

constexpr int WINDOWS = 160, WINDOW_CLK = 2000;

__device__ unsigned long long gtimer() { unsigned long long t; asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t)); return t; }

// Every CTA spins; CTA 0's thread 0 records the global timer at each window's end.
// The launches' dynamic shared memory is reserved, not touched.
__global__ void ramp(unsigned long long* ts) {
    long long c0 = clock64();
    for (int w = 0; w <= WINDOWS; ++w) {
        while (clock64() - c0 < (long long)w * WINDOW_CLK) {}
        if (blockIdx.x == 0 && threadIdx.x == 0) ts[w] = gtimer();
    }
}

__global__ void spin(long long cycles) {
    long long c0 = clock64();
    while (clock64() - c0 < cycles) {}
}

// Sums 16-byte words of a buffer (grid-stride), so the read cannot be skipped.
__global__ void stream(const int4* src, size_t n, int* sink) {
    int acc = 0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const int4 v = src[i];
        acc ^= v.x + v.y + v.z + v.w;
    }
    if (acc == 0x12345678) *sink = acc;
}

int main() {
    int sms = 0;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    const int big = 227 * 1024;
    CK(cudaFuncSetAttribute(ramp, cudaFuncAttributeMaxDynamicSharedMemorySize, big));
    CK(cudaFuncSetAttribute(spin, cudaFuncAttributeMaxDynamicSharedMemorySize, big));
    unsigned long long* d_ts;
    CK(cudaMalloc(&d_ts, (WINDOWS + 1) * 8));
    std::vector<unsigned long long> ts(WINDOWS + 1);
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    for (int i = 0; i < 20; ++i) spin<<<sms, 128>>>(200000);  // warm up
    CK(cudaDeviceSynchronize());
    const auto busy = [&] { spin<<<sms, 128>>>(45000); };  // ~25 us on every SM, no memory

    // (1) the clock over the first WINDOWS * 2000 cycles, by what came before.
    const char* cases[] = {"back-to-back (behind 25 us of spin)", "after 2 ms idle", "after 20 ms idle", "after 200 ms idle"};
    const int idle_us[] = {0, 2000, 20000, 200000};
    for (int c = 0; c < 4; ++c) {
        double mhz[WINDOWS] = {};
        const int reps = 5;
        for (int r = 0; r < reps; ++r) {
            CK(cudaDeviceSynchronize());
            if (idle_us[c]) std::this_thread::sleep_for(std::chrono::microseconds(idle_us[c]));
            else busy();
            ramp<<<sms, 128, big>>>(d_ts);
            CK(cudaGetLastError());
            CK(cudaDeviceSynchronize());
            CK(cudaMemcpy(ts.data(), d_ts, ts.size() * 8, cudaMemcpyDeviceToHost));
            for (int w = 0; w < WINDOWS; ++w) mhz[w] += WINDOW_CLK * 1e3 / double(ts[w + 1] - ts[w]) / reps;
        }
        printf("clock %-38s", cases[c]);
        const int marks[] = {0, 1, 2, 4, 8, 16, 32, 64, 128, WINDOWS - 1};
        for (int m : marks) printf(" w%d %.0f", m, mhz[m]);
        printf(" MHz (window %d clk)\n", WINDOW_CLK);
    }

    // Event time of `run` (a launch) after `prep` (an idle gap, a predecessor), 15 times;
    // prints the median, min and max. A failed CUDA call is printed and ends the probe.
    const auto timed = [&](const char* what, auto prep, auto run) -> bool {
        const auto ok = [&](cudaError_t e) {
            if (e != cudaSuccess) printf("CUDA %s in '%s'\n", cudaGetErrorString(e), what);
            return e == cudaSuccess;
        };
        std::vector<float> ms;
        for (int r = 0; r < 15; ++r) {
            if (!ok(cudaDeviceSynchronize())) return false;
            prep();
            if (!ok(cudaEventRecord(e0))) return false;
            run();
            if (!ok(cudaGetLastError()) || !ok(cudaEventRecord(e1)) || !ok(cudaEventSynchronize(e1))) return false;
            float t;
            if (!ok(cudaEventElapsedTime(&t, e0, e1))) return false;
            ms.push_back(t);
        }
        std::sort(ms.begin(), ms.end());
        printf("%-62s median %.2f us (min %.2f, max %.2f)\n", what, ms[ms.size() / 2] * 1e3, ms.front() * 1e3, ms.back() * 1e3);
        return true;
    };
    const auto idle = [] { std::this_thread::sleep_for(std::chrono::microseconds(2000)); };
    char what[96];

    // (2) a fixed 40000-cycle kernel's event time, by shared memory and what came before.
    for (int smem : {0, big}) {
        const auto run = [&] { spin<<<sms, 128, smem>>>(40000); };
        snprintf(what, sizeof what, "launch smem %6d B behind a spin kernel", smem);
        if (!timed(what, busy, run)) return 1;
        snprintf(what, sizeof what, "launch smem %6d B after 2 ms idle", smem);
        if (!timed(what, idle, run)) return 1;
        snprintf(what, sizeof what, "launch smem %6d B after 2 ms idle + a spin of the same smem", smem);
        if (!timed(what, [&] { idle(); spin<<<sms, 128, smem>>>(45000); }, run)) return 1;
    }

    // (3) 256 MiB streamed, by what came before.
    const size_t words = (256u << 20) / 16;
    int4* src;
    int* sink;
    CK(cudaMalloc(&src, words * 16));
    CK(cudaMalloc(&sink, 4));
    CK(cudaMemset(src, 1, words * 16));
    const auto stream_all = [&] { stream<<<sms * 8, 512>>>(src, words, sink); };
    const auto stream_32m = [&] { stream<<<sms * 8, 512>>>(src, words / 8, sink); };
    if (!timed("stream 256 MiB behind a 32 MiB stream", stream_32m, stream_all)) return 1;
    if (!timed("stream 256 MiB after 2 ms idle", idle, stream_all)) return 1;
    if (!timed("stream 256 MiB after 2 ms idle + a spin (no memory)", [&] { idle(); busy(); }, stream_all)) return 1;
    if (!timed("stream 256 MiB after 2 ms idle + a 32 MiB stream", [&] { idle(); stream_32m(); }, stream_all)) return 1;
    return 0;
}
