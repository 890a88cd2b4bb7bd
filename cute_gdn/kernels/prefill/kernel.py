"""GdnPrefillSm90: the compiled prefill function. `__call__` builds the shared-memory layouts, storage and
TiledMmas of the aux kernel and of every chain kind, and launches the aux and / or chain kernel that the
call's run-time arguments pick (launch, chain, cp); compile_prefill compiles it for one key.
"""

from typing import Optional

import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Float16, Float32, Int32
from cutlass.cute.nvgpu import OperandMajorMode, cpasync, warpgroup
from cutlass.tensor_utils import LayoutEnum

from ..common.dtypes import cutlass_dtype
from .config import (AUX_CTAS_PER_SM, AUX_WG_THREADS, CHAIN_ALONE_SMEM, CHAIN_FOLDED, CHAIN_NARROW, CHAIN_WIDE,
                     CHUNK, CP_MAP, CP_OFF, CP_PIECES, LAUNCH_BOTH, LAUNCH_SCAN, WG_ROWS, can_implement,
                     chain_stages, chain_wgs)
from .solve import LDB
from .workspace import NUM_FACTORS, ws_tiles
from .args import AuxArgs, AuxLayouts, AuxMmas, ChainArgs, ChainCopies, ChainLayouts, ChainMmas, TmaTile

from .aux import AuxRoles
from .chain import ChainRoles
from .scan import ScanRoles


class GdnPrefillSm90(AuxRoles, ChainRoles, ScanRoles):
    def __init__(self, *, io_dtype: str, state_dtype: str, num_heads: int, num_v_heads: int, head_k_dim: int,
                 head_v_dim: int, gate_mode: str, use_qk_l2norm: bool, profile: bool = False):
        self.io_dtype = cutlass_dtype(io_dtype)
        self.state_dtype = cutlass_dtype(state_dtype)
        self.num_heads = num_heads
        self.num_v_heads = num_v_heads
        self.K = head_k_dim
        self.V = head_v_dim
        self.gate_mode = gate_mode
        self.use_qk_l2norm = use_qk_l2norm
        # Value heads per aux CTA: the two heads of a GVA pair share one q/k load, one warpgroup each.
        self.aux_heads = 2 if (num_v_heads // num_heads) % 2 == 0 else 1
        # Benchmarks only: profile=True makes thread 0 of each chain CTA sum the wall time
        # (%globaltimer, ns) of the chunk phases into mProfile[cta, phase]: 0 wait for loads, 1 state
        # chain (and its closing barrier), 2 output store (the producer warp issues the loads, so the
        # math warps have no load phase); [cta, 7] = chunks. The aux kernel's
        # CTAs write theirs (see aux_mark) into the same tensor, so a profile call launches one kernel.
        self.profile = profile

    @cute.jit
    def __call__(
        self,
        mQ: cute.Tensor,          # [1, T, H, K]
        mK: cute.Tensor,          # [1, T, H, K]
        mV: cute.Tensor,          # [1, T, HV, V]
        mGateA: cute.Tensor,      # [1, T, HV]: a (raw) or g (precomputed)
        mGateB: cute.Tensor,      # [1, T, HV]: b (raw) or beta (precomputed)
        mALog: Optional[cute.Tensor],
        mDtBias: Optional[cute.Tensor],
        mCuSeqlens: cute.Tensor,  # [N + 1] int32
        mState: cute.Tensor,      # [pool_size, HV, V, K]
        mIndices: cute.Tensor,    # [N] int32
        mHasInit: cute.Tensor,    # [N] int8 (0: start from zeros)
        mO: cute.Tensor,          # [1, T, HV, V]
        mWsTP: cute.Tensor,       # [rows, HV, ws_tiles(chain), C, C] io dtype: T, P (and W~) per chunk
        mWsF: cute.Tensor,        # [rows, HV, NUM_FACTORS, C] fp32
        mWsFlag: cute.Tensor,     # [rows, HV] int32: set to 1 by the aux CTA once its chunk is written
        scale: Float32,
        chain: Int32,             # CHAIN_NARROW / CHAIN_WIDE / CHAIN_FOLDED (chain_kind)
        launch: Int32,            # 1: the aux kernel, 2: the chain kernel, 3: both, in that order; 4: the scan
        overlap: Int32,           # 1: the chain waits on mWsFlag (aux and chain run concurrently)
        mProfile: Optional[cute.Tensor],  # [HV * N * 2, 8] int64 (profile builds), else None
        mCp: cute.Tensor,         # [pieces, HV, V + K, K] fp32: context parallelism's starts and maps
        cp: Int32,                # CP_OFF, or the context-parallel pass (cp_pieces)
        cp_step: Int32,           # tokens per piece (a multiple of 64)
        stream,
    ):
        C, K, V = CHUNK, self.K, self.V
        io = self.io_dtype
        # Token-major shared tiles, the contiguous dim 128B-swizzled for wgmma.
        # The inverse's fp16 tiles (row-major [C, C]).
        pair = self.aux_heads
        sInv_layout = sm90_utils.make_smem_layout_a(LayoutEnum.ROW_MAJOR, (C, 0, C), Float16, pair)
        sQK_layout = sm90_utils.make_smem_layout_a(LayoutEnum.ROW_MAJOR, (C, 0, K), io, 2)  # (C, K, 2)
        # Aux: the P, then T tile of each head of the CTA, where q was.
        sTile_layout = sm90_utils.make_smem_layout_a(LayoutEnum.ROW_MAJOR, (C, 0, C), io, pair)
        # Chain (per kind: chain_stages(kind) stages, chain_wgs(kind) math warpgroups): q and k, (C, K, stages)
        # each; the workspace tiles as one (C, C, stages * tiles) array, index tiles * stage + (0: T, 1: P;
        # folded chains also 2, 3: W~'s column halves); its v tiles (the CTA's columns), (C, 64 * wgs, stages).
        kinds = (CHAIN_NARROW, CHAIN_WIDE, CHAIN_FOLDED)
        sQKc_layouts = {kind: sm90_utils.make_smem_layout_a(LayoutEnum.ROW_MAJOR, (C, 0, K), io, chain_stages(kind))
                        for kind in kinds}
        sTP_layouts = {kind: sm90_utils.make_smem_layout_a(LayoutEnum.ROW_MAJOR, (C, 0, C), io,
                                                           chain_stages(kind) * ws_tiles(kind)) for kind in kinds}
        sTP_layout = sTP_layouts[CHAIN_WIDE]
        sV2_layouts = {kind: sm90_utils.make_smem_layout_a(LayoutEnum.ROW_MAJOR, (C, 0, WG_ROWS * chain_wgs(kind)),
                                                           io, chain_stages(kind)) for kind in kinds}
        # The chain's o tiles, [t, v] per warpgroup (the TMA store's source).
        sO_layouts = {kind: sm90_utils.make_smem_layout_a(LayoutEnum.ROW_MAJOR, (C, 0, WG_ROWS), io, chain_wgs(kind))
                      for kind in kinds}

        @cute.struct
        class AuxStorage:  # per value head j of the CTA: [..., j]
            sQK: cute.struct.Align[cute.struct.MemRange[io, cute.cosize(sQK_layout)], 1024]  # q, k; then P, T
            sAoff: cute.struct.Align[cute.struct.MemRange[Float16, cute.cosize(sInv_layout)], 1024]  # A_off, N
            sD: cute.struct.Align[cute.struct.MemRange[Float16, cute.cosize(sInv_layout)], 1024]
            sA: cute.struct.Align[cute.struct.MemRange[Float32, pair * C * LDB], 16]  # diagonal blocks of A
            sG: cute.struct.Align[cute.struct.MemRange[Float32, pair * C], 16]
            sBeta: cute.struct.Align[cute.struct.MemRange[Float32, pair * C], 16]
            sBF0: cute.struct.Align[cute.struct.MemRange[Float32, pair * C], 16]  # beta_t f0_t, for W
            sRK: cute.struct.Align[cute.struct.MemRange[Float32, C], 16]
            sRQ: cute.struct.Align[cute.struct.MemRange[Float32, C], 16]
            sSeq: cute.struct.Align[cute.struct.MemRange[Int32, 4], 16]  # n, bos, eos, slot of the row

        # The stages of q, k, the workspace tiles, v and f, and the o tiles at 16-bit io: 179 KiB (narrow,
        # 3 stages), 154 KiB (folded, 2 stages) or 146 KiB (wide, 2 stages).
        def chain_storage(kind):
            stages = chain_stages(kind)

            @cute.struct
            class ChainStorage:
                sQ: cute.struct.Align[cute.struct.MemRange[io, cute.cosize(sQKc_layouts[kind])], 1024]
                sK: cute.struct.Align[cute.struct.MemRange[io, cute.cosize(sQKc_layouts[kind])], 1024]
                sTP: cute.struct.Align[cute.struct.MemRange[io, cute.cosize(sTP_layouts[kind])], 1024]
                sV: cute.struct.Align[cute.struct.MemRange[io, cute.cosize(sV2_layouts[kind])], 1024]
                sO: cute.struct.Align[cute.struct.MemRange[io, cute.cosize(sO_layouts[kind])], 1024]
                sF: cute.struct.Align[cute.struct.MemRange[Float32, stages * NUM_FACTORS * C], 128]
                mbar: cute.struct.Align[cute.struct.MemRange[cutlass.Int64, 2 * stages], 8]  # full, then empty
            return ChainStorage

        assert pair * C * (C + 8) <= cute.cosize(sQK_layout)  # the padded P tiles fit where q and k were
        assert cute.cosize(sTile_layout) * 2 <= cute.cosize(sQK_layout)  # the swizzled ones where q was
        self.aux_storage = AuxStorage
        self.chain_storage = {kind: chain_storage(kind) for kind in kinds}
        # wgmma tilings (one warpgroup each): SS products of aux, RS products of the chain.
        mma_ss = sm90_utils.make_trivial_tiled_mma(io, io, OperandMajorMode.K, OperandMajorMode.K, Float32,
                                                   (1, 1, 1), (C, C))
        # The inverse: fp16 in, fp32 accumulate; B operands MN-major views of row-major tiles.
        mma_inv_ss = sm90_utils.make_trivial_tiled_mma(Float16, Float16, OperandMajorMode.K, OperandMajorMode.MN,
                                                       Float32, (1, 1, 1), (C, C))
        mma_inv_rs = sm90_utils.make_trivial_tiled_mma(Float16, Float16, OperandMajorMode.K, OperandMajorMode.MN,
                                                       Float32, (1, 1, 1), (C, C), warpgroup.OperandSource.RMEM)
        # The chain's RS products and its state update, a fresh pair per chain kernel (chain kind, cp pass): a
        # TiledMma carries its ACCUMULATE field, and one set inside a kernel's loop must not reach another
        # kernel's launch.
        chain_mmas = {variant: ChainMmas(rs=sm90_utils.make_trivial_tiled_mma(io, io, OperandMajorMode.K,
                                                                              OperandMajorMode.K, Float32, (1, 1, 1),
                                                                              (64, C), warpgroup.OperandSource.RMEM),
                                         state=sm90_utils.make_trivial_tiled_mma(io, io, OperandMajorMode.K,
                                                                                 OperandMajorMode.MN, Float32, (1, 1, 1),
                                                                                 (64, K), warpgroup.OperandSource.RMEM))
                      for variant in ((CHAIN_WIDE, CP_OFF), (CHAIN_FOLDED, CP_OFF), (CHAIN_NARROW, CP_OFF),
                                      (CHAIN_NARROW, CP_MAP), (CHAIN_NARROW, CP_PIECES))}
        # Aux W = T diag(f0) K by column halves: register A (T), B an MN-major view of k's [t, k] tile.
        mma_w = sm90_utils.make_trivial_tiled_mma(io, io, OperandMajorMode.K, OperandMajorMode.MN, Float32,
                                                  (1, 1, 1), (C, C), warpgroup.OperandSource.RMEM)
        # TMA for the chain's q, k (per head: (T, K) tiles of (C, K) at any token offset) and T, P tiles.
        tma_op = cpasync.CopyBulkTensorTileG2SOp()
        qk_tile = cute.select(sQK_layout, mode=[0, 1])
        tma_q = TmaTile(*cpasync.make_tiled_tma_atom(
            tma_op, cute.make_tensor(mQ.iterator, cute.select(mQ.layout, mode=[1, 3, 2])), qk_tile, (C, K)))
        tma_k = TmaTile(*cpasync.make_tiled_tma_atom(
            tma_op, cute.make_tensor(mK.iterator, cute.select(mK.layout, mode=[1, 3, 2])), qk_tile, (C, K)))
        tma_tp = TmaTile(*cpasync.make_tiled_tma_atom(
            tma_op, cute.make_tensor(mWsTP.iterator, cute.select(mWsTP.layout, mode=[3, 4, 2, 1, 0])),
            cute.select(sTP_layout, mode=[0, 1]), (C, C)))
        # ... and for the chain's o (full chunks): (C, 64) tiles of (T, V) per head, stored from o tiles
        # laid out as the T/P tiles are.
        tma_o = TmaTile(*cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileS2GOp(), cute.make_tensor(mO.iterator, cute.select(mO.layout, mode=[1, 3, 2])),
            cute.select(sTP_layout, mode=[0, 1]), (C, WG_ROWS)))
        # ... and for its v ((C, 64 * wgs) tiles of (T, V) per head) and f ((C, 4) fp32 tiles of the
        # workspace).
        tma_vs = [TmaTile(*cpasync.make_tiled_tma_atom(
            tma_op, cute.make_tensor(mV.iterator, cute.select(mV.layout, mode=[1, 3, 2])),
            cute.select(sV2_layouts[kind], mode=[0, 1]), (C, WG_ROWS * wgs))) for kind, wgs in ((CHAIN_NARROW, 1),
                                                                                                (CHAIN_WIDE, 2))]
        tma_f = TmaTile(*cpasync.make_tiled_tma_atom(
            tma_op, cute.make_tensor(mWsF.iterator, cute.select(mWsF.layout, mode=[3, 2, 1, 0])),
            cute.make_layout((C, NUM_FACTORS), stride=(1, C)), (C, NUM_FACTORS)))
        num_seqs = mIndices.shape[0]
        if launch % 2 == 1:  # LAUNCH_AUX or LAUNCH_BOTH
            aux_args = AuxArgs(mQ, mK, mGateA, mGateB, mALog, mDtBias, mCuSeqlens, mIndices, mWsTP, mWsF, mWsFlag,
                               scale, mProfile)
            aux_mmas = AuxMmas(ss=mma_ss, inv_ss=mma_inv_ss, inv_rs=mma_inv_rs, w=mma_w)
            aux_layouts = AuxLayouts(qk=sQK_layout, inv=sInv_layout, tile=sTile_layout)
            aux_launch = dict(grid=(self.num_v_heads // pair, mWsTP.shape[0], 1), block=(AUX_WG_THREADS * pair, 1, 1),
                              stream=stream, min_blocks_per_mp=AUX_CTAS_PER_SM[pair], preferred_smem_carveout=100)
            # Two instances, so that only a folded chain's aux kernel carries W~'s registers.
            if chain == CHAIN_FOLDED:
                self.aux_kernel(aux_args, aux_mmas, aux_layouts, True).launch(**aux_launch)
            else:
                self.aux_kernel(aux_args, aux_mmas, aux_layouts, False).launch(**aux_launch)
        if launch // 2 == 1:  # LAUNCH_CHAIN or LAUNCH_BOTH
            chain_args = ChainArgs(mCuSeqlens, mState, mIndices, mHasInit, mO, mWsFlag, overlap, mProfile, mCp, cp_step)
            copies = {kind: ChainCopies(q=tma_q, k=tma_k, tp=tma_tp, o=tma_o, v=tma_vs[chain_wgs(kind) - 1], f=tma_f)
                      for kind in kinds}
            layouts = {kind: ChainLayouts(qk=sQKc_layouts[kind], v=sV2_layouts[kind], tp=sTP_layouts[kind],
                                          o=sO_layouts[kind]) for kind in kinds}
            # The chain kernel's arguments per instance (chain kind, cp pass).
            variants = {(kind, cp_pass): (chain_args, copies[kind], chain_mmas[kind, cp_pass], layouts[kind], kind,
                                          cp_pass) for kind, cp_pass in chain_mmas}
            narrow_launches = {kind: dict(block=(128 + 32, 1, 1), stream=stream,
                                          smem=max(CHAIN_ALONE_SMEM, self.chain_storage[kind].size_in_bytes()))
                               for kind in (CHAIN_NARROW, CHAIN_FOLDED)}
            # Narrow chains claim more shared memory than an SM has left beside an aux CTA, so that next to
            # a running aux kernel (overlap) the chain CTAs (at most half the SMs) keep their SMs to
            # themselves; one after the other, narrow CTAs number at most one per SM anyway.
            if cp == CP_MAP:
                # Per piece, value head and 64 rows of [S; I]: the state's V rows, then K identity rows.
                self.chain_kernel(*variants[CHAIN_NARROW, CP_MAP]).launch(
                    grid=(self.num_v_heads, mCp.shape[0] - 1, (V + K) // WG_ROWS), **narrow_launches[CHAIN_NARROW])
            elif cp == CP_PIECES:
                self.chain_kernel(*variants[CHAIN_NARROW, CP_PIECES]).launch(
                    grid=(self.num_v_heads, mCp.shape[0], V // WG_ROWS), **narrow_launches[CHAIN_NARROW])
            elif chain == CHAIN_WIDE:
                self.chain_kernel(*variants[CHAIN_WIDE, CP_OFF]).launch(
                    grid=(self.num_v_heads, num_seqs, V // (2 * WG_ROWS)), block=(3 * 128, 1, 1), stream=stream)
            elif chain == CHAIN_FOLDED:
                self.chain_kernel(*variants[CHAIN_FOLDED, CP_OFF]).launch(
                    grid=(self.num_v_heads, num_seqs, V // WG_ROWS), **narrow_launches[CHAIN_FOLDED])
            else:
                self.chain_kernel(*variants[CHAIN_NARROW, CP_OFF]).launch(
                    grid=(self.num_v_heads, num_seqs, V // WG_ROWS), **narrow_launches[CHAIN_NARROW])
        if launch == LAUNCH_SCAN:
            self.launch_scan(mCp, stream)


def compile_prefill(*, io_dtype: str, state_dtype: str, num_heads: int, num_v_heads: int, head_k_dim: int,
                    head_v_dim: int, pool_size: int, gate_mode: str, dt_bias_dtype: Optional[str],
                    use_qk_l2norm: bool, profile: bool = False):
    """Compile the prefill kernels for one key. Tensor-free: never touches a GPU.

    The returned tvm-ffi function takes (q, k, v, gate_a, gate_b, A_log, dt_bias, cu_seqlens, state,
    state_indices, has_initial_state (int8), o, ws_tp, ws_f, ws_flag, scale, chain, launch, overlap,
    profile, cp_ws, cp, cp_step); see prefill_workspace in ops.py for the workspace:
    - chain (int) picks the chain kernel (see chain_kind); the aux and chain launches of a call must
      agree on it (a folded chain reads the aux kernel's W~), and ws_tp must have ws_tiles(chain) tiles;
    - launch: 1 launches the aux kernel, 2 the chain kernel, 3 both in that order on the current stream;
    - overlap: 1 makes the chain wait, chunk by chunk, for the aux kernel's flags in ws_flag (zeroed by
      the caller), for an aux launch and a narrow or folded chain launch running concurrently on two
      streams (see use_overlap);
    - profile is None, or (profile builds, benchmarks only) an int64 [CTAs, 8] tensor that receives
      per-CTA phase times of the one kernel launched;
    - cp_ws (fp32 [pieces, HV, V + K, K]), cp and cp_step: context parallelism for one long sequence
      (N = 1, cp_pieces): piece p is tokens p * cp_step .. (p + 1) * cp_step (cp_step a multiple of 64).
      An aux launch as usual, then a chain launch with cp = CP_MAP (all pieces but the last: their maps
      into cp_ws), the caller's scan cp_ws[p + 1, :, :V] += cp_ws[p, :, :V] @ cp_ws[p, :, V:] for
      p = 1 .. pieces - 2 (launch = LAUNCH_SCAN, scan.py), then a chain launch with cp = CP_PIECES (all pieces, with their outputs).
      Otherwise cp = CP_OFF and cp_ws is not read (any tensor of that layout).
    """
    reason = can_implement(io_dtype, state_dtype, num_heads, num_v_heads, head_k_dim, head_v_dim, gate_mode,
                           dt_bias_dtype)
    if reason is not None:
        raise ValueError(reason)
    io = cutlass_dtype(io_dtype)
    H, HV, K, V = num_heads, num_v_heads, head_k_dim, head_v_dim
    tokens = cute.sym_int()
    seqs = cute.sym_int()

    def strided(dtype, inner, align):
        div = 8 if align == 16 else 1
        return cute.runtime.make_fake_tensor(
            dtype, (1, tokens, *inner),
            (cute.sym_int64(divisibility=div), cute.sym_int64(divisibility=div),
             *(cute.sym_int64(divisibility=div) for _ in inner[:-1]), 1),
            assumed_align=align,
        )

    q = strided(io, (H, K), 16)
    k = strided(io, (H, K), 16)
    v = strided(io, (HV, V), 16)
    o = strided(io, (HV, V), 16)
    if gate_mode == "raw":
        gate_a = strided(io, (HV,), io.width // 8)
        gate_b = strided(io, (HV,), io.width // 8)
        a_log = cute.runtime.make_fake_compact_tensor(Float32, (HV,))
        dt_bias = cute.runtime.make_fake_compact_tensor(cutlass_dtype(dt_bias_dtype), (HV,))
    else:
        gate_a = strided(Float32, (HV,), 4)
        gate_b = strided(Float32, (HV,), 4)
        a_log = dt_bias = None
    cu = cute.runtime.make_fake_compact_tensor(Int32, (cute.sym_int(),))
    state = cute.runtime.make_fake_compact_tensor(cutlass_dtype(state_dtype), (pool_size, HV, V, K),
                                                  stride_order=(3, 2, 1, 0), assumed_align=16)
    indices = cute.runtime.make_fake_compact_tensor(Int32, (seqs,))
    has_init = cute.runtime.make_fake_compact_tensor(cutlass.Int8, (seqs,))
    rows = cute.sym_int()
    ws_tp = cute.runtime.make_fake_compact_tensor(io, (rows, HV, cute.sym_int(), CHUNK, CHUNK),
                                                  stride_order=(4, 3, 2, 1, 0),
                                                  assumed_align=16)
    ws_f = cute.runtime.make_fake_compact_tensor(Float32, (rows, HV, NUM_FACTORS, CHUNK), stride_order=(3, 2, 1, 0),
                                                 assumed_align=16)
    ws_flag = cute.runtime.make_fake_compact_tensor(Int32, (rows, HV), stride_order=(1, 0))
    op = GdnPrefillSm90(io_dtype=io_dtype, state_dtype=state_dtype, num_heads=H, num_v_heads=HV, head_k_dim=K,
                        head_v_dim=V, gate_mode=gate_mode, use_qk_l2norm=use_qk_l2norm, profile=profile)
    prof = (cute.runtime.make_fake_compact_tensor(cutlass.Int64, (cute.sym_int(), 8), stride_order=(1, 0))
            if profile else None)
    cp_ws = cute.runtime.make_fake_compact_tensor(Float32, (cute.sym_int(), HV, V + K, K), stride_order=(3, 2, 1, 0),
                                                  assumed_align=16)
    stream = cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True)
    return cute.compile(op, q, k, v, gate_a, gate_b, a_log, dt_bias, cu, state, indices, has_init, o, ws_tp, ws_f,
                        ws_flag, Float32(1.0), Int32(0), Int32(LAUNCH_BOTH), Int32(0), prof, cp_ws, Int32(CP_OFF),
                        Int32(CHUNK), stream, options="--enable-tvm-ffi")
