"""Where prefill's time goes: the aux kernel and the chain kernel timed on their own (cold L2,
median of 10), and, from a profile build of the chain kernel, the wall time (%globaltimer) of each
phase of its chunk loop per CTA, as the mean per chunk.

    python bench/profile_prefill.py [--shapes 8192x1,32768x16] [--heads 16/32]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_prefill import D, cute_call, make_inputs, prefill_key, time_cold  # noqa: E402
from cute_gdn import ops  # noqa: E402
from cute_gdn.cache import default_cache  # noqa: E402

PHASES = ("wait for loads", "state chain", "output store", "barrier", "issue loads")
AUX_PHASES = ("issue loads, gates", "loads landed", "products, norms, scan", "epilogues", "inverse", "T/P stores")


def part_key(H, HV, seqs, parts, profile=False):
    return prefill_key(H, HV, seqs, parts=parts, profile=profile)


def aux_phases(H, HV, seqs, args_, ws_rows):
    """Mean per-CTA phase times (us) of the aux kernel's profile build."""
    prof = torch.zeros(ws_rows * HV, 8, dtype=torch.int64, device="cuda")
    default_cache().get(part_key(H, HV, seqs, "aux", True))(*args_(prof))
    torch.cuda.synchronize()
    live = prof[prof[:, :6].sum(1) > 0, :6]
    return live.double().mean(0) / 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="8192x1,32768x16")
    ap.add_argument("--heads", default="16/32")
    args = ap.parse_args()
    heads = [tuple(int(x) for x in hh.split("/")) for hh in args.heads.split(",")]
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    default_cache().compile(sorted({part_key(H, HV, n, p, p == "chain") for H, HV in heads for _, n in shapes
                                    for p in ("aux", "chain")} | {part_key(H, HV, n, "aux", True) for H, HV in heads for _, n in shapes}, key=lambda k: k.name), jobs=16)
    for H, HV in heads:
        for tokens, seqs in shapes:
            x = make_inputs(tokens, seqs, H, HV)
            full = cute_call(x, H, HV)
            full()
            ws_tp, ws_f = ops.prefill_workspace(tokens, seqs, HV, x["q"].dtype, x["q"].device)
            args_ = lambda p, wide=0: (x["q"], x["k"], x["v"], x["a"], x["b"], x["A_log"], x["dt_bias"],  # noqa: E731
                                       x["cu"], x["pool"], x["slots"], x["has_init"].view(torch.int8), x["o"], ws_tp,
                                       ws_f, D ** -0.5, wide, p)
            aux = default_cache().get(part_key(H, HV, seqs, "aux"))
            chain = default_cache().get(part_key(H, HV, seqs, "chain", True))
            aux(*args_(None))
            t_full = time_cold(full)
            t_aux = time_cold(lambda: aux(*args_(None)))
            line = f"H={H} HV={HV} {tokens}x{seqs}: full {t_full:.1f} us = aux {t_aux:.1f} + chain"
            for wide in (0, 1):
                prof = torch.zeros(HV * seqs * 2, 8, dtype=torch.int64, device="cuda")
                t_chain = time_cold(lambda: chain(*args_(prof, wide)))
                prof.zero_()
                chain(*args_(prof, wide))
                torch.cuda.synchronize()
                chunks = prof[:, 7].sum().item()
                per_chunk = prof[:, :5].sum(0).double() / max(chunks, 1) / 1e3
                line += (f"\n    chain {'wide' if wide else 'narrow'} {t_chain:.1f} us; per chunk (us): "
                         + ", ".join(f"{name} {t:.2f}" for name, t in zip(PHASES, per_chunk.tolist()))
                         + f"; total {per_chunk.sum().item():.2f}")
            print(line, flush=True)
            aux_t = aux_phases(H, HV, seqs, args_, ws_tp.shape[0])
            print("    aux per CTA (us): " + ", ".join(f"{name} {t:.2f}" for name, t in zip(AUX_PHASES, aux_t.tolist()))
                  + f"; total {aux_t.sum().item():.2f}", flush=True)

if __name__ == "__main__":
    main()
