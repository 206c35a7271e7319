"""Generations: clients ask for pictures of a random animal, a worker makes them.

One module over PostgreSQL, read top to bottom: configuration, SQL, errors and metrics, the
image provider, notifications, the worker, the HTTP endpoints, the app.

Endpoints (the full contract is served at /openapi.json):
    POST /generations                 {"numImages": n} -> 202 and the job (Idempotency-Key honoured)
    POST /generations/batch           {"jobs": [{"numImages": n}, ...]} -> 202 and the jobs, in order
    GET  /generations                 newest first; ?status= ?limit= ?cursor=, next page in Link
    GET  /generations/{id}            the job; ?wait=S long-polls until it ends (S <= 60)
    POST /generations/{id}/cancel     pending or processing -> cancelled
    GET  /health, /ready, /metrics, /, /openapi.json

Jobs go pending -> processing -> completed | failed, or pending|processing -> cancelled.
Workers claim jobs with FOR UPDATE SKIP LOCKED, so any number of replicas can share one
database; a claim is a lease that a live worker keeps extending, and every write after the
claim is fenced on the attempt number it claimed, so a job is completed exactly once.

Environment: each field of Settings, upper-cased (DATABASE_URL is required).

Run it with `python app.py`: main() waits for the database, then runs uvicorn and tells the
app the moment SIGTERM arrives.
"""

import asyncio
import base64
import contextlib
import contextvars
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import random
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from functools import partial
from http import HTTPStatus
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple, TypedDict
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp
import asyncpg
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

VERSION = "1.1.0"
HERE = Path(__file__).parent
logger = logging.getLogger("generations")

ANIMALS = (
    "cat", "dog", "elephant", "lion", "tiger", "bear", "giraffe", "zebra", "panda", "koala",
    "fox", "wolf", "rabbit", "deer", "penguin", "owl", "eagle", "dolphin", "whale", "octopus",
)  # fmt: skip
STATUSES = ("pending", "processing", "completed", "failed", "cancelled")
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})

MAX_BODY_BYTES = 64 * 1024
MAX_BATCH_SIZE = 1000
MAX_IDEMPOTENCY_KEY_LENGTH = 255
MAX_WAIT_SECONDS = 60.0
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 50, 200
PUBLIC_PATHS = frozenset({"/", "/health", "/ready", "/openapi.json"})

# Timeouts that keep a lost database from hanging a request: fail fast, answer 503.
CONNECT_TIMEOUT_SECONDS = 3.0
QUERY_TIMEOUT_SECONDS = 4.0
# schema.sql (an index on a large table takes a while) and the wait for the replica applying it
# get this instead: asyncpg reads timeout=None as the query timeout above, not as none.
SCHEMA_TIMEOUT_SECONDS = 24 * 3600.0
# How long a background loop waits after an error before it tries again.
ERROR_BACKOFF_SECONDS = 1.0
# How often the LISTEN connection proves that notifications arrive (a ping it sends itself).
LISTEN_CHECK_SECONDS = 5.0
# When they do not arrive, how long until a new LISTEN connection is tried.
LISTEN_RETRY_SECONDS = 30.0
# Retry backoff: 0.5 s, 1 s, 2 s, ... up to 60 s, each with jitter.
RETRY_BASE_SECONDS, RETRY_MAX_SECONDS = 0.5, 60.0
# Expired jobs are deleted this often, this many per statement: short transactions.
RETENTION_INTERVAL_SECONDS, RETENTION_BATCH_SIZE = 5.0, 1000
# A NOTIFY payload must stay under 8,000 bytes: this many job ids (36 characters and a space).
JOB_IDS_PER_NOTIFICATION = 200
# A provider's answer larger than this is refused, so a misbehaving one cannot exhaust memory.
MAX_PROVIDER_ANSWER_BYTES = 32 << 20
MAX_RETRY_AFTER_SECONDS = 60.0
# The job gauges count exactly up to this many jobs per status, so a scrape stays cheap.
COUNT_LIMIT = 100_000

# The job and attempt a log line is about, or the request it serves (LOG_FORMAT=json shows them).
log_context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("log_context", default={})  # noqa: B039


# --- Configuration -------------------------------------------------------------------------


class ConfigError(ValueError):
    """A setting from the environment is missing or out of range."""


def _setting(default: Any, low: float | None = None, high: float | None = None, choices: tuple = ()) -> Any:
    """A settings field with its default, and the inclusive range or the choices it must be one of."""
    return dataclasses.field(default=default, metadata={"low": low, "high": high, "choices": choices})


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment, read once at startup."""

    database_url: str = ""
    listen_database_url: str = ""  # where the LISTEN connection goes; empty: DATABASE_URL
    host: str = "0.0.0.0"
    port: int = _setting(8000, 1, 65535)
    max_images_per_job: int = _setting(10, 1, 10_000)
    worker_poll_interval: float = _setting(1.0, 0.01, 3600)
    worker_concurrency: int = _setting(20, 0, 10_000)
    job_lease_seconds: float = _setting(30.0, 1, 86_400)
    job_timeout_seconds: float = _setting(120.0, 0.001, 10 * 365 * 86_400)
    job_retention_seconds: float = _setting(604_800.0, 0, 10 * 365 * 86_400)
    max_attempts: int = _setting(3, 1, 100)
    shutdown_grace_seconds: float = _setting(8.0, 0, 3600)  # under the 10 s docker stop waits before SIGKILL
    image_provider: str = _setting("mock", choices=("mock", "http", "openai"))
    image_provider_url: str = ""
    image_provider_api_key: str | None = dataclasses.field(default=None, repr=False)  # never in a log line
    image_provider_model: str = "dall-e-2"
    image_provider_delay: float = _setting(2.0, 0, 3600)
    image_provider_failure_rate: float = _setting(0.0, 0, 1)
    db_pool_min_size: int = _setting(1, 0, 1000)
    db_pool_max_size: int = _setting(10, 1, 1000)
    db_statement_cache_size: int = _setting(100, 0, 100_000)
    database_wait_seconds: float = _setting(30.0, 0, 3600)
    api_token: str | None = None
    cors_origins: tuple[str, ...] = ()
    log_level: str = _setting("INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    log_format: str = _setting("text", choices=("text", "json"))
    enable_debug: bool = False
    debug_port: int = _setting(5678, 1, 65535)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Settings":
        """Read every setting from the environment; unset or empty variables keep their default."""
        raw = {field: env.get(field.name.upper(), "").strip() for field in dataclasses.fields(cls)}
        return cls(**{field.name: _parse_setting(field, text) for field, text in raw.items() if text})

    def __post_init__(self) -> None:
        """Refuse settings the service cannot run with, naming the variable to fix."""
        if not self.database_url:
            raise ConfigError(
                "DATABASE_URL is not set: give it a PostgreSQL URL, postgresql://user:password@host:5432/db"
            )
        for field in dataclasses.fields(self):
            name, value, rule = field.name.upper(), getattr(self, field.name), field.metadata
            if rule.get("low") is not None and not rule["low"] <= value <= rule["high"]:  # NaN fails this too
                raise ConfigError(f"{name} must be between {rule['low']} and {rule['high']}, got {value!r}")
            if value not in (rule.get("choices") or (value,)):
                raise ConfigError(f"{name} must be one of {', '.join(rule['choices'])}, got {value!r}")
            if name.endswith("DATABASE_URL") and value and not is_postgresql_url(value):
                raise ConfigError(f"{name} must be a PostgreSQL URL, postgresql://user:password@host:5432/db")
        if self.image_provider != "mock" and urlsplit(self.image_provider_url).scheme not in ("http", "https"):
            raise ConfigError(f"IMAGE_PROVIDER_URL must be an http(s) URL for IMAGE_PROVIDER={self.image_provider}")
        if 0 < self.job_retention_seconds < 1:
            raise ConfigError("JOB_RETENTION_SECONDS must be 0 (keep every job) or at least 1")
        if self.db_pool_min_size > self.db_pool_max_size:
            raise ConfigError("DB_POOL_MIN_SIZE must not be larger than DB_POOL_MAX_SIZE")


def _parse_setting(field: dataclasses.Field, raw: str) -> object:
    """Turn one environment variable's text into its field's type."""
    name, kind, choices = field.name.upper(), field.type, field.metadata.get("choices")
    if kind is bool:
        if raw.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise ConfigError(f"{name} must be true or false, got {raw!r}")
        return raw.lower() in ("1", "true", "yes", "on")
    if kind is int or kind is float:
        try:
            return kind(raw)  # type: ignore[operator]
        except ValueError:
            raise ConfigError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {raw!r}") from None
    if kind == tuple[str, ...]:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    return next((choice for choice in choices or () if choice.lower() == raw.lower()), raw)


def is_postgresql_url(url: str) -> bool:
    try:
        return urlsplit(url).scheme in ("postgresql", "postgres") and bool(database_address(url))
    except ValueError:  # a port that is not a number
        return False


def database_address(url: str) -> str:
    """The host:port (or socket directory:port) a PostgreSQL URL points at; never its password."""
    parts, query = urlsplit(url), parse_qs(urlsplit(url).query)
    host = query.get("host", [parts.hostname or "localhost"])[0]
    port = str(query.get("port", [parts.port or 5432])[0])  # .port raises ValueError for a bad one
    for number in port.split(","):  # so does int() for a bad ?port= (a list with several hosts)
        int(number)
    return f"{host}:{port}"


# --- SQL -----------------------------------------------------------------------------------
# Every statement the service runs. $n parameters only; the schema is in schema.sql.

# What every statement that returns jobs returns (job_json turns a row into the API's shape).
JOB_COLUMNS = (
    "id, status, num_images, animal, image_urls, error, attempts, created_at, updated_at, completed_at, batch_index"
)

# The hash of the schema.sql the database has. The table is missing before the first start. A 1.0
# replica started since (in a rollout, or a rollback) put its triggers back and left the hash:
# then there is no row, and schema.sql is applied again.
SELECT_SCHEMA_VERSION = """
SELECT version FROM schema_version
WHERE NOT EXISTS (SELECT FROM pg_trigger WHERE tgname IN ('jobs_notify_new', 'jobs_notify_done'))
"""

# Replicas that find the schema outdated apply it one at a time.
LOCK_SCHEMA = "SELECT pg_advisory_xact_lock(hashtext('generations schema'))"

# DDL waits for a lock on jobs behind any open transaction, and every request on jobs queues
# behind the waiting DDL: give up within 50 ms instead, and try again a second later.
LIMIT_LOCK_WAIT = "SET LOCAL lock_timeout = '50ms'"

# Record the schema.sql just applied.
SET_SCHEMA_VERSION = "WITH old AS (DELETE FROM schema_version) INSERT INTO schema_version (version) VALUES ($1)"

# Create a job. A reused Idempotency-Key ($2) violates jobs_idempotency_key: nothing is inserted.
INSERT_JOB = f"INSERT INTO jobs (num_images, idempotency_key) VALUES ($1, $2) RETURNING {JOB_COLUMNS}"

# Create a batch of jobs in one statement, one per element of $1 (numImages), each with its
# position. A reused Idempotency-Key ($2) violates jobs_batch_key: nothing is inserted.
INSERT_BATCH = f"""
INSERT INTO jobs (num_images, batch_key, batch_index)
SELECT item.num_images, $2, item.position - 1 FROM unnest($1::int[]) WITH ORDINALITY AS item(num_images, position)
RETURNING {JOB_COLUMNS}
"""

# The job, or the batch's jobs in order, that an earlier request with this Idempotency-Key made.
# A key names a request to one endpoint: the keys of single and batch POSTs are apart.
SELECT_JOB_BY_KEY = f"SELECT {JOB_COLUMNS} FROM jobs WHERE idempotency_key = $1"
SELECT_BATCH_BY_KEY = f"SELECT {JOB_COLUMNS} FROM jobs WHERE batch_key = $1 ORDER BY batch_index"

# One job by id.
SELECT_JOB = f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"

# One page of jobs, newest first, after the keyset cursor ($1, $2); the first page starts at
# the end of time. Ask for one row more than the page to know if another page follows. Two
# statements, not one with "$4 IS NULL OR": each gets the same plan, custom or generic.
LIST_JOBS = f"""
SELECT {JOB_COLUMNS} FROM jobs
WHERE (created_at, id) < ($1, $2)
ORDER BY created_at DESC, id DESC LIMIT $3
"""

# The same, of one status ($4).
LIST_JOBS_WITH_STATUS = f"""
SELECT {JOB_COLUMNS} FROM jobs
WHERE status = $4 AND (created_at, id) < ($1, $2)
ORDER BY created_at DESC, id DESC LIMIT $3
"""

# Cancel a job that has not ended. No row: the job is unknown or already over.
CANCEL_JOB = f"""
UPDATE jobs SET status = 'cancelled', updated_at = now(), completed_at = now()
WHERE id = $1 AND status IN ('pending', 'processing')
RETURNING {JOB_COLUMNS}
"""

# Claim up to $1 due jobs: pending ones whose retry backoff is over, and processing ones
# whose worker let its lease run out. SKIP LOCKED lets replicas claim side by side without
# waiting on each other's rows; MATERIALIZED makes the locked selection happen exactly once.
# A claim counts an attempt and starts a lease of $2 seconds. A due job with no attempt left
# ($3: its last worker vanished, or MAX_ATTEMPTS was lowered) is failed instead of run.
# `waited` is how long the job had been runnable.
CLAIM_JOBS = """
WITH due AS MATERIALIZED (
    SELECT id, attempts < $3 AS runnable, available_at FROM jobs
    WHERE status IN ('pending', 'processing') AND available_at <= now()
    ORDER BY available_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE jobs
SET status = CASE WHEN runnable THEN 'processing' ELSE 'failed' END,
    attempts = jobs.attempts + runnable::int,
    error = CASE WHEN runnable THEN jobs.error
                 ELSE 'no attempts left: the last attempt was interrupted (its worker stopped)' END,
    completed_at = CASE WHEN runnable THEN NULL ELSE now() END,
    available_at = now() + make_interval(secs => $2), updated_at = now()
FROM due WHERE jobs.id = due.id
RETURNING jobs.id, jobs.attempts, jobs.num_images, runnable, extract(epoch FROM now() - due.available_at) AS waited
"""

# Complete a batch of jobs in one statement (image URLs as JSON text, one per job, since
# arrays of arrays would flatten), and store the pictures that came as bytes ($5-$9). Each
# job counts only if it is still processing under the attempt that produced it: a cancelled
# job, or one whose lease another worker took over, is left alone, and so are its pictures.
# The rows returned are the jobs written.
COMPLETE_JOBS = """
WITH done AS (
    UPDATE jobs
    SET status = 'completed', animal = result.animal, image_urls = result.image_urls::jsonb,
        error = NULL, updated_at = now(), completed_at = now()
    FROM unnest($1::uuid[], $2::int[], $3::text[], $4::text[]) AS result(id, attempt, animal, image_urls)
    WHERE jobs.id = result.id AND jobs.attempts = result.attempt AND jobs.status = 'processing'
    RETURNING jobs.id, jobs.attempts
), stored AS (
    INSERT INTO images (job_id, position, content_type, data)
    SELECT image.job_id, image.position, image.type, image.data
    FROM unnest($5::uuid[], $6::int[], $7::int[], $8::text[], $9::bytea[])
         AS image(job_id, attempt, position, type, data)
    JOIN done ON done.id = image.job_id AND done.attempts = image.attempt
)
SELECT id, attempts FROM done
"""

# A picture the provider sent as bytes.
SELECT_IMAGE = "SELECT content_type, data FROM images WHERE job_id = $1 AND position = $2"

# Record attempts that did not complete (fenced like COMPLETE_JOBS), with the error $4: back
# to pending after $5 seconds while attempts remain below $3, otherwise failed for good. A
# failed attempt waits out its backoff; a job handed back at shutdown waits for nothing.
RETRY_OR_FAIL_JOBS = """
UPDATE jobs
SET status = CASE WHEN jobs.attempts < $3 THEN 'pending' ELSE 'failed' END,
    completed_at = CASE WHEN jobs.attempts < $3 THEN NULL ELSE now() END,
    error = $4, available_at = now() + make_interval(secs => $5), updated_at = now()
FROM unnest($1::uuid[], $2::int[]) AS held(id, attempt)
WHERE jobs.id = held.id AND jobs.attempts = held.attempt AND jobs.status = 'processing'
RETURNING jobs.id, jobs.status
"""

# Extend the leases of the jobs this worker holds. A job missing from the result is no
# longer ours: it was cancelled, or its lease ran out and another worker claimed it.
# The worker gives statements their jobs sorted by id, so that two of its statements lock them
# in the same order and seldom deadlock (when they do, PostgreSQL aborts one; it is retried).
EXTEND_LEASES = """
UPDATE jobs SET available_at = now() + make_interval(secs => $3)
FROM unnest($1::uuid[], $2::int[]) AS held(id, attempt)
WHERE jobs.id = held.id AND jobs.attempts = held.attempt AND jobs.status = 'processing'
RETURNING jobs.id, jobs.attempts
"""

# Delete up to $2 jobs that ended more than $1 seconds ago, and with them their pictures (one
# set-based delete: a cascading foreign key would run a statement per job, 1.75 times slower)
# and Idempotency-Keys; return how many. Their created_at is older still, which lets
# jobs_status_newest find them; SKIP LOCKED: never wait for a row that someone else holds.
DELETE_EXPIRED_JOBS = """
WITH expired AS (
    DELETE FROM jobs WHERE id IN (
        SELECT id FROM jobs
        WHERE status IN ('completed', 'failed', 'cancelled')
          AND created_at < now() - make_interval(secs => $1)
          AND completed_at < now() - make_interval(secs => $1)
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    )
    RETURNING id
), pictures AS (
    DELETE FROM images WHERE job_id IN (SELECT id FROM expired)
)
SELECT count(*) FROM expired
"""

# What /metrics reports of the queue: each count stops at $1, and the age of the oldest
# runnable pending job (NULL: none). Cheap with any backlog: index-only scans, one row read.
COUNT_JOBS = """
SELECT (SELECT count(*) FROM (SELECT FROM jobs WHERE status = 'pending' LIMIT $1) AS p) AS pending,
       (SELECT count(*) FROM (SELECT FROM jobs WHERE status = 'processing' LIMIT $1) AS p) AS processing,
       (SELECT extract(epoch FROM now() - min(available_at)) FROM jobs
        WHERE status = 'pending' AND available_at <= now()) AS oldest_pending_age
"""

# Send notifications: one per element, all in one transaction.
NOTIFY = "SELECT pg_notify(channel, payload) FROM unnest($1::text[], $2::text[]) AS n(channel, payload)"


# --- Errors and metrics ----------------------------------------------------------------------

# What "the database is unreachable" looks like from asyncpg: answered with 503, and
# background loops log it once per outage and try again.
DATABASE_UNAVAILABLE = (
    OSError,  # refused, reset, unreachable; TimeoutError is one too
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # shutting down, starting up, cancelled
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.InterfaceError,  # the connection or the pool closed under us
    asyncpg.exceptions.InternalClientError,  # a connection caught mid-error by a dying server
)


# The titles RFC 9110 gives these statuses, which Python's own took only in 3.13: the same on any Python.
RFC_9110_TITLES = {413: "Content Too Large", 422: "Unprocessable Content"}


def problem(status: int, detail: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """An RFC 9457 problem response; `detail` says what to do about it."""
    title = RFC_9110_TITLES.get(status) or HTTPStatus(status).phrase
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    return JSONResponse(body, status, headers=headers, media_type="application/problem+json")


def reason(error: BaseException) -> str:
    """What went wrong, in a few words: "connection refused", not "[Errno 111] Connect call failed"."""
    if isinstance(error, ConnectionRefusedError | FileNotFoundError):  # a Unix socket with no server: refused
        return "connection refused"
    if isinstance(error, TimeoutError):
        return "timed out"
    return (error.strerror if isinstance(error, OSError) else None) or str(error) or type(error).__name__


class Outage:
    """Says once that the database is unavailable and once that it is back, however often
    requests and background steps fail in between. Other errors are logged each time."""

    def __init__(self, database: str = "the database") -> None:
        self.database = database
        self.since: float | None = None

    def report(self, what: str, error: BaseException) -> None:
        if not isinstance(error, DATABASE_UNAVAILABLE):
            logger.error("%s failed", what, exc_info=error)
        elif self.since is None:
            self.since = time.monotonic()
            logger.warning("%s is unavailable (%s: %s); retrying until it is back", self.database, what, reason(error))

    def over(self) -> None:
        if self.since is not None:
            logger.info("%s is back after %.1fs", self.database, time.monotonic() - self.since)
            self.since = None


async def wait_up_to(seconds: float, event: asyncio.Event) -> None:
    """Wait until the event is set or the time is up. Not asyncio.wait_for: on Python 3.11 it can
    swallow a cancellation that arrives as the event is set, and a task would not stop."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


def about(claim: "Claim") -> dict[str, Any]:
    """What a log line about this attempt carries (LOG_FORMAT=json shows it)."""
    return {"job_id": str(claim.job_id), "attempt": claim.attempt}


async def keep_running(what: str, step: Callable[[], Awaitable[None]], outage: Outage) -> None:
    """Run a background step again and again; a failure is reported, then the step runs again."""
    while True:
        try:
            await step()
        except Exception as error:
            outage.report(what, error)
            await asyncio.sleep(ERROR_BACKOFF_SECONDS)


class Metrics:
    """What /metrics exposes. A registry per app, so that tests can run several apps at once."""

    def __init__(self) -> None:
        self.registry = into = CollectorRegistry()
        slow = (0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600)
        jobs = f"Pending and processing jobs, all replicas; counted up to {COUNT_LIMIT} (that value: at least)"
        self.jobs = Gauge("generations_jobs", jobs, ["status"], registry=into)
        self.oldest_pending_age = Gauge("generations_oldest_pending_age_seconds", "0: none pending", registry=into)
        self.jobs_created = Counter("generations_jobs_created", "Jobs this process created", registry=into)
        self.attempts = Counter("generations_attempts", "Attempts by how they ended", ["result"], registry=into)
        self.job_wait = Histogram("generations_job_wait_seconds", "Runnable to claimed", buckets=slow, registry=into)
        self.job_run = Histogram("generations_job_run_seconds", "One attempt", buckets=slow, registry=into)
        labels = ["method", "route", "status"]
        self.requests = Counter("generations_http_requests", "By route template", labels, registry=into)
        self.request_duration = Histogram(
            "generations_http_request_duration_seconds", "By route", labels[:2], registry=into
        )
        self.listen_connected = Gauge("generations_listen_connected", "0: polling only", registry=into)


# --- The image provider ----------------------------------------------------------------------


class ProviderError(Exception):
    """The provider made no images this time. The attempt is retried, after `retry_after` seconds
    when the provider said so, unless the error is `final`: a request another try cannot fix."""

    def __init__(self, message: str, retry_after: float | None = None, final: bool = False) -> None:
        super().__init__(message)
        self.retry_after, self.final = retry_after, final


# A picture: its URL, or its content type and bytes when the provider sent them (stored in images).
Image = str | tuple[str, bytes]


async def generate_images(
    job_id: uuid.UUID, attempt: int, animal: str, num_images: int, settings: Settings, http: aiohttp.ClientSession
) -> list[str]:
    """Make `num_images` pictures of `animal` with IMAGE_PROVIDER: the one seam between the queue
    and whatever makes the pictures. Each is an http(s) URL or a data:image/...;base64, URI; the
    worker checks the answer. The mock waits without blocking the loop, and fails at the
    configured rate so that retries can be seen."""
    prompt = f"a cute {animal}"
    if settings.image_provider == "http":
        body = {"jobId": str(job_id), "attempt": attempt, "animal": animal, "numImages": num_images, "prompt": prompt}
        answer = await call_provider(http, settings.image_provider_url, job_id, body, settings)
        return answer.get("imageUrls") if isinstance(answer, dict) else answer
    if settings.image_provider == "openai":
        url = f"{settings.image_provider_url.rstrip('/')}/images/generations"
        body = {"model": settings.image_provider_model, "prompt": prompt, "n": num_images, "size": "512x512"}
        answer = await call_provider(http, url, job_id, body, settings)
        try:  # + rather than an f-string: a b64_json that is no string (null, say) is the wrong shape
            return [item.get("url") or "data:image/png;base64," + item["b64_json"] for item in answer["data"]]
        except (TypeError, KeyError, AttributeError):
            return answer  # not the shape asked for: the worker's check says what came
    await asyncio.sleep(settings.image_provider_delay)
    if random.random() < settings.image_provider_failure_rate:
        raise ProviderError("the image provider failed (simulated by IMAGE_PROVIDER_FAILURE_RATE)")
    return [f"https://placehold.co/512x512/png?text=a+cute+{animal}+{i}" for i in range(1, num_images + 1)]


async def call_provider(
    http: aiohttp.ClientSession, url: str, job_id: uuid.UUID, body: dict[str, Any], settings: Settings
) -> Any:
    """POST to the provider and return its JSON answer. Connection errors, 408, 429 and 5xx may
    pass (ProviderError); any other answer but 200 will not (final)."""
    headers = {"Idempotency-Key": str(job_id)}  # lets the provider deduplicate our retries
    if settings.image_provider_api_key:
        headers["Authorization"] = f"Bearer {settings.image_provider_api_key}"
    try:
        async with http.post(url, json=body, headers=headers) as response:
            answer = bytearray()  # grows in place: b"" += would copy it all at every chunk
            async for chunk in response.content.iter_any():  # stop reading a runaway answer early
                answer += chunk
                if len(answer) > MAX_PROVIDER_ANSWER_BYTES:
                    raise ProviderError(f"the provider's answer is larger than {MAX_PROVIDER_ANSWER_BYTES >> 20} MiB")
            if settings.image_provider_api_key:  # an answer that echoes the key must not spread it
                answer = answer.replace(settings.image_provider_api_key.encode(), b"[API key]")
            if response.status == 200:
                return json.loads(answer)
            error = f"the provider answered {response.status}: {answer.decode(errors='replace')[:500]}"
            if response.status in (408, 429) or response.status >= 500:
                raise ProviderError(error, retry_after(response.headers.get("Retry-After", "")))
            raise ProviderError(error, final=True)
    except aiohttp.ClientError as error:
        raise ProviderError(f"the provider could not be reached: {type(error).__name__}: {error}") from None
    except (ValueError, RecursionError):  # RecursionError: nested too deep for the parser
        raise ProviderError("the provider's answer is not JSON") from None


def retry_after(value: str) -> float | None:
    """A Retry-After header (seconds or an HTTP date) in seconds, at most a minute; None if absent or malformed."""
    with contextlib.suppress(TypeError, ValueError):
        if value.strip().isdigit():
            seconds = float(value)
        else:
            seconds = (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds()
        return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)
    return None


def checked_images(images: object, num_images: int) -> list[Image]:
    """The provider's answer if it is what was asked for; one bad row must not fail a whole batch."""
    if not (isinstance(images, list) and len(images) == num_images and all(isinstance(i, str) for i in images)):
        raise ProviderError(f"the provider returned {storable(repr(images))[:200]}, not {num_images} images")
    return [checked_image(image) for image in images]


def checked_image(image: str) -> Image:
    """A picture as the provider gave it: an http(s) URL as is, a data:image/...;base64, URI decoded."""
    media_type, _, data = image.partition(";base64,")
    if re.fullmatch(r"data:image/[\w.+-]{1,100}", media_type, re.ASCII) and data:
        # binascii.Error for bad base64; a plain ValueError for a character outside ASCII.
        with contextlib.suppress(ValueError):
            return media_type.removeprefix("data:"), base64.b64decode(data, validate=True)
    if image.startswith(("https://", "http://")) and storable(image) == image:
        return image
    raise ProviderError(f"the provider returned {storable(image[:100])!r}, not an http(s) URL or an image data URI")


# --- Database --------------------------------------------------------------------------------


async def setup_connection(connection: asyncpg.Connection) -> None:
    """Exchange jsonb columns as Python lists and dicts rather than JSON text."""
    await connection.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def keep_session(connection: asyncpg.Connection) -> None:
    """Give a connection back to the pool as it is: the service leaves no session state on one.

    asyncpg's default reset (RESET ALL, UNLISTEN *, CLOSE ALL, pg_advisory_unlock_all()) would
    cost a second round trip on every request. An open transaction is still rolled back.
    """


async def wait_for_database(settings: Settings) -> bool:
    """Wait up to DATABASE_WAIT_SECONDS for the database to answer, saying so once per try."""
    address = database_address(settings.database_url)
    deadline = time.monotonic() + settings.database_wait_seconds
    while True:
        try:
            await (await asyncpg.connect(settings.database_url, timeout=CONNECT_TIMEOUT_SECONDS)).close()
            return True
        except (*DATABASE_UNAVAILABLE, asyncpg.PostgresError) as error:
            if not isinstance(error, DATABASE_UNAVAILABLE) or time.monotonic() > deadline:
                logger.error("cannot use the database at %s (%s); exiting", address, reason(error))
                return False
            logger.warning("waiting for the database at %s: %s", address, reason(error))
            await asyncio.sleep(ERROR_BACKOFF_SECONDS)


async def open_pool(settings: Settings) -> asyncpg.Pool:
    """The connection pool, with the schema brought up to date."""
    pool = await asyncpg.create_pool(
        settings.database_url,
        min_size=settings.db_pool_min_size,
        max_size=settings.db_pool_max_size,
        timeout=CONNECT_TIMEOUT_SECONDS,
        command_timeout=QUERY_TIMEOUT_SECONDS,
        statement_cache_size=settings.db_statement_cache_size,
        init=setup_connection,
        reset=keep_session,
        server_settings={"application_name": "generations"},
    )
    try:
        await apply_schema(pool)
    except BaseException:
        pool.terminate()
        raise
    return pool


async def apply_schema(pool: asyncpg.Pool) -> None:
    """Apply schema.sql unless the database already has this very file: then no lock is taken."""
    schema = (HERE / "schema.sql").read_text()
    version = hashlib.sha256(schema.encode()).hexdigest()[:16]
    async with pool.acquire() as connection:
        while await schema_version(connection) != version:
            try:
                async with connection.transaction():
                    await connection.execute(LOCK_SCHEMA, timeout=SCHEMA_TIMEOUT_SECONDS)  # another may be applying it
                    if await schema_version(connection) == version:  # it was while we waited: lock nothing
                        break
                    await connection.execute(LIMIT_LOCK_WAIT)
                    await connection.execute(schema, timeout=SCHEMA_TIMEOUT_SECONDS)
                    await connection.execute(SET_SCHEMA_VERSION, version)
                logger.info("applied schema.sql (version %s)", version)
            except asyncpg.LockNotAvailableError:
                logger.warning("schema.sql waits for other transactions on the jobs table; trying again")
                await asyncio.sleep(ERROR_BACKOFF_SECONDS)


async def schema_version(connection: asyncpg.Connection) -> str | None:
    with contextlib.suppress(asyncpg.UndefinedTableError):
        async with connection.transaction():  # in apply_schema's, a savepoint: a missing table must not abort it
            return await connection.fetchval(SELECT_SCHEMA_VERSION)
    return None


async def delete_expired_jobs(pool: asyncpg.Pool, retention_seconds: float) -> None:
    """Delete the jobs that ended longer ago than JOB_RETENTION_SECONDS, a batch at a time."""
    await asyncio.sleep(RETENTION_INTERVAL_SECONDS)
    deleted = RETENTION_BATCH_SIZE
    while deleted == RETENTION_BATCH_SIZE:  # a full batch: more may be waiting
        deleted = await pool.fetchval(DELETE_EXPIRED_JOBS, retention_seconds, RETENTION_BATCH_SIZE, timeout=60)


# --- Notifications -------------------------------------------------------------------------


class Notifications:
    """The process's notifications through PostgreSQL, both ways.

    Out: new runnable jobs and ended jobs are announced after they commit, by one background
    sender that coalesces whatever piled up meanwhile into one transaction. (A NOTIFY inside
    the inserting transaction would make concurrent inserts commit one at a time.)
    In: one LISTEN connection of its own (pool connections drop their listeners on release),
    made again whenever it is lost. `generations_new` wakes the worker; `generations_done`
    carries the ids of ended jobs and wakes the long polls waiting on them. Every few seconds
    it pings itself through the pool: when the ping does not arrive (PgBouncer in transaction
    mode, say), it says so, and the worker relies on polling.
    """

    def __init__(self, settings: Settings, pool: asyncpg.Pool, metrics: Metrics, outage: Outage) -> None:
        self.url = settings.listen_database_url or settings.database_url
        self.poll_interval = settings.worker_poll_interval
        self.pool, self.metrics, self.outage = pool, metrics, outage
        # A LISTEN connection that goes elsewhere and fails is no outage of the pool's database: it
        # must not say that database is down, nor make a shutdown skip handing jobs back.
        elsewhere = Outage(f"LISTEN_DATABASE_URL ({database_address(self.url)})")
        self.listen_outage = outage if self.url == settings.database_url else elsewhere
        self.on_new_job: Callable[[], None] = lambda: None
        self.on_jobs_ended: Callable[[set[str]], None] = lambda job_ids: None
        self.waiters: dict[str, set[asyncio.Event]] = {}
        self.new_jobs = False
        self.ended_jobs: list[str] = []
        self.outbox = asyncio.Event()
        self.nonce = uuid.uuid4().hex
        # At the last ping; None: no connection now (nor yet at the start, when the first may fail).
        self.arriving: bool | None = None

    def jobs_created(self) -> None:
        self.on_new_job()  # this process's worker need not wait for the notification to come back
        self.new_jobs = True
        self.outbox.set()

    def jobs_ended(self, job_ids: Iterable[uuid.UUID]) -> None:
        self.ended_jobs += map(str, job_ids)
        if self.ended_jobs:
            self.outbox.set()

    async def send(self) -> None:
        """Wait for something to announce, then announce everything that is waiting."""
        await self.outbox.wait()
        await self.flush()

    async def flush(self) -> None:
        self.outbox.clear()
        new, ended = self.new_jobs, self.ended_jobs
        self.new_jobs, self.ended_jobs = False, []
        payloads = [
            " ".join(ended[i : i + JOB_IDS_PER_NOTIFICATION]) for i in range(0, len(ended), JOB_IDS_PER_NOTIFICATION)
        ]
        channels = ["generations_done"] * len(payloads) + ["generations_new"] * new
        if not channels:
            return
        try:
            await self.pool.execute(NOTIFY, channels, payloads + [""] * new)
        except BaseException:  # keep them for the next try
            self.new_jobs |= new
            self.ended_jobs[:0] = ended
            self.outbox.set()
            raise

    def wake_all_waiters(self) -> None:
        for events in self.waiters.values():
            for event in events:
                event.set()

    @contextlib.contextmanager
    def watch(self, job_id: uuid.UUID) -> Iterator[asyncio.Event]:
        """An event set whenever the job may have ended, for as long as the block runs."""
        event = asyncio.Event()
        self.waiters.setdefault(str(job_id), set()).add(event)
        try:
            yield event
        finally:
            events = self.waiters[str(job_id)]
            events.discard(event)
            if not events:
                del self.waiters[str(job_id)]

    async def listen(self) -> None:
        """Listen on one connection until it is lost, or until notifications stop arriving on it."""
        connection = await asyncpg.connect(
            self.url, timeout=CONNECT_TIMEOUT_SECONDS, server_settings={"application_name": "generations-listen"}
        )
        try:
            lost, pong = asyncio.Event(), asyncio.Event()
            connection.add_termination_listener(lambda _: lost.set())
            await connection.add_listener("generations_new", lambda *_: self.on_new_job())
            await connection.add_listener("generations_done", self._jobs_done)
            # A listener gets (connection, pid, channel, payload); ours is the ping with our nonce.
            await connection.add_listener("generations_ping", lambda *args: args[-1] == self.nonce and pong.set())
            # Whatever was sent while we were not listening is lost: look again now.
            self.on_new_job()
            self.wake_all_waiters()
            while not lost.is_set():
                pong.clear()
                await self.pool.execute(NOTIFY, ["generations_ping"], [self.nonce])
                self.outage.over()
                self.listen_outage.over()
                await wait_up_to(QUERY_TIMEOUT_SECONDS, pong)
                self._note_arriving(pong.is_set())
                if not pong.is_set():  # try a new connection later; poll meanwhile
                    await asyncio.sleep(LISTEN_RETRY_SECONDS)
                    return
                await wait_up_to(LISTEN_CHECK_SECONDS, lost)
            logger.warning("the notification connection was lost; reconnecting")
        finally:
            if self.arriving:  # until a ping arrives again, long polls look again at each poll interval
                self.arriving = None
            self.metrics.listen_connected.set(0)
            connection.terminate()

    def _note_arriving(self, arriving: bool) -> None:
        """Set the gauge, and log when notifications stop or start arriving."""
        self.metrics.listen_connected.set(arriving)
        if arriving != self.arriving:
            if arriving and self.arriving is False:
                logger.info("notifications arrive again")
            elif not arriving:
                logger.warning(
                    "notifications do not arrive on LISTEN_DATABASE_URL (%s; a PgBouncer in transaction mode?);"
                    " polling every %gs instead", database_address(self.url), self.poll_interval,
                )  # fmt: skip
        self.arriving = arriving

    def _jobs_done(self, connection: object, pid: int, channel: str, payload: str) -> None:
        """Wake the long polls waiting on these jobs, and stop running them (cancelled, say) at once."""
        job_ids = set(payload.split())
        for job_id in job_ids:
            for event in self.waiters.get(job_id, ()):
                event.set()
        self.on_jobs_ended(job_ids)


# --- The worker ----------------------------------------------------------------------------


class Claim(NamedTuple):
    """A job this worker claimed, and the attempt number that fences its writes."""

    job_id: uuid.UUID
    attempt: int
    num_images: int


def fenced(claims: Iterable[Claim]) -> tuple[list[uuid.UUID], list[int]]:
    """The ids and attempts of claims, sorted by id (see EXTEND_LEASES), for a fenced statement."""
    ordered = sorted(claims)
    return [claim.job_id for claim in ordered], [claim.attempt for claim in ordered]


def storable(text: str) -> str:
    """`text` with what PostgreSQL cannot store (NUL characters, lone surrogates) replaced."""
    return text.encode("utf-8", "replace").decode().replace("\x00", "\ufffd")


def retry_delay(attempt: int) -> float:
    """Exponential backoff with jitter: half the step is fixed, half is random."""
    step = min(RETRY_BASE_SECONDS * 2 ** (attempt - 1), RETRY_MAX_SECONDS)
    return step / 2 + random.uniform(0, step / 2)


class Worker:
    """Claims due jobs, runs the provider for each, and records how each attempt ended.

    `held` is the single record of what this process owns: a claim stays there, taking one
    of the WORKER_CONCURRENCY slots and having its lease extended, until its outcome is
    written or it is found lost. No database connection is held while the provider runs.
    Completions are written in batches: whatever finished while the last write was under
    way goes in the next one.
    """

    def __init__(
        self, pool: asyncpg.Pool, settings: Settings, notifications: Notifications, metrics: Metrics, outage: Outage
    ) -> None:
        self.pool, self.settings, self.notifications, self.metrics, self.outage = (
            pool, settings, notifications, metrics, outage,
        )  # fmt: skip
        self.held: dict[Claim, asyncio.Task[None]] = {}
        self.finished: list[tuple[Claim, str, list[str]]] = []
        self.failing: set[Claim] = set()  # failed attempts whose task is writing that outcome
        self.wakeup = asyncio.Event()
        self.results_ready = asyncio.Event()
        self.writing = asyncio.Lock()
        self.stopping = asyncio.Event()
        self.grace_ends = 0.0  # the loop's time when running jobs must have finished (set by stop_claiming)
        # One client for every provider call, with a connection per slot at most.
        connections = aiohttp.TCPConnector(limit=settings.worker_concurrency)
        self.http = aiohttp.ClientSession(connector=connections, timeout=aiohttp.ClientTimeout(total=None))
        notifications.on_new_job = self.wakeup.set
        notifications.on_jobs_ended = lambda ids: self.stop_lost([c for c in self.held if str(c.job_id) in ids])

    def start(self) -> list[asyncio.Task[None]]:
        return [
            asyncio.create_task(self.claim_until_stopped(), name="worker"),
            asyncio.create_task(
                keep_running("recording completed jobs", self.write_results, self.outage), name="writer"
            ),
            asyncio.create_task(keep_running("extending leases", self.keep_leases, self.outage), name="lease keeper"),
        ]

    def stop_claiming(self) -> None:
        """Claim nothing more (the first step of a shutdown, taken as soon as the signal arrives). The grace
        of running jobs counts from now: uvicorn may spend as long again draining open requests first."""
        if not self.stopping.is_set():  # the first signal starts the grace
            self.grace_ends = asyncio.get_running_loop().time() + self.settings.shutdown_grace_seconds
        self.stopping.set()
        self.wakeup.set()

    async def stop(self, tasks: list[asyncio.Task[None]]) -> None:
        """Stop claiming, give running jobs the grace period, write what finished, hand back the rest."""
        claimer, writer, keeper = tasks
        await asyncio.gather(claimer, return_exceptions=True)
        if running := [task for task in self.held.values() if not task.done()]:
            grace = self.settings.shutdown_grace_seconds
            logger.info("shutting down: waiting up to %gs for running jobs: %d", grace, len(running))
            left = max(0.0, self.grace_ends - asyncio.get_running_loop().time())
            _, unfinished = await asyncio.wait(running, timeout=left)
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)
        async with self.writing:  # a write cut in half may still commit: let it end first
            writer.cancel()
        keeper.cancel()
        await asyncio.gather(writer, keeper, return_exceptions=True)
        await self.http.close()
        if self.outage.since is not None:  # each write would wait out its timeouts: leases bring the jobs back
            return
        try:
            if self.finished:  # as the writer does: one by one when PostgreSQL refuses the batch
                await self.write_results()
        except Exception as error:  # their leases will run out and they will be claimed again
            self.outage.report("recording completed jobs at shutdown", error)
        if not self.held:
            return
        try:
            interrupted = "the attempt was interrupted by a shutdown"
            rows = await self.retry_or_fail(list(self.held), interrupted, 0.0, "handed_back")
            self.notifications.jobs_created()  # another replica may start them now
            failed = sum(row["status"] == "failed" for row in rows)
            logger.info(
                "shutting down: unfinished jobs handed back to the queue: %d; failed for want of attempts: %d",
                len(rows) - failed, failed,
            )  # fmt: skip
        except Exception as error:
            self.outage.report("handing back unfinished jobs", error)

    async def claim_until_stopped(self) -> None:
        """Fill free slots with due jobs; sleep until woken or the poll interval passes."""
        while not self.stopping.is_set():
            self.wakeup.clear()
            free = self.settings.worker_concurrency - len(self.held)
            if free > 0:
                try:
                    claimed = await self.claim(free)
                except Exception as error:
                    self.outage.report("claiming jobs", error)
                    await asyncio.sleep(ERROR_BACKOFF_SECONDS)
                    continue
                self.outage.over()
                if claimed == free:  # more may be waiting
                    continue
            await wait_up_to(self.settings.worker_poll_interval, self.wakeup)

    async def claim(self, limit: int) -> int:
        """Claim up to `limit` due jobs and start them; fail those with no attempt left."""
        settings = self.settings
        rows = await self.pool.fetch(CLAIM_JOBS, limit, settings.job_lease_seconds, settings.max_attempts)
        for row in rows:
            if row["runnable"]:
                claim = Claim(row["id"], row["attempts"], row["num_images"])
                self.held[claim] = asyncio.create_task(self.run_job(claim))
                self.metrics.job_wait.observe(float(row["waited"]))
            else:  # failed by the claim: its last attempt was cut short
                self.metrics.attempts.labels("failed").inc()
                self.notifications.jobs_ended([row["id"]])
        return len(rows)

    async def run_job(self, claim: Claim) -> None:
        """Run one attempt: its result joins the next batch; a failure is recorded at once."""
        log_context.set(about(claim))  # every line this task logs is about this attempt
        animal = ANIMALS[claim.job_id.int % len(ANIMALS)]  # random, since ids are; the same on every attempt
        logger.debug("job %s attempt %d: generating %d %s images", *claim, animal)
        timeout, settings = self.settings.job_timeout_seconds, self.settings
        error = ProviderError(f"the attempt timed out after {timeout:g}s (JOB_TIMEOUT_SECONDS)")
        try:
            with self.metrics.job_run.time():
                async with asyncio.timeout(timeout):
                    images = await generate_images(
                        claim.job_id, claim.attempt, animal, claim.num_images, settings, self.http
                    )
            self.finished.append((claim, animal, checked_images(images, claim.num_images)))
            self.results_ready.set()
            return
        except TimeoutError:
            result = "timed_out"
        except Exception as provider_error:  # whatever the provider raises, the attempt failed
            error, result = provider_error, None
        text = storable(str(error) if isinstance(error, ProviderError) else f"{type(error).__name__}: {error}")
        logger.warning("job %s attempt %d failed: %s", claim.job_id, claim.attempt, text)
        final = isinstance(error, ProviderError) and error.final
        delay = getattr(error, "retry_after", None) or retry_delay(claim.attempt)
        del error  # its traceback holds the attempt's frames (a refused answer's buffer): free them now
        self.failing.add(claim)  # the write ends the claim: stop_lost must not take that for a loss
        try:
            await self.retry_or_fail([claim], text, delay, result, final)
        except Exception as db_error:  # the lease will run out and the job will be claimed again
            self.outage.report(f"recording the failure of job {claim.job_id}", db_error)
        self.release(claim)

    async def retry_or_fail(
        self, claims: list[Claim], error: str, delay: float, result: str | None, final: bool = False
    ) -> list[asyncpg.Record]:
        """Send jobs back to pending after `delay`, or fail those with no attempt left (all of them
        if `final`: another try cannot help); the rows written."""
        max_attempts = 0 if final else self.settings.max_attempts
        rows = await self.pool.fetch(RETRY_OR_FAIL_JOBS, *fenced(claims), max_attempts, error, delay)
        for row in rows:
            self.metrics.attempts.labels(result or ("retried" if row["status"] == "pending" else "failed")).inc()
        self.metrics.attempts.labels("lost").inc(len(claims) - len(rows))
        self.notifications.jobs_ended(row["id"] for row in rows if row["status"] == "failed")
        return rows

    async def write_results(self) -> None:
        """Wait for finished jobs, then write all of them at once."""
        if not self.finished:
            self.results_ready.clear()
            await self.results_ready.wait()
        async with self.writing:
            batch = self.finished[:]
            try:
                await self.complete(batch)
            except DATABASE_UNAVAILABLE:
                raise
            except Exception:  # PostgreSQL refuses something in it: one by one, so the rest is written
                for result in batch:
                    await self.complete_or_fail(result)
                return
            del self.finished[: len(batch)]

    async def complete_or_fail(self, result: tuple[Claim, str, list[Image]]) -> None:
        """Complete one job; a result PostgreSQL refuses is a failed attempt, not a stuck writer."""
        claim = result[0]
        try:
            await self.complete([result])
        except DATABASE_UNAVAILABLE:
            raise
        except Exception as error:
            text = storable(f"the result could not be stored: {type(error).__name__}: {error}")
            await self.retry_or_fail([claim], text, retry_delay(claim.attempt), None)
            self.release(claim)
        self.finished.remove(result)

    async def complete(self, batch: list[tuple[Claim, str, list[Image]]]) -> None:
        """Record finished jobs as completed in one statement, with the pictures sent as bytes; free their slots."""
        if not batch:
            return
        ordered = sorted(batch, key=lambda result: result[0])  # by job id: see EXTEND_LEASES
        animals, urls, stored = [], [], []
        for claim, animal, images in ordered:
            paths = [f"/generations/{claim.job_id}/images/{n}" for n in range(1, len(images) + 1)]
            animals.append(animal)
            urls.append(json.dumps([i if isinstance(i, str) else path for i, path in zip(images, paths, strict=True)]))
            stored += [(*claim[:2], n, *i) for n, i in enumerate(images, 1) if not isinstance(i, str)]
        columns = [list(column) for column in zip(*stored, strict=True)] or [[], [], [], [], []]
        rows = await self.pool.fetch(COMPLETE_JOBS, *fenced(c for c, _, _ in ordered), animals, urls, *columns)
        written = {(row["id"], row["attempts"]) for row in rows}
        for claim, _, _ in batch:
            if (claim.job_id, claim.attempt) in written:
                self.metrics.attempts.labels("completed").inc()
            else:
                self.metrics.attempts.labels("lost").inc()
                logger.warning("job %s attempt %d: result dropped, the claim was lost", *claim[:2], extra=about(claim))
            self.release(claim)
        self.notifications.jobs_ended(job_id for job_id, _ in written)

    def release(self, claim: Claim) -> None:
        """Free the claim's slot, and look for more work."""
        self.held.pop(claim, None)
        self.failing.discard(claim)
        self.wakeup.set()

    async def keep_leases(self) -> None:
        """Every third of a lease, extend the leases of held jobs; stop those no longer ours."""
        await asyncio.sleep(self.settings.job_lease_seconds / 3)
        claims = sorted(self.held)
        if claims:
            rows = await self.pool.fetch(EXTEND_LEASES, *fenced(claims), self.settings.job_lease_seconds)
            kept = {(row["id"], row["attempts"]) for row in rows}
            self.stop_lost(claim for claim in claims if (claim.job_id, claim.attempt) not in kept)

    def stop_lost(self, claims: Iterable[Claim]) -> None:
        """Stop running jobs whose claim is lost (cancelled, ended or taken over): their writes would
        be fenced anyway. A finished or failing one's outcome is being written, and that write is fenced too."""
        for claim in claims:
            task = self.held.get(claim)
            if task and not task.done() and claim not in self.failing:
                message = "job %s attempt %d: claim lost (cancelled or taken over), stopping it"
                logger.warning(message, *claim[:2], extra=about(claim))
                task.cancel()
                self.metrics.attempts.labels("lost").inc()
                self.release(claim)


# --- HTTP ----------------------------------------------------------------------------------


def rfc3339(moment: datetime | None) -> str | None:
    """A timestamp as RFC 3339 in UTC, like 2026-11-26T13:00:00.123456Z."""
    return moment and moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def job_json(job: asyncpg.Record) -> dict[str, Any]:
    """A job row in the shape clients see."""
    return {
        "jobId": str(job["id"]),
        "status": job["status"],
        "numImages": job["num_images"],
        "animal": job["animal"],
        "imageUrls": job["image_urls"],
        "error": job["error"],
        "attempts": job["attempts"],
        "createdAt": rfc3339(job["created_at"]),
        "updatedAt": rfc3339(job["updated_at"]),
        "completedAt": rfc3339(job["completed_at"]),
    }


def job_response(job: asyncpg.Record, status: int = 200) -> JSONResponse:
    """A job as the body, and its URL in Location."""
    return JSONResponse(job_json(job), status, headers={"Location": f"/generations/{job['id']}"})


def refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


async def read_json(request: Request) -> Any:
    """The POST body as JSON. Not request.json(): it would read a body of any size and take NaN."""
    body = b""
    try:
        async for chunk in request.stream():  # stop reading as soon as the body is too large
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise HTTPException(413, f"The request body is larger than {MAX_BODY_BYTES // 1024} KiB.")
    except ClientDisconnect:  # the client's doing, not a 500 (no one is left to read the answer)
        raise HTTPException(400, "The request body ended before it was complete.") from None
    kind, _, subtype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower().partition("/")
    if kind != "application" or not (subtype == "json" or subtype.endswith("+json")):
        raise HTTPException(415, "Send the body as JSON, with Content-Type: application/json.")
    try:
        # Python refuses integers over 4,300 digits; cut them to 30, still far out of range.
        return json.loads(body, parse_int=lambda digits: int(digits[:30]), parse_constant=refuse_constant)
    except (ValueError, RecursionError):
        raise HTTPException(400, 'The body is not valid JSON; send {"numImages": 3}.') from None


def read_num_images(item: object, maximum: int, where: str = "") -> int:
    """The validated numImages of one job; `where` names the job within a batch, like jobs[3]."""
    name = f"{where}.numImages" if where else "numImages"
    if not isinstance(item, dict):
        raise HTTPException(422, f'{where or "The body"} must be a JSON object, such as {{"numImages": 3}}.')
    if "numImages" not in item:
        raise HTTPException(422, f"{name} is required: an integer between 1 and {maximum}.")
    num_images = item["numImages"]
    if type(num_images) is not int:  # not bool, float or string
        raise HTTPException(422, f"{name} must be an integer between 1 and {maximum}.")
    if not 1 <= num_images <= maximum:
        raise HTTPException(400, f"{name} must be between 1 and {maximum}")
    return num_images


def read_idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH:
        raise HTTPException(400, f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} characters long.")
    return key


def read_job_id(request: Request) -> uuid.UUID:
    """The job id in the path; a malformed one names no job."""
    try:
        return uuid.UUID(request.path_params["job_id"])
    except ValueError:
        raise HTTPException(404, "Job not found") from None


def read_wait(request: Request) -> float | None:
    """The ?wait= seconds of a long poll, if asked for."""
    raw = request.query_params.get("wait")
    if raw is None:
        return None
    with contextlib.suppress(ValueError):
        wait = float(raw)
        if 0 < wait <= MAX_WAIT_SECONDS:  # NaN fails this too
            return wait
    raise HTTPException(400, f"wait must be a number of seconds above 0 and at most {MAX_WAIT_SECONDS:g}.")


def read_page_size(request: Request) -> int:
    raw = request.query_params.get("limit", str(DEFAULT_PAGE_SIZE))
    if not (raw.isdecimal() and len(raw) <= 3 and 1 <= int(raw) <= MAX_PAGE_SIZE):
        raise HTTPException(400, f"limit must be an integer between 1 and {MAX_PAGE_SIZE}.")
    return int(raw)


def encode_cursor(job: asyncpg.Record) -> str:
    """An opaque cursor that points just past this job in newest-first order."""
    position = f"{job['created_at'].isoformat()}|{job['id']}"
    return base64.urlsafe_b64encode(position.encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> tuple[datetime, uuid.UUID]:
    """The position a cursor points at; no cursor: the end of time, before every job."""
    if cursor is None:
        return datetime.max.replace(tzinfo=UTC), uuid.UUID(int=2**128 - 1)
    try:
        created_at, job_id = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode().split("|")
        moment = datetime.fromisoformat(created_at)
        if moment.tzinfo is None:
            raise ValueError("a cursor's time has a time zone")
        return moment.astimezone(UTC), uuid.UUID(job_id)  # astimezone: out of range raises here, not in SQL
    except (ValueError, OverflowError):
        raise HTTPException(400, "cursor is not valid; use the link in the previous page's Link header.") from None


async def wait_until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def wait_for_job(request: Request, job_id: uuid.UUID, seconds: float) -> asyncpg.Record | None:
    """The job once it has ended, or as it is after `seconds`, at shutdown, or when the client
    leaves. No database connection is held while waiting."""
    state = request.state
    deadline = asyncio.get_running_loop().time() + seconds
    disconnected = asyncio.create_task(wait_until_disconnected(request))
    try:
        with state.notifications.watch(job_id) as maybe_ended:
            disconnected.add_done_callback(lambda _: maybe_ended.set())
            while True:
                maybe_ended.clear()
                job = await state.pool.fetchrow(SELECT_JOB, job_id)
                remaining = deadline - asyncio.get_running_loop().time()
                ended = job is None or job["status"] in TERMINAL_STATUSES
                if ended or remaining <= 0 or disconnected.done() or state.shutting_down.is_set():
                    return job
                if not state.notifications.arriving:  # nothing will wake us: look again at each poll interval
                    remaining = min(remaining, state.settings.worker_poll_interval)
                await wait_up_to(remaining, maybe_ended)
    finally:
        disconnected.cancel()


async def insert_jobs(request: Request, sizes: list[int], batch: bool) -> tuple[list[asyncpg.Record], int]:
    """Create the jobs of one request (202), or find those an earlier request with the same
    Idempotency-Key made (200; 409 if that request asked for something else)."""
    state = request.state
    key = read_idempotency_key(request)
    insert, select = (INSERT_BATCH, SELECT_BATCH_BY_KEY) if batch else (INSERT_JOB, SELECT_JOB_BY_KEY)
    try:
        jobs = await state.pool.fetch(insert, sizes if batch else sizes[0], key)
    except asyncpg.UniqueViolationError:  # the key was used before: the same request gets the same jobs
        jobs = await state.pool.fetch(select, key)
        if [job["num_images"] for job in jobs] != sizes:
            raise HTTPException(409, "This Idempotency-Key was used with a different body; use a new key.") from None
        return jobs, 200
    state.metrics.jobs_created.inc(len(jobs))
    state.notifications.jobs_created()
    return sorted(jobs, key=lambda job: job["batch_index"] or 0), 202


async def create_generation(request: Request) -> Response:
    """POST /generations: queue a job, or replay the one made with this Idempotency-Key."""
    num_images = read_num_images(await read_json(request), request.state.settings.max_images_per_job)
    (job,), status = await insert_jobs(request, [num_images], batch=False)
    return job_response(job, status)


async def create_batch(request: Request) -> Response:
    """POST /generations/batch: validate every job first, then queue them all in one statement."""
    body = await read_json(request)
    items = body.get("jobs") if isinstance(body, dict) else None
    if not isinstance(items, list):
        raise HTTPException(
            422, 'The body must be a JSON object with a list of jobs, such as {"jobs": [{"numImages": 3}]}.'
        )
    if not 1 <= len(items) <= MAX_BATCH_SIZE:
        raise HTTPException(400, f"jobs must hold between 1 and {MAX_BATCH_SIZE} jobs, not {len(items)}.")
    maximum = request.state.settings.max_images_per_job
    sizes = [read_num_images(item, maximum, f"jobs[{i}]") for i, item in enumerate(items)]
    jobs, status = await insert_jobs(request, sizes, batch=True)
    return JSONResponse({"jobs": [job_json(job) for job in jobs]}, status)


async def generations(request: Request) -> Response:
    """/generations: POST creates a job, GET lists them (one route, so that 405 lists both)."""
    return await (create_generation if request.method == "POST" else list_generations)(request)


async def get_generation(request: Request) -> Response:
    """GET /generations/{id}: the job, at once or, with ?wait=, once it has ended."""
    if request.path_params["job_id"] == "batch":  # a GET of POST /generations/batch, not a job
        raise HTTPException(405, headers={"Allow": "POST"})
    job_id = read_job_id(request)
    wait = read_wait(request)
    if wait is None:
        job = await request.state.pool.fetchrow(SELECT_JOB, job_id)
    else:
        job = await wait_for_job(request, job_id, wait)
    if job is None:
        raise HTTPException(404, "Job not found")
    return job_response(job)


async def list_generations(request: Request) -> Response:
    """GET /generations: a page of jobs, newest first; the next page is in the Link header."""
    status = request.query_params.get("status")
    if status is not None and status not in STATUSES:
        raise HTTPException(400, f"status must be one of: {', '.join(STATUSES)}.")
    limit = read_page_size(request)
    after = decode_cursor(request.query_params.get("cursor"))
    pool = request.state.pool
    if status:
        rows = await pool.fetch(LIST_JOBS_WITH_STATUS, *after, limit + 1, status)
    else:
        rows = await pool.fetch(LIST_JOBS, *after, limit + 1)
    page = rows[:limit]
    headers = {}
    if len(rows) > limit:
        query = {"limit": limit, **({"status": status} if status else {}), "cursor": encode_cursor(page[-1])}
        headers["Link"] = f'</generations?{urlencode(query)}>; rel="next"'
    return JSONResponse([job_json(job) for job in page], headers=headers)


async def cancel_generation(request: Request) -> Response:
    """POST /generations/{id}/cancel: stop a job that has not ended yet."""
    job_id = read_job_id(request)
    pool = request.state.pool
    job = await pool.fetchrow(CANCEL_JOB, job_id)
    if job is None:
        job = await pool.fetchrow(SELECT_JOB, job_id)
        if job is None:
            raise HTTPException(404, "Job not found")
        raise HTTPException(
            409, f"The job is already {job['status']}; only pending or processing jobs can be cancelled."
        )
    request.state.notifications.jobs_ended([job_id])
    return job_response(job)


async def get_image(request: Request) -> Response:
    """GET /generations/{id}/images/{n}: a picture the provider sent as bytes; it never changes."""
    job_id, n = read_job_id(request), request.path_params["n"]
    image = await request.state.pool.fetchrow(SELECT_IMAGE, job_id, n) if 1 <= n < 2**31 else None  # an int4
    if image is None:
        raise HTTPException(404, "Image not found")
    headers = {"Cache-Control": "max-age=31536000, immutable"}  # not public: shared caches keep out with a token
    return Response(image["data"], media_type=image["content_type"], headers=headers)


async def health(request: Request) -> Response:
    """GET /health: the process answers. Never touches the database."""
    return JSONResponse({"status": "ok", "version": VERSION})


async def ready(request: Request) -> Response:
    """GET /ready: the database answers, and every background task runs."""
    state = request.state
    down = []
    try:
        await state.pool.fetchval("SELECT 1", timeout=CONNECT_TIMEOUT_SECONDS)
    except Exception as error:
        address = database_address(state.settings.database_url)
        down.append(f"the database at {address} is unavailable ({reason(error)})")
    down += [f"the {task.get_name()} is not running" for task in state.background if task.done()]
    if state.shutting_down.is_set():
        down.append("the service is shutting down")
    if down:
        return problem(503, "Not ready: " + "; ".join(down) + ".", {"Retry-After": "2"})
    return JSONResponse({"status": "ready", "version": VERSION})


async def prometheus_metrics(request: Request) -> Response:
    """GET /metrics: the Prometheus text format; the queue's gauges are read from the database now."""
    state = request.state
    counts = await state.pool.fetchrow(COUNT_JOBS, COUNT_LIMIT)
    state.metrics.jobs.labels("pending").set(counts["pending"])
    state.metrics.jobs.labels("processing").set(counts["processing"])
    state.metrics.oldest_pending_age.set(counts["oldest_pending_age"] or 0)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def root(request: Request) -> Response:
    """GET /: what this is, and where its API is described."""
    message = "Generations: ask for pictures of a random animal."
    return JSONResponse({"message": message, "version": VERSION, "docs": "/openapi.json"})


async def openapi(request: Request) -> Response:
    return JSONResponse(request.state.openapi)


async def http_error(request: Request, error: HTTPException) -> Response:
    """Routing and validation errors as problem responses, with a detail a person can act on."""
    detail = error.detail
    if error.status_code == 404 and detail == "Not Found":
        detail = f"There is no {request.url.path}; the endpoints are listed at /openapi.json."
    elif error.status_code == 405:  # Starlette lists the methods from a set: in any order
        error.headers["Allow"] = ", ".join(sorted(error.headers["Allow"].split(", ")))  # type: ignore[index]
        detail = f"{request.method} is not allowed here; use {error.headers['Allow']}."  # type: ignore[index]
    return problem(error.status_code, detail, error.headers)


async def database_unavailable(request: Request, error: Exception) -> Response:
    """A lost database is a 503 the client can retry, not a 500."""
    request.state.outage.report(f"{request.method} {request.url.path}", error)
    return problem(503, "The database is unavailable right now; retry in a few seconds.", {"Retry-After": "2"})


async def internal_error(request: Request, error: Exception) -> Response:
    """Log an unexpected error with a request id the client can quote; leak nothing."""
    request_id = log_context.get().get("request_id")
    # In the message, not only in log_context: the text format shows no request_id field.
    logger.error("%s %s failed (request id %s)", request.method, request.url.path, request_id, exc_info=error)
    return problem(500, f"Something went wrong on our side; quote request id {request_id} when reporting it.")


class Observe:
    """Count and time every request by its route template (never an id), and give its log lines
    a request id: the client's X-Request-ID, or a new one."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        log_context.set({"request_id": Headers(scope=scope).get("x-request-id") or uuid.uuid4().hex})
        started, status = time.perf_counter(), 500

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")  # set by Starlette's router
            self.metrics.requests.labels(scope["method"], route, status).inc()
            self.metrics.request_duration.labels(scope["method"], route).observe(time.perf_counter() - started)


class BearerAuth:
    """Require `Authorization: Bearer <API_TOKEN>` on every path but the public ones."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS:
            scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
            # The scheme is case-insensitive (RFC 9110); the token is compared in constant time.
            if not (hmac.compare_digest(token, self.token) and scheme.lower() == b"bearer"):
                detail = "Send the API token as Authorization: Bearer <token>."
                return await problem(401, detail, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        await self.app(scope, receive, send)


# --- The app -------------------------------------------------------------------------------


class State(TypedDict):
    """What the lifespan shares with every request, as request.state.<name>."""

    settings: Settings
    pool: asyncpg.Pool
    metrics: Metrics
    outage: Outage
    notifications: Notifications
    background: list[asyncio.Task[None]]
    shutting_down: asyncio.Event
    openapi: dict[str, Any]


class JSONLines(logging.Formatter):
    """LOG_FORMAT=json: each record as one JSON object, with the job or request it is about."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **log_context.get(),
            **{key: getattr(record, key) for key in ("job_id", "attempt") if hasattr(record, key)},
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(settings: Settings) -> None:
    """Every line the process writes, uvicorn's included, through one handler in one format."""
    handler = logging.StreamHandler()
    text = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(JSONLines() if settings.log_format == "json" else text)
    logging.basicConfig(level=settings.log_level, handlers=[handler], force=True)
    # asyncpg's pool would repeat our outage warning every second, with a traceback.
    logging.getLogger("asyncpg.pool").setLevel(logging.ERROR)


def start_debugger(settings: Settings) -> None:
    """Listen for a debugger (debugpy) on DEBUG_PORT, if debugpy is installed."""
    try:
        import debugpy  # type: ignore[import-not-found]
    except ImportError:
        logger.warning("ENABLE_DEBUG is set but debugpy is not installed (pip install debugpy); no debugger")
        return
    debugpy.listen((settings.host, settings.debug_port))
    logger.info("debugger listening on %s:%d", settings.host, settings.debug_port)


@contextlib.asynccontextmanager
async def lifespan(app: Starlette, settings: Settings, metrics: Metrics) -> AsyncIterator[State]:
    """Open the pool, start the background tasks; on the way out, stop them in reverse."""
    if settings.enable_debug:
        start_debugger(settings)
    pool = await open_pool(settings)
    outage = Outage()
    notifications = Notifications(settings, pool, metrics, outage)
    worker = Worker(pool, settings, notifications, metrics, outage) if settings.worker_concurrency else None
    worker_tasks = worker.start() if worker else []
    listen = keep_running("listening", notifications.listen, notifications.listen_outage)
    background = [
        *worker_tasks,
        asyncio.create_task(listen, name="notification listener"),
        asyncio.create_task(keep_running("notifying", notifications.send, outage), name="notification sender"),
    ]
    if settings.job_retention_seconds:
        delete = partial(delete_expired_jobs, pool, settings.job_retention_seconds)
        background.append(asyncio.create_task(keep_running("deleting expired jobs", delete, outage), name="retention"))
    shutting_down = asyncio.Event()

    def begin_shutdown() -> None:
        """Take no more work at once: the worker stops claiming, long polls answer now."""
        shutting_down.set()
        notifications.wake_all_waiters()
        if worker:
            worker.stop_claiming()

    # uvicorn drains open requests before it runs the shutdown below; Server.handle_exit
    # calls this the moment the signal arrives, so long polls do not hold the drain up.
    app.state.begin_shutdown = partial(asyncio.get_running_loop().call_soon_threadsafe, begin_shutdown)
    logger.info("generations %s ready (worker concurrency %d)", VERSION, settings.worker_concurrency)
    try:
        yield State(
            settings=settings,
            pool=pool,
            metrics=metrics,
            outage=outage,
            notifications=notifications,
            background=background,
            shutting_down=shutting_down,
            openapi=json.loads((HERE / "openapi.json").read_text()),
        )
    finally:
        begin_shutdown()
        if worker:
            await worker.stop(worker_tasks)
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        try:  # what the worker handed back and finished, for the other replicas (not during an outage)
            if outage.since is None:
                await notifications.flush()
        except Exception as error:
            outage.report("notifying at shutdown", error)
        await pool.close()
        logger.info("generations stopped")


def create_app(settings: Settings | None = None) -> Starlette:
    """The Starlette app; with no settings given, they are read from the environment."""
    settings = settings or Settings.from_env()
    metrics = Metrics()
    middleware = [Middleware(Observe, metrics=metrics)]
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=settings.cors_origins,
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
                expose_headers=["Location", "Link", "Retry-After"],
            )
        )
    if settings.api_token:
        middleware.append(Middleware(BearerAuth, token=settings.api_token))
    routes = [
        Route("/", root),
        Route("/health", health),
        Route("/ready", ready),
        Route("/metrics", prometheus_metrics),
        Route("/openapi.json", openapi),
        Route("/generations", generations, methods=["GET", "POST"]),
        Route("/generations/batch", create_batch, methods=["POST"]),
        Route("/generations/{job_id}", get_generation),
        Route("/generations/{job_id}/cancel", cancel_generation, methods=["POST"]),
        Route("/generations/{job_id}/images/{n:int}", get_image),
    ]
    handlers = {HTTPException: http_error, Exception: internal_error}
    handlers |= {error: database_unavailable for error in DATABASE_UNAVAILABLE}
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers=handlers,
        lifespan=partial(lifespan, settings=settings, metrics=metrics),
    )


class Server(uvicorn.Server):
    """uvicorn, telling the app as soon as a shutdown signal arrives rather than after requests drain."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        getattr(self.config.app.state, "begin_shutdown", lambda: None)()  # set once the lifespan started
        super().handle_exit(sig, frame)


def main() -> None:
    """Wait for the database, then run the service with uvicorn, configured from the environment."""
    try:
        settings = Settings.from_env()
    except ConfigError as error:
        message = f"generations: configuration error: {error}"
        if os.environ.get("LOG_FORMAT", "").strip().lower() == "json":  # LOG_FORMAT itself was right: keep to it
            message = JSONLines().format(
                logging.makeLogRecord({"name": "generations", "levelname": "ERROR", "msg": message})
            )
        sys.exit(message)
    configure_logging(settings)
    if not asyncio.run(wait_for_database(settings)):
        sys.exit(1)
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,  # uvicorn's loggers go through ours (configure_logging)
        access_log=settings.log_level == "DEBUG",
        timeout_graceful_shutdown=settings.shutdown_grace_seconds,  # type: ignore[arg-type]
    )
    server = Server(config)
    server.run()
    if not server.started:
        sys.exit(1)


if __name__ == "__main__":
    main()
