#!/usr/bin/env python3
"""The benchmark: the service as users run it (a real uvicorn process), driven over HTTP.

    .venv/bin/python bench/run.py              every scenario once (about four minutes)
    .venv/bin/python bench/run.py --repeat 3   three rounds; the table shows the medians
    .venv/bin/python bench/run.py --quick      short windows and few jobs: a sanity run
    .venv/bin/python bench/run.py --only enqueue,pickup --env DB_POOL_MAX_SIZE=20
    .venv/bin/python bench/run.py --scale      how costs grow with history and backlog: 0, 1M, 10M
                                               finished jobs x 0, 1M pending (about 11 minutes, 15 GB free)
    .venv/bin/python bench/run.py --scale --quick                     0 and 100k of each: about 2.5 minutes
    .venv/bin/python bench/run.py --scale --scale-sizes 0,1M --scale-backlogs 0,1M     about 5 minutes

It starts its own PostgreSQL (the embedded one, or the server DATABASE_URL names, whose role
must be allowed to create databases) and gives each scenario a fresh database. This process
is the load generator (aiohttp); every service is a process of its own. Each scenario prints
one JSON line with its settings and results; a markdown table of the targets follows.

    ceiling        32 asyncpg connections run the service's own INSERT_JOB, no HTTP: the most single-row
                   jobs per second this machine accepts with the service's schema
    raw insert     the same load with INSERT INTO jobs (num_images) VALUES (1): PostgreSQL's own CPU
                   per inserted row, the baseline of the enqueue's PostgreSQL CPU
    health         GET /health: how fast this generator can go, so that it is known not to be
                   what limits the numbers below
    enqueue        32 clients POST {"numImages": 1}          >= 0.7 x ceiling, <= 1 ms service CPU each
    raw insert at the enqueue's rate
                   the raw insert over as many connections as the service's pool, paced to the
                   enqueue's rate: PostgreSQL's CPU per row when commits come as often as the
                   enqueue's (a commit's WAL flush is shared by fewer of them than at full speed)
                                                             enqueue's PostgreSQL CPU <= 1.3 x this
    batch          8 clients POST /generations/batch, 1,000 jobs each (WORKER_CONCURRENCY=0)
                                                             >= 3 x ceiling in jobs/s
    read           32 clients GET /generations/<id>
    pickup         idle service: POST's response -> completed     p50 <= 5 ms, p99 <= 20 ms
                   also with the API and the worker in two processes (the NOTIFY goes through
                   PostgreSQL), and so through PgBouncer in transaction mode: LISTEN straight to
                   PostgreSQL (as fast as plain pickup), or through PgBouncer too, where no
                   notification arrives and the worker polls (p99 <= WORKER_POLL_INTERVAL + 50 ms)
    drain          queued jobs completed per second              >= 1.0 x ceiling
    slow provider  WORKER_CONCURRENCY=100, a provider that takes 2 s: the mock (IMAGE_PROVIDER_DELAY=2),
                   and IMAGE_PROVIDER=http against a local provider process     >= 0.9 x 50 jobs/s, 0 failed
    two replicas   enqueue and drain with two service processes: the ratio to one
    memory         the services' peak RSS (VmHWM)               <= 80 MB

    scale          (--scale, a run of its own) tables of H finished and B pending jobs, built in
                   the database with generate_series; for each H and B: enqueue (no worker, so the
                   backlog stays), GET by id, the first page of three listings, GET /metrics,
                   pickup (at B=0 only), the service's own statements under EXPLAIN ANALYZE (custom
                   and generic plans, buffers), the claim as the service runs it (asyncpg's named
                   prepared statement: the plan PostgreSQL settles on), table and index sizes, HOT
                   updates, retention (JOB_RETENTION_SECONDS), and for each backlog a burst: the
                   claim's plan and time before it, just after it, and once autovacuum analyzed
                   every latency <= 1.5 x its value on empty tables (but /metrics, which counts
                   pending jobs up to a bound), claim <= 5 ms at 1M pending, /metrics p50 <= 50 ms
                   with a backlog, retention >= 50,000 rows/s with claims' p99 <= 20 ms

The targets compare numbers of the same round, because the machine is shared: PostgreSQL,
the services and this generator run on the same cores, and so may other programs. Each load
window reports the cores every party kept busy ("other" is everything else on the machine)
and the CPU milliseconds each spent per request or job: the services, PostgreSQL, this
generator, and where there is one, the stand-in provider.
"""

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from functools import partial
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import app  # noqa: E402  the scale run times the service's own statements, by name
from app import CLAIM_JOBS, INSERT_JOB, setup_connection  # noqa: E402  the very statements the service runs
from scripts.pg import EmbeddedPostgres  # noqa: E402
from scripts.pgbouncer import PgBouncer  # noqa: E402
from scripts.service import Service, free_port  # noqa: E402

SCHEMA = (ROOT / "schema.sql").read_text()
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
JSON_HEADERS = {"Content-Type": "application/json"}
ONE_IMAGE = b'{"numImages": 1}'
NAN = float("nan")  # a rate or percentile of nothing

# The least a job costs PostgreSQL: one row with the service's schema, nothing returned.
RAW_INSERT = "INSERT INTO jobs (num_images) VALUES (1)"
# Queue jobs the way a burst of POSTs would, in one statement.
QUEUE_JOBS = "INSERT INTO jobs (num_images) SELECT 1 FROM generate_series(1, $1)"
# Wake the workers as the service does once new jobs are committed (they would poll otherwise).
ANNOUNCE_NEW_JOBS = "SELECT pg_notify('generations_new', '')"
WATCH_INTERVAL = 0.05  # seconds between two counts of the ended jobs
ENDED_JOBS = "SELECT count(*) FROM jobs WHERE status IN ('completed', 'failed', 'cancelled')"
LAST_ENDED = "SELECT max(completed_at) FROM jobs"
COUNT_BY_STATUS = "SELECT status, count(*) FROM jobs GROUP BY status"
# Completed jobs for the read scenario, so that no worker touches them while they are read.
SEED_COMPLETED_JOBS = """
INSERT INTO jobs (num_images, status, animal, image_urls, attempts, completed_at)
SELECT 1, 'completed', 'cat', '["https://placehold.co/512x512/png?text=a+cute+cat+1"]', 1, now()
FROM generate_series(1, $1)
RETURNING id
"""

# The targets, from the issues.
ENQUEUE_TO_CEILING, ENQUEUE_CPU_MS = 0.7, 1.0
ENQUEUE_POSTGRES_CPU_TO_RAW = 1.3  # PostgreSQL's CPU per POST over a raw insert's at the same rate
BATCH_TO_CEILING = 3.0  # jobs/s through POST /generations/batch over the single-row INSERT_JOB ceiling
DRAIN_TO_CEILING = 1.0
PICKUP_P50_MS, PICKUP_P99_MS = 5.0, 20.0
# "As fast" through PgBouncer (LISTEN straight to PostgreSQL): p50 within this much of the plain pickup's.
BOUNCED_PICKUP_RATIO = 1.25
POLLED_PICKUP_MARGIN_MS = 50.0  # polling alone: p99 <= WORKER_POLL_INTERVAL + this
SLOW_TO_IDEAL = 0.9
PEAK_RSS_MB = 80.0
# The generator is shown not to be the limit when it drives a trivial endpoint this much faster.
HEALTH_HEADROOM = 1.5


@dataclasses.dataclass(frozen=True)
class Plan:
    """How long each scenario runs and how many jobs it uses."""

    clients: int = 32
    warmup: float = 1.0
    seconds: float = 10.0
    health_seconds: float = 5.0
    batch_clients: int = 8
    batch_size: int = 1_000  # jobs per POST /generations/batch: the most the service takes
    read_jobs: int = 10_000
    pickup_jobs: int = 200
    pickup_gap: float = 0.02  # between two pickup jobs, so that each finds the service idle
    bouncer_pool_size: int = 10  # PgBouncer's server connections per database
    polled_interval: float = 0.2  # WORKER_POLL_INTERVAL where notifications cannot arrive
    drain_jobs: int = 10_000
    drain_concurrency: tuple[int, ...] = (20, 100)  # 20 is the default; two replicas use the last
    slow_jobs: int = 2_000
    slow_delay: float = 2.0
    slow_concurrency: int = 100


QUICK = Plan(
    warmup=0.3, seconds=2.0, health_seconds=1.0, read_jobs=1_000, pickup_jobs=50, drain_jobs=2_000, slow_jobs=300
)


# --- Measuring processes -------------------------------------------------------------------


def proc_stat(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name: state, ppid, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far, all its threads included."""
    fields = proc_stat(pid)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def postgres_cpu_seconds(postmaster: int) -> float:
    """CPU time of a PostgreSQL server so far: the postmaster, every process it runs, and those that
    have exited (a reaped child's time is added to its parent's cutime and cstime)."""
    fields = proc_stat(postmaster)
    total = sum(int(field) for field in fields[11:15]) / CLOCK_TICKS
    for pid in (int(entry) for entry in os.listdir("/proc") if entry.isdigit()):
        with contextlib.suppress(OSError):  # a backend may exit while we look
            if int(proc_stat(pid)[1]) == postmaster:
                total += cpu_seconds(pid)
    return total


def machine_busy_seconds() -> float:
    """CPU time all cores of this machine have spent busy so far, whoever used it."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


@dataclasses.dataclass
class CpuMeter:
    """Reads the CPU seconds used so far by the services, PostgreSQL, this generator, and other
    processes of the bench's own (the stand-in provider, PgBouncer), each a party of its own."""

    services: list[Service]
    postmaster: int | None  # None: PostgreSQL is not ours to measure (DATABASE_URL)
    others: dict[str, int] = dataclasses.field(default_factory=dict)  # party -> process id

    def read(self) -> dict[str, float]:
        """CPU seconds per party, now; "other" is the rest of the machine (other programs, the kernel)."""
        times = os.times()
        seconds = {
            "service": sum(cpu_seconds(service.pid()) for service in self.services),
            "generator": times.user + times.system,
        }
        if self.postmaster is not None:
            seconds["postgres"] = postgres_cpu_seconds(self.postmaster)
        seconds |= {party: cpu_seconds(pid) for party, pid in self.others.items()}
        seconds["other"] = machine_busy_seconds() - sum(seconds.values())
        return seconds


def cpu_shares(
    before: dict[str, float], after: dict[str, float], seconds: float, done: int, unit: str
) -> dict[str, dict[str, float]]:
    """The cores each party kept busy over `seconds`, the CPU seconds it used, and the CPU
    milliseconds it spent per `unit`."""
    used = {party: after[party] - before[party] for party in before}
    if not seconds or not done:
        return {}
    return {
        "cores": {party: round(cpu / seconds, 2) for party, cpu in used.items()},
        "cpu_s": {party: round(cpu, 3) for party, cpu in used.items()},
        f"cpu_ms_per_{unit}": {party: round(cpu * 1000 / done, 3) for party, cpu in used.items() if party != "other"},
    }


# What PostgreSQL has written so far, server-wide and exact (no statistics lag): the next
# transaction id (only a transaction that writes takes one, a NOTIFY included) and the WAL position.
WRITE_COUNTERS = """
SELECT pg_snapshot_xmax(pg_current_snapshot())::text::float8, (pg_current_wal_insert_lsn() - '0/0')::float8
"""
# Reads PostgreSQL's write counters: write_xacts, wal_bytes.
Counters = Callable[[], Awaitable[dict[str, float]]]


async def fetch_one(url: str, query: str) -> asyncpg.Record:
    """One row, from a connection of its own."""
    connection = await asyncpg.connect(url)
    try:
        return await connection.fetchrow(query)
    finally:
        await connection.close()


async def write_counters(server_url: str) -> dict[str, float]:
    """The write transactions and WAL bytes the server has produced so far (other databases' too)."""
    xids, wal = await fetch_one(server_url, WRITE_COUNTERS)
    return {"write_xacts": xids, "wal_bytes": wal}


def per_unit(before: dict[str, float], after: dict[str, float], done: int, unit: str) -> dict[str, float]:
    """Each counter's growth per `unit`, e.g. write_xacts_per_request (none if not read)."""
    if not before or not after or not done:
        return {}
    return {f"{name}_per_{unit}": round((after[name] - before[name]) / done, 2) for name in before}


def percentiles_ms(durations: list[float], *wanted: int) -> dict[str, float]:
    """The wanted percentiles of a list of durations in seconds, in milliseconds."""
    if len(durations) < 2:
        return {f"p{p}_ms": NAN for p in wanted}
    cuts = statistics.quantiles(durations, n=100, method="inclusive")
    return {f"p{p}_ms": round(cuts[p - 1] * 1000, 2) for p in wanted}


# --- Load ----------------------------------------------------------------------------------

# One request or statement; True if it succeeded.
Operation = Callable[[], Awaitable[bool]]
# One HTTP request to the service at the given base URL.
HttpRequest = Callable[[aiohttp.ClientSession, str], Awaitable[bool]]
FAILURES = (aiohttp.ClientError, asyncpg.PostgresError, OSError)


@dataclasses.dataclass
class Window:
    """One load run: clients busy through a warm-up, then a measured window."""

    meter: CpuMeter
    counters: Counters | None = None  # PostgreSQL's write counters, read with the CPU
    latencies: list[float] = dataclasses.field(default_factory=list)
    errors: int = 0
    measuring: bool = False
    over: bool = False
    seconds: float = 0.0
    cpu_before: dict[str, float] = dataclasses.field(default_factory=dict)
    cpu_after: dict[str, float] = dataclasses.field(default_factory=dict)
    counts_before: dict[str, float] = dataclasses.field(default_factory=dict)
    counts_after: dict[str, float] = dataclasses.field(default_factory=dict)

    async def run(self, operations: list[Operation], warmup: float, seconds: float) -> None:
        """Run every operation back to back in its own task; keep what ends inside the window."""
        tasks = [asyncio.create_task(self._loop(operation)) for operation in operations]
        try:
            await asyncio.sleep(warmup)  # connections opened, statements prepared, caches warm
            if self.counters:
                self.counts_before = await self.counters()
            self.cpu_before, start = self.meter.read(), time.perf_counter()
            self.measuring = True
            await asyncio.sleep(seconds)
            self.measuring = False
            self.seconds = time.perf_counter() - start
            self.cpu_after = self.meter.read()
            if self.counters:
                self.counts_after = await self.counters()
        finally:
            self.over = True
            await asyncio.gather(*tasks)

    async def _loop(self, operation: Operation) -> None:
        """One client: the operation again and again until the run is over."""
        while not self.over:
            start = time.perf_counter()
            try:
                ok = await operation()
            except FAILURES:
                ok = False
            if self.measuring:
                if ok:
                    self.latencies.append(time.perf_counter() - start)
                else:
                    self.errors += 1

    def summary(self, unit: str = "request") -> dict[str, Any]:
        """Rate, latency percentiles, errors, the CPU each party used meanwhile, and PostgreSQL's writes."""
        done = len(self.latencies)
        return {
            f"{unit}s": done,
            "per_second": round(done / self.seconds, 1),
            **percentiles_ms(self.latencies, 50, 99),
            "errors": self.errors,
            **cpu_shares(self.cpu_before, self.cpu_after, self.seconds, done, unit),
            **per_unit(self.counts_before, self.counts_after, done, unit),
        }


async def http_status(request: Awaitable[aiohttp.ClientResponse]) -> int:
    """Send the request, read the whole answer, and return its status."""
    async with await request as response:
        await response.read()
        return response.status


def http_session() -> aiohttp.ClientSession:
    """A client session without the work a benchmark does not need (cookies)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),  # each client keeps its own keep-alive connection
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=30),
    )


async def get_health(session: aiohttp.ClientSession, url: str) -> bool:
    """GET /health."""
    return await http_status(session.get(url + "/health")) == 200


async def post_job(session: aiohttp.ClientSession, url: str) -> bool:
    """POST one new job."""
    return await http_status(session.post(url + "/generations", data=ONE_IMAGE, headers=JSON_HEADERS)) == 202


class Completions:
    """When each job ended, as heard on `generations_done` (its payload: the ids of jobs that ended,
    separated by spaces, as the service announces them after they commit)."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}
        self.waiting: dict[str, asyncio.Future[float]] = {}

    def arrived(self, connection: object, pid: int, channel: str, payload: str) -> None:
        """asyncpg's listener callback: note the moment, wake whoever waits for these jobs."""
        now = time.perf_counter()
        for job_id in payload.split():
            self.at[job_id] = now
            if (waiter := self.waiting.pop(job_id, None)) and not waiter.done():
                waiter.set_result(now)

    async def of(self, job_id: str) -> float:
        """When the job ended (a perf_counter time), waiting for it if it has not yet."""
        if job_id not in self.at:
            self.waiting[job_id] = asyncio.get_running_loop().create_future()
            await self.waiting[job_id]
        return self.at[job_id]


@contextlib.asynccontextmanager
async def listening(url: str) -> AsyncIterator[Completions]:
    """Completions of jobs in this database, heard on a connection of our own."""
    completions = Completions()
    connection = await asyncpg.connect(url)
    try:
        await connection.add_listener("generations_done", completions.arrived)
        yield completions
    finally:
        await connection.close()


# --- A stand-in image provider -----------------------------------------------------------


def serve_provider(port: int, delay: float) -> None:
    """Run the stand-in provider until SIGTERM (in a process of its own: `--serve-provider PORT:DELAY`).

    POST /generate answers IMAGE_PROVIDER=http's request after `delay` seconds with numImages
    URLs; GET /calls says how many calls it has answered so far.
    """
    calls = 0

    async def generate(request: web.Request) -> web.Response:
        """One provider call: wait, then as many pictures as asked for."""
        nonlocal calls
        body = await request.json()
        await asyncio.sleep(delay)
        calls += 1
        animal, count = body["animal"], body["numImages"]
        urls = [f"https://placehold.co/512x512/png?text=a+cute+{animal}+{i}" for i in range(1, count + 1)]
        return web.json_response({"imageUrls": urls})

    async def count_calls(request: web.Request) -> web.Response:
        """How many calls were answered."""
        return web.json_response({"calls": calls})

    provider = web.Application()
    provider.add_routes([web.post("/generate", generate), web.get("/calls", count_calls)])
    web.run_app(provider, host="127.0.0.1", port=port, print=None, access_log=None, shutdown_timeout=1)


class Provider:
    """The stand-in provider's process (see serve_provider), started and stopped by its PID."""

    def __init__(self, delay: float, log_path: Path) -> None:
        self.delay, self.log_path = delay, log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, ready_within: float = 30.0) -> "Provider":
        """Start the process and wait until it answers."""
        with self.log_path.open("ab") as log:
            command = [sys.executable, __file__, "--serve-provider", f"{self.port}:{self.delay}"]
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + ready_within
        while True:
            with contextlib.suppress(OSError):
                self.calls()
                return self
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the stand-in provider did not start; its log:\n{self.log_path.read_text()}")
            time.sleep(0.05)

    def calls(self) -> int:
        """How many calls it has answered so far."""
        with urllib.request.urlopen(self.url + "/calls", timeout=2) as response:
            return json.load(response)["calls"]

    def pid(self) -> int:
        """The process id."""
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        """SIGTERM by its PID; SIGKILL if it lingers."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# --- The bench -----------------------------------------------------------------------------


def database_url(server_url: str, database: str) -> str:
    """The same server's URL, for another database."""
    base, _, query = server_url.partition("?")
    return f"{base.rsplit('/', 1)[0]}/{database}" + (f"?{query}" if query else "")


def stop_service(service: Service) -> None:
    """SIGTERM, as an orchestrator would; SIGKILL if it does not exit in time."""
    try:
        service.stop(signal.SIGTERM, within=30)
    except subprocess.TimeoutExpired:
        service.kill()


def listen_connected(service: Service) -> float:
    """The service's generations_listen_connected gauge: 1 while its notifications arrive, else 0."""
    with urllib.request.urlopen(service.url + "/metrics", timeout=5) as response:
        found = re.search(r"^generations_listen_connected (\S+)$", response.read().decode(), re.MULTILINE)
    return float(found.group(1)) if found else NAN


# The pickup scenarios' labels, which others use as baselines.
RAW_PACED = "raw insert at the enqueue's rate"
PICKUP_APART = "pickup, API and worker apart"
PICKUP_BOUNCED = "pickup via PgBouncer, LISTEN direct"
PICKUP_POLLED = "pickup via PgBouncer, LISTEN via PgBouncer (polling)"


@dataclasses.dataclass
class Bench:
    """One round of scenarios on one PostgreSQL server; each scenario gets a fresh database."""

    server_url: str
    postmaster: int | None
    plan: Plan
    logs: Path
    env: dict[str, str]  # given to every service, under each scenario's own settings
    results: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    peak_rss: dict[str, float] = dataclasses.field(default_factory=dict)

    @contextlib.asynccontextmanager
    async def database(self, name: str) -> AsyncIterator[str]:
        """A new database with the schema applied; dropped afterwards."""
        admin = await asyncpg.connect(self.server_url)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS bench_{name} WITH (FORCE)")
            await admin.execute(f"CREATE DATABASE bench_{name}")
            url = database_url(self.server_url, f"bench_{name}")
            connection = await asyncpg.connect(url)
            await connection.execute(SCHEMA)
            await connection.close()
            yield url
        finally:
            try:
                await admin.execute(f"DROP DATABASE IF EXISTS bench_{name} WITH (FORCE)")
            finally:
                await admin.close()

    @contextlib.asynccontextmanager
    async def services(self, name: str, url: str, count: int = 1, **env: str | float) -> AsyncIterator[list[Service]]:
        """`count` service processes on `url`; stopped afterwards, their peak RSS noted."""
        started: list[Service] = []
        try:
            for index in range(count):
                started.append(Service(url, self.logs / f"{name}-{index}.log", **self.service_env(**env)))
                started[-1].start()  # blocking, so that no process can start after the cleanup below
            yield started
        finally:
            for service in started:
                if service.process is not None and service.process.poll() is None:
                    with contextlib.suppress(OSError):  # it may die just now; it is stopped all the same
                        rss = round(peak_rss_mb(service.pid()), 1)
                        self.peak_rss[name] = max(self.peak_rss.get(name, 0.0), rss)
                    stop_service(service)

    def service_env(self, **env: str | float) -> dict[str, Any]:
        """What a service is given beyond its defaults: --env, then the scenario's own settings."""
        return {**self.env, **env}

    def meter(self, services: list[Service], others: Mapping[str, int] | None = None) -> CpuMeter:
        """A CPU meter for these services, PostgreSQL (when it is ours), this process, and `others`."""
        return CpuMeter(services, self.postmaster, dict(others or {}))

    def window(self, services: list[Service]) -> Window:
        """A load window that meters these services' CPU and the others', and PostgreSQL's writes."""
        return Window(self.meter(services), partial(write_counters, self.server_url))

    async def load(
        self, services: list[Service], request: HttpRequest, seconds: float, clients: int | None = None
    ) -> Window:
        """`clients` (default plan.clients) HTTP clients, spread evenly over the services, each sending `request`."""
        window = self.window(services)
        async with http_session() as session:
            count = clients or self.plan.clients
            loops = [partial(request, session, services[i % len(services)].url) for i in range(count)]
            await window.run(loops, self.plan.warmup, seconds)
        return window

    def http_settings(self, seconds: float, **more: Any) -> dict[str, Any]:
        """An HTTP load's settings, and whatever else the scenario sets."""
        return {"clients": self.plan.clients, "warmup_s": self.plan.warmup, "seconds": seconds, **more}

    def ratio(self, result: dict[str, Any], baseline: str) -> float:
        """This result's rate over the baseline scenario's in this round (NaN if it did not run)."""
        if baseline not in self.results:
            return NAN
        return round(result["per_second"] / self.results[baseline]["per_second"], 3)

    def baseline_cpu(self, label: str, unit: str, party: str) -> float:
        """A party's CPU ms per `unit` in an earlier scenario of this round (NaN if it did not run)."""
        return self.results.get(label, {}).get(f"cpu_ms_per_{unit}", {}).get(party, NAN)

    # Scenarios: each returns its settings and results.

    async def inserts(
        self, name: str, label: str, statement: str, *parameters: Any, clients: int = 0, rate: float = 0.0
    ) -> dict[str, Any]:
        """`clients` (default plan.clients) asyncpg connections run one INSERT back to back, or if a
        `rate` is given, at that many per second in all: no HTTP, no service."""
        clients = clients or self.plan.clients
        async with self.database(name) as url:
            connections = [await asyncpg.connect(url) for _ in range(clients)]
            due = dict.fromkeys(connections, time.perf_counter())
            try:

                async def insert(connection: asyncpg.Connection) -> bool:
                    """One insert, a prepared statement as asyncpg's statement cache makes it."""
                    if rate:  # each connection's share of the rate, on a fixed schedule
                        due[connection] += clients / rate
                        await asyncio.sleep(due[connection] - time.perf_counter())
                    await connection.fetch(statement, *parameters)
                    return True

                window = self.window([])
                await window.run([partial(insert, c) for c in connections], self.plan.warmup, self.plan.seconds)
            finally:
                await asyncio.gather(*(connection.close() for connection in connections))
        settings = {
            "connections": clients,
            **({"rate": rate} if rate else {}),
            "warmup_s": self.plan.warmup,
            "seconds": self.plan.seconds,
            "statement": label,
        }
        return {"settings": settings, **window.summary("insert")}

    async def ceiling(self) -> dict[str, Any]:
        """The service's own single-row INSERT_JOB ... RETURNING: the most jobs per second this machine
        accepts one row at a time with the service's schema, the baseline of enqueue, batch and drain."""
        return await self.inserts("ceiling", "app.INSERT_JOB", INSERT_JOB, 1, None)

    async def raw_insert(self) -> dict[str, Any]:
        """INSERT INTO jobs (num_images) VALUES (1), nothing returned: the least a job costs PostgreSQL
        with this schema (its indexes included), the baseline of the enqueue's PostgreSQL CPU."""
        result = await self.inserts("raw_insert", RAW_INSERT, RAW_INSERT)
        return {**result, "ratio_to_ceiling": self.ratio(result, "ceiling")}

    async def paced_raw_insert(self) -> dict[str, Any]:
        """RAW_INSERT at the enqueue's rate over as many connections as the service's pool: the same
        commit rate, so that each commit shares a WAL flush with as many others as a POST's does."""
        rate = self.results.get("enqueue", {}).get("per_second", 0)
        if not rate:
            return {"skipped": "enqueue did not run"}
        pool = int(self.service_env().get("DB_POOL_MAX_SIZE", app.Settings.db_pool_max_size))
        result = await self.inserts("raw_insert_paced", RAW_INSERT, RAW_INSERT, clients=pool, rate=rate)
        enqueue = self.baseline_cpu("enqueue", "request", "postgres")
        return {**result, "enqueue_postgres_cpu_to_this": ratio_to(enqueue, cpu_ms(result, "insert", "postgres"))}

    async def http(self, name: str, request: HttpRequest, seconds: float, replicas: int = 1) -> dict[str, Any]:
        """A closed-loop HTTP load on `replicas` services with default settings in a fresh database."""
        async with self.database(name) as url, self.services(name, url, replicas) as services:
            window = await self.load(services, request, seconds)
        settings = self.http_settings(seconds, replicas=replicas, service=self.service_env())
        return {"settings": settings, **window.summary()}

    async def health(self) -> dict[str, Any]:
        """GET /health: the generator's rate against a trivial endpoint."""
        return await self.http("health", get_health, self.plan.health_seconds)

    async def enqueue(self) -> dict[str, Any]:
        """POST {"numImages": 1} from every client: the rate against the ceiling, the CPU each POST
        costs the service and PostgreSQL, and PostgreSQL's over its CPU per raw insert."""
        result = await self.http("enqueue", post_job, self.plan.seconds)
        postgres = result.get("cpu_ms_per_request", {}).get("postgres", NAN)
        return {
            **result,
            "ratio_to_ceiling": self.ratio(result, "ceiling"),
            "postgres_cpu_to_raw_insert": ratio_to(postgres, self.baseline_cpu("raw insert", "insert", "postgres")),
        }

    async def enqueue_two_replicas(self) -> dict[str, Any]:
        """Enqueue, the clients split over two service processes."""
        result = await self.http("enqueue_replicas", post_job, self.plan.seconds, replicas=2)
        return {**result, "ratio_to_one": self.ratio(result, "enqueue")}

    async def batch(self) -> dict[str, Any]:
        """POST /generations/batch with plan.batch_size jobs each from plan.batch_clients clients, to a
        service with WORKER_CONCURRENCY=0 so that no worker competes for the cores: jobs accepted per
        second (per_second counts jobs) against the single-row ceiling, and each party's CPU per job."""
        body = json.dumps({"jobs": [{"numImages": 1}] * self.plan.batch_size}).encode()

        async def post_batch(session: aiohttp.ClientSession, url: str) -> bool:
            """POST one batch."""
            return await http_status(session.post(url + "/generations/batch", data=body, headers=JSON_HEADERS)) == 202

        env = {"WORKER_CONCURRENCY": 0}
        async with self.database("batch") as url, self.services("batch", url, **env) as services:
            window = await self.load(services, post_batch, self.plan.seconds, self.plan.batch_clients)
        requests = window.summary()
        jobs = requests["requests"] * self.plan.batch_size
        settings = self.http_settings(
            self.plan.seconds,
            clients=self.plan.batch_clients,
            jobs_per_request=self.plan.batch_size,
            service=self.service_env(**env),
        )
        result = {
            "settings": settings,
            **requests,
            "requests_per_second": requests["per_second"],
            "jobs": jobs,
            "per_second": round(jobs / window.seconds, 1),
            **cpu_shares(window.cpu_before, window.cpu_after, window.seconds, jobs, "job"),
            **per_unit(window.counts_before, window.counts_after, jobs, "job"),
        }
        return {**result, "ratio_to_ceiling": self.ratio(result, "ceiling")}

    async def read(self) -> dict[str, Any]:
        """GET /generations/<id> of completed jobs, picked at random."""
        async with self.database("read") as url, self.services("read", url) as services:
            connection = await asyncpg.connect(url)
            paths = [
                f"/generations/{row['id']}" for row in await connection.fetch(SEED_COMPLETED_JOBS, self.plan.read_jobs)
            ]
            await connection.close()

            async def get_job(session: aiohttp.ClientSession, url: str) -> bool:
                """GET one of the jobs."""
                return await http_status(session.get(url + random.choice(paths))) == 200

            window = await self.load(services, get_job, self.plan.seconds)
        settings = self.http_settings(self.plan.seconds, jobs=self.plan.read_jobs, service=self.service_env())
        return {"settings": settings, **window.summary()}

    async def pickup(self) -> dict[str, Any]:
        """Jobs posted one at a time to an idle service: from the POST's response to completed. The
        POST wakes the worker of its own process directly."""
        env = {"IMAGE_PROVIDER_DELAY": 0}
        async with self.database("pickup") as url, self.services("pickup", url, **env) as [service]:
            result = await self.pickup_on(service, url)
        settings = {"jobs": self.plan.pickup_jobs, "gap_s": self.plan.pickup_gap, "service": self.service_env(**env)}
        return {"settings": settings, **result}

    async def pickup_apart(
        self, name: str, bouncer: PgBouncer | None = None, listen_through_bouncer: bool = False, **env: str | float
    ) -> dict[str, Any]:
        """Pickup with the API and the worker in two processes (the one taking the POSTs runs with
        WORKER_CONCURRENCY=0), so that the new job's NOTIFY must go through PostgreSQL to wake the
        worker, as with replicas. With `bouncer`, both services' DATABASE_URL goes through it, with
        DB_STATEMENT_CACHE_SIZE=0, and their LISTEN_DATABASE_URL straight to PostgreSQL or through it too."""
        async with self.database(name) as url:
            services_url, routing = url, {"IMAGE_PROVIDER_DELAY": 0, **env}
            if bouncer is not None:
                services_url = bouncer.url(url.partition("?")[0].rsplit("/", 1)[1])
                listen_url = services_url if listen_through_bouncer else url
                routing |= {"DB_STATEMENT_CACHE_SIZE": 0, "LISTEN_DATABASE_URL": listen_url}
            async with (
                self.services(f"{name}-api", services_url, WORKER_CONCURRENCY=0, **routing) as [api],
                self.services(f"{name}-worker", services_url, **routing) as [worker],
            ):
                jitter = float(env.get("WORKER_POLL_INTERVAL", 0.0))
                result = await self.pickup_on(api, url, jitter)
                result["worker_listen_connected"] = listen_connected(worker)
        shown = {name: value for name, value in routing.items() if not name.endswith("_URL")}
        settings = {
            "jobs": self.plan.pickup_jobs,
            "gap_s": self.plan.pickup_gap,
            "gap_jitter_s": jitter,
            "database": f"PgBouncer, transaction mode, pool {self.plan.bouncer_pool_size}" if bouncer else "direct",
            "listen": "PgBouncer" if listen_through_bouncer else "direct",
            "api": self.service_env(WORKER_CONCURRENCY=0, **shown),
            "worker": self.service_env(**shown),
        }
        return {"settings": settings, **result}

    async def pickup_bounced(self, listen_through_bouncer: bool) -> dict[str, Any]:
        """pickup_apart through PgBouncer in transaction mode (PgBouncer 1.18: no prepared statements
        across transactions, hence DB_STATEMENT_CACHE_SIZE=0). LISTEN straight to PostgreSQL: is it as
        fast as plain pickup? LISTEN through PgBouncer too: no notification can arrive, so the worker
        polls every plan.polled_interval seconds (WORKER_POLL_INTERVAL): is p99 within one interval?"""
        bouncer = PgBouncer(self.server_url, pool_size=self.plan.bouncer_pool_size)
        try:
            bouncer.start()
        except RuntimeError as error:  # not installed, and we may not install it
            bouncer.stop()
            return {"skipped": f"no PgBouncer: {error}"[:500]}
        try:
            env = {"WORKER_POLL_INTERVAL": self.plan.polled_interval} if listen_through_bouncer else {}
            name = "pickup_bounced_polled" if listen_through_bouncer else "pickup_bounced"
            result = await self.pickup_apart(name, bouncer, listen_through_bouncer, **env)
        finally:
            bouncer.stop()
        baselines = {"plain": self.results.get("pickup", {}), "apart": self.results.get(PICKUP_APART, {})}
        for base, baseline in baselines.items():
            for p in (50, 99):
                result[f"p{p}_to_{base}"] = ratio_to(result[f"p{p}_ms"], baseline.get(f"p{p}_ms", NAN))
        return result

    async def pickup_on(self, service: Service, url: str, jitter: float = 0.0) -> dict[str, Any]:
        """Pickup latencies of plan.pickup_jobs jobs posted one at a time to this running service, the
        next one plan.pickup_gap seconds after the last completed, plus up to `jitter` seconds at random
        (a polling worker polls a fixed time after its last job: with a fixed gap, every job would
        arrive at the same point of the poll interval)."""
        warmup_jobs = 10  # the pool opens connections and prepares statements on first use
        latencies: list[float] = []
        from_post: list[float] = []  # the whole way, for the POST's own share of it
        early = 0
        async with listening(url) as completions, http_session() as session:
            for index in range(warmup_jobs + self.plan.pickup_jobs):
                posted = time.perf_counter()
                async with session.post(service.url + "/generations", data=ONE_IMAGE, headers=JSON_HEADERS) as response:
                    job_id = (await response.json())["jobId"]
                answered = time.perf_counter()
                completed = await asyncio.wait_for(completions.of(job_id), timeout=10)
                if index >= warmup_jobs:
                    early += completed < answered
                    latencies.append(max(0.0, completed - answered))
                    from_post.append(completed - posted)
                await asyncio.sleep(self.plan.pickup_gap + random.uniform(0, jitter))
        return {
            **percentiles_ms(latencies, 50, 90, 99),
            # Completions heard before the POST's answer was read count as 0 ms above; this many.
            "completed_before_response": early,
            "from_post": percentiles_ms(from_post, 50, 90, 99),
        }

    async def complete(
        self, name: str, jobs: int, replicas: int = 1, others: Mapping[str, int] | None = None, **env: str | float
    ) -> dict[str, Any]:
        """Queue `jobs` jobs in one statement for running services; time until all have ended.

        The time runs on PostgreSQL's clock, from just after the jobs were committed to the
        last completed_at, so that watching (a count every WATCH_INTERVAL) adds no error. `others`
        are more processes whose CPU counts, by party (the stand-in provider).
        """
        async with self.database(name) as url, self.services(name, url, replicas, **env) as services:
            meter = self.meter(services, others)
            connection = await asyncpg.connect(url)
            try:
                await connection.execute(QUEUE_JOBS, jobs)
                queued = await connection.fetchval("SELECT clock_timestamp()")
                counts_before, before = await write_counters(self.server_url), meter.read()
                await connection.execute(ANNOUNCE_NEW_JOBS)
                for _ in range(int((60 + jobs / 50) / WATCH_INTERVAL)):  # bounded: a stuck service ends the wait
                    if await connection.fetchval(ENDED_JOBS) >= jobs:
                        break
                    await asyncio.sleep(WATCH_INTERVAL)
                after, counts_after = meter.read(), await write_counters(self.server_url)
                seconds = ((await connection.fetchval(LAST_ENDED) or queued) - queued).total_seconds()
                statuses = dict(await connection.fetch(COUNT_BY_STATUS))
            finally:
                await connection.close()
        completed = statuses.get("completed", 0)
        return {
            "settings": {"jobs": jobs, "replicas": replicas, "service": self.service_env(**env)},
            "completed": completed,
            "failed": jobs - completed,  # failed, or not done when the wait ran out
            "seconds": round(seconds, 3),
            "per_second": round(completed / seconds, 1) if seconds else NAN,
            # CPU from the queued jobs' commit to the last count: the cores are an average over it.
            **cpu_shares(before, after, seconds, completed, "job"),
            **per_unit(counts_before, counts_after, completed, "job"),  # the watch's counts are read-only
        }

    async def drain(self, concurrency: int) -> dict[str, Any]:
        """Complete plan.drain_jobs queued jobs with an instant provider."""
        env = {"WORKER_CONCURRENCY": concurrency, "IMAGE_PROVIDER_DELAY": 0}
        result = await self.complete(f"drain_{concurrency}", self.plan.drain_jobs, **env)
        return {**result, "ratio_to_ceiling": self.ratio(result, "ceiling")}

    async def drain_two_replicas(self, concurrency: int) -> dict[str, Any]:
        """Drain, with two service processes sharing the queue."""
        env = {"WORKER_CONCURRENCY": concurrency, "IMAGE_PROVIDER_DELAY": 0}
        result = await self.complete(f"drain_{concurrency}_replicas", self.plan.drain_jobs, replicas=2, **env)
        return {**result, "ratio_to_one": self.ratio(result, f"drain c={concurrency}")}

    def against_ideal(self, result: dict[str, Any]) -> dict[str, Any]:
        """A slow provider's result with its ratio to the ideal: every slot busy all the time."""
        ideal = self.plan.slow_concurrency / self.plan.slow_delay
        return {**result, "ideal_per_second": ideal, "ratio_to_ideal": round(result["per_second"] / ideal, 3)}

    async def slow_provider(self) -> dict[str, Any]:
        """The mock provider taking plan.slow_delay seconds (IMAGE_PROVIDER_DELAY), with
        plan.slow_concurrency slots: does the worker keep every slot busy?"""
        plan = self.plan
        env = {"WORKER_CONCURRENCY": plan.slow_concurrency, "IMAGE_PROVIDER_DELAY": plan.slow_delay}
        return self.against_ideal(await self.complete("slow", plan.slow_jobs, **env))

    async def slow_http_provider(self) -> dict[str, Any]:
        """IMAGE_PROVIDER=http against the stand-in provider process, which answers after
        plan.slow_delay seconds, with plan.slow_concurrency slots: the rate against the ideal, and
        the service's CPU per provider call (the request and its answer through aiohttp, JSON, the
        answer's checks, and the job's share of claims and writes)."""
        plan = self.plan
        provider = Provider(plan.slow_delay, self.logs / "provider.log").start()
        try:
            env = {
                "WORKER_CONCURRENCY": plan.slow_concurrency,
                "IMAGE_PROVIDER": "http",
                "IMAGE_PROVIDER_URL": provider.url + "/generate",
            }
            result = await self.complete("slow_http", plan.slow_jobs, others={"provider": provider.pid()}, **env)
            calls = provider.calls()
        finally:
            provider.stop()
        service_cpu = result.get("cpu_s", {}).get("service", NAN)
        result["provider_calls"] = calls
        result["service_cpu_ms_per_call"] = round(service_cpu * 1000 / calls, 3) if calls else NAN
        return self.against_ideal(result)

    async def run_round(self, only: set[str]) -> dict[str, dict[str, Any]]:
        """Every selected scenario once, each ratio's baseline first; print each result as it comes."""
        drains = self.plan.drain_concurrency
        scenarios: list[tuple[str, str, Callable[[], Awaitable[dict[str, Any]]]]] = [
            ("ceiling", "ceiling", self.ceiling),
            ("raw insert", "ceiling", self.raw_insert),
            ("health", "health", self.health),
            ("enqueue", "enqueue", self.enqueue),
            (RAW_PACED, "enqueue", self.paced_raw_insert),
            ("batch", "batch", self.batch),
            ("read", "read", self.read),
            ("pickup", "pickup", self.pickup),
            (PICKUP_APART, "pickup", partial(self.pickup_apart, "pickup_apart")),
            (PICKUP_BOUNCED, "pgbouncer", partial(self.pickup_bounced, listen_through_bouncer=False)),
            (PICKUP_POLLED, "pgbouncer", partial(self.pickup_bounced, listen_through_bouncer=True)),
            *((f"drain c={c}", "drain", partial(self.drain, c)) for c in drains),
            ("slow provider (mock)", "slow", self.slow_provider),
            ("slow provider (http)", "slow", self.slow_http_provider),
            ("two replicas: enqueue", "replicas", self.enqueue_two_replicas),
            (f"two replicas: drain c={drains[-1]}", "replicas", partial(self.drain_two_replicas, drains[-1])),
        ]
        for label, group, scenario in scenarios:
            if group in only:
                print(f"bench: {label}", file=sys.stderr, flush=True)
                self.results[label] = await scenario()
                print(json.dumps({"scenario": label, **self.results[label]}), flush=True)
        if self.peak_rss:
            worst = max(self.peak_rss, key=self.peak_rss.__getitem__)
            self.results["memory"] = {"peak_rss_mb": self.peak_rss[worst], "in": worst, "by_service": self.peak_rss}
            print(json.dumps({"scenario": "memory", **self.results["memory"]}), flush=True)
        return self.results


# --- Report --------------------------------------------------------------------------------


def median_of(rounds: list[Any]) -> Any:
    """The median of each number across rounds, field by field; other values from the first round."""
    first = rounds[0]
    if isinstance(first, dict):
        return {key: median_of([r[key] for r in rounds if key in r]) for key in first}
    if isinstance(first, bool) or not isinstance(first, int | float):
        return first
    return round(statistics.median(rounds), 3)


# A scenario's result in words, its target, and whether it is met (None: nothing to judge).
Row = tuple[str, str, bool | None]


def cpu_ms(result: dict[str, Any], unit: str, party: str) -> float:
    """A party's CPU milliseconds per `unit` in a result (NaN if not measured)."""
    return result.get(f"cpu_ms_per_{unit}", {}).get(party, NAN)


def at_least(value: float, bound: float) -> bool | None:
    """value >= bound; None when the value is unknown (its baseline did not run)."""
    return None if math.isnan(value) else value >= bound


def at_most(value: float, bound: float) -> bool | None:
    """value <= bound; None when the value is unknown (its baseline did not run)."""
    return None if math.isnan(value) else value <= bound


def all_met(*checks: bool | None) -> bool | None:
    """False if any check fails, else None if any could not be judged, else True."""
    if False in checks:
        return False
    return None if None in checks else True


def describe_inserts(label: str, r: dict[str, Any], results: dict[str, dict[str, Any]]) -> Row:
    """ceiling and raw insert: the rate, and PostgreSQL's CPU per row."""
    postgres = cpu_ms(r, "insert", "postgres")
    text = f"{r['per_second']:,.0f} inserts/s, p50 {r['p50_ms']} ms, PostgreSQL {postgres} ms CPU/insert"
    if "ratio_to_ceiling" in r:
        text += f"; {r['ratio_to_ceiling']} x ceiling"
    return text, "", None


def describe_paced(label: str, r: dict[str, Any], results: dict[str, dict[str, Any]]) -> Row:
    """raw insert at the enqueue's rate: PostgreSQL's CPU per row, and the enqueue's over it."""
    if "skipped" in r:
        return r["skipped"], "", None
    ratio = r["enqueue_postgres_cpu_to_this"]
    text = (
        f"{r['per_second']:,.0f} inserts/s over {r['settings']['connections']} connections,"
        f" PostgreSQL {cpu_ms(r, 'insert', 'postgres')} ms CPU/insert; the enqueue's = {ratio} x this"
    )
    bound = ENQUEUE_POSTGRES_CPU_TO_RAW
    return text, f"enqueue's PostgreSQL CPU <= {bound} x this", at_most(ratio, bound)


def describe_health(label: str, r: dict[str, Any], results: dict[str, dict[str, Any]]) -> Row:
    """health: the generator's headroom over the fastest HTTP load."""
    fastest = max(results.get(s, {}).get("per_second", 0) for s in ("enqueue", "read"))
    text = f"{r['per_second']:,.0f} req/s, generator at {r['cores']['generator']} cores"
    if not fastest:
        return text, "", None
    text += f" = {r['per_second'] / fastest:.1f} x the faster of enqueue and read"
    return text, f">= {HEALTH_HEADROOM} x enqueue, read", r["per_second"] >= HEALTH_HEADROOM * fastest


def describe_requests(label: str, r: dict[str, Any], results: dict[str, dict[str, Any]]) -> Row:
    """enqueue and read: the rate, latencies, and the CPU per request of the service and PostgreSQL."""
    service, postgres = cpu_ms(r, "request", "service"), cpu_ms(r, "request", "postgres")
    text = (
        f"{r['per_second']:,.0f} req/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms;"
        f" CPU/req: service {service} ms, PostgreSQL {postgres} ms"
    )
    if label != "enqueue":
        return text, "", None
    ratio, postgres_ratio = r["ratio_to_ceiling"], r["postgres_cpu_to_raw_insert"]
    text += f" = {postgres_ratio} x a raw insert's; {ratio} x ceiling"
    target = f">= {ENQUEUE_TO_CEILING} x ceiling, service <= {ENQUEUE_CPU_MS:g} ms CPU/req"
    met = all_met(at_least(ratio, ENQUEUE_TO_CEILING), at_most(service, ENQUEUE_CPU_MS))
    return text, target, met


def describe_batch(label: str, r: dict[str, Any], results: dict[str, dict[str, Any]]) -> Row:
    """batch: jobs per second against the single-row ceiling, and each party's CPU per job."""
    parties = ", ".join(f"{party} {cpu_ms(r, 'job', party)} ms" for party in ("service", "postgres", "generator"))
    text = (
        f"{r['per_second']:,.0f} jobs/s ({r['requests_per_second']:g} req/s, p50 {r['p50_ms']} ms,"
        f" {r['errors']} errors); CPU/job: {parties}; {r['ratio_to_ceiling']} x ceiling"
    )
    target = f">= {BATCH_TO_CEILING:g} x ceiling (WORKER_CONCURRENCY=0)"
    return text, target, all_met(at_least(r["ratio_to_ceiling"], BATCH_TO_CEILING), not r["errors"])


def pickup_text(r: dict[str, Any]) -> str:
    """A pickup's percentiles."""
    return f"p50 {r['p50_ms']} ms, p90 {r['p90_ms']} ms, p99 {r['p99_ms']} ms"


def describe_pickup(label: str, r: dict[str, Any], results: dict[str, dict[str, Any]]) -> Row:
    """pickup, in one process or two: the absolute targets."""
    text = pickup_text(r)
    if "worker_listen_connected" in r:
        text += f"; worker's generations_listen_connected {r['worker_listen_connected']:g}"
    met = r["p50_ms"] <= PICKUP_P50_MS and r["p99_ms"] <= PICKUP_P99_MS
    return text, f"p50 <= {PICKUP_P50_MS:g} ms, p99 <= {PICKUP_P99_MS:g} ms", met


def describe_bounced(label: str, r: dict[str, Any], results: dict[str, dict[str, Any]]) -> Row:
    """pickup through PgBouncer with LISTEN straight to PostgreSQL: as fast as plain pickup?"""
    if "skipped" in r:
        return r["skipped"], "", None
    text = (
        f"{pickup_text(r)}; p50 {r['p50_to_plain']} x plain pickup's ({r['p50_to_apart']} x apart),"
        f" p99 {r['p99_to_plain']} x ({r['p99_to_apart']} x); listen_connected {r['worker_listen_connected']:g}"
    )
    target = f"as fast: p50 <= {BOUNCED_PICKUP_RATIO} x plain pickup's, p99 <= {PICKUP_P99_MS:g} ms"
    return text, target, all_met(at_most(r["p50_to_plain"], BOUNCED_PICKUP_RATIO), r["p99_ms"] <= PICKUP_P99_MS)


def describe_polled(label: str, r: dict[str, Any], results: dict[str, dict[str, Any]]) -> Row:
    """pickup through PgBouncer with LISTEN through it too: within one poll interval?"""
    if "skipped" in r:
        return r["skipped"], "", None
    bound = float(r["settings"]["worker"]["WORKER_POLL_INTERVAL"]) * 1000 + POLLED_PICKUP_MARGIN_MS
    text = f"{pickup_text(r)}; listen_connected {r['worker_listen_connected']:g}"
    return text, f"p99 <= WORKER_POLL_INTERVAL + {POLLED_PICKUP_MARGIN_MS:g} ms = {bound:g} ms", r["p99_ms"] <= bound


def describe_drain(label: str, r: dict[str, Any], results: dict[str, dict[str, Any]]) -> Row:
    """drain: jobs per second against the ceiling."""
    ratio = r["ratio_to_ceiling"]
    text = (
        f"{r['per_second']:,.0f} jobs/s, {r['failed']} failed; CPU/job: service {cpu_ms(r, 'job', 'service')} ms,"
        f" PostgreSQL {cpu_ms(r, 'job', 'postgres')} ms; {ratio} x ceiling"
    )
    return text, f">= {DRAIN_TO_CEILING} x ceiling", all_met(at_least(ratio, DRAIN_TO_CEILING), not r["failed"])


def describe_slow(label: str, r: dict[str, Any], results: dict[str, dict[str, Any]]) -> Row:
    """slow providers: the rate against the ideal, and what the service spends per job or call."""
    text = (
        f"{r['per_second']} jobs/s = {r['ratio_to_ideal']} x ideal {r['ideal_per_second']:g}, {r['failed']} failed;"
        f" service {cpu_ms(r, 'job', 'service')} ms CPU/job"
    )
    if "provider_calls" in r:
        text += (
            f", {r['service_cpu_ms_per_call']} ms per provider call ({r['provider_calls']:,} calls;"
            f" the provider {cpu_ms(r, 'job', 'provider')} ms each)"
        )
    met = r["ratio_to_ideal"] >= SLOW_TO_IDEAL and not r["failed"]
    return text, f">= {SLOW_TO_IDEAL} x ideal, 0 failed", met


def describe_replicas(label: str, r: dict[str, Any], results: dict[str, dict[str, Any]]) -> Row:
    """two replicas: the rate against one process."""
    unit = "req/s" if "enqueue" in label else "jobs/s"
    return f"{r['per_second']:,.0f} {unit} = {r['ratio_to_one']} x one process", "", None


def describe_memory(label: str, r: dict[str, Any], results: dict[str, dict[str, Any]]) -> Row:
    """memory: the highest peak RSS of any service."""
    met = r["peak_rss_mb"] <= PEAK_RSS_MB
    return f"{r['peak_rss_mb']} MB peak RSS (in {r['in']})", f"<= {PEAK_RSS_MB:g} MB", met


DESCRIBERS: dict[str, Callable[[str, dict[str, Any], dict[str, dict[str, Any]]], Row]] = {
    "ceiling": describe_inserts,
    RAW_PACED: describe_paced,
    "raw insert": describe_inserts,
    "health": describe_health,
    "enqueue": describe_requests,
    "read": describe_requests,
    "batch": describe_batch,
    "pickup": describe_pickup,
    PICKUP_APART: describe_pickup,
    PICKUP_BOUNCED: describe_bounced,
    PICKUP_POLLED: describe_polled,
    "drain": describe_drain,
    "slow provider": describe_slow,
    "two replicas": describe_replicas,
    "memory": describe_memory,
}


def describe(label: str, r: dict[str, Any], results: dict[str, dict[str, Any]]) -> Row:
    """A scenario's result in words, its target, and whether it is met, by its label (or the label's start)."""
    kind = label if label in DESCRIBERS else next((k for k in DESCRIBERS if label.startswith(k)), None)
    if kind is None:
        raise ValueError(f"no description for {label}")
    return DESCRIBERS[kind](label, r, results)


def markdown(results: dict[str, dict[str, Any]], rounds: int) -> str:
    """The results as a markdown table, one row per scenario."""
    title = f"median of {rounds} rounds" if rounds > 1 else "one round"
    lines = [f"| scenario ({title}) | result | target | met |", "|---|---|---|---|"]
    for label, result in results.items():
        text, target, met = describe(label, result, results)
        lines.append(f"| {label} | {text} | {target} | {'' if met is None else 'yes' if met else '**no**'} |")
    return "\n".join(lines)


# --- Scale: the costs as history and backlog grow -----------------------------------------

# Finished jobs, as a long-running service leaves them: rows $1..$2, row n created at
# $3 + n * $4 seconds, so that older jobs come first in the table. 97% completed, 2% failed
# (out of attempts), 1% cancelled; each ended a few seconds after it was created.
FILL_HISTORY = """
INSERT INTO jobs (status, num_images, animal, image_urls, error, attempts, available_at,
                  created_at, updated_at, completed_at)
SELECT job.status, 1,
       CASE WHEN job.status = 'completed' THEN job.animal END,
       CASE WHEN job.status = 'completed'
            THEN jsonb_build_array('https://placehold.co/512x512/png?text=a+cute+' || job.animal || '+1') END,
       CASE WHEN job.status = 'failed' THEN 'ProviderError: the image provider failed' END,
       CASE job.status WHEN 'completed' THEN 1 WHEN 'failed' THEN 3 ELSE 0 END,
       job.created, job.created, job.ended, job.ended
FROM generate_series($1::bigint, $2::bigint) AS n,
     LATERAL (SELECT CASE WHEN n % 100 < 2 THEN 'failed' WHEN n % 100 = 2 THEN 'cancelled' ELSE 'completed' END,
                     (ARRAY['cat', 'dog', 'fox', 'owl', 'panda'])[1 + n % 5],
                     $3::timestamptz + make_interval(secs => n * $4::float8),
                     $3::timestamptz + make_interval(secs => n * $4::float8 + 1 + n % 5))
              AS job (status, animal, created, ended)
"""
# Pending jobs never claimed yet, all due: rows $1..$2, row n created at $3 + n * $4 seconds.
FILL_BACKLOG = """
INSERT INTO jobs (status, num_images, attempts, available_at, created_at, updated_at)
SELECT 'pending', 1, 0, job.created, job.created, job.created
FROM generate_series($1::bigint, $2::bigint) AS n,
     LATERAL (SELECT $3::timestamptz + make_interval(secs => n * $4::float8)) AS job (created)
"""
# The largest history is spread over the last 7 days; a smaller one is its oldest part (the
# table as it was when it held that many), so that growing it appends newer jobs as a service
# does, rather than slipping them in between older ones. A backlog spans the last hour.
HISTORY_SPAN, BACKLOG_SPAN = timedelta(days=7), timedelta(hours=1)
TABLE_SIZES = "SELECT pg_total_relation_size('jobs'), pg_relation_size('jobs'), pg_indexes_size('jobs')"
INDEX_SIZES = """
SELECT indexrelid::regclass::text, pg_relation_size(indexrelid) FROM pg_index
WHERE indrelid = 'jobs'::regclass ORDER BY 1
"""
UPDATE_COUNTS = "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'jobs'"
ESTIMATED_ROWS = "SELECT reltuples FROM pg_class WHERE oid = 'jobs'::regclass"
# The plans a statement prepared in this session has run (asyncpg names its own; the text is the key).
PLANS_OF = "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement = $1"
# What autovacuum knows of jobs, and whether an ANALYZE is due: more rows changed since the last
# than autovacuum_analyze_threshold + autovacuum_analyze_scale_factor x the rows pg_class counts.
AUTOVACUUM_STATE = """
SELECT s.n_live_tup, s.n_mod_since_analyze, s.last_autoanalyze, s.autoanalyze_count, s.last_autovacuum,
       c.reltuples,
       current_setting('autovacuum_analyze_threshold')::float8
         + current_setting('autovacuum_analyze_scale_factor')::float8 * greatest(c.reltuples, 0) AS analyze_threshold,
       clock_timestamp() AS now
FROM pg_stat_user_tables AS s JOIN pg_class AS c ON c.oid = s.relid
WHERE s.relname = 'jobs'
"""
AUTOVACUUM_SETTINGS = (
    "autovacuum",
    "autovacuum_naptime",
    "autovacuum_analyze_threshold",
    "autovacuum_analyze_scale_factor",
)
HISTORY_TIMES = "SELECT now(), min(created_at), max(created_at) FROM jobs"  # the history only, in its copy
COUNT_OLDER = "SELECT count(*) FROM jobs WHERE created_at < $1"  # by jobs_newest: cheap enough to poll
QUEUED = "SELECT count(*) FROM jobs WHERE status IN ('pending', 'processing')"  # by jobs_claimable
# The enqueue's jobs, completed as a worker would complete them (by jobs_status_newest).
COMPLETE_ENQUEUED = """
UPDATE jobs SET status = 'completed', animal = 'cat', attempts = 1, updated_at = now(), completed_at = now(),
                image_urls = '["https://placehold.co/512x512/png?text=a+cute+cat+1"]'
WHERE status = 'pending' AND created_at >= $1
"""
# Which plan the prepared statement's last executions used.
GENERIC_PLANS = "SELECT generic_plans FROM pg_prepared_statements WHERE name = 'bench_statement'"

# The listings whose first page the scale run reads: a label, the path.
LISTINGS = {
    "list": "/generations",
    "list failed": "/generations?status=failed",
    "list pending": "/generations?status=pending",
}
# A keyset cursor before every job: the first page, for statements that always take a cursor.
FIRST_PAGE = (datetime.max.replace(tzinfo=UTC), uuid.UUID(int=2**128 - 1))
# The service's statements the scale run times in the database: (label, the constant's name in
# app.py, its parameters given an existing job's id), with the parameters the service gives
# them. An entry whose constant app.py lacks, or that takes a different number of parameters,
# is skipped with a note (app.py may change under the bench). Adding a statement is one line.
STATEMENTS: list[tuple[str, str, Callable[[uuid.UUID], tuple[Any, ...]]]] = [
    ("INSERT_JOB", "INSERT_JOB", lambda job: (1, None)),  # numImages, Idempotency-Key
    ("INSERT_BATCH", "INSERT_BATCH", lambda job: ([1] * 1000, None)),  # a full batch's numImages, no key
    ("CLAIM_JOBS", "CLAIM_JOBS", lambda job: (20, 30.0, 3)),  # limit, lease seconds, max attempts: the defaults
    ("SELECT_JOB", "SELECT_JOB", lambda job: (job,)),
    # The first page of 50: the cursor before every job, and one row more than the page.
    ("LIST_JOBS", "LIST_JOBS", lambda job: (*FIRST_PAGE, 51)),
    ("LIST_JOBS_WITH_STATUS failed", "LIST_JOBS_WITH_STATUS", lambda job: (*FIRST_PAGE, 51, "failed")),
    ("LIST_JOBS_WITH_STATUS pending", "LIST_JOBS_WITH_STATUS", lambda job: (*FIRST_PAGE, 51, "pending")),
    ("DELETE_EXPIRED_JOBS", "DELETE_EXPIRED_JOBS", lambda job: (604800.0, 1000)),  # the default retention, a batch
    ("COUNT_JOBS", "COUNT_JOBS", lambda job: (100_000,)),  # /metrics: counts stop at app.COUNT_LIMIT
]
CLAIM_STATEMENT = "CLAIM_JOBS"  # the label whose time the claim target judges
# PostgreSQL plans a prepared statement's first five executions for their parameters (custom);
# from the sixth it may keep one generic plan. asyncpg prepares every statement the service runs.
AUTO_PLAN_RUNS = 6

# The scale targets: ratios to the empty tables' values in the same run.
SCALE_LATENCY_RATIO = 1.5
CLAIM_MS_AT_BACKLOG = 5.0
METRICS_P50_MS = 50.0  # GET /metrics with a backlog
# Latencies shown with their ratio but judged by a target of their own: /metrics counts pending jobs up
# to app.COUNT_LIMIT by design, so it grows with a backlog up to that bound (METRICS_P50_MS).
UNJUDGED = {"metrics p50"}
RETENTION_ROWS_PER_SECOND, RETENTION_CLAIM_P99_MS = 50_000, 20.0
# Retention keeps the newest 6/7 of the time the history spans, so that its oldest seventh is due.
RETENTION_KEPT_SHARE = 6 / 7
RETENTION_PROBE_SECONDS = 15.0  # how long the probe waits for JOB_RETENTION_SECONDS=1 to delete
RETENTION_POLL = 0.25  # seconds between two counts of the rows still due (each costs an index scan)
BYTES_PER_JOB = 600  # on disk, indexes and a margin included: for the free-space check


@dataclasses.dataclass(frozen=True)
class ScalePlan:
    """The scale run: the sizes it builds, and how long it measures each combination."""

    histories: tuple[int, ...] = (0, 1_000_000, 10_000_000)
    backlogs: tuple[int, ...] = (0, 1_000_000)
    chunk: int = 500_000  # rows per INSERT while filling, so that memory and WAL stay bounded
    read_clients: int = 4  # few, so that read latencies are the requests' own rather than queueing
    sample_ids: int = 10_000  # existing jobs GET /generations/<id> picks from
    explain_runs: int = 3  # per plan mode; the median is reported
    trickle_per_second: float = 200.0  # jobs posted while retention deletes
    retention_seconds: float = 60.0  # the longest retention is watched: 10M history has 1.4M rows due
    claim_runs: int = 10  # executions of the claim as the service runs it, before its plan is read
    # How long a burst's watch waits for autovacuum to analyze the table: when its statistics say
    # it is due, and when they say it is not (to see that nothing happens meanwhile).
    burst_watch_seconds: float = 150.0
    burst_not_due_seconds: float = 30.0
    burst_poll: float = 2.0  # seconds between two looks (and one claim each)


SCALE_LOAD = dataclasses.replace(Plan(), seconds=5.0)
SCALE_QUICK = ScalePlan(
    histories=(0, 100_000),
    backlogs=(0, 100_000),
    chunk=50_000,
    sample_ids=1_000,
    retention_seconds=10.0,
    burst_watch_seconds=75.0,
    burst_not_due_seconds=10.0,
)
SCALE_QUICK_LOAD = dataclasses.replace(QUICK, seconds=1.5, pickup_jobs=30)


def parse_count(text: str) -> int:
    """A row count as written on the command line: 0, 250000, 100k, 1M, 2.5M."""
    text = text.strip().replace("_", "")
    factor = {"k": 1_000, "m": 1_000_000}.get(text[-1:].lower(), 1)
    return round(float(text[:-1] if factor > 1 else text) * factor)


def count_text(count: int) -> str:
    """A row count the short way: 0, 100k, 1M, 10M."""
    if count >= 1_000_000:
        return f"{count / 1_000_000:g}M"
    return f"{count / 1_000:g}k" if count >= 1_000 else str(count)


def sql_literal(value: Any) -> str:
    """A parameter written into SQL text for EXECUTE; PostgreSQL casts it to the parameter's type."""
    if value is None:
        return "NULL"
    if isinstance(value, list):  # of numbers: an array literal
        return "'{" + ",".join(map(str, value)) + "}'"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return repr(value)
    text = value.isoformat() if isinstance(value, datetime) else str(value)
    return "'" + text.replace("'", "''") + "'"


def parameter_count(sql: str) -> int:
    """How many parameters ($1, $2, ...) a statement takes."""
    return max((int(number) for number in re.findall(r"\$(\d+)", sql)), default=0)


def ratio_to(value: float, baseline: float) -> float:
    """value / baseline, NaN when either is unknown or the baseline is 0."""
    if not baseline or math.isnan(baseline) or math.isnan(value):
        return NAN
    return round(value / baseline, 2)


@dataclasses.dataclass(frozen=True)
class Timeline:
    """Where a FILL_ statement puts rows in time: row n is created at `begin` + n * `spacing`."""

    begin: datetime
    spacing: float  # seconds between two rows

    @classmethod
    def ending_now(cls, span: timedelta, rows: int) -> "Timeline":
        """`rows` rows spread evenly over the `span` that ends now."""
        return cls(datetime.now(UTC) - span, span.total_seconds() / max(rows, 1))


async def fill(
    url: str, what: str, statement: str, rows: range, timeline: Timeline, chunk: int, analyze: bool = True
) -> dict[str, Any]:
    """Insert `rows` (row numbers of the timeline) with a FILL_ statement, `chunk` per transaction;
    then, if `analyze`, VACUUM ANALYZE, as a long-running table is (visibility map, statistics)."""
    connection = await asyncpg.connect(url)
    start = time.perf_counter()
    try:
        for first in range(rows.start, rows.stop, chunk):
            last = min(first + chunk, rows.stop) - 1
            await connection.execute(statement, first, last, timeline.begin, timeline.spacing)
            done = last + 1 - rows.start
            rate = done / (time.perf_counter() - start)
            print(
                f"bench: {what}: {done:,} of {len(rows):,} rows, {rate:,.0f} rows/s,"
                f" about {(len(rows) - done) / rate:.0f} s left",
                file=sys.stderr,
                flush=True,
            )
        inserted = time.perf_counter() - start
        if analyze:
            print(f"bench: {what}: VACUUM ANALYZE jobs", file=sys.stderr, flush=True)
            await connection.execute("VACUUM ANALYZE jobs")
    finally:
        await connection.close()
    seconds = time.perf_counter() - start
    return {
        "what": what,
        "rows": len(rows),
        "seconds": round(seconds, 1),
        "insert_seconds": round(inserted, 1),
        "rows_per_second": round(len(rows) / inserted),
    }


async def table_sizes(url: str, history: int) -> dict[str, Any]:
    """The jobs table's size on disk: all of it, the heap, the indexes, each index; per million finished jobs."""
    connection = await asyncpg.connect(url)
    try:
        total, heap, indexes = await connection.fetchrow(TABLE_SIZES)
        each = dict(await connection.fetch(INDEX_SIZES))
    finally:
        await connection.close()
    megabytes = {"total": total, "heap": heap, "indexes": indexes, **each}
    sizes: dict[str, Any] = {"mb": {name: round(size / 2**20, 1) for name, size in megabytes.items()}}
    if history:
        sizes["mb_per_million"] = {name: round(size / 2**20 * 1e6 / history, 1) for name, size in megabytes.items()}
    return sizes


async def database_time(url: str) -> datetime:
    """PostgreSQL's clock, now."""
    return (await fetch_one(url, "SELECT clock_timestamp()"))[0]


async def sample_ids(url: str, wanted: int) -> list[uuid.UUID]:
    """About `wanted` ids of jobs picked at random all over the table (none if it is empty)."""
    connection = await asyncpg.connect(url)
    try:
        estimate = await connection.fetchval(ESTIMATED_ROWS)
        percent = min(100.0, 120.0 * wanted / estimate) if estimate > 0 else 100.0
        ids = [row[0] for row in await connection.fetch(f"SELECT id FROM jobs TABLESAMPLE BERNOULLI ({percent})")]
    finally:
        await connection.close()
    random.shuffle(ids)
    return ids[:wanted]


async def update_counts(url: str) -> tuple[int, int]:
    """Rows of jobs updated so far, and how many of those updates were HOT (no index touched)."""
    updates, hot = await fetch_one(url, UPDATE_COUNTS)
    return updates, hot


async def explain_once(connection: asyncpg.Connection, execute: str) -> dict[str, Any]:
    """EXPLAIN ANALYZE one execution, in a transaction rolled back: the table stays as it was."""
    transaction = connection.transaction()
    await transaction.start()
    try:
        [result] = json.loads(await connection.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {execute}"))
    finally:
        await transaction.rollback()
    return result


def plan_outline(node: dict[str, Any]) -> str:
    """A plan in one line: each node with the index or table it reads and the rows it returned."""
    target = node.get("Index Name") or node.get("Relation Name") or node.get("CTE Name")
    text = node["Node Type"] + (f" {target}" if target else "") + f" {node['Actual Rows']:g} rows"
    if node.get("Actual Loops", 1) > 1:
        text += f" x {node['Actual Loops']} loops"
    if removed := node.get("Rows Removed by Filter"):
        text += f", {removed:g} filtered out"
    children = [plan_outline(child) for child in node.get("Plans", [])]
    if len(children) > 1:
        return f"{text} <- [{' | '.join(children)}]"
    return f"{text} <- {children[0]}" if children else text


def explain_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median execution time of some EXPLAIN ANALYZE runs; buffers and plan of the last."""
    plan = runs[-1]["Plan"]
    return {
        "ms": round(statistics.median(run["Execution Time"] for run in runs), 3),
        "planning_ms": round(statistics.median(run.get("Planning Time", 0.0) for run in runs), 3),
        "buffers": plan["Shared Hit Blocks"] + plan["Shared Read Blocks"],
        "buffers_read": plan["Shared Read Blocks"],
        "cost": plan["Total Cost"],  # the planner's estimate, which the plan cache compares
        "plan": plan_outline(plan),
    }


async def time_statement(
    connection: asyncpg.Connection, sql: str, parameters: tuple[Any, ...], runs: int
) -> dict[str, Any]:
    """One statement, prepared as asyncpg prepares it: which plan PostgreSQL settles on by the
    AUTO_PLAN_RUNS-th execution (the one the service runs), and the custom and the generic plan's cost."""
    execute = "EXECUTE bench_statement" + (f"({', '.join(map(sql_literal, parameters))})" if parameters else "")
    await connection.execute(f"PREPARE bench_statement AS {sql}")
    try:
        for _ in range(AUTO_PLAN_RUNS):
            await explain_once(connection, execute)
        result: dict[str, Any] = {"service_plan": "generic" if await connection.fetchval(GENERIC_PLANS) else "custom"}
        for mode in ("custom", "generic"):
            await connection.execute(f"SET plan_cache_mode = force_{mode}_plan")
            result[mode] = explain_summary([await explain_once(connection, execute) for _ in range(runs)])
    finally:
        await connection.execute("RESET plan_cache_mode")
        await connection.execute("DEALLOCATE bench_statement")
    return result


async def time_statements(url: str, job_id: uuid.UUID, runs: int) -> tuple[dict[str, Any], list[str]]:
    """Every STATEMENTS entry app.py has, timed; and a note for each one skipped."""
    timed: dict[str, Any] = {}
    notes = []
    connection = await asyncpg.connect(url)
    try:
        for label, name, parameters in STATEMENTS:
            sql, given = getattr(app, name, None), parameters(job_id)
            if not isinstance(sql, str):
                notes.append(f"{label}: app.py has no {name}")
            elif parameter_count(sql) != len(given):
                notes.append(f"{label}: {name} takes {parameter_count(sql)} parameters, this entry gives {len(given)}")
            else:
                timed[label] = await time_statement(connection, sql, given, runs)
    finally:
        await connection.close()
    return timed, notes


async def vacuum_analyze(url: str) -> float:
    """VACUUM ANALYZE jobs, as a table that has lived a while is (visibility map, statistics); the seconds it took."""
    connection = await asyncpg.connect(url)
    start = time.perf_counter()
    try:
        await connection.execute("VACUUM ANALYZE jobs")
    finally:
        await connection.close()
    return round(time.perf_counter() - start, 1)


async def service_connection(url: str) -> asyncpg.Connection:
    """A connection set up as the service's pool sets up each of its own: asyncpg's statement cache
    on, so that the claim is a named prepared statement, which PostgreSQL may move to a generic plan."""
    connection = await asyncpg.connect(url, statement_cache_size=100)
    await setup_connection(connection)
    return connection


async def claim_once(connection: asyncpg.Connection) -> float:
    """CLAIM_JOBS as the worker runs it (20 slots, the default lease and attempts) in a transaction
    rolled back, so that the table stays as it was: the milliseconds it took, round trip included."""
    transaction = connection.transaction()
    await transaction.start()
    try:
        start = time.perf_counter()
        await connection.fetch(CLAIM_JOBS, 20, 30.0, 3)
        return round((time.perf_counter() - start) * 1000, 3)
    finally:
        await transaction.rollback()


async def claim_as_service(connection: asyncpg.Connection, runs: int) -> dict[str, Any]:
    """Run the claim `runs` times on a service_connection: the median time of the runs after the
    fifth (those the plan cache may give a generic plan; all runs if there are no more), the plan
    the last run used, and the plans the session's prepared claim has run so far."""
    times = [await claim_once(connection) for _ in range(runs - 1)]
    generic_before, _ = await connection.fetchrow(PLANS_OF, CLAIM_JOBS) or (0, 0)
    times.append(await claim_once(connection))
    generic, custom = await connection.fetchrow(PLANS_OF, CLAIM_JOBS)
    return {
        "ms": round(statistics.median(times[5:] or times), 3),
        "plan": "generic" if generic > generic_before else "custom",
        "generic_plans": generic,
        "custom_plans": custom,
    }


async def page_jobs(session: aiohttp.ClientSession, url: str) -> int:
    """How many jobs a listing's page holds."""
    async with session.get(url) as response:
        return len(await response.json())


def retention_rate(polls: list[tuple[float, int]]) -> tuple[float, float, float]:
    """From (seconds, rows still due) counts: rows deleted per second while deleting, and when
    deletion was first and last seen (between the last count before it and the first after it)."""
    first, final = polls[0][1], polls[-1][1]
    began = max((at for at, due in polls if due == first), default=0.0)
    ended = min((at for at, due in polls if due == final), default=0.0)
    if first == final or ended <= began:
        return 0.0, NAN, NAN
    return (first - final) / (ended - began), began, ended


async def trickle(
    session: aiohttp.ClientSession, url: str, completions: Completions, per_second: float, stop: asyncio.Event
) -> list[tuple[float, float] | BaseException]:
    """POST jobs at a steady rate until `stop`: for each, when its POST was answered and how long
    from then until it was completed (a claim's wait, the provider being instant)."""

    async def post() -> tuple[float, float]:
        """One job, followed to its completion."""
        async with session.post(url + "/generations", data=ONE_IMAGE, headers=JSON_HEADERS) as response:
            job_id = (await response.json())["jobId"]
        answered = time.perf_counter()
        completed = await asyncio.wait_for(completions.of(job_id), timeout=30)
        return answered, max(0.0, completed - answered)

    posts = []
    start = time.perf_counter()
    for number in range(1, 3600 * int(per_second)):  # bounded: an hour at most
        posts.append(asyncio.create_task(post()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, start + number / per_second - time.perf_counter()))
        if stop.is_set():
            break
    return await asyncio.gather(*posts, return_exceptions=True)


@dataclasses.dataclass
class ScaleBench:
    """How each cost grows with history (finished jobs) and backlog (pending jobs).

    The history grows in one database, smallest size first, appended in time order as a
    service's table grows. Each measurement runs in a copy of it (CREATE DATABASE ... TEMPLATE),
    backlog added there: so the history's own database never holds what a measurement leaves
    (dead rows, index pages at the right edge emptied of newer jobs, which would make every later
    append split pages in half). Retention, which deletes, runs in a copy too. A backlog arrives
    in its copy as a burst, watched (see watch_burst) before it is analyzed and measured.
    """

    bench: Bench  # its services, loads and plan (enqueue clients, windows, pickup jobs)
    scale: ScalePlan
    results: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    fills: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    retention: dict[str, Any] = dataclasses.field(default_factory=dict)
    bursts: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def say(self, text: str) -> None:
        """Progress, on stderr."""
        print(f"bench: {text}", file=sys.stderr, flush=True)

    async def run(self) -> None:
        """Every combination of history and backlog, smallest first; print each JSON line as it comes."""
        supported, note = await self.retention_supported()
        if not supported:
            self.retention = {"skipped": note}
            print(json.dumps({"scenario": "scale retention", **self.retention}), flush=True)
        timeline = Timeline.ending_now(HISTORY_SPAN, max(self.scale.histories))
        async with self.bench.database("scale") as url:
            connection = await asyncpg.connect(url)
            try:
                settings = {name: await connection.fetchval(f"SHOW {name}") for name in AUTOVACUUM_SETTINGS}
            finally:
                await connection.close()
            print(json.dumps({"scenario": "scale autovacuum", **settings}), flush=True)
            history = 0
            for size in self.scale.histories:
                if size > history:
                    what = f"history {count_text(history)} -> {count_text(size)}"
                    await self.fill(url, what, FILL_HISTORY, range(history, size), timeline)
                history = size
                sizes = await table_sizes(url, history)
                for backlog in self.scale.backlogs:
                    async with self.copy(url, "scale_measure") as copy:
                        if backlog:
                            self.bursts.append(await self.watch_burst(copy, history, backlog))
                            print(json.dumps({"scenario": "scale burst", **self.bursts[-1]}), flush=True)
                            self.say(f"backlog {count_text(backlog)} on history {count_text(history)}: VACUUM ANALYZE")
                            self.fills[-1]["vacuum_analyze_seconds"] = await vacuum_analyze(copy)
                        result = await self.measure(copy, history, backlog)
                    if not backlog:
                        result["sizes"] = sizes
                    result["ratios"] = scale_ratios(result, self.results[0] if self.results else result)
                    self.results.append(result)
                    print(json.dumps({"scenario": "scale", **result}), flush=True)
                if supported and history:
                    async with self.copy(url, "scale_retention") as copy:
                        self.retention[count_text(history)] = await self.measure_retention(copy, history)
                    print(
                        json.dumps(
                            {"scenario": "scale retention", "history": history, **self.retention[count_text(history)]}
                        ),
                        flush=True,
                    )

    async def fill(
        self, url: str, what: str, statement: str, rows: range, timeline: Timeline, analyze: bool = True
    ) -> None:
        """Insert rows in chunks, with progress on stderr; the time it took becomes a JSON line."""
        self.fills.append(await fill(url, what, statement, rows, timeline, self.scale.chunk, analyze))
        print(json.dumps({"scenario": "scale fill", **self.fills[-1]}), flush=True)

    async def watch_burst(self, url: str, history: int, backlog: int) -> dict[str, Any]:
        """A backlog that arrives at once, seen the way the service's worker sees it: on a connection
        set up as the service's, the claim runs scale.claim_runs times on the table without a backlog
        (so its plan is settled, as a polling worker's is), then just after `backlog` pending jobs are
        inserted (with no ANALYZE after them), then every burst_poll seconds until autovacuum has
        analyzed the table (last_autoanalyze) or burst_watch_seconds have passed (burst_not_due_seconds
        when its statistics say no analyze is due), and once more after the analyze. How long the
        analyze took to come bounds how long a plan made for the old statistics can last."""
        what = f"backlog {count_text(backlog)} on history {count_text(history)}"
        connection = await service_connection(url)
        try:
            self.say(f"{what}: the claim as the service runs it, before the burst")
            before = await claim_as_service(connection, self.scale.claim_runs)
            analyzed_before = (await connection.fetchrow(AUTOVACUUM_STATE))["autoanalyze_count"]
            await self.fill(url, what, FILL_BACKLOG, range(backlog), Timeline.ending_now(BACKLOG_SPAN, backlog), False)
            just_after = await claim_as_service(connection, 3)
            state = await connection.fetchrow(AUTOVACUUM_STATE)
            burst_end, due = state["now"], state["n_mod_since_analyze"] > state["analyze_threshold"]
            limit = self.scale.burst_watch_seconds if due else self.scale.burst_not_due_seconds
            self.say(f"{what}: waiting up to {limit:g} s for autovacuum to analyze jobs (due: {due})")
            polls, analyzed = [], None
            for _ in range(math.ceil(limit / self.scale.burst_poll)):  # bounded
                await asyncio.sleep(self.scale.burst_poll)
                claim = await claim_as_service(connection, 1)
                current = await connection.fetchrow(AUTOVACUUM_STATE)
                seconds = round((current["now"] - burst_end).total_seconds(), 1)
                polls.append({"s": seconds, "claim_ms": claim["ms"], "plan": claim["plan"]})
                if current["last_autoanalyze"] and current["last_autoanalyze"] > burst_end:
                    analyzed = round((current["last_autoanalyze"] - burst_end).total_seconds(), 1)
                    break
            after = await claim_as_service(connection, 3) if analyzed is not None else None
        finally:
            await connection.close()
        return {
            "history": history,
            "backlog": backlog,
            "reltuples": state["reltuples"],
            "n_mod_since_analyze": state["n_mod_since_analyze"],
            "analyze_threshold": state["analyze_threshold"],
            "analyze_due": due,
            # An autovacuum ANALYZE may come while the burst is still being inserted (between chunks).
            "autoanalyzes_during_burst": state["autoanalyze_count"] - analyzed_before,
            "watched_s": limit,
            "autoanalyzed_after_s": analyzed,  # None: not within the watch
            "claim_before": before,
            "claim_just_after": just_after,
            "claim_after_analyze": after,
            "polls": polls,
        }

    @contextlib.asynccontextmanager
    async def copy(self, url: str, name: str) -> AsyncIterator[str]:
        """A copy of the database at `url` (no one may be connected to it); dropped afterwards."""
        template = url.partition("?")[0].rsplit("/", 1)[1]
        admin = await asyncpg.connect(self.bench.server_url)
        try:
            # FILE_COPY copies the files as they are, rather than writing them all to the WAL.
            strategy = " STRATEGY FILE_COPY" if admin.get_server_version().major >= 15 else ""
            await admin.execute(f"DROP DATABASE IF EXISTS bench_{name} WITH (FORCE)")
            self.say(f"copying {template} to bench_{name}")
            await admin.execute(f"CREATE DATABASE bench_{name} TEMPLATE {template}{strategy}")
            yield database_url(self.bench.server_url, f"bench_{name}")
        finally:
            try:
                await admin.execute(f"DROP DATABASE IF EXISTS bench_{name} WITH (FORCE)")
            finally:
                await admin.close()

    async def measure(self, url: str, history: int, backlog: int) -> dict[str, Any]:
        """Everything one combination reports: the statements' plans and costs in the database, the
        claim as the service runs it, enqueue then reads over HTTP (WORKER_CONCURRENCY=0, so that
        the backlog stays; at B=0 the enqueue's jobs are completed in between, so that the reads
        see no pending job), pickup (at B=0 only: a worker would chew the backlog), and the share
        of HOT updates among the service's updates after the enqueue."""
        self.say(f"history {count_text(history)}, backlog {count_text(backlog)}: timing statements")
        ids = await sample_ids(url, self.scale.sample_ids)
        statements, skipped = await time_statements(url, ids[0] if ids else uuid.uuid4(), self.scale.explain_runs)
        connection = await service_connection(url)
        try:
            claim = await claim_as_service(connection, self.scale.claim_runs)
        finally:
            await connection.close()
        name = f"scale-{count_text(history)}-{count_text(backlog)}"
        async with self.bench.services(name, url, WORKER_CONCURRENCY=0) as [service]:
            self.say(f"history {count_text(history)}, backlog {count_text(backlog)}: enqueue and reads")
            since = await database_time(url)
            enqueue = (await self.bench.load([service], post_job, self.bench.plan.seconds)).summary()
            if not backlog:  # with a backlog, they are its newest part, as new jobs are
                enqueue["completed_before_reads"] = await self.complete_enqueued(url, since)
            updates_before = await update_counts(url)  # the service's own updates from here on
            reads = await self.reads(service, ids or await sample_ids(url, self.scale.sample_ids))
        result: dict[str, Any] = {"history": history, "backlog": backlog, "settings": self.settings()}
        result |= {"enqueue": enqueue, "reads": reads, "statements": statements, "skipped": skipped}
        result["claim_as_service"] = claim
        if backlog:
            result["pickup"] = {"skipped": "a worker would drain the backlog; see the claim statement's time"}
            return result
        env = {"IMAGE_PROVIDER_DELAY": 0}
        async with self.bench.services(f"{name}-pickup", url, **env) as [service]:
            # The enqueue's jobs are a backlog the worker completes first: pickup is from an empty queue.
            drained = await self.wait_until_drained(url)
            result["pickup"] = {**await self.bench.pickup_on(service, url), "enqueued_jobs_drained_s": drained}
        # The services have exited, so their backends have reported their counts.
        updates, hot = (after - before for after, before in zip(await update_counts(url), updates_before, strict=True))
        result["hot_updates"] = {"updates": updates, "hot": hot, "ratio": round(hot / updates, 3) if updates else NAN}
        return result

    async def wait_until_drained(self, url: str, within: float = 300.0) -> float:
        """Wait until no job is pending or processing (at most `within` seconds): the seconds it took."""
        connection = await asyncpg.connect(url)
        start = time.perf_counter()
        try:
            for _ in range(int(within / WATCH_INTERVAL)):  # bounded
                if not await connection.fetchval(QUEUED):
                    break
                await asyncio.sleep(WATCH_INTERVAL)
        finally:
            await connection.close()
        return round(time.perf_counter() - start, 1)

    async def reads(self, service: Service, ids: list[uuid.UUID]) -> dict[str, Any]:
        """GET one job by id (picked at random), the first page of three listings, and /metrics
        if the service has it; plan.read_clients clients each."""
        paths = [f"/generations/{job_id}" for job_id in ids]
        loads: dict[str, HttpRequest] = {
            "get job": lambda session, url: self.get(session, url + random.choice(paths)),
            **{label: partial(self.get_path, path) for label, path in LISTINGS.items()},
            "metrics": partial(self.get_path, "/metrics"),
        }
        async with http_session() as session:
            if await http_status(session.get(service.url + "/metrics")) != 200:
                del loads["metrics"]
            pages = {label: await page_jobs(session, service.url + path) for label, path in LISTINGS.items()}
        results = {}
        for label, request in loads.items():
            window = await self.bench.load([service], request, self.bench.plan.seconds, self.scale.read_clients)
            results[label] = window.summary() | ({"page_jobs": pages[label]} if label in pages else {})
        return results

    async def complete_enqueued(self, url: str, since: datetime) -> int:
        """Mark the enqueue's jobs (created since `since`) completed, as a worker would, so that the
        reads after it see no pending job at backlog 0 (no worker runs during the reads: with a
        backlog it would drain it). Returns how many; their statistics are flushed at once."""
        connection = await asyncpg.connect(url)
        try:
            done = await connection.execute(COMPLETE_ENQUEUED, since)
            await connection.execute("SELECT pg_stat_force_next_flush()")
        finally:
            await connection.close()
        return int(done.split()[-1])

    @staticmethod
    async def get(session: aiohttp.ClientSession, url: str) -> bool:
        """GET, expecting 200."""
        return await http_status(session.get(url)) == 200

    @classmethod
    async def get_path(cls, path: str, session: aiohttp.ClientSession, url: str) -> bool:
        """GET `path` of the service at `url`, expecting 200."""
        return await cls.get(session, url + path)

    def settings(self) -> dict[str, Any]:
        """The loads' settings."""
        plan = self.bench.plan
        return {
            "enqueue_clients": plan.clients,
            "read_clients": self.scale.read_clients,
            "warmup_s": plan.warmup,
            "seconds": plan.seconds,
            "pickup_jobs": plan.pickup_jobs,
            "service": self.bench.service_env(),
        }

    async def retention_supported(self) -> tuple[bool, str]:
        """Whether the service deletes old finished jobs: started with JOB_RETENTION_SECONDS=1 on
        a database of 100 jobs finished an hour ago, does it delete any within RETENTION_PROBE_SECONDS?
        (Skipped at once when app.py does not even mention the setting.)"""
        if "JOB_RETENTION_SECONDS" not in (ROOT / "app.py").read_text().upper():
            return False, "app.py has no JOB_RETENTION_SECONDS setting"
        self.say("does the service delete old jobs with JOB_RETENTION_SECONDS=1?")
        async with self.bench.database("scale_probe") as url:
            connection = await asyncpg.connect(url)
            try:
                hour_ago = Timeline.ending_now(timedelta(hours=1), 3600)
                await connection.execute(FILL_HISTORY, 0, 99, hour_ago.begin, hour_ago.spacing)
                try:
                    async with self.bench.services("scale-probe", url, JOB_RETENTION_SECONDS=1) as _:
                        for _ in range(int(RETENTION_PROBE_SECONDS / 0.5)):
                            if await connection.fetchval("SELECT count(*) FROM jobs") < 100:
                                return True, ""
                            await asyncio.sleep(0.5)
                except RuntimeError as error:  # the service refused to start
                    return False, f"the service does not start with JOB_RETENTION_SECONDS=1: {error}"[:2000]
            finally:
                await connection.close()
        return False, f"JOB_RETENTION_SECONDS=1 deleted no finished job within {RETENTION_PROBE_SECONDS:g} s"

    async def measure_retention(self, url: str, history: int) -> dict[str, Any]:
        """Rows deleted per second by JOB_RETENTION_SECONDS (set to keep RETENTION_KEPT_SHARE of the
        time the history spans: its oldest seventh is due), while a worker claims and completes
        trickle_per_second new jobs; and those jobs' waits from the POST's answer to completion
        while deletion went on.

        The rows still due are counted every RETENTION_POLL seconds, so deletion is known to have
        run between two counts: the rate is a lower bound, as close as the counts are frequent.
        """
        connection = await asyncpg.connect(url)
        try:
            now, oldest, newest = await connection.fetchrow(HISTORY_TIMES)
            keep = round((now - newest + (newest - oldest) * RETENTION_KEPT_SHARE).total_seconds())
            cutoff = now - timedelta(seconds=keep)
            env = {"JOB_RETENTION_SECONDS": keep, "IMAGE_PROVIDER_DELAY": 0}
            start = time.perf_counter()
            polls = [(0.0, await connection.fetchval(COUNT_OLDER, cutoff))]
            self.say(f"history {count_text(history)}: retention, {polls[0][1]:,} rows due")
            async with (
                self.bench.services(f"scale-{count_text(history)}-retention", url, **env) as [service],
                listening(url) as completions,
                http_session() as session,
            ):
                stop = asyncio.Event()
                posting = asyncio.create_task(
                    trickle(session, service.url, completions, self.scale.trickle_per_second, stop)
                )
                for _ in range(int(self.scale.retention_seconds / RETENTION_POLL)):  # bounded
                    polls.append((time.perf_counter() - start, await connection.fetchval(COUNT_OLDER, cutoff)))
                    if polls[-1][1] == 0:
                        break
                    await asyncio.sleep(RETENTION_POLL)
                stop.set()
                posted = await posting
        finally:
            await connection.close()
        rate, began, ended = retention_rate(polls)
        waits = [outcome for outcome in posted if not isinstance(outcome, BaseException)]
        during = [wait for answered, wait in waits if began <= answered - start <= ended]
        return {
            "settings": {"JOB_RETENTION_SECONDS": keep, "trickle_per_second": self.scale.trickle_per_second},
            "due": polls[0][1],
            "deleted": polls[0][1] - polls[-1][1],
            "rows_per_second": round(rate),
            # Seconds from the first count, taken before the service started.
            "deleting_from_s": round(began, 2),
            "deleting_until_s": round(ended, 2),
            "jobs": len(waits),
            "errors": len(posted) - len(waits),
            "claims_during_deletion": {
                "jobs": len(during),
                **percentiles_ms(during, 50, 99),
                "max_ms": round(max(during) * 1000, 1) if during else NAN,
            },
            "claims_all": {**percentiles_ms([wait for _, wait in waits], 50, 99)},
        }


def service_ms(timed: dict[str, Any]) -> float:
    """A timed statement's execution time under the plan the service gets."""
    return timed[timed["service_plan"]]["ms"]


def scale_latencies(result: dict[str, Any]) -> dict[str, float]:
    """The latencies in ms that the SCALE_LATENCY_RATIO target covers, by name; absent if not measured.

    Not the claim statement's: on empty tables it claims nothing, so a ratio would say little; it
    has a target of its own (CLAIM_MS_AT_BACKLOG).
    """
    found = {"enqueue p50": result["enqueue"]["p50_ms"]}
    if "p50_ms" in result["pickup"]:
        found |= {"pickup p50": result["pickup"]["p50_ms"], "pickup p99": result["pickup"]["p99_ms"]}
    return found | {f"{label} p50": read["p50_ms"] for label, read in result["reads"].items()}


def scale_ratios(result: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float]:
    """Each latency over its value on the empty tables; NaN for a listing whose page held another
    number of jobs there (no failed job on empty tables: an empty page), as that compares little."""
    base = scale_latencies(baseline)
    ratios = {name: ratio_to(ms, base.get(name, NAN)) for name, ms in scale_latencies(result).items()}
    for label, read in result["reads"].items():
        if read.get("page_jobs") != baseline["reads"].get(label, {}).get("page_jobs"):
            ratios[f"{label} p50"] = NAN
    return ratios


def with_ratio(value: float, ratio: float, unit: str = " ms") -> str:
    """A number and its ratio to the empty tables' value, the ratio in bold when over the target."""
    if math.isnan(ratio):
        return f"{value:g}{unit}"
    shown = f"{ratio:g}x"
    return f"{value:g}{unit} ({f'**{shown}**' if ratio > SCALE_LATENCY_RATIO else shown})"


def scale_http_table(results: list[dict[str, Any]]) -> list[str]:
    """One row per combination: the HTTP latencies, each with its ratio to the empty tables'."""
    columns = ["enqueue p50", "pickup p50", "pickup p99", "get job p50", "list p50"]
    columns += ["list failed p50", "list pending p50", "metrics p50"]
    lines = [
        "| history | backlog | enqueue req/s | " + " | ".join(columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for result in results:
        latencies, ratios = scale_latencies(result), result["ratios"]
        cells = [with_ratio(latencies[name], ratios[name]) if name in latencies else "-" for name in columns]
        rate = f"{result['enqueue']['per_second']:,.0f}"
        lines.append(
            f"| {count_text(result['history'])} | {count_text(result['backlog'])} | {rate} | {' | '.join(cells)} |"
        )
    return lines


def scale_cpu_table(results: list[dict[str, Any]]) -> list[str]:
    """One row per combination: PostgreSQL's CPU per request of each HTTP load, with its ratio to the
    empty tables'. Steadier than latency on a shared machine; shown, not judged."""
    loads = list(dict.fromkeys(["enqueue", *(label for result in results for label in result["reads"])]))
    lines = ["| history | backlog | " + " | ".join(loads) + " |", "|---|---|" + "---|" * len(loads)]

    def cpu(result: dict[str, Any], load: str) -> float:
        """PostgreSQL's CPU ms per request of one load (NaN if not run or not measured)."""
        measured = result["enqueue"] if load == "enqueue" else result["reads"].get(load, {})
        return measured.get("cpu_ms_per_request", {}).get("postgres", NAN)

    for result in results:
        cells = [with_ratio(cpu(result, load), ratio_to(cpu(result, load), cpu(results[0], load))) for load in loads]
        lines.append(f"| {count_text(result['history'])} | {count_text(result['backlog'])} | {' | '.join(cells)} |")
    return lines


def scale_statement_table(results: list[dict[str, Any]]) -> list[str]:
    """One row per statement and combination: its time and buffers, custom and generic, and the plan it gets."""
    lines = [
        "| statement | history | backlog | service gets | custom ms / buffers | generic ms / buffers | its plan "
        "| the other plan, if another |",
        "|---|---|---|---|---|---|---|---|",
    ]
    labels = list(dict.fromkeys(label for result in results for label in result["statements"]))
    for label in labels:
        for result in results:
            if not (timed := result["statements"].get(label)):
                continue
            custom, generic = timed["custom"], timed["generic"]
            chosen, other = (custom, generic) if timed["service_plan"] == "custom" else (generic, custom)
            lines.append(
                f"| {label} | {count_text(result['history'])} | {count_text(result['backlog'])} "
                f"| {timed['service_plan']} | {custom['ms']:g} / {custom['buffers']} "
                f"| {generic['ms']:g} / {generic['buffers']} | {chosen['plan']} "
                f"| {other['plan'] if other['plan'] != chosen['plan'] else ''} |"
            )
    return lines


def scale_size_table(results: list[dict[str, Any]]) -> list[str]:
    """One row per history size: the table's size, all and by part, and per million finished jobs."""
    sized = [result for result in results if "sizes" in result]
    parts = list(dict.fromkeys(part for result in sized for part in result["sizes"]["mb"]))
    lines = ["| history | " + " | ".join(f"{part} MB" for part in parts) + " |", "|---|" + "---|" * len(parts)]
    for result in sized:
        mb, per_million = result["sizes"]["mb"], result["sizes"].get("mb_per_million", {})
        cells = [
            f"{mb.get(part, NAN):g}" + (f" ({per_million[part]:g}/M)" if part in per_million else "") for part in parts
        ]
        lines.append(f"| {count_text(result['history'])} | {' | '.join(cells)} |")
    return lines


def scale_targets(results: list[dict[str, Any]], retention: dict[str, Any]) -> list[str]:
    """Each target, where it applies, with the value found and whether it is met."""
    lines = ["| target | at | found | met |", "|---|---|---|---|"]

    def row(target: str, at: str, found: str, met: bool | None) -> None:
        lines.append(f"| {target} | {at} | {found} | {'' if met is None else 'yes' if met else '**no**'} |")

    for result in results:
        at = f"history {count_text(result['history'])}, backlog {count_text(result['backlog'])}"
        judged = {
            name: ratio for name, ratio in result["ratios"].items() if not math.isnan(ratio) and name not in UNJUDGED
        }
        if result is not results[0] and judged:
            worst = max(judged, key=judged.__getitem__)
            met = judged[worst] <= SCALE_LATENCY_RATIO
            row(
                f"every latency <= {SCALE_LATENCY_RATIO:g} x empty tables",
                at,
                f"worst: {worst} {judged[worst]:g}x",
                met,
            )
        if result["backlog"] and (claim := result["statements"].get(CLAIM_STATEMENT)):
            ms = service_ms(claim)
            found = f"{ms:g} ms ({claim['service_plan']} plan)"
            row(f"claim statement <= {CLAIM_MS_AT_BACKLOG:g} ms", at, found, ms <= CLAIM_MS_AT_BACKLOG)
        if result["backlog"] and (metrics := result["reads"].get("metrics")):
            found = f"{metrics['p50_ms']:g} ms"
            row(f"GET /metrics p50 <= {METRICS_P50_MS:g} ms", at, found, metrics["p50_ms"] <= METRICS_P50_MS)
    target = f"retention >= {RETENTION_ROWS_PER_SECOND:,} rows/s, claims p99 <= {RETENTION_CLAIM_P99_MS:g} ms"
    if "skipped" in retention:
        row(target, "", f"skipped: {retention['skipped']}", None)
    for history, measured in retention.items():
        if history != "skipped":
            claims, rate = measured["claims_during_deletion"], measured["rows_per_second"]
            found = f"{rate:,} rows/s, claims p99 {claims['p99_ms']} ms, longest {claims['max_ms']} ms"
            met = rate >= RETENTION_ROWS_PER_SECOND and claims["p99_ms"] <= RETENTION_CLAIM_P99_MS
            row(target, f"history {history}", found, met)
    return lines


def scale_claim_table(results: list[dict[str, Any]]) -> list[str]:
    """One row per combination: the claim as the service runs it (asyncpg's prepared statement), and
    the estimated costs the plan cache weighs: it keeps the generic plan when that costs less than
    the custom plans did on average (planning included)."""
    lines = [
        "| history | backlog | service's claim: plan | ms (round trip) | custom cost / ms | generic cost / ms |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        claim, timed = result.get("claim_as_service"), result["statements"].get(CLAIM_STATEMENT)
        if not claim or not timed:
            continue
        custom, generic = timed["custom"], timed["generic"]
        lines.append(
            f"| {count_text(result['history'])} | {count_text(result['backlog'])} "
            f"| {claim['plan']} ({claim['generic_plans']} generic, {claim['custom_plans']} custom runs) "
            f"| {claim['ms']:g} | {custom['cost']:g} / {custom['ms']:g} | {generic['cost']:g} / {generic['ms']:g} |"
        )
    return lines


def claim_text(claim: dict[str, Any] | None) -> str:
    """A claim_as_service result in a few words."""
    return "-" if not claim else f"{claim['ms']:g} ms, {claim['plan']}"


def scale_burst_table(bursts: list[dict[str, Any]]) -> list[str]:
    """One row per burst: the claim before it, just after it, and after autovacuum's ANALYZE."""
    lines = [
        "| history | burst | claim before | just after | slowest while waiting | ANALYZE due? | autoanalyze after "
        "| claim after it |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for burst in bursts:
        due = f"{'yes' if burst['analyze_due'] else 'no'}: {burst['n_mod_since_analyze']:,} changed rows"
        due += f" vs threshold {burst['analyze_threshold']:,.0f}"
        if during := burst.get("autoanalyzes_during_burst"):
            due += f" ({during} ANALYZE during the burst)"
        analyzed = burst["autoanalyzed_after_s"]
        waited = f"{analyzed:g} s" if analyzed is not None else f"not within {burst['watched_s']:g} s"
        slowest = max(burst["polls"], key=lambda poll: poll["claim_ms"], default=None)
        worst = f"{slowest['claim_ms']:g} ms, {slowest['plan']}" if slowest else "-"
        lines.append(
            f"| {count_text(burst['history'])} | {count_text(burst['backlog'])} | {claim_text(burst['claim_before'])} "
            f"| {claim_text(burst['claim_just_after'])} | {worst} | {due} | {waited} "
            f"| {claim_text(burst['claim_after_analyze'])} |"
        )
    return lines


def scale_markdown(
    results: list[dict[str, Any]], fills: list[dict[str, Any]], retention: dict[str, Any], bursts: list[dict[str, Any]]
) -> str:
    """The scale run as markdown: HTTP latencies, the statements, the claim's plans, the sizes, the targets."""
    hot = [
        f"history {count_text(r['history'])}: {r['hot_updates']['ratio']:g} of {r['hot_updates']['updates']:,}"
        for r in results
        if "hot_updates" in r
    ]
    filled = [f"{fill['what']}: {fill['seconds']:g} s ({fill['rows_per_second']:,} rows/s)" for fill in fills]
    skipped = results[0]["skipped"] if results else []
    return "\n".join(
        [
            f"Ratios: to the empty tables (history 0, backlog 0) of this run; over {SCALE_LATENCY_RATIO:g}x in bold.",
            "Pickup needs a worker, which would drain a backlog: it is measured at backlog 0 only.",
            "At backlog 0 the enqueue's jobs are marked completed before the reads; with a backlog they stay"
            " pending, its newest part (about 1.5% of 1M).",
            "A listing whose page held another number of jobs on the empty tables has no ratio (`?status=failed`).",
            "/metrics counts pending jobs up to a bound: its ratio is shown, its own target judges it.",
            "The statements run under EXPLAIN ANALYZE in transactions rolled back; `service gets` is the plan"
            f" PostgreSQL settles on by the {AUTO_PLAN_RUNS}th execution of the prepared statement.",
            "",
            *scale_http_table(results),
            "",
            "PostgreSQL's CPU per request, ms (steadier than latency on a shared machine; not judged):",
            "",
            *scale_cpu_table(results),
            "",
            *scale_statement_table(results),
            "",
            "The claim as the service runs it (asyncpg's named prepared statement, after"
            " the runs a polling worker makes), and the costs the plan cache compares:",
            "",
            *scale_claim_table(results),
            "",
            "A backlog's burst (no ANALYZE after it) seen by the claim of a connection set up as the"
            " service's, whose plan was settled on the table without it:",
            "",
            *scale_burst_table(bursts),
            "",
            *scale_size_table(results),
            "",
            *scale_targets(results, retention),
            "",
            "HOT updates / the service's updates (its claims and completions during pickup, backlog 0): "
            + ("; ".join(hot) or "none"),
            "",
            "Fills (insert and VACUUM ANALYZE): " + ("; ".join(filled) or "none"),
            "",
            "Statements not timed: " + ("; ".join(skipped) or "none"),
        ]
    )


# --- Main ----------------------------------------------------------------------------------


async def setup(server_url: str, plan: Plan, env: dict[str, str]) -> dict[str, Any]:
    """What this run runs on: the machine, PostgreSQL, the generator and the service settings."""
    connection = await asyncpg.connect(server_url)
    try:
        settings = ("server_version", "fsync", "synchronous_commit", "shared_buffers", "max_connections")
        postgres = {name: await connection.fetchval(f"SHOW {name}") for name in settings}
    finally:
        await connection.close()
    return {
        "scenario": "setup",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "loadavg_before": os.getloadavg(),
        "python": platform.python_version(),
        "postgres": postgres,
        "generator_loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
        "service_speedups_installed": {name: find_spec(name) is not None for name in ("uvloop", "httptools")},
        "service_env": env,
        "plan": dataclasses.asdict(plan),
    }


@dataclasses.dataclass
class LoadWatch:
    """The machine's 1-minute load average, sampled while the bench runs. The bench's own load is
    in it: on a small machine the bench keeps every core busy while it measures."""

    every: float = 5.0  # seconds between two samples
    samples: list[float] = dataclasses.field(default_factory=list)

    async def run(self) -> None:
        """Sample until cancelled (a day at most)."""
        for _ in range(int(86_400 / self.every)):
            self.samples.append(os.getloadavg()[0])
            await asyncio.sleep(self.every)

    def summary(self) -> dict[str, float]:
        """The samples' mean and highest, and the last."""
        if not self.samples:
            return {}
        mean = statistics.mean(self.samples)
        return {"mean": round(mean, 2), "max": round(max(self.samples), 2), "end": round(self.samples[-1], 2)}


def header(context: dict[str, Any], load: dict[str, float], seconds: float) -> str:
    """When and where the run ran, and how busy the machine was: the line above the tables."""
    before = ", ".join(f"{value:.2f}" for value in context["loadavg_before"])
    return (
        f"{context['date']}, {context['cores']} cores, PostgreSQL {context['postgres']['server_version']},"
        f" Python {context['python']}; load average before the run {before} (1, 5, 15 min), during it"
        f" {load.get('mean', NAN):g} on average, {load.get('max', NAN):g} at most (the bench's own included);"
        f" the run took {seconds:.0f} s."
    )


async def bench(server_url: str, postmaster: int | None, plan: Plan, args: argparse.Namespace) -> None:
    """Run the rounds, print each scenario's JSON line as it ends, then the table of medians."""
    # SIGTERM unwinds like Ctrl-C does, so that every service started is stopped.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)  # type: ignore[union-attr]
    context = await setup(server_url, plan, args.env)
    print(json.dumps(context), flush=True)
    load = LoadWatch()
    watching = asyncio.create_task(load.run())
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-logs-") as logs:
            if args.scale:
                print(json.dumps({"scenario": "scale plan", **dataclasses.asdict(args.scale)}), flush=True)
                scale = ScaleBench(Bench(server_url, postmaster, plan, Path(logs), args.env), args.scale)
                await scale.run()
            else:
                rounds = []
                for number in range(1, args.repeat + 1):
                    print(f"bench: round {number} of {args.repeat}", file=sys.stderr, flush=True)
                    rounds.append(await Bench(server_url, postmaster, plan, Path(logs), args.env).run_round(args.only))
    finally:
        watching.cancel()
    seconds = time.perf_counter() - started
    print(json.dumps({"scenario": "end", "seconds": round(seconds), "loadavg": load.summary()}), flush=True)
    print(f"bench: the run took {seconds:.0f} s", file=sys.stderr, flush=True)
    print()
    print(header(context, load.summary(), seconds))
    print()
    if args.scale:
        print(scale_markdown(scale.results, scale.fills, scale.retention, scale.bursts))
    else:
        print(markdown(median_of(rounds), args.repeat))


GROUPS = ("ceiling", "health", "enqueue", "batch", "read", "pickup", "pgbouncer", "drain", "slow", "replicas")


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short windows and few jobs: a sanity run")
    parser.add_argument("--repeat", type=int, default=1, help="rounds to run; the table shows medians")
    parser.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated subset of: {', '.join(GROUPS)}")
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="for every service; repeatable"
    )
    parser.add_argument("--scale", action="store_true", help="the scale run instead: costs as history and backlog grow")
    parser.add_argument("--scale-sizes", metavar="N,N", help="finished jobs, e.g. 0,100k,1M (default 0,1M,10M)")
    parser.add_argument("--scale-backlogs", metavar="N,N", help="pending jobs, e.g. 0,100k (default 0,1M)")
    parser.add_argument("--serve-provider", metavar="PORT:DELAY", help=argparse.SUPPRESS)  # the stand-in provider
    args = parser.parse_args()
    if args.serve_provider:
        return args
    if (args.scale_sizes or args.scale_backlogs) and not args.scale:
        parser.error("--scale-sizes and --scale-backlogs go with --scale")
    if args.scale and args.repeat != 1:
        parser.error("--scale runs once: no --repeat")
    if args.scale:
        args.scale = SCALE_QUICK if args.quick else ScalePlan()
        try:
            for field, given in (("histories", args.scale_sizes), ("backlogs", args.scale_backlogs)):
                if given:  # 0 is always measured: it is what the ratios compare with
                    args.scale = dataclasses.replace(args.scale, **{field: sizes_from(given)})
        except ValueError as error:
            parser.error(f"--scale-sizes and --scale-backlogs take counts like 0,100k,1M: {error}")
    args.only = set(args.only.split(","))
    if unknown := args.only - set(GROUPS):
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    if malformed := [setting for setting in args.env if "=" not in setting]:
        parser.error(f"--env takes NAME=VALUE, got {', '.join(malformed)}")
    args.env = dict(setting.split("=", 1) for setting in args.env)
    return args


def sizes_from(text: str) -> tuple[int, ...]:
    """Comma-separated row counts, sorted, with 0 added."""
    counts = {parse_count(part) for part in text.split(",") if part.strip()}
    if any(count < 0 for count in counts):
        raise ValueError("a count below 0")
    return tuple(sorted(counts | {0}))


def check_room(scale: ScalePlan, folder: str) -> None:
    """Refuse a scale run that would fill the disk: the history, a copy of it with the backlog, some WAL."""
    needed = (2 * max(scale.histories) + max(scale.backlogs)) * BYTES_PER_JOB + 2 * 2**30
    free = shutil.disk_usage(folder).free
    if needed > free:
        sys.exit(
            f"bench: the scale run needs about {needed / 2**30:.1f} GB in {folder}, {free / 2**30:.1f} GB are free:"
            " give smaller --scale-sizes or --scale-backlogs"
        )


def main() -> None:
    """Start PostgreSQL (unless DATABASE_URL names one), run the bench, stop everything."""
    args = parse_args()
    if args.serve_provider:
        port, delay = args.serve_provider.split(":")
        serve_provider(int(port), float(delay))
        return
    plan = QUICK if args.quick else Plan()
    if args.scale:
        plan = SCALE_QUICK_LOAD if args.quick else SCALE_LOAD
    try:
        import uvloop  # the generator should cost as little CPU as it can: the service needs it

        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with contextlib.ExitStack() as stack:
        server_url, postmaster = os.environ.get("DATABASE_URL"), None
        if not server_url:
            if args.scale:
                check_room(args.scale, tempfile.gettempdir())
            pgdata = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-pg-"))) / "data"
            server = EmbeddedPostgres(pgdata, delete_on_exit=True)
            stack.callback(server.close)
            server_url = server.url
            postmaster = int((pgdata / "postmaster.pid").read_text().split()[0])
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            try:
                runner.run(bench(server_url, postmaster, plan, args))
            except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C, SIGTERM: the services are stopped
                sys.exit("bench: interrupted")


if __name__ == "__main__":
    main()
