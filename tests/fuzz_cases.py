"""Seeded random configurations for tests/test_fuzz_gpu.py (plain Python: tests/test_fuzz_cases.py checks
them on the CPU).

A run draws a few kernel *families* per op (dtypes, heads, head dims, gates, L2 norm, T, cache steps, ring
length, fold: what a compiled kernel is keyed by) and CASES_PER_OP calls per op over them (batch, sequence
lengths, padding, slots, strided views, gate strength, accepts), so a run compiles tens of kernels, not
hundreds. The properties the net must cover are dealt round-robin, not left to chance: every GVA ratio in
GVA_RATIOS, both state and io dtypes, every length in SPECIAL_LENGTHS and a few-thousand-token sequence,
padding and strided views, whatever the seed.

The seed: CUTE_GDN_FUZZ_SEED if set (conftest sets it, fixed under CI, fresh otherwise, and prints it in the
run's header), else FIXED_SEED.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Optional

FIXED_SEED = 20261202
POOL = 48
CASES_PER_OP = 50
OPS = ("prefill", "decode", "verify", "replay")
FAMILIES_PER_OP = {"prefill": 6, "decode": 8, "verify": 8, "replay": 8}
GVA_RATIOS = (1, 2, 4, 8)
HEADS = {1: ((4, 4), (2, 2), (3, 3)), 2: ((2, 4), (1, 2), (3, 6)), 4: ((1, 4), (2, 8)), 8: ((1, 8), (2, 16))}
# Head dims the recurrent ops accept (multiples of 16 up to 256); prefill takes 128 only.
HEAD_DIMS = ((128, 128), (64, 32), (96, 48), (256, 256), (16, 16), (32, 64), (128, 64), (48, 160))
SPECIAL_LENGTHS = (0, 1, 63, 64, 65)
LONG_LENGTHS = (1500, 4000)  # a few thousand tokens
DECAYS = ("moderate", "moderate", "tiny", "strong")


def seed() -> int:
    return int(os.environ.get("CUTE_GDN_FUZZ_SEED", FIXED_SEED))


@dataclass(frozen=True)
class Family:
    """What one compiled kernel set of an op is keyed by."""
    op: str
    io: str
    state: str
    H: int
    HV: int
    K: int
    V: int
    gates: str          # "raw" or "precomputed"
    bias: Optional[str]  # dt_bias dtype for raw gates
    l2: bool
    T: int = 1           # verify / replay tokens per call
    steps: int = 1       # verify: cache_steps; replay: max_tokens
    ring_len: int = 16   # replay
    fold: str = "exact"  # replay

    def problem(self) -> dict:
        return dict(io_dtype=self.io, state_dtype=self.state, num_heads=self.H, num_v_heads=self.HV,
                    head_k_dim=self.K, head_v_dim=self.V, pool_size=POOL)

    def gate_kw(self) -> dict:
        return dict(gate_mode=self.gates, dt_bias_dtype=self.bias)

    def keys(self) -> list:
        """Every kernel a call of this family can reach (both batch tiles where there are two)."""
        from cute_gdn import ops, replay

        p, gk, l2 = self.problem(), self.gate_kw(), self.l2
        if self.op == "prefill":
            return [ops.prefill_key(use_qk_l2norm=l2, **gk, **p)]
        if self.op == "decode":
            return list(ops.decode_keys(use_qk_l2norm=l2, **gk, **p))
        if self.op == "verify":
            return [*ops.verify_keys(num_tokens=self.T, cache_steps=self.steps, use_qk_l2norm=l2, **gk, **p),
                    ops.commit_key(state_dtype=self.state, num_v_heads=self.HV, head_k_dim=self.K,
                                   head_v_dim=self.V, pool_size=POOL, cache_steps=self.steps)]
        ring = dict(max_tokens=self.steps, ring_len=self.ring_len)
        return [*replay.replay_verify_keys(num_tokens=self.T, use_qk_l2norm=l2, fold_mode=self.fold, **ring, **gk,
                                           **p),
                *replay.replay_flush_keys(use_qk_l2norm=l2, **ring, **p),
                *(replay.replay_cursor_key(pool_size=POOL, mode=mode, **ring) for mode in ("commit", "flush"))]

    def supported(self) -> bool:
        from cute_gdn import ops

        try:
            for key in self.keys():
                ops.can_implement_key(key)
        except ValueError:
            return False
        return True


@dataclass(frozen=True)
class Case:
    """One call (or, for replay, one run of spec steps) of a family."""
    op: str
    index: int
    family: Family
    batch: int = 1                  # decode / verify / replay rows
    lengths: tuple = ()             # prefill sequence lengths
    has_init: Optional[tuple] = None  # prefill: per-sequence flags (None: every sequence has one)
    pad: tuple = ()                 # rows (sequences) whose slot is -1
    packed: bool = False            # q, k, v as strided views of one projection
    decay: str = "moderate"
    spec_steps: int = 1             # replay: verify + commit steps (enough to fold)
    torch_seed: int = 0

    @property
    def id(self) -> str:
        f = self.family
        shape = f"H{f.H}-HV{f.HV}-K{f.K}-V{f.V}"
        extra = {"prefill": f"N{len(self.lengths)}-max{max(self.lengths, default=0)}",
                 "decode": f"B{self.batch}", "verify": f"B{self.batch}-T{f.T}-S{f.steps}",
                 "replay": f"B{self.batch}-T{f.T}-L{f.ring_len}-{f.fold}"}[self.op]
        state = {"float32": "fp32", "bfloat16": "bf16"}[f.state]
        return f"{self.op}-{self.index:02d}-{shape}-{state}-{extra}"


def _family(op: str, i: int, rng: random.Random) -> Family:
    """Family i of op: GVA ratio and dtypes dealt round-robin, the rest drawn."""
    while True:
        ratio = GVA_RATIOS[i % len(GVA_RATIOS)]
        H, HV = rng.choice(HEADS[ratio])
        K, V = (128, 128) if op == "prefill" else rng.choice(HEAD_DIMS)
        state = ("float32", "bfloat16")[i % 2]
        io = ("bfloat16", "float16")[(i // 2) % 2]
        gates = rng.choice(("raw", "raw", "precomputed"))
        bias = rng.choice(("float32", "bfloat16")) if gates == "raw" else None
        fam = dict(op=op, io=io, state=state, H=H, HV=HV, K=K, V=V, gates=gates, bias=bias,
                   l2=rng.random() < 0.75)
        if op == "verify":
            T = rng.randint(1, 8)
            fam.update(T=T, steps=rng.randint(T, 8))
        elif op == "replay":
            T = rng.randint(1, 8)
            max_tokens = rng.randint(T, 8)
            fam.update(T=T, steps=max_tokens, ring_len=rng.choice((2 * max_tokens, 16, 16, 32, 64)) if
                       2 * max_tokens <= 16 else rng.choice((2 * max_tokens, 32, 64)),
                       fold=("exact", "compact")[(i // 4) % 2])
        family = Family(**fam)
        if family.supported():
            return family


def _lengths(i: int, rng: random.Random) -> tuple:
    n = rng.randint(1, 6)
    lengths = [rng.choice((rng.randint(2, 62), rng.randint(66, 400), rng.choice(SPECIAL_LENGTHS))) for _ in range(n)]
    lengths[rng.randrange(n)] = SPECIAL_LENGTHS[i % len(SPECIAL_LENGTHS)]
    if i % 8 == 3:
        lengths[rng.randrange(n)] = rng.choice(LONG_LENGTHS) + rng.randint(0, 64)
    if i % 10 == 7:  # a single long sequence on few heads: the context-parallel path
        lengths = [rng.choice(LONG_LENGTHS) + rng.randint(0, 64)]
    return tuple(lengths)


def draw(run_seed: Optional[int] = None) -> list:
    """The run's cases, CASES_PER_OP per op."""
    rng = random.Random(seed() if run_seed is None else run_seed)
    cases = []
    for op in OPS:
        families = [_family(op, i, rng) for i in range(FAMILIES_PER_OP[op])]
        for i in range(CASES_PER_OP):
            fam = families[i % len(families)]
            kw = dict(op=op, index=i, family=fam, packed=i % 3 == 1, decay=DECAYS[i % len(DECAYS)],
                      torch_seed=rng.randrange(2 ** 31))
            if op == "prefill":
                lengths = _lengths(i, rng)
                n = len(lengths)
                kw.update(lengths=lengths, has_init=None if i % 4 else tuple(rng.random() < 0.6 for _ in range(n)),
                          pad=(rng.randrange(n),) if n > 1 and i % 2 else ())
            else:
                B = rng.choice((1, 2, 3, rng.randint(4, 17), rng.randint(18, POOL)))
                if op == "decode" and i % 5 == 4:
                    B = POOL  # every slot named, the large-batch tile where B * HV reaches it
                kw.update(batch=B, pad=tuple(sorted(rng.sample(range(B), rng.randint(1, max(1, B // 4)))))
                          if B > 1 and i % 2 else ())
                if op == "replay":
                    kw.update(spec_steps=rng.randint(4, 9))
            cases.append(Case(**kw))
    return cases


def kernel_keys(cases: list) -> list:
    keys = {key for fam in {c.family for c in cases} for key in fam.keys()}
    return sorted(keys, key=lambda k: k.name)
