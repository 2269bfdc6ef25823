"""Snapshots of the main screen during a scripted session (80x24 and 120x40), the inspector, the help screen and
the replay screen. Everything shown is deterministic: scripted events with fixed times, no recording path, no
cursor blink. Regenerate with `pytest tests/tui/test_snapshots.py --snapshot-update` and look at the SVGs."""

from __future__ import annotations

from sedac_core.config import SedacConfig
from sedac_core.session import read_session
from sedac_tui.app import SedacChatApp

from .helpers import idle, ready, record_scripted_session, scripted_app, send, wait_for
from .scripted import SCRIPT


async def _chat_session(pilot) -> None:
    await ready(pilot)
    await send(pilot, "Explain SEDAC in one line")
    await idle(pilot)


def test_main_screen_80x24(snap_compare):
    app, _ = scripted_app()
    assert snap_compare(app, terminal_size=(80, 24), run_before=_chat_session)


def test_main_screen_120x40(snap_compare):
    app, _ = scripted_app()
    assert snap_compare(app, terminal_size=(120, 40), run_before=_chat_session)


def test_inspector_80x24(snap_compare):
    async def run_before(pilot) -> None:
        await _chat_session(pilot)
        await pilot.press("escape", "f2", "left", "left", "left", "left", "left")

    app, _ = scripted_app()
    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)


def test_help_screen(snap_compare):
    async def run_before(pilot) -> None:
        await ready(pilot)
        await pilot.press("f1")

    app, _ = scripted_app()
    assert snap_compare(app, terminal_size=(100, 34), run_before=run_before)


def test_replay_screen_paused_mid_answer(snap_compare, tmp_path):
    path = record_scripted_session(tmp_path / "replayed.jsonl")
    app = SedacChatApp(config=SedacConfig(), session=read_session(path), replay_paused=True, cursor_blink=False)

    async def run_before(pilot) -> None:
        await wait_for(pilot, lambda: app.state.model != "", what="the header")
        for n in range(1, 8):
            await pilot.press("right")
            await wait_for(pilot, lambda: len(app.state.tokens) == n and app.drawn,
                           what=f"token {n}")
        await pilot.pause(0.05)
        assert len(app.state.tokens) == 7 < len(SCRIPT)

    assert snap_compare(app, terminal_size=(120, 40), run_before=run_before)
