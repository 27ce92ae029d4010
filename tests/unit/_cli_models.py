"""Helpers for the CLI and pull tests: a tiny LLaMA checkpoint made with transformers, and running `gdsllm` as a
process with an isolated store, cache and runtime folder."""

import os
import subprocess
import sys
from pathlib import Path

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ("the cat sat on the mat. a dog ran in the park. birds fly over the sea at dawn. my name is ada. "
          "what is your name? hello there, how are you today? i am fine, thank you. ") * 20
GDSLLM = str(Path(sys.executable).with_name("gdsllm"))


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
               GDSLLM_IO="cpu", HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp / "hf-home"),
               COLUMNS="200", NO_COLOR="1", PYTHONUNBUFFERED="1")
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
