"""ncu target: replay_verify at B = 256, H16/HV32, T = 4, L = 16, with the ring counts spread by warm steps.

    ncu --clock-control none -k regex:GdnReplaySm90 --launch-skip 8 --launch-count 1 --set full \
        python bench/profile_replay.py float32 compact 2,64,1
"""
import sys

import torch

from cute_gdn import replay as rp
from cute_gdn.cache import default_cache
from cute_gdn.kernels.verify import VerifyConfig

state_dtype, fold = sys.argv[1], sys.argv[2]
cfg = VerifyConfig(*map(int, sys.argv[3].split(","))) if len(sys.argv) > 3 else None
B, H, HV, K, T, L = 256, 16, 32, 128, 4, 16
sd = getattr(torch, state_dtype)
gen = torch.Generator(device="cuda").manual_seed(0)
q, k = (torch.randn(B, T, H, K, device="cuda", generator=gen).bfloat16() for _ in range(2))
v = torch.randn(B, T, HV, K, device="cuda", generator=gen).bfloat16()
a, b = (torch.randn(B, T, HV, device="cuda", generator=gen).bfloat16() for _ in range(2))
A_log, dt_bias = torch.rand(HV, device="cuda") - 0.5, torch.randn(HV, device="cuda")
state = (torch.randn(B, HV, K, K, device="cuda", generator=gen) * 0.3).to(sd)
slots = torch.randperm(B, device="cuda", generator=gen).int()
ring = rp.make_replay_ring(B, H, HV, K, K, ring_len=L)
cur = rp.make_replay_cursors(B, max_tokens=T, ring_len=L, fold=fold)
key = rp.replay_verify_key(io_dtype="bfloat16", state_dtype=state_dtype, num_heads=H, num_v_heads=HV, head_k_dim=K,
                           head_v_dim=K, pool_size=B, num_tokens=T, max_tokens=T, ring_len=L, gate_mode="raw",
                           dt_bias_dtype="float32", use_qk_l2norm=True, config=cfg, large_batch=True, fold_mode=fold)
fn = default_cache().get(key)
out = torch.empty_like(v)
for step in range(12):
    fn(q, k, v, a, b, A_log, dt_bias, state, slots, *ring, cur.pos, out, K ** -0.5)
    rp.replay_commit(cur, slots, torch.randint(1, T + 1, (B,), device="cuda", generator=gen).int())
torch.cuda.synchronize()
print("counts", torch.bincount(cur.pos[:, 1].long()).tolist())
