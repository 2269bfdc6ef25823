"""Fixtures for the HTTP server tests: one tiny random engine for the session, uvicorn servers on free loopback
ports in background threads, and a throttle on the engine's event bus that slows or holds the inference thread
(deterministically: the bus calls subscribers synchronously, in the engine's thread)."""

from __future__ import annotations

import importlib.util
import queue
from typing import Iterator

import pytest

from conftest import make_bundle  # tests/conftest.py
from sedac_core.engine import SedacEngine
from sedac_core.events import Event

from .helpers import Throttle, running

# these tests need the `server` and `test` extras; without them the directory is not collected
MISSING_DEPS = [m for m in ("fastapi", "uvicorn", "prometheus_client", "httpx", "openai")
                if importlib.util.find_spec(m) is None]
if MISSING_DEPS:
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session")
def engine() -> SedacEngine:
    return SedacEngine(make_bundle("llama", seed=1))


@pytest.fixture(scope="session")
def throttle(engine) -> Iterator[Throttle]:
    t = Throttle()
    unsubscribe = engine.bus.subscribe(t)
    yield t
    unsubscribe()


@pytest.fixture(autouse=True)
def _open_throttle(request):
    yield
    if "throttle" in request.fixturenames:
        request.getfixturevalue("throttle").reset()


@pytest.fixture
def bus_events(engine) -> Iterator["queue.Queue[Event]"]:
    """Every engine event published during the test."""
    q, unsubscribe = engine.bus.subscribe_queue()
    yield q
    unsubscribe()


@pytest.fixture(scope="session")
def base_url(engine, throttle) -> Iterator[str]:
    """A server without an API key and the default queue."""
    from sedac_core.server import create_app

    with running(create_app(engine)) as url:
        yield url
