"""`python -m bench <name> [options]`: the benchmarks' one entry point (run from a source checkout).

    python -m bench                       lists what there is to run
    python -m bench modes|scaling|peft|cold|tax [...]   a serving comparison over HTTP (bench/compare.py)
    python -m bench decode|kernels|packing|plots|... [...]   a benchmark module run as a program,
                                          exactly as `python -m bench.<name>` runs it

The benchmarks are not part of the installed package: the engine never
imports them, they import the engine.
"""

from __future__ import annotations

import ast
import runpy
import sys
from pathlib import Path

PROG = "python -m bench"
HERE = Path(__file__).resolve().parent


def programs() -> dict[str, str]:
    """Benchmark modules that run as programs (they have a `__main__` block): name -> summary line.
    Read from the source, so that listing them imports none of them."""
    found = {}
    for path in sorted(HERE.glob("*.py")):
        if path.stem.startswith("_") or path.stem == "compare":  # compare's programs are the comparisons
            continue
        tree = ast.parse(path.read_text(), str(path))
        if any(isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'" for node in tree.body):
            found[path.stem] = (ast.get_docstring(tree) or "").split("\n\n")[0].replace("\n", " ")
    return found


def usage() -> str:
    from bench.compare import comparisons

    lines = [f"usage: {PROG} <name> [options]   ({PROG} <name> --help for its options)", "",
             "serving comparisons (a local server over HTTP; bench/compare.py):"]
    lines += [f"  {name:<10} {mod.HELP}" for name, mod in comparisons().items()]
    lines += ["", "benchmark programs:"]
    lines += [f"  {name:<10} {summary}" for name, summary in programs().items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name in programs():
        sys.argv[1:] = rest
        # alter_sys: the module is __main__ while it runs, as under `python -m bench.<name>`, so that
        # processes it spawns find their functions.
        runpy.run_module(f"bench.{name}", run_name="__main__", alter_sys=True)
        return 0  # a module that fails raises or calls sys.exit with its own code
    from bench import compare

    if name in compare.comparisons():
        return compare.main([name, *rest], prog=PROG)
    print(f"{PROG}: unknown benchmark {name!r}\n\n{usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
