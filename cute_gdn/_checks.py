"""Argument validation for the public ops: every check raises before any kernel runs.

Errors name the argument. Kept to attribute reads and tuple compares: this runs on every eager call.
"""

from __future__ import annotations

import os

import torch

IO_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
STATE_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
BIAS_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}

# CUDA grid.z limit: the batch is the third grid dimension.
MAX_BATCH = 65535

DEBUG = os.environ.get("CUTE_GDN_DEBUG", "0") not in ("", "0")


def max_batch(op: str, n: int, name: str = "B") -> None:
    """The batch is the kernels' third grid dimension: at most MAX_BATCH sequences."""
    if n > MAX_BATCH:
        raise ValueError(f"{op} supports at most {MAX_BATCH} sequences, got {name}={n}")


def tensor(name: str, x, ndim: int | None = None, dtypes=None, device=None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device}, expected {device}")
    return x


def shape(name: str, x: torch.Tensor, expected: tuple) -> None:
    if tuple(x.shape) != expected:
        raise ValueError(f"{name} must have shape {list(expected)}, got {list(x.shape)}")


def unit_last_stride(name: str, x: torch.Tensor) -> None:
    if x.stride(-1) != 1 and x.shape[-1] != 1:
        raise ValueError(f"{name} must have unit stride on its last dim, got strides {x.stride()}")


def vector_aligned(name: str, x: torch.Tensor) -> None:
    """q and k are read with 16-byte vectors: 16-byte base and strides a multiple of 8 elements."""
    unit_last_stride(name, x)
    if x.data_ptr() % 16 or any(s % 8 for s in x.stride()[:-1]):
        raise ValueError(
            f"{name} must start on a 16-byte boundary with strides that are multiples of 8 elements "
            f"(got strides {x.stride()}, address % 16 = {x.data_ptr() % 16})")


def contiguous(name: str, x: torch.Tensor) -> None:
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {x.stride()}")


def gate_mode(a, b, A_log, dt_bias, g, beta) -> str:
    raw = (a, b, A_log, dt_bias)
    pre = (g, beta)
    if all(x is not None for x in raw) and all(x is None for x in pre):
        return "raw"
    if all(x is not None for x in pre) and all(x is None for x in raw):
        return "precomputed"
    raise ValueError(
        "give exactly one gate set: raw (a, b, A_log, dt_bias) or precomputed (g, beta); "
        f"got a={_given(a)} b={_given(b)} A_log={_given(A_log)} dt_bias={_given(dt_bias)} "
        f"g={_given(g)} beta={_given(beta)}")


def _given(x) -> str:
    return "given" if x is not None else "None"


def gates(mode: str, a, b, A_log, dt_bias, g, beta, lead: tuple, num_v_heads: int, io_dtype, device) -> str | None:
    """Validates the gate tensors ([*lead, HV]); returns the dt_bias dtype name (raw) or None."""
    expected = (*lead, num_v_heads)
    if mode == "raw":
        for name, x in (("a", a), ("b", b)):
            tensor(name, x, len(expected), (io_dtype,), device)
            shape(name, x, expected)
            unit_last_stride(name, x)
        tensor("A_log", A_log, 1, (torch.float32,), device)
        shape("A_log", A_log, (num_v_heads,))
        contiguous("A_log", A_log)
        tensor("dt_bias", dt_bias, 1, tuple(BIAS_DTYPES), device)
        shape("dt_bias", dt_bias, (num_v_heads,))
        contiguous("dt_bias", dt_bias)
        return BIAS_DTYPES[dt_bias.dtype]
    for name, x in (("g", g), ("beta", beta)):
        tensor(name, x, len(expected), (torch.float32,), device)
        shape(name, x, expected)
        unit_last_stride(name, x)
    return None


def state_pool(name: str, state, num_v_heads: int, head_v_dim: int, head_k_dim: int, device) -> None:
    tensor(name, state, 4, tuple(STATE_DTYPES), device)
    if tuple(state.shape[1:]) != (num_v_heads, head_v_dim, head_k_dim):
        raise ValueError(f"{name} must have shape [pool_size, {num_v_heads}, {head_v_dim}, {head_k_dim}], "
                         f"got {list(state.shape)}")
    contiguous(name, state)
    if state.data_ptr() % 16:
        raise ValueError(f"{name} must start on a 16-byte boundary")


def indices(name: str, idx, batch: int, device) -> None:
    tensor(name, idx, 1, (torch.int32,), device)
    shape(name, idx, (batch,))
    contiguous(name, idx)


def debug_indices(name: str, idx: torch.Tensor, limit: int) -> None:
    """CUTE_GDN_DEBUG=1 only: synchronizes the host to check ranges and uniqueness."""
    valid = idx[idx >= 0]
    if valid.numel() and int(valid.max()) >= limit:
        raise ValueError(f"{name} has an entry {int(valid.max())} >= {limit}")
    if valid.unique().numel() != valid.numel():
        raise ValueError(f"{name} has repeated non-negative entries")


def output(out, expected: tuple, dtype, device) -> None:
    tensor("out", out, len(expected), (dtype,), device)
    shape("out", out, expected)
    unit_last_stride("out", out)


def cache(name: str, x, state: torch.Tensor) -> None:
    """A verify cache [cache_slots, cache_steps, HV, V, K] that matches the state pool."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != state.dtype:
        raise TypeError(f"{name} must have the state's dtype {state.dtype}, got {x.dtype}")
    if x.dim() != 5 or tuple(x.shape[2:]) != tuple(state.shape[1:]) or x.shape[1] < 1:
        raise ValueError(f"{name} must have shape [cache_slots, cache_steps, {', '.join(map(str, state.shape[1:]))}] "
                         f"with cache_steps >= 1, got {list(x.shape)}")
    if x.device != state.device:
        raise ValueError(f"{name} is on {x.device}, expected {state.device}")
    contiguous(name, x)
    if x.data_ptr() % 16:
        raise ValueError(f"{name} must start on a 16-byte boundary")
