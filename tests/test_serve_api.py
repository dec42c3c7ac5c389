"""The OpenAI-compatible API on Ray Serve, driven by the official `openai` client and raw HTTP."""
from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request

import httpx
import pytest
import torch
from openai import AsyncOpenAI, BadRequestError, NotFoundError, OpenAI

from transformers import AutoModelForCausalLM, AutoTokenizer

from internray.models.chat_format import parse_tool_calls
from internray.serve.openai.chat import render_prompt
from internray.serve.openai.protocol import ChatCompletionRequest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(openai_server) -> OpenAI:
    return OpenAI(base_url=openai_server.url + "/v1", api_key="unused", max_retries=0)


def metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(url + "/metrics").read().decode()
    return float(re.search(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M).group(1))


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]


def test_completion_with_n_logprobs_and_usage(client):
    r = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=8, temperature=0.8, seed=3, n=2,
                                  logprobs=2)
    assert len(r.choices) == 2 and {c.index for c in r.choices} == {0, 1}
    assert r.usage.prompt_tokens % 2 == 0 and r.usage.prompt_tokens > 0  # the prompt counts once per choice
    assert r.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in r.choices)
    for c in r.choices:
        assert c.finish_reason in ("length", "stop")
        assert len(c.logprobs.top_logprobs[0]) == 2
        assert all(lp <= 0 for lp in c.logprobs.token_logprobs)


def test_streaming_equals_non_streaming(client):
    kwargs = dict(model="tiny", prompt="import os\nimport", max_tokens=20, temperature=0)
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason is not None
    messages = [{"role": "user", "content": "Say something."}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    parts = list(stream)
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == chat.choices[0].message.content
    assert parts[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_sse_stream_ends_with_done(openai_server):
    body = {"model": "tiny", "prompt": "x", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", openai_server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_stop_strings_cut_the_text(client):
    kwargs = dict(model="tiny", prompt="class A:", max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kwargs).choices[0].text
    stop = full[8:10]
    cut = client.completions.create(stop=[stop], **kwargs).choices[0]
    assert cut.text == full[:full.index(stop)] and cut.finish_reason == "stop"


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and len(content[0].top_logprobs) == 3


@pytest.mark.parametrize("body, status, param", [
    ({"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "tiny", "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x " * 1100}, 400, "messages"),  # longer than the 1024-token context
    ({"model": "tiny", "prompt": "x", "max_tokens": 10_000}, 400, "max_tokens"),
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"prompt": "x"}, 400, "model"),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(openai_server, client, body, status, param):
    r = httpx.post(openai_server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).choices[0].text is not None


def test_malformed_json_is_a_400(openai_server):
    r = httpx.post(openai_server.url + "/v1/chat/completions", content=b'{"model": "tiny", "messages": [',
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_the_official_client_raises_typed_errors(client):
    with pytest.raises(NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(BadRequestError, match="top_p"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], top_p=0)


def test_over_the_concurrency_cap_is_429_with_retry_after(openai_server):
    cap = openai_server.config.server.max_concurrent_requests

    async def one(http):
        body = {"model": "tiny", "prompt": "x", "max_tokens": 200, "ignore_eos": True}
        return await http.post(openai_server.url + "/v1/completions", json=body, timeout=120)

    async def burst():
        async with httpx.AsyncClient() as http:
            return await asyncio.gather(*(one(http) for _ in range(3 * cap)))

    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert codes.count(200) >= cap and 429 in codes and set(codes) <= {200, 429}
    limited = next(r for r in responses if r.status_code == 429)
    assert limited.headers["retry-after"] == "1" and limited.json()["error"]["type"] == "rate_limit_error"


def test_a_client_that_disconnects_frees_its_sequence(openai_server):
    async def walk_away():
        client = AsyncOpenAI(base_url=openai_server.url + "/v1", api_key="unused")
        stream = await client.completions.create(model="tiny", prompt="x", max_tokens=400, stream=True,
                                                 extra_body={"ignore_eos": True})
        async for _ in stream:
            break
        await stream.close()
        await client.close()

    generated_before = metric(openai_server.url, "internray_generation_tokens_total")
    asyncio.run(walk_away())
    deadline = time.time() + 10
    while metric(openai_server.url, "internray_requests_running") > 0 and time.time() < deadline:
        time.sleep(0.2)
    assert metric(openai_server.url, "internray_requests_running") == 0
    time.sleep(1)  # a leaked sequence would keep generating toward its 400 tokens
    assert metric(openai_server.url, "internray_generation_tokens_total") - generated_before < 400


def test_metrics_expose_latency_and_cache_state(openai_server):
    text = urllib.request.urlopen(openai_server.url + "/metrics").read().decode()
    for name in ("internray_time_to_first_token_seconds_bucket", "internray_time_per_output_token_seconds_count",
                 "internray_generation_tokens_total", "internray_requests_waiting", "internray_kv_cache_usage_ratio"):
        assert name in text
    assert json.loads(urllib.request.urlopen(openai_server.url + "/health").read())["status"] == "ok"


def test_tools_are_offered_in_the_prompt_and_tool_calls_parsed_back(tiny_llama_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    weather = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                "parameters": {"type": "object",
                                                               "properties": {"city": {"type": "string"}}}}}
    request = ChatCompletionRequest(model="tiny", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                    tools=[weather])
    prompt = render_prompt(tokenizer, request)
    assert '"name": "get_weather"' in prompt and "<tool_call>" in prompt and prompt.endswith("assistant\n")
    text = 'Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    content, calls = parse_tool_calls(text, [weather])
    assert content == "Let me check."
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert parse_tool_calls('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', [weather])[1] == []
    repeated = "\n".join([text.split("\n")[1]] * 3)  # a weak model looping on one call
    assert len(parse_tool_calls(repeated, [weather])[1]) == 1


def test_one_app_serves_several_models_behind_api_keys(openai_server, tiny_llama_dir):
    from ray import serve

    from internray.serve.app import build_app
    from internray.serve.config import ServeConfig

    model = {"model": str(tiny_llama_dir), "kv_cache_gib": 0.01}
    config = ServeConfig(models=[model | {"served_name": "secure-a"}, model | {"served_name": "secure-b"}],
                         server={"cpus_per_replica": 0, "api_keys": ["sk-right"]})
    serve.run(build_app(config), name="secure", route_prefix="/secure")  # the same HTTP proxy, another prefix
    try:
        # several models: a router in front; one model (the session's app): its replicas are the ingress
        assert set(serve.status().applications["secure"].deployments) == {
            "OpenAIRouter", "LLMServer:secure-a", "LLMServer:secure-b"}
        assert set(serve.status().applications["internray"].deployments) == {"LLMServer:tiny"}
        base = openai_server.url + "/secure/v1"
        assert httpx.get(base + "/models", timeout=30).status_code == 401
        wrong = httpx.get(base + "/models", headers={"Authorization": "Bearer sk-wrong"}, timeout=30)
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        right = OpenAI(base_url=base, api_key="sk-right", max_retries=0)
        assert sorted(m.id for m in right.models.list().data) == ["secure-a", "secure-b"]
        for name in ("secure-a", "secure-b"):
            reply = right.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=3)
            assert reply.model == name and reply.choices[0].message.role == "assistant"
    finally:
        serve.delete("secure")


def test_streamed_logprobs_add_up_to_the_non_streamed_ones(client):
    kwargs = dict(model="tiny", prompt="def f(x):", max_tokens=12, temperature=0, logprobs=1,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs).choices[0].logprobs
    streamed = [c.choices[0].logprobs for c in client.completions.create(stream=True, **kwargs)]
    assert [lp for s in streamed if s for lp in s.token_logprobs] == whole.token_logprobs


def test_echo_scores_the_prompt_like_lm_eval_asks(client, tiny_llama_dir):
    """lm-eval's loglikelihood request: echo the prompt, max_tokens 0, logprobs of every token."""
    context, continuation = "def add(a, b):\n    return", " a + b"
    r = client.completions.create(model="tiny", prompt=context + continuation, max_tokens=0, echo=True,
                                  logprobs=1, temperature=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == context + continuation and r.usage.completion_tokens == 0
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = tokenizer(context + continuation)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    starts = [i for i, offset in enumerate(lp.text_offset) if offset >= len(context)]
    assert starts, "the continuation's tokens are found by text_offset"
    got = sum(lp.token_logprobs[i] for i in starts)
    want = sum(float(expected[i - 1, ids[i]]) for i in starts)
    assert got == pytest.approx(want, abs=1e-3)


def test_max_tokens_zero_needs_echo(openai_server):
    r = httpx.post(f"{openai_server.url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
