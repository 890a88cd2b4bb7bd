"""A few replay steps (folds included), a flush and both cursor kernels at a small size, both fold modes, fp32 and
bf16 checkpoints and a large batch (the large-batch tiles), for compute-sanitizer:

    compute-sanitizer --tool memcheck python bench/sanitize_replay.py
    compute-sanitizer --tool racecheck python bench/sanitize_replay.py
"""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
from cute_gdn import replay as rp
K = V = 128
dev = "cuda"
for sd, fold, wide in [(sd, fold, wide) for sd in (torch.float32, torch.bfloat16) for fold in rp.FOLD_MODES
                       for wide in (False, True)]:
    pool, B, H, HV, T, L = (9, 5, 2, 4, 4, 16) if not wide else (20, 17, 8, 32, 4, 16)
    g = torch.Generator(device=dev); g.manual_seed(0)
    state = (torch.randn(pool, HV, V, K, generator=g, device=dev) * 0.3).to(sd)
    slots = torch.tensor([3, -1, 7, 0, 5], dtype=torch.int32, device=dev) if not wide else \
        torch.cat([torch.randperm(pool, device=dev)[:B - 1], torch.tensor([-1], device=dev)]).to(torch.int32)
    ring = rp.make_replay_ring(pool, H, HV, K, V, ring_len=L, device=dev)
    cur = rp.make_replay_cursors(pool, max_tokens=T, ring_len=L, fold=fold, device=dev)
    for step in range(5):
        q = torch.randn(B, T, H, K, generator=g, device=dev).to(torch.bfloat16); k = torch.randn_like(q)
        v = torch.randn(B, T, HV, V, generator=g, device=dev).to(torch.bfloat16)
        a = torch.randn(B, T, HV, generator=g, device=dev).to(torch.bfloat16); b = torch.randn_like(a)
        rp.replay_verify(q, k, v, a, b, A_log=torch.zeros(HV, device=dev), dt_bias=torch.zeros(HV, device=dev),
                         state=state, state_indices=slots, ring=ring, cursors=cur)
        rp.replay_commit(cur, slots, torch.tensor([4, 4, 3, 4, 1] * (B // 5) + [4, 4, 3, 4, 1][:B % 5],
                                                  dtype=torch.int32, device=dev))
    rp.replay_flush(state, ring, cur, slots)
    torch.cuda.synchronize()
    print(sd, fold, "B", B, "cursors", cur.pos[slots[slots >= 0].long()].tolist(), "finite", bool(torch.isfinite(state.float()).all()))
