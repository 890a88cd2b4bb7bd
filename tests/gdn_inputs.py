"""Random GDN inputs shared by the GPU tests: fresh values every call, never zeros."""

from __future__ import annotations

import torch

from cute_gdn import reference

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Head shapes the recurrent kernels (decode, verify) are tested at besides Qwen's: (H, HV, K, V, state dtype).
SHAPE_CASES = [
    (4, 4, 128, 128, "float32"),    # GVA ratio 1
    (2, 8, 128, 128, "bfloat16"),   # GVA ratio 4
    (3, 6, 64, 32, "float32"),      # small heads
    (2, 4, 96, 48, "bfloat16"),     # dims that are not powers of two
    (1, 2, 256, 256, "float32"),    # largest supported head dim
    (2, 2, 16, 16, "bfloat16"),     # smallest
]


def make_step_inputs(B, T, H, HV, K, V, *, io_dtype=torch.bfloat16, gates="raw", bias_dtype=torch.float32,
                     packed=False, device="cuda", decay="moderate"):
    """q, k, v (optionally strided views of one packed projection [B, T, 2HK + HV V]) and gates.

    decay: "moderate" (typical), "tiny" (g ~ -1e-4) or "strong" (g ~ -10).
    """
    if packed:
        mixed = torch.randn(B, T, 2 * H * K + HV * V, device=device, dtype=io_dtype)
        q, k, v = torch.split(mixed, [H * K, H * K, HV * V], dim=-1)
        q, k, v = q.view(B, T, H, K), k.view(B, T, H, K), v.view(B, T, HV, V)
    else:
        q = torch.randn(B, T, H, K, device=device, dtype=io_dtype)
        k = torch.randn(B, T, H, K, device=device, dtype=io_dtype)
        v = torch.randn(B, T, HV, V, device=device, dtype=io_dtype)
    a = (torch.randn(B, T, HV, device=device) * 2).to(io_dtype)
    b = torch.randn(B, T, HV, device=device).to(io_dtype)
    A_log = {"moderate": torch.rand(HV, device=device) * 2 - 1,
             "tiny": torch.full((HV,), -9.0, device=device),
             "strong": torch.full((HV,), 2.3, device=device)}[decay]
    dt_bias = (torch.randn(HV, device=device)).to(bias_dtype)
    inputs = dict(q=q, k=k, v=v)
    if gates == "raw":
        inputs.update(a=a, b=b, A_log=A_log, dt_bias=dt_bias)
    else:
        g, beta = reference.compute_gates(a, b, A_log, dt_bias, dtype=torch.float32)
        inputs.update(g=g.contiguous(), beta=beta.contiguous())
    return inputs


def make_pool(pool_size, HV, V, K, dtype, device="cuda"):
    # States of realistic magnitude (|S| ~ 0.1-1), random so untouched-slot checks mean something.
    return (torch.randn(pool_size, HV, V, K, device=device) * 0.5).to(dtype)


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))
