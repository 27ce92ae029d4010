// RMSNorm: out[r, :] = fp16(x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w), x and w fp32; one block per row.
#include "ggml_blocks.cuh"

extern "C" __global__ void rmsnorm_f32(const float* __restrict__ x, const float* __restrict__ w,
                                       u16* __restrict__ out, int d, float eps) {
    __shared__ float partial[32];
    const float* row = x + (size_t)blockIdx.x * d;
    float s = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) s = fmaf(row[i], row[i], s);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = s;
    __syncthreads();
    if (threadIdx.x < 32) {
        s = threadIdx.x < (blockDim.x >> 5) ? partial[threadIdx.x] : 0.f;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (threadIdx.x == 0) partial[0] = rsqrtf(s / (float)d + eps);
    }
    __syncthreads();
    const float scale = partial[0];
    u16* dst = out + (size_t)blockIdx.x * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) dst[i] = f2h(row[i] * scale * w[i]);
}
