// Tensor-core GEMV for decode batches of 1..16 sequences over resident repacked Q4_0R / Q8_0R weights.
//
// A block owns a tile of 16 rows of one matrix; its MMA_WARPS warps split the tile's quant blocks (32 values
// each) between them and add up their partial tiles in shared memory at the end. One warp step covers four quant
// blocks: lane (g = lane / 4, t = lane % 4) decodes block 4i + t of rows g and g + 8 into fp16 weights
// (code x scale, exact codes, one rounding) and feeds them to mma.m16n8k16 (fp16 in, fp32 accumulate) beside the
// activations of the same 32 positions. The order of a dot product over K is free, so a lane's k-slots take the
// values of its own quant block in the order they unpack (16 or 32 contiguous code bytes per row: aligned 16-byte
// loads), and the activation fragment is loaded in that same order. The batch is the MMA's n dimension: NT tiles
// of 8 sequences (B <= 8 * NT); rows of a batch beyond B are zeros and never written.
// MODE 0 writes y, MODE 1 adds into y (the residual), MODE 2 is the gated FFN (w0 gate, w1 up, n0 rows each):
// out_h[b, r] = fp16(silu(gate . x) * (up . x)). Up to three matrices with the same K share a launch (rows
// numbered one after another); every row count must be a multiple of 16.
#include "ggml_blocks.cuh"

#define MMA_WARPS 8  // ops.MMA_WARPS
// Blocks per SM the register budget is set for: three with one batch tile (the H100 sweep: a LLaMA-7B layer's
// four products at B = 1 in 68 us against 74 us at the compiler's choice), two with two (three would spill).
#define MMA_MIN_BLOCKS(NT) ((NT) == 1 ? 3 : 2)

__device__ __forceinline__ void mma_16816(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Quant block `blk` of a repacked row as 16 half2 weights in MMA step order: w[2s] holds the lane's k-slots
// (2t, 2t+1) of step s, w[2s + 1] its slots (2t + 8, 2t + 9).
template <int QT>
__device__ __forceinline__ void decode_block(const u8* __restrict__ row, int blk, int n_blk, u32* w) {
    if constexpr (QT == QT_Q4_0R) {
        const uint4 v = __ldg(reinterpret_cast<const uint4*>(row + (size_t)blk * 16));
        const u32 d2 = (u32)__ldg(reinterpret_cast<const u16*>(row + (size_t)n_blk * 16) + blk) * 0x10001u;
        const u32 q[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {  // bytes 4j..4j+3: values 4j..4j+3 (step 2j), 16+4j..16+4j+3 (step 2j+1)
            u32 lo0, lo1, hi0, hi1;
            q4_0_half2(q[j], lo0, lo1, hi0, hi1);
            w[4 * j] = hmul2(lo0, d2);
            w[4 * j + 1] = hmul2(lo1, d2);
            w[4 * j + 2] = hmul2(hi0, d2);
            w[4 * j + 3] = hmul2(hi1, d2);
        }
    } else {  // QT_Q8_0R: bytes 4j..4j+3 are values 4j..4j+3 (step j)
        const uint4* p = reinterpret_cast<const uint4*>(row + (size_t)blk * 32);
        const uint4 v0 = __ldg(p), v1 = __ldg(p + 1);
        const u32 d2 = (u32)__ldg(reinterpret_cast<const u16*>(row + (size_t)n_blk * 32) + blk) * 0x10001u;
        const u32 q[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
#pragma unroll
        for (int j = 0; j < 8; ++j) {  // signed byte b -> the half 1024 + (b + 128), minus 1152
            const u32 u = q[j] ^ 0x80808080u;
            w[2 * j] = hmul2(hsub2(__byte_perm(u, 0x64646464u, 0x4140), 0x64806480u), d2);
            w[2 * j + 1] = hmul2(hsub2(__byte_perm(u, 0x64646464u, 0x4342), 0x64806480u), d2);
        }
    }
}

// Index of the activation word (two halves) holding the values of step s, slots (2t, 2t+1); slots (2t+8, 2t+9)
// take the next word.
template <int QT>
__device__ __forceinline__ constexpr int x_word(int s) {
    return QT == QT_Q4_0R ? 8 * (s & 1) + 2 * (s >> 1) : 2 * s;
}

template <int QT, int NT, int MODE>
__global__ void __launch_bounds__(MMA_WARPS * 32, MMA_MIN_BLOCKS(NT))
gemv_mma(const u8* __restrict__ w0, const u8* __restrict__ w1, const u8* __restrict__ w2, int n0, int n1, int n2,
         int K, long long row_bytes, const u16* __restrict__ x, int B, float* y0, float* y1, float* y2,
         u16* __restrict__ out_h) {
    constexpr int NM = MODE == 2 ? 2 : 1;  // matrices per tile: gate and up, or one
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int row0 = blockIdx.x * 16, n = n0;
    const u8* mats[NM];
    float* y = y0;
    if constexpr (MODE == 2) {
        mats[0] = w0;
        mats[NM - 1] = w1;
    } else if (row0 < n0) {
        mats[0] = w0;
    } else if (row0 < n0 + n1) {
        mats[0] = w1; y = y1; n = n1; row0 -= n0;
    } else {
        mats[0] = w2; y = y2; n = n2; row0 -= n0 + n1;
    }
    const int n_blk = K / 32, groups = (n_blk + 3) / 4;
    float acc[NM][NT][4];
#pragma unroll
    for (int m = 0; m < NM; ++m)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[m][nt][c] = 0.f;

#pragma unroll 2
    for (int grp = warp; grp < groups; grp += MMA_WARPS) {
        const int blk = grp * 4 + t;
        const bool valid = blk < n_blk;
        u32 xw[NT][16];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const int b = nt * 8 + g;
            if (valid && b < B) {
                const uint4* xp = reinterpret_cast<const uint4*>(x + (size_t)b * K + (size_t)blk * 32);
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const uint4 v = __ldg(xp + i);
                    xw[nt][4 * i] = v.x; xw[nt][4 * i + 1] = v.y; xw[nt][4 * i + 2] = v.z; xw[nt][4 * i + 3] = v.w;
                }
            } else {
#pragma unroll
                for (int i = 0; i < 16; ++i) xw[nt][i] = 0u;
            }
        }
#pragma unroll
        for (int m = 0; m < NM; ++m) {
            u32 top[16], bottom[16];  // rows g and g + 8 of the tile
            if (valid) {
                decode_block<QT>(mats[m] + (size_t)(row0 + g) * row_bytes, blk, n_blk, top);
                decode_block<QT>(mats[m] + (size_t)(row0 + g + 8) * row_bytes, blk, n_blk, bottom);
            } else {
#pragma unroll
                for (int i = 0; i < 16; ++i) top[i] = bottom[i] = 0u;
            }
#pragma unroll
            for (int s = 0; s < 8; ++s) {
                const int xi = x_word<QT>(s);
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
                    mma_16816(acc[m][nt], top[2 * s], bottom[2 * s], top[2 * s + 1], bottom[2 * s + 1], xw[nt][xi],
                              xw[nt][xi + 1]);
            }
        }
    }

    // Sum the warps' partial tiles. Fragment element c of lane l: row (l / 4) + 8 (c / 2), column 2 (l % 4) + c % 2.
    __shared__ float part[MMA_WARPS][NM][NT * 128];
#pragma unroll
    for (int m = 0; m < NM; ++m)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int c = 0; c < 4; ++c) part[warp][m][nt * 128 + lane * 4 + c] = acc[m][nt][c];
    __syncthreads();
    for (int e = threadIdx.x; e < NT * 128; e += MMA_WARPS * 32) {
        const int l = (e & 127) >> 2, c = e & 3;
        const int r = row0 + (l >> 2) + 8 * (c >> 1), b = (e >> 7) * 8 + 2 * (l & 3) + (c & 1);
        if (b >= B) continue;
        float sum[NM];
#pragma unroll
        for (int m = 0; m < NM; ++m) {
            sum[m] = 0.f;
#pragma unroll
            for (int wi = 0; wi < MMA_WARPS; ++wi) sum[m] += part[wi][m][e];
        }
        if constexpr (MODE == 2) {
            const float gate = sum[0];
            out_h[(size_t)b * n + r] = f2h(gate / (1.f + __expf(-gate)) * sum[NM - 1]);
        } else if constexpr (MODE == 1) {
            y[(size_t)b * n + r] += sum[0];
        } else {
            y[(size_t)b * n + r] = sum[0];
        }
    }
}
