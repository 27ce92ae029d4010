"""The server's pid file: who is serving, and whether that process is really a running `gdsllm serve`."""

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from gdsllm_core import settings

PID_FILE_NAME = "serve.pid"


@dataclass(frozen=True)
class ServerRecord:
    """What `gdsllm serve` writes at start: its pid, the kernel's start time of that pid (guards against pid reuse),
    where it listens and which model it serves."""

    pid: int
    start_time: int | None
    host: str
    port: int
    model: str


def pid_file_path() -> Path:
    return settings.runtime_dir() / PID_FILE_NAME


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks since boot), or None where /proc cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19])


def process_cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    if Path("/proc").is_dir():  # a zombie has exited: treat it as gone
        try:
            return " Z " not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:4]
        except OSError:
            return False
    return True


def write(record: ServerRecord, path: Path | None = None) -> Path:
    """Write the record atomically (temp file + rename)."""
    path = path or pid_file_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    temp.write_text(json.dumps(asdict(record)))
    os.replace(temp, path)
    return path


def read(path: Path | None = None) -> ServerRecord | None:
    """The record in the pid file, or None when there is no file or it is unreadable."""
    path = path or pid_file_path()
    try:
        data = json.loads(path.read_text())
        return ServerRecord(pid=int(data["pid"]), start_time=data.get("start_time"), host=str(data["host"]),
                            port=int(data["port"]), model=str(data.get("model", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def stale_reason(record: ServerRecord) -> str | None:
    """Why the record does not describe a live `gdsllm serve` (None when it does)."""
    if not pid_alive(record.pid):
        return f"process {record.pid} is not running"
    start_time = process_start_time(record.pid)
    if record.start_time is not None and start_time is not None and start_time != record.start_time:
        return f"process {record.pid} was started after the pid file was written (the pid was reused)"
    cmdline = process_cmdline(record.pid)
    if cmdline is not None and not looks_like_serve(cmdline):
        return f"process {record.pid} is not a gdsllm server ({' '.join(cmdline)[:80]})"
    return None


def looks_like_serve(cmdline: list[str]) -> bool:
    """True for `gdsllm serve …` however it was launched (console script, `python -m`, a wrapper)."""
    return any("gdsllm" in part for part in cmdline) and "serve" in cmdline


def remove(path: Path | None = None, pid: int | None = None) -> None:
    """Remove the pid file; with `pid`, only if it still names that process."""
    path = path or pid_file_path()
    if pid is not None:
        record = read(path)
        if record is not None and record.pid != pid:
            return
    path.unlink(missing_ok=True)
