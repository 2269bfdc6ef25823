"""Where the app's events come from: a live engine generating in a worker thread, or a recorded session replayed
with its original pacing. Both publish on an EventBus the app subscribes to, so the widgets cannot tell them
apart; their own state changes (finished, replay position) go to the app through the same `notify` channel."""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from sedac_core.errors import SedacError
from sedac_core.events import ErrorEvent, Event, EventBus, Notice, O1Event, TokenEvent
from sedac_core.session import Session

log = logging.getLogger(__name__)

Notify = Callable[[object], None]


@dataclass(frozen=True)
class SourceFinished:
    """A live generation or a replay ended (after every event it published)."""

    kind: str  # generation | replay
    error: str | None = None
    cancelled: bool = False


@dataclass(frozen=True)
class ReplayProgress:
    position: int  # events published so far
    total: int
    tokens_shown: int
    speed: float
    paused: bool
    finished: bool = False


class LiveSource:
    """Runs `engine.stream()` in a worker thread, one generation at a time, and forwards the app's controls to the
    engine's setters (which publish the resulting events themselves)."""

    def __init__(self, engine: Any, notify: Notify) -> None:
        self.engine = engine
        self._notify = notify
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._running = False  # cleared before SourceFinished goes out, so the app may start the next one at once

    @property
    def bus(self) -> EventBus:
        return self.engine.bus

    @property
    def busy(self) -> bool:
        return self._running

    def start(self, request: Any) -> None:
        with self._lock:
            if self.busy:
                raise RuntimeError("a generation is already running")
            self._cancel = threading.Event()
            self._running = True
            self._thread = threading.Thread(
                target=self._run, args=(request, self._cancel), name="sedac-generate", daemon=True
            )
            self._thread.start()

    def _run(self, request: Any, cancel: threading.Event) -> None:
        seen_error = threading.Event()
        unsubscribe = self.bus.subscribe(lambda ev: seen_error.set() if isinstance(ev, ErrorEvent) else None)
        error: str | None = None
        try:
            for _event in self.engine.stream(request, cancel=cancel):
                pass  # every event also goes out on the bus, which is what the app listens to
        except SedacError as exc:
            error = str(exc)
        except Exception as exc:  # the UI must survive anything the inference thread throws
            log.exception("generation failed")
            error = f"{type(exc).__name__}: {exc}"
        finally:
            unsubscribe()
        if error is not None and not seen_error.is_set():
            self.bus.publish(ErrorEvent(message=error, where="generation", time=time.time()))
        self._running = False
        self._notify(SourceFinished("generation", error=error, cancelled=cancel.is_set()))

    def cancel(self) -> bool:
        """Ask the running generation to stop at the next token boundary. False when nothing runs."""
        if not self.busy:
            return False
        self._cancel.set()
        return True

    def close(self, timeout: float = 5.0) -> None:
        self._cancel.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # -- controls: thin on purpose; the engine validates, clamps and publishes ---------------------
    def set_thresholds(self, tau_low: float | None = None, tau_high: float | None = None) -> Event:
        return self.engine.set_thresholds(tau_low=tau_low, tau_high=tau_high, source="user")

    def set_mode(self, mode: str) -> Event:
        return self.engine.set_mode(mode)

    def set_features(self, o1: bool | None = None, ghost_kv: bool | None = None) -> Event:
        return self.engine.set_features(o1=o1, ghost_kv=ghost_kv)

    def resume_adaptive(self) -> None:
        self.engine.set_adaptive(True)


MIN_SPEED, MAX_SPEED = 0.125, 64.0


class ReplaySource:
    """Publishes a recorded session's events with their original pacing scaled by `speed` (inf: as fast as
    possible). Idle gaps between turns are capped at `max_gap_s` recorded seconds so a replay never stalls on a
    user who walked away. Pause, resume, step (one token) and speed changes take effect immediately."""

    def __init__(self, session: Session, bus: EventBus, notify: Notify, *, speed: float = 1.0,
                 paused: bool = False, max_gap_s: float = 2.0) -> None:
        self.session = session
        self.bus = bus
        self._notify = notify
        self._speed = _clamp_speed(speed)
        self._paused = paused
        self._steps = 0  # tokens still to release while paused
        self._closed = False
        self._cond = threading.Condition()
        self._max_gap_s = max_gap_s
        self._thread: threading.Thread | None = None
        self.position = 0
        self.tokens_shown = 0
        self.finished = False

    # -- controls (any thread) --------------------------------------------------------------------
    @property
    def speed(self) -> float:
        return self._speed

    @property
    def paused(self) -> bool:
        return self._paused

    def set_speed(self, speed: float) -> None:
        with self._cond:
            self._speed = _clamp_speed(speed)
            self._cond.notify_all()
        self._report()

    def faster(self) -> None:
        self.set_speed(self._speed * 2 if math.isfinite(self._speed) else self._speed)

    def slower(self) -> None:
        self.set_speed(self._speed / 2 if math.isfinite(self._speed) else MAX_SPEED)

    def pause(self) -> None:
        with self._cond:
            self._paused = True
            self._cond.notify_all()
        self._report()

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._steps = 0
            self._cond.notify_all()
        self._report()

    def toggle_pause(self) -> None:
        self.resume() if self._paused else self.pause()

    def step(self) -> None:
        """Pause (if playing) and release exactly one more token (plus the non-token events before it)."""
        with self._cond:
            self._paused = True
            self._steps += 1
            self._cond.notify_all()
        self._report()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sedac-replay", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 2.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- the replay thread ------------------------------------------------------------------------
    def _run(self) -> None:
        events = self.session.events
        self.bus.publish(self.session.header)
        self._report()
        for event, delay in zip(events, _delays(events, self._max_gap_s)):
            if not self._wait(delay):
                return
            self.bus.publish(event)
            self.position += 1
            if isinstance(event, TokenEvent):
                self.tokens_shown += 1
                with self._cond:
                    if self._steps > 0:
                        self._steps -= 1
            self._report()
        if self.session.torn:
            self.bus.publish(Notice(message="the session file ends in a torn line (cut by a crash); "
                                            "replayed up to the tear"))
        self.finished = True
        self._report()
        self._notify(SourceFinished("replay"))

    def _wait(self, delay: float) -> bool:
        """Sleep `delay` recorded seconds at the current speed, honouring pause/step; False once closed."""
        remaining = delay
        with self._cond:
            while True:
                if self._closed:
                    return False
                if self._paused and self._steps == 0:
                    self._cond.wait()
                    continue
                if self._steps > 0 or remaining <= 0 or not math.isfinite(self._speed):
                    return True
                started = time.monotonic()
                speed = self._speed
                self._cond.wait(remaining / speed)
                remaining -= (time.monotonic() - started) * speed

    def _report(self) -> None:
        self._notify(ReplayProgress(position=self.position, total=len(self.session.events),
                                    tokens_shown=self.tokens_shown, speed=self._speed, paused=self._paused,
                                    finished=self.finished))


def _clamp_speed(speed: float) -> float:
    if speed <= 0 or math.isinf(speed):
        return math.inf
    return min(MAX_SPEED, max(MIN_SPEED, speed))


def _delays(events: Iterable[Event], max_gap_s: float) -> list[float]:
    """Recorded seconds to wait before each event: a token or O1 step waits its own `time_ms`; an event with a wall
    clock `time` waits for the clock gap since the previous one, less the token time already waited."""
    delays: list[float] = []
    last_time: float | None = None
    waited_since = 0.0
    for event in events:
        if isinstance(event, (TokenEvent, O1Event)):
            d = max(0.0, event.time_ms / 1000.0)
            waited_since += d
        else:
            t = getattr(event, "time", 0.0) or 0.0
            d = 0.0
            if t > 0:
                if last_time is not None:
                    d = min(max_gap_s, max(0.0, t - last_time - waited_since))
                last_time = t
                waited_since = 0.0
        delays.append(min(d, max_gap_s))
    return delays
