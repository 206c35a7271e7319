"""Operating the service, as SPEC's "Operating it" and "Scaling out" describe it: /metrics, JSON
and text logs, startup against a bad or absent database, a database outage as the log and /ready
tell it, the public OpenAPI document, and the schema upgrade from 1.0 (which had per-row triggers).

Tests of the log and of startup run app.py as users do (`python app.py`, scripts/service.py);
the others run the app in-process (conftest.running). A real process is started once per
scenario and its log shared by the tests that read it.
"""

import asyncio
import contextlib
import json
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple, TypeVar
from urllib.parse import parse_qs, urlsplit

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

import app
from conftest import database_url, eventually
from scripts.pg import EmbeddedPostgres
from scripts.service import ROOT, Service, free_port
from test_api import TOKEN, serving
from test_app import SettingsFactory, assert_problem, post_job, wait_for_status

T = TypeVar("T")

# A job's log lines begin "job <id> attempt <n>".
ABOUT_A_JOB = re.compile(r"job ([0-9a-f-]{36}) attempt (\d+)\b")
# A line of the default (text) log format: time, level, logger: message.
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
TEXT_LINE = re.compile(rf"{STAMP} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: .*")
LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}


def until(check: Callable[[], T], within: float, pause: float = 0.05) -> T:
    """Call `check` until it returns something truthy; fail after `within` seconds. (conftest's
    `eventually`, for code outside an event loop.)"""
    deadline = time.monotonic() + within
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s (last result: {result!r})")
        time.sleep(pause)
    return result


async def admin(server_url: str, statement: str) -> None:
    """Run one statement on the server's maintenance database."""
    connection = await asyncpg.connect(server_url)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@contextlib.contextmanager
def empty_database(server_url: str) -> Iterator[str]:
    """A database with no schema yet (the service applies it at startup); dropped afterwards."""
    name = f"ops_{uuid.uuid4().hex}"
    asyncio.run(admin(server_url, f"CREATE DATABASE {name}"))
    try:
        yield database_url(server_url, name)
    finally:
        asyncio.run(admin(server_url, f"DROP DATABASE {name} WITH (FORCE)"))


# --- /metrics --------------------------------------------------------------------------------


class Scrape:
    """One /metrics answer, parsed by prometheus_client's own parser."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {family.name: family for family in text_string_to_metric_families(text)}
        self.samples = [sample for family in self.families.values() for sample in family.samples]

    def value(self, name: str, **labels: str) -> float | None:
        """The value of the sample with this name and exactly these labels; None if there is none."""
        found = [sample.value for sample in self.samples if sample.name == name and sample.labels == labels]
        assert len(found) <= 1, f"{len(found)} samples {name}{labels}"
        return found[0] if found else None

    def labelled(self, name: str) -> list[Sample]:
        """Every sample with this name."""
        return [sample for sample in self.samples if sample.name == name]


async def scrape(client: httpx.AsyncClient, **headers: str) -> Scrape:
    """GET /metrics: a 200 in the Prometheus text format. Every scrape of these tests passes here, so a
    stricter check of the format (promtool's) is one more line."""
    response = await client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return Scrape(response.text)


# Every family SPEC names, with its type.
SPEC_FAMILIES = {
    "generations_jobs": "gauge",
    "generations_oldest_pending_age_seconds": "gauge",
    "generations_jobs_created": "counter",
    "generations_attempts": "counter",
    "generations_job_wait_seconds": "histogram",
    "generations_job_run_seconds": "histogram",
    "generations_http_requests": "counter",
    "generations_http_request_duration_seconds": "histogram",
    "generations_listen_connected": "gauge",
}
JOB_ROUTE = "/generations/{job_id}"


async def listening(client: httpx.AsyncClient) -> Scrape | None:
    """The scrape, once it says that notifications arrive."""
    metrics = await scrape(client)
    return metrics if metrics.value("generations_listen_connected") == 1 else None


async def test_metrics_count_what_this_process_did(
    settings: SettingsFactory, db: asyncpg.Connection, check_metrics: Callable[[str], None]
) -> None:
    """After jobs made and completed here and some requests: every family SPEC names, with the jobs this
    process created (a replayed key adds none), their completed attempts, wait and run times, requests by
    route template (never an id; unknown paths share one label), and notifications arriving; promtool
    finds nothing wrong with the exposition."""
    async with serving(settings()) as client:
        single = await post_job(client, 1, **{"Idempotency-Key": "k"})
        replay = await client.post("/generations", json={"numImages": 1}, headers={"Idempotency-Key": "k"})
        assert replay.status_code == 200  # no new job
        batch = await client.post("/generations/batch", json={"jobs": [{"numImages": 2}, {"numImages": 3}]})
        ids = [single["jobId"]] + [job["jobId"] for job in batch.json()["jobs"]]
        for job_id in ids:
            await wait_for_status(db, job_id, "completed")
            assert (await client.get(f"/generations/{job_id}")).status_code == 200
        assert (await client.get(f"/generations/{uuid.uuid4()}")).status_code == 404
        assert (await client.get("/nope")).status_code == 404
        assert (await client.get("/nope/deeper/still")).status_code == 404
        metrics = await eventually(lambda: listening(client))

    assert {name: metrics.families[name].type for name in SPEC_FAMILIES} == SPEC_FAMILIES
    assert await db.fetchval("SELECT count(*) FROM jobs") == 3
    assert metrics.value("generations_jobs_created_total") == 3
    assert metrics.value("generations_attempts_total", result="completed") == 3
    assert metrics.value("generations_job_wait_seconds_count") == 3
    assert metrics.value("generations_job_run_seconds_count") == 3
    assert metrics.value("generations_job_run_seconds_sum") >= 0

    requests = "generations_http_requests_total"
    assert metrics.value(requests, method="POST", route="/generations", status="202") == 1
    assert metrics.value(requests, method="POST", route="/generations", status="200") == 1
    assert metrics.value(requests, method="POST", route="/generations/batch", status="202") == 1
    assert metrics.value(requests, method="GET", route=JOB_ROUTE, status="200") == 3
    assert metrics.value(requests, method="GET", route=JOB_ROUTE, status="404") == 1
    duration = "generations_http_request_duration_seconds_count"
    assert metrics.value(duration, method="GET", route=JOB_ROUTE) == 4
    templates = {route.path for route in app.create_app(app.Settings(database_url="postgresql://unused/x")).routes}
    routes = {sample.labels["route"] for sample in metrics.labelled(requests) + metrics.labelled(duration)}
    unmatched = routes - templates
    assert len(unmatched) == 1, routes  # one label for every path that matches no route
    assert not any(job_id in route or "nope" in route for route in routes for job_id in ids)
    assert metrics.value(requests, method="GET", route=unmatched.pop(), status="404") == 2
    check_metrics(metrics.text)


async def test_metrics_count_retried_and_failed_attempts(settings: SettingsFactory, db: asyncpg.Connection) -> None:
    """A job whose provider always fails, with MAX_ATTEMPTS=2: one attempt retried, one failed, none
    completed, and both attempts waited and ran."""
    config = settings(image_provider_failure_rate=1.0, max_attempts=2, worker_poll_interval=0.1)
    async with serving(config) as client:
        job = await post_job(client)
        await wait_for_status(db, job["jobId"], "failed")
        metrics = await scrape(client)
    assert metrics.value("generations_attempts_total", result="retried") == 1
    assert metrics.value("generations_attempts_total", result="failed") == 1
    assert metrics.value("generations_attempts_total", result="completed") in (None, 0)
    assert metrics.value("generations_job_wait_seconds_count") == 2
    assert metrics.value("generations_job_run_seconds_count") == 2


async def test_the_queue_gauges_are_what_the_database_holds(settings: SettingsFactory, db: asyncpg.Connection) -> None:
    """generations_jobs{status} counts the pending and processing jobs in the database, whoever made them;
    generations_oldest_pending_age_seconds is how long the oldest runnable pending job has been runnable,
    and 0 when no pending job is runnable (none at all, or only one waiting out a retry backoff)."""
    async with serving(settings(worker_concurrency=0)) as client:
        empty = await scrape(client)
        due, later, running = [(await post_job(client))["jobId"] for _ in range(3)]
        await db.execute("INSERT INTO jobs (num_images) VALUES (1)")  # another replica's job
        await db.execute("UPDATE jobs SET available_at = now() - interval '30 seconds' WHERE id = $1", uuid.UUID(due))
        await db.execute("UPDATE jobs SET available_at = now() + interval '1 hour' WHERE id = $1", uuid.UUID(later))
        await db.execute(
            "UPDATE jobs SET status = 'processing', attempts = 1, available_at = now() + interval '30 seconds'"
            " WHERE id = $1",
            uuid.UUID(running),
        )
        busy = await scrape(client)
        counts = dict(await db.fetch("SELECT status, count(*) FROM jobs GROUP BY status"))
        await db.execute("UPDATE jobs SET status = 'cancelled' WHERE available_at <= now()")
        waiting = await scrape(client)

    assert empty.value("generations_jobs", status="pending") == 0
    assert empty.value("generations_jobs", status="processing") == 0
    assert empty.value("generations_oldest_pending_age_seconds") == 0
    assert counts == {"pending": 3, "processing": 1}
    assert busy.value("generations_jobs", status="pending") == counts["pending"]
    assert busy.value("generations_jobs", status="processing") == counts["processing"]
    assert 30 <= busy.value("generations_oldest_pending_age_seconds") < 40
    assert busy.value("generations_jobs_created_total") == 3  # this process's, not the database's
    assert waiting.value("generations_jobs", status="pending") == 1
    assert waiting.value("generations_oldest_pending_age_seconds") == 0
    assert "100000" in busy.families["generations_jobs"].documentation  # where the count stops being exact


async def test_metrics_need_the_token_when_api_token_is_set(settings: SettingsFactory) -> None:
    """With API_TOKEN set, /metrics is a 401 without the token and the usual scrape with it."""
    async with serving(settings(worker_concurrency=0, api_token=TOKEN)) as client:
        refused = await client.get("/metrics")
        metrics = await scrape(client, Authorization=f"Bearer {TOKEN}")
    assert_problem(refused, 401)
    assert refused.headers["www-authenticate"] == "Bearer"
    assert set(SPEC_FAMILIES) <= set(metrics.families)


# --- Logs ------------------------------------------------------------------------------------


def json_entry(line: str) -> dict[str, Any] | None:
    """The JSON object a log line holds, or None if it holds something else."""
    with contextlib.suppress(ValueError):
        entry = json.loads(line)
        return entry if isinstance(entry, dict) else None
    return None


class JsonRun(NamedTuple):
    """Every line one `python app.py` with LOG_FORMAT=json wrote, and the jobs it ran."""

    lines: list[str]
    completed_id: str
    cancelled_id: str

    def entries(self, logger: str | None = None) -> list[dict[str, Any]]:
        """The lines as JSON objects (of one logger, if given)."""
        entries = [json_entry(line) or {} for line in self.lines]
        return [entry for entry in entries if logger in (None, entry.get("logger"))]


@pytest.fixture(scope="module")
def json_run(server_url: str, tmp_path_factory: pytest.TempPathFactory) -> JsonRun:
    """One process with LOG_FORMAT=json and LOG_LEVEL=DEBUG (so the access log is on), on an empty
    database, from start to SIGTERM: a job completed (POSTed with X-Request-ID: abc), a job cancelled
    while it ran (so its attempt is stopped), a 404 for an unknown path."""
    log_path = tmp_path_factory.mktemp("json-log") / "service.log"
    with empty_database(server_url) as url:
        service = Service(url, log_path, LOG_FORMAT="json", LOG_LEVEL="DEBUG", IMAGE_PROVIDER_DELAY=0.5)
        with service, httpx.Client(base_url=service.url, timeout=15) as http:
            completed = http.post("/generations", json={"numImages": 2}, headers={"X-Request-ID": "abc"}).json()
            assert http.get(f"/generations/{completed['jobId']}", params={"wait": 10}).json()["status"] == "completed"
            cancelled = http.post("/generations", json={"numImages": 1}).json()
            path = f"/generations/{cancelled['jobId']}"
            until(lambda: http.get(path).json()["status"] == "processing", within=10)
            assert http.post(f"{path}/cancel").status_code == 200
            until(lambda: "claim lost" in service.log(), within=10)
            assert http.get("/nope").status_code == 404
            service.stop(within=15)
    return JsonRun(service.log().splitlines(), completed["jobId"], cancelled["jobId"])


def test_with_log_format_json_every_line_is_one_json_object(json_run: JsonRun) -> None:
    """LOG_FORMAT=json: every line the process wrote, uvicorn's from start to shutdown included, is one
    JSON object with an RFC 3339 UTC time, a level, a logger and a message."""
    assert [line for line in json_run.lines if json_entry(line) is None] == []
    for entry in json_run.entries():
        assert {"time", "level", "logger", "message"} <= entry.keys(), entry
        assert datetime.fromisoformat(entry["time"]).utcoffset() == timedelta(0), entry
        assert entry["level"] in LEVELS, entry
    uvicorn = [entry["message"] for entry in json_run.entries("uvicorn.error")]
    for said in ("Started server process", "Application startup complete", "Shutting down", "Finished server process"):
        assert any(message.startswith(said) for message in uvicorn), said
    assert len(json_run.entries("uvicorn.access")) >= 6  # POST, GET, POST, GET, cancel, 404 (and /health)
    assert "generations stopped" in [entry["message"] for entry in json_run.entries("generations")]


def test_json_lines_logged_for_a_request_carry_its_request_id(json_run: JsonRun) -> None:
    """Each request's lines carry its request_id: the client's X-Request-ID, else a new one per request."""
    access = json_run.entries("uvicorn.access")
    posts = [entry for entry in access if '"POST /generations HTTP/1.1" 202' in entry["message"]]
    [missing] = [entry for entry in access if '"GET /nope HTTP/1.1" 404' in entry["message"]]
    assert posts[0]["request_id"] == "abc"
    assert re.fullmatch(r"[0-9a-f]{32}", posts[1]["request_id"])
    assert re.fullmatch(r"[0-9a-f]{32}", missing["request_id"])
    assert len({entry["request_id"] for entry in access}) == len(access)  # one per request


def test_json_lines_about_a_job_carry_its_job_id_and_attempt(json_run: JsonRun) -> None:
    """Every line about a job ("job <id> attempt <n> ...": generating, or its result dropped because it was
    cancelled) carries that job_id and attempt, and no request's id."""
    about = [
        (entry, match) for entry in json_run.entries("generations") if (match := ABOUT_A_JOB.match(entry["message"]))
    ]
    assert {match[1] for _, match in about} == {json_run.completed_id, json_run.cancelled_id}
    assert any("claim lost" in entry["message"] for entry, _ in about)
    for entry, match in about:
        assert (entry.get("job_id"), entry.get("attempt")) == (match[1], int(match[2])), entry
        assert "request_id" not in entry, entry


# --- Startup ---------------------------------------------------------------------------------


def run_app(**env: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run `python app.py` with only these variables (and an empty PATH) until it exits; how long it took."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "app.py"], cwd=ROOT, env={"PATH": "", **env}, capture_output=True, text=True, timeout=60
    )
    return done, time.monotonic() - started


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DATABASE_URL", "nonsense"),
        ("DATABASE_URL", "mysql://u:p@127.0.0.1/x"),
        ("LISTEN_DATABASE_URL", "nonsense"),
        ("DATABASE_URL", "postgresql://u@127.0.0.1/x?port=abc"),  # asyncpg raises ValueError for it at connect
        ("LISTEN_DATABASE_URL", "postgresql://u@127.0.0.1/x?host=127.0.0.1&port=5432,x"),
    ],
)
def test_a_database_url_that_is_not_postgresql_stops_startup_at_once(name: str, value: str) -> None:
    """A URL that is not a PostgreSQL URL is a configuration error: exit status 1 within 2 s, with one line
    naming the variable, before any try to connect."""
    done, seconds = run_app(**{"DATABASE_URL": "postgresql://u@127.0.0.1:1/x", name: value})
    assert done.returncode == 1
    assert seconds < 2
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith(f"generations: configuration error: {name} must be a PostgreSQL URL")


def test_an_unreachable_database_is_tried_then_given_up() -> None:
    """With nothing listening at the database's address and DATABASE_WAIT_SECONDS=2: one warning per try
    naming host:port, then one error line and exit status 1, within 2 s and a few more; no traceback, and
    never the password."""
    port, wait = free_port(), 2
    done, seconds = run_app(DATABASE_URL=f"postgresql://u:secretpw@127.0.0.1:{port}/x", DATABASE_WAIT_SECONDS=str(wait))
    output = done.stdout + done.stderr
    assert done.returncode == 1
    assert seconds < wait + 3
    assert "Traceback" not in output
    assert "secretpw" not in output
    *tries, last = output.splitlines()
    assert wait <= len(tries) <= wait + 1, output  # a try a second
    for line in tries:
        assert re.fullmatch(
            rf"{STAMP} WARNING generations: waiting for the database at 127\.0\.0\.1:{port}: connection refused", line
        )
    assert re.fullmatch(
        rf"{STAMP} ERROR generations: cannot use the database at 127\.0\.0\.1:{port} \(connection refused\); exiting",
        last,
    )


# --- Shutdown --------------------------------------------------------------------------------


def test_a_request_still_open_at_sigterm_does_not_lengthen_the_grace_of_running_jobs(
    server_url: str, tmp_path: Path
) -> None:
    """uvicorn waits up to SHUTDOWN_GRACE_SECONDS for open requests before the app's shutdown begins. The
    grace of running jobs counts from the signal all the same: a client still sending its body at SIGTERM
    does not keep the process running past the grace period (an orchestrator's stop timeout) before the
    running job is handed back."""
    grace = 2
    with empty_database(server_url) as url:
        service = Service(url, tmp_path / "service.log", SHUTDOWN_GRACE_SECONDS=grace, IMAGE_PROVIDER_DELAY=30)
        with service, httpx.Client(base_url=service.url, timeout=15) as http:
            path = f"/generations/{http.post('/generations', json={'numImages': 1}).json()['jobId']}"
            until(lambda: http.get(path).json()["status"] == "processing", within=10)
            with socket.create_connection(("127.0.0.1", service.port), timeout=10) as slow:
                head = b"POST /generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                slow.sendall(head + b"Content-Length: 20\r\n\r\n{")  # and no more
                time.sleep(0.5)
                signalled = time.monotonic()
                service.stop(within=30)
                exited = time.monotonic() - signalled
    assert "unfinished jobs handed back to the queue: 1;" in service.log()
    assert exited < grace + 1.5, service.log()


# --- A database outage -----------------------------------------------------------------------


class OutageRun(NamedTuple):
    """What one `python app.py` (default LOG_FORMAT) wrote while its database was stopped for 3 s under
    light load and started again, and how /ready answered while it was down."""

    log: str
    address: str  # the database's address as the URL gives it: its socket folder and port
    ready: list[httpx.Response]


@pytest.fixture(scope="module")
def outage(tmp_path_factory: pytest.TempPathFactory) -> OutageRun:
    """A service on a PostgreSQL server of its own, which is stopped for 3 s while a client asks for a job
    and /ready four times a second, then started again; the service is stopped once it says the
    database is back and answers again."""
    folder = tmp_path_factory.mktemp("outage")
    server = EmbeddedPostgres(folder / "pg", delete_on_exit=True)
    try:
        asyncio.run(admin(server.url, "CREATE DATABASE outage"))
        url = server.url_for("outage")
        service = Service(url, folder / "service.log", IMAGE_PROVIDER_DELAY=0)
        with service, httpx.Client(base_url=service.url, timeout=15) as http:
            job = http.post("/generations", json={"numImages": 1}).json()
            path = f"/generations/{job['jobId']}"
            assert http.get(path, params={"wait": 10}).json()["status"] == "completed"

            def light_load() -> httpx.Response:
                """A quarter of a second's load: the job, and /ready (which is returned)."""
                time.sleep(0.25)
                http.get(path)
                return http.get("/ready")

            server.stop()
            back_at = time.monotonic() + 3
            ready: list[httpx.Response] = []
            while time.monotonic() < back_at:
                ready.append(light_load())
            server.start()
            until(lambda: light_load().status_code == 200, within=30, pause=0)
            until(lambda: "the database is back" in service.log(), within=10)
            assert [http.get(path).status_code for _ in range(5)] == [200] * 5
            service.stop(within=15)
    finally:
        server.close()
    return OutageRun(service.log(), f"{parse_qs(urlsplit(url).query)['host'][0]}:5432", ready)


def test_an_outage_is_one_warning_when_it_begins_and_one_line_when_it_ends(outage: OutageRun) -> None:
    """However many requests and background steps fail while the database is down, the log says so once,
    as a warning, and once, after it is back, how long it was gone; no traceback, no error, and none of
    asyncpg's own pool warnings."""
    lines = outage.log.splitlines()
    unavailable = [line for line in lines if "the database is unavailable (" in line]
    back = [line for line in lines if "the database is back after " in line]
    assert len(unavailable) == 1, unavailable
    assert len(back) == 1, back
    assert " WARNING generations: " in unavailable[0]
    assert " INFO generations: " in back[0]
    assert lines.index(unavailable[0]) < lines.index(back[0])
    assert float(re.search(r"back after ([\d.]+)s", back[0])[1]) >= 2.5  # it was down for 3 s
    assert "Traceback" not in outage.log
    assert "Failed to restore the pool connection floor" not in outage.log
    assert "notifications arrive again" not in outage.log  # they never stopped arriving: the connection was lost
    assert [line for line in lines if " ERROR " in line] == []


def test_ready_says_which_database_is_down_and_when_to_ask_again(outage: OutageRun) -> None:
    """While the database is down, /ready is a 503 problem with Retry-After, whose detail names the database's
    address (never more of its URL) and why: "(connection refused)" once the server is gone."""
    assert len(outage.ready) >= 4
    for response in outage.ready:
        assert_problem(response, 503)
        assert int(response.headers["retry-after"]) > 0
        detail = response.json()["detail"]
        assert re.fullmatch(rf"Not ready: the database at {re.escape(outage.address)} is unavailable \(.+\)\.", detail)
    refused = f"Not ready: the database at {outage.address} is unavailable (connection refused)."
    assert outage.ready[-1].json()["detail"] == refused


def test_by_default_every_log_line_is_text(outage: OutageRun) -> None:
    """With LOG_FORMAT unset, every line, uvicorn's included, is text: time, level, logger: message."""
    lines = outage.log.splitlines()
    assert [line for line in lines if not TEXT_LINE.fullmatch(line)] == []
    assert any(" INFO uvicorn.error: Started server process" in line for line in lines)


# --- The OpenAPI document --------------------------------------------------------------------


async def test_the_document_the_root_points_to_needs_no_token(settings: SettingsFactory) -> None:
    """With API_TOKEN set, / and the document its `docs` names, /openapi.json, both answer without a token."""
    async with serving(settings(worker_concurrency=0, api_token=TOKEN)) as client:
        root = await client.get("/")
        document = await client.get(root.json()["docs"])
    assert root.json()["docs"] == "/openapi.json"
    assert document.status_code == 200
    assert document.json()["openapi"].startswith("3.1.")


# --- The schema ------------------------------------------------------------------------------

TRIGGERS_ON_JOBS = "SELECT tgname FROM pg_trigger WHERE tgrelid = 'jobs'::regclass AND NOT tgisinternal"
INDEXES_ON_JOBS = "SELECT indexname FROM pg_indexes WHERE tablename = 'jobs'"
OLD_FUNCTIONS = "SELECT proname FROM pg_proc WHERE proname LIKE 'notify_generations%'"

# 1.0's per-row triggers, whose NOTIFY made inserts commit one at a time; 1.0 (re)creates them at every start.
TRIGGERS_1_0 = """
CREATE FUNCTION notify_generations_new() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('generations_new', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_notify_new AFTER INSERT OR UPDATE OF status ON jobs
    FOR EACH ROW WHEN (NEW.status = 'pending' AND NEW.available_at <= now())
    EXECUTE FUNCTION notify_generations_new();

CREATE FUNCTION notify_generations_done() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('generations_done', NEW.id::text);
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_notify_done AFTER UPDATE OF status ON jobs
    FOR EACH ROW WHEN (NEW.status IN ('completed', 'failed', 'cancelled') AND OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION notify_generations_done();
"""

# What 1.0's schema.sql left in a database: no batch columns, and its triggers.
SCHEMA_1_0 = f"""
DROP INDEX jobs_batch_key;
ALTER TABLE jobs DROP COLUMN batch_index, DROP COLUMN batch_key;
{TRIGGERS_1_0}
INSERT INTO jobs (num_images, idempotency_key) VALUES (2, 'made-by-1.0');
"""


async def test_the_jobs_table_has_no_trigger(db: asyncpg.Connection) -> None:
    """The schema the app applies puts no trigger on jobs: the service announces new jobs itself, at
    most one NOTIFY per transaction, rather than one per inserted row."""
    assert await db.fetch(TRIGGERS_ON_JOBS) == []
    assert await db.fetch(OLD_FUNCTIONS) == []


@pytest.mark.parametrize("version", ["DROP TABLE schema_version", "UPDATE schema_version SET version = 'an older one'"])
async def test_a_database_of_the_previous_version_is_upgraded_on_start(
    settings: SettingsFactory, db: asyncpg.Connection, version: str
) -> None:
    """A database that 1.0 made (no schema_version, or another version in it) is brought up to date when
    the service starts: its triggers and their functions are gone, a batch with a key works, and a key
    1.0 took still finds its job (1.0's idempotency index stays: 1.0 replicas still running use it)."""
    await db.execute(SCHEMA_1_0)
    await db.execute(version)
    old_job = await db.fetchval("SELECT id FROM jobs WHERE idempotency_key = 'made-by-1.0'")
    async with serving(settings(worker_concurrency=0)) as client:
        key = {"Idempotency-Key": "batch"}
        first = await client.post("/generations/batch", json={"jobs": [{"numImages": 1}] * 3}, headers=key)
        again = await client.post("/generations/batch", json={"jobs": [{"numImages": 1}] * 3}, headers=key)
        replay = await client.post("/generations", json={"numImages": 2}, headers={"Idempotency-Key": "made-by-1.0"})
    assert await db.fetch(TRIGGERS_ON_JOBS) == []
    assert await db.fetch(OLD_FUNCTIONS) == []
    indexes = {row["indexname"] for row in await db.fetch(INDEXES_ON_JOBS)}
    assert {"jobs_idempotency_key", "jobs_batch_key"} <= indexes
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json() == first.json()
    assert (replay.status_code, replay.json()["jobId"]) == (200, str(old_job))


async def test_triggers_a_1_0_replica_put_back_are_dropped_at_the_next_start(
    settings: SettingsFactory, db: asyncpg.Connection
) -> None:
    """A 1.0 replica started after the schema was upgraded (in a rollout, or a rollback) puts its
    triggers back and leaves schema_version as it was: the next 1.1 start drops them all the same."""
    await db.execute(TRIGGERS_1_0)
    async with serving(settings(worker_concurrency=0)):
        pass
    assert await db.fetch(TRIGGERS_ON_JOBS) == []
    assert await db.fetch(OLD_FUNCTIONS) == []


async def test_a_replica_that_waited_while_another_applied_the_schema_does_not_apply_it_again(
    db_url: str, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """Replicas that start together on an outdated schema take turns at schema.sql. One that waited for its
    turn while another applied it finds the schema current: it takes no lock on jobs, so it neither waits
    for nor holds up the transactions of replicas already running (here: a read in a transaction)."""
    current = await db.fetchval(app.SELECT_SCHEMA_VERSION)
    await db.execute("UPDATE schema_version SET version = 'an older one'")
    other, reader = await asyncpg.connect(db_url), await asyncpg.connect(db_url)
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=1)
    try:
        applying = other.transaction()  # the replica whose turn it is
        await applying.start()
        await other.execute(app.LOCK_SCHEMA)
        starting = asyncio.create_task(app.apply_schema(pool))
        waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        await eventually(lambda: db.fetchval(waiting))
        await other.execute("UPDATE schema_version SET version = $1", current)  # it applied schema.sql
        async with reader.transaction():
            await reader.fetchval("SELECT count(*) FROM jobs")
            await applying.commit()
            await asyncio.wait_for(starting, 10)
    finally:
        await pool.close()
        await other.close()
        await reader.close()
    messages = [record.getMessage() for record in caplog.records if record.name == "generations"]
    assert not [message for message in messages if "schema.sql" in message], messages
    assert await db.fetchval(app.SELECT_SCHEMA_VERSION) == current


async def test_a_replica_waits_as_long_as_another_takes_to_apply_the_schema(
    settings: SettingsFactory, db: asyncpg.Connection, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While one replica applies schema.sql (an index on a large jobs table takes a while), another starting
    beside it waits for its turn however long that takes: the query timeout of requests does not apply."""
    monkeypatch.setattr(app, "QUERY_TIMEOUT_SECONDS", 0.5)
    current = await db.fetchval(app.SELECT_SCHEMA_VERSION)
    await db.execute("UPDATE schema_version SET version = 'an older one'")
    other = await asyncpg.connect(db_url)
    try:
        async with other.transaction():  # the replica whose turn it is
            await other.execute(app.LOCK_SCHEMA)
            starting = asyncio.create_task(app.open_pool(settings()))
            await asyncio.sleep(1.5)
            assert not starting.done() or starting.result()
            await other.execute("UPDATE schema_version SET version = $1", current)
        pool = await asyncio.wait_for(starting, 10)
        await pool.close()
    finally:
        await other.close()
