"""The CUDA kernel (ext/stats_cuda_kernel.cu) run on a CPU emulator of the CUDA it uses (tests/ext/cuda_emu/), so its
logic is tested on every machine, GPU or not: the split of a row over blocks and their 256 threads, the 16-byte vector
loads and the scalar path for unaligned or odd rows, the warp-shuffle, shared-memory and cross-block merges (ties, NaN,
inf, all -inf), every dtype and vocabulary size, against the same checks as the C++ CPU kernel. Built with AddressSanitizer and UBSan
where the compiler has them, so a read past a row's end or a misaligned vector load fails the test.
What only a GPU can show (the device's own arithmetic, speed) is test_cuda_kernel.py's part."""

from __future__ import annotations

import re
import struct
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

from sedac_core import kernels
from stats_check import (check_close, check_degenerate_rows, check_extreme_rows, check_max_positions,
                         check_split_degenerate_rows, degenerate_rows, extreme_rows, max_positions_rows,
                         split_degenerate_rows)

EMU_DIR = Path(__file__).resolve().parent / "cuda_emu"
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
LAUNCH = re.compile(r"(\w+(?:<[^<>;]*>)?)<<<(.*?)>>>\(", re.S)


def emulated_source(path: Path) -> tuple[str, int]:
    """The CUDA source with each `kernel<<<grid, block, shared, stream>>>(args)` rewritten as
    `::cuda_emu::launch(kernel, grid, block, shared, stream, args)`; and how many launches it rewrote."""
    return LAUNCH.subn(r"::cuda_emu::launch(\1, \2, ", path.read_text())


def build(tmp: Path, name: str, cu: Path, extra_sources: list[Path]) -> Path:
    """Compiles a .cu file (rewritten for the emulator) with extra C++ sources, with the sanitizers where the
    compiler has them; returns the executable."""
    src, launches = emulated_source(cu)
    assert launches >= 1, f"no kernel launch found in {cu.name}: the emulator's rewrite needs updating"
    rewritten = tmp / f"{name}_emu.cpp"
    rewritten.write_text(src)
    exe = tmp / name
    base = [kernels._cxx(), "-std=c++17", "-O1", "-g", f"-I{EMU_DIR}", f"-I{kernels.EXT_DIR}", str(rewritten),
            *map(str, extra_sources), "-o", str(exe)]
    proc = subprocess.run([*base, *SANITIZE], capture_output=True, text=True, timeout=600)
    if proc.returncode == 0:
        return exe
    plain = subprocess.run(base, capture_output=True, text=True, timeout=600)
    assert plain.returncode == 0, plain.stderr[-3000:]
    warnings.warn(f"the CUDA emulator runs without sanitizers (the compiler refused them: {proc.stderr[-300:]})")
    return exe


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    if kernels._cxx() is None:
        pytest.skip("no C++ compiler")
    tmp = tmp_path_factory.mktemp("cuda_emu")
    exe = build(tmp, "stats", kernels.EXT_DIR / "stats_cuda_kernel.cu", [EMU_DIR / "emu_main.cpp"])

    def run(x: torch.Tensor, tau_low: float, tau_high: float, misalign: int = 0, sms: int = 132):
        """The kernel's six outputs for `x` [rows, V], whose data starts `misalign` bytes past a 64-byte boundary,
        on an emulated GPU of `sms` multiprocessors (which sets how many blocks share a row)."""
        rows, V = x.shape
        raw = x.contiguous().view(torch.uint8 if x.dtype == torch.float32 else torch.int16).numpy().tobytes()
        inp, out = tmp / "in.bin", tmp / "out.bin"
        inp.write_bytes(struct.pack("<iiqqff", DTYPE_CODES[x.dtype], misalign, rows, V, tau_low, tau_high) + raw)
        proc = subprocess.run([str(exe), str(inp), str(out)], capture_output=True, text=True, timeout=300,
                              env={"ASAN_OPTIONS": "detect_leaks=0:detect_stack_use_after_return=0",
                                   "SEDAC_EMU_SMS": str(sms)})
        assert proc.returncode == 0, proc.stderr[-4000:]
        data = bytearray(out.read_bytes())
        floats = torch.frombuffer(data[: 16 * rows], dtype=torch.float32).view(4, rows).clone()
        ints = torch.frombuffer(data[16 * rows:], dtype=torch.int64).view(2, rows).clone()
        return (*floats.unbind(0), *ints.unbind(0))

    return run


@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", [(1, 7), (3, 1001), (3, 1024), (4, 49152), (2, 151936), (1, 262144)])
@pytest.mark.parametrize("misalign", [0, 2], ids=["aligned", "unaligned"])
def test_emulated_kernel_matches_reference(emu, dtype, shape, misalign):
    """Aligned rows whose V divides into 16-byte packs take the vector loads; the rest the scalar loop."""
    misalign *= 2 if dtype == torch.float32 else 1  # an element boundary, but not a 16-byte one
    gen = torch.Generator().manual_seed(shape[-1] + shape[0])
    scale = torch.tensor([0.3, 3.0, 8.0])[torch.arange(shape[0]) % 3].unsqueeze(1)
    x = (torch.randn(*shape, generator=gen) * scale).to(dtype)
    check_close(emu(x, 0.5, 4.0, misalign), x, 0.5, 4.0)


@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("V", [5003, 5008])  # the scalar loop; the vector loads (V a multiple of 8)
def test_emulated_kernel_extreme_rows(emu, dtype, V):
    """Uniform, one-hot, masked, a lone entry at the row's end, huge spreads and offsets, a tie for the max between
    two threads of different warps (the earlier index must win through the shuffle and shared-memory merges)."""
    x = extreme_rows(dtype, V)
    check_extreme_rows(emu(x, 0.5, 4.0), x)


def test_emulated_kernel_degenerate_rows(emu):
    x = degenerate_rows(3001)
    check_degenerate_rows(emu(x, 0.5, 4.0), x)
    y = degenerate_rows(3008)  # the same through the vector loads
    check_degenerate_rows(emu(y, 0.5, 4.0), y)


@pytest.mark.parametrize("V", [4096, 40960])  # one block per row; ten blocks per row and a merge
def test_emulated_kernel_max_in_every_thread_position(emu, V):
    x = max_positions_rows(V)
    check_max_positions(emu(x, 0.5, 4.0), x)


def test_emulated_kernel_degenerate_rows_across_blocks(emu):
    x = split_degenerate_rows()
    check_split_degenerate_rows(emu(x, 0.5, 4.0), x)


@pytest.mark.parametrize("sms", [1, 8, 132])
def test_emulated_kernel_same_result_however_rows_are_split(emu, sms):
    """The number of blocks per row follows the GPU's size (4 per multiprocessor, at least 4096 logits each):
    one, a few, or up to 64; the statistics agree with the reference every way."""
    x = torch.randn(3, 151936, generator=torch.Generator().manual_seed(12)) * 4
    check_close(emu(x, 0.5, 4.0, sms=sms), x, 0.5, 4.0)


@pytest.fixture(scope="module")
def selftest(tmp_path_factory):
    if kernels._cxx() is None:
        pytest.skip("no C++ compiler")
    exe = build(tmp_path_factory.mktemp("cuda_emu_self"), "selftest", EMU_DIR / "selftest.cu", [])

    def run(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(exe), mode], capture_output=True, text=True, timeout=60,
                              env={"ASAN_OPTIONS": "detect_leaks=0"})

    return run


def test_emulator_shuffles_like_cuda(selftest):
    """__shfl_down_sync(v, d): lane i gets lane i + d's value within its warp, or its own where i + d > 31."""
    proc = selftest("shuffle")
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = [int(v) for v in proc.stdout.split()]
    want = []
    for t in range(64):
        warp, lane = divmod(t, 32)
        want += [100 * warp + (lane + 16 if lane + 16 < 32 else lane), 100 * warp + (lane + 1 if lane < 31 else lane)]
    assert got == want


def test_emulator_shared_memory_and_barrier(selftest):
    proc = selftest("shared")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [int(v) for v in proc.stdout.split()] == [sum(range(64)) + 64000 * b for b in range(3)]


def test_emulator_reports_a_barrier_not_all_threads_reach(selftest):
    """A broken kernel must fail the emulated test (a launch error), not pass or hang."""
    proc = selftest("divergent")
    assert proc.returncode == 3, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    assert "__syncthreads waits for a thread that has exited" in proc.stdout


def test_emulated_source_rewrites_every_launch():
    src, launches = emulated_source(kernels.EXT_DIR / "stats_cuda_kernel.cu")
    assert launches == 2 and "<<<" not in src  # the chunk kernel and the merge kernel
