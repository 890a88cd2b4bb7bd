"""The host side of bench/bench_spec.py on the CPU: the cursor-rule simulation behind fold_rate, the byte and
memory models, the argument parsing, and bench/plot.py's spec table and PNG from a synthetic JSON."""

import importlib.util
import json
import random
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name, rel):
    spec = importlib.util.spec_from_file_location(name, ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _load("bench_spec", "bench/bench_spec.py")


@pytest.fixture(scope="module")
def plot():
    return _load("bench_plot_spec", "bench/plot.py")


# --- cursor rule ---------------------------------------------------------------------------------------


def test_verify_fold_rule_by_hand(bench):
    # L = 16, T = 4: a row folds at the verify where its count exceeds 8. Accepting 4 every step, the counts
    # before each verify are 0, 4, 8, 12 (fold, restart at 4), 8, 12 (fold), ...: folds at steps 4, 7, ..., 19.
    sim = bench.simulate_cursors([], [[4]], 16, 4, "verify", cycles=20)
    assert sim["fold_rate"] == pytest.approx(6 / 20)
    assert sim["mean_fold"] == pytest.approx(6 * 12 / 20)  # every fold replays 12 records
    assert sim["mean_keep"] == pytest.approx((0 + 4 + 8 + 5 * (4 + 8) + 4) / 20)


def test_verify_fold_threshold_zero(bench):
    # T = 8 on a 16-record ring: the threshold is 0, so every verify after the first folds.
    sim = bench.simulate_cursors([], [[1]], 16, 8, "verify", cycles=20)
    assert sim["fold_rate"] == pytest.approx(19 / 20)
    assert sim["mean_keep"] == 0
    assert sim["mean_fold"] == pytest.approx(19 / 20)


def test_commit_fold_modes(bench):
    # SGLang's backend folds at the commit once the count after it exceeds L - 2T: counts 4, 8, 12 (fold -> 0).
    sim = bench.simulate_cursors([], [[4]], 16, 4, "commit", cycles=21)
    assert sim["fold_rate"] == pytest.approx(7 / 21)
    assert sim["mean_keep"] == pytest.approx((0 + 4 + 8) / 3)
    assert sim["mean_fold"] == pytest.approx(12 / 3)
    every = bench.simulate_cursors([], [[3], [1]], 16, 4, "commit_every", cycles=5)
    assert every == {"fold_rate": 1.0, "mean_keep": 0.0, "mean_fold": pytest.approx(2.0)}
    with pytest.raises(ValueError, match="fold mode"):
        bench.simulate_cursors([], [[1]], 16, 4, "sometimes")


def test_warm_steps_set_the_start_but_are_not_counted(bench):
    # Warmed to a count of 12 (> 8), the first counted verify folds; without warm-up it does not.
    warm = bench.simulate_cursors([[4], [4], [4]], [[4]], 16, 4, "verify", cycles=1)
    cold = bench.simulate_cursors([], [[4]], 16, 4, "verify", cycles=1)
    assert warm["fold_rate"] == 1.0 and cold["fold_rate"] == 0.0


def test_rows_are_independent_and_rate_is_steady(bench):
    rng = random.Random(3)
    pattern = bench.accept_pattern(16, 5, 4, rng)
    assert all(1 <= n <= 4 for step in pattern for n in step) and len(pattern) == 16 and len(pattern[0]) == 5
    together = bench.simulate_cursors([], pattern, 16, 4, "verify")
    alone = [bench.simulate_cursors([], [[step[r]] for step in pattern], 16, 4, "verify") for r in range(5)]
    for key in ("fold_rate", "mean_keep", "mean_fold"):
        assert together[key] == pytest.approx(sum(a[key] for a in alone) / 5)
    # Uniform 1..4 accepts (mean 2.5) on a threshold of 8: a fold every 3-5 steps.
    assert 0.15 < together["fold_rate"] < 0.4


@pytest.mark.parametrize("T", [2, 4, 8])
def test_guard_pattern_makes_even_rows_fold(bench, T):
    pattern = bench.guard_pattern(6, T, 16, random.Random(0))
    for r in range(0, 6, 2):
        assert bench.simulate_cursors([], [[step[r]] for step in pattern], 16, T, "verify", cycles=1)["fold_rate"] > 0


def test_fold_modes(bench):
    assert bench.fold_mode("cute_gdn_replay", "bfloat16") == "verify"
    assert bench.fold_mode("sglang_replayssm", "float32") == "verify"
    assert bench.fold_mode("sglang_replayssm_backend", "float32") == "commit"
    assert bench.fold_mode("sglang_replayssm_backend", "bfloat16") == "commit_every"
    assert bench.fold_mode("cute_gdn_cached", "float32") is None


# --- byte and memory models ----------------------------------------------------------------------------

H, HV, K = 16, 32, 128
S32 = HV * K * K * 4


def test_cached_bytes(bench):
    tokens = 4 * (2 * H * K + 2 * HV * K + 2 * HV) * 2
    for impl in ("cute_gdn_cached", "sglang_cached", "flashinfer_mtp"):
        got = bench.step_bytes(impl, 4, H, HV, "float32", 16, None)
        assert got == {"state": 7 * S32, "ring": 0, "tokens": tokens, "total": 7 * S32 + tokens}
    assert bench.step_bytes("cute_gdn_cached", 2, H, HV, "bfloat16", 16, None)["state"] == 5 * S32 // 2


def test_replay_bytes(bench):
    rec = {"k": H * K * 2, "v": HV * K * 2, "d": HV * K * 4, "gb": HV * 16}
    assert bench.ours_record(H, HV, K, K) == rec
    quiet = dict(fold_rate=0.0, mean_keep=0.0, mean_fold=0.0)
    got = bench.step_bytes("cute_gdn_replay", 4, H, HV, "float32", 16, quiet)
    assert got["state"] == S32 and got["ring"] == 4 * sum(rec.values())
    sim = dict(fold_rate=0.25, mean_keep=6.0, mean_fold=3.0)
    got = bench.step_bytes("cute_gdn_replay", 4, H, HV, "float32", 16, sim)
    assert got["state"] == pytest.approx(1.25 * S32)
    assert got["ring"] == pytest.approx(6 * (rec["k"] + rec["d"] + rec["gb"]) + 3 * (rec["k"] + rec["v"] + rec["gb"])
                                        + 4 * sum(rec.values()))
    assert got["total"] == pytest.approx(got["state"] + got["ring"] + got["tokens"])
    # The replay step moves a fraction of the cached step's bytes at this shape.
    assert got["total"] < 0.3 * bench.step_bytes("cute_gdn_cached", 4, H, HV, "float32", 16, None)["total"]


def test_sglang_bytes(bench):
    sim = dict(fold_rate=0.5, mean_keep=4.0, mean_fold=2.0)
    ex = bench.sglang_record(H, HV, K, K, "exact", 2)
    assert ex == {"d": HV * K * 2, "k": H * K * 2, "g": HV * 4, "rawv": HV * K * 2, "rawk": H * K * 2, "beta": HV * 4}
    assert bench.sglang_record(H, HV, K, K, "exact", 4)["d"] == HV * K * 4
    got = bench.step_bytes("sglang_replayssm", 4, H, HV, "float32", 16, sim)
    assert got["state"] == pytest.approx(2 * S32)  # a fold row reads its checkpoint twice and writes it once
    assert got["ring"] == pytest.approx(4 * (ex["d"] + ex["k"] + ex["g"]) +
                                        2 * (ex["rawk"] + ex["rawv"] + ex["g"] + ex["beta"]) + 4 * sum(ex.values()))
    co = bench.sglang_record(H, HV, K, K, "compact")
    got = bench.step_bytes("sglang_replayssm_backend", 4, H, HV, "float32", 16, sim)
    assert got["state"] == pytest.approx(2 * S32)
    assert got["ring"] == pytest.approx(4 * (co["d"] + co["k"] + co["g"]) + 4 * sum(co.values())
                                        + 0.5 * 16 * sum(co.values()))
    with pytest.raises(ValueError):
        bench.sglang_record(H, HV, K, K, "other")


def test_memory_per_request(bench):
    L = 16
    assert bench.mem_per_request("cute_gdn_cached", 4, H, HV, "float32", L) == 4 * S32
    ours = bench.mem_per_request("cute_gdn_replay", 4, H, HV, "float32", L)
    assert ours == L * (H * K * 2 + HV * (K * 2 + K * 4 + 16))
    assert bench.mem_per_request("sglang_replayssm_backend", 4, H, HV, "bfloat16", L) == \
        L * (2 * HV * K * 2 + 2 * H * K * 2 + HV * 4)
    try:
        from cute_gdn.replay import ring_bytes
    except ImportError:  # the replay kernel module is not on this tree yet
        return
    assert bench.mem_per_request("cute_gdn_replay", 4, H, HV, "float32", L) == ring_bytes(H, HV, K, K, L)


def test_shape_rows(bench):
    sims = {"verify": dict(fold_rate=0.2, mean_keep=5.0, mean_fold=2.0),
            "commit": dict(fold_rate=0.3, mean_keep=6.0, mean_fold=8.0)}
    bw = 4e12
    rows = bench.shape_rows(4, H, HV, 64, "float32", 16, ["cute_gdn_replay", "cute_gdn_cached",
                                                          "sglang_replayssm_backend"], sims, bw)
    ours = rows["cute_gdn_replay"]
    assert ours["bytes"] == pytest.approx(64 * bench.step_bytes("cute_gdn_replay", 4, H, HV, "float32", 16,
                                                                sims["verify"])["total"])
    assert ours["model_us"] == pytest.approx(ours["bytes"] / bw * 1e6)
    assert ours["fold_rate"] == 0.2 and rows["sglang_replayssm_backend"]["fold_rate"] == 0.3
    assert rows["cute_gdn_cached"]["fold_rate"] == 0.0 and rows["cute_gdn_cached"]["mem_per_request"] == 4 * S32
    assert ours["bytes"] == pytest.approx(ours["bytes_state"] + ours["bytes_ring"] + ours["bytes_tokens"])


def test_parse_args(bench):
    args = bench.parse_args(["--quick"])
    assert args.batch_list == [64, 256] and args.head_list == [(16, 32)] and args.token_list == [4]
    assert args.impl_list == list(bench.IMPLS) and args.state_list == ["float32", "bfloat16"]
    args = bench.parse_args(["--impls", "cute_gdn_replay,sglang_replayssm", "--tokens", "2,8", "--ring-len", "32"])
    assert args.impl_list == ["cute_gdn_replay", "sglang_replayssm"] and args.token_list == [2, 8]
    with pytest.raises(SystemExit):
        bench.parse_args(["--impls", "nope"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--tokens", "8", "--ring-len", "8"])  # the ring must hold two steps of drafts


def test_compile_keys(bench):
    pytest.importorskip("cute_gdn.kernels.replay")
    keys = bench.compile_keys([4, 64], [4], [(16, 32)], ["float32", "bfloat16"], 16, list(bench.IMPLS))
    names = [str(k) for k in keys]
    assert len(keys) == len(set(keys))
    # per (B, state): 2 replay verify tiles per fold mode, 2 verify tiles, 1 commit; per B: 1 cursor kernel
    assert sum("replay_cursor" in n for n in names) == 2
    compact = sum("'fold_mode', 'compact'" in n for n in names)
    assert 2 * 2 <= compact <= 2 * 2 * 2  # per (B, state): one or two tiles
    assert len(keys) <= 2 * 2 * (2 * 2 + 2 + 1) + 2
    without = bench.compile_keys([4], [4], [(16, 32)], ["float32"], 16, ["cute_gdn_cached"])
    assert not any("replay" in str(k) for k in without) and len(without) <= 3


# --- plot.py -------------------------------------------------------------------------------------------


def _synthetic():
    rows = []
    for B in (16, 256):
        for st, scale in (("float32", 2.0), ("bfloat16", 1.0)):
            for impl, us in (("cute_gdn_replay", 10.0), ("cute_gdn_replay_compact", 8.0), ("cute_gdn_cached", 40.0),
                             ("sglang_replayssm", 20.0), ("sglang_cached", 50.0)):
                rows.append(dict(op="spec", impl=impl, T=4, H=16, HV=32, B=B, state=st, us=us * scale * B / 16,
                                 bytes=1, model_us=us * B / 16, pct_model=50.0, mem_per_request=1024 * (4 if
                                 "cached" in impl else 1), fold_rate=0.3))
    rows.append(dict(op="spec", impl="flashinfer_mtp", T=4, H=16, HV=32, B=16, state="float32", bytes=1,
                     model_us=1.0, mem_per_request=4096, fold_rate=0.0, error="ModuleNotFoundError: flashinfer | x"))
    return dict(env={"gpu": "NVIDIA H200"}, copy_bandwidth=4.2e12, ring_len=16, steps=16, rows=rows)


SEPARATOR = re.compile(r"^\|(---\|)+$")


def test_spec_table(plot):
    text = plot.spec_table(_synthetic())
    lines = text.splitlines()
    header = next(ln for ln in lines if ln.startswith("| B | state"))
    # Ratio columns only for the implementations present (no SGLang backend here).
    assert header == ("| B | state | cute_gdn replay (exact) | cute_gdn replay (compact) | cute_gdn cached | "
                      "SGLang ReplaySSM | SGLang cached | exact vs SGLang ReplaySSM | exact vs cached | "
                      "compact vs SGLang ReplaySSM | compact vs cached |")
    row = next(ln for ln in lines if ln.startswith("| 16 | fp32"))
    assert row == ("| 16 | fp32 | 20.0 (50%) | 16.0 (50%) | 80.0 (50%) | 40.0 (50%) | 100.0 (50%) | 2.00x | 4.00x | "
                   "2.50x | 5.00x |")
    assert any(ln.startswith("| 256 | bf16 | 160.0 (50%)") for ln in lines)
    # Tables: the step times, the memory, the rows not timed; each header once with its separator under it.
    starts = [i for i, ln in enumerate(lines) if ln.startswith("|") and (i == 0 or not lines[i - 1].startswith("|"))]
    assert len(starts) == 3
    assert [i + 1 for i in starts] == [i for i, ln in enumerate(lines) if SEPARATOR.match(ln)]
    assert "| 4 | 16/32 | fp32 | 1 | 1 | 4 | 1 | 4 | 4 |" in lines  # KiB; FlashInfer's error row has memory too
    assert any("ModuleNotFoundError: flashinfer / x" in ln for ln in lines)


def test_spec_plot_and_dispatch(plot, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "spec_H200.json"
    path.write_text(json.dumps(_synthetic()))
    png = plot.plot_spec(path)
    assert png == tmp_path / "spec_H200.png" and png.stat().st_size > 10_000
    png.unlink()
    plot.main([str(path)])
    out = capsys.readouterr().out
    assert str(png) in out and "Spec step (verify + commit) T = 4, H = 16, HV = 32" in out and png.exists()
    plot.main(["--tables", str(path)])
    assert "vs SGLang ReplaySSM" in capsys.readouterr().out


# --- run_shape's bookkeeping with stand-in implementations ---------------------------------------------


def test_run_shape_rows(bench, monkeypatch):
    """run_shape on the CPU: the device parts replaced (sets, kernels, timer), the rows it writes checked: a
    peer that fails the guard or does not build gets an error row, the others a time, the model fields and
    pct_model; warm steps run only for the ring implementations; the graph holds every (step, set)."""
    import torch

    calls = {"warm": {}, "graph": []}

    class Fake:
        def __init__(self, impl):
            self.impl = impl

        def step(self, i, n, n_m1):
            calls["warm"][self.impl] = calls["warm"].get(self.impl, 0) + 1

    def build(impl, sets, ring_len):
        if impl == "flashinfer_mtp":
            raise ModuleNotFoundError("No module named 'flashinfer'")
        return Fake(impl)

    def time_graph(fns, replays):
        calls["graph"].append(len(fns))
        return 12.5

    monkeypatch.setattr(bench, "build", build)
    monkeypatch.setattr(bench, "make_sets", lambda *a: [{} for _ in range(a[5])])
    monkeypatch.setattr(bench, "accept_tensors", lambda pattern: [(None, None) for _ in pattern])
    monkeypatch.setattr(bench, "guard", lambda impls, *a: {"cute_gdn_replay": 1e-3, "sglang_replayssm": 0.5,
                                                           "sglang_cached": 2e-3})
    monkeypatch.setattr(bench.common, "time_graph", time_graph)
    monkeypatch.setattr(bench.common, "rotation_count", lambda nbytes: 3)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: type("P", (), {"L2_cache_size": 60 * 2**20})())
    monkeypatch.setattr(torch, "Generator", lambda device=None: type("G", (), {"manual_seed": lambda s, x: None})())
    args = bench.parse_args(["--steps", "16", "--warm-steps", "5", "--rounds", "2"])
    impls = ["cute_gdn_cached", "cute_gdn_replay", "sglang_replayssm", "sglang_cached", "flashinfer_mtp"]
    rows = []
    bench.run_shape(rows, args, impls, 4, 16, 32, 8, "float32", 4e12, seed=7)
    got = {r["impl"]: r for r in rows}
    assert set(got) == set(impls)
    assert "guard: rel RMS 0.5" in got["sglang_replayssm"]["error"]
    assert "flashinfer" in got["flashinfer_mtp"]["error"]
    for impl in ("cute_gdn_cached", "cute_gdn_replay", "sglang_cached"):
        r = got[impl]
        assert r["us"] == 12.5 and r["rounds_us"] == [12.5, 12.5] and r["sets"] == 3 and r["steps"] == 16
        assert r["pct_model"] == pytest.approx(100 * r["model_us"] / 12.5)
    assert got["cute_gdn_replay"]["guard_rel_rms"] == 1e-3 and 0 < got["cute_gdn_replay"]["fold_rate"] < 1
    assert got["cute_gdn_cached"]["fold_rate"] == 0.0
    assert calls["warm"] == {"cute_gdn_replay": 5 * 3}  # warm steps for the ring only, every set
    assert calls["graph"] == [16 * 3] * 2 * 3  # 2 rounds x 3 timed implementations, 16 steps x 3 sets each
    monkeypatch.setattr(bench, "guard", lambda impls, *a: {"cute_gdn_replay": 0.3})
    with pytest.raises(AssertionError, match="cute_gdn_replay disagrees"):
        bench.run_shape([], args, impls, 4, 16, 32, 8, "float32", 4e12, seed=7)
