"""cute-gdn-precompile on a CPU machine, then warmup() in a fresh process without compiling."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cute_gdn.precompile.cli import build_parser, resolve_shape

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--num-heads", "4", "--num-v-heads", "8", "--head-dim", "64", "--tp", "2", "--pool-size", "8", "--jobs", "2",
         "--cache-steps", "2"]
# decode: 3 gate variants x 2 tiles; verify: T = 1, 2 x 3 gate variants x 2 tiles; commit: one layer, LayerTable
KERNELS = 6 + 12 + 2


def cli(*args, cache_dir):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "cute_gdn.precompile", *args, "--cache-dir", str(cache_dir)],
                          capture_output=True, text=True, env=env, timeout=600)


def test_cli_builds_then_hits_then_warmup_loads_without_compiling(tmp_path):
    first = cli(*SMALL, cache_dir=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stderr == "", first.stderr  # no warning, from this process or its compile workers
    assert "H=2 HV=4 K=V=64 pool_size=8 cache_steps=2" in first.stdout
    assert f"0 hit, {KERNELS} compiled, 0 failed" in first.stdout
    assert first.stdout.count(" verify ") >= 12 and first.stdout.count(" commit ") >= 2
    second = cli(*SMALL, cache_dir=tmp_path)
    assert second.returncode == 0
    assert f"{KERNELS} hit, 0 compiled, 0 failed" in second.stdout
    assert " compiled " not in second.stdout.split("\n\n")[-2]  # the table: hits only
    warm = subprocess.run([sys.executable, "-c", f"""
import cutlass.cute as cute
def _forbidden(*a, **k):
    raise AssertionError("cute.compile was called")
cute.compile = _forbidden
import torch, cute_gdn
from cute_gdn import KernelNotCompiledError
k = cute_gdn.GDNKernels(2, 4, 64, 64, pool_size=8, cache_steps=2, cache_dir={str(tmp_path)!r}, device="cpu").warmup()
print("loads", k.cache.loads, "compiles", k.cache.compiles, "seconds", round(k.warmup_seconds, 2))
try:
    k.cache.get(__import__("cute_gdn.ops", fromlist=["x"]).decode_key(io_dtype="float16", state_dtype="float32",
        num_heads=2, num_v_heads=4, head_k_dim=64, head_v_dim=64, pool_size=8, gate_mode="raw",
        dt_bias_dtype="float32", use_qk_l2norm=True), allow_compile=not k.warm)
except KernelNotCompiledError:
    print("frozen")
"""], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert warm.returncode == 0, warm.stderr
    assert f"loads {KERNELS} compiles 0" in warm.stdout and "frozen" in warm.stdout


def test_cli_builds_the_prefill_kernels_where_the_head_dims_allow(tmp_path):
    """Head dim 128 (what prefill supports): 3 prefill gate variants + 6 decode kernels; head dim 64
    above builds no prefill."""
    r = cli("--num-heads", "2", "--num-v-heads", "4", "--head-dim", "128", "--pool-size", "4", "--jobs", "2",
            cache_dir=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 hit, 9 compiled, 0 failed" in r.stdout
    assert r.stdout.count(" prefill ") >= 3


def test_cli_failure_exits_nonzero(tmp_path):
    r = cli("--num-heads", "2", "--num-v-heads", "4", "--head-dim", "120", "--cache-dir", str(tmp_path),
            cache_dir=tmp_path)
    assert r.returncode != 0
    assert "head_k_dim" in r.stderr


def test_presets_and_tp():
    p = build_parser()
    assert resolve_shape(p.parse_args([]), p) == (16, 32, 128)
    assert resolve_shape(p.parse_args(["--model", "qwen3.5-27b", "--tp", "4"]), p) == (4, 12, 128)
    assert resolve_shape(p.parse_args(["--model", "qwen3.5-397b", "--tp", "8"]), p) == (2, 8, 128)


def test_bad_tp_is_a_usage_error():
    r = subprocess.run([sys.executable, "-m", "cute_gdn.precompile", "--tp", "3"], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == 2 and "--tp 3" in r.stderr


def test_help_names_the_default_config():
    assert "qwen3-next-80b --tp 1 --pool-size 512" in build_parser().format_help()


BAD_ARGS = [
    (["--cache-steps", "99"], "--cache-steps must be in 0..16, got 99"),
    (["--cache-steps", "-1"], "--cache-steps must be in 0..16, got -1"),
    (["--jobs", "-3"], "--jobs must be >= 1, got -3"),
    (["--jobs", "0"], "--jobs must be >= 1, got 0"),
    (["--pool-size", "0"], "--pool-size must be >= 1, got 0"),
    (["--tp", "3"], "--tp 3 must divide num_heads 16"),
    (["--num-heads", "3", "--num-v-heads", "4", "--head-dim", "64"], "must be a multiple of --num-heads 3"),
    (["--num-heads", "2", "--num-v-heads", "4", "--head-dim", "300"], "head_k_dim must be a multiple of 16"),
    (["--num-heads", "2", "--num-v-heads", "4"], "go together"),
    (["--model", "qwen3-next-80b", "--head-dim", "64"], "not both"),
    (["--jobs", "x"], "invalid int value: 'x'"),
    (["--state-dtype", "float16"], "invalid choice: 'float16'"),
    (["--spec-mode", "replay"], "--spec-mode replay needs --cache-steps >= 1"),
    (["--spec-mode", "replay", "--cache-steps", "4", "--ring-len", "7"],
     "--ring-len 7 with --cache-steps 4: ring_len must be in [2 * max_tokens = 8, 64], got 7"),
    (["--spec-mode", "replay", "--cache-steps", "4", "--ring-len", "65"], "got 65"),
    (["--spec-mode", "tree"], "invalid choice: 'tree'"),
    (["--replay-fold", "compact"], "--replay-fold compact needs --spec-mode replay, got --spec-mode cached"),
    (["--spec-mode", "cached", "--cache-steps", "2", "--replay-fold", "exact"],
     "--replay-fold exact needs --spec-mode replay, got --spec-mode cached"),
    (["--spec-mode", "replay", "--cache-steps", "2", "--replay-fold", "fast"], "invalid choice: 'fast'"),
]


@pytest.mark.parametrize("argv, message", BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_bad_arguments_exit_2_with_one_line_before_compiling(tmp_path, monkeypatch, capsys, argv, message):
    import cute_gdn.precompile.cli as cli_module

    def _forbidden(*a, **k):
        raise AssertionError("compile_many was called")

    monkeypatch.setattr(cli_module, "compile_many", _forbidden)
    with pytest.raises(SystemExit) as exit_info:
        cli_module.main([*argv, "--cache-dir", str(tmp_path / "cache")])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cute-gdn-precompile: error: ") and message in lines[0], err
    assert not list(tmp_path.rglob("*.o"))


@pytest.mark.parametrize("problem", ["a file", "below a file"])
def test_unusable_cache_dir_exits_2_once_up_front(tmp_path, monkeypatch, capsys, problem):
    import cute_gdn.precompile.cli as cli_module

    monkeypatch.setattr(cli_module, "compile_many", lambda *a, **k: pytest.fail("compile_many was called"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    target = blocker if problem == "a file" else blocker / "cache"
    with pytest.raises(SystemExit) as exit_info:
        cli_module.main(["--cache-dir", str(target)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cache dir {target} is not a writable directory" in err[0]


def test_help_carries_no_warning():
    """--help prints no warning (torch's "Failed to initialize NumPy" was printed by every process
    when numpy was missing; a real run is checked in the first test)."""
    r = subprocess.run([sys.executable, "-m", "cute_gdn.precompile", "--help"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "--cache-steps" in r.stdout and "Exit status" in r.stdout


def _no_compile(monkeypatch):
    """compile_many stood in: every key a hit, recorded."""
    import cute_gdn.precompile.cli as cli_module

    seen = []

    def compile_many(keys, cache_dir, jobs, on_result=None):
        results = [(key, "hit", 0.0, None) for key in keys]
        seen.extend(keys)
        for r in results:
            on_result(*r)
        return results

    monkeypatch.setattr(cli_module, "compile_many", compile_many)
    return cli_module, seen


def test_spec_mode_replay_builds_the_replay_kernel_set(tmp_path, monkeypatch, capsys):
    """--spec-mode replay: decode, replay verify for T = 1..cache_steps, the flush kernel and both cursor
    kernels (no verify/commit); the header names the ring and the memory line compares both modes."""
    from cute_gdn import serving

    cli_module, seen = _no_compile(monkeypatch)
    args = ["--num-heads", "4", "--num-v-heads", "8", "--head-dim", "64", "--tp", "2", "--pool-size", "8",
            "--cache-steps", "2", "--spec-mode", "replay", "--ring-len", "8", "--cache-dir", str(tmp_path)]
    assert cli_module.main(args) == 0
    out = capsys.readouterr().out
    want = serving.config_keys(2, 4, 64, 64, pool_size=8, cache_steps=2, spec_mode="replay", ring_len=8)
    assert seen == want
    ops = [k.op for k in seen]
    verify = [k for k in seen if k.op == "replay" and k.kwargs["num_tokens"] > 0]
    flush = [k for k in seen if k.op == "replay" and k.kwargs["num_tokens"] == 0]
    assert ops.count("decode") == 6 and 6 <= len(verify) <= 12 and 1 <= len(flush) <= 2 and ops.count("replay_cursor") == 2
    assert "verify" not in ops and "commit" not in ops
    assert "cache_steps=2 spec_mode=replay ring_len=8 replay_fold=exact state=float32" in out
    # cached: 2 fp32 states of 4 x 64 x 64 = 128 KiB; replay: replay.ring_bytes of 8 records
    from cute_gdn.replay import ring_bytes
    cached, ring = 2 * 4 * 64 * 64 * 4, ring_bytes(2, 4, 64, 64, 8)
    assert cli_module.spec_memory(2, 4, 64, 2, 8, "float32", "bfloat16") == (cached, ring)
    assert (f"speculative memory per request per layer: cached {cached / 1024:.1f} KiB (2 float32 states), "
            f"replay {ring / 1024:.1f} KiB (ring of 8 records), replay/cached = {ring / cached:.2f}") in out
    assert f"{len(want)} hit, 0 compiled, 0 failed" in out


def test_replay_fold_selects_the_replay_verify_kernels(tmp_path, monkeypatch, capsys):
    """--replay-fold compact builds the compact fold's replay verify kernels (the flush and cursor kernels are
    the exact fold's own) and says so in the header."""
    from cute_gdn import serving

    cli_module, seen = _no_compile(monkeypatch)
    args = ["--num-heads", "2", "--num-v-heads", "4", "--head-dim", "64", "--pool-size", "8", "--cache-steps", "2",
            "--spec-mode", "replay", "--ring-len", "8", "--cache-dir", str(tmp_path)]
    assert cli_module.main([*args, "--replay-fold", "compact"]) == 0
    out = capsys.readouterr().out
    assert seen == serving.config_keys(2, 4, 64, 64, pool_size=8, cache_steps=2, spec_mode="replay", ring_len=8,
                                       replay_fold="compact")
    verify = {k.kwargs["fold_mode"] for k in seen if k.op == "replay" and k.kwargs["num_tokens"] > 0}
    flush = {k.kwargs["fold_mode"] for k in seen if k.op == "replay" and k.kwargs["num_tokens"] == 0}
    assert verify == {"compact"} and flush == {"exact"}
    assert "spec_mode=replay ring_len=8 replay_fold=compact state=" in out.split("\n")[0]
    compact = list(seen)
    seen.clear()
    assert cli_module.main(args) == 0  # the default: exact
    assert "ring_len=8 replay_fold=exact state=" in capsys.readouterr().out.split("\n")[0]
    assert {k.kwargs["fold_mode"] for k in seen if k.op == "replay"} == {"exact"}
    # only replay verify differs: decode, the flush and the cursor kernels are the same
    assert [k for k in seen if k not in compact] == [k for k in seen if k.op == "replay" and k.kwargs["num_tokens"]]
    assert [k for k in compact if k not in seen] == [k for k in compact if k.op == "replay" and k.kwargs["num_tokens"]]


def test_spec_mode_defaults_to_cached(tmp_path, monkeypatch, capsys):
    cli_module, seen = _no_compile(monkeypatch)
    assert cli_module.main([*SMALL, "--cache-dir", str(tmp_path)]) == 0
    assert len(seen) == KERNELS and {k.op for k in seen} == {"decode", "verify", "commit"}
    out = capsys.readouterr().out
    assert "spec_mode=cached state=" in out and "ring_len" not in out.split("\n")[0]
    assert "replay/cached" in out  # the comparison is printed whenever cache_steps > 0
    assert cli_module.main(["--num-heads", "4", "--num-v-heads", "8", "--head-dim", "64", "--pool-size", "8",
                            "--cache-dir", str(tmp_path)]) == 0
    assert "speculative memory" not in capsys.readouterr().out
