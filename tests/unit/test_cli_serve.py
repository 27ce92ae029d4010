"""`gdsllm serve` and `gdsllm stop` as processes: the pid file, a graceful stop, a refused second server, and stale
pid files (dead process, or a live process that is not a gdsllm server) detected instead of obeyed."""

import json
import subprocess
import time
import urllib.request

import pytest
from _cli_models import GDSLLM, cli_env, free_port, gdsllm, invoke, shared_tiny

from gdsllm_core import pidfile


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_tiny(tmp_path_factory)


def wait_for_http(url: str, process: subprocess.Popen, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1]
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return json.loads(response.read())
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def test_serve_writes_pid_file_and_stop_ends_it(tmp_path, tiny):
    _, root = tiny
    env = cli_env(tmp_path, GDSLLM_MODEL_ROOT=str(root))
    port = free_port()
    pid_path = tmp_path / "run" / "serve.pid"
    server = subprocess.Popen([GDSLLM, "serve", "tiny", "--port", str(port)], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        tags = wait_for_http(f"http://127.0.0.1:{port}/api/tags", server)
        assert [model["name"].split(":")[0] for model in tags["models"]] == ["tiny"]
        record = json.loads(pid_path.read_text())
        assert record["pid"] == server.pid and record["port"] == port and record["model"] == "tiny"

        second = gdsllm(["serve", "tiny", "--port", str(free_port())], env, tmp_path)
        assert second.returncode == 1 and f"already running (pid {server.pid}" in second.stderr

        stop = gdsllm(["stop"], env, tmp_path)
        assert stop.returncode == 0, stop.stderr
        assert f"stopped the server (pid {server.pid}" in stop.stdout
        assert server.poll() is not None  # `stop` waited for it to exit
        assert server.returncode == 0, server.communicate()[1]
        assert not pid_path.exists()
        assert "no gdsllm server is running" in gdsllm(["stop"], env, tmp_path).stdout
    finally:
        if server.poll() is None:
            server.kill()
        server.communicate()


def write_record(path, pid: int, start_time: int | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "start_time": start_time, "host": "127.0.0.1", "port": 1, "model": "x"}))


def test_stale_pid_files_are_removed_not_obeyed(tmp_path, monkeypatch):
    monkeypatch.setenv("GDSLLM_RUNTIME_DIR", str(tmp_path / "run"))
    pid_path = tmp_path / "run" / "serve.pid"
    bystander = subprocess.Popen(["sleep", "60"])
    try:  # a live process that is not a gdsllm server (pid reused, or a bad file): never signalled
        write_record(pid_path, bystander.pid, pidfile.process_start_time(bystander.pid))
        result = invoke(["stop"])
        assert result.exit_code == 0 and "stale pid file" in result.stdout and "not a gdsllm server" in result.stdout
        assert bystander.poll() is None and not pid_path.exists()

        write_record(pid_path, bystander.pid, 1)  # same pid, another start time: the pid was reused
        result = invoke(["stop"])
        assert "was reused" in result.stdout and bystander.poll() is None and not pid_path.exists()
    finally:
        bystander.kill()
        bystander.wait()

    write_record(pid_path, bystander.pid, None)  # the process is gone
    result = invoke(["stop"])
    assert result.exit_code == 0 and "is not running" in result.stdout and not pid_path.exists()
