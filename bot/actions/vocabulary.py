"""Keyword tables that normalise what residents say into the forms' slot values.

Places and GB/T 2260 codes are ``yibao_common.places`` (the hub reads them too). Why keywords beside
DIET's entities: a phone line's speech recognition often garbles a word the entity extractor never
saw (微信 -> 威信), and a form must not ask again for something the resident already said. These tables are vocabulary, not policy; policy text comes from the KB.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional

from yibao_common.places import find_keyword

# canonical value -> spoken/written variants (including frequent recognition errors)
CHANNELS = {
    "微信": ["微信", "威信", "vx", "VX"],
    "支付宝": ["支付宝", "支付包", "支护宝"],
    "国家医保服务平台APP": ["国家医保服务平台", "医保服务平台", "国家医保", "医保APP", "医保app"],
    "银行APP": ["银行", "手机银行"],
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


def normalise(value: Optional[str], table: Dict[str, List[str]]) -> Optional[str]:
    """Map an entity value (already a synonym or not) onto a canonical value."""
    if not value:
        return None
    if value in table:
        return value
    return find_keyword(str(value), table)


def entity_values(entities: Iterable[dict], name: str) -> List[str]:
    return [str(e.get("value")) for e in entities if e.get("entity") == name and e.get("value")]
