"""Shared benchmark machinery: bytes/FLOP models, cold-L2 CUDA-graph timing, copy bandwidth, output.

Serving runs each layer on its own state pool, so a decode/verify call never finds its state in L2.
The timer reproduces that: it captures one CUDA graph that calls the op on `n` different input sets
(pools included) whose total size is several times the L2, replays it, and divides by `n`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def state_bytes(B: int, HV: int, V: int, K: int, dtype: torch.dtype) -> int:
    return B * HV * V * K * torch.empty((), dtype=dtype).element_size()


def decode_bytes(B, HV, V, K, dtype) -> int:
    """The traffic decode cannot avoid: read and write every named state once."""
    return 2 * state_bytes(B, HV, V, K, dtype)


def copy_bandwidth(gib: float = 1.0, reps: int = 10) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    n = int(gib * 2**30) // 4
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 4 / statistics.median(times[2:])


def rotation_count(bytes_per_set: int, cap: int = 256) -> int:
    """Input sets to rotate through so the graph touches at least 3x the L2 between reuses."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(2, min(cap, math.ceil(3 * l2 / max(1, bytes_per_set))))


def time_graph(calls: Sequence[Callable[[], object]], replays: int = 20) -> float:
    """Median microseconds per call of `calls` (one per input set) captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls[:2]:  # warm: first-call compiles / autotune outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    for _ in range(5):  # untimed replays: clocks and TLBs settle before the first timed one
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    del graph
    return statistics.median(times)


def time_eager(fn: Callable[[], object], reps: int = 100, rounds: int = 7) -> float:
    """Median over rounds of the mean microseconds of back-to-back eager calls (host overhead
    included); the median of rounds keeps one hiccup of the host from deciding the number."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    results = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        results.append(start.elapsed_time(end) * 1e3 / reps)
    return statistics.median(results)


def eager_round(fn: Callable[[], object], reps: int = 200) -> tuple[float, float]:
    """One round of `reps` back-to-back eager calls started after a sync: the mean microseconds per call
    by CUDA events around them and by the wall clock up to the sync after the last one. At B = 1 the
    host is the bottleneck, so both are the host-inclusive cost of a call (the wall clock also counts
    the last call's kernel, 1/reps of it). Callers interleave rounds of the implementations they compare
    and take medians, so that a slow stretch of the host lands on all of them."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    wall = time.perf_counter() - t0
    return start.elapsed_time(end) * 1e3 / reps, wall * 1e6 / reps


def environment() -> dict:
    props = torch.cuda.get_device_properties(0)
    env = {"gpu": props.name, "sms": props.multi_processor_count, "l2_bytes": props.L2_cache_size,
           "torch": torch.__version__, "python": platform.python_version()}
    for dist in ("nvidia-cutlass-dsl", "fla-core", "flashinfer-python", "triton"):
        try:
            from importlib import metadata

            env[dist] = metadata.version(dist)
        except Exception:
            env[dist] = None
    return env


def gpu_tag() -> str:
    return torch.cuda.get_device_properties(0).name.replace("NVIDIA ", "").replace(" ", "_")


def save(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    out_dir = Path(out_dir or os.environ.get("BENCH_OUT") or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}_{gpu_tag()}.json"
    path.write_text(json.dumps(payload, indent=1))
    return path


def prefill_flops(tokens: int, seqs: int, HV: int, K: int, V: int, chunk: int = 64) -> int:
    """FLOP of chunked prefill (chunk C): per chunk and value head, K K^T, Q K^T and W = M (beta
    e^G k) at 2 C^2 K each, U = M (beta v) and P U at 2 C^2 V, W S^T, Q S^T and the state update
    at 2 C K V each. About 180 kFLOP per token and head at C = 64, K = V = 128 (ANCHORS.md)."""
    per_chunk = 2 * chunk * chunk * (3 * K + 2 * V) + 3 * 2 * chunk * K * V
    chunks = sum(-(-length // chunk) for length in _split(tokens, seqs))
    return chunks * HV * per_chunk


def _split(tokens: int, seqs: int) -> list[int]:
    lengths = [tokens // seqs] * seqs
    lengths[-1] += tokens - sum(lengths)
    return lengths
