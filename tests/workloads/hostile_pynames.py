"""Python code that names itself with terminal escapes: a function whose file (co_filename) forges a traceback
line and clears the screen, and whose qualified name (co_qualname, CPython 3.11 and later) changes the window
title. It holds a 4,000,000-byte bytearray allocated there, prints "ready", and waits for its input to close."""

import sys

FILE = '/app/x\x1b[2J.py", line 9, in f\n  File "/etc/shadow", line 1'
QUALNAME = "hold\x1b]0;owned\x07\x9b31m"
SOURCE = "def hold():\n    KEPT.append(bytearray(4_000_000))\n"

KEPT = []
scope = {"KEPT": KEPT}
exec(compile(SOURCE, FILE, "exec"), scope)
hold = scope["hold"]
hold.__code__ = hold.__code__.replace(co_name=QUALNAME, co_qualname=QUALNAME)
hold()
print("ready", flush=True)
sys.stdin.read()
