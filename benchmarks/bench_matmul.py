"""Skinny matmul on CPU: the ext/ skinny_gemm kernel (sedac_core.matmul.linear_rows) against F.linear on the same
input-major weight, for SmolLM2-135M's shapes and 1..16 rows. Kernel and torch run alternately, round after round,
and each cell is the median of its per-call times, so a load spike on a shared machine hits both sides alike.

    python benchmarks/bench_matmul.py [--rounds 15] [--rows 1,2,4,8,12,16] [--threads N] [--cold-mb 96]
                                      [--clock wall|cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
from sedac_core import matmul  # noqa: E402

SHAPES = {  # (in, out) as anatomy.py stores them: [in, out] contiguous
    "lm_head": (576, 49152),
    "qkv": (576, 960),
    "o": (576, 576),
    "gate_up": (576, 3072),
    "down": (1536, 576),
}


def _per_call(fn, weights: list, calls: int, clock) -> float:
    t0 = clock()
    for i in range(calls):
        fn(weights[i % len(weights)])
    return (clock() - t0) / calls * 1e3


def bench_shape(k: int, n: int, rows: list[int], rounds: int, budget_ms: float, cold_mb: float, clock) -> list[dict]:
    torch.manual_seed(0)
    # cold: enough copies of the weight that each call reads it from DRAM, as a decode step does (the model's
    # weights are far larger than the L3)
    copies = max(1, int(cold_mb * 2**20 // (k * n * 4) + 1)) if cold_mb > 0 else 1
    weights = [torch.randn(k, n).t() for _ in range(copies)]  # [out, in] views of [in, out] storages
    out = []
    for m in rows:
        x = torch.randn(m, k)
        kern = lambda w: matmul.linear_rows(x, w)  # noqa: E731
        ref = lambda w: F.linear(x, w)  # noqa: E731
        for w in weights:
            torch.testing.assert_close(kern(w), ref(w), rtol=1e-4, atol=1e-3)
        probe = max(_per_call(kern, weights, copies, clock), _per_call(ref, weights, copies, clock), 1e-3)
        calls = max(copies, int(budget_ms / probe))
        tk, tt = [], []
        for _ in range(rounds):
            tk.append(_per_call(kern, weights, calls, clock))
            tt.append(_per_call(ref, weights, calls, clock))
        out.append({"in": k, "out": n, "rows": m, "kernel_ms": statistics.median(tk),
                    "torch_ms": statistics.median(tt)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--rows", default="1,2,4,8,12,16")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"any of {', '.join(SHAPES)}")
    ap.add_argument("--budget-ms", type=float, default=20.0, help="time per side per round and cell")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--cold-mb", type=float, default=96.0,
                    help="cycle through copies of each weight totalling this much (0: one copy, cache-warm)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: process CPU time (all threads), steadier on a shared machine; run with "
                         "OMP_WAIT_POLICY=passive so idle threads do not spin")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    active, reason = matmul.matmul_status()
    print(f"{reason}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not active:
        print("(kernel inactive: both columns are torch)")
    rows = [int(r) for r in args.rows.split(",")]
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    print(f"clock: {args.clock}; weights {'cold (' + str(args.cold_mb) + ' MB of copies)' if args.cold_mb else 'warm'}")
    results = []
    for name in args.shapes.split(","):
        k, n = SHAPES[name]
        res = bench_shape(k, n, rows, args.rounds, args.budget_ms, args.cold_mb, clock)
        results += [dict(r, shape=name) for r in res]
        one_k = res[0]["kernel_ms"] if res[0]["rows"] == 1 else float("nan")
        one_t = res[0]["torch_ms"] if res[0]["rows"] == 1 else float("nan")
        print(f"\n{name} (in {k}, out {n})")
        print(f"{'rows':>4} {'kernel ms':>10} {'torch ms':>10} {'torch/kernel':>12} {'kernel/kernel@1':>15} "
              f"{'torch/torch@1':>13}")
        for r in res:
            print(f"{r['rows']:>4} {r['kernel_ms']:>10.3f} {r['torch_ms']:>10.3f} "
                  f"{r['torch_ms'] / r['kernel_ms']:>12.2f} {r['kernel_ms'] / one_k:>15.2f} "
                  f"{r['torch_ms'] / one_t:>13.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"reason": reason, "clock": args.clock, "cold_mb": args.cold_mb,
                       "threads": torch.get_num_threads(), "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
