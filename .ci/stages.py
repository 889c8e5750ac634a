#!/usr/bin/env python3
"""Where a job's time goes at saturation: py-spy's samples of webhookd, sorted into a job's stages.

    py-spy record --pid PID --duration 8 --rate 200 --nonblocking --format raw -o samples.txt
    python .ci/stages.py samples.txt --us-per-job 330

Record while the shared bench's throughput scenario keeps webhookd saturated (its server CPU near
100 % of one core, webhookd and SQLite's thread both pinned to it); --us-per-job is that core's
time over the jobs delivered meanwhile, 1e6 / the end-to-end jobs/s. Each sample goes to the first
stage, in the order below, that one of its frames belongs to; the threads' waits for work are left
out (webhookd's commits run under its own _commit_or_roll_back, which tells them apart from
aiosqlite waiting for work). A sample of SQLite's thread waiting in fdatasync counts as its
stage, though it leaves the core to the event loop: that stage is an upper bound. Prints each
stage's share and µs a job.
py-spy installs from PyPI; not part of the test suite.
"""
from __future__ import annotations

import argparse
from collections import Counter

# (stage, marks of its frames), tried in this order: signing happens inside sending, and SQLite's
# own thread is inside no coroutine at all.
STAGES = [
    ("sign (HMAC, headers)", ("Signer.headers",)),
    ("infer (VADER, batches)", ("InferenceWorkers._predict", "predict_all", "vaderSentiment")),
    ("record: SQLite's thread (statements, WAL, fsync)", ("_commit_or_roll_back", "_connection_worker_thread")),
    ("record: the event loop's side (group commit)", (
        "Store._commit", "Store._write", "SQLiteStore.", "InferenceWorkers._record_results",
        "DeliveryEngine._record_attempt", "Store.record_", "Store.add_job", "aiosqlite")),
    ("send (aiohttp client, answer kept)", ("DeliveryEngine.", "ClientSession", "ClientRequest", "ClientResponse",
                                              "client_proto", "connector.py", "_answer")),
    ("accept (HTTP server, admission, parse, 202)", ("predict (", "admit", "web_protocol", "web_app",
                                                     "web_response", "web_request", "http_writer")),
    ("the rest of webhookd (metrics, loops)", ("webhookd.py",)),
]
OUTER = ("<module> (", "main (", "_run (", "run_app (", "Loops._keep_running (")  # under every coroutine
WAITING = ("_worker (concurrent/futures/thread.py:81)", "_connection_worker_thread (aiosqlite/core.py:59)")


def stage_of(frames: list[str]) -> str:
    inner = [frame for frame in frames if not frame.startswith(OUTER)]
    for stage, marks in STAGES:
        if any(mark in frame for frame in inner for mark in marks):
            return stage
    return "event loop and sockets (uvloop, native)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("samples", help="py-spy's --format raw output")
    parser.add_argument("--us-per-job", type=float, required=True, help="1e6 / end-to-end jobs/s at saturation")
    args = parser.parse_args()
    counts: Counter[str] = Counter()
    with open(args.samples) as lines:
        for line in lines:
            stack, _, n = line.rstrip().rpartition(" ")
            frames = stack.split(";")
            if not any(frames[-1].endswith(waiting) for waiting in WAITING):
                counts[stage_of(frames)] += int(n)
    total = sum(counts.values())
    for stage, n in counts.most_common():
        print(f"{stage:50} {100 * n / total:5.1f} %  {args.us_per_job * n / total:6.0f} µs")
    print(f"{'a job':50} 100.0 %  {args.us_per_job:6.0f} µs   ({total} samples)")


if __name__ == "__main__":
    main()
