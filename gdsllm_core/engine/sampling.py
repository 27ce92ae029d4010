"""Sampling: repeat penalty, temperature, top-k, top-p, min-p (in transformers' order), seeded per sequence.

Parameters follow ollama: temperature 0 is greedy (the repeat penalty still applies, as in llama.cpp);
top_k 0, top_p 1, min_p 0, repeat_penalty 1 and repeat_last_n 0 turn a step off; repeat_last_n -1 means the whole
history. Each sequence has its own `torch.Generator`, so a seed gives the same text alone or in a batch."""

import secrets

import torch

from gdsllm_core.errors import BadRequestError
from gdsllm_core.types import SamplingParams


def apply_repeat_penalty(logits: torch.Tensor, token_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive (multiply negative) logits of tokens in `token_ids` by `penalty`, once per distinct token."""
    if penalty == 1.0 or token_ids.numel() == 0:
        return logits
    picked = logits.gather(-1, token_ids)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits.scatter(-1, token_ids, picked)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits / temperature


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the `top_k` highest logits (and any tied with the k-th)."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities sum to at least `top_p`."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False  # always keep the most likely token
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens less likely than `min_p` times the most likely token's probability."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    remove = probs < threshold
    remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(remove, float("-inf"))


def check_params(params: SamplingParams) -> None:
    """BadRequestError naming the field when a value is out of range."""
    problems = []
    if not params.temperature >= 0:
        problems.append(f"temperature {params.temperature} (must be >= 0; 0 is greedy)")
    if params.top_k < 0:
        problems.append(f"top_k {params.top_k} (must be >= 0; 0 turns it off)")
    if not 0 < params.top_p <= 1:
        problems.append(f"top_p {params.top_p} (must be in (0, 1])")
    if not 0 <= params.min_p <= 1:
        problems.append(f"min_p {params.min_p} (must be in [0, 1])")
    if not params.repeat_penalty > 0:
        problems.append(f"repeat_penalty {params.repeat_penalty} (must be > 0; 1 turns it off)")
    if params.repeat_last_n < -1:
        problems.append(f"repeat_last_n {params.repeat_last_n} (must be >= -1)")
    if problems:
        raise BadRequestError("invalid sampling options: " + "; ".join(problems), "fix the values in the request")


class Sampler:
    """One sequence's sampler: its parameters and its own random generator."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu"):
        check_params(params)
        self.params = params
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.greedy = params.temperature == 0
        self.generator = None
        if not self.greedy:
            self.generator = torch.Generator(device=torch.device(device))
            self.generator.manual_seed(self.seed)

    def penalty_window(self, history: list[int]) -> list[int]:
        """The tokens the repeat penalty looks at."""
        last_n = self.params.repeat_last_n
        if self.params.repeat_penalty == 1.0 or last_n == 0:
            return []
        return history if last_n == -1 else history[-last_n:]

    def process(self, logits: torch.Tensor, history: list[int]) -> torch.Tensor:
        """logits [V] (fp32) after every transform but the final softmax."""
        params = self.params
        window = self.penalty_window(history)
        if window:
            ids = torch.tensor(window, dtype=torch.long, device=logits.device)
            logits = apply_repeat_penalty(logits, ids, params.repeat_penalty)
        if self.greedy:
            return logits
        logits = apply_temperature(logits, params.temperature)
        logits = apply_top_k(logits, params.top_k)
        logits = apply_top_p(logits, params.top_p)
        return apply_min_p(logits, params.min_p)

    def sample(self, logits: torch.Tensor, history: list[int]) -> torch.Tensor:
        """The next token of this sequence as a 0-d int64 tensor on the logits' device (no host sync)."""
        logits = self.process(logits.float(), history)
        if self.greedy:
            return logits.argmax(dim=-1)
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator)[0]


def sample_batch(logits: torch.Tensor, samplers: list[Sampler], histories: list[list[int]]) -> list[int]:
    """Next token of each row of `logits` [B, V], each with its own sampler and history; one host sync."""
    picked = [sampler.sample(row, history) for row, sampler, history in zip(logits, samplers, histories, strict=True)]
    return torch.stack(picked).tolist()
