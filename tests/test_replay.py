"""cute_gdn.replay on the CPU: ring and cursor construction, sizes and the fold threshold, reset_cursors,
every validation reason (the device checks patched out where they come first), the hot path's dispatch
(recorded by a fake kernel cache: tile choice, argument order, gates, scale), the cursor and flush ops'
refusals, the host cursor model of tests/test_replay_gpu.py, that module's kernel list, and that SGLang's
ReplaySSM module imports nothing the peer does not provide. Nothing is compiled."""

import ast
import sys

import pytest
import torch

import sglang_peer
import test_replay_gpu as gpu_tests
from cute_gdn import ops, replay
from cute_gdn.cache import KernelCache
from cute_gdn.kernels.replay import MAX_RING_LEN
from cute_gdn.kernels.verify import LARGE_BATCH_HEADS, MAX_TOKENS

B, T, H, HV, K, V, POOL, L = 3, 4, 2, 4, 16, 32, 5, 16
BF = torch.bfloat16


def _inputs(T=T, raw=True):
    x = dict(q=torch.randn(B, T, H, K, dtype=BF), k=torch.randn(B, T, H, K, dtype=BF),
             v=torch.randn(B, T, HV, V, dtype=BF))
    if raw:
        x.update(a=torch.randn(B, T, HV, dtype=BF), b=torch.randn(B, T, HV, dtype=BF), A_log=torch.zeros(HV),
                 dt_bias=torch.zeros(HV))
    else:
        x.update(g=-torch.rand(B, T, HV), beta=torch.rand(B, T, HV))
    return x


def _setup(ring_len=L, max_tokens=T):
    state = torch.randn(POOL, HV, V, K)
    ring = replay.make_replay_ring(POOL, H, HV, K, V, ring_len=ring_len, device="cpu")
    cursors = replay.make_replay_cursors(POOL, max_tokens=max_tokens, ring_len=L, device="cpu")
    slots = torch.tensor([3, -1, 0], dtype=torch.int32)
    return state, ring, cursors, slots


# ---------------------------------------------------------------------------------------------------
# Construction, sizes, threshold, reset_cursors
# ---------------------------------------------------------------------------------------------------

def test_make_replay_ring_fields():
    ring = replay.make_replay_ring(POOL, H, HV, K, V, ring_len=L, io_dtype=torch.float16, device="cpu")
    assert ring._fields == ("k", "v", "d", "gb") and ring.ring_len == L
    expected = {"k": ((POOL, H, L, K), torch.float16), "v": ((POOL, HV, L, V), torch.float16),
                "d": ((POOL, HV, L, V), torch.float32), "gb": ((POOL, HV, L, 4), torch.float32)}
    for name, (shape, dtype) in expected.items():
        x = getattr(ring, name)
        assert x.shape == shape and x.dtype == dtype and x.is_contiguous() and not x.any(), name
    with pytest.raises(TypeError, match="io_dtype"):
        replay.make_replay_ring(POOL, H, HV, K, V, io_dtype=torch.float32, device="cpu")
    for bad in (0, MAX_RING_LEN + 1):
        with pytest.raises(ValueError, match="ring_len"):
            replay.make_replay_ring(POOL, H, HV, K, V, ring_len=bad, device="cpu")


def test_ring_bytes_by_hand_and_of_the_allocated_ring():
    # Qwen3-Next: H=16, HV=32, K=V=128, L=16, bf16 io. Per token: raw k 16*128*2 = 4096; per value head
    # raw v 128*2 + d 128*4 + (g, beta, k scale, unused) 16 = 784, times 32 = 25088. 29184 per token, 16 tokens.
    assert replay.ring_bytes(16, 32, 128, 128, 16) == 16 * 29184 == 466944
    assert replay.ring_bytes(16, 32, 128, 128, 16, io_dtype=torch.float16) == 466944
    ring = replay.make_replay_ring(POOL, H, HV, K, V, ring_len=L, device="cpu")
    per_slot = sum(t.numel() * t.element_size() for t in ring) // POOL
    assert replay.ring_bytes(H, HV, K, V, L) == per_slot


def test_fold_threshold_and_ring_config():
    assert replay.fold_threshold(16, 4) == 8 and replay.fold_threshold(16, 8) == 0
    cursors = replay.make_replay_cursors(POOL, max_tokens=4, ring_len=16, device="cpu")
    assert cursors.fold_threshold == 8 and cursors.pos.shape == (POOL, 2) and cursors.pos.dtype == torch.int32
    assert not cursors.pos.any()
    assert replay.check_ring_config(16, 4) is None and replay.check_ring_config(8, 4) is None
    assert replay.check_ring_config(MAX_RING_LEN, MAX_TOKENS) is None
    assert "max_tokens" in replay.check_ring_config(16, 0)
    assert "max_tokens" in replay.check_ring_config(64, MAX_TOKENS + 1)
    assert "ring_len" in replay.check_ring_config(7, 4)
    assert "ring_len" in replay.check_ring_config(MAX_RING_LEN + 1, 4)
    with pytest.raises(ValueError, match="ring_len"):
        replay.make_replay_cursors(POOL, max_tokens=8, ring_len=15, device="cpu")


def test_cursors_carry_the_fold():
    assert replay.FOLD_MODES == ("exact", "compact")
    assert replay.make_replay_cursors(POOL, max_tokens=4, ring_len=16, device="cpu").fold == "exact"
    assert replay.make_replay_cursors(POOL, max_tokens=4, ring_len=16, fold="compact", device="cpu").fold == "compact"
    assert replay.ReplayCursors(torch.zeros(POOL, 2, dtype=torch.int32), 16, 4).fold == "exact"
    with pytest.raises(ValueError, match="fold must be one of"):
        replay.make_replay_cursors(POOL, max_tokens=4, ring_len=16, fold="fast", device="cpu")


def test_config_keys_take_the_fold_of_replay_verify_only():
    problem = dict(io_dtype="bfloat16", state_dtype="float32", num_heads=16, num_v_heads=32, head_k_dim=128,
                   head_v_dim=128, pool_size=64, max_tokens=4, ring_len=16, use_qk_l2norm=True,
                   gate_variants=[("raw", "float32"), ("precomputed", None)])
    folds = {}
    for fold in (None, "exact", "compact"):
        keys = replay.config_keys(**problem) if fold is None else replay.config_keys(**problem, fold_mode=fold)
        verify = {k.kwargs["fold_mode"] for k in keys if k.op == "replay" and k.kwargs["num_tokens"] > 0}
        flush = {k.kwargs["fold_mode"] for k in keys if k.op == "replay" and k.kwargs["num_tokens"] == 0}
        assert flush == {"exact"} and len(set(keys)) == len(keys)
        folds[fold] = verify
    assert folds == {None: {"exact"}, "exact": {"exact"}, "compact": {"compact"}}


def _cursors_with(values):
    cursors = replay.make_replay_cursors(len(values), max_tokens=4, ring_len=16, device="cpu")
    cursors.pos.copy_(torch.tensor(values, dtype=torch.int32))
    return cursors


def test_reset_cursors_zeroes_named_slots_only():
    cursors = _cursors_with([[3, 5], [1, 2], [7, 1], [2, 2]])
    replay.reset_cursors(cursors, torch.tensor([2, -1, 3], dtype=torch.int32))
    assert cursors.pos.tolist() == [[3, 5], [1, 2], [0, 0], [0, 0]]


def test_reset_cursors_slot_zero_next_to_padding():
    cursors = _cursors_with([[3, 5], [1, 2], [7, 1], [2, 2]])
    replay.reset_cursors(cursors, torch.tensor([0, -1, 2], dtype=torch.int32))
    assert cursors.pos.tolist() == [[0, 0], [1, 2], [0, 0], [2, 2]]


# ---------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------

@pytest.fixture
def no_token_checks(monkeypatch):
    """ops.validate_tokens checks for a CUDA device first; the ring and cursor checks after it do not."""
    monkeypatch.setattr(ops, "validate_tokens", lambda *args: ("raw", "float32"))


def _validate(x, state, ring, cursors, slots):
    return replay.validate_replay_verify(x["q"], x["k"], x["v"], x.get("a"), x.get("b"), x.get("A_log"),
                                         x.get("dt_bias"), x.get("g"), x.get("beta"), state, slots, ring, cursors,
                                         None)


BAD_RING_CASES = {
    "not a ReplayRing": (TypeError, "ring"),
    "ring_len mismatch": (ValueError, "ring_len"),
    "T above max_tokens": (ValueError, "max_tokens"),
    "ring.k dtype": (TypeError, "ring.k"),
    "ring.k heads": (ValueError, "ring.k"),
    "ring.v dims": (ValueError, "ring.v"),
    "ring.d dtype": (TypeError, "ring.d"),
    "ring.gb noncontiguous": (ValueError, "ring.gb"),
    "cursors type": (TypeError, "cursors"),
    "cursors.pos dtype": (TypeError, "cursors.pos"),
    "cursors.pos pool": (ValueError, "cursors.pos"),
    "cursors config": (ValueError, "cursors"),
    "cursors.fold": (ValueError, "cursors.fold must be one of"),
    "state noncontiguous": (ValueError, "state"),
}


@pytest.mark.parametrize("case", list(BAD_RING_CASES))
def test_validate_replay_verify_names_the_argument(case, no_token_checks):
    state, ring, cursors, slots = _setup()
    x = _inputs()
    assert _validate(x, state, ring, cursors, slots) == ("raw", "float32")
    if case == "not a ReplayRing":
        ring = tuple(ring)
    elif case == "ring_len mismatch":
        ring = replay.make_replay_ring(POOL, H, HV, K, V, ring_len=L * 2, device="cpu")
    elif case == "T above max_tokens":
        x = _inputs(T=T + 1)
    elif case == "ring.k dtype":
        ring = ring._replace(k=ring.k.half())
    elif case == "ring.k heads":
        ring = ring._replace(k=torch.zeros(POOL, H + 1, L, K, dtype=BF))
    elif case == "ring.v dims":
        ring = ring._replace(v=torch.zeros(POOL, HV, L, V // 2, dtype=BF))
    elif case == "ring.d dtype":
        ring = ring._replace(d=ring.d.to(BF))
    elif case == "ring.gb noncontiguous":
        ring = ring._replace(gb=torch.zeros(POOL, HV, 4, L).transpose(2, 3))
    elif case == "cursors type":
        cursors = cursors.pos
    elif case == "cursors.pos dtype":
        cursors = cursors._replace(pos=cursors.pos.long())
    elif case == "cursors.pos pool":
        cursors = cursors._replace(pos=torch.zeros(POOL + 1, 2, dtype=torch.int32))
    elif case == "cursors config":
        cursors = cursors._replace(max_tokens=L)
    elif case == "cursors.fold":
        cursors = cursors._replace(fold="fast")
    else:
        state = torch.randn(POOL, HV, K, V).transpose(2, 3)
    error, name = BAD_RING_CASES[case]
    with pytest.raises(error, match=name):
        _validate(x, state, ring, cursors, slots)


def test_public_ops_refuse_cpu_tensors_before_any_write():
    state, ring, cursors, slots = _setup()
    before = state.clone(), [t.clone() for t in ring], cursors.pos.clone()
    with pytest.raises(ValueError, match="q must be on a CUDA device"):
        replay.replay_verify(**_inputs(), state=state, state_indices=slots, ring=ring, cursors=cursors)
    with pytest.raises(ValueError, match="cursors must be on a CUDA device"):
        replay.replay_commit(cursors, slots, torch.ones(B, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"states\[0\] must be on a CUDA device"):
        replay.replay_flush(state, ring, cursors, slots)
    with pytest.raises(ValueError, match="same layers"):
        replay.replay_flush([state, state], [ring], cursors, slots)
    with pytest.raises(TypeError, match="cursors"):
        replay.replay_commit(cursors.pos, slots, torch.ones(B, dtype=torch.int32))
    assert torch.equal(state, before[0]) and torch.equal(cursors.pos, before[2])
    assert all(torch.equal(x, y) for x, y in zip(ring, before[1]))


def test_debug_cursor_check_reports_an_invalid_cursor():
    cursors = _cursors_with([[3, 5], [1, 2], [7, 13], [2, 2]])  # count 13 > L - max_tokens = 12
    replay._debug_cursors(cursors, torch.tensor([0, 1, -1], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cursors.pos\[2\] = \[7, 13\]"):
        replay._debug_cursors(cursors, torch.tensor([0, 2], dtype=torch.int32))


# ---------------------------------------------------------------------------------------------------
# The hot path, with a fake kernel cache
# ---------------------------------------------------------------------------------------------------

def _verify_sig(x, state, cursors, raw=True, l2=True):
    return ("replay", x["q"].dtype, state.dtype, H, K, x["q"].shape[1], HV, V, POOL, cursors.ring_len,
            cursors.max_tokens, cursors.fold, x["dt_bias"].dtype if raw else None, l2, True)


def _fake_cache(sig, calls, threshold):
    cache = KernelCache("/nonexistent-cute-gdn-cache")
    cache.by_signature[sig] = (threshold, lambda *a: calls.append(("small", a)), lambda *a: calls.append(("large", a)))
    return cache


@pytest.mark.parametrize("raw", [True, False])
@pytest.mark.parametrize("threshold", [B * HV, B * HV + 1])  # B * HV at the threshold: the large tile
def test_hot_path_dispatch_and_arguments(raw, threshold):
    state, ring, cursors, slots = _setup()
    x = _inputs(raw=raw)
    calls = []
    cache = _fake_cache(_verify_sig(x, state, cursors, raw), calls, threshold)
    o = replay._replay_verify(cache, False, None, x["q"], x["k"], x["v"], x.get("a"), x.get("b"), x.get("A_log"),
                              x.get("dt_bias"), x.get("g"), x.get("beta"), state, slots, ring, cursors, None, True,
                              None)
    (tile, args), = calls
    assert tile == ("large" if B * HV >= threshold else "small")
    gates = (x["a"], x["b"], x["A_log"], x["dt_bias"]) if raw else (x["g"], x["beta"], None, None)
    expected = (x["q"], x["k"], x["v"], *gates, state, slots, ring.k, ring.v, ring.d, ring.gb, cursors.pos, o)
    assert len(args) == 16 and all(a is e for a, e in zip(args[:15], expected))
    assert args[15] == K ** -0.5 and o.shape == x["v"].shape and o.dtype == BF


def test_hot_path_wrong_ring_type_names_ring():
    state, ring, cursors, slots = _setup()
    x = _inputs()
    calls = []
    cache = _fake_cache(_verify_sig(x, state, cursors), calls, 1 << 30)
    with pytest.raises(TypeError, match="ring"):
        replay._replay_verify(cache, False, None, x["q"], x["k"], x["v"], x["a"], x["b"], x["A_log"], x["dt_bias"],
                              None, None, state, slots, tuple(ring), cursors, None, True, None)
    assert calls == []


def test_cursor_ops_hot_path_arguments():
    _, ring, cursors, slots = _setup()
    calls = []
    cache = KernelCache("/nonexistent-cute-gdn-cache")
    for mode in ("commit", "flush"):
        cache.by_signature[("replay_cursor", mode, POOL, L, T)] = lambda *a, mode=mode: calls.append((mode, a))
    accepted = torch.tensor([4, 0, 2], dtype=torch.int32)
    replay._replay_commit(cache, False, cursors, slots, accepted)
    replay._cursor_call(cache, False, cursors, slots, None, "flush")
    replay._replay_commit(cache, False, cursors, slots[:0], accepted[:0])  # an empty batch launches nothing
    assert [mode for mode, _ in calls] == ["commit", "flush"]
    assert all(a is e for a, e in zip(calls[0][1], (cursors.pos, slots, accepted)))
    assert calls[1][1][0] is cursors.pos and calls[1][1][1] is slots and calls[1][1][2] is slots


def test_cursor_op_rejected_launch_names_the_argument():
    _, _, cursors, slots = _setup()
    cache = KernelCache("/nonexistent-cute-gdn-cache")

    def rejects(*args):  # what the tvm-ffi function does with an int64 vector
        raise TypeError("Mismatched type on argument #2")

    cache.by_signature[("replay_cursor", "commit", POOL, L, T)] = rejects
    with pytest.raises(TypeError, match="num_accepted"):
        replay._replay_commit(cache, False, cursors, slots, torch.ones(B, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------------
# The host cursor model and the GPU module's kernel list
# ---------------------------------------------------------------------------------------------------

def test_cursor_model_by_hand():
    model = gpu_tests.CursorModel(torch.tensor([[0, 0], [14, 8], [5, 3]]), ring_len=16, max_tokens=4)
    slots = [1, -1, 0, 2]
    assert model.verify(slots) == {1: False, 0: False, 2: False}
    assert model.candidate_positions(1, 4) == [6, 7, 8, 9]  # (14 + 8 + t) mod 16
    model.commit(slots, [3, 4, 4, 9])                         # 9 is clamped to max_tokens
    assert model.pos.tolist() == [[0, 4], [14, 11], [5, 7]]
    assert model.verify(slots) == {1: True, 0: False, 2: False}  # 11 > 16 - 2 * 4
    model.commit(slots, [0, 4, 2, 1])
    assert model.pos.tolist() == [[0, 6], [9, 0], [5, 8]]     # the fold moved start by 11, count = 0
    model.flush([2, -1])
    assert model.pos.tolist() == [[0, 6], [9, 0], [13, 0]]
    model.reset([0])
    assert model.pos.tolist() == [[0, 0], [9, 0], [13, 0]]
    with pytest.raises(AssertionError):
        model.commit(slots, [0, 0, 0, 0])  # a commit needs its verify


def test_gpu_module_kernel_list():
    keys = gpu_tests.gpu_kernel_keys()
    assert len(keys) == len(set(keys))
    for key in keys:
        ops.can_implement_key(key)
    # The keys replay_verify, replay_flush and replay_commit build for the cases the tests call with.
    base = gpu_tests.BASE
    p = base.problem()
    for large in (False, True):
        assert replay.replay_verify_key(num_tokens=4, max_tokens=4, ring_len=16, gate_mode="raw",
                                        dt_bias_dtype="float32", use_qk_l2norm=True, large_batch=large, **p) in keys
    wide = gpu_tests.Case(shape=gpu_tests.WIDE).problem()
    assert replay.replay_flush_key(max_tokens=4, ring_len=16, use_qk_l2norm=True, large_batch=True, **wide) in keys
    assert gpu_tests.POOL * gpu_tests.WIDE[1] >= LARGE_BATCH_HEADS["float32"] == gpu_tests.LARGE_TILE_ROWS
    assert replay.replay_cursor_key(pool_size=gpu_tests.POOL, ring_len=16, max_tokens=8, mode="flush") in keys


def test_config_keys_cover_every_token_count_gate_variant_and_tile():
    keys = replay.config_keys(io_dtype="bfloat16", state_dtype="float32", num_heads=16, num_v_heads=32,
                              head_k_dim=128, head_v_dim=128, pool_size=64, max_tokens=4, ring_len=16,
                              use_qk_l2norm=True, gate_variants=[("raw", "float32"), ("precomputed", None)])
    ops_count = {op: sum(k.op == op for k in keys) for op in ("replay", "replay_cursor")}
    # fp32 state takes one replay tile for small and large batches (kernels/replay.py), so both keys coincide.
    assert ops_count == {"replay": 4 * 2 + 1, "replay_cursor": 2}
    bf16 = replay.config_keys(io_dtype="bfloat16", state_dtype="bfloat16", num_heads=16, num_v_heads=32,
                              head_k_dim=128, head_v_dim=128, pool_size=64, max_tokens=4, ring_len=16,
                              use_qk_l2norm=True, gate_variants=[("raw", "float32"), ("precomputed", None)])
    assert sum(k.op == "replay" for k in bf16) == 4 * 2 * 2 + 2
    assert len(set(keys)) == len(keys)


# ---------------------------------------------------------------------------------------------------
# SGLang's ReplaySSM module loads through the peer
# ---------------------------------------------------------------------------------------------------

def test_replayssm_module_needs_only_what_the_peer_provides():
    """Every import-time `from sglang... import` of gdn_replayssm_spec_decode.py (and of what it pulls in)
    resolves to a file of the sglang directory or to a stand-in that defines the names."""
    root = sglang_peer.sglang_dir()
    if root is None:
        pytest.skip("sglang 0.5.23 not found (pip install --no-deps sglang==0.5.23, or set CUTE_GDN_SGLANG_DIR)")
    todo, seen, third_party = [sglang_peer.REPLAYSSM], set(), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = root.joinpath(*name.split(".")[1:]).with_suffix(".py")
        assert path.is_file(), name
        tree = ast.parse(path.read_text())
        nodes, stack = [], [tree]
        while stack:  # import-time nodes: everything but function bodies
            node = stack.pop()
            nodes.append(node)
            stack += [c for c in ast.iter_child_nodes(node)
                      if not isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for node in nodes:
            if isinstance(node, ast.Import):
                third_party |= {a.name.split(".")[0] for a in node.names}
            if not isinstance(node, ast.ImportFrom) or not node.module:
                continue
            if not node.module.startswith("sglang"):
                third_party.add(node.module.split(".")[0])
            elif node.module in sglang_peer.STANDINS:
                assert not {a.name for a in node.names} - set(sglang_peer.STANDINS[node.module]), (name, node.module)
            elif node.module in sglang_peer.STUB_PACKAGES:
                todo += [f"{node.module}.{a.name}" for a in node.names]
            else:
                todo.append(node.module)
    assert "sglang.kernels.ops.attention.fla.utils" in seen
    assert third_party - set(sys.stdlib_module_names) <= {"torch", "triton", "packaging"}


def test_tiles_fit_shared_memory():
    """A tile that does not fit in shared memory falls back to one that does; where none does the kernel set
    is refused with the reason (kernels/replay.py smem_bytes)."""
    from cute_gdn.kernels import replay as rk
    from cute_gdn.kernels.verify import VerifyConfig

    wide = VerifyConfig(4, 64, 2)
    assert rk.replay_tile(128, 128, "float32", True, "compact", num_tokens=4, ring_len=16) == wide
    assert rk.check_tile(wide, 128, 128, "float32", 2, 16, 64) is not None  # 273 KB
    small = rk.replay_tile(128, 128, "float32", True, "compact", num_tokens=16, ring_len=64)
    assert small != wide and rk.check_tile(small, 128, 128, "float32", 2, 16, 64) is None
    for T, L in ((1, 16), (4, 16), (8, 16), (16, 32), (13, 64)):
        for state in ("float32", "bfloat16"):
            for fold in rk.FOLD_MODES:
                for large in (False, True):
                    tile = rk.replay_tile(256, 256, state, large, fold, num_tokens=T, ring_len=L)
                    assert rk.smem_bytes(tile, 256, state, 2, T, L) <= rk.SMEM_LIMIT, (T, L, state, fold, large)
    reason = rk.can_implement("bfloat16", "float32", 16, 32, 256, 256, "raw", "float32", 16, 16, 64,
                              rk.replay_tile(256, 256, "float32", False, num_tokens=16, ring_len=64))
    assert reason is not None and "shared memory" in reason
    # Ring rows are staged in 16-byte vectors: a 4-row tile is refused, not mis-staged.
    assert "16-byte" in rk.check_tile(VerifyConfig(8, 4, 1), 128, 128, "float32", 2, 4, 16)
