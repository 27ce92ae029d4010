"""The tokenizer.json built from GGUF metadata gives the ids of independent references: transformers' GGUF
tokenizer (byte-level BPE, SmolLM2) and sentencepiece itself (LLaMA-2-style vocabulary with scores)."""

import io

import pytest
import sentencepiece as spm
from gguf import GGUFReader, GGUFWriter
from tokenizers import Tokenizer

from gdsllm_core.convert.gguf_tokenizer import build_tokenizer
from gdsllm_llama.gguf_convert import read_metadata

TEXTS = [
    "Hello world!",
    "What is the capital of France?",
    "  leading spaces,\ttabs\n\nand newlines  ",
    "Ünïcödé — 日本語のテキスト, émojis 🤖🎉 and ∑ math",
    "12345 + 678 = 13023; pi is 3.14159",
    "don't, I'll, we've, THEY'RE",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
]


def test_smollm2_tokenizer_matches_transformers(smollm2, smollm2_hf_tokenizer):
    ours = Tokenizer.from_file(str(smollm2.path / smollm2.manifest.tokenizer.file))
    for text in TEXTS:
        expected = smollm2_hf_tokenizer.encode(text, add_special_tokens=False)
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ids == expected, text
        assert ours.decode(ids, skip_special_tokens=False) == text


def test_smollm2_tokenizer_info(smollm2, smollm2_gguf):
    meta = read_metadata(GGUFReader(smollm2_gguf))
    info = smollm2.manifest.tokenizer
    assert info.kind == "hf" and info.file == "tokenizer.json"
    assert info.bos_id == meta["tokenizer.ggml.bos_token_id"]
    assert info.eos_ids[0] == meta["tokenizer.ggml.eos_token_id"]
    assert meta["tokenizer.ggml.tokens"][info.eos_ids[0]] == "<|im_end|>"
    assert info.add_bos is bool(meta["tokenizer.ggml.add_bos_token"])
    assert info.chat_template == meta["tokenizer.chat_template"]


CORPUS = """The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and arrows.
Language models read tokens; tokenizers turn text into tokens and back again without losing a single byte.
Numbers like 42, 1999 and 3.14 appear too, as do names: Paris, London, Berlin, Tokyo and New York City.
""" * 20


@pytest.fixture(scope="module")
def sentencepiece_gguf(tmp_path_factory):
    """A tiny SentencePiece BPE model (byte fallback, LLaMA-2 settings) and a vocab-only GGUF holding it."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()), model_writer=model, model_type="bpe", vocab_size=400,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True,
        bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    tokens, scores, types = [], [], []
    for i in range(processor.get_piece_size()):
        tokens.append(processor.id_to_piece(i))
        scores.append(processor.get_score(i))
        types.append(3 if processor.is_control(i) else 2 if processor.is_unknown(i) else
                     6 if processor.is_byte(i) else 1)
    path = tmp_path_factory.mktemp("spm") / "vocab.gguf"
    writer = GGUFWriter(str(path), arch="llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template("{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return processor, path


def test_sentencepiece_vocab_matches_sentencepiece(sentencepiece_gguf):
    processor, path = sentencepiece_gguf
    info, files = build_tokenizer(read_metadata(GGUFReader(path)))
    ours = Tokenizer.from_str(files["tokenizer.json"].decode())
    assert info.bos_id == 1 and info.eos_ids[0] == 2 and info.add_bos  # LLaMA 2 vocabularies add BOS by default
    assert info.chat_template.startswith("{% for m in messages %}")
    for text in TEXTS[:6] + ["The fox jumps over the dog in Paris.", "zebra quokka ørsted"]:
        expected = processor.encode(text)
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ids == expected, text
        assert ours.decode(ids) == processor.decode(expected)
