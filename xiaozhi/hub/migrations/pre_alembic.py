"""The one-time bridge for databases made before schema migrations (no ``alembic_version`` table).

Releases up to commit 65cad91 created their tables with ``create_all`` at start and then ran an additive
upgrade: columns and indexes added since were added to existing tables, NOT NULL columns with a DEFAULT
(the model's, or an invented ``''``) so existing rows had a value. A database such a release made or last
started on is brought to the baseline revision the same way, exactly once, and then stamped with it; from
there on only Alembic revisions change the schema. Nothing here runs on a database that has a version.

The tables it aims at are the baseline revision's own listing (frozen), not today's models, so the bridge
still lands on the baseline after the models have moved on.
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from xiaozhi.hub.migrations.schema import BASELINE, hub_metadata
from xiaozhi.hub.infra.store import utcnow

log = logging.getLogger(__name__)


def baseline_metadata(config: Config) -> sa.MetaData:
    """The baseline revision's tables and indexes as a MetaData (its ``schema`` listing, frozen)."""
    metadata = sa.MetaData()

    def table(name, *items, **kwargs):
        sa.Table(name, metadata, *items, **kwargs)

    def index(name, table_name, columns, unique=False, **kwargs):
        sa.Index(name, *(metadata.tables[table_name].c[c] for c in columns), unique=unique, **kwargs)

    ScriptDirectory.from_config(config).get_revision(BASELINE).module.schema(table, index)
    return metadata


def missing(connection: Connection, metadata: sa.MetaData):
    """(table, None) for each table the database lacks, (table, column or index) for each member an
    existing table lacks."""
    inspector = sa.inspect(connection)
    for table in metadata.sorted_tables:
        if not inspector.has_table(table.name):
            yield table, None
            continue
        columns = {c["name"] for c in inspector.get_columns(table.name)}
        indexes = {i["name"] for i in inspector.get_indexes(table.name)}
        yield from ((table, c) for c in table.columns if c.name not in columns)
        yield from ((table, i) for i in table.indexes if i.name not in indexes)


def _fill(table: sa.Table, column: sa.Column) -> str:
    """The DEFAULT the old additive upgrade gave a column it added: the model's scalar default if today's
    model still has one, '{}' for JSON, none when nullable, else the invented ''."""
    model = hub_metadata().tables.get(table.name)
    default = model.c[column.name].default if model is not None and column.name in model.c else None
    if default is not None and default.is_scalar:
        value = default.arg
        # TRUE/FALSE, not 1/0: PostgreSQL refuses an integer default for a boolean column.
        return f" DEFAULT {str(value).upper() if isinstance(value, bool) else repr(value)}"
    if isinstance(column.type, sa.JSON):
        return " DEFAULT '{}'"
    return "" if column.nullable else " DEFAULT ''"


def close_duplicate_open_items(connection: Connection, index: sa.Index) -> int:
    """Releases before the one-open-item index could queue one conversation twice (two replicas at once).
    Keep one open item per conversation (the one an agent holds, else the oldest) and close the others as
    duplicates, so the baseline's unique ``index`` can be made; how many were closed (logged). The rows
    counted as open are exactly those under the index's own predicate (the baseline's, frozen)."""
    predicate = index.dialect_options[connection.dialect.name]["where"]
    rows = connection.execute(sa.text(
        f"SELECT id, conversation_id, status FROM escalations WHERE {predicate} ORDER BY id")).all()
    by_conversation: dict[str, list] = {}
    for row in rows:
        by_conversation.setdefault(row.conversation_id, []).append(row)
    extra = []
    for items in by_conversation.values():
        keep = next((r for r in items if r.status == "claimed"), items[0])
        extra += [r.id for r in items if r is not keep]
    if extra:
        connection.execute(
            sa.text("UPDATE escalations SET status = 'closed', disposition = 'duplicate', closed_at = :now "
                    "WHERE id IN :ids").bindparams(sa.bindparam("ids", expanding=True),
                                                   sa.bindparam("now", type_=sa.DateTime(timezone=True))),
            {"ids": extra, "now": utcnow()})
        log.warning("closed %d duplicate open queue item(s) (ids %s) an older release let in: each conversation "
                    "keeps one open item (the one an agent holds, else the oldest)", len(extra),
                    ", ".join(map(str, extra[:20])) + (" ..." if len(extra) > 20 else ""))
    return len(extra)


def legacy_additive_upgrade(connection: Connection, metadata: sa.MetaData) -> None:
    """What releases before migrations did at every start: create missing tables, add missing columns and
    indexes; and, before the indexes, close the duplicate open queue items the one-open-item index forbids.
    An index the existing rows still violate is logged and left out."""
    metadata.create_all(connection)
    for table, member in list(missing(connection, metadata)):
        if isinstance(member, sa.Column):
            ddl_type = member.type.compile(dialect=connection.dialect)
            connection.exec_driver_sql(
                f'ALTER TABLE {table.name} ADD COLUMN "{member.name}" {ddl_type}{_fill(table, member)}'
            )
    for _table, member in list(missing(connection, metadata)):
        if isinstance(member, sa.Index) and member.name == "uq_escalations_open_conversation":
            close_duplicate_open_items(connection, member)
    for table, member in list(missing(connection, metadata)):
        if isinstance(member, sa.Index):
            try:
                with connection.begin_nested():  # a failure must not abort the schema transaction (PostgreSQL)
                    member.create(connection)
            except IntegrityError as exc:
                log.error("index %s not created: existing rows of %s violate it (%s); remove the duplicates",
                          member.name, table.name, exc.orig)


def bridge(connection: Connection, config: Config) -> bool:
    """Bring a pre-migration database to the baseline and stamp it; False (not stamped) when something
    could not be added: the next start tries again."""
    log.warning("the database has the hub's tables but no schema version: made by a release before schema "
                "migrations; bringing it to the baseline %s the way those releases upgraded", BASELINE)
    metadata = baseline_metadata(config)
    legacy_additive_upgrade(connection, metadata)
    still = [f"{table.name}.{member.name}" if member is not None else table.name
             for table, member in missing(connection, metadata)]
    if still:
        log.error("the database made before schema migrations still lacks %s: not stamped with %s; "
                  "the next start tries again", ", ".join(still), BASELINE)
        return False
    command.stamp(config, BASELINE)
    log.warning("the database made before schema migrations now matches and is stamped with %s", BASELINE)
    return True
