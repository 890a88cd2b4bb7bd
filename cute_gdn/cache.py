"""Compile cache: an in-memory dict in front of a disk directory of exported kernels.

A kernel is named by a `KernelKey` (the op and the scalar arguments of its tensor-free
`compile_<op>` function). On disk it is `<cache_dir>/<fingerprint>/<key name>.o`, an object file
written by `export_to_c` and loaded with `cute.runtime.load_module(..., enable_tvm_ffi=True)`.
The fingerprint covers the kernel sources, Python, cutlass-dsl and tvm-ffi versions and the arch,
so a stale object is never loaded. `load_module` unpickles metadata stored in the object: only
objects this module wrote into the project's cache directory are ever loaded.

Compiles run in worker processes (fresh interpreters running `cute_gdn._compile_worker`, which never
re-import the caller's `__main__`) with CUTE_DSL_ARCH=sm_90a set before cutlass is imported
(`cute.compile` holds the GIL and is not thread-safe), write to a temp file and `os.replace` it
under a per-key file lock, so parallel processes (precompile workers, several serving ranks) are safe.

An object that fails to load (truncated by a full disk, written by a crashed or foreign process) is
moved aside, under its key's lock, to `<fingerprint>/quarantine/` with a warning naming the key and the
loader's error, and compiled again where compiling is allowed (after warmup it raises
KernelNotCompiledError instead, as for a missing kernel). A second failure raises KernelLoadError.
"""

from __future__ import annotations

import base64
import dataclasses
import fcntl
import hashlib
import importlib
import json
import os
import pickle
import platform
import queue
import subprocess
import sys
import tempfile
import threading
import time
import warnings
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
    "replay": "cute_gdn.kernels.replay:compile_replay",
    "replay_cursor": "cute_gdn.kernels.replay_cursor:compile_cursor",
}


class KernelNotCompiledError(RuntimeError):
    """A kernel is missing from the cache where compiling is not allowed (after warmup)."""


class KernelLoadError(RuntimeError):
    """A freshly compiled object still fails to load; the message names the key and the loader's error."""


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

    Runs in a compile worker: CUTE_DSL_ARCH must be set before cutlass is first imported.
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


class KernelCompileError(RuntimeError):
    """A kernel failed to compile. `key` names it; the message carries the compiler's own message."""

    def __init__(self, key: KernelKey, message: str):
        super().__init__(f"compiling {key.op} ({key.describe()}) failed: {message}")
        self.key = key
        self.compiler_message = message


def check_cache_dir(cache_dir: str | os.PathLike) -> Path:
    """The cache's directory for this fingerprint, created; raises ValueError (once, before any compile)
    if it cannot be created or written, naming the path and the reason."""
    directory = Path(cache_dir) / fingerprint()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cache dir {cache_dir} is not a writable directory: {e.strerror or e}") from None
    return directory


ANSWER_PREFIX = b"cute_gdn-answer "  # marks the worker's answer lines on its stdout
# The worker's bootstrap moves its stdout (the answer pipe) aside before anything is imported, so that a
# print during the imports (cute_gdn, torch, cutlass) or the compile goes to stderr, not into an answer.
_BOOTSTRAP = ("import os; answers = os.dup(1); os.dup2(2, 1); "
              "from cute_gdn._compile_worker import main; main(answers)")


def _worker_command() -> tuple[list[str], dict]:
    """A fresh interpreter running cute_gdn._compile_worker: unlike multiprocessing's spawn it never
    re-imports the caller's __main__, so a script without a main guard, a notebook or an exec'd string
    can compile. CUTE_DSL_ARCH is set before the worker imports cutlass."""
    env = {**os.environ, "CUTE_DSL_ARCH": ARCH, "PYTHONUNBUFFERED": "1"}
    root = str(_PKG_DIR.parent)  # the worker imports this very copy of cute_gdn
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return [sys.executable, "-c", _BOOTSTRAP], env


class _Worker:
    """One compile worker process; keys go in on its stdin, results come back on its stdout, one line
    each (base64 pickles). Its stderr (compiler warnings) goes to a temp file, read back when it dies."""

    def __init__(self):
        cmd, env = _worker_command()
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, close_fds=True)

    def compile(self, key: KernelKey, cache_dir: str) -> tuple[str, float, Optional[str]]:
        try:
            self.proc.stdin.write(base64.b64encode(pickle.dumps((key, cache_dir))) + b"\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
            while line and not line.startswith(ANSWER_PREFIX):  # e.g. a sitecustomize's print at start-up
                line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = b""
        if not line:
            return "failed", 0.0, f"the compile worker died (exit status {self.proc.wait()}): {self.stderr_tail()}"
        return pickle.loads(base64.b64decode(line[len(ANSWER_PREFIX):]))

    def stderr_tail(self, chars: int = 2000) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-chars:].strip() or "no output"

    def close(self) -> None:
        """Let the worker exit (stdin closed), or kill it if it does not within 30 s."""
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            self.kill()
        self.proc.stdout.close()
        self.log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


def compile_many(keys: Iterable[KernelKey], cache_dir: str | os.PathLike, jobs: int = 1,
                 on_result: Optional[Callable] = None) -> list[tuple[KernelKey, str, float, Optional[str]]]:
    """Compile keys in up to `jobs` worker processes (fresh interpreters), in parallel.

    Returns (key, "hit" | "compiled" | "failed", seconds, error or None) in the order of `keys`;
    on_result(key, status, seconds, error) is called in this thread as each key finishes. The cache dir
    is checked once, up front (ValueError).
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an int >= 1, got {jobs!r}")
    keys = list(keys)
    directory = check_cache_dir(cache_dir)
    done: list = [None] * len(keys)
    missing = []
    for i, key in enumerate(keys):  # hits need no worker process
        if (directory / f"{key.name}.o").exists():
            done[i] = (key, "hit", 0.0, None)
            if on_result is not None:
                on_result(*done[i])
        else:
            missing.append(i)
    if missing:
        todo: queue.Queue = queue.Queue()
        for i in missing:
            todo.put(i)
        finished: queue.Queue = queue.Queue()
        workers: list[_Worker] = []  # every worker started, for the kill on an interrupt
        lock = threading.Lock()

        def serve() -> None:
            """One thread per job: takes keys until none is left, always answering each key it took
            (a failure of any kind is that key's result), then lets its worker exit."""
            worker = None
            try:
                while True:
                    try:
                        i = todo.get_nowait()
                    except queue.Empty:
                        return
                    try:
                        if worker is None or not worker.alive:  # a crashed worker is replaced for the next key
                            if worker is not None:
                                worker.close()
                            worker = _Worker()
                            with lock:
                                workers.append(worker)
                        result = worker.compile(keys[i], str(cache_dir))
                    except Exception as e:  # reported as this key's failure; the caller decides what to do
                        result = ("failed", 0.0, f"{type(e).__name__}: {e}")
                    finished.put((i, *result))
            finally:
                if worker is not None:
                    worker.close()

        threads = [threading.Thread(target=serve, daemon=True) for _ in range(min(jobs, len(missing)))]
        received = 0
        try:
            for t in threads:
                t.start()
            for _ in missing:
                i, *result = finished.get()
                received += 1
                done[i] = (keys[i], *result)
                if on_result is not None:
                    on_result(*done[i])
        finally:
            if received < len(missing):  # interrupted: drop the remaining keys, kill the workers
                while not todo.empty():
                    todo.get_nowait()
                with lock:
                    for worker in workers:
                        worker.kill()
            for t in threads:
                t.join()
    return done


class KernelCache:
    """Loaded kernels of one process, backed by a disk directory."""

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._loaded: dict[KernelKey, Any] = {}
        # The ops' hot-path index: a tuple of call attributes (dtypes, dims) -> what the op needs to
        # launch (its loaded kernels), so an eager call does not rebuild its KernelKeys.
        self.by_signature: dict[tuple, Any] = {}
        self._modules: list[Any] = []  # keep the JIT engines alive
        self.compiles = 0   # kernels this process compiled (through its worker processes)
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
        try:
            return self._load(key)
        except Exception as e:  # noqa: BLE001 - any loader failure: the object is unusable
            self._quarantine(key, e)
        if not allow_compile:
            raise KernelNotCompiledError(
                f"kernel {key.op} ({key.describe()}) in the cache {self.cache_dir} failed to load and was moved "
                f"aside; compiling is disabled after warmup(): precompile it again with cute-gdn-precompile")
        self.compile([key])
        try:
            return self._load(key)
        except Exception as e:  # noqa: BLE001
            raise KernelLoadError(f"kernel {key.op} ({key.describe()}) failed to load after a fresh compile: "
                                  f"{type(e).__name__}: {e}") from e

    def _quarantine(self, key: KernelKey, error: BaseException) -> None:
        """Move key's unloadable object to <fingerprint>/quarantine/ (under its lock, unless another process
        already replaced it with a newer one), with a warning."""
        path = self.path(key)
        try:
            seen = path.stat()
        except OSError:
            return
        aside = path.parent / "quarantine" / f"{key.name}.{os.getpid()}.{time.time_ns()}.o"
        with _file_lock(path.parent / f"{key.name}.lock"):
            try:
                now = path.stat()
            except OSError:
                return
            if (now.st_ino, now.st_mtime_ns) != (seen.st_ino, seen.st_mtime_ns):
                return  # replaced meanwhile: the new object gets its own chance to load
            aside.parent.mkdir(exist_ok=True)
            os.replace(path, aside)
        warnings.warn(f"cute_gdn: kernel {key.op} ({key.describe()}) in {path} failed to load "
                      f"({type(error).__name__}: {error}); moved to {aside}, recompiling where allowed",
                      RuntimeWarning, stacklevel=3)

    def compile(self, keys: Iterable[KernelKey], jobs: int = 1) -> None:
        """Compile the keys missing from disk (each once, however often it is listed)."""
        missing = [k for k in dict.fromkeys(keys) if not self.on_disk(k)]
        if not missing:
            return
        results = compile_many(missing, self.cache_dir, jobs)
        self.compiles += sum(status == "compiled" for _, status, _, _ in results)
        for key, status, _, err in results:
            if status == "failed":
                raise KernelCompileError(key, err)

    def _load(self, key: KernelKey):
        module, fn = load_object(self.path(key))
        self._modules.append(module)
        self._loaded[key] = fn
        self.loads += 1
        return fn


def load_object(path: str | os.PathLike):
    """Load one compiled object file: (its module, which must stay alive while the function is used, and its
    tvm-ffi function). KernelCache loads through it; bench/ab_prefill.py loads another build's objects."""
    from cutlass.cute.runtime import load_module

    module = load_module(str(path), enable_tvm_ffi=True)
    return module, getattr(module, _EXPORT_NAME)


_default_cache: Optional[KernelCache] = None


def default_cache() -> KernelCache:
    """The process-wide cache used by the free functions (cute_gdn.decode, ...)."""
    global _default_cache
    if _default_cache is None:
        _default_cache = KernelCache()
    return _default_cache
