"""Checks shared by the recurrent kernels (decode, verify): what a problem shape and a row map allow.

Each returns None when supported, else the reason, so `can_implement` of every kernel composes them.
"""

from typing import Optional

from .dtypes import BIAS_DTYPES, IO_DTYPES, STATE_DTYPES
from .gates import GATE_MODES
from .rows import RowMap

MAX_HEAD_DIM = 256


def check_problem(io_dtype: str, state_dtype: str, num_heads: int, num_v_heads: int, head_k_dim: int,
                  head_v_dim: int, gate_mode: str, dt_bias_dtype: Optional[str]) -> Optional[str]:
    """Dtypes, gate mode, GVA and head dims."""
    if io_dtype not in IO_DTYPES:
        return f"io dtype must be one of {IO_DTYPES}, got {io_dtype}"
    if state_dtype not in STATE_DTYPES:
        return f"state dtype must be one of {STATE_DTYPES}, got {state_dtype}"
    if gate_mode not in GATE_MODES:
        return f"gate mode must be one of {GATE_MODES}, got {gate_mode}"
    if gate_mode == "raw" and dt_bias_dtype not in BIAS_DTYPES:
        return f"dt_bias dtype must be one of {BIAS_DTYPES}, got {dt_bias_dtype}"
    if num_heads < 1 or num_v_heads < 1 or num_v_heads % num_heads != 0:
        return f"num_v_heads ({num_v_heads}) must be a positive multiple of num_heads ({num_heads})"
    return check_head_dims(head_k_dim, head_v_dim)


def check_head_dims(head_k_dim: int, head_v_dim: int) -> Optional[str]:
    for name, d in (("head_k_dim", head_k_dim), ("head_v_dim", head_v_dim)):
        if d % 16 != 0 or not 16 <= d <= MAX_HEAD_DIM:
            return f"{name} must be a multiple of 16 in [16, {MAX_HEAD_DIM}], got {d}"
    return None


def check_rowmap(rm: RowMap, head_v_dim: int) -> Optional[str]:
    """The thread map tiles a [V, K] state."""
    tpr = rm.threads_per_row
    if tpr & (tpr - 1) or not 1 <= tpr <= 32 or rm.k % (rm.vec * tpr) != 0:
        return f"threads_per_row {tpr} does not tile head_k_dim {rm.k}"
    if rm.threads % 32 != 0 or rm.threads > 1024:
        return f"threads_per_row * rows_per_pass must be a multiple of 32 up to 1024, got {rm.threads}"
    if head_v_dim % rm.tile_rows != 0:
        return f"tile of {rm.tile_rows} rows does not divide head_v_dim {head_v_dim}"
    return None


def state_vec(state_dtype: str) -> int:
    """State elements per 16-byte vector."""
    return 16 // (4 if state_dtype == "float32" else 2)
