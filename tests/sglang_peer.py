"""SGLang 0.5.23's own GDN modules, loaded without `import sglang` (which would pull the whole server).

`install()` puts packages into sys.modules for `sglang`, `sglang.srt`, `sglang.kernels` (and the
kernel groups below) whose __path__ points into the sglang directory, so that submodules load from
the real files while the package __init__ files (the server, every kernel group's registry) never
run. Found, in order, at $CUTE_GDN_SGLANG_DIR, `.gpu-site/sglang` under the repository root (the
GPU host's bundle, ../shared/gpu-bundle), or the installed `sglang` distribution
(`pip install --no-deps sglang==0.5.23`), located with importlib.util.find_spec without importing it.
If the real sglang is already imported, it is used as it is.

Stand-ins replace the few helpers the loaded modules import from modules that would pull the server:
`sglang.srt.utils` (device predicates, mirrored from sglang/srt/utils/common.py for a CUDA build),
`sglang.srt.utils.common.torch_release` and `sglang.kernels.jit.utils.is_arch_support_pdl`, and `einops`
where it is not installed (fla/chunk.py imports it for a layout TritonGDNKernel never uses). `is_cpu()`
is False: the peer is SGLang's CUDA path (its CPU path needs the sgl_kernel wheel).

`ReplaySSMLayer` drives SGLang's ReplaySSM GDN spec verify (gdn_replayssm_spec_decode.py) on one layer,
with the buffers SGLang's MambaPool allocates for it and the calls its backend and spec_utils make.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types
from functools import lru_cache, partial
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parents[1]
ENV_DIR = "CUTE_GDN_SGLANG_DIR"

# Packages whose __init__ must not run: the top levels (server imports), the kernel namespace
# (its registry imports every operator group) and the attention group (registers every kernel).
STUB_PACKAGES = ("sglang", "sglang.srt", "sglang.kernels", "sglang.kernels.ops", "sglang.kernels.ops.attention",
                 "sglang.kernels.jit")


@lru_cache(maxsize=1)
def sglang_dir() -> Optional[Path]:
    """The sglang package directory, or None where none is found."""
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env) if (Path(env) / "srt").is_dir() else None
    gpu_site = REPO / ".gpu-site" / "sglang"
    if (gpu_site / "srt").is_dir():
        return gpu_site
    module = sys.modules.get("sglang")
    if module is not None:
        paths = list(getattr(module, "__path__", []))
        return Path(paths[0]) if paths else None
    spec = importlib.util.find_spec("sglang")  # a top-level name: finds it without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0])
    return path if (path / "srt").is_dir() else None


def _real_sglang_imported() -> bool:
    module = sys.modules.get("sglang")
    return module is not None and not getattr(module, "__cute_gdn_stub__", False) and \
        getattr(module, "__file__", None) is not None


def _package(name: str, path: Path) -> types.ModuleType:
    module = types.ModuleType(name)
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(path)]
    module.__spec__ = spec
    module.__path__ = [str(path)]
    module.__package__ = name
    module.__cute_gdn_stub__ = True
    return module


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__cute_gdn_stub__ = True
    module.__dict__.update(attrs)
    return module


def _register(name: str, module: types.ModuleType) -> None:
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent and parent in sys.modules:
        setattr(sys.modules[parent], child, module)


# ---- stand-ins (the bodies follow sglang/srt/utils/common.py and sglang/kernels/jit/utils/arch.py) ----

def is_cuda() -> bool:
    return torch.cuda.is_available() and torch.version.cuda is not None


def is_hip() -> bool:
    return torch.version.hip is not None


def is_cpu() -> bool:
    return False


def is_npu() -> bool:
    return False


def is_xpu() -> bool:
    return False


def is_gfx95_supported() -> bool:
    return False


def get_device_sm() -> int:
    if not torch.cuda.is_available():
        return 0
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


@lru_cache(maxsize=1)
def is_sm90_supported() -> bool:
    if not is_cuda() or torch.cuda.get_device_capability()[0] != 9:
        return False
    return tuple(int(x) for x in torch.version.cuda.split(".")[:2]) >= (12, 3)


def is_arch_support_pdl() -> bool:
    return is_cuda() and torch.cuda.get_device_capability()[0] >= 9


def _torch_release() -> tuple:
    from packaging import version
    return version.parse(torch.__version__).release


UTILS_NAMES = ("is_cuda", "is_hip", "is_cpu", "is_npu", "is_xpu", "is_gfx95_supported", "is_sm90_supported",
               "get_device_sm")
# Every stand-in module and the names it defines (tests check the loaded modules need no others).
STANDINS = {
    "sglang.srt.utils": UTILS_NAMES,
    "sglang.srt.utils.common": ("torch_release",),
    "sglang.kernels.jit.utils": ("is_arch_support_pdl",),
}


def install() -> Path:
    """Install the packages and stand-ins (idempotent); returns the sglang directory."""
    root = sglang_dir()
    if root is None:
        raise ModuleNotFoundError(f"no sglang directory: set ${ENV_DIR}, unpack the GPU bundle into .gpu-site/, "
                                  "or pip install --no-deps sglang==0.5.23")
    if _real_sglang_imported():
        return root
    if getattr(sys.modules.get("sglang"), "__cute_gdn_stub__", False):
        return root
    for name in STUB_PACKAGES:
        _register(name, _package(name, root.joinpath(*name.split(".")[1:])))
    here = sys.modules[__name__]
    _register("sglang.srt.utils", _module("sglang.srt.utils", **{n: getattr(here, n) for n in UTILS_NAMES}))
    _register("sglang.srt.utils.common", _module("sglang.srt.utils.common", torch_release=_torch_release()))
    _register("sglang.kernels.jit.utils", _module("sglang.kernels.jit.utils", is_arch_support_pdl=is_arch_support_pdl))
    if importlib.util.find_spec("einops") is None:
        # fla/chunk.py imports einops.rearrange for its head_first=True layout only, which TritonGDNKernel
        # never takes; the GPU host's bundle does not carry einops.
        sys.modules["einops"] = _module("einops", rearrange=_no_rearrange)
    return root


def _no_rearrange(*args, **kwargs):
    raise NotImplementedError("einops is not installed (tests/sglang_peer.py stands in for its import only)")


KERNEL_BACKEND = "sglang.srt.layers.attention.linear.kernels.kernel_backend"
GDN_TRITON = "sglang.srt.layers.attention.linear.kernels.gdn_triton"
FUSED_GDN_GATING = "sglang.kernels.ops.attention.linear.fused_gdn_gating"


def load_kernel_base() -> type:
    """SGLang's LinearAttnKernelBase (the ABC; plain torch, loads on any machine)."""
    install()
    return importlib.import_module(KERNEL_BACKEND).LinearAttnKernelBase


def load_triton_kernel() -> type:
    """SGLang's TritonGDNKernel (needs triton and a CUDA device: the GPU host)."""
    install()
    return importlib.import_module(GDN_TRITON).TritonGDNKernel


def load_fused_gdn_gating():
    """SGLang's fused_gdn_gating(A_log, a, b, dt_bias) -> (g, beta), the gates it feeds extend (GPU host)."""
    install()
    return importlib.import_module(FUSED_GDN_GATING).fused_gdn_gating


REPLAYSSM = "sglang.kernels.ops.attention.linear.gdn_replayssm_spec_decode"


def load_replayssm():
    """SGLang's ReplaySSM GDN module: gdn_replayssm_spec_decode and commit_gdn_replayssm_spec (GPU host)."""
    install()
    return importlib.import_module(REPLAYSSM)


class ReplaySSMLayer:
    """One GDN layer under SGLang's ReplaySSM speculative verify, the protocol cute_gdn.replay follows.

    Buffers as MambaPool allocates them for `--enable-linear-replayssm-spec` (memory_pool.py), one layer:
    the compact output-path records d [slots, HV, L, V] and L2-normalized k [slots, H, L, K] in
    `record_dtype` (SGLang: the activation dtype), g [slots, HV, L] fp32, and request-keyed cursors
    write_pos / cache_base (int32) and is_flush (int8) [slots]. The exact fold that launch_mode "both" runs
    also needs the raw replay records (raw v, raw k in the io dtype, beta fp32), which SGLang's pool
    allocates for KDA's fold-every-commit; they are allocated here. The ring is keyed by the pool slot
    (replay_indices = state_indices), as cute_gdn's is.

    `verify` is gdn_replayssm_spec_decode with launch_mode "both": the exact fold of the rows whose ring is
    past the early-flush margin (write_pos > L - 2 T), their outputs from the folded checkpoint, and every
    other row's outputs from checkpoint + records. `commit` is commit_gdn_replayssm_spec (spec_utils.py):
    the cursor move, which also sets next step's is_flush. Padding is -1 (null_block_id=-1, as SGLang's
    backend passes).
    """

    def __init__(self, num_slots: int, num_heads: int, num_v_heads: int, head_k_dim: int, head_v_dim: int, *,
                 ring_len: int, max_spec_len: int, io_dtype: torch.dtype = torch.bfloat16,
                 record_dtype: torch.dtype = torch.bfloat16, device="cuda"):
        # The circular positions are (base + i) & (L - 1), and MambaPool checks the early-flush margin.
        if ring_len & (ring_len - 1) or ring_len < 2 * max_spec_len:
            raise ValueError(f"ReplaySSM needs a power-of-two ring_len >= 2 * max_spec_len, got {ring_len}")
        self.module = load_replayssm()
        self.ring_len, self.max_spec_len = ring_len, max_spec_len
        H, HV, K, V, L = num_heads, num_v_heads, head_k_dim, head_v_dim, ring_len
        zeros = partial(torch.zeros, device=device)
        self.d = zeros(num_slots, HV, L, V, dtype=record_dtype)
        self.k = zeros(num_slots, H, L, K, dtype=record_dtype)
        self.g = zeros(num_slots, HV, L, dtype=torch.float32)
        self.rawv = zeros(num_slots, HV, L, V, dtype=io_dtype)
        self.rawk = zeros(num_slots, H, L, K, dtype=io_dtype)
        self.beta = zeros(num_slots, HV, L, dtype=torch.float32)
        self.write_pos = zeros(num_slots, dtype=torch.int32)
        self.cache_base = zeros(num_slots, dtype=torch.int32)
        self.is_flush = zeros(num_slots, dtype=torch.int8)

    def verify(self, q, k, v, a, b, A_log, dt_bias, *, state, state_indices, scale=None, use_qk_l2norm=True,
               dot_precision: str = "ieee") -> torch.Tensor:
        """q, k [B, T, H, K], v [B, T, HV, V], a, b [B, T, HV] (raw gates), state [slots, HV, V, K] fp32
        (folded in place), state_indices [B] int32 (-1 = padding). Returns o [B, T, HV, V].

        dot_precision: "ieee" (fp32 dots) or "tf32" (SGLang's default on Ampere and newer)."""
        B, T, H, K = q.shape
        HV, V = v.shape[2], v.shape[3]
        tokens = B * T
        # SGLang packs the requests along the token dim: [tokens, heads, dim] with cu_seqlens.
        query_start_loc = torch.arange(0, tokens + 1, T, dtype=torch.int32, device=q.device)
        out = torch.empty(tokens, HV, V, dtype=q.dtype, device=q.device)
        self.module.gdn_replayssm_spec_decode(
            q=q.reshape(tokens, H, K), k=k.reshape(tokens, H, K), v=v.reshape(tokens, HV, V),
            a=a.reshape(tokens, HV), b=b.reshape(tokens, HV), A_log=A_log, dt_bias=dt_bias,
            checkpoint_state=state, d_cache=self.d, k_cache=self.k, g_cache=self.g, rawv_cache=self.rawv,
            rawk_cache=self.rawk, beta_cache=self.beta, out=out, query_start_loc=query_start_loc,
            ssm_state_indices=state_indices, replay_indices=state_indices, write_pos=self.write_pos,
            cache_base=self.cache_base, is_flush=self.is_flush, max_cache_len=self.ring_len,
            max_spec_len=self.max_spec_len, scale=scale, use_qk_l2norm_in_kernel=use_qk_l2norm,
            null_block_id=-1, launch_mode="both", dot_precision=dot_precision)
        return out.view(B, T, HV, V)

    def commit(self, state_indices: torch.Tensor, num_accepted: torch.Tensor) -> None:
        """Advance the cursors of the rows of the last verify by num_accepted [B] int32 (0 .. T)."""
        self.module.commit_gdn_replayssm_spec(
            write_pos=self.write_pos, cache_base=self.cache_base, is_flush=self.is_flush,
            num_accepted=num_accepted, replay_indices=state_indices, max_cache_len=self.ring_len,
            max_spec_len=self.max_spec_len, fold_every_commit=False, null_block_id=-1)
