"""The import storm of `cargo xtask bench`: a start-up like Airflow's, where a process imports hundreds of
modules in a few seconds and each import allocates in bursts (code objects unmarshalled from .pyc files, module
dicts, classes, enums and dataclasses built at import time).

Usage:
  import_storm.py --prepare DIR   writes a package of MODULES synthetic modules under DIR and compiles them, so
                                  that the timed runs read .pyc files as a deployed application does;
  import_storm.py DIR ROUNDS      imports STDLIB (those not yet imported), then the synthetic package ROUNDS
                                  times, dropping it from sys.modules between rounds.

Like alloc_loop.py, it times only its imports, with a monotonic clock, and prints `elapsed_ns=N ops=N` on
stderr, ops being the modules it asked for (STDLIB once, the package's modules each round). A tracer that runs
in-process and imports some of STDLIB before the script starts (memray does) leaves it less to do.
"""

import compileall
import importlib
import os
import sys
import time

PACKAGE = "storm_pkg"
MODULES = 300
# A broad slice of the standard library, as an application's dependencies pull it in.
STDLIB = """
    abc argparse ast asyncio base64 bisect bz2 calendar collections collections.abc concurrent.futures
    configparser contextlib contextvars copy csv dataclasses datetime decimal difflib dis email.message
    email.mime.multipart email.mime.text email.utils enum fnmatch fractions ftplib functools getopt gettext glob
    gzip hashlib heapq hmac html html.parser http.client http.cookies http.server imaplib inspect io ipaddress
    itertools json logging logging.handlers lzma mimetypes multiprocessing numbers operator optparse pathlib
    pickle pkgutil platform poplib pprint queue random re secrets selectors shelve shlex shutil signal smtplib
    socket socketserver sqlite3 ssl statistics string struct subprocess tarfile tempfile textwrap threading
    timeit tomllib traceback typing unittest urllib.parse urllib.request uuid warnings weakref xml.dom.minidom
    xml.etree.ElementTree xmlrpc.client zipfile zoneinfo
""".split()


def module_source(index):
    """Module `index`: imports like real code, a constants table, an enum, a dataclass, a class hierarchy with
    methods, plain and decorated functions, and type aliases."""
    earlier = "".join(f"from {PACKAGE} import mod_{j:03}\n" for j in (index // 2, index // 3) if j < index)
    constants = "".join(f"    'key_{k}': ({k}, 'value_{index}_{k}'),\n" for k in range(40))
    methods = "".join(
        f"    def method_{m}(self, value, *args, **kwargs):\n"
        f"        return self.scale * value + {m} + len(args) + len(kwargs)\n\n"
        for m in range(12)
    )
    functions = "".join(
        f"def function_{f}(a, b={f}, *args, key=None, **kwargs):\n"
        f"    '''Function {f} of module {index}.'''\n"
        f"    total = a + b + sum(args)\n"
        f"    return total if key is None else (key, total, kwargs)\n\n\n"
        for f in range(15)
    )
    return f'''"""Synthetic module {index} of the bench's import storm."""
import collections
import dataclasses
import enum
import functools
import typing
{earlier}
CONSTANTS = {{
{constants}}}


class Color(enum.Enum):
    RED = 1
    GREEN = 2
    BLUE = 3
    CYAN = 4


@dataclasses.dataclass
class Record:
    name: str
    value: int = {index}
    tags: list = dataclasses.field(default_factory=list)
    color: Color = Color.RED

    def describe(self):
        return f"{{self.name}}={{self.value}} {{self.tags}}"


class Base:
    scale = {index}

{methods}

class Derived(Base, collections.UserDict):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.index = {index}


{functions}
@functools.lru_cache(maxsize=None)
def cached(n):
    return n * {index}


Table = typing.Dict[str, typing.List[typing.Tuple[int, str]]]
Callback = typing.Callable[[Record], typing.Optional[int]]
'''


def prepare(directory):
    package = os.path.join(directory, PACKAGE)
    os.makedirs(package, exist_ok=True)
    names = [f"mod_{i:03}" for i in range(MODULES)]
    files = {f"{name}.py": module_source(i) for i, name in enumerate(names)}
    files["__init__.py"] = "".join(f"from . import {name}\n" for name in names)
    for name, source in files.items():
        path = os.path.join(package, name)
        # Unchanged files keep their mtime, and so their .pyc stays valid.
        try:
            with open(path, encoding="utf-8") as file:
                if file.read() == source:
                    continue
        except FileNotFoundError:
            pass
        with open(path, "w", encoding="utf-8") as file:
            file.write(source)
    if not compileall.compile_dir(package, quiet=1):
        sys.exit(f"import_storm.py: cannot compile {package}")


def storm(directory, rounds):
    sys.path.insert(0, directory)
    start = time.monotonic_ns()
    for name in STDLIB:
        importlib.import_module(name)
    for _ in range(rounds):
        for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
            del sys.modules[name]
        importlib.import_module(PACKAGE)
    elapsed = time.monotonic_ns() - start
    print(f"elapsed_ns={elapsed} ops={len(STDLIB) + rounds * (MODULES + 1)}", file=sys.stderr)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--prepare":
        prepare(sys.argv[2])
    elif len(sys.argv) == 3:
        storm(sys.argv[1], int(sys.argv[2]))
    else:
        sys.exit("usage: import_storm.py --prepare DIR | import_storm.py DIR ROUNDS")


main()
