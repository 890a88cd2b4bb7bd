"""Prefill on an sm_90 GPU: against the fp64 reference and FLA's chunked Triton kernels."""

import os

import pytest
import torch

from cute_gdn import reference
from cute_gdn.cache import KernelKey, default_cache
from gdn_inputs import make_pool, make_step_inputs, rel_rms

pytestmark = pytest.mark.gpu

POOL = 40


def _key(H, HV, state="float32", gates="raw", bias="float32", l2norm=True, io="bfloat16"):
    return KernelKey.make("prefill", io_dtype=io, state_dtype=state, num_heads=H, num_v_heads=HV, head_k_dim=128,
                          head_v_dim=128, pool_size=POOL, gate_mode=gates,
                          dt_bias_dtype=bias if gates == "raw" else None, use_qk_l2norm=l2norm)


@pytest.fixture(scope="module", autouse=True)
def precompiled():
    keys = [_key(2, 4), _key(2, 4, state="bfloat16"), _key(2, 4, gates="precomputed", l2norm=False),
            _key(16, 32)]
    default_cache().compile(keys, jobs=os.cpu_count() or 1)


def _run(lengths, H=2, HV=4, state="float32", gates="raw", l2norm=True, has_init=None, pad=(), seed=0,
         decay="moderate"):
    torch.manual_seed(seed)
    total = sum(lengths)
    inputs = make_step_inputs(1, total, H, HV, 128, 128, gates=gates, decay=decay)
    sd = {"float32": torch.float32, "bfloat16": torch.bfloat16}[state]
    pool = make_pool(POOL, HV, 128, 128, sd)
    N = len(lengths)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device="cuda")
    slots = torch.randperm(POOL, device="cuda")[:N].to(torch.int32)
    for i in pad:
        slots[i] = -1
    init = torch.ones(N, dtype=torch.bool, device="cuda") if has_init is None else \
        torch.tensor(has_init, dtype=torch.bool, device="cuda")
    before = pool.clone()
    fn = default_cache().get(_key(H, HV, state=state, gates=gates, l2norm=l2norm))
    o = torch.full_like(inputs["v"], float("nan"))
    scale = 128 ** -0.5
    if gates == "raw":
        fn(inputs["q"], inputs["k"], inputs["v"], inputs["a"], inputs["b"], inputs["A_log"], inputs["dt_bias"],
           cu, pool, slots, init.view(torch.int8), o, scale)
    else:
        fn(inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["beta"], None, None,
           cu, pool, slots, init.view(torch.int8), o, scale)
    torch.cuda.synchronize()
    ref_o, ref_pool = reference.prefill(**inputs, cu_seqlens=cu, state=before.double(), state_indices=slots,
                                        has_initial_state=init, scale=scale, use_qk_l2norm=l2norm)
    live = slots >= 0
    named = slots[live].long()
    assert torch.isfinite(o.float()).all()
    return o, pool, before, ref_o, ref_pool, named, cu, slots, inputs, init


@pytest.mark.parametrize("state", ["float32", "bfloat16"])
def test_prefill_mixed_lengths(state):
    lengths = [1, 2, 63, 64, 65, 127, 300]
    o, pool, before, ref_o, ref_pool, named, *_ = _run(lengths, state=state, has_init=[1, 0, 1, 1, 0, 1, 1])
    err_o = rel_rms(o, ref_o)
    err_s = rel_rms(pool[named], ref_pool[named])
    print("err o", err_o, "err state", err_s)
    assert err_o < 2e-2 and err_s < 2e-2
    untouched = torch.ones(POOL, dtype=torch.bool, device="cuda")
    untouched[named] = False
    assert torch.equal(pool[untouched], before[untouched])
