"""Plot a bench JSON (bench/results/<op>_<gpu>.json) to a PNG next to it, and print its README table.

    python bench/plot.py bench/results/decode_H200.json
    python bench/plot.py bench/results/verify_H200.json    # verify (per T) and commit
    python bench/plot.py bench/results/prefill_<gpu>.json  # prefill: us and TFLOP/s per shape
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def decode_table(data: dict) -> str:
    """Markdown table: us (% of copy bandwidth) per B, one column per implementation and state dtype."""
    rows = [r for r in data["rows"] if "[" not in r["impl"] and "eager" not in r["impl"] and "us" in r]
    cols = []
    for r in rows:
        c = (r["impl"], r["state"])
        if c not in cols:
            cols.append(c)
    out = []
    for H, HV in sorted({(r["H"], r["HV"]) for r in rows}, reverse=True):
        out.append(f"\nH = {H}, HV = {HV}: microseconds (% of copy bandwidth)\n")
        out.append("| B | " + " | ".join(f"{i} {s}" for i, s in cols) + " |")
        out.append("|---" * (len(cols) + 1) + "|")
        for B in sorted({r["B"] for r in rows}):
            cells = []
            for impl, state in cols:
                m = [r for r in rows if (r["H"], r["HV"], r["B"], r["impl"], r["state"]) == (H, HV, B, impl, state)]
                cells.append(f"{m[0]['us']:.1f} ({m[0]['pct_bw']:.0f}%)" if m else "")
            out.append(f"| {B} | " + " | ".join(cells) + " |")
    eager = [r for r in data["rows"] if "eager" in r["impl"]]
    if eager:
        out.append("\nEager call at B = 1 (host overhead included): " + ", ".join(
            f"{r['impl']} H={r['H']}/HV={r['HV']} {r['state']} {r['us']:.1f} us" for r in eager))
    return "\n".join(out)


def _bandwidth_panel(ax, series: dict, title: str, data: dict, legend_size: int) -> None:
    """One panel: % of copy bandwidth over the batch, a line per implementation (ours solid)."""
    for name, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                linestyle="-" if name.startswith("cute_gdn") else "--", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (sequences)")
    ax.set_ylabel("% of copy bandwidth")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.set_title(f"{title}, {data['env']['gpu']}, copy {data['copy_bandwidth'] / 1e12:.2f} TB/s", fontsize=9)
    ax.legend(fontsize=legend_size)


def plot(path: Path) -> Path:
    data = json.loads(path.read_text())
    rows = [r for r in data["rows"] if "pct_bw" in r and "[" not in r["impl"]]
    heads = sorted({(r["H"], r["HV"]) for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(heads), figsize=(6 * len(heads), 4.5), squeeze=False)
    for ax, (H, HV) in zip(axes[0], heads):
        series = defaultdict(list)
        for r in rows:
            if (r["H"], r["HV"]) == (H, HV):
                series[f"{r['impl']} ({r['state']} state)"].append((r["B"], r["pct_bw"]))
        _bandwidth_panel(ax, series, f"{data['rows'][0]['op']} H={H} HV={HV}", data, legend_size=7)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


def verify_table(data: dict) -> str:
    """Markdown tables: verify per T and head config (us, % of copy bandwidth, speedup over FlashInfer),
    then commit."""
    rows = [r for r in data["rows"] if "us" in r and "[" not in r["impl"]]
    out = []
    ver = [r for r in rows if r["op"] == "verify"]

    def find(op, impl, T, H, HV, B, state):
        m = [r for r in rows if (r["op"], r["impl"], r["T"], r["H"], r["HV"], r["B"], r["state"]) ==
             (op, impl, T, H, HV, B, state)]
        return m[0] if m else None

    for T in sorted({r["T"] for r in ver}):
        for H, HV in sorted({(r["H"], r["HV"]) for r in ver}, reverse=True):
            out.append(f"\nVerify T = {T}, H = {H}, HV = {HV}: microseconds (% of copy bandwidth), "
                       "speedup over FlashInfer\n")
            out.append("| B | cute_gdn fp32 | FlashInfer fp32 | speedup | cute_gdn bf16 | FlashInfer bf16 | speedup |")
            out.append("|---|---|---|---|---|---|---|")
            for B in sorted({r["B"] for r in ver}):
                cells = []
                for state in ("float32", "bfloat16"):
                    ours = find("verify", "cute_gdn", T, H, HV, B, state)
                    theirs = find("verify", "flashinfer", T, H, HV, B, state)
                    for r in (ours, theirs):
                        cells.append(f"{r['us']:.1f} ({r['pct_bw']:.0f}%)" if r else "")
                    cells.append(f"{theirs['us'] / ours['us']:.2f}x" if ours and theirs else "")
                out.append(f"| {B} | " + " | ".join(cells) + " |")
    com = [r for r in rows if r["op"] == "commit"]
    if com:
        impls = list(dict.fromkeys(r["impl"] for r in com))
        for HV in sorted({r["HV"] for r in com}, reverse=True):
            out.append(f"\nCommit, HV = {HV}: microseconds (% of copy bandwidth)\n")
            out.append("| B | state | " + " | ".join(impls) + " |")
            out.append("|---" * (len(impls) + 2) + "|")
            for B in sorted({r["B"] for r in com}):
                for state in ("float32", "bfloat16"):
                    cells = []
                    for impl in impls:
                        m = [r for r in com if (r["impl"], r["HV"], r["B"], r["state"]) == (impl, HV, B, state)]
                        cells.append(f"{m[0]['us']:.1f} ({m[0]['pct_bw']:.0f}%)" if m else "")
                    out.append(f"| {B} | {state} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot_verify(path: Path) -> Path:
    data = json.loads(path.read_text())
    rows = [r for r in data["rows"] if "pct_bw" in r and "[" not in r["impl"]]
    panels = sorted({("verify", r["T"], r["H"], r["HV"]) for r in rows if r["op"] == "verify"},
                    key=lambda p: (p[1] != 4, p[1], -p[3]))
    panels += sorted({("commit", r["T"], 0, r["HV"]) for r in rows if r["op"] == "commit"}, key=lambda p: -p[3])
    cols = 4
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 4 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (op, T, H, HV) in zip(axes.flat, panels):
        series = defaultdict(list)
        for r in rows:
            if r["op"] == op and r["HV"] == HV and (op == "commit" or (r["T"], r["H"]) == (T, H)):
                series[f"{r['impl']} ({r['state']})"].append((r["B"], r["pct_bw"]))
        title = f"verify T={T} H={H} HV={HV}" if op == "verify" else f"commit HV={HV}"
        _bandwidth_panel(ax, series, title, data, legend_size=6)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=100)
    return out


def prefill_table(data: dict) -> str:
    """Markdown table per head config: us (TFLOP/s) per shape and implementation, and our ratios."""
    rows = [r for r in data["rows"] if "us" in r]
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    out = []
    for H, HV in sorted({(r["H"], r["HV"]) for r in rows}, reverse=True):
        out.append(f"\nH = {H}, HV = {HV}, K = V = 128, fp32 state: microseconds (TFLOP/s)\n")
        out.append("| tokens x seqs | " + " | ".join(impls) + " | vs FlashInfer | vs FLA |")
        out.append("|---" * (len(impls) + 3) + "|")
        shapes = list(dict.fromkeys((r["tokens"], r["seqs"]) for r in rows if (r["H"], r["HV"]) == (H, HV)))
        for tokens, seqs in shapes:
            got = {r["impl"]: r for r in rows if (r["H"], r["HV"], r["tokens"], r["seqs"]) == (H, HV, tokens, seqs)}
            cells = [f"{got[i]['us']:.0f} ({got[i]['tflops']:.0f})" if i in got else "" for i in impls]
            for base in ("flashinfer", "fla"):
                ok = "cute_gdn" in got and base in got
                cells.append(f"{got[base]['us'] / got['cute_gdn']['us']:.2f}x" if ok else "")
            out.append(f"| {tokens} x {seqs} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot_prefill(path: Path) -> Path:
    data = json.loads(path.read_text())
    rows = [r for r in data["rows"] if "us" in r]
    heads = sorted({(r["H"], r["HV"]) for r in rows}, reverse=True)
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(1, len(heads), figsize=(6 * len(heads), 4.5), squeeze=False)
    for ax, (H, HV) in zip(axes[0], heads):
        shapes = list(dict.fromkeys((r["tokens"], r["seqs"]) for r in rows if (r["H"], r["HV"]) == (H, HV)))
        width = 0.8 / len(impls)
        for k, impl in enumerate(impls):
            vals = []
            for tokens, seqs in shapes:
                m = [r for r in rows if (r["H"], r["HV"], r["tokens"], r["seqs"], r["impl"]) ==
                     (H, HV, tokens, seqs, impl)]
                vals.append(m[0]["tflops"] if m else 0.0)
            ax.bar([i + k * width for i in range(len(shapes))], vals, width, label=impl)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))])
        ax.set_xticklabels([f"{t}x{n}" for t, n in shapes], fontsize=8)
        ax.set_xlabel("tokens x sequences")
        ax.set_ylabel("TFLOP/s (bench_prefill FLOP model)")
        ax.grid(alpha=0.3, axis="y")
        ax.set_title(f"prefill H={H} HV={HV}, fp32 state, {data['env']['gpu']}", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    for p in sys.argv[1:]:
        data = json.loads(Path(p).read_text())
        if any(r.get("op") == "prefill" for r in data["rows"]):
            print(plot_prefill(Path(p)))
            print(prefill_table(data))
        elif any(r.get("op") == "verify" for r in data["rows"]):
            print(plot_verify(Path(p)))
            print(verify_table(data))
        else:
            print(plot(Path(p)))
            print(decode_table(data))
