"""Every check of each public op's arguments (op by op, on top of the primitives in _checks): what ops.run_op
runs on a call signature's first call and whenever a compiled function refuses a call, so that the error names
the public argument. Each validate_* returns what the op's kernel keys need.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _checks as chk
from .kernels.verify import MAX_TOKENS


def one_gate_set(raw: bool, a, b, A_log, dt_bias, beta) -> bool:
    """Hot-path test that exactly one gate set is given: raw (a, b, A_log, dt_bias; g is None) or
    precomputed (g, beta). The full check with its error message is chk.gate_mode."""
    return raw == (beta is None) and raw != (a is None) and raw != (b is None) and raw != (A_log is None) \
        and raw != (dt_bias is None)


def signature_gates(a, b, A_log, dt_bias, g, beta) -> bool:
    """The hot path's gate-set test for an op's call signature: True for raw gates, False for precomputed ones;
    ValueError if not exactly one set is given (the full checks then raise it with the argument's name)."""
    raw = g is None  # (one_gate_set, written out: this runs on every call)
    if raw != (beta is None) or raw == (a is None) or raw == (b is None) or raw == (A_log is None) \
            or raw == (dt_bias is None):
        raise ValueError("not exactly one gate set")
    return raw


def validate_tokens(q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, out,
                     op: str, max_tokens: int) -> tuple[str, Optional[str]]:
    """Checks shared by decode and verify: q/k/v/gates/out [B, T, ...] with 1 <= T <= max_tokens, the
    state pool and its indices. Returns (gate mode, dt_bias dtype name)."""
    chk.tensor("q", q, 4, chk.IO_DTYPES)
    device = q.device
    if device.type != "cuda":
        raise ValueError(f"q must be on a CUDA device, got {device}")
    B, T, H, K = q.shape
    if max_tokens == 1 and T != 1:
        raise ValueError(f"decode takes one token per sequence: q must be [B, 1, H, K], got {list(q.shape)}")
    if not 1 <= T <= max_tokens:
        raise ValueError(f"{op} takes 1 to {max_tokens} tokens per sequence: q is [B, T, H, K] with T={T}")
    chk.max_batch(op, B)
    chk.vector_aligned("q", q)
    chk.tensor("k", k, 4, (q.dtype,), device)
    chk.shape("k", k, (B, T, H, K))
    chk.vector_aligned("k", k)
    chk.tensor("v", v, 4, (q.dtype,), device)
    HV, V = v.shape[2], v.shape[3]
    chk.shape("v", v, (B, T, HV, V))
    chk.unit_last_stride("v", v)
    if HV % H != 0:
        raise ValueError(f"v heads ({HV}) must be a multiple of q/k heads ({H})")
    mode = chk.gate_mode(a, b, A_log, dt_bias, g, beta)
    bias_dtype = chk.gates(mode, a, b, A_log, dt_bias, g, beta, (B, T), HV, q.dtype, device)
    chk.state_pool("state", state, HV, V, K, device)
    chk.indices("state_indices", state_indices, B, device)
    if out is not None:
        chk.output(out, (B, T, HV, V), q.dtype, device)
    return mode, bias_dtype


def validate_decode(q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, out) -> tuple[str, Optional[str]]:
    """Every check of decode's arguments; returns (gate mode, dt_bias dtype name)."""
    return validate_tokens(q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, out, "decode", 1)


def validate_verify(q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, cache, cache_indices,
                    out) -> tuple[str, Optional[str]]:
    """Every check of verify's arguments; returns (gate mode, dt_bias dtype name)."""
    mode, bias_dtype = validate_tokens(q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, out,
                                        "verify", MAX_TOKENS)
    chk.cache("cache", cache, state)
    if q.shape[1] > cache.shape[1]:
        raise ValueError(f"q has T={q.shape[1]} tokens per sequence but cache has only cache_steps={cache.shape[1]}")
    if cache_indices is not None:
        chk.indices("cache_indices", cache_indices, q.shape[0], q.device)
    return mode, bias_dtype


def validate_commit(state, state_indices, cache, cache_indices, accepted_steps) -> None:
    chk.tensor("state", state, 4, tuple(chk.STATE_DTYPES))
    if state.device.type != "cuda":
        raise ValueError(f"state must be on a CUDA device, got {state.device}")
    chk.state_pool("state", state, *state.shape[1:], state.device)
    chk.tensor("state_indices", state_indices, 1, (torch.int32,), state.device)
    validate_commit_batch(state_indices, cache_indices, accepted_steps, state.device)
    chk.cache("cache", cache, state)


def validate_commit_batch(state_indices, cache_indices, accepted_steps, device) -> None:
    B = state_indices.shape[0]
    chk.max_batch("commit", B)
    chk.indices("state_indices", state_indices, B, device)
    if cache_indices is not None:
        chk.indices("cache_indices", cache_indices, B, device)
    chk.indices("accepted_steps", accepted_steps, B, device)


def debug_commit(state_indices, cache_indices, accepted_steps, pool_size, cache_slots, cache_steps) -> None:
    chk.debug_indices("state_indices", state_indices, pool_size)
    live = state_indices >= 0
    if cache_indices is not None:
        chk.debug_indices("cache_indices", cache_indices[live], cache_slots)
    bad = accepted_steps[live]
    bad = bad[(bad < 0) | (bad > cache_steps)]
    if bad.numel():
        raise ValueError(f"accepted_steps has an entry {int(bad[0])} outside [0, cache_steps={cache_steps}]")


def validate_prefill(q, k, v, a, b, A_log, dt_bias, g, beta, cu_seqlens, state, state_indices, has_initial_state,
                     out) -> tuple[str, Optional[str]]:
    """Every check of prefill's arguments; returns (gate mode, dt_bias dtype name)."""
    chk.tensor("q", q, 4, chk.IO_DTYPES)
    device = q.device
    if device.type != "cuda":
        raise ValueError(f"q must be on a CUDA device, got {device}")
    if q.shape[0] != 1:
        raise ValueError(f"prefill packs the sequences along T: q must be [1, T, H, K], got {list(q.shape)}")
    _, T, H, K = q.shape
    chk.vector_aligned("q", q)
    chk.tensor("k", k, 4, (q.dtype,), device)
    chk.shape("k", k, (1, T, H, K))
    chk.vector_aligned("k", k)
    chk.tensor("v", v, 4, (q.dtype,), device)
    HV, V = v.shape[2], v.shape[3]
    chk.shape("v", v, (1, T, HV, V))
    chk.vector_aligned("v", v)
    if HV % H != 0:
        raise ValueError(f"v heads ({HV}) must be a multiple of q/k heads ({H})")
    mode = chk.gate_mode(a, b, A_log, dt_bias, g, beta)
    bias_dtype = chk.gates(mode, a, b, A_log, dt_bias, g, beta, (1, T), HV, q.dtype, device)
    chk.tensor("cu_seqlens", cu_seqlens, 1, (torch.int32,), device)
    chk.contiguous("cu_seqlens", cu_seqlens)
    if cu_seqlens.shape[0] < 1:
        raise ValueError("cu_seqlens must have N + 1 >= 1 entries")
    N = cu_seqlens.shape[0] - 1
    chk.max_batch("prefill", N, "N")
    chk.state_pool("state", state, HV, V, K, device)
    chk.indices("state_indices", state_indices, N, device)
    if has_initial_state is not None:
        chk.tensor("has_initial_state", has_initial_state, 1, (torch.bool,), device)
        chk.shape("has_initial_state", has_initial_state, (N,))
        chk.contiguous("has_initial_state", has_initial_state)
    if out is not None:
        chk.output(out, (1, T, HV, V), q.dtype, device)
        chk.vector_aligned("out", out)
    return mode, bias_dtype
