"""The compile cache: AOT compile on a CPU machine, load in a fresh process without compiling."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cute_gdn.cache import KernelCache, KernelNotCompiledError, compile_many, compile_to_disk, fingerprint
from cute_gdn.ops import decode_key

ROOT = Path(__file__).resolve().parents[1]


def small_key(pool_size=4, gate_mode="raw"):
    return decode_key(io_dtype="bfloat16", state_dtype="float32", num_heads=2, num_v_heads=4, head_k_dim=64,
                      head_v_dim=64, pool_size=pool_size, gate_mode=gate_mode,
                      dt_bias_dtype="float32" if gate_mode == "raw" else None, use_qk_l2norm=True)


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    full_env.pop("CUTE_DSL_ARCH", None)  # a serving process never sets it: loading must not need it
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=300)


NO_COMPILE_PRELUDE = """
    import cutlass.cute as cute
    def _forbidden(*a, **k):
        raise AssertionError("cute.compile was called")
    cute.compile = _forbidden
"""


def test_compile_then_load_in_fresh_process_without_compiling(tmp_path):
    key = small_key()
    status, seconds = compile_to_disk(key, str(tmp_path))
    assert status == "compiled" and seconds > 0
    path = tmp_path / fingerprint() / f"{key.name}.o"
    assert path.stat().st_size > 1000
    assert compile_to_disk(key, str(tmp_path))[0] == "hit"
    r = run_python(NO_COMPILE_PRELUDE + f"""
    from cute_gdn.cache import KernelCache
    from tests.test_cache import small_key
    cache = KernelCache({str(tmp_path)!r})
    fn = cache.get(small_key(), allow_compile=False)
    assert callable(fn)
    print("loads", cache.loads, "compiles", cache.compiles)
    """)
    assert r.returncode == 0, r.stderr
    assert "loads 1 compiles 0" in r.stdout


def test_missing_kernel_raises_when_compiling_is_not_allowed(tmp_path):
    with pytest.raises(KernelNotCompiledError, match="not in the cache"):
        KernelCache(tmp_path).get(small_key(pool_size=5), allow_compile=False)


def test_parallel_compiles_of_one_key_produce_one_object(tmp_path):
    key = small_key(pool_size=6, gate_mode="precomputed")
    results = compile_many([key, key], tmp_path, jobs=2)
    statuses = sorted(r[1] for r in results)
    assert statuses == ["compiled", "hit"], results
    files = sorted(p.name for p in (tmp_path / fingerprint()).iterdir() if not p.name.endswith(".lock"))
    assert files == [f"{key.name}.json", f"{key.name}.o"]


def test_key_names_differ_by_every_field():
    names = {small_key().name, small_key(pool_size=5).name, small_key(gate_mode="precomputed").name}
    assert len(names) == 3


def test_device_vectors_grow_memoize_and_stay_out_of_captures():
    """ops.DeviceVectors (cache_indices=None, has_initial_state=None): one tensor per device, grown
    when a longer one is asked for, older tensors kept alive, and a fresh unmemoized one while a CUDA
    graph is being captured."""
    import torch

    from cute_gdn.ops import DeviceVectors

    capturing = [False]
    made = []

    def make(n, device):
        made.append(n)
        return torch.arange(n, dtype=torch.int32, device=device)

    vecs = DeviceVectors(make, capturing=lambda: capturing[0])
    cpu = torch.device("cpu")
    assert torch.equal(vecs.get(3, cpu), torch.arange(3, dtype=torch.int32)) and made == [256]
    first = vecs.get(10, cpu)
    assert made == [256] and first.shape == (10,)
    assert vecs.get(300, cpu).shape == (300,) and made == [256, 300]
    capturing[0] = True
    assert vecs.get(500, cpu).shape == (500,) and made == [256, 300, 500]
    capturing[0] = False
    assert vecs.get(400, cpu).shape == (400,) and made == [256, 300, 500, 400]
    assert len(vecs._keep) == 3  # 256, 300 and 400 stay alive; the capture-time one was not memoized


def test_script_without_main_guard_and_exec_compile_and_load(tmp_path):
    """A plain script with no `if __name__ == "__main__":` guard, and the same code exec'd from a
    string as a notebook cell runs it, compile and load a kernel: the compile workers are fresh
    interpreters that never re-import the caller's __main__ (multiprocessing's spawn did, and died with
    BrokenProcessPool)."""
    body = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from cute_gdn.cache import KernelCache
        from tests.test_cache import small_key
        cache = KernelCache(sys.argv[1])
        fn = cache.get(small_key(pool_size=CUTE_GDN_POOL))
        print("compiled", cache.compiles, "loaded", cache.loads, callable(fn))
        """)
    script = tmp_path / "no_guard.py"
    script.write_text(body.replace("CUTE_GDN_POOL", "7"))
    env = {k: v for k, v in os.environ.items() if k not in ("CUTE_DSL_ARCH", "PYTHONPATH")}
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "a")], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compiled 1 loaded 1 True" in r.stdout
    cell = f"import sys; sys.argv = ['cell', {str(tmp_path / 'b')!r}]; exec({body.replace('CUTE_GDN_POOL', '7')!r})"
    r = subprocess.run([sys.executable, "-c", cell], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compiled 1 loaded 1 True" in r.stdout


def test_failed_compile_names_the_key_and_carries_the_compiler_message(tmp_path):
    from cute_gdn.cache import KernelCompileError
    from cute_gdn.ops import verify_key

    bad = verify_key(io_dtype="bfloat16", state_dtype="float32", num_heads=2, num_v_heads=4, head_k_dim=64,
                     head_v_dim=64, pool_size=4, num_tokens=2, cache_steps=99, gate_mode="precomputed",
                     dt_bias_dtype=None, use_qk_l2norm=True)
    cache = KernelCache(tmp_path)
    with pytest.raises(KernelCompileError) as info:
        cache.compile([bad])
    assert info.value.key == bad
    assert "verify" in str(info.value) and "steps=99" in str(info.value)
    assert "cache_steps" in info.value.compiler_message  # the compile function's own ValueError text
    assert not cache.on_disk(bad)


@pytest.mark.parametrize("problem", ["a file", "below a file"])
def test_unusable_cache_dir_is_reported_once_before_compiling(tmp_path, problem):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    target = blocker if problem == "a file" else blocker / "cache"
    with pytest.raises(ValueError, match="cache dir .* is not a writable directory") as info:
        compile_many([small_key(), small_key(pool_size=5)], target, jobs=2)
    assert str(target) in str(info.value)


def test_compile_many_rejects_bad_jobs(tmp_path):
    for jobs in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match="jobs must be an int >= 1"):
            compile_many([small_key()], tmp_path, jobs=jobs)


def test_noise_on_the_workers_stdout_does_not_corrupt_answers(tmp_path, monkeypatch):
    """A sitecustomize that prints when the worker interpreter starts (before its bootstrap can move
    stdout aside): the parent skips lines that are not answers."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("print('hello from sitecustomize')\n")
    monkeypatch.setenv("PYTHONPATH", f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    results = compile_many([small_key(pool_size=9)], tmp_path / "cache", jobs=1)
    assert [r[1] for r in results] == ["compiled"], results


def test_workers_that_cannot_start_fail_every_key_without_hanging(tmp_path, monkeypatch):
    import cute_gdn.cache as cache_module

    monkeypatch.setattr(cache_module, "_worker_command",
                        lambda: ([str(tmp_path / "no-such-python")], dict(os.environ)))
    keys = [small_key(pool_size=p) for p in (10, 11, 12)]
    results = compile_many(keys, tmp_path / "cache", jobs=2)
    assert [r[0] for r in results] == keys
    assert all(r[1] == "failed" and "No such file" in r[3] for r in results), results


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_an_object_that_fails_to_load_is_moved_aside_and_recompiled(tmp_path, damage):
    key = small_key(pool_size=6)
    assert compile_to_disk(key, str(tmp_path))[0] == "compiled"
    path = tmp_path / fingerprint() / f"{key.name}.o"
    good = path.read_bytes()
    path.write_bytes(b"not an object file" * 100 if damage == "garbage" else good[:len(good) // 3])
    bad = path.read_bytes()
    # After warmup (no compiling): moved aside, and the error says what to do.
    with pytest.warns(RuntimeWarning, match="failed to load"):
        with pytest.raises(KernelNotCompiledError, match="failed to load and was moved aside"):
            KernelCache(tmp_path).get(key, allow_compile=False)
    aside = list((tmp_path / fingerprint() / "quarantine").iterdir())
    assert [p.read_bytes() for p in aside] == [bad] and not path.exists()
    # Where compiling is allowed: moved aside, compiled again, loaded.
    path.write_bytes(bad)
    cache = KernelCache(tmp_path)
    with pytest.warns(RuntimeWarning, match=key.name):
        fn = cache.get(key)
    assert callable(fn) and cache.compiles == 1 and cache.loads == 1
    assert path.stat().st_size > 1000 and len(list((tmp_path / fingerprint() / "quarantine").iterdir())) == 2
    assert KernelCache(tmp_path).get(key, allow_compile=False) is not None  # the new object loads as is
