"""The public ops' host path on the CPU: decode's written-out one-gate-set test agrees with
ops.one_gate_set, and the public ops carry no private parameters."""

import itertools
import inspect

import pytest
import torch

from cute_gdn import ops
from cute_gdn.cache import KernelCache

B, H, HV, K, V, POOL = 2, 2, 4, 16, 16, 3


def _tensors():
    q = torch.randn(B, 1, H, K, dtype=torch.bfloat16)
    v = torch.randn(B, 1, HV, V, dtype=torch.bfloat16)
    gate = torch.randn(B, 1, HV, dtype=torch.bfloat16)
    return dict(q=q, k=q.clone(), v=v, a=gate, b=gate.clone(), A_log=torch.zeros(HV), dt_bias=torch.zeros(HV),
                g=torch.zeros(B, 1, HV), beta=torch.zeros(B, 1, HV), state=torch.zeros(POOL, HV, V, K),
                state_indices=torch.zeros(B, dtype=torch.int32))


@pytest.mark.parametrize("given", list(itertools.product((False, True), repeat=6)))
def test_decode_gate_set_check_matches_one_gate_set(given):
    """Every combination of given/None for (a, b, A_log, dt_bias, g, beta): the hot path launches
    exactly when _one_gate_set accepts it, and otherwise runs the full checks (which raise)."""
    t = _tensors()
    gates = {name: (t[name] if on else None) for name, on in zip(("a", "b", "A_log", "dt_bias", "g", "beta"), given)}
    raw = gates["g"] is None
    launched = []
    cache = KernelCache("/nonexistent-cute-gdn-cache")
    for bias in (torch.float32, None):  # the signature of a raw call (fp32 dt_bias) and of a precomputed one
        sig = ("decode", torch.bfloat16, torch.float32, H, K, HV, V, POOL, bias, True, True)
        cache.by_signature[sig] = (1 << 30, lambda *args: launched.append(len(args)), None)
    accepted = ops.one_gate_set(raw, gates["a"], gates["b"], gates["A_log"], gates["dt_bias"], gates["beta"])
    decode = ops.decode_entry(lambda: cache, lambda: False, None)
    call = lambda: decode(t["q"], t["k"], t["v"], gates["a"], gates["b"], A_log=gates["A_log"],
                          dt_bias=gates["dt_bias"], g=gates["g"], beta=gates["beta"], state=t["state"],
                          state_indices=t["state_indices"])
    if accepted:
        o = call()
        assert launched == [11] and o.shape == (B, 1, HV, V)
    else:
        with pytest.raises(ValueError):
            call()
        assert launched == []
    # run_op(DECODE, ...), the path decode writes out, launches (or refuses) the same call.
    args = (t["q"], t["k"], t["v"], gates["a"], gates["b"], gates["A_log"], gates["dt_bias"], gates["g"],
            gates["beta"], t["state"], t["state_indices"], None, True, None)
    if accepted:
        o = ops.run_op(ops.DECODE, cache, False, None, args)
        assert launched == [11, 11] and o.shape == (B, 1, HV, V)
    else:
        with pytest.raises(ValueError):
            ops.run_op(ops.DECODE, cache, False, None, args)
        assert launched == []


class _Refusing:
    """A compiled function that refuses every call, as tvm-ffi does a tensor it does not take."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1
        raise TypeError("tvm-ffi: argument 3 mismatch")


def test_run_op_reraises_a_refused_launch_under_the_argument_name():
    """A launch that the compiled function refuses goes back through the op's full checks, which name the
    argument (here a CPU q: the checks' first); nothing is memoized for a refused call's signature but the entry."""
    t = _tensors()
    cache = KernelCache("/nonexistent-cute-gdn-cache")
    refusing = _Refusing()
    args = (t["q"], t["k"], t["v"], t["a"], t["b"], t["A_log"], t["dt_bias"], None, None, t["state"],
            t["state_indices"], None, True, None)
    sig, batch = ops.DECODE.signature(*args)
    assert batch == B
    cache.by_signature[sig] = (1 << 30, refusing, None)
    with pytest.raises(ValueError, match="q must be on a CUDA device"):
        ops.run_op(ops.DECODE, cache, False, None, args)
    assert refusing.calls == 1 and list(cache.by_signature) == [sig]


@pytest.mark.parametrize("op", ["DECODE", "VERIFY", "COMMIT", "COMMIT_LAYERS", "PREFILL"])
def test_every_op_runs_on_one_path(op):
    """Every op is an OpPath that run_op drives, and its public form's private twin (*_using) calls run_op
    (decode writes it out: test above)."""
    path = getattr(ops, op)
    assert isinstance(path, ops.OpPath) and all(callable(f) for f in path)
    if op != "DECODE":
        source = inspect.getsource(getattr(ops, f"{op.lower()}_using"))
        assert f"run_op({op}," in source


@pytest.mark.parametrize("name", ["prefill", "decode", "verify", "commit", "commit_layers"])
def test_public_ops_have_no_private_parameters_and_document_errors(name):
    fn = getattr(ops, name)
    params = inspect.signature(fn).parameters
    assert not [p for p in params if p.startswith("_")], list(params)
    assert "Raises:" in fn.__doc__ and "ValueError" in fn.__doc__
    if name == "decode":  # the public decode is the implementation itself, built by decode_entry
        bound = ops.decode_entry(lambda: None, lambda: False, None)
        assert inspect.signature(bound) == inspect.signature(fn) and fn.__name__ == "decode"
        return
    private = inspect.signature(getattr(ops, f"{name}_using")).parameters  # the form the serving surface calls
    assert list(private)[:2] == ["kcache", "allow_compile"]
    assert [p for p in private if p not in ("kcache", "allow_compile", "check_config")] == list(params)


@pytest.mark.parametrize("op", ["REPLAY_VERIFY", "REPLAY_CURSOR"])
def test_replay_ops_run_on_the_same_path(op):
    """The replay protocol's verify and cursor ops (replay_commit, and the flush's cursor reset) are OpPaths
    too; replay_flush, a rare slow-path op, checks every argument on every call."""
    from cute_gdn import replay

    path = getattr(replay, op)
    assert isinstance(path, ops.OpPath) and all(callable(f) for f in path)
