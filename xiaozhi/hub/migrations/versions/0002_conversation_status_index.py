"""Index conversations by (status, channel, updated_at).

The idle close looks every minute for open conversations of one channel quiet since a moment, and the
metrics count the live conversations by status; without an index both read every conversation ever
held, closed ones included (millions in a city's year). On PostgreSQL a plain CREATE INDEX blocks writes
to conversations while it runs (about a second per million rows): run the upgrade in a quiet hour.

Revision ID: 0002_conversation_status_index
Revises: 0001_baseline
Create Date: 2026-12-06
"""
from alembic import op


revision = "0002_conversation_status_index"
down_revision = "0001_baseline"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("conversations") as batch_op:
        batch_op.create_index("ix_conversations_status_channel_updated", ["status", "channel", "updated_at"])


def downgrade() -> None:
    with op.batch_alter_table("conversations") as batch_op:
        batch_op.drop_index("ix_conversations_status_channel_updated")
