"""Prefill ("extend") speed: cute_gdn vs FlashInfer and FLA, one run.

    python bench/bench_prefill.py                          # writes bench/results/prefill_<gpu>.json
    python bench/bench_prefill.py --timing graph           # CUDA-graph replays: prefill_graph_<gpu>.json

Shapes: tokens x sequences (equal lengths), fp32 state pool addressed by permuted slots, bf16 io,
q/k L2-norm in the kernel. Each call is timed on its own after flushing the L2 (median of 10, eager,
as the anchors are). cute_gdn takes the raw gates (a, b, A_log, dt_bias) and fuses the gating;
FlashInfer and FLA get gates precomputed outside the timed region (FlashInfer: linear alpha =
exp(g)). FlashInfer works in place on the pool through state_indices; FLA has no pool, so it reads
gathered initial states [N, HV, V, K] and writes fresh final states.
TFLOP/s use common.prefill_flops (chunk 64: K K^T, Q K^T, W, U, W S^T, Q S^T, P U, S update).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
from cute_gdn import reference  # noqa: E402
from cute_gdn.cache import KernelKey, default_cache  # noqa: E402

SHAPES = ((8192, 1), (8192, 8), (8192, 64), (32768, 1), (32768, 16))
HEADS = ((16, 32), (8, 16))
D = 128


def make_inputs(tokens, seqs, H, HV):
    q = torch.randn(1, tokens, H, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, tokens, H, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, tokens, HV, D, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(1, tokens, HV, device="cuda").to(torch.bfloat16)
    b = torch.randn(1, tokens, HV, device="cuda").to(torch.bfloat16)
    A_log = torch.rand(HV, device="cuda") - 0.5
    dt_bias = torch.randn(HV, device="cuda")
    lengths = [tokens // seqs] * seqs
    lengths[-1] += tokens - sum(lengths)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device="cuda")
    pool = torch.randn(seqs, HV, D, D, device="cuda") * 0.1
    slots = torch.randperm(seqs, device="cuda").to(torch.int32)
    has_init = torch.ones(seqs, dtype=torch.bool, device="cuda")
    g, beta = reference.compute_gates(a, b, A_log, dt_bias, dtype=torch.float32)
    return dict(q=q, k=k, v=v, a=a, b=b, A_log=A_log, dt_bias=dt_bias, cu=cu, pool=pool, slots=slots,
                has_init=has_init, g=g.contiguous(), beta=beta.contiguous(), o=torch.empty_like(v))


def prefill_key(H, HV, seqs_pool, **build):
    """The benchmarked kernel's key; `build` adds the benchmark-only profile option."""
    return KernelKey.make("prefill", io_dtype="bfloat16", state_dtype="float32", num_heads=H, num_v_heads=HV,
                          head_k_dim=D, head_v_dim=D, pool_size=seqs_pool, gate_mode="raw", dt_bias_dtype="float32",
                          use_qk_l2norm=True, **build)


def cute_call(x, H, HV):
    from cute_gdn import ops

    return lambda: ops.prefill(x["q"], x["k"], x["v"], x["a"], x["b"], A_log=x["A_log"], dt_bias=x["dt_bias"],
                               cu_seqlens=x["cu"], state=x["pool"], state_indices=x["slots"],
                               has_initial_state=x["has_init"], out=x["o"])


def flashinfer_call(x):
    import flashinfer

    q, k, v = x["q"][0], x["k"][0], x["v"][0]
    alpha = torch.exp(x["g"][0]).contiguous()
    beta = x["beta"][0].contiguous()
    out = torch.empty_like(v)
    return lambda: flashinfer.chunk_gated_delta_rule(
        q, k, v, g=alpha, beta=beta, scale=D ** -0.5, initial_state=x["pool"], output_final_state=True,
        cu_seqlens=x["cu"], use_qk_l2norm_in_kernel=True, output=out, output_state=x["pool"],
        state_indices=x["slots"])


def fla_call(x):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    init = x["pool"][x["slots"].long()].contiguous()
    cu = x["cu"].long()
    cu_cpu = cu.cpu()
    return lambda: chunk_gated_delta_rule(
        x["q"], x["k"], x["v"], g=x["g"], beta=x["beta"], scale=D ** -0.5, initial_state=init,
        output_final_state=True, use_qk_l2norm_in_kernel=True, state_v_first=True, cu_seqlens=cu,
        cu_seqlens_cpu=cu_cpu)


def _median_cold(run, reps: int) -> float:
    """Median microseconds of `run()`, each time after the L2 is flushed (outside the timed region)."""
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def time_cold(fn, reps: int = 10) -> float:
    """Median microseconds of single calls, each after the L2 is flushed."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    return _median_cold(fn, reps)


def time_cold_graph(fn, reps: int = 10) -> float:
    """Median microseconds of single CUDA-graph replays of one call, each after the L2 is flushed
    (outside the timed region): the call's GPU time without its host overhead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # first-call compiles / autotune outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    us = _median_cold(graph.replay, reps)
    del graph
    return us


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--timing", choices=("eager", "graph"), default="eager",
                    help="eager calls (host overhead included, as the anchors) or CUDA-graph replays; "
                         "graph results go to prefill_graph_<gpu>.json")
    ap.add_argument("--baselines", default="flashinfer,fla")
    ap.add_argument("--heads", default="16/32,8/16")
    ap.add_argument("--shapes", default=",".join(f"{t}x{n}" for t, n in SHAPES))
    args = ap.parse_args()
    baselines = [b for b in args.baselines.split(",") if b]
    heads = [tuple(int(x) for x in hh.split("/")) for hh in args.heads.split(",")]
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    default_cache().compile(sorted({prefill_key(H, HV, n) for H, HV in heads for _, n in shapes},
                                   key=lambda k: k.name), jobs=16)
    print(common.environment()["gpu"])
    rows = []
    for H, HV in heads:
        for tokens, seqs in shapes:
            x = make_inputs(tokens, seqs, H, HV)
            flops = common.prefill_flops(tokens, seqs, HV, D, D)
            impls = {"cute_gdn": lambda x=x, H=H, HV=HV: cute_call(x, H, HV)}
            if "flashinfer" in baselines:
                impls["flashinfer"] = lambda x=x: flashinfer_call(x)
            if "fla" in baselines:
                impls["fla"] = lambda x=x: fla_call(x)
            for name, make in impls.items():
                try:
                    us = (time_cold_graph if args.timing == "graph" else time_cold)(make())
                except Exception as e:  # reported, not fatal
                    rows.append(dict(op="prefill", impl=name, H=H, HV=HV, tokens=tokens, seqs=seqs,
                                     error=f"{type(e).__name__}: {e}"))
                    print(f"H={H} HV={HV} {tokens}x{seqs} {name}: failed: {type(e).__name__}: {e}", flush=True)
                    continue
                row = dict(op="prefill", impl=name, H=H, HV=HV, tokens=tokens, seqs=seqs, us=us, flops=flops,
                           tflops=flops / us / 1e6)
                rows.append(row)
                print(f"H={H:2d} HV={HV:2d} {tokens:6d}x{seqs:<3d} {name:12s} {us:9.1f} us {row['tflops']:6.1f} TFLOP/s",
                      flush=True)
            del x, impls
            torch.cuda.empty_cache()
    path = common.save("prefill" if args.timing == "eager" else "prefill_graph",
                       dict(env=common.environment(), timing=args.timing, rows=rows))
    print("wrote", path)


if __name__ == "__main__":
    main()
