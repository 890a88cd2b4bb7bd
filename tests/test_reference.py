"""The reference against itself: the chunked form equals the recurrence, and the serving ops
(prefill, decode, verify, commit) are the recurrence plus SPEC.md's indexing and padding rules.

Everything here is fp64 on CPU, so equal forms agree to ~1e-13 and 1e-10 is a tight bound.
"""

import math

import pytest
import torch

from cute_gdn.reference import (
    chunk_gated_delta_rule,
    commit,
    compute_gates,
    decode,
    prefill,
    recurrent_gated_delta_rule,
    verify,
)

F64 = torch.float64
RTOL = 1e-10
# Small heads keep the whole file well under the CPU time budget; the math has no K/V special case.
HEAD_DIM = 32


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # Every tensor here is tiny: intra-op threads only add synchronization, which on a busy
    # 2-core machine made batched matmuls ~100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x - ref).abs().max() / ref.abs().max()).item()


def make_inputs(batch, seqlen, num_heads, num_v_heads, *, seed, head_dim=HEAD_DIM):
    """Random q/k/v and raw gates; decays mild enough that the state carries across chunks."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    return dict(
        q=randn(batch, seqlen, num_heads, head_dim),
        k=randn(batch, seqlen, num_heads, head_dim),
        v=randn(batch, seqlen, num_v_heads, head_dim),
        a=randn(batch, seqlen, num_v_heads),
        b=randn(batch, seqlen, num_v_heads),
        # exp(A_log) in [0.01, 0.2] gives g ~ -0.07 per token: e^-4.5 over a 64-token chunk.
        A_log=torch.log(torch.rand(num_v_heads, generator=gen, dtype=F64) * 0.19 + 0.01),
        dt_bias=randn(num_v_heads) * 0.5,
    )


def random_state(*shape, seed, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def gates(inputs):
    return compute_gates(inputs["a"], inputs["b"], inputs["A_log"], inputs["dt_bias"])


def raw(inputs):
    return {key: inputs[key] for key in ("a", "b", "A_log", "dt_bias")}


def qkv(inputs):
    return inputs["q"], inputs["k"], inputs["v"]


# ---- gates ---------------------------------------------------------------------------------------


def test_compute_gates_matches_formula():
    x = [-30.0, -3.0, 0.0, 0.5, 7.0, 19.5, 20.0]
    A_log = torch.tensor([0.3], dtype=F64)
    a = torch.tensor(x, dtype=F64)[:, None]
    b = torch.tensor([-4.0, -1.0, 0.0, 0.25, 1.0, 3.0, 9.0], dtype=F64)[:, None]
    g, beta = compute_gates(a, b, A_log, torch.zeros(1, dtype=F64))
    expect_g = [-math.exp(0.3) * math.log1p(math.exp(xi)) for xi in x]
    expect_beta = [1 / (1 + math.exp(-bi)) for bi in b[:, 0].tolist()]
    assert torch.allclose(g[:, 0], torch.tensor(expect_g, dtype=F64), rtol=1e-14, atol=0)
    assert torch.allclose(beta[:, 0], torch.tensor(expect_beta, dtype=F64), rtol=1e-14, atol=0)


def test_softplus_threshold_branch():
    # a + dt_bias > 20 takes softplus(x) = x exactly, and stays finite where exp(x) would overflow
    # even in fp64 (x = 1000) and in fp32 (x = 100).
    dt_bias = torch.tensor([1.5, -2.0, 0.25], dtype=F64)
    A_log = torch.tensor([-0.5, 0.0, 0.7], dtype=F64)
    a = torch.tensor([[19.0, 102.0, 1000.0]], dtype=F64)  # a + dt_bias = 20.5, 100, 1000.25
    b = torch.zeros(1, 3, dtype=F64)
    for dtype in (F64, torch.float32):
        g, _ = compute_gates(a, b, A_log, dt_bias, dtype=dtype)
        assert g.dtype == dtype
        expect = -torch.exp(A_log) * (a + dt_bias)
        assert torch.isfinite(g).all()
        rtol = 1e-6 if dtype == torch.float32 else 0
        assert torch.allclose(g.double(), expect, rtol=rtol, atol=0)
    # Just below the threshold the log1p branch is taken and differs from x by ~exp(-x).
    zero = torch.zeros(1, dtype=F64)
    g, _ = compute_gates(torch.tensor([[19.9]], dtype=F64), b[:, :1], zero, zero)
    assert g.item() == pytest.approx(-math.log1p(math.exp(19.9)), rel=1e-15)
    assert g.item() != -19.9


# ---- chunked == recurrent -----------------------------------------------------------------------


@pytest.mark.parametrize("seqlen", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("ratio", [1, 2, 4])
@pytest.mark.parametrize("with_initial_state", [False, True])
def test_chunk_matches_recurrent(seqlen, ratio, with_initial_state):
    batch, num_heads = 2, 2
    num_v_heads = num_heads * ratio
    inputs = make_inputs(batch, seqlen, num_heads, num_v_heads, seed=seqlen * 10 + ratio)
    g, beta = gates(inputs)
    h0 = None
    if with_initial_state:
        h0 = random_state(batch, num_v_heads, HEAD_DIM, HEAD_DIM, seed=seqlen + ratio)
    o_rec, s_rec = recurrent_gated_delta_rule(*qkv(inputs), g, beta, initial_state=h0)
    o_chk, s_chk = chunk_gated_delta_rule(*qkv(inputs), g, beta, initial_state=h0)
    assert o_chk.shape == o_rec.shape == (batch, seqlen, num_v_heads, HEAD_DIM)
    assert s_chk.shape == s_rec.shape == (batch, num_v_heads, HEAD_DIM, HEAD_DIM)
    assert o_chk.dtype == s_chk.dtype == F64
    assert rel_err(o_chk, o_rec) < RTOL
    assert rel_err(s_chk, s_rec) < RTOL
    # The state must matter, or the check above proves little about the inter-chunk recurrence.
    assert s_rec.abs().max() > 0.1


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_chunk_without_l2norm_custom_scale(chunk_size):
    # Without l2norm the delta rule is only stable for |k|^2 beta < 2, so k is pre-shrunk.
    inputs = make_inputs(1, 100, 2, 4, seed=7)
    inputs["k"] = inputs["k"] / (2 * math.sqrt(HEAD_DIM))
    g, beta = gates(inputs)
    h0 = random_state(1, 4, HEAD_DIM, HEAD_DIM, seed=8)
    kwargs = dict(initial_state=h0, use_qk_l2norm=False, scale=0.3)
    o_rec, s_rec = recurrent_gated_delta_rule(*qkv(inputs), g, beta, **kwargs)
    o_chk, s_chk = chunk_gated_delta_rule(*qkv(inputs), g, beta, chunk_size=chunk_size, **kwargs)
    assert rel_err(o_chk, o_rec) < RTOL
    assert rel_err(s_chk, s_rec) < RTOL
    o_l2, _ = recurrent_gated_delta_rule(*qkv(inputs), g, beta, initial_state=h0, scale=0.3)
    assert rel_err(o_l2, o_rec) > 1e-3  # the flag changes the result


@pytest.mark.parametrize("ratio", [1, 2, 4])
def test_recurrent_matches_explicit_loop(ratio):
    # Each value head written out with vectors, straight from SPEC.md: value head h reads q/k
    # head h // ratio.
    num_v_heads = 2 * ratio
    inputs = make_inputs(1, 5, 2, num_v_heads, seed=11)
    g, beta = gates(inputs)
    h0 = random_state(1, num_v_heads, HEAD_DIM, HEAD_DIM, seed=12)
    o, s_final = recurrent_gated_delta_rule(*qkv(inputs), g, beta, initial_state=h0, scale=0.7)
    for h in range(num_v_heads):
        S = h0[0, h].clone()
        for t in range(5):
            q_t = inputs["q"][0, t, h // ratio]
            k_t = inputs["k"][0, t, h // ratio]
            q_t = q_t / torch.sqrt((q_t * q_t).sum() + 1e-6) * 0.7
            k_t = k_t / torch.sqrt((k_t * k_t).sum() + 1e-6)
            S = math.exp(g[0, t, h].item()) * S
            u = beta[0, t, h] * (inputs["v"][0, t, h] - S @ k_t)
            S = S + torch.outer(u, k_t)
            assert rel_err(o[0, t, h], S @ q_t) < 1e-13
        assert rel_err(s_final[0, h], S) < 1e-13


def test_all_states_and_dtype():
    inputs = make_inputs(2, 6, 1, 2, seed=13)
    g, beta = gates(inputs)
    o, s_final, states = recurrent_gated_delta_rule(*qkv(inputs), g, beta, return_all_states=True)
    assert states.shape == (2, 6, 2, HEAD_DIM, HEAD_DIM)
    assert torch.equal(states[:, -1], s_final)
    o_half, s_half = recurrent_gated_delta_rule(
        *(x[:, :3] for x in qkv(inputs)), g[:, :3], beta[:, :3]
    )
    assert torch.equal(states[:, 2], s_half)
    assert torch.equal(o[:, :3], o_half)
    o32, s32 = chunk_gated_delta_rule(*qkv(inputs), g, beta, dtype=torch.float32)
    assert o32.dtype == s32.dtype == torch.float32
    assert rel_err(o32.double(), o) < 1e-5


# ---- prefill ------------------------------------------------------------------------------------


def test_prefill_raw_gates_equal_precomputed():
    inputs = make_inputs(1, 90, 2, 4, seed=21)
    g, beta = gates(inputs)
    pool = random_state(3, 4, HEAD_DIM, HEAD_DIM, seed=22)
    common = dict(
        cu_seqlens=torch.tensor([0, 70, 90], dtype=torch.int32),
        state=pool,
        state_indices=torch.tensor([2, 0], dtype=torch.int32),
    )
    o_raw, pool_raw = prefill(*qkv(inputs), **raw(inputs), **common)
    o_pre, pool_pre = prefill(*qkv(inputs), g=g, beta=beta, **common)
    assert torch.equal(o_raw, o_pre)
    assert torch.equal(pool_raw, pool_pre)
    assert o_raw.abs().max() > 0.01


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("pool_dtype", [F64, torch.float32])
def test_prefill_varlen(chunked, pool_dtype):
    seqlens = [5, 0, 130, 1, 64, 17, 0, 40]
    state_indices = [6, 2, 0, -1, 9, 3, 7, -1]  # permuted, two padded, slots 1/4/5/8 untouched
    has_initial_state = [True, True, False, True, True, False, False, True]
    cu = [0]
    for n in seqlens:
        cu.append(cu[-1] + n)
    total = cu[-1]
    inputs = make_inputs(1, total, 2, 4, seed=31)
    g, beta = gates(inputs)
    pool = random_state(10, 4, HEAD_DIM, HEAD_DIM, seed=32, dtype=pool_dtype)
    pool_before = pool.clone()
    o, new_pool = prefill(
        *qkv(inputs),
        **raw(inputs),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        state=pool,
        state_indices=torch.tensor(state_indices, dtype=torch.int32),
        has_initial_state=torch.tensor(has_initial_state),
        chunked=chunked,
    )
    assert torch.equal(pool, pool_before)  # the input pool is not modified
    assert o.shape == (1, total, 4, HEAD_DIM) and o.dtype == F64
    assert new_pool.dtype == pool_dtype
    for n, slot in enumerate(state_indices):
        lo, hi = cu[n], cu[n + 1]
        if slot < 0:
            assert torch.count_nonzero(o[:, lo:hi]) == 0
            continue
        h0 = pool[slot : slot + 1] if has_initial_state[n] else None
        o_ref, s_ref = recurrent_gated_delta_rule(
            *(x[:, lo:hi] for x in qkv(inputs)), g[:, lo:hi], beta[:, lo:hi], initial_state=h0
        )
        if hi > lo:
            assert rel_err(o[:, lo:hi], o_ref) < RTOL
        if hi == lo:
            # A zero-length sequence writes back its initial state: the slot, or zeros.
            expect = pool[slot] if has_initial_state[n] else torch.zeros_like(pool[slot])
            assert torch.equal(new_pool[slot], expect)
        else:
            # Rounded to the pool dtype once: for fp32, equal up to half an fp32 ulp.
            tol = RTOL if pool_dtype == F64 else 1e-7
            assert rel_err(new_pool[slot].double(), s_ref[0]) < tol
    for slot in (1, 4, 5, 8):
        assert torch.equal(new_pool[slot], pool[slot])
    # has_initial_state=False really ignores the slot's contents.
    assert new_pool[0].abs().max() > 0.01


def test_prefill_has_initial_state_default_is_all_true():
    inputs = make_inputs(1, 20, 1, 1, seed=41)
    pool = random_state(2, 1, HEAD_DIM, HEAD_DIM, seed=42)
    common = dict(
        **raw(inputs),
        cu_seqlens=torch.tensor([0, 8, 20], dtype=torch.int32),
        state=pool,
        state_indices=torch.tensor([1, 0], dtype=torch.int32),
    )
    o_default, pool_default = prefill(*qkv(inputs), **common)
    all_true = torch.ones(2, dtype=torch.bool)
    o_true, pool_true = prefill(*qkv(inputs), **common, has_initial_state=all_true)
    o_false, _ = prefill(*qkv(inputs), **common, has_initial_state=~all_true)
    assert torch.equal(o_default, o_true)
    assert torch.equal(pool_default, pool_true)
    assert rel_err(o_false, o_true) > 1e-3


# ---- decode / verify / commit -------------------------------------------------------------------


def test_decode_is_one_recurrent_step():
    inputs = make_inputs(4, 1, 2, 4, seed=51)
    g, beta = gates(inputs)
    state_indices = [3, -1, 0, 5]
    pool = random_state(6, 4, HEAD_DIM, HEAD_DIM, seed=52, dtype=torch.float32)
    pool_before = pool.clone()
    o, new_pool = decode(
        *qkv(inputs), **raw(inputs), state=pool, state_indices=torch.tensor(state_indices)
    )
    o_pre, new_pool_pre = decode(
        *qkv(inputs), g=g, beta=beta, state=pool, state_indices=torch.tensor(state_indices)
    )
    assert torch.equal(o, o_pre) and torch.equal(new_pool, new_pool_pre)
    assert torch.equal(pool, pool_before)
    assert o.shape == (4, 1, 4, HEAD_DIM) and o.dtype == F64
    for row, slot in enumerate(state_indices):
        if slot < 0:
            assert torch.count_nonzero(o[row]) == 0
            continue
        o_ref, s_ref = recurrent_gated_delta_rule(
            *(x[row : row + 1] for x in qkv(inputs)),
            g[row : row + 1],
            beta[row : row + 1],
            initial_state=pool[slot : slot + 1],
        )
        assert rel_err(o[row : row + 1], o_ref) < 1e-13
        assert torch.equal(new_pool[slot], s_ref[0].float())
    for slot in (1, 2, 4):
        assert torch.equal(new_pool[slot], pool[slot])


def test_decode_rejects_multiple_tokens():
    inputs = make_inputs(2, 2, 1, 1, seed=53)
    pool = random_state(2, 1, HEAD_DIM, HEAD_DIM, seed=54)
    with pytest.raises(ValueError, match="q"):
        decode(*qkv(inputs), **raw(inputs), state=pool, state_indices=torch.tensor([0, 1]))


def run_verify(seqlen, *, seed, cache_indices=(4, 0, 2), state_indices=(1, -1, 3)):
    batch = len(state_indices)
    inputs = make_inputs(batch, seqlen, 2, 4, seed=seed)
    pool = random_state(5, 4, HEAD_DIM, HEAD_DIM, seed=seed + 1)
    cache = random_state(6, 5, 4, HEAD_DIM, HEAD_DIM, seed=seed + 2, dtype=torch.float32)
    o, new_cache = verify(
        *qkv(inputs),
        **raw(inputs),
        state=pool,
        state_indices=torch.tensor(state_indices),
        cache=cache,
        cache_indices=None if cache_indices is None else torch.tensor(cache_indices),
    )
    return inputs, pool, cache, o, new_cache


@pytest.mark.parametrize("seqlen", [1, 3, 5])
def test_verify_caches_every_state(seqlen):
    state_indices, cache_indices = (1, -1, 3), (4, 0, 2)
    inputs, pool, cache, o, new_cache = run_verify(seqlen, seed=60 + seqlen)
    g, beta = gates(inputs)
    for row, slot in enumerate(state_indices):
        if slot < 0:
            assert torch.count_nonzero(o[row]) == 0
            continue
        o_ref, _, states = recurrent_gated_delta_rule(
            *(x[row : row + 1] for x in qkv(inputs)),
            g[row : row + 1],
            beta[row : row + 1],
            initial_state=pool[slot : slot + 1],
            return_all_states=True,
        )
        assert rel_err(o[row : row + 1], o_ref) < 1e-13
        assert torch.equal(new_cache[cache_indices[row], :seqlen], states[0].float())
        # Steps past T keep their old contents.
        cache_slot = cache_indices[row]
        assert torch.equal(new_cache[cache_slot, seqlen:], cache[cache_slot, seqlen:])
    # The padded row's cache slot (0) and unused slots (1, 3, 5) are bit-identical.
    for cache_slot in (0, 1, 3, 5):
        assert torch.equal(new_cache[cache_slot], cache[cache_slot])


def test_verify_gate_modes_and_default_cache_indices():
    inputs, pool, cache, o, new_cache = run_verify(
        4, seed=70, cache_indices=None, state_indices=(2, 0, 4)
    )
    g, beta = gates(inputs)
    o_pre, new_cache_pre = verify(
        *qkv(inputs),
        g=g,
        beta=beta,
        state=pool,
        state_indices=torch.tensor([2, 0, 4]),
        cache=cache,
        cache_indices=torch.arange(3),
    )
    assert torch.equal(o, o_pre)
    assert torch.equal(new_cache, new_cache_pre)
    assert not torch.equal(new_cache[:3, :4], cache[:3, :4])
    assert torch.equal(new_cache[3:], cache[3:])


def test_verify_rejects_more_tokens_than_cache_steps():
    with pytest.raises(ValueError, match="cache_steps"):
        run_verify(6, seed=75)


def test_commit_picks_accepted_step():
    seqlen = 4
    state_indices, cache_indices = (1, -1, 3), (4, 0, 2)
    inputs, pool, cache, _, new_cache = run_verify(seqlen, seed=80)
    for accepted in range(seqlen + 1):
        # Rows get different counts so a row/slot mix-up cannot pass.
        accepted_steps = torch.tensor([accepted, seqlen, (accepted + 2) % (seqlen + 1)])
        new_pool = commit(
            pool,
            torch.tensor(state_indices),
            new_cache,
            torch.tensor(cache_indices),
            accepted_steps,
        )
        assert new_pool.dtype == pool.dtype
        for row, slot in enumerate(state_indices):
            if slot < 0:
                continue
            steps = accepted_steps[row].item()
            if steps == 0:
                expect = pool[slot]
            else:
                expect = new_cache[cache_indices[row], steps - 1].to(pool.dtype)
            assert torch.equal(new_pool[slot], expect)
        for slot in (0, 2, 4):
            assert torch.equal(new_pool[slot], pool[slot])


def test_verify_then_commit_equals_prefix_decode():
    # Committing k accepted tokens must land on the state that decoding those k tokens gives.
    seqlen = 3
    inputs, pool, _, _, new_cache = run_verify(seqlen, seed=90, state_indices=(1, 0, 3))
    g, beta = gates(inputs)
    accepted = [2, 3, 1]
    new_pool = commit(
        pool, torch.tensor([1, 0, 3]), new_cache, torch.tensor([4, 0, 2]), torch.tensor(accepted)
    )
    for row, (slot, steps) in enumerate(zip([1, 0, 3], accepted)):
        _, s_ref = recurrent_gated_delta_rule(
            *(x[row : row + 1, :steps] for x in qkv(inputs)),
            g[row : row + 1, :steps],
            beta[row : row + 1, :steps],
            initial_state=pool[slot : slot + 1],
        )
        assert rel_err(new_pool[slot], s_ref[0]) < 1e-7  # cache is fp32


# ---- argument errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("gate_args", ["both", "neither", "partial_raw", "partial_pre"])
def test_gate_sets_exactly_one(gate_args):
    inputs = make_inputs(1, 3, 1, 2, seed=95)
    g, beta = gates(inputs)
    chosen = {
        "both": dict(g=g, beta=beta, **raw(inputs)),
        "neither": {},
        "partial_raw": dict(a=inputs["a"], b=inputs["b"], A_log=inputs["A_log"]),
        "partial_pre": dict(g=g, a=inputs["a"], b=inputs["b"]),
    }[gate_args]
    pool = random_state(2, 2, HEAD_DIM, HEAD_DIM, seed=96)
    cache = random_state(1, 3, 2, HEAD_DIM, HEAD_DIM, seed=97)
    indices = torch.tensor([0])
    with pytest.raises(ValueError, match="gates"):
        prefill(
            *qkv(inputs),
            **chosen,
            cu_seqlens=torch.tensor([0, 3]),
            state=pool,
            state_indices=indices,
        )
    one = {key: value[:, :1] if value.dim() == 3 else value for key, value in chosen.items()}
    with pytest.raises(ValueError, match="gates"):
        decode(*(x[:, :1] for x in qkv(inputs)), **one, state=pool, state_indices=indices)
    with pytest.raises(ValueError, match="gates"):
        verify(*qkv(inputs), **chosen, state=pool, state_indices=indices, cache=cache)
