"""Pages mapped from Python code through the `mmap` module's C code and libc's `mmap`: the native stack
unwound from the stack window runs through the interpreter to its entry point, and the Python frames stay
merged into it. Exits without finalizing, so that the mapping is still there at exit."""
import mmap
import os

kept = []


def map_pages():
    kept.append(mmap.mmap(-1, 5 * 4096, flags=mmap.MAP_PRIVATE))  # marker: map


map_pages()
os._exit(0)
