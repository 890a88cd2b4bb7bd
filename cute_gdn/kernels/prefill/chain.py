"""The chain kernel (see the package docstring): one CTA per sequence, value head and 64 or 128 value rows,
sequential over the chunks. `chain_kernel` splits the CTA into the producer (produce_chunks: every load, by
TMA, into the staged ring) and the math warpgroups (load_state, state_chain or state_chain_folded per chunk,
the outputs, store_state).
"""

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32
from cutlass.cute.nvgpu import cpasync, warpgroup

from ..common.barriers import ChainBarrier
from ..common.mma import (acc_to_a_layout, gemm_issue, load_fragment, store_fragment_io, tma_tile, transpose_view)
from ..common.tile_io import read_rows, store_rows, write_rows
from .config import CHAIN_FOLDED, CHUNK, CP_MAP, CP_OFF, CP_PIECES, WG_ROWS, chain_stages, chain_wgs
from .workspace import NUM_FACTORS, flag_ptr, wait_flag, ws_tiles
from .args import ChainArgs, ChainCopies, ChainLayouts, ChainMmas, ChainTiles, ChainWork


class ChainRoles:
    @cute.kernel
    def chain_kernel(self, args: ChainArgs, tma: ChainCopies, mmas: ChainMmas, layouts: ChainLayouts,
                     kind: cutlass.Constexpr, cp: cutlass.Constexpr):
        """CTA (hv, n, z): value rows z * 64 * wgs .. (z + 1) * 64 * wgs of sequence n's state, 64 per math
        warpgroup (warps 0 .. 4 wgs - 1), and a producer warp (warp 4 wgs; with two math warpgroups, the
        first warp of a producer warpgroup, for setmaxnreg) that loads every chunk's q, k,
        workspace tiles (T, P, and W~ when folded), v and f by TMA into chain_stages stages (produce_chunks):
        it waits for a stage's `empty` mbarrier (one arrival per math thread once its chunk is done with the
        stage) and, when overlapped, for the chunk's flag, then arms the stage's `full` mbarrier with the byte
        count. The math warpgroups (consume_chunks) wait on `full`; each synchronizes only within itself (named
        barrier ChainBarrier.WG + wg) and stores its own o tile, so a wide CTA's two warpgroups drift apart
        freely (they meet only at a sequence's partial last chunk, ChainBarrier.MATH). kind: CHAIN_WIDE has two
        math warpgroups, the others one; CHAIN_FOLDED runs state_chain_folded, the others state_chain;
        chain_stages(kind) stages.

        cp (context parallelism, narrow chains; n is a piece of the one sequence, whose slot and
        has_initial_state are the call's first): CP_MAP computes piece n's affine map S_end = S_start M + B
        with no output: CTAs z < V / 64 run the state's rows from piece 0's true start (other pieces from
        zeros) and write B into cp_ws[n + 1, :, :V] (for piece 0, the true start of piece 1); CTAs z >= V / 64
        run identity rows with v = 0 and write M's rows into cp_ws[n, :, V:] (not needed for piece 0).
        CP_PIECES runs every piece with its output from its start (piece 0 the pool's, piece n > 0
        cp_ws[n, :, :V]); only the last piece writes the pool."""
        K = self.K
        wgs = chain_wgs(kind)
        stages = chain_stages(kind)
        tidx, _, _ = cute.arch.thread_idx()
        hv, n, z = cute.arch.block_idx()
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        work = self.chain_work(args, tidx, hv, n, z, wgs, cp)

        storage = cutlass.memory.SmemAllocator().allocate(self.chain_storage[kind])
        tiles = ChainTiles(
            q=storage.sQ.get_tensor(layouts.qk.outer, swizzle=layouts.qk.inner),
            k=storage.sK.get_tensor(layouts.qk.outer, swizzle=layouts.qk.inner),
            v=storage.sV.get_tensor(layouts.v.outer, swizzle=layouts.v.inner),
            tp=storage.sTP.get_tensor(layouts.tp.outer, swizzle=layouts.tp.inner),
            o=storage.sO.get_tensor(layouts.o.outer, swizzle=layouts.o.inner),
            f=storage.sF.get_tensor(cute.make_layout((NUM_FACTORS, CHUNK, stages),
                                                     stride=(CHUNK, 1, NUM_FACTORS * CHUNK))),
            f_tma=storage.sF.get_tensor(cute.make_layout((CHUNK, NUM_FACTORS, stages),
                                                         stride=(1, CHUNK, NUM_FACTORS * CHUNK))))
        # The staged ring's mbarriers, written out rather than cutlass.pipeline.PipelineTmaAsync: the DSL's
        # pipeline (one release per math warp, the same protocol otherwise) measured 1.0% slower on the
        # context-parallel shapes and 0.2-0.6% on wide chains (bench/ab_prefill.py, H200: H8/HV16 32768x1
        # 492.8 vs 487.8 us, 8192x1 145.3 vs 143.8 us, H16/HV32 8192x8 167.3 vs 166.4 us; every other shape
        # within 0.2%). full[st]: one arrival (the producer's, with the stage's bytes) and the TMA bytes;
        # empty[st]: one arrival per math thread.
        full = storage.mbar.data_ptr()
        empty = full + stages
        if tidx == 0:
            for copy in tma:
                cpasync.prefetch_descriptor(copy.atom)
            for st in cutlass.range_constexpr(stages):
                cute.arch.mbarrier_init(full + st, 1)
                cute.arch.mbarrier_init(empty + st, 128 * wgs)
        cute.arch.mbarrier_init_fence()
        cute.arch.sync_threads()  # the last barrier of all the CTA's threads
        # (Made here, outside the role branches: a TiledMma used inside a branch whose helpers set its
        # ACCUMULATE field would be yielded out of the branch, which the IR verifier rejects.)
        thr_state = mmas.state.get_slice(tidx % 128)
        acc_S = cute.make_rmem_tensor(thr_state.partition_shape_C((WG_ROWS, K)), Float32)
        cS = thr_state.partition_C(cute.make_identity_tensor((WG_ROWS, K)))
        # With two math warpgroups the producer is a warpgroup (only its first warp works): three warps
        # share each SM sub-partition's 16K registers, so the math warps take 224 and the producers 56
        # (setmaxnreg, inside each role's branch so that ptxas sees each role's code apart).
        if warp >= 4 * wgs:
            if cutlass.const_expr(wgs == 2):
                cute.arch.warpgroup_reg_dealloc(56)
        if warp == 4 * wgs:
            if work.active:
                self.produce_chunks(tma, tiles, full, empty, args, work, kind, cp, tidx % 32)
        if warp < 4 * wgs:
            if cutlass.const_expr(wgs == 2):
                cute.arch.warpgroup_reg_alloc(224)
            gO = cute.local_tile(cute.domain_offset((work.bos, 0, 0), tma.o.tensor)[None, None, work.hv],
                                 (CHUNK, WG_ROWS), (None, None))
            if work.active:
                self.load_state(acc_S, cS, args, work, cp)
                if work.identity:
                    # v = 0: the producer loads none, so both stages of the v tile are zeros throughout.
                    sV_flat = storage.sV.get_tensor(cute.make_layout(cute.cosize(layouts.v)))
                    zeros = cute.make_rmem_tensor(cute.make_layout(8), self.io_dtype)
                    zeros.fill(0.0)
                    for i in cutlass.range_constexpr(cute.cosize(layouts.v) // 8 // 128):
                        cute.autovec_copy(zeros, cute.local_tile(sV_flat, (8,), (tidx + i * 128,)))
                    cute.arch.barrier(barrier_id=ChainBarrier.WG, number_of_threads=128)
                self.consume_chunks(args, tma.o.atom, gO, mmas, tiles, acc_S, full, empty, work, tidx, kind, cp)
                self.store_state(acc_S, cS, args, work, cp)
            if work.slot < 0:
                if cutlass.const_expr(cp != CP_MAP):
                    self.zero_output(args.o, work, wgs, tidx)

    def stage_bytes(self, kind: int, cp: int) -> int:
        """The bytes the TMA loads into one stage: q, k, the workspace tiles, v and f; without outputs
        (CP_MAP) k, T and f (a CTA that loads v adds its bytes)."""
        C, K = CHUNK, self.K
        io_bytes = self.io_dtype.width // 8
        if cp == CP_MAP:
            return (C * K + C * C) * io_bytes + NUM_FACTORS * C * 4
        return (2 * C * K + ws_tiles(kind) * C * C + C * WG_ROWS * chain_wgs(kind)) * io_bytes + NUM_FACTORS * C * 4

    @cute.jit
    def chain_work(self, args: ChainArgs, tidx, hv, n, z, wgs: cutlass.Constexpr, cp: cutlass.Constexpr) -> ChainWork:
        """CTA (hv, n, z)'s sequence (or piece), tokens, workspace rows, slot and role (see chain_kernel)."""
        C = CHUNK
        wg = tidx // 128
        hk = hv // (self.num_v_heads // self.num_heads)
        c0 = z * WG_ROWS * wgs
        v0 = c0 + wg * WG_ROWS
        last_piece = False
        if cutlass.const_expr(cp != CP_OFF):
            # Piece n of the one sequence: cp_step tokens from n * cp_step; the aux kernel ran on the whole
            # sequence, so its chunk j is workspace row j.
            bos = n * args.cp_step
            eos = bos + args.cp_step
            if eos > args.cu_seqlens[1]:
                eos = args.cu_seqlens[1]
            ws_row0 = bos // C
            last_piece = n == args.cp_ws.shape[0] - 1
        else:
            bos = args.cu_seqlens[n]
            eos = args.cu_seqlens[n + 1]
            ws_row0 = bos // C + n
        num_chunks = (eos - bos + C - 1) // C
        slot = args.indices[0]
        has_init = args.has_init[0]
        if cutlass.const_expr(cp == CP_OFF):
            slot = args.indices[n]
            has_init = args.has_init[n]
        # CP_MAP: CTAs z >= V / 64 run identity rows with v = 0 (none for piece 0, which needs no M).
        identity = False
        load_v = True
        if cutlass.const_expr(cp == CP_MAP):
            identity = z >= self.V // WG_ROWS
            load_v = z < self.V // WG_ROWS
            if identity and n == 0:
                slot = Int32(-1)  # idle
        active = slot >= 0
        return ChainWork(hv=hv, hk=hk, n=n, z=z, v0=v0, c0=c0, bos=bos, eos=eos, ws_row0=ws_row0,
                         num_chunks=num_chunks, slot=slot, has_init=has_init, identity=identity, load_v=load_v,
                         last_piece=last_piece, active=active)

    @cute.jit
    def consume_chunks(self, args: ChainArgs, tma_o: cute.CopyAtom, gO, mmas: ChainMmas, tiles: ChainTiles, acc_S,
                       full, empty, work: ChainWork, tidx, kind: cutlass.Constexpr, cp: cutlass.Constexpr):
        """The math warpgroups' loop over the chunks: wait for a stage, run the chunk on the state rows in
        acc_S (state_chain or state_chain_folded), release the stage, and (with outputs) store the o tile."""
        C = CHUNK
        wgs = chain_wgs(kind)
        stages = chain_stages(kind)
        ntiles = ws_tiles(kind)
        math_threads = 128 * wgs
        outputs = cp != CP_MAP  # (constexpr)
        wg = tidx // 128
        wg_tidx = tidx % 128
        bos, eos, hv, z = work.bos, work.eos, work.hv, work.z
        prof = cute.make_rmem_tensor(cute.make_layout(3), cutlass.Int64)
        prof.fill(0)
        stamp = cute.arch.globaltimer()
        for c in cutlass.range(work.num_chunks, unroll=1):
            stage = c % stages
            tok0 = bos + c * C
            valid = eos - tok0
            if valid > C:
                valid = C
            cute.arch.mbarrier_wait(full + stage, (c // stages) % 2)
            if valid < C:
                # k rows past the sequence end hold the next sequence's tokens (or TMA zeros). (The
                # one barrier of both math warpgroups: a sequence's last chunk.)
                self.zero_rows_from(tiles.k[None, None, stage], valid, tidx, math_threads)
                cute.arch.fence_view_async_shared()
                cute.arch.barrier(barrier_id=ChainBarrier.MATH, number_of_threads=math_threads)
            stamp = self.mark(prof, 0, stamp)
            if cutlass.const_expr(kind == CHAIN_FOLDED):
                self.state_chain_folded(mmas.rs, mmas.state, acc_S, tiles.q[None, None, stage],
                                        tiles.k[None, None, stage], tiles.v[None, None, stage],
                                        *(tiles.tp[None, None, ntiles * stage + i] for i in range(4)),
                                        tiles.o[None, None, 0], tiles.f[None, None, stage], tidx)
            else:
                self.state_chain(mmas.rs, mmas.state, acc_S, tiles.q[None, None, stage], tiles.k[None, None, stage],
                                 tiles.v[None, None, stage], tiles.tp[None, None, ntiles * stage],
                                 tiles.tp[None, None, ntiles * stage + 1], tiles.o[None, None, wg],
                                 tiles.f[None, None, stage], wg, wgs, tidx, outputs)
            cute.arch.mbarrier_arrive(empty + stage)  # this thread is done with the stage
            if cutlass.const_expr(outputs):
                cute.arch.fence_view_async_shared()  # the o tile's stores before a TMA store reads it
                cute.arch.barrier(barrier_id=ChainBarrier.WG + wg, number_of_threads=128)
                stamp = self.mark(prof, 1, stamp)
                # Each warpgroup stores its own o tile (its first warp issues the TMA store), so the
                # two warpgroups of a wide CTA never wait for each other inside a full chunk.
                if valid == C:
                    if wg_tidx < 32:
                        s_tile, g_tile = tma_tile(tma_o, tiles.o[None, None, wg], gO[None, None, c, z * wgs + wg])
                        cute.copy(tma_o, s_tile, g_tile)
                        cute.arch.cp_async_bulk_commit_group()
                else:
                    store_rows(tiles.o[None, None, wg], cute.domain_offset((tok0, work.v0), args.o[0, None, hv, None]),
                               valid, wg_tidx, 128)
                stamp = self.mark(prof, 2, stamp)
        if cutlass.const_expr(outputs):
            if wg_tidx < 32:
                cute.arch.cp_async_bulk_wait_group(0, read=True)
        if cutlass.const_expr(self.profile and cp == CP_OFF):
            if tidx == 0:
                cta = (work.n * self.num_v_heads + hv) * (self.V // (WG_ROWS * wgs)) + z
                for i in cutlass.range_constexpr(3):
                    args.profile[cta, i] = prof[i]
                args.profile[cta, 7] = cutlass.Int64(work.num_chunks)

    @cute.jit
    def zero_rows_from(self, sX, first, tidx, threads: cutlass.Constexpr):
        """Zero rows first .. CHUNK of the [CHUNK, K] shared tile sX (generic stores, by `threads` threads)."""
        K = self.K
        for i in cutlass.range_constexpr(CHUNK * K // threads):
            e = tidx + i * threads
            if e // K >= first:
                sX[e // K, e % K] = Float32(0.0).to(self.io_dtype)

    @cute.jit
    def produce_chunks(self, tma: ChainCopies, tiles: ChainTiles, full, empty, args: ChainArgs, work: ChainWork,
                       kind: cutlass.Constexpr, cp: cutlass.Constexpr, lane):
        """The chain's producer warp: every chunk's loads into stage c % stages, once the math warpgroups
        have released the stage (chunk c - stages) and, when overlapped, the aux kernel has flagged the chunk.
        Without outputs (CP_MAP) it loads no q and no P; without work.load_v, no v."""
        C, K = CHUNK, self.K
        wgs = chain_wgs(kind)
        stages = chain_stages(kind)
        ntiles = ws_tiles(kind)
        outputs = cp != CP_MAP  # (constexpr)
        bos, hv, hk = work.bos, work.hv, work.hk
        gQ = cute.local_tile(cute.domain_offset((bos, 0, 0), tma.q.tensor)[None, None, hk], (C, K), (None, 0))
        gK = cute.local_tile(cute.domain_offset((bos, 0, 0), tma.k.tensor)[None, None, hk], (C, K), (None, 0))
        gV = cute.local_tile(cute.domain_offset((bos, 0, 0), tma.v.tensor)[None, None, hv], (C, WG_ROWS * wgs),
                             (None, work.z))
        tQs, tQg = cpasync.tma_partition(tma.q.atom, 0, cute.make_layout(1), cute.group_modes(tiles.q, 0, 2),
                                         cute.group_modes(gQ, 0, 2))
        tKs, tKg = cpasync.tma_partition(tma.k.atom, 0, cute.make_layout(1), cute.group_modes(tiles.k, 0, 2),
                                         cute.group_modes(gK, 0, 2))
        tVs, tVg = cpasync.tma_partition(tma.v.atom, 0, cute.make_layout(1), cute.group_modes(tiles.v, 0, 2),
                                         cute.group_modes(gV, 0, 2))
        nbytes = self.stage_bytes(kind, cp)
        v_bytes = 0
        if cutlass.const_expr(not outputs):
            if work.load_v:
                v_bytes = C * WG_ROWS * wgs * (self.io_dtype.width // 8)
        for c in cutlass.range(work.num_chunks, unroll=1):
            stage = c % stages
            ws_row = work.ws_row0 + c
            if c >= stages:
                cute.arch.mbarrier_wait(empty + stage, (c // stages - 1) % 2)
            if args.overlap != 0:
                if lane == 0:
                    wait_flag(flag_ptr(args.ws_flag, ws_row, hv))
                cute.arch.sync_warp()
                # T, P, W~ and f were written by another kernel's generic stores: order them before this
                # warp's async-proxy (TMA) reads.
                cute.arch.fence_proxy("async.global")
            if lane == 0:
                cute.arch.mbarrier_arrive_and_expect_tx(full + stage, nbytes + v_bytes)
            if cutlass.const_expr(outputs):
                cute.copy(tma.q.atom, tQg[None, c], tQs[None, stage], tma_bar_ptr=full + stage)
            cute.copy(tma.k.atom, tKg[None, c], tKs[None, stage], tma_bar_ptr=full + stage)
            if work.load_v:
                cute.copy(tma.v.atom, tVg[None, c], tVs[None, stage], tma_bar_ptr=full + stage)
            for which in cutlass.range_constexpr(ntiles if outputs else 1):  # (T is tile 0)
                s_tile, g_tile = tma_tile(tma.tp.atom, tiles.tp[None, None, ntiles * stage + which],
                                          tma.tp.tensor[None, None, which, hv, ws_row])
                cute.copy(tma.tp.atom, g_tile, s_tile, tma_bar_ptr=full + stage)
            s_tile, g_tile = tma_tile(tma.f.atom, tiles.f_tma[None, None, stage], tma.f.tensor[None, None, hv, ws_row])
            cute.copy(tma.f.atom, g_tile, s_tile, tma_bar_ptr=full + stage)

    @cute.jit
    def mark(self, prof, phase: cutlass.Constexpr, stamp):
        """profile builds: add the time since `stamp` to prof[phase]; returns the new stamp."""
        if cutlass.const_expr(self.profile):
            now = cute.arch.globaltimer()
            prof[phase] = prof[phase] + (now - stamp)
            stamp = now
        return stamp

    @cute.jit
    def load_state(self, acc_S, cS, args: ChainArgs, work: ChainWork, cp: cutlass.Constexpr):
        """The warpgroup's 64 rows from work.v0 of the chain's start (see chain_kernel for the cp passes)."""
        v0 = work.v0
        if cutlass.const_expr(cp == CP_PIECES):
            if work.n > 0:
                read_rows(acc_S, cS, args.cp_ws[work.n, work.hv, None, None], v0)
            else:
                self.load_state(acc_S, cS, args, work, CP_OFF)
        elif cutlass.const_expr(cp == CP_MAP):
            if work.identity:
                r0 = v0 - self.V
                for i in cutlass.range_constexpr(cute.size(acc_S)):
                    r, col = cS[i]
                    one = Float32(0.0)
                    if r0 + r == col:
                        one = Float32(1.0)
                    acc_S[i] = one
            elif work.n > 0:
                acc_S.fill(0.0)
            else:
                self.load_state(acc_S, cS, args, work, CP_OFF)
        else:
            if work.has_init != 0:
                read_rows(acc_S, cS, args.state[cutlass.Int64(work.slot), work.hv, None, None], v0)
            else:
                acc_S.fill(0.0)

    @cute.jit
    def store_state(self, acc_S, cS, args: ChainArgs, work: ChainWork, cp: cutlass.Constexpr):
        """The warpgroup's 64 rows from work.v0 of the chain's end to where its pass keeps them."""
        n, hv, v0 = work.n, work.hv, work.v0
        if cutlass.const_expr(cp == CP_MAP):
            if work.identity:
                write_rows(acc_S, cS, args.cp_ws[n, hv, None, None], v0)  # M's rows, cp_ws[n, :, V:]
            else:
                write_rows(acc_S, cS, args.cp_ws[n + 1, hv, None, None], v0)  # B, piece n + 1's start if n == 0
        elif cutlass.const_expr(cp == CP_PIECES):
            if work.last_piece:
                write_rows(acc_S, cS, args.state[cutlass.Int64(work.slot), hv, None, None], v0)
        else:
            write_rows(acc_S, cS, args.state[cutlass.Int64(work.slot), hv, None, None], v0)

    @cute.jit
    def zero_output(self, mO, work: ChainWork, wgs: cutlass.Constexpr, tidx):
        """A padding sequence's o rows of this CTA: zeros."""
        for t in cutlass.range(work.bos + tidx // (WG_ROWS * wgs), work.eos, 2, unroll=1):
            mO[0, t, work.hv, work.c0 + tidx % (WG_ROWS * wgs)] = Float32(0.0).to(mO.element_type)

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
            cute.arch.barrier(barrier_id=ChainBarrier.WG + wg, number_of_threads=128)  # so sO is free
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
        cute.arch.barrier(barrier_id=ChainBarrier.WG, number_of_threads=128)  # so sO is free
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
