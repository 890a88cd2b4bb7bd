"""Thread-to-element map for K-last state rows, shared by the recurrent kernels (decode, verify).

A state tile is V_TILE rows of K contiguous elements. `threads_per_row` consecutive lanes own one row
between them; lane `l` of a row group holds the 16-byte vectors l, l + TPR, l + 2*TPR, ... of that row,
so one load instruction of the group covers TPR * 16 contiguous bytes (coalesced), and a dot product
along K is a partial sum per thread plus a butterfly shuffle over the TPR lanes.

Row r of the tile belongs to row group `r % rows_per_pass`; a thread handles rows
rg, rg + rows_per_pass, ..., `rows_per_thread` of them, all loaded before the first use.
"""

from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
from cutlass import Float32


@dataclass(frozen=True)
class RowMap:
    k: int                # elements per row (head_k_dim)
    vec: int              # elements per 16-byte vector of the state dtype
    threads_per_row: int  # lanes sharing one row (power of two, <= 32)
    rows_per_pass: int    # row groups in the CTA
    rows_per_thread: int

    @property
    def vecs_per_thread(self) -> int:
        return self.k // (self.vec * self.threads_per_row)

    @property
    def cols_per_thread(self) -> int:
        return self.vecs_per_thread * self.vec

    @property
    def threads(self) -> int:
        return self.threads_per_row * self.rows_per_pass

    @property
    def tile_rows(self) -> int:
        return self.rows_per_pass * self.rows_per_thread

    def column_layout(self):
        """(vecs_per_thread, threads_per_row, vec) -> offset along K."""
        return cute.make_layout(
            (self.vecs_per_thread, self.threads_per_row, self.vec),
            stride=(self.threads_per_row * self.vec, self.vec, 1),
        )

    def tile_layout(self):
        """(rows_per_thread, rows_per_pass, vecs_per_thread, threads_per_row, vec) -> offset in the tile."""
        return cute.make_layout(
            (self.rows_per_thread, self.rows_per_pass, self.vecs_per_thread, self.threads_per_row, self.vec),
            stride=(self.rows_per_pass * self.k, self.k, self.threads_per_row * self.vec, self.vec, 1),
        )


@cute.jit
def thread_columns(rowmap: cutlass.Constexpr, gX: cute.Tensor, lane):
    """This thread's columns of a K-vector gX [K]: a (vecs_per_thread, vec) view."""
    return cute.make_tensor(gX.iterator, rowmap.column_layout())[None, lane, None]


@cute.jit
def load_columns(rowmap: cutlass.Constexpr, gX: cute.Tensor, lane):
    """Issue the loads of this thread's columns of gX [K] (kept in gX's dtype until used)."""
    raw = cute.make_rmem_tensor(
        cute.make_layout((rowmap.vecs_per_thread, rowmap.vec), stride=(rowmap.vec, 1)), gX.element_type
    )
    cute.autovec_copy(thread_columns(rowmap, gX, lane), raw)
    return raw


@cute.jit
def columns_to_f32(rowmap: cutlass.Constexpr, raw: cute.Tensor):
    """(vecs_per_thread, vec) columns -> (vecs_per_thread * vec,) fp32 registers."""
    out = cute.make_rmem_tensor((rowmap.cols_per_thread,), Float32)
    for i in cutlass.range_constexpr(rowmap.vecs_per_thread):
        for e in cutlass.range_constexpr(rowmap.vec):
            out[i * rowmap.vec + e] = raw[i, e].to(Float32)
    return out


@cute.jit
def row_sum(rowmap: cutlass.Constexpr, x: Float32) -> Float32:
    """Sum over the lanes of one row group (all of them get the result)."""
    return cute.arch.warp_reduction_sum(x, threads_in_group=rowmap.threads_per_row)


@cute.jit
def dot_columns(rowmap: cutlass.Constexpr, x: cute.Tensor, y: cute.Tensor) -> Float32:
    """Full dot product of two K-vectors held as per-thread columns."""
    acc = Float32(0.0)
    for i in cutlass.range_constexpr(rowmap.cols_per_thread):
        acc += x[i] * y[i]
    return row_sum(rowmap, acc)


@cute.jit
def state_tile_view(rowmap: cutlass.Constexpr, gS: cute.Tensor, row0, row_group, lane):
    """This thread's part of the rows [row0, row0 + tile_rows) of a state gS [V, K]:
    a (rows_per_thread, vecs_per_thread, vec) view. row0 * K * sizeof is a multiple of 16 bytes."""
    ptr = (gS.iterator + row0 * rowmap.k).align(16)
    return cute.make_tensor(ptr, rowmap.tile_layout())[None, row_group, None, lane, None]


@cute.jit
def make_state_fragment(rowmap: cutlass.Constexpr, dtype):
    return cute.make_rmem_tensor(
        cute.make_layout(
            (rowmap.rows_per_thread, rowmap.vecs_per_thread, rowmap.vec),
            stride=(rowmap.cols_per_thread, rowmap.vec, 1),
        ),
        dtype,
    )
