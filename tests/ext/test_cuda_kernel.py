"""The CUDA kernel: a compile-only check with nvcc where nvcc is present, and agreement with the reference on a GPU."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from sedac_core import kernels
from sedac_core.entropy import token_stats_reference


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


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 7), (3, 1001), (4, 49152), (2, 151936), (1, 262144)])
def test_cuda_matches_reference(dtype, shape):
    res = kernels.MANAGER.cuda()
    assert res.ok, res.reason
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(*shape, generator=gen) * 3).to(dtype)
    ent, var, maxp, lse, arg, dec = res.op(x.cuda(), 0.5, 4.0)
    ref = token_stats_reference(x.double(), 0.5, 4.0)
    torch.testing.assert_close(ent.cpu().double(), ref.entropy_bits, atol=1e-4, rtol=0)
    torch.testing.assert_close(var.cpu().double(), ref.varentropy, atol=5e-4, rtol=5e-4)
    torch.testing.assert_close(maxp.cpu().double(), ref.max_prob, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse.cpu().double(), ref.logsumexp, atol=1e-5, rtol=1e-6)
    z = x.double()
    first = (z == z.max(-1, keepdim=True).values).to(torch.int8).argmax(-1)
    assert torch.equal(arg.cpu(), first)
    assert torch.equal(dec.cpu(), torch.where(ent.cpu() < 0.5, 0, torch.where(ent.cpu() > 4.0, 2, 1)))


@needs_gpu
def test_cuda_degenerate_rows():
    res = kernels.MANAGER.cuda()
    assert res.ok, res.reason
    V = 4099
    x = torch.randn(5, V)
    x[0, 3000] = math.nan
    x[1, 10] = math.inf
    x[2] = -math.inf
    x[3, ::2] = -math.inf
    x[4] = 0.0
    x[4, 17] = 50.0
    ent, var, maxp, lse, arg, dec = (t.cpu() for t in res.op(x.cuda(), 0.5, 4.0))
    assert torch.isnan(ent[0]) and int(arg[0]) == 3000
    assert lse[1] == math.inf and int(arg[1]) == 10
    assert lse[2] == -math.inf and int(arg[2]) == 0 and torch.isnan(ent[2])
    ref = token_stats_reference(x[3:].double(), 0.5, 4.0)
    torch.testing.assert_close(ent[3:].double(), ref.entropy_bits, atol=1e-4, rtol=0)
    assert torch.equal(arg[3:], ref.argmax)
