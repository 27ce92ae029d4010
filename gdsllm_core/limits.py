"""The accepted range of every numeric generation option, checked in one place for the CLI, the engine and both
server dialects. A value outside its range is an InvalidFieldError (400) that names the field, as the request
spelled it, and the range."""

import math
from collections.abc import Mapping

from gdsllm_core.errors import InvalidFieldError
from gdsllm_core.types import GenerateRequest, SamplingParams

SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 64 - 1  # what torch.Generator.manual_seed takes (int64 or uint64)
TEMPERATURE_MIN = 1e-3  # below this (and above 0) logits / temperature overflows; llama.cpp clamps likewise
TEMPERATURE_MAX = 100.0  # beyond this every token is equally likely anyway
PENALTY_MIN, PENALTY_MAX = 1e-3, 100.0  # repeat_penalty divides or multiplies logits: keep them finite
COUNT_MAX = 2 ** 31 - 1  # token counts and windows (top_k, num_ctx, num_predict, repeat_last_n)
KEEP_ALIVE_MAX_S = 2 ** 31 - 1  # about 68 years: beyond this a deadline overflows clocks and timeouts
NUM_CTX_MIN = 2  # a prompt token and one new token
OPENAI_PENALTY_MAX = 2.0  # presence/frequency penalties: OpenAI's range is [-2, 2]
LOGIT_BIAS_MAX = 100.0  # logit_bias values: OpenAI's range is [-100, 100]

# (low, high, how the range reads in the error) of the fields whose rule is one closed interval
INTERVALS = {
    "top_k": (0, COUNT_MAX, f"an integer from 0 (off) to {COUNT_MAX}"),
    "top_p": (0.0, 1.0, "a number from 0 to 1 (1 turns it off)"),
    "min_p": (0.0, 1.0, "a number from 0 (off) to 1"),
    "repeat_penalty": (PENALTY_MIN, PENALTY_MAX, f"a number from {PENALTY_MIN} to {PENALTY_MAX:g} (1 turns it off)"),
    "repeat_last_n": (-1, COUNT_MAX, f"an integer from -1 (the whole history) to {COUNT_MAX}"),
    "presence_penalty": (-OPENAI_PENALTY_MAX, OPENAI_PENALTY_MAX, f"a number from {-OPENAI_PENALTY_MAX:g} to "
                                                                  f"{OPENAI_PENALTY_MAX:g} (0 turns it off)"),
    "frequency_penalty": (-OPENAI_PENALTY_MAX, OPENAI_PENALTY_MAX, f"a number from {-OPENAI_PENALTY_MAX:g} to "
                                                                   f"{OPENAI_PENALTY_MAX:g} (0 turns it off)"),
    "seed": (SEED_MIN, SEED_MAX, f"an integer from {SEED_MIN} to {SEED_MAX} (64 bits)"),
    "max_tokens": (0, COUNT_MAX, f"an integer from 0 to {COUNT_MAX}"),
    "num_ctx": (NUM_CTX_MIN, COUNT_MAX, f"an integer from {NUM_CTX_MIN} to {COUNT_MAX}"),
}
TEMPERATURE_RANGE = f"0 (greedy) or a number from {TEMPERATURE_MIN} to {TEMPERATURE_MAX:g}"
KEEP_ALIVE_RANGE = f"a negative value (forever), 0 (unload now) or up to {KEEP_ALIVE_MAX_S} seconds"


def _refuse(field: str, value, expected: str) -> InvalidFieldError:
    return InvalidFieldError(field, f"{field} {value!r} is out of range: it must be {expected}",
                             f"send {field} within that range")


def _check_interval(field: str, value, names: Mapping[str, str]) -> None:
    low, high, expected = INTERVALS[field]
    if value is not None and not (isinstance(value, int | float) and low <= value <= high):
        raise _refuse(names.get(field, field), value, expected)


def check_temperature(value: float, name: str = "temperature") -> None:
    if not (value == 0 or TEMPERATURE_MIN <= value <= TEMPERATURE_MAX):
        raise _refuse(name, value, TEMPERATURE_RANGE)


def check_sampling(params: SamplingParams, names: Mapping[str, str] = {}) -> None:
    """Every sampling option within its range; `names` maps a field to the request's name for it."""
    check_temperature(params.temperature, names.get("temperature", "temperature"))
    for field in ("top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "presence_penalty",
                  "frequency_penalty", "seed"):
        _check_interval(field, getattr(params, field), names)
    for token, bias in params.logit_bias.items():
        field = names.get("logit_bias", "logit_bias")
        if not (isinstance(token, int) and token >= 0):
            raise _refuse(field, token, "keyed by token ids (integers from 0)")
        if not (isinstance(bias, int | float) and -LOGIT_BIAS_MAX <= bias <= LOGIT_BIAS_MAX):
            raise _refuse(f"{field}[{token}]", bias, f"a number from {-LOGIT_BIAS_MAX:g} to {LOGIT_BIAS_MAX:g}")


def check_generate(request: GenerateRequest, names: Mapping[str, str] = {}) -> None:
    """The sampling options, max_tokens and num_ctx of a request within their ranges."""
    check_sampling(request.sampling, names)
    _check_interval("max_tokens", request.max_tokens, names)
    _check_interval("num_ctx", request.num_ctx, names)


def check_keep_alive(seconds: float, name: str = "keep_alive") -> float:
    """`seconds` if it is a keep_alive gdsllm can keep (negative: forever), else the 400."""
    if math.isnan(seconds) or seconds > KEEP_ALIVE_MAX_S:
        raise _refuse(name, seconds, KEEP_ALIVE_RANGE)
    return seconds
