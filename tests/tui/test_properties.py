"""Property tests: every panel, the stats bar, the inspector and the O1 list render from any schema-valid events
(null and zero entropies, huge numbers, empty and unusual text, drafts, O1, odd layer counts) without raising,
and every such event survives a strict-JSON session file."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from sedac_core.events import (
    Event,
    GenerationEnd,
    GenerationStart,
    ModeChange,
    O1Event,
    SessionStart,
    ThresholdChange,
    TokenEvent,
)
from sedac_core.session import event_line
from sedac_tui.widgets import EntropySparkline, ExitHeatmap, O1List, StatsBar, TokenInspector, ViewState
from sedac_tui.widgets.colors import Palette
from sedac_tui.widgets.conversation import _summary

FINITE = st.floats(min_value=0.0, max_value=1e12, allow_nan=False, allow_infinity=False)
ANY_FLOAT = st.one_of(st.just(0.0), FINITE, st.floats(min_value=-1e6, max_value=1e6, allow_nan=False))
LAYERS = st.integers(min_value=0, max_value=80)
TEXT = st.one_of(st.just(""), st.text(max_size=12), st.sampled_from(["\n", "\t", "é", "🙂", "```", "[b]x[/b]", "\x1b[31m"]))

tokens = st.builds(
    TokenEvent,
    generation_id=st.integers(0, 3), index=st.integers(0, 500), token_id=st.integers(0, 300_000), text=TEXT,
    exit_layer=LAYERS, num_layers=LAYERS, entropy_bits=st.one_of(st.none(), FINITE), confidence=ANY_FLOAT,
    decision=st.sampled_from(["full", "exit", "o1"]),
    draft=st.sampled_from([None, "accepted", "rejected", "verified"]),
    layer_entropies=st.one_of(st.none(), st.dictionaries(st.integers(1, 80), FINITE, max_size=6)),
    gated_layers=st.lists(st.integers(1, 80), max_size=3).map(tuple),
    top_tokens=st.lists(st.tuples(TEXT, FINITE), max_size=5).map(tuple),
    time_ms=FINITE, position=st.integers(0, 10_000),
)
o1_events = st.builds(
    O1Event,
    generation_id=st.integers(0, 3), index=st.integers(0, 500), entropy_bits=FINITE, varentropy=FINITE,
    candidates=st.lists(st.fixed_dictionaries({"token_id": st.integers(0, 300_000), "text": TEXT,
                                               "score": ANY_FLOAT, "rollout": TEXT}), max_size=4).map(tuple),
    choice=st.integers(0, 300_000), extra_forward_passes=st.integers(0, 100), time_ms=FINITE,
)
others = st.one_of(
    st.builds(GenerationStart, generation_id=st.integers(0, 3), mode=st.sampled_from(["full", "exit", "lossless"]),
              tau_low=FINITE, tau_high=FINITE, num_layers=LAYERS, o1=st.booleans(),
              kv_fill=st.sampled_from(["", "deferred", "ghost"])),
    st.builds(GenerationEnd, generation_id=st.integers(0, 3), tokens=st.integers(0, 10_000), tok_per_s=FINITE,
              skip_ratio=ANY_FLOAT, avg_exit_layer=ANY_FLOAT, stop_reason=st.sampled_from(["eos", "max_tokens", "",
                                                                                          "cancelled"]),
              text=TEXT, o1_triggers=st.integers(0, 50)),
    st.builds(ThresholdChange, tau_low=FINITE, tau_high=FINITE, source=st.sampled_from(["user", "adaptive"]),
              percentiles=st.one_of(st.none(), st.fixed_dictionaries({"p20": FINITE, "p50": FINITE, "p90": FINITE,
                                                                       "n": FINITE}))),
    st.builds(ModeChange, mode=st.sampled_from(["full", "exit", "lossless"]), enable_o1_reasoning=st.booleans(),
              enable_ghost_kv=st.booleans()),
)
events = st.lists(st.one_of(tokens, tokens, o1_events, others), max_size=60)
sizes = st.tuples(st.integers(1, 140), st.integers(1, 45))
STATUSES = ("loading", "ready", "generating", "calibrating", "error", "replay", "replay-done")


def _render(renderable, width: int) -> None:
    """Render the way the app does: rich to segments at the widget's width (raises on anything unrenderable)."""
    console = Console(width=max(1, width), file=open("/dev/null", "w"), color_system="truecolor")
    list(console.render(renderable))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header_layers=LAYERS, feed=events, size=sizes, selected=st.one_of(st.none(), st.integers(-5, 700)),
       status=st.sampled_from(STATUSES), theme=st.sampled_from([None, {"sedac-easy": "not a colour"}]))
def test_every_widget_renders_any_schema_valid_events(header_layers, feed, size, selected, status, theme):
    state = ViewState()
    state.apply(SessionStart(model="m", num_layers=header_layers))
    for event in feed:
        state.apply(event)
    state.status = status
    n = len(state.tokens)
    state.selected = None if selected is None or not n else min(max(0, selected), n - 1)
    width, height = size
    palette = Palette(theme)
    for panel in (ExitHeatmap(state), EntropySparkline(state)):
        lines = panel.build(width, height, palette)
        for line in lines:
            assert all(isinstance(seg.text, str) for seg in line)
    for widget in (StatsBar(state), TokenInspector(state), O1List(state)):
        _render(widget.render(), width)
    for event in feed:
        if isinstance(event, GenerationEnd):
            _render(_summary(event), width)


@settings(max_examples=100, deadline=None)
@given(event=st.one_of(tokens, o1_events, others))
def test_every_schema_valid_event_survives_a_strict_json_session_line(event):
    line = event_line(event)  # raises on NaN / infinity
    back = Event.from_json(json.loads(line))
    assert type(back) is type(event)
    assert event_line(back) == line
