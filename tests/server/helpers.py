"""Server test helpers: a uvicorn server in a background thread, a throttle for the inference thread, waiting."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from sedac_core.events import Event, TokenEvent


class Throttle:
    """While `gate` is clear, the engine blocks before handing out each token; `delay` slows every token."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.delay = 0.0

    def __call__(self, event: Event) -> None:
        if isinstance(event, TokenEvent):
            self.gate.wait(timeout=30)
            if self.delay:
                time.sleep(self.delay)

    def reset(self) -> None:
        self.delay = 0.0
        self.gate.set()


@contextmanager
def running(app) -> Iterator[str]:
    """Serve `app` with uvicorn on a free 127.0.0.1 port in a background thread; yield its base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn-test")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def wait_until(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def metric(base_url: str, name: str) -> float:
    """One sample's value from the server's /metrics (0 when it is not there yet)."""
    import httpx

    for line in httpx.get(f"{base_url}/metrics", timeout=10).text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample == name:
            return float(value)
    return 0.0
