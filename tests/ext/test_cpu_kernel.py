"""The C++ CPU kernel against the torch reference: random rows, degenerate rows, every dtype and instruction set,
odd vocabularies, batch shapes, the chunked (multi-thread) path."""

from __future__ import annotations

import math

import pytest
import torch

from sedac_core import kernels
from sedac_core.entropy import DECISION_CONTINUE, token_stats, token_stats_reference

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


def reference64(x: torch.Tensor) -> dict:
    """Exact-ish statistics in float64 of the (already rounded) input."""
    z = x.double()
    lse = torch.logsumexp(z, dim=-1)
    logp = z - lse.unsqueeze(-1)
    p = logp.exp()
    plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))
    ent = -plogp.sum(-1) / math.log(2)
    second = torch.where(p > 0, p * logp * logp, torch.zeros_like(p)).sum(-1) / math.log(2) ** 2
    var = (second - ent * ent).clamp_min(0)
    maxv = z.max(dim=-1).values
    first_max = (z == maxv.unsqueeze(-1)).to(torch.int8).argmax(dim=-1)
    return {"entropy_bits": ent, "varentropy": var, "max_prob": (maxv - lse).exp(), "logsumexp": lse,
            "argmax": first_max}


def check_close(out, x: torch.Tensor, tau_low: float, tau_high: float) -> None:
    ent, var, maxp, lse, arg, dec = out
    ref = reference64(x)
    lead = x.shape[:-1]
    for t in (ent, var, maxp, lse, arg, dec):
        assert t.shape == lead
    assert ent.dtype == torch.float32 and arg.dtype == torch.int64 and dec.dtype == torch.int64
    torch.testing.assert_close(ent.double(), ref["entropy_bits"], atol=1e-4, rtol=0)
    # varentropy is a difference of two sums: judge it relative to its scale
    torch.testing.assert_close(var.double(), ref["varentropy"], atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(maxp.double(), ref["max_prob"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref["logsumexp"], atol=1e-5, rtol=1e-6)
    assert torch.equal(arg, ref["argmax"])
    want = torch.where(ent < tau_low, 0, torch.where(ent > tau_high, 2, 1))
    assert torch.equal(dec, want)
    # the reference's decisions agree wherever the entropy is not within rounding of a threshold
    r = token_stats_reference(x, tau_low, tau_high)
    clear = ((r.entropy_bits - tau_low).abs() > 1e-3) & ((r.entropy_bits - tau_high).abs() > 1e-3)
    assert torch.equal(dec[clear], r.decision[clear])


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
    V = 5003
    rows = []
    gen = torch.Generator().manual_seed(1)
    rows.append(torch.zeros(V))  # uniform: H = log2 V, var 0
    one_hot = torch.zeros(V)
    one_hot[1234] = 60.0  # very peaked: H ~ 0
    rows.append(one_hot)
    masked = torch.randn(V, generator=gen) * 2
    masked[::3] = -math.inf  # masked tokens
    rows.append(masked)
    only_one = torch.full((V,), -math.inf)
    only_one[V - 1] = 3.0  # one finite entry, at the very end
    rows.append(only_one)
    big = torch.randn(V, generator=gen) * 1e4  # huge spread: effectively one-hot
    rows.append(big)
    offset = torch.randn(V, generator=gen) + 1e4  # large magnitude, moderate spread (fp32 only; fp16 overflows)
    rows.append(offset if dtype != torch.float16 else torch.randn(V, generator=gen) + 6e4)
    tiny = torch.randn(V, generator=gen) * 1e-30  # near-uniform
    rows.append(tiny)
    two_max = torch.randn(V, generator=gen)
    two_max[100] = two_max[4000] = 20.0  # tie: the first index wins
    rows.append(two_max)
    x = torch.stack(rows).to(dtype)
    for isa in usable_isas():
        out = cpu_op(x, 0.5, 4.0, isa)
        check_close(out, x, 0.5, 4.0)
        assert abs(float(out[0][0]) - math.log2(V)) < 1e-4 and float(out[1][0]) < 1e-4
        assert float(out[0][1]) < 1e-4 and int(out[4][1]) == 1234 and int(out[5][1]) == 0
        assert int(out[4][3]) == V - 1 and float(out[2][3]) == 1.0
        assert int(out[4][7]) == 100


def test_degenerate_rows_follow_the_reference(cpu_op):
    """NaN anywhere -> NaN stats, argmax at the first NaN; +inf -> NaN entropy, lse +inf; all -inf -> NaN, -inf."""
    V = 3001
    x = torch.randn(5, V)
    x[0, 2000] = math.nan
    x[0, 2500] = math.nan
    x[1, 10] = math.inf
    x[2] = -math.inf
    x[3, 7] = math.inf
    x[3, 2999] = math.nan
    ref = token_stats_reference(x, 0.5, 4.0)
    for isa in usable_isas():
        ent, var, maxp, lse, arg, dec = cpu_op(x, 0.5, 4.0, isa)
        for k in range(4):
            assert torch.isnan(ent[k]) and torch.isnan(var[k]) and torch.isnan(maxp[k])
            assert int(dec[k]) == DECISION_CONTINUE == int(ref.decision[k])
        assert torch.isnan(lse[0]) and int(arg[0]) == 2000 == int(ref.argmax[0])
        assert lse[1] == math.inf and int(arg[1]) == 10 == int(ref.argmax[1])
        assert lse[2] == -math.inf and int(arg[2]) == 0 == int(ref.argmax[2])
        assert torch.isnan(lse[3]) and int(arg[3]) == 2999
        assert torch.isfinite(ent[4])


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
