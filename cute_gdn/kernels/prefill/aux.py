"""The aux kernel (see the package docstring): one CTA per chunk and GVA pair of value heads. `aux_kernel`
loads the chunk, then its roles: row_norms (the L2-norm factors), invert_offdiagonal ((I + A)^-1 from the
diagonal-block inverse), w_products (W~ for a folded chain), and writes the workspace and the chunk's flag.
"""

import cutlass
import cutlass.cute as cute
from cutlass import Float16, Float32, Int32
from cutlass.cute.nvgpu import warpgroup

from ..common.gates import gate_log_decay_beta
from ..common.mma import (acc_to_a_layout, gemm, gemm_issue, store_fragment, transpose_view)
from ..common.tile_io import load_rows, store_rows
from .config import AUX_WG_THREADS, CHUNK
from .solve import BLOCK, LDB, LOG2E, exp2, inclusive_scan_64, solve_diagonal_blocks
from .workspace import flag_ptr
from .args import AuxArgs, AuxLayouts, AuxMmas, AuxTiles, AuxWork


class AuxRoles:
    @cute.kernel
    def aux_kernel(self, args: AuxArgs, mmas: AuxMmas, layouts: AuxLayouts, fold: cutlass.Constexpr):
        """CTA (x, row): workspace row `row` (a chunk of one sequence) for value heads x * pair .. (x + 1) *
        pair - 1, one warpgroup each (see the package docstring); fold: also W~ for a folded chain. Its roles:
        row_sequence, load_chunk, chunk_products (A and P), write_workspace (T, P, f, W~ and the flag)."""
        C = CHUNK
        pair = self.aux_heads
        tidx, _, _ = cute.arch.thread_idx()
        x, row, _ = cute.arch.block_idx()
        j = tidx // AUX_WG_THREADS   # this warpgroup's value head hv = x * pair + j
        wg_tidx = tidx % AUX_WG_THREADS
        hv0 = x * pair
        hv = hv0 + j
        hk = hv0 // (self.num_v_heads // self.num_heads)
        storage = cutlass.memory.SmemAllocator().allocate(self.aux_storage)
        sSeq = self.row_sequence(args, storage, row, tidx)
        n = sSeq[0]
        bos = sSeq[1]
        eos = sSeq[2]
        chunk = row - (bos // C + n)
        tok0 = bos + chunk * C
        if tok0 < eos and sSeq[3] >= 0:
            stamp = cute.arch.globaltimer()
            work = AuxWork(tidx=tidx, row=row, hv0=hv0, hv=hv, hk=hk, j=j, wg_tidx=wg_tidx, tok0=tok0, eos=eos)
            sP = cute.make_tensor((storage.sQK.data_ptr() + j * C * (C + 8)).align(16),
                                  cute.make_layout((C, C), stride=(C + 8, 1)))
            if cutlass.const_expr(fold):
                sP = storage.sQK.get_tensor(layouts.tile.outer, swizzle=layouts.tile.inner)[None, None, j]
            # P goes where q and k were once every warpgroup's products are done (rows padded to C + 8;
            # folded: swizzled tiles where q was, as k stays for W~), and T reuses P's tile once P is stored.
            tiles = AuxTiles(
                qk=storage.sQK.get_tensor(layouts.qk.outer, swizzle=layouts.qk.inner),
                a=storage.sA.get_tensor(cute.make_layout((C, BLOCK, pair), stride=(LDB, 1, C * LDB)))[None, None, j],
                aoff=storage.sAoff.get_tensor(layouts.inv.outer, swizzle=layouts.inv.inner)[None, None, j],
                d=storage.sD.get_tensor(layouts.inv.outer, swizzle=layouts.inv.inner)[None, None, j],
                p=sP,
                g=storage.sG.get_tensor(cute.make_layout((C, pair), stride=(1, C)))[None, j],
                beta=storage.sBeta.get_tensor(cute.make_layout((C, pair), stride=(1, C)))[None, j],
                bf0=storage.sBF0.get_tensor(cute.make_layout((C, pair), stride=(1, C)))[None, j],
                rk=storage.sRK.get_tensor(cute.make_layout(C)),
                rq=storage.sRQ.get_tensor(cute.make_layout(C)))
            stamp = self.load_chunk(args, tiles, work, stamp)
            stamp = self.chunk_products(args, mmas, tiles, storage, work, fold, stamp)
            self.write_workspace(args, mmas, layouts, tiles, storage, work, fold, stamp)

    @cute.jit
    def row_sequence(self, args: AuxArgs, storage, row, tidx):
        """The sequence n owning workspace row `row`: the last n with cu[n] // C + n <= row (a strictly
        increasing function of n), found by all threads at once in one round trip to global memory. Its
        thread leaves n, bos, eos and the slot in sSeq, which is returned after a CTA barrier."""
        C = CHUNK
        threads = AUX_WG_THREADS * self.aux_heads
        sSeq = storage.sSeq.get_tensor(cute.make_layout(4))
        num_seqs = args.indices.shape[0]
        for base in cutlass.range(0, num_seqs, threads, unroll=1):
            i = base + tidx
            if i < num_seqs:
                cu_i = args.cu_seqlens[i]
                cu_next = args.cu_seqlens[i + 1]
                slot_i = args.indices[i]
                if cu_i // C + i <= row:
                    if i + 1 == num_seqs or cu_next // C + i + 1 > row:
                        sSeq[0] = i
                        sSeq[1] = cu_i
                        sSeq[2] = cu_next
                        sSeq[3] = slot_i
        cute.arch.sync_threads()
        return sSeq

    @cute.jit
    def load_chunk(self, args: AuxArgs, tiles: AuxTiles, work: AuxWork, stamp):
        """The chunk's q and k rows (cp.async) into tiles.qk and its gates (log2 decay g, beta) into tiles.g
        and tiles.beta; ends with a CTA barrier once the rows have landed."""
        C = CHUNK
        threads = AUX_WG_THREADS * self.aux_heads
        tidx, row, hv0, hv, hk, j, wg_tidx, tok0, eos = work
        mQ, mK, mGateA, mGateB, mALog, mDtBias = args.q, args.k, args.gate_a, args.gate_b, args.a_log, args.dt_bias
        mProfile = args.profile
        sQK, sA, sAoff, sD, sP, sG, sBeta, sBF0, sRK, sRQ = tiles
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
        return stamp

    @cute.jit
    def chunk_products(self, args: AuxArgs, mmas: AuxMmas, tiles: AuxTiles, storage, work: AuxWork,
                       fold: cutlass.Constexpr, stamp):
        """K K^T and Q K^T (wgmma SS), the L2-norm factors and the g scan: A's diagonal blocks (fp32, tiles.a)
        and off-diagonal blocks (fp16, tiles.aoff), the factors f (to the workspace) and P (tiles.p)."""
        C = CHUNK
        threads = AUX_WG_THREADS * self.aux_heads
        tidx, row, hv0, hv, hk, j, wg_tidx, tok0, eos = work
        mWsF, scale, mProfile = args.ws_f, args.scale, args.profile
        sQK, sA, sAoff, sD, sP, sG, sBeta, sBF0, sRK, sRQ = tiles
        mma_ss = mmas.ss
        pair = self.aux_heads
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
        return stamp

    @cute.jit
    def write_workspace(self, args: AuxArgs, mmas: AuxMmas, layouts: AuxLayouts, tiles: AuxTiles, storage,
                        work: AuxWork, fold: cutlass.Constexpr, stamp):
        """The diagonal blocks' inverse, P and T = (I + A)^-1 diag(beta) to the workspace (and W~ for a folded
        chain), then the chunk's flags (release)."""
        C = CHUNK
        tidx, row, hv0, hv, hk, j, wg_tidx, tok0, eos = work
        mWsTP, mWsFlag, mProfile = args.ws_tp, args.ws_flag, args.profile
        sQK, sA, sAoff, sD, sP, sG, sBeta, sBF0, sRK, sRQ = tiles
        sTo = sP
        mma_inv_ss, mma_inv_rs, mma_w = mmas.inv_ss, mmas.inv_rs, mmas.w
        sTile_layout = layouts.tile
        pair = self.aux_heads
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
