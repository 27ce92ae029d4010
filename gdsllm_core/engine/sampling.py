"""Sampling: logit bias, repeat penalty, presence/frequency penalties, grammar mask, then temperature, top-k, top-p,
min-p (in transformers' order), seeded per sequence; log-probabilities of the model's own distribution on request.

Parameters follow ollama: temperature 0 is greedy (the penalties, bias and grammar still apply, as in llama.cpp);
top_k 0, top_p 1, min_p 0, repeat_penalty 1 and repeat_last_n 0 turn a step off; repeat_last_n -1 means the whole
history. A batch is processed with one set of tensor operations whatever its size, each row with its own values.
Each sequence draws its random numbers from its own CPU `torch.Generator` (one uniform per token, inverted through
the row's cumulative distribution), so a seed gives the same draws alone or in a batch, on any device."""

import secrets
from dataclasses import dataclass

import torch

from gdsllm_core.engine.grammar import apply_bitmask
from gdsllm_core.limits import check_sampling
from gdsllm_core.types import SamplingParams


def _per_row(value, logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A scalar, or one value per row ([B] -> [B, 1]), as a tensor that broadcasts against logits [..., V]."""
    tensor = torch.as_tensor(value, dtype=dtype, device=logits.device)
    return tensor.unsqueeze(-1) if tensor.dim() else tensor


def _all_off(value, off) -> bool:
    """True when `value` (a number, or a list with one per row) turns a step off for every row."""
    if isinstance(value, torch.Tensor):
        return False
    return all(off(v) for v in value) if isinstance(value, list | tuple) else off(value)


def apply_repeat_penalty(logits: torch.Tensor, token_ids: torch.Tensor, penalty) -> torch.Tensor:
    """Divide positive (multiply negative) logits of the tokens in `token_ids` ([..., W]; repeats count once, so a
    row may be padded with its own ids) by `penalty`."""
    if token_ids.numel() == 0:
        return logits
    penalty = _per_row(penalty, logits, logits.dtype)
    picked = logits.gather(-1, token_ids)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    largest = torch.finfo(logits.dtype).max  # an extreme penalty saturates instead of overflowing to inf
    return logits.scatter(-1, token_ids, picked.clamp(-largest, largest))


def apply_logit_bias(logits: torch.Tensor, biases: list[dict[int, float]]) -> torch.Tensor:
    """Add each row's {token id: bias} to its logits."""
    entries = [(row, token, bias) for row, row_biases in enumerate(biases) for token, bias in row_biases.items()]
    if not entries:
        return logits
    rows, tokens, values = zip(*entries, strict=True)
    added = torch.zeros_like(logits)
    added[torch.tensor(rows, device=logits.device), torch.tensor(tokens, device=logits.device)] = \
        torch.tensor(values, dtype=logits.dtype, device=logits.device)
    return logits + added


def apply_presence_frequency(logits: torch.Tensor, outputs: list[list[int]], presence: list[float],
                             frequency: list[float]) -> torch.Tensor:
    """OpenAI's penalties over each row's generated tokens: minus `frequency` per occurrence, minus `presence` once."""
    if not any(outputs) or all(p == 0 and f == 0 for p, f in zip(presence, frequency, strict=True)):
        return logits
    width = max(len(ids) for ids in outputs)
    ids = torch.tensor([row + [0] * (width - len(row)) for row in outputs], device=logits.device)
    ones = torch.tensor([[1.0] * len(row) + [0.0] * (width - len(row)) for row in outputs], dtype=logits.dtype,
                        device=logits.device)
    counts = torch.zeros_like(logits).scatter_add_(-1, ids, ones)
    return (logits - _per_row(frequency, logits, logits.dtype) * counts
            - _per_row(presence, logits, logits.dtype) * (counts > 0).to(logits.dtype))


def apply_temperature(logits: torch.Tensor, temperature) -> torch.Tensor:
    """logits / temperature; a row that would overflow is divided after subtracting its maximum (the same
    distribution), so a tiny temperature stays greedy-like instead of turning into inf - inf = NaN."""
    if _all_off(temperature, lambda t: t == 1.0):
        return logits
    temperature = _per_row(temperature, logits, logits.dtype)
    scaled = logits / temperature
    overflowed = (torch.isinf(scaled) & ~torch.isinf(logits)).any(dim=-1, keepdim=True)
    shifted = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    return torch.where(overflowed, shifted, scaled)


def apply_top_k(logits: torch.Tensor, top_k) -> torch.Tensor:
    """Keep the `top_k` highest logits of each row (and any tied with the k-th); 0 keeps all."""
    vocab = logits.shape[-1]
    if _all_off(top_k, lambda k: k <= 0 or k >= vocab):
        return logits
    k = _per_row(top_k, logits, torch.long).clamp(0, vocab)
    ranked = torch.sort(logits, descending=True, dim=-1).values
    kth = ranked.gather(-1, (k - 1).clamp(min=0).expand(*logits.shape[:-1], 1))
    kth = torch.where(k > 0, kth, float("-inf"))
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities sum to at least `top_p`; 1 keeps all."""
    if _all_off(top_p, lambda p: p >= 1.0):
        return logits
    # 1 - top_p in double, then rounded to the logits' type, as transformers compares
    threshold = (1 - _per_row(top_p, logits, torch.float64)).to(logits.dtype)
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= threshold
    remove_sorted[..., -1:] = False  # always keep the most likely token
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p) -> torch.Tensor:
    """Drop tokens less likely than `min_p` times the most likely token's probability; 0 keeps all."""
    if _all_off(min_p, lambda p: p <= 0.0):
        return logits
    probs = logits.softmax(dim=-1)
    threshold = _per_row(min_p, logits, logits.dtype) * probs.amax(dim=-1, keepdim=True)
    remove = probs < threshold
    remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(remove, float("-inf"))


class Sampler:
    """One sequence's sampling state: its parameters, its own random generator, where its generated tokens start in
    its history, how many top log-probabilities it wants (None: none) and its grammar matcher (None: free)."""

    def __init__(self, params: SamplingParams, prompt_tokens: int = 0, logprobs: int | None = None,
                 matcher=None):
        check_sampling(params)
        self.params = params
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.greedy = params.temperature == 0
        self.generator = torch.Generator().manual_seed(self.seed)
        self.prompt_tokens = prompt_tokens
        self.logprobs = logprobs
        self.matcher = matcher

    def penalty_window(self, history: list[int]) -> list[int]:
        """The tokens the repeat penalty looks at."""
        last_n = self.params.repeat_last_n
        if self.params.repeat_penalty == 1.0 or last_n == 0:
            return []
        return history if last_n == -1 else history[-last_n:]

    def uniform(self) -> float:
        """The next random number of this sequence, in (0, 1]."""
        return 1.0 - float(torch.rand((), generator=self.generator))


_NEUTRAL = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)  # what greedy rows go through


def _penalize(logits: torch.Tensor, samplers: list[Sampler], histories: list[list[int]]) -> torch.Tensor:
    windows = [sampler.penalty_window(history) for sampler, history in zip(samplers, histories, strict=True)]
    width = max(len(window) for window in windows)
    if width == 0:
        return logits
    # pad each row with its own first id (repeats are harmless); rows without a window get penalty 1 on token 0
    ids = [window + [window[0]] * (width - len(window)) if window else [0] * width for window in windows]
    penalties = [sampler.params.repeat_penalty if window else 1.0
                 for sampler, window in zip(samplers, windows, strict=True)]
    return apply_repeat_penalty(logits, torch.tensor(ids, device=logits.device), penalties)


def process_batch(logits: torch.Tensor, samplers: list[Sampler], histories: list[list[int]],
                  bitmask: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] after every transform but the final softmax, each row with its sampler's values (greedy rows
    skip temperature and the truncations). `bitmask` is the batch's grammar mask (grammar.BatchMasks)."""
    logits = apply_logit_bias(logits.float(), [sampler.params.logit_bias for sampler in samplers])
    logits = _penalize(logits, samplers, histories)
    logits = apply_presence_frequency(
        logits, [history[sampler.prompt_tokens:] for sampler, history in zip(samplers, histories, strict=True)],
        [sampler.params.presence_penalty for sampler in samplers],
        [sampler.params.frequency_penalty for sampler in samplers])
    if bitmask is not None:
        logits = apply_bitmask(logits, bitmask)
    if all(sampler.greedy for sampler in samplers):
        return logits
    params = [_NEUTRAL if sampler.greedy else sampler.params for sampler in samplers]
    logits = apply_temperature(logits, [p.temperature for p in params])
    logits = apply_top_k(logits, [p.top_k for p in params])
    logits = apply_top_p(logits, [p.top_p for p in params])
    return apply_min_p(logits, [p.min_p for p in params])


@dataclass
class Sampled:
    """One row's result: the token, and with logprobs requested its log-probability and the top (id, logprob)s."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


def _draw(processed: torch.Tensor, samplers: list[Sampler]) -> torch.Tensor:
    if all(sampler.greedy for sampler in samplers):
        return processed.argmax(dim=-1)
    cdf = processed.softmax(dim=-1).cumsum(dim=-1)
    uniforms = torch.tensor([sampler.uniform() if not sampler.greedy else 1.0 for sampler in samplers],
                            dtype=cdf.dtype, device=cdf.device)
    drawn = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1)).squeeze(-1).clamp(max=cdf.shape[-1] - 1)
    greedy = torch.tensor([sampler.greedy for sampler in samplers], device=cdf.device)
    return torch.where(greedy, processed.argmax(dim=-1), drawn)


def sample_batch(logits: torch.Tensor, samplers: list[Sampler], histories: list[list[int]],
                 bitmask: torch.Tensor | None = None) -> list[Sampled]:
    """The next token of each row of `logits` [B, V], each with its own sampler, history and grammar row; the
    tokens and any log-probabilities (of the raw logits) reach the host in one sync."""
    tokens = _draw(process_batch(logits, samplers, histories, bitmask), samplers)
    wanted = [sampler.logprobs for sampler in samplers]
    if all(count is None for count in wanted):
        return [Sampled(token) for token in tokens.tolist()]
    top_count = max(count or 0 for count in wanted)
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = logprobs.gather(-1, tokens.unsqueeze(-1))
    top = logprobs.topk(top_count, dim=-1) if top_count else None
    parts = [tokens.unsqueeze(-1).to(torch.float64), chosen.to(torch.float64)]
    if top is not None:
        parts += [top.indices.to(torch.float64), top.values.to(torch.float64)]
    rows = torch.cat(parts, dim=-1).tolist()
    results = []
    for row, count in zip(rows, wanted, strict=True):
        token = int(row[0])
        if count is None:
            results.append(Sampled(token))
            continue
        ids, values = row[2:2 + top_count], row[2 + top_count:]
        results.append(Sampled(token, row[1], [(int(ids[i]), values[i]) for i in range(count)]))
    return results
