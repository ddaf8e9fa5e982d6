"""The mutation sample run by CI (`make mutation-sample`): the functions that carry the
promises of docs/promises.md, mutated by mutmut, each mutant run against the promise tests
(`pytest -m promise`). Every mutant must be killed: a survivor means a promise can be broken
by a one-line change without its tests noticing, and the run fails, naming it.

The full run (`make mutation`, hours) mutates whole modules against the whole suite; this
sample keeps CI within 10 minutes (TotpGuard.verify, whose 41 mutants each run the web
page's login tests for seconds, is left to the full run). It works in a copy of the
checkout, so the full run's results in `mutants/` are left alone.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# mutmut mutant-name globs: the function, the promise it carries.
SAMPLE = {
    "quarantine.files.x_fsync_dir*": "durable-before-250 (the folder synced)",
    "gateway.web.security.x_same_token*": "web-csrf-origin",
    "gateway.checks.outbound_health.x_secure_recipient*": "outbound-health-held",
    "gateway.checks.outbound_health.x__encrypted_part*": "outbound-health-held",
    "gateway.banner.x__is_protected*": "banner-protected",
    "gateway.auth.dmarc.x_undecided*": "dns-trouble-451",
    "gateway.relay.x_wire_lines*": "no-smuggling",
}
# The promises those functions carry: only their tests run (tests/conftest.py reads
# GATEWAY_PROMISES), so the traced and clean runs of mutmut cost what the sample needs.
PROMISES = ("durable-before-250", "web-csrf-origin", "mssante-boundary", "outbound-health-held",
            "banner-protected", "dns-trouble-451", "dmarc-reject-550", "no-smuggling")


def _copy_checkout(dest: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=ROOT, capture_output=True,
                            check=False)
    if listed.returncode == 0:
        for name in listed.stdout.decode().split("\0"):
            if name and (ROOT / name).is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, dest / name)
        return
    for name in ("pyproject.toml", "gateway", "quarantine", "tests", "rules", "docs", "bench",
                 "docker", "README.md", "Makefile"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.is_file():
            shutil.copy2(src, dest / name)


def main() -> int:
    mutmut = Path(sys.executable).parent / "mutmut"
    env = dict(os.environ, PYTEST_ADDOPTS="-m promise -p no:randomly -p no:cacheprovider",
               GATEWAY_PROMISES=",".join(PROMISES))
    env.setdefault("GATEWAY_CORPUS", str(ROOT.parent / "shared" / "corpus"))
    with tempfile.TemporaryDirectory(prefix="gw-mutation-") as tmp:
        work = Path(tmp)
        _copy_checkout(work)
        # mutmut's progress line is redrawn in place: kept out of CI's log.
        run = subprocess.run([str(mutmut), "run", *SAMPLE], cwd=work, env=env, check=False,
                             stdout=subprocess.DEVNULL)
        results = subprocess.run([str(mutmut), "results", "--all", "true"], cwd=work,
                                 env=env, capture_output=True, text=True, check=False)
        counts: dict[str, int] = {}
        survivors: list[str] = []
        for line in results.stdout.splitlines():
            m = re.match(r"\s*(\S+__mutmut_\d+): (.+)$", line)
            if not m or not any(_matches(m[1], glob) for glob in SAMPLE):
                continue
            counts[m[2]] = counts.get(m[2], 0) + 1
            if m[2] != "killed":
                survivors.append(m[1])
        print("mutation sample:", ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
        for name in survivors:
            shown = subprocess.run([str(mutmut), "show", name], cwd=work, env=env,
                                   capture_output=True, text=True, check=False)
            print(f"--- not killed: {name}\n{shown.stdout}")
        if run.returncode != 0 or not counts or survivors:
            print("mutation sample FAILED: a promise's function was changed and its tests "
                  "still passed (or mutmut could not run)", file=sys.stderr)
            return 1
    return 0


def _matches(name: str, glob: str) -> bool:
    return re.fullmatch(re.escape(glob).replace(r"\*", ".*"), name) is not None


if __name__ == "__main__":
    sys.exit(main())
