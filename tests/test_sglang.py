"""cute_gdn.integrations.sglang on the CPU: the class against SGLang 0.5.23's own interface (loaded by
sglang_peer), the keyword names SGLang's backend and dispatcher pass (read from gdn_backend.py), install()
on dispatcher-like objects, every refusal raised before a kernel would run, and the layout mapping
(views of SGLang's tensors, not copies). Nothing is compiled: the GDNKernels calls are recorded."""

import ast
import importlib.util
import inspect
import sys
from types import SimpleNamespace

import pytest
import torch

import sglang_peer

SGLANG = sglang_peer.sglang_dir()
if SGLANG is None:
    pytest.skip("sglang 0.5.23 not found (pip install --no-deps sglang==0.5.23, or set CUTE_GDN_SGLANG_DIR)",
                allow_module_level=True)

Base = sglang_peer.load_kernel_base()
from cute_gdn.integrations import sglang as cg  # noqa: E402  (needs the peer's packages first)

H, HV, K, V = 4, 8, 128, 128
POOL, STEPS = 5, 4
BACKEND_PY = SGLANG / "srt" / "layers" / "attention" / "linear" / "gdn_backend.py"
TRITON_PY = SGLANG / "srt" / "layers" / "attention" / "linear" / "kernels" / "gdn_triton.py"


def make_kernel(tmp_path, **kwargs):
    """A kernel that never compiles: a private cache dir, no warmup."""
    cfg = dict(pool_size=POOL, cache_steps=STEPS)
    cfg.update(kwargs)
    dims = cfg.pop("dims", (H, HV, K, V))
    return cg.CuteGDNKernel(*dims, cache_dir=tmp_path, warmup=False, **cfg)


class Recorder:
    """Stands in for a GDNKernels method: checks the arguments bind to the real method's signature,
    records them, returns `out` as the real one does."""

    def __init__(self, real):
        self.signature = inspect.signature(real)
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.signature.bind(*args, **kwargs)
        self.calls.append((args, kwargs))
        out = kwargs.get("out")
        return out if out is not None else torch.zeros(1)


class Unreachable:
    def __call__(self, *args, **kwargs):
        raise AssertionError("a kernel was reached")


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    """Warm (flag only) with every GDNKernels mode recorded."""
    kern = make_kernel(tmp_path)
    kern.kernels.warm = True
    for mode in ("decode", "extend", "target_verify"):
        monkeypatch.setattr(kern.kernels, mode, Recorder(getattr(kern.kernels, mode)))
    return kern


@pytest.fixture
def guarded(tmp_path, monkeypatch):
    """Warm (flag only); reaching any GDNKernels mode fails the test."""
    kern = make_kernel(tmp_path)
    kern.kernels.warm = True
    for mode in ("decode", "extend", "target_verify"):
        monkeypatch.setattr(kern.kernels, mode, Unreachable())
    return kern


def packed(tokens):
    """q, k, v as SGLang builds them: torch.split views of mixed_qkv [tokens, 2HK + HV V], viewed as
    [1, tokens, heads, dim]."""
    mixed = torch.randn(tokens, 2 * H * K + HV * V, dtype=torch.bfloat16)
    q, k, v = torch.split(mixed, [H * K, H * K, HV * V], dim=-1)
    return mixed, q.view(1, tokens, H, K), k.view(1, tokens, H, K), v.view(1, tokens, HV, V)


def gates(tokens):
    ba = torch.randn(tokens, 2 * HV, dtype=torch.bfloat16)  # a, b as strided views of one projection
    return ba[:, :HV], ba[:, HV:]


def params():
    return torch.randn(HV), torch.randn(HV).to(torch.bfloat16)


def pool():
    return torch.randn(POOL, HV, V, K)


def decode_args(B=3):
    _, q, k, v = packed(B)
    a, b = gates(B)
    A_log, dt_bias = params()
    return (q, k, v, a, b), dict(A_log=A_log, dt_bias=dt_bias, ssm_states=pool(),
                                 cache_indices=torch.tensor([2, -1, 0], dtype=torch.int32)[:B],
                                 query_start_loc=torch.arange(B + 1, dtype=torch.int32))


def extend_args(lengths=(3, 1, 5)):
    T = sum(lengths)
    _, q, k, v = packed(T)
    g = -torch.rand(1, T, HV)
    beta = torch.rand(1, T, HV)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return (q, k, v, g, beta), dict(ssm_states=pool(), cache_indices=torch.tensor([4, -1, 1], dtype=torch.int32),
                                    query_start_loc=cu)


def verify_args(N=3, T=STEPS, extra_rows=2):
    _, q, k, v = packed(N * T)
    a, b = gates(N * T)
    A_log, dt_bias = params()
    return dict(A_log=A_log, dt_bias=dt_bias, q=q, k=k, v=v, a=a, b=b, ssm_states=pool(),
                # SGLang's tables are longer than the batch (CUDA-graph and DP padding)
                cache_indices=torch.tensor([3, 0, -1, 9, 9][:N + extra_rows], dtype=torch.int32),
                query_start_loc=torch.arange(0, N * T + 1, T, dtype=torch.int32),
                intermediate_states_buffer=torch.zeros(N + 2, STEPS, HV, V, K),
                intermediate_state_indices=torch.arange(N + extra_rows, dtype=torch.int32),
                cache_steps=T, retrieve_parent_token=None, stable_rows=False)


# ---- the class against SGLang's interface ----

def test_is_a_real_subclass_with_every_abstract_method(tmp_path):
    assert issubclass(cg.CuteGDNKernel, Base)
    assert Base.__abstractmethods__ == {"decode", "extend"}
    assert not inspect.isabstract(cg.CuteGDNKernel)
    for name in ("decode", "extend", "target_verify"):
        assert getattr(cg.CuteGDNKernel, name) is not getattr(Base, name), name
    kern = make_kernel(tmp_path)
    assert isinstance(kern, Base)
    assert not kern.kernels.warm and kern.supports_prefill and kern.supports_target_verify
    assert kern.pool_size == POOL and kern.cache_steps == STEPS
    # Truthful capability flags: no packed decode, no checkpoints or snapshots, strided verify q/k/v.
    assert (kern.supports_packed_decode, kern.uses_state_checkpoints, kern.supports_track_state_snapshot,
            kern.supports_fused_chain_verify, kern.supports_strided_target_verify_qkv) == (False, False, False,
                                                                                         False, True)
    small = make_kernel(tmp_path, dims=(2, 4, 64, 64), cache_steps=0)
    assert not small.supports_prefill and not small.supports_target_verify


def _params(fn) -> list:
    return [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]


def _named(fn) -> dict:
    return {p.name: p for p in _params(fn) if p.kind != p.VAR_KEYWORD}


@pytest.mark.parametrize("mode", ["decode", "extend", "target_verify"])
def test_signatures_match_the_abc(mode):
    ours = _named(getattr(cg.CuteGDNKernel, mode))
    base = _params(getattr(Base, mode))
    positional = [p.name for p in base if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert [p.name for p in _params(getattr(cg.CuteGDNKernel, mode))][:len(positional)] == positional
    for p in base:
        if p.kind == p.VAR_KEYWORD:
            assert any(q.kind == q.VAR_KEYWORD for q in _params(getattr(cg.CuteGDNKernel, mode)))
            continue
        assert p.name in ours and ours[p.name].kind == p.kind, (mode, p.name)


def _ast_class_methods(path, cls_name) -> dict:
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls_name)
    return {f.name: f for f in cls.body if isinstance(f, ast.FunctionDef)}


@pytest.mark.parametrize("mode", ["decode", "extend", "target_verify"])
def test_signatures_match_triton_gdn_kernel(mode):
    """Every parameter of SGLang's TritonGDNKernel method is one of ours, positionals in the same order."""
    fn = _ast_class_methods(TRITON_PY, "TritonGDNKernel")[mode]
    positional = [a.arg for a in fn.args.args[1:]]
    ours = _params(getattr(cg.CuteGDNKernel, mode))
    assert [p.name for p in ours if p.kind == p.POSITIONAL_OR_KEYWORD] == positional
    named = _named(getattr(cg.CuteGDNKernel, mode))
    for a in fn.args.kwonlyargs:
        assert a.arg in named and named[a.arg].kind == inspect.Parameter.KEYWORD_ONLY, (mode, a.arg)


def _sglang_calls():
    """(mode, positional count, keyword names) of every call SGLang 0.5.23 makes into a GDN kernel:
    GDNAttnBackend's calls of kernel_dispatcher.<mode>(...) routed through GDNKernelDispatcher.<mode>,
    which passes its own parameters on and the rest as **kwargs."""
    tree = ast.parse(BACKEND_PY.read_text())
    dispatcher = _ast_class_methods(BACKEND_PY, "GDNKernelDispatcher")
    forward = {}
    for mode in ("decode", "extend", "target_verify"):
        fn = dispatcher[mode]
        own = {a.arg for a in fn.args.args[1:] + fn.args.kwonlyargs}
        call = next(n for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                    and n.func.attr == mode)
        forward[mode] = (own, len(call.args), {kw.arg for kw in call.keywords if kw.arg})
    calls = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in forward \
                and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "kernel_dispatcher":
            mode = node.func.attr
            own, nargs, passed = forward[mode]
            keywords = {kw.arg for kw in node.keywords if kw.arg}
            calls.append((mode, nargs, passed | (keywords - own)))
    return calls


def test_every_keyword_sglang_passes_is_a_named_parameter(tmp_path):
    calls = _sglang_calls()
    assert {mode for mode, _, _ in calls} == {"decode", "extend", "target_verify"}
    kern = make_kernel(tmp_path)
    for mode, nargs, keywords in calls:
        method = getattr(kern, mode)
        inspect.signature(method).bind(*[None] * nargs, **dict.fromkeys(keywords))
        # None of them lands in **kwargs, where a requested feature would be refused.
        assert keywords <= set(_named(method)), (mode, keywords - set(_named(method)))
    extend_kw = set().union(*(kw for mode, _, kw in calls if mode == "extend"))
    assert {"output", "track_state", "extend_prefix_lens", "inplace_update", "num_state_checkpoints"} <= extend_kw
    verify_kw = set().union(*(kw for mode, _, kw in calls if mode == "target_verify"))
    assert {"intermediate_states_buffer", "intermediate_state_indices", "cache_steps", "retrieve_parent_token",
            "stable_rows"} <= verify_kw


# ---- layout mapping: views, not copies ----

def test_decode_passes_views_and_returns_sglangs_layout(kernel):
    (q, k, v, a, b), kw = decode_args(3)
    o = kernel.decode(q, k, v, a, b, **kw)
    (args, kwargs), = kernel.kernels.decode.calls
    for ours, theirs in zip(args, (q, k, v, a, b)):
        assert ours.data_ptr() == theirs.data_ptr()
        assert ours.shape == (3, 1, *theirs.shape[-1 if theirs.dim() == 2 else 2:])
        assert ours.stride(0) == (theirs.stride(1) if theirs.dim() == 4 else theirs.stride(0))
        assert ours.stride()[2:] == theirs.stride()[2 if theirs.dim() == 4 else 1:]
        assert torch.equal(ours[:, 0], theirs[0] if theirs.dim() == 4 else theirs)
    assert kwargs["state"] is kw["ssm_states"] and kwargs["state_indices"] is kw["cache_indices"]
    assert kwargs["A_log"] is kw["A_log"] and kwargs["dt_bias"] is kw["dt_bias"]
    # Triton's output: a fresh contiguous [1, B, HV, V]; ours is written through a [B, 1, HV, V] view of it.
    assert o.shape == (1, 3, HV, V) and o.is_contiguous() and o.dtype == torch.bfloat16
    assert kwargs["out"].data_ptr() == o.data_ptr() and kwargs["out"].shape == (3, 1, HV, V)


def test_extend_passes_gates_and_output_through(kernel):
    (q, k, v, g, beta), kw = extend_args()
    output = torch.empty(1, q.shape[1], HV, V, dtype=torch.bfloat16)
    o, final, h = kernel.extend(q, k, v, g, beta, **kw, output=output, extend_prefix_lens=torch.tensor([0, 2, 7]),
                                layer_id=3, track_state=None, track_chunk_idx=None, state_checkpoint_cu_starts=None,
                                num_state_checkpoints=0, state_checkpoint_every_n_tokens=0)
    (args, kwargs), = kernel.kernels.extend.calls
    assert all(x is y for x, y in zip(args, (q, k, v)))
    assert kwargs["g"] is g and kwargs["beta"] is beta  # fp32 from fused_gdn_gating: no conversion
    assert kwargs["cu_seqlens"] is kw["query_start_loc"] and kwargs["state"] is kw["ssm_states"]
    assert kwargs["state_indices"] is kw["cache_indices"]
    assert kwargs["has_initial_state"] is None  # every sequence starts from its slot, as in Triton
    assert kwargs["out"] is output and o is output and final is None and h is None


def test_extend_converts_other_gate_dtypes(kernel):
    (q, k, v, g, beta), kw = extend_args()
    kernel.extend(q, k, v, g.to(torch.bfloat16), beta.to(torch.bfloat16), **kw)
    (_, kwargs), = kernel.kernels.extend.calls
    assert kwargs["g"].dtype == kwargs["beta"].dtype == torch.float32
    assert torch.equal(kwargs["beta"], beta.to(torch.bfloat16).float())
    assert kwargs["out"] is None


@pytest.mark.parametrize("T", [STEPS, STEPS - 1])  # T < cache_steps: fewer drafts than the buffer holds
def test_target_verify_reshapes_to_sequences_and_uses_sglangs_buffer(kernel, T):
    N = 3
    kw = verify_args(N, T)
    o = kernel.target_verify(**kw)
    (args, kwargs), = kernel.kernels.target_verify.calls
    for ours, name in zip(args, "qkvab"):
        theirs = kw[name]
        token_stride = theirs.stride(1) if theirs.dim() == 4 else theirs.stride(0)
        assert ours.data_ptr() == theirs.data_ptr() and ours.shape[:2] == (N, T)
        assert ours.stride()[:2] == (T * token_stride, token_stride)
        assert torch.equal(ours.flatten(0, 1), theirs[0] if theirs.dim() == 4 else theirs)
    assert kwargs["cache"] is kw["intermediate_states_buffer"] and kwargs["state"] is kw["ssm_states"]
    for name, ours in (("cache_indices", kwargs["state_indices"]),
                       ("intermediate_state_indices", kwargs["cache_indices"])):
        assert ours.data_ptr() == kw[name].data_ptr() and ours.shape == (N,) and ours.is_contiguous()
    assert o.shape == (1, N * T, HV, V) and o.is_contiguous()
    assert kwargs["out"].data_ptr() == o.data_ptr() and kwargs["out"].shape == (N, T, HV, V)


def test_target_verify_accepts_pp_stable_rows(kernel):
    kw = verify_args()
    kw.update(stable_rows=True, intermediate_state_indices=torch.tensor([4, 1, 5, 5, 5], dtype=torch.int32))
    kernel.target_verify(**kw)
    (_, kwargs), = kernel.kernels.target_verify.calls
    assert kwargs["cache_indices"].tolist() == [4, 1, 5]


# ---- refusals, all before a kernel runs ----

def _noncontiguous_pool():
    return torch.randn(POOL, 2, HV, V, K)[:, 0]  # an envelope-like slot pitch


DECODE_REFUSALS = [
    ("replayssm_d", dict(replayssm_d=torch.zeros(1)), NotImplementedError),
    ("query_start_loc", dict(query_start_loc=torch.tensor([0, 3], dtype=torch.int32)), NotImplementedError),
    ("ssm_states", dict(ssm_states=_noncontiguous_pool()), NotImplementedError),
    ("pool_size", dict(ssm_states=torch.randn(POOL + 1, HV, V, K)), ValueError),
    ("cache_indices", dict(cache_indices=torch.tensor([2, -1, 0])), TypeError),
]


@pytest.mark.parametrize("name,change,error", DECODE_REFUSALS, ids=[c[0] for c in DECODE_REFUSALS])
def test_decode_refusals(guarded, name, change, error):
    args, kw = decode_args(3)
    kw.update(change)
    with pytest.raises(error, match=name):
        guarded.decode(*args, **kw)


EXTEND_REFUSALS = [
    ("inplace_update", dict(inplace_update=False), NotImplementedError),
    ("track_state", dict(track_state=torch.zeros(3, HV, V, K), track_chunk_idx=torch.zeros(3, dtype=torch.int32)),
     NotImplementedError),
    ("num_state_checkpoints", dict(num_state_checkpoints=2, state_checkpoint_every_n_tokens=64),
     NotImplementedError),
    ("state_checkpoint_cu_starts", dict(state_checkpoint_cu_starts=torch.zeros(4, dtype=torch.int64)),
     NotImplementedError),
    ("some_future_feature", dict(some_future_feature=True), NotImplementedError),
    ("ssm_states", dict(ssm_states=_noncontiguous_pool()), NotImplementedError),
    ("output", dict(output=torch.empty(1, 9, HV * V, dtype=torch.bfloat16)), ValueError),
    ("cache_indices", dict(cache_indices=torch.tensor([4, -1], dtype=torch.int32)), ValueError),
    ("query_start_loc", dict(query_start_loc=torch.tensor([0, 3, 4, 9])), TypeError),
]


@pytest.mark.parametrize("name,change,error", EXTEND_REFUSALS, ids=[c[0] for c in EXTEND_REFUSALS])
def test_extend_refusals(guarded, name, change, error):
    args, kw = extend_args()
    kw.update(change)
    with pytest.raises(error, match=name):
        guarded.extend(*args, **kw)


def test_extend_refuses_head_dims_prefill_rejects(tmp_path, monkeypatch):
    kern = make_kernel(tmp_path, dims=(2, 4, 64, 64))
    kern.kernels.warm = True
    monkeypatch.setattr(kern.kernels, "extend", Unreachable())
    q = torch.zeros(1, 4, 2, 64, dtype=torch.bfloat16)
    v = torch.zeros(1, 4, 4, 64, dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="K = V = 128"):
        kern.extend(q, q, v, torch.zeros(1, 4, 4), torch.zeros(1, 4, 4), ssm_states=torch.zeros(POOL, 4, 64, 64),
                    cache_indices=torch.zeros(1, dtype=torch.int32), query_start_loc=torch.tensor([0, 4]))


VERIFY_REFUSALS = [
    ("retrieve_parent_token", dict(retrieve_parent_token=torch.zeros(3, STEPS, dtype=torch.int32)),
     NotImplementedError),
    ("intermediate_states_buffer", dict(intermediate_states_buffer=None), NotImplementedError),
    ("cache_steps=4", dict(intermediate_states_buffer=torch.zeros(5, STEPS + 1, HV, V, K)), NotImplementedError),
    ("cache_steps=5", dict(cache_steps=STEPS + 1), NotImplementedError),
    ("ragged", dict(query_start_loc=torch.tensor([0, 4, 5, 12], dtype=torch.int32), cache_steps=3),
     NotImplementedError),
    ("ssm_states", dict(ssm_states=_noncontiguous_pool()), NotImplementedError),
    ("intermediate_state_indices", dict(intermediate_state_indices=torch.arange(5)), TypeError),
    ("cache_indices", dict(cache_indices=torch.tensor([1, 2], dtype=torch.int32)), ValueError),
    ("replayssm_rawv", dict(replayssm_rawv=torch.zeros(1)), NotImplementedError),
]


@pytest.mark.parametrize("name,change,error", VERIFY_REFUSALS, ids=[c[0] for c in VERIFY_REFUSALS])
def test_target_verify_refusals(guarded, name, change, error):
    kw = verify_args()
    kw.update(change)
    with pytest.raises(error, match=name):
        guarded.target_verify(**kw)


def test_target_verify_refused_without_cache_steps(tmp_path, monkeypatch):
    kern = make_kernel(tmp_path, cache_steps=0)
    kern.kernels.warm = True
    monkeypatch.setattr(kern.kernels, "target_verify", Unreachable())
    with pytest.raises(NotImplementedError, match="cache_steps=0"):
        kern.target_verify(**verify_args())


def test_calls_before_warmup_raise_instead_of_compiling(tmp_path, monkeypatch):
    kern = make_kernel(tmp_path)
    for mode in ("decode", "extend", "target_verify"):
        monkeypatch.setattr(kern.kernels, mode, Unreachable())
    args, kw = decode_args()
    with pytest.raises(RuntimeError, match="warmup"):
        kern.decode(*args, **kw)
    args, kw = extend_args()
    with pytest.raises(RuntimeError, match="warmup"):
        kern.extend(*args, **kw)
    with pytest.raises(RuntimeError, match="warmup"):
        kern.target_verify(**verify_args())


def test_warmup_runs_once(tmp_path, monkeypatch):
    kern = make_kernel(tmp_path)
    calls = []

    def fake_warmup(jobs=None):
        calls.append(jobs)
        kern.kernels.warm = True

    monkeypatch.setattr(kern.kernels, "warmup", fake_warmup)
    assert kern.warmup(3) is kern and kern.warmup() is kern
    assert calls == [3]


# ---- install ----

class FakeDispatcher:
    """The attributes of SGLang's GDNKernelDispatcher that install() touches."""

    def __init__(self):
        self.triton = object()
        self.decode_kernel = self.extend_kernel = self.verify_kernel = self.tree_verify_kernel = self.triton
        self.supports_packed_decode = True
        self.verify_kernel_is_flashinfer = True


def test_install_swaps_every_mode(kernel):
    d = FakeDispatcher()
    replaced = cg.install(d, kernel)
    assert replaced == {"decode": d.triton, "extend": d.triton, "target_verify": d.triton}
    assert d.decode_kernel is d.extend_kernel is d.verify_kernel is kernel
    assert d.tree_verify_kernel is d.triton  # EAGLE trees stay on Triton
    assert d.supports_packed_decode is False and d.verify_kernel_is_flashinfer is False


def test_install_one_mode_leaves_the_others(kernel):
    d = FakeDispatcher()
    assert cg.install(d, kernel, modes=["extend"]) == {"extend": d.triton}
    assert d.extend_kernel is kernel and d.decode_kernel is d.verify_kernel is d.triton
    assert d.supports_packed_decode is True and d.verify_kernel_is_flashinfer is True


def test_install_refusals(kernel, tmp_path):
    d = FakeDispatcher()
    with pytest.raises(TypeError, match="CuteGDNKernel"):
        cg.install(d, object())
    with pytest.raises(TypeError, match="GDNKernelDispatcher"):
        cg.install(SimpleNamespace(decode_kernel=None, extend_kernel=None), kernel)
    with pytest.raises(ValueError, match="modes"):
        cg.install(d, kernel, modes=("prefill",))
    with pytest.raises(ValueError, match="modes"):
        cg.install(d, kernel, modes=())
    with pytest.raises(ValueError, match="warm"):
        cg.install(d, make_kernel(tmp_path))
    no_verify = make_kernel(tmp_path, cache_steps=0)
    no_verify.kernels.warm = True
    with pytest.raises(ValueError, match="target_verify"):
        cg.install(d, no_verify)
    small = make_kernel(tmp_path, dims=(2, 4, 64, 64))
    small.kernels.warm = True
    with pytest.raises(NotImplementedError, match="extend"):  # unsupported, as CuteGDNKernel.extend says
        cg.install(d, small, modes=("decode", "extend"))
    assert d.decode_kernel is d.extend_kernel is d.verify_kernel is d.triton  # nothing swapped by a refusal
    cg.install(d, small, modes=("decode", "target_verify"))
    assert d.decode_kernel is small and d.extend_kernel is d.triton


def _runner(attn_backend, decode_attn_backend=None, group=(), extra_buffer=False, model=None):
    return SimpleNamespace(attn_backend=attn_backend, decode_attn_backend=decode_attn_backend,
                           decode_attn_backend_group=list(group), model=model,
                           req_to_token_pool=SimpleNamespace(enable_mamba_extra_buffer=extra_buffer))


def _hybrid(dispatcher):
    return SimpleNamespace(full_attn_backend=SimpleNamespace(),
                           linear_attn_backend=SimpleNamespace(kernel_dispatcher=dispatcher))


def test_gdn_dispatchers_walks_hybrid_tbo_and_pd_multiplexing_backends():
    d1, d2, d3 = FakeDispatcher(), FakeDispatcher(), FakeDispatcher()
    assert cg.gdn_dispatchers(_runner(_hybrid(d1))) == [d1]
    tbo = SimpleNamespace(primary=_hybrid(d1), children=[_hybrid(d2), _hybrid(d3)])
    assert cg.gdn_dispatchers(_runner(tbo)) == [d1, d2, d3]
    shared = _hybrid(d2)
    assert cg.gdn_dispatchers(_runner(_hybrid(d1), shared, [shared, _hybrid(d3)])) == [d1, d2, d3]
    assert cg.gdn_dispatchers(_runner(SimpleNamespace(children=lambda: None))) == []


def test_install_into_runner(kernel):
    d1, d2 = FakeDispatcher(), FakeDispatcher()
    runner = _runner(SimpleNamespace(primary=_hybrid(d1), children=[_hybrid(d2)]))
    assert cg.install_into_runner(runner, kernel) is kernel
    assert d1.decode_kernel is d2.verify_kernel is kernel
    with pytest.raises(ValueError, match="no GDN kernel dispatcher"):
        cg.install_into_runner(_runner(SimpleNamespace()), kernel)
    d3 = FakeDispatcher()
    with pytest.raises(NotImplementedError, match="extra_buffer"):
        cg.install_into_runner(_runner(_hybrid(d3), extra_buffer=True), kernel)
    cg.install_into_runner(_runner(_hybrid(d3), extra_buffer=True), kernel, modes=("decode", "target_verify"))
    assert d3.decode_kernel is kernel and d3.extend_kernel is d3.triton


class RadixLinearAttention(torch.nn.Module):
    """Named like SGLang's GDN layer (from_model_runner finds layers by class name)."""

    def __init__(self, dt_bias_dtype=torch.bfloat16, A_log_dtype=torch.float32):
        super().__init__()
        self.num_q_heads = self.num_k_heads = H
        self.num_v_heads = HV
        self.head_q_dim = self.head_k_dim = K
        self.head_v_dim = V
        # As Qwen3-Next creates them: dt_bias in the default (model) dtype, A_log in fp32.
        self.A_log = torch.zeros(HV, dtype=A_log_dtype)
        self.dt_bias = torch.zeros(HV, dtype=dt_bias_dtype)


def test_from_model_runner_reads_the_config(tmp_path, monkeypatch):
    model = torch.nn.ModuleList([RadixLinearAttention(), torch.nn.Linear(2, 2), RadixLinearAttention()])
    layers = 2
    cache = SimpleNamespace(temporal=torch.zeros(layers, POOL, HV, V, K, dtype=torch.bfloat16),
                            intermediate_ssm=torch.zeros(layers, 3, STEPS, HV, V, K, dtype=torch.bfloat16))
    runner = SimpleNamespace(model=model, dtype=torch.float16,
                             req_to_token_pool=SimpleNamespace(mamba_pool=SimpleNamespace(mamba_cache=cache)))
    kern = cg.CuteGDNKernel.from_model_runner(runner, cache_dir=tmp_path, warmup=False)
    assert (kern.num_heads, kern.num_v_heads, kern.head_k_dim, kern.head_v_dim) == (H, HV, K, V)
    assert (kern.pool_size, kern.cache_steps) == (POOL, STEPS)
    assert (kern.state_dtype, kern.io_dtype) == (torch.bfloat16, torch.float16)
    cache.intermediate_ssm = None
    assert cg.CuteGDNKernel.from_model_runner(runner, cache_dir=tmp_path, warmup=False).cache_steps == 0
    cache.temporal = torch.zeros(POOL, layers, HV, V, K).transpose(0, 1)  # envelope-strided slots
    with pytest.raises(NotImplementedError, match="envelope"):
        cg.CuteGDNKernel.from_model_runner(runner, cache_dir=tmp_path, warmup=False)
    with pytest.raises(ValueError, match="RadixLinearAttention"):
        cg.CuteGDNKernel.from_model_runner(SimpleNamespace(model=torch.nn.Linear(2, 2)), warmup=False)


def mamba_pool(cache=None, **flags):
    """SGLang 0.5.23's MambaPool ReplaySSM attributes at their defaults (all off), overridden by flags."""
    attrs = dict(enable_linear_replayssm=False, enable_linear_replayssm_spec=False, replayssm_spec_fold=False,
                 replayssm_cache_base=None, replayssm_write_pos=None)
    attrs.update(flags)
    return SimpleNamespace(mamba_cache=cache, **attrs)


def model_runner(layers=None, extra_buffer=False, **flags):
    model = torch.nn.ModuleList(layers or [RadixLinearAttention(), RadixLinearAttention()])
    cache = SimpleNamespace(temporal=torch.zeros(2, POOL, HV, V, K),
                            intermediate_ssm=torch.zeros(2, 3, STEPS, HV, V, K))
    return SimpleNamespace(model=model, dtype=torch.bfloat16,
                           req_to_token_pool=SimpleNamespace(enable_mamba_extra_buffer=extra_buffer,
                                                             mamba_pool=mamba_pool(cache, **flags)))


def test_mamba_pool_stand_in_has_sglangs_replayssm_attributes():
    """The flag names the refusal reads are MambaPool's own (memory_pool.py)."""
    source = (SGLANG / "srt" / "mem_cache" / "memory_pool.py").read_text()
    for flag in cg.REPLAYSSM_FLAGS:
        assert f"self.{flag} = " in source, flag
    assert set(cg.REPLAYSSM_FLAGS) <= set(vars(mamba_pool()))


@pytest.mark.parametrize("flag,value", [("enable_linear_replayssm", True), ("enable_linear_replayssm_spec", True),
                                        ("replayssm_spec_fold", True),
                                        ("replayssm_cache_base", torch.zeros(4, dtype=torch.int32))])
def test_replayssm_is_refused_wherever_the_pool_is_reachable(kernel, tmp_path, flag, value):
    runner = model_runner(**{flag: value})
    with pytest.raises(NotImplementedError, match=flag):
        cg.CuteGDNKernel.from_model_runner(runner, cache_dir=tmp_path, warmup=False)
    d = FakeDispatcher()
    runner.attn_backend = _hybrid(d)
    for modes in (cg.ALL_MODES, ("extend",)):
        with pytest.raises(NotImplementedError, match=flag):
            cg.install_into_runner(runner, kernel, modes=modes)  # given a kernel: still refused
        with pytest.raises(NotImplementedError, match=flag):
            cg.install(d, kernel, modes=modes, model_runner=runner)
    assert d.decode_kernel is d.extend_kernel is d.verify_kernel is d.triton
    # All flags off (the pool's defaults): accepted.
    assert cg.CuteGDNKernel.from_model_runner(model_runner(), cache_dir=tmp_path, warmup=False).pool_size == POOL


def test_install_by_hand_refuses_the_extra_buffer_given_the_runner(kernel):
    runner = model_runner(extra_buffer=True)
    d = FakeDispatcher()
    with pytest.raises(NotImplementedError, match="enable_mamba_extra_buffer"):
        cg.install(d, kernel, model_runner=runner)
    assert d.extend_kernel is d.decode_kernel is d.triton
    cg.install(d, kernel, modes=("decode", "target_verify"), model_runner=runner)
    assert d.decode_kernel is kernel and d.extend_kernel is d.triton


@pytest.mark.parametrize("name,layer", [
    ("dt_bias", RadixLinearAttention(dt_bias_dtype=torch.float16)),  # an fp16 model's dt_bias
    ("A_log", RadixLinearAttention(A_log_dtype=torch.bfloat16)),
])
def test_from_model_runner_refuses_gate_parameter_dtypes_outside_the_warmed_set(tmp_path, name, layer):
    with pytest.raises(NotImplementedError, match=f"{name} in torch.(float16|bfloat16)"):
        cg.CuteGDNKernel.from_model_runner(model_runner([RadixLinearAttention(), layer]), cache_dir=tmp_path,
                                           warmup=False)
    fp32 = RadixLinearAttention(dt_bias_dtype=torch.float32)
    assert cg.CuteGDNKernel.from_model_runner(model_runner([fp32, RadixLinearAttention()]), cache_dir=tmp_path,
                                              warmup=False).head_k_dim == K


def test_compact_ragged_verify_mode_is_refused_for_target_verify(kernel, monkeypatch):
    monkeypatch.setenv("SGLANG_RAGGED_VERIFY_MODE", "compact")
    d = FakeDispatcher()
    with pytest.raises(NotImplementedError, match="SGLANG_RAGGED_VERIFY_MODE"):
        cg.install(d, kernel)
    runner = model_runner()
    runner.attn_backend = _hybrid(d)
    with pytest.raises(NotImplementedError, match="SGLANG_RAGGED_VERIFY_MODE"):
        cg.install_into_runner(runner, kernel)
    assert d.decode_kernel is d.verify_kernel is d.triton
    cg.install(d, kernel, modes=("decode", "extend"))  # no verify: the mode does not matter
    monkeypatch.setenv("SGLANG_RAGGED_VERIFY_MODE", "static")  # SGLang's default: dense N x T verify
    cg.install(d, kernel)
    assert d.verify_kernel is kernel


def test_no_dispatcher_is_swapped_when_a_check_fails(kernel, tmp_path):
    full, partial = FakeDispatcher(), FakeDispatcher()
    del partial.tree_verify_kernel
    # One attribute list decides both what is a dispatcher and what install needs.
    assert cg.gdn_dispatchers(_runner(SimpleNamespace(primary=_hybrid(full), children=[_hybrid(partial)]))) == [full]
    with pytest.raises(TypeError, match="tree_verify_kernel"):
        cg.install(partial, kernel)
    assert partial.decode_kernel is partial.triton and partial.supports_packed_decode is True
    d1, d2 = FakeDispatcher(), FakeDispatcher()
    runner = _runner(SimpleNamespace(primary=_hybrid(d1), children=[_hybrid(d2)]))
    with pytest.raises(ValueError, match="warm"):
        cg.install_into_runner(runner, make_kernel(tmp_path))
    for d in (d1, d2):
        assert d.decode_kernel is d.extend_kernel is d.verify_kernel is d.triton
        assert d.supports_packed_decode is True and d.verify_kernel_is_flashinfer is True


def test_check_modes_is_shared_and_strict():
    assert cg._check_modes(["decode", "extend", "decode"]) == ("decode", "extend")
    for bad in ((), ("verify",), ("decode", "prefill")):
        with pytest.raises(ValueError, match="modes"):
            cg._check_modes(bad)
    with pytest.raises(TypeError, match="modes"):
        cg._check_modes("decode")  # would be read as the modes 'd', 'e', ...


def test_check_indices_exact():
    idx = torch.arange(5, dtype=torch.int32)
    assert cg.CuteGDNKernel._check_indices("x", idx, 3).tolist() == [0, 1, 2]
    assert cg.CuteGDNKernel._check_indices("x", idx, 5, exact=True) is idx
    with pytest.raises(ValueError, match="exactly 3"):
        cg.CuteGDNKernel._check_indices("x", idx, 3, exact=True)


def test_decode_of_one_sequence_keeps_its_views(kernel):
    (q, k, v, a, b), kw = decode_args(1)
    o = kernel.decode(q, k, v, a, b, **kw)
    (args, kwargs), = kernel.kernels.decode.calls
    assert [tuple(x.shape) for x in args] == [(1, 1, H, K), (1, 1, H, K), (1, 1, HV, V), (1, 1, HV), (1, 1, HV)]
    assert all(x.data_ptr() == y.data_ptr() for x, y in zip(args, (q, k, v, a, b)))
    assert o.shape == (1, 1, HV, V) and kwargs["out"].shape == (1, 1, HV, V)


def test_register_sglang_hook_installs_after_init_attention_backends(kernel, monkeypatch):
    registered = []
    hooks = SimpleNamespace(HookRegistry=SimpleNamespace(register=lambda *a: registered.append(a)),
                            HookType=SimpleNamespace(AFTER="after"))
    monkeypatch.setitem(sys.modules, "sglang.srt.plugins.hook_registry", hooks)
    monkeypatch.setenv("CUTE_GDN_SGLANG_MODES", "decode, target_verify")
    built = []
    monkeypatch.setattr(cg, "install_into_runner", lambda runner, **kw: built.append((runner, kw)))
    cg.register_sglang_hook(cache_dir="/tmp/x")
    (target, hook, kind), = registered
    assert target == "sglang.srt.model_executor.model_runner.ModelRunner.init_attention_backends"
    assert kind == "after"
    assert inspect.signature(cg.register_sglang_hook).parameters["modes"].default is None
    gdn_runner, draft_runner = _runner(_hybrid(FakeDispatcher())), _runner(SimpleNamespace())
    assert hook("result", gdn_runner) == "result" and hook(None, draft_runner) is None
    assert built == [(gdn_runner, dict(modes=("decode", "target_verify"), cache_dir="/tmp/x"))]


@pytest.fixture
def hook_registry(monkeypatch):
    """A stand-in for SGLang's HookRegistry that records registrations."""
    registered = []
    hooks = SimpleNamespace(HookRegistry=SimpleNamespace(register=lambda *a: registered.append(a)),
                            HookType=SimpleNamespace(AFTER="after"))
    monkeypatch.setitem(sys.modules, "sglang.srt.plugins.hook_registry", hooks)
    return registered


@pytest.mark.parametrize("env", ["decode,verify", "decode;extend", ","])
def test_plugin_with_bad_modes_registers_and_the_hook_raises(hook_registry, monkeypatch, env):
    """SGLang's load_plugins only logs a plugin's exception: a typo must not stop the registration
    (the server would silently stay on Triton) but fail loudly in the hook, whose exceptions reach
    ModelRunner.init_attention_backends."""
    monkeypatch.setenv("CUTE_GDN_SGLANG_MODES", env)
    monkeypatch.setattr(cg, "install_into_runner", Unreachable())
    cg.plugin()  # does not raise
    (target, hook, kind), = hook_registry
    assert target == cg.HOOK_TARGET and kind == "after"
    with pytest.raises(ValueError, match="modes"):
        hook(None, _runner(_hybrid(FakeDispatcher())))
    with pytest.raises(ValueError, match="modes"):  # also on a runner without GDN layers
        hook(None, _runner(SimpleNamespace()))


def test_register_sglang_hook_defers_validating_given_modes(hook_registry, monkeypatch):
    monkeypatch.setattr(cg, "install_into_runner", Unreachable())
    cg.register_sglang_hook(modes=("verify",))
    (_, hook, _), = hook_registry
    with pytest.raises(ValueError, match="'verify'"):
        hook(None, _runner(_hybrid(FakeDispatcher())))


def test_hook_installs_for_real_and_logs_every_dispatcher(kernel, hook_registry, monkeypatch, caplog):
    monkeypatch.setenv("CUTE_GDN_SGLANG_MODES", "decode,target_verify")
    monkeypatch.setattr(cg.CuteGDNKernel, "from_model_runner", classmethod(lambda cls, runner, **kw: kernel))
    cg.plugin()
    (_, hook, _), = hook_registry
    d1, d2 = FakeDispatcher(), FakeDispatcher()
    with caplog.at_level("INFO", logger="cute_gdn.integrations.sglang"):
        assert hook("r", _runner(SimpleNamespace(primary=_hybrid(d1), children=[_hybrid(d2)]))) == "r"
    assert d1.decode_kernel is d2.decode_kernel is d1.verify_kernel is d2.verify_kernel is kernel
    assert d1.extend_kernel is d1.triton
    records = [r for r in caplog.records if r.name == "cute_gdn.integrations.sglang"]
    assert len(records) == 2 and all(r.levelname == "INFO" for r in records)
    for record, d in zip(records, (d1, d2)):
        msg = record.getMessage()
        assert f"{id(d):#x}" in msg and msg.count("CuteGDNKernel(") == 2  # decode and target_verify
        assert "extend=object" in msg and "tree verify=object" in msg
        assert "replaced: decode=object, target_verify=object" in msg


# ---- the peer loader ----

def _import_time_nodes(tree):
    """The nodes that run at import: everything but function bodies (lazy imports there belong to
    other models' paths, e.g. KDA's packed decode in fla/fused_recurrent.py)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        todo += [c for c in ast.iter_child_nodes(node) if not isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_peer_stand_ins_cover_every_import_of_the_loaded_modules():
    """Every import-time `from sglang... import` of the modules TritonGDNKernel and fused_gdn_gating pull in
    resolves to a file of the sglang directory, or to a stand-in that defines the names; the server
    packages (and hardware backends not taken on CUDA) are never reached."""
    standins = sglang_peer.STANDINS
    skipped = ("sglang.srt.hardware_backend",)  # behind is_xpu() / is_intel, False on CUDA
    todo = [sglang_peer.GDN_TRITON, sglang_peer.FUSED_GDN_GATING, sglang_peer.KERNEL_BACKEND]
    seen, third_party = set(), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = SGLANG.joinpath(*name.split(".")[1:]).with_suffix(".py")
        assert path.is_file(), name
        for node in _import_time_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                third_party |= {a.name.split(".")[0] for a in node.names}
            if isinstance(node, ast.ImportFrom) and node.module and not node.module.startswith("sglang"):
                third_party.add(node.module.split(".")[0])
            if not (isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sglang")):
                continue
            if node.module in standins:
                missing = {a.name for a in node.names} - set(standins[node.module])
                assert not missing, (name, node.module, missing)
            elif node.module.startswith(skipped):
                continue
            elif node.module in sglang_peer.STUB_PACKAGES:
                # A package whose __init__ does not run: what it imports from it must be submodules.
                todo += [f"{node.module}.{a.name}" for a in node.names]
            else:
                todo.append(node.module)
    # What the GPU host must have besides the standard library (sgl_kernel*: behind is_cpu() / is_npu();
    # einops: the peer stands in for it where it is missing).
    assert third_party - set(sys.stdlib_module_names) <= {"torch", "triton", "packaging", "einops",
                                                                         "sgl_kernel", "sgl_kernel_npu"}
    assert {sglang_peer.GDN_TRITON, "sglang.kernels.ops.attention.fla.chunk",
            "sglang.kernels.ops.attention.linear.fused_sigmoid_gating_recurrent"} <= seen
    for name in standins:
        module = sys.modules[name]
        assert all(callable(getattr(module, n)) or n == "torch_release" for n in standins[name])


def test_peer_packages_point_into_the_sglang_directory():
    for name in sglang_peer.STUB_PACKAGES:
        module = sys.modules[name]
        if getattr(module, "__cute_gdn_stub__", False):
            assert module.__path__ == [str(SGLANG.joinpath(*name.split(".")[1:]))]
    assert Base.__module__ == sglang_peer.KERNEL_BACKEND
    assert sys.modules[sglang_peer.KERNEL_BACKEND].__file__.startswith(str(SGLANG))
    assert "sglang.srt.server_args" not in sys.modules and "sglang.srt.model_executor" not in sys.modules


@pytest.mark.skipif(importlib.util.find_spec("triton") is not None and torch.cuda.is_available(),
                    reason="triton and a GPU are here: tests/test_sglang_gpu.py loads the kernel")
def test_peer_triton_kernel_needs_only_triton_on_a_cpu_machine():
    """gdn_triton's sglang imports resolve; what is missing on a CPU machine is triton (or a GPU)."""
    try:
        sglang_peer.load_triton_kernel()
    except ModuleNotFoundError as exc:
        assert exc.name == "triton", exc
    except RuntimeError as exc:  # triton present: fla's utils query the CUDA device at import
        assert "CUDA" in str(exc) or "cuda" in str(exc) or "device" in str(exc), exc
    else:
        pytest.fail("TritonGDNKernel loaded without a GPU")


def test_plugin_is_opt_in(monkeypatch):
    registered = []
    monkeypatch.setattr(cg, "register_sglang_hook", lambda: registered.append(True))
    monkeypatch.delenv("CUTE_GDN_SGLANG_MODES", raising=False)
    cg.plugin()
    assert registered == []
    monkeypatch.setenv("CUTE_GDN_SGLANG_MODES", "decode")
    cg.plugin()
    assert registered == [True]


def test_import_without_sglang_names_the_requirement():
    import subprocess
    code = ("import sys; sys.modules['sglang'] = None\n"  # makes `import sglang...` fail as if absent
            "try:\n    import cute_gdn.integrations.sglang\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "needs SGLang (0.5.23) to be importable" in out.stdout, out.stdout + out.stderr


# ---- spec_mode="replay": cute_gdn's replay protocol in place of SGLang's GDN spec ring ----

RING = 2 * STEPS
SPEC_DECODE_PY = SGLANG / "kernels" / "ops" / "attention" / "linear" / "gdn_replayssm_spec_decode.py"
SPEC_UTILS_PY = SGLANG / "srt" / "speculative" / "spec_utils.py"


class GDNLayer(RadixLinearAttention):
    def __init__(self, layer_id):
        super().__init__()
        self.layer_id = layer_id


def replay_runner(layer_ids=(3, 7), disable_radix_cache=True, extra_buffer=False, **flags):
    """A runner whose mamba pool runs SGLang's GDN spec ring (--enable-linear-replayssm-spec), one GDN
    backend holding a dispatcher, and a HybridReqToTokenPool-like alloc."""
    model = torch.nn.ModuleList([GDNLayer(i) for i in layer_ids])
    cache = SimpleNamespace(temporal=torch.zeros(len(layer_ids), POOL, HV, V, K), intermediate_ssm=None)
    pool_flags = dict(enable_linear_replayssm_spec=True, replayssm_cache_base=torch.zeros(POOL, dtype=torch.int32),
                      replayssm_spec_write_pos=torch.zeros(POOL, dtype=torch.int32), replayssm_is_kda=False)
    pool_flags.update(flags)
    allocated = []

    def alloc(reqs):
        for req in reqs:
            if not req.kv.holds_mamba:
                req.kv.mamba_pool_idx = torch.tensor(allocated.pop(0))
        return list(range(len(reqs)))

    req_pool = SimpleNamespace(enable_mamba_extra_buffer=extra_buffer, mamba_pool=mamba_pool(cache, **pool_flags),
                               alloc=alloc)
    backend = SimpleNamespace(kernel_dispatcher=FakeDispatcher(), _replayssm_target_verify=Unreachable())
    runner = SimpleNamespace(model=model, dtype=torch.bfloat16, req_to_token_pool=req_pool,
                             attn_backend=SimpleNamespace(linear_attn_backend=backend),
                             server_args=SimpleNamespace(speculative_num_draft_tokens=STEPS,
                                                         disable_radix_cache=disable_radix_cache))
    runner.allocated = allocated
    return runner


def replay_kernel(tmp_path, runner, **kwargs):
    kern = cg.CuteGDNKernel.from_model_runner(runner, cache_dir=tmp_path, warmup=False, spec_mode="replay",
                                              ring_len=RING, device="cpu", **kwargs)
    kern.kernels.warm = True
    return kern


@pytest.fixture
def spec_decode_module(monkeypatch):
    """SGLang's spec-ring commit module (Triton kernels in SGLang) with recording originals."""
    seen = []
    module = SimpleNamespace(commit_gdn_replayssm_spec=lambda **kw: seen.append(("spec", kw)),
                             commit_gdn_replayssm_circular=lambda **kw: seen.append(("circular", kw)))
    monkeypatch.setitem(sys.modules, cg.REPLAY_COMMIT_MODULE, module)
    monkeypatch.setattr(cg, "_REPLAY_POOLS", {})
    module.seen = seen
    return module


def test_from_model_runner_builds_replay_rings_per_gdn_layer(tmp_path):
    runner = replay_runner()
    kern = replay_kernel(tmp_path, runner)
    assert kern.spec_mode == "replay" and kern.ring_len == RING and kern.cache_steps == STEPS
    assert sorted(kern.rings) == [3, 7]
    ring = kern.rings[3]
    assert ring.k.shape == (POOL, H, RING, K) and ring.d.shape == (POOL, HV, RING, V) and ring.k.device.type == "cpu"
    assert kern.rings[3].k.data_ptr() != kern.rings[7].k.data_ptr()
    assert kern.cursors.pos.shape == (POOL, 2) and (kern.cursors.ring_len, kern.cursors.max_tokens) == (RING, STEPS)
    assert not any(k.op in ("verify", "commit") for k in kern.kernels.keys)
    assert {k.op for k in kern.kernels.keys} >= {"replay", "replay_cursor"}
    assert f"spec_mode=replay, ring_len={RING}, replay_fold=exact" in repr(kern)
    assert kern.replay_fold == "exact" and kern.cursors.fold == "exact"


def test_replay_fold_reaches_the_kernels_and_the_cursors(tmp_path):
    runner = replay_runner()
    kern = replay_kernel(tmp_path, runner, replay_fold="compact")
    assert kern.replay_fold == kern.kernels.replay_fold == "compact" and kern.cursors.fold == "compact"
    verify = [k for k in kern.kernels.keys if k.op == "replay" and k.kwargs["num_tokens"] > 0]
    assert verify and {k.kwargs["fold_mode"] for k in verify} == {"compact"}
    assert "replay_fold=compact" in repr(kern)
    # replay_target_verify hands these cursors on, which the config check accepts
    rec = Recorder(kern.kernels.target_verify)
    kern.kernels.target_verify = rec
    N, T = 2, STEPS
    _, q, k, v = packed(N * T)
    a, b = gates(N * T)
    kern.replay_target_verify(layer=runner.model[0], query=q, key=k, value=v, a=a, b=b,
                              layer_cache=SimpleNamespace(temporal=runner.req_to_token_pool.mamba_pool.mamba_cache
                                                          .temporal[0]),
                              cache_indices=torch.tensor([1, 2], dtype=torch.int32),
                              query_start_loc=torch.arange(0, N * T + 1, T, dtype=torch.int32), draft_token_num=T)
    (_, kwargs), = rec.calls
    assert kwargs["cursors"] is kern.cursors
    kern.kernels._check_cursors(kern.cursors)
    with pytest.raises(ValueError, match="cursors were made for"):
        kern.kernels._check_cursors(kern.cursors._replace(fold="exact"))


@pytest.mark.parametrize("kwargs,message", [
    (dict(spec_mode="replay", replay_fold="fast"), "replay_fold must be one of"),
    (dict(replay_fold="compact"), "replay_fold='compact' belongs to spec_mode='replay'"),
])
def test_bad_replay_fold_is_refused_naming_it(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cg.CuteGDNKernel(H, HV, K, V, pool_size=POOL, cache_steps=STEPS, ring_len=RING, device="cpu",
                         cache_dir=tmp_path, warmup=False, **kwargs)


@pytest.mark.parametrize("flags,name", [
    (dict(enable_linear_replayssm_spec=False, replayssm_cache_base=None, replayssm_spec_write_pos=None),
     "enable_linear_replayssm_spec"),
    (dict(enable_linear_replayssm=True), "enable_linear_replayssm"),
    (dict(replayssm_spec_fold=True), "replayssm_spec_fold"),
    (dict(replayssm_is_kda=True), "replayssm_is_kda"),
])
def test_replay_needs_sglangs_gdn_spec_ring_and_nothing_else(tmp_path, flags, name):
    with pytest.raises(NotImplementedError, match=name):
        replay_kernel(tmp_path, replay_runner(**flags))


def test_cached_mode_still_refuses_the_spec_ring(tmp_path):
    with pytest.raises(NotImplementedError, match="enable_linear_replayssm_spec"):
        cg.CuteGDNKernel.from_model_runner(replay_runner(), cache_dir=tmp_path, warmup=False)


def test_install_into_runner_takes_over_verify_commit_and_slot_assignment(tmp_path, spec_decode_module, monkeypatch):
    runner = replay_runner()
    kern = replay_kernel(tmp_path, runner)
    backend = runner.attn_backend.linear_attn_backend
    commits = Recorder(kern.kernels.replay_commit)
    monkeypatch.setattr(kern.kernels, "replay_commit", commits)
    assert cg.install_into_runner(runner, kern) is kern
    assert backend._replayssm_target_verify == kern.replay_target_verify
    assert backend.kernel_dispatcher.decode_kernel is kern
    # commit: SGLang's cursor advance does nothing for this pool, its circular commit is replay_commit
    pool = runner.req_to_token_pool.mamba_pool
    slots, accept = torch.tensor([2, -1, 0], dtype=torch.int32), torch.tensor([1, 2, 3], dtype=torch.int64)
    spec_decode_module.commit_gdn_replayssm_spec(write_pos=pool.replayssm_spec_write_pos, num_accepted=accept)
    spec_decode_module.commit_gdn_replayssm_circular(write_pos=pool.replayssm_spec_write_pos,
                                                     state_batch_indices=slots, accept_lens=accept,
                                                     mamba_track_indices=None)
    assert not spec_decode_module.seen
    (args, _), = commits.calls
    assert args[0] is kern.cursors and args[1] is slots and args[2].dtype == torch.int32
    assert args[2].tolist() == [1, 2, 3]
    # another pool's commits go on to SGLang's kernels
    other = torch.zeros(3, dtype=torch.int32)
    spec_decode_module.commit_gdn_replayssm_spec(write_pos=other)
    spec_decode_module.commit_gdn_replayssm_circular(write_pos=other, state_batch_indices=slots)
    assert [s[0] for s in spec_decode_module.seen] == ["spec", "circular"] and len(commits.calls) == 1
    with pytest.raises(NotImplementedError, match="mamba_track_indices"):
        spec_decode_module.commit_gdn_replayssm_circular(write_pos=pool.replayssm_spec_write_pos,
                                                         state_batch_indices=slots, accept_lens=accept,
                                                         mamba_track_indices=torch.zeros(3))
    # slot assignment: fresh mamba slots get empty rings, a held one (chunked prefill) keeps its cursor
    kern.cursors.pos.copy_(torch.arange(2 * POOL, dtype=torch.int32).view(POOL, 2) % 3)
    before = kern.cursors.pos.clone()
    runner.allocated[:] = [4, 1]
    reqs = [SimpleNamespace(kv=SimpleNamespace(holds_mamba=False, mamba_pool_idx=None)),
            SimpleNamespace(kv=SimpleNamespace(holds_mamba=True, mamba_pool_idx=torch.tensor(2))),
            SimpleNamespace(kv=SimpleNamespace(holds_mamba=False, mamba_pool_idx=None))]
    assert runner.req_to_token_pool.alloc(reqs) == [0, 1, 2]
    assert kern.cursors.pos[4].tolist() == [0, 0] and kern.cursors.pos[1].tolist() == [0, 0]
    keep = [0, 2, 3]
    torch.testing.assert_close(kern.cursors.pos[keep], before[keep], rtol=0, atol=0)
    # installing again (another runner of the process, or twice) wraps alloc once
    wrapped = runner.req_to_token_pool.alloc
    assert wrapped._cute_gdn_kernel is kern
    cg.install_into_runner(runner, kern)
    assert runner.req_to_token_pool.alloc is wrapped


def test_replay_target_verify_maps_sglangs_arguments(tmp_path):
    runner = replay_runner()
    kern = replay_kernel(tmp_path, runner)
    rec = Recorder(kern.kernels.target_verify)
    kern.kernels.target_verify = rec
    N, T = 3, STEPS
    _, q, k, v = packed(N * T)
    a, b = gates(N * T)
    layer = runner.model[1]
    temporal = runner.req_to_token_pool.mamba_pool.mamba_cache.temporal[1]
    o = kern.replay_target_verify(layer=layer, query=q, key=k, value=v, a=a, b=b,
                                  mamba_pool=runner.req_to_token_pool.mamba_pool,
                                  layer_cache=SimpleNamespace(temporal=temporal),
                                  cache_indices=torch.tensor([3, 0, -1, 9], dtype=torch.int32),
                                  replay_indices=torch.arange(N), query_start_loc=torch.arange(0, N * T + 1, T,
                                                                                               dtype=torch.int32),
                                  draft_token_num=T)
    (args, kwargs), = rec.calls
    assert [tuple(x.shape) for x in args] == [(N, T, H, K), (N, T, H, K), (N, T, HV, V), (N, T, HV), (N, T, HV)]
    assert all(x.data_ptr() == y.data_ptr() for x, y in zip(args, (q, k, v, a, b)))  # views, no copies
    assert kwargs["ring"] is kern.rings[7] and kwargs["cursors"] is kern.cursors and kwargs["state"] is temporal
    assert kwargs["state_indices"].tolist() == [3, 0, -1] and "cache" not in kwargs
    assert kwargs["A_log"] is layer.A_log and kwargs["dt_bias"] is layer.dt_bias
    assert o.shape == v.shape and o.data_ptr() == kwargs["out"].data_ptr()
    with pytest.raises(ValueError, match="layer_id=5"):
        kern.replay_target_verify(layer=GDNLayer(5), query=q, key=k, value=v, a=a, b=b,
                                  layer_cache=SimpleNamespace(temporal=temporal), cache_indices=torch.zeros(
                                      N, dtype=torch.int32), query_start_loc=torch.arange(N + 1), draft_token_num=T)
    with pytest.raises(NotImplementedError, match="draft_token_num"):
        kern.replay_target_verify(layer=layer, query=q, key=k, value=v, a=a, b=b,
                                  layer_cache=SimpleNamespace(temporal=temporal), cache_indices=torch.zeros(
                                      N, dtype=torch.int32), query_start_loc=torch.arange(N + 1), draft_token_num=T + 1)
    with pytest.raises(NotImplementedError, match="spec_mode='replay'"):
        kern.target_verify(**verify_args())
    assert len(rec.calls) == 1


def test_replay_refusals_at_install(tmp_path, spec_decode_module):
    kern = replay_kernel(tmp_path, replay_runner())
    for runner, match in ((replay_runner(disable_radix_cache=False), "disable_radix_cache"),
                          (replay_runner(extra_buffer=True), "enable_mamba_extra_buffer")):
        with pytest.raises(NotImplementedError, match=match):
            cg.install_into_runner(runner, kern)
        assert runner.attn_backend.linear_attn_backend.kernel_dispatcher.decode_kernel is not kern
    with pytest.raises(ValueError, match="install_into_runner"):
        cg.install(FakeDispatcher(), kern)
    cg.install(FakeDispatcher(), kern, modes=("decode", "extend"))  # no verify: a dispatcher is enough
    runner = replay_runner()
    runner.attn_backend.linear_attn_backend = SimpleNamespace(kernel_dispatcher=FakeDispatcher())
    with pytest.raises(TypeError, match="_replayssm_target_verify"):
        cg.install_into_runner(runner, kern)
    assert runner.attn_backend.linear_attn_backend.kernel_dispatcher.verify_kernel is not kern


def test_replay_hooks_match_sglangs_own_call_sites():
    """replay_target_verify takes every keyword GDNAttnBackend passes to _replayssm_target_verify; the commit
    kernels are imported from REPLAY_COMMIT_MODULE inside commit_mamba_states_after_verify (so the module
    attributes are read at each call) and called with the keywords the patch reads."""
    backend = _ast_class_methods(BACKEND_PY, "GDNAttnBackend")
    theirs = [a.arg for a in backend["_replayssm_target_verify"].args.kwonlyargs]
    ours = [p for p, x in inspect.signature(cg.CuteGDNKernel.replay_target_verify).parameters.items()
            if x.kind is inspect.Parameter.KEYWORD_ONLY]
    assert ours == theirs
    tree = ast.parse(SPEC_UTILS_PY.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "commit_mamba_states_after_verify")
    imports = {a.name for n in ast.walk(fn) if isinstance(n, ast.ImportFrom) and n.module == cg.REPLAY_COMMIT_MODULE
               for a in n.names}
    assert {"commit_gdn_replayssm_spec", "commit_gdn_replayssm_circular"} <= imports
    calls = {n.func.id: {k.arg for k in n.keywords} for n in ast.walk(fn)
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert {"write_pos"} <= calls["commit_gdn_replayssm_spec"]
    assert {"write_pos", "state_batch_indices", "accept_lens", "mamba_track_indices"} <= \
        calls["commit_gdn_replayssm_circular"]
    source = SPEC_DECODE_PY.read_text()
    assert "def commit_gdn_replayssm_spec(" in source and "def commit_gdn_replayssm_circular(" in source
    pool_py = (SGLANG / "srt" / "mem_cache" / "memory_pool.py").read_text()
    assert "req.kv.holds_mamba" in pool_py and "req.kv.mamba_pool_idx = mid[0]" in pool_py


def test_spec_env_reaches_the_kernel_kwargs(hook_registry, monkeypatch):
    monkeypatch.setenv("CUTE_GDN_SGLANG_MODES", "decode,extend,target_verify")
    monkeypatch.setenv("CUTE_GDN_SGLANG_SPEC", "replay")
    built = []
    monkeypatch.setattr(cg, "install_into_runner", lambda runner, **kw: built.append(kw))
    cg.plugin()
    (_, hook, _), = hook_registry
    hook(None, _runner(_hybrid(FakeDispatcher())))
    assert built == [dict(modes=cg.ALL_MODES, spec_mode="replay")]


@pytest.mark.parametrize("env,kwargs,want", [
    (" compact ", {}, "compact"),
    ("compact", dict(replay_fold="exact"), "exact"),  # an explicit kwarg wins over the environment
    ("", {}, None),                                   # unset or blank: GDNKernels' default
])
def test_replay_fold_env_reaches_the_kernel_kwargs(hook_registry, monkeypatch, env, kwargs, want):
    monkeypatch.setenv("CUTE_GDN_SGLANG_MODES", "decode,extend,target_verify")
    monkeypatch.setenv("CUTE_GDN_SGLANG_SPEC", "replay")
    monkeypatch.setenv("CUTE_GDN_SGLANG_REPLAY_FOLD", env)
    built = []
    monkeypatch.setattr(cg, "install_into_runner", lambda runner, **kw: built.append(kw))
    cg.register_sglang_hook(**kwargs)
    (_, hook, _), = hook_registry
    hook(None, _runner(_hybrid(FakeDispatcher())))
    assert built == [dict(modes=cg.ALL_MODES, spec_mode="replay", **({} if want is None else {"replay_fold": want}))]
