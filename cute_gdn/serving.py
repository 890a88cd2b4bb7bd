"""The serving surface: one object per model config (per layer shape), warmed up once.

`warmup()` loads every kernel the config can need from the disk cache (compiling what is missing,
in spawned processes); afterwards a call that would need a kernel outside that set raises
`KernelNotCompiledError` instead of compiling in the middle of serving.

Speculative decoding comes in two protocols (`spec_mode`): "cached" (`verify` writes every intermediate
state into a cache, `commit` copies the accepted one) and "replay" (cute_gdn.replay: the pool slot is a
checkpoint, a ring of per-token records follows it, `replay_commit` moves a cursor). One GDNKernels
serves one of them; its warmed kernel set holds that protocol's kernels only.
"""

from __future__ import annotations

import os
import time
from typing import Optional

import torch

from . import _checks as chk
from . import ops
from . import replay
from .cache import KernelCache, KernelKey

# Gate variants warmed for every config: engines pass raw gates with an fp32 or a bf16 dt_bias
# (it follows the checkpoint), or gates they computed themselves.
GATE_VARIANTS = (("raw", "float32"), ("raw", "bfloat16"), ("precomputed", None))

# Verify compiles T = 1..cache_steps; its kernels hold at most this many tokens per sequence.
MAX_CACHE_STEPS = ops.MAX_TOKENS

# Speculative-decoding protocols: "cached" (verify + commit) or "replay" (replay_verify + replay_commit).
SPEC_MODES = ("cached", "replay")
DEFAULT_RING_LEN = replay.DEFAULT_RING_LEN
# How replay verify folds a full ring (replay.make_replay_cursors): "exact" or "compact".
REPLAY_FOLDS = replay.FOLD_MODES


def check_spec_config(spec_mode: str, cache_steps: int, ring_len: int, replay_fold: str = "exact") -> None:
    """ValueError naming the argument for an unknown spec_mode, a replay ring that cannot hold
    cache_steps draft tokens (replay.check_ring_config), an unknown replay_fold, or a replay_fold other
    than "exact" outside spec_mode="replay"."""
    if spec_mode not in SPEC_MODES:
        raise ValueError(f"spec_mode must be one of {list(SPEC_MODES)}, got {spec_mode!r}")
    if replay_fold not in REPLAY_FOLDS:
        raise ValueError(f"replay_fold must be one of {list(REPLAY_FOLDS)}, got {replay_fold!r}")
    if replay_fold != "exact" and spec_mode != "replay":
        raise ValueError(f"replay_fold={replay_fold!r} belongs to spec_mode='replay', got spec_mode={spec_mode!r}")
    if spec_mode == "replay":
        if cache_steps < 1:
            raise ValueError(f"spec_mode='replay' needs cache_steps = the largest number of draft tokens per "
                             f"verify (>= 1), got cache_steps={cache_steps}")
        reason = replay.check_ring_config(ring_len, cache_steps)
        if reason is not None:
            raise ValueError(f"ring_len={ring_len} with cache_steps={cache_steps}: {reason}")


def config_keys(num_heads: int, num_v_heads: int, head_k_dim: int, head_v_dim: int, *, pool_size: int,
                cache_steps: int = 0, state_dtype: str = "float32", io_dtype: str = "bfloat16",
                use_qk_l2norm: bool = True, spec_mode: str = "cached",
                ring_len: int = DEFAULT_RING_LEN, replay_fold: str = "exact") -> list[KernelKey]:
    """Every kernel a serving config can need: prefill for every gate variant (where the head dims
    allow it), decode and verify in both tiles (small and large batch) for every gate variant, verify
    for every T in 1..cache_steps (when cache_steps > 0), and commit (one layer and a LayerTable).
    spec_mode="replay" replaces verify and commit by the replay kernels (replay.config_keys: replay
    verify for T = 1..cache_steps, the flush kernel, the two cursor kernels) for rings of ring_len, with
    replay verify in the replay_fold fold (the flush kernel always folds exactly)."""
    check_spec_config(spec_mode, cache_steps, ring_len, replay_fold)
    keys = []
    problem = dict(io_dtype=io_dtype, state_dtype=state_dtype, num_heads=num_heads, num_v_heads=num_v_heads,
                   head_k_dim=head_k_dim, head_v_dim=head_v_dim, pool_size=pool_size, use_qk_l2norm=use_qk_l2norm)
    for gate_mode, bias in GATE_VARIANTS:
        key = ops.prefill_key(gate_mode=gate_mode, dt_bias_dtype=bias, **problem)
        if prefill_supported(key):
            keys.append(key)
    for gate_mode, bias in GATE_VARIANTS:
        keys += ops.decode_keys(gate_mode=gate_mode, dt_bias_dtype=bias, **problem)
    if cache_steps > 0 and spec_mode == "replay":
        keys += replay.config_keys(max_tokens=cache_steps, ring_len=ring_len, gate_variants=GATE_VARIANTS,
                                   fold_mode=replay_fold, **problem)
    elif cache_steps > 0:
        for num_tokens in range(1, cache_steps + 1):
            for gate_mode, bias in GATE_VARIANTS:
                keys += ops.verify_keys(num_tokens=num_tokens, cache_steps=cache_steps, gate_mode=gate_mode,
                                        dt_bias_dtype=bias, **problem)
        for layers in ("tensor", "table"):
            keys.append(ops.commit_key(state_dtype=state_dtype, num_v_heads=num_v_heads, head_k_dim=head_k_dim,
                                       head_v_dim=head_v_dim, pool_size=pool_size, cache_steps=cache_steps,
                                       layers=layers))
    return list(dict.fromkeys(keys))  # small and large tiles coincide for some head dims


def prefill_supported(key: KernelKey) -> bool:
    try:
        ops.can_implement_key(key)
    except ValueError:
        return False
    return True


class GDNKernels:
    """Kernels of one GDN layer shape, for a serving engine.

    kernels = GDNKernels(16, 32, 128, 128, pool_size=512)
    kernels.warmup()
    o = kernels.forward("decode", q, k, v, a, b, A_log=A_log, dt_bias=dt_bias,
                        state=pool, state_indices=slots)

    cache_steps is the largest number of draft tokens per verify (T_max) in both speculative modes.
    spec_mode="cached": target_verify writes a verify cache, commit / commit_layers adopt a step.
    spec_mode="replay": target_verify takes a ring and cursors (make_ring per layer, make_cursors
    once, shared by the layers) instead of a cache; replay_commit moves the cursors after the accept,
    replay_flush folds the rings into the pools. ring_len (replay only) is the records per slot,
    2 * cache_steps .. replay.MAX_RING_LEN; a longer ring folds less often. replay_fold (replay only) is
    how target_verify folds a full ring into the checkpoint: "exact" (bit-identical to verify + commit)
    or "compact" (the records' rank-one terms: the same state, rounded differently, faster); see
    replay.make_replay_cursors. The warmed set holds that fold's verify kernels only, and make_cursors
    makes cursors of that fold; cursors of the other fold are refused.
    """

    def __init__(self, num_heads: int, num_v_heads: int, head_k_dim: int, head_v_dim: int, *,
                 pool_size: int, cache_steps: int = 0, state_dtype: torch.dtype = torch.float32,
                 io_dtype: torch.dtype = torch.bfloat16, use_qk_l2norm: bool = True, device="cuda",
                 cache_dir: Optional[str | os.PathLike] = None, spec_mode: str = "cached",
                 ring_len: int = DEFAULT_RING_LEN, replay_fold: str = "exact"):
        if state_dtype not in chk.STATE_DTYPES:
            raise TypeError(f"state_dtype must be one of {list(chk.STATE_DTYPES)}, got {state_dtype}")
        if io_dtype not in chk.IO_DTYPES:
            raise TypeError(f"io_dtype must be one of {list(chk.IO_DTYPES)}, got {io_dtype}")
        check_spec_config(spec_mode, cache_steps, ring_len, replay_fold)
        self.num_heads, self.num_v_heads = num_heads, num_v_heads
        self.head_k_dim, self.head_v_dim = head_k_dim, head_v_dim
        self.pool_size, self.cache_steps = pool_size, cache_steps
        self.state_dtype, self.io_dtype = state_dtype, io_dtype
        self.use_qk_l2norm = use_qk_l2norm
        self.spec_mode = spec_mode
        self.replay = spec_mode == "replay"
        # Only the replay protocol has rings; the cached one keeps ring_len None so that nothing sizes one.
        self.ring_len = ring_len if self.replay else None
        self.replay_fold = replay_fold if self.replay else None
        self.device = torch.device(device)
        self.cache = KernelCache(cache_dir)
        self.keys = config_keys(num_heads, num_v_heads, head_k_dim, head_v_dim, pool_size=pool_size,
                                cache_steps=cache_steps, state_dtype=chk.STATE_DTYPES[state_dtype],
                                io_dtype=chk.IO_DTYPES[io_dtype], use_qk_l2norm=use_qk_l2norm,
                                spec_mode=spec_mode, ring_len=ring_len, replay_fold=replay_fold)
        for key in self.keys:
            ops.can_implement_key(key)
        self.warm = False
        self.warmup_seconds: Optional[float] = None
        self._modes = {"extend": self.extend, "decode": self.decode, "target_verify": self.target_verify}
        self._decode = ops.decode_entry(lambda: self.cache, lambda: not self.warm, self._check_config)

    def warmup(self, jobs: Optional[int] = None) -> "GDNKernels":
        """Load every kernel of this config (compiling the missing ones); then freeze the set."""
        t0 = time.perf_counter()
        self.cache.compile(self.keys, jobs=jobs or os.cpu_count() or 1)
        for key in self.keys:
            self.cache.get(key, allow_compile=False)
        self.warm = True
        self.warmup_seconds = time.perf_counter() - t0
        return self

    # ---- buffers of the replay protocol ----

    def make_ring(self, device=None) -> replay.ReplayRing:
        """A zeroed ring for one layer of this config (replay only): replay.ring_bytes per pool slot."""
        self._require_replay("make_ring")
        return replay.make_replay_ring(self.pool_size, self.num_heads, self.num_v_heads, self.head_k_dim,
                                       self.head_v_dim, ring_len=self.ring_len, io_dtype=self.io_dtype,
                                       device=self.device if device is None else device)

    def make_cursors(self, device=None) -> replay.ReplayCursors:
        """Zeroed cursors (every ring empty) for this config's pool, shared by every layer (replay only),
        with this config's fold (replay_fold)."""
        self._require_replay("make_cursors")
        return replay.make_replay_cursors(self.pool_size, max_tokens=self.cache_steps, ring_len=self.ring_len,
                                          fold=self.replay_fold, device=self.device if device is None else device)

    def ring_bytes(self) -> int:
        """Ring memory per request (pool slot) per layer in bytes (replay only)."""
        self._require_replay("ring_bytes")
        return replay.ring_bytes(self.num_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim, self.ring_len,
                                 self.io_dtype)

    def _require_replay(self, what: str) -> None:
        if not self.replay:
            raise ValueError(f"{what} belongs to the replay protocol, but this GDNKernels was built with "
                             f"spec_mode={self.spec_mode!r} (GDNKernels(..., spec_mode='replay'))")

    def _require_cached(self, what: str) -> None:
        if self.replay:
            raise ValueError(f"{what} belongs to the cached protocol, but this GDNKernels was built with "
                             f"spec_mode='replay': use target_verify(..., ring=, cursors=), replay_commit and "
                             f"replay_flush")

    # ---- config checks (slow path: the first call of a signature) ----

    def _check_config(self, q: Optional[torch.Tensor], state: torch.Tensor, cache=None, cursors=None) -> None:
        """Slow-path check (first call of a signature): the tensors belong to this config. `cache` is a
        verify cache (cached protocol) or a ReplayRing (replay protocol, with its `cursors`)."""
        expected = (self.pool_size, self.num_v_heads, self.head_v_dim, self.head_k_dim)
        if tuple(state.shape) != expected or state.dtype != self.state_dtype:
            raise ValueError(f"state must be {self.state_dtype} of shape {list(expected)} for this config, "
                             f"got {state.dtype} {list(state.shape)}")
        if isinstance(cache, replay.ReplayRing):
            self._check_ring(cache)
        elif cache is not None:
            self._require_cached("a verify cache")
            self._check_cache_steps(cache.shape[1])
        if cursors is not None:
            self._check_cursors(cursors)
        if q is None:
            return
        if q.dtype != self.io_dtype or tuple(q.shape[2:]) != (self.num_heads, self.head_k_dim):
            raise ValueError(f"q must be {self.io_dtype} [B, T, {self.num_heads}, {self.head_k_dim}] for this "
                             f"config, got {q.dtype} {list(q.shape)}")

    def _check_ring(self, ring: replay.ReplayRing) -> None:
        self._require_replay("a ReplayRing")
        # The layout is replay.make_replay_ring's (a meta-device ring of this config: no memory).
        layout = replay.make_replay_ring(self.pool_size, self.num_heads, self.num_v_heads, self.head_k_dim,
                                         self.head_v_dim, ring_len=self.ring_len, io_dtype=self.io_dtype,
                                         device="meta")
        for field, want in zip(replay.ReplayRing._fields, layout):
            x = getattr(ring, field)
            if tuple(x.shape) != tuple(want.shape) or x.dtype != want.dtype:
                raise ValueError(f"ring.{field} must be {want.dtype} of shape {list(want.shape)} for this config "
                                 f"(ring_len={self.ring_len}: GDNKernels.make_ring), got {x.dtype} {list(x.shape)}")

    def _check_cursors(self, cursors) -> None:
        self._require_replay("ReplayCursors")
        if not isinstance(cursors, replay.ReplayCursors):
            raise TypeError(f"cursors must be a cute_gdn.ReplayCursors (GDNKernels.make_cursors), "
                            f"got {type(cursors).__name__}")
        if cursors.ring_len != self.ring_len or cursors.max_tokens != self.cache_steps \
                or cursors.fold != self.replay_fold or tuple(cursors.pos.shape) != (self.pool_size, 2):
            raise ValueError(f"cursors were made for ring_len={cursors.ring_len}, max_tokens={cursors.max_tokens}, "
                             f"fold={cursors.fold!r}, {cursors.pos.shape[0]} slots; this config has "
                             f"ring_len={self.ring_len}, max_tokens = cache_steps = {self.cache_steps}, "
                             f"replay_fold={self.replay_fold!r}, pool_size={self.pool_size} (GDNKernels.make_cursors)")

    def _check_cache_steps(self, cache_steps: int) -> None:
        if cache_steps != self.cache_steps:
            raise ValueError(f"cache has cache_steps={cache_steps}, but this config was built with "
                             f"cache_steps={self.cache_steps} (GDNKernels(..., cache_steps=N))")

    # ---- the forward modes ----

    def extend(self, q, k, v, a=None, b=None, *, A_log=None, dt_bias=None, g=None, beta=None, cu_seqlens, state,
               state_indices, has_initial_state=None, scale=None, out=None) -> torch.Tensor:
        """cute_gdn.prefill with this config's kernels (see ops.prefill for the arguments).

        Replay mode: prefill reads and writes the checkpoint (the pool slot) only, so the rings of the
        extended slots must be empty (count 0): a fresh slot (reset_cursors when the engine assigns it) or
        one flushed with replay_flush. GDNKernels does not reset cursors by itself; the engine, which
        assigns slots, calls cute_gdn.reset_cursors(cursors, slots) (capturable, no host sync)."""
        return ops.prefill_using(self.cache, not self.warm, self._check_config, q, k, v, a, b, A_log, dt_bias, g, beta,
                            cu_seqlens, state, state_indices, has_initial_state, scale, self.use_qk_l2norm, out)

    def decode(self, q, k, v, a=None, b=None, *, A_log=None, dt_bias=None, g=None, beta=None, state,
               state_indices, scale=None, out=None) -> torch.Tensor:
        """cute_gdn.decode with this config's kernels (see ops.decode for the arguments). Replay mode: as
        extend, decode reads the checkpoint only: the slots' rings must be empty (flushed)."""
        return self._decode(q, k, v, a, b, A_log=A_log, dt_bias=dt_bias, g=g, beta=beta, state=state,
                            state_indices=state_indices, scale=scale, use_qk_l2norm=self.use_qk_l2norm, out=out)

    def target_verify(self, q, k, v, a=None, b=None, *, A_log=None, dt_bias=None, g=None, beta=None, state,
                      state_indices, cache=None, cache_indices=None, ring=None, cursors=None, scale=None,
                      out=None) -> torch.Tensor:
        """The verify of this config's protocol. spec_mode="cached": cute_gdn.verify (cache, cache_indices;
        see ops.verify). spec_mode="replay": cute_gdn.replay_verify (ring: this layer's ReplayRing,
        cursors: the shared ReplayCursors; see replay.replay_verify), which the engine follows with one
        replay_commit for all layers. The other protocol's arguments raise TypeError."""
        if self.replay:
            if cache is not None or cache_indices is not None:
                raise TypeError(f"{'cache' if cache is not None else 'cache_indices'} is an argument of the cached "
                                f"protocol; this GDNKernels was built with spec_mode='replay' and verifies from "
                                f"ring= (make_ring) and cursors= (make_cursors)")
            if ring is None or cursors is None:
                raise TypeError(f"target_verify in spec_mode='replay' needs {'ring' if ring is None else 'cursors'}=")
            return replay._replay_verify(self.cache, not self.warm, self._check_config, q, k, v, a, b, A_log, dt_bias,
                                         g, beta, state, state_indices, ring, cursors, scale, self.use_qk_l2norm, out)
        if ring is not None or cursors is not None:
            raise TypeError(f"{'ring' if ring is not None else 'cursors'} is an argument of the replay protocol; "
                            f"this GDNKernels was built with spec_mode='cached' (GDNKernels(..., spec_mode='replay'))")
        if cache is None:
            raise TypeError("target_verify in spec_mode='cached' needs cache= (the verify cache)")
        return ops.verify_using(self.cache, not self.warm, self._check_config, q, k, v, a, b, A_log, dt_bias, g, beta,
                           state, state_indices, cache, cache_indices, scale, self.use_qk_l2norm, out)

    def commit(self, state, state_indices, cache, cache_indices, accepted_steps) -> None:
        """cute_gdn.commit with this config's kernel: adopt the accepted step of every sequence (cached)."""
        self._require_cached("commit")
        ops.commit_using(self.cache, not self.warm, self._check_config, state, state_indices, cache, cache_indices,
                    accepted_steps)

    def layer_table(self, states, caches) -> ops.LayerTable:
        """A LayerTable of this config's per-layer pools and caches, for commit_layers (build it once)."""
        self._require_cached("layer_table")
        table = ops.LayerTable(states, caches)
        self._check_config(None, table.states[0], table.caches[0])
        return table

    def commit_layers(self, layers: ops.LayerTable, state_indices, cache_indices, accepted_steps) -> None:
        """commit of the same batch in every layer of `layers` (from layer_table), in one launch (cached)."""
        self._require_cached("commit_layers")
        ops.commit_layers_using(self.cache, not self.warm, layers, state_indices, cache_indices, accepted_steps)

    def replay_commit(self, cursors, state_indices, num_accepted) -> None:
        """cute_gdn.replay_commit with this config's kernel: after every layer's target_verify of a step,
        one cursor move for all layers (num_accepted [B] int32 in [0, T]; 0 rejects every draft)."""
        if not self.replay or isinstance(cursors, replay.ReplayCursors):
            self._check_cursors(cursors)
        replay._replay_commit(self.cache, not self.warm, cursors, state_indices, num_accepted)

    def replay_flush(self, states, rings, cursors, state_indices) -> None:
        """cute_gdn.replay_flush with this config's kernels: fold the named slots' rings into their pool
        slots in every given layer (pass all layers that share `cursors`), then empty the rings. Call it
        before a request leaves speculative decoding, is evicted or prefix-cached, or goes through
        extend / decode."""
        self._require_replay("replay_flush")
        replay._replay_flush(self.cache, not self.warm, self._check_config, states, rings, cursors, state_indices,
                             self.use_qk_l2norm)

    def forward(self, mode: str, *args, **kwargs) -> torch.Tensor:
        """The dispatcher: one entry per forward mode of the engine ("target_verify" takes the arguments
        of this config's spec_mode)."""
        fn = self._modes.get(mode)
        if fn is None:
            raise ValueError(f"mode must be one of {sorted(self._modes)}, got {mode!r}")
        return fn(*args, **kwargs)
