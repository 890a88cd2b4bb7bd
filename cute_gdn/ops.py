"""Public ops: validate, allocate outputs, look up the compiled kernel, call it."""

from __future__ import annotations

from typing import Optional

import torch

from . import _checks as chk
from .cache import KernelCache, KernelKey, default_cache
from .kernels.decode import DecodeConfig
from .kernels.decode import can_implement as can_implement_decode


def decode_key(*, io_dtype: str, state_dtype: str, num_heads: int, num_v_heads: int, head_k_dim: int,
               head_v_dim: int, pool_size: int, gate_mode: str, dt_bias_dtype: Optional[str],
               use_qk_l2norm: bool, config: Optional[DecodeConfig] = None) -> KernelKey:
    return KernelKey.make(
        "decode", io_dtype=io_dtype, state_dtype=state_dtype, num_heads=num_heads,
        num_v_heads=num_v_heads, head_k_dim=head_k_dim, head_v_dim=head_v_dim, pool_size=pool_size,
        gate_mode=gate_mode, dt_bias_dtype=dt_bias_dtype, use_qk_l2norm=bool(use_qk_l2norm),
        config=config or DecodeConfig.heuristic(head_k_dim, head_v_dim, state_dtype))


def decode(
    q: torch.Tensor,  # [B, 1, H, K] bf16/fp16
    k: torch.Tensor,  # [B, 1, H, K]
    v: torch.Tensor,  # [B, 1, HV, V]
    a: Optional[torch.Tensor] = None,  # [B, 1, HV] raw gate (io dtype)
    b: Optional[torch.Tensor] = None,  # [B, 1, HV] raw beta logit (io dtype)
    *,
    A_log: Optional[torch.Tensor] = None,    # [HV] fp32
    dt_bias: Optional[torch.Tensor] = None,  # [HV] fp32 or bf16
    g: Optional[torch.Tensor] = None,        # [B, 1, HV] fp32, log-space decay (instead of a, A_log, dt_bias)
    beta: Optional[torch.Tensor] = None,     # [B, 1, HV] fp32, after the sigmoid (instead of b)
    state: torch.Tensor,          # [pool_size, HV, V, K] fp32 or bf16, updated in place
    state_indices: torch.Tensor,  # [B] int32; < 0 = padding
    scale: Optional[float] = None,
    use_qk_l2norm: bool = True,
    out: Optional[torch.Tensor] = None,  # [B, 1, HV, V] io dtype
    _cache: Optional[KernelCache] = None,
    _allow_compile: bool = True,
) -> torch.Tensor:
    """One decode step of the gated delta rule for B sequences, in place on the state pool."""
    chk.tensor("q", q, 4, chk.IO_DTYPES)
    device = q.device
    if device.type != "cuda":
        raise ValueError(f"q must be on a CUDA device, got {device}")
    B, T, H, K = q.shape
    if T != 1:
        raise ValueError(f"decode takes one token per sequence: q must be [B, 1, H, K], got {list(q.shape)}")
    if B > chk.MAX_BATCH:
        raise ValueError(f"decode supports at most {chk.MAX_BATCH} sequences, got B={B}")
    chk.vector_aligned("q", q)
    chk.tensor("k", k, 4, (q.dtype,), device)
    chk.shape("k", k, (B, 1, H, K))
    chk.vector_aligned("k", k)
    chk.tensor("v", v, 4, (q.dtype,), device)
    HV, V = v.shape[2], v.shape[3]
    chk.shape("v", v, (B, 1, HV, V))
    chk.unit_last_stride("v", v)
    mode = chk.gate_mode(a, b, A_log, dt_bias, g, beta)
    bias_dtype = chk.gates(mode, a, b, A_log, dt_bias, g, beta, (B, 1), HV, q.dtype, device)
    chk.state_pool("state", state, HV, V, K, device)
    chk.indices("state_indices", state_indices, B, device)
    if chk.DEBUG:
        chk.debug_indices("state_indices", state_indices, state.shape[0])
    if out is None:
        out = torch.empty((B, 1, HV, V), dtype=q.dtype, device=device)
    else:
        chk.output(out, (B, 1, HV, V), q.dtype, device)
    if HV % H != 0:
        raise ValueError(f"v heads ({HV}) must be a multiple of q/k heads ({H})")
    cache = _cache or default_cache()
    sig = ("decode", q.dtype, state.dtype, H, HV, K, V, state.shape[0], mode, bias_dtype, bool(use_qk_l2norm))
    fn = cache.by_signature.get(sig)
    if fn is None:
        key = decode_key(io_dtype=chk.IO_DTYPES[q.dtype], state_dtype=chk.STATE_DTYPES[state.dtype],
                         num_heads=H, num_v_heads=HV, head_k_dim=K, head_v_dim=V, pool_size=state.shape[0],
                         gate_mode=mode, dt_bias_dtype=bias_dtype, use_qk_l2norm=use_qk_l2norm)
        can_implement_key(key)
        fn = cache.get(key, allow_compile=_allow_compile)
        cache.by_signature[sig] = fn
    if B == 0:
        return out
    if scale is None:
        scale = K ** -0.5
    if mode == "raw":
        fn(q, k, v, a, b, A_log, dt_bias, state, state_indices, out, float(scale))
    else:
        fn(q, k, v, g, beta, None, None, state, state_indices, out, float(scale))
    return out


def can_implement_key(key: KernelKey) -> None:
    """The kernel's can_implement, turned into a ValueError."""
    kw = key.kwargs
    reason = can_implement_decode(kw["io_dtype"], kw["state_dtype"], kw["num_heads"], kw["num_v_heads"],
                                  kw["head_k_dim"], kw["head_v_dim"], kw["gate_mode"], kw["dt_bias_dtype"],
                                  kw["config"])
    if reason is not None:
        raise ValueError(f"unsupported decode configuration: {reason}")
