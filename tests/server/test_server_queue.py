"""Scheduling over real HTTP: a full queue answers 503 with Retry-After, a client that disconnects cancels its
generation (streaming or not), and 20 concurrent requests are all answered exactly as the engine answers alone."""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from sedac_core.engine import GenerationRequest
from sedac_core.events import GenerationEnd, GenerationStart
from sedac_core.server import create_app

from .helpers import metric, running, wait_until

CHAT = "/v1/chat/completions"


def ended(bus_events: "queue.Queue", timeout: float = 20.0) -> GenerationEnd:
    deadline = time.monotonic() + timeout
    while True:
        event = bus_events.get(timeout=max(0.01, deadline - time.monotonic()))
        if isinstance(event, GenerationEnd):
            return event


def test_full_queue_gets_503_with_retry_after(engine, throttle):
    with running(create_app(engine, queue_size=1)) as url:
        def queue_state():
            return httpx.get(f"{url}/health", timeout=10).json()["queue"]

        throttle.gate.clear()  # the engine stops at its first token until the gate opens
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx.post, f"{url}{CHAT}", json=body, timeout=60)
            wait_until(lambda: queue_state()["running"] == 1, what="the first request to run")
            second = pool.submit(httpx.post, f"{url}{CHAT}", json=body, timeout=60)
            wait_until(lambda: queue_state()["waiting"] == 1, what="the second request to wait")

            r = httpx.post(f"{url}{CHAT}", json=body, timeout=10)
            assert r.status_code == 503
            assert int(r.headers["retry-after"]) >= 1
            error = r.json()["error"]
            assert error["code"] == "queue_full" and error["type"] == "server_error"

            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=10)
            with pytest.raises(openai.APIStatusError) as info:
                client.chat.completions.create(model="m", messages=body["messages"], max_tokens=2)
            assert info.value.status_code == 503

            metrics = httpx.get(f"{url}/metrics", timeout=10).text
            assert "sedac_queue_depth 1.0" in metrics and "sedac_rejected_requests_total 2.0" in metrics

            throttle.gate.set()
            assert first.result().status_code == 200
            assert second.result().status_code == 200
        assert queue_state() == {"running": 0, "waiting": 0, "capacity": 1}


def test_stream_disconnect_cancels_the_generation(base_url, throttle, bus_events):
    throttle.delay = 0.02  # ~20 s for the whole answer unless cancelled
    body = {"messages": [{"role": "user", "content": "Go on"}], "max_tokens": 450, "stream": True,
            "sedac": {"ignore_eos": True}}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{base_url}{CHAT}", json=body) as r:
            lines = r.iter_lines()
            received = 0
            for line in lines:
                if line.startswith("data: "):
                    received += 1
                if received >= 4:
                    break
        # leaving the block closes the connection mid-stream
    t0 = time.monotonic()
    end = ended(bus_events)
    assert end.stop_reason == "cancelled"
    assert end.tokens < 450
    assert time.monotonic() - t0 < 10


def test_non_streaming_disconnect_cancels_the_generation(base_url, throttle, bus_events):
    throttle.delay = 0.02
    body = {"messages": [{"role": "user", "content": "Go on"}], "max_tokens": 450, "sedac": {"ignore_eos": True}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base_url}{CHAT}", json=body, timeout=httpx.Timeout(10, read=1.0))
    end = ended(bus_events)
    assert end.stop_reason == "cancelled" and end.tokens < 450


def test_disconnect_while_queued_skips_the_generation(base_url, throttle, bus_events):
    gone = 'sedac_requests_total{endpoint="/v1/chat/completions",status="499"}'
    gone_before = metric(base_url, gone)
    throttle.gate.clear()
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    with ThreadPoolExecutor(1) as pool:
        running_one = pool.submit(httpx.post, f"{base_url}{CHAT}", json=body, timeout=60)
        wait_until(lambda: httpx.get(f"{base_url}/health", timeout=10).json()["queue"]["running"] == 1)
        with pytest.raises(httpx.ReadTimeout):  # queued behind the first, then gone
            httpx.post(f"{base_url}{CHAT}", json=body, timeout=httpx.Timeout(10, read=0.5))
        # the server notices within its poll interval and answers the gone client 499 (seen in /metrics)
        wait_until(lambda: metric(base_url, gone) == gone_before + 1, what="the server to notice")
        throttle.gate.set()
        assert running_one.result().status_code == 200
    wait_until(lambda: httpx.get(f"{base_url}/health", timeout=10).json()["queue"] == {
        "running": 0, "waiting": 0, "capacity": 32}, what="the queue to drain")
    starts = []
    while not bus_events.empty():
        event = bus_events.get()
        if isinstance(event, GenerationStart):
            starts.append(event)
    assert len(starts) == 1  # the queued request never reached the engine



def test_twenty_concurrent_requests_are_all_answered_correctly(base_url, engine):
    prompts = [f"Question {i}: what is {i} + {i}?" for i in range(20)]
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)

    def ask(prompt: str) -> str:
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}],
                                           max_tokens=4, temperature=0)
        return r.choices[0].message.content

    barrier = threading.Barrier(20)

    def ask_together(prompt: str) -> str:
        barrier.wait(timeout=30)
        return ask(prompt)

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(ask_together, prompts))
    expected = [engine.generate(GenerationRequest(prompt=p, max_new_tokens=4)).generated_text for p in prompts]
    assert answers == expected
