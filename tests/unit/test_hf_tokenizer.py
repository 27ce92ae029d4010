"""A Hugging Face folder's tokenizer as the manifest keeps it, checked against transformers reading the same folder."""

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

from gdsllm_core.convert.hf_tokenizer import read_hf_tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture
def folder(tmp_path):
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["the capital of france is paris"] * 50, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": "{% for m in messages %}config:{{ m.content }}{% endfor %}"}))
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}jinja:{{ m.content }}{% endfor %}")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": None}))
    return tmp_path


def test_template_bos_and_ids_agree_with_transformers(folder):
    info, files = read_hf_tokenizer(folder, eos_ids=[1], bos_id=0)
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    assert info.chat_template == reference.chat_template
    assert info.eos_ids == [1] and info.bos_id == 0 and info.add_bos
    ours = Tokenizer.from_str(files["tokenizer.json"].decode())
    text = "the capital of france is paris"
    assert [info.bos_id] + ours.encode(text).ids == reference.encode(text)


def test_generation_config_eos_wins_and_weights_only_folders_say_none(folder, tmp_path_factory):
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 0]}))
    info, _ = read_hf_tokenizer(folder, eos_ids=[7], bos_id=None)
    assert info.eos_ids == [1, 0] and not info.add_bos
    empty = tmp_path_factory.mktemp("weights-only")
    info, files = read_hf_tokenizer(empty, eos_ids=[2], bos_id=1)
    assert (info.kind, info.eos_ids, files) == ("none", [2], {})
