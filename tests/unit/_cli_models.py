"""Helpers for the CLI, pull and server tests: a tiny LLaMA checkpoint made with transformers, running `gdsllm` as a
process with an isolated store, cache and runtime folder, and a free loopback port."""

import os
import socket
import subprocess
import sys
from pathlib import Path

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ("the cat sat on the mat. a dog ran in the park. birds fly over the sea at dawn. my name is ada. "
          "what is your name? hello there, how are you today? i am fine, thank you. ") * 20
GDSLLM = str(Path(sys.executable).with_name("gdsllm"))


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """A 2-layer LLaMA (hidden 128, 3.5 MB of fp32 weights, vocab 300) saved with save_pretrained, with a BPE tokenizer and a ChatML
    template. Its end-of-turn tokens are made unreachable (a constant residual feature with a large negative weight
    in their output rows), so greedy answers run until --max-tokens, which the Ctrl-C test needs."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(folder)

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=128, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=4096,
                         tie_word_embeddings=False, eos_token_id=tokenizer.token_to_id("<|im_end|>"),
                         bos_token_id=None, pad_token_id=tokenizer.token_to_id("<|endoftext|>"))
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 5.0  # a constant feature the layers never write to …
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0
            layer.mlp.down_proj.weight[0, :] = 0
        for token in SPECIALS:  # … so these rows always score far below every other token
            model.lm_head.weight[tokenizer.token_to_id(token), 0] = -50.0
    model.save_pretrained(folder)
    return folder


def cli_env(tmp: Path, **extra: str) -> dict[str, str]:
    """An environment where `gdsllm` sees only this test's folders and the installed LLaMA plugin."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("GDSLLM_", "HF_", "HUGGINGFACE_"))}
    env.update(GDSLLM_MODEL_ROOT=str(tmp / "models"), GDSLLM_HF_CACHE=str(tmp / "hf-cache"),
               GDSLLM_RUNTIME_DIR=str(tmp / "run"), GDSLLM_CONFIG_DIR=str(tmp / "config"), GDSLLM_LOAD_PLUGINS="llama",
               GDSLLM_IO="cpu", GDSLLM_DEVICE="cpu", HF_HOME=str(tmp / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_XET="1", COLUMNS="200", NO_COLOR="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def gdsllm(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([GDSLLM, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, **kwargs)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit non-zero; stderr is `error: …` (plus an optional `hint: …` line), no traceback; fragments appear."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    error_lines = [line for line in lines if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    assert all(line.startswith(("error:", "hint:")) for line in lines[lines.index(error_lines[0]):]), result.stderr
    message = " ".join(lines)
    for fragment in fragments:
        assert fragment in message, (fragment, result.stderr)


def shared_tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint folder, model root holding it converted as "tiny"), made once per test session."""
    base = tmp_path_factory.getbasetemp() / "cli-tiny-llama"
    folder, root = base / "checkpoint", base / "models"
    if not (root / "tiny" / "manifest.json").is_file():
        make_tiny_llama(folder)
        convert_into(folder, root, "tiny")
    return folder, root


def convert_into(source: Path, root: Path, name: str) -> None:
    """Convert in this process (registering the LLaMA plugin itself where entry points are off in tests)."""
    import gdsllm_llama.plugin
    from gdsllm_core import plugins
    from gdsllm_core.convert import convert
    from gdsllm_core.layout.store import ModelStore

    plugins.ensure_registered(gdsllm_llama.plugin, "llama")
    convert(source, ModelStore(root), name=name)


def copy_store(source_root: Path, target_root: Path) -> Path:
    """A private copy of a model root (tests that delete or corrupt models get their own)."""
    import shutil

    shutil.copytree(source_root, target_root)
    return target_root


def invoke(args: list[str], input: str | None = None):
    """Run `gdsllm ARGS` in this process (click's CliRunner): fast, for tests that need no separate process."""
    from click.testing import CliRunner

    from gdsllm_core.cli.main import _add_commands, cli

    _add_commands()
    return CliRunner().invoke(cli, args, input=input, catch_exceptions=False)


def assert_same_model(root_a: Path, name_a: str, root_b: Path, name_b: str) -> None:
    """Byte-identical weight and tokenizer files, and equal manifests apart from name, date and source."""
    import filecmp

    import msgspec

    from gdsllm_core.layout.store import ModelStore

    a, b = ModelStore(root_a).get(name_a), ModelStore(root_b).get(name_b)
    files = sorted(path.name for path in a.path.iterdir() if path.name != "manifest.json")
    assert files == sorted(path.name for path in b.path.iterdir() if path.name != "manifest.json")
    for file_name in files:
        assert filecmp.cmp(a.path / file_name, b.path / file_name, shallow=False), file_name
    neutral = {"name": "", "created": "", "source": {}}
    assert msgspec.structs.replace(a.manifest, **neutral) == msgspec.structs.replace(b.manifest, **neutral)
