"""Shared bits of the CLI's output: sizes, counts, progress bars (rich, on stderr so stdout stays clean)."""

import re
import time
from contextlib import contextmanager

from rich.filesize import decimal
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from gdsllm_core.cli.main import err_console
from gdsllm_core.errors import BadRequestError

CPU_LAYERS_HELP = ("Host-tier layers (pinned RAM) the CPU computes while the others are copied to the GPU: "
                   "auto (balanced by measuring both), 0 (off) or a count.")
SIZE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


def human_bytes(n: int) -> str:
    return decimal(n)


def human_count(n: int) -> str:
    for limit, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= limit:
            return f"{n / limit:.1f}{suffix}"
    return str(n)


def parse_size(text: str) -> int:
    """`4GB` (decimal), `4GiB` or `4G` (binary), `512MiB`, `123456` (bytes)."""
    match = SIZE_PATTERN.match(text)
    if not match:
        raise BadRequestError(f"cannot read the size {text!r}", "write it like 8GiB, 8GB, 512MiB or a byte count")
    number, unit, binary = float(match.group(1)), match.group(2).upper(), match.group(3)
    exponent = " KMGT".index(unit) if unit else 0
    decimal_units = text.strip().upper().endswith("B") and not binary and unit
    return int(number * (1000 if decimal_units else 1024) ** exponent)


def age(timestamp: float) -> str:
    """`3 minutes ago`, like ollama's list."""
    seconds = max(0, time.time() - timestamp)
    for span, unit in ((86400 * 365, "year"), (86400 * 30, "month"), (86400 * 7, "week"), (86400, "day"),
                       (3600, "hour"), (60, "minute")):
        if seconds >= span:
            count = int(seconds // span)
            return f"{count} {unit}{'s' if count > 1 else ''} ago"
    return "just now"


class BytesOnly(ProgressColumn):
    """Renders the wrapped column for byte-counting tasks, and `done/total` for the others (tensors)."""

    def __init__(self, column: ProgressColumn):
        super().__init__()
        self.column = column

    def render(self, task: Task):
        if task.fields.get("kind") == "bytes":
            return self.column.render(task)
        return Text(f"{int(task.completed)}/{int(task.total or 0)}" if isinstance(self.column, DownloadColumn) else "")


class RichPullProgress:
    """`gdsllm_core.pull.PullProgress` drawn with rich: a bar per file, one for the conversion. The display starts
    with the first bar, so a pull that fails before downloading prints nothing but its error."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.started = False
        self._convert_task = None

    def _add_task(self, description: str, **fields) -> TaskID:
        if not self.started:
            self.progress.start()
            self.started = True
        return self.progress.add_task(description, **fields)

    def download_bar(self, filename: str, total: int | None, initial: int):
        task = self._add_task(f"pulling {filename}", total=total, completed=initial, kind="bytes")
        progress = self.progress

        class Bar:
            def update(self, n: int) -> None:
                progress.advance(task, n)

            def close(self) -> None:
                progress.stop_task(task)

        return Bar()

    def convert(self, description: str, done: int, total: int) -> None:
        if self._convert_task is None:
            self._convert_task = self._add_task("converting", total=total)
        self.progress.update(self._convert_task, completed=done, total=total, description=f"converting {description}")

    def message(self, text: str) -> None:
        self.progress.console.print(text, highlight=False)


@contextmanager
def pull_progress():
    """A rich progress for downloads (bytes, speed) and conversion (tensors done)."""
    progress = Progress(TextColumn("{task.description}", markup=False), BarColumn(), TaskProgressColumn(),
                        BytesOnly(DownloadColumn()), BytesOnly(TransferSpeedColumn()), TimeRemainingColumn(),
                        console=err_console)
    reporter = RichPullProgress(progress)
    try:
        yield reporter
    finally:
        if reporter.started:
            progress.stop()


@contextmanager
def bytes_progress(description: str, total: int):
    """A single bar counting bytes; yields `advance(n)`."""
    with Progress(TextColumn("{task.description}", markup=False), BarColumn(), TaskProgressColumn(),
                  DownloadColumn(), TransferSpeedColumn(), console=err_console) as progress:
        task = progress.add_task(description, total=total, kind="bytes")
        yield lambda n: progress.advance(task, n)


def load_options(vram_budget: str | None, host_cache: str | None, cpu_layers: str | None = "auto"):
    """LoadOptions for this machine's device from the --vram-budget / --host-cache sizes (None: automatic) and
    --cpu-layers (0, "auto" or a count)."""
    from gdsllm_core.engine.engine import default_device
    from gdsllm_core.engine.forward import LoadOptions
    from gdsllm_core.runtime.residency import cpu_layers_option

    return LoadOptions(device=default_device(), vram_budget=parse_size(vram_budget) if vram_budget else None,
                       host_cache=parse_size(host_cache) if host_cache else None,
                       extra={"cpu_layers": cpu_layers_option(cpu_layers)})
