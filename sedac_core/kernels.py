"""Build, load and choose the ext/ kernels (fused entropy + routing statistics): a C++ CPU kernel compiled once per
instruction set, and a CUDA kernel, JIT-built with torch.utils.cpp_extension into the user cache dir on first use.
Anything that goes wrong (no compiler, a failed build, no GPU) leaves the pure-torch reference in charge.

Nothing on the generation path waits for a compiler: a finished build on disk is loaded (a fraction of a second),
otherwise a low-priority worker process builds it while torch serves, and the kernel takes over at a generation
boundary (select_kernels). A build holds an flock in its build dir, so a build killed by a signal leaves nothing
that makes a later one wait. The skinny-matmul kernel (matmul.py) uses the same machinery."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

from .paths import bundled_dir, cache_dir

try:
    import fcntl
except ImportError:  # Windows: no flock; stale torch locks are then cleared by age only
    fcntl = None  # type: ignore[assignment]

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
LIB_EXT = ".pyd" if sys.platform == "win32" else ".so"  # = cpp_extension.LIB_EXT, without importing it

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


COMPILE_TIMEOUT_S = 600  # one kernel object compiles in well under a minute; a compiler stuck longer is killed
# how long a build waits for another process's build of the same kernel (it holds BUILD_LOCK) before using torch;
# a kernel takes 25-60 s to build on 2 idle cores, longer at low priority beside a running generation
BUILD_WAIT_S = 600.0
BUILD_LOCK = "sedac-build.lock"  # our flock, held around a whole build + load; the kernel drops it when we die
TORCH_LOCK = "lock"  # cpp_extension's FileBaton: a file that a killed build leaves behind, and load() waits on
STALE_LOCK_S = 900  # without flock (Windows): a torch lock older than this is taken as left by a killed build
# a background build's process (sedac_core.build_worker, and the ninja and compilers it starts) runs at this
# niceness, and on Linux as SCHED_IDLE: on 2 cores a build at normal priority cut decoding from ~22 to 6.3 tok/s
# (torch's parallel regions wait for their slowest thread); niced, 22.6; SCHED_IDLE, 23.5
BUILD_NICENESS = 19
# a background build waits at most this long for its worker (which itself waits up to BUILD_WAIT_S for another
# process's build, then compiles); past it the worker is killed and torch serves
WORKER_TIMEOUT_S = BUILD_WAIT_S + 2 * COMPILE_TIMEOUT_S


def cpp_extension() -> ModuleType:
    """torch.utils.cpp_extension, imported without its "No CUDA runtime is found, using CUDA_HOME=..." warning.

    A CUDA build of torch on a machine without a GPU logs that at import time when it finds a CUDA toolkit; we
    only use CUDA_HOME after torch.cuda.is_available(), so there it says nothing the user can act on."""
    module = sys.modules.get("torch.utils.cpp_extension")
    if module is not None:
        return module
    logger = logging.getLogger("torch.utils.cpp_extension")

    def drop(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")

    logger.addFilter(drop)
    try:
        import torch.utils.cpp_extension as module
    finally:
        logger.removeFilter(drop)
    return module


def finished_library(build_dir: Path, name: str) -> Path | None:
    """The library `name` when a finished build of it is on disk, else None. cpp_extension holds its lock file from
    before ninja starts until it ends, so a library beside a lock file is being built, or its build was killed
    (and the file may be a partial link)."""
    lib = build_dir / f"{name}{LIB_EXT}"
    if lib.is_file() and not (build_dir / TORCH_LOCK).exists():
        return lib
    return None


def _clear_interrupted_build(build_dir: Path, name: str) -> None:
    """Under BUILD_LOCK no other process of ours is building here, so a torch lock file was left by a killed build:
    remove it (load() would wait on it forever), and the library beside it, which may be half written (ninja
    links it again)."""
    lock = build_dir / TORCH_LOCK
    if not lock.exists():
        return
    if fcntl is None and time.time() - lock.stat().st_mtime < STALE_LOCK_S:
        return  # no flock to tell a live build from a dead one: only an old lock is surely stale
    log.info("sedac: removing the lock of an interrupted build in %s", build_dir)
    for path in (lock, build_dir / f"{name}{LIB_EXT}"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def build_lock(build_dir: Path, label: str, wait_s: float | None = None,
               announce: Callable[..., None] | None = None) -> Iterator[bool]:
    """Hold an exclusive flock on build_dir/BUILD_LOCK for a build; yields whether it is held. Another process of
    ours holding it is building the same kernel: wait up to `wait_s` (default BUILD_WAIT_S), telling `announce`
    once, and yield False if it is still held then. The OS drops the lock when its holder dies, however it dies,
    so a killed build never leaves this lock behind."""
    if fcntl is None:
        yield True
        return
    wait_s = BUILD_WAIT_S if wait_s is None else wait_s
    path = build_dir / BUILD_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                if not told and announce is not None:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    announce("sedac: %s: another process (pid %s) is building this kernel; waiting up to %.0f s "
                             "for it (lock: %s)", label, holder, wait_s, path)
                    told = True
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # who holds it, for the message above
        yield True
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def load_or_build(label: str, build_dir: Path, name: str, build: Callable[[], object], mode: str = "foreground"
                  ) -> bool:
    """Load the extension library `name` from build_dir, running `build()` first (which builds and loads it, e.g.
    with cpp_extension.load) unless a finished build is on disk, which is loaded without ninja or a compiler.

    mode "cached": only load a finished build; False if there is none (nothing waits for a compiler).
    "foreground": build here under BUILD_LOCK, clearing what a killed build left, and say so (a log warning) when
    waiting for another process's build. Raises if the build fails or that wait times out."""
    lib = finished_library(build_dir, name)
    if lib is None:
        if mode == "cached":
            return False
        build_dir.mkdir(parents=True, exist_ok=True)
        with build_lock(build_dir, label, announce=log.warning) as held:
            if not held:
                raise TimeoutError(f"another process held {build_dir / BUILD_LOCK} for {BUILD_WAIT_S:.0f} s")
            lib = finished_library(build_dir, name)  # that process may have finished it while we waited
            if lib is None:
                _clear_interrupted_build(build_dir, name)
                build()
                return True
    torch.ops.load_library(str(lib))
    return True


def build_in_worker(kind: str, build_dir: Path, name: str, src_dir: Path, cache_root: Path | None, isa: str | None
                    ) -> tuple[bool, str, Path | None]:
    """Build kernel `kind` ("cpp", "cuda", "matmul") in a worker process (sedac_core.build_worker) and wait for it;
    (ok, reason, log path). The worker runs at the lowest CPU priority, so it takes next to nothing from decoding,
    and it finishes when the process that started it exits first (a one-shot `ask`) or is interrupted from the
    terminal: the next start then loads the library from disk. The caller loads it (load_or_build "cached").

    The worker gets a process group of its own (Ctrl-C in the terminal goes to the foreground group only) but
    stays in our session: with autogroup scheduling (on in most Linux distributions) CPU time is shared between
    sessions first, so a worker in a session of its own competed as an equal whatever its niceness (measured on 2
    cores: decoding at 3.8-4.7 tok/s beside it, 22.6 beside the same worker in our session, 21.6-24.1 alone)."""
    build_dir.mkdir(parents=True, exist_ok=True)
    log_path = build_dir / "worker.log"
    # another process's build of this kernel: wait for it here rather than in a worker of our own (each worker
    # imports torch, a few hundred MB, and a start per `ask` would pile them up while one build runs)
    with build_lock(build_dir, kind, announce=log.info) as free:
        pass
    if not free:
        return False, f"{kind}: build failed (another process held {build_dir / BUILD_LOCK} for " \
                      f"{BUILD_WAIT_S:.0f} s), using torch", log_path
    if finished_library(build_dir, name) is not None:
        return True, f"{kind}: built by another process", log_path
    cmd = [sys.executable, "-m", "sedac_core.build_worker", kind, "--src-dir", str(src_dir)]
    if cache_root is not None:
        cmd += ["--cache-root", str(cache_root)]
    if isa is not None:
        cmd += ["--isa", isa]
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parents[1])  # this copy of sedac_core, whatever the worker's cwd
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(log_path, "a") as err:
        err.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: {' '.join(cmd)}\n")
        err.flush()
        group = {"process_group": 0} if hasattr(os, "setpgid") else {}
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, env=env,
                                text=True, **group)
    try:
        out, _ = proc.communicate(timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the worker's group: its ninja and compilers too
        except (AttributeError, OSError):  # no process groups (Windows), or already gone
            proc.kill()
        proc.communicate()
        return False, f"{kind}: build failed (no result after {WORKER_TIMEOUT_S:.0f} s), using torch", log_path
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            try:
                got = json.loads(line)
                return bool(got["ok"]), str(got["reason"]), Path(got["log"]) if got.get("log") else log_path
            except (ValueError, KeyError):
                break
    return False, f"{kind}: build failed (the build process exited with {proc.returncode}), using torch", log_path


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
    # what kernel_for serves, per backend ("cpp", "cuda"); a background build's result waits in _built until a
    # generation boundary (select()) publishes it, so one generation never mixes two arithmetics
    _cpu: BuildResult | None = field(default=None, repr=False)
    _cuda: BuildResult | None = field(default=None, repr=False)
    _built: dict = field(default_factory=dict, repr=False)
    _threads: dict = field(default_factory=dict, repr=False)
    _tried: set = field(default_factory=set, repr=False)  # backends whose first use already happened
    _boundaries: bool = False  # set once a caller marks generation boundaries (select)
    _warned: set = field(default_factory=set, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # the fields above; held briefly
    _build_locks: dict = field(default_factory=lambda: {"cpp": threading.Lock(), "cuda": threading.Lock()},
                               repr=False)  # held for a whole build or load, per backend

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
        include_paths = cpp_extension().include_paths

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
            cpp_extension().verify_ninja_availability()
        except Exception:  # noqa: BLE001 - any import/ninja problem means: no build
            return None, BuildResult(False, f"{label}: ninja not installed (pip install ninja), using torch")
        return cxx, None

    def _build_cpu(self, mode: str = "foreground") -> BuildResult | None:
        """Build (or load from disk) the CPU kernel. mode: "cached" (load a finished build, else None), "foreground"
        (build here), "background" (build in a worker process, then load): see load_or_build, build_in_worker."""
        cxx, blocked = self.cpu_build_blocker("cpp", CPU_SOURCES)
        if blocked is not None:
            return blocked
        assert cxx is not None
        build_dir = self.cpu_build_dir()
        log_path = build_dir / "build.log"
        name = f"sedac_cpu_{build_dir.name.split('-')[-1][:8]}"
        if mode == "background":
            ok, reason, worker_log = build_in_worker("cpp", build_dir, name, self.src_dir, self.cache_root, self.isa)
            res = self._build_cpu("cached") if ok else None
            return res or BuildResult(False, reason if not ok else "cpp: build failed (no library after the build), "
                                      "using torch", log_path=worker_log)
        notes: list[str] = []

        def build() -> None:
            isas, objs, isa_notes = self._compile_isa_objects(build_dir, cxx)
            notes.extend(isa_notes)
            defines = [f"-DSEDAC_HAVE_{isa}" for isa in isas]
            omp = ["-fopenmp"] if "parallel backend: OpenMP" in torch.__config__.parallel_info() else []
            cpp_extension().load(
                name=name,
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

        try:
            if not load_or_build("cpp", build_dir, name, build, mode):
                return None
            op = torch.ops.sedac_cpu.token_stats.default
            compiled = {code for code in torch.ops.sedac_cpu.compiled_isas()}
        except Exception as exc:  # noqa: BLE001 - a failed build must never crash the caller
            with contextlib.suppress(OSError):
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

    def _build_cuda(self, mode: str = "foreground") -> BuildResult | None:
        if torch.version.cuda is None:
            return BuildResult(False, "cuda: no GPU (this torch is built without CUDA)")
        if not torch.cuda.is_available():  # before cpp_extension, which looks for a CUDA toolkit at import
            return BuildResult(False, "cuda: no GPU")
        try:
            ext = cpp_extension()
        except Exception as exc:  # noqa: BLE001
            return BuildResult(False, f"cuda: cpp_extension unavailable ({_short(str(exc))})")
        if ext.CUDA_HOME is None or _cxx() is None:
            return BuildResult(False, "cuda: no CUDA toolkit (nvcc) or compiler, using torch")
        missing = [n for n in CUDA_SOURCES if not (self.src_dir / n).exists()]
        if missing:
            return BuildResult(False, f"cuda: kernel sources not found in {self.src_dir}")
        build_dir = self.cuda_build_dir()
        log_path = build_dir / "build.log"
        name = f"sedac_cuda_{build_dir.name.split('-')[-1][:8]}"
        if mode == "background":
            ok, reason, worker_log = build_in_worker("cuda", build_dir, name, self.src_dir, self.cache_root, self.isa)
            res = self._build_cuda("cached") if ok else None
            return res or BuildResult(False, reason if not ok else "cuda: build failed (no library after the build)",
                                      log_path=worker_log)

        def build() -> None:
            ext.load(
                name=name,
                sources=[str(self.src_dir / "sedac_cuda.cpp"), str(self.src_dir / "stats_cuda_kernel.cu")],
                extra_cflags=["-O3"],
                extra_cuda_cflags=["-O3"],
                extra_include_paths=[str(self.src_dir)],
                build_directory=str(build_dir),
                is_python_module=False,
                with_cuda=True,
                verbose=False,
            )

        try:
            if not load_or_build("cuda", build_dir, name, build, mode):
                return None
            op = torch.ops.sedac_cuda.token_stats.default
        except Exception as exc:  # noqa: BLE001
            with contextlib.suppress(OSError):
                log_path.write_text(f"{type(exc).__name__}: {exc}\n")
            return BuildResult(False, f"cuda: build failed ({_short(str(exc))})", log_path=log_path)

        def run(logits: torch.Tensor, tau_low: float, tau_high: float, _op=op) -> tuple:
            return _op(logits, tau_low, tau_high)

        return BuildResult(True, "cuda: built", run, log_path)

    # ------------------------------------------------------------------ when builds happen
    def _builder(self, backend: str) -> Callable[[str], BuildResult | None]:
        return self._build_cpu if backend == "cpp" else self._build_cuda

    def _published(self, backend: str) -> BuildResult | None:
        return self._cpu if backend == "cpp" else self._cuda

    def _publish(self, backend: str, result: BuildResult) -> None:
        if backend == "cpp":
            self._cpu = result
        else:
            self._cuda = result
        if backend == "cpp" or torch.cuda.is_available():
            self._notice(result)

    def _ensure(self, backend: str) -> BuildResult:
        """The backend's kernel for a caller that waits: published now, built here (or by the background build
        already running, waited for) where needed."""
        if self._published(backend) is None:
            with self._build_locks[backend]:
                if self._published(backend) is None:
                    with self._lock:
                        res = self._built.pop(backend, None)
                        self._tried.add(backend)
                    self._publish(backend, res if res is not None else self._builder(backend)("foreground"))
        res = self._published(backend)
        assert res is not None
        return res

    def _background(self, backend: str) -> None:
        with self._build_locks[backend]:
            if self._published(backend) is not None or backend in self._built:
                return
            res = self._builder(backend)("background")
            assert res is not None
            if backend == "cpp" or torch.cuda.is_available():
                self._notice(res)
            with self._lock:
                self._built[backend] = res

    def _first_use(self, backend: str) -> None:
        """Without waiting for a compiler: load a finished build from disk (a fraction of a second), take a reason
        that needs no build (no GPU, no compiler), or else start the build in the background (a daemon thread that
        waits for a low-priority worker process)."""
        with self._lock:
            if backend in self._tried:
                return
            self._tried.add(backend)
        lock = self._build_locks[backend]
        if not lock.acquire(blocking=False):
            return  # another thread is building it (cpu()/cuda()); it publishes the result
        try:
            res = self._builder(backend)("cached")
            if res is not None:
                self._publish(backend, res)
                return
        finally:
            lock.release()
        with self._lock:
            thread = threading.Thread(target=self._background, args=(backend,), name=f"sedac-{backend}-build",
                                      daemon=True)
            self._threads[backend] = thread
            thread.start()

    def _serving(self, backend: str) -> BuildResult | None:
        """What serves `backend`'s tensors now, never waiting for a compile: None means the torch reference."""
        res = self._published(backend)
        if res is None:
            if not self._boundaries and backend in self._built:  # nobody marks generations: serve it when ready
                with self._lock:
                    built = self._built.pop(backend, None)
                if built is not None:
                    self._publish(backend, built)
            else:
                self._first_use(backend)
            res = self._published(backend)
        return res

    def _wanted(self, preference: str | None = None) -> list[str]:
        pref = preference or self.preference
        if pref == "torch":
            return []
        wanted = ["cpp"]
        if pref in ("auto", "cuda") and torch.cuda.is_available():
            wanted.insert(0, "cuda")
        return wanted

    def select(self, wait: bool = False) -> None:
        """A generation boundary: from here on kernel_for serves what is ready now (a build finished in the
        background since the last boundary, or one on disk) and nothing else until the next boundary. A missing
        kernel starts building in the background; with `wait`, it is built (or waited for) first."""
        self._boundaries = True
        for backend in self._wanted():
            if wait:
                self._ensure(backend)
                continue
            if self._published(backend) is None:
                with self._lock:
                    built = self._built.pop(backend, None)
                if built is not None:
                    self._publish(backend, built)
                else:
                    self._first_use(backend)

    def building(self, backend: str) -> bool:
        """Whether `backend` ("cpp", "cuda") is building in the background now."""
        thread = self._threads.get(backend)
        return thread is not None and thread.is_alive()

    def cpu(self) -> BuildResult:
        """The CPU kernel, built and loaded on first call (a failure is remembered, with a one-line notice). Waits
        for a build: the generation path uses kernel_for, which does not."""
        return self._ensure("cpp")

    def cuda(self) -> BuildResult:
        return self._ensure("cuda")

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
                elif self.building(name):
                    out.append((name, False, f"{name}: building in the background (torch serves meanwhile)"))
                elif name in self._built:
                    out.append((name, False, f"{name}: built, used from the next generation"))
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
        """The kernel that should compute stats for these logits, or None for the torch reference. Never waits for
        a compiler: a kernel not built yet starts building in the background and serves from a later generation
        (see select)."""
        pref = self.preference
        if pref == "torch" or logits.dtype not in KERNEL_DTYPES or logits.dim() == 0 or logits.shape[-1] == 0:
            return None
        if logits.requires_grad and torch.is_grad_enabled():
            return None  # the reference stays differentiable; the kernels are inference-only
        if logits.device.type == "cuda":
            if pref in ("auto", "cuda"):
                res = self._serving("cuda")
                return res.op if res is not None and res.ok else None
            return None
        if logits.device.type == "cpu" and pref in ("auto", "cpp", "cuda"):
            res = self._serving("cpp")
            return res.op if res is not None and res.ok else None
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


def select_kernels(wait: bool = False) -> None:
    """Call at a generation boundary: token_stats() switches to a kernel whose background build has finished only
    here, so one generation runs on one arithmetic. The first call also loads a build already on disk, or starts
    the build in the background. wait=True builds first (benchmarks: no timed run on the reference)."""
    MANAGER.select(wait=wait)


def active_backend(preference: str = "auto") -> tuple[str, str]:
    """(name, reason) of the backend `preference` resolves to, e.g. ("cpp", "cuda: no GPU; cpp: built (avx512)")."""
    return MANAGER.active(preference)
