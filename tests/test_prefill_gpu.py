"""Prefill on an sm_90 GPU: against the fp64 reference (chunked and recurrent) and FLA's chunked
Triton kernels; varlen batches, long sequences, initial states, padding, untouched slots, gate
extremes, variants, CUDA-graph replay, bad arguments and the serving surface."""

import os

import pytest
import torch

import cute_gdn
from cute_gdn import ops, reference
from cute_gdn.kernels.prefill import CHAIN_FOLDED
from cute_gdn.ops import prefill_key
from gdn_inputs import TORCH_DTYPES, make_pool, make_step_inputs, rel_rms

pytestmark = pytest.mark.gpu

POOL = 40
MIXED = [1, 2, 63, 64, 65, 127, 1000]
# The kernel multiplies bf16 operands on tensor cores (as FLA and FlashInfer do): its error against
# the fp64 reference is of the order of bf16 rounding, not of an fp32 computation.
TOL_O, TOL_S = 1.5e-2, 1.5e-2

VARIANT_CASES = [  # io, state, gates, dt_bias, l2norm
    ("float16", "float32", "raw", "float32", True),
    ("bfloat16", "float32", "raw", "bfloat16", True),
    ("bfloat16", "bfloat16", "precomputed", None, True),
    ("bfloat16", "float32", "precomputed", None, False),
    ("float16", "bfloat16", "raw", "bfloat16", False),
]


def _key(H, HV, io="bfloat16", state="float32", gates="raw", bias="float32", l2norm=True):
    return prefill_key(io_dtype=io, state_dtype=state, num_heads=H, num_v_heads=HV, head_k_dim=128,
                       head_v_dim=128, pool_size=POOL, gate_mode=gates, dt_bias_dtype=bias if gates == "raw" else None,
                       use_qk_l2norm=l2norm)


def gpu_kernel_keys() -> list:
    """Every kernel this module runs; conftest compiles the whole run's set at once, in parallel."""
    keys = {_key(2, 4), _key(2, 4, state="bfloat16"), _key(16, 32), _key(4, 4), _key(1, 4), _key(8, 16),
            _key(1, 4, state="bfloat16")}
    keys |= {_key(2, 4, io, st, gm, bias or "float32", l2) for io, st, gm, bias, l2 in VARIANT_CASES}
    return sorted(keys, key=lambda k: k.name)


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")


def _run(lengths, H=2, HV=4, *, io="bfloat16", state="float32", gates="raw", bias="float32", l2norm=True,
         has_init=None, pad=(), seed=0, decay="moderate", packed=False):
    torch.manual_seed(seed)
    inputs = make_step_inputs(1, sum(lengths), H, HV, 128, 128, io_dtype=TORCH_DTYPES[io], gates=gates,
                              bias_dtype=TORCH_DTYPES[bias], decay=decay, packed=packed)
    if not l2norm:
        # A model without the in-kernel L2 norm feeds unit-norm keys (the delta rule diverges
        # otherwise, in any precision): normalize q and k here.
        for name in ("q", "k"):
            x = inputs[name]
            inputs[name] = (x.float() / x.float().norm(dim=-1, keepdim=True)).to(x.dtype)
    pool = make_pool(POOL, HV, 128, 128, TORCH_DTYPES[state])
    N = len(lengths)
    cu = _cu(lengths)
    slots = torch.randperm(POOL, device="cuda")[:N].to(torch.int32)
    for i in pad:
        slots[i] = -1
    init = None if has_init is None else torch.tensor(has_init, dtype=torch.bool, device="cuda")
    before = pool.clone()
    scale = 0.9 * 128 ** -0.5
    o = cute_gdn.prefill(**inputs, cu_seqlens=cu, state=pool, state_indices=slots, has_initial_state=init,
                         scale=scale, use_qk_l2norm=l2norm)
    torch.cuda.synchronize()
    ref_o, ref_pool = reference.prefill(**inputs, cu_seqlens=cu, state=before.double(), state_indices=slots,
                                        has_initial_state=init, scale=scale, use_qk_l2norm=l2norm)
    live = slots >= 0
    named = slots[live].long()
    assert torch.isfinite(o.float()).all()
    tokens_live = torch.zeros(o.shape[1], dtype=torch.bool, device="cuda")
    for n in range(N):
        if slots[n] >= 0:
            tokens_live[int(cu[n]):int(cu[n + 1])] = True
    assert torch.equal(o[0, ~tokens_live], torch.zeros_like(o[0, ~tokens_live])), "padded rows must be zero"
    if tokens_live.any():
        err_o = rel_rms(o[0, tokens_live], ref_o[0, tokens_live])
        assert err_o < TOL_O, err_o
    if named.numel():
        err_s = rel_rms(pool[named], ref_pool[named])
        assert err_s < TOL_S, err_s
    untouched = torch.ones(POOL, dtype=torch.bool, device="cuda")
    untouched[named] = False
    assert torch.equal(pool[untouched], before[untouched]), "slots not named must be bit-identical"
    return inputs, o, pool, before, cu, slots, init


@pytest.mark.parametrize("state", ["float32", "bfloat16"])
def test_prefill_mixed_lengths_with_and_without_initial_states(state):
    _run(MIXED, state=state, has_init=[True, False, True, True, False, True, False], pad=(3,))


def test_prefill_mixed_lengths_qwen3_next_heads():
    _run(MIXED, H=16, HV=32)


@pytest.mark.parametrize("io,state,gates,bias,l2norm", VARIANT_CASES)
def test_prefill_variants(io, state, gates, bias, l2norm):
    _run([5, 64, 130], io=io, state=state, gates=gates, bias=bias or "float32", l2norm=l2norm, pad=(0,))


@pytest.mark.parametrize("H,HV", [(4, 4), (1, 4)])  # GVA ratio 1 and 4
def test_prefill_gva(H, HV):
    _run([70, 33], H=H, HV=HV)


@pytest.mark.parametrize("length", [8192, 32768])
def test_prefill_long_single_sequence(length):
    _run([length], seed=1)


CP_CASES = [  # length, H, HV, state, has_init, pad, decay
    (5000, 2, 4, "float32", [False], (), "moderate"),   # 4 pieces, a partial last chunk, zero start
    (8192, 8, 16, "float32", None, (), "moderate"),     # 3 pieces, the benchmark's heads
    (3100, 1, 4, "bfloat16", None, (), "strong"),       # 3 pieces, bf16 pool, strong decay
    (4000, 2, 4, "float32", None, (0,), "tiny"),        # padding: zero output, no state touched
]


@pytest.mark.parametrize("length,H,HV,state,has_init,pad,decay", CP_CASES)
def test_prefill_context_parallel(length, H, HV, state, has_init, pad, decay):
    # One long sequence with few heads runs in pieces (kernels/prefill.cp_pieces): maps, scan, pieces.
    plan = ops.plan_prefill(1, length, HV, 128, 128, ops.sm_count(torch.device("cuda")))
    assert plan.pieces >= 3
    _run([length], H=H, HV=HV, state=state, has_init=has_init, pad=pad, decay=decay, seed=7)


def test_prefill_context_parallel_and_whole_agree_and_a_bad_plan_writes_nothing():
    # The plan a caller passes picks the path: the same call whole (context_parallel=False) agrees with the
    # pieces to rounding; a plan the kernels cannot run raises before any write.
    torch.manual_seed(12)
    T, H, HV = 4500, 2, 4
    inputs = make_step_inputs(1, T, H, HV, 128, 128)
    pool0 = make_pool(POOL, HV, 128, 128, torch.float32)
    slots = torch.tensor([5], dtype=torch.int32, device="cuda")
    cu = _cu([T])
    sms = ops.sm_count(torch.device("cuda"))
    outs = []
    for cp in (True, False):
        plan = ops.plan_prefill(1, T, HV, 128, 128, sms, context_parallel=cp)
        assert bool(plan.pieces) == cp
        pool = pool0.clone()
        outs.append((cute_gdn.prefill(**inputs, cu_seqlens=cu, state=pool, state_indices=slots, plan=plan), pool))
    (o_cp, pool_cp), (o_whole, pool_whole) = outs
    assert rel_rms(o_cp, o_whole) < 1e-3 and rel_rms(pool_cp[5], pool_whole[5]) < 1e-4
    assert torch.equal(pool_cp[torch.arange(POOL) != 5], pool0[torch.arange(POOL) != 5])
    pool = pool0.clone()
    o = torch.zeros_like(o_cp)
    bad = ops.plan_prefill(1, T, HV, 128, 128, sms)._replace(cp_step=100)
    with pytest.raises(ValueError, match="plan.cp_step"):
        cute_gdn.prefill(**inputs, cu_seqlens=cu, state=pool, state_indices=slots, plan=bad, out=o)
    assert torch.equal(pool, pool0) and not o.any()


def test_prefill_context_parallel_scan_ignores_torch_tf32():
    # The pieces' scan runs in the kernel's own fp32 FMAs: torch's matmul precision changes no bit.
    torch.manual_seed(13)
    T, H, HV = 4500, 2, 4
    assert ops.plan_prefill(1, T, HV, 128, 128, ops.sm_count(torch.device("cuda"))).pieces >= 4
    inputs = make_step_inputs(1, T, H, HV, 128, 128)
    pool0 = make_pool(POOL, HV, 128, 128, torch.float32)
    slots = torch.tensor([3], dtype=torch.int32, device="cuda")
    results = []
    before = torch.get_float32_matmul_precision()
    try:
        for precision in ("highest", "high"):
            torch.set_float32_matmul_precision(precision)
            pool = pool0.clone()
            results.append((cute_gdn.prefill(**inputs, cu_seqlens=_cu([T]), state=pool, state_indices=slots), pool))
    finally:
        torch.set_float32_matmul_precision(before)
    (o1, p1), (o2, p2) = results
    assert torch.equal(o1, o2) and torch.equal(p1, p2)


def test_prefill_context_parallel_graph_replay_matches_eager():
    assert ops.plan_prefill(1, 4500, 4, 128, 128, ops.sm_count(torch.device("cuda"))).pieces >= 3
    _graph_replays_match_eager([4500], [11], seed=8)


@pytest.mark.parametrize("decay", ["tiny", "strong"])
def test_prefill_gate_extremes(decay):
    _run([200, 1, 64], decay=decay)


def test_prefill_packed_views_are_read_in_place():
    inputs, *_ = _run([100, 29], packed=True)
    assert not inputs["q"].is_contiguous()


def test_prefill_all_padding_and_empty_sequences():
    """Padded sequences write zero rows and touch no state; a zero-length sequence writes back its
    initial state (zeros where has_initial_state is False)."""
    _run([10, 20], pad=(0, 1))
    _, _, pool, before, _, slots, _ = _run([0, 17, 0], has_init=[True, True, False])
    assert torch.equal(pool[slots[0].long()], before[slots[0].long()])
    assert torch.equal(pool[slots[2].long()], torch.zeros_like(pool[slots[2].long()]))


def test_prefill_matches_the_recurrent_reference():
    torch.manual_seed(2)
    lengths = [3, 66]
    inputs = make_step_inputs(1, sum(lengths), 2, 4, 128, 128)
    pool = make_pool(POOL, 4, 128, 128, torch.float32)
    slots = torch.tensor([5, 9], dtype=torch.int32, device="cuda")
    before = pool.clone()
    o = cute_gdn.prefill(**inputs, cu_seqlens=_cu(lengths), state=pool, state_indices=slots)
    ref_o, ref_pool = reference.prefill(**inputs, cu_seqlens=_cu(lengths), state=before.double(),
                                        state_indices=slots, chunked=False)
    assert rel_rms(o, ref_o) < TOL_O and rel_rms(pool[slots.long()], ref_pool[slots.long()]) < TOL_S


def test_prefill_matches_fla_chunked():
    fla = pytest.importorskip("fla.ops.gated_delta_rule")
    torch.manual_seed(3)
    lengths = MIXED
    H, HV = 16, 32
    inputs = make_step_inputs(1, sum(lengths), H, HV, 128, 128)
    pool = make_pool(POOL, HV, 128, 128, torch.float32)
    slots = torch.randperm(POOL, device="cuda")[:len(lengths)].to(torch.int32)
    before = pool.clone()
    init = pool[slots.long()].clone()
    cu = _cu(lengths)
    o = cute_gdn.prefill(**inputs, cu_seqlens=cu, state=pool, state_indices=slots)
    g, beta = reference.compute_gates(inputs["a"], inputs["b"], inputs["A_log"], inputs["dt_bias"],
                                      dtype=torch.float32)
    fla_o, fla_state = fla.chunk_gated_delta_rule(
        inputs["q"], inputs["k"], inputs["v"], g=g, beta=beta, scale=128 ** -0.5, initial_state=init,
        output_final_state=True, use_qk_l2norm_in_kernel=True, state_v_first=True, cu_seqlens=cu.long())
    ref_o, ref_pool = reference.prefill(**inputs, cu_seqlens=cu, state=before.double(), state_indices=slots)
    err_ours = rel_rms(o, ref_o)
    err_fla = rel_rms(fla_o, ref_o)
    assert rel_rms(o, fla_o) < 2e-2
    assert err_ours <= 1.5 * err_fla + 2e-3, (err_ours, err_fla)
    err_s = rel_rms(pool[slots.long()], ref_pool[slots.long()])
    err_s_fla = rel_rms(fla_state, ref_pool[slots.long()])
    assert err_s <= 1.5 * err_s_fla + 2e-3, (err_s, err_s_fla)


def _graph_replays_match_eager(lengths, slots, seed):
    """A prefill call captured in a CUDA graph and replayed twice (the second replay starts from
    re-zeroed chunk flags, like the first) gives the eager call's output and pool bit for bit."""
    torch.manual_seed(seed)
    inputs = make_step_inputs(1, sum(lengths), 2, 4, 128, 128)
    pool0 = make_pool(POOL, 4, 128, 128, torch.float32)
    slots = torch.tensor(slots, dtype=torch.int32, device="cuda")
    cu = _cu(lengths)
    eager_pool = pool0.clone()
    eager_o = cute_gdn.prefill(**inputs, cu_seqlens=cu, state=eager_pool, state_indices=slots)
    graph_pool = pool0.clone()
    out = torch.empty_like(eager_o)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cute_gdn.prefill(**inputs, cu_seqlens=cu, state=graph_pool, state_indices=slots, out=out)
    for _ in range(2):
        graph_pool.copy_(pool0)
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager_o) and torch.equal(graph_pool, eager_pool)


def test_prefill_cuda_graph_replay_matches_eager():
    _graph_replays_match_eager([65, 3, 130], [7, -1, 2], seed=4)


def test_prefill_overlapped_and_serial_launches_agree_bitwise():
    # ops.prefill runs few-sequence calls as two concurrent kernels (the chain waits on per-chunk
    # flags, kernels/prefill.use_overlap); one after the other on one stream they must give the same bits.
    torch.manual_seed(6)
    lengths = [300, 1, 64, 5000]
    H, HV, N, T = 2, 4, 4, 5365
    plan = ops.plan_prefill(N, T, HV, 128, 128, ops.sm_count(torch.device("cuda")))
    assert plan.overlap and plan.chain == CHAIN_FOLDED
    inputs = make_step_inputs(1, T, H, HV, 128, 128)
    pool0 = make_pool(POOL, HV, 128, 128, torch.float32)
    slots = torch.randperm(POOL, device="cuda")[:N].to(torch.int32)
    cu = _cu(lengths)
    scale = 128 ** -0.5
    pool_a = pool0.clone()
    o_a = cute_gdn.prefill(**inputs, cu_seqlens=cu, state=pool_a, state_indices=slots, scale=scale)
    pool_b = pool0.clone()
    o_b = cute_gdn.prefill(**inputs, cu_seqlens=cu, state=pool_b, state_indices=slots, scale=scale,
                           out=torch.full_like(o_a, float("nan")), plan=plan._replace(overlap=False))
    torch.cuda.synchronize()
    assert torch.equal(o_a, o_b) and torch.equal(pool_a, pool_b)


BAD_CASES = ["q batch", "k tokens", "v misaligned", "a dtype", "cu_seqlens int64", "indices length",
             "has_initial_state dtype", "state shape", "out shape"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_prefill_bad_arguments_raise_before_any_write(case):
    torch.manual_seed(5)
    lengths = [10, 20]
    T = sum(lengths)
    good = make_step_inputs(1, T, 2, 4, 128, 128)
    pool = make_pool(POOL, 4, 128, 128, torch.float32)
    slots = torch.tensor([1, 2], dtype=torch.int32, device="cuda")
    cu = _cu(lengths)
    cute_gdn.prefill(**good, cu_seqlens=cu, state=pool.clone(), state_indices=slots)  # signature loaded
    bf = torch.bfloat16
    name, override = {
        "q batch": ("q", dict(q=torch.randn(2, T, 2, 128, dtype=bf, device="cuda"))),
        "k tokens": ("k", dict(k=torch.randn(1, T + 1, 2, 128, dtype=bf, device="cuda"))),
        "v misaligned": ("v", dict(v=torch.randn(1, T, 4, 136, dtype=bf, device="cuda")[..., 1:129])),
        "a dtype": ("a", dict(a=torch.randn(1, T, 4, device="cuda"))),
        "cu_seqlens int64": ("cu_seqlens", dict(cu_seqlens=cu.long())),
        "indices length": ("state_indices", dict(state_indices=slots[:1])),
        "has_initial_state dtype": ("has_initial_state",
                                    dict(has_initial_state=torch.ones(2, dtype=torch.int32, device="cuda"))),
        "state shape": ("state", dict(state=torch.zeros(POOL, 4, 128, 64, device="cuda"))),
        "out shape": ("out", dict(out=torch.empty(1, T, 4, 64, dtype=bf, device="cuda"))),
    }[case]
    kwargs = {**good, "cu_seqlens": cu, "state": pool, "state_indices": slots, **override}
    before = kwargs["state"].clone()
    with pytest.raises((ValueError, TypeError), match=name):
        cute_gdn.prefill(**kwargs)
    torch.cuda.synchronize()
    assert torch.equal(kwargs["state"], before)


def test_serving_surface_extend(tmp_path):
    """GDNKernels.warmup covers prefill; forward("extend") then runs without compiling."""
    torch.manual_seed(6)
    kernels = cute_gdn.GDNKernels(2, 4, 128, 128, pool_size=POOL, cache_dir=tmp_path).warmup()
    compiles = kernels.cache.compiles
    lengths = [40, 90]
    inputs = make_step_inputs(1, sum(lengths), 2, 4, 128, 128)
    pool = make_pool(POOL, 4, 128, 128, torch.float32)
    slots = torch.tensor([3, 11], dtype=torch.int32, device="cuda")
    before = pool.clone()
    o = kernels.forward("extend", **inputs, cu_seqlens=_cu(lengths), state=pool, state_indices=slots)
    ref_o, _ = reference.prefill(**inputs, cu_seqlens=_cu(lengths), state=before.double(), state_indices=slots)
    torch.cuda.synchronize()
    assert rel_rms(o, ref_o) < TOL_O
    assert kernels.cache.compiles == compiles
