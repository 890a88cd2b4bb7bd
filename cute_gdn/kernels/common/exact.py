"""fp32 arithmetic with one fixed rounding per operation, for results that must match across kernels.

PTX `mul.f32` / `add.f32` without a rounding modifier may be fused into an FMA by ptxas, and LLVM picks
which product of `a*b + c*d` to fuse by context; the same source expression can therefore round
differently in two kernels (measured: the replay fold and verify's update differed in the last bit).
`mul.rn.f32` and `fma.rn.f32` are never re-fused, so the delta-rule update written with these helpers
rounds the same way wherever it is compiled: decode, verify and the replay fold share it.
"""

import cutlass
import cutlass.cute as cute
from cutlass import Float32
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op


def _asm(text: str, constraints: str, *args, loc=None, ip=None) -> Float32:
    values = [Float32(a).ir_value(loc=loc, ip=ip) for a in args]
    return Float32(llvm.inline_asm(T.f32(), values, text, constraints, has_side_effects=False,
                                   is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT))


@dsl_user_op
def mul_rn(a, b, *, loc=None, ip=None) -> Float32:
    """a * b, rounded once (never fused with a later add)."""
    return _asm("mul.rn.f32 $0, $1, $2;", "=f,f,f", a, b, loc=loc, ip=ip)


@dsl_user_op
def fma_rn(a, b, c, *, loc=None, ip=None) -> Float32:
    """a * b + c, rounded once."""
    return _asm("fma.rn.f32 $0, $1, $2, $3;", "=f,f,f,f", a, b, c, loc=loc, ip=ip)


@cute.jit
def delta_u(decay, beta, v, sk) -> Float32:
    """u = beta * (v - decay * (S @ k)) of the delta rule, with fixed roundings."""
    return mul_rn(beta, v - mul_rn(decay, sk))


@cute.jit
def update_row(rowmap: cutlass.Constexpr, rRow: cute.Tensor, rK, decay, u):
    """S_row = decay * S_row + u * k over this thread's (vecs_per_thread, vec) slice of a state row, with
    fixed roundings; rK holds this thread's columns of k in fp32."""
    for j in cutlass.range_constexpr(rowmap.vecs_per_thread):
        for e in cutlass.range_constexpr(rowmap.vec):
            s = mul_rn(decay, rRow[j, e].to(Float32))
            rRow[j, e] = fma_rn(u, rK[j * rowmap.vec + e], s).to(rRow.element_type)
