"""One speculative (MTP) decoding step, verify + commit, side by side: cute_gdn's replay protocol, its cached
protocol and SGLang's / FlashInfer's kernels, one run, cold L2, CUDA-graph replay.

    python bench/bench_spec.py                  # writes bench/results/spec_<gpu>.json (plot: bench/plot.py)
    python bench/bench_spec.py --quick          # B = 64, 256, H/HV = 16/32, T = 4
    python bench/bench_spec.py --impls cute_gdn_replay,sglang_replayssm --tokens 4 --batches 256

A *spec step* is one verify of T draft tokens per row, the commit of a seeded random accepted count n in
1..T per row, and whatever folds that accept pattern triggers. The implementations:

- cute_gdn_replay: `replay_verify` + `replay_commit` (ring of --ring-len records, a fold inside the verify
  of a row whose count exceeds L - 2T), exact fold (cursors fold="exact": bit-identical to verify + commit).
- cute_gdn_replay_compact: the same with fold="compact" (the fold adds the records' rank-one terms from u).
- cute_gdn_cached: `cute_gdn.verify` (cache [B, T, HV, V, K]) + `cute_gdn.commit` of step n.
- sglang_replayssm: SGLang 0.5.23's Triton ReplaySSM with its own exact fold, the protocol of ours:
  `gdn_replayssm_spec_decode(launch_mode="both")` (exact fold of the flush rows from raw k / raw v / g /
  beta, verify of the other rows, flush-output of the folded ones) + `commit_gdn_replayssm_spec` (cursor
  advance, fold flag for the next verify). d / normalized-k records in bf16, the activation dtype, which is
  what SGLang's pool allocates for bf16 io (`ring_dtype = conv_dtype`).
- sglang_replayssm_fp32ring: the same with fp32 d / normalized-k records (the kernel takes either dtype).
- sglang_replayssm_backend: what SGLang's GDN backend and spec_utils actually run for
  --enable-linear-replayssm-spec: `gdn_replayssm_spec_decode(launch_mode="verify")` + `commit_gdn_replayssm_spec`
  (fold_every_commit for a 16-bit checkpoint) + `commit_gdn_replayssm_circular` (the fold at commit, from the
  compact bf16 d / k records and their bf16 low parts, all L records loaded).
- sglang_cached: SGLang's Triton target_verify (TritonGDNKernel: fused_sigmoid_gating_delta_rule_update with
  intermediate states) + `fused_mamba_state_scatter_with_mask` (the scatter its backend adopts step n with).
- flashinfer_mtp: FlashInfer `gated_delta_rule_mtp` (fp32 pool) or `gated_delta_rule_decode_pretranspose`
  with T > 1 (bf16 pool), intermediate_states_buffer [B, T, HV, V, K], + `cute_gdn.commit`.

SGLang's buffers mirror its pool (sglang/srt/mem_cache/memory_pool.py): rings [slots + 1, HV|H, L, V|K] keyed
by request slot (replay_indices, a permutation of 0..B-1; the extra slot is SGLang's padding slot), cursors
write_pos / cache_base int32 and is_flush int8 per request slot, null_block_id = -1 (SGLang pads with -1),
packed varlen q/k/v [B*T, H, K] (views of the same tensors ours read) with query_start_loc.

Timing: per input set (pool, ring, cursors, tokens) the rings are first run for --warm-steps eager steps so
that the counts are spread; then ONE CUDA graph holds --steps consecutive steps of every set, step-major
(step s of set 0, 1, ..., n-1, then step s + 1), so that between two uses of a set the other sets' bytes pass
through the L2. Each (set, step) has its own seeded accept counts. Replaying the graph keeps advancing the
cursors (commits move them), so folds happen whenever they are due, as in serving. us per step = graph time
/ (steps * sets). Sets: enough for 3x the L2 (common.rotation_count of the replay step's bytes) but at most
--call-budget / steps (tiny batches would otherwise capture tens of thousands of launches); each row records
`l2_multiple`, the bytes between reuses over the L2.

Byte model, per row (sequence) and step, S = HV * V * K * state bytes, io = bf16:

- tokens (every implementation): read q, k (2 T H K io), v (T HV V io), a, b (2 T HV io); write o (T HV V io).
- cached (cute_gdn_cached, sglang_cached, flashinfer_mtp): (1 + T) S (verify: read the state, write T
  intermediate states) + 2 S (commit: read the accepted cache entry, write the pool).
- cute_gdn_replay: S (read the checkpoint) + fold_rate * S (a fold writes it back) + ring traffic: the
  verify of a row with c committed records reads them: k (H K io), d (HV V fp32) and (g, beta) (HV 8) if it
  does not fold, raw k, raw v (HV V io) and (g, beta) if it folds; it writes T candidate records (k, v, d,
  (g, beta)).
- sglang_replayssm(_fp32ring): as ours, except that a fold row reads its checkpoint twice (the exact-fold
  launch, then the flush-output launch): S (1 + 2 fold_rate); records d (HV V ring dtype), normalized k (H K
  ring dtype), g (HV 4), raw v (HV V io), raw k (H K io), beta (HV 4); a non-fold row reads d, k, g of its c
  records, a fold row raw k, raw v, g, beta; T records of all six fields written.
- sglang_replayssm_backend: verify S + c records (d, k, g) read + T records (d, k, g, d low, k low; bf16)
  written; commit fold (fold_rate): 2 S + L records (d, k, g, d low, k low) read.

fold_rate = folds / (rows * steps) and the mean c come from simulating the cursor rule on the host over the
exact accept counts of the run (`simulate_cursors`): warm steps, then the graph's step pattern cycled. Memory
per request per layer: cached T S (the intermediate cache), ours `ring_bytes`, SGLang's ring buffers per
request slot (cursors, 8-9 bytes per slot shared by all layers, not counted). Each row also has the copy
bandwidth's time for its bytes (model_us) and pct_model = 100 model_us / us.

Before timing each shape, a few steps of every implementation run from the same pool on the same tokens, with
accept counts that make rows fold, and their outputs are compared with cute_gdn_cached's (relative RMS <
2e-2): ours failing stops the run, a peer failing gets an error row instead of a time.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import random
import sys
import zlib
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # sglang_peer, SGLang's loader

import common  # noqa: E402

BATCHES = (1, 4, 16, 64, 256)
HEADS = ((16, 32), (8, 16))
TOKENS = (4, 2, 8)
STATES = ("float32", "bfloat16")
K = V = 128
IO_BYTES = 2  # bf16 q/k/v/a/b/o
RING_LEN = 16
STEPS = 16          # consecutive steps of one set in the graph (>= 16: several folds per row at L = 16)
WARM_STEPS = 12     # eager steps before capture: spreads the counts over the ring
CALL_BUDGET = 2048  # at most this many steps (all sets) in one graph
ROUNDS = 2
REPLAYS = 10
GUARD_TOL = 2e-2
SEED = 0
IMPLS = ("cute_gdn_replay", "cute_gdn_replay_compact", "cute_gdn_cached", "sglang_replayssm", "sglang_replayssm_fp32ring",
         "sglang_replayssm_backend", "sglang_cached", "flashinfer_mtp")
CACHED_IMPLS = ("cute_gdn_cached", "sglang_cached", "flashinfer_mtp")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ELEM = {"float32": 4, "bfloat16": 2}
SG_DECODE = "sglang.kernels.ops.attention.linear.gdn_replayssm_spec_decode"
SG_SCATTER = "sglang.kernels.ops.mamba.mamba_state_scatter_triton"


# ---------------------------------------------------------------------------------------------------
# Host side: accept pattern, cursor rule, byte model (pure python; tests/test_bench_spec.py)
# ---------------------------------------------------------------------------------------------------

def accept_pattern(steps: int, rows: int, max_tokens: int, rng: random.Random) -> list[list[int]]:
    """[steps][rows] accepted counts, uniform in 1..max_tokens."""
    return [[rng.randint(1, max_tokens) for _ in range(rows)] for _ in range(steps)]


def fold_mode(impl: str, state: str) -> Optional[str]:
    """How the cursors of `impl` fold: "verify" (in the verify of a row whose count before it exceeds
    L - 2T: ours and SGLang's launch_mode="both"), "commit" (at the commit, once the count after it exceeds
    L - 2T: SGLang's backend), "commit_every" (every commit: SGLang's backend with a 16-bit checkpoint,
    fold_every_commit), None (no ring)."""
    if impl in ("cute_gdn_replay", "cute_gdn_replay_compact", "sglang_replayssm", "sglang_replayssm_fp32ring"):
        return "verify"
    if impl == "sglang_replayssm_backend":
        return "commit" if state == "float32" else "commit_every"
    return None


def simulate_cursors(warm: list[list[int]], pattern: list[list[int]], ring_len: int, max_tokens: int,
                     mode: str, cycles: int = 20) -> dict:
    """Run the cursor rule of `mode` (see fold_mode) over `warm` once, then `pattern` `cycles` times (the
    graph replays it), counting over the pattern steps only. Returns fold_rate (folds per row and step),
    mean_keep (records the output path reads, per row and step: the count of a row that does not fold at
    its verify) and mean_fold (records a fold replays, per row and step)."""
    threshold = ring_len - 2 * max_tokens
    rows = len(pattern[0]) if pattern else 0
    count = [0] * rows
    folds = keep = folded = steps = 0

    def step(accepted, tally):
        nonlocal folds, keep, folded, steps
        for r, n in enumerate(accepted):
            c = count[r]
            if mode == "verify":
                fold = c > threshold
                if tally:
                    keep += 0 if fold else c
                    folded += c if fold else 0
                count[r] = n if fold else c + n
            elif mode in ("commit", "commit_every"):
                if tally:
                    keep += c
                c += n
                fold = c > threshold if mode == "commit" else c > 0
                if tally:
                    folded += c if fold else 0
                count[r] = 0 if fold else c
            else:
                raise ValueError(f"unknown fold mode {mode!r}")
            if tally:
                folds += fold
        if tally:
            steps += len(accepted)

    for accepted in warm:
        step(accepted, False)
    for _ in range(cycles):
        for accepted in pattern:
            step(accepted, True)
    steps = max(steps, 1)
    return dict(fold_rate=folds / steps, mean_keep=keep / steps, mean_fold=folded / steps)


def ours_record(H: int, HV: int, K: int, V: int, io: int = IO_BYTES) -> dict:
    """Bytes of one ring record per field (cute_gdn.replay.ReplayRing)."""
    return dict(k=H * K * io, v=HV * V * io, d=HV * V * 4, gb=HV * 16)


def sglang_record(H: int, HV: int, K: int, V: int, layout: str, ring_elem: int = 2, io: int = IO_BYTES) -> dict:
    """Bytes of one SGLang ReplaySSM record per field: layout "exact" (d, normalized k in the ring dtype, g,
    raw v, raw k, beta) or "compact" (the backend's bf16 d, k, g and the bf16 low parts of d and k)."""
    if layout == "exact":
        return dict(d=HV * V * ring_elem, k=H * K * ring_elem, g=HV * 4, rawv=HV * V * io, rawk=H * K * io,
                    beta=HV * 4)
    if layout == "compact":
        return dict(d=HV * V * 2, k=H * K * 2, g=HV * 4, dlo=HV * V * 2, klo=H * K * 2)
    raise ValueError(f"unknown layout {layout!r}")


def ring_layout(impl: str, H: int, HV: int) -> Optional[dict]:
    if impl in ("cute_gdn_replay", "cute_gdn_replay_compact"):
        return ours_record(H, HV, K, V)
    if impl == "sglang_replayssm":
        return sglang_record(H, HV, K, V, "exact", 2)
    if impl == "sglang_replayssm_fp32ring":
        return sglang_record(H, HV, K, V, "exact", 4)
    if impl == "sglang_replayssm_backend":
        return sglang_record(H, HV, K, V, "compact")
    return None


def token_bytes(T: int, H: int, HV: int, io: int = IO_BYTES) -> int:
    """q, k, v, a, b read and o written, per row and step."""
    return T * (2 * H * K + 2 * HV * V + 2 * HV) * io


def step_bytes(impl: str, T: int, H: int, HV: int, state: str, ring_len: int, sim: Optional[dict]) -> dict:
    """The byte model of one spec step per row (module docstring): state, ring and token traffic."""
    S = HV * V * K * ELEM[state]
    tokens = token_bytes(T, H, HV)
    rec = ring_layout(impl, H, HV)
    if rec is None:  # cached
        return dict(state=(3 + T) * S, ring=0, tokens=tokens, total=(3 + T) * S + tokens)
    f, keep, fold = sim["fold_rate"], sim["mean_keep"], sim["mean_fold"]
    if impl == "cute_gdn_replay":
        st = S * (1 + f)
        ring = keep * (rec["k"] + rec["d"] + rec["gb"]) + fold * (rec["k"] + rec["v"] + rec["gb"]) \
            + T * sum(rec.values())
    elif impl == "cute_gdn_replay_compact":  # a fold reads u (d) like the output path, not raw v
        st = S * (1 + f)
        ring = (keep + fold) * (rec["k"] + rec["d"] + rec["gb"]) + T * sum(rec.values())
    elif impl in ("sglang_replayssm", "sglang_replayssm_fp32ring"):
        st = S * (1 + 2 * f)
        ring = keep * (rec["d"] + rec["k"] + rec["g"]) + fold * (rec["rawk"] + rec["rawv"] + rec["g"] + rec["beta"]) \
            + T * sum(rec.values())
    else:  # sglang_replayssm_backend
        st = S + f * 2 * S
        ring = keep * (rec["d"] + rec["k"] + rec["g"]) + T * sum(rec.values()) + f * ring_len * sum(rec.values())
    return dict(state=st, ring=ring, tokens=tokens, total=st + ring + tokens)


def mem_per_request(impl: str, T: int, H: int, HV: int, state: str, ring_len: int) -> int:
    """Speculative scratch per request per layer: the intermediate cache (T states) or the ring."""
    rec = ring_layout(impl, H, HV)
    if rec is None:
        return T * HV * V * K * ELEM[state]
    return ring_len * sum(rec.values())


def shape_rows(T: int, H: int, HV: int, B: int, state: str, ring_len: int, impls, sims: dict, bw: float) -> dict:
    """impl -> the model fields of its row (bytes for the whole batch, model_us at copy bandwidth bw)."""
    out = {}
    for impl in impls:
        sim = sims.get(fold_mode(impl, state))
        per_row = step_bytes(impl, T, H, HV, state, ring_len, sim)
        nbytes = B * per_row["total"]
        out[impl] = dict(bytes=nbytes, bytes_state=B * per_row["state"], bytes_ring=B * per_row["ring"],
                         bytes_tokens=B * per_row["tokens"], model_us=nbytes / bw * 1e6,
                         mem_per_request=mem_per_request(impl, T, H, HV, state, ring_len),
                         fold_rate=sim["fold_rate"] if sim else 0.0, mean_count=sim["mean_keep"] if sim else 0.0)
    return out


# ---------------------------------------------------------------------------------------------------
# Kernel keys
# ---------------------------------------------------------------------------------------------------

def compile_keys(batches, tokens, heads, states, ring_len: int, impls) -> list:
    """Every cute_gdn kernel the run needs, for one parallel compile before timing."""
    from cute_gdn import replay
    from cute_gdn.ops import commit_key, verify_keys

    keys = []
    for T in tokens:
        for H, HV in heads:
            for B in batches:
                for st in states:
                    problem = dict(io_dtype="bfloat16", state_dtype=st, num_heads=H, num_v_heads=HV, head_k_dim=K,
                                   head_v_dim=V, pool_size=B, num_tokens=T, gate_mode="raw",
                                   dt_bias_dtype="float32", use_qk_l2norm=True)
                    for impl, fold in (("cute_gdn_replay", "exact"), ("cute_gdn_replay_compact", "compact")):
                        if impl in impls:
                            keys += replay.replay_verify_keys(max_tokens=T, ring_len=ring_len, fold_mode=fold,
                                                              **problem)
                    if "cute_gdn_replay" in impls or "cute_gdn_replay_compact" in impls:
                        keys.append(replay.replay_cursor_key(pool_size=B, ring_len=ring_len, max_tokens=T,
                                                             mode="commit"))
                    # The guard compares every implementation with cute_gdn_cached: always compiled.
                    keys += verify_keys(cache_steps=T, **problem)
                    keys.append(commit_key(state_dtype=st, num_v_heads=HV, head_k_dim=K, head_v_dim=V,
                                           pool_size=B, cache_steps=T))
    return list(dict.fromkeys(keys))


# ---------------------------------------------------------------------------------------------------
# Device side
# ---------------------------------------------------------------------------------------------------

def make_sets(B, T, H, HV, state, n, gen: torch.Generator) -> list[dict]:
    """n input sets: tokens, gates, a base pool (each implementation clones it), slots, the shared cache."""
    dt = DTYPES[state]

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, device="cuda") * scale

    sets = []
    for _ in range(n):
        sets.append(dict(
            q=randn(B, T, H, K).to(torch.bfloat16), k=randn(B, T, H, K).to(torch.bfloat16),
            v=randn(B, T, HV, V).to(torch.bfloat16),
            a=randn(B, T, HV).to(torch.bfloat16), b=randn(B, T, HV).to(torch.bfloat16),
            A_log=torch.rand(HV, generator=gen, device="cuda") - 0.5, dt_bias=randn(HV),
            state0=randn(B, HV, V, K, scale=0.5).to(dt),
            state_indices=torch.randperm(B, generator=gen, device="cuda").to(torch.int32),
            replay_indices=torch.randperm(B, generator=gen, device="cuda").to(torch.int32),
            rows=torch.arange(B, dtype=torch.int32, device="cuda"),
            qsl=torch.arange(0, B * T + 1, T, dtype=torch.int32, device="cuda"),
            cache=torch.empty(B, T, HV, V, K, device="cuda", dtype=dt),  # shared: each cached impl rewrites it
        ))
    return sets


def accept_tensors(pattern: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(n, n - 1) int32 device tensors per step: the counts, and SGLang's scatter step index."""
    out = []
    for accepted in pattern:
        n = torch.tensor(accepted, dtype=torch.int32, device="cuda")
        out.append((n, n - 1))
    return out


def _sglang(name: str):
    """A module of SGLang's wheel, loaded through tests/sglang_peer.py (no `import sglang`). The scatter module
    needs two packages whose __init__ pulls SGLang's kernel registry and one helper that sglang_peer's
    stand-ins lack; they are added here the way sglang_peer adds its own."""
    import sglang_peer

    root = sglang_peer.install()
    if getattr(sys.modules.get("sglang"), "__cute_gdn_stub__", False):
        for pkg in ("sglang.kernels.ops.mamba", "sglang.kernels.ops.memory"):
            if pkg not in sys.modules:
                sglang_peer._register(pkg, sglang_peer._package(pkg, root.joinpath(*pkg.split(".")[1:])))
        utils_common = sys.modules["sglang.srt.utils.common"]
        if not hasattr(utils_common, "get_device_core_count"):
            utils_common.get_device_core_count = \
                lambda device_id=0: torch.cuda.get_device_properties(device_id).multi_processor_count
    return importlib.import_module(name)


class Impl:
    """One implementation over the shape's input sets: step(i, n, n_m1) runs one spec step of set i; out(i)
    is that set's last output as [B, T, HV, V]."""

    def __init__(self, sets):
        self.sets = sets
        self.per = [dict(state=s["state0"].clone(), out=torch.empty_like(s["v"])) for s in sets]

    def out(self, i):
        s = self.sets[i]
        return self.per[i]["out"].view(s["v"].shape)


class CuteReplay(Impl):
    def __init__(self, sets, ring_len, fold="exact"):
        super().__init__(sets)
        from cute_gdn import replay

        self.rp = replay
        for s, p in zip(sets, self.per):
            B, T, H, _ = s["q"].shape
            HV = s["v"].shape[2]
            p["ring"] = replay.make_replay_ring(B, H, HV, K, V, ring_len=ring_len)
            p["cursors"] = replay.make_replay_cursors(B, max_tokens=T, ring_len=ring_len, fold=fold)

    def step(self, i, n, n_m1):
        s, p = self.sets[i], self.per[i]
        self.rp.replay_verify(s["q"], s["k"], s["v"], s["a"], s["b"], A_log=s["A_log"], dt_bias=s["dt_bias"],
                              state=p["state"], state_indices=s["state_indices"], ring=p["ring"],
                              cursors=p["cursors"], out=p["out"])
        self.rp.replay_commit(p["cursors"], s["state_indices"], n)


class CuteCached(Impl):
    def __init__(self, sets):
        super().__init__(sets)
        import cute_gdn

        self.gdn = cute_gdn

    def step(self, i, n, n_m1):
        s, p = self.sets[i], self.per[i]
        self.gdn.verify(s["q"], s["k"], s["v"], s["a"], s["b"], A_log=s["A_log"], dt_bias=s["dt_bias"],
                        state=p["state"], state_indices=s["state_indices"], cache=s["cache"], out=p["out"])
        self.gdn.commit(p["state"], s["state_indices"], s["cache"], None, n)


class FlashInferMTP(CuteCached):
    def __init__(self, sets):
        super().__init__(sets)
        from flashinfer.gdn_decode import gated_delta_rule_decode_pretranspose, gated_delta_rule_mtp

        self.mtp, self.pretranspose = gated_delta_rule_mtp, gated_delta_rule_decode_pretranspose

    def step(self, i, n, n_m1):
        s, p = self.sets[i], self.per[i]
        if p["state"].dtype == torch.float32:
            self.mtp(s["q"], s["k"], s["v"], p["state"], s["state_indices"], s["A_log"], s["a"], s["dt_bias"],
                     s["b"], scale=K ** -0.5, output=p["out"], intermediate_states_buffer=s["cache"],
                     disable_state_update=True, use_qk_l2norm=True)
        else:
            self.pretranspose(s["q"], s["k"], s["v"], None, s["A_log"], s["a"], s["dt_bias"], s["b"],
                              scale=K ** -0.5, output=p["out"], use_qk_l2norm=True, initial_state=p["state"],
                              initial_state_indices=s["state_indices"], intermediate_states_buffer=s["cache"],
                              disable_state_update=True)
        self.gdn.commit(p["state"], s["state_indices"], s["cache"], None, n)


class SGLangCached(Impl):
    def __init__(self, sets):
        super().__init__(sets)
        import sglang_peer

        self.triton = sglang_peer.load_triton_kernel()()
        self.scatter = _sglang(SG_SCATTER).fused_mamba_state_scatter_with_mask

    def step(self, i, n, n_m1):
        s, p = self.sets[i], self.per[i]
        B, T, H, _ = s["q"].shape
        HV = s["v"].shape[2]
        p["out"] = self.triton.target_verify(
            s["A_log"], s["dt_bias"], s["q"].view(1, B * T, H, K), s["k"].view(1, B * T, H, K),
            s["v"].view(1, B * T, HV, V), s["a"].view(B * T, HV), s["b"].view(B * T, HV), ssm_states=p["state"],
            cache_indices=s["state_indices"], query_start_loc=s["qsl"], intermediate_states_buffer=s["cache"],
            intermediate_state_indices=s["rows"], cache_steps=T, retrieve_parent_token=None)
        # SGLang's commit: pool[state_indices[r]] = buffer[rows[r], n - 1] ([layers, ...] views, one layer)
        self.scatter(p["state"].unsqueeze(0), s["cache"].unsqueeze(0), s["state_indices"], n_m1, s["rows"])


class SGLangReplay(Impl):
    """SGLang's ReplaySSM: layout "exact" (launch_mode="both", the exact fold inside the verify) with
    ring_dtype d / k records, or "compact" (the backend: verify-only launch, fold at commit)."""

    def __init__(self, sets, ring_len, layout, ring_dtype=torch.bfloat16):
        super().__init__(sets)
        self.mod = _sglang(SG_DECODE)
        self.layout, self.L = layout, ring_len
        for s, p in zip(sets, self.per):
            B, T, H, _ = s["q"].shape
            HV = s["v"].shape[2]
            slots = B + 1  # SGLang's request-slot rings: spec_state_size + 1 (the padding slot)
            L = ring_len

            def z(*shape, dtype):
                return torch.zeros(*shape, dtype=dtype, device="cuda")

            rd = ring_dtype if layout == "exact" else torch.bfloat16
            p.update(d=z(slots, HV, L, V, dtype=rd), kc=z(slots, H, L, K, dtype=rd),
                     g=z(slots, HV, L, dtype=torch.float32),
                     write_pos=z(slots, dtype=torch.int32), cache_base=z(slots, dtype=torch.int32),
                     is_flush=z(slots, dtype=torch.int8), out=torch.empty(B * T, HV, V, dtype=torch.bfloat16,
                                                                          device="cuda"))
            if layout == "exact":  # raw inputs for the exact fold
                p.update(rawv=z(slots, HV, L, V, dtype=torch.bfloat16), rawk=z(slots, H, L, K, dtype=torch.bfloat16),
                         beta=z(slots, HV, L, dtype=torch.float32))
            else:  # the low parts of compact d and normalized k (SGLang allocates them for a 16-bit ring)
                p.update(rawv=z(slots, HV, L, V, dtype=torch.bfloat16), rawk=z(slots, H, L, K, dtype=torch.bfloat16),
                         beta=None)

    def step(self, i, n, n_m1):
        s, p = self.sets[i], self.per[i]
        B, T, H, _ = s["q"].shape
        HV = s["v"].shape[2]
        exact = self.layout == "exact"
        cursors = dict(write_pos=p["write_pos"], cache_base=p["cache_base"], is_flush=p["is_flush"])
        self.mod.gdn_replayssm_spec_decode(
            q=s["q"].view(B * T, H, K), k=s["k"].view(B * T, H, K), v=s["v"].view(B * T, HV, V),
            a=s["a"].view(B * T, HV), b=s["b"].view(B * T, HV), A_log=s["A_log"], dt_bias=s["dt_bias"],
            checkpoint_state=p["state"], d_cache=p["d"], k_cache=p["kc"], g_cache=p["g"], rawv_cache=p["rawv"],
            rawk_cache=p["rawk"], beta_cache=p["beta"], out=p["out"], query_start_loc=s["qsl"],
            ssm_state_indices=s["state_indices"], replay_indices=s["replay_indices"], max_cache_len=self.L,
            max_spec_len=T, scale=K ** -0.5, use_qk_l2norm_in_kernel=True, null_block_id=-1,
            launch_mode="both" if exact else "verify", **cursors)
        self.mod.commit_gdn_replayssm_spec(
            num_accepted=n, replay_indices=s["replay_indices"], max_cache_len=self.L, max_spec_len=T,
            fold_every_commit=(not exact) and p["state"].dtype != torch.float32, null_block_id=-1, **cursors)
        if not exact:
            self.mod.commit_gdn_replayssm_circular(
                checkpoint_state=p["state"].unsqueeze(0), d_cache=p["d"].unsqueeze(0), k_cache=p["kc"].unsqueeze(0),
                g_cache=p["g"].unsqueeze(0), d_residual_cache=p["rawv"].unsqueeze(0),
                k_residual_cache=p["rawk"].unsqueeze(0), state_batch_indices=s["state_indices"],
                replay_indices=s["replay_indices"], accept_lens=n, mamba_track_indices=None,
                mamba_steps_to_track=None, null_block_id=-1, **cursors)


def build(impl: str, sets, ring_len: int) -> Impl:
    if impl == "cute_gdn_replay":
        return CuteReplay(sets, ring_len)
    if impl == "cute_gdn_replay_compact":
        return CuteReplay(sets, ring_len, "compact")
    if impl == "cute_gdn_cached":
        return CuteCached(sets)
    if impl == "flashinfer_mtp":
        return FlashInferMTP(sets)
    if impl == "sglang_cached":
        return SGLangCached(sets)
    if impl == "sglang_replayssm":
        return SGLangReplay(sets, ring_len, "exact", torch.bfloat16)
    if impl == "sglang_replayssm_fp32ring":
        return SGLangReplay(sets, ring_len, "exact", torch.float32)
    if impl == "sglang_replayssm_backend":
        return SGLangReplay(sets, ring_len, "compact")
    raise ValueError(f"unknown impl {impl!r}; known: {', '.join(IMPLS)}")


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.float(), ref.float()
    return float(((x - ref).pow(2).mean() / ref.pow(2).mean().clamp_min(1e-30)).sqrt())


def guard_pattern(B: int, T: int, ring_len: int, rng: random.Random) -> list[list[int]]:
    """Accept counts for the guard: even rows accept all T every step, so they fold within the run; odd rows
    accept a random count."""
    steps = max(0, ring_len - 2 * T) // T + 3
    return [[T if r % 2 == 0 else rng.randint(1, T) for r in range(B)] for _ in range(steps)]


def guard(impls, B, T, H, HV, state, ring_len, seed) -> dict:
    """impl -> worst relative RMS of its outputs against cute_gdn_cached over a few steps (fresh tokens each
    step, the same pool to start), or the error string where it cannot run."""
    gen = torch.Generator(device="cuda")
    gen.manual_seed(seed + 1)
    sets = make_sets(B, T, H, HV, state, 1, gen)
    ref = CuteCached(sets)
    others = {}
    for impl in impls:
        if impl == "cute_gdn_cached":
            continue
        try:
            others[impl] = build(impl, sets, ring_len)
        except Exception as e:  # a missing peer is reported by the timing rows too
            others[impl] = f"{type(e).__name__}: {e}"
    worst = {impl: 0.0 for impl, x in others.items() if not isinstance(x, str)}
    for accepted in guard_pattern(B, T, ring_len, random.Random(seed + 2)):
        s = sets[0]
        for name in ("q", "k", "v"):
            s[name].copy_(torch.randn(s[name].shape, generator=gen, device="cuda"))
        n = torch.tensor(accepted, dtype=torch.int32, device="cuda")
        ref.step(0, n, n - 1)
        for impl, x in others.items():
            if isinstance(x, str) or impl not in worst:
                continue
            try:
                x.step(0, n, n - 1)
                worst[impl] = max(worst[impl], rel_rms(x.out(0), ref.out(0)))
            except Exception as e:
                others[impl] = f"{type(e).__name__}: {e}"
                del worst[impl]
    torch.cuda.synchronize()
    result = {impl: x for impl, x in others.items() if isinstance(x, str)}
    result.update(worst)
    return result


def timed(impl: Impl, n_sets: int, steps: list) -> dict:
    """us per step of `impl`: one graph of every (step, set), step-major; steps[s] = (n, n - 1) per set."""
    calls = [lambda i=i, a=acc: impl.step(i, *a[i]) for acc in steps for i in range(n_sets)]
    try:
        return dict(us=common.time_graph(calls, replays=REPLAYS))
    except Exception as e:  # a peer that cannot run a shape is reported, not fatal
        return dict(error=f"{type(e).__name__}: {e}")


def record(rows: list, row: dict) -> None:
    if "us" in row:
        print(f"spec T={row['T']} H={row['H']:2d} HV={row['HV']:2d} B={row['B']:4d} {row['state']:8s} "
              f"{row['impl']:26s} {row['us']:9.2f} us/step  model {row['model_us']:8.2f} us "
              f"({row['pct_model']:5.1f}%)  fold {row['fold_rate']:.2f}", flush=True)
    else:
        print(f"spec T={row['T']} H={row['H']} HV={row['HV']} B={row['B']} {row['state']} {row['impl']}: "
              f"{row['error']}", flush=True)
    rows.append(row)


def run_shape(rows, args, impls, T, H, HV, B, state, bw, seed) -> None:
    L, S = args.ring_len, args.steps
    base = dict(op="spec", T=T, H=H, HV=HV, B=B, state=state, ring_len=L, steps=S)
    rng = random.Random(seed)
    warm = accept_pattern(args.warm_steps, B, T, rng)
    # The sets, and with them the graph's pattern, are sized by the replay step's bytes (the smallest).
    pattern0 = accept_pattern(S, B, T, rng)
    sim0 = simulate_cursors(warm, pattern0, L, T, "verify")
    per_set = B * step_bytes("cute_gdn_replay", T, H, HV, state, L, sim0)["total"]
    n_sets = min(common.rotation_count(per_set), max(2, args.call_budget // S))
    # [step][set] accept counts; the host simulation runs over all rows of all sets (pattern rows side by side).
    patterns = [pattern0] + [accept_pattern(S, B, T, rng) for _ in range(n_sets - 1)]
    wide = [[n for p in patterns for n in p[s]] for s in range(S)]
    wide_warm = [row * n_sets for row in warm]
    modes = {fold_mode(i, state) for i in impls} - {None}
    sims = {m: simulate_cursors(wide_warm, wide, L, T, m) for m in modes}
    model = shape_rows(T, H, HV, B, state, L, impls, sims, bw)
    extra = dict(sets=n_sets, l2_multiple=n_sets * per_set / torch.cuda.get_device_properties(0).L2_cache_size)

    checks = guard(impls, B, T, H, HV, state, L, seed) if not args.no_guard else {}
    for ours in ("cute_gdn_replay", "cute_gdn_replay_compact"):
        bad = checks.get(ours)
        if isinstance(bad, str) or (bad is not None and bad > GUARD_TOL):
            raise AssertionError(f"{ours} disagrees with cute_gdn_cached at T={T} H={H} HV={HV} B={B} "
                                 f"{state}: {bad}")

    gen = torch.Generator(device="cuda")
    gen.manual_seed(seed)
    sets = make_sets(B, T, H, HV, state, n_sets, gen)
    steps = [accept_tensors([p[s] for p in patterns]) for s in range(S)]  # [step][set] -> (n, n - 1)
    built = {}
    for impl in impls:
        check = checks.get(impl)
        if isinstance(check, str) or (check is not None and check > GUARD_TOL):
            record(rows, dict(base, impl=impl, **model[impl], **extra,
                              error=f"guard: {check if isinstance(check, str) else f'rel RMS {check:.3g}'}"))
            continue
        try:
            built[impl] = build(impl, sets, L)
        except Exception as e:  # an optional peer that does not import is reported, not fatal
            record(rows, dict(base, impl=impl, **model[impl], **extra, error=f"{type(e).__name__}: {e}"))
            continue
        if fold_mode(impl, state):  # spread the counts before capture
            warm_t = accept_tensors(warm)
            for n, m in warm_t:
                for i in range(n_sets):
                    built[impl].step(i, n, m)
    torch.cuda.synchronize()
    results = {impl: [] for impl in built}
    for _ in range(args.rounds):
        for impl, x in built.items():
            results[impl].append(timed(x, n_sets, steps))
    for impl, runs in results.items():
        ok = [r["us"] for r in runs if "us" in r]
        result = dict(us=min(ok), rounds_us=ok) if ok else runs[-1]
        row = dict(base, impl=impl, **model[impl], **extra, **result)
        if impl in checks and not isinstance(checks[impl], str):
            row["guard_rel_rms"] = checks[impl]
        if "us" in row:
            row["pct_model"] = 100 * row["model_us"] / row["us"]
        record(rows, row)
    del sets, built, steps
    torch.cuda.empty_cache()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="T values (max_tokens = cache_steps = T)")
    ap.add_argument("--heads", default="16/32,8/16", help="H/HV pairs")
    ap.add_argument("--states", default=",".join(STATES), help="checkpoint / pool dtypes")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--ring-len", type=int, default=RING_LEN, help="replay ring records L (SGLang: a power of 2)")
    ap.add_argument("--steps", type=int, default=STEPS, help="consecutive steps per set in the graph")
    ap.add_argument("--warm-steps", type=int, default=WARM_STEPS)
    ap.add_argument("--call-budget", type=int, default=CALL_BUDGET, help="most steps (all sets) in one graph")
    ap.add_argument("--rounds", type=int, default=ROUNDS, help="timing rounds per shape (best is kept)")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--no-guard", action="store_true", help="skip the correctness check before timing")
    ap.add_argument("--quick", action="store_true", help="B = 64, 256, H/HV = 16/32, T = 4")
    args = ap.parse_args(argv)
    if args.quick:
        args.batches, args.heads, args.tokens = "64,256", "16/32", "4"
    args.batch_list = [int(x) for x in args.batches.split(",")]
    args.token_list = [int(x) for x in args.tokens.split(",")]
    args.head_list = [tuple(int(x) for x in hh.split("/")) for hh in args.heads.split(",")]
    args.state_list = [s for s in args.states.split(",") if s]
    args.impl_list = [i for i in args.impls.split(",") if i]
    for name, values, known in (("--impls", args.impl_list, IMPLS), ("--states", args.state_list, STATES)):
        unknown = [x for x in values if x not in known]
        if unknown:
            ap.error(f"{name}: unknown {unknown}; known: {', '.join(known)}")
    if args.steps < 1 or args.rounds < 1 or args.warm_steps < 0:
        ap.error("--steps and --rounds must be >= 1, --warm-steps >= 0")
    for T in args.token_list:
        if not 2 * T <= args.ring_len:
            ap.error(f"--ring-len {args.ring_len} must be >= 2 T = {2 * T}")
    return args


def main(argv=None):
    args = parse_args(argv)
    bw = common.copy_bandwidth()
    print(f"{common.environment()['gpu']}: copy bandwidth {bw / 1e12:.2f} TB/s")
    from cute_gdn.cache import default_cache

    keys = compile_keys(args.batch_list, args.token_list, args.head_list, args.state_list, args.ring_len,
                        args.impl_list)
    print(f"compiling {len(keys)} cute_gdn kernels", flush=True)
    default_cache().compile(sorted(keys, key=lambda k: k.name), jobs=os.cpu_count() or 1)
    if "cute_gdn_replay" in args.impl_list:
        from cute_gdn.replay import ring_bytes

        for H, HV in args.head_list:  # the byte model's record sizes are the ring's
            assert mem_per_request("cute_gdn_replay", 4, H, HV, "float32", args.ring_len) == \
                ring_bytes(H, HV, K, V, args.ring_len), "ours_record disagrees with cute_gdn.replay.ring_bytes"
    impls = ["cute_gdn_cached"] + [i for i in args.impl_list if i != "cute_gdn_cached"] \
        if "cute_gdn_cached" in args.impl_list else args.impl_list
    rows = []
    for T in args.token_list:
        for H, HV in args.head_list:
            for B in args.batch_list:
                for state in args.state_list:
                    seed = args.seed * 1000003 + zlib.crc32(f"{T},{H},{HV},{B},{state}".encode()) % 100003
                    run_shape(rows, args, impls, T, H, HV, B, state, bw, seed)
    path = common.save("spec", dict(env=common.environment(), copy_bandwidth=bw, ring_len=args.ring_len,
                                    steps=args.steps, rows=rows))
    print("wrote", path)


if __name__ == "__main__":
    main()
