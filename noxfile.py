"""nox sessions. They run in the current environment (no per-session venvs: torch is 750 MB); set it up with
README's commands first.

    nox -s tests      CPU test suite (what CI runs, with `kernels`)
    nox -s kernels    compile every CUDA kernel with NVRTC for sm_90 (no GPU needed)
    nox -s gpu        GPU tests (run on the GPU machine)
    nox -s llama      the LLaMA plugin's own tests
    nox -s qwen_moe   the Qwen3.5-MoE plugin's own tests
    nox -s fuzz       the adversarial suite, 10x the CI examples, with its counts (loopback only)
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
