"""How torch's CPU threads wait between parallel regions: decided by the `gdsllm` command before torch loads
(GNU libgomp, torch's OpenMP, reads its environment then).

Decode with CPU-computed layers alternates a few milliseconds of CPU work with GPU work. By default libgomp's idle
threads spin briefly, then sleep, and in a VM a sleeping vCPU can take long to wake: on the H100 machine
(2026-11-25) a 7B Q4_0 layer took 5.0 ms median and up to 30 ms inside decode that way, 3.4 ms with the threads kept
spinning through the step (GOMP_SPINCOUNT=10M; decode 48 against 63 ms per token with 8 CPU layers). So the
command raises the spin count unless the user set GOMP_SPINCOUNT or OMP_WAIT_POLICY; threads still sleep once
idle for longer (a fraction of a second)."""

import os
import sys

SPIN_COUNT = "10000000"


def keep_threads_spinning() -> None:
    """Set GOMP_SPINCOUNT to SPIN_COUNT if the user set neither it nor OMP_WAIT_POLICY and torch is not loaded yet
    (afterwards it would have no effect)."""
    if "torch" not in sys.modules and "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT


def describe() -> str:
    """torch's CPU thread count and how its idle threads wait, for `gdsllm doctor`."""
    import torch

    policy, spins = os.environ.get("OMP_WAIT_POLICY"), os.environ.get("GOMP_SPINCOUNT")
    wait = (f"OMP_WAIT_POLICY={policy}" if policy else f"spin GOMP_SPINCOUNT={spins} times, then sleep" if spins
            else "libgomp's default (spin briefly, then sleep)")
    return f"{torch.get_num_threads()} threads; idle threads {wait}"
