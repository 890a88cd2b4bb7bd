"""Public ops: validate, allocate outputs, look up the compiled kernel, call it.

Validation is in two tiers so that an eager call costs a few microseconds of host time:
- the compiled tvm-ffi function checks every tensor argument in C before it launches (device,
  dtype, rank, static dims, the shared batch dim, strides, contiguity, 16-byte alignment);
- the Python checks (`_checks`) run in full the first time a call signature is seen and again
  whenever the tvm-ffi function rejects a call, so the error that reaches the caller is a
  ValueError/TypeError naming the public argument. Either way nothing is written before it.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from . import _checks as chk
from .cache import KernelCache, KernelKey, default_cache
from .kernels.decode import LARGE_BATCH_HEADS, DecodeConfig
from .kernels.decode import can_implement as can_implement_decode


def decode_key(*, io_dtype: str, state_dtype: str, num_heads: int, num_v_heads: int, head_k_dim: int,
               head_v_dim: int, pool_size: int, gate_mode: str, dt_bias_dtype: Optional[str],
               use_qk_l2norm: bool, config: Optional[DecodeConfig] = None, large_batch: bool = False) -> KernelKey:
    """The key of one decode kernel; without `config`, the heuristic tile for small or large batches."""
    return KernelKey.make(
        "decode", io_dtype=io_dtype, state_dtype=state_dtype, num_heads=num_heads,
        num_v_heads=num_v_heads, head_k_dim=head_k_dim, head_v_dim=head_v_dim, pool_size=pool_size,
        gate_mode=gate_mode, dt_bias_dtype=dt_bias_dtype, use_qk_l2norm=bool(use_qk_l2norm),
        config=config or DecodeConfig.heuristic(head_k_dim, head_v_dim, state_dtype, large_batch))


def decode_keys(**kwargs) -> tuple[KernelKey, KernelKey]:
    """The (small-batch, large-batch) kernel pair one decode call signature dispatches between;
    the two keys are equal where a head dim admits only one tile."""
    return decode_key(**kwargs, large_batch=False), decode_key(**kwargs, large_batch=True)


def can_implement_key(key: KernelKey) -> None:
    """The kernel's can_implement, turned into a ValueError."""
    kw = key.kwargs
    reason = can_implement_decode(kw["io_dtype"], kw["state_dtype"], kw["num_heads"], kw["num_v_heads"],
                                  kw["head_k_dim"], kw["head_v_dim"], kw["gate_mode"], kw["dt_bias_dtype"],
                                  kw["config"])
    if reason is not None:
        raise ValueError(f"unsupported {key.op} configuration: {reason}")


def validate_decode(q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, out) -> tuple[str, Optional[str]]:
    """Every check of decode's arguments; returns (gate mode, dt_bias dtype name)."""
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
    if HV % H != 0:
        raise ValueError(f"v heads ({HV}) must be a multiple of q/k heads ({H})")
    mode = chk.gate_mode(a, b, A_log, dt_bias, g, beta)
    bias_dtype = chk.gates(mode, a, b, A_log, dt_bias, g, beta, (B, 1), HV, q.dtype, device)
    chk.state_pool("state", state, HV, V, K, device)
    chk.indices("state_indices", state_indices, B, device)
    if out is not None:
        chk.output(out, (B, 1, HV, V), q.dtype, device)
    return mode, bias_dtype


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
    _check_config: Optional[Callable] = None,
) -> torch.Tensor:
    """One decode step of the gated delta rule for B sequences, in place on the state pool."""
    cache = _cache or default_cache()
    args = (q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, out)
    raw = g is None
    if raw != (beta is None) or raw == (a is None) or raw == (b is None) or raw == (A_log is None) \
            or raw == (dt_bias is None):
        validate_decode(*args)  # not exactly one gate set: raises
    try:
        B, _, H, K = q.shape
        _, _, HV, V = v.shape
        sig = ("decode", q.dtype, state.dtype, H, K, HV, V, state.shape[0], dt_bias.dtype if raw else None,
               bool(use_qk_l2norm), q.get_device() == state.get_device())
    except (AttributeError, ValueError, TypeError):
        validate_decode(*args)
        raise
    entry = cache.by_signature.get(sig)  # (large-batch threshold in B * HV, small kernel, large kernel)
    if entry is None or B > chk.MAX_BATCH:
        entry = _decode_kernels(cache, sig, args, use_qk_l2norm, _allow_compile, _check_config)
    if chk.DEBUG:
        validate_decode(*args)
        chk.debug_indices("state_indices", state_indices, state.shape[0])
    if out is None:
        out = torch.empty_like(v)  # [B, 1, HV, V]; cheaper than new_empty on the hot path
    if B == 0:
        return out
    if scale is None:
        scale = K ** -0.5
    threshold, small, large = entry
    fn = large if B * HV >= threshold else small
    try:
        if raw:
            fn(q, k, v, a, b, A_log, dt_bias, state, state_indices, out, scale)
        else:
            fn(q, k, v, g, beta, None, None, state, state_indices, out, scale)
    except (ValueError, TypeError):
        validate_decode(*args)  # raises the error under the argument's public name
        raise
    return out


def _decode_kernels(cache, sig, args, use_qk_l2norm, allow_compile, check_config):
    """Slow path, once per call signature: full validation, then load (or compile) both tiles."""
    q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, out = args
    mode, bias_dtype = validate_decode(*args)
    if check_config is not None:
        check_config(q, state)
    keys = decode_keys(io_dtype=chk.IO_DTYPES[q.dtype], state_dtype=chk.STATE_DTYPES[state.dtype],
                       num_heads=q.shape[2], num_v_heads=v.shape[2], head_k_dim=q.shape[3],
                       head_v_dim=v.shape[3], pool_size=state.shape[0], gate_mode=mode,
                       dt_bias_dtype=bias_dtype, use_qk_l2norm=use_qk_l2norm)
    for key in keys:
        can_implement_key(key)
    if allow_compile:
        cache.compile(keys, jobs=2)
    small, large = (cache.get(key, allow_compile=allow_compile) for key in keys)
    entry = (LARGE_BATCH_HEADS[chk.STATE_DTYPES[state.dtype]], small, large)
    cache.by_signature[sig] = entry
    return entry
