"""The agent desk with the real dialogue engine (`xiaozhi run`): the summary carries Rasa's intents and slots,
the bot stays silent while an agent holds the conversation, and Rasa answers again after release."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.slow


def test_escalation_summary_and_bot_silence_with_rasa(stack):
    password = (stack["var"] / "initial-admin-password").read_text().strip()
    with httpx.Client(base_url=stack["url"], timeout=60) as client:
        created = client.post("/api/sessions", json={"region": "330100"}).json()
        sid, auth = created["session_id"], {"Authorization": f"Bearer {created['token']}"}

        def say(text: str) -> list[dict]:
            r = client.post(f"/api/sessions/{sid}/messages", json={"text": text}, headers=auth)
            assert r.status_code == 200, r.text
            return r.json()["replies"]

        answered = say("异地就医怎么备案")
        assert answered[-1]["meta"]["outcome"] == "answered"
        assert say("转人工")[-1]["meta"]["outcome"] == "escalated"

        token = client.post("/api/staff/login", json={"username": "admin", "password": password}).json()["token"]
        staff = {"Authorization": f"Bearer {token}"}
        (item,) = [i for i in client.get("/api/agent/queue", headers=staff).json()["items"] if i["conversation_id"] == sid]
        assert item["topic"] == "cross_region" and item["reason"] == "requested" and item["status"] == "waiting"
        detail = client.post(f"/api/agent/queue/{item['id']}/claim", headers=staff).json()
        summary = detail["summary"]
        assert "ask_cross_region" in summary["intents"] and "request_human" in summary["intents"]
        assert summary["slots"]["region"] == "330100"
        assert any(c["topic"] == "cross_region" for c in summary["citations"])

        assert say("你好，还在吗") == [], "Rasa is not asked while an agent holds the conversation"
        client.post(f"/api/agent/queue/{item['id']}/messages", json={"text": "在的，请讲。"}, headers=staff)
        assert client.post(f"/api/agent/queue/{item['id']}/release", headers=staff).status_code == 200
        again = say("医保电子凭证怎么激活")
        assert again and again[-1]["meta"]["intent"] == "ask_e_voucher"
        roles = [m["role"] for m in client.get(f"/api/sessions/{sid}/messages", headers=auth).json()["messages"]]
        assert "agent" in roles and roles[-1] == "bot"
