FIRST = bytes(3_000_000)  # site: first
"""Allocates on its very first line, before any import, then says "ready" and waits for its input to close: a
shared libpython must be found before its first line runs, or that line has no Python frames."""

import sys

sys.stdout.write("ready\n")
sys.stdout.flush()
sys.stdin.read()
