#!/usr/bin/env python3
"""webhookd: runs a sentiment model on submitted text and tells the client by signed webhook.

    pip install -r requirements.txt
    python webhookd.py                # serve on http://127.0.0.1:8000, data in ./webhookd.db
    python webhookd.py receive        # a verifying receiver on http://127.0.0.1:9000/callback
    python webhookd.py bench --start  # jobs/s and submit-to-webhook latency, on a webhookd of its own
    pytest                            # the test suite

A client POSTs {"text", "webhook_url"} to /predict and gets a job id at once. Inference
workers fed by an asyncio.Queue run the model; the delivery engine POSTs the result to the
webhook URL, signed with HMAC-SHA256 twice (X-Signature over the body, and Standard Webhooks'
webhook-signature), retrying with exponential backoff. Jobs, the delivery schedule and every
attempt live in SQLite, so a crash loses nothing that was accepted.

Security: webhook URLs on loopback, private, link-local (cloud metadata), multicast, reserved
or unspecified addresses are refused unless --allow-private-urls is given, both when the URL
is a literal address and when a host name resolves there. Anyone who can reach this service
can make it send HTTP requests: expose it only with --api-key. The signing secret and the API
key are never put in a response or a log line; a generated secret is printed once, on the
first start, so that its owner can give it to receivers.

The contract this follows is CONTRACT.md of the webhookd project; README.md documents it.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import bisect
import contextlib
import dataclasses
import datetime as dt
import email.utils
import errno
import functools
import gc
import hashlib
import heapq
import hmac
import importlib
import itertools
import ipaddress
import json
import logging
import math
import os
import random
import re
import secrets
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter, OrderedDict, defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, NoReturn, TypeVar

import aiohttp
import aiosqlite
import asyncpg
from aiohttp import web, web_protocol
from aiohttp.abc import AbstractResolver, ResolveResult
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString
from yarl import URL

__version__ = "1.2.0"


def require_python(version: tuple[int, int] = (sys.version_info.major, sys.version_info.minor)) -> None:
    """Stop at once, with one line, on a Python older than webhookd needs."""
    if version < (3, 10):
        sys.exit(f"webhookd needs Python 3.10 or newer; this is Python {version[0]}.{version[1]}")


require_python()

log = logging.getLogger("webhookd")


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------

MAX_BODY_BYTES = 64 * 1024
MAX_TEXT_CHARS = 10_000
MAX_URL_CHARS = 2048
MAX_IDEMPOTENCY_KEY_CHARS = 255
IDEMPOTENCY_KEY_LIFETIME = 24 * 3600.0
JOB_FIELDS = ("text", "webhook_url", "retry_policy")
USER_AGENT = f"webhookd/{__version__}"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
POSTGRES_SCHEMES = ("postgresql://", "postgres://")  # any other --db is an SQLite file
# Where asyncpg reads a password in a --db URL: user:password@ before the host (up to its last
# @, as urllib splits it), and the password= and sslpassword= query parameters.
DB_PASSWORDS = (
    re.compile(r"^([^:/?#]+://[^:/?#@]*:)([^/?#]*)(@)"),
    re.compile(r"([?&](?:ssl)?password=)([^&#]*)()"),
)


def redacted(db: str) -> str:
    """--db as it may be shown: a URL without its passwords."""
    for pattern in DB_PASSWORDS:
        db = pattern.sub(r"\1***\3", db)
    return db


def db_passwords(db: str) -> list[str]:
    """The passwords in --db, as written and percent-decoded, to keep out of every log line."""
    written = [match[2] for pattern in DB_PASSWORDS for match in pattern.finditer(db) if match[2]]
    return [form for password in written for form in {password, urllib.parse.unquote(password)}]


class Bound(NamedTuple):
    """The values a retry setting may take."""

    integer: bool
    low: float
    high: float

    def admits(self, value: Any) -> bool:
        """Whether value is a number of the right kind within the bounds."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not (isinstance(value, int) or value.is_integer()):  # 8.0 is 8, as in JSON Schema
            return False
        # Only comparisons: NaN fails them all, and a huge int compares without overflowing.
        return self.low <= value <= self.high

    def __str__(self) -> str:
        return f"{'an integer' if self.integer else 'a number'}, {self.low:g}..{self.high:g}"


RETRY_POLICY_BOUNDS = {  # what a job's own retry_policy may ask for
    "max_retries": Bound(True, 0, 20),
    # A floor, so that one client cannot aim a retry storm at a receiver.
    "backoff_base": Bound(False, 0.1, 3600),
    "backoff_factor": Bound(False, 1, 10),
}


@dataclass(frozen=True)
class RetryPolicy:
    """When to try a delivery again: retry k waits schedule[k-1] if there is a schedule, else
    base * factor^(k-1); jittered, capped."""

    max_retries: int = 3
    backoff_base: float = 1.0
    backoff_factor: float = 2.0
    backoff_max: float = 3600.0
    backoff_jitter: float = 0.0
    schedule: tuple[float, ...] = ()  # --retry-schedule: the waits before each retry

    def overridden(self, overrides: dict[str, Any] | None) -> RetryPolicy:
        """This policy with a job's own retry_policy fields on top (which replace a schedule)."""
        return dataclasses.replace(self, **overrides, schedule=()) if overrides else self


MAX_SCHEDULE = 100
WAIT_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_retry_schedule(text: str) -> tuple[float, ...]:
    """--retry-schedule: waits such as 5s,5m,30m,2h (a plain number is seconds); ValueError says why not."""
    entries = text.split(",")
    if len(entries) > MAX_SCHEDULE:
        raise ValueError(f"--retry-schedule has {len(entries)} waits; at most {MAX_SCHEDULE}")
    return tuple(parse_wait(entry, "--retry-schedule") for entry in entries)


def parse_wait(text: str, flag: str) -> float:
    """Seconds of a wait such as 30s, 5m, 2h, 1d or 0.5 (seconds); ValueError names the flag."""
    entry = text.strip()
    number, unit = (entry[:-1], entry[-1]) if entry[-1:] in WAIT_UNITS else (entry, "s")
    try:
        wait = float(number) * WAIT_UNITS[unit]
    except ValueError:
        raise ValueError(f"{flag}: {entry!r} is not a wait like 30s, 5m, 2h or 1d") from None
    if not 0 < wait < math.inf:
        raise ValueError(f"{flag}: {entry!r} is not a positive wait")
    return wait


@dataclass(frozen=True)
class Config:
    """Everything the service is told at start-up, from flags and WEBHOOKD_* variables."""

    host: str = "127.0.0.1"
    port: int = 8000
    db: str = "webhookd.db"
    workers: int = 4
    secrets: tuple[str, ...] = field(default=(), repr=False)  # empty: generated once, kept in the db
    retry: RetryPolicy = RetryPolicy()
    timeout: float = 10.0
    max_in_flight: int = 256
    max_backlog: int = 4000
    client_backlog: int = 0  # 0: half of max_backlog
    retention_days: float = 30.0
    allow_private_urls: bool = False
    api_key: str | None = field(default=None, repr=False)
    model: str = "vader"
    log_level: str = "info"
    log_format: str = "text"
    failover_after: float = 10.0

    @property
    def client_limit(self) -> int:
        """The most accepted, unfinished work one client may hold: --client-backlog, or half of --max-backlog."""
        return self.client_backlog or max(1, self.max_backlog // 2)

    def __post_init__(self) -> None:
        problems = [
            message
            for failed, message in (
                (self.workers < 1, "--workers must be at least 1"),
                (not 0 < self.timeout <= 3600, "--timeout must be between 0 and 3600 seconds"),
                (self.max_in_flight < 1, "--max-in-flight must be at least 1"),
                (self.max_backlog < 1, "--max-backlog must be at least 1"),
                (self.client_backlog < 0, "--client-backlog must be at least 1 (0: half of --max-backlog)"),
                (not 0 <= self.retention_days < math.inf, "--retention-days must be 0 (keep all) or more"),
                (not 0 <= self.retry.max_retries <= 100, "--max-retries must be 0 to 100"),
                (not 0 < self.retry.backoff_base <= 3600, "--backoff-base must be a number over 0, at most 3600"),
                (not RETRY_POLICY_BOUNDS["backoff_factor"].admits(self.retry.backoff_factor),
                 f"--backoff-factor must be {RETRY_POLICY_BOUNDS['backoff_factor']}"),
                (not 0 < self.retry.backoff_max < math.inf, "--backoff-max must be a positive number of seconds"),
                (not 0 <= self.retry.backoff_jitter <= 1, "--backoff-jitter must be in [0, 1]"),
                (any(wait > self.retry.backoff_max for wait in self.retry.schedule),
                 f"--retry-schedule has a wait over --backoff-max ({self.retry.backoff_max:g} s)"),
                (self.log_level not in LOG_LEVELS, f"--log-level must be one of {', '.join(LOG_LEVELS)}"),
                (self.log_format not in LOG_FORMATS, f"--log-format must be one of {', '.join(LOG_FORMATS)}"),
                (not 0 <= self.port <= 65535, "--port must be 0 to 65535"),
                (not 1 <= self.failover_after <= 3600, "--failover-after must be 1 to 3600 seconds"),
                ("://" in self.db and not self.db.startswith(POSTGRES_SCHEMES),
                 f"--db {redacted(self.db)} is neither a file path (SQLite)"
                 f" nor a {' or '.join(POSTGRES_SCHEMES)} URL (PostgreSQL)"),
            )
            if failed
        ]
        for number, secret in enumerate(self.secrets, 1):
            try:
                signing_key(secret)
            except ValueError as exc:  # its message never repeats the secret
                which = (f" (key {number} of {len(self.secrets)}: spaces separate the keys of a rotation)"
                         if len(self.secrets) > 1 else "")
                problems.append(f"--secret{which}: {exc}")
        if problems:
            raise ValueError("; ".join(problems))


# ---------------------------------------------------------------------------
# Logs
# ---------------------------------------------------------------------------


class LogFormatter(logging.Formatter):
    """One record a line, as text or as a JSON object, in UTC with a Z, and never a secret.

    Both forms carry the time, the level and the message; a JSON line also carries the
    record's structured fields (an attempt's job id, number, outcome, ...). The signing secrets,
    the API key and a database password are replaced by *** in every line, whatever wrote it.
    """

    def __init__(self, json_lines: bool, hidden: Iterable[str]) -> None:
        super().__init__()
        self._json_lines = json_lines
        self._hidden: list[str] = []
        for secret in hidden:
            self.hide(secret)

    def hide(self, secret: str) -> None:
        """Keep `secret` out of every line from now on."""
        if secret:
            # As it is, and as JSON escapes it inside a string.
            self._hidden.extend({secret, json.dumps(secret, ensure_ascii=False)[1:-1]})
            self._hidden.sort(key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        fields = {"time": iso_time(record.created), "level": record.levelname, "message": record.getMessage()}
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        if self._json_lines:
            line = json.dumps({**fields, **getattr(record, "fields", {})}, ensure_ascii=False, default=str)
        else:
            line = " ".join(map(str, list(fields.values())[:3]))
            if record.exc_info:
                line += "\n" + fields["exception"]
        for secret in self._hidden:
            line = line.replace(secret, "***")
        return line


def configure_logging(config: Config) -> None:
    """Log to stderr at --log-level in --log-format, with the secrets hidden."""
    handler = logging.StreamHandler()
    handler.setFormatter(LogFormatter(config.log_format == "json",
                                      [*config.secrets, config.api_key or "", *db_passwords(config.db)]))
    logging.basicConfig(level=config.log_level.upper(), handlers=[handler], force=True)
    # At DEBUG, aiosqlite logs every statement with its parameters: texts, and the stored secret.
    logging.getLogger("aiosqlite").setLevel(max(logging.INFO, logging.getLogger().level))


def hide_in_logs(secret: str) -> None:
    """Keep a secret learnt after start-up (the one stored in the db) out of every log line."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, LogFormatter):
            handler.formatter.hide(secret)


def iso_time(timestamp: float | None) -> str | None:
    """ISO-8601 UTC with a Z, as the contract writes times."""
    if timestamp is None:
        return None
    moment = dt.datetime.fromtimestamp(timestamp, dt.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---------------------------------------------------------------------------
# Background loops
# ---------------------------------------------------------------------------


class Loops:
    """The service's long-running loops (committer, workers, timer, heartbeat, resume, pruner,
    retention), kept running.

    A loop that raises is logged and started again after a pause that doubles up to a minute,
    so no single job or delivery can stop the work of all the others; while it is down,
    /healthz names it.
    """

    FIRST_PAUSE = 0.1
    LONGEST_PAUSE = 60.0

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._down: set[str] = set()

    def start(self, name: str, run: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """Run `run()` as the loop called name, restarting it whenever it raises."""
        task = asyncio.create_task(self._keep_running(name, run), name=f"webhookd-{name}")
        self._tasks[name] = task
        return task

    def down(self) -> list[str]:
        """The loops that are not running now: crashed and waiting to restart, or ended."""
        ended = [name for name, task in self._tasks.items() if task.done() and not task.cancelled()]
        return sorted(self._down.union(ended))

    async def stop(self, name: str) -> None:
        """Cancel one loop and wait for it."""
        task = self._tasks.pop(name, None)
        if task is not None:
            await _cancel(task)

    async def _keep_running(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        pause = self.FIRST_PAUSE
        while True:
            try:
                return await run()
            except Exception:
                _log_failure("the %s loop crashed; restarting it in %.1f s", name, pause)
            self._down.add(name)
            try:
                await asyncio.sleep(pause)
            finally:
                self._down.discard(name)
            pause = min(pause * 2, self.LONGEST_PAUSE)


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


# ---------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------

# 1 was webhookd 1.0's SQLite schema (no owners, no instances); 2, 1.1's (no clients); 3 did not
# mark the attempt that starts a redelivery's round.
SCHEMA_VERSION = 4

# One schema for both stores; the {fields} are where their dialects differ.
SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS instances (
    id           TEXT PRIMARY KEY,
    heartbeat_at {real} NOT NULL           -- the database's clock, so instances' clocks may differ
);
CREATE TABLE IF NOT EXISTS jobs (
    id              TEXT PRIMARY KEY,
    text            TEXT NOT NULL,
    webhook_url     TEXT,
    retry_policy    TEXT,                  -- the job's own overrides, JSON
    status          TEXT NOT NULL,         -- processing | completed | failed
    result          TEXT,                  -- JSON
    error           TEXT,
    created_at      {real} NOT NULL,
    completed_at    {real},
    idempotency_key TEXT,                  -- kept for IDEMPOTENCY_KEY_LIFETIME, then cleared
    request_hash    TEXT,
    owner           TEXT,                  -- the instance that runs it
    client          TEXT NOT NULL DEFAULT ''  -- the client that submitted it; '' for the operator
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_by_client_and_idempotency_key
    ON jobs (client, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_by_client ON jobs (client, id) WHERE client <> '';
CREATE TABLE IF NOT EXISTS clients (
    name       TEXT PRIMARY KEY,
    created_at {real} NOT NULL,
    disabled   INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS client_keys (
    id         TEXT PRIMARY KEY,
    client     TEXT NOT NULL,
    hash       TEXT NOT NULL UNIQUE,       -- SHA-256 of the key, hex: the key itself is never kept
    created_at {real} NOT NULL
);
CREATE TABLE IF NOT EXISTS client_secrets (
    client     TEXT NOT NULL,
    secret     TEXT NOT NULL,
    created_at {real} NOT NULL,
    until      {real}                      -- when it stops signing; NULL while it is the newest
);
CREATE TABLE IF NOT EXISTS deliveries (
    job_id          TEXT PRIMARY KEY,
    url             TEXT NOT NULL,
    payload         {bytes} NOT NULL,      -- the exact bytes every attempt sends
    status          TEXT NOT NULL,         -- pending | retrying | delivered | failed; stored, not
                                           -- derived, so the dead-letter index can use it
    attempts        INTEGER NOT NULL DEFAULT 0,
    round_start     INTEGER NOT NULL DEFAULT 0,  -- attempts made before this round
    next_attempt_at {real},                -- the durable schedule: set while pending or retrying
    last_error      TEXT,
    failed_at       {real},
    owner           TEXT                   -- the instance that sends it
);
CREATE INDEX IF NOT EXISTS dead_letter
    ON deliveries (failed_at) WHERE status = 'failed';
-- For the job list's filters on the rare statuses: small, since most jobs end completed and delivered.
CREATE INDEX IF NOT EXISTS jobs_not_completed ON jobs (id) WHERE status <> 'completed';
CREATE INDEX IF NOT EXISTS deliveries_not_delivered ON deliveries (job_id) WHERE status <> 'delivered';
CREATE TABLE IF NOT EXISTS attempts (
    job_id      TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    at          {real} NOT NULL,
    status_code INTEGER,
    error       TEXT,
    duration_ms {real} NOT NULL,
    response    TEXT,                      -- what the receiver answered, JSON, capped: ANSWER_BYTES
    redelivery  INTEGER NOT NULL DEFAULT 0,  -- 1 on the first attempt of a round a redelivery started
    PRIMARY KEY (job_id, attempt)
){without_rowid};
{owner_indexes}
"""

UPGRADES = {
    # From schema 2: jobs belong to clients, and an Idempotency-Key is a client's own.
    3: ("ALTER TABLE jobs ADD COLUMN client TEXT NOT NULL DEFAULT ''", "DROP INDEX IF EXISTS jobs_by_idempotency_key"),
    # From schema 3: attempts mark where a redelivery began. Of the rounds before, only the
    # current one can still be told, from its round_start.
    4: ("ALTER TABLE attempts ADD COLUMN redelivery INTEGER NOT NULL DEFAULT 0",
        "UPDATE attempts SET redelivery = 1 WHERE EXISTS (SELECT 1 FROM deliveries d WHERE d.job_id = attempts.job_id"
        " AND d.round_start > 0 AND attempts.attempt = d.round_start + 1)"),
}

Statement = tuple[str, Sequence[Any]]
Row = Sequence[Any]


class StoreUnavailable(Exception):
    """The database cannot be reached now: answer 503 with Retry-After, and try again later."""


def _log_failure(message: str, *args: Any) -> None:
    """Log the exception being handled, with its traceback unless it is the database being away."""
    error = sys.exc_info()[1]
    if isinstance(error, StoreUnavailable):  # the heartbeat says so once, not every loop at every try
        log.debug(message + ": %s", *args, error)
    else:
        log.exception(message, *args)


class StoreRefused(Exception):
    """This instance must not use the database at all (its file is in use, its schema is newer)."""


@dataclass(slots=True)
class Job:
    """A text to run the model on, and where to send the result."""

    id: str
    text: str
    webhook_url: str | None
    retry_policy: dict[str, Any] | None
    created_at: float
    client: str = ""  # '' for the operator's jobs


class Caller(NamedTuple):
    """Who is asking, decided once per request from its bearer key: whose jobs it sees, and
    whether it may manage clients. Every read of jobs takes one, so none can forget the scope."""

    client: str | None  # a client's name: its own jobs only; None: every job
    operator: bool = False  # holds --api-key

    @property
    def owner(self) -> str:
        """The client column of a job this caller submits: '' for the operator's."""
        return self.client or ""


ANYONE = Caller(None)  # neither --api-key nor a client exists: the open service of webhookd 1.1
OPERATOR = Caller(None, operator=True)


def _scope(caller: Caller) -> tuple[str, tuple[str, ...]]:
    """The condition on jobs j that keeps a query to the caller's jobs."""
    return ("", ()) if caller.client is None else (" AND j.client = ?", (caller.client,))


def new_job_id() -> str:
    """job-<32 hex>: the time in milliseconds, then 80 random bits, as in a UUIDv7.

    Ids in time order put SQLite's inserts at the end of its indexes instead of all over them,
    which measured a quarter less CPU per job in the db, and the random part keeps them unguessable.
    """
    return "job-%012x%s" % (time.time_ns() // 1_000_000, secrets.token_hex(10))


WHOLE_JOB_ID = re.compile(r"job-[0-9a-f]{32}")  # as new_job_id makes them


def job_id_at(moment: float) -> str:
    """Below every id of a job made at `moment` (Unix seconds) or later, above every earlier one."""
    return "job-%012x" % int(moment * 1000)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One job's webhook: the bytes to send and how far its attempts have got."""

    job_id: str
    url: str
    payload: bytes
    attempts: int
    round_start: int
    policy: RetryPolicy
    created_at: float  # when the job was submitted
    client: str = ""  # whose secrets sign it


class ClientInfo(NamedTuple):
    """A client as GET /clients shows it: never a key or a secret."""

    name: str
    created_at: float
    disabled: bool
    keys: list[tuple[str, float]]  # (key id, created_at), oldest first
    secrets: int  # still signing


class ClientKeys(NamedTuple):
    """What an instance keeps in memory to know its callers and sign for them."""

    clients: dict[str, bool]  # name -> disabled
    keys: dict[str, str]  # SHA-256 of a key, hex -> its client
    secrets: dict[str, list[tuple[str, float | None]]]  # client -> (secret, until), newest first


class Takeover(NamedTuple):
    """Work this instance has just become the owner of."""

    job_ids: list[str]  # unfinished jobs, oldest first: their texts are read a page at a time
    deliveries: list[tuple[float, str]]  # (next attempt time, job id) of pending and retrying ones


async def open_store(db: str, loops: Loops, timeout: float, instance: bool = True) -> Store:
    """The store --db names: a postgresql:// or postgres:// URL, else an SQLite file. With
    instance False (the command line), it runs no jobs: it neither locks the file nor joins."""
    if db.startswith(POSTGRES_SCHEMES):
        return await PostgresStore.open(db, loops, timeout, instance)
    return await SQLiteStore.open(db, loops, instance)


async def secret_in_db(db: str, timeout: float) -> str | None:
    """The generated secret kept in --db, if there is one, read without joining as an instance."""
    if db.startswith(POSTGRES_SCHEMES):
        return await PostgresStore.read_secret(db, timeout)
    return await SQLiteStore.read_secret(db)


class Store:
    """Jobs, deliveries and attempts in a database, and which instance owns each.

    Writes from all requests, workers and attempts share one transaction (group commit).
    Every write to a job or delivery under way names its owner, so an instance whose work was
    taken over while it was cut off writes nothing more to it. SQLiteStore and PostgresStore
    answer these methods in their own dialect; nothing else in webhookd asks which one it has.
    """

    MAX_WRITES_PER_COMMIT = 1000
    # How long an attempt's record may wait for other writes to share its commit. Nothing waits
    # on it but the status page (the webhook has gone), and at an ordinary load a commit alone
    # costs a job about 200 µs of CPU in SQLite's fsync.
    ATTEMPT_COMMIT_WAIT = 0.02
    BYTE_ORDER = ""  # how to compare text in byte order, if the database's own order may be another

    def __init__(self, loops: Loops) -> None:
        self.instance = _new_instance_id()
        self._pending: list[tuple[Sequence[Statement], asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._wake_later: asyncio.TimerHandle | None = None
        self.commits = 0  # since start-up
        self._closing = False
        self._listing = asyncio.Semaphore(LIST_QUERIES_AT_ONCE)
        self._committer = loops.start("committer", self._commit_forever)

    async def close(self) -> None:
        """Commit what is pending, then let the database go."""
        self._closing = True
        self._wake.set()
        await asyncio.gather(self._committer, return_exceptions=True)

    # Jobs

    async def add_job(self, job: Job, key: str | None = None, request_hash: str | None = None) -> None:
        """Commit a new job, owned by this instance; with a key already taken, nothing."""
        await self._write((
            "INSERT INTO jobs (id, text, webhook_url, retry_policy, status, created_at, idempotency_key,"
            " request_hash, owner, client) VALUES (?, ?, ?, ?, 'processing', ?, ?, ?, ?, ?)"
            " ON CONFLICT (client, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING",
            (job.id, job.text, job.webhook_url, job.retry_policy and json.dumps(job.retry_policy),
             job.created_at, key, request_hash, self.instance, job.client),
        ))

    async def job_with_key(self, client: str, key: str) -> Row | None:
        """(job id, has a webhook, request hash) of the job a client's Idempotency-Key stands for."""
        return await self._fetch_one(
            "SELECT id, webhook_url IS NOT NULL, request_hash FROM jobs WHERE client = ? AND idempotency_key = ?",
            (client, key),
        )

    async def job(self, caller: Caller, job_id: str) -> Row | None:
        """(status, result, error, created_at, completed_at, webhook_url, client) of a job the caller may see."""
        scope, params = _scope(caller)
        return await self._fetch_one(
            "SELECT status, result, error, created_at, completed_at, webhook_url, client FROM jobs j"
            f" WHERE id = ?{scope}", (job_id, *params),
        )

    async def unfinished_jobs(self, job_ids: list[str]) -> list[Job]:
        """Those of the jobs that are still unfinished and this instance's, oldest first."""
        marks = ",".join("?" * len(job_ids))
        rows = await self._fetch(
            "SELECT id, text, webhook_url, retry_policy, created_at, client FROM jobs"
            f" WHERE id IN ({marks}) AND status = 'processing' AND owner = ? ORDER BY id",
            (*job_ids, self.instance),
        )
        return [Job(row[0], row[1], row[2], _json_or_none(row[3]), row[4], row[5]) for row in rows]

    async def record_results(self, finished: Sequence[tuple[Job, str | None, str | None, bytes | None]],
                             completed_at: float) -> None:
        """Store each (job, result JSON, error, webhook body) and its delivery, due now."""
        statements: list[Statement] = []
        for job, result, error, payload in finished:
            statements.append((
                "UPDATE jobs SET status = ?, result = ?, error = ?, completed_at = ? WHERE id = ? AND owner = ?",
                ("completed" if error is None else "failed", result, error, completed_at, job.id, self.instance),
            ))
            if payload is not None:
                statements.append((
                    "INSERT INTO deliveries (job_id, url, payload, status, next_attempt_at, owner)"
                    " SELECT ?, ?, ?, 'pending', ?, ? WHERE EXISTS (SELECT 1 FROM jobs WHERE id = ? AND owner = ?)",
                    (job.id, job.webhook_url, payload, completed_at, self.instance, job.id, self.instance),
                ))
        await self._write(*statements)

    async def delete_finished(self, before: float, limit: int) -> int:
        """Delete up to `limit` jobs finished before `before` whose delivery is finished too (or
        that have none), with their deliveries and attempts; how many were deleted."""
        rows = await self._fetch(
            "SELECT j.id FROM jobs j LEFT JOIN deliveries d ON d.job_id = j.id"
            " WHERE j.id < ? AND j.status IN ('completed', 'failed') AND j.completed_at < ?"
            " AND (d.job_id IS NULL OR d.status IN ('delivered', 'failed'))"
            " ORDER BY j.id LIMIT ?",
            # Job ids begin with their creation time, so the oldest are first in the primary key.
            (job_id_at(before), before, limit),
        )
        if not rows:
            return 0
        ids = [row[0] for row in rows]
        marks = ",".join("?" * len(ids))
        # Each statement checks again, so a redelivery started meanwhile keeps its job.
        await self._write(
            (f"DELETE FROM deliveries WHERE job_id IN ({marks}) AND status IN ('delivered', 'failed')", ids),
            (f"DELETE FROM jobs WHERE id IN ({marks}) AND NOT EXISTS"
             " (SELECT 1 FROM deliveries d WHERE d.job_id = jobs.id)", ids),
            (f"DELETE FROM attempts WHERE job_id IN ({marks}) AND NOT EXISTS"
             " (SELECT 1 FROM jobs j WHERE j.id = attempts.job_id)", ids),
        )
        return len(ids)

    async def forget_idempotency_keys(self, before: float) -> None:
        """Clear the keys of jobs created before `before`."""
        await self._write((
            "UPDATE jobs SET idempotency_key = NULL, request_hash = NULL"
            " WHERE idempotency_key IS NOT NULL AND created_at < ?",
            (before,),
        ))

    # Deliveries and attempts

    async def webhook(self, caller: Caller, job_id: str) -> Row | None:
        """(webhook_url, delivery status or None, next_attempt_at, client) of a job the caller may see."""
        scope, params = _scope(caller)
        return await self._fetch_one(
            "SELECT j.webhook_url, d.status, d.next_attempt_at, j.client FROM jobs j"
            f" LEFT JOIN deliveries d ON d.job_id = j.id WHERE j.id = ?{scope}",
            (job_id, *params),
        )

    async def payload(self, caller: Caller, job_id: str) -> tuple[bytes, str] | None:
        """(the webhook body every attempt sends, the job's client) of a job the caller may see."""
        scope, params = _scope(caller)
        row = await self._fetch_one(
            f"SELECT d.payload, j.client FROM deliveries d JOIN jobs j ON j.id = d.job_id WHERE d.job_id = ?{scope}",
            (job_id, *params))
        return (bytes(row[0]), row[1]) if row else None

    async def attempts(self, caller: Caller, job_id: str) -> list[Row]:
        """(attempt, at, status_code, error, duration_ms, response JSON, redelivery) of every attempt, in order."""
        scope, params = _scope(caller)
        return await self._fetch(
            "SELECT a.attempt, a.at, a.status_code, a.error, a.duration_ms, a.response, a.redelivery FROM attempts a"
            f" JOIN jobs j ON j.id = a.job_id WHERE a.job_id = ?{scope} ORDER BY a.attempt",
            (job_id, *params),
        )

    async def dead_letter(self, caller: Caller, limit: int) -> list[Row]:
        """(job_id, url, attempts, last_error, failed_at) of failed deliveries, newest first."""
        scope, params = _scope(caller)
        return await self._fetch(
            "SELECT d.job_id, d.url, d.attempts, d.last_error, d.failed_at FROM deliveries d"
            f" JOIN jobs j ON j.id = d.job_id WHERE d.status = 'failed'{scope} ORDER BY d.failed_at DESC LIMIT ?",
            (*params, limit),
        )

    async def due_deliveries(self, job_ids: list[str]) -> list[Row]:
        """(job_id, url, payload, attempts, round_start, retry_policy, created_at, client) of those
        under way and ours."""
        marks = ",".join("?" * len(job_ids))
        return await self._fetch(
            "SELECT d.job_id, d.url, d.payload, d.attempts, d.round_start, j.retry_policy, j.created_at, j.client"
            " FROM deliveries d JOIN jobs j ON j.id = d.job_id"
            f" WHERE d.job_id IN ({marks}) AND d.status IN ('pending', 'retrying') AND d.owner = ?",
            (*job_ids, self.instance),
        )

    async def record_attempt(self, job_id: str, number: int, started: float, seconds: float,
                             status_code: int | None, error: str | None,
                             status: str, next_attempt_at: float | None, answer: str | None = None) -> None:
        """Store an attempt (with the receiver's answer, JSON, and whether a redelivery's round
        starts with it) and what it made of its delivery; with the next commit, at most
        ATTEMPT_COMMIT_WAIT later."""
        await self._write(
            ("INSERT INTO attempts (job_id, attempt, at, status_code, error, duration_ms, response, redelivery)"
             " SELECT ?, ?, ?, ?, ?, ?, ?, CASE WHEN round_start > 0 AND round_start + 1 = ? THEN 1 ELSE 0 END"
             " FROM deliveries WHERE job_id = ? AND owner = ? ON CONFLICT (job_id, attempt) DO NOTHING",
             (job_id, number, started, status_code, error, seconds * 1000, answer, number, job_id, self.instance)),
            ("UPDATE deliveries SET status = ?, attempts = ?, next_attempt_at = ?, last_error = ?,"
             " failed_at = ? WHERE job_id = ? AND owner = ?",
             (status, number, next_attempt_at, error, started if status == "failed" else None,
              job_id, self.instance)),
            wait=self.ATTEMPT_COMMIT_WAIT,
        )

    async def start_round(self, caller: Caller, job_id: str, now: float) -> bool:
        """Make a finished delivery pending again, owned by this instance; False if one is under way."""
        scope, params = _scope(caller)
        return bool(await self._start_rounds_of(
            "job_id = ? AND status IN ('delivered', 'failed')"
            f" AND EXISTS (SELECT 1 FROM jobs j WHERE j.id = deliveries.job_id{scope})", (job_id, *params), now))

    async def list_jobs(self, caller: Caller, statuses: Sequence[str], delivery_statuses: Sequence[str],
                        prefix: str | None, receiver: str | None, before: str | None, limit: int) -> list[Row]:
        """(job_id, status, created_at, completed_at, webhook_url, delivery_status, attempts,
        last_error, next_attempt_at, client) of jobs newest first, filtered, below the id `before`."""
        # Most jobs end completed and delivered: a filter on the other statuses reads small
        # partial indexes, spelt out for the planner. A pending delivery is a stored one, or the
        # webhook of a job still running, which has no delivery row yet: two sources, each read
        # newest first through its own index.
        scope, params = _scope(caller)
        common, params = [scope.removeprefix(" AND ")] if scope else [], [*params, *statuses]
        if statuses:
            common.append(f"j.status IN ({','.join('?' * len(statuses))})")
            if "completed" not in statuses:
                common.append("j.status <> 'completed'")
        if receiver:
            condition, patterns = _goes_to(receiver)
            common.append(condition)
            params.extend(patterns)
        page = (prefix, before, limit, self.BYTE_ORDER)
        if not delivery_statuses or "delivered" in delivery_statuses:
            if delivery_statuses:
                common.append(f"{DELIVERY_STATUS} IN ({','.join('?' * len(delivery_statuses))})")
            parts = [_job_page(ALL_JOBS, "j.id", common, [*params, *delivery_statuses], *page)]
        else:
            stored = [*common, "d.status <> 'delivered'", f"d.status IN ({','.join('?' * len(delivery_statuses))})"]
            parts = [_job_page(STORED_DELIVERIES, "d.job_id", stored, [*params, *delivery_statuses], *page)]
            if "pending" in delivery_statuses and (not statuses or "processing" in statuses):
                running = [*common, "j.status <> 'completed'", "j.status = 'processing'", "j.webhook_url IS NOT NULL",
                           "d.job_id IS NULL"]
                parts.append(_job_page(ALL_JOBS, "j.id", running, params, *page))
        async with self._listing:  # a burst of lists leaves the reads of requests and the engine room
            if len(parts) == 1:
                return await self._fetch(*parts[0])
            return await self._fetch(
                " UNION ALL ".join(f"SELECT * FROM ({sql}) AS part{n}" for n, (sql, _) in enumerate(parts))
                + " ORDER BY 1 DESC LIMIT ?",
                (*(param for _, part_params in parts for param in part_params), limit),
            )

    async def failed_between(self, caller: Caller, since: float, until: float, limit: int) -> int:
        """How many of the caller's deliveries became failed between `since` and `until` (at most `limit`)."""
        scope, params = _scope(caller)
        row = await self._fetch_one(
            f"SELECT count(*) FROM ({FAILED_BETWEEN.format(scope=scope)}) AS failed", (since, until, *params, limit))
        return row[0] if row else 0

    async def start_rounds(self, caller: Caller, since: float, until: float, limit: int, now: float) -> list[str]:
        """Make up to `limit` of the caller's deliveries that failed between `since` and `until`
        pending again, owned by this instance, oldest failure first; their job ids."""
        scope, params = _scope(caller)
        return await self._start_rounds_of(
            f"status = 'failed' AND job_id IN ({FAILED_BETWEEN.format(scope=scope)})", (since, until, *params, limit), now)

    async def _start_rounds_of(self, which: str, params: Sequence[Any], now: float) -> list[str]:
        rows = await self._change(
            "UPDATE deliveries SET status = 'pending', round_start = attempts, next_attempt_at = ?,"
            f" failed_at = NULL, owner = ? WHERE {which} RETURNING job_id",
            (now, self.instance, *params),
        )
        return [row[0] for row in rows]

    # The service

    async def secret(self, proposed: str) -> str:
        """The signing secret stored in the db; `proposed` becomes it if there is none yet."""
        await self._change(
            "INSERT INTO settings (name, value) VALUES ('secret', ?) ON CONFLICT (name) DO NOTHING RETURNING name",
            (proposed,),
        )
        row = await self._fetch_one("SELECT value FROM settings WHERE name = 'secret'")
        assert row is not None
        return row[0]

    # Clients

    async def add_client(self, name: str, key_id: str, key_hash: str, secret: str, now: float) -> bool:
        """Make a client with its first key and secret; False if the name is taken."""
        if await self._fetch_one("SELECT 1 FROM clients WHERE name = ?", (name,)):
            return False
        try:
            await self._write(("INSERT INTO clients (name, created_at) VALUES (?, ?)", (name, now)),
                              (ADD_KEY, (key_id, name, key_hash, now)), (ADD_SECRET, (name, secret, now)))
        except StoreUnavailable:
            raise
        except Exception:  # the same name made at the same moment elsewhere: its unique key refused ours
            if await self._fetch_one("SELECT 1 FROM clients WHERE name = ?", (name,)):
                return False
            raise
        return True

    async def clients(self, name: str | None = None) -> list[ClientInfo]:
        """Every client (or the one named), by name, with its key ids and how many secrets sign."""
        rows = await self._fetch(
            "SELECT name, created_at, disabled FROM clients WHERE name = coalesce(?, name) ORDER BY name", (name,))
        keys = await self._fetch("SELECT client, id, created_at FROM client_keys WHERE client = coalesce(?, client)"
                                 " ORDER BY created_at, id", (name,))
        signing = dict(await self._fetch("SELECT client, count(*) FROM client_secrets WHERE client = coalesce(?, client)"
                                         " AND (until IS NULL OR until > ?) GROUP BY client", (name, time.time())))
        return [ClientInfo(row[0], row[1], bool(row[2]), [(k[1], k[2]) for k in keys if k[0] == row[0]],
                           signing.get(row[0], 0)) for row in rows]

    async def add_key(self, name: str, key_id: str, key_hash: str, now: float) -> bool:
        """Give a client one more key; False if there is no such client."""
        return bool(await self._change(
            "INSERT INTO client_keys (id, client, hash, created_at) SELECT ?, ?, ?, ?"
            " WHERE EXISTS (SELECT 1 FROM clients WHERE name = ?) RETURNING id", (key_id, name, key_hash, now, name)))

    async def revoke_key(self, name: str, key_id: str) -> bool:
        """Delete a client's key; False if it has no such key."""
        return bool(await self._change("DELETE FROM client_keys WHERE client = ? AND id = ? RETURNING id",
                                       (name, key_id)))

    async def rotate_secret(self, name: str, secret: str, now: float, previous_until: float) -> bool:
        """Sign a client's webhooks with a new secret from now, and its previous ones until
        `previous_until` at the latest; False if there is no such client."""
        if not await self._fetch_one("SELECT 1 FROM clients WHERE name = ?", (name,)):
            return False
        await self._write(
            ("UPDATE client_secrets SET until = ? WHERE client = ? AND (until IS NULL OR until > ?)",
             (previous_until, name, previous_until)),
            (ADD_SECRET, (name, secret, now)),
        )
        return True

    async def set_disabled(self, name: str, disabled: bool) -> bool:
        """Disable or enable a client; False if there is no such client."""
        return bool(await self._change("UPDATE clients SET disabled = ? WHERE name = ? RETURNING name",
                                       (int(disabled), name)))

    async def client_keys(self, now: float) -> ClientKeys:
        """Every client, key hash and secret still signing at `now`: what an instance keeps in memory."""
        clients = {name: bool(disabled) for name, disabled in await self._fetch("SELECT name, disabled FROM clients")}
        keys = {key_hash: client for key_hash, client in await self._fetch("SELECT hash, client FROM client_keys")}
        secrets_: dict[str, list[tuple[str, float | None]]] = {}
        for client, secret, until in await self._fetch(
                "SELECT client, secret, until FROM client_secrets WHERE until IS NULL OR until > ?"
                " ORDER BY client, created_at DESC", (now,)):
            secrets_.setdefault(client, []).append((secret, until))
        return ClientKeys(clients, keys, secrets_)

    async def counts(self) -> tuple[dict[str, int], int]:
        """Jobs by status, and deliveries in the dead letter."""
        jobs = {status: count for status, count in await self._fetch("SELECT status, count(*) FROM jobs GROUP BY status")}
        dead = await self._fetch_one("SELECT count(*) FROM deliveries WHERE status = 'failed'")
        return jobs, dead[0] if dead else 0

    # Instances: heartbeat, takeover, hand-over (what each store does differs most here)

    async def heartbeat(self) -> bool:
        """Renew this instance's heartbeat; False if it was presumed dead and its work taken over."""
        raise NotImplementedError

    async def rejoin(self) -> None:
        """Join again under a new id, after the work of the old one was taken over."""
        raise NotImplementedError

    async def take_over(self, failover_after: float) -> Takeover:
        """Become the owner of the unfinished work of instances presumed dead."""
        raise NotImplementedError

    async def hand_over(self) -> None:
        """Leave this instance's unfinished work to the others at once (a graceful stop)."""
        raise NotImplementedError

    async def wait_for_news(self, seconds: float) -> None:
        """Sleep up to `seconds`, less if another instance has just handed its work over."""
        await asyncio.sleep(seconds)

    def problem(self) -> str | None:
        """Why the store cannot take writes now, if it knows without asking the database."""
        return None

    # What each store provides

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        raise NotImplementedError

    async def _change(self, sql: str, params: Sequence[Any]) -> list[Row]:
        """Run one statement in a transaction of its own, now; the rows it returns."""
        raise NotImplementedError

    async def _transaction(self, grouped: dict[str, list[Sequence[Any]]]) -> None:
        raise NotImplementedError

    # Group commit

    async def _fetch_one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        rows = await self._fetch(sql, params)
        return rows[0] if rows else None

    async def _write(self, *statements: Statement, wait: float = 0.0) -> None:
        """Run statements in one transaction, shared with other writers; return once committed.
        With a wait, the commit may be held up to that many seconds for other writes to share it."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._pending.append((statements, done))
        if not wait:
            self._wake.set()
        elif self._wake_later is None:
            self._wake_later = loop.call_later(wait, self._wake.set)
        await done

    async def _commit_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._wake_later is not None:
                self._wake_later.cancel()
                self._wake_later = None
            while self._pending:
                batch = self._pending[: self.MAX_WRITES_PER_COMMIT]
                del self._pending[: self.MAX_WRITES_PER_COMMIT]
                await self._commit(batch)
            if self._closing:
                return

    async def _commit(self, batch: list[tuple[Sequence[Statement], asyncio.Future[None]]]) -> None:
        # Grouping equal statements into one executemany keeps the round trips per commit
        # constant. It reorders statements across writes, which is safe because writes in
        # flight together never touch the same row.
        grouped: dict[str, list[Sequence[Any]]] = defaultdict(list)
        for statements, _ in batch:
            for sql, params in statements:
                grouped[sql].append(params)
        try:
            await self._transaction(grouped)
            self.commits += 1
        except Exception as exc:
            if len(batch) == 1 or isinstance(exc, StoreUnavailable):
                for _, done in batch:
                    _settle(done, exc)
                return
            # One bad write must not fail the others it happened to share a commit with.
            for one in batch:
                await self._commit([one])
            return
        for _, done in batch:
            _settle(done, None)


ADD_KEY = "INSERT INTO client_keys (id, client, hash, created_at) VALUES (?, ?, ?, ?)"
ADD_SECRET = "INSERT INTO client_secrets (client, secret, created_at) VALUES (?, ?, ?)"
FAILED_BETWEEN = ("SELECT d.job_id FROM deliveries d JOIN jobs j ON j.id = d.job_id WHERE d.status = 'failed'"
                  " AND d.failed_at >= ? AND d.failed_at <= ?{scope} ORDER BY d.failed_at LIMIT ?")
# A job with a webhook and no delivery row yet is still running: its delivery is pending.
DELIVERY_STATUS = "coalesce(d.status, CASE WHEN j.webhook_url IS NOT NULL THEN 'pending' END)"
ALL_JOBS = "jobs j LEFT JOIN deliveries d ON d.job_id = j.id"
STORED_DELIVERIES = "deliveries d JOIN jobs j ON j.id = d.job_id"
LIST_QUERIES_AT_ONCE = 2
RECEIVER = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9_.-]+)(?::([0-9]{1,5}))?")  # host, or host:port, lower case
DEFAULT_PORTS = {"http": "80", "https": "443"}
LIKE_URL = "(lower(j.webhook_url) || '/') LIKE ? ESCAPE '\\'"


def _goes_to(receiver: str) -> Statement:
    """The condition that a job's webhook_url goes to `receiver`: a host at any port, or
    host:port, the port written or the scheme's default."""
    host, port = RECEIVER.fullmatch(receiver).groups()  # type: ignore[union-attr]
    starts = [f"{scheme}://{host}" + (f":{port}" if port else "") for scheme in DEFAULT_PORTS]
    starts += [f"{scheme}://{host}" for scheme, default in DEFAULT_PORTS.items() if port == default]
    # The URL is kept as submitted, so compared lower-cased; userinfo is refused, so the host
    # follows the scheme, and the '/' appended ends a URL that has no path.
    patterns = [_literal_like(start) + end + "%" for start in starts for end in ("/?#" if port else "/?#:")]
    return (f"({' OR '.join([LIKE_URL] * len(patterns))})", patterns)


def _literal_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _job_page(source: str, key: str, conditions: list[str], params: list[Any], prefix: str | None,
              before: str | None, limit: int, byte_order: str) -> Statement:
    """One query of the job list: a page of `source`, newest first by `key`."""
    conditions, params = list(conditions), list(params)
    if prefix and WHOLE_JOB_ID.fullmatch(prefix):  # the primary key finds it
        conditions.append(f"{key} = ?")
        params.append(prefix)
    elif prefix:  # ids are ASCII, and '~' comes after every other ASCII character, in byte order
        conditions.append(f"{key}{byte_order} >= ? AND {key}{byte_order} < ?")
        params.extend((prefix, prefix + "~"))
    if before:
        conditions.append(f"{key} < ?")
        params.append(before)
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    return (f"SELECT j.id, j.status, j.created_at, j.completed_at, j.webhook_url, {DELIVERY_STATUS},"
            " coalesce(d.attempts, 0), d.last_error, d.next_attempt_at, j.client"
            f" FROM {source}{where} ORDER BY {key} DESC LIMIT ?", (*params, limit))


def _new_instance_id() -> str:
    return "instance-" + secrets.token_hex(6)


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _refuse_newer_schema(found: Any) -> None:
    if found is not None and int(found) > SCHEMA_VERSION:
        raise StoreRefused(
            f"the database has schema version {found}, newer than this webhookd ({__version__}) knows"
            f" ({SCHEMA_VERSION}); run a newer webhookd"
        )


def _upgrades(found: Any) -> list[str]:
    """The statements that bring a database of schema version `found` (None: a new one) to this one's."""
    since = SCHEMA_VERSION if found is None else int(found)
    return [statement for version in range(since + 1, SCHEMA_VERSION + 1) for statement in UPGRADES.get(version, ())]


def _takeover(jobs: list[Row], deliveries: list[Row]) -> Takeover:
    return Takeover(sorted(row[0] for row in jobs), [(when, job_id) for when, job_id in deliveries])


def _json_or_none(text: str | None) -> Any:
    return None if text is None else json.loads(text)


# ---------------------------------------------------------------------------
# Storage: SQLite
# ---------------------------------------------------------------------------


class SQLiteStore(Store):
    """One SQLite file, one instance: a connection that writes in group commits, another that reads.

    The instance holds an exclusive flock on the file while it runs (SQLite's own locks are
    fcntl locks, which flock does not touch), so a second instance on the same file refuses to
    start instead of running the unfinished jobs a second time.

    A -wal file deleted under a running instance holds commits that no later start would see:
    SQLite goes on writing to the deleted file. Found before a write or a health check, it
    costs a moment of 503s while every commit in it is written into the database file and a
    new log is started.
    """

    def __init__(self, path: str, writer: aiosqlite.Connection, reader: aiosqlite.Connection, lock: int,
                 loops: Loops) -> None:
        self._path = path
        self._writer = writer
        self._reader = reader
        self._lock = lock
        self._write_error: str | None = None  # why the last write failed, until one succeeds
        self._taken_over = False
        self._wal = _inode(path + "-wal")
        self._saving_wal: asyncio.Task[None] | None = None  # while the commits of a deleted -wal are saved
        super().__init__(loops)

    @classmethod
    async def open(cls, path: str, loops: Loops, instance: bool = True) -> SQLiteStore:
        """Open (or create) the database at path, in WAL mode, for this instance alone."""
        lock = _lock_file(path, exclusive=instance)
        # The sqlite3 module begins the transaction itself at the first write, so a commit's
        # statements and its COMMIT run in one call on the writer's thread (_commit_or_roll_back).
        writer = await aiosqlite.connect(path, isolation_level="DEFERRED")
        try:
            await writer.execute("PRAGMA journal_mode = WAL")
            # FULL makes "committed before the 202" true across a power cut, not only a crash;
            # group commit pays its fsync once per batch.
            await writer.execute("PRAGMA synchronous = FULL")
            # Pages that retention frees go on SQLite's free list and new jobs reuse them, so the
            # file stops growing at its steady-state size. INCREMENTAL or FULL would hand them
            # back to the file system only to take them again, moving pages at every commit.
            await writer.execute("PRAGMA auto_vacuum = NONE")
            await writer.execute("PRAGMA busy_timeout = 5000")
            await cls._create_schema(writer)
            reader = await _open_reader(path)
        except BaseException:
            await writer.close()
            os.close(lock)
            raise
        return cls(path, writer, reader, lock, loops)

    @staticmethod
    async def read_secret(path: str) -> str | None:
        """The generated secret, read without the lock, so also while an instance runs on the file."""
        if not os.path.exists(path):
            return None
        with contextlib.closing(sqlite3.connect(path)) as db:
            try:
                row = db.execute("SELECT value FROM settings WHERE name = 'secret'").fetchone()
            except sqlite3.Error:
                return None
        return row[0] if row else None

    @staticmethod
    async def _create_schema(writer: aiosqlite.Connection) -> None:
        version = None
        with contextlib.suppress(sqlite3.OperationalError):  # no settings table: a new file
            rows = await writer.execute_fetchall("SELECT value FROM settings WHERE name = 'schema_version'")
            version = int(rows[0][0]) if rows else 1
        _refuse_newer_schema(version)
        if version == 1:
            for table, column in (("jobs", "owner"), ("deliveries", "owner"), ("attempts", "response")):
                await writer.execute(f"ALTER TABLE {table} ADD COLUMN {column} TEXT")
        for statement in _upgrades(version):
            await writer.execute(statement)
        await writer.executescript(SCHEMA.format(real="REAL", bytes="BLOB", without_rowid=" WITHOUT ROWID",
                                                 owner_indexes=""))
        await writer.execute("INSERT OR REPLACE INTO settings (name, value) VALUES ('schema_version', ?)",
                             (str(SCHEMA_VERSION),))
        await writer.commit()

    async def close(self) -> None:
        await super().close()
        await self._reader.close()
        await self._writer.close()
        os.close(self._lock)

    async def heartbeat(self) -> bool:
        self.problem()  # finds a deleted -wal on a quiet service too
        if self._write_error:  # nothing else may write for a while: find out whether it has cleared
            await self._change("UPDATE settings SET value = value WHERE name = 'schema_version' RETURNING name", ())
        return True

    async def rejoin(self) -> None:
        pass

    def problem(self) -> str | None:
        try:
            self._check_file()
        except StoreUnavailable as exc:
            return str(exc)
        return self._write_error

    async def take_over(self, failover_after: float) -> Takeover:
        # The file is this instance's alone: at start-up every unfinished row is its own.
        if self._taken_over:
            return Takeover([], [])
        jobs = await self._change(
            "UPDATE jobs SET owner = ? WHERE status = 'processing'"
            " RETURNING id", (self.instance,))
        deliveries = await self._change(
            "UPDATE deliveries SET owner = ? WHERE status IN ('pending', 'retrying')"
            " RETURNING next_attempt_at, job_id", (self.instance,))
        self._taken_over = True  # only now: one the database refused comes again at the next heartbeat
        return _takeover(jobs, deliveries)

    async def hand_over(self) -> None:
        pass

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        if self._saving_wal:
            raise StoreUnavailable(WAL_SAVED)
        return list(await self._reader.execute_fetchall(sql, params))

    async def _change(self, sql: str, params: Sequence[Any]) -> list[Row]:
        return await self._committed(lambda connection: connection.execute(sql, params).fetchall())

    async def _transaction(self, grouped: dict[str, list[Sequence[Any]]]) -> None:
        def run(connection: sqlite3.Connection) -> None:
            for sql, rows in grouped.items():
                connection.executemany(sql, rows)

        await self._committed(run)

    async def _committed(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        self._check_file()
        try:
            result = await self._writer._execute(_commit_or_roll_back, work, self._writer._conn)
        except sqlite3.OperationalError as exc:  # a full disk, an I/O error, a read-only file
            self._write_error = f"the database cannot be written: {exc}"
            raise StoreUnavailable(self._write_error) from None
        self._write_error = None
        return result

    def _check_file(self) -> None:
        # Deleted or replaced, the file this instance holds open is no longer the one the next
        # start will open: what was written to it would be lost, the secret with it.
        try:
            gone = os.stat(self._path).st_ino != os.fstat(self._lock).st_ino
        except FileNotFoundError:
            gone = True
        if gone:
            raise StoreUnavailable(f"the database file {self._path} has gone from under webhookd")
        if self._saving_wal or _inode(self._path + "-wal") != self._wal:
            self._saving_wal = self._saving_wal or asyncio.get_running_loop().create_task(self._save_wal())
            raise StoreUnavailable(WAL_SAVED)

    async def _save_wal(self) -> None:
        # Leaving WAL mode checkpoints the deleted log into the database file, which needs the
        # writer alone on the file; entering it again starts a new -wal.
        log.error("%s-wal was deleted under webhookd; saving its commits into %s", self._path, self._path)
        try:
            await self._reader.close()
            await self._writer._execute(_start_a_new_wal, self._writer._conn)
            self._wal = _inode(self._path + "-wal")
            log.info("the commits of the deleted %s-wal are in %s, and a new one is started", self._path, self._path)
        except sqlite3.Error:
            log.exception("could not save the commits of the deleted %s-wal; trying again", self._path)
        finally:
            self._reader = await _open_reader(self._path)
            self._saving_wal = None


WAL_SAVED = "the database's -wal file was deleted; its commits are being saved"


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _start_a_new_wal(connection: sqlite3.Connection) -> None:
    connection.execute("PRAGMA journal_mode = DELETE")
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("SELECT 1 FROM settings").fetchall()  # SQLite makes the -wal at the first read


async def _open_reader(path: str) -> aiosqlite.Connection:
    reader = await aiosqlite.connect(path, isolation_level=None)
    await reader.execute("PRAGMA busy_timeout = 5000")
    return reader


def _commit_or_roll_back(work: Callable[[sqlite3.Connection], Any], connection: sqlite3.Connection) -> Any:
    # Run on aiosqlite's thread as one call: a commit of a few statements then costs one hand-off
    # to that thread and back, where a call per statement made it eight a job at low load.
    # aiosqlite has no public way to run a function there; _execute is what each of its own
    # methods calls.
    try:
        result = work(connection)
        connection.commit()
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            connection.rollback()
        raise
    return result


def _lock_file(path: str, exclusive: bool) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    # The file holds the generated secret; SQLite gives its -wal and -shm files the same mode.
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o600)
    if not exclusive:
        return fd
    try:
        import fcntl
    except ImportError:  # Windows: no flock, and no guard against a second instance
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreRefused(
            f"{path} is in use by another webhookd instance; an SQLite file serves one instance"
            " (for several, use --db postgresql://...)"
        ) from None
    return fd


# ---------------------------------------------------------------------------
# Storage: PostgreSQL
# ---------------------------------------------------------------------------


class PostgresStore(Store):
    """A PostgreSQL database shared by any number of instances.

    Each instance heartbeats one row of `instances`. One whose heartbeat is older than
    --failover-after is presumed dead, and the first live instance to delete its row takes its
    work. A takeover claims every unfinished row whose owner has no row in `instances`, not only
    the rows of the instances it deletes: an instance that wakes from a stall accepts jobs under
    its old id until its next heartbeat tells it that id is gone, and those rows are adopted at
    the next takeover of any instance, every fifth of --failover-after. Rows are claimed in one
    transaction, so each is taken once. A graceful stop ages its own heartbeat and NOTIFYs, so
    the others take over at once.
    """

    NEWS = "webhookd_handover"
    # A database made with a language's collation (en_US.UTF-8, ICU's) sorts '~' before letters.
    BYTE_ORDER = ' COLLATE "C"'
    SCHEMA_LOCK = 0x77656268  # pg_advisory_xact_lock key: "webh"

    def __init__(self, pool: Any, dsn: str, timeout: float, loops: Loops) -> None:
        self._pool = pool
        self._dsn = dsn
        self._timeout = timeout
        self._listener: Any = None
        self._news = asyncio.Event()
        self._unreachable: str | None = None  # why the last query found no database, until one does
        super().__init__(loops)

    @classmethod
    async def open(cls, dsn: str, loops: Loops, timeout: float, instance: bool = True) -> PostgresStore:
        """Connect, create or upgrade the schema under an advisory lock, and join as an instance."""
        # No floor of open connections (min_size 0): asyncpg would reconnect it in the background
        # while the database is away, logging a traceback at every try. The heartbeat reconnects,
        # and says once that the database has gone and once that it is back.
        pool = await asyncpg.create_pool(dsn, min_size=0, max_size=8, timeout=timeout,
                                         command_timeout=timeout, reset=_nothing_to_reset)
        try:
            await cls._create_schema(pool, dsn, timeout)
            store = cls(pool, dsn, timeout, loops)
            if instance:
                await store.rejoin()
        except BaseException:
            await pool.close()
            raise
        return store

    @classmethod
    async def _create_schema(cls, pool: Any, dsn: str, timeout: float) -> None:
        try:
            conn = await pool.acquire(timeout=timeout)
        except Exception as exc:
            raise _cannot_connect(dsn, exc) from None
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", cls.SCHEMA_LOCK)
                version = await conn.fetchval(
                    "SELECT value FROM settings WHERE name = 'schema_version'"
                ) if await conn.fetchval("SELECT to_regclass('settings') IS NOT NULL") else None
                _refuse_newer_schema(version)
                for statement in _upgrades(version):
                    await conn.execute(statement)
                await conn.execute(SCHEMA.format(real="DOUBLE PRECISION", bytes="BYTEA", without_rowid="",
                                                 owner_indexes=POSTGRES_OWNER_INDEXES))
                await conn.execute(
                    "INSERT INTO settings (name, value) VALUES ('schema_version', $1)"
                    " ON CONFLICT (name) DO UPDATE SET value = excluded.value", str(SCHEMA_VERSION))
        except asyncpg.InsufficientPrivilegeError:
            raise StoreRefused(await _cannot_create_tables(conn)) from None
        except asyncpg.PostgresError as exc:
            raise StoreRefused(f"cannot create webhookd's tables: {_pg_error(exc)}") from None
        finally:
            await pool.release(conn)

    @staticmethod
    async def read_secret(dsn: str, timeout: float) -> str | None:
        """The generated secret, read on a connection of its own, without joining as an instance."""
        try:
            conn = await asyncpg.connect(dsn, timeout=timeout)
        except Exception as exc:
            raise _cannot_connect(dsn, exc) from None
        try:
            return await conn.fetchval("SELECT value FROM settings WHERE name = 'secret'")
        except asyncpg.UndefinedTableError:  # no webhookd has used this database yet
            return None
        finally:
            await conn.close()

    async def close(self) -> None:
        await super().close()
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close(timeout=self._timeout)
        await self._pool.close()

    async def heartbeat(self) -> bool:
        rows = await self._change(
            f"UPDATE instances SET heartbeat_at = {DB_NOW} WHERE id = ? RETURNING id", (self.instance,))
        await self._listen()
        return bool(rows)

    async def rejoin(self) -> None:
        self.instance = _new_instance_id()
        await self._change(f"INSERT INTO instances (id, heartbeat_at) VALUES (?, {DB_NOW}) RETURNING id",
                           (self.instance,))

    async def take_over(self, failover_after: float) -> Takeover:
        async def claim(conn: Any) -> Takeover:
            gone = await conn.fetch(
                f"DELETE FROM instances WHERE heartbeat_at < {DB_NOW} - $1 AND id <> $2 RETURNING id, heartbeat_at",
                failover_after, self.instance)
            jobs = await conn.fetch(
                "UPDATE jobs SET owner = $1 WHERE status = 'processing' AND NOT EXISTS"
                " (SELECT 1 FROM instances i WHERE i.id = jobs.owner) RETURNING id", self.instance)
            deliveries = await conn.fetch(
                "UPDATE deliveries SET owner = $1 WHERE status IN ('pending', 'retrying') AND NOT EXISTS"
                " (SELECT 1 FROM instances i WHERE i.id = deliveries.owner) RETURNING next_attempt_at, job_id",
                self.instance)
            if gone or jobs or deliveries:
                log.info("took over %d jobs and %d deliveries%s", len(jobs), len(deliveries), _from_whom(gone))
            return _takeover(jobs, deliveries)

        return await self._connected(claim)

    async def hand_over(self) -> None:
        async def age(conn: Any) -> None:
            await conn.execute("UPDATE instances SET heartbeat_at = 0 WHERE id = $1", self.instance)
            await conn.execute(f"NOTIFY {self.NEWS}")

        try:
            await self._connected(age)
        except StoreUnavailable:
            log.warning("could not hand over: the others take over after --failover-after")

    async def wait_for_news(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._news.wait(), seconds)
        self._news.clear()

    async def _listen(self) -> None:
        # LISTEN needs a connection of its own, kept open; it is opened again after the
        # database comes back.
        if self._listener is not None and not self._listener.is_closed():
            return
        try:
            self._listener = await asyncpg.connect(self._dsn, timeout=self._timeout)
            await self._listener.add_listener(self.NEWS, lambda *_: self._news.set())
        except Exception as exc:
            self._listener = None
            log.warning("cannot LISTEN for hand-overs (%s); polling only", _pg_error(exc))

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return await self._connected(lambda conn: conn.fetch(_numbered(sql), *params), begin=False)

    async def _change(self, sql: str, params: Sequence[Any]) -> list[Row]:
        # One statement outside BEGIN ... COMMIT is a transaction of its own, in one round trip.
        return await self._fetch(sql, params)

    async def _transaction(self, grouped: dict[str, list[Sequence[Any]]]) -> None:
        async def run(conn: Any) -> None:
            for sql, rows in grouped.items():
                await conn.executemany(_numbered(sql), rows)

        # asyncpg's executemany is atomic on its own: a commit of one kind of statement, as a
        # quiet service's are, then takes one round trip where BEGIN and COMMIT made it three.
        await self._connected(run, begin=len(grouped) > 1)

    def problem(self) -> str | None:
        return self._unreachable

    async def _connected(self, work: Callable[[Any], Awaitable[Any]], begin: bool = True) -> Any:
        """Run work on a pooled connection, between BEGIN and COMMIT if begin."""
        try:
            async with self._pool.acquire(timeout=self._timeout) as conn:
                if not begin:
                    result = await work(conn)
                else:
                    async with conn.transaction():
                        result = await work(conn)
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                asyncpg.CannotConnectNowError, asyncpg.AdminShutdownError) as exc:
            self._unreachable = f"the database cannot be reached: {_pg_error(exc)}"
            raise StoreUnavailable(self._unreachable) from None
        self._unreachable = None
        return result


def _from_whom(gone: list[Row]) -> str:
    # hand_over ages a heartbeat to 0: such an instance stopped, where the others went silent.
    handed = [row[0] for row in gone if row[1] == 0]
    silent = [row[0] for row in gone if row[1] != 0]
    parts = [f"handed over by {', '.join(handed)}"] if handed else []
    parts += [f"from {', '.join(silent)}, presumed dead"] if silent else []
    return " " + "; ".join(parts or ["left by instances no longer alive"])


async def _nothing_to_reset(connection: Any) -> None:
    """In place of asyncpg's reset query, a round trip each time a connection goes back to the
    pool: nothing webhookd does on a pooled connection outlives its transaction (LISTEN has a
    connection of its own; the schema lock is a transaction's). asyncpg still rolls back a
    transaction left open."""


DB_NOW = "extract(epoch from clock_timestamp())"
POSTGRES_OWNER_INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner) WHERE status = 'processing';
CREATE INDEX IF NOT EXISTS deliveries_by_owner ON deliveries (owner) WHERE status IN ('pending', 'retrying');
"""


@functools.lru_cache(maxsize=1024)
def _numbered(sql: str) -> str:
    """SQLite's ? placeholders as PostgreSQL's $1, $2, ..."""
    count = itertools.count(1)
    return re.sub(r"\?", lambda _: f"${next(count)}", sql)


def _pg_error(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _cannot_connect(dsn: str, exc: BaseException) -> StoreRefused:
    return StoreRefused(f"cannot connect to {redacted(dsn)}: {_pg_error(exc)}")


async def _cannot_create_tables(conn: Any) -> str:
    # Since PostgreSQL 15 only the owner of a database may create in its schema public.
    user, database, schema = await conn.fetchrow(
        "SELECT current_user, current_database(), coalesce(current_schema(), 'public')")
    owner = f"createdb -O {user} {database}, or " if schema == "public" else ""
    return (f'role "{user}" may not create tables in schema {schema} of database "{database}":'
            f" {owner}GRANT CREATE ON SCHEMA {schema} TO {user}")


# ---------------------------------------------------------------------------
# Signing
# ---------------------------------------------------------------------------

SIGNATURE_TOLERANCE = 300  # Standard Webhooks: receivers reject timestamps 5 minutes off
MIN_KEY_BYTES = 16  # 128 bits: below that an HMAC key can be guessed


def signing_key(secret: str) -> bytes:
    """The HMAC key of a secret: base64-decoded after whsec_, else its UTF-8 bytes; at least
    MIN_KEY_BYTES, or a ValueError that says why without repeating the secret."""
    key = secret.encode()
    if secret.startswith("whsec_"):
        encoded = secret[len("whsec_"):]
        try:
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except binascii.Error:
            raise ValueError("a whsec_ secret must be base64 after the prefix") from None
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"a signing key must be at least {MIN_KEY_BYTES} bytes, and this one is {len(key)}")
    return key


def generate_secret() -> str:
    """A new random secret in the Standard Webhooks format."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


class Signer:
    """Signs webhook bodies with every current secret, each until its end (None: no end)."""

    def __init__(self, secrets_: Iterable[str], ends: Iterable[float | None] = ()) -> None:
        macs = [hmac.new(signing_key(s), digestmod=hashlib.sha256) for s in secrets_]
        if not macs:
            raise ValueError("at least one secret is needed to sign")
        self._keys = list(itertools.zip_longest(macs, ends))
        self._ending = any(end is not None for _, end in self._keys)

    def headers(self, webhook_id: str, payload: bytes, attempt: int, timestamp: int) -> dict[str, str]:
        """The headers of one attempt: X-Signature with the first secret, webhook-signature with all."""
        signed = b"%s.%d.%s" % (webhook_id.encode(), timestamp, payload)
        macs = [mac for mac, end in self._keys if not self._ending or end is None or end > timestamp]
        return {
            "Content-Type": "application/json",
            "X-Signature": "sha256=" + self._digest(macs[0], payload).hex(),
            "webhook-id": webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": " ".join(
                "v1," + base64.b64encode(self._digest(mac, signed)).decode() for mac in macs
            ),
            "X-Webhook-Attempt": str(attempt),
        }

    @staticmethod
    def _digest(mac: hmac.HMAC, message: bytes) -> bytes:
        # Copying a keyed HMAC skips hashing the key again for every message.
        mac = mac.copy()
        mac.update(message)
        return mac.digest()


def verify_x_signature(keys: Iterable[bytes], body: bytes, header: str | None) -> bool:
    """Whether X-Signature is sha256=<hex HMAC of the raw body> under one of the keys."""
    return any(
        hmac.compare_digest(header or "", "sha256=" + hmac.new(k, body, hashlib.sha256).hexdigest())
        for k in keys
    )


def verify_webhook_signature(keys: Iterable[bytes], body: bytes, headers: Any, now: float) -> str | None:
    """Why a Standard Webhooks signature does not verify, or None when it does."""
    webhook_id = headers.get("webhook-id", "")
    timestamp = headers.get("webhook-timestamp", "")
    if not webhook_id or not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
        return "missing webhook-id or webhook-timestamp"
    if abs(now - int(timestamp)) > SIGNATURE_TOLERANCE:
        return "webhook-timestamp is more than 5 minutes away"
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    expected = {base64.b64encode(hmac.new(k, signed, hashlib.sha256).digest()).decode() for k in keys}
    offered = [entry.partition(",")[2] for entry in headers.get("webhook-signature", "").split()]
    if any(hmac.compare_digest(o, e) for o in offered for e in expected):
        return None
    return "no webhook-signature entry matches"


# ---------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------

CLIENT_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
KEY_PREFIX = "whk_"  # so that secret scanners can tell a leaked key
KEY_ID = re.compile(r"key_[0-9a-f]{12}")


def new_client_key() -> tuple[str, str, str]:
    """(id, key, SHA-256 of the key, hex) of a new API key: 256 random bits, whk_ then base64url."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return "key_" + secrets.token_hex(6), key, key_hash(key)


def key_hash(key: str) -> str:
    """What the db keeps of a key. A slow hash buys nothing for 256 random bits."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


class Clients:
    """What this instance knows of the clients: whose each key is, who is disabled, and the signer
    of each client's webhooks; requests never wait on the db for them.

    Read from the db at start-up, after every change made through this instance, and every
    REFRESH_SECONDS, so that a change made on another instance or from the command line is in
    force here within that.
    """

    REFRESH_SECONDS = 2.0

    def __init__(self, store: Store, operator_signer: Signer) -> None:
        self._store = store
        self._operator_signer = operator_signer
        self._known = ClientKeys({}, {}, {})
        self._signers: dict[str, Signer] = {}

    @property
    def exist(self) -> bool:
        """Whether any client exists, so that every request needs a key."""
        return bool(self._known.clients)

    def client_of(self, key: str) -> str | None:
        """The client a key belongs to, or None."""
        # A dict keyed by the hash: the caller cannot steer which entries a lookup compares.
        return self._known.keys.get(key_hash(key))

    def is_disabled(self, client: str) -> bool:
        """Whether a client is disabled (its keys get 403; its work is still delivered)."""
        return self._known.clients.get(client, False)

    def signer(self, client: str) -> Signer:
        """The signer of a job's webhooks: its client's secrets, or the operator's for ''."""
        if not client:
            return self._operator_signer
        try:
            return self._signers[client]
        except KeyError:  # made on another instance within the last refresh: a moment's wait
            raise StoreUnavailable(f"the secrets of client {client} are not read yet") from None

    async def refresh(self) -> None:
        """Read every client, key hash and secret again."""
        known = await self._store.client_keys(time.time())
        self._signers = {client: Signer([s for s, _ in entries], [end for _, end in entries])
                         for client, entries in known.secrets.items()}
        self._known = known

    async def keep_fresh(self) -> None:
        """Refresh every REFRESH_SECONDS, for as long as the service runs."""
        while True:
            await asyncio.sleep(self.REFRESH_SECONDS)
            try:
                await self.refresh()
            except StoreUnavailable:
                pass  # the heartbeat says so; what is known stays in force


class ClientError(Exception):
    """A change to a client that cannot be made: the HTTP status, and why in a user's words."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# The changes to clients, the same over HTTP and from the command line: each returns what it
# shows, or raises ClientError.


async def make_client(store: Store, name: Any) -> dict[str, Any]:
    """A new client, with its first API key and its signing secret: the only time either is shown."""
    if not isinstance(name, str) or not CLIENT_NAME.fullmatch(name):
        raise ClientError(400, "a client's name is 1 to 64 of a-z 0-9 . _ -, starting with a letter or digit")
    key_id, key, hashed = new_client_key()
    secret, now = generate_secret(), time.time()
    if not await store.add_client(name, key_id, hashed, secret, now):
        raise ClientError(409, f"client {name} exists already")
    return {"name": name, "created_at": iso_time(now), "api_key": {"id": key_id, "key": key}, "secret": secret}


async def show_client(store: Store, name: str) -> dict[str, Any]:
    """A client, its key ids and how many secrets sign its webhooks."""
    found = await store.clients(name)
    if not found:
        raise ClientError(404, f"no client {name!r}")
    return _client_view(found[0])


async def list_clients(store: Store) -> dict[str, Any]:
    """Every client, by name."""
    return {"clients": [_client_view(client) for client in await store.clients()]}


async def add_client_key(store: Store, name: str) -> dict[str, Any]:
    """One more API key for a client, so that it can replace one without downtime."""
    key_id, key, hashed = new_client_key()
    if not await store.add_key(name, key_id, hashed, time.time()):
        raise ClientError(404, f"no client {name!r}")
    return {"id": key_id, "key": key}


async def revoke_client_key(store: Store, name: str, key_id: str) -> dict[str, Any]:
    """Refuse a client's key from now on."""
    if not await store.revoke_key(name, key_id):
        raise ClientError(404, f"client {name!r} has no key {key_id!r}")
    return {"id": key_id, "revoked": True}


async def rotate_client_secret(store: Store, name: str, overlap_hours: Any = 24) -> dict[str, Any]:
    """A new signing secret for a client; its previous ones keep signing for `overlap_hours`."""
    if isinstance(overlap_hours, bool) or not isinstance(overlap_hours, (int, float)) or not 0 <= overlap_hours <= 720:
        raise ClientError(400, "overlap_hours must be a number of hours from 0 to 720")
    secret, now = generate_secret(), time.time()
    until = now + overlap_hours * 3600
    if not await store.rotate_secret(name, secret, now, until):
        raise ClientError(404, f"no client {name!r}")
    return {"secret": secret, "previous_until": iso_time(until)}


async def disable_client(store: Store, name: str, disabled: Any) -> dict[str, Any]:
    """Refuse a client's keys (403), or accept them again; its accepted work is delivered either way."""
    if not isinstance(disabled, bool):
        raise ClientError(400, "disabled must be true or false")
    if not await store.set_disabled(name, disabled):
        raise ClientError(404, f"no client {name!r}")
    return await show_client(store, name)


def _client_view(client: ClientInfo) -> dict[str, Any]:
    return {"name": client.name, "created_at": iso_time(client.created_at), "disabled": client.disabled,
            "keys": [{"id": key_id, "created_at": iso_time(at)} for key_id, at in client.keys],
            "secrets": client.secrets}


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------

Model = Callable[[str], dict[str, Any]]
SENTIMENTS = ("positive", "negative", "neutral")


def vader_model() -> Model:
    """VADER, with the thresholds its authors recommend (compound >= 0.05 is positive).

    Confidence is how strongly VADER scores the text for the label it got: the size of the
    compound score for positive or negative, and the neutral share of the text for neutral.
    """
    analyzer = _linear_vader()

    def predict(text: str) -> dict[str, Any]:
        scores = analyzer.polarity_scores(text)
        compound = scores["compound"]
        if compound >= 0.05:
            return {"sentiment": "positive", "confidence": round(compound, 4)}
        if compound <= -0.05:
            return {"sentiment": "negative", "confidence": round(-compound, 4)}
        return {"sentiment": "neutral", "confidence": round(scores["neu"], 4)}

    return predict


def _linear_vader() -> Any:
    """VADER's SentimentIntensityAnalyzer, its scores unchanged, in time linear in the text.

    Stock VADER is quadratic in the number of words: for every sentiment word, its negation and
    idiom checks lower-case a copy of the whole text to read the three words before it and two
    after, and its "but" rule looks each score up with list.index. Emoji, each of which VADER
    turns into several words, make that huge: 4,000 emoji took 4.6 s, one 10,000-emoji text
    about a minute. Here the checks get those six words, and the "but" rule finds the same
    first-equal score with a heap per value, so every text gets exactly the scores stock VADER
    gives it (a test compares them on thousands of texts).
    """
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    class LinearVader(SentimentIntensityAnalyzer):  # type: ignore[misc]
        def sentiment_valence(self, valence: float, sentitext: Any, item: str, i: int, sentiments: list[float]) -> Any:
            words = sentitext.words_and_emoticons
            # Near an end the checks read past it and wrap round, as stock does; a short text
            # costs less as it is than the window would.
            if len(words) > WINDOWED_WORDS and 3 <= i <= len(words) - 3:
                sentitext = _Words(words[i - 3:i + 3], sentitext.is_cap_diff)
                i = 3
            return super().sentiment_valence(valence, sentitext, item, i, sentiments)

        @staticmethod
        def _but_check(words_and_emoticons: list[str], sentiments: list[float]) -> list[float]:
            lowered = [str(word).lower() for word in words_and_emoticons]
            if "but" not in lowered:
                return sentiments
            but = lowered.index("but")
            # As stock VADER: for each position in turn, the first score equal to the one found
            # there is halved before "but" and raised by half after it.
            where: dict[float, list[int]] = {}
            for index, score in enumerate(sentiments):
                where.setdefault(score, []).append(index)
            for position in range(len(sentiments)):
                score = sentiments[position]
                first = where[score]
                while sentiments[first[0]] != score:  # a score changed since: not there any more
                    heapq.heappop(first)
                index = first[0]
                if index != but:
                    sentiments[index] = changed = score * (0.5 if index < but else 1.5)
                    heapq.heappush(where.setdefault(changed, []), index)
            return sentiments

    return LinearVader()


WINDOWED_WORDS = 30


class _Words(NamedTuple):
    words_and_emoticons: list[str]
    is_cap_diff: bool


# VADER takes about 0.3 ms for 500 characters of ASCII text, less than handing it to a thread,
# so batches of up to this many ASCII characters run on the event loop; the rest (other
# scripts, emoji: several words a character) in a thread, so no text holds the loop.
VADER_INLINE_CHARS = 500


@functools.lru_cache(maxsize=None)
def load_model(spec: str) -> Model:
    """The model named by --model: "vader", or module:callable taking text."""
    if spec == "vader":
        return vader_model()
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"--model must be 'vader' or module:callable, not {spec!r}")
    try:
        model = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"--model {spec}: {exc}") from None
    if not callable(model):
        raise ValueError(f"--model {spec} is not callable")
    return model


def predict_all(model: Model, texts: list[str]) -> list[dict[str, Any] | Exception]:
    """Each text's prediction, or the exception it raised (on the event loop or in a model thread)."""
    results: list[dict[str, Any] | Exception] = []
    for text in texts:
        try:
            results.append(_checked_prediction(model(text)))
        except Exception as exc:  # a model's failure is one job's failure, never the worker's
            results.append(exc)
    return results


class InternalError(Exception):
    """A job that failed through a fault of webhookd's, not of the model."""


def _error_text(error: Exception) -> str:
    text = str(error) if isinstance(error, InternalError) else f"model error: {error}"
    # A model's message may hold anything, unpaired surrogates included; the db and JSON take UTF-8.
    return text.encode("utf-8", "backslashreplace").decode()


def _checked_prediction(prediction: Any) -> dict[str, Any]:
    if not isinstance(prediction, dict) or prediction.get("sentiment") not in SENTIMENTS:
        raise ValueError(f"the model returned {prediction!r}, not a sentiment of {SENTIMENTS}")
    confidence = prediction.get("confidence")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 <= confidence <= 1:
        raise ValueError(f"the model returned confidence {confidence!r}, not a number in 0..1")
    return {"sentiment": prediction["sentiment"], "confidence": float(confidence)}


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------

OUTCOMES = ("success", "http_error", "timeout", "connection_error", "blocked")


class Metrics:
    """What /metrics shows: gauges seeded from the db at start-up, counters since start-up, and
    prometheus_client's process and garbage-collector metrics, in a registry of this app's own."""

    MAX_LABELS = 100  # receivers, and clients, beyond these are counted together as "other"

    def __init__(self, jobs_by_status: dict[str, int], dead_letter: int) -> None:
        self.jobs: Counter[str] = Counter({"processing": 0, "completed": 0, "failed": 0})
        self.jobs.update(jobs_by_status)
        self.dead_letter = dead_letter
        self.attempts: Counter[str] = Counter()
        self.finished: Counter[str] = Counter({"delivered": 0, "failed": 0})
        self.by_receiver: Counter[tuple[str, bool]] = Counter()  # (receiver host, failed)
        self.attempt_seconds = Histogram((0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
        self.delivery_seconds = Histogram((0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                                           300.0, 1800.0, 3600.0, 21600.0, 86400.0))
        self._receivers: set[str] = set()
        self.by_client: Counter[tuple[str, str]] = Counter()  # (client, accepted | shed | delivered)
        self._clients: set[str] = set()
        self.shed = 0
        self.accepted = 0
        self.requests: Counter[tuple[str, str]] = Counter()  # (route, status class)
        self.request_seconds: dict[str, Histogram] = {}  # by route
        self.batch_seconds = Histogram((0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0))
        self.inference_seconds = Histogram((0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25))
        self._now = Gauges(0, 0, 0, 0.0)
        self.registry = CollectorRegistry(auto_describe=False)
        for collector in (ProcessCollector, GCCollector, PlatformCollector):
            collector(registry=self.registry)
        self.registry.register(self)

    def job_accepted(self, client: str) -> None:
        """Count a job committed as processing."""
        self.jobs["processing"] += 1
        self.accepted += 1
        self.client_event(client, "accepted")

    def job_shed(self, client: str) -> None:
        """Count a job refused past a backlog (503, or 429 for a client's own)."""
        self.shed += 1
        self.client_event(client, "shed")

    def client_event(self, client: str, event: str) -> None:
        """Count a client's job accepted, shed or delivered; the operator's ('') are not a client's."""
        if client:
            self.by_client[_capped(self._clients, client, self.MAX_LABELS), event] += 1

    def job_finished(self, failed: bool) -> None:
        """Move a job from processing to completed or failed."""
        self.jobs["processing"] -= 1
        self.jobs["failed" if failed else "completed"] += 1

    def attempt_made(self, outcome: str, seconds: float, receiver: str) -> None:
        """Count an attempt by outcome (one of OUTCOMES), duration and receiver host."""
        self.attempts[outcome] += 1
        self.attempt_seconds.observe(seconds)
        self.by_receiver[_capped(self._receivers, receiver, self.MAX_LABELS), outcome != "success"] += 1

    def delivery_finished(self, delivered: bool, since_submission: float, client: str) -> None:
        """Count a round that ended, delivered or in the dead letter."""
        self.finished["delivered" if delivered else "failed"] += 1
        self.dead_letter += not delivered
        if delivered:
            self.delivery_seconds.observe(since_submission)
            self.client_event(client, "delivered")

    def request_answered(self, route: str, status: int, seconds: float) -> None:
        """Count an API request by route template and status class, and time it."""
        self.requests[route, STATUS_CLASSES[status // 100]] += 1
        timing = self.request_seconds.get(route)
        if timing is None:
            timing = self.request_seconds[route] = Histogram(REQUEST_BUCKETS)
        timing.observe(seconds)

    def batch_predicted(self, jobs: int, seconds: float) -> None:
        """Time one batch through the model, and what each of its jobs cost."""
        self.batch_seconds.observe(seconds)
        self.inference_seconds.observe(seconds / jobs)

    def render(self, now: Gauges) -> bytes:
        """The Prometheus text exposition format: these metrics, the process's and the collector's."""
        self._now = now
        return generate_latest(self.registry)

    def collect(self) -> Iterable[Metric]:
        """The metrics as prometheus_client collects them, at each scrape (the hot path only adds to ints)."""
        python = ".".join(map(str, sys.version_info[:3]))
        yield _gauge("webhookd_build_info", "The running webhookd.", {(("version", __version__), ("python", python)): 1})
        yield _gauge("webhookd_jobs", "Jobs by status (seeded from the db at start-up).",
                     {(("status", s),): n for s, n in sorted(self.jobs.items())})
        yield _counter("webhookd_jobs_accepted_total", "Jobs accepted since start-up.", {(): self.accepted})
        yield _counter("webhookd_delivery_attempts_total", "Delivery attempts since start-up by outcome.",
                       {(("outcome", o),): self.attempts[o] for o in OUTCOMES})
        yield _counter("webhookd_receiver_attempts_total", "Delivery attempts since start-up by receiver host"
                       f" (the first {self.MAX_LABELS} seen; the rest as other) and result.",
                       {(("receiver", host), ("result", "failed" if failed else "ok")): n
                        for (host, failed), n in sorted(self.by_receiver.items())})
        yield _counter("webhookd_deliveries_finished_total", "Rounds of attempts since start-up that ended, by outcome.",
                       {(("outcome", o),): n for o, n in sorted(self.finished.items())})
        yield _counter("webhookd_jobs_shed_total", "POST /predict refused since start-up, past --max-backlog (503)"
                       " or a client's --client-backlog (429).", {(): self.shed})
        yield _counter("webhookd_client_jobs_total", "Each client's jobs since start-up: accepted, shed (429 or 503)"
                       f" and delivered (the first {self.MAX_LABELS} clients seen; the rest as other).",
                       {(("client", client), ("event", event)): n for (client, event), n in sorted(self.by_client.items())})
        yield _counter("webhookd_http_requests_total", "API requests since start-up by route and status class.",
                       {(("route", route), ("status", status)): n for (route, status), n in sorted(self.requests.items())})
        yield _gauge("webhookd_dead_letter_deliveries", "Deliveries that failed for good.", {(): self.dead_letter})
        now = self._now
        yield _gauge("webhookd_queue_depth", "Jobs accepted and not yet through inference (queued, or in a worker's"
                     " batch).", {(): now.queue_depth})
        yield _gauge("webhookd_deliveries_scheduled", "Deliveries waiting for a retry.", {(): now.scheduled})
        yield _gauge("webhookd_attempts_in_flight", "Delivery attempts under way.", {(): now.in_flight})
        yield _gauge("webhookd_oldest_due_delivery_seconds", "How long the oldest delivery that is due has waited"
                     " for a slot (0: none waits): how far behind the service is.", {(): now.oldest_due})
        yield self.attempt_seconds.family("webhookd_attempt_duration_seconds", "How long delivery attempts took.")
        yield self.delivery_seconds.family("webhookd_delivery_latency_seconds",
                                           "Submission to the 2xx that delivered the webhook.")
        yield self.batch_seconds.family("webhookd_inference_batch_duration_seconds", "How long a batch of jobs took"
                                        " in the model.")
        yield self.inference_seconds.family("webhookd_inference_job_duration_seconds", "What a job cost the model:"
                                            " its batch's time over its jobs.")
        timings = HistogramMetricFamily("webhookd_http_request_duration_seconds", "How long API requests took,"
                                        " by route.", labels=["route"])
        for route, timing in sorted(self.request_seconds.items()):
            timings.add_metric([route], *timing.buckets())
        yield timings


class Gauges(NamedTuple):
    """What /metrics reads of the engine and the workers at a scrape."""

    queue_depth: int
    scheduled: int
    in_flight: int
    oldest_due: float


STATUS_CLASSES = ("0xx", "1xx", "2xx", "3xx", "4xx", "5xx")
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class Histogram:
    """A histogram of seconds, kept as plain counts: an observation costs a bisection and two adds."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self._buckets = buckets
        self._counts = [0] * (len(buckets) + 1)  # per bucket, not cumulative: one increment an observation
        self._sum = 0.0
        self._count = 0

    def observe(self, seconds: float) -> None:
        """Count one observation."""
        self._sum += seconds
        self._count += 1
        self._counts[bisect.bisect_left(self._buckets, seconds)] += 1

    def buckets(self) -> tuple[list[tuple[str, float]], float]:
        """(cumulative buckets, +Inf last; the sum), as prometheus_client's HistogramMetricFamily takes them."""
        cumulative = itertools.accumulate(self._counts)
        return [(floatToGoString(b), n) for b, n in zip((*self._buckets, math.inf), cumulative)], self._sum

    def family(self, name: str, help: str) -> HistogramMetricFamily:
        """The histogram as a metric family."""
        buckets, total = self.buckets()
        return HistogramMetricFamily(name, help, buckets=buckets, sum_value=total)


def _counter(name: str, help: str, samples: dict[tuple[tuple[str, str], ...], float]) -> CounterMetricFamily:
    return _family(CounterMetricFamily(name, help, labels=_label_names(samples)), samples)


def _gauge(name: str, help: str, samples: dict[tuple[tuple[str, str], ...], float]) -> GaugeMetricFamily:
    return _family(GaugeMetricFamily(name, help, labels=_label_names(samples)), samples)


def _label_names(samples: dict[tuple[tuple[str, str], ...], float]) -> list[str]:
    return [name for name, _ in next(iter(samples), ())]


def _family(family: Any, samples: dict[tuple[tuple[str, str], ...], float]) -> Any:
    for labels, value in samples.items():
        family.add_metric([value for _, value in labels], value)
    return family


def _capped(seen: set[str], value: str, most: int) -> str:
    """value as a label, among the first `most` seen; "other" after them, so a series stays bounded."""
    if value not in seen and len(seen) < most:
        seen.add(value)
    return value if value in seen else "other"


# ---------------------------------------------------------------------------
# Delivery
# ---------------------------------------------------------------------------


def webhook_payload(job_id: str, result: dict[str, Any] | None, error: str | None, completed_at: float) -> bytes:
    """The webhook body, compact UTF-8 JSON; stored, so every attempt sends the same bytes."""
    body: dict[str, Any] = {
        "job_id": job_id,
        "status": "completed" if error is None else "failed",
        "result": result,
        "timestamp": iso_time(completed_at),
    }
    if error is not None:
        body["error"] = error
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def retry_delay(
    retry: int,
    policy: RetryPolicy,
    retry_after: float | None = None,
    draw: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before retry number `retry` (from 1), the receiver's Retry-After heard."""
    try:
        delay = min(policy.schedule[retry - 1] if policy.schedule else
                    policy.backoff_base * policy.backoff_factor ** (retry - 1), policy.backoff_max)
    except OverflowError:  # past what a float holds: today's bounds on retries and factor stay far below
        delay = policy.backoff_max
    delay *= 1 + policy.backoff_jitter * (2 * draw() - 1)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, policy.backoff_max)


def retry_schedule(policy: RetryPolicy) -> list[float]:
    """The waits before each retry of a round, jitter left out: [1, 2, 4] by default."""
    return [retry_delay(k, policy, draw=lambda: 0.5) for k in range(1, policy.max_retries + 1)]


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds asked for by a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return max(0.0, when.timestamp() - now)


# ---------------------------------------------------------------------------
# Delivery: where a webhook may go
# ---------------------------------------------------------------------------


class BadWebhookURL(ValueError):
    """A URL that parses but that no webhook can be sent to."""


class WebhookTarget(NamedTuple):
    """Where a webhook URL sends to, as delivery uses it."""

    url: URL
    host: str  # as sent: IDNA-encoded, never decoded again
    receiver: str  # scheme://host:port, the key of the per-receiver fair share


@functools.lru_cache(maxsize=4096)
def webhook_target(url: str) -> WebhookTarget:
    """The target of a webhook URL; ValueError (BadWebhookURL) says why it cannot be sent to.

    Submission calls this too, so a URL accepted with a 202 is one that delivery can parse,
    key and send (a 400 otherwise).
    """
    parsed = URL(url)
    host = parsed.raw_host
    if parsed.scheme not in ("http", "https"):
        raise BadWebhookURL("must be an absolute http:// or https:// URL")
    if not host:
        raise BadWebhookURL("has no host")
    if parsed.user is not None or parsed.password is not None:
        raise BadWebhookURL("must not contain user:password; receivers verify the signature instead")
    if _literal_address(host) is None:
        _check_host_name(host)
    return WebhookTarget(parsed, host, f"{parsed.scheme}://{host}:{parsed.port}")


def _target_or_invalid(url: str) -> WebhookTarget:
    """The target of a stored URL, or one named "invalid" (stored by an older version; its
    attempt says why it fails)."""
    try:
        return webhook_target(url)
    except ValueError:
        return _INVALID_TARGET


_INVALID_TARGET = WebhookTarget(URL(), "invalid", "invalid")


HOST_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")  # letters, digits, - and _


def _check_host_name(host: str) -> None:
    labels = host.removesuffix(".").split(".")
    if len(host) > 253 or not all(HOST_LABEL.fullmatch(label) for label in labels):
        raise BadWebhookURL(f"host {host!r} is not a valid host name")
    for label in labels:
        if label.startswith("xn--"):
            try:
                label.encode("ascii").decode("idna")
            except UnicodeError:
                raise BadWebhookURL(f"host {host!r} is not a valid internationalised name ({label!r})") from None


class BlockedAddress(OSError):
    """A webhook URL that leads to an address webhooks may not reach."""


def is_blocked_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether an address is loopback, private, link-local, multicast, reserved or unspecified."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo or (None, None))[1]
        if embedded is not None:
            address = embedded
    return (
        not address.is_global
        or address.is_multicast
        or address.is_reserved
        or getattr(address, "is_site_local", False)
    )


@functools.lru_cache(maxsize=4096)  # asked at every attempt, and the same hosts come again and again
def blocked_host(host: str) -> str | None:
    """Why a URL's host is refused without resolving it, or None; covers every IP spelling."""
    name = host.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return f"webhook_url host {host!r} is the local machine"
    address = _literal_address(name)
    if address is not None and is_blocked_address(address):
        return f"webhook_url host {host!r} is a private or reserved address ({address})"
    return None


def _literal_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        pass
    try:
        # What the socket layer accepts as IPv4 too: 127.1, 2130706433, 0x7f000001, 0177.0.0.1.
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


class PublicResolver(AbstractResolver):
    """Resolves host names like aiohttp does, then drops the addresses webhooks may not reach.

    The connector connects only to what this returns, so a name that resolves (or rebinds) to
    a private address cannot be used to reach one.
    """

    def __init__(self) -> None:
        self._resolver = aiohttp.DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._resolver.resolve(host, port, family)
        allowed = [r for r in results if not is_blocked_address(ipaddress.ip_address(r["host"]))]
        if not allowed:
            raise BlockedAddress(f"blocked: {host} resolves only to private or reserved addresses")
        return allowed

    async def close(self) -> None:
        await self._resolver.close()


# ---------------------------------------------------------------------------
# Delivery: the engine
# ---------------------------------------------------------------------------


def is_success(status_code: int | None) -> bool:
    """Whether a receiver's answer counts as delivered: any 2xx."""
    return status_code is not None and 200 <= status_code < 300


Item = TypeVar("Item")


class Turns(Generic[Item]):
    """Items waiting in a line per client (the operator's is ''), taken from the clients in
    turn: a burst of one client's items delays another client's next one by a turn, not by the
    whole burst. The inference queue is one; each receiver's due attempts are another."""

    def __init__(self) -> None:
        self._lines: OrderedDict[str, deque[Item]] = OrderedDict()  # the next turn first
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def held(self, client: str) -> int:
        """A client's items waiting."""
        line = self._lines.get(client)
        return len(line) if line else 0

    def append(self, client: str, item: Item) -> None:
        """Queue an item at the end of its client's line."""
        line = self._lines.get(client)
        if line is None:
            line = self._lines[client] = deque()
        line.append(item)
        self._size += 1

    def popleft(self) -> Item:
        """The next item of the client whose turn it is; its line then goes to the back."""
        client, line = next(iter(self._lines.items()))
        item = line.popleft()
        self._size -= 1
        if line:
            self._lines.move_to_end(client)
        else:
            del self._lines[client]
        return item

    def firsts(self) -> Iterator[Item]:
        """The item at the head of each client's line."""
        return (line[0] for line in self._lines.values())

    def clear(self) -> None:
        """Drop every item waiting."""
        self._lines.clear()
        self._size = 0


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt came to."""

    status_code: int | None
    error: str | None
    retry_after: float | None = None
    final: bool = False  # no retry whatever the policy says (410 Gone, a blocked address)
    answer: str | None = None  # the receiver's headers and first bytes, JSON, as the status shows them

    @property
    def success(self) -> bool:
        """Whether the receiver answered 2xx."""
        return is_success(self.status_code)

    @property
    def label(self) -> str:
        """The outcome's name in /metrics."""
        if self.success:
            return "success"
        if self.status_code is not None:
            return "http_error"
        error = self.error or ""
        return next((name for name in ("timeout", "blocked") if error.startswith(name)), "connection_error")


class Fence:
    """Whether this instance may start attempts: only while its heartbeat is fresh.

    An instance cut off from the db stops starting attempts half a --failover-after after its
    last heartbeat, well before the others may take its deliveries over, so the two never send
    the same attempt (one already in flight may arrive twice, as the contract allows).
    """

    def __init__(self) -> None:
        self._open_until = 0.0

    def is_open(self) -> bool:
        """Whether attempts may start now."""
        return time.monotonic() < self._open_until

    def open_until(self, moment: float) -> None:
        """Let attempts start until `moment` (time.monotonic())."""
        self._open_until = moment


class DeliveryEngine:
    """Sends webhooks: attempts now, retries on their schedule, each receiver given a fair share.

    Every delivery's next attempt time is in the db; in memory there is a heap of (monotonic
    time, job id) for the deliveries waiting for a retry, and the payload only of those about to
    be sent. Attempts run concurrently up to max_in_flight, shared round robin between receivers
    (scheme, host, port), and a receiver's turns between the clients whose webhooks it takes; an
    attempt holds its slot until the receiver has answered. Each receiver's own limit adapts: it
    starts at one attempt at a time, grows by one with each fast answer up to a quarter of the
    slots, and halves on a timeout or a connection error. Receivers not known to answer fast (new
    ones, and those whose last answer took over SLOW_SECONDS or never came) share at most half of
    the slots, so however many new receivers hang at once, the ones known to be fast keep the
    other half.
    """

    SLOW_SECONDS = 1.0
    REMEMBERED_RECEIVERS = 10_000

    def __init__(
        self, config: Config, store: Store, clients: Clients, session: aiohttp.ClientSession, metrics: Metrics,
        loops: Loops, fence: Fence,
    ) -> None:
        self._config = config
        self._loops = loops
        self._fence = fence
        self._store = store
        self._clients = clients
        self._session = session
        self._metrics = metrics
        self._per_receiver = max(1, config.max_in_flight // 4)
        self._slow_share = max(1, config.max_in_flight // 2)
        self._timers: list[tuple[float, str]] = []
        self._timer_wake = asyncio.Event()
        self._active: set[str] = set()  # job ids with a round under way
        self._queues: dict[str, Turns[tuple[float, Delivery]]] = {}  # by receiver: (monotonic due since, delivery)
        self._due_by_client: Counter[str] = Counter()
        self._busy: Counter[str] = Counter()
        self._ready: OrderedDict[str, None] = OrderedDict()  # receivers with work and a free slot
        self._limits: OrderedDict[str, float] = OrderedDict()  # receivers' own limits, oldest first
        self._fast: OrderedDict[str, None] = OrderedDict()  # receivers whose last answer was fast
        self._slow_in_flight = 0
        self._waiting_for_slow_share: OrderedDict[str, None] = OrderedDict()  # oldest first
        self._attempts: set[asyncio.Task[None]] = set()
        self._sending = 0  # attempts waiting for their receiver's answer
        self._stopping = False

    @property
    def scheduled(self) -> int:
        """Deliveries waiting for the time of their next attempt."""
        return len(self._timers)

    @property
    def in_flight(self) -> int:
        """Attempts under way."""
        return len(self._attempts)

    @property
    def due(self) -> int:
        """Attempts due and waiting for a slot."""
        return sum(map(len, self._queues.values()))

    @property
    def oldest_due(self) -> float:
        """Seconds the oldest attempt that is due has waited for a slot; 0 if none waits."""
        now = time.monotonic()
        return now - min((first[0] for queue in self._queues.values() for first in queue.firsts()), default=now)

    def held(self, client: str) -> int:
        """A client's attempts due and waiting for a slot."""
        return self._due_by_client[client]

    def start(self) -> None:
        """Start the timer that sends retries when they are due."""
        self._loops.start("timer", self._fire_timers)

    async def stop(self) -> None:
        """Start nothing new; give attempts in flight up to the timeout, then cancel them."""
        self._stopping = True
        await self._loops.stop("timer")
        if self._attempts:
            await asyncio.wait(self._attempts, timeout=self._config.timeout + 1)
        for task in self._attempts:
            task.cancel()
        await asyncio.gather(*self._attempts, return_exceptions=True)

    def resume(self) -> None:
        """Start the attempts that waited for the fence to open."""
        self._start_attempts()

    def forget(self) -> None:
        """Drop every delivery waiting here: another instance has taken them over."""
        self._timers.clear()
        self._queues.clear()
        self._due_by_client.clear()
        self._ready.clear()
        self._active.clear()

    def is_active(self, job_id: str) -> bool:
        """Whether a round of attempts for this job is under way."""
        return job_id in self._active

    def claim(self, job_id: str) -> None:
        """Mark a round as under way before it is stored, so that no second one starts."""
        self._active.add(job_id)

    def release(self, job_id: str) -> None:
        """Undo a claim whose round could not be stored."""
        self._active.discard(job_id)

    def send(self, delivery: Delivery) -> None:
        """Attempt a delivery as soon as a slot for its receiver is free."""
        self._active.add(delivery.job_id)
        receiver = _target_or_invalid(delivery.url).receiver
        queue = self._queues.get(receiver)
        if queue is None:
            queue = self._queues[receiver] = Turns()
        queue.append(delivery.client, (time.monotonic(), delivery))
        self._due_by_client[delivery.client] += 1
        self._mark_ready(receiver)
        self._start_attempts()

    def schedule(self, job_id: str, when: float) -> None:
        """Attempt a stored delivery at `when` (Unix seconds)."""
        self._active.add(job_id)
        # On the monotonic clock, so that a step of the wall clock delays no retry.
        heapq.heappush(self._timers, (time.monotonic() + when - time.time(), job_id))
        if self._timers[0][1] == job_id:  # the timer sleeps until the earliest; this is earlier
            self._timer_wake.set()

    async def _fire_timers(self) -> None:
        while True:
            now = time.monotonic()
            due: list[str] = []
            while self._timers and self._timers[0][0] <= now and len(due) < 500:
                due.append(heapq.heappop(self._timers)[1])
            if due:
                await self._send_stored(due)
                continue
            self._timer_wake.clear()
            wait = self._timers[0][0] - now if self._timers else None
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._timer_wake.wait(), wait)

    async def _send_stored(self, job_ids: list[str]) -> None:
        try:
            deliveries = await self._load(job_ids)
        except Exception:
            _log_failure("could not load %d due deliveries; trying again in 1 s", len(job_ids))
            for job_id in job_ids:
                self.schedule(job_id, time.time() + 1)
            await asyncio.sleep(1)
            return
        for delivery in deliveries:
            self.send(delivery)

    async def _load(self, job_ids: list[str]) -> list[Delivery]:
        rows = await self._store.due_deliveries(job_ids)
        found = {row[0] for row in rows}
        self._active.difference_update(set(job_ids) - found)
        return [
            Delivery(row[0], row[1], row[2], row[3], row[4],
                     self._config.retry.overridden(_json_or_none(row[5])), row[6], row[7])
            for row in rows
        ]

    def _has_room(self, receiver: str) -> bool:
        if self._busy[receiver] >= self._limits.get(receiver, 1):
            return False
        if receiver not in self._fast and self._slow_in_flight >= self._slow_share:
            self._waiting_for_slow_share.setdefault(receiver)
            return False
        return True

    def _mark_ready(self, receiver: str) -> None:
        if self._queues.get(receiver) and self._has_room(receiver):
            self._ready[receiver] = None

    def _start_attempts(self) -> None:
        # Round robin over receivers: each free slot goes to the receiver that waited longest.
        while (self._ready and self._sending < self._config.max_in_flight and not self._stopping
               and self._fence.is_open()):
            receiver, _ = self._ready.popitem(last=False)
            if not self._has_room(receiver):  # the slow receivers' share filled up meanwhile
                continue
            _, delivery = self._queues[receiver].popleft()
            self._due_by_client[delivery.client] -= 1
            slow = receiver not in self._fast
            self._busy[receiver] += 1
            self._slow_in_flight += slow
            self._sending += 1
            task = asyncio.create_task(self._attempt(delivery, receiver, slow))
            self._attempts.add(task)
            task.add_done_callback(lambda t, job_id=delivery.job_id: self._attempt_done(t, job_id))
            self._mark_ready(receiver)

    def _attempt_done(self, task: asyncio.Task[None], job_id: str) -> None:
        self._attempts.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("attempt for %s crashed; trying again in a minute", job_id, exc_info=task.exception())
            self.schedule(job_id, time.time() + 60)

    def _slot_freed(self, receiver: str, slow: bool) -> None:
        self._sending -= 1
        self._busy[receiver] -= 1
        self._slow_in_flight -= slow
        if self._busy[receiver] == 0 and not self._queues.get(receiver):
            del self._busy[receiver]
            self._queues.pop(receiver, None)
        # The slow receivers that waited for a share go before this one, or it would take the
        # slot it just freed again and again.
        waiting = [receiver]
        if slow:
            waiting[:0] = self._waiting_for_slow_share
            self._waiting_for_slow_share.clear()
        for other in waiting:
            self._mark_ready(other)
        self._start_attempts()

    async def _attempt(self, delivery: Delivery, receiver: str, slow: bool) -> None:
        owner = self._store.instance
        number = delivery.attempts + 1
        started = time.time()
        try:
            outcome, seconds = await self._answer_timed(delivery, receiver, number, started)
        except OutOfFiles:  # the service's own fault: no attempt was made, and none is charged
            log.warning("no file descriptor free to send %s; trying again in %g s", delivery.job_id, OUT_OF_FILES_PAUSE)
            self.schedule(delivery.job_id, time.time() + OUT_OF_FILES_PAUSE)
            return
        finally:
            # The receiver's slot is free once it has answered: the record below may wait for
            # a commit to share, and holding the slot meanwhile capped a receiver's rate.
            self._slot_freed(receiver, slow)
        status, next_attempt_at = self._next_step(delivery, number, outcome, time.time())
        await self._record_attempt(delivery, number, started, seconds, outcome, status, next_attempt_at)
        self._metrics.attempt_made(outcome.label, seconds, _target_or_invalid(delivery.url).host)
        if next_attempt_at is None:
            self._metrics.delivery_finished(outcome.success, time.time() - delivery.created_at, delivery.client)
        _log_attempt(delivery, number, outcome, seconds, next_attempt_at)
        if owner != self._store.instance:
            return  # taken over while in flight: its new owner goes on with it
        if next_attempt_at is None:
            self._active.discard(delivery.job_id)
        else:
            self.schedule(delivery.job_id, next_attempt_at)

    async def _answer_timed(self, delivery: Delivery, receiver: str, number: int,
                            started: float) -> tuple[Outcome, float]:
        """What the receiver made of the attempt and how long it took, its speed noted."""
        clock = time.perf_counter()
        try:
            outcome = await self._post(delivery, number, int(started))
        except OutOfFiles:
            raise
        except Exception as exc:  # a fault of webhookd's: a failed attempt, retried as any other
            log.exception("attempt %d of %s raised", number, delivery.job_id)
            outcome = Outcome(None, f"internal error: {type(exc).__name__}: {exc}")
        seconds = time.perf_counter() - clock
        self._note_speed(receiver, outcome, seconds)
        return outcome, seconds

    def _note_speed(self, receiver: str, outcome: Outcome, seconds: float) -> None:
        limit = self._limits.pop(receiver, 1.0)
        if outcome.status_code is not None and seconds <= self.SLOW_SECONDS:
            limit = min(limit + 1, self._per_receiver)
            self._fast[receiver] = None
            self._fast.move_to_end(receiver)
        else:
            self._fast.pop(receiver, None)
            if outcome.status_code is None:
                limit = max(limit / 2, 1.0)
        self._limits[receiver] = limit
        for remembered in (self._limits, self._fast):
            if len(remembered) > self.REMEMBERED_RECEIVERS:
                remembered.popitem(last=False)

    def _next_step(
        self, delivery: Delivery, number: int, outcome: Outcome, now: float
    ) -> tuple[str, float | None]:
        """The delivery's status after attempt `number`, and when to try again (None: never)."""
        if outcome.success:
            return "delivered", None
        retry = number - delivery.round_start
        if outcome.final or retry > delivery.policy.max_retries:
            return "failed", None
        return "retrying", now + retry_delay(retry, delivery.policy, outcome.retry_after)

    async def _record_attempt(
        self, delivery: Delivery, number: int, started: float, seconds: float,
        outcome: Outcome, status: str, next_attempt_at: float | None,
    ) -> None:
        # What the receiver answered is known: only the write is tried again, never the POST.
        pause = 0.1
        while True:
            try:
                return await self._store.record_attempt(
                    delivery.job_id, number, started, seconds, outcome.status_code, outcome.error,
                    status, next_attempt_at, outcome.answer)
            except Exception:
                _log_failure("could not store attempt %d of %s; trying again in %.1f s",
                             number, delivery.job_id, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 30)

    async def _post(self, delivery: Delivery, number: int, timestamp: int) -> Outcome:
        try:
            target = webhook_target(delivery.url)
        except ValueError as exc:
            return Outcome(None, f"invalid webhook_url: {exc}", final=True)
        if not self._config.allow_private_urls:
            # aiohttp connects to IP literals without asking the resolver, so check them here.
            reason = blocked_host(target.host)
            if reason:
                return Outcome(None, f"blocked: {reason}", final=True)
        headers = self._clients.signer(delivery.client).headers(delivery.job_id, delivery.payload, number, timestamp)
        try:
            async with self._session.post(
                target.url, data=delivery.payload, headers=headers, allow_redirects=False
            ) as response:
                return _outcome_of(response, timestamp, await _answer(response))
        except asyncio.TimeoutError:
            return Outcome(None, f"timeout: no complete answer within {self._config.timeout:g}s")
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, BlockedAddress):
                return Outcome(None, str(exc.os_error), final=True)
            _raise_if_out_of_files(exc.os_error)
            return Outcome(None, f"connection error: {exc.os_error.strerror or exc.os_error}")
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            _raise_if_out_of_files(exc)
            return Outcome(None, _attempt_error(exc, target.url))


OUT_OF_FILES_PAUSE = 1.0  # seconds before a delivery that found no file descriptor tries again


class OutOfFiles(Exception):
    """This process has no file descriptor free: a local fault, not the receiver's."""


def _raise_if_out_of_files(error: BaseException) -> None:
    if isinstance(error, OSError) and error.errno in (errno.EMFILE, errno.ENFILE):
        raise OutOfFiles(str(error)) from error


class BoundedConnector(aiohttp.TCPConnector):
    """aiohttp's connector, keeping at most `max_idle` idle keep-alive connections.

    Its own limit counts only the connections in use; idle ones to thousands of receivers
    would otherwise hold a file descriptor each until the keep-alive timeout.
    """

    def __init__(self, max_idle: int, **options: Any) -> None:
        super().__init__(**options)
        self._max_idle = max_idle

    def _release(self, key: Any, protocol: Any, *, should_close: bool = False) -> None:
        idle = sum(map(len, self._conns.values()))
        super()._release(key, protocol, should_close=should_close or idle >= self._max_idle)


# What is kept of each answer, headers and body each: enough for any error message a receiver
# writes, and at 4 attempts a job a few KiB a failing job, where Svix's 20 KB or Convoy's 50 KB
# would make the attempts the bulk of the database.
ANSWER_BYTES = 2048


async def _answer(response: aiohttp.ClientResponse) -> str:
    """The receiver's answer as the status endpoint shows it: headers and first bytes, JSON."""
    # Reading the answer lets the connection be reused; a receiver that sends more than
    # MAX_BODY_BYTES only gets its connection closed.
    if response.content_length is not None and response.content_length <= MAX_BODY_BYTES:
        body = await response.read()  # one read, where most answers are: short, and sized
        kept, received = body[:ANSWER_BYTES], len(body)
    else:
        kept, received = b"", 0
        async for chunk in response.content.iter_chunked(MAX_BODY_BYTES):
            kept += chunk[: ANSWER_BYTES - len(kept)]
            received += len(chunk)
            if received > MAX_BODY_BYTES:
                break
    headers: dict[str, str] = {}
    size = 0
    for raw_name, raw_value in response.raw_headers:
        name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
        size += len(name) + len(value)
        if size > ANSWER_BYTES:
            break
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return json.dumps({"headers": headers, "body": kept.decode("utf-8", "replace"),
                       "truncated": received > len(kept) or size > ANSWER_BYTES}, ensure_ascii=False)


def _attempt_error(exc: Exception, url: URL) -> str:
    """An exception as one line of an attempt's error: aiohttp's texts name the URL, whose query
    often holds a receiver's credential, and some span several lines."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    for spelling in {str(url), url.human_repr()}:
        text = text.replace(spelling, loggable_url(spelling))
    return text.replace(url.raw_query_string, "...") if url.raw_query_string else text


def _outcome_of(response: aiohttp.ClientResponse, now: float, answer: str) -> Outcome:
    code = response.status
    if is_success(code):
        return Outcome(code, None, answer=answer)
    if code == 410:
        return Outcome(code, "HTTP 410 Gone: the receiver asked for no more deliveries", final=True, answer=answer)
    retry_after = None
    if code in (429, 503):
        retry_after = parse_retry_after(response.headers.get("Retry-After"), now)
    if 300 <= code < 400:
        return Outcome(code, f"HTTP {code}: redirects are not followed", retry_after, answer=answer)
    return Outcome(code, f"HTTP {code}", retry_after, answer=answer)


def _log_attempt(delivery: Delivery, number: int, outcome: Outcome, seconds: float, next_at: float | None) -> None:
    # An ERROR only when a delivery ends in the dead letter: the line to alert on.
    if outcome.success:
        level, then = logging.INFO, "delivered"
    elif next_at is not None:
        level, then = logging.WARNING, f"retry in {next_at - time.time():.1f} s"
    else:
        level, then = logging.ERROR, "failed for good, in the dead-letter list"
    if not log.isEnabledFor(level):  # the line's fields cost more than the check, per attempt
        return
    kind = "redelivery attempt" if delivery.round_start else "attempt"
    url = loggable_url(delivery.url)
    answer = outcome.status_code if outcome.success else outcome.error
    fields = {"job_id": delivery.job_id, "client": delivery.client or None, "attempt": number,
              "redelivery": delivery.round_start > 0, "url": url, "status_code": outcome.status_code,
              "error": outcome.error, "duration_ms": round(seconds * 1000, 1), "next_attempt_at": iso_time(next_at)}
    whose = f" of client {delivery.client}" if delivery.client else ""
    log.log(level, "%s %s%s #%d %s -> %s in %.1f ms; %s", kind, delivery.job_id, whose, number, url, answer,
            seconds * 1000, then, extra={"fields": fields})


def loggable_url(url: str) -> str:
    """A webhook URL fit for a log line: without its query, where receivers often put a credential."""
    try:
        parsed = URL(url)
    except ValueError:
        return "<an invalid URL>"
    return str(parsed.with_query(None).with_fragment(None)) + ("?..." if parsed.raw_query_string else "")


# ---------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------


class FairQueue(Turns[Job]):
    """Jobs waiting for inference, taken from the clients in turn, so a batch is filled from
    several clients."""

    def __init__(self) -> None:
        super().__init__()
        self._arrived = asyncio.Event()

    def qsize(self) -> int:
        """Jobs waiting, of every client."""
        return len(self)

    def empty(self) -> bool:
        """Whether no job waits."""
        return not self

    def put_nowait(self, job: Job) -> None:
        """Queue a job at the end of its client's line."""
        self.append(job.client, job)
        self._arrived.set()

    def get_nowait(self) -> Job:
        """The next job of the client whose turn it is."""
        return self.popleft()

    async def get(self) -> Job:
        """The next job, once there is one."""
        while not self:
            self._arrived.clear()
            await self._arrived.wait()
        return self.popleft()


RESUME_PAGE = 500  # taken-over jobs read from the db at a time


class InferenceWorkers:
    """Coroutines that take jobs off the queue, predict, store the result and hand on the webhook.

    Jobs waiting in the queue are predicted together. A plug-in model, and VADER on batches
    over VADER_INLINE_CHARS or with non-ASCII text, run in a thread, so a slow model never
    blocks the event loop. Jobs taken over (at start-up, or from an instance presumed dead)
    wait as ids and are read from the db a page at a time, as the queue runs low: a backlog of
    any size costs memory for a page, not for every text in it.
    """

    MAX_BATCH = 64

    def __init__(
        self, config: Config, store: Store, engine: DeliveryEngine, model: Model, metrics: Metrics,
        loops: Loops,
    ) -> None:
        self.queue = FairQueue()
        self._config = config
        self._loops = loops
        self._store = store
        self._engine = engine
        self._model = model
        self._metrics = metrics
        self._inline_chars = VADER_INLINE_CHARS if config.model == "vader" else 0
        # VADER holds the GIL: a batch split over threads would only add hand-offs. A plug-in
        # model may wait on something else, so its batch is split for --workers texts at once.
        self._parts = 1 if config.model == "vader" else config.workers
        self._threads = ThreadPoolExecutor(config.workers, thread_name_prefix="webhookd-model")
        self._names = [f"worker-{n}" for n in range(config.workers)]
        self._taken = 0  # jobs in a worker's batch, not yet finished
        self._to_resume: deque[str] = deque()  # ids of jobs taken over, not yet queued
        self._resume_wake = asyncio.Event()

    @property
    def depth(self) -> int:
        """Jobs accepted and not yet through inference: taken over, queued, or in a worker's batch."""
        return len(self._to_resume) + self.queue.qsize() + self._taken

    def start(self) -> None:
        """Start the workers."""
        for name in self._names:
            self._loops.start(name, self._work)
        self._loops.start("resume", self._resume_jobs)

    def resume(self, job_ids: list[str]) -> None:
        """Run jobs taken over, oldest first, after those queued now."""
        self._to_resume.extend(job_ids)
        self._resume_wake.set()

    def forget(self) -> None:
        """Drop every queued job: another instance has taken them over."""
        self._to_resume.clear()
        self.queue.clear()

    async def stop(self) -> None:
        """Stop the workers; jobs not finished stay `processing` in the db and run next start."""
        await asyncio.gather(*map(self._loops.stop, ["resume", *self._names]))
        self._threads.shutdown(wait=False, cancel_futures=True)

    async def _resume_jobs(self) -> None:
        while True:
            await self._resume_wake.wait()
            while self._to_resume:
                if self.queue.qsize() >= RESUME_PAGE:
                    await asyncio.sleep(0.05)
                    continue
                page = [self._to_resume.popleft() for _ in range(min(RESUME_PAGE, len(self._to_resume)))]
                try:
                    jobs = await self._store.unfinished_jobs(page)
                except StoreUnavailable:
                    self._to_resume.extendleft(reversed(page))
                    await asyncio.sleep(1)
                    continue
                for job in jobs:
                    self.queue.put_nowait(job)
            self._resume_wake.clear()

    async def _work(self) -> None:
        while True:
            jobs = [await self.queue.get()]
            while len(jobs) < self.MAX_BATCH and not self.queue.empty():
                jobs.append(self.queue.get_nowait())
            self._taken += len(jobs)
            try:
                await self._finish(jobs, await self._predict([job.text for job in jobs]))
            except Exception:
                # Not the model's error (predict_all keeps those) nor the db's (_finish retries):
                # a fault of webhookd's own, which must cost no job but the one that causes it.
                log.exception("a batch of %d jobs raised; running each alone", len(jobs))
                for job in jobs:
                    await self._run_alone(job)
            finally:
                self._taken -= len(jobs)

    async def _run_alone(self, job: Job) -> None:
        try:
            await self._finish([job], await self._predict([job.text]))
        except Exception as exc:
            log.exception("job %s raised; it fails", job.id)
            await self._finish([job], [InternalError(f"internal error: {type(exc).__name__}: {exc}")])

    async def _finish(self, jobs: list[Job], outcomes: list[dict[str, Any] | Exception]) -> None:
        """Record the outcomes and send the webhooks; if the db fails, run the jobs again later."""
        owner = self._store.instance
        try:
            deliveries = await self._record_results(jobs, outcomes)
        except Exception:
            _log_failure("could not store %d results; running those jobs again in 1 s", len(jobs))
            await asyncio.sleep(1)
            if owner == self._store.instance:
                for job in jobs:
                    self.queue.put_nowait(job)
            return
        if owner != self._store.instance:
            return  # taken over meanwhile: the new owner runs them, and nothing of ours was stored
        for delivery in deliveries:
            self._engine.send(delivery)

    async def _predict(self, texts: list[str]) -> list[dict[str, Any] | Exception]:
        started = time.perf_counter()
        outcomes = await self._predict_here_or_in_threads(texts)
        self._metrics.batch_predicted(len(texts), time.perf_counter() - started)
        return outcomes

    async def _predict_here_or_in_threads(self, texts: list[str]) -> list[dict[str, Any] | Exception]:
        if sum(map(len, texts)) <= self._inline_chars and all(map(str.isascii, texts)):
            return predict_all(self._model, texts)
        loop = asyncio.get_running_loop()
        size = -(-len(texts) // self._parts)
        parts = await asyncio.gather(*(
            loop.run_in_executor(self._threads, predict_all, self._model, texts[start:start + size])
            for start in range(0, len(texts), size)
        ))
        return [outcome for part in parts for outcome in part]

    async def _record_results(
        self, jobs: list[Job], outcomes: list[dict[str, Any] | Exception]
    ) -> list[Delivery]:
        """Store each job's result and its webhook, due now; the deliveries to send."""
        now = time.time()
        finished: list[tuple[Job, str | None, str | None, bytes | None]] = []
        deliveries: list[Delivery] = []
        for job, outcome in zip(jobs, outcomes):
            result, error = (None, _error_text(outcome)) if isinstance(outcome, Exception) else (outcome, None)
            if error:
                log.warning("job %s failed: %s", job.id, error)
            payload = webhook_payload(job.id, result, error, now) if job.webhook_url else None
            finished.append((job, result and json.dumps(result), error, payload))
            if payload is not None:
                policy = self._config.retry.overridden(job.retry_policy)
                deliveries.append(Delivery(job.id, job.webhook_url, payload, 0, 0, policy, job.created_at, job.client))
        await self._store.record_results(finished, now)
        for outcome in outcomes:
            self._metrics.job_finished(failed=isinstance(outcome, Exception))
        return deliveries


# ---------------------------------------------------------------------------
# Instances
# ---------------------------------------------------------------------------


class Instance:
    """This instance among those sharing the db: it heartbeats, fences itself when it cannot,
    and takes over the work of instances presumed dead.

    The heartbeat is renewed every fifth of --failover-after; each renewal opens the fence for
    half of it. With SQLite there is one instance, and its only takeover is at start-up: every
    unfinished row in the file.
    """

    def __init__(self, config: Config, store: Store, workers: InferenceWorkers, engine: DeliveryEngine,
                 fence: Fence, loops: Loops) -> None:
        self._config = config
        self._store = store
        self._workers = workers
        self._engine = engine
        self._fence = fence
        self._loops = loops
        self._reachable = True

    async def start(self) -> Takeover:
        """Heartbeat, take over what was left unfinished, and keep doing both; what was taken."""
        await self._renew()
        takeover = await self._take_over()
        self._loops.start("heartbeat", self._keep_alive)
        return takeover

    async def stop(self) -> None:
        """Stop heartbeating (the store hands the work over once the rest has stopped)."""
        await self._loops.stop("heartbeat")

    async def _keep_alive(self) -> None:
        while True:
            await self._store.wait_for_news(self._config.failover_after / 5)
            await self._renew()
            await self._take_over()

    async def _renew(self) -> None:
        sent = time.monotonic()
        try:
            if not await self._store.heartbeat():
                log.warning("%s was presumed dead and its work taken over; dropping it and rejoining",
                            self._store.instance)
                self._workers.forget()
                self._engine.forget()
                await self._store.rejoin()
        except StoreUnavailable as exc:
            if self._reachable:
                log.warning("cannot heartbeat, so no attempt starts until the database is back: %s", exc)
            self._reachable = False
            return
        if not self._reachable:
            log.info("the database is back; %s carries on", self._store.instance)
        self._reachable = True
        self._fence.open_until(sent + self._config.failover_after / 2)
        self._engine.resume()

    async def _take_over(self) -> Takeover:
        try:
            takeover = await self._store.take_over(self._config.failover_after)
        except StoreUnavailable:
            return Takeover([], [])
        if takeover.job_ids:
            self._workers.resume(takeover.job_ids)
        for when, job_id in takeover.deliveries:
            self._engine.schedule(job_id, when)
        return takeover


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------


CONFIG = web.AppKey("config", Config)
STORE = web.AppKey("store", Store)
ENGINE = web.AppKey("engine", DeliveryEngine)
WORKERS = web.AppKey("workers", InferenceWorkers)
METRICS = web.AppKey("metrics", Metrics)
LOOPS = web.AppKey("loops", Loops)
FENCE = web.AppKey("fence", Fence)
REQUESTS_BY_ADDRESS = web.AppKey("requests_by_address", Counter[str])
CLIENTS = web.AppKey("clients", Clients)
IDEMPOTENCY_IN_PROGRESS = web.AppKey("idempotency_in_progress", dict[tuple[str, str], asyncio.Future[None]])
CALLER = web.RequestKey("caller", Caller)  # who is asking: set by the admission middleware

# Open without --api-key: the health check, the API description and the page (which asks for the key)
# with its icon.
OPEN_PATHS = ("/healthz", "/openapi.json", "/", "/ui", "/favicon.ico")


async def predict(request: web.Request) -> web.Response:
    """POST /predict: accept a job, commit it, queue it; 202 with its id."""
    config = request.app[CONFIG]
    caller = request[CALLER]
    _require_json_content_type(request)
    body = await _read_body(request)
    _shed_past_the_backlog(request.app, caller)
    fields = parse_json_object(body)
    job = job_from_fields(fields, config.allow_private_urls, caller.owner)
    key = _idempotency_key(request)
    if key is None:
        await _add_job(request.app, job)
        return web.json_response(_accepted(job.id, job.webhook_url is not None), status=202)
    job_id, registered, replayed = await _add_job_once(request.app, job, key, _request_hash(fields))
    headers = {"Idempotent-Replayed": "true"} if replayed else None
    return web.json_response(_accepted(job_id, registered), status=202, headers=headers)


async def get_job(request: web.Request) -> web.Response:
    """GET /jobs/{job_id}: the job, its status and result."""
    job_id = _job_id(request)
    row = await request.app[STORE].job(request[CALLER], job_id)
    if row is None:
        raise web.HTTPNotFound(text=f"no job {job_id!r}")
    return web.json_response({
        "job_id": job_id,
        "status": row[0],
        "result": _json_or_none(row[1]),
        "error": row[2],
        "created_at": iso_time(row[3]),
        "completed_at": iso_time(row[4]),
        "webhook_url": row[5],
        "client": row[6] or None,
    })


async def webhook_status(request: web.Request) -> web.Response:
    """GET /webhooks/{job_id}/status: the delivery's status and every attempt."""
    job_id = _job_id(request)
    store, caller = request.app[STORE], request[CALLER]
    webhook = await _find_webhook(store, caller, job_id)
    attempts = await store.attempts(caller, job_id)
    return web.json_response({
        "job_id": job_id,
        "client": webhook.client or None,
        "webhook_url": webhook.url,
        "delivery_status": webhook.status,
        "next_attempt_at": iso_time(webhook.next_attempt_at),
        "attempts": [
            {
                "attempt": number,
                "timestamp": iso_time(at),
                "status_code": code,
                "success": is_success(code),
                "error": error,
                "duration_ms": round(duration_ms, 1),
                "redelivery": bool(redelivery),
                **({"response": json.loads(answer)} if answer else {}),
            }
            for number, at, code, error, duration_ms, answer, redelivery in attempts
        ],
    })


async def dead_letter(request: web.Request) -> web.Response:
    """GET /webhooks/dead-letter: deliveries that failed for good, newest first."""
    limit = _limit(request.query.get("limit", "100"))
    rows = await request.app[STORE].dead_letter(request[CALLER], limit)
    return web.json_response({
        "deliveries": [
            {"job_id": job_id, "webhook_url": url, "attempts": attempts,
             "last_error": error, "failed_at": iso_time(failed_at)}
            for job_id, url, attempts, error, failed_at in rows
        ]
    })


async def redeliver(request: web.Request) -> web.Response:
    """POST /webhooks/{job_id}/redeliver: a new round of attempts, same body and webhook-id."""
    job_id = _job_id(request)
    app, caller = request.app, request[CALLER]
    webhook = await _find_webhook(app[STORE], caller, job_id)
    engine = app[ENGINE]
    if engine.is_active(job_id) or webhook.status in ("pending", "retrying"):
        raise web.HTTPConflict(text=f"job {job_id} still has a round of attempts under way ({webhook.status})")
    engine.claim(job_id)
    now = time.time()
    try:
        started = await app[STORE].start_round(caller, job_id, now)
    except BaseException:
        engine.release(job_id)
        raise
    if not started:  # another instance started one first
        engine.release(job_id)
        raise web.HTTPConflict(text=f"job {job_id} already has a round of attempts under way")
    if webhook.status == "failed":
        app[METRICS].dead_letter -= 1
    log.info("redelivery of %s asked for (manual): a new round starts", job_id,
             extra={"fields": {"job_id": job_id, "redelivery": "manual"}})
    engine.schedule(job_id, now)
    return web.json_response({"job_id": job_id, "delivery_status": "pending"}, status=202)


JOB_STATUSES = ("processing", "completed", "failed")
DELIVERY_STATUSES = ("pending", "retrying", "delivered", "failed")


async def list_jobs(request: web.Request) -> web.Response:
    """GET /jobs: jobs newest first, filtered by status, delivery status, id prefix and receiver, a page at a time."""
    query = request.query
    limit = _limit(query.get("limit", "50"))
    rows = await request.app[STORE].list_jobs(
        _list_scope(request[CALLER], query.get("client")),
        _choices(query, "status", JOB_STATUSES), _choices(query, "delivery_status", DELIVERY_STATUSES),
        _prefix(query.get("q")), _receiver(query.get("receiver")), _cursor(query.get("before")), limit,
    )
    jobs = [
        {"job_id": job_id, "status": status, "created_at": iso_time(created), "completed_at": iso_time(completed),
         "webhook_url": url, "delivery_status": delivery, "attempts": attempts, "last_error": error,
         "next_attempt_at": iso_time(next_at), "client": client or None}
        for job_id, status, created, completed, url, delivery, attempts, error, next_at, client in rows
    ]
    more = len(rows) == limit
    return web.json_response({"jobs": jobs, "next": _encode_cursor(jobs[-1]["job_id"]) if more else None})


def _list_scope(caller: Caller, client: str | None) -> Caller:
    """Whose jobs a list shows: the caller's, or for the operator, one client's (?client=)."""
    if client is None:
        return caller
    if caller.client is not None:
        raise web.HTTPBadRequest(text="client is the operator's filter: a client's key lists its own jobs only")
    if not CLIENT_NAME.fullmatch(client):
        raise web.HTTPBadRequest(text="client must be a client's name: 1 to 64 of a-z 0-9 . _ -")
    return Caller(client, caller.operator)


def _choices(query: Any, name: str, allowed: tuple[str, ...]) -> list[str]:
    chosen = [value.strip() for given in query.getall(name, []) for value in given.split(",") if value.strip()]
    wrong = [value for value in chosen if value not in allowed]
    if wrong:
        raise web.HTTPBadRequest(text=f"{name} {wrong[0]!r} is not one of {', '.join(allowed)}")
    return chosen


def _prefix(value: str | None) -> str | None:
    if value is not None and not (value and len(value) <= 40 and value.isascii() and value.replace("-", "").isalnum()):
        raise web.HTTPBadRequest(text="q must be a job id or the start of one (letters, digits and -)")
    return value or None


def _receiver(value: str | None) -> str | None:
    if value is None:
        return None
    found = RECEIVER.fullmatch(value.lower())
    try:
        if not found or not 0 < int(found[2] or 1) < 65536:
            raise BadWebhookURL
        if not found[1].startswith("["):
            _check_host_name(found[1])
    except BadWebhookURL:
        raise web.HTTPBadRequest(text="receiver must be a host, or host:port, as in hooks.example.com:8443") from None
    return found[1] + (f":{int(found[2])}" if found[2] else "")


def _encode_cursor(job_id: str) -> str:
    return base64.urlsafe_b64encode(job_id.encode()).decode().rstrip("=")


def _cursor(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        job_id = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode("ascii")
    except (binascii.Error, ValueError):
        job_id = ""
    if not _may_be_job_id(job_id):
        raise web.HTTPBadRequest(text="before must be the 'next' of a previous page")
    return job_id


MAX_BULK_REDELIVERY = 10_000
BULK_REDELIVERY_FIELDS = ("since", "until", "dry_run")


async def redeliver_failed(request: web.Request) -> web.Response:
    """POST /webhooks/redeliver: a new round for every delivery that failed in a window."""
    app = request.app
    _require_json_content_type(request)
    since, until, dry_run = _redelivery_window(parse_json_object(await _read_body(request)))
    store, caller = app[STORE], request[CALLER]
    if dry_run:
        return web.json_response(
            {"would_redeliver": await store.failed_between(caller, since, until, MAX_BULK_REDELIVERY)})
    now = time.time()
    job_ids = await store.start_rounds(caller, since, until, MAX_BULK_REDELIVERY, now)
    app[METRICS].dead_letter -= len(job_ids)
    log.info("bulk redelivery of %d deliveries that failed from %s to %s asked for: new rounds start",
             len(job_ids), iso_time(since), iso_time(until), extra={"fields": {"redelivery": "bulk"}})
    engine = app[ENGINE]
    for job_id in job_ids:
        engine.schedule(job_id, now)
    return web.json_response({"redelivered": len(job_ids)}, status=202)


def _redelivery_window(fields: dict[str, Any]) -> tuple[float, float, bool]:
    unknown = sorted(set(fields) - set(BULK_REDELIVERY_FIELDS))
    if unknown:
        raise web.HTTPBadRequest(
            text=f"unknown field {unknown[0]!r}; allowed fields: {', '.join(BULK_REDELIVERY_FIELDS)}")
    if "since" not in fields:
        raise web.HTTPBadRequest(text='field \'since\' is required, e.g. {"since": "2026-01-31T00:00:00Z"}')
    since = _moment("since", fields["since"])
    until = _moment("until", fields["until"]) if fields.get("until") is not None else time.time()
    if since > until:
        raise web.HTTPBadRequest(text="field 'since' is later than 'until'")
    dry_run = fields.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise web.HTTPBadRequest(text="field 'dry_run' must be true or false")
    return since, until, dry_run


def _moment(name: str, value: Any) -> float:
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00")) if isinstance(value, str) else None
        # In UTC, a time at either end of the calendar can fall off it (year 0 or 10000).
        return (moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)).astimezone(  # type: ignore[union-attr]
            dt.timezone.utc).timestamp()
    except (AttributeError, ValueError, OverflowError):
        raise web.HTTPBadRequest(
            text=f"field {name!r} must be an ISO-8601 time from year 1 to 9999, like 2026-01-31T00:00:00Z") from None


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz: 200 while the service runs; 503 if a background loop is down or the db unreachable."""
    app = request.app
    down = app[LOOPS].down()
    if down:
        raise web.HTTPServiceUnavailable(
            text=f"not processing: the {', '.join(down)} loop is down; the log says why",
            headers={"Retry-After": "1"},
        )
    problem = app[STORE].problem() or (None if app[FENCE].is_open() else "the database cannot be reached")
    if problem:
        raise web.HTTPServiceUnavailable(text=problem, headers={"Retry-After": "1"})
    return web.json_response({
        "status": "ok",
        "instance": app[STORE].instance,
        "version": __version__,
        "queue_depth": app[WORKERS].depth,
    })


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text format."""
    _require_operator_view(request)
    app = request.app
    engine = app[ENGINE]
    text = app[METRICS].render(Gauges(app[WORKERS].depth, engine.scheduled, engine.in_flight, engine.oldest_due))
    return web.Response(body=text, content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


# ---------------------------------------------------------------------------
# HTTP: clients
# ---------------------------------------------------------------------------


async def post_client(request: web.Request) -> web.Response:
    """POST /clients: a new client; its API key and signing secret are in this answer only."""
    _require_operator(request)
    fields = await _json_fields(request, ("name",))
    return await _changed(request, make_client(request.app[STORE], fields.get("name")), 201)


async def get_clients(request: web.Request) -> web.Response:
    """GET /clients: every client, never a key or a secret."""
    _require_operator(request)
    return web.json_response(await list_clients(request.app[STORE]))


async def get_client(request: web.Request) -> web.Response:
    """GET /clients/{name}: one client."""
    return web.json_response(await show_client(request.app[STORE], _client_named(request, self_service=True)))


async def patch_client(request: web.Request) -> web.Response:
    """PATCH /clients/{name}: disable or enable a client."""
    name = _client_named(request, self_service=False)
    fields = await _json_fields(request, ("disabled",))
    return await _changed(request, disable_client(request.app[STORE], name, fields.get("disabled")), 200)


async def post_client_key(request: web.Request) -> web.Response:
    """POST /clients/{name}/keys: one more API key, shown in this answer only."""
    name = _client_named(request, self_service=True)
    return await _changed(request, add_client_key(request.app[STORE], name), 201)


async def delete_client_key(request: web.Request) -> web.Response:
    """DELETE /clients/{name}/keys/{key_id}: the key is refused from now on."""
    name, key_id = _client_named(request, self_service=True), request.match_info["key_id"]
    if not KEY_ID.fullmatch(key_id):  # no key has such an id (and PostgreSQL could not be asked about a NUL)
        raise web.HTTPNotFound(text=f"client {name!r} has no key {key_id!r}")
    await _changed(request, revoke_client_key(request.app[STORE], name, key_id), 204)
    return web.Response(status=204)


async def post_client_secret(request: web.Request) -> web.Response:
    """POST /clients/{name}/secrets: a new signing secret; the previous ones sign on for overlap_hours."""
    name = _client_named(request, self_service=True)
    fields = await _json_fields(request, ("overlap_hours",))
    return await _changed(request, rotate_client_secret(request.app[STORE], name, fields.get("overlap_hours", 24)), 201)


def _require_operator(request: web.Request) -> None:
    if not request[CALLER].operator:
        raise web.HTTPForbidden(text="managing clients takes the operator's key (--api-key),"
                                     " or the command line: python webhookd.py clients --help")


def _client_named(request: web.Request, self_service: bool) -> str:
    """The client in the path, if the caller may manage it: the operator any, a client itself
    (only for what it may do itself); another client's name answers as an unknown one."""
    name, caller = request.match_info["name"], request[CALLER]
    if (caller.client is not None and caller.client != name) or not CLIENT_NAME.fullmatch(name):
        raise web.HTTPNotFound(text=f"no client {name!r}")
    if caller.client is None or not self_service:
        _require_operator(request)
    return name


async def _json_fields(request: web.Request, allowed: tuple[str, ...]) -> dict[str, Any]:
    """A JSON object body (an empty body is {}) with only the allowed fields."""
    _require_json_content_type(request)
    body = await _read_body(request)
    fields = parse_json_object(body) if body.strip() else {}
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise web.HTTPBadRequest(text=f"unknown field {unknown[0]!r}; allowed fields: {', '.join(allowed)}")
    return fields


async def _changed(request: web.Request, change: Awaitable[dict[str, Any]], status: int) -> web.Response:
    """Make a change to the clients, and put it in force on this instance at once."""
    shown = await change
    await request.app[CLIENTS].refresh()
    return web.json_response(shown, status=status)


# ---------------------------------------------------------------------------
# HTTP: middleware
# ---------------------------------------------------------------------------


@web.middleware
async def json_errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Every error becomes {"error": ...} JSON; nothing a client sends makes a 5xx. Every answer,
    errors included, is counted and timed by route (in this one middleware: a layer costs every
    request a coroutine)."""
    started = time.perf_counter()
    try:
        answer = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {h: exc.headers[h] for h in ("Allow", "WWW-Authenticate", "Retry-After") if h in exc.headers}
        answer = web.json_response({"error": _error_message(request, exc)}, status=exc.status, headers=headers)
    except Busy as exc:
        answer = web.json_response({"error": f"{exc}; try again later"}, status=exc.status, headers={"Retry-After": "1"})
    except ClientError as exc:
        answer = web.json_response({"error": str(exc)}, status=exc.status)
    except StoreUnavailable as exc:
        answer = web.json_response({"error": f"{exc}; try again later"}, status=503, headers={"Retry-After": "1"})
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        answer = web.json_response({"error": "internal error; the server log has the details"}, status=500)
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "other"  # unknown paths: one label, not one each
    request.app[METRICS].request_answered(route, answer.status, time.perf_counter() - started)
    return answer


def _json_protocol_errors(handle_error: Callable[..., web.StreamResponse]) -> Callable[..., web.StreamResponse]:
    """aiohttp's answer to what it cannot parse as HTTP (a request line or header over 8 KiB, bad
    framing), JSON like every other error.

    aiohttp answers those in plain text before any middleware runs, and offers no hook for it;
    this wraps its handler's method, for every aiohttp server in the process.
    """
    @functools.wraps(handle_error)
    def json_error(self: web_protocol.RequestHandler, request: web.BaseRequest, status: int = 500,
                   exc: BaseException | None = None, message: str | None = None) -> web.StreamResponse:
        if status >= 500 or request.writer.output_size > 0:  # logged, or refused: an answer has begun
            return handle_error(self, request, status, exc, message)
        log.debug("not a valid HTTP request from %s: %s", request.remote, message)  # the client's mistake
        error = web.json_response({"error": f"not a valid HTTP request: {message or status}"}, status=status)
        error.force_close()
        return error

    return json_error


web_protocol.RequestHandler.handle_error = _json_protocol_errors(web_protocol.RequestHandler.handle_error)  # type: ignore[method-assign]


MAX_REQUESTS_PER_ADDRESS = 256  # at once, from one address: room for a load balancer's connections
# Keyword arguments of aiohttp's request handler, given to run_app itself (its handler_args
# would reach the handler as one unknown keyword, and aiohttp then drops every option).
# Answered before its body was read (a 408, 413 or 415), a connection is closed at once: aiohttp
# would otherwise read, and inflate, up to 10 s more of a body nobody wants. An idle keep-alive
# connection is closed after 75 s, as nginx does, not aiohttp's handler default of an hour.
SERVER_OPTIONS: dict[str, Any] = {"lingering_time": 0, "keepalive_timeout": 75.0}


@web.middleware
async def admit(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Who may make a request: an address within its share, a browser only for this site's own
    page, and a caller with a key once there are keys; the caller is decided here, once. One
    middleware, not three, because each layer costs every request a coroutine."""
    counts = request.app[REQUESTS_BY_ADDRESS]
    address = request.remote or ""
    _limit_per_address(counts[address], address)
    _refuse_cross_site_writes(request)
    request[CALLER] = _caller(request)
    counts[address] += 1
    try:
        return await handler(request)
    finally:
        counts[address] -= 1
        if not counts[address]:
            del counts[address]


def _limit_per_address(requests: int, address: str) -> None:
    # One address holding many slow connections must not take every file descriptor from the others.
    if requests >= MAX_REQUESTS_PER_ADDRESS:
        raise web.HTTPTooManyRequests(
            text=f"more than {MAX_REQUESTS_PER_ADDRESS} requests at once from {address}; wait for some to finish",
            headers={"Retry-After": "1"},
        )


def _refuse_cross_site_writes(request: web.Request) -> None:
    # A page elsewhere must not make a browser on the operator's machine redeliver, or submit
    # jobs, even without --api-key. Sec-Fetch-Site is the browser's own verdict and stays right
    # behind a proxy that rewrites Host or ends TLS; only a browser without it has its Origin
    # compared with the address the proxy says it used.
    if request.method != "POST":
        return
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        refused = site not in ("same-origin", "none")
    else:
        origin = request.headers.get("Origin")
        refused = origin is not None and origin != _browser_origin(request)
    if refused:
        raise web.HTTPForbidden(text="a request from another site's page is refused")


def _browser_origin(request: web.Request) -> str:
    # A page elsewhere cannot send X-Forwarded-* without a CORS preflight, which webhookd never
    # grants, so trusting them here lets no other site in. Behind several proxies the first entry
    # is the one the browser reached.
    scheme = request.headers.get("X-Forwarded-Proto", request.scheme).split(",")[0].strip()
    host = request.headers.get("X-Forwarded-Host", request.host).split(",")[0].strip()
    return f"{scheme}://{host}"


def _caller(request: web.Request) -> Caller:
    """Who is asking: the operator (--api-key), a client (one of its keys), or anyone, while
    neither --api-key nor a client exists; 401 for a missing or unknown key, 403 for a disabled client."""
    api_key, clients = request.app[CONFIG].api_key, request.app[CLIENTS]
    if request.path in OPEN_PATHS or not (api_key or clients.exist):
        return ANYONE
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    offered = token.strip() if scheme.lower() == "bearer" else ""
    # aiohttp decodes header bytes that are not UTF-8 as surrogates; encode them back the same way.
    if api_key and hmac.compare_digest(offered.encode("utf-8", "surrogateescape"),
                                       api_key.encode("utf-8", "surrogateescape")):
        return OPERATOR
    client = clients.client_of(offered) if offered else None
    if client is None:
        raise web.HTTPUnauthorized(
            text="missing or wrong API key: send Authorization: Bearer <key>",
            headers={"WWW-Authenticate": 'Bearer realm="webhookd"'},
        )
    if clients.is_disabled(client):
        raise web.HTTPForbidden(text=f"client {client} is disabled; its operator can enable it")
    return Caller(client)


def _require_operator_view(request: web.Request) -> None:
    # Counters of the whole service: every client's traffic.
    if request[CALLER].client is not None:
        raise web.HTTPForbidden(text=f"{request.path} is the operator's: it counts every client's jobs")


# ---------------------------------------------------------------------------
# HTTP: reading requests
# ---------------------------------------------------------------------------


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    try:
        fields = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise web.HTTPBadRequest(text="body is not UTF-8") from None
    except RecursionError:
        raise web.HTTPBadRequest(text="body is not valid JSON: nested too deeply") from None
    except ValueError as exc:
        raise web.HTTPBadRequest(text=f"body is not valid JSON: {exc}") from None
    if not isinstance(fields, dict):
        raise web.HTTPBadRequest(text='body must be a JSON object, like {"text": "...", "webhook_url": "https://..."}')
    return fields


def job_from_fields(fields: dict[str, Any], allow_private_urls: bool, client: str = "") -> Job:
    """A new job of `client` from a validated POST /predict body; a 400 naming the field otherwise."""
    unknown = sorted(set(fields) - set(JOB_FIELDS))
    if unknown:
        raise web.HTTPBadRequest(
            text=f"unknown field {unknown[0]!r}; allowed fields: {', '.join(JOB_FIELDS)}"
        )
    return Job(
        id=new_job_id(),
        text=_text(fields.get("text")),
        webhook_url=_webhook_url(fields.get("webhook_url"), allow_private_urls),
        retry_policy=_retry_policy(fields.get("retry_policy")),
        created_at=time.time(),
        client=client,
    )


def _text(value: Any) -> str:
    if value is None:
        raise web.HTTPBadRequest(text="field 'text' is required")
    if not isinstance(value, str):
        raise web.HTTPBadRequest(text="field 'text' must be a string")
    if not value.strip():
        raise web.HTTPBadRequest(text="field 'text' must not be empty or only whitespace")
    if len(value) > MAX_TEXT_CHARS:
        raise web.HTTPBadRequest(text=f"field 'text' is {len(value)} characters; the limit is {MAX_TEXT_CHARS}")
    _require_storable("text", value)
    return value


def _webhook_url(value: Any, allow_private_urls: bool) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise web.HTTPBadRequest(text="field 'webhook_url' must be a string")
    if len(value) > MAX_URL_CHARS:
        raise web.HTTPBadRequest(text=f"field 'webhook_url' is longer than {MAX_URL_CHARS} characters")
    _require_storable("webhook_url", value)
    if not value.isprintable() or any(c.isspace() for c in value):
        raise web.HTTPBadRequest(text="field 'webhook_url' must not contain spaces or control characters")
    try:
        host = webhook_target(value).host
    except BadWebhookURL as exc:
        raise web.HTTPBadRequest(text=f"field 'webhook_url' {exc}") from None
    except ValueError as exc:  # yarl's, UnicodeError included
        raise web.HTTPBadRequest(text=f"field 'webhook_url' is not a valid URL: {exc}") from None
    reason = None if allow_private_urls else blocked_host(host)
    if reason:
        raise web.HTTPBadRequest(
            text=f"{reason}; for local testing start webhookd with --allow-private-urls"
        )
    return value


def _retry_policy(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise web.HTTPBadRequest(text="field 'retry_policy' must be an object")
    for name, number in value.items():
        if name not in RETRY_POLICY_BOUNDS:
            raise web.HTTPBadRequest(
                text=f"unknown retry_policy field {name!r}; allowed: {', '.join(RETRY_POLICY_BOUNDS)}"
            )
        if not RETRY_POLICY_BOUNDS[name].admits(number):
            raise web.HTTPBadRequest(text=f"retry_policy.{name} must be {RETRY_POLICY_BOUNDS[name]}")
    return {name: int(number) if RETRY_POLICY_BOUNDS[name].integer else number for name, number in value.items()} or None


def _require_storable(name: str, value: str) -> None:
    # UTF-8 cannot hold an unpaired surrogate, nor PostgreSQL's text a NUL: both stores refuse
    # both, so that they accept the same jobs.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise web.HTTPBadRequest(text=f"field {name!r} contains an unpaired surrogate (\\ud800-\\udfff)") from None
    if "\x00" in value:
        raise web.HTTPBadRequest(text=f"field {name!r} must not contain a NUL character (\\u0000)")


async def _read_body(request: web.Request) -> bytes:
    """The request body: uncompressed, complete, and within --timeout."""
    # Refused, not inflated: aiohttp would inflate a compressed body to the end, limit or not.
    if request.headers.get("Content-Encoding", "identity").lower() != "identity":
        raise web.HTTPUnsupportedMediaType(text="a compressed body is not accepted: send it without Content-Encoding")
    if request.content.is_eof():  # all there already, as a small body mostly is: no timer needed
        return await request.read()
    timeout = request.app[CONFIG].timeout
    try:
        return await asyncio.wait_for(request.read(), timeout)
    except asyncio.TimeoutError:
        raise web.HTTPRequestTimeout(text=f"the body did not arrive within {timeout:g} s") from None
    except ConnectionResetError:  # the client went away: nobody reads this answer, nothing to log
        raise web.HTTPBadRequest(text="the connection closed before the body ended") from None
    except web.RequestPayloadError:
        raise web.HTTPBadRequest(text="body could not be read: bad length or chunking") from None


def _shed_past_the_backlog(app: web.Application, caller: Caller) -> None:
    # Accepted jobs keep a delay to their webhook of about --max-backlog / jobs per second. The
    # body is read first all the same: answered with its body unread, a keep-alive connection
    # is closed, and a client that connects again costs more than the body did.
    workers, engine, config = app[WORKERS], app[ENGINE], app[CONFIG]
    backlog = workers.depth + engine.due
    if backlog >= config.max_backlog:
        app[METRICS].job_shed(caller.owner)
        raise Busy(f"busy: {backlog} jobs and deliveries are waiting (--max-backlog)")
    if caller.client is None:
        return
    held = workers.queue.held(caller.client) + engine.held(caller.client)
    if held >= config.client_limit:
        app[METRICS].job_shed(caller.owner)
        raise Busy(f"client {caller.client} has {held} jobs and deliveries waiting (--client-backlog);"
                   " other clients are still served", status=429)


class Busy(Exception):
    """Past --max-backlog (503), or a client past --client-backlog (429). Not an HTTPException,
    which builds a response only for json_errors to replace it, at a cost every shed request would pay."""

    def __init__(self, message: str, status: int = 503) -> None:
        super().__init__(message)
        self.status = status


def _require_json_content_type(request: web.Request) -> None:
    # A client that sends no Content-Type gets the benefit of the doubt; one that declares
    # another type (curl -d sends a form) has made a mistake worth telling it about.
    if "Content-Type" not in request.headers:
        return
    content_type = request.content_type
    if content_type != "application/json" and not content_type.endswith("+json"):
        raise web.HTTPUnsupportedMediaType(
            text=f"body must be JSON with Content-Type: application/json, not {content_type}"
        )


def _idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_CHARS or not all(" " <= c <= "~" for c in key):
        raise web.HTTPBadRequest(
            text=f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} printable ASCII characters")
    return key


def _request_hash(fields: dict[str, Any]) -> str:
    # Hashing the parsed body means a client that re-serialises the same request still matches,
    # and 2 and 2.0 are one number, as they are to the job.
    canonical = json.dumps(_same_numbers(fields), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _same_numbers(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _same_numbers(item) for key, item in value.items()}
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _accepted(job_id: str, webhook_registered: bool) -> dict[str, Any]:
    return {"job_id": job_id, "status": "processing", "webhook_registered": webhook_registered}


async def _add_job(app: web.Application, job: Job) -> None:
    """Commit a job, then queue it for the workers."""
    await app[STORE].add_job(job)
    _queue(app, job)


def _queue(app: web.Application, job: Job) -> None:
    app[METRICS].job_accepted(job.client)
    app[WORKERS].queue.put_nowait(job)


async def _add_job_once(app: web.Application, job: Job, key: str, request_hash: str) -> tuple[str, bool, bool]:
    """The job an Idempotency-Key stands for, made now or before: (job id, webhook registered, replayed)."""
    in_progress, whose = app[IDEMPOTENCY_IN_PROGRESS], (job.client, key)
    while whose in in_progress:
        # Two requests with the same new key: the second waits for the first's answer.
        await asyncio.shield(in_progress[whose])
    first = asyncio.get_running_loop().create_future()
    in_progress[whose] = first
    store = app[STORE]
    try:
        row = await store.job_with_key(job.client, key)
        if row is None:
            await store.add_job(job, key, request_hash)
            # Ours, or that of another instance which the same key reached a moment before.
            row = await store.job_with_key(job.client, key)
            if row is None or row[0] == job.id:
                _queue(app, job)
                return job.id, job.webhook_url is not None, False
    finally:
        del in_progress[whose]
        first.set_result(None)
    if row[2] != request_hash:
        raise web.HTTPUnprocessableEntity(
            text="this Idempotency-Key was used with a different body; use a new key for a new job"
        )
    return row[0], bool(row[1]), True


def _job_id(request: web.Request) -> str:
    """The job id in the path; 404 at once if no job can have it."""
    job_id = request.match_info["job_id"]
    if not _may_be_job_id(job_id):
        raise web.HTTPNotFound(text=f"no job {job_id!r}")
    return job_id


def _may_be_job_id(value: str) -> bool:
    # Every id is webhookd's own, printable ASCII; PostgreSQL could not even be asked about a NUL.
    return value.startswith("job-") and value.isascii() and value.isprintable()


class Webhook(NamedTuple):
    """A job's webhook as the API shows it."""

    url: str
    status: str  # pending (the job may still be running), retrying, delivered or failed
    next_attempt_at: float | None
    client: str


async def _find_webhook(store: Store, caller: Caller, job_id: str) -> Webhook:
    """A job's webhook; 404 if the caller has no such job or it has no webhook_url."""
    row = await store.webhook(caller, job_id)
    if row is None:
        raise web.HTTPNotFound(text=f"no job {job_id!r}")
    if row[0] is None:
        raise web.HTTPNotFound(text=f"job {job_id!r} has no webhook_url")
    return Webhook(row[0], row[1] or "pending", row[2], row[3])


def _limit(value: str) -> int:
    if not (value.isascii() and value.isdigit() and len(value) <= 4) or not 1 <= int(value) <= 1000:
        raise web.HTTPBadRequest(text="limit must be a whole number from 1 to 1000")
    return int(value)


def _error_message(request: web.Request, exc: web.HTTPException) -> str:
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return f"{request.method} is not allowed on {request.path}; use {', '.join(sorted(exc.allowed_methods))}"
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return f"body is larger than the {MAX_BODY_BYTES // 1024} KiB limit"
    if exc.text is None or exc.text == f"{exc.status}: {exc.reason}":
        if exc.status == 404:
            return f"no such endpoint: {request.method} {request.path}"
        return exc.reason
    return exc.text


# ---------------------------------------------------------------------------
# The page: Recent Deliveries
# ---------------------------------------------------------------------------

# Everything it shows comes from the API, as text (textContent), never as HTML.
PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>webhookd: recent deliveries</title>
<link rel="icon" href="/favicon.ico" type="image/svg+xml">
<style>
:root { font: 14px/1.4 system-ui, sans-serif; color: #1d232b; background: #f6f7f9; }
body { margin: 0; }
header, main { max-width: 1400px; margin: 0 auto; padding: 12px 16px; }
h1 { font-size: 18px; margin: 0 0 8px; }
h2 { font-size: 15px; margin: 16px 0 8px; }
.counters { display: flex; flex-wrap: wrap; gap: 8px; }
.counter { background: #fff; border: 1px solid #d8dce2; border-radius: 6px; padding: 6px 10px; min-width: 120px; }
.counter b { display: block; font-size: 18px; }
.counter svg { display: block; width: 110px; height: 24px; }
.counter polyline { fill: none; stroke: #2f6fdb; stroke-width: 1.5; }
.controls { display: flex; flex-wrap: wrap; gap: 6px; align-items: center; margin: 12px 0; }
button, input { font: inherit; }
button { border: 1px solid #b9c0ca; background: #fff; border-radius: 14px; padding: 3px 10px; cursor: pointer; }
button[aria-pressed="true"] { background: #2f6fdb; border-color: #2f6fdb; color: #fff; }
button:disabled { opacity: .5; cursor: not-allowed; }
button:focus-visible, input:focus-visible { outline: 2px solid #f0a020; outline-offset: 1px; }
input { border: 1px solid #b9c0ca; border-radius: 4px; padding: 3px 6px; }
input[type="search"] { width: 10em; }
.field { white-space: nowrap; }
/* The list's eight columns need about 760 pixels; the detail reads well in 400. */
.layout { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 28rem); gap: 16px; }
@media (max-width: 1200px) { .layout { grid-template-columns: minmax(0, 1fr); } }
table { width: 100%; border-collapse: collapse; background: #fff; }
th, td { text-align: left; vertical-align: top; padding: 5px; border-bottom: 1px solid #e6e9ee; }
th, .job, .status, .delivery, .time { white-space: nowrap; }
.receiver { white-space: nowrap; max-width: 16em; overflow: hidden; text-overflow: ellipsis; }  /* its title has the URL */
.error, .url { overflow-wrap: anywhere; }
.url { min-width: 16em; }
tr.selected { background: #eaf1fd; }
td button { border-radius: 4px; padding: 3px 6px; font-family: ui-monospace, monospace; font-size: 12px; }
.status-delivered, .status-completed { color: #17803d; }
.status-failed { color: #c22; }
.status-retrying, .status-pending, .status-processing { color: #9a6700; }
#detail { background: #fff; border: 1px solid #d8dce2; border-radius: 6px; padding: 10px 12px; overflow-wrap: anywhere; }
#detail ol { padding-left: 20px; }
#detail .id { font-family: ui-monospace, monospace; font-size: 13px; user-select: all; }
#detail h2 button { font-size: 12px; font-weight: normal; }
.round { font-weight: 600; color: #2f6fdb; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; background: #f1f3f6; padding: 6px; border-radius: 4px; font-size: 12px; max-height: 220px; overflow: auto; }
.muted { color: #5d6673; }
#key-form { background: #fff3cd; border: 1px solid #e0c36a; padding: 10px; border-radius: 6px; }
@media (max-width: 600px) {
  /* A table of eight columns does not fit a phone: each row becomes a card, with the job, its
     delivery and its time on the first line, so that no one scrolls sideways to see a status. */
  table, tbody, td { display: block; }
  thead { display: none; }
  tr { display: flex; flex-wrap: wrap; align-items: baseline; column-gap: 10px; padding: 6px; border-bottom: 1px solid #e6e9ee; }
  tr::after { content: ""; flex-basis: 100%; order: 1; }  /* ends the first line */
  td { border: 0; padding: 1px 0; order: 2; }
  .job, .delivery, .time { order: 0; }
  .time { margin-left: auto; }
  .url, .error { flex-basis: 100%; }
  .error { order: 3; }
  .status::before { content: "job "; color: #5d6673; }
  .attempts::before { content: "attempts "; color: #5d6673; }
  .counter { min-width: 0; flex: 1 1 80px; }
  .counter svg { width: 100%; }
}
[hidden] { display: none !important; }
</style>
</head>
<body>
<header>
  <h1>webhookd: recent deliveries</h1>
  <form id="key-form" hidden>
    <label for="key">This webhookd needs its API key:</label>
    <input id="key" type="password" autocomplete="off" required>
    <button type="submit">Use key</button>
  </form>
  <div class="counters" id="counters" aria-live="polite"></div>
</header>
<main>
  <div class="controls" role="group" aria-label="Filter by status">
    <span class="muted">Delivery:</span>
    <button type="button" data-filter="delivery_status" data-value="delivered" aria-pressed="false">delivered</button>
    <button type="button" data-filter="delivery_status" data-value="retrying" aria-pressed="false">retrying</button>
    <button type="button" data-filter="delivery_status" data-value="pending" aria-pressed="false">pending</button>
    <button type="button" data-filter="delivery_status" data-value="failed" aria-pressed="false">failed</button>
    <span class="muted">Job:</span>
    <button type="button" data-filter="status" data-value="completed" aria-pressed="false">completed</button>
    <button type="button" data-filter="status" data-value="failed" aria-pressed="false">failed</button>
    <span class="field"><label for="search" class="muted">Job id</label>
      <input id="search" type="search" placeholder="job-01a2…" spellcheck="false"></span>
    <span class="field"><label for="receiver" class="muted">Receiver</label>
      <input id="receiver" type="search" placeholder="host[:port]" spellcheck="false"></span>
    <span class="field operator-only" hidden><label for="client" class="muted">Client</label>
      <input id="client" type="search" placeholder="name" spellcheck="false"></span>
  </div>
  <div class="layout">
    <section aria-label="Jobs">
      <table>
        <thead><tr><th>Job</th><th id="client-head" hidden>Client</th><th>Receiver</th><th>Job status</th><th>Delivery</th><th>Attempts</th><th>Last error</th><th>Created</th></tr></thead>
        <tbody id="jobs"></tbody>
      </table>
      <p><button type="button" id="more">Load more</button> <span id="list-note" class="muted"></span></p>
      <h2>Dead letter</h2>
      <div class="controls">
        <label for="since">Redeliver all failed since (UTC)</label>
        <input id="since" type="datetime-local">
        <button type="button" id="count-failed">Count</button>
        <button type="button" id="redeliver-all" disabled>Redeliver them</button>
        <span id="bulk-note" class="muted" aria-live="polite"></span>
      </div>
      <table id="dead-table">
        <thead><tr><th>Job</th><th>Webhook URL</th><th>Attempts</th><th>Last error</th><th>Failed at</th></tr></thead>
        <tbody id="dead"></tbody>
      </table>
      <p id="dead-note" class="muted"></p>
    </section>
    <section id="detail" aria-live="polite"><p class="muted">Choose a job to see its delivery.</p></section>
  </div>
</main>
<script>
"use strict";
const state = { filters: { status: new Set(), delivery_status: new Set() }, q: "", client: "", receiver: "",
  shown: 50, listCalls: 0, selected: null, redeliverError: "", until: null, history: [] };
const $ = (id) => document.getElementById(id);

function el(tag, text, attributes = {}) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  return node;
}

async function api(path, options = {}) {
  const headers = { "Content-Type": "application/json", ...(options.headers || {}) };
  const key = sessionStorage.getItem("webhookd-key");
  if (key) headers.Authorization = "Bearer " + key;
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) { $("key-form").hidden = false; throw new Error("the API key is needed"); }
  const body = await response.json();
  if (!response.ok) throw Object.assign(new Error(body.error || response.statusText), { status: response.status });
  return body;
}

function listQuery(limit, before) {
  const params = new URLSearchParams({ limit: String(limit) });
  for (const [name, values] of Object.entries(state.filters)) if (values.size) params.set(name, [...values].join(","));
  for (const name of ["q", "client", "receiver"]) if (state[name]) params.set(name, state[name]);
  if (before) params.set("before", before);
  return "/jobs?" + params;
}

function filtered() {
  return Object.values(state.filters).some((values) => values.size) || Boolean(state.q || state.client || state.receiver);
}

async function refreshList() {
  const call = ++state.listCalls, wanted = state.shown;
  let jobs = [], next = null, note;
  try {
    do {  // a page is at most 1,000 jobs
      const page = await api(listQuery(Math.min(1000, wanted - jobs.length), next));
      jobs.push(...page.jobs);
      next = page.next;
    } while (next && jobs.length < wanted);
    note = jobs.length ? "" : filtered() ? "No job matches." : "No jobs yet.";
  } catch (error) { jobs = []; next = null; note = error.message; }
  if (call !== state.listCalls) return;  // a later call, with newer filters, shows its own
  const clients = jobs.some((job) => job.client);  // a column only where there are clients
  $("client-head").hidden = !clients;
  $("jobs").replaceChildren(...jobs.map((job) => jobRow(job, clients)));
  $("more").disabled = !next;
  $("list-note").textContent = note;
}

function jobCell(jobId) {
  // An id starts with its time in milliseconds, the same for every job of a burst: its last
  // digits, random, are what tells the jobs of a page apart.
  const open = el("button", jobId.replace(/^job-[0-9a-f]{24}([0-9a-f]{8})$/, "job-\\u2026$1"),
    { type: "button", title: jobId, "aria-label": "Show " + jobId });
  open.addEventListener("click", () => select(jobId));
  const cell = el("td", null, { class: "job" }); cell.append(open);
  return cell;
}

function jobRow(job, clients) {
  const row = el("tr");
  if (job.job_id === state.selected) row.className = "selected";
  row.append(jobCell(job.job_id));
  if (clients) row.append(el("td", job.client || "(operator)", { class: job.client ? "" : "muted" }));
  row.append(receiverCell(job.webhook_url), el("td", job.status, { class: "status status-" + job.status }),
    el("td", job.delivery_status || "no webhook", { class: "delivery status-" + (job.delivery_status || "none") }),
    el("td", job.attempts, { class: "attempts" }), el("td", job.last_error || "", { class: "error" }), timeCell(job.created_at));
  return row;
}

function receiverCell(url) {
  if (!url) return el("td", null, { class: "receiver" });
  let host;
  try { host = new URL(url).host; } catch (error) { host = url; }
  return el("td", host, { class: "receiver", title: url });
}

function timeCell(iso) {
  const cell = el("td", null, { class: "time" });
  if (iso) cell.append(el("time", ago(Date.parse(iso)), { datetime: iso, title: iso }));
  return cell;
}

function ago(moment) {
  const minutes = Math.floor((Date.now() - moment) / 60000);
  if (minutes < 1) return "just now";
  if (minutes < 60) return minutes + " min ago";
  return minutes < 48 * 60 ? Math.floor(minutes / 60) + " h ago" : Math.floor(minutes / 1440) + " d ago";
}

async function select(jobId) {
  state.selected = jobId;
  state.redeliverError = "";
  await Promise.all([refreshList(), refreshDetail()]);
  if ($("detail").getBoundingClientRect().top > innerHeight) $("detail").scrollIntoView();  // one column: it is below
}

async function refreshDetail() {
  const jobId = state.selected;
  if (!jobId) return;
  const job = await api("/jobs/" + encodeURIComponent(jobId));
  const panel = [idHeading(jobId), el("p", "Job " + job.status + (job.error ? ": " + job.error : ""))];
  if (job.result) panel.push(el("p", "Result: " + job.result.sentiment + ", confidence " + job.result.confidence));
  if (!job.webhook_url) { $("detail").replaceChildren(...panel, el("p", "No webhook URL.")); return; }
  const [delivery, sent] = await Promise.all([
    api("/webhooks/" + encodeURIComponent(jobId) + "/status"),
    api("/webhooks/" + encodeURIComponent(jobId) + "/request"),
  ]);
  panel.push(el("p", "To " + delivery.webhook_url), el("p", "Delivery " + delivery.delivery_status +
    (delivery.next_attempt_at ? "; next attempt at " + delivery.next_attempt_at : "")));
  panel.push(redeliverButton(jobId, delivery.delivery_status), el("h2", "Attempts"), attemptList(delivery.attempts, sent));
  panel.push(el("h2", "Body sent (the same bytes on every attempt)"), el("pre", sent.body));
  $("detail").replaceChildren(...panel);
}

function idHeading(jobId) {
  const heading = el("h2");
  heading.append(el("span", jobId, { class: "id" }));
  if (navigator.clipboard) heading.append(" ", copyButton(jobId));  // only on https, or on localhost
  return heading;
}

function copyButton(text) {
  const button = el("button", "copy", { type: "button", "aria-label": "Copy " + text });
  button.addEventListener("click", () => navigator.clipboard.writeText(text).then(
    () => { button.textContent = "copied"; }, () => { button.textContent = "select the id to copy it"; }));
  return button;
}

function redeliverButton(jobId, status) {
  const underWay = status === "pending" || status === "retrying";
  const button = el("button", "Redeliver", { type: "button" });
  button.disabled = underWay;
  const reason = underWay ? " A round of attempts is under way (" + status + ")." : "";
  const note = el("span", reason + state.redeliverError, { class: "muted" });
  button.addEventListener("click", async () => {
    button.disabled = true;
    state.redeliverError = "";  // an error stays until the next redeliver or job: every refresh rebuilds this panel
    try { await api("/webhooks/" + encodeURIComponent(jobId) + "/redeliver", { method: "POST" }); }
    catch (error) { state.redeliverError = " Redeliver failed: " + error.message; }
    await refreshDetail();
  });
  const line = el("p"); line.append(button, note);
  return line;
}

function attemptList(attempts, sent) {
  if (!attempts.length) return el("p", "No attempt yet.", { class: "muted" });
  const list = el("ol");
  attempts.forEach((attempt, index) => {
    const item = el("li");
    const outcome = attempt.status_code ? "HTTP " + attempt.status_code : attempt.error;
    item.append(el("div", attempt.timestamp + ": " + outcome + " in " + attempt.duration_ms + " ms" +
      (attempt.success ? ", delivered" : "")));
    const next = attempts[index + 1];
    if (next) item.append(pause(attempt, next));
    if (attempt.error && attempt.error !== "HTTP " + attempt.status_code) item.append(el("div", attempt.error));
    const headers = (sent.attempts.find((a) => a.attempt === attempt.attempt) || {}).headers;
    if (headers) item.append(el("div", "Request headers", { class: "muted" }), el("pre", formatHeaders(headers)));
    if (attempt.response) {
      item.append(el("div", "Answer" + (attempt.response.truncated ? " (first bytes)" : ""), { class: "muted" }),
        el("pre", formatHeaders(attempt.response.headers) + "\\n\\n" + attempt.response.body));
    }
    list.append(item);
  });
  return list;
}

function pause(attempt, next) {
  // A redelivery's round is someone's decision, not a backoff: the time before it is no wait.
  const seconds = ((Date.parse(next.timestamp) - Date.parse(attempt.timestamp)) / 1000).toFixed(1) + " s";
  return next.redelivery ? el("div", "then redelivered, " + seconds + " later", { class: "round" })
    : el("div", "then waited " + seconds, { class: "muted" });
}

function formatHeaders(headers) {
  return Object.entries(headers).map(([name, value]) => name + ": " + value).join("\\n");
}

async function refreshDeadLetter() {
  const page = await api("/webhooks/dead-letter?limit=50");
  $("dead").replaceChildren(...page.deliveries.map((d) => {
    const row = el("tr");
    row.append(jobCell(d.job_id), el("td", d.webhook_url, { class: "url" }), el("td", d.attempts, { class: "attempts" }),
      el("td", d.last_error || "", { class: "error" }), timeCell(d.failed_at));
    return row;
  }));
  $("dead-table").hidden = !page.deliveries.length;
  $("dead-note").textContent = page.deliveries.length ? "" : "Nothing in the dead letter.";
}

function bulkBody(dryRun) {
  // The picker's time is UTC, as its label says, whatever the browser's time zone.
  const since = new Date($("since").value + "Z").toISOString();
  return JSON.stringify({ since, until: state.until, dry_run: dryRun });
}

async function countFailed() {
  if (!$("since").value) { $("bulk-note").textContent = "Choose a time first."; return; }
  state.until = new Date().toISOString();  // "Redeliver them" touches what was counted, not what failed since
  const answer = await api("/webhooks/redeliver", { method: "POST", body: bulkBody(true) });
  $("bulk-note").textContent = answer.would_redeliver + " failed deliveries would get a new round.";
  $("redeliver-all").disabled = answer.would_redeliver === 0;
}

async function redeliverAll() {
  $("redeliver-all").disabled = true;
  const answer = await api("/webhooks/redeliver", { method: "POST", body: bulkBody(false) });
  $("bulk-note").textContent = answer.redelivered + " deliveries got a new round.";
  await refreshDeadLetter();
}

const COUNTERS = [["accepted", "jobs accepted/s"], ["delivered", "deliveries/s"],
  ["failed_attempts", "failed attempts/s"], ["dead_letter", "dead letters"], ["queue_depth", "queue depth"]];

async function refreshCounters() {
  let stats;
  try { stats = await api("/stats"); }
  catch (error) {  // a client's key: the counters, and the client filter, are the operator's
    if (error.status !== 403) throw error;
    return showOperatorParts(false);
  }
  showOperatorParts(true);
  state.history.push({ at: Date.now(), stats });
  state.history = state.history.slice(-60);
  const boxes = COUNTERS.map(([name, label]) => {
    const rate = name !== "dead_letter" && name !== "queue_depth";
    const points = state.history.slice(1).map((entry, i) => rate
      ? (entry.stats[name] - state.history[i].stats[name]) / Math.max(0.001, (entry.at - state.history[i].at) / 1000)
      : entry.stats[name]);
    const value = rate ? (points.length ? points[points.length - 1] : 0) : stats[name];
    const box = el("div", null, { class: "counter" });
    box.append(el("b", rate ? value.toFixed(1) : value), el("span", label), sparkline(points));
    return box;
  });
  $("counters").replaceChildren(...boxes);
}

function showOperatorParts(shown) {
  $("counters").hidden = !shown;
  for (const part of document.querySelectorAll(".operator-only")) part.hidden = !shown;
}

function sparkline(points) {
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", "0 0 110 24");
  svg.setAttribute("aria-hidden", "true");
  const top = Math.max(1, ...points);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points.map((p, i) => (i * 110 / 59).toFixed(1) + "," + (23 - p / top * 22).toFixed(1)).join(" "));
  svg.append(line);
  return svg;
}

async function refreshAll() {
  try { await Promise.all([refreshList(), refreshDetail(), refreshDeadLetter(), refreshCounters()]); }
  catch (error) { $("list-note").textContent = error.message; }
}

for (const chip of document.querySelectorAll("[data-filter]")) {
  chip.addEventListener("click", () => {
    const values = state.filters[chip.dataset.filter];
    const on = !values.has(chip.dataset.value);
    on ? values.add(chip.dataset.value) : values.delete(chip.dataset.value);
    chip.setAttribute("aria-pressed", String(on));
    state.shown = 50;
    refreshList();
  });
}
for (const [box, name] of [["search", "q"], ["client", "client"], ["receiver", "receiver"]]) {
  $(box).addEventListener("input", () => { state[name] = $(box).value.trim(); state.shown = 50; refreshList(); });
}
$("more").addEventListener("click", () => { state.shown += 50; refreshList(); });
$("count-failed").addEventListener("click", () => countFailed().catch((error) => { $("bulk-note").textContent = error.message; }));
$("redeliver-all").addEventListener("click", () => redeliverAll().catch((error) => { $("bulk-note").textContent = error.message; }));
$("since").addEventListener("input", () => { $("redeliver-all").disabled = true; $("bulk-note").textContent = ""; });
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem("webhookd-key", $("key").value);
  $("key-form").hidden = true;
  refreshAll();
});
refreshAll();
setInterval(refreshAll, 3000);
</script>
</body>
</html>
"""


def _page_policy(page: str) -> str:
    # Only this page's own script and style run: no other inline code, nothing from elsewhere.
    def digest(tag: str) -> str:
        code = page.split(f"<{tag}>", 1)[1].split(f"</{tag}>", 1)[0]
        return "'sha256-" + base64.b64encode(hashlib.sha256(code.encode()).digest()).decode() + "'"

    return (f"default-src 'none'; script-src {digest('script')}; style-src {digest('style')};"
            " connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


PAGE_HEADERS = {"Content-Security-Policy": _page_policy(PAGE), "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


async def page(request: web.Request) -> web.Response:
    """GET / and /ui: the Recent Deliveries page; it carries no data and no key."""
    return web.Response(text=PAGE, content_type="text/html", charset="utf-8", headers=PAGE_HEADERS)


# A tick in the page's blue. Browsers ask for an icon whether a page names one or not, and the
# 404 they would get is an error in the console of everyone who opens the page.
FAVICON = (b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect width="16" height="16" rx="3"'
           b' fill="#2f6fdb"/><path d="M3.5 8.5l3 3 6-7" fill="none" stroke="#fff" stroke-width="2"/></svg>')


async def favicon(request: web.Request) -> web.Response:
    """GET /favicon.ico: the page's icon, an SVG."""
    return web.Response(body=FAVICON, content_type="image/svg+xml",
                        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "max-age=86400"})


async def stats(request: web.Request) -> web.Response:
    """GET /stats: the counters the page charts, since start-up."""
    _require_operator_view(request)
    app = request.app
    metrics = app[METRICS]
    return web.json_response({
        "accepted": metrics.accepted, "delivered": metrics.finished["delivered"],
        "failed_attempts": sum(n for outcome, n in metrics.attempts.items() if outcome != "success"),
        "dead_letter": metrics.dead_letter, "queue_depth": app[WORKERS].depth,
    })


async def request_sent(request: web.Request) -> web.Response:
    """GET /webhooks/{job_id}/request: the body every attempt sent, and each attempt's headers."""
    job_id = _job_id(request)
    store, caller = request.app[STORE], request[CALLER]
    found = await store.payload(caller, job_id)
    if found is None:
        raise web.HTTPNotFound(text=f"job {job_id!r} has no delivery yet")
    payload, client = found
    signer = request.app[CLIENTS].signer(client)
    attempts = [{"attempt": number, "headers": {"User-Agent": USER_AGENT, **signer.headers(job_id, payload, number, int(at))}}
                for number, at, *_ in await store.attempts(caller, job_id)]
    return web.json_response({"job_id": job_id, "body": payload.decode("utf-8", "replace"), "attempts": attempts})


# ---------------------------------------------------------------------------
# The OpenAPI description
# ---------------------------------------------------------------------------


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    words = {400: "a bad request: the error says what to fix", 401: "missing or wrong API key",
             403: "not this key's to do (a disabled client, the operator's endpoints), or sent for another site's page",
             404: "no such job (or it has no webhook), or no such client", 408: "the body did not arrive within --timeout",
             409: "a round of attempts is under way, or the client's name is taken", 413: f"body over {MAX_BODY_BYTES // 1024} KiB",
             415: "not JSON, or a compressed body", 422: "the Idempotency-Key was used with another body",
             429: "too many requests at once from this address, or a client past --client-backlog",
             503: "shedding load, or the database cannot be reached: try again after Retry-After"}
    return {str(code): _json(_ref("Error"), words[code]) for code in (*codes, 401, 429, 503)}


TIME = {"type": "string", "format": "date-time"}
NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}
JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
CLIENT = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
OWNER = {"type": ["string", "null"], "description": "the client whose job it is; null for the operator's"}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "webhookd", "version": __version__,
             "description": "Runs a sentiment model on submitted text and tells the client by signed webhook."},
    "components": {
        "securitySchemes": {"bearerAuth": {
            "type": "http", "scheme": "bearer",
            "description": f"the operator's --api-key, or a client's key (whk_...): needed on every endpoint but"
                           f" {', '.join(OPEN_PATHS)} once webhookd runs with --api-key or any client exists"}},
        "schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
            "PredictRequest": {
                "type": "object", "required": ["text"], "additionalProperties": False,
                "properties": {
                    "text": {"type": "string", "minLength": 1, "maxLength": MAX_TEXT_CHARS},
                    "webhook_url": {"type": "string", "format": "uri", "maxLength": MAX_URL_CHARS},
                    "retry_policy": {
                        "type": "object", "additionalProperties": False,
                        "properties": {
                            name: {"type": "integer" if bound.integer else "number", "minimum": bound.low,
                                   "maximum": bound.high}
                            for name, bound in RETRY_POLICY_BOUNDS.items()
                        },
                    },
                },
            },
            "Accepted": {"type": "object", "required": ["job_id", "status", "webhook_registered"], "properties": {
                "job_id": {"type": "string"}, "status": {"const": "processing"},
                "webhook_registered": {"type": "boolean"}}},
            "Result": {"type": ["object", "null"], "properties": {
                "sentiment": {"enum": list(SENTIMENTS)}, "confidence": {"type": "number", "minimum": 0, "maximum": 1}}},
            "Job": {"type": "object", "required": ["job_id", "status", "result", "error", "created_at",
                                                   "completed_at", "webhook_url"], "properties": {
                "job_id": {"type": "string"}, "status": {"enum": list(JOB_STATUSES)},
                "result": _ref("Result"), "error": {"type": ["string", "null"]}, "created_at": TIME,
                "completed_at": NULLABLE_TIME, "webhook_url": {"type": ["string", "null"]}, "client": OWNER}},
            "JobList": {"type": "object", "required": ["jobs", "next"], "properties": {
                "next": {"type": ["string", "null"]},
                "jobs": {"type": "array", "items": {"type": "object", "properties": {
                    "job_id": {"type": "string"}, "status": {"enum": list(JOB_STATUSES)},
                    "created_at": TIME, "completed_at": NULLABLE_TIME, "webhook_url": {"type": ["string", "null"]},
                    "delivery_status": {"enum": [*DELIVERY_STATUSES, None]},
                    "attempts": {"type": "integer"}, "last_error": {"type": ["string", "null"]},
                    "next_attempt_at": NULLABLE_TIME, "client": OWNER}}}}},
            "Attempt": {"type": "object", "required": ["attempt", "timestamp", "status_code", "success", "error",
                                                       "duration_ms", "redelivery"], "properties": {
                "attempt": {"type": "integer", "minimum": 1}, "timestamp": TIME,
                "status_code": {"type": ["integer", "null"]}, "success": {"type": "boolean"},
                "error": {"type": ["string", "null"]}, "duration_ms": {"type": "number"},
                "redelivery": {"type": "boolean",
                               "description": "the first attempt of a round that a redelivery (one job's or bulk) started"},
                "response": {"type": "object", "properties": {
                    "headers": {"type": "object", "additionalProperties": {"type": "string"}},
                    "body": {"type": "string"}, "truncated": {"type": "boolean"}}}}},
            "WebhookStatus": {"type": "object", "required": ["job_id", "webhook_url", "delivery_status",
                                                             "next_attempt_at", "attempts"], "properties": {
                "job_id": {"type": "string"}, "webhook_url": {"type": "string"}, "client": OWNER,
                "delivery_status": {"enum": list(DELIVERY_STATUSES)},
                "next_attempt_at": NULLABLE_TIME, "attempts": {"type": "array", "items": _ref("Attempt")}}},
            "DeadLetter": {"type": "object", "required": ["deliveries"], "properties": {
                "deliveries": {"type": "array", "items": {"type": "object", "properties": {
                    "job_id": {"type": "string"}, "webhook_url": {"type": "string"}, "attempts": {"type": "integer"},
                    "last_error": {"type": ["string", "null"]}, "failed_at": TIME}}}}},
            "BulkRedelivery": {"type": "object", "required": ["since"], "additionalProperties": False,
                               "properties": {"since": TIME, "until": NULLABLE_TIME, "dry_run": {"type": "boolean"}}},
            "Client": {"type": "object", "required": ["name", "created_at", "disabled", "keys", "secrets"],
                       "properties": {
                "name": {"type": "string"}, "created_at": TIME, "disabled": {"type": "boolean"},
                "keys": {"type": "array", "items": {"type": "object", "required": ["id", "created_at"],
                                                    "properties": {"id": {"type": "string"}, "created_at": TIME}}},
                "secrets": {"type": "integer", "description": "secrets that sign its webhooks now"}}},
            "NewKey": {"type": "object", "required": ["id", "key"], "properties": {
                "id": {"type": "string"}, "key": {"type": "string", "pattern": "^whk_[A-Za-z0-9_-]{43}$"}}},
            "NewClient": {"type": "object", "required": ["name", "created_at", "api_key", "secret"], "properties": {
                "name": {"type": "string"}, "created_at": TIME, "api_key": _ref("NewKey"),
                "secret": {"type": "string", "pattern": "^whsec_"}}},
            "Health": {"type": "object", "required": ["status", "instance"], "properties": {
                "status": {"const": "ok"}, "instance": {"type": "string"}, "version": {"type": "string"},
                "queue_depth": {"type": "integer"}}},
        },
    },
    "security": [{}, {"bearerAuth": []}],
    "paths": {
        "/predict": {"post": {
            "summary": "Submit a text; its result arrives by webhook",
            "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                            "schema": {"type": "string", "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY_CHARS}}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("PredictRequest")}}},
            "responses": {"202": _json(_ref("Accepted"), "committed, and queued for the model"),
                          **_errors(400, 403, 408, 413, 415, 422)}}},
        "/jobs": {"get": {
            "summary": "Jobs, newest first, filtered, a page at a time",
            "parameters": [
                {"name": "status", "in": "query", "schema": {"type": "string"}, "description": "repeat or a,b"},
                {"name": "delivery_status", "in": "query", "schema": {"type": "string"}},
                {"name": "q", "in": "query", "schema": {"type": "string"}, "description": "a job id or its start"},
                {"name": "receiver", "in": "query", "schema": {"type": "string"},
                 "description": "jobs whose webhook_url goes to this host (any port), or host:port"},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                {"name": "before", "in": "query", "schema": {"type": "string"}, "description": "the last page's next"},
                {"name": "client", "in": "query", "schema": {"type": "string"},
                 "description": "the operator's filter: one client's jobs (400 with a client's key)"}],
            "responses": {"200": _json(_ref("JobList"), "a page of jobs"), **_errors(400)}}},
        "/jobs/{job_id}": {"get": {
            "summary": "A job, its status and result", "parameters": [JOB_ID],
            "responses": {"200": _json(_ref("Job"), "the job"), **_errors(404)}}},
        "/webhooks/{job_id}/status": {"get": {
            "summary": "A job's delivery and every attempt", "parameters": [JOB_ID],
            "responses": {"200": _json(_ref("WebhookStatus"), "the delivery"), **_errors(404)}}},
        "/webhooks/dead-letter": {"get": {
            "summary": "Deliveries that failed for good, newest first",
            "parameters": [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}],
            "responses": {"200": _json(_ref("DeadLetter"), "the dead letter"), **_errors(400)}}},
        "/webhooks/{job_id}/redeliver": {"post": {
            "summary": "A new round of attempts for a finished delivery", "parameters": [JOB_ID],
            "responses": {"202": _json({"type": "object", "properties": {
                "job_id": {"type": "string"}, "delivery_status": {"const": "pending"}}}, "a round started"),
                **_errors(403, 404, 409)}}},
        "/webhooks/redeliver": {"post": {
            "summary": "A new round for every delivery that failed in a window",
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("BulkRedelivery")}}},
            "responses": {
                "200": _json({"type": "object", "properties": {"would_redeliver": {"type": "integer"}}}, "dry run"),
                "202": _json({"type": "object", "properties": {"redelivered": {"type": "integer"}}}, "rounds started"),
                **_errors(400, 403, 408, 413, 415)}}},
        "/healthz": {"get": {
            "summary": "Ready: 200; 503 naming what is wrong", "security": [{}],
            "responses": {"200": _json(_ref("Health"), "serving"), "503": _json(_ref("Error"), "not serving")}}},
        "/metrics": {"get": {
            "summary": "Prometheus text format (the operator's)",
            "responses": {"200": {"description": "metrics", "content": {"text/plain": {"schema": {"type": "string"}}}},
                          **_errors(403)}}},
        "/webhooks/{job_id}/request": {"get": {
            "summary": "The body every attempt sent, and each attempt's headers (signatures, never the secret)",
            "parameters": [JOB_ID],
            "responses": {"200": _json({"type": "object", "required": ["job_id", "body", "attempts"], "properties": {
                "job_id": {"type": "string"}, "body": {"type": "string"},
                "attempts": {"type": "array", "items": {"type": "object", "properties": {
                    "attempt": {"type": "integer"},
                    "headers": {"type": "object", "additionalProperties": {"type": "string"}}}}}}},
                "what was sent"), **_errors(404)}}},
        "/stats": {"get": {
            "summary": "Counters since start-up, for the page's chart (the operator's)",
            "responses": {"200": _json({"type": "object", "properties": {
                name: {"type": "integer"} for name in ("accepted", "delivered", "failed_attempts", "dead_letter",
                                                       "queue_depth")}}, "the counters"), **_errors(403)}}},
        "/clients": {
            "post": {"summary": "A new client (the operator's); its key and secret are in this answer only",
                     "requestBody": {"required": True, "content": {"application/json": {"schema": {
                         "type": "object", "required": ["name"], "additionalProperties": False,
                         "properties": {"name": {"type": "string", "pattern": f"^{CLIENT_NAME.pattern}$"}}}}}},
                     "responses": {"201": _json(_ref("NewClient"), "made"), **_errors(400, 403, 408, 409, 413, 415)}},
            "get": {"summary": "Every client (the operator's); never a key or a secret",
                    "responses": {"200": _json({"type": "object", "required": ["clients"], "properties": {
                        "clients": {"type": "array", "items": _ref("Client")}}}, "the clients"), **_errors(403)}}},
        "/clients/{name}": {
            "get": {"summary": "One client (the operator, or the client itself)", "parameters": [CLIENT],
                    "responses": {"200": _json(_ref("Client"), "the client"), **_errors(403, 404)}},
            "patch": {"summary": "Disable or enable a client (the operator's)", "parameters": [CLIENT],
                      "requestBody": {"required": True, "content": {"application/json": {"schema": {
                          "type": "object", "required": ["disabled"], "additionalProperties": False,
                          "properties": {"disabled": {"type": "boolean"}}}}}},
                      "responses": {"200": _json(_ref("Client"), "the client"),
                                    **_errors(400, 403, 404, 408, 413, 415)}}},
        "/clients/{name}/keys": {"post": {
            "summary": "One more API key (the operator, or the client itself); shown in this answer only",
            "parameters": [CLIENT], "responses": {"201": _json(_ref("NewKey"), "the key"), **_errors(403, 404)}}},
        "/clients/{name}/keys/{key_id}": {"delete": {
            "summary": "Refuse a key from now on (the operator, or the client itself)",
            "parameters": [CLIENT, {"name": "key_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"204": {"description": "revoked"}, **_errors(403, 404)}}},
        "/clients/{name}/secrets": {"post": {
            "summary": "A new signing secret (the operator, or the client itself); the previous ones sign on"
                       " until previous_until",
            "parameters": [CLIENT],
            "requestBody": {"required": False, "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": False,
                "properties": {"overlap_hours": {"type": "number", "minimum": 0, "maximum": 720}}}}}},
            "responses": {"201": _json({"type": "object", "required": ["secret", "previous_until"], "properties": {
                "secret": {"type": "string", "pattern": "^whsec_"}, "previous_until": TIME}}, "the new secret"),
                **_errors(400, 403, 404, 408, 413, 415)}}},
        "/": {"get": {
            "summary": "The Recent Deliveries page (no data in it, no key needed)", "security": [{}],
            "responses": {"200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}}}},
        "/ui": {"get": {
            "summary": "The same page", "security": [{}],
            "responses": {"200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}}}},
        "/favicon.ico": {"get": {
            "summary": "The page's icon", "security": [{}],
            "responses": {"200": {"description": "SVG", "content": {"image/svg+xml": {"schema": {"type": "string"}}}}}}},
        "/openapi.json": {"get": {
            "summary": "This description", "security": [{}],
            "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {}}}}}},
    },
}


async def openapi(request: web.Request) -> web.Response:
    """GET /openapi.json: the OpenAPI 3.1 description of every endpoint."""
    return web.json_response(OPENAPI)


# ---------------------------------------------------------------------------
# The application
# ---------------------------------------------------------------------------


def create_app(config: Config) -> web.Application:
    """The webhookd application: routes, middleware, and the workers that start and stop with it."""
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[json_errors, admit])
    app[CONFIG] = config
    app[IDEMPOTENCY_IN_PROGRESS] = {}
    app[LOOPS] = Loops()
    app[REQUESTS_BY_ADDRESS] = Counter()
    app.cleanup_ctx.append(_running)
    app.router.add_post("/predict", predict)
    app.router.add_get("/jobs", list_jobs)
    app.router.add_get("/jobs/{job_id}", get_job)
    app.router.add_get("/webhooks/dead-letter", dead_letter)
    app.router.add_get("/webhooks/{job_id}/status", webhook_status)
    app.router.add_post("/webhooks/{job_id}/redeliver", redeliver)
    app.router.add_post("/webhooks/redeliver", redeliver_failed)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/", page)
    app.router.add_get("/ui", page)
    app.router.add_get("/favicon.ico", favicon)
    app.router.add_get("/stats", stats)
    app.router.add_get("/webhooks/{job_id}/request", request_sent)
    app.router.add_post("/clients", post_client)
    app.router.add_get("/clients", get_clients)
    app.router.add_get("/clients/{name}", get_client)
    app.router.add_patch("/clients/{name}", patch_client)
    app.router.add_post("/clients/{name}/keys", post_client_key)
    app.router.add_delete("/clients/{name}/keys/{key_id}", delete_client_key)
    app.router.add_post("/clients/{name}/secrets", post_client_secret)
    return app


async def _running(app: web.Application) -> AsyncIterator[None]:
    """Open the db, start delivery and the workers; on the way out, stop them in reverse."""
    config = app[CONFIG]
    model = load_model(config.model)
    loops = app[LOOPS]
    async with contextlib.AsyncExitStack() as stack:
        store = await open_store(config.db, loops, config.timeout)
        stack.push_async_callback(store.close)
        stack.push_async_callback(store.hand_over)
        clients = Clients(store, Signer(config.secrets or [await _stored_secret(store, config.db)]))
        await clients.refresh()
        loops.start("clients", clients.keep_fresh)
        stack.push_async_callback(loops.stop, "clients")
        metrics = Metrics(*await store.counts())
        resolver = None if config.allow_private_urls else PublicResolver()
        if resolver:
            stack.push_async_callback(resolver.close)  # a connector closes only a resolver it made
        session = _client_session(config, resolver)
        stack.push_async_callback(session.close)
        fence = Fence()
        engine = DeliveryEngine(config, store, clients, session, metrics, loops, fence)
        engine.start()
        stack.push_async_callback(engine.stop)
        workers = InferenceWorkers(config, store, engine, model, metrics, loops)
        workers.start()
        stack.push_async_callback(workers.stop)
        instance = Instance(config, store, workers, engine, fence, loops)
        resumed = await instance.start()
        stack.push_async_callback(instance.stop)
        app[STORE], app[ENGINE], app[WORKERS], app[METRICS], app[FENCE] = store, engine, workers, metrics, fence
        app[CLIENTS] = clients
        loops.start("pruner", functools.partial(_prune_idempotency_keys, store))
        stack.push_async_callback(loops.stop, "pruner")
        if config.retention_days:
            loops.start("retention", functools.partial(_apply_retention, store, config.retention_days * 86400))
            stack.push_async_callback(loops.stop, "retention")
        waits = ", ".join(f"{wait:g}" for wait in retry_schedule(config.retry)[:5]) or "no"
        if config.retry.max_retries > 5:
            waits += ", ..."
        log.info("webhookd %s, %s on %s: resuming %d jobs and %d deliveries; retries after %s s",
                 __version__, store.instance, redacted(config.db), len(resumed.job_ids), len(resumed.deliveries), waits)
        yield
        log.info("webhookd stopping; what is unfinished stays in %s, for the next start or the other instances",
                 redacted(config.db))


def _client_session(config: Config, resolver: AbstractResolver | None) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=BoundedConnector(max_idle=config.max_in_flight, limit=config.max_in_flight, resolver=resolver),
        timeout=aiohttp.ClientTimeout(total=config.timeout),
        headers={"User-Agent": USER_AGENT},
        # A receiver's cookies must not reach the next receiver; its answer is kept as it came,
        # its first bytes only, so a compressed one is not inflated to get them.
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
    )


async def _stored_secret(store: Store, db: str) -> str:
    proposed = generate_secret()
    secret = await store.secret(proposed)
    hide_in_logs(secret)
    if secret != proposed:
        return secret
    print(
        f"webhookd: generated a signing secret and stored it in {redacted(db)}; it is shown only this once:\n\n"
        f"    {secret}\n\n"
        "Receivers verify X-Signature == 'sha256=' + HMAC-SHA256(key, raw body) in hex, where key\n"
        "is the base64-decoded part after 'whsec_', or use any Standard Webhooks library with the\n"
        "secret as it is. To watch signed webhooks arrive: python webhookd.py receive\n",
        flush=True,
    )
    return secret


RETENTION_BATCH = 500  # jobs a transaction: small, so requests and workers never wait long


async def _apply_retention(store: Store, seconds: float) -> None:
    """Delete the finished jobs older than `seconds`, a batch at a time, now and every so often."""
    while True:
        before = time.time() - seconds
        deleted = 0
        while (batch := await store.delete_finished(before, RETENTION_BATCH)):
            deleted += batch
            await asyncio.sleep(0.01)
        if deleted:
            log.info("deleted %d finished jobs older than %s (--retention-days)", deleted, iso_time(before))
        await asyncio.sleep(min(600.0, seconds / 10))


async def _prune_idempotency_keys(store: Store) -> None:
    while True:
        try:
            await store.forget_idempotency_keys(time.time() - IDEMPOTENCY_KEY_LIFETIME)
        except Exception:
            _log_failure("could not forget old idempotency keys; trying again in an hour")
        await asyncio.sleep(3600)


# ---------------------------------------------------------------------------
# The receiver (python webhookd.py receive)
# ---------------------------------------------------------------------------


SIGNED_HEADERS = ("X-Signature", "webhook-id", "webhook-timestamp", "webhook-signature", "X-Webhook-Attempt")


def create_receiver(keys: list[bytes], fail_first: int = 0, echo: bool = True) -> web.Application:
    """A receiver for manual tests: verifies both signatures, prints each webhook, lists them."""
    received: deque[dict[str, Any]] = deque(maxlen=1000)
    attempts_by_id: Counter[str] = Counter()

    async def callback(request: web.Request) -> web.Response:
        body = await request.read()
        webhook_id = request.headers.get("webhook-id", "")
        attempts_by_id[webhook_id] += 1
        x_signature_ok = verify_x_signature(keys, body, request.headers.get("X-Signature"))
        webhook_signature_error = verify_webhook_signature(keys, body, request.headers, time.time())
        if keys and not (x_signature_ok and webhook_signature_error is None):
            answer = 401  # as a real receiver would: a forged webhook is not acted on
        else:
            answer = 500 if attempts_by_id[webhook_id] <= fail_first else 200
        entry = {
            "received_at": iso_time(time.time()),
            "webhook_id": webhook_id,
            "attempt": request.headers.get("X-Webhook-Attempt"),
            "x_signature_ok": x_signature_ok,
            "webhook_signature_error": webhook_signature_error,
            "answered": answer,
            "headers": {h: request.headers[h] for h in SIGNED_HEADERS if h in request.headers},
            "body": body.decode("utf-8", "replace"),
        }
        received.append(entry)
        if echo:
            _print_webhook(entry, bool(keys))
        return web.json_response({"received": answer == 200}, status=answer)

    async def callbacks(request: web.Request) -> web.Response:
        return web.json_response({"callbacks": list(received)})

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_post("/callback", callback)
    app.router.add_post("/callback/{tail:.*}", callback)
    app.router.add_get("/callbacks", callbacks)
    return app


def _print_webhook(entry: dict[str, Any], can_verify: bool) -> None:
    if not can_verify:
        verdict = "signatures not checked (no secret)"
    else:
        x_sig = "ok" if entry["x_signature_ok"] else "BAD"
        std = entry["webhook_signature_error"] or "ok"
        verdict = f"X-Signature {x_sig}, webhook-signature {std}"
    print(f"[{entry['received_at']}] {entry['webhook_id']} attempt {entry['attempt']}: {verdict};"
          f" answered {entry['answered']}\n  {entry['body']}", flush=True)


# ---------------------------------------------------------------------------
# The benchmark (python webhookd.py bench)
# ---------------------------------------------------------------------------


BENCH_TEXT = "The parcel came a day early and the support team was lovely."
MOST_RETRY_AFTER = 5.0  # seconds: a polite client waits as asked, but one answer must not stall the run


class BenchError(Exception):
    """What stops a benchmark run, said in one line."""


@dataclass
class BenchRun:
    """What one run saw: when each accepted job was sent, and when its webhooks arrived."""

    started: float = 0.0
    last_accepted: float = 0.0
    busy: int = 0  # 429 and 503 answers, each waited out and its job sent again
    sent: dict[str, float] = field(default_factory=dict)
    arrivals: defaultdict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    @property
    def delivered(self) -> int:
        """Accepted jobs whose webhook arrived at least once."""
        return len(self.sent.keys() & self.arrivals.keys())

    @property
    def lost(self) -> int:
        """Accepted jobs whose webhook never arrived."""
        return len(self.sent) - self.delivered


def bench_receiver(run: BenchRun) -> web.Application:
    """A receiver that notes when each job's webhook arrives, and answers 200."""
    async def webhook(request: web.Request) -> web.Response:
        arrived = time.perf_counter()
        try:
            job_id = json.loads(await request.read())["job_id"]
        except (ValueError, KeyError, TypeError):
            raise web.HTTPBadRequest(text="not a webhook of webhookd's") from None
        run.arrivals[job_id].append(arrived)
        return web.Response()

    app = web.Application()
    app.router.add_post("/webhook", webhook)
    return app


async def run_bench(url: str, jobs: int, concurrency: int, wait: float, api_key: str | None,
                    progress: bool) -> BenchRun:
    """Submit `jobs` jobs to the webhookd at `url` from closed-loop submitters; note what arrives."""
    run = BenchRun()
    receiver = web.AppRunner(bench_receiver(run), access_log=None)
    await receiver.setup()
    shown = asyncio.ensure_future(_show_progress(run, jobs)) if progress else None
    try:
        await web.TCPSite(receiver, "127.0.0.1", 0).start()
        webhook_url = f"http://127.0.0.1:{receiver.addresses[0][1]}/webhook"
        body = json.dumps({"text": BENCH_TEXT, "webhook_url": webhook_url}).encode()
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {api_key}"} if api_key else {})
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=60, connect=10)) as session:
            run.started = time.perf_counter()
            await _submit_all(session, url, body, run, iter(range(jobs)), concurrency)
        while run.lost and time.perf_counter() < run.last_accepted + wait:
            await asyncio.sleep(0.05)
    finally:
        if shown:
            shown.cancel()
            await asyncio.gather(shown, return_exceptions=True)
        await receiver.cleanup()
    return run


async def _submit_all(session: aiohttp.ClientSession, url: str, body: bytes, run: BenchRun,
                      numbers: Iterator[int], concurrency: int) -> None:
    # One submitter's error ends the run: the others are stopped, not left sending.
    submitters = [asyncio.ensure_future(_submit(session, url, body, run, numbers)) for _ in range(concurrency)]
    try:
        await asyncio.gather(*submitters)
    finally:
        for submitter in submitters:
            submitter.cancel()
        await asyncio.gather(*submitters, return_exceptions=True)


async def _submit(session: aiohttp.ClientSession, url: str, body: bytes, run: BenchRun,
                  numbers: Iterator[int]) -> None:
    """One closed-loop submitter: a job, its answer, then the next job, until none are left."""
    for _ in numbers:
        await _submit_job(session, url, body, run)


async def _submit_job(session: aiohttp.ClientSession, url: str, body: bytes, run: BenchRun) -> None:
    """Send one job until it is accepted, waiting out each 429 or 503 as its Retry-After asks."""
    while True:
        sent = time.perf_counter()
        status, retry_after, answer = await _post_job(session, url, body)
        if status == 202:
            run.sent[answer["job_id"]] = sent
            run.last_accepted = time.perf_counter()
            return
        if status not in (429, 503):
            raise _refusal(url, status, answer.get("error", ""))
        run.busy += 1
        await asyncio.sleep(min(parse_retry_after(retry_after, time.time()) or 1.0, MOST_RETRY_AFTER))


async def _post_job(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, str | None, dict[str, Any]]:
    try:
        async with session.post(url + "/predict", data=body) as response:
            answer = await response.json(content_type=None)
    except aiohttp.ClientConnectorError as exc:
        # The socket's own words ("Connect call failed ...") repeat the address; the errno's do not.
        reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror or str(exc)
        raise BenchError(f"cannot reach {url}: {reason} (is webhookd running there? or use bench --start)") from None
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise BenchError(f"{url}/predict did not answer: {exc or type(exc).__name__}") from None
    except ValueError:
        raise BenchError(f"{url}/predict answered {response.status} without JSON: is it webhookd?") from None
    if not isinstance(answer, dict):
        raise BenchError(f"{url}/predict answered {response.status} with JSON that is not webhookd's")
    return response.status, response.headers.get("Retry-After"), answer


def _refusal(url: str, status: int, error: str) -> BenchError:
    if "--allow-private-urls" in error:
        return BenchError(f"{url} refuses webhooks to this machine's 127.0.0.1, where the benchmark receives"
                          " them: start it with --allow-private-urls, or use bench --start")
    hint = "; give its key with --api-key (or WEBHOOKD_API_KEY)" if status == 401 else ""
    return BenchError(f"{url}/predict answered {status}: {error}{hint}")


async def _show_progress(run: BenchRun, jobs: int) -> None:
    # At most four times a second: a terminal redrawn faster only costs the run CPU.
    line = ""
    try:
        while True:
            line = f"\raccepted {len(run.sent)}/{jobs}, delivered {run.delivered}"
            print(line, end="", flush=True)
            await asyncio.sleep(0.25)
    finally:
        print("\r" + " " * len(line) + "\r", end="", flush=True)


def bench_report(run: BenchRun) -> str:
    """The figures of a run, one to a line, as `name  value`."""
    delivered = run.sent.keys() & run.arrivals.keys()
    latencies = sorted((run.arrivals[job_id][0] - run.sent[job_id]) * 1000 for job_id in delivered)
    submit_window = run.last_accepted - run.started
    # Neither window is 0: a run that ends without an error has accepted a job, after sending it.
    delivery_window = max((run.arrivals[job_id][0] for job_id in delivered), default=run.last_accepted) - run.started
    lines = [
        f"accepted    {len(run.sent)} in {submit_window:.2f} s: {len(run.sent) / submit_window:.1f}/s"
        f" (busy answers waited out: {run.busy})",
        f"delivered   {len(delivered)} in {delivery_window:.2f} s: {len(delivered) / delivery_window:.1f}/s",
        "latency     " + (", ".join(f"p{p} {_percentile(latencies, p):.1f} ms" for p in (50, 90, 99))
                          if latencies else "none delivered") + " (submit to webhook)",
        f"lost        {run.lost}",
        f"duplicates  {sum(len(run.arrivals[job_id]) > 1 for job_id in delivered)}",
    ]
    return "\n".join(lines)


def _percentile(ordered: list[float], percent: int) -> float:
    # Nearest rank: a value that was measured, never one interpolated between two.
    return ordered[max(0, math.ceil(percent / 100 * len(ordered)) - 1)]


@contextlib.contextmanager
def started_service() -> Iterator[str]:
    """A webhookd of the benchmark's own, in a child process on a temporary db, stopped at the end; its URL."""
    with tempfile.TemporaryDirectory(prefix="webhookd-bench-") as folder:
        port = _free_port()
        with open(os.path.join(folder, "stderr.txt"), "w+", encoding="utf-8") as errors:
            # Its other settings come from WEBHOOKD_* variables, as any serve's do.
            child = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "serve", "--host", "127.0.0.1", "--port", str(port),
                 "--db", os.path.join(folder, "bench.db"), "--allow-private-urls", "--log-level", "warning"],
                stdout=subprocess.DEVNULL, stderr=errors,
            )
            try:
                url = f"http://127.0.0.1:{port}"
                _wait_until_up(child, url, errors)
                yield url
            finally:
                child.terminate()
                try:
                    child.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_up(child: subprocess.Popen[bytes], url: str, errors: Any) -> None:
    deadline = time.monotonic() + 30
    while child.poll() is None and time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1).close()
            return
        except urllib.error.HTTPError:  # it answers, if unwell: the run will say how
            return
        except OSError:
            time.sleep(0.05)
    errors.seek(0)
    said = errors.read().strip().splitlines() or ["it did not answer within 30 s"]
    raise BenchError(f"the webhookd started for the run did not come up: {said[-1]}")


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line, with WEBHOOKD_<OPTION> variables as defaults."""
    if not argv or argv[0] not in ("serve", "receive", "bench"):
        argv = ["serve", *argv]
    parser = argparse.ArgumentParser(prog="webhookd.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve", help="run the service (the default)",
        epilog="python webhookd.py receive --help: the verifying receiver for manual tests;"
               " python webhookd.py bench --help: the benchmark",
    )
    _option(serve, "--host", "127.0.0.1", "listen address")
    _option(serve, "--port", 8000, "listen port (0: any free port; the chosen one is printed)", int)
    _option(serve, "--db", "webhookd.db",
            "where jobs, deliveries and attempts live: an SQLite file (one instance),"
            " or a postgresql:// URL shared by several instances")
    _option(serve, "--workers", 4, "inference workers fed by the job queue", int)
    _option(serve, "--secret", None, "signing secret(s), space separated; default: generated once, kept in the db")
    _option(serve, "--secret-file", None, "read --secret from this file, so it is not on the command line")
    _option(serve, "--max-retries", 3, "retries after the first attempt", int)
    _option(serve, "--backoff-base", 1.0, "seconds before retry 1; retry k waits base * factor^(k-1)", float)
    _option(serve, "--backoff-factor", 2.0, "growth per retry", float)
    _option(serve, "--backoff-max", "3600", "cap on any single wait, Retry-After included (seconds, or 10h)")
    _option(serve, "--backoff-jitter", 0.0, "spread each wait by up to +- this fraction (0..1)", float)
    _option(serve, "--retry-schedule", None,
            "the waits before each retry, e.g. 5s,5m,30m,2h,5h,10h,10h (units s, m, h, d); replaces"
            " --max-retries, --backoff-base and --backoff-factor")
    _option(serve, "--timeout", 10.0, "seconds one delivery attempt may take, connect to last byte", float)
    _option(serve, "--max-in-flight", 256, "delivery attempts running at once, across all receivers", int)
    _option(serve, "--max-backlog", 4000,
            "accepted work not yet done (jobs before inference, deliveries due); past it /predict answers 503", int)
    _option(serve, "--client-backlog", 0,
            "the most accepted, unfinished work one client may hold; past it its /predict answers 429"
            " (0: half of --max-backlog)", int)
    _option(serve, "--retention-days", 30.0, "delete finished jobs older than this (0: keep everything)", float)
    _flag(serve, "--allow-private-urls", "allow webhook URLs on loopback/private networks (local testing)")
    _option(serve, "--api-key", None,
            f"require Authorization: Bearer <key> on every endpoint but {', '.join(OPEN_PATHS)}")
    _option(serve, "--api-key-file", None, "read --api-key from this file, so it is not on the command line")
    _option(serve, "--model", "vader", "the sentiment model: vader, or module:callable (text -> dict)")
    _option(serve, "--log-level", "info", "debug, info, warning or error")
    _option(serve, "--log-format", "text", "text, or json: one object per line")
    _option(serve, "--failover-after", 10.0,
            "PostgreSQL: seconds without a heartbeat before an instance's work is taken over", float)
    serve.add_argument("--version", action="version", version=f"webhookd {__version__}")

    receive = commands.add_parser("receive", help="run a verifying receiver for manual tests")
    # The receiver shares the service's secret and db variables, but not where it listens.
    _option(receive, "--host", "127.0.0.1", "listen address", env="WEBHOOKD_RECEIVE_HOST")
    _option(receive, "--port", 9000, "listen port", int, env="WEBHOOKD_RECEIVE_PORT")
    _option(receive, "--secret", None, "the service's secret(s); default: read from --db")
    _option(receive, "--db", "webhookd.db", "where to find the generated secret when --secret is not given")
    _option(receive, "--fail-first", 0, "answer 500 to the first N attempts of each webhook", int)

    bench = commands.add_parser(
        "bench", help="measure a webhookd: jobs/s, submit-to-webhook latency, lost and duplicate webhooks",
        description="Submit jobs whose webhooks go to a receiver of the benchmark's own on 127.0.0.1, and"
                    " print accepted/s, delivered/s, the p50/p90/p99 submit-to-webhook latency and the"
                    " jobs lost and delivered twice. Exit 0 if none was lost, 1 if some were, 2 on an error.",
    )
    target = bench.add_mutually_exclusive_group()
    target.add_argument("--url", default="http://127.0.0.1:8000",
                        help="a running webhookd on this machine, with --allow-private-urls (default %(default)s)")
    target.add_argument("--start", action="store_true",
                        help="start a webhookd of its own on a temporary db instead, and stop it at the end")
    bench.add_argument("-n", "--jobs", type=int, default=2000, help="jobs to submit (default %(default)s)")
    bench.add_argument("--concurrency", type=int, default=32,
                       help="submitters, each sending its next job when the last is answered (default %(default)s)")
    bench.add_argument("--wait", type=float, default=30.0,
                       help="seconds after the last submit to wait for webhooks; any not arrived by then are lost"
                            " (default %(default)s)")
    _option(bench, "--api-key", None, "the key to send, as Authorization: Bearer <key>")
    return parser.parse_args(argv)


def _option(
    parser: argparse.ArgumentParser, flag: str, default: Any, help: str, type: type = str, env: str | None = None
) -> None:
    env = env or _env_name(flag)
    value = os.environ.get(env, default)
    parser.add_argument(flag, default=value, type=type, help=f"{help} (env {env}; default {default})")


def _flag(parser: argparse.ArgumentParser, flag: str, help: str) -> None:
    # The variable's text stays as it is until config_from_args, which refuses a non-boolean.
    env = _env_name(flag)
    parser.add_argument(flag, action="store_true", default=os.environ.get(env, False),
                        help=f"{help} (env {env}: true or false)")


def _boolean(name: str, value: bool | str) -> bool:
    if isinstance(value, bool):
        return value
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if value.strip().lower() in ("", "0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be true or false (or 1/0, yes/no, on/off), not {value!r}")


def _from_file(flag: str, value: str | None, path: str | None) -> str | None:
    if path is None:
        return value
    if value is not None:
        raise ValueError(f"give {flag} or {flag}-file, not both")
    try:
        with open(path, encoding="utf-8") as file:
            return file.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{flag}-file {path}: {getattr(exc, 'strerror', None) or exc}") from None


def _env_name(flag: str) -> str:
    return "WEBHOOKD_" + flag.removeprefix("--").upper().replace("-", "_")


def config_from_args(args: argparse.Namespace) -> Config:
    """The Config of `serve`'s arguments; ValueError says what to fix."""
    return Config(
        host=args.host,
        port=args.port,
        db=args.db,
        workers=args.workers,
        secrets=tuple((_from_file("--secret", args.secret, args.secret_file) or "").split()),
        retry=_retry_policy_of(args),
        timeout=args.timeout,
        max_in_flight=args.max_in_flight,
        max_backlog=args.max_backlog,
        client_backlog=args.client_backlog,
        retention_days=args.retention_days,
        allow_private_urls=_boolean("WEBHOOKD_ALLOW_PRIVATE_URLS", args.allow_private_urls),
        api_key=_from_file("--api-key", args.api_key, args.api_key_file) or None,
        model=args.model,
        log_level=args.log_level,
        log_format=args.log_format,
        failover_after=args.failover_after,
    )


def _retry_policy_of(args: argparse.Namespace) -> RetryPolicy:
    backoff_max = parse_wait(args.backoff_max, "--backoff-max")
    if args.retry_schedule is None:
        return RetryPolicy(args.max_retries, args.backoff_base, args.backoff_factor, backoff_max, args.backoff_jitter)
    schedule = parse_retry_schedule(args.retry_schedule)
    return RetryPolicy(len(schedule), backoff_max=backoff_max, backoff_jitter=args.backoff_jitter, schedule=schedule)


def main(argv: list[str] | None = None) -> int:
    """Run `serve`, `receive`, `bench` or `clients`."""
    argv = sys.argv[1:] if argv is None else argv
    db, rest = _without_db(argv)
    if rest[:1] == ["clients"]:
        return manage_clients(db, rest[1:])
    args = parse_args(argv)
    if args.command == "receive":
        return _receive(args)
    if args.command == "bench":
        return _bench(args)
    try:
        config = config_from_args(args)
        load_model(config.model)
    except ValueError as exc:
        print(f"webhookd: {exc}", file=sys.stderr)
        return 2
    configure_logging(config)
    _raise_file_limit(config)
    if config.api_key is None and not _is_loopback(config.host):
        log.warning("listening on %s without --api-key: anyone who can reach it can submit jobs and so make"
                    " it send requests; set --api-key-file (or WEBHOOKD_API_KEY)", config.host)
    # Everything loaded so far (modules, the model's lexicon) lives as long as the process:
    # frozen, the collector stops scanning it again and again, and a higher first threshold
    # makes collections rarer in a server that makes a few short-lived objects per request.
    # Measured: +7 % jobs/s (compare 1.066, rounds 1.052-1.111).
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    return _run(
        create_app(config),
        loop=_event_loop(),
        host=config.host,
        port=config.port,
        access_log=logging.getLogger("aiohttp.access") if config.log_level == "debug" else None,
        shutdown_timeout=config.timeout,
        **SERVER_OPTIONS,
    )


def _raise_file_limit(config: Config) -> None:
    # Each attempt holds a socket, and so may each idle keep-alive connection kept for later
    # ones; clients' connections, the db and the model need theirs besides.
    try:
        import resource
    except ImportError:  # Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    needed = 2 * config.max_in_flight + 2 * MAX_REQUESTS_PER_ADDRESS
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning("the open-file limit is %d, under the %d that --max-in-flight %d and clients need;"
                    " raise it (LimitNOFILE= in systemd) or lower --max-in-flight", soft, needed, config.max_in_flight)


def _is_loopback(host: str) -> bool:
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    return host == "localhost"


def _run(app: web.Application, host: str, port: int, **options: Any) -> int:
    # Bound before the app starts, so that an instance that cannot listen stops before it
    # runs a job or sends a webhook.
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.create_server((host, port), family=family, backlog=1024)
    except OSError as exc:
        print(f"webhookd: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    try:
        web.run_app(app, sock=sock, **options)
    except StoreRefused as exc:
        print(f"webhookd: {exc}", file=sys.stderr)
        return 1
    return 0


def _event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # optional: the standard loop does the same, more slowly
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _receive(args: argparse.Namespace) -> int:
    try:
        secrets_ = (args.secret or "").split() or _secret_in_db(args.db)
    except StoreRefused as exc:
        print(f"webhookd receive: {exc}", file=sys.stderr)
        return 1
    try:
        keys = [signing_key(s) for s in secrets_]
    except ValueError as exc:
        print(f"webhookd receive: --secret: {exc}", file=sys.stderr)
        return 2
    if not keys:
        print("webhookd receive: no --secret and none in the db: signatures will not be checked", flush=True)
    print(f"webhookd receive: POST webhooks to http://{args.host}:{args.port}/callback;"
          f" GET /callbacks lists them", flush=True)
    return _run(create_receiver(keys, args.fail_first), host=args.host, port=args.port,
                access_log=None, print=None)


def _bench(args: argparse.Namespace) -> int:
    if args.jobs < 1 or args.concurrency < 1 or args.wait < 0:
        print("webhookd bench: --jobs and --concurrency must be 1 or more, and --wait 0 or more", file=sys.stderr)
        return 2
    if not args.url.startswith(("http://", "https://")):
        print(f"webhookd bench: --url {args.url!r} must begin with http:// or https://", file=sys.stderr)
        return 2
    try:
        with started_service() if args.start else contextlib.nullcontext(args.url.rstrip("/")) as url:
            print(f"webhookd bench: {args.jobs} jobs, {args.concurrency} at a time, to {url}"
                  + (" (started for this run)" if args.start else ""), flush=True)
            # The standard loop: uvloop measured no difference on this side, and asyncio.run's
            # Ctrl-C cancels the run, so that it stops its submitters and receiver in order.
            run = asyncio.run(run_bench(url, args.jobs, args.concurrency, args.wait, args.api_key, sys.stdout.isatty()))
    except BenchError as exc:
        print(f"webhookd bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(bench_report(run))
    return 0 if run.lost == 0 else 1


def _secret_in_db(db: str) -> list[str]:
    secret = asyncio.run(secret_in_db(db, Config.timeout))
    return [secret] if secret else []


# ---------------------------------------------------------------------------
# Command line: clients (python webhookd.py clients ...)
# ---------------------------------------------------------------------------


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, as every error of the command line is."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def manage_clients(db: str, argv: list[str]) -> int:
    """Make or change a client on --db directly, print what the HTTP API would answer, as JSON."""
    parser = OneLineParser(prog="webhookd.py clients", description="Manage the clients, on --db directly;"
                           " a service running on it has the change in force within a few seconds.")
    actions = parser.add_subparsers(dest="action", required=True)
    for action, help, arguments in CLIENT_ACTIONS:
        sub = actions.add_parser(action, help=help)
        for argument in arguments:
            sub.add_argument(argument)
        if action == "rotate-secret":
            sub.add_argument("--overlap-hours", type=float, default=24.0,
                             help="hours the previous secrets keep signing (0 to 720; default 24)")
    args = parser.parse_args(argv)
    try:
        shown = asyncio.run(_client_change(db, args))
    except (ClientError, StoreRefused, StoreUnavailable) as exc:
        print(f"webhookd clients: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(shown, indent=2))
    return 0


CLIENT_ACTIONS = (
    ("add", "make a client; shows its API key and signing secret, this once", ("name",)),
    ("list", "every client", ()),
    ("show", "one client", ("name",)),
    ("add-key", "one more API key for a client", ("name",)),
    ("revoke-key", "refuse one of a client's keys", ("name", "id")),
    ("rotate-secret", "a new signing secret; the previous ones sign on for --overlap-hours", ("name",)),
    ("disable", "refuse a client's keys (its accepted work is still delivered)", ("name",)),
    ("enable", "accept a client's keys again", ("name",)),
)


async def _client_change(db: str, args: argparse.Namespace) -> dict[str, Any]:
    store = await open_store(db, Loops(), timeout=10.0, instance=False)
    try:
        match args.action:
            case "add":
                return await make_client(store, args.name)
            case "list":
                return await list_clients(store)
            case "show":
                return await show_client(store, args.name)
            case "add-key":
                return await add_client_key(store, args.name)
            case "revoke-key":
                return await revoke_client_key(store, args.name, args.id)
            case "rotate-secret":
                return await rotate_client_secret(store, args.name, args.overlap_hours)
            case _:
                return await disable_client(store, args.name, args.action == "disable")
    finally:
        await store.close()


def _without_db(argv: list[str]) -> tuple[str, list[str]]:
    """--db's value wherever it stands on the line (else WEBHOOKD_DB, else the default), and the rest."""
    db, rest, words = os.environ.get("WEBHOOKD_DB", "webhookd.db"), [], iter(argv)
    for word in words:
        if word == "--db":
            db = next(words, db)
        elif word.startswith("--db="):
            db = word.removeprefix("--db=")
        else:
            rest.append(word)
    return db, rest


if __name__ == "__main__":
    sys.exit(main())
