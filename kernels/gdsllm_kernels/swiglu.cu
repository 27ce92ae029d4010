// Gated FFN activation for prefill: out = fp16(silu(gate) * up), all fp16, n elements.
#include "ggml_blocks.cuh"

extern "C" __global__ void swiglu_f16(const u16* __restrict__ gate, const u16* __restrict__ up,
                                      u16* __restrict__ out, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float g = h2f(gate[i]);
    out[i] = f2h(g / (1.f + __expf(-g)) * h2f(up[i]));
}
