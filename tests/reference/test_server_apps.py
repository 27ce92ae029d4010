"""What apps and agents need, through the real clients on a real loopback server (the bundled SmolLM2, and a copy
with Qwen2.5's tool-calling template): structured output parsed into its schema (checked with jsonschema), tool
calls and tool-message round trips (the prompt checked against transformers' own `apply_chat_template`), and
log-probabilities against the model's log-softmax computed from an independent forward pass."""

import json
import threading
import time

import jsonschema
import ollama
import openai
import pytest
import torch
import uvicorn
from pydantic import BaseModel
from tool_template import add_tools_model

from gdsllm_core import registry
from gdsllm_core.engine.forward import LoadOptions
from gdsllm_core.server import create_app, urls

pytestmark = pytest.mark.reference

CITY_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
               "required": ["city", "population"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
PORT = 18150  # a loopback port of this test module's own
QUESTION = "What is the weather in Paris?"


class City(BaseModel):
    city: str
    population: int


@pytest.fixture(scope="module")
def served(smollm2_store, smollm2):
    tools_model = add_tools_model(smollm2_store, smollm2.name)
    app = create_app(store=smollm2_store, read_token_from_env=False)
    port = PORT
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)
    yield {"base": f"http://127.0.0.1:{port}", "plain": smollm2.name, "tools": tools_model, "store": smollm2_store}
    server.should_exit = True
    thread.join(timeout=60)


@pytest.fixture
def oai(served):
    return openai.OpenAI(base_url=served["base"] + urls.OPENAI_PREFIX, api_key="unused", max_retries=0, timeout=300)


@pytest.fixture
def oll(served):
    return ollama.Client(host=served["base"], timeout=300)


def hf_prompt_ids(store, name: str, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """The prompt as transformers renders and tokenizes it with the model's own template (the reference)."""
    from transformers import PreTrainedTokenizerFast

    entry = store.get(name)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(entry.path / "tokenizer.json"))
    tokenizer.chat_template = entry.manifest.tokenizer.chat_template
    text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def few_shot_calls(with_ids: bool) -> list[dict]:
    """Earlier turns where the assistant answered with a call: SmolLM2 then opens a call by itself."""
    messages = []
    for index, city in enumerate(("Rome", "Oslo", "Lima")):
        call = {"function": {"name": "get_weather", "arguments": {"city": city}}}
        if with_ids:
            call = {"id": f"call_{index}", "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}
        messages += [{"role": "user", "content": f"What is the weather in {city}?"},
                     {"role": "assistant", "content": "", "tool_calls": [call]}]
    return messages


# ---- OpenAI ------------------------------------------------------------------------------------------------------

@pytest.mark.slow  # ~20 s on 2 CPU cores
def test_openai_json_schema_is_parsed_into_the_schema(oai, served):
    messages = [{"role": "user", "content": "Name the biggest city of France and its population."}]
    parsed = oai.chat.completions.parse(model=served["plain"], messages=messages, response_format=City,
                                        temperature=0, max_tokens=60)
    assert isinstance(parsed.choices[0].message.parsed, City)
    answer = oai.chat.completions.create(
        model=served["plain"], messages=messages, temperature=0.9, seed=3, max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": CITY_SCHEMA, "strict": True}})
    jsonschema.validate(json.loads(answer.choices[0].message.content), CITY_SCHEMA)
    answer = oai.chat.completions.create(model=served["plain"], messages=messages, temperature=0, max_tokens=60,
                                         response_format={"type": "json_object"}, n=2)
    assert all(isinstance(json.loads(choice.message.content), dict) for choice in answer.choices)


@pytest.mark.slow  # ~60 s on 2 CPU cores: several tool-call turns
def test_openai_tools_round_trip(oai, served):
    name, store = served["tools"], served["store"]
    messages = [{"role": "user", "content": QUESTION}]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        answer = oai.chat.completions.create(model=name, messages=messages, tools=[WEATHER], tool_choice=choice,
                                             parallel_tool_calls=False, temperature=0, max_tokens=60)
        assert answer.choices[0].finish_reason == "tool_calls"
        (call,) = answer.choices[0].message.tool_calls
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
        assert answer.usage.prompt_tokens == len(hf_prompt_ids(store, name, messages, [WEATHER]))
    stream = oai.chat.completions.create(model=name, messages=messages, tools=[WEATHER], tool_choice="required",
                                         parallel_tool_calls=False, temperature=0, max_tokens=60, stream=True)
    chunks = [chunk for chunk in stream if chunk.choices]
    deltas = [delta for chunk in chunks for delta in chunk.choices[0].delta.tool_calls or []]
    assert [(d.function.name, d.function.arguments) for d in deltas] == [(call.function.name,
                                                                           call.function.arguments)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    back = messages + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                       {"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"}]
    final = oai.chat.completions.create(model=name, messages=back, tools=[WEATHER], temperature=0, max_tokens=8)
    reference_messages = back[:1] + [{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "id": call.id, "function": {"name": "get_weather",
                                                         "arguments": json.loads(call.function.arguments)}}]},
        back[2]]
    assert final.usage.prompt_tokens == len(hf_prompt_ids(store, name, reference_messages, [WEATHER]))
    assert final.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.slow  # ~17 s on 2 CPU cores
def test_openai_auto_tool_choice_calls_after_examples(oai, served):
    messages = few_shot_calls(with_ids=True) + [{"role": "user", "content": QUESTION}]
    answer = oai.chat.completions.create(model=served["tools"], messages=messages, tools=[WEATHER], temperature=0,
                                         max_tokens=60)
    (call,) = answer.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] == "Paris"


@pytest.fixture(scope="module")
def forward(served):
    """An independent forward pass over the same model (the reference for log-probabilities)."""
    entry = served["store"].get(served["plain"])
    model = registry.get_forward_pass(entry.manifest.architecture)(entry, LoadOptions(device="cpu"))
    yield model
    model.close()


def reference_logprobs(forward, prompt: list[int], steps: int) -> list[torch.Tensor]:
    """Greedy continuation of `prompt`: the log-softmax of the model's logits at each step."""
    ids, result = list(prompt), []
    for _ in range(steps):
        cache = forward.new_cache(len(ids) + 1)
        logprobs = forward.prefill(torch.tensor(ids), cache).float().log_softmax(-1)
        result.append(logprobs)
        ids.append(int(logprobs.argmax()))
    return result


def assert_logprobs_match(entries, expected: list[torch.Tensor], top: int) -> None:
    assert len(entries) == len(expected)
    for entry, reference in zip(entries, expected, strict=True):
        values, ids = reference.topk(top)
        assert entry.logprob == pytest.approx(float(values[0]), abs=2e-3)
        assert len(entry.top_logprobs) == top
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(values.tolist(), abs=2e-3)


@pytest.mark.slow  # ~7 s on 2 CPU cores: an independent forward pass
def test_openai_logprobs_equal_the_models_log_softmax(oai, served, forward):
    name, steps, top = served["plain"], 5, 3
    messages = [{"role": "user", "content": "Name a fruit."}]
    expected = reference_logprobs(forward, hf_prompt_ids(served["store"], name, messages), steps)
    answer = oai.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=steps,
                                         logprobs=True, top_logprobs=top)
    assert_logprobs_match(answer.choices[0].logprobs.content, expected, top)
    stream = oai.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=steps,
                                         logprobs=True, top_logprobs=top, stream=True)
    streamed = [e for chunk in stream if chunk.choices and chunk.choices[0].logprobs
                for e in chunk.choices[0].logprobs.content]
    assert_logprobs_match(streamed, expected, top)

    prompt = [1, 504, 2329, 6355, 2068, 359]
    expected = reference_logprobs(forward, prompt, steps)
    completion = oai.completions.create(model=name, prompt=[prompt, prompt], temperature=0, max_tokens=steps,
                                        logprobs=top)
    assert len(completion.choices) == 2
    for choice in completion.choices:
        assert choice.logprobs.token_logprobs == pytest.approx([float(e.max()) for e in expected], abs=2e-3)
        assert [len(alternatives) for alternatives in choice.logprobs.top_logprobs] == [top] * steps


@pytest.mark.slow  # ~12 s on 2 CPU cores: an independent forward pass
def test_openai_logit_bias_bans_the_greedy_token(oai, served, forward):
    prompt = [1, 504, 2329, 6355, 2068, 359]
    (first,) = reference_logprobs(forward, prompt, 1)
    banned, runner_up = first.topk(2).indices.tolist()
    answer = oai.completions.create(model=served["plain"], prompt=prompt, temperature=0, max_tokens=1, logprobs=1,
                                    logit_bias={str(banned): -100})
    assert answer.choices[0].logprobs.token_logprobs[0] == pytest.approx(float(first[runner_up]), abs=2e-3)


# ---- ollama ------------------------------------------------------------------------------------------------------

def test_ollama_format_schema_and_json(oll, served):
    messages = [{"role": "user", "content": "Name the biggest city of France and its population."}]
    answer = oll.chat(model=served["plain"], messages=messages, format=CITY_SCHEMA,
                      options={"temperature": 0, "num_predict": 60})
    jsonschema.validate(json.loads(answer.message.content), CITY_SCHEMA)
    answer = oll.generate(model=served["plain"], prompt="Describe Paris.", format="json",
                          options={"temperature": 0, "num_predict": 80})
    assert isinstance(json.loads(answer.response), dict)


@pytest.mark.slow  # ~8 s on 2 CPU cores
def test_ollama_tools_and_tool_message_round_trip(oll, served):
    name, store = served["tools"], served["store"]
    messages = few_shot_calls(with_ids=False) + [{"role": "user", "content": QUESTION}]
    answer = oll.chat(model=name, messages=messages, tools=[WEATHER], options={"temperature": 0, "num_predict": 60})
    (call,) = answer.message.tool_calls
    assert call.function.name == "get_weather" and dict(call.function.arguments) == {"city": "Paris"}
    streamed = list(oll.chat(model=name, messages=messages, tools=[WEATHER], stream=True,
                             options={"temperature": 0, "num_predict": 60}))
    assert [c.function.name for part in streamed for c in part.message.tool_calls or []] == ["get_weather"]
    back = messages + [{"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
                       {"role": "tool", "content": "18 C, sunny", "tool_name": "get_weather"}]
    final = oll.chat(model=name, messages=back, tools=[WEATHER], options={"temperature": 0, "num_predict": 4})
    reference = back[:-2] + [{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18 C, sunny", "name": "get_weather"}]
    assert final.prompt_eval_count == len(hf_prompt_ids(store, name, reference, [WEATHER]))


def test_ollama_logprobs(oll, served, forward):
    prompt = "Name a fruit."
    messages = [{"role": "user", "content": prompt}]
    expected = reference_logprobs(forward, hf_prompt_ids(served["store"], served["plain"], messages), 4)
    answer = oll.chat(model=served["plain"], messages=messages, logprobs=True, top_logprobs=2,
                      options={"temperature": 0, "num_predict": 4, "repeat_penalty": 1.0})
    assert [lp.logprob for lp in answer.logprobs] == pytest.approx([float(e.max()) for e in expected], abs=2e-3)
    assert all(len(lp.top_logprobs) == 2 for lp in answer.logprobs)


# ---- LangChain ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["function_calling", "json_mode", "json_schema"])
def test_langchain_chat_openai_structured_output(served, method):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=served["tools"], base_url=served["base"] + urls.OPENAI_PREFIX, api_key="unused",
                     temperature=0, max_tokens=60, max_retries=0)
    schema = City if method != "json_mode" else {"title": "City", **CITY_SCHEMA}
    result = llm.with_structured_output(schema, method=method).invoke(
        "Name the biggest city of France and its population, as JSON.")
    if method == "json_mode":
        assert isinstance(result, dict)
    else:
        assert isinstance(result, City)


@pytest.mark.parametrize("method", ["function_calling", "json_mode", "json_schema"])
def test_langchain_chat_ollama_structured_output(served, method):
    from langchain_core.messages import AIMessage, HumanMessage
    from langchain_ollama import ChatOllama

    llm = ChatOllama(model=served["tools"], base_url=served["base"], temperature=0, num_predict=60)
    # json_mode asks for any JSON object (the schema is only in the prompt): it is parsed, not validated
    structured = llm.with_structured_output({"title": "City", **CITY_SCHEMA} if method == "json_mode" else City,
                                            method=method)
    if method == "function_calling":  # ollama has no tool_choice: earlier turns show the model to call
        shots = []
        for city, population in (("Rome", 2800000), ("Oslo", 700000)):
            shots += [HumanMessage(f"Tell me about {city}."),
                      AIMessage("", tool_calls=[{"name": "City", "args": {"city": city, "population": population},
                                                 "id": city}])]
        result = structured.invoke(shots + [HumanMessage("Tell me about Paris.")])
    else:
        result = structured.invoke("Name the biggest city of France and its population, as JSON.")
    assert isinstance(result, dict if method == "json_mode" else City)


@pytest.mark.parametrize("client", ["openai", "ollama"])
def test_langchain_bind_tools_and_tool_message_round_trip(served, client):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather of a city."""
        return f"18 C, sunny in {city}"

    if client == "openai":
        from langchain_openai import ChatOpenAI

        llm = ChatOpenAI(model=served["tools"], base_url=served["base"] + urls.OPENAI_PREFIX, api_key="unused",
                         temperature=0, max_tokens=40, max_retries=0).bind_tools(
            [get_weather], tool_choice="get_weather", strict=True)  # strict: no extra argument keys
        messages = [HumanMessage(QUESTION)]
    else:
        from langchain_core.messages import AIMessage
        from langchain_ollama import ChatOllama

        llm = ChatOllama(model=served["tools"], base_url=served["base"], temperature=0,
                         num_predict=40).bind_tools([get_weather])
        messages = []
        for city in ("Rome", "Oslo", "Lima"):
            messages += [HumanMessage(f"What is the weather in {city}?"),
                         AIMessage("", tool_calls=[{"name": "get_weather", "args": {"city": city}, "id": city}])]
        messages.append(HumanMessage(QUESTION))
    answer = llm.invoke(messages)
    (call,) = answer.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)
    result = get_weather.invoke(call["args"])
    final = llm.invoke(messages + [answer, ToolMessage(result, tool_call_id=call["id"])])
    assert final.response_metadata  # the tool turn was accepted and answered
