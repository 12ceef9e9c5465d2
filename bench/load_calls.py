"""Call load with sipp: concurrent calls ramped in steps against the SIP user agent.

Each step keeps N calls up at once (sipp -l N, call rate N / hold time), every call sending the
caller's audio (a looped 2 s tone, headerless µ-law) for --hold seconds before BYE, and runs 2N
calls in all. Per step it prints successful/failed calls, the INVITE -> 200 OK time (p50/p95,
from sipp's -trace_rtt) and, when it started the user agent itself, that process's CPU per call
and per call-second (from /proc). The ramp stops after the first step with a failed call.

    .venv/bin/python bench/load_calls.py [--steps 10,20,40,80] [--hold 10]      # starts python -m telephony.sip
    .venv/bin/python bench/load_calls.py --target 127.0.0.1:5060 --pid <hub pid>  # the hub's SIP port

Needs sipp (Debian sip-tester) and sox.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCENARIO = Path(__file__).resolve().parent / "sipp" / "load_call.xml"


def free_port(kind=socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def start_user_agent(port: int, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "telephony.sip", "--host", "127.0.0.1", "--port", str(port), "--rtp-ports", "auto",
             "--log-level", "WARNING"],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 30
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.settimeout(0.5)
    options = (f"OPTIONS sip:probe@127.0.0.1:{port} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{{}};branch=z9hG4bKprobe\r\n"
               "From: <sip:probe@127.0.0.1>;tag=p\r\nTo: <sip:probe@127.0.0.1>\r\nCall-ID: probe\r\nCSeq: 1 OPTIONS\r\n"
               "Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n")
    probe.bind(("127.0.0.1", 0))
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the user agent exited:\n{log.read_text()}")
        probe.sendto(options.format(probe.getsockname()[1]).encode(), ("127.0.0.1", port))
        try:
            if probe.recv(4096).startswith(b"SIP/2.0 200"):
                probe.close()
                return proc
        except OSError:
            pass
    proc.kill()
    raise SystemExit("the user agent did not answer OPTIONS")


def run_step(target: str, calls: int, hold_s: float, workdir: Path) -> dict:
    for old in workdir.glob("load_call_*"):
        old.unlink()
    rate = max(1.0, calls / hold_s)
    cmd = ["sipp", "-sf", str(SCENARIO), target, "-s", "12393", "-i", "127.0.0.1", "-p", str(free_port()),
           "-mi", "127.0.0.1", "-mp", str(free_port()), "-l", str(calls), "-m", str(2 * calls),
           "-r", f"{rate:.2f}", "-d", str(int(hold_s * 1000)), "-nostdin", "-trace_rtt", "-rtt_freq", "1",
           "-timeout", f"{int(4 * hold_s + 60)}s", "-max_recv_loops", "10000"]
    started = time.monotonic()
    result = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, errors="replace")
    wall = time.monotonic() - started

    def cumulative(name: str) -> int:
        found = re.findall(rf"{name}\s*\|\s*\d+\s*\|\s*(\d+)", result.stdout)
        return int(found[-1]) if found else 0

    rtts = []
    for csv in workdir.glob("load_call_*_rtt.csv"):
        for line in csv.read_text().splitlines()[1:]:
            parts = line.split(";")
            if len(parts) >= 2:
                rtts.append(float(parts[1]))
    return {
        "calls": calls,
        "ok": cumulative("Successful call"),
        "failed": cumulative("Failed call"),
        "setup_p50_ms": statistics.median(rtts) if rtts else float("nan"),
        "setup_p95_ms": percentile(rtts, 0.95) if rtts else float("nan"),
        "wall_s": wall,
        "returncode": result.returncode,
        "tail": result.stdout[-1500:] + result.stderr[-500:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", help="host:port of a running SIP endpoint (default: start python -m telephony.sip)")
    parser.add_argument("--pid", type=int, help="process to measure CPU of, with --target")
    parser.add_argument("--steps", default="10,20,40,80")
    parser.add_argument("--hold", type=float, default=10.0, help="seconds each call lasts")
    args = parser.parse_args()
    if not shutil.which("sipp"):
        raise SystemExit("sipp not found: apt-get install sip-tester")

    workdir = Path(tempfile.mkdtemp(prefix="xiaozhi-calls-"))
    subprocess.run(["sox", "-n", "-r", "8000", "-c", "1", "-t", "ul", str(workdir / "caller.ulaw"),
                    "synth", "2", "sine", "300-900"], check=True)
    ua = None
    pid = args.pid
    if args.target:
        target = args.target
    else:
        port = free_port()
        ua = start_user_agent(port, workdir / "ua.log")
        target, pid = f"127.0.0.1:{port}", ua.pid
    print(f"sipp call load against {target}: {args.hold:g} s calls with PCMU audio, {os.cpu_count()} cores")
    try:
        for n in (int(x) for x in args.steps.split(",")):
            cpu0 = cpu_seconds(pid) if pid else None
            r = run_step(target, n, args.hold, workdir)
            cpu = ""
            if pid:
                used = cpu_seconds(pid) - cpu0
                total_calls = max(1, r["ok"] + r["failed"])
                cpu = (f"  UA CPU {1000 * used / total_calls:.0f} ms/call, "
                       f"{100 * used / (total_calls * args.hold):.2f} % of a core per live call")
            print(f"{n:4d} concurrent  {r['ok']:4d} ok  {r['failed']:3d} failed  INVITE->200 p50 "
                  f"{r['setup_p50_ms']:.0f} ms  p95 {r['setup_p95_ms']:.0f} ms  ({r['wall_s']:.0f} s){cpu}", flush=True)
            if r["failed"] or r["returncode"] not in (0, 1) or r["ok"] == 0:
                print(f"failures at {n} concurrent calls: stopping\n{r['tail']}")
                break
    finally:
        if ua is not None:
            ua.send_signal(signal.SIGINT)
            try:
                ua.wait(timeout=10)
            except subprocess.TimeoutExpired:
                ua.kill()


if __name__ == "__main__":
    main()
