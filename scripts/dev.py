#!/usr/bin/env python3
"""The two commands of the README, on any machine with Python 3.11+ and nothing else.

    python3 scripts/dev.py serve    run the service on port 8000
    python3 scripts/dev.py test     run the tests (extra arguments go to pytest), then ruff

Both make .venv (or reuse it) and install requirements-dev.txt into it whenever the
requirements change. `serve` uses DATABASE_URL when it is set; otherwise it starts the
embedded PostgreSQL, with its data kept in .data/postgres across restarts.
"""

import hashlib
import os
import signal
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
PYTHON = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
REQUIREMENTS = [ROOT / "requirements.txt", ROOT / "requirements-dev.txt"]
STAMP = VENV / "requirements.sha256"


def ensure_venv() -> None:
    """Create .venv if needed and install the requirements when they changed since last time."""
    if not PYTHON.exists():
        print("dev: creating .venv", flush=True)
        venv.create(VENV, with_pip=True)
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in REQUIREMENTS)).hexdigest()
    if not STAMP.exists() or STAMP.read_text() != digest:
        print("dev: installing requirements-dev.txt into .venv", flush=True)
        pip = [str(PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*pip, "-r", str(ROOT / "requirements-dev.txt")], check=True)
        STAMP.write_text(digest)


def serve() -> int:
    """Run app.py on DATABASE_URL, or on the embedded PostgreSQL when it is not set."""
    env = dict(os.environ)
    server = None
    if not env.get("DATABASE_URL"):
        from scripts.pg import EmbeddedPostgres

        server = EmbeddedPostgres(ROOT / ".data" / "postgres")
        env["DATABASE_URL"] = server.url
        print(f"dev: embedded PostgreSQL at {server.url}", flush=True)
    service = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env)
    # Ctrl-C reaches the service directly (same terminal); a SIGTERM sent to us is passed on.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, _: service.send_signal(signum))
    try:
        return service.wait()
    finally:
        if server:
            server.close()  # stop PostgreSQL; its data stays in .data/postgres


def test(pytest_args: list[str]) -> int:
    """Run the whole test suite, then the linter and the formatter check."""
    steps = [["-m", "pytest", *pytest_args], ["-m", "ruff", "check", "."], ["-m", "ruff", "format", "--check", "."]]
    failed = [step for step in steps if subprocess.run([sys.executable, *step], cwd=ROOT).returncode != 0]
    return 1 if failed else 0


def main() -> int:
    """Prepare .venv, step into it, and run the command."""
    command, *args = sys.argv[1:] or ["help"]
    if command not in ("serve", "test"):
        print(__doc__)
        return 2
    ensure_venv()
    if Path(sys.prefix).resolve() != VENV.resolve():  # not yet inside .venv: become the same command there
        os.execv(PYTHON, [str(PYTHON), __file__, command, *args])
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    return serve() if command == "serve" else test(args)


if __name__ == "__main__":
    sys.exit(main())
