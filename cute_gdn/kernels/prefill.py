"""Chunked varlen prefill of the gated delta rule on Hopper tensor cores (sm_90a). Stage 1.

One CTA per (sequence n, value head h) walks the sequence in chunks of C = 64 tokens; the state
S = state[state_indices[n], h] ([V, K] fp32) stays in the registers of two warpgroups, each owning
64 of its V rows, for the whole sequence. Per chunk, with G_t the cumulative log-decay inside the
chunk (G_t = g_0 + ... + g_t), gamma_t = exp(G_t) and k, q L2-normalized (q scaled):

  aux (CUDA cores + wgmma SS, shared by both warpgroups)
    A[t, s]  = beta_t (k_t . k_s) exp(G_t - G_s)          s < t            (wgmma K K^T)
    P[t, s]  = (q_t . k_s) exp(G_t - G_s)                  s <= t           (wgmma Q K^T)
    T[n, s]  = ((I + A)^-1)[n, s] beta_s                  forward substitution, fp32
  state chain (per warpgroup, "V-major": M = the warpgroup's 64 rows of S; wgmma RS, the A operand
  converted from the previous accumulator in registers)
    SK = S K^T,  O1 = S Q^T                               [v, t]
    X  = V^T - gamma_t SK                                  [v, t]   (X = the delta-rule residual
    U  = X T^T                                             [v, n]    before the triangular solve)
    O  = gamma_t O1 + U P^T                                -> o[t, v]
    S  = exp(G_last) S + (U * exp(G_last - G_s)) K          [v, k]
which is reference.chunk_gated_delta_rule transposed (U here is that function's `residual`).

Tokens past the end of a sequence in its last chunk are read as zeros with g = 0 and beta = 0, which
makes them exact no-ops (see the reference). Padding (state_indices[n] < 0) writes zero output
rows and touches no state. A zero-length sequence writes back its initial state.

Supported: K = V = 128 (the shape that must be fast); other head dims are rejected by can_implement.
"""

from typing import Optional

import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Float32, Int32
from cutlass.cute.nvgpu import OperandMajorMode, warpgroup
from cutlass.tensor_utils import LayoutEnum

from .common.dtypes import cutlass_dtype
from .common.gates import gate_log_decay_beta
from .common.problem import check_problem

CHUNK = 64
THREADS = 256  # two warpgroups
SUPPORTED_HEAD_DIM = 128


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
        # profile=True (benchmarks only): thread 0 of each CTA sums the wall time (%globaltimer, ns) of
        # the chunk phases into mProfile[cta, phase]: 0 wait for loads, 1 prep, 2 aux products,
        # 3 inverse, 4 state chain, 5 output store.
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
        scale: Float32,
        mProfile: Optional[cute.Tensor],  # [HV * N, 8] int64 (profile builds), else None
        stream,
    ):
        C, K, V = CHUNK, self.K, self.V
        io = self.io_dtype
        # Shared-memory tiles: token-major, the contiguous dim swizzled for wgmma.
        # q, k, v are double-buffered: chunk c + 1 is in flight (cp.async) while chunk c is computed.
        sQK_layout = sm90_utils.make_smem_layout_a(LayoutEnum.ROW_MAJOR, (C, 0, K), io, 2)      # (C, K, 2)
        sV_layout = sm90_utils.make_smem_layout_a(LayoutEnum.ROW_MAJOR, (C, 0, V), io, 2)       # (C, V, 2)
        sCC_layout = sm90_utils.make_smem_layout_a(LayoutEnum.ROW_MAJOR, (C, 0, C), io, 1)      # (C, C, 1)

        @cute.struct
        class SharedStorage:
            sQ: cute.struct.Align[cute.struct.MemRange[io, cute.cosize(sQK_layout)], 1024]
            sK: cute.struct.Align[cute.struct.MemRange[io, cute.cosize(sQK_layout)], 1024]
            sV: cute.struct.Align[cute.struct.MemRange[io, cute.cosize(sV_layout)], 1024]
            sT: cute.struct.Align[cute.struct.MemRange[io, cute.cosize(sCC_layout)], 1024]
            sP: cute.struct.Align[cute.struct.MemRange[io, cute.cosize(sCC_layout)], 1024]
            sA: cute.struct.Align[cute.struct.MemRange[Float32, C * (C + 4)], 16]
            sG: cute.struct.Align[cute.struct.MemRange[Float32, C], 16]
            sBeta: cute.struct.Align[cute.struct.MemRange[Float32, C], 16]

        self.shared_storage = SharedStorage
        # wgmma tilings (one warpgroup each): SS products of the aux path, RS products of the state chain.
        mma_ss = sm90_utils.make_trivial_tiled_mma(io, io, OperandMajorMode.K, OperandMajorMode.K, Float32,
                                                   (1, 1, 1), (C, C))
        mma_rs = sm90_utils.make_trivial_tiled_mma(io, io, OperandMajorMode.K, OperandMajorMode.K, Float32,
                                                   (1, 1, 1), (64, C), warpgroup.OperandSource.RMEM)
        mma_state = sm90_utils.make_trivial_tiled_mma(io, io, OperandMajorMode.K, OperandMajorMode.MN, Float32,
                                                      (1, 1, 1), (64, K), warpgroup.OperandSource.RMEM)
        num_seqs = mIndices.shape[0]
        self.kernel(mQ, mK, mV, mGateA, mGateB, mALog, mDtBias, mCuSeqlens, mState, mIndices, mHasInit, mO, scale,
                    mProfile, mma_ss, mma_rs, mma_state, sQK_layout, sV_layout, sCC_layout).launch(
            grid=(self.num_v_heads, num_seqs, 1), block=(THREADS, 1, 1), stream=stream)

    @cute.kernel
    def kernel(
        self,
        mQ: cute.Tensor,
        mK: cute.Tensor,
        mV: cute.Tensor,
        mGateA: cute.Tensor,
        mGateB: cute.Tensor,
        mALog: Optional[cute.Tensor],
        mDtBias: Optional[cute.Tensor],
        mCuSeqlens: cute.Tensor,
        mState: cute.Tensor,
        mIndices: cute.Tensor,
        mHasInit: cute.Tensor,
        mO: cute.Tensor,
        scale: Float32,
        mProfile: Optional[cute.Tensor],
        mma_ss: cute.TiledMma,
        mma_rs: cute.TiledMma,
        mma_state: cute.TiledMma,
        sQK_layout: cute.ComposedLayout,
        sV_layout: cute.ComposedLayout,
        sCC_layout: cute.ComposedLayout,
    ):
        C, K = CHUNK, self.K
        tidx, _, _ = cute.arch.thread_idx()
        hv, n, _ = cute.arch.block_idx()
        wg = tidx // 128
        wg_tidx = tidx % 128
        hk = hv // (self.num_v_heads // self.num_heads)
        bos = mCuSeqlens[n]
        eos = mCuSeqlens[n + 1]
        slot = mIndices[n]

        storage = cutlass.memory.SmemAllocator().allocate(self.shared_storage)
        sQs = storage.sQ.get_tensor(sQK_layout.outer, swizzle=sQK_layout.inner)
        sKs = storage.sK.get_tensor(sQK_layout.outer, swizzle=sQK_layout.inner)
        sVs = storage.sV.get_tensor(sV_layout.outer, swizzle=sV_layout.inner)
        sT = storage.sT.get_tensor(sCC_layout.outer, swizzle=sCC_layout.inner)[None, None, 0]
        sP = storage.sP.get_tensor(sCC_layout.outer, swizzle=sCC_layout.inner)[None, None, 0]
        sA = storage.sA.get_tensor(cute.make_layout((C, C), stride=(C + 4, 1)))
        sG = storage.sG.get_tensor(cute.make_layout(C))
        sBeta = storage.sBeta.get_tensor(cute.make_layout(C))

        # The warpgroup's 64 rows of S, [64, K] fp32 accumulator of mma_state.
        thr_state = mma_state.get_slice(wg_tidx)
        acc_S = cute.make_rmem_tensor(thr_state.partition_shape_C((64, K)), Float32)
        cS = thr_state.partition_C(cute.make_identity_tensor((64, K)))
        v0 = wg * 64

        if slot >= 0:
            self.load_state(acc_S, cS, mState, mHasInit, slot, n, hv, v0)
            num_chunks = (eos - bos + C - 1) // C
            a_log = None
            dt_bias = None
            if cutlass.const_expr(self.gate_mode == "raw"):
                a_log = mALog[hv]
                dt_bias = mDtBias[hv]
            # Prologue: chunk 0's q, k, v by cp.async, its raw gates into registers.
            self.issue_chunk_loads(mQ, mK, mV, sQs, sKs, sVs, bos, eos, 0, hk, hv, tidx)
            cute.arch.cp_async_commit_group()
            gate_a, gate_b = self.load_raw_gates(mGateA, mGateB, bos, eos, hv, tidx)
            prof = cute.make_rmem_tensor(cute.make_layout(6), cutlass.Int64)
            prof.fill(0)
            stamp = cute.arch.globaltimer()
            for c in cutlass.range(num_chunks, unroll=1):
                stage = c % 2
                tok0 = bos + c * C
                valid = eos - tok0
                if valid > C:
                    valid = C
                cute.arch.sync_threads()  # chunk c - 1 is done with every shared tile
                stamp = self.mark(prof, 5, stamp)
                if tidx < C:
                    g = Float32(0.0)
                    beta = Float32(0.0)
                    if tidx < valid:
                        g, beta = gate_log_decay_beta(self.gate_mode, gate_a, gate_b, a_log, dt_bias)
                    sG[tidx] = g
                    sBeta[tidx] = beta
                if c + 1 < num_chunks:
                    self.issue_chunk_loads(mQ, mK, mV, sQs, sKs, sVs, tok0 + C, eos, 1 - stage, hk, hv, tidx)
                    gate_a, gate_b = self.load_raw_gates(mGateA, mGateB, tok0 + C, eos, hv, tidx)
                cute.arch.cp_async_commit_group()
                cute.arch.cp_async_wait_group(1)  # chunk c has landed; chunk c + 1 may be in flight
                cute.arch.sync_threads()
                stamp = self.mark(prof, 0, stamp)
                sQ = sQs[None, None, stage]
                sK = sKs[None, None, stage]
                sV = sVs[None, None, stage]
                self.prepare_chunk(sQ, sK, sG, scale, tidx)
                cute.arch.fence_view_async_shared()
                cute.arch.sync_threads()
                stamp = self.mark(prof, 1, stamp)
                self.aux_products(mma_ss, sQ, sK, sA, sP, sG, sBeta, wg, wg_tidx)
                cute.arch.sync_threads()
                stamp = self.mark(prof, 2, stamp)
                self.invert(sA, sT, sBeta, tidx)
                cute.arch.fence_view_async_shared()
                cute.arch.sync_threads()
                stamp = self.mark(prof, 3, stamp)
                self.state_chain(mma_rs, mma_state, acc_S, sQ, sK, sV, sT, sP, sG, mO, tok0, valid, hv, v0,
                                 wg_tidx)
                cute.arch.sync_threads()
                stamp = self.mark(prof, 4, stamp)
                self.store_output(sV, mO, tok0, valid, hv, tidx)
            if cutlass.const_expr(self.profile):
                if tidx == 0:
                    cta = n * self.num_v_heads + hv
                    for i in cutlass.range_constexpr(6):
                        mProfile[cta, i] = prof[i]
                    mProfile[cta, 6] = cutlass.Int64(num_chunks)
            self.store_state(acc_S, cS, mState, slot, hv, v0)
        else:
            self.zero_output(mO, bos, eos, hv, tidx)

    @cute.jit
    def mark(self, prof, phase: cutlass.Constexpr, stamp):
        """profile builds: add the time since `stamp` to prof[phase]; returns the new stamp."""
        if cutlass.const_expr(self.profile):
            now = cute.arch.globaltimer()
            prof[phase] = prof[phase] + (now - stamp)
            stamp = now
        return stamp

    # ---- state I/O ----

    @cute.jit
    def load_state(self, acc_S, cS, mState, mHasInit, slot, n, hv, v0):
        gS = mState[cutlass.Int64(slot), hv, None, None]
        if mHasInit[n] != 0:
            for i in cutlass.range_constexpr(cute.size(acc_S)):
                r, col = cS[i]
                acc_S[i] = gS[v0 + r, col].to(Float32)
        else:
            acc_S.fill(0.0)

    @cute.jit
    def store_state(self, acc_S, cS, mState, slot, hv, v0):
        gS = mState[cutlass.Int64(slot), hv, None, None]
        for i in cutlass.range_constexpr(cute.size(acc_S)):
            r, col = cS[i]
            gS[v0 + r, col] = acc_S[i].to(gS.element_type)

    @cute.jit
    def zero_output(self, mO, bos, eos, hv, tidx):
        for t in cutlass.range(bos + tidx // 128, eos, 2, unroll=1):
            mO[0, t, hv, tidx % 128] = Float32(0.0).to(mO.element_type)

    # ---- per chunk ----

    @cute.jit
    def issue_chunk_loads(self, mQ, mK, mV, sQs, sKs, sVs, tok0, eos, stage, hk, hv, tidx):
        """cp.async of the chunk's q, k, v rows (16-byte vectors) into shared-memory stage `stage`;
        rows past the sequence end are zero-filled."""
        C, K = CHUNK, self.K
        vecs_per_row = K // 8
        valid = eos - tok0
        atom = cute.make_copy_atom(cute.nvgpu.cpasync.CopyG2SOp(cute.nvgpu.cpasync.LoadCacheMode.GLOBAL),
                                   self.io_dtype, num_bits_per_copy=128)
        dsts = (sQs[None, None, stage], sKs[None, None, stage], sVs[None, None, stage])
        for which in cutlass.range_constexpr(3):
            for i in cutlass.range_constexpr(C * vecs_per_row // THREADS):
                e = tidx + i * THREADS
                r = e // vecs_per_row
                j = e % vecs_per_row
                dst = cute.local_tile(dsts[which], (1, 8), (r, j))[0, None]
                if r < valid:
                    if cutlass.const_expr(which == 0):
                        src = mQ[0, tok0 + r, hk, None]
                    elif cutlass.const_expr(which == 1):
                        src = mK[0, tok0 + r, hk, None]
                    else:
                        src = mV[0, tok0 + r, hv, None]
                    cute.copy(atom, cute.make_tensor((src.iterator + j * 8).align(16), cute.make_layout(8)), dst)
                else:
                    dst.fill(0.0)

    @cute.jit
    def store_output(self, sO, mO, tok0, valid, hv, tidx):
        """The chunk's output rows t < valid from shared memory to o, 16 bytes per store."""
        vecs_per_row = self.V // 8
        for i in cutlass.range_constexpr(CHUNK * vecs_per_row // THREADS):
            e = tidx + i * THREADS
            r = e // vecs_per_row
            j = e % vecs_per_row
            if r < valid:
                frag = cute.make_rmem_tensor(cute.make_layout(8), sO.element_type)
                src = cute.local_tile(sO, (1, 8), (r, j))[0, None]
                for x in cutlass.range_constexpr(8):
                    frag[x] = src[x]
                dst = mO[0, tok0 + r, hv, None]
                cute.autovec_copy(frag, cute.make_tensor((dst.iterator + j * 8).align(16), cute.make_layout(8)))

    @cute.jit
    def load_raw_gates(self, mGateA, mGateB, tok0, eos, hv, tidx):
        """The raw gate inputs of token tok0 + tidx (threads < CHUNK; zeros past the end), as fp32."""
        gate_a = Float32(0.0)
        gate_b = Float32(0.0)
        if tidx < CHUNK:
            if tok0 + tidx < eos:
                gate_a = mGateA[0, tok0 + tidx, hv].to(Float32)
                gate_b = mGateB[0, tok0 + tidx, hv].to(Float32)
        return gate_a, gate_b

    @cute.jit
    def prepare_chunk(self, sQ, sK, sG, scale, tidx):
        """L2-normalize (optionally) and scale q, normalize k, in place; cumulative g (warp 0)."""
        K = self.K
        warp = tidx // 32
        lane = tidx % 32
        per_lane = K // 32
        dsts = (sQ, sK)
        for rr in cutlass.range_constexpr(CHUNK // 8):
            r = warp + 8 * rr
            for which in cutlass.range_constexpr(2):
                dst = dsts[which]
                x = cute.make_rmem_tensor(cute.make_layout(per_lane), Float32)
                ss = Float32(0.0)
                for i in cutlass.range_constexpr(per_lane):
                    x[i] = dst[r, lane + 32 * i].to(Float32)
                    ss += x[i] * x[i]
                factor = Float32(1.0)
                if cutlass.const_expr(self.use_qk_l2norm):
                    factor = cute.math.rsqrt(cute.arch.warp_reduction_sum(ss) + 1e-6)
                if cutlass.const_expr(which == 0):
                    factor = factor * scale
                for i in cutlass.range_constexpr(per_lane):
                    dst[r, lane + 32 * i] = (x[i] * factor).to(dst.element_type)
        if warp == 0:
            # Inclusive scan of g over the 64 tokens: two per lane.
            g0 = sG[2 * lane]
            g1 = sG[2 * lane + 1]
            pair = g0 + g1
            incl = pair
            for off in cutlass.range_constexpr(5):
                other = cute.arch.shuffle_sync_up(incl, 1 << off)
                if lane >= (1 << off):
                    incl = incl + other
            excl = incl - pair
            cute.arch.sync_warp()
            sG[2 * lane] = excl + g0
            sG[2 * lane + 1] = incl

    @cute.jit
    def aux_products(self, mma_ss, sQ, sK, sA, sP, sG, sBeta, wg, wg_tidx):
        """Warpgroup 0: A = beta_t (k_t . k_s) exp(G_t - G_s), s < t, fp32 into sA.
        Warpgroup 1: P = (q_t . k_s) exp(G_t - G_s), s <= t, into sP."""
        C = CHUNK
        thr = mma_ss.get_slice(wg_tidx)
        acc = cute.make_rmem_tensor(thr.partition_shape_C((C, C)), Float32)
        cC = thr.partition_C(cute.make_identity_tensor((C, C)))
        tB = mma_ss.make_fragment_B(thr.partition_B(sK))
        if wg == 0:
            tA = mma_ss.make_fragment_A(thr.partition_A(sK))
            self.gemm(mma_ss, acc, tA, tB)
            for i in cutlass.range_constexpr(cute.size(acc)):
                t, s = cC[i]
                val = Float32(0.0)
                if s < t:
                    val = sBeta[t] * acc[i] * cute.math.exp(sG[t] - sG[s])
                sA[t, s] = val
        else:
            tA = mma_ss.make_fragment_A(thr.partition_A(sQ))
            self.gemm(mma_ss, acc, tA, tB)
            for i in cutlass.range_constexpr(cute.size(acc)):
                t, s = cC[i]
                val = Float32(0.0)
                if s <= t:
                    val = acc[i] * cute.math.exp(sG[t] - sG[s])
                sP[t, s] = val.to(sP.element_type)

    @cute.jit
    def invert(self, sA, sT, sBeta, tidx):
        """T = (I + A)^-1 diag(beta) by forward substitution: thread c < 64 owns column c, and each
        row's dot product runs as four independent partial sums."""
        C = CHUNK
        if tidx < C:
            col = tidx
            m = cute.make_rmem_tensor(cute.make_layout(C), Float32)
            for i in cutlass.range_constexpr(C):
                part = cute.make_rmem_tensor(cute.make_layout(4), Float32)
                part.fill(0.0)
                for j in cutlass.range_constexpr(i):
                    part[j % 4] = part[j % 4] + sA[i, j] * m[j]
                acc = Float32(0.0)
                if col == i:
                    acc = Float32(1.0)
                m[i] = acc - ((part[0] + part[1]) + (part[2] + part[3]))
            beta = sBeta[col]
            for i in cutlass.range_constexpr(C):
                sT[i, col] = (m[i] * beta).to(sT.element_type)

    @cute.jit
    def state_chain(self, mma_rs, mma_state, acc_S, sQ, sK, sV, sT, sP, sG, mO, tok0, valid, hv, v0, wg_tidx):
        C = CHUNK
        thr = mma_rs.get_slice(wg_tidx)
        cVT = thr.partition_C(cute.make_identity_tensor((64, C)))
        # S (fp32 accumulator) as the bf16 register A operand.
        rS = cute.make_rmem_tensor(acc_to_a_layout(acc_S.layout), self.io_dtype)
        cute.make_tensor(rS.iterator, acc_S.layout).store(acc_S.load().to(self.io_dtype))

        acc_SK = cute.make_rmem_tensor(thr.partition_shape_C((64, C)), Float32)
        acc_O = cute.make_rmem_tensor(thr.partition_shape_C((64, C)), Float32)
        self.gemm(mma_rs, acc_SK, rS, mma_rs.make_fragment_B(thr.partition_B(sK)))
        self.gemm(mma_rs, acc_O, rS, mma_rs.make_fragment_B(thr.partition_B(sQ)))

        # X[v, t] = v_t[v] - gamma_t SK[v, t]
        rX = cute.make_rmem_tensor(acc_to_a_layout(acc_SK.layout), self.io_dtype)
        rX_acc = cute.make_tensor(rX.iterator, acc_SK.layout)
        for i in cutlass.range_constexpr(cute.size(acc_SK)):
            r, t = cVT[i]
            gamma = cute.math.exp(sG[t])
            rX_acc[i] = (sV[t, v0 + r].to(Float32) - gamma * acc_SK[i]).to(self.io_dtype)
            acc_O[i] = acc_O[i] * gamma
        # U[v, n] = sum_s X[v, s] T[n, s]
        acc_U = cute.make_rmem_tensor(thr.partition_shape_C((64, C)), Float32)
        self.gemm(mma_rs, acc_U, rX, mma_rs.make_fragment_B(thr.partition_B(sT)))
        # O += U P^T
        rU = cute.make_rmem_tensor(acc_to_a_layout(acc_U.layout), self.io_dtype)
        cute.make_tensor(rU.iterator, acc_U.layout).store(acc_U.load().to(self.io_dtype))
        self.gemm(mma_rs, acc_O, rU, mma_rs.make_fragment_B(thr.partition_B(sP)), accumulate=True)
        # O [t, v] into this stage's v tile (dead from here on), stored row-wise after a sync.
        for i in cutlass.range_constexpr(cute.size(acc_O)):
            r, t = cVT[i]
            sV[t, v0 + r] = acc_O[i].to(sV.element_type)
        # S = exp(G_last) S + (U exp(G_last - G_s)) K
        g_last = sG[C - 1]
        rUd = cute.make_rmem_tensor(acc_to_a_layout(acc_U.layout), self.io_dtype)
        rUd_acc = cute.make_tensor(rUd.iterator, acc_U.layout)
        for i in cutlass.range_constexpr(cute.size(acc_U)):
            r, s = cVT[i]
            rUd_acc[i] = (acc_U[i] * cute.math.exp(g_last - sG[s])).to(self.io_dtype)
        decay = cute.math.exp(g_last)
        for i in cutlass.range_constexpr(cute.size(acc_S)):
            acc_S[i] = acc_S[i] * decay
        thr_s = mma_state.get_slice(wg_tidx)
        self.gemm(mma_state, acc_S, rUd, mma_state.make_fragment_B(thr_s.partition_B(transpose_view(sK))),
                  accumulate=True)

    @cute.jit
    def gemm(self, tiled_mma: cute.TiledMma, acc, tA, tB, accumulate: cutlass.Constexpr = False):
        """acc (+)= A B^T over every k-block, issued and waited for by the calling warpgroup."""
        tiled_mma.set(warpgroup.Field.ACCUMULATE, accumulate)
        warpgroup.fence()
        for kb in cutlass.range_constexpr(cute.size(tA, mode=[2])):
            cute.gemm(tiled_mma, acc, tA[None, None, kb], tB[None, None, kb], acc)
            tiled_mma.set(warpgroup.Field.ACCUMULATE, True)
        warpgroup.commit_group()
        warpgroup.wait_group(0)


def compile_prefill(*, io_dtype: str, state_dtype: str, num_heads: int, num_v_heads: int, head_k_dim: int,
                    head_v_dim: int, pool_size: int, gate_mode: str, dt_bias_dtype: Optional[str],
                    use_qk_l2norm: bool, profile: bool = False):
    """Compile the prefill kernel for one key. Tensor-free: never touches a GPU.

    The returned tvm-ffi function takes (q, k, v, gate_a, gate_b, A_log, dt_bias, cu_seqlens, state,
    state_indices, has_initial_state (int8), o, scale, profile) where profile is None, or (profile
    builds, benchmarks only) an int64 [HV * N, 8] tensor that receives per-CTA phase times.
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
    op = GdnPrefillSm90(io_dtype=io_dtype, state_dtype=state_dtype, num_heads=H, num_v_heads=HV, head_k_dim=K,
                        head_v_dim=V, gate_mode=gate_mode, use_qk_l2norm=use_qk_l2norm, profile=profile)
    prof = cute.runtime.make_fake_compact_tensor(cutlass.Int64, (cute.sym_int(), 8)) if profile else None
    stream = cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True)
    return cute.compile(op, q, k, v, gate_a, gate_b, a_log, dt_bias, cu, state, indices, has_init, o,
                        Float32(1.0), prof, stream, options="--enable-tvm-ffi")
