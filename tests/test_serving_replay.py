"""GDNKernels' replay mode on the CPU: the kernel set, the buffers it sizes, the dispatch of target_verify by
spec_mode (the other protocol's arguments refused), the config checks of rings and cursors, and that after
warmup() the replay ops run with compiling disabled. The replay ops themselves are recorded, not run."""

import inspect

import pytest
import torch

from cute_gdn import GDNKernels, ops, replay, serving
from cute_gdn.cache import KernelNotCompiledError

H, HV, K, V = 2, 4, 64, 64
POOL, STEPS, L = 8, 2, 8


def make(**kwargs):
    cfg = dict(pool_size=POOL, cache_steps=STEPS, spec_mode="replay", ring_len=L, device="cpu")
    cfg.update(kwargs)
    return GDNKernels(H, HV, K, V, **cfg)


class Recorder:
    """Stands in for a private op (replay._replay_verify, ops.verify_using, ...): checks the call binds to the
    real signature and records it."""

    def __init__(self, real):
        self.signature = inspect.signature(real)
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append(self.signature.bind(*args, **kwargs).arguments)
        return torch.zeros(1)


@pytest.fixture
def recorded(monkeypatch):
    recs = {}
    for module, name in ((replay, "_replay_verify"), (replay, "_replay_commit"), (replay, "_replay_flush"),
                         (ops, "verify_using"), (ops, "commit_using")):
        recs[name] = Recorder(getattr(module, name))
        monkeypatch.setattr(module, name, recs[name])
    return recs


def tokens(T=STEPS, B=3):
    return (torch.randn(B, T, H, K, dtype=torch.bfloat16), torch.randn(B, T, H, K, dtype=torch.bfloat16),
            torch.randn(B, T, HV, V, dtype=torch.bfloat16))


def state():
    return torch.zeros(POOL, HV, V, K)


# ---- the kernel set ----

def test_replay_mode_replaces_verify_and_commit_by_the_replay_keys():
    cached = make(spec_mode="cached")
    replayed = make()
    problem = dict(io_dtype="bfloat16", state_dtype="float32", num_heads=H, num_v_heads=HV, head_k_dim=K,
                   head_v_dim=V, pool_size=POOL, use_qk_l2norm=True)
    want = replay.config_keys(max_tokens=STEPS, ring_len=L, gate_variants=serving.GATE_VARIANTS, **problem)
    assert [k for k in replayed.keys if k.op in ("replay", "replay_cursor")] == want
    assert not any(k.op in ("verify", "commit") for k in replayed.keys)
    # decode (and prefill where the dims allow it) are the same in both modes
    assert [k for k in replayed.keys if k.op == "decode"] == [k for k in cached.keys if k.op == "decode"]
    # T = 1, 2 x 3 gate variants x 2 tiles, the flush kernel (its tiles), the commit and flush cursor kernels
    flush = [k for k in want if k.op == "replay" and k.kwargs["num_tokens"] == 0]
    assert 6 <= len([k for k in want if k.op == "replay" and k.kwargs["num_tokens"] > 0]) <= 12 and 1 <= len(flush) <= 2
    verify = [k for k in want if k.op == "replay" and k.kwargs["num_tokens"] > 0]
    assert len(want) == len(verify) + len(flush) + 2
    assert {k.kwargs["ring_len"] for k in want} == {L} and {k.kwargs["max_tokens"] for k in want} == {STEPS}
    assert sorted(k.kwargs["mode"] for k in want if k.op == "replay_cursor") == ["commit", "flush"]
    assert len(cached.keys) == 6 + 12 + 2 and len(replayed.keys) == 6 + len(want)


@pytest.mark.parametrize("kwargs,message", [
    (dict(spec_mode="tree"), "spec_mode must be one of"),
    (dict(cache_steps=0), "cache_steps"),
    (dict(ring_len=2 * STEPS - 1), "ring_len=3 with cache_steps=2"),
    (dict(ring_len=65), "ring_len=65"),
    (dict(replay_fold="fast"), "replay_fold must be one of \\['exact', 'compact'\\], got 'fast'"),
    (dict(replay_fold=None), "replay_fold must be one of"),
    (dict(replay_fold="compact", spec_mode="cached"), "replay_fold='compact' belongs to spec_mode='replay'"),
])
def test_bad_replay_configs_raise_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**kwargs)
    with pytest.raises(ValueError, match=message):
        serving.config_keys(H, HV, K, V, pool_size=POOL, **{**dict(cache_steps=STEPS, spec_mode="replay",
                                                                   ring_len=L), **kwargs})


def test_cached_mode_ignores_ring_len():
    assert make(spec_mode="cached", ring_len=3).ring_len is None


# ---- the fold (replay_fold) ----

def _fold_modes(keys):
    return {k.kwargs["fold_mode"] for k in keys if k.op == "replay" and k.kwargs["num_tokens"] > 0}


def test_replay_fold_selects_the_verify_kernels_and_the_cursors():
    exact, compact = make(), make(replay_fold="compact")
    assert exact.replay_fold == "exact" and compact.replay_fold == "compact"
    assert _fold_modes(exact.keys) == {"exact"} and _fold_modes(compact.keys) == {"compact"}
    problem = dict(io_dtype="bfloat16", state_dtype="float32", num_heads=H, num_v_heads=HV, head_k_dim=K,
                   head_v_dim=V, pool_size=POOL, use_qk_l2norm=True)
    want = replay.config_keys(max_tokens=STEPS, ring_len=L, gate_variants=serving.GATE_VARIANTS,
                              fold_mode="compact", **problem)
    assert [k for k in compact.keys if k.op in ("replay", "replay_cursor")] == want
    # the same kernels but replay verify's: the flush and cursor kernels (always exact) are shared
    def verify(keys):
        return [k for k in keys if k.op == "replay" and k.kwargs["num_tokens"] > 0]

    assert [k for k in exact.keys if k not in verify(exact.keys)] == \
        [k for k in compact.keys if k not in verify(compact.keys)]
    assert not set(verify(compact.keys)) & set(verify(exact.keys))
    # one verify signature per (T, gate variant) in each fold; each fold picks its own tiles
    def signatures(keys):
        return {tuple((n, x) for n, x in k.params if n not in ("fold_mode", "config")) for k in verify(keys)}

    assert signatures(compact.keys) == signatures(exact.keys) and len(signatures(exact.keys)) == STEPS * 3
    flush = [k for k in compact.keys if k.op == "replay" and k.kwargs["num_tokens"] == 0]
    assert flush and {k.kwargs["fold_mode"] for k in flush} == {"exact"}
    assert compact.make_cursors().fold == "compact" and exact.make_cursors().fold == "exact"
    assert serving.config_keys(H, HV, K, V, pool_size=POOL, cache_steps=STEPS, spec_mode="replay", ring_len=L,
                               replay_fold="compact") == compact.keys
    assert _fold_modes(serving.config_keys(H, HV, K, V, pool_size=POOL, cache_steps=STEPS, spec_mode="replay",
                                           ring_len=L)) == {"exact"}


def test_cached_mode_has_no_fold():
    assert make(spec_mode="cached").replay_fold is None
    assert make(spec_mode="cached", replay_fold="exact").replay_fold is None


def test_cursors_of_the_other_fold_are_refused(recorded):
    exact, compact = make(), make(replay_fold="compact")
    idx = torch.zeros(1, dtype=torch.int32)
    for kern, other in ((exact, compact), (compact, exact)):
        ring, theirs = kern.make_ring(), other.make_cursors()
        with pytest.raises(ValueError, match=f"fold='{theirs.fold}'.*replay_fold='{kern.replay_fold}'"):
            kern.replay_commit(theirs, idx, idx)
        with pytest.raises(ValueError, match="cursors were made for"):
            kern._check_config(tokens()[0], state(), ring, theirs)
        with pytest.raises(ValueError, match="cursors were made for"):
            kern._check_config(None, state(), ring, theirs)  # replay_flush's call
        kern._check_config(tokens()[0], state(), ring, kern.make_cursors())
    assert not recorded["_replay_commit"].calls


# ---- buffers ----

def test_make_ring_and_cursors_are_sized_from_the_config():
    kern = make()
    ring, cursors = kern.make_ring(), kern.make_cursors()
    assert ring.k.shape == (POOL, H, L, K) and ring.k.dtype == torch.bfloat16
    assert ring.v.shape == (POOL, HV, L, V) and ring.d.shape == (POOL, HV, L, V) and ring.d.dtype == torch.float32
    assert ring.gb.shape[:3] == (POOL, HV, L) and ring.gb.dtype == torch.float32 and ring.ring_len == L
    assert cursors.pos.shape == (POOL, 2) and cursors.pos.dtype == torch.int32 and not cursors.pos.any()
    assert (cursors.ring_len, cursors.max_tokens) == (L, STEPS)
    assert ring.k.device.type == "cpu"
    per_slot = sum(t[0].numel() * t.element_size() for t in ring)
    assert kern.ring_bytes() == per_slot == replay.ring_bytes(H, HV, K, V, L, torch.bfloat16)
    for name in ("make_ring", "make_cursors", "ring_bytes"):
        with pytest.raises(ValueError, match="spec_mode='replay'"):
            getattr(make(spec_mode="cached"), name)()


# ---- dispatch ----

def test_target_verify_dispatches_by_spec_mode(recorded):
    kern = make()
    ring, cursors = kern.make_ring(), kern.make_cursors()
    q, k, v = tokens()
    g, beta = torch.zeros(3, STEPS, HV), torch.ones(3, STEPS, HV)
    idx = torch.tensor([1, -1, 5], dtype=torch.int32)
    pool = state()
    kern.forward("target_verify", q, k, v, g=g, beta=beta, state=pool, state_indices=idx, ring=ring, cursors=cursors)
    call, = recorded["_replay_verify"].calls
    assert call["ring"] is ring and call["cursors"] is cursors and call["state"] is pool and call["q"] is q
    assert call["allow_compile"] is True and call["use_qk_l2norm"] is True and call["kcache"] is kern.cache
    assert not recorded["verify_using"].calls

    cached = make(spec_mode="cached")
    cache = torch.zeros(3, STEPS, HV, V, K)
    cached.target_verify(q, k, v, g=g, beta=beta, state=pool, state_indices=idx, cache=cache)
    call, = recorded["verify_using"].calls
    assert call["cache"] is cache and call["cache_indices"] is None


def test_the_other_protocols_arguments_raise_naming_them(recorded):
    kern, cached = make(), make(spec_mode="cached")
    ring, cursors = kern.make_ring(), kern.make_cursors()
    q, k, v = tokens()
    base = dict(g=torch.zeros(3, STEPS, HV), beta=torch.ones(3, STEPS, HV), state=state(),
                state_indices=torch.zeros(3, dtype=torch.int32))
    cache = torch.zeros(3, STEPS, HV, V, K)
    for kwargs, name in ((dict(cache=cache, ring=ring, cursors=cursors), "cache"),
                         (dict(cache_indices=base["state_indices"], ring=ring, cursors=cursors), "cache_indices"),
                         (dict(ring=ring), "cursors"), (dict(cursors=cursors), "ring"), ({}, "ring")):
        with pytest.raises(TypeError, match=name):
            kern.target_verify(q, k, v, **base, **kwargs)
    for kwargs, name in ((dict(cache=cache, ring=ring), "ring"), (dict(cache=cache, cursors=cursors), "cursors"),
                         ({}, "cache")):
        with pytest.raises(TypeError, match=name):
            cached.target_verify(q, k, v, **base, **kwargs)
    for method, args in (("commit", (state(), base["state_indices"], cache, None, base["state_indices"])),
                         ("layer_table", ([state()], [cache])),
                         ("commit_layers", (None, base["state_indices"], None, base["state_indices"]))):
        with pytest.raises(ValueError, match="spec_mode='replay'"):
            getattr(kern, method)(*args)
    with pytest.raises(ValueError, match="spec_mode='replay'"):
        cached.replay_flush([state()], [ring], cursors, base["state_indices"])
    with pytest.raises(ValueError, match="spec_mode='replay'"):
        cached.replay_commit(cursors, base["state_indices"], base["state_indices"])
    assert not any(r.calls for r in recorded.values())


def test_commit_and_flush_go_to_the_replay_ops(recorded):
    kern = make()
    rings, cursors = [kern.make_ring(), kern.make_ring()], kern.make_cursors()
    idx, acc = torch.tensor([3, -1], dtype=torch.int32), torch.tensor([2, 0], dtype=torch.int32)
    kern.replay_commit(cursors, idx, acc)
    call, = recorded["_replay_commit"].calls
    assert call["cursors"] is cursors and call["state_indices"] is idx and call["num_accepted"] is acc
    states = [state(), state()]
    kern.replay_flush(states, rings, cursors, idx)
    call, = recorded["_replay_flush"].calls
    assert call["states"] is states and call["rings"] is rings and call["use_qk_l2norm"] is True
    assert call["check_config"] == kern._check_config
    kern.warm = True  # after warmup the replay ops may not compile
    kern.replay_commit(cursors, idx, acc)
    kern.replay_flush(states, rings, cursors, idx)
    kern.target_verify(*tokens(), g=torch.zeros(3, STEPS, HV), beta=torch.ones(3, STEPS, HV), state=state(),
                       state_indices=torch.zeros(3, dtype=torch.int32), ring=rings[0], cursors=cursors)
    assert [r.calls[-1]["allow_compile"] for r in (recorded["_replay_commit"], recorded["_replay_flush"],
                                                    recorded["_replay_verify"])] == [False, False, False]


def test_commit_refuses_cursors_of_another_config(recorded):
    kern = make()
    idx = torch.zeros(1, dtype=torch.int32)
    for other in (make(ring_len=L + 2), make(pool_size=POOL + 1), make(cache_steps=1, ring_len=L)):
        with pytest.raises(ValueError, match="cursors were made for"):
            kern.replay_commit(other.make_cursors(), idx, idx)
    assert not recorded["_replay_commit"].calls


# ---- the config check (slow path of the replay ops) ----

def test_check_config_takes_rings_and_cursors():
    kern = make()
    ring, cursors = kern.make_ring(), kern.make_cursors()
    q = tokens()[0]
    kern._check_config(q, state(), ring, cursors)
    kern._check_config(None, state(), ring, cursors)  # replay_flush's call
    bad_rings = [make(ring_len=L + 2).make_ring(), make(pool_size=POOL + 1).make_ring(),
                 replay.make_replay_ring(POOL, H, HV, K, V, ring_len=L, io_dtype=torch.float16, device="cpu")]
    for bad in bad_rings:
        with pytest.raises(ValueError, match="ring\\.k must be"):
            kern._check_config(q, state(), bad, cursors)
    with pytest.raises(ValueError, match="cursors were made for"):
        kern._check_config(q, state(), ring, make(ring_len=L + 2).make_cursors())
    with pytest.raises(ValueError, match="max_tokens = cache_steps = 2"):
        kern._check_config(q, state(), ring, make(cache_steps=1).make_cursors())
    with pytest.raises(ValueError, match="state must be"):
        kern._check_config(q, torch.zeros(POOL + 1, HV, V, K), ring, cursors)
    with pytest.raises(ValueError, match="q must be"):
        kern._check_config(q.half(), state(), ring, cursors)
    with pytest.raises(ValueError, match="spec_mode='replay'"):  # a verify cache given to a replay config
        kern._check_config(None, state(), torch.zeros(3, STEPS, HV, V, K))
    with pytest.raises(ValueError, match="spec_mode='cached'"):  # a ring given to a cached config
        make(spec_mode="cached")._check_config(q, state(), ring, cursors)


def test_after_warmup_a_missing_replay_kernel_raises_instead_of_compiling(tmp_path, monkeypatch):
    """The replay ops load through ops.load_kernels with allow_compile = not warm: a key outside the (here empty)
    disk cache raises KernelNotCompiledError, and nothing compiles."""
    kern = make(cache_dir=tmp_path)
    monkeypatch.setattr(kern.cache, "compile", lambda *a, **k: pytest.fail("compiled after warmup"))
    kern.warm = True
    key = next(k for k in kern.keys if k.op == "replay")
    with pytest.raises(KernelNotCompiledError, match="replay"):
        ops.load_kernels(kern.cache, [key], not kern.warm)
    cursor_key = next(k for k in kern.keys if k.op == "replay_cursor")
    with pytest.raises(KernelNotCompiledError, match="replay_cursor"):
        ops.load_kernels(kern.cache, [cursor_key], not kern.warm)


def test_extend_documents_the_empty_ring_precondition():
    doc = GDNKernels.extend.__doc__
    assert "reset_cursors" in doc and "does not reset cursors" in doc and "empty" in doc
