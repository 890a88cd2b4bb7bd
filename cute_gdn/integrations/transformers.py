"""Hugging Face transformers' Qwen3-Next on cute_gdn: the gated delta rule of every GDN layer runs in our kernels.

Usage (a CUDA Hopper GPU, the model in bf16 or fp16, transformers >= 5.17)::

    import torch
    from transformers import AutoModelForCausalLM
    from cute_gdn.integrations.transformers import use_cute_gdn, restore_transformers

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda")
    use_cute_gdn(model)                       # every Qwen3NextGatedDeltaNet layer, in place; returns the model
    out = model.generate(input_ids, max_new_tokens=64, do_sample=False)
    restore_transformers(model)               # back to transformers' own kernels (FLA or its torch fallback)

What is swapped. `use_cute_gdn` gives each `Qwen3NextGatedDeltaNet` an instance-level `forward`. It keeps
transformers' projections (`in_proj_qkvz`, `in_proj_ba`, `fix_query_key_value_ordering`), its padding mask
(`apply_mask_to_padding_states`), its causal conv with the conv cache (the module's `causal_conv1d_fn` /
`causal_conv1d_update`, so the causal-conv1d package is used where transformers uses it), the gated RMS norm
and `out_proj`. Only the delta rule between the conv and the norm changes:
- the repeat_interleave of q/k heads is gone: `H` q/k heads and `HV` v heads go to the kernels (native GVA);
- the raw gates go in (`a`, `b`, `A_log`, `dt_bias`); softplus and sigmoid run in the kernel;
- `use_qk_l2norm=True` and scale `K ** -0.5`, as the model calls FLA / its torch path;
- prefill (a forward with T > 1, or with no cache) is one `cute_gdn.prefill` call per layer for the whole batch:
  the B rows of the batch packed along T with `cu_seqlens = [0, T, 2T, ..., BT]`;
- a cached single-token step (what `generate` does after prefill) is one `cute_gdn.decode` call per layer;
- a cached step with T > 1 (chunked prefill continuation, or a second `generate` call on the same cache)
  is a prefill from the cached state (`has_initial_state` True).

State layout. transformers keeps the recurrent state as `[B, HV, K, V]` (V-last); our pool is K-last
`[pool, HV, V, K]`, its transpose. The cache is given `pool.transpose(-1, -2)` of a contiguous K-last pool: a
`[B, HV, K, V]` view, which `update_recurrent_state` stores as such (its lazy allocation is `zeros_like`,
which keeps the strides). Each later step hands `stored.transpose(-1, -2)`, a contiguous K-last tensor, to the
kernel, which updates it in place: no copy per step. When the stored tensor is not such a view (after beam
search's `reorder_cache`, whose `index_select` returns a V-last tensor, or a state from another backend or of
another dtype), the step copies it to a K-last pool and writes the result back through
`update_recurrent_state`: correct, at two state copies per step.

Pool and kernels: pool = batch. Slot b is batch row b, `state_indices = arange(B)`, and the pool is the
cache's own `[B, HV, V, K]` state. pool_size is compile-time, so each distinct batch size B loads (or, on
first use, compiles, about 10-30 s per kernel on the GPU host) one prefill and two decode kernels (the small-
and large-batch tiles) per (H, HV, K, V, state dtype, io dtype, dt_bias dtype). The free functions
`cute_gdn.prefill` / `cute_gdn.decode` do this on first use; `cute-gdn-precompile --num-heads H --num-v-heads
HV --head-dim 128 --pool-size B` fills the disk cache ahead of time (heads per GPU). The alternative, one large
fixed pool with the batch in its first rows, would need the integration to own the pool beside transformers'
cache; pool = batch keeps transformers' cache the only owner of the state, so beam search, `reset()` and
offloading work on it unchanged.

Gate parameters. `A_log` must be fp32 `[HV]` and `dt_bias` fp32 or bf16: a model cast to bf16 has a bf16
A_log (and an fp16 model an fp16 dt_bias), so such a parameter is converted to fp32 once, exactly (what the
model computes, `A_log.float()`), and the copy is kept until the parameter changes (new storage or an
in-place write).

What it costs, beyond the kernels (bytes per token per GDN layer; Qwen3-Next-80B per GPU at TP 1: H = 16,
HV = 32, K = V = 128, bf16, so C = 2HK + HV V = 8192 channels):
- prefill: the conv output is `[B, C, T]`, so q/k/v (views of its transpose) have stride T on their last dim,
  which the kernels reject; one `.contiguous()` of the transposed `[B, T, C]` makes them unit-stride views:
  2C bytes read and 2C written = 16 KiB + 16 KiB (8192 tokens: 268 MB, ~70 us per layer at 4 TB/s).
  transformers' own path copies more: repeat_interleave writes 2 HV K x 2 = 16 KiB of repeated q/k, and its
  torch fallback converts q/k/v/gates to fp32 copies besides. a and b: one copy of 2 HV x 2 = 128 bytes (they
  are strided or reshaped copies already). The state: one copy into the cache's buffer at the first prefill
  (B HV V K x 4 = 2 MiB per sequence at fp32 state), none when the cache already holds a K-last state;
- decode: none. The conv update's output `[B, C, 1]` transposes to a contiguous `[B, 1, C]`, and the state is
  updated in place in the cache (except in the fallback above: 2 x 2 MiB per sequence per layer);
- a forward with no cache (`use_cache=False`) allocates a scratch `[B, HV, V, K]` state per layer.

Padding. A padded attention mask (left padding in batched generation) is handled as transformers handles it:
`apply_mask_to_padding_states` zeroes the padded rows before the projections, so their q, k and v are zero (the
projections and conv have no bias); with k = 0 a token adds nothing to the state, and left padding precedes
every real token, so the state stays zero through the pads. The kernels get exactly the zeroed inputs the torch
path gets (tested). Right padding gives what transformers gives too (the gates still decay the state there).

Not supported (each raises, naming it):
- backward (`NotImplementedError` when autograd would record what enters the kernels: an input that requires
  grad, or trainable projections (LoRA included), conv, A_log or dt_bias; run under `torch.no_grad()` or
  `torch.inference_mode()`, as `generate` does);
- packed sequences with `cu_seq_lens_q` (transformers' padding-free batches): each distinct sequence count
  would be a new pool size to compile; `NotImplementedError`;
- what the kernels reject: fp32 models with their `TypeError` (q/k/v must be bf16 or fp16); CPU tensors and
  prefill head dims other than K = V = 128 with their `ValueError`.
Untested: `torch.compile` / CUDA graphs of the whole transformers model, offloaded caches, tensor parallelism.
"""

from __future__ import annotations

import contextlib
import inspect
import types
from typing import Optional

import torch
from transformers.integrations.accelerate import force_accelerate_hooks
from transformers.models.qwen3_next import modeling_qwen3_next as modeling

import cute_gdn
from cute_gdn import ops

_STATE_DTYPES = (torch.float32, torch.bfloat16)
_BIAS_DTYPES = (torch.float32, torch.bfloat16)
# The functions transformers' GDN layer calls by module-global name; `torch_reference_path` swaps them back to
# the plain-torch originals that transformers wrapped (FLA / causal-conv1d where those packages import).
_KERNEL_GLOBALS = ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule", "causal_conv1d_fn",
                   "causal_conv1d_update")


def gdn_layers(model: torch.nn.Module) -> list:
    """Every Qwen3NextGatedDeltaNet module of `model`."""
    return [m for m in model.modules() if isinstance(m, modeling.Qwen3NextGatedDeltaNet)]


def use_cute_gdn(model: torch.nn.Module, *, state_dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Runs the delta rule of every Qwen3-Next GDN layer of `model` in cute_gdn's kernels (see the module
    docstring); returns `model`. state_dtype: the recurrent state's dtype in the cache, fp32 (as transformers
    keeps it) or bf16 (half the state's memory and traffic; rounded once per call)."""
    if state_dtype not in _STATE_DTYPES:
        raise TypeError(f"state_dtype must be torch.float32 or torch.bfloat16, got {state_dtype}")
    layers = gdn_layers(model)
    if not layers:
        raise ValueError(f"model has no Qwen3NextGatedDeltaNet layer ({type(model).__name__})")
    for layer in layers:
        layer._cute_gdn_state_dtype = state_dtype
        layer._cute_gdn_params = {}
        layer.forward = types.MethodType(_forward, layer)
    return model


def restore_transformers(model: torch.nn.Module) -> torch.nn.Module:
    """Undoes `use_cute_gdn`: the layers run transformers' own forward again. A cache filled by cute_gdn holds
    `[B, HV, K, V]` views that are not contiguous; transformers' torch path reads them as they are, so start a
    new cache (a new `generate` call does) rather than switch backends in the middle of one."""
    for layer in gdn_layers(model):
        if "forward" in layer.__dict__:
            del layer.forward
        for name in ("_cute_gdn_state_dtype", "_cute_gdn_params"):
            layer.__dict__.pop(name, None)
    return model


def uses_cute_gdn(model: torch.nn.Module) -> bool:
    """Whether `use_cute_gdn` is in effect on every GDN layer of `model`."""
    layers = gdn_layers(model)
    return bool(layers) and all("forward" in layer.__dict__ for layer in layers)


@contextlib.contextmanager
def torch_reference_path():
    """Within the block, transformers' Qwen3-Next GDN layers use transformers' own plain-torch delta rule and
    causal conv (`torch_chunk_gated_delta_rule`, `torch_recurrent_gated_delta_rule`, `causal_conv1d_fn`,
    `causal_conv1d_update`) even where FLA or causal-conv1d are installed. transformers picks its backends when
    `modeling_qwen3_next` is imported: `use_kernel_func_from_hub_with_fallback` imports `fla` (and
    `causal_conv1d`) and wraps the package's function if it imports, else the torch function; the wrapper
    keeps the torch function as `__wrapped__`. For references and comparisons; layers swapped by
    `use_cute_gdn` use these conv functions too."""
    saved = {name: getattr(modeling, name) for name in _KERNEL_GLOBALS}
    try:
        for name, fn in saved.items():
            setattr(modeling, name, inspect.unwrap(fn))
        yield
    finally:
        for name, fn in saved.items():
            setattr(modeling, name, fn)


def transformers_backend() -> str:
    """The module transformers' Qwen3-Next layers take their chunked delta rule from: 'torch' for its own
    fallback, else the package's module (such as 'fla.ops.gated_delta_rule.chunk'); 'unknown' when the
    function is not transformers' usual wrapper (a hub kernel, say)."""
    fn = modeling.torch_chunk_gated_delta_rule
    if inspect.unwrap(fn) is fn and fn.__module__ == modeling.__name__:  # as under torch_reference_path
        return "torch"
    closure = dict(zip(getattr(fn, "__code__", None) and fn.__code__.co_freevars or (), fn.__closure__ or ()))
    if "is_new_implementation" not in closure or "implementation" not in closure:
        return "unknown"
    if not closure["is_new_implementation"].cell_contents:
        return "torch"
    return getattr(closure["implementation"].cell_contents, "__module__", None) or "unknown"


def _gate_param(layer, name: str, allowed: tuple) -> torch.Tensor:  # [HV]
    """layer.<name> as the kernels take it: itself if its dtype is allowed, else an fp32 copy, made once and
    kept until the parameter's storage or version changes."""
    param = getattr(layer, name)
    if param.dtype in allowed and param.is_contiguous():
        return param.detach()
    try:
        version = param._version
    except RuntimeError:  # an inference tensor tracks no version
        version = None
    key = (param.data_ptr(), version, param.dtype, param.device)
    memo = layer._cute_gdn_params.get(name)
    if memo is None or memo[0] != key:
        memo = (key, param.detach().to(torch.float32).contiguous())
        layer._cute_gdn_params[name] = memo
    return memo[1]


def _cached_pool(cache_params, layer_idx: int, shape: tuple, dtype: torch.dtype) -> tuple:
    """The cache's state for this layer as a K-last pool: (pool [B, HV, V, K] or None, in_place). in_place: the
    pool is the cache's own tensor, transposed; otherwise it is a K-last copy (or None: no state stored)."""
    stored = getattr(cache_params.layers[layer_idx], "recurrent_states", {}).get(0)  # [B, HV, K, V]
    if stored is None:
        return None, False
    pool = stored.transpose(-1, -2)
    if tuple(pool.shape) != shape:
        raise ValueError(f"the cache's recurrent state for layer {layer_idx} is {list(stored.shape)}, expected "
                         f"[B, HV, K, V] = {[shape[0], shape[1], shape[3], shape[2]]}")
    if pool.dtype == dtype and pool.is_contiguous() and pool.data_ptr() % 16 == 0:
        return pool, True
    return pool.to(dtype, memory_format=torch.contiguous_format, copy=True), False


def _forward(self, hidden_states: torch.Tensor, cache_params=None, attention_mask: Optional[torch.Tensor] = None,
             **kwargs) -> torch.Tensor:
    """Qwen3NextGatedDeltaNet.forward with the delta rule in cute_gdn (module docstring).
    hidden_states [B, T, hidden]; attention_mask [B, T] (padding) or None; returns [B, T, hidden]."""
    if kwargs.get("cu_seq_lens_q") is not None:
        raise NotImplementedError("cu_seq_lens_q: packed (padding-free) sequences are not supported by the cute_gdn "
                                  "integration; pass a padded batch with an attention mask")
    hidden_states = modeling.apply_mask_to_padding_states(hidden_states, attention_mask)
    B, T = hidden_states.shape[:2]
    H, HV, K, V = self.num_k_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim
    cached = cache_params is not None and cache_params.has_previous_state(self.layer_idx)

    query, key, value, z, b, a = self.fix_query_key_value_ordering(self.in_proj_qkvz(hidden_states),
                                                                   self.in_proj_ba(hidden_states))
    # Checked here, after the projections (which write nothing) and before the conv updates its cache: their
    # outputs require grad when the input does or when a projection is trainable (LoRA adapters included).
    if torch.is_grad_enabled() and _records_grad(self, query, key, value, b, a):
        raise NotImplementedError("cute_gdn's kernels have no backward: run under torch.no_grad() or "
                                  "torch.inference_mode(), freeze the GDN layers' projections, conv, A_log and "
                                  "dt_bias, or call restore_transformers(model) to train")
    mixed_qkv = torch.cat([x.reshape(B, T, -1) for x in (query, key, value)], dim=-1).transpose(1, 2)  # [B, C, T]
    mixed_qkv = _causal_conv(self, mixed_qkv, cache_params, cached, T, kwargs)  # [B, C, T]
    # The conv's [B, C, T] output transposed has stride T on the channels; one copy makes every head a
    # unit-stride row (a no-op at T = 1). Cost: module docstring.
    mixed_qkv = mixed_qkv.transpose(1, 2).contiguous()  # [B, T, C]

    state_shape = (B, HV, V, K)
    state_dtype = self._cute_gdn_state_dtype
    A_log = _gate_param(self, "A_log", (torch.float32,))
    dt_bias = _gate_param(self, "dt_bias", _BIAS_DTYPES)
    pool, in_place = (None, False)
    if cache_params is not None and self.layer_idx < len(cache_params.layers):
        # Before the first prefill a reused cache (after reset()) may already hold a K-last state to write into.
        pool, in_place = _cached_pool(cache_params, self.layer_idx, state_shape, state_dtype)
    has_state = cached and pool is not None
    if pool is None:
        # A decode step reads its state: zeros where none is stored, as transformers' initial_state=None.
        pool = (torch.zeros if cached and T == 1 else torch.empty)(state_shape, dtype=state_dtype,
                                                                  device=hidden_states.device)
    # pool = batch: slot b is batch row b. The shared arange memo: no allocation per step, capture-safe.
    slots = ops.IDENTITY_INDICES.get(B, hidden_states.device)  # [B] int32

    if cached and T == 1:
        q, k, v = _split_heads(mixed_qkv, H, HV, K, V)  # [B, 1, H, K], [B, 1, H, K], [B, 1, HV, V]
        core = cute_gdn.decode(q, k, v, _unit_stride(a), _unit_stride(b), A_log=A_log, dt_bias=dt_bias,
                               state=pool, state_indices=slots, use_qk_l2norm=True)  # [B, 1, HV, V]
    else:
        # The B rows packed along T: [1, B T, ...] views of the contiguous [B, T, C], sequence b at rows bT..bT+T.
        q, k, v = _split_heads(mixed_qkv.view(1, B * T, -1), H, HV, K, V)
        cu_seqlens = torch.arange(B + 1, dtype=torch.int32, device=hidden_states.device) * T
        initial = None if has_state else torch.zeros(B, dtype=torch.bool, device=hidden_states.device)
        core = cute_gdn.prefill(q, k, v, _unit_stride(a.reshape(1, B * T, HV)), _unit_stride(b.reshape(1, B * T, HV)),
                                A_log=A_log, dt_bias=dt_bias, cu_seqlens=cu_seqlens, state=pool,
                                state_indices=slots, has_initial_state=initial, use_qk_l2norm=True)  # [1, BT, HV, V]
    if cache_params is not None and not in_place:
        # Stores the [B, HV, K, V] view; on its first call the cache allocates a tensor of the same (K-last)
        # strides, so later steps run in place.
        cache_params.update_recurrent_state(pool.transpose(-1, -2), self.layer_idx)

    core = self.norm(core.reshape(-1, V), z.reshape(-1, V))  # [B T HV, V]
    return self.out_proj(core.reshape(B, T, HV * V))


_forward = force_accelerate_hooks("conv1d")(_forward)


def _causal_conv(self, mixed_qkv: torch.Tensor, cache_params, cached: bool, T: int, kwargs: dict) -> torch.Tensor:
    """transformers' causal conv step, with its conv cache: the fused single-token update on a cached decode
    step, else the conv over the cached context and the new tokens. mixed_qkv [B, C, T] -> [B, C, T]."""
    weight = self.conv1d.weight.squeeze(1)  # [C, kernel]
    if cached and T == 1 and not cache_params.layers[self.layer_idx].record_past:
        conv_state = cache_params.layers[self.layer_idx].conv_states[0]  # [B, C, kernel], updated in place
        return modeling.causal_conv1d_update(mixed_qkv, conv_state, weight, self.conv1d.bias, self.activation)
    if cache_params is not None:
        mixed_qkv = cache_params.update_conv_state(mixed_qkv, self.layer_idx, conv_kernel_size=self.conv_kernel_size)
    out = modeling.causal_conv1d_fn(mixed_qkv, weight, self.conv1d.bias, activation=self.activation, **kwargs)
    return out if cache_params is None else out[:, :, -T:]


def _records_grad(self, *inputs: torch.Tensor) -> bool:
    """Whether autograd would record something that enters the kernels: the projections' outputs `inputs`, the
    conv's parameters or the gate parameters. The kernels' outputs carry no grad_fn, so a gradient through any of
    them would be dropped without an error. (z, the norm and out_proj run in torch and keep their gradients.)"""
    return (any(x.requires_grad for x in inputs) or self.A_log.requires_grad or self.dt_bias.requires_grad
            or any(p.requires_grad for p in self.conv1d.parameters()))


def _split_heads(mixed: torch.Tensor, H: int, HV: int, K: int, V: int) -> tuple:
    """q, k, v as head views of mixed [B, T, 2 H K + HV V] (unit stride on the last dim)."""
    q, k, v = torch.split(mixed, [H * K, H * K, HV * V], dim=-1)
    return q.unflatten(-1, (H, K)), k.unflatten(-1, (H, K)), v.unflatten(-1, (HV, V))


def _unit_stride(x: torch.Tensor) -> torch.Tensor:  # [..., HV]
    # At GVA 1, fix_query_key_value_ordering's a and b are every other column of the [.., 2 HV] projection.
    return x if x.stride(-1) == 1 else x.contiguous()
