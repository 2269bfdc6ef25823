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
        await pilot.press("escape", "f6", "f8")
        await pilot.pause()
        assert app.engine.tau_low == 0.6 and app.engine.tau_high == 4.75
        stats = str(app.query_one(StatsBar).render())
        assert "tau_low 0.60" in stats and "tau_high 4.75" in stats and "tiny-llama" in stats
        await pilot.press("f4")  # cycles through the engine's modes
        await pilot.pause()
        assert app.engine.mode == "exit" and "mode exit" in str(app.query_one(StatsBar).render())
        await pilot.press("f4")
        await pilot.pause()
        assert app.engine.mode == "lossless" and "mode lossless" in str(app.query_one(StatsBar).render())
        await pilot.press("f4")
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


async def test_lossless_mode_in_the_app_shows_drafts_and_the_full_models_answer():
    import dataclasses

    from conftest import make_bundle, make_exit_heads
    from sedac_core.engine import GenerationRequest, SedacEngine
    from sedac_tui.widgets.heatmap import ExitHeatmap

    bundle = make_bundle("llama", layers=6, seed=3)
    config = SedacConfig()
    config.sedac.mode = "lossless"
    config.generation.max_new_tokens = 24
    config.lossless = dataclasses.replace(config.lossless, exit_draft_entropy=32.0, full_draft_entropy=0.0)
    engines = []

    def factory(bus, progress):
        engine = SedacEngine(bundle, config, bus)
        engine.use_exit_heads(make_exit_heads(bundle, [2, 4]), apply_calibration=False)
        engines.append(engine)
        return engine

    app = SedacChatApp(config=config, engine_factory=factory, cursor_blink=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        await send(pilot, "Hello")
        await idle(pilot)
        end = app.state.last_end
        assert end is not None and end.rounds >= 1 and end.drafted > end.accepted
        drafts = {t.draft for t in app.state.tokens}
        assert {"accepted", "rejected", "verified"} <= drafts
        heat = app.query_one(ExitHeatmap).plain()
        assert "✓" in heat and "✗" in heat
        answer = list(app.query(AssistantBubble))[-1].source
    engine = engines[0]
    engine.reset()
    full = engine.generate(GenerationRequest(prompt="Hello", max_new_tokens=24, mode="full"))
    assert answer == full.generated_text == end.text


async def test_resume_adaptive_thresholds_key_and_the_adaptive_readout(tiny_llama_bundle):
    config = SedacConfig()
    app = engine_app(tiny_llama_bundle, config)
    async with app.run_test(size=(160, 40)) as pilot:
        await ready(pilot)
        assert app.engine.adaptive_paused is False
        await pilot.press("escape", "ctrl+g")
        await pilot.pause()
        assert any("already on" in n.message for n in app._notifications)
        await pilot.press("f8")  # a threshold set by hand pauses adaptation
        await pilot.pause()
        assert app.engine.adaptive_paused is True
        assert "=P90" not in str(app.query_one(StatsBar).render())
        await pilot.press("ctrl+g")
        await pilot.pause()
        assert app.engine.adaptive_paused is False
        assert any("resumed" in n.message for n in app._notifications)
        app.bus.publish(ThresholdChange(tau_low=0.5, tau_high=4.91, source="adaptive", time=1.0,
                                        percentiles={"p20": 0.57, "p50": 1.98, "p90": 4.91, "n": 512}))
        await pilot.pause()
        stats = str(app.query_one(StatsBar).render())
        assert "tau_high 4.91 =P90" in stats and "P20 0.57 P50 1.98 over 512 tok" in stats


async def test_resume_adaptive_is_refused_when_the_config_turns_it_off(tiny_llama_bundle):
    config = SedacConfig()
    config.sedac.adaptive_threshold = False
    app = engine_app(tiny_llama_bundle, config)
    async with app.run_test(size=(160, 40)) as pilot:
        await ready(pilot)
        await pilot.press("escape", "ctrl+g")
        await pilot.pause()
        assert app.engine.adaptive_paused is None
        assert any("off in the config (sedac.adaptive_threshold)" in n.message for n in app._notifications)
        notes = {desc: note for _, desc, note in app.help_rows()}
        assert notes["Resume adaptive thresholds"] == "off in the config (sedac.adaptive_threshold)"


async def test_exit_mode_in_the_app_keeps_a_conversation_on_the_true_kv():
    """Exit mode with the deferred KV fill over two turns in the app: tokens exit, at most MAX_PENDING wait for
    their upper layers, and the second turn, which reuses the first turn's cache, answers as a fresh engine does
    that prefills the whole conversation (so the reused K/V were the true ones)."""
    from conftest import make_bundle, make_exit_heads
    from sedac_core.engine import MAX_PENDING, GenerationRequest, SedacEngine

    bundle = make_bundle("llama", layers=6, seed=3)
    config = SedacConfig()
    config.sedac.mode = "exit"
    config.sedac.adaptive_threshold = False
    config.generation.max_new_tokens = 20
    engines = []

    def factory(bus, progress):
        engine = SedacEngine(bundle, config, bus)
        engine.use_exit_heads(make_exit_heads(bundle, [2, 4]), apply_calibration=False)  # every check exits
        engines.append(engine)
        return engine

    app = SedacChatApp(config=config, engine_factory=factory, cursor_blink=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        assert app.engine.kv_fill == "deferred"
        for prompt in ("Hello", "Tell me more"):
            await send(pilot, prompt)
            await idle(pilot)
        layers = [t.exit_layer for t in app.state.tokens]
        answers = [b.source for b in app.query(AssistantBubble)]
    assert 2 in layers and 6 in layers  # exits at layer 2, and full-depth tokens that complete the waiting rows
    assert max(len(run) for run in "".join("e" if l == 2 else "f" for l in layers).split("f")) <= MAX_PENDING
    assert not engines[0]._pending  # every turn ends with the cache complete
    # the same conversation on fresh engines: the second one prefills the first turn at full depth
    fresh = SedacEngine(bundle, config)
    fresh.use_exit_heads(make_exit_heads(bundle, [2, 4]), apply_calibration=False)
    first = fresh.generate(GenerationRequest(prompt="Hello", max_new_tokens=20))
    assert first.generated_text == answers[0]
    fresh = SedacEngine(bundle, config)
    fresh.use_exit_heads(make_exit_heads(bundle, [2, 4]), apply_calibration=False)
    second = fresh.generate(GenerationRequest(messages=[
        {"role": "user", "content": "Hello"}, {"role": "assistant", "content": answers[0]},
        {"role": "user", "content": "Tell me more"}], max_new_tokens=20))
    assert second.generated_text == answers[1]
