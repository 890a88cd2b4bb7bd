"""The fuzz net's draw (tests/fuzz_cases.py), on the CPU: for any seed it covers what the GPU run must."""

import pytest

import fuzz_cases


@pytest.mark.parametrize("seed", [fuzz_cases.FIXED_SEED, 1, 777])
def test_every_seed_covers_the_required_space(seed):
    cases = fuzz_cases.draw(seed)
    assert len(cases) >= 200
    assert [c.id for c in cases] == [c.id for c in fuzz_cases.draw(seed)], "a seed must give the same cases"
    by_op = {op: [c for c in cases if c.op == op] for op in fuzz_cases.OPS}
    assert all(len(v) == fuzz_cases.CASES_PER_OP for v in by_op.values())
    for op, cs in by_op.items():
        fams = {c.family for c in cs}
        assert {f.HV // f.H for f in fams} == set(fuzz_cases.GVA_RATIOS), op
        assert {f.state for f in fams} == {"float32", "bfloat16"}, op
        assert {f.io for f in fams} == {"bfloat16", "float16"}, op
        assert any(c.pad for c in cs) and any(c.packed for c in cs), op
        assert all(f.supported() for f in fams), op
    lengths = {n for c in by_op["prefill"] for n in c.lengths}
    assert set(fuzz_cases.SPECIAL_LENGTHS) <= lengths
    assert max(lengths) >= 1000
    assert any(len(c.lengths) == 1 and c.lengths[0] >= 1000 for c in by_op["prefill"])  # context parallel
    assert any(c.has_init is not None and not all(c.has_init) for c in by_op["prefill"])
    assert {c.family.fold for c in by_op["replay"]} == {"exact", "compact"}
    assert any(c.batch == fuzz_cases.POOL for c in by_op["decode"])
    for c in cases:
        if c.op != "prefill":
            assert 1 <= c.batch <= fuzz_cases.POOL and all(0 <= i < c.batch for i in c.pad)


def test_kernel_set_stays_small():
    keys = fuzz_cases.kernel_keys(fuzz_cases.draw(fuzz_cases.FIXED_SEED))
    assert len(keys) <= 120, len(keys)
