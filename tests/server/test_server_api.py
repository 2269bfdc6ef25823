"""The OpenAI-compatible API over real HTTP (uvicorn on a free loopback port, a tiny random model): chat and text
completions with the official `openai` client and raw httpx, streaming, models, health, metrics, SEDAC extras and
OpenAI-style 400 errors."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from sedac_core.engine import GenerationRequest


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def sse_data(response: httpx.Response) -> list:
    """The `data:` payloads of a server-sent-events response, JSON-decoded ([DONE] kept as the string)."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_chat_non_streaming_matches_the_engine(client, engine):
    r = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hello there"}],
                                       max_tokens=6, temperature=0)
    direct = engine.generate(GenerationRequest(prompt="Hello there", max_new_tokens=6))
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "tiny-llama"
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == direct.generated_text
    assert choice.finish_reason == ("length" if direct.stop_reason == "max_tokens" else "stop")
    assert r.usage.completion_tokens == direct.tokens
    assert r.usage.prompt_tokens == direct.prompt_tokens
    assert r.usage.total_tokens == direct.prompt_tokens + direct.tokens
    sedac = r.model_extra["sedac"]
    assert sedac["mode"] == "full" and sedac["skip_ratio"] == 0.0 and sedac["avg_exit_layer"] == 4.0
    assert sedac["o1_triggers"] == 0 and sedac["tok_per_s"] > 0 and sedac["num_layers"] == 4


def test_chat_streaming_with_the_openai_client(client, engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count: 1 2 3"}]
    stream = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason in ("stop", "length")
    assert finals[0].model_extra["sedac"]["mode"] == "full"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)
    direct = engine.generate(GenerationRequest(messages=messages, max_new_tokens=8))
    assert text == direct.generated_text


def test_chat_streaming_raw_sse_ends_with_done(base_url):
    body = {"model": "x", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        data = sse_data(r)
    assert data[-1] == "[DONE]"
    assert all(isinstance(d, dict) for d in data[:-1])
    assert data[-2]["choices"][0]["finish_reason"] in ("stop", "length")


def test_sedac_events_are_streamed_on_request(base_url):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "stream": True,
            "sedac": {"events": True, "ignore_eos": True}}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as r:
        data = sse_data(r)
    events = [d["sedac_event"] for d in data if isinstance(d, dict) and "sedac_event" in d]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "generation_start" and kinds[-1] == "generation_end"
    assert kinds.count("token") == 5
    token = next(e for e in events if e["type"] == "token")
    for key in ("exit_layer", "entropy_bits", "confidence", "decision", "top_tokens"):
        assert key in token
    # a token event rides on its content chunk
    assert any("sedac_event" in d and d["choices"] for d in data if isinstance(d, dict))


def test_non_streaming_events_and_per_request_thresholds(base_url, engine):
    before = (engine.tau_low, engine.tau_high)
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
            "sedac": {"events": True, "tau_low": 1.25, "tau_high": 6.0, "mode": "full", "ignore_eos": True}}
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    sedac = r.json()["sedac"]
    assert sedac["tau_low"] == 1.25 and sedac["tau_high"] == 6.0 and sedac["tokens"] == 3
    assert [e["type"] for e in sedac["events"]].count("token") == 3
    assert (engine.tau_low, engine.tau_high) == before  # the server's own thresholds are back


def test_seed_makes_sampling_reproducible(client):
    def sample():
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Tell me"}],
                                           max_tokens=6, temperature=1.0, top_p=0.9, seed=1234)
        return r.choices[0].message.content

    assert sample() == sample()


def test_stop_strings_cut_the_answer(client, engine):
    full = engine.generate(GenerationRequest(prompt="Hello there", max_new_tokens=12, ignore_eos=True))
    cut = next((i for i in range(2, len(full.generated_text)) if full.generated_text[i].strip()), None)
    if cut is None:
        pytest.skip("the random model's answer has no usable stop text")
    stop = full.generated_text[cut: cut + 2]
    expected = full.generated_text[: full.generated_text.find(stop)]
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hello there"}],
                                       max_tokens=12, stop=[stop, "never-there"],
                                       extra_body={"sedac": {"ignore_eos": True}})
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == "stop"


def test_text_completion_uses_the_raw_prompt(client, engine):
    prompt = "The capital of France is"
    r = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    raw_ids = engine.bundle.tokenizer(prompt, add_special_tokens=True)["input_ids"]
    assert r.usage.prompt_tokens == len(raw_ids)  # no chat template around it
    assert engine.bundle.chat.has_template  # the chat format is back after the request
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.model_extra["sedac"]["mode"] == "full"
    stream = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=5, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == r.choices[0].text


def test_text_completion_echo_and_default_length(base_url):
    r = httpx.post(f"{base_url}/v1/completions", json={"prompt": "1 2 3", "echo": True,
                                                       "sedac": {"ignore_eos": True}}, timeout=60)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["choices"][0]["text"].startswith("1 2 3")
    assert data["usage"]["completion_tokens"] == 16  # OpenAI's default max_tokens for completions
    assert data["choices"][0]["finish_reason"] == "length"


def test_models_and_health(client, base_url):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-llama"]
    assert client.models.retrieve("tiny-llama").owned_by == "sedac"
    r = httpx.get(f"{base_url}/v1/models/gpt-4", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    health = httpx.get(f"{base_url}/health", timeout=10).json()
    assert health["status"] == "ok" and health["model"] == "tiny-llama" and health["num_layers"] == 4
    assert health["queue"]["capacity"] == 32


def test_metrics_in_prometheus_text(client, base_url):
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                   extra_body={"sedac": {"ignore_eos": True}})
    r = httpx.get(f"{base_url}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    values = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    assert values['sedac_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 1
    assert values["sedac_generated_tokens_total"] >= 3
    assert values["sedac_prompt_tokens_total"] > 0
    assert values["sedac_tokens_per_second"] > 0
    assert values["sedac_skip_ratio"] == 0.0
    assert values["sedac_avg_exit_layer"] == 4.0
    assert values["sedac_queue_depth"] == 0 and values["sedac_queue_capacity"] == 32
    assert values["sedac_o1_triggers_total"] == 0
    assert 'sedac_generations_total{stop_reason="max_tokens"}' in values


CHAT = "/v1/chat/completions"


@pytest.mark.parametrize(
    "path, body, param, match",
    [
        (CHAT, {"messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature", "less than or equal to 2"),
        (CHAT, {"messages": [{"role": "user", "content": "x"}], "top_p": 1.5}, "top_p", "less than or equal to 1"),
        (CHAT, {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        (CHAT, {"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}, "max_tokens", "valid integer"),
        (CHAT, {"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        (CHAT, {"messages": [{"role": "user", "content": "x"}], "stop": 7}, "stop", "string or a list"),
        (CHAT, {"messages": [{"role": "user", "content": "x"}], "n": 2}, "n", "only n=1"),
        (CHAT, {"messages": [{"role": "user", "content": "x"}], "sedac": {"mode": "turbo"}}, "sedac.mode", "unknown mode 'turbo'"),
        (CHAT, {"messages": [{"role": "user", "content": "x"}], "sedac": {"tau_low": -1}}, "sedac.tau_low", "greater than or equal"),
        (CHAT, {"messages": []}, "messages", "at least 1"),
        (CHAT, {"model": "m"}, "messages", "missing required parameter"),
        (CHAT, {"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role", "not supported"),
        (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0.content", "text content"),
        (CHAT, {"messages": [{"role": "user", "content": "word " * 700}]}, "messages", "context window is 512"),
        ("/v1/completions", {"prompt": ""}, "prompt", "prompt is empty"),
        ("/v1/completions", {"prompt": [1, 2, 3]}, "prompt", "must be a string"),
    ],
)
def test_bad_requests_get_openai_style_400(base_url, path, body, param, match):
    r = httpx.post(f"{base_url}{path}", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert match in error["message"]


def test_unknown_fields_are_ignored(base_url):
    body = {"messages": [{"role": "user", "content": "Hi", "name": "bob"}], "max_tokens": 2, "logit_bias": {},
            "user": "u1", "some_future_field": {"x": 1}}
    r = httpx.post(f"{base_url}{CHAT}", json=body, timeout=60)
    assert r.status_code == 200, r.text


def test_invalid_json_and_unknown_route(base_url):
    r = httpx.post(f"{base_url}{CHAT}", content=b"{not json", headers={"content-type": "application/json"},
                   timeout=10)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.get(f"{base_url}/v1/nothing-here", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


def test_bad_request_through_the_openai_client(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], temperature=5)
    assert info.value.status_code == 400 and info.value.body["param"] == "temperature"


def test_every_engine_mode_can_be_asked_for_per_request(base_url, engine):
    for mode in engine.available_modes:
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "sedac": {"mode": mode}}
        r = httpx.post(f"{base_url}{CHAT}", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["sedac"]["mode"] == mode
