"""A compile worker, started by cache.compile_many (its bootstrap calls main with the answer fd).

Reads one request per line on stdin (a base64 pickle of (KernelKey, cache_dir)), compiles it into the
cache with cache.compile_to_disk and answers one line on the answer fd, its original stdout (a base64
pickle of (status, seconds, error or None)). The bootstrap points stdout at stderr before anything is
imported, so nothing printed can corrupt the answers. It exits when stdin closes. CUTE_DSL_ARCH is set
by the parent before this interpreter starts.
"""

import base64
import os
import pickle
import sys


def main(answer_fd: int) -> None:
    answers = os.fdopen(answer_fd, "wb", buffering=0)
    from cute_gdn.cache import ANSWER_PREFIX, compile_to_disk

    for line in sys.stdin.buffer:
        key, cache_dir = pickle.loads(base64.b64decode(line))
        try:
            status, seconds = compile_to_disk(key, cache_dir)
            result = (status, seconds, None)
        except Exception as e:  # reported per key by the parent, which raises or sets the exit status
            result = ("failed", 0.0, f"{type(e).__name__}: {e}")
        answers.write(ANSWER_PREFIX + base64.b64encode(pickle.dumps(result)) + b"\n")


if __name__ == "__main__":  # python -m cute_gdn._compile_worker: the package is imported already
    fd = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    main(fd)
