"""PgBouncer in transaction pooling mode, as the service may be deployed behind it, and promtool.

PgBouncer 1.18 (Debian 12's) cannot keep prepared statements across transactions, and a LISTEN
through it hears nothing from other sessions.
"""

import asyncio
from collections.abc import Callable

import asyncpg
import pytest

from conftest import PGBOUNCER_POOL_SIZE, eventually

CheckMetrics = Callable[[str], None]

# --- The test setup itself ---------------------------------------------------------------------


async def test_pgbouncer_shares_few_server_connections_among_many_clients_per_transaction(
    pgbouncer_db_url: str,
) -> None:
    """The fixture's PgBouncer pools per transaction, with fewer server connections than clients:
    three times PGBOUNCER_POOL_SIZE clients, all connected at once, are all answered (in session
    mode all but PGBOUNCER_POOL_SIZE of them would wait) by at most PGBOUNCER_POOL_SIZE server
    backends, and an open transaction keeps its backend to itself until it ends."""
    clients = [await asyncpg.connect(pgbouncer_db_url, statement_cache_size=0) for _ in range(3 * PGBOUNCER_POOL_SIZE)]
    try:
        pids = await asyncio.gather(*(client.fetchval("SELECT pg_backend_pid()", timeout=5) for client in clients))
        assert len(set(pids)) <= PGBOUNCER_POOL_SIZE

        holder, *others = clients
        async with holder.transaction():
            held = await holder.fetchval("SELECT pg_backend_pid()")
            during = await asyncio.gather(*(client.fetchval("SELECT pg_backend_pid()", timeout=5) for client in others))
            assert held not in during
            assert await holder.fetchval("SELECT pg_backend_pid()") == held
    finally:
        for client in clients:
            await client.close()


async def test_listen_through_pgbouncer_hears_no_other_session(pgbouncer_db_url: str, db_url: str) -> None:
    """Why the service's LISTEN connection must bypass PgBouncer: a LISTEN through transaction
    pooling succeeds, yet a NOTIFY from another session never reaches it (PgBouncer drops it, or
    hands it to whichever client holds that backend then). A NOTIFY sent on the listening
    connection itself does arrive, so such a probe cannot tell: only one from another session can."""
    heard: list[str] = []
    listener = await asyncpg.connect(pgbouncer_db_url, statement_cache_size=0)
    sender = await asyncpg.connect(db_url)
    try:
        await listener.add_listener("probe", lambda *args: heard.append(args[-1]))
        await listener.execute("NOTIFY probe, 'self'")
        await eventually(lambda: _has(heard, "self"), within=5)
        await sender.execute("NOTIFY probe, 'other'")
        await listener.execute("SELECT 1")  # the listener's next transaction: nothing is waiting for it either
        with pytest.raises(AssertionError, match="condition not met"):
            await eventually(lambda: _has(heard, "other"), within=2)
    finally:
        await listener.close()
        await sender.close()


async def _has(heard: list[str], payload: str) -> bool:
    """True once `payload` was heard."""
    return payload in heard


def test_check_metrics_passes_a_clean_exposition_and_fails_a_broken_one(check_metrics: CheckMetrics) -> None:
    """check_metrics accepts a well-formed exposition, and fails the test, quoting promtool, for a
    counter without the _total suffix and for a line that does not parse."""
    check_metrics("# HELP jobs_created_total Jobs created.\n# TYPE jobs_created_total counter\njobs_created_total 3\n")
    with pytest.raises(pytest.fail.Exception, match='should have "_total" suffix'):
        check_metrics("# HELP jobs_created Jobs created.\n# TYPE jobs_created counter\njobs_created 3\n")
    with pytest.raises(pytest.fail.Exception, match="parsing error"):
        check_metrics('# HELP jobs Jobs.\n# TYPE jobs gauge\njobs{status="done" 3\n')
