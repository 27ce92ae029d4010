"""`gdsllm run` driven as a person would, through a pseudo-terminal (pexpect).

What the history test proves: `--verbose` prints the prompt token count the engine used for each answer. Those
counts are checked against prompts rendered independently (jinja2 + the `tokenizers` library on the checkpoint's own
tokenizer.json): turn 1 is exactly the ChatML prompt of the (multi-line) first message; turn 2 is exactly turn 1's
prompt + the first answer (as many tokens as the engine generated) + `<|im_end|>\n` + the second message's prompt;
after /clear the prompt is the new message alone. A random tiny model cannot "remember" a name in any meaningful
sense, so the test checks what the engine was given, not what the model says."""

import time

import jinja2
import pexpect
import pytest
from _cli_models import CHATML, GDSLLM, assert_same_model, cli_env, convert_into, gdsllm, shared_tiny
from tokenizers import Tokenizer

PROMPT = ">>> "


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_tiny(tmp_path_factory)


def reference_prompt_tokens(folder, messages: list[dict]) -> int:
    text = jinja2.Template(CHATML).render(messages=messages, add_generation_prompt=True)
    return len(Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text, add_special_tokens=False).ids)


def spawn_run(tmp_path, root, *args: str) -> pexpect.spawn:
    env = cli_env(tmp_path, GDSLLM_MODEL_ROOT=str(root))
    return pexpect.spawn(GDSLLM, ["run", "tiny", "--temperature", "0", *args], env=env, cwd=str(tmp_path),
                         encoding="utf-8", codec_errors="replace", timeout=90, dimensions=(50, 250))


def ask(child: pexpect.spawn, *lines: str) -> tuple[int, int]:
    """Send a message (several lines for a \"\"\" block); (prompt tokens, completion tokens) from --verbose."""
    for line in lines:
        child.sendline(line)
    child.expect(r"prompt (\d+) tokens in [\d.]+ s; (\d+) tokens")
    prompt_tokens, completion_tokens = int(child.match.group(1)), int(child.match.group(2))
    child.expect(PROMPT)
    return prompt_tokens, completion_tokens


def test_chat_history_multiline_system_clear_and_bye(tmp_path, tiny):
    folder, root = tiny
    system = {"role": "system", "content": "be brief."}
    child = spawn_run(tmp_path, root, "--max-tokens", "1", "--verbose", "--system", "be brief.")
    child.expect(PROMPT)
    first = "my name is ada.\nwhat is your name?"
    p1, c1 = ask(child, '"""my name is ada.', 'what is your name?"""')
    assert p1 == reference_prompt_tokens(folder, [system, {"role": "user", "content": first}])
    assert c1 == 1

    p2, _ = ask(child, "hello there")
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    end_of_turn = len(tokenizer.encode("<|im_end|>\n").ids)
    system_turn = len(tokenizer.encode(jinja2.Template(CHATML).render(messages=[system])).ids)
    alone = reference_prompt_tokens(folder, [system, {"role": "user", "content": "hello there"}])
    assert p2 == p1 + c1 + end_of_turn + alone - system_turn  # the first turn (question and answer) came along

    child.sendline("/clear")
    child.expect("Cleared")
    child.expect(PROMPT)
    p3, _ = ask(child, "hello there")
    assert p3 == alone  # the history is gone, the system message stays

    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_the_answer_not_the_program(tmp_path, tiny):
    _, root = tiny
    child = spawn_run(tmp_path, root, "--max-tokens", "3000")
    child.expect(PROMPT)
    child.sendline("tell me a long story")
    child.expect("tell me a long story\r\n")
    child.expect(r".{24}", timeout=60)  # the answer is streaming
    started = time.monotonic()
    child.sendintr()
    child.expect(r"answer stopped")
    child.expect(PROMPT)
    assert time.monotonic() - started < 20  # 3000 tokens would take minutes
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_at_the_prompt_keeps_the_program_and_ctrl_d_exits(tmp_path, tiny):
    _, root = tiny
    child = spawn_run(tmp_path, root)
    child.expect(PROMPT)
    child.sendintr()
    child.expect("Use Ctrl \\+ d or /bye to exit")
    child.expect(PROMPT)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_one_prompt_with_seed_is_reproducible_and_stdin_is_a_prompt(tmp_path, tiny):
    """At temperature 1.5 over a near-uniform tiny model, two runs agree only if the seed drives the sampler; the
    second run reads the same prompt from a pipe instead of --prompt."""
    _, root = tiny
    env = cli_env(tmp_path, GDSLLM_MODEL_ROOT=str(root))
    args = ["run", "tiny", "--max-tokens", "12", "--temperature", "1.5", "--seed", "7"]
    first = gdsllm([*args, "--prompt", "hello there"], env, tmp_path)
    second = gdsllm(args, env, tmp_path, input="hello there")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert first.stdout.strip() and first.stdout == second.stdout
    assert "Traceback" not in first.stderr + second.stderr


def test_env_file_in_the_working_directory_is_read_but_never_overrides(tmp_path, tiny):
    _, root = tiny
    env = cli_env(tmp_path)
    del env["GDSLLM_MODEL_ROOT"]
    (tmp_path / ".env").write_text(f"GDSLLM_MODEL_ROOT={root}\n")
    assert gdsllm(["list"], env, tmp_path).stdout.split()[6:8] == ["tiny", "llama"]
    env["GDSLLM_MODEL_ROOT"] = str(tmp_path / "empty")
    assert "no models" in gdsllm(["list"], env, tmp_path).stderr


@pytest.mark.slow  # ~30 s: converts the bundled 98 MB model, then loads it twice and answers three questions
def test_first_run_without_a_model_sets_up_the_bundled_default_and_chats(tmp_path, request):
    """What a fresh machine does: `gdsllm run` with an empty store converts the bundled SmolLM2 into it and answers;
    the stored model is byte-identical to converting the bundled GGUF directly. The next run converts nothing and
    holds a real two-turn chat: the elliptical follow-up "And of Italy?" gets "… Rome" only because the first turn
    is in the prompt (greedy SmolLM2 asked "And of Italy?" alone answers with an unrelated apology)."""
    from gdsllm_core.bundled import DEFAULT_MODEL, default_gguf

    env = cli_env(tmp_path)
    first = gdsllm(["run", "--prompt", "What is the capital of France?", "--max-tokens", "12", "--temperature", "0"],
                   env, tmp_path, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "first run: converting the bundled default model" in first.stderr and first.stdout.strip()
    try:
        direct = request.getfixturevalue("smollm2")
        direct_root, direct_name = direct.path.parent, direct.name
    except pytest.FixtureLookupError:
        convert_into(default_gguf(), tmp_path / "direct", "smollm2")
        direct_root, direct_name = tmp_path / "direct", "smollm2"
    assert_same_model(tmp_path / "models", DEFAULT_MODEL, direct_root, direct_name)

    child = pexpect.spawn(GDSLLM, ["run", "--max-tokens", "12", "--temperature", "0"], env=env, cwd=str(tmp_path),
                          encoding="utf-8", codec_errors="replace", timeout=120, dimensions=(50, 250))
    child.expect(PROMPT)
    assert "converting" not in child.before
    child.sendline("What is the capital of France?")
    child.expect("What is the capital of France\\?\r\n")
    child.expect(PROMPT)
    assert child.before.strip() == first.stdout.strip()  # the same greedy answer as the one-shot run
    child.sendline("And of Italy?")
    child.expect("And of Italy\\?\r\n")
    child.expect(PROMPT)
    assert "Rome" in child.before
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
