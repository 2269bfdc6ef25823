"""The CUDA kernel: a compile-only check with nvcc where nvcc is present, and agreement with the reference on a GPU
(the same checks as the CPU kernel and the emulated run in test_cuda_emulated.py)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from sedac_core import kernels
from stats_check import (check_close, check_degenerate_rows, check_extreme_rows, check_max_positions,
                         check_split_degenerate_rows, degenerate_rows, extreme_rows, max_positions_rows,
                         split_degenerate_rows)


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])  # A100, H100/H200
def test_cuda_kernel_compiles_with_nvcc(tmp_path, arch):
    """The kernel file is plain CUDA (no torch headers), so this works with any toolkit, GPU or not."""
    obj = tmp_path / "stats_cuda_kernel.o"
    cmd = [_nvcc(), "-std=c++17", "-O3", f"-arch={arch}", f"-I{kernels.EXT_DIR}", "-c",
           str(kernels.EXT_DIR / "stats_cuda_kernel.cu"), "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert obj.stat().st_size > 0


@pytest.mark.skipif(_nvcc() is None or kernels._cxx() is None, reason="nvcc or a C++ compiler not found")
def test_cuda_op_binding_compiles_against_torch(tmp_path):
    """The op's host side (ext/sedac_cuda.cpp: checks, allocation, launch, registration) compiles against this
    torch's headers and the toolkit's runtime headers. A CPU build of torch ships c10/cuda's headers but not the
    one its CMake generates; this check supplies it (one macro), so the binding is checked on any machine."""
    from torch.utils.cpp_extension import include_paths

    # where this nvcc's own headers are (it may be a wrapper script): its dry run prints its include flags
    dry = subprocess.run([_nvcc(), "--dryrun", "-c", str(kernels.EXT_DIR / "stats_cuda_kernel.cu"), "-o",
                          str(tmp_path / "dry.o")], capture_output=True, text=True, timeout=60)
    cuda_includes = re.findall(r'"?-I([^"\s]+)', next((l for l in dry.stderr.splitlines() if "INCLUDES=" in l), ""))
    assert cuda_includes, dry.stderr[-2000:]
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    obj = tmp_path / "sedac_cuda.o"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [kernels._cxx(), "-std=c++17", "-O1", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
           *(f"-I{p}" for p in include_paths()), f"-I{tmp_path / 'stub'}", *(f"-I{p}" for p in cuda_includes),
           f"-I{kernels.EXT_DIR}", "-c", str(kernels.EXT_DIR / "sedac_cuda.cpp"), "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert obj.stat().st_size > 0


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@needs_gpu
def test_cuda_kernel_builds_and_is_active():
    res = kernels.MANAGER.cuda()
    assert res.ok, res.reason
    assert kernels.active_backend("auto") == ("cuda", "cuda: built")


@pytest.fixture(scope="module")
def cuda_op():
    res = kernels.MANAGER.cuda()
    assert res.ok, res.reason

    def run(x: torch.Tensor, tau_low: float, tau_high: float, offset: int = 0):
        """The op on a contiguous CUDA copy of `x` whose data starts `offset` elements into its allocation."""
        buf = torch.empty(x.numel() + offset, dtype=x.dtype, device="cuda")
        xc = buf[offset:].view(x.shape)
        xc.copy_(x)
        return tuple(t.cpu() for t in res.op(xc, tau_low, tau_high))

    return run


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 7), (3, 1001), (4, 49152), (2, 151936), (1, 262144)])
def test_cuda_matches_reference(cuda_op, dtype, shape):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(*shape, generator=gen) * 3).to(dtype)
    check_close(cuda_op(x, 0.5, 4.0), x, 0.5, 4.0)
    check_close(cuda_op(x, 0.5, 4.0, offset=1), x, 0.5, 4.0)  # not 16-byte aligned: the scalar loads


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("V", [5003, 5008])
def test_cuda_extreme_rows(cuda_op, dtype, V):
    x = extreme_rows(dtype, V)
    check_extreme_rows(cuda_op(x, 0.5, 4.0), x)


@needs_gpu
def test_cuda_degenerate_rows(cuda_op):
    for V in (3001, 3008):
        x = degenerate_rows(V)
        check_degenerate_rows(cuda_op(x, 0.5, 4.0), x)


@needs_gpu
@pytest.mark.parametrize("V", [4096, 40960])
def test_cuda_max_in_every_position(cuda_op, V):
    x = max_positions_rows(V)
    check_max_positions(cuda_op(x, 0.5, 4.0), x)


@needs_gpu
def test_cuda_degenerate_rows_across_blocks(cuda_op):
    x = split_degenerate_rows()
    check_split_degenerate_rows(cuda_op(x, 0.5, 4.0), x)
