// MLX affine weights (uint32-packed codes + per-group scales and biases) on the GPU.
//
// Format: each row of codes is one LSB-first bit stream of uint32 words; code i occupies bits [i*BITS, i*BITS+BITS)
// (3-, 5- and 6-bit codes may straddle two words). 32 consecutive codes fill exactly BITS words, so every 32-value
// chunk starts on a word boundary and lies inside one group (group sizes 32, 64, 128).
//
// affine_dequant: one thread per 32-value chunk, values as MLX computes them, w = r(r(q * scale) + bias) with each
// step rounded to the scales' type (bit-exact with the CPU reference), then converted to the output type.
// affine_gemv: fused dequantize + matrix-vector product for decode (batch B = 1..8). Each warp owns R rows; its
// lanes walk the rows' chunks (lane, lane + 32, ...), loading a chunk's BITS words as 16-byte vectors where BITS
// is 4 or 8. Per chunk and vector b: dot(q, x) and sum(x) in fp32, then acc += scale * dot + bias * sum(x).
// Optionally each output is scaled by a per-vector coefficient (an MoE expert's routing weight).
// affine_swiglu: the same walk over two matrices (an MLP's gate and up), giving silu(gate) * up.
// *_grouped: the same over several experts in one launch, their pointers in a device table.
//
// Type codes (ST scales/biases, OT output, XT activations): 0 f32, 1 f16, 2 bf16 (as QT_F32/QT_F16/QT_BF16).
#include "ggml_blocks.cuh"

#define AFFINE_WARPS 4

__device__ __forceinline__ float bf2f(u16 h) { return __uint_as_float((u32)h << 16); }

__device__ __forceinline__ u16 f2bf(float f) {  // round to nearest even, as torch converts
    const u32 u = __float_as_uint(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (u16)((u >> 16) | 0x40u);  // NaN stays NaN
    return (u16)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

template <int T> __device__ __forceinline__ float load_value(const void* p, size_t i) {
    if (T == 0) return reinterpret_cast<const float*>(p)[i];
    const u16 h = reinterpret_cast<const u16*>(p)[i];
    return T == 1 ? h2f(h) : bf2f(h);
}

template <int T> __device__ __forceinline__ void store_value(void* p, size_t i, float v) {
    if (T == 0) reinterpret_cast<float*>(p)[i] = v;
    else reinterpret_cast<u16*>(p)[i] = T == 1 ? f2h(v) : f2bf(v);
}

// v rounded to type T (identity for f32).
template <int T> __device__ __forceinline__ float round_to(float v) {
    if (T == 0) return v;
    return T == 1 ? h2f(f2h(v)) : bf2f(f2bf(v));
}

// Code j (0..31) of a chunk held in words w[0..BITS-1].
template <int BITS> __device__ __forceinline__ u32 code_at(const u32* w, int j) {
    const int bit = j * BITS, word = bit >> 5, shift = bit & 31;
    u32 q = w[word] >> shift;
    if (shift + BITS > 32) q |= w[word + 1] << (32 - shift);
    return q & ((1u << BITS) - 1u);
}

template <int BITS> __device__ __forceinline__ void load_chunk(const u32* __restrict__ src, u32* w) {
    if (BITS % 4 == 0) {
#pragma unroll
        for (int i = 0; i < BITS / 4; ++i) {
            const uint4 v = __ldg(reinterpret_cast<const uint4*>(src) + i);
            w[4 * i] = v.x; w[4 * i + 1] = v.y; w[4 * i + 2] = v.z; w[4 * i + 3] = v.w;
        }
    } else {
#pragma unroll
        for (int i = 0; i < BITS; ++i) w[i] = __ldg(src + i);
    }
}

template <int BITS, int ST, int OT>
__global__ void affine_dequant(const u32* __restrict__ packed, const void* __restrict__ scales,
                               const void* __restrict__ biases, void* __restrict__ out, int cols, int group_size,
                               long long chunks) {
    const long long chunk = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (chunk >= chunks) return;
    const int per_row = cols / 32;
    const long long row = chunk / per_row;
    const int c = (int)(chunk % per_row);
    u32 w[BITS];
#pragma unroll
    for (int i = 0; i < BITS; ++i) w[i] = packed[row * per_row * BITS + (long long)c * BITS + i];
    const size_t group = (size_t)row * (cols / group_size) + (size_t)c * 32 / group_size;
    const float scale = load_value<ST>(scales, group), bias = load_value<ST>(biases, group);
    const size_t base = (size_t)row * cols + (size_t)c * 32;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
        const float v = round_to<ST>(__fadd_rn(round_to<ST>(__fmul_rn((float)code_at<BITS>(w, j), scale)), bias));
        store_value<OT>(out, base + j, v);
    }
}

// The 32 activations of chunk c of vector b, as floats.
template <int XT> __device__ __forceinline__ void load_x(const void* __restrict__ x, int cols, int b, int c, float* v) {
    if (XT == 0) {
        const float4* p = reinterpret_cast<const float4*>(reinterpret_cast<const float*>(x) + (size_t)b * cols + c * 32);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const float4 f = __ldg(p + i);
            v[4 * i] = f.x; v[4 * i + 1] = f.y; v[4 * i + 2] = f.z; v[4 * i + 3] = f.w;
        }
    } else {
        const uint4* p = reinterpret_cast<const uint4*>(reinterpret_cast<const u16*>(x) + (size_t)b * cols + c * 32);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const uint4 u = __ldg(p + i);
            const u32 words[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const u16 lo = (u16)(words[k] & 0xFFFFu), hi = (u16)(words[k] >> 16);
                v[8 * i + 2 * k] = XT == 1 ? h2f(lo) : bf2f(lo);
                v[8 * i + 2 * k + 1] = XT == 1 ? h2f(hi) : bf2f(hi);
            }
        }
    }
}

// The dot products of rows first..first+R-1 (a missing last row re-reads a real one) with the B vectors of x, in fp32,
// summed over the warp: every lane gets acc[r][b].
template <int BITS, int ST, int XT, int B, int R>
__device__ __forceinline__ void affine_rows(const u32* __restrict__ packed, const void* __restrict__ scales,
                                            const void* __restrict__ biases, const void* __restrict__ x, int first,
                                            int rows, int cols, int group_size, int lane, float (&acc)[R][B]) {
    const int per_row = cols / 32, groups = cols / group_size;
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int b = 0; b < B; ++b) acc[r][b] = 0.f;
    for (int c = lane; c < per_row; c += 32) {
        u32 w[R][BITS];
        float scale[R], bias[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int row = min(first + r, rows - 1);
            load_chunk<BITS>(packed + ((size_t)row * per_row + c) * BITS, w[r]);
            const size_t group = (size_t)row * groups + (size_t)c * 32 / group_size;
            scale[r] = load_value<ST>(scales, group);
            bias[r] = load_value<ST>(biases, group);
        }
#pragma unroll
        for (int b = 0; b < B; ++b) {
            float v[32];
            load_x<XT>(x, cols, b, c, v);
            float sum = 0.f;
#pragma unroll
            for (int j = 0; j < 32; ++j) sum += v[j];
#pragma unroll
            for (int r = 0; r < R; ++r) {
                float dot = 0.f;
#pragma unroll
                for (int j = 0; j < 32; ++j) dot = fmaf((float)code_at<BITS>(w[r], j), v[j], dot);
                acc[r][b] += fmaf(scale[r], dot, bias[r] * sum);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int b = 0; b < B; ++b)
#pragma unroll
            for (int offset = 16; offset > 0; offset >>= 1) acc[r][b] += __shfl_xor_sync(0xFFFFFFFFu, acc[r][b], offset);
}

// y = x @ W.T for this warp's rows; with `coeff` (B values of type XT, `coeff_stride` apart), each y[b] rounded to
// XT and then scaled by coeff[b] (as a separate multiply would do it).
template <int BITS, int ST, int XT, int B, int R>
__device__ __forceinline__ void gemv_rows(const u32* __restrict__ packed, const void* __restrict__ scales,
                                          const void* __restrict__ biases, const void* __restrict__ x,
                                          void* __restrict__ y, int rows, int cols, int group_size,
                                          const void* __restrict__ coeff, int coeff_stride) {
    const int lane = threadIdx.x & 31;
    const int first = (blockIdx.x * AFFINE_WARPS + (threadIdx.x >> 5)) * R;
    if (first >= rows) return;
    float acc[R][B];
    affine_rows<BITS, ST, XT, B, R>(packed, scales, biases, x, first, rows, cols, group_size, lane, acc);
    if (lane != 0) return;
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int b = 0; b < B; ++b) {
            if (first + r >= rows) continue;
            float s = acc[r][b];
            if (coeff != nullptr) s = round_to<XT>(s) * load_value<XT>(coeff, (size_t)b * coeff_stride);
            store_value<XT>(y, (size_t)b * rows + first + r, s);
        }
}

// The gated activation of an MLP for this warp's rows, y = silu(x @ G.T) * (x @ U.T), for two matrices of one shape
// and format, each product rounded to XT and silu rounded to XT before the multiply (as the three separate ops
// round).
template <int BITS, int ST, int XT, int B, int R>
__device__ __forceinline__ void swiglu_rows(const u32* __restrict__ gate, const void* __restrict__ gate_scales,
                                            const void* __restrict__ gate_biases, const u32* __restrict__ up,
                                            const void* __restrict__ up_scales, const void* __restrict__ up_biases,
                                            const void* __restrict__ x, void* __restrict__ y, int rows, int cols,
                                            int group_size) {
    const int lane = threadIdx.x & 31;
    const int first = (blockIdx.x * AFFINE_WARPS + (threadIdx.x >> 5)) * R;
    if (first >= rows) return;
    float g[R][B], u[R][B];
    affine_rows<BITS, ST, XT, B, R>(gate, gate_scales, gate_biases, x, first, rows, cols, group_size, lane, g);
    affine_rows<BITS, ST, XT, B, R>(up, up_scales, up_biases, x, first, rows, cols, group_size, lane, u);
    if (lane != 0) return;
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int b = 0; b < B; ++b) {
            if (first + r >= rows) continue;
            const float gv = round_to<XT>(g[r][b]);
            const float silu = round_to<XT>(gv / (1.f + expf(-gv)));
            store_value<XT>(y, (size_t)b * rows + first + r, silu * round_to<XT>(u[r][b]));
        }
}

template <int BITS, int ST, int XT, int B, int R>
__global__ void __launch_bounds__(32 * AFFINE_WARPS)
affine_gemv(const u32* __restrict__ packed, const void* __restrict__ scales, const void* __restrict__ biases,
            const void* __restrict__ x, void* __restrict__ y, int rows, int cols, int group_size,
            const void* __restrict__ coeff, int coeff_stride) {
    gemv_rows<BITS, ST, XT, B, R>(packed, scales, biases, x, y, rows, cols, group_size, coeff, coeff_stride);
}

template <int BITS, int ST, int XT, int B, int R>
__global__ void __launch_bounds__(32 * AFFINE_WARPS)
affine_swiglu(const u32* __restrict__ gate, const void* __restrict__ gate_scales, const void* __restrict__ gate_biases,
              const u32* __restrict__ up, const void* __restrict__ up_scales, const void* __restrict__ up_biases,
              const void* __restrict__ x, void* __restrict__ y, int rows, int cols, int group_size) {
    swiglu_rows<BITS, ST, XT, B, R>(gate, gate_scales, gate_biases, up, up_scales, up_biases, x, y, rows, cols,
                                    group_size);
}

// Grouped forms for several experts of one format at once (blockIdx.y: the expert), their pointers in a table of
// u64 per expert. affine_swiglu_grouped: {gate packed, scales, biases, up packed, scales, biases, x, y}.
// affine_gemv_grouped: {packed, scales, biases, x, y, coeff} (coeff 0: unscaled). Each expert's computation is the
// single-expert kernel's, value for value.
template <typename T> __device__ __forceinline__ T* entry(const unsigned long long* t, int i) {
    return reinterpret_cast<T*>(t[i]);
}

template <int BITS, int ST, int XT, int B, int R>
__global__ void __launch_bounds__(32 * AFFINE_WARPS)
affine_swiglu_grouped(const unsigned long long* __restrict__ table, int rows, int cols, int group_size) {
    const unsigned long long* t = table + (size_t)blockIdx.y * 8;
    swiglu_rows<BITS, ST, XT, B, R>(entry<const u32>(t, 0), entry<const void>(t, 1), entry<const void>(t, 2),
                                    entry<const u32>(t, 3), entry<const void>(t, 4), entry<const void>(t, 5),
                                    entry<const void>(t, 6), entry<void>(t, 7), rows, cols, group_size);
}

template <int BITS, int ST, int XT, int B, int R>
__global__ void __launch_bounds__(32 * AFFINE_WARPS)
affine_gemv_grouped(const unsigned long long* __restrict__ table, int rows, int cols, int group_size,
                    int coeff_stride) {
    const unsigned long long* t = table + (size_t)blockIdx.y * 6;
    gemv_rows<BITS, ST, XT, B, R>(entry<const u32>(t, 0), entry<const void>(t, 1), entry<const void>(t, 2),
                                  entry<const void>(t, 3), entry<void>(t, 4), rows, cols, group_size,
                                  entry<const void>(t, 5), coeff_stride);
}
