"""WebRTC tests in a private network namespace (we run as root; iproute2 is installed).

What works on this machine (checked): aioice never offers 127.0.0.1 as a host candidate, and
Chromium ignores loopback unless started with --allow-loopback-in-peer-connection. The kernel here
has no ``dummy`` link type, so the namespace gets ``lo`` up plus a private /32 on ``lo``
(10.203.x.y): aioice offers that address, Chromium (with the loopback flag) offers it too, and the
traffic never leaves the namespace. No other engineer's ports or processes are visible in it.

A network namespace belongs to a *thread* (setns(2)); threads and processes started from a thread
inherit it. So a scenario runs in ``run_in_netns(name, fn)``: a fresh thread joins the namespace
and calls ``fn``; the hub (uvicorn in a thread it starts), Chromium (Playwright's driver, which it
starts) and aiortc clients made there all live inside. HTTP URLs are then 127.0.0.1 *of the
namespace*: reach them only from inside.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import subprocess
import threading
from contextlib import contextmanager

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = (["ip", "netns", "exec", ns, "ip"] if ns else ["ip"]) + list(args)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {result.stderr.strip()}")


def netns_available() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


@contextmanager
def private_netns(prefix: str = "xzv", *, host_address: bool = True):
    """A namespace with loopback up and (``host_address``) a private address on it; yields (name, address).

    Without the address aioice has no host candidate at all: media can only go through a TURN relay
    on 127.0.0.1, which is how the coturn test proves the relay path.
    """
    name = f"{prefix}-{secrets.token_hex(3)}"
    address = f"10.203.{secrets.randbelow(250) + 1}.{secrets.randbelow(250) + 2}" if host_address else None
    _ip("netns", "add", name)
    try:
        _ip("link", "set", "lo", "up", ns=name)
        if address:
            _ip("addr", "add", f"{address}/32", "dev", "lo", ns=name)
        yield name, address
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def enter_netns(name: str) -> None:
    """Move the calling thread into the namespace (threads/processes it starts follow)."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def run_in_netns(name: str, fn, *args, timeout: float = 600, **kwargs):
    """Call ``fn(*args, **kwargs)`` in a new thread inside the namespace; return its result or raise its error."""
    box: dict = {}

    def target() -> None:
        try:
            enter_netns(name)
            box["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"scenario in {name} still running after {timeout} s")
    if "error" in box:
        raise box["error"]
    return box.get("result")
