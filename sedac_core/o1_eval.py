"""The O1 evaluation: short questions with answers (sedac_core/data/o1_eval.jsonl: arithmetic, counts, capitals,
one-word facts, each with a scoring rule), answered greedily with O1 off and on, alternating per item, and the
accuracy difference, its paired bootstrap interval, the triggers and the extra compute.

The set has two splits of 100 items: `dev`, on which O1's knobs are tuned (tune_o1), and `test`, held out, on
which the improvement is reported (run_o1_eval's default), so the number quoted is not tuned on its own items."""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from .engine import GenerationRequest, SedacEngine
from .errors import ConfigError
from .events import O1Event
from .reasoning import Lookahead, O1Settings

SPLITS = ("dev", "test")

NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
    "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20,
}
_NUM_RE = re.compile(r"(?<![\d.])-?\d+(?:\.\d+)?(?![\d])|\b(?:" + "|".join(NUMBER_WORDS) + r")\b", re.IGNORECASE)


@dataclass(frozen=True)
class EvalItem:
    id: str
    kind: str
    question: str
    answers: tuple[str, ...]
    rule: str = "contains"  # contains: an accepted answer appears as a word; number: the answer's number (below)
    regex: str | None = None  # optional: a response matching it is correct
    split: str = "test"  # dev: tuning; test: held out, reporting

    def score(self, response: str) -> bool:
        if self.regex and re.search(self.regex, response, re.IGNORECASE):
            return True
        if self.rule == "number":
            value = _answer_number(response, self.question)
            return value is not None and value in {_to_number(a) for a in self.answers}
        return any(re.search(r"(?<!\w)" + re.escape(a) + r"(?!\w)", response, re.IGNORECASE) for a in self.answers)


def _to_number(text: str) -> float | None:
    t = text.strip().lower()
    if t in NUMBER_WORDS:
        return float(NUMBER_WORDS[t])
    try:
        return float(t)
    except ValueError:
        return None


def _answer_number(response: str, question: str) -> float | None:
    """The number the response gives as its answer: the first one after '=', else the first that is not an
    operand of the question (a model often restates '6 * 7' before answering)."""
    after_eq = re.search(r"=\s*(" + _NUM_RE.pattern + ")", response, re.IGNORECASE)
    if after_eq:
        return _to_number(after_eq.group(1))
    operands = {_to_number(m.group(0)) for m in _NUM_RE.finditer(question)}
    for m in _NUM_RE.finditer(response):
        value = _to_number(m.group(0))
        if value not in operands:
            return value
    return None


def load_eval_items(path: str | Path | None = None, split: str | None = None) -> list[EvalItem]:
    """The eval items (of one split, or all when split is None or 'all')."""
    if split not in (None, "all", *SPLITS):
        raise ConfigError(f"unknown O1 eval split '{split}'; choose one of: {', '.join(SPLITS)}, all")
    if path is None:
        text = resources.files("sedac_core").joinpath("data/o1_eval.jsonl").read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    items = []
    for line in text.splitlines():
        if line.strip():
            d = json.loads(line)
            items.append(EvalItem(id=d["id"], kind=d["kind"], question=d["question"], answers=tuple(d["answers"]),
                                  rule=d.get("rule", "contains"), regex=d.get("regex"),
                                  split=d.get("split", "test")))
    return [i for i in items if split in (None, "all") or i.split == split]


def _run(engine: SedacEngine, item: EvalItem, o1: bool, max_new_tokens: int) -> dict[str, Any]:
    engine.reset()  # no prefix reuse across runs: each run pays its own prefill
    t0 = time.perf_counter()
    result = engine.generate(GenerationRequest(prompt=item.question, max_new_tokens=max_new_tokens, o1=o1))
    dt = time.perf_counter() - t0
    o1_events = [e for e in result.events if isinstance(e, O1Event)]
    return {
        "text": result.generated_text, "correct": item.score(result.generated_text), "tokens": result.tokens,
        "seconds": dt, "triggers": len(o1_events), "extra_passes": sum(e.extra_forward_passes for e in o1_events),
        "changed": sum(1 for e in o1_events if e.candidates and e.choice != e.candidates[0]["token_id"]),
    }


def paired_bootstrap_ci(off: list[bool], on: list[bool], n_boot: int = 5000, seed: int = 0) -> tuple[float, float]:
    """95% interval of accuracy(on) - accuracy(off), resampling items."""
    rng = random.Random(seed)
    diffs = [int(b) - int(a) for a, b in zip(off, on)]
    n = len(diffs)
    stats = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    return stats[int(0.025 * n_boot)], stats[int(0.975 * n_boot) - 1]


def run_o1_eval(engine: SedacEngine, items: list[EvalItem] | None = None, *, max_new_tokens: int = 24,
                limit: int | None = None, echo: Callable[[str], None] = print,
                json_out: Path | None = None, split: str = "test") -> dict[str, Any]:
    """Accuracy with O1 off vs on (at the engine's O1 trigger, o1.trigger_entropy or tau_high, and reasoner settings) on the held-out `test` split
    by default, alternating the arms per item."""
    items = (items or load_eval_items(split=split))[: limit or None]
    if not items:
        raise ConfigError("no O1 eval items to run (empty split or --limit 0)")
    engine.set_adaptive(False)  # both arms at the same tau_high: adaptation would move it between questions
    engine.settle_kernels()
    _run(engine, items[0], False, 4)  # warm-up
    rows = []
    for i, item in enumerate(items):
        order = (False, True) if i % 2 == 0 else (True, False)  # alternate, so drift hits both arms alike
        got = {o1: _run(engine, item, o1, max_new_tokens) for o1 in order}
        off, on = got[False], got[True]
        rows.append({"id": item.id, "question": item.question, "off": off, "on": on})
        mark = "=" if off["correct"] == on["correct"] else ("+" if on["correct"] else "-")
        echo(f"{mark} {item.id:12} off={'ok' if off['correct'] else '--'} on={'ok' if on['correct'] else '--'} "
             f"triggers={on['triggers']} changed={on['changed']} | {off['text'][:40]!r} | {on['text'][:40]!r}")
    n = len(rows)
    acc_off = sum(r["off"]["correct"] for r in rows) / n
    acc_on = sum(r["on"]["correct"] for r in rows) / n
    wins = [r["id"] for r in rows if r["on"]["correct"] and not r["off"]["correct"]]
    losses = [r["id"] for r in rows if r["off"]["correct"] and not r["on"]["correct"]]
    lo, hi = paired_bootstrap_ci([r["off"]["correct"] for r in rows], [r["on"]["correct"] for r in rows])
    tokens_on = sum(r["on"]["tokens"] for r in rows)
    time_off = sum(r["off"]["seconds"] for r in rows)
    time_on = sum(r["on"]["seconds"] for r in rows)
    report = {
        "model": engine.bundle.name, "split": "+".join(sorted({i.split for i in items})), "n": n,
        "max_new_tokens": max_new_tokens, "tau_high": engine.o1_threshold,
        "settings": dict(vars(engine.reasoner.settings)), "strategy": engine.reasoner.strategy.name,
        "accuracy_off": acc_off, "accuracy_on": acc_on, "diff": acc_on - acc_off, "diff_ci95": [lo, hi],
        "wins": wins, "losses": losses,
        "responses_changed": sum(r["off"]["text"] != r["on"]["text"] for r in rows),
        "triggers_per_response": sum(r["on"]["triggers"] for r in rows) / n,
        "choices_changed_per_response": sum(r["on"]["changed"] for r in rows) / n,
        "extra_passes_per_token": sum(r["on"]["extra_passes"] for r in rows) / max(1, tokens_on),
        "tokens_off": sum(r["off"]["tokens"] for r in rows), "tokens_on": tokens_on,
        "seconds_off": time_off, "seconds_on": time_on, "time_ratio": time_on / time_off if time_off else 0.0,
        "time_per_token_ratio": (time_on / max(1, tokens_on)) / (time_off / max(1, sum(r["off"]["tokens"]
                                                                                      for r in rows))),
        "rows": rows,
    }
    echo(format_o1_report(report))
    if json_out is not None:
        Path(json_out).write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    return report


def format_o1_report(r: dict[str, Any]) -> str:
    lo, hi = r["diff_ci95"]
    return "\n".join([
        f"O1 eval · {r['model']} · split {r.get('split', '?')} · n={r['n']} · max_new_tokens={r['max_new_tokens']} "
        f"· tau_high={r['tau_high']} · k={r['settings'].get('top_k')} m={r['settings'].get('rollout_tokens')}",
        f"accuracy  off {r['accuracy_off']:.1%}  on {r['accuracy_on']:.1%}  diff {r['diff']:+.1%} "
        f"(95% paired bootstrap CI {lo:+.1%} .. {hi:+.1%})",
        f"per item  wins {len(r['wins'])} {r['wins']}  losses {len(r['losses'])} {r['losses']}",
        f"triggers/response {r['triggers_per_response']:.2f}  changed choices/response "
        f"{r['choices_changed_per_response']:.2f}  extra forward passes/output token {r['extra_passes_per_token']:.2f}",
        f"wall clock  off {r['seconds_off']:.1f}s  on {r['seconds_on']:.1f}s  ratio {r['time_ratio']:.2f}x "
        f"(per token {r['time_per_token_ratio']:.2f}x)",
    ])


def _summary(off: list[dict[str, Any]], on: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(off)
    tokens_on = sum(r["tokens"] for r in on)
    time_off = sum(r["seconds"] for r in off)
    lo, hi = paired_bootstrap_ci([r["correct"] for r in off], [r["correct"] for r in on])
    return {
        "accuracy_off": sum(r["correct"] for r in off) / n, "accuracy_on": sum(r["correct"] for r in on) / n,
        "diff": (sum(r["correct"] for r in on) - sum(r["correct"] for r in off)) / n, "diff_ci95": [lo, hi],
        "triggers_per_response": sum(r["triggers"] for r in on) / n,
        "extra_passes_per_token": sum(r["extra_passes"] for r in on) / max(1, tokens_on),
        "time_ratio": sum(r["seconds"] for r in on) / time_off if time_off else 0.0,
    }


def tune_o1(engine: SedacEngine, items: list[EvalItem] | None = None, *,
            tau_highs: tuple[float, ...] = (2.5, 3.0, 3.5, 4.0, 4.5, 5.0),
            top_k_rollouts: tuple[tuple[int, int], ...] = ((2, 4), (4, 4), (3, 2), (3, 6)),
            max_new_tokens: int = 24, max_time_ratio: float = 2.0, echo: Callable[[str], None] = print,
            json_out: Path | None = None) -> dict[str, Any]:
    """Pick O1's knobs on the dev split, never looking at the test split: greedy answers once, then O1 on at each
    tau_high (with the reasoner's k and m), then each (k, m) at the best tau_high. Best: the highest dev accuracy
    among the points whose wall-clock ratio (O1 on / off) is within max_time_ratio; ties go to the cheaper point
    (fewer extra passes per token). The per-response pass budget follows k*m (max_triggers stays the limit).
    Leaves the engine at the best point, ready for run_o1_eval on the test split."""
    items = items or load_eval_items(split="dev")
    if not items:
        raise ConfigError("no O1 eval items to tune on")
    engine.set_adaptive(False)
    engine.settle_kernels()
    s: O1Settings = engine.reasoner.settings
    _run(engine, items[0], False, 4)  # warm-up
    off = [_run(engine, item, False, max_new_tokens) for item in items]
    echo(f"dev split: {len(items)} items, greedy accuracy {sum(r['correct'] for r in off) / len(items):.1%}")
    points: list[dict[str, Any]] = []

    def measure(tau_high: float, k: int, m: int) -> dict[str, Any]:
        engine.config.o1.trigger_entropy = float(tau_high)  # O1's own trigger: the heatmap's tau_high stays
        s.top_k, s.rollout_tokens = k, m
        s.max_extra_passes = max(s.max_extra_passes, s.max_triggers * k * m)
        on = [_run(engine, item, True, max_new_tokens) for item in items]
        point = {"tau_high": engine.o1_threshold, "top_k": k, "rollout_tokens": m,
                 "max_extra_passes": s.max_extra_passes, **_summary(off, on),
                 "wins": [i.id for i, a, b in zip(items, off, on) if b["correct"] and not a["correct"]],
                 "losses": [i.id for i, a, b in zip(items, off, on) if a["correct"] and not b["correct"]]}
        points.append(point)
        lo, hi = point["diff_ci95"]
        echo(f"tau_high {point['tau_high']:.2f} k {k} m {m}: accuracy {point['accuracy_on']:.1%} "
             f"({point['diff']:+.1%}, CI {lo:+.1%}..{hi:+.1%}) triggers/resp {point['triggers_per_response']:.2f} "
             f"extra passes/token {point['extra_passes_per_token']:.2f} time {point['time_ratio']:.2f}x")
        return point

    def best(candidates: list[dict[str, Any]]) -> dict[str, Any]:
        ok = [p for p in candidates if p["time_ratio"] <= max_time_ratio] or candidates
        return max(ok, key=lambda p: (p["accuracy_on"], -p["extra_passes_per_token"]))

    k0, m0, budget0 = s.top_k, s.rollout_tokens, s.max_extra_passes
    stage1 = [measure(t, k0, m0) for t in tau_highs]
    tau = best(stage1)["tau_high"]
    for k, m in top_k_rollouts:
        s.max_extra_passes = budget0
        if (k, m) != (k0, m0):
            measure(tau, k, m)
    choice = best(points)
    engine.config.o1.trigger_entropy = float(choice["tau_high"])
    s.top_k, s.rollout_tokens, s.max_extra_passes = choice["top_k"], choice["rollout_tokens"], choice["max_extra_passes"]
    report = {"model": engine.bundle.name, "split": "dev", "n": len(items), "max_new_tokens": max_new_tokens,
              "max_time_ratio": max_time_ratio, "accuracy_off": sum(r["correct"] for r in off) / len(items),
              "points": points, "best": choice}
    echo(f"dev pick: tau_high {choice['tau_high']} k {choice['top_k']} m {choice['rollout_tokens']} "
         f"(dev accuracy {choice['accuracy_on']:.1%} vs greedy {report['accuracy_off']:.1%}); report it on the test split")
    if json_out is not None:
        Path(json_out).write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    return report


def bench_rollouts(engine: SedacEngine, items: list[EvalItem] | None = None, *, rounds: int = 3,
                   settings: O1Settings | None = None, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Lookahead at the first answer position of each question, sequential vs batched rollouts, alternating
    (A B, B A, ...): the median per-item time ratio, and whether both chose the same token with the same scores."""
    import statistics

    import torch

    items = items or load_eval_items(split="dev")[:20]
    engine.settle_kernels()
    base = settings or engine.reasoner.settings
    variants = {b: O1Settings(**{**vars(base), "batched_rollouts": b}) for b in (False, True)}
    strategy = Lookahead()
    ratios, agree, max_score_diff = [], 0, 0.0
    for n, item in enumerate(items):
        engine.reset()
        with torch.inference_mode():
            ids = engine.bundle.chat.encode([{"role": "user", "content": item.question}])
            engine._prepare_cache(len(ids) + base.rollout_tokens + 1)
            logits, _ = engine._forward(ids, 0, False)
            times: dict[bool, list[float]] = {False: [], True: []}
            thoughts = {}
            for r in range(rounds + 1):  # round 0 warms up
                for batched in ((False, True) if (n + r) % 2 == 0 else (True, False)):
                    t0 = time.perf_counter()
                    thoughts[batched] = strategy.think(engine, logits, len(ids), variants[batched])
                    if r:
                        times[batched].append(time.perf_counter() - t0)
        seq, bat = thoughts[False], thoughts[True]
        same = seq.token_id == bat.token_id and [c["rollout"] for c in seq.candidates] == [
            c["rollout"] for c in bat.candidates]
        agree += same
        max_score_diff = max([max_score_diff] + [abs(a["score"] - b["score"]) for a, b in
                                                 zip(seq.candidates, bat.candidates)])
        ratios.append(statistics.median(times[False]) / statistics.median(times[True]))
    report = {"model": engine.bundle.name, "n": len(items), "rounds": rounds, "top_k": base.top_k,
              "rollout_tokens": base.rollout_tokens, "speedup_median": statistics.median(ratios),
              "speedup_min": min(ratios), "speedup_max": max(ratios), "same_choice_and_rollouts": agree,
              "max_score_diff": max_score_diff}
    echo(f"rollouts k={base.top_k} m={base.rollout_tokens} on {len(items)} prompts: batched is "
         f"{report['speedup_median']:.2f}x faster than sequential (median; range {report['speedup_min']:.2f}.."
         f"{report['speedup_max']:.2f}); identical choices and rollouts {agree}/{len(items)}, "
         f"max score difference {max_score_diff:.2g}")
    return report
