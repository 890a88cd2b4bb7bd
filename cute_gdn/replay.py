"""Replay speculative decoding: a checkpoint plus a ring of per-token records, rollback by a cursor.

The cached protocol (`verify` + `commit`) writes every intermediate state and copies the accepted one:
(1 + T) + 2 state-sizes of traffic per step and T extra states per request. The replay protocol moves
about one state-size per step:

- The pool slot is the *checkpoint*: the state before the request's committed-but-unfolded tokens.
- A per-slot *ring* of `ring_len` (L) records holds, per token: raw k (io dtype, before the L2 norm),
  raw v (io dtype), the delta u = beta * (v - exp(g) S k) (fp32, for the output path) and (g, beta,
  k scale) (fp32; k scale is the factor verify normalized k with). Raw k/v, g, beta and the k scale
  are what an exact fold needs; u and k are what the output path needs.
- Per-slot *cursors* `(start, count)` (int32, on the device, shared by every layer): the committed
  records are ring positions start, start + 1, ..., start + count - 1 (mod L).

`replay_verify` reads the checkpoint once and computes the T outputs from it, the committed records
and the T candidates without materializing any state (docs/verify.md has the algebra); it writes the
T candidate records at positions start + count + t (mod L) and its outputs, never the checkpoint --
except on a *fold*: a row whose ring would not have room for the next step's candidates
(count > L - 2 * max_tokens) rewrites its checkpoint from its committed records: with cursors of
fold="exact" first, by the same recurrence in the same fp32 arithmetic as `verify` (bit-identical), then
its outputs from the folded state; with fold="compact" after its outputs, as exp(G) S0 plus the records'
rank-one terms (the same state, rounded differently; make_replay_cursors). The choice is made per row on the device, so the step needs no host sync and stays
capturable in a CUDA graph. `replay_commit` of n accepted tokens per row is a cursor move (count += n,
or, after a fold, start += count and count = n); `replay_flush` folds everything now.

Contract: every `replay_verify` is followed by a `replay_commit` of the same rows (num_accepted = 0
rejects every draft) before the next `replay_verify`, so a fold is never applied twice. Decode and
prefill read and write the checkpoint only: flush a request (or make sure its count is 0) before it
leaves speculative mode, is evicted, is prefix-cached or goes through prefill/decode; a freshly
(re)assigned slot needs its cursor zeroed (`reset_cursors`, or a flush).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch

from . import _checks as chk
from . import ops
from .cache import KernelCache, KernelKey, default_cache
from .kernels.replay import FOLD_MODES, LARGE_BATCH_HEADS, MAX_RING_LEN, check_ring, fold_threshold, replay_tile
from .kernels.verify import MAX_TOKENS, VerifyConfig

DEFAULT_RING_LEN = 16


class ReplayRing(NamedTuple):
    """One layer's ring of records, indexed by pool slot (the state's slot indices)."""
    k: torch.Tensor   # [pool_size, H, L, K] io dtype: raw keys (before the L2 norm)
    v: torch.Tensor   # [pool_size, HV, L, V] io dtype: raw values
    d: torch.Tensor   # [pool_size, HV, L, V] fp32: the delta u of each record
    gb: torch.Tensor  # [pool_size, HV, L, 4] fp32: (g, beta, k scale, unused) of each record

    @property
    def ring_len(self) -> int:
        return self.k.shape[2]


class ReplayCursors(NamedTuple):
    """Per-slot cursors shared by every layer: pos[slot] = (start, count) int32 on the device."""
    pos: torch.Tensor  # [pool_size, 2] int32
    ring_len: int
    max_tokens: int    # the largest T a verify on these rings may take (sets the fold threshold)
    fold: str = "exact"  # how replay_verify folds a full ring: "exact" or "compact" (see make_replay_cursors)

    @property
    def fold_threshold(self) -> int:
        return fold_threshold(self.ring_len, self.max_tokens)


# fold_threshold(ring_len, max_tokens) is the kernels' own rule (kernels/replay.py), re-exported here.
check_ring_config = check_ring  # None if (ring_len, max_tokens) is supported, else the reason


def ring_bytes(num_heads: int, num_v_heads: int, head_k_dim: int, head_v_dim: int, ring_len: int,
               io_dtype: torch.dtype = torch.bfloat16) -> int:
    """Ring memory per request (pool slot) per layer, in bytes (cursors not counted: 8 bytes per slot)."""
    io = torch.empty((), dtype=io_dtype).element_size()
    per_token = num_heads * head_k_dim * io + num_v_heads * (head_v_dim * io + head_v_dim * 4 + 16)
    return ring_len * per_token


def make_replay_ring(pool_size: int, num_heads: int, num_v_heads: int, head_k_dim: int, head_v_dim: int, *,
                     ring_len: int = DEFAULT_RING_LEN, io_dtype: torch.dtype = torch.bfloat16,
                     device="cuda") -> ReplayRing:
    """A zeroed ring for one layer (`ring_bytes` per slot)."""
    if io_dtype not in chk.IO_DTYPES:
        raise TypeError(f"io_dtype must be one of {list(chk.IO_DTYPES)}, got {io_dtype}")
    if not 1 <= ring_len <= MAX_RING_LEN:
        raise ValueError(f"ring_len must be in [1, {MAX_RING_LEN}], got {ring_len}")
    L = ring_len
    return ReplayRing(
        k=torch.zeros(pool_size, num_heads, L, head_k_dim, dtype=io_dtype, device=device),
        v=torch.zeros(pool_size, num_v_heads, L, head_v_dim, dtype=io_dtype, device=device),
        d=torch.zeros(pool_size, num_v_heads, L, head_v_dim, dtype=torch.float32, device=device),
        gb=torch.zeros(pool_size, num_v_heads, L, 4, dtype=torch.float32, device=device),
    )


def make_replay_cursors(pool_size: int, *, max_tokens: int, ring_len: int = DEFAULT_RING_LEN, fold: str = "exact",
                        device="cuda") -> ReplayCursors:
    """Zeroed cursors (every ring empty) for a pool of pool_size slots.

    fold picks how replay_verify folds a full ring into the checkpoint (the protocol, cursors and ring are
    the same for both): "exact" replays the recurrence from the raw records, bit-identical to verify +
    commit in the same tile; "compact" adds the records' rank-one terms exp(G_{c-1} - G_j) u_j k_j^T (the same
    state, rounded differently; its error stays flat, tests/test_replay_gpu.py) at a fraction of the cost.
    replay_flush always folds exactly."""
    reason = check_ring_config(ring_len, max_tokens)
    if reason is not None:
        raise ValueError(reason)
    if fold not in FOLD_MODES:
        raise ValueError(f"fold must be one of {FOLD_MODES}, got {fold!r}")
    return ReplayCursors(torch.zeros(pool_size, 2, dtype=torch.int32, device=device), ring_len, max_tokens, fold)


def reset_cursors(cursors: ReplayCursors, state_indices: torch.Tensor) -> None:
    """Empty the rings of the named slots (a slot given to a new request); padding (< 0) is skipped.
    Capturable: no host sync."""
    idx = state_indices.to(torch.int64)
    keep = (idx >= 0).to(torch.int32)
    safe = torch.where(idx >= 0, idx, torch.zeros_like(idx))
    # A mask over slots (max over duplicates, so padding rows redirected to slot 0 cannot undo a reset).
    hit = torch.zeros(cursors.pos.shape[0], dtype=torch.int32, device=cursors.pos.device)
    hit.scatter_reduce_(0, safe, keep, "amax")
    cursors.pos.mul_((1 - hit)[:, None])


# ---------------------------------------------------------------------------------------------------
# Kernel keys
# ---------------------------------------------------------------------------------------------------

def replay_verify_key(*, io_dtype: str, state_dtype: str, num_heads: int, num_v_heads: int, head_k_dim: int,
                      head_v_dim: int, pool_size: int, num_tokens: int, max_tokens: int, ring_len: int,
                      gate_mode: str, dt_bias_dtype: Optional[str], use_qk_l2norm: bool,
                      config: Optional[VerifyConfig] = None, large_batch: bool = False,
                      fold_mode: str = "exact") -> KernelKey:
    """The key of one replay verify kernel (T = num_tokens; num_tokens = 0 is the flush kernel, always exact)."""
    return KernelKey.make(
        "replay", io_dtype=io_dtype, state_dtype=state_dtype, num_heads=num_heads, num_v_heads=num_v_heads,
        head_k_dim=head_k_dim, head_v_dim=head_v_dim, pool_size=pool_size, num_tokens=num_tokens,
        max_tokens=max_tokens, ring_len=ring_len, gate_mode=gate_mode, dt_bias_dtype=dt_bias_dtype,
        use_qk_l2norm=bool(use_qk_l2norm), fold_mode=fold_mode if num_tokens else "exact",
        config=config or replay_tile(head_k_dim, head_v_dim, state_dtype, large_batch,
                                     fold_mode if num_tokens else "exact", num_tokens=num_tokens,
                                     ring_len=ring_len))


def replay_verify_keys(**kwargs) -> tuple[KernelKey, KernelKey]:
    """The (small-batch, large-batch) pair one replay verify signature dispatches between."""
    return replay_verify_key(**kwargs, large_batch=False), replay_verify_key(**kwargs, large_batch=True)


def replay_flush_key(*, io_dtype: str, state_dtype: str, num_heads: int, num_v_heads: int, head_k_dim: int,
                     head_v_dim: int, pool_size: int, max_tokens: int, ring_len: int, use_qk_l2norm: bool,
                     config: Optional[VerifyConfig] = None, large_batch: bool = False) -> KernelKey:
    """The fold-everything kernel (no tokens, no gates), in verify's small- or large-batch tile: a fold
    rounds like the verify tile it runs in, so flush picks the tile by B * HV as verify does."""
    return replay_verify_key(io_dtype=io_dtype, state_dtype=state_dtype, num_heads=num_heads,
                             num_v_heads=num_v_heads, head_k_dim=head_k_dim, head_v_dim=head_v_dim,
                             pool_size=pool_size, num_tokens=0, max_tokens=max_tokens, ring_len=ring_len,
                             gate_mode="precomputed", dt_bias_dtype=None, use_qk_l2norm=use_qk_l2norm,
                             config=config, large_batch=large_batch)


def replay_flush_keys(**kwargs) -> tuple[KernelKey, KernelKey]:
    return replay_flush_key(**kwargs, large_batch=False), replay_flush_key(**kwargs, large_batch=True)


def replay_cursor_key(*, pool_size: int, ring_len: int, max_tokens: int, mode: str) -> KernelKey:
    """The cursor kernel: mode "commit" (advance by the accepted counts) or "flush" (empty after a fold)."""
    return KernelKey.make("replay_cursor", pool_size=pool_size, ring_len=ring_len, max_tokens=max_tokens,
                          mode=mode)


def config_keys(*, io_dtype: str, state_dtype: str, num_heads: int, num_v_heads: int, head_k_dim: int,
                head_v_dim: int, pool_size: int, max_tokens: int, ring_len: int, use_qk_l2norm: bool,
                gate_variants: Sequence[tuple[str, Optional[str]]], fold_mode: str = "exact") -> list[KernelKey]:
    """Every kernel the replay mode of a serving config needs: verify for T = 1..max_tokens in both tiles
    and every gate variant, the flush kernel in both tiles and both cursor kernels."""
    problem = dict(io_dtype=io_dtype, state_dtype=state_dtype, num_heads=num_heads, num_v_heads=num_v_heads,
                   head_k_dim=head_k_dim, head_v_dim=head_v_dim, pool_size=pool_size, max_tokens=max_tokens,
                   ring_len=ring_len, use_qk_l2norm=use_qk_l2norm)
    keys = []
    for num_tokens in range(1, max_tokens + 1):
        for gate_mode, bias in gate_variants:
            keys += replay_verify_keys(num_tokens=num_tokens, gate_mode=gate_mode, dt_bias_dtype=bias,
                                       fold_mode=fold_mode, **problem)
    keys += replay_flush_keys(**problem)
    for mode in ("commit", "flush"):
        keys.append(replay_cursor_key(pool_size=pool_size, ring_len=ring_len, max_tokens=max_tokens, mode=mode))
    return list(dict.fromkeys(keys))


# ---------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------

def validate_ring(name: str, ring, state: torch.Tensor, num_heads: int, head_k_dim: int, io_dtype) -> None:
    if not isinstance(ring, ReplayRing):
        raise TypeError(f"{name} must be a cute_gdn.ReplayRing (make_replay_ring), got {type(ring).__name__}")
    pool, HV, V, K = state.shape
    L = ring.k.shape[2] if isinstance(ring.k, torch.Tensor) and ring.k.dim() == 4 else None
    expected = {"k": ((pool, num_heads, L, head_k_dim), io_dtype), "v": ((pool, HV, L, V), io_dtype),
                "d": ((pool, HV, L, V), torch.float32), "gb": ((pool, HV, L, 4), torch.float32)}
    for field, (shape, dtype) in expected.items():
        x = getattr(ring, field)
        chk.tensor(f"{name}.{field}", x, 4, (dtype,), state.device)
        chk.shape(f"{name}.{field}", x, shape)
        chk.contiguous(f"{name}.{field}", x)
        if x.data_ptr() % 16:
            raise ValueError(f"{name}.{field} must be 16-byte aligned")


def validate_cursors(cursors, pool_size: int, device, ring_len: Optional[int] = None) -> None:
    if not isinstance(cursors, ReplayCursors):
        raise TypeError(f"cursors must be a cute_gdn.ReplayCursors (make_replay_cursors), "
                        f"got {type(cursors).__name__}")
    chk.tensor("cursors.pos", cursors.pos, 2, (torch.int32,), device)
    chk.shape("cursors.pos", cursors.pos, (pool_size, 2))
    chk.contiguous("cursors.pos", cursors.pos)
    reason = check_ring_config(cursors.ring_len, cursors.max_tokens)
    if reason is not None:
        raise ValueError(f"cursors: {reason}")
    if cursors.fold not in FOLD_MODES:
        raise ValueError(f"cursors.fold must be one of {FOLD_MODES}, got {cursors.fold!r}")
    if ring_len is not None and ring_len != cursors.ring_len:
        raise ValueError(f"ring has ring_len={ring_len} records but cursors were made for "
                         f"ring_len={cursors.ring_len}")


def validate_replay_verify(q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, ring, cursors,
                           out) -> tuple[str, Optional[str]]:
    """Every check of replay_verify's arguments; returns (gate mode, dt_bias dtype name)."""
    mode, bias_dtype = ops.validate_tokens(q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, out,
                                            "replay_verify", MAX_TOKENS)
    validate_ring("ring", ring, state, q.shape[2], q.shape[3], q.dtype)
    validate_cursors(cursors, state.shape[0], q.device, ring.ring_len)
    if q.shape[1] > cursors.max_tokens:
        raise ValueError(f"q has T={q.shape[1]} tokens per sequence but cursors allow at most "
                         f"max_tokens={cursors.max_tokens}")
    if not state.is_contiguous():
        raise ValueError("state must be contiguous")
    return mode, bias_dtype


# ---------------------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------------------

def _replay_types(ring, cursors) -> None:
    if type(ring) is not ReplayRing:
        raise TypeError(f"ring must be a cute_gdn.ReplayRing (make_replay_ring), got {type(ring).__name__}")
    if type(cursors) is not ReplayCursors:
        raise TypeError(f"cursors must be a cute_gdn.ReplayCursors (make_replay_cursors), "
                        f"got {type(cursors).__name__}")


def _verify_validate(q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, ring, cursors, scale,
                     use_qk_l2norm, out):
    _replay_types(ring, cursors)
    return validate_replay_verify(q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, ring, cursors, out)


def _verify_signature(q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, ring, cursors, scale,
                      use_qk_l2norm, out):
    _replay_types(ring, cursors)
    raw = ops.signature_gates(a, b, A_log, dt_bias, g, beta)
    B, T, H, K = q.shape
    _, _, HV, V = v.shape
    return ("replay", q.dtype, state.dtype, H, K, T, HV, V, state.shape[0], cursors.ring_len, cursors.max_tokens,
            cursors.fold, dt_bias.dtype if raw else None, bool(use_qk_l2norm),
            q.get_device() == state.get_device()), B


def _verify_load(kcache, allow_compile, check_config, args, validated):
    """Both tiles of the call's key: (large-batch threshold in B * HV, small kernel, large kernel)."""
    q, v, state, ring, cursors, use_qk_l2norm = args[0], args[2], args[9], args[11], args[12], args[14]
    mode, bias_dtype = validated
    if check_config is not None:
        check_config(q, state, ring, cursors)
    _, T, H, K = q.shape
    keys = replay_verify_keys(io_dtype=chk.IO_DTYPES[q.dtype], state_dtype=chk.STATE_DTYPES[state.dtype],
                              num_heads=H, num_v_heads=v.shape[2], head_k_dim=K, head_v_dim=v.shape[3],
                              pool_size=state.shape[0], num_tokens=T, max_tokens=cursors.max_tokens,
                              ring_len=cursors.ring_len, gate_mode=mode, dt_bias_dtype=bias_dtype,
                              use_qk_l2norm=use_qk_l2norm, fold_mode=cursors.fold)
    small, large = ops.load_kernels(kcache, keys, allow_compile)
    return (LARGE_BATCH_HEADS[chk.STATE_DTYPES[state.dtype]], small, large)


def _verify_launch(entry, q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, ring, cursors, scale,
                   use_qk_l2norm, out):
    out, fn, scale = ops.token_launch(entry, q, v, scale, out)
    if fn is None:
        return out
    if g is None:
        fn(q, k, v, a, b, A_log, dt_bias, state, state_indices, ring.k, ring.v, ring.d, ring.gb, cursors.pos, out,
           scale)
    else:
        fn(q, k, v, g, beta, None, None, state, state_indices, ring.k, ring.v, ring.d, ring.gb, cursors.pos, out,
           scale)
    return out


def _verify_debug(q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, ring, cursors, scale,
                  use_qk_l2norm, out):
    chk.debug_indices("state_indices", state_indices, state.shape[0])
    _debug_cursors(cursors, state_indices)


REPLAY_VERIFY = ops.OpPath(_verify_validate, _verify_signature, _verify_load, _verify_launch, _verify_debug)


def _replay_verify(kcache: KernelCache, allow_compile: bool, check_config, q, k, v, a, b, A_log, dt_bias, g, beta,
                   state, state_indices, ring, cursors, scale, use_qk_l2norm, out) -> torch.Tensor:
    return ops.run_op(REPLAY_VERIFY, kcache, allow_compile, check_config, (q, k, v, a, b, A_log, dt_bias, g, beta,
                                                                           state, state_indices, ring, cursors,
                                                                           scale, use_qk_l2norm, out))


def _debug_cursors(cursors: ReplayCursors, state_indices: torch.Tensor) -> None:
    live = state_indices[state_indices >= 0].long()
    pos = cursors.pos[live]
    bad = (pos[:, 0] < 0) | (pos[:, 0] >= cursors.ring_len) | (pos[:, 1] < 0) \
        | (pos[:, 1] > cursors.ring_len - cursors.max_tokens)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"cursors.pos[{int(live[i])}] = {pos[i].tolist()} is not a valid (start, count) for "
                         f"ring_len={cursors.ring_len}, max_tokens={cursors.max_tokens} (was every replay_verify "
                         f"followed by replay_commit?)")


def _cursor_validate(cursors, state_indices, num_accepted, mode: str) -> None:
    if not isinstance(cursors, ReplayCursors):
        raise TypeError(f"cursors must be a cute_gdn.ReplayCursors (make_replay_cursors), "
                        f"got {type(cursors).__name__}")
    # (The index vectors first, on the cursors' device, then the device itself: a launch refused for an index
    # vector's dtype is named by it even where only the device check would be left.)
    device = cursors.pos.device
    validate_cursors(cursors, cursors.pos.shape[0], device)
    chk.tensor("state_indices", state_indices, 1, (torch.int32,), device)
    B = state_indices.shape[0]
    chk.max_batch(f"replay_{mode}", B)
    chk.indices("state_indices", state_indices, B, device)
    if num_accepted is not None:
        chk.indices("num_accepted", num_accepted, B, device)
    if device.type != "cuda":
        raise ValueError(f"cursors must be on a CUDA device, got {device}")


def _cursor_signature(cursors, state_indices, num_accepted, mode: str):
    if not isinstance(cursors, ReplayCursors):
        raise TypeError("cursors")  # (validate raises the full message)
    return ("replay_cursor", mode, cursors.pos.shape[0], cursors.ring_len, cursors.max_tokens), state_indices.shape[0]


def _cursor_load(kcache, allow_compile, check_config, args, validated):
    cursors, mode = args[0], args[3]
    key = replay_cursor_key(pool_size=cursors.pos.shape[0], ring_len=cursors.ring_len, max_tokens=cursors.max_tokens,
                            mode=mode)
    fn, = ops.load_kernels(kcache, [key], allow_compile)
    return fn


def _cursor_launch(fn, cursors, state_indices, num_accepted, mode: str) -> None:
    if state_indices.shape[0] == 0:
        return
    fn(cursors.pos, state_indices, num_accepted if num_accepted is not None else state_indices)


def _cursor_debug(cursors, state_indices, num_accepted, mode: str) -> None:
    chk.debug_indices("state_indices", state_indices, cursors.pos.shape[0])
    if num_accepted is not None:
        live = num_accepted[state_indices >= 0]
        bad = live[(live < 0) | (live > cursors.max_tokens)]
        if bad.numel():
            raise ValueError(f"num_accepted has an entry {int(bad[0])} outside [0, max_tokens={cursors.max_tokens}]")


REPLAY_CURSOR = ops.OpPath(_cursor_validate, _cursor_signature, _cursor_load, _cursor_launch, _cursor_debug)


def _cursor_call(kcache: KernelCache, allow_compile: bool, cursors, state_indices, num_accepted, mode: str) -> None:
    ops.run_op(REPLAY_CURSOR, kcache, allow_compile, None, (cursors, state_indices, num_accepted, mode))


def _replay_commit(kcache: KernelCache, allow_compile: bool, cursors, state_indices, num_accepted) -> None:
    _cursor_call(kcache, allow_compile, cursors, state_indices, num_accepted, "commit")


def _replay_flush(kcache: KernelCache, allow_compile: bool, check_config, states, rings, cursors, state_indices,
                  use_qk_l2norm: bool) -> None:
    states = [states] if isinstance(states, torch.Tensor) else list(states)
    rings = [rings] if isinstance(rings, ReplayRing) else list(rings)
    if len(states) != len(rings) or not states:
        raise ValueError(f"states and rings must name the same layers (one or more): {len(states)} states, "
                         f"{len(rings)} rings")
    for i, (state, ring) in enumerate(zip(states, rings)):
        chk.tensor(f"states[{i}]", state, 4, tuple(chk.STATE_DTYPES))
        if state.device.type != "cuda":
            raise ValueError(f"states[{i}] must be on a CUDA device, got {state.device}")
        pool, HV, V, K = state.shape
        chk.state_pool(f"states[{i}]", state, HV, V, K, state.device)
        if not isinstance(ring, ReplayRing):
            raise TypeError(f"rings[{i}] must be a cute_gdn.ReplayRing, got {type(ring).__name__}")
        chk.tensor(f"rings[{i}].k", ring.k, 4, tuple(chk.IO_DTYPES), state.device)
        validate_ring(f"rings[{i}]", ring, state, ring.k.shape[1], K, ring.k.dtype)
        validate_cursors(cursors, pool, state.device, ring.ring_len)
        if check_config is not None:
            check_config(None, state, ring, cursors)
    chk.tensor("state_indices", state_indices, 1, (torch.int32,), states[0].device)
    chk.indices("state_indices", state_indices, state_indices.shape[0], states[0].device)
    if chk.DEBUG:
        chk.debug_indices("state_indices", state_indices, states[0].shape[0])
    fns = []
    B = state_indices.shape[0]
    for state, ring in zip(states, rings):
        pool, HV, V, K = state.shape
        keys = replay_flush_keys(io_dtype=chk.IO_DTYPES[ring.k.dtype], state_dtype=chk.STATE_DTYPES[state.dtype],
                                 num_heads=ring.k.shape[1], num_v_heads=HV, head_k_dim=K, head_v_dim=V,
                                 pool_size=pool, max_tokens=cursors.max_tokens, ring_len=cursors.ring_len,
                                 use_qk_l2norm=use_qk_l2norm)
        key = keys[1] if B * HV >= LARGE_BATCH_HEADS[chk.STATE_DTYPES[state.dtype]] else keys[0]
        fn = kcache.by_signature.get(key)
        if fn is None:
            fn, = ops.load_kernels(kcache, [key], allow_compile)
            kcache.by_signature[key] = fn
        fns.append(fn)
    if state_indices.shape[0] == 0:
        return
    for fn, state, ring in zip(fns, states, rings):
        fn(state, state_indices, ring.k, ring.v, ring.gb, cursors.pos)
    _cursor_call(kcache, allow_compile, cursors, state_indices, None, "flush")


def replay_verify(
    q: torch.Tensor,  # [B, T, H, K] bf16/fp16, 1 <= T <= cursors.max_tokens
    k: torch.Tensor,  # [B, T, H, K]
    v: torch.Tensor,  # [B, T, HV, V]
    a: Optional[torch.Tensor] = None,  # [B, T, HV] raw gate (io dtype)
    b: Optional[torch.Tensor] = None,  # [B, T, HV] raw beta logit (io dtype)
    *,
    A_log: Optional[torch.Tensor] = None,    # [HV] fp32
    dt_bias: Optional[torch.Tensor] = None,  # [HV] fp32 or bf16
    g: Optional[torch.Tensor] = None,        # [B, T, HV] fp32 (instead of a, A_log, dt_bias)
    beta: Optional[torch.Tensor] = None,     # [B, T, HV] fp32 (instead of b)
    state: torch.Tensor,          # [pool_size, HV, V, K] fp32 or bf16: the checkpoints (rewritten only by folds)
    state_indices: torch.Tensor,  # [B] int32; < 0 = padding
    ring: ReplayRing,             # this layer's records (make_replay_ring)
    cursors: ReplayCursors,       # per-slot (start, count), shared by every layer (make_replay_cursors)
    scale: Optional[float] = None,
    use_qk_l2norm: bool = True,
    out: Optional[torch.Tensor] = None,  # [B, T, HV, V] io dtype
) -> torch.Tensor:
    """Speculative (MTP) verify of T draft tokens per sequence from a checkpoint and a ring of records.

    Sequence b's state before its draft tokens is the checkpoint state[state_indices[b]] followed by the
    cursors.pos[slot] = (start, count) committed records of ring[slot]. The outputs of the T tokens are
    computed without materializing a state; the T candidate records go to ring positions start + count + t
    (mod L). A row with count > L - 2 * max_tokens folds its committed records into the checkpoint: before its
    outputs and bit-identical to `verify` + `commit` in fp32 (cursors.fold "exact"), or after them from the
    records' deltas (cursors.fold "compact": the same state, rounded differently). Cursors are
    only read: `replay_commit` must follow (once per step for every layer). Layouts, GVA, strided views,
    gates and scale as in `verify`.

    Padding: a row with state_indices[b] < 0 reads and writes no state or ring and gets zeros in o.

    Returns:
        o [B, T, HV, V] in the io dtype (`out` if given).
    """
    return _replay_verify(default_cache(), True, None, q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices,
                          ring, cursors, scale, use_qk_l2norm, out)


def replay_commit(
    cursors: ReplayCursors,
    state_indices: torch.Tensor,  # [B] int32; < 0 = padding (the rows of the preceding replay_verify)
    num_accepted: torch.Tensor,   # [B] int32 in [0, T]: accepted draft tokens per row
) -> None:
    """Commit the accepted prefix of the last replay_verify of every layer: a cursor move on the device
    (count += n; a row that folded in that verify restarts its ring: start += count, count = n). Values
    outside [0, max_tokens] are clamped (CUTE_GDN_DEBUG=1 reports them). One launch for all layers."""
    _replay_commit(default_cache(), True, cursors, state_indices, num_accepted)


def replay_flush(
    states,                 # [pool_size, HV, V, K] or a sequence of them (one per layer)
    rings,                  # the ReplayRing (or sequence of rings) of those layers
    cursors: ReplayCursors,
    state_indices: torch.Tensor,  # [B] int32; < 0 = padding
    *,
    use_qk_l2norm: bool = True,
) -> None:
    """Fold every committed record of the named slots into their checkpoints (in every given layer), then
    empty their rings. Afterwards state[slot] is the request's state, as decode and prefill expect; call it
    when a request leaves speculative mode, is evicted or prefix-cached. Pass every layer that shares
    `cursors`: the cursors are reset once, after all layers are folded."""
    _replay_flush(default_cache(), True, None, states, rings, cursors, state_indices, use_qk_l2norm)


for _op in (replay_verify, replay_commit, replay_flush):
    _op.__doc__ += ops._ERRORS
