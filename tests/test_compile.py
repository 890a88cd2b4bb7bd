"""Every decode variant compiles for sm_90a on a machine without a GPU."""

import itertools

import pytest

from cute_gdn.kernels.decode import DecodeConfig, can_implement, compile_decode

VARIANTS = list(itertools.product(
    ("float32", "bfloat16"),                                          # state
    ("bfloat16", "float16"),                                          # io
    (("raw", "float32"), ("raw", "bfloat16"), ("precomputed", None)),  # gates, dt_bias dtype
    (True, False),                                                    # q/k l2norm
))


@pytest.mark.parametrize("state,io,gates,l2norm", VARIANTS)
def test_decode_variant_compiles_for_sm90a(state, io, gates, l2norm):
    """Both tiles of every variant: the small-batch and the large-batch one."""
    gate_mode, bias = gates
    for large in (False, True):
        fn = compile_decode(io_dtype=io, state_dtype=state, num_heads=16, num_v_heads=32, head_k_dim=128,
                            head_v_dim=128, pool_size=64, gate_mode=gate_mode, dt_bias_dtype=bias,
                            use_qk_l2norm=l2norm, config=DecodeConfig.heuristic(128, 128, state, large))
        assert callable(fn)


@pytest.mark.parametrize("H,HV,K,V,state", [(2, 8, 64, 32, "float32"), (3, 3, 96, 48, "bfloat16"),
                                            (1, 2, 256, 256, "float32"), (2, 2, 16, 16, "bfloat16")])
def test_decode_awkward_shapes_compile(H, HV, K, V, state):
    assert compile_decode(io_dtype="bfloat16", state_dtype=state, num_heads=H, num_v_heads=HV, head_k_dim=K,
                          head_v_dim=V, pool_size=5, gate_mode="raw", dt_bias_dtype="float32", use_qk_l2norm=True,
                          config=DecodeConfig.heuristic(K, V, state))


@pytest.mark.parametrize("args,fragment", [
    (("bfloat16", "float32", 16, 32, 120, 128, "raw", "float32"), "head_k_dim"),
    (("bfloat16", "float32", 16, 32, 128, 272, "raw", "float32"), "head_v_dim"),
    (("bfloat16", "float32", 16, 24, 128, 128, "raw", "float32"), "multiple of num_heads"),
    (("float32", "float32", 16, 32, 128, 128, "raw", "float32"), "io dtype"),
    (("bfloat16", "float16", 16, 32, 128, 128, "raw", "float32"), "state dtype"),
    (("bfloat16", "float32", 16, 32, 128, 128, "raw", "float16"), "dt_bias"),
    (("bfloat16", "float32", 16, 32, 128, 128, "sigmoid", None), "gate mode"),
])
def test_can_implement_names_the_reason(args, fragment):
    reason = can_implement(*args, DecodeConfig.heuristic(128, 128, args[1]))
    assert reason is not None and fragment in reason
    with pytest.raises(ValueError, match=fragment):
        compile_decode(io_dtype=args[0], state_dtype=args[1], num_heads=args[2], num_v_heads=args[3],
                       head_k_dim=args[4], head_v_dim=args[5], pool_size=4, gate_mode=args[6],
                       dt_bias_dtype=args[7], use_qk_l2norm=True, config=DecodeConfig.heuristic(128, 128, args[1]))


def test_heuristic_config_is_implementable_for_every_supported_dim():
    for state in ("float32", "bfloat16"):
        for K in range(16, 257, 16):
            for V in range(16, 257, 16):
                for large in (False, True):
                    cfg = DecodeConfig.heuristic(K, V, state, large)
                    assert can_implement("bfloat16", state, 1, 1, K, V, "precomputed", None, cfg) is None, (K, V, cfg)


# ---- verify and commit ----

from cute_gdn.kernels.commit import CommitConfig, compile_commit  # noqa: E402
from cute_gdn.kernels.commit import can_implement as can_implement_commit  # noqa: E402
from cute_gdn.kernels.verify import VerifyConfig, compile_verify  # noqa: E402
from cute_gdn.kernels.verify import can_implement as can_implement_verify  # noqa: E402


@pytest.mark.parametrize("state,io,gates,l2norm", VARIANTS)
def test_verify_variant_compiles_for_sm90a(state, io, gates, l2norm):
    """Both tiles of every variant at T = 4 (cache_steps 4)."""
    gate_mode, bias = gates
    for large in (False, True):
        assert callable(compile_verify(
            io_dtype=io, state_dtype=state, num_heads=16, num_v_heads=32, head_k_dim=128, head_v_dim=128,
            pool_size=64, num_tokens=4, cache_steps=4, gate_mode=gate_mode, dt_bias_dtype=bias, use_qk_l2norm=l2norm,
            config=VerifyConfig.heuristic(128, 128, state, large)))


@pytest.mark.parametrize("T,steps", [(1, 1), (2, 2), (3, 8), (5, 6), (8, 8), (16, 16)])
def test_verify_token_counts_compile(T, steps):
    assert compile_verify(io_dtype="bfloat16", state_dtype="bfloat16", num_heads=8, num_v_heads=16, head_k_dim=128,
                          head_v_dim=128, pool_size=9, num_tokens=T, cache_steps=steps, gate_mode="raw",
                          dt_bias_dtype="float32", use_qk_l2norm=True, config=VerifyConfig.heuristic(128, 128, "bfloat16"))


@pytest.mark.parametrize("H,HV,K,V,state", [(2, 8, 64, 32, "float32"), (3, 3, 96, 48, "bfloat16"),
                                            (1, 2, 256, 256, "float32"), (2, 2, 16, 16, "bfloat16")])
def test_verify_awkward_shapes_compile(H, HV, K, V, state):
    for large in (False, True):
        assert compile_verify(io_dtype="float16", state_dtype=state, num_heads=H, num_v_heads=HV, head_k_dim=K,
                              head_v_dim=V, pool_size=5, num_tokens=3, cache_steps=3, gate_mode="precomputed",
                              dt_bias_dtype=None, use_qk_l2norm=False, config=VerifyConfig.heuristic(K, V, state, large))


@pytest.mark.parametrize("T,steps,fragment", [(5, 4, "number of tokens T"), (0, 4, "number of tokens T"),
                                              (2, 17, "cache_steps")])
def test_verify_can_implement_names_the_reason(T, steps, fragment):
    cfg = VerifyConfig.heuristic(128, 128, "float32")
    reason = can_implement_verify("bfloat16", "float32", 16, 32, 128, 128, "raw", "float32", T, steps, cfg)
    assert reason is not None and fragment in reason
    with pytest.raises(ValueError, match=fragment):
        compile_verify(io_dtype="bfloat16", state_dtype="float32", num_heads=16, num_v_heads=32, head_k_dim=128,
                       head_v_dim=128, pool_size=4, num_tokens=T, cache_steps=steps, gate_mode="raw",
                       dt_bias_dtype="float32", use_qk_l2norm=True, config=cfg)


def test_verify_heuristic_is_implementable_for_every_supported_dim():
    for state in ("float32", "bfloat16"):
        for K in range(16, 257, 16):
            for V in range(16, 257, 16):
                for large in (False, True):
                    cfg = VerifyConfig.heuristic(K, V, state, large)
                    assert can_implement_verify("bfloat16", state, 1, 1, K, V, "precomputed", None, 4, 4, cfg) is None


@pytest.mark.parametrize("state", ["float32", "bfloat16"])
@pytest.mark.parametrize("layers", ["tensor", "table"])
@pytest.mark.parametrize("HV,K,V", [(32, 128, 128), (3, 16, 16), (5, 96, 48), (2, 256, 256)])
def test_commit_compiles_for_sm90a(state, layers, HV, K, V):
    cfg = CommitConfig.heuristic(K, V, state)
    assert can_implement_commit(state, HV, K, V, 4, layers, cfg) is None
    assert compile_commit(state_dtype=state, num_v_heads=HV, head_k_dim=K, head_v_dim=V, pool_size=7, cache_steps=4,
                          layers=layers, config=cfg)


def test_commit_heuristic_is_implementable_for_every_supported_dim():
    for state in ("float32", "bfloat16"):
        for K in range(16, 257, 16):
            for V in range(16, 257, 16):
                assert can_implement_commit(state, 1, K, V, 2, "table", CommitConfig.heuristic(K, V, state)) is None


# ---- prefill ----

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from cute_gdn.cache import KernelCache  # noqa: E402
from cute_gdn.kernels.prefill import can_implement as can_implement_prefill  # noqa: E402
from cute_gdn.ops import prefill_key  # noqa: E402


def test_every_prefill_variant_compiles_for_sm90a(tmp_path):
    """All 24 variants, compiled in parallel spawned processes into a scratch cache."""
    keys = [prefill_key(io_dtype=io, state_dtype=state, num_heads=16, num_v_heads=32, head_k_dim=128, head_v_dim=128,
                        pool_size=64, gate_mode=gates[0], dt_bias_dtype=gates[1], use_qk_l2norm=l2norm)
            for state, io, gates, l2norm in VARIANTS]
    cache = KernelCache(tmp_path)
    cache.compile(keys, jobs=os.cpu_count() or 1)
    assert all(cache.on_disk(k) for k in keys)


@pytest.mark.parametrize("H,HV", [(4, 4), (2, 8), (3, 9)])
def test_prefill_aux_ctas_by_gva(tmp_path, H, HV):
    """A GVA pair of value heads per aux CTA when HV / H is even, else one head (128 threads): both
    forms compile."""
    from cute_gdn.kernels.prefill import GdnPrefillSm90
    op = GdnPrefillSm90(io_dtype="bfloat16", state_dtype="float32", num_heads=H, num_v_heads=HV, head_k_dim=128,
                        head_v_dim=128, gate_mode="raw", use_qk_l2norm=True)
    assert op.aux_heads == (2 if (HV // H) % 2 == 0 else 1)
    key = prefill_key(io_dtype="bfloat16", state_dtype="float32", num_heads=H, num_v_heads=HV, head_k_dim=128,
                      head_v_dim=128, pool_size=8, gate_mode="raw", dt_bias_dtype="float32", use_qk_l2norm=True)
    cache = KernelCache(tmp_path)
    cache.compile([key], jobs=1)
    assert cache.on_disk(key)


def test_prefill_ptx_runs_on_warpgroup_mma(tmp_path):
    """The chunk products are wgmma instructions, bf16 in, fp32 accumulate: m64n64k16 for K K^T / Q K^T
    (aux kernel, 8 k-blocks) and S K^T, S Q^T (8 each), X T^T, U P^T (4 each) of the chain kernel, and
    m64n128k16 for the state update (4)."""
    code = """
import os
from cute_gdn.kernels.prefill import compile_prefill
compile_prefill(io_dtype="bfloat16", state_dtype="float32", num_heads=2, num_v_heads=4, head_k_dim=128,
                head_v_dim=128, pool_size=8, gate_mode="raw", dt_bias_dtype="float32", use_qk_l2norm=True)
"""
    env = {**os.environ, "CUTE_DSL_ARCH": "sm_90a", "CUTE_DSL_KEEP": "ptx", "CUTE_DSL_DUMP_DIR": str(tmp_path),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    ptx = "\n".join(p.read_text() for p in tmp_path.rglob("*.ptx"))
    assert "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16" in ptx
    assert "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16" in ptx
    assert ptx.count("wgmma.mma_async.sync.aligned.m64n64k16") >= 8 + 8 + 8 + 4 + 4
    assert ptx.count("wgmma.mma_async.sync.aligned.m64n128k16") >= 4
    # The chain's q, k, T and P arrive by TMA (3D for q and k, 5D for the workspace tiles).
    assert "cp.async.bulk.tensor.3d.shared::cta.global" in ptx
    assert "cp.async.bulk.tensor.5d.shared::cta.global" in ptx
    # The aux kernel publishes each chunk (release) and an overlapped chain waits for it (acquire),
    # then orders its TMA reads after the other kernel's generic stores.
    assert "st.release.gpu.global.b32" in ptx and "ld.acquire.gpu.global.b32" in ptx
    assert "fence.proxy.async.global" in ptx
    # The chain's o leaves by TMA store, its tiles reused only once the store has read them; 16-bit
    # fragments move between registers and shared memory by stmatrix / ldmatrix (v^T transposed).
    assert "cp.async.bulk.tensor.3d.global.shared::cta" in ptx and "cp.async.bulk.wait_group.read" in ptx
    assert "stmatrix.sync.aligned.m8n8.x4.trans.shared.b16" in ptx
    assert "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16" in ptx


@pytest.mark.parametrize("K,V", [(64, 64), (128, 64), (256, 256)])
def test_prefill_rejects_other_head_dims_with_the_reason(K, V):
    reason = can_implement_prefill("bfloat16", "float32", 2, 4, K, V, "raw", "float32")
    assert reason is not None and "head_k_dim = head_v_dim = 128" in reason


# ---- replay ----

from cute_gdn.kernels import replay as replay_kernel  # noqa: E402
from cute_gdn.kernels import replay_cursor as replay_cursor_kernel  # noqa: E402


@pytest.mark.parametrize("state,io,gates,l2norm", VARIANTS)
def test_replay_variant_compiles_for_sm90a(state, io, gates, l2norm):
    """Replay verify at T = 4 (ring 16) in both replay tiles, and the flush kernel, of every variant."""
    gate_mode, bias = gates
    tiles = {replay_kernel.replay_tile(128, 128, state, large) for large in (False, True)}
    for tile in tiles:
        common = dict(io_dtype=io, state_dtype=state, num_heads=16, num_v_heads=32, head_k_dim=128, head_v_dim=128,
                      pool_size=64, max_tokens=4, ring_len=16, use_qk_l2norm=l2norm, config=tile)
        assert callable(replay_kernel.compile_replay(num_tokens=4, gate_mode=gate_mode, dt_bias_dtype=bias, **common))
        if gates == ("precomputed", None):
            assert callable(replay_kernel.compile_replay(num_tokens=0, gate_mode=gate_mode, dt_bias_dtype=bias,
                                                         **common))


@pytest.mark.parametrize("T,max_tokens,ring_len", [(1, 8, 16), (2, 4, 8), (8, 8, 16), (3, 4, 64)])
def test_replay_token_counts_and_ring_lengths_compile(T, max_tokens, ring_len):
    assert callable(replay_kernel.compile_replay(
        io_dtype="bfloat16", state_dtype="float32", num_heads=2, num_v_heads=8, head_k_dim=128, head_v_dim=128,
        pool_size=9, num_tokens=T, max_tokens=max_tokens, ring_len=ring_len, gate_mode="raw", dt_bias_dtype="float32",
        use_qk_l2norm=True, config=replay_kernel.replay_tile(128, 128, "float32")))


@pytest.mark.parametrize("H,HV,K,V,state", [(2, 8, 64, 32, "float32"), (3, 3, 96, 48, "bfloat16"),
                                            (2, 2, 16, 16, "bfloat16")])
def test_replay_awkward_shapes_compile(H, HV, K, V, state):
    tile = replay_kernel.replay_tile(K, V, state)
    assert replay_kernel.can_implement("bfloat16", state, H, HV, K, V, "raw", "float32", 4, 4, 16, tile) is None
    assert callable(replay_kernel.compile_replay(
        io_dtype="bfloat16", state_dtype=state, num_heads=H, num_v_heads=HV, head_k_dim=K, head_v_dim=V, pool_size=5,
        num_tokens=4, max_tokens=4, ring_len=16, gate_mode="raw", dt_bias_dtype="float32", use_qk_l2norm=True,
        config=tile))


@pytest.mark.parametrize("mode", replay_cursor_kernel.CURSOR_MODES)
def test_replay_cursor_kernels_compile(mode):
    assert callable(replay_cursor_kernel.compile_cursor(pool_size=33, ring_len=16, max_tokens=4, mode=mode))


def test_replay_can_implement_names_the_reason():
    tile = replay_kernel.replay_tile(128, 128, "float32")
    assert "ring_len" in replay_kernel.can_implement("bfloat16", "float32", 16, 32, 128, 128, "raw", "float32", 4, 4,
                                                     7, tile)
    assert "T must be" in replay_kernel.can_implement("bfloat16", "float32", 16, 32, 128, 128, "raw", "float32", 5, 4,
                                                      16, tile)
    assert "mode" in replay_cursor_kernel.can_implement_cursor(8, 16, 4, "rewind")
    with pytest.raises(ValueError, match="ring_len"):
        replay_cursor_kernel.compile_cursor(pool_size=8, ring_len=70, max_tokens=4, mode="commit")


# ---- replay, fold="compact" ----

from cute_gdn import replay as replay_ops  # noqa: E402

# (state, io, gates, l2norm, H, HV, K, V, T, max_tokens, ring_len, tile): the keys serving builds for the
# compact fold (replay.replay_verify_key), compiled as the cache compiles them. Both compact tiles of both state
# dtypes (the large-batch one, 4 x 64 x 2, is compact's own), raw gates with either dt_bias and
# precomputed ones, T = 1 and T = max_tokens = 8, GVA ratios 2 and 4, fp16 io without the q/k l2norm.
COMPACT_VARIANTS = [
    ("float32", "bfloat16", ("raw", "float32"), True, 16, 32, 128, 128, 4, 4, 16, "small"),
    ("float32", "bfloat16", ("raw", "float32"), True, 16, 32, 128, 128, 4, 4, 16, "large"),
    ("float32", "bfloat16", ("precomputed", None), True, 16, 32, 128, 128, 1, 8, 16, "small"),
    ("float32", "bfloat16", ("raw", "bfloat16"), True, 16, 32, 128, 128, 8, 8, 16, "large"),
    ("bfloat16", "bfloat16", ("raw", "bfloat16"), True, 16, 32, 128, 128, 4, 4, 16, "small"),
    ("bfloat16", "bfloat16", ("precomputed", None), True, 16, 32, 128, 128, 8, 8, 16, "large"),
    ("bfloat16", "float16", ("raw", "float32"), False, 16, 32, 128, 128, 1, 4, 8, "large"),
    ("float32", "bfloat16", ("raw", "float32"), True, 2, 8, 64, 32, 4, 4, 16, "small"),
]


@pytest.mark.parametrize("state,io,gates,l2norm,H,HV,K,V,T,max_tokens,ring_len,tile", COMPACT_VARIANTS)
def test_replay_compact_fold_compiles_for_sm90a(state, io, gates, l2norm, H, HV, K, V, T, max_tokens, ring_len, tile):
    gate_mode, bias = gates
    small, large = replay_ops.replay_verify_keys(
        io_dtype=io, state_dtype=state, num_heads=H, num_v_heads=HV, head_k_dim=K, head_v_dim=V, pool_size=9,
        num_tokens=T, max_tokens=max_tokens, ring_len=ring_len, gate_mode=gate_mode, dt_bias_dtype=bias,
        use_qk_l2norm=l2norm, fold_mode="compact")
    key = small if tile == "small" else large
    assert key.kwargs["fold_mode"] == "compact"
    assert key.kwargs["config"] == replay_kernel.replay_tile(K, V, state, tile == "large", "compact")
    assert callable(replay_kernel.compile_replay(**key.kwargs))


def test_replay_fold_mode_is_checked_and_the_flush_key_ignores_compact():
    tile = replay_kernel.replay_tile(128, 128, "float32")
    assert "fold_mode" in replay_kernel.can_implement("bfloat16", "float32", 16, 32, 128, 128, "raw", "float32", 4, 4,
                                                      16, tile, "fast")
    # the flush kernel (T = 0) has no fold mode of its own: its key is the exact one whatever is asked
    key, _ = replay_ops.replay_verify_keys(
        io_dtype="bfloat16", state_dtype="float32", num_heads=16, num_v_heads=32, head_k_dim=128, head_v_dim=128,
        pool_size=9, num_tokens=0, max_tokens=4, ring_len=16, gate_mode="precomputed", dt_bias_dtype=None,
        use_qk_l2norm=True, fold_mode="compact")
    assert key == replay_ops.replay_flush_key(io_dtype="bfloat16", state_dtype="float32", num_heads=16,
                                              num_v_heads=32, head_k_dim=128, head_v_dim=128, pool_size=9,
                                              max_tokens=4, ring_len=16, use_qk_l2norm=True)
