"""The JSONL session format: one event per line, the first a `session_start` header. The recorder flushes every
line as it is written (a killed app loses nothing already shown); the reader reports malformed lines by number
and tolerates a torn last line (a session cut by a crash)."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from .errors import SessionFileError
from .events import SCHEMA_VERSION, Event, EventBus, SessionStart


def event_line(event: Event) -> str:
    """One event as a strict JSON line: a NaN or infinity is a bug at its source (the schema says null), so it
    raises ValueError here instead of writing a line no JSON reader accepts."""
    return json.dumps(event.to_json(), ensure_ascii=False, separators=(",", ":"), allow_nan=False)


class SessionRecorder:
    """Writes events to a JSONL file. Thread-safe; use as a bus subscriber (`attach`) or call `write`."""

    def __init__(self, path: str | Path, header: SessionStart) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh: IO[str] | None = self.path.open("w", encoding="utf-8")
        except OSError as exc:
            raise SessionFileError(
                f"cannot record to {self.path}: {exc.strerror}; choose a writable path with --record"
            ) from None
        self._lock = threading.Lock()
        self._unsubscribe = None
        self.write(header)

    def write(self, event: Event) -> None:
        line = event_line(event)
        with self._lock:
            if self._fh is None:
                return
            self._fh.write(line + "\n")
            self._fh.flush()

    def attach(self, bus: EventBus) -> "SessionRecorder":
        self._unsubscribe = bus.subscribe(self._on_event)
        return self

    def _on_event(self, event: Event) -> None:
        if not isinstance(event, SessionStart):  # the header was written once, at open
            self.write(event)

    def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None

    def __enter__(self) -> "SessionRecorder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Session:
    header: SessionStart
    events: list[Event] = field(default_factory=list)  # everything after the header
    torn: bool = False  # the last line was cut short and was dropped
    path: Path | None = None


def read_session(path: str | Path) -> Session:
    p = Path(path)
    if not p.exists():
        raise SessionFileError(f"session file not found: {p}; pass the path of a recorded .jsonl session")
    if p.is_dir():
        raise SessionFileError(f"{p} is a directory; pass the path of a recorded .jsonl session file")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise SessionFileError(f"cannot read {p}: {exc.strerror}") from None
    text = raw.decode("utf-8", errors="replace")
    lines = text.split("\n")
    ends_clean = text.endswith("\n")
    if ends_clean:
        lines = lines[:-1]
    if not lines or not lines[0].strip():
        raise SessionFileError(f"{p} is empty, not a SEDAC session; record one with `sedac-chat ask --record FILE`")
    session: Session | None = None
    for number, line in enumerate(lines, start=1):
        is_last = number == len(lines)
        if not line.strip():
            continue
        data = None
        try:
            data = json.loads(line)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            event = Event.from_json(data)
        except (ValueError, json.JSONDecodeError) as exc:
            if is_last and not ends_clean and session is not None:
                session.torn = True  # a crash cut the last write short
                break
            if number == 1 and isinstance(data, dict) and data.get("type") == "session_start":
                raise SessionFileError(f"{p}: malformed line 1 (the session header): {_short(exc)}; fix that line "
                                       "or record the session again") from None
            if number == 1:
                raise SessionFileError(
                    f"{p} is not a SEDAC session (line 1 is not a session header); pass a file written by sedac-chat"
                ) from None
            raise SessionFileError(f"{p}: malformed line {number}: {_short(exc)}; fix or delete that line") from None
        if number == 1:
            if not isinstance(event, SessionStart):
                raise SessionFileError(
                    f"{p} is not a SEDAC session (line 1 is '{event.type}', not a session header)"
                )
            _check_version(p, event.schema_version)
            session = Session(header=event, path=p)
        else:
            assert session is not None
            session.events.append(event)
    assert session is not None
    return session


def _check_version(path: Path, version: str) -> None:
    major = str(version).split(".")[0]
    if major != SCHEMA_VERSION.split(".")[0]:
        raise SessionFileError(
            f"{path} uses session schema {version}, this sedac-chat reads {SCHEMA_VERSION.split('.')[0]}.x; "
            "open it with a matching sedac-chat version"
        )


def _short(exc: Exception) -> str:
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return msg[:120]
