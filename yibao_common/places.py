"""Place names and who-is-who words residents use, with GB/T 2260 codes: vocabulary, not policy.

The hub's knowledge base and analytics (Python 3.11) and the Rasa action server (bot/actions,
Python 3.10) read the same tables and find places in a message the same way.
"""

from __future__ import annotations

import os
from typing import Dict, Iterable, List, Optional, Tuple

# Province-level and major city codes (GB/T 2260). Enough for region packs and for telling
# whether a destination lies in the resident's own province.
REGION_CODES: Dict[str, str] = {
    "北京": "110000", "天津": "120000", "上海": "310000", "重庆": "500000",
    "河北": "130000", "石家庄": "130100", "山西": "140000", "太原": "140100",
    "内蒙古": "150000", "辽宁": "210000", "沈阳": "210100", "大连": "210200",
    "吉林": "220000", "长春": "220100", "黑龙江": "230000", "哈尔滨": "230100",
    "江苏": "320000", "南京": "320100", "无锡": "320200", "苏州": "320500",
    "浙江": "330000", "杭州": "330100", "宁波": "330200", "温州": "330300", "嘉兴": "330400",
    "湖州": "330500", "绍兴": "330600", "金华": "330700", "衢州": "330800", "舟山": "330900",
    "台州": "331000", "丽水": "331100",
    "安徽": "340000", "合肥": "340100", "福建": "350000", "福州": "350100", "厦门": "350200",
    "江西": "360000", "南昌": "360100", "山东": "370000", "济南": "370100", "青岛": "370200",
    "河南": "410000", "郑州": "410100", "湖北": "420000", "武汉": "420100",
    "湖南": "430000", "长沙": "430100", "广东": "440000", "广州": "440100", "深圳": "440300",
    "广西": "450000", "南宁": "450100", "海南": "460000", "海口": "460100", "三亚": "460200",
    "四川": "510000", "成都": "510100", "贵州": "520000", "贵阳": "520100",
    "云南": "530000", "昆明": "530100", "西藏": "540000", "陕西": "610000", "西安": "610100",
    "甘肃": "620000", "兰州": "620100", "青海": "630000", "宁夏": "640000",
    "新疆": "650000", "乌鲁木齐": "650100",
}
CODE_NAMES = {code: name for name, code in REGION_CODES.items()}

# Every other prefecture-level city, from a generated table (scripts/gen_prefectures.py). Its short
# name is also an ordinary word for a few ("中山医院", "安康", "朝阳区", "阿里健康", "来宾"): those are
# recognised only with their suffix ("中山市").
PREFECTURES_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prefectures.tsv")
SUFFIX_ONLY = {"中山", "安康", "大同", "白银", "普洱", "来宾", "朝阳", "阿里", "中卫", "红河", "海南", "海北",
               "海西", "黄南", "玉树", "吉林", "白山", "文山", "三沙", "果洛", "山南", "湘西", "兴安"}


def _load_prefectures(path: str = PREFECTURES_PATH) -> None:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            code, name, short = line.rstrip("\n").split("\t")
            REGION_CODES.setdefault(name, code)
            if short not in SUFFIX_ONLY:
                REGION_CODES.setdefault(short, code)
            CODE_NAMES.setdefault(code, short)


_load_prefectures()

RELATIONS = {
    "本人": ["本人", "自己", "我自己"],
    "父母": ["父母", "爸妈", "我妈", "我爸", "妈妈", "爸爸", "老妈", "老爸", "老人", "爹妈", "母亲", "父亲", "公婆", "岳父", "岳母"],
    "子女": ["子女", "孩子", "儿子", "女儿", "小孩", "宝宝", "娃"],
    "配偶": ["配偶", "老婆", "老公", "爱人", "媳妇", "丈夫", "妻子"],
}


# Words that hold a place's short name but name no place: "医保定点" holds 保定, "莆田系" (a group of
# private hospitals) 莆田. Blanked, keeping every other character's position, before places are looked for.
NOT_PLACES = ("医保定", "莆田系")


def without_false_places(text: str) -> str:
    for word in NOT_PLACES:
        text = text.replace(word, "\u3000" * len(word))
    return text


def find_keyword(text: str, table: Dict[str, List[str]]) -> Optional[str]:
    """The canonical value whose variant occurs first in the table's order of priority."""
    for value, variants in table.items():
        if any(v in text for v in variants):
            return value
    return None


def find_place(text: str, entities: Iterable[dict] = ()) -> Optional[Tuple[str, str]]:
    """(name, GB/T 2260 code) of the place a message names: a ``city`` entity the NLU extracted
    (Rasa's entity dicts), else the known name that occurs first in the text (the longest at a tie)."""
    for entity in entities:
        if entity.get("entity") != "city" or not entity.get("value"):
            continue
        name = str(entity["value"]).removesuffix("市").removesuffix("省")
        if name in REGION_CODES:
            return name, REGION_CODES[name]
    text = without_false_places(text)
    hits = [(text.find(name), -len(name), name) for name in REGION_CODES if name in text]
    if hits:
        _, _, name = min(hits)
        return name, REGION_CODES[name]
    return None


def same_province(code_a: Optional[str], code_b: Optional[str]) -> bool:
    """Whether two GB/T 2260 codes lie in one province (their first two digits)."""
    return bool(code_a and code_b and code_a[:2] == code_b[:2])
