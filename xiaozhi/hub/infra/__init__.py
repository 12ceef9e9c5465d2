"""The hub's infrastructure: what the domains and channels stand on, knowing nothing of them.

- ``store``: conversations, messages and the escalation queue's table (SQLAlchemy; SQLite or PostgreSQL)
- ``migrations``: the schema's Alembic revisions, upgraded at start or by ``xiaozhi db``
- ``bus``: live events across hub replicas (in process, or PostgreSQL LISTEN/NOTIFY)
- ``rasa_client``: the dialogue engine over HTTP (Rasa's ``xiaozhi`` channel)
- ``errors``, ``schemas``, ``frames``: one error shape, text rules, one WebSocket frame reader
- ``security``: rate and body limits, security headers; ``owner``: which replica holds a live session
- ``retention``: recordings deleted after their retention period
"""
