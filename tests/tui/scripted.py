"""A scripted stand-in for SedacEngine: the same control surface, deterministic events (fixed texts, entropies,
exit layers, times), and hooks to hold a generation mid-stream or fail it."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterator

from sedac_core.config import SedacConfig
from sedac_core.errors import ConfigError, SedacError
from sedac_core.events import (
    Event,
    EventBus,
    GenerationEnd,
    GenerationStart,
    ModeChange,
    O1Event,
    SessionStart,
    ThresholdChange,
    TokenEvent,
)

NUM_LAYERS = 8


@dataclass(frozen=True)
class Step:
    text: str
    entropy_bits: float
    exit_layer: int
    draft: str | None = None
    decision: str = "exit"
    gated: tuple[int, ...] = ()  # layers whose exit check the gate spared


SCRIPT: tuple[Step, ...] = (
    Step("**SEDAC**", 0.3, 3, "accepted"),
    Step(" exits", 0.9, 5, "accepted"),
    Step(" early", 0.2, 2, "rejected"),
    Step(" when", 1.4, 6, gated=(2,)),
    Step(" tokens", 2.6, 8, decision="full"),
    Step(" are", 0.4, 3),
    Step(" easy", 5.1, 8, decision="o1"),
    Step(":\n\n", 1.1, 5),
    Step("```py\n", 0.5, 4),
    Step("x = 1\n", 3.2, 7),
    Step("```\n", 0.1, 2),
    Step("Done.", 0.6, 4, "accepted"),
)


class ScriptedEngine:
    def __init__(self, bus: EventBus, config: SedacConfig | None = None, *, script=SCRIPT,
                 modes: tuple[str, ...] = ("full", "early_exit", "lossless"), hold_after: int | None = None,
                 fail_after: int | None = None, features: dict[str, bool] | None = None,
                 name: str = "scripted-8L") -> None:
        self.bus = bus
        self.config = config or SedacConfig()
        self.script = script
        self.num_layers = NUM_LAYERS
        self._modes = modes
        self._mode = modes[0]
        self._tau_low = self.config.tau_low
        self._tau_high = self.config.tau_high
        self._features = features or {"o1": False, "ghost_kv": False}
        self._o1 = False
        self._ghost = False
        self.hold_after = hold_after
        self.fail_after = fail_after
        self.held = threading.Event()  # set while a generation waits at hold_after
        self.requests: list = []
        self.name = name
        self._gid = 0
        self.calls: list[tuple] = []

    @property
    def available_modes(self) -> tuple[str, ...]:
        return self._modes

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def tau_low(self) -> float:
        return self._tau_low

    @property
    def tau_high(self) -> float:
        return self._tau_high

    @property
    def features(self) -> dict[str, bool]:
        return dict(self._features)

    def set_thresholds(self, tau_low=None, tau_high=None, source="user") -> ThresholdChange:
        self.calls.append(("set_thresholds", tau_low, tau_high))
        hi = self._tau_high if tau_high is None else float(tau_high)
        lo = self._tau_low if tau_low is None else float(tau_low)
        hi = min(max(hi, 0.25), 20.0)
        lo = min(max(lo, 0.2), hi - 0.05)
        self._tau_low, self._tau_high = round(lo, 4), round(hi, 4)
        event = ThresholdChange(tau_low=self._tau_low, tau_high=self._tau_high, source=source, time=1000.0)
        self.bus.publish(event)
        return event

    def set_mode(self, mode: str) -> ModeChange:
        if mode not in self._modes:
            raise ConfigError(f"unknown mode '{mode}'")
        self._mode = mode
        return self._publish_mode()

    def set_features(self, o1=None, ghost_kv=None) -> ModeChange:
        self.calls.append(("set_features", o1, ghost_kv))
        for name, wanted in (("o1", o1), ("ghost_kv", ghost_kv)):
            if wanted and not self._features[name]:
                raise SedacError(f"{name} is not available in this engine yet; it stays off")
        if o1 is not None:
            self._o1 = o1
        if ghost_kv is not None:
            self._ghost = ghost_kv
        return self._publish_mode()

    def _publish_mode(self) -> ModeChange:
        event = ModeChange(mode=self._mode, enable_o1_reasoning=self._o1, enable_ghost_kv=self._ghost, time=1000.0)
        self.bus.publish(event)
        return event

    def session_header(self, app_version: str = "") -> SessionStart:
        cfg = self.config.to_dict()
        cfg["sedac"]["mode"] = self._mode
        return SessionStart(model=self.name, num_layers=self.num_layers, config=cfg, created=1000.0)

    def stream(self, request, cancel: threading.Event | None = None) -> Iterator[Event]:
        self.requests.append(request)
        self._gid += 1
        gid = self._gid
        yield self._emit(GenerationStart(generation_id=gid, mode=self._mode, prompt_tokens=7,
                                         max_new_tokens=request.max_new_tokens, tau_low=self._tau_low,
                                         tau_high=self._tau_high, num_layers=self.num_layers, time=1000.0))
        text = ""
        stop = "eos"
        n = 0
        for index, step in enumerate(self.script):
            if self.fail_after is not None and index == self.fail_after:
                raise RuntimeError("scripted failure in the inference thread")
            if self.hold_after is not None and index == self.hold_after:
                self.held.set()
                if cancel is not None:
                    cancel.wait(10)
            if cancel is not None and cancel.is_set():
                stop = "cancelled"
                break
            layer_entropies = {layer: round(step.entropy_bits + (step.exit_layer - layer) * 0.4, 3)
                               for layer in range(2, step.exit_layer + 1, 2)}
            yield self._emit(TokenEvent(
                generation_id=gid, index=index, token_id=100 + index, text=step.text, exit_layer=step.exit_layer,
                num_layers=self.num_layers, entropy_bits=step.entropy_bits, confidence=0.9 - step.entropy_bits / 10,
                decision=step.decision, draft=step.draft, layer_entropies=layer_entropies,
                gated_layers=step.gated, top_tokens=((step.text, 0.7), ("the", 0.1)), time_ms=50.0, position=7 + index))
            if step.decision == "o1":
                yield self._emit(O1Event(generation_id=gid, index=index, entropy_bits=step.entropy_bits,
                                         varentropy=1.5, candidates=(
                                             {"token_id": 100 + index, "text": step.text, "score": 0.61},
                                             {"token_id": 7, "text": " hard", "score": 0.27},
                                             {"token_id": 8, "text": " simple", "score": 0.12}),
                                         choice=100 + index, extra_forward_passes=3, time_ms=120.0))
            text += step.text
            n += 1
        yield self._emit(GenerationEnd(generation_id=gid, tokens=n, tok_per_s=20.0, skip_ratio=0.375,
                                       avg_exit_layer=5.0, stop_reason=stop, text=text, elapsed_s=n * 0.05,
                                       time=1000.0 + n * 0.05))

    def _emit(self, event: Event) -> Event:
        self.bus.publish(event)
        return event


def full_text(script=SCRIPT) -> str:
    return "".join(s.text for s in script)
