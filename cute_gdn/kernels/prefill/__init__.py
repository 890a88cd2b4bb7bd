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
S_end = S_start M + B, no outputs), a scan of P - 2 products (scan.py), and a pieces pass
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
Modules (docs/design.md walks through them):
  config.py     constants, the chain kinds and the host rules (chain_kind, use_overlap, cp_pieces, stages)
                with the measurements behind them; can_implement
  plan.py       PrefillPlan and plan_prefill: what ops.prefill launches for a call (pure host functions)
  workspace.py  the workspace layout (rows, tiles, factors) and the per-chunk ready flags
  kernel.py     GdnPrefillSm90: layouts, shared storage and TiledMmas per chain kind, the launches;
                compile_prefill
  aux.py        the aux kernel and its roles (row norms, the inverse, W~)
  chain.py      the chain kernel and its roles (producer warp, state chain, state load / store, outputs)
  solve.py      fp32 device math of the aux kernel (exp2, the gate scan, the diagonal-block solve)
  scan.py       the context-parallel scan of the pieces' starts (fp32 FMAs, one launch)
Shared with other kernels: ../common/mma.py (wgmma issue, fragment layouts), ../common/tile_io.py (shared
memory and register row I/O), ../common/barriers.py (named barriers).
"""

from .config import (AUX_CTAS_PER_SM, AUX_WG_THREADS, CHAIN_ALONE_SMEM, CHAIN_FOLDED, CHAIN_NARROW, CHAIN_WIDE,
                     CHUNK, CP_MAP, CP_MIN_CHUNKS, CP_OFF, CP_PIECES, LAUNCH_AUX, LAUNCH_BOTH, LAUNCH_CHAIN,
                     LAUNCH_SCAN,
                     SUPPORTED_HEAD_DIM, WG_ROWS, can_implement, chain_kind, chain_stages, chain_wgs, cp_pieces,
                     cp_step, narrow_chain_ctas, use_overlap, use_wide_chain)
from .kernel import GdnPrefillSm90, compile_prefill
from .plan import PrefillPlan, check_plan, plan_prefill
from .workspace import NUM_FACTORS, ws_rows, ws_tiles

__all__ = ["AUX_CTAS_PER_SM", "AUX_WG_THREADS", "CHAIN_ALONE_SMEM", "CHAIN_FOLDED", "CHAIN_NARROW", "CHAIN_WIDE",
           "CHUNK", "CP_MAP", "CP_MIN_CHUNKS", "CP_OFF", "CP_PIECES", "LAUNCH_AUX", "LAUNCH_BOTH", "LAUNCH_CHAIN",
           "LAUNCH_SCAN",
           "NUM_FACTORS", "SUPPORTED_HEAD_DIM", "WG_ROWS", "GdnPrefillSm90", "PrefillPlan", "can_implement",
           "chain_kind", "chain_stages", "chain_wgs", "check_plan", "compile_prefill", "cp_pieces", "cp_step",
           "narrow_chain_ctas", "plan_prefill", "use_overlap", "use_wide_chain", "ws_rows", "ws_tiles"]
