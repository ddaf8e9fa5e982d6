#!/usr/bin/env python3
"""What a killable job costs against a thread: the round trip, and the corpus's real jobs.

    python bench/jobs.py

One worker process (as each serving process has by default). Reports the CPU time of the whole
process tree (this process, the fork server and the worker) per job, in ms:
- a job that does nothing with arguments of 20 KB, 500 KB and 2 MB;
- the parse of every corpus message, in a thread and in the worker;
- the attachment analysis of the corpus messages that carry files, in a thread and in the
  worker (what `AttachmentsCheck` does with them).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.run import ensure_corpus, tree_cpu_s  # noqa: E402
from gateway.attachments import YARA, Policy, analyse, analyse_job  # noqa: E402
from gateway.config import DEFAULT_RULES_DIR  # noqa: E402
from gateway.message import parse_message  # noqa: E402
from gateway.workers import Workers  # noqa: E402
from gateway.yara_rules import compile_rules  # noqa: E402


def nothing(data: bytes) -> int:
    return len(data)


async def per_job(label: str, jobs: list[Callable[[], Awaitable[object]]]) -> None:
    import os
    for job in jobs[:3]:  # warm up
        await job()
    cpu, wall = tree_cpu_s(os.getpid()), time.perf_counter()
    for job in jobs:
        await job()
    n = len(jobs)
    print(f"| {label} | {n} | {(tree_cpu_s(os.getpid()) - cpu) / n * 1000:.2f} | "
          f"{(time.perf_counter() - wall) / n * 1000:.2f} |")


async def main() -> None:
    corpus = ensure_corpus(500)
    raws = [p.read_bytes() for p in sorted(corpus.glob("msg-*.eml"))]
    workers = Workers(processes=1)
    rules = compile_rules([DEFAULT_RULES_DIR / "yara"])
    workers.provide(YARA, rules)
    policy = Policy.load(DEFAULT_RULES_DIR / "attachments.toml")
    parsed = [parse_message(r) for r in raws]
    files = [(r, p) for r, p in zip(raws, parsed, strict=True) if p.has_files]
    print("| job | jobs | CPU ms/job (process tree) | wall ms/job |\n|---|---|---|---|")
    try:
        for size in (20_000, 500_000, 2_000_000):
            data = b"x" * size
            await per_job(f"nothing, {size // 1000} KB, worker", [
                lambda d=data: workers.run_killable(nothing, d, limit_s=30)] * 200)
        await per_job("parse, thread", [
            lambda r=r: workers.run(parse_message, r, limit_s=30) for r in raws])
        await per_job("parse, worker", [
            lambda r=r: workers.run_killable(parse_message, r, limit_s=30) for r in raws])
        await per_job("attachments (messages with files), thread", [
            lambda r=r, p=p: workers.run(analyse, r, p, policy, rules, limit_s=30)
            for r, p in files])
        await per_job("attachments (messages with files), worker", [
            lambda r=r, p=p: workers.run_killable(analyse_job, r, p, policy, limit_s=30)
            for r, p in files])
    finally:
        workers.close()


if __name__ == "__main__":
    asyncio.run(main())
