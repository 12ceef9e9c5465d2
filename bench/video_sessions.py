"""Video help: connect time, CPU per two-way session, and how many simultaneous sessions the hub holds at 15 fps.

Everything runs inside a private network namespace (see tests/support/netns.py: aioice never offers
127.0.0.1, so the namespace gets a private address on lo). The hub (uvicorn + aiortc relay) runs in
this process, so its CPU is this process's CPU once the browser part is over.

1. connect time, Chromium: a resident opens /video and starts (consent, camera, queue); then an
   agent opens /agent/call; measured from the agent's page open until both pages' getStats() show
   inbound video frames decoded and audio packets (page open -> media flowing both ways). The
   resident's own page open -> peer connected is reported too.
2. CPU per two-way session: hub CPU while one browser session (--capture, default 640x480 at
   15 fps, what the pages ask the camera for) runs for --seconds.
3. capacity: N sessions of aiortc peers (resident + agent, 320x240 at 15 fps) for N in --levels,
   run in a separate process whose CPU is reported apart; a level holds when every received video
   track keeps >= 14 fps and every received audio track >= 45 of its 50 frames per second (audio is
   still transcoded on the hub: a hub that falls behind shows there first). The clients stand in
   for remote browsers but run on the hub's own 2 cores, so they are made as cheap as possible:
   each sends a VP8 clip (a scrolling texture, encoded once per process, ~500 kbit/s, restarted at
   its keyframe when the hub asks for one) and pre-encoded Opus, and counts received *encoded*
   frames with the hub's receiver hook instead of decoding them.
   The hub does its real work either way (it forwards VP8 untouched since video/passthrough.py;
   Opus is decoded and re-encoded; residents consent, so with recording on both sides are recorded).
   One check decodes: the first session's two peers decode the video they receive, and the bench
   prints the colour each saw (the other side's); a level only holds if those are right.
   --transcoding-clients runs the earlier clients (encode live, decode everything) for comparison.

    .venv/bin/python bench/video_sessions.py [--trials 10] [--levels 2,4,6,8] [--seconds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ADMIN_PASSWORD = "bench-admin-password"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | str = "self") -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def run_delay_seconds(pid: int | str = "self") -> float:
    """Time this process's threads spent runnable but waiting for a CPU (/proc/*/task/*/schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (FileNotFoundError, IndexError, ValueError):
            pass
    return total / 1e9


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


# -- the client worker (a separate process) ----------------------------------------------------------
async def worker(url: str, sessions: int, seconds: float, screen: bool, transcoding: bool = False) -> None:
    import httpx
    from tests.support.video_clients import Peer, opus_clip, vp8_clip

    if not transcoding:  # encode the clips before anything is measured
        for rgb in ((200, 30, 30), (30, 200, 30), (30, 30, 200)):
            vp8_clip(rgb)
        for hz in (440.0,):
            opus_clip(hz)
    peers = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        admin = (await http.post("/api/staff/login", json={"username": "admin", "password": ADMIN_PASSWORD})).json()
        for i in range(sessions):
            created = (await http.post("/api/video/sessions", json={})).json()
            cheap = {} if transcoding else {"encoded": True, "decode": i == 0}  # session 0 decodes
            resident = Peer("resident", moving=True, **cheap)
            # The resident consents: with recording on (the default) both sides are recorded, as in production.
            r = await resident.offer(http, f"/api/video/sessions/{created['session_id']}/resident/offer", created["token"],
                                     recording_consent=True)
            r.raise_for_status()
            agent = Peer("agent", colour=(30, 200, 30), moving=True, screen=screen, **cheap)
            r = await agent.offer(http, f"/api/video/sessions/{created['session_id']}/agent/offer", admin["token"])
            r.raise_for_status()
            peers += [resident, agent]
        for peer in peers:
            await peer.wait_frames("video", 10, timeout=60)
        await asyncio.sleep(2)  # settle
        names = ["video", "screen"] if screen else ["video"]
        before = {(id(p), n): p.frames(n) for p in peers for n in names + ["audio"] if n in p.received}
        cpu0, t0, wait0 = cpu_seconds(), time.monotonic(), run_delay_seconds()
        print("READY", flush=True)
        await asyncio.sleep(seconds)
        elapsed = time.monotonic() - t0
        client_wait = (run_delay_seconds() - wait0) / elapsed
        fps = [(p.frames(n) - before[(id(p), n)]) / elapsed for p in peers for n in names if (id(p), n) in before]
        # Audio (20 ms frames, 50 per second) is transcoded on the hub: a hub that falls behind shows here first.
        audio = [(p.frames("audio") - before[(id(p), "audio")]) / elapsed for p in peers if (id(p), "audio") in before]
        # The decoding check: what the first session's peers decoded is the other side's colour.
        seen = {p.role: [round(float(x)) for x in p.received["video"].mean_rgb()] for p in peers[:2]}
        decoded_ok = seen["agent"][0] > 120 > seen["agent"][1] and seen["resident"][1] > 120 > seen["resident"][0]
        print("RESULT " + json.dumps({"fps": fps, "audio_fps": audio, "client_cpu": (cpu_seconds() - cpu0) / elapsed,
                                      "client_wait": client_wait, "decoded": seen, "decoded_ok": decoded_ok}),
              flush=True)
        for peer in peers:
            await peer.close()


# -- the hub and the browser part ------------------------------------------------------------------
def browser_part(url: str, trials: int, seconds: float) -> dict:
    import httpx
    from tests.support.browser import launch_chromium
    from playwright.sync_api import sync_playwright

    admin_token = httpx.post(url + "/api/staff/login", json={"username": "admin", "password": ADMIN_PASSWORD}).json()["token"]
    inbound = "() => XZVideo.inbound(window.xzCall.pc)"

    def wait(predicate, timeout=20.0):
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError
            time.sleep(0.02)

    def flowing(page) -> bool:
        s = page.evaluate(inbound)
        return s["framesDecoded"] > 0 and s["audioPackets"] > 0

    agent_times, resident_times = [], []
    cpu_per_session = None
    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        for trial in range(trials):
            rctx, actx = browser.new_context(), browser.new_context()
            actx.add_init_script(f"sessionStorage.setItem('xz_staff_token', {json.dumps(admin_token)})")
            resident, agent = rctx.new_page(), actx.new_page()
            t0 = time.monotonic()
            resident.goto(url + "/video")
            resident.wait_for_selector("#consent:not(.hidden)")
            resident.click("#start")
            wait(lambda r=resident: r.evaluate("window.xzCall.pc && window.xzCall.pc.connectionState === 'connected'"))
            resident_times.append(time.monotonic() - t0)
            sid = resident.evaluate("window.xzCall.sessionId")
            t0 = time.monotonic()
            agent.goto(f"{url}/agent/call?conversation={sid}")
            wait(lambda a=agent: a.evaluate("!!(window.xzCall && window.xzCall.pc)"))
            wait(lambda a=agent, r=resident: flowing(a) and flowing(r))
            agent_times.append(time.monotonic() - t0)
            if trial == trials - 1:  # CPU of one browser-driven two-way session, hub side
                time.sleep(2)
                cpu0, w0 = cpu_seconds(), time.monotonic()
                time.sleep(seconds)
                cpu_per_session = (cpu_seconds() - cpu0) / (time.monotonic() - w0)
            agent.click("#hangup")
            resident.wait_for_selector("#ended:not(.hidden)")
            rctx.close()
            actx.close()
        browser.close()
    return {"agent_connect_s": agent_times, "resident_connect_s": resident_times, "hub_cpu_one_browser_session": cpu_per_session}


def capacity_level(url: str, sessions: int, seconds: float, screen: bool, transcoding: bool) -> dict:
    proc = subprocess.Popen([sys.executable, __file__, "--worker", url, str(sessions), str(seconds), str(int(screen)),
                             str(int(transcoding))], stdout=subprocess.PIPE, text=True)
    cpu0 = w0 = None
    result = None
    for line in proc.stdout:
        if line.startswith("READY"):
            cpu0, w0, wait0 = cpu_seconds(), time.monotonic(), run_delay_seconds()
        elif line.startswith("RESULT"):
            elapsed = time.monotonic() - w0
            hub = (cpu_seconds() - cpu0) / elapsed
            result = json.loads(line[7:]) | {"hub_cpu": hub, "hub_wait": (run_delay_seconds() - wait0) / elapsed}
    proc.wait(60)
    if result is None:
        raise RuntimeError(f"the client worker failed at {sessions} sessions")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--levels", default="2,4,6,8")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--no-recording", action="store_true", help="measure with XIAOZHI_VIDEO_RECORDING=false")
    parser.add_argument("--screen", action="store_true", help="capacity: the agent shares the screen too (3 video streams)")
    parser.add_argument("--skip-browser", action="store_true", help="capacity only")
    parser.add_argument("--capture", default="640x480@15", help="XIAOZHI_VIDEO_CAPTURE for the browser part")
    parser.add_argument("--transcoding-clients", action="store_true",
                        help="capacity: clients encode live and decode everything (the pre-passthrough bench)")
    parser.add_argument("--worker", nargs=5, metavar=("URL", "SESSIONS", "SECONDS", "SCREEN", "TRANSCODING"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if os.environ.get("XZ_SWITCH_INTERVAL"):  # experiment: GIL hand-off interval (hub and clients)
        sys.setswitchinterval(float(os.environ["XZ_SWITCH_INTERVAL"]))
    if args.worker:
        url, sessions, seconds, screen, transcoding = args.worker
        asyncio.run(worker(url, int(sessions), float(seconds), screen == "1", transcoding == "1"))
        return

    from tests.support.browser import serve
    from tests.support import free_port
    from pydantic import SecretStr

    from xiaozhi.hub.app import create_app
    from xiaozhi.settings import Settings

    from tests.support.netns import enter_netns, private_netns

    levels = [int(x) for x in args.levels.split(",")]
    with private_netns("xzbench") as (ns, _address):
        enter_netns(ns)  # this thread, the hub's server thread, Chromium and the client process
        with tempfile.TemporaryDirectory() as tmp:
            settings = Settings(var_dir=Path(tmp), rasa_url=f"http://127.0.0.1:{free_port()}", kb_reload_interval_s=0,
                                admin_password=SecretStr(ADMIN_PASSWORD), video_max_sessions=max(levels) + 2,
                                sip_enabled=False, rate_limit_enabled=False, video_recording=not args.no_recording, video_capture=args.capture)
            app = create_app(settings)
            print("starting the hub (loads the knowledge base) ...", flush=True)
            with serve(app, free_port()) as url:
                print(f"recording {'off' if args.no_recording else 'on'}; load average before: {os.getloadavg()[0]:.2f}")
                if not args.skip_browser:
                    b = browser_part(url, args.trials, args.seconds)
                    a, r = b["agent_connect_s"], b["resident_connect_s"]
                    print(f"\nconnect time, {len(a)} trials (Chromium, private netns, no TURN):")
                    print(f"  agent page open -> media both ways: p50 {statistics.median(a):.2f} s  p95 {pct(a, 95):.2f} s  max {max(a):.2f} s")
                    print(f"  resident page open -> peer connected: p50 {statistics.median(r):.2f} s  p95 {pct(r, 95):.2f} s")
                    print(f"hub CPU, one two-way browser session ({args.capture}): {100 * b['hub_cpu_one_browser_session']:.0f} % of a core")
                clients = ("encoding live and decoding everything" if args.transcoding_clients else
                           "sending a pre-encoded VP8 clip + Opus, counting encoded frames; session 1 decodes")
                print(f"\ncapacity (aiortc clients, 320x240 15 fps, camera-like moving picture, {clients}; agent screen "
                      f"share {'on' if args.screen else 'off'}; clients on the same 2 cores):")
                print("  sessions  hub CPU  per session  clients CPU  min fps  median fps  min audio/s  holds 15 fps"
                      "  waiting for a CPU: hub / clients (thread-seconds per second)  load avg  decoded colours")
                held = 0
                for n in levels:
                    res = capacity_level(url, n, args.seconds, args.screen, args.transcoding_clients)
                    fps = res["fps"]
                    ok = min(fps) >= 14.0 and min(res["audio_fps"]) >= 45.0 and res["decoded_ok"]
                    held = n if ok else held
                    print(f"  {n:8d}  {100 * res['hub_cpu']:6.0f} %  {100 * res['hub_cpu'] / n:9.0f} %  "
                          f"{100 * res['client_cpu']:9.0f} %  {min(fps):7.1f}  {statistics.median(fps):10.1f}  "
                          f"{min(res['audio_fps']):11.1f}  "
                          f"{'yes' if ok else 'no':>12}  {res['hub_wait']:.2f} / {res['client_wait']:.2f}"
                          f"{'':>47}{os.getloadavg()[0]:5.2f}  agent saw {res['decoded']['agent']}, "
                          f"resident saw {res['decoded']['resident']}{'' if res['decoded_ok'] else ' WRONG'}", flush=True)
                    time.sleep(3)
                print(f"\nheld at 15 fps: {held} simultaneous two-way sessions")


if __name__ == "__main__":
    main()
