"""What the measurement scripts in .ci share: a webhookd of their own, pinned to CPU 0, and the
CPU time that it, the script and the rest of the machine used."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import resource
import signal
import socket
import subprocess
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import aiohttp

STARTED: list[subprocess.Popen[bytes]] = []  # killed, process group and all, however the script ends


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def add_client(webhookd: Path, db: Path, name: str) -> str:
    """Make a client on the db with the command line; its API key."""
    made = subprocess.run([sys.executable, str(webhookd), "clients", "add", name, "--db", str(db)],
                          check=True, capture_output=True, text=True, timeout=60)
    return json.loads(made.stdout)["api_key"]["key"]


def serve(webhookd: Path, db: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    with open(log, "wb") as stderr:
        process = subprocess.Popen(
            ["taskset", "-c", "0", sys.executable, str(webhookd), "serve", "--port", str(port), "--db", str(db),
             "--allow-private-urls", "--secret", secret, "--log-level", "warning"],
            cwd=webhookd.parent, start_new_session=True, stdout=subprocess.DEVNULL, stderr=stderr,
        )
    STARTED.append(process)
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def cpu_seconds(pid: int | None = None) -> float:
    """User and system CPU of a process (all its threads, from /proc), or of this one."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def busy_seconds() -> float:
    """CPU time the whole machine spent busy (every core, every process), from /proc/stat."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


async def ready(session: aiohttp.ClientSession, url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    for _ in range(300):
        if process.poll() is not None:
            raise SystemExit(f"webhookd exited ({process.returncode}): {log.read_text()[-2000:]}")
        try:
            async with session.get(url + "/healthz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise SystemExit(f"{url} did not get ready in 30 s: {log.read_text()[-2000:]}")


def run_measurement(work: Coroutine[Any, Any, None], limit: float) -> None:
    """Run a measurement on CPU 1 (webhookd gets CPU 0) for at most `limit` seconds, and stop
    every process it started, however it ends."""
    os.sched_setaffinity(0, {1})
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM):
        signal.signal(signum, _stop_on)
    signal.alarm(int(limit))
    try:
        from uvloop import run as run_loop
    except ImportError:
        run_loop = asyncio.run
    try:
        run_loop(work)
    finally:
        for started in STARTED:
            stop(started)


def _stop_on(signum: int, frame: object) -> None:
    raise SystemExit(f"stopped by signal {signum}")
