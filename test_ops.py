"""Operating the service, as SPEC's "Operating it" and "Scaling out" describe it: /metrics."""

import uuid

import asyncpg
import httpx
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

import app
from conftest import eventually
from test_api import TOKEN, serving
from test_app import SettingsFactory, assert_problem, post_job, wait_for_status

# --- /metrics --------------------------------------------------------------------------------


class Scrape:
    """One /metrics answer, parsed by prometheus_client's own parser."""

    def __init__(self, text: str) -> None:
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


async def test_metrics_count_what_this_process_did(settings: SettingsFactory, db: asyncpg.Connection) -> None:
    """After jobs made and completed here and some requests: every family SPEC names, with the jobs this
    process created (a replayed key adds none), their completed attempts, wait and run times, requests by
    route template (never an id; unknown paths share one label), and notifications arriving."""
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
