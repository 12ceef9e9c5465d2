"""What tests import: the repository's paths, free ports, staff and session helpers, the shared hub's
clients. Fixtures stay in tests/conftest.py; servers the tests start live beside this module
(browser.py, netns.py, postgres.py, redis_server.py, video_clients.py)."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
DATA = REPO / "tests" / "data"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DATABASES = ("sqlite", "postgresql")


def dump_tasks(loop, why: str) -> None:
    """Print every task of ``loop`` with its stack to stderr (read from another thread: diagnostics only)."""
    print(f"\n=== {why}: tasks of the hub's event loop ===", file=sys.stderr)
    for task in list(asyncio.all_tasks(loop)):
        print(f"--- {task!r}", file=sys.stderr)
        task.print_stack(file=sys.stderr)
    sys.stderr.flush()


def client_from(hub, address: str, **kwargs):
    """The running ``hub`` (a TestClient) as seen from another client address.

    It shares the hub's event loop: a TestClient that is not entered runs every request and every
    WebSocket on a new loop of its own, while the app's queues, locks and database pool belong to
    the loop its lifespan started on; used from another loop they can wait forever (that hung the
    authorization test's WebSockets in CI now and then).
    """
    from fastapi.testclient import TestClient

    other = TestClient(hub.app, client=(address, 5000), **kwargs)
    other.portal = hub.portal
    other.app_state.update(hub.app_state)  # the lifespan's state, as the transport reads it
    return other


ADMIN_PASSWORD = "test-admin-password"  # the hub fixture's first admin (XIAOZHI_ADMIN_PASSWORD)


def staff_login(client, username: str = "admin", password: str = ADMIN_PASSWORD) -> dict:
    """Log a staff user in; returns the Authorization header."""
    r = client.post("/api/staff/login", json={"username": username, "password": password})
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


def make_staff(client, username: str, role: str, **extra) -> dict:
    """Create a staff account through the admin API and log it in; returns its Authorization header."""
    password = f"{username}-password-123"
    r = client.post(
        "/api/staff/users",
        json={"username": username, "password": password, "role": role, **extra},
        headers=staff_login(client),
    )
    assert r.status_code == 201, r.text
    return staff_login(client, username, password)


def open_session(client, **body) -> tuple[str, dict]:
    created = client.post("/api/sessions", json=body)
    assert created.status_code == 201, created.text
    data = created.json()
    return data["session_id"], {"Authorization": f"Bearer {data['token']}"}
