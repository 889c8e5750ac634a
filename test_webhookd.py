"""The checklist webhookd must pass, one group each, then the rest of its contract.

Receivers are real loopback servers (pytest-aiohttp's aiohttp_server); the service is the real
create_app(), so the db, the workers and the delivery engine start and stop with each test.
Backoffs are tens of milliseconds; the schedule itself is asserted as a pure function.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import errno
import glob
import gzip
import hashlib
import hmac
import importlib.util
import json
import logging
import os
import platform
import re
import random
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

# Hypothesis keeps its example database and caches in a folder; in the temp dir, not beside the
# checkout, whose top level holds only what the project ships. Read when first needed, so set here.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "webhookd-hypothesis"))

import asyncpg
import pytest
import schemathesis
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from hypothesis import HealthCheck, given, settings, strategies as st
from prometheus_client.parser import text_string_to_metric_families
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

import webhookd
from webhookd import CONFIG, Config, RetryPolicy, create_app

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OPERATOR_KEY = "the-operators-key"
FAST = RetryPolicy(max_retries=3, backoff_base=0.02, backoff_factor=2.0)
DEADLINE = 15.0  # a hung test fails instead of hanging; never a speed requirement
HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------
# Fixtures: a service, and receivers that record what arrives
# ---------------------------------------------------------------------------


@dataclass
class Arrival:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body)


current_request: contextvars.ContextVar[web.Request] = contextvars.ContextVar("current_request")


@dataclass
class Receiver:
    """A loopback webhook receiver; `answers` decides each reply from the arrivals so far."""

    server: Any = None
    arrivals: list[Arrival] = field(default_factory=list)
    answers: Callable[[Arrival, int], web.StreamResponse | None] | None = None
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    def url(self, path: str = "/hook") -> str:
        return str(self.server.make_url(path))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        current_request.set(request)
        arrival = Arrival(request.path, dict(request.headers), await request.read())
        self.arrivals.append(arrival)
        async with self._arrived:
            self._arrived.notify_all()
        answer = self.answers(arrival, len(self.arrivals)) if self.answers else None
        if asyncio.iscoroutine(answer):
            answer = await answer
        return answer if answer is not None else web.json_response({"ok": True})

    async def wait_for(self, count: int, job_id: str | None = None) -> list[Arrival]:
        def matching() -> list[Arrival]:
            return [a for a in self.arrivals if job_id is None or a.json["job_id"] == job_id]

        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(lambda: len(matching()) >= count), DEADLINE)
        return matching()


# ---------------------------------------------------------------------------
# PostgreSQL: a real server, started by the tests themselves
# ---------------------------------------------------------------------------

POSTGRES_MISSING = (
    "the PostgreSQL tests need PostgreSQL's initdb and pg_ctl: apt-get install postgresql"
    " (or pip install pgserver, which brings them)"
)


def _postgres_bin() -> Path | None:
    # Debian puts wrappers on the PATH; the real tools sit beside the real pg_ctl.
    candidates = [shutil.which("pg_ctl"), *sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)]
    found = next((Path(c).resolve().parent for c in candidates if c and Path(c).exists()), None)
    if found is None:
        with contextlib.suppress(ImportError):
            import pgserver

            found = Path(pgserver.__file__).parent / "pginstall" / "bin"
    return found


class PostgresCluster:
    """A throwaway PostgreSQL cluster on a free loopback port; as the postgres user when run as root."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.home = Path(tempfile.mkdtemp(prefix="webhookd-pg-"))
        self.port = _free_port()
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.home, "postgres")
        self._run("initdb", "-D", str(self.home / "data"), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        self.start()

    def start(self) -> None:
        options = f"-p {self.port} -k {self.home} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300"
        self._run("pg_ctl", "-D", str(self.home / "data"), "-l", str(self.home / "log"), "-w", "-o", options, "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.home / "data"), "-m", "immediate", "-w", "stop")

    def remove(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.stop()
        shutil.rmtree(self.home, ignore_errors=True)

    def new_database(self) -> str:
        """The URL of a fresh, empty schema: as good as a new database here, and 100 times faster to make."""
        name = f"test_{secrets.token_hex(6)}"
        self.psql(f"CREATE SCHEMA {name}")
        return f"{self.url()}?search_path={name}"

    def url(self, database: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def psql(self, *statements: str, database: str = "postgres") -> None:
        """Run statements as the superuser, each in a transaction of its own."""
        commands = [arg for statement in statements for arg in ("-c", statement)]
        subprocess.run([str(self.bin_dir / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                        "-d", database, "-q", "-v", "ON_ERROR_STOP=1", *commands],
                       check=True, capture_output=True, timeout=60)

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bin_dir / tool), *args]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def new_postgres_cluster() -> PostgresCluster:
    """A cluster of its own, or a skip (a failure in CI) saying how to get PostgreSQL."""
    bin_dir = _postgres_bin()
    if bin_dir is None:
        if os.environ.get("CI"):
            pytest.fail(POSTGRES_MISSING)
        pytest.skip(POSTGRES_MISSING)
    return PostgresCluster(bin_dir)


@pytest.fixture(scope="session")
def postgres() -> Any:
    cluster = new_postgres_cluster()
    yield cluster
    cluster.remove()


@pytest.fixture(params=["sqlite"])
def store(request: pytest.FixtureRequest) -> str:
    """Which store the service runs on; tests marked both_stores run on each."""
    return request.param


both_stores = pytest.mark.parametrize("store", ["sqlite", "postgres"], indirect=True)


@pytest.fixture
def config(tmp_path: Path, store: str, request: pytest.FixtureRequest) -> Config:
    db = str(tmp_path / "webhookd.db") if store == "sqlite" else request.getfixturevalue("postgres").new_database()
    return Config(db=db, port=0, secrets=(SECRET,), allow_private_urls=True, retry=FAST, timeout=2.0,
                  failover_after=2.0)


async def query(db: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Rows of a query straight from either store's database, as committed."""
    if not db.startswith("postgresql://"):
        with contextlib.closing(sqlite3.connect(db)) as connection, connection:  # committed, if it writes
            return connection.execute(sql, params).fetchall()
    connection = await asyncpg.connect(db)
    try:
        return [tuple(row) for row in await connection.fetch(webhookd._numbered(sql), *params)]
    finally:
        await connection.close()


@pytest.fixture
async def service(make_service: Callable[..., Any]) -> TestClient:
    return await make_service()


@pytest.fixture
def make_service(aiohttp_client: AiohttpClient, config: Config) -> Callable[..., Any]:
    async def make(**changes: Any) -> TestClient:
        server = TestServer(create_app(replace(config, **changes)))
        await server.start_server(**webhookd.SERVER_OPTIONS)  # as python webhookd.py runs it
        # With OPERATOR_KEY, every request but those that say otherwise is the operator's.
        operator = {"Authorization": f"Bearer {OPERATOR_KEY}"} if changes.get("api_key") == OPERATOR_KEY else {}
        return await aiohttp_client(server, headers=operator)

    return make


@pytest.fixture
def make_receiver(aiohttp_server: AiohttpServer) -> Callable[..., Any]:
    async def make(answers: Callable[[Arrival, int], Any] | None = None) -> Receiver:
        receiver = Receiver(answers=answers)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", receiver.handle)
        receiver.server = await aiohttp_server(app)
        return receiver

    return make


@pytest.fixture
async def receiver(make_receiver: Callable[..., Any]) -> Receiver:
    return await make_receiver()


async def submit(client: TestClient, text: str = "I love this product!", **fields: Any) -> dict[str, Any]:
    response = await client.post("/predict", json={"text": text, **fields})
    assert response.status == 202, await response.text()
    return await response.json()


async def wait_until(check: Callable[[], Any], what: str) -> Any:
    """Poll an async check until it returns something truthy (or fail after DEADLINE)."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def delivery_status(client: TestClient, job_id: str) -> dict[str, Any]:
    response = await client.get(f"/webhooks/{job_id}/status")
    assert response.status == 200, await response.text()
    return await response.json()


async def wait_for_status(client: TestClient, job_id: str, *statuses: str) -> dict[str, Any]:
    async def reached() -> dict[str, Any] | None:
        status = await delivery_status(client, job_id)
        return status if status["delivery_status"] in statuses else None

    return await wait_until(reached, f"delivery of {job_id} to be {statuses}")


def hangs_until(release: asyncio.Event) -> Callable[[Arrival, int], Any]:
    """Answer 200 only once `release` is set."""
    async def hang(arrival: Arrival, n: int) -> web.Response:
        await release.wait()
        return web.json_response({})

    return hang


def fails_once_then_hangs_until(release: asyncio.Event) -> Callable[[Arrival, int], Any]:
    """Answer the first attempt 500, the next ones 200 only once `release` is set."""
    hang = hangs_until(release)

    async def answer(arrival: Arrival, n: int) -> web.Response:
        return web.Response(status=500) if n == 1 else await hang(arrival, n)

    return answer


def answer_status(*codes: int, headers: dict[str, str] | None = None) -> Callable[[Arrival, int], web.Response]:
    """Answer the n-th arrival with codes[n-1], and 200 once they run out."""

    def answers(arrival: Arrival, n: int) -> web.Response:
        code = codes[n - 1] if n <= len(codes) else 200
        return web.Response(status=code, headers=headers if code != 200 else None)

    return answers


# ---------------------------------------------------------------------------
# 1. Jobs accept an optional webhook_url
# ---------------------------------------------------------------------------


@both_stores
async def test_job_with_webhook_url_is_accepted_and_registered(service: TestClient, receiver: Receiver) -> None:
    accepted = await submit(service, webhook_url=receiver.url())
    assert accepted["status"] == "processing"
    assert accepted["webhook_registered"] is True
    assert accepted["job_id"].startswith("job-") and len(accepted["job_id"]) == 4 + 32


def test_job_ids_are_unique_and_in_time_order() -> None:
    ids = [webhookd.new_job_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    milliseconds = [int(job_id[4:16], 16) for job_id in ids]
    assert milliseconds == sorted(milliseconds)
    assert abs(milliseconds[0] / 1000 - time.time()) < 60


@both_stores
async def test_job_without_webhook_url_completes_without_webhook(service: TestClient) -> None:
    accepted = await submit(service, "This is terrible and I hate it.")
    assert accepted["webhook_registered"] is False

    async def completed() -> dict[str, Any] | None:
        job = await (await service.get(f"/jobs/{accepted['job_id']}")).json()
        return job if job["status"] == "completed" else None

    job = await wait_until(completed, "the job to complete")
    assert job["result"]["sentiment"] == "negative"
    assert job["webhook_url"] is None and job["error"] is None
    assert job["created_at"].endswith("Z") and job["completed_at"].endswith("Z")
    assert (await service.get(f"/webhooks/{accepted['job_id']}/status")).status == 404


@both_stores
async def test_job_is_committed_before_the_202(service: TestClient, config: Config) -> None:
    accepted = await submit(service)
    assert await query(config.db, "SELECT text FROM jobs WHERE id = ?", accepted["job_id"]) == [
        ("I love this product!",)]


@both_stores
async def test_a_write_that_fails_leaves_nothing_behind_and_fails_alone(config: Config) -> None:
    store = await webhookd.open_store(config.db, webhookd.Loops(), 2.0)
    good = webhookd.Job(webhookd.new_job_id(), "kept", None, None, time.time())
    half = ("INSERT INTO jobs (id, text, status, created_at) VALUES (?, 'half', 'processing', 0)",
            (webhookd.new_job_id(),))
    try:
        # Both in one group commit; the broken one first, so that what it left undone would be
        # committed by the good one's transaction.
        broken, kept = await asyncio.gather(store._write(half, half), store.add_job(good), return_exceptions=True)
    finally:
        await store.close()
    assert isinstance(broken, Exception) and not isinstance(broken, webhookd.StoreUnavailable), broken
    assert kept is None
    assert await query(config.db, "SELECT id FROM jobs") == [(good.id,)]


@both_stores
async def test_an_attempts_record_shares_the_next_commit_and_alone_is_still_committed(config: Config) -> None:
    store = await webhookd.open_store(config.db, webhookd.Loops(), 2.0)
    job = webhookd.Job(webhookd.new_job_id(), "sent", "http://127.0.0.1:9/hook", None, time.time())
    try:
        await store.add_job(job)
        await store.record_results([(job, "{}", None, b"{}")], time.time())
        before = store.commits
        attempt = asyncio.create_task(store.record_attempt(job.id, 1, time.time(), 0.001, 200, None, "delivered", None))
        await asyncio.sleep(0)
        await store.add_job(webhookd.Job(webhookd.new_job_id(), "next", None, None, time.time()))
        await attempt
        assert store.commits == before + 1  # the new job's commit took the attempt with it
        await store.record_attempt(job.id, 2, time.time(), 0.001, 200, None, "delivered", None)
        assert store.commits == before + 2
    finally:
        await store.close()
    assert await query(config.db, "SELECT attempt FROM attempts ORDER BY attempt") == [(1,), (2,)]


async def test_a_takeover_at_start_up_that_the_db_refused_comes_again(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await webhookd.open_store(config.db, webhookd.Loops(), 2.0)
    left_over = webhookd.Job(webhookd.new_job_id(), "left unfinished", None, None, time.time())

    async def refused(*args: Any) -> Any:
        raise webhookd.StoreUnavailable("the database cannot be written")

    try:
        await store.add_job(left_over)
        with monkeypatch.context() as patch:
            patch.setattr(store, "_change", refused)
            with pytest.raises(webhookd.StoreUnavailable):
                await store.take_over(2.0)
        taken = await store.take_over(2.0)
    finally:
        await store.close()
    assert taken.job_ids == [left_over.id]


# ---------------------------------------------------------------------------
# 2. The webhook is sent when the job completes
# ---------------------------------------------------------------------------


@both_stores
async def test_webhook_is_sent_when_the_job_completes(service: TestClient, receiver: Receiver) -> None:
    accepted = await submit(service, webhook_url=receiver.url("/callback"))
    [arrival] = await receiver.wait_for(1)
    assert arrival.path == "/callback"
    assert arrival.json["job_id"] == accepted["job_id"]
    job = await (await service.get(f"/jobs/{accepted['job_id']}")).json()
    assert job["status"] == "completed"
    assert job["result"] == arrival.json["result"]
    status = await wait_for_status(service, accepted["job_id"], "delivered")
    assert status["next_attempt_at"] is None


async def test_sentiment_labels_follow_vader(service: TestClient, receiver: Receiver) -> None:
    texts = {"I love this, it is wonderful!": "positive", "This is awful and broken.": "negative",
             "The box is on the table.": "neutral"}
    ids = {(await submit(service, text, webhook_url=receiver.url()))["job_id"]: label
           for text, label in texts.items()}
    arrivals = await receiver.wait_for(3)
    for arrival in arrivals:
        result = arrival.json["result"]
        assert result["sentiment"] == ids[arrival.json["job_id"]]
        assert 0 < result["confidence"] <= 1


# ---------------------------------------------------------------------------
# 3. The payload has every field
# ---------------------------------------------------------------------------


@both_stores
async def test_payload_has_every_field_and_the_headers(service: TestClient, receiver: Receiver) -> None:
    accepted = await submit(service, webhook_url=receiver.url())
    [arrival] = await receiver.wait_for(1)
    body = arrival.json
    assert set(body) == {"job_id", "status", "result", "timestamp"}
    assert body["status"] == "completed"
    assert set(body["result"]) == {"sentiment", "confidence"}
    assert body["timestamp"].endswith("Z")
    assert arrival.body == json.dumps(body, separators=(",", ":")).encode()  # compact
    headers = arrival.headers
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"] == f"webhookd/{webhookd.__version__}"
    assert headers["webhook-id"] == accepted["job_id"]
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    assert headers["X-Webhook-Attempt"] == "1"


async def test_failed_inference_sends_a_failed_webhook(make_service: Callable[..., Any], receiver: Receiver) -> None:
    service = await make_service(model="test_webhookd:broken_model")
    accepted = await submit(service, webhook_url=receiver.url())
    [arrival] = await receiver.wait_for(1)
    assert arrival.json["status"] == "failed"
    assert arrival.json["result"] is None
    assert "the model fell over" in arrival.json["error"]
    job = await (await service.get(f"/jobs/{accepted['job_id']}")).json()
    assert job["status"] == "failed" and "the model fell over" in job["error"]


def broken_model(text: str) -> dict[str, Any]:
    raise RuntimeError("the model fell over")


def picky_model(text: str) -> dict[str, Any]:
    if text == "poison":
        raise ValueError("bad byte \ud800")
    return {"sentiment": "neutral", "confidence": 0.5}


def sleepy_model(text: str) -> dict[str, Any]:
    time.sleep(0.5)
    return {"sentiment": "neutral", "confidence": 0.5}


# ---------------------------------------------------------------------------
# 4. The signature verifies (both schemes)
# ---------------------------------------------------------------------------


def _key(secret: str) -> bytes:
    return webhookd.signing_key(secret)


async def test_x_signature_is_hmac_sha256_of_the_raw_body(service: TestClient, receiver: Receiver) -> None:
    await submit(service, webhook_url=receiver.url())
    [arrival] = await receiver.wait_for(1)
    expected = "sha256=" + hmac.new(base64.b64decode(SECRET[6:]), arrival.body, hashlib.sha256).hexdigest()
    assert arrival.headers["X-Signature"] == expected


async def test_standard_webhooks_signature_verifies_with_the_reference_library(
    service: TestClient, receiver: Receiver
) -> None:
    await submit(service, webhook_url=receiver.url())
    [arrival] = await receiver.wait_for(1)
    assert Webhook(SECRET).verify(arrival.body, arrival.headers)["job_id"] == arrival.json["job_id"]
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(arrival.body + b" ", arrival.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + base64.b64encode(b"another key entirely").decode()).verify(arrival.body, arrival.headers)


async def test_a_plain_secret_signs_with_its_utf8_bytes(make_service: Callable[..., Any], receiver: Receiver) -> None:
    service = await make_service(secrets=("correct horse battery staple",))
    await submit(service, webhook_url=receiver.url())
    [arrival] = await receiver.wait_for(1)
    key = b"correct horse battery staple"
    assert arrival.headers["X-Signature"] == "sha256=" + hmac.new(key, arrival.body, hashlib.sha256).hexdigest()
    Webhook(key).verify(arrival.body, arrival.headers)


async def test_rotated_secrets_all_sign_so_old_and_new_receivers_verify(
    make_service: Callable[..., Any], receiver: Receiver
) -> None:
    new = "whsec_" + base64.b64encode(b"the new key, 32 bytes long......").decode()
    service = await make_service(secrets=(new, SECRET))
    await submit(service, webhook_url=receiver.url())
    [arrival] = await receiver.wait_for(1)
    assert len(arrival.headers["webhook-signature"].split()) == 2
    Webhook(SECRET).verify(arrival.body, arrival.headers)  # a receiver still on the old key
    Webhook(new).verify(arrival.body, arrival.headers)  # a receiver already on the new one
    assert webhookd.verify_x_signature([_key(new)], arrival.body, arrival.headers["X-Signature"])
    assert not webhookd.verify_x_signature([_key(SECRET)], arrival.body, arrival.headers["X-Signature"])


def test_signing_key_rules() -> None:
    key = b"sixteen byte key"
    assert webhookd.signing_key("whsec_" + base64.b64encode(key).decode()) == key
    assert webhookd.signing_key("whsec_" + base64.b64encode(key + b"!").decode().rstrip("=")) == key + b"!"  # unpadded
    assert webhookd.signing_key("plain secret key") == b"plain secret key"
    for bad in ("", "whsec_", "whsec_not*base64", "fifteen bytes!!", "whsec_" + base64.b64encode(key[:15]).decode()):
        with pytest.raises(ValueError):
            webhookd.signing_key(bad)


def test_a_short_key_is_refused_in_one_line_that_does_not_repeat_it(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(HERE / "webhookd.py"), "--secret", "my plain secret?", "--port", "0",
                           "--db", str(tmp_path / "never.db")], capture_output=True, text=True, timeout=DEADLINE)
    assert done.returncode != 0 and done.stderr.count("\n") == 1, done.stderr
    assert "at least 16 bytes" in done.stderr and "key 1 of 3" in done.stderr, done.stderr
    assert "plain" not in done.stderr and "my " not in done.stderr, done.stderr


def test_receiver_side_verification_rejects_stale_and_forged_requests() -> None:
    signer = webhookd.Signer([SECRET])
    now = int(time.time())
    headers = signer.headers("job-1", b'{"a":1}', 1, now)
    keys = [_key(SECRET)]
    assert webhookd.verify_webhook_signature(keys, b'{"a":1}', headers, now) is None
    assert webhookd.verify_webhook_signature(keys, b'{"a":2}', headers, now) == "no webhook-signature entry matches"
    assert "5 minutes" in webhookd.verify_webhook_signature(keys, b'{"a":1}', headers, now + 301)
    assert webhookd.verify_x_signature(keys, b'{"a":1}', headers["X-Signature"])
    assert not webhookd.verify_x_signature(keys, b'{"a":1}', None)


# ---------------------------------------------------------------------------
# 5. Retry works when the receiver returns 500 first
# ---------------------------------------------------------------------------


def test_retry_schedule_is_1_2_4_seconds_by_default() -> None:
    assert webhookd.retry_schedule(RetryPolicy()) == [1.0, 2.0, 4.0]
    assert webhookd.retry_schedule(RetryPolicy(max_retries=5, backoff_base=0.5, backoff_factor=3)) == [
        0.5, 1.5, 4.5, 13.5, 40.5]
    assert webhookd.retry_schedule(RetryPolicy(max_retries=0)) == []


def test_a_retry_schedule_spells_waits_in_units_and_refuses_what_it_cannot_use() -> None:
    assert webhookd.parse_retry_schedule("5s,5m,30m,2h,5h,10h,10h") == (5, 300, 1800, 7200, 18000, 36000, 36000)
    assert webhookd.parse_retry_schedule("0.5s, 1, 1d") == (0.5, 1, 86400)
    for bad in ("", "5s,,5m", "5x", "-1s", "0", "nan", "inf", ",".join(["1s"] * 101)):
        with pytest.raises(ValueError, match="--retry-schedule"):
            webhookd.parse_retry_schedule(bad)
    with pytest.raises(ValueError, match="over --backoff-max"):
        webhookd.config_from_args(webhookd.parse_args(["--retry-schedule", "1m,2h", "--backoff-max", "3600"]))
    day = webhookd.config_from_args(webhookd.parse_args(["--retry-schedule", "5s,5m,30m,2h,5h,10h,10h",
                                                          "--backoff-max", "10h"]))
    assert day.retry.backoff_max == 36000 and sum(webhookd.retry_schedule(day.retry)) == 99305
    config = webhookd.config_from_args(webhookd.parse_args(["--retry-schedule", "5s,5m,30m", "--max-retries", "9"]))
    policy = config.retry
    assert policy.max_retries == 3 and webhookd.retry_schedule(policy) == [5, 300, 1800]  # the schedule's length wins
    assert webhookd.retry_delay(1, policy, retry_after=60) == 60  # Retry-After still lengthens a wait
    assert webhookd.retry_schedule(policy.overridden({"max_retries": 2})) == [1, 2]  # a job's own policy overrides


def test_a_bad_retry_schedule_is_one_line_and_a_non_zero_exit(tmp_path: Path) -> None:
    done = run_webhookd("--retry-schedule", "5s,soon", "--db", str(tmp_path / "never.db"))
    assert done.returncode != 0 and done.stderr.count("\n") == 1 and "'soon'" in done.stderr, done.stderr


async def test_deliveries_follow_the_retry_schedule_then_fail(
    make_service: Callable[..., Any], make_receiver: Callable[..., Any]
) -> None:
    service = await make_service(retry=RetryPolicy(max_retries=2, schedule=(0.01, 0.03)))
    failing = await make_receiver(lambda arrival, n: web.Response(status=500))
    job_id = (await submit(service, webhook_url=failing.url()))["job_id"]
    status = await wait_for_status(service, job_id, "failed")
    times = [_parse_iso(a["timestamp"]) for a in status["attempts"]]
    assert len(times) == 3 and times[2] - times[1] >= 0.03 - 0.002


def test_retry_delay_caps_jitters_and_hears_retry_after() -> None:
    policy = RetryPolicy(backoff_base=10, backoff_factor=10, backoff_max=500, backoff_jitter=0.5)
    assert webhookd.retry_delay(3, policy, draw=lambda: 0.5) == 500  # 1000 capped
    assert webhookd.retry_delay(1, policy, draw=lambda: 0.0) == 5.0  # -50 %
    assert webhookd.retry_delay(1, policy, draw=lambda: 1.0) == 15.0  # +50 %
    assert webhookd.retry_delay(1, policy, retry_after=120, draw=lambda: 0.5) == 120  # lengthened
    assert webhookd.retry_delay(1, policy, retry_after=9999, draw=lambda: 0.5) == 500  # still capped
    assert webhookd.retry_delay(2, policy, retry_after=1, draw=lambda: 0.5) == 100  # never shortened
    huge = RetryPolicy(backoff_factor=10, backoff_max=60, backoff_jitter=1)
    assert webhookd.retry_delay(10_000, huge, draw=lambda: 0.0) == 0  # no overflow, no NaN
    assert webhookd.retry_delay(10_000, huge, draw=lambda: 0.75) == 60
    spread = {webhookd.retry_delay(1, RetryPolicy(backoff_jitter=0.2)) for _ in range(50)}
    assert len(spread) > 1 and all(0.8 <= d <= 1.2 for d in spread)


def test_retry_after_parses_seconds_and_http_dates() -> None:
    now = 1_700_000_000.0
    assert webhookd.parse_retry_after("120", now) == 120
    date = "Tue, 14 Nov 2023 22:13:50 GMT"  # now + 30 s
    assert webhookd.parse_retry_after(date, now) == pytest.approx(30)
    assert webhookd.parse_retry_after("Tue, 14 Nov 2023 22:00:00 GMT", now) == 0
    assert webhookd.parse_retry_after("soon", now) is None
    assert webhookd.parse_retry_after(None, now) is None


@both_stores
async def test_retry_after_500s_then_delivered(service: TestClient, make_receiver: Callable[..., Any]) -> None:
    receiver = await make_receiver(answer_status(500, 500))
    accepted = await submit(service, webhook_url=receiver.url())
    arrivals = await receiver.wait_for(3)
    assert [a.headers["X-Webhook-Attempt"] for a in arrivals] == ["1", "2", "3"]
    assert len({a.body for a in arrivals}) == 1, "every attempt sends the same bytes"
    assert len({a.headers["webhook-id"] for a in arrivals}) == 1
    status = await wait_for_status(service, accepted["job_id"], "delivered")
    assert [a["status_code"] for a in status["attempts"]] == [500, 500, 200]


@both_stores
async def test_retries_exhausted_is_failed_and_in_the_dead_letter(
    service: TestClient, make_receiver: Callable[..., Any]
) -> None:
    receiver = await make_receiver(lambda arrival, n: web.Response(status=503))
    accepted = await submit(service, webhook_url=receiver.url())
    status = await wait_for_status(service, accepted["job_id"], "failed")
    assert len(status["attempts"]) == 4  # the first attempt and 3 retries
    assert len(receiver.arrivals) == 4
    dead = await (await service.get("/webhooks/dead-letter")).json()
    [entry] = dead["deliveries"]
    assert entry["job_id"] == accepted["job_id"] and entry["attempts"] == 4
    assert entry["last_error"] == "HTTP 503" and entry["failed_at"].endswith("Z")


async def test_per_job_retry_policy_overrides_the_server(service: TestClient, make_receiver: Callable[..., Any]) -> None:
    receiver = await make_receiver(lambda arrival, n: web.Response(status=500))
    accepted = await submit(service, webhook_url=receiver.url(),
                            retry_policy={"max_retries": 1, "backoff_base": 0.1, "backoff_factor": 1})
    status = await wait_for_status(service, accepted["job_id"], "failed")
    assert len(status["attempts"]) == 2


async def test_a_jobs_own_backoff_has_a_floor_the_operators_has_not(service: TestClient) -> None:
    response = await service.post("/predict", json={"text": "hi", "retry_policy": {"backoff_base": 0.099}})
    assert response.status == 400 and "0.1..3600" in (await response.json())["error"]
    assert Config(retry=RetryPolicy(backoff_base=0.001)).retry.backoff_base == 0.001


@pytest.mark.parametrize("code", [301, 302, 307, 308])
async def test_a_redirect_is_a_failed_attempt_and_not_followed(
    make_service: Callable[..., Any], make_receiver: Callable[..., Any], code: int
) -> None:
    service = await make_service(retry=replace(FAST, max_retries=1))
    receiver = await make_receiver(
        lambda arrival, n: web.Response(status=code, headers={"Location": "/elsewhere"})
    )
    accepted = await submit(service, webhook_url=receiver.url())
    status = await wait_for_status(service, accepted["job_id"], "failed")
    assert [a["status_code"] for a in status["attempts"]] == [code, code]
    assert "redirect" in status["attempts"][0]["error"]
    assert all(a.path == "/hook" for a in receiver.arrivals)


async def test_410_gone_ends_the_delivery_at_once(service: TestClient, make_receiver: Callable[..., Any]) -> None:
    receiver = await make_receiver(lambda arrival, n: web.Response(status=410))
    accepted = await submit(service, webhook_url=receiver.url())
    status = await wait_for_status(service, accepted["job_id"], "failed")
    assert [a["status_code"] for a in status["attempts"]] == [410]
    assert "410" in status["attempts"][0]["error"]


@pytest.mark.parametrize("code", [429, 503])
async def test_retry_after_lengthens_the_wait(
    service: TestClient, make_receiver: Callable[..., Any], code: int
) -> None:
    receiver = await make_receiver(answer_status(code, headers={"Retry-After": "120"}))
    accepted = await submit(service, webhook_url=receiver.url())
    status = await wait_for_status(service, accepted["job_id"], "retrying")
    attempt_time = _parse_iso(status["attempts"][0]["timestamp"])
    assert _parse_iso(status["next_attempt_at"]) - attempt_time == pytest.approx(120, abs=2)


async def test_timeout_is_a_failed_attempt_with_a_clear_error(
    make_service: Callable[..., Any], make_receiver: Callable[..., Any]
) -> None:
    release = asyncio.Event()

    async def hang(arrival: Arrival, n: int) -> web.Response:
        if n == 1:
            await release.wait()
        return web.json_response({})

    receiver = await make_receiver(hang)
    service = await make_service(timeout=0.2)
    accepted = await submit(service, webhook_url=receiver.url())
    status = await wait_for_status(service, accepted["job_id"], "delivered")
    release.set()
    first, second = status["attempts"]
    assert first["status_code"] is None and first["error"].startswith("timeout")
    assert second["success"] is True


async def test_connection_refused_is_a_failed_attempt(service: TestClient) -> None:
    accepted = await submit(service, webhook_url=f"http://127.0.0.1:{_free_port()}/hook")
    status = await wait_for_status(service, accepted["job_id"], "failed")
    assert len(status["attempts"]) == 4
    assert all(a["error"].startswith("connection error") for a in status["attempts"])


def _parse_iso(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# ---------------------------------------------------------------------------
# 6. Delivery attempts are logged
# ---------------------------------------------------------------------------


@both_stores
async def test_every_attempt_is_stored_and_logged_as_one_line(
    service: TestClient, make_receiver: Callable[..., Any], config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="webhookd")
    receiver = await make_receiver(answer_status(500))
    accepted = await submit(service, webhook_url=receiver.url())
    job_id = accepted["job_id"]
    await wait_for_status(service, job_id, "delivered")
    rows = await query(config.db, "SELECT attempt, status_code, error FROM attempts WHERE job_id = ? ORDER BY attempt",
                       job_id)
    assert rows == [(1, 500, "HTTP 500"), (2, 200, None)]
    lines = [r.getMessage() for r in caplog.records if job_id in r.getMessage()]
    assert len(lines) == 2
    assert "#1" in lines[0] and receiver.url() in lines[0] and "500" in lines[0] and "retry in" in lines[0]
    assert "#2" in lines[1] and "200" in lines[1] and "delivered" in lines[1]
    assert all("ms" in line for line in lines)


async def test_the_secret_never_appears_in_logs_or_responses(
    service: TestClient, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    accepted = await submit(service, webhook_url=receiver.url())
    await wait_for_status(service, accepted["job_id"], "delivered")
    seen = [caplog.text]
    for path in ("/healthz", "/metrics", f"/jobs/{accepted['job_id']}", f"/webhooks/{accepted['job_id']}/status",
                 "/webhooks/dead-letter"):
        seen.append(await (await service.get(path)).text())
    assert not any(SECRET in text or SECRET[6:] in text for text in seen)


# ---------------------------------------------------------------------------
# 7. The status endpoint shows the history
# ---------------------------------------------------------------------------


@both_stores
async def test_status_shows_pending_retrying_and_the_whole_history(
    service: TestClient, make_receiver: Callable[..., Any]
) -> None:
    release = asyncio.Event()

    async def answers(arrival: Arrival, n: int) -> web.Response:
        if n == 1:
            await release.wait()
        return web.Response(status=(500, 502)[n - 1] if n <= 2 else 200)

    receiver = await make_receiver(answers)
    accepted = await submit(service, webhook_url=receiver.url())
    job_id = accepted["job_id"]
    await receiver.wait_for(1)
    early = await delivery_status(service, job_id)
    assert early["delivery_status"] == "pending" and early["attempts"] == []
    release.set()
    final = await wait_for_status(service, job_id, "delivered")
    assert final["job_id"] == job_id and final["webhook_url"] == receiver.url()
    attempts = final["attempts"]
    assert [a["attempt"] for a in attempts] == [1, 2, 3]
    assert [a["success"] for a in attempts] == [False, False, True]
    assert [a["error"] for a in attempts] == ["HTTP 500", "HTTP 502", None]
    assert [a["redelivery"] for a in attempts] == [False, False, False]  # retries, not redeliveries
    for attempt in attempts:
        assert set(attempt) == {"attempt", "timestamp", "status_code", "success", "error", "duration_ms", "redelivery",
                                "response"}
        assert attempt["timestamp"].endswith("Z") and attempt["duration_ms"] >= 0


@both_stores
async def test_status_shows_what_the_receiver_answered_up_to_a_cap(
    service: TestClient, make_receiver: Callable[..., Any]
) -> None:
    def answers(arrival: Arrival, n: int) -> web.Response:
        if n == 1:
            return web.json_response({"error": "unknown <script>alert(1)</script> signature"}, status=400,
                                     headers={"X-Request-Id": "r-1"})
        return web.Response(text="y" * 100_000)

    receiver = await make_receiver(answers)
    job_id = (await submit(service, webhook_url=receiver.url()))["job_id"]
    first, second = (await wait_for_status(service, job_id, "delivered"))["attempts"]
    assert {k.lower(): v for k, v in first["response"]["headers"].items()}["x-request-id"] == "r-1"
    assert json.loads(first["response"]["body"]) == {"error": "unknown <script>alert(1)</script> signature"}
    assert first["response"]["truncated"] is False
    assert second["response"]["body"] == "y" * webhookd.ANSWER_BYTES and second["response"]["truncated"] is True


async def test_an_attempt_without_an_answer_has_no_response(service: TestClient) -> None:
    job_id = (await submit(service, webhook_url=f"http://127.0.0.1:{_free_port()}/hook"))["job_id"]
    attempt = (await wait_for_status(service, job_id, "retrying", "failed"))["attempts"][0]
    assert "response" not in attempt and attempt["error"].startswith("connection error")


async def retrying_job(make_service: Callable[..., Any], make_receiver: Callable[..., Any]) -> tuple[TestClient, str]:
    """A service, and a job whose first attempt failed and whose retry is a minute away."""
    service = await make_service(retry=RetryPolicy(backoff_base=60))
    receiver = await make_receiver(lambda arrival, n: web.Response(status=500))
    accepted = await submit(service, webhook_url=receiver.url())
    await wait_for_status(service, accepted["job_id"], "retrying")
    return service, accepted["job_id"]


async def test_status_is_retrying_with_the_next_attempt_time(
    make_service: Callable[..., Any], make_receiver: Callable[..., Any]
) -> None:
    service, job_id = await retrying_job(make_service, make_receiver)
    status = await delivery_status(service, job_id)
    assert status["delivery_status"] == "retrying" and len(status["attempts"]) == 1
    wait = _parse_iso(status["next_attempt_at"]) - _parse_iso(status["attempts"][0]["timestamp"])
    assert wait == pytest.approx(60, abs=2)


async def test_status_of_unknown_job_is_404_json(service: TestClient) -> None:
    response = await service.get("/webhooks/job-nope/status")
    assert response.status == 404
    assert "job-nope" in (await response.json())["error"]


# ---------------------------------------------------------------------------
# Dead letter and redelivery
# ---------------------------------------------------------------------------


@both_stores
async def test_redeliver_starts_a_new_round_with_the_same_body_and_id(
    make_service: Callable[..., Any], make_receiver: Callable[..., Any]
) -> None:
    service = await make_service(retry=replace(FAST, max_retries=1))
    receiver = await make_receiver(answer_status(500, 500))
    accepted = await submit(service, webhook_url=receiver.url())
    job_id = accepted["job_id"]
    await wait_for_status(service, job_id, "failed")
    response = await service.post(f"/webhooks/{job_id}/redeliver")
    assert response.status == 202
    assert await response.json() == {"job_id": job_id, "delivery_status": "pending"}
    status = await wait_for_status(service, job_id, "delivered")
    assert [a["attempt"] for a in status["attempts"]] == [1, 2, 3]
    assert len({a.body for a in receiver.arrivals}) == 1
    assert len({a.headers["webhook-id"] for a in receiver.arrivals}) == 1
    assert receiver.arrivals[-1].headers["X-Webhook-Attempt"] == "3"
    dead = await (await service.get("/webhooks/dead-letter")).json()
    assert dead["deliveries"] == []
    # A delivered webhook can be sent again too.
    assert (await service.post(f"/webhooks/{job_id}/redeliver")).status == 202
    await receiver.wait_for(4)


@both_stores
async def test_redelivery_gets_a_fresh_round_of_retries_and_leaves_the_dead_letter(
    make_service: Callable[..., Any], make_receiver: Callable[..., Any]
) -> None:
    service = await make_service(retry=replace(FAST, max_retries=1))
    receiver = await make_receiver(answer_status(500, 500, 500))
    job_id = (await submit(service, webhook_url=receiver.url()))["job_id"]
    await wait_for_status(service, job_id, "failed")
    assert "webhookd_dead_letter_deliveries 1" in await (await service.get("/metrics")).text()
    assert (await service.post(f"/webhooks/{job_id}/redeliver")).status == 202
    status = await wait_for_status(service, job_id, "delivered", "failed")
    # Round 2 has its own retry: attempt 3 fails, attempt 4 (its one retry) succeeds.
    assert [a["status_code"] for a in status["attempts"]] == [500, 500, 500, 200]
    assert status["delivery_status"] == "delivered"
    assert "webhookd_dead_letter_deliveries 0" in await (await service.get("/metrics")).text()


async def redelivered_twice(service: TestClient, make_receiver: Callable[..., Any]) -> tuple[str, dict[str, Any]]:
    """A job whose round (of 2 attempts) failed, got a bulk redelivery (of 2 attempts), then a
    manual one (of 1); its id and its status, with all 5 attempts. The service allows 1 retry."""
    receiver = await make_receiver(answer_status(500, 500, 500))
    job_id = (await submit(service, webhook_url=receiver.url()))["job_id"]
    await wait_for_status(service, job_id, "failed")
    assert (await service.post("/webhooks/redeliver", json={"since": "2020-01-01T00:00:00Z"})).status == 202
    await wait_for_status(service, job_id, "delivered")
    assert (await service.post(f"/webhooks/{job_id}/redeliver")).status == 202
    return job_id, await wait_until(lambda: attempts_at_least(service, job_id, 5), "the manual round")


@both_stores
async def test_the_status_marks_the_attempt_that_starts_each_redelivery_round(
    make_service: Callable[..., Any], make_receiver: Callable[..., Any]
) -> None:
    service = await make_service(retry=replace(FAST, max_retries=1))
    _, status = await redelivered_twice(service, make_receiver)
    assert [(a["status_code"], a["redelivery"]) for a in status["attempts"]] == [
        (500, False), (500, False), (500, True), (200, False), (200, True)]


@both_stores
async def test_redeliver_is_409_while_the_job_runs_and_404_without_a_webhook(
    make_service: Callable[..., Any], receiver: Receiver
) -> None:
    service = await make_service(model="test_webhookd:sleepy_model")
    running = (await submit(service, webhook_url=receiver.url()))["job_id"]
    response = await service.post(f"/webhooks/{running}/redeliver")
    assert response.status == 409 and "pending" in (await response.json())["error"]
    no_webhook = (await submit(service))["job_id"]
    response = await service.post(f"/webhooks/{no_webhook}/redeliver")
    assert response.status == 404 and "no webhook_url" in (await response.json())["error"]


@both_stores
async def test_redeliver_is_409_while_a_round_runs_and_404_when_unknown(
    make_service: Callable[..., Any], make_receiver: Callable[..., Any]
) -> None:
    service, job_id = await retrying_job(make_service, make_receiver)
    response = await service.post(f"/webhooks/{job_id}/redeliver")
    assert response.status == 409 and "retrying" in (await response.json())["error"]
    assert (await service.post("/webhooks/job-unknown/redeliver")).status == 404


@both_stores
async def test_two_redeliveries_at_once_start_one_round(
    make_service: Callable[..., Any], make_receiver: Callable[..., Any]
) -> None:
    service = await make_service(retry=replace(FAST, max_retries=0))
    release = asyncio.Event()
    # The redelivered round stays under way until the requests are answered.
    receiver = await make_receiver(fails_once_then_hangs_until(release))
    accepted = await submit(service, webhook_url=receiver.url())
    await wait_for_status(service, accepted["job_id"], "failed")
    answers = await asyncio.gather(*(service.post(f"/webhooks/{accepted['job_id']}/redeliver") for _ in range(5)))
    assert sorted(r.status for r in answers) == [202, 409, 409, 409, 409]
    release.set()
    await wait_for_status(service, accepted["job_id"], "delivered")
    assert len(receiver.arrivals) == 2


@both_stores
async def test_bulk_redelivery_touches_exactly_what_failed_in_the_window(
    make_service: Callable[..., Any], make_receiver: Callable[..., Any]
) -> None:
    service = await make_service(retry=replace(FAST, max_retries=0))
    up = asyncio.Event()
    receiver = await make_receiver(fails_until(up))
    since = webhookd.iso_time(time.time() - 1)
    first = (await submit(service, webhook_url=receiver.url()))["job_id"]
    await wait_for_status(service, first, "failed")
    later = webhookd.iso_time(time.time())
    others = [(await submit(service, webhook_url=receiver.url()))["job_id"] for _ in range(2)]
    for job_id in others:
        await wait_for_status(service, job_id, "failed")

    async def bulk(**body: Any) -> tuple[int, dict[str, Any]]:
        response = await service.post("/webhooks/redeliver", json=body)
        return response.status, await response.json()

    assert await bulk(since=since, dry_run=True) == (200, {"would_redeliver": 3})
    assert await bulk(since=later, dry_run=True) == (200, {"would_redeliver": 2})
    assert await bulk(since=since, until=later, dry_run=True) == (200, {"would_redeliver": 1})
    assert len((await (await service.get("/webhooks/dead-letter")).json())["deliveries"]) == 3  # unchanged
    up.set()
    assert await bulk(since=later) == (202, {"redelivered": 2})
    for job_id in others:
        status = await wait_for_status(service, job_id, "delivered")
        assert [a["attempt"] for a in status["attempts"]] == [1, 2]
    assert (await delivery_status(service, first))["delivery_status"] == "failed"  # outside the window
    assert await bulk(since=later) == (202, {"redelivered": 0})
    for bad, word in (({}, "since"), ({"since": "yesterday"}, "ISO-8601"), ({"since": later, "until": since}, "later"),
                      ({"since": since, "dry_run": "yes"}, "dry_run"), ({"since": since, "sincе": 1}, "unknown")):
        status, answer = await bulk(**bad)
        assert status == 400 and word in answer["error"], (bad, answer)


@both_stores
async def test_the_job_list_filters_and_pages_newest_first(
    make_service: Callable[..., Any], make_receiver: Callable[..., Any]
) -> None:
    service = await make_service(retry=replace(FAST, max_retries=0))
    ok, failing = await make_receiver(), await make_receiver(lambda arrival, n: web.Response(status=500))
    plain = [(await submit(service, f"plain {n}"))["job_id"] for n in range(3)]
    delivered = [(await submit(service, webhook_url=ok.url()))["job_id"] for _ in range(2)]
    failed = (await submit(service, webhook_url=failing.url()))["job_id"]
    for job_id in delivered:
        await wait_for_status(service, job_id, "delivered")
    await wait_for_status(service, failed, "failed")
    for job_id in plain:
        await wait_until(lambda: job_status(service, job_id, "completed"), "the plain jobs")
    # Newest first by the millisecond in each id; jobs made in the same millisecond (as a fast
    # store now makes these) keep the order of their random part.
    newest_first = sorted([failed, *delivered, *plain], reverse=True)
    assert [i[:16] for i in newest_first] == [i[:16] for i in (failed, *reversed(delivered), *reversed(plain))]

    async def listed(query: str) -> tuple[int, dict[str, Any]]:
        response = await service.get("/jobs" + query)
        return response.status, await response.json()

    _, page = await listed("")
    assert [j["job_id"] for j in page["jobs"]] == newest_first and page["next"] is None
    assert page["jobs"][0] | {"created_at": None, "completed_at": None} == {
        "job_id": failed, "status": "completed", "created_at": None, "completed_at": None,
        "webhook_url": failing.url(), "delivery_status": "failed", "attempts": 1, "last_error": "HTTP 500",
        "next_attempt_at": None, "client": None}
    seen, cursor = [], ""
    while True:
        _, page = await listed(f"?limit=2{cursor}")
        seen += [j["job_id"] for j in page["jobs"]]
        if page["next"] is None:
            break
        cursor = f"&before={page['next']}"
    assert seen == newest_first
    _, page = await listed("?delivery_status=delivered&delivery_status=failed")
    assert [j["job_id"] for j in page["jobs"]] == sorted([failed, *delivered], reverse=True)
    _, page = await listed("?delivery_status=failed,delivered&status=completed&q=" + delivered[0][:30])
    assert [j["job_id"] for j in page["jobs"]] == [delivered[0]]
    for query, word in (("?status=done", "status"), ("?delivery_status=gone", "delivery_status"),
                        ("?limit=0", "limit"), ("?before=xyz", "before"), ("?q=%3Cb%3E", "q")):
        status, body = await listed(query)
        assert status == 400 and word in body["error"], (query, body)


@both_stores
async def test_the_job_list_filters_by_receiver_host_or_host_and_port(
    loopback_dns: None, make_service: Callable[..., Any], make_receiver: Callable[..., Any]
) -> None:
    service = await make_service(retry=replace(FAST, max_retries=0))
    ok, failing = await make_receiver(), await make_receiver(answer_status(500))
    port = ok.server.port
    urls = {
        "plain": f"http://hooks.example.com:{port}/a", "capitals": f"HTTP://HOOKS.Example.com:{port}",
        "query": f"http://hooks.example.com:{port}?to=x", "sub": f"http://sub.hooks.example.com:{port}/",
        "longer": f"http://hooks.example.community:{port}/", "in_query": f"http://other.example:{port}/?to=http://hooks.example.com/",
        "underscore": f"http://hooks_x.example:{port}/", "dash": f"http://hooks-x.example:{port}/",
        "down": f"http://down.example:{failing.server.port}/",
    }
    jobs = {name: (await submit(service, webhook_url=url))["job_id"] for name, url in urls.items()}
    for name, job_id in jobs.items():
        await wait_for_status(service, job_id, "failed" if name == "down" else "delivered")
    default_port = (await submit(service, webhook_url="http://hooks.example.com/b"))["job_id"]  # port 80

    async def listed(query: str) -> set[str]:
        response = await service.get("/jobs?" + query)
        assert response.status == 200, await response.text()
        return {job["job_id"] for job in (await response.json())["jobs"]}

    def named(*names: str) -> set[str]:
        return {jobs[name] for name in names}

    assert await listed("receiver=hooks.example.com") == {*named("plain", "capitals", "query"), default_port}
    assert await listed(f"receiver=Hooks.Example.com:{port}") == named("plain", "capitals", "query")
    assert await listed("receiver=hooks.example.com:80") == {default_port}
    assert await listed("receiver=hooks_x.example") == named("underscore")
    assert await listed(f"receiver=hooks.example.com:{port}&status=completed&delivery_status=delivered") \
        == named("plain", "capitals", "query")
    assert await listed("receiver=down.example&delivery_status=failed,pending") == named("down")
    assert await listed(f"receiver=hooks.example.com:{port}&delivery_status=failed,pending") == set()
    for wrong in ("", "http://hooks.example.com", "hooks.example.com/a", "hooks.example.com:0",
                  "hooks.example.com:65536", "hooks%25", "a%20b", "a..b"):
        response = await service.get("/jobs?receiver=" + wrong)
        assert response.status == 400 and "receiver" in (await response.json())["error"], wrong


@both_stores
async def test_the_pending_filter_finds_running_jobs_and_pending_deliveries_through_small_indexes(
    make_service: Callable[..., Any], receiver: Receiver, config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_gate.clear()
    service = await make_service(model="test_webhookd:gated_model", workers=1)
    try:
        running = (await submit(service, webhook_url=receiver.url()))["job_id"]
        await submit(service)  # running too, but with no webhook: no delivery at all
        await query(config.db, "INSERT INTO jobs (id, text, webhook_url, status, created_at, owner)"
                    " VALUES ('job-0', 'x', 'http://x/', 'completed', 0, 'i') RETURNING id")
        await query(config.db, "INSERT INTO deliveries (job_id, url, payload, status, next_attempt_at, owner)"
                    " VALUES ('job-0', 'http://x/', '', 'pending', 2e9, 'i') RETURNING job_id")
        store = service.app[webhookd.STORE]
        asked: list[tuple[str, Any]] = []

        async def fetch(sql: str, params: Any = ()) -> Any:
            asked.append((sql, params))
            return await original(sql, params)

        original = store._fetch
        monkeypatch.setattr(store, "_fetch", fetch)
        page = await (await service.get("/jobs?delivery_status=pending")).json()
        assert [(j["job_id"], j["delivery_status"]) for j in page["jobs"]] == [(running, "pending"), ("job-0", "pending")]
    finally:
        model_gate.set()
    if config.db.startswith("postgresql://"):
        return
    [(sql, params)] = asked
    with contextlib.closing(sqlite3.connect(config.db)) as db:
        plan = [row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql, params)]
    scans = [step for step in plan if step.startswith(("SCAN j", "SCAN d"))]  # of tables, not of subqueries
    assert scans and all("jobs_not_completed" in step or "deliveries_not_delivered" in step for step in scans), plan


async def test_a_burst_of_job_lists_runs_a_few_at_a_time(service: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    store = service.app[webhookd.STORE]
    running, most = 0, 0

    async def fetch(sql: str, params: Any = ()) -> Any:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            await asyncio.sleep(0.01)
            return await original(sql, params)
        finally:
            running -= 1

    original = store._fetch
    monkeypatch.setattr(store, "_fetch", fetch)
    answers = await asyncio.gather(*(service.get("/jobs?delivery_status=failed") for _ in range(20)))
    assert [a.status for a in answers] == [200] * 20
    assert most == webhookd.LIST_QUERIES_AT_ONCE


@both_stores
async def test_dead_letter_is_newest_first_and_limited(service: TestClient) -> None:
    url = f"http://127.0.0.1:{_free_port()}/hook"
    ids = []
    for _ in range(3):
        accepted = await submit(service, webhook_url=url, retry_policy={"max_retries": 0})
        await wait_for_status(service, accepted["job_id"], "failed")
        ids.append(accepted["job_id"])
    dead = await (await service.get("/webhooks/dead-letter")).json()
    assert [d["job_id"] for d in dead["deliveries"]] == ids[::-1]
    limited = await (await service.get("/webhooks/dead-letter?limit=2")).json()
    assert [d["job_id"] for d in limited["deliveries"]] == ids[:0:-1]
    for bad in ("0", "-1", "abc", "100000", "9" * 5000):
        response = await service.get(f"/webhooks/dead-letter?limit={bad}")
        assert response.status == 400 and "limit" in (await response.json())["error"]


# ---------------------------------------------------------------------------
# A slow receiver delays nobody else; pending retries cost no coroutine
# ---------------------------------------------------------------------------


async def test_a_hanging_receiver_does_not_delay_other_receivers(
    make_service: Callable[..., Any], make_receiver: Callable[..., Any]
) -> None:
    release = asyncio.Event()
    hang = hangs_until(release)
    blackhole = await make_receiver(hang)
    healthy = await make_receiver()
    # Four slots in all: without a per-receiver share the blackhole would hold every one.
    service = await make_service(max_in_flight=4, timeout=DEADLINE * 2)
    try:
        for _ in range(6):
            await submit(service, webhook_url=blackhole.url())
        await blackhole.wait_for(1)
        healthy_ids = [(await submit(service, webhook_url=healthy.url()))["job_id"] for _ in range(5)]
        arrivals = await healthy.wait_for(5)
        assert {a.json["job_id"] for a in arrivals} == set(healthy_ids)
        assert not release.is_set() and len(blackhole.arrivals) == 1  # still hanging
    finally:
        release.set()


async def test_many_slow_receivers_still_leave_room_for_healthy_ones(
    make_service: Callable[..., Any], make_receiver: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhookd.DeliveryEngine, "SLOW_SECONDS", 0.2)
    release = asyncio.Event()

    async def slow_then_hang(arrival: Arrival, n: int) -> web.Response:
        # Each first attempt is slow (so the receiver is known to be slow), then it hangs.
        first = arrival.headers["X-Webhook-Attempt"] == "1"
        await (asyncio.sleep(webhookd.DeliveryEngine.SLOW_SECONDS + 0.1) if first else release.wait())
        return web.Response(status=500)

    slow_receivers = [await make_receiver(slow_then_hang) for _ in range(6)]
    healthy = await make_receiver()
    # 8 slots: 2 a receiver, 4 for the slow ones together; without that share 6 slow receivers
    # would hold all 8 slots for the whole (long) timeout.
    service = await make_service(max_in_flight=8, timeout=DEADLINE * 2)
    try:
        await wait_for_status(service, (await submit(service, webhook_url=healthy.url()))["job_id"], "delivered")
        for receiver in slow_receivers:
            for _ in range(2):
                await submit(service, webhook_url=receiver.url())
        engine = service.app[webhookd.ENGINE]

        async def all_known_slow() -> bool:
            return sum(len(r.arrivals) for r in slow_receivers) >= 12 and list(engine._fast) == [
                webhookd.webhook_target(healthy.url()).receiver]

        await wait_until(all_known_slow, "every first attempt to be answered, slowly")
        healthy_ids = [(await submit(service, webhook_url=healthy.url()))["job_id"] for _ in range(5)]
        arrivals = await healthy.wait_for(6)
        assert {a.json["job_id"] for a in arrivals[1:]} == set(healthy_ids)
        assert not release.is_set()
    finally:
        release.set()


async def test_fifty_new_receivers_that_all_hang_leave_the_fast_half_free(
    make_service: Callable[..., Any], make_receiver: Callable[..., Any]
) -> None:
    release = asyncio.Event()
    hang = hangs_until(release)
    healthy = await make_receiver()
    hanging = [await make_receiver(hang) for _ in range(50)]
    service = await make_service(max_in_flight=8, timeout=DEADLINE * 2)
    try:
        await wait_for_status(service, (await submit(service, webhook_url=healthy.url()))["job_id"], "delivered")
        for receiver in hanging:
            await submit(service, webhook_url=receiver.url())
        engine = service.app[webhookd.ENGINE]
        await wait_until(lambda: asyncio.sleep(0, engine.in_flight == 4), "the new receivers' half to fill")
        healthy_ids = [(await submit(service, webhook_url=healthy.url()))["job_id"] for _ in range(20)]
        for job_id in healthy_ids:
            await wait_for_status(service, job_id, "delivered")
        assert sum(len(r.arrivals) for r in hanging) == 4 and not release.is_set()
    finally:
        release.set()


async def test_a_receiver_that_trickles_or_never_stops_costs_one_slot_for_at_most_the_timeout(
    make_service: Callable[..., Any], make_receiver: Callable[..., Any]
) -> None:
    async def endless(arrival: Arrival, n: int) -> web.StreamResponse:
        response = web.StreamResponse(status=200)
        await response.prepare(current_request.get())
        with contextlib.suppress(ConnectionError):
            while True:
                await response.write(b"x" * 65536)
        return response

    async def trickle(arrival: Arrival, n: int) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers={"Content-Length": "1000"})
        await response.prepare(current_request.get())
        with contextlib.suppress(ConnectionError):
            for _ in range(1000):
                await response.write(b"x")
                await asyncio.sleep(0.1)
        return response

    service = await make_service(timeout=1.0, retry=replace(FAST, max_retries=0))
    # An endless answer is read up to the cap and the attempt counts, as the 200 it began with.
    for answers, outcome, error in ((endless, "delivered", None), (trickle, "failed", "timeout")):
        receiver = await make_receiver(answers)
        status = await wait_for_status(service, (await submit(service, webhook_url=receiver.url()))["job_id"],
                                       "delivered", "failed")
        made = status["attempts"][0]["error"]
        assert status["delivery_status"] == outcome, status
        assert made is None if error is None else made.startswith(error), status
    assert service.app[webhookd.ENGINE].in_flight == 0


def test_the_retry_schedule_runs_on_the_monotonic_clock(config: Config) -> None:
    engine = webhookd.DeliveryEngine(config, None, None, None, webhookd.Metrics({}, 0), webhookd.Loops(),
                                     webhookd.Fence())
    engine.schedule("job-x", time.time() + 5)
    assert abs(engine._timers[0][0] - (time.monotonic() + 5)) < 1


async def test_slow_receivers_take_turns_in_their_share(config: Config, tmp_path: Path) -> None:
    started: list[str] = []

    async def no_answer(self: Any, delivery: webhookd.Delivery, number: int, timestamp: int) -> webhookd.Outcome:
        started.append(delivery.url)
        await asyncio.sleep(0.01)
        return webhookd.Outcome(None, "timeout: no complete answer")

    class NoStore:
        instance = "instance-test"

        async def record_attempt(self, *details: Any) -> None:
            pass

    fence = webhookd.Fence()
    fence.open_until(float("inf"))
    engine = webhookd.DeliveryEngine(replace(config, max_in_flight=4), NoStore(), None, None,
                                     webhookd.Metrics({}, 0), webhookd.Loops(), fence)
    engine._post = no_answer.__get__(engine)
    urls = [f"http://127.0.0.1:{port}/hook" for port in (1001, 1002, 1003)]
    for url in urls:  # all three known to be slow: together they get 2 of the 4 slots
        engine._note_speed(webhookd.webhook_target(url).receiver, webhookd.Outcome(None, "timeout"), 10)
    for n in range(4):
        for url in urls:
            engine.send(webhookd.Delivery(f"job-{url[-9:-5]}-{n}", url, b"{}", 0, 0, RetryPolicy(), 0.0))
    while engine.in_flight:
        await asyncio.sleep(0.01)
    assert len(started) == 12
    # Round robin: no receiver is served twice before each of the others was served once more.
    for window in range(0, 12, 3):
        assert sorted(started[window:window + 3]) == urls, started
    await engine.stop()


async def test_pending_retries_wait_in_the_schedule_not_in_coroutines(
    make_service: Callable[..., Any], make_receiver: Callable[..., Any]
) -> None:
    service = await make_service(retry=RetryPolicy(backoff_base=600))
    receiver = await make_receiver(lambda arrival, n: web.Response(status=500))
    tasks_before = len(asyncio.all_tasks())
    ids = [(await submit(service, f"text {n}", webhook_url=receiver.url()))["job_id"] for n in range(40)]
    await receiver.wait_for(40)
    for job_id in ids:
        await wait_for_status(service, job_id, "retrying")
    engine = service.app[webhookd.ENGINE]
    assert engine.scheduled == 40 and engine.in_flight == 0
    assert len(asyncio.all_tasks()) - tasks_before < 10, "a task per pending retry"


# ---------------------------------------------------------------------------
# Durability: kill -9, restart, nothing lost; graceful stop
# ---------------------------------------------------------------------------


async def _stored_attempts(db: str, job_id: str) -> int:
    return (await query(db, "SELECT count(*) FROM attempts WHERE job_id = ?", job_id))[0][0]


def child_environment() -> dict[str, str]:
    """This environment without WEBHOOKD_ settings, so that a child runs on its flags alone."""
    return {k: v for k, v in os.environ.items() if not k.startswith("WEBHOOKD_")}


class ServiceProcess:
    """webhookd.py serve in a child process, to be killed for real."""

    def __init__(self, db: str, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "webhookd.py"), "serve", "--port", "0", "--db", db,
             "--secret", SECRET, "--allow-private-urls", "--log-level", "warning", "--failover-after", "2", *args],
            cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=child_environment(),
        )
        self.url = self.wait_for_url(self.process)

    @staticmethod
    def wait_for_url(process: subprocess.Popen[str]) -> str:
        line = ""
        while "Running on" not in line:
            line = process.stdout.readline()
            if not line:
                raise AssertionError("webhookd did not start: " + process.stderr.read())
        return line.split("Running on ")[1].split()[0]

    async def submit(self, **fields: Any) -> dict[str, Any]:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            async with session.post(self.url + "/predict", json=fields) as response:
                assert response.status == 202
                return await response.json()


@both_stores
async def test_kill_9_mid_round_then_restart_finishes_the_round(
    make_service: Callable[..., Any], make_receiver: Callable[..., Any], config: Config
) -> None:
    up = asyncio.Event()

    def answers(arrival: Arrival, n: int) -> web.Response:
        return web.json_response({}) if up.is_set() else web.Response(status=500)

    receiver = await make_receiver(answers)
    child = ServiceProcess(config.db, "--backoff-base", "0.05", "--max-retries", "10")
    try:
        job_id = (await child.submit(text="great", webhook_url=receiver.url()))["job_id"]
        before = await receiver.wait_for(2)
        await wait_until(lambda: _stored_attempts(config.db, job_id), "a failed attempt to be stored")
    finally:
        child.process.kill()
        child.process.wait()
    up.set()
    service = await make_service(retry=replace(FAST, max_retries=10), failover_after=1.0)
    status = await wait_for_status(service, job_id, "delivered")
    attempts = status["attempts"]
    assert [a["attempt"] for a in attempts] == list(range(1, len(attempts) + 1))
    assert attempts[0]["status_code"] == 500 and attempts[-1]["success"] is True
    last = receiver.arrivals[-1]
    assert last.body == before[0].body and last.headers["webhook-id"] == before[0].headers["webhook-id"]


@both_stores
async def test_kill_9_before_inference_then_restart_runs_the_job(
    make_service: Callable[..., Any], receiver: Receiver, config: Config
) -> None:
    child = ServiceProcess(config.db, "--model", "test_webhookd:sleepy_model")
    try:
        ids = [(await child.submit(text=f"text {n}", webhook_url=receiver.url()))["job_id"] for n in range(3)]
    finally:
        child.process.kill()
        child.process.wait()
    service = await make_service(failover_after=1.0)
    arrivals = await receiver.wait_for(3)
    assert {a.json["job_id"] for a in arrivals} >= set(ids)
    for job_id in ids:
        await wait_for_status(service, job_id, "delivered")


@both_stores
async def test_sigterm_stops_gracefully_and_keeps_the_schedule(
    make_receiver: Callable[..., Any], config: Config
) -> None:
    receiver = await make_receiver(lambda arrival, n: web.Response(status=500))
    child = ServiceProcess(config.db, "--backoff-base", "600", "--log-level", "info")
    job_id = (await child.submit(text="fine", webhook_url=receiver.url()))["job_id"]
    await receiver.wait_for(1)

    async def retry_stored() -> bool:
        return await query(config.db, "SELECT status FROM deliveries WHERE job_id = ?", job_id) == [("retrying",)]

    await wait_until(retry_stored, "the failed attempt to be stored")
    child.process.send_signal(signal.SIGTERM)
    _, stderr = child.process.communicate(timeout=DEADLINE)
    assert child.process.returncode == 0, stderr
    assert "Task was destroyed" not in stderr and "Traceback" not in stderr
    [(status, next_at)] = await query(config.db, "SELECT status, next_attempt_at FROM deliveries WHERE job_id = ?",
                                      job_id)
    assert status == "retrying" and next_at > time.time() + 500


def test_a_taken_port_is_a_one_line_error_before_anything_runs(tmp_path: Path) -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        db = tmp_path / "never.db"
        done = subprocess.run(
            [sys.executable, str(HERE / "webhookd.py"), "--port", str(port), "--db", str(db)],
            capture_output=True, text=True, timeout=DEADLINE,
            env=child_environment(),
        )
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "Traceback" not in done.stderr
    assert not db.exists()  # no job was run, no webhook sent


@both_stores
async def test_sigterm_lets_an_attempt_in_flight_finish_and_stores_it(
    make_receiver: Callable[..., Any], config: Config
) -> None:
    async def slow(arrival: Arrival, n: int) -> web.Response:
        await asyncio.sleep(0.5)
        return web.json_response({})

    receiver = await make_receiver(slow)
    child = ServiceProcess(config.db)
    job_id = (await child.submit(text="fine", webhook_url=receiver.url()))["job_id"]
    await receiver.wait_for(1)
    child.process.send_signal(signal.SIGTERM)
    _, stderr = await asyncio.to_thread(child.process.communicate, timeout=DEADLINE)
    assert child.process.returncode == 0, stderr
    assert await query(config.db, "SELECT status FROM deliveries WHERE job_id = ?", job_id) == [("delivered",)]
    assert await query(config.db, "SELECT status_code FROM attempts WHERE job_id = ?", job_id) == [(200,)]


@both_stores
async def test_a_failed_db_write_is_tried_again_not_lost(
    service: TestClient, receiver: Receiver, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = service.app[webhookd.STORE]
    write = store._write
    failures = {"UPDATE jobs SET status": 1, "INSERT INTO attempts": 1}

    async def flaky_write(*statements: webhookd.Statement, **options: Any) -> None:
        for prefix, left in failures.items():
            if left and statements[0][0].startswith(prefix):
                failures[prefix] -= 1
                raise sqlite3.OperationalError("database is locked")
        await write(*statements, **options)

    monkeypatch.setattr(store, "_write", flaky_write)
    job_id = (await submit(service, webhook_url=receiver.url()))["job_id"]
    status = await wait_for_status(service, job_id, "delivered")
    assert failures == {"UPDATE jobs SET status": 0, "INSERT INTO attempts": 0}
    assert [a["attempt"] for a in status["attempts"]] == [1]
    assert len(receiver.arrivals) == 1  # only the write is tried again, never the POST
    assert "database is locked" in caplog.text


async def test_a_receivers_slot_is_free_once_it_answered_not_once_the_attempt_is_stored(
    make_service: Callable[..., Any], receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = await make_service(max_in_flight=2)  # a receiver's share: one attempt at a time
    store, stored = service.app[webhookd.STORE], asyncio.Event()
    write = store._write

    async def attempts_stored_late(*statements: webhookd.Statement, **options: Any) -> None:
        if statements[0][0].startswith("INSERT INTO attempts"):
            await stored.wait()
        await write(*statements, **options)

    monkeypatch.setattr(store, "_write", attempts_stored_late)
    ids = [(await submit(service, f"text {n}", webhook_url=receiver.url()))["job_id"] for n in range(3)]
    await receiver.wait_for(3)  # one after the other, though none is stored yet
    stored.set()
    for job_id in ids:
        await wait_for_status(service, job_id, "delivered")


async def test_a_model_error_that_is_not_valid_unicode_fails_only_its_job(
    make_service: Callable[..., Any], receiver: Receiver
) -> None:
    service = await make_service(model="test_webhookd:picky_model")
    bad = (await submit(service, "poison", webhook_url=receiver.url()))["job_id"]
    good = (await submit(service, "fine", webhook_url=receiver.url()))["job_id"]
    await wait_for_status(service, good, "delivered")
    status = await wait_for_status(service, bad, "delivered")
    assert status["delivery_status"] == "delivered"
    job = await (await service.get(f"/jobs/{bad}")).json()
    assert job["status"] == "failed" and "\\ud800" in job["error"]


# ---------------------------------------------------------------------------
# Bad input: a clear 4xx JSON error, never a 5xx, never a half-created job
# ---------------------------------------------------------------------------

BAD_BODIES = [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b'"text"', 400, "JSON object"),
    (b"null", 400, "JSON object"),
    (b"\xff\xfe", 400, "UTF-8"),
    (b"[" * 100_00 + b"]" * 100_00, 400, "JSON"),
    (json.dumps({}).encode(), 400, "'text' is required"),
    (json.dumps({"text": ""}).encode(), 400, "'text' must not be empty"),
    (json.dumps({"text": "   \n\t"}).encode(), 400, "'text' must not be empty"),
    (json.dumps({"text": 42}).encode(), 400, "'text' must be a string"),
    (json.dumps({"text": ["a"]}).encode(), 400, "'text' must be a string"),
    (json.dumps({"text": "x" * 10_001}).encode(), 400, "limit is 10000"),
    (b'{"text": "\\ud800"}', 400, "surrogate"),
    (json.dumps({"text": "ok", "webhook": "http://example.com"}).encode(), 400,
     "unknown field 'webhook'; allowed fields: text, webhook_url, retry_policy"),
    (json.dumps({"text": "ok", "webhook_url": 5}).encode(), 400, "'webhook_url' must be a string"),
    (json.dumps({"text": "ok", "webhook_url": "ftp://example.com/x"}).encode(), 400, "http:// or https://"),
    (json.dumps({"text": "ok", "webhook_url": "/callback"}).encode(), 400, "http:// or https://"),
    (json.dumps({"text": "ok", "webhook_url": "example.com/hook"}).encode(), 400, "http:// or https://"),
    (json.dumps({"text": "ok", "webhook_url": "http:///hook"}).encode(), 400, "no host"),
    (json.dumps({"text": "ok", "webhook_url": "http://user:pw@example.com/"}).encode(), 400, "user:password"),
    (json.dumps({"text": "ok", "webhook_url": "http://example.com:99999/"}).encode(), 400, "not a valid URL"),
    (json.dumps({"text": "ok", "webhook_url": "http://exa mple.com/"}).encode(), 400, "spaces"),
    (json.dumps({"text": "ok", "webhook_url": "https://example.com/" + "a" * 2048}).encode(), 400, "2048"),
    (json.dumps({"text": "ok", "retry_policy": 3}).encode(), 400, "'retry_policy' must be an object"),
    (json.dumps({"text": "ok", "retry_policy": {"retries": 3}}).encode(), 400, "unknown retry_policy field"),
    (json.dumps({"text": "ok", "retry_policy": {"max_retries": 21}}).encode(), 400, "max_retries"),
    (json.dumps({"text": "ok", "retry_policy": {"max_retries": -1}}).encode(), 400, "max_retries"),
    (json.dumps({"text": "ok", "retry_policy": {"max_retries": 2.5}}).encode(), 400, "max_retries"),
    (json.dumps({"text": "ok", "retry_policy": {"max_retries": True}}).encode(), 400, "max_retries"),
    (json.dumps({"text": "ok", "retry_policy": {"backoff_base": 0}}).encode(), 400, "backoff_base"),
    (json.dumps({"text": "ok", "retry_policy": {"backoff_base": 3601}}).encode(), 400, "backoff_base"),
    (json.dumps({"text": "ok", "retry_policy": {"backoff_factor": 0.5}}).encode(), 400, "backoff_factor"),
    (json.dumps({"text": "ok", "retry_policy": {"backoff_factor": "2"}}).encode(), 400, "backoff_factor"),
    (b'{"text": "ok", "retry_policy": {"backoff_base": NaN}}', 400, "backoff_base"),
    (b'{"text": "ok", "retry_policy": {"backoff_base": 1e999}}', 400, "backoff_base"),
    (b'{"text": "ok", "retry_policy": {"backoff_base": 1' + b"0" * 400 + b"}}", 400, "backoff_base"),
    (b'{"text": "ok", "retry_policy": {"max_retries": 1' + b"0" * 400 + b"}}", 400, "max_retries"),
]


@pytest.mark.parametrize("body, status, message", BAD_BODIES, ids=[repr(b[:40]) for b, _, _ in BAD_BODIES])
async def test_bad_bodies_get_a_clear_error_and_make_no_job(
    service: TestClient, config: Config, body: bytes, status: int, message: str
) -> None:
    response = await service.post("/predict", data=body, headers={"Content-Type": "application/json"})
    assert response.status == status
    assert response.content_type == "application/json"
    assert message in (await response.json())["error"]
    assert await query(config.db, "SELECT count(*) FROM jobs") == [(0,)]


async def test_other_bad_requests_get_json_errors(service: TestClient) -> None:
    cases = [
        (service.post("/predict", data=b"x" * (64 * 1024 + 1), headers={"Content-Type": "application/json"}),
         413, "64 KiB"),
        (service.post("/predict", data=b"text=hello", headers={"Content-Type": "application/x-www-form-urlencoded"}),
         415, "application/json"),
        (service.post("/predict", data=b"hello", headers={"Content-Type": "text/plain"}), 415, "application/json"),
        (service.get("/jobs/job-0000"), 404, "no job"),
        (service.get("/nowhere"), 404, "no such endpoint"),
        (service.get("/predict"), 405, "use POST"),
        (service.delete("/jobs/job-0000"), 405, "use GET"),
        (service.get("/webhooks/job-0000/redeliver"), 405, "use POST"),
        (service.post("/predict", json={"text": "ok"}, headers={"Idempotency-Key": ""}), 400, "Idempotency-Key"),
        (service.post("/predict", json={"text": "ok"}, headers={"Idempotency-Key": "k" * 256}), 400,
         "Idempotency-Key"),
        (service.post("/webhooks/redeliver", json={"since": "0001-01-01T00:00:00+14:00"}), 400, "ISO-8601"),
        (service.post("/webhooks/redeliver", json={"since": "2026-01-01T00:00:00Z", "until": "9999-12-31T23:59:59-14:00"}),
         400, "ISO-8601"),
    ]
    for request, status, message in cases:
        response = await request
        assert response.status == status, (status, await response.text())
        assert message in (await response.json())["error"]


async def raw_request(client: TestClient, request: bytes) -> tuple[int, bytes]:
    """Send bytes the aiohttp client would refuse to; the status and body of the answer."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(request)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.parametrize("request_bytes", [
    b"GET /webhooks/dead-letter?limit=%C2%B2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n",
    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
    b"Content-Length: 4\r\nConnection: close\r\n\r\nnope",
    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nIdempotency-Key: \xff\r\n"
    b"Content-Length: 13\r\nConnection: close\r\n\r\n{\"text\": \"a\"}",
], ids=["unicode-digit-limit", "non-utf8-bearer-healthz", "non-utf8-bearer", "bad-gzip", "non-ascii-key"])
async def test_odd_bytes_in_headers_query_and_encoding_never_get_a_5xx(
    make_service: Callable[..., Any], request_bytes: bytes
) -> None:
    service = await make_service(api_key="k")
    if b"limit" in request_bytes or b"predict" in request_bytes:
        request_bytes = request_bytes.replace(b"Host: x\r\n", b"Host: x\r\nAuthorization: Bearer k\r\n")
    status, body = await raw_request(service, request_bytes)
    assert status < 500, body
    if status >= 400:
        assert "error" in json.loads(body)


@pytest.mark.parametrize("request_bytes", [
    b"GET /" + b"x" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: " + b"y" * 9000 + b"\r\n\r\n",
    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\nhello",
], ids=["long-request-line", "long-header", "bad-framing"])
async def test_what_is_not_valid_http_gets_a_json_400(
    service: TestClient, request_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    status, body = await raw_request(service, request_bytes)
    assert status == 400 and "not a valid HTTP request" in json.loads(body)["error"], body
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text  # a client's mistake


@both_stores
async def test_a_nul_character_is_a_400_naming_the_field_or_a_404_for_a_job_id(
    service: TestClient, config: Config
) -> None:
    # PostgreSQL's text cannot hold a NUL, so neither store takes one: both accept the same jobs.
    response = await service.post("/predict", json={"text": "before\u0000after"})
    assert response.status == 400 and "'text'" in (await response.json())["error"]
    for method, path in (("GET", "/jobs/job-%00x"), ("GET", "/webhooks/job-%00/status"),
                         ("GET", "/webhooks/job-%00/request"), ("POST", "/webhooks/job-%00/redeliver")):
        response = await service.request(method, path)
        assert response.status == 404 and "no job" in (await response.json())["error"], path
    response = await service.get("/jobs", params={"before": base64.urlsafe_b64encode(b"job-\x00").decode()})
    assert response.status == 400 and "before" in (await response.json())["error"]
    status, _ = await raw_request(service, b"POST /predict HTTP/1.1\r\nHost: x\r\nIdempotency-Key: a\x00b\r\n"
                                           b"Content-Length: 13\r\nConnection: close\r\n\r\n{\"text\": \"a\"}")
    assert status == 400  # refused by aiohttp's parser already, as any control character in a header
    assert await query(config.db, "SELECT count(*) FROM jobs") == [(0,)]


async def test_a_missing_content_type_is_read_as_json(service: TestClient) -> None:
    response = await service.post("/predict", data=b'{"text": "fine"}', skip_auto_headers=["Content-Type"])
    assert response.status == 202


async def test_fuzzed_bodies_never_get_a_5xx(service: TestClient) -> None:
    rng = random.Random(20261128)
    atoms: list[Any] = [None, True, 0, -1, 1.5, 1e308, "", " ", "x" * 20_000, "\u0000", "http://", "https://a.b/c",
                        "http://127.1/", [], {}, {"max_retries": 3}, {"backoff_base": -1}, [{"a": 1}]]
    keys = ["text", "webhook_url", "retry_policy", "extra", ""]
    bodies = [bytes(rng.randrange(256) for _ in range(rng.randrange(64))) for _ in range(100)]
    for _ in range(200):
        fields = {rng.choice(keys): rng.choice(atoms) for _ in range(rng.randrange(4))}
        bodies.append(json.dumps(fields).encode())
    for body in bodies:
        response = await service.post("/predict", data=body, headers={"Content-Type": "application/json"})
        assert response.status < 500, (body, await response.text())
        assert response.content_type == "application/json"


# ---------------------------------------------------------------------------
# No single URL, job or delivery stops the others
# ---------------------------------------------------------------------------


class LoopbackResolver(AbstractResolver):
    """Resolves every host name to 127.0.0.1, so that any accepted URL reaches a test receiver."""

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        return [ResolveResult(hostname=host, host="127.0.0.1", port=port, family=socket.AF_INET,
                              proto=0, flags=0)]

    async def close(self) -> None:
        pass


@pytest.fixture
def loopback_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    session = webhookd._client_session
    monkeypatch.setattr(webhookd, "_client_session", lambda config, _: session(config, LoopbackResolver()))


@pytest.mark.parametrize("host", ["xn--a.example", "xn--zz", "xn--a.com", "XN--A.example", "%41.com",
                                  "a..b", "-" * 64 + ".com"])
async def test_hosts_delivery_cannot_use_are_a_400_naming_the_host(service: TestClient, host: str) -> None:
    response = await service.post("/predict", json={"text": "hi", "webhook_url": f"http://{host}/hook"})
    assert response.status == 400
    error = (await response.json())["error"]
    assert error.startswith("field 'webhook_url'") and ("host" in error or "URL" in error), error


def test_webhook_target_keys_receivers_by_the_host_as_sent() -> None:
    assert webhookd.webhook_target("http://Bücher.example/x").receiver == "http://xn--bcher-kva.example:80"
    assert webhookd.webhook_target("https://a_b.example.com/").receiver == "https://a_b.example.com:443"
    assert webhookd.webhook_target("http://[::1]:81/").host == "::1"


HOST_LABELS = st.one_of(
    st.text(alphabet="abz09-_%üß☃XN", min_size=1, max_size=12),
    st.builds("xn--{}".format, st.text(alphabet="abz09-", max_size=8)),
)
FUZZED_HOSTS = st.builds(
    lambda labels, last: ".".join([*labels, last]),
    st.lists(HOST_LABELS, max_size=3),
    st.sampled_from(["example", "com", "xn--a", "xn--zz", "xn--bcher-kva", "bücher", "test.", "Example"]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(host=FUZZED_HOSTS)
async def test_every_accepted_url_is_delivered_and_other_jobs_go_on(
    loopback_dns: None, service: TestClient, receiver: Receiver, host: str
) -> None:
    url = f"http://{host}:{receiver.server.port}/hook"
    response = await service.post("/predict", json={"text": "fuzz", "webhook_url": url})
    assert response.status in (202, 400), await response.text()
    if response.status == 202:
        await wait_for_status(service, (await response.json())["job_id"], "delivered")
    plain = await submit(service, "a job without a webhook")
    await wait_until(lambda: job_status(service, plain["job_id"], "completed"), "a plain job to complete")
    assert (await service.get("/healthz")).status == 200


async def job_status(client: TestClient, job_id: str, status: str) -> bool:
    return (await (await client.get(f"/jobs/{job_id}")).json())["status"] == status


async def test_a_stored_delivery_with_a_bad_url_fails_alone_after_a_restart(
    make_service: Callable[..., Any], make_receiver: Callable[..., Any], config: Config
) -> None:
    receiver = await make_receiver(answer_status(500))
    first = await make_service(retry=replace(FAST, backoff_base=0.5))
    good = (await submit(first, webhook_url=receiver.url()))["job_id"]
    await wait_until(lambda: first_attempt_made(first, good), "the first attempt")
    bad = (await submit(first))["job_id"]
    await wait_until(lambda: job_status(first, bad, "completed"), "the job to complete")
    await first.close()
    with sqlite3.connect(config.db) as db:  # as an older version stored it
        db.execute("UPDATE jobs SET webhook_url = ? WHERE id = ?", ("http://xn--a.example/", bad))
        db.execute("INSERT INTO deliveries (job_id, url, payload, status, next_attempt_at)"
                   " VALUES (?, 'http://xn--a.example/', '{}', 'pending', 0)", (bad,))
    second = await make_service()
    failed = await wait_for_status(second, bad, "failed")
    assert failed["attempts"][0]["error"].startswith("invalid webhook_url: host 'xn--a.example'")
    await wait_for_status(second, good, "delivered")  # the retry still runs
    assert (await second.post(f"/webhooks/{good}/redeliver")).status == 202
    status = await wait_until(lambda: attempts_at_least(second, good, 3), "the redelivery")
    assert status["attempts"][-1]["success"]
    assert (await second.get("/healthz")).status == 200


async def first_attempt_made(client: TestClient, job_id: str) -> bool:
    return bool((await delivery_status(client, job_id))["attempts"])


async def attempts_at_least(client: TestClient, job_id: str, count: int) -> dict[str, Any] | None:
    status = await delivery_status(client, job_id)
    return status if len(status["attempts"]) >= count and status["delivery_status"] == "delivered" else None


async def test_a_fault_in_one_job_fails_that_job_only(
    service: TestClient, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    workers = service.app[webhookd.WORKERS]
    predict = workers._predict

    async def faulty_predict(texts: list[str]) -> list[Any]:
        if "poison" in texts:
            raise RuntimeError("a bug outside the model")
        return await predict(texts)

    monkeypatch.setattr(workers, "_predict", faulty_predict)
    jobs = [(await submit(service, text, webhook_url=receiver.url()))["job_id"] for text in ("ok", "poison", "fine")]
    for job_id in jobs:
        await wait_for_status(service, job_id, "delivered")
    results = [await (await service.get(f"/jobs/{job_id}")).json() for job_id in jobs]
    assert [r["status"] for r in results] == ["completed", "failed", "completed"]
    assert results[1]["error"] == "internal error: RuntimeError: a bug outside the model"
    after = (await submit(service, "and the workers go on", webhook_url=receiver.url()))["job_id"]
    await wait_for_status(service, after, "delivered")


async def test_a_fault_in_an_attempt_is_a_failed_attempt_and_retried(
    service: TestClient, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = service.app[webhookd.ENGINE]
    post = engine._post
    faults = [RuntimeError("a bug in sending")]

    async def faulty_post(*args: Any) -> webhookd.Outcome:
        if faults:
            raise faults.pop()
        return await post(*args)

    monkeypatch.setattr(engine, "_post", faulty_post)
    job_id = (await submit(service, webhook_url=receiver.url()))["job_id"]
    status = await wait_for_status(service, job_id, "delivered")
    assert [a["error"] for a in status["attempts"]] == ["internal error: RuntimeError: a bug in sending", None]


async def test_a_crashed_loop_restarts_and_healthz_names_it_while_down(service: TestClient) -> None:
    runs: list[int] = []

    async def crashing() -> None:
        runs.append(1)
        raise RuntimeError("a bug in a loop")

    service.app[webhookd.LOOPS].start("test", crashing)
    health = await wait_until(lambda: unhealthy(service), "/healthz to say 503")
    assert health.headers["Retry-After"] and "the test loop is down" in (await health.json())["error"]
    await wait_until(lambda: asyncio.sleep(0, len(runs) >= 3), "two restarts")
    await service.app[webhookd.LOOPS].stop("test")
    assert (await service.get("/healthz")).status == 200


async def unhealthy(client: TestClient) -> Any:
    response = await client.get("/healthz")
    return response if response.status == 503 else None


# ---------------------------------------------------------------------------
# Several instances (PostgreSQL), and one SQLite file for one instance
# ---------------------------------------------------------------------------

postgres_only = pytest.mark.parametrize("store", ["postgres"], indirect=True)


def fails_until(up: asyncio.Event) -> Callable[[Arrival, int], web.Response]:
    """Answer 500 until `up` is set, then 200."""
    return lambda arrival, n: web.json_response({}) if up.is_set() else web.Response(status=500)


async def instance_id(client: TestClient) -> str:
    return (await (await client.get("/healthz")).json())["instance"]


def attempt_numbers(receiver: Receiver, job_id: str) -> list[int]:
    return [int(a.headers["X-Webhook-Attempt"]) for a in receiver.arrivals if a.json["job_id"] == job_id]


def assert_numbered_without_gaps_or_repeats(status: dict[str, Any]) -> None:
    numbers = [a["attempt"] for a in status["attempts"]]
    assert numbers == list(range(1, len(numbers) + 1)), numbers


@postgres_only
async def test_any_instance_answers_for_every_job_and_redelivers_it(
    make_service: Callable[..., Any], make_receiver: Callable[..., Any]
) -> None:
    a, b = await make_service(retry=replace(FAST, max_retries=0)), await make_service()
    assert await instance_id(a) != await instance_id(b)
    release = asyncio.Event()
    receiver = await make_receiver(fails_once_then_hangs_until(release))
    job_id = (await submit(a, webhook_url=receiver.url()))["job_id"]
    await wait_for_status(b, job_id, "failed")
    assert (await (await b.get(f"/jobs/{job_id}")).json())["status"] == "completed"
    dead = (await (await b.get("/webhooks/dead-letter")).json())["deliveries"]
    assert [d["job_id"] for d in dead] == [job_id]
    assert (await b.post(f"/webhooks/{job_id}/redeliver")).status == 202
    await receiver.wait_for(2)
    assert (await a.post(f"/webhooks/{job_id}/redeliver")).status == 409  # under way at B
    release.set()
    status = await wait_for_status(a, job_id, "delivered")
    assert [x["attempt"] for x in status["attempts"]] == [1, 2]


@postgres_only
async def test_one_idempotency_key_at_several_instances_at_once_makes_one_job(
    make_service: Callable[..., Any], config: Config
) -> None:
    instances = [await make_service() for _ in range(3)]
    responses = await asyncio.gather(*(
        client.post("/predict", json={"text": "once"}, headers={"Idempotency-Key": "shared-key"})
        for client in instances * 4
    ))
    assert [r.status for r in responses] == [202] * 12
    assert len({(await r.json())["job_id"] for r in responses}) == 1
    assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in responses) == 11
    assert await query(config.db, "SELECT count(*) FROM jobs") == [(1,)]


@postgres_only
async def test_a_generated_secret_is_made_once_and_shared(
    make_service: Callable[..., Any], receiver: Receiver, config: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = await asyncio.gather(make_service(secrets=()), make_service(secrets=()))
    [(secret,)] = await query(config.db, "SELECT value FROM settings WHERE name = 'secret'")
    assert capsys.readouterr().out.count(secret) == 1
    for client in (a, b):
        await submit(client, webhook_url=receiver.url())
    for arrival in await receiver.wait_for(2):
        Webhook(secret).verify(arrival.body, arrival.headers)


@postgres_only
async def test_while_every_instance_lives_each_job_runs_once_and_each_attempt_is_made_once(
    make_service: Callable[..., Any], make_receiver: Callable[..., Any]
) -> None:
    instances = [await make_service() for _ in range(2)]
    first_seen: set[str] = set()

    def fail_each_first_attempt(arrival: Arrival, n: int) -> web.Response:
        webhook_id = arrival.headers["webhook-id"]
        if webhook_id in first_seen:
            return web.json_response({})
        first_seen.add(webhook_id)
        return web.Response(status=500)

    receiver = await make_receiver(fail_each_first_attempt)
    ids = [(await submit(instances[n % 2], f"text {n}", webhook_url=receiver.url()))["job_id"] for n in range(20)]
    for job_id in ids:
        status = await wait_for_status(instances[1], job_id, "delivered")
        assert [x["attempt"] for x in status["attempts"]] == [1, 2]
        assert attempt_numbers(receiver, job_id) == [1, 2]
    assert len(receiver.arrivals) == 40


def slow_on_request(text: str) -> dict[str, Any]:
    if text.startswith("slow"):
        time.sleep(0.5)
    return {"sentiment": "neutral", "confidence": 0.5}


async def retrying_and_queued(child: ServiceProcess, receiver: Receiver) -> tuple[str, list[str]]:
    """Give an instance a delivery waiting for its retry and three jobs waiting for the model."""
    retrying = (await child.submit(text="fast", webhook_url=receiver.url()))["job_id"]
    await receiver.wait_for(1, retrying)
    queued = [(await child.submit(text=f"slow {n}", webhook_url=receiver.url()))["job_id"] for n in range(3)]
    return retrying, queued


@postgres_only
async def test_kill_9_of_one_of_two_instances_the_other_delivers_everything(
    make_service: Callable[..., Any], make_receiver: Callable[..., Any], config: Config
) -> None:
    survivor = await make_service(retry=replace(FAST, max_retries=50), failover_after=1.0)
    up = asyncio.Event()
    receiver = await make_receiver(fails_until(up))
    child = ServiceProcess(config.db, "--model", "test_webhookd:slow_on_request", "--backoff-base", "0.3",
                           "--max-retries", "50", "--workers", "1")
    try:
        retrying, queued = await retrying_and_queued(child, receiver)
    finally:
        child.process.kill()
        child.process.wait()
    up.set()
    for job_id in [retrying, *queued]:
        assert_numbered_without_gaps_or_repeats(await wait_for_status(survivor, job_id, "delivered"))
    assert all(a.json["job_id"] in {retrying, *queued} for a in receiver.arrivals)


@postgres_only
async def test_a_graceful_stop_hands_its_work_over_at_once(
    make_service: Callable[..., Any], make_receiver: Callable[..., Any], config: Config,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "webhookd")
    # --failover-after 600: only the hand-over, never a takeover of the dead, can finish this in time.
    survivor = await make_service(retry=replace(FAST, max_retries=50), failover_after=600.0)
    up = asyncio.Event()
    receiver = await make_receiver(fails_until(up))
    child = ServiceProcess(config.db, "--model", "test_webhookd:slow_on_request", "--backoff-base", "1",
                           "--max-retries", "50", "--workers", "1", "--failover-after", "600")
    retrying, queued = await retrying_and_queued(child, receiver)
    child.process.send_signal(signal.SIGTERM)
    _, stderr = await asyncio.to_thread(child.process.communicate, timeout=DEADLINE)
    assert child.process.returncode == 0, stderr
    up.set()
    for job_id in [retrying, *queued]:
        await wait_for_status(survivor, job_id, "delivered")
    assert "handed over by instance-" in caplog.text and "presumed dead" not in caplog.text, caplog.text


@postgres_only
async def test_an_instance_cut_off_stops_sending_and_its_successor_takes_over(
    make_service: Callable[..., Any], make_receiver: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    retry = replace(FAST, max_retries=100, backoff_base=0.1, backoff_factor=1.0)
    cut_off, successor = await make_service(retry=retry), await make_service(retry=retry)
    up = asyncio.Event()
    receiver = await make_receiver(fails_until(up))
    job_id = (await submit(cut_off, webhook_url=receiver.url()))["job_id"]
    await receiver.wait_for(2, job_id)
    store = cut_off.app[webhookd.STORE]
    old_id = store.instance

    async def unreachable(*args: Any) -> Any:
        raise webhookd.StoreUnavailable("cut off")

    monkeypatch.setattr(store, "heartbeat", unreachable)
    monkeypatch.setattr(store, "take_over", unreachable)
    await wait_until(lambda: unhealthy(cut_off), "the cut-off instance to fence itself")
    engine = cut_off.app[webhookd.ENGINE]
    await wait_until(lambda: asyncio.sleep(0, engine._queues and not engine.in_flight), "a retry held at the fence")
    fenced_at = len(attempt_numbers(receiver, job_id))
    await wait_until(lambda: owned_elsewhere(successor, job_id, old_id), "the successor to take over")
    assert not cut_off.app[webhookd.ENGINE].in_flight
    monkeypatch.undo()  # the network heals
    await wait_until(lambda: rejoined(cut_off, old_id), "the cut-off instance to rejoin under a new id")
    up.set()
    status = await wait_for_status(successor, job_id, "delivered")
    assert_numbered_without_gaps_or_repeats(status)
    numbers = attempt_numbers(receiver, job_id)
    assert len(numbers) > fenced_at
    assert sorted(set(numbers)) == sorted(numbers), "an attempt was sent by both instances"


@postgres_only
async def test_jobs_an_instance_accepts_after_its_work_was_taken_over_are_adopted(
    make_service: Callable[..., Any], receiver: Receiver, config: Config
) -> None:
    # As after kill -STOP: the instance's row is deleted by a takeover, and it accepts jobs under
    # its old id before its next heartbeat would tell it so.
    model_gate.clear()
    survivor = await make_service()
    stalled = await make_service(model="test_webhookd:gated_model", workers=1)
    try:
        await stalled.app[webhookd.LOOPS].stop("heartbeat")
        old_id = stalled.app[webhookd.STORE].instance
        await wait_until(lambda: gone(config.db, old_id), "the survivor to take the stalled instance over")
        job_id = (await submit(stalled, webhook_url=receiver.url()))["job_id"]
        await wait_for_status(survivor, job_id, "delivered")
        assert (await (await survivor.get(f"/jobs/{job_id}")).json())["status"] == "completed"
        assert await query(config.db, "SELECT owner FROM jobs WHERE id = ?", job_id) == [(await instance_id(survivor),)]
    finally:
        model_gate.set()


@postgres_only
async def test_a_delivery_left_under_an_owner_that_is_gone_is_sent(
    make_service: Callable[..., Any], receiver: Receiver, config: Config
) -> None:
    # What a db outage left: the job completed, its delivery pending, its owner's row deleted.
    await make_service()
    payload = b'{"job_id":"job-orphan"}'
    await query(config.db, "INSERT INTO jobs (id, text, webhook_url, status, created_at, owner)"
                " VALUES ('job-orphan', 'x', ?, 'completed', 0, 'instance-gone') RETURNING id", receiver.url())
    await query(config.db, "INSERT INTO deliveries (job_id, url, payload, status, next_attempt_at, owner)"
                " VALUES ('job-orphan', ?, ?, 'pending', 0, 'instance-gone') RETURNING job_id", receiver.url(), payload)
    [arrival] = await receiver.wait_for(1)
    assert arrival.body == payload


async def gone(db: str, instance: str) -> bool:
    return not await query(db, "SELECT 1 FROM instances WHERE id = ?", instance)


async def owned_elsewhere(client: TestClient, job_id: str, old_owner: str) -> bool:
    [(owner,)] = await query(client.app[CONFIG].db, "SELECT owner FROM deliveries WHERE job_id = ?", job_id)
    return owner != old_owner


async def rejoined(client: TestClient, old_id: str) -> bool:
    response = await client.get("/healthz")
    return response.status == 200 and (await response.json())["instance"] != old_id


@postgres_only
async def test_the_database_stopped_and_started_under_a_running_instance(
    make_service: Callable[..., Any], make_receiver: Callable[..., Any]
) -> None:
    cluster = new_postgres_cluster()
    try:
        service = await make_service(db=cluster.new_database(), retry=replace(FAST, max_retries=100, backoff_factor=1.0))
        up = asyncio.Event()
        receiver = await make_receiver(fails_until(up))
        before = (await submit(service, webhook_url=receiver.url()))["job_id"]
        await receiver.wait_for(1, before)
        cluster.stop()
        for response in (await service.post("/predict", json={"text": "hi"}), await service.get(f"/jobs/{before}"),
                         await service.post(f"/webhooks/{before}/redeliver")):
            assert response.status == 503 and response.headers["Retry-After"]
            assert "database" in (await response.json())["error"]
        assert await unhealthy(service)  # at once: a request has found the database gone
        cluster.start()
        await wait_until(lambda: healthy(service), "the instance to carry on")
        up.set()
        after = (await submit(service, webhook_url=receiver.url()))["job_id"]
        for job_id in (before, after):
            await wait_for_status(service, job_id, "delivered")
    finally:
        cluster.remove()


async def test_the_database_going_away_is_one_warning_and_its_return_one_info(
    make_receiver: Callable[..., Any]
) -> None:
    cluster = new_postgres_cluster()  # of its own: it is stopped
    receiver = await make_receiver(lambda arrival, n: web.Response(status=500))  # retries fall due meanwhile
    child = ServiceProcess(cluster.new_database(), "--log-level", "info", "--backoff-base", "0.2",
                           "--backoff-factor", "1", "--max-retries", "100")
    try:
        await child.submit(text="fine", webhook_url=receiver.url())
        await receiver.wait_for(2)
        cluster.stop()
        await wait_until(lambda: asyncio.to_thread(lambda: http(child.url + "/healthz")[0] == 503), "a 503")
        await asyncio.sleep(2.5)  # a pool with a floor of connections retries it after 1 s, then 2 s
        cluster.start()
        await wait_until(lambda: asyncio.to_thread(lambda: http(child.url + "/healthz")[0] == 200), "a 200")
        child.process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.to_thread(child.process.communicate, timeout=DEADLINE)
    finally:
        child.process.kill()
        child.process.wait()
        cluster.remove()
    assert "Traceback" not in stderr, stderr
    about_the_db = [line for line in stderr.splitlines() if "database" in line]
    assert [line.split()[1] for line in about_the_db] == ["WARNING", "INFO"], about_the_db
    assert "cannot be reached" in about_the_db[0] and "is back" in about_the_db[1]


@postgres_only
async def test_an_id_or_its_start_is_found_on_a_database_with_a_language_collation(
    make_service: Callable[..., Any], postgres: PostgresCluster
) -> None:
    service = await make_service(db=collated_database(postgres))
    first, second = [(await submit(service))["job_id"] for _ in range(2)]
    for q, found in ((first, [first]), (first[:-1], [first]), (first[:8], [second, first]), ("job-", [second, first])):
        listed = await (await service.get("/jobs", params={"q": q})).json()
        assert [job["job_id"] for job in listed["jobs"]] == found, q


def collated_database(cluster: PostgresCluster) -> str:
    """A new database that sorts text as English does (ICU's, else glibc's), where '~' is not after letters."""
    name = f"english_{secrets.token_hex(4)}"
    for collation in ("LOCALE_PROVIDER icu ICU_LOCALE 'en-US'", "LC_COLLATE 'en_US.UTF-8' LC_CTYPE 'en_US.UTF-8'"):
        with contextlib.suppress(subprocess.CalledProcessError):
            cluster.psql(f"CREATE DATABASE {name} TEMPLATE template0 {collation}")
            return cluster.url(name)
    pytest.skip("this PostgreSQL has neither ICU nor the en_US.UTF-8 locale")


async def healthy(client: TestClient) -> bool:
    return (await client.get("/healthz")).status == 200


@postgres_only
async def test_instances_starting_at_once_on_an_empty_database_all_start(make_service: Callable[..., Any]) -> None:
    instances = await asyncio.gather(*(make_service() for _ in range(4)))
    assert len({await instance_id(client) for client in instances}) == 4


@postgres_only
async def test_an_instance_refuses_a_newer_schema_in_one_line(make_service: Callable[..., Any], config: Config) -> None:
    await (await make_service()).close()
    await query(config.db, "UPDATE settings SET value = '99' WHERE name = 'schema_version' RETURNING value")
    done = await asyncio.to_thread(run_webhookd, "--db", config.db)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "schema version 99" in done.stderr, done.stderr


async def test_a_role_that_may_not_create_tables_is_told_the_fix_in_one_line(postgres: PostgresCluster) -> None:
    # Since PostgreSQL 15 only a database's owner may create in its schema public.
    name = f"app_{secrets.token_hex(4)}"
    postgres.psql(f"CREATE ROLE {name} LOGIN", f"CREATE DATABASE {name}")
    db = postgres.url(name, user=name)
    done = await asyncio.to_thread(run_webhookd, "--db", db)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1, done.stderr
    assert (f'webhookd: role "{name}" may not create tables in schema public of database "{name}":'
            f" createdb -O {name} {name}, or GRANT CREATE ON SCHEMA public TO {name}") in done.stderr
    postgres.psql(f"GRANT CREATE ON SCHEMA public TO {name}", database=name)
    child = ServiceProcess(db)  # started: the fix it names works
    child.process.terminate()
    child.process.communicate(timeout=DEADLINE)


def run_webhookd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HERE / "webhookd.py"), "--port", "0", *args],
        capture_output=True, text=True, timeout=DEADLINE,
        env=child_environment(),
    )


PASSWORD = "pa55-not-to-be-seen"


def with_password(db: str, form: str) -> str:
    """db with PASSWORD in it, in one of the two places asyncpg reads one from."""
    if form == "user:password@":
        return db.replace("postgres@", f"postgres:{PASSWORD}@")
    return f"{db}{'&' if '?' in db else '?'}password={PASSWORD}"


@postgres_only
@pytest.mark.parametrize("form", ["user:password@", "?password="])
async def test_a_postgres_password_appears_nowhere(
    make_service: Callable[..., Any], receiver: Receiver, config: Config, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str], form: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    service = await make_service(db=with_password(config.db, form), secrets=())
    assert PASSWORD in service.app[CONFIG].db
    job_id = (await submit(service, webhook_url=receiver.url()))["job_id"]
    await wait_for_status(service, job_id, "delivered")
    for path in ("/healthz", "/metrics", f"/jobs/{job_id}", f"/webhooks/{job_id}/status"):
        assert PASSWORD not in await (await service.get(path)).text()
    await service.close()
    assert "webhookd stopping" in caplog.text  # the start-up line, the stop line and all between
    assert PASSWORD not in caplog.text
    assert "***" in capsys.readouterr().out  # the generated secret's banner names the db
    refused = await asyncio.to_thread(run_webhookd, "--db", with_password("postgresql://postgres@127.0.0.1:1/x", form))
    assert refused.returncode == 1 and "cannot connect to" in refused.stderr, refused.stderr
    assert "***" in refused.stderr and PASSWORD not in refused.stderr, refused.stderr


async def test_a_second_instance_on_one_sqlite_file_refuses_to_start(
    service: TestClient, receiver: Receiver, config: Config
) -> None:
    done = await asyncio.to_thread(run_webhookd, "--db", config.db)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "in use by another webhookd instance" in done.stderr, done.stderr
    job_id = (await submit(service, webhook_url=receiver.url()))["job_id"]  # the first carries on
    await wait_for_status(service, job_id, "delivered")


V1_SCHEMA = """
CREATE TABLE settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE jobs (id TEXT PRIMARY KEY, text TEXT NOT NULL, webhook_url TEXT, retry_policy TEXT,
    status TEXT NOT NULL, result TEXT, error TEXT, created_at REAL NOT NULL, completed_at REAL,
    idempotency_key TEXT, request_hash TEXT);
CREATE TABLE deliveries (job_id TEXT PRIMARY KEY, url TEXT NOT NULL, payload BLOB NOT NULL,
    status TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, round_start INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL, last_error TEXT, failed_at REAL);
CREATE TABLE attempts (job_id TEXT NOT NULL, attempt INTEGER NOT NULL, at REAL NOT NULL,
    status_code INTEGER, error TEXT, duration_ms REAL NOT NULL, PRIMARY KEY (job_id, attempt)) WITHOUT ROWID;
"""


async def test_a_webhookd_1_0_database_is_upgraded_and_its_work_resumed(
    make_service: Callable[..., Any], receiver: Receiver, config: Config
) -> None:
    payload = b'{"job_id":"job-old-delivery","status":"completed","result":null,"timestamp":"x"}'
    with contextlib.closing(sqlite3.connect(config.db)) as db, db:
        db.executescript(V1_SCHEMA)
        db.execute("INSERT INTO jobs (id, text, webhook_url, status, created_at) VALUES"
                   " ('job-old-queued', 'left running', ?, 'processing', 1)", (receiver.url(),))
        db.execute("INSERT INTO jobs (id, text, webhook_url, status, created_at) VALUES"
                   " ('job-old-delivery', 'done', ?, 'completed', 1)", (receiver.url(),))
        db.execute("INSERT INTO deliveries (job_id, url, payload, status, attempts, next_attempt_at)"
                   " VALUES ('job-old-delivery', ?, ?, 'retrying', 1, 0)", (receiver.url(), payload))
    service = await make_service()
    for job_id in ("job-old-queued", "job-old-delivery"):
        await wait_for_status(service, job_id, "delivered")
    assert await query(config.db, "SELECT value FROM settings WHERE name = 'schema_version'") == [(str(webhookd.SCHEMA_VERSION),)]


# ---------------------------------------------------------------------------
# The Recent Deliveries page, in a real headless Chromium
# ---------------------------------------------------------------------------

CHROMIUM_MISSING = ("the page tests need Chromium: apt-get install chromium chromium-driver"
                    " (.ci/run installs them when they are missing)")


@pytest.fixture
async def browser() -> Any:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail(CHROMIUM_MISSING)
        pytest.skip(CHROMIUM_MISSING)
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        # The flags keep Chromium off the network it would otherwise call home on.
        launched = await playwright.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield launched
        await launched.close()


async def open_page(browser: Any, client: TestClient, path: str = "/", still: bool = False, **options: Any) -> Any:
    """The page in a new tab, 1280 pixels wide unless `options` (of a browser context) say otherwise;
    `still` stops its clock, so that it reads the API only when the test acts."""
    page = await browser.new_page(**{"viewport": {"width": 1280, "height": 860}, **options})
    page.set_default_timeout(DEADLINE * 1000)
    if still:
        await page.clock.install(time=0)  # pause_at goes forward only, and the installed clock runs
        await page.clock.pause_at(time.time())
    await page.goto(str(client.make_url(path)))
    return page


async def test_the_page_lists_filters_and_shows_every_attempt_and_redelivers(
    make_service: Callable[..., Any], make_receiver: Callable[..., Any], browser: Any
) -> None:
    service = await make_service()
    receiver = await make_receiver(answer_status(500))
    delivered = (await submit(service, "I love it", webhook_url=receiver.url()))["job_id"]
    plain = (await submit(service, "no webhook here"))["job_id"]
    await wait_for_status(service, delivered, "delivered")
    page = await open_page(browser, service, "/ui")
    await page.get_by_role("button", name="Show " + plain).wait_for()
    await page.get_by_role("button", name="delivered", exact=True).click()  # the filter chip
    await page.get_by_role("button", name="Show " + plain).wait_for(state="detached")
    await page.get_by_role("button", name="Show " + delivered).click()
    detail = page.locator("#detail")
    await detail.get_by_text("HTTP 500 in").wait_for()
    await detail.get_by_text("HTTP 200 in").wait_for()
    assert await detail.locator("ol > li").count() == 2
    assert "webhook-signature: v1," in await detail.text_content()
    await detail.get_by_role("button", name="Redeliver").click()
    await detail.locator("ol > li").nth(2).wait_for()  # (the page's CSP allows no eval'd test code)
    assert len(receiver.arrivals) == 3


async def test_redeliver_all_failed_since_touches_what_it_announced(
    make_service: Callable[..., Any], make_receiver: Callable[..., Any], browser: Any
) -> None:
    service = await make_service(retry=replace(FAST, max_retries=0))
    up = asyncio.Event()
    receiver = await make_receiver(fails_until(up))
    failed = [(await submit(service, webhook_url=receiver.url()))["job_id"] for _ in range(2)]
    for job_id in failed:
        await wait_for_status(service, job_id, "failed")
    page = await open_page(browser, service)
    await page.get_by_label("Redeliver all failed since").fill("2020-01-01T00:00")
    await page.get_by_role("button", name="Count").click()
    await page.get_by_text("2 failed deliveries would get a new round.").wait_for()
    assert len(receiver.arrivals) == 2  # counting changed nothing
    after_the_count = (await submit(service, webhook_url=receiver.url()))["job_id"]
    await wait_for_status(service, after_the_count, "failed")
    up.set()
    await page.get_by_role("button", name="Redeliver them").click()
    await page.get_by_text("2 deliveries got a new round.").wait_for()
    for job_id in failed:
        await wait_for_status(service, job_id, "delivered")
    assert (await delivery_status(service, after_the_count))["delivery_status"] == "failed"
    assert len(receiver.arrivals) == 5


async def test_a_redeliver_that_fails_says_why_after_the_panel_is_rebuilt(
    make_service: Callable[..., Any], make_receiver: Callable[..., Any], browser: Any
) -> None:
    service = await make_service()
    release = asyncio.Event()
    hang = hangs_until(release)
    receiver = await make_receiver(lambda arrival, n: hang(arrival, n) if n > 1 else None)
    job_id = (await submit(service, webhook_url=receiver.url()))["job_id"]
    await wait_for_status(service, job_id, "delivered")
    page = await open_page(browser, service, still=True)
    await page.get_by_role("button", name="Show " + job_id).click()
    detail = page.locator("#detail")
    await detail.get_by_text("Delivery delivered").wait_for()
    try:
        # A round the page has not seen yet, as when someone else redelivered: the page's click gets a 409.
        assert (await service.post(f"/webhooks/{job_id}/redeliver")).status == 202
        await detail.get_by_role("button", name="Redeliver").click()
        await detail.get_by_text("A round of attempts is under way").wait_for()  # the panel, rebuilt
        assert await detail.get_by_text("still has a round of attempts under way").is_visible()
    finally:
        release.set()


async def test_load_more_goes_past_a_thousand_jobs(make_service: Callable[..., Any], config: Config,
                                                   browser: Any) -> None:
    store = await webhookd.open_store(config.db, webhookd.Loops(), 2.0)
    await asyncio.gather(*(store.add_job(webhookd.Job(webhookd.new_job_id(), f"job {n}", None, None, time.time()))
                           for n in range(1001)))
    await store.close()
    service = await make_service()
    page = await open_page(browser, service)
    rows, more = page.locator("#jobs tr"), page.get_by_role("button", name="Load more")
    for shown in range(50, 1001, 50):
        await rows.nth(shown - 1).wait_for()
        await more.click()
    await rows.nth(1000).wait_for()
    assert await rows.count() == 1001
    assert await more.is_disabled()


async def test_a_search_the_api_refuses_empties_the_list_and_says_why(
    service: TestClient, browser: Any
) -> None:
    job_id = (await submit(service))["job_id"]
    page = await open_page(browser, service)
    await page.get_by_role("button", name="Show " + job_id).wait_for()
    await page.get_by_label("Job id").fill("job-%%")
    await page.get_by_text("q must be a job id or the start of one").wait_for()
    assert await page.locator("#jobs tr").count() == 0


async def test_the_page_asks_for_the_api_key_once(make_service: Callable[..., Any], browser: Any) -> None:
    service = await make_service(api_key="s3cret-key")
    job_id = (await service.post("/predict", json={"text": "hi"}, headers={"Authorization": "Bearer s3cret-key"}))
    job_id = (await job_id.json())["job_id"]
    page = await open_page(browser, service)
    await page.get_by_label("This webhookd needs its API key:").fill("s3cret-key")
    await page.get_by_role("button", name="Use key").click()
    await page.get_by_role("button", name="Show " + job_id).wait_for()
    assert await page.evaluate("sessionStorage.getItem('webhookd-key')") == "s3cret-key"
    assert "s3cret-key" not in await (await service.get("/")).text()  # the page itself carries no key


async def test_the_page_is_a_clients_own_view_with_its_key_and_the_operators_has_a_client_column(
    make_service: Callable[..., Any], browser: Any
) -> None:
    service = await make_service(api_key=OPERATOR_KEY)
    keys = {name: (await new_client(service, name))["api_key"]["key"] for name in ("acme", "globex")}
    jobs = {name: (await submit_as(service, key, f"a job of {name}"))["job_id"] for name, key in keys.items()}
    page = await open_page(browser, service)
    await page.get_by_label("This webhookd needs its API key:").fill(OPERATOR_KEY)
    await page.get_by_role("button", name="Use key").click()
    await page.get_by_role("button", name="Show " + jobs["acme"]).wait_for()
    await page.locator("#client-head").wait_for()
    globex_row = page.locator("#jobs tr", has=page.get_by_role("button", name="Show " + jobs["globex"]))
    assert await globex_row.get_by_text("globex").is_visible()
    await page.get_by_label("Client").fill("globex")
    await page.get_by_role("button", name="Show " + jobs["acme"]).wait_for(state="detached")
    assert await page.get_by_role("button", name="Show " + jobs["globex"]).is_visible()
    mine = await open_page(browser, service)
    await mine.get_by_label("This webhookd needs its API key:").fill(keys["acme"])
    await mine.get_by_role("button", name="Use key").click()
    await mine.get_by_role("button", name="Show " + jobs["acme"]).wait_for()
    await mine.locator("#counters").wait_for(state="hidden")  # /stats is the operator's
    assert not await mine.get_by_role("button", name="Show " + jobs["globex"]).count()
    assert not await mine.get_by_label("Client").is_visible()


async def test_the_list_shows_short_ids_and_receivers_filters_by_receiver_and_copies_a_whole_id(
    make_service: Callable[..., Any], receiver: Receiver, browser: Any
) -> None:
    service = await make_service()
    port = receiver.server.port
    ours = (await submit(service, webhook_url=receiver.url()))["job_id"]
    theirs = (await submit(service, webhook_url=f"http://localhost:{port}/hook"))["job_id"]
    page = await open_page(browser, service, still=True, permissions=["clipboard-read", "clipboard-write"])
    button = page.get_by_role("button", name="Show " + ours)
    # An id starts with its time: the random end tells the jobs of a burst apart.
    assert await button.inner_text() == "job-\u2026" + ours[-8:]
    assert await button.get_attribute("title") == ours
    assert await page.locator("#jobs tr", has=button).get_by_text(f"127.0.0.1:{port}", exact=True).is_visible()
    await page.get_by_label("Receiver").fill("localhost")
    await button.wait_for(state="detached")
    await page.get_by_role("button", name="Show " + theirs).click()
    await page.locator("#detail").get_by_role("button", name="Copy " + theirs).click()
    await page.locator("#detail").get_by_text("copied").wait_for()
    assert await page.evaluate("navigator.clipboard.readText()") == theirs


async def test_at_laptop_width_the_list_fits_its_headers_and_times_stay_on_one_line_and_times_are_relative(
    make_service: Callable[..., Any], browser: Any
) -> None:
    service = await make_service(api_key=OPERATOR_KEY)
    job_id = (await submit(service, "no webhook"))["job_id"]
    await submit_as(service, (await new_client(service, "acme"))["api_key"]["key"])  # a client column
    refused = (await submit(service, webhook_url="http://127.0.0.1:65535/a-long-error-takes-room"))["job_id"]
    await wait_for_status(service, refused, "failed")
    created = (await (await service.get(f"/jobs/{job_id}")).json())["created_at"]
    page = await open_page(browser, service, still=True)
    await page.get_by_label("This webhookd needs its API key:").fill(OPERATOR_KEY)
    await page.get_by_role("button", name="Use key").click()
    when = page.locator("#jobs tr", has=page.get_by_role("button", name="Show " + job_id)).locator("time")
    await when.wait_for()
    assert (await when.inner_text(), await when.get_attribute("title")) == ("just now", created)
    cells = page.locator("th:visible, #jobs time")
    assert await cells.count() >= 9 and await wrapped(cells) == []
    table, jobs = [await page.locator(part).first.bounding_box() for part in ("table", "section[aria-label=Jobs]")]
    assert table["x"] + table["width"] <= jobs["x"] + jobs["width"]  # not under the detail beside it
    await page.clock.fast_forward("02:00")  # the next refresh is due
    await when.filter(has_text="2 min ago").wait_for()
    assert await wrapped(cells) == []
    await page.clock.fast_forward("03:00:00")
    await when.filter(has_text="3 h ago").wait_for()


async def wrapped(elements: Any) -> list[str]:
    """The texts of those elements that the browser laid out on more than one line."""
    return await elements.evaluate_all("""(elements) => elements.filter((element) => {
        const range = document.createRange();
        range.selectNodeContents(element);
        return new Set([...range.getClientRects()].map((line) => Math.round(line.top))).size > 1;
    }).map((element) => element.textContent)""")


async def test_at_phone_width_every_status_is_in_view_and_nothing_scrolls_sideways(
    make_service: Callable[..., Any], make_receiver: Callable[..., Any], browser: Any
) -> None:
    service = await make_service(retry=replace(FAST, max_retries=0))
    ok, failing = await make_receiver(), await make_receiver(answer_status(500))
    delivered = (await submit(service, webhook_url=ok.url("/hook/" + "a" * 300)))["job_id"]
    failed = (await submit(service, webhook_url=failing.url()))["job_id"]
    await wait_for_status(service, delivered, "delivered")
    await wait_for_status(service, failed, "failed")
    page = await open_page(browser, service, still=True, viewport={"width": 390, "height": 844})
    for job_id, status in ((delivered, "delivered"), (failed, "failed")):
        row = page.locator("#jobs tr", has=page.get_by_role("button", name="Show " + job_id))
        box = await row.get_by_text(status, exact=True).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390, (status, box)
    assert await page.evaluate("document.documentElement.scrollWidth") <= 390
    await page.get_by_role("button", name="Show " + delivered).first.click()
    detail = page.locator("#detail")
    await detail.get_by_text("HTTP 200 in").wait_for()
    assert await detail.evaluate("(panel) => panel.scrollWidth <= panel.clientWidth")
    assert await page.evaluate("document.documentElement.scrollWidth") <= 390


async def test_the_timeline_tells_a_redelivery_from_a_wait(
    make_service: Callable[..., Any], make_receiver: Callable[..., Any], browser: Any
) -> None:
    service = await make_service(retry=replace(FAST, max_retries=1))
    job_id, _ = await redelivered_twice(service, make_receiver)
    page = await open_page(browser, service, still=True)
    await page.get_by_role("button", name="Show " + job_id).click()
    attempts = page.locator("#detail ol > li")
    await attempts.nth(4).wait_for()
    then = [re.search(r"then (waited|redelivered)", text) for text in await attempts.all_inner_texts()]
    assert [found and found[1] for found in then] == ["waited", "redelivered", "waited", "redelivered", None]


async def test_the_since_picker_is_utc_whatever_the_browsers_time_zone(
    make_service: Callable[..., Any], make_receiver: Callable[..., Any], browser: Any
) -> None:
    service = await make_service(retry=replace(FAST, max_retries=0))
    receiver = await make_receiver(answer_status(500))
    await wait_for_status(service, (await submit(service, webhook_url=receiver.url()))["job_id"], "failed")
    page = await open_page(browser, service, timezone_id="Pacific/Kiritimati")  # UTC+14
    since = time.strftime("%Y-%m-%dT%H:%M", time.gmtime(time.time() - 3600))
    await page.get_by_label("Redeliver all failed since (UTC)").fill(since)
    async with page.expect_request("**/webhooks/redeliver") as count:
        await page.get_by_role("button", name="Count").click()
    assert json.loads((await count.value).post_data)["since"] == since + ":00.000Z"
    await page.get_by_text("1 failed deliveries would get a new round.").wait_for()


async def test_a_fresh_install_says_no_jobs_yet_and_an_empty_dead_letter_says_so(
    service: TestClient, browser: Any
) -> None:
    page = await open_page(browser, service)
    await page.get_by_text("No jobs yet").wait_for()
    await page.get_by_text("Nothing in the dead letter.").wait_for()
    await page.get_by_label("Job id").fill("job-ff")
    await page.get_by_text("No job matches.").wait_for()
    await page.get_by_label("Job id").fill("")
    await page.get_by_text("No jobs yet").wait_for()


async def test_the_page_loads_without_a_console_error_or_a_failed_request(
    make_service: Callable[..., Any], browser: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    served, favicon = asyncio.Event(), webhookd.favicon

    async def noted(request: web.Request) -> web.StreamResponse:  # the browser's own request: no page event shows it
        served.set()
        return await favicon(request)

    monkeypatch.setattr(webhookd, "favicon", noted)
    service = await make_service(api_key=OPERATOR_KEY)
    job_id = (await submit(service))["job_id"]
    page = await browser.new_page()
    page.set_default_timeout(DEADLINE * 1000)
    problems: list[str] = []
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("requestfailed", lambda request: problems.append(f"{request.url}: {request.failure}"))
    page.on("response", lambda response: problems.append(f"{response.url}: {response.status}")
            if response.status >= 400 else None)
    await page.add_init_script(f"sessionStorage.setItem('webhookd-key', {OPERATOR_KEY!r})")
    await page.goto(str(service.make_url("/")))
    assert await page.locator("link[rel=icon]").get_attribute("href") == "/favicon.ico"
    await asyncio.wait_for(served.wait(), DEADLINE)
    await page.get_by_role("button", name="Show " + job_id).wait_for()
    await page.get_by_text("Nothing in the dead letter.").wait_for()
    await page.locator(".counter").first.wait_for()
    assert problems == []


async def test_a_script_in_an_answer_or_a_url_shows_as_text_and_never_runs(
    make_service: Callable[..., Any], make_receiver: Callable[..., Any], browser: Any
) -> None:
    service = await make_service(retry=replace(FAST, max_retries=0))
    attack = "<script>window.pwned=1</script><img src=x onerror=window.pwned=2>"
    receiver = await make_receiver(lambda arrival, n: web.Response(status=400, text=attack))
    url = f"http://127.0.0.1:{receiver.server.port}/hook/<script>window.pwned=3</script>"
    job_id = (await submit(service, webhook_url=url))["job_id"]
    await wait_for_status(service, job_id, "failed")
    page = await open_page(browser, service)
    await page.get_by_role("button", name="Show " + job_id).first.click()
    await page.locator("#detail").get_by_text(attack).wait_for()
    await page.get_by_text("/hook/<script>window.pwned=3</script>").first.wait_for()
    assert await page.evaluate("window.pwned") is None
    headers = (await service.get("/")).headers["Content-Security-Policy"]
    assert "default-src 'none'" in headers and "unsafe-inline" not in headers


async def test_a_page_on_another_site_cannot_make_a_browser_redeliver(service: TestClient) -> None:
    job_id = (await submit(service))["job_id"]
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
        response = await service.post(f"/webhooks/{job_id}/redeliver", headers=headers)
        assert response.status == 403
    same = await service.post("/predict", json={"text": "hi"}, headers={"Origin": str(service.make_url("")).rstrip("/")})
    assert same.status == 202


@pytest.mark.parametrize("headers, status", [
    # The browser's own verdict decides: behind a proxy that rewrites Host, Origin and Host differ.
    ({"Sec-Fetch-Site": "same-origin", "Origin": "https://webhookd.example"}, 202),
    ({"Sec-Fetch-Site": "none"}, 202),
    ({"Sec-Fetch-Site": "cross-site", "Origin": "http://x", "Host": "x"}, 403),
    ({"Sec-Fetch-Site": "same-site", "Origin": "http://x", "Host": "x"}, 403),
    # Without it, Origin against the address the proxy says the browser used.
    ({"Origin": "https://x", "Host": "x", "X-Forwarded-Proto": "https"}, 202),
    ({"Origin": "https://webhookd.example", "X-Forwarded-Host": "webhookd.example", "X-Forwarded-Proto": "https"}, 202),
    ({"Origin": "https://evil.example", "Host": "x", "X-Forwarded-Proto": "https"}, 403),
], ids=["host-rewritten", "none", "cross-site", "same-site", "tls-ended", "host-forwarded", "other-site-forwarded"])
async def test_behind_a_proxy_the_page_may_write_and_other_sites_still_may_not(
    service: TestClient, headers: dict[str, str], status: int
) -> None:
    response = await service.post("/predict", json={"text": "hi"}, headers=headers)
    assert response.status == status, await response.text()


@pytest.fixture(scope="module")
def live_service(tmp_path_factory: pytest.TempPathFactory) -> Any:
    # With the operator's key, so that the clients' endpoints are called for real too.
    service = ServiceProcess(str(tmp_path_factory.mktemp("live") / "l.db"), "--log-level", "error",
                             "--api-key", OPERATOR_KEY)
    yield service.url
    service.process.terminate()
    _, stderr = service.process.communicate(timeout=DEADLINE)
    assert "Traceback" not in stderr, stderr


@pytest.mark.parametrize("operation", [result.ok() for result in
                                       schemathesis.openapi.from_dict(webhookd.OPENAPI).get_all_operations()],
                         ids=lambda operation: operation.label)
def test_every_operation_answers_as_described_and_never_with_a_5xx(operation: Any, live_service: str) -> None:
    @given(case=operation.as_strategy())
    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
    def call(case: Any) -> None:
        # Every check but that each schema-valid request is accepted: a valid URL may still be one
        # no webhook can reach (a private address, a bad host), which the schema cannot say.
        case.call_and_validate(base_url=live_service, headers={"Authorization": f"Bearer {OPERATOR_KEY}"},
                               excluded_checks=[schemathesis.checks.positive_data_acceptance])

    call()


# ---------------------------------------------------------------------------
# Private-address blocking
# ---------------------------------------------------------------------------

BLOCKED_URLS = [
    "http://127.0.0.1/hook", "http://127.1/hook", "http://2130706433/hook", "http://0x7f000001/hook",
    "http://0177.0.0.1/hook", "http://[::1]/hook", "http://[::ffff:127.0.0.1]/hook", "http://localhost/hook",
    "http://LOCALHOST./hook", "http://api.localhost/hook", "http://10.0.0.1/", "http://172.16.5.4/",
    "http://192.168.1.1/", "http://169.254.169.254/latest/meta-data/", "http://[fe80::1]/", "http://[fd00::1]/",
    "http://0.0.0.0/", "http://224.0.0.1/", "http://240.0.0.1/", "http://100.64.0.1/", "http://[::]/",
    "http://[2002:7f00:1::]/",
]


@pytest.mark.parametrize("url", BLOCKED_URLS)
async def test_private_literal_addresses_are_refused_at_submission(make_service: Callable[..., Any], url: str) -> None:
    service = await make_service(allow_private_urls=False)
    response = await service.post("/predict", json={"text": "hi", "webhook_url": url})
    assert response.status == 400
    assert "--allow-private-urls" in (await response.json())["error"]


@pytest.mark.parametrize("url", ["https://example.com/hook", "http://93.184.215.14:8080/x", "http://[2606:4700::1]/"])
def test_public_addresses_are_accepted(url: str) -> None:
    # Validation only: the tests never send traffic off this machine.
    job = webhookd.job_from_fields({"text": "hi", "webhook_url": url}, allow_private_urls=False)
    assert job.webhook_url == url


async def test_a_name_that_resolves_to_a_private_address_is_blocked_at_delivery(
    make_service: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def resolve_to_loopback(self: Any, host: str, port: int = 0, family: int = 0) -> list[dict[str, Any]]:
        return [{"hostname": host, "host": "127.0.0.1", "port": port, "family": 2, "proto": 6, "flags": 0}]

    monkeypatch.setattr(webhookd.aiohttp.DefaultResolver, "resolve", resolve_to_loopback)
    service = await make_service(allow_private_urls=False)
    accepted = await submit(service, webhook_url="http://rebinding.example/hook")
    status = await wait_for_status(service, accepted["job_id"], "failed")
    [attempt] = status["attempts"]  # blocked is final: no retries
    assert attempt["status_code"] is None and "blocked" in attempt["error"]


async def test_the_resolver_keeps_public_addresses_and_drops_private_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    async def resolve_mixed(self: Any, host: str, port: int = 0, family: int = 0) -> list[dict[str, Any]]:
        return [{"hostname": host, "host": h, "port": port, "family": 2, "proto": 6, "flags": 0}
                for h in ("10.1.2.3", "93.184.215.14", "169.254.169.254")]

    monkeypatch.setattr(webhookd.aiohttp.DefaultResolver, "resolve", resolve_mixed)
    resolver = webhookd.PublicResolver()
    assert [r["host"] for r in await resolver.resolve("mixed.example", 80)] == ["93.184.215.14"]
    await resolver.close()


def test_blocked_host_reads_every_ip_spelling() -> None:
    for host in ("127.1", "2130706433", "0x7f.1", "::ffff:7f00:1", "0:0:0:0:0:ffff:a00:1", "fe80::1%eth0"):
        assert webhookd.blocked_host(host), host
    for host in ("example.com", "8.8.8.8", "134744072", "2001:4860:4860::8888", "::ffff:8.8.8.8"):
        assert webhookd.blocked_host(host) is None, host


# ---------------------------------------------------------------------------
# API key
# ---------------------------------------------------------------------------


async def test_api_key_guards_every_endpoint_but_healthz(make_service: Callable[..., Any]) -> None:
    service = await make_service(api_key="s3cret-key")
    assert (await service.get("/healthz")).status == 200
    for method, path in (("POST", "/predict"), ("GET", "/jobs/job-x"), ("GET", "/webhooks/job-x/status"),
                         ("GET", "/webhooks/dead-letter"), ("POST", "/webhooks/job-x/redeliver"),
                         ("GET", "/metrics")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"}):
            response = await service.request(method, path, json={"text": "hi"}, headers=headers)
            assert response.status == 401, (method, path, headers)
            body = await response.json()
            assert "API key" in body["error"] and "s3cret-key" not in json.dumps(body)
    response = await service.post("/predict", json={"text": "hi"}, headers={"Authorization": "Bearer s3cret-key"})
    assert response.status == 202


# ---------------------------------------------------------------------------
# Clients: their own keys, secrets and jobs, and a fair share
# ---------------------------------------------------------------------------

OPERATOR = {"Authorization": f"Bearer {OPERATOR_KEY}"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def new_client(service: TestClient, name: str) -> dict[str, Any]:
    response = await service.post("/clients", json={"name": name}, headers=OPERATOR)
    assert response.status == 201, await response.text()
    return await response.json()


async def submit_as(client: TestClient, key: str, text: str = "I love it", **fields: Any) -> dict[str, Any]:
    response = await client.post("/predict", json={"text": text, **fields}, headers=bearer(key))
    assert response.status == 202, await response.text()
    return await response.json()


@both_stores
async def test_a_client_gets_a_key_and_a_secret_shown_once(make_service: Callable[..., Any]) -> None:
    service = await make_service(api_key=OPERATOR_KEY)
    acme = await new_client(service, "acme")
    assert re.fullmatch(r"whk_[A-Za-z0-9_-]{43}", acme["api_key"]["key"]) and acme["secret"].startswith("whsec_")
    listed = await (await service.get("/clients", headers=OPERATOR)).text()
    assert acme["api_key"]["key"] not in listed and acme["secret"] not in listed
    assert json.loads(listed)["clients"] == [{"name": "acme", "created_at": acme["created_at"], "disabled": False,
                                              "keys": [{"id": acme["api_key"]["id"], "created_at": acme["created_at"]}],
                                              "secrets": 1}]
    assert (await service.post("/clients", json={"name": "acme"}, headers=OPERATOR)).status == 409
    for bad in ("", "Acme", "-acme", "a" * 65, "a b", 7):
        assert (await service.post("/clients", json={"name": bad}, headers=OPERATOR)).status == 400, bad
    await new_client(service, "globex")
    own = bearer(acme["api_key"]["key"])
    assert (await service.get("/clients/acme", headers=own)).status == 200
    assert (await service.get("/clients/globex", headers=own)).status == 404  # as if unknown
    for path in ("/clients/a%00b", "/clients/acme/keys/key_%00"):  # PostgreSQL cannot even be asked
        response = await service.request("DELETE" if "keys" in path else "GET", path, headers=OPERATOR)
        assert response.status == 404, path
    for method, path in (("GET", "/clients"), ("POST", "/clients"), ("PATCH", "/clients/acme"),
                         ("GET", "/metrics"), ("GET", "/stats")):
        assert (await service.request(method, path, json={"name": "x"}, headers=own)).status == 403, path
    assert (await service.get("/jobs", headers={"Authorization": ""})).status == 401  # now every request needs a key


@both_stores
async def test_another_clients_job_answers_exactly_as_an_unknown_one(
    make_service: Callable[..., Any], make_receiver: Callable[..., Any]
) -> None:
    service = await make_service(api_key=OPERATOR_KEY, retry=replace(FAST, max_retries=0))
    failing = await make_receiver(lambda arrival, n: web.Response(status=500))
    a, b = (await new_client(service, "a"))["api_key"]["key"], (await new_client(service, "b"))["api_key"]["key"]
    theirs = (await submit_as(service, a, webhook_url=failing.url()))["job_id"]
    await wait_for_status(service, theirs, "failed")
    mine = (await submit_as(service, b, webhook_url=failing.url()))["job_id"]
    await wait_for_status(service, mine, "failed")
    unknown = "job-" + "0" * 32
    for method, path in (("GET", "/jobs/{}"), ("GET", "/webhooks/{}/status"), ("GET", "/webhooks/{}/request"),
                         ("POST", "/webhooks/{}/redeliver")):
        answers = []
        for job_id in (theirs, unknown):
            response = await service.request(method, path.format(job_id), headers=bearer(b))
            answers.append((response.status, (await response.text()).replace(job_id, "ID")))
        assert answers[0] == answers[1] and answers[0][0] == 404, (path, answers)
    listed = await (await service.get("/jobs", headers=bearer(b))).json()
    assert [j["job_id"] for j in listed["jobs"]] == [mine] and listed["jobs"][0]["client"] == "b"
    dead = await (await service.get("/webhooks/dead-letter", headers=bearer(b))).json()
    assert [d["job_id"] for d in dead["deliveries"]] == [mine]
    window = {"since": "2000-01-01T00:00:00Z", "dry_run": True}
    assert await (await service.post("/webhooks/redeliver", json=window, headers=bearer(b))).json() == {"would_redeliver": 1}
    assert await (await service.post("/webhooks/redeliver", json=window, headers=OPERATOR)).json() == {"would_redeliver": 2}
    redelivered = await service.post("/webhooks/redeliver", json={**window, "dry_run": False}, headers=bearer(b))
    assert await redelivered.json() == {"redelivered": 1}
    status = await (await service.get(f"/webhooks/{theirs}/status", headers=OPERATOR)).json()
    assert status["delivery_status"] == "failed" and status["client"] == "a"  # not touched by b's bulk call
    assert (await service.get("/jobs?client=a", headers=bearer(b))).status == 400
    assert (await service.get("/jobs?client=a%00", headers=OPERATOR)).status == 400
    by_a = await (await service.get("/jobs?client=a", headers=OPERATOR)).json()
    assert [(j["job_id"], j["client"]) for j in by_a["jobs"]] == [(theirs, "a")]


@both_stores
async def test_an_idempotency_key_is_each_clients_own(make_service: Callable[..., Any], config: Config) -> None:
    service = await make_service(api_key=OPERATOR_KEY)
    keys = [(await new_client(service, name))["api_key"]["key"] for name in ("a", "b")]
    ids = []
    for key in (*keys, keys[0]):
        response = await service.post("/predict", json={"text": "order 1"},
                                      headers={**bearer(key), "Idempotency-Key": "order-1"})
        ids.append((await response.json())["job_id"])
    assert ids[0] != ids[1] and ids[2] == ids[0]
    assert await query(config.db, "SELECT count(*) FROM jobs") == [(2,)]


@both_stores
async def test_a_clients_webhooks_carry_its_own_signatures_only(
    make_service: Callable[..., Any], receiver: Receiver
) -> None:
    service = await make_service(api_key=OPERATOR_KEY)
    acme, other = await new_client(service, "acme"), await new_client(service, "other")
    await submit_as(service, acme["api_key"]["key"], webhook_url=receiver.url())
    [arrival] = await receiver.wait_for(1)
    Webhook(acme["secret"]).verify(arrival.body, arrival.headers)
    assert webhookd.verify_x_signature([_key(acme["secret"])], arrival.body, arrival.headers["X-Signature"])
    for wrong in (other["secret"], SECRET):
        with pytest.raises(WebhookVerificationError):
            Webhook(wrong).verify(arrival.body, arrival.headers)
        assert not webhookd.verify_x_signature([_key(wrong)], arrival.body, arrival.headers["X-Signature"])


@both_stores
async def test_a_rotated_secret_overlaps_as_asked_and_a_redelivery_takes_the_current_ones(
    make_service: Callable[..., Any], receiver: Receiver
) -> None:
    service = await make_service(api_key=OPERATOR_KEY)
    acme = await new_client(service, "acme")
    key, first = acme["api_key"]["key"], acme["secret"]
    job_id = (await submit_as(service, key, webhook_url=receiver.url()))["job_id"]
    await receiver.wait_for(1)
    rotated = await service.post("/clients/acme/secrets", json={"overlap_hours": 24}, headers=bearer(key))
    assert rotated.status == 201
    second = (await rotated.json())["secret"]
    await submit_as(service, key, webhook_url=receiver.url())
    overlapping = (await receiver.wait_for(2))[1]
    for secret in (first, second):
        Webhook(secret).verify(overlapping.body, overlapping.headers)
    assert webhookd.verify_x_signature([_key(second)], overlapping.body, overlapping.headers["X-Signature"])
    third = await (await service.post("/clients/acme/secrets", json={"overlap_hours": 0}, headers=OPERATOR)).json()
    assert (await service.post(f"/webhooks/{job_id}/redeliver", headers=bearer(key))).status == 202
    redelivered = (await receiver.wait_for(3))[2]
    assert redelivered.json["job_id"] == job_id
    Webhook(third["secret"]).verify(redelivered.body, redelivered.headers)
    for old in (first, second):
        with pytest.raises(WebhookVerificationError):
            Webhook(old).verify(redelivered.body, redelivered.headers)
    for bad in ({"overlap_hours": -1}, {"overlap_hours": 721}, {"overlap_hours": "24"}, {"overlap": 1}):
        assert (await service.post("/clients/acme/secrets", json=bad, headers=OPERATOR)).status == 400, bad


@both_stores
async def test_a_second_key_works_and_a_revoked_one_is_refused(make_service: Callable[..., Any]) -> None:
    service = await make_service(api_key=OPERATOR_KEY)
    acme = await new_client(service, "acme")
    first = acme["api_key"]
    second = await (await service.post("/clients/acme/keys", headers=bearer(first["key"]))).json()
    await submit_as(service, second["key"])
    assert (await service.delete(f"/clients/acme/keys/{first['id']}", headers=bearer(second["key"]))).status == 204
    assert (await service.get("/jobs", headers=bearer(first["key"]))).status == 401  # at once, on this instance
    assert (await service.get("/jobs", headers=bearer(second["key"]))).status == 200
    assert (await service.delete(f"/clients/acme/keys/{first['id']}", headers=OPERATOR)).status == 404


@postgres_only
async def test_a_key_revoked_on_one_instance_is_refused_by_the_others(make_service: Callable[..., Any]) -> None:
    one, other = await make_service(api_key=OPERATOR_KEY), await make_service(api_key=OPERATOR_KEY)
    key = (await new_client(one, "acme"))["api_key"]
    await wait_until(lambda: accepted_by(other, key["key"]), "the other instance to know the new client")
    assert (await one.delete(f"/clients/acme/keys/{key['id']}", headers=OPERATOR)).status == 204
    await wait_until(lambda: refused_by(other, key["key"]), "the other instance to refuse the revoked key")


@both_stores
async def test_a_change_from_the_command_line_is_in_force_in_the_running_service(
    make_service: Callable[..., Any], config: Config
) -> None:
    service = await make_service(api_key=OPERATOR_KEY)
    made = await asyncio.to_thread(run_clients, "add", "acme", "--db", config.db)
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)["api_key"]
    await wait_until(lambda: accepted_by(service, key["key"]), "the service to know the new client")
    revoked = await asyncio.to_thread(run_clients, "--db", config.db, "revoke-key", "acme", key["id"])
    assert revoked.returncode == 0 and json.loads(revoked.stdout) == {"id": key["id"], "revoked": True}
    await wait_until(lambda: refused_by(service, key["key"]), "the service to refuse the revoked key")


async def accepted_by(service: TestClient, key: str) -> bool:
    return (await service.get("/jobs", headers=bearer(key))).status == 200


async def refused_by(service: TestClient, key: str) -> bool:
    return (await service.get("/jobs", headers=bearer(key))).status == 401


def run_clients(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(HERE / "webhookd.py"), "clients", *args], capture_output=True,
                          text=True, timeout=DEADLINE, env=child_environment())


def test_the_clients_command_line_says_what_is_wrong_in_one_line(tmp_path: Path) -> None:
    db = str(tmp_path / "c.db")
    assert run_clients("add", "acme", "--db", db).returncode == 0
    for args in (("show", "nobody"), ("add", "acme"), ("add", "Not A Name"), ("revoke-key", "acme", "key_x"),
                 ("rotate-secret", "acme", "--overlap-hours", "1000"), ("frobnicate",), ("add",)):
        done = run_clients(*args, "--db", db)
        assert done.returncode != 0 and done.stderr.count("\n") == 1 and not done.stdout, (args, done.stderr)
    shown = json.loads(run_clients("--db", db, "disable", "acme").stdout)
    assert shown["name"] == "acme" and shown["disabled"] is True
    assert json.loads(run_clients("enable", "acme", f"--db={db}").stdout)["disabled"] is False


@both_stores
async def test_a_disabled_client_is_refused_but_its_accepted_work_is_delivered(
    make_service: Callable[..., Any], make_receiver: Callable[..., Any]
) -> None:
    service = await make_service(api_key=OPERATOR_KEY)
    up = asyncio.Event()
    receiver = await make_receiver(fails_until(up))
    acme = await new_client(service, "acme")
    key = acme["api_key"]["key"]
    job_id = (await submit_as(service, key, webhook_url=receiver.url()))["job_id"]
    await receiver.wait_for(1)
    disabled = await service.patch("/clients/acme", json={"disabled": True}, headers=OPERATOR)
    assert disabled.status == 200 and (await disabled.json())["disabled"] is True
    for method, path in (("POST", "/predict"), ("GET", "/jobs"), ("GET", "/clients/acme")):
        response = await service.request(method, path, json={"text": "x"}, headers=bearer(key))
        assert response.status == 403 and "disabled" in (await response.json())["error"], path
    up.set()
    await wait_for_status(service, job_id, "delivered")
    Webhook(acme["secret"]).verify(receiver.arrivals[-1].body, receiver.arrivals[-1].headers)


def test_a_client_whose_secrets_are_not_read_yet_is_a_moments_wait_not_an_error() -> None:
    operator = webhookd.Signer([SECRET])
    clients = webhookd.Clients(None, operator)  # type: ignore[arg-type]  # nothing read yet
    assert clients.signer("") is operator
    with pytest.raises(webhookd.StoreUnavailable, match="not read yet"):
        clients.signer("made-elsewhere")


async def test_no_key_is_kept_in_the_database_files(make_service: Callable[..., Any], config: Config) -> None:
    service = await make_service(api_key=OPERATOR_KEY)
    acme = await new_client(service, "acme")
    second = await (await service.post("/clients/acme/keys", headers=OPERATOR)).json()
    await submit_as(service, second["key"])
    files = [path for path in glob.glob(config.db + "*")]
    assert config.db + "-wal" in files
    for path in files:
        content = Path(path).read_bytes()
        for key in (acme["api_key"]["key"], second["key"]):
            assert key.encode() not in content and key[4:].encode() not in content, path


def ten_ms_model(text: str) -> dict[str, Any]:
    time.sleep(0.01)
    return {"sentiment": "neutral", "confidence": 0.5}


async def test_a_flooding_client_is_told_to_wait_and_delays_another_by_about_a_batch(
    make_service: Callable[..., Any], receiver: Receiver
) -> None:
    service = await make_service(api_key=OPERATOR_KEY, model="test_webhookd:ten_ms_model", workers=1,
                                 max_backlog=1000)
    flood, quiet = (await new_client(service, "flood"))["api_key"]["key"], (await new_client(service, "quiet"))["api_key"]["key"]
    answers = []
    for burst in range(16):  # 1,600 jobs, 100 at once
        answers += await asyncio.gather(*(
            service.post("/predict", json={"text": f"flood {burst} {n}", "webhook_url": receiver.url("/flood")},
                         headers=bearer(flood)) for n in range(100)))
    refused = [a for a in answers if a.status == 429]
    assert refused and all(a.headers["Retry-After"] for a in refused)
    assert "--client-backlog" in (await refused[0].json())["error"]
    assert all(a.status in (202, 429) for a in answers)
    workers = service.app[webhookd.WORKERS]
    for n in range(3):
        job_id = (await submit_as(service, quiet, f"quiet {n}", webhook_url=receiver.url("/quiet")))["job_id"]
        await receiver.wait_for(1, job_id)
        # Delivered while the flood still waits: it went ahead of it, not behind it.
        assert workers.queue.held("flood") > 0


async def test_a_receiver_shared_by_two_clients_takes_their_webhooks_in_turn(
    make_service: Callable[..., Any], make_receiver: Callable[..., Any]
) -> None:
    release = asyncio.Event()
    shared = await make_receiver(hangs_until(release))
    service = await make_service(api_key=OPERATOR_KEY)
    flood, quiet = (await new_client(service, "flood"))["api_key"]["key"], (await new_client(service, "quiet"))["api_key"]["key"]
    for n in range(20):
        await submit_as(service, flood, f"flood {n}", webhook_url=shared.url())
    await shared.wait_for(1)  # a new receiver: one attempt at a time, and this one hangs
    engine = service.app[webhookd.ENGINE]
    await wait_until(lambda: asyncio.sleep(0, engine.held("flood") == 19), "the flood's webhooks to be due")
    quiet_id = (await submit_as(service, quiet, "quiet", webhook_url=shared.url()))["job_id"]
    await wait_until(lambda: asyncio.sleep(0, engine.held("quiet") == 1), "the quiet client's webhook to be due")
    release.set()
    arrivals = await shared.wait_for(21)
    # Its turn came with the next of the flood's (the two may be sent at once), not after all 19.
    assert [a.json["job_id"] for a in arrivals].index(quiet_id) <= 2


@both_stores
async def test_a_database_of_webhookd_1_1_is_upgraded_and_its_jobs_are_the_operators(
    make_service: Callable[..., Any], config: Config, tmp_path: Path
) -> None:
    old = webhookd_1_1(tmp_path)
    store = await old.open_store(config.db, old.Loops(), 2.0)
    await store.add_job(old.Job("job-" + "1" * 32, "left by 1.1", None, None, time.time()), "order-1", "h")
    await store.close()
    redelivered, url = "job-" + "2" * 32, "http://127.0.0.1:9/hook"  # in its second round, the one it still knows
    await query(config.db, "INSERT INTO jobs (id, text, webhook_url, status, created_at) VALUES (?, 'x', ?, 'completed', 1)",
                redelivered, url)
    await query(config.db, "INSERT INTO deliveries (job_id, url, payload, status, attempts, round_start)"
                " VALUES (?, ?, ?, 'delivered', 2, 1)", redelivered, url, b"{}")
    for number in (1, 2):
        await query(config.db, "INSERT INTO attempts (job_id, attempt, at, status_code, duration_ms) VALUES (?, ?, ?, 200, 1)",
                    redelivered, number, float(number))
    service = await make_service(api_key=OPERATOR_KEY)
    attempts = (await delivery_status(service, redelivered))["attempts"]
    assert [attempt["redelivery"] for attempt in attempts] == [False, True]
    job = await (await service.get("/jobs/job-" + "1" * 32, headers=OPERATOR)).json()
    assert job["client"] is None and job["job_id"] == "job-" + "1" * 32
    key = (await new_client(service, "acme"))["api_key"]["key"]
    assert (await service.get("/jobs/job-" + "1" * 32, headers=bearer(key))).status == 404
    assert (await (await service.get("/jobs", headers=bearer(key))).json())["jobs"] == []
    assert await query(config.db, "SELECT value FROM settings WHERE name = 'schema_version'") == [("4",)]


def webhookd_1_1(tmp_path: Path) -> Any:
    """webhookd 1.1 as it was released, from the project's history."""
    done = subprocess.run(["git", "show", "0ff3370:webhookd.py"], cwd=HERE, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"the upgrade test reads webhookd 1.1 from git history (a full clone): {done.stderr.strip()}")
    path = tmp_path / "webhookd_1_1.py"
    path.write_text(done.stdout)
    spec = importlib.util.spec_from_file_location("webhookd_1_1", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["webhookd_1_1"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------
# Idempotency
# ---------------------------------------------------------------------------


@both_stores
async def test_idempotency_key_replays_the_first_answer(service: TestClient, receiver: Receiver) -> None:
    body = {"text": "lovely", "webhook_url": receiver.url()}
    first = await service.post("/predict", json=body, headers={"Idempotency-Key": "order-1"})
    again = await service.post("/predict", data=json.dumps(body, indent=2),
                               headers={"Idempotency-Key": "order-1", "Content-Type": "application/json"})
    assert first.status == again.status == 202
    assert await first.json() == await again.json()
    assert "Idempotent-Replayed" not in first.headers
    assert again.headers["Idempotent-Replayed"] == "true"
    other = await service.post("/predict", json={"text": "different"}, headers={"Idempotency-Key": "order-1"})
    assert other.status == 422 and "Idempotency-Key" in (await other.json())["error"]
    await receiver.wait_for(1)
    await wait_for_status(service, (await first.json())["job_id"], "delivered")
    assert len(receiver.arrivals) == 1


@both_stores
async def test_concurrent_requests_with_one_new_key_make_one_job(service: TestClient, config: Config) -> None:
    responses = await asyncio.gather(*(
        service.post("/predict", json={"text": "same"}, headers={"Idempotency-Key": "race"}) for _ in range(10)
    ))
    bodies = [await r.json() for r in responses]
    assert all(r.status == 202 for r in responses)
    assert len({b["job_id"] for b in bodies}) == 1
    assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in responses) == 9
    assert await query(config.db, "SELECT count(*) FROM jobs") == [(1,)]


@both_stores
async def test_idempotency_keys_are_forgotten_after_24_hours(service: TestClient, config: Config) -> None:
    first = await (await service.post("/predict", json={"text": "a"}, headers={"Idempotency-Key": "old"})).json()
    store = service.app[webhookd.STORE]
    assert webhookd.IDEMPOTENCY_KEY_LIFETIME >= 24 * 3600
    await store.forget_idempotency_keys(time.time() - webhookd.IDEMPOTENCY_KEY_LIFETIME)
    kept = await service.post("/predict", json={"text": "a"}, headers={"Idempotency-Key": "old"})
    assert kept.headers.get("Idempotent-Replayed") == "true"  # younger than 24 hours: kept
    await store.forget_idempotency_keys(time.time() + 1)  # as if a day had passed
    again = await service.post("/predict", json={"text": "a"}, headers={"Idempotency-Key": "old"})
    assert "Idempotent-Replayed" not in again.headers
    assert (await again.json())["job_id"] != first["job_id"]


@both_stores
async def test_idempotency_survives_a_restart(make_service: Callable[..., Any]) -> None:
    first = await make_service()
    answer = await (await first.post("/predict", json={"text": "a"}, headers={"Idempotency-Key": "k1"})).json()
    await first.close()
    second = await make_service()
    replay = await second.post("/predict", json={"text": "a"}, headers={"Idempotency-Key": "k1"})
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert await replay.json() == answer


# ---------------------------------------------------------------------------
# Health, metrics, configuration, the receiver
# ---------------------------------------------------------------------------


@both_stores
async def test_healthz_and_metrics(service: TestClient, make_receiver: Callable[..., Any]) -> None:
    health = await service.get("/healthz")
    assert health.status == 200 and (await health.json())["status"] == "ok"
    receiver = await make_receiver(answer_status(500))
    accepted = await submit(service, webhook_url=receiver.url())
    await wait_for_status(service, accepted["job_id"], "delivered")
    response = await service.get("/metrics")
    assert response.status == 200 and response.content_type == "text/plain"
    samples = metric_samples(await response.text())
    assert samples["webhookd_jobs", (("status", "completed"),)] == 1
    assert samples["webhookd_delivery_attempts_total", (("outcome", "success"),)] == 1
    assert samples["webhookd_delivery_attempts_total", (("outcome", "http_error"),)] == 1
    assert samples["webhookd_dead_letter_deliveries", ()] == 0
    assert samples["webhookd_queue_depth", ()] == 0
    assert samples["webhookd_attempt_duration_seconds_bucket", (("le", "+Inf"),)] == 2
    assert samples["webhookd_attempt_duration_seconds_count", ()] == 2


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics text, as Prometheus's own parser reads it."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_metrics_have_the_process_the_collector_the_model_and_every_route(
    service: TestClient, receiver: Receiver
) -> None:
    job_id = (await submit(service, webhook_url=receiver.url()))["job_id"]
    await wait_for_status(service, job_id, "delivered")
    for path in ("/nowhere/1", "/nowhere/2", f"/jobs/{job_id}"):
        await service.get(path)
    samples = metric_samples(await (await service.get("/metrics")).text())
    names = {name for name, _ in samples}
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
            "python_gc_collections_total"} <= names
    assert samples["webhookd_jobs_accepted_total", ()] == 1
    assert samples["webhookd_inference_batch_duration_seconds_count", ()] >= 1
    assert samples["webhookd_inference_job_duration_seconds_count", ()] >= 1
    assert samples["webhookd_oldest_due_delivery_seconds", ()] == 0
    requests = {labels: n for (name, labels), n in samples.items() if name == "webhookd_http_requests_total"}
    assert requests[("route", "/predict"), ("status", "2xx")] == 1
    assert requests[("route", "/jobs/{job_id}"), ("status", "2xx")] == 1
    assert requests[("route", "other"), ("status", "4xx")] == 2  # unknown paths: one label, however many
    assert samples["webhookd_http_request_duration_seconds_count", (("route", "/predict"),)] == 1


def test_histogram_buckets_are_cumulative_and_include_their_bound() -> None:
    histogram = webhookd.Histogram((0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 1.0, 7.0):
        histogram.observe(seconds)
    samples = {(s.name, s.labels.get("le")): s.value for s in histogram.family("t", "h").samples}
    assert samples == {("t_bucket", "0.1"): 2, ("t_bucket", "1.0"): 4, ("t_bucket", "+Inf"): 5,
                       ("t_count", None): 5, ("t_sum", None): pytest.approx(8.65)}


async def test_metrics_parse_and_answer_are_webhooks_arriving(
    service: TestClient, make_receiver: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhookd.Metrics, "MAX_LABELS", 1)
    flaky, dead = await make_receiver(answer_status(500)), await make_receiver(lambda a, n: web.Response(status=410))
    delivered = (await submit(service, webhook_url=flaky.url()))["job_id"]
    failed = (await submit(service, webhook_url=dead.url().replace("127.0.0.1", "localhost")))["job_id"]
    await wait_for_status(service, delivered, "delivered")
    await wait_for_status(service, failed, "failed")
    text = await (await service.get("/metrics")).text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = metric_samples(text)
    assert families["webhookd_deliveries_finished"].type == "counter"
    assert samples["webhookd_deliveries_finished_total", (("outcome", "delivered"),)] == 1
    assert samples["webhookd_deliveries_finished_total", (("outcome", "failed"),)] == 1
    assert samples["webhookd_delivery_latency_seconds_count", ()] == 1
    assert samples["webhookd_build_info", (("python", platform.python_version()), ("version", webhookd.__version__))] == 1
    receivers = {labels: n for (name, labels), n in samples.items() if name == "webhookd_receiver_attempts_total"}
    assert receivers == {(("receiver", "127.0.0.1"), ("result", "failed")): 1,  # the first receiver has a label
                         (("receiver", "127.0.0.1"), ("result", "ok")): 1,
                         (("receiver", "other"), ("result", "failed")): 1}  # past the bound: "other"


async def test_queue_depth_counts_jobs_in_a_workers_batch(make_service: Callable[..., Any]) -> None:
    model_gate.clear()
    service = await make_service(model="test_webhookd:gated_model", workers=1)
    try:
        for n in range(3):
            await submit(service, f"text {n}")
        assert service.app[webhookd.WORKERS].depth == 3
        metrics = await (await service.get("/metrics")).text()
        assert "webhookd_queue_depth 3" in metrics  # taken by the worker, still waiting on the model
    finally:
        model_gate.set()


def test_linear_vader_scores_every_text_exactly_as_stock_vader() -> None:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    stock, linear = SentimentIntensityAnalyzer(), webhookd._linear_vader()
    draw = random.Random(7)
    words = [*list(stock.lexicon)[:300], "but", "BUT", "not", "no", "never", "very", "kind", "of", "least", "at",
             "so", "this", "without", "doubt", "😀", "😡", "!", "?", "GOOD", "great", "😀😀"]
    for _ in range(2000):
        text = " ".join(draw.choice(words) for _ in range(draw.randint(1, 50)))
        assert linear.polarity_scores(text) == stock.polarity_scores(text), text


def test_vader_checks_read_a_window_not_the_whole_text(monkeypatch: pytest.MonkeyPatch) -> None:
    linear = webhookd._linear_vader()
    seen: list[int] = []
    negation_check = type(linear)._negation_check

    def counting(valence: float, words: list[str], start_i: int, i: int) -> float:
        seen.append(len(words))
        return negation_check(valence, words, start_i, i)

    monkeypatch.setattr(type(linear), "_negation_check", staticmethod(counting))
    linear.polarity_scores("the food was really good and " * 400)
    assert seen and sum(n > 6 for n in seen) <= 15  # only near the two ends: 3 + 2 words, 3 checks each


async def test_emoji_and_long_texts_never_run_on_the_event_loop(
    service: TestClient, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran_on_loop: dict[str, bool] = {}
    predict_all = webhookd.predict_all

    def recording(model: Any, texts: list[str]) -> list[Any]:
        for text in texts:
            ran_on_loop[text] = threading.current_thread() is threading.main_thread()
        return predict_all(model, texts)

    monkeypatch.setattr(webhookd, "predict_all", recording)
    for text in ("a short plain review", "😀" * 400, "x" * 600):
        await wait_for_status(service, (await submit(service, text, webhook_url=receiver.url()))["job_id"],
                              "delivered")
    assert ran_on_loop == {"a short plain review": True, "😀" * 400: False, "x" * 600: False}


barrier = threading.Barrier(3, timeout=DEADLINE)


def meets_two_others(text: str) -> dict[str, Any]:
    barrier.wait()  # broken, and so the job failed, unless three texts run at once
    return {"sentiment": "neutral", "confidence": 0.5}


async def test_workers_n_runs_n_texts_of_a_slow_model_at_once(make_service: Callable[..., Any]) -> None:
    service = await make_service(model="test_webhookd:meets_two_others", workers=3)
    outcomes = await service.app[webhookd.WORKERS]._predict(["one", "two", "three"])
    assert outcomes == [{"sentiment": "neutral", "confidence": 0.5}] * 3


def run_and_stop(tmp_path: Path, *args: str, submit_text: str = "") -> tuple[str, str]:
    """Start webhookd, submit a job (its webhook to a closed port), stop it; its stdout and stderr."""
    process = subprocess.Popen(
        [sys.executable, str(HERE / "webhookd.py"), "--port", "0", "--db", str(tmp_path / "run.db"),
         "--allow-private-urls", "--max-retries", "0", *args],
        cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=child_environment(),
    )
    try:
        return _submit_and_stop(process, args, submit_text)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def _submit_and_stop(process: subprocess.Popen[str], args: tuple[str, ...], submit_text: str) -> tuple[str, str]:
    out = ""
    while "Running on" not in out:
        line = process.stdout.readline()
        assert line, process.stderr.read()
        out += line
    url = out.split("Running on ")[1].split()[0]
    key = args[args.index("--api-key") + 1] if "--api-key" in args else None
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    body = json.dumps({"text": submit_text or "a private note", "webhook_url": f"http://127.0.0.1:{_free_port()}/h?token=abc123"})
    request = urllib.request.Request(url + "/predict", data=body.encode(),
                                     headers={"Content-Type": "application/json", **auth})
    job_id = json.load(urllib.request.urlopen(request, timeout=DEADLINE))["job_id"]

    def failed() -> bool:
        status_request = urllib.request.Request(f"{url}/webhooks/{job_id}/status", headers=auth)
        return json.load(urllib.request.urlopen(status_request, timeout=DEADLINE))["delivery_status"] == "failed"

    wait_for(failed)
    process.send_signal(signal.SIGTERM)
    more_out, err = process.communicate(timeout=DEADLINE)
    return out + more_out, err


def test_a_debug_run_logs_no_secret_no_text_and_no_url_query(tmp_path: Path) -> None:
    out, err = run_and_stop(tmp_path, "--log-level", "debug", "--api-key", "key-xyz", "--secret", SECRET,
                            submit_text="my diary entry")
    assert "delivered" in err or "dead-letter" in err  # the attempt was logged
    for never in (SECRET, "key-xyz", "my diary entry", "token=abc123"):
        assert never not in out + err, never
    assert "/h?..." in err


def test_a_generated_secret_is_printed_once_and_logged_never(tmp_path: Path) -> None:
    out, err = run_and_stop(tmp_path, "--log-level", "debug")
    [secret] = [word for word in out.split() if word.startswith("whsec_")]
    assert (out + err).count(secret) == 1


def test_json_log_lines_parse_and_carry_the_attempt(tmp_path: Path) -> None:
    _, err = run_and_stop(tmp_path, "--log-format", "json", "--secret", SECRET)
    lines = [json.loads(line) for line in err.splitlines()]
    assert all(line["time"].endswith("Z") and line["level"] and line["message"] for line in lines)
    [attempt] = [line for line in lines if "attempt" in line]
    assert attempt["level"] == "ERROR"  # the delivery ended in the dead letter: the line to alert on
    assert attempt["url"].endswith("/h?...") and attempt["redelivery"] is False and attempt["job_id"]


def test_text_log_lines_say_their_time_zone(tmp_path: Path) -> None:
    _, err = run_and_stop(tmp_path, "--secret", SECRET)
    assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (INFO|WARNING|ERROR) ", line)
               for line in err.splitlines() if line), err


def test_the_server_options_apply_idle_connections_close_and_requests_are_not_logged(tmp_path: Path) -> None:
    # main() as python webhookd.py runs it, with a keep-alive short enough to wait for.
    start = ("import sys, webhookd; webhookd.SERVER_OPTIONS['keepalive_timeout'] = 0.5;"
             " sys.exit(webhookd.main(sys.argv[1:]))")
    process = subprocess.Popen(
        [sys.executable, "-c", start, "--port", "0", "--db", str(tmp_path / "run.db"), "--secret", SECRET],
        cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_environment(),
    )
    try:
        host, port = ServiceProcess.wait_for_url(process).removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=DEADLINE) as connection:
            connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while not answer.endswith(b"}"):
                answer += connection.recv(4096)
            assert answer.startswith(b"HTTP/1.1 200"), answer
            assert connection.recv(4096) == b"", "the idle connection was not closed"  # recv times out otherwise
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=DEADLINE)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert "Failed to create request handler" not in err, err
    assert "GET /healthz" not in err, err  # the access log is for --log-level debug


async def test_a_malformed_answer_is_one_line_without_the_urls_query(
    service: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    async def answer_garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 2x0 OK\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer_garbage, "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook?token=sekrit-123"
        job_id = (await submit(service, webhook_url=url, retry_policy={"max_retries": 0}))["job_id"]
        status = await wait_for_status(service, job_id, "failed")
    finally:
        server.close()
    error = status["attempts"][0]["error"]
    assert "Bad status line" in error and "\n" not in error, error
    assert "sekrit" not in error and "sekrit" not in caplog.text, (error, caplog.text)


@both_stores
async def test_a_redelivery_is_marked_in_the_log(
    make_service: Callable[..., Any], receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="webhookd")
    service = await make_service()
    job_id = (await submit(service, webhook_url=receiver.url()))["job_id"]
    await wait_for_status(service, job_id, "delivered")
    assert (await service.post(f"/webhooks/{job_id}/redeliver")).status == 202
    await receiver.wait_for(2)
    await wait_until(lambda: asyncio.sleep(0, "redelivery attempt" in caplog.text), "the redelivery's line")
    assert f"redelivery of {job_id} asked for (manual)" in caplog.text


async def test_the_db_and_its_wal_are_readable_by_the_owner_only(service: TestClient, config: Config) -> None:
    await submit(service)
    for suffix in ("", "-wal", "-shm"):
        assert os.stat(config.db + suffix).st_mode & 0o777 == 0o600, suffix


def test_secrets_can_come_from_files_not_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "secret").write_text("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw an-old-plain-secret\n")
    (tmp_path / "key").write_text("key-from-file\n")
    config = webhookd.config_from_args(webhookd.parse_args(
        ["--secret-file", str(tmp_path / "secret"), "--api-key-file", str(tmp_path / "key")]))
    assert config.secrets == (SECRET, "an-old-plain-secret") and config.api_key == "key-from-file"
    with pytest.raises(ValueError, match="--secret or --secret-file, not both"):
        webhookd.config_from_args(webhookd.parse_args(["--secret", "x", "--secret-file", str(tmp_path / "secret")]))
    monkeypatch.setenv("WEBHOOKD_API_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="--api-key-file .*missing"):
        webhookd.config_from_args(webhookd.parse_args([]))


def test_a_boolean_variable_that_is_not_a_boolean_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEBHOOKD_ALLOW_PRIVATE_URLS", "maybe")
    with pytest.raises(ValueError, match="WEBHOOKD_ALLOW_PRIVATE_URLS must be true or false"):
        webhookd.config_from_args(webhookd.parse_args([]))
    monkeypatch.setenv("WEBHOOKD_ALLOW_PRIVATE_URLS", "off")
    assert not webhookd.config_from_args(webhookd.parse_args([])).allow_private_urls


def test_listening_beyond_loopback_without_an_api_key_warns(tmp_path: Path) -> None:
    _, err = run_and_stop(tmp_path, "--host", "0.0.0.0", "--secret", SECRET)
    assert "without --api-key" in err
    _, err = run_and_stop(tmp_path, "--secret", SECRET)
    assert "without --api-key" not in err


def test_an_old_python_is_refused_in_one_line() -> None:
    with pytest.raises(SystemExit, match="needs Python 3.10 or newer; this is Python 3.9"):
        webhookd.require_python((3, 9))
    webhookd.require_python((3, 10))


def test_version_is_printed() -> None:
    done = subprocess.run([sys.executable, str(HERE / "webhookd.py"), "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == f"webhookd {webhookd.__version__}"


async def test_a_plain_secret_verifies_with_a_standard_webhooks_library_given_its_bytes(
    make_service: Callable[..., Any], receiver: Receiver
) -> None:
    service = await make_service(secrets=("plain-old-secret",))
    await submit(service, webhook_url=receiver.url())
    [arrival] = await receiver.wait_for(1)
    # The libraries read a string as whsec_<base64>: refused as base64 (a ValueError), or a wrong key.
    with pytest.raises((WebhookVerificationError, ValueError)):
        Webhook("plain-old-secret").verify(arrival.body, arrival.headers)
    Webhook(b"plain-old-secret").verify(arrival.body, arrival.headers)  # as the README says


async def test_an_idempotent_replay_takes_2_and_2_0_as_one_number(service: TestClient) -> None:
    headers = {"Idempotency-Key": "numbers"}
    first = await service.post("/predict", headers=headers, json={"text": "a", "retry_policy": {"backoff_factor": 2}})
    again = await service.post("/predict", headers=headers, json={"text": "a", "retry_policy": {"backoff_factor": 2.0}})
    assert again.status == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert (await again.json()) == (await first.json())


async def test_the_start_up_line_counts_what_it_resumes(
    make_service: Callable[..., Any], make_receiver: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="webhookd")
    receiver = await make_receiver(lambda arrival, n: web.Response(status=500))
    first = await make_service(retry=replace(FAST, backoff_base=0.3, max_retries=5))
    job_id = (await submit(first, webhook_url=receiver.url()))["job_id"]
    await wait_for_status(first, job_id, "retrying")
    await first.close()
    caplog.clear()
    await make_service(retry=replace(FAST, max_retries=5))
    assert "resuming 0 jobs and 1 deliveries" in caplog.text  # due at once, and counted all the same


model_gate = threading.Event()


def gated_model(text: str) -> dict[str, Any]:
    model_gate.wait(DEADLINE)
    return {"sentiment": "neutral", "confidence": 0.5}


async def test_past_the_backlog_predict_is_shed_with_503_and_retry_after(make_service: Callable[..., Any]) -> None:
    model_gate.clear()
    service = await make_service(model="test_webhookd:gated_model", workers=1, max_backlog=2)
    try:
        accepted = [(await submit(service, f"text {n}"))["job_id"] for n in range(2)]
        shed = await service.post("/predict", json={"text": "one too many"})
        assert shed.status == 503 and shed.headers["Retry-After"] == "1"
        assert "--max-backlog" in (await shed.json())["error"]
        assert "webhookd_jobs_shed_total 1" in await (await service.get("/metrics")).text()
    finally:
        model_gate.set()
    for job_id in accepted:  # nothing accepted is shed
        await wait_until(lambda: job_status(service, job_id, "completed"), "an accepted job to complete")
    await submit(service, "room again")


@both_stores
async def test_retention_deletes_finished_jobs_and_never_one_under_way(
    make_service: Callable[..., Any], make_receiver: Callable[..., Any], config: Config
) -> None:
    service = await make_service(retry=replace(FAST, backoff_base=600))
    ok, failing = await make_receiver(), await make_receiver(lambda arrival, n: web.Response(status=500))
    done = [(await submit(service, webhook_url=ok.url()))["job_id"] for _ in range(3)]
    plain = (await submit(service))["job_id"]
    retrying = (await submit(service, webhook_url=failing.url()))["job_id"]
    for job_id in done:
        await wait_for_status(service, job_id, "delivered")
    await wait_for_status(service, retrying, "retrying")
    await wait_until(lambda: job_status(service, plain, "completed"), "the plain job")
    store = service.app[webhookd.STORE]
    assert await store.delete_finished(time.time() - 3600, 10) == 0  # none is an hour old
    deleted = 0
    while batch := await store.delete_finished(time.time() + 1, 2):  # batches of two
        deleted += batch
    assert deleted == 4
    remaining = await query(config.db, "SELECT id FROM jobs")
    assert remaining == [(retrying,)]  # its delivery is under way
    assert await query(config.db, "SELECT count(*) FROM attempts WHERE job_id <> ?", retrying) == [(0,)]
    assert (await service.get(f"/jobs/{done[0]}")).status == 404


async def test_the_sqlite_file_stops_growing_when_retention_keeps_pace(tmp_path: Path) -> None:
    store = await webhookd.open_store(str(tmp_path / "steady.db"), webhookd.Loops(), 2.0)
    await store.take_over(10)

    async def a_day_of_jobs() -> int:
        jobs = [webhookd.Job(webhookd.new_job_id(), "a review " * 20, "https://example.com/hook", None, 0.0)
                for _ in range(2000)]
        await asyncio.gather(*map(store.add_job, jobs))  # one group commit, as under load
        await store.record_results([(job, '{"sentiment": "neutral"}', None, b"{}" * 80) for job in jobs], time.time())
        await asyncio.gather(*(store.record_attempt(job.id, 1, time.time(), 0.01, 200, None, "delivered", None)
                               for job in jobs))
        await store._change("PRAGMA wal_checkpoint(TRUNCATE)", ())
        return os.path.getsize(tmp_path / "steady.db")

    try:
        first = await a_day_of_jobs()
        await store.delete_finished(time.time() + 1, 5000)
        second = await a_day_of_jobs()
        await store.delete_finished(time.time() + 1, 5000)
        third = await a_day_of_jobs()
    finally:
        await store.close()
    assert first > 0 and second <= first * 1.05 and third <= first * 1.05, (first, second, third)


def test_a_full_disk_is_a_503_reads_go_on_and_it_carries_on_when_it_clears(tmp_path: Path) -> None:
    import resource

    def small_files() -> None:  # SIGXFSZ is ignored by Python itself, so a write past it fails
        resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, resource.RLIM_INFINITY))

    process = subprocess.Popen(
        [sys.executable, str(HERE / "webhookd.py"), "--port", "0", "--db", str(tmp_path / "small.db"),
         "--secret", SECRET, "--log-level", "error", "--failover-after", "1"],
        cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=small_files,
        env=child_environment(),
    )
    try:
        url = ServiceProcess.wait_for_url(process)
        accepted: list[str] = []

        def refused() -> bool:
            answer, body = http(url + "/predict", {"text": "filling the disk " * 40})
            if answer == 202:
                accepted.append(body["job_id"])
                return False
            assert answer == 503 and "cannot be written" in body["error"], body
            return True

        while not refused() and len(accepted) < 5000:
            pass
        assert accepted and http(f"{url}/jobs/{accepted[0]}")[0] == 200  # reads go on
        # A write that fits in the space the WAL already has can still succeed meanwhile and
        # report the store healthy, until the next one that needs more fails.
        wait_for(lambda: refused() and http(url + "/healthz")[0] == 503)
        resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        wait_for(lambda: http(url + "/healthz")[0] == 200)
        assert http(url + "/predict", {"text": "room again"})[0] == 202
        for job_id in accepted:  # nothing accepted is lost, nothing half-written
            wait_for(lambda: http(f"{url}/jobs/{job_id}")[1]["status"] == "completed")
        assert process.poll() is None
    finally:
        process.kill()
        process.communicate()


def http(url: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=DEADLINE) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def wait_for(check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


async def test_a_db_file_deleted_under_it_is_a_503_and_healthz_says_so(service: TestClient, config: Config) -> None:
    job_id = (await submit(service))["job_id"]
    os.remove(config.db)
    health = await service.get("/healthz")
    assert health.status == 503 and "has gone" in (await health.json())["error"]
    refused = await service.post("/predict", json={"text": "into an unlinked file?"})
    assert refused.status == 503 and refused.headers["Retry-After"]
    assert (await service.get(f"/jobs/{job_id}")).status == 200


async def test_every_job_acknowledged_around_a_deleted_wal_survives_kill_9(tmp_path: Path) -> None:
    db = str(tmp_path / "webhookd.db")
    child = ServiceProcess(db)
    acknowledged = []

    async def submit_until_accepted(n: int) -> None:
        async def accepted() -> bool:
            response = await asyncio.to_thread(http, child.url + "/predict", {"text": f"text {n}"})
            if response[0] == 202:
                acknowledged.append(response[1]["job_id"])
            return response[0] == 202

        await wait_until(accepted, f"job {n} to be accepted")

    try:
        for n in range(10):
            await submit_until_accepted(n)
        os.remove(db + "-wal")
        for n in range(10, 40):
            await submit_until_accepted(n)
        assert http(child.url + "/healthz")[0] == 200
    finally:
        child.process.kill()
        _, err = child.process.communicate()
    kept = {job_id for (job_id,) in await query(db, "SELECT id FROM jobs")}
    assert set(acknowledged) <= kept, f"{len(set(acknowledged) - kept)} acknowledged jobs lost"
    assert err.count("-wal was deleted under webhookd") == 1 and "Traceback" not in err, err


async def test_running_out_of_file_descriptors_is_not_charged_to_the_receiver(
    service: TestClient, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = service.app[webhookd.ENGINE]._session
    post, failures = session.post, [OSError(errno.EMFILE, "Too many open files")] * 3

    def out_of_files(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return post(*args, **kwargs)

    monkeypatch.setattr(session, "post", out_of_files)
    monkeypatch.setattr(webhookd, "OUT_OF_FILES_PAUSE", 0.02)
    job_id = (await submit(service, webhook_url=receiver.url()))["job_id"]
    status = await wait_for_status(service, job_id, "delivered")
    assert [(a["attempt"], a["success"]) for a in status["attempts"]] == [(1, True)]


async def test_idle_keep_alive_connections_are_bounded(make_service: Callable[..., Any],
                                                       make_receiver: Callable[..., Any]) -> None:
    service = await make_service(max_in_flight=2)
    receivers = [await make_receiver() for _ in range(5)]
    for receiver in receivers:
        await wait_for_status(service, (await submit(service, webhook_url=receiver.url()))["job_id"], "delivered")
    connector = service.app[webhookd.ENGINE]._session.connector
    assert sum(map(len, connector._conns.values())) <= 2


async def test_an_upload_cut_off_is_a_quiet_400_and_a_body_that_never_comes_a_408(
    make_service: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    service = await make_service(timeout=0.5)
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    reader, writer = await asyncio.open_connection(service.server.host, service.server.port)
    writer.write(head + b'{"text": "ab')
    await writer.drain()
    writer.close()  # the client goes away mid-body
    reader, writer = await asyncio.open_connection(service.server.host, service.server.port)
    writer.write(head + b'{"text": "ab')  # ... and this one never sends the rest
    answer = await asyncio.wait_for(reader.read(), DEADLINE)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.5 s" in answer
    assert "unexpected error" not in caplog.text and "Traceback" not in caplog.text


async def test_a_compressed_body_is_refused_unread(service: TestClient) -> None:
    bomb = gzip.compress(b" " * 10_000_000)
    response = await service.post("/predict", data=bomb, headers={"Content-Type": "application/json",
                                                                 "Content-Encoding": "gzip"})
    assert response.status == 415 and "Content-Encoding" in (await response.json())["error"]


async def test_one_address_cannot_hold_every_request_slot(
    make_service: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhookd, "MAX_REQUESTS_PER_ADDRESS", 2)
    service = await make_service()
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    slow = [await asyncio.open_connection(service.server.host, service.server.port) for _ in range(2)]
    for _, writer in slow:
        writer.write(head + b"{")
        await writer.drain()
    await wait_until(lambda: asyncio.sleep(0, sum(service.app[webhookd.REQUESTS_BY_ADDRESS].values()) == 2),
                     "both slow requests to be in the handler")
    refused = await service.post("/predict", json={"text": "hi"})
    assert refused.status == 429 and refused.headers["Retry-After"] == "1"
    for _, writer in slow:
        writer.close()
    await wait_until(lambda: asyncio.sleep(0, not service.app[webhookd.REQUESTS_BY_ADDRESS]), "the slots to free")
    assert (await service.post("/predict", json={"text": "hi"})).status == 202


def test_the_open_file_limit_is_raised_to_the_hard_one() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 1024), hard))
    webhookd._raise_file_limit(Config())
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard


async def test_a_large_backlog_is_read_a_page_at_a_time_and_counted_whole(
    make_service: Callable[..., Any], config: Config
) -> None:
    store = await webhookd.open_store(config.db, webhookd.Loops(), 2.0)
    for n in range(3 * webhookd.RESUME_PAGE):
        await store.add_job(webhookd.Job(webhookd.new_job_id(), f"left over {n}", None, None, time.time()))
    await store.close()
    model_gate.clear()
    service = await make_service(model="test_webhookd:gated_model", workers=1, max_backlog=2 * webhookd.RESUME_PAGE)
    try:
        workers = service.app[webhookd.WORKERS]
        await wait_until(lambda: asyncio.sleep(0, workers.queue.qsize() > 0), "the first page")
        assert workers.queue.qsize() <= webhookd.RESUME_PAGE  # texts in memory: a page
        assert workers.depth == 3 * webhookd.RESUME_PAGE
        assert (await (await service.get("/healthz")).json())["queue_depth"] == 3 * webhookd.RESUME_PAGE
        assert (await service.post("/predict", json={"text": "one more"})).status == 503  # past --max-backlog
    finally:
        model_gate.set()
    await wait_until(lambda: finished_jobs(config.db, 3 * webhookd.RESUME_PAGE), "every page to run")


async def finished_jobs(db: str, count: int) -> bool:
    return await query(db, "SELECT count(*) FROM jobs WHERE status = 'completed'") == [(count,)]


def test_the_openapi_description_is_valid_and_covers_every_route() -> None:
    from openapi_spec_validator import validate

    validate(webhookd.OPENAPI)
    app = create_app(Config())
    routes = {(r.method.lower(), r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}
    described = {(method, path) for path, item in webhookd.OPENAPI["paths"].items() for method in item}
    assert routes == described


async def test_answers_match_the_openapi_description(
    make_service: Callable[..., Any], receiver: Receiver
) -> None:
    from openapi_schema_validator import OAS31Validator

    service = await make_service(api_key="k")
    auth = {"Authorization": "Bearer k"}
    spec = webhookd.OPENAPI

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(spec["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]])
            return {key: inline(value) for key, value in node.items()}
        return [inline(item) for item in node] if isinstance(node, list) else node

    async def check(method: str, path: str, template: str, **kwargs: Any) -> Any:
        response = await service.request(method, path, headers=auth, **kwargs)
        documented = spec["paths"][template][method.lower()]["responses"]
        assert str(response.status) in documented, (path, response.status)
        body = await response.json()
        OAS31Validator(inline(documented[str(response.status)]["content"]["application/json"]["schema"])).validate(body)
        return body

    job_id = (await check("POST", "/predict", "/predict", json={"text": "great", "webhook_url": receiver.url()}))["job_id"]
    await check("POST", "/predict", "/predict", json={"text": ""})
    await wait_until(lambda: delivered(service, job_id, auth), "the delivery")
    await check("GET", f"/jobs/{job_id}", "/jobs/{job_id}")
    await check("GET", "/jobs/job-unknown", "/jobs/{job_id}")
    await check("GET", f"/webhooks/{job_id}/status", "/webhooks/{job_id}/status")
    await check("GET", "/jobs?limit=5", "/jobs")
    await check("GET", "/webhooks/dead-letter", "/webhooks/dead-letter")
    await check("POST", f"/webhooks/{job_id}/redeliver", "/webhooks/{job_id}/redeliver")
    await check("POST", "/webhooks/redeliver", "/webhooks/redeliver", json={"since": "2026-01-01T00:00:00Z", "dry_run": True})
    await check("GET", "/healthz", "/healthz")
    assert (await service.get("/openapi.json")).status == 200  # no key needed


async def delivered(client: TestClient, job_id: str, headers: dict[str, str]) -> bool:
    response = await client.get(f"/webhooks/{job_id}/status", headers=headers)
    return (await response.json())["delivery_status"] == "delivered"


def test_config_reads_flags_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEBHOOKD_WORKERS", "7")
    monkeypatch.setenv("WEBHOOKD_MAX_RETRIES", "5")
    monkeypatch.setenv("WEBHOOKD_ALLOW_PRIVATE_URLS", "true")
    config = webhookd.config_from_args(webhookd.parse_args(["--max-retries", "2", "--secret", f"{SECRET} {'b' * 16}"]))
    assert config.workers == 7 and config.retry.max_retries == 2 and config.allow_private_urls
    assert config.secrets == (SECRET, "b" * 16)
    monkeypatch.setenv("WEBHOOKD_PORT", "8123")
    monkeypatch.setenv("WEBHOOKD_SECRET", "a-shared-secret-key")
    receive = webhookd.parse_args(["receive"])
    assert receive.port == 9000 and receive.secret == "a-shared-secret-key"  # never the service's port
    monkeypatch.delenv("WEBHOOKD_PORT")
    defaults = webhookd.config_from_args(webhookd.parse_args(["serve"]))
    assert defaults.port == 8000 and defaults.retry.max_retries == 5
    assert webhookd.retry_schedule(Config().retry) == [1.0, 2.0, 4.0]


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "--workers"), (["--backoff-jitter", "2"], "--backoff-jitter"),
    (["--secret", "whsec_!!"], "--secret"), (["--log-level", "loud"], "--log-level"),
    (["--timeout", "0"], "--timeout"),
])
def test_bad_configuration_says_what_to_fix(args: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        webhookd.config_from_args(webhookd.parse_args(args))


@pytest.mark.parametrize("db", [f"mysql://root:{PASSWORD}@127.0.0.1/jobs", "sqlite:///webhookd.db"])
def test_a_db_url_that_is_not_postgresql_is_refused_in_one_line(db: str) -> None:
    done = run_webhookd("--db", db)
    assert done.returncode != 0 and "Running on" not in done.stdout
    assert done.stderr.count("\n") == 1, done.stderr
    assert "file path" in done.stderr and "postgresql://" in done.stderr and PASSWORD not in done.stderr


@both_stores
async def test_first_start_generates_a_secret_and_reuses_it(
    make_service: Callable[..., Any], receiver: Receiver, config: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    first = await make_service(secrets=())
    await submit(first, webhook_url=receiver.url())
    await receiver.wait_for(1)
    printed = capsys.readouterr().out
    [(secret,)] = await query(config.db, "SELECT value FROM settings WHERE name = 'secret'")
    assert secret.startswith("whsec_") and secret in printed
    Webhook(secret).verify(receiver.arrivals[0].body, receiver.arrivals[0].headers)
    await first.close()
    second = await make_service(secrets=())
    await submit(second, webhook_url=receiver.url())
    await receiver.wait_for(2)
    assert secret not in capsys.readouterr().out
    Webhook(secret).verify(receiver.arrivals[1].body, receiver.arrivals[1].headers)


async def test_receive_command_verifies_fails_first_attempts_and_lists(
    make_service: Callable[..., Any], aiohttp_client: AiohttpClient
) -> None:
    receiver = await aiohttp_client(webhookd.create_receiver([_key(SECRET)], fail_first=1, echo=False))
    service = await make_service()
    accepted = await submit(service, webhook_url=str(receiver.make_url("/callback")))
    await wait_for_status(service, accepted["job_id"], "delivered")
    callbacks = (await (await receiver.get("/callbacks")).json())["callbacks"]
    assert [c["answered"] for c in callbacks] == [500, 200]
    assert all(c["x_signature_ok"] and c["webhook_signature_error"] is None for c in callbacks)
    assert callbacks[0]["headers"]["webhook-id"] == accepted["job_id"]
    assert callbacks[0]["headers"]["X-Signature"].startswith("sha256=")
    forged = await receiver.post("/callback", data=b"{}", headers={"X-Signature": "sha256=00"})
    assert forged.status == 401
    last = (await (await receiver.get("/callbacks")).json())["callbacks"][-1]
    assert last["x_signature_ok"] is False and last["webhook_signature_error"]


@postgres_only
async def test_receive_reads_the_generated_secret_from_postgresql(
    make_service: Callable[..., Any], config: Config
) -> None:
    service = await make_service(secrets=())
    port = _free_port()
    process = subprocess.Popen([sys.executable, str(HERE / "webhookd.py"), "receive", "--db", config.db,
                                "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=child_environment())
    try:
        assert "POST webhooks to" in process.stdout.readline()  # not "none in the db"
        callback = f"http://127.0.0.1:{port}/callback"
        assert await wait_until(lambda: answer_to_unsigned(callback), "the receiver to listen") == 401
        job_id = (await submit(service, webhook_url=callback))["job_id"]
        await wait_for_status(service, job_id, "delivered")  # signed with the secret in the db
    finally:
        process.terminate()
        process.communicate(timeout=DEADLINE)


async def answer_to_unsigned(url: str) -> int | None:
    import aiohttp

    with contextlib.suppress(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as session, session.post(url, data=b"{}") as response:
            return response.status
    return None


# ---------------------------------------------------------------------------
# The benchmark (python webhookd.py bench)
# ---------------------------------------------------------------------------


def run_bench(*args: str, tmp_path: Path | None = None) -> subprocess.CompletedProcess[str]:
    """python webhookd.py bench, off a terminal; with tmp_path, its temporary files go there."""
    env = child_environment() | ({"TMPDIR": str(tmp_path)} if tmp_path else {})
    return subprocess.run([sys.executable, str(HERE / "webhookd.py"), "bench", *args], cwd=HERE,
                          capture_output=True, text=True, timeout=120, env=env)


def bench_figures(out: str) -> dict[str, str]:
    """The report's `name  value` lines, by name, after the line that says what is measured."""
    return dict(line.split(None, 1) for line in out.splitlines()[1:])


def assert_all_delivered_once(done: subprocess.CompletedProcess[str], jobs: int) -> dict[str, str]:
    assert done.returncode == 0 and done.stderr == "", done.stdout + done.stderr
    assert "\r" not in done.stdout  # off a terminal, no progress line
    figures = bench_figures(done.stdout)
    assert re.fullmatch(rf"{jobs} in [\d.]+ s: [\d.]+/s \(busy answers waited out: \d+\)", figures["accepted"])
    assert re.fullmatch(rf"{jobs} in [\d.]+ s: [\d.]+/s", figures["delivered"])
    p50, p90, p99 = (float(ms) for ms in re.findall(r"p(?:50|90|99) ([\d.]+) ms", figures["latency"]))
    assert 0 < p50 <= p90 <= p99
    assert figures["lost"] == "0" and figures["duplicates"] == "0"
    return figures


def test_bench_starts_its_own_service_reports_every_job_delivered_once_and_stops_it(tmp_path: Path) -> None:
    done = run_bench("--start", "-n", "200", "--concurrency", "8", tmp_path=tmp_path)
    assert_all_delivered_once(done, 200)
    url = re.search(r"to (http://\S+) \(started for this run\)", done.stdout.splitlines()[0])[1]
    host, port = url.removeprefix("http://").split(":")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=DEADLINE).close()
    assert list(tmp_path.iterdir()) == []  # its db and folder removed


def test_bench_measures_a_running_service_with_its_api_key(tmp_path: Path) -> None:
    child = ServiceProcess(str(tmp_path / "bench.db"), "--api-key", OPERATOR_KEY)
    try:
        done = run_bench("--url", child.url, "-n", "100", "--api-key", OPERATOR_KEY)
        without_key = run_bench("--url", child.url, "-n", "100")
    finally:
        child.process.kill()
        child.process.communicate()
    assert_all_delivered_once(done, 100)
    assert without_key.returncode == 2 and without_key.stderr.count("\n") == 1
    assert "answered 401" in without_key.stderr and "--api-key" in without_key.stderr


def test_bench_waits_out_a_busy_service_and_sends_the_same_job_again(tmp_path: Path) -> None:
    # Past a backlog of one the service answers 503 with Retry-After; without waiting and sending
    # again, the run would end with an error instead of every job accepted.
    child = ServiceProcess(str(tmp_path / "bench.db"), "--max-backlog", "1", "--workers", "1",
                           "--model", "test_webhookd:ten_ms_model")
    try:
        done = run_bench("--url", child.url, "-n", "24", "--concurrency", "8")
    finally:
        child.process.kill()
        child.process.communicate()
    figures = assert_all_delivered_once(done, 24)
    assert int(re.search(r"busy answers waited out: (\d+)", figures["accepted"])[1]) > 0


async def test_bench_counts_the_webhooks_a_service_loses_and_the_ones_it_repeats(aiohttp_server: AiohttpServer) -> None:
    # A stand-in for webhookd that accepts every job, then sends the webhooks of a third of them
    # never, of a third once and of a third twice.
    import aiohttp

    sending: list[asyncio.Task[None]] = []

    async def send(url: str, job_id: str, copies: int) -> None:
        async with aiohttp.ClientSession() as session:
            for _ in range(copies):
                async with session.post(url, json={"job_id": job_id, "status": "completed"}) as response:
                    assert response.status == 200

    async def predict(request: web.Request) -> web.Response:
        job_id, copies = f"job-{len(sending)}", len(sending) % 3
        sending.append(asyncio.ensure_future(send((await request.json())["webhook_url"], job_id, copies)))
        return web.json_response({"job_id": job_id}, status=202)

    app = web.Application()
    app.router.add_post("/predict", predict)
    server = await aiohttp_server(app)
    done = await asyncio.to_thread(run_bench, "--url", str(server.make_url("/")), "-n", "30", "--wait", "2")
    await asyncio.gather(*sending)
    assert done.returncode == 1, done.stdout + done.stderr
    figures = bench_figures(done.stdout)
    assert figures["delivered"].startswith("20 in ") and figures["lost"] == "10" and figures["duplicates"] == "10"


def test_bench_says_in_one_line_that_it_cannot_reach_the_service() -> None:
    done = run_bench("--url", f"http://127.0.0.1:{_free_port()}", "-n", "10")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert done.stderr.startswith("webhookd bench: cannot reach http://127.0.0.1:") and "Traceback" not in done.stderr


def test_bench_says_in_one_line_that_the_service_refuses_its_loopback_receiver(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, str(HERE / "webhookd.py"), "serve", "--port", "0", "--db", str(tmp_path / "bench.db"),
         "--log-level", "warning"],
        cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_environment(),
    )
    try:
        done = run_bench("--url", ServiceProcess.wait_for_url(process), "-n", "10")
    finally:
        process.kill()
        process.communicate()
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "--allow-private-urls" in done.stderr
