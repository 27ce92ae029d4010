"""Streaming detokenization equals a full decode of the same ids, on real tokenizers: SmolLM2's byte-level BPE (as
transformers reads it from the bundled GGUF) and a SentencePiece model with byte fallback trained here."""

import json
import random

import pytest

from gdsllm_core.engine.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer
from gdsllm_core.engine.tokenizer import Tokenizer
from gdsllm_core.layout.manifest import TokenizerInfo

TEXTS = [
    "Hello world! The capital of France is Paris.",
    "  leading spaces,\ttabs\nand\n\nnew lines  ",
    "Emoji: 🎉🚀 👩‍👩‍👧 family, flags 🇫🇷, mixed é à ü ß ø.",
    "中文测试：你好，世界。日本語のテキスト、한국어 텍스트.",
    "def f(x):\n    return x ** 2  # code",
    "Ünïcödé at the start, 🎉 at the end 🎉",
]


def _stream(tokenizer, ids, context=None):
    detokenizer = IncrementalDetokenizer(tokenizer, context_ids=context)
    pieces = [detokenizer.add(token_id) for token_id in ids]
    pieces.append(detokenizer.flush())
    return pieces


@pytest.fixture(scope="module")
def smollm2_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from gdsllm_core.bundled import default_gguf

    gguf = default_gguf()
    reference = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    folder = tmp_path_factory.mktemp("smollm2_tokenizer")
    reference.backend_tokenizer.save(str(folder / "tokenizer.json"))
    info = TokenizerInfo(kind="hf", file="tokenizer.json", bos_id=reference.bos_token_id,
                         eos_ids=[reference.eos_token_id])
    return Tokenizer.from_info(info, folder), reference


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(tmp_path_factory):
    import sentencepiece

    folder = tmp_path_factory.mktemp("spm")
    corpus = folder / "corpus.txt"
    rng = random.Random(0)
    words = ["the", "capital", "of", "France", "is", "Paris", "hello", "world", "model", "token", "stream", "space"]
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=300, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    info = TokenizerInfo(kind="sentencepiece", file="tokenizer.model", bos_id=1, eos_ids=[2], add_bos=True)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    return Tokenizer.from_info(info, folder), processor


@pytest.fixture(scope="module")
def sentencepiece_as_hf(sentencepiece_tokenizer, tmp_path_factory):
    """The same model as tokenizer.json the way LLaMA-2-style models ship it (Metaspace, byte fallback, Strip)."""
    from transformers import AutoTokenizer

    _, processor = sentencepiece_tokenizer
    folder = tmp_path_factory.mktemp("spm_hf")
    (folder / "tokenizer.model").write_bytes(processor.serialized_model_proto())
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    reference = AutoTokenizer.from_pretrained(folder)
    reference.backend_tokenizer.save(str(folder / "tokenizer.json"))
    info = TokenizerInfo(kind="hf", file="tokenizer.json", bos_id=1, eos_ids=[2], add_bos=True)
    return Tokenizer.from_info(info, folder), reference


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_stream_equals_full_decode(smollm2_tokenizer, text):
    tokenizer, reference = smollm2_tokenizer
    ids = reference.encode(text, add_special_tokens=False)
    assert tokenizer.encode(text, add_special=False) == ids
    pieces = _stream(tokenizer, ids)
    assert "".join(pieces) == reference.decode(ids) == text
    assert not any(REPLACEMENT_CHAR in piece for piece in pieces)


def test_smollm2_multibyte_characters_wait_for_their_last_byte(smollm2_tokenizer):
    tokenizer, reference = smollm2_tokenizer
    ids = reference.encode("🎉", add_special_tokens=False)
    assert len(ids) > 1  # the emoji's bytes come in several tokens
    pieces = _stream(tokenizer, ids)
    assert pieces[:-2] == [""] * (len(ids) - 1) and "".join(pieces) == "🎉"


def test_smollm2_stream_after_a_chat_prompt(smollm2_tokenizer):
    """With the prompt's tail as context, the first new token keeps its leading space and specials are skipped."""
    tokenizer, reference = smollm2_tokenizer
    prompt = reference.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    answer = reference.encode(" Paris, 🎉 of course.", add_special_tokens=False)
    pieces = _stream(tokenizer, answer, context=prompt)
    assert "".join(pieces) == " Paris, 🎉 of course."
    full = reference.decode(prompt + answer, skip_special_tokens=True)
    assert full.endswith("".join(pieces))


def test_smollm2_random_token_streams(smollm2_tokenizer):
    tokenizer, reference = smollm2_tokenizer
    rng = random.Random(1)
    specials = set(reference.all_special_ids)
    for _ in range(30):
        ids = [i for i in (rng.randrange(reference.vocab_size) for _ in range(40)) if i not in specials]
        assert "".join(_stream(tokenizer, ids)) == reference.decode(ids)


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_byte_fallback_stream_equals_full_decode(sentencepiece_tokenizer, text):
    tokenizer, processor = sentencepiece_tokenizer
    ids = processor.encode(text)
    assert tokenizer.encode(text, add_special=False) == ids
    assert tokenizer.encode(text)[0] == 1  # BOS added when the model asks for it
    pieces = _stream(tokenizer, ids)
    assert "".join(pieces) == processor.decode(ids)
    assert not any(REPLACEMENT_CHAR in piece for piece in pieces)


def test_sentencepiece_keeps_leading_spaces_token_by_token(sentencepiece_tokenizer):
    tokenizer, processor = sentencepiece_tokenizer
    prompt = processor.encode("hello world the")
    answer = processor.encode("hello world the capital of France is Paris 🎉")[len(prompt):]
    pieces = _stream(tokenizer, answer, context=[1] + prompt)
    assert "".join(pieces) == " capital of France is Paris 🎉"
    assert processor.decode(prompt + answer) == processor.decode(prompt) + "".join(pieces)


def test_sentencepiece_control_tokens_in_text(sentencepiece_tokenizer):
    tokenizer, processor = sentencepiece_tokenizer
    ids = tokenizer.encode("<s>hello</s>world", add_special=True)
    assert ids == [1] + processor.encode("hello") + [2] + processor.encode("world")
    assert tokenizer.decode(ids) == processor.decode(ids)
    assert tokenizer.decode(ids, skip_special=False) == "<s>hello</s>world"


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_tokenizer_json_stream_equals_full_decode(sentencepiece_as_hf, text):
    tokenizer, reference = sentencepiece_as_hf
    ids = reference.encode(text, add_special_tokens=False)
    assert tokenizer.encode(text, add_special=False) == ids
    pieces = _stream(tokenizer, ids)
    assert "".join(pieces) == reference.decode(ids)
    assert not any(REPLACEMENT_CHAR in piece for piece in pieces)
    prompt = reference.encode("hello world the", add_special_tokens=False)
    streamed = "".join(_stream(tokenizer, ids, context=[1] + prompt))
    assert reference.decode([1] + prompt + ids, skip_special_tokens=True) == \
        reference.decode([1] + prompt, skip_special_tokens=True) + streamed


def test_tokenizer_errors_name_the_file_and_the_kind(tmp_path):
    from gdsllm_core.errors import CorruptModelError

    with pytest.raises(CorruptModelError, match=r"tokenizer file .*tokenizer.json is missing"):
        Tokenizer.from_info(TokenizerInfo(kind="hf", file="tokenizer.json"), tmp_path)
    (tmp_path / "tokenizer.bin").write_bytes(b"x")
    with pytest.raises(CorruptModelError, match="unknown tokenizer kind 'tiktoken'"):
        Tokenizer.from_info(TokenizerInfo(kind="tiktoken", file="tokenizer.bin"), tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CorruptModelError, match="cannot read tokenizer"):
        Tokenizer.from_info(TokenizerInfo(kind="hf", file="tokenizer.json"), tmp_path)


def test_end_of_turn_tokens_stop_too(smollm2_tokenizer):
    tokenizer, reference = smollm2_tokenizer
    assert reference.convert_tokens_to_ids("<|im_end|>") in tokenizer.eos_ids
    assert reference.convert_tokens_to_ids("<|endoftext|>") in tokenizer.eos_ids
    assert tokenizer.bos_token == reference.bos_token and tokenizer.eos_token == reference.eos_token
