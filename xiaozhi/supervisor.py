"""``xiaozhi run``: start the action server, Rasa and the hub, wait until each is healthy, stop all together.

Children run in their own process groups and are told to die with this process (PR_SET_PDEATHSIG),
so neither Ctrl-C nor a killed supervisor leaves an orphan behind.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from xiaozhi.rasa_model import rasa_environment
from xiaozhi.settings import REPO_ROOT, Settings

_PR_SET_PDEATHSIG = 1
MAX_RESTARTS = 5  # per service within RESTART_WINDOW_S, then `xiaozhi run` gives up loudly
RESTART_WINDOW_S = 300.0


PRIVATE_UMASK = 0o077  # what the services create (databases, logs, recordings) only their user reads


def _child_setup() -> None:
    os.setsid()
    os.umask(PRIVATE_UMASK)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: Ctrl-C handling still stops the children
        pass


@dataclass
class Service:
    name: str
    argv: list[str]
    health_url: str
    env: dict[str, str]
    timeout_s: float
    log_path: Path
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Logs hold masked text, but still who called when: readable by this user only (0600).
        out = os.fdopen(os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
        os.chmod(self.log_path, 0o600)  # also a log an older release created world-readable
        self.proc = subprocess.Popen(
            self.argv, cwd=REPO_ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, preexec_fn=_child_setup,
        )
        out.close()

    def healthy(self) -> bool:
        try:
            return httpx.get(self.health_url, timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace_s: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass


def services(settings: Settings, model: Path) -> list[Service]:
    rasa_env = rasa_environment(settings)
    logs = settings.var_dir / "logs"
    rasa_bin = settings.rasa_venv / "bin"
    base = f"http://{settings.host}"
    # Rasa's HTTP API can replace the model and rewrite trackers: it only answers with this token.
    token = settings.rasa_token.get_secret_value() if settings.rasa_token else secrets.token_urlsafe(24)
    hub_env = dict(os.environ, XIAOZHI_RASA_URL=settings.effective_rasa_url, XIAOZHI_RASA_TOKEN=token)
    return [
        Service(
            "action server",
            [str(rasa_bin / "python"), "-m", "rasa_sdk", "--actions", "bot.actions",
             "--port", str(settings.actions_port)],
            f"{base}:{settings.actions_port}/health", rasa_env, 60, logs / "actions.log",
        ),
        Service(
            "hub",
            [sys.executable, "-m", "xiaozhi", "hub"],
            f"{base}:{settings.hub_port}/readyz", hub_env, 120, logs / "hub.log",
        ),
        Service(
            "Rasa",
            # No --auth-token here: a command line is readable by every user (ps). Rasa gets the token in
            # its environment; bot/rasa_runtime/sitecustomize.py hands it to Rasa's API, and the xiaozhi
            # channel requires it from the hub.
            [str(rasa_bin / "rasa"), "run", "--enable-api", "--model", str(model),
             "--endpoints", "bot/endpoints.yml", "--credentials", "bot/credentials.yml",
             "--interface", settings.host, "--port", str(settings.rasa_port)],
            f"{base}:{settings.rasa_port}/status?token={token}", dict(rasa_env, XIAOZHI_RASA_TOKEN=token),
            settings.rasa_startup_timeout_s, logs / "rasa.log",
        ),
    ]


def run_all(settings: Settings, model: Path, *, log=print) -> int:
    """Start everything, report when healthy, and keep running until Ctrl-C or a child dies."""
    procs = services(settings, model)
    stopping = False

    def _stop(signum, frame):  # noqa: ARG001
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    started = time.monotonic()
    try:
        def launch(svc: Service) -> None:
            svc.start()
            log(f"started {svc.name} (pid {svc.proc.pid}), log: {svc.log_path}")

        for svc in procs:
            launch(svc)
        pending = list(procs)
        while pending and not stopping:
            for svc in list(pending):
                if not svc.alive():
                    log(f"{svc.name} exited during start-up (code {svc.proc.returncode}); see {svc.log_path}")
                    return 1
                if svc.healthy():
                    log(f"{svc.name} ready after {time.monotonic() - started:.1f} s")
                    pending.remove(svc)
                elif time.monotonic() - started > svc.timeout_s:
                    log(f"{svc.name} not healthy after {svc.timeout_s:.0f} s; see {svc.log_path}")
                    return 1
            time.sleep(0.5)
        if stopping:
            return 130
        hub = settings.effective_hub_url
        log(
            f"\n医保小智 is running (cold start {time.monotonic() - started:.1f} s):\n"
            f"  chat page     {hub}/\n  API docs      {hub}/docs\n"
            f"  Rasa          {settings.effective_rasa_url}\n"
            f"  action server http://{settings.host}:{settings.actions_port}\n"
            + (f"  phone (SIP)   sip:12393@{settings.sip_advertised_host or settings.host}:{settings.sip_port}\n"
               if settings.sip_enabled else "")
            + "Press Ctrl-C to stop."
        )
        restarts: dict[str, list[float]] = {svc.name: [] for svc in procs}
        while not stopping:
            for svc in procs:
                if svc.alive():
                    continue
                now = time.monotonic()
                recent = [t for t in restarts[svc.name] if now - t < RESTART_WINDOW_S]
                if len(recent) >= MAX_RESTARTS:
                    log(f"{svc.name} keeps failing ({len(recent)} restarts in {RESTART_WINDOW_S:.0f} s); "
                        f"stopping everything; see {svc.log_path}")
                    return 1
                # The hub answers from the knowledge base meanwhile: restart, do not give up.
                log(f"{svc.name} stopped unexpectedly (code {svc.proc.returncode}); restarting; see {svc.log_path}")
                restarts[svc.name] = recent + [now]
                launch(svc)
            time.sleep(1.0)
        return 0
    finally:
        for svc in reversed(procs):
            svc.stop()
        log("all services stopped")
