"""Adaptive thresholds (sedac.adaptive_threshold): the online percentile estimator, and the engine moving tau_high
(and an uncalibrated tau_low) from the running session, every N tokens, paused by a manual change."""

from __future__ import annotations

import random

import pytest
import torch

from sedac_core.calibration import AdaptiveThresholds, OnlinePercentiles
from sedac_core.config import SedacConfig
from sedac_core.engine import GenerationRequest, SedacEngine
from sedac_core.events import Event, ThresholdChange, TokenEvent


def test_percentiles_match_torch_quantile_on_synthetic_data():
    rng = random.Random(0)
    values = [rng.expovariate(0.8) for _ in range(3000)]
    est = OnlinePercentiles(window=4096)
    for v in values:
        est.add(v)
    want = torch.quantile(torch.tensor(values, dtype=torch.float64), torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64))
    assert est.percentiles((0.2, 0.5, 0.9)) == pytest.approx(want.tolist(), abs=1e-9)
    # exponential(rate 0.8): P50 = ln 2 / 0.8, P90 = ln 10 / 0.8
    assert est.percentiles((0.5,))[0] == pytest.approx(0.866, rel=0.08)
    assert est.percentiles((0.9,))[0] == pytest.approx(2.878, rel=0.08)


def test_percentiles_keep_a_bounded_window_that_follows_drift():
    est = OnlinePercentiles(window=100)
    for _ in range(500):
        est.add(0.1)
    for _ in range(100):
        est.add(5.0)
    assert len(est) == 100 and est.count == 600  # bounded memory, lifetime count kept
    assert est.percentiles((0.2, 0.9)) == (5.0, 5.0)  # only the recent values remain
    est.add(float("nan"))
    est.add(float("inf"))
    assert est.count == 600  # non-finite values are ignored
    with pytest.raises(ValueError):
        OnlinePercentiles().percentiles((0.5,))


def test_adaptive_proposes_at_most_every_n_and_only_when_a_value_moves():
    ad = AdaptiveThresholds(every=10, min_samples=20, tolerance=0.05)
    proposals = []
    for i in range(100):
        ad.observe(float(i % 10))  # P50 = 4.5, P90 = 8.1
        proposals.append(ad.propose(tau_low=0.5, tau_high=4.5, move_tau_low=False))
    made = [i for i, p in enumerate(proposals) if p is not None]
    assert made and made[0] == 19 and all(b - a >= 10 for a, b in zip(made, made[1:]))
    first = proposals[made[0]]
    assert first.tau_low is None and first.tau_high == pytest.approx(8.1)  # a calibrated tau_low stays
    assert first.percentiles["p50"] == pytest.approx(4.5) and first.percentiles["n"] == 20
    # already at the estimate: nothing to publish
    ad2 = AdaptiveThresholds(every=10, min_samples=10)
    for i in range(10):
        ad2.observe(float(i % 10))
    assert ad2.propose(tau_low=4.5, tau_high=8.1, move_tau_low=True) is None


def _changes(events: list[Event]) -> list[ThresholdChange]:
    return [e for e in events if isinstance(e, ThresholdChange)]


def _engine(bundle, adaptive: bool = True) -> SedacEngine:
    cfg = SedacConfig()
    cfg.sedac.adaptive_threshold = adaptive
    engine = SedacEngine(bundle, cfg)
    if engine._adaptive is not None:  # a short test: adapt after 16 tokens, every 8
        engine._adaptive = AdaptiveThresholds(every=8, min_samples=16, tolerance=0.0)
    return engine


def test_engine_publishes_adaptive_changes_every_n_tokens(tiny_llama_bundle):
    engine = _engine(tiny_llama_bundle)
    seen: list[Event] = []
    engine.bus.subscribe(seen.append)
    events = list(engine.stream(GenerationRequest(prompt="Hello", max_new_tokens=40, ignore_eos=True)))
    changes = _changes(events)
    assert changes and _changes(seen) == changes  # yielded in the stream and published on the bus
    assert all(c.source == "adaptive" and c.percentiles is not None for c in changes)
    assert len(changes) <= (40 - 16) // 8 + 1  # not every token
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    entropies = sorted(t.entropy_bits for t in tokens[:16])
    last = changes[-1]
    # uncalibrated (no exit heads): tau_low follows P50, tau_high P90 of the tokens' final entropy
    assert last.tau_high == pytest.approx(last.percentiles["p90"], abs=1e-3)
    assert last.tau_low == pytest.approx(max(last.percentiles["p50"], engine._tau_floor), abs=1e-3)
    assert changes[0].percentiles["n"] == 16 and changes[0].percentiles["p20"] >= entropies[0]
    assert engine.tau_low == last.tau_low and engine.tau_high == last.tau_high
    # applied from the next token: the change comes right after a token event, and the next token follows it
    i = events.index(changes[0])
    assert isinstance(events[i - 1], TokenEvent) and events[i - 1].index == 15


def test_adaptive_off_publishes_nothing(tiny_llama_bundle):
    engine = _engine(tiny_llama_bundle, adaptive=False)
    result = engine.generate(GenerationRequest(prompt="Hello", max_new_tokens=40, ignore_eos=True))
    assert _changes(result.events) == [] and engine.adaptive_paused is None


def test_a_manual_change_pauses_adaptation_until_resumed(tiny_llama_bundle):
    engine = _engine(tiny_llama_bundle)
    engine.set_thresholds(tau_low=0.3, tau_high=7.0)  # the user's choice wins
    assert engine.adaptive_paused is True
    result = engine.generate(GenerationRequest(prompt="Hello", max_new_tokens=40, ignore_eos=True))
    assert _changes(result.events) == []
    assert (engine.tau_low, engine.tau_high) == (0.3, 7.0)
    engine.set_adaptive(True)  # resume: what was observed meanwhile is kept
    assert engine.adaptive_paused is False
    result = engine.generate(GenerationRequest(prompt="Hello", max_new_tokens=9, ignore_eos=True))
    assert [c.source for c in _changes(result.events)] == ["adaptive"]


def test_a_calibrated_tau_low_stays_and_only_tau_high_moves(tiny_llama_bundle):
    engine = _engine(tiny_llama_bundle)
    engine.set_thresholds(tau_low=0.25, tau_high=4.5, source="calibration")  # not manual: adaptation continues
    result = engine.generate(GenerationRequest(prompt="Hello", max_new_tokens=40, ignore_eos=True))
    changes = _changes(result.events)
    assert changes and all(c.tau_low == 0.25 for c in changes)
    assert changes[-1].tau_high == pytest.approx(max(changes[-1].percentiles["p90"], 0.3), abs=1e-3)


def test_teacher_forcing_does_not_adapt(tiny_llama_bundle):
    engine = _engine(tiny_llama_bundle)
    result = engine.generate(GenerationRequest(prompt="Hello", max_new_tokens=40, forced_tokens=[5] * 40,
                                               ignore_eos=True))
    assert _changes(result.events) == []


def test_resuming_after_a_hand_set_tau_low_moves_only_tau_high(tiny_llama_bundle):
    """After a tau_low set by hand, resuming adaptation lets tau_high follow P90 again and leaves tau_low where the
    person put it (the app's notice says exactly that)."""
    engine = _engine(tiny_llama_bundle)
    assert engine.adaptive_moves_tau_low  # the config's defaults follow the session
    engine.set_thresholds(tau_low=0.3, source="user")
    engine.set_adaptive(True)
    assert not engine.adaptive_moves_tau_low
    result = engine.generate(GenerationRequest(prompt="Hello", max_new_tokens=40, ignore_eos=True))
    changes = _changes(result.events)
    assert changes and all(c.tau_low == 0.3 for c in changes) and engine.tau_low == 0.3


def test_swapping_exit_heads_waits_for_the_generation_in_progress(tiny_llama_bundle):
    """Exit heads (and with them the gate, the decision head and the calibration) swapped from another thread while
    an answer streams take effect after it: the answer runs on what it began with."""
    import threading

    from conftest import make_exit_heads
    from sedac_core.events import GenerationEnd, TokenEvent

    engine = SedacEngine(tiny_llama_bundle)
    engine.use_exit_heads(make_exit_heads(tiny_llama_bundle, [1, 2]))
    engine.set_thresholds(tau_low=19.0, tau_high=19.9)  # every checked layer exits
    request = GenerationRequest(prompt="Hello", max_new_tokens=10, mode="exit", ignore_eos=True)
    alone = [(t.token_id, t.exit_layer) for t in engine.generate(request).token_events]
    assert min(layer for _, layer in alone) == 1
    engine.reset()
    swapped = threading.Event()
    seen = []
    for event in engine.stream(request):
        seen.append(event)
        if isinstance(event, TokenEvent) and event.index == 2:
            threading.Thread(target=lambda: (engine.use_exit_heads(None), swapped.set()), daemon=True).start()
            assert not swapped.wait(0.3)  # held until the generation ends
    assert isinstance(seen[-1], GenerationEnd)
    assert [(t.token_id, t.exit_layer) for t in seen if isinstance(t, TokenEvent)] == alone
    assert swapped.wait(5) and engine.exit_heads is None
