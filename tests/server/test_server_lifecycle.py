"""Loading the engine in the background (a factory), a model that fails to load, and errors during a generation."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from sedac_core.errors import ModelLoadError
from sedac_core.events import GenerationStart
from sedac_core.server import create_app

from .helpers import running, wait_until

CHAT = "/v1/chat/completions"
BODY = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def test_a_factory_loads_the_engine_after_startup(engine):
    release = threading.Event()

    def factory():
        release.wait(timeout=20)
        return engine

    with running(create_app(factory, model_name="served-name")) as url:
        health = httpx.get(f"{url}/health", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "loading"
        r = httpx.post(f"{url}{CHAT}", json=BODY, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading" and "retry-after" in r.headers
        release.set()
        wait_until(lambda: httpx.get(f"{url}/health", timeout=10).status_code == 200, what="the model to load")
        r = httpx.post(f"{url}{CHAT}", json=BODY, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == "served-name"


def test_a_model_that_fails_to_load_is_reported():
    def factory():
        raise ModelLoadError("model path does not exist: /nowhere")

    with running(create_app(factory)) as url:
        wait_until(lambda: httpx.get(f"{url}/health", timeout=10).json()["status"] == "error")
        health = httpx.get(f"{url}/health", timeout=10).json()
        assert "model path does not exist" in health["error"]
        r = httpx.post(f"{url}{CHAT}", json=BODY, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_load_failed"


@pytest.fixture
def broken_engine(engine, monkeypatch):
    def stream(request, cancel=None):
        yield GenerationStart(generation_id=99, mode="full", prompt_tokens=3, num_layers=engine.num_layers)
        raise RuntimeError("the GPU caught fire")

    monkeypatch.setattr(engine, "stream", stream)
    return engine


def test_an_error_mid_stream_is_reported_in_the_stream(base_url, broken_engine):
    with httpx.stream("POST", f"{base_url}{CHAT}", json={**BODY, "stream": True}, timeout=30) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert '"type":"server_error"' in lines[-2] and "the GPU caught fire" in lines[-2]
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=30)
    with pytest.raises(openai.APIError, match="the GPU caught fire"):
        list(client.chat.completions.create(model="m", messages=BODY["messages"], stream=True))


def test_an_error_without_streaming_is_a_500(base_url, broken_engine):
    r = httpx.post(f"{base_url}{CHAT}", json=BODY, timeout=30)
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error" and "the GPU caught fire" in r.json()["error"]["message"]


def test_a_too_long_prompt_is_a_400_even_when_streaming(base_url):
    body = {"messages": [{"role": "user", "content": "word " * 700}], "stream": True}
    r = httpx.post(f"{base_url}{CHAT}", json=body, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"
