"""Tool calling: which format a model's chat template writes tool calls in, the grammar that forces a call (for
`tool_choice` "required" or a named tool), and the parser that finds calls in the generated text, whole or streamed.

Formats (each family's own, as its template teaches the model):
- "hermes" (Qwen, Hermes): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call;
- "llama3" (Llama 3.1+): the bare object `{"name": ..., "parameters": {...}}` (after `<|python_tag|>`, a special
  token the detokenizer drops);
- "mistral": `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (`[TOOL_CALLS]` is a control token, dropped)."""

import json
import re
from typing import Literal

from llguidance import StructTag

from gdsllm_core.engine.grammar import JSON_OPTIONS
from gdsllm_core.errors import BadRequestError
from gdsllm_core.types import Grammar, ToolCall

ToolFormat = Literal["hermes", "llama3", "mistral"]
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_MARK = "[TOOL_CALLS]"
HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
HERMES_UNCLOSED = re.compile(r"<tool_call>\s*(.*?)\s*$", re.DOTALL)  # a last block cut off by EOS or the limit
ARGUMENT_KEYS = {"hermes": "arguments", "llama3": "parameters", "mistral": "arguments"}


def tool_format(template: str | None) -> ToolFormat | None:
    """The tool-call format a chat template teaches, or None when it renders no tools."""
    if not template or "tools" not in template:
        return None
    if HERMES_OPEN in template:
        return "hermes"
    if MISTRAL_MARK in template:
        return "mistral"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3"
    return None


def check_tools(tools: list[dict]) -> None:
    """BadRequestError naming the tool when one is not `{"type": "function", "function": {"name": ...}}`."""
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type", "function") != "function" or not isinstance(function, dict) or \
                not isinstance(function.get("name"), str) or not function["name"]:
            raise BadRequestError(f"tools[{index}] is not a function tool with a name",
                                  "send {\"type\": \"function\", \"function\": {\"name\": ..., \"parameters\": ...}}")


def _call_schema(tool: dict, arguments_key: str) -> dict:
    function = tool["function"]
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    return {"type": "object", "properties": {"name": {"const": function["name"]}, arguments_key: parameters},
            "required": ["name", arguments_key], "additionalProperties": False}


def _calls_schema(fmt: ToolFormat, tools: list[dict]) -> dict:
    return {"anyOf": [_call_schema(tool, ARGUMENT_KEYS[fmt]) for tool in tools], "x-guidance": JSON_OPTIONS}


def auto_grammar(fmt: ToolFormat, tools: list[dict]) -> Grammar | None:
    """For tool_choice "auto": free text, but once the model opens a call, the call must be one of `tools` (a lazy
    trigger, llguidance's structural tag). Hermes only: the other formats open their calls with special tokens."""
    if fmt != "hermes":
        return None
    tag = StructTag(trigger=HERMES_OPEN, begin=HERMES_OPEN + "\n", grammar=_calls_schema(fmt, tools),
                    end="\n" + HERMES_CLOSE)
    return Grammar("lark", StructTag.to_grammar([tag], assume_special=False))


def call_grammar(fmt: ToolFormat, tools: list[dict], parallel: bool) -> Grammar:
    """A grammar whose every output is one call (several when `parallel`) of one of `tools`, in `fmt`."""
    call = f"%json {json.dumps(_calls_schema(fmt, tools))}"
    if fmt == "hermes":
        block = "\"<tool_call>\\n\" call \"\\n</tool_call>\""
        start = f"start: {block} (\"\\n\" {block})*" if parallel else f"start: {block}"
    elif fmt == "mistral":
        start = "start: \"[\" call (\", \" call)* \"]\"" if parallel else "start: \"[\" call \"]\""
    else:
        start = "start: call"
    return Grammar("lark", f"{start}\ncall: {call}\n")


def _as_call(obj, fmt: ToolFormat) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get(ARGUMENT_KEYS[fmt], obj.get("arguments", obj.get("parameters", {})))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    return ToolCall(obj["name"], arguments) if isinstance(arguments, dict) else None


def parse_tool_calls(text: str, fmt: ToolFormat) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a whole generated text: the calls in `fmt`, and the text around them. A text whose calls
    do not parse is returned whole as content, with no calls; a last Hermes block left unclosed counts if it parses
    (the model ended with EOS) and is dropped otherwise (cut off by the token limit)."""
    if fmt == "hermes":
        calls, content = [], text
        blocks = list(HERMES_BLOCK.finditer(text))
        tail = HERMES_UNCLOSED.search(text, blocks[-1].end() if blocks else 0)
        for match in blocks + ([tail] if tail else []):
            try:
                call = _as_call(json.loads(match.group(1)), fmt)
            except ValueError:
                call = None
            if call is None and match is tail and calls:
                content = content.replace(match.group(0), "", 1)
                continue
            if call is None:
                return text, []
            calls.append(call)
            content = content.replace(match.group(0), "", 1)
        return (content.strip() if calls else text), calls
    body = text.strip().removeprefix(MISTRAL_MARK).strip()
    if not body.startswith("{" if fmt == "llama3" else "["):
        return text, []
    try:
        parsed = json.loads(body)
    except ValueError:
        return text, []
    calls = [_as_call(item, fmt) for item in (parsed if isinstance(parsed, list) else [parsed])]
    return (text, []) if not calls or None in calls else ("", calls)


class ToolCallStream:
    """Streams a generation's text as content until it may be a tool call; from there it holds the text back, and
    `finish()` parses it. Content before a Hermes block is streamed; llama3/mistral calls must start the answer."""

    def __init__(self, fmt: ToolFormat):
        self.fmt = fmt
        self.held = ""
        self.sent = ""
        self.holding = False

    def _marker(self) -> str:
        return {"hermes": HERMES_OPEN, "llama3": "{", "mistral": "["}[self.fmt]

    def feed(self, text: str) -> str:
        """The content that can be sent now."""
        if self.holding:
            self.held += text
            return ""
        pending = self.held + text
        marker = self._marker()
        if self.fmt == "hermes":
            at = pending.find(marker)
            if at >= 0:
                self.holding, self.held = True, pending[at:]
                return self._send(pending[:at])
            keep = next((n for n in range(len(marker) - 1, 0, -1) if pending.endswith(marker[:n])), 0)
            self.held = pending[len(pending) - keep:] if keep else ""
            return self._send(pending[:len(pending) - keep])
        if self.sent.strip() == "":
            stripped = pending.lstrip()
            if not stripped:
                self.held = pending
                return ""
            if stripped.startswith(marker) or stripped.startswith(MISTRAL_MARK):
                self.holding, self.held = True, pending
                return ""
        self.held = ""
        return self._send(pending)

    def _send(self, text: str) -> str:
        self.sent += text
        return text

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content not yet sent, calls) at the end of the generation."""
        if not self.holding:
            return self._send(self.held), []
        content, calls = parse_tool_calls(self.held, self.fmt)
        if not calls:
            return self._send(self.held), []
        return self._send(content if self.fmt == "hermes" and content else ""), calls


def template_tool_calls(calls: list[ToolCall]) -> list[dict]:
    """Tool calls as chat templates read them (OpenAI's shape, the arguments as an object)."""
    return [{"type": "function", "id": call.id, "function": {"name": call.name, "arguments": call.arguments}}
            for call in calls]
