"""`gdsllm run`: chat with a model in the terminal, or answer one prompt."""

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import click

from gdsllm_core.bundled import DEFAULT_MODEL
from gdsllm_core.cli.main import cli, console, err_console
from gdsllm_core.cli.output import CPU_LAYERS_HELP, load_options
from gdsllm_core.errors import BadRequestError, ConversionError, GdsllmError
from gdsllm_core.limits import check_sampling

MULTILINE = '"""'
# SamplingParams' fields as `gdsllm run`'s options spell them, for the errors of limits.check_sampling
FLAG_NAMES = {field: "--" + field.replace("_", "-") for field in ("temperature", "top_k", "top_p", "min_p",
                                                                   "repeat_penalty", "repeat_last_n", "seed")}
DEFAULT_MAX_TOKENS = 2048  # an answer that does not end by itself stops here unless --max-tokens says otherwise
HELP = """Available commands:
  /set parameter NAME VALUE   Set a sampling parameter (/set parameter alone lists them)
  /show parameters            Show the parameters in effect
  /clear          Clear the conversation
  /bye            Exit
  /?, /help       Show this help
Use \"\"\" to begin and end a multi-line message. Ctrl-C stops the answer; Ctrl-D or /bye exits."""


@dataclass
class RunParameters:
    """The sampling settings of a `gdsllm run` session, changed by `/set parameter NAME VALUE` (ollama's names)."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    seed: int | None = None
    num_predict: int = DEFAULT_MAX_TOKENS
    num_ctx: int | None = None
    stop: list[str] = field(default_factory=list)

    # NAME -> (type of VALUE, what it means)
    NAMES = {"temperature": (float, "randomness; 0 picks the most likely token"),
             "top_k": (int, "sample from the k likeliest tokens (0: all)"),
             "top_p": (float, "sample from the smallest set of tokens whose probabilities reach p"),
             "min_p": (float, "drop tokens less likely than min_p times the likeliest"),
             "repeat_penalty": (float, "penalty on tokens seen in the last repeat_last_n"),
             "repeat_last_n": (int, "how far back repeat_penalty looks (-1: the whole context)"),
             "seed": (int, "seed of the sampler"), "num_predict": (int, "tokens an answer may have at most"),
             "num_ctx": (int, "context window in tokens"), "stop": (str, "a stop string (several: several values)")}

    def set(self, name: str, values: list[str]) -> "RunParameters":
        """A copy with NAME set from the text VALUE(s); BadRequestError for an unknown name or a bad value."""
        if name not in self.NAMES:
            raise BadRequestError(f"unknown parameter {name!r}", f"use one of {', '.join(self.NAMES)}")
        kind = self.NAMES[name][0]
        if not values:
            raise BadRequestError(f"/set parameter {name} needs a value")
        if name == "stop":
            return replace(self, stop=list(values))
        try:
            value = kind(values[0])
        except ValueError:
            raise BadRequestError(f"{name} must be {'an integer' if kind is int else 'a number'}, not "
                                  f"{values[0]!r}") from None
        updated = replace(self, **{name: value})
        updated.sampling()  # out-of-range values fail now, not at the next answer
        if name == "num_predict" and value < 1 or name == "num_ctx" and value < 2:
            raise BadRequestError(f"{name} {value} is too small", "use a positive number (num_ctx: at least 2)")
        return updated

    def sampling(self, names: Mapping[str, str] = {}):
        """The SamplingParams of these settings; InvalidFieldError (named as `names` says) for one out of range."""
        from gdsllm_core.types import SamplingParams

        params = SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                                repeat_penalty=self.repeat_penalty, repeat_last_n=self.repeat_last_n,
                                seed=self.seed)
        check_sampling(params, names)
        return params

    def describe(self) -> str:
        return "\n".join(f"{name:<16} {getattr(self, name)}" for name in self.NAMES)


def ensure_model(store, name: str | None) -> str:
    """The model to run: `name`, or the bundled default, converted into the store on first use."""
    if name:
        store.get(name)
        return name
    if store.exists(DEFAULT_MODEL):
        return DEFAULT_MODEL
    from gdsllm_core.bundled import default_gguf
    from gdsllm_core.cli.output import pull_progress
    from gdsllm_core.convert import ConvertOptions, convert

    source = default_gguf()
    err_console.print(f"first run: converting the bundled default model {DEFAULT_MODEL} into {store.root}",
                      highlight=False)
    try:
        with pull_progress() as progress:
            convert(source, store, name=DEFAULT_MODEL, options=ConvertOptions(progress=progress.convert))
    except ConversionError:
        if not store.exists(DEFAULT_MODEL):  # another gdsllm converted it at the same time: use that one
            raise
    return DEFAULT_MODEL


def read_stdin_text() -> str:
    """The prompt piped in: UTF-8 text without NUL bytes, else one clear error."""
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequestError(f"stdin is not UTF-8 text (byte {exc.start} is {data[exc.start]:#04x})",
                              "pipe a text prompt, or pass --prompt") from None
    if "\0" in text:
        raise BadRequestError(f"stdin holds binary data (a NUL byte at {text.index(chr(0))})",
                              "pipe a text prompt, or pass --prompt")
    return text


def read_message(prompt: str = ">>> ") -> str:
    """One user message; `\"\"\"` opens a multi-line message that the next `\"\"\"` closes."""
    line = input(prompt)
    if not line.lstrip().startswith(MULTILINE):
        return line
    first = line.lstrip()[len(MULTILINE):]
    if first.rstrip().endswith(MULTILINE):
        return first.rstrip()[: -len(MULTILINE)]
    lines = [first] if first else []
    while True:
        line = input("... ")
        if line.rstrip().endswith(MULTILINE):
            last = line.rstrip()[: -len(MULTILINE)]
            if last:
                lines.append(last)
            return "\n".join(lines)
        lines.append(line)


def stream_answer(engine, request, verbose: bool) -> tuple[str, bool]:
    """Print the answer as it comes; (text, finished). Ctrl-C cancels the generation and returns finished=False."""
    parts: list[str] = []
    generation = last = None
    try:
        generation = engine.submit(request)
        for event in generation:
            if event.text:
                sys.stdout.write(event.text)
                sys.stdout.flush()
                parts.append(event.text)
            last = event
    except KeyboardInterrupt:
        if generation is not None:
            generation.cancel()
        sys.stdout.write("\n")
        err_console.print("[dim](answer stopped)[/]", highlight=False)
        return "".join(parts), False
    except BaseException:
        if generation is not None:
            generation.cancel()
        if parts:
            sys.stdout.write("\n")
            sys.stdout.flush()
        raise
    sys.stdout.write("\n")
    sys.stdout.flush()
    if verbose and last is not None:
        eval_s = last.eval_ns / 1e9
        rate = last.completion_tokens / eval_s if eval_s > 0 else 0.0
        err_console.print(f"[dim]prompt {last.prompt_tokens + last.cached_tokens} tokens in "
                          f"{last.prompt_eval_ns / 1e9:.2f} s; {last.completion_tokens} tokens in {eval_s:.2f} s "
                          f"({rate:.1f} tok/s); stop: {last.done_reason}; prefix cache: {last.cached_tokens} "
                          "tokens reused[/]", highlight=False)
    if last is not None and last.done_reason == "length" and last.completion_tokens >= request.max_tokens:
        err_console.print(f"[dim](answer cut at {request.max_tokens} tokens: raise it with --max-tokens or "
                          "/set parameter num_predict)[/]", highlight=False)
    return "".join(parts), True


def chat_loop(engine, make_request, system: str | None, verbose: bool, parameters: RunParameters) -> None:
    """The interactive chat; `make_request(messages, parameters)` builds each answer's request."""
    from gdsllm_core.types import ChatMessage

    def fresh() -> list:
        return [ChatMessage(role="system", content=system)] if system else []

    messages = fresh()
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    console.print("[dim]Send a message (/? for help)[/]", highlight=False)
    while True:
        try:
            text = read_message()
        except EOFError:
            sys.stdout.write("\n")
            return
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            console.print("[dim]Use Ctrl + d or /bye to exit.[/]", highlight=False)
            continue
        command = text.strip()
        if not command:
            continue
        if command in ("/bye", "/exit", "/quit"):
            return
        if command == "/clear":
            messages = fresh()
            console.print("[dim]Cleared the conversation.[/]", highlight=False)
            continue
        if command in ("/?", "/help"):
            console.print(HELP, highlight=False, markup=False)
            continue
        if command.split()[:2] == ["/set", "parameter"]:
            words = command.split()
            if len(words) == 2:
                console.print("\n".join(f"  {name:<16} {text}" for name, (_, text) in parameters.NAMES.items()),
                              highlight=False, markup=False)
                continue
            try:
                parameters = parameters.set(words[2], words[3:])
            except GdsllmError as exc:
                err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
                continue
            console.print(f"Set parameter '{words[2]}' to '{', '.join(words[3:])}'", highlight=False, markup=False)
            continue
        if command == "/show parameters":
            console.print(parameters.describe(), highlight=False, markup=False)
            continue
        if command.startswith("/") and " " not in command:
            console.print(f"Unknown command {command!r}; /? lists them.", highlight=False, markup=False)
            continue
        messages.append(ChatMessage(role="user", content=text))
        try:
            answer, finished = stream_answer(engine, make_request(list(messages), parameters), verbose)
        except GdsllmError as exc:
            messages.pop()
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            continue
        if finished:
            messages.append(ChatMessage(role="assistant", content=answer))
        else:
            messages.pop()  # a stopped answer is dropped with its question


@cli.command()
@click.argument("model", required=False)
@click.option("--prompt", "-p", help="Answer this one prompt and exit (stdin is read when it is not a terminal).")
@click.option("--system", help="System message for the conversation.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=DEFAULT_MAX_TOKENS, show_default=True,
              help="Stop each answer after this many tokens.")
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.8, show_default=True,
              help="0 picks the most likely token every time.")
@click.option("--top-k", type=click.IntRange(min=0), default=40, show_default=True,
              help="Sample from the k likeliest tokens (0: all).")
@click.option("--top-p", type=click.FloatRange(0.0, 1.0), default=0.9, show_default=True,
              help="Sample from the smallest set of tokens whose probabilities reach p.")
@click.option("--min-p", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True,
              help="Drop tokens less likely than min-p times the likeliest.")
@click.option("--repeat-penalty", type=click.FloatRange(min=0.0), default=1.1, show_default=True,
              help="Penalty on tokens seen in the last --repeat-last-n (1: none).")
@click.option("--repeat-last-n", type=click.IntRange(min=-1), default=64, show_default=True,
              help="How far back --repeat-penalty looks (-1: the whole context, 0: off).")
@click.option("--num-ctx", type=click.IntRange(min=2), help="Context window in tokens (default: GDSLLM_NUM_CTX, "
              "capped by the model).")
@click.option("--seed", type=int, help="Seed for reproducible sampling.")
@click.option("--vram-budget", help="GPU memory the weights may use, e.g. 6GiB (default: what is free).")
@click.option("--host-cache", help="Pinned host RAM for layers that do not fit in VRAM, e.g. 16GiB (default: what "
              "free RAM allows).")
@click.option("--cpu-layers", default="auto", show_default=True, help=CPU_LAYERS_HELP)
@click.option("--verbose", is_flag=True, help="Print token counts and speed after each answer.")
def run(model: str | None, prompt: str | None, system: str | None, max_tokens: int, temperature: float, top_k: int,
        top_p: float, min_p: float, repeat_penalty: float, repeat_last_n: int, num_ctx: int | None,
        seed: int | None, vram_budget: str | None, host_cache: str | None, cpu_layers: str, verbose: bool) -> None:
    """Chat with a model in the terminal.

    MODEL defaults to the bundled SmolLM2-135M-Instruct, converted into the store on first use."""
    from gdsllm_core.engine.engine import Engine
    from gdsllm_core.layout.store import ModelStore
    from gdsllm_core.storage.backends import choose_backend
    from gdsllm_core.types import ChatMessage, GenerateRequest

    options = load_options(vram_budget, host_cache, cpu_layers)
    parameters = RunParameters(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                               repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, seed=seed,
                               num_predict=max_tokens, num_ctx=num_ctx)
    parameters.sampling(FLAG_NAMES)  # an out-of-range option fails before reading stdin or loading
    if prompt is None and not sys.stdin.isatty():
        prompt = read_stdin_text()
        if not prompt.strip():
            raise BadRequestError("no prompt: stdin is empty and --prompt was not given",
                                  "pass --prompt, pipe a prompt in, or run in a terminal to chat")
    store = ModelStore()
    name = ensure_model(store, model)
    choose_backend(device=options.device)  # a forced GDSLLM_IO that cannot work here fails now, in one line

    def make_request(messages: list, parameters: RunParameters) -> GenerateRequest:
        return GenerateRequest(model=name, messages=messages, max_tokens=parameters.num_predict,
                               sampling=parameters.sampling(), num_ctx=parameters.num_ctx, stop=parameters.stop)

    with Engine(store=store, options=options, keep_alive=None) as engine:
        with err_console.status(f"loading {name}…"):
            engine.load(name)
        if prompt is not None:
            messages = ([ChatMessage(role="system", content=system)] if system else []) + [
                ChatMessage(role="user", content=prompt)]
            _, finished = stream_answer(engine, make_request(messages, parameters), verbose)
            if not finished:
                sys.exit(130)
            return
        chat_loop(engine, make_request, system, verbose, parameters)
