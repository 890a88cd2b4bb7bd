"""Fake (tensor-free) arguments for compiling the token-major kernels (decode, verify) off-GPU."""

from typing import Optional

import cutlass
import cutlass.cute as cute

from .dtypes import cutlass_dtype


def fake_token_inputs(io_dtype: str, num_heads: int, num_v_heads: int, head_k_dim: int, head_v_dim: int,
                      gate_mode: str, dt_bias_dtype: Optional[str], batch, tokens: int):
    """(q, k, v, o, gate_a, gate_b, A_log, dt_bias) for [batch, tokens, ...] inputs.

    Every dim but the last (unit-stride) has a dynamic stride, so views of a packed projection output
    are read in place; q and k are 16-byte aligned with strides divisible by 8 (16-byte vectors).
    A_log and dt_bias are None for precomputed gates (then gate_a/gate_b are fp32 g/beta).
    """
    io = cutlass_dtype(io_dtype)

    def strided(dtype, inner, align):
        div = 8 if align == 16 else 1
        return cute.runtime.make_fake_tensor(
            dtype, (batch, tokens, *inner),
            (cute.sym_int64(divisibility=div), cute.sym_int64(divisibility=div),
             *(cute.sym_int64(divisibility=div) for _ in inner[:-1]), 1),
            assumed_align=align,
        )

    q = strided(io, (num_heads, head_k_dim), 16)
    k = strided(io, (num_heads, head_k_dim), 16)
    v = strided(io, (num_v_heads, head_v_dim), io.width // 8)
    o = strided(io, (num_v_heads, head_v_dim), io.width // 8)
    if gate_mode == "raw":
        gate_a = strided(io, (num_v_heads,), io.width // 8)
        gate_b = strided(io, (num_v_heads,), io.width // 8)
        a_log = cute.runtime.make_fake_compact_tensor(cutlass.Float32, (num_v_heads,))
        dt_bias = cute.runtime.make_fake_compact_tensor(cutlass_dtype(dt_bias_dtype), (num_v_heads,))
    else:
        gate_a = strided(cutlass.Float32, (num_v_heads,), 4)
        gate_b = strided(cutlass.Float32, (num_v_heads,), 4)
        a_log = dt_bias = None
    return q, k, v, o, gate_a, gate_b, a_log, dt_bias
