"""Events round-trip through JSON; the JSONL session file is flushed per line, read back, and bad files are
reported with their line numbers; a torn last line is tolerated."""

from __future__ import annotations

import json
import threading

import pytest

from sedac_core.engine import GenerationRequest, SedacEngine
from sedac_core.errors import SessionFileError
from sedac_core.events import (
    EVENT_TYPES,
    ErrorEvent,
    EventBus,
    GenerationEnd,
    O1Event,
    SessionStart,
    ThresholdChange,
    TokenEvent,
    UserMessage,
)
from sedac_core.session import SessionRecorder, read_session


def test_every_event_type_round_trips():
    samples = [
        SessionStart(model="m", num_layers=30, config={"sedac": {"mode": "full"}}, created=1.5),
        UserMessage(text="héllo", time=2.0),
        TokenEvent(index=3, token_id=42, text=" Paris", exit_layer=18, num_layers=30, entropy_bits=0.25,
                   confidence=0.9, decision="exit", draft="accepted", layer_entropies={6: 3.5, 12: 1.25},
                   top_tokens=(("Paris", 0.9), ("Lyon", 0.05)), time_ms=12.5),
        O1Event(index=4, entropy_bits=5.5, varentropy=2.0,
                candidates=({"token_id": 1, "text": "a", "score": -0.5, "rollout": "a b"},), choice=1),
        ThresholdChange(tau_low=0.4, tau_high=4.0, source="user", time=3.0),
        GenerationEnd(tokens=10, tok_per_s=20.0, skip_ratio=0.3, avg_exit_layer=21.0, stop_reason="eos"),
        ErrorEvent(message="boom", where="engine"),
    ]
    for event in samples:
        data = json.loads(json.dumps(event.to_json()))
        assert type(event).from_json(data) == event
    assert {type(e).type for e in samples} <= set(EVENT_TYPES)


def test_unknown_fields_from_a_newer_minor_version_are_ignored():
    data = UserMessage(text="x").to_json() | {"new_field": 1}
    assert UserMessage.from_json(data) == UserMessage(text="x")


def test_bus_is_thread_safe_and_survives_a_broken_subscriber():
    bus = EventBus()
    got = []
    lock = threading.Lock()

    def good(e):
        with lock:
            got.append(e)

    bus.subscribe(lambda e: 1 / 0)
    unsubscribe = bus.subscribe(good)
    threads = [threading.Thread(target=lambda: [bus.publish(UserMessage(text=str(i))) for i in range(100)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 400
    unsubscribe()
    bus.publish(UserMessage(text="late"))
    assert len(got) == 400


def test_recorder_writes_a_session_the_reader_loads(tmp_path, tiny_llama_bundle):
    engine = SedacEngine(tiny_llama_bundle)
    path = tmp_path / "s.jsonl"
    rec = SessionRecorder(path, engine.session_header("test")).attach(engine.bus)
    engine.bus.publish(UserMessage(text="Hello"))
    result = engine.generate(GenerationRequest(prompt="Hello", max_new_tokens=6, ignore_eos=True))
    # flushed per line: readable before close
    lines = path.read_text().splitlines()
    assert len(lines) == 1 + 1 + len(result.events)
    rec.close()
    session = read_session(path)
    assert session.header.model == "tiny-llama" and session.header.num_layers == 4
    assert session.header.config["sedac"]["mode"] == "full"
    assert session.events[0] == UserMessage(text="Hello")
    assert session.events[1:] == result.events
    assert not session.torn


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


def test_torn_last_line_is_tolerated(tmp_path):
    header = json.dumps(SessionStart(model="m").to_json())
    tok = json.dumps(TokenEvent(index=0, text="a").to_json())
    p = tmp_path / "torn.jsonl"
    p.write_text(header + "\n" + tok + "\n" + tok[: len(tok) // 2])
    s = read_session(p)
    assert s.torn and len(s.events) == 1


def test_malformed_line_reports_its_number(tmp_path):
    header = json.dumps(SessionStart(model="m").to_json())
    tok = json.dumps(TokenEvent(index=0, text="a").to_json())
    p = tmp_path / "bad.jsonl"
    _write(p, [header, tok, "{not json", tok])
    with pytest.raises(SessionFileError, match="malformed line 3"):
        read_session(p)
    _write(p, [header, json.dumps({"type": "mystery"})])
    with pytest.raises(SessionFileError, match="malformed line 2: unknown event type 'mystery'"):
        read_session(p)


@pytest.mark.parametrize(
    "content, match",
    [
        ("", "empty, not a SEDAC session"),
        ("hello world\n", "not a SEDAC session"),
        (json.dumps(UserMessage(text="x").to_json()) + "\n", "line 1 is 'user_message'"),
        (json.dumps(SessionStart(schema_version="9.0").to_json()) + "\n", "schema 9.0"),
    ],
)
def test_files_that_are_not_sessions(tmp_path, content, match):
    p = tmp_path / "x.jsonl"
    p.write_text(content)
    with pytest.raises(SessionFileError, match=match):
        read_session(p)


def test_missing_session_file(tmp_path):
    with pytest.raises(SessionFileError, match="not found"):
        read_session(tmp_path / "none.jsonl")


def test_an_old_file_with_nan_entropy_still_opens(tmp_path):
    """Sessions recorded before 1.2 hold a rejected guess's entropy as NaN (not JSON, but Python wrote it): the
    reader opens them and reads that entropy as null."""
    path = tmp_path / "old.jsonl"
    header = {"type": "session_start", "schema_version": "1.1", "model": "m", "num_layers": 8}
    token = {"type": "token", "generation_id": 1, "index": 0, "token_id": 5, "text": "", "exit_layer": 8,
             "num_layers": 8, "entropy_bits": float("nan"), "draft": "rejected"}
    path.write_text(json.dumps(header) + "\n" + json.dumps(token) + "\n")  # json.dumps writes NaN
    (event,) = read_session(path).events
    assert isinstance(event, TokenEvent) and event.entropy_bits is None


@pytest.mark.parametrize("field, value, expected", [
    ("entropy_bits", "high", "expected a number or null"),
    ("exit_layer", "thirty", "expected an integer"),
    ("exit_layer", True, "expected an integer"),
    ("layer_entropies", {"x": 1.0}, "integer keys"),
    ("top_tokens", [["a", "b"]], "expected a number"),
    ("confidence", float("inf"), "finite"),
])
def test_a_field_of_the_wrong_type_is_named_with_its_line(tmp_path, field, value, expected):
    path = tmp_path / "typed.jsonl"
    header = {"type": "session_start", "model": "m", "num_layers": 8}
    token = {"type": "token", "generation_id": 1, "index": 0, "text": "x", field: value}
    path.write_text(json.dumps(header) + "\n" + json.dumps(token) + "\n")
    with pytest.raises(SessionFileError, match=rf"line 2: .*'{field}'.*{expected}"):
        read_session(path)


def test_a_header_whose_config_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "header.jsonl"
    path.write_text(json.dumps({"type": "session_start", "config": "notadict", "num_layers": "thirty"}) + "\n")
    with pytest.raises(SessionFileError, match=r"line 1 \(the session header\): .*.config. is a string"):
        read_session(path)


def test_the_recorder_refuses_nan_instead_of_writing_it(tmp_path):
    with SessionRecorder(tmp_path / "s.jsonl", SessionStart(model="m", num_layers=8)) as rec:
        with pytest.raises(ValueError):
            rec.write(TokenEvent(entropy_bits=float("nan")))
