"""Issue 20 in the engine (on test_engine_tiny's tiny real model): no keep_alive value can wedge the worker, and an
exception in the worker's loop ends only what it touched."""

import threading

import pytest
from test_engine_tiny import GREEDY, PROMPTS, tiny  # noqa: F401 (tiny is a fixture)

from gdsllm_core.engine.engine import Engine
from gdsllm_core.engine.forward import LoadOptions
from gdsllm_core.errors import InvalidFieldError
from gdsllm_core.server.streams import unix_to_rfc3339
from gdsllm_core.types import ChatMessage, GenerateRequest


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


HOSTILE_TEMPLATES = {
    "loops": "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "output": "{% for i in range(99999) %}{% for j in range(99999) %}{{ j }}{% endfor %}{% endfor %}",
    "recursion": "{% macro f(n) %}{% if n > 0 %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(60) }}",
    "repeat": "{{ 'x' * 10 ** 9 }}",
}


def write_hostile_model(store, name: str, template: str) -> None:
    """tiny-a's weights and tokenizer under `name`, with `template` as its chat template."""
    import msgspec

    from gdsllm_core.layout import manifest as manifest_mod

    source = store.get("tiny-a")
    folder = store.root / name
    folder.mkdir()
    for path in source.path.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    manifest = msgspec.structs.replace(source.manifest, name=name, tokenizer=msgspec.structs.replace(
        source.manifest.tokenizer, chat_template=template))
    (folder / manifest_mod.MANIFEST_NAME).write_bytes(manifest_mod.encode(manifest))


@pytest.mark.parametrize("kind", sorted(HOSTILE_TEMPLATES))
def test_a_hostile_chat_template_is_an_error_naming_the_model_not_a_hang(tiny, kind):  # noqa: F811
    from gdsllm_core.engine.chat_template import TemplateLimitError

    name = f"hostile-{kind}"
    if not tiny["store"].exists(name):
        write_hostile_model(tiny["store"], name, HOSTILE_TEMPLATES[kind])
    engine = Engine(tiny["store"], LoadOptions(device="cpu"), keep_alive=None)
    outcome: list = []

    def chat() -> None:
        try:
            engine.submit(GenerateRequest(model=name, messages=[ChatMessage("user", "hello")], max_tokens=2))
        except Exception as exc:
            outcome.append(exc)

    worker = threading.Thread(target=chat, daemon=True)
    worker.start()
    worker.join(15)
    assert not worker.is_alive(), "rendering the template hung"
    assert len(outcome) == 1 and isinstance(outcome[0], TemplateLimitError) and name in str(outcome[0])
    text, last = engine.submit(GenerateRequest(model="tiny-a", messages=[ChatMessage("user", "hi")],
                                               max_tokens=2, sampling=GREEDY)).collect()
    assert last.completion_tokens == 2  # the engine goes on serving
    assert closes_within(engine, 20)
