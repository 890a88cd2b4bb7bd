"""Where a prefill chunk's time goes: a profile build of the kernel records, per CTA, the wall time
(%globaltimer) of each phase of the chunk loop; this prints the mean per chunk.

    python bench/profile_prefill.py [--shapes 8192x1,32768x16] [--heads 16/32]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_prefill import D, make_inputs  # noqa: E402
from cute_gdn.cache import KernelKey, default_cache  # noqa: E402

PHASES = ("wait for loads", "prep (norm, scan)", "aux (KK^T, QK^T)", "inverse", "state chain", "output store")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="8192x1,32768x16")
    ap.add_argument("--heads", default="16/32")
    args = ap.parse_args()
    for hh in args.heads.split(","):
        H, HV = (int(x) for x in hh.split("/"))
        for shape in args.shapes.split(","):
            tokens, seqs = (int(x) for x in shape.split("x"))
            key = KernelKey.make("prefill", io_dtype="bfloat16", state_dtype="float32", num_heads=H, num_v_heads=HV,
                                 head_k_dim=D, head_v_dim=D, pool_size=seqs, gate_mode="raw", dt_bias_dtype="float32",
                                 use_qk_l2norm=True, profile=True)
            fn = default_cache().get(key)
            x = make_inputs(tokens, seqs, H, HV)
            prof = torch.zeros(HV * seqs, 8, dtype=torch.int64, device="cuda")
            for _ in range(2):
                prof.zero_()
                fn(x["q"], x["k"], x["v"], x["a"], x["b"], x["A_log"], x["dt_bias"], x["cu"], x["pool"], x["slots"],
                   x["has_init"], x["o"], D ** -0.5, prof)
            torch.cuda.synchronize()
            chunks = prof[:, 6].sum().item()
            per_chunk = prof[:, :6].sum(0).double() / max(chunks, 1) / 1e3
            print(f"H={H} HV={HV} {tokens}x{seqs}: {chunks} chunk-CTAs, us per chunk: "
                  + ", ".join(f"{name} {t:.2f}" for name, t in zip(PHASES, per_chunk.tolist()))
                  + f"; total {per_chunk.sum().item():.2f}")


if __name__ == "__main__":
    main()
