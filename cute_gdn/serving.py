"""The serving surface: one object per model config (per layer shape), warmed up once.

`warmup()` loads every kernel the config can need from the disk cache (compiling what is missing,
in spawned processes); afterwards a call that would need a kernel outside that set raises
`KernelNotCompiledError` instead of compiling in the middle of serving.
"""

from __future__ import annotations

import os
import time
from typing import Optional

import torch

from . import _checks as chk
from . import ops
from .cache import KernelCache, KernelKey

# Gate variants warmed for every config: engines pass raw gates with an fp32 or a bf16 dt_bias
# (it follows the checkpoint), or gates they computed themselves.
GATE_VARIANTS = (("raw", "float32"), ("raw", "bfloat16"), ("precomputed", None))

# Verify compiles T = 1..cache_steps; its kernels hold at most this many tokens per sequence.
MAX_CACHE_STEPS = ops.MAX_TOKENS


def config_keys(num_heads: int, num_v_heads: int, head_k_dim: int, head_v_dim: int, *, pool_size: int,
                cache_steps: int = 0, state_dtype: str = "float32", io_dtype: str = "bfloat16",
                use_qk_l2norm: bool = True) -> list[KernelKey]:
    """Every kernel a serving config can need: prefill for every gate variant (where the head dims
    allow it), decode and verify in both tiles (small and large batch) for every gate variant, verify
    for every T in 1..cache_steps (when cache_steps > 0), and commit (one layer and a LayerTable)."""
    keys = []
    problem = dict(io_dtype=io_dtype, state_dtype=state_dtype, num_heads=num_heads, num_v_heads=num_v_heads,
                   head_k_dim=head_k_dim, head_v_dim=head_v_dim, pool_size=pool_size, use_qk_l2norm=use_qk_l2norm)
    for gate_mode, bias in GATE_VARIANTS:
        key = ops.prefill_key(gate_mode=gate_mode, dt_bias_dtype=bias, **problem)
        if prefill_supported(key):
            keys.append(key)
    for gate_mode, bias in GATE_VARIANTS:
        keys += ops.decode_keys(gate_mode=gate_mode, dt_bias_dtype=bias, **problem)
    if cache_steps > 0:
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
    """

    def __init__(self, num_heads: int, num_v_heads: int, head_k_dim: int, head_v_dim: int, *,
                 pool_size: int, cache_steps: int = 0, state_dtype: torch.dtype = torch.float32,
                 io_dtype: torch.dtype = torch.bfloat16, use_qk_l2norm: bool = True, device="cuda",
                 cache_dir: Optional[str | os.PathLike] = None):
        if state_dtype not in chk.STATE_DTYPES:
            raise TypeError(f"state_dtype must be one of {list(chk.STATE_DTYPES)}, got {state_dtype}")
        if io_dtype not in chk.IO_DTYPES:
            raise TypeError(f"io_dtype must be one of {list(chk.IO_DTYPES)}, got {io_dtype}")
        self.num_heads, self.num_v_heads = num_heads, num_v_heads
        self.head_k_dim, self.head_v_dim = head_k_dim, head_v_dim
        self.pool_size, self.cache_steps = pool_size, cache_steps
        self.state_dtype, self.io_dtype = state_dtype, io_dtype
        self.use_qk_l2norm = use_qk_l2norm
        self.device = torch.device(device)
        self.cache = KernelCache(cache_dir)
        self.keys = config_keys(num_heads, num_v_heads, head_k_dim, head_v_dim, pool_size=pool_size,
                                cache_steps=cache_steps, state_dtype=chk.STATE_DTYPES[state_dtype],
                                io_dtype=chk.IO_DTYPES[io_dtype], use_qk_l2norm=use_qk_l2norm)
        for key in self.keys:
            ops.can_implement_key(key)
        self.warm = False
        self.warmup_seconds: Optional[float] = None
        self._modes = {"extend": self.extend, "decode": self.decode, "target_verify": self.target_verify}
        self._decode = ops._decode_entry(lambda: self.cache, lambda: not self.warm, self._check_config)

    def warmup(self, jobs: Optional[int] = None) -> "GDNKernels":
        """Load every kernel of this config (compiling the missing ones); then freeze the set."""
        t0 = time.perf_counter()
        self.cache.compile(self.keys, jobs=jobs or os.cpu_count() or 1)
        for key in self.keys:
            self.cache.get(key, allow_compile=False)
        self.warm = True
        self.warmup_seconds = time.perf_counter() - t0
        return self

    def _check_config(self, q: Optional[torch.Tensor], state: torch.Tensor,
                      cache: Optional[torch.Tensor] = None) -> None:
        """Slow-path check (first call of a signature): the tensors belong to this config."""
        expected = (self.pool_size, self.num_v_heads, self.head_v_dim, self.head_k_dim)
        if tuple(state.shape) != expected or state.dtype != self.state_dtype:
            raise ValueError(f"state must be {self.state_dtype} of shape {list(expected)} for this config, "
                             f"got {state.dtype} {list(state.shape)}")
        if cache is not None:
            self._check_cache_steps(cache.shape[1])
        if q is None:
            return
        if q.dtype != self.io_dtype or tuple(q.shape[2:]) != (self.num_heads, self.head_k_dim):
            raise ValueError(f"q must be {self.io_dtype} [B, T, {self.num_heads}, {self.head_k_dim}] for this "
                             f"config, got {q.dtype} {list(q.shape)}")

    def extend(self, q, k, v, a=None, b=None, *, A_log=None, dt_bias=None, g=None, beta=None, cu_seqlens, state,
               state_indices, has_initial_state=None, scale=None, out=None) -> torch.Tensor:
        """cute_gdn.prefill with this config's kernels (see ops.prefill for the arguments)."""
        return ops._prefill(self.cache, not self.warm, self._check_config, q, k, v, a, b, A_log, dt_bias, g, beta,
                            cu_seqlens, state, state_indices, has_initial_state, scale, self.use_qk_l2norm, out)

    def decode(self, q, k, v, a=None, b=None, *, A_log=None, dt_bias=None, g=None, beta=None, state,
               state_indices, scale=None, out=None) -> torch.Tensor:
        """cute_gdn.decode with this config's kernels (see ops.decode for the arguments)."""
        return self._decode(q, k, v, a, b, A_log=A_log, dt_bias=dt_bias, g=g, beta=beta, state=state,
                            state_indices=state_indices, scale=scale, use_qk_l2norm=self.use_qk_l2norm, out=out)

    def _check_cache_steps(self, cache_steps: int) -> None:
        if cache_steps != self.cache_steps:
            raise ValueError(f"cache has cache_steps={cache_steps}, but this config was built with "
                             f"cache_steps={self.cache_steps} (GDNKernels(..., cache_steps=N))")

    def target_verify(self, q, k, v, a=None, b=None, *, A_log=None, dt_bias=None, g=None, beta=None, state,
                      state_indices, cache, cache_indices=None, scale=None, out=None) -> torch.Tensor:
        """cute_gdn.verify with this config's kernels (see ops.verify for the arguments)."""
        return ops._verify(self.cache, not self.warm, self._check_config, q, k, v, a, b, A_log, dt_bias, g, beta,
                           state, state_indices, cache, cache_indices, scale, self.use_qk_l2norm, out)

    def commit(self, state, state_indices, cache, cache_indices, accepted_steps) -> None:
        """cute_gdn.commit with this config's kernel: adopt the accepted step of every sequence."""
        ops._commit(self.cache, not self.warm, self._check_config, state, state_indices, cache, cache_indices,
                    accepted_steps)

    def layer_table(self, states, caches) -> ops.LayerTable:
        """A LayerTable of this config's per-layer pools and caches, for commit_layers (build it once)."""
        table = ops.LayerTable(states, caches)
        self._check_config(None, table.states[0], table.caches[0])
        return table

    def commit_layers(self, layers: ops.LayerTable, state_indices, cache_indices, accepted_steps) -> None:
        """commit of the same batch in every layer of `layers` (from layer_table), in one launch."""
        ops._commit_layers(self.cache, not self.warm, layers, state_indices, cache_indices, accepted_steps)

    def forward(self, mode: str, *args, **kwargs) -> torch.Tensor:
        """The dispatcher: one entry per forward mode of the engine."""
        fn = self._modes.get(mode)
        if fn is None:
            raise ValueError(f"mode must be one of {sorted(self._modes)}, got {mode!r}")
        return fn(*args, **kwargs)
