"""Chunked varlen prefill of the gated delta rule on Hopper tensor cores (sm_90a).

Two kernels in one compiled function, which launches either or both (`launch`):

1. `aux` (one CTA per chunk of 64 tokens and GVA pair of value heads, one warpgroup per head, all
   chunks in parallel; a single head per CTA when HV / H is odd). The pair shares one load of q and k.
   Everything of a chunk that does not depend on the state: with G_t the cumulative log-decay inside
   the chunk, rk_t = 1 / |k_t| and rq_t = scale / |q_t| (the L2 norms folded into per-token factors),
     A[t, s] = beta_t rk_t rk_s (k_t . k_s) exp(G_t - G_s)   s < t     wgmma K K^T
     P[t, s] = rq_t rk_s (q_t . k_s) exp(G_t - G_s)           s <= t    wgmma Q K^T
     T[n, s] = ((I + A)^-1)[n, s] beta_s
   where (I + A)^-1 = (I + N)^-1 D with D the inverse of its 16 x 16 diagonal blocks (fp32 forward
   substitution) and N = D A_off strictly block-lower (N^4 = 0), so (I + N)^-1 = I - N + N^2 - N^3:
   four 64 x 64 x 64 fp16 wgmma products,
   and the factors f = (exp(G_t) rk_t, exp(G_t) rq_t, exp(G_last - G_t) rk_t, exp(G_last)). T, P
   (io dtype) and f (fp32) go to a workspace indexed by chunk, then a per-chunk flag (release). For a
   folded chain (below) also W~ = -T diag(f0) K [n, k] (two more 64 x 64 x 64 wgmma products).
2. `chain` (one CTA per sequence, value head and 64 or 128 value rows, sequential over the chunks).
   The CTA's rows of S = state[state_indices[n], h] ([V, K] fp32) stay in the registers of its one or
   two warpgroups, 64 rows each; per chunk, with the raw (unnormalized) q and k as wgmma B operands:
     SK = S K^T,  O1 = S Q^T                                [v, t]   wgmma RS
     X  = V^T - f0_t SK                                      [v, t]
     U  = X T^T                                              [v, n]
     O  = f1_t O1 + U P^T                                    -> o[t, v]
     S  = f3 S + (U f2_s) K                                  [v, k]
   which is reference.chunk_gated_delta_rule transposed (U is that function's `residual`); f1_t O1 and
   f3 S are formed while U's wgmma runs. The chunk's q, k, T, P, v and f are loaded in stages (see
   the producer warp below); v^T is read into registers by transposed ldmatrix. o goes through
   the warpgroup's own shared tile (stmatrix) to global memory by TMA store (row by row for a
   sequence's partial last chunk). Narrow CTAs (one warpgroup) double the CTAs for calls too small to
   fill the GPU, one per SM; wide ones (two warpgroups) share the loads across 128 rows, for all other
   calls (use_wide_chain). A folded chain (narrow, for overlapped calls, chain_kind) reads W~ too and
   forms U = V^T T^T + S W~^T: one product on the state instead of SK, X and X T^T in a row. Every
   chain CTA has a producer warp that issues all loads (q, k, the workspace tiles, v and f by TMA,
   chain_stages stages, full/empty mbarriers), so the math warpgroups never issue a load or wait at a barrier
   that includes the loads; a wide CTA's producer is a warpgroup, for setmaxnreg (math 224
   registers, producer 56).

Overlap (use_overlap): when the narrow chain CTAs number at most half the SMs, ops.prefill launches
the aux kernel on the caller's stream and the chain concurrently on a high-priority stream. The
chain then waits for each chunk's flag (acquire) before loading it, and claims enough shared memory
(CHAIN_ALONE_SMEM) that no aux CTA shares its SM. The aux kernel never waits, and it keeps at least
half the SMs, so the pair cannot deadlock; run one after the other they give the same bits.

Context parallelism (cp_pieces: one sequence, few value heads): the chain is affine in its start, so
a sequence in P pieces runs as the aux kernel, a maps pass (chain_kernel with CP_MAP: each piece's
S_end = S_start M + B, no outputs), a scan of P - 2 products by the caller, and a pieces pass
(CP_PIECES: every piece from its start, with outputs); see chain_kernel and ops.prefill.

Why two kernels: the chain is inherently sequential per sequence, so a single long sequence keeps
only HV CTAs busy; moving every state-independent product and the triangular solve out of it runs
them on the whole GPU and leaves the chain with five small GEMMs per chunk. The price is the
workspace (16 KiB + 1 KiB per chunk and value head at bf16) written once and read once.

Tokens past the end of a sequence in its last chunk are read as zeros with g = 0 and beta = 0, which
makes them exact no-ops (see the reference). Padding (state_indices[n] < 0) writes zero output
rows and touches no state. A zero-length sequence writes back its initial state.

Workspace: chunk j of sequence n lives at row cu_seqlens[n] // 64 + n + j, so ws_rows(T, N) =
T // 64 + N + 1 rows suffice for any lengths (each sequence adds at most one partial chunk).

Supported: K = V = 128 (the shape that must be fast); other head dims are rejected by can_implement.
"""

from typing import Optional

import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Float16, Float32, Int32
from cutlass.cute.nvgpu import OperandMajorMode, cpasync, warpgroup
from cutlass.tensor_utils import LayoutEnum

from .common.dtypes import cutlass_dtype
from .common.gates import gate_log_decay_beta
from .common.problem import check_problem

CHUNK = 64
LAUNCH_AUX, LAUNCH_CHAIN, LAUNCH_BOTH = 1, 2, 3  # the compiled function's `launch` argument
CHAIN_NARROW, CHAIN_WIDE, CHAIN_FOLDED = 0, 1, 2  # its `chain` argument, see chain_kind
CP_OFF, CP_MAP, CP_PIECES = 0, 1, 2  # its `cp` argument (context parallelism), see cp_pieces
AUX_WG_THREADS = 128  # aux: one warpgroup per value head of the CTA
WG_ROWS = 64  # chain: each warpgroup owns 64 value rows of the state; a CTA has 1 or 2 warpgroups
SUPPORTED_HEAD_DIM = 128
AUX_CTAS_PER_SM = {1: 4, 2: 3}  # by value heads per aux CTA: registers capped for it (80 a thread at 2)
# A narrow chain CTA asks for at least this much shared memory (it uses 179 KiB, folded 154): more than 228 KiB minus
# an aux CTA's 75 KiB, so no aux CTA shares its SM.
CHAIN_ALONE_SMEM = 160 * 1024
CP_MIN_CHUNKS = 16  # context parallelism: chunks per piece at least (see cp_pieces)
NUM_FACTORS = 4  # per-token fp32 factors of a chunk, see the module docstring
BLOCK = 16       # diagonal block of the inverse
LDB = BLOCK + 1  # row stride (floats) of the fp32 diagonal blocks of A, [t, s % 16]
# Chain named barriers: BAR_WG + wg for math warpgroup wg alone, BAR_MATH for all math warps.
BAR_WG, BAR_MATH = 1, 3
LOG2E = 1.4426950408889634


def narrow_chain_ctas(num_seqs: int, num_v_heads: int, head_v_dim: int) -> int:
    """Chain CTAs of one warpgroup a call would launch: one per sequence, value head and 64 value rows."""
    return num_seqs * num_v_heads * (head_v_dim // WG_ROWS)


def use_wide_chain(num_seqs: int, num_v_heads: int, head_v_dim: int, num_sms: int) -> bool:
    """Chain CTAs of two warpgroups (one per sequence and head, sharing the q/k/T/P loads) once the
    narrow ones (one warpgroup, V / 64 CTAs per sequence and head) would number more than one per SM:
    two narrow CTAs on one SM take longer per 64 rows than one wide CTA (H100: 4.2 against 3.0 us per
    chunk and 128 rows)."""
    return narrow_chain_ctas(num_seqs, num_v_heads, head_v_dim) > num_sms


def use_overlap(num_seqs: int, num_v_heads: int, head_v_dim: int, num_sms: int) -> bool:
    """Run the aux and chain kernels concurrently (the chain waiting on per-chunk flags) when the
    narrow chain CTAs number at most half the SMs: those calls (few, long sequences) leave at least
    half the GPU to the aux kernel, whose chunk-major order finishes the early chunks first. An
    overlapped chain CTA leaves no room for an aux CTA on its SM, so a chain grid of one CTA per SM
    could take every SM while waiting for aux CTAs that then never start (a deadlock), and a grid
    close to that would leave the aux kernel a few SMs. Those calls launch the two kernels one after
    the other."""
    return 2 * narrow_chain_ctas(num_seqs, num_v_heads, head_v_dim) <= num_sms


def chain_kind(num_seqs: int, num_v_heads: int, head_v_dim: int, num_sms: int) -> int:
    """The chain ops.prefill runs: wide (use_wide_chain), folded (a narrow chain reading W~ from the aux
    kernel, see state_chain_folded) when the call is overlapped (use_overlap), else narrow. Folding moves
    work from the chain to the aux kernel: it pays where the chain alone sets the time (H200, CUDA-graph
    replay: 8192 x 1, H16/HV32 261 -> 243 us), not where the aux kernel runs first (8192 x 2 209 -> 228 us)."""
    if use_wide_chain(num_seqs, num_v_heads, head_v_dim, num_sms):
        return CHAIN_WIDE
    return CHAIN_FOLDED if use_overlap(num_seqs, num_v_heads, head_v_dim, num_sms) else CHAIN_NARROW


def cp_pieces(num_seqs: int, tokens: int, num_v_heads: int, head_k_dim: int, head_v_dim: int, num_sms: int) -> int:
    """Pieces of a context-parallel call, or 0 to run the sequences whole. One long sequence with few
    heads leaves most SMs idle in the chain (HV * V / 64 CTAs); split into P pieces it costs about 3x the
    chain work, on up to all SMs: the maps pass (piece 0 from its true start, V / 64 CTAs a head;
    pieces 1 .. P - 2 with their transition maps too, (V + K) / 64 CTAs a head), a scan of P - 2 matrix
    products, then every piece with its output (P * V / 64 CTAs a head). P is the most pieces whose maps
    pass fits in one wave; calls with fewer than 3 pieces (HV * (2V + K) / 64 above the SMs) or pieces
    under CP_MIN_CHUNKS chunks run whole."""
    if num_seqs != 1:
        return 0
    first = num_v_heads * head_v_dim // WG_ROWS
    middle = num_v_heads * (head_v_dim + head_k_dim) // WG_ROWS
    if first + middle > num_sms:
        return 0
    pieces = min(2 + (num_sms - first) // middle, tokens // (CP_MIN_CHUNKS * CHUNK))
    return pieces if pieces >= 3 else 0


def cp_step(tokens: int, pieces: int) -> int:
    """Tokens per piece (a multiple of CHUNK; the last piece takes the rest)."""
    chunks = -(-tokens // CHUNK)
    return -(-chunks // pieces) * CHUNK


def ws_tiles(chain: int) -> int:
    """[C, C] workspace tiles per chunk and value head: T and P, and for a folded chain the two column
    halves of W~ (see state_chain_folded)."""
    return 4 if chain == CHAIN_FOLDED else 2


def chain_wgs(chain: int) -> int:
    """Math warpgroups of a chain CTA (64 state rows each)."""
    return 2 if chain == CHAIN_WIDE else 1


def chain_stages(chain: int) -> int:
    """Pipeline stages of a chain CTA's loads: three for a narrow chain (179 KiB of shared memory), so
    that a chunk's loads are issued two chunks ahead (H200: context-parallel passes 5-10% faster); two for
    a folded chain (its W~ leaves no room for three) and a wide one (three made many short sequences
    6-11% slower)."""
    return 3 if chain == CHAIN_NARROW else 2


def ws_rows(tokens: int, num_seqs: int) -> int:
    """Workspace rows (chunk slots) needed for `tokens` tokens in `num_seqs` sequences."""
    return tokens // CHUNK + num_seqs + 1


def can_implement(io_dtype: str, state_dtype: str, num_heads: int, num_v_heads: int, head_k_dim: int,
                  head_v_dim: int, gate_mode: str, dt_bias_dtype: Optional[str]) -> Optional[str]:
    reason = check_problem(io_dtype, state_dtype, num_heads, num_v_heads, head_k_dim, head_v_dim, gate_mode,
                           dt_bias_dtype)
    if reason is not None:
        return reason
    if head_k_dim != SUPPORTED_HEAD_DIM or head_v_dim != SUPPORTED_HEAD_DIM:
        return (f"prefill supports head_k_dim = head_v_dim = {SUPPORTED_HEAD_DIM}, got K={head_k_dim} "
                f"V={head_v_dim}")
    return None


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


class GdnPrefillSm90:
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
        launch: Int32,            # 1: the aux kernel, 2: the chain kernel, 3: both, in that order
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
        chain_mmas = {variant: (sm90_utils.make_trivial_tiled_mma(io, io, OperandMajorMode.K, OperandMajorMode.K,
                                                                  Float32, (1, 1, 1), (64, C),
                                                                  warpgroup.OperandSource.RMEM),
                                sm90_utils.make_trivial_tiled_mma(io, io, OperandMajorMode.K, OperandMajorMode.MN,
                                                                  Float32, (1, 1, 1), (64, K),
                                                                  warpgroup.OperandSource.RMEM))
                      for variant in ((CHAIN_WIDE, CP_OFF), (CHAIN_FOLDED, CP_OFF), (CHAIN_NARROW, CP_OFF),
                                      (CHAIN_NARROW, CP_MAP), (CHAIN_NARROW, CP_PIECES))}
        # Aux W = T diag(f0) K by column halves: register A (T), B an MN-major view of k's [t, k] tile.
        mma_w = sm90_utils.make_trivial_tiled_mma(io, io, OperandMajorMode.K, OperandMajorMode.MN, Float32,
                                                  (1, 1, 1), (C, C), warpgroup.OperandSource.RMEM)
        # TMA for the chain's q, k (per head: (T, K) tiles of (C, K) at any token offset) and T, P tiles.
        tma_op = cpasync.CopyBulkTensorTileG2SOp()
        qk_tile = cute.select(sQK_layout, mode=[0, 1])
        tma_q, tma_tensor_q = cpasync.make_tiled_tma_atom(
            tma_op, cute.make_tensor(mQ.iterator, cute.select(mQ.layout, mode=[1, 3, 2])), qk_tile, (C, K))
        tma_k, tma_tensor_k = cpasync.make_tiled_tma_atom(
            tma_op, cute.make_tensor(mK.iterator, cute.select(mK.layout, mode=[1, 3, 2])), qk_tile, (C, K))
        tma_tp, tma_tensor_tp = cpasync.make_tiled_tma_atom(
            tma_op, cute.make_tensor(mWsTP.iterator, cute.select(mWsTP.layout, mode=[3, 4, 2, 1, 0])),
            cute.select(sTP_layout, mode=[0, 1]), (C, C))
        # ... and for the chain's o (full chunks): (C, 64) tiles of (T, V) per head, stored from o tiles
        # laid out as the T/P tiles are.
        tma_o, tma_tensor_o = cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileS2GOp(), cute.make_tensor(mO.iterator, cute.select(mO.layout, mode=[1, 3, 2])),
            cute.select(sTP_layout, mode=[0, 1]), (C, WG_ROWS))
        tma = (tma_q, tma_tensor_q, tma_k, tma_tensor_k, tma_tp, tma_tensor_tp, tma_o, tma_tensor_o)
        # ... and for its v ((C, 64 * wgs) tiles of (T, V) per head) and f ((C, 4) fp32 tiles of the
        # workspace).
        tma_vs = [cpasync.make_tiled_tma_atom(
            tma_op, cute.make_tensor(mV.iterator, cute.select(mV.layout, mode=[1, 3, 2])),
            cute.select(sV2_layouts[kind], mode=[0, 1]), (C, WG_ROWS * wgs)) for kind, wgs in ((CHAIN_NARROW, 1),
                                                                                             (CHAIN_WIDE, 2))]
        tma_f, tma_tensor_f = cpasync.make_tiled_tma_atom(
            tma_op, cute.make_tensor(mWsF.iterator, cute.select(mWsF.layout, mode=[3, 2, 1, 0])),
            cute.make_layout((C, NUM_FACTORS), stride=(1, C)), (C, NUM_FACTORS))
        num_seqs = mIndices.shape[0]
        if launch % 2 == 1:  # LAUNCH_AUX or LAUNCH_BOTH
            aux_args = (mQ, mK, mGateA, mGateB, mALog, mDtBias, mCuSeqlens, mIndices, mWsTP, mWsF, mWsFlag, scale,
                        mProfile, mma_ss, mma_inv_ss, mma_inv_rs, mma_w, sQK_layout, sInv_layout, sTile_layout)
            aux_launch = dict(grid=(self.num_v_heads // pair, mWsTP.shape[0], 1), block=(AUX_WG_THREADS * pair, 1, 1),
                              stream=stream, min_blocks_per_mp=AUX_CTAS_PER_SM[pair], preferred_smem_carveout=100)
            # Two instances, so that only a folded chain's aux kernel carries W~'s registers.
            if chain == CHAIN_FOLDED:
                self.aux_kernel(*aux_args, True).launch(**aux_launch)
            else:
                self.aux_kernel(*aux_args, False).launch(**aux_launch)
        if launch // 2 == 1:  # LAUNCH_CHAIN or LAUNCH_BOTH
            chain_args = (mCuSeqlens, mState, mIndices, mHasInit, mO, mWsFlag, overlap, mProfile, mCp, cp_step, *tma)
            layouts = {kind: (sQKc_layouts[kind], *tma_vs[chain_wgs(kind) - 1], tma_f, tma_tensor_f,
                              sV2_layouts[kind], sTP_layouts[kind], sO_layouts[kind], kind) for kind in kinds}
            narrow = layouts[CHAIN_NARROW]
            narrow_launches = {kind: dict(block=(128 + 32, 1, 1), stream=stream,
                                          smem=max(CHAIN_ALONE_SMEM, self.chain_storage[kind].size_in_bytes()))
                               for kind in (CHAIN_NARROW, CHAIN_FOLDED)}
            # Narrow chains claim more shared memory than an SM has left beside an aux CTA, so that next to
            # a running aux kernel (overlap) the chain CTAs (at most half the SMs) keep their SMs to
            # themselves; one after the other, narrow CTAs number at most one per SM anyway.
            if cp == CP_MAP:
                # Per piece, value head and 64 rows of [S; I]: the state's V rows, then K identity rows.
                self.chain_kernel(*chain_args, *chain_mmas[CHAIN_NARROW, CP_MAP], *narrow, CP_MAP).launch(
                    grid=(self.num_v_heads, mCp.shape[0] - 1, (V + K) // WG_ROWS), **narrow_launches[CHAIN_NARROW])
            elif cp == CP_PIECES:
                self.chain_kernel(*chain_args, *chain_mmas[CHAIN_NARROW, CP_PIECES], *narrow, CP_PIECES).launch(
                    grid=(self.num_v_heads, mCp.shape[0], V // WG_ROWS), **narrow_launches[CHAIN_NARROW])
            elif chain == CHAIN_WIDE:
                self.chain_kernel(*chain_args, *chain_mmas[CHAIN_WIDE, CP_OFF], *layouts[CHAIN_WIDE], CP_OFF).launch(
                    grid=(self.num_v_heads, num_seqs, V // (2 * WG_ROWS)), block=(3 * 128, 1, 1),
                    stream=stream)
            elif chain == CHAIN_FOLDED:
                self.chain_kernel(*chain_args, *chain_mmas[CHAIN_FOLDED, CP_OFF], *layouts[CHAIN_FOLDED],
                                  CP_OFF).launch(grid=(self.num_v_heads, num_seqs, V // WG_ROWS),
                                                 **narrow_launches[CHAIN_FOLDED])
            else:
                self.chain_kernel(*chain_args, *chain_mmas[CHAIN_NARROW, CP_OFF], *narrow, CP_OFF).launch(
                    grid=(self.num_v_heads, num_seqs, V // WG_ROWS), **narrow_launches[CHAIN_NARROW])

    # ================================ aux: one chunk, all of it off the state ================================

    @cute.kernel
    def aux_kernel(
        self,
        mQ: cute.Tensor,
        mK: cute.Tensor,
        mGateA: cute.Tensor,
        mGateB: cute.Tensor,
        mALog: Optional[cute.Tensor],
        mDtBias: Optional[cute.Tensor],
        mCuSeqlens: cute.Tensor,
        mIndices: cute.Tensor,
        mWsTP: cute.Tensor,
        mWsF: cute.Tensor,
        mWsFlag: cute.Tensor,
        scale: Float32,
        mProfile: Optional[cute.Tensor],
        mma_ss: cute.TiledMma,
        mma_inv_ss: cute.TiledMma,
        mma_inv_rs: cute.TiledMma,
        mma_w: cute.TiledMma,
        sQK_layout: cute.ComposedLayout,
        sInv_layout: cute.ComposedLayout,
        sTile_layout: cute.ComposedLayout,
        fold: cutlass.Constexpr,
    ):
        C = CHUNK
        pair = self.aux_heads
        threads = AUX_WG_THREADS * pair
        tidx, _, _ = cute.arch.thread_idx()
        x, row, _ = cute.arch.block_idx()
        j = tidx // AUX_WG_THREADS   # this warpgroup's value head hv = x * pair + j
        wg_tidx = tidx % AUX_WG_THREADS
        hv0 = x * pair
        hv = hv0 + j
        hk = hv0 // (self.num_v_heads // self.num_heads)
        storage = cutlass.memory.SmemAllocator().allocate(self.aux_storage)
        # The sequence n owning workspace row `row`: the last n with cu[n] // C + n <= row (a strictly
        # increasing function of n), found by all threads at once in one round trip to global memory.
        # Its thread leaves n, bos, eos and the slot in sSeq.
        sSeq = storage.sSeq.get_tensor(cute.make_layout(4))
        num_seqs = mIndices.shape[0]
        for base in cutlass.range(0, num_seqs, threads, unroll=1):
            i = base + tidx
            if i < num_seqs:
                cu_i = mCuSeqlens[i]
                cu_next = mCuSeqlens[i + 1]
                slot_i = mIndices[i]
                if cu_i // C + i <= row:
                    if i + 1 == num_seqs or cu_next // C + i + 1 > row:
                        sSeq[0] = i
                        sSeq[1] = cu_i
                        sSeq[2] = cu_next
                        sSeq[3] = slot_i
        cute.arch.sync_threads()
        n = sSeq[0]
        bos = sSeq[1]
        eos = sSeq[2]
        chunk = row - (bos // C + n)
        tok0 = bos + chunk * C
        if tok0 < eos and sSeq[3] >= 0:
            stamp = cute.arch.globaltimer()
            sQK = storage.sQK.get_tensor(sQK_layout.outer, swizzle=sQK_layout.inner)
            sA = storage.sA.get_tensor(cute.make_layout((C, BLOCK, pair), stride=(LDB, 1, C * LDB)))[None, None, j]
            sAoff = storage.sAoff.get_tensor(sInv_layout.outer, swizzle=sInv_layout.inner)[None, None, j]
            sD = storage.sD.get_tensor(sInv_layout.outer, swizzle=sInv_layout.inner)[None, None, j]
            # P goes where q and k were once every warpgroup's products are done (rows padded to C + 8;
            # folded: swizzled tiles where q was, as k stays for W~), and T reuses P's tile once P is stored.
            sP = cute.make_tensor((storage.sQK.data_ptr() + j * C * (C + 8)).align(16),
                                  cute.make_layout((C, C), stride=(C + 8, 1)))
            if cutlass.const_expr(fold):
                sP = storage.sQK.get_tensor(sTile_layout.outer, swizzle=sTile_layout.inner)[None, None, j]
            sTo = sP
            sG = storage.sG.get_tensor(cute.make_layout((C, pair), stride=(1, C)))[None, j]
            sBeta = storage.sBeta.get_tensor(cute.make_layout((C, pair), stride=(1, C)))[None, j]
            sBF0 = storage.sBF0.get_tensor(cute.make_layout((C, pair), stride=(1, C)))[None, j]
            sRK = storage.sRK.get_tensor(cute.make_layout(C))
            sRQ = storage.sRQ.get_tensor(cute.make_layout(C))

            # The token's gate inputs are loaded first, so that their round trip overlaps issuing the q/k
            # copies. A token past the sequence end reads token tok0's and is made a no-op below.
            t_gate = tok0 + wg_tidx
            if t_gate >= eos:
                t_gate = tok0
            gate_a = mGateA[0, t_gate, hv]
            gate_b = mGateB[0, t_gate, hv]
            a_log = None
            dt_bias = None
            if cutlass.const_expr(self.gate_mode == "raw"):
                a_log = mALog[hv]
                dt_bias = mDtBias[hv]
            load_rows(self.io_dtype, self.K, threads, mQ, sQK[None, None, 0], tok0, eos, hk, 0, tidx)
            load_rows(self.io_dtype, self.K, threads, mK, sQK[None, None, 1], tok0, eos, hk, 0, tidx)
            cute.arch.cp_async_commit_group()
            if wg_tidx < C:
                g, beta = gate_log_decay_beta(self.gate_mode, gate_a, gate_b, a_log, dt_bias)
                if tok0 + wg_tidx >= eos:
                    g = Float32(0.0)
                    beta = Float32(0.0)
                sG[wg_tidx] = g * LOG2E  # log2 units: the epilogues' decays are one ex2 each
                sBeta[wg_tidx] = beta
            stamp = self.aux_mark(mProfile, row, hv0, 0, stamp)
            cute.arch.cp_async_wait_group(0)
            cute.arch.fence_view_async_shared()
            cute.arch.sync_threads()
            stamp = self.aux_mark(mProfile, row, hv0, 1, stamp)

            # Each warpgroup: K K^T (issued now, waited for after the norms and its g scan).
            thr = mma_ss.get_slice(wg_tidx)
            acc = cute.make_rmem_tensor(thr.partition_shape_C((C, C)), Float32)
            gemm_issue(mma_ss, acc, mma_ss.make_fragment_A(thr.partition_A(sQK[None, None, 1])),
                       mma_ss.make_fragment_B(thr.partition_B(sQK[None, None, 1])))
            warpgroup.commit_group()
            self.row_norms(sQK, sRQ, sRK, scale, threads, tidx)
            if wg_tidx < 32:
                inclusive_scan_64(sG, wg_tidx)
            warpgroup.wait_group(0)
            cute.arch.sync_threads()
            stamp = self.aux_mark(mProfile, row, hv0, 2, stamp)

            cC = thr.partition_C(cute.make_identity_tensor((C, C)))
            # A: its diagonal 16 x 16 blocks (fp32) for the forward substitution, the blocks below
            # them (fp16, zeros elsewhere) for the tensor-core part of the inverse.
            # The factors are read before any store, so that the compiler shares the loads of a row
            # or column (a thread's fragment spans 2 rows and 16 columns); computed for every element
            # and then masked, so that no load sits in a branch.
            for i in cutlass.range_constexpr(cute.size(acc)):
                t, s = cC[i]
                full = (sBeta[t] * sRK[t] * sRK[s]) * acc[i] * exp2(sG[t] - sG[s], not fold)
                val = Float32(0.0)
                if s < t:
                    val = full
                acc[i] = val
            rOff = cute.make_rmem_tensor(acc.layout, Float16)
            for i in cutlass.range_constexpr(cute.size(acc)):
                t, s = cC[i]
                val = acc[i]
                off = Float32(0.0)
                if t // BLOCK == s // BLOCK:
                    sA[t, s % BLOCK] = val
                else:
                    off = val
                rOff[i] = off.to(Float16)
            store_fragment(mma_ss, rOff, sAoff, wg_tidx)
            # Zero sD (the swizzle only permutes 16-byte units, so a flat view will do): 16 B a store.
            sD_flat = storage.sD.get_tensor(cute.make_layout(pair * C * C))
            zeros = cute.make_rmem_tensor(cute.make_layout(8), Float16)
            zeros.fill(0.0)
            for i in cutlass.range_constexpr(C * C // 8 // AUX_WG_THREADS):
                vec = j * C * C // 8 + wg_tidx + i * AUX_WG_THREADS
                cute.autovec_copy(zeros, cute.local_tile(sD_flat, (8,), (vec,)))
            # Q K^T into the same accumulator.
            gemm(mma_ss, acc, mma_ss.make_fragment_A(thr.partition_A(sQK[None, None, 0])),
                 mma_ss.make_fragment_B(thr.partition_B(sQK[None, None, 1])))
            if wg_tidx < C:
                g_t = sG[wg_tidx]
                g_last = sG[C - 1]
                gamma = exp2(g_t, not fold)
                mWsF[row, hv, 0, wg_tidx] = gamma * sRK[wg_tidx]
                mWsF[row, hv, 1, wg_tidx] = gamma * sRQ[wg_tidx]
                mWsF[row, hv, 2, wg_tidx] = exp2(g_last - g_t, not fold) * sRK[wg_tidx]
                mWsF[row, hv, 3, wg_tidx] = exp2(g_last, not fold)
                if cutlass.const_expr(fold):
                    sBF0[wg_tidx] = sBeta[wg_tidx] * (gamma * sRK[wg_tidx])
            cute.arch.sync_threads()  # every warpgroup is done reading q and k
            rP = cute.make_rmem_tensor(acc.layout, sP.element_type)
            for i in cutlass.range_constexpr(cute.size(acc)):
                t, s = cC[i]
                full = (sRQ[t] * sRK[s]) * acc[i] * exp2(sG[t] - sG[s], not fold)
                val = Float32(0.0)
                if s <= t:
                    val = full
                rP[i] = val.to(sP.element_type)
            store_fragment(mma_ss, rP, sP, wg_tidx)
            cute.arch.sync_threads()
            stamp = self.aux_mark(mProfile, row, hv0, 3, stamp)
            if wg_tidx < C:
                solve_diagonal_blocks(sA, sD, wg_tidx)
            cute.arch.fence_view_async_shared()
            store_rows(sP, mWsTP[row, hv, 1, None, None], C, wg_tidx, AUX_WG_THREADS)
            cute.arch.sync_threads()
            acc_inv = self.invert_offdiagonal(mma_inv_ss, mma_inv_rs, sAoff, sD, sTo, sBeta, wg_tidx)
            stamp = self.aux_mark(mProfile, row, hv0, 4, stamp)
            store_rows(sTo, mWsTP[row, hv, 0, None, None], C, wg_tidx, AUX_WG_THREADS)
            if cutlass.const_expr(fold):
                # The folded chain's W~ = -T diag(f0) K [n, k] (see state_chain_folded), by column halves
                # staged where A_off and D were (free since the inverse's closing barrier).
                sW = [cute.make_tensor(cute.recast_ptr(buf.data_ptr(), sTile_layout.inner, self.io_dtype),
                                       sTile_layout.outer)[None, None, j] for buf in (storage.sAoff, storage.sD)]
                self.w_products(mma_w, acc_inv, sBF0, sQK[None, None, 1], sW, wg_tidx)
                cute.arch.sync_threads()
                for h in cutlass.range_constexpr(2):
                    store_rows(sW[h], mWsTP[row, hv, 2 + h, None, None], C, wg_tidx, AUX_WG_THREADS)
            stamp = self.aux_mark(mProfile, row, hv0, 5, stamp)
            # Publish the chunk to a concurrent chain kernel: every thread's stores, then the flags.
            cute.arch.sync_threads()
            if tidx == 0:
                cute.arch.fence_acq_rel_gpu()
                for h in cutlass.range_constexpr(pair):
                    cute.arch.store(flag_ptr(mWsFlag, row, hv0 + h), Int32(1), sem="release", scope="gpu")

    @cute.jit
    def aux_mark(self, mProfile, row, hv, phase: cutlass.Constexpr, stamp):
        """profile builds of the aux kernel alone: thread 0 adds the time since `stamp` to
        mProfile[row * HV + hv, phase] (0 loads issued and gates, 1 loads landed, 2 products, norms and
        scan, 3 epilogues, 4 inverse, 5 T/P stores); returns the new stamp."""
        if cutlass.const_expr(self.profile):
            cute.arch.sync_threads()
            now = cute.arch.globaltimer()
            if cute.arch.thread_idx()[0] == 0:
                mProfile[row * self.num_v_heads + hv, phase] = now - stamp
            stamp = now
        return stamp

    @cute.jit
    def row_norms(self, sQK, sRQ, sRK, scale, threads: cutlass.Constexpr, tidx):
        """sRQ[t] = scale / |q_t|, sRK[t] = 1 / |k_t| (scale and 1 without the L2 norm): four threads
        per row, 16-byte shared loads."""
        K = self.K
        part = tidx % 4
        vecs = K // 8 // 4
        for rp in cutlass.range_constexpr(CHUNK * 4 // threads):
            r = tidx // 4 + rp * (threads // 4)
            for which in cutlass.range_constexpr(2):
                ss = Float32(0.0)
                if cutlass.const_expr(self.use_qk_l2norm):
                    src = sQK[None, None, which]
                    for i in cutlass.range_constexpr(vecs):
                        frag = cute.make_rmem_tensor(cute.make_layout(8), self.io_dtype)
                        cute.autovec_copy(cute.local_tile(src, (1, 8), (r, part * vecs + i))[0, None], frag)
                        x = frag.load().to(Float32)
                        ss += (x * x).reduce(cute.ReductionOp.ADD, Float32(0.0), 0)
                    ss += cute.arch.shuffle_sync_bfly(ss, 1)
                    ss += cute.arch.shuffle_sync_bfly(ss, 2)
                factor = Float32(1.0)
                if cutlass.const_expr(self.use_qk_l2norm):
                    factor = cute.math.rsqrt(ss + 1e-6)
                if part == 0:
                    if cutlass.const_expr(which == 0):
                        sRQ[r] = factor * scale
                    else:
                        sRK[r] = factor

    @cute.jit
    def invert_offdiagonal(self, mma_inv_ss, mma_inv_rs, sAoff, sD, sTo, sBeta, wg_tidx):
        """Each warpgroup for its value head, with D = (I + A_d)^-1 (block diagonal, in sD) and A_off
        (the blocks below the diagonal, in sAoff): (I + A)^-1 = (I + N)^-1 D with N = D A_off strictly
        block-lower, so N^4 = 0 and (I + N)^-1 = W = I - N + N^2 - N^3, built as W <- I - W N from
        W = I - N. Four 64 x 64 x 64 fp16 wgmma products; N overwrites A_off; T = W D diag(beta) goes to
        sTo (io dtype). Ends with a CTA barrier."""
        C = CHUNK
        thr_ss = mma_inv_ss.get_slice(wg_tidx)
        thr = mma_inv_rs.get_slice(wg_tidx)
        acc = cute.make_rmem_tensor(thr.partition_shape_C((C, C)), Float32)
        cC = thr.partition_C(cute.make_identity_tensor((C, C)))
        rW = cute.make_rmem_tensor(acc_to_a_layout(acc.layout), Float16)
        rW_acc = cute.make_tensor(rW.iterator, acc.layout)
        gemm(mma_inv_ss, acc, mma_inv_ss.make_fragment_A(thr_ss.partition_A(sD)),
             mma_inv_ss.make_fragment_B(thr_ss.partition_B(transpose_view(sAoff))))
        sN = sAoff
        rN = cute.make_rmem_tensor(acc.layout, Float16)
        for i in cutlass.range_constexpr(cute.size(acc)):
            r, c = cC[i]
            rN[i] = acc[i].to(Float16)
            ident = Float32(0.0)
            if r == c:
                ident = Float32(1.0)
            rW_acc[i] = (ident - acc[i]).to(Float16)
        store_fragment(mma_inv_rs, rN, sN, wg_tidx)
        cute.arch.fence_view_async_shared()
        cute.arch.sync_threads()
        tN = mma_inv_rs.make_fragment_B(thr.partition_B(transpose_view(sN)))
        for _ in cutlass.range_constexpr(2):
            gemm(mma_inv_rs, acc, rW, tN)
            for i in cutlass.range_constexpr(cute.size(acc)):
                r, c = cC[i]
                ident = Float32(0.0)
                if r == c:
                    ident = Float32(1.0)
                rW_acc[i] = (ident - acc[i]).to(Float16)
        gemm(mma_inv_rs, acc, rW, mma_inv_rs.make_fragment_B(thr.partition_B(transpose_view(sD))))
        rT = cute.make_rmem_tensor(acc.layout, sTo.element_type)
        for i in cutlass.range_constexpr(cute.size(acc)):
            r, c = cC[i]
            rT[i] = (acc[i] * sBeta[c]).to(sTo.element_type)
        store_fragment(mma_inv_rs, rT, sTo, wg_tidx)
        cute.arch.sync_threads()
        return acc

    @cute.jit
    def w_products(self, mma_w, acc_inv, sBF0, sK, sW, wg_tidx):
        """W~ = -T diag(f0) K = -(I + A)^-1 diag(beta f0) K for the warpgroup's head, from acc_inv (the
        fp32 (I + A)^-1 of invert_offdiagonal) and k's [t, k] tile: two 64 x 64 x 64 wgmma products, one per
        column half h of W~, each into its shared tile sW[h] (io dtype)."""
        C = CHUNK
        io = self.io_dtype
        thr = mma_w.get_slice(wg_tidx)
        cC = thr.partition_C(cute.make_identity_tensor((C, C)))
        rA = cute.make_rmem_tensor(acc_to_a_layout(acc_inv.layout), io)
        rA_acc = cute.make_tensor(rA.iterator, acc_inv.layout)
        for i in cutlass.range_constexpr(cute.size(acc_inv)):
            n, s = cC[i]
            rA_acc[i] = (acc_inv[i] * sBF0[s]).to(io)
        for h in cutlass.range_constexpr(2):
            acc = cute.make_rmem_tensor(thr.partition_shape_C((C, C)), Float32)
            tB = mma_w.make_fragment_B(thr.partition_B(transpose_view(cute.local_tile(sK, (C, C), (0, h)))))
            gemm(mma_w, acc, rA, tB)
            rW = cute.make_rmem_tensor(acc.layout, io)
            rW.store((-acc.load()).to(io))
            store_fragment(mma_w, rW, sW[h], wg_tidx)

    # ================================ chain: the state through the chunks ================================

    @cute.kernel
    def chain_kernel(
        self,
        mCuSeqlens: cute.Tensor,
        mState: cute.Tensor,
        mIndices: cute.Tensor,
        mHasInit: cute.Tensor,
        mO: cute.Tensor,
        mWsFlag: cute.Tensor,
        overlap: Int32,
        mProfile: Optional[cute.Tensor],
        mCp: cute.Tensor,
        cp_step: Int32,
        tma_q: cute.CopyAtom,
        tma_tensor_q: cute.Tensor,
        tma_k: cute.CopyAtom,
        tma_tensor_k: cute.Tensor,
        tma_tp: cute.CopyAtom,
        tma_tensor_tp: cute.Tensor,
        tma_o: cute.CopyAtom,
        tma_tensor_o: cute.Tensor,
        mma_rs: cute.TiledMma,
        mma_state: cute.TiledMma,
        sQK_layout: cute.ComposedLayout,
        tma_v: cute.CopyAtom,
        tma_tensor_v: cute.Tensor,
        tma_f: cute.CopyAtom,
        tma_tensor_f: cute.Tensor,
        sV_layout: cute.ComposedLayout,
        sTP_layout: cute.ComposedLayout,
        sO_layout: cute.ComposedLayout,
        kind: cutlass.Constexpr,
        cp: cutlass.Constexpr,
    ):
        """CTA (hv, n, z): value rows z * 64 * wgs .. (z + 1) * 64 * wgs of sequence n's state, 64 per math
        warpgroup (warps 0 .. 4 wgs - 1), and a producer warp (warp 4 wgs; with two math warpgroups, the
        first warp of a producer warpgroup, for setmaxnreg) that loads every chunk's q, k,
        workspace tiles (T, P, and W~ when folded), v and f by TMA into chain_stages stages: it waits for a
        stage's `empty` mbarrier (one arrival per math thread once its chunk is done with the stage)
        and, when overlapped, for the chunk's flag, then arms the stage's `full` mbarrier with the byte
        count. The math warpgroups wait on `full`; each synchronizes only within itself (named barrier
        BAR_WG + wg) and stores its own o tile, so a wide CTA's two warpgroups drift apart freely (they
        meet only at a sequence's partial last chunk, BAR_MATH). kind: CHAIN_WIDE has two math warpgroups,
        the others one; CHAIN_FOLDED runs state_chain_folded, the others state_chain; chain_stages(kind)
        stages.

        cp (context parallelism, narrow chains; n is a piece of the one sequence, whose slot and
        has_initial_state are the call's first): CP_MAP computes piece n's affine map S_end = S_start M + B
        with no output: CTAs z < V / 64 run the state's rows from piece 0's true start (other pieces from
        zeros) and write B into mCp[n + 1, :, :V] (for piece 0, the true start of piece 1); CTAs z >= V / 64
        run identity rows with v = 0 and write M's rows into mCp[n, :, V:] (not needed for piece 0).
        CP_PIECES runs every piece with its output from its start (piece 0 the pool's, piece n > 0
        mCp[n, :, :V]); only the last piece writes the pool."""
        C, K = CHUNK, self.K
        wgs = chain_wgs(kind)
        stages = chain_stages(kind)
        fold = kind == CHAIN_FOLDED
        math_threads = 128 * wgs
        tiles = ws_tiles(kind)
        tidx, _, _ = cute.arch.thread_idx()
        hv, n, z = cute.arch.block_idx()
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        wg = tidx // 128
        wg_tidx = tidx % 128
        hk = hv // (self.num_v_heads // self.num_heads)
        c0 = z * WG_ROWS * wgs
        v0 = c0 + wg * WG_ROWS
        last_piece = False
        if cutlass.const_expr(cp != CP_OFF):
            # Piece n of the one sequence: cp_step tokens from n * cp_step; the aux kernel ran on the whole
            # sequence, so its chunk j is workspace row j.
            bos = n * cp_step
            eos = bos + cp_step
            if eos > mCuSeqlens[1]:
                eos = mCuSeqlens[1]
            ws_row0 = bos // C
            last_piece = n == mCp.shape[0] - 1
        else:
            bos = mCuSeqlens[n]
            eos = mCuSeqlens[n + 1]
            ws_row0 = bos // C + n
        num_chunks = (eos - bos + C - 1) // C
        outputs = cp != CP_MAP  # (constexpr)
        slot = mIndices[0]
        has_init = mHasInit[0]
        if cutlass.const_expr(cp == CP_OFF):
            slot = mIndices[n]
            has_init = mHasInit[n]
        # CP_MAP: CTAs z >= V / 64 run identity rows with v = 0 (none for piece 0, which needs no M).
        identity = False
        load_v = True
        if cutlass.const_expr(cp == CP_MAP):
            identity = z >= self.V // WG_ROWS
            load_v = z < self.V // WG_ROWS
            if identity and n == 0:
                slot = Int32(-1)  # idle
        active = slot >= 0

        storage = cutlass.memory.SmemAllocator().allocate(self.chain_storage[kind])
        sQs = storage.sQ.get_tensor(sQK_layout.outer, swizzle=sQK_layout.inner)
        sKs = storage.sK.get_tensor(sQK_layout.outer, swizzle=sQK_layout.inner)
        sVs = storage.sV.get_tensor(sV_layout.outer, swizzle=sV_layout.inner)
        sTPs = storage.sTP.get_tensor(sTP_layout.outer, swizzle=sTP_layout.inner)
        sOs = storage.sO.get_tensor(sO_layout.outer, swizzle=sO_layout.inner)
        sFs = storage.sF.get_tensor(cute.make_layout((NUM_FACTORS, C, stages), stride=(C, 1, NUM_FACTORS * C)))
        sF_tma = storage.sF.get_tensor(cute.make_layout((C, NUM_FACTORS, stages), stride=(1, C, NUM_FACTORS * C)))
        full = storage.mbar.data_ptr()
        empty = full + stages
        if tidx == 0:
            for d in (tma_q, tma_k, tma_tp, tma_o, tma_v, tma_f):
                cpasync.prefetch_descriptor(d)
            for st in cutlass.range_constexpr(stages):
                cute.arch.mbarrier_init(full + st, 1)
                cute.arch.mbarrier_init(empty + st, math_threads)
        cute.arch.mbarrier_init_fence()
        cute.arch.sync_threads()  # the last barrier of all the CTA's threads
        # (Made here, outside the role branches: a TiledMma used inside a branch whose helpers set its
        # ACCUMULATE field would be yielded out of the branch, which the IR verifier rejects.)
        thr_state = mma_state.get_slice(tidx % 128)
        acc_S = cute.make_rmem_tensor(thr_state.partition_shape_C((WG_ROWS, K)), Float32)
        cS = thr_state.partition_C(cute.make_identity_tensor((WG_ROWS, K)))
        # With two math warpgroups the producer is a warpgroup (only its first warp works): three warps
        # share each SM sub-partition's 16K registers, so the math warps take 224 and the producers 56
        # (setmaxnreg, inside each role's branch so that ptxas sees each role's code apart).
        if warp >= 4 * wgs:
            if cutlass.const_expr(wgs == 2):
                cute.arch.warpgroup_reg_dealloc(56)
        if warp == 4 * wgs:
            if active:
                self.produce_chunks(tma_q, tma_tensor_q, tma_k, tma_tensor_k, tma_tp, tma_tensor_tp, tma_v,
                                    tma_tensor_v, tma_f, tma_tensor_f, sQs, sKs, sTPs, sVs, sF_tma, full, empty,
                                    mWsFlag, overlap, bos, ws_row0, num_chunks, hv, hk, z, tiles, wgs, stages,
                                    outputs, load_v, tidx % 32)
        if warp < 4 * wgs:
            if cutlass.const_expr(wgs == 2):
                cute.arch.warpgroup_reg_alloc(224)
            gO = cute.local_tile(cute.domain_offset((bos, 0, 0), tma_tensor_o)[None, None, hv], (C, WG_ROWS),
                                 (None, None))
            if active:
                self.load_state(acc_S, cS, mState, mCp, has_init, slot, n, hv, v0, identity, cp)
                if identity:
                    # v = 0: the producer loads none, so both stages of the v tile are zeros throughout.
                    sV_flat = storage.sV.get_tensor(cute.make_layout(cute.cosize(sV_layout)))
                    zeros = cute.make_rmem_tensor(cute.make_layout(8), self.io_dtype)
                    zeros.fill(0.0)
                    for i in cutlass.range_constexpr(cute.cosize(sV_layout) // 8 // 128):
                        cute.autovec_copy(zeros, cute.local_tile(sV_flat, (8,), (tidx + i * 128,)))
                    cute.arch.barrier(barrier_id=BAR_WG, number_of_threads=128)
                prof = cute.make_rmem_tensor(cute.make_layout(3), cutlass.Int64)
                prof.fill(0)
                stamp = cute.arch.globaltimer()
                for c in cutlass.range(num_chunks, unroll=1):
                    stage = c % stages
                    tok0 = bos + c * C
                    valid = eos - tok0
                    if valid > C:
                        valid = C
                    cute.arch.mbarrier_wait(full + stage, (c // stages) % 2)
                    if valid < C:
                        # k rows past the sequence end hold the next sequence's tokens (or TMA zeros). (The
                        # one barrier of both math warpgroups: a sequence's last chunk.)
                        self.zero_rows_from(sKs[None, None, stage], valid, tidx, math_threads)
                        cute.arch.fence_view_async_shared()
                        cute.arch.barrier(barrier_id=BAR_MATH, number_of_threads=math_threads)
                    stamp = self.mark(prof, 0, stamp)
                    if cutlass.const_expr(fold):
                        self.state_chain_folded(mma_rs, mma_state, acc_S, sQs[None, None, stage],
                                                sKs[None, None, stage], sVs[None, None, stage],
                                                *(sTPs[None, None, tiles * stage + i] for i in range(4)),
                                                sOs[None, None, 0], sFs[None, None, stage], tidx)
                    else:
                        self.state_chain(mma_rs, mma_state, acc_S, sQs[None, None, stage], sKs[None, None, stage],
                                         sVs[None, None, stage], sTPs[None, None, tiles * stage],
                                         sTPs[None, None, tiles * stage + 1], sOs[None, None, wg],
                                         sFs[None, None, stage], wg, wgs, tidx, outputs)
                    cute.arch.mbarrier_arrive(empty + stage)  # this thread is done with the stage
                    if cutlass.const_expr(outputs):
                        cute.arch.fence_view_async_shared()  # the o tile's stores before a TMA store reads it
                        cute.arch.barrier(barrier_id=BAR_WG + wg, number_of_threads=128)
                        stamp = self.mark(prof, 1, stamp)
                        # Each warpgroup stores its own o tile (its first warp issues the TMA store), so the
                        # two warpgroups of a wide CTA never wait for each other inside a full chunk.
                        if valid == C:
                            if wg_tidx < 32:
                                s_tile, g_tile = tma_tile(tma_o, sOs[None, None, wg],
                                                          gO[None, None, c, z * wgs + wg])
                                cute.copy(tma_o, s_tile, g_tile)
                                cute.arch.cp_async_bulk_commit_group()
                        else:
                            store_rows(sOs[None, None, wg], cute.domain_offset((tok0, v0), mO[0, None, hv, None]),
                                       valid, wg_tidx, 128)
                        stamp = self.mark(prof, 2, stamp)
                if cutlass.const_expr(outputs):
                    if wg_tidx < 32:
                        cute.arch.cp_async_bulk_wait_group(0, read=True)
                if cutlass.const_expr(self.profile and cp == CP_OFF):
                    if tidx == 0:
                        cta = (n * self.num_v_heads + hv) * (self.V // (WG_ROWS * wgs)) + z
                        for i in cutlass.range_constexpr(3):
                            mProfile[cta, i] = prof[i]
                        mProfile[cta, 7] = cutlass.Int64(num_chunks)
                self.store_state(acc_S, cS, mState, mCp, slot, n, hv, v0, identity, last_piece, cp)
            if slot < 0:
                if cutlass.const_expr(outputs):
                    self.zero_output(mO, bos, eos, hv, c0, wgs, tidx)

    @cute.jit
    def zero_rows_from(self, sX, first, tidx, threads: cutlass.Constexpr):
        """Zero rows first .. CHUNK of the [CHUNK, K] shared tile sX (generic stores, by `threads` threads)."""
        K = self.K
        for i in cutlass.range_constexpr(CHUNK * K // threads):
            e = tidx + i * threads
            if e // K >= first:
                sX[e // K, e % K] = Float32(0.0).to(self.io_dtype)

    @cute.jit
    def produce_chunks(self, tma_q, tma_tensor_q, tma_k, tma_tensor_k, tma_tp, tma_tensor_tp, tma_v, tma_tensor_v,
                       tma_f, tma_tensor_f, sQs, sKs, sTPs, sVs, sF_tma, full, empty, mWsFlag, overlap, bos, ws_row0,
                       num_chunks, hv, hk, z, tiles: cutlass.Constexpr, wgs: cutlass.Constexpr,
                       stages: cutlass.Constexpr, outputs: cutlass.Constexpr, load_v, lane):
        """The chain's producer warp: every chunk's loads into stage c % stages, once the math warpgroups
        have released the stage (chunk c - stages) and, when overlapped, the aux kernel has flagged the chunk.
        Without outputs (CP_MAP) it loads no q and no P; without load_v, no v."""
        C, K = CHUNK, self.K
        gQ = cute.local_tile(cute.domain_offset((bos, 0, 0), tma_tensor_q)[None, None, hk], (C, K), (None, 0))
        gK = cute.local_tile(cute.domain_offset((bos, 0, 0), tma_tensor_k)[None, None, hk], (C, K), (None, 0))
        gV = cute.local_tile(cute.domain_offset((bos, 0, 0), tma_tensor_v)[None, None, hv], (C, WG_ROWS * wgs),
                             (None, z))
        tQs, tQg = cpasync.tma_partition(tma_q, 0, cute.make_layout(1), cute.group_modes(sQs, 0, 2),
                                         cute.group_modes(gQ, 0, 2))
        tKs, tKg = cpasync.tma_partition(tma_k, 0, cute.make_layout(1), cute.group_modes(sKs, 0, 2),
                                         cute.group_modes(gK, 0, 2))
        tVs, tVg = cpasync.tma_partition(tma_v, 0, cute.make_layout(1), cute.group_modes(sVs, 0, 2),
                                         cute.group_modes(gV, 0, 2))
        io_bytes = self.io_dtype.width // 8
        nbytes = (2 * C * K + tiles * C * C) * io_bytes + NUM_FACTORS * C * 4
        if cutlass.const_expr(not outputs):
            nbytes = (C * K + C * C) * io_bytes + NUM_FACTORS * C * 4  # k, T, f
        v_bytes = 0
        if load_v:
            v_bytes = C * WG_ROWS * wgs * io_bytes
        for c in cutlass.range(num_chunks, unroll=1):
            stage = c % stages
            ws_row = ws_row0 + c
            if c >= stages:
                cute.arch.mbarrier_wait(empty + stage, (c // stages - 1) % 2)
            if overlap != 0:
                if lane == 0:
                    wait_flag(flag_ptr(mWsFlag, ws_row, hv))
                cute.arch.sync_warp()
                # T, P, W~ and f were written by another kernel's generic stores: order them before this
                # warp's async-proxy (TMA) reads.
                cute.arch.fence_proxy("async.global")
            if lane == 0:
                cute.arch.mbarrier_arrive_and_expect_tx(full + stage, nbytes + v_bytes)
            if cutlass.const_expr(outputs):
                cute.copy(tma_q, tQg[None, c], tQs[None, stage], tma_bar_ptr=full + stage)
            cute.copy(tma_k, tKg[None, c], tKs[None, stage], tma_bar_ptr=full + stage)
            if load_v:
                cute.copy(tma_v, tVg[None, c], tVs[None, stage], tma_bar_ptr=full + stage)
            for which in cutlass.range_constexpr(tiles if outputs else 1):  # (T is tile 0)
                s_tile, g_tile = tma_tile(tma_tp, sTPs[None, None, tiles * stage + which],
                                          tma_tensor_tp[None, None, which, hv, ws_row])
                cute.copy(tma_tp, g_tile, s_tile, tma_bar_ptr=full + stage)
            s_tile, g_tile = tma_tile(tma_f, sF_tma[None, None, stage], tma_tensor_f[None, None, hv, ws_row])
            cute.copy(tma_f, g_tile, s_tile, tma_bar_ptr=full + stage)

    @cute.jit
    def mark(self, prof, phase: cutlass.Constexpr, stamp):
        """profile builds: add the time since `stamp` to prof[phase]; returns the new stamp."""
        if cutlass.const_expr(self.profile):
            now = cute.arch.globaltimer()
            prof[phase] = prof[phase] + (now - stamp)
            stamp = now
        return stamp

    @cute.jit
    def load_state(self, acc_S, cS, mState, mCp, has_init, slot, n, hv, v0, identity, cp: cutlass.Constexpr):
        """The warpgroup's 64 rows from v0 of the chain's start (see chain_kernel for the cp passes)."""
        if cutlass.const_expr(cp == CP_PIECES):
            if n > 0:
                read_rows(acc_S, cS, mCp[n, hv, None, None], v0)
            else:
                self.load_state(acc_S, cS, mState, mCp, has_init, slot, n, hv, v0, identity, CP_OFF)
        elif cutlass.const_expr(cp == CP_MAP):
            if identity:
                r0 = v0 - self.V
                for i in cutlass.range_constexpr(cute.size(acc_S)):
                    r, col = cS[i]
                    one = Float32(0.0)
                    if r0 + r == col:
                        one = Float32(1.0)
                    acc_S[i] = one
            elif n > 0:
                acc_S.fill(0.0)
            else:
                self.load_state(acc_S, cS, mState, mCp, has_init, slot, n, hv, v0, identity, CP_OFF)
        else:
            if has_init != 0:
                read_rows(acc_S, cS, mState[cutlass.Int64(slot), hv, None, None], v0)
            else:
                acc_S.fill(0.0)

    @cute.jit
    def store_state(self, acc_S, cS, mState, mCp, slot, n, hv, v0, identity, last_piece, cp: cutlass.Constexpr):
        """The warpgroup's 64 rows from v0 of the chain's end to where its pass keeps them."""
        if cutlass.const_expr(cp == CP_MAP):
            if identity:
                write_rows(acc_S, cS, mCp[n, hv, None, None], v0)  # M's rows, mCp[n, :, V:]
            else:
                write_rows(acc_S, cS, mCp[n + 1, hv, None, None], v0)  # B, piece n + 1's start if n == 0
        elif cutlass.const_expr(cp == CP_PIECES):
            if last_piece:
                write_rows(acc_S, cS, mState[cutlass.Int64(slot), hv, None, None], v0)
        else:
            write_rows(acc_S, cS, mState[cutlass.Int64(slot), hv, None, None], v0)

    @cute.jit
    def zero_output(self, mO, bos, eos, hv, c0, wgs: cutlass.Constexpr, tidx):
        for t in cutlass.range(bos + tidx // (WG_ROWS * wgs), eos, 2, unroll=1):
            mO[0, t, hv, c0 + tidx % (WG_ROWS * wgs)] = Float32(0.0).to(mO.element_type)

    @cute.jit
    def state_chain(self, mma_rs, mma_state, acc_S, sQ, sK, sV, sT, sP, sO, sF, wg, wgs: cutlass.Constexpr, tidx,
                    outputs: cutlass.Constexpr = True):
        """One chunk of the warpgroup's 64 state rows; leaves its output [t, v] in sO (its o tile). Without
        outputs (CP_MAP) only the state's products: S K^T, X T^T and the update."""
        C = CHUNK
        io = self.io_dtype
        wg_tidx = tidx % 128
        thr = mma_rs.get_slice(wg_tidx)
        cVT = thr.partition_C(cute.make_identity_tensor((WG_ROWS, C)))
        # S (fp32 accumulator) as the 16-bit register A operand.
        rS = cute.make_rmem_tensor(acc_to_a_layout(acc_S.layout), io)
        cute.make_tensor(rS.iterator, acc_S.layout).store(acc_S.load().to(io))

        acc_SK = cute.make_rmem_tensor(thr.partition_shape_C((WG_ROWS, C)), Float32)
        acc_O = cute.make_rmem_tensor(thr.partition_shape_C((WG_ROWS, C)), Float32)
        # SK, then O1 (its own group: X needs only SK).
        gemm_issue(mma_rs, acc_SK, rS, mma_rs.make_fragment_B(thr.partition_B(sK)))
        warpgroup.commit_group()
        if cutlass.const_expr(outputs):
            gemm_issue(mma_rs, acc_O, rS, mma_rs.make_fragment_B(thr.partition_B(sQ)))
            warpgroup.commit_group()
        # v^T [v, t] of the warpgroup's columns, into X's registers (ldmatrix, transposed).
        rX = cute.make_rmem_tensor(acc_to_a_layout(acc_SK.layout), io)
        rX_acc = cute.make_tensor(rX.iterator, acc_SK.layout)
        load_fragment(mma_rs, transpose_view(cute.local_tile(sV, (C, WG_ROWS), (0, wg))), rX_acc, wg_tidx,
                      transpose=True)
        warpgroup.wait_group(1 if outputs else 0)

        # X[v, t] = v_t[v] - f0_t SK[v, t]
        for i in cutlass.range_constexpr(cute.size(acc_SK)):
            r, t = cVT[i]
            rX_acc[i] = (rX_acc[i].to(Float32) - sF[0, t] * acc_SK[i]).to(io)
        if cutlass.const_expr(outputs):
            if wg_tidx < 32:
                cute.arch.cp_async_bulk_wait_group(0, read=True)  # the last chunk's TMA store has read sO
            cute.arch.barrier(barrier_id=BAR_WG + wg, number_of_threads=128)  # so sO is free
        # U[v, n] = sum_s X[v, s] T[n, s]
        acc_U = cute.make_rmem_tensor(thr.partition_shape_C((WG_ROWS, C)), Float32)
        gemm_issue(mma_rs, acc_U, rX, mma_rs.make_fragment_B(thr.partition_B(sT)))
        warpgroup.commit_group()
        # While U runs: O1 (complete once only U is pending) scaled by f1_t, S decayed by f3.
        if cutlass.const_expr(outputs):
            warpgroup.wait_group(1)
            for i in cutlass.range_constexpr(cute.size(acc_O)):
                r, t = cVT[i]
                acc_O[i] = acc_O[i] * sF[1, t]
        decay = sF[3, 0]
        for i in cutlass.range_constexpr(cute.size(acc_S)):
            acc_S[i] = acc_S[i] * decay
        warpgroup.wait_group(0)
        # S += (U f2_s) K first (the next chunk waits for it), then O += U P^T.
        rU = self.issue_state_update(mma_state, acc_S, acc_U, sK, sF, cVT, wg_tidx, want_u=outputs)
        if cutlass.const_expr(outputs):
            gemm_issue(mma_rs, acc_O, rU, mma_rs.make_fragment_B(thr.partition_B(sP)), accumulate=True)
        warpgroup.commit_group()
        warpgroup.wait_group(0)
        if cutlass.const_expr(outputs):
            # O [t, v] into the warpgroup's o tile (free since the barrier after X).
            store_fragment_io(mma_rs, acc_O, transpose_view(sO), wg_tidx)


    @cute.jit
    def state_chain_folded(self, mma_rs, mma_state, acc_S, sQ, sK, sV, sT, sP, sW0, sW1, sO, sF, tidx):
        """One chunk of a folded chain (one warpgroup, 64 state rows) with X's state term folded into
        the aux kernel's W~ = -T diag(f0) K ([n, k], two column halves sW0, sW1):
          U = V^T T^T + S W~^T
        two products, one of them on the state, where state_chain has S K^T, X and X T^T in a row. The
        rest is state_chain's."""
        C = CHUNK
        io = self.io_dtype
        wg_tidx = tidx % 128
        thr = mma_rs.get_slice(wg_tidx)
        cVT = thr.partition_C(cute.make_identity_tensor((WG_ROWS, C)))
        acc_U = cute.make_rmem_tensor(thr.partition_shape_C((WG_ROWS, C)), Float32)
        acc_O = cute.make_rmem_tensor(thr.partition_shape_C((WG_ROWS, C)), Float32)
        # S (fp32 accumulator) as the 16-bit register A operand, and v^T [v, t] (ldmatrix, transposed).
        # (Converting S while a wgmma runs makes ptxas wait for it: it cannot tell acc_S is not its.)
        rS = cute.make_rmem_tensor(acc_to_a_layout(acc_S.layout), io)
        cute.make_tensor(rS.iterator, acc_S.layout).store(acc_S.load().to(io))
        rV = cute.make_rmem_tensor(acc_to_a_layout(acc_U.layout), io)
        load_fragment(mma_rs, transpose_view(sV), cute.make_tensor(rV.iterator, acc_U.layout), wg_tidx,
                      transpose=True)
        gemm_issue(mma_rs, acc_U, rV, mma_rs.make_fragment_B(thr.partition_B(sT)))
        tW = [mma_rs.make_fragment_B(thr.partition_B(sW)) for sW in (sW0, sW1)]
        kbs = cute.size(tW[0], mode=[2])
        for kb in cutlass.range_constexpr(2 * kbs):
            cute.gemm(mma_rs, acc_U, rS[None, None, kb], tW[kb // kbs][None, None, kb % kbs], acc_U)
        warpgroup.commit_group()
        gemm_issue(mma_rs, acc_O, rS, mma_rs.make_fragment_B(thr.partition_B(sQ)))
        warpgroup.commit_group()
        if tidx < 32:
            cute.arch.cp_async_bulk_wait_group(0, read=True)  # the last chunk's TMA store has read sO
        cute.arch.barrier(barrier_id=BAR_WG, number_of_threads=128)  # so sO is free
        warpgroup.wait_group(1)
        decay = sF[3, 0]
        for i in cutlass.range_constexpr(cute.size(acc_S)):
            acc_S[i] = acc_S[i] * decay
        # S = f3 S + (U f2_s) K first (the next chunk waits for it), then O = f1_t O1 + U P^T.
        rU = self.issue_state_update(mma_state, acc_S, acc_U, sK, sF, cVT, wg_tidx, commit=True)
        warpgroup.wait_group(1)  # O1 (the state update may still run)
        for i in cutlass.range_constexpr(cute.size(acc_O)):
            r, t = cVT[i]
            acc_O[i] = acc_O[i] * sF[1, t]
        gemm_issue(mma_rs, acc_O, rU, mma_rs.make_fragment_B(thr.partition_B(sP)), accumulate=True)
        warpgroup.commit_group()
        warpgroup.wait_group(0)
        store_fragment_io(mma_rs, acc_O, transpose_view(sO), wg_tidx)


    @cute.jit
    def issue_state_update(self, mma_state, acc_S, acc_U, sK, sF, cVT, wg_tidx, commit: cutlass.Constexpr = False,
                           want_u: cutlass.Constexpr = True):
        """Issue S += (U f2_s) K (acc_S already decayed by f3) for the warpgroup, committed as its own
        wgmma group if `commit`; returns U as the 16-bit register A operand of O += U P^T (if want_u)."""
        io = self.io_dtype
        rUd = cute.make_rmem_tensor(acc_to_a_layout(acc_U.layout), io)
        rUd_acc = cute.make_tensor(rUd.iterator, acc_U.layout)
        for i in cutlass.range_constexpr(cute.size(acc_U)):
            r, s = cVT[i]
            rUd_acc[i] = (acc_U[i] * sF[2, s]).to(io)
        thr_s = mma_state.get_slice(wg_tidx)
        gemm_issue(mma_state, acc_S, rUd, mma_state.make_fragment_B(thr_s.partition_B(transpose_view(sK))),
                   accumulate=True)
        if cutlass.const_expr(commit):
            warpgroup.commit_group()
        rU = None
        if cutlass.const_expr(want_u):
            rU = cute.make_rmem_tensor(acc_to_a_layout(acc_U.layout), io)
            cute.make_tensor(rU.iterator, acc_U.layout).store(acc_U.load().to(io))
        return rU


# ================================ shared pieces ================================

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


@cute.jit
def flag_ptr(mWsFlag, row, hv):
    """The address of mWsFlag[row, hv] (a compact [rows, HV] int32 tensor)."""
    return mWsFlag.iterator + row * mWsFlag.shape[1] + hv


@cute.jit
def wait_flag(ptr):
    """Spin (acquire, GPU scope) until the int32 at `ptr` is non-zero."""
    flag = cute.arch.load(ptr, Int32, sem="acquire", scope="gpu")
    while flag == 0:
        flag = cute.arch.load(ptr, Int32, sem="acquire", scope="gpu")


@cute.jit
def load_rows(io: cutlass.Constexpr, width: cutlass.Constexpr, threads: cutlass.Constexpr, mX, sX, tok0, eos, head,
              col0, tidx):
    """cp.async of rows tok0 .. tok0 + CHUNK, columns col0 .. col0 + width of mX[0, :, head, :] (16-byte
    vectors) into the swizzled tile sX [CHUNK, width] by `threads` threads; rows at or past eos are
    zero-filled."""
    vecs_per_row = width // 8
    atom = cute.make_copy_atom(cute.nvgpu.cpasync.CopyG2SOp(cute.nvgpu.cpasync.LoadCacheMode.GLOBAL), io,
                               num_bits_per_copy=128)
    for i in cutlass.range_constexpr(CHUNK * vecs_per_row // threads):
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


@cute.jit
def store_rows(sX, gX, rows, tidx, threads: cutlass.Constexpr):
    """Rows r < rows of the [CHUNK, W] 16-bit shared tile sX (plain or swizzled: local_tile follows the
    swizzle) into gX[r, 0:W] (rows 16-byte aligned), 16 bytes per copy, by `threads` threads."""
    vecs_per_row = cute.size(sX, mode=[1]) // 8
    for i in cutlass.range_constexpr(CHUNK * vecs_per_row // threads):
        e = tidx + i * threads
        r = e // vecs_per_row
        j = e % vecs_per_row
        if r < rows:
            frag = cute.make_rmem_tensor(cute.make_layout(8), sX.element_type)
            cute.autovec_copy(cute.local_tile(sX, (1, 8), (r, j))[0, None], frag)
            dst = gX[r, None]
            cute.autovec_copy(frag, cute.make_tensor((dst.iterator + j * 8).align(16), cute.make_layout(8)))


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
      p = 1 .. pieces - 2, then a chain launch with cp = CP_PIECES (all pieces, with their outputs).
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
