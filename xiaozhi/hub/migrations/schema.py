"""What the migrations are about: every table of the hub, and the revision a database made before
migrations is brought to. Apart from the package's __init__ so the bridge (pre_alembic) and Alembic's env
read it without importing the code that runs them."""

from __future__ import annotations

from sqlalchemy import MetaData

BASELINE = "0001_baseline"  # the schema of the last release before migrations (commit 65cad91)


def hub_metadata() -> MetaData:
    """Every table of the hub: the models of store, accounts, surveys and the knowledge records."""
    import xiaozhi.hub.domain.accounts  # noqa: F401  (registers its tables)
    import xiaozhi.hub.domain.knowledge_store  # noqa: F401
    import xiaozhi.hub.domain.surveys  # noqa: F401
    from xiaozhi.hub.infra.store import Base

    return Base.metadata
