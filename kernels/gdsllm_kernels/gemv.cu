// Fused dequantize + matrix-vector product for decode (batch 1..8), written for memory bandwidth.
//
// Each warp owns R rows; its lanes walk the rows' 32-value chunks (lane, lane + 32, ...), decode a chunk in
// registers and multiply it with the B activation vectors (fp16, read as 16-byte vectors), accumulating in fp32.
// Weights are read once, coalesced across the warp; activations are tiny and stay in L1/L2.
//
// Up to three matrices with the same K can share one launch (Q, K and V; gate and up): their rows are numbered
// one after another. MODE 0 writes y, MODE 1 adds into y (the residual), MODE 2 is the gated FFN: w0 = gate,
// w1 = up (n0 rows each), out_h[b, r] = silu(gate . x) * (up . x) in fp16.
#include "ggml_blocks.cuh"

#define WARPS 4

template <int B>
__device__ __forceinline__ void dot_chunk(const float* w, const u16* __restrict__ x, int K, int c, float* acc) {
#pragma unroll
    for (int b = 0; b < B; ++b) {
        const uint4* xv = reinterpret_cast<const uint4*>(x + (size_t)b * K + (size_t)c * 32);
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            uint4 v = __ldg(xv + i);
            const u32 words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                s = fmaf(w[8 * i + 2 * k], h2f((u16)(words[k] & 0xFFFFu)), s);
                s = fmaf(w[8 * i + 2 * k + 1], h2f((u16)(words[k] >> 16)), s);
            }
        }
        acc[b] += s;
    }
}

// Packed-half FMA for the opt-in fast path.
__device__ __forceinline__ u32 hfma2(u32 a, u32 b, u32 c) {
    u32 d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

__device__ __forceinline__ float half2_sum(u32 v) { return h2f((u16)(v & 0xFFFFu)) + h2f((u16)(v >> 16)); }

// Chunk dot products. Every type decodes the chunk to fp32 and accumulates in fp32. Opt-in (FAST), Q4_0 codes
// turn into exact fp16 values with integer ops alone (the half 0x6400 | code is 1024 + code) and the hot loop
// runs on packed-half FMAs: products are summed in fp16 over 8 values (|partial| <= 64 * max|x|, so activations
// beyond ~1000 overflow), then in fp32, and the block scale is applied in fp32. (The same for Q8_0 gave no
// measurable gain and overflows with its +-127 codes, so it was dropped.)
// w[m]: half2 weights for values (2m, 2m+1) of the chunk, m < 16; d: the block scale.
template <int B>
__device__ __forceinline__ void half2_dot(const u32* w, float d, const u16* __restrict__ x, int K, int c, float* acc) {
#pragma unroll
    for (int b = 0; b < B; ++b) {
        const uint4* xv = reinterpret_cast<const uint4*>(x + (size_t)b * K + (size_t)c * 32);
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            uint4 v = __ldg(xv + i);
            u32 part = hfma2(w[4 * i], v.x, 0u);
            part = hfma2(w[4 * i + 1], v.y, part);
            part = hfma2(w[4 * i + 2], v.z, part);
            part = hfma2(w[4 * i + 3], v.w, part);
            s += half2_sum(part);
        }
        acc[b] = fmaf(d, s, acc[b]);
    }
}

template <int QT, int B, bool FAST>
__device__ __forceinline__ void chunk_dot(const u8* __restrict__ row, int c, const u16* __restrict__ x, int K,
                                          float* acc) {
    if constexpr (FAST && (QT == QT_Q4_0 || QT == QT_Q4_0R)) {
        u32 q[4];
        float d;
        if constexpr (QT == QT_Q4_0) {
            const u8* blk = row + (size_t)c * 18;
#pragma unroll
            for (int i = 0; i < 4; ++i) q[i] = ld_u32_a2(blk + 2 + 4 * i);
            d = ld_half(blk);
        } else {
            const uint4 v = __ldg(reinterpret_cast<const uint4*>(row + (size_t)c * 16));
            q[0] = v.x; q[1] = v.y; q[2] = v.z; q[3] = v.w;
            d = ld_half(row + (size_t)(K / 32) * 16 + 2 * c);
        }
        u32 w[16];
#pragma unroll
        for (int i = 0; i < 4; ++i) q4_0_half2(q[i], w[2 * i], w[2 * i + 1], w[8 + 2 * i], w[8 + 2 * i + 1]);
        half2_dot<B>(w, d, x, K, c, acc);
    } else {
        float w[32];
        decode32<QT>(row, c, K / 32, w);
        dot_chunk<B>(w, x, K, c, acc);
    }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

template <int QT, int B, int R, int MODE, bool FAST>
__global__ void __launch_bounds__(WARPS * 32)
gemv(const u8* __restrict__ w0, const u8* __restrict__ w1, const u8* __restrict__ w2, int n0, int n1, int n2,
     int K, long long row_bytes, const u16* __restrict__ x, float* y0, float* y1, float* y2,
     u16* __restrict__ out_h) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int first = (blockIdx.x * WARPS + warp) * R;
    const int n_rows = MODE == 2 ? n0 : n0 + n1 + n2;
    if (first >= n_rows) return;
    const int chunks = K / 32;
    constexpr int M = MODE == 2 ? 2 * R : R;  // row dots per warp
    const u8* rows[M];
    float acc[M][B];
#pragma unroll
    for (int m = 0; m < M; ++m) {
        int r = first + (m % R);
        if (r >= n_rows) r = n_rows - 1;  // duplicate work on the tail, never written
        const u8* base;
        if (MODE == 2) {
            base = (m < R ? w0 : w1) + (size_t)r * row_bytes;
        } else if (r < n0) {
            base = w0 + (size_t)r * row_bytes;
        } else if (r < n0 + n1) {
            base = w1 + (size_t)(r - n0) * row_bytes;
        } else {
            base = w2 + (size_t)(r - n0 - n1) * row_bytes;
        }
        rows[m] = base;
#pragma unroll
        for (int b = 0; b < B; ++b) acc[m][b] = 0.f;
    }
#pragma unroll 2
    for (int c = lane; c < chunks; c += 32) {
#pragma unroll
        for (int m = 0; m < M; ++m) chunk_dot<QT, B, FAST>(rows[m], c, x, K, acc[m]);
    }
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int b = 0; b < B; ++b) acc[m][b] = warp_sum(acc[m][b]);
    if (lane != 0) return;
#pragma unroll
    for (int m = 0; m < R; ++m) {
        const int r = first + m;
        if (r >= n_rows) break;
#pragma unroll
        for (int b = 0; b < B; ++b) {
            if (MODE == 2) {
                const float g = acc[m][b], u = acc[R + m][b];
                out_h[(size_t)b * n0 + r] = f2h(g / (1.f + __expf(-g)) * u);
            } else {
                float* y;
                int n, rr;
                if (r < n0) { y = y0; n = n0; rr = r; }
                else if (r < n0 + n1) { y = y1; n = n1; rr = r - n0; }
                else { y = y2; n = n2; rr = r - n0 - n1; }
                if (MODE == 1) y[(size_t)b * n + rr] += acc[m][b];
                else y[(size_t)b * n + rr] = acc[m][b];
            }
        }
    }
}
