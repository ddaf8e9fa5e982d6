#!/usr/bin/env python3
"""Long fuzzing: the fuzz targets of tests/test_fuzz.py, round after round with fresh seeds.

    python bench/fuzz.py --minutes 10              # every target
    python bench/fuzz.py --minutes 60 -k smtp      # the SMTP session only
    python bench/fuzz.py --rounds 1 --examples 20000

Each round is one pytest run with GATEWAY_FUZZ_EXAMPLES examples per target and a new
`--hypothesis-seed`; rounds go on until the time is spent, and stop at the first failure, which
is printed with the command that replays it (the same seed: the failure, shrunk, comes back).
A single long run without this script: `GATEWAY_FUZZ_EXAMPLES=20000 .venv/bin/pytest
tests/test_fuzz.py`; without a seed, hypothesis keeps failing inputs in bench/out/fuzz-db and
tries them first on the next such run.
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {  # -k name: pytest -k expression
    "smtp": "test_smtp_session_fuzz",
    "mime": "test_mime_walk_random_bytes or test_mime_walk_mutated_messages",
    "words": "test_decode_words_raises_only_documented_errors",
    "banner": "test_banner_on_mutated_messages",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="time budget (default 10)")
    ap.add_argument("--rounds", type=int, default=0, help="stop after N rounds (0: time only)")
    ap.add_argument("--examples", type=int, default=1000,
                    help="examples per target and round (default 1000)")
    ap.add_argument("-k", dest="targets", action="append", choices=sorted(TARGETS),
                    help="target (repeatable; default all)")
    ap.add_argument("--seed", type=int, default=None, help="first round's seed (then +1)")
    args = ap.parse_args(argv)

    expr = " or ".join(TARGETS[t] for t in (args.targets or sorted(TARGETS)))
    python = ROOT / ".venv" / "bin" / "python"
    if not python.exists():
        python = Path(sys.executable)
    env = {**os.environ, "GATEWAY_FUZZ_EXAMPLES": str(args.examples)}
    deadline = time.monotonic() + args.minutes * 60
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    rounds = 0
    while True:
        rounds += 1
        cmd = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fuzz.py",
               "-k", expr, f"--hypothesis-seed={seed}"]
        print(f"round {rounds}: seed {seed}, {args.examples} examples per target", flush=True)
        t0 = time.monotonic()
        status = subprocess.run(cmd, cwd=ROOT, env=env).returncode
        print(f"round {rounds}: {'passed' if status == 0 else 'FAILED'} "
              f"in {time.monotonic() - t0:.0f} s", flush=True)
        if status != 0:
            print("\nreplay with:\n  " + " ".join([
                f"GATEWAY_FUZZ_EXAMPLES={args.examples}", ".venv/bin/pytest", "-q",
                "tests/test_fuzz.py", "-k", shlex.quote(expr), f"--hypothesis-seed={seed}"]))
            return status
        if (args.rounds and rounds >= args.rounds) or time.monotonic() >= deadline:
            print(f"{rounds} round(s) passed")
            return 0
        seed += 1


if __name__ == "__main__":
    sys.exit(main())
