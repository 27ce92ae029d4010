// Dequantize GGML rows to fp16 or fp32: the prefill path (into a reused scratch buffer before a cuBLAS matmul)
// and the embedding lookup (a gather of selected rows).
#include "ggml_blocks.cuh"

#define OUT_F16 0
#define OUT_F32 1

// out[i, :] = dequant(w[rows ? rows[i] : i, :]) for i < n_rows; one thread per 32-value chunk.
template <int QT, int OUT>
__global__ void dequant(const u8* __restrict__ w, long long row_bytes, int chunks_per_row, long long n_chunks,
                        const long long* __restrict__ rows, void* __restrict__ out) {
    const long long g = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= n_chunks) return;
    const long long i = g / chunks_per_row;
    const int c = (int)(g - i * chunks_per_row);
    const long long src = rows ? rows[i] : i;
    float v[32];
    decode32<QT>(w + src * row_bytes, c, chunks_per_row, v);
    if (OUT == OUT_F16) {
        uint4* o = reinterpret_cast<uint4*>(reinterpret_cast<u16*>(out) + g * 32);
#pragma unroll
        for (int q = 0; q < 4; ++q)
            o[q] = make_uint4(f2h2(v[8 * q], v[8 * q + 1]), f2h2(v[8 * q + 2], v[8 * q + 3]),
                              f2h2(v[8 * q + 4], v[8 * q + 5]), f2h2(v[8 * q + 6], v[8 * q + 7]));
    } else {
        float4* o = reinterpret_cast<float4*>(reinterpret_cast<float*>(out) + g * 32);
#pragma unroll
        for (int q = 0; q < 8; ++q) o[q] = make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
    }
}
