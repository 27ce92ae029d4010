"""Sampling transforms against transformers' logits processors and warpers (the independent reference)."""

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from gdsllm_core.engine import sampling
from gdsllm_core.errors import BadRequestError
from gdsllm_core.types import SamplingParams

VOCAB = 300


def sample_tokens(*args) -> list[int]:
    """The tokens `sampling.sample_batch` draws."""
    return [sampled.token for sampled in sampling.sample_batch(*args)]


@pytest.fixture
def logits():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(4, VOCAB, generator=generator) * 3


def _same(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(ours), torch.isinf(reference))
    finite = ~torch.isinf(reference)
    torch.testing.assert_close(ours[finite], reference[finite], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("top_k", [1, 5, 40, VOCAB - 1])
def test_top_k_matches_transformers(logits, top_k):
    _same(sampling.apply_top_k(logits, top_k), TopKLogitsWarper(top_k)(None, logits.clone()))


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_matches_transformers(logits, top_p):
    _same(sampling.apply_top_p(logits, top_p), TopPLogitsWarper(top_p)(None, logits.clone()))


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5, 1.0])
def test_min_p_matches_transformers(logits, min_p):
    _same(sampling.apply_min_p(logits, min_p), MinPLogitsWarper(min_p)(None, logits.clone()))


@pytest.mark.parametrize("temperature", [0.3, 1.0, 1.7])
def test_temperature_matches_transformers(logits, temperature):
    _same(sampling.apply_temperature(logits, temperature), TemperatureLogitsWarper(temperature)(None, logits.clone()))


@pytest.mark.parametrize("penalty", [0.8, 1.1, 1.5])
def test_repeat_penalty_matches_transformers(logits, penalty):
    history = torch.tensor([[3, 7, 7, 250, 3, 12]])  # repeats count once, as in transformers
    reference = RepetitionPenaltyLogitsProcessor(penalty)(history, logits[:1].clone())
    _same(sampling.apply_repeat_penalty(logits[:1], history, penalty), reference)


def test_pipeline_matches_transformers_chain(logits):
    """The whole chain (penalty, temperature, top-k, top-p, min-p) in transformers' order."""
    params = SamplingParams(temperature=0.7, top_k=50, top_p=0.8, min_p=0.05, repeat_penalty=1.3, repeat_last_n=4)
    history = [5, 9, 9, 11, 13, 17]
    window = torch.tensor([history[-4:]])
    reference = logits[:1].clone()
    for step in (RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.7), TopKLogitsWarper(50),
                 TopPLogitsWarper(0.8), MinPLogitsWarper(0.05)):
        reference = step(window, reference)
    _same(sampling.process_batch(logits[:1], [sampling.Sampler(params)], [history])[0], reference[0])


def test_each_row_of_a_batch_gets_its_own_values(logits):
    """One batched pass with different values per row equals transformers applied row by row."""
    rows = [SamplingParams(temperature=0.5, top_k=3, top_p=1.0, min_p=0.0, repeat_penalty=1.0),
            SamplingParams(temperature=1.3, top_k=0, top_p=0.6, min_p=0.0, repeat_penalty=2.0, repeat_last_n=2),
            SamplingParams(temperature=0.9, top_k=100, top_p=0.95, min_p=0.2, repeat_penalty=1.1),
            SamplingParams(temperature=0, repeat_penalty=1.5)]
    histories = [[1, 2], [7, 8, 9], [4], [5, 5, 6]]
    ours = sampling.process_batch(logits, [sampling.Sampler(p) for p in rows], histories)
    for row, (params, history) in enumerate(zip(rows, histories, strict=True)):
        window = history[-params.repeat_last_n:] if params.repeat_last_n > 0 else history
        reference = RepetitionPenaltyLogitsProcessor(params.repeat_penalty)(torch.tensor([window]),
                                                                             logits[row:row + 1].clone())
        if params.temperature > 0:
            reference = TemperatureLogitsWarper(params.temperature)(None, reference)
            if params.top_k:
                reference = TopKLogitsWarper(params.top_k)(None, reference)
            if params.top_p < 1:
                reference = TopPLogitsWarper(params.top_p)(None, reference)
            if params.min_p > 0:
                reference = MinPLogitsWarper(params.min_p)(None, reference)
        _same(ours[row], reference[0])


def test_greedy_is_argmax_after_penalty(logits):
    history = [int(logits[0].argmax())]
    params = SamplingParams(temperature=0, repeat_penalty=100.0)
    penalized = RepetitionPenaltyLogitsProcessor(100.0)(torch.tensor([history]), logits[:1].clone())
    assert sample_tokens(logits[:1], [sampling.Sampler(params)], [history]) == [int(penalized.argmax())]
    plain = sampling.Sampler(SamplingParams(temperature=0, repeat_penalty=1.0))
    assert sample_tokens(logits[:1], [plain], [history]) == history


def test_same_seed_same_tokens_and_per_row_independence(logits):
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=1234, repeat_penalty=1.0)

    def draw(rows, n=20):
        samplers = [sampling.Sampler(params) for _ in rows]
        return [sample_tokens(logits[rows], samplers, [[] for _ in rows]) for _ in range(n)]

    alone = draw([2])
    batched = draw([0, 2, 3])
    assert [step[0] for step in alone] == [step[1] for step in batched]  # row 2 unaffected by its neighbours
    assert draw([2]) == alone
    other_seed = sampling.Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=99, repeat_penalty=1.0))
    assert [sample_tokens(logits[[2]], [other_seed], [[]])[0] for _ in range(20)] != [s[0] for s in alone]


def test_sampled_distribution_follows_filtered_probabilities():
    """Frequencies of sampled tokens match softmax of the filtered logits (chi-square-like bound)."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    params = SamplingParams(temperature=0.9, top_k=4, top_p=1.0, min_p=0.0, repeat_penalty=1.0, seed=7)
    sampler = sampling.Sampler(params)
    expected = TopKLogitsWarper(4)(None, TemperatureLogitsWarper(0.9)(None, logits[None].clone()))[0].softmax(-1)
    n = 20000  # one row per draw, all from the same sequence's generator
    drawn = sample_tokens(logits.expand(n, -1), [sampler] * n, [[]] * n)
    counts = torch.bincount(torch.tensor(drawn), minlength=6)
    assert counts[4:].sum() == 0
    assert torch.allclose(counts.float() / n, expected, atol=0.015)


@pytest.mark.parametrize("field,value", [("temperature", -0.1), ("temperature", 1e-45), ("temperature", float("inf")),
                                         ("temperature", float("nan")), ("top_k", -1), ("top_p", 1.5),
                                         ("min_p", 1.2), ("repeat_penalty", 0.0), ("repeat_penalty", 1e-45),
                                         ("repeat_penalty", float("inf")), ("repeat_last_n", -2), ("seed", 2 ** 64),
                                         ("seed", -(2 ** 63) - 1)])
def test_bad_values_name_the_field_and_range(field, value):
    with pytest.raises(BadRequestError, match=f"^{field} .* must be"):
        sampling.Sampler(SamplingParams(**{field: value}))


def test_a_tiny_temperature_is_greedy_not_nan(logits):
    """Whatever reaches the sampler: logits / 1e-45 overflows; the distribution must still be the argmax's."""
    probs = sampling.apply_temperature(logits, 1e-45).softmax(dim=-1)
    assert torch.isfinite(probs).all()
    assert torch.equal(probs.argmax(dim=-1), logits.argmax(dim=-1)) and torch.all(probs.amax(dim=-1) == 1)
    mixed = sampling.apply_temperature(logits, [1e-45, 0.7, 1e-45, 1.3])  # rows that do not overflow are unchanged
    torch.testing.assert_close(mixed[1], TemperatureLogitsWarper(0.7)(None, logits[1:2].clone())[0])


def test_a_tiny_repeat_penalty_saturates_instead_of_overflowing(logits):
    history = torch.tensor([[3, 7, 250]])
    penalized = sampling.apply_repeat_penalty(logits[:1], history, 1e-45)
    reference = logits[:1].double()  # in float64 logit / 1e-45 is finite: the independent answer
    picked = reference.gather(-1, history)
    reference = reference.scatter(-1, history, torch.where(picked < 0, picked * 1e-45, picked / 1e-45))
    assert torch.isfinite(penalized.softmax(dim=-1)).all()
    assert penalized.argmax() == reference.argmax()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_sampling_is_seeded_per_sequence_and_matches_the_cpu(logits):
    on_gpu = logits.cuda()
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, min_p=0.02, repeat_penalty=1.2, seed=5)
    history = [1, 2, 3, 250]

    def draw(rows):
        samplers = [sampling.Sampler(params) for _ in rows]
        return [sample_tokens(on_gpu[rows], samplers, [history] * len(rows)) for _ in range(10)]

    alone = draw([1])
    assert [step[1] for step in draw([0, 1, 3])] == [step[0] for step in alone]
    assert draw([1]) == alone
    assert draw([1]) == [sample_tokens(logits[[1]], [s], [history]) for s in [sampling.Sampler(params)] * 10]
    _same(sampling.process_batch(on_gpu[:1], [sampling.Sampler(params)], [history]).cpu(),
          sampling.process_batch(logits[:1], [sampling.Sampler(params)], [history]))
    greedy = SamplingParams(temperature=0, repeat_penalty=1.0)
    assert sample_tokens(on_gpu, [sampling.Sampler(greedy)] * 4, [[]] * 4) == logits.argmax(-1).tolist()
