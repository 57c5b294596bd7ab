"""Run every ``bench/bench_*.py`` module's ``main()`` in turn (``python -m bench [name-filter]``);
``python -m bench side_by_side [flags]`` runs the engines comparison (``bench/side_by_side.py``)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    here = Path(__file__).resolve().parent
    if argv and argv[0] == "side_by_side":  # engines side by side, with its own flags (see its docstring)
        from bench.side_by_side import main as side_by_side

        return side_by_side(argv[1:])
    pattern = argv[0] if argv else ""
    failed = 0
    for path in sorted(here.glob("bench_*.py")):
        if pattern and pattern not in path.stem:
            continue
        print(f"== {path.stem}", flush=True)
        mod = importlib.import_module(f"bench.{path.stem}")
        try:
            mod.main()
        except Exception as e:  # keep going: one broken bench must not hide the others
            failed += 1
            print(f"{path.stem} failed: {type(e).__name__}: {e}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
