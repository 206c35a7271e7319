"""The service behind PgBouncer in transaction pooling mode, and the tools that test it.

PgBouncer 1.18 (Debian 12's) cannot keep prepared statements across transactions, and a LISTEN
through it hears no other session. The end-to-end test runs three real `python app.py` processes
with DATABASE_URL through PgBouncer, LISTEN_DATABASE_URL straight to PostgreSQL, and asyncpg's
statement cache off (DB_STATEMENT_CACHE_SIZE=0): measured through PgBouncer 1.18 under
contention, that asyncpg setting alone takes the errors to none. `pytest -s` shows its figures.
"""

import asyncio
import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import aiohttp
import asyncpg
import pytest

import app
from conftest import PGBOUNCER_POOL_SIZE, eventually
from scripts.service import Service

# The worker's DEBUG line for each provider call: one per attempt.
PROVIDER_CALL = re.compile(r"job ([0-9a-f-]{36}) attempt (\d+): generating (\d+) (\w+) images")

CheckMetrics = Callable[[str], None]


# --- The test setup itself ---------------------------------------------------------------------


async def test_pgbouncer_shares_few_server_connections_among_many_clients_per_transaction(
    pgbouncer_db_url: str,
) -> None:
    """The fixture's PgBouncer pools per transaction, with fewer server connections than clients:
    three times PGBOUNCER_POOL_SIZE clients, all connected at once, are all answered (in session
    mode all but PGBOUNCER_POOL_SIZE of them would wait) by at most PGBOUNCER_POOL_SIZE server
    backends, and an open transaction keeps its backend to itself until it ends."""
    clients = [await asyncpg.connect(pgbouncer_db_url, statement_cache_size=0) for _ in range(3 * PGBOUNCER_POOL_SIZE)]
    try:
        pids = await asyncio.gather(*(client.fetchval("SELECT pg_backend_pid()", timeout=5) for client in clients))
        assert len(set(pids)) <= PGBOUNCER_POOL_SIZE

        holder, *others = clients
        async with holder.transaction():
            held = await holder.fetchval("SELECT pg_backend_pid()")
            during = await asyncio.gather(*(client.fetchval("SELECT pg_backend_pid()", timeout=5) for client in others))
            assert held not in during
            assert await holder.fetchval("SELECT pg_backend_pid()") == held
    finally:
        for client in clients:
            await client.close()


async def test_listen_through_pgbouncer_hears_no_other_session(pgbouncer_db_url: str, db_url: str) -> None:
    """Why the service's LISTEN connection must bypass PgBouncer: a LISTEN through transaction
    pooling succeeds, yet a NOTIFY from another session never reaches it (PgBouncer drops it, or
    hands it to whichever client holds that backend then). A NOTIFY sent on the listening
    connection itself does arrive, so such a probe cannot tell: only one from another session can."""
    heard: list[str] = []
    listener = await asyncpg.connect(pgbouncer_db_url, statement_cache_size=0)
    sender = await asyncpg.connect(db_url)
    try:
        await listener.add_listener("probe", lambda *args: heard.append(args[-1]))
        await listener.execute("NOTIFY probe, 'self'")
        await eventually(lambda: _has(heard, "self"), within=5)
        await sender.execute("NOTIFY probe, 'other'")
        await listener.execute("SELECT 1")  # the listener's next transaction: nothing is waiting for it either
        with pytest.raises(AssertionError, match="condition not met"):
            await eventually(lambda: _has(heard, "other"), within=2)
    finally:
        await listener.close()
        await sender.close()


async def _has(heard: list[str], payload: str) -> bool:
    """True once `payload` was heard."""
    return payload in heard


def test_check_metrics_passes_a_clean_exposition_and_fails_a_broken_one(check_metrics: CheckMetrics) -> None:
    """check_metrics accepts a well-formed exposition, and fails the test, quoting promtool, for a
    counter without the _total suffix and for a line that does not parse."""
    check_metrics("# HELP jobs_created_total Jobs created.\n# TYPE jobs_created_total counter\njobs_created_total 3\n")
    with pytest.raises(pytest.fail.Exception, match='should have "_total" suffix'):
        check_metrics("# HELP jobs_created Jobs created.\n# TYPE jobs_created counter\njobs_created 3\n")
    with pytest.raises(pytest.fail.Exception, match="parsing error"):
        check_metrics('# HELP jobs Jobs.\n# TYPE jobs gauge\njobs{status="done" 3\n')


# --- The service behind PgBouncer ---------------------------------------------------------------


@pytest.mark.chaos
async def test_three_replicas_through_pgbouncer_complete_each_job_exactly_once(
    pgbouncer_db_url: str, db_url: str, tmp_path: Path
) -> None:
    """Three processes whose pools (10 connections each) go through PgBouncer in transaction mode
    with PGBOUNCER_POOL_SIZE server connections, each listening straight to PostgreSQL, 1,500 jobs
    posted at once across them: every POST is answered 202 (no 5xx), every job is completed and
    claimed once (attempts = 1), the provider is called once per job, and the pools' work really
    went through PgBouncer (at most PGBOUNCER_POOL_SIZE server sessions besides the listeners)."""
    count = 1500
    env = {
        "LISTEN_DATABASE_URL": db_url,
        "DB_STATEMENT_CACHE_SIZE": 0,
        "DB_POOL_MIN_SIZE": 10,
        "DB_POOL_MAX_SIZE": 10,
        "IMAGE_PROVIDER_DELAY": 0,
        "LOG_LEVEL": "DEBUG",
    }
    services = [Service(pgbouncer_db_url, tmp_path / f"service-{i}.log", **env) for i in range(3)]
    db = await asyncpg.connect(db_url)
    try:
        await asyncio.gather(*(asyncio.to_thread(service.start) for service in services))
        started = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=100)) as session:
            replies = await asyncio.gather(*(_post_job(session, services[i % 3]) for i in range(count)))
        posted = time.monotonic() - started
        answers = Counter(status for status, _ in replies)
        assert answers == {202: count}, f"{answers}; the end of a service's log:\n{services[0].log()[-3000:]}"
        ids = [job_id for _, job_id in replies]

        await eventually(lambda: _none_unfinished(db), within=90)
        done = time.monotonic() - started
        statuses = dict(await db.fetch("SELECT status, count(*) FROM jobs GROUP BY status"))
        attempts = dict(await db.fetch("SELECT attempts, count(*) FROM jobs GROUP BY attempts"))
        listeners = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'generations-listen'"
        )
        pooled = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND application_name IS DISTINCT FROM 'generations-listen'"
        )
        calls = Counter(
            (match[1], int(match[2])) for service in services for match in PROVIDER_CALL.finditer(service.log())
        )
        print(
            f"\n[pgbouncer] three replicas: jobs={count}, post_s={posted:.2f}, all_completed_s={done:.2f},"
            f" listeners={listeners}, pooled_server_sessions={pooled}, provider_calls={sum(calls.values())}"
        )
        assert statuses == {"completed": count}
        assert attempts == {1: count}
        assert calls == Counter({(job_id, 1): 1 for job_id in ids})
        assert listeners == 3
        assert pooled <= PGBOUNCER_POOL_SIZE
    finally:
        for service in services:
            if service.process is not None and service.process.poll() is None:
                await asyncio.to_thread(service.stop)
        await db.close()


async def _post_job(session: aiohttp.ClientSession, service: Service) -> tuple[int | str, str | None]:
    """POST /generations for one image: the status (or the client error), and the job id if accepted."""
    try:
        async with session.post(f"{service.url}/generations", json={"numImages": 1}) as response:
            body = await response.json(content_type=None) if response.status == 202 else None
            return response.status, body["jobId"] if body else None
    except (aiohttp.ClientError, TimeoutError) as error:
        return type(error).__name__, None


async def _none_unfinished(db: asyncpg.Connection) -> bool:
    """True when no job is pending or processing."""
    return await db.fetchval("SELECT count(*) FROM jobs WHERE status IN ('pending', 'processing')") == 0


async def test_with_listen_through_pgbouncer_the_service_polls_and_says_so(
    pgbouncer_db_url: str, db_url: str, tmp_path: Path
) -> None:
    """With LISTEN_DATABASE_URL through PgBouncer in transaction mode (where LISTEN hears nothing),
    the service logs once that notifications do not arrive, reports generations_listen_connected 0,
    and still runs a job posted to another replica, found by polling."""
    env = {"DB_STATEMENT_CACHE_SIZE": 0, "WORKER_POLL_INTERVAL": 0.2, "IMAGE_PROVIDER_DELAY": 0}
    service = Service(pgbouncer_db_url, tmp_path / "service.log", **env)  # LISTEN_DATABASE_URL: DATABASE_URL
    db = await asyncpg.connect(db_url)
    try:
        await asyncio.to_thread(service.start)
        await eventually(lambda: asyncio.to_thread(lambda: "notifications do not arrive" in service.log()))
        async with aiohttp.ClientSession() as session, session.get(f"{service.url}/metrics") as response:
            assert "generations_listen_connected 0.0" in await response.text()
        [job] = await db.fetch(app.INSERT_JOB, 1, None)  # another replica's POST
        await db.execute(app.NOTIFY, ["generations_new"], [""])  # and its announcement, which is lost here
        await eventually(lambda: db.fetchval("SELECT status = 'completed' FROM jobs WHERE id = $1", job["id"]))
        assert service.log().count("notifications do not arrive") == 1
    finally:
        await asyncio.to_thread(service.stop)
        await db.close()
