"""Per-token gates of the gated delta rule, computed in fp32.

Raw gates (`a`, `b` in the io dtype, `A_log` fp32, `dt_bias` fp32 or bf16):
    g    = -exp(A_log[h]) * softplus(a + dt_bias[h])   softplus(x) = log1p(exp(x)), = x for x > 20
    beta = sigmoid(b)
Precomputed gates: `g` (natural log) and `beta` (after the sigmoid), both fp32.
The gate mode is a compile-time string: "raw" or "precomputed".
"""

import cutlass
import cutlass.cute as cute
from cutlass import Float32

GATE_MODES = ("raw", "precomputed")

# Above this, log1p(exp(x)) == x in fp32 (the same threshold as torch.nn.functional.softplus).
SOFTPLUS_THRESHOLD = 20.0


@cute.jit
def softplus(x: Float32) -> Float32:
    y = x
    if x <= SOFTPLUS_THRESHOLD:
        y = cute.math.log1p(cute.math.exp(x))
    return y


@cute.jit
def gate_log_decay_beta(
    gate_mode: cutlass.Constexpr,
    gate_a,
    gate_b,
    a_log,
    dt_bias,
):
    """Returns (g, beta) for one token and value head, in fp32 (g in natural-log space)."""
    g = Float32(0.0)
    beta = Float32(0.0)
    if cutlass.const_expr(gate_mode == "raw"):
        x = gate_a.to(Float32) + dt_bias.to(Float32)
        g = -cute.math.exp(a_log.to(Float32)) * softplus(x)
        beta = Float32(1.0) / (Float32(1.0) + cute.math.exp(-gate_b.to(Float32)))
    else:
        g = gate_a.to(Float32)
        beta = gate_b.to(Float32)
    return g, beta


@cute.jit
def gate_decay_beta(
    gate_mode: cutlass.Constexpr,
    gate_a,     # "raw": a; "precomputed": g          (scalar, any float dtype)
    gate_b,     # "raw": b; "precomputed": beta
    a_log,      # "raw": A_log[h] (fp32); unused otherwise
    dt_bias,    # "raw": dt_bias[h];      unused otherwise
):
    """Returns (exp(g), beta) for one token and value head, in fp32."""
    g, beta = gate_log_decay_beta(gate_mode, gate_a, gate_b, a_log, dt_bias)
    return cute.math.exp(g), beta
