"""Public ops: validate, allocate outputs, look up the compiled kernel, call it.

Validation is in two tiers so that an eager call costs a few microseconds of host time:
- the compiled tvm-ffi function checks every tensor argument in C before it launches (device,
  dtype, rank, static dims, the shared batch dim, strides, contiguity, 16-byte alignment);
- the Python checks (`_checks`) run in full the first time a call signature is seen and again
  whenever the tvm-ffi function rejects a call, so the error that reaches the caller is a
  ValueError/TypeError naming the public argument. Either way nothing is written before it.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, NamedTuple, Optional, Sequence

import torch

from . import _checks as chk
from .cache import KernelCache, KernelKey, default_cache
from .op_checks import (debug_commit, one_gate_set, signature_gates, validate_commit, validate_commit_batch,  # noqa: F401 (public)
                        validate_decode, validate_prefill, validate_tokens, validate_verify)
from .kernels import commit as commit_kernel
from .kernels import decode as decode_kernel
from .kernels import prefill as prefill_kernel
from .kernels import replay as replay_kernel
from .kernels import replay_cursor as replay_cursor_kernel
from .kernels import verify as verify_kernel
from .kernels.commit import CommitConfig
from .kernels.decode import LARGE_BATCH_HEADS, DecodeConfig
from .kernels.prefill import PrefillPlan, plan_prefill  # noqa: F401 (public: ops.plan_prefill)
from .prefill_launch import launch_prefill, prefill_cp_workspace, prefill_workspace  # noqa: F401 (public)
from .kernels.verify import LARGE_BATCH_HEADS as VERIFY_LARGE_BATCH_HEADS
from .kernels.verify import MAX_TOKENS, VerifyConfig  # noqa: F401 (public: ops.MAX_TOKENS)


def decode_key(*, io_dtype: str, state_dtype: str, num_heads: int, num_v_heads: int, head_k_dim: int,
               head_v_dim: int, pool_size: int, gate_mode: str, dt_bias_dtype: Optional[str],
               use_qk_l2norm: bool, config: Optional[DecodeConfig] = None, large_batch: bool = False) -> KernelKey:
    """The key of one decode kernel; without `config`, the heuristic tile for small or large batches."""
    return KernelKey.make(
        "decode", io_dtype=io_dtype, state_dtype=state_dtype, num_heads=num_heads,
        num_v_heads=num_v_heads, head_k_dim=head_k_dim, head_v_dim=head_v_dim, pool_size=pool_size,
        gate_mode=gate_mode, dt_bias_dtype=dt_bias_dtype, use_qk_l2norm=bool(use_qk_l2norm),
        config=config or DecodeConfig.heuristic(head_k_dim, head_v_dim, state_dtype, large_batch))


def decode_keys(**kwargs) -> tuple[KernelKey, KernelKey]:
    """The (small-batch, large-batch) kernel pair one decode call signature dispatches between;
    the two keys are equal where a head dim admits only one tile."""
    return decode_key(**kwargs, large_batch=False), decode_key(**kwargs, large_batch=True)


def verify_key(*, io_dtype: str, state_dtype: str, num_heads: int, num_v_heads: int, head_k_dim: int,
               head_v_dim: int, pool_size: int, num_tokens: int, cache_steps: int, gate_mode: str,
               dt_bias_dtype: Optional[str], use_qk_l2norm: bool, config: Optional[VerifyConfig] = None,
               large_batch: bool = False) -> KernelKey:
    """The key of one verify kernel (T = num_tokens tokens per sequence); without `config`, the heuristic
    tile for small or large batches."""
    return KernelKey.make(
        "verify", io_dtype=io_dtype, state_dtype=state_dtype, num_heads=num_heads, num_v_heads=num_v_heads,
        head_k_dim=head_k_dim, head_v_dim=head_v_dim, pool_size=pool_size, num_tokens=num_tokens,
        cache_steps=cache_steps, gate_mode=gate_mode, dt_bias_dtype=dt_bias_dtype, use_qk_l2norm=bool(use_qk_l2norm),
        config=config or VerifyConfig.heuristic(head_k_dim, head_v_dim, state_dtype, large_batch))


def verify_keys(**kwargs) -> tuple[KernelKey, KernelKey]:
    """The (small-batch, large-batch) kernel pair one verify call signature dispatches between."""
    return verify_key(**kwargs, large_batch=False), verify_key(**kwargs, large_batch=True)


def commit_key(*, state_dtype: str, num_v_heads: int, head_k_dim: int, head_v_dim: int, pool_size: int,
               cache_steps: int, layers: str = "tensor", config: Optional[CommitConfig] = None) -> KernelKey:
    """The key of one commit kernel: one layer's tensors (layers="tensor") or a LayerTable ("table")."""
    return KernelKey.make(
        "commit", state_dtype=state_dtype, num_v_heads=num_v_heads, head_k_dim=head_k_dim, head_v_dim=head_v_dim,
        pool_size=pool_size, cache_steps=cache_steps, layers=layers,
        config=config or CommitConfig.heuristic(head_k_dim, head_v_dim, state_dtype))


def prefill_key(*, io_dtype: str, state_dtype: str, num_heads: int, num_v_heads: int, head_k_dim: int,
                head_v_dim: int, pool_size: int, gate_mode: str, dt_bias_dtype: Optional[str],
                use_qk_l2norm: bool) -> KernelKey:
    """The key of one prefill kernel."""
    return KernelKey.make(
        "prefill", io_dtype=io_dtype, state_dtype=state_dtype, num_heads=num_heads, num_v_heads=num_v_heads,
        head_k_dim=head_k_dim, head_v_dim=head_v_dim, pool_size=pool_size, gate_mode=gate_mode,
        dt_bias_dtype=dt_bias_dtype, use_qk_l2norm=bool(use_qk_l2norm))


_CAN_IMPLEMENT = {"decode": decode_kernel.can_implement, "verify": verify_kernel.can_implement,
                  "commit": commit_kernel.can_implement, "prefill": prefill_kernel.can_implement,
                  "replay": replay_kernel.can_implement, "replay_cursor": replay_cursor_kernel.can_implement_cursor}


def can_implement_key(key: KernelKey) -> None:
    """The kernel's can_implement, turned into a ValueError."""
    fn = _CAN_IMPLEMENT[key.op]
    params = inspect.signature(fn).parameters
    reason = fn(**{name: value for name, value in key.params if name in params})
    if reason is not None:
        raise ValueError(f"unsupported {key.op} configuration: {reason}")


class OpPath(NamedTuple):
    """How one op goes from a call to its launch (run_op): its checks, its hot-path signature, its kernels'
    load and its launch. Every function takes the op's arguments as run_op got them."""
    validate: Callable   # (*args) -> what load needs; every check, raising under the argument's public name
    signature: Callable  # (*args) -> (signature, batch), from attributes alone; raises on a missing attribute
    load: Callable       # (kcache, allow_compile, check_config, args, validated) -> the entry to memoize
    launch: Callable     # (entry, *args) -> the op's result
    debug: Callable      # (*args) -> None: CUTE_GDN_DEBUG's checks of the values on the device


def run_op(op: OpPath, kcache: KernelCache, allow_compile: bool, check_config: Optional[Callable], args: tuple):
    """The one path of every op: (1) the call signature from the arguments' dtypes and dims (a failure there
    is a bad argument, which the full checks raise under its name); (2) the kernels memoized under it, loaded
    (or compiled, where allowed) after the full checks and the config check on a miss or an oversized batch;
    (3) under CUTE_GDN_DEBUG the full and the on-device checks; (4) the launch, whose ValueError/TypeError
    (the compiled function's own checks) the full checks re-raise under the argument's name. Nothing is
    written before (4). decode writes the same path out (decode_entry)."""
    try:
        sig, batch = op.signature(*args)
    except (AttributeError, ValueError, TypeError):
        op.validate(*args)
        raise
    entry = kcache.by_signature.get(sig)
    if entry is None or batch > chk.MAX_BATCH:
        entry = op.load(kcache, allow_compile, check_config, args, op.validate(*args))
        kcache.by_signature[sig] = entry
    if chk.DEBUG:
        op.validate(*args)
        op.debug(*args)
    try:
        return op.launch(entry, *args)
    except (ValueError, TypeError):
        op.validate(*args)
        raise


def decode_entry(kcache_of: Callable[[], KernelCache], allow_compile: Callable[[], bool],
                  check_config: Optional[Callable]) -> Callable:
    """A `decode` bound to a kernel cache: kcache_of() gives it, allow_compile() says whether a missing kernel
    may be compiled and check_config(q, state) checks that the tensors belong to a config (both on the slow
    path only). The public `cute_gdn.decode` is one (the default cache, compiling allowed); GDNKernels builds
    its own. An eager decode at B = 1 is bound by host time, so the public op is the implementation itself,
    not a wrapper around it (a wrapper frame measured 0.1-0.3 us of about 10 on an H200 host): it is
    run_op(DECODE, ...) written out, with DECODE's checks, load and debug on its slow path (the CPU tests hold
    the two to the same launches)."""

    def decode(
        q: torch.Tensor,  # [B, 1, H, K] bf16/fp16
        k: torch.Tensor,  # [B, 1, H, K]
        v: torch.Tensor,  # [B, 1, HV, V]
        a: Optional[torch.Tensor] = None,  # [B, 1, HV] raw gate (io dtype)
        b: Optional[torch.Tensor] = None,  # [B, 1, HV] raw beta logit (io dtype)
        *,
        A_log: Optional[torch.Tensor] = None,    # [HV] fp32
        dt_bias: Optional[torch.Tensor] = None,  # [HV] fp32 or bf16
        g: Optional[torch.Tensor] = None,        # [B, 1, HV] fp32, log-space decay (instead of a, A_log, dt_bias)
        beta: Optional[torch.Tensor] = None,     # [B, 1, HV] fp32, after the sigmoid (instead of b)
        state: torch.Tensor,          # [pool_size, HV, V, K] fp32 or bf16, updated in place
        state_indices: torch.Tensor,  # [B] int32; < 0 = padding
        scale: Optional[float] = None,
        use_qk_l2norm: bool = True,
        out: Optional[torch.Tensor] = None,  # [B, 1, HV, V] io dtype
    ) -> torch.Tensor:
        # The hot path builds nothing it does not launch with: the argument tuple for the checks is only
        # built where a check runs, and the one-gate-set test is one_gate_set written out.
        raw = g is None
        if raw != (beta is None) or raw == (a is None) or raw == (b is None) or raw == (A_log is None) \
                or raw == (dt_bias is None):
            validate_decode(q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, out)  # raises
        try:
            B, _, H, K = q.shape
            _, _, HV, V = v.shape
            sig = ("decode", q.dtype, state.dtype, H, K, HV, V, state.shape[0], dt_bias.dtype if raw else None,
                   bool(use_qk_l2norm), q.get_device() == state.get_device())
        except (AttributeError, ValueError, TypeError):
            validate_decode(q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, out)
            raise
        entry = kcache_of().by_signature.get(sig)  # (large-batch threshold in B * HV, small kernel, large kernel)
        if entry is None or B > chk.MAX_BATCH or chk.DEBUG:
            # Off the hot path: run_op's own steps (2) and (3).
            args = (q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, scale, use_qk_l2norm, out)
            if entry is None or B > chk.MAX_BATCH:
                entry = DECODE.load(kcache_of(), allow_compile(), check_config, args, DECODE.validate(*args))
                kcache_of().by_signature[sig] = entry
            if chk.DEBUG:
                DECODE.validate(*args)
                DECODE.debug(*args)
        if out is None:
            out = torch.empty_like(v)  # [B, 1, HV, V]; cheaper than new_empty on the hot path
        if B == 0:
            return out
        if scale is None:
            scale = K ** -0.5
        threshold, small, large = entry
        fn = large if B * HV >= threshold else small
        try:
            if raw:
                fn(q, k, v, a, b, A_log, dt_bias, state, state_indices, out, scale)
            else:
                fn(q, k, v, g, beta, None, None, state, state_indices, out, scale)
        except (ValueError, TypeError):
            # raises the error under the argument's public name
            validate_decode(q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, out)
            raise
        return out

    return decode


def _decode_validate(q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, scale, use_qk_l2norm, out):
    return validate_decode(q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, out)


def _decode_signature(q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, scale, use_qk_l2norm, out):
    raw = signature_gates(a, b, A_log, dt_bias, g, beta)
    B, _, H, K = q.shape
    _, _, HV, V = v.shape
    return ("decode", q.dtype, state.dtype, H, K, HV, V, state.shape[0], dt_bias.dtype if raw else None,
            bool(use_qk_l2norm), q.get_device() == state.get_device()), B


def _decode_load(kcache, allow_compile, check_config, args, validated):
    """Both tiles of the call's key: (large-batch threshold in B * HV, small kernel, large kernel)."""
    q, v, state, use_qk_l2norm = args[0], args[2], args[9], args[12]
    mode, bias_dtype = validated
    if check_config is not None:
        check_config(q, state)
    keys = decode_keys(io_dtype=chk.IO_DTYPES[q.dtype], state_dtype=chk.STATE_DTYPES[state.dtype],
                       num_heads=q.shape[2], num_v_heads=v.shape[2], head_k_dim=q.shape[3],
                       head_v_dim=v.shape[3], pool_size=state.shape[0], gate_mode=mode,
                       dt_bias_dtype=bias_dtype, use_qk_l2norm=use_qk_l2norm)
    small, large = load_kernels(kcache, keys, allow_compile)
    return (LARGE_BATCH_HEADS[chk.STATE_DTYPES[state.dtype]], small, large)


def token_launch(entry, q, v, scale, out):
    """What a token op's launch (decode, verify, replay_verify) needs besides its tensors: the output (`out`,
    or a fresh one like v), the kernel of the entry's two tiles for this batch (None for B = 0: nothing to
    launch) and the scale (K ** -0.5 by default)."""
    if out is None:
        out = torch.empty_like(v)  # cheaper than new_empty on the hot path
    B = q.shape[0]
    if B == 0:
        return out, None, scale
    threshold, small, large = entry
    return out, (large if B * v.shape[2] >= threshold else small), (q.shape[3] ** -0.5 if scale is None else scale)


def _decode_launch(entry, q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, scale, use_qk_l2norm, out):
    out, fn, scale = token_launch(entry, q, v, scale, out)
    if fn is None:
        return out
    if g is None:
        fn(q, k, v, a, b, A_log, dt_bias, state, state_indices, out, scale)
    else:
        fn(q, k, v, g, beta, None, None, state, state_indices, out, scale)
    return out


def _decode_debug(q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, scale, use_qk_l2norm, out):
    chk.debug_indices("state_indices", state_indices, state.shape[0])


DECODE = OpPath(_decode_validate, _decode_signature, _decode_load, _decode_launch, _decode_debug)


def load_kernels(cache: KernelCache, keys: Sequence[KernelKey], allow_compile: bool) -> list:
    """Check, (compile,) load: the loaded functions of `keys`."""
    for key in keys:
        can_implement_key(key)
    if allow_compile:
        cache.compile(keys, jobs=2)
    return [cache.get(key, allow_compile=allow_compile) for key in keys]


class DeviceVectors:
    """A constant vector per device, built by make(n, device), memoized and grown as needed; get(n)
    returns its first n entries. Tensors are never freed (a captured CUDA graph may hold one), and
    none is created for the memo during a capture (it would hold no data until the first replay)."""

    def __init__(self, make: Callable[[int, torch.device], torch.Tensor], capturing=None):
        self._make = make
        self._capturing = capturing or torch.cuda.is_current_stream_capturing
        self._by_device: dict[torch.device, torch.Tensor] = {}
        self._keep: list[torch.Tensor] = []

    def get(self, n: int, device: torch.device) -> torch.Tensor:
        vec = self._by_device.get(device)
        if vec is None or vec.shape[0] < n:
            if self._capturing():
                return self._make(n, device)
            vec = self._make(max(n, 256), device)
            self._by_device[device] = vec
            self._keep.append(vec)
        return vec[:n]


# cache_indices=None means arange(B); prefill's has_initial_state=None means all True (int8 ones).
IDENTITY_INDICES = DeviceVectors(lambda n, device: torch.arange(n, dtype=torch.int32, device=device))
_ALL_TRUE = DeviceVectors(lambda n, device: torch.ones(n, dtype=torch.int8, device=device))


def _verify_validate(q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, cache, cache_indices, scale,
                     use_qk_l2norm, out):
    return validate_verify(q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, cache, cache_indices, out)


def _verify_signature(q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, cache, cache_indices, scale,
                      use_qk_l2norm, out):
    raw = signature_gates(a, b, A_log, dt_bias, g, beta)
    B, T, H, K = q.shape
    _, _, HV, V = v.shape
    return ("verify", q.dtype, state.dtype, H, K, T, HV, V, state.shape[0], cache.shape[1],
            dt_bias.dtype if raw else None, bool(use_qk_l2norm), q.get_device() == state.get_device()), B


def _verify_load(kcache, allow_compile, check_config, args, validated):
    """Both tiles of the call's key: (large-batch threshold in B * HV, small kernel, large kernel)."""
    q, v, state, cache, use_qk_l2norm = args[0], args[2], args[9], args[11], args[14]
    mode, bias_dtype = validated
    if check_config is not None:
        check_config(q, state, cache)
    _, T, H, K = q.shape
    keys = verify_keys(io_dtype=chk.IO_DTYPES[q.dtype], state_dtype=chk.STATE_DTYPES[state.dtype], num_heads=H,
                       num_v_heads=v.shape[2], head_k_dim=K, head_v_dim=v.shape[3], pool_size=state.shape[0],
                       num_tokens=T, cache_steps=cache.shape[1], gate_mode=mode, dt_bias_dtype=bias_dtype,
                       use_qk_l2norm=use_qk_l2norm)
    small, large = load_kernels(kcache, keys, allow_compile)
    return (VERIFY_LARGE_BATCH_HEADS[chk.STATE_DTYPES[state.dtype]], small, large)


def _verify_launch(entry, q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, cache, cache_indices, scale,
                   use_qk_l2norm, out):
    out, fn, scale = token_launch(entry, q, v, scale, out)
    if fn is None:
        return out
    if cache_indices is None:
        cache_indices = IDENTITY_INDICES.get(q.shape[0], q.device)
    if g is None:
        fn(q, k, v, a, b, A_log, dt_bias, state, state_indices, cache, cache_indices, out, scale)
    else:
        fn(q, k, v, g, beta, None, None, state, state_indices, cache, cache_indices, out, scale)
    return out


def _verify_debug(q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices, cache, cache_indices, scale,
                  use_qk_l2norm, out):
    chk.debug_indices("state_indices", state_indices, state.shape[0])
    if cache_indices is not None:
        live = cache_indices[state_indices >= 0]
        if bool((live < 0).any()):
            raise ValueError("cache_indices has a negative entry for a sequence whose state index is not")
        chk.debug_indices("cache_indices", live, cache.shape[0])


VERIFY = OpPath(_verify_validate, _verify_signature, _verify_load, _verify_launch, _verify_debug)


def verify_using(
    kcache: KernelCache, allow_compile: bool, check_config: Optional[Callable],
    q: torch.Tensor,  # [B, T, H, K] bf16/fp16, 1 <= T <= cache_steps
    k: torch.Tensor,  # [B, T, H, K]
    v: torch.Tensor,  # [B, T, HV, V]
    a: Optional[torch.Tensor],  # [B, T, HV] raw gate (io dtype)
    b: Optional[torch.Tensor],  # [B, T, HV] raw beta logit (io dtype)
    A_log: Optional[torch.Tensor],    # [HV] fp32
    dt_bias: Optional[torch.Tensor],  # [HV] fp32 or bf16
    g: Optional[torch.Tensor],        # [B, T, HV] fp32 (instead of a, A_log, dt_bias)
    beta: Optional[torch.Tensor],     # [B, T, HV] fp32 (instead of b)
    state: torch.Tensor,          # [pool_size, HV, V, K] fp32 or bf16, read only
    state_indices: torch.Tensor,  # [B] int32; < 0 = padding
    cache: torch.Tensor,          # [cache_slots, cache_steps, HV, V, K], the state's dtype
    cache_indices: Optional[torch.Tensor],  # [B] int32; None = arange(B)
    scale: Optional[float],
    use_qk_l2norm: bool,
    out: Optional[torch.Tensor],  # [B, T, HV, V] io dtype
) -> torch.Tensor:
    """`verify` with the kernel cache `kcache` (see decode_entry)."""
    return run_op(VERIFY, kcache, allow_compile, check_config, (q, k, v, a, b, A_log, dt_bias, g, beta, state,
                                                                state_indices, cache, cache_indices, scale,
                                                                use_qk_l2norm, out))


def _commit_signature(state, state_indices, cache, cache_indices, accepted_steps):
    pool, HV, V, K = state.shape
    return ("commit", state.dtype, HV, V, K, pool, cache.shape[1], state.get_device() == cache.get_device()), \
        state_indices.shape[0]


def _commit_load(kcache, allow_compile, check_config, args, validated):
    state, cache = args[0], args[2]
    if check_config is not None:
        check_config(None, state, cache)
    pool, HV, V, K = state.shape
    key = commit_key(state_dtype=chk.STATE_DTYPES[state.dtype], num_v_heads=HV, head_k_dim=K, head_v_dim=V,
                     pool_size=pool, cache_steps=cache.shape[1])
    fn, = load_kernels(kcache, [key], allow_compile)
    return fn


def _commit_launch(fn, state, state_indices, cache, cache_indices, accepted_steps):
    B = state_indices.shape[0]
    if B == 0:
        return
    if cache_indices is None:
        cache_indices = IDENTITY_INDICES.get(B, state.device)
    fn(state, state_indices, cache, cache_indices, accepted_steps)


def _commit_debug(state, state_indices, cache, cache_indices, accepted_steps):
    debug_commit(state_indices, cache_indices, accepted_steps, state.shape[0], cache.shape[0], cache.shape[1])


COMMIT = OpPath(validate_commit, _commit_signature, _commit_load, _commit_launch, _commit_debug)


def commit_using(
    kcache: KernelCache, allow_compile: bool, check_config: Optional[Callable],
    state: torch.Tensor,          # [pool_size, HV, V, K], written in place
    state_indices: torch.Tensor,  # [B] int32; < 0 = padding
    cache: torch.Tensor,          # [cache_slots, cache_steps, HV, V, K]
    cache_indices: Optional[torch.Tensor],  # [B] int32; None = arange(B)
    accepted_steps: torch.Tensor,  # [B] int32 in [0, cache_steps]; 0 = keep the slot as it is
) -> None:
    """`commit` with the kernel cache `kcache` (see decode_entry)."""
    run_op(COMMIT, kcache, allow_compile, check_config, (state, state_indices, cache, cache_indices, accepted_steps))


class LayerTable:
    """Many layers' state pools and verify caches, for `commit_layers` (one launch for all layers).

    states: a sequence of per-layer pools [pool_size, HV, V, K] or one stacked tensor [L, pool_size, HV, V,
    K]; caches likewise ([cache_slots, cache_steps, HV, V, K] per layer). Every layer has the same shapes,
    dtype and device. Built once (it copies L base addresses to the GPU, so build it before CUDA-graph
    capture); it holds references to the tensors, so the addresses stay valid while it lives.
    """

    def __init__(self, states, caches):
        self.states = list(states.unbind(0)) if isinstance(states, torch.Tensor) else list(states)
        self.caches = list(caches.unbind(0)) if isinstance(caches, torch.Tensor) else list(caches)
        if not self.states:
            raise ValueError("states must hold at least one layer")
        if len(self.caches) != len(self.states):
            raise ValueError(f"caches must hold one tensor per layer: {len(self.states)} states, "
                             f"{len(self.caches)} caches")
        first = self.states[0]
        chk.tensor("states[0]", first, 4, tuple(chk.STATE_DTYPES))
        if first.device.type != "cuda":
            raise ValueError(f"states must be on a CUDA device, got {first.device}")
        for i, (state, cache) in enumerate(zip(self.states, self.caches)):
            chk.tensor(f"states[{i}]", state, 4, (first.dtype,), first.device)
            chk.shape(f"states[{i}]", state, tuple(first.shape))
            chk.state_pool(f"states[{i}]", state, *first.shape[1:], first.device)
            chk.cache(f"caches[{i}]", cache, state)
            chk.shape(f"caches[{i}]", cache, tuple(self.caches[0].shape))
        self.dtype = first.dtype
        self.device = first.device
        self.pool_size, self.num_v_heads, self.head_v_dim, self.head_k_dim = first.shape
        self.cache_slots, self.cache_steps = self.caches[0].shape[:2]
        self.state_ptrs = torch.tensor([t.data_ptr() for t in self.states], dtype=torch.int64, device=self.device)
        self.cache_ptrs = torch.tensor([t.data_ptr() for t in self.caches], dtype=torch.int64, device=self.device)

    def __len__(self) -> int:
        return len(self.states)


def _layers_validate(layers, state_indices, cache_indices, accepted_steps):
    if not isinstance(layers, LayerTable):
        raise TypeError(f"layers must be a cute_gdn.LayerTable, got {type(layers).__name__}")
    chk.tensor("state_indices", state_indices, 1, (torch.int32,), layers.device)
    validate_commit_batch(state_indices, cache_indices, accepted_steps, layers.device)


def _layers_signature(layers, state_indices, cache_indices, accepted_steps):
    if not isinstance(layers, LayerTable):
        raise TypeError("layers")  # (validate raises the full message)
    # (The pools were checked when the table was built; the batch's tensors are checked by the kernel's own
    # checks, on a miss, or where the kernel refuses them.)
    return ("commit_layers", layers.dtype, layers.num_v_heads, layers.head_v_dim, layers.head_k_dim,
            layers.pool_size, layers.cache_steps), state_indices.shape[0]


def _layers_load(kcache, allow_compile, check_config, args, validated):
    layers = args[0]
    key = commit_key(state_dtype=chk.STATE_DTYPES[layers.dtype], num_v_heads=layers.num_v_heads,
                     head_k_dim=layers.head_k_dim, head_v_dim=layers.head_v_dim, pool_size=layers.pool_size,
                     cache_steps=layers.cache_steps, layers="table")
    fn, = load_kernels(kcache, [key], allow_compile)
    return fn


def _layers_launch(fn, layers, state_indices, cache_indices, accepted_steps):
    B = state_indices.shape[0]
    if B == 0:
        return
    if cache_indices is None:
        cache_indices = IDENTITY_INDICES.get(B, layers.device)
    fn(layers.state_ptrs, state_indices, layers.cache_ptrs, cache_indices, accepted_steps)


def _layers_debug(layers, state_indices, cache_indices, accepted_steps):
    debug_commit(state_indices, cache_indices, accepted_steps, layers.pool_size, layers.cache_slots,
                  layers.cache_steps)


COMMIT_LAYERS = OpPath(_layers_validate, _layers_signature, _layers_load, _layers_launch, _layers_debug)


def commit_layers_using(
    kcache: KernelCache, allow_compile: bool,
    layers: LayerTable,
    state_indices: torch.Tensor,   # [B] int32; < 0 = padding
    cache_indices: Optional[torch.Tensor],  # [B] int32; None = arange(B)
    accepted_steps: torch.Tensor,  # [B] int32 in [0, cache_steps]
) -> None:
    """`commit_layers` with the kernel cache `kcache` (see decode_entry)."""
    run_op(COMMIT_LAYERS, kcache, allow_compile, None, (layers, state_indices, cache_indices, accepted_steps))


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """The SMs of a CUDA device (what plan_prefill is given for it)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def _prefill_validate(q, k, v, a, b, A_log, dt_bias, g, beta, cu_seqlens, state, state_indices, has_initial_state,
                      scale, use_qk_l2norm, out, plan):
    return validate_prefill(q, k, v, a, b, A_log, dt_bias, g, beta, cu_seqlens, state, state_indices,
                            has_initial_state, out)


def _prefill_signature(q, k, v, a, b, A_log, dt_bias, g, beta, cu_seqlens, state, state_indices, has_initial_state,
                       scale, use_qk_l2norm, out, plan):
    raw = signature_gates(a, b, A_log, dt_bias, g, beta)
    _, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    return ("prefill", q.dtype, state.dtype, H, K, HV, V, state.shape[0], dt_bias.dtype if raw else None,
            bool(use_qk_l2norm), q.get_device() == state.get_device()), cu_seqlens.shape[0] - 1


def _prefill_load(kcache, allow_compile, check_config, args, validated):
    q, v, state, use_qk_l2norm = args[0], args[2], args[10], args[14]
    mode, bias_dtype = validated
    if check_config is not None:
        check_config(q, state)
    key = prefill_key(io_dtype=chk.IO_DTYPES[q.dtype], state_dtype=chk.STATE_DTYPES[state.dtype],
                      num_heads=q.shape[2], num_v_heads=v.shape[2], head_k_dim=q.shape[3], head_v_dim=v.shape[3],
                      pool_size=state.shape[0], gate_mode=mode, dt_bias_dtype=bias_dtype, use_qk_l2norm=use_qk_l2norm)
    fn, = load_kernels(kcache, [key], allow_compile)
    return fn


def _prefill_launch(fn, q, k, v, a, b, A_log, dt_bias, g, beta, cu_seqlens, state, state_indices, has_initial_state,
                    scale, use_qk_l2norm, out, plan):
    if out is None:
        out = torch.empty_like(v)
    _, T, _, K = q.shape
    N = cu_seqlens.shape[0] - 1
    if N == 0:
        return out
    if scale is None:
        scale = K ** -0.5
    if plan is None:
        plan = plan_prefill(N, T, v.shape[2], K, v.shape[3], sm_count(q.device))
    else:
        prefill_kernel.check_plan(plan, N, T)
    init = _ALL_TRUE.get(N, q.device) if has_initial_state is None else has_initial_state.view(torch.int8)
    gates = (a, b, A_log, dt_bias) if g is None else (g, beta, None, None)
    launch_prefill(fn, (q, k, v, *gates, cu_seqlens, state, state_indices, init, out), scale, plan, T, N)
    return out


def _prefill_debug(q, k, v, a, b, A_log, dt_bias, g, beta, cu_seqlens, state, state_indices, has_initial_state,
                   scale, use_qk_l2norm, out, plan):
    chk.debug_indices("state_indices", state_indices, state.shape[0])
    T = q.shape[1]
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != T or any(x > y for x, y in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to T={T}, got {bounds}")


PREFILL = OpPath(_prefill_validate, _prefill_signature, _prefill_load, _prefill_launch, _prefill_debug)


def prefill_using(
    kcache: KernelCache, allow_compile: bool, check_config: Optional[Callable],
    q: torch.Tensor,  # [1, T, H, K] bf16/fp16: the N sequences packed along T
    k: torch.Tensor,  # [1, T, H, K]
    v: torch.Tensor,  # [1, T, HV, V]
    a: Optional[torch.Tensor],  # [1, T, HV] raw gate (io dtype)
    b: Optional[torch.Tensor],  # [1, T, HV] raw beta logit (io dtype)
    A_log: Optional[torch.Tensor],    # [HV] fp32
    dt_bias: Optional[torch.Tensor],  # [HV] fp32 or bf16
    g: Optional[torch.Tensor],        # [1, T, HV] fp32 (instead of a, A_log, dt_bias)
    beta: Optional[torch.Tensor],     # [1, T, HV] fp32 (instead of b)
    cu_seqlens: torch.Tensor,     # [N + 1] int32
    state: torch.Tensor,          # [pool_size, HV, V, K] fp32 or bf16, updated in place
    state_indices: torch.Tensor,  # [N] int32; < 0 = padding
    has_initial_state: Optional[torch.Tensor],  # [N] bool; None = all True
    scale: Optional[float],
    use_qk_l2norm: bool,
    out: Optional[torch.Tensor],  # [1, T, HV, V] io dtype
    plan: Optional[PrefillPlan] = None,
) -> torch.Tensor:
    """`prefill` with the kernel cache `kcache` (see decode_entry)."""
    return run_op(PREFILL, kcache, allow_compile, check_config, (q, k, v, a, b, A_log, dt_bias, g, beta, cu_seqlens,
                                                                 state, state_indices, has_initial_state, scale,
                                                                 use_qk_l2norm, out, plan))


# ---------------------------------------------------------------------------------------------------
# The public ops. Each is a thin wrapper over its private form, which the serving surface (GDNKernels)
# calls with its own kernel cache. See README.md "Tensor conventions" and docs/spec.md for the math.

_ERRORS = """
    Raises:
        TypeError / ValueError naming the argument (dtype, shape, device, stride, alignment, not exactly
        one gate set, an unsupported shape with the reason), always before anything is written.
        KernelCompileError (names the kernel and carries the compiler's message) if a compile fails.

    See README.md ("Conventions") and docs/spec.md for the math and the layouts.
    """


decode = decode_entry(default_cache, lambda: True, None)
decode.__doc__ = """One decode step of the gated delta rule for B sequences, in place on the state pool.

    Sequence b reads and writes `state[state_indices[b]]` (K-last [HV, V, K]); value head h uses q/k head
    h // (HV // H) (GVA). q, k, v may be strided views (e.g. torch.split of a packed projection): unit
    stride on the last dim, and q/k 16-byte aligned with strides that are multiples of 8 elements.

    Gates, exactly one set:
        raw: a, b [B, 1, HV] in the io dtype, A_log fp32 [HV], dt_bias fp32 or bf16 [HV]; the kernel
            computes g = -exp(A_log) * softplus(a + dt_bias) and beta = sigmoid(b).
        precomputed: g (natural-log decay) and beta (after the sigmoid), fp32 [B, 1, HV].
    scale defaults to K ** -0.5; use_qk_l2norm L2-normalizes q and k in the kernel.

    Padding: a row with state_indices[b] < 0 reads and writes no state and gets zeros in o. Slots the
    call does not name are left bit-identical.

    Returns:
        o [B, 1, HV, V] in the io dtype (`out` if given).

    The kernel is compiled on first use of a call signature (in a worker process, then cached on disk;
    see `cute-gdn-precompile`); a warmed-up `GDNKernels` never compiles.
    """


def verify(
    q: torch.Tensor,  # [B, T, H, K] bf16/fp16, 1 <= T <= cache_steps
    k: torch.Tensor,  # [B, T, H, K]
    v: torch.Tensor,  # [B, T, HV, V]
    a: Optional[torch.Tensor] = None,  # [B, T, HV] raw gate (io dtype)
    b: Optional[torch.Tensor] = None,  # [B, T, HV] raw beta logit (io dtype)
    *,
    A_log: Optional[torch.Tensor] = None,    # [HV] fp32
    dt_bias: Optional[torch.Tensor] = None,  # [HV] fp32 or bf16
    g: Optional[torch.Tensor] = None,        # [B, T, HV] fp32 (instead of a, A_log, dt_bias)
    beta: Optional[torch.Tensor] = None,     # [B, T, HV] fp32 (instead of b)
    state: torch.Tensor,          # [pool_size, HV, V, K] fp32 or bf16, read only
    state_indices: torch.Tensor,  # [B] int32; < 0 = padding
    cache: torch.Tensor,          # [cache_slots, cache_steps, HV, V, K], the state's dtype
    cache_indices: Optional[torch.Tensor] = None,  # [B] int32; None = arange(B)
    scale: Optional[float] = None,
    use_qk_l2norm: bool = True,
    out: Optional[torch.Tensor] = None,  # [B, T, HV, V] io dtype
) -> torch.Tensor:
    """Speculative (MTP) verify of T draft tokens per sequence, every intermediate state cached.

    Sequence b starts from `state[state_indices[b]]`, which is only read; the state after its token t
    goes to `cache[cache_indices[b], t]` for t < T (other steps and slots are not written). T is
    1..cache_steps <= 16; `commit` then adopts the accepted step. Layouts, GVA, strided views, gates
    (raw a, b, A_log, dt_bias or precomputed g, beta, shaped [B, T, HV]) and scale as in `decode`.

    Padding: a row with state_indices[b] < 0 reads no state, writes no cache and gets zeros in o.

    Returns:
        o [B, T, HV, V] in the io dtype (`out` if given).
    """
    return verify_using(default_cache(), True, None, q, k, v, a, b, A_log, dt_bias, g, beta, state, state_indices,
                   cache, cache_indices, scale, use_qk_l2norm, out)


def commit(
    state: torch.Tensor,          # [pool_size, HV, V, K], written in place
    state_indices: torch.Tensor,  # [B] int32; < 0 = padding
    cache: torch.Tensor,          # [cache_slots, cache_steps, HV, V, K]
    cache_indices: Optional[torch.Tensor],  # [B] int32; None = arange(B)
    accepted_steps: torch.Tensor,  # [B] int32 in [0, cache_steps]; 0 = keep the slot as it is
) -> None:
    """Adopt the accepted verify step: state[state_indices[b]] = cache[cache_indices[b], accepted_steps[b] - 1].

    accepted_steps[b] = 0 leaves the slot as it is (the state before the verified tokens); a padding row
    (index < 0) copies nothing. One launch for the batch; `commit_layers` does every layer in one launch.
    Returns None.
    """
    commit_using(default_cache(), True, None, state, state_indices, cache, cache_indices, accepted_steps)


def commit_layers(
    layers: LayerTable,
    state_indices: torch.Tensor,   # [B] int32; < 0 = padding
    cache_indices: Optional[torch.Tensor],  # [B] int32; None = arange(B)
    accepted_steps: torch.Tensor,  # [B] int32 in [0, cache_steps]
) -> None:
    """`commit` of the same batch in every layer of `layers` (a LayerTable, built once before CUDA-graph
    capture), in one launch. Returns None.
    """
    commit_layers_using(default_cache(), True, layers, state_indices, cache_indices, accepted_steps)


def prefill(
    q: torch.Tensor,  # [1, T, H, K] bf16/fp16: the N sequences packed along T
    k: torch.Tensor,  # [1, T, H, K]
    v: torch.Tensor,  # [1, T, HV, V]
    a: Optional[torch.Tensor] = None,  # [1, T, HV] raw gate (io dtype)
    b: Optional[torch.Tensor] = None,  # [1, T, HV] raw beta logit (io dtype)
    *,
    A_log: Optional[torch.Tensor] = None,    # [HV] fp32
    dt_bias: Optional[torch.Tensor] = None,  # [HV] fp32 or bf16
    g: Optional[torch.Tensor] = None,        # [1, T, HV] fp32 (instead of a, A_log, dt_bias)
    beta: Optional[torch.Tensor] = None,     # [1, T, HV] fp32 (instead of b)
    cu_seqlens: torch.Tensor,     # [N + 1] int32
    state: torch.Tensor,          # [pool_size, HV, V, K] fp32 or bf16, updated in place
    state_indices: torch.Tensor,  # [N] int32; < 0 = padding
    has_initial_state: Optional[torch.Tensor] = None,  # [N] bool; None = all True
    scale: Optional[float] = None,
    use_qk_l2norm: bool = True,
    out: Optional[torch.Tensor] = None,  # [1, T, HV, V] io dtype
    plan: Optional[PrefillPlan] = None,
) -> torch.Tensor:
    """Chunked varlen prefill ("extend") of N sequences packed along T, on wgmma tensor cores.

    Sequence n holds tokens cu_seqlens[n]:cu_seqlens[n + 1] (cu_seqlens int32 [N + 1], rising from 0 to
    T; lengths 0 and 1 and any length are fine). It starts from state[state_indices[n]], or from zeros
    where has_initial_state[n] is False (bool [N]; None = all True), and writes its final state back to
    that slot. Head dims K = V = 128 only (others raise ValueError with the reason). q, k, v and out are
    read/written with 16-byte vectors: 16-byte aligned, strides multiples of 8 elements, unit last stride.
    Gates (raw a, b, A_log, dt_bias or precomputed g, beta, shaped [1, T, HV]) and scale as in `decode`.

    Padding: a sequence with state_indices[n] < 0 reads and writes no state and gets zeros in o.

    plan: which kernels run (chain kind, overlap, context-parallel pieces); None = plan_prefill(N, T, HV, K, V,
    sm_count(device)), what the call should run. Tests and benchmarks pass their own to force a path
    (`plan_prefill(..., context_parallel=False)`, `plan._replace(overlap=False)`); a plan the kernels cannot
    run raises ValueError.

    Returns:
        o [1, T, HV, V] in the io dtype (`out` if given).
    """
    return prefill_using(default_cache(), True, None, q, k, v, a, b, A_log, dt_bias, g, beta, cu_seqlens, state,
                    state_indices, has_initial_state, scale, use_qk_l2norm, out, plan)


for _op in (decode, verify, commit, commit_layers, prefill):
    _op.__doc__ += _ERRORS
