"""Chat templates render exactly as transformers' `apply_chat_template` renders them."""

import functools

import pytest
from tokenizers import Tokenizer as HfTokenizer
from tokenizers import models
from transformers import PreTrainedTokenizerFast

from gdsllm_core.engine.chat_template import render_chat
from gdsllm_core.errors import BadRequestError

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# Block tags on their own lines: trim_blocks / lstrip_blocks decide the whitespace here.
FEATURES = """{%- set ns = namespace(count=0) -%}
{% for message in messages %}
    {% if message['role'] == 'system' %}
        {% continue %}
    {% endif %}
    {% set ns.count = ns.count + 1 %}
    <{{ message['role'] }} n={{ ns.count }}>{{ message['content'] }}
    {% if message['role'] == 'assistant' %}
{% generation %}{{ eos_token }}{% endgeneration %}
    {% endif %}
    {% if ns.count > 3 %}{% break %}{% endif %}
{% endfor %}
meta: {{ {"year": strftime_now("%Y")[:2], "n": messages | length} | tojson }}
{% if add_generation_prompt %}
<assistant>
{% endif %}"""

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "  And of Italy? ü 你好 🎉 "},
]


@pytest.fixture(scope="module")
def reference():
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2}
    backend = HfTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@functools.cache
def _smollm2_template() -> str:
    from gguf import GGUFReader

    from gdsllm_core.bundled import default_gguf

    return GGUFReader(default_gguf()).fields["tokenizer.chat_template"].contents()


@pytest.mark.parametrize("name", ["smollm2", "llama3", "llama2", "features"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:]], ids=["system", "no-system"])
def test_matches_transformers(reference, name, add_generation_prompt, messages):
    template = {"smollm2": _smollm2_template, "llama3": lambda: LLAMA3, "llama2": lambda: LLAMA2,
                "features": lambda: FEATURES}[name]()
    expected = reference.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    ours = render_chat(messages, template, add_generation_prompt=add_generation_prompt, bos_token="<s>",
                       eos_token="</s>")
    assert ours == expected


def test_raise_exception_becomes_a_bad_request(reference):
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="must alternate"):
        reference.apply_chat_template(messages, chat_template=LLAMA2, tokenize=False)
    with pytest.raises(BadRequestError, match="must alternate"):
        render_chat(messages, LLAMA2, bos_token="<s>", eos_token="</s>")


def test_chatml_fallback_without_a_template():
    assert render_chat(CONVERSATION[:2], None) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_sandbox_refuses_unsafe_access():
    with pytest.raises(Exception, match="unsafe|SecurityError|not safely|access"):
        render_chat(CONVERSATION, "{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}")
    with pytest.raises(BadRequestError, match="does not parse"):
        render_chat(CONVERSATION, "{% for m in messages %}")
