"""Chaos tests: the service as users run it (`python app.py`, real uvicorn processes), a real
PostgreSQL, real signals, and faults injected from outside.

Each test names the guarantee it checks in its docstring and checks it from the database's
point of view. They are marked `chaos`: CI runs them; `pytest -m "not chaos"` skips them.
`pytest -s` shows the figures they measure. SOAK_SECONDS (default 10) and SOAK_RATE
(requests per second, default 300) size the soak test.
"""

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest

import app
from conftest import eventually
from scripts.pg import EmbeddedPostgres
from scripts.service import Service

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "10"))
SOAK_RATE = float(os.environ.get("SOAK_RATE", "300"))

# The worker's DEBUG line for each provider call: one per attempt.
PROVIDER_CALL = re.compile(r"job ([0-9a-f-]{36}) attempt (\d+): generating (\d+) (\w+) images")
# The LISTEN connections of this database's services (app.py names them).
LISTENERS = (
    "SELECT pid FROM pg_stat_activity WHERE application_name = 'generations-listen' AND datname = current_database()"
)
# Every session on this database but the test's own.
SESSIONS = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
UNFINISHED = "SELECT count(*) FROM jobs WHERE status IN ('pending', 'processing')"

Env = str | float | int
JobId = str | uuid.UUID


# --- Processes -------------------------------------------------------------------------------


class Replicas:
    """Service processes on one database, each with its own log; every one is killed when the block ends."""

    def __init__(self, database_url: str, log_dir: Path, cleanup: contextlib.ExitStack) -> None:
        """Replicas on `database_url`, logging into `log_dir`, each pushed on `cleanup` to be killed."""
        self.database_url = database_url
        self.log_dir = log_dir
        self.cleanup = cleanup
        self.count = 0

    def new(self, **env: Env) -> Service:
        """A service with this environment, not started yet; killed when the block ends."""
        self.count += 1
        service = Service(self.database_url, self.log_dir / f"service-{self.count}.log", **env)
        self.cleanup.push(service)  # its __exit__ kills the process if it still runs
        return service

    async def start_many(self, count: int, **env: Env) -> list[Service]:
        """Start `count` services with this environment side by side; return once each answers /health."""
        services = [self.new(**env) for _ in range(count)]
        await asyncio.gather(*(asyncio.to_thread(service.start) for service in services))
        return services

    async def start(self, **env: Env) -> Service:
        """Start one service with this environment."""
        [service] = await self.start_many(1, **env)
        return service


@contextlib.contextmanager
def replicas_on(database_url: str, log_dir: Path) -> Iterator[Replicas]:
    """Replicas on this database, all killed on the way out, whatever happened."""
    with contextlib.ExitStack() as cleanup:
        yield Replicas(database_url, log_dir, cleanup)


@pytest.fixture
def replicas(db_url: str, tmp_path: Path) -> Iterator[Replicas]:
    """Service processes on the test's own database (on the session's PostgreSQL server)."""
    with replicas_on(db_url, tmp_path) as started:
        yield started


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL server for this test alone, so that it can be stopped and started again."""
    server = EmbeddedPostgres(tmp_path / "pg", delete_on_exit=True)
    try:
        yield server
    finally:
        server.close()


def provider_calls(*services: Service) -> Counter[tuple[str, int]]:
    """How many times each (job id, attempt) called the provider, from the services' DEBUG logs."""
    return Counter((match[1], int(match[2])) for service in services for match in PROVIDER_CALL.finditer(service.log()))


def rss_mib(pid: int) -> float:
    """The resident memory of a process, in MiB, from /proc."""
    match = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    assert match, f"no VmRSS for process {pid}"
    return int(match[1]) / 1024


def report(test: str, **figures: object) -> None:
    """Print what a test measured, for `pytest -s` and the CI log."""
    print(f"\n[chaos] {test}: " + ", ".join(f"{name}={value}" for name, value in figures.items()))


# --- HTTP ------------------------------------------------------------------------------------


class Reply(NamedTuple):
    """One HTTP answer, and how long it took."""

    status: int
    content_type: str
    headers: Mapping[str, str]
    body: Any
    seconds: float


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client; the timeout is far above what any answer may take, so a hang shows as an error."""
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=100)) as client:
        yield client


async def call(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    payload: object = None,
    headers: Mapping[str, str] | None = None,
) -> Reply:
    """Send one request and read the whole answer."""
    started = time.monotonic()
    async with session.request(method, url, json=payload, headers=headers) as response:
        raw = await response.read()
    body = json.loads(raw) if raw else None
    return Reply(response.status, response.content_type, response.headers, body, time.monotonic() - started)


async def post_job(session: aiohttp.ClientSession, service: Service, key: str | None = None) -> Reply:
    """POST /generations for one image, with an Idempotency-Key if given."""
    headers = {"Idempotency-Key": key} if key else None
    return await call(session, "POST", f"{service.url}/generations", {"numImages": 1}, headers)


async def post_jobs(session: aiohttp.ClientSession, services: list[Service], count: int) -> list[str]:
    """POST `count` jobs all at once, spread over the services; every one must be accepted. Their ids."""
    replies = await asyncio.gather(*(post_job(session, services[i % len(services)]) for i in range(count)))
    assert [reply.status for reply in replies] == [202] * count, [r for r in replies if r.status != 202][:3]
    return [reply.body["jobId"] for reply in replies]


def is_problem(reply: Reply, status: int) -> bool:
    """True if the reply is an RFC 9457 problem with this status."""
    return (
        reply.status == status
        and reply.content_type == "application/problem+json"
        and reply.body["status"] == status
        and bool(reply.body["detail"])
    )


async def is_ready(session: aiohttp.ClientSession, service: Service) -> bool:
    """True once /ready answers 200."""
    return (await call(session, "GET", f"{service.url}/ready")).status == 200


# --- The database ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def connect(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection for looking at the jobs from outside the service."""
    connection = await asyncpg.connect(database_url)
    try:
        yield connection
    finally:
        connection.terminate()  # a plain close would wait on a server that may be gone


async def create_database(server: EmbeddedPostgres, name: str = "generations") -> str:
    """Create an empty database on the server (the service applies its schema); its URL."""
    async with connect(server.url) as admin:
        await admin.execute(f"CREATE DATABASE {name}")
    return server.url_for(name)


async def queue_job(db: asyncpg.Connection) -> uuid.UUID:
    """Queue a job straight into the database and announce it, with the API's own statements, as
    another replica would."""
    [job] = await db.fetch(app.INSERT_JOB, 1, None)
    await db.execute(app.NOTIFY, ["generations_new"], [""])
    return job["id"]


async def job_row(db: asyncpg.Connection, job_id: JobId) -> asyncpg.Record:
    """The job as the database has it, with the database's clock alongside."""
    return await db.fetchrow("SELECT *, now() AS db_now FROM jobs WHERE id = $1", uuid.UUID(str(job_id)))


async def wait_for_status(db: asyncpg.Connection, job_id: JobId, status: str, within: float) -> asyncpg.Record:
    """Wait until the job has this status; return its row."""

    async def reached() -> asyncpg.Record | None:
        """The row, once it has the status."""
        row = await job_row(db, job_id)
        return row if row["status"] == status else None

    return await eventually(reached, within)


async def wait_until_none_unfinished(db: asyncpg.Connection, within: float) -> float:
    """Wait until no job is pending or processing; return how long that took."""
    started = time.monotonic()
    await eventually(lambda: _none_unfinished(db), within)
    return time.monotonic() - started


async def _none_unfinished(db: asyncpg.Connection) -> bool:
    """True when no job is pending or processing."""
    return await db.fetchval(UNFINISHED) == 0


# --- A worker dies ---------------------------------------------------------------------------


@pytest.mark.chaos
async def test_a_job_whose_process_was_killed_is_completed_once_by_another(
    replicas: Replicas, db: asyncpg.Connection, session: aiohttp.ClientSession
) -> None:
    """SIGKILL mid-job: once the dead process's lease runs out, another process completes the job
    exactly once, as attempt 2, within the lease plus a few seconds."""
    lease = 2.0
    first = await replicas.start(JOB_LEASE_SECONDS=lease, IMAGE_PROVIDER_DELAY=5, LOG_LEVEL="DEBUG")
    [job_id] = await post_jobs(session, [first], 1)

    async def calling_the_provider() -> bool:
        """The first attempt has logged its provider call (the claim commits a moment before)."""
        return provider_calls(first)[(job_id, 1)] == 1

    await eventually(calling_the_provider, within=5)
    await asyncio.to_thread(first.kill)
    killed = time.monotonic()
    row = await job_row(db, job_id)
    assert (row["status"], row["attempts"]) == ("processing", 1)  # the kill caught the first attempt mid-way

    second = await replicas.start(JOB_LEASE_SECONDS=lease, IMAGE_PROVIDER_DELAY=0, LOG_LEVEL="DEBUG")
    row = await wait_for_status(db, job_id, "completed", within=lease + 10)
    recovered = time.monotonic() - killed
    report("kill -9", lease_s=lease, kill_to_completed_s=round(recovered, 2))
    assert recovered <= lease + 3
    assert row["attempts"] == 2
    assert row["updated_at"] == row["completed_at"]  # nothing wrote to it after it completed
    assert row["error"] is None and len(row["image_urls"]) == 1
    assert provider_calls(first, second) == Counter({(job_id, 1): 1, (job_id, 2): 1})


@pytest.mark.chaos
async def test_a_job_longer_than_its_lease_is_run_once(
    replicas: Replicas, db: asyncpg.Connection, session: aiohttp.ClientSession
) -> None:
    """A job that runs three times its lease (JOB_LEASE_SECONDS=1, the provider takes 3 s), with two
    replicas looking for due jobs every 0.2 s: the replica running it keeps extending its lease, so
    it is completed once, as attempt 1, with exactly one provider call in both replicas' logs."""
    services = await replicas.start_many(
        2, JOB_LEASE_SECONDS=1, IMAGE_PROVIDER_DELAY=3, WORKER_POLL_INTERVAL=0.2, LOG_LEVEL="DEBUG"
    )
    [job_id] = await post_jobs(session, services[:1], 1)

    async def ended() -> asyncpg.Record | None:
        row = await job_row(db, job_id)
        return row if row["status"] in app.TERMINAL_STATUSES else None

    row = await eventually(ended, within=10)
    assert (row["status"], row["attempts"]) == ("completed", 1)
    report(
        "job longer than its lease",
        lease_s=1,
        run_s=round((row["completed_at"] - row["created_at"]).total_seconds(), 2),
    )
    assert provider_calls(*services) == Counter({(job_id, 1): 1})
    assert not any("claim lost" in service.log() or "result dropped" in service.log() for service in services)


@pytest.mark.chaos
async def test_sigterm_hands_a_running_job_back_at_once(
    replicas: Replicas, db: asyncpg.Connection, session: aiohttp.ClientSession
) -> None:
    """SIGTERM mid-job: the process exits within the grace period plus 2 s, the job is pending again
    at once (not after its 30 s lease), its interrupted attempt counted, and another replica completes it."""
    grace = 1.0
    first = await replicas.start(IMAGE_PROVIDER_DELAY=10, SHUTDOWN_GRACE_SECONDS=grace, JOB_LEASE_SECONDS=30)
    [job_id] = await post_jobs(session, [first], 1)
    await wait_for_status(db, job_id, "processing", within=5)
    signalled = time.monotonic()
    code = await asyncio.to_thread(first.stop, signal.SIGTERM)
    exited = time.monotonic() - signalled

    row = await job_row(db, job_id)
    assert (row["status"], row["attempts"]) == ("pending", 1)
    assert row["available_at"] <= row["db_now"]  # claimable right away, no lease to wait out
    assert code in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM once its graceful shutdown is done
    assert exited <= grace + 2
    log = first.log()
    assert "shutting down: unfinished jobs handed back to the queue: 1; failed for want of attempts: 0" in log
    assert "Application shutdown complete" in log

    started = time.monotonic()
    await replicas.start(IMAGE_PROVIDER_DELAY=0)
    row = await wait_for_status(db, job_id, "completed", within=5)
    report(
        "SIGTERM",
        grace_s=grace,
        exit_code=code,
        exit_s=round(exited, 2),
        second_replica_start_to_completed_s=round(time.monotonic() - started, 2),
    )
    assert row["attempts"] == 2


# --- Replicas share one database -------------------------------------------------------------


@pytest.mark.chaos
async def test_three_replicas_complete_each_job_exactly_once(
    replicas: Replicas, db: asyncpg.Connection, session: aiohttp.ClientSession
) -> None:
    """Three processes on one database, 1,500 jobs posted at once across them: every job is
    completed, claimed once (attempts = 1), and the provider is called exactly once per job."""
    count = 1500
    services = await replicas.start_many(3, IMAGE_PROVIDER_DELAY=0, LOG_LEVEL="DEBUG")
    started = time.monotonic()
    ids = await post_jobs(session, services, count)
    posted = time.monotonic() - started
    await wait_until_none_unfinished(db, within=60)
    done = time.monotonic() - started

    statuses = dict(await db.fetch("SELECT status, count(*) FROM jobs GROUP BY status"))
    attempts = dict(await db.fetch("SELECT attempts, count(*) FROM jobs GROUP BY attempts"))
    per_replica = [sum(provider_calls(service).values()) for service in services]
    calls = provider_calls(*services)
    report(
        "three replicas",
        jobs=count,
        post_s=round(posted, 2),
        all_completed_s=round(done, 2),
        provider_calls=sum(calls.values()),
        per_replica=per_replica,
    )
    assert statuses == {"completed": count}
    assert attempts == {1: count}
    assert calls == Counter({(job_id, 1): 1 for job_id in ids})
    assert all(per_replica)  # every replica's worker took a share


# --- The database goes away ------------------------------------------------------------------

# End every session of this database but the test's own, as an administrator or a failover would.
END_SESSIONS = (
    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
)


class Post(NamedTuple):
    """One POST of a load: when it was sent, its Idempotency-Key, and its answer or error."""

    sent: float
    key: str
    reply: Reply | None
    error: str | None


async def post_until(
    stop: asyncio.Event, session: aiohttp.ClientSession, service: Service, posts: list[Post], limit: int
) -> None:
    """POST jobs one after another, about 50 a second, until `stop` is set (at most `limit`); record each answer."""
    for _ in range(limit):
        if stop.is_set():
            return
        key, sent = uuid.uuid4().hex, time.monotonic()
        try:
            posts.append(Post(sent, key, await post_job(session, service, key), None))
        except (aiohttp.ClientError, TimeoutError) as error:
            posts.append(Post(sent, key, None, repr(error)))
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def posting(session: aiohttp.ClientSession, service: Service) -> AsyncIterator[list[Post]]:
    """Four clients POST jobs (about 200 a second in all) for as long as the block runs, so that requests
    are in flight when a fault strikes; the list fills with every answer."""
    stop = asyncio.Event()
    posts: list[Post] = []
    load = asyncio.gather(*(post_until(stop, session, service, posts, limit=5000) for _ in range(4)))
    try:
        yield posts
    finally:
        stop.set()
        await load


async def wait_for_accepted(posts: list[Post], since: float, count: int = 20) -> None:
    """Wait until `count` POSTs sent after `since` were answered 202: the service takes jobs again."""

    async def enough() -> bool:
        """True once enough were accepted."""
        return sum(1 for post in posts if post.sent >= since and post.reply and post.reply.status == 202) >= count

    await eventually(enough, within=10)


def answers(posts: list[Post]) -> dict[int | str, int]:
    """How many POSTs got each status (or each client error)."""
    return dict(Counter(post.reply.status if post.reply else post.error for post in posts))


def check_answers(posts: list[Post]) -> None:
    """Every POST was answered 202 or 503 problem+json, within 5 s: no 500, no hang."""
    assert set(answers(posts)) <= {202, 503}, answers(posts)
    assert all(post.reply.seconds < 5 for post in posts if post.reply)
    assert all(is_problem(post.reply, 503) for post in posts if post.reply and post.reply.status == 503)


async def settled_jobs(db: asyncpg.Connection) -> list[asyncpg.Record]:
    """Every job, once none is left to run."""
    await wait_until_none_unfinished(db, within=30)
    return await db.fetch("SELECT id, idempotency_key, status, attempts FROM jobs")


def check_every_job_completed(rows: list[asyncpg.Record], posts: list[Post]) -> None:
    """Every job the database took (each answered 202, and any whose answer was cut off) is completed,
    once per key, and a fault cost a job at most one extra attempt."""
    accepted = {post.key for post in posts if post.reply and post.reply.status == 202}
    assert accepted <= {row["idempotency_key"] for row in rows}
    assert {row["status"] for row in rows} == {"completed"}
    assert all(1 <= row["attempts"] <= 2 for row in rows)


def logged_errors(service: Service) -> list[str]:
    """The ERROR lines of a service's log: a 500, or a background failure that is not a lost database."""
    return [line for line in service.log().splitlines() if " ERROR " in line or line.startswith("ERROR:")]


async def probe_outage(
    session: aiohttp.ClientSession, service: Service, job_id: str, seconds: float
) -> list[tuple[Reply, Reply, Reply]]:
    """For `seconds`, ask /health, /ready and a known job four times a second."""
    probes: list[tuple[Reply, Reply, Reply]] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        probes.append(
            (
                await call(session, "GET", f"{service.url}/health"),
                await call(session, "GET", f"{service.url}/ready"),
                await call(session, "GET", f"{service.url}/generations/{job_id}"),
            )
        )
        await asyncio.sleep(0.25)
    return probes


@pytest.mark.chaos
async def test_the_service_rides_out_a_database_restart_under_load(
    own_postgres: EmbeddedPostgres, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """PostgreSQL stopped for 4 s while jobs are posted and processed: /health stays 200, /ready is
    503, every POST answers (503 problem+json during the outage) within 5 s, the process recovers
    by itself, and every job in the database, including each one answered 202, is completed once."""
    outage_seconds = 4.0
    database_url = await create_database(own_postgres)
    with replicas_on(database_url, tmp_path) as started:
        service = await started.start(IMAGE_PROVIDER_DELAY=0.05, JOB_LEASE_SECONDS=10, LOG_LEVEL="DEBUG")
        async with posting(session, service) as posts:
            async with connect(database_url) as db:
                await eventually(lambda: db.fetchval("SELECT count(*) >= 20 FROM jobs WHERE status = 'completed'"))
                some_job = str(await db.fetchval("SELECT id FROM jobs LIMIT 1"))
            await asyncio.to_thread(own_postgres.stop)
            down = time.monotonic()
            probes = await probe_outage(session, service, some_job, outage_seconds)
            up = time.monotonic()
            await asyncio.to_thread(own_postgres.start)
            restarted = time.monotonic()
            await eventually(lambda: is_ready(session, service), within=30)
            recovery = time.monotonic() - restarted
            await wait_for_accepted(posts, since=restarted)
        async with connect(database_url) as db:
            rows = await settled_jobs(db)
        survived = service.process is not None and service.process.poll() is None  # before the block kills it

    # The POSTs sent and answered while the server was down.
    during = [post for post in posts if post.reply and down <= post.sent and post.sent + post.reply.seconds <= up]
    calls = provider_calls(service)
    report(
        "database restart",
        outage_s=round(up - down, 2),
        ready_again_after_restart_s=round(recovery, 3),
        post_answers=answers(posts),
        slowest_post_s=round(max(post.reply.seconds for post in posts if post.reply), 3),
        jobs_in_db=len(rows),
        attempts=dict(Counter(row["attempts"] for row in rows)),
    )
    check_answers(posts)
    check_every_job_completed(rows, posts)
    assert during and all(is_problem(post.reply, 503) and post.reply.headers["Retry-After"] for post in during)
    assert probes and all(health.status == 200 for health, _, _ in probes)
    assert all(is_problem(ready, 503) and is_problem(job, 503) for _, ready, job in probes)
    assert survived  # the same process rode it out: it never needed a restart
    assert logged_errors(service) == []  # a lost database is a warning, not an error
    # Each attempt ran the provider at most once, and the attempt that completed a job did run it.
    assert max(calls.values()) == 1
    assert all((str(row["id"]), row["attempts"]) in calls for row in rows)


@contextlib.asynccontextmanager
async def slow_closing_proxy(database_url: str, lag: float) -> AsyncIterator[str]:
    """A TCP proxy on 127.0.0.1 to the database's server; yields the database's URL through the proxy.

    It relays every byte at once, but closes the client's side of a connection `lag` seconds after
    the server closed its own, as a load balancer may: the client reads the server's last words
    ("terminating connection") well before it sees the connection end.
    """
    target = urlsplit(database_url)
    query = parse_qs(target.query)
    socket_dir = query.pop("host", [None])[0]  # a Unix socket folder, as the embedded server has
    port = target.port or 5432
    writers: set[asyncio.StreamWriter] = set()
    relays: set[asyncio.Future[Any]] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
        """Copy until the reader ends; close the writer `delay` seconds later."""
        with contextlib.suppress(OSError):  # a reset is an end like any other
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        await asyncio.sleep(delay)
        writer.close()

    async def relay(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        """Connect one client to the server and copy both ways."""
        writers.add(client_writer)
        try:
            if socket_dir:
                server_reader, server_writer = await asyncio.open_unix_connection(f"{socket_dir}/.s.PGSQL.{port}")
            else:
                server_reader, server_writer = await asyncio.open_connection(target.hostname, port)
        except OSError:
            client_writer.close()
            return
        writers.add(server_writer)
        both_ways = asyncio.gather(pipe(client_reader, server_writer, 0), pipe(server_reader, client_writer, lag))
        relays.add(both_ways)
        await both_ways

    proxy = await asyncio.start_server(relay, "127.0.0.1", 0)
    credentials = target.netloc.rpartition("@")[0]
    address = f"127.0.0.1:{proxy.sockets[0].getsockname()[1]}"
    netloc = f"{credentials}@{address}" if "@" in target.netloc else address
    try:
        yield urlunsplit((target.scheme, netloc, target.path, urlencode(query, doseq=True), ""))
    finally:
        proxy.close()
        for writer in writers:  # ends every pipe, so that each relay returns by itself
            writer.close()
        await asyncio.gather(*relays, return_exceptions=True)
        await proxy.wait_closed()


@pytest.mark.chaos
async def test_sessions_the_server_ends_answer_503_never_500(
    db_url: str, db: asyncpg.Connection, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """The server ends the service's sessions three times under load (pg_terminate_backend), and each
    connection's close lags 0.3 s behind the server's last error: every POST still answers 202 or 503
    problem+json within 5 s, never 500, new jobs are taken again at once, and every job is completed."""
    async with slow_closing_proxy(db_url, lag=0.3) as proxied_url:
        with replicas_on(proxied_url, tmp_path) as started:
            # A short lease: a claim whose answer a cut lost is run again soon.
            service = await started.start(IMAGE_PROVIDER_DELAY=0.05, JOB_LEASE_SECONDS=5)
            ended: list[int] = []
            async with posting(session, service) as posts:
                cut = time.monotonic()
                for _ in range(3):
                    await wait_for_accepted(posts, since=cut)
                    cut = time.monotonic()
                    ended.append(await db.fetchval(END_SESSIONS))
                await wait_for_accepted(posts, since=cut)
                recovered = time.monotonic() - cut
            rows = await settled_jobs(db)
    report(
        "sessions ended",
        sessions_ended=ended,
        post_answers=answers(posts),
        asyncpg_mid_error_warnings=service.log().count("cannot switch to state"),
        twenty_accepted_after_last_cut_s=round(recovered, 2),
        jobs_in_db=len(rows),
    )
    check_answers(posts)
    check_every_job_completed(rows, posts)
    assert 503 in answers(posts)  # the cuts did reach requests in flight
    assert logged_errors(service) == []


@pytest.mark.chaos
async def test_jobs_start_promptly_after_the_listen_connection_is_killed(
    replicas: Replicas, db: asyncpg.Connection
) -> None:
    """With polling out of the picture (WORKER_POLL_INTERVAL=60), killing the LISTEN connection alone
    does not stall the worker: jobs queued by another replica during the gap and after it start promptly."""
    prompt = 3.0  # the reconnect waits 1 s after a loss; the next poll would be 60 s away
    service = await replicas.start(WORKER_POLL_INTERVAL=60, IMAGE_PROVIDER_DELAY=0)
    latencies: dict[str, float] = {}

    async def run_one(label: str) -> None:
        """Queue a job from outside and wait until it is completed."""
        queued = time.monotonic()
        row = await wait_for_status(db, await queue_job(db), "completed", within=prompt + 5)
        latencies[label] = round(time.monotonic() - queued, 2)
        assert row["attempts"] == 1

    [listener] = await eventually(lambda: db.fetch(LISTENERS))
    await run_one("before_kill_s")  # the notification path works to begin with
    killed = await db.fetch(f"SELECT pg_terminate_backend(pid) FROM ({LISTENERS}) AS listeners")
    assert killed == [(True,)]
    await run_one("queued_in_gap_s")
    await eventually(lambda: db.fetchval(LISTENERS + " AND pid <> $1", listener["pid"]))
    await run_one("queued_after_reconnect_s")
    report("LISTEN connection killed", **latencies)
    assert all(latency <= prompt for latency in latencies.values()), latencies
    assert "the notification connection was lost; reconnecting" in service.log()


# --- Starting a replica --------------------------------------------------------------------


@contextlib.asynccontextmanager
async def open_write_transaction(database_url: str) -> AsyncIterator[None]:
    """A transaction that has written to jobs and stays open for the block (its lock on the table
    conflicts with any DDL on it); rolled back on the way out."""
    async with connect(database_url) as other:
        transaction = other.transaction()
        await transaction.start()
        await other.execute("INSERT INTO jobs (num_images, status) VALUES (1, 'cancelled')")
        try:
            yield
        finally:
            await transaction.rollback()


@contextlib.asynccontextmanager
async def posting_steadily(session: aiohttp.ClientSession, service: Service) -> AsyncIterator[list[Post]]:
    """One client POSTs a job about every 20 ms for as long as the block runs; the list fills with every answer."""
    stop = asyncio.Event()
    posts: list[Post] = []
    load = asyncio.create_task(post_until(stop, session, service, posts, limit=5000))
    try:
        yield posts
    finally:
        stop.set()
        await load


async def pickup_seconds(db: asyncpg.Connection) -> list[float]:
    """For each completed job, how long from its creation to its completion (the provider takes no time)."""
    rows = await db.fetch(
        "SELECT extract(epoch FROM completed_at - created_at) AS s FROM jobs WHERE status = 'completed'"
    )
    return [float(row["s"]) for row in rows]


@pytest.mark.chaos
async def test_a_replica_starts_beside_an_open_write_transaction_without_waiting(
    replicas: Replicas, db: asyncpg.Connection, db_url: str, session: aiohttp.ClientSession
) -> None:
    """With the schema current, a replica started while another transaction holds a write lock on
    jobs takes no lock on the table: it becomes ready while that transaction is still open, and all
    the while the running replica's POSTs answer promptly and its worker completes their jobs promptly."""
    running = await replicas.start(IMAGE_PROVIDER_DELAY=0)
    async with open_write_transaction(db_url), posting_steadily(session, running) as posts:
        started = time.monotonic()
        new = await replicas.start(IMAGE_PROVIDER_DELAY=0)
        assert await is_ready(session, new)  # the transaction is still open
        ready_s = time.monotonic() - started
    await wait_until_none_unfinished(db, within=5)
    pickups = await pickup_seconds(db)
    report(
        "replica start beside a write transaction",
        ready_s=round(ready_s, 2),
        posts=len(posts),
        slowest_post_s=round(max(post.reply.seconds for post in posts if post.reply), 3),
        slowest_pickup_s=round(max(pickups), 3),
    )
    assert "schema.sql" not in new.log()  # it neither applied the schema nor waited to
    assert answers(posts) == {202: len(posts)}
    assert max(post.reply.seconds for post in posts if post.reply) < 0.5
    assert len(pickups) == len(posts) and max(pickups) < 0.5


@pytest.mark.chaos
async def test_a_replica_with_a_schema_to_apply_waits_without_holding_up_the_others(
    replicas: Replicas, db: asyncpg.Connection, db_url: str, session: aiohttp.ClientSession
) -> None:
    """With the schema outdated, a replica started while another transaction holds a write lock on
    jobs waits for it without queueing anyone behind its DDL: it says so in its log, the running
    replica's POSTs answer promptly all along, and it becomes ready once the transaction ends."""
    running = await replicas.start(IMAGE_PROVIDER_DELAY=0)
    current = await db.fetchval(app.SELECT_SCHEMA_VERSION)
    await db.execute("UPDATE schema_version SET version = 'old'")
    new = replicas.new(IMAGE_PROVIDER_DELAY=0)
    waiting = "schema.sql waits for other transactions on the jobs table; trying again"
    async with open_write_transaction(db_url):
        async with posting_steadily(session, running) as posts:
            starting = asyncio.create_task(asyncio.to_thread(new.start))

            async def waited_twice() -> bool:
                return new.log_path.exists() and new.log().count(waiting) >= 2

            await eventually(waited_twice, within=15)
        assert not starting.done()  # not ready while the transaction is open
        waits_logged = new.log().count(waiting)
    ended = time.monotonic()
    await asyncio.wait_for(starting, 10)
    ready_after_s = time.monotonic() - ended
    assert await is_ready(session, new)
    assert await db.fetchval(app.SELECT_SCHEMA_VERSION) == current
    report(
        "replica applying the schema beside a write transaction",
        waits_logged=waits_logged,
        ready_after_transaction_s=round(ready_after_s, 2),
        posts=len(posts),
        slowest_post_s=round(max(post.reply.seconds for post in posts if post.reply), 3),
    )
    assert answers(posts) == {202: len(posts)}
    assert max(post.reply.seconds for post in posts if post.reply) < 0.5


# --- The provider fails ----------------------------------------------------------------------


@pytest.mark.chaos
async def test_provider_failures_end_every_job_completed_or_failed(
    replicas: Replicas, db: asyncpg.Connection, session: aiohttp.ClientSession
) -> None:
    """With half the provider calls failing and MAX_ATTEMPTS=5, every job ends completed or failed
    (none stuck), none is tried more than 5 times, and each attempt called the provider once."""
    count, max_attempts = 100, 5
    services = await replicas.start_many(
        2,
        IMAGE_PROVIDER_FAILURE_RATE=0.5,
        MAX_ATTEMPTS=max_attempts,
        IMAGE_PROVIDER_DELAY=0,
        WORKER_POLL_INTERVAL=0.2,  # retries become due after their backoff, when a poll finds them
        LOG_LEVEL="DEBUG",
    )
    await post_jobs(session, services, count)
    # The longest possible retry chain waits 0.5 + 1 + 2 + 4 s of backoff at most.
    settled = await wait_until_none_unfinished(db, within=30)
    rows = await db.fetch("SELECT id, status, attempts, error, image_urls FROM jobs")
    report(
        "provider failures",
        jobs=count,
        settled_s=round(settled, 2),
        statuses=dict(Counter(row["status"] for row in rows)),
        attempts=dict(sorted(Counter(row["attempts"] for row in rows).items())),
    )
    assert len(rows) == count
    for row in rows:
        if row["status"] == "failed":
            assert row["attempts"] == max_attempts
            assert row["error"].startswith("the image provider failed") and row["image_urls"] is None
        else:
            assert row["status"] == "completed", row
            assert 1 <= row["attempts"] <= max_attempts
            assert row["error"] is None and len(row["image_urls"]) == 1
    assert max(row["attempts"] for row in rows) > 1  # retries did happen
    expected = Counter({(str(row["id"]), n): 1 for row in rows for n in range(1, row["attempts"] + 1)})
    assert provider_calls(*services) == expected


# --- Soak ------------------------------------------------------------------------------------


class Sample(NamedTuple):
    """The service's resident memory and the database's session count at one moment of a soak."""

    elapsed: float
    rss_mib: float
    sessions: int


async def paced(rate: float, seconds: float, send: Callable[[int], Awaitable[None]], in_flight: int) -> None:
    """Start send(0), send(1), ... `rate` times a second for `seconds`, at most `in_flight` at once."""
    slots = asyncio.Semaphore(in_flight)
    tasks: set[asyncio.Task[None]] = set()
    started = time.monotonic()

    async def one(i: int) -> None:
        """Send one request in a slot."""
        async with slots:
            await send(i)

    for i in range(int(rate * seconds)):
        await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
        tasks.add(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)


async def sample_every_second(service: Service, db: asyncpg.Connection, samples: list[Sample], seconds: float) -> None:
    """Record the service's RSS and the session count once a second, for `seconds`."""
    started = time.monotonic()
    for tick in range(int(seconds) + 1):
        await asyncio.sleep(max(0.0, started + tick - time.monotonic()))
        samples.append(Sample(time.monotonic() - started, rss_mib(service.pid()), await db.fetchval(SESSIONS)))


@pytest.mark.chaos
async def test_a_steady_mixed_load_runs_clean(
    replicas: Replicas, db: asyncpg.Connection, session: aiohttp.ClientSession
) -> None:
    """SOAK_SECONDS of SOAK_RATE requests a second (POST, GET by id, list): no errors, every job
    completed, flat memory, and no more database sessions at the end than mid-run."""
    pool_size = 10
    # A pool that opens all its connections at startup: any session beyond them would be a leak, not growth.
    service = await replicas.start(IMAGE_PROVIDER_DELAY=0.05, DB_POOL_MIN_SIZE=pool_size, DB_POOL_MAX_SIZE=pool_size)
    known = await post_jobs(session, [service], 10)
    choose = random.Random(6)
    errors: list[str] = []
    latencies: list[float] = []
    samples: list[Sample] = []

    async def send(i: int) -> None:
        """One request of the mix: 2 in 10 POST, 5 GET a job, 3 list a page."""
        kind = i % 10
        if kind < 2:
            url, method, payload, expected = f"{service.url}/generations", "POST", {"numImages": 2}, 202
        elif kind < 7:
            url, method, payload, expected = f"{service.url}/generations/{choose.choice(known)}", "GET", None, 200
        else:
            query = "?limit=20&status=completed" if kind == 9 else "?limit=20"
            url, method, payload, expected = f"{service.url}/generations{query}", "GET", None, 200
        try:
            reply = await call(session, method, url, payload)
        except (aiohttp.ClientError, TimeoutError) as error:
            errors.append(f"{method} {url}: {error!r}")
            return
        latencies.append(reply.seconds)
        if reply.status != expected:
            errors.append(f"{method} {url}: {reply.status} {reply.body}")
        elif method == "POST":
            known.append(reply.body["jobId"])

    sampler = asyncio.create_task(sample_every_second(service, db, samples, SOAK_SECONDS))
    try:
        await paced(SOAK_RATE, SOAK_SECONDS, send, in_flight=50)
    finally:
        await sampler
    settled = await wait_until_none_unfinished(db, within=10)
    completed = await db.fetchval("SELECT count(*) FROM jobs WHERE status = 'completed'")

    warm = next(sample for sample in samples if sample.elapsed >= SOAK_SECONDS / 10)  # after imports and caches
    mid = min(samples, key=lambda sample: abs(sample.elapsed - SOAK_SECONDS / 2))
    end = samples[-1]
    latencies.sort()
    report(
        "soak",
        seconds=SOAK_SECONDS,
        rate=SOAK_RATE,
        requests=len(latencies) + len(errors),
        errors=len(errors),
        p50_ms=round(latencies[len(latencies) // 2] * 1000, 1),
        p99_ms=round(latencies[int(len(latencies) * 0.99)] * 1000, 1),
        max_ms=round(latencies[-1] * 1000, 1),
        rss_start_mib=round(warm.rss_mib, 1),
        rss_mid_mib=round(mid.rss_mib, 1),
        rss_end_mib=round(end.rss_mib, 1),
        sessions_mid=mid.sessions,
        sessions_end=end.sessions,
        jobs=len(known),
        drained_s=round(settled, 2),
    )
    assert errors == [], errors[:5]
    assert completed == len(known)  # every job the soak posted was completed
    assert len(latencies) == int(SOAK_RATE * SOAK_SECONDS)
    # Room for allocator noise, not for growth with the number of requests.
    assert end.rss_mib <= warm.rss_mib * 1.1 + 5, samples
    assert end.sessions <= mid.sessions <= pool_size + 1, samples  # the pool, and the LISTEN connection
