"""Builds one ext/ kernel in a process of its own, at low CPU priority: what a background build runs (started by
kernels.build_in_worker). It prints one JSON line, {"ok": ..., "reason": ..., "log": ...}, and leaves the library
in the build dir, where the process that asked for it (or the next one, if that one has exited) loads it.

    python -m sedac_core.build_worker cpp|cuda|matmul [--src-dir DIR] [--cache-root DIR] [--isa ISA]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from .kernels import BUILD_NICENESS, KernelManager

KINDS = ("cpp", "cuda", "matmul")


def lower_priority(niceness: int = BUILD_NICENESS) -> None:
    """Run this process, and the ninja and compilers it starts (they inherit both), at `niceness` and, on Linux,
    as SCHED_IDLE: it then runs only on a core nothing else wants, and a decoding thread that wakes up takes the
    core back at once (torch's parallel regions wait for their slowest thread, so a late one costs every region)."""
    if hasattr(os, "setpriority"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, max(niceness, os.getpriority(os.PRIO_PROCESS, 0)))
    if hasattr(os, "SCHED_IDLE"):
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=KINDS)
    ap.add_argument("--src-dir", type=Path, default=None)
    ap.add_argument("--cache-root", type=Path, default=None)
    ap.add_argument("--isa", default=None)
    a = ap.parse_args(argv)
    lower_priority()
    paths = {k: v for k, v in (("src_dir", a.src_dir), ("cache_root", a.cache_root)) if v is not None}
    if a.kind == "matmul":
        from .matmul import GemmKernel

        res = GemmKernel(**paths, isa=a.isa, enabled=True)._build("foreground")
    else:
        manager = KernelManager(**paths, isa=a.isa)
        res = (manager._build_cpu if a.kind == "cpp" else manager._build_cuda)("foreground")
    assert res is not None
    try:
        print(json.dumps({"ok": res.ok, "reason": res.reason, "log": str(res.log_path) if res.log_path else None}),
              flush=True)
    except BrokenPipeError:  # the process that asked has exited; the next start finds the library on disk
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not fail too
    print(f"{res.reason}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
