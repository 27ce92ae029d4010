"""Storage benchmark: read a multi-GB file into GPU memory through each backend, caches dropped before every read,
beside the O_DIRECT ceiling measured in the same run (several threads, 16 MiB reads into pinned host memory).

    python benchmarks/storage_bench.py --dir /var/tmp --size-gib 4 --json out.json

Run as root so `echo 3 > /proc/sys/vm/drop_caches` works (otherwise the file alone is evicted with fadvise).
cuFile needs a working handle registration on the file system (see `gdsllm doctor`); it is skipped, with the reason,
when it has none."""

import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from gdsllm_core.storage import backends, cufile
from gdsllm_core.storage.pinned import aligned_host_buffer
from gdsllm_core.storage.posix import PosixBackend

MiB = 1 << 20


def make_file(path: Path, nbytes: int) -> None:
    if path.exists() and path.stat().st_size == nbytes:
        return
    rng = np.random.default_rng(0)
    block = rng.integers(0, 256, 64 * MiB, dtype=np.uint8)
    with open(path, "wb") as out:
        for index, start in enumerate(range(0, nbytes, len(block))):
            out.write((block ^ np.uint8(index % 251)).tobytes()[:nbytes - start])
        out.flush()
        os.fsync(out.fileno())


def odirect_ceiling(path: Path, threads: int, chunk: int) -> float:
    """Seconds to read the file with O_DIRECT, `threads` readers, `chunk`-byte reads into pinned buffers."""
    nbytes = path.stat().st_size
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    local = threading.local()

    def read(start: int) -> None:
        if not hasattr(local, "view"):
            local.view = memoryview(aligned_host_buffer(chunk, pin=torch.cuda.is_available()).numpy())
        want = min(chunk, nbytes - start)
        got = os.preadv(fd, [local.view[:-(-want // 4096) * 4096]], start)
        if got < want:
            raise OSError(f"short O_DIRECT read at {start}: {got} of {want}")

    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda _: read(0), range(threads)))  # allocate every thread's buffer before timing
            backends.drop_page_cache(path, everything=True)
            began = time.perf_counter()
            list(pool.map(read, range(0, nbytes, chunk)))
            return time.perf_counter() - began
    finally:
        os.close(fd)


def spot_check(path: Path, dest: torch.Tensor, samples: int = 8) -> bool:
    """Random 1 MiB windows of `dest` equal pread of the file."""
    nbytes = path.stat().st_size
    rng = np.random.default_rng()
    fd = os.open(path, os.O_RDONLY)
    try:
        for start in [0, nbytes - MiB, *rng.integers(0, nbytes - MiB, samples)]:
            start = int(start)
            if dest[start:start + MiB].cpu().numpy().tobytes() != os.pread(fd, MiB, start):
                return False
        return True
    finally:
        os.close(fd)


def timed_backend_read(backend, path: Path, dest: torch.Tensor, threads: int, chunk: int) -> tuple[float, bool]:
    """Seconds to read the whole file into `dest` (zeroed first, caches dropped), and whether spot checks pass."""
    dest.fill_(0)
    torch.cuda.synchronize()
    backends.drop_page_cache(path, everything=True)
    seconds = backends.read_file(backend, path, dest, threads=threads, chunk_bytes=chunk)
    return seconds, spot_check(path, dest)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--size-gib", type=float, default=4.0)
    parser.add_argument("--threads", default="8,16")
    parser.add_argument("--chunk-mib", default="16,64", help="read size handed to each backend call")
    parser.add_argument("--bounce-mib", default="4,8", help="posix bounce-buffer sizes to try")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--keep", action="store_true", help="keep the test file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: this benchmark reads into GPU memory", file=sys.stderr)
        return 2
    threads_list = [int(t) for t in args.threads.split(",")]
    chunks = [int(c) * MiB for c in args.chunk_mib.split(",")]
    bounces = [int(b) * MiB for b in args.bounce_mib.split(",")]
    nbytes = int(args.size_gib * (1 << 30))
    args.dir.mkdir(parents=True, exist_ok=True)
    path = args.dir / f"gdsllm-bench-{nbytes}.bin"
    began = time.perf_counter()
    make_file(path, nbytes)
    print(f"file {path}: {nbytes / 1e9:.2f} GB (ready in {time.perf_counter() - began:.1f} s); "
          f"cache: {backends.drop_page_cache(path, everything=True)}", flush=True)
    dest = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    rows = []

    def add(path_name, threads, chunk, bounce, seconds, verified, note=""):
        rows.append({"path": path_name, "threads": threads, "chunk_mib": chunk // MiB if chunk else None,
                     "bounce_mib": bounce // MiB if bounce else None, "seconds": seconds,
                     "gb_per_s": nbytes / seconds / 1e9 if seconds else None, "verified": verified, "note": note})
        row = rows[-1]
        print(f"  {path_name:10s} threads={threads:<3d} chunk={row['chunk_mib']} bounce={row['bounce_mib']} "
              f"{row['gb_per_s'] or 0:.3f} GB/s {'' if verified in (None, True) else 'BYTES DIFFER'} {note}",
              flush=True)

    for threads in threads_list:
        add("O_DIRECT", threads, 16 * MiB, None, odirect_ceiling(path, threads, 16 * MiB), None, "ceiling")

    try:
        cufile.probe(path)
        cu_backend = cufile.CufileBackend(reason="benchmark")
        cu_reason = None
    except Exception as exc:
        cu_backend, cu_reason = None, str(exc)
        print(f"  cufile skipped: {cu_reason}", flush=True)
    for threads in threads_list:
        for chunk in chunks:
            if cu_backend is not None:
                seconds, verified = timed_backend_read(cu_backend, path, dest, threads, chunk)
                add("cufile", threads, chunk, None, seconds, verified)
            for bounce in bounces:
                posix = PosixBackend(reason="benchmark", bounce_bytes=bounce, bounce_count=2 * threads)
                seconds, verified = timed_backend_read(posix, path, dest, threads, chunk)
                add("posix", threads, chunk, bounce, seconds, verified, "; ".join(posix.notes))

    for threads in threads_list:  # the ceiling again: the disk drifts, so take the best of both passes
        add("O_DIRECT", threads, 16 * MiB, None, odirect_ceiling(path, threads, 16 * MiB), None, "ceiling (again)")

    ceiling = max(r["gb_per_s"] for r in rows if r["path"] == "O_DIRECT")
    print(f"\nStorage benchmark: {nbytes / 2**30:.1f} GiB file on {args.dir}, page cache dropped before every read, "
          f"GPU {torch.cuda.get_device_name()}")
    print(f"{'path':10s} {'threads':>7s} {'chunk MiB':>9s} {'bounce MiB':>10s} {'GB/s':>7s} {'% ceiling':>9s} verified")
    for row in rows:
        print(f"{row['path']:10s} {row['threads']:>7d} {row['chunk_mib'] or '-':>9} {row['bounce_mib'] or '-':>10} "
              f"{row['gb_per_s']:>7.3f} {100 * row['gb_per_s'] / ceiling:>8.1f}% "
              f"{'-' if row['verified'] is None else ('yes' if row['verified'] else 'NO')}")
    best = {name: max((r["gb_per_s"] for r in rows if r["path"] == name), default=None) for name in ("cufile", "posix")}
    print(f"ceiling (best O_DIRECT, same run): {ceiling:.3f} GB/s; best cufile: "
          + (f"{best['cufile']:.3f} GB/s ({100 * best['cufile'] / ceiling:.0f}%)" if best["cufile"] else
             f"n/a ({cu_reason})")
          + f"; best posix: {best['posix']:.3f} GB/s ({100 * best['posix'] / ceiling:.0f}%)")
    if args.json:
        args.json.write_text(json.dumps({"bytes": nbytes, "ceiling_gb_per_s": ceiling, "cufile_skipped": cu_reason,
                                         "gpu": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    if not args.keep:
        path.unlink()
    return 0 if all(r["verified"] in (None, True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
