"""The C++ CPU kernel against the torch reference: random rows, degenerate rows, every dtype and instruction set,
odd vocabularies, batch shapes, the chunked (multi-thread) path."""

from __future__ import annotations

import math

import pytest
import torch

from sedac_core import kernels
from sedac_core.entropy import token_stats, token_stats_reference
from stats_check import (check_close, check_degenerate_rows, check_extreme_rows, check_max_positions,
                         check_split_degenerate_rows, degenerate_rows, extreme_rows, max_positions_rows, reference64,
                         split_degenerate_rows)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def cpu_op():
    if kernels._cxx() is None:
        pytest.skip("no C++ compiler")
    res = kernels.MANAGER.cpu()
    assert res.ok, res.reason  # with a compiler present, the build must work
    return torch.ops.sedac_cpu.token_stats.default


def usable_isas() -> list[int]:
    if kernels.MANAGER._cpu is None or not kernels.MANAGER._cpu.ok:
        kernels.MANAGER.cpu()
    if not kernels.MANAGER.cpu().ok:
        return [0]
    compiled = set(torch.ops.sedac_cpu.compiled_isas())
    host = kernels.host_isa()
    allowed = {"DEFAULT": {0}, "AVX2": {0, 1}, "AVX512": {0, 1, 2}}[host]
    return sorted(compiled & allowed)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", [(1, 7), (3, 1000), (2, 3, 4099), (4, 49152), (1, 151936), (2, 262147)])
def test_random_rows_match_reference(cpu_op, dtype, shape):
    gen = torch.Generator().manual_seed(hash(shape) % 1000)
    scale = torch.tensor([0.3, 3.0, 8.0])[torch.arange(math.prod(shape[:-1])) % 3].reshape(*shape[:-1], 1)
    x = (torch.randn(*shape, generator=gen) * scale).to(dtype)
    ref = reference64(x)
    e = ref["entropy_bits"].flatten().sort().values.tolist()
    # thresholds between rows, so all three decisions occur where the batch allows
    lo, hi = ((e[0] + e[1]) / 2, (e[-2] + e[-1]) / 2) if len(e) >= 3 else (e[0] - 0.5, e[-1] + 0.5)
    for isa in usable_isas():
        check_close(cpu_op(x, lo, hi, isa), x, lo, hi)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_extreme_rows(cpu_op, dtype):
    x = extreme_rows(dtype)
    for isa in usable_isas():
        check_extreme_rows(cpu_op(x, 0.5, 4.0, isa), x)


def test_degenerate_rows_follow_the_reference(cpu_op):
    """NaN anywhere -> NaN stats, argmax at the first NaN; +inf -> NaN entropy, lse +inf; all -inf -> NaN, -inf."""
    x = degenerate_rows()
    for isa in usable_isas():
        check_degenerate_rows(cpu_op(x, 0.5, 4.0, isa), x)


def test_chunked_rows_match_single_thread(cpu_op):
    """One long row is split across threads and merged (online-softmax rescale); the result must not change."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 262144, generator=gen) * 4
    x[0, 200000] = 30.0  # the max sits in a later chunk
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_op(x, 0.5, 4.0, 0)
        torch.set_num_threads(max(2, before))
        many = cpu_op(x, 0.5, 4.0, 0)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    assert int(many[4][0]) == 200000


def test_layouts_and_empty_batches(cpu_op):
    x = torch.randn(6, 300).t()  # non-contiguous [300, 6]
    check_close(cpu_op(x, 0.5, 2.0, 0), x, 0.5, 2.0)
    empty = cpu_op(torch.randn(0, 50), 0.5, 2.0, 0)
    assert all(t.shape == (0,) for t in empty)
    single = cpu_op(torch.randn(50), 0.5, 2.0, 0)  # 1-D logits: scalar outputs
    assert all(t.shape == () for t in single)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        cpu_op(torch.randn(2, 50, dtype=torch.float64), 0.5, 2.0, 0)
    with pytest.raises(RuntimeError, match="not compiled"):
        cpu_op(torch.randn(2, 50), 0.5, 2.0, 99)


def test_token_stats_dispatches_to_the_kernel(cpu_op):
    x = torch.randn(3, 4096) * 3
    kernels.set_backend("cpp")
    try:
        fast = token_stats(x, 1.0, 9.0)
        kernels.set_backend("torch")
        slow = token_stats(x, 1.0, 9.0)
    finally:
        kernels.set_backend("auto")
    ref = token_stats_reference(x, 1.0, 9.0)
    assert torch.equal(slow.entropy_bits, ref.entropy_bits)  # "torch" is the reference itself
    torch.testing.assert_close(fast.entropy_bits, ref.entropy_bits, atol=1e-4, rtol=0)
    assert torch.equal(fast.argmax, ref.argmax)
    assert kernels.MANAGER.kernel_for(x) is not None  # auto on a CPU tensor: the C++ kernel
    # the reference keeps serving what the kernels do not take: float64, and tensors that need gradients
    assert kernels.MANAGER.kernel_for(x.double()) is None
    g = x.clone().requires_grad_(True)
    token_stats(g, 1.0, 9.0).entropy_bits.sum().backward()
    assert g.grad is not None


@pytest.mark.parametrize("span", [2.0, 40.0, 400.0])
def test_rising_maxima_across_blocks(cpu_op, span):
    """Ascending rows raise the running max in every block: small rises rebase, large ones redo the block."""
    V = 100_003
    gen = torch.Generator().manual_seed(7)
    x = torch.stack([
        torch.linspace(-span / 2, span / 2, V),
        torch.linspace(-span / 2, span / 2, V) + torch.randn(V, generator=gen) * 0.1,
        torch.linspace(-span / 2, span / 2, V).flip(0),
    ])
    for isa in usable_isas():
        check_close(cpu_op(x, 0.5, 4.0, isa), x, 0.5, 4.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_masked_tokens_in_long_rows(cpu_op, dtype):
    """-inf entries after the first block: the fast sums (unclamped where the ISA allows) see a NaN and the block is
    redone exactly, after which the rest of the row stays on the exact path; large offsets (the fused y = x log2e - M)
    and a lone finite entry (max_prob exactly 1) across many blocks."""
    V = 49_152
    gen = torch.Generator().manual_seed(5)
    rows = []
    late = torch.randn(V, generator=gen) * 3
    late[40_000] = -math.inf  # one masked token, late in the row
    rows.append(late)
    sparse = torch.randn(V, generator=gen) * 3
    sparse[5_000::7] = -math.inf  # many masked tokens from the third block on
    rows.append(sparse)
    offset = torch.randn(V, generator=gen) * 2 + (1e4 if dtype != torch.float16 else 6e4)
    rows.append(offset)
    lone = torch.full((V,), -math.inf)
    lone[30_000] = 7.0
    rows.append(lone)
    x = torch.stack(rows).to(dtype)
    for isa in usable_isas():
        out = cpu_op(x, 0.5, 4.0, isa)
        check_close(out, x, 0.5, 4.0)
        assert int(out[4][3]) == 30_000 and float(out[2][3]) == 1.0 and float(out[0][3]) < 1e-6


def test_read_rows_reads_every_byte_with_the_same_split(cpu_op):
    """The benchmark's memory-limit baseline: a checksum of each row's bytes (32-bit words, then any tail bytes)."""
    x = torch.zeros(3, 70_001)
    x[0, 0] = 1.0  # 0x3f800000
    x[2, -1] = 2.0  # 0x40000000, in the last chunk
    for isa in usable_isas():
        out = torch.ops.sedac_cpu.read_rows(x, isa)
        assert out.tolist() == [0x3F800000, 0, 0x40000000]
        h = torch.ops.sedac_cpu.read_rows(torch.ones(2, 3, dtype=torch.float16), isa)  # 6 bytes: one word + tail
        assert h.tolist() == [0x3C003C00 + 0x00 + 0x3C, 0x3C003C00 + 0x00 + 0x3C]


@pytest.mark.parametrize("V", [4096, 40960])
def test_max_in_every_position(cpu_op, V):
    x = max_positions_rows(V)
    for isa in usable_isas():
        check_max_positions(cpu_op(x, 0.5, 4.0, isa), x)


def test_degenerate_rows_across_chunks(cpu_op):
    x = split_degenerate_rows()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(max(2, before))  # one row split across threads
        for isa in usable_isas():
            check_split_degenerate_rows(cpu_op(x, 0.5, 4.0, isa), x)
    finally:
        torch.set_num_threads(before)
