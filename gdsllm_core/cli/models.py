"""Model management: `pull`, `list`, `show`, `rm`, `verify`."""

import re
from collections import Counter

import click
from rich.table import Table

from gdsllm_core.cli.main import cli, console, err_console
from gdsllm_core.cli.output import age, bytes_progress, human_bytes, human_count, pull_progress

CONTEXT_KEYS = ("max_position_embeddings", "context_length", "max_context", "n_ctx", "max_seq_len")
LAYER_EXTENT = re.compile(r"^blk\.(\d+)$")


@cli.command()
@click.argument("source")
@click.option("--name", help="Name in the store (default: the repo's name, with :QUANT for a GGUF pick).")
@click.option("--quant", "--quantize", "quantize",
              help="Re-quantize while converting (LLaMA: q8_0, q4_0, q4_1, q5_0, q5_1, q4_k; Qwen3.5-MoE: affine2..8).")
@click.option("--group-size", type=click.IntRange(min=1), help="Group size for affine quantization (32, 64 or 128).")
@click.option("--force", is_flag=True, help="Download and convert again even if the model is already there.")
def pull(source: str, name: str | None, quantize: str | None, group_size: int | None, force: bool) -> None:
    """Download a model and convert it into the store.

    SOURCE is a Hugging Face repo id (`user/repo`), one GGUF file of a repo picked by quant (`user/repo:Q4_K_M`,
    also written `hf.co/user/repo:Q4_K_M`), a local checkpoint folder, or a .gguf file. Interrupted downloads
    resume where they stopped."""
    from gdsllm_core import pull as pull_mod

    try:
        with pull_progress() as progress:
            entry = pull_mod.pull(source, name=name, quantize=quantize, group_size=group_size, force=force,
                                  progress=progress)
    except pull_mod.AlreadyPulled as exc:
        console.print(f"{exc.name} is already pulled (use --force to pull it again)", highlight=False)
        return
    console.print(f"pulled [bold]{entry.name}[/] ({entry.manifest.architecture}, {quant_label(entry.manifest)}, "
                  f"{human_bytes(entry.size_bytes)})", highlight=False)


@cli.command(name="list")
def list_models() -> None:
    """List the models in the store, damaged ones included (STATUS says what is wrong)."""
    from gdsllm_core.layout.store import ModelEntry, ModelStore

    store = ModelStore()
    entries = store.scan()
    if not entries:
        err_console.print(f"no models in {store.root} yet: `gdsllm pull <repo>` fetches one, "
                          "`gdsllm run` sets up the default model", highlight=False)
        return
    table = Table(box=None, pad_edge=False)
    for column in ("NAME", "ARCHITECTURE", "QUANT", "SIZE", "MODIFIED", "STATUS"):
        table.add_column(column, no_wrap=column != "STATUS")
    for entry in entries:
        if isinstance(entry, ModelEntry):
            table.add_row(entry.name, entry.manifest.architecture, quant_label(entry.manifest),
                          human_bytes(entry.size_bytes), age(entry.modified), "ok")
        else:
            table.add_row(entry.name, "?", "?", "?", "?", f"damaged: {entry.problem}")
    console.print(table, highlight=False)


@cli.command()
@click.argument("model")
def show(model: str) -> None:
    """Show a model's details.

    Parameters, layers, context, quant types, tensors, bytes on disk, chat template, and the storage I/O path
    that would be used to read it."""
    from gdsllm_core.errors import GdsllmError
    from gdsllm_core.layout.store import ModelStore
    from gdsllm_core.storage.backends import choose_backend

    entry = ModelStore().get(model)
    manifest = entry.manifest
    try:
        backend = choose_backend()
        io_path = f"{backend.name} ({backend.reason})" if getattr(backend, "reason", "") else backend.name
    except GdsllmError as exc:
        io_path = f"unavailable: {exc.message}"
    qtypes = Counter(tensor.qtype for extent in manifest.extents for tensor in extent.tensors)
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    rows = [
        ("name", entry.name),
        ("architecture", manifest.architecture),
        ("parameters", f"{parameter_count(manifest):,} ({human_count(parameter_count(manifest))})"),
        ("layers", str(layer_count(manifest))),
        ("context", str(context_length(manifest.config) or "unknown")),
        ("quantization", quant_label(manifest)),
        ("tensor types", ", ".join(f"{qtype} ×{count}" for qtype, count in qtypes.most_common())),
        ("tensors", str(manifest.tensor_count())),
        ("extents", str(len(manifest.extents))),
        ("bytes on disk", f"{entry.size_bytes:,} ({human_bytes(entry.size_bytes)})"),
        ("path", str(entry.path)),
        ("I/O path", io_path),
        ("created", manifest.created or "unknown"),
    ]
    if manifest.source:
        rows.append(("source", ", ".join(f"{key}={value}" for key, value in manifest.source.items())))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table, highlight=False, markup=False)
    template = manifest.tokenizer.chat_template
    console.print("\n[bold]chat template[/]" + ("" if template else ": none (prompts are sent as plain text)"))
    if template:
        console.print(template, highlight=False, markup=False, soft_wrap=True)


@cli.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def rm(models: tuple[str, ...], yes: bool) -> None:
    """Delete models from the store (asks first unless --yes)."""
    from gdsllm_core.errors import BadRequestError, ModelNotFoundError
    from gdsllm_core.layout.store import ModelStore, check_name

    store = ModelStore()
    for name in models:  # every name is checked before anything is deleted
        check_name(name)  # `../x`, `/abs/path`
        folder = store.path(name)
        if not folder.is_dir():
            raise ModelNotFoundError(f"model {name!r} not found in {store.root}", "see `gdsllm list`")
        if folder.resolve().parent != store.root.resolve():  # a link leading out of the model root
            raise BadRequestError(f"refusing to delete {folder}: it leads outside {store.root}")
    for name in models:
        size = sum(p.stat().st_size for p in store.path(name).iterdir() if p.is_file())
        if not yes and not click.confirm(f"delete {name} ({human_bytes(size)})?", default=False, err=True):
            err_console.print(f"kept {name}", highlight=False)
            continue
        store.remove(name)
        console.print(f"deleted {name}", highlight=False)


@cli.command()
@click.argument("model")
def verify(model: str) -> None:
    """Check every tensor of MODEL against its checksum."""
    from gdsllm_core.layout.store import ModelStore
    from gdsllm_core.layout.store import verify as verify_entry

    entry = ModelStore().get(model)
    total = sum(tensor.nbytes for extent in entry.manifest.extents for tensor in extent.tensors)
    with bytes_progress(f"verifying {entry.name}", total) as advance:
        checked = verify_entry(entry, progress=advance)
    console.print(f"{entry.name}: all {entry.manifest.tensor_count()} tensors match their checksums "
                  f"({human_bytes(checked)} checked)", highlight=False)


def quant_label(manifest) -> str:
    """The manifest's quant, else the type holding most bytes among matrices (what `list` shows)."""
    if manifest.quant:
        return manifest.quant
    weight = Counter()
    for extent in manifest.extents:
        for tensor in extent.tensors:
            if len(tensor.shape) >= 2:
                weight[tensor.qtype] += tensor.nbytes
    return weight.most_common(1)[0][0] if weight else "unknown"


def parameter_count(manifest) -> int:
    """Logical parameters: GGML types carry logical shapes; packed integer words count `32 / bits` values each;
    quantization scales and biases are not parameters."""
    total = 0
    for extent in manifest.extents:
        for tensor in extent.tensors:
            if tensor.name.endswith((".scales", ".biases")):
                continue
            count = 1
            for dim in tensor.shape:
                count *= dim
            bits = tensor.extra.get("bits") if isinstance(tensor.extra, dict) else None
            if bits and tensor.qtype in ("U32", "U8"):
                count = count * (32 if tensor.qtype == "U32" else 8) // int(bits)
            total += count
    return total


def layer_count(manifest) -> int:
    return len({match.group(1) for extent in manifest.extents if (match := LAYER_EXTENT.match(extent.name))})


def context_length(config: dict) -> int | None:
    for key in CONTEXT_KEYS:
        if isinstance(config.get(key), int):
            return config[key]
    return None
