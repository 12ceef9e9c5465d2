"""Alembic's environment for the hub's schema (xiaozhi/hub/migrations).

Run from the hub (``xiaozhi.hub.migrations``: at start and by ``xiaozhi db ...``), which hands over an open
connection in ``config.attributes["connection"]``; or from the ``alembic`` command with a URL
(``-x url=...`` or ``sqlalchemy.url``), for which it opens an async engine and runs the migrations
through ``connection.run_sync`` (Alembic's async recipe).
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from xiaozhi.hub.migrations.schema import hub_metadata

config = context.config
target_metadata = hub_metadata()


def _configure(**kwargs) -> None:
    context.configure(
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things in place: autogenerate writes batch operations (copy and move),
        # which run as plain ALTERs on PostgreSQL.
        render_as_batch=True,
        compare_type=True,
        **kwargs,
    )


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("no database: give -x url=sqlite+aiosqlite:///path or postgresql+asyncpg://...")
    return url


def run_migrations_offline() -> None:
    _configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    engine = create_async_engine(_url(), poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
elif config.attributes.get("connection") is not None:
    do_run_migrations(config.attributes["connection"])
else:
    asyncio.run(run_async_migrations())
