#!/usr/bin/env python3
"""Benchmark: the gateway against the bare pass-through proxy, in the same run.

    python bench/run.py [-c 10] [--runs 3] [--workers 0] [--also-c 50] [--engines]

For each system (the bare aiosmtpd pass-through `../shared/bench/pyproxy.py` when present, and
the gateway with its structural checks), starts it in front of Postfix's `smtp-sink` on
loopback, sends the corpus at concurrency C with the load generator, and samples the RSS of its
whole process tree. Reports messages/s, p50/p99 latency (connect to final 250) and peak memory
(PSS of the process tree: what RSS means for several processes sharing pages) as a
Markdown table and JSON lines (bench/out/results.jsonl). The corpus is the shared reference one
(`../shared/bench/make_corpus.py -n 500`), else bench/corpus.py; the load generator is
`../shared/bench/smtpload.py`, else bench/load.py.

`--engines` also measures the gateway with ClamAV on, and with rspamd on, in the same run:
a real clamd (the signature database of tests/support/clamd.py: the official one cannot be
downloaded here) and a real rspamd with Redis (the configuration of docker/rspamd/), started
on loopback for the run. Their own memory is reported apart from the gateway's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from tests.support.dnsserver import ThreadedDnsServer  # noqa: E402

SHARED = ROOT.parent / "shared" / "bench"
OUT = HERE / "out"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process exited early: {proc.args}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} never opened: {proc.args}")


def tree_pids(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(k) for k in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue
    return out


def tree_cpu_s(pid: int) -> float:
    """CPU time (user + system) used so far by a process and its descendants, in seconds."""
    ticks = 0
    for p in tree_pids(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_memory_kb(pid: int) -> int:
    """Proportional set size (PSS) of a process and all its descendants, in KiB.

    PSS counts a page shared by n processes as 1/n in each, so the sum over a pre-forked tree is
    the memory it really holds (summing RSS would count shared pages once per process); for a
    single process it equals RSS less its share of shared libraries.
    """
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
            for task in Path(f"/proc/{p}/task").iterdir():
                kids = (task / "children").read_text().split()
                todo.extend(int(k) for k in kids)
        except (OSError, ValueError):
            continue
    return total


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_kb = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak_kb = max(self.peak_kb, tree_memory_kb(self.pid))
            self._stop_event.wait(0.05)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak_kb


@contextlib.contextmanager
def process(cmd: list[str], port: int, **kw: object) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, **kw)  # type: ignore[call-overload]
    try:
        wait_port(port, proc)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def ensure_corpus(n: int) -> Path:
    source = "shared" if (SHARED / "make_corpus.py").exists() else "own"
    corpus = OUT / f"corpus-{source}-{n}"
    if not (corpus / "manifest.json").exists():
        gen = SHARED / "make_corpus.py" if source == "shared" else HERE / "corpus.py"
        print(f"generating corpus with {gen} ...", file=sys.stderr)
        subprocess.run([sys.executable, str(gen), "-n", str(n), "-o", str(corpus)], check=True,
                       stdout=subprocess.DEVNULL)
    return corpus


def bench_zone(corpus: Path) -> dict[str, list[tuple[str, object]]]:
    """The corpus's DNS records (DKIM keys, SPF, DMARC, MX). The load comes from 127.0.0.1,
    which here stands for the senders' servers: each SPF record also authorises it."""
    zone: dict[str, list[tuple[str, object]]] = {}
    path = corpus / "dns-records.json"
    records = json.loads(path.read_text()) if path.exists() else []
    for name, rtype, value in records:
        if rtype == "TXT" and value.startswith("v=spf1 "):
            value = value.replace("v=spf1 ", "v=spf1 ip4:127.0.0.1 ", 1)
        if rtype == "MX":
            pref, host = value.split()
            value = (int(pref), host)
        zone.setdefault(name, []).append((rtype, value))
    return zone


def load(port: int, corpus: Path, concurrency: int, count: int) -> dict[str, object]:
    shared = SHARED / "smtpload.py"
    tool = shared if shared.exists() else HERE / "load.py"
    cmd = [sys.executable, str(tool), "--port", str(port), "-c", str(concurrency),
           "-n", str(count), "--corpus", str(corpus)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    result["load_tool"] = tool.name
    return result


def measure(name: str, cmd: list[str], port: int, corpus: Path, concurrency: int,
            count: int, cwd: Path | None = None) -> dict[str, object]:
    with process(cmd, port, cwd=cwd) as proc:
        load(port, corpus, concurrency, min(count, 20))  # warm-up: imports, first connections
        sampler = RssSampler(proc.pid)
        sampler.start()
        cpu = tree_cpu_s(proc.pid)
        result = load(port, corpus, concurrency, count)
        cpu = tree_cpu_s(proc.pid) - cpu
        result["peak_mem_mb"] = round(sampler.stop() / 1024, 1)
        result["cpu_ms_per_msg"] = round(1000 * cpu / max(1, int(result["ok"])), 2)  # type: ignore[call-overload]
    result["system"] = name
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-c", "--concurrency", type=int, default=10)
    ap.add_argument("-n", "--count", type=int, default=500, help="messages per measurement")
    ap.add_argument("--corpus-size", type=int, default=500)
    ap.add_argument("--runs", type=int, default=1, help="repeat and report medians")
    ap.add_argument("--workers", type=int, default=0, help="gateway serving processes (0 = cores)")
    ap.add_argument("--also-c", type=int, action="append", default=[],
                    help="extra concurrency levels to measure (e.g. 50)")
    ap.add_argument("--compare", metavar="REV", help="also run the gateway of this git "
                    "revision (a temporary worktree), alternating with this one in each run")
    ap.add_argument("--engines", action="store_true",
                    help="also the gateway with ClamAV on, and with rspamd on (started here)")
    ap.add_argument("--no-web", action="store_true",
                    help="gateway without its web page (served by one process by default)")
    args = ap.parse_args()

    sink_bin = shutil.which("smtp-sink")
    if not sink_bin:
        raise SystemExit("smtp-sink not found: install Debian's postfix (make bench does)")
    OUT.mkdir(exist_ok=True)
    corpus = ensure_corpus(args.corpus_size)
    sink_port = free_port()
    sink = subprocess.Popen([sink_bin, "-u", "nobody", f"127.0.0.1:{sink_port}", "1024"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows: list[dict[str, object]] = []
    dns_server = ThreadedDnsServer()
    dns_server.load(bench_zone(corpus))
    try:
        wait_port(sink_port, sink)  # type: ignore[arg-type]
        data_dir = Path(tempfile.mkdtemp(prefix="gw-bench-"))
        # The load generator is one loopback client standing for many senders: the limit of
        # next-hop transactions per client address (default 10) would refuse most of a c=50
        # run, which measures capacity, not that policy.
        conf = data_dir / "bench.toml"
        conf.write_text('[gateway]\ndomains = ["corp.example"]\n[next_hop]\n'
                        'max_transactions = 400\nmax_transactions_per_client = 400\n')
        systems: list[tuple[str, list[str], int, Path | None]] = []
        if (SHARED / "pyproxy.py").exists():
            p = free_port()
            systems.append(("bare pass-through (pyproxy.py)",
                            [sys.executable, str(SHARED / "pyproxy.py"), "--listen",
                             f"127.0.0.1:{p}", "--downstream", f"127.0.0.1:{sink_port}"], p,
                            None))
        g = free_port()
        systems.append((f"gateway (workers={args.workers or os.cpu_count()})",
                        [sys.executable, "-m", "gateway", "serve", "--config", str(conf),
                         "--listen", f"127.0.0.1:{g}",
                         "--next-hop", f"127.0.0.1:{sink_port}", "--domain", "corp.example",
                         "--data-dir", str(data_dir), "--workers", str(args.workers),
                         "--dns", dns_server.address,
                         "--web-listen", "" if args.no_web else f"127.0.0.1:{free_port()}"], g,
                        None))
        engines: list[object] = []
        if args.engines:
            for name, section in start_engines(data_dir, dns_server.address, engines):
                e = free_port()
                engine_conf = data_dir / f"bench-{name}.toml"
                engine_conf.write_text(conf.read_text() + section)
                cmd = [a if a != str(conf) else str(engine_conf) for a in systems[-1][1]]
                cmd[cmd.index("--listen") + 1] = f"127.0.0.1:{e}"
                cmd[cmd.index("--data-dir") + 1] = str(data_dir / name)
                if not args.no_web:
                    cmd[cmd.index("--web-listen") + 1] = f"127.0.0.1:{free_port()}"
                systems.append((f"gateway + {name} (workers={args.workers or os.cpu_count()})",
                                cmd, e, None))
        if args.compare:
            # The other revision's gateway, from its own worktree.
            tree = Path(tempfile.mkdtemp(prefix="gw-compare-")) / "tree"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "-f", str(tree),
                            args.compare], check=True)
            c = free_port()
            other = data_dir / "compare"
            # Its config, when it knows the per-client limit (else its default is no limit).
            limits = (["--config", str(conf)] if "max_transactions_per_client" in
                      (tree / "gateway" / "config.py").read_text() else [])
            systems.append((f"gateway @ {args.compare} (workers={args.workers or os.cpu_count()})",
                            [sys.executable, "-m", "gateway", "serve", *limits, "--listen",
                             f"127.0.0.1:{c}", "--next-hop", f"127.0.0.1:{sink_port}",
                             "--domain", "corp.example", "--data-dir", str(other), "--workers",
                             str(args.workers), "--dns", dns_server.address, "--web-listen",
                             "" if args.no_web else f"127.0.0.1:{free_port()}"], c, tree))
        try:
            for concurrency in [args.concurrency, *args.also_c]:
                runs_of: dict[str, list[dict[str, object]]] = {name: [] for name, *_ in systems}
                for _ in range(args.runs):  # systems alternate within each run
                    for name, cmd, port, cwd in systems:
                        runs_of[name].append(measure(name, cmd, port, corpus, concurrency,
                                                     args.count, cwd))
                rows += [summarise(runs) for runs in runs_of.values()]
        finally:
            for server in engines:
                kb = sum(tree_memory_kb(pid) for pid in server.pids)  # type: ignore[attr-defined]
                print(f"{type(server).__name__}: memory (PSS) {kb / 1024:.1f} MB at the end "
                      "of the run", file=sys.stderr)
                asyncio.run(server.stop())  # type: ignore[attr-defined]
            if args.compare:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                str(tree)], check=False)
        shutil.rmtree(data_dir, ignore_errors=True)
    finally:
        sink.terminate()
        sink.wait()
        dns_server.close()
    with (OUT / "results.jsonl").open("a") as f:
        for row in rows:
            f.write(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), **row}) + "\n")
    print(f"corpus: {corpus.name}, {args.count} messages per run, medians of {args.runs} run(s)\n")
    print("| system | c | msg/s | p50 / p99 ms | CPU ms/msg | peak memory (PSS) MB | failed |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['system']} | {r['concurrency']} | {r['msgs_per_s']} | "
              f"{r['p50_ms']} / {r['p99_ms']} | {r['cpu_ms_per_msg']} | {r['peak_mem_mb']} | "
              f"{r['fail']} |")


def start_engines(data_dir: Path, dns: str, started: list[object]) -> list[tuple[str, str]]:
    """clamd and rspamd (with Redis) on loopback, as the tests start them; each engine's
    name and the configuration section that turns it on."""
    from tests.support.clamd import ClamdServer
    from tests.support.rspamd import RspamdServer
    clamd = ClamdServer(data_dir / "clamd")
    asyncio.run(clamd.start())
    started.append(clamd)
    rspamd = RspamdServer(data_dir / "rspamd", dns)
    asyncio.run(rspamd.start())
    started.append(rspamd)
    return [("clamav", f'[engines.clamav]\nenabled = true\naddress = "{clamd.socket}"\n'),
            ("rspamd", f'[engines.rspamd]\nenabled = true\nurl = "{rspamd.url}"\n'
                       f'controller_url = "{rspamd.controller_url}"\n')]


def summarise(runs: list[dict[str, object]]) -> dict[str, object]:
    def med(key: str, sub: str | None = None) -> float:
        vals = [float(r[key][sub] if sub else r[key]) for r in runs]  # type: ignore[index]
        return round(statistics.median(vals), 1)
    first = runs[0]
    return {"system": first["system"], "concurrency": first["concurrency"],
            "msgs_per_s": med("msgs_per_s"), "p50_ms": med("lat_total_ms", "p50"),
            "p99_ms": med("lat_total_ms", "p99"), "peak_mem_mb": med("peak_mem_mb"),
            "cpu_ms_per_msg": med("cpu_ms_per_msg"),
            "fail": sum(int(r["fail"]) for r in runs),  # type: ignore[call-overload]
            "load_tool": first["load_tool"], "runs": len(runs)}


if __name__ == "__main__":
    main()
