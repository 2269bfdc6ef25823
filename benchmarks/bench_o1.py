"""O1 deep reasoning on the shipped eval set: accuracy with O1 off vs on (paired, alternating per item) on the
held-out test split, triggers, extra forward passes per output token and the wall-clock ratio. Without --tune it
is `sedac-chat bench --o1`.

    python benchmarks/bench_o1.py [--split test] [--limit N] [--tau-high 3.0] [--top-k 3] [--rollout-tokens 4]
    python benchmarks/bench_o1.py --tune            # pick tau_high, k, m on the dev split, then report on test
    python benchmarks/bench_o1.py --rollouts        # batched vs sequential rollouts: speed and agreement
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sedac_core.engine import SedacEngine
from sedac_core.models import load_model
from sedac_core.o1_eval import bench_rollouts, load_eval_items, run_o1_eval, tune_o1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--split", default="test", help="test (held out), dev or all")
    ap.add_argument("--limit", type=int, default=None, help="only the first N items")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--tau-high", type=float, default=None, help="override the calibrated tau_high (bits)")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--rollout-tokens", type=int, default=None)
    ap.add_argument("--sequential", action="store_true", help="roll the branches out one after another")
    ap.add_argument("--tune", action="store_true", help="tune on the dev split first, then report on --split")
    ap.add_argument("--tune-json", type=Path, default=None, help="with --tune: write the dev grid here")
    ap.add_argument("--rollouts", action="store_true", help="only time batched vs sequential rollouts")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    echo = lambda s: print(s, flush=True)  # noqa: E731
    engine = SedacEngine(load_model(args.model))
    s = engine.reasoner.settings
    if args.tau_high is not None:
        engine.config.o1.trigger_entropy = args.tau_high  # the O1 trigger (bits)
    if args.top_k is not None:
        s.top_k = args.top_k
    if args.rollout_tokens is not None:
        s.rollout_tokens = args.rollout_tokens
    s.max_extra_passes = max(s.max_extra_passes, s.max_triggers * s.top_k * s.rollout_tokens)
    s.batched_rollouts = not args.sequential
    if args.rollouts:
        report = bench_rollouts(engine, echo=echo)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")
        return
    if args.tune:
        tune_o1(engine, echo=echo, json_out=args.tune_json, max_new_tokens=args.max_new_tokens)
    run_o1_eval(engine, load_eval_items(split=args.split), max_new_tokens=args.max_new_tokens, limit=args.limit,
                json_out=args.json, echo=echo)


if __name__ == "__main__":
    main()
