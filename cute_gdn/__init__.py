"""cute_gdn: CuTe DSL kernels for Gated Delta Net linear attention on Hopper (sm_90a).

Public ops run the gated delta rule on a K-last state pool [pool_size, HV, V, K] addressed by
slot indices; `GDNKernels` is the serving surface (warmup once, then no compiling). Speculative verify
comes as `verify` + `commit` (every intermediate state cached) or as the replay protocol
(`replay_verify` + `replay_commit` on a checkpoint and a ring of records, see cute_gdn.replay).
"""

from . import reference
from .cache import KernelCache, KernelCompileError, KernelNotCompiledError
from .ops import LayerTable, commit, commit_layers, decode, prefill, verify
from .replay import (ReplayCursors, ReplayRing, make_replay_cursors, make_replay_ring, replay_commit, replay_flush,
                     replay_verify, reset_cursors)
from .serving import GDNKernels
from . import torch_ops  # registers torch.ops.cute_gdn.* (for torch.compile); the eager ops above stay direct

__all__ = ["prefill", "decode", "verify", "commit", "commit_layers", "LayerTable", "GDNKernels", "KernelCache",
           "KernelNotCompiledError", "KernelCompileError", "reference", "torch_ops", "ReplayRing", "ReplayCursors",
           "make_replay_ring", "make_replay_cursors", "reset_cursors", "replay_verify", "replay_commit",
           "replay_flush"]
__version__ = "0.1.0"
