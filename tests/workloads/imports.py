"""Imports 40 modules written on the spot, each of which allocates an object of its own size on its line 3 and
keeps it: a module's code object is freed as soon as its import is done, often before a tracer reading the
process from outside gets to it. Prints "ready" and waits for its input to close, holding every object."""

import importlib
import os
import sys
import tempfile

MODULES = 40

directory = tempfile.mkdtemp(prefix="alloctrace-imports-")
sys.path.insert(0, directory)
for index in range(MODULES):
    with open(os.path.join(directory, f"generated_{index}.py"), "w") as source:
        source.write(f'"""Module {index}."""\n')
        source.write("import sys\n")
        source.write(f"sys.modules[__name__].DATA = bytes({200_000 + 4096 * index})\n")
imported = [importlib.import_module(f"generated_{index}") for index in range(MODULES)]
print("ready", flush=True)
sys.stdin.read()
