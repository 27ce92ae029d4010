"""`gdsllm run`'s sampling options, `/set parameter` and the default token cap, driven as a person would (pexpect)
on a tiny LLaMA whose end-of-turn token is unreachable (its answers never end by themselves). top-k 1 must give the
greedy answer whatever the temperature; the cap must cut an answer at the documented count."""

import pexpect
import pytest
from _cli_models import GDSLLM, cli_env, gdsllm, shared_tiny

from gdsllm_core.cli.chat import DEFAULT_MAX_TOKENS

PROMPT = ">>> "


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_tiny(tmp_path_factory)


def run_once(tmp_path, root, *args: str) -> str:
    result = gdsllm(["run", "tiny", "--prompt", "hello there", *args], cli_env(tmp_path, GDSLLM_MODEL_ROOT=str(root)),
                    tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    return result.stdout


@pytest.mark.slow  # ~26 s: six one-shot runs, each a fresh process that loads the model
def test_top_k_one_is_greedy_and_options_are_checked(tmp_path, tiny):
    _, root = tiny
    greedy = run_once(tmp_path, root, "--max-tokens", "8", "--temperature", "0")
    assert run_once(tmp_path, root, "--max-tokens", "8", "--temperature", "1.5", "--top-k", "1", "--seed", "1") == greedy
    assert run_once(tmp_path, root, "--max-tokens", "8", "--temperature", "1.5", "--min-p", "1", "--seed", "2") == greedy
    hot = {run_once(tmp_path, root, "--max-tokens", "8", "--temperature", "1.5", "--seed", str(seed))
           for seed in (3, 4)}
    assert hot != {greedy}  # the options above mattered
    bad = gdsllm(["run", "tiny", "--prompt", "x", "--top-p", "1.5"], cli_env(tmp_path, GDSLLM_MODEL_ROOT=str(root)),
                 tmp_path)
    assert bad.returncode != 0 and "--top-p" in bad.stderr
    small = gdsllm(["run", "tiny", "--prompt", "hello there hello there", "--num-ctx", "4"],
                   cli_env(tmp_path, GDSLLM_MODEL_ROOT=str(root)), tmp_path)
    assert small.returncode == 1 and "context window is 4 tokens" in small.stderr


def test_set_parameter_in_the_chat(tmp_path, tiny):
    _, root = tiny
    greedy = run_once(tmp_path, root, "--max-tokens", "8", "--temperature", "0").strip()
    env = cli_env(tmp_path, GDSLLM_MODEL_ROOT=str(root))
    child = pexpect.spawn(GDSLLM, ["run", "tiny", "--temperature", "1.5", "--seed", "5"], env=env, cwd=str(tmp_path),
                          encoding="utf-8", codec_errors="replace", timeout=90, dimensions=(50, 250))
    child.expect(PROMPT)
    for line, echo in (("/set parameter top_k 1", "Set parameter 'top_k' to '1'"),
                       ("/set parameter num_predict 8", "Set parameter 'num_predict' to '8'")):
        child.sendline(line)
        child.expect_exact(echo)
        child.expect(PROMPT)
    child.sendline("/set parameter top_p 7")
    child.expect_exact("top_p 7.0 is out of range")
    child.expect(PROMPT)
    child.sendline("/set parameter nonsense 1")
    child.expect("unknown parameter 'nonsense'")
    child.expect(PROMPT)
    child.sendline("/clear")  # a fresh conversation, so the prompt is the one-shot run's
    child.expect(PROMPT)
    child.sendline("hello there")
    child.expect_exact("hello there\r\n")
    child.expect_exact(PROMPT)
    assert child.before.replace("\r\n", "\n").strip().startswith(greedy)
    child.sendline("/bye")
    child.expect(pexpect.EOF)


@pytest.mark.slow  # ~55 s on 2 cores: 2048 tokens decoded on the CPU
def test_an_endless_answer_stops_at_the_default_cap(tmp_path, tiny):
    _, root = tiny
    env = cli_env(tmp_path, GDSLLM_MODEL_ROOT=str(root))
    result = gdsllm(["run", "tiny", "--prompt", "hello", "--temperature", "0", "--verbose"], env, tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    assert f"{DEFAULT_MAX_TOKENS} tokens in" in result.stderr and "stop: length" in result.stderr
    assert f"answer cut at {DEFAULT_MAX_TOKENS} tokens" in result.stderr
