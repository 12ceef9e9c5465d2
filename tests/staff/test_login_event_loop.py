"""Staff logins never stall the hub's event loop (issue 17).

argon2 costs 0.1-0.25 s of CPU per check on purpose. Run on the event loop, every login froze chat,
WebSockets and the RTP pacing of live calls for that long: ten logins at once took chat's p95 from
about 50 ms to 365 ms. Measured here against the real hub with the real (default) argon2 cost: how
late the event loop wakes a ticker that sleeps 5 ms at a time, without logins and while 20 staff
log in at once from 20 addresses. Logins run in worker threads, so the loop's lag must not grow by
more than 50 ms (the issue's bound), compared on the 95th percentile of all wake-ups of the window,
not on a single one, so a loaded CI machine's scheduling hiccup does not decide it.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from tests.support import ADMIN_PASSWORD, client_from

TICK_S = 0.005


async def _ticker(stop: threading.Event) -> list[float]:
    """How late each 5 ms sleep of the hub's loop ended, until ``stop`` is set."""
    lags = []
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        start = loop.time()
        await asyncio.sleep(TICK_S)
        lags.append(loop.time() - start - TICK_S)
    return lags


def _lag_while(hub, work) -> list[float]:
    stop = threading.Event()
    ticking = hub.portal.start_task_soon(_ticker, stop)
    try:
        work()
    finally:
        stop.set()
    return ticking.result(timeout=30)


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


def test_twenty_logins_at_once_leave_the_event_loop_answering(hub):
    """Right passwords, wrong ones and unknown names (the dummy check) from 20 addresses at once."""
    attempts = [("admin", ADMIN_PASSWORD, 200)] * 10 + [("admin", "wrong-password-1", 401)] * 5
    attempts += [("nobody-here", "wrong-password-1", 401)] * 5
    clients = [client_from(hub, f"10.17.0.{i}") for i in range(1, len(attempts) + 1)]

    def login(client, attempt) -> int:
        username, password, _ = attempt
        return client.post("/api/staff/login", json={"username": username, "password": password}).status_code

    assert login(client_from(hub, "10.17.1.1"), attempts[0]) == 200  # the loop has run every code path once
    codes: list[int] = []
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(attempts)) as pool:
        busy = _lag_while(hub, lambda: codes.extend(pool.map(login, clients, attempts)))
    window = time.monotonic() - started
    quiet = _lag_while(hub, lambda: time.sleep(window))
    assert codes == [expected for *_, expected in attempts]
    figures = (f"{len(attempts)} logins in {window:.2f} s; loop lag p50/p95/max without logins "
               f"{_ms(quiet)}, during them {_ms(busy)}")
    assert p95(busy) - p95(quiet) < 0.050, figures


def _ms(lags: list[float]) -> str:
    return f"{statistics.median(lags) * 1e3:.1f}/{p95(lags) * 1e3:.1f}/{max(lags) * 1e3:.1f} ms ({len(lags)} wake-ups)"
