"""Stop strings across chunk boundaries, against a brute-force reference on random chunkings."""

import random

import pytest

from gdsllm_core.engine.stops import StopMatcher


def longest_held(text: str, stops: list[str]) -> int:
    """Brute force: the longest suffix of `text` that is a proper prefix of a stop string."""
    return max((n for stop in stops for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)


def run(chunks: list[str], stops: list[str]) -> tuple[str, bool, list[str]]:
    matcher = StopMatcher(stops)
    emitted, seen = [], ""
    for chunk in chunks:
        seen += chunk
        text, stopped = matcher.feed(chunk)
        emitted.append(text)
        if stopped:
            return "".join(emitted), True, emitted
        assert "".join(emitted) + matcher.held == seen  # nothing lost
        assert len(matcher.held) == longest_held(seen, stops)  # only what could begin a stop string is held
    emitted.append(matcher.flush())
    return "".join(emitted), False, emitted


@pytest.mark.parametrize("seed", range(200))
def test_random_chunkings_match_brute_force(seed):
    rng = random.Random(seed)
    alphabet = "ab \n🎉"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40)))
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 5))) for _ in range(rng.randrange(1, 4))]
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randrange(0, 10)))) if len(text) > 1 else []
    chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)], strict=True)]
    emitted, stopped, _ = run(chunks, stops)
    received = ""
    for chunk in chunks:  # reference: after each chunk, look for every stop string in all text so far
        received += chunk
        found = [received.find(stop) for stop in stops if stop in received]
        if found:
            assert stopped and emitted == received[:min(found)]
            break
    else:
        assert not stopped and emitted == text
    assert not any(stop in emitted for stop in stops)


def test_text_before_the_stop_in_the_same_chunk_is_kept():
    emitted, stopped, pieces = run(["Hello, Wor", "ld! Bye"], ["World", "Bye"])
    assert stopped and emitted == "Hello, " and pieces == ["Hello, ", ""]


def test_no_stops_passes_everything_through():
    assert run(["a", "b"], []) == ("ab", False, ["a", "b", ""])
