"""The transformers integration on the CPU: a tiny random Qwen3-Next in fp32 with cute_gdn's prefill and decode
replaced by the plain-torch reference (run in fp64, with the kernels' layout checks), against transformers' own
torch path. This checks the integration's layout handling numerically: the [B, HV, K, V] <-> [pool, HV, V, K]
state transposes (K != V, so a missing transpose cannot go unnoticed), GVA without repeated heads, the batch
packed along T with cu_seqlens, the copy that gives q/k/v a unit last stride, and the decode step's state
staying in the cache's own tensor. Skipped where transformers is not installed."""

import copy

import pytest
import torch

pytest.importorskip("transformers", minversion="5.17")
from transformers import DynamicCache, Qwen3NextConfig, Qwen3NextForCausalLM  # noqa: E402

import cute_gdn  # noqa: E402
from cute_gdn import _checks as chk  # noqa: E402
from cute_gdn import ops  # noqa: E402
from cute_gdn import reference  # noqa: E402
from cute_gdn.integrations import transformers as integ  # noqa: E402

# (H, HV, K, V): GVA 2 with K != V, GVA 1, GVA 4.
HEADS = [(2, 4, 16, 32), (2, 2, 32, 32), (1, 4, 16, 16)]
STEPS = 4


def tiny_config(H, HV, K, V, layers=4):
    # Three GDN layers and one full-attention layer (full_attention_interval 4, as Qwen3-Next), dense MLPs.
    return Qwen3NextConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, linear_num_key_heads=H,
                           linear_num_value_heads=HV, linear_key_head_dim=K, linear_value_head_dim=V,
                           num_experts=0)


def tiny_models(heads, seed=0, **cute_kwargs):
    """(transformers' model, a copy on cute_gdn), both fp32 on the CPU with the same random weights."""
    torch.manual_seed(seed)
    ref = Qwen3NextForCausalLM(tiny_config(*heads)).eval()
    with torch.no_grad():  # larger projections than the 0.02 init, so the delta rule moves the logits
        for layer in integ.gdn_layers(ref):
            layer.in_proj_qkvz.weight.mul_(10)
            layer.in_proj_ba.weight.mul_(10)
    cute = integ.use_cute_gdn(copy.deepcopy(ref), **cute_kwargs)
    return ref, cute


class FakeKernels:
    """cute_gdn.prefill / decode in plain torch (reference.py in fp64), in place on the pool as the kernels are,
    after the layout checks the kernels make. Records every call."""

    def __init__(self):
        self.calls = []

    def _check_common(self, q, k, v, a, b, A_log, dt_bias, state, state_indices, batch):
        for name, x in (("q", q), ("k", k)):
            chk.vector_aligned(name, x)
        chk.unit_last_stride("v", v)
        assert k.shape == q.shape and v.shape[:2] == q.shape[:2]
        H, HV = q.shape[2], v.shape[2]
        assert HV % H == 0
        for name, x in (("a", a), ("b", b)):
            chk.unit_last_stride(name, x)
            assert x.shape == (*q.shape[:2], HV) and x.dtype == q.dtype, name
        assert A_log.dtype == torch.float32 and A_log.shape == (HV,) and A_log.is_contiguous()
        assert dt_bias.dtype in (torch.float32, torch.bfloat16) and dt_bias.shape == (HV,) and dt_bias.is_contiguous()
        chk.state_pool("state", state, HV, v.shape[3], q.shape[3], q.device)
        assert state_indices.dtype == torch.int32 and state_indices.shape == (batch,)
        assert state_indices.is_contiguous()

    def prefill(self, q, k, v, a=None, b=None, *, A_log, dt_bias, cu_seqlens, state, state_indices,
                has_initial_state=None, scale=None, use_qk_l2norm=True, out=None):
        assert q.shape[0] == 1 and out is None
        chk.vector_aligned("v", v)
        N = cu_seqlens.shape[0] - 1
        self._check_common(q, k, v, a, b, A_log, dt_bias, state, state_indices, N)
        assert cu_seqlens.dtype == torch.int32 and cu_seqlens.is_contiguous()
        if has_initial_state is not None:
            assert has_initial_state.dtype == torch.bool and has_initial_state.shape == (N,)
        self.calls.append(dict(op="prefill", T=q.shape[1], N=N, H=q.shape[2], q_stride=q.stride(),
                               state_ptr=state.data_ptr(), slots_ptr=state_indices.data_ptr(),
                               bounds=cu_seqlens.tolist(),
                               init=None if has_initial_state is None else has_initial_state.tolist()))
        o, new_state = reference.prefill(q, k, v, a=a, b=b, A_log=A_log, dt_bias=dt_bias, cu_seqlens=cu_seqlens,
                                         state=state, state_indices=state_indices,
                                         has_initial_state=has_initial_state, scale=scale,
                                         use_qk_l2norm=use_qk_l2norm)
        state.copy_(new_state)
        return o.to(q.dtype)

    def decode(self, q, k, v, a=None, b=None, *, A_log, dt_bias, state, state_indices, scale=None,
               use_qk_l2norm=True, out=None):
        assert q.shape[1] == 1 and out is None
        self._check_common(q, k, v, a, b, A_log, dt_bias, state, state_indices, q.shape[0])
        self.calls.append(dict(op="decode", B=q.shape[0], H=q.shape[2], state_ptr=state.data_ptr(),
                               slots_ptr=state_indices.data_ptr()))
        o, new_state = reference.decode(q, k, v, a=a, b=b, A_log=A_log, dt_bias=dt_bias, state=state,
                                        state_indices=state_indices, scale=scale, use_qk_l2norm=use_qk_l2norm)
        state.copy_(new_state)
        return o.to(q.dtype)

    def ops(self, op):
        return [c for c in self.calls if c["op"] == op]


def _cpu_identity(mp):
    # ops' arange memo (the slot indices) asks torch.cuda whether a capture is running, which a CPU-only torch
    # cannot answer; a fresh memo that knows no capture runs on the CPU.
    mp.setattr(ops, "IDENTITY_INDICES", ops.DeviceVectors(lambda n, device: torch.arange(n, dtype=torch.int32,
                                                                                  device=device),
                                                   capturing=lambda: False))


@pytest.fixture
def fake():
    """The fake kernels in place of cute_gdn's, and transformers' torch fallbacks (never FLA) for both models."""
    kernels = FakeKernels()
    with pytest.MonkeyPatch.context() as mp, integ.torch_reference_path():
        mp.setattr(cute_gdn, "prefill", kernels.prefill)
        mp.setattr(cute_gdn, "decode", kernels.decode)
        _cpu_identity(mp)
        yield kernels


def run_steps(model, prompt, steps, *, feed=None, mask=None, chunks=(None,), between=None):
    """Prefill `prompt` [B, T] (in `chunks`, split points along T), then `steps` single-token steps on the cache,
    each feeding feed[:, i] or else the greedy token. Returns (logits [B, T + steps, vocab], fed tokens
    [B, steps], cache). between(cache) runs after the prefill (such as a beam reorder)."""
    cache = DynamicCache(config=model.config)
    logits, fed = [], []
    with torch.no_grad():
        bounds = [0, *[c for c in chunks if c is not None], prompt.shape[1]]
        for lo, hi in zip(bounds, bounds[1:]):
            out = model(input_ids=prompt[:, lo:hi], attention_mask=None if mask is None else mask[:, :hi],
                        past_key_values=cache, use_cache=True)
            logits.append(out.logits)
        if between is not None:
            between(cache)
        for i in range(steps):
            token = out.logits[:, -1:].argmax(-1) if feed is None else feed[:, i:i + 1]
            fed.append(token)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            out = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
            logits.append(out.logits)
    return torch.cat(logits, dim=1), torch.cat(fed, dim=1) if fed else prompt[:, :0], cache


def assert_close(x, ref, rel=1e-4):
    err = float((x - ref).abs().max())
    scale = float(ref.abs().max())
    assert err <= rel * scale + 1e-6, f"max error {err:.3g} against a max of {scale:.3g}"


def assert_states_match(cute_cache, ref_cache, model, in_place=True):
    """The cache holds the state in transformers' [B, HV, K, V] meaning; in place: as a K-last view."""
    for layer in integ.gdn_layers(model):
        got = cute_cache.layers[layer.layer_idx].recurrent_states[0]
        want = ref_cache.layers[layer.layer_idx].recurrent_states[0]
        assert got.shape == want.shape == (want.shape[0], layer.num_v_heads, layer.head_k_dim, layer.head_v_dim)
        assert got.transpose(-1, -2).is_contiguous() == in_place
        assert_close(got.float(), want, rel=1e-4)


@pytest.mark.parametrize("heads", HEADS, ids=["gva2_k16_v32", "gva1", "gva4"])
@pytest.mark.parametrize("B,T", [(1, 23), (3, 9)])
def test_prefill_and_decode_match_transformers(fake, heads, B, T):
    ref, cute = tiny_models(heads)
    prompt = torch.randint(0, 96, (B, T))
    want, tokens, ref_cache = run_steps(ref, prompt, STEPS)
    got, _, cute_cache = run_steps(cute, prompt, STEPS, feed=tokens)
    assert_close(got, want)
    assert_states_match(cute_cache, ref_cache, cute)

    layers = integ.gdn_layers(cute)
    prefills, decodes = fake.ops("prefill"), fake.ops("decode")
    assert len(prefills) == len(layers) == 3 and len(decodes) == len(layers) * STEPS
    H, HV, K, V = heads
    for call in prefills:  # one call per layer for the whole batch, H heads (no repeat), the rows packed along T
        assert call["N"] == B and call["T"] == B * T and call["H"] == H
        assert call["bounds"] == [n * T for n in range(B + 1)] and call["init"] == [False] * B
        assert call["q_stride"][-1] == 1
    for call in decodes:
        assert call["B"] == B and call["H"] == H
    # Every decode step ran in place in the cache's own tensor: the pointer the kernel got is the cache's.
    ptrs = {layer.layer_idx: cute_cache.layers[layer.layer_idx].recurrent_states[0].data_ptr() for layer in layers}
    assert [c["state_ptr"] for c in decodes] == [ptrs[layer.layer_idx] for _ in range(STEPS) for layer in layers]


def test_generate_matches_transformers(fake):
    ref, cute = tiny_models(HEADS[0], seed=1)
    prompt = torch.randint(0, 96, (2, 12))
    kwargs = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        want = ref.generate(prompt, **kwargs)
        got = cute.generate(prompt, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    assert_close(torch.stack(got.logits), torch.stack(want.logits))
    assert len(fake.ops("prefill")) == 3 and len(fake.ops("decode")) == 3 * 4


def test_left_padding_matches_transformers(fake):
    """Batched generation with left padding: the padded rows reach the kernels zeroed, as in transformers."""
    ref, cute = tiny_models(HEADS[0], seed=2)
    prompt = torch.randint(0, 96, (3, 14))
    mask = torch.ones_like(prompt)
    mask[1, :5] = 0
    mask[2, :1] = 0
    want, tokens, ref_cache = run_steps(ref, prompt, STEPS, mask=mask)
    got, _, cute_cache = run_steps(cute, prompt, STEPS, feed=tokens, mask=mask)
    assert_close(got, want)
    assert_states_match(cute_cache, ref_cache, cute)
    # The padded row's prefill equals the unpadded prompt's: zero state through the left pads.
    alone, _, _ = run_steps(cute, prompt[1:2, 5:], 0)
    assert_close(got[1:2, 5:14], alone, rel=1e-3)


def test_chunked_prefill_continues_from_the_cache(fake):
    """T > 1 on a cache that holds a state: a prefill from that state (has_initial_state None = all True)."""
    ref, cute = tiny_models(HEADS[0], seed=3)
    prompt = torch.randint(0, 96, (2, 20))
    want, tokens, ref_cache = run_steps(ref, prompt, STEPS, chunks=(7, 15))
    got, _, cute_cache = run_steps(cute, prompt, STEPS, feed=tokens, chunks=(7, 15))
    assert_close(got, want)
    assert_states_match(cute_cache, ref_cache, cute)
    prefills = fake.ops("prefill")
    assert [c["T"] for c in prefills] == [14] * 3 + [16] * 3 + [10] * 3
    assert [c["init"] for c in prefills] == [[False, False]] * 3 + [None] * 6
    # The continuations wrote in place into the cache's tensors, as the decode steps did.
    ptrs = {cute_cache.layers[i].recurrent_states[0].data_ptr() for i in range(3)}
    assert {c["state_ptr"] for c in prefills[3:]} == ptrs


def test_reordered_cache_falls_back_to_a_copy(fake):
    """Beam search's reorder_cache leaves a V-last tensor in the cache: the steps copy it to a K-last pool and
    write the result back, with the same numbers."""
    ref, cute = tiny_models(HEADS[0], seed=4)
    prompt = torch.randint(0, 96, (3, 10))
    beams = torch.tensor([2, 0, 0])
    want, tokens, ref_cache = run_steps(ref, prompt, STEPS, between=lambda c: c.reorder_cache(beams))
    got, _, cute_cache = run_steps(cute, prompt, STEPS, feed=tokens, between=lambda c: c.reorder_cache(beams))
    assert_close(got, want)
    assert_states_match(cute_cache, ref_cache, cute, in_place=False)
    ptrs = {cute_cache.layers[i].recurrent_states[0].data_ptr() for i in range(3)}
    assert not ptrs & {c["state_ptr"] for c in fake.ops("decode")}


def test_no_cache_forward_matches_transformers(fake):
    ref, cute = tiny_models(HEADS[2], seed=5)
    prompt = torch.randint(0, 96, (2, 17))
    with torch.no_grad():
        want = ref(prompt, use_cache=False).logits
        got = cute(prompt, use_cache=False).logits
    assert_close(got, want)
    assert len(fake.ops("prefill")) == 3 and not fake.ops("decode")


def test_bf16_state(fake):
    """state_dtype=bf16: the cache holds a bf16 K-last state, rounded once per call."""
    ref, cute = tiny_models(HEADS[0], seed=6, state_dtype=torch.bfloat16)
    prompt = torch.randint(0, 96, (2, 12))
    want, tokens, ref_cache = run_steps(ref, prompt, STEPS)
    got, _, cute_cache = run_steps(cute, prompt, STEPS, feed=tokens)
    for layer in integ.gdn_layers(cute):
        state = cute_cache.layers[layer.layer_idx].recurrent_states[0]
        want_state = ref_cache.layers[layer.layer_idx].recurrent_states[0]
        assert state.dtype == torch.bfloat16 and state.transpose(-1, -2).is_contiguous()
        # bf16 rounds to 2^-9 relative; a few roundings over the steps.
        assert reference_rel_rms(state, want_state) < 2e-2
    assert reference_rel_rms(got, want) < 2e-2


def reference_rel_rms(x, ref):
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm())


def test_gate_params_are_converted_once():
    """A bf16 A_log (a model cast to bf16) goes to the kernels as an exact fp32 copy, made once per version of
    the parameter; a bf16 dt_bias goes as it is; an fp16 one is converted."""
    _, cute = tiny_models(HEADS[0])
    layer = integ.gdn_layers(cute)[0]
    with torch.no_grad():
        layer.A_log.data = layer.A_log.data.to(torch.bfloat16)
        layer.dt_bias.data = layer.dt_bias.data.to(torch.bfloat16)
    A_log = integ._gate_param(layer, "A_log", (torch.float32,))
    assert A_log.dtype == torch.float32 and torch.equal(A_log, layer.A_log.float())
    assert integ._gate_param(layer, "A_log", (torch.float32,)) is A_log
    with torch.no_grad():
        layer.A_log.add_(0.5)
    fresh = integ._gate_param(layer, "A_log", (torch.float32,))
    assert fresh is not A_log and torch.equal(fresh, layer.A_log.float())
    bias = integ._gate_param(layer, "dt_bias", integ._BIAS_DTYPES)
    assert bias.dtype == torch.bfloat16 and bias.data_ptr() == layer.dt_bias.data_ptr()
    with torch.no_grad():
        layer.dt_bias.data = layer.dt_bias.data.to(torch.float16)
    bias = integ._gate_param(layer, "dt_bias", integ._BIAS_DTYPES)
    assert bias.dtype == torch.float32 and torch.equal(bias, layer.dt_bias.float())


def test_conv_output_strides():
    """At B = 1 the conv output's transpose gives q/k/v a last-dim stride of T, which the kernels reject; the
    integration's [B, T, C] copy gives unit-stride heads with 16-byte aligned rows (prefill's requirement)."""
    B, T, H, HV, K, V = 1, 100, 2, 4, 128, 128
    conv_out = torch.randn(B, 2 * H * K + HV * V, T)  # [B, C, T], as causal_conv1d_fn returns it
    strided = torch.split(conv_out.transpose(1, 2), [H * K, H * K, HV * V], dim=-1)[2].reshape(B, T, HV, V)
    assert strided.stride()[-1] == T
    with pytest.raises(ValueError, match="unit stride on its last dim"):
        chk.unit_last_stride("v", strided)
    q, k, v = integ._split_heads(conv_out.transpose(1, 2).contiguous().view(1, B * T, -1), H, HV, K, V)
    for name, x in (("q", q), ("k", k), ("v", v)):
        chk.vector_aligned(name, x)
    assert torch.equal(v, strided.reshape(1, B * T, HV, V))


def test_restore_and_errors(fake):
    ref, cute = tiny_models(HEADS[1], seed=7)
    prompt = torch.randint(0, 96, (1, 8))
    assert integ.uses_cute_gdn(cute) and not integ.uses_cute_gdn(ref)
    with pytest.raises(NotImplementedError, match="no backward"):
        cute(prompt)  # autograd on: the kernels could not give gradients
    with torch.no_grad(), pytest.raises(NotImplementedError, match="cu_seq_lens_q"):
        cute(prompt, cu_seq_lens_q=torch.tensor([0, 3, 8], dtype=torch.int32))
    integ.restore_transformers(cute)
    assert not integ.uses_cute_gdn(cute)
    fake.calls.clear()
    with torch.no_grad():
        assert torch.equal(cute(prompt).logits, ref(prompt).logits)
    assert not fake.calls
    with pytest.raises(TypeError, match="state_dtype"):
        integ.use_cute_gdn(cute, state_dtype=torch.float16)
    with pytest.raises(ValueError, match="no Qwen3NextGatedDeltaNet"):
        integ.use_cute_gdn(torch.nn.Linear(2, 2))


def test_slots_are_the_shared_identity_memo(fake):
    """state_indices = arange(B) comes from ops' capture-safe memo (one tensor grown as needed), not a copy."""
    _, cute = tiny_models(HEADS[0], seed=8)
    assert not hasattr(integ, "_SLOTS") and not hasattr(integ, "_slots")
    for B in (2, 3):
        run_steps(cute, torch.randint(0, 96, (B, 6)), 2)
    memo = ops.IDENTITY_INDICES.get(3, torch.device("cpu"))
    assert torch.equal(memo, torch.arange(3, dtype=torch.int32))
    assert len(fake.calls) == 2 * 3 * 3  # (prefill + 2 decodes) x 3 layers x 2 batch sizes
    assert {c["slots_ptr"] for c in fake.calls} == {memo.data_ptr()}  # both batch sizes: views of one tensor


# The parameters whose gradient would go through the kernels (transformers' own names in the GDN layer).
KERNEL_PARAMS = ["in_proj_qkvz.weight", "in_proj_ba.weight", "conv1d.weight", "A_log", "dt_bias"]


@pytest.mark.parametrize("name", KERNEL_PARAMS)
def test_trainable_layer_parameters_raise(fake, name):
    """Autograd through a GDN layer's own parameters (an input that does not require grad, as with LoRA or a
    fine-tuned projection) raises instead of dropping the gradient; before any kernel call or cache write."""
    _, cute = tiny_models(HEADS[1], seed=9)
    cute.requires_grad_(False)
    layer = integ.gdn_layers(cute)[0]
    layer.get_parameter(name).requires_grad_(True)
    prompt = torch.randint(0, 96, (1, 8))
    assert not cute.get_input_embeddings()(prompt).requires_grad
    cache = DynamicCache(config=cute.config)
    with pytest.raises(NotImplementedError, match="no backward"):
        cute(prompt, past_key_values=cache, use_cache=True)
    assert not fake.calls
    assert not cache.has_previous_state(layer.layer_idx)  # the conv cache was not written
    with torch.no_grad():  # no recording: runs
        cute(prompt)
    assert len(fake.ops("prefill")) == 3


def test_trainable_parameters_outside_the_kernels_keep_their_gradients(fake):
    """Only what enters the kernels raises: with the lm_head (after every kernel) trainable, the forward runs
    with autograd on and the lm_head's gradient is the torch path's."""
    ref, cute = tiny_models(HEADS[1], seed=10)
    prompt = torch.randint(0, 96, (2, 8))
    grads = []
    for model in (ref, cute):
        model.requires_grad_(False)
        model.lm_head.weight.requires_grad_(True)
        model(prompt).logits.square().mean().backward()
        grads.append(model.lm_head.weight.grad)
    assert len(fake.ops("prefill")) == 3
    assert_close(grads[1], grads[0])


def test_fp32_model_raises_the_kernels_type_error(monkeypatch):
    """The real ops reject fp32 q (before any write) with a TypeError, as the docstring and docs say."""
    _cpu_identity(monkeypatch)
    _, cute = tiny_models(HEADS[1])
    with torch.no_grad(), pytest.raises(TypeError, match="q must have dtype"):
        cute(torch.randint(0, 96, (1, 8)), use_cache=False)
    docs = open(__file__.rsplit("/tests/", 1)[0] + "/docs/transformers.md").read()
    for text in (integ.__doc__, docs):
        line = " ".join(text.split())
        fp32 = line[line.index("fp32 models"):]
        fp32 = fp32[:fp32.index("CPU tensors")]
        assert "TypeError" in fp32 and "ValueError" not in fp32, fp32


def test_torch_reference_path_unwraps_transformers_backends():
    from transformers.models.qwen3_next import modeling_qwen3_next as modeling
    before = {name: getattr(modeling, name) for name in integ._KERNEL_GLOBALS}
    with integ.torch_reference_path():
        for name in integ._KERNEL_GLOBALS:
            fn = getattr(modeling, name)
            assert fn.__module__ == modeling.__name__ and not hasattr(fn, "__wrapped__")
    assert {name: getattr(modeling, name) for name in integ._KERNEL_GLOBALS} == before
    with integ.torch_reference_path():
        assert integ.transformers_backend() == "torch"
    assert integ.transformers_backend() in ("torch", "unknown") or integ.transformers_backend().startswith("fla")
