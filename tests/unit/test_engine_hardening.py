"""Issue 20 in the engine (on test_engine_tiny's tiny real model): no keep_alive value can wedge the worker, and an
exception in the worker's loop ends only what it touched."""

import threading

import pytest
from test_engine_tiny import GREEDY, PROMPTS, tiny  # noqa: F401 (tiny is a fixture)

from gdsllm_core.engine.engine import Engine
from gdsllm_core.engine.forward import LoadOptions
from gdsllm_core.errors import InvalidFieldError
from gdsllm_core.server.streams import unix_to_rfc3339
from gdsllm_core.types import GenerateRequest


def closes_within(engine: Engine, seconds: float) -> bool:
    closer = threading.Thread(target=engine.close, daemon=True)
    closer.start()
    closer.join(seconds)
    return not closer.is_alive()


@pytest.mark.parametrize("keep_alive", [1e10, float("inf"), 1e300])
def test_a_huge_keep_alive_cannot_wedge_the_worker(tiny, keep_alive):  # noqa: F811
    engine = Engine(tiny["store"], LoadOptions(device="cpu"), keep_alive=300)
    request = GenerateRequest(model="tiny-a", prompt=PROMPTS[0], raw=True, max_tokens=3, sampling=GREEDY)
    first, _ = engine.submit(request).collect()
    with pytest.raises(InvalidFieldError, match="keep_alive .* must be"):
        engine.set_keep_alive(keep_alive)
    engine.keep_alive = keep_alive  # whatever reaches the worker: it must keep serving and stop when asked
    engine.submit(GenerateRequest(model="tiny-a", prompt="x", raw=True, max_tokens=1)).collect()  # worker idles
    assert engine.submit(request).collect()[0] == first
    running = engine.running()
    assert running[0].name == "tiny-a"
    unix_to_rfc3339(running[0].expires_at)  # /api/ps: a time or None, never "year is out of range"
    assert closes_within(engine, 20), "the engine did not stop"
