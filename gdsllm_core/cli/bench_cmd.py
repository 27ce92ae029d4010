"""`gdsllm bench`: pp/tg throughput (batched decode with --batch) with the memory and storage ceilings measured in
the same run."""

import json
import tempfile
from pathlib import Path

import click
from rich.table import Table

from gdsllm_core.cli.main import cli, console, err_console
from gdsllm_core.cli.output import CPU_LAYERS_HELP, parse_size


@cli.command("bench")
@click.argument("model", required=False)
@click.option("--gguf", "gguf_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Bench a GGUF file directly (converted into a temporary store first).")
@click.option("--pp", default=512, show_default=True, help="Prompt tokens to process.")
@click.option("--tg", default=128, show_default=True, help="Tokens to decode.")
@click.option("--batch", "batch", default="1", show_default=True,
              help="Sequences decoded together (N different random prompts of --pp tokens, one decode call per step "
                   "for all), or a list measured in turn in the same run (e.g. 1,8,16: speed-up vs batch 1).")
@click.option("--device", default="cuda", show_default=True, help="cuda, or cpu (host memory ceiling instead).")
@click.option("--vram-budget", help="VRAM for weights, KV cache and scratch (e.g. 8GiB); default: free VRAM - 1 GiB.")
@click.option("--host-cache", help="Pinned host RAM for layers, or the MoE expert cache (e.g. 16GiB, 0 to stream the "
                                   "rest from storage).")
@click.option("--vram-layers", type=int, help="At most this many decoder layers resident in VRAM (like -ngl).")
@click.option("--cpu-layers", default="auto", show_default=True, help=CPU_LAYERS_HELP)
@click.option("--no-ceilings", is_flag=True, help="Skip measuring the memory (GPU or host) and storage ceilings.")
@click.option("--warm", is_flag=True, help="Do not drop the page cache before reading.")
@click.option("--no-graphs", is_flag=True, help="Decode without CUDA graphs.")
@click.option("--no-repack", is_flag=True, help="Keep resident Q4_0/Q8_0 weights in the GGUF layout.")
@click.option("--fast-gemv", is_flag=True, help="Q4_0 decode sums products in fp16 first (overflows past ~1000).")
@click.option("--prefetch/--no-prefetch", default=None,
              help="MoE: read the next layer's likeliest expert ahead (expert_prefetch; default: on with a GPU).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def bench(model, gguf_file, pp, tg, batch, device, vram_budget, host_cache, vram_layers, cpu_layers, no_ceilings, warm,
          no_graphs, no_repack, fast_gemv, prefetch, as_json):
    """Measure prompt processing (pp) and decode (tg) tok/s of MODEL, batched decode with --batch."""
    from gdsllm_core.bench import format_report, run_bench
    from gdsllm_core.engine.forward import LoadOptions
    from gdsllm_core.errors import BadRequestError
    from gdsllm_core.layout.store import ModelStore
    from gdsllm_core.runtime.residency import cpu_layers_option

    if bool(model) == bool(gguf_file):
        raise BadRequestError("name a model from the store or pass --gguf FILE (one of the two)",
                              "e.g. `gdsllm bench smollm2-135m-instruct` or `gdsllm bench --gguf model.gguf`")
    batches = parse_batches(batch)
    extra = {"cuda_graphs": not no_graphs, "repack": not no_repack, "fast_gemv": fast_gemv,
             "cpu_layers": cpu_layers_option(cpu_layers)}
    if vram_layers is not None:
        extra["max_vram_layers"] = vram_layers
    if prefetch is not None:
        extra["expert_prefetch"] = prefetch
    options = LoadOptions(device=device, vram_budget=parse_size(vram_budget) if vram_budget else None,
                          host_cache=parse_size(host_cache) if host_cache is not None else None,
                          max_context=pp + tg + 16, extra=extra)
    with tempfile.TemporaryDirectory(prefix="gdsllm-bench-") as scratch:
        if gguf_file:
            from gdsllm_core.convert import convert

            err_console.print(f"converting {gguf_file} into a temporary store", highlight=False)
            entry = convert(gguf_file, ModelStore(Path(scratch)), "bench")
        else:
            entry = ModelStore().get(model)
        result = run_bench(entry, options, pp=pp, tg=tg, ceilings=not no_ceilings, drop_caches=not warm,
                           batches=batches)
    if as_json:
        for run in result["batches"]:
            run.pop("tokens")
        click.echo(json.dumps(result, indent=2))
        return
    table = Table(title=f"gdsllm bench {model or gguf_file.name}", show_header=False)
    for name, value in format_report(result):
        table.add_row(name, value)
    console.print(table)


def parse_batches(text: str) -> tuple[int, ...]:
    """"1,8,16" -> (1, 8, 16): positive batch sizes, measured in that order."""
    from gdsllm_core.errors import BadRequestError

    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or any(n < 1 for n in sizes):
        raise BadRequestError(f"--batch {text!r} is not a list of positive integers",
                              "e.g. --batch 8 or --batch 1,8,16")
    return sizes
