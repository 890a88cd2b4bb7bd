"""Warmup cost of a whole serving config: precompile with the CLI, then time a fresh process that
imports cute_gdn and runs GDNKernels.warmup() (loads only), split into its parts.

    python bench/bench_warmup.py [--model qwen3-next-80b --tp 1 --pool-size 512 --cache-steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import tvm_ffi, cutlass.cute
t2 = time.perf_counter()
import cute_gdn
from cute_gdn.precompile.presets import MODELS
t3 = time.perf_counter()
cfg = json.loads(sys.argv[1])
p = MODELS[cfg["model"]]
k = cute_gdn.GDNKernels(p.num_heads // cfg["tp"], p.num_v_heads // cfg["tp"], p.head_dim, p.head_dim,
                        pool_size=cfg["pool_size"], cache_steps=cfg["cache_steps"], cache_dir=cfg["cache_dir"])
k.warmup()
t4 = time.perf_counter()
print(json.dumps(dict(import_torch=t1 - t0, import_tvm_ffi_cutlass=t2 - t1, import_cute_gdn=t3 - t2,
                      warmup=t4 - t3, kernels=len(k.keys), loads=k.cache.loads, compiles=k.cache.compiles)))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-next-80b")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pool-size", type=int, default=512)
    ap.add_argument("--cache-steps", type=int, default=0)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    with tempfile.TemporaryDirectory() as cache_dir:
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "cute_gdn.precompile", "--model", args.model, "--tp", str(args.tp),
                            "--pool-size", str(args.pool_size), "--cache-steps", str(args.cache_steps),
                            "--cache-dir", cache_dir], env=env,
                           capture_output=True, text=True)
        precompile = time.perf_counter() - t
        assert r.returncode == 0, r.stdout + r.stderr
        cfg = dict(model=args.model, tp=args.tp, pool_size=args.pool_size, cache_steps=args.cache_steps,
                   cache_dir=cache_dir)
        t = time.perf_counter()
        child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], env=env, capture_output=True,
                               text=True)
        total = time.perf_counter() - t
        assert child.returncode == 0, child.stderr
        parts = json.loads(child.stdout.strip().splitlines()[-1])
    print(json.dumps(dict(config=cfg | {"cache_dir": None}, precompile_seconds=precompile,
                          fresh_process_seconds=total, **parts), indent=1))


if __name__ == "__main__":
    main()
