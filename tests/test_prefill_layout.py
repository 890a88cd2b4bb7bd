"""The prefill workspace indexing (pure Python, no GPU): chunk c of sequence n lives at row
cu_seqlens[n] // 64 + n + c; rows must be distinct and below ws_rows(T, N) for any lengths, and
the aux kernel's search (the last n with cu[n] // 64 + n <= row) must find the owner back."""

import random

import pytest

from cute_gdn.kernels.prefill import (CHAIN_FOLDED, CHAIN_NARROW, CHAIN_WIDE, CHUNK, CP_MIN_CHUNKS, PrefillPlan,
                                      chain_kind, check_plan, cp_pieces, cp_step, plan_prefill, use_overlap,
                                      use_wide_chain, ws_rows, ws_tiles)


def _rows(lengths):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    owner = {}
    for n, length in enumerate(lengths):
        for c in range((length + CHUNK - 1) // CHUNK):
            row = cu[n] // CHUNK + n + c
            assert row not in owner, (lengths, n, c)
            owner[row] = (n, c)
    return cu, owner


def _search(cu, row):
    """The aux kernel's search, in Python: every i < N tests itself and its successor, and the one i
    with cu[i] // 64 + i <= row whose successor fails (or is past the end) is the owner. Exactly one
    i may claim the row."""
    N = len(cu) - 1
    claims = [i for i in range(N)
              if cu[i] // CHUNK + i <= row and (i + 1 == N or cu[i + 1] // CHUNK + i + 1 > row)]
    assert len(claims) == 1, (cu, row, claims)
    return claims[0]


@pytest.mark.parametrize("seed", range(40))
def test_chunk_rows_are_distinct_in_range_and_found_back(seed):
    rng = random.Random(seed)
    N = rng.choice([1, 2, 3, 7, 33, 200])
    lengths = [rng.choice([0, 1, 2, 63, 64, 65, 127, 128, 129, rng.randrange(1, 3000)]) for _ in range(N)]
    cu, owner = _rows(lengths)
    rows = ws_rows(cu[-1], N)
    assert all(r < rows for r in owner)
    for row in range(rows):
        n = _search(cu, row)
        c = row - (cu[n] // CHUNK + n)
        if row in owner:
            assert (n, c) == owner[row]
        else:  # an unused row: the kernel's CTA finds no chunk there and exits
            assert not (0 <= c and cu[n] + c * CHUNK < cu[n + 1])


def test_ws_rows_is_tight_for_worst_case_lengths():
    # Each sequence adds at most one partial chunk: T // 64 + N + 1 rows always suffice.
    for lengths in ([1] * 50, [65] * 10, [63, 1, 63, 1], [64] * 4, [8192], [0, 0, 5]):
        _, owner = _rows(lengths)
        assert max(owner, default=-1) < ws_rows(sum(lengths), len(lengths))


def test_wide_chain_once_narrow_ctas_would_share_sms():
    assert not use_wide_chain(1, 32, 128, 132) and not use_wide_chain(2, 32, 128, 132)  # 64, 128 narrow CTAs
    assert use_wide_chain(3, 32, 128, 132) and use_wide_chain(8, 16, 128, 132)  # 192, 256
    assert not use_wide_chain(4, 16, 128, 132) and use_wide_chain(5, 16, 128, 132)


def test_overlap_only_while_the_chain_leaves_the_aux_kernel_half_the_sms():
    assert use_overlap(1, 32, 128, 132) and use_overlap(2, 16, 128, 132)  # 64 narrow chain CTAs
    assert not use_overlap(2, 32, 128, 132) and not use_overlap(3, 16, 128, 132)  # 128, 96: one stream
    assert not use_overlap(33, 2, 128, 132)  # 132: one chain CTA on every SM could starve the aux kernel
    assert not use_overlap(8, 32, 128, 132)  # wide CTAs, several waves
    for n in range(1, 40):
        for hv in (2, 4, 16, 32):
            assert not (use_overlap(n, hv, 128, 132) and use_wide_chain(n, hv, 128, 132))
            assert use_overlap(n, hv, 128, 132) == (n * hv * 2 <= 66)


def test_chain_kind_folds_exactly_the_overlapped_calls():
    assert chain_kind(1, 32, 128, 132) == CHAIN_FOLDED and chain_kind(2, 16, 128, 132) == CHAIN_FOLDED
    assert chain_kind(2, 32, 128, 132) == CHAIN_NARROW and chain_kind(33, 2, 128, 132) == CHAIN_NARROW
    assert chain_kind(8, 32, 128, 132) == CHAIN_WIDE
    for n in range(1, 70):
        for hv in (1, 2, 4, 16, 32, 64):
            assert (chain_kind(n, hv, 128, 132) == CHAIN_FOLDED) == use_overlap(n, hv, 128, 132)
    assert (ws_tiles(CHAIN_NARROW), ws_tiles(CHAIN_WIDE), ws_tiles(CHAIN_FOLDED)) == (2, 2, 4)


def test_context_parallel_pieces_fill_one_wave():
    # One sequence, few heads: the maps pass (V / 64 CTAs a head for piece 0, (V + K) / 64 for the
    # middle ones) in one wave, at least 3 pieces of at least CP_MIN_CHUNKS chunks.
    assert cp_pieces(1, 32768, 16, 128, 128, 132) == 3   # maps 32 + 64, pieces 96 CTAs
    assert cp_pieces(1, 32768, 8, 128, 128, 132) == 5    # 16 + 3 * 32, pieces 80
    assert cp_pieces(1, 32768, 32, 128, 128, 132) == 0   # 64 + 128 > 132: run whole
    assert cp_pieces(2, 32768, 16, 128, 128, 132) == 0   # several sequences run whole
    assert cp_pieces(1, 3 * 1024 - 1, 16, 128, 128, 132) == 0 and cp_pieces(1, 3 * 1024, 16, 128, 128, 132) == 3
    for hv in (1, 2, 4, 8, 16):
        for tokens in (1, 1000, 5000, 8192, 32768, 100000):
            p = cp_pieces(1, tokens, hv, 128, 128, 132)
            if p:
                assert p >= 3 and hv * 2 + (p - 2) * hv * 4 <= 132 and p * hv * 2 <= 132
                step = cp_step(tokens, p)
                assert step % CHUNK == 0 and (p - 1) * step < tokens <= p * step  # no empty piece
                assert step >= CP_MIN_CHUNKS * CHUNK


@pytest.mark.parametrize("HV", [1, 2, 4, 16, 32])
def test_plan_prefill_is_the_rules_and_its_pieces_cover_the_tokens(HV):
    for sms in (78, 132):
        for N, T in [(1, 1), (1, 3000), (1, 8192), (1, 19498), (1, 65536), (4, 5365), (64, 8192), (16, 32768)]:
            plan = plan_prefill(N, T, HV, 128, 128, sms)
            check_plan(plan, N, T)
            pieces = cp_pieces(N, T, HV, 128, 128, sms)
            if pieces:
                assert plan.chain == CHAIN_NARROW and not plan.overlap and 2 <= plan.pieces <= pieces
                assert (plan.pieces - 1) * plan.cp_step < T <= plan.pieces * plan.cp_step
                assert plan.cp_step == cp_step(T, pieces)
            else:
                assert plan == PrefillPlan(chain_kind(N, HV, 128, sms), use_overlap(N, HV, 128, sms))
            whole = plan_prefill(N, T, HV, 128, 128, sms, context_parallel=False)
            assert whole.pieces == 0 and whole.chain == chain_kind(N, HV, 128, sms)


def test_check_plan_names_what_the_kernels_cannot_run():
    good = plan_prefill(1, 8192, 4, 128, 128, 132)
    assert good.pieces >= 3
    cases = [((good.chain, good.overlap), TypeError, "PrefillPlan"),
             (good._replace(chain=7), ValueError, "plan.chain"),
             (PrefillPlan(CHAIN_WIDE, True), ValueError, "wide chain"),
             (good._replace(overlap=True), ValueError, "context parallelism"),
             (good._replace(cp_step=100), ValueError, "plan.cp_step"),
             (good._replace(pieces=good.pieces + 3), ValueError, "plan.cp_step")]
    for plan, error, match in cases:
        with pytest.raises(error, match=match):
            check_plan(plan, 1, 8192)
    with pytest.raises(ValueError, match="one sequence"):
        check_plan(good, 2, 8192)
