"""Spoken forms for the phone line: short sentences, numbers as they are read aloud."""

from __future__ import annotations

import re

from yibao_common.spoken import spoken_chinese

MAX_SENTENCE = 40

# The same number reading as the phone line's speech synthesis (yibao_common is shared by both venvs).
read_aloud = spoken_chinese


def voice_fit(text: str) -> str:
    """Spoken form: numbers read aloud, no brackets or list marks, sentences under ~40 chars."""
    text = read_aloud(text)
    text = re.sub(r"[（(][^）)]*[）)]", "", text)
    text = re.sub(r"[“”\"《》]", "", text)
    text = re.sub(r"\s+", "", text)
    sentences = [s for s in re.split(r"(?<=[。！？；])", text) if s]
    out = []
    for sentence in sentences:
        while len(sentence) > MAX_SENTENCE:
            cut = max(sentence.rfind(mark, 0, MAX_SENTENCE) for mark in "，、：")
            if cut <= 0:
                break
            out.append(sentence[:cut] + "。")
            sentence = sentence[cut + 1:]
        out.append(sentence)
    return "".join(out)
