"""The worker processes of killable jobs: what happens when one dies, overruns its memory, or
outlives the process that serves mail. The jobs are standard-library functions (os.getpid,
os.kill, bytearray, time.sleep): picklable by name, so nothing of the test is run there."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from gateway.errors import ScanTimeout, WorkerCrashed
from gateway.workers import Workers

ROOT = Path(__file__).resolve().parent.parent


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _sleeping(pid: int) -> bool:
    """The main thread of `pid` is in time.sleep (the kernel's nanosleep)."""
    try:
        return "nanosleep" in Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return False


def _wait_gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.02)
    return False


@pytest_asyncio.fixture
async def worker() -> AsyncIterator[tuple[Workers, int]]:
    """One worker process (memory limited to 512 MB), and its PID, found by a first job."""
    workers = Workers(processes=1, memory_mb=512)
    try:
        yield workers, await workers.run_killable(os.getpid, limit_s=30)
    finally:
        workers.close()


async def test_a_job_that_kills_its_worker_gives_worker_crashed_and_the_next_job_runs(
        worker: tuple[Workers, int]):
    workers, pid = worker
    assert pid != os.getpid()
    with pytest.raises(WorkerCrashed, match="died"):
        await workers.run_killable(os.kill, pid, signal.SIGKILL, limit_s=30)
    assert _wait_gone(pid, 10)
    assert await workers.run_killable(os.getpid, limit_s=30) != pid  # a new process
    # A large argument (sent beside the pickle) arrives whole.
    assert await workers.run_killable(len, b"x" * 3_000_000, limit_s=30) == 3_000_000


async def test_a_worker_killed_while_idle_is_replaced_before_the_next_job(
        worker: tuple[Workers, int]):
    """Killed between two jobs (the kernel's out-of-memory killer): the next job is not lost
    with it, at once or a moment later."""
    workers, pid = worker
    os.kill(pid, signal.SIGKILL)
    assert await workers.run_killable(os.getpid, limit_s=30) != pid
    again = await workers.run_killable(os.getpid, limit_s=30)
    assert _wait_gone(pid, 10)
    os.kill(again, signal.SIGKILL)
    assert _wait_gone(again, 10)
    assert await workers.run_killable(len, b"x" * 100_000, limit_s=30) == 100_000


async def test_a_job_past_its_memory_limit_fails_alone_and_its_worker_is_replaced(
        worker: tuple[Workers, int]):
    workers, pid = worker
    with pytest.raises(MemoryError):
        await workers.run_killable(bytearray, 1 << 30, limit_s=30)
    assert _wait_gone(pid, 10)  # not reused after a MemoryError
    assert await workers.run_killable(os.getpid, limit_s=30) != pid


@pytest.mark.promise("timeouts-fail-closed")
async def test_a_job_past_its_limit_is_killed_and_a_waiting_job_gets_the_slot(
        worker: tuple[Workers, int]):
    workers, pid = worker
    slow = asyncio.create_task(workers.run_killable(time.sleep, 3600, limit_s=0.5))
    await asyncio.sleep(0)  # the slow job takes the only slot first
    waiting = asyncio.create_task(workers.run_killable(os.getpid, limit_s=5))
    with pytest.raises(ScanTimeout, match="stopped"):
        await slow
    assert await waiting != pid
    assert _wait_gone(pid, 10)


async def test_a_cancelled_job_stops_its_worker(worker: tuple[Workers, int]):
    workers, pid = worker
    job = asyncio.create_task(workers.run_killable(time.sleep, 3600, limit_s=3600))
    async with asyncio.timeout(10):
        while not _sleeping(pid):  # until the job runs in the worker
            await asyncio.sleep(0.01)
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert _wait_gone(pid, 10)
    assert await workers.run_killable(os.getpid, limit_s=30) != pid


async def test_a_job_that_raises_gives_its_exception_and_keeps_the_worker(
        worker: tuple[Workers, int]):
    workers, pid = worker
    with pytest.raises(ValueError):
        await workers.run_killable(int, "pas un nombre", limit_s=30)
    assert await workers.run_killable(os.getpid, limit_s=30) == pid


SERVING = """
import asyncio, os, sys
from gateway.workers import Workers
from tests.support.jobs import hold_the_gil

async def main():
    workers = Workers(processes=1)
    pid = await workers.run_killable(os.getpid, limit_s=60)
    job = asyncio.create_task(workers.run_killable(hold_the_gil, 3600, limit_s=3600))
    while "nanosleep" not in open(f"/proc/{pid}/wchan").read():
        await asyncio.sleep(0.01)
    print(pid, flush=True)
    await job

asyncio.run(main())
"""


def test_a_serving_process_that_dies_mid_job_leaves_no_worker_behind():
    """A crashed serving process must not leave a runaway job holding a core, even one in C
    code holding the GIL (no Python code of the worker can run): the kernel kills the
    worker when its fork server exits, which it does once the serving process is gone."""
    with subprocess.Popen([sys.executable, "-c", SERVING], cwd=ROOT, stdout=subprocess.PIPE,
                          text=True) as proc:
        try:
            assert proc.stdout is not None
            worker = int(proc.stdout.readline())
            assert _alive(worker)
        finally:
            proc.kill()
            proc.wait(10)
    assert _wait_gone(worker, 10), "the worker outlived its serving process"
