"""The guest's python: the host's Debian python3.11, a trimmed stdlib compiled to
sourceless .pyc (:func:`_stage_python`), ``guest/`` beside it, and the shared libraries
they link (:func:`_shared_libraries`)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Iterable

from shim.errors import GuestImageError
from shim.guestimage.tools import _run

PYTHON = Path("/usr/bin/python3.11")
"""The host's Debian python, copied into the guest (never a pyenv or venv python)."""

PYTHON_PACKAGES = (
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libc6",
    "libffi8",
    "libexpat1",
    "zlib1g",
)
"""Packages whose versions identify the python that goes in (binary, stdlib, libraries)."""

GUEST_LIB = "/usr/lib/vmshim"

STDLIB_MODULES = (
    "encodings",
    "encodings.aliases",
    "encodings.utf_8",
    "encodings.utf_8_sig",
    "encodings.ascii",
    "encodings.latin_1",
    "encodings.idna",
    "encodings.raw_unicode_escape",
    "encodings.unicode_escape",
    "json",
    "ctypes",
    "selectors",
    "select",
    "signal",
    "struct",
    "socket",
    "fcntl",
    "termios",
    "pty",
    "tty",
    "errno",
    "os",
    "stat",
    "shutil",
    "subprocess",
    "pathlib",
    "dataclasses",
    "secrets",
    "hashlib",
    "base64",
    "binascii",
    "time",
    "traceback",
    "typing",
    "enum",
    "functools",
    "re",
    "collections",
    "threading",
    "queue",
    "tempfile",
    "io",
    "contextlib",
    "itertools",
    "operator",
    "copy",
    "string",
    "textwrap",
    "weakref",
    "heapq",
    "bisect",
    "random",
    "datetime",
    "glob",
    "fnmatch",
    "posixpath",
    "codecs",
    "warnings",
    "abc",
    "types",
    "ipaddress",
    "resource",
    "mmap",
    "tarfile",
    "shlex",
    "logging",
    "argparse",
    "uuid",
    "zlib",
    "gzip",
    "array",
)
"""Stdlib modules the agent may use even if the guest code does not import them yet; the
guest code's own imports are added with modulefinder."""

STDLIB_EXCLUDE = (
    "test",
    "tkinter",
    "_tkinter",
    "idlelib",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "distutils",
    "unittest",
    "pydoc",
    "doctest",
    "turtle",
    "turtledemo",
    "venv",
    "sqlite3",
    "_sqlite3",
    "curses",
    "_curses",
    "dbm",
    "xmlrpc",
    "wsgiref",
    "ssl",
    "_ssl",
    "_hashlib",
    "_bz2",
    "_lzma",
    "_decimal",
    "readline",
    "_dbm",
    "_gdbm",
    "email",
    "http",
    "urllib.request",
    "multiprocessing",
    "concurrent",
    "asyncio",
    "xml",
    "pyexpat",
    "html",
    "importlib.metadata",
    "importlib.resources",
    "pickle",
    "_pickle",
    "_pydecimal",
    "decimal",
    "statistics",
    "fractions",
    "zipfile",
    "csv",
    "pprint",
    "tracemalloc",
    "py_compile",
    "lib2to3",
    "_ctypes_test",
    "ctypes.test",
    "_uuid",
    "_testcapi",
    "_testinternalcapi",
    "_testbuffer",
)
"""Never shipped: test suites, GUI, network clients and modules that drag in big libraries
(libssl, libsqlite). The ones imported lazily (``hashlib`` → ``_hashlib``) degrade
gracefully; the build checks that every module above still imports without them."""

_LDD_LINE = re.compile(r"^\s*(?:(\S+)\s+=>\s+)?(/\S+)\s+\(0x[0-9a-f]+\)")


def _shared_libraries(binaries: Iterable[Path]) -> dict[str, Path]:
    """Guest path → host file for every shared library (and the loader) the binaries need."""
    out: dict[str, Path] = {}
    for binary in binaries:
        res = _run(["ldd", str(binary)])
        if res.returncode != 0:
            raise GuestImageError(f"ldd {binary} failed: {res.stderr.strip() or res.stdout.strip()}")
        for line in res.stdout.splitlines():
            m = _LDD_LINE.match(line)
            if not m:
                continue
            path = Path(m.group(2))
            guest = str(path.parent.resolve() / path.name)
            out[guest] = path.resolve()
    return out


_STAGE_SCRIPT = r"""
import importlib.util, json, modulefinder, os, py_compile, sys, sysconfig
args = json.loads(sys.argv[1])
stage, guest_src = args["stage"], args["guest_src"]
stdlib = sysconfig.get_path("stdlib")
dynload = next(p for p in sys.path if p.endswith("lib-dynload"))
guest_parent, pkg = os.path.split(guest_src.rstrip("/"))
mf = modulefinder.ModuleFinder(path=[guest_parent, stdlib, dynload], excludes=args["exclude"])
guest_files, guest_mods = [], []
for dirpath, dirs, files in os.walk(guest_src):
    dirs[:] = sorted(d for d in dirs if d != "__pycache__")
    for f in sorted(files):
        if f.endswith((".pyc", ".pyo")):
            continue
        rel = os.path.relpath(os.path.join(dirpath, f), guest_parent)
        guest_files.append(rel)
        if f.endswith(".py"):
            mod = rel[:-3].replace("/", ".")
            guest_mods.append(mod[:-len(".__init__")] if mod.endswith(".__init__") else mod)
for mod in guest_mods:
    mf.import_hook(mod)
for mod in args["fixed"]:
    try:
        mf.import_hook(mod)
    except ImportError:
        pass
stdlib_files, extensions = [], []
for name, m in sorted(mf.modules.items()):
    f = m.__file__
    if not f:
        continue
    if f.startswith(dynload + "/"):
        extensions.append(f)
    elif f.startswith(stdlib + "/") and f.endswith(".py"):
        rel = os.path.relpath(f, stdlib) + "c"
        py_compile.compile(f, cfile=os.path.join(stage, "stdlib", rel), dfile=f, doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
        stdlib_files.append(rel)
out_guest = []
for rel in guest_files:
    src = os.path.join(guest_parent, rel)
    dst = os.path.join(stage, "vmshim", rel)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(src, "rb") as i, open(dst, "wb") as o:
        o.write(i.read())
    out_guest.append(rel)
    if rel.endswith(".py"):
        pyc = importlib.util.cache_from_source(dst)
        py_compile.compile(src, cfile=pyc, dfile=args["guest_lib"] + "/" + rel, doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
        out_guest.append(os.path.relpath(pyc, os.path.join(stage, "vmshim")))
print(json.dumps({"version": sys.version.split()[0], "stdlib": stdlib, "dynload": dynload,
                  "stdlib_files": stdlib_files, "extensions": extensions,
                  "guest_files": out_guest, "guest_modules": guest_mods}))
"""

_CHECK_SCRIPT = r"""
import importlib, json, sys
args = json.loads(sys.argv[1])
sys.path[:] = args["path"]
bad = []
for mod in args["modules"]:
    try:
        importlib.import_module(mod)
    except Exception as exc:
        bad.append(f"{mod}: {type(exc).__name__}: {exc}")
print(json.dumps(bad))
"""


def _stage_python(stage: Path, guest_src: Path) -> dict:
    """Pick the stdlib modules (fixed list + what guest/ imports), compile them to sourceless
    .pyc under *stage*/stdlib, copy guest/ with .pyc under *stage*/vmshim, and check that
    everything imports from the trimmed stdlib alone. Runs in the target python so the
    bytecode matches it."""
    if not PYTHON.is_file():
        raise GuestImageError(f"{PYTHON} is missing; apt-get install python3.11-minimal (run scripts/setup)")
    fixed = [m for m in STDLIB_MODULES if m not in STDLIB_EXCLUDE]
    args = {
        "stage": str(stage),
        "guest_src": str(guest_src),
        "fixed": fixed,
        "exclude": list(STDLIB_EXCLUDE),
        "guest_lib": GUEST_LIB,
    }
    res = _run([str(PYTHON), "-S", "-c", _STAGE_SCRIPT, json.dumps(args)])
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise GuestImageError(f"compiling the guest's python failed: {tail}")
    info = json.loads(res.stdout)
    dyn_stage = stage / "dynload"
    dyn_stage.mkdir()
    for ext in info["extensions"]:
        shutil.copyfile(ext, dyn_stage / Path(ext).name)
    check = {
        "path": [str(stage / "vmshim"), str(stage / "stdlib"), str(dyn_stage)],
        "modules": info["guest_modules"] + fixed,
    }
    res = _run([str(PYTHON), "-S", "-c", _CHECK_SCRIPT, json.dumps(check)])
    bad = json.loads(res.stdout) if res.returncode == 0 else [res.stderr.strip()]
    if bad:
        raise GuestImageError(
            f"the trimmed guest stdlib cannot import {bad[0]} "
            "(add it to STDLIB_MODULES or drop it from STDLIB_EXCLUDE in shim/guestimage/python.py)"
        )
    shutil.rmtree(dyn_stage)
    return info
