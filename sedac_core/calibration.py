"""AutoCalibrator: from per-layer statistics of the exit signal on calibration data, set the thresholds.

Two ways: (a) percentiles, as SEDAC users know them (entropy_threshold_min -> P20, entropy_threshold_base -> P50
of the exit signal, o1_high_entropy_threshold -> P90 of the final entropy); (b), the default, a target agreement:
the loosest tau_low whose exits still agree with the full model at least `target` of the time. Online, during a
session (`sedac.adaptive_threshold`): running percentiles of the final entropy (AdaptiveThresholds)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class LayerStats:
    """For one checked layer, over N calibration tokens: the exit signal (estimated entropy, bits) and whether
    that layer's exit token equals the full model's."""

    predicted: torch.Tensor  # [N]
    agree: torch.Tensor  # [N] bool
    gate: torch.Tensor | None = None  # [N] the gate's estimate of `predicted` from the raw hidden state (bits)


@dataclass
class Calibration:
    tau_low: float
    tau_high: float
    entropy_threshold_min: float
    method: str
    target_agreement: float | None
    min_layer: int
    agreement: float  # on the data it was fitted on
    skip_ratio: float
    oracle_skip_ratio: float
    layer_offsets: dict[int, float] = field(default_factory=dict)
    sweep: list[dict[str, float]] = field(default_factory=list)
    signal: str = "probe"  # the exit signal: the probe's estimated entropy, or "reduced" (see exits.exit_stats)
    decision_vocab_size: int | None = None  # "reduced": how many ids its vocabulary has (before context tokens)
    check_layers: list[int] | None = None  # the layers worth checking (None: every exit head's layer)
    # the gate: a layer's check runs only for tokens whose gate estimate is below tau_low + offset + this margin
    # (bits; none: every token reaching a checked layer is checked)
    gate_margins: dict[int, float] = field(default_factory=dict)
    checks_per_token: float | None = None  # how many checks run per token (on the calibration data)

    def to_meta(self) -> dict[str, Any]:
        return {
            "tau_low": self.tau_low, "tau_high": self.tau_high, "entropy_threshold_min": self.entropy_threshold_min,
            "method": self.method, "target_agreement": self.target_agreement, "min_layer": self.min_layer,
            "agreement": self.agreement, "skip_ratio": self.skip_ratio, "oracle_skip_ratio": self.oracle_skip_ratio,
            "layer_offsets": {str(k): v for k, v in self.layer_offsets.items()}, "sweep": self.sweep,
            "signal": self.signal, "decision_vocab_size": self.decision_vocab_size, "check_layers": self.check_layers,
            "gate_margins": {str(k): v for k, v in self.gate_margins.items()}, "checks_per_token": self.checks_per_token,
        }


@dataclass
class Routing:
    """How `route` sent N calibration tokens: per token, the agreement with the full model, the depth run, how
    many checks ran; and per checked layer, how many tokens reached it and how many exited there."""

    agree: torch.Tensor  # [N] bool
    depth: torch.Tensor  # [N] float
    checks: torch.Tensor  # [N] float
    gates: torch.Tensor  # [N] float: gate estimates computed
    reached: dict[int, int]
    exited: dict[int, int]
    num_layers: int

    @property
    def agreement(self) -> float:
        return float(self.agree.float().mean()) if len(self.agree) else 1.0  # no tokens routed: nothing exits

    @property
    def skip_ratio(self) -> float:
        return float(1 - self.depth.mean() / self.num_layers) if len(self.depth) else 0.0

    @property
    def net_saving(self) -> float:
        """Layers' worth of decoding time saved per token (the skipped layers and, for an exit, the full LM head;
        minus the checks and gates run): the cost model below, an estimate of the speed-up."""
        exits = (self.depth < self.num_layers).float()
        if not len(exits):
            return 0.0
        return float(((self.num_layers - self.depth) + LM_HEAD_LAYERS * exits - CHECK_COST_LAYERS * self.checks
                      - GATE_COST_LAYERS * self.gates).mean())


def route(stats: dict[int, LayerStats], num_layers: int, tau_low: float, min_layer: int = 1,
          offsets: dict[int, float] | None = None, margins: dict[int, float] | None = None) -> Routing:
    """Exit at the first checked layer >= min_layer whose signal < tau_low (+ the layer's offset); where the layer
    has a gate margin, only tokens whose gate estimate is below that threshold + the margin are checked there.
    Tokens that never exit run full depth and agree by definition (teacher-forced: no KV-fill effects)."""
    layers = sorted(l for l in stats if l >= min_layer)
    n = stats[layers[0]].predicted.shape[0] if layers else 0
    exited = torch.zeros(n, dtype=torch.bool)
    agree = torch.ones(n, dtype=torch.bool)
    depth = torch.full((n,), float(num_layers))
    checks, gates = torch.zeros(n), torch.zeros(n)
    reached, out = {}, {}
    for l in layers:
        reaching = ~exited
        threshold = tau_low + (offsets or {}).get(l, 0.0)
        checked = reaching
        if margins and l in margins and stats[l].gate is not None:
            gates += reaching.float()
            checked = reaching & (stats[l].gate < threshold + margins[l])
        checks += checked.float()
        go = checked & (stats[l].predicted < threshold)
        agree[go] = stats[l].agree[go]
        depth[go] = float(l)
        exited |= go
        reached[l], out[l] = int(reaching.sum()), int(go.sum())
    return Routing(agree, depth, checks, gates, reached, out, num_layers)


def simulate(stats: dict[int, LayerStats], num_layers: int, tau_low: float, min_layer: int = 1,
             offsets: dict[int, float] | None = None, margins: dict[int, float] | None = None
             ) -> tuple[float, float]:
    """(agreement, skip_ratio) of `route`."""
    r = route(stats, num_layers, tau_low, min_layer, offsets, margins)
    return r.agreement, r.skip_ratio


def exit_rates(stats: dict[int, LayerStats], tau_low: float, min_layer: int = 1,
               offsets: dict[int, float] | None = None) -> dict[int, float]:
    """Per checked layer: the fraction of the tokens reaching it that exit there (as `route` sends them)."""
    r = route(stats, 0, tau_low, min_layer, offsets)  # (the rates do not depend on the depth)
    return {l: r.exited[l] / max(1, r.reached[l]) for l in r.reached}


# Costs in units of one decoder layer (0.875 ms), measured while decoding the default model with the matmul kernel
# (one row): a check (translator + reduced head of ~4k ids) 0.47 ms, the full LM head 2.1-3.5 ms, which an exit
# avoids; a gate (one dot product with the hidden state, and reading the result) GATE_COST_LAYERS.
CHECK_COST_LAYERS = 0.55
LM_HEAD_LAYERS = 3.2
GATE_COST_LAYERS = 0.02
GATE_KEEP = (0.8, 0.9, 0.95, 0.98, 0.99)  # the shares of the exits the gate lets through that calibration tries


def choose_check_layers(stats: dict[int, LayerStats], num_layers: int, tau_low: float, min_layer: int = 1,
                        offsets: dict[int, float] | None = None) -> list[int]:
    """The checked layers whose exits pay for their checks: a layer stays if the share of the tokens reaching it
    that exit there, times what an exit there saves (the layers above and the full LM head), exceeds the cost
    of checking every token that reaches it. Dropping one changes who reaches the next, so repeat until stable."""
    keep = sorted(l for l in stats if l >= min_layer)
    while keep:
        rates = exit_rates({l: stats[l] for l in keep}, tau_low, min_layer, offsets)
        worst = [l for l in keep if rates[l] * (num_layers - l + LM_HEAD_LAYERS) <= CHECK_COST_LAYERS]
        if not worst:
            break
        keep.remove(min(worst, key=lambda l: rates[l] * (num_layers - l + LM_HEAD_LAYERS)))
    return keep


def oracle_skip_ratio(stats: dict[int, LayerStats], num_layers: int) -> float:
    """The ceiling: exit at the first checked layer whose exit agrees (a perfect decision with these heads)."""
    layers = sorted(stats)
    n = stats[layers[0]].agree.shape[0]
    depth = torch.full((n,), float(num_layers))
    done = torch.zeros(n, dtype=torch.bool)
    for l in layers:
        go = (~done) & stats[l].agree
        depth[go] = float(l)
        done |= go
    return float(1 - depth.mean() / num_layers)


def calibrate(stats: dict[int, LayerStats], final_entropy: torch.Tensor, num_layers: int, *,
              target_agreement: float | None = 0.98, min_layer: int = 1, floor: float = 0.0,
              per_layer: bool = True, prune_checks: bool = False) -> Calibration:
    """Method (b) when target_agreement is given, else method (a) (percentiles). With `prune_checks`, only the
    layers worth checking stay (choose_check_layers; the reported agreement and skip ratio are theirs)."""
    signal = torch.cat([s.predicted for l, s in stats.items() if l >= min_layer])
    p20, p50 = (float(torch.quantile(signal.float(), q)) for q in (0.2, 0.5))
    tau_high = float(torch.quantile(final_entropy.float(), 0.9))
    candidates = torch.unique(torch.quantile(signal.float(), torch.linspace(0, 1, 201)))
    sweep = []
    for tau in candidates.tolist():
        agreement, skip = simulate(stats, num_layers, tau, min_layer)
        sweep.append({"tau_low": round(tau, 4), "agreement": round(agreement, 4), "skip_ratio": round(skip, 4)})
    if target_agreement is None:
        tau_low, method = p50, "percentile"
    else:
        ok = [row for row in sweep if row["agreement"] >= target_agreement]
        # the loosest threshold that still meets the target; if none does, the strictest (exits almost never)
        tau_low = max(row["tau_low"] for row in ok) if ok else float(candidates[0]) - 1e-3
        method = "target_agreement"
    tau_low = max(tau_low, floor) if target_agreement is None else tau_low
    offsets: dict[int, float] = {}
    if target_agreement is not None and per_layer:
        offsets = optimize_offsets(stats, num_layers, tau_low, target_agreement, min_layer)
    oracle = oracle_skip_ratio(stats, num_layers)  # the ceiling with every exit head, pruned or not
    check_layers = None
    if prune_checks:
        check_layers = choose_check_layers(stats, num_layers, tau_low, min_layer, offsets)
        stats = {l: stats[l] for l in check_layers}
        offsets = {l: v for l, v in offsets.items() if l in stats}
    margins: dict[int, float] = {}
    if target_agreement is not None and all(s.gate is not None for s in stats.values()):
        margins, tau_low = calibrate_gate(stats, num_layers, tau_low, target_agreement, min_layer, offsets)
    routing = route(stats, num_layers, tau_low, min_layer, offsets, margins)
    agreement, skip = routing.agreement, routing.skip_ratio
    return Calibration(
        check_layers=check_layers, gate_margins={l: round(v, 4) for l, v in margins.items()},
        checks_per_token=round(float(routing.checks.mean()), 4),
        tau_low=round(tau_low, 4), tau_high=round(max(tau_high, tau_low + 0.1), 4),
        entropy_threshold_min=round(min(p20, tau_low), 4), method=method, target_agreement=target_agreement,
        min_layer=min_layer, agreement=round(agreement, 4), skip_ratio=round(skip, 4),
        oracle_skip_ratio=round(oracle, 4), sweep=sweep,
        layer_offsets={l: round(v, 4) for l, v in offsets.items()},
    )


def calibrate_gate(stats: dict[int, LayerStats], num_layers: int, tau_low: float, target: float,
                   min_layer: int = 1, offsets: dict[int, float] | None = None) -> tuple[dict[int, float], float]:
    """Gate margins and the tau_low that go with them: for each share `keep` in GATE_KEEP, each layer's margin
    lets through that share of the tokens that exit there at `tau_low` (the margin: that quantile of their gate
    estimate minus the layer's threshold); then tau_low moves (the margins move with it) to the value that saves
    the most (Routing.net_saving) while the agreement stays at or above `target`. Returns ({}, tau_low) when no
    gate saves more than checking every token."""
    layers = sorted(l for l in stats if l >= min_layer)
    if not layers:
        return {}, tau_low
    ungated = route(stats, num_layers, tau_low, min_layer, offsets)
    best: tuple[float, dict[int, float], float] = (ungated.net_saving, {}, tau_low)
    # per layer, how far above its threshold the gate puts the tokens that exit there (ungated, at tau_low)
    above = {l: stats[l].gate[ungated.depth == l].float() - (tau_low + (offsets or {}).get(l, 0.0))
             for l in layers if ungated.exited[l]}
    shifts = torch.linspace(-0.5, 1.0, 31).tolist()
    for keep in GATE_KEEP:
        margins = {l: float(torch.quantile(a, keep)) for l, a in above.items()}
        for shift in shifts:
            r = route(stats, num_layers, tau_low + shift, min_layer, offsets, margins)
            if r.agreement >= target and r.net_saving > best[0] + 1e-6:
                best = (r.net_saving, margins, tau_low + shift)
    return best[1], best[2]


def optimize_offsets(stats: dict[int, LayerStats], num_layers: int, tau_low: float, target: float,
                     min_layer: int = 1, passes: int = 2) -> dict[int, float]:
    """Per-layer offsets to tau_low (coordinate search): layers whose exits agree more often can be looser and
    others stricter, for more skipped layers at the same agreement. A layer's offset is kept only if it raises
    the skip ratio while the agreement stays at or above the target."""
    offsets = {l: 0.0 for l in stats if l >= min_layer}
    best_agree, best_skip = simulate(stats, num_layers, tau_low, min_layer, offsets)
    grid = torch.linspace(-3.0, 3.0, 61).tolist()
    for _ in range(passes):
        for l in sorted(offsets, reverse=True):
            keep = offsets[l]
            for value in grid:
                offsets[l] = value
                agreement, skip = simulate(stats, num_layers, tau_low, min_layer, offsets)
                if agreement >= target and skip > best_skip + 1e-6:
                    best_agree, best_skip, keep = agreement, skip, value
            offsets[l] = keep
    return {l: v for l, v in offsets.items() if v != 0.0}


def layer_stats_from(exit_stats: dict[int, dict[str, torch.Tensor]]) -> dict[int, LayerStats]:
    return {l: LayerStats(predicted=s["predicted"], agree=s["agree"]) for l, s in exit_stats.items()}


DECISION_VOCAB_SIZE = 4096  # the "reduced" signal's base vocabulary (the lossless drafts' default size too)


def calibrate_heads(bundle: Any, heads: Any, data: Any, *, target_agreement: float | None = 0.98,
                    min_layer: int = 1, signal: str = "reduced",
                    decision_vocab_size: int = DECISION_VOCAB_SIZE) -> Calibration:
    """Calibrate `heads` (ExitHeads) on `data` (ExitData) and store the result in heads.meta['calibration'].

    signal "reduced" (the default): exits are decided by the entropy over a reduced vocabulary (the model's
    `decision_vocab_size` most frequent output tokens; the engine adds the context's tokens), and only the layers
    worth checking are kept. "probe": the linear probe's estimated entropy (cheaper per check, but on the default
    model it separates agreeing exits far worse: see the README)."""
    from .exits import exit_stats, reduced_base_vocab

    if signal not in ("reduced", "probe"):
        raise ValueError(f"unknown exit signal {signal!r}: use 'reduced' or 'probe'")
    vocab = None
    if signal == "reduced":
        vocab = reduced_base_vocab(heads.draft_vocab, int(bundle.model.lm_head.weight.shape[0]), decision_vocab_size)
    stats = layer_stats_from(exit_stats(heads, data, bundle, decision_vocab=vocab))
    if signal == "reduced" and set(heads.gate_w) >= set(stats):  # the gate estimates the reduced signal
        for l, st in stats.items():
            st.gate = heads.gate_estimate(l, data.hidden[l].float())
    cal = calibrate(stats, data.final_entropy, bundle.num_layers, target_agreement=target_agreement,
                    min_layer=min_layer, prune_checks=signal == "reduced")
    cal.signal = signal
    cal.decision_vocab_size = decision_vocab_size if signal == "reduced" else None
    heads.meta["calibration"] = cal.to_meta()
    return cal


class OnlinePercentiles:
    """Percentiles of the last `window` values seen (a ring buffer: bounded memory, and it follows a session whose
    text drifts, e.g. from chat to code). Non-finite values are ignored. Queries sort the window (O(W log W)), so
    callers ask every N values, not every value."""

    def __init__(self, window: int = 1024) -> None:
        if window < 1:
            raise ValueError(f"window is {window}; it must be at least 1")
        self.window = window
        self._values: list[float] = []
        self._next = 0  # where the next value goes once the buffer is full
        self.count = 0  # values added over the whole lifetime (not only those still in the window)

    def __len__(self) -> int:
        return len(self._values)

    def add(self, value: float) -> None:
        if not math.isfinite(value):
            return
        self.count += 1
        if len(self._values) < self.window:
            self._values.append(float(value))
        else:
            self._values[self._next] = float(value)
            self._next = (self._next + 1) % self.window

    def percentiles(self, qs: tuple[float, ...]) -> tuple[float, ...]:
        """Linear interpolation between order statistics (as torch.quantile / numpy's default)."""
        if not self._values:
            raise ValueError("no values yet")
        ordered = sorted(self._values)
        last = len(ordered) - 1
        out = []
        for q in qs:
            pos = min(max(q, 0.0), 1.0) * last
            lo = int(pos)
            hi = min(lo + 1, last)
            out.append(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))
        return tuple(out)


@dataclass(frozen=True)
class AdaptiveUpdate:
    """What the adaptive thresholds propose after a batch of tokens: tau_high (= P90), tau_low (= P50, or None
    when it must stay: calibrated for a target agreement), and the percentile estimates shown to the user."""

    tau_low: float | None
    tau_high: float
    percentiles: dict[str, float]


class AdaptiveThresholds:
    """`sedac.adaptive_threshold`: online P20/P50/P90 of the final next-token entropy of this session's tokens.

    Mapping (as SEDAC users know it): entropy_threshold_min -> P20, entropy_threshold_base (tau_low) -> P50,
    o1_high_entropy_threshold (tau_high, the O1 trigger) -> P90. tau_high always follows P90. tau_low follows P50
    only when it is not calibrated for a target agreement: that calibration is the quality guarantee, and on the
    default model P50 of the final entropy sits far above the calibrated tau_low (see the README), so following
    it would exit many tokens the full model disagrees with. P20 is reported, never applied (the floor stays the
    configured one). A proposal comes at most every `every` tokens, after `min_samples` (about one answer: a P90
    from fewer rests on a handful of tail tokens), and only when a value moved by more than `tolerance` bits."""

    def __init__(self, *, window: int = 1024, every: int = 32, min_samples: int = 128,
                 tolerance: float = 0.05) -> None:
        if every < 1 or min_samples < 1:
            raise ValueError("every and min_samples must be at least 1")
        self.estimator = OnlinePercentiles(window)
        self.every = every
        self.min_samples = min_samples
        self.tolerance = tolerance
        self.paused = False  # a manual change wins: adaptation stops applying until resumed (it keeps observing)
        self._since = 0

    def observe(self, entropy_bits: float) -> None:
        self.estimator.add(entropy_bits)
        self._since += 1

    def propose(self, tau_low: float, tau_high: float, move_tau_low: bool) -> AdaptiveUpdate | None:
        """Called after each token; None unless `every` tokens passed and a threshold should move."""
        if self._since < self.every or len(self.estimator) < self.min_samples:
            return None
        self._since = 0
        if self.paused:
            return None
        p20, p50, p90 = self.estimator.percentiles((0.2, 0.5, 0.9))
        shown = {"p20": round(p20, 4), "p50": round(p50, 4), "p90": round(p90, 4), "n": len(self.estimator)}
        new_low = round(p50, 4) if move_tau_low else None
        new_high = round(p90, 4)
        moved = abs(new_high - tau_high) > self.tolerance or (
            new_low is not None and abs(new_low - tau_low) > self.tolerance)
        if not moved:
            return None
        return AdaptiveUpdate(tau_low=new_low, tau_high=new_high, percentiles=shown)
