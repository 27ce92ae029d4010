// GGML block decoding shared by dequant.cu and gemv.cu.
//
// A row of a GGML tensor is a run of blocks exactly as GGUF stores them (ggml-common.h). Every type is decoded
// in chunks of 32 consecutive values: chunk c of a row is block c for the 32-value types and sub-block c % 8 of
// super-block c / 8 for the K-quants (QK_K = 256). The arithmetic follows ggml's dequantize_row_* so results
// match gguf-py's reference to float rounding.
#pragma once

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

#define NEG_INF __int_as_float(0xff800000)

// fp16 conversions in PTX, so the kernels need no CUDA headers (they compile with a bare NVRTC).
__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ u32 f2h2(float lo, float hi) { return (u32)f2h(lo) | ((u32)f2h(hi) << 16); }

// Type codes shared with kernels/gdsllm_kernels/ops.py (QTYPE_CODES).
#define QT_F32 0
#define QT_F16 1
#define QT_BF16 2
#define QT_Q4_0 3
#define QT_Q4_1 4
#define QT_Q5_0 5
#define QT_Q5_1 6
#define QT_Q8_0 7
#define QT_Q2_K 8
#define QT_Q3_K 9
#define QT_Q4_K 10
#define QT_Q5_K 11
#define QT_Q6_K 12
// Repacked for the GPU (resident weights): per row, the codes of all blocks (16 or 32 bytes each, 16-byte
// aligned), then the blocks' fp16 scales. Same row size as the GGUF layout; needs a multiple of 8 blocks per row.
#define QT_Q4_0R 13
#define QT_Q8_0R 14
// The I-quants and MXFP4 (codes from 32: room for more repacked layouts below)
#define QT_IQ4_NL 32
#define QT_IQ4_XS 33
#define QT_IQ3_S 34
#define QT_IQ3_XXS 35
#define QT_IQ2_XXS 36
#define QT_IQ2_XS 37
#define QT_IQ2_S 38
#define QT_IQ1_S 39
#define QT_IQ1_M 40
#define QT_MXFP4 41

#include "iq_tables.cuh"

__device__ __forceinline__ float ld_half(const u8* p) { return h2f(*reinterpret_cast<const u16*>(p)); }

// 32-bit word at a 2-byte aligned address (blocks of 18, 22, 34, 110, 210 bytes are only 2-aligned).
__device__ __forceinline__ u32 ld_u32_a2(const u8* p) {
    const u16* q = reinterpret_cast<const u16*>(p);
    return (u32)q[0] | ((u32)q[1] << 16);
}

// Packed-half arithmetic in PTX (no CUDA headers needed).
__device__ __forceinline__ u32 hsub2(u32 a, u32 b) {
    u32 d;
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}

__device__ __forceinline__ u32 hmul2(u32 a, u32 b) {
    u32 d;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}

// A small code c becomes an exact half with integer ops alone: the half 0x6400 | c is 1024 + c.
#define HALF_1024 0x64006400u

// Q4_0 codes of bytes j..j+3 (q) -> half2 weights (values j,j+1), (j+2,j+3), (j+16,j+17), (j+18,j+19).
__device__ __forceinline__ void q4_0_half2(u32 q, u32& lo0, u32& lo1, u32& hi0, u32& hi1) {
    const u32 t0 = __byte_perm(q, 0u, 0x4140), t1 = __byte_perm(q, 0u, 0x4342);
    lo0 = hsub2((t0 & 0x000F000Fu) | HALF_1024, 0x64086408u);
    lo1 = hsub2((t1 & 0x000F000Fu) | HALF_1024, 0x64086408u);
    hi0 = hsub2(((t0 >> 4) & 0x000F000Fu) | HALF_1024, 0x64086408u);
    hi1 = hsub2(((t1 >> 4) & 0x000F000Fu) | HALF_1024, 0x64086408u);
}

__device__ __forceinline__ u32 ld_u32(const u8* p) { return *reinterpret_cast<const u32*>(p); }

__device__ __forceinline__ u32 byte_of(u32 word, int k) { return (word >> (8 * k)) & 0xFFu; }

// Q3_K: the 6-bit scale i (0..15) unpacked from the 12 scale bytes, minus 32.
__device__ __forceinline__ int q3k_scale(const u8* s, int i) {
    int k = i & 3, grp = i >> 2;
    int low = (grp & 1) ? s[4 + k] : s[k];
    low = grp >= 2 ? (low >> 4) : (low & 0xF);
    int high = (s[8 + k] >> (2 * grp)) & 3;
    return (low | (high << 4)) - 32;
}

// Q4_K / Q5_K: scale and min j (0..7) from the 12 scale bytes (ggml's get_scale_min_k4).
__device__ __forceinline__ void scale_min_k4(int j, const u8* q, int& sc, int& m) {
    if (j < 4) {
        sc = q[j] & 63;
        m = q[j + 4] & 63;
    } else {
        sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

template <int QT> struct BlockInfo;
template <> struct BlockInfo<QT_F32> { static constexpr int values = 1, bytes = 4; };
template <> struct BlockInfo<QT_F16> { static constexpr int values = 1, bytes = 2; };
template <> struct BlockInfo<QT_BF16> { static constexpr int values = 1, bytes = 2; };
template <> struct BlockInfo<QT_Q4_0> { static constexpr int values = 32, bytes = 18; };
template <> struct BlockInfo<QT_Q4_1> { static constexpr int values = 32, bytes = 20; };
template <> struct BlockInfo<QT_Q5_0> { static constexpr int values = 32, bytes = 22; };
template <> struct BlockInfo<QT_Q5_1> { static constexpr int values = 32, bytes = 24; };
template <> struct BlockInfo<QT_Q8_0> { static constexpr int values = 32, bytes = 34; };
template <> struct BlockInfo<QT_Q2_K> { static constexpr int values = 256, bytes = 84; };
template <> struct BlockInfo<QT_Q3_K> { static constexpr int values = 256, bytes = 110; };
template <> struct BlockInfo<QT_Q4_K> { static constexpr int values = 256, bytes = 144; };
template <> struct BlockInfo<QT_Q5_K> { static constexpr int values = 256, bytes = 176; };
template <> struct BlockInfo<QT_Q6_K> { static constexpr int values = 256, bytes = 210; };
template <> struct BlockInfo<QT_IQ4_NL> { static constexpr int values = 32, bytes = 18; };
template <> struct BlockInfo<QT_IQ4_XS> { static constexpr int values = 256, bytes = 136; };
template <> struct BlockInfo<QT_IQ3_S> { static constexpr int values = 256, bytes = 110; };
template <> struct BlockInfo<QT_IQ3_XXS> { static constexpr int values = 256, bytes = 98; };
template <> struct BlockInfo<QT_IQ2_XXS> { static constexpr int values = 256, bytes = 66; };
template <> struct BlockInfo<QT_IQ2_XS> { static constexpr int values = 256, bytes = 74; };
template <> struct BlockInfo<QT_IQ2_S> { static constexpr int values = 256, bytes = 82; };
template <> struct BlockInfo<QT_IQ1_S> { static constexpr int values = 256, bytes = 50; };
template <> struct BlockInfo<QT_IQ1_M> { static constexpr int values = 256, bytes = 56; };
template <> struct BlockInfo<QT_MXFP4> { static constexpr int values = 32, bytes = 17; };

// Decode chunk c (values 32c .. 32c+31) of `row` (of `chunks` chunks) into w[0..31].
template <int QT> __device__ __forceinline__ void decode32(const u8* __restrict__ row, int c, int chunks, float* w);

template <> __device__ __forceinline__ void decode32<QT_F32>(const u8* __restrict__ row, int c, int chunks, float* w) {
    const float4* p = reinterpret_cast<const float4*>(row + (size_t)c * 128);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        float4 v = p[i];
        w[4 * i] = v.x; w[4 * i + 1] = v.y; w[4 * i + 2] = v.z; w[4 * i + 3] = v.w;
    }
}

template <> __device__ __forceinline__ void decode32<QT_F16>(const u8* __restrict__ row, int c, int chunks, float* w) {
    const uint4* p = reinterpret_cast<const uint4*>(row + (size_t)c * 64);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        uint4 v = p[i];
        const u32 words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            w[8 * i + 2 * k] = h2f((u16)(words[k] & 0xFFFFu));
            w[8 * i + 2 * k + 1] = h2f((u16)(words[k] >> 16));
        }
    }
}

template <> __device__ __forceinline__ void decode32<QT_BF16>(const u8* __restrict__ row, int c, int chunks, float* w) {
    const uint4* p = reinterpret_cast<const uint4*>(row + (size_t)c * 64);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        uint4 v = p[i];
        const u32 words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            w[8 * i + 2 * k] = __uint_as_float(words[k] << 16);
            w[8 * i + 2 * k + 1] = __uint_as_float(words[k] & 0xFFFF0000u);
        }
    }
}

template <> __device__ __forceinline__ void decode32<QT_Q4_0>(const u8* __restrict__ row, int c, int chunks, float* w) {
    const u8* b = row + (size_t)c * 18;
    const float d = ld_half(b);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        u32 q = ld_u32_a2(b + 2 + 4 * i);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            u32 v = byte_of(q, k);
            w[4 * i + k] = d * (float)((int)(v & 0xF) - 8);
            w[16 + 4 * i + k] = d * (float)((int)(v >> 4) - 8);
        }
    }
}

template <> __device__ __forceinline__ void decode32<QT_Q4_1>(const u8* __restrict__ row, int c, int chunks, float* w) {
    const u8* b = row + (size_t)c * 20;
    const float d = ld_half(b), m = ld_half(b + 2);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        u32 q = ld_u32(b + 4 + 4 * i);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            u32 v = byte_of(q, k);
            w[4 * i + k] = d * (float)(v & 0xF) + m;
            w[16 + 4 * i + k] = d * (float)(v >> 4) + m;
        }
    }
}

template <> __device__ __forceinline__ void decode32<QT_Q5_0>(const u8* __restrict__ row, int c, int chunks, float* w) {
    const u8* b = row + (size_t)c * 22;
    const float d = ld_half(b);
    const u32 qh = ld_u32_a2(b + 2);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        u32 q = ld_u32_a2(b + 6 + 4 * i);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            int j = 4 * i + k;
            u32 v = byte_of(q, k);
            int lo = (int)((v & 0xF) | (((qh >> j) & 1u) << 4)) - 16;
            int hi = (int)((v >> 4) | (((qh >> (j + 16)) & 1u) << 4)) - 16;
            w[j] = d * (float)lo;
            w[16 + j] = d * (float)hi;
        }
    }
}

template <> __device__ __forceinline__ void decode32<QT_Q5_1>(const u8* __restrict__ row, int c, int chunks, float* w) {
    const u8* b = row + (size_t)c * 24;
    const float d = ld_half(b), m = ld_half(b + 2);
    const u32 qh = ld_u32(b + 4);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        u32 q = ld_u32(b + 8 + 4 * i);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            int j = 4 * i + k;
            u32 v = byte_of(q, k);
            u32 lo = (v & 0xF) | (((qh >> j) & 1u) << 4);
            u32 hi = (v >> 4) | (((qh >> (j + 16)) & 1u) << 4);
            w[j] = d * (float)lo + m;
            w[16 + j] = d * (float)hi + m;
        }
    }
}

template <> __device__ __forceinline__ void decode32<QT_Q8_0>(const u8* __restrict__ row, int c, int chunks, float* w) {
    const u8* b = row + (size_t)c * 34;
    const float d = ld_half(b);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        u32 q = ld_u32_a2(b + 2 + 4 * i);
#pragma unroll
        for (int k = 0; k < 4; ++k) w[4 * i + k] = d * (float)(signed char)byte_of(q, k);
    }
}

template <> __device__ __forceinline__ void decode32<QT_Q2_K>(const u8* __restrict__ row, int c, int chunks, float* w) {
    const u8* b = row + (size_t)(c >> 3) * 84;
    const int sub = c & 7, half = sub >> 2, j = sub & 3, shift = 2 * j;
    const float d = ld_half(b + 80), dmin = ld_half(b + 82);
    const u8* q = b + 16 + 32 * half;
#pragma unroll
    for (int part = 0; part < 2; ++part) {
        const int sc = b[8 * half + 2 * j + part];
        const float dl = d * (float)(sc & 0xF), ml = dmin * (float)(sc >> 4);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            u32 word = ld_u32(q + 16 * part + 4 * i);
#pragma unroll
            for (int k = 0; k < 4; ++k) w[16 * part + 4 * i + k] = dl * (float)((byte_of(word, k) >> shift) & 3) - ml;
        }
    }
}

template <> __device__ __forceinline__ void decode32<QT_Q3_K>(const u8* __restrict__ row, int c, int chunks, float* w) {
    const u8* b = row + (size_t)(c >> 3) * 110;
    const int sub = c & 7, half = sub >> 2, j = sub & 3, shift = 2 * j;
    const u32 mask = 1u << (4 * half + j);
    const float d = ld_half(b + 108);
    const u8* hm = b;
    const u8* q = b + 32 + 32 * half;
#pragma unroll
    for (int part = 0; part < 2; ++part) {
        const float dl = d * (float)q3k_scale(b + 96, 8 * half + 2 * j + part);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            u32 word = ld_u32_a2(q + 16 * part + 4 * i);
            u32 hword = ld_u32_a2(hm + 16 * part + 4 * i);
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                int v = (int)((byte_of(word, k) >> shift) & 3) - ((byte_of(hword, k) & mask) ? 0 : 4);
                w[16 * part + 4 * i + k] = dl * (float)v;
            }
        }
    }
}

template <> __device__ __forceinline__ void decode32<QT_Q4_K>(const u8* __restrict__ row, int c, int chunks, float* w) {
    const u8* b = row + (size_t)(c >> 3) * 144;
    const int sub = c & 7, shift = 4 * (sub & 1);
    const float d = ld_half(b), dmin = ld_half(b + 2);
    int sc, m;
    scale_min_k4(sub, b + 4, sc, m);
    const float d1 = d * (float)sc, m1 = dmin * (float)m;
    const uint4* q = reinterpret_cast<const uint4*>(b + 16 + 32 * (sub >> 1));
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        uint4 v = q[i];
        const u32 words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int k = 0; k < 16; ++k) w[16 * i + k] = d1 * (float)((byte_of(words[k >> 2], k & 3) >> shift) & 0xF) - m1;
    }
}

template <> __device__ __forceinline__ void decode32<QT_Q5_K>(const u8* __restrict__ row, int c, int chunks, float* w) {
    const u8* b = row + (size_t)(c >> 3) * 176;
    const int sub = c & 7, shift = 4 * (sub & 1);
    const u32 bit = 1u << sub;
    const float d = ld_half(b), dmin = ld_half(b + 2);
    int sc, m;
    scale_min_k4(sub, b + 4, sc, m);
    const float d1 = d * (float)sc, m1 = dmin * (float)m;
    const uint4* qh = reinterpret_cast<const uint4*>(b + 16);
    const uint4* ql = reinterpret_cast<const uint4*>(b + 48 + 32 * (sub >> 1));
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        uint4 v = ql[i], h = qh[i];
        const u32 words[4] = {v.x, v.y, v.z, v.w};
        const u32 hwords[4] = {h.x, h.y, h.z, h.w};
#pragma unroll
        for (int k = 0; k < 16; ++k) {
            u32 q = ((byte_of(words[k >> 2], k & 3) >> shift) & 0xF) + ((byte_of(hwords[k >> 2], k & 3) & bit) ? 16 : 0);
            w[16 * i + k] = d1 * (float)q - m1;
        }
    }
}

template <> __device__ __forceinline__ void decode32<QT_Q6_K>(const u8* __restrict__ row, int c, int chunks, float* w) {
    const u8* b = row + (size_t)(c >> 3) * 210;
    const int sub = c & 7, half = sub >> 2, k4 = sub & 3;
    const int nib_shift = 4 * (k4 >> 1), qh_shift = 2 * k4;
    const float d = ld_half(b + 208);
    const signed char* scales = reinterpret_cast<const signed char*>(b + 192) + 8 * half + 2 * k4;
    const u8* ql = b + 64 * half + 32 * (k4 & 1);
    const u8* qh = b + 128 + 32 * half;
#pragma unroll
    for (int part = 0; part < 2; ++part) {
        const float ds = d * (float)scales[part];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            u32 lw = ld_u32_a2(ql + 16 * part + 4 * i);
            u32 hw = ld_u32_a2(qh + 16 * part + 4 * i);
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                int q = (int)(((byte_of(lw, k) >> nib_shift) & 0xF) | (((byte_of(hw, k) >> qh_shift) & 3) << 4)) - 32;
                w[16 * part + 4 * i + k] = ds * (float)q;
            }
        }
    }
}

template <> __device__ __forceinline__ void decode32<QT_Q4_0R>(const u8* __restrict__ row, int c, int chunks, float* w) {
    const uint4 v = *reinterpret_cast<const uint4*>(row + (size_t)c * 16);
    const float d = ld_half(row + (size_t)chunks * 16 + 2 * c);
    const u32 words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 16; ++k) {
        u32 b = byte_of(words[k >> 2], k & 3);
        w[k] = d * (float)((int)(b & 0xF) - 8);
        w[16 + k] = d * (float)((int)(b >> 4) - 8);
    }
}

template <> __device__ __forceinline__ void decode32<QT_Q8_0R>(const u8* __restrict__ row, int c, int chunks, float* w) {
    const uint4* p = reinterpret_cast<const uint4*>(row + (size_t)c * 32);
    const float d = ld_half(row + (size_t)chunks * 32 + 2 * c);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        uint4 v = p[i];
        const u32 words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int k = 0; k < 16; ++k) w[16 * i + k] = d * (float)(signed char)byte_of(words[k >> 2], k & 3);
    }
}

// ---- I-quants and MXFP4 (ggml's dequantize_row_iq* / dequantize_row_mxfp4) ----------------------------------------
// Chunk c of a 256-value type is its sub-block c % 8 of super-block c / 8. Grid points are 4 or 8 bytes of a table
// entry (iq_tables.cuh); a set sign bit negates the value (after the scale multiplies it, as ggml does).

#define IQ1_DELTA 0.125f

__device__ __forceinline__ float grid_byte(unsigned long long point, int j) { return (float)(u8)(point >> (8 * j)); }

__device__ __forceinline__ float signed_by(float v, u32 signs, int j) { return (signs >> j) & 1u ? -v : v; }

// Eight values of one 8-value grid point times `scale`, signed by 8 sign bits.
__device__ __forceinline__ void grid8(float* w, unsigned long long point, float scale, u32 signs) {
#pragma unroll
    for (int j = 0; j < 8; ++j) w[j] = signed_by(scale * grid_byte(point, j), signs, j);
}

// Four values of a 4-value grid point (iq3 grids).
__device__ __forceinline__ void grid4(float* w, u32 point, float scale, u32 signs) {
#pragma unroll
    for (int j = 0; j < 4; ++j) w[j] = signed_by(scale * (float)((point >> (8 * j)) & 0xFFu), signs, j);
}

// 32 values from 16 bytes of 4-bit level indices (low nibbles first) into a 16-entry level table.
__device__ __forceinline__ void levels32(const u8* q, float d, const signed char* levels, float* w) {
#pragma unroll
    for (int j = 0; j < 16; ++j) {
        const u32 v = q[j];
        w[j] = d * (float)levels[v & 0xF];
        w[16 + j] = d * (float)levels[v >> 4];
    }
}

template <> __device__ __forceinline__ void decode32<QT_IQ4_NL>(const u8* __restrict__ row, int c, int chunks, float* w) {
    const u8* b = row + (size_t)c * 18;
    levels32(b + 2, ld_half(b), kvalues_iq4nl, w);
}

template <> __device__ __forceinline__ void decode32<QT_IQ4_XS>(const u8* __restrict__ row, int c, int chunks, float* w) {
    const u8* b = row + (size_t)(c >> 3) * 136;
    const int ib = c & 7;
    const u32 scales_h = *reinterpret_cast<const u16*>(b + 2);
    const int ls = ((b[4 + ib / 2] >> (4 * (ib & 1))) & 0xF) | (((scales_h >> (2 * ib)) & 3) << 4);
    levels32(b + 8 + 16 * ib, ld_half(b) * (float)(ls - 32), kvalues_iq4nl, w);
}

template <> __device__ __forceinline__ void decode32<QT_MXFP4>(const u8* __restrict__ row, int c, int chunks, float* w) {
    const u8* b = row + (size_t)c * 17;
    const u32 e = b[0];  // e8m0 exponent; the levels are doubled, so the scale is halved (ggml_e8m0_to_fp32_half)
    const float d = __uint_as_float(e < 2 ? 0x00200000u << e : (e - 1) << 23);
    levels32(b + 1, d, kvalues_fp4, w);
}

template <> __device__ __forceinline__ void decode32<QT_IQ2_XXS>(const u8* __restrict__ row, int c, int chunks, float* w) {
    const u8* b = row + (size_t)(c >> 3) * 66;
    const u8* q = b + 2 + 8 * (c & 7);
    const u32 aux = ld_u32_a2(q + 4);  // 4 x 7-bit sign indices, then a 4-bit scale
    const float db = ld_half(b) * (0.5f + (float)(aux >> 28)) * 0.25f;
#pragma unroll
    for (int l = 0; l < 4; ++l) grid8(w + 8 * l, iq2xxs_grid[q[l]], db, ksigns_iq2xs[(aux >> (7 * l)) & 127]);
}

template <> __device__ __forceinline__ void decode32<QT_IQ2_XS>(const u8* __restrict__ row, int c, int chunks, float* w) {
    const u8* b = row + (size_t)(c >> 3) * 74;
    const int ib = c & 7;
    const u16* q = reinterpret_cast<const u16*>(b + 2) + 4 * ib;  // 9-bit grid index, 7-bit sign index
    const float d = ld_half(b);
    const u32 sc = b[66 + ib];
    const float db[2] = {d * (0.5f + (float)(sc & 0xF)) * 0.25f, d * (0.5f + (float)(sc >> 4)) * 0.25f};
#pragma unroll
    for (int l = 0; l < 4; ++l) grid8(w + 8 * l, iq2xs_grid[q[l] & 511], db[l / 2], ksigns_iq2xs[q[l] >> 9]);
}

template <> __device__ __forceinline__ void decode32<QT_IQ2_S>(const u8* __restrict__ row, int c, int chunks, float* w) {
    const u8* b = row + (size_t)(c >> 3) * 82;
    const int ib = c & 7;
    const u8* q = b + 2 + 4 * ib;  // low 8 bits of the grid indices; their signs 32 bytes on
    const u32 qh = b[66 + ib];
    const float d = ld_half(b);
    const u32 sc = b[74 + ib];
    const float db[2] = {d * (0.5f + (float)(sc & 0xF)) * 0.25f, d * (0.5f + (float)(sc >> 4)) * 0.25f};
#pragma unroll
    for (int l = 0; l < 4; ++l)
        grid8(w + 8 * l, iq2s_grid[q[l] | ((qh << (8 - 2 * l)) & 0x300)], db[l / 2], q[32 + l]);
}

template <> __device__ __forceinline__ void decode32<QT_IQ3_XXS>(const u8* __restrict__ row, int c, int chunks, float* w) {
    const u8* b = row + (size_t)(c >> 3) * 98;
    const int ib = c & 7;
    const u8* q = b + 2 + 8 * ib;
    const u32 aux = ld_u32_a2(b + 66 + 4 * ib);
    const float db = ld_half(b) * (0.5f + (float)(aux >> 28)) * 0.5f;
#pragma unroll
    for (int l = 0; l < 4; ++l) {
        const u32 signs = ksigns_iq2xs[(aux >> (7 * l)) & 127];
        grid4(w + 8 * l, iq3xxs_grid[q[2 * l]], db, signs);
        grid4(w + 8 * l + 4, iq3xxs_grid[q[2 * l + 1]], db, signs >> 4);
    }
}

template <> __device__ __forceinline__ void decode32<QT_IQ3_S>(const u8* __restrict__ row, int c, int chunks, float* w) {
    const u8* b = row + (size_t)(c >> 3) * 110;
    const int ib = c & 7;
    const u8* q = b + 2 + 8 * ib;
    const u32 qh = b[66 + ib];
    const u8* signs = b + 74 + 4 * ib;
    const float db = ld_half(b) * (float)(1 + 2 * ((b[106 + ib / 2] >> (4 * (ib & 1))) & 0xF));
#pragma unroll
    for (int l = 0; l < 4; ++l) {
        grid4(w + 8 * l, iq3s_grid[q[2 * l] | ((qh << (8 - 2 * l)) & 256)], db, signs[l]);
        grid4(w + 8 * l + 4, iq3s_grid[q[2 * l + 1] | ((qh << (7 - 2 * l)) & 256)], db, (u32)signs[l] >> 4);
    }
}

// IQ1 grid points hold bytes -1, 0, 1: value = dl * (point + delta).
__device__ __forceinline__ void iq1_grid8(float* w, unsigned long long point, float dl, float delta) {
#pragma unroll
    for (int j = 0; j < 8; ++j) w[j] = dl * ((float)(signed char)(point >> (8 * j)) + delta);
}

template <> __device__ __forceinline__ void decode32<QT_IQ1_S>(const u8* __restrict__ row, int c, int chunks, float* w) {
    const u8* b = row + (size_t)(c >> 3) * 50;
    const int ib = c & 7;
    const u8* q = b + 2 + 4 * ib;
    const u32 qh = reinterpret_cast<const u16*>(b + 34)[ib];  // 4 x 3 high index bits, 3-bit scale, delta sign
    const float dl = ld_half(b) * (float)(2 * ((qh >> 12) & 7) + 1);
    const float delta = qh & 0x8000u ? -IQ1_DELTA : IQ1_DELTA;
#pragma unroll
    for (int l = 0; l < 4; ++l) iq1_grid8(w + 8 * l, iq1s_grid[q[l] | (((qh >> (3 * l)) & 7) << 8)], dl, delta);
}

template <> __device__ __forceinline__ void decode32<QT_IQ1_M>(const u8* __restrict__ row, int c, int chunks, float* w) {
    const u8* b = row + (size_t)(c >> 3) * 56;
    const int ib = c & 7;
    const u16* sc = reinterpret_cast<const u16*>(b + 48);  // 3-bit scales; the fp16 d in the four top nibbles
    const u16 d_bits = (u16)((sc[0] >> 12) | ((sc[1] >> 8) & 0x00F0) | ((sc[2] >> 4) & 0x0F00) | (sc[3] & 0xF000));
    const float d = h2f(d_bits);
    const u32 s = sc[ib / 2] >> (6 * (ib & 1));
    const float dl[2] = {d * (float)(2 * (s & 7) + 1), d * (float)(2 * ((s >> 3) & 7) + 1)};
    const u8* q = b + 4 * ib;
    const u8* qh = b + 32 + 2 * ib;
#pragma unroll
    for (int l = 0; l < 4; ++l) {
        const u32 h = qh[l / 2] >> (4 * (l & 1));  // 3 high index bits, then the delta's sign
        iq1_grid8(w + 8 * l, iq1s_grid[q[l] | ((h & 7) << 8)], dl[l / 2], h & 8 ? -IQ1_DELTA : IQ1_DELTA);
    }
}
