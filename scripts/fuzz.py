"""The full fuzz run: many more generated cases than CI's quick subset, with a seed of your
choice, and a table of outcomes per family and command.

    python scripts/fuzz.py [--seed N] [--per-family 200] [--family prototxt ...] [--keep DIR]

Exit code 1 when any case ends in a traceback, crash, hang, usage error or damaged file, or in
success where the input had to be refused; each such case is listed with its seed and name so it
can be repeated (tests/fuzz/cases.py builds the same case from the same seed).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fuzz.cases import FAMILIES, generate, run_case  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--per-family", type=int, default=200)
    parser.add_argument("--family", action="append", choices=sorted(FAMILIES))
    parser.add_argument("--keep", type=Path, default=None, help="Keep each case's folder here.")
    args = parser.parse_args()
    families = args.family or list(FAMILIES)
    cases = generate(args.seed, {f: args.per_family for f in families})
    table: dict[tuple[str, str], Counter] = defaultdict(Counter)
    failures = []
    with tempfile.TemporaryDirectory() as scratch:
        base = args.keep or Path(scratch)
        for i, case in enumerate(cases):
            folder = base / f"{i:05d}-{case.family}-{case.name}"
            outcome, allowed = run_case(case, folder)
            command = case.setup.__name__ if False else _command(folder, case)
            table[(case.family, command)][outcome.kind] += 1
            if not allowed:
                failures.append((case, outcome))
    kinds = ["ok", "error", "usage", "traceback", "crash", "hang", "damaged"]
    print(f"seed {args.seed}, {len(cases)} cases")
    print(f"{'family':16s} {'command':20s} " + " ".join(f"{k:>9s}" for k in kinds))
    for (family, command), counts in sorted(table.items()):
        print(f"{family:16s} {command:20s} " + " ".join(f"{counts[k]:9d}" for k in kinds))
    for case, outcome in failures:
        print(f"FAIL {case.family}/{case.name} (seed {args.seed}): {outcome.kind}: "
              f"{outcome.detail}")  # fmt: skip
    print(f"{len(failures)} failed, {len(cases) - len(failures)} passed")
    return 1 if failures else 0


def _command(folder: Path, case) -> str:
    return getattr(case, "command", "") or case.name.rsplit("-", 1)[0]


if __name__ == "__main__":
    sys.exit(main())
