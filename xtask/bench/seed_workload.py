"""The seed workload of `cargo xtask bench`: what the project was started for, a CPython service that loads a big
JSON document and builds a big list. Each loop `json.load`s DOCUMENT (about 225 MB, 200,000 records, generated
by the bench under target/bench/seed/), then builds `[x for x in range(10_000_000)]`, then drops both.

Usage: seed_workload.py DOCUMENT LOOPS. Like alloc_loop.py, it times only its loops, with a monotonic clock, and
prints `elapsed_ns=N ops=N` on stderr, ops being the loops: the tracers differ in how long they take to start
and to detach, and that must not count. LOOPS may be 0, for a run that only starts the interpreter.
"""

import json
import sys
import time

LIST_LENGTH = 10_000_000


def main():
    document, loops = sys.argv[1], int(sys.argv[2])
    start = time.monotonic_ns()
    for _ in range(loops):
        with open(document, encoding="utf-8") as file:
            records = json.load(file)
        numbers = [x for x in range(LIST_LENGTH)]
        # Both die before the next loop, so that every loop starts from the same heap.
        del records, numbers
    elapsed = time.monotonic_ns() - start
    print(f"elapsed_ns={elapsed} ops={loops}", file=sys.stderr)


main()
