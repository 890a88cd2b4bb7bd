"""Prefill's constants and host rules: the chain kinds (narrow, wide, folded), when the aux and chain
kernels overlap, when one long sequence runs context-parallel, the chain's warpgroups and pipeline stages,
with the measurements behind each rule. Pure Python: no DSL, no torch.
"""

from typing import Optional

from ..common.problem import check_problem

CHUNK = 64
LAUNCH_AUX, LAUNCH_CHAIN, LAUNCH_BOTH = 1, 2, 3  # the compiled function's `launch` argument
LAUNCH_SCAN = 4  # its context-parallel scan (scan.py), between the CP_MAP and CP_PIECES chain launches
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


def chain_wgs(chain: int) -> int:
    """Math warpgroups of a chain CTA (64 state rows each)."""
    return 2 if chain == CHAIN_WIDE else 1


def chain_stages(chain: int) -> int:
    """Pipeline stages of a chain CTA's loads: three for a narrow chain (179 KiB of shared memory), so
    that a chunk's loads are issued two chunks ahead (H200: context-parallel passes 5-10% faster); two for
    a folded chain (its W~ leaves no room for three) and a wide one (three made many short sequences
    6-11% slower)."""
    return 3 if chain == CHAIN_NARROW else 2


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
