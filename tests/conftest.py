import os

# Kernels compiled by the CPU tests target Hopper; cutlass reads this once, at import.
os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")

import random

import pytest
import torch

# The fuzz net's seed (tests/fuzz_cases.py): given, fixed under CI, else fresh each run; the header prints it.
if "CUTE_GDN_FUZZ_SEED" not in os.environ:
    from fuzz_cases import FIXED_SEED

    os.environ["CUTE_GDN_FUZZ_SEED"] = str(FIXED_SEED if os.environ.get("CI") else random.randrange(10 ** 9))


def pytest_report_header(config):
    return f"cute_gdn fuzz seed: CUTE_GDN_FUZZ_SEED={os.environ['CUTE_GDN_FUZZ_SEED']}"


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def pytest_collection_modifyitems(config, items):
    if _hopper():
        _precompile(items)
        return
    skip = pytest.mark.skip(reason="needs an sm_90 (Hopper) CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _precompile(items) -> None:
    """Compile every kernel the selected GPU tests need in one parallel batch (one process per CPU core)
    before the first test runs: each GPU module lists its kernels in gpu_kernel_keys(). Compiling module by
    module would leave most cores idle while a module's last kernels compile."""
    from cute_gdn.cache import default_cache

    modules = {item.module for item in items if "gpu" in item.keywords}
    keys = [key for module in sorted(modules, key=lambda m: m.__name__)
            for key in getattr(module, "gpu_kernel_keys", lambda: [])()]
    if keys:
        default_cache().compile(keys, jobs=os.cpu_count() or 1)
