"""Rich tables for the KV-fill benchmark's report (`sedac-chat bench --kv-fill`); the numbers come from
sedac_core.bench_kv, this only lays them out."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.table import Table


def kv_fill_tables(report: dict[str, Any]) -> list[Table]:
    """The summary per fill, then the reconstruction error per skipped layer."""
    summary = _table(f"{report['model']}: KV fills in exit mode (tau_low {report['tau_low']}, {report['prompts']} "
                     f"prompts x {report['max_new_tokens']} tokens, {report['rounds']} rounds)")
    for name in ("fill", "tok/s", "vs full", "exact", "agree", "skip", "exited", "K cos/relL2", "V cos/relL2"):
        summary.add_column(name, justify="left" if name == "fill" else "right", no_wrap=True)
    summary.add_row("full", f"{report['full']['tok_per_s']:.1f}", "1.00x", "", "", "", "", "", "")
    for fill, row in report["fills"].items():
        rec = row["reconstruction"]
        cells = [_pair(rec, "k"), _pair(rec, "v")] if rec else ["-", "-"]
        summary.add_row(fill, f"{row['tok_per_s']:.1f}", f"{row['speedup_vs_full']:.2f}x", f"{row['exact_match']:.2f}",
                        f"{row['agreement']:.3f}", f"{row['skip_ratio']:.3f}", str(row["exited_positions"]), *cells)
    layers = _table("K/V reconstruction per skipped layer (0-based): cosine/relative L2 vs the true K/V, "
                    "mean over exited positions")
    layers.add_column("layer", justify="right")
    fills = list(report["fills"])
    for fill in fills:
        layers.add_column(f"{fill} K", justify="right", no_wrap=True)
        layers.add_column(f"{fill} V", justify="right", no_wrap=True)
    all_layers = sorted({int(j) for f in fills for j in report["fills"][f]["reconstruction_per_layer"]})
    for j in all_layers:
        cells = [str(j)]
        for fill in fills:
            row = report["fills"][fill]["reconstruction_per_layer"].get(str(j))
            cells += [_pair(row, "k"), _pair(row, "v")] if row else ["-", "-"]
        layers.add_row(*cells)
    return [summary, layers]


def _pair(row: dict[str, float], kind: str) -> str:
    return f"{row[kind + '_cos']:.3f}/{row[kind + '_rel_l2']:.3f}"


def _table(title: str) -> Table:
    # compact (a space between columns, no rules but the header's): fits 80 columns with three fills
    return Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, padding=0)
