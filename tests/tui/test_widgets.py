"""The panels render what the events say: exit marks, skipped layers, draft outcomes, O1 marks, tau levels."""

from __future__ import annotations

from sedac_core.events import GenerationStart, O1Event, SessionStart, TokenEvent
from sedac_tui.app import EventsAvailable
from sedac_tui.widgets import EntropySparkline, ExitHeatmap, ViewState
from sedac_tui.widgets.heatmap import COMPUTED, EXIT_MARK, SKIPPED

from .helpers import scripted_app


def _tok(index, exit_layer, entropy, draft=None, decision="exit"):
    return TokenEvent(generation_id=1, index=index, text=f"t{index}", exit_layer=exit_layer, num_layers=8,
                      entropy_bits=entropy, draft=draft, decision=decision)


def test_events_available_coalesces_only_with_its_own_kind():
    from textual.message import Message

    assert EventsAvailable().can_replace(EventsAvailable())
    assert not EventsAvailable().can_replace(Message())


def test_layer_rows_cover_every_layer_once():
    state = ViewState(num_layers=30)
    heatmap = ExitHeatmap(state)
    for rows in (1, 4, 7, 30, 50):
        groups = heatmap.layer_rows(rows)
        covered = [layer for first, last in groups for layer in range(first, last + 1)]
        assert covered == list(range(1, 31)) and len(groups) == min(rows, 30)


async def test_heatmap_marks_exit_skipped_and_drafts():
    app, _ = scripted_app()
    async with app.run_test(size=(120, 40)) as pilot:
        state = app.state
        for event in (SessionStart(model="m", num_layers=8), GenerationStart(generation_id=1, num_layers=8),
                      _tok(0, 3, 0.2, draft="accepted"), _tok(1, 8, 6.0, decision="o1"),
                      _tok(2, 5, 1.0, draft="rejected"),
                      O1Event(generation_id=1, index=1, entropy_bits=6.0)):
            state.apply(event)
        app._refresh_panels()
        await pilot.pause()
        lines = app.query_one(ExitHeatmap).plain().split("\n")
        header, rows = lines[0], lines[1:]
        assert len(rows) == 8  # one row per layer when there is room
        gutter = len("L8") + 1
        cols = [[row[gutter + c] for row in rows] for c in range(3)]
        assert cols[0] == [COMPUTED, COMPUTED, EXIT_MARK] + [SKIPPED] * 5
        assert cols[1] == [COMPUTED] * 7 + [EXIT_MARK]
        assert cols[2] == [COMPUTED] * 4 + [EXIT_MARK] + [SKIPPED] * 3
        assert header[gutter:gutter + 3] == "✓◆✗"


async def test_sparkline_draws_tau_levels_and_o1_marks():
    app, _ = scripted_app()
    async with app.run_test(size=(120, 40)) as pilot:
        state = app.state
        state.apply(SessionStart(model="m", num_layers=8))
        state.apply(_tok(0, 8, 0.1))
        state.apply(_tok(1, 8, 2.0, decision="o1"))
        app._refresh_panels()
        await pilot.pause()
        text = app.query_one(EntropySparkline).plain()
        chart, legend = text.rsplit("\n", 1)
        assert chart.count("╌") > 20  # both levels run across the empty part of the chart
        assert "tau_low 0.50" in legend and "tau_high 4.50" in legend
        state.tau_low, state.tau_high = 0.3, 2.5  # a threshold change redraws the levels
        app._refresh_panels()
        await pilot.pause()
        assert "tau_high 2.50" in app.query_one(EntropySparkline).plain()
