// The per-step table of decode sequences the RoPE and attention kernels read (int64 fields, written by the host
// into one fixed device buffer before each step, so one CUDA graph serves any set of KV caches).
// Each sequence's caches are fp16 [n_layers, max_T, n_kv, hd]; `layer_stride` is max_T * n_kv * hd elements.
#pragma once

struct SeqSlot {
    long long pos;           // position of the sequence's first new token
    long long len;           // cached positions attention reads (the new token's included)
    long long k, v;          // addresses of the k and v caches (layer 0)
    long long layer_stride;  // elements from one layer to the next
};

__device__ __forceinline__ unsigned short* slot_layer(long long base, const SeqSlot& s, int layer) {
    return reinterpret_cast<unsigned short*>(base) + (size_t)layer * s.layer_stride;
}
