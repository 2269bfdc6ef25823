"""What every kernel backend (the C++ CPU kernel, the CUDA kernel on a GPU or on the CPU emulator) must match:
statistics in float64 of the (already rounded) input, and the decisions they imply."""

from __future__ import annotations

import math

import torch

from sedac_core.entropy import DECISION_CONTINUE, token_stats_reference


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


def extreme_rows(dtype: torch.dtype, V: int = 5003) -> torch.Tensor:
    """Rows with a known answer or a known hazard, in this order: uniform, one-hot, a third of the tokens masked
    (-inf), one finite entry at the very end, a huge spread, a large offset, a near-uniform row, a tie for the max."""
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
    return torch.stack(rows).to(dtype)


def check_extreme_rows(out, x: torch.Tensor) -> None:
    """`out` is a backend's result for `extreme_rows(...)` at thresholds 0.5 / 4.0."""
    V = x.shape[-1]
    check_close(out, x, 0.5, 4.0)
    assert abs(float(out[0][0]) - math.log2(V)) < 1e-4 and float(out[1][0]) < 1e-4
    assert float(out[0][1]) < 1e-4 and int(out[4][1]) == 1234 and int(out[5][1]) == 0
    assert int(out[4][3]) == V - 1 and float(out[2][3]) == 1.0
    assert int(out[4][7]) == 100


def degenerate_rows(V: int = 3001) -> torch.Tensor:
    """Two NaNs; a +inf; all -inf; a +inf before a NaN; and an ordinary row (fp32)."""
    x = torch.randn(5, V, generator=torch.Generator().manual_seed(5))
    x[0, 2000] = math.nan
    x[0, 2500] = math.nan
    x[1, 10] = math.inf
    x[2] = -math.inf
    x[3, 7] = math.inf
    x[3, V - 2] = math.nan
    return x


def check_degenerate_rows(out, x: torch.Tensor) -> None:
    """The defined results (ext/README.md): NaN anywhere -> NaN statistics, argmax at the first NaN; a +inf -> NaN
    entropy, logsumexp +inf, argmax at the first +inf; all -inf -> NaN, logsumexp -inf, argmax 0; decision continue."""
    ent, var, maxp, lse, arg, dec = out
    ref = token_stats_reference(x, 0.5, 4.0)
    V = x.shape[-1]
    for k in range(4):
        assert torch.isnan(ent[k]) and torch.isnan(var[k]) and torch.isnan(maxp[k])
        assert int(dec[k]) == DECISION_CONTINUE == int(ref.decision[k])
    assert torch.isnan(lse[0]) and int(arg[0]) == 2000 == int(ref.argmax[0])
    assert lse[1] == math.inf and int(arg[1]) == 10 == int(ref.argmax[1])
    assert lse[2] == -math.inf and int(arg[2]) == 0 == int(ref.argmax[2])
    assert torch.isnan(lse[3]) and int(arg[3]) == V - 2
    check_close([t[4:] for t in out], x[4:], 0.5, 4.0)


def max_positions_rows(V: int) -> torch.Tensor:
    """One row per position: the max (and a tie for it 1537 further on, wrapped) at each lane of a 16-byte pack, at
    the first and last thread and warp of a 256-thread block, and on both sides of 4096-element boundaries (where
    the CUDA kernel's blocks, or the CPU kernel's chunks, split a row)."""
    cols = sorted(c for c in {0, 1, 2, 3, 4, 31, 32, 255, 256, 1023, 1024, 2047, 4092, 4095, 4096, 8191, 8192, V - 1}
                  if c < V)
    x = torch.randn(len(cols), V, generator=torch.Generator().manual_seed(9))
    for r, c in enumerate(cols):
        x[r, c] = 12.0
        x[r, (c + 1537) % V] = 12.0
    return x


def check_max_positions(out, x: torch.Tensor) -> None:
    check_close(out, x, 0.5, 4.0)
    first = [int(r.eq(12.0).nonzero()[0]) for r in x]
    assert out[4].tolist() == first


def split_degenerate_rows(V: int = 40000) -> torch.Tensor:
    """NaN, +inf and -inf placed so that the parts of a row handled apart (blocks of 4096, chunks) see different
    things: two NaNs in different parts, two +infs likewise, a row of -inf but its last entry, a row whose first
    half is -inf, a tie for the max across a 4096 boundary, and an ordinary row."""
    x = torch.randn(6, V, generator=torch.Generator().manual_seed(11))
    x[0, 35000] = math.nan
    x[0, 30000] = math.nan
    x[1, 39000] = math.inf
    x[1, 5000] = math.inf
    x[2, :] = -math.inf
    x[2, V - 1] = -3.0
    x[3, : V // 2] = -math.inf
    x[4, 4095] = x[4, 4096] = 40.0
    return x


def check_split_degenerate_rows(out, x: torch.Tensor) -> None:
    """The first NaN or +inf of the row wins whichever part found it; parts that saw only -inf lose every tie."""
    ent, var, maxp, lse, arg, dec = out
    V = x.shape[-1]
    assert torch.isnan(ent[0]) and int(arg[0]) == 30000 and int(dec[0]) == DECISION_CONTINUE
    assert lse[1] == math.inf and int(arg[1]) == 5000 and torch.isnan(ent[1])
    assert int(arg[2]) == V - 1 and float(maxp[2]) == 1.0 and float(ent[2]) == 0.0 and float(lse[2]) == -3.0
    assert int(arg[3]) >= V // 2 and int(arg[4]) == 4095
    check_close([t[2:] for t in out], x[2:], 0.5, 4.0)
