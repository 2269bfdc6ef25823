"""Decode speed of the engine's modes vs Hugging Face generate (alternating, one run). Same as `sedac-chat bench`.

    python benchmarks/bench_decode.py --max-new-tokens 128 --prompts 4 --rounds 2 --json out.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sedac_core.bench import run_decode_bench

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--local", action="store_true")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--modes", default="full")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    a = ap.parse_args()
    run_decode_bench(model=a.model, local=a.local, max_new_tokens=a.max_new_tokens, n_prompts=a.prompts,
                     rounds=a.rounds, modes=a.modes.split(","), json_out=a.json, plot_out=a.plot)
