"""Python allocation sites with known sizes, on every CPython the tests run. Each site's line carries a marker
comment the tests look for, so that line numbers are never written twice. It allocates, prints "ready", and
waits for its input to close: the tracer reports while everything is still held (at exit, interpreter
finalization would free it all). With --wait it first prints "waiting" and allocates only once a line arrives,
so that a tracer can attach by pid first. It also forks a child that allocates on a line of its own, and, where
ctypes loads (not in the tests' minimal container image), allocates with the GIL released."""

import os
import sys
import threading
import time

CACHE = {}
KEPT = []


def cache_results(count):
    for key in range(count):
        CACHE[key] = bytes(100_000)  # site: cache


def keep_one_large_object():
    KEPT.append(bytearray(4_000_000))  # site: large


def drop_buffers():
    for _ in range(2000):
        buffer = b"x" * 30_000  # site: dropped
        del buffer


def thread_worker():
    for _ in range(10):
        KEPT.append(bytes(200_000))  # site: thread


def recurse_then_allocate(depth):
    if depth == 0:
        KEPT.append(bytes(120_000))  # site: deep
        return
    recurse_then_allocate(depth - 1)


def malloc_without_the_gil():
    import ctypes

    # ctypes releases the GIL around a foreign call: the allocation is made by a thread that holds no GIL.
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    for _ in range(3):
        KEPT.append(libc.malloc(700_000))  # site: no-gil


def forked_child_site():
    for _ in range(5):
        KEPT.append(bytes(150_000))  # site: forked


def fork_a_child():
    """Forks a child that allocates at once (the tracer holds it until its probes are in place), and waits like
    its parent."""
    ready_read, ready_write = os.pipe()
    if os.fork() == 0:
        os.close(ready_read)
        forked_child_site()
        os.write(ready_write, b"x")
        sys.stdin.read()
        os._exit(0)
    os.close(ready_write)
    os.read(ready_read, 1)


def main():
    if "--wait" in sys.argv:
        print("waiting", flush=True)
        sys.stdin.readline()
    cache_results(40)
    keep_one_large_object()
    drop_buffers()
    # Deeper than a record holds (48 frames): the report says the outer frames are missing.
    recurse_then_allocate(60)
    worker = threading.Thread(target=thread_worker)
    worker.start()
    worker.join()
    try:
        malloc_without_the_gil()
    except (ImportError, OSError):
        pass
    fork_a_child()
    print("ready", flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
