"""Replay: the same UI driven by a recorded session; pacing, pause/step/speed, bad files, torn files."""

from __future__ import annotations

import math

import pytest

from sedac_core.config import SedacConfig
from sedac_core.errors import SessionFileError
from sedac_core.events import GenerationStart, TokenEvent
from sedac_core.session import read_session
from sedac_tui import app as app_module
from sedac_tui.app import SedacChatApp, run_replay
from sedac_tui.sources import ReplaySource, _delays
from sedac_tui.widgets import ReplayBar, StatsBar
from sedac_tui.widgets.conversation import AssistantBubble, NoticeLine, UserBubble

from .helpers import record_scripted_session, wait_for
from .scripted import SCRIPT, full_text


def replay_app(path, **kwargs) -> SedacChatApp:
    return SedacChatApp(config=SedacConfig(), session=read_session(path), cursor_blink=False, **kwargs)


async def test_replay_steps_one_token_at_a_time_and_pauses(tmp_path):
    path = record_scripted_session(tmp_path / "s.jsonl")
    app = replay_app(path, replay_paused=True)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: app.state.model == "scripted-8L", what="the header")
        await pilot.pause(0.1)
        assert app.state.tokens == []  # paused from the start
        assert app.query_one("#prompt").disabled
        for n in (1, 2, 3):
            await pilot.press("right")
            await wait_for(pilot, lambda: len(app.state.tokens) == n, what=f"token {n}")
            await pilot.pause(0.05)
            assert len(app.state.tokens) == n  # exactly one per step
        assert [str(b.render()) for b in app.query(UserBubble)] == ["hello"]
        bar = app.query_one(ReplayBar)
        assert bar.paused and bar.tokens_shown == 3 and "paused" in str(bar.render())
        app.replay.set_speed(math.inf)
        await pilot.press("space")  # resume
        await wait_for(pilot, lambda: app.state.status == "replay-done", what="the end of the replay")
        assert len(app.state.tokens) == len(SCRIPT)
        assert [b.source for b in app.query(AssistantBubble)] == [full_text()]
        assert any("replay finished" in str(n.render()) for n in app.query(NoticeLine))
        # the recorded threshold change replays into the stats bar
        assert "tau_low 0.80" in str(app.query_one(StatsBar).render())


async def test_replay_keys_change_speed_and_live_keys_do_nothing(tmp_path):
    path = record_scripted_session(tmp_path / "s.jsonl")
    app = replay_app(path, replay_paused=True, speed=2.0)
    async with app.run_test() as pilot:
        await pilot.pause()
        await pilot.press("plus")
        assert app.replay.speed == 4.0
        await pilot.press("minus", "minus", "minus")
        assert app.replay.speed == 0.5
        tau_before = app.state.tau_low
        await pilot.press("right_square_bracket", "m")
        assert app.state.tau_low == tau_before
        assert "0.5x" in str(app.query_one(ReplayBar).render())


async def test_replay_paces_by_recorded_times(tmp_path):
    path = record_scripted_session(tmp_path / "s.jsonl", prompts=("a",), threshold_after_first=False)
    session = read_session(path)
    delays = _delays(session.events, max_gap_s=2.0)
    token_delays = [d for e, d in zip(session.events, delays) if isinstance(e, TokenEvent)]
    assert token_delays == [0.05] * len(SCRIPT)  # each token waits its recorded time_ms
    app = replay_app(path, speed=10.0)  # 12 tokens * 50 ms / 10 = 60 ms plus the O1 step
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.state.status == "replay-done", timeout=5, what="the replay")


def test_replay_source_wait_honours_speed():
    import time

    from sedac_core.events import EventBus
    from sedac_core.session import Session
    from sedac_core.events import SessionStart

    src = ReplaySource(Session(header=SessionStart()), EventBus(), lambda _: None, speed=4.0)
    started = time.monotonic()
    assert src._wait(0.4)
    took = time.monotonic() - started
    assert 0.08 <= took < 0.3


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "not found"),
        ('{"type": "token", "index": 0}\n', "not a SEDAC session"),
        ("hello world\n", "not a SEDAC session"),
        ("", "empty"),
    ],
)
def test_bad_replay_files_raise_before_the_ui_opens(tmp_path, monkeypatch, content, message):
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_text(content)
    monkeypatch.setattr(app_module.SedacChatApp, "run", lambda self: pytest.fail("the UI must not open"))
    with pytest.raises(SessionFileError, match=message):
        run_replay(path, speed=1.0, theme=None, config=SedacConfig())


def test_malformed_line_is_reported_with_its_number(tmp_path, monkeypatch):
    path = record_scripted_session(tmp_path / "s.jsonl")
    lines = path.read_text().splitlines(keepends=True)
    lines[4] = "{broken json\n"
    path.write_text("".join(lines))
    monkeypatch.setattr(app_module.SedacChatApp, "run", lambda self: pytest.fail("the UI must not open"))
    with pytest.raises(SessionFileError, match="line 5"):
        run_replay(path, speed=1.0, theme=None, config=SedacConfig())


async def test_torn_last_line_replays_up_to_the_tear_with_a_notice(tmp_path):
    path = record_scripted_session(tmp_path / "s.jsonl", prompts=("a",), threshold_after_first=False)
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    # cut the file in the middle of the 5th token line
    token_lines = [i for i, line in enumerate(lines) if '"type":"token"' in line]
    cut = token_lines[4]
    path.write_text("".join(lines[:cut]) + lines[cut][: len(lines[cut]) // 2])
    app = replay_app(path, speed=math.inf)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.state.status == "replay-done", what="the replay")
        assert len(app.state.tokens) == 4
        assert any("torn" in str(n.render()) for n in app.query(NoticeLine))


def test_run_replay_unknown_theme_lists_available(tmp_path, monkeypatch):
    from sedac_core.errors import ConfigError

    path = record_scripted_session(tmp_path / "s.jsonl")
    monkeypatch.setattr(app_module.SedacChatApp, "run", lambda self: pytest.fail("the UI must not open"))
    with pytest.raises(ConfigError, match="sedac-dark.*sedac-light|sedac-light.*sedac-dark"):
        run_replay(path, speed=1.0, theme="no-such-theme", config=SedacConfig())


async def test_replay_generation_start_thresholds_shown(tmp_path):
    path = record_scripted_session(tmp_path / "s.jsonl", prompts=("a", "b"))
    session = read_session(path)
    starts = [e for e in session.events if isinstance(e, GenerationStart)]
    assert starts[1].tau_low == 0.8  # the second generation ran with the changed threshold
    app = replay_app(path, speed=math.inf)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.state.status == "replay-done", what="the replay")
        assert app.state.generations == 2 and len(app.state.tokens) == 2 * len(SCRIPT)
        assert len(app.state.o1_events) == 2
