"""Argument bundles of the prefill kernels: NamedTuples that a kernel or role method takes whole, in place of
the 20 to 33 loose parameters they had. The DSL flattens a NamedTuple argument into its fields' kernel
parameters in field order, so a kernel taking bundles compiles to the same code as one taking the fields one
by one; static fields (TiledMmas, shared-memory layouts, Python ints) add no parameter.
"""

from typing import NamedTuple, Optional

import cutlass.cute as cute
from cutlass import Float32, Int32


class TmaTile(NamedTuple):
    """A TMA atom and the coordinate tensor it copies from or to (make_tiled_tma_atom's pair)."""
    atom: cute.CopyAtom
    tensor: cute.Tensor


class AuxArgs(NamedTuple):
    """The aux kernel's run-time tensors and scalars."""
    q: cute.Tensor           # [1, T, H, K]
    k: cute.Tensor           # [1, T, H, K]
    gate_a: cute.Tensor      # [1, T, HV]: a (raw) or g (precomputed)
    gate_b: cute.Tensor      # [1, T, HV]: b (raw) or beta (precomputed)
    a_log: Optional[cute.Tensor]
    dt_bias: Optional[cute.Tensor]
    cu_seqlens: cute.Tensor  # [N + 1]
    indices: cute.Tensor     # [N]
    ws_tp: cute.Tensor       # [rows, HV, ws_tiles, C, C]
    ws_f: cute.Tensor        # [rows, HV, NUM_FACTORS, C]
    ws_flag: cute.Tensor     # [rows, HV]
    scale: Float32
    profile: Optional[cute.Tensor]


class AuxMmas(NamedTuple):
    """The aux kernel's wgmma tilings (one warpgroup each)."""
    ss: cute.TiledMma      # K K^T and Q K^T
    inv_ss: cute.TiledMma  # the inverse's first product (fp16)
    inv_rs: cute.TiledMma  # its register-A products
    w: cute.TiledMma       # W~ by column halves (folded chains)


class AuxLayouts(NamedTuple):
    """The aux kernel's swizzled shared-memory layouts."""
    qk: cute.ComposedLayout    # (C, K, 2): q, k
    inv: cute.ComposedLayout   # (C, C, pair) fp16: A_off / N and D
    tile: cute.ComposedLayout  # (C, C, pair) io: a folded chain's P and T where q was


class AuxTiles(NamedTuple):
    """The aux CTA's shared tensors of its warpgroup's value head."""
    qk: cute.Tensor    # (C, K, 2): q, k (both heads of a pair)
    a: cute.Tensor     # A's diagonal 16 x 16 blocks, fp32
    aoff: cute.Tensor  # A's blocks below them, fp16 (then N)
    d: cute.Tensor     # the diagonal blocks' inverse, fp16
    p: cute.Tensor     # P, then T (where q and k were)
    g: cute.Tensor     # cumulative log2 decay
    beta: cute.Tensor
    bf0: cute.Tensor   # beta_t f0_t (folded chains)
    rk: cute.Tensor    # 1 / |k_t|
    rq: cute.Tensor    # scale / |q_t|


class AuxWork(NamedTuple):
    """What one aux warpgroup works on."""
    tidx: Int32
    row: Int32      # workspace row (chunk)
    hv0: Int32      # the CTA's first value head
    hv: Int32       # this warpgroup's value head
    hk: Int32       # their q/k head
    j: Int32        # hv - hv0
    wg_tidx: Int32
    tok0: Int32     # the chunk's first token
    eos: Int32      # its sequence's end


class ChainArgs(NamedTuple):
    """The chain kernel's run-time tensors and scalars."""
    cu_seqlens: cute.Tensor  # [N + 1]
    state: cute.Tensor       # [pool_size, HV, V, K]
    indices: cute.Tensor     # [N]
    has_init: cute.Tensor    # [N] int8
    o: cute.Tensor           # [1, T, HV, V]
    ws_flag: cute.Tensor     # [rows, HV]
    overlap: Int32           # 1: wait for the aux kernel's flags
    profile: Optional[cute.Tensor]
    cp_ws: cute.Tensor       # [pieces, HV, V + K, K] fp32
    cp_step: Int32           # tokens per context-parallel piece


class ChainCopies(NamedTuple):
    """The chain kernel's TMA copies: loads of q, k, the workspace tiles, v and f; the o store."""
    q: TmaTile
    k: TmaTile
    tp: TmaTile
    o: TmaTile
    v: TmaTile
    f: TmaTile


class ChainMmas(NamedTuple):
    """The chain's wgmma tilings: its [64, C] register-A products and the [64, K] state update."""
    rs: cute.TiledMma
    state: cute.TiledMma


class ChainLayouts(NamedTuple):
    """The chain's swizzled shared-memory layouts (per chain kind)."""
    qk: cute.ComposedLayout  # (C, K, stages), q and k each
    v: cute.ComposedLayout   # (C, 64 * wgs, stages)
    tp: cute.ComposedLayout  # (C, C, stages * ws_tiles)
    o: cute.ComposedLayout   # (C, 64, wgs)


class ChainTiles(NamedTuple):
    """The chain CTA's shared tensors: the staged ring (index [..., stage]; tp's [..., tiles * stage + i])
    and the o tiles (per math warpgroup)."""
    q: cute.Tensor
    k: cute.Tensor
    v: cute.Tensor
    tp: cute.Tensor
    o: cute.Tensor
    f: cute.Tensor      # (NUM_FACTORS, C, stages), as the math reads it
    f_tma: cute.Tensor  # (C, NUM_FACTORS, stages), as the TMA writes it


class ChainWork(NamedTuple):
    """What one chain CTA runs (see ChainRoles.chain_work)."""
    hv: Int32          # value head
    hk: Int32          # its q/k head
    n: Int32           # sequence (context parallel: piece)
    z: Int32           # row block of the state
    v0: Int32          # the first state row of this thread's warpgroup
    c0: Int32          # the first state row of the CTA
    bos: Int32         # its tokens bos .. eos
    eos: Int32
    ws_row0: Int32     # the workspace row of its first chunk
    num_chunks: Int32
    slot: Int32        # pool slot (< 0: padding, or an idle CTA)
    has_init: Int32
    identity: object   # CP_MAP: this CTA runs identity rows (Boolean; False otherwise)
    load_v: object     # the producer loads v (Boolean; True otherwise)
    last_piece: object  # CP_PIECES: the last piece (Boolean; False otherwise)
    active: object     # slot >= 0
