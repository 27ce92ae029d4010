"""`gdsllm serve` (the Ollama + OpenAI API server, with a pid file) and `gdsllm stop`."""

import os
import signal
import time

import click

from gdsllm_core import pidfile
from gdsllm_core.cli.main import cli, console, err_console
from gdsllm_core.cli.output import CPU_LAYERS_HELP, load_options
from gdsllm_core.errors import GdsllmError


class ServerRunningError(GdsllmError):
    pass


@cli.command()
@click.argument("model", required=False)
@click.option("--preload", is_flag=True, help="Load the model before accepting requests.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option("--vram-budget", help="GPU memory the weights may use, e.g. 6GiB (default: what is free).")
@click.option("--host-cache", help="Pinned host RAM for layers that do not fit in VRAM, e.g. 16GiB.")
@click.option("--cpu-layers", default="auto", show_default=True, help=CPU_LAYERS_HELP)
def serve(model: str | None, preload: bool, host: str, port: int, vram_budget: str | None,
          host_cache: str | None, cpu_layers: str) -> None:
    """Start the Ollama- and OpenAI-compatible API server.

    MODEL is what requests that name no model get; --preload loads it before the first request."""
    from gdsllm_core.server.app import listen_socket, run_server

    options = load_options(vram_budget, host_cache, cpu_layers)  # a bad size or count fails before the pid file
    record = pidfile.read()
    if record is not None:
        reason = pidfile.stale_reason(record)
        if reason is None:
            raise ServerRunningError(f"a gdsllm server is already running (pid {record.pid} on "
                                     f"{record.host}:{record.port})", "stop it with `gdsllm stop`")
        pidfile.remove()
    if preload and not model:
        raise click.UsageError("--preload needs a MODEL to load")
    sock = listen_socket(host, port)  # a busy port fails here, before the pid file and any model load
    pid = os.getpid()
    path = pidfile.write(pidfile.ServerRecord(pid=pid, start_time=pidfile.process_start_time(pid), host=host,
                                              port=port, model=model or ""))
    err_console.print(f"serving on http://{host}:{port} (pid {pid}, pid file {path}); `gdsllm stop` stops it",
                      highlight=False)
    try:
        run_server(model, host=host, port=port, preload=preload, options=options, sock=sock)
    finally:
        pidfile.remove(pid=pid)


@cli.command()
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for the server to finish.")
def stop(timeout: float) -> None:
    """Stop the running server (SIGTERM, then wait)."""
    path = pidfile.pid_file_path()
    record = pidfile.read(path)
    if record is None:
        if path.exists():
            path.unlink()
            console.print(f"removed an unreadable pid file {path}; no server was stopped", highlight=False)
        else:
            console.print("no gdsllm server is running", highlight=False)
        return
    reason = pidfile.stale_reason(record)
    if reason is not None:
        pidfile.remove(path)
        console.print(f"removed a stale pid file ({reason}); no server was stopped", highlight=False)
        return
    try:
        os.kill(record.pid, signal.SIGTERM)
    except PermissionError:
        raise ServerRunningError(f"not allowed to stop the server (pid {record.pid}): it belongs to another user",
                                 f"stop it as that user, or with `sudo kill {record.pid}`") from None
    deadline = time.monotonic() + timeout
    with err_console.status(f"stopping the server (pid {record.pid})…"):
        while pidfile.pid_alive(record.pid) and pidfile.process_start_time(record.pid) in (None, record.start_time):
            if time.monotonic() > deadline:
                raise ServerRunningError(f"the server (pid {record.pid}) did not exit within {timeout:g} s",
                                         f"wait, or end it with `kill -9 {record.pid}`")
            time.sleep(0.1)
    pidfile.remove(path, pid=record.pid)
    console.print(f"stopped the server (pid {record.pid}, {record.host}:{record.port})", highlight=False)
