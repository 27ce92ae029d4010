// Repack resident Q4_0 / Q8_0 rows into the GPU layout (QT_Q4_0R / QT_Q8_0R in ggml_blocks.cuh): per row, the
// codes of all blocks, then their fp16 scales, so the decode kernels read codes with aligned 16-byte loads.
// Out of place (src and dst must not overlap); one thread per block.
#include "ggml_blocks.cuh"

template <int QT>
__global__ void repack(const u8* __restrict__ src, u8* __restrict__ dst, int blocks_per_row, long long n_blocks) {
    constexpr int CODE_BYTES = QT == QT_Q4_0 ? 16 : 32, BLOCK_BYTES = CODE_BYTES + 2;
    const long long g = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= n_blocks) return;
    const long long r = g / blocks_per_row;
    const int c = (int)(g - r * blocks_per_row);
    const u8* in = src + r * blocks_per_row * BLOCK_BYTES + (long long)c * BLOCK_BYTES;
    u8* row = dst + r * blocks_per_row * BLOCK_BYTES;
    u16* codes = reinterpret_cast<u16*>(row + (long long)c * CODE_BYTES);
    const u16* from = reinterpret_cast<const u16*>(in + 2);
#pragma unroll
    for (int i = 0; i < CODE_BYTES / 2; ++i) codes[i] = from[i];
    *reinterpret_cast<u16*>(row + (long long)blocks_per_row * CODE_BYTES + 2 * c) = *reinterpret_cast<const u16*>(in);
}
