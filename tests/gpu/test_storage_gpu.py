"""Storage backends on a GPU machine: bytes read into GPU memory equal os.pread of the same file region.

cuFile needs a udev record for the block device holding the files (the GPU machine has no udev database); the
`udev_record` fixture creates it (as root) when missing and removes what it created. The 5027 test hides the record
and checks, in a fresh process, that auto falls back to posix and says why."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from gdsllm_core.storage import backends, cufile
from gdsllm_core.storage.pinned import ALIGN
from gdsllm_core.storage.posix import PosixBackend
from gdsllm_core.storage.reader import ExtentReader

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]

ROOT = Path(__file__).resolve().parents[2]
FILE_BYTES = 9 * (1 << 20) + 777


@pytest.fixture(scope="module")
def disk_dir():
    """A folder on a real block device (tmpfs has no udev record and no O_DIRECT)."""
    base = Path(tempfile.gettempdir())
    if os.major(os.stat(base).st_dev) == 0:
        base = ROOT / ".work"
        base.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=base, prefix="gdsllm-gpu-") as folder:
        yield Path(folder)


@pytest.fixture(scope="module")
def data_file(disk_dir):
    path = disk_dir / "weights.bin"
    path.write_bytes(np.random.default_rng(3).integers(0, 256, FILE_BYTES, dtype=np.uint8).tobytes())
    return path


@pytest.fixture(scope="module")
def udev_record(data_file):
    record = cufile.udev_record_path(data_file)
    if record.exists():
        yield record
        return
    if os.geteuid() != 0:
        pytest.skip(f"cuFile needs the udev record {record}; run as root so the test can create it")
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(f"E:ID_FS_USAGE=filesystem\nE:ID_FS_TYPE={fs_type(data_file)}\nE:ID_FS_UUID=0000\n")
    try:
        yield record
    finally:
        record.unlink(missing_ok=True)


def fs_type(path: Path) -> str:
    from gdsllm_core.doctor import _fs_type

    return _fs_type(path)


def pread(path, offset, nbytes) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, nbytes, offset)
    finally:
        os.close(fd)


def random_extents(seed: int, count: int = 20) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    extents = [(0, 1), (ALIGN - 3, 5), (ALIGN, 3 * ALIGN), (FILE_BYTES - 1, 1), (FILE_BYTES - 70_001, 70_001),
               (0, FILE_BYTES)]
    for _ in range(count):
        size = int(rng.choice([rng.integers(1, 4097), rng.integers(4097, 1 << 20), rng.integers(1 << 20, 5 << 20)]))
        offset = int(rng.integers(0, FILE_BYTES - size))
        if rng.random() < 0.5:
            offset -= offset % ALIGN
        extents.append((offset, size))
    return extents


def check_reads_into_gpu(backend, path, seed):
    handle = backend.open(path)
    try:
        for index, (offset, size) in enumerate(random_extents(seed)):
            dest_offset = (index % 3) * ALIGN + (13 if index % 2 else 0)
            dest = torch.full((dest_offset + size + 512,), 0xA5, dtype=torch.uint8, device="cuda")
            backend.read_into(handle, offset, size, dest, dest_offset)
            host = dest.cpu().numpy()
            assert host[dest_offset:dest_offset + size].tobytes() == pread(path, offset, size), \
                f"{backend.name}: bytes differ for extent {offset}+{size}"
            assert (host[:dest_offset] == 0xA5).all() and (host[dest_offset + size:] == 0xA5).all(), \
                f"{backend.name} wrote outside its destination range"
    finally:
        backend.close(handle)


def check_extent_reader(path, io, monkeypatch):
    from gdsllm_core.layout.manifest import ExtentInfo, Manifest, TokenizerInfo

    monkeypatch.setenv("GDSLLM_IO", io)
    extents = random_extents(seed=99)
    manifest = Manifest(name="t", architecture="none", config={}, tokenizer=TokenizerInfo(kind="hf", file="t.json"),
                        extents=[ExtentInfo(f"e{i}", path.name, o, n, []) for i, (o, n) in enumerate(extents)],
                        files={path.name: FILE_BYTES})
    backends._cache.clear()
    with ExtentReader(path.parent, manifest, threads=8) as reader:
        assert reader.backend.name == io, (reader.backend.reason, reader.backend.fallbacks)
        buffers = [torch.full((n,), 0x5A, dtype=torch.uint8, device="cuda") for _, n in extents]
        reader.submit(manifest.extents, buffers).result(timeout=60)
    for (offset, size), buffer in zip(extents, buffers, strict=True):
        assert buffer.cpu().numpy().tobytes() == pread(path, offset, size), f"{io}: extent {offset}+{size} differs"


def test_auto_picks_cufile_when_the_udev_record_exists(udev_record, data_file, monkeypatch):
    monkeypatch.setenv("GDSLLM_IO", "auto")
    backend = backends.choose_backend(probe_path=data_file, refresh=True)
    assert backend.name == "cufile", backend.fallbacks
    assert ("GDS mode" if cufile.environment().nvidia_fs else "compat mode") in backend.reason


def test_cufile_reads_into_gpu_equal_pread(udev_record, data_file):
    cufile.probe(data_file)
    check_reads_into_gpu(cufile.CufileBackend(reason="test"), data_file, seed=1)


def test_cufile_extent_reader(udev_record, data_file, monkeypatch):
    check_extent_reader(data_file, "cufile", monkeypatch)


def test_cufile_registered_buffer(udev_record, data_file):
    cufile.probe(data_file)
    dest = torch.full((FILE_BYTES + 4096,), 0xA5, dtype=torch.uint8, device="cuda")
    cufile.register_buffer(dest.data_ptr(), dest.numel())
    handle = cufile.CuFileHandle(data_file)
    try:
        for offset, size in [(0, FILE_BYTES), (4096, 1 << 20), (12_345, 678_901)]:
            got = 0
            while got < size:
                got += handle.read(dest.data_ptr(), size - got, offset + got, 4096 + got)
            torch.cuda.synchronize()
            assert dest[4096:4096 + size].cpu().numpy().tobytes() == pread(data_file, offset, size)
    finally:
        handle.close()
        cufile.deregister_buffer(dest.data_ptr())


def test_cufile_batch_read(udev_record, data_file):
    cufile.probe(data_file)
    if not cufile.library().has_batch:
        pytest.skip(f"{cufile.library().path} exports no batch API")
    extents = random_extents(seed=5, count=6)
    starts = [int(s) for s in np.cumsum([0] + [size for _, size in extents])[:-1]]
    dest = torch.full((sum(size for _, size in extents),), 0xA5, dtype=torch.uint8, device="cuda")
    handle = cufile.CuFileHandle(data_file)
    try:
        try:
            done = cufile.batch_read([(handle, dest.data_ptr(), size, offset, start)
                                      for (offset, size), start in zip(extents, starts, strict=True)])
        except cufile.CuFileError as exc:
            if exc.code in (5038, 5049):
                pytest.skip(f"cuFile batch API unavailable here: {exc}")
            raise
    finally:
        handle.close()
    assert done == [size for _, size in extents]
    host = dest.cpu().numpy()
    for (offset, size), start in zip(extents, starts, strict=True):
        assert host[start:start + size].tobytes() == pread(data_file, offset, size), f"batch extent {offset}+{size}"


@pytest.mark.parametrize("bounce", [64 << 10, 4 << 20], ids=["bounce-64KiB", "bounce-4MiB"])
def test_posix_reads_into_gpu_equal_pread(data_file, bounce):
    backend = PosixBackend(reason="test", bounce_bytes=bounce, bounce_count=4)
    check_reads_into_gpu(backend, data_file, seed=2)
    assert not backend.notes, backend.notes  # the disk takes O_DIRECT: nothing fell back to buffered reads


def test_posix_extent_reader(data_file, monkeypatch):
    check_extent_reader(data_file, "posix", monkeypatch)


PROBE_SCRIPT = """
import json, sys
from gdsllm_core.errors import BackendUnavailableError
from gdsllm_core.storage import backends
result = {}
backend = backends.choose_backend(probe_path=sys.argv[1])
result["auto"] = {"name": backend.name, "reason": backend.reason, "fallbacks": backend.fallbacks}
try:
    import os
    os.environ["GDSLLM_IO"] = "cufile"
    backends.choose_backend(probe_path=sys.argv[1], refresh=True)
    result["forced"] = "no error"
except BackendUnavailableError as exc:
    result["forced"] = str(exc)
print(json.dumps(result))
"""


def test_cufile_without_udev_record_falls_back_with_5027(udev_record, data_file):
    if cufile.environment().nvidia_fs:
        pytest.skip("nvidia-fs is loaded: cuFile does not depend on the udev record here")
    if os.geteuid() != 0:
        pytest.skip("hiding the udev record needs root")
    hidden = udev_record.with_name(udev_record.name + ".hidden")
    udev_record.rename(hidden)
    try:
        env = {**os.environ, "GDSLLM_IO": "auto", "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
        run = subprocess.run([sys.executable, "-c", PROBE_SCRIPT, str(data_file)], env=env, capture_output=True,
                             text=True, timeout=120)
    finally:
        hidden.rename(udev_record)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["auto"]["name"] == "posix", result
    assert any("5027" in reason and "cannot identify the filesystem" in reason
               for reason in result["auto"]["fallbacks"]), result
    assert "5027" in result["forced"] and "GDSLLM_IO=cufile" in result["forced"], result
