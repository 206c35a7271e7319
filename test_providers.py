"""Real image providers (IMAGE_PROVIDER=http|openai), against a real HTTP server the test scripts.

Each test starts a small aiohttp server on 127.0.0.1 that answers the service's calls from a
queue of scripted answers (status, headers, body, delay, or holding the call open) and records
every request it received. The service runs in-process (conftest's `running`) unless a real
process is the point: a kill -9, or the memory of the process that read a huge answer.
"""

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import httpx
import pytest
from aiohttp import web
from multidict import CIMultiDict

import app
from conftest import eventually, running
from scripts.service import Service, free_port

SettingsFactory = Callable[..., app.Settings]
StartService = Callable[..., Awaitable[Service]]

KEY = "sk-test-SECRET123"  # distinctive, so that any trace of it in a log or a job is found
MODES = ("http", "openai")
# IMAGE_PROVIDER_URL for each mode (after the server's address), and the path the service calls.
BASE_PATH = {"http": "/generate", "openai": "/v1"}
CALLED_PATH = {"http": "/generate", "openai": "/v1/images/generations"}
PNG_1 = b"\x89PNG\r\n\x1a\n" + bytes(range(256))  # any bytes will do: they must come back exact
PNG_2 = b"\x89PNG\r\n\x1a\n" + bytes(range(255, -1, -1)) + b"\x00" * 7


# --- The provider ----------------------------------------------------------------------------


@dataclasses.dataclass
class Answer:
    """One scripted answer: `status` with `headers` and a body (`json`, raw `body`, or a JSON
    document of `size` bytes streamed in chunks, never whole in memory), sent after `delay`
    seconds and once `hold` is set (an event never set: the call is never answered).
    `echo_headers`: the body is the request's headers, as a careless provider's error page shows them."""

    status: int = 200
    json: Any = None
    body: bytes | None = None
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    delay: float = 0.0
    hold: asyncio.Event | None = None
    size: int = 0
    echo_headers: bool = False


@dataclasses.dataclass
class Call:
    """A request the provider received, when it came (time.monotonic()), when its client hung up
    before the answer was done (`left`), and how many body bytes of a streamed answer went out."""

    method: str
    path: str
    headers: CIMultiDict[str]
    json: Any
    at: float
    left: float | None = None
    sent: int = 0


class Provider:
    """A scripted image provider on 127.0.0.1: answers calls in order from `script`, records each
    call in `calls`. A call with nothing scripted gets a 400 that says so (fails the job at once)."""

    def __init__(self) -> None:
        self.url = ""
        self.answers: deque[Answer] = deque()
        self.calls: list[Call] = []

    def script(self, *answers: Answer) -> None:
        self.answers.extend(answers)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        call = Call(request.method, request.path, CIMultiDict(request.headers), body, time.monotonic())
        self.calls.append(call)
        answer = self.answers.popleft() if self.answers else Answer(400, body=b"no answer scripted for this call")
        try:
            if answer.hold is not None:
                await answer.hold.wait()
            await asyncio.sleep(answer.delay)
            if answer.size:
                return await self.stream(request, answer, call)
        except asyncio.CancelledError:  # the client hung up (the runner cancels the handler)
            call.left = time.monotonic()
            raise
        if answer.echo_headers:
            body, content_type = json.dumps({"error": {"message": f"bad request: {dict(request.headers)}"}}), "json"
            raw_body = body.encode()
        elif answer.body is not None:
            raw_body, content_type = answer.body, "plain"
        else:
            raw_body, content_type = json.dumps(answer.json).encode(), "json"
        headers = {"Content-Type": f"{'application' if content_type == 'json' else 'text'}/{content_type}"}
        return web.Response(status=answer.status, body=raw_body, headers={**headers, **answer.headers})

    async def stream(self, request: web.Request, answer: Answer, call: Call) -> web.StreamResponse:
        """A JSON answer of `answer.size` bytes, {"imageUrls": ["aaaa..."]}, without Content-Length."""
        response = web.StreamResponse(status=answer.status, headers={"Content-Type": "application/json"})
        await response.prepare(request)
        head, tail = b'{"imageUrls": ["', b'"]}'
        chunk = b"a" * (64 << 10)
        try:
            await response.write(head)
            while call.sent < answer.size - len(chunk):
                await response.write(chunk)
                call.sent += len(chunk)
            await response.write(tail)
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            call.left = time.monotonic()
            raise
        return response

    async def received(self, count: int, within: float = 10.0) -> list[Call]:
        """Wait until `count` calls have come; return them all."""

        async def arrived() -> bool:
            return len(self.calls) >= count

        await eventually(arrived, within)
        return self.calls

    async def hung_up(self, call: Call, within: float) -> float:
        """Wait until the call's client hangs up; return when it did."""

        async def gone() -> float | None:
            return call.left

        return await eventually(gone, within)


@pytest.fixture
async def provider() -> AsyncIterator[Provider]:
    """A scripted provider on a free port of 127.0.0.1, in the test's event loop."""
    server = Provider()
    web_app = web.Application()
    web_app.router.add_route("*", "/{path:.*}", server.handle)
    runner = web.AppRunner(web_app, handler_cancellation=True, access_log=None, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    server.url = f"http://{host}:{port}"
    yield server
    await runner.cleanup()


def ok(mode: str, urls: list[str]) -> Answer:
    """A 200 answer with these pictures, in the mode's shape (http URLs or data URIs)."""
    if mode == "http":
        return Answer(json={"imageUrls": urls})
    return Answer(json={"created": 0, "data": [{"url": url} for url in urls]})


def urls_for(job: str, count: int) -> list[str]:
    return [f"https://images.example/{job}/{i}.png" for i in range(1, count + 1)]


def provider_settings(
    settings: SettingsFactory, provider: Provider, mode: str, key: str | None = KEY, **overrides: Any
) -> app.Settings:
    """Settings that point the service at the scripted provider in `mode`."""
    url = provider.url + BASE_PATH[mode]
    return settings(image_provider=mode, image_provider_url=url, image_provider_api_key=key, **overrides)


# --- The service -----------------------------------------------------------------------------


async def post_job(client: httpx.AsyncClient, num_images: int = 1) -> str:
    """POST a job that must be accepted; its id."""
    response = await client.post("/generations", json={"numImages": num_images})
    assert response.status_code == 202, response.text
    return response.json()["jobId"]


async def job_in(client: httpx.AsyncClient, job_id: str, *statuses: str, within: float = 10.0) -> dict[str, Any]:
    """Wait until the job has one of `statuses` (default: any final one); its JSON."""
    wanted = statuses or tuple(app.TERMINAL_STATUSES)

    async def reached() -> dict[str, Any] | None:
        job = (await client.get(f"/generations/{job_id}")).json()
        return job if job["status"] in wanted else None

    return await eventually(reached, within)


@pytest.fixture
def start_service(db_url: str, tmp_path: Path) -> Iterator[StartService]:
    """Start real service processes (`python app.py`) on the test's database; all killed at the end."""
    with contextlib.ExitStack() as cleanup:
        count = 0

        async def start(**env: str | float | int) -> Service:
            nonlocal count
            count += 1
            service = Service(db_url, tmp_path / f"service-{count}.log", **env)
            cleanup.push(service)  # its __exit__ kills the process if it still runs
            await asyncio.to_thread(service.start)
            return service

        yield start


async def post_to(session: aiohttp.ClientSession, service: Service, num_images: int = 1) -> str:
    async with session.post(f"{service.url}/generations", json={"numImages": num_images}) as response:
        assert response.status == 202, await response.text()
        return (await response.json())["jobId"]


async def job_row(db: asyncpg.Connection, job_id: str) -> asyncpg.Record:
    return await db.fetchrow("SELECT *, now() AS db_now FROM jobs WHERE id = $1", uuid.UUID(job_id))


async def row_in(db: asyncpg.Connection, job_id: str, *statuses: str, within: float = 10.0) -> asyncpg.Record:
    """Wait until the job's row has one of `statuses`; the row."""

    async def reached() -> asyncpg.Record | None:
        row = await job_row(db, job_id)
        return row if row["status"] in statuses else None

    return await eventually(reached, within)


def peak_rss_mib(pid: int) -> float:
    """The most resident memory the process ever had (VmHWM), in MiB."""
    match = re.search(r"^VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    assert match, f"no VmHWM for process {pid}"
    return int(match[1]) / 1024


# --- Requests and answers --------------------------------------------------------------------


@pytest.mark.parametrize("key", [KEY, None], ids=["with-key", "without-key"])
async def test_http_mode_sends_the_job_and_completes_with_the_urls_it_got(
    settings: SettingsFactory, provider: Provider, key: str | None
) -> None:
    """IMAGE_PROVIDER=http POSTs {"jobId", "attempt", "animal", "numImages", "prompt": "a cute
    <animal>"} to IMAGE_PROVIDER_URL with Idempotency-Key: <jobId> and, when
    IMAGE_PROVIDER_API_KEY is set (only then), Authorization: Bearer <key>; the job completes in
    one attempt with exactly the URLs the provider answered, in order."""
    urls = ["https://cdn.example/b.png", "http://cdn.example/a.png?x=1&y=2", "https://cdn.example/c"]
    provider.script(ok("http", urls))
    async with running(provider_settings(settings, provider, "http", key=key)) as client:
        job_id = await post_job(client, 3)
        job = await job_in(client, job_id)
    assert (job["status"], job["imageUrls"], job["attempts"], job["error"]) == ("completed", urls, 1, None)
    [call] = provider.calls
    assert (call.method, call.path) == ("POST", "/generate")
    assert call.json == {
        "jobId": job_id,
        "attempt": 1,
        "animal": job["animal"],
        "numImages": 3,
        "prompt": f"a cute {job['animal']}",
    }
    assert job["animal"] in app.ANIMALS
    assert call.headers["Idempotency-Key"] == job_id
    assert call.headers["Content-Type"].startswith("application/json")
    assert call.headers.get("Authorization") == (f"Bearer {key}" if key else None)


async def test_http_mode_stores_data_uri_images_and_serves_them_until_the_job_is_deleted(
    settings: SettingsFactory, provider: Provider, db: asyncpg.Connection
) -> None:
    """Pictures that come as data:image/png;base64, URIs are stored: the job's imageUrls are
    /generations/<id>/images/1..n, each GET returns the exact bytes as image/png with a long
    Cache-Control; when retention deletes the job, its images go with it (404)."""
    uris = [f"data:image/png;base64,{base64.b64encode(png).decode()}" for png in (PNG_1, PNG_2)]
    provider.script(ok("http", uris))
    async with running(provider_settings(settings, provider, "http")) as client:
        job_id = await post_job(client, 2)
        job = await job_in(client, job_id)
        paths = [f"/generations/{job_id}/images/1", f"/generations/{job_id}/images/2"]
        assert (job["status"], job["imageUrls"]) == ("completed", paths)
        for path, png in zip(paths, (PNG_1, PNG_2), strict=True):
            response = await client.get(path)
            assert response.status_code == 200
            assert response.content == png
            assert response.headers["content-type"] == "image/png"
            max_age = re.search(r"max-age=(\d+)", response.headers["cache-control"])
            assert max_age and int(max_age[1]) >= 30 * 86400, response.headers["cache-control"]
        assert (await client.get(f"/generations/{job_id}/images/3")).status_code == 404

        await db.execute(
            "UPDATE jobs SET created_at = now() - interval '2 days', completed_at = now() - interval '1 day'"
        )
        assert await db.fetchval(app.DELETE_EXPIRED_JOBS, 3600.0, 1000) == 1  # retention's own statement
        assert await db.fetchval("SELECT count(*) FROM images") == 0
        for path in paths:
            assert (await client.get(path)).status_code == 404


async def test_an_image_number_no_job_has_is_404(settings: SettingsFactory, provider: Provider) -> None:
    """GET /generations/<id>/images/<n> for any n the job does not have, however large, is a 404,
    never a 500."""
    uri = f"data:image/png;base64,{base64.b64encode(PNG_1).decode()}"
    provider.script(ok("http", [uri]))
    async with running(provider_settings(settings, provider, "http")) as client:
        job_id = await post_job(client)
        await job_in(client, job_id, "completed")
        for n in (0, 2, 2**31 - 1, 2**31, 10**30):
            response = await client.get(f"/generations/{job_id}/images/{n}")
            assert response.status_code == 404, (n, response.text)


async def test_openai_mode_sends_the_openai_request_and_takes_urls_or_b64_json(
    settings: SettingsFactory, provider: Provider
) -> None:
    """IMAGE_PROVIDER=openai POSTs {"model", "prompt", "n", "size": "512x512"} to
    IMAGE_PROVIDER_URL/images/generations with the bearer key; an answer's data[i].url become the
    job's imageUrls, its data[i].b64_json become stored images served as image/png."""
    urls = urls_for("openai", 2)
    b64 = [base64.b64encode(png).decode() for png in (PNG_1, PNG_2)]
    provider.script(ok("openai", urls), Answer(json={"created": 0, "data": [{"b64_json": b} for b in b64]}))
    config = provider_settings(settings, provider, "openai", image_provider_model="test-model-9")
    async with running(config) as client:
        first = await post_job(client, 2)
        by_url = await job_in(client, first)
        second = await post_job(client, 2)
        by_bytes = await job_in(client, second)
        assert (by_url["status"], by_url["imageUrls"], by_url["attempts"]) == ("completed", urls, 1)
        paths = [f"/generations/{second}/images/{n}" for n in (1, 2)]
        assert (by_bytes["status"], by_bytes["imageUrls"], by_bytes["attempts"]) == ("completed", paths, 1)
        for path, png in zip(paths, (PNG_1, PNG_2), strict=True):
            response = await client.get(path)
            assert (response.status_code, response.content) == (200, png)
            assert response.headers["content-type"] == "image/png"
    for call, job in zip(provider.calls, (by_url, by_bytes), strict=True):
        assert (call.method, call.path) == ("POST", "/v1/images/generations")
        prompt = f"a cute {job['animal']}"
        assert call.json == {"model": "test-model-9", "prompt": prompt, "n": 2, "size": "512x512"}
        assert call.headers["Authorization"] == f"Bearer {KEY}"
        assert call.headers["Idempotency-Key"] == job["jobId"]


# --- Errors: retried or final ----------------------------------------------------------------


@pytest.mark.parametrize(("mode", "status"), [("http", 500), ("openai", 500), ("http", 408), ("openai", 502)])
async def test_a_5xx_or_408_is_retried_and_the_job_completes(
    settings: SettingsFactory, provider: Provider, mode: str, status: int
) -> None:
    """A 5xx or 408 answer is a provider error another try may fix: the job is retried and
    completes on the second attempt, with the second answer's URLs and no error."""
    urls = urls_for("retried", 1)
    provider.script(Answer(status, json={"error": "try again"}), ok(mode, urls))
    async with running(provider_settings(settings, provider, mode)) as client:
        job = await job_in(client, await post_job(client))
    assert (job["status"], job["attempts"], job["imageUrls"], job["error"]) == ("completed", 2, urls, None)
    first, second = provider.calls
    assert first.path == second.path == CALLED_PATH[mode]
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"] == job["jobId"]


@pytest.mark.parametrize(("mode", "status"), [("http", 503), ("openai", 429), ("http", 500)])
async def test_a_retried_answer_without_retry_after_is_recorded_with_its_status_and_message(
    settings: SettingsFactory, provider: Provider, mode: str, status: int
) -> None:
    """A 429 or 5xx without a Retry-After header is an ordinary provider error: with its attempts
    spent, the job fails with the provider's status and message in its error."""
    provider.script(Answer(status, json={"error": "busy"}))
    async with running(provider_settings(settings, provider, mode, max_attempts=1)) as client:
        job = await job_in(client, await post_job(client))
    assert (job["status"], job["attempts"]) == ("failed", 1)
    assert job["error"] == f'the provider answered {status}: {{"error": "busy"}}'


@pytest.mark.parametrize(("mode", "status"), [("http", 400), ("openai", 400), ("http", 422)])
async def test_a_4xx_fails_the_job_at_once_with_the_status_and_at_most_500_characters_of_the_message(
    settings: SettingsFactory, provider: Provider, mode: str, status: int
) -> None:
    """Any 4xx but 408 and 429 fails the job at once (one attempt, one call, whatever
    MAX_ATTEMPTS): its error carries the provider's status and message, cut to 500 characters."""
    message = " ".join(f"word{i}" for i in range(400))[:2000]  # no stretch of it repeats
    assert len(message) == 2000
    if mode == "http":
        answer = Answer(status, body=message.encode())
    else:
        answer = Answer(status, json={"error": {"message": message, "type": "invalid_request_error"}})
    provider.script(answer)
    async with running(provider_settings(settings, provider, mode, max_attempts=3)) as client:
        job = await job_in(client, await post_job(client))
    assert (job["status"], job["attempts"], job["imageUrls"]) == ("failed", 1, None)
    assert len(provider.calls) == 1
    error = job["error"]
    assert str(status) in error
    assert message[:300] in error  # the provider's message, as far as the cut allows
    assert message[:501] not in error  # but never more than 500 characters of it
    assert len(error) < 600


@pytest.mark.parametrize(("mode", "status", "wait"), [("http", 429, 2), ("openai", 503, 1)])
async def test_retry_after_is_waited_out_before_the_next_call(
    settings: SettingsFactory, provider: Provider, mode: str, status: int, wait: int
) -> None:
    """A 429 or 503 with Retry-After: N is retried no sooner than N seconds later (measured at the
    provider, far above the usual sub-second backoff), and the job completes."""
    urls = urls_for("later", 1)
    provider.script(Answer(status, json={"error": "slow down"}, headers={"Retry-After": str(wait)}), ok(mode, urls))
    async with running(provider_settings(settings, provider, mode)) as client:
        job = await job_in(client, await post_job(client), within=wait + 10)
    assert (job["status"], job["attempts"], job["imageUrls"]) == ("completed", 2, urls)
    first, second = provider.calls
    assert wait - 0.05 <= second.at - first.at < wait + 3


async def test_retry_after_is_honoured_up_to_a_minute(
    settings: SettingsFactory, provider: Provider, db: asyncpg.Connection
) -> None:
    """A Retry-After above 60 s is cut to 60 s: the job waits a minute, not an hour."""
    provider.script(Answer(429, json={"error": "come back in an hour"}, headers={"Retry-After": "3600"}))
    async with running(provider_settings(settings, provider, "http")) as client:
        job_id = await post_job(client)
        await provider.received(1)
        row = await row_in(db, job_id, "pending")
    assert row["attempts"] == 1 and "429" in row["error"]
    assert 55 <= (row["available_at"] - row["db_now"]).total_seconds() <= 60.5


async def test_a_retry_after_date_in_the_past_means_retry_now(settings: SettingsFactory, provider: Provider) -> None:
    """Retry-After as an HTTP date that has already passed (a provider clock a little behind)
    asks for no wait: the job is retried after the usual short backoff, not after a minute."""
    past = format_datetime(datetime.now(UTC) - timedelta(seconds=30), usegmt=True)
    urls = urls_for("now", 1)
    provider.script(Answer(503, json={"error": "busy"}, headers={"Retry-After": past}), ok("http", urls))
    async with running(provider_settings(settings, provider, "http")) as client:
        job = await job_in(client, await post_job(client), within=5)
    assert (job["status"], job["attempts"]) == ("completed", 2)
    first, second = provider.calls
    assert second.at - first.at < 3


async def test_an_unreachable_provider_is_a_retried_error(settings: SettingsFactory) -> None:
    """A provider that refuses connections is a provider error: retried up to MAX_ATTEMPTS, then
    the job fails saying the provider could not be reached."""
    url = f"http://127.0.0.1:{free_port()}/generate"
    config = settings(image_provider="http", image_provider_url=url, max_attempts=2)
    async with running(config) as client:
        job = await job_in(client, await post_job(client))
    assert (job["status"], job["attempts"]) == ("failed", 2)
    assert "could not be reached" in job["error"]


@pytest.mark.parametrize("mode", MODES)
async def test_a_hung_call_times_out_is_abandoned_and_retried(
    settings: SettingsFactory, provider: Provider, mode: str
) -> None:
    """A provider that never answers: after JOB_TIMEOUT_SECONDS the attempt ends as timed out
    (the job's error says so), the hung connection is closed (the provider sees its client leave),
    and the next attempt completes the job."""
    never, second_held = asyncio.Event(), asyncio.Event()
    urls = urls_for("after-hang", 1)
    provider.script(Answer(hold=never), dataclasses.replace(ok(mode, urls), hold=second_held))
    async with running(provider_settings(settings, provider, mode, job_timeout_seconds=1)) as client:
        job_id = await post_job(client)
        hung, retry = await provider.received(2, within=5)
        assert 0.9 <= (await provider.hung_up(hung, within=1.5)) - hung.at < 2
        during_retry = (await client.get(f"/generations/{job_id}")).json()
        assert (during_retry["status"], during_retry["attempts"]) == ("processing", 2)
        assert "timed out" in during_retry["error"]
        second_held.set()
        job = await job_in(client, job_id)
    assert (job["status"], job["attempts"], job["imageUrls"], job["error"]) == ("completed", 2, urls, None)
    assert retry.left is None


# --- Answers of the wrong shape --------------------------------------------------------------

WRONG_SHAPES = [
    ("http", {"imageUrls": "https://x.example/1.png"}, "'https://x.example/1.png'"),
    ("http", {"imageUrls": ["https://x.example/1.png"]}, "not 2 images"),
    ("http", {"imageUrls": ["https://x.example/1.png", "ftp://x.example/2.png"]}, "ftp://x.example/2.png"),
    ("http", {"imageUrls": ["https://x.example/1.png", "data:image/png;base64,@@not base64@@"]}, "@@not base64@@"),
    ("http", {"imageUrls": ["https://x.example/1.png", "data:image/png;base64,\u00e9t\u00e9"]}, "base64,\u00e9t\u00e9"),
    ("http", {"images": ["https://x.example/1.png", "https://x.example/2.png"]}, "None"),
    ("http", "<html>gateway says hi</html>", "not JSON"),
    ("http", "[" * 50_000, "not JSON"),  # too deep for the parser
    ("openai", {"data": "x"}, "{'data': 'x'}"),
    ("openai", {"data": [{"url": "https://x.example/1.png"}]}, "not 2 images"),
    ("openai", {"data": [{"b64_json": "@@not base64@@"}, {"b64_json": "AAAA"}]}, "@@not base64@@"),
    ("openai", {"data": [{}, {}]}, "[{}, {}]"),
    ("openai", {"data": [{"b64_json": None}, {"b64_json": True}]}, "'b64_json': None"),  # "None" is valid base64
]


@pytest.mark.parametrize(("mode", "answer", "says"), WRONG_SHAPES)
async def test_an_answer_of_the_wrong_shape_fails_the_job_saying_what_came(
    settings: SettingsFactory, provider: Provider, mode: str, answer: Any, says: str
) -> None:
    """A 200 whose body is not JSON, not the mode's shape, not numImages pictures, or has a
    picture that is neither an http(s) URL nor a valid base64 image is a provider error; with
    MAX_ATTEMPTS=1 the job fails and its error says what came."""
    raw = answer.encode() if isinstance(answer, str) else None
    provider.script(Answer(json=answer, body=raw))
    async with running(provider_settings(settings, provider, mode, max_attempts=1)) as client:
        job = await job_in(client, await post_job(client, 2))
    assert (job["status"], job["attempts"], job["imageUrls"]) == ("failed", 1, None)
    assert job["error"].startswith("the provider") and says in job["error"], job["error"]


@pytest.mark.parametrize("mode", MODES)
async def test_an_answer_of_the_wrong_shape_is_retried(
    settings: SettingsFactory, provider: Provider, mode: str
) -> None:
    """A wrong-shaped answer is not final: the next attempt that gets a good answer completes the job."""
    urls = urls_for("good", 2)
    provider.script(ok(mode, urls[:1]), ok(mode, urls))
    async with running(provider_settings(settings, provider, mode)) as client:
        job = await job_in(client, await post_job(client, 2))
    assert (job["status"], job["attempts"], job["imageUrls"]) == ("completed", 2, urls)


# --- A huge answer ---------------------------------------------------------------------------


async def test_a_50_mb_answer_is_refused_without_the_memory_to_hold_it(
    start_service: StartService, provider: Provider, db: asyncpg.Connection
) -> None:
    """A 50 MB answer (streamed, no Content-Length) is refused once it passes the size cap: the
    attempt fails saying so, is retried, and the job fails like any other; the service stops
    reading early, and its peak memory (VmHWM of the real process) does not grow by anything
    near the 50 MB that came."""
    size = 50 * 1000 * 1000
    provider.script(ok("http", urls_for("warm-up", 1)), Answer(size=size), Answer(size=size))
    service = await start_service(
        IMAGE_PROVIDER="http", IMAGE_PROVIDER_URL=provider.url + "/generate", MAX_ATTEMPTS=2, WORKER_POLL_INTERVAL=0.2
    )
    async with aiohttp.ClientSession() as session:
        warm_up = await post_to(session, service)  # the client, its connection pool and JSON all in use once
        await row_in(db, warm_up, "completed")
        before = peak_rss_mib(service.pid())
        job_id = await post_to(session, service)
        row = await row_in(db, job_id, "failed", "completed", within=30)
    after = peak_rss_mib(service.pid())
    print(f"\n[providers] 50 MB answer: peak RSS {before:.1f} -> {after:.1f} MiB")
    assert (row["status"], row["attempts"]) == ("failed", 2)
    assert f"larger than {app.MAX_PROVIDER_ANSWER_BYTES >> 20} MiB" in row["error"]
    assert all(call.sent < 0.9 * size for call in provider.calls[1:])
    assert after - before < 40, f"peak RSS grew by {after - before:.1f} MiB reading a refused 50 MB answer"


# --- Cancelled, killed -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_cancel_abandons_the_call_in_flight_and_frees_its_slot(
    settings: SettingsFactory, provider: Provider, mode: str
) -> None:
    """Cancelling a job whose provider call is in flight closes that call at once (the provider
    sees its client leave within a second, long before the lease's next heartbeat); the job stays
    cancelled, and its slot (WORKER_CONCURRENCY=1) runs the next job right away."""
    urls = urls_for("next", 1)
    provider.script(Answer(hold=asyncio.Event()), ok(mode, urls))
    config = provider_settings(settings, provider, mode, worker_concurrency=1, job_lease_seconds=30)
    async with running(config) as client:
        held = await post_job(client)
        [call] = await provider.received(1)
        response = await client.post(f"/generations/{held}/cancel")
        cancelled_at = time.monotonic()
        assert response.status_code == 200 and response.json()["status"] == "cancelled"
        assert await provider.hung_up(call, within=1) - cancelled_at < 1
        next_id = await post_job(client)
        next_job = await job_in(client, next_id, within=3)
        assert (next_job["status"], next_job["imageUrls"]) == ("completed", urls)
        job = (await client.get(f"/generations/{held}")).json()
    assert (job["status"], job["attempts"], job["imageUrls"]) == ("cancelled", 1, None)
    assert [call.headers["Idempotency-Key"] for call in provider.calls] == [held, next_id]  # never called again


@pytest.mark.chaos
async def test_a_job_whose_process_was_killed_mid_call_completes_once_with_the_same_idempotency_key(
    start_service: StartService, provider: Provider, db: asyncpg.Connection
) -> None:
    """kill -9 of the service while its provider call is in flight: once the lease runs out,
    another replica completes the job once, as attempt 2, and the provider saw the same
    Idempotency-Key (the job id) both times, so it could have deduplicated the work."""
    urls = urls_for("survivor", 1)
    provider.script(Answer(hold=asyncio.Event()), ok("http", urls))
    env = {
        "IMAGE_PROVIDER": "http",
        "IMAGE_PROVIDER_URL": provider.url + "/generate",
        "IMAGE_PROVIDER_API_KEY": KEY,
        "JOB_LEASE_SECONDS": 2,
        "WORKER_POLL_INTERVAL": 0.2,
    }
    first = await start_service(**env)
    async with aiohttp.ClientSession() as session:
        job_id = await post_to(session, first)
    [call] = await provider.received(1)
    await asyncio.to_thread(first.kill)
    await provider.hung_up(call, within=2)  # the kernel closed the dead process's connection
    assert (await job_row(db, job_id))["status"] == "processing"

    await start_service(**env)
    row = await row_in(db, job_id, "completed", "failed", within=15)
    assert (row["status"], row["attempts"], row["image_urls"]) == ("completed", 2, urls)
    assert row["updated_at"] == row["completed_at"]  # nothing wrote to it after it completed
    first_call, second_call = provider.calls
    assert first_call.headers["Idempotency-Key"] == second_call.headers["Idempotency-Key"] == job_id
    assert (first_call.json["jobId"], first_call.json["attempt"]) == (job_id, 1)
    assert (second_call.json["jobId"], second_call.json["attempt"]) == (job_id, 2)


# --- The API key -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_the_api_key_is_never_logged_nor_in_a_job_even_when_the_provider_echoes_it(
    settings: SettingsFactory, provider: Provider, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """IMAGE_PROVIDER_API_KEY goes to the provider and nowhere else: not in any log line (DEBUG
    included) nor in any job's JSON, even when the provider echoes the Authorization header back
    in a 500 (retried) and then a 400 (final) error body."""
    caplog.set_level(logging.DEBUG)
    provider.script(Answer(500, echo_headers=True), Answer(400, echo_headers=True))
    async with running(provider_settings(settings, provider, mode)) as client:
        job = await job_in(client, await post_job(client))
        listed = (await client.get("/generations")).text
        single = (await client.get(f"/generations/{job['jobId']}")).text
    assert all(call.headers["Authorization"] == f"Bearer {KEY}" for call in provider.calls)  # it was sent
    assert (job["status"], job["attempts"]) == ("failed", 2)
    assert "Authorization" in job["error"]  # the echo made it into the error, minus the key
    logged = caplog.text + "".join(record.getMessage() for record in caplog.records)
    assert "failed" in logged  # the failures were logged
    for text in (logged, listed, single, job["error"]):
        assert "SECRET" not in text


async def test_an_api_key_cut_by_the_500_character_limit_does_not_leak_in_part(
    settings: SettingsFactory, provider: Provider, caplog: pytest.LogCaptureFixture
) -> None:
    """When the provider echoes the key right where its message is cut to 500 characters, what
    is left of the key is not in the job's error nor in the log either."""
    caplog.set_level(logging.DEBUG)
    echo = "Authorization: Bearer "
    filler = "x" * (500 - len(echo) - (len(KEY) - 1))  # the cut falls on the key's last character
    provider.script(Answer(400, body=f"{filler}{echo}{KEY} was refused".encode()))
    async with running(provider_settings(settings, provider, "http")) as client:
        job = await job_in(client, await post_job(client))
    assert (job["status"], job["attempts"]) == ("failed", 1)
    assert echo in job["error"]
    assert "SECRET" not in job["error"], job["error"]
    assert "SECRET" not in caplog.text
