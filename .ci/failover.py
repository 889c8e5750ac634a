#!/usr/bin/env python3
"""Failover figures: two webhookd instances on one PostgreSQL, one of them killed under load.

    python .ci/failover.py [--rate 300] [--seconds 8] [--kill-at 3] [--failover-after 10] [--stop term]

It starts a throwaway PostgreSQL (the machine's initdb/pg_ctl, as the postgres user when run as
root), a loopback receiver, and two instances A and B. Jobs go round robin to A and B, as a load
balancer would send them; a tenth go to a receiver path that fails the first attempt, so that
retries are scheduled when A goes. At --kill-at seconds A gets SIGKILL (or SIGTERM with
--stop term); later submissions go to B. It prints what was accepted, delivered, lost and
duplicated, and how long after the kill the last of A's jobs was delivered.
Not part of the test suite: a measurement, run by hand.
"""
from __future__ import annotations

import argparse
import asyncio
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
from aiohttp import web

HERE = Path(__file__).resolve().parent.parent
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def postgres(home: Path) -> tuple[str, list[str]]:
    # Debian's pg_ctl is in a folder named for its version, not on the PATH.
    found = shutil.which("pg_ctl") or max(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), default="pg_ctl")
    bin_dir = Path(found).resolve().parent
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(home, "postgres")
    port = free_port()
    subprocess.run([*as_postgres, str(bin_dir / "initdb"), "-D", str(home / "data"), "-A", "trust", "-U",
                    "postgres", "-E", "UTF8"], check=True, capture_output=True)
    subprocess.run([*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(home / "data"), "-l", str(home / "log"), "-w",
                    "-o", f"-p {port} -k {home} -c listen_addresses=127.0.0.1", "start"], check=True,
                   capture_output=True)
    stop = [*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(home / "data"), "-m", "immediate", "stop"]
    return f"postgresql://postgres@127.0.0.1:{port}/postgres", stop


def instance(db: str, port: int, failover_after: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(HERE / "webhookd.py"), "--port", str(port), "--db", db, "--secret", SECRET,
         "--allow-private-urls", "--log-level", "warning", "--backoff-base", "0.5",
         "--failover-after", str(failover_after)],
        cwd=HERE, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


async def ready(session: aiohttp.ClientSession, url: str) -> None:
    for _ in range(200):
        try:
            async with session.get(url + "/healthz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise SystemExit(f"{url} did not get ready")


async def main(args: argparse.Namespace) -> None:
    home = Path(tempfile.mkdtemp(prefix="webhookd-failover-"))
    db, stop_postgres = postgres(home)
    arrivals: Counter[str] = Counter()
    delivered_at: dict[str, float] = {}
    duplicates = 0
    failed_once: set[str] = set()

    async def receive(request: web.Request) -> web.Response:
        nonlocal duplicates
        job_id = request.headers["webhook-id"]
        arrivals[job_id] += 1
        if request.path == "/fail-once" and job_id not in failed_once:
            failed_once.add(job_id)
            return web.Response(status=500)
        if job_id in delivered_at:
            duplicates += 1
        delivered_at.setdefault(job_id, time.time())
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/{path:.*}", receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    receiver_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", receiver_port).start()
    ports = [free_port(), free_port()]
    processes = [instance(db, port, args.failover_after) for port in ports]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    accepted: dict[str, int] = {}  # job id -> the instance that accepted it
    killed_at = None
    try:
        async with aiohttp.ClientSession() as session:
            for url in urls:
                await ready(session, url)

            async def submit(n: int) -> None:
                path = "/fail-once" if n % 10 == 0 else "/ok"
                body = {"text": f"job {n} was great", "webhook_url": f"http://127.0.0.1:{receiver_port}{path}"}
                for which in (n % 2, 1 - n % 2):  # the balancer tries the other instance on an error
                    try:
                        async with session.post(urls[which] + "/predict", json=body) as response:
                            if response.status == 202:
                                accepted[(await response.json())["job_id"]] = which
                                return
                    except aiohttp.ClientError:
                        continue

            start = time.monotonic()
            tasks = []
            for n in range(int(args.rate * args.seconds)):
                await asyncio.sleep(max(0.0, start + n / args.rate - time.monotonic()))
                if killed_at is None and time.monotonic() - start >= args.kill_at:
                    os.killpg(processes[0].pid, signal.SIGKILL if args.stop == "kill" else signal.SIGTERM)
                    killed_at = time.time()
                tasks.append(asyncio.create_task(submit(n)))
            await asyncio.gather(*tasks)
            deadline = time.monotonic() + args.failover_after + 60
            while time.monotonic() < deadline and not set(accepted) <= set(delivered_at):
                await asyncio.sleep(0.1)
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        await runner.cleanup()
        subprocess.run(stop_postgres, capture_output=True)
        shutil.rmtree(home, ignore_errors=True)

    lost = [job_id for job_id in accepted if job_id not in delivered_at]
    from_a = [job_id for job_id, which in accepted.items() if which == 0]
    last_of_a = max((delivered_at[j] for j in from_a if j in delivered_at), default=float("nan"))
    print(f"stop: {args.stop} of A at {args.kill_at:g} s; --failover-after {args.failover_after:g}")
    print(f"accepted {len(accepted)} (A {len(from_a)}, B {len(accepted) - len(from_a)}), "
          f"delivered {len(set(accepted) & set(delivered_at))}, lost {len(lost)}, duplicates {duplicates}")
    print(f"last of A's jobs delivered {last_of_a - killed_at:.2f} s after the {args.stop}" if killed_at else "")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=300)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--kill-at", type=float, default=3)
    parser.add_argument("--failover-after", type=float, default=10)
    parser.add_argument("--stop", choices=("kill", "term"), default="kill")
    asyncio.run(main(parser.parse_args()))
