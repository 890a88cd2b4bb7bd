"""Multi-token (MTP / speculative) verify with every intermediate state cached (sm_90a).

For each sequence b and value head h, starting from S = state[state_indices[b], h] (read only):
    for t in 0 .. T-1:   S = the gated delta rule step of token t (see decode.py)
                         cache[cache_indices[b], t, h] = S;   o[b, t, h] = S @ q_t
so that `commit` can adopt the state after any accepted prefix without recomputing it.

Bytes: the state is read once and written T times, so verify is a store-bandwidth problem. The
CTA of decode (one tile of `tile_rows` state rows of one (sequence, head), see common/rows.py) keeps
its rows in fp32 registers across the T tokens and streams each step's rows to the cache; nothing
waits on memory after the first load. Everything per token that the rows share is staged once per
CTA in shared memory, in flight together with the state load:
  - q_t, k_t for all T tokens by cp.async, then one warp per token L2-normalizes them (fp32, q
    scaled) and forms k_t . q_t;
  - exp(g_t) and beta_t, one thread per token;
  - v_t at the tile's rows.
The running state stays fp32 between tokens; each cached state is rounded to the cache dtype once.
Each variant is compiled with a small- and a large-batch tile (`VerifyConfig.heuristic`); the caller
picks one per call by B * HV (`LARGE_BATCH_HEADS`).

Padding: state_indices[b] < 0 reads and writes no state and no cache, and writes zero o rows. A
negative cache index on a live row writes no cache (o is still computed); it is a caller error
that CUTE_GDN_DEBUG=1 reports.
"""

from dataclasses import dataclass
from typing import Optional

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32

from .common.dtypes import cutlass_dtype
from .common.exact import delta_u, fma_rn, update_row
from .common.fake import fake_token_inputs
from .common.gates import gate_decay_beta
from .common.problem import check_problem, check_rowmap, state_vec
from .common.rows import RowMap, columns_to_f32, load_columns, make_state_fragment, row_sum, state_tile_view
from .decode import GdnDecodeSm90

MAX_TOKENS = 16


# From this many (sequence, head) states on, the large-batch tile is used (per state dtype).
# Measured on an H200 (bench_verify.py --sweep, cold L2, graph replay, permuted slots), in TB/s written
# + read: fp32 state, 16 lanes per row, 16 row groups, 2 rows per thread (32 rows, 256 threads) against
# the small tile: HV = 32, T = 4: 3.45/3.76/3.85 vs 3.38/3.65/3.72 at B = 16/64/256; T = 2 and 8,
# B = 64: 3.82/3.82 vs 3.72/3.73; HV = 16, B = 16 (256 states): 2.81/3.41 vs 2.72/3.03 at T = 2/8. It
# ties the small tile at 128 states (HV = 32, B = 4: 2.85 vs 2.91). bf16 state, 16 lanes per row, 8 row
# groups, 4 rows per thread (32 rows, 128 threads): HV = 32, T = 4: 2.86/3.50/3.70 vs 2.56/3.11/3.31 at
# B = 16/64/256; at 256 states it ties (HV = 16, B = 16, T = 4: 17.96 vs 17.93 us) or loses (T = 8: 29.5
# vs 27.3 us).
LARGE_BATCH_HEADS = {"float32": 256, "bfloat16": 512}


@dataclass(frozen=True)
class VerifyConfig:
    threads_per_row: int = 8
    rows_per_pass: int = 16
    rows_per_thread: int = 2

    @classmethod
    def heuristic(cls, head_k_dim: int, head_v_dim: int, state_dtype: str,
                  large_batch: bool = False) -> "VerifyConfig":
        """The tile for B * HV below LARGE_BATCH_HEADS[state_dtype] (large_batch=False) or above.

        Small batches: 8 lanes x 16 B per row, 16 row groups (128 threads), 2 rows per thread, reduced
        where a head dim is too small. Large batches: 16 lanes per row and a 32-row tile; fp32 takes 16
        row groups of 2 rows (256 threads), bf16 8 row groups of 4 rows (128 threads).
        """
        vec = state_vec(state_dtype)
        if large_batch:
            large = cls(16, 16, 2) if state_dtype == "float32" else cls(16, 8, 4)
            if head_k_dim % (vec * 16) == 0 and head_v_dim % (large.rows_per_pass * large.rows_per_thread) == 0:
                return large
        tpr = 8
        while tpr > 1 and head_k_dim % (vec * tpr) != 0:
            tpr //= 2
        rows_per_thread = 2
        while rows_per_thread > 1 and head_v_dim % (16 * rows_per_thread) != 0:
            rows_per_thread //= 2
        return cls(threads_per_row=tpr, rows_per_pass=16, rows_per_thread=rows_per_thread)

    def rowmap(self, head_k_dim: int, state_dtype: str) -> RowMap:
        return RowMap(head_k_dim, state_vec(state_dtype), self.threads_per_row, self.rows_per_pass,
                      self.rows_per_thread)


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
    cache_steps: int,
    config: VerifyConfig,
) -> Optional[str]:
    """None if the verify kernel supports this shape and dtype set, else the reason."""
    reason = check_problem(io_dtype, state_dtype, num_heads, num_v_heads, head_k_dim, head_v_dim, gate_mode,
                           dt_bias_dtype)
    if reason is not None:
        return reason
    if not 1 <= cache_steps <= MAX_TOKENS:
        return f"cache_steps must be in [1, {MAX_TOKENS}], got {cache_steps}"
    if not 1 <= num_tokens <= cache_steps:
        return f"the number of tokens T must be in [1, cache_steps={cache_steps}], got {num_tokens}"
    rm = config.rowmap(head_k_dim, state_dtype)
    reason = check_rowmap(rm, head_v_dim)
    if reason is not None:
        return reason
    return None


class GdnVerifySm90(GdnDecodeSm90):
    """Reuses decode's gate loads and tile; the row update is decode's with fixed roundings
    (common/exact.py), so that the replay fold (kernels/replay.py) reproduces it bit for bit."""

    def __init__(self, *, num_tokens: int, cache_steps: int, config: VerifyConfig, **problem):
        super().__init__(config=config, **problem)
        self.num_tokens = num_tokens
        self.cache_steps = cache_steps

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
        mState: cute.Tensor,    # [pool_size, HV, V, K], read only
        mIndices: cute.Tensor,  # [B] int32
        mCache: cute.Tensor,    # [cache_slots, cache_steps, HV, V, K]
        mCacheIndices: cute.Tensor,  # [B] int32
        mO: cute.Tensor,        # [B, T, HV, V]
        scale: Float32,
        stream,
    ):
        batch = mIndices.shape[0]
        grid = (self.head_v_dim // self.rowmap.tile_rows, self.num_v_heads, batch)
        self.kernel(mQ, mK, mV, mGateA, mGateB, mALog, mDtBias, mState, mIndices, mCache, mCacheIndices, mO,
                    scale).launch(grid=grid, block=(self.rowmap.threads, 1, 1), stream=stream)

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
        mCache: cute.Tensor,
        mCacheIndices: cute.Tensor,
        mO: cute.Tensor,
        scale: Float32,
    ):
        rm = self.rowmap
        T = self.num_tokens
        tidx, _, _ = cute.arch.thread_idx()
        tile, hv, b = cute.arch.block_idx()
        lane = tidx % rm.threads_per_row
        row_group = tidx // rm.threads_per_row
        row0 = tile * rm.tile_rows
        hk = hv // (self.num_v_heads // self.num_heads)
        slot = mIndices[b]
        cache_slot = mCacheIndices[b]
        if slot >= 0:
            tSgS = state_tile_view(rm, mState[cutlass.Int64(slot), hv, None, None], row0, row_group, lane)
            rS_in = make_state_fragment(rm, tSgS.element_type)
            cute.autovec_copy(tSgS, rS_in)

            smem = cutlass.memory.SmemAllocator()
            io_dtype = mQ.element_type
            # q and k of every token, as loaded ([0] = q, [1] = k), then normalized in fp32.
            sRaw = smem.allocate_tensor(io_dtype, cute.make_layout((2, T, self.head_k_dim),
                                                                   stride=(T * self.head_k_dim, self.head_k_dim, 1)),
                                        byte_alignment=16)
            sQK = smem.allocate_tensor(Float32, cute.make_layout((2, T, self.head_k_dim),
                                                                 stride=(T * self.head_k_dim, self.head_k_dim, 1)),
                                       byte_alignment=16)
            sV = smem.allocate_tensor(Float32, cute.make_layout((T, rm.tile_rows), stride=(rm.tile_rows, 1)),
                                      byte_alignment=16)
            # Per token: exp(g), beta, k . q
            sTok = smem.allocate_tensor(Float32, cute.make_layout((3, T), stride=(T, 1)), byte_alignment=16)

            self.stage_qk(mQ, mK, sRaw, b, hk, tidx)
            self.stage_v(mV, sV, b, hv, row0, tidx)
            if tidx < T:
                gate_a, gate_b, a_log, dt_bias = self.load_gates(mGateA, mGateB, mALog, mDtBias, b, tidx, hv)
                decay, beta = gate_decay_beta(self.gate_mode, gate_a, gate_b, a_log, dt_bias)
                sTok[0, tidx] = decay
                sTok[1, tidx] = beta
            cute.arch.cp_async_wait_group(0)
            cute.arch.sync_threads()
            self.normalize_tokens(sRaw, sQK, sTok, scale, tidx)
            cute.arch.sync_threads()

            # The running state, fp32 across the tokens.
            rS = make_state_fragment(rm, Float32)
            rS.store(rS_in.load().to(Float32))
            for t in cutlass.range_constexpr(T):
                rK = columns_to_f32(rm, load_columns(rm, sQK[1, t, None], lane))
                rQ = columns_to_f32(rm, load_columns(rm, sQK[0, t, None], lane))
                decay = sTok[0, t]
                beta = sTok[1, t]
                kq = sTok[2, t]
                gO = mO[b, t, hv, None]
                for r in cutlass.range_constexpr(rm.rows_per_thread):
                    row = r * rm.rows_per_pass + row_group
                    self.decay_and_update_row(rS[r, None, None], rK, rQ, kq, decay, beta, sV[t, row], gO,
                                              row0 + row, lane)
                if cache_slot >= 0:
                    tCgC = state_tile_view(rm, mCache[cutlass.Int64(cache_slot), t, hv, None, None], row0, row_group, lane)
                    if cutlass.const_expr(tCgC.element_type == Float32):
                        cute.autovec_copy(rS, tCgC)
                    else:
                        rC = make_state_fragment(rm, tCgC.element_type)
                        rC.store(rS.load().to(tCgC.element_type))
                        cute.autovec_copy(rC, tCgC)
        else:
            for t in cutlass.range_constexpr(T):
                self.store_zero_output(mO[b, t, hv, None], row0, row_group, lane)

    @cute.jit
    def decay_and_update_row(self, rRow: cute.Tensor, rK, rQ, kq, decay, beta, v, gO: cute.Tensor, row, lane):
        """One state row of this thread: S @ k and S @ q, the delta-rule update in place, and o[row]."""
        rm = self.rowmap
        sk = Float32(0.0)
        sq = Float32(0.0)
        for j in cutlass.range_constexpr(rm.vecs_per_thread):
            for e in cutlass.range_constexpr(rm.vec):
                s = rRow[j, e].to(Float32)
                sk = fma_rn(s, rK[j * rm.vec + e], sk)
                sq += s * rQ[j * rm.vec + e]
        sk = row_sum(rm, sk)
        sq = row_sum(rm, sq)
        u = delta_u(decay, beta, v.to(Float32), sk)
        update_row(rm, rRow, rK, decay, u)
        if lane == 0:
            gO[row] = (decay * sq + u * kq).to(gO.element_type)

    @cute.jit
    def stage_qk(self, mQ: cute.Tensor, mK: cute.Tensor, sRaw: cute.Tensor, b, hk, tidx):
        """cp.async of q[b, :, hk] and k[b, :, hk] (T x K each, 16-byte vectors) into sRaw."""
        rm = self.rowmap
        T = self.num_tokens
        vec = 16 // (mQ.element_type.width // 8)
        vecs_per_token = self.head_k_dim // vec
        per_tensor = T * vecs_per_token
        atom = cute.make_copy_atom(cute.nvgpu.cpasync.CopyG2SOp(cute.nvgpu.cpasync.LoadCacheMode.GLOBAL),
                                   mQ.element_type, num_bits_per_copy=128)
        for which in cutlass.range_constexpr(2):
            src = mQ if which == 0 else mK
            for i in cutlass.range_constexpr((per_tensor + rm.threads - 1) // rm.threads):
                vid = tidx + i * rm.threads
                if vid < per_tensor:
                    t = vid // vecs_per_token
                    col = (vid % vecs_per_token) * vec
                    gX = src[b, t, hk, None]
                    gVec = cute.make_tensor((gX.iterator + col).align(16), cute.make_layout(vec))
                    sVec = cute.make_tensor((sRaw[which, t, None].iterator + col).align(16), cute.make_layout(vec))
                    cute.copy(atom, gVec, sVec)
        cute.arch.cp_async_commit_group()

    @cute.jit
    def stage_v(self, mV: cute.Tensor, sV: cute.Tensor, b, hv, row0, tidx):
        """v[b, :, hv, row0 : row0 + tile_rows] in fp32 into sV [T, tile_rows]."""
        rm = self.rowmap
        total = self.num_tokens * rm.tile_rows
        for i in cutlass.range_constexpr((total + rm.threads - 1) // rm.threads):
            e = tidx + i * rm.threads
            if e < total:
                t = e // rm.tile_rows
                r = e % rm.tile_rows
                sV[t, r] = mV[b, t, hv, row0 + r].to(Float32)

    @cute.jit
    def normalize_tokens(self, sRaw: cute.Tensor, sQK: cute.Tensor, sTok: cute.Tensor, scale: Float32, tidx,
                         sKScale: Optional[cute.Tensor] = None, sKCopy: Optional[cute.Tensor] = None, copy_row0=0):
        """One warp per token: q_t (L2-normalized, scaled) and k_t (L2-normalized) in fp32 into sQK,
        and k_t . q_t into sTok[2, t]; the factor that normalizes k_t into sKScale[t] where given (the
        replay ring keeps raw k and this factor, so its fold rebuilds exactly the k verify used); and the
        normalized k_t also into sKCopy[copy_row0 + t] where given (replay's record list)."""
        warps = self.rowmap.threads // 32
        warp = tidx // 32
        lane = tidx % 32
        K = self.head_k_dim
        per_lane = (K + 31) // 32
        for t in cutlass.range_constexpr(self.num_tokens):
            if warp == t % warps:
                qq = Float32(0.0)
                kk = Float32(0.0)
                kq = Float32(0.0)
                for i in cutlass.range_constexpr(per_lane):
                    c = lane + 32 * i
                    if c < K:
                        q = sRaw[0, t, c].to(Float32)
                        k = sRaw[1, t, c].to(Float32)
                        qq += q * q
                        kk += k * k
                        kq += k * q
                k_scale = Float32(1.0)
                q_scale = scale
                if cutlass.const_expr(self.use_qk_l2norm):
                    k_scale = cute.math.rsqrt(cute.arch.warp_reduction_sum(kk) + 1e-6)
                    q_scale = scale * cute.math.rsqrt(cute.arch.warp_reduction_sum(qq) + 1e-6)
                kq = cute.arch.warp_reduction_sum(kq) * k_scale * q_scale
                for i in cutlass.range_constexpr(per_lane):
                    c = lane + 32 * i
                    if c < K:
                        sQK[0, t, c] = sRaw[0, t, c].to(Float32) * q_scale
                        sQK[1, t, c] = sRaw[1, t, c].to(Float32) * k_scale
                        if cutlass.const_expr(sKCopy is not None):
                            sKCopy[copy_row0 + t, c] = sQK[1, t, c]
                if lane == 0:
                    sTok[2, t] = kq
                    if cutlass.const_expr(sKScale is not None):
                        sKScale[t] = k_scale


def compile_verify(
    *,
    io_dtype: str,
    state_dtype: str,
    num_heads: int,
    num_v_heads: int,
    head_k_dim: int,
    head_v_dim: int,
    pool_size: int,
    num_tokens: int,
    cache_steps: int,
    gate_mode: str,
    dt_bias_dtype: Optional[str],
    use_qk_l2norm: bool,
    config: VerifyConfig,
):
    """Compile the verify kernel for one key. Tensor-free: never touches a GPU.

    Run-time: B, the number of cache slots, scale, every pointer and stride but the pool's and the
    cache's. The returned tvm-ffi function takes (q, k, v, gate_a, gate_b, A_log, dt_bias, state,
    state_indices, cache, cache_indices, o, scale) and launches on the caller's current torch stream.
    """
    reason = can_implement(io_dtype, state_dtype, num_heads, num_v_heads, head_k_dim, head_v_dim, gate_mode,
                           dt_bias_dtype, num_tokens, cache_steps, config)
    if reason is not None:
        raise ValueError(reason)
    sd = cutlass_dtype(state_dtype)
    H, HV, K, V, T = num_heads, num_v_heads, head_k_dim, head_v_dim, num_tokens
    batch = cute.sym_int()
    cache_slots = cute.sym_int()
    q, k, v, o, gate_a, gate_b, a_log, dt_bias = fake_token_inputs(
        io_dtype, H, HV, K, V, gate_mode, dt_bias_dtype, batch, T)
    state = cute.runtime.make_fake_compact_tensor(sd, (pool_size, HV, V, K), stride_order=(3, 2, 1, 0),
                                                  assumed_align=16)
    cache = cute.runtime.make_fake_compact_tensor(sd, (cache_slots, cache_steps, HV, V, K),
                                                  stride_order=(4, 3, 2, 1, 0), assumed_align=16)
    indices = cute.runtime.make_fake_compact_tensor(Int32, (batch,))
    cache_indices = cute.runtime.make_fake_compact_tensor(Int32, (batch,))
    op = GdnVerifySm90(io_dtype=io_dtype, state_dtype=state_dtype, num_heads=H, num_v_heads=HV, head_k_dim=K,
                       head_v_dim=V, gate_mode=gate_mode, use_qk_l2norm=use_qk_l2norm, num_tokens=T,
                       cache_steps=cache_steps, config=config)
    stream = cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True)
    return cute.compile(op, q, k, v, gate_a, gate_b, a_log, dt_bias, state, indices, cache, cache_indices, o,
                        Float32(1.0), stream, options="--enable-tvm-ffi")
