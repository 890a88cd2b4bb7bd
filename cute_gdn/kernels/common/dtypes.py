"""Names of dtypes in compile keys (plain strings, so keys stay hashable and torch-free)."""

import cutlass

IO_DTYPES = ("bfloat16", "float16")
STATE_DTYPES = ("float32", "bfloat16")
BIAS_DTYPES = ("float32", "bfloat16")

_CUTLASS = {
    "float32": cutlass.Float32,
    "bfloat16": cutlass.BFloat16,
    "float16": cutlass.Float16,
    "int32": cutlass.Int32,
}


def cutlass_dtype(name: str):
    """The cutlass numeric type for a dtype name of a compile key."""
    return _CUTLASS[name]
