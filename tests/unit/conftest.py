"""Fixtures of the CPU unit tests."""

import pytest


@pytest.fixture(scope="module")
def nvrtc():
    """NVRTC through CuPy (no GPU needed), or a skip saying what to install."""
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as exc:
        pytest.skip(f"NVRTC cannot load ({type(exc).__name__}: {exc}); install nvidia-cuda-nvrtc==13.0.*")
    return nvrtc
