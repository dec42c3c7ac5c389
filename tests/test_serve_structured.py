"""Grammar-constrained decoding: JSON schemas, tool calls, and what constraints must not change."""
from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from openai import OpenAI

from internray.serve.config import EngineConfig
from internray.serve.engine.guided import JSON_STYLE
from internray.serve.engine.llm_engine import LLM
from internray.serve.engine.sampling_params import Guide, InvalidRequest, SamplingParams

PERSON = {
    "type": "object", "additionalProperties": False, "required": ["name", "age", "color", "address"],
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number"},
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
        "address": {"type": "object", "additionalProperties": False, "required": ["city"],
                    "properties": {"city": {"type": "string", "maxLength": 10}, "zip": {"type": "integer"}}},
    },
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "required": ["city", "unit"], "additionalProperties": False,
                   "properties": {"city": {"type": "string", "maxLength": 20},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "required": ["a", "b"], "additionalProperties": False,
                   "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}


@pytest.fixture(scope="module")
def llm(tiny_llama_dir) -> LLM:
    return LLM(EngineConfig(model=str(tiny_llama_dir), kv_cache_gib=0.05), verbose=False)


def test_every_output_under_a_json_schema_validates(llm):
    params = [SamplingParams(max_tokens=400, temperature=1.0, seed=i, guide=Guide.json_schema(PERSON))
              for i in range(100)]
    outputs = llm.generate([f"Person {i}:" for i in range(100)], params)
    for out in outputs:
        jsonschema.validate(json.loads(out.text), PERSON)
        assert out.finish_reason == "stop"


def test_free_sequences_in_a_constrained_batch_get_the_same_tokens(llm):
    free = SamplingParams(max_tokens=30, temperature=0)
    prompts = ["def f(x):", "import os", "class A:"]
    alone = llm.generate(prompts, free)
    constrained = SamplingParams(max_tokens=60, temperature=0, guide=Guide.json_schema(PERSON))
    mixed = llm.generate(prompts + prompts, [free] * 3 + [constrained] * 3)
    assert [o.token_ids for o in mixed[:3]] == [o.token_ids for o in alone]
    assert all(o.text.startswith("{") for o in mixed[3:])


def test_a_trigger_leaves_text_free_until_it_appears(llm):
    free = llm.generate(["x ="], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    trigger = free.text[2:5]  # text the model writes anyway
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["n"],
              "additionalProperties": False, "x-guidance": JSON_STYLE}
    guide = Guide("lark", f"start: %json {json.dumps(schema)}", trigger=trigger)
    out = llm.generate(["x ="], SamplingParams(max_tokens=200, temperature=0, guide=guide))[0]
    head, _, tail = out.text.partition(trigger)
    assert out.text.startswith(free.text[:2]) and head == free.text[:2]
    assert set(json.loads(tail)) == {"n"}


def test_an_invalid_schema_is_refused_naming_the_problem(llm):
    with pytest.raises(InvalidRequest, match="objekt"):
        llm.engine.add_request("bad", [1, 2, 3], SamplingParams(guide=Guide.json_schema({"type": "objekt"})))


# -- through the OpenAI API --------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(openai_server) -> OpenAI:
    return OpenAI(base_url=openai_server.url + "/v1", api_key="-", max_retries=0)


def ask(client, **kw):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                          **({"max_tokens": 200} | kw))


@pytest.mark.slow
def test_response_format_json_schema_and_json_object(client):
    r = ask(client, temperature=1.0, seed=1, n=4, max_tokens=400, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    for choice in r.choices:
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    r = ask(client, temperature=1.0, seed=2, n=4, max_tokens=400, response_format={"type": "json_object"})
    finished = [c for c in r.choices if c.finish_reason == "stop"]  # free-form JSON may not end in 400 tokens
    assert finished and all(isinstance(json.loads(c.message.content), dict) for c in finished)


@pytest.mark.slow
def test_a_named_function_is_always_the_one_called_with_valid_arguments(client):
    r = ask(client, temperature=1.0, seed=3, n=6, tools=[WEATHER, ADD],
            tool_choice={"type": "function", "function": {"name": "add"}})
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        call = choice.message.tool_calls[0]
        assert call.function.name == "add"
        jsonschema.validate(json.loads(call.function.arguments), ADD["function"]["parameters"])


@pytest.mark.slow
def test_required_calls_a_declared_function_and_streams_it_in_delta_form(client):
    r = ask(client, temperature=1.0, seed=5, n=4, tools=[WEATHER, ADD], tool_choice="required")
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}
    for choice in r.choices:
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    chunks = list(ask(client, temperature=0, tools=[WEATHER], tool_choice="required", stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls and calls[0].function.name == "get_weather" and calls[0].index == 0 and calls[0].id
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.slow
def test_tool_choice_none_never_calls(client):
    for seed in range(3):
        r = ask(client, temperature=1.0, seed=seed, tools=[WEATHER], tool_choice="none", max_tokens=30)
        assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason != "tool_calls"


@pytest.mark.slow
@pytest.mark.parametrize("extra, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format", "objekt"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "json_schema"),
])
def test_invalid_constraints_are_400s_naming_the_problem(openai_server, extra, param, words):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]} | extra
    r = httpx.post(openai_server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == param and words in r.json()["error"]["message"]


def test_internlm2_tool_format_is_constrained_and_parsed(tmp_path):
    """A tokenizer with InternLM2's action special tokens and a template that speaks of <|plugin|>:
    required calls come out as <|action_start|><|plugin|> blocks and parse into tool_calls."""
    import asyncio

    from transformers import AutoTokenizer

    from conftest import build_tiny_llama
    from internray.models.export import DEFAULT_CHAT_TEMPLATE
    from internray.serve.engine.async_engine import AsyncLLMEngine
    from internray.models.chat_format import INTERNLM2, tool_format
    from internray.serve.openai.protocol import ChatCompletionRequest
    from internray.serve.openai.serving import OpenAIServing

    model_dir = build_tiny_llama(tmp_path / "internlm2-style", spare_tokens=8)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": list(INTERNLM2.special_tokens)})
    tokenizer.chat_template = "{# tools are announced to the <|plugin|> role #}" + DEFAULT_CHAT_TEMPLATE
    tokenizer.save_pretrained(model_dir)
    assert tool_format(AutoTokenizer.from_pretrained(model_dir)) is INTERNLM2

    serving = OpenAIServing(AsyncLLMEngine(EngineConfig(model=str(model_dir), kv_cache_gib=0.01), verbose=False),
                            "internlm2-style")
    request = ChatCompletionRequest(model="internlm2-style", messages=[{"role": "user", "content": "1 + 2?"}],
                                    tools=[ADD], tool_choice="required", max_tokens=80, temperature=1.0, seed=0,
                                    n=3, parallel_tool_calls=False)

    async def ask():
        return [item async for item in serving.chat(request)][0]

    response = asyncio.run(ask())
    for choice in response["choices"]:
        assert choice["finish_reason"] == "tool_calls", choice
        call = choice["message"]["tool_calls"][0]["function"]
        assert call["name"] == "add"
        jsonschema.validate(json.loads(call["arguments"]), ADD["function"]["parameters"])
