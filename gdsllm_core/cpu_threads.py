"""How torch's CPU threads wait between parallel regions: decided by the `gdsllm` command before torch loads
(GNU libgomp, torch's OpenMP, reads its environment then and never again).

Decode with CPU-computed layers beside a GPU alternates a few milliseconds of CPU work with GPU work. By default
libgomp's idle threads spin briefly, then sleep, and in a VM a sleeping vCPU can take long to wake: on the H100
machine (2026-11-25) a 7B Q4_0 layer took 5.0 ms median and up to 30 ms inside decode that way, 3.4 ms with the
threads kept spinning through the step (decode 48 against 63 ms per token with 8 CPU layers). So where a GPU can
run the model, the command raises the spin count to SPIN_COUNT: enough to bridge the gaps of a decode step (the
GPU's layers between two CPU layers, a few ms), short enough that idle threads sleep soon after the last step.

Everywhere else (no GPU, `--device cpu`, GDSLLM_DEVICE=cpu) threads never spin: OMP_WAIT_POLICY=PASSIVE. A
spinning thread takes a core from whatever else runs there, and its partner then waits for a descheduled thread:
on the 2-core CPU machine with other work running (2026-12) spinning cut `gdsllm bench --device cpu` from 17.6 to
9.6 tok/s (SmolLM2 Q4_1) and from 16.9 to 0.93 (its Q4_K_M requantization). What the user set wins."""

import os
import sys
from collections.abc import Sequence
from pathlib import Path

# libgomp spin iterations before an idle thread sleeps: about 18 ms of one core on the 2-core AMD EPYC machine
# (2026-12; 10M spun 0.22 s there, libgomp's default 300k about 7 ms).
SPIN_COUNT = "1000000"
_NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")  # one folder per GPU the NVIDIA driver sees


def gpu_visible() -> bool:
    """Whether an NVIDIA GPU is there for this process, told without loading torch or CUDA."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1"):
        return False
    try:
        return any(_NVIDIA_GPUS.iterdir())
    except OSError:
        return False


def cpu_only(argv: Sequence[str]) -> bool:
    """Whether the command line or GDSLLM_DEVICE asks for the CPU."""
    if os.environ.get("GDSLLM_DEVICE", "").strip().lower() == "cpu":
        return True
    args = list(argv)
    return "--device=cpu" in args or any(a == "--device" and b == "cpu" for a, b in zip(args, args[1:]))


def wait_policy(argv: Sequence[str]) -> dict[str, str]:
    """The variables to set: GOMP_SPINCOUNT=SPIN_COUNT where CPU layers may run beside a GPU, OMP_WAIT_POLICY=PASSIVE
    for CPU-only runs, none if the user set either."""
    if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return {}
    if gpu_visible() and not cpu_only(argv):
        return {"GOMP_SPINCOUNT": SPIN_COUNT}
    return {"OMP_WAIT_POLICY": "PASSIVE"}


def choose_wait_policy(argv: Sequence[str]) -> None:
    """Apply `wait_policy` before torch loads (afterwards it would have no effect)."""
    if "torch" not in sys.modules:
        os.environ.update(wait_policy(argv))


def describe() -> str:
    """torch's CPU thread count and how its idle threads wait, for `gdsllm doctor`."""
    import torch

    policy, spins = os.environ.get("OMP_WAIT_POLICY"), os.environ.get("GOMP_SPINCOUNT")
    wait = (f"OMP_WAIT_POLICY={policy}" if policy else f"spin GOMP_SPINCOUNT={spins} times, then sleep" if spins
            else "libgomp's default (spin briefly, then sleep)")
    return f"{torch.get_num_threads()} threads; idle threads {wait}"
