"""PgBouncer in transaction pooling mode, as the service may be deployed behind it.

PgBouncer 1.18 (Debian 12's) cannot keep prepared statements across transactions, and a LISTEN
through it hears nothing from other sessions.
"""

import asyncio

import asyncpg
import pytest

from conftest import PGBOUNCER_POOL_SIZE, eventually

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
