"""Where prefill's time goes: the whole call (as ops.prefill runs it, and with the two kernels
one after the other on one stream), the aux kernel and the chain kernel timed on their own (cold L2,
median of 10), and, from a profile build, the wall time (%globaltimer) of each phase of the chain's
chunk loop (mean per chunk) and of the aux kernel (mean per CTA).

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
from cute_gdn.kernels.prefill import LAUNCH_AUX as AUX, LAUNCH_BOTH as BOTH, LAUNCH_CHAIN as CHAIN  # noqa: E402
from cute_gdn.kernels.prefill import CHAIN_FOLDED as FOLDED, CHAIN_NARROW as NARROW, CHAIN_WIDE as WIDE  # noqa: E402
from cute_gdn.kernels.prefill import CHUNK, CP_MAP, CP_OFF, CP_PIECES, LAUNCH_SCAN  # noqa: E402

KINDS = {NARROW: "narrow", WIDE: "wide", FOLDED: "folded"}

PHASES = ("wait for loads", "state chain", "output store")  # the producer warp issues the loads
AUX_PHASES = ("issue loads, gates", "loads landed", "products, norms, scan", "epilogues", "inverse", "T/P stores")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="8192x1,32768x16")
    ap.add_argument("--heads", default="16/32")
    args = ap.parse_args()
    heads = [tuple(int(x) for x in hh.split("/")) for hh in args.heads.split(",")]
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    default_cache().compile(sorted({prefill_key(H, HV, n, profile=p) for H, HV in heads for _, n in shapes
                                    for p in (False, True)}, key=lambda k: k.name), jobs=16)
    for H, HV in heads:
        for tokens, seqs in shapes:
            x = make_inputs(tokens, seqs, H, HV)
            full = cute_call(x, H, HV)
            full()
            # A folded chain's workspace (T, P and W~) serves every chain kind.
            ws = ops.prefill_workspace(tokens, seqs, HV, x["q"].dtype, x["q"].device, chain=FOLDED)
            cp_none = ops.prefill_cp_workspace(1, HV, D, D, x["q"].device)  # read only when cp != CP_OFF
            call = lambda launch, chain, prof=None: (  # noqa: E731
                x["q"], x["k"], x["v"], x["a"], x["b"], x["A_log"], x["dt_bias"], x["cu"], x["pool"], x["slots"],
                x["has_init"].view(torch.int8), x["o"], *ws, D ** -0.5, chain, launch, 0, prof,
                cp_none, CP_OFF, CHUNK)
            fn = default_cache().get(prefill_key(H, HV, seqs))
            fn_prof = default_cache().get(prefill_key(H, HV, seqs, profile=True))
            plan = ops.plan_prefill(seqs, tokens, HV, D, D, ops.sm_count(x["q"].device))
            whole = ops.plan_prefill(seqs, tokens, HV, D, D, ops.sm_count(x["q"].device), context_parallel=False)
            used, overlap = whole.chain, whole.overlap
            t_full = time_cold(full)
            t_serial = time_cold(lambda: fn(*call(BOTH, used)))
            t_aux = time_cold(lambda: fn(*call(AUX, used)))
            t_aux_folded = time_cold(lambda: fn(*call(AUX, FOLDED)))
            line = (f"H={H} HV={HV} {tokens}x{seqs}: ops.prefill {t_full:.1f} us (overlap={overlap}, chain "
                    f"{KINDS[used]}); one stream {t_serial:.1f} us = aux {t_aux:.1f} (with W~ {t_aux_folded:.1f}) "
                    f"+ chain")
            for kind in (NARROW, WIDE, FOLDED):
                prof = torch.zeros(HV * seqs * 2, 8, dtype=torch.int64, device="cuda")
                t_chain = time_cold(lambda: fn(*call(CHAIN, kind)))
                fn_prof(*call(CHAIN, kind, prof))
                torch.cuda.synchronize()
                chunks = prof[:, 7].sum().item()
                per_chunk = prof[:, :len(PHASES)].sum(0).double() / max(chunks, 1) / 1e3
                line += (f"\n    chain {KINDS[kind]} {t_chain:.1f} us; per chunk (us): "
                         + ", ".join(f"{name} {t:.2f}" for name, t in zip(PHASES, per_chunk.tolist()))
                         + f"; total {per_chunk.sum().item():.2f}")
            print(line, flush=True)
            pieces = plan.pieces
            if pieces:
                # ops.prefill runs this call context-parallel: time its passes one by one.
                step = plan.cp_step
                cp_ws = ops.prefill_cp_workspace(pieces, HV, D, D, x["q"].device)
                cp_call = lambda launch, cp: fn(*call(launch, NARROW)[:-3], cp_ws, cp, step)  # noqa: E731
                starts, maps = cp_ws[:, :, :D], cp_ws[:, :, D:]

                def scan():
                    for p in range(1, pieces - 1):
                        starts[p + 1].baddbmm_(starts[p], maps[p])
                cp_call(CHAIN, CP_MAP)
                times = [time_cold(lambda: cp_call(AUX, CP_OFF)),
                         time_cold(lambda: cp_call(CHAIN, CP_MAP)), time_cold(lambda: cp_call(LAUNCH_SCAN, CP_OFF)),
                         time_cold(lambda: cp_call(CHAIN, CP_PIECES))]
                t_torch = time_cold(scan)  # the scan as torch fp32 baddbmm_ (what ops ran before the scan kernel)
                print(f"    context parallel, {pieces} pieces of {step} tokens: aux {times[0]:.1f} us, maps "
                      f"{times[1]:.1f}, scan {times[2]:.1f} (torch baddbmm_ {t_torch:.1f}), pieces {times[3]:.1f}; "
                      f"sum {sum(times):.1f} us", flush=True)
            prof = torch.zeros(ws[0].shape[0] * HV, 8, dtype=torch.int64, device="cuda")
            fn_prof(*call(AUX, used, prof))
            torch.cuda.synchronize()
            aux_t = prof[prof[:, :6].sum(1) > 0, :6].double().mean(0) / 1e3
            print("    aux per CTA (us): " + ", ".join(f"{name} {t:.2f}" for name, t in zip(AUX_PHASES, aux_t.tolist()))
                  + f"; total {aux_t.sum().item():.2f}", flush=True)


if __name__ == "__main__":
    main()
