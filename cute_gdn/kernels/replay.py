"""Replay speculative verify: outputs from a checkpoint and a ring of records, folds in place (sm_90a).

Protocol (cute_gdn/replay.py): the pool slot is the checkpoint S0; ring[slot] holds records of the
`count` committed tokens at positions start, ..., start + count - 1 (mod L): raw k and v (io dtype),
the delta u (fp32) and (g, beta) (fp32). For the T draft tokens of one (sequence, value head):

Output path (never materializes a state). Number the records j = 0 .. n + T - 1 (n committed ones,
then the T candidates), G_j = g_0 + ... + g_j. The gated delta rule gives
    S_j = exp(G_j) S0 + sum_{i <= j} exp(G_j - G_i) u_i k_i^T,
so for candidate m = n + t, with both products of S0 reduced along K once per row:
    S_{m-1} k_m * exp(g_m) = exp(G_m) (S0 k_m) + sum_{i < m}  exp(G_m - G_i) (k_i . k_m) u_i
    u_m = beta_m (v_m - that),     o_m = exp(G_m) (S0 q_m) + sum_{i <= m} exp(G_m - G_i) (k_i . q_m) u_i.
The checkpoint is read once; per element that is 2T multiply-adds, against 4T for the recurrence.
The head-level coefficients exp(G_m - G_i) (k_i . x_m) are formed once per CTA in shared memory; the
per-row work is n + T terms per token. u_m goes to the ring (d), with the candidate's raw k, v, g, beta.

Fold: a row whose committed count exceeds L - 2 * max_tokens rewrites its checkpoint from the committed
records in this launch (the threshold leaves room for this step's candidates and the next's, so a fold
never reads a position the same launch writes). fold_mode "exact": first, with verify's own arithmetic
(the same k, exp(g), row reduction and fixed-rounding update), then n = 0 for its outputs: bit-identical
to verify + commit (fp32, same tile). "compact": after its outputs (n = count), S0 -> exp(G_{c-1}) S0 +
sum_{j < c} exp(G_{c-1} - G_j) u_j k_j^T. `replay_cursor` moves the cursors after the accept (count += n, or after a
fold start += count, count = n) and empties them after a flush; the flush kernel (num_tokens = 0) folds
every named row with a non-empty ring, exactly.

Grid (V / tile_rows, HV, B) with a verify-style tile (`VerifyConfig`, `replay_tile`); a CTA owns tile_rows rows of one
(sequence, head). Padding: state_indices[b] < 0 reads and writes nothing but zero o rows.
"""

from typing import Optional

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Int64

from .common.dtypes import cutlass_dtype
from .common.exact import delta_u, fma_rn, update_row
from .common.fake import fake_token_inputs
from .common.gates import gate_log_decay_beta
from .common.problem import check_problem, check_rowmap
from .common.rows import columns_to_f32, load_columns, make_state_fragment, row_sum, state_tile_view
from .verify import MAX_TOKENS, GdnVerifySm90, VerifyConfig

MAX_RING_LEN = 64
# How a verify folds a full ring into the checkpoint: "exact" replays the recurrence (bit-identical to
# verify + commit in the same tile), "compact" adds the records' rank-one terms (one multiply-add per element
# per record; same state, other rounding). replay_flush always folds exactly.
FOLD_MODES = ("exact", "compact")


def fold_threshold(ring_len: int, max_tokens: int) -> int:
    """A row folds at the verify where its committed count exceeds this: then the candidates of this step
    and of the next still fit in the ring, so a fold never reads a position that the same launch writes."""
    return ring_len - 2 * max_tokens


def check_ring(ring_len: int, max_tokens: int) -> Optional[str]:
    """None if (ring_len, max_tokens) is supported, else the reason (shared by every replay check)."""
    if not 1 <= max_tokens <= MAX_TOKENS:
        return f"max_tokens must be in [1, {MAX_TOKENS}], got {max_tokens}"
    if not 2 * max_tokens <= ring_len <= MAX_RING_LEN:
        return f"ring_len must be in [2 * max_tokens = {2 * max_tokens}, {MAX_RING_LEN}], got {ring_len}"
    return None


# Tiles, measured on an H200 (one spec step = replay verify + cursor commit with random accepts 1..T and
# the folds they trigger; HV = 32, T = 4, L = 16, cold L2, graph replay; bench/sweep_replay.py). The step is
# bound by instruction latency and shared-memory traffic, not DRAM (ncu, fp32 compact fold, 2 x 64 x 1,
# B = 256: DRAM 44%, L1/shared 71%, 25% occupancy, short-scoreboard stalls first), so narrow rows (few
# lanes, few shuffle levels) and one row per thread win over verify's tiles.
# Exact fold: fp32 4 lanes x 32 rows x 1 (545 / 144 / 38.6 / 8.3 us at B = 256 / 64 / 16 / 1 before the
# ring reads went into one cp.async group, 479 / 127 / 35.5 / 7.5 after), against verify's small tile (8 x 16
# x 2) at 890 / 229 / 55.2 / 8.6; bf16 2 x 64 x 1 from 512 states on (398 us at B = 256 against 514 for
# 4 x 32 x 1), 4 x 32 x 1 below.
# Compact fold, large batch: 4 lanes x 64 rows x 2 rows per thread (a whole 128-row head per CTA, the
# coefficients built once per head, each candidate's q/k columns loaded once for two rows): fp32 / bf16 at
# B = 256 311 / 273 us, B = 64 (fp32) 89.9, against 2 x 64 x 1 at 359 / 295, 99.9; 4 x 32 x 2 351 / 280,
# 8 x 16 x 2 383 / 472, 8 x 32 x 2 419 / 460; 4 x 32 x 1 415 / 393. (First sweep, before the token-major row
# loop made 2 rows per thread spill-free: 2 x 128 x 1 tied 2 x 64 x 1, 4 x 64 x 1 and 4 x 128 x 1 lost.) Falls
# back to 2 x 64 x 1 where V is not a multiple of 128. Small batch 4 x 32 x 1 (B = 1: 7.7 / 7.2 us; 2 x 64 x 1
# 9.6 / 8.9, 4 x 64 x 2 9.4).
LARGE_BATCH_HEADS = {"float32": 256, "bfloat16": 512}


SMEM_LIMIT = 227 * 1024  # shared memory one CTA may take on sm_90


def smem_bytes(config: VerifyConfig, head_k_dim: int, state_dtype: str, io_bytes: int, num_tokens: int,
               ring_len: int) -> int:
    """Shared memory of one replay verify CTA (the allocations of GdnReplaySm90.kernel, each 16-byte aligned)."""
    rm = config.rowmap(head_k_dim, state_dtype)
    T, L, K, R = max(num_tokens, 1), ring_len, head_k_dim, rm.tile_rows
    warps = rm.threads // 32
    sizes = (2 * T * K * io_bytes, 2 * T * K * 4, T * R * 4, 4 * T * 4, T * 4,   # tokens
             L * K * io_bytes, ((L - 1) * (K + 4) + K) * 4, 4 * L * 4, L * R * 4, L * R * io_bytes,  # records
             L * 4, 2 * warps * 2 * T * L * 4, 2 * T * L * 4, T * 4, (L + 1) * 4)  # output path
    return sum((x + 15) // 16 * 16 for x in sizes)


def check_tile(config: VerifyConfig, head_k_dim: int, head_v_dim: int, state_dtype: str, io_bytes: int,
               num_tokens: int, ring_len: int) -> Optional[str]:
    """None if the tile maps the state, splits K over its warps, stages ring rows in 16-byte vectors and fits
    in shared memory; else the reason."""
    rm = config.rowmap(head_k_dim, state_dtype)
    reason = check_rowmap(rm, head_v_dim)
    if reason is not None:
        return reason
    if head_k_dim % (2 * (rm.threads // 32)) != 0:
        return f"head_k_dim {head_k_dim} does not split over the {rm.threads // 32} warps of the tile"
    if (rm.tile_rows * io_bytes) % 16 != 0:
        return f"a tile of {rm.tile_rows} rows is not a whole number of 16-byte vectors of ring values"
    need = smem_bytes(config, head_k_dim, state_dtype, io_bytes, num_tokens, ring_len)
    if need > SMEM_LIMIT:
        return (f"tile {config} needs {need} bytes of shared memory at T={num_tokens}, ring_len={ring_len} "
                f"(limit {SMEM_LIMIT})")
    return None


def replay_tile(head_k_dim: int, head_v_dim: int, state_dtype: str, large_batch: bool = False,
                fold_mode: str = "exact", *, num_tokens: int = 1, ring_len: int = 16,
                io_bytes: int = 2) -> VerifyConfig:
    """The measured tile (above) where the head dims and shared memory (num_tokens, ring_len) allow it, else
    the next one, else verify's heuristic tile."""
    if large_batch and fold_mode == "compact":
        prefs = (VerifyConfig(4, 64, 2), VerifyConfig(2, 64, 1), VerifyConfig(4, 32, 1))
    elif large_batch and state_dtype == "bfloat16":
        prefs = (VerifyConfig(2, 64, 1), VerifyConfig(4, 32, 1))
    else:
        prefs = (VerifyConfig(4, 32, 1),)
    for want in prefs:
        if check_tile(want, head_k_dim, head_v_dim, state_dtype, io_bytes, num_tokens, ring_len) is None:
            return want
    return VerifyConfig.heuristic(head_k_dim, head_v_dim, state_dtype, large_batch)


def can_implement(
    io_dtype: str,
    state_dtype: str,
    num_heads: int,
    num_v_heads: int,
    head_k_dim: int,
    head_v_dim: int,
    gate_mode: str,
    dt_bias_dtype: Optional[str],
    num_tokens: int,
    max_tokens: int,
    ring_len: int,
    config: VerifyConfig,
    fold_mode: str = "exact",
) -> Optional[str]:
    """None if the replay kernel supports this shape and dtype set, else the reason."""
    if fold_mode not in FOLD_MODES:
        return f"fold_mode must be one of {FOLD_MODES}, got {fold_mode!r}"
    reason = check_problem(io_dtype, state_dtype, num_heads, num_v_heads, head_k_dim, head_v_dim, gate_mode,
                           dt_bias_dtype)
    if reason is not None:
        return reason
    reason = check_ring(ring_len, max_tokens)
    if reason is not None:
        return reason
    if not 0 <= num_tokens <= max_tokens:
        return f"the number of tokens T must be in [0, max_tokens={max_tokens}], got {num_tokens}"
    return check_tile(config, head_k_dim, head_v_dim, state_dtype, 2, num_tokens, ring_len)


class GdnReplaySm90(GdnVerifySm90):
    """Replay verify (num_tokens >= 1) or flush (num_tokens = 0). Reuses verify's staging of q/k/v and
    its token normalization, so the fold sees exactly the k, exp(g) and beta that verify computes."""

    def __init__(self, *, num_tokens: int, max_tokens: int, ring_len: int, config: VerifyConfig,
                 fold_mode: str = "exact", **problem):
        super().__init__(num_tokens=max(num_tokens, 1), cache_steps=max_tokens, config=config, **problem)
        self.fold_mode = fold_mode
        self.num_tokens = num_tokens
        self.max_tokens = max_tokens
        self.ring_len = ring_len
        self.fold_at = fold_threshold(ring_len, max_tokens)

    # ------------------------------------------------------------------------------------------ verify

    @cute.jit
    def __call__(
        self,
        mQ: cute.Tensor,        # [B, T, H, K]
        mK: cute.Tensor,        # [B, T, H, K]
        mV: cute.Tensor,        # [B, T, HV, V]
        mGateA: cute.Tensor,    # [B, T, HV]: a (raw) or g (precomputed)
        mGateB: cute.Tensor,    # [B, T, HV]: b (raw) or beta (precomputed)
        mALog: Optional[cute.Tensor],    # [HV] fp32 (raw only)
        mDtBias: Optional[cute.Tensor],  # [HV] (raw only)
        mState: cute.Tensor,    # [pool_size, HV, V, K]: checkpoints (written by folds only)
        mIndices: cute.Tensor,  # [B] int32
        mRingK: cute.Tensor,    # [pool_size, H, L, K] io dtype
        mRingV: cute.Tensor,    # [pool_size, HV, L, V] io dtype
        mRingD: cute.Tensor,    # [pool_size, HV, L, V] fp32
        mRingGB: cute.Tensor,   # [pool_size, HV, L, 4] fp32 (g, beta, k scale, -)
        mCursor: cute.Tensor,   # [pool_size, 2] int32 (start, count), read only
        mO: cute.Tensor,        # [B, T, HV, V]
        scale: Float32,
        stream,
    ):
        batch = mIndices.shape[0]
        grid = (self.head_v_dim // self.rowmap.tile_rows, self.num_v_heads, batch)
        self.kernel(mQ, mK, mV, mGateA, mGateB, mALog, mDtBias, mState, mIndices, mRingK, mRingV, mRingD, mRingGB,
                    mCursor, mO, scale).launch(grid=grid, block=(self.rowmap.threads, 1, 1), stream=stream)

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
        mRingK: cute.Tensor,
        mRingV: cute.Tensor,
        mRingD: cute.Tensor,
        mRingGB: cute.Tensor,
        mCursor: cute.Tensor,
        mO: cute.Tensor,
        scale: Float32,
    ):
        rm = self.rowmap
        T = self.num_tokens
        L = self.ring_len
        K = self.head_k_dim
        tidx, _, _ = cute.arch.thread_idx()
        tile, hv, b = cute.arch.block_idx()
        lane = tidx % rm.threads_per_row
        row_group = tidx // rm.threads_per_row
        row0 = tile * rm.tile_rows
        hk = hv // (self.num_v_heads // self.num_heads)
        slot = mIndices[b]
        if slot >= 0:
            s64 = Int64(slot)
            start = mCursor[s64, 0]
            count = mCursor[s64, 1]
            tSgS = state_tile_view(rm, mState[s64, hv, None, None], row0, row_group, lane)
            rS_in = make_state_fragment(rm, tSgS.element_type)
            cute.autovec_copy(tSgS, rS_in)

            smem = cutlass.memory.SmemAllocator()
            io_dtype = mQ.element_type
            sRaw = smem.allocate_tensor(io_dtype, cute.make_layout((2, T, K), stride=(T * K, K, 1)),
                                        byte_alignment=16)
            sQK = smem.allocate_tensor(Float32, cute.make_layout((2, T, K), stride=(T * K, K, 1)),
                                       byte_alignment=16)
            sV = smem.allocate_tensor(Float32, cute.make_layout((T, rm.tile_rows), stride=(rm.tile_rows, 1)),
                                      byte_alignment=16)
            # Per candidate: exp(g), beta, k . q, g; and the factor that normalizes its k.
            sTok = smem.allocate_tensor(Float32, cute.make_layout((4, T), stride=(T, 1)), byte_alignment=16)
            sKScale = smem.allocate_tensor(Float32, cute.make_layout(T), byte_alignment=16)
            sRecRaw, sRecK, sRecG, sRecX, sRecV = self.allocate_records(smem, io_dtype)
            # The output path: G_j, per-warp partial dot products, the coefficients [k.k | k.q, t, j], exp(G_m);
            # the compact fold's weights.
            warps = rm.threads // 32
            sGam = smem.allocate_tensor(Float32, cute.make_layout(L), byte_alignment=16)
            sPart = smem.allocate_tensor(Float32, cute.make_layout((2 * warps, 2 * T, L), stride=(2 * T * L, L, 1)),
                                         byte_alignment=16)
            sC = smem.allocate_tensor(Float32, cute.make_layout((2, T, L), stride=(T * L, L, 1)), byte_alignment=16)
            sE = smem.allocate_tensor(Float32, cute.make_layout(T), byte_alignment=16)
            sW = smem.allocate_tensor(Float32, cute.make_layout(L + 1), byte_alignment=16)

            compact = self.fold_mode == "compact"
            fold = count > self.fold_at
            # Every global read is in flight before the first wait: the state (above), q/k and the records
            # (one cp.async group), v and the gates (register loads, issued before their stores).
            self.stage_qk(mQ, mK, sRaw, b, hk, tidx)
            if cutlass.const_expr(compact):
                self.stage_records(mRingK, mRingD, mRingGB, sRecRaw, sRecX, sRecG, s64, hk, hv, row0, start, count,
                                   tidx)
            else:
                if fold:
                    self.stage_records(mRingK, mRingV, mRingGB, sRecRaw, sRecV, sRecG, s64, hk, hv, row0, start,
                                       count, tidx)
                else:
                    self.stage_records(mRingK, mRingD, mRingGB, sRecRaw, sRecX, sRecG, s64, hk, hv, row0, start,
                                       count, tidx)
            cute.arch.cp_async_commit_group()
            self.stage_v_regs(mV, sV, b, hv, row0, tidx)
            if tidx < T:
                gate_a, gate_b, a_log, dt_bias = self.load_gates(mGateA, mGateB, mALog, mDtBias, b, tidx, hv)
                g, beta = gate_log_decay_beta(self.gate_mode, gate_a, gate_b, a_log, dt_bias)
                sTok[0, tidx] = cute.math.exp(g)
                sTok[1, tidx] = beta
                sTok[3, tidx] = g
                sRecG[0, count + tidx] = g
            cute.arch.cp_async_wait_group(0)
            cute.arch.sync_threads()
            # The candidates join the record list at positions count .. count + T - 1 (after the committed
            # ones, which a fold still reads): normalize_tokens writes their k there too, the gate threads
            # wrote their g. G_j of the output path's records (from `first`) in the same phase.
            first = Int32(0)  # the first record of the output path
            n_hist = count
            if cutlass.const_expr(not compact):
                if fold:
                    first = count
                    n_hist = Int32(0)
            self.normalize_tokens(sRaw, sQK, sTok, scale, tidx, sKScale, sRecK, count)
            self.scale_record_keys(sRecRaw, sRecK, sRecG, count, tidx)
            self.prefix_gates(sRecG, sGam, first, n_hist + T, tidx)
            cute.arch.sync_threads()
            self.write_candidates(mV, sRaw, sV, sTok, sKScale, mRingK, mRingV, mRingGB, s64, b, hv, row0, tile, start,
                                  count, tidx)

            rS = make_state_fragment(rm, Float32)
            rS.store(rS_in.load().to(Float32))
            if cutlass.const_expr(compact):
                # Outputs from the checkpoint and every committed record; a folding row then rewrites the
                # checkpoint from the records' u (compact_fold), after its outputs.
                self.output_coefficients(sQK, sRecK, sGam, sPart, sC, sE, sW, first, n_hist, tidx)
                cute.arch.sync_threads()
                self.candidate_rows(rS, sQK, sTok, sV, sRecX, sC, sE, count, mO, mRingD, s64, b, hv, row0,
                                    row_group, lane, start, count)
                if fold:
                    self.compact_fold(rS, sRecK, sRecX, sW, count, row_group, lane)
                    self.store_state(rS, tSgS)
            else:
                if fold:
                    self.fold_records(rS, sRecK, sRecG, sRecV, count, row_group, lane)
                    self.store_state(rS, tSgS)
                self.output_coefficients(sQK, sRecK, sGam, sPart, sC, sE, sW, first, n_hist, tidx)
                cute.arch.sync_threads()
                self.candidate_rows(rS, sQK, sTok, sV, sRecX, sC, sE, n_hist, mO, mRingD, s64, b, hv, row0,
                                    row_group, lane, start, count)
        else:
            for t in cutlass.range_constexpr(T):
                self.store_zero_output(mO[b, t, hv, None], row0, row_group, lane)

    # ------------------------------------------------------------------------------------------ flush

    @cute.jit
    def flush(
        self,
        mState: cute.Tensor,    # [pool_size, HV, V, K], folded in place
        mIndices: cute.Tensor,  # [B] int32
        mRingK: cute.Tensor,    # [pool_size, H, L, K]
        mRingV: cute.Tensor,    # [pool_size, HV, L, V]
        mRingGB: cute.Tensor,   # [pool_size, HV, L, 4]
        mCursor: cute.Tensor,   # [pool_size, 2] int32, read only (the cursor kernel empties it after)
        stream,
    ):
        batch = mIndices.shape[0]
        grid = (self.head_v_dim // self.rowmap.tile_rows, self.num_v_heads, batch)
        self.flush_kernel(mState, mIndices, mRingK, mRingV, mRingGB, mCursor).launch(
            grid=grid, block=(self.rowmap.threads, 1, 1), stream=stream)

    @cute.kernel
    def flush_kernel(self, mState: cute.Tensor, mIndices: cute.Tensor, mRingK: cute.Tensor, mRingV: cute.Tensor,
                     mRingGB: cute.Tensor, mCursor: cute.Tensor):
        rm = self.rowmap
        tidx, _, _ = cute.arch.thread_idx()
        tile, hv, b = cute.arch.block_idx()
        lane = tidx % rm.threads_per_row
        row_group = tidx // rm.threads_per_row
        row0 = tile * rm.tile_rows
        hk = hv // (self.num_v_heads // self.num_heads)
        slot = mIndices[b]
        if slot >= 0:
            s64 = Int64(slot)
            start = mCursor[s64, 0]
            count = mCursor[s64, 1]
            if count > 0:
                tSgS = state_tile_view(rm, mState[s64, hv, None, None], row0, row_group, lane)
                rS_in = make_state_fragment(rm, tSgS.element_type)
                cute.autovec_copy(tSgS, rS_in)
                smem = cutlass.memory.SmemAllocator()
                sRecRaw, sRecK, sRecG, sRecX, sRecV = self.allocate_records(smem, mRingK.element_type)
                self.stage_records(mRingK, mRingV, mRingGB, sRecRaw, sRecV, sRecG, s64, hk, hv, row0, start, count,
                                   tidx)
                cute.arch.cp_async_commit_group()
                cute.arch.cp_async_wait_group(0)
                cute.arch.sync_threads()
                self.scale_record_keys(sRecRaw, sRecK, sRecG, count, tidx)
                cute.arch.sync_threads()
                rS = make_state_fragment(rm, Float32)
                rS.store(rS_in.load().to(Float32))
                self.fold_records(rS, sRecK, sRecG, sRecV, count, row_group, lane)
                self.store_state(rS, tSgS)

    # ------------------------------------------------------------------------------------------ pieces

    @cute.jit
    def allocate_records(self, smem, io_dtype):
        """Shared memory for up to L records: raw k (io), normalized k (fp32; rows padded by 4 floats so the
        lanes of a warp reading different records hit different banks), (g, beta, k scale), and per tile
        row the output path's u (fp32) and the exact fold's raw v (io)."""
        rm = self.rowmap
        L = self.ring_len
        K = self.head_k_dim
        sRecRaw = smem.allocate_tensor(io_dtype, cute.make_layout((L, K), stride=(K, 1)), byte_alignment=16)
        sRecK = smem.allocate_tensor(Float32, cute.make_layout((L, K), stride=(K + 4, 1)), byte_alignment=16)
        # (g, beta, k scale, -) record-major: sRecG[f, rec] is float 4 * rec + f, one 16-byte vector a record.
        sRecG = smem.allocate_tensor(Float32, cute.make_layout((4, L), stride=(1, 4)), byte_alignment=16)
        sRecX = smem.allocate_tensor(Float32, cute.make_layout((L, rm.tile_rows), stride=(rm.tile_rows, 1)),
                                     byte_alignment=16)
        sRecV = smem.allocate_tensor(io_dtype, cute.make_layout((L, rm.tile_rows), stride=(rm.tile_rows, 1)),
                                     byte_alignment=16)
        return sRecRaw, sRecK, sRecG, sRecX, sRecV

    @cute.jit
    def stage_ring(self, gRing: cute.Tensor, sDst: cute.Tensor, col0, width: cutlass.Constexpr, start, count, tidx):
        """cp.async of columns [col0, col0 + width) of the `count` committed records of one ring row gRing
        [L, W] (record rec at position start + rec mod L) into sDst[rec, 0 : width]. 16-byte vectors: the
        ring is contiguous and 16-byte aligned (make_replay_ring), col0 and width are multiples of a vector."""
        L = self.ring_len
        threads = self.rowmap.threads
        vec = 16 // (gRing.element_type.width // 8)
        vecs = width // vec
        total = count * vecs
        atom = cute.make_copy_atom(cute.nvgpu.cpasync.CopyG2SOp(cute.nvgpu.cpasync.LoadCacheMode.GLOBAL),
                                   gRing.element_type, num_bits_per_copy=128)
        for i in cutlass.range_constexpr((L * vecs + threads - 1) // threads):
            vid = tidx + i * threads
            if vid < total:
                rec = vid // vecs
                col = (vid % vecs) * vec
                gVec = cute.make_tensor((gRing[(start + rec) % L, None].iterator + col0 + col).align(16),
                                        cute.make_layout(vec))
                sVec = cute.make_tensor((sDst[rec, None].iterator + col).align(16), cute.make_layout(vec))
                cute.copy(atom, gVec, sVec)

    @cute.jit
    def stage_records(self, mRingK: cute.Tensor, mRingRows: cute.Tensor, mRingGB: cute.Tensor, sRecRaw: cute.Tensor,
                      sRows: cute.Tensor, sRecG: cute.Tensor, s64, hk, hv, row0, start, count, tidx):
        """Every read of the committed records in one cp.async group: raw k, this tile's rows of u or raw v
        (mRingRows), and (g, beta, k scale, -). The caller waits once, with its other staging."""
        self.stage_ring(mRingK[s64, hk, None, None], sRecRaw, 0, self.head_k_dim, start, count, tidx)
        self.stage_ring(mRingRows[s64, hv, None, None], sRows, row0, self.rowmap.tile_rows, start, count, tidx)
        self.stage_ring(mRingGB[s64, hv, None, None], cute.make_tensor(sRecG.iterator, cute.make_layout(
            (self.ring_len, 4), stride=(4, 1))), 0, 4, start, count, tidx)

    @cute.jit
    def stage_v_regs(self, mV: cute.Tensor, sV: cute.Tensor, b, hv, row0, tidx):
        """v[b, :, hv, tile rows] in fp32 into sV [T, tile_rows]: every load issued before the first store
        (v need not be 16-byte aligned, so no cp.async), so the CTA waits for one round trip, not one each."""
        rm = self.rowmap
        total = self.num_tokens * rm.tile_rows
        n = (total + rm.threads - 1) // rm.threads
        rVal = cute.make_rmem_tensor((n,), mV.element_type)
        for i in cutlass.range_constexpr(n):
            e = tidx + i * rm.threads
            if e < total:
                rVal[i] = mV[b, e // rm.tile_rows, hv, row0 + e % rm.tile_rows]
        for i in cutlass.range_constexpr(n):
            e = tidx + i * rm.threads
            if e < total:
                sV[e // rm.tile_rows, e % rm.tile_rows] = rVal[i].to(Float32)

    @cute.jit
    def scale_record_keys(self, sRecRaw: cute.Tensor, sRecK: cute.Tensor, sRecG: cute.Tensor, count, tidx):
        """k of each committed record in fp32: raw k times its stored normalizing factor, the same product
        normalize_tokens formed for verify's tokens (so the fold sees the same k, bit for bit)."""
        threads = self.rowmap.threads
        K = self.head_k_dim
        for i in cutlass.range_constexpr((self.ring_len * K + threads - 1) // threads):
            e = tidx + i * threads
            if e < count * K:
                rec = e // K
                c = e - rec * K
                sRecK[rec, c] = sRecRaw[rec, c].to(Float32) * sRecG[2, rec]

    @cute.jit
    def write_candidates(self, mV: cute.Tensor, sRaw: cute.Tensor, sV: cute.Tensor, sTok: cute.Tensor,
                         sKScale: cute.Tensor,
                         mRingK: cute.Tensor, mRingV: cute.Tensor, mRingGB: cute.Tensor, s64, b, hv, row0, tile,
                         start, count, tidx):
        """The candidates' raw k (one CTA per q/k head), raw v (each CTA its rows, from sV: io -> fp32 -> io
        is exact) and (g, beta, k scale) (one CTA per value head) to ring positions start + count + t. The
        fold reads only committed ones."""
        rm = self.rowmap
        T = self.num_tokens
        K = self.head_k_dim
        L = self.ring_len
        group = self.num_v_heads // self.num_heads
        if tile == 0:
            if tidx < T:
                pos = (start + count + tidx) % L
                mRingGB[s64, hv, pos, 0] = sTok[3, tidx]
                mRingGB[s64, hv, pos, 1] = sTok[1, tidx]
                mRingGB[s64, hv, pos, 2] = sKScale[tidx]
            if hv % group == 0:
                hk = hv // group
                for i in cutlass.range_constexpr((T * K + rm.threads - 1) // rm.threads):
                    e = tidx + i * rm.threads
                    if e < T * K:
                        t = e // K
                        c = e % K
                        mRingK[s64, hk, (start + count + t) % L, c] = sRaw[1, t, c]
        for i in cutlass.range_constexpr((T * rm.tile_rows + rm.threads - 1) // rm.threads):
            e = tidx + i * rm.threads
            if e < T * rm.tile_rows:
                t = e // rm.tile_rows
                r = e % rm.tile_rows
                mRingV[s64, hv, (start + count + t) % L, row0 + r] = sV[t, r].to(mRingV.element_type)

    @cute.jit
    def fold_row(self, rRow: cute.Tensor, rK, decay, beta, v):
        """verify's decay_and_update_row without its output: the same S @ k, u and update, with the
        same fixed roundings (common/exact.py)."""
        rm = self.rowmap
        sk = Float32(0.0)
        for j in cutlass.range_constexpr(rm.vecs_per_thread):
            for e in cutlass.range_constexpr(rm.vec):
                sk = fma_rn(rRow[j, e].to(Float32), rK[j * rm.vec + e], sk)
        sk = row_sum(rm, sk)
        u = delta_u(decay, beta, v.to(Float32), sk)
        update_row(rm, rRow, rK, decay, u)

    @cute.jit
    def fold_records(self, rS: cute.Tensor, sRecK: cute.Tensor, sRecG: cute.Tensor, sRecV: cute.Tensor, count,
                     row_group, lane):
        """The committed records, in order, into the fp32 state tile rS."""
        rm = self.rowmap
        for rec in cutlass.range(count):
            rK = columns_to_f32(rm, load_columns(rm, sRecK[rec, None], lane))
            decay = cute.math.exp(sRecG[0, rec])
            beta = sRecG[1, rec]
            for r in cutlass.range_constexpr(rm.rows_per_thread):
                row = r * rm.rows_per_pass + row_group
                self.fold_row(rS[r, None, None], rK, decay, beta, sRecV[rec, row])

    @cute.jit
    def compact_fold(self, rS: cute.Tensor, sRecK: cute.Tensor, sRecX: cute.Tensor, sW: cute.Tensor, count, row_group,
                     lane):
        """fold="compact": S0 -> exp(G_{c-1}) S0 + sum_j exp(G_{c-1} - G_j) u_j k_j^T over the c = count
        committed records (sW[j] = exp(G_{c-1} - G_j), sW[L] = exp(G_{c-1}); u_j in sRecX): one multiply-add per element per
        record, no row reduction, every element independent. Mathematically the state the recurrence gives;
        rounded differently (not bit-equal to verify + commit)."""
        rm = self.rowmap
        L = self.ring_len
        e_c = sW[L]
        for r in cutlass.range_constexpr(rm.rows_per_thread):
            for j in cutlass.range_constexpr(rm.vecs_per_thread):
                for e in cutlass.range_constexpr(rm.vec):
                    rS[r, j, e] = rS[r, j, e] * e_c
        for rec in cutlass.range(count):
            rK = load_columns(rm, sRecK[rec, None], lane)
            for r in cutlass.range_constexpr(rm.rows_per_thread):
                w = sW[rec] * sRecX[rec, r * rm.rows_per_pass + row_group]
                for j in cutlass.range_constexpr(rm.vecs_per_thread):
                    for e in cutlass.range_constexpr(rm.vec):
                        rS[r, j, e] = fma_rn(w, rK[j, e], rS[r, j, e])

    @cute.jit
    def store_state(self, rS: cute.Tensor, tSgS: cute.Tensor):
        if cutlass.const_expr(tSgS.element_type == Float32):
            cute.autovec_copy(rS, tSgS)
        else:
            rC = make_state_fragment(self.rowmap, tSgS.element_type)
            rC.store(rS.load().to(tSgS.element_type))
            cute.autovec_copy(rC, tSgS)

    @cute.jit
    def prefix_gates(self, sRecG: cute.Tensor, sGam: cute.Tensor, first, n_rec, tidx):
        """sGam[j] = G_j = g_first + ... + g_(first + j) over the output path's n_rec records. Unrolled, so the
        loads are in flight together (a loop of dependent loads would be L round trips)."""
        L = self.ring_len
        threads = self.rowmap.threads
        for i in cutlass.range_constexpr((L + threads - 1) // threads):
            j = tidx + i * threads
            if j < n_rec:
                acc = Float32(0.0)
                for jj in cutlass.range_constexpr(L):
                    if jj <= j:
                        acc += sRecG[0, first + jj]
                sGam[j] = acc

    @cute.jit
    def output_coefficients(self, sQK: cute.Tensor, sRecK: cute.Tensor, sGam: cute.Tensor, sPart: cute.Tensor,
                            sC: cute.Tensor, sE: cute.Tensor, sW: cute.Tensor, first, n_hist, tidx):
        """With G_j in sGam (prefix_gates): sC[0, t, j] = exp(G_m - G_j) (k_j . k_m) for j < m and
        sC[1, t, j] = exp(G_m - G_j) (k_j . q_m) for j <= m (m = n_hist + t), sE[t] = exp(G_m), and for
        fold="compact" the fold's weights
        sW[j] = exp(G_{c-1} - G_j) (j < c = n_hist), sW[L] = exp(G_{c-1}). The dot products are a small GEMM
        [records, K] x [K, 2T]: warp w takes a slice of K, lane j a record (the 2T candidate vectors are
        broadcast reads), and the per-warp partials are summed through shared memory."""
        rm = self.rowmap
        T = self.num_tokens
        L = self.ring_len
        K = self.head_k_dim
        warps = rm.threads // 32
        cols = K // warps
        warp = tidx // 32
        lane = tidx % 32
        n_rec = n_hist + T
        # Lane j % 16 takes record j, the two half-warps split the warp's columns; 4 columns per
        # shared-memory vector load where the slice allows it.
        half = lane // 16
        half_cols = cols // 2
        vec = 4 if half_cols % 4 == 0 else 1
        for i in cutlass.range_constexpr((L + 15) // 16):
            j = lane % 16 + 16 * i
            if j < n_rec:
                rAcc = cute.make_rmem_tensor((2 * T,), Float32)
                for x in cutlass.range_constexpr(2 * T):
                    rAcc[x] = Float32(0.0)
                for cv in cutlass.range_constexpr(half_cols // vec):
                    c0 = warp * cols + half * half_cols + cv * vec
                    rKv = cute.make_rmem_tensor((vec,), Float32)
                    cute.autovec_copy(cute.make_tensor((sRecK[first + j, None].iterator + c0).align(4 * vec),
                                                       cute.make_layout(vec)), rKv)
                    for t in cutlass.range_constexpr(T):
                        for which in cutlass.range_constexpr(2):
                            rX = cute.make_rmem_tensor((vec,), Float32)
                            cute.autovec_copy(cute.make_tensor((sQK[1 - which, t, None].iterator + c0).align(4 * vec),
                                                               cute.make_layout(vec)), rX)
                            for e in cutlass.range_constexpr(vec):
                                rAcc[which * T + t] += rKv[e] * rX[e]
                for x in cutlass.range_constexpr(2 * T):
                    sPart[2 * warp + half, x, j] = rAcc[x]
        cute.arch.sync_threads()
        for i in cutlass.range_constexpr((2 * T * L + rm.threads - 1) // rm.threads):
            e = tidx + i * rm.threads
            if e < 2 * T * n_rec:
                x = e // n_rec
                j = e - x * n_rec
                which = x // T
                t = x - which * T
                m = n_hist + t
                coef = Float32(0.0)
                if j < m + which:
                    acc = Float32(0.0)
                    for w in cutlass.range_constexpr(2 * warps):
                        acc += sPart[w, x, j]
                    coef = cute.math.exp(sGam[m] - sGam[j]) * acc
                sC[which, t, j] = coef
        if tidx < T:
            sE[tidx] = cute.math.exp(sGam[n_hist + tidx])
        if cutlass.const_expr(self.fold_mode == "compact"):
            for i in cutlass.range_constexpr((L + 1 + rm.threads - 1) // rm.threads):
                j = tidx + i * rm.threads
                if n_hist > 0:
                    if j < n_hist:
                        sW[j] = cute.math.exp(sGam[n_hist - 1] - sGam[j])
                    if j == L:
                        sW[L] = cute.math.exp(sGam[n_hist - 1])

    @cute.jit
    def candidate_rows(self, rS: cute.Tensor, sQK: cute.Tensor, sTok: cute.Tensor, sV: cute.Tensor,
                       sRecX: cute.Tensor, sC: cute.Tensor, sE: cute.Tensor, n_hist, mO: cute.Tensor,
                       mRingD: cute.Tensor, s64, b, hv, row0, row_group, lane, start, count):
        """Per row: exp(G_m) S0 @ k_m and exp(G_m) S0 @ q_m plus the committed records' terms, each lane
        taking its columns of S0 and its share of the records so one row reduction per vector sums both;
        then the candidates' own terms (a triangle of T x T), u_t and o_t."""
        rm = self.rowmap
        T = self.num_tokens
        L = self.ring_len
        tpr = rm.threads_per_row
        # Token-major: each candidate's k and q columns are loaded once and serve every row of the thread.
        rPs = cute.make_rmem_tensor((rm.rows_per_thread, 2 * T), Float32)
        for t in cutlass.range_constexpr(T):
            rK = load_columns(rm, sQK[1, t, None], lane)
            rQ = load_columns(rm, sQK[0, t, None], lane)
            for r in cutlass.range_constexpr(rm.rows_per_thread):
                pk = Float32(0.0)
                pq = Float32(0.0)
                for j in cutlass.range_constexpr(rm.vecs_per_thread):
                    for e in cutlass.range_constexpr(rm.vec):
                        s = rS[r, j, e]
                        pk += s * rK[j, e]
                        pq += s * rQ[j, e]
                rPs[r, t] = sE[t] * pk
                rPs[r, T + t] = sE[t] * pq
        for r in cutlass.range_constexpr(rm.rows_per_thread):
            row = r * rm.rows_per_pass + row_group
            rP = cute.make_rmem_tensor((2 * T,), Float32)
            for x in cutlass.range_constexpr(2 * T):
                rP[x] = rPs[r, x]
            for i in cutlass.range_constexpr((L + tpr - 1) // tpr):
                j = lane + tpr * i
                if j < n_hist:
                    x = sRecX[j, row]
                    for t in cutlass.range_constexpr(T):
                        rP[t] += sC[0, t, j] * x
                        rP[T + t] += sC[1, t, j] * x
            for x in cutlass.range_constexpr(2 * T):
                rP[x] = row_sum(rm, rP[x])
            rU = cute.make_rmem_tensor((T,), Float32)
            for t in cutlass.range_constexpr(T):
                sk = rP[t]
                for j in cutlass.range_constexpr(t):
                    sk += sC[0, t, n_hist + j] * rU[j]
                u = sTok[1, t] * (sV[t, row] - sk)
                rU[t] = u
                o = rP[T + t]
                for j in cutlass.range_constexpr(t + 1):
                    o += sC[1, t, n_hist + j] * rU[j]
                if lane == 0:
                    mO[b, t, hv, row0 + row] = o.to(mO.element_type)
                    mRingD[s64, hv, (start + count + t) % L, row0 + row] = u


class GdnReplayFlushSm90(GdnReplaySm90):
    """The flush kernel as a callable of its own (cute.compile compiles __call__)."""

    @cute.jit
    def __call__(self, mState: cute.Tensor, mIndices: cute.Tensor, mRingK: cute.Tensor, mRingV: cute.Tensor,
                 mRingGB: cute.Tensor, mCursor: cute.Tensor, stream):
        self.flush(mState, mIndices, mRingK, mRingV, mRingGB, mCursor, stream)


def _ring_tensors(io_dtype: str, H: int, HV: int, K: int, V: int, pool_size: int, L: int):
    io = cutlass_dtype(io_dtype)
    ring_k = cute.runtime.make_fake_compact_tensor(io, (pool_size, H, L, K), stride_order=(3, 2, 1, 0),
                                                   assumed_align=16)
    ring_v = cute.runtime.make_fake_compact_tensor(io, (pool_size, HV, L, V), stride_order=(3, 2, 1, 0),
                                                   assumed_align=16)
    ring_d = cute.runtime.make_fake_compact_tensor(Float32, (pool_size, HV, L, V), stride_order=(3, 2, 1, 0),
                                                   assumed_align=16)
    ring_gb = cute.runtime.make_fake_compact_tensor(Float32, (pool_size, HV, L, 4), stride_order=(3, 2, 1, 0),
                                                    assumed_align=16)
    cursor = cute.runtime.make_fake_compact_tensor(Int32, (pool_size, 2), stride_order=(1, 0))
    return ring_k, ring_v, ring_d, ring_gb, cursor


def compile_replay(
    *,
    io_dtype: str,
    state_dtype: str,
    num_heads: int,
    num_v_heads: int,
    head_k_dim: int,
    head_v_dim: int,
    pool_size: int,
    num_tokens: int,
    max_tokens: int,
    ring_len: int,
    gate_mode: str,
    dt_bias_dtype: Optional[str],
    use_qk_l2norm: bool,
    config: VerifyConfig,
    fold_mode: str = "exact",
):
    """Compile the replay verify kernel (num_tokens >= 1) or the flush kernel (num_tokens = 0) for one key.

    Verify takes (q, k, v, gate_a, gate_b, A_log, dt_bias, state, state_indices, ring_k, ring_v, ring_d,
    ring_gb, cursors, o, scale); flush takes (state, state_indices, ring_k, ring_v, ring_gb, cursors). Both
    launch on the caller's current torch stream. Tensor-free: never touches a GPU.
    """
    reason = can_implement(io_dtype, state_dtype, num_heads, num_v_heads, head_k_dim, head_v_dim, gate_mode,
                           dt_bias_dtype, num_tokens, max_tokens, ring_len, config, fold_mode)
    if reason is not None:
        raise ValueError(reason)
    H, HV, K, V, T = num_heads, num_v_heads, head_k_dim, head_v_dim, num_tokens
    batch = cute.sym_int()
    state = cute.runtime.make_fake_compact_tensor(cutlass_dtype(state_dtype), (pool_size, HV, V, K),
                                                  stride_order=(3, 2, 1, 0), assumed_align=16)
    indices = cute.runtime.make_fake_compact_tensor(Int32, (batch,))
    ring_k, ring_v, ring_d, ring_gb, cursor = _ring_tensors(io_dtype, H, HV, K, V, pool_size, ring_len)
    cls = GdnReplayFlushSm90 if T == 0 else GdnReplaySm90
    op = cls(io_dtype=io_dtype, state_dtype=state_dtype, num_heads=H, num_v_heads=HV, head_k_dim=K, head_v_dim=V,
             gate_mode=gate_mode, use_qk_l2norm=use_qk_l2norm, num_tokens=T, max_tokens=max_tokens,
             ring_len=ring_len, config=config, fold_mode=fold_mode)
    stream = cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True)
    if T == 0:
        return cute.compile(op, state, indices, ring_k, ring_v, ring_gb, cursor, stream,
                            options="--enable-tvm-ffi")
    q, k, v, o, gate_a, gate_b, a_log, dt_bias = fake_token_inputs(
        io_dtype, H, HV, K, V, gate_mode, dt_bias_dtype, batch, T)
    return cute.compile(op, q, k, v, gate_a, gate_b, a_log, dt_bias, state, indices, ring_k, ring_v, ring_d,
                        ring_gb, cursor, o, Float32(1.0), stream, options="--enable-tvm-ffi")
