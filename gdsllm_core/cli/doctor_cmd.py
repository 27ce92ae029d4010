"""`gdsllm doctor`: GPU, driver, cuFile, NVRTC, the storage backend chosen and why, and a read-speed figure."""

import click
import msgspec
from rich.table import Table

from gdsllm_core.cli.main import cli, console


@cli.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--no-speed", is_flag=True, help="Skip the read-speed test (it writes and reads a 256 MiB file).")
@click.option("--speed-mib", type=click.IntRange(1, 65536), default=256, show_default=True,
              help="Size of the read-speed test file, in MiB.")
def doctor(as_json: bool, no_speed: bool, speed_mib: int) -> None:
    """Check what this machine offers gdsllm and which storage backend it will use."""
    from gdsllm_core.doctor import collect  # imports torch: only when the command runs

    report = collect(speed_bytes=0 if no_speed else speed_mib << 20)
    if as_json:
        click.echo(msgspec.json.format(msgspec.json.encode(report), indent=2).decode())
        return
    console.print(render(report))
    for hint in report.hints:
        console.print(f"[yellow]hint:[/] {hint}", highlight=False, soft_wrap=True)


def render(report) -> Table:
    """The doctor report (`gdsllm_core.doctor.DoctorReport`) as a rich table."""
    def mark(ok: bool | None) -> str:
        return {True: "[green]ok[/]", False: "[red]no[/]", None: "[yellow]?[/]"}[ok]

    table = Table(title=f"gdsllm {report.gdsllm} doctor", show_lines=False, title_justify="left")
    table.add_column("check", style="bold")
    table.add_column("", justify="center")
    table.add_column("result", overflow="fold")
    table.add_row("python", "", f"{report.python} on {report.platform}")
    table.add_row("torch", "", f"{report.torch} (CUDA {report.torch_cuda or 'none'})")
    table.add_row("cupy", mark(report.cupy is not None), report.cupy or "not installed")
    table.add_row("CPU threads", "", report.cpu_threads)
    table.add_row("NVRTC", mark(not report.nvrtc.startswith("unavailable")), report.nvrtc)
    gpus = "; ".join(f"{g.index}: {g.name}, {g.memory_bytes / 2**30:.1f} GiB, sm_{g.compute_capability.replace('.', '')}"
                     for g in report.gpus)
    table.add_row("GPU", mark(bool(report.gpus)), gpus or f"no GPU: {report.gpu_status}")
    table.add_row("driver", mark(report.driver is not None), report.driver or "no NVIDIA kernel driver loaded")
    cu = report.cufile
    table.add_row("libcufile", mark(cu.library is not None),
                  f"{cu.library} ({cu.library_detail}; batch API {'yes' if cu.batch_api else 'no'})" if cu.library
                  else cu.library_detail)
    table.add_row("nvidia-fs", mark(cu.nvidia_fs), "loaded: true GDS possible" if cu.nvidia_fs else
                  "absent (/proc/driver/nvidia-fs): no direct storage-to-GPU DMA")
    table.add_row("compat mode", mark(cu.compat_mode_allowed),
                  f"allow_compat_mode={cu.compat_mode_allowed} in {cu.config}" if cu.config else
                  "no cufile.json (cuFile's default allows compat mode)")
    table.add_row("udev record", mark(cu.udev_record is not None and not cu.udev_record.startswith("absent")),
                  cu.udev_record or "unknown")
    table.add_row("cuFile probe", mark(cu.probe_ok),
                  f"{cu.probe} [dim](mode: {cu.mode})[/]" if cu.library else cu.probe)
    table.add_row("model root", "", report.model_root)
    table.add_row("backend", mark(report.backend != "none"), f"[bold]{report.backend}[/]: {report.backend_reason}")
    for fallback in report.fallbacks:
        table.add_row("", "", f"[dim]not {fallback}[/]")
    speed = report.read_speed
    if speed is None:
        table.add_row("read speed", mark(None), report.read_speed_note)
    else:
        table.add_row("read speed", mark(speed.verified),
                      f"[bold]{speed.gb_per_s:.2f} GB/s[/] ({speed.backend} → {speed.destination}, "
                      f"{speed.nbytes >> 20} MiB in {speed.seconds:.2f} s; "
                      f"{'WARM page cache' if speed.warm_page_cache else 'cold'}: {speed.cache}; "
                      f"bytes {'verified' if speed.verified else 'DIFFER from pread'})")
    return table
