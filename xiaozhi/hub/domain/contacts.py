"""Recognising a returning resident without storing who they are (analytics' repeat contact).

A phone caller is recognised by a keyed hash (HMAC-SHA256) of their number: a plain hash of an
11-digit mobile number is reversed by trying every number, a keyed one is not without the key. The
key is the secret ``XIAOZHI_CONTACT_HASH_KEY`` when set (what hub replicas and media workers must
share to recognise each other's callers: deploy/ takes it from the Kubernetes Secret), else random
per installation, kept in ``var_dir/contact-hash.key`` (created on first use, mode 0600). A web visitor is
recognised by the random id the chat page keeps in the browser's storage (nothing personal).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

KEY_FILE = "contact-hash.key"
VISITOR_PATTERN = r"^[A-Za-z0-9_-]{8,64}$"
_keys: dict[Path, bytes] = {}


def _key(var_dir: Path, secret: str | None) -> bytes:
    if secret:
        return secret.encode()
    path = Path(var_dir) / KEY_FILE
    if path not in _keys:
        try:
            _keys[path] = path.read_bytes()
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            key = secrets.token_hex(32).encode()
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # another process made it first: use theirs
                _keys[path] = path.read_bytes()
            else:
                with os.fdopen(fd, "wb") as f:
                    f.write(key)
                _keys[path] = key
    return _keys[path]


def caller_hash(number: str, var_dir: Path, secret: str | None = None) -> str:
    """The keyed hash of a caller's number (``+86 138-1234-5678`` and ``13812345678`` are one caller),
    or "" for a withheld or non-numeric caller id. ``secret`` (the configured key) wins over the file."""
    digits = re.sub(r"\D", "", number or "")
    if digits.startswith("86") and len(digits) == 13:
        digits = digits[2:]
    if len(digits) < 5:
        return ""
    return hmac.new(_key(var_dir, secret), digits.encode(), hashlib.sha256).hexdigest()[:24]
