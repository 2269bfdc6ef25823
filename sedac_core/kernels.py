"""Build, load and choose the ext/ kernels (fused entropy + routing statistics): a C++ CPU kernel compiled once per
instruction set, and a CUDA kernel, JIT-built with torch.utils.cpp_extension into the user cache dir on first use.
Anything that goes wrong (no compiler, a failed build, no GPU) leaves the pure-torch reference in charge."""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .paths import bundled_dir, cache_dir

log = logging.getLogger("sedac.kernels")

BACKENDS = ("auto", "cuda", "cpp", "torch")

EXT_DIR = bundled_dir(__file__, "ext", "_ext", "stats_common.h")

# instruction-set codes shared with ext/sedac_cpu.cpp, and the compiler flags of each ISA's object
ISA_CODES = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}
ISA_FLAGS = {
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mavx2", "-mf16c"],
}
CPU_SOURCES = ("sedac_cpu.cpp", "isa_common.h", "stats_cpu_kernel.cpp", "stats_cpu_kernel.h", "stats_common.h",
               "stats_cpu_default.cpp", "stats_cpu_avx2.cpp", "stats_cpu_avx512.cpp")
CUDA_SOURCES = ("sedac_cuda.cpp", "stats_cuda_kernel.cu", "stats_cuda_kernel.h", "stats_common.h")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

StatsFn = Callable[[torch.Tensor, float, float], tuple]


@dataclass
class BuildResult:
    """What became of one backend's build: the loaded op (or None) and a one-line reason."""

    ok: bool
    reason: str
    op: StatsFn | None = None
    log_path: Path | None = None


def _short(text: str, limit: int = 160) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    for marker in ("error:", "error"):  # the first compiler error says more than the traceback's last line
        for ln in lines:
            if marker in ln.lower():
                return ln[:limit]
    return (lines[-1] if lines else "unknown error")[:limit]


STALE_LOCK_S = 900  # a build lock older than this was left by a killed build; cpp_extension would wait on it forever
COMPILE_TIMEOUT_S = 600  # one kernel object compiles in well under a minute; a compiler stuck longer is killed


def _clear_stale_lock(build_dir: Path) -> None:
    lock = build_dir / "lock"
    try:
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink()
    except OSError:
        pass


def _cxx() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


def host_isa() -> str:
    """The best instruction set the CPU (and torch, honouring ATEN_CPU_CAPABILITY) supports: AVX512, AVX2, DEFAULT."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "DEFAULT"
    cap = torch.backends.cpu.get_cpu_capability().upper()
    return cap if cap in ("AVX2", "AVX512") else "DEFAULT"


@dataclass
class KernelManager:
    """Builds and loads the kernels once per process and resolves which backend serves a tensor.

    One instance (`MANAGER`) serves the process: a loaded extension library cannot be unloaded, so this is the
    one place with process-wide state. Tests make their own instances (e.g. pointed at a bad source dir)."""

    src_dir: Path = EXT_DIR
    cache_root: Path | None = None  # default: <user cache>/sedac-chat/ext
    preference: str = "auto"
    isa: str | None = None  # default: host_isa()
    _cpu: BuildResult | None = field(default=None, repr=False)
    _cuda: BuildResult | None = field(default=None, repr=False)
    _warned: set = field(default_factory=set, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # ------------------------------------------------------------------ building
    def build_root(self) -> Path:
        return self.cache_root if self.cache_root is not None else cache_dir() / "ext"

    def _fingerprint(self, names: tuple[str, ...], extra: str) -> str:
        h = hashlib.sha256()
        for name in names:
            p = self.src_dir / name
            h.update(name.encode())
            h.update(p.read_bytes() if p.exists() else b"<missing>")
        h.update(f"{torch.__version__}|{sys.version_info[:2]}|{platform.machine()}|{extra}".encode())
        return h.hexdigest()[:16]

    def cpu_build_dir(self) -> Path:
        return self.build_root() / f"cpu-{self._fingerprint(CPU_SOURCES, _cxx() or '')}"

    def _common_cflags(self) -> list[str]:
        abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
        return ["-O3", "-std=c++20", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-w"]

    def _compile_isa_objects(
        self, build_dir: Path, cxx: str, stem: str = "stats_cpu"
    ) -> tuple[list[str], list[Path], list[str]]:
        """Compile the AVX2/AVX512 kernel objects `<stem>_<isa>.cpp` (per-file flags, which cpp_extension.load cannot
        give). Returns the ISAs built, their objects, and notes on any that failed (those are simply left out)."""
        from torch.utils.cpp_extension import include_paths

        if platform.machine().lower() not in ("x86_64", "amd64"):
            return [], [], []
        incs = [f"-I{p}" for p in include_paths()] + [f"-I{self.src_dir}"]
        jobs = {}
        for isa, flags in ISA_FLAGS.items():
            obj = build_dir / f"{stem}_{isa.lower()}.o"
            if obj.exists():
                jobs[isa] = (obj, None)
                continue
            tmp = obj.with_suffix(f".{os.getpid()}.tmp.o")
            cmd = [cxx, *self._common_cflags(), *flags, *incs, "-c",
                   str(self.src_dir / f"{stem}_{isa.lower()}.cpp"), "-o", str(tmp)]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            jobs[isa] = (obj, (proc, tmp))
        built, objs, notes = [], [], []
        for isa, (obj, job) in jobs.items():
            if job is not None:
                proc, tmp = job
                try:
                    out, _ = proc.communicate(timeout=COMPILE_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    out = (proc.communicate()[0] or "") + f"\ncompiler killed after {COMPILE_TIMEOUT_S} s"
                (build_dir / f"{stem}_{isa.lower()}.log").write_text(out or "")
                if proc.returncode != 0 or not tmp.exists():
                    notes.append(f"{isa} kernel not compiled ({_short(out)})")
                    continue
                os.replace(tmp, obj)
            built.append(isa)
            objs.append(obj)
        return built, objs, notes

    def cpu_build_blocker(self, label: str, sources: tuple[str, ...]) -> tuple[str | None, BuildResult | None]:
        """What a C++ build needs before it starts: (the compiler, None), or (None, the one-line reason it cannot
        build, labelled e.g. "cpp" or "matmul"): no compiler, missing sources, or no ninja."""
        cxx = _cxx()
        if cxx is None:
            return None, BuildResult(False, f"{label}: no compiler, using torch")
        if any(not (self.src_dir / n).exists() for n in sources):
            return None, BuildResult(False, f"{label}: kernel sources not found in {self.src_dir}, using torch")
        try:
            from torch.utils.cpp_extension import verify_ninja_availability

            verify_ninja_availability()
        except Exception:  # noqa: BLE001 - any import/ninja problem means: no build
            return None, BuildResult(False, f"{label}: ninja not installed (pip install ninja), using torch")
        return cxx, None

    def _build_cpu(self) -> BuildResult:
        cxx, blocked = self.cpu_build_blocker("cpp", CPU_SOURCES)
        if blocked is not None:
            return blocked
        assert cxx is not None
        from torch.utils.cpp_extension import load
        build_dir = self.cpu_build_dir()
        build_dir.mkdir(parents=True, exist_ok=True)
        _clear_stale_lock(build_dir)
        log_path = build_dir / "build.log"
        try:
            isas, objs, notes = self._compile_isa_objects(build_dir, cxx)
            defines = [f"-DSEDAC_HAVE_{isa}" for isa in isas]
            omp = ["-fopenmp"] if "parallel backend: OpenMP" in torch.__config__.parallel_info() else []
            load(
                name=f"sedac_cpu_{build_dir.name.split('-')[-1][:8]}",
                sources=[str(self.src_dir / "sedac_cpu.cpp"), str(self.src_dir / "stats_cpu_default.cpp")],
                # -fopenmp: at::parallel_for is header code; without it the OpenMP pragma is ignored and the
                # kernel runs on one thread
                extra_cflags=["-O3", *omp, *defines],
                extra_include_paths=[str(self.src_dir)],
                # the ISA objects come after the binding and DEFAULT objects on the link line, so for any inline
                # function they share, the linker keeps the copy built for the baseline ISA
                extra_ldflags=[str(o) for o in objs] + omp,
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=False,
            )
            op = torch.ops.sedac_cpu.token_stats.default
            compiled = {code for code in torch.ops.sedac_cpu.compiled_isas()}
        except Exception as exc:  # noqa: BLE001 - a failed build must never crash the caller
            log_path.write_text(f"{type(exc).__name__}: {exc}\n")
            return BuildResult(False, f"cpp: build failed ({_short(str(exc))}), using torch", log_path=log_path)
        want = (self.isa or host_isa()).upper()
        order = ["AVX512", "AVX2", "DEFAULT"]
        candidates = order[order.index(want):] if want in order else ["DEFAULT"]
        isa = next(c for c in candidates if ISA_CODES[c] in compiled or c == "DEFAULT")
        if isa != want:
            notes.append(f"{want} kernel not available, using {isa}")
        code = ISA_CODES[isa]

        def run(logits: torch.Tensor, tau_low: float, tau_high: float, _op=op, _code=code) -> tuple:
            return _op(logits, tau_low, tau_high, _code)

        note = f"; {'; '.join(notes)}" if notes else ""
        return BuildResult(True, f"cpp: built ({isa.lower()}){note}", run, log_path)

    def cuda_build_dir(self) -> Path:
        return self.build_root() / f"cuda-{self._fingerprint(CUDA_SOURCES, str(torch.version.cuda))}"

    def _build_cuda(self) -> BuildResult:
        if torch.version.cuda is None:
            return BuildResult(False, "cuda: no GPU (this torch is built without CUDA)")
        if not torch.cuda.is_available():
            return BuildResult(False, "cuda: no GPU")
        try:
            from torch.utils.cpp_extension import CUDA_HOME, load
        except Exception as exc:  # noqa: BLE001
            return BuildResult(False, f"cuda: cpp_extension unavailable ({_short(str(exc))})")
        if CUDA_HOME is None or _cxx() is None:
            return BuildResult(False, "cuda: no CUDA toolkit (nvcc) or compiler, using torch")
        missing = [n for n in CUDA_SOURCES if not (self.src_dir / n).exists()]
        if missing:
            return BuildResult(False, f"cuda: kernel sources not found in {self.src_dir}")
        build_dir = self.cuda_build_dir()
        build_dir.mkdir(parents=True, exist_ok=True)
        _clear_stale_lock(build_dir)
        log_path = build_dir / "build.log"
        try:
            load(
                name=f"sedac_cuda_{build_dir.name.split('-')[-1][:8]}",
                sources=[str(self.src_dir / "sedac_cuda.cpp"), str(self.src_dir / "stats_cuda_kernel.cu")],
                extra_cflags=["-O3"],
                extra_cuda_cflags=["-O3"],
                extra_include_paths=[str(self.src_dir)],
                build_directory=str(build_dir),
                is_python_module=False,
                with_cuda=True,
                verbose=False,
            )
            op = torch.ops.sedac_cuda.token_stats.default
        except Exception as exc:  # noqa: BLE001
            log_path.write_text(f"{type(exc).__name__}: {exc}\n")
            return BuildResult(False, f"cuda: build failed ({_short(str(exc))})", log_path=log_path)

        def run(logits: torch.Tensor, tau_low: float, tau_high: float, _op=op) -> tuple:
            return _op(logits, tau_low, tau_high)

        return BuildResult(True, "cuda: built", run, log_path)

    def cpu(self) -> BuildResult:
        """The CPU kernel, built and loaded on first call (a failure is remembered, with a one-line notice)."""
        if self._cpu is None:
            with self._lock:
                if self._cpu is None:
                    self._cpu = self._build_cpu()
                    self._notice(self._cpu)
        return self._cpu

    def cuda(self) -> BuildResult:
        if self._cuda is None:
            with self._lock:
                if self._cuda is None:
                    self._cuda = self._build_cuda()
                    if torch.cuda.is_available():
                        self._notice(self._cuda)
        return self._cuda

    def _notice(self, result: BuildResult) -> None:
        if result.ok or "failed" not in result.reason or result.reason in self._warned:
            return
        self._warned.add(result.reason)
        where = f" (log: {result.log_path})" if result.log_path else ""
        log.warning("sedac: %s%s", result.reason, where)

    # ------------------------------------------------------------------ choosing
    def set_preference(self, name: str) -> None:
        if name not in BACKENDS:
            raise ValueError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}")
        self.preference = name

    def status(self, build: bool = True) -> list[tuple[str, bool, str]]:
        """(backend, available, reason) for cuda, cpp and torch. build=False reports without building."""
        out = []
        for name, get, cached in (("cuda", self.cuda, self._cuda), ("cpp", self.cpu, self._cpu)):
            if cached is None and not build:
                if name == "cpp" and _cxx() is None:
                    out.append((name, False, "cpp: no compiler, using torch"))
                elif name == "cuda" and not torch.cuda.is_available():
                    out.append((name, False, "cuda: no GPU"))
                else:
                    out.append((name, False, f"{name}: not built yet (builds on first use)"))
                continue
            res = get()
            out.append((name, res.ok, res.reason))
        out.append(("torch", True, "torch: pure-torch reference"))
        return out

    def active(self, preference: str | None = None) -> tuple[str, str]:
        """The backend that serves logits on the best local device, and why."""
        pref = preference or self.preference
        if pref not in BACKENDS:
            raise ValueError(f"unknown kernel backend {pref!r}; choose one of {', '.join(BACKENDS)}")
        if pref == "torch":
            return "torch", "torch: selected in config"
        notes = []
        if pref in ("auto", "cuda"):
            res = self.cuda()
            if res.ok:
                return "cuda", res.reason
            if pref == "cuda" or torch.cuda.is_available():
                notes.append(res.reason)
        res = self.cpu()
        if res.ok:
            return "cpp", "; ".join([*notes, res.reason])
        notes.append(res.reason if res.reason.endswith("using torch") else f"{res.reason}, using torch")
        return "torch", "; ".join(notes)

    def kernel_for(self, logits: torch.Tensor) -> StatsFn | None:
        """The kernel that should compute stats for these logits, or None for the torch reference."""
        pref = self.preference
        if pref == "torch" or logits.dtype not in KERNEL_DTYPES or logits.dim() == 0 or logits.shape[-1] == 0:
            return None
        if logits.requires_grad and torch.is_grad_enabled():
            return None  # the reference stays differentiable; the kernels are inference-only
        if logits.device.type == "cuda":
            if pref in ("auto", "cuda"):
                res = self.cuda()
                return res.op if res.ok else None
            return None
        if logits.device.type == "cpu" and pref in ("auto", "cpp", "cuda"):
            res = self.cpu()
            return res.op if res.ok else None
        return None


MANAGER = KernelManager()


def set_backend(name: str) -> None:
    """Select `performance.kernel_backend` (auto | cuda | cpp | torch) for token_stats()."""
    MANAGER.set_preference(name)


def get_backend() -> str:
    return MANAGER.preference


def kernel_status(build: bool = True) -> list[tuple[str, bool, str]]:
    """[(backend, available, reason)] for cuda, cpp, torch, e.g. ("cuda", False, "cuda: no GPU")."""
    return MANAGER.status(build=build)


def active_backend(preference: str = "auto") -> tuple[str, str]:
    """(name, reason) of the backend `preference` resolves to, e.g. ("cpp", "cuda: no GPU; cpp: built (avx512)")."""
    return MANAGER.active(preference)
