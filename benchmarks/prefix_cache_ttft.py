"""Time to first token of a multi-turn chat with and without the prefix cache, in one run, on the GPU machine.

The same conversation is replayed by two engines over the same model: first with the prefix cache (its greedy
answers become the conversation), then with it off (GDSLLM_PREFIX_CACHE's budget 0) on exactly the same prompts.
Placement as for a model larger than VRAM: `--vram-layers` (default 0) layers resident, the rest in pinned host
RAM (`--host-cache`), so every prefill streams the layers over PCIe once per 512-token chunk. Prints one JSON
object per turn and engine, then a summary line."""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from gdsllm_core.engine.engine import Engine, default_device
from gdsllm_core.engine.forward import LoadOptions
from gdsllm_core.layout.store import ModelStore
from gdsllm_core.types import ChatMessage, GenerateRequest, SamplingParams

GREEDY = SamplingParams(temperature=0, repeat_penalty=1.0)
FILLER = ("Here is more background for the question: the committee met on a Tuesday, reviewed the budget line by "
          "line, argued about the roof repairs, postponed the vote on the new library wing and asked for a report. ")


def ask(engine: Engine, model: str, messages: list[ChatMessage], max_tokens: int) -> tuple[str, dict]:
    """(answer, figures): seconds to the first event, prompt tokens computed and reused."""
    began = time.perf_counter()
    generation = engine.submit(GenerateRequest(model=model, messages=messages, max_tokens=max_tokens,
                                               sampling=GREEDY))
    first, parts, last = None, [], None
    for event in generation:
        if first is None:
            first = time.perf_counter() - began
        parts.append(event.text)
        last = event
    return "".join(parts), {"ttft_s": first, "computed": last.prompt_tokens, "reused": last.cached_tokens,
                            "prompt_total": last.prompt_tokens + last.cached_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="a model in the store (default: the bundled SmolLM2, converted)")
    parser.add_argument("--gguf", type=Path, help="a GGUF file, converted into a temporary store")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--filler", type=int, default=4, help="background paragraphs per user turn (~45 tokens each)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--vram-layers", type=int, default=0)
    parser.add_argument("--host-cache", default="64GiB")
    parser.add_argument("--prefix-cache", default="4GiB", help="the cached engine's budget")
    args = parser.parse_args()

    from gdsllm_core.cli.output import parse_size
    from gdsllm_core.convert import convert

    scratch = tempfile.TemporaryDirectory()
    store = ModelStore(Path(scratch.name)) if (args.gguf or not args.model) else ModelStore()
    model = args.model
    if args.gguf or not model:
        from gdsllm_core.bundled import default_gguf

        model = "bench"
        convert(args.gguf or default_gguf(), store, name=model)
    options = LoadOptions(device=default_device(), host_cache=parse_size(args.host_cache),
                          extra={"max_vram_layers": args.vram_layers, "cpu_layers": 0})
    results: dict[str, list[dict]] = {"cached": [], "uncached": []}
    conversation: list[ChatMessage] = []
    users = [f"Turn {turn + 1}. {FILLER * args.filler}What should the committee do next, in one sentence?"
             for turn in range(args.turns)]
    with Engine(store, options, keep_alive=None, prefix_cache_bytes=parse_size(args.prefix_cache)) as engine:
        engine.load(model)
        ask(engine, model, [ChatMessage("user", "warm up")], 2)
        for turn, user in enumerate(users):
            conversation.append(ChatMessage("user", user))
            answer, figures = ask(engine, model, list(conversation), args.max_tokens)
            conversation.append(ChatMessage("assistant", answer))
            results["cached"].append(figures)
            print(json.dumps({"engine": "cached", "turn": turn + 1, **figures}), flush=True)
    with Engine(store, options, keep_alive=None, prefix_cache_bytes=0) as engine:
        engine.load(model)
        ask(engine, model, [ChatMessage("user", "warm up")], 2)
        for turn in range(args.turns):
            _, figures = ask(engine, model, conversation[:2 * turn + 1], args.max_tokens)
            results["uncached"].append(figures)
            print(json.dumps({"engine": "uncached", "turn": turn + 1, **figures}), flush=True)
    later = slice(1, None)  # turn 1 has nothing to reuse
    summary = {name: {"mean_ttft_s_turns_2_on": statistics.mean(r["ttft_s"] for r in rows[later]),
                      "total_ttft_s": sum(r["ttft_s"] for r in rows),
                      "tokens_computed": sum(r["computed"] for r in rows)} for name, rows in results.items()}
    summary["speedup_turns_2_on"] = (summary["uncached"]["mean_ttft_s_turns_2_on"]
                                     / summary["cached"]["mean_ttft_s_turns_2_on"])
    summary["device"] = options.device
    print(json.dumps({"summary": summary}), flush=True)


if __name__ == "__main__":
    main()
