"""Single-token gated delta rule decode on a K-last state pool (sm_90a).

Math, per sequence b and value head h (q/k head h // (HV // H)), fp32 throughout:
    g, beta = gates(b, h);  q, k = l2norm(q), l2norm(k) (optional);  q *= scale
    S  = exp(g) * S                  S = state[state_indices[b], h]: [V, K], K contiguous
    u  = beta * (v - S @ k)          [V]
    S += outer(u, k)
    o  = S @ q                       [V]
Rewritten for one pass over S: with sk = S_old @ k and sq = S_old @ q (both reductions along K),
    u = beta * (v - exp(g) * sk),  o = exp(g) * sq + u * (k . q),  S_new = exp(g) * S_old + outer(u, k).

Layouts: q, k [B, 1, H, K]; v, o [B, 1, HV, V]; gates [B, 1, HV]; state [pool_size, HV, V, K]
(fp32 or bf16); state_indices [B] int32, < 0 = padding (state untouched, o rows zero).
q/k/v/gates/o may be strided views (unit stride on the last dim).

Grid: (V / tile_rows, HV, B). A CTA owns `tile_rows` rows of one (sequence, head) state; see
common/rows.py for the thread map. Decode moves each state twice and does ~4 FLOP per element, so
it is a bandwidth problem: every thread issues all its 16-byte loads before the first use, and the
update happens in one pass over the state. The tile either lands in registers, or (smem_staging)
in the thread's own slice of shared memory through cp.async, so that the bytes in flight cost no
registers and more CTAs fit on an SM; rows are then updated one at a time from there. Each
variant is compiled with a small- and a large-batch tile (`DecodeConfig.heuristic`); the caller
picks one per call by B * HV (`LARGE_BATCH_HEADS`).
"""

from dataclasses import dataclass
from typing import Optional

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32

from .common.dtypes import cutlass_dtype
from .common.fake import fake_token_inputs
from .common.gates import gate_decay_beta
from .common.problem import check_problem, check_rowmap, state_vec
from .common.rows import (
    RowMap,
    columns_to_f32,
    dot_columns,
    load_columns,
    make_state_fragment,
    row_sum,
    state_tile_view,
)

# Hopper gives a CTA at most 227 KiB of shared memory; staying well under leaves room for 2+ CTAs.
MAX_STAGED_BYTES = 96 * 1024


# From this many (sequence, head) states on, the large-batch tile is used (per state dtype).
# Measured on an H200 (bench_decode.py --sweep, cold L2, graph replay, permuted slots): the 64-row
# tile staged through shared memory (16 lanes per row, 8 rows per thread, cp.async) reaches
# 89.9/94.1/94.8% of the copy bandwidth at B = 64/256/512 (HV = 32) with fp32 state against
# 88.4/93.4/94.1% for the best register tile, but loses at B = 16 (78.4 vs 79.6%) and B = 1
# (4.4 vs 3.5 us). With bf16 state it wins from 256 states on (HV = 16, B = 16: 7.15 vs 7.62 us;
# HV = 32, B = 16: 11.2 vs 12.0 us) and ties below (HV = 16, B = 4/8: 4.1/5.1 vs 4.0/5.1 us).
LARGE_BATCH_HEADS = {"float32": 1024, "bfloat16": 256}


@dataclass(frozen=True)
class DecodeConfig:
    threads_per_row: int = 8
    rows_per_pass: int = 16
    rows_per_thread: int = 2
    # Stage the state tile through shared memory with cp.async instead of loading it into
    # registers: the bytes in flight then cost no registers, so more CTAs fit on an SM.
    smem_staging: bool = False

    @classmethod
    def heuristic(cls, head_k_dim: int, head_v_dim: int, state_dtype: str,
                  large_batch: bool = False) -> "DecodeConfig":
        """The tile for B * HV below LARGE_BATCH_HEADS[state_dtype] (large_batch=False) or above.

        Small batches: 8 lanes x 16 B per row, 16 row groups (128 threads), 2 rows per thread,
        so HV = 32 at B = 1 still yields 64-128 CTAs; fp32 keeps the tile in registers (3.45 us at
        B = 1 vs 3.73 staged), bf16 stages it (3.40 vs 3.68). Large batches: 16 lanes per row,
        8 rows per thread, staged (see LARGE_BATCH_HEADS).
        """
        vec = state_vec(state_dtype)
        if large_batch and head_k_dim % (vec * 16) == 0 and head_v_dim % 64 == 0:
            return cls(threads_per_row=16, rows_per_pass=8, rows_per_thread=8, smem_staging=True)
        tpr = 8
        while tpr > 1 and head_k_dim % (vec * tpr) != 0:
            tpr //= 2
        rows_per_thread = 2
        while rows_per_thread > 1 and head_v_dim % (16 * rows_per_thread) != 0:
            rows_per_thread //= 2
        return cls(threads_per_row=tpr, rows_per_pass=16, rows_per_thread=rows_per_thread,
                   smem_staging=state_dtype == "bfloat16")

    def rowmap(self, head_k_dim: int, state_dtype: str) -> RowMap:
        return RowMap(head_k_dim, state_vec(state_dtype), self.threads_per_row, self.rows_per_pass, self.rows_per_thread)


def can_implement(
    io_dtype: str,
    state_dtype: str,
    num_heads: int,
    num_v_heads: int,
    head_k_dim: int,
    head_v_dim: int,
    gate_mode: str,
    dt_bias_dtype: Optional[str],
    config: DecodeConfig,
) -> Optional[str]:
    """None if the decode kernel supports this shape and dtype set, else the reason."""
    reason = check_problem(io_dtype, state_dtype, num_heads, num_v_heads, head_k_dim, head_v_dim, gate_mode,
                           dt_bias_dtype)
    if reason is not None:
        return reason
    rm = config.rowmap(head_k_dim, state_dtype)
    reason = check_rowmap(rm, head_v_dim)
    if reason is not None:
        return reason
    tile_bytes = rm.tile_rows * head_k_dim * (4 if state_dtype == "float32" else 2)
    if config.smem_staging and tile_bytes > MAX_STAGED_BYTES:
        return f"a staged tile of {tile_bytes} bytes exceeds {MAX_STAGED_BYTES} bytes of shared memory"
    return None


class GdnDecodeSm90:
    def __init__(
        self,
        *,
        io_dtype: str,
        state_dtype: str,
        num_heads: int,
        num_v_heads: int,
        head_k_dim: int,
        head_v_dim: int,
        gate_mode: str,
        use_qk_l2norm: bool,
        config: DecodeConfig,
    ):
        self.io_dtype = io_dtype
        self.state_dtype = state_dtype
        self.num_heads = num_heads
        self.num_v_heads = num_v_heads
        self.head_k_dim = head_k_dim
        self.head_v_dim = head_v_dim
        self.gate_mode = gate_mode
        self.use_qk_l2norm = use_qk_l2norm
        self.config = config
        self.rowmap = config.rowmap(head_k_dim, state_dtype)

    @cute.jit
    def __call__(
        self,
        mQ: cute.Tensor,        # [B, 1, H, K]
        mK: cute.Tensor,        # [B, 1, H, K]
        mV: cute.Tensor,        # [B, 1, HV, V]
        mGateA: cute.Tensor,    # [B, 1, HV]: a (raw) or g (precomputed)
        mGateB: cute.Tensor,    # [B, 1, HV]: b (raw) or beta (precomputed)
        mALog: Optional[cute.Tensor],    # [HV] fp32 (raw only)
        mDtBias: Optional[cute.Tensor],  # [HV] (raw only)
        mState: cute.Tensor,    # [pool_size, HV, V, K]
        mIndices: cute.Tensor,  # [B] int32
        mO: cute.Tensor,        # [B, 1, HV, V]
        scale: Float32,
        stream,
    ):
        batch = mIndices.shape[0]
        grid = (self.head_v_dim // self.rowmap.tile_rows, self.num_v_heads, batch)
        self.kernel(mQ, mK, mV, mGateA, mGateB, mALog, mDtBias, mState, mIndices, mO, scale).launch(
            grid=grid, block=(self.rowmap.threads, 1, 1), stream=stream
        )

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
        mState: cute.Tensor,
        mIndices: cute.Tensor,
        mO: cute.Tensor,
        scale: Float32,
    ):
        rm = self.rowmap
        tidx, _, _ = cute.arch.thread_idx()
        tile, hv, b = cute.arch.block_idx()
        lane = tidx % rm.threads_per_row
        row_group = tidx // rm.threads_per_row
        row0 = tile * rm.tile_rows
        hk = hv // (self.num_v_heads // self.num_heads)
        # Everything that does not depend on the slot is requested before the slot is known, and
        # the state loads go out before any math: a CTA waits for two memory latencies, not four.
        slot = mIndices[b]
        rK_raw = load_columns(rm, mK[b, 0, hk, None], lane)
        rQ_raw = load_columns(rm, mQ[b, 0, hk, None], lane)
        gate_a, gate_b, a_log, dt_bias = self.load_gates(mGateA, mGateB, mALog, mDtBias, b, 0, hv)
        rV = self.load_v_rows(mV[b, 0, hv, None], row0, row_group)
        if slot >= 0:
            tSgS = state_tile_view(rm, mState[cutlass.Int64(slot), hv, None, None], row0, row_group, lane)
            tS = self.load_state(tSgS, tidx)
            rK, rQ, kq = self.normalize_qk(rK_raw, rQ_raw, scale)
            decay, beta = gate_decay_beta(self.gate_mode, gate_a, gate_b, a_log, dt_bias)
            self.decay_and_update(tS, tSgS, rK, rQ, kq, decay, beta, rV, mO[b, 0, hv, None],
                                  row0, row_group, lane)
        else:
            self.store_zero_output(mO[b, 0, hv, None], row0, row_group, lane)

    @cute.jit
    def load_state(self, tSgS: cute.Tensor, tidx):
        """Issue the loads of this thread's state tile: into registers, or (smem_staging) by
        cp.async into shared memory. Returns the (rows_per_thread, vecs_per_thread, vec) tile."""
        if cutlass.const_expr(self.config.smem_staging):
            return self.stage_state(tSgS, tidx)
        else:
            rS = make_state_fragment(self.rowmap, tSgS.element_type)
            cute.autovec_copy(tSgS, rS)
            return rS

    @cute.jit
    def decay_and_update(self, tS: cute.Tensor, tSgS: cute.Tensor, rK, rQ, kq, decay, beta,
                         rV: cute.Tensor, gO: cute.Tensor, row0, row_group, lane):
        """The delta-rule update of every row of the loaded tile, stored back to the pool."""
        rm = self.rowmap
        if cutlass.const_expr(self.config.smem_staging):
            cute.arch.cp_async_wait_group(0)
            for r in cutlass.range_constexpr(rm.rows_per_thread):
                rRow = cute.make_rmem_tensor_like(tS[r, None, None])
                cute.autovec_copy(tS[r, None, None], rRow)
                self.decay_and_update_row(rRow, rK, rQ, kq, decay, beta, rV[r], gO,
                                          row0 + r * rm.rows_per_pass + row_group, lane)
                cute.autovec_copy(rRow, tSgS[r, None, None])
        else:
            for r in cutlass.range_constexpr(rm.rows_per_thread):
                self.decay_and_update_row(tS[r, None, None], rK, rQ, kq, decay, beta, rV[r], gO,
                                          row0 + r * rm.rows_per_pass + row_group, lane)
            cute.autovec_copy(tS, tSgS)

    @cute.jit
    def stage_state(self, tSgS: cute.Tensor, tidx):
        """Issue cp.async copies of this thread's state tile (rows_per_thread, vecs_per_thread, vec)
        into its own slice of shared memory; only this thread reads it back, so cp.async's own
        wait is the only synchronization. The thread index is the fastest 16-byte unit of the
        buffer, so a warp's vector reads hit consecutive addresses (no bank conflicts)."""
        rm = self.rowmap
        smem = cutlass.memory.SmemAllocator()
        sStage = smem.allocate_tensor(
            tSgS.element_type,
            cute.make_layout(
                (rm.threads, rm.rows_per_thread, rm.vecs_per_thread, rm.vec),
                stride=(rm.vec, rm.vecs_per_thread * rm.threads * rm.vec, rm.threads * rm.vec, 1),
            ),
            byte_alignment=16,
        )
        tSsS = sStage[tidx, None, None, None]
        # .cg: the state is read once, so it bypasses L1.
        atom = cute.make_copy_atom(cute.nvgpu.cpasync.CopyG2SOp(cute.nvgpu.cpasync.LoadCacheMode.GLOBAL),
                                   tSgS.element_type, num_bits_per_copy=128)
        vec_first = [2, 0, 1]  # cute.copy takes (vector, rest...)
        cute.copy(atom, cute.make_tensor(tSgS.iterator, cute.select(tSgS.layout, mode=vec_first)),
                  cute.make_tensor(tSsS.iterator, cute.select(tSsS.layout, mode=vec_first)))
        cute.arch.cp_async_commit_group()
        return tSsS

    @cute.jit
    def normalize_qk(self, rK_raw: cute.Tensor, rQ_raw: cute.Tensor, scale: Float32):
        """This thread's columns of (normalized) k and (normalized, scaled) q in fp32, and k . q."""
        rm = self.rowmap
        rK = columns_to_f32(rm, rK_raw)
        rQ = columns_to_f32(rm, rQ_raw)
        q_scale = scale
        if cutlass.const_expr(self.use_qk_l2norm):
            k_inv = cute.math.rsqrt(dot_columns(rm, rK, rK) + 1e-6)
            q_scale = scale * cute.math.rsqrt(dot_columns(rm, rQ, rQ) + 1e-6)
            for i in cutlass.range_constexpr(rm.cols_per_thread):
                rK[i] = rK[i] * k_inv
        for i in cutlass.range_constexpr(rm.cols_per_thread):
            rQ[i] = rQ[i] * q_scale
        return rK, rQ, dot_columns(rm, rK, rQ)

    @cute.jit
    def load_gates(self, mGateA, mGateB, mALog, mDtBias, b, t, hv):
        """The gate inputs of (b, t, hv) as loaded scalars; A_log and dt_bias are None for precomputed gates."""
        if cutlass.const_expr(self.gate_mode == "raw"):
            return mGateA[b, t, hv], mGateB[b, t, hv], mALog[hv], mDtBias[hv]
        else:
            return mGateA[b, t, hv], mGateB[b, t, hv], None, None

    @cute.jit
    def load_v_rows(self, gV: cute.Tensor, row0, row_group):
        """v at this thread's rows, (rows_per_thread,) in v's dtype."""
        rm = self.rowmap
        rV = cute.make_rmem_tensor((rm.rows_per_thread,), gV.element_type)
        for r in cutlass.range_constexpr(rm.rows_per_thread):
            rV[r] = gV[row0 + r * rm.rows_per_pass + row_group]
        return rV

    @cute.jit
    def decay_and_update_row(self, rRow: cute.Tensor, rK, rQ, kq, decay, beta, v, gO: cute.Tensor, row, lane):
        """One state row (vecs_per_thread, vec) of this thread: S @ k and S @ q, the delta-rule
        update in place, and o[row]."""
        rm = self.rowmap
        sk = Float32(0.0)
        sq = Float32(0.0)
        for j in cutlass.range_constexpr(rm.vecs_per_thread):
            for e in cutlass.range_constexpr(rm.vec):
                s = rRow[j, e].to(Float32)
                sk += s * rK[j * rm.vec + e]
                sq += s * rQ[j * rm.vec + e]
        sk = row_sum(rm, sk)
        sq = row_sum(rm, sq)
        u = beta * (v.to(Float32) - decay * sk)
        for j in cutlass.range_constexpr(rm.vecs_per_thread):
            for e in cutlass.range_constexpr(rm.vec):
                rRow[j, e] = (decay * rRow[j, e].to(Float32) + u * rK[j * rm.vec + e]).to(rRow.element_type)
        if lane == 0:
            gO[row] = (decay * sq + u * kq).to(gO.element_type)

    @cute.jit
    def store_zero_output(self, gO: cute.Tensor, row0, row_group, lane):
        rm = self.rowmap
        if lane == 0:
            for r in cutlass.range_constexpr(rm.rows_per_thread):
                gO[row0 + r * rm.rows_per_pass + row_group] = Float32(0.0).to(gO.element_type)


def compile_decode(
    *,
    io_dtype: str,
    state_dtype: str,
    num_heads: int,
    num_v_heads: int,
    head_k_dim: int,
    head_v_dim: int,
    pool_size: int,
    gate_mode: str,
    dt_bias_dtype: Optional[str],
    use_qk_l2norm: bool,
    config: DecodeConfig,
):
    """Compile the decode kernel for one key. Tensor-free: never touches a GPU.

    Run-time: B, scale, every pointer and stride but the pool's. The returned tvm-ffi function takes
    (q, k, v, gate_a, gate_b, A_log, dt_bias, state, state_indices, o, scale) and launches on the
    caller's current torch stream; A_log and dt_bias are None for precomputed gates.
    """
    reason = can_implement(io_dtype, state_dtype, num_heads, num_v_heads, head_k_dim, head_v_dim,
                           gate_mode, dt_bias_dtype, config)
    if reason is not None:
        raise ValueError(reason)
    H, HV, K, V = num_heads, num_v_heads, head_k_dim, head_v_dim
    batch = cute.sym_int()
    q, k, v, o, gate_a, gate_b, a_log, dt_bias = fake_token_inputs(
        io_dtype, H, HV, K, V, gate_mode, dt_bias_dtype, batch, 1)
    state = cute.runtime.make_fake_compact_tensor(
        cutlass_dtype(state_dtype), (pool_size, HV, V, K), stride_order=(3, 2, 1, 0), assumed_align=16
    )
    indices = cute.runtime.make_fake_compact_tensor(Int32, (batch,))
    op = GdnDecodeSm90(io_dtype=io_dtype, state_dtype=state_dtype, num_heads=H, num_v_heads=HV,
                       head_k_dim=K, head_v_dim=V, gate_mode=gate_mode, use_qk_l2norm=use_qk_l2norm,
                       config=config)
    stream = cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True)
    return cute.compile(op, q, k, v, gate_a, gate_b, a_log, dt_bias, state, indices, o, Float32(1.0),
                        stream, options="--enable-tvm-ffi")
