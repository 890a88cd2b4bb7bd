"""The README's API example runs as written and does what it says."""

import re
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu


def gpu_kernel_keys() -> list:
    """The API example's config (GDNKernels(16, 32, 128, 128, pool_size=512, cache_steps=4)), compiled by
    conftest with the rest of the run's kernels."""
    from cute_gdn.serving import config_keys

    return config_keys(16, 32, 128, 128, pool_size=512, cache_steps=4)


def test_readme_api_example_runs():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## API\n\n```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    o, pool = scope["o"], scope["pool"]
    op = scope["op"]
    assert op.shape == (1, 407, 32, 128) and torch.isfinite(op.float()).all()
    assert torch.equal(op[0, 100:107], torch.zeros_like(op[0, 100:107]))  # the padded sequence
    torch.cuda.synchronize()
    assert o.shape == (3, 1, 32, 128) and torch.isfinite(o.float()).all()
    assert torch.equal(o[1], torch.zeros_like(o[1]))  # the padded row
    assert pool[7].abs().sum() > 0 and pool[3].abs().sum() > 0  # both live slots were written
    assert scope["kernels"].warm
    od, cache = scope["od"], scope["cache"]
    assert od.shape == (3, 4, 32, 128) and torch.isfinite(od.float()).all()
    assert torch.equal(od[1], torch.zeros_like(od[1]))
    assert torch.equal(pool[7], cache[0, 2]) and torch.equal(pool[3], cache[2, 3])  # the committed steps
