"""The CPython workload of `cargo xtask bench`: objects over 512 bytes created and dropped in a loop, so that
libc's allocator is really called (pymalloc serves 512 bytes and less itself).

Like alloc_loop.c, it times only its loop, with a monotonic clock, and prints `elapsed_ns=N ops=N` on stderr,
ops being the libc allocator calls the loop made. Each iteration makes seven, counted with uprobes on Debian's
CPython 3.11: calloc and free for `bytes(1000)`, malloc and free for the bytearray's buffer, malloc and free
for the list's items, and a realloc when the list doubles. The loop runs in a function: its names are fast
locals, where module globals would be a dict whose deletions and insertions make it reallocate now and then.
"""

import sys
import time

CALLS_PER_ITERATION = 7


def allocate(iterations):
    for _ in range(iterations):
        # Each name's previous object is freed when the name is bound to the new one.
        data = bytes(1000)
        buffer = bytearray(4096)
        items = [None] * 200
        items += items


def main():
    iterations = int(sys.argv[1])
    start = time.monotonic_ns()
    allocate(iterations)
    elapsed = time.monotonic_ns() - start
    print(f"elapsed_ns={elapsed} ops={iterations * CALLS_PER_ITERATION}", file=sys.stderr)


main()
