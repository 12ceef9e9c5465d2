"""Recording retention: old call and video recordings are deleted, recent ones and transcripts kept."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from xiaozhi.hub.infra.retention import purge_recordings, retention_loop

DAY = 86400


def recording(root: Path, relative: str, age_days: float, size: int = 1000) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * size)
    stamp = time.time() - age_days * DAY
    os.utime(path, (stamp, stamp))
    return path


def test_old_recordings_and_their_empty_folders_go_recent_ones_stay(tmp_path: Path) -> None:
    root = tmp_path / "recordings"
    old_call = recording(root, "20260101/call-1/caller.wav", 200)
    recording(root, "20260101/call-1/outbound.wav", 200)
    new_call = recording(root, "20261120/call-2/caller.wav", 3)
    old_video = recording(root, "conv-a/20260101T100000-resident.mkv", 181)
    mixed = recording(root, "conv-b/20261120T100000-agent.mkv", 1)
    recording(root, "conv-b/20260101T100000-resident.mkv", 365)
    result = purge_recordings(root, 180)
    assert (result.files, result.bytes) == (4, 4000)
    assert not old_call.exists() and not old_video.exists()
    assert not (root / "20260101").exists() and not (root / "conv-a").exists()  # emptied folders removed
    assert new_call.exists() and mixed.exists() and root.is_dir()


def test_zero_days_keeps_everything_and_a_missing_folder_is_fine(tmp_path: Path) -> None:
    old = recording(tmp_path / "recordings", "x/y.wav", 1000)
    assert purge_recordings(tmp_path / "recordings", 0).files == 0 and old.exists()
    assert purge_recordings(tmp_path / "nowhere", 30).files == 0


def test_the_hub_loop_purges_and_audits_the_count_only(tmp_path: Path) -> None:
    root = tmp_path / "recordings"
    recording(root, "20260101/call-13812345678/caller.wav", 400)

    class Audit:
        def __init__(self) -> None:
            self.entries: list = []

        async def audit(self, actor, action, target="", detail=None, client=""):
            self.entries.append((actor, action, detail))

    audit = Audit()

    async def run() -> None:
        task = asyncio.create_task(retention_loop(root, 180, 3600, audit))
        for _ in range(100):
            if audit.entries:
                break
            await asyncio.sleep(0.02)
        task.cancel()

    asyncio.run(run())
    [(actor, action, detail)] = audit.entries
    assert (actor, action, detail["files"]) == ("system", "recordings_purged", 1)
    assert "13812345678" not in repr(audit.entries)  # file names (call ids) are not written anywhere


def test_the_hub_runs_retention_with_its_settings(hub_settings, knowledge_base) -> None:
    from fastapi.testclient import TestClient

    from xiaozhi.hub.app import create_app

    root = hub_settings.var_dir / "recordings"
    old = recording(root, "20250101/call-9/caller.wav", 500)
    with TestClient(create_app(hub_settings, knowledge_base=knowledge_base)) as client:
        for _ in range(100):
            if not old.exists():
                break
            time.sleep(0.02)
        assert client.get("/healthz").status_code == 200
    assert not old.exists()
