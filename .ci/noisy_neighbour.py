#!/usr/bin/env python3
"""Noisy neighbour: a quiet client's submit-to-webhook latency while another client floods the service.

    python .ci/noisy_neighbour.py [--rounds 3] [--rate 20] [--seconds 20] [--flood-factor 2]
                                  [--receivers one|two] [--webhookd PATH]

Each round starts webhookd on a fresh SQLite file with two clients, `quiet` and `flood` (made with
`webhookd.py clients add`), pinned to CPU 0, and this script (load and receiver) to CPU 1. Then:
(1) capacity: `flood` sends --capacity-jobs jobs from 64 submitters that wait for their answers;
jobs/s = delivered / (last webhook - first submit). (2) alone: `quiet` sends --rate jobs/s for
--seconds, each at its scheduled time whatever the earlier answers. (3) with flood: the same quiet
load while `flood` sends --flood-factor times the capacity, open loop too, from 127.0.0.2 and on
(the service takes at most 256 requests at once from one address) with a small hand-written
HTTP/1.1 client, cheaper than aiohttp's; its refusals are counted, not sent again. Both clients'
webhooks go to one receiver, or with --receivers two to one each (the delivery engine shares its
slots between receivers). Latency is the webhook's arrival minus the job's scheduled send time,
matched by the job_id in the webhook body; every quiet webhook is waited for.

It prints each phase, the ratio p99(with flood) / p99(alone) of each round and its median, and
whether any quiet job was refused. "202 p99" is how long the quiet jobs' answers took from their
scheduled time, "lag" how late this script sent them (p99), "done s" when the flood's last answer
came, from the start of the phase; then the CPU share of the service, of this script and of every
other process while the jobs were being sent, in % of one core (near 100 % for this script means
the harness, not the service, set the pace; others well above 0 % mean a shared machine).
Loopback only; every process it starts is killed when it ends. Not part of the test suite: a
measurement, run by hand.
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import re
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from aiohttp import web

from harness import add_client, busy_seconds, cpu_seconds, free_port, ready, run_measurement, serve, stop

HERE = Path(__file__).resolve().parent.parent
CONCURRENCY = 64
def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile q (0..1) of values."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else float("nan")


def job(n: int, receiver: str) -> bytes:
    return json.dumps({"text": f"job {n}: the support team was great, but the app is slow",
                       "webhook_url": receiver}).encode()


async def closed_loop(session: aiohttp.ClientSession, url: str, headers: dict[str, str], receiver: str,
                      jobs: int) -> list[str]:
    """Send jobs from CONCURRENCY submitters, each waiting for its answer (429/503: again after
    Retry-After, at most 5 s); the accepted ids."""
    accepted: list[str] = []
    numbers = iter(range(jobs))

    async def submitter() -> None:
        for n in numbers:
            while True:
                async with session.post(url + "/predict", data=job(n, receiver), headers=headers) as response:
                    answer = await response.read()
                    if response.status == 202:
                        accepted.append(json.loads(answer)["job_id"])
                    if response.status not in (429, 503):
                        break
                    wait = min(5.0, float(response.headers.get("Retry-After", "1")))
                await asyncio.sleep(wait)

    await asyncio.gather(*(submitter() for _ in range(CONCURRENCY)))
    return accepted


Post = Callable[[bytes], Awaitable[tuple[int, bytes]]]  # a job's body -> the status and body of the answer


def session_post(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> Post:
    """POST /predict with aiohttp, as the quiet client sends."""
    async def post(body: bytes) -> tuple[int, bytes]:
        async with session.post(url + "/predict", data=body, headers=headers) as response:
            return response.status, await response.read()
    return post


class RawPost:
    """POST /predict on kept-alive connections from one local address, HTTP/1.1 written by hand,
    as the flood sends: aiohttp's client costs a few times more CPU a request, and at twice the
    service's capacity it filled this script's core, so that the harness set the flood's pace."""

    def __init__(self, port: int, local: str, headers: dict[str, str], limit: int) -> None:
        self._port, self._local = port, local
        self._head = f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in headers.items())
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._slots = asyncio.Semaphore(limit)

    async def __call__(self, body: bytes) -> tuple[int, bytes]:
        async with self._slots:
            reader, writer = self._idle.pop() if self._idle else await asyncio.open_connection(
                "127.0.0.1", self._port, local_addr=(self._local, 0))
            try:
                writer.write(f"{self._head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
                head = (await reader.readuntil(b"\r\n\r\n")).lower()
                length = re.search(rb"\r\ncontent-length: *(\d+)", head)
                answer = await reader.readexactly(int(length[1])) if length else await reader.read()
            except BaseException:
                writer.close()
                raise
            if length and b"\r\nconnection: close" not in head:
                self._idle.append((reader, writer))
            else:
                writer.close()
            return int(head[9:12]), answer

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()


async def open_loop(posts: list[Post], receiver: str, rate: float, seconds: float, sent_at: dict[str, float],
                    counts: Counter[str], lags: list[float], answers: list[float]) -> None:
    """Send rate jobs/s for `seconds`, each at its scheduled time whatever the earlier answers; the
    scheduled time of each accepted job goes in sent_at, every other answer is counted; how late
    each was sent goes in lags, and how long its answer took from the scheduled time in answers."""
    async def send(n: int, at: float) -> None:
        lags.append(time.monotonic() - at)
        try:
            status, answer = await posts[n % len(posts)](job(n, receiver))
        except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
            counts[type(exc).__name__] += 1
            return
        answers.append(time.monotonic() - at)
        if status == 202:
            sent_at[json.loads(answer)["job_id"]] = at
            counts["accepted"] += 1
        elif status == 429 and b"at once from" in answer:
            counts["429 per address"] += 1
        else:
            counts[str(status)] += 1

    start, tasks = time.monotonic(), []
    for n in range(int(rate * seconds)):
        await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))
        tasks.append(asyncio.create_task(send(n, start + n / rate)))
    await asyncio.gather(*tasks)


async def delivered(accepted: list[str], arrivals: dict[str, float], deadline: float) -> None:
    """Wait until every accepted job's webhook arrived, or the deadline."""
    missing = set(accepted)
    while missing and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        missing = {job_id for job_id in missing if job_id not in arrivals}


async def quiet_phase(args: argparse.Namespace, quiet: Post, flood: list[Post], receivers: dict[str, str],
                      arrivals: dict[str, float], flood_rate: float, pid: int) -> dict[str, object]:
    """The quiet load, with the flood beside it if flood_rate; its figures."""
    sent_at: dict[str, float] = {}
    quiet_counts: Counter[str] = Counter()
    flood_counts: Counter[str] = Counter()
    lags: list[float] = []
    answers: list[float] = []
    cpu_before, own_before, busy_before, start = cpu_seconds(pid), cpu_seconds(), busy_seconds(), time.monotonic()
    loads = [open_loop([quiet], receivers["quiet"], args.rate, args.seconds, sent_at, quiet_counts, lags, answers)]
    if flood_rate:
        loads.append(open_loop(flood, receivers["flood"], flood_rate, args.seconds, {}, flood_counts, [], []))
    await asyncio.wait_for(asyncio.gather(*loads), args.seconds + args.drain)
    sending = time.monotonic() - start  # until the last answer
    cpu, own, busy = cpu_seconds(pid) - cpu_before, cpu_seconds() - own_before, busy_seconds() - busy_before
    await delivered(list(sent_at), arrivals, time.monotonic() + args.drain)
    latencies = [(arrivals[j] - at) * 1000 for j, at in sent_at.items() if j in arrivals]
    return {"sent": int(args.rate * args.seconds), "accepted": len(sent_at), "delivered": len(latencies),
            "refused": sum(n for answer, n in quiet_counts.items() if answer != "accepted"),
            "p50": percentile(latencies, 0.5), "p90": percentile(latencies, 0.9),
            "p99": percentile(latencies, 0.99), "max": max(latencies, default=float("nan")),
            "lag": percentile(lags, 0.99) * 1000, "answer": percentile(answers, 0.99) * 1000,
            "flood": flood_counts, "flood_done": sending if flood_rate else 0.0,
            "server_cpu": 100 * cpu / sending, "own_cpu": 100 * own / sending,
            "other_cpu": max(0.0, 100 * (busy - cpu - own) / sending)}


def show(name: str, f: dict[str, object]) -> None:
    flood: Counter[str] = f["flood"]  # type: ignore[assignment]
    other = {answer: n for answer, n in flood.items() if answer not in ("accepted", "429", "503")}
    print(f"  {name:10} {f['sent']:5} {f['accepted']:8} {f['delivered']:9} {f['refused']:7} "
          f"{f['p50']:7.0f} {f['p90']:7.0f} {f['p99']:7.0f} {f['max']:7.0f} {f['answer']:7.0f} {f['lag']:6.0f} | "
          f"{sum(flood.values()):7} {f['flood_done']:6.1f} {flood['accepted']:8} {flood['429']:7} {flood['503']:7} "
          f"{sum(other.values()):5} | "
          f"{f['server_cpu']:9.0f} {f['own_cpu']:8.0f} {f['other_cpu']:7.0f}", flush=True)
    if other:
        print(f"  {'':10} flood's other answers: {other}")


async def one_round(args: argparse.Namespace, number: int) -> tuple[float, int]:
    """A fresh db and service, the capacity, then quiet alone and quiet with the flood; the p99 ratio
    and how many quiet jobs were refused."""
    home = Path(tempfile.mkdtemp(prefix="webhookd-noisy-"))
    db, log = home / "webhookd.db", home / "webhookd.log"
    headers = {name: {"Content-Type": "application/json",
                      "Authorization": "Bearer " + add_client(args.webhookd, db, name)} for name in ("quiet", "flood")}
    arrivals: dict[str, float] = {}

    async def receive(request: web.Request) -> web.Response:
        arrivals.setdefault(json.loads(await request.read())["job_id"], time.monotonic())
        return web.Response()

    app = web.Application()
    app.router.add_post("/ok", receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    receivers = {}
    for name in ("flood", "quiet") if args.receivers == "two" else ("flood",):
        receiver_port = free_port()
        await web.TCPSite(runner, "127.0.0.1", receiver_port).start()
        receivers[name] = f"http://127.0.0.1:{receiver_port}/ok"
    receivers.setdefault("quiet", receivers["flood"])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = serve(args.webhookd, db, port, log)
    local = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY),
                                  timeout=aiohttp.ClientTimeout(total=60))
    flood = [RawPost(port, f"127.0.0.{address}", headers["flood"], limit=250)
             for address in range(2, 2 + args.flood_addresses)]
    try:
        await ready(local, url, process, log)
        cpu_before, own_before, busy_before = cpu_seconds(process.pid), cpu_seconds(), busy_seconds()
        first_submit = time.monotonic()
        accepted = await closed_loop(local, url, headers["flood"], receivers["flood"], args.capacity_jobs)
        await delivered(accepted, arrivals, time.monotonic() + args.drain)
        wall = time.monotonic() - first_submit
        cpu, own = cpu_seconds(process.pid) - cpu_before, cpu_seconds() - own_before
        others = busy_seconds() - busy_before - cpu - own
        arrived = [arrivals[j] for j in accepted if j in arrivals]
        capacity = len(arrived) / (max(arrived) - first_submit)
        flood_rate = args.flood_factor * capacity
        print(f"round {number}: capacity {capacity:.0f} jobs/s ({len(arrived)} of {args.capacity_jobs} jobs by "
              f"flood, {CONCURRENCY} at once; webhookd {100 * cpu / wall:.0f} %, loadgen {100 * own / wall:.0f} %, "
              f"others {max(0.0, 100 * others / wall):.0f} %); flood at {flood_rate:.0f} jobs/s from "
              f"{args.flood_addresses} address(es)")
        print(f"  {'phase':10} {'quiet':>5} {'accepted':>8} {'delivered':>9} {'refused':>7} {'p50 ms':>7} "
              f"{'p90 ms':>7} {'p99 ms':>7} {'max ms':>7} {'202 p99':>7} {'lag ms':>6} | {'flood':>7} {'done s':>6} "
              f"{'accepted':>8} {'429':>7} {'503':>7} {'other':>5} | {'webhookd%':>9} {'loadgen%':>8} {'others%':>7}")
        phase = functools.partial(quiet_phase, args, session_post(local, url, headers["quiet"]), flood, receivers,
                                  arrivals, pid=process.pid)
        alone = await phase(flood_rate=0.0)
        show("alone", alone)
        flooded = await phase(flood_rate=flood_rate)
        show("with flood", flooded)
    finally:
        await local.close()
        for post in flood:
            post.close()
        stop(process)
        await runner.cleanup()
        shutil.rmtree(home, ignore_errors=True)
    ratio = flooded["p99"] / alone["p99"]  # type: ignore[operator]
    refused = alone["refused"] + flooded["refused"]  # type: ignore[operator]
    print(f"  p99 with flood / alone: {ratio:.2f}; quiet jobs refused: {refused}", flush=True)
    return ratio, refused


async def main(args: argparse.Namespace) -> None:
    print(f"webhookd: {args.webhookd}; quiet {args.rate:g} jobs/s for {args.seconds:g} s; flood "
          f"{args.flood_factor:g} x capacity; load average {os.getloadavg()[0]:.2f}", flush=True)
    ratios, refused = [], 0
    for number in range(1, args.rounds + 1):
        ratio, refused_now = await one_round(args, number)
        ratios.append(ratio)
        refused += refused_now
    print(f"p99 ratios: {' '.join(f'{r:.2f}' for r in ratios)}; median {statistics.median(ratios):.2f}; "
          f"quiet jobs refused in all rounds: {refused}; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=20, help="quiet jobs/s")
    parser.add_argument("--seconds", type=float, default=20, help="length of each quiet phase")
    parser.add_argument("--flood-factor", type=float, default=2, help="flood rate, times the measured capacity")
    parser.add_argument("--flood-addresses", type=int, default=2, help="loopback addresses the flood comes from")
    parser.add_argument("--receivers", choices=("one", "two"), default="one",
                        help="one receiver for both clients' webhooks, or one each")
    parser.add_argument("--capacity-jobs", type=int, default=5000)
    parser.add_argument("--drain", type=float, default=120, help="seconds to wait for the last webhooks")
    parser.add_argument("--limit", type=float, default=1200, help="seconds the whole script may take")
    parser.add_argument("--webhookd", type=Path, default=HERE / "webhookd.py")
    arguments = parser.parse_args()
    arguments.webhookd = arguments.webhookd.resolve()
    run_measurement(main(arguments), arguments.limit)
