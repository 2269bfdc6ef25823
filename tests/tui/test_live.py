"""Pilot tests of live chat against the scripted engine: streaming, thresholds, modes, cancelling, failures,
loading, recording and key handling."""

from __future__ import annotations

import threading

from textual.widgets import Input

from sedac_core.config import SedacConfig
from sedac_core.errors import SedacError
from sedac_core.events import GenerationEnd, ThresholdChange, TokenEvent, UserMessage
from sedac_core.session import read_session
from sedac_tui.app import SedacChatApp
from sedac_tui.widgets import Conversation, StatsBar, TokenInspector
from sedac_tui.widgets.conversation import AssistantBubble, NoticeLine, UserBubble

from .helpers import idle, ready, scripted_app, send, wait_for
from .scripted import SCRIPT, full_text


def stats_text(app) -> str:
    return str(app.query_one(StatsBar).render())


def notices(app) -> list[str]:
    return [str(n.render()) for n in app.query(NoticeLine)]


def notifications(app) -> list[str]:
    return [n.message for n in app._notifications]


async def test_prompt_streams_tokens_into_conversation_and_panels():
    app, holder = scripted_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        await send(pilot, "hello")
        await idle(pilot)
        assert [str(b.render()) for b in app.query(UserBubble)] == ["hello"]
        answers = list(app.query(AssistantBubble))
        assert len(answers) == 1 and answers[0].source == full_text()
        assert len(app.state.tokens) == len(SCRIPT)
        assert app.history == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": full_text()}]
        request = holder["engine"].requests[0]
        assert request.messages == [{"role": "user", "content": "hello"}]
        text = stats_text(app)
        assert "scripted-8L" in text and "20.0" in text and "38%" in text and "5.0/8" in text


async def test_second_prompt_sends_the_whole_conversation():
    app, holder = scripted_app()
    async with app.run_test() as pilot:
        await ready(pilot)
        await send(pilot, "one")
        await idle(pilot)
        await send(pilot, "two")
        await idle(pilot)
        roles = [m["role"] for m in holder["engine"].requests[1].messages]
        assert roles == ["user", "assistant", "user"]
        assert len(list(app.query(AssistantBubble))) == 2


async def test_threshold_keys_change_engine_and_stats_bar(tmp_path):
    record = tmp_path / "s.jsonl"
    app, holder = scripted_app(record_path=record)
    async with app.run_test() as pilot:
        await ready(pilot)
        engine = holder["engine"]
        assert isinstance(app.focused, Input)  # the threshold keys act while the prompt has the focus
        await pilot.press("f6", "f6")
        await pilot.press("f8")
        await pilot.press("f7", "f7")
        await pilot.pause()
        assert engine.tau_low == 0.7
        assert engine.tau_high == 4.25
        await wait_for(pilot, lambda: "tau_low 0.70" in stats_text(app) and "tau_high 4.25" in stats_text(app),
                       what="the stats bar to show the new thresholds")
        await pilot.press("f5")
        await pilot.pause()
        assert engine.tau_low == 0.6
    changes = [e for e in read_session(record).events if isinstance(e, ThresholdChange)]
    assert [(c.tau_low, c.tau_high) for c in changes][-1] == (0.6, 4.25)
    assert len(changes) == 6


async def test_single_keys_type_into_the_input_instead_of_acting():
    app, holder = scripted_app()
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.press("right_square_bracket", "m", "question_mark", "i")
        await pilot.pause()
        assert app.query_one("#prompt", Input).value == "]m?i"
        assert holder["engine"].tau_low == 0.5 and holder["engine"].mode == "full"
        assert not holder["engine"].calls
        # the function-key alternatives work from inside the input
        await pilot.press("f6")
        await pilot.pause()
        assert holder["engine"].tau_low == 0.6


async def test_a_sentence_typed_outside_the_input_is_typed_not_acted_on():
    """Typing always types: with the focus on the conversation (Tab), every key of a sentence lands in the prompt
    (the first one moves the focus there) and no action fires."""
    app, holder = scripted_app()
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.press("tab")
        assert not isinstance(app.focused, Input)
        sentence = "Write a short poem about the sea: [o] {g} c? t/p i!"
        await pilot.press(*[_key(ch) for ch in sentence])
        await pilot.pause()
        assert app.query_one("#prompt", Input).value == sentence
        assert isinstance(app.focused, Input)
        assert not holder["engine"].calls and holder["engine"].mode == "full"
        assert not app.screen.has_class("-inspecting") and not app.screen.has_class("-no-panels")
        assert app.theme == "sedac-dark"


async def test_the_inspector_gives_the_focus_back_where_it_was():
    app, _ = scripted_app()
    async with app.run_test() as pilot:
        await ready(pilot)
        await send(pilot, "hello")
        await idle(pilot)
        await pilot.press("f2")
        assert app.screen.has_class("-inspecting") and isinstance(app.focused, TokenInspector)
        await pilot.press("left")
        assert app.state.selected == len(app.state.tokens) - 2
        await pilot.press("x")  # typing types, even from the inspector; the inspector stays open
        assert app.query_one("#prompt", Input).value == "x" and isinstance(app.focused, Input)
        assert app.screen.has_class("-inspecting")
        await pilot.press("f2")  # back into the inspector
        assert isinstance(app.focused, TokenInspector)
        await pilot.press("escape")  # closed: the focus returns to the prompt, where it was before it opened
        assert not app.screen.has_class("-inspecting") and isinstance(app.focused, Input)
        await pilot.press("tab", "f2", "escape")  # opened from the conversation: back to the conversation
        assert app.focused is app.query_one("#conversation")


def _key(ch: str) -> str:
    names = {" ": "space", "[": "left_square_bracket", "]": "right_square_bracket", "{": "left_curly_bracket",
             "}": "right_curly_bracket", "?": "question_mark", "!": "exclamation_mark", ":": "colon", "/": "slash"}
    return names.get(ch, ch)


async def test_mode_cycles_through_available_modes():
    app, holder = scripted_app()
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.press("escape")
        seen = []
        for _ in range(3):
            await pilot.press("f4")
            await pilot.pause()
            seen.append(holder["engine"].mode)
            assert f"mode {holder['engine'].mode}" in stats_text(app)
        assert seen == ["early_exit", "lossless", "full"]


async def test_mode_cycle_with_a_single_mode_explains_why():
    app, holder = scripted_app(modes=("full",))
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.press("escape", "f4")
        await pilot.pause()
        assert holder["engine"].mode == "full"
        assert any("only the 'full' mode" in m for m in notifications(app))


async def test_unavailable_features_are_refused_with_a_hint():
    app, holder = scripted_app()
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.press("escape", "f9", "f10", "f3")
        await pilot.pause()
        assert not [c for c in holder["engine"].calls if c[0] == "set_features"]
        msgs = notifications(app)
        assert any("O1 reasoning is unavailable" in m for m in msgs)
        assert any("Ghost KV is unavailable" in m for m in msgs)
        assert any("re-calibration is unavailable" in m for m in msgs)
        notes = {desc: note for _, desc, note in app.help_rows()}
        assert notes["O1 reasoning"] == "not implemented by this engine yet"


async def test_available_feature_toggles_through_the_engine():
    app, holder = scripted_app(features={"o1": True, "ghost_kv": False})
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.press("escape", "f9")
        await pilot.pause()
        assert ("set_features", True, None) in holder["engine"].calls
        assert app.state.enable_o1_reasoning
        assert "+O1" in stats_text(app)


async def test_escape_cancels_and_keeps_what_was_streamed():
    app, holder = scripted_app(hold_after=3)
    async with app.run_test() as pilot:
        await ready(pilot)
        await send(pilot, "go")
        engine = holder["engine"]
        await wait_for(pilot, lambda: engine.held.is_set() and len(app.state.tokens) == 3, what="3 tokens")
        assert app.live.busy
        await pilot.press("escape")
        await idle(pilot)
        end = app.state.last_end
        assert end is not None and end.stop_reason == "cancelled" and end.tokens == 3
        streamed = "".join(s.text for s in SCRIPT[:3])
        assert list(app.query(AssistantBubble))[-1].source == streamed
        assert app.history[-1] == {"role": "assistant", "content": streamed}


async def test_exception_in_inference_thread_is_shown_and_app_keeps_running():
    app, holder = scripted_app(fail_after=2)
    async with app.run_test() as pilot:
        await ready(pilot)
        await send(pilot, "boom")
        await idle(pilot)
        assert any("scripted failure in the inference thread" in n for n in notices(app))
        assert app.history == []  # the failed turn is not resent
        holder["engine"].fail_after = None
        await send(pilot, "again")
        await idle(pilot)
        assert list(app.query(AssistantBubble))[-1].source == full_text()


async def test_prompt_typed_while_loading_waits_for_the_model():
    release = threading.Event()
    holder: dict = {}

    def factory(bus, progress):
        from .scripted import ScriptedEngine

        progress("loading tiny weights")
        release.wait(10)
        holder["engine"] = ScriptedEngine(bus)
        return holder["engine"]

    app = SedacChatApp(config=SedacConfig(), engine_factory=factory, cursor_blink=False)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: "loading tiny weights" in stats_text(app), what="load progress")
        assert "loading" in stats_text(app)
        await send(pilot, "early bird")
        await pilot.pause()
        assert app.pending_prompts == ["early bird"]
        assert [str(b.render()) for b in app.query(UserBubble)] == ["early bird"]
        release.set()
        await ready(pilot)
        await idle(pilot)
        assert holder["engine"].requests[0].messages[-1]["content"] == "early bird"
        assert list(app.query(AssistantBubble))[-1].source == full_text()


async def test_model_load_failure_is_shown_in_the_app():
    def factory(bus, progress):
        raise SedacError("cannot find model 'nope'; pass a local directory")

    app = SedacChatApp(config=SedacConfig(), engine_factory=factory, cursor_blink=False)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.state.status == "error", what="the load error")
        assert any("cannot find model 'nope'" in n for n in notices(app))
        assert "failed to load" in stats_text(app)
        await send(pilot, "still alive?")  # typing keeps working
        await pilot.pause()
        assert [str(b.render()) for b in app.query(UserBubble)] == ["still alive?"]


async def test_session_is_recorded_with_user_messages_and_path_is_shown(tmp_path):
    record = tmp_path / "rec" / "chat.jsonl"
    app, holder = scripted_app(record_path=record)
    async with app.run_test(size=(160, 40)) as pilot:
        await ready(pilot)
        await send(pilot, "record me")
        await idle(pilot)
        assert str(record) in stats_text(app) or record.name in stats_text(app)
    session = read_session(record)
    assert session.header.model == "scripted-8L"
    types = [type(e) for e in session.events]
    assert types[0] is UserMessage and session.events[0].text == "record me"
    assert types.count(TokenEvent) == len(SCRIPT) and types[-1] is GenerationEnd


async def test_default_recording_goes_to_xdg_data_home(tmp_path):
    from sedac_tui.app import default_record_path

    path = default_record_path()
    assert path.parent == tmp_path / "data" / "sedac-chat" / "sessions"
    assert path.suffix == ".jsonl"


async def test_keymap_from_config_remaps_bindings():
    config = SedacConfig()
    config.tui.keymap = {"tau_low_up": "ctrl+up"}
    app, holder = scripted_app(config=config)
    async with app.run_test() as pilot:
        await ready(pilot)
        await pilot.press("escape", "f6")
        await pilot.pause()
        assert holder["engine"].tau_low == 0.5
        await pilot.press("ctrl+up")
        await pilot.pause()
        assert holder["engine"].tau_low == 0.6
        keys = {desc: k for k, desc, _ in app.help_rows()}
        assert keys["Raise tau_low"] == "^↑"


async def test_unknown_keymap_id_is_a_config_error():
    import pytest

    from sedac_core.errors import ConfigError

    config = SedacConfig()
    config.tui.keymap = {"no_such_action": "x"}
    with pytest.raises(ConfigError, match="no_such_action"):
        scripted_app(config=config)


async def test_help_screen_lists_every_binding_and_closes():
    app, _ = scripted_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        await pilot.press("f1")
        await pilot.pause()
        from sedac_tui.widgets import HelpScreen

        assert isinstance(app.screen, HelpScreen)
        descriptions = [d for _, d, _ in app.screen.rows]
        for needed in ("Lower tau_low", "Raise tau_high", "Mode", "O1 reasoning", "Ghost KV", "Theme", "Inspect"):
            assert needed in descriptions
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, HelpScreen)


async def test_inspector_moves_along_tokens():
    app, _ = scripted_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        await send(pilot, "x")
        await idle(pilot)
        await pilot.press("escape", "f2")
        await pilot.pause()
        assert app.screen.has_class("-inspecting")
        assert app.state.selected == len(SCRIPT) - 1
        await pilot.press("left", "left")
        assert app.state.selected == len(SCRIPT) - 3
        text = str(app.query_one("#inspector").render())
        assert f"token {len(SCRIPT) - 2}/{len(SCRIPT)}" in text and "exit layer 7/8" in text
        assert "(gate" not in text
        await pilot.press(*["left"] * (len(SCRIPT) - 3 - 3))  # to " when", whose check at layer 2 the gate spared
        lines = str(app.query_one("#inspector").render()).splitlines()
        assert app.state.selected == 3 and "exit layer 6/8" in lines[1]
        assert [line for line in lines if "(gate: not checked)" in line] == [
            next(line for line in lines if line.startswith("L2 "))]
        await pilot.press("f2")
        assert not app.screen.has_class("-inspecting") and app.state.selected is None


async def test_theme_key_cycles_sedac_themes():
    app, _ = scripted_app()
    async with app.run_test() as pilot:
        await ready(pilot)
        assert app.theme == "sedac-dark"
        await pilot.press("escape", "ctrl+t")
        assert app.theme != "sedac-dark" and app.theme.startswith("sedac-")
        await pilot.press("ctrl+t", "ctrl+t")
        assert app.theme == "sedac-dark"


async def test_palette_offers_the_actions():
    app, holder = scripted_app()
    async with app.run_test() as pilot:
        await ready(pilot)
        titles = [c.title for c in app.get_system_commands(app.screen)]
        for needed in ("Raise tau_low", "Lower tau_high", "Mode", "O1 reasoning", "Help"):
            assert needed in titles
        assert "Step" not in titles  # replay-only actions stay out of live chat
        command = next(c for c in app.get_system_commands(app.screen) if c.title == "Raise tau_low")
        command.callback()  # what the palette does when the entry is chosen, wherever the focus is
        await wait_for(pilot, lambda: holder["engine"].tau_low == 0.6, what="the palette action")


def test_run_chat_refuses_an_unwritable_record_path_before_the_ui_opens(tmp_path, monkeypatch):
    import pytest

    from sedac_core.errors import SessionFileError
    from sedac_tui import app as app_module

    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    monkeypatch.setattr(app_module.SedacChatApp, "run", lambda self: pytest.fail("the UI must not open"))
    with pytest.raises(SessionFileError, match="cannot record"):
        app_module.run_chat(model=None, local=True, config=SedacConfig(), record=blocker / "s.jsonl",
                            no_record=False, theme=None)


def test_run_chat_builds_the_app_from_its_options(tmp_path, monkeypatch):
    from sedac_tui import app as app_module

    opened = {}

    def fake_run(self):
        opened.update(record=self._record_path, theme=self.theme, live=self._engine_factory is not None)

    monkeypatch.setattr(app_module.SedacChatApp, "run", fake_run)
    app_module.run_chat(model=None, local=True, config=SedacConfig(), record=None, no_record=False,
                        theme="sedac-light")
    assert opened["theme"] == "sedac-light" and opened["live"]
    assert opened["record"].parent == tmp_path / "data" / "sedac-chat" / "sessions"
    app_module.run_chat(model=None, local=True, config=SedacConfig(), record=None, no_record=True, theme=None)
    assert opened["record"] is None and opened["theme"] == "sedac-dark"


async def test_panels_collapse_and_come_back():
    app, _ = scripted_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        conversation = app.query_one(Conversation)
        height = conversation.size.height
        await pilot.press("escape", "f12")
        await pilot.pause()
        assert not app.query_one("#panels").display or app.query_one("#panels").size.height == 0
        assert conversation.size.height > height + 5
        await pilot.press("f12")
        await pilot.pause()
        assert conversation.size.height == height


async def test_prompt_sent_during_a_generation_is_answered_after_it():
    app, holder = scripted_app(hold_after=2)
    async with app.run_test() as pilot:
        await ready(pilot)
        engine = holder["engine"]
        await send(pilot, "first")
        await wait_for(pilot, lambda: engine.held.is_set(), what="the first generation to hold")
        await send(pilot, "second")
        await pilot.pause()
        assert app.pending_prompts == ["second"]
        engine.hold_after = None
        app.live._cancel.set()  # release the held generation (it stops as cancelled)
        await idle(pilot)
        assert len(engine.requests) == 2
        assert engine.requests[1].messages[-1] == {"role": "user", "content": "second"}
        assert [b.source for b in app.query(AssistantBubble)][-1] == full_text()


async def test_a_crash_is_one_line_a_failing_exit_and_a_whole_session_file(tmp_path, monkeypatch):
    """An unexpected error in the UI stops the app with its traceback in a file, one line for the CLI (exit code 1),
    and the session recorded up to it still replays."""
    import pytest

    from sedac_core.errors import AppCrashed
    from sedac_tui.app import _raise_if_crashed

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    record = tmp_path / "s.jsonl"
    app, _ = scripted_app(record_path=record)
    boom = RuntimeError("boom in a panel")

    def explode(*_args, **_kwargs):
        raise boom

    with pytest.raises(RuntimeError, match="boom"):  # (run_test re-raises for test frameworks)
        async with app.run_test() as pilot:
            await ready(pilot)
            await send(pilot, "hello")
            await idle(pilot)
            monkeypatch.setattr(app.query_one(StatsBar), "render", explode)
            app.query_one(StatsBar).refresh()
            await pilot.pause(0.2)
    assert app.return_code == 1 and app.crash == "RuntimeError: boom in a panel"
    assert "boom in a panel" in app.crash_log.read_text()
    with pytest.raises(AppCrashed) as info:
        _raise_if_crashed(app, record)
    message = str(info.value)
    assert "\n" not in message and "RuntimeError: boom in a panel" in message and "s.jsonl" in message
    assert info.value.exit_code == 1
    events = read_session(record).events  # the recording is whole and readable
    assert any(isinstance(e, GenerationEnd) for e in events)


def test_the_app_overrides_only_the_textual_internals_it_means_to():
    """A private method of ours that shadows one of Textual's breaks Textual silently (a `_flush` once took the
    place of the one Textual's logging calls). Only the crash hooks are meant to."""
    from textual.app import App

    meant = {"_handle_exception", "_print_error_renderables"}
    ours = {name for name, value in vars(SedacChatApp).items()
            if callable(value) and name.startswith("_") and not name.startswith("__")}
    assert {name for name in ours if hasattr(App, name)} == meant
