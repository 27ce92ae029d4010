"""nox sessions. They run in the current environment (no per-session venvs: torch is 750 MB); set it up with
README's commands first.

    nox -s tests      CPU test suite (what CI runs, with `kernels`)
    nox -s slow       CPU tests marked slow (not in CI)
    nox -s kernels    compile every CUDA kernel with NVRTC for sm_90 (no GPU needed)
    nox -s gpu        GPU tests (run on the GPU machine)
    nox -s llama      the LLaMA plugin's own tests
    nox -s qwen_moe   the Qwen3.5-MoE plugin's own tests
    nox -s qwen3      the Qwen2/Qwen3/Qwen3-MoE plugin's own tests
    nox -s gemma      the Gemma 3 plugin's own tests
    nox -s llamacpp   tests that need llama.cpp's llama-quantize (builds llama.cpp once)
    nox -s fuzz       the adversarial suite, 10x the CI examples, with its counts (loopback only)
    nox -s lint       ruff
    nox -s demo       one answer from the bundled default model on the CPU
"""

import os
import sys
import tarfile
from pathlib import Path

import nox

nox.options.sessions = ["tests", "kernels"]
nox.options.default_venv_backend = "none"


def pytest(session: nox.Session, *args: str) -> None:
    """The one pytest entry: extra arguments after `--` are passed on."""
    session.run("python", "-m", "pytest", *args, *session.posargs)


@nox.session
def tests(session: nox.Session) -> None:
    """CPU tests: unit, reference and both plugins' (GPU tests are skipped)."""
    pytest(session, "-m", "not gpu and not llamacpp and not slow", "--timeout=900")


@nox.session
def slow(session: nox.Session) -> None:
    """CPU tests marked slow (real-client round trips, trained tiny models, long CLI chats): kept out of CI's time."""
    pytest(session, "-m", "slow and not gpu and not llamacpp", "--timeout=1800")


@nox.session
def kernels(session: nox.Session) -> None:
    """Compile every kernel source with NVRTC for -arch=sm_90."""
    pytest(session, "tests/unit/test_kernels_compile.py", "-q")


@nox.session
def gpu(session: nox.Session) -> None:
    """GPU tests (need CUDA)."""
    pytest(session, "-m", "gpu", "-v")


@nox.session
def llama(session: nox.Session) -> None:
    """The LLaMA plugin's tests."""
    pytest(session, "plugins/gdsllm_llama/tests")


@nox.session
def qwen_moe(session: nox.Session) -> None:
    """The Qwen3.5-MoE plugin's tests."""
    pytest(session, "plugins/gdsllm_qwen_moe/tests")


@nox.session
def qwen3(session: nox.Session) -> None:
    """The Qwen2/Qwen3/Qwen3-MoE plugin's tests."""
    pytest(session, "plugins/gdsllm_qwen3/tests")


@nox.session
def gemma(session: nox.Session) -> None:
    """The Gemma 3 plugin's tests."""
    pytest(session, "plugins/gdsllm_gemma/tests")


LLAMACPP_SDIST = "llama-cpp-python==0.3.36"  # the llama.cpp its wheel vendors: the same as the tests' converter
LLAMACPP_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gdsllm-tests" / "llama.cpp-build"


def llamacpp_binaries(session: nox.Session) -> str:
    """build/bin of a CPU build of llama.cpp: GDSLLM_LLAMACPP_BIN, else one made once into the user's cache from
    the sdist on PyPI (3-11 minutes on 2 cores)."""
    if os.environ.get("GDSLLM_LLAMACPP_BIN"):
        return os.environ["GDSLLM_LLAMACPP_BIN"]
    source, binaries = LLAMACPP_CACHE / "llama.cpp", LLAMACPP_CACHE / "llama.cpp" / "build" / "bin"
    if not (binaries / "llama-quantize").is_file():
        LLAMACPP_CACHE.mkdir(parents=True, exist_ok=True)
        session.run(sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d",
                    str(LLAMACPP_CACHE), LLAMACPP_SDIST)
        with tarfile.open(next(LLAMACPP_CACHE.glob("llama_cpp_python-*.tar.gz"))) as archive:
            root = archive.getnames()[0].split("/")[0] + "/vendor/llama.cpp/"
            members = [m for m in archive.getmembers() if m.name.startswith(root)]
            for member in members:
                member.name = "llama.cpp/" + member.name[len(root):]
            archive.extractall(LLAMACPP_CACHE, members=members, filter="data")
        session.run("cmake", "-S", str(source), "-B", str(source / "build"), "-DCMAKE_BUILD_TYPE=Release",
                    "-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", external=True)
        session.run("cmake", "--build", str(source / "build"), "-j", str(os.cpu_count() or 2), "--target",
                    "llama-quantize", external=True)
    return str(binaries)


@nox.session
def llamacpp(session: nox.Session) -> None:
    """The tests that need llama.cpp's llama-quantize (marker `llamacpp`: K-quant files it wrote)."""
    session.env["GDSLLM_LLAMACPP_BIN"] = llamacpp_binaries(session)
    pytest(session, "-m", "llamacpp")


@nox.session
def fuzz(session: nox.Session) -> None:
    """The adversarial suite on a loopback server (schemathesis over both dialects, numeric extremes, deep nesting,
    a hostile chat template, corrupted manifests) at 10x CI's size; prints request, server-error and hang counts."""
    session.env["GDSLLM_FUZZ_SCALE"] = session.env.get("GDSLLM_FUZZ_SCALE", "10")
    pytest(session, "tests/unit/test_fuzz.py", "-s", "-q", "--timeout=1800")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the core, the plugins and the tests."""
    session.run("ruff", "check", "gdsllm_core", "plugins", "tests", "noxfile.py")


@nox.session
def demo(session: nox.Session) -> None:
    """Ask the bundled default model one question on the CPU."""
    session.run("gdsllm", "run", "--prompt", "What is the capital of France?", "--max-tokens", "32",
                "--temperature", "0")
