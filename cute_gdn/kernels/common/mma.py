"""Warpgroup MMA helpers shared by the tensor-core kernels (prefill): issuing a wgmma over its k blocks,
register fragments to and from shared memory (stmatrix / ldmatrix through the TiledMma's layouts), the
accumulator-as-A-operand layout, transposed views and TMA tile copies.
"""

import cutlass
import cutlass.cute as cute
from cutlass.cute.nvgpu import cpasync, warpgroup


def transpose_view(t: cute.Tensor) -> cute.Tensor:
    """Swap the first two modes of a (possibly swizzled) tensor without moving data."""
    shape = (t.shape[1], t.shape[0], *t.shape[2:])
    order = (1, 0, *range(2, cute.rank(t)))
    return cute.composition(t, cute.make_ordered_layout(shape, order=order))


def acc_to_a_layout(acc_layout):
    """The fp32 accumulator layout ((2, 2, N/8), M, N) of one m64nN wgmma tile, viewed as the register
    A operand ((2, 2, 2), M, (N/16, N)) of a following m64 x k16 wgmma (16-bit data: same registers)."""
    d = cute.logical_divide(acc_layout, ((None, None, 2), None, None))
    return cute.make_layout(
        ((d.shape[0][0], d.shape[0][1], d.shape[0][2][0]), d.shape[1], (d.shape[0][2][1], d.shape[2])),
        stride=((d.stride[0][0], d.stride[0][1], d.stride[0][2][0]), d.stride[1],
                (d.stride[0][2][1], d.stride[2])),
    )


@cute.jit
def gemm_issue(tiled_mma: cute.TiledMma, acc, tA, tB, accumulate: cutlass.Constexpr = False):
    """Issue acc (+)= A B^T over every k-block for the calling warpgroup; the caller commits and
    waits (warpgroup.commit_group / wait_group)."""
    tiled_mma.set(warpgroup.Field.ACCUMULATE, accumulate)
    warpgroup.fence()
    for kb in cutlass.range_constexpr(cute.size(tA, mode=[2])):
        cute.gemm(tiled_mma, acc, tA[None, None, kb], tB[None, None, kb], acc)
        tiled_mma.set(warpgroup.Field.ACCUMULATE, True)


@cute.jit
def gemm(tiled_mma: cute.TiledMma, acc, tA, tB, accumulate: cutlass.Constexpr = False):
    """acc (+)= A B^T over every k-block, issued and waited for by the calling warpgroup."""
    gemm_issue(tiled_mma, acc, tA, tB, accumulate)
    warpgroup.commit_group()
    warpgroup.wait_group(0)


@cute.jit
def store_fragment(tiled_mma: cute.TiledMma, rX, sX, wg_tidx, transpose: cutlass.Constexpr = False):
    """A warpgroup's 16-bit fragment rX (in the layout of tiled_mma's accumulator) into the shared
    tile sX, by stmatrix (four 8 x 8 matrices an instruction); transpose=True when sX's contiguous
    dim is the fragment's row (M) dim."""
    atom = cute.make_copy_atom(cute.nvgpu.warp.StMatrix8x8x16bOp(transpose, 4), rX.element_type)
    tiled = cute.make_tiled_copy_C(atom, tiled_mma)
    cute.copy(tiled, tiled.retile(rX), tiled.get_slice(wg_tidx).partition_D(sX))


@cute.jit
def store_fragment_io(tiled_mma: cute.TiledMma, acc, sX, wg_tidx):
    """The fp32 accumulator acc, rounded to sX's 16-bit type, into sX transposed (store_fragment)."""
    rX = cute.make_rmem_tensor(acc.layout, sX.element_type)
    rX.store(acc.load().to(sX.element_type))
    store_fragment(tiled_mma, rX, sX, wg_tidx, transpose=True)


@cute.jit
def load_fragment(tiled_mma: cute.TiledMma, sX, rX, wg_tidx, transpose: cutlass.Constexpr = False):
    """The shared tile sX into a warpgroup's 16-bit fragment rX (in the layout of tiled_mma's
    accumulator), by ldmatrix (four 8 x 8 matrices an instruction); transpose=True when sX's
    contiguous dim is the fragment's row (M) dim."""
    atom = cute.make_copy_atom(cute.nvgpu.warp.LdMatrix8x8x16bOp(transpose, 4), rX.element_type)
    tiled = cute.make_tiled_copy_C(atom, tiled_mma)
    cute.copy(tiled, tiled.get_slice(wg_tidx).partition_S(sX), tiled.retile(rX))


@cute.jit
def tma_tile(atom: cute.CopyAtom, sX, gX):
    """The TMA views (shared, global) of one 2-D tile: sX a shared tile, gX its coordinate tile."""
    return cpasync.tma_partition(atom, 0, cute.make_layout(1), cute.group_modes(sX, 0, 2),
                                 cute.group_modes(gX, 0, 2))
