"""Dump the PTX of every prefill, decode, verify, commit and replay variant, to check that a refactor leaves the
generated code byte-identical (no GPU needed; CUTE_DSL_ARCH=sm_90a).

    python bench/ptx_snapshot.py DIR [--jobs N] [--ops prefill,decode,...]   # write DIR/<key name>.ptx
    python bench/ptx_snapshot.py --compare BEFORE AFTER                     # exit 1 on any difference

Every key compiles in a fresh interpreter with CUTE_DSL_KEEP=ptx into a scratch dump dir. The one thing
normalized is the kernels' symbol names: the DSL mangles the defining module and class into them
(`kernel_cutlass_kernel_cute_gdnkernelsprefill...`), so moving a class to another module renames its
kernels and nothing else; they are replaced by KERNEL0, KERNEL1, ... in order of first appearance.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")

VARIANTS = list(itertools.product(
    ("float32", "bfloat16"), ("bfloat16", "float16"),
    (("raw", "float32"), ("raw", "bfloat16"), ("precomputed", None)), (True, False)))
SHAPES = [(2, 8, 64, 32, "float32"), (3, 3, 96, 48, "bfloat16"), (1, 2, 256, 256, "float32"),
          (2, 2, 16, 16, "bfloat16")]
SYMBOL = re.compile(r"kernel_cutlass_[A-Za-z0-9_]+")


def keys(ops: set) -> list:
    from cute_gdn import ops as O
    from cute_gdn import replay as R

    out = []
    qwen = dict(num_heads=16, num_v_heads=32, head_k_dim=128, head_v_dim=128, pool_size=64)
    for state, io, (gm, bias), l2 in VARIANTS:
        v = dict(io_dtype=io, state_dtype=state, gate_mode=gm, dt_bias_dtype=bias, use_qk_l2norm=l2, **qwen)
        if "prefill" in ops:
            out.append(O.prefill_key(**v))
        if "decode" in ops:
            out += O.decode_keys(**v)
        if "verify" in ops:
            out += O.verify_keys(num_tokens=4, cache_steps=4, **v)
        if "replay" in ops:
            for fold in ("exact", "compact"):
                out += R.replay_verify_keys(num_tokens=4, max_tokens=4, ring_len=16, fold_mode=fold, **v)
    base = dict(io_dtype="bfloat16", gate_mode="raw", dt_bias_dtype="float32", use_qk_l2norm=True)
    for H, HV, K, V, state in SHAPES:
        shape = dict(num_heads=H, num_v_heads=HV, head_k_dim=K, head_v_dim=V, pool_size=5, state_dtype=state)
        if "decode" in ops:
            out += O.decode_keys(**base, **shape)
        if "verify" in ops:
            out += O.verify_keys(num_tokens=3, cache_steps=3, **base, **shape)
        if "replay" in ops and K < 256:
            out += R.replay_verify_keys(num_tokens=4, max_tokens=4, ring_len=16, **base, **shape)
    if "prefill" in ops:
        for H, HV in ((4, 4), (3, 9)):
            out.append(O.prefill_key(**{**base, **qwen, "num_heads": H, "num_v_heads": HV, "state_dtype": "float32"}))
    if "verify" in ops:
        for T, steps in ((1, 1), (2, 2), (3, 8), (8, 8), (16, 16)):
            out += O.verify_keys(num_tokens=T, cache_steps=steps, state_dtype="bfloat16", **base,
                                 **{**qwen, "pool_size": 9})
    if "commit" in ops:
        for state, layers in itertools.product(("float32", "bfloat16"), ("tensor", "table")):
            for HV, K, V in ((32, 128, 128), (3, 16, 16), (2, 256, 256)):
                out.append(O.commit_key(state_dtype=state, num_v_heads=HV, head_k_dim=K, head_v_dim=V, pool_size=7,
                                        cache_steps=4, layers=layers))
    if "replay" in ops:
        p = dict(io_dtype="bfloat16", num_heads=16, num_v_heads=32, head_k_dim=128, head_v_dim=128, pool_size=64)
        for state in ("float32", "bfloat16"):
            out += R.replay_flush_keys(state_dtype=state, max_tokens=4, ring_len=16, use_qk_l2norm=True, **p)
            for T, mt, L in ((1, 8, 16), (8, 8, 16), (3, 4, 64)):
                out += R.replay_verify_keys(state_dtype=state, num_tokens=T, max_tokens=mt, ring_len=L,
                                            gate_mode="raw", dt_bias_dtype="float32", use_qk_l2norm=True,
                                            fold_mode="compact", **p)
        out += [R.replay_cursor_key(pool_size=33, ring_len=16, max_tokens=4, mode=m) for m in ("commit", "flush")]
    return list(dict.fromkeys(out))


_CHILD = """
import pickle, sys
from cute_gdn.cache import _compile_fn
key = pickle.loads(bytes.fromhex(sys.argv[1]))
_compile_fn(key.op)(**key.kwargs)
"""


def normalize(ptx: str) -> str:
    names: dict = {}
    return SYMBOL.sub(lambda m: names.setdefault(m.group(0), f"KERNEL{len(names)}"), ptx)


def dump(key, out: Path) -> str:
    import pickle

    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "CUTE_DSL_ARCH": "sm_90a", "CUTE_DSL_KEEP": "ptx", "CUTE_DSL_DUMP_DIR": tmp,
               "PYTHONPATH": str(ROOT)}
        r = subprocess.run([sys.executable, "-c", _CHILD, pickle.dumps(key).hex()], env=env, capture_output=True,
                           text=True, timeout=1800)
        if r.returncode != 0:
            return f"FAILED {key.name}: {r.stderr.strip().splitlines()[-1:]}"
        texts = [normalize(p.read_text()) for p in sorted(Path(tmp).rglob("*.ptx"))]
        (out / f"{key.name}.ptx").write_text("\n// ----\n".join(sorted(texts)))
    return f"{key.name} {key.describe()}"


def compare(before: Path, after: Path) -> int:
    a = {p.name for p in before.glob("*.ptx")}
    b = {p.name for p in after.glob("*.ptx")}
    bad = sorted(a ^ b)
    for name in sorted(a & b):
        if (before / name).read_bytes() != (after / name).read_bytes():
            bad.append(name)
    manifest = json.loads((after / "manifest.json").read_text()) if (after / "manifest.json").exists() else {}
    for name in bad:
        print("DIFFERS", name, manifest.get(name[:-4], ""))
    print(f"{len(a & b) - len([n for n in bad if n in a & b])} identical of {len(a | b)}")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", nargs="?")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--ops", default="prefill,decode,verify,commit,replay")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = ap.parse_args()
    if args.compare:
        return compare(Path(args.compare[0]), Path(args.compare[1]))
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    ks = keys(set(args.ops.split(",")))
    (out / "manifest.json").write_text(json.dumps({k.name: k.describe() for k in ks}, indent=1))
    failed = 0
    with ThreadPoolExecutor(args.jobs) as pool:
        for i, line in enumerate(pool.map(lambda k: dump(k, out), ks)):
            failed += line.startswith("FAILED")
            print(f"[{i + 1}/{len(ks)}] {line}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
