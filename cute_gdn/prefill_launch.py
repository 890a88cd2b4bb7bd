"""The launches of one prefill call, as its PrefillPlan says (kernels/prefill/plan.py), and the per-call
workspaces they use. ops.prefill validates, looks the kernel up and calls launch_prefill; nothing here checks
arguments.
"""

from __future__ import annotations

import functools

import torch

from .kernels import prefill as prefill_kernel
from .kernels.prefill import PrefillPlan


def prefill_workspace(tokens: int, num_seqs: int, num_v_heads: int, dtype: torch.dtype, device: torch.device,
                      zero_flags: bool = False, chain: int = prefill_kernel.CHAIN_NARROW
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-call workspace of prefill for a chain of kind `chain`: the [64, 64] tiles of every chunk
    (io dtype: T and P, and for a folded chain W~'s two column halves), its per-token factors (fp32) and
    its ready flag (int32); 17 KiB per chunk and value head at bf16 (33 KiB folded), see
    kernels/prefill/workspace.py. The flags need zeros only when the aux and chain kernels run concurrently."""
    rows = prefill_kernel.ws_rows(tokens, num_seqs)
    C = prefill_kernel.CHUNK
    flags = (torch.zeros if zero_flags else torch.empty)(rows, num_v_heads, dtype=torch.int32, device=device)
    return (torch.empty(rows, num_v_heads, prefill_kernel.ws_tiles(chain), C, C, dtype=dtype, device=device),
            torch.empty(rows, num_v_heads, prefill_kernel.NUM_FACTORS, C, dtype=torch.float32, device=device),
            flags)


def prefill_cp_workspace(pieces: int, num_v_heads: int, head_k_dim: int, head_v_dim: int,
                         device: torch.device) -> torch.Tensor:
    """Context parallelism's per-call workspace, fp32 [pieces, HV, V + K, K]: piece p's start state
    (rows :V) and transition map (rows V:); see kernels/prefill.cp_pieces. Calls that run their
    sequences whole pass a one-piece tensor that the kernels never read."""
    return torch.empty(pieces, num_v_heads, head_v_dim + head_k_dim, head_k_dim, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=None)
def _cp_unused(num_v_heads: int, head_k_dim: int, head_v_dim: int, device: torch.device) -> torch.Tensor:
    return prefill_cp_workspace(1, num_v_heads, head_k_dim, head_v_dim, device)


@functools.lru_cache(maxsize=None)
def _chain_stream(device_index: int) -> torch.cuda.Stream:
    """A high-priority stream per device for the chain kernel of an overlapped prefill, so that its
    CTAs are placed ahead of the aux kernel's as SMs free up."""
    return torch.cuda.Stream(device=device_index, priority=-1)


def launch_prefill(fn, tensors: tuple, scale: float, plan: PrefillPlan, T: int, N: int) -> None:
    """The kernel launches of one prefill call as `plan` says: context-parallel, overlapped, or aux then chain
    on one stream. The compiled function's arguments after the tensors: the workspace, scale, chain, launch,
    overlap, profile, the context-parallel workspace, cp and cp_step (kernels/prefill/kernel.py)."""
    q, v = tensors[0], tensors[2]
    K, HV, V = q.shape[3], v.shape[2], v.shape[3]
    P = prefill_kernel
    if plan.pieces:
        # Context parallelism (one long sequence, few heads): the aux kernel over the whole sequence, the
        # maps of its pieces, their scan, then every piece from its start (kernels/prefill/config.cp_pieces).
        ws = prefill_workspace(T, N, HV, q.dtype, q.device, chain=P.CHAIN_NARROW)
        cp_ws = prefill_cp_workspace(plan.pieces, HV, K, V, q.device)
        call = (*tensors, *ws, scale, P.CHAIN_NARROW)
        fn(*call, P.LAUNCH_AUX, 0, None, cp_ws, P.CP_OFF, plan.cp_step)
        fn(*call, P.LAUNCH_CHAIN, 0, None, cp_ws, P.CP_MAP, plan.cp_step)
        if plan.pieces > 2:  # start[p + 1] += start[p] @ map[p], p = 1 .. P - 2, in IEEE fp32 (scan.py)
            fn(*call, P.LAUNCH_SCAN, 0, None, cp_ws, P.CP_OFF, plan.cp_step)
        fn(*call, P.LAUNCH_CHAIN, 0, None, cp_ws, P.CP_PIECES, plan.cp_step)
        return
    ws = prefill_workspace(T, N, HV, q.dtype, q.device, zero_flags=plan.overlap, chain=plan.chain)
    call = (*tensors, *ws, scale, plan.chain)
    unused = (_cp_unused(HV, K, V, q.device), P.CP_OFF, P.CHUNK)
    if not plan.overlap:
        fn(*call, P.LAUNCH_BOTH, 0, None, *unused)
    else:
        # The aux kernel on the caller's stream, the chain concurrently on a high-priority one,
        # waiting for each chunk's flag; the caller's stream then waits for the chain.
        current = torch.cuda.current_stream(q.device)
        side = _chain_stream(q.device.index)
        side.wait_stream(current)
        fn(*call, P.LAUNCH_AUX, 1, None, *unused)
        with torch.cuda.stream(side):
            fn(*call, P.LAUNCH_CHAIN, 1, None, *unused)
        current.wait_stream(side)
