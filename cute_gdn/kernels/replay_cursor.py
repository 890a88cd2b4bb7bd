"""The replay protocol's cursor kernel: per-slot (start, count) moves after replay_verify (commit: n accepted
records join the ring, or replace a folded window) or after the flush kernel (flush: the ring empties). One
thread per batch row; a padding row (slot < 0) touches nothing. See kernels/replay.py for the ring.
"""

from typing import Optional

import cutlass
import cutlass.cute as cute
from cutlass import Int32, Int64

from .replay import check_ring, fold_threshold

CURSOR_MODES = ("commit", "flush")
CURSOR_THREADS = 128


def can_implement_cursor(pool_size: int, ring_len: int, max_tokens: int, mode: str) -> Optional[str]:
    if mode not in CURSOR_MODES:
        return f"cursor mode must be one of {CURSOR_MODES}, got {mode}"
    if pool_size < 1:
        return f"pool_size must be >= 1, got {pool_size}"
    return check_ring(ring_len, max_tokens)


class GdnReplayCursorSm90:
    """Cursor moves after replay_verify (commit) or after the flush kernel (flush); one thread per row."""

    def __init__(self, *, pool_size: int, ring_len: int, max_tokens: int, mode: str):
        self.pool_size = pool_size
        self.ring_len = ring_len
        self.max_tokens = max_tokens
        self.mode = mode
        self.fold_at = fold_threshold(ring_len, max_tokens)

    @cute.jit
    def __call__(self, mPos: cute.Tensor, mIndices: cute.Tensor, mAccepted: cute.Tensor, stream):
        batch = mIndices.shape[0]
        self.kernel(mPos, mIndices, mAccepted).launch(
            grid=((batch + CURSOR_THREADS - 1) // CURSOR_THREADS, 1, 1), block=(CURSOR_THREADS, 1, 1), stream=stream)

    @cute.kernel
    def kernel(self, mPos: cute.Tensor, mIndices: cute.Tensor, mAccepted: cute.Tensor):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        b = bidx * CURSOR_THREADS + tidx
        if b < mIndices.shape[0]:
            slot = mIndices[b]
            if slot >= 0:
                s64 = Int64(slot)
                start = mPos[s64, 0]
                count = mPos[s64, 1]
                if cutlass.const_expr(self.mode == "commit"):
                    # Out-of-range counts are clamped so the ring invariant (count + max_tokens <= L)
                    # holds whatever the caller passes.
                    n = mAccepted[b]
                    if n < 0:
                        n = Int32(0)
                    if n > self.max_tokens:
                        n = Int32(self.max_tokens)
                    if count > self.fold_at:
                        start = (start + count) % self.ring_len
                        count = n
                    else:
                        count = count + n
                else:
                    start = (start + count) % self.ring_len
                    count = Int32(0)
                mPos[s64, 0] = start
                mPos[s64, 1] = count


def compile_cursor(*, pool_size: int, ring_len: int, max_tokens: int, mode: str):
    """Compile the cursor kernel: (cursors [pool_size, 2] int32, state_indices [B], num_accepted [B])."""
    reason = can_implement_cursor(pool_size, ring_len, max_tokens, mode)
    if reason is not None:
        raise ValueError(reason)
    batch = cute.sym_int()
    pos = cute.runtime.make_fake_compact_tensor(Int32, (pool_size, 2), stride_order=(1, 0))
    indices = cute.runtime.make_fake_compact_tensor(Int32, (batch,))
    accepted = cute.runtime.make_fake_compact_tensor(Int32, (batch,))
    op = GdnReplayCursorSm90(pool_size=pool_size, ring_len=ring_len, max_tokens=max_tokens, mode=mode)
    stream = cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True)
    return cute.compile(op, pos, indices, accepted, stream, options="--enable-tvm-ffi")
