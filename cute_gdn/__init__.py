"""cute_gdn: CuTe DSL kernels for Gated Delta Net linear attention on Hopper (sm_90a).

Public ops run the gated delta rule on a K-last state pool [pool_size, HV, V, K] addressed by
slot indices; `GDNKernels` is the serving surface (warmup once, then no compiling).
"""

from . import reference
from .cache import KernelCache, KernelCompileError, KernelNotCompiledError
from .ops import LayerTable, commit, commit_layers, decode, prefill, verify
from .serving import GDNKernels
from . import torch_ops  # registers torch.ops.cute_gdn.* (for torch.compile); the eager ops above stay direct

__all__ = ["prefill", "decode", "verify", "commit", "commit_layers", "LayerTable", "GDNKernels", "KernelCache",
           "KernelNotCompiledError", "KernelCompileError", "reference", "torch_ops"]
__version__ = "0.1.0"
