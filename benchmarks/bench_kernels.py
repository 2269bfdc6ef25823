"""Benchmark the fused token-statistics kernels against the torch reference and a plain read of the logits.

    python benchmarks/bench_kernels.py [--quick] [--threads N] [--device all|cpu|cuda] [--json OUT]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sedac_core.bench_kernels import format_kernel_bench, run_kernel_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fp32 only, fewer rounds")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's setting)")
    parser.add_argument("--device", choices=("all", "cpu", "cuda"), default="all",
                        help="which kernels to time (cuda: only where a GPU and its kernel are available)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    print(format_kernel_bench(run_kernel_bench(
        json_out=args.json, quick=args.quick, threads=args.threads,
        devices=("cpu", "cuda") if args.device == "all" else (args.device,))))


if __name__ == "__main__":
    main()
