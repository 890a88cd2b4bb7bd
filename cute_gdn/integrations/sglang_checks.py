"""The SGLang integration's constants and argument checks (cute_gdn/integrations/sglang.py uses them): forward
modes, what makes an object a GDNKernelDispatcher, the mamba pool's ReplaySSM flags, and the checks of a model
runner, its pool and a dispatcher that install() runs before it changes anything. Imports no SGLang module.
"""

from __future__ import annotations

import os
from typing import Iterable

import torch


# GDNKernelDispatcher attribute of each forward mode.
MODES = {"decode": "decode_kernel", "extend": "extend_kernel", "target_verify": "verify_kernel"}
ALL_MODES = tuple(MODES)
# What makes an object a GDNKernelDispatcher for gdn_dispatchers() and install(): the attributes
# install() reads or writes, so a dispatcher that passes the check can be swapped completely.
DISPATCHER_ATTRS = (*MODES.values(), "supports_packed_decode", "tree_verify_kernel")

# The mamba pool's ReplaySSM flags (SGLang 0.5.23, MambaPool.__init__). With the decode ring
# (--enable-linear-replayssm) the ring-writing decode exists only on Triton's packed path; with the
# spec ring (--enable-linear-replayssm-spec: replayssm_cache_base for GDN, replayssm_spec_fold for KDA)
# verify takes SGLang's replay path and never reaches dispatcher.target_verify. Flag -> "is it on".
REPLAYSSM_FLAGS = {
    "enable_linear_replayssm": lambda value: bool(value),
    "enable_linear_replayssm_spec": lambda value: bool(value),
    "replayssm_spec_fold": lambda value: bool(value),
    "replayssm_cache_base": lambda value: value is not None,
}

# dt_bias dtypes the warmed kernel set covers (serving.GATE_VARIANTS); A_log is always fp32.
DT_BIAS_DTYPES = (torch.float32, torch.bfloat16)


def _requested(value) -> bool:
    """SGLang passes optional features as None / False / 0 when they are off."""
    return value is not None and value is not False and not (isinstance(value, int) and value == 0)


def _reject_unknown(method: str, kwargs: dict) -> None:
    for name, value in kwargs.items():
        if _requested(value):
            raise NotImplementedError(f"CuteGDNKernel.{method} does not support the argument {name}={value!r}")


def _split_tokens(x: torch.Tensor, seqs: int, tokens: int) -> torch.Tensor:
    """[seqs * tokens, ...] -> a [seqs, tokens, ...] view (no copy). Callers strip SGLang's leading 1
    of q/k/v/out ([1, tokens, ...]) themselves with x[0]; a/b come without it."""
    return x.unflatten(0, (seqs, tokens))


def _check_modes(modes: Iterable[str]) -> tuple:
    """The modes as a tuple without repeats; ValueError naming `modes` for an empty or unknown one."""
    if isinstance(modes, str):
        raise TypeError(f"modes must be an iterable of mode names, got the string {modes!r}")
    modes = tuple(dict.fromkeys(modes))
    if not modes:
        raise ValueError(f"modes must name at least one of {list(MODES)}")
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"modes must be among {list(MODES)}, got {mode!r}")
    return modes


def _check_replayssm(mamba_pool, spec_mode: str = "cached") -> None:
    """spec_mode "cached": NotImplementedError naming the first ReplaySSM flag that is on in SGLang's mamba
    pool. spec_mode "replay": the pool must run SGLang's GDN spec ring (--enable-linear-replayssm-spec, the
    path whose verify and commit CuteGDNKernel takes over, see install_replay); every other flag is refused."""
    if spec_mode == "replay":
        for flag in ("enable_linear_replayssm", "replayssm_spec_fold", "replayssm_is_kda"):
            if getattr(mamba_pool, flag, False):
                raise NotImplementedError(f"mamba_pool.{flag} with spec_mode='replay': CuteGDNKernel takes over "
                                          "SGLang's GDN spec ring only (--enable-linear-replayssm-spec), not the "
                                          "decode ring or the fold-every-commit (KDA) protocol")
        if not getattr(mamba_pool, "enable_linear_replayssm_spec", False) \
                or getattr(mamba_pool, "replayssm_cache_base", None) is None \
                or getattr(mamba_pool, "replayssm_spec_write_pos", None) is None:
            raise NotImplementedError("spec_mode='replay' (CUTE_GDN_SGLANG_SPEC=replay) without "
                                      "mamba_pool.enable_linear_replayssm_spec: start SGLang with "
                                      "--enable-linear-replayssm-spec, so that its GDN backend takes the replay "
                                      "verify path (not dispatcher.target_verify) and allocates no per-draft "
                                      "states")
        return
    for flag, is_on in REPLAYSSM_FLAGS.items():
        if is_on(getattr(mamba_pool, flag, None)):
            raise NotImplementedError(f"mamba_pool.{flag} (SGLang's linear ReplaySSM, --enable-linear-replayssm"
                                      "[-spec]): its ring-writing decode and replay verify are Triton's own paths "
                                      "that CuteGDNKernel does not take (CUTE_GDN_SGLANG_SPEC=replay runs "
                                      "cute_gdn's replay protocol on --enable-linear-replayssm-spec)")


def _check_runner(model_runner, modes: tuple, spec_mode: str = "cached") -> None:
    """The refusals that need the runner's memory pools (where it has them)."""
    pool = getattr(model_runner, "req_to_token_pool", None)
    if pool is None:
        if spec_mode == "replay":
            raise ValueError("spec_mode='replay' needs model_runner.req_to_token_pool (its mamba pool's cursors "
                             "and slot allocation)")
        return
    if spec_mode == "replay":
        if getattr(pool, "enable_mamba_extra_buffer", False):
            raise NotImplementedError("spec_mode='replay' with SGLang's mamba extra buffer (req_to_token_pool."
                                      "enable_mamba_extra_buffer): its prefix-cache tracking snapshots the state "
                                      "at track points, which cute_gdn's rings do not provide")
        server_args = getattr(model_runner, "server_args", None)
        if not getattr(server_args, "disable_radix_cache", False):
            raise NotImplementedError("spec_mode='replay' without server_args.disable_radix_cache "
                                      "(--disable-radix-cache): a finished request's pool slot holds its replay "
                                      "checkpoint, not its state, so it cannot be prefix-cached")
    if "extend" in modes and getattr(pool, "enable_mamba_extra_buffer", False):
        raise NotImplementedError("extend with SGLang's mamba extra buffer (req_to_token_pool."
                                  "enable_mamba_extra_buffer, --mamba-scheduler-strategy extra_buffer): its "
                                  "prefix-cache tracking reads the per-chunk states h that CuteGDNKernel.extend "
                                  "does not return")
    mamba_pool = getattr(pool, "mamba_pool", None)
    if mamba_pool is not None:
        _check_replayssm(mamba_pool, spec_mode)
    elif spec_mode == "replay":
        raise ValueError("spec_mode='replay' needs model_runner.req_to_token_pool.mamba_pool")


def _check_ragged_verify(modes: tuple) -> None:
    # SGLang's compact ragged verify hands the GDN backend per-request verify lengths (query_start_loc
    # from the ragged layout); CuteGDNKernel assumes the dense N x T layout and checks only the token
    # count, so a ragged batch with N * T tokens would pass. The mode is process-wide (read here as
    # SGLang's envs.SGLANG_RAGGED_VERIFY_MODE reads it: the raw value, default "static").
    if "target_verify" in modes and os.environ.get("SGLANG_RAGGED_VERIFY_MODE", "static") == "compact":
        raise NotImplementedError("target_verify with SGLANG_RAGGED_VERIFY_MODE=compact (ragged verify): "
                                  "CuteGDNKernel verifies N sequences of cache_steps tokens each")


def _check_dispatcher(dispatcher) -> None:
    for attr in DISPATCHER_ATTRS:
        if not hasattr(dispatcher, attr):
            raise TypeError(f"dispatcher must be SGLang's GDNKernelDispatcher (GDNAttnBackend.kernel_dispatcher); "
                            f"{type(dispatcher).__name__} has no attribute {attr!r}")
