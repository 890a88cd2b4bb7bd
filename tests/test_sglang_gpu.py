"""CuteGDNKernel against SGLang 0.5.23's own TritonGDNKernel (loaded by tests/sglang_peer.py) on an sm_90
GPU: the same SGLang-layout inputs through both (views of a split mixed_qkv, SGLang's gates, its index
tables), the same outputs and states within tolerance, untouched pool slots and verify cache entries
bit-identical.

One CuteGDNKernel config serves every test: H=4, HV=8, K=V=128, pool_size=33 (32 slots + SGLang's
padding slot), cache_steps=4, fp32 state, bf16 io (35 kernels; precompile with
`cute-gdn-precompile --num-heads 4 --num-v-heads 8 --head-dim 128 --pool-size 33 --cache-steps 4`).
"""

from types import SimpleNamespace

import pytest
import torch

import sglang_peer
from gdn_inputs import make_pool, rel_rms

pytestmark = pytest.mark.gpu

H, HV, K, V = 4, 8, 128, 128  # Qwen3-Next's GVA ratio and head dims, at small scale
POOL, STEPS = 33, 4
# Decode and verify: both run the recurrence in fp32 and round o to bf16 once, so o differs by bf16
# rounding (about 2e-3 relative) and fp32 states by accumulation order only.
TOL_O_STEP, TOL_S_STEP = 1e-2, 1e-5
# Prefill: the two multiply different bf16 operands on tensor cores (tests/test_prefill_gpu.py: each is
# within 1.5e-2 of the fp64 reference, and cute_gdn within 2e-2 of FLA's chunked kernels).
TOL_O_PREFILL, TOL_S_PREFILL = 2e-2, 2e-2


def gpu_kernel_keys() -> list:
    """The one CuteGDNKernel config's kernels; conftest compiles the whole run's set at once, in parallel."""
    from cute_gdn.serving import config_keys

    return config_keys(H, HV, K, V, pool_size=POOL, cache_steps=STEPS)


@pytest.fixture(scope="module")
def peer():
    if sglang_peer.sglang_dir() is None:
        pytest.skip("sglang 0.5.23 not found (.gpu-site/sglang, CUTE_GDN_SGLANG_DIR or pip --no-deps)")
    return SimpleNamespace(triton=sglang_peer.load_triton_kernel()(), gating=sglang_peer.load_fused_gdn_gating())


@pytest.fixture(scope="module")
def cute(peer):
    from cute_gdn.integrations.sglang import CuteGDNKernel

    return CuteGDNKernel(H, HV, K, V, pool_size=POOL, cache_steps=STEPS)  # warms up: loads all 35 kernels


def _qkv(tokens):
    """q, k, v as SGLang's backend builds them: torch.split views of mixed_qkv [tokens, 2HK + HV V]."""
    mixed = torch.randn(tokens, 2 * H * K + HV * V, device="cuda", dtype=torch.bfloat16)
    q, k, v = torch.split(mixed, [H * K, H * K, HV * V], dim=-1)
    return q.view(1, tokens, H, K), k.view(1, tokens, H, K), v.view(1, tokens, HV, V)


def _gates(tokens, bias_dtype=torch.float32):
    a = (torch.randn(tokens, HV, device="cuda") * 2).to(torch.bfloat16)
    b = torch.randn(tokens, HV, device="cuda").to(torch.bfloat16)
    A_log = torch.rand(HV, device="cuda") * 2 - 1
    dt_bias = torch.randn(HV, device="cuda").to(bias_dtype)
    return a, b, A_log, dt_bias


def _slots(count, pad=()):
    slots = torch.randperm(POOL, device="cuda")[:count].to(torch.int32)
    for i in pad:
        slots[i] = -1
    return slots


def _untouched(named):
    mask = torch.ones(POOL, dtype=torch.bool, device="cuda")
    mask[named] = False
    return mask


@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.bfloat16])
def test_decode_matches_triton(peer, cute, bias_dtype):
    torch.manual_seed(0)
    B = 6
    pool0 = make_pool(POOL, HV, V, K, torch.float32)
    slots = _slots(B, pad=(2,))
    qsl = torch.arange(B + 1, dtype=torch.int32, device="cuda")
    live = slots >= 0
    named = slots[live].long()
    tri_pool, cute_pool = pool0.clone(), pool0.clone()
    for step in range(3):  # a few steps, each from the states the previous one left
        q, k, v = _qkv(B)
        a, b, A_log, dt_bias = _gates(B, bias_dtype)
        kw = dict(A_log=A_log, dt_bias=dt_bias, cache_indices=slots, query_start_loc=qsl)
        tri_o = peer.triton.decode(q, k, v, a, b, ssm_states=tri_pool, **kw)
        cute_o = cute.decode(q, k, v, a, b, ssm_states=cute_pool, **kw)
        torch.cuda.synchronize()
        assert cute_o.shape == tri_o.shape == (1, B, HV, V) and cute_o.is_contiguous()
        err_o = rel_rms(cute_o[0, live], tri_o[0, live])
        assert err_o < TOL_O_STEP, (step, err_o)
        assert torch.equal(cute_o[0, ~live], torch.zeros_like(cute_o[0, ~live])), "padding rows are zero"
        err_s = rel_rms(cute_pool[named], tri_pool[named])
        assert err_s < TOL_S_STEP, (step, err_s)
        assert not torch.equal(cute_pool[named], pool0[named])
    untouched = _untouched(named)
    assert torch.equal(cute_pool[untouched], pool0[untouched]), "slots not named must be bit-identical"
    assert torch.equal(tri_pool[untouched], pool0[untouched])


def test_extend_matches_triton(peer, cute):
    torch.manual_seed(1)
    lengths = [1, 63, 64, 65, 300, 7]  # the last sequence is padding
    T, N = sum(lengths), len(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q, k, v = _qkv(T)
    a, b, A_log, dt_bias = _gates(T, torch.bfloat16)
    g, beta = peer.gating(A_log, a, b, dt_bias)  # what GDNAttnBackend feeds extend: fp32 [1, T, HV]
    assert g.dtype == beta.dtype == torch.float32 and g.shape == (1, T, HV)
    slots = _slots(N, pad=(N - 1,))
    pool0 = make_pool(POOL, HV, V, K, torch.float32)
    pool0[slots[[0, 3]].long()] = 0  # new requests: SGLang zeroes a slot when it hands it out
    tri_pool, cute_pool = pool0.clone(), pool0.clone()
    kw = dict(cache_indices=slots, query_start_loc=cu, extend_prefix_lens=torch.tensor([0, 5, 9, 0, 17, 0]))
    tri_o, _, _ = peer.triton.extend(q, k, v, g, beta, ssm_states=tri_pool, **kw)
    output = torch.empty(1, T, HV, V, device="cuda", dtype=torch.bfloat16)
    cute_o, final, h = cute.extend(q, k, v, g, beta, ssm_states=cute_pool, output=output, **kw)
    torch.cuda.synchronize()
    assert cute_o is output and final is None and h is None
    live_tokens = torch.ones(T, dtype=torch.bool, device="cuda")
    live_tokens[int(cu[-2]):] = False
    err_o = rel_rms(cute_o[0, live_tokens], tri_o[0, live_tokens])
    assert err_o < TOL_O_PREFILL, err_o
    assert torch.equal(cute_o[0, ~live_tokens], torch.zeros_like(cute_o[0, ~live_tokens]))
    for n in range(N - 1):  # every sequence alone, so that a short one is not hidden by the long one
        rows = slice(int(cu[n]), int(cu[n + 1]))
        assert rel_rms(cute_o[0, rows], tri_o[0, rows]) < TOL_O_PREFILL, (n, lengths[n])
        slot = int(slots[n])
        assert rel_rms(cute_pool[slot], tri_pool[slot]) < TOL_S_PREFILL, (n, lengths[n])
    untouched = _untouched(slots[:-1].long())
    assert torch.equal(cute_pool[untouched], pool0[untouched]), "slots not named must be bit-identical"
    assert torch.equal(tri_pool[untouched], pool0[untouched])


@pytest.mark.parametrize("T", [STEPS, 2])  # 2: fewer drafts this step than the buffer holds
def test_target_verify_matches_triton(peer, cute, T):
    torch.manual_seed(2)
    N, rows_total = 5, 8
    q, k, v = _qkv(N * T)
    a, b, A_log, dt_bias = _gates(N * T)
    pool0 = make_pool(POOL, HV, V, K, torch.float32)
    # SGLang's tables are longer than the batch (padded rows past it) and the buffer has a spare row.
    slots = torch.cat([_slots(N, pad=(1,)), torch.full((3,), -1, dtype=torch.int32, device="cuda")])
    rows = torch.cat([torch.randperm(rows_total, device="cuda")[:N].to(torch.int32),
                      torch.full((3,), rows_total - 1, dtype=torch.int32, device="cuda")])
    buf0 = make_pool(rows_total * STEPS, HV, V, K, torch.float32).view(rows_total, STEPS, HV, V, K)
    qsl = torch.arange(0, N * T + 1, T, dtype=torch.int32, device="cuda")
    kw = dict(A_log=A_log, dt_bias=dt_bias, q=q, k=k, v=v, a=a, b=b, cache_indices=slots, query_start_loc=qsl,
              intermediate_state_indices=rows, cache_steps=T, retrieve_parent_token=None, stable_rows=False)
    tri_pool, tri_buf = pool0.clone(), buf0.clone()
    cute_pool, cute_buf = pool0.clone(), buf0.clone()
    tri_o = peer.triton.target_verify(ssm_states=tri_pool, intermediate_states_buffer=tri_buf, **kw)
    cute_o = cute.target_verify(ssm_states=cute_pool, intermediate_states_buffer=cute_buf, **kw)
    torch.cuda.synchronize()
    assert cute_o.shape == tri_o.shape == (1, N * T, HV, V) and cute_o.is_contiguous()
    live = slots[:N] >= 0
    live_tokens = live.repeat_interleave(T)
    err_o = rel_rms(cute_o[0, live_tokens], tri_o[0, live_tokens])
    assert err_o < TOL_O_STEP, err_o
    assert torch.equal(cute_o[0, ~live_tokens], torch.zeros_like(cute_o[0, ~live_tokens]))
    for n in range(N):
        if not live[n]:
            continue
        row = int(rows[n])
        for t in range(T):  # every cached step
            err = rel_rms(cute_buf[row, t], tri_buf[row, t])
            assert err < TOL_S_STEP, (n, t, err)
    assert torch.equal(cute_pool, pool0) and torch.equal(tri_pool, pool0), "verify must not write the pool"
    written = torch.zeros(rows_total, STEPS, dtype=torch.bool, device="cuda")
    written[rows[:N][live].long(), :T] = True
    assert torch.equal(cute_buf[~written], buf0[~written]), "cache entries not written must be bit-identical"
