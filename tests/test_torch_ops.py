"""The torch.library registrations (cute_gdn.torch_ops) on the CPU: schemas, fake implementations, opcheck,
and torch.compile(fullgraph=True) tracing.

Where an op has to run, the public functions of cute_gdn.ops are replaced by stand-ins with the same
public signatures that compute with the plain-torch reference on the CPU and write their results in place,
as the kernels do. The registered ops look the public functions up at call time, so they run the
stand-ins; the GPU test (test_torch_ops_gpu.py) checks the same paths against the kernels.
"""

import inspect
import operator

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from cute_gdn import GDNKernels, ops, reference, torch_ops

OPS = ("prefill", "prefill_out", "decode", "decode_out", "verify", "verify_out", "commit", "commit_layers")

# Arguments each op writes in place, as its schema must declare them (and no others).
MUTATED = {"prefill": {"state"}, "prefill_out": {"state", "out"}, "decode": {"state"},
           "decode_out": {"state", "out"}, "verify": {"cache"}, "verify_out": {"cache", "out"},
           "commit": {"state"}, "commit_layers": {"states"}}

# Small CPU problem: B = 3 sequences (the middle one padding), GVA 2, cache of 2 steps.
B, H, HV, K, V = 3, 1, 2, 16, 16
POOL, CACHE_SLOTS, STEPS = 5, 3, 2


# ---------------------------------------------------------------------------------------------- stand-ins

class Calls(list):
    """The stand-ins' record of calls: (op, address of the tensor the op writes)."""


def _install_stand_ins(monkeypatch) -> Calls:
    calls = Calls()

    def prefill(q, k, v, a=None, b=None, *, A_log=None, dt_bias=None, g=None, beta=None, cu_seqlens, state,
                state_indices, has_initial_state=None, scale=None, use_qk_l2norm=True, out=None, plan=None):
        calls.append(("prefill", state.data_ptr()))
        o, new = reference.prefill(q, k, v, g=g, beta=beta, a=a, b=b, A_log=A_log, dt_bias=dt_bias,
                                   cu_seqlens=cu_seqlens, state=state, state_indices=state_indices,
                                   has_initial_state=has_initial_state, scale=scale, use_qk_l2norm=use_qk_l2norm,
                                   dtype=torch.float32)
        state.copy_(new)
        out = torch.empty_like(v) if out is None else out
        return out.copy_(o)

    def decode(q, k, v, a=None, b=None, *, A_log=None, dt_bias=None, g=None, beta=None, state, state_indices,
               scale=None, use_qk_l2norm=True, out=None):
        calls.append(("decode", state.data_ptr()))
        o, new = reference.decode(q, k, v, g=g, beta=beta, a=a, b=b, A_log=A_log, dt_bias=dt_bias, state=state,
                                  state_indices=state_indices, scale=scale, use_qk_l2norm=use_qk_l2norm,
                                  dtype=torch.float32)
        state.copy_(new)
        out = torch.empty_like(v) if out is None else out
        return out.copy_(o)

    def verify(q, k, v, a=None, b=None, *, A_log=None, dt_bias=None, g=None, beta=None, state, state_indices,
               cache, cache_indices=None, scale=None, use_qk_l2norm=True, out=None):
        calls.append(("verify", cache.data_ptr()))
        o, new = reference.verify(q, k, v, g=g, beta=beta, a=a, b=b, A_log=A_log, dt_bias=dt_bias, state=state,
                                  state_indices=state_indices, cache=cache, cache_indices=cache_indices, scale=scale,
                                  use_qk_l2norm=use_qk_l2norm, dtype=torch.float32)
        cache.copy_(new)
        out = torch.empty_like(v) if out is None else out
        return out.copy_(o)

    def commit(state, state_indices, cache, cache_indices, accepted_steps):
        calls.append(("commit", state.data_ptr()))
        state.copy_(reference.commit(state, state_indices, cache, cache_indices, accepted_steps))

    class LayerTable:
        """CPU stand-in for ops.LayerTable (the real one copies addresses to a GPU)."""
        built = 0

        def __init__(self, states, caches):
            LayerTable.built += 1
            self.states, self.caches = list(states), list(caches)

    def commit_layers(layers, state_indices, cache_indices, accepted_steps):
        assert isinstance(layers, LayerTable)
        calls.append(("commit_layers", layers.states[0].data_ptr()))
        for state, cache in zip(layers.states, layers.caches):
            state.copy_(reference.commit(state, state_indices, cache, cache_indices, accepted_steps))

    for name, fn in (("prefill", prefill), ("decode", decode), ("verify", verify), ("commit", commit),
                     ("commit_layers", commit_layers)):
        public = [p for p in inspect.signature(getattr(ops, name)).parameters if not p.startswith("_")]
        assert list(inspect.signature(fn).parameters) == public, name  # the stand-in takes the public arguments
        monkeypatch.setattr(ops, name, fn)
    monkeypatch.setattr(ops, "LayerTable", LayerTable)
    calls.LayerTable = LayerTable
    return calls


@pytest.fixture
def stand_ins(monkeypatch):
    torch_ops.clear_layer_tables()
    yield _install_stand_ins(monkeypatch)
    torch_ops.clear_layer_tables()  # the tables hold stand-in objects


# ---------------------------------------------------------------------------------------------- inputs

def _gates(shape, device, raw=True):
    a = (torch.randn(*shape, HV, device=device) * 2).to(torch.bfloat16)
    b = torch.randn(*shape, HV, device=device).to(torch.bfloat16)
    A_log = torch.rand(HV, device=device) * 2 - 1
    dt_bias = torch.randn(HV, device=device)
    if raw:
        return dict(a=a, b=b, A_log=A_log, dt_bias=dt_bias, g=None, beta=None)
    g, beta = reference.compute_gates(a, b, A_log, dt_bias, dtype=torch.float32)
    return dict(a=None, b=None, A_log=None, dt_bias=None, g=g.contiguous(), beta=beta.contiguous())


def _tokens(batch, T, device, raw=True):
    return dict(q=torch.randn(batch, T, H, K, device=device, dtype=torch.bfloat16),
                k=torch.randn(batch, T, H, K, device=device, dtype=torch.bfloat16),
                v=torch.randn(batch, T, HV, V, device=device, dtype=torch.bfloat16), **_gates((batch, T), device, raw))


def _index(values, device):
    return torch.tensor(values, dtype=torch.int32, device=device)


def _pool(device):
    return torch.randn(POOL, HV, V, K, device=device) * 0.5


def _cache(device):
    return torch.randn(CACHE_SLOTS, STEPS, HV, V, K, device=device) * 0.5


LENGTHS = (3, 0, 4)  # prefill: a zero-length sequence among others


def op_args(name: str, device="cpu", raw=True) -> tuple:
    """Positional arguments of torch.ops.cute_gdn.<name>, in schema order (defaulted ones given too)."""
    gates = ("a", "b", "A_log", "dt_bias", "g", "beta")
    if name.startswith("prefill"):
        t = _tokens(1, sum(LENGTHS), device, raw)
        bounds = [0]
        for n in LENGTHS:
            bounds.append(bounds[-1] + n)
        args = (t["q"], t["k"], t["v"], *(t[x] for x in gates), _index(bounds, device), _pool(device),
                _index([1, -1, 4], device), torch.tensor([True, False, True], device=device), None, True)
        return args + ((torch.empty_like(t["v"]),) if name.endswith("_out") else ())
    if name.startswith("decode"):
        t = _tokens(B, 1, device, raw)
        args = (t["q"], t["k"], t["v"], *(t[x] for x in gates), _pool(device), _index([3, -1, 0], device),
                0.2, True)
        return args + ((torch.empty_like(t["v"]),) if name.endswith("_out") else ())
    if name.startswith("verify"):
        t = _tokens(B, STEPS, device, raw)
        args = (t["q"], t["k"], t["v"], *(t[x] for x in gates), _pool(device), _index([3, -1, 0], device),
                _cache(device), _index([2, 0, 1], device), None, False)
        return args + ((torch.empty_like(t["v"]),) if name.endswith("_out") else ())
    if name == "commit":
        return (_pool(device), _index([3, -1, 0], device), _cache(device), None, _index([2, 1, 1], device))
    if name == "commit_layers":
        return ([_pool(device) for _ in range(3)], [_cache(device) for _ in range(3)], _index([3, -1, 0], device),
                _index([1, 2, 0], device), _index([1, 2, 2], device))
    raise KeyError(name)


# ---------------------------------------------------------------------------------------------- schemas

@pytest.mark.parametrize("name", OPS)
def test_op_is_registered_with_its_mutations(name):
    op = getattr(torch.ops.cute_gdn, name).default
    schema = op._schema
    assert schema.name == f"cute_gdn::{name}"
    written = {arg.name for arg in schema.arguments if arg.alias_info is not None and arg.alias_info.is_write}
    assert written == MUTATED[name]
    # Outputs are fresh tensors (or none): no return may alias an input.
    assert all(ret.alias_info is None for ret in schema.returns)
    assert len(schema.returns) == (1 if name in ("prefill", "decode", "verify") else 0)


@pytest.mark.parametrize("name", ("prefill", "decode", "verify", "commit", "commit_layers"))
def test_schema_takes_the_public_arguments(name):
    """Every public argument of cute_gdn.<op> but `out` (the _out op's), prefill's `plan` (a host-side
    override for tests and benchmarks; the torch op always runs the plan prefill picks) and the LayerTable
    (per-layer tensor lists instead), in the public order."""
    public = [p for p in inspect.signature(getattr(ops, name)).parameters
              if not p.startswith("_") and p not in ("out", "plan")]
    if name == "commit_layers":
        public = ["states", "caches"] + public[1:]
    args = [arg.name for arg in getattr(torch.ops.cute_gdn, name).default._schema.arguments]
    assert args == public
    if name in ("prefill", "decode", "verify"):
        out_args = [arg.name for arg in getattr(torch.ops.cute_gdn, name + "_out").default._schema.arguments]
        assert out_args == public + ["out"]


def test_optional_arguments_are_typed_optional():
    schema = torch.ops.cute_gdn.verify.default._schema
    types = {arg.name: str(arg.type) for arg in schema.arguments}
    for name in ("a", "b", "A_log", "dt_bias", "g", "beta", "cache_indices"):
        assert types[name] == "Optional[Tensor]", name
    assert types["scale"] == "Optional[float]" and types["use_qk_l2norm"] == "bool"
    layer_types = {arg.name: str(arg.type) for arg in torch.ops.cute_gdn.commit_layers.default._schema.arguments}
    assert layer_types["states"] == "List[Tensor]" and layer_types["caches"] == "List[Tensor]"


# ---------------------------------------------------------------------------------------------- fake impls

@pytest.mark.parametrize("raw", (True, False), ids=("raw", "precomputed"))
@pytest.mark.parametrize("name", OPS)
def test_fake_impl_shapes_on_fake_cuda(name, raw):
    """Under FakeTensorMode with CUDA fake tensors (no GPU needed): o as the eager op allocates it."""
    with FakeTensorMode():
        args = op_args(name, "cuda", raw)
        result = getattr(torch.ops.cute_gdn, name)(*args)
        if name in ("prefill", "decode", "verify"):
            v = args[2]
            assert result.shape == v.shape and result.dtype == torch.bfloat16
            assert result.device.type == "cuda" and result.stride() == v.stride()
            assert result is not v
        else:
            assert result is None


def test_fake_decode_of_packed_views_is_contiguous():
    """q/k/v as views of one projection: o is [B, 1, HV, V] contiguous, as torch.empty_like(v) makes it."""
    with FakeTensorMode():
        mixed = torch.empty(B, 1, 2 * H * K + HV * V, device="cuda", dtype=torch.bfloat16)
        q, k, v = torch.split(mixed, [H * K, H * K, HV * V], dim=-1)
        q, k, v = q.view(B, 1, H, K), k.view(B, 1, H, K), v.view(B, 1, HV, V)
        assert not v.is_contiguous()
        o = torch.ops.cute_gdn.decode(q, k, v, *_gates((B, 1), "cuda").values(), _pool("cuda"),
                                      _index([0, 1, 2], "cuda"))
        assert o.shape == (B, 1, HV, V) and o.is_contiguous()


def test_fake_impl_follows_a_dynamic_batch(stand_ins):
    """With dynamic shapes the fake o follows a symbolic B: one graph serves B = 3 and B = 2."""
    backend = CaptureBackend()
    torch._dynamo.reset()

    def step(q, k, v, g, beta, pool, slots):
        return torch_ops.decode(q, k, v, g=g, beta=beta, state=pool, state_indices=slots) * 2

    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend=backend)
    for batch, slots in ((3, [3, -1, 0]), (2, [1, 4])):
        t = _tokens(batch, 1, "cpu", raw=False)
        pool = _pool("cpu")
        eager_pool = pool.clone()
        want = step(t["q"], t["k"], t["v"], t["g"], t["beta"], eager_pool, _index(slots, "cpu"))
        got = compiled(t["q"], t["k"], t["v"], t["g"], t["beta"], pool, _index(slots, "cpu"))
        assert got.shape == (batch, 1, HV, V)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(pool, eager_pool, rtol=0, atol=0)
    assert len(backend.graphs) == 1
    shapes = [n.meta["example_value"].shape for n in backend.graphs[0].graph.nodes if n.op == "placeholder"
              and isinstance(n.meta.get("example_value"), torch.Tensor)]
    assert any(isinstance(s[0], torch.SymInt) for s in shapes)


# ---------------------------------------------------------------------------------------------- opcheck

@pytest.mark.parametrize("name", OPS)
def test_opcheck(name, stand_ins):
    """torch.library.opcheck with the CPU stand-ins: the declared mutations are the real ones (test_schema),
    the fake impl matches the real output (test_faketensor), and AOT dispatch with dynamic shapes
    (functionalization of the mutations) gives the same results."""
    args = op_args(name, "cpu", raw=name != "decode")
    results = torch.library.opcheck(getattr(torch.ops.cute_gdn, name).default, args,
                                    test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                                "test_aot_dispatch_dynamic"))
    assert set(results.values()) == {"SUCCESS"}, results
    assert stand_ins and {c[0] for c in stand_ins} == {name.removesuffix("_out")}


# ---------------------------------------------------------------------------------------------- wrappers

def test_wrappers_route_out_to_the_out_ops(stand_ins):
    args = op_args("decode_out", "cpu")
    q, k, v, a, b, A_log, dt_bias, g, beta, pool, slots, scale, l2, out = args
    before = pool.clone()
    got = torch_ops.decode(q, k, v, a, b, A_log=A_log, dt_bias=dt_bias, state=pool, state_indices=slots,
                           scale=scale, out=out)
    assert got is out
    o_ref, pool_ref = reference.decode(q, k, v, a=a, b=b, A_log=A_log, dt_bias=dt_bias, state=before,
                                       state_indices=slots, scale=scale, dtype=torch.float32)
    torch.testing.assert_close(out, o_ref.to(out.dtype), rtol=0, atol=0)
    torch.testing.assert_close(pool, pool_ref, rtol=0, atol=0)
    fresh = torch_ops.decode(q, k, v, a, b, A_log=A_log, dt_bias=dt_bias, state=before.clone(), state_indices=slots,
                             scale=scale)
    assert fresh is not out and fresh.data_ptr() != out.data_ptr()
    torch.testing.assert_close(fresh, out, rtol=0, atol=0)
    assert [c[0] for c in stand_ins] == ["decode", "decode"]


def test_layer_tables_are_memoized_by_address(stand_ins):
    states, caches, slots, cidx, acc = op_args("commit_layers", "cpu")
    built = stand_ins.LayerTable
    torch_ops.commit_layers(states, caches, slots, cidx, acc)
    torch_ops.commit_layers(list(states), list(caches), slots, cidx, acc)  # new lists, same tensors
    assert built.built == 1
    torch_ops.commit_layers(states[:2], caches[:2], slots, cidx, acc)     # other layers: another table
    assert built.built == 2
    stacked_states, stacked_caches = torch.stack(states), torch.stack(caches)
    for _ in range(3):  # a stacked tensor unbinds to new views of the same addresses every call
        torch_ops.commit_layers(stacked_states, stacked_caches, slots, cidx, acc)
    assert built.built == 3
    # A view with the same address but other strides is another set of tensors.
    torch_ops.commit_layers([s.transpose(2, 3) for s in states], caches, slots, cidx, acc)
    assert built.built == 4
    assert torch_ops.layer_table(states, caches) is torch_ops.layer_table(list(states), list(caches))
    assert built.built == 4


def test_commit_layers_writes_every_layer(stand_ins):
    states, caches, slots, cidx, acc = op_args("commit_layers", "cpu")
    expected = [reference.commit(s, slots, c, cidx, acc) for s, c in zip(states, caches)]
    assert not torch.equal(expected[0], states[0])
    torch_ops.commit_layers(states, caches, slots, cidx, acc)
    for got, want in zip(states, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_no_table_is_built_during_capture(stand_ins, monkeypatch):
    states, caches, slots, cidx, acc = op_args("commit_layers", "cpu")
    torch_ops.layer_table(states, caches)  # built before the "capture": found, no error
    monkeypatch.setattr(torch_ops, "_capturing", lambda t: True)
    torch_ops.commit_layers(states, caches, slots, cidx, acc)
    with pytest.raises(RuntimeError, match="CUDA-graph capture"):
        torch_ops.commit_layers(states[:1], caches[:1], slots, cidx, acc)
    assert stand_ins.LayerTable.built == 1


def test_many_tables_warn_once(stand_ins, monkeypatch):
    monkeypatch.setattr(torch_ops, "_TABLES_WARN", 2)
    _, _, slots, cidx, acc = op_args("commit_layers", "cpu")
    with pytest.warns(RuntimeWarning, match="LayerTables"):
        for _ in range(4):
            torch_ops.layer_table([_pool("cpu")], [_cache("cpu")])
    assert stand_ins.LayerTable.built == 4
    torch_ops.clear_layer_tables()
    assert not torch_ops._TABLES


SURFACE_METHODS = {"prefill": "extend", "decode": "decode", "verify": "target_verify", "commit": "commit",
                   "commit_layers": "commit_layers"}


def test_use_kernels_routes_the_ops_through_a_serving_surface(stand_ins, monkeypatch):
    """After use_kernels(kernels) every op calls that GDNKernels' method (with arguments its signature
    takes) and not the free function; a use_qk_l2norm other than the config's raises; None goes back."""
    kernels = GDNKernels(H, HV, K, V, pool_size=POOL, cache_steps=STEPS)  # building it needs no GPU
    seen = []
    for method in SURFACE_METHODS.values():
        def record(*args, _method=method, **kwargs):
            inspect.signature(getattr(GDNKernels, _method)).bind(kernels, *args, **kwargs)  # raises if it does not fit
            seen.append(_method)
            if _method in ("extend", "decode", "target_verify"):
                return torch.empty_like(args[2]) if kwargs.get("out") is None else kwargs["out"]
            return None
        monkeypatch.setattr(kernels, method, record)
    torch_ops.use_kernels(kernels)
    try:
        for name in OPS:
            args = list(op_args(name, "cpu"))
            if name.startswith("verify"):
                with pytest.raises(ValueError, match="use_qk_l2norm"):
                    getattr(torch.ops.cute_gdn, name)(*args)  # op_args gives verify use_qk_l2norm=False
                args[14] = True
            getattr(torch.ops.cute_gdn, name)(*args)
    finally:
        torch_ops.use_kernels(None)
    assert seen == [SURFACE_METHODS[name.removesuffix("_out")] for name in OPS]
    assert not stand_ins
    torch.ops.cute_gdn.commit(*op_args("commit", "cpu"))
    assert [c[0] for c in stand_ins] == ["commit"]


def test_commit_layers_runs_the_surfaces_config_check(stand_ins, monkeypatch):
    """Under use_kernels the memoized table (an ops.LayerTable, not GDNKernels.layer_table) still gets the
    surface's config check: tensors of another pool size or cache_steps raise ValueError before any commit,
    a table built before use_kernels included; a matching one is checked once per table and surface."""
    states, caches, slots, cidx, acc = op_args("commit_layers", "cpu")
    before = [s.clone() for s in states]
    torch_ops.layer_table(states, caches)  # built with no surface in use
    seen, checks = [], []

    def surface(**config):
        kernels = GDNKernels(H, HV, K, V, **config)
        monkeypatch.setattr(kernels, "commit_layers", lambda *args: seen.append(kernels))

        def check(*args):
            checks.append(kernels)
            GDNKernels._check_config(kernels, *args)
        monkeypatch.setattr(kernels, "_check_config", check)
        return kernels

    try:
        for config, error in ((dict(pool_size=POOL + 1, cache_steps=STEPS), "state must be"),
                              (dict(pool_size=POOL, cache_steps=STEPS + 1), "cache_steps"),
                              (dict(pool_size=POOL, cache_steps=STEPS, state_dtype=torch.bfloat16), "state must be")):
            torch_ops.use_kernels(surface(**config))
            with pytest.raises(ValueError, match=error):
                torch_ops.commit_layers(states, caches, slots, cidx, acc)
        assert len(checks) == 3 and not seen
        good = surface(pool_size=POOL, cache_steps=STEPS)
        torch_ops.use_kernels(good)
        for _ in range(3):
            torch_ops.commit_layers(states, caches, slots, cidx, acc)
        assert checks[3:] == [good] and seen == [good] * 3
        other = surface(pool_size=POOL, cache_steps=STEPS)  # another surface: checked again
        torch_ops.use_kernels(other)
        torch_ops.commit_layers(states, caches, slots, cidx, acc)
        assert checks[4:] == [other] and seen[3:] == [other]
    finally:
        torch_ops.use_kernels(None)
    assert stand_ins.LayerTable.built == 1 and not stand_ins  # one table; the free function never ran
    for got, want in zip(states, before):
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # the surfaces' stand-ins write nothing


@pytest.mark.parametrize("name", ("prefill", "verify"))
def test_prefill_and_verify_wrappers_route_out(stand_ins, name):
    """The wrappers' shared out dispatch: with out, the _out op writes it and it is returned; without, a fresh
    o with the same numbers."""
    args = op_args(name + "_out", "cpu")
    *call, out = args
    written = 10 if name == "prefill" else 11  # the pool (prefill) or the verify cache, written in place
    keep = call[written].clone()
    gates = dict(zip(("A_log", "dt_bias", "g", "beta"), call[5:9]))
    if name == "prefill":
        kwargs = dict(cu_seqlens=call[9], state=call[10], state_indices=call[11], has_initial_state=call[12],
                      scale=call[13], use_qk_l2norm=call[14])
    else:
        kwargs = dict(state=call[9], state_indices=call[10], cache=call[11], cache_indices=call[12], scale=call[13],
                      use_qk_l2norm=call[14])
    wrapper = getattr(torch_ops, name)
    assert wrapper(*call[:5], **gates, **kwargs, out=out) is out
    kwargs["state" if name == "prefill" else "cache"] = keep
    fresh = wrapper(*call[:5], **gates, **kwargs)
    assert fresh is not out and fresh.shape == out.shape
    assert float(out.float().abs().max()) > 0
    torch.testing.assert_close(fresh, out, rtol=0, atol=0)
    torch.testing.assert_close(keep, call[written], rtol=0, atol=0)
    assert [c[0] for c in stand_ins] == [name, name]


# ---------------------------------------------------------------------------------------------- torch.compile

class CaptureBackend:
    """A torch.compile backend that keeps Dynamo's graph and runs it as is."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


def _cute_calls(gm) -> list[str]:
    """The cute_gdn ops a graph calls, in order (direct calls or functionalized ones)."""
    names = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        if "auto_functionalized" in str(target):
            target = node.args[0]
        name = str(target)
        if name.startswith("cute_gdn."):
            names.append(name.split(".")[1])
    return names


def _serving_inputs(device="cpu"):
    """One engine step: decode (raw gates), verify (precomputed gates) + commit, then prefill of new sequences."""
    d = _tokens(B, 1, device)
    vt = _tokens(B, STEPS, device, raw=False)
    p = _tokens(1, sum(LENGTHS), device)
    return dict(
        q=d["q"], k=d["k"], v=d["v"], a=d["a"], b=d["b"], A_log=d["A_log"], dt_bias=d["dt_bias"],
        qv=vt["q"], kv=vt["k"], vv=vt["v"], gv=vt["g"], betav=vt["beta"],
        qp=p["q"], kp=p["k"], vp=p["v"], ap=p["a"], bp=p["b"],
        cu=_index([0, 3, 3, 7], device), pslots=_index([1, -1, 4], device),
        init=torch.tensor([True, False, True], device=device),
        pool=_pool(device), slots=_index([3, -1, 0], device), cache=_cache(device), accepted=_index([2, 0, 1], device))


def serving_step(x):
    """decode, verify, commit and prefill on one pool, with torch math between them."""
    o = torch_ops.decode(x["q"] * 2, x["k"], x["v"], x["a"], x["b"], A_log=x["A_log"], dt_bias=x["dt_bias"],
                         state=x["pool"], state_indices=x["slots"])
    ov = torch_ops.verify(x["qv"], x["kv"], x["vv"] + o, g=x["gv"], beta=x["betav"], state=x["pool"],
                          state_indices=x["slots"], cache=x["cache"])
    torch_ops.commit(x["pool"], x["slots"], x["cache"], None, x["accepted"].clamp(max=STEPS))
    op = torch_ops.prefill(x["qp"], x["kp"], x["vp"], x["ap"], x["bp"], A_log=x["A_log"], dt_bias=x["dt_bias"],
                           cu_seqlens=x["cu"], state=x["pool"], state_indices=x["pslots"], has_initial_state=x["init"])
    return o.float().square().sum(-1), ov.float() * 0.5, op


def _clone(x):
    return {k: v.clone() for k, v in x.items()}


def test_compile_fullgraph_captures_the_ops_in_order(stand_ins):
    x = _serving_inputs()
    eager = _clone(x)
    want = serving_step(eager)
    assert [c[0] for c in stand_ins] == ["decode", "verify", "commit", "prefill"]
    stand_ins.clear()

    backend = CaptureBackend()
    torch._dynamo.reset()
    got = torch.compile(serving_step, fullgraph=True, backend=backend)(x)
    assert len(backend.graphs) == 1
    assert _cute_calls(backend.graphs[0]) == ["decode", "verify", "commit", "prefill"]
    assert [c[0] for c in stand_ins] == ["decode", "verify", "commit", "prefill"]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    torch.testing.assert_close(x["pool"], eager["pool"], rtol=0, atol=0)
    torch.testing.assert_close(x["cache"], eager["cache"], rtol=0, atol=0)


def test_explain_reports_no_graph_break(stand_ins):
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(serving_step)(_serving_inputs())
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    assert _cute_calls(explanation.graphs[0]) == ["decode", "verify", "commit", "prefill"]


def test_aot_graph_keeps_the_mutations(stand_ins):
    """After functionalization (AOTAutograd, input mutations kept in the graph as inductor keeps them) the
    ops are auto_functionalized calls in order, each one's pool feeding the next, and the graph ends by
    copying the last pool into the pool input and verify's cache into the cache input; running it gives
    eager's pool, cache and outputs bit for bit."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    graphs = []

    def forward_compiler(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    x = _serving_inputs()
    eager = _clone(x)
    want = serving_step(eager)
    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=forward_compiler, keep_inference_input_mutations=True)
    got = torch.compile(serving_step, fullgraph=True, backend=backend)(x)
    assert len(graphs) == 1
    gm = graphs[0]
    assert _cute_calls(gm) == ["decode", "verify", "commit", "prefill"]
    functionalized = [n for n in gm.graph.nodes if "auto_functionalized" in str(n.target)]
    assert len(functionalized) == 4
    copies = {tuple(n.args[0].meta["val"].shape): n.args[1] for n in gm.graph.nodes
              if n.target is torch.ops.aten.copy_.default and n.args[0].op == "placeholder"}
    assert set(copies) == {(POOL, HV, V, K), (CACHE_SLOTS, STEPS, HV, V, K)}
    assert copies[(POOL, HV, V, K)].args[0] is functionalized[3]             # the pool after prefill
    assert copies[(CACHE_SLOTS, STEPS, HV, V, K)].args[0] is functionalized[1]  # the cache verify wrote
    # Each op reads the pool (or cache) the op before it produced.
    for node, before in zip(functionalized[1:], functionalized[:-1]):
        producers = {arg.args[0] for arg in node.all_input_nodes if arg.target is operator.getitem}
        assert before in producers, (node, before)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    torch.testing.assert_close(x["pool"], eager["pool"], rtol=0, atol=0)
    torch.testing.assert_close(x["cache"], eager["cache"], rtol=0, atol=0)


def test_inductor_hands_the_ops_the_callers_pool(stand_ins):
    """Inductor re-inplaces the functionalized ops: each op gets the caller's pool and cache, not copies
    (a copy of a serving pool would cost more than the kernel), and the results are eager's."""
    x = _serving_inputs()
    eager = _clone(x)
    want = serving_step(eager)
    stand_ins.clear()
    torch._dynamo.reset()
    got = torch.compile(serving_step, fullgraph=True)(x)
    pool, cache = x["pool"].data_ptr(), x["cache"].data_ptr()
    assert stand_ins == [("decode", pool), ("verify", cache), ("commit", pool), ("prefill", pool)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    torch.testing.assert_close(x["pool"], eager["pool"])
    torch.testing.assert_close(x["cache"], eager["cache"])

    # commit_layers on a stacked [L, ...] pool: the op gets views of the caller's tensor, so one table serves
    # every call (a copy per call would build a table per call).
    states, caches, slots, cidx, acc = op_args("commit_layers", "cpu")
    stacked = torch.stack(states)
    want = [reference.commit(s, slots, c, cidx, acc) for s, c in zip(states, caches)]

    def commit_step(stacked, caches, slots, cidx, acc):
        torch_ops.commit_layers(stacked, caches, slots, cidx, acc)
        return acc + 1

    stand_ins.clear()
    compiled = torch.compile(commit_step, fullgraph=True)
    for _ in range(2):
        compiled(stacked, caches, slots, cidx, acc)
    assert stand_ins == [("commit_layers", stacked.data_ptr())] * 2
    assert stand_ins.LayerTable.built == 1
    for got, w in zip(stacked, want):
        torch.testing.assert_close(got, w, rtol=0, atol=0)


def test_compile_commit_layers_and_out_variants(stand_ins):
    states, caches, slots, cidx, acc = op_args("commit_layers", "cpu")
    d = op_args("decode_out", "cpu")
    eager_states = [s.clone() for s in states]
    eager_pool, eager_out = d[9].clone(), d[13].clone()

    def step(states, caches, slots, cidx, acc, q, k, v, a, b, A_log, dt_bias, pool, dslots, out):
        torch_ops.decode(q, k, v, a, b, A_log=A_log, dt_bias=dt_bias, state=pool, state_indices=dslots, out=out)
        torch_ops.commit_layers(states, caches, slots, cidx, acc)
        return out * 2

    q, k, v, a, b, A_log, dt_bias, _, _, pool, dslots, _, _, out = d
    want = step(eager_states, caches, slots, cidx, acc, q, k, v, a, b, A_log, dt_bias, eager_pool, dslots,
                eager_out)
    backend = CaptureBackend()
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend=backend)(states, caches, slots, cidx, acc, q, k, v, a, b,
                                                                A_log, dt_bias, pool, dslots, out)
    assert _cute_calls(backend.graphs[0]) == ["decode_out", "commit_layers"]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(out, eager_out, rtol=0, atol=0)
    torch.testing.assert_close(pool, eager_pool, rtol=0, atol=0)
    for s, e in zip(states, eager_states):
        torch.testing.assert_close(s, e, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- replay

from cute_gdn import replay  # noqa: E402

RING_LEN, MAX_T = 4, STEPS
GB = replay.make_replay_ring(1, H, HV, K, V, ring_len=RING_LEN, device="meta").gb.shape[-1]  # per-record scalars
REPLAY_MUTATED = {"replay_verify": {"state", "ring_k", "ring_v", "ring_d", "ring_gb"},
                  "replay_verify_out": {"state", "ring_k", "ring_v", "ring_d", "ring_gb", "out"},
                  "replay_commit": {"cursors_pos"}, "replay_flush": {"states", "cursors_pos"}}


def _install_replay_stand_ins(monkeypatch) -> Calls:
    """Plain-torch stand-ins with replay's public signatures that write what the kernels write: the T
    candidate records at ring positions start + count + t (mod L), a fold (here: the checkpoint halved,
    a deterministic write) for a row past the threshold, cursor moves, and o from the checkpoint."""
    calls = Calls()

    def replay_verify(q, k, v, a=None, b=None, *, A_log=None, dt_bias=None, g=None, beta=None, state,
                      state_indices, ring, cursors, scale=None, use_qk_l2norm=True, out=None):
        calls.append(("replay_verify", state.data_ptr(), cursors.fold))
        if g is None:
            g, beta = reference.compute_gates(a, b, A_log, dt_bias, dtype=torch.float32)
        T, L = q.shape[1], cursors.ring_len
        o = torch.zeros(v.shape, dtype=torch.float32)
        for row, slot in enumerate(state_indices.tolist()):
            if slot < 0:
                continue
            start, count = cursors.pos[slot].tolist()
            if count > cursors.fold_threshold:
                state[slot] *= 0.5
                start, count = (start + count) % L, 0
            for t in range(T):
                p = (start + count + t) % L
                ring.k[slot, :, p] = k[row, t]
                ring.v[slot, :, p] = v[row, t]
                ring.d[slot, :, p] = v[row, t].float() * beta[row, t, :, None]
                ring.gb[slot, :, p, 0], ring.gb[slot, :, p, 1] = g[row, t], beta[row, t]
            o[row] = torch.einsum("hvk,thk->thv", state[slot], q[row].float().repeat_interleave(HV // H, 1))
        out = torch.empty_like(v) if out is None else out
        return out.copy_(o)

    def replay_commit(cursors, state_indices, num_accepted):
        calls.append(("replay_commit", cursors.pos.data_ptr(), cursors.fold))
        for slot, n in zip(state_indices.tolist(), num_accepted.tolist()):
            if slot >= 0:
                cursors.pos[slot, 1] += n

    def replay_flush(states, rings, cursors, state_indices, *, use_qk_l2norm=True):
        calls.append(("replay_flush", cursors.pos.data_ptr(), cursors.fold))
        for state, ring in zip(states, rings):
            for slot in state_indices.tolist():
                if slot >= 0:
                    state[slot] += ring.d[slot].sum(1)[..., None]  # [HV, V, 1]
        for slot in state_indices.tolist():
            if slot >= 0:
                cursors.pos[slot] = 0

    for name, fn in (("replay_verify", replay_verify), ("replay_commit", replay_commit),
                     ("replay_flush", replay_flush)):
        assert list(inspect.signature(fn).parameters) == list(inspect.signature(getattr(replay, name)).parameters)
        monkeypatch.setattr(replay, name, fn)
    return calls


@pytest.fixture
def replay_stand_ins(monkeypatch):
    return _install_replay_stand_ins(monkeypatch)


def _ring(device):
    return replay.ReplayRing(torch.randn(POOL, H, RING_LEN, K, device=device).to(torch.bfloat16),
                             torch.randn(POOL, HV, RING_LEN, V, device=device).to(torch.bfloat16),
                             torch.randn(POOL, HV, RING_LEN, V, device=device),
                             torch.randn(POOL, HV, RING_LEN, GB, device=device))


def _replay_cursors(device, fold="exact"):
    # slot 3 past the fold threshold (L - 2T = 0), slot 0 empty
    pos = torch.tensor([[0, 0]] * 3 + [[1, 1]] + [[0, 0]] * (POOL - 4), dtype=torch.int32, device=device)
    return replay.ReplayCursors(pos, RING_LEN, MAX_T, fold)


def replay_op_args(name: str, device="cpu", raw=True, fold=None) -> tuple:
    """The op's positional arguments; fold None leaves the last one (fold) to its default."""
    gates = ("a", "b", "A_log", "dt_bias", "g", "beta")
    tail = () if fold is None else (fold,)
    if name.startswith("replay_verify"):
        t = _tokens(B, MAX_T, device, raw)
        ring, cursors = _ring(device), _replay_cursors(device)
        args = (t["q"], t["k"], t["v"], *(t[x] for x in gates), _pool(device), _index([3, -1, 0], device), *ring,
                cursors.pos, RING_LEN, MAX_T, None, True)
        return args + ((torch.empty_like(t["v"]),) if name.endswith("_out") else ()) + tail
    if name == "replay_commit":
        return (_replay_cursors(device).pos, RING_LEN, MAX_T, _index([3, -1, 0], device),
                _index([2, 1, 1], device)) + tail
    if name == "replay_flush":
        rings = [_ring(device) for _ in range(2)]
        return ([_pool(device) for _ in range(2)], *([r[i] for r in rings] for i in range(4)),
                _replay_cursors(device).pos, RING_LEN, MAX_T, _index([3, -1, 0], device), True) + tail
    raise KeyError(name)


@pytest.mark.parametrize("name", sorted(REPLAY_MUTATED))
def test_replay_op_is_registered_with_its_mutations(name):
    schema = getattr(torch.ops.cute_gdn, name).default._schema
    written = {arg.name for arg in schema.arguments if arg.alias_info is not None and arg.alias_info.is_write}
    assert written == REPLAY_MUTATED[name]
    assert all(ret.alias_info is None for ret in schema.returns)
    assert len(schema.returns) == (1 if name == "replay_verify" else 0)


def test_replay_verify_schema_takes_the_public_arguments_with_the_tuples_unpacked():
    public = [p for p in inspect.signature(replay.replay_verify).parameters if p != "out"]
    i = public.index("ring")
    want = public[:i] + ["ring_k", "ring_v", "ring_d", "ring_gb", "cursors_pos", "ring_len", "max_tokens"] + public[i + 2:]
    # ReplayCursors.fold comes last, with its default, so that calls without it keep their positions
    assert [a.name for a in torch.ops.cute_gdn.replay_verify.default._schema.arguments] == want + ["fold"]
    assert [a.name for a in torch.ops.cute_gdn.replay_verify_out.default._schema.arguments] == want + ["out", "fold"]
    assert [a.name for a in torch.ops.cute_gdn.replay_commit.default._schema.arguments] == \
        ["cursors_pos", "ring_len", "max_tokens", "state_indices", "num_accepted", "fold"]
    assert [a.name for a in torch.ops.cute_gdn.replay_flush.default._schema.arguments][-3:] == \
        ["state_indices", "use_qk_l2norm", "fold"]
    for name in REPLAY_MUTATED:
        fold = getattr(torch.ops.cute_gdn, name).default._schema.arguments[-1]
        assert fold.name == "fold" and str(fold.type) == "str" and fold.default_value == "exact"


@pytest.mark.parametrize("fold", (None, "compact"), ids=("default-fold", "compact"))
@pytest.mark.parametrize("raw", (True, False), ids=("raw", "precomputed"))
@pytest.mark.parametrize("name", sorted(REPLAY_MUTATED))
def test_replay_fake_impls_on_fake_cuda(name, raw, fold):
    with FakeTensorMode():
        args = replay_op_args(name, "cuda", raw, fold)
        result = getattr(torch.ops.cute_gdn, name)(*args)
        if name == "replay_verify":
            assert result.shape == args[2].shape and result.dtype == torch.bfloat16 and result.device.type == "cuda"
        else:
            assert result is None


@pytest.mark.parametrize("fold", (None, "compact"), ids=("default-fold", "compact"))
@pytest.mark.parametrize("name", sorted(REPLAY_MUTATED))
def test_replay_opcheck(name, fold, replay_stand_ins):
    args = replay_op_args(name, "cpu", raw=name != "replay_verify_out", fold=fold)
    results = torch.library.opcheck(getattr(torch.ops.cute_gdn, name).default, args,
                                    test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                                "test_aot_dispatch_dynamic"))
    assert set(results.values()) == {"SUCCESS"}, results
    assert {c[0] for c in replay_stand_ins} == {name.removesuffix("_out")}
    assert {c[2] for c in replay_stand_ins} == {fold or "exact"}  # the rebuilt cursors carry the fold


def _replay_inputs(fold="exact"):
    t = _tokens(B, MAX_T, "cpu", raw=False)
    return dict(q=t["q"], k=t["k"], v=t["v"], g=t["g"], beta=t["beta"], pools=[_pool("cpu"), _pool("cpu")],
                rings=[_ring("cpu"), _ring("cpu")], cursors=_replay_cursors("cpu", fold),
                slots=_index([3, -1, 0], "cpu"), accepted=_index([2, 0, 1], "cpu"))


def replay_step(x):
    """Two layers of replay verify, one commit for both, a flush of slot 0: torch math in between."""
    outs = []
    for pool, ring in zip(x["pools"], x["rings"]):
        o = torch_ops.replay_verify(x["q"], x["k"], x["v"], g=x["g"], beta=x["beta"], state=pool,
                                    state_indices=x["slots"], ring=ring, cursors=x["cursors"])
        outs.append(o.float() * 2)
    torch_ops.replay_commit(x["cursors"], x["slots"], x["accepted"].clamp(max=MAX_T))
    torch_ops.replay_flush(x["pools"], x["rings"], x["cursors"], x["slots"][2:])
    return outs


def _clone_replay(x):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else
                v._replace(pos=v.pos.clone()) if isinstance(v, replay.ReplayCursors)
                else [type(r)(*(t.clone() for t in r)) if isinstance(r, tuple) else r.clone() for r in v])
            for k, v in x.items()}


def _graph_folds(gm) -> list:
    """The fold argument of every cute_gdn replay call in a graph (a functionalized call passes it by name)."""
    folds = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        functionalized = "auto_functionalized" in str(node.target)
        target = node.args[0] if functionalized else node.target
        if str(target).startswith("cute_gdn.replay"):
            schema = (target if isinstance(target, torch._ops.OpOverload) else target.default)._schema
            args = dict(zip([a.name for a in schema.arguments], [] if functionalized else node.args))
            args.update(node.kwargs)
            folds.append(args.get("fold", "exact"))
    return folds


@pytest.mark.parametrize("fold", replay.FOLD_MODES)
def test_replay_compile_fullgraph_without_graph_breaks(fold, replay_stand_ins):
    x = _replay_inputs(fold)
    eager = _clone_replay(x)
    assert eager["cursors"].fold == fold
    want = replay_step(eager)
    order = ["replay_verify", "replay_verify", "replay_commit", "replay_flush"]
    assert [c[0] for c in replay_stand_ins] == order and {c[2] for c in replay_stand_ins} == {fold}
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(replay_step)(_clone_replay(x))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    assert _cute_calls(explanation.graphs[0]) == order
    assert _graph_folds(explanation.graphs[0]) == [fold] * 4
    backend = CaptureBackend()
    torch._dynamo.reset()
    del replay_stand_ins[:]
    got = torch.compile(replay_step, fullgraph=True, backend=backend)(x)
    assert len(backend.graphs) == 1 and _cute_calls(backend.graphs[0]) == order
    assert [c[0] for c in replay_stand_ins] == order and {c[2] for c in replay_stand_ins} == {fold}
    for g_, w in zip(got, want):
        torch.testing.assert_close(g_, w, rtol=0, atol=0)
    assert float(want[0].abs().max()) > 0
    torch.testing.assert_close(x["cursors"].pos, eager["cursors"].pos, rtol=0, atol=0)
    assert x["cursors"].pos[0].tolist() == [0, 0] and x["cursors"].pos[3, 1].item() == 1 + 2  # the stand-in commit adds
    for a, b in zip(x["pools"] + [t for r in x["rings"] for t in r], eager["pools"] + [t for r in eager["rings"] for t in r]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_replay_ops_route_through_use_kernels(replay_stand_ins, monkeypatch):
    """Under use_kernels the replay ops call GDNKernels.target_verify (ring=, cursors=), replay_commit and
    replay_flush, with the tuples rebuilt."""
    kernels = GDNKernels(H, HV, K, V, pool_size=POOL, cache_steps=MAX_T, spec_mode="replay", ring_len=RING_LEN,
                         device="cpu")
    seen = []

    def record(method):
        def call(*args, **kwargs):
            inspect.signature(getattr(GDNKernels, method)).bind(kernels, *args, **kwargs)
            seen.append((method, args, kwargs))
            return torch.empty_like(args[2]) if method == "target_verify" else None
        return call

    for method in ("target_verify", "replay_commit", "replay_flush"):
        monkeypatch.setattr(kernels, method, record(method))
    torch_ops.use_kernels(kernels)
    try:
        replay_step(_replay_inputs())
    finally:
        torch_ops.use_kernels(None)
    assert [s[0] for s in seen] == ["target_verify", "target_verify", "replay_commit", "replay_flush"]
    kwargs = seen[0][2]
    assert isinstance(kwargs["ring"], replay.ReplayRing) and isinstance(kwargs["cursors"], replay.ReplayCursors)
    assert (kwargs["cursors"].ring_len, kwargs["cursors"].max_tokens) == (RING_LEN, MAX_T)
    assert "cache" not in kwargs and not replay_stand_ins


def test_replay_ops_under_use_kernels_keep_the_cursors_fold(monkeypatch):
    """The ops rebuild the cursors with their fold, so a replay_fold="compact" GDNKernels accepts its own
    cursors through every op and refuses exact ones (its config check) before any kernel runs."""
    kernels = GDNKernels(H, HV, K, V, pool_size=POOL, cache_steps=MAX_T, spec_mode="replay", ring_len=RING_LEN,
                         device="cpu", replay_fold="compact")
    seen = []
    monkeypatch.setattr(replay, "_replay_commit", lambda kcache, allow_compile, cursors, *a: seen.append(cursors))
    monkeypatch.setattr(replay, "_replay_flush", lambda kcache, allow_compile, check, states, rings, cursors, *a:
                        (check(None, states[0], rings[0], cursors), seen.append(cursors)))
    slots, accepted = _index([3, -1, 0], "cpu"), _index([2, 0, 1], "cpu")
    pools, rings = [torch.zeros(POOL, HV, V, K)], [kernels.make_ring()]
    torch_ops.use_kernels(kernels)
    try:
        for name in ("exact", "compact"):
            cursors = _replay_cursors("cpu", name)
            if name == "exact":
                with pytest.raises(ValueError, match="fold='exact'.*replay_fold='compact'"):
                    torch_ops.replay_commit(cursors, slots, accepted)
                with pytest.raises(ValueError, match="fold='exact'.*replay_fold='compact'"):
                    torch_ops.replay_flush(pools, rings, cursors, slots)
                continue
            torch_ops.replay_commit(cursors, slots, accepted)
            torch_ops.replay_flush(pools, rings, cursors, slots)
    finally:
        torch_ops.use_kernels(None)
    assert [c.fold for c in seen] == ["compact", "compact"]
    assert [c.pos.data_ptr() for c in seen] == [cursors.pos.data_ptr()] * 2
