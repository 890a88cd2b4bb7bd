"""cute_gdn behind SGLang 0.5.23's linear-attention kernel interface (`LinearAttnKernelBase`).

`CuteGDNKernel` is one engine config (per-rank heads, head dims, state pool size as SGLang allocates it
(`ssm_states.shape[0]`, the mamba pool size + 1), draft tokens, state and io dtype) wrapped around a
`cute_gdn.GDNKernels`. It implements `decode`, `extend` and `target_verify` with SGLang's argument
names and layouts, so it can take the place of `TritonGDNKernel` in SGLang's `GDNKernelDispatcher`:

    kernel = CuteGDNKernel.from_model_runner(model_runner)     # or CuteGDNKernel(H, HV, K, V, pool_size=...)
    install(model_runner.attn_backend.linear_attn_backend.kernel_dispatcher, kernel)

`GDNKernelDispatcher.__init__` hard-codes its kernel classes per backend name, so `install` swaps the
dispatcher's `decode_kernel` / `extend_kernel` / `verify_kernel` after SGLang built it. It must run
before SGLang captures its CUDA graphs: `register_sglang_hook()` (called from an SGLang general plugin,
see docs/sglang.md) does it right after `ModelRunner.init_attention_backends`, in every scheduler
process, for every GDN dispatcher of the runner (`install_into_runner`).

Warmup: the constructor warms up by default (`warmup=True`), so an instance is ready to serve and
never compiles afterwards (GDNKernels raises KernelNotCompiledError for anything outside the warmed
set). With `warmup=False` every call raises RuntimeError until `warmup()` ran, so a kernel can never be
compiled in the middle of serving.

Semantics, against SGLang's Triton kernels (`fused_sigmoid_gating_delta_rule_update`,
`chunk_gated_delta_rule`):
- decode: q/k/v `[1, B, H|HV, K|V]` (views of a split `mixed_qkv`) are passed as `[B, 1, ...]` views,
  a/b `[B, HV]` as `[B, 1, HV]` views; the output is a fresh contiguous `[1, B, HV, V]`, as Triton
  returns it. One token per sequence: `query_start_loc` must have B + 1 entries; its values are not
  read (SGLang's are arange(B + 1), or, under CUDA-graph padding, rows whose slot is -1).
- extend: the precomputed gates of `fused_gdn_gating` (g and beta, both fp32 `[1, T, HV]`: nothing is
  converted; other dtypes are converted with one elementwise kernel each) with
  `cu_seqlens=query_start_loc`. Every sequence starts from its pool slot, as Triton's chunk kernel does
  (it never consults `extend_prefix_lens`: SGLang zeroes a slot when it hands it to a new request), so
  has_initial_state is None (all True) and `extend_prefix_lens` is not read. `output=` is written when
  given. Returns `(o, None, None)`: no per-chunk states h (Triton returns them for SGLang's mamba
  prefix-cache tracking, which is therefore not supported: `install_into_runner`, and `install` given
  `model_runner=`, refuse extend for a runner with the mamba extra buffer).
- target_verify: chain verify only. `[1, N*T, ...]` becomes `[N, T, ...]` views (T = `cache_steps`,
  the draft tokens of this step, <= the config's cache_steps). The dense layout (sequence i holds tokens
  i*T .. i*T + T - 1) is assumed, as SGLang's own GDN verify assumes it: only the token count
  (q holds N*T tokens, N = len(query_start_loc) - 1) is checked, the values of query_start_loc are not
  read (that would cost a device sync). SGLang's compact ragged verify (SGLANG_RAGGED_VERIFY_MODE=compact)
  is refused at install time instead; `intermediate_states_buffer`
  `[slots, cache_steps, HV, V, K]` is the verify cache and `intermediate_state_indices[:N]` its
  indices; the pool is only read.
- padding (an index < 0): its state is neither read nor written, as in Triton; cute_gdn writes zeros
  to its output rows (Triton writes the output of a zero state, or nothing) and writes no verify cache
  for it (Triton caches the steps from a zero state; SGLang's commit skips such rows).
- indices: SGLang 0.5.23 passes int32 everywhere (`req_index_to_mamba_index_mapping`, the CUDA-graph
  `state_indices_list`, the unified pool's translate, `build_verify_intermediate_state_indices`), which
  is what the kernels take, so nothing is converted; another dtype raises TypeError.
- Anything else is refused with NotImplementedError naming the argument: tree verify
  (`retrieve_parent_token`), `inplace_update=False`, state checkpoints, `track_state`, ragged verify
  (a token count other than N * cache_steps; compact ragged verify mode at install), ReplaySSM (the
  mamba pool's flags, at construction from a runner and at install), a non-contiguous
  (envelope-strided) pool, extend with head dims cute_gdn's prefill rejects, dt_bias / A_log dtypes
  outside the warmed set (at construction from a runner), unknown keyword arguments that request
  something (not None / False / 0).

Replay (`spec_mode="replay"`, CUTE_GDN_SGLANG_SPEC=replay for the hook): cute_gdn's replay protocol in
place of SGLang's GDN spec ring (--enable-linear-replayssm-spec, with --disable-radix-cache and no mamba
extra buffer). SGLang reaches that ring through no kernel interface, so `install_replay` replaces the GDN
backend's `_replayssm_target_verify` (instance attribute), routes the ring's two commit kernels of this
pool to `replay_commit` and wraps `req_to_token_pool.alloc` to reset the cursors of fresh slots; see
docs/sglang.md for the exact places. `replay_fold="compact"` (CUTE_GDN_SGLANG_REPLAY_FOLD=compact for the
hook) folds full rings with the faster compact fold instead of the exact one.

Logging: `install` logs (logger "cute_gdn.integrations.sglang", INFO) the kernels each dispatcher
runs after a successful install.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Iterable, Optional

import torch

from .. import replay as replay_ops
from ..serving import DEFAULT_RING_LEN, SPEC_MODES, GDNKernels

try:
    from sglang.srt.layers.attention.linear.kernels.kernel_backend import LinearAttnKernelBase
except ImportError as exc:  # the module is useless without the interface it implements
    raise ImportError("cute_gdn.integrations.sglang needs SGLang (0.5.23) to be importable: "
                      "sglang.srt.layers.attention.linear.kernels.kernel_backend failed to import "
                      f"({exc})") from exc

logger = logging.getLogger("cute_gdn.integrations.sglang")

from .sglang_checks import (ALL_MODES, DISPATCHER_ATTRS, DT_BIAS_DTYPES, MODES, REPLAYSSM_FLAGS,  # noqa: F401
                            _check_dispatcher, _check_modes, _check_ragged_verify, _check_replayssm, _check_runner,
                            _reject_unknown, _requested, _split_tokens)


class CuteGDNKernel(LinearAttnKernelBase):
    """cute_gdn's decode, prefill ("extend") and chain verify for one SGLang GDN config.

    num_heads / num_v_heads / head_k_dim / head_v_dim: per rank (after tensor parallelism).
    pool_size: `ssm_states.shape[0]` as SGLang allocates it (mamba pool size + 1), compile-time.
    cache_steps: the speculative draft tokens per request (`intermediate_states_buffer.shape[1]`, or
    `--speculative-num-draft-tokens`); 0 = no speculative decoding (target_verify then raises
    NotImplementedError).
    spec_mode: "cached" (SGLang's per-draft states, dispatcher.target_verify) or "replay" (cute_gdn's
    replay protocol in place of SGLang's GDN spec ring, --enable-linear-replayssm-spec: the kernel owns
    one ReplayRing per GDN layer and one ReplayCursors for all of them, `allocate_replay`; its
    `replay_target_verify` replaces GDNAttnBackend._replayssm_target_verify and its `replay_commit`
    SGLang's cursor commit, see install_replay). ring_len: records per slot (replay only). replay_fold:
    how the replay verify folds a full ring, "exact" (bit-identical to verify + commit) or "compact"
    (faster, the same state rounded differently; GDNKernels, replay.make_replay_cursors); replay only.
    """

    # The dispatcher's packed fast path (mixed_qkv straight into one Triton kernel) is Triton's own.
    supports_packed_decode: bool = False
    # verify reads q/k/v as strided views of the split mixed_qkv (unit last stride, 16-byte aligned
    # q/k with strides that are multiples of 8 elements: true for every split of 128-wide heads), so
    # SGLang may skip its fused copy into contiguous q/k/v.
    supports_strided_target_verify_qkv: bool = True
    uses_state_checkpoints: bool = False
    supports_fused_chain_verify: bool = False
    supports_track_state_snapshot: bool = False

    def __init__(self, num_heads: int, num_v_heads: int, head_k_dim: int, head_v_dim: int, *, pool_size: int,
                 cache_steps: int = 0, state_dtype: torch.dtype = torch.float32,
                 io_dtype: torch.dtype = torch.bfloat16, device="cuda",
                 cache_dir: Optional[str | os.PathLike] = None, warmup: bool = True, jobs: Optional[int] = None,
                 spec_mode: str = "cached", ring_len: int = DEFAULT_RING_LEN, replay_fold: str = "exact"):
        self.kernels = GDNKernels(num_heads, num_v_heads, head_k_dim, head_v_dim, pool_size=pool_size,
                                  cache_steps=cache_steps, state_dtype=state_dtype, io_dtype=io_dtype,
                                  use_qk_l2norm=True, device=device, cache_dir=cache_dir, spec_mode=spec_mode,
                                  ring_len=ring_len, replay_fold=replay_fold)
        self.spec_mode, self.ring_len, self.replay_fold = spec_mode, self.kernels.ring_len, self.kernels.replay_fold
        # Replay: layer_id -> that layer's ReplayRing, and the cursors every layer shares (allocate_replay).
        self.rings: dict[int, replay_ops.ReplayRing] = {}
        self.cursors: Optional[replay_ops.ReplayCursors] = None
        self.num_heads, self.num_v_heads = num_heads, num_v_heads
        self.head_k_dim, self.head_v_dim = head_k_dim, head_v_dim
        self.pool_size, self.cache_steps = pool_size, cache_steps
        self.state_dtype, self.io_dtype = state_dtype, io_dtype
        # The library decides which head dims its prefill takes (today K = V = 128).
        self.supports_prefill = any(key.op == "prefill" for key in self.kernels.keys)
        self.supports_target_verify = cache_steps > 0
        if warmup:
            self.warmup(jobs)

    @classmethod
    def from_model_runner(cls, model_runner, **kwargs) -> "CuteGDNKernel":
        """The config of a built SGLang ModelRunner: heads and head dims from its GDN layers
        (RadixLinearAttention), pool size, state dtype and draft tokens from its mamba pool, io dtype
        from the model. kwargs go to the constructor (device, cache_dir, warmup, jobs, spec_mode, ring_len,
        replay_fold).
        With spec_mode="replay" the draft tokens come from server_args.speculative_num_draft_tokens
        (SGLang's spec ring allocates no per-draft states) and the rings and cursors are allocated on the
        pool's device, one ring per GDN layer (by layer_id)."""
        spec_mode = kwargs.get("spec_mode", "cached")
        if spec_mode not in SPEC_MODES:
            raise ValueError(f"spec_mode must be one of {list(SPEC_MODES)}, got {spec_mode!r}")
        # Found by class name (through the MRO): importing sglang.srt.layers.radix_linear_attention
        # would import the model executor, which a running server has anyway and a test does not.
        layers = [m for m in model_runner.model.modules()
                  if any(c.__name__ == "RadixLinearAttention" for c in type(m).__mro__)]
        if not layers:
            raise ValueError("model_runner.model has no RadixLinearAttention (GDN) layer")
        shapes = {(m.num_q_heads, m.num_k_heads, m.num_v_heads, m.head_q_dim, m.head_k_dim, m.head_v_dim)
                  for m in layers}
        if len(shapes) != 1:
            raise NotImplementedError(f"GDN layers of several shapes: {sorted(shapes)}")
        Hq, H, HV, Kq, K, V = shapes.pop()
        if (Hq, Kq) != (H, K):
            raise NotImplementedError(f"q heads ({Hq} x {Kq}) differ from k heads ({H} x {K})")
        # SGLang creates dt_bias in the default dtype (the model's: an fp16 model has an fp16 dt_bias) and
        # A_log in fp32; the warmed set holds raw gates with an fp32 or bf16 dt_bias and an fp32 A_log,
        # so anything else would raise KernelNotCompiledError at the first decode.
        for name, allowed in (("dt_bias", DT_BIAS_DTYPES), ("A_log", (torch.float32,))):
            dtypes = {getattr(m, name).dtype for m in layers if getattr(m, name, None) is not None}
            bad = sorted(str(d) for d in dtypes if d not in allowed)
            if bad:
                raise NotImplementedError(f"{name} in {', '.join(bad)} (RadixLinearAttention.{name}): cute_gdn's "
                                          f"raw-gate kernels take {name} in "
                                          f"{' or '.join(str(d) for d in allowed)}")
        mamba_pool = model_runner.req_to_token_pool.mamba_pool
        _check_replayssm(mamba_pool, spec_mode)
        cache = mamba_pool.mamba_cache
        temporal = cache.temporal  # [layers, pool_size, HV, V, K]
        if tuple(temporal.shape[2:]) != (HV, V, K):
            raise ValueError(f"mamba_cache.temporal {list(temporal.shape)} does not hold [HV={HV}, V={V}, K={K}] "
                             f"states")
        if not temporal[0].is_contiguous():
            raise NotImplementedError("ssm_states: a non-contiguous (envelope-strided, page-major or unified "
                                      "memory) mamba pool")
        if spec_mode == "replay":
            cache_steps = int(getattr(getattr(model_runner, "server_args", None), "speculative_num_draft_tokens",
                                      None) or 0)
        else:
            intermediate = getattr(cache, "intermediate_ssm", None)  # [layers, slots, draft tokens, HV, V, K]
            cache_steps = int(intermediate.shape[2]) if intermediate is not None else 0
        kernel = cls(H, HV, K, V, pool_size=int(temporal.shape[1]), cache_steps=cache_steps,
                     state_dtype=temporal.dtype, io_dtype=model_runner.dtype, **kwargs)
        if spec_mode == "replay":
            kernel.allocate_replay(sorted(int(m.layer_id) for m in layers), device=temporal.device)
        return kernel

    def allocate_replay(self, layer_ids: Iterable[int], device=None) -> None:
        """Zeroed rings for these GDN layers (by SGLang's layer_id; GDNKernels.ring_bytes per slot and
        layer) and one set of cursors for all of them (replay only)."""
        if self.spec_mode != "replay":
            raise ValueError("allocate_replay: this CuteGDNKernel was built with spec_mode='cached'")
        self.rings = {int(i): self.kernels.make_ring(device) for i in layer_ids}
        self.cursors = self.kernels.make_cursors(device)

    def warmup(self, jobs: Optional[int] = None) -> "CuteGDNKernel":
        """Load (compiling what the disk cache lacks) every kernel of the config; idempotent."""
        if not self.kernels.warm:
            self.kernels.warmup(jobs)
        return self

    def __repr__(self) -> str:
        return (f"CuteGDNKernel(H={self.num_heads}, HV={self.num_v_heads}, K={self.head_k_dim}, "
                f"V={self.head_v_dim}, pool_size={self.pool_size}, cache_steps={self.cache_steps}, "
                + (f"spec_mode=replay, ring_len={self.ring_len}, replay_fold={self.replay_fold}, "
                   if self.spec_mode == "replay" else "") +
                f"state={self.state_dtype}, io={self.io_dtype}, warm={self.kernels.warm})")

    # ---- checks shared by the modes (attribute reads only: they run on every eager call) ----

    def _check_pool(self, ssm_states: torch.Tensor) -> None:
        if not ssm_states.is_contiguous():
            raise NotImplementedError("ssm_states: a non-contiguous (envelope-strided) state pool; cute_gdn "
                                      "needs a contiguous [pool_size, HV, V, K] pool")
        if ssm_states.shape[0] != self.pool_size:
            raise ValueError(f"ssm_states has {ssm_states.shape[0]} slots but this CuteGDNKernel was built "
                             f"with pool_size={self.pool_size} (ssm_states.shape[0] as SGLang allocates it)")

    @staticmethod
    def _check_indices(name: str, idx: torch.Tensor, count: int, exact: bool = False) -> torch.Tensor:
        """The first `count` entries of an int32 index vector, as a contiguous view; `exact`: it must
        have exactly `count` entries (one per sequence) rather than at least `count` (SGLang's padded
        tables)."""
        if idx.dtype != torch.int32:
            raise TypeError(f"{name} must be int32 (as SGLang passes it), got {idx.dtype}")
        if idx.dim() != 1 or idx.shape[0] < count or (exact and idx.shape[0] != count):
            raise ValueError(f"{name} must be 1-D with {'exactly' if exact else 'at least'} {count} entries "
                             f"(one per sequence), got shape {list(idx.shape)}")
        return idx if idx.shape[0] == count else idx[:count]

    def _require_warm(self) -> None:
        if not self.kernels.warm:
            raise RuntimeError("CuteGDNKernel.warmup() has not run: it never compiles while serving "
                               "(build it with warmup=True, or call warmup() before serving)")

    # ---- the three modes ----

    def decode(
        self,
        q: torch.Tensor,  # [1, B, H, K] (a view of the split mixed_qkv)
        k: torch.Tensor,  # [1, B, H, K]
        v: torch.Tensor,  # [1, B, HV, V]
        a: torch.Tensor,  # [B, HV] raw gate
        b: torch.Tensor,  # [B, HV] raw beta logit
        *,
        A_log: torch.Tensor,            # [HV] fp32
        dt_bias: torch.Tensor,          # [HV] fp32 or bf16
        ssm_states: torch.Tensor,       # [pool_size, HV, V, K], updated in place
        cache_indices: torch.Tensor,    # [B] int32, < 0 = padding
        query_start_loc: torch.Tensor,  # [B + 1] int32 (one token per sequence)
        **kwargs,
    ) -> torch.Tensor:                  # [1, B, HV, V] io dtype
        _reject_unknown("decode", kwargs)
        if q.dim() != 4 or q.shape[0] != 1:
            raise ValueError(f"q must be [1, B, H, K], got {list(q.shape)}")
        B = q.shape[1]
        if query_start_loc.shape[0] != B + 1:
            raise NotImplementedError(f"query_start_loc with {query_start_loc.shape[0]} entries for B={B} "
                                      "tokens: decode takes one token per sequence")
        self._check_pool(ssm_states)
        slots = self._check_indices("cache_indices", cache_indices, B)
        self._require_warm()
        out = v.new_empty(1, B, self.num_v_heads, self.head_v_dim)
        self.kernels.decode(_split_tokens(q[0], B, 1), _split_tokens(k[0], B, 1), _split_tokens(v[0], B, 1),
                            _split_tokens(a, B, 1), _split_tokens(b, B, 1), A_log=A_log, dt_bias=dt_bias,
                            state=ssm_states, state_indices=slots, out=_split_tokens(out[0], B, 1))
        return out

    def extend(
        self,
        q: torch.Tensor,     # [1, T, H, K]: the N sequences packed along T
        k: torch.Tensor,     # [1, T, H, K]
        v: torch.Tensor,     # [1, T, HV, V]
        g: torch.Tensor,     # [1, T, HV] fp32 log decay (fused_gdn_gating)
        beta: torch.Tensor,  # [1, T, HV] fp32 after the sigmoid (fused_gdn_gating)
        *,
        ssm_states: torch.Tensor,       # [pool_size, HV, V, K], final states written in place
        cache_indices: torch.Tensor,    # [N] int32, < 0 = padding
        query_start_loc: torch.Tensor,  # [N + 1] int32, 0 .. T
        inplace_update: bool = True,
        output: Optional[torch.Tensor] = None,  # [1, T, HV, V] io dtype, written when given
        state_checkpoint_cu_starts: Optional[torch.Tensor] = None,
        num_state_checkpoints: int = 0,
        state_checkpoint_every_n_tokens: int = 0,
        track_state: Optional[torch.Tensor] = None,
        track_chunk_idx: Optional[torch.Tensor] = None,
        extend_prefix_lens: Optional[torch.Tensor] = None,  # not read: see the module docstring
        layer_id: Optional[int] = None,
        **kwargs,
    ) -> tuple:                         # (o [1, T, HV, V], None, None)
        if not self.supports_prefill:
            raise NotImplementedError(f"extend with head dims K={self.head_k_dim}, V={self.head_v_dim}: cute_gdn's "
                                      "prefill needs K = V = 128")
        if not inplace_update:
            raise NotImplementedError("inplace_update=False (GDN multi-item scoring): cute_gdn's prefill always "
                                      "writes the final states back")
        for name, value in (("state_checkpoint_cu_starts", state_checkpoint_cu_starts),
                            ("num_state_checkpoints", num_state_checkpoints),
                            ("state_checkpoint_every_n_tokens", state_checkpoint_every_n_tokens),
                            ("track_state", track_state), ("track_chunk_idx", track_chunk_idx)):
            if _requested(value):
                raise NotImplementedError(f"{name}: cute_gdn's prefill keeps no intermediate state snapshots")
        _reject_unknown("extend", kwargs)
        self._check_pool(ssm_states)
        N = query_start_loc.shape[0] - 1
        slots = self._check_indices("cache_indices", cache_indices, N, exact=True)
        if query_start_loc.dtype != torch.int32:
            raise TypeError(f"query_start_loc must be int32 (as SGLang passes it), got {query_start_loc.dtype}")
        if output is not None and (tuple(output.shape) != tuple(v.shape[:2]) + (self.num_v_heads, self.head_v_dim)):
            raise ValueError(f"output must be [1, T, {self.num_v_heads}, {self.head_v_dim}], got {list(output.shape)}")
        self._require_warm()
        # fused_gdn_gating returns both in fp32, so neither conversion runs in SGLang 0.5.23; another
        # caller's bf16 gates cost one elementwise kernel and a [1, T, HV] fp32 buffer each.
        if g.dtype != torch.float32:
            g = g.float()
        if beta.dtype != torch.float32:
            beta = beta.float()
        o = self.kernels.extend(q, k, v, g=g, beta=beta, cu_seqlens=query_start_loc, state=ssm_states,
                                state_indices=slots, has_initial_state=None, out=output)
        return o, None, None

    def target_verify(
        self,
        A_log: torch.Tensor,  # [HV] fp32
        dt_bias: torch.Tensor,  # [HV] fp32 or bf16
        q: torch.Tensor,  # [1, N*T, H, K] (a view of the split mixed_qkv)
        k: torch.Tensor,  # [1, N*T, H, K]
        v: torch.Tensor,  # [1, N*T, HV, V]
        a: torch.Tensor,  # [N*T, HV] raw gate
        b: torch.Tensor,  # [N*T, HV] raw beta logit
        *,
        ssm_states: torch.Tensor,       # [pool_size, HV, V, K], read only
        cache_indices: torch.Tensor,    # [>= N] int32, < 0 = padding
        query_start_loc: torch.Tensor,  # [N + 1] int32 (arange(0, N*T + 1, T))
        intermediate_states_buffer: torch.Tensor,  # [slots, cache_steps, HV, V, K], the state's dtype
        intermediate_state_indices: torch.Tensor,  # [>= N] int32 rows of intermediate_states_buffer
        cache_steps: int,               # T: this step's draft tokens, 1 .. the config's cache_steps
        retrieve_parent_token: Optional[torch.Tensor],
        stable_rows: bool = False,      # PP-stable rows: only the indices differ, handled as given
        **kwargs,
    ) -> torch.Tensor:                  # [1, N*T, HV, V] io dtype
        if retrieve_parent_token is not None:
            raise NotImplementedError("retrieve_parent_token (EAGLE tree verify): cute_gdn verifies linear draft "
                                      "chains only; SGLang routes trees to its tree_verify_kernel")
        _reject_unknown("target_verify", kwargs)
        if self.spec_mode == "replay":
            raise NotImplementedError("target_verify with intermediate_states_buffer on a spec_mode='replay' "
                                      "CuteGDNKernel: SGLang reaches dispatcher.target_verify only without "
                                      "--enable-linear-replayssm-spec; replay verify runs through "
                                      "replay_target_verify (install_replay)")
        if not self.supports_target_verify:
            raise NotImplementedError("target_verify: this CuteGDNKernel was built with cache_steps=0 "
                                      "(no speculative decoding)")
        if intermediate_states_buffer is None:
            raise NotImplementedError("intermediate_states_buffer=None (ReplaySSM spec verify): cute_gdn caches "
                                      "every intermediate state")
        if intermediate_states_buffer.dim() != 5 or intermediate_states_buffer.shape[1] != self.cache_steps:
            raise NotImplementedError(f"intermediate_states_buffer {list(intermediate_states_buffer.shape)}: this "
                                      f"CuteGDNKernel was built for cache_steps={self.cache_steps} "
                                      "([slots, cache_steps, HV, V, K])")
        T = int(cache_steps)
        if not 1 <= T <= self.cache_steps:
            raise NotImplementedError(f"cache_steps={T}: this CuteGDNKernel verifies 1 to {self.cache_steps} "
                                      "draft tokens")
        N = query_start_loc.shape[0] - 1
        # Only the token count is checked: the dense layout (sequence i = tokens i*T .. i*T + T - 1) is
        # assumed, as SGLang's own GDN verify assumes it; reading query_start_loc's values would sync.
        # A ragged batch of another token count is refused here, SGLang's compact ragged verify mode at
        # install (_check_ragged_verify).
        if q.dim() != 4 or q.shape[0] != 1 or q.shape[1] != N * T:
            raise NotImplementedError(f"query_start_loc with N={N} sequences for q {list(q.shape)}: verify takes "
                                      f"[1, N * cache_steps = {N * T}, H, K], N sequences of cache_steps tokens "
                                      "(ragged verify is not supported)")
        self._check_pool(ssm_states)
        slots = self._check_indices("cache_indices", cache_indices, N)
        rows = self._check_indices("intermediate_state_indices", intermediate_state_indices, N)
        self._require_warm()
        out = v.new_empty(1, N * T, self.num_v_heads, self.head_v_dim)
        self.kernels.target_verify(_split_tokens(q[0], N, T), _split_tokens(k[0], N, T), _split_tokens(v[0], N, T),
                                   _split_tokens(a, N, T), _split_tokens(b, N, T), A_log=A_log, dt_bias=dt_bias,
                                   state=ssm_states, state_indices=slots, cache=intermediate_states_buffer,
                                   cache_indices=rows, out=_split_tokens(out[0], N, T))
        return out

    # ---- the replay protocol (spec_mode="replay"), in place of SGLang's GDN spec ring ----

    def replay_target_verify(
        self,
        *,
        layer,                          # SGLang's RadixLinearAttention (layer_id, A_log, dt_bias)
        query: torch.Tensor,            # [1, N*T, H, K] or [N*T, H, K] (views of the split mixed_qkv)
        key: torch.Tensor,              # like query
        value: torch.Tensor,            # [1, N*T, HV, V] or [N*T, HV, V]
        a: torch.Tensor,                # [N*T, HV] raw gate
        b: torch.Tensor,                # [N*T, HV] raw beta logit
        mamba_pool=None,                # SGLang's MambaPool (its own cursors are not used)
        layer_cache,                    # this layer's MambaPool.SpeculativeState (.temporal = the pool)
        cache_indices: torch.Tensor,    # [>= N] int32 mamba slots, < 0 = padding
        replay_indices: Optional[torch.Tensor] = None,  # req_pool_indices: SGLang's cursor keys, not read
        query_start_loc: torch.Tensor,  # [N + 1] int32, dense N x T
        draft_token_num: int,           # T
    ) -> torch.Tensor:                  # value's shape, io dtype
        """GDNAttnBackend._replayssm_target_verify's signature (SGLang 0.5.23), running cute_gdn's
        replay_verify on this kernel's ring for layer.layer_id and its cursors (keyed by mamba slot)."""
        ring = self.rings.get(int(layer.layer_id))
        if ring is None or self.cursors is None:
            raise ValueError(f"no replay ring for GDN layer_id={layer.layer_id}: allocate_replay(layer_ids) "
                             f"holds {sorted(self.rings)}")
        T = int(draft_token_num)
        if not 1 <= T <= self.cache_steps:
            raise NotImplementedError(f"draft_token_num={T}: this CuteGDNKernel verifies 1 to {self.cache_steps} "
                                      "draft tokens")
        N = query_start_loc.shape[0] - 1
        tokens = query.numel() // (self.num_heads * self.head_k_dim)
        if tokens != N * T:
            raise NotImplementedError(f"query with {tokens} tokens for N={N} sequences of draft_token_num={T}: "
                                      "replay verify takes N sequences of T tokens (ragged verify is not supported)")
        q = query.reshape(N, T, self.num_heads, self.head_k_dim)  # views of SGLang's split (no copy)
        k = key.reshape(N, T, self.num_heads, self.head_k_dim)
        v = value.reshape(N, T, self.num_v_heads, self.head_v_dim)
        state = layer_cache.temporal
        self._check_pool(state)
        slots = self._check_indices("cache_indices", cache_indices, N)
        self._require_warm()
        out = v.new_empty(N, T, self.num_v_heads, self.head_v_dim)
        self.kernels.target_verify(q, k, v, _split_tokens(a, N, T), _split_tokens(b, N, T), A_log=layer.A_log,
                                   dt_bias=layer.dt_bias, state=state, state_indices=slots, ring=ring,
                                   cursors=self.cursors, out=out)
        return out.view(value.shape)

    def replay_commit(self, state_batch_indices: torch.Tensor,  # [B] int32 mamba slots, < 0 = padding
                      accept_lens: torch.Tensor) -> None:        # [B] tokens kept per row (bonus included)
        """After the verify of every layer: one cursor move for all layers. SGLang's accept_lens (the
        accepted drafts plus the bonus token) is the number of verified tokens whose state is kept, which
        is replay_commit's num_accepted."""
        self._require_warm()
        if accept_lens.dtype != torch.int32:
            accept_lens = accept_lens.to(torch.int32)
        B = accept_lens.shape[0]
        slots = self._check_indices("state_batch_indices", state_batch_indices, B)
        self.kernels.replay_commit(self.cursors, slots, accept_lens)

    def reset_slots(self, slots: torch.Tensor) -> None:  # [n] mamba slots handed to new requests
        """Empty the rings of slots SGLang just assigned (every layer: the cursors are shared)."""
        replay_ops.reset_cursors(self.cursors, slots)


def _check_kernel(kernel, modes: tuple) -> None:
    if not isinstance(kernel, CuteGDNKernel):
        raise TypeError(f"kernel must be a CuteGDNKernel, got {type(kernel).__name__}")
    if "extend" in modes and not kernel.supports_prefill:
        raise NotImplementedError(f"{kernel!r} cannot take extend: cute_gdn's prefill needs K = V = 128")
    if "target_verify" in modes and not kernel.supports_target_verify:
        raise ValueError(f"{kernel!r} cannot take target_verify: build it with cache_steps = the draft tokens")
    if not kernel.kernels.warm:
        raise ValueError(f"{kernel!r} is not warmed up: call warmup() before installing it")
    if kernel.spec_mode == "replay" and "target_verify" in modes and kernel.cursors is None:
        raise ValueError(f"{kernel!r} has no rings: call allocate_replay(layer_ids) (from_model_runner does)")


def _kernel_name(obj) -> str:
    return repr(obj) if isinstance(obj, CuteGDNKernel) else type(obj).__name__


def _apply(dispatcher, kernel: CuteGDNKernel, modes: tuple) -> dict:
    """The swap itself, on a dispatcher and kernel that passed every check (it cannot fail halfway)."""
    replaced = {}
    for mode in modes:
        attr = MODES[mode]
        replaced[mode] = getattr(dispatcher, attr)
        setattr(dispatcher, attr, kernel)
    if "decode" in modes:
        # The dispatcher reads this flag (not the kernel's) to choose the packed Triton decode.
        dispatcher.supports_packed_decode = kernel.supports_packed_decode
    if "target_verify" in modes and hasattr(dispatcher, "verify_kernel_is_flashinfer"):
        # Picks FlashInfer's CuTe DSL ReplaySSM fold when True; the verify kernel is no longer FlashInfer's.
        dispatcher.verify_kernel_is_flashinfer = False
    logger.info("cute_gdn: GDN dispatcher %#x now runs decode=%s, extend=%s, target_verify=%s, tree verify=%s "
                "(replaced: %s)", id(dispatcher), *(_kernel_name(getattr(dispatcher, MODES[m])) for m in MODES),
                _kernel_name(dispatcher.tree_verify_kernel),
                ", ".join(f"{m}={_kernel_name(k)}" for m, k in replaced.items()))
    return replaced


def install(dispatcher, kernel: CuteGDNKernel, modes: Iterable[str] = ALL_MODES, *, model_runner=None) -> dict:
    """Make SGLang's GDNKernelDispatcher (`GDNAttnBackend.kernel_dispatcher`) run `kernel` for `modes`
    (any of "decode", "extend", "target_verify"). Returns the kernels it replaced, by mode.

    Where: once the model runner built its attention backends and before it captures CUDA graphs
    (captured graphs keep the kernels they recorded), e.g. in an AFTER hook of
    `ModelRunner.init_attention_backends` (see `register_sglang_hook`):

        dispatcher = model_runner.attn_backend.linear_attn_backend.kernel_dispatcher
        install(dispatcher, CuteGDNKernel.from_model_runner(model_runner), model_runner=model_runner)

    The dispatcher does not reach SGLang's memory pools: pass `model_runner` so that install also
    refuses what needs them (extend with the mamba extra buffer, ReplaySSM); install_into_runner always
    does. Every check runs before the first attribute is set. Tree verify (EAGLE top-k > 1) keeps going
    to the dispatcher's `tree_verify_kernel` (Triton).
    """
    modes = _check_modes(modes)
    _check_kernel(kernel, modes)
    if kernel.spec_mode == "replay" and "target_verify" in modes:
        raise ValueError("a spec_mode='replay' CuteGDNKernel's verify and commit replace methods of SGLang's GDN "
                         "backend and mamba pool, which a dispatcher does not reach: use "
                         "install_into_runner(model_runner, kernel)")
    _check_dispatcher(dispatcher)
    _check_ragged_verify(modes)
    if model_runner is not None:
        _check_runner(model_runner, modes, kernel.spec_mode)
    return _apply(dispatcher, kernel, modes)


def _gdn_backends(model_runner) -> list:
    """(backend, dispatcher) of every GDN attention backend of a runner, each dispatcher once."""
    found, seen = [], set()

    def walk(backend):
        if backend is None or id(backend) in seen:
            return
        seen.add(id(backend))
        dispatcher = getattr(backend, "kernel_dispatcher", None)
        if dispatcher is not None and all(hasattr(dispatcher, attr) for attr in DISPATCHER_ATTRS):
            if all(d is not dispatcher for _, d in found):
                found.append((backend, dispatcher))
        walk(getattr(backend, "linear_attn_backend", None))
        walk(getattr(backend, "primary", None))
        children = getattr(backend, "children", None)
        if isinstance(children, (list, tuple)):
            for child in children:
                walk(child)

    walk(getattr(model_runner, "attn_backend", None))
    walk(getattr(model_runner, "decode_attn_backend", None))
    for backend in getattr(model_runner, "decode_attn_backend_group", None) or ():
        walk(backend)
    return found


def gdn_dispatchers(model_runner) -> list:
    """Every GDNKernelDispatcher (an object with all of DISPATCHER_ATTRS) a ModelRunner's attention
    backends hold: `attn_backend` (a HybridLinearAttnBackend whose `linear_attn_backend` is the
    GDNAttnBackend, or a TboAttnBackend's primary and children), `decode_attn_backend` and
    `decode_attn_backend_group` (PD multiplexing)."""
    return [dispatcher for _, dispatcher in _gdn_backends(model_runner)]


# ---- replay: SGLang's GDN spec-ring hooks, taken over by a spec_mode="replay" CuteGDNKernel ----

# SGLang 0.5.23's spec-ring commit kernels. commit_mamba_states_after_verify (speculative/spec_utils.py)
# imports them from this module inside the function, at every call, so the module attributes are what
# it calls.
REPLAY_COMMIT_MODULE = "sglang.kernels.ops.attention.linear.gdn_replayssm_spec_decode"
# id(mamba_pool.replayssm_spec_write_pos) -> (that tensor, the CuteGDNKernel serving its pool). The
# commit kernels receive the pool's write_pos, which tells a pool cute_gdn serves from any other
# (the tensor is held so that its id is not reused).
_REPLAY_POOLS: dict = {}


def _patch_replay_commit() -> None:
    """Route SGLang's two spec-ring commit kernels to the CuteGDNKernel of their pool (others go on to
    SGLang's own kernels): commit_gdn_replayssm_spec (SGLang's cursor advance) does nothing for a pool
    cute_gdn serves, commit_gdn_replayssm_circular (SGLang's capacity fold and track snapshot) becomes
    the kernel's replay_commit. The conv-window rollback that follows them in SGLang stays SGLang's."""
    module = importlib.import_module(REPLAY_COMMIT_MODULE)
    if getattr(module, "_cute_gdn_patched", False):
        return
    spec_commit, circular_commit = module.commit_gdn_replayssm_spec, module.commit_gdn_replayssm_circular

    def commit_gdn_replayssm_spec(*args, **kwargs):
        if id(kwargs.get("write_pos")) in _REPLAY_POOLS:
            return None  # cute_gdn's cursors move once, in commit_gdn_replayssm_circular below
        return spec_commit(*args, **kwargs)

    def commit_gdn_replayssm_circular(*args, **kwargs):
        entry = _REPLAY_POOLS.get(id(kwargs.get("write_pos")))
        if entry is None:
            return circular_commit(*args, **kwargs)
        if kwargs.get("mamba_track_indices") is not None:
            raise NotImplementedError("mamba_track_indices (SGLang's prefix-cache track snapshot) with "
                                      "spec_mode='replay'")
        entry[1].replay_commit(kwargs["state_batch_indices"], kwargs["accept_lens"])
        return None

    module.commit_gdn_replayssm_spec = commit_gdn_replayssm_spec
    module.commit_gdn_replayssm_circular = commit_gdn_replayssm_circular
    module._cute_gdn_patched = True


def _wrap_alloc(req_to_token_pool, kernel: CuteGDNKernel) -> None:
    """After SGLang's HybridReqToTokenPool.alloc: empty the rings of the mamba slots it just assigned
    (a request whose req.kv did not hold a mamba slot before), where SGLang zeroes its own spec cursors."""
    alloc = req_to_token_pool.alloc
    if getattr(alloc, "_cute_gdn_kernel", None) is kernel:
        return
    device = kernel.cursors.pos.device

    def alloc_and_reset_cursors(reqs, *args, **kwargs):
        held = [bool(getattr(req.kv, "holds_mamba", False)) for req in reqs]
        result = alloc(reqs, *args, **kwargs)
        if result is not None:
            fresh = [torch.as_tensor(req.kv.mamba_pool_idx) for req, h in zip(reqs, held) if not h]
            if fresh:
                kernel.reset_slots(torch.stack(fresh).to(device=device, dtype=torch.int32, non_blocking=True))
        return result

    alloc_and_reset_cursors._cute_gdn_kernel = kernel
    req_to_token_pool.alloc = alloc_and_reset_cursors


def install_replay(model_runner, kernel: CuteGDNKernel) -> None:
    """Make a runner's GDN backends and its mamba pool run cute_gdn's replay protocol in place of SGLang's
    GDN spec ring (--enable-linear-replayssm-spec); install_into_runner calls it for a spec_mode="replay"
    kernel. Three places, all in SGLang 0.5.23's own flow:
    - verify: each GDNAttnBackend's `_replayssm_target_verify` (which forward_extend calls for
      target_verify when the spec ring is on) becomes kernel.replay_target_verify (instance attribute);
    - commit: SGLang's spec-ring commit kernels, called by commit_mamba_states_after_verify after the
      accept, become kernel.replay_commit for this pool (_patch_replay_commit);
    - slot assignment: req_to_token_pool.alloc resets the cursors of the mamba slots it hands out.
    SGLang's own spec-ring buffers stay allocated and unused."""
    backends = [backend for backend, _ in _gdn_backends(model_runner)]
    for backend in backends:
        if not callable(getattr(backend, "_replayssm_target_verify", None)):
            raise TypeError(f"{type(backend).__name__} has no _replayssm_target_verify: spec_mode='replay' "
                            "needs SGLang 0.5.23's GDNAttnBackend")
    pool = model_runner.req_to_token_pool
    write_pos = pool.mamba_pool.replayssm_spec_write_pos
    _patch_replay_commit()
    _REPLAY_POOLS[id(write_pos)] = (write_pos, kernel)
    for backend in backends:
        backend._replayssm_target_verify = kernel.replay_target_verify
    _wrap_alloc(pool, kernel)
    logger.info("cute_gdn: replay verify and commit (%d GDN layers, ring_len=%d, %s fold, %d bytes per slot and "
                "layer) in place of SGLang's spec ring", len(kernel.rings), kernel.ring_len, kernel.replay_fold,
                kernel.kernels.ring_bytes())


def install_into_runner(model_runner, kernel: Optional[CuteGDNKernel] = None, modes: Iterable[str] = ALL_MODES,
                        **kernel_kwargs) -> CuteGDNKernel:
    """install() into every GDN dispatcher of `model_runner`; builds (and warms up) the kernel with
    CuteGDNKernel.from_model_runner(model_runner, **kernel_kwargs) unless one is given. Returns it.
    Everything (modes, runner, kernel, every dispatcher) is checked before the first dispatcher is
    touched, so a refusal leaves all of them on SGLang's kernels."""
    modes = _check_modes(modes)
    dispatchers = gdn_dispatchers(model_runner)
    if not dispatchers:
        raise ValueError("model_runner has no GDN kernel dispatcher (is it a GDN model, attention backends built?)")
    for dispatcher in dispatchers:
        _check_dispatcher(dispatcher)
    _check_ragged_verify(modes)
    spec_mode = kernel.spec_mode if kernel is not None else kernel_kwargs.get("spec_mode", "cached")
    _check_runner(model_runner, modes, spec_mode)  # before from_model_runner warms up (which may compile)
    if kernel is None:
        kernel = CuteGDNKernel.from_model_runner(model_runner, **kernel_kwargs)
    _check_kernel(kernel, modes)
    replay = kernel.spec_mode == "replay" and "target_verify" in modes
    if replay:
        for backend, _ in _gdn_backends(model_runner):
            if not callable(getattr(backend, "_replayssm_target_verify", None)):
                raise TypeError(f"{type(backend).__name__} has no _replayssm_target_verify: spec_mode='replay' "
                                "needs SGLang 0.5.23's GDNAttnBackend")
    for dispatcher in dispatchers:
        _apply(dispatcher, kernel, modes)
    if replay:
        install_replay(model_runner, kernel)
    return kernel


HOOK_TARGET = "sglang.srt.model_executor.model_runner.ModelRunner.init_attention_backends"
MODES_ENV = "CUTE_GDN_SGLANG_MODES"
# "cached" (default) or "replay": the speculative protocol of the kernels the hook builds.
SPEC_ENV = "CUTE_GDN_SGLANG_SPEC"
# "exact" (default) or "compact": how those kernels fold a replay ring (spec_mode="replay" only).
REPLAY_FOLD_ENV = "CUTE_GDN_SGLANG_REPLAY_FOLD"


def register_sglang_hook(modes: Optional[Iterable[str]] = None, **kernel_kwargs) -> None:
    """Register, with SGLang's plugin HookRegistry, an AFTER hook on ModelRunner.init_attention_backends
    that runs install_into_runner on every runner holding GDN layers (draft runners without GDN layers
    are left alone). Call it from an SGLang general plugin (entry point group "sglang.srt.plugins"), which
    SGLang loads in every scheduler process before the model runners exist. `modes` defaults to
    $CUTE_GDN_SGLANG_MODES (comma-separated) or, where it is unset or blank, all three; the kernels'
    spec_mode defaults to $CUTE_GDN_SGLANG_SPEC ("cached" where unset, or "replay": see install_replay) and
    their replay_fold to $CUTE_GDN_SGLANG_REPLAY_FOLD ("exact" where unset, or "compact").

    Nothing is validated here: SGLang's load_plugins catches and only logs a plugin's exception, which
    would leave the server silently on Triton. The hook validates the modes (and install_into_runner
    everything else) instead: an exception from an AFTER hook propagates out of
    init_attention_backends and stops the server with the reason."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if modes is None:
        env = os.environ.get(MODES_ENV, "")
        # Set to something that names no mode (e.g. ","): handed on empty, so the hook refuses it.
        modes = tuple(m.strip() for m in env.split(",") if m.strip()) if env.strip() else ALL_MODES
    elif not isinstance(modes, str):
        modes = tuple(modes)  # a generator would be spent by the first runner
    if "spec_mode" not in kernel_kwargs and os.environ.get(SPEC_ENV, "").strip():
        # Validated by the kernel (GDNKernels: ValueError naming spec_mode) inside the hook, as the modes are.
        kernel_kwargs["spec_mode"] = os.environ[SPEC_ENV].strip()
    if "replay_fold" not in kernel_kwargs and os.environ.get(REPLAY_FOLD_ENV, "").strip():
        # Validated by GDNKernels too (ValueError naming replay_fold; also with spec_mode="cached").
        kernel_kwargs["replay_fold"] = os.environ[REPLAY_FOLD_ENV].strip()

    def after_init_attention_backends(result, model_runner, *args, **kwargs):
        checked = _check_modes(modes)
        if gdn_dispatchers(model_runner):
            install_into_runner(model_runner, modes=checked, **kernel_kwargs)
        return result

    HookRegistry.register(HOOK_TARGET, after_init_attention_backends, HookType.AFTER)


def plugin() -> None:
    """An SGLang general-plugin entry point (group "sglang.srt.plugins") that is opt-in: it registers
    the hook only when $CUTE_GDN_SGLANG_MODES is set (e.g. "decode,extend,target_verify"), so
    installing cute_gdn alone never changes the kernels SGLang runs. When it is set the hook is
    registered whatever it holds, and a value naming no or an unknown mode raises ValueError from
    ModelRunner.init_attention_backends (not here, where SGLang would only log it)."""
    if os.environ.get(MODES_ENV, "").strip():
        register_sglang_hook()
