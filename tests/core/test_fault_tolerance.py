"""Parts fail, the hotline keeps answering and loses nothing.

- The real Rasa of the shared stack killed -> `xiaozhi run` restarts it, the hub answers degraded
  meanwhile and recovers by itself.
- Rasa down -> degraded answers from the knowledge base; Rasa back -> normal answers again, with
  nothing restarted. Rasa is played by a small real HTTP server speaking the hub's webhook
  protocol (bot/rasa_runtime/xiaozhi_channel.py), started and stopped by the test: what is tested
  is the hub's reaction to a dialogue server that vanishes and returns (the real Rasa's answers are
  tested in test_chat_with_rasa.py against the shared stack).
- The hub killed with SIGKILL in the middle of turns -> after a restart every accepted resident
  message is in the transcript, the conversation goes on with the same token, and the agent queue
  is still there. Rasa is a socket that accepts and never answers (a hung dialogue server), so
  turns are really in flight when the kill comes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from tests.support import REPO, free_port, open_session
from tests.support.dialogue import WebhookServer


@pytest.fixture
def dialogue_server(hub_settings):
    port = int(hub_settings.rasa_url.rsplit(":", 1)[1])
    server = WebhookServer(port)
    yield server
    server.stop()


def _ask(hub, sid, auth, text):
    r = hub.post(f"/api/sessions/{sid}/messages", json={"text": text}, headers=auth)
    assert r.status_code == 200, r.text
    return r.json()["replies"][0]


def test_degraded_while_rasa_is_down_and_recovered_when_it_returns(hub, dialogue_server):
    sid, auth = open_session(hub)
    first = _ask(hub, sid, auth, "异地就医怎么备案")
    assert first["meta"].get("degraded") is True and "知识库" in first["text"]
    assert hub.get("/readyz").json()["degraded"] is True

    dialogue_server.start()  # Rasa comes back: nothing is restarted or reconfigured in the hub
    second = _ask(hub, sid, auth, "你好")
    assert "degraded" not in second["meta"] and second["text"].startswith("（对话服务）")
    assert hub.get("/readyz").json() == {"knowledge_base": True, "rasa": True, "degraded": False}
    assert [t["message"] for t in dialogue_server.turns] == ["你好"]

    dialogue_server.stop()  # and goes away again
    third = _ask(hub, sid, auth, "医保电子凭证怎么激活")
    assert third["meta"].get("degraded") is True
    residents = [m for m in hub.get(f"/api/sessions/{sid}/messages", headers=auth).json()["messages"]
                 if m["role"] == "resident"]
    assert [m["status"] for m in residents] == ["answered"] * 3


# -- a hub process killed with SIGKILL -------------------------------------------------------------
class HungRasa:
    """Accepts connections and never answers: a dialogue server that hangs."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        for c in self.conns:
            c.close()


ADMIN_PASSWORD = "fault-test-admin-pw"


def _start_hub(var: Path, port: int, rasa_url: str, log: Path) -> subprocess.Popen:
    env = dict(
        os.environ,
        XIAOZHI_VAR_DIR=str(var),
        XIAOZHI_HUB_PORT=str(port),
        XIAOZHI_RASA_URL=rasa_url,
        XIAOZHI_RASA_TIMEOUT_S="60",
        XIAOZHI_KB_RELOAD_INTERVAL_S="0",
        XIAOZHI_ADMIN_PASSWORD=ADMIN_PASSWORD,
        XIAOZHI_SURVEY_POLL_INTERVAL_S="0",
    )
    with open(log, "a") as out:
        proc = subprocess.Popen([sys.executable, "-m", "xiaozhi", "hub"], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"hub exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    pytest.fail(f"hub did not start:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_a_hub_killed_mid_conversation_loses_no_accepted_message_and_keeps_its_queue(tmp_path):
    from websockets.sync.client import connect

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "hub.log"
    hung = HungRasa()
    proc = _start_hub(tmp_path, port, f"http://127.0.0.1:{hung.port}", log)
    try:
        client = httpx.Client(base_url=base, timeout=5)
        sid, auth = open_session(client)
        waiting_sid, waiting_auth = open_session(client)
        # a conversation in the agent queue (the "转人工" button)
        r = client.post(f"/api/sessions/{waiting_sid}/escalate", json={}, headers=waiting_auth)
        assert r.status_code == 200, r.text
        queue_id = r.json()["queue_id"]

        # turns in flight: one over HTTP (its client waits for Rasa), one over the WebSocket
        def post(text: str) -> None:
            try:
                httpx.post(f"{base}/api/sessions/{sid}/messages", json={"text": text}, headers=auth, timeout=60)
            except httpx.HTTPError:
                pass  # the hub dies under it

        sent = ["我的医保卡丢了怎么办", "异地就医备案要什么材料"]
        threading.Thread(target=post, args=(sent[0],), daemon=True).start()
        token = auth["Authorization"][7:]
        with connect(f"ws://127.0.0.1:{port}/api/sessions/{sid}/ws?token={token}", open_timeout=5) as ws:
            ws.send(json.dumps({"text": sent[1]}, ensure_ascii=False))
            accepted = []
            deadline = time.monotonic() + 20
            while len(accepted) < 2 and time.monotonic() < deadline:  # the echo means: committed
                event = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
                if event.get("type") == "message" and event["message"]["role"] == "resident":
                    accepted.append(event["message"]["text"])
            # the HTTP turn may have been committed before the socket subscribed: read the transcript
            transcript = client.get(f"/api/sessions/{sid}/messages", headers=auth).json()["messages"]
            accepted_texts = {m["text"] for m in transcript if m["role"] == "resident"} | set(accepted)
            assert accepted_texts == set(sent), (accepted_texts, log.read_text()[-2000:])
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        hung.close()

    # restart on the same database; Rasa still unreachable (nothing listens there now): degraded mode
    proc = _start_hub(tmp_path, port, f"http://127.0.0.1:{free_port()}", log)
    try:
        client = httpx.Client(base_url=base, timeout=30)
        transcript = client.get(f"/api/sessions/{sid}/messages", headers=auth)
        assert transcript.status_code == 200, transcript.text  # the resident's token still works
        residents = [m for m in transcript.json()["messages"] if m["role"] == "resident"]
        assert {m["text"] for m in residents} == set(sent)
        assert all(m["status"] == "received" for m in residents)  # kept, and visibly unanswered

        # the conversation continues where it was
        r = client.post(f"/api/sessions/{sid}/messages", json={"text": "医保电子凭证怎么激活"}, headers=auth)
        assert r.status_code == 200, r.text
        assert r.json()["message"]["seq"] > max(m["seq"] for m in residents)
        assert r.json()["replies"][0]["meta"].get("degraded") is True

        # the agent queue survived: an agent logging in after the restart sees the waiting item
        login = client.post("/api/staff/login", json={"username": "admin", "password": ADMIN_PASSWORD})
        assert login.status_code == 200, login.text
        staff = {"Authorization": f"Bearer {login.json()['token']}"}
        items = client.get("/api/agent/queue", headers=staff).json()["items"]
        ids = {item.get("id") for item in items}
        assert queue_id in ids, items
        # and asking again keeps the same place in the queue
        again = client.post(f"/api/sessions/{waiting_sid}/escalate", json={}, headers=waiting_auth)
        assert again.json()["queue_id"] == queue_id
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.slow
def test_the_real_rasa_killed_is_restarted_and_the_hub_recovers_by_itself(stack):
    """SIGKILL the shared stack's Rasa: the hub answers degraded meanwhile, `xiaozhi run` restarts
    Rasa, and the same conversation gets Rasa's answers again with nobody touching the hub."""
    import re

    log_path = stack["var"] / "run.log"
    rasa_pids = [int(p) for p in re.findall(r"started Rasa \(pid (\d+)\)", log_path.read_text())]
    with httpx.Client(base_url=stack["url"], timeout=60) as client:
        sid, auth = open_session(client)
        os.kill(rasa_pids[-1], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while client.get("/readyz").json()["rasa"] and time.monotonic() < deadline:
            time.sleep(0.2)
        down = client.post(f"/api/sessions/{sid}/messages", json={"text": "异地就医怎么备案"}, headers=auth)
        assert down.status_code == 200
        assert down.json()["replies"][0]["meta"].get("degraded") is True
        deadline = time.monotonic() + 300
        while not client.get("/readyz").json()["rasa"]:
            assert time.monotonic() < deadline, log_path.read_text()[-2000:]
            time.sleep(1)
        back = client.post(f"/api/sessions/{sid}/messages", json={"text": "医保电子凭证怎么激活"}, headers=auth)
        reply = back.json()["replies"][0]
        assert "degraded" not in reply["meta"] and reply["meta"]["intent"] == "ask_e_voucher", reply
        transcript = client.get(f"/api/sessions/{sid}/messages", headers=auth).json()["messages"]
    assert [m["text"] for m in transcript if m["role"] == "resident"] == ["异地就医怎么备案", "医保电子凭证怎么激活"]
    assert len(re.findall(r"started Rasa \(pid (\d+)\)", log_path.read_text())) == len(rasa_pids) + 1


def test_shutdown_closes_the_database_only_after_the_hubs_own_tasks_have_ended(hub_settings, knowledge_base,
                                                                                monkeypatch):
    """A background task cancelled at shutdown may still be cleaning up (SQLAlchemy finishes a
    session's close before a cancelled task ends): the store must not close under it."""
    import asyncio

    from fastapi.testclient import TestClient

    from xiaozhi.hub.app import create_app
    from xiaozhi.hub.domain.conversation import ConversationService
    from xiaozhi.hub.infra.store import Store

    sweeping, cleaned_up, seen_at_close = threading.Event(), [], []

    async def slow_sweep(self, open_after, waiting_after) -> int:
        sweeping.set()
        try:
            await asyncio.Event().wait()  # a query in progress when the hub stops
        finally:
            await asyncio.sleep(0.3)  # its session's cleanup, run to completion
            cleaned_up.append(True)
        return 0

    original_close = Store.close

    async def close(self) -> None:
        seen_at_close.append(bool(cleaned_up))
        await original_close(self)

    monkeypatch.setattr(ConversationService, "close_idle", slow_sweep)
    monkeypatch.setattr(Store, "close", close)
    with TestClient(create_app(hub_settings, knowledge_base=knowledge_base)):
        assert sweeping.wait(10)
    assert seen_at_close == [True]
