"""Decode (T = 1) speed: cute_gdn vs FlashInfer and FLA, one run, cold L2, CUDA-graph replay.

    python bench/bench_decode.py                      # all baselines, writes bench/results/decode_<gpu>.json
    python bench/bench_decode.py --baselines fla      # without FlashInfer
    python bench/bench_decode.py --sweep 32:4:8       # also time these threads_per_row:rows_per_pass:rows_per_thread configs
    python bench/bench_decode.py --eager              # only B = 1 eager calls (cute_gdn.decode, torch.ops.cute_gdn.decode,
                                                      # the kernel call, FlashInfer): decode_eager_<gpu>.json
    git show REV:cute_gdn/ops.py > /tmp/ops_rev.py && python bench/bench_decode.py --eager --ab-ops /tmp/ops_rev.py
                                                      # also that revision's host path, in the same rounds

Bytes = 2 x state (read + write of each named state); % bw is against the copy bandwidth measured
in the same run. FLA has no pool: it reads initial states [B, HV, V, K] and writes fresh final
states (the same bytes).

--eager times the host-inclusive cost of one eager call at B = 1, where the host is the bottleneck:
rounds of back-to-back calls after a sync (CUDA events around them, and the wall clock up to the sync
after the last), the rounds of all entry points interleaved, the median round of each reported; graph
replay of the same shape (cold L2, as the main table) is reported beside it for reference.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import cute_gdn  # noqa: E402
import cute_gdn.torch_ops  # noqa: E402,F401  (registers torch.ops.cute_gdn.*)
from cute_gdn import reference  # noqa: E402
from cute_gdn.cache import default_cache  # noqa: E402
from cute_gdn.kernels.decode import DecodeConfig, can_implement  # noqa: E402
from cute_gdn.ops import decode_key  # noqa: E402

BATCHES = (1, 4, 16, 64, 256, 512)
STATE_DTYPES = (torch.float32, torch.bfloat16)
EAGER_ROUNDS = 9   # interleaved rounds per entry point; the median is reported
EAGER_REPS = 200   # back-to-back calls per round
HEADS = ((16, 32), (8, 16))
K = V = 128


SEQUENTIAL = False  # --order sequential: slot b for sequence b (as FLA, which has no pool, reads states)


def make_set(B, H, HV, state_dtype):
    q = torch.randn(B, 1, H, K, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, 1, H, K, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, 1, HV, V, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(B, 1, HV, device="cuda").to(torch.bfloat16)
    b = torch.randn(B, 1, HV, device="cuda").to(torch.bfloat16)
    A_log = torch.rand(HV, device="cuda") - 0.5
    dt_bias = torch.randn(HV, device="cuda")
    pool = (torch.randn(B, HV, V, K, device="cuda") * 0.5).to(state_dtype)
    slots = (torch.arange(B, device="cuda") if SEQUENTIAL else torch.randperm(B, device="cuda")).to(torch.int32)
    out = torch.empty(B, 1, HV, V, device="cuda", dtype=torch.bfloat16)
    return dict(q=q, k=k, v=v, a=a, b=b, A_log=A_log, dt_bias=dt_bias, state=pool, state_indices=slots, out=out)


def bench_key(B, H, HV, state_dtype, config=None, large_batch=False):
    return decode_key(large_batch=large_batch, io_dtype="bfloat16", state_dtype={torch.float32: "float32", torch.bfloat16: "bfloat16"}[state_dtype],
                      num_heads=H, num_v_heads=HV, head_k_dim=K, head_v_dim=V, pool_size=B, gate_mode="raw",
                      dt_bias_dtype="float32", use_qk_l2norm=True, config=config)


def parse_config(text: str) -> DecodeConfig:
    """threads_per_row:rows_per_pass:rows_per_thread[:smem_staging 0/1]"""
    f = [int(x) for x in text.split(":")]
    return DecodeConfig(f[0], f[1], f[2], bool(f[3]) if len(f) > 3 else False)


def fits(config, state_dtype) -> bool:
    sd = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[state_dtype]
    return config is None or can_implement("bfloat16", sd, 1, 1, K, V, "raw", "float32", config) is None


def cute_calls(sets, config=None):
    if config is None:
        return [lambda s=s: cute_gdn.decode(**s) for s in sets]
    s0 = sets[0]
    B, _, H, _ = s0["q"].shape
    fn = default_cache().get(bench_key(B, H, s0["v"].shape[2], s0["state"].dtype, config))
    return [lambda s=s: fn(s["q"], s["k"], s["v"], s["a"], s["b"], s["A_log"], s["dt_bias"], s["state"],
                           s["state_indices"], s["out"], K ** -0.5) for s in sets]


def flashinfer_calls(sets):
    from flashinfer.gdn_decode import gated_delta_rule_decode_pretranspose

    return [lambda s=s: gated_delta_rule_decode_pretranspose(
        s["q"], s["k"], s["v"], None, s["A_log"], s["a"], s["dt_bias"], s["b"], scale=K ** -0.5,
        output=s["out"], use_qk_l2norm=True, initial_state=s["state"], initial_state_indices=s["state_indices"])
        for s in sets]


def fla_calls(sets):
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

    calls = []
    for s in sets:
        g, beta = reference.compute_gates(s["a"], s["b"], s["A_log"], s["dt_bias"], dtype=torch.float32)
        init = s["state"].float()
        calls.append(lambda s=s, g=g, beta=beta, init=init: fused_recurrent_gated_delta_rule(
            s["q"], s["k"], s["v"], g=g, beta=beta, scale=K ** -0.5, initial_state=init,
            output_final_state=True, use_qk_l2norm_in_kernel=True, state_v_first=True))
    return calls


def load_ops_variant(path: str):
    """An ops.py of another revision, loaded inside the cute_gdn package (so with this tree's kernels, cache
    and checks): `--ab-ops` times its eager host path against this one's in the same interleaved rounds."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cute_gdn._ops_ab", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


AB_OPS = None  # --ab-ops: the other revision's ops module


def eager_calls(s, baselines) -> dict:
    """The eager entry points at B = 1 on input set s, each writing s["out"] where its API takes one."""
    state_dtype = str(s["state"].dtype).split(".")[-1]
    gates = (s["a"], s["b"], s["A_log"], s["dt_bias"], None, None)
    calls = {
        "cute_gdn.decode": lambda: cute_gdn.decode(**s),
        "torch.ops.cute_gdn.decode_out": lambda: torch.ops.cute_gdn.decode_out(
            s["q"], s["k"], s["v"], *gates, s["state"], s["state_indices"], None, True, s["out"]),
        "torch.ops.cute_gdn.decode": lambda: torch.ops.cute_gdn.decode(
            s["q"], s["k"], s["v"], *gates, s["state"], s["state_indices"], None, True),
        "kernel call": cute_calls([s], DecodeConfig.heuristic(K, V, state_dtype))[0],
    }
    if AB_OPS is not None:
        calls["cute_gdn.decode (--ab-ops)"] = lambda: AB_OPS.decode(**s)
    if "flashinfer" in baselines:
        calls["flashinfer"] = flashinfer_calls([s])[0]
    return calls


def run_eager(heads, baselines) -> list[dict]:
    """The --eager table: every entry point's eager call at B = 1, and graph replay for reference."""
    keys = {bench_key(1, H, HV, sd, None, large) for H, HV in heads for sd in STATE_DTYPES for large in (False, True)}
    default_cache().compile(sorted(keys, key=lambda k: k.name), jobs=os.cpu_count() or 1)
    rows = []
    for H, HV in heads:
        for state_dtype in STATE_DTYPES:
            state = str(state_dtype).split(".")[-1]
            base = dict(op="decode", H=H, HV=HV, B=1, state=state)
            sets = [make_set(1, H, HV, state_dtype) for _ in range(common.rotation_count(
                common.decode_bytes(1, HV, V, K, state_dtype) // 2))]
            try:
                calls = eager_calls(sets[0], baselines)
            except ImportError as e:  # FlashInfer missing: time the rest
                print(f"flashinfer: {e}", flush=True)
                calls = eager_calls(sets[0], [b for b in baselines if b != "flashinfer"])
            for fn in calls.values():
                for _ in range(10):  # warm: first-call loads outside the timing
                    fn()
            samples = {name: [] for name in calls}
            for _ in range(EAGER_ROUNDS):
                for name, fn in calls.items():
                    samples[name].append(common.eager_round(fn, EAGER_REPS))
            for name, got in samples.items():
                row = dict(base, impl=name, mode="eager", us=statistics.median(e for e, _ in got),
                           wall_us=statistics.median(w for _, w in got))
                rows.append(row)
                print(f"H={H:2d} HV={HV:2d} {state:8s} {name:32s} eager {row['us']:7.2f} us "
                      f"(wall clock {row['wall_us']:7.2f} us)", flush=True)
            graphs = {"cute_gdn.decode": cute_calls(sets)}
            if "flashinfer" in calls:
                graphs["flashinfer"] = flashinfer_calls(sets)
            for name, graph_calls in graphs.items():
                row = dict(base, impl=name, mode="graph", us=common.time_graph(graph_calls))
                rows.append(row)
                print(f"H={H:2d} HV={HV:2d} {state:8s} {name:32s} graph {row['us']:7.2f} us", flush=True)
            del sets, calls, graphs
            torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baselines", default="flashinfer,fla")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--sweep", default="", help="DecodeConfigs to time besides the heuristic, as "
                    "threads_per_row:rows_per_pass:rows_per_thread[:smem_staging], e.g. 8:16:2,16:8:8:1")
    ap.add_argument("--heads", default="16/32,8/16", help="H/HV pairs")
    ap.add_argument("--order", choices=("permuted", "sequential"), default="permuted",
                    help="state_indices: a random permutation of the pool (serving) or arange(B)")
    ap.add_argument("--ab-ops", default="", help="--eager: also time the eager decode of this ops.py (another "
                    "revision's, e.g. from git show REV:cute_gdn/ops.py), loaded into this tree's package")
    ap.add_argument("--eager", action="store_true",
                    help="only the B = 1 eager table (with graph replay for reference): decode_eager_<gpu>.json")
    args = ap.parse_args()
    global SEQUENTIAL
    SEQUENTIAL = args.order == "sequential"
    baselines = [b for b in args.baselines.split(",") if b]
    batches = [int(x) for x in args.batches.split(",")]
    heads = [tuple(int(x) for x in hh.split("/")) for hh in args.heads.split(",")]
    if args.eager:
        global AB_OPS
        if args.ab_ops:
            AB_OPS = load_ops_variant(args.ab_ops)
        print(common.environment()["gpu"])
        rows = run_eager(heads, baselines)
        path = common.save("decode_eager", dict(env=common.environment(), rounds=EAGER_ROUNDS, reps=EAGER_REPS,
                                                ab_ops=args.ab_ops, rows=rows))
        print("wrote", path)
        return
    bw = common.copy_bandwidth()
    print(f"{common.environment()['gpu']}: copy bandwidth {bw / 1e12:.2f} TB/s")
    rows = []
    sweep_configs = [parse_config(c) for c in args.sweep.split(",") if c]
    # Pool size = B is compile-time: compile every kernel of the run up front, in parallel.
    keys = {bench_key(B, H, HV, sd, cfg, large) for H, HV in heads for B in batches
            for sd in (torch.float32, torch.bfloat16) for cfg in [None] + sweep_configs if fits(cfg, sd)
            for large in (False, True)}
    default_cache().compile(sorted(keys, key=lambda k: k.name), jobs=os.cpu_count() or 1)
    for H, HV in heads:
        for B in batches:
            for state_dtype in (torch.float32, torch.bfloat16):
                nbytes = common.decode_bytes(B, HV, V, K, state_dtype)
                n = common.rotation_count(nbytes // 2)
                sets = [make_set(B, H, HV, state_dtype) for _ in range(n)]
                impls = {"cute_gdn": cute_calls(sets)}
                for cfg in (c for c in sweep_configs if fits(c, state_dtype)):
                    impls[f"cute_gdn[{cfg.threads_per_row}:{cfg.rows_per_pass}:{cfg.rows_per_thread}"
                          f"{':smem' if cfg.smem_staging else ''}]"] = \
                        cute_calls(sets, cfg)
                if "flashinfer" in baselines:
                    impls["flashinfer"] = flashinfer_calls(sets)
                if "fla" in baselines and state_dtype == torch.float32:
                    impls["fla"] = fla_calls(sets)
                for name, calls in impls.items():
                    try:
                        us = common.time_graph(calls)
                    except Exception as e:  # a baseline that cannot run this shape is reported, not fatal
                        print(f"H={H:2d} HV={HV:2d} B={B:4d} {name}: failed: {type(e).__name__}: {e}", flush=True)
                        rows.append(dict(op="decode", impl=name, H=H, HV=HV, B=B, error=f"{type(e).__name__}: {e}"))
                        continue
                    row = dict(op="decode", impl=name, H=H, HV=HV, B=B, state=str(state_dtype).split(".")[-1],
                               us=us, bytes=nbytes, tbps=nbytes / us / 1e6, pct_bw=100 * nbytes / us / 1e6 / (bw / 1e12))
                    rows.append(row)
                    print(f"H={H:2d} HV={HV:2d} B={B:4d} {row['state']:8s} {name:34s} {us:9.2f} us "
                          f"{row['tbps']:5.2f} TB/s {row['pct_bw']:5.1f}%", flush=True)
                if B == 1:
                    # Eager, host overhead included: the public op, and the bare compiled call under it.
                    s = sets[0]
                    fn = cute_calls(sets[:1], DecodeConfig.heuristic(K, V, str(state_dtype).split(".")[-1]))[0]
                    for name, call in (("cute_gdn eager", lambda: cute_gdn.decode(**s)), ("kernel call eager", fn)):
                        us = common.time_eager(call)
                        rows.append(dict(op="decode", impl=name, H=H, HV=HV, B=B,
                                         state=str(state_dtype).split(".")[-1], us=us, bytes=nbytes))
                        print(f"H={H:2d} HV={HV:2d} B={B:4d} {'':8s} {name:34s} {us:9.2f} us")
                del sets, impls
                torch.cuda.empty_cache()
    name = "decode" if args.order == "permuted" else "decode_sequential"
    path = common.save(name, dict(env=common.environment(), copy_bandwidth=bw, order=args.order, rows=rows))
    print("wrote", path)


if __name__ == "__main__":
    main()
