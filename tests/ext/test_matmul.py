"""The skinny-matmul kernel (ext/skinny_gemm*.cpp via sedac_core.matmul.linear_rows) against F.linear: odd shapes,
bias, 1..16 rows, 3-D inputs, every instruction set; a row's result bitwise the same for any number of rows; the
fallbacks to torch (too many rows, other layouts and dtypes, autograd, no build, switched off)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from sedac_core import kernels, matmul
from sedac_core.kernels import KernelManager
from sedac_core.matmul import GemmKernel, linear_rows

# (in, out): the model's shapes, and odd ones (out not a multiple of the 64-column block nor of a vector, in not a
# multiple of the vector width)
SHAPES = [(576, 960), (1536, 576), (37, 101), (5, 17), (64, 64), (100, 130), (129, 7), (3, 1), (16, 79)]


def input_major(k: int, n: int, dtype=torch.float32) -> torch.Tensor:
    """An [out, in] weight view of an [in, out] contiguous storage, as anatomy.py keeps it on CPU."""
    return torch.randn(k, n).to(dtype).t()


def close(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    ref = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    scale = ref.abs().amax().item() if ref.numel() else 1.0
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * max(scale, 1.0))


@pytest.fixture(scope="module")
def gemm():
    if kernels._cxx() is None:
        pytest.skip("no C++ compiler")
    active, reason = matmul.matmul_status()
    if not matmul.GEMM.enabled:
        pytest.skip(reason)
    if kernels.host_isa() == "DEFAULT":
        pytest.skip("the kernel serves AVX2/AVX512 machines")
    assert active, reason  # with a compiler present, the build must work
    return torch.ops.sedac_gemm.linear_rows.default


def usable_isas() -> list[int]:
    compiled = set(torch.ops.sedac_gemm.compiled_isas())
    allowed = {"DEFAULT": {0}, "AVX2": {0, 1}, "AVX512": {0, 1, 2}}[kernels.host_isa()]
    return sorted(compiled & allowed)


# ---------------------------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_linear_for_1_to_16_rows(gemm, k, n, with_bias):
    torch.manual_seed(k * 1000 + n)
    weight = input_major(k, n)
    bias = torch.randn(n) if with_bias else None
    for m in range(1, 17):
        x = torch.randn(m, k)
        assert matmul.kernel_applies(x, weight, bias)
        out = linear_rows(x, weight, bias)
        assert out.shape == (m, n) and out.dtype == torch.float32
        close(out, x, weight, bias)


@pytest.mark.parametrize("isa", [0, 1, 2])
@pytest.mark.parametrize("k,n", [(37, 101), (576, 960), (130, 200)])
def test_every_instruction_set_matches(gemm, isa, k, n):
    if isa not in usable_isas():
        pytest.skip(f"instruction set {isa} not usable here")
    torch.manual_seed(isa)
    w = torch.randn(k, n)
    bias = torch.randn(n)
    for m in (1, 3, 7, 16):
        x = torch.randn(m, k)
        close(gemm(x, w, bias, isa), x, w.t(), bias)
        close(gemm(x, w, None, isa), x, w.t(), None)


def test_the_kernel_takes_max_rows(gemm):
    assert torch.ops.sedac_gemm.max_rows() == matmul.MAX_ROWS


def test_3d_and_non_contiguous_inputs(gemm):
    torch.manual_seed(3)
    weight, bias = input_major(96, 200), torch.randn(200)
    x = torch.randn(2, 3, 96)
    assert matmul.kernel_applies(x, weight, bias)
    out = linear_rows(x, weight, bias)
    assert out.shape == (2, 3, 200)
    close(out, x, weight, bias)
    wide = torch.randn(5, 192)
    strided = wide[:, ::2]  # not contiguous
    assert matmul.kernel_applies(strided, weight, bias)
    close(linear_rows(strided, weight, bias), strided, weight, bias)
    one = torch.randn(1, 1, 96)
    assert linear_rows(one, weight).shape == (1, 1, 200)
    strided_bias = torch.randn(400)[::2]
    assert matmul.kernel_applies(x, weight, strided_bias)
    close(linear_rows(x, weight, strided_bias), x, weight, strided_bias)
    vec = torch.randn(96)  # a 1-D input is one row, as in F.linear
    assert linear_rows(vec, weight, bias).shape == (200,)
    close(linear_rows(vec, weight, bias), vec, weight, bias)
    assert matmul.kernel_applies(vec, weight, bias)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights(gemm, dtype):
    torch.manual_seed(7)
    weight = input_major(200, 333, dtype)
    bias = torch.randn(333).to(dtype)
    x = torch.randn(6, 200).to(dtype)
    assert matmul.kernel_applies(x, weight, bias)
    out = linear_rows(x, weight, bias)
    assert out.dtype == dtype and out.shape == (6, 333)
    ref = F.linear(x.double(), weight.double(), bias.double())  # exact products, then one rounding to dtype
    torch.testing.assert_close(out.double(), ref.to(dtype).double(), rtol=1e-2, atol=2e-2)


# ------------------------------------------------------------------------------------------ bitwise identity
# (200, 17000): wide enough that 3-4 rows take the few-rows plan, like the LM head; K > 64: several k chunks
@pytest.mark.parametrize("k,n", [(576, 960), (37, 101), (1536, 576), (130, 17), (200, 17000)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_a_row_is_bitwise_the_same_for_any_number_of_rows(gemm, k, n, with_bias):
    torch.manual_seed(11)
    weight = input_major(k, n)
    bias = torch.randn(n) if with_bias else None
    x = torch.randn(16, k)
    full = linear_rows(x, weight, bias)
    singles = torch.stack([linear_rows(x[i : i + 1], weight, bias)[0] for i in range(16)])
    assert torch.equal(full, singles)
    for m in range(1, 17):
        assert torch.equal(linear_rows(x[:m], weight, bias), full[:m]), m
        assert torch.equal(linear_rows(x[16 - m :], weight, bias), full[16 - m :]), m  # rows in other groups


def test_bitwise_the_same_for_any_thread_count_and_instruction_set(gemm):
    torch.manual_seed(12)
    w = torch.randn(576, 3000)
    x = torch.randn(12, 576)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs += [gemm(x, w, None, isa) for isa in usable_isas()]
    finally:
        torch.set_num_threads(before)
    # every element is one fma chain over k, and a fused multiply-add rounds the same in any lane or ISA
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


# ------------------------------------------------------------------------------------------------ fallbacks
def test_falls_back_to_torch_outside_its_domain(gemm):
    torch.manual_seed(5)
    k, n = 64, 80
    weight, bias = input_major(k, n), torch.randn(n)
    x = torch.randn(4, k)

    def torch_serves(x, weight, bias=None):  # the fallback is at::linear itself: the same bits as F.linear
        assert not matmul.kernel_applies(x, weight, bias)
        out = linear_rows(x, weight, bias)
        assert torch.equal(out, F.linear(x, weight, bias))
        return out

    assert matmul.kernel_applies(x, weight, bias)
    torch_serves(torch.randn(17, k), weight, bias)  # more rows than the kernel takes
    torch_serves(torch.randn(3, 6, k), weight, bias)  # 18 rows in 3-D
    torch_serves(x, torch.randn(n, k), bias)  # the usual [out, in] contiguous layout
    torch_serves(x, input_major(k, 2 * n)[::2])  # an input-major view whose .t() is not contiguous
    assert torch_serves(x.double(), weight.double()).dtype == torch.float64  # a dtype the kernel does not take
    assert torch_serves(torch.randn(0, k), weight, bias).shape == (0, n)
    torch_serves(torch.randn(4, 0), torch.randn(0, n).t())  # no input features
    xg = x.clone().requires_grad_()  # autograd stays with torch
    out = torch_serves(xg, weight, bias)
    out.sum().backward()
    assert xg.grad is not None and out.grad_fn is not None
    with torch.no_grad():
        assert matmul.kernel_applies(xg, weight, bias)  # outside autograd the kernel takes it again
        close(linear_rows(xg, weight, bias), x, weight, bias)


def test_mismatched_dtypes_raise_like_torch(gemm):
    x = torch.randn(2, 32)
    w = input_major(32, 40, torch.bfloat16)
    with pytest.raises(RuntimeError):
        F.linear(x, w)
    with pytest.raises(RuntimeError):
        linear_rows(x, w)


def test_switch_and_env_keep_torch(gemm, monkeypatch):
    monkeypatch.setenv(matmul.FORCE_TORCH_ENV, "1")
    off = GemmKernel()
    assert off.enabled is False and off.runner() is None
    active, reason = off.status()
    assert active is False and matmul.FORCE_TORCH_ENV in reason
    monkeypatch.delenv(matmul.FORCE_TORCH_ENV)
    assert GemmKernel().enabled is True
    was = matmul.GEMM.enabled
    try:
        matmul.set_matmul_kernel(False)
        assert matmul.matmul_kernel_active() is False
        x, w = torch.randn(3, 32), input_major(32, 48)
        torch.testing.assert_close(linear_rows(x, w), F.linear(x, w))
    finally:
        matmul.set_matmul_kernel(was)
    assert matmul.matmul_kernel_active() is True
    assert matmul.matmul_status() == (True, f"matmul: built ({kernels.host_isa().lower()})")


def test_status_without_building(tmp_path):
    fresh = GemmKernel(cache_root=tmp_path)
    assert fresh.status(build=False) == (False, "matmul: not built yet (builds on first use)")


# ------------------------------------------------------------------------------------------ no build: torch
def test_failed_build_falls_back_to_torch_with_one_line(tmp_path, monkeypatch, caplog):
    import torch.utils.cpp_extension as cpp_ext

    def broken_load(*args, **kwargs):
        raise RuntimeError("Error building extension 'sedac_gemm'\nerror: deliberately broken for the test")

    monkeypatch.setattr(cpp_ext, "load", broken_load)
    monkeypatch.setattr(cpp_ext, "verify_ninja_availability", lambda: None)
    monkeypatch.setattr(KernelManager, "_compile_isa_objects", lambda self, build_dir, cxx, stem="": ([], [], []))
    monkeypatch.setattr(kernels, "_cxx", lambda: "/usr/bin/c++")
    broken = GemmKernel(cache_root=tmp_path, isa="DEFAULT")
    monkeypatch.setattr(matmul, "GEMM", broken)
    x, w, b = torch.randn(4, 40), input_major(40, 70), torch.randn(70)
    with caplog.at_level(logging.WARNING, logger="sedac.kernels"):
        for _ in range(3):
            torch.testing.assert_close(linear_rows(x, w, b), F.linear(x, w, b))
    active, reason = matmul.matmul_status()
    assert active is False and matmul.matmul_kernel_active() is False
    assert reason.startswith("matmul: build failed (error: deliberately broken") and reason.endswith("using torch")
    assert "\n" not in reason
    notices = [r for r in caplog.records if "matmul" in r.getMessage()]
    assert len(notices) == 1  # one line, once


def test_no_compiler_uses_torch(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "_cxx", lambda: None)
    monkeypatch.setattr(kernels, "host_isa", lambda: "AVX2")
    none = GemmKernel(cache_root=tmp_path)
    monkeypatch.setattr(matmul, "GEMM", none)
    x, w = torch.randn(2, 24), input_major(24, 30)
    torch.testing.assert_close(linear_rows(x, w), F.linear(x, w))
    assert matmul.matmul_status() == (False, "matmul: no compiler, using torch")


def test_a_cpu_without_avx2_uses_torch(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "host_isa", lambda: "DEFAULT")
    active, reason = GemmKernel(cache_root=tmp_path).status()
    assert (active, reason) == (False, "matmul: needs AVX2 or AVX512, using torch")


# -- the engine's use of it --------------------------------------------------------------------------------------

def _engine(matmul_kernel: bool):
    from sedac_core.config import SedacConfig
    from sedac_core.engine import SedacEngine
    from tests.conftest import make_bundle

    config = SedacConfig()
    config.performance.matmul_kernel = matmul_kernel
    return SedacEngine(make_bundle("llama", layers=4, seed=3), config)


def test_engine_runs_its_matmuls_on_the_kernel_once_built(gemm):
    from sedac_core.engine import GenerationRequest

    on, off = _engine(True), _engine(False)
    req = lambda: GenerationRequest(prompt="Hello! How can I", max_new_tokens=12)  # noqa: E731
    r_on, r_off = on.generate(req()), off.generate(req())
    assert on.anatomy.linear is linear_rows  # the conftest built the kernel, so the engine picked it up
    assert off.anatomy.linear is F.linear  # performance.matmul_kernel: false keeps torch's
    assert r_on.generated_text == r_off.generated_text  # the same greedy answer, only the arithmetic differs


def test_engine_uses_torch_until_the_background_build_is_done(monkeypatch, tmp_path):
    from sedac_core.engine import GenerationRequest

    pending = GemmKernel(cache_root=tmp_path)  # a kernel whose build has not finished
    started = []
    monkeypatch.setattr(pending, "build_in_background", lambda: started.append(True))
    monkeypatch.setattr(matmul, "GEMM", pending)
    eng = _engine(True)
    eng.generate(GenerationRequest(prompt="Hello", max_new_tokens=3))
    assert started and eng.anatomy.linear is F.linear  # never waited for the build, asked for it


def test_a_build_on_disk_is_loaded_before_the_first_generation(gemm, monkeypatch, tmp_path):
    """Without wait, matmul_linear() still loads a build that is already on disk (a fraction of a second), so a
    one-shot `ask` does not run its only generation on torch's matmuls; with nothing on disk it does not block."""
    fresh = GemmKernel()  # the session's sources and cache dir (built by conftest), not loaded by this object
    assert fresh.cached() and not fresh.ready()
    monkeypatch.setattr(matmul, "GEMM", fresh)
    assert matmul.matmul_linear() is linear_rows and fresh.ready()
    assert GemmKernel(cache_root=tmp_path).cached() is False
