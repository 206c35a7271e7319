#!/usr/bin/env python3
"""The benchmark: the service as users run it (a real uvicorn process), driven over HTTP.

    .venv/bin/python bench/run.py              every scenario once (about four minutes)
    .venv/bin/python bench/run.py --repeat 3   three rounds; the table shows the medians
    .venv/bin/python bench/run.py --quick      short windows and few jobs: a sanity run
    .venv/bin/python bench/run.py --only enqueue,pickup --env DB_POOL_MAX_SIZE=20

It starts its own PostgreSQL (the embedded one, or the server DATABASE_URL names, whose role
must be allowed to create databases) and gives each scenario a fresh database. This process
is the load generator (aiohttp); every service is a process of its own. Each scenario prints
one JSON line with its settings and results; a markdown table of the targets follows.

    ceiling        32 asyncpg connections run the service's own INSERT ... RETURNING, no HTTP:
                   the most jobs per second this machine accepts (also shown without triggers)
    health         GET /health: how fast this generator can go, so that it is known not to be
                   what limits the numbers below
    enqueue        32 clients POST {"numImages": 1}          >= 0.7 x ceiling, <= 1 ms service CPU each
    read           32 clients GET /generations/<id>
    pickup         idle service: POST's response -> completed     p50 <= 5 ms, p99 <= 20 ms
    drain          queued jobs completed per second              >= 1.0 x ceiling
    slow provider  IMAGE_PROVIDER_DELAY=2, WORKER_CONCURRENCY=100   >= 0.9 x 50 jobs/s, 0 failed
    two replicas   enqueue and drain with two service processes: the ratio to one
    memory         the services' peak RSS (VmHWM)               <= 80 MB

The targets compare numbers of the same round, because the machine is shared: PostgreSQL,
the services and this generator run on the same cores, and so may other programs. Each load
window reports the cores every party kept busy ("other" is everything else on the machine)
and the CPU milliseconds each spent per request or job.
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
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app import INSERT_JOB  # noqa: E402  the ceiling runs the very statement the service runs
from scripts.pg import EmbeddedPostgres  # noqa: E402
from scripts.service import Service  # noqa: E402

SCHEMA = (ROOT / "schema.sql").read_text()
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
JSON_HEADERS = {"Content-Type": "application/json"}
ONE_IMAGE = b'{"numImages": 1}'
NAN = float("nan")  # a rate or percentile of nothing

# Queue jobs the way a burst of POSTs would, in one statement.
QUEUE_JOBS = "INSERT INTO jobs (num_images) SELECT 1 FROM generate_series(1, $1)"
# Wake the workers as the service does for new jobs; harmless when a trigger did already.
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

# The targets, from the issue.
ENQUEUE_TO_CEILING, ENQUEUE_CPU_MS = 0.7, 1.0
DRAIN_TO_CEILING = 1.0
PICKUP_P50_MS, PICKUP_P99_MS = 5.0, 20.0
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
    read_jobs: int = 10_000
    pickup_jobs: int = 200
    pickup_gap: float = 0.02  # between two pickup jobs, so that each finds the service idle
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
    """CPU time of a PostgreSQL server so far: the postmaster and every process it started."""
    total = cpu_seconds(postmaster)
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
    """Reads the CPU seconds used so far by the services, PostgreSQL and this generator."""

    services: list[Service]
    postmaster: int | None  # None: PostgreSQL is not ours to measure (DATABASE_URL)

    def read(self) -> dict[str, float]:
        """CPU seconds per party, now; "other" is the rest of the machine (other programs, the kernel)."""
        times = os.times()
        seconds = {
            "service": sum(cpu_seconds(service.pid()) for service in self.services),
            "generator": times.user + times.system,
        }
        if self.postmaster is not None:
            seconds["postgres"] = postgres_cpu_seconds(self.postmaster)
        seconds["other"] = machine_busy_seconds() - sum(seconds.values())
        return seconds


def cpu_shares(
    before: dict[str, float], after: dict[str, float], seconds: float, done: int, unit: str
) -> dict[str, dict[str, float]]:
    """The cores each party kept busy over `seconds`, and the CPU milliseconds it spent per `unit`."""
    used = {party: after[party] - before[party] for party in before}
    if not seconds or not done:
        return {}
    return {
        "cores": {party: round(cpu / seconds, 2) for party, cpu in used.items()},
        f"cpu_ms_per_{unit}": {party: round(cpu * 1000 / done, 3) for party, cpu in used.items() if party != "other"},
    }


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
    latencies: list[float] = dataclasses.field(default_factory=list)
    errors: int = 0
    measuring: bool = False
    over: bool = False
    seconds: float = 0.0
    cpu_before: dict[str, float] = dataclasses.field(default_factory=dict)
    cpu_after: dict[str, float] = dataclasses.field(default_factory=dict)

    async def run(self, operations: list[Operation], warmup: float, seconds: float) -> None:
        """Run every operation back to back in its own task; keep what ends inside the window."""
        tasks = [asyncio.create_task(self._loop(operation)) for operation in operations]
        try:
            await asyncio.sleep(warmup)  # connections opened, statements prepared, caches warm
            self.cpu_before, start = self.meter.read(), time.perf_counter()
            self.measuring = True
            await asyncio.sleep(seconds)
            self.measuring = False
            self.seconds = time.perf_counter() - start
            self.cpu_after = self.meter.read()
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
        """Rate, latency percentiles, errors, and the CPU each party used meanwhile."""
        done = len(self.latencies)
        return {
            f"{unit}s": done,
            "per_second": round(done / self.seconds, 1),
            **percentiles_ms(self.latencies, 50, 99),
            "errors": self.errors,
            **cpu_shares(self.cpu_before, self.cpu_after, self.seconds, done, unit),
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
    """When each job ended, as heard on `generations_done` (its payload is the job id)."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}
        self.waiting: dict[str, asyncio.Future[float]] = {}

    def arrived(self, connection: object, pid: int, channel: str, job_id: str) -> None:
        """asyncpg's listener callback: note the moment, wake whoever waits for this job."""
        self.at[job_id] = time.perf_counter()
        if (waiter := self.waiting.pop(job_id, None)) and not waiter.done():
            waiter.set_result(self.at[job_id])

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
    async def services(self, name: str, url: str, count: int = 1, **env: float) -> AsyncIterator[list[Service]]:
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

    def service_env(self, **env: float) -> dict[str, Any]:
        """What a service is given beyond its defaults: --env, then the scenario's own settings."""
        return {**self.env, **env}

    def meter(self, services: list[Service]) -> CpuMeter:
        """A CPU meter for these services, PostgreSQL (when it is ours) and this process."""
        return CpuMeter(services, self.postmaster)

    async def load(self, services: list[Service], request: HttpRequest, seconds: float) -> Window:
        """`plan.clients` HTTP clients, spread evenly over the services, each sending `request`."""
        window = Window(self.meter(services))
        async with http_session() as session:
            clients = [partial(request, session, services[i % len(services)].url) for i in range(self.plan.clients)]
            await window.run(clients, self.plan.warmup, seconds)
        return window

    def http_settings(self, seconds: float, **more: Any) -> dict[str, Any]:
        """An HTTP load's settings, and whatever else the scenario sets."""
        return {"clients": self.plan.clients, "warmup_s": self.plan.warmup, "seconds": seconds, **more}

    def ratio(self, result: dict[str, Any], baseline: str) -> float:
        """This result's rate over the baseline scenario's in this round (NaN if it did not run)."""
        if baseline not in self.results:
            return NAN
        return round(result["per_second"] / self.results[baseline]["per_second"], 3)

    # Scenarios: each returns its settings and results.

    async def ceiling(self, triggers: bool = True) -> dict[str, Any]:
        """32 asyncpg connections run single-row INSERT ... RETURNING: no HTTP, no service."""
        async with self.database("ceiling") as url:
            connections = [await asyncpg.connect(url) for _ in range(self.plan.clients)]
            try:
                if not triggers:  # shows what the NOTIFY of each new job costs
                    await connections[0].execute("ALTER TABLE jobs DISABLE TRIGGER USER")

                async def insert(connection: asyncpg.Connection) -> bool:
                    """Accept one job as the service does."""
                    return await connection.fetchrow(INSERT_JOB, 1, None) is not None

                window = Window(self.meter([]))
                await window.run([partial(insert, c) for c in connections], self.plan.warmup, self.plan.seconds)
            finally:
                await asyncio.gather(*(connection.close() for connection in connections))
        settings = {
            "connections": self.plan.clients,
            "warmup_s": self.plan.warmup,
            "seconds": self.plan.seconds,
            "statement": "app.INSERT_JOB",
            "triggers": triggers,
        }
        return {"settings": settings, **window.summary("insert")}

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
        """POST {"numImages": 1} from every client."""
        result = await self.http("enqueue", post_job, self.plan.seconds)
        return {**result, "ratio_to_ceiling": self.ratio(result, "ceiling")}

    async def enqueue_two_replicas(self) -> dict[str, Any]:
        """Enqueue, the clients split over two service processes."""
        result = await self.http("enqueue_replicas", post_job, self.plan.seconds, replicas=2)
        return {**result, "ratio_to_one": self.ratio(result, "enqueue")}

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
        """Jobs posted one at a time to an idle service: from the POST's response to completed."""
        env = {"IMAGE_PROVIDER_DELAY": 0}
        warmup_jobs = 10  # the pool opens connections and prepares statements on first use
        latencies: list[float] = []
        from_post: list[float] = []  # the whole way, for the POST's own share of it
        early = 0
        async with (
            self.database("pickup") as url,
            self.services("pickup", url, **env) as [service],
            listening(url) as completions,
            http_session() as session,
        ):
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
                await asyncio.sleep(self.plan.pickup_gap)
        settings = {"jobs": self.plan.pickup_jobs, "gap_s": self.plan.pickup_gap, "service": self.service_env(**env)}
        return {
            "settings": settings,
            **percentiles_ms(latencies, 50, 90, 99),
            # Completions heard before the POST's answer was read count as 0 ms above; this many.
            "completed_before_response": early,
            "from_post": percentiles_ms(from_post, 50, 90, 99),
        }

    async def complete(self, name: str, jobs: int, replicas: int = 1, **env: float) -> dict[str, Any]:
        """Queue `jobs` jobs in one statement for running services; time until all have ended.

        The time runs on PostgreSQL's clock, from just after the jobs were committed to the
        last completed_at, so that watching (a count every WATCH_INTERVAL) adds no error.
        """
        async with self.database(name) as url, self.services(name, url, replicas, **env) as services:
            meter = self.meter(services)
            connection = await asyncpg.connect(url)
            try:
                await connection.execute(QUEUE_JOBS, jobs)
                queued = await connection.fetchval("SELECT clock_timestamp()")
                before = meter.read()
                await connection.execute(ANNOUNCE_NEW_JOBS)
                for _ in range(int((60 + jobs / 50) / WATCH_INTERVAL)):  # bounded: a stuck service ends the wait
                    if await connection.fetchval(ENDED_JOBS) >= jobs:
                        break
                    await asyncio.sleep(WATCH_INTERVAL)
                after = meter.read()
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

    async def slow_provider(self) -> dict[str, Any]:
        """A provider that takes plan.slow_delay seconds, with plan.slow_concurrency slots."""
        plan = self.plan
        env = {"WORKER_CONCURRENCY": plan.slow_concurrency, "IMAGE_PROVIDER_DELAY": plan.slow_delay}
        result = await self.complete("slow", plan.slow_jobs, **env)
        ideal = plan.slow_concurrency / plan.slow_delay
        return {**result, "ideal_per_second": ideal, "ratio_to_ideal": round(result["per_second"] / ideal, 3)}

    async def run_round(self, only: set[str]) -> dict[str, dict[str, Any]]:
        """Every selected scenario once, each ratio's baseline first; print each result as it comes."""
        drains = self.plan.drain_concurrency
        scenarios: list[tuple[str, str, Callable[[], Awaitable[dict[str, Any]]]]] = [
            ("ceiling", "ceiling", self.ceiling),
            ("ceiling without triggers", "ceiling", partial(self.ceiling, triggers=False)),
            ("health", "health", self.health),
            ("enqueue", "enqueue", self.enqueue),
            ("read", "read", self.read),
            ("pickup", "pickup", self.pickup),
            *((f"drain c={c}", "drain", partial(self.drain, c)) for c in drains),
            ("slow provider", "slow", self.slow_provider),
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


def describe(label: str, r: dict[str, Any], results: dict[str, dict[str, Any]]) -> tuple[str, str, bool | None]:
    """A scenario's result in words, its target, and whether it is met (None: no target to judge)."""
    if label.startswith("ceiling"):
        return f"{r['per_second']:,.0f} inserts/s, p50 {r['p50_ms']} ms", "", None
    if label == "health":
        fastest = max(results.get(s, {}).get("per_second", 0) for s in ("enqueue", "read"))
        text = f"{r['per_second']:,.0f} req/s, generator at {r['cores']['generator']} cores"
        if not fastest:
            return text, "", None
        text += f" = {r['per_second'] / fastest:.1f} x the faster of enqueue and read"
        return text, f">= {HEALTH_HEADROOM} x enqueue, read", r["per_second"] >= HEALTH_HEADROOM * fastest
    if label in ("enqueue", "read"):
        cpu = r["cpu_ms_per_request"]["service"]
        text = f"{r['per_second']:,.0f} req/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, service {cpu} ms CPU/req"
        if label == "read":
            return text, "", None
        ratio = r["ratio_to_ceiling"]
        met = None if math.isnan(ratio) else ratio >= ENQUEUE_TO_CEILING and cpu <= ENQUEUE_CPU_MS
        return f"{text}; {ratio} x ceiling", f">= {ENQUEUE_TO_CEILING} x ceiling, <= {ENQUEUE_CPU_MS:g} ms CPU/req", met
    if label == "pickup":
        met = r["p50_ms"] <= PICKUP_P50_MS and r["p99_ms"] <= PICKUP_P99_MS
        text = f"p50 {r['p50_ms']} ms, p90 {r['p90_ms']} ms, p99 {r['p99_ms']} ms"
        return text, f"p50 <= {PICKUP_P50_MS:g} ms, p99 <= {PICKUP_P99_MS:g} ms", met
    if label.startswith("drain"):
        ratio = r["ratio_to_ceiling"]
        met = None if math.isnan(ratio) else ratio >= DRAIN_TO_CEILING and not r["failed"]
        text = f"{r['per_second']:,.0f} jobs/s, {r['failed']} failed; {ratio} x ceiling"
        return text, f">= {DRAIN_TO_CEILING} x ceiling", met
    if label == "slow provider":
        met = r["ratio_to_ideal"] >= SLOW_TO_IDEAL and not r["failed"]
        text = (
            f"{r['per_second']} jobs/s = {r['ratio_to_ideal']} x ideal {r['ideal_per_second']:g}, {r['failed']} failed"
        )
        return text, f">= {SLOW_TO_IDEAL} x ideal, 0 failed", met
    if label.startswith("two replicas"):
        unit = "req/s" if "enqueue" in label else "jobs/s"
        return f"{r['per_second']:,.0f} {unit} = {r['ratio_to_one']} x one process", "", None
    if label == "memory":
        met = r["peak_rss_mb"] <= PEAK_RSS_MB
        return f"{r['peak_rss_mb']} MB peak RSS (in {r['in']})", f"<= {PEAK_RSS_MB:g} MB", met
    raise ValueError(f"no description for {label}")


def markdown(results: dict[str, dict[str, Any]], rounds: int) -> str:
    """The results as a markdown table, one row per scenario."""
    title = f"median of {rounds} rounds" if rounds > 1 else "one round"
    lines = [f"| scenario ({title}) | result | target | met |", "|---|---|---|---|"]
    for label, result in results.items():
        text, target, met = describe(label, result, results)
        lines.append(f"| {label} | {text} | {target} | {'' if met is None else 'yes' if met else '**no**'} |")
    return "\n".join(lines)


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
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "postgres": postgres,
        "generator_loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
        "service_speedups_installed": {name: find_spec(name) is not None for name in ("uvloop", "httptools")},
        "service_env": env,
        "plan": dataclasses.asdict(plan),
    }


async def bench(server_url: str, postmaster: int | None, plan: Plan, args: argparse.Namespace) -> None:
    """Run the rounds, print each scenario's JSON line as it ends, then the table of medians."""
    # SIGTERM unwinds like Ctrl-C does, so that every service started is stopped.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)  # type: ignore[union-attr]
    print(json.dumps(await setup(server_url, plan, args.env)), flush=True)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="bench-logs-") as logs:
        for number in range(1, args.repeat + 1):
            print(f"bench: round {number} of {args.repeat}", file=sys.stderr, flush=True)
            rounds.append(await Bench(server_url, postmaster, plan, Path(logs), args.env).run_round(args.only))
    print()
    print(markdown(median_of(rounds), args.repeat))


GROUPS = ("ceiling", "health", "enqueue", "read", "pickup", "drain", "slow", "replicas")


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short windows and few jobs: a sanity run")
    parser.add_argument("--repeat", type=int, default=1, help="rounds to run; the table shows medians")
    parser.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated subset of: {', '.join(GROUPS)}")
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="for every service; repeatable"
    )
    args = parser.parse_args()
    args.only = set(args.only.split(","))
    if unknown := args.only - set(GROUPS):
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    if malformed := [setting for setting in args.env if "=" not in setting]:
        parser.error(f"--env takes NAME=VALUE, got {', '.join(malformed)}")
    args.env = dict(setting.split("=", 1) for setting in args.env)
    return args


def main() -> None:
    """Start PostgreSQL (unless DATABASE_URL names one), run the bench, stop everything."""
    args = parse_args()
    plan = QUICK if args.quick else Plan()
    try:
        import uvloop  # the generator should cost as little CPU as it can: the service needs it

        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with contextlib.ExitStack() as stack:
        server_url, postmaster = os.environ.get("DATABASE_URL"), None
        if not server_url:
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
