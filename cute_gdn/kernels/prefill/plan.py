"""The host plan of one prefill call: which chain kernel, whether the aux and chain kernels overlap, and
whether one long sequence runs context-parallel. Pure functions of the call's sizes and the GPU's SM
count (config.py has the rules and the measurements behind them); `ops.prefill` computes the plan, and
tests and benchmarks may pass their own (`cute_gdn.prefill(..., plan=...)`) to force a path.
"""

from typing import NamedTuple

from .config import CHAIN_NARROW, CHAIN_WIDE, CHUNK, chain_kind, cp_pieces, cp_step, use_overlap


class PrefillPlan(NamedTuple):
    chain: int            # CHAIN_NARROW, CHAIN_WIDE or CHAIN_FOLDED (config.chain_kind)
    overlap: bool         # aux and chain kernels concurrently on two streams (config.use_overlap)
    pieces: int = 0       # context parallelism: pieces of the one sequence, 0 = sequences whole
    cp_step: int = CHUNK  # tokens per piece (a multiple of CHUNK) when pieces > 0


def plan_prefill(num_seqs: int, tokens: int, num_v_heads: int, head_k_dim: int, head_v_dim: int, num_sms: int,
                 *, context_parallel: bool = True) -> PrefillPlan:
    """The plan ops.prefill runs for N sequences of T tokens in all on a GPU of num_sms SMs; with
    context_parallel=False a call that would run in pieces runs whole (to compare the two)."""
    pieces = cp_pieces(num_seqs, tokens, num_v_heads, head_k_dim, head_v_dim, num_sms) if context_parallel else 0
    if pieces:
        step = cp_step(tokens, pieces)
        # Rounding the pieces up to whole chunks can leave the last ones empty (many pieces of a few heads):
        # those run as fewer pieces of the same length.
        return PrefillPlan(CHAIN_NARROW, False, -(-tokens // step), step)
    return PrefillPlan(chain_kind(num_seqs, num_v_heads, head_v_dim, num_sms),
                       use_overlap(num_seqs, num_v_heads, head_v_dim, num_sms))


def check_plan(plan, num_seqs: int, tokens: int) -> None:
    """A caller's plan must be one the kernels can run: raises TypeError / ValueError naming `plan`."""
    if not isinstance(plan, PrefillPlan):
        raise TypeError(f"plan must be a PrefillPlan (cute_gdn.ops.plan_prefill), got {type(plan).__name__}")
    if plan.chain not in (0, 1, 2):
        raise ValueError(f"plan.chain must be CHAIN_NARROW, CHAIN_WIDE or CHAIN_FOLDED, got {plan.chain}")
    if plan.overlap and plan.chain == CHAIN_WIDE:
        raise ValueError("plan: a wide chain cannot overlap the aux kernel (its CTAs could take every SM)")
    if plan.pieces:
        if num_seqs != 1 or plan.pieces < 2 or plan.chain != CHAIN_NARROW or plan.overlap:
            raise ValueError(f"plan: context parallelism needs one sequence, >= 2 pieces, a narrow chain and no "
                             f"overlap; got {plan} for {num_seqs} sequences")
        if plan.cp_step <= 0 or plan.cp_step % CHUNK or not (plan.pieces - 1) * plan.cp_step < tokens <= \
                plan.pieces * plan.cp_step:
            raise ValueError(f"plan.cp_step must be a multiple of {CHUNK} with {plan.pieces} pieces covering "
                             f"{tokens} tokens, got {plan.cp_step}")
