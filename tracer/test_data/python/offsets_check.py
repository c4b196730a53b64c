"""Check a table of CPython structure offsets against the live interpreter that runs this script.

alloctrace reads CPython's thread states, frames, code objects and strings from outside the process with
offsets taken from CPython's headers (tracer/src/python/offsets.rs). This script proves such a table from the
inside: it reads the interpreter's own memory at each offset (through /proc/self/mem, as the tracer reads another
process's) and compares what it finds with what the interpreter says through its C and Python APIs (reached with
ctypes): ids of objects, thread idents, frame chains, f_lasti, lengths.

Usage (standard library only; Python 3.8 or newer, x86-64 Linux):
    python3 offsets_check.py '{"version": [3, 11], "offsets": {...}}'   (or the same JSON on stdin)
        exits 0 after printing a summary, or 1 listing every mismatch.
    python3 offsets_check.py --dump-debug-offsets PATH   (3.13: write the raw _Py_DebugOffsets bytes, '-' for stdout)

On 3.13 the script also parses _Py_DebugOffsets itself (independently of the Rust parser) and requires the
offsets it was given to agree with the ones CPython publishes.
"""

import ctypes
import json
import os
import sys
import threading
import time

# Every field of alloctrace's `Offsets`, so that the table and this script cannot drift apart silently.
FIELDS = (
    "runtime_interpreters_head",
    "interp_threads_head",
    "tstate_next",
    "tstate_interp",
    "tstate_thread_id",
    "tstate_frame",
    "cframe_current_frame",
    "frame_back",
    "frame_code",
    "frame_globals",
    "frame_instr",
    "frame_instr_is_pointer",
    "frame_owner",
    "code_filename",
    "code_name",
    "code_qualname",
    "code_firstlineno",
    "code_linetable",
    "code_code_adaptive",
    "unicode_state",
    "unicode_ascii_data",
    "unicode_compact_data",
    "unicode_length",
    "bytes_size",
    "bytes_data",
)

# _Py_DebugOffsets as 3.13 declares it in Include/internal/pycore_runtime.h: after the 8-byte cookie every
# member is a uint64_t, in this order. 3.14 inserts members (interpreter_state.threads_main, ...), so this
# list is 3.13's only.
DEBUG_OFFSETS_3_13 = (
    ("cookie",),
    ("version",),
    ("free_threaded",),
    ("runtime_state", "size", "finalizing", "interpreters_head"),
    (
        "interpreter_state",
        "size",
        "id",
        "next",
        "threads_head",
        "gc",
        "imports_modules",
        "sysdict",
        "builtins",
        "ceval_gil",
        "gil_runtime_state",
        "gil_runtime_state_enabled",
        "gil_runtime_state_locked",
        "gil_runtime_state_holder",
    ),
    (
        "thread_state",
        "size",
        "prev",
        "next",
        "interp",
        "current_frame",
        "thread_id",
        "native_thread_id",
        "datastack_chunk",
        "status",
    ),
    ("interpreter_frame", "size", "previous", "executable", "instr_ptr", "localsplus", "owner"),
    (
        "code_object",
        "size",
        "filename",
        "name",
        "qualname",
        "linetable",
        "firstlineno",
        "argcount",
        "localsplusnames",
        "localspluskinds",
        "co_code_adaptive",
    ),
    ("pyobject", "size", "ob_type"),
    ("type_object", "size", "tp_name", "tp_repr", "tp_flags"),
    ("tuple_object", "size", "ob_item", "ob_size"),
    ("list_object", "size", "ob_item", "ob_size"),
    ("dict_object", "size", "ma_keys", "ma_values"),
    ("float_object", "size", "ob_fval"),
    ("long_object", "size", "lv_tag", "ob_digit"),
    ("bytes_object", "size", "ob_size", "ob_sval"),
    ("unicode_object", "size", "state", "length", "asciiobject_size"),
    ("gc", "size", "collecting"),
)

# _PyInterpreterFrame.owner values (Include/internal/pycore_frame.h, 3.11+).
FRAME_OWNED_BY_THREAD = 0
FRAME_OWNED_BY_GENERATOR = 1
FRAME_OWNED_BY_CSTACK = 3  # 3.12+: the shim frame at the bottom of each C -> Python entry

# Bounds for list walks, so that a wrong offset ends in a mismatch rather than a loop or a crash.
MAX_THREADS = 64
MAX_FRAMES = 256

# The first version that publishes _Py_DebugOffsets, as sys.version_info[:2].
VERSION_3_13 = (3, 13)

# PyThreadState_Get and friends need the GIL, which PyDLL keeps; on Linux `pythonapi` is dlopen(NULL), the
# global scope, so it finds libpython's symbols whether they sit in libpython3.X.so (pyenv) or in a static
# executable that exports them (Debian's /usr/bin/python3.11).
API = ctypes.pythonapi
API.PyThreadState_Get.restype = ctypes.c_void_p
API.PyThreadState_Get.argtypes = []
API.PyInterpreterState_Main.restype = ctypes.c_void_p
API.PyInterpreterState_Main.argtypes = []


def runtime_address():
    return ctypes.addressof(ctypes.c_char.in_dll(API, "_PyRuntime"))


# Memory is read through /proc/self/mem rather than by dereferencing: a wrong offset then yields an
# unreadable address, reported as a mismatch, instead of a crash (and it is how the tracer reads, from outside).
MEMORY = open("/proc/self/mem", "rb", buffering=0)


class Unreadable(Exception):
    pass


def read(address, size):
    try:
        data = os.pread(MEMORY.fileno(), size, address)
    except (OSError, OverflowError, ValueError):
        data = b""
    if len(data) != size:
        raise Unreadable("%d bytes at %#x are unreadable" % (size, address))
    return data


def ptr(address):
    return int.from_bytes(read(address, 8), "little")


def u64(address):
    return ptr(address)


def i64(address):
    return int.from_bytes(read(address, 8), "little", signed=True)


def i32(address):
    return int.from_bytes(read(address, 4), "little", signed=True)


def u8(address):
    return read(address, 1)[0]


class Checker:
    def __init__(self, offsets):
        self.o = offsets
        self.failures = []
        self.passed = 0

    def expect(self, what, got, want):
        if got == want:
            self.passed += 1
        else:
            self.failures.append("%s: read %r, expected %r" % (what, got, want))

    def require(self, what, condition):
        self.expect(what, bool(condition), True)


def frame_code(o, frame):
    return ptr(frame + o["frame_code"])


def is_shim(o, frame):
    """A frame that is no Python function: 3.12's owner == FRAME_OWNED_BY_CSTACK entry frame (3.13's too,
    whose f_executable is None)."""
    owner = o["frame_owner"]
    return owner is not None and u8(frame + owner) == FRAME_OWNED_BY_CSTACK


def native_chain(o, top):
    """(frame address, code address) from `top` along frame_back, shims included, bounded."""
    chain = []
    frame = top
    while frame and len(chain) < MAX_FRAMES:
        try:
            chain.append((frame, frame_code(o, frame)))
            frame = ptr(frame + o["frame_back"])
        except Unreadable as error:
            raise Unreadable("frame %d of the frame_back chain, at %#x: %s" % (len(chain), frame, error))
    return chain


def python_chain(frame):
    chain = []
    while frame is not None:
        chain.append(frame)
        frame = frame.f_back
    return chain


def top_frame_of(o, tstate):
    frame = ptr(tstate + o["tstate_frame"])
    if o["cframe_current_frame"] is not None:
        # 3.11/3.12: tstate->cframe->current_frame
        frame = ptr(frame + o["cframe_current_frame"]) if frame else 0
    return frame


def lasti_of(o, frame, code):
    """The position field of `frame` in the units of Python's frame.f_lasti (bytes into co_code)."""
    if o["frame_instr_is_pointer"]:
        return ptr(frame + o["frame_instr"]) - (id(code) + o["code_code_adaptive"])
    value = i32(frame + o["frame_instr"])
    # 3.10 counts instructions (2-byte code units); 3.8/3.9 count bytes.
    return value * 2 if sys.version_info[:2] == (3, 10) else value


def compare_stacks(c, label, native, py_frames, top_is_running):
    """The native chain, shims removed, must name the same code objects as Python's f_back chain, and each
    suspended frame's position must equal its f_lasti."""
    o = c.o
    python_frames = [(frame, code) for frame, code in native if not is_shim(o, frame)]
    c.expect(
        "%s: code objects along frame_back" % label,
        [code for _, code in python_frames],
        [id(f.f_code) for f in py_frames],
    )
    for index, ((frame, code_address), py) in enumerate(zip(python_frames, py_frames)):
        code = py.f_code
        if code_address != id(code):
            continue
        lasti = lasti_of(o, frame, code)
        where = "%s: frame %d (%s) position" % (label, index, code.co_name)
        if index == 0 and top_is_running:
            # The running frame has moved on since Python last reported its f_lasti: only bound it.
            c.require("%s %d inside co_code (%d bytes)" % (where, lasti, len(code.co_code)),
                      0 <= lasti < len(code.co_code))
        else:
            c.expect(where, lasti, py.f_lasti)
        if o["frame_globals"] is not None:
            c.expect("%s: frame %d (%s) globals" % (label, index, code.co_name),
                     ptr(frame + o["frame_globals"]), id(py.f_globals))
        if o["frame_owner"] is not None:
            c.expect("%s: frame %d owner" % (label, index), u8(frame + o["frame_owner"]), FRAME_OWNED_BY_THREAD)
    if sys.version_info[:2] >= (3, 12):
        # Each C -> Python entry pushes a shim; the script's module frame sits on one.
        bottom_frame, bottom_code = native[-1] if native else (0, 0)
        c.require("%s: the bottom frame is a FRAME_OWNED_BY_CSTACK shim" % label,
                  bottom_frame and is_shim(o, bottom_frame))
        if sys.version_info[:2] >= VERSION_3_13 and bottom_frame:
            c.expect("%s: the 3.13 shim's f_executable is None" % label, bottom_code, id(None))


def check_own_stack(c):
    o = c.o
    tstate = API.PyThreadState_Get()
    # Read the top frame here with C calls only, not in a Python helper, which would be the top frame itself.
    frame = int.from_bytes(os.pread(MEMORY.fileno(), 8, tstate + o["tstate_frame"]), "little")
    if o["cframe_current_frame"] is not None and frame:
        frame = int.from_bytes(os.pread(MEMORY.fileno(), 8, frame + o["cframe_current_frame"]), "little")
    here = sys._getframe()
    compare_stacks(c, "this thread", native_chain(o, frame), python_chain(here), True)


def check_generator_owner(c):
    """A generator's frame lives in the generator (owner FRAME_OWNED_BY_GENERATOR): a non-zero owner value
    that pins the owner offset, which zero padding could not fake."""
    o = c.o
    if o["frame_owner"] is None:
        return

    def generator():
        tstate = API.PyThreadState_Get()
        frame = int.from_bytes(os.pread(MEMORY.fileno(), 8, tstate + o["tstate_frame"]), "little")
        if o["cframe_current_frame"] is not None and frame:
            frame = int.from_bytes(os.pread(MEMORY.fileno(), 8, frame + o["cframe_current_frame"]), "little")
        yield frame, sys._getframe().f_code

    frame, code = next(generator())
    if frame:
        c.expect("generator frame: code", frame_code(o, frame), id(code))
        c.expect("generator frame: owner", u8(frame + o["frame_owner"]), FRAME_OWNED_BY_GENERATOR)
    else:
        c.require("generator frame: found a top frame", False)


def check_interpreters(c):
    """_PyRuntime.interpreters.head must be the main interpreter, and then a new subinterpreter while one
    exists: with a single interpreter, interpreters.main (the next field) holds the same pointer."""
    o = c.o
    main = API.PyInterpreterState_Main()
    head = runtime_address() + o["runtime_interpreters_head"]
    c.expect("_PyRuntime.interpreters.head, one interpreter", ptr(head), main)
    try:
        import _xxsubinterpreters as subinterpreters  # 3.8-3.12
    except ImportError:
        import _interpreters as subinterpreters  # 3.13
    sub = subinterpreters.create()
    try:
        newest = ptr(head)
        c.require("_PyRuntime.interpreters.head, with a subinterpreter: %#x is neither NULL nor the main one"
                  % newest, newest not in (0, main))
        # Where the new interpreter keeps a thread state (3.8-3.11 do), it must name that interpreter.
        tstate = ptr(newest + o["interp_threads_head"]) if newest not in (0, main) else 0
        if tstate:
            c.expect("subinterpreter's tstate: interp", ptr(tstate + o["tstate_interp"]), newest)
    finally:
        subinterpreters.destroy(sub)
    c.expect("_PyRuntime.interpreters.head, subinterpreter destroyed", ptr(head), main)


def parked(lock, started):
    started.set()
    lock.acquire()  # blocks in C until the checks are done: this thread's frames stay put


def check_threads(c):
    """Walk _PyRuntime -> interpreters.head -> threads.head -> next..., and another thread's frames."""
    o = c.o
    lock = threading.Lock()
    lock.acquire()
    started = threading.Event()
    helper = threading.Thread(target=parked, args=(lock, started), name="offsets-parked")
    helper.start()
    try:
        started.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            frame = sys._current_frames().get(helper.ident)
            if frame is not None and frame.f_code is parked.__code__:
                break
            time.sleep(0.01)
        # Between reaching parked() and blocking inside lock.acquire() it runs no more bytecode than the call.
        time.sleep(0.2)

        interp = ptr(runtime_address() + o["runtime_interpreters_head"])
        thread_ids = {}
        tstate = ptr(interp + o["interp_threads_head"]) if interp else 0
        for _ in range(MAX_THREADS):
            if not tstate:
                break
            c.expect("tstate %#x: interp" % tstate, ptr(tstate + o["tstate_interp"]), interp)
            thread_ids[u64(tstate + o["tstate_thread_id"])] = tstate
            tstate = ptr(tstate + o["tstate_next"])
        else:
            c.require("the thread list ends within %d entries" % MAX_THREADS, False)
        me = API.PyThreadState_Get()
        c.expect("this thread's tstate in the interpreter's list", thread_ids.get(threading.get_ident()), me)
        c.require("the parked thread's tstate in the interpreter's list (ids %s, want %d)"
                  % (sorted(thread_ids), helper.ident), helper.ident in thread_ids)
        if helper.ident in thread_ids:
            native = native_chain(o, top_frame_of(o, thread_ids[helper.ident]))
            py = python_chain(sys._current_frames()[helper.ident])
            compare_stacks(c, "parked thread", native, py, False)
    finally:
        lock.release()
        helper.join()


SAMPLE_SOURCE = "\n" * 4241 + (
    "class Outer:\n"
    "    def method(self):\n"
    "        def inner(a, b, c, *args, **kwargs):\n"
    "            return [a, b, c, args, kwargs]\n"
    "        return inner\n"
)


def check_code(c, code):
    o = c.o
    base = id(code)
    label = "code %s" % code.co_name
    c.expect(label + ": co_filename", ptr(base + o["code_filename"]), id(code.co_filename))
    c.expect(label + ": co_name", ptr(base + o["code_name"]), id(code.co_name))
    if sys.version_info[:2] >= (3, 11):
        c.expect(label + ": co_qualname", ptr(base + o["code_qualname"]), id(code.co_qualname))
    else:
        c.expect(label + ": no co_qualname before 3.11", o["code_qualname"], None)
    c.expect(label + ": co_firstlineno", i32(base + o["code_firstlineno"]), code.co_firstlineno)
    table = code.co_lnotab if sys.version_info[:2] < (3, 10) else code.co_linetable
    table_address = ptr(base + o["code_linetable"])
    c.expect(label + ": line table object", table_address, id(table))
    if table_address == id(table):
        c.expect(label + ": line table ob_size", i64(table_address + o["bytes_size"]), len(table))
        c.expect(label + ": line table ob_sval", read(table_address + o["bytes_data"], len(table)), table)
    if o["code_code_adaptive"] is None:
        c.require(label + ": co_code_adaptive only from 3.11", sys.version_info[:2] < (3, 11))
        return
    # Only for code never run: quickening may rewrite opcodes and fill caches, but a fresh code object keeps
    # its first and last code units (RESUME, RETURN_VALUE) and every oparg outside the caches (CACHE is 0).
    raw = read(base + o["code_code_adaptive"], len(code.co_code))
    plain = code.co_code
    c.expect(label + ": co_code_adaptive first code unit", raw[:2], plain[:2])
    c.expect(label + ": co_code_adaptive last code unit", raw[-2:], plain[-2:])
    c.expect(
        label + ": co_code_adaptive opargs",
        [raw[i + 1] for i in range(0, len(plain), 2) if plain[i] != 0],
        [plain[i + 1] for i in range(0, len(plain), 2) if plain[i] != 0],
    )


def check_codes(c):
    module = compile(SAMPLE_SOURCE, "offsets-sample.py", "exec")
    outer = next(k for k in module.co_consts if hasattr(k, "co_code"))
    method = next(k for k in outer.co_consts if hasattr(k, "co_code"))
    inner = next(k for k in method.co_consts if hasattr(k, "co_code"))
    for code in (module, outer, method, inner):
        check_code(c, code)
    c.expect("sample: co_firstlineno", inner.co_firstlineno, 4244)


def check_strings(c):
    o = c.o
    # Made at run time, so none is interned or shared with a constant.
    cases = (
        ("ascii", "".join(["offsets", "-check"]), 1, True, "ascii"),
        ("latin-1", "".join(["d\u00e9j\u00e0", "-vu"]), 1, False, "latin-1"),
        ("UCS-2", "".join(["\u1e9e", "tra\u00dfe"]), 2, False, "utf-16-le"),
        ("UCS-4", "".join(["\U0001f600", "!"]), 4, False, "utf-32-le"),
    )
    for label, text, kind, ascii, encoding in cases:
        base = id(text)
        state = u8(base + o["unicode_state"])
        # state bit-fields, low to high in 3.8-3.13: interned:2, kind:3, compact:1, ascii:1
        c.expect("%s string: state.kind" % label, (state >> 2) & 7, kind)
        c.expect("%s string: state.compact" % label, (state >> 5) & 1, 1)
        c.expect("%s string: state.ascii" % label, (state >> 6) & 1, int(ascii))
        c.expect("%s string: state.interned" % label, state & 3, 0)
        c.expect("%s string: length" % label, i64(base + o["unicode_length"]), len(text))
        data = base + (o["unicode_ascii_data"] if ascii else o["unicode_compact_data"])
        encoded = text.encode(encoding)
        c.expect("%s string: data" % label, read(data, len(encoded) + kind), encoded + b"\0" * kind)
    interned = sys.intern("".join(["offsets", "-interned"]))
    c.require("interned string: state.interned", u8(id(interned) + o["unicode_state"]) & 3 != 0)


def check_bytes(c):
    o = c.o
    value = bytes(range(256)) * 3 + b"tail"
    c.expect("bytes: ob_size", i64(id(value) + o["bytes_size"]), len(value))
    c.expect("bytes: ob_sval", read(id(value) + o["bytes_data"], len(value) + 1), value + b"\0")


def read_debug_offsets():
    """3.13's _Py_DebugOffsets, from the start of _PyRuntime: (raw bytes, {"section.member": value})."""
    words = sum(max(1, len(section) - 1) for section in DEBUG_OFFSETS_3_13)
    raw = read(runtime_address(), 8 * words)
    values = {}
    index = 0
    for section in DEBUG_OFFSETS_3_13:
        members = section[1:] or ("",)
        for member in members:
            name = section[0] + ("." + member if member else "")
            values[name] = int.from_bytes(raw[8 * index:8 * index + 8], "little")
            index += 1
    return raw, values


def check_debug_offsets(c):
    """The offsets given must be those CPython publishes in _Py_DebugOffsets (the Rust parser's output)."""
    o = c.o
    raw, d = read_debug_offsets()
    c.expect("_Py_DebugOffsets cookie", raw[:8], b"xdebugpy")
    c.expect("_Py_DebugOffsets version", d["version"] >> 16, (sys.version_info[0] << 8) | sys.version_info[1])
    c.expect("_Py_DebugOffsets free_threaded", d["free_threaded"], 0)
    published = {
        "runtime_interpreters_head": d["runtime_state.interpreters_head"],
        "interp_threads_head": d["interpreter_state.threads_head"],
        "tstate_next": d["thread_state.next"],
        "tstate_interp": d["thread_state.interp"],
        "tstate_thread_id": d["thread_state.thread_id"],
        "tstate_frame": d["thread_state.current_frame"],
        "frame_back": d["interpreter_frame.previous"],
        "frame_code": d["interpreter_frame.executable"],
        "frame_instr": d["interpreter_frame.instr_ptr"],
        "frame_owner": d["interpreter_frame.owner"],
        "code_filename": d["code_object.filename"],
        "code_name": d["code_object.name"],
        "code_qualname": d["code_object.qualname"],
        "code_firstlineno": d["code_object.firstlineno"],
        "code_linetable": d["code_object.linetable"],
        "code_code_adaptive": d["code_object.co_code_adaptive"],
        "unicode_state": d["unicode_object.state"],
        "unicode_length": d["unicode_object.length"],
        "unicode_ascii_data": d["unicode_object.asciiobject_size"],
        "bytes_size": d["bytes_object.ob_size"],
        "bytes_data": d["bytes_object.ob_sval"],
    }
    for field, value in published.items():
        c.expect("_Py_DebugOffsets vs given %s" % field, o[field], value)
    c.expect("no _PyCFrame in 3.13", o["cframe_current_frame"], None)
    c.expect("3.13 instr_ptr is a pointer", o["frame_instr_is_pointer"], True)


def run_checks(document):
    want = tuple(document.get("version", ()))
    have = tuple(sys.version_info[:2])
    if want != have:
        sys.exit("offsets_check: offsets for CPython %s given to CPython %s (%s)"
                 % (".".join(map(str, want)), ".".join(map(str, have)), sys.executable))
    offsets = document.get("offsets", {})
    missing = [f for f in FIELDS if f not in offsets]
    unknown = [f for f in offsets if f not in FIELDS]
    if missing or unknown:
        sys.exit("offsets_check: fields missing %s, unknown %s" % (missing, unknown))
    shape = {
        "cframe_current_frame": (3, 11) <= have < VERSION_3_13,
        "frame_owner": have >= (3, 11),
        "code_qualname": have >= (3, 11),
        "code_code_adaptive": have >= (3, 11),
    }
    wrong = ["%s should be %s" % (f, "a number" if present else "null")
             for f, present in shape.items() if (offsets[f] is not None) != present]
    wrong += ["%s should be a number, not %r" % (f, offsets[f]) for f in FIELDS
              if f not in shape and f != "frame_instr_is_pointer"
              and not (type(offsets[f]) is int and offsets[f] >= 0)]
    if offsets["frame_instr_is_pointer"] != (have >= (3, 11)):
        wrong.append("frame_instr_is_pointer should be %s" % (have >= (3, 11)))
    if wrong:
        sys.exit("offsets_check: on CPython %d.%d %s" % (have + ("; ".join(wrong),)))
    c = Checker(offsets)
    checks = [check_own_stack, check_generator_owner, check_interpreters, check_threads, check_codes, check_strings, check_bytes]
    if have >= VERSION_3_13:
        checks.append(check_debug_offsets)
    for check in checks:
        try:
            check(c)
        except (Unreadable, OSError, OverflowError) as error:
            # A wrong offset led to a wild pointer: that check cannot go on, the others still run.
            c.failures.append("%s: %s" % (check.__name__, error))
    where = "CPython %s (%s)" % (sys.version.split()[0], sys.executable)
    if c.failures:
        print("offsets_check: %d mismatches on %s:" % (len(c.failures), where), file=sys.stderr)
        for failure in c.failures:
            print("  " + failure, file=sys.stderr)
        sys.exit(1)
    print("offsets_check: %d checks passed on %s" % (c.passed, where))


def main():
    args = sys.argv[1:]
    if args[:1] == ["--dump-debug-offsets"] and len(args) == 2:
        if sys.version_info[:2] != VERSION_3_13:
            sys.exit("offsets_check: only 3.13's _Py_DebugOffsets layout is known")
        raw, _ = read_debug_offsets()
        if args[1] == "-":
            sys.stdout.buffer.write(raw)
        else:
            with open(args[1], "wb") as out:
                out.write(raw)
        return
    if len(args) > 1:
        sys.exit(__doc__)
    run_checks(json.loads(args[0] if args else sys.stdin.read()))


if __name__ == "__main__":
    main()
