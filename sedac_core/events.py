"""The event types the engine emits (one small frozen dataclass each, JSON round-trippable) and the thread-safe
EventBus that carries them from the inference thread to the UI, the recorder and anyone else."""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import logging
import math
import types
import typing
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1.2"  # major.minor: bump the major when a field changes meaning, the minor when one is added
# (1.2: a token's entropy_bits may be null; generation_start says o1 and kv_fill)


@dataclass(frozen=True)
class Event:
    type: ClassVar[str] = "event"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        for f in dataclasses.fields(self):
            out[f.name] = _jsonable(getattr(self, f.name))
        return out

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> "Event":
        """Rebuild an event from its JSON dict, checking every field's type against the schema (a wrong type is a
        ValueError that names the field). Unknown fields (from a newer minor version) are ignored. A non-finite
        number where the schema allows null (an old file's NaN entropy) reads as null."""
        etype = data.get("type")
        cls = EVENT_TYPES.get(etype) if isinstance(etype, str) else None
        if cls is None:
            raise ValueError(f"unknown event type {etype!r}")
        hints = _field_types(cls)
        kwargs = {}
        for name, value in data.items():
            if name in hints:
                try:
                    kwargs[name] = _coerce(value, hints[name])
                except _BadValue as exc:
                    raise ValueError(f"bad '{etype}' event: field '{name}' {exc}") from None
        return cls(**kwargs)


class _BadValue(Exception):
    pass


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, hint: Any) -> Any:
    """`value` (from JSON) as the schema type `hint`, or _BadValue saying what was expected."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        if type(None) in args and isinstance(value, float) and not math.isfinite(value) and float in arms:
            return None
        errors = []
        for arm in arms:
            try:
                return _coerce(value, arm)
            except _BadValue as exc:
                errors.append(str(exc))
        if len(errors) == 1 and not errors[0].startswith("is "):  # the right kind with a bad item inside
            raise _BadValue(errors[0])
        wanted = [e.split("expected ", 1)[-1] for e in errors]
        raise _BadValue(f"is {_kind(value)}, expected " + " or ".join(wanted + ["null"] * (type(None) in args)))
    if hint is Any:
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _BadValue(f"is {_kind(value)}, expected a number")
        if not math.isfinite(value):
            raise _BadValue(f"is {value}, expected a finite number")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _BadValue(f"is {_kind(value)}, expected an integer")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise _BadValue(f"is {_kind(value)}, expected true or false")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise _BadValue(f"is {_kind(value)}, expected a string")
        return value
    if origin in (Mapping, dict, collections.abc.Mapping):
        if not isinstance(value, dict):
            raise _BadValue(f"is {_kind(value)}, expected an object")
        key_t, val_t = args or (Any, Any)
        out = {}
        for k, v in value.items():
            if key_t is int:
                try:
                    k = int(k)
                except (TypeError, ValueError):
                    raise _BadValue(f"has key {k!r}, expected integer keys") from None
            out[k] = _coerce(v, val_t)
        return out
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _BadValue(f"is {_kind(value)}, expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        if len(value) != len(args):
            raise _BadValue(f"has {len(value)} items, expected {len(args)}")
        return tuple(_coerce(v, a) for v, a in zip(value, args))
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


@dataclass(frozen=True)
class SessionStart(Event):
    """First line of a session file: what produced it."""

    type: ClassVar[str] = "session_start"
    schema_version: str = SCHEMA_VERSION
    model: str = ""
    num_layers: int = 0
    config: Mapping[str, Any] = field(default_factory=dict)
    created: float = 0.0  # unix time
    app_version: str = ""


@dataclass(frozen=True)
class UserMessage(Event):
    type: ClassVar[str] = "user_message"
    text: str = ""
    time: float = 0.0


@dataclass(frozen=True)
class GenerationStart(Event):
    type: ClassVar[str] = "generation_start"
    generation_id: int = 0
    mode: str = "full"
    prompt_tokens: int = 0
    max_new_tokens: int = 0
    tau_low: float = 0.0
    tau_high: float = 0.0
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    num_layers: int = 0
    time: float = 0.0
    o1: bool = False  # O1 deep reasoning on for this generation
    kv_fill: str = ""  # how this generation fills an exited token's skipped layers (exit mode; "" before 1.2)


@dataclass(frozen=True)
class TokenEvent(Event):
    """One generated token. `exit_layer` is the number of decoder layers that ran for it (= num_layers at full
    depth). `layer_entropies` maps a layer index (1-based: the output of layer i) to the entropy in bits seen
    there, for the layers that were checked (all of them when tracing); `gated_layers` are the checked layers whose
    check the exit gate spared: their value is the gate's estimate."""

    type: ClassVar[str] = "token"
    generation_id: int = 0
    index: int = 0
    token_id: int = 0
    text: str = ""
    exit_layer: int = 0
    num_layers: int = 0
    entropy_bits: float | None = 0.0  # None: not computed (a draft guessed from text, rejected before any head ran)
    confidence: float = 0.0
    decision: str = "full"  # full | exit | o1
    draft: str | None = None  # None | accepted | rejected | verified
    layer_entropies: Mapping[int, float] | None = None
    gated_layers: tuple[int, ...] = ()
    top_tokens: tuple[tuple[str, float], ...] = ()
    time_ms: float = 0.0
    position: int = 0  # absolute position in the sequence (prompt included)


@dataclass(frozen=True)
class O1Event(Event):
    type: ClassVar[str] = "o1"
    generation_id: int = 0
    index: int = 0
    entropy_bits: float = 0.0
    varentropy: float = 0.0
    candidates: tuple[Mapping[str, Any], ...] = ()  # {token_id, text, score, rollout}
    choice: int = 0  # token id committed
    extra_forward_passes: int = 0
    time_ms: float = 0.0


@dataclass(frozen=True)
class ThresholdChange(Event):
    type: ClassVar[str] = "threshold_change"
    tau_low: float = 0.0
    tau_high: float = 0.0
    source: str = "user"  # user | api | config | calibration | adaptive
    time: float = 0.0
    # adaptive only: this session's running final-entropy percentiles {p20, p50, p90, n} behind the change
    percentiles: Mapping[str, float] | None = None


@dataclass(frozen=True)
class ModeChange(Event):
    type: ClassVar[str] = "mode_change"
    mode: str = "full"
    enable_o1_reasoning: bool = False
    enable_ghost_kv: bool = False
    time: float = 0.0


@dataclass(frozen=True)
class Notice(Event):
    """Something the user should know that is not an error (e.g. a fallback that was taken)."""

    type: ClassVar[str] = "notice"
    message: str = ""
    time: float = 0.0


@dataclass(frozen=True)
class GenerationEnd(Event):
    type: ClassVar[str] = "generation_end"
    generation_id: int = 0
    tokens: int = 0
    tok_per_s: float = 0.0
    skip_ratio: float = 0.0
    avg_exit_layer: float = 0.0
    stop_reason: str = ""  # eos | stop_string | max_tokens | cancelled | error
    text: str = ""
    elapsed_s: float = 0.0
    prefill_s: float = 0.0
    o1_triggers: int = 0
    time: float = 0.0
    # lossless mode: tokens drafted, drafts the full model accepted, speculation rounds (verification passes);
    # of the drafts, those copied from the context (prompt lookup) and those guessed from the model's own text
    # (speculative.Continuations), each with how many were accepted; the rest were drafted by the exit heads
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    copied: int = 0
    copied_accepted: int = 0
    own_text: int = 0
    own_text_accepted: int = 0


@dataclass(frozen=True)
class ErrorEvent(Event):
    type: ClassVar[str] = "error"
    message: str = ""
    where: str = ""
    time: float = 0.0


EVENT_TYPES: dict[str, type[Event]] = {
    cls.type: cls
    for cls in (
        SessionStart,
        UserMessage,
        GenerationStart,
        TokenEvent,
        O1Event,
        ThresholdChange,
        ModeChange,
        Notice,
        GenerationEnd,
        ErrorEvent,
    )
}

Subscriber = Callable[[Event], None]


class EventBus:
    """Publish from any thread; subscribers run synchronously in the publisher's thread, so they must be quick
    (hand the event to a queue or `post_message` it). A subscriber that raises is logged and kept."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: list[Subscriber] = []

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def subscribe_queue(self, maxsize: int = 0) -> tuple["queue.Queue[Event]", Callable[[], None]]:
        """A queue that receives every event from now on, and the function that stops it."""
        q: queue.Queue[Event] = queue.Queue(maxsize)
        return q, self.subscribe(q.put)

    def publish(self, event: Event) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for callback in subscribers:
            try:
                callback(event)
            except Exception:  # a broken subscriber must not stop inference
                log.exception("event subscriber %r failed on %s", callback, event.type)
