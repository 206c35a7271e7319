"""Test fixtures: a real PostgreSQL, one fresh database per test, and the app around it.

The server is the embedded one (started once per session) unless TEST_DATABASE_URL or
DATABASE_URL names another. Each test gets its own database, cloned from a template that
already has the schema, so tests never see each other's jobs.
"""

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager

import app
from scripts.pg import EmbeddedPostgres

TEMPLATE = "generations_template"


def database_url(server_url: str, database: str) -> str:
    """The same server's URL, for another database."""
    base, _, query = server_url.partition("?")
    return f"{base.rsplit('/', 1)[0]}/{database}" + (f"?{query}" if query else "")


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a PostgreSQL server's maintenance database, for the whole session."""
    given = os.environ.get("TEST_DATABASE_URL") or os.environ.get("DATABASE_URL")
    if given:
        yield given
        return
    server = EmbeddedPostgres(tmp_path_factory.mktemp("postgres") / "data", delete_on_exit=True)
    yield server.url
    server.close()


@pytest.fixture(scope="session")
def template_url(server_url: str) -> str:
    """A template database with the schema applied, made once per session."""

    async def make_template() -> None:
        admin = await asyncpg.connect(server_url)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)")
            await admin.execute(f"CREATE DATABASE {TEMPLATE}")
        finally:
            await admin.close()
        pool = await asyncpg.create_pool(database_url(server_url, TEMPLATE), min_size=1, max_size=1)
        try:
            await app.apply_schema(pool)
        finally:
            await pool.close()

    asyncio.run(make_template())
    return database_url(server_url, TEMPLATE)


@pytest.fixture
async def db_url(server_url: str, template_url: str) -> AsyncIterator[str]:
    """A fresh database for one test, cloned from the template; dropped afterwards."""
    name = f"test_{uuid.uuid4().hex}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
        yield database_url(server_url, name)
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
    finally:
        await admin.close()


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the test's database, for setting up and checking from outside the app."""
    connection = await asyncpg.connect(db_url)
    await app.setup_connection(connection)
    yield connection
    await connection.close()


@pytest.fixture
def settings(db_url: str) -> Callable[..., app.Settings]:
    """Settings for the test's database: a fast provider and short timings, overridable."""

    def make(**overrides: Any) -> app.Settings:
        defaults: dict[str, Any] = {
            "database_url": db_url,
            "image_provider_delay": 0.0,
            "worker_poll_interval": 0.2,
            "job_lease_seconds": 5.0,
            "shutdown_grace_seconds": 1.0,
        }
        return app.Settings(**(defaults | overrides))

    return make


@asynccontextmanager
async def running(settings: app.Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running, and an HTTP client talking to it in-process."""
    async with LifespanManager(app.create_app(settings), startup_timeout=30, shutdown_timeout=60) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


@pytest.fixture
async def client(settings: Callable[..., app.Settings]) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app with default test settings (worker on, instant provider)."""
    async with running(settings()) as client:
        yield client


@pytest.fixture
def waiting_polls(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """How many long polls are waiting for a wake-up right now (inside Notifications.watch)."""
    waiting = 0
    watch = app.Notifications.watch

    @contextmanager
    def counted(self: app.Notifications, job_id: uuid.UUID) -> Iterator[asyncio.Event]:
        nonlocal waiting
        with watch(self, job_id) as event:
            waiting += 1
            try:
                yield event
            finally:
                waiting -= 1

    monkeypatch.setattr(app.Notifications, "watch", counted)
    return lambda: waiting


async def eventually(check: Callable[[], Awaitable[Any]], within: float = 10.0) -> Any:
    """Poll `check` until it returns something truthy, failing after `within` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {within}s (last result: {result!r})")
        await asyncio.sleep(0.02)


# --- PgBouncer and promtool ------------------------------------------------------------------
# A real PgBouncer (scripts/pgbouncer.py) in transaction pooling mode in front of the session's
# server, and Prometheus's promtool to lint metrics expositions. Each is installed from Debian's
# packages when missing and we are root. (Imported here so that this block stands on its own.)

import subprocess  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

from scripts.pgbouncer import PgBouncer, installed  # noqa: E402

# PgBouncer's server connections per database: fewer than the clients that tests open through it.
PGBOUNCER_POOL_SIZE = 4


def installed_or_skip(program: str, *, package: str) -> str:
    """The path of `program`, installed from Debian's `package` if need be (as root, as in CI); where we
    are not root and it is missing, the test is skipped with the command that installs it."""
    try:
        return installed(program, package=package)
    except RuntimeError as error:
        if os.geteuid() != 0:
            pytest.skip(str(error))
        raise


@pytest.fixture(scope="session")
def pgbouncer_url(server_url: str) -> Iterator[str]:
    """A PgBouncer in transaction pooling mode, PGBOUNCER_POOL_SIZE server connections per database,
    in front of the session's server: the URL of the maintenance database through it."""
    installed_or_skip("pgbouncer", package="pgbouncer")
    bouncer = PgBouncer(server_url, pool_size=PGBOUNCER_POOL_SIZE).start()
    try:
        yield bouncer.url(urlsplit(server_url).path.lstrip("/") or "postgres")
    finally:
        bouncer.stop()


@pytest.fixture
def pgbouncer_db_url(pgbouncer_url: str, db_url: str) -> str:
    """The test's own database (see db_url), through the session's PgBouncer."""
    return database_url(pgbouncer_url, urlsplit(db_url).path.lstrip("/"))


@pytest.fixture(scope="session")
def promtool() -> str:
    """The path of Prometheus's promtool (Debian package `prometheus`)."""
    return installed_or_skip("promtool", package="prometheus")


@pytest.fixture
def check_metrics(promtool: str) -> Callable[[str], None]:
    """check_metrics(text) fails the test with promtool's words unless `text` is a clean Prometheus
    text exposition. Both kinds of finding count: a line that does not parse (promtool exits 1)
    and any lint finding (exit 3: a counter without _total, no HELP, a non-base unit such as
    milliseconds, a camelCase name), since an exposition we write ourselves has no excuse for
    either. promtool 2.42 (Debian 12) does not report duplicate series."""

    def check(text: str) -> None:
        done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.fail(f"promtool check metrics found problems (exit {done.returncode}):\n{done.stdout}{done.stderr}")

    return check
