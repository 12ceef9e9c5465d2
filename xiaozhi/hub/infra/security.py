"""Per-client rate limits, request-body limits and security headers for the hub (pure ASGI middleware).

- ``RateLimiter``: token buckets keyed by (rule, client); ``"30/minute"`` means a burst of 30 and
  a refill of 30 per minute. Limited: session creation, messages (per conversation, HTTP and
  WebSocket share one bucket), knowledge-base search and staff login (per client address).
- ``HubSecurityMiddleware``: answers 429 with a Chinese message and ``Retry-After``; refuses
  request bodies larger than ``max_body_bytes``, whether a Content-Length declares it (refused
  before the application runs) or they arrive chunked (counted as they come); adds security headers: a strict CSP on the hub's own pages, a CSP that
  forbids everything on API responses, ``X-Content-Type-Options``, ``Referrer-Policy``,
  ``Cache-Control: no-store`` on the API (it carries personal data), HSTS over HTTPS.

The client address is the ASGI ``client``; behind a reverse proxy uvicorn replaces it with the
``X-Forwarded-For`` address when the proxy is in ``FORWARDED_ALLOW_IPS`` (uvicorn's setting;
``xiaozhi hub`` trusts no proxy unless it is set). A request that came through a proxy (it carries
``X-Forwarded-For`` or ``Forwarded``) is never exempt from the limits, whatever address it names: the
exempt callers (the action servers, health checks) reach the hub directly, so no client can claim an
exempt address through a proxy, even where the proxies' network and the exempt network are the same
(the Kubernetes pod network). docs/threat-model.md, "Trusted proxies".
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable

from xiaozhi.hub.infra.errors import error_body

log = logging.getLogger(__name__)

_PERIODS = {"second": 1.0, "sec": 1.0, "s": 1.0, "minute": 60.0, "min": 60.0, "m": 60.0, "hour": 3600.0, "h": 3600.0}

@dataclass(frozen=True)
class Rate:
    """``count`` events per ``period_s`` seconds, with a burst of ``count``."""

    count: int
    period_s: float

    @classmethod
    def parse(cls, text: str) -> "Rate":
        """``"30/minute"``, ``"5/second"``, ``"100/hour"``, ``"10/30s"`` (10 per 30 seconds)."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d*)\s*([a-z]+)\s*", text.lower())
        if not match or match.group(3) not in _PERIODS or int(match.group(1)) <= 0:
            raise ValueError(f"not a rate: {text!r} (expected e.g. '30/minute')")
        multiple = int(match.group(2)) if match.group(2) else 1
        if multiple <= 0:
            raise ValueError(f"not a rate: {text!r}")
        return cls(int(match.group(1)), _PERIODS[match.group(3)] * multiple)

    @property
    def per_second(self) -> float:
        return self.count / self.period_s


class RateLimiter:
    """Token buckets per key. Thread-safe; idle buckets (full again) are forgotten to bound memory."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000) -> None:
        self._clock = clock
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}  # key -> (tokens, updated)
        self._lock = threading.Lock()
        self._max_keys = max_keys
        self._last_sweep = clock()

    def hit(self, rule: str, key: str, rate: Rate, cost: float = 1.0) -> float:
        """Take ``cost`` tokens; returns 0 when allowed, else the seconds until it would be."""
        now = self._clock()
        with self._lock:
            tokens, updated = self._buckets.get((rule, key), (float(rate.count), now))
            tokens = min(float(rate.count), tokens + (now - updated) * rate.per_second)
            if tokens >= cost:
                self._buckets[(rule, key)] = (tokens - cost, now)
                allowed = 0.0
            else:
                self._buckets[(rule, key)] = (tokens, now)
                allowed = (cost - tokens) / rate.per_second
            if len(self._buckets) > self._max_keys or now - self._last_sweep > 60:
                self._sweep(now, rate)
        return allowed

    def _sweep(self, now: float, rate: Rate) -> None:
        # A bucket untouched for a whole period is full again: forgetting it changes nothing.
        horizon = max(rate.period_s, 3600.0)
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < horizon}
        if len(self._buckets) > self._max_keys:  # under attack from many addresses: keep the newest
            newest = sorted(self._buckets.items(), key=lambda kv: kv[1][1])[-self._max_keys // 2 :]
            self._buckets = dict(newest)
        self._last_sweep = now

    def __len__(self) -> int:
        return len(self._buckets)


# One token bucket, atomically, on the Redis server's clock (replicas' clocks never meet here).
# The bucket expires once it would be full again, so idle clients cost no memory.
_BUCKET_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local capacity, per_second, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(bucket[1]), tonumber(bucket[2])
if tokens == nil or at == nil then tokens, at = capacity, now end
tokens = math.min(capacity, tokens + math.max(0, now - at) * per_second)
local wait = 0
if tokens >= cost then tokens = tokens - cost else wait = (cost - tokens) / per_second end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(capacity / per_second) + 1)
return tostring(wait)
"""


class SharedRateLimiter:
    """The same token buckets in Redis, so every hub replica draws on one allowance per client.

    ``XIAOZHI_RATE_LIMIT_REDIS_URL`` (the deployment's Redis, also Rasa's lock store). When Redis
    does not answer, the replica falls back to its own in-memory buckets (``fallback``) and says so
    in the log, retrying Redis after ``retry_s``: a broken Redis must not take the hotline down.
    """

    def __init__(self, url: str, fallback: RateLimiter, *, timeout_s: float = 0.25, retry_s: float = 5.0,
                 prefix: str = "xiaozhi:rate:") -> None:
        import redis.asyncio as redis_asyncio

        self.fallback = fallback
        self.retry_s = retry_s
        self._prefix = prefix
        self._client = redis_asyncio.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._bucket = self._client.register_script(_BUCKET_LUA)
        self._down_until = 0.0  # monotonic: while Redis is considered down, the fallback answers
        self.redis_ok = True  # False while this replica limits on its own

    async def hit(self, rule: str, key: str, rate: Rate, cost: float = 1.0) -> float:
        from redis.exceptions import RedisError

        if time.monotonic() < self._down_until:
            return self.fallback.hit(rule, key, rate, cost)
        try:
            wait = float(await self._bucket(keys=[f"{self._prefix}{rule}:{key}"],
                                            args=[rate.count, rate.per_second, cost]))
        except (RedisError, OSError, TimeoutError) as exc:
            self._down_until = time.monotonic() + self.retry_s
            if self.redis_ok:
                log.error("rate limits: Redis is not answering (%s); this replica limits on its own until it does",
                          type(exc).__name__)
                self.redis_ok = False
            return self.fallback.hit(rule, key, rate, cost)
        if not self.redis_ok:
            log.warning("rate limits: Redis answers again; limits are shared by the replicas")
            self.redis_ok = True
        return wait

    async def close(self) -> None:
        await self._client.aclose()


@dataclass(frozen=True)
class Rule:
    name: str
    method: str
    path: re.Pattern
    key: str  # "client" (address) or "session" (the conversation id in the path)
    rate: Rate


def _networks(text: str) -> list:
    return [ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip()]


class Limits:
    """The hub's limits, built from settings; shared by the middleware and the WebSocket handler."""

    def __init__(self, settings, limiter: RateLimiter | None = None) -> None:
        self.enabled = settings.rate_limit_enabled
        self.limiter = limiter or RateLimiter()  # this replica's buckets (the fallback when shared)
        self.shared = (
            SharedRateLimiter(settings.rate_limit_redis_url, self.limiter)
            if settings.rate_limit_redis_url and self.enabled else None
        )
        self.exempt = _networks(settings.rate_limit_exempt_networks)
        self.messages = Rate.parse(settings.rate_limit_messages)
        self.rules = [
            # chat sessions and video kiosk sessions
            Rule("sessions", "POST", re.compile(r"^/api/(?:video/)?sessions/?$"), "client",
                 Rate.parse(settings.rate_limit_sessions)),
            # chat messages and the text beside a video call
            Rule("messages", "POST", re.compile(r"^/api/(?:video/)?sessions/([^/]+)/(?:messages|chat)/?$"), "session",
                 self.messages),
            Rule("kb_search", "GET", re.compile(r"^/api/kb/"), "client", Rate.parse(settings.rate_limit_kb_search)),
            Rule("login", "POST", re.compile(r"^/api/staff/login/?$"), "client", Rate.parse(settings.rate_limit_login)),
        ]

    def is_exempt(self, client: str, via_proxy: bool = False) -> bool:
        if via_proxy:
            return False  # an address named in X-Forwarded-For is a claim, not an internal caller
        try:
            address = ipaddress.ip_address(client)
        except ValueError:
            return False
        return any(address in net for net in self.exempt)

    async def _hit(self, rule: str, key: str, rate: Rate) -> float:
        if self.shared is not None:
            return await self.shared.hit(rule, key, rate)
        return self.limiter.hit(rule, key, rate)

    async def close(self) -> None:
        if self.shared is not None:
            await self.shared.close()

    async def check_request(self, method: str, path: str, client: str,
                            via_proxy: bool = False) -> tuple[str, float] | None:
        """(rule name, retry-after seconds) when this request is over its limit, else None."""
        if not self.enabled or self.is_exempt(client, via_proxy):
            return None
        for rule in self.rules:
            if rule.method != method:
                continue
            match = rule.path.match(path)
            if match is None:
                continue
            key = match.group(1) if rule.key == "session" else client
            wait = await self._hit(rule.name, key, rule.rate)
            return (rule.name, wait) if wait > 0 else None
        return None

    async def check_message(self, conversation_id: str, client: str, via_proxy: bool = False) -> float:
        """A WebSocket message: the same per-conversation bucket as HTTP messages. Returns the wait."""
        if not self.enabled or self.is_exempt(client, via_proxy):
            return 0.0
        return await self._hit("messages", conversation_id, self.messages)


def _client_host(scope) -> str:
    client = scope.get("client")
    return client[0] if client else ""


def proxy_options(environ) -> dict:
    """uvicorn's proxy settings for the hub: X-Forwarded-For is believed only from the proxies listed in
    FORWARDED_ALLOW_IPS. Unset, no proxy is trusted: uvicorn's own default trusts 127.0.0.1, so any local
    client could name any address (a fresh rate-limit bucket per request)."""
    trusted = (environ.get("FORWARDED_ALLOW_IPS") or "").strip()
    return {"proxy_headers": bool(trusted), "forwarded_allow_ips": trusted or None}


def via_proxy(headers) -> bool:
    """Whether a request came through a proxy: it names a client in X-Forwarded-For or Forwarded.
    ``headers``: ASGI (name, value) byte pairs or a mapping of lower-case names."""
    names = headers.keys() if hasattr(headers, "keys") else (name for name, _ in headers)
    return any(name in (b"x-forwarded-for", b"forwarded", "x-forwarded-for", "forwarded") for name in names)


PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; style-src-attr 'unsafe-inline'; img-src 'self' data: blob:; "
    "media-src 'self' blob:; connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors {frame_ancestors}"
)
# Swagger UI and ReDoc (FastAPI's /docs, /redoc) load from jsDelivr and start with an inline script.
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net https://fonts.googleapis.com; "
    "img-src 'self' data: https://fastapi.tiangolo.com https://cdn.redoc.ly; font-src 'self' https://fonts.gstatic.com; "
    "worker-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'"


def security_headers(path: str, content_type: str, scheme: str, frame_ancestors: str) -> list[tuple[bytes, bytes]]:
    """The headers added to a response (existing ones of the same name are kept)."""
    headers = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
    if content_type.startswith("text/html"):
        csp = DOCS_CSP if path in ("/docs", "/redoc", "/docs/oauth2-redirect") else PAGE_CSP.format(
            frame_ancestors=frame_ancestors or "'none'"
        )
        headers += [
            (b"content-security-policy", csp.encode()),
            (b"permissions-policy", b"camera=(self), microphone=(self), geolocation=(), payment=(), usb=()"),
            (b"cross-origin-opener-policy", b"same-origin"),
        ]
    elif content_type.startswith(("application/javascript", "text/javascript")):
        # Scripts (the widget) are loaded by other sites: allow that explicitly, nothing else.
        headers.append((b"cross-origin-resource-policy", b"cross-origin"))
    else:
        headers.append((b"content-security-policy", API_CSP.encode()))
    if path.startswith("/api/"):
        headers.append((b"cache-control", b"no-store"))
    if scheme in ("https", "wss"):
        headers.append((b"strict-transport-security", b"max-age=31536000; includeSubDomains"))
    return headers


class HubSecurityMiddleware:
    """Rate limits, body-size limit (also for chunked bodies) and security headers, in one ASGI layer."""

    def __init__(self, app, *, limits: Limits, max_body_bytes: int, frame_ancestors: str,
                 upload_paths: dict[str, int] | None = None) -> None:
        self.app = app
        self.limits = limits
        self.max_body_bytes = max_body_bytes
        self.frame_ancestors = frame_ancestors
        # The few staff upload endpoints (a knowledge spreadsheet) and their own limits; all else max_body_bytes.
        self.upload_paths = upload_paths or {}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        limited = await self.limits.check_request(scope["method"], path, _client_host(scope),
                                                  via_proxy(scope.get("headers", ())))
        if limited is not None:
            rule, wait = limited
            log.info("%s %s from a client over the %s limit: 429", scope["method"], path, rule)
            await self._reject(send, 429, "rate_limited", path, scope,
                               [(b"retry-after", str(max(1, math.ceil(wait))).encode())])
            return

        max_body_bytes = self.upload_paths.get(path, self.max_body_bytes)
        declared = next((v.decode("latin-1") for n, v in scope.get("headers", ()) if n == b"content-length"), None)
        if declared is not None and (not declared.isdigit() or int(declared) > max_body_bytes):
            log.info("%s %s rejected: body of %s bytes", scope["method"], path, declared)
            await self._reject(send, 413, "body_too_large", path, scope, [])
            return

        received = 0
        too_large = False
        started = False

        async def limited_receive():
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_body_bytes:
                    too_large = True
                    raise _BodyTooLarge()
            return message

        async def send_with_headers(message) -> None:
            nonlocal started
            if too_large:  # the framework turned our interruption into its own error: answer 413 instead
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await self._reject(send, 413, "body_too_large", path, scope, [])
                return
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                content_type = next((v.decode("latin-1") for n, v in headers if n.lower() == b"content-type"), "")
                for name, value in security_headers(path, content_type, scope.get("scheme", "http"), self.frame_ancestors):
                    if name not in present:
                        headers.append((name, value))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, limited_receive, send_with_headers)
        except Exception as exc:
            if not (too_large or isinstance(exc, _BodyTooLarge)):
                raise
            if not started:  # otherwise the 413 went out already
                await self._reject(send, 413, "body_too_large", path, scope, [])

    async def _reject(self, send, status: int, code: str, path: str, scope, extra) -> None:
        body = json.dumps(error_body(status, code), ensure_ascii=False).encode()  # the hub's one error shape
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
        headers += security_headers(path, "application/json", scope.get("scheme", "http"), self.frame_ancestors)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    pass
