"""Skinny matmuls for a few rows on CPU: `linear_rows(x, weight, bias)` is `F.linear` for an input-major weight
(see anatomy._fuse_linears), computed by the ext/ skinny_gemm kernel where it applies, else by torch.

Why: torch's small-M GEMM on CPU costs 2-6x its one-row time for 2-8 rows although the weights (the memory traffic)
are read once either way; the kernel reads them once for up to 16 rows (the lossless mode's batched verify), and
each row's result is bitwise the same whatever the number of rows, so a batched pass reproduces one-token decoding."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import kernels
from .kernels import EXT_DIR, ISA_CODES, BuildResult, KernelManager

log = logging.getLogger("sedac.kernels")

MAX_ROWS = 16  # rows the kernel takes (kMaxRows in ext/skinny_gemm.cpp); more go to torch, efficient there
FORCE_TORCH_ENV = "SEDAC_MATMUL_TORCH"  # set to 1 to keep every matmul on torch
GEMM_SOURCES = ("skinny_gemm.cpp", "isa_common.h", "skinny_gemm_kernel.cpp", "skinny_gemm_kernel.h",
                "skinny_gemm_default.cpp", "skinny_gemm_avx2.cpp", "skinny_gemm_avx512.cpp")

GemmFn = Callable[..., torch.Tensor]  # (x, weight, bias=None) -> F.linear(x, weight, bias)


def _env_forces_torch() -> bool:
    return os.environ.get(FORCE_TORCH_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class GemmKernel:
    """Builds and loads the skinny-matmul kernel once per process (with kernels.py's machinery: per-ISA objects,
    the user cache dir, the build lock, one-line reasons) and says whether it serves `linear_rows`.

    One instance (`GEMM`) serves the process, like kernels.MANAGER; tests make their own."""

    src_dir: Path = EXT_DIR
    cache_root: Path | None = None  # default: <user cache>/sedac-chat/ext
    isa: str | None = None  # default: kernels.host_isa(); DEFAULT (the portable scalar build) only if asked for
    enabled: bool = field(default_factory=lambda: not _env_forces_torch())
    _result: BuildResult | None = field(default=None, repr=False)
    _fast: tuple | None = field(default=None, repr=False)  # (op, isa code) once built and enabled: the hot path
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # _thread; held briefly
    # held for a whole build or load: a caller that must not wait (build_in_background, load_cached) never takes
    # it blocking, so a generation never queues behind a compile
    _build_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def _manager(self) -> KernelManager:
        return KernelManager(src_dir=self.src_dir, cache_root=self.cache_root)

    def build_dir(self) -> Path:
        mgr = self._manager()
        return mgr.build_root() / f"gemm-{mgr._fingerprint(GEMM_SOURCES, kernels._cxx() or '')}"

    def _library_name(self, build_dir: Path) -> str:
        return f"sedac_gemm_{build_dir.name.split('-')[-1][:8]}"

    def _build(self, mode: str = "foreground") -> BuildResult | None:
        """Build (or load from disk) the kernel. mode: "cached" (load a finished build, else None), "foreground"
        (build here), "background" (build in a worker process, then load): see kernels.load_or_build."""
        want = (self.isa or kernels.host_isa()).upper()
        if want == "DEFAULT" and self.isa is None:  # the portable scalar build is ~10x slower than torch's GEMM
            return BuildResult(False, "matmul: needs AVX2 or AVX512, using torch")
        mgr = self._manager()
        cxx, blocked = mgr.cpu_build_blocker("matmul", GEMM_SOURCES)
        if blocked is not None:
            return blocked
        assert cxx is not None
        build_dir = self.build_dir()
        log_path = build_dir / "build.log"
        if mode == "background":
            ok, reason, worker_log = kernels.build_in_worker("matmul", build_dir, self._library_name(build_dir),
                                                             self.src_dir, self.cache_root, self.isa)
            res = self._build("cached") if ok else None
            return res or BuildResult(False, reason if not ok else "matmul: build failed (no library after the "
                                      "build), using torch", log_path=worker_log)
        notes: list[str] = []

        def build() -> None:
            isas, objs, isa_notes = mgr._compile_isa_objects(build_dir, cxx, stem="skinny_gemm")
            notes.extend(isa_notes)
            defines = [f"-DSEDAC_HAVE_{isa}" for isa in isas]
            omp = ["-fopenmp"] if "parallel backend: OpenMP" in torch.__config__.parallel_info() else []
            kernels.cpp_extension().load(
                name=self._library_name(build_dir),
                sources=[str(self.src_dir / "skinny_gemm.cpp"), str(self.src_dir / "skinny_gemm_default.cpp")],
                extra_cflags=["-O3", *omp, *defines],  # -fopenmp: see KernelManager._build_cpu
                extra_include_paths=[str(self.src_dir)],
                extra_ldflags=[str(o) for o in objs] + omp,
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=False,
            )

        try:
            if not kernels.load_or_build("matmul", build_dir, self._library_name(build_dir), build, mode):
                return None
            op = torch.ops.sedac_gemm.linear.default
            compiled = set(torch.ops.sedac_gemm.compiled_isas())
        except Exception as exc:  # noqa: BLE001 - a failed build must never crash the caller
            with contextlib.suppress(OSError):
                log_path.write_text(f"{type(exc).__name__}: {exc}\n")
            return BuildResult(False, f"matmul: build failed ({kernels._short(str(exc))}), using torch",
                               log_path=log_path)
        if ISA_CODES.get(want) not in compiled:
            note = f"; {'; '.join(notes)}" if notes else ""
            return BuildResult(False, f"matmul: {want} kernel not available{note}, using torch", log_path=log_path)
        code = ISA_CODES[want]

        def run(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, _op=op, _code=code
                ) -> torch.Tensor:
            return _op(x, weight, bias, _code)

        run.op, run.isa_code = op, code  # type: ignore[attr-defined]

        return BuildResult(True, f"matmul: built ({want.lower()})", run, log_path)

    def _settle(self, res: BuildResult) -> None:
        if not res.ok and "failed" in res.reason:
            where = f" (log: {res.log_path})" if res.log_path else ""
            log.warning("sedac: %s%s", res.reason, where)
        self._result = res

    def result(self) -> BuildResult:
        """The build, done on first call (or the background build, waited for); a failure is remembered and
        logged once (one line)."""
        if self._result is None:
            with self._build_lock:
                if self._result is None:
                    res = self._build("foreground")
                    assert res is not None
                    self._settle(res)
        assert self._result is not None
        return self._result

    def _build_in_thread(self) -> None:
        with self._build_lock:
            if self._result is None:
                res = self._build("background")
                assert res is not None
                self._settle(res)

    def runner(self, build: bool = True) -> GemmFn | None:
        """`F.linear` served by the kernel where it applies, or None where torch serves everything (switched off,
        no build, or with build=False: not built yet). build=True builds on first call, or waits for the build."""
        if not self.enabled:
            return None
        res = self._result
        if res is None:
            if not build:
                return None
            res = self.result()
        if res.ok and self._fast is None:
            self._fast = (res.op.op, res.op.isa_code)  # type: ignore[union-attr]
        return res.op if res.ok else None

    def build_in_background(self) -> None:
        """Start the build in the background (once): a daemon thread waits for a low-priority worker process
        (kernels.build_in_worker); `ready()` says when it is done. Never waits."""
        if not self.enabled or self._result is not None:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._build_in_thread, name="sedac-matmul-build",
                                                daemon=True)
                self._thread.start()

    def load_cached(self) -> bool:
        """Load a finished build from disk (a fraction of a second; measured 0.13 s), never compiling or waiting for
        a build; whether the kernel is ready now."""
        if self._thread is not None:  # the background build loads it when done
            return self.ready()
        if self.enabled and self._result is None and self._build_lock.acquire(blocking=False):
            try:
                if self._result is None and (res := self._build("cached")) is not None:
                    self._settle(res)
            finally:
                self._build_lock.release()
        return self.ready()

    def wait(self, timeout: float | None = None) -> bool:
        """Build (in the background, once) and wait up to `timeout` seconds for it; whether the kernel is ready."""
        if self.load_cached():
            return True
        self.build_in_background()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.ready()

    def cached(self) -> bool:
        """Whether a finished build of these sources with this compiler is on disk (and not loaded here yet)."""
        if not self.enabled or self._result is not None:
            return False
        d = self.build_dir()
        return kernels.finished_library(d, self._library_name(d)) is not None

    def building(self) -> bool:
        """Whether the build is running in the background now."""
        return self._thread is not None and self._thread.is_alive()

    def ready(self) -> bool:
        """Whether the kernel is built, loaded and enabled, without building or waiting for it."""
        return self.enabled and self._result is not None and self._result.ok

    def set_enabled(self, enabled: bool) -> None:
        self.enabled = bool(enabled)
        self._fast = None

    def status(self, build: bool = True) -> tuple[bool, str]:
        """(active, one-line reason), e.g. (True, "matmul: built (avx512)"). build=False reports without building."""
        if not self.enabled:
            return False, f"matmul: torch ({FORCE_TORCH_ENV} or set_matmul_kernel(False))"
        if self._result is None and not build:
            if self.building():
                return False, "matmul: building in the background (torch serves meanwhile)"
            return False, "matmul: not built yet (builds on first use)"
        res = self.result()
        return res.ok, res.reason


GEMM = GemmKernel()


def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`: x [..., in], weight the [out, in] view of an input-major ([in, out] contiguous)
    storage, bias [out] or None. The kernel serves CPU tensors with at most MAX_ROWS rows, a weight of fp32
    (or bf16/fp16, with x and bias of the same dtype; accumulated in fp32) whose .t() is contiguous, outside
    autograd; anything else goes to F.linear (the check runs in C++: the call costs about one F.linear dispatch).
    On the kernel, a row's result is bitwise the same for any number of rows."""
    fast = GEMM._fast
    if fast is None:
        if GEMM.runner(build=False) is None:  # never waits for a compile: torch serves until it is built
            return F.linear(x, weight, bias)
        fast = GEMM._fast
    op, code = fast
    return op(x, weight, bias, code)


def kernel_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether linear_rows(x, weight, bias) runs on the kernel (False wherever it falls back to F.linear)."""
    return GEMM.runner() is not None and bool(torch.ops.sedac_gemm.applies(x, weight, bias))


def matmul_status(build: bool = True) -> tuple[bool, str]:
    """(active, reason) of the skinny-matmul kernel, e.g. (True, "matmul: built (avx512)")."""
    return GEMM.status(build=build)


def matmul_linear(wait: bool = False) -> GemmFn:
    """What a model's matmuls should call from now until the next generation: `linear_rows` when the kernel is
    ready, else `F.linear`. The engine asks per generation, so this is also the generation boundary at which the
    statistics kernel (kernels.select_kernels) switches.

    Without `wait` this never waits for a compiler: it loads a build already on disk (a fraction of a second),
    else starts the build in the background (low priority) and answers F.linear until it is done, so a caller that
    asks again later picks the kernel up. With `wait` it builds, or waits for the build, first."""
    kernels.select_kernels(wait=wait)
    if wait:
        return linear_rows if GEMM.runner() is not None else F.linear
    if GEMM.ready() or GEMM.load_cached():
        GEMM.runner()  # sets the hot path
        return linear_rows
    GEMM.build_in_background()
    return F.linear


def matmul_kernel_active() -> bool:
    """Whether linear_rows uses the kernel (builds it on first call)."""
    return GEMM.runner() is not None


def set_matmul_kernel(enabled: bool) -> None:
    """Switch the kernel on or off for this process (off: every linear_rows is F.linear)."""
    GEMM.set_enabled(enabled)
