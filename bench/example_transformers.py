"""Qwen3-Next in Hugging Face transformers, with and without cute_gdn: greedy generation, the largest logit
difference between the two runs, and tokens per second.

    python bench/example_transformers.py                                  # random-weight small Qwen3-Next
    python bench/example_transformers.py --model /path/to/Qwen3-Next-80B-A3B-Instruct --prompt "Hello"
    python bench/example_transformers.py --batch 4 --prompt-len 2048 --new-tokens 128

Needs an sm_90 GPU and transformers >= 5.17. Without cute_gdn, transformers runs FLA's Triton kernels where
`fla` imports and its plain-torch fallback otherwise (printed). The first cute_gdn call per batch size compiles
its three kernels (prefill, two decode tiles) unless they were precompiled
(`cute-gdn-precompile --num-heads H --num-v-heads HV --head-dim 128 --pool-size B`); a warm-up run absorbs that,
and both backends are timed after one warm-up generation.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, Qwen3NextConfig, Qwen3NextForCausalLM

from cute_gdn.integrations.transformers import gdn_layers, transformers_backend, use_cute_gdn


def random_model(args) -> torch.nn.Module:
    # Qwen3-Next-80B's GDN heads (16 q/k, 32 v, head dim 128) in a few small dense layers: every fourth layer
    # is full attention, as in the model.
    config = Qwen3NextConfig(vocab_size=4096, hidden_size=1024, intermediate_size=2048,
                             num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2,
                             head_dim=128, linear_num_key_heads=args.heads, linear_num_value_heads=args.v_heads,
                             linear_key_head_dim=128, linear_value_head_dim=128, num_experts=0)
    torch.manual_seed(0)
    return Qwen3NextForCausalLM(config).to(device="cuda", dtype=torch.bfloat16).eval()


def prompt_ids(args, model) -> torch.Tensor:  # [B, T] int64
    if args.model and args.prompt:
        from transformers import AutoTokenizer
        ids = AutoTokenizer.from_pretrained(args.model)(args.prompt, return_tensors="pt").input_ids
        return ids.repeat(args.batch, 1).cuda()
    torch.manual_seed(1)
    return torch.randint(0, model.config.vocab_size, (args.batch, args.prompt_len), device="cuda")


def generate(model, ids, new_tokens) -> tuple:
    """Greedy generation: (sequences [B, T + n], logits [n, B, vocab] fp32, seconds)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    torch.cuda.synchronize()
    return out.sequences, torch.stack(out.logits).float(), time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a Qwen3-Next checkpoint (path or hub id); default: a random-weight small one")
    p.add_argument("--prompt", help="text prompt (with --model); default: random token ids")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=512, help="random prompt length")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--layers", type=int, default=8, help="random model: layers (3 of every 4 are GDN)")
    p.add_argument("--heads", type=int, default=16, help="random model: GDN q/k heads")
    p.add_argument("--v-heads", type=int, default=32, help="random model: GDN v heads")
    p.add_argument("--state-dtype", choices=("float32", "bfloat16"), default="float32")
    args = p.parse_args()

    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, device_map="cuda").eval()
    else:
        model = random_model(args)
    ids = prompt_ids(args, model)
    layer = gdn_layers(model)[0]
    B, T = ids.shape
    print(f"{len(gdn_layers(model))} GDN layers, H={layer.num_k_heads} HV={layer.num_v_heads} "
          f"K={layer.head_k_dim} V={layer.head_v_dim}; batch {B}, prompt {T}, {args.new_tokens} new tokens")

    runs = {}
    for name in ("transformers", "cute_gdn"):
        if name == "cute_gdn":
            use_cute_gdn(model, state_dtype=getattr(torch, args.state_dtype))
        generate(model, ids, 2)  # warm-up: Triton autotuning, or cute_gdn's kernels loaded (compiled if new)
        runs[name] = generate(model, ids, args.new_tokens)
        seconds = runs[name][2]
        backend = f" ({transformers_backend()})" if name == "transformers" else ""
        print(f"{name + backend:>28}: {seconds * 1e3:8.1f} ms, {B * args.new_tokens / seconds:8.1f} new tokens/s")

    (seq_a, logits_a, _), (seq_b, logits_b, _) = runs["transformers"], runs["cute_gdn"]
    new_a, new_b = seq_a[:, T:], seq_b[:, T:]
    same = (new_a == new_b).all(0)
    # Logits are comparable while both runs have fed the same tokens: up to and including the first step whose
    # greedy token differs in any row.
    agree = int(same.long().cumprod(0).sum())
    steps = min(agree + 1, args.new_tokens)
    diff = float((logits_a[:steps] - logits_b[:steps]).abs().max())
    print(f"greedy tokens identical for {agree} of {args.new_tokens} steps; max |logit difference| over the first "
          f"{steps} steps: {diff:.4g} (logits up to {float(logits_a[:steps].abs().max()):.3g})")


if __name__ == "__main__":
    main()
