// Decode attention over the KV cache (one new token of one sequence), split over the positions
// ("flash decoding") so that all SMs work even for short contexts.
//
// attn_partial<HD>: grid (n_head, n_split), 4 warps. Split s covers positions [s*len_s, (s+1)*len_s) of the
// len = len_ptr[0] cached ones (read from device memory, so CUDA graphs can replay it). Each warp walks its
// positions with an online softmax, lanes holding HD/32 dims each; the warps are merged in shared memory and the
// split writes (max, sum) and its unnormalised output. attn_combine<HD>: grid n_head, HD threads, merges the splits
// into fp16 out [n_head, HD]. q fp16 [n_head, HD]; caches fp16 [max_T, n_kv, HD]; GQA maps head h to h / group.
#include "ggml_blocks.cuh"

#define ATTN_WARPS 4

template <int HD>
__global__ void __launch_bounds__(ATTN_WARPS * 32)
attn_partial(const u16* __restrict__ q, const u16* __restrict__ k_cache, const u16* __restrict__ v_cache,
             const int* __restrict__ len_ptr, int n_head, int n_kv, float scale, float* __restrict__ part_o,
             float* __restrict__ part_ml) {
    constexpr int PER = HD / 32;
    const int head = blockIdx.x, split = blockIdx.y, n_split = gridDim.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int kv = head / (n_head / n_kv);
    const int len = len_ptr[0];
    const int per_split = (len + n_split - 1) / n_split;
    const int start = split * per_split, stop = min(len, start + per_split);

    float qv[PER], o[PER];
#pragma unroll
    for (int i = 0; i < PER; ++i) {
        qv[i] = h2f(q[(size_t)head * HD + lane * PER + i]) * scale;
        o[i] = 0.f;
    }
    float m = NEG_INF, l = 0.f;
    for (int t = start + warp; t < stop; t += ATTN_WARPS) {
        const u16* kr = k_cache + ((size_t)t * n_kv + kv) * HD + lane * PER;
        const u16* vr = v_cache + ((size_t)t * n_kv + kv) * HD + lane * PER;
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < PER; ++i) s = fmaf(qv[i], h2f(kr[i]), s);
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        const float m_new = fmaxf(m, s);
        const float correction = __expf(m - m_new), p = __expf(s - m_new);
        l = l * correction + p;
#pragma unroll
        for (int i = 0; i < PER; ++i) o[i] = fmaf(o[i], correction, p * h2f(vr[i]));
        m = m_new;
    }
    __shared__ float sm_m[ATTN_WARPS], sm_l[ATTN_WARPS], sm_o[ATTN_WARPS][HD];
    if (lane == 0) { sm_m[warp] = m; sm_l[warp] = l; }
#pragma unroll
    for (int i = 0; i < PER; ++i) sm_o[warp][lane * PER + i] = o[i];
    __syncthreads();
    float mm = NEG_INF;
#pragma unroll
    for (int w = 0; w < ATTN_WARPS; ++w) mm = fmaxf(mm, sm_m[w]);
    const size_t base = (size_t)head * n_split + split;
    for (int d = threadIdx.x; d < HD; d += blockDim.x) {
        float acc = 0.f;
#pragma unroll
        for (int w = 0; w < ATTN_WARPS; ++w)
            if (sm_m[w] != NEG_INF) acc += sm_o[w][d] * __expf(sm_m[w] - mm);
        part_o[base * HD + d] = acc;
    }
    if (threadIdx.x == 0) {
        float ll = 0.f;
#pragma unroll
        for (int w = 0; w < ATTN_WARPS; ++w)
            if (sm_m[w] != NEG_INF) ll += sm_l[w] * __expf(sm_m[w] - mm);
        part_ml[base * 2] = mm;
        part_ml[base * 2 + 1] = ll;
    }
}

template <int HD>
__global__ void attn_combine(const float* __restrict__ part_o, const float* __restrict__ part_ml, int n_split,
                             u16* __restrict__ out) {
    const int head = blockIdx.x, d = threadIdx.x;
    float mm = NEG_INF;
    for (int s = 0; s < n_split; ++s) mm = fmaxf(mm, part_ml[((size_t)head * n_split + s) * 2]);
    float num = 0.f, den = 0.f;
    for (int s = 0; s < n_split; ++s) {
        const size_t base = (size_t)head * n_split + s;
        const float ms = part_ml[base * 2];
        if (ms == NEG_INF) continue;
        const float f = __expf(ms - mm);
        num += part_o[base * HD + d] * f;
        den += part_ml[base * 2 + 1] * f;
    }
    out[(size_t)head * HD + d] = f2h(num / den);
}
