"""The app on a real SedacEngine driving the tiny random Llama from tests/conftest.py."""

from __future__ import annotations

from sedac_core.config import SedacConfig
from sedac_core.events import GenerationEnd, ThresholdChange, TokenEvent, UserMessage
from sedac_core.session import read_session
from sedac_tui.app import SedacChatApp
from sedac_tui.widgets import StatsBar
from sedac_tui.widgets.conversation import AssistantBubble

from .helpers import idle, ready, send


def engine_app(bundle, config: SedacConfig, **kwargs) -> SedacChatApp:
    from sedac_core.engine import SedacEngine

    def factory(bus, progress):
        progress("tiny model")
        return SedacEngine(bundle, config, bus)

    return SedacChatApp(config=config, engine_factory=factory, cursor_blink=False, **kwargs)


async def test_real_engine_streams_an_answer_and_takes_threshold_keys(tiny_llama_bundle, tmp_path):
    config = SedacConfig()
    config.generation.max_new_tokens = 12
    record = tmp_path / "real.jsonl"
    app = engine_app(tiny_llama_bundle, config, record_path=record)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        assert app.state.num_layers == app.engine.num_layers == 4
        await send(pilot, "Hello")
        await idle(pilot)
        end = app.state.last_end
        assert end is not None and end.stop_reason in ("eos", "max_tokens") and end.tokens >= 1
        assert len(app.state.tokens) == end.tokens
        assert all(t.exit_layer == 4 for t in app.state.tokens)  # full mode runs every layer
        assert list(app.query(AssistantBubble))[-1].source == end.text
        await pilot.press("escape", "right_square_bracket", "right_curly_bracket")
        await pilot.pause()
        assert app.engine.tau_low == 0.6 and app.engine.tau_high == 4.75
        stats = str(app.query_one(StatsBar).render())
        assert "tau_low 0.60" in stats and "tau_high 4.75" in stats and "tiny-llama" in stats
        await pilot.press("m")  # cycles through the engine's modes
        await pilot.pause()
        assert app.engine.mode == "exit" and "mode exit" in str(app.query_one(StatsBar).render())
        await pilot.press("m")
        await pilot.pause()
        assert app.engine.mode == "full"
    session = read_session(record)
    kinds = [type(e) for e in session.events]
    assert kinds[0] is UserMessage and GenerationEnd in kinds and ThresholdChange in kinds
    assert kinds.count(TokenEvent) == end.tokens


async def test_real_engine_too_long_prompt_is_an_error_in_the_app(tiny_llama_bundle):
    from sedac_tui.widgets.conversation import NoticeLine

    app = engine_app(tiny_llama_bundle, SedacConfig())
    async with app.run_test() as pilot:
        await ready(pilot)
        app.query_one("#prompt").value = "word " * 400
        app.query_one("#prompt").focus()
        await pilot.press("enter")
        await idle(pilot)
        errors = [str(n.render()) for n in app.query(NoticeLine) if n.has_class("-error")]
        assert errors and "context window" in errors[0]
        assert app.history == []
