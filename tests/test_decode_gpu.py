"""Decode on an sm_90 GPU: against the fp64 reference, against FLA's Triton recurrence, padding,
permuted slots, untouched slots, strided views and CUDA-graph replay."""

import os

import pytest
import torch

import cute_gdn
from cute_gdn import reference
from cute_gdn.cache import default_cache
from cute_gdn.kernels.decode import DecodeConfig
from cute_gdn.ops import decode_key, decode_keys
from gdn_inputs import SHAPE_CASES, TORCH_DTYPES, make_pool, make_step_inputs, rel_rms

pytestmark = pytest.mark.gpu

POOL = 160  # one pool size for every test: one kernel per variant

QWEN_CASES = [(state, B) for state in ("float32", "bfloat16") for B in (1, 7, 64)]
VARIANT_CASES = [
    ("float16", "float32", "raw", "float32", True),
    ("float16", "bfloat16", "precomputed", None, True),
    ("bfloat16", "float32", "precomputed", None, False),
    ("bfloat16", "bfloat16", "raw", "bfloat16", False),
    ("bfloat16", "float32", "raw", "bfloat16", True),
]
STAGING_CASES = [("float32", (8, 16, 2)), ("float32", (16, 8, 8)), ("bfloat16", (8, 16, 4)), ("bfloat16", (16, 8, 8))]


def _keys(H, HV, K, V, io="bfloat16", state="float32", gates="raw", bias="float32", l2norm=True, pool=POOL):
    return decode_keys(io_dtype=io, state_dtype=state, num_heads=H, num_v_heads=HV, head_k_dim=K,
                      head_v_dim=V, pool_size=pool, gate_mode=gates,
                      dt_bias_dtype=bias if gates == "raw" else None, use_qk_l2norm=l2norm)


def gpu_kernel_keys() -> list:
    """Every kernel this module runs; conftest compiles the whole run's set at once, in parallel."""
    keys = {k for s in ("float32", "bfloat16") for k in _keys(16, 32, 128, 128, state=s)}
    keys |= {k for io, st, gm, bias, l2 in VARIANT_CASES
             for k in _keys(8, 16, 128, 128, io=io, state=st, gates=gm, bias=bias or "float32", l2norm=l2)}
    keys |= {k for H, HV, K, V, st in SHAPE_CASES for k in _keys(H, HV, K, V, state=st)}
    for extra in (dict(), dict(pool=40), dict(pool=21), dict(state="bfloat16", pool=40),
                  dict(state="bfloat16", pool=21)):
        keys |= set(_keys(16, 32, 128, 128, **extra))
    keys |= set(_keys(8, 16, 128, 128))
    for state, tile in STAGING_CASES:
        base = _keys(4, 16, 128, 128, state=state)[0].kwargs
        keys |= {decode_key(**{**base, "config": DecodeConfig(*tile, staged)}) for staged in (False, True)}
    return sorted(keys, key=lambda k: k.name)


def _run_and_check(B, H, HV, K, V, *, io="bfloat16", state="float32", gates="raw", bias="float32",
                   l2norm=True, packed=False, pool_size=None, pad=(), decay="moderate", seed=0):
    torch.manual_seed(seed)
    io_dtype, state_dtype = TORCH_DTYPES[io], TORCH_DTYPES[state]
    pool_size = pool_size or POOL
    inputs = make_step_inputs(B, 1, H, HV, K, V, io_dtype=io_dtype, gates=gates,
                              bias_dtype=TORCH_DTYPES[bias], packed=packed, decay=decay)
    pool = make_pool(pool_size, HV, V, K, state_dtype)
    slots = torch.randperm(pool_size, device="cuda")[:B].to(torch.int32)
    for i in pad:
        slots[i] = -1
    before = pool.clone()
    scale = 0.7 * K ** -0.5
    o = cute_gdn.decode(**inputs, state=pool, state_indices=slots, scale=scale, use_qk_l2norm=l2norm)
    torch.cuda.synchronize()

    # fp64 pool: the reference's stored states are not rounded to the pool dtype.
    ref_o, ref_pool = reference.decode(**inputs, state=before.double(), state_indices=slots, scale=scale,
                                       use_qk_l2norm=l2norm, dtype=torch.float64)
    # The same reference in the kernel's own precision: fp32 math, io-dtype output, state-dtype pool.
    r32_o, r32_pool = reference.decode(**inputs, state=before, state_indices=slots, scale=scale,
                                       use_qk_l2norm=l2norm, dtype=torch.float32)
    r32_o = r32_o.to(io_dtype)

    live = slots >= 0
    named = slots[live].long()
    assert torch.isfinite(o.float()).all()
    assert torch.equal(o[~live], torch.zeros_like(o[~live])), "padded rows must be zero"
    err_o = rel_rms(o[live], ref_o[live])
    err_o32 = rel_rms(r32_o[live], ref_o[live])
    assert err_o <= 2 * err_o32 + 2e-3, (err_o, err_o32)
    err_s = rel_rms(pool[named], ref_pool[named])
    err_s32 = rel_rms(r32_pool[named], ref_pool[named])
    assert err_s <= 2 * err_s32 + 1e-5, (err_s, err_s32)
    untouched = torch.ones(pool_size, dtype=torch.bool, device="cuda")
    untouched[named] = False
    assert torch.equal(pool[untouched], before[untouched]), "slots not named must be bit-identical"
    return inputs, slots, before, pool, o


@pytest.mark.parametrize("state,B", QWEN_CASES)
def test_decode_qwen3_next_shape(state, B):
    _run_and_check(B, 16, 32, 128, 128, state=state, pad=(B // 2,) if B > 1 else ())


@pytest.mark.parametrize("B", [13, 80])  # B * HV = 208 and 1280: the small- and the large-batch tile
@pytest.mark.parametrize("io,state,gates,bias,l2norm", VARIANT_CASES)
def test_decode_variants(io, state, gates, bias, l2norm, B):
    _run_and_check(B, 8, 16, 128, 128, io=io, state=state, gates=gates, bias=bias or "float32",
                   l2norm=l2norm, pad=(0, 5))


@pytest.mark.parametrize("H,HV,K,V,state", SHAPE_CASES)
def test_decode_shapes(H, HV, K, V, state):
    _run_and_check(5, H, HV, K, V, state=state, pad=(3,))


def test_decode_packed_views_are_read_in_place():
    inputs, *_ = _run_and_check(9, 16, 32, 128, 128, packed=True, pad=(2,))
    assert not inputs["q"].is_contiguous() and inputs["q"].data_ptr() + 16 * 128 * 2 == inputs["k"].data_ptr()


@pytest.mark.parametrize("decay", ["tiny", "strong"])
def test_decode_gate_extremes(decay):
    _run_and_check(6, 8, 16, 128, 128, decay=decay)


def test_decode_all_padding_writes_zeros_only():
    _run_and_check(4, 8, 16, 128, 128, pad=(0, 1, 2, 3))


@pytest.mark.parametrize("state", ["float32", "bfloat16"])
def test_decode_matches_fla(state):
    fla = pytest.importorskip("fla.ops.gated_delta_rule")
    torch.manual_seed(1)
    B, H, HV, K, V = 24, 16, 32, 128, 128
    inputs = make_step_inputs(B, 1, H, HV, K, V)
    state_dtype = TORCH_DTYPES[state]
    pool = make_pool(40, HV, V, K, state_dtype)
    slots = torch.randperm(40, device="cuda")[:B].to(torch.int32)
    init = pool[slots.long()].float()
    o = cute_gdn.decode(**inputs, state=pool, state_indices=slots)
    g, beta = reference.compute_gates(inputs["a"], inputs["b"], inputs["A_log"], inputs["dt_bias"],
                                      dtype=torch.float32)
    fla_o, fla_state = fla.fused_recurrent_gated_delta_rule(
        inputs["q"], inputs["k"], inputs["v"], g=g, beta=beta, scale=K ** -0.5, initial_state=init,
        output_final_state=True, use_qk_l2norm_in_kernel=True, state_v_first=True)
    assert rel_rms(o, fla_o) < 1e-2
    tol = 1e-5 if state == "float32" else 1e-2
    assert rel_rms(pool[slots.long()], fla_state.to(state_dtype)) < tol


@pytest.mark.parametrize("state", ["float32", "bfloat16"])
def test_decode_cuda_graph_replay_matches_eager(state):
    torch.manual_seed(2)
    B, H, HV, K, V = 16, 16, 32, 128, 128
    inputs = make_step_inputs(B, 1, H, HV, K, V)
    pool0 = make_pool(B + 5, HV, V, K, TORCH_DTYPES[state])
    slots = torch.randperm(B + 5, device="cuda")[:B].to(torch.int32)
    slots[3] = -1
    eager_pool = pool0.clone()
    eager_o = cute_gdn.decode(**inputs, state=eager_pool, state_indices=slots)
    graph_pool = pool0.clone()
    out = torch.empty_like(eager_o)
    cute_gdn.decode(**inputs, state=graph_pool.clone(), state_indices=slots, out=out)  # warm (loaded)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cute_gdn.decode(**inputs, state=graph_pool, state_indices=slots, out=out)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager_o)
    assert torch.equal(graph_pool, eager_pool)


def _bad_cases(B=4, H=8, HV=16, K=128, V=128):
    d = "cuda"
    bf = torch.bfloat16
    return {
        "q misaligned": ("q", dict(q=torch.randn(B, 1, H, K + 8, dtype=bf, device=d)[..., 1:K + 1])),
        "q stride": ("q", dict(q=torch.randn(B, 1, H, K + 4, dtype=bf, device=d)[..., :K])),
        "q rank": ("q", dict(q=torch.randn(B, H, K, dtype=bf, device=d))),
        "q two tokens": ("q", dict(q=torch.randn(B, 2, H, K, dtype=bf, device=d))),
        "k heads": ("k", dict(k=torch.randn(B, 1, 2 * H, K, dtype=bf, device=d))),
        "v batch": ("v", dict(v=torch.randn(B + 1, 1, HV, V, dtype=bf, device=d))),
        "v dtype": ("v", dict(v=torch.randn(B, 1, HV, V, dtype=torch.float16, device=d))),
        "a dtype": ("a", dict(a=torch.randn(B, 1, HV, device=d))),
        "dt_bias shape": ("dt_bias", dict(dt_bias=torch.randn(HV + 1, device=d))),
        "both gate sets": ("gate set", dict(g=torch.randn(B, 1, HV, device=d), beta=torch.rand(B, 1, HV, device=d))),
        "state noncontiguous": ("state", dict(state=torch.randn(2 * POOL, HV, V, K, device=d)[::2])),
        "state on cpu": ("state", dict(state=torch.randn(POOL, HV, V, K))),
        "indices int64": ("state_indices", dict(state_indices=torch.arange(B, device=d))),
        "indices noncontiguous": ("state_indices", dict(state_indices=torch.arange(2 * B, dtype=torch.int32, device=d)[::2])),
        "indices length": ("state_indices", dict(state_indices=torch.arange(B + 1, dtype=torch.int32, device=d))),
        "out dtype": ("out", dict(out=torch.empty(B, 1, HV, V, dtype=torch.float16, device=d))),
        "out shape": ("out", dict(out=torch.empty(B, 1, HV, V + 16, dtype=bf, device=d))),
    }


BAD_CASES = ["q misaligned", "q stride", "q rank", "q two tokens", "k heads", "v batch", "v dtype", "a dtype",
             "dt_bias shape", "both gate sets", "state noncontiguous", "state on cpu", "indices int64",
             "indices noncontiguous", "indices length", "out dtype", "out shape"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_decode_bad_arguments_raise_before_any_write(case):
    torch.manual_seed(3)
    B = 4
    good = make_step_inputs(B, 1, 8, 16, 128, 128)
    pool = make_pool(POOL, 16, 128, 128, torch.float32)
    slots = torch.arange(B, dtype=torch.int32, device="cuda")
    cute_gdn.decode(**good, state=pool.clone(), state_indices=slots)  # the valid signature is loaded
    name, override = _bad_cases(B)[case]
    kwargs = {**good, "state": pool, "state_indices": slots, **override}
    before = pool.clone()
    with pytest.raises((ValueError, TypeError), match=name):
        cute_gdn.decode(**kwargs)
    torch.cuda.synchronize()
    assert torch.equal(pool, before)



@pytest.mark.parametrize("state,tile", STAGING_CASES)
def test_decode_smem_staging_matches_register_path(state, tile):
    """The cp.async shared-memory staging of the state tile computes the register path's results
    (padding and GVA included): o bit-identical, the state to within one ulp of its dtype (the two
    paths may contract decay * s + u * k into an FMA differently)."""
    torch.manual_seed(5)
    B, H, HV, K, V = 7, 4, 16, 128, 128
    s = make_step_inputs(B, 1, H, HV, K, V)
    pool = make_pool(POOL, HV, V, K, TORCH_DTYPES[state])
    slots = torch.randperm(POOL, device="cuda")[:B].to(torch.int32)
    slots[2] = -1
    results = []
    for staged in (False, True):
        base = _keys(H, HV, K, V, state=state)[0].kwargs
        fn = default_cache().get(decode_key(**{**base, "config": DecodeConfig(*tile, staged)}))
        p = pool.clone()
        o = torch.full((B, 1, HV, V), float("nan"), device="cuda", dtype=torch.bfloat16)
        fn(s["q"], s["k"], s["v"], s["a"], s["b"], s["A_log"], s["dt_bias"], p, slots, o, K ** -0.5)
        results.append((o, p))
    torch.cuda.synchronize()
    assert not torch.isnan(results[1][0]).any()
    assert torch.equal(results[0][0], results[1][0])
    ulp = torch.finfo(TORCH_DTYPES[state]).eps
    torch.testing.assert_close(results[1][1].float(), results[0][1].float(), rtol=ulp, atol=1e-6)
