"""The view state the panels render: built only from events (live or replayed), so a replay looks like the
original session. The app owns one instance and feeds it events; widgets read it and never mutate it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

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


@dataclass
class ViewState:
    model: str = ""
    num_layers: int = 0
    mode: str = "full"
    tau_low: float = 0.5
    tau_high: float = 4.5
    enable_o1_reasoning: bool = False
    enable_ghost_kv: bool = False
    status: str = "starting"  # loading | ready | generating | calibrating | error | replay | replay-done
    session_file: str | None = None  # None: not recorded
    waiting_prompts: int = 0  # prompts sent that have not started (the app keeps the count)
    tokens: list[TokenEvent] = field(default_factory=list)  # every generated token of the session, in order
    o1_events: list[O1Event] = field(default_factory=list)
    generation_id: int | None = None  # the generation in progress (or the last one)
    running: GenerationStart | None = None  # the generation in progress, with the settings it runs with
    generation_start: int = 0  # index into tokens where the current generation began
    last_end: GenerationEnd | None = None
    selected: int | None = None  # token index shown in the inspector (None: the inspector follows the stream)
    generations: int = 0
    threshold_source: str | None = None  # who moved the thresholds last (user, api, calibration, adaptive...)
    percentiles: Mapping[str, float] | None = None  # the adaptive estimates {p20, p50, p90, n} behind the last move

    # -- feeding -----------------------------------------------------------------------------------
    def apply_header(self, header: SessionStart) -> None:
        self.model = header.model or self.model
        self.num_layers = header.num_layers or self.num_layers
        sedac: Mapping[str, Any] = (header.config or {}).get("sedac", {}) if header.config else {}
        self.mode = str(sedac.get("mode", self.mode))
        self.tau_low = float(sedac.get("entropy_threshold_base", self.tau_low))
        self.tau_high = float(sedac.get("o1_high_entropy_threshold", self.tau_high))
        self.enable_o1_reasoning = bool(sedac.get("enable_o1_reasoning", self.enable_o1_reasoning))
        self.enable_ghost_kv = bool(sedac.get("enable_ghost_kv", self.enable_ghost_kv))

    def apply(self, event: Event) -> None:
        if isinstance(event, SessionStart):
            self.apply_header(event)
        elif isinstance(event, GenerationStart):
            self.generation_id = event.generation_id
            self.generation_start = len(self.tokens)
            self.running = event
            if event.kv_fill:  # (a file before schema 1.2 does not say: the mode changes say it)
                self.mode, self.enable_o1_reasoning = event.mode, event.o1
                self.enable_ghost_kv = event.kv_fill == "ghost"
            else:
                self.mode = event.mode
            self.tau_low, self.tau_high = event.tau_low, event.tau_high
            if event.num_layers:
                self.num_layers = event.num_layers
            self.last_end = None
            self.generations += 1
        elif isinstance(event, TokenEvent):
            self.tokens.append(event)
            if event.num_layers and not self.num_layers:
                self.num_layers = event.num_layers
        elif isinstance(event, O1Event):
            self.o1_events.append(event)
        elif isinstance(event, ThresholdChange):
            self.tau_low, self.tau_high = event.tau_low, event.tau_high
            self.threshold_source = event.source
            if event.source == "adaptive":
                self.percentiles = event.percentiles
        elif isinstance(event, ModeChange):
            self.mode = event.mode
            self.enable_o1_reasoning = event.enable_o1_reasoning
            self.enable_ghost_kv = event.enable_ghost_kv
        elif isinstance(event, GenerationEnd):
            self.last_end = event
            self.running = None

    def pending_settings(self) -> str | None:
        """What the next generation will run with, when a control changed it during this one (mode, O1, Ghost
        KV apply at the generation boundary), as the stats bar shows it; None when nothing waits."""
        run = self.running
        if run is None:
            return None
        changed = run.mode != self.mode
        if run.kv_fill:
            changed |= run.o1 != self.enable_o1_reasoning or (run.kv_fill == "ghost") != self.enable_ghost_kv
        return self.settings_label(self.mode, self.enable_o1_reasoning, self.enable_ghost_kv) if changed else None

    def running_label(self) -> str:
        """The settings the shown generation runs with (or the engine's, between generations)."""
        run = self.running
        if run is not None and run.kv_fill:
            return self.settings_label(run.mode, run.o1, run.kv_fill == "ghost")
        if run is not None:
            return run.mode
        return self.settings_label(self.mode, self.enable_o1_reasoning, self.enable_ghost_kv)

    @staticmethod
    def settings_label(mode: str, o1: bool, ghost_kv: bool) -> str:
        return mode + (" +O1" if o1 else "") + (" +GhostKV" if ghost_kv else "")

    # -- derived numbers (live while a generation runs, authoritative from generation_end) ----------
    @property
    def current_tokens(self) -> list[TokenEvent]:
        return self.tokens[self.generation_start :]

    @property
    def tok_per_s(self) -> float | None:
        if self.last_end is not None:
            return self.last_end.tok_per_s
        toks = self.current_tokens
        total_ms = sum(t.time_ms for t in toks)
        return len(toks) / (total_ms / 1000.0) if toks and total_ms > 0 else None

    @property
    def skip_ratio(self) -> float | None:
        if self.last_end is not None:
            return self.last_end.skip_ratio
        toks = self.current_tokens
        if not toks:
            return None
        skipped = sum(max(0, (t.num_layers or self.num_layers) - t.exit_layer) for t in toks)
        total = sum((t.num_layers or self.num_layers) for t in toks)
        return skipped / total if total else None

    @property
    def avg_exit_layer(self) -> float | None:
        if self.last_end is not None:
            return self.last_end.avg_exit_layer
        toks = self.current_tokens
        return sum(t.exit_layer for t in toks) / len(toks) if toks else None

    def o1_at(self, token: TokenEvent) -> O1Event | None:
        for ev in reversed(self.o1_events):
            if ev.generation_id == token.generation_id and ev.index == token.index:
                return ev
        return None

    def o1_token_keys(self) -> set[tuple[int, int]]:
        return {(ev.generation_id, ev.index) for ev in self.o1_events}

    def window(self, width: int) -> tuple[int, int]:
        """The [start, end) token range the panels show in `width` columns: the newest tokens, or the ones around
        the inspector's selection."""
        n = len(self.tokens)
        width = max(1, width)
        end = n
        if self.selected is not None and self.selected < n - width:
            end = self.selected + 1 + width // 4
        end = min(n, end)
        return max(0, end - width), end
