"""A function compiled with a 1.2 MB co_filename, as generated code can have: the tracer reads at most 4 KiB of
it, marks the cut, and keeps the frame. Prints "waiting" and allocates once a line arrives (so that a tracer
can attach by pid first), then prints "ready" and holds everything until its input closes."""

import sys

SOURCE = """
def allocate_with_a_long_file_name(count):
    held = []
    for _ in range(count):
        held.append(bytearray(1_000_000))  # line 5
    return held
"""


def main():
    namespace = {}
    exec(compile(SOURCE, "A" * 1_200_000, "exec"), namespace)
    print("waiting", flush=True)
    sys.stdin.readline()
    held = namespace["allocate_with_a_long_file_name"](5)
    print("ready", flush=True)
    sys.stdin.read()
    del held


if __name__ == "__main__":
    main()
