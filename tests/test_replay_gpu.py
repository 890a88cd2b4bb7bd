"""Replay speculative decoding (cute_gdn.replay) on an sm_90 GPU.

The replay protocol keeps a checkpoint in the pool slot and a ring of per-token records; each test drives
it next to the cached protocol (verify into a T-step cache + commit) on identical inputs and checks:
- fp32 checkpoint: the request's state (checkpoint + committed records, folded by replay_flush on a copy)
  is bit-identical to the cached pool after every step, and so is the checkpoint itself after a fold;
  outputs within the fp64 reference's tolerance; the ring holds each candidate's raw k, v, gates and delta;
- a 500-step run per checkpoint dtype: the errors against an fp64 recurrence stay flat;
- SGLang 0.5.23's ReplaySSM (tests/sglang_peer.py) on the same inputs: outputs, checkpoints and cursors;
- padding, untouched slots, GVA 2 and 4, strided views, fp16 io, precomputed gates, L2 norm off,
  T = 1, 2, 8, flush -> decode -> speculation again, slot reuse (reset_cursors), CUDA-graph replay and
  bad arguments.

`CursorModel` is the cursor rule on the host; it predicts which rows fold and where records go.
Every test shares one pool size and ring length, so the kernels (gpu_kernel_keys, 47) are few.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch

import cute_gdn
import sglang_peer
from cute_gdn import reference, replay
from cute_gdn.cache import default_cache
from cute_gdn.kernels.replay import LARGE_BATCH_HEADS, replay_tile
from cute_gdn.ops import commit_key, decode_keys, verify_key, verify_keys
from gdn_inputs import TORCH_DTYPES, make_pool, make_step_inputs, rel_rms

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
POOL = 10  # every test's pool (SGLang's buffers too): one pool size, one set of kernels
L = 16     # ring_len
NARROW = (2, 4, 128, 128)  # (H, HV, K, V): GVA 2; B * HV < 256 at every B here, the small tile
WIDE = (8, 32, 128, 128)   # GVA 4; B = 8 gives B * HV = 256, where fp32 state takes the large tile
# fp32 state: from this many (sequence, head) rows verify and replay take the large tile (kernels/verify.py).
LARGE_TILE_ROWS = 256


@dataclass(frozen=True)
class Case:
    """One kernel configuration of the tests."""
    shape: tuple = NARROW
    T: int = 4
    max_tokens: int = 4
    io: str = "bfloat16"
    state: str = "float32"
    gates: str = "raw"
    bias: str = "float32"
    l2: bool = True
    packed: bool = False           # q, k, v as strided views of one packed projection
    scale: Optional[float] = None  # a factor on K ** -0.5; None = the ops' default
    fold: str = "exact"            # the cursors' fold mode (make_replay_cursors)

    def problem(self) -> dict:
        H, HV, K, V = self.shape
        return dict(io_dtype=self.io, state_dtype=self.state, num_heads=H, num_v_heads=HV, head_k_dim=K,
                    head_v_dim=V, pool_size=POOL)

    def keys(self, cached: bool = True) -> list:
        """The replay kernels of this case (both verify tiles, flush, both cursor kernels) and, with
        `cached`, the cached protocol's (both verify tiles with cache_steps = T, commit)."""
        p = self.problem()
        gates = dict(gate_mode=self.gates, dt_bias_dtype=self.bias if self.gates == "raw" else None)
        keys = list(replay.replay_verify_keys(num_tokens=self.T, max_tokens=self.max_tokens, ring_len=L,
                                              use_qk_l2norm=self.l2, fold_mode=self.fold, **gates, **p))
        flush = replay.replay_flush_keys(max_tokens=self.max_tokens, ring_len=L, use_qk_l2norm=self.l2, **p)
        # The flush takes the tile by B * HV as verify does; only a pool-sized batch of WIDE reaches the large one.
        keys += flush if POOL * self.shape[1] >= LARGE_TILE_ROWS else flush[:1]
        keys += [replay.replay_cursor_key(pool_size=POOL, ring_len=L, max_tokens=self.max_tokens, mode=mode)
                 for mode in ("commit", "flush")]
        if cached:
            keys += verify_keys(num_tokens=self.T, cache_steps=self.T, use_qk_l2norm=self.l2, **gates, **p)
            keys += [verify_key(num_tokens=self.T, cache_steps=self.T, use_qk_l2norm=self.l2, **gates, **p,
                                config=replay_tile(self.shape[2], self.shape[3], self.state, large))
                     for large in (False, True)]
            keys.append(commit_key(state_dtype=self.state, num_v_heads=self.shape[1], head_k_dim=self.shape[2],
                                   head_v_dim=self.shape[3], pool_size=POOL, cache_steps=self.T))
        return keys


def cached_verify(case: Case, inputs: dict, state, slots, cache, cache_idx, scale, l2) -> torch.Tensor:
    """verify (the cached protocol) run in the replay kernel's tile for this batch. The fold replays verify's
    own row update, and a row reduction's order is the tile's, so bit equality is per tile (verify's own two
    tiles differ in the last bit too); this runs the verify kernel with the tile replay picks at this B."""
    H, HV, K, V = case.shape
    B = slots.shape[0]
    T = inputs["q"].shape[1]
    raw = case.gates == "raw"
    tile = replay_tile(K, V, case.state, B * HV >= LARGE_BATCH_HEADS[case.state])
    key = verify_key(num_tokens=T, cache_steps=cache.shape[1], gate_mode=case.gates,
                     dt_bias_dtype=case.bias if raw else None, use_qk_l2norm=l2, config=tile, **case.problem())
    fn = default_cache().get(key)
    out = torch.empty_like(inputs["v"])
    if cache_idx is None:
        cache_idx = torch.arange(B, dtype=torch.int32, device=slots.device)
    scale = K ** -0.5 if scale is None else scale
    if raw:
        fn(inputs["q"], inputs["k"], inputs["v"], inputs["a"], inputs["b"], inputs["A_log"], inputs["dt_bias"],
           state, slots, cache, cache_idx, out, scale)
    else:
        fn(inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["beta"], None, None, state, slots, cache,
           cache_idx, out, scale)
    return out


BASE = Case()
# (case, B, padding rows): B * HV = 20, 160 (small tile) and 256 (large tile).
EXACT_CASES = {"narrow-B5": (BASE, 5, (1,)), "wide-B5": (Case(shape=WIDE), 5, (3,)),
               "wide-B8-large-tile": (Case(shape=WIDE), 8, (2, 6))}
VARIANT_CASES = {"packed-views": Case(packed=True),
                 "fp16-precomputed-scale": Case(io="float16", gates="precomputed", scale=0.8),
                 "bf16-bias-no-l2norm": Case(bias="bfloat16", l2=False)}
# T below max_tokens (SGLang's adaptive drafts), and T = max_tokens = 8 (threshold 0: every non-empty ring folds).
TOKEN_CASES = {"T1": Case(T=1), "T2": Case(T=2), "T8": Case(T=8, max_tokens=8)}
LONG_CASES = {"float32": BASE, "bfloat16": Case(state="bfloat16"), "float32-compact": Case(fold="compact"),
              "bfloat16-compact": Case(state="bfloat16", fold="compact")}
# fold="compact": the same state rounded differently; the checkpoint after a fold and the flushed state are
# within COMPACT_STATE_TOL (relative RMS) of the cached pool instead of bit-equal.
COMPACT_CASES = {"compact-narrow-B5": (Case(fold="compact"), 5, (1,)),
                 "compact-wide-B8-large-tile": (Case(shape=WIDE, fold="compact"), 8, (2, 6)),
                 "compact-T8": (Case(T=8, max_tokens=8, fold="compact"), 5, (4,)),
                 "compact-fp16-precomputed": (Case(io="float16", gates="precomputed", fold="compact"), 5, (0,))}
COMPACT_STATE_TOL = 1e-5


def _decode_keys() -> list:
    return list(decode_keys(gate_mode="raw", dt_bias_dtype="float32", use_qk_l2norm=True, **BASE.problem()))


def gpu_kernel_keys() -> list:
    """Every kernel this module runs; conftest compiles the whole run's set at once, in parallel."""
    keys = set()
    for case, _, _ in EXACT_CASES.values():
        keys |= set(case.keys())
    for case in (*VARIANT_CASES.values(), *TOKEN_CASES.values(), *(c for c, _, _ in COMPACT_CASES.values())):
        keys |= set(case.keys())
    for case in LONG_CASES.values():
        keys |= set(case.keys(cached=False))
    keys |= set(_decode_keys())
    return sorted(keys, key=lambda k: k.name)


# ---------------------------------------------------------------------------------------------------
# The cursor rule on the host
# ---------------------------------------------------------------------------------------------------

class CursorModel:
    """replay.py's cursor rule in plain torch, on the host: pos[slot] = (start, count).

    verify(): the rows that fold (count > L - 2 * max_tokens) and leave this step with start += count;
    commit(n): count = n after a fold, else count += n (n clamped to [0, max_tokens]); flush(): start +=
    count, count = 0; reset(): (0, 0)."""

    def __init__(self, pos: torch.Tensor, ring_len: int, max_tokens: int):  # pos [pool_size, 2]
        self.pos = pos.to("cpu", torch.int64).clone()
        self.ring_len, self.max_tokens = ring_len, max_tokens
        self.threshold = ring_len - 2 * max_tokens
        self._folding: Optional[dict] = None

    def verify(self, slots: list) -> dict:
        """{slot: folds} for the live rows of a replay_verify."""
        self._folding = {s: int(self.pos[s, 1]) > self.threshold for s in slots if s >= 0}
        return dict(self._folding)

    def candidate_positions(self, slot: int, T: int) -> list:
        """Where replay_verify writes the T candidates' records (before the commit moves the cursor)."""
        start, count = self.pos[slot].tolist()
        return [(start + count + t) % self.ring_len for t in range(T)]

    def commit(self, slots: list, accepted: list) -> None:
        assert self._folding is not None, "commit without verify"
        for s, n in zip(slots, accepted):
            if s < 0:
                continue
            n = min(max(int(n), 0), self.max_tokens)
            start, count = self.pos[s].tolist()
            if self._folding[s]:
                start, count = (start + count) % self.ring_len, n
            else:
                count += n
            self.pos[s] = torch.tensor([start, count])
        self._folding = None

    def flush(self, slots: list) -> None:
        for s in slots:
            if s >= 0:
                start, count = self.pos[s].tolist()
                self.pos[s] = torch.tensor([(start + count) % self.ring_len, 0])

    def reset(self, slots: list) -> None:
        for s in slots:
            if s >= 0:
                self.pos[s] = 0

    def matches(self, cursors: replay.ReplayCursors) -> bool:
        return torch.equal(cursors.pos.to("cpu", torch.int64), self.pos)


# ---------------------------------------------------------------------------------------------------
# Reference helpers
# ---------------------------------------------------------------------------------------------------

def _sync() -> None:
    if torch.device(DEVICE).type == "cuda":
        torch.cuda.synchronize()


def _gates(inputs: dict, dtype: torch.dtype):
    if "g" in inputs:
        return inputs["g"].to(dtype), inputs["beta"].to(dtype)
    return reference.compute_gates(inputs["a"], inputs["b"], inputs["A_log"], inputs["dt_bias"], dtype=dtype)


def _window(inputs: dict, rows: torch.Tensor, S0: torch.Tensor, dtype: torch.dtype, *, scale=None, l2=True):
    """The recurrence over one verify window for batch rows `rows` [n] from S0 [n, HV, V, K], in `dtype`.
    Returns (o [n, T, HV, V], state after each token [n, T, HV, V, K], delta u of each token [n, T, HV, V])."""
    q, k, v = (inputs[name][rows] for name in ("q", "k", "v"))
    g, beta = (x[rows] for x in _gates(inputs, dtype))
    o, _, states = reference.recurrent_gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=S0,
                                                        use_qk_l2norm=l2, return_all_states=True, dtype=dtype)
    # u_t = beta_t (v_t - exp(g_t) S_{t-1} k_t): the record's d (kernels/replay.py), from the states.
    kn = k.to(dtype)
    if l2:
        kn = kn / torch.sqrt((kn * kn).sum(-1, keepdim=True) + reference.L2NORM_EPS)
    kn = kn.repeat_interleave(v.shape[2] // k.shape[2], dim=2)  # [n, T, HV, K]
    before = torch.cat([S0.to(dtype)[:, None], states[:, :-1]], dim=1)
    sk = (before * kn[..., None, :]).sum(-1)
    u = beta[..., None] * (v.to(dtype) - torch.exp(g)[..., None] * sk)
    return o, states, u


def _advance(S: torch.Tensor, states: torch.Tensor, accepted: torch.Tensor) -> torch.Tensor:
    """The state after each row's accepted prefix: states[:, n - 1], or S where n = 0."""
    n = accepted.to(states.device, torch.int64)
    taken = states[torch.arange(states.shape[0], device=states.device), (n - 1).clamp(min=0)]
    return torch.where((n > 0)[:, None, None, None], taken, S)


def _clone_ring(ring: replay.ReplayRing) -> replay.ReplayRing:
    return replay.ReplayRing(*(t.clone() for t in ring))


def _clone_cursors(cursors: replay.ReplayCursors) -> replay.ReplayCursors:
    return replay.ReplayCursors(cursors.pos.clone(), cursors.ring_len, cursors.max_tokens, cursors.fold)


def _flushed(state, ring, cursors, slots, l2=True):
    """The requests' states (checkpoint + committed records), from replay_flush on copies: the run goes on."""
    state, cursors = state.clone(), _clone_cursors(cursors)
    replay.replay_flush(state, _clone_ring(ring), cursors, slots, use_qk_l2norm=l2)
    return state, cursors


def _stale_ring(H, HV, K, V, io_dtype) -> replay.ReplayRing:
    """A ring full of another request's records: a row whose count is 0 must read none of them."""
    ring = replay.make_replay_ring(POOL, H, HV, K, V, ring_len=L, io_dtype=io_dtype, device=DEVICE)
    for t in ring:
        t.copy_(torch.randn(t.shape, device=DEVICE))
    return ring


def _random_cursors(max_tokens: int) -> torch.Tensor:
    """Valid cursors of other requests ([POOL, 2] int32): start anywhere, count within the fold bound."""
    start = torch.randint(0, L, (POOL,))
    count = torch.randint(0, L - 2 * max_tokens + 1, (POOL,))
    return torch.stack([start, count], dim=1).to(DEVICE, torch.int32)


def _slots(B: int, pad=()) -> torch.Tensor:
    slots = torch.randperm(POOL)[:B].to(torch.int32)
    for i in pad:
        slots[i] = -1
    return slots.to(DEVICE)


# ---------------------------------------------------------------------------------------------------
# Replay next to cached, step by step
# ---------------------------------------------------------------------------------------------------

class Pair:
    """One layer driven both ways on identical inputs: replay (checkpoint `ck`, ring, cursors) and cached
    (pool + a verify cache of T steps), with the host cursor model and an fp64 reference of the live rows."""

    def __init__(self, case: Case, B: int, pad=(), seed: int = 0):
        torch.manual_seed(seed)
        self.case, self.B = case, B
        H, HV, K, V = case.shape
        self.io_dtype, self.state_dtype = TORCH_DTYPES[case.io], TORCH_DTYPES[case.state]
        self.scale = None if case.scale is None else case.scale * K ** -0.5
        self.pool0 = make_pool(POOL, HV, V, K, self.state_dtype, device=DEVICE)
        self.ck, self.pool = self.pool0.clone(), self.pool0.clone()
        self.ring = _stale_ring(H, HV, K, V, self.io_dtype)
        self.ring0 = _clone_ring(self.ring)
        self.cursors = replay.make_replay_cursors(POOL, max_tokens=case.max_tokens, ring_len=L, fold=case.fold,
                                                  device=DEVICE)
        self.cursors.pos.copy_(_random_cursors(case.max_tokens))  # other requests' cursors, left as they are
        self.slots = _slots(B, pad)
        # The batch's requests are new: empty rings (reset_cursors has its own tests).
        self.cursors.pos[self.slots[self.slots >= 0].long()] = 0
        self.model = CursorModel(self.cursors.pos, L, case.max_tokens)
        cache_slots = B + 2  # cache rows permuted and not the batch's order
        self.cache = torch.zeros(cache_slots, case.T, HV, V, K, dtype=self.state_dtype, device=DEVICE)
        self.cache_idx = torch.randperm(cache_slots)[:B].to(DEVICE, torch.int32)
        self.rows = (self.slots >= 0).nonzero().squeeze(1)   # live batch rows
        self.live = self.slots[self.rows].long()             # their slots
        self.ref = self.pool0[self.live].double()            # fp64 state of the live rows
        # One layer's A_log and dt_bias for the whole run, as in a model.
        self.A_log = torch.rand(HV, device=DEVICE) * 2 - 1
        self.dt_bias = torch.randn(HV, device=DEVICE).to(TORCH_DTYPES[case.bias])
        self.gen = torch.Generator().manual_seed(seed)
        self.folds = 0
        self.full_row = int(self.rows[0])  # the row that accepts every draft

    def inputs(self, T: Optional[int] = None) -> dict:
        c = self.case
        H, HV, K, V = c.shape
        inputs = make_step_inputs(self.B, c.T if T is None else T, H, HV, K, V, io_dtype=self.io_dtype,
                                  gates=c.gates, bias_dtype=TORCH_DTYPES[c.bias], packed=c.packed, device=DEVICE)
        if c.gates == "raw":
            inputs.update(A_log=self.A_log, dt_bias=self.dt_bias)
        if not c.l2:
            # Without the in-kernel norm, |k| ~ 1 keeps the delta rule contractive over the whole run
            # (raw randn keys, |k|^2 ~ K, would blow the state up within a few steps).
            inputs["k"] = (inputs["k"].float() * K ** -0.5).to(self.io_dtype)
        return inputs

    def accepted(self) -> torch.Tensor:
        """Random accepted counts 0..T ([B] int32, host); one live row (full_row) always accepts every draft,
        so its ring fills and folds within a few steps."""
        n = torch.randint(0, self.case.T + 1, (self.B,), generator=self.gen, dtype=torch.int32)
        n[self.full_row] = self.case.T
        return n

    def step(self, inputs: Optional[dict] = None, accepted: Optional[torch.Tensor] = None) -> torch.Tensor:
        """replay_verify + replay_commit and verify + commit on the same inputs; checks everything the step
        must have done. Returns the replay outputs."""
        c = self.case
        T = c.T
        H, HV = c.shape[:2]
        inputs = self.inputs() if inputs is None else inputs
        accepted = self.accepted() if accepted is None else accepted
        slots = self.slots.tolist()
        ck_before, pool_before = self.ck.clone(), self.pool.clone()
        folds = self.model.verify(slots)
        positions = {s: self.model.candidate_positions(s, T) for s in folds}

        o = replay.replay_verify(**inputs, state=self.ck, state_indices=self.slots, ring=self.ring,
                                 cursors=self.cursors, scale=self.scale, use_qk_l2norm=c.l2)
        o_cached = cached_verify(c, inputs, self.pool, self.slots, self.cache, self.cache_idx, self.scale, c.l2)
        n = accepted.to(DEVICE)
        replay.replay_commit(self.cursors, self.slots, n)
        cute_gdn.commit(self.pool, self.slots, self.cache, self.cache_idx, n)
        self.model.commit(slots, accepted.tolist())
        _sync()

        # Outputs: zero on padding rows; live rows within the fp64 reference's tolerance (2x the error of the
        # fp32 recurrence from the same state, rounded to the io dtype) and next to the cached outputs.
        pad = self.slots < 0
        assert torch.equal(o[pad], torch.zeros_like(o[pad])), "padding rows must be zero"
        o64, states64, u64 = _window(inputs, self.rows, self.ref, torch.float64, scale=self.scale, l2=c.l2)
        o32, _, u32 = _window(inputs, self.rows, pool_before[self.live], torch.float32, scale=self.scale, l2=c.l2)
        err32 = rel_rms(o32.to(self.io_dtype), o64)
        err = rel_rms(o[self.rows], o64)
        assert err <= 2 * err32 + 2e-3, (err, err32)
        assert rel_rms(o[self.rows], o_cached[self.rows]) <= 2 * err32 + 1e-3

        # The ring: each candidate's raw k and v bit for bit, its (g, beta) and its delta u, at the
        # positions the cursor rule gives.
        g32, beta32 = (x[self.rows] for x in _gates(inputs, torch.float32))
        d = []
        for i, (b, s) in enumerate(zip(self.rows.tolist(), self.live.tolist())):
            p = torch.tensor(positions[s], device=DEVICE)
            assert torch.equal(self.ring.k[s][:, p], inputs["k"][b].transpose(0, 1)), (b, s)
            assert torch.equal(self.ring.v[s][:, p], inputs["v"][b].transpose(0, 1)), (b, s)
            gb = self.ring.gb[s][:, p]  # [HV, T, 4]: g, beta, k scale, unused
            if c.gates == "precomputed":  # stored as given
                assert torch.equal(gb[..., 0], g32[i].T) and torch.equal(gb[..., 1], beta32[i].T)
            else:
                torch.testing.assert_close(gb[..., 0], g32[i].T, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(gb[..., 1], beta32[i].T, rtol=1e-5, atol=1e-6)
            # The factor verify normalized k with (1 without the norm), per value head's q/k head.
            k_scale = torch.ones(T, H, device=DEVICE)
            if c.l2:
                k_scale = torch.rsqrt(inputs["k"][b].float().square().sum(-1) + reference.L2NORM_EPS)  # [T, H]
            k_scale = k_scale.repeat_interleave(HV // H, dim=1).T  # [HV, T]
            torch.testing.assert_close(gb[..., 2], k_scale, rtol=1e-5, atol=0)
            d.append(self.ring.d[s][:, p].transpose(0, 1))  # [T, HV, V]
        err_d = rel_rms(torch.stack(d), u64)
        assert err_d <= 2 * rel_rms(u32, u64) + 2e-5, err_d

        # The checkpoint: a folding row's is the cached state before this step, bit for bit (same tile);
        # every other slot is untouched.
        folded = torch.zeros(POOL, dtype=torch.bool, device=DEVICE)
        for s, f in folds.items():
            folded[s] = f
        if c.fold == "exact":
            assert torch.equal(self.ck[folded], pool_before[folded]), "a fold must equal verify + commit"
        elif bool(folded.any()):
            err = rel_rms(self.ck[folded], pool_before[folded])
            assert err <= COMPACT_STATE_TOL, ("a compact fold must be the same state", err)
        assert torch.equal(self.ck[~folded], ck_before[~folded]), "replay_verify writes only folding rows"
        self.folds += int(folded.sum())
        assert self.model.matches(self.cursors), (self.cursors.pos.tolist(), self.model.pos.tolist())

        self.ref = _advance(self.ref, states64, accepted[self.rows.cpu()])
        self.check_flushed()
        return o

    def check_flushed(self) -> None:
        """The requests' states (flushed copies of the same batch, so the flush folds in the tile the steps
        ran in) against the cached pool: bit-identical in fp32."""
        flushed, cursors = _flushed(self.ck, self.ring, self.cursors, self.slots, self.case.l2)
        _sync()
        model = CursorModel(self.model.pos, L, self.case.max_tokens)
        model.flush(self.slots.tolist())
        assert model.matches(cursors), "flush empties the named rings: start += count, count = 0"
        if self.case.fold == "exact":
            assert torch.equal(flushed, self.pool), "checkpoint + records must equal the cached state"
        else:
            assert rel_rms(flushed[self.live], self.pool[self.live]) <= COMPACT_STATE_TOL
            others = torch.ones(POOL, dtype=torch.bool, device=DEVICE)
            others[self.live] = False
            assert torch.equal(flushed[others], self.pool[others])

    def flush(self) -> None:
        """A real flush of the batch's rows: afterwards the checkpoint is the request's state."""
        replay.replay_flush(self.ck, self.ring, self.cursors, self.slots, use_qk_l2norm=self.case.l2)
        self.model.flush(self.slots.tolist())
        _sync()
        assert self.model.matches(self.cursors)

    def check_untouched(self) -> None:
        """Slots outside the batch: state (both modes), ring records and cursors bit-identical."""
        others = torch.ones(POOL, dtype=torch.bool, device=DEVICE)
        others[self.live] = False
        assert torch.equal(self.ck[others], self.pool0[others])
        assert torch.equal(self.pool[others], self.pool0[others])
        for field in replay.ReplayRing._fields:
            assert torch.equal(getattr(self.ring, field)[others], getattr(self.ring0, field)[others]), field
        assert self.model.matches(self.cursors)


def _run_pair(case: Case, B: int, pad, seed: int, steps: int = 12) -> None:
    """`steps` checked steps (Pair.step), at least two folds, untouched slots bit-identical."""
    pair = Pair(case, B, pad=pad, seed=seed)
    for _ in range(steps):
        pair.step()
    assert pair.folds >= 2, "the run must have folded"
    pair.check_untouched()


@pytest.mark.parametrize("name", list(EXACT_CASES))
def test_replay_matches_cached_bit_for_bit(name):
    case, B, pad = EXACT_CASES[name]
    _run_pair(case, B, pad, seed=1)


@pytest.mark.parametrize("name", list(COMPACT_CASES))
def test_compact_fold_matches_cached(name):
    """fold="compact": outputs, ring records, cursors and untouched slots as in exact mode; the folded
    checkpoint and the flushed state within COMPACT_STATE_TOL of verify + commit."""
    case, B, pad = COMPACT_CASES[name]
    _run_pair(case, B, pad, seed=7)


@pytest.mark.parametrize("name", list(VARIANT_CASES))
def test_replay_variants_match_cached(name):
    case = VARIANT_CASES[name]
    pair = Pair(case, 5, pad=(0,), seed=2)
    if case.packed:
        assert not pair.inputs()["q"].is_contiguous()
    for _ in range(10):
        pair.step()
    assert pair.folds >= 1
    pair.check_untouched()


@pytest.mark.parametrize("name", list(TOKEN_CASES))
def test_replay_token_counts(name):
    """T = 1 and 2 with rings made for up to 4 drafts; T = 8 (fold threshold 0)."""
    pair = Pair(TOKEN_CASES[name], 5, pad=(4,), seed=3)
    for _ in range(12):
        pair.step()
    assert pair.folds >= 1
    pair.check_untouched()


def test_flush_then_decode_then_speculate_again():
    """A request leaves speculative mode (flush), decodes, comes back; then a slot is handed to a new
    request mid-run (reset_cursors): its stale records must be ignored."""
    pair = Pair(BASE, 5, pad=(2,), seed=4)
    # The slot handed over below is not slot 0 (slot 0 next to a padding row is tests/test_replay.py's
    # reset_cursors case), and its row accepts every draft so that it holds records to ignore.
    i = next(j for j, s in enumerate(pair.live.tolist()) if s != 0)
    pair.full_row = int(pair.rows[i])
    for _ in range(7):
        pair.step()
    pair.flush()
    assert torch.equal(pair.ck, pair.pool), "after a flush the checkpoint is the request's state"
    inputs = pair.inputs(T=1)
    o = cute_gdn.decode(**inputs, state=pair.ck, state_indices=pair.slots)
    o_cached = cute_gdn.decode(**inputs, state=pair.pool, state_indices=pair.slots)
    _sync()
    assert torch.equal(o, o_cached) and torch.equal(pair.ck, pair.pool)
    o64, states64, _ = _window(inputs, pair.rows, pair.ref, torch.float64)
    o32, _, _ = _window(inputs, pair.rows, pair.ref.float(), torch.float32)
    assert rel_rms(o[pair.rows], o64) <= 2 * rel_rms(o32.to(pair.io_dtype), o64) + 2e-3
    pair.ref = states64[:, 0]
    for _ in range(4):
        pair.step()
    # That slot goes to a new request: a new state in both modes, its cursor reset (padding skipped).
    slot = int(pair.live[i])
    assert int(pair.cursors.pos[slot, 1]) > 0, "the slot must hold committed records to ignore"
    fresh = make_pool(1, *pair.pool.shape[1:], pair.state_dtype, device=DEVICE)[0]
    pair.ck[slot], pair.pool[slot] = fresh, fresh
    pair.ref[i] = fresh.double()
    replay.reset_cursors(pair.cursors, torch.tensor([slot, -1], dtype=torch.int32, device=DEVICE))
    pair.model.reset([slot])
    assert pair.model.matches(pair.cursors)
    for _ in range(6):
        pair.step()
    pair.check_untouched()


def test_all_padding_writes_nothing():
    torch.manual_seed(5)
    H, HV, K, V = NARROW
    B, T = 3, 4
    inputs = make_step_inputs(B, T, H, HV, K, V, device=DEVICE)
    state = make_pool(POOL, HV, V, K, torch.float32, device=DEVICE)
    ring = _stale_ring(H, HV, K, V, torch.bfloat16)
    cursors = replay.make_replay_cursors(POOL, max_tokens=T, ring_len=L, device=DEVICE)
    cursors.pos.copy_(_random_cursors(T))
    before = state.clone(), _clone_ring(ring), cursors.pos.clone()
    slots = torch.full((B,), -1, dtype=torch.int32, device=DEVICE)
    out = torch.full_like(inputs["v"], float("nan"))
    replay.replay_verify(**inputs, state=state, state_indices=slots, ring=ring, cursors=cursors, out=out)
    replay.replay_commit(cursors, slots, torch.full((B,), T, dtype=torch.int32, device=DEVICE))
    replay.replay_flush(state, ring, cursors, slots)
    _sync()
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(state, before[0]) and torch.equal(cursors.pos, before[2])
    assert all(torch.equal(x, y) for x, y in zip(ring, before[1]))


# ---------------------------------------------------------------------------------------------------
# Long runs: the error of the replayed state stays flat
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("state", list(LONG_CASES))
def test_long_run_error_is_flat(state):
    """500 steps, random accepts: the request's state (flushed copy, every 10 steps) and the outputs
    against an fp64 recurrence of every committed token. Windows of 50 steps: the last window's error is
    within 1.5x the first's, and every window within 2x the error of the cached protocol in the state's
    dtype (emulated in torch: fp32 arithmetic, the state rounded at every commit). A bf16 checkpoint is
    rounded once per fold instead of once per commit, so it is not bit-exact, but it must not drift."""
    case = LONG_CASES[state]
    H, HV, K, V = case.shape
    B, T, steps, every, window = 4, case.T, 500, 10, 50
    torch.manual_seed(6)
    dtype = TORCH_DTYPES[case.state]
    pool0 = make_pool(POOL, HV, V, K, dtype, device=DEVICE)
    ck = pool0.clone()
    ring = replay.make_replay_ring(POOL, H, HV, K, V, ring_len=L, device=DEVICE)
    cursors = replay.make_replay_cursors(POOL, max_tokens=T, ring_len=L, fold=case.fold, device=DEVICE)
    slots = _slots(B)
    rows = torch.arange(B, device=DEVICE)
    ref = pool0[slots.long()].double()
    own = pool0[slots.long()].clone()
    # Weak decay (g about -0.1 per token): the state remembers tens of tokens, so a fold that leaked error
    # into later checkpoints would pile it up instead of forgetting it.
    A_log = -2.5 + 0.5 * torch.rand(HV, device=DEVICE)
    dt_bias = torch.randn(HV, device=DEVICE)
    gen = torch.Generator().manual_seed(6)
    errs = {"o": [], "o_own": [], "state": [], "state_own": []}
    folds = 0
    model = CursorModel(cursors.pos, L, T)
    for step in range(steps):
        inputs = make_step_inputs(B, T, H, HV, K, V, device=DEVICE)
        inputs.update(A_log=A_log, dt_bias=dt_bias)
        accepted = torch.randint(0, T + 1, (B,), generator=gen, dtype=torch.int32)
        folds += sum(model.verify(slots.tolist()).values())
        o = replay.replay_verify(**inputs, state=ck, state_indices=slots, ring=ring, cursors=cursors)
        replay.replay_commit(cursors, slots, accepted.to(DEVICE))
        model.commit(slots.tolist(), accepted.tolist())
        o64, states64, _ = _window(inputs, rows, ref, torch.float64)
        o32, states32, _ = _window(inputs, rows, own.float(), torch.float32)
        ref = _advance(ref, states64, accepted)
        own = _advance(own, states32.to(dtype), accepted)
        errs["o"].append(rel_rms(o, o64))
        errs["o_own"].append(rel_rms(o32.to(o.dtype), o64))
        if (step + 1) % every == 0:
            flushed, _ = _flushed(ck, ring, cursors, slots)
            errs["state"].append(rel_rms(flushed[slots.long()], ref))
            errs["state_own"].append(rel_rms(own, ref))
    assert model.matches(cursors) and folds > steps // 2
    state = case.state
    flat_atol = {"float32": 1e-6, "bfloat16": 1e-4}[state]
    for key, per_window in (("o", window), ("state", window // every)):
        means = [sum(x) / len(x) for x in _chunks(errs[key], per_window)]
        own_means = [sum(x) / len(x) for x in _chunks(errs[key + "_own"], per_window)]
        assert len(means) == steps // window
        assert means[-1] <= 1.5 * means[0] + flat_atol, (key, means)
        atol = {"o": 2e-3, "state": 1e-5 if state == "float32" else 1e-3}[key]
        for m, m_own in zip(means, own_means):
            assert m <= 2 * m_own + atol, (key, means, own_means)


def _chunks(xs: list, n: int) -> list:
    return [xs[i:i + n] for i in range(0, len(xs), n)]


# ---------------------------------------------------------------------------------------------------
# SGLang's ReplaySSM on the same inputs
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def replayssm():
    if sglang_peer.sglang_dir() is None:
        pytest.skip("sglang 0.5.23 not found (.gpu-site/sglang, CUTE_GDN_SGLANG_DIR or pip --no-deps)")
    return sglang_peer.load_replayssm()


# fp32 records with fp32 dots: the two differ by fp32 rounding, seen through the bf16 outputs. SGLang's own
# configuration (bf16 d and normalized-k records, TF32 dots) adds ~2e-3 of its own.
SGLANG_CASES = {"fp32-records-ieee": ("float32", "ieee", 5e-3), "bf16-records-tf32": ("bfloat16", "tf32", 1e-2)}


@pytest.mark.parametrize("name", list(SGLANG_CASES))
def test_matches_sglang_replayssm(replayssm, name):
    """SGLang's gdn_replayssm_spec_decode (launch_mode "both") + commit_gdn_replayssm_spec against
    replay_verify + replay_commit, fp32 checkpoint, raw gates: outputs, the checkpoints (both fold exactly,
    at the same steps), and the cursors (write_pos = count; cache_base = start while count > 0; is_flush =
    the next verify folds)."""
    records, precision, tol_o = SGLANG_CASES[name]
    H, HV, K, V = NARROW
    B, T = 5, 4
    torch.manual_seed(8)
    pool0 = make_pool(POOL, HV, V, K, torch.float32, device=DEVICE)
    ours, theirs = pool0.clone(), pool0.clone()
    ring = replay.make_replay_ring(POOL, H, HV, K, V, ring_len=L, device=DEVICE)
    cursors = replay.make_replay_cursors(POOL, max_tokens=T, ring_len=L, device=DEVICE)
    peer = sglang_peer.ReplaySSMLayer(POOL, H, HV, K, V, ring_len=L, max_spec_len=T,
                                      record_dtype=TORCH_DTYPES[records], device=DEVICE)
    slots = _slots(B, pad=(2,))
    rows = (slots >= 0).nonzero().squeeze(1)
    live = slots[rows].long()
    others = torch.ones(POOL, dtype=torch.bool, device=DEVICE)
    others[live] = False
    model = CursorModel(cursors.pos, L, T)
    A_log = torch.rand(HV, device=DEVICE) * 2 - 1
    dt_bias = torch.randn(HV, device=DEVICE)
    gen = torch.Generator().manual_seed(8)
    folds = 0
    for step in range(14):
        inputs = make_step_inputs(B, T, H, HV, K, V, device=DEVICE)
        inputs.update(A_log=A_log, dt_bias=dt_bias)
        accepted = torch.randint(0, T + 1, (B,), generator=gen, dtype=torch.int32)
        accepted[int(rows[0])] = T
        folds += sum(model.verify(slots.tolist()).values())
        o = replay.replay_verify(**inputs, state=ours, state_indices=slots, ring=ring, cursors=cursors)
        o_sg = peer.verify(**inputs, state=theirs, state_indices=slots, dot_precision=precision)
        replay.replay_commit(cursors, slots, accepted.to(DEVICE))
        peer.commit(slots, accepted.to(DEVICE))
        model.commit(slots.tolist(), accepted.tolist())
        _sync()
        err_o = rel_rms(o[rows], o_sg[rows])
        assert err_o < tol_o, (step, err_o)
        pad = slots < 0
        assert torch.equal(o[pad], torch.zeros_like(o[pad])) and torch.equal(o_sg[pad], torch.zeros_like(o_sg[pad]))
        err_s = rel_rms(ours[live], theirs[live])
        assert err_s < 1e-5, (step, err_s)
        assert torch.equal(ours[others], pool0[others]) and torch.equal(theirs[others], pool0[others])
        pos = cursors.pos[live].long()
        assert torch.equal(pos[:, 1], peer.write_pos[live].long()), step
        # Ring start positions are each implementation's own bookkeeping (SGLang keeps its base when a folding
        # row accepts nothing, ours moves it past the folded records; both rings are then empty), so only the
        # committed counts and the fold decisions are compared.
        assert torch.equal(peer.is_flush[live].bool(), pos[:, 1] > model.threshold), step
    assert folds >= 2 and model.matches(cursors)


# ---------------------------------------------------------------------------------------------------
# CUDA graphs and bad arguments
# ---------------------------------------------------------------------------------------------------

def test_cuda_graph_replay_matches_eager():
    """One captured step (replay_verify + replay_commit) replayed over fresh inputs: the fold decision is
    made on the device, so graph and eager runs agree bit for bit, folds included."""
    torch.manual_seed(9)
    H, HV, K, V = NARROW
    B, T = 6, 4
    pool0 = make_pool(POOL, HV, V, K, torch.float32, device=DEVICE)
    ring0 = _stale_ring(H, HV, K, V, torch.bfloat16)
    slots = _slots(B, pad=(4,))
    cursors0 = replay.make_replay_cursors(POOL, max_tokens=T, ring_len=L, device=DEVICE)
    A_log, dt_bias = torch.rand(HV, device=DEVICE) * 2 - 1, torch.randn(HV, device=DEVICE)

    def inputs():
        x = make_step_inputs(B, T, H, HV, K, V, device=DEVICE)
        x.update(A_log=A_log, dt_bias=dt_bias)
        return x

    eager = [pool0.clone(), _clone_ring(ring0), _clone_cursors(cursors0)]
    graph_state = [pool0.clone(), _clone_ring(ring0), _clone_cursors(cursors0)]
    static, static_n = inputs(), torch.zeros(B, dtype=torch.int32, device=DEVICE)
    out = torch.empty_like(static["v"])
    # Load the kernels outside the capture (on copies).
    scratch_cursors = _clone_cursors(cursors0)
    replay.replay_verify(**static, state=pool0.clone(), state_indices=slots, ring=_clone_ring(ring0),
                         cursors=scratch_cursors)
    replay.replay_commit(scratch_cursors, slots, static_n)
    _sync()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replay.replay_verify(**static, state=graph_state[0], state_indices=slots, ring=graph_state[1],
                             cursors=graph_state[2], out=out)
        replay.replay_commit(graph_state[2], slots, static_n)
    model = CursorModel(cursors0.pos, L, T)
    gen = torch.Generator().manual_seed(9)
    folds = 0
    for step in range(10):
        x = inputs()
        n = torch.randint(0, T + 1, (B,), generator=gen, dtype=torch.int32)
        n[0] = T
        for name, t in x.items():
            static[name].copy_(t)
        static_n.copy_(n)
        graph.replay()
        o = replay.replay_verify(**x, state=eager[0], state_indices=slots, ring=eager[1], cursors=eager[2])
        replay.replay_commit(eager[2], slots, n.to(DEVICE))
        folds += sum(model.verify(slots.tolist()).values())
        model.commit(slots.tolist(), n.tolist())
        _sync()
        assert torch.equal(out, o), step
        assert torch.equal(graph_state[0], eager[0]), step
        assert all(torch.equal(x, y) for x, y in zip(graph_state[1], eager[1])), step
        assert torch.equal(graph_state[2].pos, eager[2].pos) and model.matches(eager[2]), step
    assert folds >= 2


# "ring type": replay._replay_verify reaches `ring.k` on the hot path (AttributeError, not the TypeError naming
# `ring`); tests/test_replay.py has the same case on the CPU.
BAD_CASES = ["ring type", "ring_len", "T above max_tokens", "ring.v dtype", "ring.k heads", "cursors.pos dtype"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_replay_verify_bad_arguments_raise_before_any_write(case):
    torch.manual_seed(10)
    H, HV, K, V = NARROW
    B, T = 4, 4
    good = make_step_inputs(B, T, H, HV, K, V, device=DEVICE)
    state = make_pool(POOL, HV, V, K, torch.float32, device=DEVICE)
    ring = _stale_ring(H, HV, K, V, torch.bfloat16)
    cursors = replay.make_replay_cursors(POOL, max_tokens=T, ring_len=L, device=DEVICE)
    slots = _slots(B)
    # The valid signature is loaded first, so each bad call below takes the hot path where it can.
    replay.replay_verify(**good, state=state.clone(), state_indices=slots, ring=_clone_ring(ring),
                         cursors=_clone_cursors(cursors))
    kwargs = dict(good, state=state, state_indices=slots, ring=ring, cursors=cursors)
    name = case.split()[0] if case != "T above max_tokens" else "max_tokens"
    if case == "ring type":
        kwargs["ring"] = tuple(ring)
    elif case == "ring_len":
        kwargs["ring"] = replay.make_replay_ring(POOL, H, HV, K, V, ring_len=L // 2, device=DEVICE)
    elif case == "T above max_tokens":
        kwargs.update(make_step_inputs(B, T + 1, H, HV, K, V, device=DEVICE))
    elif case == "ring.v dtype":
        kwargs["ring"] = ring._replace(v=ring.v.to(torch.float16))
    elif case == "ring.k heads":
        kwargs["ring"] = ring._replace(k=torch.zeros(POOL, H * 2, L, K, dtype=torch.bfloat16, device=DEVICE))
    else:
        kwargs["cursors"] = cursors._replace(pos=cursors.pos.long())
    before = state.clone(), _clone_ring(ring), cursors.pos.clone()
    with pytest.raises((ValueError, TypeError), match=name):
        replay.replay_verify(**kwargs)
    _sync()
    assert torch.equal(state, before[0]) and torch.equal(cursors.pos, before[2])
    assert all(torch.equal(x, y) for x, y in zip(ring, before[1]))
