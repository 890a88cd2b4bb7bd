"""GDN layer shapes of the models cute_gdn serves (whole model; the CLI divides heads by --tp)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelPreset:
    num_heads: int     # q/k heads
    num_v_heads: int   # v heads
    head_dim: int      # K = V


MODELS = {
    "qwen3-next-80b": ModelPreset(16, 32, 128),
    "qwen3.5-35b-a3b": ModelPreset(16, 32, 128),
    "qwen3.5-9b": ModelPreset(16, 32, 128),
    "qwen3.5-27b": ModelPreset(16, 48, 128),
    "qwen3.5-122b": ModelPreset(16, 64, 128),
    "qwen3.5-397b": ModelPreset(16, 64, 128),
}

DEFAULT_MODEL = "qwen3-next-80b"
DEFAULT_POOL_SIZE = 512
