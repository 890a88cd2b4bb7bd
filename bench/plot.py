"""Plot a bench JSON (bench/results/<op>_<gpu>.json) to a PNG next to it, and print its markdown tables
(the full tables of docs/benchmarks.md).

    python bench/plot.py bench/results/decode_H200.json
    python bench/plot.py bench/results/verify_H200.json    # verify (per T) and commit
    python bench/plot.py bench/results/prefill_<gpu>.json  # prefill: us and TFLOP/s per shape
    python bench/plot.py bench/results/decode_eager_<gpu>.json  # eager B = 1 calls (bench_decode.py --eager)
    python bench/plot.py bench/results/spec_<gpu>.json     # spec steps (bench_spec.py): us per step, ratios
    python bench/plot.py --tables FILE...                  # tables only: no PNG, no matplotlib needed
    python bench/plot.py --summary FILE...                 # the README's short tables (a few rows per op)

Every table goes through `md_table`, which writes the header row once; the tables are pasted into the
docs as printed, with no header of their own above them (that is how a second header row, rendered as
a data row, once got into the README).
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path

# Display names for the JSON's impl and state strings, so that pasted tables need no hand-edited header.
IMPL_NAMES = {"cute_gdn": "cute_gdn", "flashinfer": "FlashInfer", "fla": "FLA", "torch indexing": "torch indexing",
              "cute_gdn commit_layers L=8": "commit_layers, 8 layers", "cute_gdn commit x8": "8 × commit",
              "cute_gdn_replay": "cute_gdn replay (exact)", "cute_gdn_replay_compact": "cute_gdn replay (compact)",
              "cute_gdn_cached": "cute_gdn cached",
              "sglang_replayssm": "SGLang ReplaySSM", "sglang_replayssm_fp32ring": "SGLang ReplaySSM fp32 ring",
              "sglang_replayssm_backend": "SGLang ReplaySSM backend", "sglang_cached": "SGLang cached",
              "flashinfer_mtp": "FlashInfer MTP"}
STATE_NAMES = {"float32": "fp32", "bfloat16": "bf16"}


def _pyplot():
    """matplotlib only for the PNGs: the tables print without it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown lines: the header row, its separator, then the data rows. The header is written here and
    only here; a data row equal to it (a pasted second header) is an error."""
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row {row} has {len(row)} cells, the header {len(header)}")
        if [c.strip() for c in row] == [c.strip() for c in header]:
            raise ValueError(f"data row repeats the header: {row}")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _cell(r: dict | None) -> str:
    """Microseconds (% of copy bandwidth) of one bench row, or empty where the row was not measured."""
    return f"{r['us']:.1f} ({r['pct_bw']:.0f}%)" if r else ""


def decode_table(data: dict) -> str:
    """Markdown tables: us (% of copy bandwidth) per B, one column per implementation and state dtype, per
    head config; then the eager calls at B = 1 against graph replay."""
    rows = [r for r in data["rows"] if "[" not in r["impl"] and "eager" not in r["impl"] and "us" in r]
    cols = []
    for r in rows:
        c = (r["impl"], r["state"])
        if c not in cols:
            cols.append(c)
    out = []
    order = {"permuted": "slots permuted", "sequential": "slots in order"}.get(data.get("order"), "")
    for H, HV in sorted({(r["H"], r["HV"]) for r in rows}, reverse=True):
        out.append(f"\nDecode, H = {H}, HV = {HV}{', ' + order if order else ''}: microseconds "
                   "(% of copy bandwidth)\n")
        body = []
        for B in sorted({r["B"] for r in rows}):
            cells = []
            for impl, state in cols:
                m = [r for r in rows if (r["H"], r["HV"], r["B"], r["impl"], r["state"]) == (H, HV, B, impl, state)]
                cells.append(_cell(m[0] if m else None))
            body.append([str(B)] + cells)
        out += md_table(["B"] + [f"{IMPL_NAMES.get(i, i)} {STATE_NAMES.get(s, s)}" for i, s in cols], body)
    eager = {(r["impl"], r["H"], r["HV"], r["state"]): r["us"] for r in data["rows"] if "eager" in r["impl"]}
    if eager:
        out.append("\nDecode eager call at B = 1 (host overhead included), microseconds\n")
        body = []
        for H, HV, state in dict.fromkeys((k[1], k[2], k[3]) for k in eager):
            replay = [r["us"] for r in rows if (r["impl"], r["H"], r["HV"], r["B"], r["state"]) ==
                      ("cute_gdn", H, HV, 1, state)]
            body.append([f"H={H}/HV={HV}, {STATE_NAMES.get(state, state)} state",
                         f"{eager.get(('cute_gdn eager', H, HV, state), math.nan):.2f}",
                         f"{eager.get(('kernel call eager', H, HV, state), math.nan):.2f}",
                         f"{replay[0]:.2f}" if replay else ""])
        out += md_table(["shape", "cute_gdn.decode", "bare compiled tvm-ffi call", "graph replay"], body)
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
    plt = _pyplot()
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
    then commit per HV."""
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
            body = []
            for B in sorted({r["B"] for r in ver}):
                cells = [str(B)]
                for state in ("float32", "bfloat16"):
                    ours = find("verify", "cute_gdn", T, H, HV, B, state)
                    theirs = find("verify", "flashinfer", T, H, HV, B, state)
                    cells += [_cell(ours), _cell(theirs),
                              f"{theirs['us'] / ours['us']:.2f}x" if ours and theirs else ""]
                body.append(cells)
            out += md_table(["B", "cute_gdn fp32", "FlashInfer fp32", "speedup",
                             "cute_gdn bf16", "FlashInfer bf16", "speedup"], body)
    com = [r for r in rows if r["op"] == "commit"]
    if com:
        impls = list(dict.fromkeys(r["impl"] for r in com))
        steps = sorted({r["T"] for r in com})
        for HV in sorted({r["HV"] for r in com}, reverse=True):
            out.append(f"\nCommit (cache steps {', '.join(map(str, steps))}), HV = {HV}: microseconds "
                       "(% of copy bandwidth)\n")
            body = []
            for B in sorted({r["B"] for r in com}):
                for state in ("float32", "bfloat16"):
                    cells = [str(B), STATE_NAMES.get(state, state)]
                    for impl in impls:
                        m = [r for r in com if (r["impl"], r["HV"], r["B"], r["state"]) == (impl, HV, B, state)]
                        cells.append(_cell(m[0] if m else None))
                    body.append(cells)
            names = ["cute_gdn.commit" if i == "cute_gdn" else IMPL_NAMES.get(i, i) for i in impls]
            out += md_table(["B", "state"] + names, body)
    return "\n".join(out)


def plot_verify(path: Path) -> Path:
    plt = _pyplot()
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


# bench_spec.py's implementations, in table order; the ratios are base time / ours, (ours, base, column).
SPEC_IMPLS = ("cute_gdn_replay", "cute_gdn_replay_compact", "cute_gdn_cached", "sglang_replayssm",
              "sglang_replayssm_fp32ring", "sglang_replayssm_backend", "sglang_cached", "flashinfer_mtp")
SPEC_RATIOS = (("cute_gdn_replay", "sglang_replayssm", "exact vs SGLang ReplaySSM"),
               ("cute_gdn_replay", "cute_gdn_cached", "exact vs cached"),
               ("cute_gdn_replay_compact", "sglang_replayssm", "compact vs SGLang ReplaySSM"),
               ("cute_gdn_replay_compact", "sglang_replayssm_backend", "compact vs SGLang backend"),
               ("cute_gdn_replay_compact", "cute_gdn_cached", "compact vs cached"))


def _spec_impls(rows: list[dict]) -> list[str]:
    present = list(dict.fromkeys(r["impl"] for r in rows))
    return [i for i in SPEC_IMPLS if i in present] + [i for i in present if i not in SPEC_IMPLS]


def spec_table(data: dict) -> str:
    """Markdown tables per (T, H, HV): microseconds per spec step (% of the byte model's time at copy
    bandwidth) per implementation, with the replay's speedups (their time / ours); then the memory per
    request per layer."""
    rows = [r for r in data["rows"] if r.get("op") == "spec"]
    timed = [r for r in rows if "us" in r]
    impls = _spec_impls(timed)
    out = []
    for T in sorted({r["T"] for r in timed}):
        for H, HV in sorted({(r["H"], r["HV"]) for r in timed if r["T"] == T}, reverse=True):
            out.append(f"\nSpec step (verify + commit) T = {T}, H = {H}, HV = {HV}, ring {data.get('ring_len', '')}: "
                       "microseconds per step (% of the byte model at copy bandwidth), replay speedup\n")
            body = []
            for B in sorted({r["B"] for r in timed if (r["T"], r["H"], r["HV"]) == (T, H, HV)}):
                for state in ("float32", "bfloat16"):
                    got = {r["impl"]: r for r in timed if (r["T"], r["H"], r["HV"], r["B"], r["state"]) ==
                           (T, H, HV, B, state)}
                    if not got:
                        continue
                    cells = [str(B), STATE_NAMES.get(state, state)]
                    cells += [f"{got[i]['us']:.1f} ({got[i]['pct_model']:.0f}%)" if i in got else "" for i in impls]
                    ratios = [(o, b, n) for o, b, n in SPEC_RATIOS if o in impls and b in impls]
                    for ours, base, _ in ratios:
                        cells.append(f"{got[base]['us'] / got[ours]['us']:.2f}x" if ours in got and base in got
                                     else "")
                    body.append(cells)
            ratios = [(o, b, n) for o, b, n in SPEC_RATIOS if o in impls and b in impls]
            out += md_table(["B", "state"] + [IMPL_NAMES.get(i, i) for i in impls] + [n for _, _, n in ratios],
                            body)
    mem = {}
    for r in rows:
        mem.setdefault((r["T"], r["H"], r["HV"], r["state"]), {})[r["impl"]] = r["mem_per_request"]
    if mem:
        mimpls = _spec_impls(rows)
        out.append("\nSpeculative scratch per request per layer, KiB (cached: T intermediate states; replay: "
                   "the ring)\n")
        body = [[str(T), f"{H}/{HV}", STATE_NAMES.get(st, st)] +
                [f"{m[i] / 1024:.0f}" if i in m else "" for i in mimpls]
                for (T, H, HV, st), m in sorted(mem.items(), key=lambda kv: (kv[0][0], -kv[0][2], kv[0][3]))]
        out += md_table(["T", "H/HV", "state"] + [IMPL_NAMES.get(i, i) for i in mimpls], body)
    errors = [r for r in rows if "error" in r]
    if errors:
        out.append("\nNot timed\n")
        out += md_table(["impl", "T", "H/HV", "B", "state", "why"],
                        [[IMPL_NAMES.get(r["impl"], r["impl"]), str(r["T"]), f"{r['H']}/{r['HV']}", str(r["B"]),
                          STATE_NAMES.get(r["state"], r["state"]), r["error"].replace("|", "/").splitlines()[0][:120]]
                         for r in errors])
    return "\n".join(out)


def plot_spec(path: Path) -> Path:
    """One panel per (T, H, HV): microseconds per spec step over the batch, a line per implementation and
    state dtype (ours solid, log-log)."""
    plt = _pyplot()
    data = json.loads(path.read_text())
    rows = [r for r in data["rows"] if r.get("op") == "spec" and "us" in r]
    panels = sorted({(r["T"], r["H"], r["HV"]) for r in rows}, key=lambda p: (p[0] != 4, p[0], -p[2]))
    cols = min(4, max(1, len(panels)))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(max(1, nrows), cols, figsize=(5.5 * cols, 4.2 * max(1, nrows)), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (T, H, HV) in zip(axes.flat, panels):
        series = defaultdict(list)
        for r in rows:
            if (r["T"], r["H"], r["HV"]) == (T, H, HV):
                series[(r["impl"], r["state"])].append((r["B"], r["us"]))
        for (impl, state), pts in sorted(series.items(), key=lambda kv: (SPEC_IMPLS.index(kv[0][0])
                                                                         if kv[0][0] in SPEC_IMPLS else 99, kv[0][1])):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if state == "float32" else "s",
                    linestyle="-" if impl.startswith("cute_gdn") else "--",
                    label=f"{IMPL_NAMES.get(impl, impl)} ({STATE_NAMES.get(state, state)})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch (sequences)")
        ax.set_ylabel("us per spec step (verify + commit)")
        ax.grid(alpha=0.3, which="both")
        ax.set_title(f"spec T={T} H={H} HV={HV}, {data['env']['gpu']}", fontsize=9)
        ax.legend(fontsize=5.5)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=100)
    return out


# bench_decode.py --eager's entry points, in table order, with their display names.
EAGER_IMPLS = {"cute_gdn.decode": "cute_gdn.decode", "cute_gdn.decode (--ab-ops)": "--ab-ops ops.py",
               "kernel call": "kernel call", "torch.ops.cute_gdn.decode": "torch.ops.cute_gdn.decode",
               "torch.ops.cute_gdn.decode_out": "torch.ops.cute_gdn.decode_out", "flashinfer": "FlashInfer"}


def _eager_shapes(data: dict) -> tuple[list, dict, list]:
    """(shapes (H, HV, state), us by (shape, impl, mode), the eager impls present, in EAGER_IMPLS order)."""
    us = {((r["H"], r["HV"], r["state"]), r["impl"], r["mode"]): r["us"] for r in data["rows"]}
    shapes = list(dict.fromkeys(shape for shape, _, _ in us))
    impls = [i for i in EAGER_IMPLS if any((shape, i, "eager") in us for shape in shapes)]
    return shapes, us, impls


def eager_table(data: dict) -> str:
    """Markdown table: microseconds per eager call at B = 1 for every entry point, graph replay beside."""
    shapes, us, impls = _eager_shapes(data)
    graphs = [i for i in ("cute_gdn.decode", "flashinfer") if any((s, i, "graph") in us for s in shapes)]
    header = ["shape"] + [EAGER_IMPLS[i] for i in impls] + [f"{EAGER_IMPLS[i]} graph" for i in graphs]
    body = [[f"H={H}/HV={HV}, {STATE_NAMES[st]} state"] + [f"{us[((H, HV, st), i, 'eager')]:.2f}" for i in impls]
            + [f"{us[((H, HV, st), i, 'graph')]:.2f}" for i in graphs] for H, HV, st in shapes]
    gpu = data["env"]["gpu"]
    return "\n".join([f"Decode eager call at B = 1, {gpu}, host overhead included, microseconds", ""]
                     + md_table(header, body))


def plot_eager(path: Path) -> Path:
    plt = _pyplot()
    data = json.loads(path.read_text())
    shapes, us, impls = _eager_shapes(data)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(impls)
    for j, impl in enumerate(impls):
        ax.bar([i + j * width for i in range(len(shapes))], [us[(s, impl, "eager")] for s in shapes], width,
               label=EAGER_IMPLS[impl])
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))],
                  [f"H={H} HV={HV}\n{STATE_NAMES[st]} state" for H, HV, st in shapes])
    ax.set_ylabel("us per eager call (B = 1)")
    ax.set_yscale("log")
    ax.set_title(f"Decode eager call at B = 1, {data['env']['gpu']}", fontsize=9)
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    ax.set_ylim(top=max(us.values()) * 4)  # room for the legend above the bars
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


def _geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def prefill_table(data: dict) -> str:
    """Markdown table per head config: us (TFLOP/s) per shape and implementation, our ratios, and their
    geometric means over the shapes."""
    rows = [r for r in data["rows"] if "us" in r]
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    out = []
    for H, HV in sorted({(r["H"], r["HV"]) for r in rows}, reverse=True):
        out.append(f"\nPrefill ({data.get('timing', 'eager')}), H = {H}, HV = {HV}, K = V = 128, fp32 state: "
                   "microseconds (TFLOP/s)\n")
        shapes = list(dict.fromkeys((r["tokens"], r["seqs"]) for r in rows if (r["H"], r["HV"]) == (H, HV)))
        body, ratios = [], defaultdict(list)
        for tokens, seqs in shapes:
            got = {r["impl"]: r for r in rows if (r["H"], r["HV"], r["tokens"], r["seqs"]) == (H, HV, tokens, seqs)}
            cells = [f"{got[i]['us']:.0f} ({got[i]['tflops']:.0f})" if i in got else "" for i in impls]
            for base in ("flashinfer", "fla"):
                ok = "cute_gdn" in got and base in got
                if ok:
                    ratios[base].append(got[base]["us"] / got["cute_gdn"]["us"])
                cells.append(f"{got[base]['us'] / got['cute_gdn']['us']:.2f}x" if ok else "")
            body.append([f"{tokens} x {seqs}"] + cells)
        body.append(["geometric mean"] + [""] * len(impls) +
                    [f"{_geomean(ratios[b]):.2f}x" if ratios[b] else "" for b in ("flashinfer", "fla")])
        out += md_table(["tokens x seqs"] + [IMPL_NAMES.get(i, i) for i in impls] + ["vs FlashInfer", "vs FLA"],
                        body)
    return "\n".join(out)


def plot_prefill(path: Path) -> Path:
    plt = _pyplot()
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


def _pick(rows: list[dict], **match) -> dict | None:
    m = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return m[0] if m else None


def _us(r: dict | None) -> str:
    return f"{r['us']:.1f}" if r else ""


def summary_table(data: dict) -> str:
    """The README's short table for one bench JSON: a few batch sizes or shapes, microseconds, with the
    anchors measured in the same run."""
    rows = [r for r in data["rows"] if "us" in r and "[" not in r["impl"]]
    ops = {r["op"] for r in rows}
    gpu = data["env"]["gpu"]
    if "prefill" in ops:
        heads = sorted({(r["H"], r["HV"]) for r in rows}, reverse=True)
        shapes = list(dict.fromkeys((r["tokens"], r["seqs"]) for r in rows))
        impls = ("cute_gdn", "flashinfer", "fla")
        header = ["tokens x seqs"] + [f"H{H}/HV{HV} {IMPL_NAMES[i]}" for H, HV in heads for i in impls]
        body = [[f"{t} x {n}"] + [f"{r['us']:.0f}" if (r := _pick(rows, H=H, HV=HV, tokens=t, seqs=n, impl=i))
                                  else "" for H, HV in heads for i in impls] for t, n in shapes]
        gm = ["their time / ours, geometric mean"]
        for H, HV in heads:
            ours = {(r["tokens"], r["seqs"]): r["us"] for r in rows
                    if (r["H"], r["HV"], r["impl"]) == (H, HV, "cute_gdn")}
            gm.append("")
            for base in impls[1:]:
                xs = [r["us"] / ours[(r["tokens"], r["seqs"])] for r in rows
                      if (r["H"], r["HV"], r["impl"]) == (H, HV, base) and (r["tokens"], r["seqs"]) in ours]
                gm.append(f"{_geomean(xs):.2f}x" if xs else "")
        title = f"Prefill ({data.get('timing', 'eager')}), {gpu}, fp32 state, bf16 io, microseconds"
        return "\n".join([title, ""] + md_table(header, body + [gm]))
    out = []
    if "decode" in ops:
        H, HV = 16, 32
        cols = [("cute_gdn", "float32"), ("flashinfer", "float32"), ("fla", "float32"),
                ("cute_gdn", "bfloat16"), ("flashinfer", "bfloat16")]
        body = [[str(B)] + [_us(_pick(rows, H=H, HV=HV, B=B, impl=i, state=st)) for i, st in cols]
                for B in (1, 64, 512)]
        out += [f"Decode, {gpu}, H = {H}, HV = {HV}, microseconds", ""]
        out += md_table(["B"] + [f"{IMPL_NAMES[i]} {STATE_NAMES[st]}" for i, st in cols], body)
    if "verify" in ops:
        H, HV, T = 16, 32, 4
        body = []
        for B in (1, 16, 256):
            cells = [str(B)]
            for st in ("float32", "bfloat16"):
                ours = _pick(rows, op="verify", T=T, H=H, HV=HV, B=B, impl="cute_gdn", state=st)
                theirs = _pick(rows, op="verify", T=T, H=H, HV=HV, B=B, impl="flashinfer", state=st)
                cells += [_us(ours), _us(theirs)]
            body.append(cells)
        out += [f"Verify, {gpu}, T = {T}, H = {H}, HV = {HV}, microseconds", ""]
        out += md_table(["B", "cute_gdn fp32", "FlashInfer fp32", "cute_gdn bf16", "FlashInfer bf16"], body)
    if "commit" in ops:
        HV = 32
        impls = ["cute_gdn", "torch indexing", "cute_gdn commit_layers L=8", "cute_gdn commit x8"]
        body = [[str(B)] + [_us(_pick(rows, op="commit", HV=HV, B=B, impl=i, state="float32")) for i in impls]
                for B in (1, 64, 256)]
        out += ["", f"Commit, {gpu}, HV = {HV}, fp32 state, microseconds", ""]
        out += md_table(["B", "cute_gdn.commit", "torch indexing", "commit_layers, 8 layers", "8 × commit"], body)
    return "\n".join(out)


def main(argv: list[str]) -> None:
    tables_only = "--tables" in argv
    summary = "--summary" in argv
    for p in [a for a in argv if not a.startswith("--")]:
        data = json.loads(Path(p).read_text())
        ops = {r.get("op") for r in data["rows"]}
        if summary:
            print(summary_table(data) + "\n")
            continue
        if any(r.get("mode") == "eager" for r in data["rows"]):
            plot_fn, table_fn = plot_eager, eager_table
        elif "prefill" in ops:
            plot_fn, table_fn = plot_prefill, prefill_table
        elif "spec" in ops:
            plot_fn, table_fn = plot_spec, spec_table
        elif "verify" in ops:
            plot_fn, table_fn = plot_verify, verify_table
        else:
            plot_fn, table_fn = plot, decode_table
        if not tables_only:
            print(plot_fn(Path(p)))
        print(table_fn(data))


if __name__ == "__main__":
    main(sys.argv[1:])
