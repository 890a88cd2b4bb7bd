"""Verify and commit on an sm_90 GPU: against the fp64 reference, against FLA's Triton recurrence run
prefix by prefix, padding, permuted slots and cache slots, untouched pool and cache bit-identical,
strided views, multi-layer commit, CUDA-graph replay and bad arguments."""

import os

import pytest
import torch

import cute_gdn
from cute_gdn import reference
from cute_gdn.cache import default_cache
from cute_gdn.ops import commit_key, verify_keys
from gdn_inputs import SHAPE_CASES, TORCH_DTYPES, make_pool, make_step_inputs, rel_rms

pytestmark = pytest.mark.gpu

POOL = 96

VARIANT_CASES = [
    ("bfloat16", "float32", "raw", "float32", True),
    ("bfloat16", "bfloat16", "raw", "float32", True),
    ("float16", "float32", "raw", "bfloat16", True),
    ("float16", "bfloat16", "precomputed", None, True),
    ("bfloat16", "float32", "precomputed", None, False),
    ("bfloat16", "bfloat16", "raw", "bfloat16", False),
]
TOKEN_CASES = [(1, 1), (2, 2), (3, 4), (4, 4), (8, 8)]  # (T, cache_steps)


def _vkeys(H, HV, K, V, T, steps, io="bfloat16", state="float32", gates="raw", bias="float32", l2norm=True):
    """The small- and the large-batch tile (calls pick one by B * HV)."""
    return verify_keys(io_dtype=io, state_dtype=state, num_heads=H, num_v_heads=HV, head_k_dim=K, head_v_dim=V,
                      pool_size=POOL, num_tokens=T, cache_steps=steps, gate_mode=gates,
                      dt_bias_dtype=bias if gates == "raw" else None, use_qk_l2norm=l2norm)


def _ckeys(HV, K, V, steps, state):
    return [commit_key(state_dtype=state, num_v_heads=HV, head_k_dim=K, head_v_dim=V, pool_size=POOL,
                       cache_steps=steps, layers=layers) for layers in ("tensor", "table")]


def gpu_kernel_keys() -> list:
    """Every kernel this module runs; conftest compiles the whole run's set at once, in parallel."""
    keys = set()
    for state in ("float32", "bfloat16"):
        for T, steps in TOKEN_CASES:
            keys |= set(_vkeys(16, 32, 128, 128, T, steps, state=state))
            keys |= set(_ckeys(32, 128, 128, steps, state))
    for io, st, gm, bias, l2 in VARIANT_CASES:
        keys |= set(_vkeys(8, 16, 128, 128, 4, 4, io=io, state=st, gates=gm, bias=bias or "float32", l2norm=l2))
        keys |= set(_ckeys(16, 128, 128, 4, st))
    for H, HV, K, V, st in SHAPE_CASES:
        keys |= set(_vkeys(H, HV, K, V, 3, 3, state=st))
        keys |= set(_ckeys(HV, K, V, 3, st))
    return sorted(keys, key=lambda k: k.name)


def _setup(B, T, steps, H, HV, K, V, *, io="bfloat16", state="float32", gates="raw", bias="float32",
           packed=False, pad=(), decay="moderate", identity_cache=False, seed=0):
    torch.manual_seed(seed)
    io_dtype, state_dtype = TORCH_DTYPES[io], TORCH_DTYPES[state]
    inputs = make_step_inputs(B, T, H, HV, K, V, io_dtype=io_dtype, gates=gates, bias_dtype=TORCH_DTYPES[bias],
                              packed=packed, decay=decay)
    pool = make_pool(POOL, HV, V, K, state_dtype)
    cache_slots = B if identity_cache else B + 3
    cache = (torch.randn(cache_slots, steps, HV, V, K, device="cuda") * 0.5).to(state_dtype)
    slots = torch.randperm(POOL, device="cuda")[:B].to(torch.int32)
    cache_idx = None if identity_cache else torch.randperm(cache_slots, device="cuda")[:B].to(torch.int32)
    for i in pad:
        slots[i] = -1
        if cache_idx is not None:
            cache_idx[i] = -7  # ignored for a padded row
    return inputs, pool, cache, slots, cache_idx


def _run_and_check(B, T, steps, H, HV, K, V, *, l2norm=True, **kw):
    inputs, pool, cache, slots, cache_idx = _setup(B, T, steps, H, HV, K, V, **kw)
    io_dtype = inputs["q"].dtype
    pool0, cache0 = pool.clone(), cache.clone()
    scale = 0.8 * K ** -0.5
    o = cute_gdn.verify(**inputs, state=pool, state_indices=slots, cache=cache, cache_indices=cache_idx,
                        scale=scale, use_qk_l2norm=l2norm)
    torch.cuda.synchronize()
    assert torch.equal(pool, pool0), "verify must not write the state pool"

    ref_o, ref_cache = reference.verify(**inputs, state=pool0.double(), state_indices=slots, cache=cache0.double(),
                                        cache_indices=cache_idx, scale=scale, use_qk_l2norm=l2norm,
                                        dtype=torch.float64)
    r32_o, r32_cache = reference.verify(**inputs, state=pool0, state_indices=slots, cache=cache0,
                                        cache_indices=cache_idx, scale=scale, use_qk_l2norm=l2norm,
                                        dtype=torch.float32)
    live = slots >= 0
    cidx = (torch.arange(B, device="cuda") if cache_idx is None else cache_idx.long())[live]
    assert torch.isfinite(o.float()).all()
    assert torch.equal(o[~live], torch.zeros_like(o[~live])), "padded rows must be zero"
    if live.any():
        err_o = rel_rms(o[live], ref_o[live])
        err_o32 = rel_rms(r32_o.to(io_dtype)[live], ref_o[live])
        assert err_o <= 2 * err_o32 + 2e-3, (err_o, err_o32)
        for t in range(T):  # every cached step
            err_c = rel_rms(cache[cidx, t], ref_cache[cidx, t])
            err_c32 = rel_rms(r32_cache[cidx, t], ref_cache[cidx, t])
            assert err_c <= 2 * err_c32 + 1e-5, (t, err_c, err_c32)
    written = torch.zeros(cache.shape[:2], dtype=torch.bool, device="cuda")
    written[cidx, :T] = True
    assert torch.equal(cache[~written], cache0[~written]), "cache entries not named must be bit-identical"
    return inputs, pool, cache, slots, cache_idx, o


def _commit_and_check(pool, cache, slots, cache_idx, T, seed=0):
    """Commit random accepted counts 0..T and compare with the reference (a copy: bit-exact)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    B = slots.shape[0]
    accepted = torch.randint(0, T + 1, (B,), device="cuda", dtype=torch.int32, generator=g)
    accepted[0] = T
    if B > 1:
        accepted[1] = 0
    expected = reference.commit(pool, slots, cache, cache_idx, accepted)
    cute_gdn.commit(pool, slots, cache, cache_idx, accepted)
    torch.cuda.synchronize()
    assert torch.equal(pool, expected)
    return accepted


@pytest.mark.parametrize("state", ["float32", "bfloat16"])
@pytest.mark.parametrize("T,steps", TOKEN_CASES)
def test_verify_qwen3_next_shape_and_commit(state, T, steps):
    B = 11
    _, pool, cache, slots, cache_idx, _ = _run_and_check(B, T, steps, 16, 32, 128, 128, state=state, pad=(4,))
    _commit_and_check(pool, cache, slots, cache_idx, T)


@pytest.mark.parametrize("B", [9, 40])  # B * HV = 144 and 640: the small- and the large-batch tile
@pytest.mark.parametrize("io,state,gates,bias,l2norm", VARIANT_CASES)
def test_verify_variants(io, state, gates, bias, l2norm, B):
    _, pool, cache, slots, cache_idx, _ = _run_and_check(
        B, 4, 4, 8, 16, 128, 128, io=io, state=state, gates=gates, bias=bias or "float32", l2norm=l2norm, pad=(0, 5))
    _commit_and_check(pool, cache, slots, cache_idx, 4, seed=1)


@pytest.mark.parametrize("H,HV,K,V,state", SHAPE_CASES)
def test_verify_shapes(H, HV, K, V, state):
    _, pool, cache, slots, cache_idx, _ = _run_and_check(5, 3, 3, H, HV, K, V, state=state, pad=(3,))
    _commit_and_check(pool, cache, slots, cache_idx, 3, seed=2)


def test_verify_large_batch_default_cache_indices():
    _, pool, cache, slots, _, _ = _run_and_check(90, 4, 4, 16, 32, 128, 128, identity_cache=True, pad=(7, 89))
    _commit_and_check(pool, cache, slots, None, 4, seed=3)


def test_verify_packed_views_are_read_in_place():
    inputs, *_ = _run_and_check(6, 4, 4, 16, 32, 128, 128, packed=True, pad=(1,))
    assert not inputs["q"].is_contiguous()


@pytest.mark.parametrize("decay", ["tiny", "strong"])
def test_verify_gate_extremes(decay):
    _run_and_check(5, 8, 8, 16, 32, 128, 128, decay=decay)


def test_verify_all_padding_writes_nothing():
    _run_and_check(4, 4, 4, 8, 16, 128, 128, pad=(0, 1, 2, 3))


@pytest.mark.parametrize("state", ["float32", "bfloat16"])
def test_verify_matches_fla_prefix_by_prefix(state):
    """FLA's fused_recurrent_gated_delta_rule on each prefix t = 1..T: its final state is the state
    after token t, which verify caches at step t - 1; its outputs are verify's first t outputs."""
    fla = pytest.importorskip("fla.ops.gated_delta_rule")
    torch.manual_seed(1)
    B, T, H, HV, K, V = 12, 4, 16, 32, 128, 128
    inputs, pool, cache, slots, cache_idx = _setup(B, T, 4, H, HV, K, V, state=state)
    o = cute_gdn.verify(**inputs, state=pool, state_indices=slots, cache=cache, cache_indices=cache_idx)
    g, beta = reference.compute_gates(inputs["a"], inputs["b"], inputs["A_log"], inputs["dt_bias"],
                                      dtype=torch.float32)
    init = pool[slots.long()].float()
    tol = 1e-5 if state == "float32" else 1e-2
    for t in range(1, T + 1):
        fla_o, fla_state = fla.fused_recurrent_gated_delta_rule(
            inputs["q"][:, :t], inputs["k"][:, :t], inputs["v"][:, :t], g=g[:, :t], beta=beta[:, :t],
            scale=K ** -0.5, initial_state=init, output_final_state=True, use_qk_l2norm_in_kernel=True,
            state_v_first=True)
        assert rel_rms(o[:, :t], fla_o) < 1e-2, t
        assert rel_rms(cache[cache_idx.long(), t - 1].float(), fla_state) < tol, t


@pytest.mark.parametrize("state", ["float32", "bfloat16"])
def test_verify_and_commit_cuda_graph_replay_matches_eager(state):
    B, T = 16, 4
    inputs, pool0, cache0, slots, cache_idx = _setup(B, T, 4, 16, 32, 128, 128, state=state, pad=(3,), seed=2)
    accepted = torch.randint(0, T + 1, (B,), device="cuda", dtype=torch.int32)
    eager_pool, eager_cache = pool0.clone(), cache0.clone()
    eager_o = cute_gdn.verify(**inputs, state=eager_pool, state_indices=slots, cache=eager_cache,
                              cache_indices=cache_idx)
    cute_gdn.commit(eager_pool, slots, eager_cache, cache_idx, accepted)
    graph_pool, graph_cache = pool0.clone(), cache0.clone()
    out = torch.empty_like(eager_o)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        cute_gdn.verify(**inputs, state=graph_pool, state_indices=slots, cache=graph_cache, cache_indices=cache_idx,
                        out=out)
        cute_gdn.commit(graph_pool, slots, graph_cache, cache_idx, accepted)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager_o)
    assert torch.equal(graph_cache, eager_cache)
    assert torch.equal(graph_pool, eager_pool)


@pytest.mark.parametrize("state", ["float32", "bfloat16"])
@pytest.mark.parametrize("stacked", [False, True])
def test_commit_layers_matches_per_layer_commit(state, stacked):
    torch.manual_seed(4)
    L, B, steps, HV, K, V = 5, 10, 4, 32, 128, 128
    dtype = TORCH_DTYPES[state]
    if stacked:  # one allocation for all layers (SGLang's MambaPool layout)
        states = make_pool(L * POOL, HV, V, K, dtype).view(L, POOL, HV, V, K)
        caches = (torch.randn(L, B + 2, steps, HV, V, K, device="cuda") * 0.5).to(dtype)
    else:  # a separate allocation per layer
        states = [make_pool(POOL, HV, V, K, dtype) for _ in range(L)]
        caches = [(torch.randn(B + 2, steps, HV, V, K, device="cuda") * 0.5).to(dtype) for _ in range(L)]
    table = cute_gdn.LayerTable(states, caches)
    slots = torch.randperm(POOL, device="cuda")[:B].to(torch.int32)
    slots[2] = -1
    cache_idx = torch.randperm(B + 2, device="cuda")[:B].to(torch.int32)
    accepted = torch.randint(0, steps + 1, (B,), device="cuda", dtype=torch.int32)
    accepted[0], accepted[1] = steps, 0
    expected = [reference.commit(table.states[i], slots, table.caches[i], cache_idx, accepted) for i in range(L)]
    cute_gdn.commit_layers(table, slots, cache_idx, accepted)
    torch.cuda.synchronize()
    for i in range(L):
        assert torch.equal(table.states[i], expected[i]), i


def test_serving_surface_target_verify_commit_and_forward(tmp_path):
    """GDNKernels with cache_steps: warmup covers verify for T = 1..cache_steps and commit; afterwards
    forward("target_verify") and commit run without compiling."""
    torch.manual_seed(6)
    H, HV, K, V, steps, B = 16, 32, 128, 128, 2, 6
    kernels = cute_gdn.GDNKernels(H, HV, K, V, pool_size=POOL, cache_steps=steps, cache_dir=tmp_path).warmup()
    compiles = kernels.cache.compiles
    pool = make_pool(POOL, HV, V, K, torch.float32)
    cache = torch.zeros(B, steps, HV, V, K, device="cuda")
    slots = torch.arange(B, dtype=torch.int32, device="cuda") * 3
    for T in (1, 2):
        inputs = make_step_inputs(B, T, H, HV, K, V)
        o = kernels.forward("target_verify", **inputs, state=pool, state_indices=slots, cache=cache)
        ref_o, _ = reference.verify(**inputs, state=pool, state_indices=slots, cache=cache.clone(),
                                    dtype=torch.float32)
        assert rel_rms(o, ref_o) < 1e-2
    accepted = torch.full((B,), 2, dtype=torch.int32, device="cuda")
    expected = reference.commit(pool, slots, cache, None, accepted)
    kernels.commit(pool, slots, cache, None, accepted)
    table = kernels.layer_table([pool], [cache])
    kernels.commit_layers(table, slots, None, accepted)
    torch.cuda.synchronize()
    assert torch.equal(pool, expected)
    assert kernels.cache.compiles == compiles  # nothing compiled after warmup
    with pytest.raises(ValueError, match="cache_steps"):
        kernels.target_verify(**inputs, state=pool, state_indices=slots, cache=torch.zeros(B, 3, HV, V, K, device="cuda"))


def _verify_bad_cases(B=4, T=4, H=8, HV=16, K=128, V=128):
    d = "cuda"
    bf = torch.bfloat16
    return {
        "T above cache_steps": ("cache_steps", make_step_inputs(B, T + 1, H, HV, K, V)),
        "k tokens": ("k", dict(k=torch.randn(B, T - 1, H, K, dtype=bf, device=d))),
        "v tokens": ("v", dict(v=torch.randn(B, T + 1, HV, V, dtype=bf, device=d))),
        "a tokens": ("a", dict(a=torch.randn(B, 1, HV, device=d).to(bf))),
        "cache dtype": ("cache", dict(cache=torch.zeros(B, T, HV, V, K, dtype=bf, device=d))),
        "cache heads": ("cache", dict(cache=torch.zeros(B, T, HV // 2, V, K, device=d))),
        "cache rank": ("cache", dict(cache=torch.zeros(B * T, HV, V, K, device=d))),
        "cache noncontiguous": ("cache", dict(cache=torch.zeros(2 * B, T, HV, V, K, device=d)[::2])),
        "cache_indices int64": ("cache_indices", dict(cache_indices=torch.arange(B, device=d))),
        "cache_indices length": ("cache_indices", dict(cache_indices=torch.arange(B + 1, dtype=torch.int32, device=d))),
        "state_indices length": ("state_indices", dict(state_indices=torch.arange(B - 1, dtype=torch.int32, device=d))),
        "out tokens": ("out", dict(out=torch.empty(B, 1, HV, V, dtype=bf, device=d))),
    }


VERIFY_BAD_CASES = ["T above cache_steps", "k tokens", "v tokens", "a tokens", "cache dtype", "cache heads",
                    "cache rank", "cache noncontiguous", "cache_indices int64", "cache_indices length",
                    "state_indices length", "out tokens"]


@pytest.mark.parametrize("case", VERIFY_BAD_CASES)
def test_verify_bad_arguments_raise_before_any_write(case):
    torch.manual_seed(3)
    B, T = 4, 4
    good = make_step_inputs(B, T, 8, 16, 128, 128)
    pool = make_pool(POOL, 16, 128, 128, torch.float32)
    cache = torch.zeros(B, T, 16, 128, 128, device="cuda")
    slots = torch.arange(B, dtype=torch.int32, device="cuda")
    cute_gdn.verify(**good, state=pool, state_indices=slots, cache=cache.clone())  # the valid signature is loaded
    name, override = _verify_bad_cases(B, T)[case]
    kwargs = {**good, "state": pool, "state_indices": slots, "cache": cache, **override}
    before_pool, before_cache = pool.clone(), kwargs["cache"].clone()
    with pytest.raises((ValueError, TypeError), match=name):
        cute_gdn.verify(**kwargs)
    torch.cuda.synchronize()
    assert torch.equal(pool, before_pool) and torch.equal(kwargs["cache"], before_cache)


@pytest.mark.parametrize("case", ["accepted int64", "accepted length", "cache_indices int64", "cache dtype",
                                  "cache shape", "state noncontiguous"])
def test_commit_bad_arguments_raise_before_any_write(case):
    B, T, HV, K, V = 4, 4, 16, 128, 128
    pool = make_pool(POOL, HV, V, K, torch.float32)
    cache = torch.randn(B, T, HV, V, K, device="cuda")
    slots = torch.arange(B, dtype=torch.int32, device="cuda")
    accepted = torch.full((B,), 2, dtype=torch.int32, device="cuda")
    cute_gdn.commit(pool.clone(), slots, cache, None, accepted)  # the valid signature is loaded
    args = dict(state=pool, state_indices=slots, cache=cache, cache_indices=None, accepted_steps=accepted)
    name, override = {
        "accepted int64": ("accepted_steps", dict(accepted_steps=accepted.long())),
        "accepted length": ("accepted_steps", dict(accepted_steps=accepted[:2])),
        "cache_indices int64": ("cache_indices", dict(cache_indices=torch.arange(B, device="cuda"))),
        "cache dtype": ("cache", dict(cache=cache.to(torch.bfloat16))),
        "cache shape": ("cache", dict(cache=torch.randn(B, T, HV, V, K // 2, device="cuda"))),
        "state noncontiguous": ("state", dict(state=torch.randn(2 * POOL, HV, V, K, device="cuda")[::2])),
    }[case]
    args.update(override)
    before = args["state"].clone()
    with pytest.raises((ValueError, TypeError), match=name):
        cute_gdn.commit(**args)
    torch.cuda.synchronize()
    assert torch.equal(args["state"], before)


@pytest.mark.parametrize("case", ["duplicate slots", "slot out of range", "negative cache index",
                                  "cache index out of range", "accepted above cache_steps"])
def test_debug_mode_checks_index_preconditions(case, monkeypatch):
    """CUTE_GDN_DEBUG=1 (here: the flag it sets) checks what is otherwise a caller precondition."""
    monkeypatch.setattr(cute_gdn._checks, "DEBUG", True)
    B, T = 4, 4
    inputs = make_step_inputs(B, T, 8, 16, 128, 128)
    pool = make_pool(POOL, 16, 128, 128, torch.float32)
    cache = torch.zeros(B, T, 16, 128, 128, device="cuda")
    slots = torch.arange(B, dtype=torch.int32, device="cuda")
    cidx = torch.arange(B, dtype=torch.int32, device="cuda")
    accepted = torch.ones(B, dtype=torch.int32, device="cuda")
    name = {"duplicate slots": "state_indices", "slot out of range": "state_indices",
            "negative cache index": "cache_indices", "cache index out of range": "cache_indices",
            "accepted above cache_steps": "accepted_steps"}[case]
    if case == "duplicate slots":
        slots[1] = slots[0]
    elif case == "slot out of range":
        slots[2] = POOL
    elif case == "negative cache index":
        cidx[3] = -1
    elif case == "cache index out of range":
        cidx[3] = B
    else:
        accepted[0] = T + 1
    before_pool, before_cache = pool.clone(), cache.clone()
    with pytest.raises(ValueError, match=name):
        if case == "accepted above cache_steps":
            cute_gdn.commit(pool, slots, cache, cidx, accepted)
        else:
            cute_gdn.verify(**inputs, state=pool, state_indices=slots, cache=cache, cache_indices=cidx)
    torch.cuda.synchronize()
    assert torch.equal(pool, before_pool) and torch.equal(cache, before_cache)
