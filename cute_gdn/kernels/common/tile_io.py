"""Row I/O of [rows, width] tiles: cp.async of token rows into swizzled shared memory (zero past the end of a
sequence), 16-byte stores of shared rows to global memory, and accumulator rows of a state to and from
global memory.
"""

import cutlass
import cutlass.cute as cute
from cutlass import Float32


@cute.jit
def load_rows(io: cutlass.Constexpr, width: cutlass.Constexpr, threads: cutlass.Constexpr, mX, sX, tok0, eos, head,
              col0, tidx):
    """cp.async of rows tok0 .. tok0 + R, columns col0 .. col0 + width of mX[0, :, head, :] (16-byte
    vectors) into the swizzled tile sX [R, width] by `threads` threads; rows at or past eos are
    zero-filled."""
    vecs_per_row = width // 8
    atom = cute.make_copy_atom(cute.nvgpu.cpasync.CopyG2SOp(cute.nvgpu.cpasync.LoadCacheMode.GLOBAL), io,
                               num_bits_per_copy=128)
    for i in cutlass.range_constexpr(cute.size(sX, mode=[0]) * vecs_per_row // threads):
        e = tidx + i * threads
        r = e // vecs_per_row
        j = e % vecs_per_row
        dst = cute.local_tile(sX, (1, 8), (r, j))[0, None]
        if tok0 + r < eos:
            src = mX[0, tok0 + r, head, None]
            cute.copy(atom, cute.make_tensor((src.iterator + col0 + j * 8).align(16), cute.make_layout(8)), dst)
        else:
            dst.fill(0.0)


@cute.jit
def read_rows(acc_S, cS, gS, r0):
    """A warpgroup's state fragment acc_S (fp32, coordinates cS) from rows r0 .. r0 + 64 of gS [rows, K]."""
    for i in cutlass.range_constexpr(cute.size(acc_S)):
        r, col = cS[i]
        acc_S[i] = gS[r0 + r, col].to(Float32)


@cute.jit
def write_rows(acc_S, cS, gS, r0):
    """acc_S into rows r0 .. r0 + 64 of gS [rows, K] (rounded to gS's type)."""
    for i in cutlass.range_constexpr(cute.size(acc_S)):
        r, col = cS[i]
        gS[r0 + r, col] = acc_S[i].to(gS.element_type)


@cute.jit
def store_rows(sX, gX, rows, tidx, threads: cutlass.Constexpr):
    """Rows r < rows of the [R, W] 16-bit shared tile sX (plain or swizzled: local_tile follows the
    swizzle) into gX[r, 0:W] (rows 16-byte aligned), 16 bytes per copy, by `threads` threads."""
    vecs_per_row = cute.size(sX, mode=[1]) // 8
    for i in cutlass.range_constexpr(cute.size(sX, mode=[0]) * vecs_per_row // threads):
        e = tidx + i * threads
        r = e // vecs_per_row
        j = e % vecs_per_row
        if r < rows:
            frag = cute.make_rmem_tensor(cute.make_layout(8), sX.element_type)
            cute.autovec_copy(cute.local_tile(sX, (1, 8), (r, j))[0, None], frag)
            dst = gX[r, None]
            cute.autovec_copy(frag, cute.make_tensor((dst.iterator + j * 8).align(16), cute.make_layout(8)))
