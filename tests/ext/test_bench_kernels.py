"""The kernel benchmark runs end to end (quick mode) and writes its JSON."""

from __future__ import annotations

import json

from sedac_core.bench_kernels import format_kernel_bench, run_kernel_bench


def test_quick_kernel_bench_writes_json(tmp_path):
    out = tmp_path / "kernels.json"
    result = run_kernel_bench(json_out=out, quick=True)
    assert json.loads(out.read_text())["results"] == result["results"]
    rows = result["results"]
    assert {(r["batch"], r["vocab"]) for r in rows if r["device"] == "cpu"} == {
        (b, v) for b in (1, 4, 32) for v in (49152, 151936, 262144)}
    for r in rows:
        assert r["us_per_row"] > 0 and r["torch_us_per_row"] > 0 and r["read_us_per_row"] > 0
        assert r["speedup_vs_torch"] > 0 and r["read_fraction"] > 0
        if r["device"] == "cpu" and r["backend"] == "cpp":  # the read with the kernel's own split and threads
            assert r["split_read_us_per_row"] > 0 and r["split_read_fraction"] > 0
    assert all("x_split_read_time" in t for t in result["targets"])
    text = format_kernel_bench(result)
    assert "speedup" in text and "torch:" in text
