"""Behaviour of the generations service, against a real PostgreSQL (see conftest.py)."""

import asyncio
import dataclasses
import json
import logging
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager

import app
from conftest import eventually, running
from scripts.pg import EmbeddedPostgres
from scripts.service import free_port

JSON = {"Content-Type": "application/json"}
URL_PATTERN = re.compile(r"https://placehold\.co/512x512/png\?text=a\+cute\+([a-z]+)\+(\d+)")
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")

SettingsFactory = Callable[..., app.Settings]
NO_IMAGES = [[], [], [], [], []]  # COMPLETE_JOBS's pictures sent as bytes: none


async def post_job(client: httpx.AsyncClient, num_images: int = 1, **headers: str) -> dict:
    """POST a job that must be accepted; return its JSON."""
    response = await client.post("/generations", json={"numImages": num_images}, headers=headers)
    assert response.status_code == 202, response.text
    return response.json()


async def insert_job(db: asyncpg.Connection, num_images: int = 1) -> uuid.UUID:
    """Queue a job straight into the database, as another replica's POST would."""
    return await db.fetchval("INSERT INTO jobs (num_images) VALUES ($1) RETURNING id", num_images)


async def job_row(db: asyncpg.Connection, job_id: str | uuid.UUID) -> asyncpg.Record:
    """The job as the database has it."""
    return await db.fetchrow("SELECT * FROM jobs WHERE id = $1", uuid.UUID(str(job_id)))


async def wait_for_status(db: asyncpg.Connection, job_id: str | uuid.UUID, *statuses: str, within: float = 10):
    """Wait until the job has one of `statuses`; return its row."""

    async def reached() -> asyncpg.Record | None:
        row = await job_row(db, job_id)
        return row if row["status"] in statuses else None

    return await eventually(reached, within)


def answer_late(monkeypatch: pytest.MonkeyPatch, query: str, seconds: float) -> None:
    """Hold back the answer to `query` through the pool for `seconds` after it has committed."""
    real_fetch = asyncpg.Pool.fetch

    async def fetch(pool: asyncpg.Pool, sql: str, *args: object, **kwargs: object) -> list:
        rows = await real_fetch(pool, sql, *args, **kwargs)
        if sql == query:
            await asyncio.sleep(seconds)  # committed; the answer is on its way
        return rows

    monkeypatch.setattr(asyncpg.Pool, "fetch", fetch)


def provider_taking(monkeypatch: pytest.MonkeyPatch, seconds: dict[int, float]) -> None:
    """The mock provider taking seconds[n] for a job of n images."""
    real_provider = app.generate_images

    async def generate(
        job_id: uuid.UUID, attempt: int, animal: str, num_images: int, settings: app.Settings, http: Any
    ) -> list[str]:
        slower = dataclasses.replace(settings, image_provider_delay=seconds[num_images])
        return await real_provider(job_id, attempt, animal, num_images, slower, http)

    monkeypatch.setattr(app, "generate_images", generate)


# RFC 9110's name for each status, as every Python must give it (3.11's own differ for 413, 422).
TITLES = {
    400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
    413: "Content Too Large", 415: "Unsupported Media Type", 422: "Unprocessable Content",
    500: "Internal Server Error", 503: "Service Unavailable",
}  # fmt: skip


def assert_problem(response: httpx.Response, status: int, detail: str | None = None) -> None:
    """The response is an RFC 9457 problem with this status, its title (and detail)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["type"] == "about:blank"
    assert (body["status"], body["title"]) == (status, TITLES[status])
    assert body["detail"]
    if detail is not None:
        assert body["detail"] == detail


# --- The HTTP API ----------------------------------------------------------------------------


async def test_post_accepts_a_job_and_says_where_it_is(settings: SettingsFactory) -> None:
    """POST answers 202 with the whole job JSON, pending, and its URL in Location."""
    async with running(settings(worker_concurrency=0)) as client:
        response = await client.post("/generations", json={"numImages": 3})
    assert response.status_code == 202
    job = response.json()
    assert response.headers["location"] == f"/generations/{job['jobId']}"
    assert uuid.UUID(job["jobId"])
    assert job | {"jobId": None, "createdAt": None, "updatedAt": None} == {
        "jobId": None,
        "status": "pending",
        "numImages": 3,
        "animal": None,
        "imageUrls": None,
        "error": None,
        "attempts": 0,
        "createdAt": None,
        "updatedAt": None,
        "completedAt": None,
    }
    assert TIMESTAMP.fullmatch(job["createdAt"]) and TIMESTAMP.fullmatch(job["updatedAt"])


async def test_a_get_right_after_a_post_finds_the_job(settings: SettingsFactory) -> None:
    """Read-your-writes: the insert is committed before the POST's response goes out."""
    async with running(settings(worker_concurrency=0)) as client:
        for _ in range(20):
            job = await post_job(client)
            response = await client.get(f"/generations/{job['jobId']}")
            assert response.status_code == 200
            assert response.json() == job


@pytest.mark.parametrize("job_id", [str(uuid.uuid4()), "not-a-uuid", "1", "%20", "' OR 1=1 --"])
async def test_unknown_or_malformed_job_ids_are_not_found(client: httpx.AsyncClient, job_id: str) -> None:
    """Any id that names no job is a 404 `Job not found`, never a 500."""
    assert_problem(await client.get(f"/generations/{job_id}"), 404, "Job not found")
    assert_problem(await client.post(f"/generations/{job_id}/cancel"), 404, "Job not found")


async def test_listing_is_newest_first_and_filters_by_status(settings: SettingsFactory, db: asyncpg.Connection) -> None:
    """GET /generations lists jobs newest first; ?status= and ?limit= narrow it."""
    async with running(settings(worker_concurrency=0)) as client:
        ids = [(await post_job(client))["jobId"] for _ in range(4)]
        await db.execute("UPDATE jobs SET status = 'failed' WHERE id = $1", uuid.UUID(ids[1]))
        listed = (await client.get("/generations")).json()
        assert [job["jobId"] for job in listed] == ids[::-1]
        failed = (await client.get("/generations?status=failed")).json()
        assert [job["jobId"] for job in failed] == [ids[1]]
        two = await client.get("/generations?limit=2")
        assert [job["jobId"] for job in two.json()] == ids[:1:-1]
        assert 'rel="next"' in two.headers["link"]


async def test_paging_walks_every_job_exactly_once_while_jobs_are_added(settings: SettingsFactory) -> None:
    """Following Link: rel="next" returns each job once, even as new jobs are created."""
    async with running(settings(worker_concurrency=0)) as client:
        before = {(await post_job(client))["jobId"] for _ in range(11)}
        seen: list[str] = []
        url: str | None = "/generations?limit=3"
        while url:
            response = await client.get(url)
            assert response.status_code == 200
            seen += [job["jobId"] for job in response.json()]
            await post_job(client)  # a newer job must not shift the pages
            link = response.headers.get("link")
            url = re.fullmatch(r'<([^>]+)>; rel="next"', link).group(1) if link else None
        assert len(seen) == len(set(seen)) == 11
        assert set(seen) == before


@pytest.mark.parametrize(
    "query",
    ["status=done", "status=", "limit=0", "limit=201", "limit=abc", "limit=-1", "cursor=abc", "cursor=", "cursor=%00"],
)
async def test_bad_listing_parameters_are_400(client: httpx.AsyncClient, query: str) -> None:
    """An unknown status, a limit outside 1..200 or a cursor we did not make is a 400."""
    assert_problem(await client.get(f"/generations?{query}"), 400)


async def test_health_ready_and_root(client: httpx.AsyncClient) -> None:
    """/health and / answer without the database; /ready says the database and worker are up."""
    health = await client.get("/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "version": app.VERSION}
    ready = await client.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"
    assert (await client.get("/")).json() == {
        "message": "Generations: ask for pictures of a random animal.",
        "version": app.VERSION,
        "docs": "/openapi.json",
    }


async def test_a_background_step_that_fails_is_logged_and_runs_again(
    settings: SettingsFactory, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A background step that raises something unexpected (here, the notification sender, once) is
    logged with its traceback and runs again: the job it was announcing still reaches another replica."""
    real_flush = app.Notifications.flush
    failures = []

    async def fails_once(self: app.Notifications) -> None:
        if self.new_jobs and not failures:  # the API's announcement of the job
            failures.append(1)
            raise RuntimeError("a bug in the sender")
        await real_flush(self)

    monkeypatch.setattr(app.Notifications, "flush", fails_once)
    async with running(settings(worker_concurrency=0)) as api, running(settings(worker_poll_interval=3600)) as other:
        await eventually(lambda: listening(other))  # from now on, only an announcement wakes its worker
        job = await post_job(api)
        await wait_for_status(db, job["jobId"], "completed")
    [record] = [r for r in caplog.records if r.getMessage() == "notifying failed"]
    assert record.levelname == "ERROR" and "a bug in the sender" in str(record.exc_info[1])


async def test_a_result_postgresql_refuses_fails_its_attempt_and_the_rest_is_written(
    settings: SettingsFactory, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finished job whose result PostgreSQL refuses (here a content type with a NUL, which the
    provider checks would not let through) fails its attempt and is retried; the jobs written in the
    same batch complete, and the writer goes on."""
    real_check = app.checked_images

    def poisons_two_images(images: object, num_images: int) -> list[app.Image]:
        return [("image/png\x00", b"x")] * 2 if num_images == 2 else real_check(images, num_images)

    monkeypatch.setattr(app, "checked_images", poisons_two_images)
    async with running(settings(max_attempts=2, image_provider_delay=0.2)) as client:
        jobs = [await post_job(client, n) for n in (1, 2, 1)]  # finished together: one batch
        bad = await wait_for_status(db, jobs[1]["jobId"], "failed")
        for job in (jobs[0], jobs[2], await post_job(client, 1)):
            await wait_for_status(db, job["jobId"], "completed")
    assert bad["attempts"] == 2
    assert bad["error"].startswith("the result could not be stored: CharacterNotInRepertoireError")


async def test_ready_says_which_background_task_stopped(
    settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A background task that ends for good (here the claim loop, by a bug outside its own error
    handling) makes /ready a 503 that names it."""

    async def broken(self: app.Worker) -> None:
        raise RuntimeError("a bug in the claim loop")

    monkeypatch.setattr(app.Worker, "claim_until_stopped", broken)
    async with running(settings()) as client:
        ready = await eventually(lambda: not_ready(client))
    assert_problem(ready, 503)
    assert "the worker is not running" in ready.json()["detail"]
    assert ready.headers["retry-after"] == "2"


async def not_ready(client: httpx.AsyncClient) -> httpx.Response | None:
    response = await client.get("/ready")
    return response if response.status_code == 503 else None


# --- Errors ----------------------------------------------------------------------------------

BAD_BODIES = [
    (b"{", JSON, 400, None),
    (b"\xff\xfe{", JSON, 400, None),
    (b"[" * 50_000, JSON, 400, None),  # too deep for the parser: still a clean 400
    (b"[1]", JSON, 422, None),
    (b'"numImages"', JSON, 422, None),
    (b"null", JSON, 422, None),
    (b"{}", JSON, 422, None),
    (b'{"numImages": true}', JSON, 422, None),
    (b'{"numImages": 2.0}', JSON, 422, None),
    (b'{"numImages": "2"}', JSON, 422, None),
    (b'{"numImages": null}', JSON, 422, None),
    (b'{"numImages": NaN}', JSON, 400, None),  # NaN and Infinity are not JSON (RFC 8259)
    (b'{"numImages": -Infinity}', JSON, 400, None),
    (b'{"numImages": 0}', JSON, 400, "numImages must be between 1 and 10"),
    (b'{"numImages": 11}', JSON, 400, "numImages must be between 1 and 10"),
    (b'{"numImages": -5}', JSON, 400, "numImages must be between 1 and 10"),
    (b'{"numImages": 100000000000000000000000}', JSON, 400, "numImages must be between 1 and 10"),
    (b'{"numImages": 1}', {}, 415, None),
    (b'{"numImages": 1}', {"Content-Type": "text/plain"}, 415, None),
    (b'{"numImages": 1}', {"Content-Type": "application/jsonx"}, 415, None),
    (b'{"numImages": 1}', {"Content-Type": "application/x-www-form-urlencoded"}, 415, None),
    (b" " * (64 * 1024 + 1), JSON, 413, None),
]


@pytest.mark.parametrize(("body", "headers", "status", "detail"), BAD_BODIES)
async def test_bad_posts_get_a_problem_response(
    settings: SettingsFactory, db: asyncpg.Connection, body: bytes, headers: dict, status: int, detail: str | None
) -> None:
    """Malformed input is a 4xx problem+json with the status SPEC gives, and creates no job."""
    async with running(settings(worker_concurrency=0)) as client:
        assert_problem(await client.post("/generations", content=body, headers=headers), status, detail)
    assert await db.fetchval("SELECT count(*) FROM jobs") == 0


@pytest.mark.parametrize(
    "content_type", ["application/json; charset=utf-8", "application/problem+json", "APPLICATION/JSON"]
)
async def test_any_json_content_type_is_accepted(client: httpx.AsyncClient, content_type: str) -> None:
    """application/json and application/*+json, with any charset, are JSON."""
    response = await client.post("/generations", content=b'{"numImages": 1}', headers={"Content-Type": content_type})
    assert response.status_code == 202


async def test_max_images_per_job_is_configurable(settings: SettingsFactory) -> None:
    """The range check and its message follow MAX_IMAGES_PER_JOB."""
    async with running(settings(max_images_per_job=3, worker_concurrency=0)) as client:
        assert (await client.post("/generations", json={"numImages": 3})).status_code == 202
        response = await client.post("/generations", json={"numImages": 4})
        assert_problem(response, 400, "numImages must be between 1 and 3")


async def test_routing_errors_are_problems(client: httpx.AsyncClient) -> None:
    """Unknown routes are 404 and wrong methods 405 with Allow, as problem+json."""
    assert_problem(await client.get("/nope"), 404)
    response = await client.delete("/generations")
    assert_problem(response, 405)
    assert set(response.headers["allow"].split(", ")) == {"GET", "HEAD", "POST"}
    assert_problem(await client.put(f"/generations/{uuid.uuid4()}"), 405)


async def test_a_500_is_logged_with_the_request_id_the_client_is_told(
    settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An unexpected error is a 500 problem that leaks nothing, and the line logged for it names the request
    id the client is told to quote, in the default text format too (which shows no request_id field)."""

    def broken(job: asyncpg.Record) -> dict[str, Any]:
        raise RuntimeError("SELECT secret FROM jobs")

    monkeypatch.setattr(app, "job_json", broken)
    async with LifespanManager(app.create_app(settings(worker_concurrency=0))) as manager:
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post("/generations", json={"numImages": 1}, headers={"X-Request-ID": "req-7"})
    assert_problem(response, 500)
    assert "req-7" in response.json()["detail"]
    assert "SELECT" not in response.text
    text = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    errors = [text.format(r) for r in caplog.records if r.name == "generations" and r.levelno == logging.ERROR]
    assert errors and all("req-7" in line.splitlines()[0] for line in errors), errors


# --- The worker ------------------------------------------------------------------------------


async def test_a_job_is_completed_with_images_of_one_animal(client: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    """The worker completes a job: one random animal, numImages URLs, one attempt."""
    job = await post_job(client, 3)
    await wait_for_status(db, job["jobId"], "completed")
    done = (await client.get(f"/generations/{job['jobId']}")).json()
    assert done["status"] == "completed"
    assert done["animal"] in app.ANIMALS
    assert done["attempts"] == 1
    assert done["error"] is None
    assert TIMESTAMP.fullmatch(done["completedAt"])
    matches = [URL_PATTERN.fullmatch(url) for url in done["imageUrls"]]
    assert [(m.group(1), int(m.group(2))) for m in matches] == [(done["animal"], i) for i in (1, 2, 3)]


async def listening(client: httpx.AsyncClient) -> bool:
    """Whether the app says that notifications arrive on its LISTEN connection."""
    return "generations_listen_connected 1.0" in (await client.get("/metrics")).text


async def test_a_notification_wakes_an_idle_worker(settings: SettingsFactory, db: asyncpg.Connection) -> None:
    """A job that another replica announces starts at once through NOTIFY, not at the next poll."""
    async with running(settings(worker_poll_interval=3600)) as client:
        await eventually(lambda: listening(client))  # from now on, only a notification can wake the worker
        job_id = await insert_job(db)
        await db.execute("SELECT pg_notify('generations_new', '')")
        await wait_for_status(db, job_id, "completed", within=5)


async def test_polling_finds_jobs_that_no_notification_announced(
    settings: SettingsFactory, db: asyncpg.Connection
) -> None:
    """A job inserted by plain SQL, with no notification, is found by polling."""
    async with running(settings(worker_poll_interval=0.1)) as client:
        await eventually(lambda: listening(client))
        job_id = await insert_job(db)
        await wait_for_status(db, job_id, "completed")


async def test_the_worker_listens_again_after_its_connection_is_killed(
    settings: SettingsFactory, db: asyncpg.Connection
) -> None:
    """When the LISTEN connection is terminated, a new one takes its place and wakes the worker."""
    listener = (
        "SELECT pid FROM pg_stat_activity"
        " WHERE application_name = 'generations-listen' AND datname = current_database()"
    )
    async with running(settings(worker_poll_interval=3600)) as client:
        await eventually(lambda: listening(client))
        first = await db.fetchval(listener)
        await db.execute("SELECT pg_terminate_backend($1)", first)
        await eventually(lambda: db.fetchval(listener + " AND pid <> $1", first))
        await eventually(lambda: listening(client))
        job_id = await insert_job(db)
        await db.execute("SELECT pg_notify('generations_new', '')")
        await wait_for_status(db, job_id, "completed", within=5)


async def test_no_more_than_worker_concurrency_jobs_run_at_once(
    settings: SettingsFactory, db: asyncpg.Connection
) -> None:
    """With WORKER_CONCURRENCY=2, at most two jobs are processing at any moment."""
    async with running(settings(worker_concurrency=2, image_provider_delay=0.3)) as client:
        ids = [(await post_job(client))["jobId"] for _ in range(6)]
        most = 0
        while await db.fetchval("SELECT count(*) FROM jobs WHERE status <> 'completed'"):
            most = max(most, await db.fetchval("SELECT count(*) FROM jobs WHERE status = 'processing'"))
            await asyncio.sleep(0.01)
    assert most == 2
    assert await db.fetchval("SELECT count(*) FROM jobs WHERE status = 'completed' AND attempts = 1") == len(ids)


async def test_provider_errors_are_retried_until_max_attempts_then_fail(
    settings: SettingsFactory, db: asyncpg.Connection
) -> None:
    """A provider that always fails: retried up to MAX_ATTEMPTS, then failed with its error."""
    async with running(settings(image_provider_failure_rate=1.0, max_attempts=3)) as client:
        job = await post_job(client)
        row = await wait_for_status(db, job["jobId"], "failed", within=15)
    assert row["attempts"] == 3
    assert row["error"] == "the image provider failed (simulated by IMAGE_PROVIDER_FAILURE_RATE)"
    assert row["image_urls"] is None
    assert row["completed_at"] is not None


async def test_a_retry_can_succeed(
    settings: SettingsFactory, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After one failed attempt and its backoff, the next attempt completes the job."""
    calls = []
    real_provider = app.generate_images

    async def fails_once(*args: Any) -> list[str]:
        calls.append(args)
        if len(calls) == 1:
            raise ConnectionError("provider timed out")
        return await real_provider(*args)

    monkeypatch.setattr(app, "generate_images", fails_once)
    async with running(settings()) as client:
        job = await post_job(client)
        row = await wait_for_status(db, job["jobId"], "completed")
    assert row["attempts"] == 2 and len(calls) == 2
    assert row["error"] is None


async def test_a_bad_provider_answer_fails_the_attempt_not_the_worker(
    settings: SettingsFactory, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A provider answer PostgreSQL cannot store, or not a list of numImages URLs, is a failed
    attempt, retried like any provider error; an error text with a NUL is stored cleaned."""
    answers = iter([["https://x.example/\x00"], "not a list", ["a", "b"]])

    async def odd_provider(*args: Any) -> list[str]:
        answer = next(answers, None)
        if answer is None:
            raise ValueError("no\x00pe")
        return answer  # type: ignore[return-value]

    monkeypatch.setattr(app, "generate_images", odd_provider)
    async with running(settings(max_attempts=4)) as client:
        job = await post_job(client)
        row = await wait_for_status(db, job["jobId"], "failed", within=15)
    assert row["attempts"] == 4
    assert row["error"] == "ValueError: no\ufffdpe"


def test_retry_backoff_doubles_from_half_a_second_up_to_a_minute_with_jitter() -> None:
    """The wait before retry n is between half its step and its step, where the step is 0.5 s and
    doubles with each attempt up to 60 s; the other half is random (jitter) and spread over its range."""
    steps = {1: 0.5, 2: 1, 3: 2, 4: 4, 5: 8, 6: 16, 7: 32, 8: 60, 9: 60, 12: 60, 100: 60}
    for attempt, step in steps.items():
        delays = [app.retry_delay(attempt) for _ in range(200)]
        assert all(step / 2 <= delay <= step for delay in delays), (attempt, min(delays), max(delays))
        # Jitter: the delays differ, and cover the range (200 uniform draws all in one tenth of it: p < 1e-19).
        assert min(delays) < step * 0.6 and max(delays) > step * 0.9, (attempt, min(delays), max(delays))


async def test_a_job_whose_worker_died_is_claimed_again_after_its_lease(
    settings: SettingsFactory, db: asyncpg.Connection
) -> None:
    """A processing job is left alone while its lease holds, and run again, as attempt 2, once the
    lease has run out (its worker died)."""
    leased = await db.fetchval(
        "INSERT INTO jobs (num_images, status, attempts, available_at)"
        " VALUES (1, 'processing', 1, now() + interval '1 hour') RETURNING id"
    )
    async with running(settings()):
        # A job queued after it is claimed and completed: the worker has looked past the live lease.
        await wait_for_status(db, await insert_job(db), "completed")
        row = await job_row(db, leased)
        assert (row["status"], row["attempts"]) == ("processing", 1)  # the lease still holds
        await db.execute("UPDATE jobs SET available_at = now() - interval '1 second' WHERE id = $1", leased)
        row = await wait_for_status(db, leased, "completed")
    assert row["attempts"] == 2


async def test_a_job_abandoned_on_its_last_attempt_fails(settings: SettingsFactory, db: asyncpg.Connection) -> None:
    """A job whose worker died on the last allowed attempt is failed, not run again."""
    job_id = await db.fetchval(
        "INSERT INTO jobs (num_images, status, attempts, available_at)"
        " VALUES (1, 'processing', 2, now() - interval '1 second') RETURNING id"
    )
    async with running(settings(max_attempts=2, job_lease_seconds=1)):
        row = await wait_for_status(db, job_id, "failed")
    assert row["attempts"] == 2
    assert row["error"] == "no attempts left: the last attempt was interrupted (its worker stopped)"


async def test_the_claim_fails_due_jobs_with_no_attempt_left(db: asyncpg.Connection) -> None:
    """The claim runs due jobs with attempts left, fails due ones without (abandoned on their last
    attempt, or stranded by a lowered MAX_ATTEMPTS), and leaves live leases alone."""
    rows = await db.fetch(
        "INSERT INTO jobs (num_images, status, attempts, available_at) VALUES"
        " (1, 'processing', 3, now() - interval '1 second'),"  # abandoned on its last attempt: fail
        " (1, 'pending', 4, now() - interval '1 second'),"  # stranded by a lowered limit: fail
        " (1, 'processing', 2, now() - interval '1 second'),"  # abandoned with an attempt left: run
        " (1, 'processing', 3, now() + interval '10 seconds')"  # its worker is alive: leave it
        " RETURNING id"
    )
    claimed = await db.fetch(app.CLAIM_JOBS, 10, 30.0, 3)
    assert sorted((row["id"], row["runnable"], row["attempts"]) for row in claimed) == sorted(
        [(rows[0]["id"], False, 3), (rows[1]["id"], False, 4), (rows[2]["id"], True, 3)]
    )
    statuses = [(await job_row(db, row["id"]))["status"] for row in rows]
    assert statuses == ["failed", "failed", "processing", "processing"]


async def test_writes_are_fenced_on_the_claimed_attempt(db: asyncpg.Connection) -> None:
    """A worker whose claim was taken over can neither complete, fail, extend nor hand back the job."""
    job_id = await insert_job(db)
    [stale] = await db.fetch(app.CLAIM_JOBS, 1, 0.0, 5)  # a lease that ends at once
    [current] = await db.fetch(app.CLAIM_JOBS, 1, 30.0, 5)  # another worker takes over
    assert (stale["attempts"], current["attempts"]) == (1, 2)

    stale_attempt = stale["attempts"]
    assert await db.fetch(app.COMPLETE_JOBS, [job_id], [stale_attempt], ["cat"], ['["x"]'], *NO_IMAGES) == []
    assert await db.fetch(app.RETRY_OR_FAIL_JOBS, [job_id], [stale_attempt], 5, "boom", 0.0) == []
    assert await db.fetch(app.EXTEND_LEASES, [job_id], [stale_attempt], 30.0) == []
    row = await job_row(db, job_id)
    assert (row["status"], row["attempts"], row["animal"], row["error"]) == ("processing", 2, None, None)

    written = await db.fetch(app.COMPLETE_JOBS, [job_id], [current["attempts"]], ["cat"], ['["x"]'], *NO_IMAGES)
    assert [tuple(r) for r in written] == [(job_id, 2)]
    assert (await job_row(db, job_id))["status"] == "completed"


async def test_the_lease_keeper_stops_a_cancelled_job_and_frees_its_slot(
    settings: SettingsFactory, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job cancelled while its provider call runs is stopped by the lease keeper, whose next
    extension finds the claim gone: it logs that the claim was lost, cancels the provider call, and
    frees the slot at once (WORKER_CONCURRENCY=1: the next job completes long before the first call
    would have ended); the cancelled job stays cancelled."""
    real_provider = app.generate_images
    stopped = asyncio.Event()

    async def hangs_for_two_images(
        job_id: uuid.UUID, attempt: int, animal: str, num_images: int, settings: app.Settings, http: Any
    ) -> list[str]:
        """A minute for the job of two images, no time for others; note when the long call is cancelled."""
        if num_images == 1:
            return await real_provider(job_id, attempt, animal, num_images, settings, http)
        try:
            return await real_provider(
                job_id, attempt, animal, num_images, dataclasses.replace(settings, image_provider_delay=60), http
            )
        except asyncio.CancelledError:
            stopped.set()
            raise

    monkeypatch.setattr(app, "generate_images", hangs_for_two_images)
    async with running(settings(worker_concurrency=1, job_lease_seconds=1)) as client:  # leases extended every 1/3 s
        first = await post_job(client, 2)
        await wait_for_status(db, first["jobId"], "processing")
        second = await post_job(client, 1)
        response = await client.post(f"/generations/{first['jobId']}/cancel")
        assert (response.status_code, response.json()["status"]) == (200, "cancelled")
        await wait_for_status(db, second["jobId"], "completed", within=5)  # not after the first call's minute
        assert stopped.is_set()
    expected = f"job {first['jobId']} attempt 1: claim lost (cancelled or taken over), stopping it"
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert [message for message in warnings if first["jobId"] in message] == [expected]
    row = await job_row(db, first["jobId"])
    assert (row["status"], row["attempts"], row["animal"], row["image_urls"]) == ("cancelled", 1, None, None)


async def test_a_failed_attempt_whose_write_answers_late_is_no_lost_claim(
    settings: SettingsFactory, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write that fails a job (MAX_ATTEMPTS=1) commits, but its answer comes back late, and the
    lease keeper's extension meanwhile finds the job no longer processing. That is the attempt's own
    outcome, not a lost claim: no line says the claim was lost, and the attempt counts as failed."""
    answer_late(monkeypatch, app.RETRY_OR_FAIL_JOBS, 1)  # the lease keeper runs every 1/3 s meanwhile
    config = settings(image_provider_failure_rate=1.0, max_attempts=1, job_lease_seconds=1)
    async with running(config) as client:
        await post_job(client)

        async def attempt_counted() -> str | None:
            """The metrics, once the attempt is counted (as failed, or as lost)."""
            text = (await client.get("/metrics")).text
            return text if 'generations_attempts_total{result="' in text else None

        text = await eventually(attempt_counted)
    assert [r.getMessage() for r in caplog.records if "claim lost" in r.getMessage()] == []
    assert metric(text, 'generations_attempts_total{result="failed"}') == 1
    assert metric(text, 'generations_attempts_total{result="lost"}') == 0


async def test_only_due_jobs_are_claimed_and_each_only_once(db: asyncpg.Connection, db_url: str) -> None:
    """Claims skip jobs in backoff, jobs under a live lease, and rows another claim has locked."""
    due = await insert_job(db)
    await db.execute("INSERT INTO jobs (num_images, available_at) VALUES (1, now() + interval '1 hour')")
    other = await asyncpg.connect(db_url)
    try:
        async with db.transaction():
            [first] = await db.fetch(app.CLAIM_JOBS, 10, 30.0, 5)
            assert await other.fetch(app.CLAIM_JOBS, 10, 30.0, 5) == []  # locked: skipped, not waited on
        assert first["id"] == due
        assert await other.fetch(app.CLAIM_JOBS, 10, 30.0, 5) == []  # leased, or not due yet
    finally:
        await other.close()


async def test_shutdown_hands_unfinished_jobs_back_at_once(settings: SettingsFactory, db: asyncpg.Connection) -> None:
    """On shutdown, a job still running after the grace period goes back to pending right away."""
    async with running(settings(image_provider_delay=60, shutdown_grace_seconds=0.2)) as client:
        job = await post_job(client)
        await wait_for_status(db, job["jobId"], "processing")
    row = await job_row(db, job["jobId"])
    assert (row["status"], row["attempts"]) == ("pending", 1)  # the interrupted attempt counts
    assert row["error"] == "the attempt was interrupted by a shutdown"
    assert row["available_at"] <= await db.fetchval("SELECT now()")


async def test_a_listen_database_that_cannot_be_reached_is_no_outage_of_the_database(
    settings: SettingsFactory, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """With LISTEN_DATABASE_URL unreachable (the pool's database is fine), the log never says the
    database is unavailable, and a shutdown still hands the unfinished job back at once."""
    unreachable = f"postgresql://generations@127.0.0.1:{free_port()}/none"
    config = settings(
        listen_database_url=unreachable, worker_concurrency=1, image_provider_delay=60, shutdown_grace_seconds=0.2
    )
    async with running(config) as client:
        job = await post_job(client)
        await wait_for_status(db, job["jobId"], "processing")
        await asyncio.sleep(2 * app.ERROR_BACKOFF_SECONDS)  # the LISTEN connection is tried again meanwhile
    row = await job_row(db, job["jobId"])
    assert (row["status"], row["error"]) == ("pending", "the attempt was interrupted by a shutdown")
    assert [r.getMessage() for r in caplog.records if "the database is unavailable" in r.getMessage()] == []


async def test_shutdown_lets_running_jobs_finish_within_the_grace_period(
    settings: SettingsFactory, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On shutdown, jobs that finish within SHUTDOWN_GRACE_SECONDS are completed on their first
    attempt, not handed back, and each result is recorded once: no line says one was dropped or
    lost. Here the first job's completing write commits but its answer comes back late, and the
    second job ends the grace period meanwhile: the shutdown must let that write end, not cut it
    and write the result again."""
    answer_late(monkeypatch, app.COMPLETE_JOBS, 0.4)
    provider_taking(monkeypatch, {1: 0.5, 2: 0.7})  # the second ends while the first is being written
    caplog.set_level(logging.INFO, logger="generations")
    async with running(settings(shutdown_grace_seconds=10)) as client:
        jobs = [await post_job(client, 1), await post_job(client, 2)]
        for job in jobs:
            await wait_for_status(db, job["jobId"], "processing")
    for job in jobs:
        row = await job_row(db, job["jobId"])
        assert (row["status"], row["attempts"], row["error"]) == ("completed", 1, None)
    messages = [record.getMessage() for record in caplog.records if record.name == "generations"]
    assert "shutting down: waiting up to 10s for running jobs: 2" in messages  # they did finish during the grace
    assert [m for m in messages if "result dropped" in m or "claim lost" in m or "handed" in m] == []


async def test_a_result_postgresql_refuses_at_shutdown_does_not_keep_the_rest_from_being_written(
    settings: SettingsFactory, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two jobs finish within the grace period while the writer is busy with a third (its write
    answers late), so the shutdown writes them itself; PostgreSQL refuses one's result (a content
    type with a NUL, as in the test above). The other still completes, on its first attempt, and
    is not handed back to run again."""
    real_check = app.checked_images

    def poisons_two_images(images: object, num_images: int) -> list[app.Image]:
        return [("image/png\x00", b"x")] * 2 if num_images == 2 else real_check(images, num_images)

    answer_late(monkeypatch, app.COMPLETE_JOBS, 1)
    provider_taking(monkeypatch, {1: 0.3, 2: 0.6, 3: 0.6})
    monkeypatch.setattr(app, "checked_images", poisons_two_images)
    async with running(settings(shutdown_grace_seconds=10, max_attempts=2)) as client:
        jobs = [await post_job(client, n) for n in (1, 2, 3)]
        for job in jobs:
            await wait_for_status(db, job["jobId"], "processing")
    first, bad, good = [await job_row(db, job["jobId"]) for job in jobs]
    assert (first["status"], good["status"], good["attempts"]) == ("completed", "completed", 1)
    assert bad["status"] != "completed" and bad["error"].startswith("the result could not be stored")


async def test_api_only_mode_runs_no_worker(settings: SettingsFactory, db: asyncpg.Connection) -> None:
    """WORKER_CONCURRENCY=0 serves the API and is ready, but never claims a job."""
    async with running(settings(worker_concurrency=0)) as client:
        job = await post_job(client)
        assert (await client.get("/ready")).status_code == 200
        await asyncio.sleep(0.5)  # a worker, if there were one, would have claimed it by now
        assert (await job_row(db, job["jobId"]))["status"] == "pending"


async def test_several_workers_complete_each_job_exactly_once(
    settings: SettingsFactory, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three apps on one database: every job completed once, on its first attempt."""
    calls: list[tuple] = []
    real_provider = app.generate_images

    async def counting(*args: Any) -> list[str]:
        calls.append(args)
        return await real_provider(*args)

    monkeypatch.setattr(app, "generate_images", counting)
    config = settings(worker_concurrency=5)
    async with running(config) as a, running(config) as b, running(config) as c:
        posts = [post_job(client) for _ in range(40) for client in (a, b, c)]
        await asyncio.gather(*posts)
        await eventually(lambda: db.fetchval("SELECT count(*) = 120 FROM jobs WHERE status = 'completed'"), 30)
    assert await db.fetchval("SELECT max(attempts) FROM jobs") == 1
    assert len(calls) == 120


# --- Running for months --------------------------------------------------------------------


def metric(text: str, sample: str) -> float:
    """The value of one sample (name and labels, as exposed) in a /metrics page."""
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    assert match, f"{sample} is not in /metrics"
    return float(match[1])


async def test_a_hung_provider_call_times_out_and_frees_its_slot(
    settings: SettingsFactory, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JOB_TIMEOUT_SECONDS=1 and a provider call that would take a minute: each attempt is stopped
    after 1 s and counted as timed out, retried (MAX_ATTEMPTS=2), then the job fails saying it timed
    out. The slot is free as soon as an attempt times out: with WORKER_CONCURRENCY=1, a job queued
    behind the hung one starts at once, and completes between the hung job's two attempts."""
    real_provider = app.generate_images
    timeline: list[tuple[str, float]] = []

    async def hangs_for_two_images(
        job_id: uuid.UUID, attempt: int, animal: str, num_images: int, settings: app.Settings, http: Any
    ) -> list[str]:
        """A minute for the job of two images, no time for others; note when calls start and are stopped."""
        now = asyncio.get_running_loop().time
        if num_images == 1:
            timeline.append(("quick call started", now()))
            return await real_provider(job_id, attempt, animal, num_images, settings, http)
        try:
            return await real_provider(
                job_id, attempt, animal, num_images, dataclasses.replace(settings, image_provider_delay=60), http
            )
        except asyncio.CancelledError:
            timeline.append(("hung call stopped", now()))
            raise

    monkeypatch.setattr(app, "generate_images", hangs_for_two_images)
    async with running(settings(worker_concurrency=1, job_timeout_seconds=1, max_attempts=2)) as client:
        hung = await post_job(client, 2)
        await wait_for_status(db, hung["jobId"], "processing")
        queued = await post_job(client, 1)
        row = await wait_for_status(db, hung["jobId"], "failed", within=10)
        metrics = (await client.get("/metrics")).text
    assert row["attempts"] == 2
    assert row["error"] == "the attempt timed out after 1s (JOB_TIMEOUT_SECONDS)"
    # Each hung call was stopped, not left running; the queued job started as soon as the first was.
    [(first, stopped), (second, started), (third, _)] = timeline
    assert (first, second, third) == ("hung call stopped", "quick call started", "hung call stopped")
    assert 0 <= started - stopped < 0.5, started - stopped
    other = await job_row(db, queued["jobId"])
    assert (other["status"], other["attempts"]) == ("completed", 1)
    assert metric(metrics, 'generations_attempts_total{result="timed_out"}') == 2
    assert metric(metrics, 'generations_attempts_total{result="completed"}') == 1


async def test_a_job_interrupted_by_every_shutdown_fails_when_its_attempts_are_spent(
    settings: SettingsFactory, db: asyncpg.Connection
) -> None:
    """A job that never finishes within the shutdown grace cannot run forever: the first shutdown
    hands it back (pending, attempts 1, error says so); the next, on its last attempt (MAX_ATTEMPTS=2),
    fails it instead of handing it back."""
    config = settings(image_provider_delay=60, shutdown_grace_seconds=0.2, max_attempts=2)
    async with running(config) as client:
        job = await post_job(client)
        await wait_for_status(db, job["jobId"], "processing")
    row = await job_row(db, job["jobId"])
    assert (row["status"], row["attempts"]) == ("pending", 1)
    assert row["error"] == "the attempt was interrupted by a shutdown"

    async with running(config):
        await wait_for_status(db, job["jobId"], "processing")
    row = await job_row(db, job["jobId"])
    assert (row["status"], row["attempts"]) == ("failed", 2)
    assert row["error"] == "the attempt was interrupted by a shutdown"
    assert row["completed_at"] is not None


async def test_finished_jobs_are_deleted_once_the_retention_period_is_over(
    settings: SettingsFactory, db: asyncpg.Connection
) -> None:
    """JOB_RETENTION_SECONDS=60: within 12 s (a deletion pass runs every 5 s), every job that finished
    over 60 s ago is gone, however many (2,503: more than one batch), its GET is 404 and its
    Idempotency-Key makes a new job; a job that finished within the 60 s, even one created long
    ago, and pending and processing jobs, however old, are untouched."""
    old = [
        row["id"]
        for row in await db.fetch(
            "INSERT INTO jobs (num_images, status, idempotency_key, created_at, updated_at, completed_at)"
            " SELECT 1, status, 'key-' || status, now() - interval '2 hours', now() - interval '1 hour',"
            " now() - interval '1 hour' FROM unnest(ARRAY['completed', 'failed', 'cancelled']) AS status RETURNING id"
        )
    ]
    await db.execute(
        "INSERT INTO jobs (num_images, status, created_at, updated_at, completed_at)"
        " SELECT 1, 'completed', now() - interval '2 hours', now() - interval '61 seconds',"
        " now() - interval '61 seconds' FROM generate_series(1, 2500)"
    )
    # Created, updated and finished this many seconds ago (none: not finished), then its status.
    ages = [(7200, 30, 30, "completed"), (40, 30, 30, "cancelled"), (7200, 7200, None, "pending")]
    ages += [(7200, 7200, None, "processing")]
    kept = await db.fetch(
        "INSERT INTO jobs (num_images, status, created_at, updated_at, completed_at, available_at)"
        " SELECT 1, status, now() - make_interval(secs => created), now() - make_interval(secs => updated),"
        " now() - make_interval(secs => finished), now() + interval '1 hour'"
        " FROM unnest($1::int[], $2::int[], $3::int[], $4::text[]) AS age(created, updated, finished, status)"
        " RETURNING *",
        *zip(*ages, strict=True),
    )
    expired = "SELECT count(*) FROM jobs WHERE completed_at < now() - interval '60 seconds'"
    assert await db.fetchval(expired) == 2503
    async with running(settings(worker_concurrency=0, job_retention_seconds=60)) as client:
        await eventually(lambda: db.fetchval(f"SELECT ({expired}) = 0"), within=12)
        for job_id in old:
            assert_problem(await client.get(f"/generations/{job_id}"), 404, "Job not found")
        again = await client.post("/generations", json={"numImages": 1}, headers={"Idempotency-Key": "key-completed"})
        assert again.status_code == 202, again.text
        assert uuid.UUID(again.json()["jobId"]) not in old
        for row in kept:
            assert (await client.get(f"/generations/{row['id']}")).status_code == 200
    assert [await job_row(db, row["id"]) for row in kept] == kept


async def test_a_retention_of_zero_keeps_every_job(
    settings: SettingsFactory, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JOB_RETENTION_SECONDS=0 deletes no job, however long ago it finished."""
    monkeypatch.setattr(app, "RETENTION_INTERVAL_SECONDS", 0.05)  # any deletion pass would run at once
    await db.execute(
        "INSERT INTO jobs (num_images, status, created_at, updated_at, completed_at)"
        " SELECT 1, status, now() - interval '2 years', now() - interval '1 year', now() - interval '1 year'"
        " FROM unnest(ARRAY['completed', 'failed', 'cancelled']) AS status"
    )
    async with running(settings(worker_concurrency=0, job_retention_seconds=0)):
        await asyncio.sleep(0.5)  # a negative control: ten deletion passes' time, were one running
    assert await db.fetchval("SELECT count(*) FROM jobs") == 3


async def explain_claim(db: asyncpg.Connection, limit: int) -> dict[str, Any]:
    """The plan of one claim of up to `limit` jobs, as run (EXPLAIN ANALYZE, BUFFERS), then rolled back."""
    transaction = db.transaction()
    await transaction.start()
    try:
        explained = await db.fetchval("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + app.CLAIM_JOBS, limit, 30.0, 3)
    finally:
        await transaction.rollback()
    return json.loads(explained)[0]["Plan"]


def plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from plan_nodes(child)


def check_claim_cost(plan: dict[str, Any], claimed: int) -> None:
    """The claim took `claimed` jobs, and read about that many rows and pages, whatever else the table holds."""
    assert plan["Actual Rows"] == claimed
    for node in plan_nodes(plan):
        if node.get("Relation Name") != "jobs" or "Scan" not in node["Node Type"]:
            continue
        removed = node.get("Rows Removed by Filter", 0) + node.get("Rows Removed by Index Recheck", 0)
        read = (node["Actual Rows"] + removed) * node["Actual Loops"]
        scan = f"{node['Node Type']} {node.get('Index Name', '')}"
        assert node["Node Type"] != "Seq Scan" and read <= claimed + 2, f"{scan} read {read:g} rows"
    # About 20 pages a claimed job (its row, the index entries of its new version); a scan of the
    # backlog would touch more than 1,000.
    pages = plan["Shared Hit Blocks"] + plan["Shared Read Blocks"]
    assert pages <= 30 * claimed + 60, f"the claim of {claimed} jobs touched {pages} pages"


async def test_a_backlog_does_not_make_the_claim_read_more(db: asyncpg.Connection) -> None:
    """The claim (which also fails abandoned jobs) reads only the rows it claims, whatever the backlog:
    with 50,000 pending jobs not yet due and 20,000 finished ones, it reads the 3 due jobs; with the
    50,000 due, a claim of 20 reads 20."""
    await db.execute(
        "INSERT INTO jobs (num_images, status, available_at)"
        " SELECT 1, 'pending', now() + interval '1 hour' FROM generate_series(1, 50000)"
    )
    await db.execute(
        "INSERT INTO jobs (num_images, status, attempts, completed_at)"
        " SELECT 1, 'completed', 1, now() FROM generate_series(1, 20000)"
    )
    await db.execute(
        "INSERT INTO jobs (num_images, status, attempts, available_at) VALUES"
        " (1, 'pending', 0, now() - interval '1 minute'),"  # new
        " (1, 'processing', 1, now() - interval '1 minute'),"  # abandoned, attempts left: run
        " (1, 'processing', 3, now() - interval '1 minute')"  # abandoned on its last attempt: failed
    )
    await db.execute("ANALYZE jobs")  # as autovacuum would
    check_claim_cost(await explain_claim(db, 20), claimed=3)

    await db.execute("UPDATE jobs SET available_at = now() - random() * interval '1 hour' WHERE status = 'pending'")
    await db.execute("ANALYZE jobs")
    check_claim_cost(await explain_claim(db, 20), claimed=20)


# --- Losing the database ---------------------------------------------------------------------


async def test_the_service_rides_out_a_database_restart(
    tmp_path: Path, settings: SettingsFactory, template_url: str
) -> None:
    """While PostgreSQL is down: /health 200, /ready 503, POST a quick 503. Afterwards every
    accepted job completes, and the process never needed a restart."""
    server = EmbeddedPostgres(tmp_path / "pg", delete_on_exit=True)
    try:
        admin = await asyncpg.connect(server.url)
        await admin.execute("CREATE DATABASE outage")
        await admin.close()
        config = settings(database_url=server.url_for("outage"), image_provider_delay=0.05)
        async with running(config) as client:
            accepted = [(await post_job(client))["jobId"] for _ in range(5)]
            server.stop()
            assert (await client.get("/health")).status_code == 200
            assert_problem(await client.get("/ready"), 503)
            response = await client.post("/generations", json={"numImages": 1})
            assert_problem(response, 503)
            assert response.headers["retry-after"]
            assert (await client.get(f"/generations/{accepted[0]}")).status_code == 503
            server.start()
            await eventually(lambda: _is_ready(client), within=20)
            accepted += [(await post_job(client))["jobId"] for _ in range(5)]
            db = await asyncpg.connect(server.url_for("outage"))
            try:
                for job_id in accepted:
                    row = await wait_for_status(db, job_id, "completed", within=20)
                    assert row["attempts"] <= 2
            finally:
                await db.close()
    finally:
        server.close()


async def _is_ready(client: httpx.AsyncClient) -> bool:
    """True once /ready says 200."""
    return (await client.get("/ready")).status_code == 200


# --- Configuration ---------------------------------------------------------------------------


def test_settings_come_from_the_environment() -> None:
    """Every variable is read, converted and checked; unset ones keep their defaults."""
    settings = app.Settings.from_env(
        {
            "DATABASE_URL": "postgresql://db/x",
            "PORT": "9000",
            "WORKER_CONCURRENCY": "0",
            "IMAGE_PROVIDER_FAILURE_RATE": "0.25",
            "API_TOKEN": "secret",
            "CORS_ORIGINS": "https://a.example, https://b.example",
            "ENABLE_DEBUG": "yes",
            "LOG_LEVEL": "debug",
        }
    )
    assert settings.port == 9000 and settings.worker_concurrency == 0
    assert settings.image_provider_failure_rate == 0.25
    assert settings.cors_origins == ("https://a.example", "https://b.example")
    assert settings.enable_debug is True and settings.log_level == "DEBUG"
    assert settings.max_images_per_job == 10 and settings.image_provider_delay == 2.0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PORT", "eighty"),
        ("PORT", "70000"),
        ("MAX_IMAGES_PER_JOB", "0"),
        ("WORKER_POLL_INTERVAL", "nan"),
        ("WORKER_CONCURRENCY", "-1"),
        ("IMAGE_PROVIDER_FAILURE_RATE", "1.5"),
        ("ENABLE_DEBUG", "maybe"),
        ("LOG_LEVEL", "loud"),
        ("DB_POOL_MIN_SIZE", "20"),
    ],
)
def test_a_bad_setting_names_its_variable(name: str, value: str) -> None:
    """A bad value is refused with a message naming the variable."""
    with pytest.raises(app.ConfigError, match=name):
        app.Settings.from_env({"DATABASE_URL": "postgresql://db/x", name: value})


def test_a_bad_setting_stops_startup_with_one_line() -> None:
    """`python app.py` with a bad variable exits at once with one line saying which."""
    env = {"PATH": "", "DATABASE_URL": "postgresql://127.0.0.1:1/x", "MAX_ATTEMPTS": "lots"}
    done = subprocess.run([sys.executable, "app.py"], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "generations: configuration error: MAX_ATTEMPTS must be an integer, got 'lots'"
    ]
    missing = subprocess.run([sys.executable, "app.py"], env={"PATH": ""}, capture_output=True, text=True, timeout=30)
    assert "DATABASE_URL is not set" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1


def test_with_log_format_json_a_bad_setting_is_one_json_line() -> None:
    """With LOG_FORMAT=json, the line that names a bad variable is a JSON object like every other line."""
    env = {"PATH": "", "DATABASE_URL": "postgresql://127.0.0.1:1/x", "MAX_ATTEMPTS": "0", "LOG_FORMAT": "json"}
    done = subprocess.run([sys.executable, "app.py"], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    [line] = done.stderr.strip().splitlines()
    entry = json.loads(line)
    assert (entry["level"], entry["logger"]) == ("ERROR", "generations")
    assert entry["message"] == "generations: configuration error: MAX_ATTEMPTS must be between 1 and 100, got 0"
    assert entry["time"]


def test_importing_the_module_reads_nothing() -> None:
    """Importing app touches neither the environment nor the network."""
    env = {"PATH": ""}  # no DATABASE_URL: building the app from the environment would fail
    done = subprocess.run([sys.executable, "-c", "import app"], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


async def start_waiting_poll(
    client: httpx.AsyncClient, job_id: str, waiting_polls: Callable[[], int]
) -> asyncio.Task[httpx.Response]:
    """Start a long poll (?wait=60) on a job; return once it is waiting, and has not answered."""
    poll = asyncio.create_task(client.get(f"/generations/{job_id}", params={"wait": 60}))

    async def waiting() -> bool:
        return waiting_polls() == 1

    await eventually(waiting)
    # A negative control: a poll that answered without waiting would have done so by now.
    await asyncio.sleep(0.3)
    assert not poll.done(), poll.result().json()
    return poll


async def test_a_shutdown_answers_long_polls_at_once(
    settings: SettingsFactory, waiting_polls: Callable[[], int]
) -> None:
    """When a shutdown begins, a long poll that is waiting answers right away with the job as it is."""
    application = app.create_app(settings(worker_concurrency=0))
    async with LifespanManager(application) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            job = await post_job(client)
            poll = await start_waiting_poll(client, job["jobId"], waiting_polls)
            application.state.begin_shutdown()
            response = await asyncio.wait_for(poll, 2)  # not after its 60 seconds
    assert response.status_code == 200
    assert response.json() == job  # still pending


async def test_a_long_poll_answers_when_the_end_of_its_job_is_announced(
    settings: SettingsFactory, db: asyncpg.Connection, waiting_polls: Callable[[], int]
) -> None:
    """A long poll on a job that nothing runs waits; when another replica ends the job and announces
    it on generations_done (as the service does, after the update), the poll answers at once with
    the job's final state, long before its wait is over."""
    async with running(settings(worker_concurrency=0)) as client:
        await eventually(lambda: listening(client))  # a notification sent from now on is heard
        job = await post_job(client)
        poll = await start_waiting_poll(client, job["jobId"], waiting_polls)
        await db.execute(
            "UPDATE jobs SET status = 'completed', animal = 'cat', image_urls = '[\"https://x.example/1\"]',"
            " completed_at = now(), updated_at = now() WHERE id = $1",
            uuid.UUID(job["jobId"]),
        )
        await db.execute("SELECT pg_notify('generations_done', $1)", job["jobId"])
        response = await asyncio.wait_for(poll, 2)  # not after its 60 seconds
    assert response.status_code == 200
    body = response.json()
    assert (body["jobId"], body["status"], body["animal"], body["imageUrls"]) == (
        job["jobId"], "completed", "cat", ["https://x.example/1"],
    )  # fmt: skip
