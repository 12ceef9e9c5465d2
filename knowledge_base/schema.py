"""The knowledge-base entry schema: what one policy answer must carry to be trusted.

Entries live as YAML data files under ``knowledge_base/data/``; each file has a ``region``
block (who the rules in it apply to) and a list of ``entries``. See docs/knowledge-base.md.
"""

from __future__ import annotations

import datetime as dt
import re
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator, model_validator

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


# Chinese characters and punctuation (ideographic, CJK and full-width), but not full-width digits or
# letters: "２０２５ ７００元" is two numbers, and the space between them is what tells them apart.
_CJK = r"[\u3001-\u303f\u3400-\u9fff\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uffef]"
_FOLDED_SPACE = re.compile(rf"(?<={_CJK})[ \t\u3000]+(?={_CJK})")


def join_cjk_lines(text: str) -> str:
    """YAML folds a wrapped line into a space; between Chinese characters that space is an error.
    A space next to a digit or a Latin letter (half- or full-width) separates two words and stays."""
    return _FOLDED_SPACE.sub("", text.strip())


# The service numbers an answer tells residents to call are not figures: 12393 (医保), 12333 (人社, and
# the 掌上12333 app), 12345 (政务), 12366, 12329, 12320, 12315, 12348, 12351, 12338, with the area code a
# resident elsewhere dials before them (0571-12393); 110/120 after 打.
_SERVICE_NUMBER = re.compile(
    r"(?<!\d)(?:0\d{2,3}[-－—]?)?(?:12393|12333|12345|12366|12329|12320|12315|12348|12351|12338)(?!\d)"
    r"|(?<=打)(?:110|120)(?!\d)"
)
_FIGURE = re.compile(r"\d|[一二三四五六七八九十百千万两]+(?:个|名|人|天|年|月|次(?!性)|岁|元|万|%|成)")


def states_figure(text: str) -> bool:
    """Whether ``text`` states an amount, ratio, count or deadline: what an unverified knowledge point
    may not state on its own. A hotline to call ("打12393") or 一次性 is not a figure."""
    return bool(_FIGURE.search(_SERVICE_NUMBER.sub("", text)))


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
    """Where a rule is stated: the official document (number, issuer, date) and the page that states it."""

    model_config = ConfigDict(extra="forbid")

    title: str = Field(min_length=2)
    url: HttpUrl
    publisher: str | None = None
    # The document number (医保发〔2022〕22号) or, for a document without one, its official title.
    document: str | None = None
    date: dt.date | None = None

    @property
    def is_site_root(self) -> bool:
        """A site root names who, not what: a resident cannot find the rule from it."""
        return (self.url.path or "/").strip("/") == "" and not self.url.query

    def problems(self) -> list[str]:
        """What keeps this citation from being checkable (kb validate refuses these)."""
        found = []
        if self.is_site_root:
            found.append(f"source url {self.url} is a site root: cite the page that states the rule")
        if not self.document:
            found.append("source has no document (number, or the official title)")
        if self.date is None:
            found.append("source has no date")
        return found

    def as_citation(self) -> dict:
        out = {"title": self.title, "url": str(self.url)}
        if self.document:
            out["document"] = self.document
        if self.publisher:
            out["publisher"] = self.publisher
        if self.date:
            out["date"] = self.date.isoformat()
        return out


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
    # The last day this answer holds (a temporary measure, a yearly figure); after it, it is not served.
    expiry_date: dt.date | None = None

    @model_validator(mode="after")
    def _expires_after_it_takes_effect(self):
        if self.expiry_date is not None and self.expiry_date < self.effective_date:
            raise ValueError(f"expiry_date {self.expiry_date} is before effective_date {self.effective_date}")
        return self

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
            "source": self.source.as_citation(),
            "region": self.region.label,
            "region_code": self.region.code,
            "effective_date": self.effective_date.isoformat(),
            "verified": self.review is None,
        }


# The sub-cases a knowledge point can be limited to (``when``), and the values each may take. The
# dialogue reads the same slots from a resident's story (knowledge_base/questions.py).
CASE_SLOTS: dict[str, tuple[str, ...]] = {
    "insurance": ("职工", "居民"),
    "stage": ("住院中", "已出院", "未就医"),
    "filed": ("已备案", "未备案"),
    "scope": ("省内", "跨省"),
    "person": ("老人", "儿童", "新生儿", "学生", "灵活就业", "退休", "在职", "军人", "外地户籍"),
    "channel": ("线上", "线下"),
}

SPOKEN_POINT_TARGET = 60  # characters a knowledge point's spoken answer should stay under


class KnowledgePoint(BaseModel):
    """One precise question under a broad entry: its answer first, in 1-3 sentences, with its source.

    Retrieval indexes points beside entries; the assistant answers with the point and offers the
    parent entry (its full answer and steps) as "more".
    """

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    entry: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    question: str = Field(min_length=4)
    asks: list[str] = Field(default_factory=list)
    answer: str = Field(min_length=6, max_length=400)
    spoken: str = Field(min_length=4, max_length=160)
    facts: list[str] = Field(default_factory=list)
    when: dict[str, str] = Field(default_factory=dict)
    source: Source
    review: str | None = None
    local_figure: bool = False
    region: Region = NATIONAL
    # The last day this answer holds; after it, it is not served (an entry's expiry ends its points too).
    expiry_date: dt.date | None = None

    @model_validator(mode="after")
    def _expires_after_its_source(self):
        if self.expiry_date is not None and self.source.date is not None and self.expiry_date < self.source.date:
            raise ValueError(f"expiry_date {self.expiry_date} is before the source's date {self.source.date}")
        return self

    @field_validator("answer", "spoken", "question")
    @classmethod
    def _join_folded_lines(cls, value: str) -> str:
        return join_cjk_lines(value)

    @field_validator("asks", "facts", mode="before")
    @classmethod
    def _texts(cls, value):
        return [join_cjk_lines(str(v)) for v in value] if isinstance(value, list) else value

    @field_validator("when")
    @classmethod
    def _known_case(cls, value: dict[str, str]) -> dict[str, str]:
        for slot, case in value.items():
            if slot not in CASE_SLOTS:
                raise ValueError(f"unknown when-slot {slot!r} (known: {', '.join(CASE_SLOTS)})")
            if case not in CASE_SLOTS[slot]:
                raise ValueError(f"when.{slot} must be one of {', '.join(CASE_SLOTS[slot])}, not {case!r}")
        return value

    @property
    def verified(self) -> bool:
        return self.review is None

    @property
    def has_figure(self) -> bool:
        """Amounts, ratios, deadlines: an unverified point never states these on its own."""
        return states_figure(self.answer) or states_figure(self.spoken)


class EntryFile(BaseModel):
    """The layout of one data file: a region block, the entries and the knowledge points it holds."""

    model_config = ConfigDict(extra="forbid")

    region: Region = NATIONAL
    entries: list[dict] = Field(default_factory=list)
    points: list[dict] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _drop_anchor_blocks(cls, data):
        # Keys named x-… hold YAML anchors (a shared source block cited by many points: &s22 / *s22).
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not str(k).startswith("x-")}
        return data
