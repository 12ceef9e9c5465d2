"""Shared fixtures: one knowledge base per test session, hubs on temporary databases, free ports."""

from __future__ import annotations

import asyncio
import os
import secrets
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pydantic import SecretStr

# No model hub is reachable: everything loads from local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from hypothesis import settings as hypothesis_settings  # noqa: E402

from xiaozhi.settings import Settings  # noqa: E402

from tests.support import (  # noqa: E402
    ADMIN_PASSWORD,
    REPO,
    dump_tasks,
    free_port,
    free_udp_port,
)

# Property and fuzz tests draw the same examples on every run of the test command, so a red CI run
# always means a change in the code and replays on any machine. Hunting for new inputs is a separate,
# deliberate run: HYPOTHESIS_PROFILE=explore scripts/test.sh -k fuzz (failures found are then kept in
# .hypothesis/ and replayed first; pin each one as an @example in the test).
hypothesis_settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
hypothesis_settings.register_profile("explore", derandomize=False, print_blob=True)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """The embedded defaults, with a private var dir; the model cache is the shared one setup filled."""
    return Settings(var_dir=tmp_path_factory.mktemp("var"), rasa_port=free_port())


@pytest.fixture(scope="session")
def knowledge_base(settings: Settings):
    from knowledge_base.factory import open_knowledge_base
    from xiaozhi.embedding_setup import ensure_embedding_model

    ensure_embedding_model(settings)  # as `xiaozhi prepare` does; no-op when setup did it
    return open_knowledge_base(settings.knowledge_base_config())


@pytest.fixture(scope="session")
def postgres():
    """One throwaway PostgreSQL cluster for the session (tests/support/postgres.py); fails, never skips, without one."""
    from tests.support.postgres import PostgresUnavailable, postgres_cluster

    try:
        with postgres_cluster() as cluster:  # stopped and removed at the end of the session
            yield cluster
    except PostgresUnavailable as e:
        pytest.fail(f"PostgreSQL for the hub's database tests: {e}", pytrace=False)


@pytest.fixture(scope="session")
def postgres_url(postgres) -> str:
    """A postgresql+asyncpg:// URL of a database shared by the session; see fresh_postgres_url for an empty one."""
    return postgres.create_database("xiaozhi")


@pytest.fixture
def fresh_postgres_url(postgres) -> str:
    """A new, empty database of the session's cluster (CREATE DATABASE with a unique name): no rows of other tests."""
    return postgres.create_database()


@pytest.fixture
def database_backend() -> str:
    """The hub fixtures' database. A module runs its hubs on both by overriding this fixture:

    @pytest.fixture(params=DATABASES)
    def database_backend(request) -> str:
        return request.param
    """
    return "sqlite"


@pytest.fixture
def database_url(database_backend: str, request: pytest.FixtureRequest) -> str | None:
    """None: SQLite in the hub's var_dir (the default); else a fresh PostgreSQL database."""
    if database_backend == "postgresql":
        return request.getfixturevalue("fresh_postgres_url")
    assert database_backend == "sqlite", database_backend
    return None


@pytest.fixture
def hub_settings(settings: Settings, tmp_path: Path, database_url: str | None) -> Settings:
    """A hub with its own database; Rasa's port has nothing listening (degraded mode) unless a test starts it."""
    return settings.model_copy(
        update={
            "var_dir": tmp_path,
            "database_url": database_url,
            "rasa_url": f"http://127.0.0.1:{free_port()}",
            "kb_reload_interval_s": 0,
            "admin_password": SecretStr(ADMIN_PASSWORD),
            "sip_enabled": False,  # the phone hotline only where a test turns it on (tests/test_phone_*.py)
        }
    )


@pytest.fixture
def hub(hub_settings: Settings, knowledge_base):
    from fastapi.testclient import TestClient

    from xiaozhi.hub.app import create_app

    with TestClient(create_app(hub_settings, knowledge_base=knowledge_base)) as client:
        loop = client.portal.call(asyncio.get_running_loop)
        yield client
        # If shutting the hub down hangs, say which of its tasks are still running (pytest-timeout
        # only shows threads, and the loop's thread just waits for them).
        watchdog = threading.Timer(120, dump_tasks, (loop, "hub still shutting down after 120 s"))
        watchdog.daemon = True
        watchdog.start()
    watchdog.cancel()


@pytest.fixture
def live_hub(hub_settings: Settings, knowledge_base):
    """A hub served over real HTTP/WebSocket (for the browser); yields (base_url, app)."""
    from tests.support.browser import serve

    from xiaozhi.hub.app import create_app

    app = create_app(hub_settings, knowledge_base=knowledge_base)
    with serve(app, free_port()) as url:
        yield url, app


@pytest.fixture(scope="module")
def chromium():
    """One headless Chromium per test module (pages are opened per test in fresh contexts).

    Not per session: Playwright's sync API keeps an event loop running in the main thread while it
    is open, and asyncio.run() in later modules would then refuse to start.
    """
    from playwright.sync_api import expect, sync_playwright

    from tests.support.browser import launch_chromium

    # Browser tests check what a page shows, not how fast: on a loaded two-core CI machine an answer
    # can take longer than Playwright's 5 s default (speed is measured in bench/).
    expect.set_options(timeout=20_000)

    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        yield browser
        browser.close()


START_TIMEOUT_S = 420


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has exited; only its parent has not collected it yet
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """One real `xiaozhi run` (Rasa, action server, hub on free ports) shared by the end-to-end modules."""
    var = tmp_path_factory.mktemp("stack")
    ports = {"XIAOZHI_HUB_PORT": free_port(), "XIAOZHI_RASA_PORT": free_port(), "XIAOZHI_ACTIONS_PORT": free_port(),
             "XIAOZHI_SIP_PORT": free_udp_port()}
    rasa_token = secrets.token_hex(16)  # so tests can read Rasa's tracker (the slots a story filled)
    env = dict(os.environ, XIAOZHI_VAR_DIR=str(var), XIAOZHI_RASA_TOKEN=rasa_token, **{k: str(v) for k, v in ports.items()})
    log_path = var / "run.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "xiaozhi", "run"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while "is running" not in log_path.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"xiaozhi run did not come up:\n{log_path.read_text()}")
        time.sleep(1)
    assert len(re.findall(r"\(pid (\d+)\)", log_path.read_text())) == 3
    yield {"url": f"http://127.0.0.1:{ports['XIAOZHI_HUB_PORT']}", "var": var, "sip_port": ports["XIAOZHI_SIP_PORT"],
           "rasa_url": f"http://127.0.0.1:{ports['XIAOZHI_RASA_PORT']}", "log": log_path, "rasa_token": rasa_token}

    # Ctrl-C stops everything, restarted children included, and leaves no orphan process.
    children = [int(p) for p in re.findall(r"\(pid (\d+)\)", log_path.read_text())]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) in (0, 130)
    time.sleep(0.5)
    assert [pid for pid in children if _pid_alive(pid)] == [], log_path.read_text()
    assert "all services stopped" in log_path.read_text()


@pytest.fixture
def netns():
    """A private network namespace (see tests/support/netns.py) for WebRTC peers: its name."""
    from tests.support.netns import netns_available, private_netns

    if not netns_available():
        pytest.skip("needs root and iproute2 for a private network namespace")
    with private_netns() as (name, _address):
        yield name
