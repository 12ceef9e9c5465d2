"""Media relayed through a real coturn (Debian's turnserver) with use-auth-secret time-limited credentials,
the configuration docs/video.md recommends for deployment.

The namespace has only 127.0.0.1, which aioice never offers as a host candidate: the peers can reach
each other only through relay candidates that coturn allocates, so media flowing proves the TURN path
(and that the hub's credentials, generated from XIAOZHI_TURN_SECRET, are accepted by coturn).
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time

import httpx
import pytest
from tests.support.browser import serve
from tests.support import ADMIN_PASSWORD, free_port
from tests.support.netns import netns_available, private_netns, run_in_netns
from pydantic import SecretStr
from tests.support.video_clients import Peer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("turnserver") is None, reason="coturn not installed: apt-get install coturn"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]
SECRET = "test-static-auth-secret"


@pytest.fixture
def loopback_only_netns():
    if not netns_available():
        pytest.skip("needs root and iproute2 for a private network namespace")
    with private_netns("xzt", host_address=False) as (name, _):
        yield name


def start_coturn(port: int, log_dir) -> subprocess.Popen:
    proc = subprocess.Popen(
        ["turnserver", "-n", "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1", f"--listening-port={port}",
         "--min-port=49160", "--max-port=49260", "--use-auth-secret", f"--static-auth-secret={SECRET}",
         "--realm=xiaozhi.test", "--allow-loopback-peers", "--no-cli", "--no-tls", "--no-dtls",
         "--no-multicast-peers", f"--log-file={log_dir / 'turn.log'}", "--simple-log"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:  # coturn listens on TCP and UDP alike: TCP tells when it is up
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"turnserver did not start: {(log_dir / 'turn.log').read_text(errors='replace')}")
            time.sleep(0.1)


def test_video_session_relayed_through_coturn(hub_settings, knowledge_base, loopback_only_netns, tmp_path):
    from xiaozhi.hub.app import create_app

    def scenario() -> dict:
        port = free_port()
        coturn = start_coturn(port, tmp_path)
        try:
            settings = hub_settings.model_copy(update={
                "ice_servers": f'[{{"urls": ["turn:127.0.0.1:{port}?transport=udp"]}}]',
                "turn_secret": SecretStr(SECRET), "turn_credential_ttl_s": 600})
            app = create_app(settings, knowledge_base=knowledge_base)
            with serve(app, free_port()) as url:
                return asyncio.run(session(app, url))
        finally:
            coturn.terminate()
            coturn.wait(10)

    async def session(app, url: str) -> dict:
        out: dict = {}
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            created = (await http.post("/api/video/sessions", json={})).json()
            sid, token = created["session_id"], created["token"]
            ice = created["ice_servers"]
            out["ice"] = ice
            resident = Peer("resident", ice_servers=ice)
            r = await resident.offer(http, f"/api/video/sessions/{sid}/resident/offer", token)
            assert r.status_code == 200, r.text
            out["answer_candidates"] = [line for line in r.json()["sdp"].splitlines() if "typ " in line]
            admin = (await http.post("/api/staff/login", json={"username": "admin", "password": ADMIN_PASSWORD})).json()
            agent_ice = (await http.get(f"/api/video/sessions/{sid}",
                                        headers={"Authorization": f"Bearer {admin['token']}"})).json()["ice_servers"]
            agent = Peer("agent", ice_servers=agent_ice, colour=(30, 200, 30))
            r = await agent.offer(http, f"/api/video/sessions/{sid}/agent/offer", admin["token"])
            assert r.status_code == 200, r.text
            await agent.wait_frames("video", 15, timeout=20)
            await resident.wait_frames("video", 15, timeout=20)
            await agent.wait_frames("audio", 30)
            await resident.wait_frames("audio", 30)
            out["agent_sees"] = agent.received["video"].mean_rgb()
            out["agent_user"] = agent_ice[0]["username"]
            await http.post(f"/api/video/sessions/{sid}/hangup", headers={"Authorization": f"Bearer {token}"})
            out["pcs_after"] = app.state.video.peer_connections
            await resident.close()
            await agent.close()
        return out

    out = run_in_netns(loopback_only_netns, scenario, timeout=120)
    assert out["ice"][0]["username"].endswith(":resident") and out["ice"][0]["credential"]
    assert out["agent_user"].endswith(":admin")
    assert out["answer_candidates"] and all("typ relay" in c for c in out["answer_candidates"])
    assert out["agent_sees"][0] > 150  # the resident's red, relayed by coturn and the hub
    assert out["pcs_after"] == 0
