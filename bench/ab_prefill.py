"""A/B of two builds of the prefill kernels in one run: this checkout's kernels (B) against the compiled objects
of another checkout (A, e.g. the commit before a refactor), both launched by this checkout's launch_prefill with
the same plan on the same inputs: bench_prefill's ten shapes, CUDA-graph replays each after an L2 flush (median
of 10), A and B alternating for --rounds rounds (the median of the rounds' medians). Before timing, one call of
each from the same pool must give bit-identical outputs and states.

    python bench/ab_prefill.py --base-src OTHER_CHECKOUT [--base-cache DIR]   # bench/results/ab_prefill_<gpu>.json

--base-src compiles the other checkout's kernels (its own cute_gdn, in its own compile workers) into
--base-cache (default: OTHER_CHECKOUT/.cute_gdn_cache); both builds compile with 16 jobs before any timing.
The two builds must share the compiled function's arguments (kernels/prefill/kernel.py).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
from bench_prefill import HEADS, SHAPES, make_inputs, prefill_key, time_cold_graph  # noqa: E402
from cute_gdn import ops  # noqa: E402
from cute_gdn.cache import default_cache, load_object  # noqa: E402
from cute_gdn.prefill_launch import launch_prefill  # noqa: E402

_COMPILE_BASE = """
import sys
sys.path.insert(0, sys.argv[1])
import cute_gdn
assert cute_gdn.__file__.startswith(sys.argv[1]), cute_gdn.__file__
from cute_gdn.cache import KernelCache, KernelKey
keys = [KernelKey.make("prefill", io_dtype="bfloat16", state_dtype="float32", num_heads=int(h), num_v_heads=int(hv),
                       head_k_dim=128, head_v_dim=128, pool_size=int(n), gate_mode="raw", dt_bias_dtype="float32",
                       use_qk_l2norm=True) for h, hv, n in (a.split("/") for a in sys.argv[3:])]
cache = KernelCache(sys.argv[2])
cache.compile(keys, jobs=16)
for key in keys:
    print(key.name, cache.path(key))
"""


def compile_base(src: Path, cache_dir: Path, triples) -> dict:
    """Compile the keys (H, HV, pool) with the checkout at `src`; returns key name -> object path."""
    # (Run from `src`: a `python -c` interpreter, the compile workers included, puts its cwd first on sys.path.)
    r = subprocess.run([sys.executable, "-c", _COMPILE_BASE, str(src.resolve()), str(cache_dir.resolve()),
                        *(f"{h}/{hv}/{n}" for h, hv, n in triples)], capture_output=True, text=True, cwd=src)
    if r.returncode != 0:
        raise SystemExit(f"compiling the base build failed:\n{r.stderr[-4000:]}")
    return dict(line.split(" ", 1) for line in r.stdout.strip().splitlines())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-src", type=Path, required=True)
    ap.add_argument("--base-cache", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    base_cache = args.base_cache or args.base_src / ".cute_gdn_cache"
    triples = sorted({(H, HV, n) for H, HV in HEADS for _, n in SHAPES})
    keys = {t: prefill_key(*t) for t in triples}
    default_cache().compile(sorted(keys.values(), key=lambda k: k.name), jobs=16)
    base_paths = compile_base(args.base_src, base_cache, triples)
    print(common.environment()["gpu"], flush=True)
    rows, keep = [], []
    for H, HV in HEADS:
        for tokens, seqs in SHAPES:
            key = keys[H, HV, seqs]
            module, base_fn = load_object(base_paths[key.name])
            keep.append(module)
            fns = {"A": base_fn, "B": default_cache().get(key)}
            x = make_inputs(tokens, seqs, H, HV)
            plan = ops.plan_prefill(seqs, tokens, HV, 128, 128, ops.sm_count(x["q"].device))
            gates = (x["a"], x["b"], x["A_log"], x["dt_bias"])
            init = x["has_init"].view(torch.int8)

            def call(fn, pool, o, x=x, gates=gates, init=init, plan=plan, tokens=tokens, seqs=seqs):
                return lambda: launch_prefill(fn, (x["q"], x["k"], x["v"], *gates, x["cu"], pool, x["slots"], init, o),
                                              128 ** -0.5, plan, tokens, seqs)

            results = {}
            for name, fn in fns.items():
                pool, o = x["pool"].clone(), torch.empty_like(x["o"])
                call(fn, pool, o)()
                torch.cuda.synchronize()
                results[name] = (pool, o)
            same = all(torch.equal(a, b) for a, b in zip(results["A"], results["B"]))
            times = {"A": [], "B": []}
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    times[name].append(time_cold_graph(call(fn, x["pool"], x["o"])))
            a, b = statistics.median(times["A"]), statistics.median(times["B"])
            row = dict(H=H, HV=HV, tokens=tokens, seqs=seqs, plan=plan._asdict(), us_a=a, us_b=b, b_over_a=b / a,
                       rounds_a=times["A"], rounds_b=times["B"], bit_identical=same)
            rows.append(row)
            print(f"H={H:2d} HV={HV:2d} {tokens:6d}x{seqs:<3d} A {a:8.1f} us  B {b:8.1f} us  B/A {b / a:.4f}  "
                  f"bit-identical {same}", flush=True)
            del x, results
            torch.cuda.empty_cache()
    worst = max(r["b_over_a"] for r in rows)
    print(f"worst B/A {worst:.4f}; all bit-identical: {all(r['bit_identical'] for r in rows)}")
    path = common.save("ab_prefill", dict(env=common.environment(), base_src=str(args.base_src), rounds=args.rounds,
                                          rows=rows))
    print("wrote", path)


if __name__ == "__main__":
    main()
