"""Small GB/T 2260 lookup and keyword tables that normalise what residents say.

Why keywords beside DIET's entities: a phone line's speech recognition often garbles a word the
entity extractor never saw (微信 -> 威信), and a form must not ask again for something the
resident already said. These tables are vocabulary, not policy; policy text comes from the KB.
"""

from __future__ import annotations

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

# canonical value -> spoken/written variants (including frequent recognition errors)
CHANNELS = {
    "微信": ["微信", "威信", "vx", "VX"],
    "支付宝": ["支付宝", "支付包", "支护宝"],
    "国家医保服务平台APP": ["国家医保服务平台", "医保服务平台", "国家医保", "医保APP", "医保app"],
    "银行APP": ["银行", "手机银行"],
}
RELATIONS = {
    "本人": ["本人", "自己", "我自己"],
    "父母": ["父母", "爸妈", "我妈", "我爸", "妈妈", "爸爸", "老妈", "老爸", "老人", "爹妈", "母亲", "父亲", "公婆", "岳父", "岳母"],
    "子女": ["子女", "孩子", "儿子", "女儿", "小孩", "宝宝", "娃"],
    "配偶": ["配偶", "老婆", "老公", "爱人", "媳妇", "丈夫", "妻子"],
}
PERSON_CATEGORIES = {
    "异地安置退休": ["异地安置", "退休"],
    "异地长期居住": ["长期居住", "长住", "常住", "长期住"],
    "常驻异地工作": ["常驻", "派驻", "外地工作", "外地上班", "异地工作", "在外地打工"],
    "异地转诊": ["转诊", "转院", "转到"],
    "急诊抢救": ["急诊", "抢救", "急救"],
    "其他临时外出": ["出差", "旅游", "探亲", "临时", "度假", "玩"],
}
LONG_TERM = {"异地安置退休", "异地长期居住", "常驻异地工作"}
TREATMENTS = {
    # out-of-region first: "在外地住院" is an out-of-region claim, not an ordinary inpatient one
    "异地就医": ["异地", "外地", "外省", "省外", "一地"],
    "门诊慢特病": ["慢特病", "慢性病", "慢病", "门特", "特殊病"],
    "急诊": ["急诊", "抢救"],
    "住院": ["住院", "出院"],
    "门诊": ["门诊", "看病拿药", "配药"],
}
INSURANCE_TYPES = {
    "职工医保": ["职工", "单位交", "在职"],
    "城乡居民医保": ["居民", "新农合", "农合", "农村"],
    "灵活就业": ["灵活就业", "个体", "自己交"],
}


def find_keyword(text: str, table: Dict[str, List[str]]) -> Optional[str]:
    """The canonical value whose variant occurs first in the table's order of priority."""
    for value, variants in table.items():
        if any(v in text for v in variants):
            return value
    return None


def normalise(value: Optional[str], table: Dict[str, List[str]]) -> Optional[str]:
    """Map an entity value (already a synonym or not) onto a canonical value."""
    if not value:
        return None
    if value in table:
        return value
    return find_keyword(str(value), table)


def entity_values(entities: Iterable[dict], name: str) -> List[str]:
    return [str(e.get("value")) for e in entities if e.get("entity") == name and e.get("value")]


def find_place(text: str, entities: Iterable[dict] = ()) -> Optional[Tuple[str, str]]:
    """(name, GB/T 2260 code) of the first known place named in the message."""
    for value in entity_values(entities, "city"):
        name = value.removesuffix("市").removesuffix("省")
        if name in REGION_CODES:
            return name, REGION_CODES[name]
    hits = [(text.find(name), -len(name), name) for name in REGION_CODES if name in text]
    if hits:
        _, _, name = min(hits)
        return name, REGION_CODES[name]
    return None


def same_province(code_a: Optional[str], code_b: Optional[str]) -> bool:
    return bool(code_a and code_b and code_a[:2] == code_b[:2])
