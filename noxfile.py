"""nox sessions. They run in the current environment (no per-session venvs: torch is 750 MB); set it up with
README's commands first.

    nox -s tests      CPU test suite (what CI runs, with `kernels`)
    nox -s kernels    compile every CUDA kernel with NVRTC for sm_90 (no GPU needed)
    nox -s gpu        GPU tests (run on the GPU machine)
    nox -s llama      the LLaMA plugin's own tests
    nox -s qwen_moe   the Qwen3.5-MoE plugin's own tests
    nox -s lint       ruff
    nox -s demo       one answer from the bundled default model on the CPU
"""

import nox

nox.options.sessions = ["tests", "kernels"]
nox.options.default_venv_backend = "none"


def pytest(session: nox.Session, *args: str) -> None:
    """The one pytest entry: extra arguments after `--` are passed on."""
    session.run("python", "-m", "pytest", *args, *session.posargs)


@nox.session
def tests(session: nox.Session) -> None:
    """CPU tests: unit, reference and both plugins' (GPU tests are skipped)."""
    pytest(session, "-m", "not gpu", "--timeout=900")


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
def llamacpp(session: nox.Session) -> None:
    """Tests marked `llamacpp` (quantized files made by llama-quantize). Uses GDSLLM_LLAMACPP_BIN when set; else
    builds llama.cpp's CPU tools from the llama-cpp-python sdist (../shared/tools/llamacpp-src.sh) into
    GDSLLM_LLAMACPP_CACHE (default ~/.cache/gdsllm/llamacpp), once."""
    import os
    from pathlib import Path

    if not os.environ.get("GDSLLM_LLAMACPP_BIN"):
        cache = Path(os.environ.get("GDSLLM_LLAMACPP_CACHE", Path.home() / ".cache" / "gdsllm" / "llamacpp"))
        tree, binaries = cache / "build-src" / "llama.cpp", cache / "build-src" / "llama.cpp" / "build" / "bin"
        if not (binaries / "llama-quantize").is_file():
            session.run("bash", "-c", f"WITH_CONVERT=1 ../shared/tools/llamacpp-src.sh {cache} && "
                        f"mkdir -p {cache}/build-src && tar xzf {cache}/llama.cpp-src.tgz -C {cache}/build-src", external=True)
            session.run("cmake", "-S", str(tree), "-B", str(tree / "build"), "-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF",
                        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DCMAKE_BUILD_TYPE=Release",
                        external=True)
            session.run("cmake", "--build", str(tree / "build"), "-j2", "--target", "llama-quantize", external=True)
        session.env["GDSLLM_LLAMACPP_BIN"] = str(binaries)
        session.env.setdefault("GDSLLM_LLAMACPP_DIR", str(tree))
    pytest(session, "-m", "llamacpp", "plugins/gdsllm_qwen3/tests", "plugins/gdsllm_gemma/tests")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the core, the plugins and the tests."""
    session.run("ruff", "check", "gdsllm_core", "plugins", "tests", "noxfile.py")


@nox.session
def demo(session: nox.Session) -> None:
    """Ask the bundled default model one question on the CPU."""
    session.run("gdsllm", "run", "--prompt", "What is the capital of France?", "--max-tokens", "32",
                "--temperature", "0")
