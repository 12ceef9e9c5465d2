"""Numbers as a person reads them aloud in Mandarin: amounts, dates, percentages, phone numbers.

Used for every spoken reply, by the dialogue's actions (Rasa venv) and the phone line's speech
synthesis alike, so it depends on the standard library only.
"""

from __future__ import annotations

import re

_DIGITS = "零一二三四五六七八九"
_PHONE_DIGITS = "零幺二三四五六七八九"  # phone numbers: 1 is 幺, never confused with 七
_YEAR_DIGITS = "〇一二三四五六七八九"
_SMALL_UNITS = ["", "十", "百", "千"]
_BIG_UNITS = ["", "万", "亿", "万亿"]

# After one of these a digit run is a count or an amount, read as a number (30万元, 15天, 2次...)
_UNIT_CHARS = set("元块角毛万亿千百岁人次天个月周年号日时点分秒倍项种家张条份位名级档笔类所批例盒片粒支瓶斤克米里度期")
# Before one of these (within a few characters) a digit run is a number to dial or a code
_DIAL_WORDS = re.compile(r"(拨打|致电|电话|热线|号码|手机|编号|卡号|尾号|账号|验证码|工号|分机|拨|打)\s*[:：]?\s*$")


def _four(n: int) -> str:
    """0 < n < 10000 as Chinese numerals (一千零五, 一百一十二, 十二 is handled by the caller)."""
    out, zero = [], False
    for pos in range(3, -1, -1):
        d = n // 10**pos % 10
        if d == 0:
            zero = bool(out)
            continue
        if zero:
            out.append("零")
            zero = False
        out.append(_DIGITS[d] + _SMALL_UNITS[pos])
    return "".join(out)


def cardinal(n: int) -> str:
    """A non-negative integer read as a number: 1200 -> 一千二百, 10010 -> 一万零一十, 12 -> 十二."""
    if n == 0:
        return "零"
    if n >= 10 ** (4 * len(_BIG_UNITS)):
        return digits(str(n))
    groups = []
    while n:
        groups.append(n % 10000)
        n //= 10000
    out: list[str] = []
    need_zero = False
    for i in range(len(groups) - 1, -1, -1):
        g = groups[i]
        if g == 0:
            need_zero = bool(out)
            continue
        if out and (need_zero or g < 1000):
            out.append("零")
        out.append(_four(g) + _BIG_UNITS[i])
        need_zero = False
    text = "".join(out)
    if text.startswith("一十"):  # 十二, not 一十二 (but 一百一十二 keeps its 一)
        text = text[1:]
    # 两千 / 两万 / 两亿 at the head, as people say it (二百 stays)
    return re.sub(r"^二(?=[千万亿])", "两", text)


def digits(run: str, table: str = _PHONE_DIGITS) -> str:
    """A digit string read digit by digit: 12393 -> 幺二三九三."""
    return "".join(table[int(c)] for c in run if c.isdigit())


def _decimal(number: str) -> str:
    whole, _, frac = number.partition(".")
    out = cardinal(int(whole)) if whole else "零"
    return out + ("点" + digits(frac, _DIGITS) if frac else "")


def _number_or_digits(m: re.Match[str]) -> str:
    run = m.group(0)
    text = m.string
    before = text[max(0, m.start() - 6):m.start()]
    after = text[m.end():m.end() + 1]
    if "." in run:
        return _decimal(run)
    if _DIAL_WORDS.search(before):
        return digits(run)
    if after and after in _UNIT_CHARS:
        return cardinal(int(run))
    if len(run) >= 5 or (len(run) > 1 and run.startswith("0")):
        return digits(run)  # hotlines, phone numbers, ID and card numbers, area codes
    return cardinal(int(run))


_FULL_WIDTH = str.maketrans("０１２３４５６７８９％ＡＢＣＤＥＦＧＨＩＪＫＬＭＮＯＰＱＲＳＴＵＶＷＸＹＺ",
                            "0123456789%ABCDEFGHIJKLMNOPQRSTUVWXYZ")

# Latin letters as Mandarin speakers say them on the phone (APP -> A P P): the usual character
# approximations, so a Chinese voice reads them instead of skipping or guessing an English word.
LETTERS = {
    "A": "诶", "B": "必", "C": "西", "D": "迪", "E": "伊", "F": "艾弗", "G": "吉", "H": "艾尺", "I": "艾",
    "J": "杰", "K": "开", "L": "艾勒", "M": "艾姆", "N": "恩", "O": "欧", "P": "批", "Q": "丘", "R": "阿",
    "S": "艾斯", "T": "踢", "U": "优", "V": "维", "W": "达不溜", "X": "艾克斯", "Y": "歪", "Z": "贼",
}


def spell_letters(text: str) -> str:
    """Latin letters read one by one the Chinese way: APP -> 诶批批, ID -> 艾迪 (case ignored)."""
    return re.sub(r"[A-Za-z]", lambda m: LETTERS[m.group(0).upper()], text)


def speech_text(text: str) -> str:
    """What a Chinese voice should read: numbers as spoken (``spoken_chinese``), then letters spelled."""
    return spell_letters(spoken_chinese(text))


def spoken_chinese(text: str) -> str:
    """Digits in Chinese text rewritten as they are read aloud on the hotline.

    12393 -> 幺二三九三 (numbers to dial: digit by digit), 1200元 -> 一千二百元 (amounts and counts),
    2024年1月1日 and 2024-01-01 -> 二〇二四年一月一日, 80% -> 百分之八十, 3.5 -> 三点五,
    10:30 -> 十点三十分, 1,200 -> 一千二百. Full-width digits are treated like ASCII ones.
    """
    text = text.translate(_FULL_WIDTH)
    # ¥1200 / 1200元 alike: the currency sign is read after the amount
    text = re.sub(r"[¥￥]\s*(\d[\d,]*(?:\.\d+)?)(?:\s*元)?", r"\1元", text)
    # 1,200 -> 1200 (thousands separators only between digit groups of three)
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)
    # dates: 2024-01-01, 2024/1/1, 2024.1.1 -> 2024年1月1日
    text = re.sub(r"(?<!\d)((?:19|20)\d\d)([-/.])(\d{1,2})\2(\d{1,2})(?!\d)", r"\1年\3月\4日", text)
    text = re.sub(r"(?<!\d)((?:19|20)\d\d)[-/](\d{1,2})(?![\d/-])", r"\1年\2月", text)
    text = re.sub(r"(?<!\d)(\d{4})(?=\s*年)", lambda m: digits(m.group(1), _YEAR_DIGITS), text)
    text = re.sub(r"(?<!\d)(\d{1,2})(?=\s*(?:月|日|号))", lambda m: cardinal(int(m.group(1))), text)
    # times: 8:05 -> 八点零五分, 10:30 -> 十点三十分, 9:00 -> 九点
    def _time(m: re.Match[str]) -> str:
        h, mnt = int(m.group(1)), int(m.group(2))
        if mnt == 0:
            return cardinal(h) + "点"
        return cardinal(h) + "点" + ("零" if mnt < 10 else "") + cardinal(mnt) + "分"
    text = re.sub(r"(?<!\d)([01]?\d|2[0-3])[:：]([0-5]\d)(?!\d)", _time, text)
    # percentages: 80% -> 百分之八十, 7.5% -> 百分之七点五
    text = re.sub(r"(\d+(?:\.\d+)?)\s*%", lambda m: "百分之" + _decimal(m.group(1)), text)
    # 0571-88889999 (a phone number: a short pause) vs 2-3天 / 5~10个 (a range: 到)
    text = re.sub(r"(?<![\d.])(\d{3,})-(?=\d{3,})", r"\1，", text)
    text = re.sub(r"(?<=\d)\s*[-~～]\s*(?=\d)", "到", text)
    # everything else: amounts and counts as numbers, numbers to dial digit by digit
    text = re.sub(r"\d+(?:\.\d+)?", _number_or_digits, text)
    return text


# --------------------------------------------------------------------------------------------
# Fixed prompts, rendered once
# --------------------------------------------------------------------------------------------
