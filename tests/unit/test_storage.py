"""Storage backends on the CPU: every byte read equals os.pread of the same file region."""

import errno
import os

import numpy as np
import pytest
import torch

from gdsllm_core.errors import BackendUnavailableError, BadRequestError, CorruptModelError
from gdsllm_core.layout.manifest import ExtentInfo, Manifest, TokenizerInfo
from gdsllm_core.storage import backends, cufile
from gdsllm_core.storage.pinned import ALIGN, aligned_host_buffer
from gdsllm_core.storage.posix import PosixBackend
from gdsllm_core.storage.reader import CpuBackend, ExtentReader

FILE_BYTES = 3 * (1 << 20) + 1234  # not a whole number of pages: reads near the end stop short of a block


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(np.random.default_rng(7).integers(0, 256, FILE_BYTES, dtype=np.uint8).tobytes())
    return path


def pread(path, offset, nbytes) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, nbytes, offset)
    finally:
        os.close(fd)


def random_extents(seed: int, count: int = 24) -> list[tuple[int, int]]:
    """(offset, size) pairs: page-aligned and odd offsets, sizes from 1 byte to several bounce buffers, and the
    file's last bytes."""
    rng = np.random.default_rng(seed)
    extents = [(0, 1), (ALIGN - 1, 2), (ALIGN, ALIGN), (FILE_BYTES - 1, 1), (FILE_BYTES - 5000, 5000)]
    for _ in range(count):
        size = int(rng.choice([rng.integers(1, 4097), rng.integers(4097, 300_000), rng.integers(300_000, 1 << 20)]))
        offset = int(rng.integers(0, FILE_BYTES - size))
        if rng.random() < 0.5:
            offset -= offset % ALIGN
        extents.append((offset, size))
    return extents


BACKENDS = {
    "cpu": lambda: CpuBackend(),
    "posix": lambda: PosixBackend(pin=False),
    "posix-small-bounce": lambda: PosixBackend(pin=False, bounce_bytes=64 << 10, bounce_count=4),
}


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("aligned_dest", [True, False], ids=["aligned-dest", "plain-dest"])
def test_read_into_host_equals_pread(data_file, name, aligned_dest):
    backend = BACKENDS[name]()
    handle = backend.open(data_file)
    try:
        for index, (offset, size) in enumerate(random_extents(seed=len(name) + aligned_dest)):
            dest_offset = (index % 3) * ALIGN + (7 if index % 2 else 0)
            capacity = dest_offset + size + 64
            dest = aligned_host_buffer(capacity, pin=False) if aligned_dest else torch.empty(capacity, dtype=torch.uint8)
            dest.fill_(0xA5)
            backend.read_into(handle, offset, size, dest, dest_offset)
            got = dest[dest_offset:dest_offset + size].numpy().tobytes()
            assert got == pread(data_file, offset, size), f"{name}: bytes differ for extent at {offset}+{size}"
            assert (dest[:dest_offset] == 0xA5).all() and (dest[dest_offset + size:] == 0xA5).all(), \
                f"{name} wrote outside [{dest_offset}, {dest_offset + size})"
    finally:
        backend.close(handle)


def manifest_for(extents: list[tuple[int, int]]) -> Manifest:
    return Manifest(name="t", architecture="none", config={}, tokenizer=TokenizerInfo(kind="hf", file="tok.json"),
                    extents=[ExtentInfo(f"e{i}", "weights.bin", offset, size, []) for i, (offset, size) in
                             enumerate(extents)],
                    files={"weights.bin": FILE_BYTES})


@pytest.mark.parametrize("io", ["cpu", "posix"])
def test_extent_reader_through_chosen_backend(data_file, monkeypatch, io):
    monkeypatch.setenv("GDSLLM_IO", io)
    extents = random_extents(seed=11)
    manifest = manifest_for(extents)
    with ExtentReader(data_file.parent, manifest, threads=4) as reader:
        assert reader.backend.name == io
        buffers = [torch.full((size,), 0x5A, dtype=torch.uint8) for _, size in extents]
        reader.submit(manifest.extents, buffers).result(timeout=30)
    for (offset, size), buffer in zip(extents, buffers, strict=True):
        assert buffer.numpy().tobytes() == pread(data_file, offset, size)


def test_extent_reader_hands_each_extent_over_and_fails_only_the_broken_one(data_file):
    """Small pieces over 3 threads: each extent's Future resolves with its bytes; one running past the end of the
    file fails alone, naming the file; a zero-byte extent resolves at once; `submit` fails with the first error."""
    extents = random_extents(seed=5, count=12) + [(FILE_BYTES - 1000, 5000), (100, 0)]
    manifest = manifest_for(extents)
    with ExtentReader(data_file.parent, manifest, backend=CpuBackend(), threads=3, chunk_bytes=8192) as reader:
        buffers = [torch.zeros(max(size, 1), dtype=torch.uint8) for _, size in extents]
        futures = reader.submit_each(manifest.extents, buffers)
        with pytest.raises(CorruptModelError, match=str(data_file)):
            futures[-2].result(timeout=30)
        assert futures[-1].result(timeout=30) is None
        for future, (offset, size), buffer in zip(futures[:-2], extents, buffers, strict=False):
            future.result(timeout=30)
            assert buffer[:size].numpy().tobytes() == pread(data_file, offset, size)
        with pytest.raises(CorruptModelError, match="ends early"):
            reader.read(manifest.extents[-3:], buffers[-3:])
        with pytest.raises(ValueError, match="holds 1 bytes"):
            reader.submit(manifest.extents[2:3], [torch.zeros(1, dtype=torch.uint8)])
    with pytest.raises(RuntimeError, match="closed"):
        reader.submit(manifest.extents[:1], buffers[:1])


def test_extent_reader_threads_end_with_it(data_file):
    """close() ends the threads after the queued reads; a reader dropped without close() ends them and closes its
    file too."""
    import gc
    import threading

    def io_threads() -> int:
        return sum(thread.name.startswith("gdsllm-io") for thread in threading.enumerate())

    before = io_threads()
    manifest = manifest_for([(0, FILE_BYTES)])
    reader = ExtentReader(data_file.parent, manifest, backend=CpuBackend(), threads=4, chunk_bytes=4096)
    buffer = torch.zeros(FILE_BYTES, dtype=torch.uint8)
    future = reader.submit(manifest.extents, [buffer])
    assert io_threads() == before + 4
    reader.close()
    assert future.done() and io_threads() == before
    assert buffer.numpy().tobytes() == pread(data_file, 0, FILE_BYTES)
    open_files = len(os.listdir("/proc/self/fd"))
    ExtentReader(data_file.parent, manifest, backend=CpuBackend(), threads=4)
    gc.collect()
    for thread in threading.enumerate():
        if thread.name.startswith("gdsllm-io"):
            thread.join(timeout=10)
    assert io_threads() == before and len(os.listdir("/proc/self/fd")) == open_files


@pytest.mark.parametrize("name", BACKENDS)
def test_truncated_file_names_the_file(data_file, name):
    backend = BACKENDS[name]()
    handle = backend.open(data_file)
    try:
        dest = torch.empty(10_000, dtype=torch.uint8)
        with pytest.raises(CorruptModelError, match=str(data_file)):
            backend.read_into(handle, FILE_BYTES - 100, 10_000, dest, 0)
    finally:
        backend.close(handle)


def test_o_direct_refusal_falls_back_to_buffered_reads(data_file, monkeypatch):
    real_preadv = os.preadv
    backend = PosixBackend(pin=False)
    handle = backend.open(data_file)

    def refuse_direct(fd, buffers, offset):
        if fd == handle.direct_fd:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", refuse_direct)
    try:
        dest = torch.empty(20_000, dtype=torch.uint8)
        backend.read_into(handle, 4096, 20_000, dest, 0)
        assert dest.numpy().tobytes() == pread(data_file, 4096, 20_000)
        assert any("O_DIRECT read refused" in note for note in backend.notes), backend.notes
    finally:
        backend.close(handle)


def test_auto_without_gpu_is_cpu_with_reasons(monkeypatch, tmp_path):
    monkeypatch.setenv("GDSLLM_IO", "auto")
    monkeypatch.setattr(backends, "gpu_status", lambda device=None: (False, "test: no GPU"))
    backend = backends.choose_backend(probe_path=tmp_path, refresh=True)
    assert backend.name == "cpu"
    assert "test: no GPU" in backend.reason
    assert any(reason.startswith("cufile:") for reason in backend.fallbacks)


def test_forced_cufile_without_gpu_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("GDSLLM_IO", "cufile")
    monkeypatch.setattr(backends, "gpu_status", lambda device=None: (False, "test: no GPU"))
    with pytest.raises(BackendUnavailableError, match="GDSLLM_IO=cufile but there is no usable GPU: test: no GPU"):
        backends.choose_backend(probe_path=tmp_path, refresh=True)


def test_forced_cufile_without_libcufile_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("GDSLLM_IO", "cufile")
    monkeypatch.setattr(backends, "gpu_status", lambda device=None: (True, "test: pretend GPU"))
    monkeypatch.setattr(cufile, "candidate_paths", lambda: [str(tmp_path / "libcufile.so.0")])
    monkeypatch.setattr(cufile, "_library", None)
    monkeypatch.setattr(cufile, "_library_error", None)
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    with pytest.raises(BackendUnavailableError, match="libcufile.so.0 not found"):
        backends.choose_backend(probe_path=tmp_path, refresh=True)


def test_unknown_io_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("GDSLLM_IO", "nvme")
    with pytest.raises(BadRequestError, match="GDSLLM_IO='nvme'"):
        backends.choose_backend(probe_path=tmp_path, refresh=True)


def test_cufile_config_with_comments(tmp_path, monkeypatch):
    config = tmp_path / "cufile.json"
    config.write_text('{\n // "allow_compat_mode": false,\n "logging": {"dir": "http://x//y"},\n'
                      ' "properties": {"allow_compat_mode": true // why\n }}\n')
    monkeypatch.setenv("CUFILE_ENV_PATH_JSON", str(config))
    env = cufile.environment()
    assert env.allow_compat_mode is True
    assert env.config_path == str(config)
    assert env.mode == ("gds" if env.nvidia_fs else "compat")


def test_doctor_report_on_this_machine(tmp_path, monkeypatch):
    from gdsllm_core.doctor import collect

    monkeypatch.delenv("GDSLLM_IO", raising=False)
    report = collect(model_root=tmp_path / "models", speed_bytes=8 << 20)
    has_gpu, _ = backends.gpu_status()
    assert report.backend in (("cufile", "posix") if has_gpu else ("cpu",)), report.backend_reason
    assert report.gpu_status and report.backend_reason
    assert report.read_speed is not None, report.read_speed_note
    assert report.read_speed.verified and report.read_speed.nbytes == 8 << 20 and report.read_speed.gb_per_s > 0
    assert not report.read_speed.warm_page_cache
    assert not list((tmp_path / "models").iterdir()), "the speed test left its scratch file behind"


def test_doctor_command_json(tmp_path, monkeypatch):
    import json

    from click.testing import CliRunner

    from gdsllm_core.cli import commands  # noqa: F401  (registers `doctor`)
    from gdsllm_core.cli.main import cli

    monkeypatch.setenv("GDSLLM_MODEL_ROOT", str(tmp_path))
    monkeypatch.setenv("GDSLLM_IO", "cpu")
    result = CliRunner().invoke(cli, ["doctor", "--json", "--no-speed"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["backend"] == "cpu" and report["backend_reason"].startswith("GDSLLM_IO=cpu")
    assert report["read_speed"] is None and report["model_root"] == str(tmp_path)


@pytest.mark.parametrize("user_setting", [None, {"GOMP_SPINCOUNT": "777"}, {"OMP_WAIT_POLICY": "ACTIVE"}])
def test_gdsllm_cpu_threads_never_spin_without_a_gpu(tmp_path, user_setting):
    """On a machine without a GPU the `gdsllm` command makes torch's threads passive before torch loads (spinning
    threads collapse CPU-only speed when other work runs), keeps what the user set, and `doctor` says which is in
    effect."""
    import json
    import os
    import subprocess
    import sys

    from gdsllm_core import cpu_threads

    if cpu_threads.gpu_visible():
        pytest.skip("a GPU is visible: the command lets threads spin for CPU layers beside it")
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update(user_setting or {}, GDSLLM_MODEL_ROOT=str(tmp_path), GDSLLM_IO="cpu")
    result = subprocess.run([sys.executable, "-m", "gdsllm_core", "doctor", "--json", "--no-speed"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    threads = json.loads(result.stdout)["cpu_threads"]
    want = {None: "OMP_WAIT_POLICY=PASSIVE", "GOMP_SPINCOUNT": "GOMP_SPINCOUNT=777 ",
            "OMP_WAIT_POLICY": "OMP_WAIT_POLICY=ACTIVE"}[next(iter(user_setting or {None: 0}))]
    assert want in threads, threads


@pytest.mark.parametrize(("argv", "env", "want"), [
    (["bench", "m"], {}, {"GOMP_SPINCOUNT": "1000000"}),
    (["bench", "m", "--device", "cpu"], {}, {"OMP_WAIT_POLICY": "PASSIVE"}),
    (["bench", "--device=cpu", "m"], {}, {"OMP_WAIT_POLICY": "PASSIVE"}),
    (["run", "m"], {"GDSLLM_DEVICE": "cpu"}, {"OMP_WAIT_POLICY": "PASSIVE"}),
    (["run", "m"], {"CUDA_VISIBLE_DEVICES": ""}, {"OMP_WAIT_POLICY": "PASSIVE"}),
    (["run", "m"], {"OMP_WAIT_POLICY": "ACTIVE"}, {}),
])
def test_cpu_threads_spin_only_beside_a_gpu(tmp_path, monkeypatch, argv, env, want):
    """With a GPU visible threads spin (bounded) for CPU layers in decode, unless the run is CPU-only or the user
    chose; the spin count is the module's (asserted literally so a change is deliberate)."""
    from gdsllm_core import cpu_threads

    (tmp_path / "0000:01:00.0").mkdir()
    monkeypatch.setattr(cpu_threads, "_NVIDIA_GPUS", tmp_path)
    for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "GDSLLM_DEVICE", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cpu_threads.wait_policy(argv) == want
