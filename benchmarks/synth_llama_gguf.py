# ruff: noqa
"""(Copied from the team tools, ../shared/tools/synth_llama_gguf.py.) Write a LLaMA-shaped GGUF with random quantized blocks (timing only: the weights are noise).
usage: synth_llama_gguf.py OUT.gguf [--type Q4_0|Q8_0] [--layers 32] [--d 4096] [--ffn 11008] [--vocab 32000]"""
import argparse
import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q

ap = argparse.ArgumentParser()
ap.add_argument("out"); ap.add_argument("--type", default="Q4_0"); ap.add_argument("--layers", type=int, default=32)
ap.add_argument("--d", type=int, default=4096); ap.add_argument("--ffn", type=int, default=11008)
ap.add_argument("--vocab", type=int, default=32000); ap.add_argument("--heads", type=int, default=32)
ap.add_argument("--kv-heads", type=int, default=32)
a = ap.parse_args()
qt = Q[a.type]
block, nbytes = gguf.GGML_QUANT_SIZES[qt]
rng = np.random.default_rng(0)

def qtensor(rows, cols):
    nb = cols // block
    x = rng.integers(0, 256, size=(rows, nb, nbytes), dtype=np.uint8)
    scale = (rng.standard_normal((rows, nb)) * 0.01).astype(np.float16).view(np.uint8).reshape(rows, nb, 2)
    x[:, :, 0:2] = scale  # Q4_0 / Q8_0 blocks start with an fp16 scale
    return x.reshape(rows, nb * nbytes)

w = gguf.GGUFWriter(a.out, arch="llama")
hd = a.d // a.heads
w.add_context_length(4096); w.add_embedding_length(a.d); w.add_block_count(a.layers)
w.add_feed_forward_length(a.ffn); w.add_head_count(a.heads); w.add_head_count_kv(a.kv_heads)
w.add_rope_dimension_count(hd); w.add_layer_norm_rms_eps(1e-5); w.add_file_type(2 if a.type == "Q4_0" else 7)
toks = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
toks += [f"t{i}" for i in range(a.vocab - len(toks))]
types = [2, 3, 3] + [6] * 256 + [1] * (a.vocab - 259)
w.add_tokenizer_model("llama"); w.add_token_list(toks); w.add_token_scores([0.0] * a.vocab); w.add_token_types(types)
w.add_bos_token_id(1); w.add_eos_token_id(2)
w.add_tensor("token_embd.weight", qtensor(a.vocab, a.d), raw_dtype=qt)
w.add_tensor("output_norm.weight", np.ones(a.d, np.float32))
w.add_tensor("output.weight", qtensor(a.vocab, a.d), raw_dtype=qt)
kv = a.kv_heads * hd
for i in range(a.layers):
    p = f"blk.{i}."
    w.add_tensor(p + "attn_norm.weight", np.ones(a.d, np.float32))
    w.add_tensor(p + "ffn_norm.weight", np.ones(a.d, np.float32))
    for n, (r, c) in {"attn_q": (a.d, a.d), "attn_k": (kv, a.d), "attn_v": (kv, a.d), "attn_output": (a.d, a.d),
                      "ffn_gate": (a.ffn, a.d), "ffn_up": (a.ffn, a.d), "ffn_down": (a.d, a.ffn)}.items():
        w.add_tensor(p + n + ".weight", qtensor(r, c), raw_dtype=qt)
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
print("wrote", a.out)
