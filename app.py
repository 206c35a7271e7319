"""Generations: clients ask for pictures of a random animal, a worker makes them.

One module over PostgreSQL, read top to bottom: configuration, SQL, errors, the image
provider, notifications, the worker, the HTTP endpoints, the app.

Endpoints (the full contract is served at /openapi.json):
    POST /generations                 {"numImages": n} -> 202 and the job (Idempotency-Key honoured)
    GET  /generations                 newest first; ?status= ?limit= ?cursor=, next page in Link
    GET  /generations/{id}            the job; ?wait=S long-polls until it ends (S <= 60)
    POST /generations/{id}/cancel     pending or processing -> cancelled
    GET  /health, /ready, /, /openapi.json

Jobs go pending -> processing -> completed | failed, or pending|processing -> cancelled.
Workers claim jobs with FOR UPDATE SKIP LOCKED, so any number of replicas can share one
database; a claim is a lease that a live worker keeps extending, and every write after the
claim is fenced on the attempt number it claimed, so a job is completed exactly once.

Environment: each field of Settings, upper-cased (DATABASE_URL is required).

Run it with `python app.py`: main() runs uvicorn and tells the app the moment SIGTERM arrives.
"""

import asyncio
import base64
import contextlib
import dataclasses
import hmac
import json
import logging
import math
import os
import random
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from datetime import UTC, datetime
from functools import partial
from http import HTTPStatus
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple, TypedDict
from urllib.parse import urlencode

import asyncpg
import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

VERSION = "1.0.0"
HERE = Path(__file__).parent
logger = logging.getLogger("generations")

ANIMALS = (
    "cat", "dog", "elephant", "lion", "tiger", "bear", "giraffe", "zebra", "panda", "koala",
    "fox", "wolf", "rabbit", "deer", "penguin", "owl", "eagle", "dolphin", "whale", "octopus",
)  # fmt: skip
STATUSES = ("pending", "processing", "completed", "failed", "cancelled")
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})

MAX_BODY_BYTES = 64 * 1024
MAX_IDEMPOTENCY_KEY_LENGTH = 255
MAX_WAIT_SECONDS = 60.0
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 50, 200
PUBLIC_PATHS = frozenset({"/", "/health", "/ready"})

# Timeouts that keep a lost database from hanging a request: fail fast, answer 503.
CONNECT_TIMEOUT_SECONDS = 3.0
QUERY_TIMEOUT_SECONDS = 4.0
STARTUP_DATABASE_WAIT_SECONDS = 30.0
# How long a background loop waits after an error before it tries again.
ERROR_BACKOFF_SECONDS = 1.0
# How often the idle LISTEN connection is pinged, so a silently dead one is noticed.
LISTEN_KEEPALIVE_SECONDS = 5.0
# Retry backoff: 0.5 s, 1 s, 2 s, ... up to 60 s, each with jitter.
RETRY_BASE_SECONDS, RETRY_MAX_SECONDS = 0.5, 60.0


# --- Configuration -------------------------------------------------------------------------


class ConfigError(ValueError):
    """A setting from the environment is missing or out of range."""


def _setting(default: Any, low: float | None = None, high: float | None = None) -> Any:
    """A settings field with its default and the inclusive range it must fall in."""
    return dataclasses.field(default=default, metadata={"low": low, "high": high})


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment, read once at startup."""

    database_url: str = ""
    host: str = "0.0.0.0"
    port: int = _setting(8000, 1, 65535)
    max_images_per_job: int = _setting(10, 1, 10_000)
    worker_poll_interval: float = _setting(1.0, 0.01, 3600)
    worker_concurrency: int = _setting(20, 0, 10_000)
    job_lease_seconds: float = _setting(30.0, 1, 86_400)
    max_attempts: int = _setting(3, 1, 100)
    shutdown_grace_seconds: float = _setting(10.0, 0, 3600)
    image_provider_delay: float = _setting(2.0, 0, 3600)
    image_provider_failure_rate: float = _setting(0.0, 0, 1)
    db_pool_min_size: int = _setting(1, 0, 1000)
    db_pool_max_size: int = _setting(10, 1, 1000)
    api_token: str | None = None
    cors_origins: tuple[str, ...] = ()
    log_level: str = "INFO"
    enable_debug: bool = False
    debug_port: int = _setting(5678, 1, 65535)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Settings":
        """Read every setting from the environment; unset or empty variables keep their default."""
        values = {}
        for field in dataclasses.fields(cls):
            raw = env.get(field.name.upper(), "").strip()
            if raw:
                values[field.name] = _parse_setting(field.name.upper(), field.type, raw)
        return cls(**values)

    def __post_init__(self) -> None:
        """Refuse settings the service cannot run with, naming the variable to fix."""
        if not self.database_url:
            raise ConfigError(
                "DATABASE_URL is not set: give it a PostgreSQL URL, postgresql://user:password@host:5432/db"
            )
        for field in dataclasses.fields(self):
            low, high = field.metadata.get("low"), field.metadata.get("high")
            value = getattr(self, field.name)
            if low is not None and not low <= value <= high:
                raise ConfigError(f"{field.name.upper()} must be between {low} and {high}, got {value!r}")
        if self.db_pool_min_size > self.db_pool_max_size:
            raise ConfigError("DB_POOL_MIN_SIZE must not be larger than DB_POOL_MAX_SIZE")
        if self.log_level not in logging.getLevelNamesMapping():
            raise ConfigError(f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")


def _parse_setting(name: str, kind: object, raw: str) -> object:
    """Turn one environment variable's text into its field's type."""
    if kind is bool:
        if raw.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise ConfigError(f"{name} must be true or false, got {raw!r}")
        return raw.lower() in ("1", "true", "yes", "on")
    if kind is int or kind is float:
        try:
            value = kind(raw)  # type: ignore[operator]
        except ValueError:
            raise ConfigError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {raw!r}") from None
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {raw!r}")
        return value
    if kind == tuple[str, ...]:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if name == "LOG_LEVEL":
        return raw.upper()
    return raw


# --- SQL -----------------------------------------------------------------------------------
# Every statement the service runs. $n parameters only; the schema is in schema.sql.

# Take the advisory lock that makes replicas starting together apply schema.sql one by one.
LOCK_SCHEMA = "SELECT pg_advisory_xact_lock(hashtext('generations schema'))"

# Create a job. With an Idempotency-Key that was used before, insert nothing and return no row.
INSERT_JOB = """
INSERT INTO jobs (num_images, idempotency_key) VALUES ($1, $2)
ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING id, status, num_images, animal, image_urls, error, attempts,
          created_at, updated_at, completed_at
"""

# The job created earlier with this Idempotency-Key.
SELECT_JOB_BY_IDEMPOTENCY_KEY = """
SELECT id, status, num_images, animal, image_urls, error, attempts,
       created_at, updated_at, completed_at
FROM jobs WHERE idempotency_key = $1
"""

# One job by id.
SELECT_JOB = """
SELECT id, status, num_images, animal, image_urls, error, attempts,
       created_at, updated_at, completed_at
FROM jobs WHERE id = $1
"""

# One page of jobs, newest first, optionally of one status, after a keyset cursor
# (created_at, id) when one is given. Ask for one row more than the page to know if
# another page follows.
LIST_JOBS = """
SELECT id, status, num_images, animal, image_urls, error, attempts,
       created_at, updated_at, completed_at
FROM jobs
WHERE ($1::text IS NULL OR status = $1)
  AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3::uuid))
ORDER BY created_at DESC, id DESC
LIMIT $4
"""

# Cancel a job that has not ended. No row: the job is unknown or already over.
CANCEL_JOB = """
UPDATE jobs SET status = 'cancelled', updated_at = now(), completed_at = now()
WHERE id = $1 AND status IN ('pending', 'processing')
RETURNING id, status, num_images, animal, image_urls, error, attempts,
          created_at, updated_at, completed_at
"""

# Claim up to $1 due jobs: pending ones whose retry backoff is over, and processing ones
# whose worker let its lease run out. SKIP LOCKED lets replicas claim side by side without
# waiting on each other's rows; MATERIALIZED makes the locked selection happen exactly once.
# The claim counts an attempt and starts a lease of $2 seconds.
CLAIM_JOBS = """
WITH due AS MATERIALIZED (
    SELECT id FROM jobs
    WHERE status IN ('pending', 'processing') AND available_at <= now() AND attempts < $3
    ORDER BY available_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE jobs
SET status = 'processing', attempts = jobs.attempts + 1,
    available_at = now() + make_interval(secs => $2), updated_at = now()
FROM due WHERE jobs.id = due.id
RETURNING jobs.id, jobs.attempts, jobs.num_images
"""

# Complete a batch of jobs in one statement (image URLs as JSON text, one per job, since
# arrays of arrays would flatten). Each row counts only if its job is still
# processing under the attempt that produced it: a cancelled job, or one whose lease
# another worker took over, is left alone. The rows returned are the ones written.
COMPLETE_JOBS = """
UPDATE jobs
SET status = 'completed', animal = done.animal, image_urls = done.image_urls::jsonb,
    error = NULL, updated_at = now(), completed_at = now()
FROM unnest($1::uuid[], $2::int[], $3::text[], $4::text[]) AS done(id, attempt, animal, image_urls)
WHERE jobs.id = done.id AND jobs.attempts = done.attempt AND jobs.status = 'processing'
RETURNING jobs.id, jobs.attempts
"""

# Record a failed attempt (fenced like COMPLETE_JOBS): back to pending after a backoff of
# $5 seconds while attempts remain below $3, otherwise failed for good.
RETRY_OR_FAIL_JOB = """
UPDATE jobs
SET status = CASE WHEN attempts < $3 THEN 'pending' ELSE 'failed' END,
    completed_at = CASE WHEN attempts < $3 THEN NULL ELSE now() END,
    error = $4, available_at = now() + make_interval(secs => $5), updated_at = now()
WHERE id = $1 AND attempts = $2 AND status = 'processing'
RETURNING status
"""

# Extend the leases of the jobs this worker holds. A job missing from the result is no
# longer ours: it was cancelled, or its lease ran out and another worker claimed it.
# Statements given many jobs lock them in the order given, so the worker always gives them
# sorted by id: two of its statements then never deadlock each other.
EXTEND_LEASES = """
UPDATE jobs SET available_at = now() + make_interval(secs => $3)
FROM unnest($1::uuid[], $2::int[]) AS held(id, attempt)
WHERE jobs.id = held.id AND jobs.attempts = held.attempt AND jobs.status = 'processing'
RETURNING jobs.id, jobs.attempts
"""

# Fail jobs that have no attempt left and whose last one was interrupted (its worker vanished,
# or MAX_ATTEMPTS was lowered since): no one may claim them. The extra lease period $2 lets a
# worker that was only cut off from the database write the result it holds first.
FAIL_ABANDONED_JOBS = """
UPDATE jobs
SET status = 'failed', error = 'no attempts left: the last attempt was interrupted (its worker stopped)',
    updated_at = now(), completed_at = now()
WHERE status IN ('pending', 'processing') AND attempts >= $1
  AND available_at < now() - make_interval(secs => $2)
"""

# On shutdown, give the jobs this worker still holds back to the queue at once. The
# interrupted attempt is not counted against the job: the shutdown was not its fault.
HAND_BACK_JOBS = """
UPDATE jobs
SET status = 'pending', attempts = jobs.attempts - 1, available_at = now(), updated_at = now()
FROM unnest($1::uuid[], $2::int[]) AS held(id, attempt)
WHERE jobs.id = held.id AND jobs.attempts = held.attempt AND jobs.status = 'processing'
"""


# --- Errors --------------------------------------------------------------------------------

# What "the database is unreachable" looks like from asyncpg: answered with 503, and
# background loops log it as a warning without a traceback and try again.
DATABASE_UNAVAILABLE = (
    OSError,  # refused, reset, unreachable; TimeoutError is one too
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # shutting down, starting up, cancelled
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.InterfaceError,  # the connection or the pool closed under us
    asyncpg.exceptions.InternalClientError,  # a connection caught mid-error by a dying server
)


def problem(status: int, detail: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """An RFC 9457 problem response; `detail` says what to do about it."""
    body = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status, "detail": detail}
    return JSONResponse(body, status, headers=headers, media_type="application/problem+json")


def log_failure(what: str, error: BaseException) -> None:
    """Log a failed background step: briefly for a lost database, with the traceback otherwise."""
    if isinstance(error, DATABASE_UNAVAILABLE):
        logger.warning("%s failed, database unavailable: %s", what, error or type(error).__name__)
    else:
        logger.error("%s failed", what, exc_info=error)


# --- The image provider ----------------------------------------------------------------------


class ProviderError(Exception):
    """The image provider could not make the images; the attempt will be retried."""


async def generate_images(animal: str, num_images: int, settings: Settings) -> list[str]:
    """Make `num_images` pictures of `animal` and return their URLs.

    This is the seam for a real provider. The mock waits without blocking the loop, and
    fails at the configured rate so that retries can be seen.
    """
    await asyncio.sleep(settings.image_provider_delay)
    if random.random() < settings.image_provider_failure_rate:
        raise ProviderError("the image provider failed (simulated by IMAGE_PROVIDER_FAILURE_RATE)")
    return [f"https://placehold.co/512x512/png?text=a+cute+{animal}+{i}" for i in range(1, num_images + 1)]


# --- Database --------------------------------------------------------------------------------


async def setup_connection(connection: asyncpg.Connection) -> None:
    """Exchange jsonb columns as Python lists and dicts rather than JSON text."""
    await connection.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def keep_session(connection: asyncpg.Connection) -> None:
    """Give a connection back to the pool as it is: the service leaves no session state on one.

    asyncpg's default reset (RESET ALL, UNLISTEN *, CLOSE ALL, pg_advisory_unlock_all()) would
    cost a second round trip on every request. An open transaction is still rolled back.
    """


async def open_database(settings: Settings) -> asyncpg.Pool:
    """Open the pool and apply schema.sql, waiting a little for a database that is starting."""
    deadline = asyncio.get_running_loop().time() + STARTUP_DATABASE_WAIT_SECONDS
    while True:
        pool = asyncpg.create_pool(
            settings.database_url,
            min_size=settings.db_pool_min_size,
            max_size=settings.db_pool_max_size,
            timeout=CONNECT_TIMEOUT_SECONDS,
            command_timeout=QUERY_TIMEOUT_SECONDS,
            init=setup_connection,
            reset=keep_session,
            server_settings={"application_name": "generations"},
        )
        try:
            await pool
            async with pool.acquire() as connection, connection.transaction():
                await connection.execute(LOCK_SCHEMA)
                await connection.execute((HERE / "schema.sql").read_text())
            return pool
        except DATABASE_UNAVAILABLE as error:
            pool.terminate()
            if asyncio.get_running_loop().time() > deadline:
                raise
            logger.warning("waiting for the database: %s", error or type(error).__name__)
            await asyncio.sleep(ERROR_BACKOFF_SECONDS)
        except BaseException:
            pool.terminate()
            raise


# --- Notifications -------------------------------------------------------------------------


class Notifications:
    """The process's one LISTEN connection (schema.sql's triggers send on it).

    `generations_new` wakes the worker; `generations_done` wakes the long polls waiting on
    that job. Pool connections cannot LISTEN (their listeners are dropped on release), so
    this connection is its own, and is made again whenever it is lost.
    """

    def __init__(self, settings: Settings, on_new_job: Callable[[], None]) -> None:
        self.settings = settings
        self.on_new_job = on_new_job
        self.waiters: dict[str, set[asyncio.Event]] = {}
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start listening in the background."""
        self.task = asyncio.create_task(self._listen_forever(), name="notifications")

    async def stop(self) -> None:
        """Stop listening and close the connection."""
        if self.task:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

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

    async def _listen_forever(self) -> None:
        """Listen; after any failure, wait a moment and listen again."""
        while True:
            try:
                await self._listen()
                logger.warning("the notification connection was lost; reconnecting")
            except Exception as error:
                log_failure("listening for notifications", error)
            await asyncio.sleep(ERROR_BACKOFF_SECONDS)

    async def _listen(self) -> None:
        """Listen on one connection until it is lost."""
        connection = await asyncpg.connect(
            self.settings.database_url,
            timeout=CONNECT_TIMEOUT_SECONDS,
            server_settings={"application_name": "generations-listen"},  # easy to find in pg_stat_activity
        )
        try:
            lost = asyncio.Event()
            connection.add_termination_listener(lambda _: lost.set())
            await connection.add_listener("generations_new", lambda *_: self.on_new_job())
            await connection.add_listener("generations_done", self._job_done)
            # Whatever was sent while we were not listening is lost: look again now.
            self.on_new_job()
            for events in self.waiters.values():
                for event in events:
                    event.set()
            while not lost.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), LISTEN_KEEPALIVE_SECONDS)
                if not lost.is_set():
                    await connection.execute("SELECT 1", timeout=QUERY_TIMEOUT_SECONDS)
        finally:
            connection.terminate()

    def _job_done(self, connection: object, pid: int, channel: str, job_id: str) -> None:
        """Wake the long polls waiting on this job."""
        for event in self.waiters.get(job_id, ()):
            event.set()


# --- The worker ----------------------------------------------------------------------------


class Claim(NamedTuple):
    """A job this worker claimed, and the attempt number that fences its writes."""

    job_id: uuid.UUID
    attempt: int
    num_images: int


def checked_urls(urls: object, num_images: int) -> list[str]:
    """The provider's answer if it is what was asked for; one bad row must not fail a whole batch."""
    if (
        isinstance(urls, list)
        and len(urls) == num_images
        and all(isinstance(url, str) and storable(url) == url for url in urls)
    ):
        return urls
    raise ProviderError(f"the provider returned {storable(repr(urls))[:200]}, not {num_images} URLs")


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

    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self.pool = pool
        self.settings = settings
        self.held: dict[Claim, asyncio.Task[None]] = {}
        self.finished: list[tuple[Claim, str, list[str]]] = []
        self.wakeup = asyncio.Event()
        self.results_ready = asyncio.Event()
        self.stopping = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start working in the background."""
        self.task = asyncio.create_task(self.run(), name="worker")

    def stop_claiming(self) -> None:
        """Claim nothing more; running jobs go on."""
        self.stopping.set()
        self.wakeup.set()

    async def stop(self) -> None:
        """Stop claiming, let running jobs finish within the grace period, hand back the rest."""
        self.stop_claiming()
        if self.task:
            await asyncio.gather(self.task, return_exceptions=True)

    def wake(self) -> None:
        """Look for due jobs now rather than at the next poll."""
        self.wakeup.set()

    async def run(self) -> None:
        """Claim and run jobs until stopped; then finish, write and hand back what is left."""
        writer = asyncio.create_task(self._write_results_forever(), name="worker results")
        keeper = asyncio.create_task(self._keep_leases_forever(), name="worker leases")
        try:
            await self._claim_until_stopped()
            await self._let_running_jobs_finish()
        finally:
            for task in (writer, keeper):
                task.cancel()
            await asyncio.gather(writer, keeper, return_exceptions=True)
            await self._write_results()
            await self._hand_back()

    async def _claim_until_stopped(self) -> None:
        """Fill free slots with due jobs; sleep until woken or the poll interval passes."""
        while not self.stopping.is_set():
            self.wakeup.clear()
            free = self.settings.worker_concurrency - len(self.held)
            claims: list[Claim] = []
            if free > 0:
                try:
                    claims = await self._claim(free)
                except Exception as error:
                    log_failure("claiming jobs", error)
                    await asyncio.sleep(ERROR_BACKOFF_SECONDS)
                    continue
            for claim in claims:
                self.held[claim] = asyncio.create_task(self._run_job(claim))
            if free == 0 or len(claims) < free:  # otherwise more may be waiting: claim again
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wakeup.wait(), self.settings.worker_poll_interval)

    async def _claim(self, limit: int) -> list[Claim]:
        """Claim up to `limit` due jobs."""
        rows = await self.pool.fetch(CLAIM_JOBS, limit, self.settings.job_lease_seconds, self.settings.max_attempts)
        return [Claim(row["id"], row["attempts"], row["num_images"]) for row in rows]

    async def _run_job(self, claim: Claim) -> None:
        """Run one attempt: its result joins the next batch; a failure is recorded at once."""
        animal = random.choice(ANIMALS)
        logger.debug("job %s attempt %d: generating %d %s images", *claim, animal)
        try:
            urls = checked_urls(await generate_images(animal, claim.num_images, self.settings), claim.num_images)
        except Exception as error:  # whatever the provider raises, the attempt failed
            logger.warning("job %s attempt %d failed: %s", claim.job_id, claim.attempt, error)
            await self._record_failure(claim, storable(f"{type(error).__name__}: {error}"))
            return
        self.finished.append((claim, animal, urls))
        self.results_ready.set()

    async def _record_failure(self, claim: Claim, error: str) -> None:
        """Send the job back for a retry after a backoff, or fail it when out of attempts."""
        try:
            status = await self.pool.fetchval(
                RETRY_OR_FAIL_JOB, claim.job_id, claim.attempt, self.settings.max_attempts,
                error, retry_delay(claim.attempt),
            )  # fmt: skip
            if status is None:
                logger.warning("job %s attempt %d: failure not recorded, the claim was lost", *claim[:2])
        except Exception as db_error:  # the lease will run out and the job will be claimed again
            log_failure(f"recording the failure of job {claim.job_id}", db_error)
        self._release(claim)

    async def _write_results_forever(self) -> None:
        """Write finished jobs as they come, batching whatever piles up during a write."""
        while True:
            await self.results_ready.wait()
            self.results_ready.clear()
            if not await self._write_results():
                await asyncio.sleep(ERROR_BACKOFF_SECONDS)
                self.results_ready.set()

    async def _write_results(self) -> bool:
        """Write every finished job in one statement; False if it could not be written."""
        batch = self.finished[:]
        if not batch:
            return True
        ordered = sorted(batch)  # by job id: see EXTEND_LEASES
        try:
            written = await self.pool.fetch(
                COMPLETE_JOBS,
                [claim.job_id for claim, _, _ in ordered],
                [claim.attempt for claim, _, _ in ordered],
                [animal for _, animal, _ in ordered],
                [json.dumps(urls) for _, _, urls in ordered],
            )
        except Exception as error:
            log_failure("recording completed jobs", error)
            return False
        del self.finished[: len(batch)]
        kept = {(row["id"], row["attempts"]) for row in written}
        for claim, _, _ in batch:
            if (claim.job_id, claim.attempt) not in kept:
                logger.warning("job %s attempt %d: result dropped, the claim was lost", *claim[:2])
            self._release(claim)
        return True

    def _release(self, claim: Claim) -> None:
        """Free the claim's slot, and look for more work."""
        self.held.pop(claim, None)
        self.wakeup.set()

    async def _keep_leases_forever(self) -> None:
        """Extend held leases three times per lease period; fail jobs abandoned for good."""
        while True:
            await asyncio.sleep(self.settings.job_lease_seconds / 3)
            try:
                await self._extend_leases()
                await self.pool.execute(
                    FAIL_ABANDONED_JOBS, self.settings.max_attempts, self.settings.job_lease_seconds
                )
            except Exception as error:
                log_failure("extending leases", error)

    async def _extend_leases(self) -> None:
        """Extend the lease of every held job; stop working on those that are no longer ours."""
        claims = sorted(self.held)
        if not claims:
            return
        rows = await self.pool.fetch(
            EXTEND_LEASES,
            [claim.job_id for claim in claims],
            [claim.attempt for claim in claims],
            self.settings.job_lease_seconds,
        )
        kept = {(row["id"], row["attempts"]) for row in rows}
        for claim in claims:
            task = self.held.get(claim)
            # A finished task's outcome is being written, and that write is fenced too.
            if (claim.job_id, claim.attempt) not in kept and task and not task.done():
                logger.warning("job %s attempt %d: claim lost (cancelled or taken over), stopping it", *claim[:2])
                task.cancel()
                self._release(claim)

    async def _let_running_jobs_finish(self) -> None:
        """Give running jobs up to the shutdown grace period, then cancel what is left."""
        running = [task for task in self.held.values() if not task.done()]
        if not running:
            return
        grace = self.settings.shutdown_grace_seconds
        logger.info("shutting down: waiting up to %ss for %d running jobs", grace, len(running))
        _, unfinished = await asyncio.wait(running, timeout=grace)
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)

    async def _hand_back(self) -> None:
        """Return every job still held to the queue, so another worker starts it at once."""
        claims = sorted(self.held)
        if not claims:
            return
        try:
            await self.pool.execute(
                HAND_BACK_JOBS, [claim.job_id for claim in claims], [claim.attempt for claim in claims]
            )
            logger.info("shutting down: handed %d unfinished jobs back to the queue", len(claims))
        except Exception as error:  # their leases will run out and they will be claimed again
            log_failure("handing back unfinished jobs", error)
        self.held.clear()


# --- HTTP ----------------------------------------------------------------------------------


def rfc3339(moment: datetime | None) -> str | None:
    """A timestamp as RFC 3339 in UTC, like 2026-11-26T13:00:00.123456Z."""
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


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


def is_json(content_type: str | None) -> bool:
    """True for application/json and application/*+json, whatever the parameters."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json"))


async def read_num_images(request: Request, maximum: int) -> int:
    """The validated numImages of a POST body."""
    body = b""
    async for chunk in request.stream():  # stop reading as soon as the body is too large
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise HTTPException(413, f"The request body is larger than {MAX_BODY_BYTES // 1024} KiB.")
    if not is_json(request.headers.get("content-type")):
        raise HTTPException(415, "Send the body as JSON, with Content-Type: application/json.")
    try:
        # Python refuses integers over 4,300 digits; cut them to 30, still far out of range.
        payload = json.loads(body, parse_int=lambda digits: int(digits[:30]))
    except (ValueError, RecursionError):
        raise HTTPException(400, 'The body is not valid JSON; send {"numImages": 3}.') from None
    if not isinstance(payload, dict):
        raise HTTPException(422, 'The body must be a JSON object, such as {"numImages": 3}.')
    if "numImages" not in payload:
        raise HTTPException(422, f"numImages is required: an integer between 1 and {maximum}.")
    num_images = payload["numImages"]
    if type(num_images) is not int:  # not bool, float or string
        raise HTTPException(422, f"numImages must be an integer between 1 and {maximum}.")
    if not 1 <= num_images <= maximum:
        raise HTTPException(400, f"numImages must be between 1 and {maximum}")
    return num_images


def read_idempotency_key(request: Request) -> str | None:
    """The Idempotency-Key header, if the client sent one."""
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
    try:
        wait = float(raw)
    except ValueError:
        wait = math.nan
    if not 0 < wait <= MAX_WAIT_SECONDS:  # NaN fails this too
        raise HTTPException(400, f"wait must be a number of seconds above 0 and at most {MAX_WAIT_SECONDS:g}.")
    return wait


def read_page_size(request: Request) -> int:
    """The ?limit= of a listing."""
    raw = request.query_params.get("limit", str(DEFAULT_PAGE_SIZE))
    if not (raw.isdecimal() and len(raw) <= 3 and 1 <= int(raw) <= MAX_PAGE_SIZE):
        raise HTTPException(400, f"limit must be an integer between 1 and {MAX_PAGE_SIZE}.")
    return int(raw)


def encode_cursor(job: asyncpg.Record) -> str:
    """An opaque cursor that points just past this job in newest-first order."""
    position = f"{job['created_at'].isoformat()}|{job['id']}"
    return base64.urlsafe_b64encode(position.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """The position an `encode_cursor` cursor points at."""
    try:
        created_at, job_id = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode().split("|")
        moment = datetime.fromisoformat(created_at)
        if moment.tzinfo is None:
            raise ValueError("a cursor's time has a time zone")
        return moment.astimezone(UTC), uuid.UUID(job_id)  # astimezone: out of range raises here, not in SQL
    except (ValueError, OverflowError):
        raise HTTPException(400, "cursor is not valid; use the link in the previous page's Link header.") from None


async def wait_until_disconnected(request: Request) -> None:
    """Return when the client goes away."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def wait_for_job(request: Request, job_id: uuid.UUID, seconds: float) -> asyncpg.Record | None:
    """The job once it has ended, or as it is after `seconds`, at shutdown, or when the client
    leaves. No database connection is held while waiting."""
    state = request.state
    deadline = asyncio.get_running_loop().time() + seconds
    stop_waiting = [
        asyncio.create_task(wait_until_disconnected(request)),
        asyncio.create_task(state.shutting_down.wait()),
    ]
    try:
        with state.notifications.watch(job_id) as maybe_ended:
            while True:
                maybe_ended.clear()
                job = await state.pool.fetchrow(SELECT_JOB, job_id)
                remaining = deadline - asyncio.get_running_loop().time()
                ended = job is None or job["status"] in TERMINAL_STATUSES
                if ended or remaining <= 0 or any(task.done() for task in stop_waiting):
                    return job
                woken = asyncio.create_task(maybe_ended.wait())
                await asyncio.wait({woken, *stop_waiting}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                woken.cancel()
    finally:
        for task in stop_waiting:
            task.cancel()


async def create_generation(request: Request) -> Response:
    """POST /generations: queue a job, or replay the one made with this Idempotency-Key."""
    state = request.state
    num_images = await read_num_images(request, state.settings.max_images_per_job)
    key = read_idempotency_key(request)
    job = await state.pool.fetchrow(INSERT_JOB, num_images, key)
    if job is None:  # the key was used before: the same request gets the same job
        job = await state.pool.fetchrow(SELECT_JOB_BY_IDEMPOTENCY_KEY, key)
        if job["num_images"] != num_images:
            raise HTTPException(409, "This Idempotency-Key was used with a different body; use a new key.")
        return job_response(job, 200)
    if state.worker:
        state.worker.wake()  # no need to wait for our own notification to come back
    return job_response(job, 202)


async def generations(request: Request) -> Response:
    """/generations: POST creates a job, GET lists them."""
    if request.method == "POST":
        return await create_generation(request)
    return await list_generations(request)


async def get_generation(request: Request) -> Response:
    """GET /generations/{id}: the job, at once or, with ?wait=, once it has ended."""
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
    cursor = request.query_params.get("cursor")
    after_created, after_id = decode_cursor(cursor) if cursor is not None else (None, None)
    rows = await request.state.pool.fetch(LIST_JOBS, status, after_created, after_id, limit + 1)
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
    return job_response(job)


async def health(request: Request) -> Response:
    """GET /health: the process answers. Never touches the database."""
    return JSONResponse({"status": "ok", "version": VERSION})


async def ready(request: Request) -> Response:
    """GET /ready: the database answers and the worker runs (when there is one)."""
    state = request.state
    down = []
    try:
        await state.pool.fetchval("SELECT 1", timeout=CONNECT_TIMEOUT_SECONDS)
    except Exception as error:
        down.append(f"the database is unavailable ({error or type(error).__name__})")
    if state.worker and (state.worker.task is None or state.worker.task.done()):
        down.append("the worker is not running")
    if state.shutting_down.is_set():
        down.append("the service is shutting down")
    if down:
        return problem(503, "Not ready: " + "; ".join(down) + ".")
    return JSONResponse({"status": "ready", "version": VERSION})


async def root(request: Request) -> Response:
    """GET /: what this is, and where its API is described."""
    message = "Generations: ask for pictures of a random animal."
    return JSONResponse({"message": message, "version": VERSION, "docs": "/openapi.json"})


async def openapi(request: Request) -> Response:
    """GET /openapi.json: the API description (openapi.json next to this file)."""
    return JSONResponse(request.state.openapi)


async def http_error(request: Request, error: HTTPException) -> Response:
    """Routing and validation errors as problem responses."""
    detail = error.detail
    if error.status_code == 404 and detail == "Not Found":
        detail = f"There is no {request.url.path}; the endpoints are listed at /openapi.json."
    elif error.status_code == 405:
        detail = f"{request.method} is not allowed here; use {error.headers['Allow']}."  # type: ignore[index]
    return problem(error.status_code, detail, error.headers)


async def database_unavailable(request: Request, error: Exception) -> Response:
    """A lost database is a 503 the client can retry, not a 500."""
    logger.warning("%s %s: database unavailable: %s", request.method, request.url.path, error or type(error).__name__)
    return problem(503, "The database is unavailable right now; retry in a few seconds.", {"Retry-After": "2"})


async def internal_error(request: Request, error: Exception) -> Response:
    """Log an unexpected error with a request id the client can quote; leak nothing."""
    request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
    logger.error("request %s: %s %s failed", request_id, request.method, request.url.path, exc_info=error)
    return problem(500, f"Something went wrong on our side; quote request id {request_id} when reporting it.")


class ProblemCORSMiddleware(CORSMiddleware):
    """Starlette's CORS, with a refused preflight answered as a problem like every other error."""

    def preflight_response(self, request_headers: Headers) -> Response:
        """The preflight answer; a refusal says what was refused."""
        response = super().preflight_response(request_headers)
        if response.status_code == 200:
            return response
        return problem(400, f"{bytes(response.body).decode()}: this origin, method or header is not allowed.")


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
                await problem(401, detail, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


# --- The app -------------------------------------------------------------------------------


class State(TypedDict):
    """What the lifespan shares with every request, as request.state.<name>."""

    settings: Settings
    pool: asyncpg.Pool
    worker: Worker | None
    notifications: Notifications
    shutting_down: asyncio.Event
    openapi: dict[str, Any]


def configure_logging(level: str) -> None:
    """Send the service's log lines to stderr; uvicorn only configures its own loggers."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(level)


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
async def lifespan(app: Starlette, settings: Settings) -> AsyncIterator[State]:
    """Open the pool, start listening and working; on the way out, stop them in reverse."""
    configure_logging(settings.log_level)
    if settings.enable_debug:
        start_debugger(settings)
    openapi_doc = json.loads((HERE / "openapi.json").read_text())
    openapi_doc["info"]["version"] = VERSION
    pool = await open_database(settings)
    worker = Worker(pool, settings) if settings.worker_concurrency > 0 else None
    notifications = Notifications(settings, on_new_job=worker.wake if worker else lambda: None)
    notifications.start()
    if worker:
        worker.start()
    shutting_down = asyncio.Event()

    def begin_shutdown() -> None:
        """Take no more work at once: the worker stops claiming, long polls answer now."""
        shutting_down.set()
        if worker:
            worker.stop_claiming()

    # uvicorn drains open requests before it runs the shutdown below; Server.handle_exit
    # calls this the moment the signal arrives, so long polls do not hold the drain up.
    loop = asyncio.get_running_loop()
    app.state.begin_shutdown = partial(loop.call_soon_threadsafe, begin_shutdown)
    logger.info("generations %s ready (worker concurrency %d)", VERSION, settings.worker_concurrency)
    try:
        yield State(
            settings=settings,
            pool=pool,
            worker=worker,
            notifications=notifications,
            shutting_down=shutting_down,
            openapi=openapi_doc,
        )
    finally:
        begin_shutdown()
        if worker:
            await worker.stop()
        await notifications.stop()
        await pool.close()
        logger.info("generations stopped")


def create_app(settings: Settings | None = None) -> Starlette:
    """The Starlette app; with no settings given, they are read from the environment."""
    settings = settings or Settings.from_env()
    middleware = []
    if settings.cors_origins:
        middleware.append(
            Middleware(
                ProblemCORSMiddleware,
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
        Route("/openapi.json", openapi),
        Route("/generations", generations, methods=["GET", "POST"]),
        Route("/generations/{job_id}", get_generation),
        Route("/generations/{job_id}/cancel", cancel_generation, methods=["POST"]),
    ]
    handlers = {HTTPException: http_error, Exception: internal_error}
    handlers |= {error: database_unavailable for error in DATABASE_UNAVAILABLE}
    return Starlette(
        routes=routes, middleware=middleware, exception_handlers=handlers, lifespan=partial(lifespan, settings=settings)
    )


class Server(uvicorn.Server):
    """uvicorn, telling the app as soon as a shutdown signal arrives rather than after requests drain."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        getattr(self.config.app.state, "begin_shutdown", lambda: None)()  # set once the lifespan started
        super().handle_exit(sig, frame)


def main() -> None:
    """Run the service with uvicorn, configured from the environment."""
    try:
        settings = Settings.from_env()
    except ConfigError as error:
        sys.exit(f"generations: configuration error: {error}")
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        access_log=settings.log_level == "DEBUG",
        timeout_graceful_shutdown=settings.shutdown_grace_seconds,  # type: ignore[arg-type]
    )
    Server(config).run()


if __name__ == "__main__":
    main()
