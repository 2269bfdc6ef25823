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


def test_cuda_rows_get_their_own_target_lines():
    """On a GPU, the fp32 V=151,936 rows are checked against the CUDA target (>= 3x the torch reference)."""
    from sedac_core.bench_kernels import _targets

    def row(device, backend, batch, speedup):
        return {"device": device, "backend": backend, "dtype": "float32", "batch": batch, "vocab": 151936,
                "us_per_row": 1.0, "torch_us_per_row": speedup, "read_us_per_row": 0.5, "speedup_vs_torch": speedup,
                "read_fraction": 0.5, "gb_per_s": 600.0}

    rows = [row("cuda", "cuda", 1, 2.5), row("cuda", "cuda", 32, 8.0), row("cpu", "cpp", 1, 20.0)]
    targets = _targets(rows)
    assert [(t["device"], t["batch"], t["speedup_ok"]) for t in targets] == [
        ("cuda", 1, False), ("cuda", 32, True), ("cpu", 1, True)]
    text = format_kernel_bench({"torch": "x", "threads": 1, "cpu_isa": "AVX512", "backends": [], "results": rows,
                                "targets": targets})
    assert "targets (cuda fp32, V=151936)" in text and "2.50x faster [MISS]" in text and "8.00x faster [ok]" in text
    assert "targets (cpu fp32)" in text


def test_bench_can_time_one_device_only():
    result = run_kernel_bench(quick=True, devices=("cuda",))
    assert all(r["device"] == "cuda" for r in result["results"])  # none at all without a GPU
