"""fp32 device math of the aux kernel: exp2 (fast or exact), the inclusive scan of a chunk's log-decays and
the forward substitution of the 16 x 16 diagonal blocks of (I + A).
"""


import cutlass
import cutlass.cute as cute
from cutlass import Float16, Float32


BLOCK = 16       # diagonal block of the inverse
LDB = BLOCK + 1  # row stride (floats) of the fp32 diagonal blocks of A, [t, s % 16]
LOG2E = 1.4426950408889634


@cute.jit
def exp2(x, fast: cutlass.Constexpr):
    """2^x, the aux kernel's decays: fast, one ex2.approx (relative error about 2^-22; 0 below 2^-126),
    else the exact library function (about 8 instructions). The folded aux kernel, which runs only
    beside an overlapped chain, keeps the exact one: made faster that way it slowed the whole call
    (H200, replayed, H16/HV32 32768 x 1: 777 against 704 us), presumably by taking memory bandwidth
    from the chain, which sets the time; unfolded aux kernels gain 4-6%."""
    return cute.math.exp2(x, fastmath=fast)


@cute.jit
def inclusive_scan_64(sG, lane):
    """In-place inclusive prefix sum of the 64 floats of sG by one warp (two per lane)."""
    g0 = sG[2 * lane]
    g1 = sG[2 * lane + 1]
    pair = g0 + g1
    incl = pair
    for off in cutlass.range_constexpr(5):
        other = cute.arch.shuffle_sync_up(incl, 1 << off)
        if lane >= (1 << off):
            incl = incl + other
    cute.arch.sync_warp()
    sG[2 * lane] = incl - pair + g0
    sG[2 * lane + 1] = incl


@cute.jit
def solve_diagonal_blocks(sA, sD, tidx):
    """D = (I + A_d)^-1 for the 16 x 16 diagonal blocks of the strictly lower-triangular fp32 A (sA:
    [t, s % 16] for s in t's block), by forward substitution in fp32 (thread tidx < 64: column
    tidx % 16 of block tidx // 16), written as fp16 into those blocks of sD."""
    b = tidx // BLOCK
    col = tidx % BLOCK
    m = cute.make_rmem_tensor(cute.make_layout(BLOCK), Float32)
    for i in cutlass.range_constexpr(BLOCK):
        acc = Float32(0.0)
        if col == i:
            acc = Float32(1.0)
        for j in cutlass.range_constexpr(i):
            acc = acc - sA[b * BLOCK + i, j] * m[j]
        m[i] = acc
    for i in cutlass.range_constexpr(BLOCK):
        sD[b * BLOCK + i, b * BLOCK + col] = m[i].to(Float16)
