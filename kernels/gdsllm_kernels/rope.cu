// Rotary position embedding fused with the KV-cache write, for B sequences of T new tokens each in one launch.
//
// Row r = b * T + t of q (fp32 [B*T, n_head, hd]), k, v (fp32 [B*T, n_kv, hd]) is token t of sequence b, at
// position seqs[b].pos + t (read from device memory, so CUDA graphs can replay it): q is rotated into q_out (fp16),
// k rotated and v copied into layer `layer` of sequence b's caches (see seq_slots.cuh) at that position. The first
// `rot` dims of each head rotate in pairs: (i, i + rot/2) when neox is set (HF layout), (2i, 2i+1) otherwise
// (GGUF's permuted Q/K rows); the rest pass through. inv_freq [rot/2] comes from the host so any RoPE scaling is
// honoured. Grid (n_head + 2 * n_kv, T, B), hd/2 threads.
#include "ggml_blocks.cuh"
#include "seq_slots.cuh"

extern "C" __global__ void rope_store(const float* __restrict__ q, const float* __restrict__ k,
                                      const float* __restrict__ v, const SeqSlot* __restrict__ seqs, int layer,
                                      const float* __restrict__ inv_freq, int n_head, int n_kv, int hd, int rot,
                                      int neox, u16* __restrict__ q_out) {
    const int head = blockIdx.x, t = blockIdx.y, b = blockIdx.z, i = threadIdx.x;  // i: pair index, < hd / 2
    const SeqSlot seq = seqs[b];
    const size_t row = (size_t)b * gridDim.y + t;
    const long long p = seq.pos + t;
    const float* src;
    u16* dst;
    bool rotate = true;
    if (head < n_head) {
        src = q + (row * n_head + head) * hd;
        dst = q_out + (row * n_head + head) * hd;
    } else if (head < n_head + n_kv) {
        src = k + (row * n_kv + (head - n_head)) * hd;
        dst = slot_layer(seq.k, seq, layer) + ((size_t)p * n_kv + (head - n_head)) * hd;
    } else {
        src = v + (row * n_kv + (head - n_head - n_kv)) * hd;
        dst = slot_layer(seq.v, seq, layer) + ((size_t)p * n_kv + (head - n_head - n_kv)) * hd;
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
    const int a = neox ? i : 2 * i, c2 = neox ? i + half_rot : 2 * i + 1;
    const float angle = (float)p * inv_freq[i];
    float s, c;
    sincosf(angle, &s, &c);
    const float x0 = src[a], x1 = src[c2];
    dst[a] = f2h(x0 * c - x1 * s);
    dst[c2] = f2h(x0 * s + x1 * c);
}
