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
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types
from functools import lru_cache
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
