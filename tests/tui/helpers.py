"""TUI test helpers: an app factory around the scripted engine, and a wait helper."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from sedac_core.config import SedacConfig
from sedac_tui.app import SedacChatApp

from .scripted import ScriptedEngine


async def wait_for(pilot, predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.02)
    await pilot.pause()


def scripted_app(*, config: SedacConfig | None = None, record_path: Path | None = None, theme: str | None = None,
                 **engine_kwargs) -> tuple[SedacChatApp, dict]:
    """An app whose engine factory builds a ScriptedEngine; `holder['engine']` is the engine once loaded."""
    holder: dict = {}
    config = config or SedacConfig()

    def factory(bus, progress):
        progress("scripted engine")
        holder["engine"] = ScriptedEngine(bus, config, **engine_kwargs)
        return holder["engine"]

    app = SedacChatApp(config=config, engine_factory=factory, record_path=record_path, theme=theme,
                       cursor_blink=False)
    return app, holder


async def ready(pilot) -> None:
    await wait_for(pilot, lambda: pilot.app.live is not None, what="the engine to load")


async def send(pilot, text: str) -> None:
    app = pilot.app
    app.query_one("#prompt").focus()
    await pilot.press(*list(text) if text else [])
    await pilot.press("enter")


async def idle(pilot) -> None:
    app = pilot.app
    await wait_for(pilot, lambda: app.live is not None and not app.live.busy and app.drawn
                   and app.state.status == "ready" and not app.pending_prompts, what="the generation to finish")


def record_scripted_session(path: Path, *, prompts=("hello",), threshold_after_first: bool = True) -> Path:
    """Write a session file the way the live app would: header, user messages, generations, a threshold change."""
    from types import SimpleNamespace

    from sedac_core.events import EventBus, UserMessage
    from sedac_core.session import SessionRecorder

    bus = EventBus()
    engine = ScriptedEngine(bus)
    recorder = SessionRecorder(path, engine.session_header()).attach(bus)
    for i, prompt in enumerate(prompts):
        bus.publish(UserMessage(text=prompt, time=1000.0 + i))
        for _ in engine.stream(SimpleNamespace(max_new_tokens=64)):
            pass
        if i == 0 and threshold_after_first:
            engine.set_thresholds(tau_low=0.8, tau_high=3.0)
    recorder.close()
    return path
