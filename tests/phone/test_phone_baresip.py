"""A whole call from baresip (Debian baresip-core 1.0), a real softphone, to the voice bot in the hub.

baresip advertises its eth0 address whatever it is told, so the hub's hotline and baresip both run
in a private network namespace holding only loopback with a default route via lo (platform notes;
tests/support/netns.py). baresip plays a padded Mandarin fixture as its microphone (aufile), records what it
hears (sndfile), and hangs up when the file ends.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest
from tests.support.netns import netns_available, private_netns, run_in_netns
from tests.support.phone import conversations, escalations, phone_hub  # noqa: F401

from telephony.audio import load_wav, silence

ASR = Path(__file__).parent.parent / "data" / "asr"
BARESIP = shutil.which("baresip")
MODULES = Path("/usr/lib/baresip/modules")

pytestmark = [
    pytest.mark.skipif(BARESIP is None or not MODULES.is_dir(), reason="baresip not installed (apt-get install baresip-core)"),
    pytest.mark.skipif(not netns_available(), reason="needs root and iproute2 for a network namespace"),
    pytest.mark.skipif(__import__("importlib").util.find_spec("faster_whisper") is None, reason="no faster-whisper"),
]


def write_wav(path: Path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(samples.astype("<i2").tobytes())


def baresip_config(home: Path, source: Path, records: Path) -> Path:
    conf = home / "baresip"
    conf.mkdir()
    (conf / "config").write_text(
        "\n".join([
            "poll_method epoll",
            "sip_listen 127.0.0.1:0",
            "audio_source aufile," + str(source),
            "audio_player aufile," + str(records / "heard.wav"),
            "audio_srate 8000",
            "audio_channels 1",
            "ausrc_srate 8000",
            "auplay_srate 8000",
            "module_path " + str(MODULES),
            "module g711.so",
            "module aufile.so",
            "module sndfile.so",
            "snd_path " + str(records),
            "module_app account.so",
            "module_app menu.so",
            "rtp_timeout 0",
            "",
        ]),
        encoding="utf-8",
    )
    (conf / "accounts").write_text("<sip:13700001111@127.0.0.1>;regint=0;audio_codecs=PCMU\n", encoding="utf-8")
    return conf


def test_baresip_call_end_to_end(hub_settings, knowledge_base, tmp_path: Path) -> None:
    question = load_wav(ASR / "02_yidi_beian.wav")
    # greeting (~1 s with the short prompts), the question, then time to hear the answer; baresip
    # hangs up when its source file ends
    source = tmp_path / "caller.wav"
    write_wav(source, np.concatenate([silence(3.0), question, silence(12.0)]))
    records = tmp_path / "records"
    records.mkdir()
    conf = baresip_config(tmp_path, source, records)

    async def scenario() -> dict:
        async with phone_hub(hub_settings, knowledge_base) as app:
            port = app.state.phone.user_agent.port
            proc = await asyncio.create_subprocess_exec(
                BARESIP, "-f", str(conf), "-t", "30", "-e", f"/dial sip:057100000108@127.0.0.1:{port}",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL)
            try:
                out, _ = await asyncio.wait_for(proc.communicate(), 45)
            except TimeoutError:
                proc.kill()
                out, _ = await proc.communicate()
            for _ in range(100):
                if not app.state.phone.live_conversations():
                    break
                await asyncio.sleep(0.1)
            convs = await conversations(app)
            return {
                "output": out.decode(errors="replace"),
                "convs": convs,
                "transcripts": [await app.state.store.transcript(c.id) for c in convs],
            }

    with private_netns("xzp", host_address=False) as (ns, _):
        subprocess.run(["ip", "netns", "exec", ns, "ip", "route", "add", "default", "dev", "lo"], check=True)
        result = run_in_netns(ns, asyncio.run, scenario(), timeout=120)

    assert len(result["convs"]) == 1, result["output"][-3000:]
    conv = result["convs"][0]
    assert conv.channel == "phone" and conv.contact == "137******11" and conv.region_code == "330108"
    said = [m.text for m in result["transcripts"][0] if m.role == "resident"]
    assert any("异地" in t or "备案" in t for t in said), (said, result["output"][-3000:])
    assert any(m.role == "bot" for m in result["transcripts"][0])
    # what baresip heard: the greeting and the answer
    heard = [p for p in records.glob("*.wav") if p.name != "caller.wav"]
    loudest = 0
    for path in heard:
        try:
            with wave.open(str(path)) as w:
                pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
        except (wave.Error, EOFError):
            continue
        loudest = max(loudest, int(np.abs(pcm.astype(np.int32)).max()) if pcm.size else 0)
    assert loudest > 3000, ([p.name for p in heard], result["output"][-2000:])
