#!/usr/bin/env python3
"""Clients are nearly free: end-to-end jobs/s of the open service against the same build with a client.

    python .ci/clients_throughput.py [--rounds 5] [--jobs 20000] [--concurrency 64] [--webhookd PATH]

Each round runs the same webhookd twice, on a fresh SQLite file each time: (a) no clients and no
key, the open service; (b) one client, made with `webhookd.py clients add` before the start, and
every job sent with its key. The order is a, b in odd rounds and b, a in even ones, so that a
drift in the machine's load does not favour one side. The service is pinned to CPU 0 and this
script (load and receiver) to CPU 1. A closed loop of --concurrency submitters sends a 200-job
warm-up, waits for its webhooks, then sends --jobs jobs; a 429 or 503 is sent again after its
Retry-After (at most 5 s). The figure is delivered / (last webhook arrival - first submit).
It prints each run, the ratio b/a of each round and the median ratio, with the CPU share that
the service, this script and every other process on the machine used, in % of one core (this
script near 100 % means the figure is the harness's; others well above 0 % mean a shared machine,
so it also gives the median of the rounds where others stayed under --quiet-others).
Loopback only; every process it starts is killed when it ends. Not part of the test suite: a
measurement, run by hand.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
from aiohttp import web

from harness import add_client, busy_seconds, cpu_seconds, free_port, ready, run_measurement, serve, stop

HERE = Path(__file__).resolve().parent.parent
WARM_UP = 200
async def closed_loop(session: aiohttp.ClientSession, url: str, headers: dict[str, str], receiver: str,
                      first: int, jobs: int, concurrency: int, counts: Counter[str | int]) -> list[str]:
    """Send jobs first..first+jobs-1 from `concurrency` submitters, each waiting for its answer; their ids."""
    accepted: list[str] = []
    numbers = iter(range(first, first + jobs))

    async def submitter() -> None:
        for n in numbers:
            body = json.dumps({"text": f"job {n}: the support team was great, but the app is slow",
                               "webhook_url": receiver}).encode()
            while True:
                try:
                    async with session.post(url + "/predict", data=body, headers=headers) as response:
                        answer = await response.read()
                        counts[response.status] += 1
                        if response.status == 202:
                            accepted.append(json.loads(answer)["job_id"])
                        if response.status not in (429, 503):
                            break
                        wait = min(5.0, float(response.headers.get("Retry-After", "1")))
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    counts[type(exc).__name__] += 1
                    break
                await asyncio.sleep(wait)

    await asyncio.gather(*(submitter() for _ in range(concurrency)))
    return accepted


async def delivered(accepted: list[str], arrivals: dict[str, float], deadline: float) -> list[str]:
    """Wait until every accepted job's webhook arrived, or the deadline; the ones still missing."""
    missing = set(accepted)
    while missing and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        missing = {job_id for job_id in missing if job_id not in arrivals}
    return sorted(missing)


async def run(args: argparse.Namespace, with_client: bool) -> dict[str, float]:
    """One run: a fresh db and service, the warm-up, then the measured jobs; its figures."""
    home = Path(tempfile.mkdtemp(prefix="webhookd-clients-"))
    db, log = home / "webhookd.db", home / "webhookd.log"
    headers = {"Content-Type": "application/json"}
    if with_client:
        headers["Authorization"] = "Bearer " + add_client(args.webhookd, db, "acme")
    arrivals: dict[str, float] = {}
    duplicates = 0

    async def receive(request: web.Request) -> web.Response:
        nonlocal duplicates
        job_id = json.loads(await request.read())["job_id"]
        duplicates += job_id in arrivals
        arrivals.setdefault(job_id, time.monotonic())
        return web.Response()

    app = web.Application()
    app.router.add_post("/ok", receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    receiver_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", receiver_port).start()
    receiver = f"http://127.0.0.1:{receiver_port}/ok"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = serve(args.webhookd, db, port, log)
    counts: Counter[str | int] = Counter()
    try:
        connector = aiohttp.TCPConnector(limit=args.concurrency)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
            await ready(session, url, process, log)
            warm = await closed_loop(session, url, headers, receiver, 0, WARM_UP, args.concurrency, Counter())
            await delivered(warm, arrivals, time.monotonic() + 60)
            cpu_before, own_before, busy_before = cpu_seconds(process.pid), cpu_seconds(), busy_seconds()
            first_submit = time.monotonic()
            accepted = await closed_loop(session, url, headers, receiver, WARM_UP, args.jobs, args.concurrency, counts)
            missing = await delivered(accepted, arrivals, time.monotonic() + args.drain)
            wall = time.monotonic() - first_submit
            cpu, own = cpu_seconds(process.pid) - cpu_before, cpu_seconds() - own_before
            busy = busy_seconds() - busy_before
    finally:
        stop(process)
        await runner.cleanup()
        shutil.rmtree(home, ignore_errors=True)
    arrived = [arrivals[job_id] for job_id in accepted if job_id in arrivals]
    last = max(arrived, default=first_submit)
    return {"accepted": len(accepted), "delivered": len(arrived), "missing": len(missing),
            "duplicates": duplicates, "refused": counts[429] + counts[503],
            "errors": sum(n for status, n in counts.items() if status not in (202, 429, 503)),
            "jobs_s": len(arrived) / (last - first_submit) if arrived else 0.0,
            "server_cpu": 100 * cpu / wall, "own_cpu": 100 * own / wall,
            "other_cpu": max(0.0, 100 * (busy - cpu - own) / wall)}


def show(round_: int, side: str, figures: dict[str, float]) -> None:
    print(f"{round_:5} {side:>4} {figures['jobs_s']:9.1f} {figures['accepted']:8.0f} {figures['delivered']:9.0f} "
          f"{figures['missing']:7.0f} {figures['refused']:7.0f} {figures['errors']:6.0f} {figures['duplicates']:4.0f} "
          f"{figures['server_cpu']:9.0f} {figures['own_cpu']:8.0f} {figures['other_cpu']:7.0f}", flush=True)


async def main(args: argparse.Namespace) -> None:
    print(f"webhookd: {args.webhookd}; {args.jobs} jobs after {WARM_UP} warm-up, {args.concurrency} at once; "
          f"load average {os.getloadavg()[0]:.2f}")
    print("round side    jobs/s accepted delivered missing refused errors dups "
          "webhookd% loadgen% others%", flush=True)
    ratios, clean = [], []
    for round_ in range(1, args.rounds + 1):
        figures = {}
        for side in ("a", "b") if round_ % 2 else ("b", "a"):
            figures[side] = await run(args, with_client=side == "b")
            show(round_, side, figures[side])
        ratios.append(figures["b"]["jobs_s"] / figures["a"]["jobs_s"])
        if max(figures["a"]["other_cpu"], figures["b"]["other_cpu"]) < args.quiet_others:
            clean.append(ratios[-1])
        print(f"{round_:5}  b/a {ratios[-1]:9.3f}", flush=True)
    print(f"ratios b/a: {' '.join(f'{r:.3f}' for r in ratios)}; median {statistics.median(ratios):.3f}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"rounds where other processes took under {args.quiet_others:g} % of a core in both runs: {len(clean)}"
          + (f"; their median ratio {statistics.median(clean):.3f}" if clean else ""))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--drain", type=float, default=120, help="seconds to wait for the last webhooks")
    parser.add_argument("--quiet-others", type=float, default=10,
                        help="a round counts as undisturbed when other processes took less CPU than this, in %%")
    parser.add_argument("--limit", type=float, default=1800, help="seconds the whole script may take")
    parser.add_argument("--webhookd", type=Path, default=HERE / "webhookd.py")
    arguments = parser.parse_args()
    arguments.webhookd = arguments.webhookd.resolve()
    run_measurement(main(arguments), arguments.limit)
