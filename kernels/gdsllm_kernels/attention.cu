// Decode attention over the KV caches: one new token of each of B sequences in one launch, split over the
// positions ("flash decoding") so that all SMs work even for short contexts.
//
// attn_partial<HD>: grid (n_head, n_split, B), 4 warps. Sequence b attends over the first len = seqs[b].len
// positions of layer `layer` of its caches (see seq_slots.cuh; read from device memory, so CUDA graphs can replay
// it). Splits cover at least ATTN_MIN_SPLIT positions each, so short sequences use fewer of them and the others
// only mark themselves empty. Each warp walks its positions with an online softmax, lanes holding HD/32 dims
// each; the warps are merged in shared memory and the split writes (max, sum) and its unnormalised output.
// attn_combine<HD>: grid (n_head, B), HD threads, merges the splits into fp16 out [B, n_head, HD].
// q fp16 [B, n_head, HD]; GQA maps head h to KV head h / (n_head / n_kv).
#include "ggml_blocks.cuh"
#include "seq_slots.cuh"

#define ATTN_WARPS 4
#define ATTN_MIN_SPLIT 32

template <int HD>
__global__ void __launch_bounds__(ATTN_WARPS * 32)
attn_partial(const u16* __restrict__ q, const SeqSlot* __restrict__ seqs, int layer, int n_head, int n_kv,
             float scale, float* __restrict__ part_o, float* __restrict__ part_ml) {
    constexpr int PER = HD / 32;
    const int head = blockIdx.x, split = blockIdx.y, n_split = gridDim.y, b = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int kv = head / (n_head / n_kv);
    const SeqSlot seq = seqs[b];
    const int len = (int)seq.len;
    const int per_split = max((len + n_split - 1) / n_split, ATTN_MIN_SPLIT);
    const int start = split * per_split, stop = min(len, start + per_split);
    const size_t base = ((size_t)b * n_head + head) * n_split + split;
    if (start >= stop) {  // nothing to read: the combine skips this split
        if (threadIdx.x == 0) { part_ml[base * 2] = NEG_INF; part_ml[base * 2 + 1] = 0.f; }
        return;
    }
    const u16* k_cache = slot_layer(seq.k, seq, layer);
    const u16* v_cache = slot_layer(seq.v, seq, layer);
    const u16* qh = q + ((size_t)b * n_head + head) * HD;

    float qv[PER], o[PER];
#pragma unroll
    for (int i = 0; i < PER; ++i) {
        qv[i] = h2f(qh[lane * PER + i]) * scale;
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
    const int head = blockIdx.x, b = blockIdx.y, d = threadIdx.x;
    const size_t first = ((size_t)b * gridDim.x + head) * n_split;
    float mm = NEG_INF;
    for (int s = 0; s < n_split; ++s) mm = fmaxf(mm, part_ml[(first + s) * 2]);
    float num = 0.f, den = 0.f;
    for (int s = 0; s < n_split; ++s) {
        const float ms = part_ml[(first + s) * 2];
        if (ms == NEG_INF) continue;
        const float f = __expf(ms - mm);
        num += part_o[(first + s) * HD + d] * f;
        den += part_ml[(first + s) * 2 + 1] * f;
    }
    out[((size_t)b * gridDim.x + head) * HD + d] = f2h(num / den);
}
