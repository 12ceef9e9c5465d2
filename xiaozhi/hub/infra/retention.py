"""Retention of call and video recordings: files older than ``XIAOZHI_RECORDING_RETENTION_DAYS`` go.

Recordings are personal data (voices, faces, what residents said about their health and money);
they are kept as long as the agency's records policy says and no longer. Phone calls are recorded
to ``var_dir/recordings/<YYYYMMDD>/<call>/`` and video sessions to
``var_dir/recordings/<conversation>/``; both are purged by file age (modification time, i.e. when
the recording ended), empty folders after them. Each purge that removed something is written to
the audit log (actor ``system``) with the count, never the file names. Transcripts are not touched:
they are the conversation record.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Purge:
    files: int = 0
    bytes: int = 0


def purge_recordings(root: Path, max_age_days: float, *, now: float | None = None) -> Purge:
    """Delete files under ``root`` last modified more than ``max_age_days`` ago, then empty folders.

    ``max_age_days`` <= 0 keeps everything. A file that cannot be removed is logged and skipped."""
    if max_age_days <= 0 or not root.is_dir():
        return Purge()
    cutoff = (time.time() if now is None else now) - max_age_days * 86400
    files = size = 0
    for folder, dirnames, filenames in os.walk(root, topdown=False):
        here = Path(folder)
        for name in filenames:
            path = here / name
            try:
                stat = path.stat()
                if stat.st_mtime < cutoff:
                    path.unlink()
                    files, size = files + 1, size + stat.st_size
            except OSError:
                log.exception("retention: could not remove a recording file under %s", here)
        if here != root:
            try:
                here.rmdir()  # only succeeds when empty (a recording still being written keeps it)
            except OSError:
                pass
    return Purge(files, size)


async def retention_loop(root: Path, max_age_days: float, interval_s: float, accounts=None) -> None:
    """Purge now and then every ``interval_s`` (run as a task in the hub's lifespan)."""
    while True:
        try:
            result = await asyncio.to_thread(purge_recordings, root, max_age_days)
            if result.files:
                log.info("retention: removed %d recording files (%.1f MB) older than %g days",
                         result.files, result.bytes / 1e6, max_age_days)
                if accounts is not None:
                    await accounts.audit("system", "recordings_purged", str(root.name),
                                         {"files": result.files, "bytes": result.bytes,
                                          "older_than_days": max_age_days})
        except Exception:  # a failing purge must not stop the next one, nor the hub
            log.exception("retention: purge failed")
        await asyncio.sleep(interval_s)
