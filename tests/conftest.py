import os

# Kernels compiled by the CPU tests target Hopper; cutlass reads this once, at import.
os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")

import pytest
import torch


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def pytest_collection_modifyitems(config, items):
    if _hopper():
        return
    skip = pytest.mark.skip(reason="needs an sm_90 (Hopper) CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
