#!/usr/bin/env python3
"""Self instructions per request by crate: two callgrind profiles, side by side.

    callgrind_crates.py NAME_A FILE_A REQUESTS_A NAME_B FILE_B REQUESTS_B

Each instruction is charged to the crate of the source file it came from, inlined code
included (callgrind's `fi=`/`fe=` records), so a `HeaderMap` method inlined into one of our
layers counts for `http`, not for us. `core` and `alloc` are the exception: their helpers
inlined into another crate's function (a move, an `Option::map`, an integer rotate in
SHA-256's rounds) count for the crate the function is named after (`hashbrown` for
`hashbrown::map::HashMap<K,V,S,A>::insert`, ours for `<tower_gateway_auth::… as
Service>::call`), since that crate's code asked for them; only what stays in a function of
their own (`drop_in_place`, say) counts for `std:core`. glibc's code is charged to its
source file (`libc malloc`, `libc memmove`).

Needs line tables in the build (`debug = "line-tables-only"`); without them everything is
charged to the binary. Prints one row a crate: A's and B's instructions per request and
the difference, largest difference first.
"""
import os
import re
import sys
from collections import defaultdict

# A crates.io dependency, or one the standard library vendors (std's `HashMap` is hashbrown,
# its sources under /rust/deps/ in the toolchain's debug info).
REGISTRY = re.compile(r"/(?:registry/src/[^/]+|rust/deps)/([^/]+?)-\d+\.\d+\.\d+[^/]*/")
RUSTC = re.compile(r"/rustc/[0-9a-f]+/library/([^/]+)/")
# glibc's sources are named relative to its build tree:
# ./string/../sysdeps/x86_64/multiarch/memmove-vec-unaligned-erms.S, ./malloc/./malloc/malloc.c
GLIBC = re.compile(r"^\./(?:[^/]+/)*?(?:\.\./sysdeps/.*/)?([a-z_]+?)(?:-[a-z0-9-]+)?\.[cS]$")
STD = ("std:core", "std:alloc")
# This checkout: only its own files are ours (a git dependency's `src/` is not).
ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__))) + "/"
EXAMPLES = ("gateway", "hello", "sse_load", "keygen")


def crate_of_file(path, obj):
    if path in (None, "???"):
        return obj.rsplit("/", 1)[-1] if obj else "???"
    m = GLIBC.match(path)
    if m:
        return "libc " + m.group(1)
    m = REGISTRY.search(path)
    if m:
        return m.group(1)
    m = RUSTC.search(path)
    if m:
        return "std:" + m.group(1)
    for part, name in (("examples/", "examples"), ("benches/", "benches"), ("src/", "tower-gateway-auth")):
        if path.startswith(ROOT + part):
            return name
    return path


def crate_of_function(name):
    """The crate a (demangled) function is named after: `<T as Trait>::f` is T's, unless T
    is a type parameter, then the trait's."""
    name = name.lstrip("<")
    first = name.split("::", 1)[0]
    if not re.fullmatch(r"[a-z][a-z0-9_]*", first) and " as " in name:
        first = name.split(" as ", 1)[1].split("::", 1)[0]
    if first in ("core", "alloc", "std"):
        return "std:" + first
    if first in EXAMPLES:
        return "examples"
    return first.replace("_", "-")


def self_cost_by_crate(file_name):
    """Sums the first event (Ir) of every self-cost line, by crate."""
    tables = {"fl": {}, "ob": {}, "fn": {}}
    totals = defaultdict(int)
    obj = file_ = fl_file = None
    fn_crate = None
    skip_next = False  # the cost line after `calls=` is the call's inclusive cost

    def resolve(table, rest):
        # "(id) name" defines an id, "(id)" refers to one
        m = re.match(r"\((\d+)\)(?: (.*))?", rest)
        if not m:
            return rest
        if m.group(2) is not None:
            tables[table][m.group(1)] = m.group(2)
        return tables[table].get(m.group(1), "???")

    with open(file_name, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            if line[0].isdigit() or line[0] in "+-*":
                if skip_next:
                    skip_next = False
                    continue
                parts = line.split()
                if len(parts) >= 2 and parts[1].isdigit():
                    crate = crate_of_file(file_, obj)
                    if crate in STD and fn_crate not in STD + (None, "???"):
                        crate = fn_crate
                    totals[crate] += int(parts[1])
                continue
            key, _, rest = line.partition("=")
            if key == "ob":
                obj = resolve("ob", rest)
            elif key == "fl":
                file_ = fl_file = resolve("fl", rest)
            elif key in ("fi", "fe"):  # inlined code, until the next fi/fe or fn
                file_ = resolve("fl", rest)
            elif key == "fn":
                file_ = fl_file
                fn_crate = crate_of_function(resolve("fn", rest))
            elif key in ("cfi", "cfl"):
                resolve("fl", rest)
            elif key == "cob":
                resolve("ob", rest)
            elif key == "cfn":
                resolve("fn", rest)
            elif key == "calls":
                skip_next = True
    return totals


def main():
    if len(sys.argv) != 7:
        sys.exit(__doc__)
    name_a, file_a, n_a, name_b, file_b, n_b = sys.argv[1:]
    a = self_cost_by_crate(file_a)
    b = self_cost_by_crate(file_b)
    n_a, n_b = int(n_a), int(n_b)
    rows = []
    for crate in set(a) | set(b):
        pa, pb = a.get(crate, 0) / n_a, b.get(crate, 0) / n_b
        rows.append((pa - pb, crate, pa, pb))
    rows.sort(reverse=True)
    print(f"{'crate':<28}{name_a:>12}{name_b:>12}{'difference':>12}")
    for diff, crate, pa, pb in rows:
        if abs(diff) >= 20 or pa >= 200:
            print(f"{crate:<28}{pa:>12,.0f}{pb:>12,.0f}{diff:>12,.0f}")
    ta, tb = sum(a.values()) / n_a, sum(b.values()) / n_b
    print(f"{'all':<28}{ta:>12,.0f}{tb:>12,.0f}{ta - tb:>12,.0f}")


if __name__ == "__main__":
    main()
