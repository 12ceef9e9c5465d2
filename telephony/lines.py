"""The merged hotline's numbers: which former district line a call came in on, and its region code.

Loaded from a YAML file (``telephony/district_lines.yaml`` by default, see the comments there).
Unknown dialled numbers are not an error: the call is served with the deployment's default region.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("telephony.lines")

LINES_FILE = Path(__file__).with_name("district_lines.yaml")
_REGION = re.compile(r"^\d{6}$")


@dataclass(frozen=True)
class Line:
    number: str
    region: str  # GB/T 2260 code
    name: str


class LinesError(ValueError):
    """The lines file is unreadable or malformed (says which entry and why)."""


def normalise_number(number: str) -> str:
    """Digits only; a leading +86 / 0086 / 86 country code becomes the national form (0571..., 138...)."""
    digits = re.sub(r"\D", "", number or "")
    for prefix in ("0086", "86"):
        if digits.startswith(prefix) and len(digits) - len(prefix) >= 10:
            national = digits[len(prefix):]
            # +86 571 ... is 0571 ... at home: landline area codes lose their trunk 0 abroad
            return national if national.startswith("1") else "0" + national
    return digits


class DistrictLines:
    def __init__(self, lines: list[Line], area_code: str = "") -> None:
        self.area_code = area_code
        self.lines = lines
        self._by_number: dict[str, Line] = {}
        for line in lines:
            self._by_number[line.number] = line
            if area_code and line.number.startswith(area_code) and len(line.number) > len(area_code) + 4:
                self._by_number.setdefault(line.number[len(area_code):], line)

    @classmethod
    def load(cls, path: str | Path = LINES_FILE) -> DistrictLines:
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise LinesError(f"{path}: cannot read the district lines: {exc}") from exc
        area = str(data.get("area_code") or "")
        lines = []
        for i, item in enumerate(data.get("lines") or []):
            if not isinstance(item, dict):
                raise LinesError(f"{path}: lines[{i}] must be a mapping with number, region, name")
            number = normalise_number(str(item.get("number", "")))
            region = str(item.get("region", ""))
            if not number or not _REGION.match(region):
                raise LinesError(f"{path}: lines[{i}] needs a number and a 6-digit GB/T 2260 region, got {item!r}")
            lines.append(Line(number, region, str(item.get("name", ""))))
        return cls(lines, area)

    def lookup(self, dialled: str) -> Line | None:
        number = normalise_number(dialled)
        return self._by_number.get(number)
