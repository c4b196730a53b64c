"""Ground truth for alloctrace's CPython line-table decoder (tracer/src/python/lines.rs).

Run it with the interpreter whose tables you want, from any directory:

    python3.X tracer/test_data/python/lines_fixtures.py

It compiles SOURCE below (never runs it) and writes lines-3.X.json next to this script: for every code object,
recursively through co_consts, the first line, the raw line table as the interpreter stores it (co_lnotab for
3.8 and 3.9, co_linetable from 3.10 on), and each instruction's byte offset with the line CPython itself reports
for it (null: no line). Standard library only; it runs under 3.8 to 3.13.

Where the truth comes from:
- 3.8, 3.9: dis.findlinestarts, each line carried forward to the instructions up to the next start. These
  versions have no "no line" instructions.
- 3.10+: code.co_lines(), CPython's own decoder of co_linetable. Its (start, end, line) byte ranges are kept too,
  so the tests can ask for every byte offset, not only those of instructions.
- 3.11+: co_positions() is a second, separate decoder inside CPython (one entry per code unit, caches included);
  this script refuses to write a fixture if it disagrees with co_lines() anywhere.
"""

import dis
import json
import os
import sys
import types

# Blank regions long enough to force line deltas beyond a signed byte (127) in every format.
GAP = "\n" * 150
COMMENTS = "".join("    # filler comment %d\n" % i for i in range(140))
# One line whose bytecode is longer than any single table entry can span (255 bytes, 254, 8 code units).
LONG_LINE = "    s = " + " + ".join("a%d" % (i % 7) for i in range(120)) + "\n"
# More constants and locals than an 8-bit oparg holds, so EXTENDED_ARG instructions appear.
MANY_CONSTS = "".join("        v%d = %d.5\n" % (i, i) for i in range(270))

SOURCE = (
    '''\
"""Module docstring on line 1."""
import os


def simple(a, b):
    return a + b


def multi_line_expr(x):
    total = (x +
             x * 2 -
             x // 3)
    result = call(
        x,

        total,
    )
    return [
        i
        for i in range(x)
        if i % 2
    ], result


lam = lambda q: (q +
                 1)
one_line = lambda: 0


@decorator_one
@decorator_two(
    "arg",
)
def decorated(self, *args, **kwargs):
    return self


def loops(n):
    acc = 0
    for i in range(n):
        if i == 3:
            continue
        while acc < i:
            acc += 1
            if acc > 100:
                break
        else:
            acc -= 1
    else:
        acc = -acc
    return acc


def handlers(path):
    try:
        f = open(path)
    except OSError as e:
        return None
    except (ValueError, TypeError):
        raise
    else:
        pass
    finally:
        cleanup()
    with open(path) as f, lock:
        data = f.read()
    try:
        try:
            pass
        finally:
            return 1
    except Exception:
        pass
    return data


def gen(n):
    """Docstring first.

    Spanning lines.
    """
    "A second string statement."
    yield from range(n)
    for i in range(n):
        x = yield i
        if x:
            return x


async def coro(n):
    async with ctx() as c:
        async for item in c:
            await item
    return [i async for i in aiter()]


def nested(a):
    def inner(b):
        def innermost(c):
            return a + b + c
        return innermost
    return inner, {k: v for k, v in a.items()}, {s for s in a}, (g for g in a)


class Klass(Base, metaclass=Meta):
    attr = 1

    def method(self):
        return super().method()

    @property
    def prop(self):
        return self._p


def long_jumps(x):
    a = 1
'''
    + GAP
    + '''\
    b = 2
    c = call(
        a,
'''
    + GAP
    + '''\
        b,
    )
    for i in range(x):
'''
    + COMMENTS
    + '''\
        a = i
    while a:
'''
    + COMMENTS
    + '''\
        a -= 1
    return a + b + c


def long_line(a0, a1, a2, a3, a4, a5, a6):
'''
    + LONG_LINE
    + '''\
    return s


def many_consts(flag):
    if flag:
'''
    + MANY_CONSTS
    + '''\
    return flag


if __name__ == "__main__":

    simple(1, 2)
'''
)
assert SOURCE.count("\n") < 1400  # the far-down function below must start past every line above

SOURCE += "\n" * (1400 - SOURCE.count("\n")) + '''\
def far_down(x):
    """Starts on line 1401, with a docstring

    over several lines before any code."""
    """A second string, also not code."""
    return x
'''

# Syntax newer than 3.8, appended so that every earlier line keeps its number in every version.
if sys.version_info >= (3, 10):
    SOURCE += '''
def matching(cmd):
    match cmd.split():
        case [action]:
            return action
        case [action, obj] if obj:
            return obj
        case {"k": v, **rest}:
            return v
        case _:
            return None
'''
if sys.version_info >= (3, 11):
    SOURCE += '''
def groups():
    try:
        raise ExceptionGroup("g", [ValueError(1)])
    except* ValueError as eg:
        handle(eg)
    except* TypeError:
        pass
'''
if sys.version_info >= (3, 12):
    SOURCE += '''
type Alias[T] = list[T]


def generic[T](x: T) -> T:
    return x
'''


def code_objects(code):
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from code_objects(const)


def truth_findlinestarts(code, offsets):
    """3.8/3.9: each instruction takes the line of the last line start at or before it."""
    starts = sorted(dis.findlinestarts(code))
    lines = []
    for offset in offsets:
        line = None
        for start, start_line in starts:
            if start <= offset:
                line = start_line
        lines.append(line)
    return lines


def truth_co_lines(code, offsets):
    ranges = [[start, end, line] for start, end, line in code.co_lines()]
    lines = []
    for offset in offsets:
        found = [line for start, end, line in ranges if start <= offset < end]
        assert len(found) == 1, (code, offset, found)
        lines.append(found[0])
    if sys.version_info >= (3, 11):
        # co_positions() walks co_linetable with its own C code: one position per 2-byte code unit.
        for unit, position in enumerate(code.co_positions()):
            found = [line for start, end, line in ranges if start <= unit * 2 < end]
            assert found == [position[0]], (code, unit, found, position)
    return ranges, lines


def describe(code):
    name = getattr(code, "co_qualname", code.co_name)
    offsets = [instr.offset for instr in dis.get_instructions(code)]
    entry = {"name": name, "first_line": code.co_firstlineno, "code_len": len(code.co_code)}
    if sys.version_info >= (3, 10):
        entry["table"] = code.co_linetable.hex()
        ranges, lines = truth_co_lines(code, offsets)
        entry["ranges"] = ranges
    else:
        entry["table"] = code.co_lnotab.hex()
        lines = truth_findlinestarts(code, offsets)
    entry["instructions"] = [[offset, line] for offset, line in zip(offsets, lines)]
    return entry


def main():
    version = "%d.%d" % sys.version_info[:2]
    module = compile(SOURCE, "lines_fixture_source.py", "exec")
    codes = [describe(code) for code in code_objects(module)]
    table = "co_linetable" if sys.version_info >= (3, 10) else "co_lnotab"
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lines-%s.json" % version)
    with open(out, "w") as f:
        # One code object a line: small, and a diff shows which code object changed.
        f.write('{"python": %s, "table": %s, "codes": [\n' % (json.dumps(sys.version.split()[0]), json.dumps(table)))
        f.write(",\n".join(json.dumps(entry, separators=(",", ":")) for entry in codes))
        f.write("\n]}\n")
    instructions = sum(len(entry["instructions"]) for entry in codes)
    no_line = sum(1 for entry in codes for _, line in entry["instructions"] if line is None)
    print("%s: %d code objects, %d instructions (%d without a line), %d bytes"
          % (out, len(codes), instructions, no_line, os.path.getsize(out)))


main()
