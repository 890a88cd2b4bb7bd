"""torch.library registrations of the public ops, so that `torch.compile(fullgraph=True)` traces them.

    torch.ops.cute_gdn.prefill / prefill_out      state pool written in place
    torch.ops.cute_gdn.decode / decode_out        state pool written in place
    torch.ops.cute_gdn.verify / verify_out        verify cache written in place (the pool is only read)
    torch.ops.cute_gdn.commit                     state pool written in place
    torch.ops.cute_gdn.commit_layers              every layer's state pool written in place
    torch.ops.cute_gdn.replay_verify / _out       the ring written; the pool written by a fold
    torch.ops.cute_gdn.replay_commit              the cursors written in place
    torch.ops.cute_gdn.replay_flush               every layer's state pool and the cursors written

These are separate entry points for models that are compiled: the eager `cute_gdn.decode(...)` is not
routed through the dispatcher and keeps its own cost. Each op calls the public function of
`cute_gdn.ops` with its public arguments, so the kernels, the validation and the errors are the same;
after `use_kernels(kernels)` it calls the methods of that `cute_gdn.GDNKernels` instead (its kernel
cache, no compiling after its warmup()).

Outputs. A custom op's output may not alias an input, so `out=` cannot be an optional argument of an op
that returns o. Each of prefill, decode and verify is therefore two ops: `<op>` returns a fresh o
(allocated as the eager op allocates it, `torch.empty_like(v)`), and `<op>_out` writes a given `out` and
returns nothing. Under torch.compile both trace as one mutating call (inductor re-inplaces the
functionalized form, so neither the pool nor `out` is copied); `<op>` needs no extra tensor in the graph.
The Python functions of this module (`decode(..., out=None)`, ...) take the public signatures of
`cute_gdn.<op>` and pick one of the two ops.

Schemas. custom_op rejects keyword-only tensors, so every argument is positional-or-keyword, in the order
of the public functions; the gate tensors (a, b, A_log, dt_bias, g, beta) are `Tensor?` without a
default, which a Python signature needs before the required `state`. Pass None for the gate set not used.

commit_layers. A `cute_gdn.LayerTable` is not a tensor, so the op takes the per-layer pools and caches
as `Tensor[]` and builds the table itself, memoized by the tensors' addresses and the first layer's
shapes, strides and dtype. Building a table copies L addresses to the GPU, which a CUDA-graph capture cannot record:
call the op once eagerly (a compiled function's first run does) or `layer_table(states, caches)`
before capturing; a capture that meets tensors without a table raises RuntimeError. After use_kernels,
each table passes that GDNKernels' config check (as GDNKernels.layer_table does it) before its first commit
through it, so tensors of another pool size, head layout, dtype or cache_steps raise ValueError. Tables are kept
for the life of the process, because a captured graph reads their address arrays on every replay
(they hold the tensors, so the addresses stay valid); `clear_layer_tables()` drops them once no such
graph will be replayed.

Replay. `cute_gdn.ReplayRing` and `cute_gdn.ReplayCursors` are NamedTuples, which a schema cannot take:
the ops take a ring as its four tensors (ring_k, ring_v, ring_d, ring_gb; lists of them, one per layer, for
replay_flush) and the cursors as `cursors_pos` plus the two ints ring_len and max_tokens and, last (with a
default, so that calls without it keep their positions), the string `fold` ("exact" or "compact",
ReplayCursors.fold), and rebuild the tuples. The Python functions take the tuples. replay_verify declares
the pool written: a row that folds rewrites its checkpoint (the choice is made on the device, so every
call may write it).

This module does not use `from __future__ import annotations`: custom_op infers each schema from the
annotations, and real types are what it reads most reliably across torch versions.
"""

import warnings
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import ops
from . import replay

# --------------------------------------------------------------------------------------------------
# where the ops run: the free functions, or a serving surface's kernels

# A GDNKernels (or None: the free functions of cute_gdn.ops with the process-wide kernel cache). Read
# by the op implementations at run time, so a graph compiled before use_kernels() follows it too.
_surface = None


def use_kernels(kernels) -> None:
    """Run every torch.ops.cute_gdn call through `kernels`, a `cute_gdn.GDNKernels` (its kernel cache,
    no compiling after its warmup(), its checks that the tensors belong to its config), or through the
    free functions again with None. Process-wide: one serving config per process, as engines run."""
    global _surface
    _surface = kernels


def _surface_for(use_qk_l2norm: bool):
    surface = _surface
    if surface is not None and bool(use_qk_l2norm) != surface.use_qk_l2norm:
        raise ValueError(f"use_qk_l2norm={bool(use_qk_l2norm)}, but the kernels given to "
                         f"cute_gdn.torch_ops.use_kernels were built with use_qk_l2norm={surface.use_qk_l2norm}")
    return surface


def _call(op, out_op, args: tuple, out: Optional[Tensor]) -> Tensor:
    """op(*args), the op that returns a fresh o, or out_op(*args, out) returning `out` (Outputs, above)."""
    if out is None:
        return op(*args)
    out_op(*args, out)
    return out


def _prefill(q, k, v, a, b, A_log, dt_bias, g, beta, cu_seqlens, state, state_indices, has_initial_state, scale,
             use_qk_l2norm, out):
    surface = _surface_for(use_qk_l2norm)
    if surface is None:
        return ops.prefill(q, k, v, a, b, A_log=A_log, dt_bias=dt_bias, g=g, beta=beta, cu_seqlens=cu_seqlens,
                           state=state, state_indices=state_indices, has_initial_state=has_initial_state, scale=scale,
                           use_qk_l2norm=use_qk_l2norm, out=out)
    return surface.extend(q, k, v, a, b, A_log=A_log, dt_bias=dt_bias, g=g, beta=beta, cu_seqlens=cu_seqlens,
                          state=state, state_indices=state_indices, has_initial_state=has_initial_state, scale=scale,
                          out=out)


def _decode(q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, scale, use_qk_l2norm, out):
    surface = _surface_for(use_qk_l2norm)
    if surface is None:
        return ops.decode(q, k, v, a, b, A_log=A_log, dt_bias=dt_bias, g=g, beta=beta, state=state,
                          state_indices=state_indices, scale=scale, use_qk_l2norm=use_qk_l2norm, out=out)
    return surface.decode(q, k, v, a, b, A_log=A_log, dt_bias=dt_bias, g=g, beta=beta, state=state,
                          state_indices=state_indices, scale=scale, out=out)


def _verify(q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, cache, cache_indices, scale,
            use_qk_l2norm, out):
    surface = _surface_for(use_qk_l2norm)
    if surface is None:
        return ops.verify(q, k, v, a, b, A_log=A_log, dt_bias=dt_bias, g=g, beta=beta, state=state,
                          state_indices=state_indices, cache=cache, cache_indices=cache_indices, scale=scale,
                          use_qk_l2norm=use_qk_l2norm, out=out)
    return surface.target_verify(q, k, v, a, b, A_log=A_log, dt_bias=dt_bias, g=g, beta=beta, state=state,
                                 state_indices=state_indices, cache=cache, cache_indices=cache_indices, scale=scale,
                                 out=out)


# --------------------------------------------------------------------------------------------------
# prefill


@torch.library.custom_op("cute_gdn::prefill", mutates_args=("state",))
def _prefill_op(
    q: Tensor,  # [1, T, H, K] bf16/fp16: the N sequences packed along T
    k: Tensor,  # [1, T, H, K]
    v: Tensor,  # [1, T, HV, V]
    a: Optional[Tensor],        # [1, T, HV] raw gate (io dtype), or None with g
    b: Optional[Tensor],        # [1, T, HV] raw beta logit (io dtype), or None with beta
    A_log: Optional[Tensor],    # [HV] fp32
    dt_bias: Optional[Tensor],  # [HV] fp32 or bf16
    g: Optional[Tensor],        # [1, T, HV] fp32 (instead of a, A_log, dt_bias)
    beta: Optional[Tensor],     # [1, T, HV] fp32 (instead of b)
    cu_seqlens: Tensor,         # [N + 1] int32
    state: Tensor,              # [pool_size, HV, V, K] fp32 or bf16, updated in place
    state_indices: Tensor,      # [N] int32; < 0 = padding
    has_initial_state: Optional[Tensor] = None,  # [N] bool; None = all True
    scale: Optional[float] = None,
    use_qk_l2norm: bool = True,
) -> Tensor:  # o [1, T, HV, V] io dtype
    return _prefill(q, k, v, a, b, A_log, dt_bias, g, beta, cu_seqlens, state, state_indices, has_initial_state,
                    scale, use_qk_l2norm, None)


@_prefill_op.register_fake
def _(q, k, v, a, b, A_log, dt_bias, g, beta, cu_seqlens, state, state_indices, has_initial_state=None,
      scale=None, use_qk_l2norm=True):
    return torch.empty_like(v)  # as ops.prefill allocates o, strides included


@torch.library.custom_op("cute_gdn::prefill_out", mutates_args=("state", "out"))
def _prefill_out_op(
    q: Tensor, k: Tensor, v: Tensor, a: Optional[Tensor], b: Optional[Tensor], A_log: Optional[Tensor],
    dt_bias: Optional[Tensor], g: Optional[Tensor], beta: Optional[Tensor], cu_seqlens: Tensor,
    state: Tensor,  # [pool_size, HV, V, K], updated in place
    state_indices: Tensor, has_initial_state: Optional[Tensor], scale: Optional[float], use_qk_l2norm: bool,
    out: Tensor,  # [1, T, HV, V] io dtype, written
) -> None:
    """cute_gdn::prefill writing o into `out` (arguments as cute_gdn::prefill, all given)."""
    _prefill(q, k, v, a, b, A_log, dt_bias, g, beta, cu_seqlens, state, state_indices, has_initial_state, scale,
             use_qk_l2norm, out)


@_prefill_out_op.register_fake
def _(q, k, v, a, b, A_log, dt_bias, g, beta, cu_seqlens, state, state_indices, has_initial_state, scale,
      use_qk_l2norm, out):
    return None


def prefill(
    q: Tensor,  # [1, T, H, K]
    k: Tensor,  # [1, T, H, K]
    v: Tensor,  # [1, T, HV, V]
    a: Optional[Tensor] = None,  # [1, T, HV]
    b: Optional[Tensor] = None,  # [1, T, HV]
    *,
    A_log: Optional[Tensor] = None,    # [HV]
    dt_bias: Optional[Tensor] = None,  # [HV]
    g: Optional[Tensor] = None,        # [1, T, HV]
    beta: Optional[Tensor] = None,     # [1, T, HV]
    cu_seqlens: Tensor,          # [N + 1] int32
    state: Tensor,               # [pool_size, HV, V, K], updated in place
    state_indices: Tensor,       # [N] int32
    has_initial_state: Optional[Tensor] = None,  # [N] bool
    scale: Optional[float] = None,
    use_qk_l2norm: bool = True,
    out: Optional[Tensor] = None,  # [1, T, HV, V]
) -> Tensor:
    """`cute_gdn.prefill` through the registered ops (same arguments); returns o (`out` if given)."""
    return _call(torch.ops.cute_gdn.prefill, torch.ops.cute_gdn.prefill_out,
                 (q, k, v, a, b, A_log, dt_bias, g, beta, cu_seqlens, state, state_indices, has_initial_state, scale,
                  use_qk_l2norm), out)


# --------------------------------------------------------------------------------------------------
# decode


@torch.library.custom_op("cute_gdn::decode", mutates_args=("state",))
def _decode_op(
    q: Tensor,  # [B, 1, H, K] bf16/fp16
    k: Tensor,  # [B, 1, H, K]
    v: Tensor,  # [B, 1, HV, V]
    a: Optional[Tensor],        # [B, 1, HV] raw gate (io dtype), or None with g
    b: Optional[Tensor],        # [B, 1, HV] raw beta logit (io dtype), or None with beta
    A_log: Optional[Tensor],    # [HV] fp32
    dt_bias: Optional[Tensor],  # [HV] fp32 or bf16
    g: Optional[Tensor],        # [B, 1, HV] fp32 (instead of a, A_log, dt_bias)
    beta: Optional[Tensor],     # [B, 1, HV] fp32 (instead of b)
    state: Tensor,              # [pool_size, HV, V, K] fp32 or bf16, updated in place
    state_indices: Tensor,      # [B] int32; < 0 = padding
    scale: Optional[float] = None,
    use_qk_l2norm: bool = True,
) -> Tensor:  # o [B, 1, HV, V] io dtype
    return _decode(q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, scale, use_qk_l2norm, None)


@_decode_op.register_fake
def _(q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, scale=None, use_qk_l2norm=True):
    return torch.empty_like(v)  # as ops.decode allocates o


@torch.library.custom_op("cute_gdn::decode_out", mutates_args=("state", "out"))
def _decode_out_op(
    q: Tensor, k: Tensor, v: Tensor, a: Optional[Tensor], b: Optional[Tensor], A_log: Optional[Tensor],
    dt_bias: Optional[Tensor], g: Optional[Tensor], beta: Optional[Tensor],
    state: Tensor,  # [pool_size, HV, V, K], updated in place
    state_indices: Tensor, scale: Optional[float], use_qk_l2norm: bool,
    out: Tensor,  # [B, 1, HV, V] io dtype, written
) -> None:
    """cute_gdn::decode writing o into `out` (arguments as cute_gdn::decode, all given)."""
    _decode(q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, scale, use_qk_l2norm, out)


@_decode_out_op.register_fake
def _(q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, scale, use_qk_l2norm, out):
    return None


def decode(
    q: Tensor,  # [B, 1, H, K]
    k: Tensor,  # [B, 1, H, K]
    v: Tensor,  # [B, 1, HV, V]
    a: Optional[Tensor] = None,  # [B, 1, HV]
    b: Optional[Tensor] = None,  # [B, 1, HV]
    *,
    A_log: Optional[Tensor] = None,    # [HV]
    dt_bias: Optional[Tensor] = None,  # [HV]
    g: Optional[Tensor] = None,        # [B, 1, HV]
    beta: Optional[Tensor] = None,     # [B, 1, HV]
    state: Tensor,               # [pool_size, HV, V, K], updated in place
    state_indices: Tensor,       # [B] int32
    scale: Optional[float] = None,
    use_qk_l2norm: bool = True,
    out: Optional[Tensor] = None,  # [B, 1, HV, V]
) -> Tensor:
    """`cute_gdn.decode` through the registered ops (same arguments); returns o (`out` if given)."""
    return _call(torch.ops.cute_gdn.decode, torch.ops.cute_gdn.decode_out,
                 (q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, scale, use_qk_l2norm), out)


# --------------------------------------------------------------------------------------------------
# verify


@torch.library.custom_op("cute_gdn::verify", mutates_args=("cache",))
def _verify_op(
    q: Tensor,  # [B, T, H, K] bf16/fp16, 1 <= T <= cache_steps
    k: Tensor,  # [B, T, H, K]
    v: Tensor,  # [B, T, HV, V]
    a: Optional[Tensor],        # [B, T, HV] raw gate (io dtype), or None with g
    b: Optional[Tensor],        # [B, T, HV] raw beta logit (io dtype), or None with beta
    A_log: Optional[Tensor],    # [HV] fp32
    dt_bias: Optional[Tensor],  # [HV] fp32 or bf16
    g: Optional[Tensor],        # [B, T, HV] fp32 (instead of a, A_log, dt_bias)
    beta: Optional[Tensor],     # [B, T, HV] fp32 (instead of b)
    state: Tensor,              # [pool_size, HV, V, K] fp32 or bf16, read only
    state_indices: Tensor,      # [B] int32; < 0 = padding
    cache: Tensor,              # [cache_slots, cache_steps, HV, V, K], written in place
    cache_indices: Optional[Tensor] = None,  # [B] int32; None = arange(B)
    scale: Optional[float] = None,
    use_qk_l2norm: bool = True,
) -> Tensor:  # o [B, T, HV, V] io dtype
    return _verify(q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, cache, cache_indices, scale,
                   use_qk_l2norm, None)


@_verify_op.register_fake
def _(q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, cache, cache_indices=None, scale=None,
      use_qk_l2norm=True):
    return torch.empty_like(v)  # as ops.verify allocates o


@torch.library.custom_op("cute_gdn::verify_out", mutates_args=("cache", "out"))
def _verify_out_op(
    q: Tensor, k: Tensor, v: Tensor, a: Optional[Tensor], b: Optional[Tensor], A_log: Optional[Tensor],
    dt_bias: Optional[Tensor], g: Optional[Tensor], beta: Optional[Tensor], state: Tensor, state_indices: Tensor,
    cache: Tensor,  # [cache_slots, cache_steps, HV, V, K], written in place
    cache_indices: Optional[Tensor], scale: Optional[float], use_qk_l2norm: bool,
    out: Tensor,  # [B, T, HV, V] io dtype, written
) -> None:
    """cute_gdn::verify writing o into `out` (arguments as cute_gdn::verify, all given)."""
    _verify(q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, cache, cache_indices, scale,
            use_qk_l2norm, out)


@_verify_out_op.register_fake
def _(q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, cache, cache_indices, scale, use_qk_l2norm,
      out):
    return None


def verify(
    q: Tensor,  # [B, T, H, K]
    k: Tensor,  # [B, T, H, K]
    v: Tensor,  # [B, T, HV, V]
    a: Optional[Tensor] = None,  # [B, T, HV]
    b: Optional[Tensor] = None,  # [B, T, HV]
    *,
    A_log: Optional[Tensor] = None,    # [HV]
    dt_bias: Optional[Tensor] = None,  # [HV]
    g: Optional[Tensor] = None,        # [B, T, HV]
    beta: Optional[Tensor] = None,     # [B, T, HV]
    state: Tensor,               # [pool_size, HV, V, K], read only
    state_indices: Tensor,       # [B] int32
    cache: Tensor,               # [cache_slots, cache_steps, HV, V, K], written
    cache_indices: Optional[Tensor] = None,  # [B] int32
    scale: Optional[float] = None,
    use_qk_l2norm: bool = True,
    out: Optional[Tensor] = None,  # [B, T, HV, V]
) -> Tensor:
    """`cute_gdn.verify` through the registered ops (same arguments); returns o (`out` if given)."""
    return _call(torch.ops.cute_gdn.verify, torch.ops.cute_gdn.verify_out,
                 (q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, cache, cache_indices, scale,
                  use_qk_l2norm), out)


# --------------------------------------------------------------------------------------------------
# commit


@torch.library.custom_op("cute_gdn::commit", mutates_args=("state",))
def _commit_op(
    state: Tensor,                   # [pool_size, HV, V, K], written in place
    state_indices: Tensor,           # [B] int32; < 0 = padding
    cache: Tensor,                   # [cache_slots, cache_steps, HV, V, K]
    cache_indices: Optional[Tensor],  # [B] int32; None = arange(B)
    accepted_steps: Tensor,          # [B] int32 in [0, cache_steps]; 0 = keep the slot
) -> None:
    surface = _surface
    if surface is None:
        ops.commit(state, state_indices, cache, cache_indices, accepted_steps)
    else:
        surface.commit(state, state_indices, cache, cache_indices, accepted_steps)


@_commit_op.register_fake
def _(state, state_indices, cache, cache_indices, accepted_steps):
    return None


def commit(
    state: Tensor,                   # [pool_size, HV, V, K], written in place
    state_indices: Tensor,           # [B] int32
    cache: Tensor,                   # [cache_slots, cache_steps, HV, V, K]
    cache_indices: Optional[Tensor],  # [B] int32; None = arange(B)
    accepted_steps: Tensor,          # [B] int32
) -> None:
    """`cute_gdn.commit` through the registered op (same arguments)."""
    torch.ops.cute_gdn.commit(state, state_indices, cache, cache_indices, accepted_steps)


# --------------------------------------------------------------------------------------------------
# commit_layers and its LayerTable memo


# (every state's and every cache's address, the first layer's layouts) -> its LayerTable. A table's
# layers all have the first one's shape, strides and dtype (LayerTable checks it when it builds), so the
# other layers' layouts are not read on every call (48 layers: 20 us of keying instead of 88 on the
# 2-core CI machine). Never evicted on its own: a captured CUDA graph may read a table's address arrays
# on any replay.
_TABLES: dict = {}
# id(table) -> (table, the serving surface whose config check it passed); see _commit_layers_op.
_CHECKED: dict = {}
# More tables than any engine has layer sets means the op is handed new tensors on every call (for
# example the copies that a backend without re-inplacing, such as aot_eager, makes): say so once.
_TABLES_WARN = 64
_warned = False
_data_ptr = Tensor.data_ptr


def _tables_key(states: list, caches: list) -> Optional[tuple]:
    if not states or not caches or not isinstance(states[0], Tensor) or not isinstance(caches[0], Tensor):
        return None  # LayerTable raises the error
    s, c = states[0], caches[0]
    return (tuple(map(_data_ptr, states)), tuple(map(_data_ptr, caches)), s.shape, s.stride(), s.dtype, c.shape,
            c.stride(), c.dtype)


def _capturing(t: Tensor) -> bool:
    # is_current_stream_capturing exists only in CUDA builds of torch; a CPU tensor is never captured.
    return isinstance(t, Tensor) and t.is_cuda and torch.cuda.is_current_stream_capturing()


def layer_table(states: Union[Sequence[Tensor], Tensor], caches: Union[Sequence[Tensor], Tensor]) -> "ops.LayerTable":
    """The memoized LayerTable of these per-layer pools [pool_size, HV, V, K] and caches [cache_slots,
    cache_steps, HV, V, K] (sequences, or stacked [L, ...] tensors), built on first use. Call it (or the
    op) once before a CUDA-graph capture that commits these tensors."""
    global _warned
    states = list(states.unbind(0)) if isinstance(states, Tensor) else list(states)
    caches = list(caches.unbind(0)) if isinstance(caches, Tensor) else list(caches)
    key = _tables_key(states, caches)
    table = None if key is None else _TABLES.get(key)
    if table is not None:
        return table
    if states and _capturing(states[0]):
        raise RuntimeError(
            "cute_gdn::commit_layers met state/cache tensors during CUDA-graph capture that it has no LayerTable "
            "for; building one copies their addresses to the GPU, which a capture cannot do. Run the function "
            "once before capturing (or call cute_gdn.torch_ops.layer_table(states, caches)).")
    table = ops.LayerTable(states, caches)
    _TABLES[key] = table
    if len(_TABLES) > _TABLES_WARN and not _warned:
        _warned = True
        warnings.warn(f"cute_gdn::commit_layers holds {len(_TABLES)} LayerTables: it is being given new tensors "
                      f"on most calls, and each table keeps its tensors alive. Pass the same pools and caches "
                      f"each step, or call cute_gdn.torch_ops.clear_layer_tables().", RuntimeWarning, stacklevel=2)
    return table


def clear_layer_tables() -> None:
    """Drop every memoized LayerTable (and the tensors it holds). Only when no CUDA graph that committed
    through them will be replayed: such a graph reads the tables' address arrays."""
    global _warned
    _TABLES.clear()
    _CHECKED.clear()
    _warned = False


@torch.library.custom_op("cute_gdn::commit_layers", mutates_args=("states",))
def _commit_layers_op(
    states: list[Tensor],            # L x [pool_size, HV, V, K], written in place
    caches: list[Tensor],            # L x [cache_slots, cache_steps, HV, V, K]
    state_indices: Tensor,           # [B] int32; < 0 = padding
    cache_indices: Optional[Tensor],  # [B] int32; None = arange(B)
    accepted_steps: Tensor,          # [B] int32 in [0, cache_steps]
) -> None:
    surface = _surface
    table = layer_table(states, caches)
    if surface is None:
        ops.commit_layers(table, state_indices, cache_indices, accepted_steps)
        return
    if _CHECKED.get(id(table), (None, None))[1] is not surface:
        # The memo builds an ops.LayerTable, not GDNKernels.layer_table, so this is that method's check that
        # the pools and caches belong to the surface's config (pool size, heads, dims, dtype, cache_steps). Once
        # per table and surface; a table built before use_kernels (or for another surface) is checked here too.
        surface._check_config(None, table.states[0], table.caches[0])
        _CHECKED[id(table)] = (table, surface)  # the table held, so that its id is not reused
    surface.commit_layers(table, state_indices, cache_indices, accepted_steps)


@_commit_layers_op.register_fake
def _(states, caches, state_indices, cache_indices, accepted_steps):
    return None


def commit_layers(
    states: Union[Sequence[Tensor], Tensor],  # L x [pool_size, HV, V, K] or [L, pool_size, HV, V, K], written
    caches: Union[Sequence[Tensor], Tensor],  # L x [cache_slots, cache_steps, HV, V, K] or stacked
    state_indices: Tensor,           # [B] int32
    cache_indices: Optional[Tensor],  # [B] int32; None = arange(B)
    accepted_steps: Tensor,          # [B] int32
) -> None:
    """`cute_gdn.commit_layers` through the registered op, with the layers' tensors in place of a LayerTable."""
    states = list(states.unbind(0)) if isinstance(states, Tensor) else list(states)
    caches = list(caches.unbind(0)) if isinstance(caches, Tensor) else list(caches)
    torch.ops.cute_gdn.commit_layers(states, caches, state_indices, cache_indices, accepted_steps)


# --------------------------------------------------------------------------------------------------
# replay: verify from a checkpoint and a ring, commit = a cursor move, flush = fold the rings


def _ring(k: Tensor, v: Tensor, d: Tensor, gb: Tensor) -> "replay.ReplayRing":
    return replay.ReplayRing(k, v, d, gb)


def _cursors(pos: Tensor, ring_len: int, max_tokens: int, fold: str) -> "replay.ReplayCursors":
    return replay.ReplayCursors(pos, int(ring_len), int(max_tokens), fold)


def _replay_verify(q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, ring_k, ring_v, ring_d, ring_gb,
                   cursors_pos, ring_len, max_tokens, scale, use_qk_l2norm, out, fold):
    surface = _surface_for(use_qk_l2norm)
    ring, cursors = _ring(ring_k, ring_v, ring_d, ring_gb), _cursors(cursors_pos, ring_len, max_tokens, fold)
    if surface is None:
        return replay.replay_verify(q, k, v, a, b, A_log=A_log, dt_bias=dt_bias, g=g, beta=beta, state=state,
                                    state_indices=state_indices, ring=ring, cursors=cursors, scale=scale,
                                    use_qk_l2norm=use_qk_l2norm, out=out)
    return surface.target_verify(q, k, v, a, b, A_log=A_log, dt_bias=dt_bias, g=g, beta=beta, state=state,
                                 state_indices=state_indices, ring=ring, cursors=cursors, scale=scale, out=out)


@torch.library.custom_op("cute_gdn::replay_verify", mutates_args=("state", "ring_k", "ring_v", "ring_d", "ring_gb"))
def _replay_verify_op(
    q: Tensor,  # [B, T, H, K] bf16/fp16, 1 <= T <= max_tokens
    k: Tensor,  # [B, T, H, K]
    v: Tensor,  # [B, T, HV, V]
    a: Optional[Tensor],        # [B, T, HV] raw gate (io dtype), or None with g
    b: Optional[Tensor],        # [B, T, HV] raw beta logit (io dtype), or None with beta
    A_log: Optional[Tensor],    # [HV] fp32
    dt_bias: Optional[Tensor],  # [HV] fp32 or bf16
    g: Optional[Tensor],        # [B, T, HV] fp32 (instead of a, A_log, dt_bias)
    beta: Optional[Tensor],     # [B, T, HV] fp32 (instead of b)
    state: Tensor,              # [pool_size, HV, V, K] fp32 or bf16: the checkpoints, rewritten by a fold
    state_indices: Tensor,      # [B] int32; < 0 = padding
    ring_k: Tensor,             # [pool_size, H, L, K] io dtype (ReplayRing.k), candidates written
    ring_v: Tensor,             # [pool_size, HV, L, V] io dtype (ReplayRing.v)
    ring_d: Tensor,             # [pool_size, HV, L, V] fp32 (ReplayRing.d)
    ring_gb: Tensor,            # [pool_size, HV, L, 2] fp32 (ReplayRing.gb)
    cursors_pos: Tensor,        # [pool_size, 2] int32 (ReplayCursors.pos), read only
    ring_len: int,              # ReplayCursors.ring_len
    max_tokens: int,            # ReplayCursors.max_tokens
    scale: Optional[float] = None,
    use_qk_l2norm: bool = True,
    fold: str = "exact",        # ReplayCursors.fold: "exact" or "compact"
) -> Tensor:  # o [B, T, HV, V] io dtype
    return _replay_verify(q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, ring_k, ring_v, ring_d,
                          ring_gb, cursors_pos, ring_len, max_tokens, scale, use_qk_l2norm, None, fold)


@_replay_verify_op.register_fake
def _(q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, ring_k, ring_v, ring_d, ring_gb, cursors_pos,
      ring_len, max_tokens, scale=None, use_qk_l2norm=True, fold="exact"):
    return torch.empty_like(v)  # as replay.replay_verify allocates o


@torch.library.custom_op("cute_gdn::replay_verify_out",
                         mutates_args=("state", "ring_k", "ring_v", "ring_d", "ring_gb", "out"))
def _replay_verify_out_op(
    q: Tensor, k: Tensor, v: Tensor, a: Optional[Tensor], b: Optional[Tensor], A_log: Optional[Tensor],
    dt_bias: Optional[Tensor], g: Optional[Tensor], beta: Optional[Tensor],
    state: Tensor,  # [pool_size, HV, V, K], rewritten by a fold
    state_indices: Tensor,
    ring_k: Tensor, ring_v: Tensor, ring_d: Tensor, ring_gb: Tensor,  # the ring, candidates written
    cursors_pos: Tensor, ring_len: int, max_tokens: int, scale: Optional[float], use_qk_l2norm: bool,
    out: Tensor,  # [B, T, HV, V] io dtype, written
    fold: str = "exact",  # ReplayCursors.fold
) -> None:
    """cute_gdn::replay_verify writing o into `out` (arguments as cute_gdn::replay_verify, all given, with fold
    after out: the last place, where an argument with a default leaves the other positions as they were)."""
    _replay_verify(q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, ring_k, ring_v, ring_d, ring_gb,
                   cursors_pos, ring_len, max_tokens, scale, use_qk_l2norm, out, fold)


@_replay_verify_out_op.register_fake
def _(q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, ring_k, ring_v, ring_d, ring_gb, cursors_pos,
      ring_len, max_tokens, scale, use_qk_l2norm, out, fold="exact"):
    return None


def replay_verify(
    q: Tensor,  # [B, T, H, K]
    k: Tensor,  # [B, T, H, K]
    v: Tensor,  # [B, T, HV, V]
    a: Optional[Tensor] = None,  # [B, T, HV]
    b: Optional[Tensor] = None,  # [B, T, HV]
    *,
    A_log: Optional[Tensor] = None,    # [HV]
    dt_bias: Optional[Tensor] = None,  # [HV]
    g: Optional[Tensor] = None,        # [B, T, HV]
    beta: Optional[Tensor] = None,     # [B, T, HV]
    state: Tensor,               # [pool_size, HV, V, K], rewritten by a fold
    state_indices: Tensor,       # [B] int32
    ring: "replay.ReplayRing",
    cursors: "replay.ReplayCursors",
    scale: Optional[float] = None,
    use_qk_l2norm: bool = True,
    out: Optional[Tensor] = None,  # [B, T, HV, V]
) -> Tensor:
    """`cute_gdn.replay_verify` through the registered ops (same arguments); returns o (`out` if given)."""
    args = (q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, ring.k, ring.v, ring.d, ring.gb,
            cursors.pos, cursors.ring_len, cursors.max_tokens, scale, use_qk_l2norm)
    if out is None:
        return torch.ops.cute_gdn.replay_verify(*args, cursors.fold)
    torch.ops.cute_gdn.replay_verify_out(*args, out, cursors.fold)
    return out


@torch.library.custom_op("cute_gdn::replay_commit", mutates_args=("cursors_pos",))
def _replay_commit_op(
    cursors_pos: Tensor,    # [pool_size, 2] int32 (ReplayCursors.pos), moved in place
    ring_len: int,          # ReplayCursors.ring_len
    max_tokens: int,        # ReplayCursors.max_tokens
    state_indices: Tensor,  # [B] int32; < 0 = padding
    num_accepted: Tensor,   # [B] int32 in [0, T]
    fold: str = "exact",    # ReplayCursors.fold (the commit does not depend on it; the config check does)
) -> None:
    cursors = _cursors(cursors_pos, ring_len, max_tokens, fold)
    surface = _surface
    if surface is None:
        replay.replay_commit(cursors, state_indices, num_accepted)
    else:
        surface.replay_commit(cursors, state_indices, num_accepted)


@_replay_commit_op.register_fake
def _(cursors_pos, ring_len, max_tokens, state_indices, num_accepted, fold="exact"):
    return None


def replay_commit(
    cursors: "replay.ReplayCursors",
    state_indices: Tensor,  # [B] int32
    num_accepted: Tensor,   # [B] int32
) -> None:
    """`cute_gdn.replay_commit` through the registered op (same arguments)."""
    torch.ops.cute_gdn.replay_commit(cursors.pos, cursors.ring_len, cursors.max_tokens, state_indices, num_accepted,
                                     cursors.fold)


@torch.library.custom_op("cute_gdn::replay_flush", mutates_args=("states", "cursors_pos"))
def _replay_flush_op(
    states: list[Tensor],   # L x [pool_size, HV, V, K], the named slots folded in place
    ring_k: list[Tensor],   # L x [pool_size, H, L, K] (each layer's ReplayRing.k)
    ring_v: list[Tensor],   # L x [pool_size, HV, L, V]
    ring_d: list[Tensor],   # L x [pool_size, HV, L, V]
    ring_gb: list[Tensor],  # L x [pool_size, HV, L, 2]
    cursors_pos: Tensor,    # [pool_size, 2] int32, the named slots emptied
    ring_len: int,
    max_tokens: int,
    state_indices: Tensor,  # [B] int32; < 0 = padding
    use_qk_l2norm: bool = True,
    fold: str = "exact",    # ReplayCursors.fold (a flush always folds exactly; the config check reads it)
) -> None:
    surface = _surface_for(use_qk_l2norm)
    rings = [_ring(*t) for t in zip(ring_k, ring_v, ring_d, ring_gb)]
    cursors = _cursors(cursors_pos, ring_len, max_tokens, fold)
    if surface is None:
        replay.replay_flush(states, rings, cursors, state_indices, use_qk_l2norm=use_qk_l2norm)
    else:
        surface.replay_flush(states, rings, cursors, state_indices)


@_replay_flush_op.register_fake
def _(states, ring_k, ring_v, ring_d, ring_gb, cursors_pos, ring_len, max_tokens, state_indices, use_qk_l2norm=True,
      fold="exact"):
    return None


def replay_flush(
    states: Union[Sequence[Tensor], Tensor],  # [pool_size, HV, V, K] or a sequence of them (one per layer)
    rings,                                    # the ReplayRing (or sequence of rings) of those layers
    cursors: "replay.ReplayCursors",
    state_indices: Tensor,  # [B] int32
    *,
    use_qk_l2norm: bool = True,
) -> None:
    """`cute_gdn.replay_flush` through the registered op (same arguments; one pool and ring, or sequences)."""
    states = [states] if isinstance(states, Tensor) else list(states)
    rings = [rings] if isinstance(rings, replay.ReplayRing) else list(rings)
    torch.ops.cute_gdn.replay_flush(states, [r.k for r in rings], [r.v for r in rings], [r.d for r in rings],
                                    [r.gb for r in rings], cursors.pos, cursors.ring_len, cursors.max_tokens,
                                    state_indices, use_qk_l2norm, cursors.fold)


__all__ = ["prefill", "decode", "verify", "commit", "commit_layers", "layer_table", "clear_layer_tables",
           "use_kernels", "replay_verify", "replay_commit", "replay_flush"]
