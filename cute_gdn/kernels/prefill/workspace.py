"""The prefill workspace, shared by the aux kernel (writer) and the chain kernel (reader): chunk j of
sequence n lives at row cu_seqlens[n] // 64 + n + j; per row and value head ws_tiles(chain) [64, 64] tiles
(T, P and for a folded chain W~'s column halves, io dtype), NUM_FACTORS x 64 fp32 factors and an int32
ready flag (release by the aux kernel, acquire by an overlapped chain).
"""


import cutlass.cute as cute
from cutlass import Int32

from .config import CHAIN_FOLDED, CHUNK

NUM_FACTORS = 4  # per-token fp32 factors of a chunk, see the module docstring


def ws_tiles(chain: int) -> int:
    """[C, C] workspace tiles per chunk and value head: T and P, and for a folded chain the two column
    halves of W~ (see state_chain_folded)."""
    return 4 if chain == CHAIN_FOLDED else 2


def ws_rows(tokens: int, num_seqs: int) -> int:
    """Workspace rows (chunk slots) needed for `tokens` tokens in `num_seqs` sequences."""
    return tokens // CHUNK + num_seqs + 1


@cute.jit
def flag_ptr(mWsFlag, row, hv):
    """The address of mWsFlag[row, hv] (a compact [rows, HV] int32 tensor)."""
    return mWsFlag.iterator + row * mWsFlag.shape[1] + hv


@cute.jit
def wait_flag(ptr):
    """Spin (acquire, GPU scope) until the int32 at `ptr` is non-zero."""
    flag = cute.arch.load(ptr, Int32, sem="acquire", scope="gpu")
    while flag == 0:
        flag = cute.arch.load(ptr, Int32, sem="acquire", scope="gpu")
