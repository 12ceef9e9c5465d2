"""Test support for the phone channel: a scripted SIP peer, a loopback packet capture, and sipp runs.

Used by tests/test_telephony_*.py and handy when trying the user agent by hand. Loopback only.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import struct
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import numpy as np

from .audio import FRAME_SAMPLES
from .dtmf import build_telephone_event, digit_to_event
from .g711 import alaw_decode, ulaw_decode, ulaw_encode
from .handler import CallHandler
from .noise import BadLine
from .rtp import RtpPacket, build_rtp, parse_rtp
from .sip_message import SipRequest, SipResponse, new_branch, new_tag, parse_message, parse_name_addr
from .user_agent import UserAgent, UserAgentConfig
from .vad import EchoGuard, SileroVad, TurnDetector

SIPP = shutil.which("sipp")


def free_udp_port(pair: bool = False) -> int:
    """A free UDP port on 127.0.0.1 (an even one with a free successor pair when ``pair``)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not pair:
            return port
        if port % 2 or port > 65000:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 2))
            return port
        except OSError:
            continue
    raise RuntimeError("no free UDP port")


def open_sockets() -> int:
    """How many sockets this process has open (Linux /proc): a call that leaks its RTP socket shows here."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                count += 1
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor)
    return count


async def until_sockets(count: int, timeout: float = 2.0) -> None:
    """Wait until this process has ``count`` sockets open (a transport closes its socket one loop turn later)."""
    deadline = time.monotonic() + timeout
    while (now := open_sockets()) != count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{now} sockets open, expected {count}: a call left its RTP socket behind")
        await asyncio.sleep(0.02)


async def until_no_calls(ua: UserAgent, timeout: float = 5.0) -> None:
    """Wait until the user agent holds no call and no slot (AssertionError after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while ua.calls or ua.slots_in_use:
        if time.monotonic() > deadline:
            raise AssertionError(f"calls still held after {timeout} s: {list(ua.calls.values())}")
        await asyncio.sleep(0.02)


@asynccontextmanager
async def running_user_agent(handler: CallHandler, **config: object) -> AsyncIterator[UserAgent]:
    """A user agent on an ephemeral loopback port, stopped (all calls hung up) on exit."""
    config.setdefault("port", 0)
    config.setdefault("rtp_port_range", None)
    ua = UserAgent(handler, UserAgentConfig(host="127.0.0.1", **config))  # type: ignore[arg-type]
    await ua.start()
    try:
        yield ua
    finally:
        await ua.stop()


@dataclass
class SippResult:
    returncode: int
    output: str
    errors: str
    elapsed_s: float


async def run_sipp(scenario: Path | str, target_port: int, *args: str, cwd: Path, timeout: float = 30.0,
                   calls: int = 1, media_port: int | None = None) -> SippResult:
    """Run a sipp scenario against 127.0.0.1:target_port; it is killed if it outlives ``timeout``."""
    assert SIPP is not None, "sipp is not installed (apt-get install sip-tester)"
    sip_port = free_udp_port()
    media_port = media_port or free_udp_port(pair=True)
    cmd = [SIPP, "-sf", str(scenario), f"127.0.0.1:{target_port}", "-i", "127.0.0.1", "-p", str(sip_port),
           "-mi", "127.0.0.1", "-mp", str(media_port), "-m", str(calls), "-nostdin",
           "-timeout", f"{int(timeout)}s", "-timeout_error", "-trace_err", *args]
    for old in cwd.glob("*_errors.log"):
        old.unlink()
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(*cmd, cwd=cwd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout + 10)
    except asyncio.TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
    errors = "".join(p.read_text(errors="replace") for p in cwd.glob("*_errors.log"))
    return SippResult(proc.returncode if proc.returncode is not None else -1, out.decode(errors="replace"), errors,
                      time.monotonic() - started)


class LoopbackCapture:
    """Captures UDP packets to one port on the loopback interface (AF_PACKET; needs CAP_NET_RAW)."""

    def __init__(self, dst_port: int) -> None:
        self.dst_port = dst_port
        self.packets: list[tuple[float, RtpPacket]] = []
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
        self._sock.bind(("lo", 0))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def available() -> bool:
        try:
            socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800)).close()
            return True
        except (OSError, AttributeError):
            return False

    def __enter__(self) -> "LoopbackCapture":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame, addr = self._sock.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            if addr[2] == socket.PACKET_OUTGOING:
                continue  # loopback shows every packet twice
            ip = frame[14:]
            if len(ip) < 28 or ip[9] != 17:
                continue
            ihl = (ip[0] & 0x0F) * 4
            _, dport, _, _ = struct.unpack_from("!HHHH", ip, ihl)
            if dport != self.dst_port:
                continue
            packet = parse_rtp(ip[ihl + 8 :])
            if isinstance(packet, RtpPacket):
                self.packets.append((time.monotonic(), packet))


@dataclass
class PeerCall:
    call_id: str
    from_tag: str
    to_tag: str | None = None
    cseq: int = 1
    invite_branch: str = ""
    responses: list[tuple[float, SipResponse]] = field(default_factory=list)


class SipPeer:
    """A scripted SIP endpoint on 127.0.0.1 that records everything it receives, with arrival times."""

    def __init__(self, ua_port: int) -> None:
        self.ua = ("127.0.0.1", ua_port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.rtp.bind(("127.0.0.1", 0))
        self.rtp.setblocking(False)
        self.rtp_port = self.rtp.getsockname()[1]
        self.received: list[tuple[float, SipRequest | SipResponse | object]] = []

    def close(self) -> None:
        self.sock.close()
        self.rtp.close()

    def send(self, data: bytes | str) -> None:
        self.sock.sendto(data.encode() if isinstance(data, str) else data, self.ua)

    async def receive(self, timeout: float = 2.0) -> SipRequest | SipResponse | None:
        loop = asyncio.get_running_loop()
        try:
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 65535), timeout)
        except asyncio.TimeoutError:
            return None
        message = parse_message(data)
        self.received.append((time.monotonic(), message))
        return message if isinstance(message, (SipRequest, SipResponse)) else None

    async def expect(self, status: int | str, timeout: float = 2.0) -> SipRequest | SipResponse:
        """The next message with this status (or request method), skipping others."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = await self.receive(left)
            if isinstance(msg, SipResponse) and msg.status == status:
                return msg
            if isinstance(msg, SipRequest) and msg.method == status:
                return msg
        raise AssertionError(f"no {status} within {timeout} s")

    def sdp_offer(self, codecs: str = "0 8 101", extra: str = "", port: int | None = None) -> str:
        lines = ["v=0", "o=peer 1 1 IN IP4 127.0.0.1", "s=-", "c=IN IP4 127.0.0.1", "t=0 0",
                 f"m=audio {port or self.rtp_port} RTP/AVP {codecs}", "a=rtpmap:101 telephone-event/8000",
                 "a=fmtp:101 0-15", "a=ptime:20"]
        return "\r\n".join(lines) + "\r\n" + extra

    def invite(self, *, dialled: str = "12393", caller: str = "13812345678", sdp: str | None = None,
               extra_headers: str = "", call: PeerCall | None = None) -> PeerCall:
        call = call or PeerCall(call_id=f"{new_tag()}@peer", from_tag=new_tag())
        call.invite_branch = new_branch()
        body = self.sdp_offer() if sdp is None else sdp
        ctype = "Content-Type: application/sdp\r\n" if body else ""
        self.send(
            f"INVITE sip:{dialled}@127.0.0.1:{self.ua[1]} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{self.port};branch={call.invite_branch};rport\r\n"
            f"Max-Forwards: 70\r\n"
            f"From: <sip:{caller}@127.0.0.1>;tag={call.from_tag}\r\n"
            f"To: <sip:{dialled}@127.0.0.1>\r\n"
            f"Call-ID: {call.call_id}\r\nCSeq: {call.cseq} INVITE\r\n"
            f"Contact: <sip:{caller}@127.0.0.1:{self.port}>\r\n{extra_headers}{ctype}"
            f"Content-Length: {len(body.encode())}\r\n\r\n{body}"
        )
        return call

    def in_dialog(self, method: str, call: PeerCall, *, branch: str | None = None, cseq: int | None = None,
                  body: str = "", content_type: str | None = None) -> None:
        if cseq is None:
            call.cseq += 1
            cseq = call.cseq
        to_tag = f";tag={call.to_tag}" if call.to_tag else ""
        ctype = f"Content-Type: {content_type}\r\n" if content_type else ""
        self.send(
            f"{method} sip:xiaozhi@127.0.0.1:{self.ua[1]} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{self.port};branch={branch or new_branch()};rport\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:13812345678@127.0.0.1>;tag={call.from_tag}\r\n"
            f"To: <sip:12393@127.0.0.1>{to_tag}\r\nCall-ID: {call.call_id}\r\nCSeq: {cseq} {method}\r\n"
            f"{ctype}Content-Length: {len(body.encode())}\r\n\r\n{body}"
        )

    def ack(self, call: PeerCall) -> None:
        self.in_dialog("ACK", call, cseq=call.cseq)

    def cancel(self, call: PeerCall) -> None:
        self.send(
            f"CANCEL sip:12393@127.0.0.1:{self.ua[1]} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{self.port};branch={call.invite_branch};rport\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:13812345678@127.0.0.1>;tag={call.from_tag}\r\n"
            f"To: <sip:12393@127.0.0.1>\r\nCall-ID: {call.call_id}\r\nCSeq: {call.cseq} CANCEL\r\n"
            f"Content-Length: 0\r\n\r\n"
        )

    async def answered_call(self, **invite_kwargs: object) -> tuple[PeerCall, SipResponse]:
        """INVITE, wait for 200 OK, ACK it."""
        call = self.invite(**invite_kwargs)  # type: ignore[arg-type]
        ok = await self.expect(200)
        assert isinstance(ok, SipResponse)
        call.to_tag = parse_name_addr(ok.headers.get("to") or "").tag
        self.ack(call)
        return call, ok

    async def receive_rtp(self, duration: float) -> list[tuple[float, tuple[str, int], bytes]]:
        loop = asyncio.get_running_loop()
        out = []
        end = time.monotonic() + duration
        while (left := end - time.monotonic()) > 0:
            try:
                data, addr = await asyncio.wait_for(loop.sock_recvfrom(self.rtp, 4096), left)
            except asyncio.TimeoutError:
                break
            out.append((time.monotonic(), addr, data))
        return out


def environment_has_sipp() -> bool:
    return SIPP is not None and os.access(SIPP, os.X_OK)


_SO_TIMESTAMPNS = 35  # Linux (asm-generic); Python's socket module does not name it


def _stamp_arrivals(sock: socket.socket) -> bool:
    """Ask the kernel to stamp each datagram with its arrival time; False where it cannot."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
    except OSError:
        return False
    return True


def _arrival(ancillary: list) -> float | None:
    """The kernel's arrival stamp (CLOCK_REALTIME) of one datagram, on the monotonic clock."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(data) >= 16:
            seconds, nanoseconds = struct.unpack("qq", data[:16])
            return seconds + nanoseconds / 1e9 - (time.time() - time.monotonic())
    return None


class RtpCaller:
    """The caller's media side of a ``SipPeer`` call: paced 20 ms PCMU out, every packet in recorded.

    ``await say(samples)`` sends 8 kHz audio in real time (silence packets with ``pause``; through
    ``line``, a ``BadLine``, with its noise and lost packets; ``said_at`` is when its first packet
    left), ``key`` sends an RFC 4733 event; ``received`` holds (monotonic time, RtpPacket) of what the
    bot sent. The time is the kernel's arrival stamp (SO_TIMESTAMPNS), not when this event loop got
    round to reading the packet: on a loaded machine the loop that reads also runs the hub, and a
    reader's own lag must not count as the bot's.
    """

    def __init__(self, peer: SipPeer, ok: SipResponse, dtmf_pt: int = 101, line: BadLine | None = None) -> None:
        body = ok.body.decode(errors="replace")
        port = int(body.split("m=audio ", 1)[1].split()[0])
        self.target = ("127.0.0.1", port)
        self.sock = peer.rtp
        self.dtmf_pt = dtmf_pt
        self.ssrc = 0x1234ABCD
        self.seq = 1000
        self.ts = 160000
        self.received: list[tuple[float, RtpPacket]] = []
        self.line = line  # noise under all audio sent, lost audio packets (keys are sent whole)
        self.said_at = 0.0
        self.audio_frames = 0  # audio packets sent and not lost on the way
        self._next = time.monotonic()
        self._stamped = _stamp_arrivals(self.sock)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        while True:
            try:
                data, ancillary, _flags, _addr = self.sock.recvmsg(4096, 64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # the socket was closed under us
                return
            arrived = _arrival(ancillary) if self._stamped else None
            packet = parse_rtp(data)
            if isinstance(packet, RtpPacket):
                self.received.append((time.monotonic() if arrived is None else arrived, packet))

    def close(self) -> None:
        try:
            self._loop.remove_reader(self.sock.fileno())
        except (ValueError, OSError):  # already closed
            pass

    async def _tick(self) -> None:
        self._next = max(self._next + 0.02, time.monotonic() - 0.02)
        await asyncio.sleep(max(0.0, self._next - time.monotonic()))

    def _send(self, pt: int, payload: bytes, marker: bool = False, ts: int | None = None) -> None:
        self.sock.sendto(build_rtp(pt, self.seq, self.ts if ts is None else ts, self.ssrc, payload, marker=marker),
                         self.target)
        self.seq = (self.seq + 1) & 0xFFFF

    async def say(self, samples) -> float:
        """Send audio paced at 20 ms; returns the monotonic time its last packet was sent."""
        pcm = np.asarray(samples, dtype=np.int16)
        pcm = np.concatenate([pcm, np.zeros(-pcm.size % 160, np.int16)])
        for i in range(0, pcm.size, 160):
            await self._tick()
            if i == 0:
                self.said_at = time.monotonic()
            packet = pcm[i : i + 160] if self.line is None else self.line.packet(pcm[i : i + 160])
            if packet is not None:
                self._send(0, ulaw_encode(packet))
                self.audio_frames += 1
            else:
                self.seq = (self.seq + 1) & 0xFFFF  # lost on the way: the receiver sees the gap
            self.ts = (self.ts + 160) & 0xFFFFFFFF
        return time.monotonic()

    async def pause(self, seconds: float) -> None:
        await self.say(np.zeros(int(seconds * 8000), np.int16))

    async def key(self, digit: str, duration_ms: int = 100) -> None:
        """An RFC 4733 key press (start, continuation, three end packets), audio silent meanwhile."""
        event = digit_to_event(digit)
        ts = self.ts
        steps = duration_ms // 20
        for i in range(1, steps + 1):
            await self._tick()
            dur = i * 160
            end = i == steps
            payload = build_telephone_event(event, end=end, duration=dur)
            for _ in range(3 if end else 1):
                self._send(self.dtmf_pt, payload, marker=i == 1, ts=ts)
            self.ts = (self.ts + 160) & 0xFFFFFFFF

    def bot_audio(self, since: float = 0.0) -> list[tuple[float, RtpPacket]]:
        """Packets from the bot after ``since`` that carry sound (not µ-law silence)."""
        out = []
        for t, p in self.received:
            if t >= since and p.payload_type in (0, 8) and p.payload:
                pcm = ulaw_decode(p.payload) if p.payload_type == 0 else alaw_decode(p.payload)
                if int(np.abs(pcm.astype(np.int32)).max()) > 300:
                    out.append((t, p))
        return out


def barge_in_at(bot: np.ndarray, barge_in_ms: int, echo_gain: float, delay_ms: int,
                caller: np.ndarray | None = None, caller_at: int = 0) -> float | None:
    """Milliseconds into the bot's speech at which barge-in is decided, or None if never.

    The caller's line as ``VoiceBot`` hears it while the bot says ``bot``: its echo (``echo_gain``,
    ``delay_ms`` late) plus ``caller`` from sample ``caller_at``, through µ-law; per frame Silero VAD,
    the echo guard every other voiced frame (voice.py's rule), the turn detector, and barge-in once
    the turn is voiced for ``barge_in_ms``. In audio time, so machine load does not enter it.
    """
    vad, guard, turns = SileroVad(), EchoGuard(), TurnDetector(end_silence_ms=600, pause_ms=300)
    delay = delay_ms * 8
    said = np.zeros(bot.size)
    if caller is not None:
        said[caller_at:caller_at + caller.size] = caller[: bot.size - caller_at]
    voiced_frames, echo = 0, False
    for i in range(0, bot.size - FRAME_SAMPLES, FRAME_SAMPLES):
        guard.sent(bot[i:i + FRAME_SAMPLES])
        echoed = bot[i - delay:i - delay + FRAME_SAMPLES] if i >= delay else np.zeros(FRAME_SAMPLES)
        mixed = np.clip(echoed * echo_gain + said[i:i + FRAME_SAMPLES], -32768, 32767).astype(np.int16)
        line = ulaw_decode(ulaw_encode(mixed))
        guard.received(line)
        speech = vad.is_speech(line)
        if speech:
            voiced_frames += 1
            if voiced_frames % 2:
                echo = guard.is_echo()
            speech = not echo
        turns.feed(line.astype("<i2").tobytes(), speech)
        if turns.in_turn and turns.voiced_ms >= barge_in_ms:
            return (i + FRAME_SAMPLES) / 8
    return None
