// Probe (run on the GPU machine): checks the wgmma shared-memory descriptors the decode
// kernel relies on, against a host product. K-major A/B with 128B swizzle, and an
// MN-major B (V read from the K tile) for both orders of (LBO, SBO).
//   nvcc -gencode arch=compute_90a,code=sm_90a -o /tmp/probe wgmma_layout.cu && /tmp/probe
#include <cuda_bf16.h>
#include <cstdio>
#include <cstdint>
#include <cmath>
#include <vector>

__device__ uint32_t swz(int row, int chunk) { return row * 128 + (((chunk) ^ (row & 7)) << 4); }

__device__ uint64_t desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)(lbo >> 4) << 16) | ((uint64_t)(sbo >> 4) << 32) | (1ull << 62);
}

// A: 64x64 K-major (one 128B atom column). B1: 32x64 K-major. V: 64 (k) x 256 (n) in 4 regions of [64 x 128B].
__global__ void probe(const __nv_bfloat16* A, const __nv_bfloat16* B1, const __nv_bfloat16* V, float* D1, float* D2, int lbo, int sbo) {
    __shared__ __align__(1024) char sA[64 * 128];
    __shared__ __align__(1024) char sB[32 * 128];
    __shared__ __align__(1024) char sV[4 * 64 * 128];
    int t = threadIdx.x;
    for (int i = t; i < 64 * 8; i += 128) { int r = i / 8, c = i % 8; *(uint4*)(sA + swz(r, c)) = *(const uint4*)(A + r * 64 + c * 8); }
    for (int i = t; i < 32 * 8; i += 128) { int r = i / 8, c = i % 8; *(uint4*)(sB + swz(r, c)) = *(const uint4*)(B1 + r * 64 + c * 8); }
    for (int i = t; i < 64 * 32; i += 128) { int r = i / 32, c = i % 32; *(uint4*)(sV + (c / 8) * 8192 + swz(r, c % 8)) = *(const uint4*)(V + r * 256 + c * 8); }
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();
    uint32_t a = (uint32_t)__cvta_generic_to_shared(sA), b = (uint32_t)__cvta_generic_to_shared(sB), v = (uint32_t)__cvta_generic_to_shared(sV);
    float d[16];
    for (int i = 0; i < 16; ++i) d[i] = 0.f;
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
    for (int k = 0; k < 4; ++k) {
        uint64_t da = desc(a + k * 32, 16, 1024), db = desc(b + k * 32, 16, 1024);
        asm volatile("wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
                     "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, %16, %17, 1, 1, 1, 0, 0;\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                       "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
                     : "l"(da), "l"(db));
    }
    asm volatile("wgmma.commit_group.sync.aligned;\nwgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    int w = t / 32, g = (t % 32) / 4, t4 = t % 4;
    for (int i = 0; i < 16; ++i) {
        int n8 = i / 4, row = 16 * w + g + ((i & 2) ? 8 : 0), col = n8 * 8 + 2 * t4 + (i & 1);
        D1[row * 32 + col] = d[i];
    }
    // D2 = A (64x64) * V (64x256), V MN-major; four m64n64k16 column slices would also do,
    // but the kernel uses n256, so test that.
    float e[128];
    for (int i = 0; i < 128; ++i) e[i] = 0.f;
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
    for (int k = 0; k < 4; ++k) {
        uint64_t da = desc(a + k * 32, 16, 1024), dv = desc(v + k * 16 * 128, lbo, sbo);
#define R(i) "+f"(e[i])
        asm volatile("wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
                     "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"
                     "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,"
                     "%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95,"
                     "%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111,%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127}, "
                     "%128, %129, 1, 1, 1, 0, 1;\n"
                     : R(0),R(1),R(2),R(3),R(4),R(5),R(6),R(7),R(8),R(9),R(10),R(11),R(12),R(13),R(14),R(15),R(16),R(17),R(18),R(19),R(20),R(21),R(22),R(23),R(24),R(25),R(26),R(27),R(28),R(29),R(30),R(31),
                       R(32),R(33),R(34),R(35),R(36),R(37),R(38),R(39),R(40),R(41),R(42),R(43),R(44),R(45),R(46),R(47),R(48),R(49),R(50),R(51),R(52),R(53),R(54),R(55),R(56),R(57),R(58),R(59),R(60),R(61),R(62),R(63),
                       R(64),R(65),R(66),R(67),R(68),R(69),R(70),R(71),R(72),R(73),R(74),R(75),R(76),R(77),R(78),R(79),R(80),R(81),R(82),R(83),R(84),R(85),R(86),R(87),R(88),R(89),R(90),R(91),R(92),R(93),R(94),R(95),
                       R(96),R(97),R(98),R(99),R(100),R(101),R(102),R(103),R(104),R(105),R(106),R(107),R(108),R(109),R(110),R(111),R(112),R(113),R(114),R(115),R(116),R(117),R(118),R(119),R(120),R(121),R(122),R(123),R(124),R(125),R(126),R(127)
                     : "l"(da), "l"(dv));
    }
    asm volatile("wgmma.commit_group.sync.aligned;\nwgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    for (int i = 0; i < 128; ++i) {
        int n8 = i / 4, row = 16 * w + g + ((i & 2) ? 8 : 0), col = n8 * 8 + 2 * t4 + (i & 1);
        D2[row * 256 + col] = e[i];
    }
}

int main() {
    std::vector<__nv_bfloat16> A(64 * 64), B1(32 * 64), V(64 * 256);
    std::vector<float> fa(64 * 64), fb(32 * 64), fv(64 * 256);
    unsigned s = 12345;
    auto rnd = [&]() { s = s * 1664525u + 1013904223u; return ((s >> 8) % 2001) / 1000.f - 1.f; };
    for (int i = 0; i < 64 * 64; ++i) { A[i] = __float2bfloat16(rnd()); fa[i] = __bfloat162float(A[i]); }
    for (int i = 0; i < 32 * 64; ++i) { B1[i] = __float2bfloat16(rnd()); fb[i] = __bfloat162float(B1[i]); }
    for (int i = 0; i < 64 * 256; ++i) { V[i] = __float2bfloat16(rnd()); fv[i] = __bfloat162float(V[i]); }
    __nv_bfloat16 *dA, *dB, *dV; float *dD1, *dD2;
    cudaMalloc(&dA, A.size() * 2); cudaMalloc(&dB, B1.size() * 2); cudaMalloc(&dV, V.size() * 2);
    cudaMalloc(&dD1, 64 * 32 * 4); cudaMalloc(&dD2, 64 * 256 * 4);
    cudaMemcpy(dA, A.data(), A.size() * 2, cudaMemcpyHostToDevice);
    cudaMemcpy(dB, B1.data(), B1.size() * 2, cudaMemcpyHostToDevice);
    cudaMemcpy(dV, V.data(), V.size() * 2, cudaMemcpyHostToDevice);
    int combos[2][2] = {{8192, 1024}, {1024, 8192}};
    for (auto& c : combos) {
        probe<<<1, 128>>>(dA, dB, dV, dD1, dD2, c[0], c[1]);
        cudaError_t err = cudaDeviceSynchronize();
        if (err != cudaSuccess) { printf("launch error %s\n", cudaGetErrorString(err)); return 1; }
        std::vector<float> D1(64 * 32), D2(64 * 256);
        cudaMemcpy(D1.data(), dD1, D1.size() * 4, cudaMemcpyDeviceToHost);
        cudaMemcpy(D2.data(), dD2, D2.size() * 4, cudaMemcpyDeviceToHost);
        double e1 = 0, e2 = 0;
        for (int m = 0; m < 64; ++m) for (int n = 0; n < 32; ++n) { double r = 0; for (int k = 0; k < 64; ++k) r += fa[m * 64 + k] * fb[n * 64 + k]; e1 = fmax(e1, fabs(r - D1[m * 32 + n])); }
        for (int m = 0; m < 64; ++m) for (int n = 0; n < 256; ++n) { double r = 0; for (int k = 0; k < 64; ++k) r += fa[m * 64 + k] * fv[k * 256 + n]; e2 = fmax(e2, fabs(r - D2[m * 256 + n])); }
        printf("K-major QK^T max err %.3g | MN-major PV (lbo=%d, sbo=%d) max err %.3g\n", e1, c[0], c[1], e2);
    }
    return 0;
}
