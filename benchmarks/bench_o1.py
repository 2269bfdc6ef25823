"""O1 deep reasoning on the shipped eval set: accuracy with O1 off vs on (paired, alternating per item), triggers,
extra forward passes per output token and the wall-clock ratio. Same as `sedac-chat bench --o1`.

    python benchmarks/bench_o1.py [--limit N] [--max-new-tokens 24] [--tau-high 5.0] [--json out.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sedac_core.engine import SedacEngine
from sedac_core.models import load_model
from sedac_core.o1_eval import run_o1_eval


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--limit", type=int, default=None, help="only the first N items")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--tau-high", type=float, default=None, help="override the calibrated tau_high (bits)")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--rollout-tokens", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    engine = SedacEngine(load_model(args.model))
    if args.tau_high is not None:
        engine.set_thresholds(tau_high=args.tau_high)
    if args.top_k is not None:
        engine.reasoner.settings.top_k = args.top_k
    if args.rollout_tokens is not None:
        engine.reasoner.settings.rollout_tokens = args.rollout_tokens
    run_o1_eval(engine, max_new_tokens=args.max_new_tokens, limit=args.limit, json_out=args.json,
                echo=lambda s: print(s, flush=True))


if __name__ == "__main__":
    main()
