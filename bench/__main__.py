"""``python -m bench`` (``make bench``): a quick engines side by side (``side_by_side --quick``: all five
nets, batch 1 and 16, 3 rounds) and then every ``bench/bench_*.py`` module's ``main()`` in turn.

``python -m bench NAME`` runs only the benches whose name contains NAME (``side_by_side`` included);
``python -m bench --full`` runs the full side by side (5 rounds x 2 forwards, cold start + peak RSS,
ResNet-50 profile) instead of the quick one; ``python -m bench side_by_side [flags]`` runs only the
side by side with its own flags (see ``bench/side_by_side.py``)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

QUICK = ["--quick"]
FULL = ["--cold", "--profile"]


def main(argv: list[str]) -> int:
    here = Path(__file__).resolve().parent
    if argv and argv[0] == "side_by_side":  # engines side by side, with its own flags (see its docstring)
        from bench.side_by_side import main as side_by_side

        return side_by_side(argv[1:])
    full = "--full" in argv
    rest = [a for a in argv if a != "--full"]
    pattern = rest[0] if rest else ""
    failed = 0
    if not pattern or pattern in "side_by_side":
        from bench.side_by_side import main as side_by_side

        print(f"== side_by_side {' '.join(FULL if full else QUICK)}", flush=True)
        try:
            failed += side_by_side(FULL if full else QUICK) != 0
        except Exception as e:  # keep going: one broken bench must not hide the others
            failed += 1
            print(f"side_by_side failed: {type(e).__name__}: {e}", flush=True)
    for path in sorted(here.glob("bench_*.py")):
        if pattern and pattern not in path.stem:
            continue
        print(f"== {path.stem}", flush=True)
        mod = importlib.import_module(f"bench.{path.stem}")
        argv0 = sys.argv
        sys.argv = [path.name]  # each bench's own defaults, not this command's pattern
        try:
            mod.main()
        except Exception as e:  # keep going: one broken bench must not hide the others
            failed += 1
            print(f"{path.stem} failed: {type(e).__name__}: {e}", flush=True)
        finally:
            sys.argv = argv0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
