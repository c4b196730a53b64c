"""The CPython workload of `cargo xtask bench`: objects over 512 bytes created and dropped in a loop, so that
libc's allocator is really called (pymalloc serves 512 bytes and less itself).

Usage: alloc_loop.py DEPTH ITERATIONS. The loop runs DEPTH Python frames deep: the module's code, `main`,
`descend` as many times as needed, and `allocate`, whose loop calls the allocator. A tracer that walks the
Python frames at each allocation walks DEPTH of them, as it would in an application, whose allocations are
rarely made at the top of its stack.

Like alloc_loop.c, it times only its loop, with a monotonic clock, and prints `elapsed_ns=N ops=N` on stderr,
ops being the libc allocator calls the loop made. Each iteration makes seven, counted with uprobes on Debian's
CPython 3.11, at depths 4 and 10 alike: calloc and free for `bytes(1000)`, malloc and free for the bytearray's
buffer, malloc and free for the list's items, and a realloc when the list doubles; the four that allocate are
where a tracer captures a stack. The loop's names are fast locals, where module globals would be a dict whose
deletions and insertions make it reallocate now and then.
"""

import sys
import time

CALLS_PER_ITERATION = 7
# Frames on the stack below `descend`'s: the module's code and `main`; `allocate` adds one more.
FRAMES_BELOW = 2


def allocate(iterations):
    start = time.monotonic_ns()
    for _ in range(iterations):
        # Each name's previous object is freed when the name is bound to the new one.
        data = bytes(1000)
        buffer = bytearray(4096)
        items = [None] * 200
        items += items
    return time.monotonic_ns() - start


def descend(levels, iterations):
    """Calls itself until `levels` frames of it are on the stack, then runs the loop in one more."""
    if levels > 1:
        return descend(levels - 1, iterations)
    return allocate(iterations)


def main():
    depth, iterations = int(sys.argv[1]), int(sys.argv[2])
    if depth < FRAMES_BELOW + 2:
        sys.exit(f"alloc_loop.py: a depth of {depth} is too shallow: the loop needs {FRAMES_BELOW + 2} frames")
    elapsed = descend(depth - FRAMES_BELOW - 1, iterations)
    print(f"elapsed_ns={elapsed} ops={iterations * CALLS_PER_ITERATION}", file=sys.stderr)


main()
