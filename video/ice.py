"""ICE servers from configuration only, and coturn's time-limited (use-auth-secret) credentials.

aiortc contacts a public STUN server when no configuration is given: every peer connection here is
built with ``rtc_configuration()``, which is exactly what the settings say (an empty list allowed).
The hub hands the configuration over as an ``IceConfig`` (``Settings.ice_config()``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass, field

from aiortc import RTCBundlePolicy, RTCConfiguration, RTCIceServer


@dataclass(frozen=True)
class IceConfig:
    """``servers``: the JSON list of ``XIAOZHI_ICE_SERVERS``; ``turn_secret``: coturn's use-auth-secret, for
    time-limited credentials valid ``turn_credential_ttl_s`` seconds on turn: entries that carry none."""

    servers: str
    turn_credential_ttl_s: int
    turn_secret: str | None = field(default=None, repr=False)


class IceConfigError(ValueError):
    """XIAOZHI_ICE_SERVERS is not a JSON list of {"urls": ..., "username"?, "credential"?}."""


def parse_ice_servers(raw: str) -> list[dict]:
    try:
        servers = json.loads(raw or "[]")
    except json.JSONDecodeError as exc:
        raise IceConfigError(f"XIAOZHI_ICE_SERVERS is not JSON: {exc}") from None
    if not isinstance(servers, list):
        raise IceConfigError("XIAOZHI_ICE_SERVERS must be a JSON list")
    parsed = []
    for server in servers:
        if not isinstance(server, dict) or "urls" not in server:
            raise IceConfigError(f"an ICE server needs 'urls': {server!r}")
        urls = server["urls"]
        urls = [urls] if isinstance(urls, str) else urls
        if not urls or not all(isinstance(u, str) and u.split(":", 1)[0] in ("stun", "turn", "turns") for u in urls):
            raise IceConfigError(f"ICE server URLs must start with stun:, turn: or turns:: {urls!r}")
        entry = {"urls": list(urls)}
        for key in ("username", "credential"):
            if server.get(key) is not None:
                entry[key] = str(server[key])
        parsed.append(entry)
    return parsed


def turn_credentials(secret: str, user: str, ttl_s: int, now: float | None = None) -> tuple[str, str]:
    """coturn ``use-auth-secret``: username ``<expiry>:<user>``, password base64(HMAC-SHA1(secret, username))."""
    expiry = int((now if now is not None else time.time()) + ttl_s)
    username = f"{expiry}:{user}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


def ice_servers_for(config: IceConfig, user: str = "xiaozhi") -> list[dict]:
    """The configured servers; turn: entries without credentials get fresh time-limited ones."""
    servers = parse_ice_servers(config.servers)
    secret = config.turn_secret
    if secret:
        for server in servers:
            is_turn = any(u.startswith(("turn:", "turns:")) for u in server["urls"])
            if is_turn and "username" not in server:
                server["username"], server["credential"] = turn_credentials(
                    secret, user, config.turn_credential_ttl_s
                )
    return servers


def rtc_configuration(servers: list[dict]) -> RTCConfiguration:
    """``max-bundle``: with aiortc's default (balanced), a second video m-line (the screen share) is
    bound to the first video transport before BUNDLE is applied and then never moved onto the bundled
    one, so it sends into nothing. Browsers bundle everything anyway."""
    return RTCConfiguration(
        iceServers=[
            RTCIceServer(urls=s["urls"], username=s.get("username"), credential=s.get("credential")) for s in servers
        ],
        bundlePolicy=RTCBundlePolicy.MAX_BUNDLE,
    )
