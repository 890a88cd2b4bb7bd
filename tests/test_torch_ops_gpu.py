"""The registered ops (cute_gdn.torch_ops) compiled with torch.compile(fullgraph=True) on an sm_90 GPU:
outputs and states bit-identical to eager calls of cute_gdn.<op> on the same inputs (pools cloned first,
padding slots included), and again under CUDA-graph capture and replay of the compiled function.

Both the default inductor backend and aot_eager are run. aot_eager does not re-inplace the functionalized
ops, so they see copies of the pools (correct, but a copy per call): for commit_layers that means a new
LayerTable per call, which a capture cannot build, so its replay runs under inductor only.

One head config, one pool size and one cache_steps, so the module needs 9 kernels (precompiled at once
by the fixture): H = 2, HV = 4, K = V = 128, pool 16, fp32 pool, bf16 io, use_qk_l2norm on;
decode raw gates (fp32 dt_bias) and precomputed gates, each in both tiles; verify T = 3 of
cache_steps 4, raw gates (fp32 dt_bias), both tiles; commit (one layer, and LayerTable) at cache_steps 4;
prefill raw gates (fp32 dt_bias).
"""

import os

import pytest
import torch

import cute_gdn
from cute_gdn import torch_ops
from cute_gdn.cache import default_cache
from cute_gdn.ops import commit_key, decode_keys, prefill_key, verify_keys
from gdn_inputs import make_pool, make_step_inputs

pytestmark = pytest.mark.gpu

H, HV, K, V = 2, 4, 128, 128
POOL, STEPS, T_VERIFY = 16, 4, 3
BACKENDS = ("inductor", "aot_eager")
PROBLEM = dict(io_dtype="bfloat16", state_dtype="float32", num_heads=H, num_v_heads=HV, head_k_dim=K,
               head_v_dim=V, pool_size=POOL, use_qk_l2norm=True)


def gpu_kernel_keys() -> list:
    """Every kernel this module runs; conftest compiles the whole run's set at once, in parallel."""
    keys = [*decode_keys(gate_mode="raw", dt_bias_dtype="float32", **PROBLEM),
            *decode_keys(gate_mode="precomputed", dt_bias_dtype=None, **PROBLEM),
            *verify_keys(num_tokens=T_VERIFY, cache_steps=STEPS, gate_mode="raw", dt_bias_dtype="float32", **PROBLEM),
            prefill_key(gate_mode="raw", dt_bias_dtype="float32", **PROBLEM)]
    keys += [commit_key(state_dtype="float32", num_v_heads=HV, head_k_dim=K, head_v_dim=V, pool_size=POOL,
                        cache_steps=STEPS, layers=layers) for layers in ("tensor", "table")]
    return sorted(set(keys), key=lambda k: k.name)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _slots(values):
    return torch.tensor(values, dtype=torch.int32, device="cuda")


def _replay(compiled, *args):
    """Capture one call of the (already run, so compiled and warm) function in a CUDA graph, replay it
    once, and return what the captured call returned (filled by the replay)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = compiled(*args)
    graph.replay()
    torch.cuda.synchronize()
    return outs


def _same(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want), f"max |diff| {(got.float() - want.float()).abs().max().item()}"


# ---------------------------------------------------------------------------------------------- decode

@pytest.mark.parametrize("gates", ("raw", "precomputed"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_decode_matches_eager(backend, gates):
    """Two decode steps on one pool (the second writing a given out), with torch math around them."""
    B = 6
    x1 = make_step_inputs(B, 1, H, HV, K, V, gates=gates)
    x2 = make_step_inputs(B, 1, H, HV, K, V, gates=gates)
    slots = _slots([11, -1, 3, 0, 15, -1])  # permuted, two padding rows
    pool0 = make_pool(POOL, HV, V, K, torch.float32)

    def step(x1, x2, pool, slots, out):
        o1 = torch_ops.decode(**{**x1, "q": x1["q"] * 2}, state=pool, state_indices=slots)
        torch_ops.decode(**{**x2, "v": x2["v"] + o1}, state=pool, state_indices=slots, out=out)
        return o1, out * 2

    eager_pool, eager_out = pool0.clone(), torch.empty(B, 1, HV, V, device="cuda", dtype=torch.bfloat16)
    e1 = cute_gdn.decode(**{**x1, "q": x1["q"] * 2}, state=eager_pool, state_indices=slots)
    cute_gdn.decode(**{**x2, "v": x2["v"] + e1}, state=eager_pool, state_indices=slots, out=eager_out)
    assert not torch.equal(eager_pool, pool0)

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    pool, out = pool0.clone(), torch.empty_like(eager_out)
    o1, o2 = compiled(x1, x2, pool, slots, out)
    _same(o1, e1)
    _same(out, eager_out)
    _same(o2, eager_out * 2)
    _same(pool, eager_pool)

    graph_pool, graph_out = pool0.clone(), torch.empty_like(eager_out)
    o1, o2 = _replay(compiled, x1, x2, graph_pool, slots, graph_out)
    _same(o1, e1)
    _same(graph_out, eager_out)
    _same(graph_pool, eager_pool)


# ---------------------------------------------------------------------------------------------- verify + commit

@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_verify_and_commit_match_eager(backend):
    B = 5
    x = make_step_inputs(B, T_VERIFY, H, HV, K, V)
    slots = _slots([4, -1, 9, 0, 13])
    cache_idx = _slots([2, 0, 4, 1, 3])    # permuted cache slots; the padding row's is ignored
    accepted = _slots([3, 2, 0, 1, 2])     # 0 keeps the slot
    pool0 = make_pool(POOL, HV, V, K, torch.float32)
    cache0 = make_pool(B, STEPS * HV, V, K, torch.float32).view(B, STEPS, HV, V, K)

    def step(x, pool, slots, cache, cache_idx, accepted):
        o = torch_ops.verify(**x, state=pool, state_indices=slots, cache=cache, cache_indices=cache_idx)
        torch_ops.commit(pool, slots, cache, cache_idx, accepted)
        return o, o.float().square().sum(-1)

    eager_pool, eager_cache = pool0.clone(), cache0.clone()
    eo = cute_gdn.verify(**x, state=eager_pool, state_indices=slots, cache=eager_cache, cache_indices=cache_idx)
    cute_gdn.commit(eager_pool, slots, eager_cache, cache_idx, accepted)
    assert not torch.equal(eager_pool, pool0) and not torch.equal(eager_cache, cache0)

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    pool, cache = pool0.clone(), cache0.clone()
    o, _ = compiled(x, pool, slots, cache, cache_idx, accepted)
    _same(o, eo)
    _same(cache, eager_cache)
    _same(pool, eager_pool)

    graph_pool, graph_cache = pool0.clone(), cache0.clone()
    o, _ = _replay(compiled, x, graph_pool, slots, graph_cache, cache_idx, accepted)
    _same(o, eo)
    _same(graph_cache, eager_cache)
    _same(graph_pool, eager_pool)


# ---------------------------------------------------------------------------------------------- commit_layers

@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_commit_layers_matches_eager(backend):
    L, B = 3, 4
    slots = _slots([7, -1, 2, 12])
    cache_idx = _slots([1, 3, 0, 2])
    accepted = _slots([4, 1, 0, 2])
    states0 = [make_pool(POOL, HV, V, K, torch.float32) for _ in range(L)]
    caches = [make_pool(B, STEPS * HV, V, K, torch.float32).view(B, STEPS, HV, V, K) for _ in range(L)]

    def step(states, caches, slots, cache_idx, accepted):
        torch_ops.commit_layers(states, caches, slots, cache_idx, accepted.clamp(max=STEPS))
        return accepted * 2

    eager = [s.clone() for s in states0]
    cute_gdn.commit_layers(cute_gdn.LayerTable(eager, caches), slots, cache_idx, accepted)
    assert not torch.equal(eager[0], states0[0])

    torch_ops.clear_layer_tables()
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    states = [s.clone() for s in states0]
    for _ in range(2):  # the second call finds its table (inductor hands the op the caller's pools)
        compiled(states, caches, slots, cache_idx, accepted)
    for got, want in zip(states, eager):  # a commit is idempotent: twice gives the same pools
        _same(got, want)
    if backend == "aot_eager":
        torch_ops.clear_layer_tables()  # it built tables of the copies it made; no capture with those
        return
    assert len(torch_ops._TABLES) == 1

    graph_states = [s.clone() for s in states0]
    torch_ops.layer_table(graph_states, caches)  # built before the capture, as the rule says
    _replay(compiled, graph_states, caches, slots, cache_idx, accepted)
    for got, want in zip(graph_states, eager):
        _same(got, want)
    assert len(torch_ops._TABLES) == 2
    torch_ops.clear_layer_tables()


# ---------------------------------------------------------------------------------------------- prefill

@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_prefill_matches_eager(backend):
    lengths = (70, 0, 1, 129)  # across chunk boundaries, a zero-length and a one-token sequence
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    T = bounds[-1]
    x = make_step_inputs(1, T, H, HV, K, V)
    cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    slots = _slots([5, 8, -1, 1])
    init = torch.tensor([True, False, True, False], device="cuda")
    pool0 = make_pool(POOL, HV, V, K, torch.float32)

    def step(x, cu, pool, slots, init):
        o = torch_ops.prefill(**{**x, "k": x["k"] * 2}, cu_seqlens=cu, state=pool, state_indices=slots,
                              has_initial_state=init)
        return o, o[0, -1].float()

    eager_pool = pool0.clone()
    eo = cute_gdn.prefill(**{**x, "k": x["k"] * 2}, cu_seqlens=cu, state=eager_pool, state_indices=slots,
                          has_initial_state=init)
    assert not torch.equal(eager_pool, pool0)

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    pool = pool0.clone()
    o, last = compiled(x, cu, pool, slots, init)
    _same(o, eo)
    _same(last, eo[0, -1].float())
    _same(pool, eager_pool)

    graph_pool = pool0.clone()
    o, _ = _replay(compiled, x, cu, graph_pool, slots, init)
    _same(o, eo)
    _same(graph_pool, eager_pool)
