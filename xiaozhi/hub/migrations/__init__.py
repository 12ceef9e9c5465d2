"""Schema migrations: Alembic, with its scripts shipped in this package (no alembic.ini at run time).

- ``prepare(store)`` is what the hub runs at start (services.py, and ``xiaozhi staff``): upgrade to ``head``
  under the replicas' advisory lock, or only check the revision when migrating at start is off.
- ``upgrade`` brings a database to a revision (``head`` at start; or ``xiaozhi db upgrade``, as the
  Kubernetes Job does).
- A database made before migrations existed (the hub's tables, no ``alembic_version``) first goes through
  ``pre_alembic.bridge`` (the additive upgrade those releases ran at start), then is stamped with the
  baseline revision, and from there upgrades like any other.
- ``require_head`` is the start-up check when migrating at start is turned off.

Writing a revision: docs/operations.md, "Schema migrations".
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from xiaozhi.hub.migrations.schema import BASELINE, hub_metadata

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent
VERSION_TABLE = "alembic_version"


class SchemaOutOfDate(RuntimeError):
    """The database is not at the revision this code needs, and this process was told not to migrate it."""


async def prepare(store, migrate: bool = True) -> None:
    """Bring ``store``'s schema to this release's revision; replicas may call it together: one migrates, the
    others wait for it (``Store.exclusive``) and find nothing left to do.

    ``migrate=False`` (XIAOZHI_DB_MIGRATE_ON_START=false, when the deploy's Job runs ``xiaozhi db upgrade``):
    only check the database is at that revision, and refuse to start if not (``SchemaOutOfDate``).

    It lives here, not on the store, because the schema is every room's tables (the domain's accounts and
    surveys too): the store stays below the domain and imports none of it.
    """
    await store.schema_work(upgrade if migrate else require_head)


def alembic_config(connection: Connection | None = None, url: str | None = None,
                   script_location: Path | str | None = None) -> Config:
    """Alembic's Config, built in code. ``connection``: a sync connection (``AsyncConnection.run_sync``)
    the commands run on, in its transaction; ``url``: for a command that opens its own; ``script_location``:
    another scripts directory than the package's (tests)."""
    config = Config()
    config.set_main_option("script_location", str(script_location or MIGRATIONS_DIR))
    if url:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["connection"] = connection
    return config


def head(config: Config | None = None) -> str:
    return ScriptDirectory.from_config(config or alembic_config()).get_current_head()


def current(connection: Connection) -> str | None:
    """The database's revision; None when it has none (empty, or made before migrations)."""
    return MigrationContext.configure(connection).get_current_revision()


def is_pre_alembic(connection: Connection) -> bool:
    """The hub's tables without a version table: made by a release before migrations."""
    names = set(inspect(connection).get_table_names())
    return VERSION_TABLE not in names and bool(names & set(hub_metadata().tables))


def upgrade(connection: Connection, revision: str = "head", config: Config | None = None) -> tuple[str | None, str | None]:
    """Bring the database to ``revision``; (revision before, revision after). The caller commits."""
    config = config or alembic_config(connection)
    config.attributes["connection"] = connection
    before = current(connection)
    if before is None and is_pre_alembic(connection):
        from xiaozhi.hub.migrations import pre_alembic

        if not pre_alembic.bridge(connection, config):
            if head(config) != BASELINE:
                raise SchemaOutOfDate(
                    "the database was made before schema migrations and could not be brought to the baseline "
                    f"({BASELINE}); see the error above, fix it, and start again"
                )
            return None, None
        before = current(connection)
    script = ScriptDirectory.from_config(config)
    if before is not None:
        try:
            script.get_revision(before)
        except CommandError:
            raise SchemaOutOfDate(
                f"the database schema is at {before}, a revision this release does not know: a newer release "
                "migrated it. Undo that with the newer release's `xiaozhi db downgrade <revision>` before rolling back "
                "(docs/operations.md, Schema migrations)"
            ) from None
    target = script.get_revision(revision)  # raises for an unknown revision
    target_id = target.revision if target is not None else None
    if before == target_id:
        log.info("database schema at %s: nothing to migrate", before)
        return before, before
    log.warning("database schema: migrating from %s to %s", before or "an empty database", target_id)
    command.upgrade(config, revision)
    after = current(connection)
    log.warning("database schema now at %s", after)
    return before, after


def stamp(connection: Connection, revision: str) -> None:
    """Record ``revision`` as the database's without running anything (a schema made some other way)."""
    command.stamp(alembic_config(connection), revision)
    log.warning("database stamped with %s", revision)


def require_head(connection: Connection) -> None:
    """The start-up check when migrations run elsewhere (the Job): refuse a database not at head."""
    at, wanted = current(connection), head()
    if at != wanted:
        raise SchemaOutOfDate(
            f"the database schema is at {at or 'no revision'}, this release needs {wanted}; run `xiaozhi db upgrade` "
            "(the deploy's migration Job), or start with XIAOZHI_DB_MIGRATE_ON_START=true"
        )


def downgrade(connection: Connection, revision: str) -> str | None:
    """Undo revisions down to ``revision``; the revision the database is at afterwards."""
    before = current(connection)
    log.warning("database schema: downgrading from %s to %s", before, revision)
    command.downgrade(alembic_config(connection), revision)
    after = current(connection)
    log.warning("database schema now at %s", after or "no revision")
    return after
