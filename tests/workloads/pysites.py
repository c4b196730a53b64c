"""Python allocation sites with known sizes, on every CPython the tests run. Each site's line carries a marker
comment the tests look for, so that line numbers are never written twice. It allocates, prints "ready", and
waits for its input to close: the tracer reports while everything is still held (at exit, interpreter
finalization would free it all). With --wait it first prints "waiting" and allocates only once a line arrives,
so that a tracer can attach by pid first."""

import sys
import threading

CACHE = {}
KEPT = []


def cache_results(count):
    for key in range(count):
        CACHE[key] = bytes(100_000)  # site: cache


def keep_one_large_object():
    KEPT.append(bytearray(4_000_000))  # site: large


def drop_buffers():
    for _ in range(200):
        buffer = b"x" * 300_000  # site: dropped
        del buffer


def thread_worker():
    for _ in range(10):
        KEPT.append(bytes(200_000))  # site: thread


def main():
    if "--wait" in sys.argv:
        print("waiting", flush=True)
        sys.stdin.readline()
    cache_results(40)
    keep_one_large_object()
    drop_buffers()
    worker = threading.Thread(target=thread_worker)
    worker.start()
    worker.join()
    print("ready", flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
