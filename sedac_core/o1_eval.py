"""The O1 evaluation: short questions with answers (sedac_core/data/o1_eval.jsonl: arithmetic, counts, capitals,
one-word facts, each with a scoring rule), answered greedily with O1 off and on, alternating per item, and the
accuracy difference, its paired bootstrap interval, the triggers and the extra compute."""

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
from .events import O1Event

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


def load_eval_items(path: str | Path | None = None) -> list[EvalItem]:
    if path is None:
        text = resources.files("sedac_core").joinpath("data/o1_eval.jsonl").read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    items = []
    for line in text.splitlines():
        if line.strip():
            d = json.loads(line)
            items.append(EvalItem(id=d["id"], kind=d["kind"], question=d["question"], answers=tuple(d["answers"]),
                                  rule=d.get("rule", "contains"), regex=d.get("regex")))
    return items


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
                json_out: Path | None = None) -> dict[str, Any]:
    items = (items or load_eval_items())[: limit or None]
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
        "model": engine.bundle.name, "n": n, "max_new_tokens": max_new_tokens, "tau_high": engine.tau_high,
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
        f"O1 eval · {r['model']} · n={r['n']} · max_new_tokens={r['max_new_tokens']} · tau_high={r['tau_high']}",
        f"accuracy  off {r['accuracy_off']:.1%}  on {r['accuracy_on']:.1%}  diff {r['diff']:+.1%} "
        f"(95% paired bootstrap CI {lo:+.1%} .. {hi:+.1%})",
        f"per item  wins {len(r['wins'])} {r['wins']}  losses {len(r['losses'])} {r['losses']}",
        f"triggers/response {r['triggers_per_response']:.2f}  changed choices/response "
        f"{r['choices_changed_per_response']:.2f}  extra forward passes/output token {r['extra_passes_per_token']:.2f}",
        f"wall clock  off {r['seconds_off']:.1f}s  on {r['seconds_on']:.1f}s  ratio {r['time_ratio']:.2f}x "
        f"(per token {r['time_per_token_ratio']:.2f}x)",
    ])
