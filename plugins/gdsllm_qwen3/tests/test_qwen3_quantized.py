"""Lightly trained tiny Qwen models (a few hundred seeded CPU steps on a small text, so the greedy path is stable),
converted by llama.cpp's converter and quantized by its llama-quantize to Q4_K_M and IQ4_XS: the first 16 greedy
tokens equal those of transformers running the same file's weights (dequantized by gguf-py). Needs llama.cpp's
built tools: `nox -s llamacpp`."""

import pytest
import torch
from qwen3_testing import ARCHS, add_tokenizer, make_model

from gdsllm_core import testing
from gdsllm_core.convert import convert
from gdsllm_core.engine.forward import LoadOptions
from gdsllm_core.layout.store import ModelStore
from gdsllm_qwen3.forward import QwenForward

pytestmark = pytest.mark.llamacpp
TRAIN_STEPS = 200
WINDOW = 48
GREEDY = 16
# rows of a multiple of 256 values, so llama-quantize really writes K- and IQ-quants
TRAINED_SHAPE = dict(hidden_size=256, intermediate_size=512, head_dim=64, num_attention_heads=4,
                     num_key_value_heads=2)
MOE_SHAPE = dict(moe_intermediate_size=256)


def text_ids(folder, arch: str) -> list[int]:
    if arch == "qwen3moe":
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(folder / "tokenizer.json")).encode(testing.TRAINING_TEXT).ids
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).encode(
        testing.TRAINING_TEXT)


def train(model, ids: list[int]) -> None:
    """A few hundred AdamW steps of next-token prediction on random windows of `ids` (seeded)."""
    generator = torch.Generator().manual_seed(0)
    data = torch.tensor(ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(TRAIN_STEPS):
        starts = torch.randint(0, len(ids) - WINDOW - 1, (8,), generator=generator)
        batch = torch.stack([data[s:s + WINDOW + 1] for s in starts.tolist()])
        loss = model(batch[:, :-1], labels=batch[:, :-1]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, tuple]:
    """arch -> (HF folder of the trained model, its f16 GGUF, the prompt)."""
    if testing.llama_quantize_binary() is None:
        pytest.skip("llama-quantize not built: run `nox -s llamacpp` (or set GDSLLM_LLAMACPP_BIN)")
    root = tmp_path_factory.mktemp("qwen3_trained")
    made = {}
    for arch in ARCHS:
        folder = root / arch
        folder.mkdir()
        add_tokenizer(arch, folder)
        ids = text_ids(folder, arch)
        model = make_model(arch, **TRAINED_SHAPE, **(MOE_SHAPE if arch == "qwen3moe" else {}))
        train(model, ids)
        model.save_pretrained(folder)
        made[arch] = (folder, testing.convert_hf_to_gguf(folder, root / f"{arch}-f16.gguf"), ids[:8])
    return made


def greedy_ours(entry, prompt: list[int]) -> list[int]:
    forward = QwenForward(entry, LoadOptions())
    try:
        cache = forward.new_cache(64)
        tokens = [int(forward.prefill(torch.tensor(prompt), cache).argmax())]
        while len(tokens) < GREEDY:
            tokens.append(int(forward.decode(torch.tensor([tokens[-1]]), [cache])[0].argmax()))
        return tokens
    finally:
        forward.close()


@pytest.mark.parametrize("kind", ["Q4_K_M", "IQ4_XS"])
@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_greedy_tokens_match_transformers(arch, kind, trained, tmp_path):
    from transformers import AutoModelForCausalLM

    folder, f16, prompt = trained[arch]
    quantized = testing.llama_quantize(f16, tmp_path / f"{arch}-{kind}.gguf", kind)
    entry = convert(quantized, ModelStore(tmp_path / "store"), arch)
    assert entry.manifest.quant == kind
    same_weights = testing.hf_checkpoint_from_gguf(quantized, folder, tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(same_weights, dtype=torch.float32).eval()
    _logits, fed = testing.hf_logits_with_cache(model, prompt, GREEDY)
    assert greedy_ours(entry, prompt) == fed
