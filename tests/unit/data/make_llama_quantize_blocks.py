"""Make `llama_quantize_blocks.gguf`: a few rows of one tensor per type, as llama.cpp's llama-quantize writes them.

The committed fixture lets CI check gdsllm's dequantization against blocks from ggml's own quantizer without a
llama.cpp build. Run it again (a llama.cpp build with llama-quantize is needed) when a type is added:

    python tests/unit/data/make_llama_quantize_blocks.py /path/to/llama.cpp/build/bin/llama-quantize

It writes a one-layer LLaMA GGUF of random f32 weights with gguf-py, an importance matrix for it (the IQ1/IQ2 types
refuse to quantize without one; llama-imatrix needs a real model, so the sums of squared activations are made up),
runs `llama-quantize --pure` once per type and keeps the first ROWS rows of one quantized tensor of each type.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFWriter

# llama-quantize file types (its IQ2_M files are mostly IQ2_S tensors, its IQ2_S files IQ2_XS ones)
TYPES = ("IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_M", "IQ1_S", "IQ1_M", "MXFP4_MOE")
DIM = 512  # values per row: two 256-value super-blocks
ROWS = 8  # rows kept per type
SOURCE_TENSOR = "blk.0.ffn_down.weight"
OUT = Path(__file__).with_name("llama_quantize_blocks.gguf")


def write_model(path: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    writer = GGUFWriter(str(path), arch="llama")
    for key, value in (("block_count", 1), ("context_length", 64), ("embedding_length", DIM),
                       ("feed_forward_length", DIM), ("head_count", 4), ("head_count_kv", 4)):
        getattr(writer, f"add_{key}")(value)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(256)])
    tensors = {"token_embd.weight": (256, DIM), "output.weight": (256, DIM), "output_norm.weight": (DIM,),
               "blk.0.attn_norm.weight": (DIM,), "blk.0.ffn_norm.weight": (DIM,)}
    for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
        tensors[f"blk.0.{name}.weight"] = (DIM, DIM)
    weights = {}
    for name, shape in tensors.items():
        # heavy-tailed weights, as trained ones are, so the quantizers pick varied scales and grid points
        weights[name] = (rng.standard_t(4, size=shape) * 0.02).astype(np.float32)
        writer.add_tensor(name, weights[name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


def write_imatrix(path: Path, weights: dict[str, np.ndarray], rng: np.random.Generator) -> None:
    writer = GGUFWriter(str(path), arch="imatrix")
    writer.add_array("imatrix.datasets", ["random"])
    writer.add_uint32("imatrix.chunk_count", 1)
    writer.add_uint32("imatrix.chunk_size", 64)
    for name, weight in weights.items():
        if weight.ndim == 2:
            writer.add_tensor(f"{name}.in_sum2", rng.gamma(2.0, 1.0, size=(1, weight.shape[1])).astype(np.float32))
            writer.add_tensor(f"{name}.counts", np.ones((1, 1), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main(quantize_binary: str) -> None:
    rng = np.random.default_rng(18)
    with tempfile.TemporaryDirectory() as tmp:
        model, imatrix = Path(tmp, "f32.gguf"), Path(tmp, "imatrix.gguf")
        weights = write_model(model, rng)
        write_imatrix(imatrix, weights, rng)
        out = GGUFWriter(str(OUT), arch="quant-fixture")
        out.add_string("fixture.source_tensor", SOURCE_TENSOR)
        for ftype in TYPES:
            quantized = Path(tmp, f"{ftype}.gguf")
            subprocess.run([quantize_binary, "--pure", "--imatrix", str(imatrix), str(model), str(quantized), ftype],
                           check=True, capture_output=True)
            tensor = next(t for t in GGUFReader(quantized).tensors if t.name == SOURCE_TENSOR)
            qtype = tensor.tensor_type
            rows = np.asarray(tensor.data).reshape(DIM, -1)[:ROWS]
            out.add_tensor(qtype.name, np.ascontiguousarray(rows), raw_dtype=qtype)
            out.add_tensor(f"{qtype.name}.source", weights[SOURCE_TENSOR][:ROWS])
        out.write_header_to_file()
        out.write_kv_data_to_file()
        out.write_tensors_to_file()
        out.close()
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main(sys.argv[1])
