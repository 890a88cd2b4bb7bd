"""A compile worker: `python -m cute_gdn._compile_worker`, started by cache.compile_many.

Reads one request per line on stdin (a base64 pickle of (KernelKey, cache_dir)), compiles it into the
cache with cache.compile_to_disk and answers one line on its original stdout (a base64 pickle of
(status, seconds, error or None)). Anything the compiler prints goes to stderr, so it cannot corrupt the
answers. It exits when stdin closes. CUTE_DSL_ARCH is set by the parent before this interpreter starts.
"""

import base64
import os
import pickle
import sys


def main() -> None:
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints from the compiler go to stderr
    from cute_gdn.cache import compile_to_disk

    for line in sys.stdin.buffer:
        key, cache_dir = pickle.loads(base64.b64decode(line))
        try:
            status, seconds = compile_to_disk(key, cache_dir)
            result = (status, seconds, None)
        except Exception as e:  # reported per key by the parent, which raises or sets the exit status
            result = ("failed", 0.0, f"{type(e).__name__}: {e}")
        answers.write(base64.b64encode(pickle.dumps(result)) + b"\n")


if __name__ == "__main__":
    main()
