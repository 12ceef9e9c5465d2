"""The hub: the one FastAPI application every channel talks to. Its rooms, from the bottom up (each imports
only its own room and the ones below; tests/core/test_hub_layout.py checks it):

- ``infra/``: store, migrations, event bus, Rasa client, errors, limits: what everything stands on
- ``domain/``: the conversation core, agent desk, surveys, analytics, staff accounts
- ``channels/``: web chat, phone (hotline and survey calls), video: each turns its medium into the core's calls
- ``services.py`` (the composition root: what starts, in which order, which hooks), ``metrics.py``, ``widget.py``
- ``deps.py``: FastAPI dependencies (the services, who is asking, limits)
- ``routers/``: thin HTTP and WebSocket endpoints, one per area, importing no other router
- ``app.py``: ``create_app``: middleware and routers; its lifespan starts and stops the services
"""
