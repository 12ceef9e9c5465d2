"""The knowledge-base entry schema: what one policy answer must carry to be trusted.

Entries live as YAML data files under ``knowledge_base/data/``; each file has a ``region``
block (who the rules in it apply to) and a list of ``entries``. See docs/knowledge-base.md.
"""

from __future__ import annotations

import datetime as dt
import re
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator

TOPICS = (
    "e_voucher",
    "cross_region",
    "reimbursement",
    "enrollment",
    "personal_account",
    "chronic_disease",
    "maternity",
    "card",
    "referral",
    "drug_catalog",
    "payment_reform",
    "designated_institutions",
    "service_info",
    "other",
)

Topic = Enum("Topic", {t: t for t in TOPICS}, type=str)  # type: ignore[misc]

# What residents, agents and staff see for a topic (agent console skills, analytics dashboard).
TOPIC_LABELS = {
    "e_voucher": "医保电子凭证",
    "cross_region": "异地就医",
    "reimbursement": "医疗费用报销",
    "enrollment": "参保缴费",
    "personal_account": "个人账户",
    "chronic_disease": "门诊慢特病",
    "maternity": "生育保险",
    "card": "社保卡",
    "referral": "转诊转院",
    "drug_catalog": "药品目录",
    "payment_reform": "支付方式改革",
    "designated_institutions": "定点医药机构",
    "service_info": "经办服务",
    "other": "其他",
}

LOCAL_RULE_NOTICE = "以当地医保部门规定为准"


_CJK = r"[\u3000-\u303f\u3400-\u9fff\uff00-\uffef]"
_FOLDED_SPACE = re.compile(rf"(?<={_CJK})[ \t]+(?={_CJK})")


def join_cjk_lines(text: str) -> str:
    """YAML folds a wrapped line into a space; between Chinese characters that space is an error."""
    return _FOLDED_SPACE.sub("", text.strip())


class RegionLevel(str, Enum):
    national = "national"
    province = "province"
    city = "city"


class Region(BaseModel):
    """Where an entry's rules apply. ``code`` is the GB/T 2260 administrative division code."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    level: RegionLevel
    code: str = Field(pattern=r"^\d{6}$")
    name: str = Field(min_length=2)
    parent: str | None = Field(default=None, pattern=r"^\d{6}$")

    @property
    def label(self) -> str:
        return "全国" if self.level is RegionLevel.national else self.name


NATIONAL = Region(level=RegionLevel.national, code="100000", name="全国")


class Source(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str = Field(min_length=2)
    url: HttpUrl
    publisher: str | None = None


class Entry(BaseModel):
    """One answer. ``spoken`` is read aloud on the phone; ``answer`` and ``steps`` are shown in chat."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    topic: Topic
    title: str = Field(min_length=2)
    questions: list[str] = Field(min_length=2)
    spoken: str = Field(min_length=4, max_length=160)
    answer: str = Field(min_length=10)
    steps: list[str] = Field(default_factory=list)
    source: Source
    effective_date: dt.date
    tags: list[str] = Field(default_factory=list)
    local_figure: bool = False
    overrides: str | None = None
    # What is still unverified about this entry (e.g. no dated official document was found, so
    # effective_date is only when the text was written). Shown to residents as 日期待核实.
    review: str | None = None
    region: Region = NATIONAL

    @field_validator("spoken", "answer", "title")
    @classmethod
    def _join_folded_lines(cls, value: str) -> str:
        return join_cjk_lines(value)

    @field_validator("steps")
    @classmethod
    def _join_folded_steps(cls, value: list[str]) -> list[str]:
        return [join_cjk_lines(v) for v in value]

    @field_validator("tags", mode="before")
    @classmethod
    def _tags_as_text(cls, value):
        # YAML reads a tag such as 120 (the ambulance number) as an integer; it is still a word.
        return [str(t) for t in value] if isinstance(value, list) else value

    @field_validator("questions")
    @classmethod
    def _questions_not_blank(cls, value: list[str]) -> list[str]:
        cleaned = [q.strip() for q in value]
        if any(not q for q in cleaned):
            raise ValueError("question variants must not be blank")
        return cleaned

    @property
    def topic_name(self) -> str:
        return self.topic.value

    def citation(self) -> dict:
        """What a reply carries so a resident (and an agent) can check where it came from."""
        return {
            "id": self.id,
            "topic": self.topic_name,
            "title": self.title,
            "source": {"title": self.source.title, "url": str(self.source.url)},
            "region": self.region.label,
            "region_code": self.region.code,
            "effective_date": self.effective_date.isoformat(),
            "verified": self.review is None,
        }


class EntryFile(BaseModel):
    """The layout of one data file: a region block and the entries it holds."""

    model_config = ConfigDict(extra="forbid")

    region: Region = NATIONAL
    entries: list[dict]
