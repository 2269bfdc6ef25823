"""When the kernels build, and what a build can leave behind: a generation never waits for a compiler (torch serves
until the kernel is ready, switched at a generation boundary), a build killed by a signal leaves nothing that makes
a later build or load hang, and importing the build machinery prints no CUDA_HOME warning on a machine without a
GPU. The real builds here run in subprocesses with temporary cache dirs (the session's kernels stay loaded)."""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sedac_core import kernels, matmul
from sedac_core.kernels import BuildResult, KernelManager
from sedac_core.matmul import GemmKernel, linear_rows

ROOT = Path(__file__).resolve().parents[2]


class Gate:
    """A build that runs until the test opens the gate (a compile that takes as long as the test wants)."""

    def __init__(self, result: BuildResult):
        self.result = result
        self.started = threading.Event()
        self.release = threading.Event()
        self.modes: list[str] = []

    def __call__(self, mode: str = "foreground") -> BuildResult | None:
        self.modes.append(mode)
        if mode == "cached":
            return None  # nothing on disk
        self.started.set()
        assert self.release.wait(60), "the test never released the build"
        return self.result


def _fake_gemm_result(calls: list) -> BuildResult:
    def op(x, weight, bias, code):
        calls.append(x.shape[0])
        return F.linear(x, weight, bias)

    def run(x, weight, bias=None):
        return op(x, weight, bias, 2)

    run.op, run.isa_code = op, 2
    return BuildResult(True, "matmul: built (avx512)", run)


def _in_thread(fn, timeout: float = 60.0):
    """Run fn on a thread; fail (instead of hanging the suite) if it has not returned within `timeout` seconds."""
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("value", fn()), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{fn} still waiting after {timeout} s"
    return out.get("value")


# ------------------------------------------------------------------------------ nothing waits for a compile
def test_generations_run_on_torch_while_the_matmul_kernel_builds(monkeypatch, tmp_path):
    """The first start: the engine's generations go on (on F.linear) while the build runs, the second one too
    (it used to queue behind the build's lock), and the kernel serves from the generation after it is done."""
    from sedac_core.config import SedacConfig
    from sedac_core.engine import GenerationRequest, SedacEngine
    from tests.conftest import make_bundle

    calls: list = []
    gate = Gate(_fake_gemm_result(calls))
    pending = GemmKernel(cache_root=tmp_path)
    monkeypatch.setattr(pending, "_build", gate)
    monkeypatch.setattr(matmul, "GEMM", pending)
    config = SedacConfig()
    config.performance.matmul_kernel = True
    engine = SedacEngine(make_bundle("llama", layers=2, seed=1), config)
    assert gate.started.wait(30) and pending.building()
    req = lambda: GenerationRequest(prompt="Hello", max_new_tokens=3)  # noqa: E731
    for _ in range(2):
        _in_thread(lambda: engine.generate(req()))
        assert engine.anatomy.linear is F.linear and not calls
    assert pending.status(build=False) == (False, "matmul: building in the background (torch serves meanwhile)")
    gate.release.set()
    pending._thread.join(30)
    assert pending.ready() and engine.anatomy.linear is F.linear  # not inside a generation: at the next one
    _in_thread(lambda: engine.generate(req()))
    assert engine.anatomy.linear is linear_rows and calls
    assert gate.modes == ["cached", "background"]  # one compile, in the background


def test_build_in_background_returns_while_a_build_holds_the_lock(monkeypatch, tmp_path):
    gate = Gate(_fake_gemm_result([]))
    kernel = GemmKernel(cache_root=tmp_path)
    monkeypatch.setattr(kernel, "_build", gate)
    monkeypatch.setattr(matmul, "GEMM", kernel)
    assert matmul.matmul_linear() is F.linear
    assert gate.started.wait(30)
    start = time.monotonic()
    for _ in range(3):
        assert _in_thread(matmul.matmul_linear, timeout=10) is F.linear
        kernel.build_in_background()
        assert kernel.load_cached() is False
        torch.testing.assert_close(linear_rows(torch.ones(2, 4), torch.ones(3, 4)), torch.full((2, 3), 4.0))
    assert time.monotonic() - start < 5
    gate.release.set()
    assert kernel.wait(30) and matmul.matmul_linear() is linear_rows


def _fake_stats_result(calls: list) -> BuildResult:
    def run(logits, tau_low, tau_high):
        calls.append(tuple(logits.shape))
        ref = kernels_reference(logits, tau_low, tau_high)
        return ref.entropy_bits, ref.varentropy, ref.max_prob, ref.logsumexp, ref.argmax, ref.decision

    return BuildResult(True, "cpp: built (avx512)", run)


def kernels_reference(logits, tau_low, tau_high):
    from sedac_core.entropy import token_stats_reference

    return token_stats_reference(logits, tau_low, tau_high)


@pytest.mark.parametrize("boundaries", [True, False], ids=["engine-marks-generations", "no-generations"])
def test_stats_kernel_builds_in_the_background_and_switches_at_a_boundary(monkeypatch, tmp_path, boundaries):
    from sedac_core import entropy

    calls: list = []
    gate = Gate(_fake_stats_result(calls))
    manager = KernelManager(cache_root=tmp_path)
    monkeypatch.setattr(manager, "_build_cpu", gate)
    monkeypatch.setattr(kernels, "MANAGER", manager)
    x = torch.randn(2, 50)
    if boundaries:
        kernels.select_kernels()  # the engine's generation boundary (matmul_linear calls it)
    assert _in_thread(lambda: entropy.token_stats(x, 0.5, 4.0), timeout=10) is not None
    assert gate.started.wait(30) and manager.building("cpp") and not calls
    assert kernels.kernel_status(build=False)[1] == (
        "cpp", False, "cpp: building in the background (torch serves meanwhile)")
    _in_thread(lambda: entropy.token_stats(x, 0.5, 4.0), timeout=10)  # still the reference, never waiting
    assert not calls
    gate.release.set()
    manager._threads["cpp"].join(30)
    entropy.token_stats(x, 0.5, 4.0)
    if boundaries:  # built, but this generation keeps the reference; the next boundary switches
        assert not calls
        assert kernels.kernel_status(build=False)[1] == ("cpp", False, "cpp: built, used from the next generation")
        kernels.select_kernels()
        entropy.token_stats(x, 0.5, 4.0)
    assert calls == [(2, 50)]
    assert gate.modes == ["cached", "background"]


def test_select_with_wait_builds_first(monkeypatch, tmp_path):
    gate = Gate(_fake_stats_result([]))
    gate.release.set()
    manager = KernelManager(cache_root=tmp_path)
    monkeypatch.setattr(manager, "_build_cpu", gate)
    manager.select(wait=True)
    assert manager.kernel_for(torch.randn(1, 8)) is gate.result.op and gate.modes == ["foreground"]


# ------------------------------------------------------------------------------------------- the build lock
def test_a_lock_left_by_a_killed_build_is_cleared_before_building(tmp_path):
    """Holding our flock, no other process of ours is building here: cpp_extension's lock file, and the library
    beside it (perhaps half linked), are what a killed build left, and go before the build runs."""
    (tmp_path / "lock").write_text("")
    (tmp_path / "lib.so").write_bytes(b"half a library")
    assert kernels.finished_library(tmp_path, "lib") is None  # a library beside a lock is not a finished build
    assert kernels.load_or_build("test", tmp_path, "lib", lambda: None, mode="cached") is False

    def build():
        assert not (tmp_path / "lock").exists() and not (tmp_path / "lib.so").exists()
        (tmp_path / "lib.so").write_bytes(b"built")

    assert kernels.load_or_build("test", tmp_path, "lib", build, mode="background") is True
    assert kernels.finished_library(tmp_path, "lib") == tmp_path / "lib.so"


def test_a_build_held_by_another_process_is_waited_for_boundedly(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(kernels, "BUILD_WAIT_S", 1.0)
    holder = os.open(tmp_path / kernels.BUILD_LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)  # flock locks belong to an open file: this one excludes the build's own
    os.write(holder, b"4242\n")  # a holder writes its pid there
    built = []
    try:
        start = time.monotonic()
        with caplog.at_level(logging.INFO, logger="sedac.kernels"), pytest.raises(TimeoutError, match="held"):
            kernels.load_or_build("matmul", tmp_path, "lib", lambda: built.append(1), mode="foreground")
        assert 0.9 < time.monotonic() - start < 10 and not built
        waits = [r.getMessage() for r in caplog.records if "is building this kernel" in r.getMessage()]
        assert len(waits) == 1 and str(tmp_path / kernels.BUILD_LOCK) in waits[0] and "pid 4242" in waits[0]
    finally:
        os.close(holder)
    kernels.load_or_build("matmul", tmp_path, "lib", lambda: built.append(1), mode="foreground")
    assert built == [1]  # the lock is free once its holder lets go


@pytest.mark.skipif(kernels._cxx() is None, reason="no C++ compiler: nothing to build")
def test_a_manager_reports_a_timed_out_wait_and_uses_torch(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "BUILD_WAIT_S", 0.5)
    manager = KernelManager(cache_root=tmp_path)
    build_dir = manager.cpu_build_dir()
    build_dir.mkdir(parents=True)
    holder = os.open(build_dir / kernels.BUILD_LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        res = manager.cpu()
    finally:
        os.close(holder)
    assert not res.ok and "another process held" in res.reason and res.reason.endswith("using torch")


BUILD_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from sedac_core.kernels import KernelManager
    manager = KernelManager(cache_root=Path(sys.argv[1]))
    if sys.argv[2] == "select":  # what an engine does on start: load from disk, else build in the background
        manager.select()
        print("BUILDING", manager.building("cpp"), flush=True)
        lock = manager.cpu_build_dir() / "sedac-build.lock"

        def worker_holds_lock():
            pid = lock.read_text().strip() if lock.exists() else ""
            cmdline = Path(f"/proc/{pid}/cmdline")
            return bool(pid) and cmdline.exists() and b"\\0-m\\0sedac_core.build_worker\\0" in cmdline.read_bytes()

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not worker_holds_lock():
            time.sleep(0.05)
        sys.exit(0)  # then exit, as a one-shot `ask` does long before the build is done
    start = time.monotonic()
    res = manager._build_cpu(sys.argv[2])
    print("RESULT", None if res is None else res.reason, round(time.monotonic() - start, 1), flush=True)
""")


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the build exited (rc {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout} s")
        time.sleep(0.1)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.mark.skipif(kernels._cxx() is None, reason="no C++ compiler")
def test_a_build_killed_mid_build_hangs_nothing(tmp_path):
    """The real thing, with the statistics kernel (25 s to build here; the matmul kernel takes the same path).
    1. A process starts the build in the background and exits at once; its build worker is killed with SIGKILL
       while ninja runs, leaving cpp_extension's lock file (before, every later load() waited on it forever).
    2. The next process does the same: its worker clears what the killed one left and finishes the build although
       the process that started it is gone.
    3. Meanwhile a third process asks for the kernel in the foreground: it waits for the worker's lock (saying so)
       and loads the result without compiling; a fourth loads it from disk at once."""
    cache = tmp_path / "cache"
    build_dir = KernelManager(cache_root=cache).cpu_build_dir()
    lib = kernels.finished_library
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run = [sys.executable, "-c", BUILD_SCRIPT, str(cache)]
    workers: list[int] = []
    try:
        first = subprocess.run([*run, "select"], env=env, capture_output=True, text=True, timeout=120)
        assert "BUILDING True" in first.stdout, first.stdout + first.stderr[-2000:]
        _wait_for(lambda: (build_dir / "lock").exists(), 240, "cpp_extension lock file")
        worker = int((build_dir / kernels.BUILD_LOCK).read_text().split()[0])
        workers.append(worker)
        # lowest priority, out of the terminal's foreground group, in our session (autogroups share CPU per session)
        assert os.sched_getscheduler(worker) == os.SCHED_IDLE and os.getpriority(os.PRIO_PROCESS, worker) == 19
        assert os.getpgid(worker) == worker and os.getsid(worker) == os.getsid(0)
        os.kill(worker, signal.SIGKILL)  # the worker alone: its ninja and compilers live on as orphans
        _wait_for(lambda: not Path(f"/proc/{worker}").exists() or "Z" in Path(f"/proc/{worker}/stat").read_text()
                  .split()[2], 30, "end of the killed worker")
        assert (build_dir / "lock").exists()  # what it left behind

        start = time.monotonic()
        second = subprocess.run([*run, "select"], env=env, capture_output=True, text=True, timeout=120)
        assert "BUILDING True" in second.stdout, second.stdout + second.stderr[-2000:]
        workers.append(int((build_dir / kernels.BUILD_LOCK).read_text().split()[0]))
        third = subprocess.run([*run, "foreground"], env=env, capture_output=True, text=True, timeout=300)
        assert "RESULT cpp: built" in third.stdout, third.stdout + third.stderr[-2000:]
        assert "is building this kernel; waiting up to" in third.stderr  # said why it waited
        assert time.monotonic() - start < 300
        assert lib(build_dir, next(build_dir.glob("sedac_cpu_*.so")).stem) is not None  # finished: no lock beside
        fourth = subprocess.run([*run, "cached"], env=env, capture_output=True, text=True, timeout=120)
        assert "RESULT cpp: built" in fourth.stdout, fourth.stdout + fourth.stderr[-2000:]
        worker_log = (build_dir / "worker.log").read_text()
        assert worker_log.count("sedac_core.build_worker cpp") == 2
    finally:
        for pid in workers:
            _kill_group(pid)  # the killed worker's orphaned ninja and compilers (its own process group)


# ------------------------------------------------------------------------------------- no CUDA_HOME warning
CUDA_TORCH_WITHOUT_GPU = textwrap.dedent("""
    import os, sys, torch
    # what a CUDA build of torch looks like on a machine without a GPU but with a CUDA toolkit (or CUDA_HOME set)
    torch.version.cuda = "12.8"
    torch.cuda._is_compiled = lambda: True
    torch.cuda.is_available = lambda: False
    os.environ["CUDA_HOME"] = sys.argv[1]
    if sys.argv[2] == "plain":
        import torch.utils.cpp_extension
    else:
        from pathlib import Path
        from sedac_core import kernels, matmul
        print(kernels.KernelManager(cache_root=Path(sys.argv[1])).cpu_build_blocker("cpp", kernels.CPU_SOURCES))
        print(kernels.kernel_status(build=False))
        print(matmul.GemmKernel(cache_root=Path(sys.argv[1])).status(build=False))
        kernels.cpp_extension()
""")


def test_no_cuda_home_warning_without_a_gpu(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run = [sys.executable, "-c", CUDA_TORCH_WITHOUT_GPU, str(tmp_path)]
    plain = subprocess.run([*run, "plain"], env=env, capture_output=True, text=True, timeout=120)
    assert "No CUDA runtime is found" in plain.stderr  # the simulation reproduces what users saw
    ours = subprocess.run([*run, "ours"], env=env, capture_output=True, text=True, timeout=120)
    assert ours.returncode == 0, ours.stderr[-2000:]
    assert "No CUDA runtime is found" not in ours.stderr + ours.stdout
