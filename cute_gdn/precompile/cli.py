"""cute-gdn-precompile: compile a serving config's whole kernel set into the disk cache.

Runs with or without a GPU (kernels target sm_90a; compiles run in parallel worker processes). A
second run of the same config reports only hits. Every argument, the whole kernel set and the cache dir
are checked before anything compiles. Exit status 0 on success, 1 if any kernel failed to compile, 2 on
bad arguments (one line on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from ..cache import check_cache_dir, compile_many, default_cache_dir, fingerprint
from ..ops import can_implement_key
from ..replay import DEFAULT_RING_LEN, FOLD_MODES, check_ring_config, ring_bytes
from ..serving import MAX_CACHE_STEPS, SPEC_MODES, config_keys
from .presets import DEFAULT_MODEL, DEFAULT_POOL_SIZE, MODELS


class _Parser(argparse.ArgumentParser):
    """Bad arguments exit 2 with one line, `cute-gdn-precompile: error: ...`, not argparse's usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="cute-gdn-precompile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"With no arguments: --model {DEFAULT_MODEL} --tp 1 --pool-size {DEFAULT_POOL_SIZE} "
               f"--state-dtype float32 --io-dtype bfloat16. Models: {', '.join(MODELS)}.")
    p.add_argument("--model", choices=sorted(MODELS), help=f"model preset (default {DEFAULT_MODEL} "
                   "unless --num-heads/--num-v-heads/--head-dim are given)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree: heads are divided by it")
    p.add_argument("--num-heads", type=int, help="q/k heads of the whole model (instead of --model)")
    p.add_argument("--num-v-heads", type=int, help="v heads of the whole model")
    p.add_argument("--head-dim", type=int, help="K = V head dim")
    p.add_argument("--pool-size", type=int, default=DEFAULT_POOL_SIZE,
                   help="state pool slots, as the engine allocates them (compile-time)")
    p.add_argument("--cache-steps", type=int, default=0,
                   help=f"MTP verify steps = the engine's draft tokens per sequence, 0..{MAX_CACHE_STEPS} "
                        "(compile-time); > 0 also builds verify for T = 1..N and commit (default 0: no verify)")
    p.add_argument("--spec-mode", choices=SPEC_MODES, default="cached",
                   help="speculative protocol: cached (verify + commit, a cache of cache_steps states per request) "
                        "or replay (replay verify + cursor commit, a ring of --ring-len records per request); "
                        "default cached")
    p.add_argument("--ring-len", type=int, default=DEFAULT_RING_LEN,
                   help=f"replay ring records per request, 2 * cache_steps .. 64 (compile-time; default "
                        f"{DEFAULT_RING_LEN}; replay only)")
    p.add_argument("--replay-fold", choices=FOLD_MODES, default=None,
                   help="how replay verify folds a full ring: exact (bit-identical to verify + commit) or compact "
                        "(the records' rank-one terms: the same state, other rounding, faster); builds that fold's "
                        "verify kernels (the flush kernel is always exact); default exact; replay only")
    p.add_argument("--state-dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--io-dtype", choices=("bfloat16", "float16"), default="bfloat16")
    p.add_argument("--no-qk-l2norm", action="store_true", help="the model does not L2-normalize q and k")
    p.add_argument("--cache-dir", default=None,
                   help="default: $CUTE_GDN_CACHE_DIR or ~/.cache/cute_gdn")
    p.add_argument("--jobs", type=int, default=None,
                   help="parallel compile processes, >= 1 (default: CPU count, at most one per kernel)")
    return p


def resolve_shape(args, parser) -> tuple[int, int, int]:
    explicit = [args.num_heads, args.num_v_heads, args.head_dim]
    if any(x is not None for x in explicit):
        if args.model is not None:
            parser.error("give either --model or --num-heads/--num-v-heads/--head-dim, not both")
        if any(x is None for x in explicit):
            parser.error("--num-heads, --num-v-heads and --head-dim go together")
        for flag, value in zip(("--num-heads", "--num-v-heads", "--head-dim"), explicit):
            if value < 1:
                parser.error(f"{flag} must be >= 1, got {value}")
        heads, v_heads, dim = explicit
    else:
        preset = MODELS[args.model or DEFAULT_MODEL]
        heads, v_heads, dim = preset.num_heads, preset.num_v_heads, preset.head_dim
    if args.tp < 1 or heads % args.tp or v_heads % args.tp:
        parser.error(f"--tp {args.tp} must divide num_heads {heads} and num_v_heads {v_heads}")
    if v_heads % heads:
        parser.error(f"--num-v-heads {v_heads} must be a multiple of --num-heads {heads}")
    return heads // args.tp, v_heads // args.tp, dim


def check_args(args, parser) -> tuple[int, int, int, list, str, int]:
    """Every check before anything compiles: (heads, v_heads, dim, keys, cache dir, jobs), or exit 2."""
    heads, v_heads, dim = resolve_shape(args, parser)
    if args.pool_size < 1:
        parser.error(f"--pool-size must be >= 1, got {args.pool_size}")
    if not 0 <= args.cache_steps <= MAX_CACHE_STEPS:
        parser.error(f"--cache-steps must be in 0..{MAX_CACHE_STEPS}, got {args.cache_steps}")
    if args.replay_fold is not None and args.spec_mode != "replay":
        parser.error(f"--replay-fold {args.replay_fold} needs --spec-mode replay, got --spec-mode {args.spec_mode}")
    args.replay_fold = args.replay_fold or "exact"
    if args.spec_mode == "replay":
        if args.cache_steps < 1:
            parser.error(f"--spec-mode replay needs --cache-steps >= 1 (the draft tokens), got {args.cache_steps}")
        reason = check_ring_config(args.ring_len, args.cache_steps)
        if reason is not None:
            parser.error(f"--ring-len {args.ring_len} with --cache-steps {args.cache_steps}: {reason}")
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    try:
        keys = config_keys(heads, v_heads, dim, dim, pool_size=args.pool_size, cache_steps=args.cache_steps,
                           state_dtype=args.state_dtype, io_dtype=args.io_dtype,
                           use_qk_l2norm=not args.no_qk_l2norm, spec_mode=args.spec_mode, ring_len=args.ring_len,
                           replay_fold=args.replay_fold)
        for key in keys:
            can_implement_key(key)
    except ValueError as e:
        parser.error(str(e))
    cache_dir = args.cache_dir or str(default_cache_dir())
    try:
        check_cache_dir(cache_dir)
    except ValueError as e:
        parser.error(f"--cache-dir: {e}")
    jobs = args.jobs or min(len(keys), os.cpu_count() or 1)
    return heads, v_heads, dim, keys, cache_dir, jobs


def spec_memory(heads: int, v_heads: int, dim: int, cache_steps: int, ring_len: int, state_dtype: str,
                io_dtype: str) -> tuple[int, int]:
    """Speculative memory per request (pool slot) per layer, in bytes: (cached, replay). cached is the verify
    cache's cache_steps states in the state dtype, replay the ring of ring_len records (replay.ring_bytes;
    the 8-byte cursor per slot is shared by the layers)."""
    state = torch.empty((), dtype=getattr(torch, state_dtype)).element_size()
    cached = cache_steps * v_heads * dim * dim * state
    return cached, ring_bytes(heads, v_heads, dim, dim, ring_len, getattr(torch, io_dtype))


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    heads, v_heads, dim, keys, cache_dir, jobs = check_args(args, parser)
    print(f"cute-gdn-precompile: H={heads} HV={v_heads} K=V={dim} pool_size={args.pool_size} "
          f"cache_steps={args.cache_steps} spec_mode={args.spec_mode}"
          + (f" ring_len={args.ring_len} replay_fold={args.replay_fold}" if args.spec_mode == "replay" else "") +
          f" state={args.state_dtype} io={args.io_dtype} qk_l2norm={not args.no_qk_l2norm} (per rank, tp={args.tp})")
    if args.cache_steps > 0:
        cached, ring = spec_memory(heads, v_heads, dim, args.cache_steps, args.ring_len, args.state_dtype,
                                   args.io_dtype)
        print(f"speculative memory per request per layer: cached {_kib(cached)} ({args.cache_steps} "
              f"{args.state_dtype} states), replay {_kib(ring)} (ring of {args.ring_len} records), "
              f"replay/cached = {ring / cached:.2f}")
    print(f"cache: {cache_dir}/{fingerprint()}  ({len(keys)} kernels, {jobs} processes)")
    t0 = time.perf_counter()
    done = [0]

    def progress(key, status, seconds, err):
        done[0] += 1
        print(f"[{done[0]}/{len(keys)}] {key.op:8s} {status:8s} {seconds:6.1f}s  {key.describe()}"
              + (f"\n    {err}" if err else ""), flush=True)

    results = compile_many(keys, cache_dir, jobs, on_result=progress)
    rows = [(key.op, key.describe(), status, f"{seconds:.1f}") for key, status, seconds, _ in results]
    header = ("kernel", "key", "result", "seconds")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(4)]
    print()
    for row in [header, tuple("-" * w for w in widths)] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    failed = sum(status == "failed" for _, status, _, _ in results)
    counts = {s: sum(r[1] == s for r in results) for s in ("hit", "compiled", "failed")}
    print(f"\n{counts['hit']} hit, {counts['compiled']} compiled, {counts['failed']} failed "
          f"in {time.perf_counter() - t0:.1f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
