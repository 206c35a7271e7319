"""app.py as users run it (`python app.py`, a real uvicorn process), for fault tests and benchmarks."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Service:
    """One service process on 127.0.0.1, its output kept in `log_path`."""

    def __init__(self, database_url: str, log_path: Path, **env: str | float | int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        settings = {"DATABASE_URL": database_url, "HOST": "127.0.0.1", "PORT": self.port, **env}
        self.env = {**os.environ, **{name: str(value) for name, value in settings.items()}}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, ready_within: float = 30.0) -> "Service":
        """Start the process and wait until /health answers."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "app.py"], cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + ready_within
        while not self.answers("/health"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the service did not start; its log:\n{self.log()}")
            time.sleep(0.05)
        return self

    def answers(self, path: str) -> bool:
        """True if GET `path` answers 200."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=2) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def stop(self, sig: int = signal.SIGTERM, within: float = 60.0) -> int:
        """Send `sig` and wait for the process to exit; return its exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(within)

    def kill(self) -> None:
        """SIGKILL: the process dies at once, mid-whatever."""
        self.stop(signal.SIGKILL)

    def pid(self) -> int:
        """The process id."""
        assert self.process is not None
        return self.process.pid

    def log(self) -> str:
        """Everything the process printed so far."""
        return self.log_path.read_text(errors="replace")

    def __enter__(self) -> "Service":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()
