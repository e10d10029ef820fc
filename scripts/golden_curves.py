"""Regenerate the golden loss curves in tests/golden/ (one fixed-seed tiny CPU run per task), or check them.

    python scripts/golden_curves.py                 # rerun every task and overwrite tests/golden/<task>.json
    python scripts/golden_curves.py --check         # rerun and compare, write nothing (exit 1 on a difference)
    python scripts/golden_curves.py --tasks lm mt   # only these tasks

Regenerate only after a change that is meant to alter the numerics, and say so in the commit.
"""

import argparse
import logging
import sys
import warnings
from pathlib import Path

# The curves and their code are test support under tests/golden/, not part of the package: import them as the tests
# do, with tests/ on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from golden.curves import RUNS, compare, read_golden, run_curve, write_golden  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", choices=list(RUNS), default=list(RUNS))
    p.add_argument("--check", action="store_true", help="compare with the stored curves instead of writing them")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", module="lightning")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # keep the output to one line per task
    failed = False
    for task in args.tasks:
        losses = run_curve(task)
        if args.check:
            problem = compare(task, losses, read_golden(task))
            failed |= problem is not None
            print(problem or f"{task}: matches ({len(losses)} steps, last loss {losses[-1]:.6f})")
        else:
            print(f"{task}: wrote {write_golden(task, losses)} ({len(losses)} steps, last loss {losses[-1]:.6f})")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
