"""Replay tile sweep and a quick check (the measurements behind kernels/replay.py's tiles):

    python bench/sweep_replay.py check   # replay vs cached verify + commit: bit-exact folds, outputs, untouched slots
    python bench/sweep_replay.py time    # spec step (replay verify + cursor commit) per tile in SWEEP, and cached

The check uses the ops' own tiles; the timing runs each tile by its compiled key. bench_spec.py is the benchmark.
"""
import os, sys, time, json
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import torch
import cute_gdn
from cute_gdn import ops, replay as rp
from cute_gdn.cache import default_cache

K = V = 128
dev = "cuda"

def keys_for(pool, H, HV, T, L, sd):
    sdn = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[sd]
    pr = dict(io_dtype="bfloat16", state_dtype=sdn, num_heads=H, num_v_heads=HV, head_k_dim=K, head_v_dim=V, pool_size=pool)
    ks = [k for fold in rp.FOLD_MODES for k in rp.replay_verify_keys(num_tokens=T, max_tokens=T, ring_len=L, gate_mode="raw", dt_bias_dtype="float32", use_qk_l2norm=True, fold_mode=fold, **pr)]
    ks += list(rp.replay_flush_keys(max_tokens=T, ring_len=L, use_qk_l2norm=True, **pr))
    ks += [rp.replay_cursor_key(pool_size=pool, ring_len=L, max_tokens=T, mode=m) for m in ("commit", "flush")]
    ks += list(ops.verify_keys(num_tokens=T, cache_steps=T, gate_mode="raw", dt_bias_dtype="float32", use_qk_l2norm=True, **pr))
    ks.append(ops.commit_key(state_dtype=sdn, num_v_heads=HV, head_k_dim=K, head_v_dim=V, pool_size=pool, cache_steps=T))
    return ks

CONFIGS = [  # pool, B, H, HV, T, L, state dtype
    (9, 5, 2, 4, 4, 16, torch.float32),
    (96, 80, 2, 4, 4, 16, torch.float32),
    (9, 5, 2, 4, 4, 16, torch.bfloat16),
    (9, 5, 1, 4, 2, 8, torch.float32),
]
TIMING = [(256, 256, 16, 32, 4, 16, torch.float32), (256, 256, 16, 32, 4, 16, torch.bfloat16), (64, 64, 16, 32, 4, 16, torch.float32), (64, 64, 16, 32, 4, 16, torch.bfloat16), (16, 16, 16, 32, 4, 16, torch.float32), (1, 1, 16, 32, 4, 16, torch.float32), (1, 1, 16, 32, 4, 16, torch.bfloat16)]
if os.environ.get("SWEEP_TIMING"):  # a subset of TIMING by index, e.g. "0,1"
    TIMING = [TIMING[int(i)] for i in os.environ["SWEEP_TIMING"].split(",")]

def rel(a, b):
    a = a.double(); b = b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))

def inputs(B, T, H, HV, gen):
    q = torch.randn(B, T, H, K, generator=gen, device=dev).to(torch.bfloat16)
    k = torch.randn(B, T, H, K, generator=gen, device=dev).to(torch.bfloat16)
    v = torch.randn(B, T, HV, V, generator=gen, device=dev).to(torch.bfloat16)
    a = torch.randn(B, T, HV, generator=gen, device=dev).to(torch.bfloat16)
    b = torch.randn(B, T, HV, generator=gen, device=dev).to(torch.bfloat16)
    return q, k, v, a, b

def run_check(pool, B, H, HV, T, L, sd, steps=14, fold="exact"):
    gen = torch.Generator(device=dev); gen.manual_seed(pool * 7 + B + T)
    A_log = (torch.rand(HV, generator=gen, device=dev) - 0.5)
    dt_bias = torch.randn(HV, generator=gen, device=dev)
    state0 = (torch.randn(pool, HV, V, K, generator=gen, device=dev) * 0.3).to(sd)
    slots = torch.randperm(pool, generator=gen, device=dev)[:B].to(torch.int32)
    slots[1] = -1
    st_r = state0.clone(); st_c = state0.clone()
    ring = rp.make_replay_ring(pool, H, HV, K, V, ring_len=L, device=dev)
    cur = rp.make_replay_cursors(pool, max_tokens=T, ring_len=L, fold=fold, device=dev)
    cache = torch.zeros(B, T, HV, V, K, dtype=sd, device=dev)
    res = dict(cfg=[pool, B, H, HV, T, L, str(sd), fold], out_rel=[], state_bitexact=[], state_rel=[], folds=0)
    for step in range(steps):
        q, k, v, a, b = inputs(B, T, H, HV, gen)
        n = torch.randint(0, T + 1, (B,), generator=gen, device=dev).to(torch.int32)
        cnt_before = cur.pos[slots.clamp_min(0).long(), 1].clone()
        o_r = cute_gdn.replay.replay_verify(q, k, v, a, b, A_log=A_log, dt_bias=dt_bias, state=st_r, state_indices=slots, ring=ring, cursors=cur)
        rp.replay_commit(cur, slots, n)
        o_c = cute_gdn.verify(q, k, v, a, b, A_log=A_log, dt_bias=dt_bias, state=st_c, state_indices=slots, cache=cache)
        cute_gdn.commit(st_c, slots, cache, None, n)
        live = slots >= 0
        res["out_rel"].append(rel(o_r[live], o_c[live]))
        res["folds"] += int((cnt_before[live] > L - 2 * T).sum())
        # flush a clone, compare with the cached pool
        s2 = st_r.clone(); r2 = rp.ReplayRing(*(x.clone() for x in ring)); c2 = rp.ReplayCursors(cur.pos.clone(), L, T, fold)
        rp.replay_flush(s2, r2, c2, slots)
        ls = slots[live].long()
        res["state_bitexact"].append(bool(torch.equal(s2[ls], st_c[ls])))
        res["state_rel"].append(rel(s2[ls], st_c[ls]))
        assert torch.equal(o_r[~live].float(), torch.zeros_like(o_r[~live]).float())
    untouched = torch.ones(pool, dtype=torch.bool, device=dev); untouched[slots[slots >= 0].long()] = False
    res["untouched_equal"] = bool(torch.equal(st_r[untouched], state0[untouched]))
    res["max_out_rel"] = max(res["out_rel"]); res["all_bitexact"] = all(res["state_bitexact"]); res["max_state_rel"] = max(res["state_rel"])
    return res

def timing(pool, B, H, HV, T, L, sd):
    import common
    gen = torch.Generator(device=dev); gen.manual_seed(1)
    nsets = max(2, common.rotation_count(B * HV * V * K * (4 if sd == torch.float32 else 2)))
    S = 16
    sets = []
    for _ in range(nsets):
        s = dict(inp=inputs(B, T, H, HV, gen), A_log=torch.rand(HV, device=dev) - 0.5, dt_bias=torch.randn(HV, device=dev),
                 state=(torch.randn(pool, HV, V, K, device=dev) * 0.3).to(sd), slots=torch.randperm(pool, device=dev).to(torch.int32),
                 ring=rp.make_replay_ring(pool, H, HV, K, V, ring_len=L, device=dev),
                 cur=rp.make_replay_cursors(pool, max_tokens=T, ring_len=L, device=dev),
                 ns=[torch.randint(1, T + 1, (B,), device=dev).to(torch.int32) for _ in range(S)],
                 cache=torch.empty(B, T, HV, V, K, dtype=sd, device=dev), out=torch.empty(B, T, HV, V, dtype=torch.bfloat16, device=dev))
        sets.append(s)
    def replay_calls():
        calls = []
        for s in sets:
            def f(s=s):
                q, k, v, a, b = s["inp"]
                for n in s["ns"]:
                    rp.replay_verify(q, k, v, a, b, A_log=s["A_log"], dt_bias=s["dt_bias"], state=s["state"], state_indices=s["slots"], ring=s["ring"], cursors=s["cur"], out=s["out"])
                    rp.replay_commit(s["cur"], s["slots"], n)
            calls.append(f)
        return calls
    def cached_calls():
        calls = []
        for s in sets:
            def f(s=s):
                q, k, v, a, b = s["inp"]
                for n in s["ns"]:
                    cute_gdn.verify(q, k, v, a, b, A_log=s["A_log"], dt_bias=s["dt_bias"], state=s["state"], state_indices=s["slots"], cache=s["cache"], out=s["out"])
                    cute_gdn.commit(s["state"], s["slots"], s["cache"], None, n)
            calls.append(f)
        return calls
    from cute_gdn.kernels.verify import VerifyConfig
    sdn = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[sd]
    def cfg_calls(cfg):
        key = rp.replay_verify_key(io_dtype="bfloat16", state_dtype=sdn, num_heads=H, num_v_heads=HV, head_k_dim=K, head_v_dim=V, pool_size=pool,
                                   num_tokens=T, max_tokens=T, ring_len=L, gate_mode="raw", dt_bias_dtype="float32", use_qk_l2norm=True, config=cfg,
                                   fold_mode=SWEEP_FOLD)
        fn = default_cache().get(key)
        def mk():
            calls = []
            for s in sets:
                def f(s=s):
                    q, k, v, a, b = s["inp"]
                    for n in s["ns"]:
                        fn(q, k, v, a, b, s["A_log"], s["dt_bias"], s["state"], s["slots"], *s["ring"], s["cur"].pos, s["out"], K ** -0.5)
                        rp.replay_commit(s["cur"], s["slots"], n)
                calls.append(f)
            return calls
        return mk
    def compact_calls():
        calls = []
        for s in sets:
            cur = rp.ReplayCursors(s["cur"].pos, L, T, "compact")
            def f(s=s, cur=cur):
                q, k, v, a, b = s["inp"]
                for n in s["ns"]:
                    rp.replay_verify(q, k, v, a, b, A_log=s["A_log"], dt_bias=s["dt_bias"], state=s["state"], state_indices=s["slots"], ring=s["ring"], cursors=cur, out=s["out"])
                    rp.replay_commit(cur, s["slots"], n)
            calls.append(f)
        return calls
    variants = [("replay", replay_calls), ("replay_compact", compact_calls), ("cached", cached_calls)]  # the ops' own tiles
    from cute_gdn.kernels.replay import can_implement as ci
    for cfg in SWEEP:
        if ci("bfloat16", sdn, H, HV, K, V, "raw", "float32", T, T, L, cfg): continue
        variants.append((f"replay[{cfg.threads_per_row}:{cfg.rows_per_pass}:{cfg.rows_per_thread}]", cfg_calls(cfg)))
    out = {}
    for name, mk in variants:
        # warm the rings
        for f in mk(): f()
        torch.cuda.synchronize()
        us = common.time_graph(mk(), replays=5) / S
        out[name] = us
    bw = common.copy_bandwidth()
    out["copy_bw_TBps"] = bw / 1e12
    out["state_read_us"] = B * HV * V * K * (4 if sd == torch.float32 else 2) / bw * 2 * 1e6
    return dict(cfg=[pool, B, H, HV, T, L, str(sd)], **out)

from cute_gdn.kernels.verify import VerifyConfig
SWEEP_FOLD = os.environ.get("SWEEP_FOLD", "compact")  # the fold mode of the swept tiles
SWEEP = [VerifyConfig(4, 32, 1), VerifyConfig(2, 64, 1), VerifyConfig(8, 16, 2), VerifyConfig(8, 32, 2), VerifyConfig(4, 32, 2), VerifyConfig(4, 64, 2)]

if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    ks = []
    for c in CONFIGS: ks += keys_for(c[0], c[2], c[3], c[4], c[5], c[6])
    if what in ("all", "time"):
        for c in TIMING:
            ks += keys_for(c[0], c[2], c[3], c[4], c[5], c[6])
            sdn = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[c[6]]
            for cfg in SWEEP:
                from cute_gdn.kernels.replay import can_implement as ci
                if ci("bfloat16", sdn, c[2], c[3], K, V, "raw", "float32", c[4], c[4], c[5], cfg): continue
                ks.append(rp.replay_verify_key(io_dtype="bfloat16", state_dtype=sdn, num_heads=c[2], num_v_heads=c[3], head_k_dim=K, head_v_dim=V,
                    pool_size=c[0], num_tokens=c[4], max_tokens=c[4], ring_len=c[5], gate_mode="raw", dt_bias_dtype="float32", use_qk_l2norm=True, config=cfg,
                    fold_mode=SWEEP_FOLD))
    ks = list(dict.fromkeys(ks))
    t0 = time.time(); default_cache().compile(ks, jobs=16); print(f"compiled {len(ks)} keys in {time.time()-t0:.1f}s", flush=True)
    results = []
    if what in ("all", "check"):
        for c in [c + (f,) for c in CONFIGS for f in rp.FOLD_MODES]:
            try:
                r = run_check(*c[:7], fold=c[7])
            except Exception as e:
                import traceback; traceback.print_exc(); r = dict(cfg=str(c), error=repr(e))
            print(json.dumps({k: v for k, v in r.items() if k not in ("out_rel", "state_rel", "state_bitexact")}), flush=True)
            print("  out_rel", [f"{x:.2e}" for x in r.get("out_rel", [])], "\n  bitexact", r.get("state_bitexact"), flush=True)
            results.append(r)
    if what in ("all", "time"):
        for c in TIMING:
            try:
                r = timing(*c)
            except Exception as e:
                import traceback; traceback.print_exc(); r = dict(cfg=str(c), error=repr(e))
            print(json.dumps(r), flush=True); results.append(r)
    out = os.environ.get("OUT")
    if out:
        json.dump(results, open(os.path.join(out, "check.json"), "w"), indent=1)
