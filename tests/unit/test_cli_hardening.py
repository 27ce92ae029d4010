"""Issue 20 items 8 and 10 at the command line: each is one `error:` line (plus a hint), no traceback: a GGUF with a
corrupt header, binary data on stdin, --seed and --temperature out of range, a context overflow whose hint names
options that exist, an invalid config.json reported as such."""

import struct

import pytest
from _cli_models import assert_one_line_error, cli_env, gdsllm, shared_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_tiny(tmp_path_factory)


@pytest.fixture
def env(tmp_path, tiny):
    return cli_env(tmp_path, GDSLLM_MODEL_ROOT=str(tiny[1]))


def test_a_gguf_with_a_corrupt_header_is_one_line(tmp_path, env):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + struct.pack("<Q", 2 ** 62) + b"general.architecture")
    assert_one_line_error(gdsllm(["pull", str(bad)], env, tmp_path), "corrupt GGUF header")


@pytest.mark.parametrize("data", [b"\xff\xfe\x00\x01binary", b"text with a \x00 inside"])
def test_binary_stdin_is_one_line(tmp_path, env, data):
    result = gdsllm(["run", "tiny", "--max-tokens", "2"], env, tmp_path, input=data.decode("latin-1"))
    assert_one_line_error(result, "stdin")


@pytest.mark.parametrize("args, fragment", [(["--seed", str(2 ** 64)], "--seed"),
                                            (["--seed", str(-(2 ** 63) - 1)], "--seed"),
                                            (["--temperature", "inf"], "--temperature"),
                                            (["--temperature", "1e-45"], "--temperature")])
def test_sampling_options_out_of_range_are_one_line(tmp_path, env, args, fragment):
    result = gdsllm(["run", "tiny", "--prompt", "hi", "--max-tokens", "2", *args], env, tmp_path)
    assert_one_line_error(result, fragment, "must be")


def test_the_context_overflow_hint_names_options_run_has(tmp_path, tiny):
    env = cli_env(tmp_path, GDSLLM_MODEL_ROOT=str(tiny[1]), GDSLLM_NUM_CTX="8")
    result = gdsllm(["run", "tiny", "--prompt", "the cat sat on the mat " * 4, "--max-tokens", "2"], env, tmp_path)
    assert_one_line_error(result, "context window", "GDSLLM_NUM_CTX")


def test_an_invalid_config_json_is_reported_as_such(tmp_path, env, tiny):
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    for path in tiny[0].iterdir():
        (checkpoint / path.name).write_bytes(path.read_bytes())
    (checkpoint / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    result = gdsllm(["pull", str(checkpoint), "--name", "broken"], env, tmp_path)
    assert_one_line_error(result, "config.json")
    assert "no installed converter" not in result.stderr
