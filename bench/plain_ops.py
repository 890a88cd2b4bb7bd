"""Every public op from a plain script (no main guard: the compile workers are fresh interpreters, not
multiprocessing children of this file), at small sizes with a padding row, checked against the fp64
reference; also the small calls compute-sanitizer runs over (every prefill plan: narrow, wide, folded and
overlapped, context-parallel; decode, verify, commit, commit_layers, replay verify / commit / flush):

    python bench/plain_ops.py
    compute-sanitizer --tool memcheck python bench/plain_ops.py
    compute-sanitizer --tool racecheck python bench/plain_ops.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch

import cute_gdn
from cute_gdn import ops, reference

dev = "cuda"
H, HV, K, V, POOL = 2, 4, 128, 128, 9
torch.manual_seed(0)


def rel(x, ref):
    return float((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def check(name, err, tol=2e-2):
    print(f"{name}: relative error {err:.2e}", flush=True)
    assert err < tol, (name, err)


def gates(*lead):
    return (torch.randn(*lead, HV, device=dev).to(torch.bfloat16), torch.randn(*lead, HV, device=dev).to(torch.bfloat16))


A_log = torch.rand(HV, device=dev) - 0.5
dt_bias = torch.randn(HV, device=dev)
pool0 = torch.randn(POOL, HV, V, K, device=dev) * 0.1

# prefill, every plan; sequence 1 is padding (slot -1), one sequence is empty
lengths = [70, 33, 0, 130]
cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=dev)
T = int(cu[-1])
q = torch.randn(1, T, H, K, device=dev).to(torch.bfloat16)
k = torch.randn_like(q)
v = torch.randn(1, T, HV, V, device=dev).to(torch.bfloat16)
a, b = gates(1, T)
slots = torch.tensor([4, -1, 7, 2], dtype=torch.int32, device=dev)
ref_o, ref_pool = reference.prefill(q, k, v, a=a, b=b, A_log=A_log, dt_bias=dt_bias, cu_seqlens=cu, state=pool0,
                                    state_indices=slots)
plans = {"narrow": ops.PrefillPlan(chain=0, overlap=False), "wide": ops.PrefillPlan(chain=1, overlap=False),
         "folded, overlapped": ops.PrefillPlan(chain=2, overlap=True),
         "plan_prefill": ops.plan_prefill(len(lengths), T, HV, K, V, ops.sm_count(q.device))}
for name, plan in plans.items():
    pool = pool0.clone()
    o = cute_gdn.prefill(q, k, v, a, b, A_log=A_log, dt_bias=dt_bias, cu_seqlens=cu, state=pool, state_indices=slots,
                         plan=plan)
    check(f"prefill {name} o", rel(o, ref_o))
    check(f"prefill {name} state", rel(pool, ref_pool))
    assert torch.equal(pool[[0, 1, 3, 5, 6, 8]], pool0[[0, 1, 3, 5, 6, 8]]), "unnamed slots changed"
    assert not o[0, 70:103].any(), "padding rows not zero"
Tc = 3 * 128 - 20  # context parallel: one sequence in 3 pieces of 128 tokens
qc = torch.randn(1, Tc, H, K, device=dev).to(torch.bfloat16)
kc, vc = torch.randn_like(qc), torch.randn(1, Tc, HV, V, device=dev).to(torch.bfloat16)
ac, bc = gates(1, Tc)
cuc = torch.tensor([0, Tc], dtype=torch.int32, device=dev)
one = torch.tensor([5], dtype=torch.int32, device=dev)
ref_oc, ref_pc = reference.prefill(qc, kc, vc, a=ac, b=bc, A_log=A_log, dt_bias=dt_bias, cu_seqlens=cuc, state=pool0,
                                   state_indices=one)
pool = pool0.clone()
o = cute_gdn.prefill(qc, kc, vc, ac, bc, A_log=A_log, dt_bias=dt_bias, cu_seqlens=cuc, state=pool, state_indices=one,
                     plan=ops.PrefillPlan(chain=0, overlap=False, pieces=3, cp_step=128))
check("prefill context-parallel o", rel(o, ref_oc))
check("prefill context-parallel state", rel(pool, ref_pc))

# decode, verify + commit, commit_layers; row 1 is padding
B, Tv = 3, 3
bslots = torch.tensor([6, -1, 1], dtype=torch.int32, device=dev)
q1 = torch.randn(B, 1, H, K, device=dev).to(torch.bfloat16)
k1, v1 = torch.randn_like(q1), torch.randn(B, 1, HV, V, device=dev).to(torch.bfloat16)
a1, b1 = gates(B, 1)
pool = pool0.clone()
o = cute_gdn.decode(q1, k1, v1, a1, b1, A_log=A_log, dt_bias=dt_bias, state=pool, state_indices=bslots)
ref_o, ref_pool = reference.decode(q1, k1, v1, a=a1, b=b1, A_log=A_log, dt_bias=dt_bias, state=pool0,
                                   state_indices=bslots)
check("decode o", rel(o, ref_o))
check("decode state", rel(pool, ref_pool))
qv = torch.randn(B, Tv, H, K, device=dev).to(torch.bfloat16)
kv, vv = torch.randn_like(qv), torch.randn(B, Tv, HV, V, device=dev).to(torch.bfloat16)
av, bv = gates(B, Tv)
cache = torch.zeros(B, 4, HV, V, K, device=dev)
o = cute_gdn.verify(qv, kv, vv, av, bv, A_log=A_log, dt_bias=dt_bias, state=pool0, state_indices=bslots, cache=cache)
ref_o, ref_cache = reference.verify(qv, kv, vv, a=av, b=bv, A_log=A_log, dt_bias=dt_bias, state=pool0,
                                    state_indices=bslots, cache=torch.zeros_like(cache))
check("verify o", rel(o, ref_o))
check("verify cache", rel(cache, ref_cache))
accepted = torch.tensor([2, 1, 3], dtype=torch.int32, device=dev)
pool = pool0.clone()
cute_gdn.commit(pool, bslots, cache, None, accepted)
assert torch.equal(pool[6], cache[0, 1]) and torch.equal(pool[1], cache[2, 2]) and torch.equal(pool[0], pool0[0])
pools = [pool0.clone(), pool0.clone()]
table = cute_gdn.LayerTable(pools, [cache, cache.clone()])
cute_gdn.commit_layers(table, bslots, None, accepted)
assert all(torch.equal(p, pool) for p in pools), "commit_layers differs from commit"
print("commit, commit_layers: slots as expected", flush=True)

# replay: two steps, a fold-free commit, a flush; against verify + commit from the same start
ring = cute_gdn.make_replay_ring(POOL, H, HV, K, V, ring_len=16, device=dev)
cursors = cute_gdn.make_replay_cursors(POOL, max_tokens=4, ring_len=16, device=dev)
state = pool0.clone()
o = cute_gdn.replay_verify(qv, kv, vv, av, bv, A_log=A_log, dt_bias=dt_bias, state=state, state_indices=bslots,
                           ring=ring, cursors=cursors)
check("replay_verify o", rel(o, ref_o))
cute_gdn.replay_commit(cursors, bslots, accepted)
cute_gdn.replay_flush(state, ring, cursors, bslots)
check("replay_flush state vs commit", rel(state[[6, 1]], pool[[6, 1]]), 1e-5)
assert torch.equal(state[0], pool0[0]) and not cursors.pos[:, 1].any()  # flushed: every count 0
torch.cuda.synchronize()
print("all public ops ran from a plain script", flush=True)
