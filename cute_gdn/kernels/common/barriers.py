"""Named barrier ids (bar.sync ids 1..15; 0 is __syncthreads). One IntEnum per kernel family so that two
roles of a kernel never share an id by accident.
"""

from enum import IntEnum


class ChainBarrier(IntEnum):
    """Prefill's chain kernel: WG + wg syncs math warpgroup wg alone (128 threads), MATH all math warps."""
    WG = 1    # and WG + 1 for the second math warpgroup of a wide CTA
    MATH = 3
