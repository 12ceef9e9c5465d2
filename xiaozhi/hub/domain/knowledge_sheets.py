"""Knowledge points as a spreadsheet (CSV; xlsx where openpyxl is installed): template, import, export.

Agencies keep their FAQ in Excel. One row per knowledge point, the columns of ``COLUMNS`` (Chinese headers,
the record's field names in ``FIELDS``). An import reads every row and checks each one first (the same
checks as `xiaozhi kb validate`, plus what a sheet gets wrong: a missing source, a bad date, an unknown
topic, an id twice, a site-root URL, an unknown parent entry); any bad row refuses the whole file with the
line and reason of each, and nothing changes. A good file becomes one draft version per changed point, in
one transaction, for review and publication like any edit.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re

from knowledge_base.schema import CASE_SLOTS, TOPIC_LABELS, TOPICS

MAX_ROWS = 10_000
MAX_BYTES = 20_000_000
LIST_SEPARATOR = "｜"  # between the ways of asking / facts in one cell (a full-width bar; a newline works too)

# (header, record field)
COLUMNS: list[tuple[str, str]] = [
    ("编号", "id"),
    ("所属条目", "entry"),
    ("主题", "topic"),
    ("问题", "question"),
    ("其他问法", "asks"),
    ("书面回答", "answer"),
    ("语音回答", "spoken"),
    ("关键事实", "facts"),
    ("适用情形", "when"),
    ("来源标题", "source.title"),
    ("来源网址", "source.url"),
    ("发文机关", "source.publisher"),
    ("文号", "source.document"),
    ("发文日期", "source.date"),
    ("有效期至", "expiry_date"),
    ("地区代码", "region.code"),
    ("地区名称", "region.name"),
    ("地区级别", "region.level"),
    ("上级地区代码", "region.parent"),
    ("待核实说明", "review"),
    ("地方口径", "local_figure"),
]
FIELDS = {header: name for header, name in COLUMNS}
TOPIC_BY_LABEL = {label: key for key, label in TOPIC_LABELS.items()}
LEVELS = {"全国": "national", "省": "province", "市": "city", "national": "national", "province": "province",
          "city": "city"}


class SheetRefused(ValueError):
    """The file as a whole cannot be read (format, size, headers); ``problems`` per row are separate."""


def _split(cell: str) -> list[str]:
    return [p.strip() for p in re.split(rf"[{LIST_SEPARATOR}\n]", cell or "") if p.strip()]


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return value.date().isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    return str(value).strip()


def read_rows(data: bytes, filename: str = "") -> list[tuple[int, dict[str, str]]]:
    """(line, {field: text}) for each non-empty row; the header row is line 1."""
    if len(data) > MAX_BYTES:
        raise SheetRefused(f"文件太大（{len(data) // 1_000_000} MB），请不超过{MAX_BYTES // 1_000_000} MB。")
    if data[:2] == b"PK" or filename.lower().endswith(".xlsx"):
        table = _xlsx_rows(data)
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            try:
                text = data.decode("gb18030")  # Excel on a Chinese Windows saves CSV in GBK
            except UnicodeDecodeError:
                raise SheetRefused("无法识别文件编码，请另存为 UTF-8 编码的 CSV 或 xlsx。") from None
        table = list(csv.reader(io.StringIO(text)))
    if not table:
        raise SheetRefused("文件是空的。")
    headers = [_cell(h) for h in table[0]]
    unknown = [h for h in headers if h and h not in FIELDS]
    if unknown:
        raise SheetRefused(f"不认识的列：{'、'.join(unknown)}。请使用模板的列名。")
    missing = [h for h, f in COLUMNS if f in ("id", "entry", "question", "answer", "spoken") and h not in headers]
    if missing:
        raise SheetRefused(f"缺少必需的列：{'、'.join(missing)}。")
    rows = []
    for line, values in enumerate(table[1:], start=2):
        cells = {FIELDS[h]: _cell(v) for h, v in zip(headers, values) if h}
        if any(cells.values()):
            rows.append((line, cells))
    if len(rows) > MAX_ROWS:
        raise SheetRefused(f"一次最多导入{MAX_ROWS}行，这个文件有{len(rows)}行，请分批导入。")
    return rows


def _xlsx_rows(data: bytes) -> list[list]:
    try:
        import openpyxl
    except ImportError:
        raise SheetRefused("这台服务器不能读取 xlsx 文件，请另存为 CSV（UTF-8）后导入。") from None
    try:
        book = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    except Exception:
        raise SheetRefused("无法打开这个 xlsx 文件，请确认它是 Excel 工作簿。") from None
    sheet = book.worksheets[0]
    return [list(r) for r in sheet.iter_rows(values_only=True)]


def _date_cell(text: str, name: str, reasons: list[str]) -> dt.date | None:
    """A YYYY-MM-DD cell as a date; a bad one adds its reason (an empty one is None, no reason)."""
    if not text:
        return None
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        reasons.append(f"{name}格式不对：“{text}”，应为 YYYY-MM-DD")
        return None


def row_problems(cells: dict[str, str], entries: dict[str, dict]) -> tuple[dict | None, list[str]]:
    """The point document of one row, or the reasons it is refused (in Chinese, for the console)."""
    reasons = []
    if not cells.get("id"):
        reasons.append("缺少编号")
    if not cells.get("source.title") or not cells.get("source.url"):
        reasons.append("缺少来源（来源标题和来源网址都要填）")
    source_date = (cells.get("source.date") or "").replace("/", "-")
    issued = _date_cell(source_date, "发文日期", reasons)
    if not source_date:
        reasons.append("缺少发文日期")
    expiry = (cells.get("expiry_date") or "").replace("/", "-")
    ends = _date_cell(expiry, "有效期至", reasons)
    if ends is not None and issued is not None and ends < issued:
        reasons.append(f"有效期至“{expiry}”早于发文日期“{source_date}”")
    parent = entries.get(cells.get("entry", ""))
    if not cells.get("entry"):
        reasons.append("缺少所属条目")
    elif parent is None:
        reasons.append(f"所属条目“{cells['entry']}”不存在")
    topic = cells.get("topic", "")
    if topic:
        key = TOPIC_BY_LABEL.get(topic, topic)
        if key not in TOPICS:
            reasons.append(f"未知主题“{topic}”")
        elif parent is not None and parent.get("topic") != key:
            reasons.append(f"主题“{topic}”与所属条目的主题不一致")
    url = cells.get("source.url", "")
    if url and re.fullmatch(r"https?://[^/?#]+/?", url):
        reasons.append("来源网址是网站首页：请填写写明这条规定的具体页面")
    when = {}
    for part in _split(cells.get("when", "").replace("；", "\n").replace(";", "\n")):
        slot, _, case = part.partition("=")
        if slot.strip() not in CASE_SLOTS:
            reasons.append(f"适用情形“{part}”不认识（可用：{'、'.join(CASE_SLOTS)}）")
        else:
            when[slot.strip()] = case.strip()
    level = LEVELS.get(cells.get("region.level", ""), cells.get("region.level", ""))
    region = ({"level": level or "national", "code": cells.get("region.code"),
               "name": cells.get("region.name") or ("全国" if cells.get("region.code") == "100000" else ""),
               "parent": cells.get("region.parent") or None}
              if cells.get("region.code") else (parent or {}).get("region"))
    doc = {
        "id": cells.get("id", ""), "entry": cells.get("entry", ""), "question": cells.get("question", ""),
        "asks": _split(cells.get("asks", "")), "answer": cells.get("answer", ""), "spoken": cells.get("spoken", ""),
        "facts": _split(cells.get("facts", "")), "when": when,
        "source": {"title": cells.get("source.title", ""), "url": url,
                   "publisher": cells.get("source.publisher") or None, "document": cells.get("source.document") or None,
                   "date": source_date or None},
        "review": cells.get("review") or None,
        "local_figure": cells.get("local_figure", "").strip().lower() in ("是", "true", "1", "yes"),
    }
    if expiry:
        doc["expiry_date"] = expiry
    if region:
        doc["region"] = region
    return (None if reasons else doc), reasons


def export_rows(points: list[dict], topics: dict[str, str]) -> list[list[str]]:
    """The template's header and one row per point (``topics``: entry id -> topic)."""
    out = [[h for h, _ in COLUMNS]]
    for p in points:
        source, region = p.get("source") or {}, p.get("region") or {}
        values = {
            "id": p["id"], "entry": p["entry"], "topic": TOPIC_LABELS.get(topics.get(p["entry"], ""), ""),
            "question": p["question"], "asks": LIST_SEPARATOR.join(p.get("asks", [])), "answer": p["answer"],
            "spoken": p["spoken"], "facts": LIST_SEPARATOR.join(p.get("facts", [])),
            "when": "；".join(f"{k}={v}" for k, v in (p.get("when") or {}).items()),
            "source.title": source.get("title", ""), "source.url": source.get("url", ""),
            "source.publisher": source.get("publisher") or "", "source.document": source.get("document") or "",
            "source.date": source.get("date") or "", "expiry_date": p.get("expiry_date") or "",
            "region.code": region.get("code", ""),
            "region.name": region.get("name", ""), "region.level": region.get("level", ""),
            "region.parent": region.get("parent") or "", "review": p.get("review") or "",
            "local_figure": "是" if p.get("local_figure") else "",
        }
        out.append([values[f] for _, f in COLUMNS])
    return out


def as_csv(rows: list[list[str]]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue().encode("utf-8-sig")  # Excel opens UTF-8 CSV right only with the BOM


def as_xlsx(rows: list[list[str]]) -> bytes:
    import openpyxl

    book = openpyxl.Workbook(write_only=True)
    sheet = book.create_sheet("知识点")
    for row in rows:
        sheet.append(row)
    out = io.BytesIO()
    book.save(out)
    return out.getvalue()
