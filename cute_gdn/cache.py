"""Compile cache: an in-memory dict in front of a disk directory of exported kernels.

A kernel is named by a `KernelKey` (the op and the scalar arguments of its tensor-free
`compile_<op>` function). On disk it is `<cache_dir>/<fingerprint>/<key name>.o`, an object file
written by `export_to_c` and loaded with `cute.runtime.load_module(..., enable_tvm_ffi=True)`.
The fingerprint covers the kernel sources, Python, cutlass-dsl and tvm-ffi versions and the arch,
so a stale object is never loaded. `load_module` unpickles metadata stored in the object: only
objects this module wrote into the project's cache directory are ever loaded.

Compiles run in spawned processes with CUTE_DSL_ARCH=sm_90a set before cutlass is imported
(`cute.compile` holds the GIL and is not thread-safe), write to a temp file and `os.replace` it
under a per-key file lock, so parallel processes (precompile workers, several serving ranks) are safe.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import importlib
import json
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

ARCH = "sm_90a"
_EXPORT_NAME = "gdn"
_PKG_DIR = Path(__file__).resolve().parent

# op name -> "module:function" of its tensor-free compile function.
COMPILERS = {
    "decode": "cute_gdn.kernels.decode:compile_decode",
    "verify": "cute_gdn.kernels.verify:compile_verify",
    "commit": "cute_gdn.kernels.commit:compile_commit",
    "prefill": "cute_gdn.kernels.prefill:compile_prefill",
}


class KernelNotCompiledError(RuntimeError):
    """A kernel is missing from the cache where compiling is not allowed (after warmup)."""


@dataclasses.dataclass(frozen=True)
class KernelKey:
    op: str
    params: tuple  # sorted (name, value) pairs: the keyword arguments of compile_<op>

    @classmethod
    def make(cls, op: str, **params: Any) -> "KernelKey":
        if op not in COMPILERS:
            raise ValueError(f"unknown op {op!r}")
        return cls(op, tuple(sorted(params.items())))

    @property
    def kwargs(self) -> dict:
        return dict(self.params)

    @property
    def name(self) -> str:
        digest = hashlib.sha256(repr(self).encode()).hexdigest()[:16]
        return f"{self.op}-{digest}"

    def describe(self) -> str:
        """Short human-readable form for tables and errors."""
        parts = []
        for k, v in self.params:
            if dataclasses.is_dataclass(v):
                v = "/".join(str(x) for x in dataclasses.astuple(v))
            parts.append(f"{_SHORT.get(k, k)}={_SHORT.get(v, v) if isinstance(v, str) else v}")
        return " ".join(parts)


_SHORT = {"io_dtype": "io", "state_dtype": "state", "num_heads": "H", "num_v_heads": "HV", "head_k_dim": "K",
          "head_v_dim": "V", "pool_size": "pool", "gate_mode": "gates", "dt_bias_dtype": "dt_bias",
          "use_qk_l2norm": "l2norm", "config": "tile", "cache_steps": "steps", "num_tokens": "T",
          "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "none"


@lru_cache(maxsize=None)
def fingerprint(arch: str = ARCH) -> str:
    """Hash of everything that changes a compiled kernel: device sources, toolchain versions, arch."""
    h = hashlib.sha256()
    for path in sorted((_PKG_DIR / "kernels").rglob("*.py")):
        h.update(str(path.relative_to(_PKG_DIR)).encode())
        h.update(path.read_bytes())
    h.update(f"py{sys.version_info.major}.{sys.version_info.minor} {platform.machine()}".encode())
    h.update(f"cutlass-dsl {_version('nvidia-cutlass-dsl')} tvm-ffi {_version('apache-tvm-ffi')}".encode())
    h.update(arch.encode())
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    env = os.environ.get("CUTE_GDN_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "cute_gdn"


@contextmanager
def _file_lock(path: Path):
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _compile_fn(op: str) -> Callable:
    module, fn = COMPILERS[op].split(":")
    return getattr(importlib.import_module(module), fn)


def compile_to_disk(key: KernelKey, cache_dir: str) -> tuple[str, float]:
    """Compile `key` into `cache_dir` unless it is there already. Returns ("hit" | "compiled", seconds).

    Runs in a spawned worker: CUTE_DSL_ARCH must be set before cutlass is first imported.
    """
    os.environ.setdefault("CUTE_DSL_ARCH", ARCH)
    t0 = time.perf_counter()
    directory = Path(cache_dir) / fingerprint()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{key.name}.o"
    with _file_lock(directory / f"{key.name}.lock"):
        if target.exists():
            return "hit", time.perf_counter() - t0
        compiled = _compile_fn(key.op)(**key.kwargs)
        tmp = directory / f".{key.name}.{os.getpid()}.tmp.o"
        compiled.export_to_c(str(tmp), function_name=_EXPORT_NAME)
        os.replace(tmp, target)
        meta = {"op": key.op, "key": key.describe(), "seconds": time.perf_counter() - t0,
                "arch": ARCH, "cutlass_dsl": _version("nvidia-cutlass-dsl")}
        meta_tmp = directory / f".{key.name}.{os.getpid()}.tmp.json"
        meta_tmp.write_text(json.dumps(meta, indent=1))
        os.replace(meta_tmp, directory / f"{key.name}.json")
    return "compiled", time.perf_counter() - t0


def _compile_worker(key: KernelKey, cache_dir: str) -> tuple[str, float, Optional[str]]:
    try:
        status, seconds = compile_to_disk(key, cache_dir)
        return status, seconds, None
    except Exception as e:  # reported per key by the caller, which decides the exit status
        return "failed", 0.0, f"{type(e).__name__}: {e}"


def compile_many(keys: Iterable[KernelKey], cache_dir: str | os.PathLike, jobs: int = 1,
                 on_result: Optional[Callable] = None) -> list[tuple[KernelKey, str, float, Optional[str]]]:
    """Compile keys in `jobs` spawned processes. on_result(key, status, seconds, error) per finished key."""
    keys = list(keys)
    results = []
    directory = Path(cache_dir) / fingerprint()
    missing = []
    for key in keys:  # hits need no worker process
        if (directory / f"{key.name}.o").exists():
            results.append((key, "hit", 0.0, None))
            if on_result is not None:
                on_result(key, "hit", 0.0, None)
        else:
            missing.append(key)
    if not missing:
        return results
    env_before = os.environ.get("CUTE_DSL_ARCH")
    os.environ["CUTE_DSL_ARCH"] = ARCH  # inherited by the spawned workers
    try:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=max(1, min(jobs, len(missing))), mp_context=ctx) as pool:
            futures = [(key, pool.submit(_compile_worker, key, str(cache_dir))) for key in missing]
            for key, fut in futures:
                status, seconds, err = fut.result()
                results.append((key, status, seconds, err))
                if on_result is not None:
                    on_result(key, status, seconds, err)
    finally:
        if env_before is None:
            os.environ.pop("CUTE_DSL_ARCH", None)
        else:
            os.environ["CUTE_DSL_ARCH"] = env_before
    return results


class KernelCache:
    """Loaded kernels of one process, backed by a disk directory."""

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._loaded: dict[KernelKey, Any] = {}
        # The ops' hot-path index: a tuple of call attributes (dtypes, dims) -> what the op needs to
        # launch (its loaded kernels), so an eager call does not rebuild its KernelKeys.
        self.by_signature: dict[tuple, Any] = {}
        self._modules: list[Any] = []  # keep the JIT engines alive
        self.compiles = 0   # kernels this process compiled (through spawned workers)
        self.loads = 0      # objects this process loaded from disk

    def path(self, key: KernelKey) -> Path:
        return self.cache_dir / fingerprint() / f"{key.name}.o"

    def on_disk(self, key: KernelKey) -> bool:
        return self.path(key).exists()

    def get(self, key: KernelKey, *, allow_compile: bool = True):
        fn = self._loaded.get(key)
        if fn is not None:
            return fn
        if not self.on_disk(key):
            if not allow_compile:
                raise KernelNotCompiledError(
                    f"kernel {key.op} ({key.describe()}) is not in the cache {self.cache_dir} and "
                    f"compiling is disabled after warmup(); precompile it with cute-gdn-precompile "
                    f"or include it in the warmup config")
            self.compile([key])
        return self._load(key)

    def compile(self, keys: Iterable[KernelKey], jobs: int = 1) -> None:
        """Compile the keys missing from disk (each once, however often it is listed)."""
        missing = [k for k in dict.fromkeys(keys) if not self.on_disk(k)]
        if not missing:
            return
        for key, status, _, err in compile_many(missing, self.cache_dir, jobs):
            if status == "failed":
                raise RuntimeError(f"compiling {key.op} ({key.describe()}) failed: {err}")
            self.compiles += status == "compiled"

    def _load(self, key: KernelKey):
        from cutlass.cute.runtime import load_module

        module = load_module(str(self.path(key)), enable_tvm_ffi=True)
        fn = getattr(module, _EXPORT_NAME)
        self._modules.append(module)
        self._loaded[key] = fn
        self.loads += 1
        return fn


_default_cache: Optional[KernelCache] = None


def default_cache() -> KernelCache:
    """The process-wide cache used by the free functions (cute_gdn.decode, ...)."""
    global _default_cache
    if _default_cache is None:
        _default_cache = KernelCache()
    return _default_cache
