"""Rewrite the settings table in README.md from the code (run after adding a setting)."""

import subprocess
import sys
from pathlib import Path

readme = Path(__file__).resolve().parent.parent / "README.md"
table = subprocess.run(
    [sys.executable, "-m", "xiaozhi", "settings", "--markdown"], check=True, capture_output=True, text=True
).stdout.strip().splitlines()
lines = readme.read_text(encoding="utf-8").splitlines()
start = lines.index(table[0])
end = start
while end < len(lines) and lines[end].startswith("|"):
    end += 1
lines[start:end] = table
readme.write_text("\n".join(lines) + "\n", encoding="utf-8")
print(f"README.md: {len(table) - 2} settings")
