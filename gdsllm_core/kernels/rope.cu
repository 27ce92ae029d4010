// Rotary position embedding fused with the KV-cache write.
//
// For T tokens at positions pos[0] + t (pos read from device memory, so CUDA graphs can replay it): rotates q
// (fp32 [T, n_head, hd]) into q_out (fp16), rotates k (fp32 [T, n_kv, hd]) and copies v into the layer's cache
// (fp16 [max_T, n_kv, hd]) at those positions. The first `rot` dims of each head rotate in pairs: (i, i + rot/2)
// when neox is set (HF layout), (2i, 2i+1) otherwise (GGUF's permuted Q/K rows); the rest pass through.
// inv_freq [rot/2] comes from the host so any RoPE scaling is honoured. Grid (n_head + 2 * n_kv, T), hd/2 threads.
#include "ggml_blocks.cuh"

extern "C" __global__ void rope_store(const float* __restrict__ q, const float* __restrict__ k,
                                      const float* __restrict__ v, const int* __restrict__ pos0,
                                      const float* __restrict__ inv_freq, int n_head, int n_kv, int hd, int rot,
                                      int neox, u16* __restrict__ q_out, u16* __restrict__ k_cache,
                                      u16* __restrict__ v_cache) {
    const int head = blockIdx.x, t = blockIdx.y, i = threadIdx.x;  // i: pair index, < hd / 2
    const int p = pos0[0] + t;
    const float* src;
    u16* dst;
    bool rotate = true;
    if (head < n_head) {
        src = q + ((size_t)t * n_head + head) * hd;
        dst = q_out + ((size_t)t * n_head + head) * hd;
    } else if (head < n_head + n_kv) {
        src = k + ((size_t)t * n_kv + (head - n_head)) * hd;
        dst = k_cache + ((size_t)p * n_kv + (head - n_head)) * hd;
    } else {
        src = v + ((size_t)t * n_kv + (head - n_head - n_kv)) * hd;
        dst = v_cache + ((size_t)p * n_kv + (head - n_head - n_kv)) * hd;
        rotate = false;
    }
    const int half_rot = rot / 2;
    if (!rotate || i >= half_rot) {  // pass-through dims: thread i copies dims 2i and 2i+1 beyond the rotated part
        if (!rotate) {
            dst[2 * i] = f2h(src[2 * i]);
            dst[2 * i + 1] = f2h(src[2 * i + 1]);
        } else {
            const int j = rot + 2 * (i - half_rot);
            if (j < hd) dst[j] = f2h(src[j]);
            if (j + 1 < hd) dst[j + 1] = f2h(src[j + 1]);
        }
        return;
    }
    const int a = neox ? i : 2 * i, b = neox ? i + half_rot : 2 * i + 1;
    const float angle = (float)p * inv_freq[i];
    float s, c;
    sincosf(angle, &s, &c);
    const float x0 = src[a], x1 = src[b];
    dst[a] = f2h(x0 * c - x1 * s);
    dst[b] = f2h(x0 * s + x1 * c);
}
