"""A seeded fuzz net over every op on an sm_90 GPU: prefill, decode, verify + commit and replay (verify,
commit, folds, flush), CASES_PER_OP random configurations each (tests/fuzz_cases.py draws them; the run's
seed is in the pytest header and in every failure message; CUTE_GDN_FUZZ_SEED=N reruns one).

Each case against the fp64 reference, with the tolerance the op's own tests use (the error within twice
that of the same reference in the kernel's precision, or prefill's tensor-core bound), zeros in padded
rows, and every pool slot (ring, cursor, cache entry) the call does not name bit-identical.
"""

from __future__ import annotations

import pytest
import torch

import cute_gdn
import fuzz_cases
from cute_gdn import reference, replay
from gdn_inputs import TORCH_DTYPES, make_pool, make_step_inputs, rel_rms

pytestmark = pytest.mark.gpu

POOL = fuzz_cases.POOL
CASES = fuzz_cases.draw()
SEED = fuzz_cases.seed()
PREFILL_TOL = 1.5e-2  # tensor-core products on bf16 operands (tests/test_prefill_gpu.py)


def gpu_kernel_keys() -> list:
    return fuzz_cases.kernel_keys(CASES)


def _inputs(case: fuzz_cases.Case, B: int, T: int) -> dict:
    f = case.family
    inputs = make_step_inputs(B, T, f.H, f.HV, f.K, f.V, io_dtype=TORCH_DTYPES[f.io], gates=f.gates,
                              bias_dtype=TORCH_DTYPES[f.bias or "float32"], packed=case.packed, decay=case.decay)
    if not f.l2:
        # Without the in-kernel norm the model feeds unit-norm keys (raw randn keys, |k|^2 ~ K, make the
        # delta rule diverge within a few tokens in any precision).
        for name in ("q", "k"):
            x = inputs[name]
            inputs[name] = (x.float() / x.float().norm(dim=-1, keepdim=True)).to(x.dtype)
    return inputs


def _slots(B: int, pad: tuple) -> torch.Tensor:
    """B distinct slots in random order, -1 at the padded rows."""
    slots = torch.randperm(POOL, device="cuda")[:B].to(torch.int32)
    for i in pad:
        slots[i] = -1
    return slots


def _untouched(pool: torch.Tensor, before: torch.Tensor, named: torch.Tensor, what: str) -> None:
    keep = torch.ones(pool.shape[0], dtype=torch.bool, device=pool.device)
    keep[named] = False
    assert torch.equal(pool[keep], before[keep]), f"{what}: entries not named must be bit-identical"


def _within(err: float, err_own: float, atol: float, what: str) -> None:
    assert err <= 2 * err_own + atol, f"{what}: error {err:.3g} against the fp64 reference (own precision {err_own:.3g})"


def _scale(case: fuzz_cases.Case) -> float:
    return (0.6 + 0.4 * (case.torch_seed % 7) / 6) * case.family.K ** -0.5


def run_prefill(case: fuzz_cases.Case) -> None:
    f = case.family
    lengths = list(case.lengths)
    N, total = len(lengths), sum(lengths)
    inputs = _inputs(case, 1, total)
    pool = make_pool(POOL, f.HV, f.V, f.K, TORCH_DTYPES[f.state])
    before = pool.clone()
    slots = _slots(N, case.pad)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    init = None if case.has_init is None else torch.tensor(case.has_init, dtype=torch.bool, device="cuda")
    scale = _scale(case)
    o = cute_gdn.prefill(**inputs, cu_seqlens=cu, state=pool, state_indices=slots, has_initial_state=init,
                         scale=scale, use_qk_l2norm=f.l2)
    torch.cuda.synchronize()
    ref_o, ref_pool = reference.prefill(**inputs, cu_seqlens=cu, state=before.double(), state_indices=slots,
                                        has_initial_state=init, scale=scale, use_qk_l2norm=f.l2)
    live_tokens = torch.zeros(total, dtype=torch.bool, device="cuda")
    for n in range(N):
        if slots[n] >= 0:
            live_tokens[int(cu[n]):int(cu[n + 1])] = True
    assert torch.isfinite(o.float()).all()
    assert torch.equal(o[0, ~live_tokens], torch.zeros_like(o[0, ~live_tokens])), "padded rows must be zero"
    if live_tokens.any():
        err = rel_rms(o[0, live_tokens], ref_o[0, live_tokens])
        assert err < PREFILL_TOL, f"o: error {err:.3g}"
    named = slots[slots >= 0].long()
    if named.numel():
        err = rel_rms(pool[named], ref_pool[named])
        assert err < PREFILL_TOL, f"state: error {err:.3g}"
    _untouched(pool, before, named, "pool")


def run_decode(case: fuzz_cases.Case) -> None:
    f = case.family
    B = case.batch
    inputs = _inputs(case, B, 1)
    pool = make_pool(POOL, f.HV, f.V, f.K, TORCH_DTYPES[f.state])
    before = pool.clone()
    slots = _slots(B, case.pad)
    scale = _scale(case)
    o = cute_gdn.decode(**inputs, state=pool, state_indices=slots, scale=scale, use_qk_l2norm=f.l2)
    torch.cuda.synchronize()
    ref_o, ref_pool = reference.decode(**inputs, state=before.double(), state_indices=slots, scale=scale,
                                       use_qk_l2norm=f.l2, dtype=torch.float64)
    own_o, own_pool = reference.decode(**inputs, state=before, state_indices=slots, scale=scale,
                                       use_qk_l2norm=f.l2, dtype=torch.float32)
    live = slots >= 0
    named = slots[live].long()
    assert torch.isfinite(o.float()).all()
    assert torch.equal(o[~live], torch.zeros_like(o[~live])), "padded rows must be zero"
    if live.any():
        _within(rel_rms(o[live], ref_o[live]), rel_rms(own_o.to(o.dtype)[live], ref_o[live]), 2e-3, "o")
        _within(rel_rms(pool[named], ref_pool[named]), rel_rms(own_pool[named], ref_pool[named]), 1e-5, "state")
    _untouched(pool, before, named, "pool")


def run_verify(case: fuzz_cases.Case) -> None:
    f = case.family
    B, T = case.batch, f.T
    state_dtype = TORCH_DTYPES[f.state]
    inputs = _inputs(case, B, T)
    pool = make_pool(POOL, f.HV, f.V, f.K, state_dtype)
    cache_slots = B + 3
    cache = (torch.randn(cache_slots, f.steps, f.HV, f.V, f.K, device="cuda") * 0.5).to(state_dtype)
    slots = _slots(B, case.pad)
    cache_idx = torch.randperm(cache_slots, device="cuda")[:B].to(torch.int32)
    cache_idx[slots < 0] = -5  # a padded row's cache index is never read
    pool0, cache0 = pool.clone(), cache.clone()
    scale = _scale(case)
    o = cute_gdn.verify(**inputs, state=pool, state_indices=slots, cache=cache, cache_indices=cache_idx,
                        scale=scale, use_qk_l2norm=f.l2)
    torch.cuda.synchronize()
    assert torch.equal(pool, pool0), "verify must not write the pool"
    ref_o, ref_cache = reference.verify(**inputs, state=pool0.double(), state_indices=slots, cache=cache0.double(),
                                        cache_indices=cache_idx, scale=scale, use_qk_l2norm=f.l2)
    own_o, own_cache = reference.verify(**inputs, state=pool0, state_indices=slots, cache=cache0,
                                        cache_indices=cache_idx, scale=scale, use_qk_l2norm=f.l2,
                                        dtype=torch.float32)
    live = slots >= 0
    cidx = cache_idx[live].long()
    assert torch.isfinite(o.float()).all()
    assert torch.equal(o[~live], torch.zeros_like(o[~live])), "padded rows must be zero"
    if live.any():
        _within(rel_rms(o[live], ref_o[live]), rel_rms(own_o.to(o.dtype)[live], ref_o[live]), 2e-3, "o")
        for t in range(T):
            _within(rel_rms(cache[cidx, t], ref_cache[cidx, t]), rel_rms(own_cache[cidx, t], ref_cache[cidx, t]),
                    1e-5, f"cache step {t}")
    written = torch.zeros(cache.shape[:2], dtype=torch.bool, device="cuda")
    written[cidx, :T] = True
    assert torch.equal(cache[~written], cache0[~written]), "cache entries not named must be bit-identical"
    gen = torch.Generator(device="cuda").manual_seed(case.torch_seed)
    accepted = torch.randint(0, T + 1, (B,), device="cuda", dtype=torch.int32, generator=gen)
    expected = reference.commit(pool, slots, cache, cache_idx, accepted)
    cute_gdn.commit(pool, slots, cache, cache_idx, accepted)
    torch.cuda.synchronize()
    assert torch.equal(pool, expected), "commit must copy the accepted cache entry, and only that"


def _replay_window(inputs: dict, rows: torch.Tensor, S: torch.Tensor, dtype: torch.dtype, scale: float, l2: bool):
    """Outputs and the state after each token of one window for batch rows `rows`, from S, in `dtype`."""
    q, k, v = (inputs[name][rows] for name in ("q", "k", "v"))
    if "g" in inputs:
        g, beta = inputs["g"].to(dtype), inputs["beta"].to(dtype)
    else:
        g, beta = reference.compute_gates(inputs["a"], inputs["b"], inputs["A_log"], inputs["dt_bias"], dtype=dtype)
    o, _, states = reference.recurrent_gated_delta_rule(q, k, v, g[rows], beta[rows], scale=scale, initial_state=S,
                                                        use_qk_l2norm=l2, return_all_states=True, dtype=dtype)
    return o, states


def _accept(S: torch.Tensor, states: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    n = n.to(states.device)
    taken = states[torch.arange(states.shape[0], device=states.device), (n.long() - 1).clamp(min=0)]
    return torch.where((n > 0)[:, None, None, None], taken, S)


def run_replay(case: fuzz_cases.Case) -> None:
    """spec_steps steps of replay verify + commit with random accepts 0..T (one row accepts all, so its ring
    folds), then a flush: outputs every step and the flushed states against the fp64 recurrence of the
    committed tokens, next to the cached protocol emulated in the state's dtype (fp32 math, rounded at every
    commit)."""
    f = case.family
    B, T, L = case.batch, f.T, f.ring_len
    state_dtype = TORCH_DTYPES[f.state]
    ck = make_pool(POOL, f.HV, f.V, f.K, state_dtype)
    ring = replay.make_replay_ring(POOL, f.H, f.HV, f.K, f.V, ring_len=L, io_dtype=TORCH_DTYPES[f.io])
    for t in ring:  # other requests' records
        t.copy_(torch.randn(t.shape, device="cuda"))
    cursors = replay.make_replay_cursors(POOL, max_tokens=f.steps, ring_len=L, fold=f.fold)
    threshold = cursors.fold_threshold
    cursors.pos.copy_(torch.stack([torch.randint(0, L, (POOL,)), torch.randint(0, threshold + 1, (POOL,))], 1))
    slots = _slots(B, case.pad)
    rows = (slots >= 0).nonzero().squeeze(1)
    live = slots[rows].long()
    cursors.pos[live] = 0  # the batch's requests are new
    ck0, ring0, pos0 = ck.clone(), [t.clone() for t in ring], cursors.pos.clone()
    ref = ck0[live].double()
    own = ck0[live].clone()
    scale = _scale(case)
    # One layer's gate parameters for the run; weak decay so the state remembers across folds.
    A_log = -2.5 + 0.5 * torch.rand(f.HV, device="cuda")
    dt_bias = torch.randn(f.HV, device="cuda").to(TORCH_DTYPES[f.bias or "float32"])
    gen = torch.Generator().manual_seed(case.torch_seed)
    for step in range(case.spec_steps):
        inputs = _inputs(case, B, T)
        if f.gates == "raw":
            inputs.update(A_log=A_log, dt_bias=dt_bias)
        accepted = torch.randint(0, T + 1, (B,), generator=gen, dtype=torch.int32)
        if rows.numel():
            accepted[int(rows[0])] = T
        o = replay.replay_verify(**inputs, state=ck, state_indices=slots, ring=ring, cursors=cursors, scale=scale,
                                 use_qk_l2norm=f.l2)
        replay.replay_commit(cursors, slots, accepted.cuda())
        torch.cuda.synchronize()
        assert torch.isfinite(o.float()).all()
        pad_rows = slots < 0
        assert torch.equal(o[pad_rows], torch.zeros_like(o[pad_rows])), "padded rows must be zero"
        if rows.numel():
            o64, states64 = _replay_window(inputs, rows, ref, torch.float64, scale, f.l2)
            o32, states32 = _replay_window(inputs, rows, own.float(), torch.float32, scale, f.l2)
            _within(rel_rms(o[rows], o64), rel_rms(o32.to(o.dtype), o64), 2e-3, f"o at step {step}")
            ref = _accept(ref, states64, accepted[rows.cpu()])
            own = _accept(own, states32.to(state_dtype), accepted[rows.cpu()])
    replay.replay_flush(ck, ring, cursors, slots, use_qk_l2norm=f.l2)
    torch.cuda.synchronize()
    if rows.numel():
        atol = 1e-5 if f.state == "float32" else 1e-3
        _within(rel_rms(ck[live], ref), rel_rms(own, ref), atol, "flushed state")
        assert torch.equal(cursors.pos[live, 1], torch.zeros_like(cursors.pos[live, 1])), "flush must empty the rings (count 0)"
    _untouched(ck, ck0, live, "checkpoints")
    _untouched(cursors.pos, pos0, live, "cursors")
    for name, t, t0 in zip(replay.ReplayRing._fields, ring, ring0):
        _untouched(t, t0, live, f"ring.{name}")


RUN = {"prefill": run_prefill, "decode": run_decode, "verify": run_verify, "replay": run_replay}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fuzz(case):
    torch.manual_seed(case.torch_seed)
    try:
        RUN[case.op](case)
    except AssertionError as e:
        raise AssertionError(f"{e}\n(fuzz seed {SEED}, case {case.id}: {case}; rerun with "
                             f"CUTE_GDN_FUZZ_SEED={SEED})") from None
