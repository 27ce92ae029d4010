"""The model's own jinja chat template, rendered the way transformers' `apply_chat_template` renders it."""

import json
import sys
import time
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gdsllm_core.errors import BadRequestError

RENDER_TIMEOUT_S = 2.0  # real templates render in milliseconds; a model's template is untrusted input
MAX_OUTPUT_CHARS = 1 << 20  # beyond what the messages bring in (a template repeats them at most a few times)
MAX_VALUE_CHARS = 1 << 22  # the largest string or list one `*` may make
MAX_POWER_BITS = 1 << 16  # the largest integer one `**` may make
TEMPLATE_FILENAME = "<template>"  # what jinja compiles templates under: the frames the deadline watches

# transformers' old default: used when a model ships no template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TemplateLimitError(BadRequestError):
    """A chat template ran too long or made too much text."""


class _TemplateAborted(Exception):
    """Raised inside the template's frames when it runs past its deadline."""


class _LimitedSandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, with `*` and `**` refused when their result would be huge."""

    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for sequence, count in ((left, right), (right, left)):
                if isinstance(sequence, str | list | tuple) and isinstance(count, int) and \
                        len(sequence) * count > MAX_VALUE_CHARS:
                    raise _TemplateAborted(f"`*` would make {len(sequence) * count} items")
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and \
                abs(left).bit_length() * right > MAX_POWER_BITS:
            raise _TemplateAborted("`**` would make a huge number")
        return super().call_binop(context, operator, left, right)


class _Deadline:
    """A trace function that aborts the template's own frames (nothing else) once `seconds` have passed."""

    def __init__(self, seconds: float):
        self.at = time.monotonic() + seconds

    def __call__(self, frame, event, arg):
        return self._line if frame.f_code.co_filename == TEMPLATE_FILENAME else None

    def _line(self, frame, event, arg):
        if time.monotonic() > self.at:
            raise _TemplateAborted(f"it ran for more than {RENDER_TIMEOUT_S:g} s")
        return self._line


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}…{% endgeneration %}` marks assistant text for training masks; here it renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, as transformers' does."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    env = _LimitedSandbox(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = dict
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise BadRequestError(f"the model's chat template does not parse: {exc} (line {exc.lineno})",
                              "fix the template in the model's tokenizer config and re-convert") from exc


def render_chat(messages: list[dict], template: str | None = None, add_generation_prompt: bool = True,
                bos_token: str | None = None, eos_token: str | None = None, model: str = "the model",
                **variables) -> str:
    """The prompt text for `messages` ([{"role", "content"}]) with the model's template (ChatML when it has none),
    rendered in jinja2's sandbox within RENDER_TIMEOUT_S and MAX_OUTPUT_CHARS beyond the messages' own size; a
    template that exceeds them is a TemplateLimitError naming `model`."""
    compiled = compile_template(template or CHATML_TEMPLATE)
    tokens = {name: value for name, value in (("bos_token", bos_token), ("eos_token", eos_token)) if value is not None}
    limit = MAX_OUTPUT_CHARS + 4 * sum(len(str(message.get("content") or "")) for message in messages)
    previous_trace = sys.gettrace()
    sys.settrace(_Deadline(RENDER_TIMEOUT_S))
    try:
        parts, size = [], 0
        for part in compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt, **tokens,
                                      **variables):
            size += len(part)
            if size > limit:
                raise _TemplateAborted(f"it made more than {limit} characters")
            parts.append(part)
        return "".join(parts)
    except _TemplateAborted as exc:
        raise TemplateLimitError(f"the chat template of {model} was stopped: {exc}",
                                 "the template is broken or hostile: fix it in the model's tokenizer config and "
                                 "re-convert, or use a raw prompt") from None
    except jinja2.TemplateError as exc:
        raise BadRequestError(f"the model's chat template refused these messages: {exc}",
                              "check the roles and their order (many templates want user/assistant turns "
                              "alternating, with at most one system message first)") from exc
    finally:
        sys.settrace(previous_trace)
