"""``python -m bench``: run every benchmark module listed in BENCHMARKS, one after the other.

Colleagues add lab benchmarks by appending their module name; each module exposes ``main(argv)``.
``python -m bench NAME [args]`` runs only the named one.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = ["bench.hbone_loopback", "bench.lab_bench"]


def main(argv: list[str]) -> int:
    selected = [m for m in BENCHMARKS if argv and m.rsplit(".", 1)[-1] == argv[0]]
    modules, rest = (selected, argv[1:]) if selected else (BENCHMARKS, argv)
    status = 0
    for name in modules:
        print(f"== {name}", flush=True)
        status |= int(importlib.import_module(name).main(rest) or 0)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
