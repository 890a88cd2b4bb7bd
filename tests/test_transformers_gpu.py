"""A small random-weight Qwen3-Next (three GDN layers and one full-attention layer, K = V = 128) on an sm_90 GPU:
transformers' bf16 model with its GDN layers on cute_gdn against the same model in fp32 on transformers' own torch
path, with transformers' bf16 torch path as the yardstick: prefill plus 16 decode steps, logits and states.

Tokens: greedy tokens of two bf16 runs may part ways after a near tie, and from there their logits are not
comparable. So the fp32 model generates the tokens greedily, and each bf16 model is fed the same tokens one step
at a time (teacher forcing): every logit of every step is then a prediction of the same context.

References: both run transformers' plain-torch delta rule and conv (`torch_reference_path`), never FLA, which
transformers picks whenever `fla` imports."""

import copy

import pytest
import torch

pytest.importorskip("transformers", minversion="5.17")
from transformers import Qwen3NextConfig, Qwen3NextForCausalLM  # noqa: E402
from transformers.models.qwen3_next import modeling_qwen3_next as modeling  # noqa: E402

import cute_gdn  # noqa: E402
from cute_gdn.integrations import transformers as integ  # noqa: E402
from cute_gdn.ops import decode_keys, prefill_key  # noqa: E402
from test_transformers import run_steps  # noqa: E402

pytestmark = pytest.mark.gpu

STEPS = 16
# (B, T, H, HV, left padding of the last row). B = 1: the conv output's transpose has stride T on the channels,
# the layout the kernels reject, so the integration's copy is exercised.
CASES = [(1, 100, 2, 4, 0), (2, 65, 4, 4, 7), (3, 200, 1, 4, 0)]


def gpu_kernel_keys() -> list:
    """Every kernel this file compiles: per case, prefill and decode (both tiles) at pool size B, bf16 io, fp32
    state, raw gates with the bf16 model's bf16 dt_bias, q/k L2 norm on."""
    keys = []
    for B, _, H, HV, _ in CASES:
        problem = dict(io_dtype="bfloat16", state_dtype="float32", num_heads=H, num_v_heads=HV, head_k_dim=128,
                       head_v_dim=128, pool_size=B, gate_mode="raw", dt_bias_dtype="bfloat16", use_qk_l2norm=True)
        keys += [prefill_key(**problem), *decode_keys(**problem)]
    return list(dict.fromkeys(keys))


def build_models(H, HV, seed):
    """(fp32 reference, bf16 on transformers' torch path, bf16 on cute_gdn), the same random weights."""
    config = Qwen3NextConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=64, linear_num_key_heads=H,
                             linear_num_value_heads=HV, linear_key_head_dim=128, linear_value_head_dim=128,
                             num_experts=0)
    torch.manual_seed(seed)
    ref = Qwen3NextForCausalLM(config).to("cuda").eval()
    with torch.no_grad():  # gates and inputs spread wider than the 0.02 init gives
        for layer in integ.gdn_layers(ref):
            layer.in_proj_qkvz.weight.mul_(4)
            layer.in_proj_ba.weight.mul_(10)
    bf16 = copy.deepcopy(ref).to(torch.bfloat16)
    cute = integ.use_cute_gdn(copy.deepcopy(ref).to(torch.bfloat16))
    return ref, bf16, cute


class Spy:
    """Records what reaches cute_gdn's ops and transformers' conv, then calls them."""

    def __init__(self, mp):
        self.prefill, self.decode, self.conv = [], [], []
        for name, log in (("prefill", self.prefill), ("decode", self.decode)):
            mp.setattr(cute_gdn, name, self._wrap(getattr(cute_gdn, name), log))
        conv = modeling.causal_conv1d_fn

        def spy_conv(*args, **kwargs):
            out = conv(*args, **kwargs)  # [B, C, T]
            self.conv.append(out.transpose(1, 2).stride())
            return out

        mp.setattr(modeling, "causal_conv1d_fn", spy_conv)

    @staticmethod
    def _wrap(fn, log):
        def call(q, k, v, *args, **kwargs):
            log.append((q.shape, q.stride(), k.stride(), v.stride(), kwargs["state"].data_ptr()))
            return fn(q, k, v, *args, **kwargs)
        return call


def errors(x, ref, valid):  # logits [B, L, vocab], valid [B, L] bool -> (max abs, rms)
    diff = (x.float() - ref)[valid]
    return float(diff.abs().max()), float(diff.pow(2).mean().sqrt())


def rel_rms(x, ref):
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm())


@pytest.fixture
def exact_fp32():
    """The fp32 reference in true fp32 (no TF32 matmuls)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("B,T,H,HV,pad", CASES, ids=["B1_T100_gva2", "B2_T65_gva1_leftpad", "B3_T200_gva4"])
def test_qwen3_next_on_cute_gdn(exact_fp32, B, T, H, HV, pad):
    ref, bf16, cute = build_models(H, HV, seed=B)
    prompt = torch.randint(0, 1024, (B, T), device="cuda")
    mask = torch.ones_like(prompt)
    mask[-1, :pad] = 0
    mask = mask if pad else None
    # The spies come off before torch_reference_path puts transformers' functions back.
    with integ.torch_reference_path(), pytest.MonkeyPatch.context() as mp:
        assert integ.transformers_backend() == "torch"
        want, tokens, ref_cache = run_steps(ref, prompt, STEPS, mask=mask)
        torch_bf16, _, bf16_cache = run_steps(bf16, prompt, STEPS, feed=tokens, mask=mask)
        spy = Spy(mp)
        got, _, cute_cache = run_steps(cute, prompt, STEPS, feed=tokens, mask=mask)

    # cute_gdn ran every GDN layer: one prefill per layer for the whole batch, one decode per layer and step.
    layers = integ.gdn_layers(cute)
    assert len(spy.prefill) == len(layers) and len(spy.decode) == len(layers) * STEPS
    for shape, *strides, _ in spy.prefill:
        assert tuple(shape) == (1, B * T, H, 128) and all(s[-1] == 1 for s in strides)
    if B == 1:  # the layout the kernels reject came out of the conv, and went in copied
        assert spy.conv and all(s[-1] == T for s in spy.conv)
    ptrs = {layer.layer_idx: cute_cache.layers[layer.layer_idx].recurrent_states[0].data_ptr() for layer in layers}
    assert [c[-1] for c in spy.decode] == [ptrs[layer.layer_idx] for _ in range(STEPS) for layer in layers]

    valid = torch.ones(B, T + STEPS, dtype=torch.bool, device="cuda")
    valid[-1, :pad] = False
    assert torch.isfinite(got.float()[valid]).all()
    scale = float(want[valid].abs().max())
    cute_max, cute_rms = errors(got, want, valid)
    torch_max, torch_rms = errors(torch_bf16, want, valid)
    print(f"\nB={B} T={T} H={H} HV={HV} pad={pad}: logits max |x| {scale:.3g}; max error cute_gdn {cute_max:.3g} "
          f"transformers bf16 {torch_max:.3g}; rms error cute_gdn {cute_rms:.3g} transformers bf16 {torch_rms:.3g}")
    assert cute_max <= 2 * torch_max + 1e-3 * scale
    assert cute_rms <= 2 * torch_rms + 1e-4 * scale

    # The final states, in transformers' [B, HV, K, V] meaning, as K-last views of the cache's own tensors.
    for layer in layers:
        state = cute_cache.layers[layer.layer_idx].recurrent_states[0]
        want_state = ref_cache.layers[layer.layer_idx].recurrent_states[0]
        assert state.shape == want_state.shape == (B, HV, 128, 128) and state.transpose(-1, -2).is_contiguous()
        cute_err = rel_rms(state, want_state)
        torch_err = rel_rms(bf16_cache.layers[layer.layer_idx].recurrent_states[0], want_state)
        print(f"  layer {layer.layer_idx} state rel rms: cute_gdn {cute_err:.3g}, transformers bf16 {torch_err:.3g}")
        assert cute_err <= 2 * torch_err + 1e-4
