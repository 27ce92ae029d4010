"""Errors a user meets print one line (`error: …`, maybe `hint: …`), exit non-zero, and show no traceback unless
--debug: a missing model, a forced cuFile backend without a GPU, a full disk during conversion (a real ENOSPC on a
1 MiB tmpfs where mounting is allowed, and a file-size limit everywhere), an error in the middle of a streamed
answer. A bad Hugging Face token is covered in test_pull.py."""

import resource
import shutil
import signal
import subprocess

import pytest
import torch
from _cli_models import GDSLLM, assert_one_line_error, cli_env, gdsllm, invoke, shared_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_tiny(tmp_path_factory)


def test_missing_model(tmp_path, tiny, monkeypatch):
    env = cli_env(tmp_path, GDSLLM_MODEL_ROOT=str(tiny[1]))
    assert_one_line_error(gdsllm(["run", "nosuch", "--prompt", "hi"], env, tmp_path), "model 'nosuch' not found",
                          "gdsllm pull")
    debug = gdsllm(["--debug", "show", "nosuch"], env, tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ModelNotFoundError" in debug.stderr
    monkeypatch.setenv("GDSLLM_MODEL_ROOT", str(tiny[1]))
    for args in (["show", "nosuch"], ["verify", "nosuch"], ["rm", "--yes", "nosuch"]):
        result = invoke(args)
        assert result.exit_code == 1 and result.stderr.startswith("error: model 'nosuch' not found"), result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable GPU")
def test_forced_cufile_without_gpu(tmp_path, tiny):
    env = cli_env(tmp_path, GDSLLM_MODEL_ROOT=str(tiny[1]), GDSLLM_IO="cufile")
    result = gdsllm(["run", "tiny", "--prompt", "hi"], env, tmp_path)
    assert_one_line_error(result, "GDSLLM_IO=cufile", "no usable GPU", "GDSLLM_IO=posix")


def _can_mount_tmpfs(tmp_path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k none {tmp_path}"],
                           capture_output=True)
    return probe.returncode == 0


def test_disk_full_during_convert(tmp_path, tiny):
    """A real ENOSPC: the model root is a 1 MiB tmpfs in a private mount namespace; the model needs 3.5 MB."""
    root = tmp_path / "small-disk"
    root.mkdir()
    if not _can_mount_tmpfs(root):
        pytest.skip("cannot mount a tmpfs here (needs root or user namespaces)")
    env = cli_env(tmp_path, GDSLLM_MODEL_ROOT=str(root))
    script = (f"mount -t tmpfs -o size=1m none {root} && {GDSLLM} pull {tiny[0]} --name tiny; "
              f"rc=$?; echo LEFT:$(ls -A {root}); exit $rc")
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert_one_line_error(result, "no space left on the device holding", "GDSLLM_MODEL_ROOT")
    assert "LEFT:\n" in result.stdout  # the partial folder was removed


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def test_file_size_limit_during_convert(tmp_path, tiny):
    env = cli_env(tmp_path)
    result = subprocess.run([GDSLLM, "pull", str(tiny[0]), "--name", "tiny"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, preexec_fn=_limit_file_size)
    assert_one_line_error(result, "weights.bin", "File too large")
    assert not any((tmp_path / "models").iterdir())
    assert "no models" in gdsllm(["list"], env, tmp_path).stderr


def test_error_in_the_middle_of_a_streamed_answer(tmp_path, tiny, monkeypatch):
    """The engine's stream fails after the first token (an I/O error reading a layer, say): the partial line is
    ended, the error is one line, the exit status 1."""
    from gdsllm_core.engine import engine as engine_mod
    from gdsllm_core.errors import CorruptModelError

    original_iter = engine_mod.Generation.__iter__

    def failing_iter(self):
        for index, event in enumerate(original_iter(self)):
            if index == 1:
                raise CorruptModelError("tensor blk.1.attn_q.weight in weights.bin does not match its checksum")
            yield event

    monkeypatch.setattr(engine_mod.Generation, "__iter__", failing_iter)
    monkeypatch.setenv("GDSLLM_MODEL_ROOT", str(tiny[1]))
    monkeypatch.setenv("GDSLLM_IO", "cpu")
    result = invoke(["run", "tiny", "--prompt", "hello", "--max-tokens", "5", "--temperature", "0"])
    assert result.exit_code == 1
    assert result.stdout.endswith("\n") and result.stdout.strip()  # the first token, then the line was ended
    assert result.stderr.startswith("error: tensor blk.1.attn_q.weight in weights.bin does not match its checksum")
    assert "Traceback" not in result.output


def test_system_refusal_is_one_line(tmp_path, tiny, monkeypatch):
    """An OSError (here the model root lies under a regular file) is one line too; --debug shows the traceback."""
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("GDSLLM_MODEL_ROOT", str(tmp_path / "a-file" / "models"))
    result = invoke(["pull", str(tiny[0]), "--name", "tiny"])
    assert result.exit_code == 1 and result.stderr.startswith("error: [Errno 20] Not a directory")
    assert "Traceback" not in result.output
    with pytest.raises(NotADirectoryError):
        invoke(["--debug", "pull", str(tiny[0]), "--name", "tiny"])
