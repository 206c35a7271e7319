"""The API as openapi.json documents it, and issue 3's features, against a real PostgreSQL.

Every response a test here receives goes through `check`: its status, headers, media type
and body must be what openapi.json says for that request. The features: Idempotency-Key,
batches, long polls (?wait=), cancel, bearer auth, CORS, the debugger switch, and fuzzing of
every endpoint.
"""

import asyncio
import base64
import functools
import json
import logging
import re
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, ValidationError
from openapi_spec_validator import validate
from referencing import Registry
from referencing.jsonschema import DRAFT202012

import app
from conftest import eventually, running
from scripts.service import free_port
from test_app import JSON, SettingsFactory, assert_problem, insert_job, job_row, post_job, wait_for_status

TOKEN = "s3cret-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
ORIGIN = "https://app.example"

# --- The document, and checking responses against it -----------------------------------------

OPENAPI: dict[str, Any] = json.loads(Path(__file__).with_name("openapi.json").read_text())
DOCUMENT_URI = "urn:generations:openapi"
SCHEMAS = Registry().with_resource(DOCUMENT_URI, DRAFT202012.create_resource(OPENAPI))
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

# What info.description promises for requests that no operation lists.
UNLISTED_PATH = {
    "307": "/components/responses/TrailingSlashRedirect",
    "401": "/components/responses/Unauthorized",
    "404": "/components/responses/NotFound",
}
UNLISTED_METHOD = {"401": "/components/responses/Unauthorized", "405": "/components/responses/MethodNotAllowed"}


def escape(token: str) -> str:
    """A JSON pointer token for this key (RFC 6901)."""
    return token.replace("~", "~0").replace("/", "~1")


def follow(pointer: str) -> tuple[str, Any]:
    """The node at this JSON pointer in openapi.json, and its own pointer once any $ref is followed."""
    node = OPENAPI
    for token in pointer.split("/")[1:]:
        node = node[token.replace("~1", "/").replace("~0", "~")]
    if isinstance(node, dict) and "$ref" in node:
        return follow(node["$ref"].removeprefix("#"))
    return pointer, node


def path_pattern(template: str) -> re.Pattern[str]:
    """A regex matching the paths of an OpenAPI path template; a parameter is one segment."""
    return re.compile(re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)))


def documented_responses(method: str, path: str) -> dict[str, str]:
    """Each status openapi.json documents for this request, with the pointer to its response."""
    for template, item in OPENAPI["paths"].items():
        if path_pattern(template).fullmatch(path):
            if method not in item:
                return UNLISTED_METHOD
            responses = f"/paths/{escape(template)}/{method}/responses"
            return {status: f"{responses}/{status}" for status in item[method]["responses"]}
    return UNLISTED_PATH


@functools.cache
def validator(schema_pointer: str) -> Draft202012Validator:
    """A validator for the schema at this pointer, resolving its $refs within openapi.json."""
    schema = {"$ref": f"{DOCUMENT_URI}#{schema_pointer}"}
    return Draft202012Validator(schema, registry=SCHEMAS, format_checker=Draft202012Validator.FORMAT_CHECKER)


def check(response: httpx.Response) -> None:
    """The response is one openapi.json documents for its request: status, headers, media type, body."""
    request = response.request
    if request.method == "OPTIONS" and "access-control-request-method" in request.headers:
        return  # a CORS preflight: answered by the CORS layer, outside the API (see info.description)
    method = "get" if request.method == "HEAD" else request.method.lower()
    what = f"{request.method} {request.url.path} -> {response.status_code}"
    documented = documented_responses(method, request.url.path)
    assert str(response.status_code) in documented, f"{what} is not in openapi.json: {response.text[:500]}"
    pointer, spec = follow(documented[str(response.status_code)])
    for name in spec.get("headers", {}):
        _, header = follow(f"{pointer}/headers/{escape(name)}")
        assert not header.get("required") or name in response.headers, f"{what} lacks the header {name}"
    media_type = response.headers.get("content-type", "").partition(";")[0]
    if "content" not in spec:
        assert not response.content, f"{what} has a body that openapi.json does not describe"
        return
    assert media_type in spec["content"], f"{what} is {media_type!r}, not one of {list(spec['content'])}"
    if request.method == "HEAD":
        return
    body = response.json() if media_type.endswith("json") else response.text  # /metrics is text/plain
    validator(f"{pointer}/content/{escape(media_type)}/schema").validate(body)
    if media_type == "application/problem+json":
        assert body["status"] == response.status_code, f"{what} says status {body['status']} in its body"


async def checked(response: httpx.Response) -> None:
    """httpx response hook: read the body, then `check` the response."""
    await response.aread()
    check(response)


@asynccontextmanager
async def serving(settings: app.Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app with these settings, and a client that checks every response against openapi.json."""
    async with running(settings) as client:
        client.event_hooks = {"request": [], "response": [checked]}
        yield client


def served_operations() -> set[tuple[str, str]]:
    """(path template, method) for every route the app serves, HEAD aside (it comes with GET)."""
    routes = app.create_app(app.Settings(database_url="postgresql://unused/x")).routes
    return {
        (re.sub(r"\{[^}]+\}", "{}", route.path), method.lower())
        for route in routes
        for method in route.methods - {"HEAD"}  # type: ignore[attr-defined]
    }


def documented_operations() -> set[tuple[str, str]]:
    """(path template, method) for every operation in openapi.json."""
    return {
        (re.sub(r"\{[^}]+\}", "{}", path), method)
        for path, item in OPENAPI["paths"].items()
        for method in item
        if method in METHODS
    }


def walk(node: Any, pointer: str = "") -> Iterator[tuple[str, Any]]:
    """Every (pointer, node) pair in a JSON document, depth first."""
    yield pointer, node
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        yield from walk(child, f"{pointer}/{escape(str(key))}")


def test_the_document_is_valid_openapi_3_1() -> None:
    """openapi.json is a valid OpenAPI 3.1 document, with its bearer scheme required by default."""
    validate(OPENAPI)
    assert OPENAPI["openapi"].startswith("3.1.")
    assert OPENAPI["security"] == [{"bearerAuth": []}]
    scheme = OPENAPI["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    public = {path for path, item in OPENAPI["paths"].items() if item.get("get", {}).get("security") == []}
    assert public == app.PUBLIC_PATHS


def test_every_route_is_documented_and_every_documented_operation_is_served() -> None:
    """The app's routes and openapi.json's operations are the same set; HEAD comes with every GET."""
    assert served_operations() == documented_operations()
    routes = app.create_app(app.Settings(database_url="postgresql://unused/x")).routes
    assert all(("HEAD" in route.methods) == ("GET" in route.methods) for route in routes)  # type: ignore[attr-defined]


def test_every_error_response_is_a_problem() -> None:
    """Every 4xx and 5xx response in openapi.json, listed or not, is application/problem+json with the Problem
    schema; together they cover every error status SPEC names."""
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    errors = [
        (status, f"{pointer}/{status}")
        for pointer, node in walk(OPENAPI)
        if pointer.endswith("/responses") and pointer.startswith("/paths/")
        for status in node
        if status[0] in "45"
    ]
    errors += [(status, pointer) for status, pointer in (UNLISTED_PATH | UNLISTED_METHOD).items() if status[0] in "45"]
    assert {status for status, _ in errors} == {"400", "401", "404", "405", "409", "413", "415", "422", "500", "503"}
    for _, pointer in errors:
        assert follow(pointer)[1]["content"] == problem, pointer


def test_every_example_matches_its_schema() -> None:
    """The examples in openapi.json's schemas are valid instances of those schemas."""
    examples = [
        (pointer.removesuffix("/examples"), example)
        for pointer, node in walk(OPENAPI)
        if pointer.startswith("/components/schemas/") and pointer.endswith("/examples")
        for example in node
    ]
    assert len(examples) >= 3
    for pointer, example in examples:
        validator(pointer).validate(example)


def fake_response(
    method: str, path: str, status: int, body: Any, content_type: str = "application/json", **headers: str
) -> httpx.Response:
    """A response to `method path`, as the app might have sent it."""
    return httpx.Response(
        status,
        content=json.dumps(body).encode(),
        headers={"content-type": content_type, **headers},
        request=httpx.Request(method, f"http://test{path}"),
    )


EXAMPLE_JOB = OPENAPI["components"]["schemas"]["Job"]["examples"][0]
EXAMPLE_PROBLEM = OPENAPI["components"]["schemas"]["Problem"]["examples"][0]
JOB_PATH = f"/generations/{EXAMPLE_JOB['jobId']}"


@pytest.mark.parametrize(
    "response",
    [
        fake_response("GET", JOB_PATH, 200, {k: v for k, v in EXAMPLE_JOB.items() if k != "attempts"}, Location="/"),
        fake_response("GET", JOB_PATH, 200, EXAMPLE_JOB | {"status": "done"}, Location="/"),
        fake_response("GET", JOB_PATH, 200, EXAMPLE_JOB | {"createdAt": "yesterday"}, Location="/"),
        fake_response("GET", JOB_PATH, 200, EXAMPLE_JOB | {"extra": 1}, Location="/"),
        fake_response("GET", JOB_PATH, 200, EXAMPLE_JOB),  # no Location
        fake_response("POST", "/generations", 201, EXAMPLE_JOB, Location="/"),
        fake_response("GET", JOB_PATH, 404, EXAMPLE_PROBLEM),  # application/json, not a problem
        fake_response("GET", JOB_PATH, 404, EXAMPLE_PROBLEM | {"status": 400}, "application/problem+json"),
        fake_response("GET", "/nope", 401, EXAMPLE_PROBLEM | {"status": 401}, "application/problem+json"),
        fake_response("DELETE", "/health", 405, EXAMPLE_PROBLEM | {"status": 405}, "application/problem+json"),
        fake_response("GET", "/health", 500, EXAMPLE_PROBLEM | {"status": 500}, "application/problem+json"),
    ],
)
def test_the_checker_refuses_what_the_document_does_not_describe(response: httpx.Response) -> None:
    """`check` fails on a missing field, a wrong value, an undocumented status, header or media type."""
    with pytest.raises((AssertionError, ValidationError)):
        check(response)


def test_the_checker_accepts_what_the_document_describes() -> None:
    """`check` passes the documented examples, for listed and unlisted requests alike."""
    check(fake_response("GET", JOB_PATH, 200, EXAMPLE_JOB, Location=JOB_PATH))
    check(fake_response("POST", f"{JOB_PATH}/cancel", 404, EXAMPLE_PROBLEM, "application/problem+json"))
    problem = "application/problem+json"
    check(fake_response("GET", "/nope", 401, EXAMPLE_PROBLEM | {"status": 401}, problem, **{"WWW-Authenticate": "x"}))
    check(fake_response("DELETE", "/health", 405, EXAMPLE_PROBLEM | {"status": 405}, problem, Allow="GET, HEAD"))


async def test_the_service_serves_this_document_with_its_version(settings: SettingsFactory) -> None:
    """GET /openapi.json is openapi.json, whose info.version is the running version."""
    async with serving(settings(worker_concurrency=0)) as client:
        response = await client.get("/openapi.json")
    assert response.status_code == 200
    assert response.json() == OPENAPI | {"info": OPENAPI["info"] | {"version": app.VERSION}}


async def test_routing_answers_are_documented(settings: SettingsFactory) -> None:
    """Unknown paths, wrong methods, HEAD and trailing slashes answer as info.description says."""
    async with serving(settings(worker_concurrency=0)) as client:
        assert_problem(await client.get("/nope"), 404)
        assert_problem(await client.put("/health"), 405)
        assert (await client.head("/health")).status_code == 200
        redirect = await client.get("/health/")
    assert redirect.status_code == 307
    assert httpx.URL(redirect.headers["location"]).path == "/health"


# --- Idempotency-Key -------------------------------------------------------------------------


async def test_a_repeated_key_gets_the_same_job_back(settings: SettingsFactory, db: asyncpg.Connection) -> None:
    """First POST with a key: 202. The same body with the same key: 200 and that job. Another key: a new job."""
    async with serving(settings(worker_concurrency=0)) as client:
        first = await client.post("/generations", json={"numImages": 2}, headers={"Idempotency-Key": "order-1"})
        again = await client.post(
            "/generations", content=b'{ "numImages" : 2 }', headers=JSON | {"Idempotency-Key": "order-1"}
        )
        other = await post_job(client, 2, **{"Idempotency-Key": "order-2"})
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json() == first.json()
    assert again.headers["location"] == first.headers["location"] == f"/generations/{first.json()['jobId']}"
    assert other["jobId"] != first.json()["jobId"]
    assert await db.fetchval("SELECT count(*) FROM jobs") == 2


async def test_a_key_reused_with_another_body_is_a_conflict(settings: SettingsFactory, db: asyncpg.Connection) -> None:
    """The same key with a different numImages is a 409 problem, and makes no job."""
    async with serving(settings(worker_concurrency=0)) as client:
        await post_job(client, 2, **{"Idempotency-Key": "order-1"})
        response = await client.post("/generations", json={"numImages": 3}, headers={"Idempotency-Key": "order-1"})
    assert_problem(response, 409)
    assert "Idempotency-Key" in response.json()["detail"]
    assert await db.fetchval("SELECT count(*) FROM jobs") == 1


@pytest.mark.parametrize(("key", "status"), [("k" * 255, 202), ("k" * 256, 400), ("", 400)])
async def test_an_idempotency_key_is_1_to_255_characters(
    settings: SettingsFactory, db: asyncpg.Connection, key: str, status: int
) -> None:
    """A key of 1 to 255 characters is taken; an empty or longer one is a 400 that makes no job."""
    async with serving(settings(worker_concurrency=0)) as client:
        response = await client.post("/generations", json={"numImages": 1}, headers={"Idempotency-Key": key})
    assert response.status_code == status, response.text
    if status == 400:
        assert_problem(response, 400, "Idempotency-Key must be 1 to 255 characters long.")
    assert await db.fetchval("SELECT count(*) FROM jobs") == (status == 202)


async def test_concurrent_posts_with_one_key_make_one_job(settings: SettingsFactory, db: asyncpg.Connection) -> None:
    """Twelve POSTs with one key at once: exactly one 202, eleven 200, one jobId, one row."""
    async with serving(settings(worker_concurrency=0)) as client:
        posts = [
            client.post("/generations", json={"numImages": 1}, headers={"Idempotency-Key": "k"}) for _ in range(12)
        ]
        responses = await asyncio.gather(*posts)
    assert sorted(response.status_code for response in responses) == [200] * 11 + [202]
    assert len({response.json()["jobId"] for response in responses}) == 1
    assert await db.fetchval("SELECT count(*) FROM jobs") == 1


# --- Batches ---------------------------------------------------------------------------------


def batch(*sizes: int) -> dict[str, list[dict[str, int]]]:
    """A batch body asking for one job of each size, in this order."""
    return {"jobs": [{"numImages": size} for size in sizes]}


def job_ids(response: httpx.Response) -> list[str]:
    """The job ids of a batch answer, in its order."""
    return [job["jobId"] for job in response.json()["jobs"]]


async def test_a_batch_queues_its_jobs_in_request_order(settings: SettingsFactory, db: asyncpg.Connection) -> None:
    """A batch of three: 202 and {"jobs": [...]}, pending, in the order asked for, each one readable by its id."""
    async with serving(settings(worker_concurrency=0)) as client:
        response = await client.post("/generations/batch", json=batch(3, 1, 2))
        assert response.status_code == 202, response.text
        jobs = response.json()["jobs"]
        for job in jobs:
            assert (await client.get(f"/generations/{job['jobId']}")).json() == job
    assert [(job["numImages"], job["status"], job["attempts"]) for job in jobs] == [
        (3, "pending", 0),
        (1, "pending", 0),
        (2, "pending", 0),
    ]
    assert len(set(job_ids(response))) == 3
    assert await db.fetchval("SELECT count(*) FROM jobs") == 3


async def test_a_batch_of_1000_jobs_is_one_request(settings: SettingsFactory, db: asyncpg.Connection) -> None:
    """The largest batch, 1,000 jobs, is taken whole, in order."""
    sizes = [i % 10 + 1 for i in range(1000)]
    async with serving(settings(worker_concurrency=0)) as client:
        response = await client.post("/generations/batch", json=batch(*sizes))
    assert response.status_code == 202, response.text
    assert [job["numImages"] for job in response.json()["jobs"]] == sizes
    assert await db.fetchval("SELECT count(*) FROM jobs") == 1000


async def test_a_batch_holds_1_to_1000_jobs(settings: SettingsFactory, db: asyncpg.Connection) -> None:
    """An empty batch, or one over 1,000 jobs, is a 400 that says how many it may hold, and makes no job."""
    async with serving(settings(worker_concurrency=0)) as client:
        for count in (0, 1001):
            response = await client.post("/generations/batch", json=batch(*[1] * count))
            assert_problem(response, 400, f"jobs must hold between 1 and 1000 jobs, not {count}.")
    assert await db.fetchval("SELECT count(*) FROM jobs") == 0


NOT_A_BATCH = [
    *(b"[]", b'[{"numImages": 1}]', b'"jobs"', b"null"),  # not an object
    *(b"{}", b'{"job": []}'),  # no jobs
    *(b'{"jobs": {"numImages": 1}}', b'{"jobs": null}', b'{"jobs": "[]"}'),  # not a list
]


async def test_a_batch_body_is_an_object_with_a_list_of_jobs(settings: SettingsFactory, db: asyncpg.Connection) -> None:
    """A body that is not an object, has no `jobs`, or whose `jobs` is not a list, is a 422 that makes no job."""
    detail = 'The body must be a JSON object with a list of jobs, such as {"jobs": [{"numImages": 3}]}.'
    async with serving(settings(worker_concurrency=0)) as client:
        for body in NOT_A_BATCH:
            assert_problem(await client.post("/generations/batch", content=body, headers=JSON), 422, detail)
    assert await db.fetchval("SELECT count(*) FROM jobs") == 0


ONE = {"numImages": 1}
INVALID_BATCHES = [
    ([ONE, ONE, ONE, {"numImages": 11}, ONE], 400, "jobs[3].numImages must be between 1 and 10"),
    ([ONE, {"numImages": 0}], 400, "jobs[1].numImages must be between 1 and 10"),
    ([ONE, {"numImages": "2"}, ONE], 422, "jobs[1].numImages must be an integer between 1 and 10."),
    ([ONE, {"numImages": True}], 422, "jobs[1].numImages must be an integer between 1 and 10."),
    ([ONE, ONE, 5, ONE], 422, 'jobs[2] must be a JSON object, such as {"numImages": 3}.'),
    ([ONE, {}], 422, "jobs[1].numImages is required: an integer between 1 and 10."),
]


async def test_an_invalid_job_in_a_batch_is_named_and_nothing_is_queued(
    settings: SettingsFactory, db: asyncpg.Connection
) -> None:
    """One invalid job refuses the whole batch: the detail names it by its position, and no job is made,
    not even those before it."""
    async with serving(settings(worker_concurrency=0)) as client:
        for jobs, status, detail in INVALID_BATCHES:
            assert_problem(await client.post("/generations/batch", json={"jobs": jobs}), status, detail)
    assert await db.fetchval("SELECT count(*) FROM jobs") == 0


async def test_a_repeated_batch_key_gets_the_same_jobs_back(settings: SettingsFactory, db: asyncpg.Connection) -> None:
    """The same batch with the same Idempotency-Key: 200 and the same jobs, in the same order; nothing new."""
    key = {"Idempotency-Key": "batch-1"}
    async with serving(settings(worker_concurrency=0)) as client:
        first = await client.post("/generations/batch", json=batch(3, 1, 2), headers=key)
        again = await client.post("/generations/batch", json=batch(3, 1, 2), headers=key)
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json() == first.json()
    assert await db.fetchval("SELECT count(*) FROM jobs") == 3


async def test_a_batch_key_reused_with_other_jobs_is_a_conflict(
    settings: SettingsFactory, db: asyncpg.Connection
) -> None:
    """The same key with fewer, more, reordered or different jobs is a 409 that makes no job."""
    key = {"Idempotency-Key": "batch-1"}
    async with serving(settings(worker_concurrency=0)) as client:
        assert (await client.post("/generations/batch", json=batch(3, 1, 2), headers=key)).status_code == 202
        for sizes in [(3, 1), (3, 1, 2, 1), (1, 3, 2), (3, 1, 3)]:
            response = await client.post("/generations/batch", json=batch(*sizes), headers=key)
            assert_problem(response, 409, "This Idempotency-Key was used with a different body; use a new key.")
    assert await db.fetchval("SELECT count(*) FROM jobs") == 3


async def test_single_and_batch_keys_are_apart(settings: SettingsFactory, db: asyncpg.Connection) -> None:
    """A key names a request to one endpoint: the same key on POST /generations and on a batch makes
    one job and one batch, each replayed by its own endpoint."""
    async with serving(settings(worker_concurrency=0)) as client:
        key = {"Idempotency-Key": "k"}
        single = await client.post("/generations", json={"numImages": 2}, headers=key)
        batched = await client.post("/generations/batch", json=batch(2), headers=key)
        single_again = await client.post("/generations", json={"numImages": 2}, headers=key)
        batched_again = await client.post("/generations/batch", json=batch(2), headers=key)
    assert (single.status_code, batched.status_code) == (202, 202)
    assert (single_again.status_code, batched_again.status_code) == (200, 200)
    assert single_again.json()["jobId"] == single.json()["jobId"]
    assert batched_again.json() == batched.json()
    assert await db.fetchval("SELECT count(*) FROM jobs") == 2


async def test_racing_batches_with_one_key_make_one_set_of_jobs(
    settings: SettingsFactory, db: asyncpg.Connection
) -> None:
    """Identical keyed batches sent at once: one 202, the others 200, all with the same ids in the same order,
    and the database holds exactly one set of jobs."""
    sizes = [i % 10 + 1 for i in range(50)]
    async with serving(settings(worker_concurrency=0)) as client:
        responses = await asyncio.gather(
            *(client.post("/generations/batch", json=batch(*sizes), headers={"Idempotency-Key": "k"}) for _ in range(4))
        )
    assert sorted(response.status_code for response in responses) == [200, 200, 200, 202]
    assert all(job_ids(response) == job_ids(responses[0]) for response in responses)
    rows = await db.fetch("SELECT id, num_images FROM jobs ORDER BY batch_index")
    assert [(str(row["id"]), row["num_images"]) for row in rows] == list(zip(job_ids(responses[0]), sizes, strict=True))


async def test_batches_are_only_posted(settings: SettingsFactory) -> None:
    """/generations/batch takes POST alone: any other method, GET included (it names no job), is a 405
    whose Allow says POST, as openapi.json documents it."""
    async with serving(settings(worker_concurrency=0)) as client:
        for method in ("GET", "HEAD", "PUT", "DELETE"):
            response = await client.request(method, "/generations/batch")
            assert response.status_code == 405, f"{method}: {response.text}"
            assert response.headers["allow"] == "POST", method


async def test_workers_complete_batch_jobs_like_any_other(settings: SettingsFactory, db: asyncpg.Connection) -> None:
    """Every job of a batch is completed once, with as many images as it asked for."""
    async with serving(settings()) as client:
        response = await client.post("/generations/batch", json=batch(3, 1, 2))
        for job_id in job_ids(response):
            await wait_for_status(db, job_id, "completed")
    rows = [await job_row(db, job_id) for job_id in job_ids(response)]
    assert [(row["status"], row["attempts"], len(row["image_urls"])) for row in rows] == [
        ("completed", 1, 3),
        ("completed", 1, 1),
        ("completed", 1, 2),
    ]


# --- Long polls ------------------------------------------------------------------------------


@pytest.fixture
def long_polls(waiting_polls: Callable[[], int]) -> Callable[[int], Awaitable[None]]:
    """Wait until exactly n long polls are registered for a wake-up (in any app of the test)."""

    async def until(n: int) -> None:
        """Return once n long polls are waiting."""

        async def reached() -> bool:
            """True when n long polls are waiting."""
            return waiting_polls() == n

        await eventually(reached)

    return until


@asynccontextmanager
async def polling(
    client: httpx.AsyncClient, *jobs: dict[str, Any]
) -> AsyncIterator[list[asyncio.Task[httpx.Response]]]:
    """A long poll (?wait=30) on each job, in the background; any still waiting when the block ends is cancelled."""
    polls = [asyncio.create_task(client.get(f"/generations/{job['jobId']}", params={"wait": 30})) for job in jobs]
    try:
        yield polls
    finally:
        for poll in polls:
            poll.cancel()
        await asyncio.gather(*polls, return_exceptions=True)


async def test_a_long_poll_returns_when_another_replica_completes_the_job(
    settings: SettingsFactory, db: asyncpg.Connection, long_polls: Callable[[int], Awaitable[None]]
) -> None:
    """A poll on an API-only replica wakes, well before its wait is over, when a worker elsewhere ends the job."""
    async with serving(settings(worker_concurrency=0)) as api:
        job = await post_job(api)
        async with polling(api, job) as [poll]:
            await long_polls(1)
            async with serving(settings(worker_concurrency=1, image_provider_delay=0.2)), asyncio.timeout(5):
                response = await poll  # well before its 30 seconds
    assert response.status_code == 200
    assert (response.json()["jobId"], response.json()["status"]) == (job["jobId"], "completed")
    assert (await job_row(db, job["jobId"]))["status"] == "completed"


async def test_a_long_poll_looks_again_at_each_poll_interval_when_no_listen_connection_was_ever_made(
    settings: SettingsFactory, long_polls: Callable[[int], Awaitable[None]]
) -> None:
    """With LISTEN_DATABASE_URL unreachable from the start, no announcement is heard: a poll looks
    again at each poll interval, and answers soon after a worker elsewhere ends the job."""
    unreachable = f"postgresql://generations@127.0.0.1:{free_port()}/none"
    async with serving(settings(worker_concurrency=0, listen_database_url=unreachable)) as api:
        job = await post_job(api)
        async with polling(api, job) as [poll]:
            await long_polls(1)
            async with serving(settings(worker_concurrency=1)), asyncio.timeout(5):
                response = await poll  # well before its 30 seconds
    assert (response.json()["jobId"], response.json()["status"]) == (job["jobId"], "completed")


async def test_a_long_poll_answers_with_the_current_state_when_its_wait_is_over(settings: SettingsFactory) -> None:
    """When nothing happens, ?wait=0.5 answers after half a second with the job as it is (pending)."""
    async with serving(settings(worker_concurrency=0)) as client:
        job = await post_job(client)
        started = asyncio.get_running_loop().time()
        response = await client.get(f"/generations/{job['jobId']}", params={"wait": "0.5"})
        elapsed = asyncio.get_running_loop().time() - started
    assert response.status_code == 200
    assert response.json() == job
    assert 0.5 <= elapsed < 3


async def test_a_long_poll_on_an_ended_or_unknown_job_answers_at_once(settings: SettingsFactory) -> None:
    """?wait=60 (the most) on a job that has ended is a 200 at once; on an unknown job, a 404 at once."""
    async with serving(settings(worker_concurrency=0)) as client:
        job = await post_job(client)
        await client.post(f"/generations/{job['jobId']}/cancel")
        async with asyncio.timeout(3):
            ended = await client.get(f"/generations/{job['jobId']}", params={"wait": "60"})
            unknown = await client.get(f"/generations/{uuid.uuid4()}", params={"wait": "60"})
    assert ended.status_code == 200
    assert ended.json()["status"] == "cancelled"
    assert_problem(unknown, 404, "Job not found")


@pytest.mark.parametrize("wait", ["0", "-1", "61", "60.001", "abc", "nan", "inf", "-inf", ""])
async def test_a_wait_outside_0_to_60_seconds_is_400(settings: SettingsFactory, wait: str) -> None:
    """?wait= must be a number of seconds above 0 and at most 60; anything else is a 400 problem."""
    async with serving(settings(worker_concurrency=0)) as client:
        job = await post_job(client)
        response = await client.get(f"/generations/{job['jobId']}", params={"wait": wait})
    assert_problem(response, 400, "wait must be a number of seconds above 0 and at most 60.")


async def test_waiting_long_polls_hold_no_database_connection(
    settings: SettingsFactory, long_polls: Callable[[int], Awaitable[None]]
) -> None:
    """Thirty polls wait on a pool of two connections; other requests still answer at once, and the
    polls all return when their jobs end."""
    async with serving(settings(worker_concurrency=0, db_pool_max_size=2)) as api:
        jobs = [await post_job(api) for _ in range(30)]
        async with polling(api, *jobs) as polls:
            await long_polls(30)
            async with asyncio.timeout(2):
                assert (await api.get("/generations", params={"limit": "1"})).status_code == 200
                assert (await api.get("/ready")).status_code == 200
            assert not any(poll.done() for poll in polls)
            async with serving(settings(worker_concurrency=30)), asyncio.timeout(10):
                responses = await asyncio.gather(*polls)
    assert {response.json()["status"] for response in responses} == {"completed"}
    assert [response.json()["jobId"] for response in responses] == [job["jobId"] for job in jobs]


async def test_cancelling_a_job_wakes_its_long_poll(
    settings: SettingsFactory, long_polls: Callable[[int], Awaitable[None]]
) -> None:
    """Cancelled is final: a poll waiting on the job answers at once with it cancelled."""
    async with serving(settings(worker_concurrency=0)) as client:
        job = await post_job(client)
        async with polling(client, job) as [poll]:
            await long_polls(1)
            cancelled = await client.post(f"/generations/{job['jobId']}/cancel")
            response = await asyncio.wait_for(poll, 5)
    assert response.status_code == 200
    assert response.json() == cancelled.json()
    assert response.json()["status"] == "cancelled"


# --- Cancel ----------------------------------------------------------------------------------


async def test_a_pending_job_can_be_cancelled_once(settings: SettingsFactory, db: asyncpg.Connection) -> None:
    """Cancel: 200 with the job cancelled and completedAt set; cancelling again is a 409 naming the status."""
    async with serving(settings(worker_concurrency=0)) as client:
        job = await post_job(client)
        response = await client.post(f"/generations/{job['jobId']}/cancel")
        again = await client.post(f"/generations/{job['jobId']}/cancel")
    assert response.status_code == 200
    cancelled = response.json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["completedAt"] is not None
    assert cancelled | {"status": None, "updatedAt": None, "completedAt": None} == job | {
        "status": None,
        "updatedAt": None,
        "completedAt": None,
    }
    assert (await job_row(db, job["jobId"]))["status"] == "cancelled"
    assert_problem(again, 409)
    assert "already cancelled" in again.json()["detail"]


@pytest.mark.parametrize("status", ["completed", "failed"])
async def test_an_ended_job_cannot_be_cancelled(settings: SettingsFactory, db: asyncpg.Connection, status: str) -> None:
    """A completed or failed job stays as it is: cancel is a 409 whose detail names its status."""
    job_id = await insert_job(db)
    await db.execute("UPDATE jobs SET status = $2, completed_at = now() WHERE id = $1", job_id, status)
    async with serving(settings(worker_concurrency=0)) as client:
        response = await client.post(f"/generations/{job_id}/cancel")
    assert_problem(response, 409)
    assert f"already {status}" in response.json()["detail"]
    assert (await job_row(db, job_id))["status"] == status


async def test_a_job_the_worker_completed_cannot_be_cancelled(
    settings: SettingsFactory, db: asyncpg.Connection
) -> None:
    """A job the worker completed: cancel is a 409, and the job keeps its images."""
    async with serving(settings()) as client:
        job = await post_job(client)
        await wait_for_status(db, job["jobId"], "completed")
        response = await client.post(f"/generations/{job['jobId']}/cancel")
    assert_problem(response, 409)
    assert "already completed" in response.json()["detail"]
    assert (await job_row(db, job["jobId"]))["image_urls"]


async def test_cancelling_an_unknown_job_is_404(settings: SettingsFactory) -> None:
    """Cancel on an id that names no job is a 404 `Job not found`."""
    async with serving(settings(worker_concurrency=0)) as client:
        assert_problem(await client.post(f"/generations/{uuid.uuid4()}/cancel"), 404, "Job not found")


async def test_a_job_cancelled_while_processing_is_never_completed(
    settings: SettingsFactory, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """Cancelled mid-run, a job stays cancelled: the worker's result is fenced off when it comes."""
    async with serving(settings(image_provider_delay=1.0)) as client:
        job = await post_job(client, 2)
        await wait_for_status(db, job["jobId"], "processing")
        response = await client.post(f"/generations/{job['jobId']}/cancel")
        assert response.status_code == 200
        assert response.json()["status"] == "cancelled"

        async def worker_gave_up() -> bool:
            """True once the worker logged that it lost this job's claim (after the provider's delay)."""
            return any(
                job["jobId"] in record.getMessage() and "claim" in record.getMessage() for record in caplog.records
            )

        await eventually(worker_gave_up)
        final = (await client.get(f"/generations/{job['jobId']}")).json()
    row = await job_row(db, job["jobId"])
    assert (row["status"], row["animal"], row["image_urls"], row["attempts"]) == ("cancelled", None, None, 1)
    assert final == response.json()


# --- Auth ------------------------------------------------------------------------------------

PROTECTED = [
    ("GET", "/generations"),
    ("POST", "/generations"),
    ("GET", "/generations/{job}"),
    ("GET", "/generations/{job}?wait=1"),
    ("POST", "/generations/{job}/cancel"),
    ("POST", "/generations/batch"),
    ("GET", "/metrics"),
    ("GET", "/nope"),
    ("DELETE", "/generations"),
]


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer wrong-token",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
        TOKEN,
        f"Token {TOKEN}",
        f"Basic {base64.b64encode(TOKEN.encode()).decode()}",
    ],
)
async def test_without_the_right_token_every_protected_request_is_401(
    settings: SettingsFactory, db: asyncpg.Connection, authorization: str | None
) -> None:
    """With API_TOKEN set, a missing, wrong or non-Bearer token is a 401 problem with WWW-Authenticate:
    Bearer, on every endpoint but /, /health, /ready and /openapi.json, unknown paths included; nothing changes."""
    job_id = await insert_job(db)
    headers = {} if authorization is None else {"Authorization": authorization}
    async with serving(settings(worker_concurrency=0, api_token=TOKEN)) as client:
        for method, path in PROTECTED:
            url = path.format(job=job_id)
            body = {"numImages": 1} if method == "POST" else None
            response = await client.request(method, url, json=body, headers=headers)
            assert_problem(response, 401)
            assert response.headers["www-authenticate"] == "Bearer", url
    row = await job_row(db, job_id)
    assert row["status"] == "pending"
    assert await db.fetchval("SELECT count(*) FROM jobs") == 1


async def test_health_ready_and_root_need_no_token(settings: SettingsFactory) -> None:
    """With API_TOKEN set, /, /health and /ready still answer 200 without a token."""
    async with serving(settings(worker_concurrency=0, api_token=TOKEN)) as client:
        for path in sorted(app.PUBLIC_PATHS):
            assert (await client.get(path)).status_code == 200, path


async def test_the_right_token_opens_every_endpoint(settings: SettingsFactory) -> None:
    """With `Authorization: Bearer <API_TOKEN>`, every endpoint answers as it would without auth."""
    async with serving(settings(worker_concurrency=0, api_token=TOKEN)) as client:
        client.headers.update(BEARER)
        job = await post_job(client)
        assert (await client.get("/generations")).json() == [job]
        assert (await client.get(f"/generations/{job['jobId']}")).json() == job
        assert (await client.get(f"/generations/{job['jobId']}", params={"wait": "0.01"})).json() == job
        assert (await client.post(f"/generations/{job['jobId']}/cancel")).json()["status"] == "cancelled"
        assert (await client.get("/openapi.json")).status_code == 200
        assert_problem(await client.get("/nope"), 404)


async def test_the_bearer_scheme_name_is_case_insensitive(settings: SettingsFactory) -> None:
    """RFC 9110 §11.1: the auth scheme is case-insensitive, so `bearer <token>` is the right token too."""
    async with serving(settings(worker_concurrency=0, api_token=TOKEN)) as client:
        response = await client.get("/generations", headers={"Authorization": f"bearer {TOKEN}"})
    assert response.status_code == 200, response.text


# --- CORS ------------------------------------------------------------------------------------


def cors_headers(response: httpx.Response) -> dict[str, str]:
    """The response's Access-Control-* headers."""
    return {name: value for name, value in response.headers.items() if name.startswith("access-control-")}


def preflight(origin: str, method: str = "POST") -> dict[str, str]:
    """The headers of a browser's CORS preflight for a JSON POST with a token and an Idempotency-Key."""
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
    }


@pytest.fixture
async def cors_client(settings: SettingsFactory) -> AsyncIterator[httpx.AsyncClient]:
    """A checked client of an API-only app with CORS_ORIGINS and API_TOKEN set."""
    async with serving(settings(worker_concurrency=0, cors_origins=(ORIGIN,), api_token=TOKEN)) as client:
        yield client


async def test_an_allowed_origin_may_read_responses_and_their_headers(cors_client: httpx.AsyncClient) -> None:
    """A request from an allowed origin gets Access-Control-Allow-Origin, with Location and Link exposed."""
    response = await cors_client.post("/generations", json={"numImages": 1}, headers=BEARER | {"Origin": ORIGIN})
    assert response.status_code == 202
    assert response.headers["access-control-allow-origin"] == ORIGIN
    exposed = {name.strip().lower() for name in response.headers["access-control-expose-headers"].split(",")}
    assert exposed >= {"location", "link"}
    refused = await cors_client.get("/generations", headers={"Origin": ORIGIN})
    assert_problem(refused, 401)
    assert refused.headers["access-control-allow-origin"] == ORIGIN  # the page can read why


async def test_a_preflight_needs_no_token(cors_client: httpx.AsyncClient) -> None:
    """OPTIONS preflights from an allowed origin are answered 200 without a token, allowing the API's headers."""
    for path in ("/generations", f"/generations/{uuid.uuid4()}/cancel"):
        response = await cors_client.options(path, headers=preflight(ORIGIN))
        assert response.status_code == 200, response.text
        assert response.headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in response.headers["access-control-allow-methods"]
        allowed = {name.strip().lower() for name in response.headers["access-control-allow-headers"].split(",")}
        assert allowed >= {"authorization", "content-type", "idempotency-key"}


async def test_a_disallowed_origin_gets_no_cors_headers(cors_client: httpx.AsyncClient) -> None:
    """A request from another origin is answered, but not allowed: no Access-Control-Allow-Origin."""
    response = await cors_client.get("/generations", headers=BEARER | {"Origin": "https://evil.example"})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers
    assert "access-control-allow-credentials" not in response.headers


async def test_a_refused_preflight_is_refused(cors_client: httpx.AsyncClient) -> None:
    """A preflight from another origin is refused with Starlette's plain-text 400, and no CORS header."""
    response = await cors_client.options("/generations", headers=preflight("https://evil.example"))
    assert response.status_code == 400
    assert response.text == "Disallowed CORS origin"
    assert "access-control-allow-origin" not in response.headers


async def test_without_cors_origins_there_is_no_cors(settings: SettingsFactory) -> None:
    """With CORS_ORIGINS unset, no response carries a CORS header and a preflight is a 405 problem."""
    async with serving(settings(worker_concurrency=0)) as client:
        response = await client.get("/generations", headers={"Origin": ORIGIN})
        refused = await client.options("/generations", headers=preflight(ORIGIN))
    assert response.status_code == 200
    assert cors_headers(response) == {}
    assert_problem(refused, 405)
    assert cors_headers(refused) == {}


# --- The debugger ----------------------------------------------------------------------------


async def test_enable_debug_without_debugpy_starts_and_says_so(
    settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """ENABLE_DEBUG with debugpy missing: the service starts and is ready, with one clear warning."""
    monkeypatch.setitem(sys.modules, "debugpy", None)  # makes `import debugpy` fail, installed or not
    async with serving(settings(worker_concurrency=0, enable_debug=True)) as client:
        assert (await client.get("/ready")).status_code == 200
    warnings = [r.getMessage() for r in caplog.records if r.name == "generations" and r.levelno == logging.WARNING]
    assert "ENABLE_DEBUG is set but debugpy is not installed (pip install debugpy); no debugger" in warnings


# --- Edge cases the fuzzers reach ------------------------------------------------------------


def cursor_for(position: str) -> str:
    """A cursor in the service's own format, for any text."""
    return base64.urlsafe_b64encode(position.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "query",
    [
        {"cursor": cursor_for(f"0001-01-01T00:00:00+14:00|{uuid.uuid4()}")},  # before year 1 in UTC
        {"cursor": cursor_for(f"9999-12-31T23:59:59-14:00|{uuid.uuid4()}")},  # after year 9999 in UTC
        {"limit": "1" * 5000},  # too many digits for int()
    ],
)
async def test_listing_parameters_beyond_any_range_are_400(settings: SettingsFactory, query: dict[str, str]) -> None:
    """A well-formed cursor naming a moment outside the calendar, or a limit of 5000 digits, is a 400, not a 500."""
    async with serving(settings(worker_concurrency=0)) as client:
        assert_problem(await client.get("/generations", params=query), 400)


@pytest.mark.parametrize("path", ["/generations", "/generations/batch"])
async def test_a_client_that_leaves_halfway_through_its_body_is_no_server_error(
    settings: SettingsFactory, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    """A POST whose client hangs up before its body is complete (as uvicorn tells the app) is the
    client's doing: no job, no 500 and no error logged."""
    messages = iter([{"type": "http.request", "body": b'{"numIm', "more_body": True}, {"type": "http.disconnect"}])
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [(b"host", b"test"), (b"content-type", b"application/json")]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http"}
    scope |= {"path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers}
    async with running(settings(worker_concurrency=0)) as client:
        await client._transport.app(scope, receive, send)  # type: ignore[attr-defined]
    [start] = [message for message in sent if message["type"] == "http.response.start"]
    assert start["status"] == 400
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []
    assert await db.fetchval("SELECT count(*) FROM jobs") == 0


# --- Fuzzing ---------------------------------------------------------------------------------

KNOWN_JOB = uuid.UUID("5f0c7a4e-0c7b-4d55-9a51-2d7bd6a8e1c3")  # a cancelled job in the fuzzers' database
FIELD_BYTES = [0x09, *range(0x20, 0x7F), *range(0x80, 0x100)]  # what HTTP servers pass on in a header value
FIELD_VALUES = st.lists(st.sampled_from(FIELD_BYTES), max_size=300).map(bytes)  # past 255, the key limit
AUTHORIZATIONS = st.one_of(st.just(f"Bearer {TOKEN}".encode()), FIELD_VALUES)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
BODIES = st.one_of(
    JSON_VALUES.map(json.dumps),
    st.fixed_dictionaries({"numImages": st.integers(-2, 12) | JSON_VALUES}, optional={"extra": JSON_VALUES}).map(
        json.dumps
    ),
    st.text(max_size=50),
).map(str.encode) | st.binary(max_size=50)
CONTENT_TYPES = st.sampled_from(
    [b"application/json", b"application/json; charset=utf-8", b"application/merge-patch+json", b"text/plain", b""]
) | st.lists(st.sampled_from(FIELD_BYTES), max_size=60).map(bytes)
OFFSETS = st.builds(timezone, st.timedeltas(timedelta(hours=-23), timedelta(hours=23)))
MOMENTS = st.datetimes(timezones=OFFSETS) | st.builds(  # the calendar's edges, where UTC may fall off it
    datetime.replace, st.sampled_from([datetime.min, datetime.max]), tzinfo=OFFSETS
)
CURSORS = st.one_of(
    st.text(max_size=40),
    st.tuples(MOMENTS, st.uuids()).map(lambda position: cursor_for(f"{position[0].isoformat()}|{position[1]}")),
)
NUMBERS = st.one_of(
    st.integers(-5, 300).map(str),
    st.floats().map(str),
    st.integers(4000, 5000).map(lambda digits: "1" * digits),  # more digits than int() takes
)
QUERIES = st.builds(
    lambda known, other: [*known.items(), *other],
    st.fixed_dictionaries(
        {},
        optional={
            "wait": NUMBERS | st.text(max_size=10),
            "limit": NUMBERS | st.text(max_size=10),
            "status": st.sampled_from(app.STATUSES) | st.text(max_size=12),
            "cursor": CURSORS,
        },
    ),
    st.lists(st.tuples(st.text(max_size=8), st.text(max_size=20)), max_size=2),
)
SEGMENTS = st.one_of(
    st.just(str(KNOWN_JOB)), st.uuids().map(str), st.text(max_size=40).map(lambda s: quote(s, safe=""))
)
PATHS = st.one_of(
    st.sampled_from(["/", "/health", "/ready", "/openapi.json", "/generations"]),
    SEGMENTS.map(lambda segment: f"/generations/{segment}"),
    SEGMENTS.map(lambda segment: f"/generations/{segment}/cancel"),
    st.text(max_size=30).map(lambda text: "/" + quote(text, safe="/")),
)
FUZZING = hypothesis_settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture
async def fuzzed(settings: SettingsFactory, db: asyncpg.Connection) -> AsyncIterator[httpx.AsyncClient]:
    """One app with a worker and API_TOKEN set, shared by every example of a fuzz test; KNOWN_JOB is cancelled."""
    await db.execute(
        "INSERT INTO jobs (id, num_images, status, completed_at) VALUES ($1, 1, 'cancelled', now())", KNOWN_JOB
    )
    async with serving(settings(api_token=TOKEN)) as client:
        yield client


async def assert_survived(client: httpx.AsyncClient, response: httpx.Response) -> None:
    """The answer was no 5xx, any error was a problem (`check` did the rest), and the service is still ready.

    In process, a 500 does not even get here: the transport raises the app's exception, failing the example.
    """
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert response.headers["content-type"] == "application/problem+json"
    assert (await client.get("/ready")).status_code == 200


@FUZZING
@given(body=BODIES, content_type=st.none() | CONTENT_TYPES, key=st.none() | FIELD_VALUES, authorization=AUTHORIZATIONS)
async def test_fuzzed_posts_get_documented_answers(
    fuzzed: httpx.AsyncClient, body: bytes, content_type: bytes | None, key: bytes | None, authorization: bytes
) -> None:
    """Whatever the body, Content-Type, Idempotency-Key and Authorization of a POST, the answer is documented
    and no 5xx, and the service stays ready."""
    headers = {"Authorization": authorization, "Content-Type": content_type, "Idempotency-Key": key}
    response = await fuzzed.post(
        "/generations", content=body, headers={name: value for name, value in headers.items() if value is not None}
    )
    await assert_survived(fuzzed, response)


@FUZZING
@given(path=st.sampled_from(["/generations", f"/generations/{KNOWN_JOB}"]), query=QUERIES)
async def test_fuzzed_queries_get_documented_answers(
    fuzzed: httpx.AsyncClient, path: str, query: list[tuple[str, str]]
) -> None:
    """Whatever the query (wait, limit, status, cursor) of a listing or a job, with the right token, the answer
    is documented and no 5xx, and the service stays ready."""
    response = await fuzzed.get(path, params=query, headers=BEARER)
    await assert_survived(fuzzed, response)


@FUZZING
@given(
    method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]),
    path=PATHS,
    query=QUERIES,
    authorization=AUTHORIZATIONS,
)
async def test_fuzzed_urls_get_documented_answers(
    fuzzed: httpx.AsyncClient, method: str, path: str, query: list[tuple[str, str]], authorization: bytes
) -> None:
    """Whatever the method, path, query (wait, limit, status, cursor) and Authorization, the answer is
    documented and no 5xx, and the service stays ready."""
    response = await fuzzed.request(method, path, params=query, headers={"Authorization": authorization})
    await assert_survived(fuzzed, response)
