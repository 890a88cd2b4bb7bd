"""Commit after speculative verify: adopt the cached state of the last accepted token (sm_90a).

For every sequence b with accepted_steps[b] = n >= 1 (and non-negative indices):
    state[state_indices[b]] = cache[cache_indices[b], n - 1]          (all HV heads)
n = 0 leaves the slot as it was, which is the state before the verified tokens since verify never
writes the pool. A pure copy of 2 x state bytes per committed sequence: every thread issues all its
16-byte loads, then its stores; a CTA moves `threads * vecs_per_thread` vectors of one head.

Two forms, one kernel:
  - "tensor": one layer's state [pool_size, HV, V, K] and cache [cache_slots, cache_steps, HV, V, K];
  - "table": many layers in one launch (engines commit all layers at once). The kernel takes two
    int64 tables holding each layer's state and cache base address; every layer has the same
    shape and dtype. Grid (HV * chunks, layers, B).
"""

from dataclasses import dataclass
from typing import Optional

import cutlass
import cutlass.cute as cute
from cutlass import Int32, Int64

from .common.dtypes import STATE_DTYPES, cutlass_dtype
from .common.problem import check_head_dims, state_vec
from .verify import MAX_TOKENS

LAYER_MODES = ("tensor", "table")


@dataclass(frozen=True)
class CommitConfig:
    threads: int = 128
    vecs_per_thread: int = 8

    @classmethod
    def heuristic(cls, head_k_dim: int, head_v_dim: int, state_dtype: str) -> "CommitConfig":
        """128 threads x 8 vectors of 16 B per CTA, reduced until it divides one head's state."""
        vecs = head_v_dim * head_k_dim // state_vec(state_dtype)
        threads, per_thread = 128, 8
        while vecs % (threads * per_thread) != 0:
            if per_thread > 1:
                per_thread //= 2
            else:
                threads //= 2
        return cls(threads=threads, vecs_per_thread=per_thread)


def can_implement(state_dtype: str, num_v_heads: int, head_k_dim: int, head_v_dim: int, cache_steps: int,
                  layers: str, config: CommitConfig) -> Optional[str]:
    if state_dtype not in STATE_DTYPES:
        return f"state dtype must be one of {STATE_DTYPES}, got {state_dtype}"
    if layers not in LAYER_MODES:
        return f"layers must be one of {LAYER_MODES}, got {layers}"
    if num_v_heads < 1:
        return f"num_v_heads must be >= 1, got {num_v_heads}"
    if not 1 <= cache_steps <= MAX_TOKENS:
        return f"cache_steps must be in [1, {MAX_TOKENS}], got {cache_steps}"
    reason = check_head_dims(head_k_dim, head_v_dim)
    if reason is not None:
        return reason
    vecs = head_v_dim * head_k_dim // state_vec(state_dtype)
    if not 32 <= config.threads <= 1024 or config.threads % 32 or vecs % (config.threads * config.vecs_per_thread):
        return f"{config.threads} threads x {config.vecs_per_thread} vectors do not tile a head of {vecs} vectors"
    return None


class GdnCommitSm90:
    def __init__(self, *, state_dtype: str, num_v_heads: int, head_k_dim: int, head_v_dim: int, cache_steps: int,
                 layers: str, config: CommitConfig):
        self.dtype = cutlass_dtype(state_dtype)
        self.num_v_heads = num_v_heads
        self.head_elems = head_v_dim * head_k_dim
        self.cache_steps = cache_steps
        self.table = layers == "table"
        self.config = config
        self.vec = state_vec(state_dtype)
        self.chunk_elems = config.threads * config.vecs_per_thread * self.vec
        self.chunks = self.head_elems // self.chunk_elems

    @cute.jit
    def __call__(
        self,
        mState: cute.Tensor,         # "tensor": [pool_size, HV, V, K]; "table": int64 [L] base addresses
        mIndices: cute.Tensor,       # [B] int32
        mCache: cute.Tensor,         # "tensor": [cache_slots, cache_steps, HV, V, K]; "table": int64 [L]
        mCacheIndices: cute.Tensor,  # [B] int32
        mAccepted: cute.Tensor,      # [B] int32
        stream,
    ):
        layers = 1
        if cutlass.const_expr(self.table):
            layers = mState.shape[0]
        grid = (self.num_v_heads * self.chunks, layers, mIndices.shape[0])
        self.kernel(mState, mIndices, mCache, mCacheIndices, mAccepted).launch(
            grid=grid, block=(self.config.threads, 1, 1), stream=stream)

    @cute.kernel
    def kernel(self, mState: cute.Tensor, mIndices: cute.Tensor, mCache: cute.Tensor, mCacheIndices: cute.Tensor,
               mAccepted: cute.Tensor):
        cfg = self.config
        tidx, _, _ = cute.arch.thread_idx()
        x, layer, b = cute.arch.block_idx()
        hv = x // self.chunks
        chunk = x % self.chunks
        n = mAccepted[b]
        slot = mIndices[b]
        cache_slot = mCacheIndices[b]
        if (n >= 1) & (n <= self.cache_steps) & (slot >= 0) & (cache_slot >= 0):
            state_base, cache_base = self.bases(mState, mCache, layer)
            within = hv * self.head_elems + chunk * self.chunk_elems
            dst_off = Int64(slot) * (self.num_v_heads * self.head_elems) + within
            src_off = (Int64(cache_slot) * self.cache_steps + (n - 1)) * (self.num_v_heads * self.head_elems) + within
            # (vecs_per_thread, threads, vec): a warp's 16-byte vectors are contiguous.
            chunk_layout = cute.make_layout((cfg.vecs_per_thread, cfg.threads, self.vec),
                                            stride=(cfg.threads * self.vec, self.vec, 1))
            gSrc = cute.make_tensor((cache_base + src_off).align(16), chunk_layout)[None, tidx, None]
            gDst = cute.make_tensor((state_base + dst_off).align(16), chunk_layout)[None, tidx, None]
            frag = cute.make_rmem_tensor(cute.make_layout((cfg.vecs_per_thread, self.vec), stride=(self.vec, 1)),
                                         self.dtype)
            cute.autovec_copy(gSrc, frag)
            cute.autovec_copy(frag, gDst)

    @cute.jit
    def bases(self, mState: cute.Tensor, mCache: cute.Tensor, layer):
        """The state pool and cache base pointers of this layer."""
        if cutlass.const_expr(self.table):
            return (cute.make_ptr(self.dtype, mState[layer], cute.AddressSpace.gmem, assumed_align=16),
                    cute.make_ptr(self.dtype, mCache[layer], cute.AddressSpace.gmem, assumed_align=16))
        else:
            return mState.iterator, mCache.iterator


def compile_commit(*, state_dtype: str, num_v_heads: int, head_k_dim: int, head_v_dim: int, pool_size: int,
                   cache_steps: int, layers: str, config: CommitConfig):
    """Compile the commit kernel for one key. Tensor-free: never touches a GPU.

    The returned tvm-ffi function takes (state, state_indices, cache, cache_indices, accepted_steps);
    with layers="table", state and cache are int64 tensors [L] of per-layer base addresses.
    """
    reason = can_implement(state_dtype, num_v_heads, head_k_dim, head_v_dim, cache_steps, layers, config)
    if reason is not None:
        raise ValueError(reason)
    sd = cutlass_dtype(state_dtype)
    HV, K, V = num_v_heads, head_k_dim, head_v_dim
    batch = cute.sym_int()
    if layers == "table":
        num_layers = cute.sym_int()
        state = cute.runtime.make_fake_compact_tensor(Int64, (num_layers,))
        cache = cute.runtime.make_fake_compact_tensor(Int64, (num_layers,))
    else:
        state = cute.runtime.make_fake_compact_tensor(sd, (pool_size, HV, V, K), stride_order=(3, 2, 1, 0),
                                                      assumed_align=16)
        cache = cute.runtime.make_fake_compact_tensor(sd, (cute.sym_int(), cache_steps, HV, V, K),
                                                      stride_order=(4, 3, 2, 1, 0), assumed_align=16)
    indices = cute.runtime.make_fake_compact_tensor(Int32, (batch,))
    cache_indices = cute.runtime.make_fake_compact_tensor(Int32, (batch,))
    accepted = cute.runtime.make_fake_compact_tensor(Int32, (batch,))
    op = GdnCommitSm90(state_dtype=state_dtype, num_v_heads=HV, head_k_dim=K, head_v_dim=V, cache_steps=cache_steps,
                       layers=layers, config=config)
    stream = cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True)
    return cute.compile(op, state, indices, cache, cache_indices, accepted, stream, options="--enable-tvm-ffi")
