"""The KV-fill benchmark behind `sedac-chat bench --kv-fill`: exit mode with each way of filling the skipped layers'
K/V (propagation, Ghost KV, the oracle that runs them) on the same prompts - tok/s against full depth in
alternating runs, exact match and teacher-forced agreement with full greedy decoding, and how far each fill's K/V
are from the true ones at the positions where a token exited."""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .errors import ConfigError, SedacError
from .engine import TAU_GAP, GenerationRequest, SedacEngine

KV_FILLS = ("propagate", "ghost", "deferred", "oracle")
METRICS = ("k_cos", "k_rel_l2", "v_cos", "v_rel_l2")


def parse_kv_fills(text: str) -> list[str]:
    """'propagate,ghost' -> ['propagate', 'ghost']; an unknown or repeated name is a one-line ConfigError."""
    fills = [f.strip() for f in text.split(",") if f.strip()]
    if not fills:
        raise ConfigError(f"--kv-fill is empty; give a comma-separated list of {', '.join(KV_FILLS)}")
    for f in fills:
        if f not in KV_FILLS:
            raise ConfigError(f"unknown KV fill '{f}' in --kv-fill; choose from {', '.join(KV_FILLS)} "
                              "(comma-separated)")
    if len(set(fills)) != len(fills):
        raise ConfigError(f"--kv-fill names a fill twice ({text}); give each once")
    return fills


@dataclass
class ReconstructionStats:
    """Per layer (0-based), sums of the per-position metrics over the exited positions that skipped it."""

    sums: dict[int, list[float]] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)
    exited_positions: int = 0

    def add(self, layer: int, values: tuple[float, float, float, float]) -> None:
        acc = self.sums.setdefault(layer, [0.0] * len(METRICS))
        for i, v in enumerate(values):
            acc[i] += v
        self.counts[layer] = self.counts.get(layer, 0) + 1

    def per_layer(self) -> dict[int, dict[str, float]]:
        return {j: {m: round(s / self.counts[j], 4) for m, s in zip(METRICS, self.sums[j])}
                for j in sorted(self.sums)}

    def mean(self) -> dict[str, float] | None:
        """Over every (layer, exited position) entry the fill wrote."""
        total = sum(self.counts.values())
        if not total:
            return None
        return {m: round(sum(s[i] for s in self.sums.values()) / total, 4) for i, m in enumerate(METRICS)}


def kv_error(pred: torch.Tensor, true: torch.Tensor) -> tuple[float, float]:
    """Cosine similarity and relative L2 error of one position's K (or V), all heads as one vector."""
    p, t = pred.float().flatten(), true.float().flatten()
    cos = float(F.cosine_similarity(p, t, dim=0))
    rel = float((p - t).norm() / t.norm().clamp_min(1e-12))
    return cos, rel


class ReconstructionProbe:
    """While active, after every exited token the engine's fill wrote the skipped layers' K/V at that position;
    the probe re-runs the token through every layer on the same cache (the oracle's K/V: what the skipped layers
    would have written given this very cache), compares, and puts the fill's entries back, so decoding goes on
    exactly as it would without the probe. Costs a full-depth pass per exited token: for measurement runs only."""

    def __init__(self, engine: SedacEngine) -> None:
        self.engine = engine
        self.stats = ReconstructionStats()

    def __enter__(self) -> "ReconstructionProbe":
        self._inner = self.engine._forward_exit
        self.engine._forward_exit = self._step  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: Any) -> None:
        del self.engine._forward_exit  # back to the class's method

    def _step(self, token_id: int, pos: int) -> tuple[torch.Tensor, int, dict[int, float]]:
        logits, depth, estimates = self._inner(token_id, pos)
        if depth < self.engine.num_layers:
            if self.engine.kv_fill == "deferred":  # the true K/V come later, with the next token: nothing to compare
                self.stats.exited_positions += 1
            else:
                self._measure(token_id, pos, depth)
        return logits, depth, estimates

    def _measure(self, token_id: int, pos: int, depth: int) -> None:
        e = self.engine
        a, cache = e.anatomy, e._cache
        assert cache is not None and e._cos is not None and e._sin is not None
        at = slice(pos, pos + 1)
        filled = [(cache.keys[j][:, :, at].clone(), cache.values[j][:, :, at].clone()) for j in range(a.num_layers)]
        fill_kinds, length = cache.fill[:, at].clone(), cache.length
        x = a.embed(torch.tensor([[token_id]], device=e.device))
        for layer in a.layers:
            x = a.layer_forward(layer, x, cache, pos, e._cos[at], e._sin[at])
        for j in range(depth, a.num_layers):
            k_cos, k_rel = kv_error(filled[j][0], cache.keys[j][:, :, at])
            v_cos, v_rel = kv_error(filled[j][1], cache.values[j][:, :, at])
            self.stats.add(j, (k_cos, k_rel, v_cos, v_rel))
        for j, (k, v) in enumerate(filled):
            cache.keys[j][:, :, at] = k
            cache.values[j][:, :, at] = v
        cache.fill[:, at] = fill_kinds
        cache.length = length
        self.stats.exited_positions += 1


def fill_cost(engine: SedacEngine) -> dict[str, dict[str, int]]:
    """Multiply-adds per exited token, per exit layer: propagation (every skipped layer's norm and K/V projections)
    and Ghost KV (the exact first layer plus the low-rank map)."""
    a = engine.anatomy
    layers = engine.exit_heads.layers if engine.exit_heads is not None else []
    per_layer = a.hidden_size * 2 * a.kv_size + a.hidden_size
    out: dict[str, dict[str, int]] = {"propagate": {str(d): (a.num_layers - d) * per_layer for d in layers}}
    if engine.ghost_kv is not None:
        out["ghost"] = {str(d): engine.ghost_kv.macs_per_token(d) for d in layers if d in engine.ghost_kv.trunk}
    return out


def load_bench_engine(model: str | None, local: bool, echo: Callable[[str], None] = print) -> SedacEngine:
    """The engine for the bench: the user's model and profile, thresholds held still (no adaptation) so every
    fill runs at the same tau_low."""
    from .config import SedacConfig
    from .models import load_model

    config = SedacConfig()
    config.sedac.adaptive_threshold = False
    return SedacEngine(load_model(model, local=local, progress=echo), config)


def kv_fill_bench(model: str | None, local: bool, kv_fill: str, *, prompts_file: Path | None = None,
                  n_prompts: int = 4, max_new_tokens: int = 128, rounds: int = 2, tau_low: float | None = None,
                  json_out: Path | None = None, echo: Callable[[str], None] = print,
                  progress: Callable[[str], None] = print) -> dict[str, Any]:
    """`sedac-chat bench --kv-fill`: check the options, load the model, run the bench on the bench prompts (or a
    file's)."""
    from .bench import BENCH_PROMPTS
    from .exits import load_prompts

    fills = parse_kv_fills(kv_fill)
    _check_tau_low(tau_low)
    prompts = (load_prompts(prompts_file) if prompts_file is not None else BENCH_PROMPTS)[: max(1, n_prompts)]
    engine = load_bench_engine(model, local, progress)
    engine.settle_kernels()
    return run_kv_fill_bench(engine, prompts, fills, max_new_tokens=max_new_tokens, rounds=rounds, tau_low=tau_low,
                             json_out=json_out, echo=echo)


def _check_tau_low(tau_low: float | None) -> None:
    if tau_low is not None and not tau_low > 0:
        raise ConfigError(f"--tau-low is {tau_low}; give an entropy in bits above 0, e.g. 0.5")


def run_kv_fill_bench(
    engine: SedacEngine,
    prompts: list[str],
    fills: list[str],
    *,
    max_new_tokens: int = 128,
    rounds: int = 2,
    tau_low: float | None = None,
    json_out: Path | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Exit mode with each fill in `fills`, and full depth as the reference, alternately on the same prompts."""
    if engine.exit_heads is None:
        raise SedacError(f"{engine.profile_notice or 'no exit heads'}; the KV fills only differ in exit mode")
    if "ghost" in fills and engine.ghost_kv is None:
        raise SedacError(f"no Ghost KV for {engine.bundle.name}; train one with `sedac-chat train --ghost-kv` or "
                         "drop 'ghost' from --kv-fill")
    _check_tau_low(tau_low)
    if tau_low is not None:
        # tau_high only steers O1 (off here); it moves up if it would clamp the asked-for tau_low
        engine.set_thresholds(tau_low=tau_low, tau_high=max(engine.tau_high, tau_low + 2 * TAU_GAP), source="user")
        if abs(engine.tau_low - tau_low) > 1e-9:
            echo(f"tau_low {tau_low} clamped to {engine.tau_low} (the floor, or tau_high - gap)")
    if rounds < 1 or max_new_tokens < 1 or not prompts:
        raise ConfigError("the KV-fill bench needs at least one prompt, one round and one new token")
    saved_fill = engine.kv_fill
    runs = ["full", *fills]

    def run(name: str, prompt: str, forced: list[int] | None = None) -> tuple[float, Any]:
        engine.reset()  # no prefix reuse: every run prefills its prompt
        engine.kv_fill = saved_fill if name == "full" else name
        t0 = time.perf_counter()
        result = engine.generate(GenerationRequest(
            prompt=prompt, max_new_tokens=len(forced) if forced else max_new_tokens,
            mode="full" if name == "full" else "exit", forced_tokens=forced, ignore_eos=True))
        return time.perf_counter() - t0, result

    try:
        for name in runs:  # warm-up: first calls allocate and pick kernels
            run(name, prompts[0])
        times: dict[str, list[float]] = {n: [] for n in runs}
        tokens: dict[str, int] = {n: 0 for n in runs}
        ratios: dict[str, list[float]] = {f: [] for f in fills}
        exact: dict[str, list[bool]] = {f: [] for f in fills}
        exit_layers: dict[str, list[float]] = {f: [] for f in fills}
        reference: dict[str, list[int]] = {}
        for r in range(rounds):
            for prompt in prompts:
                order = runs if r % 2 == 0 else runs[::-1]
                got = {name: run(name, prompt) for name in order}
                reference.setdefault(prompt, got["full"][1].token_ids)
                for name in order:
                    times[name].append(got[name][0])
                    tokens[name] += got[name][1].tokens
                for f in fills:
                    ratios[f].append(got["full"][0] / got[f][0])
                    exact[f].append(got[f][1].token_ids == got["full"][1].token_ids)
                    exit_layers[f].append(got[f][1].avg_exit_layer)
                echo(f"round {r + 1} · {prompt[:40]!r}: " + ", ".join(
                    f"{n} {got[n][1].tokens / got[n][0]:.1f} tok/s" for n in order))
        # teacher forcing along the full model's output: agreement, and the probe on every exited position
        agreement: dict[str, list[float]] = {f: [] for f in fills}
        recon: dict[str, ReconstructionStats] = {}
        for f in fills:
            with ReconstructionProbe(engine) as probe:
                for prompt in prompts:
                    ref = reference[prompt]
                    _, res = run(f, prompt, forced=ref)
                    agreement[f].append(sum(a == b for a, b in zip(res.token_ids, ref)) / max(1, len(ref)))
            recon[f] = probe.stats
            echo(f"teacher-forced {f}: agreement {statistics.mean(agreement[f]):.3f}, "
                 f"{probe.stats.exited_positions} exited positions probed")
    finally:
        engine.kv_fill = saved_fill
        engine.reset()

    n_layers = engine.num_layers
    report: dict[str, Any] = {
        "model": engine.bundle.name,
        "num_layers": n_layers,
        "device": str(engine.device),
        "threads": torch.get_num_threads(),
        "max_new_tokens": max_new_tokens,
        "prompts": len(prompts),
        "rounds": rounds,
        "tau_low": engine.tau_low,
        "exit_layers": list(engine.exit_heads.layers),
        "ghost_kv": ({"rank": engine.ghost_kv.rank, "parameters": engine.ghost_kv.num_parameters()}
                     if engine.ghost_kv is not None else None),
        "fill_macs_per_exited_token": fill_cost(engine),
        "full": {"tok_per_s": round(tokens["full"] / sum(times["full"]), 2)},
        "fills": {},
        "layers_note": "reconstruction per layer: 0-based layer index; cosine and relative L2 of the K (post-RoPE) "
                       "and V the fill wrote vs the true ones, averaged over the exited positions that skipped it",
    }
    for f in fills:
        stats = recon[f]
        report["fills"][f] = {
            "tok_per_s": round(tokens[f] / sum(times[f]), 2),
            "speedup_vs_full": round(statistics.median(ratios[f]), 3),
            "speedup_vs_full_min": round(min(ratios[f]), 3),
            "exact_match": round(sum(exact[f]) / len(exact[f]), 3),
            "agreement": round(statistics.mean(agreement[f]), 4),
            "avg_exit_layer": round(statistics.mean(exit_layers[f]), 2),
            "skip_ratio": round(1 - statistics.mean(exit_layers[f]) / n_layers, 4),
            "exited_positions": stats.exited_positions,
            "reconstruction": stats.mean(),
            "reconstruction_per_layer": {str(j): row for j, row in stats.per_layer().items()},
        }
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2))
        echo(f"wrote {json_out}")
    return report

