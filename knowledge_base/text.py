"""Chinese text handling for retrieval: synonyms, homophone correction, words, characters, pinyin.

Residents say 医保码 where policies say 医保电子凭证, and speech recognition hears 一地就依 for
异地就医. Queries and documents go through the same ``TextProcessor`` so either wording meets.
"""

from __future__ import annotations

import re
import threading
import unicodedata
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import rjieba
import yaml
from pypinyin import Style, lazy_pinyin

LEXICON_PATH = Path(__file__).resolve().parent / "lexicon.yaml"

_HAN = re.compile(r"[\u3400-\u9fff]")
_TOKEN_JUNK = re.compile(r"^[\W_]+$", re.UNICODE)

# Function words that carry no topic; dropping them keeps BM25 from rewarding "怎么" matches.
STOPWORDS = frozenset(
    "的 了 吗 呢 吧 啊 呀 么 嘛 哦 是 我 你 他 她 它 我们 你们 这 那 哪 要 想 能 可以 怎么 怎样 "
    "如何 什么 多少 请问 一下 有 没有 在 和 与 及 或 就 都 也 还 又 把 给 被 让 去 到 从 对 "
    "个 些 下 上 里 么样 咋 啥 请 帮 帮忙 问 问问 知道 一个 现在 如果 的话 时候".split()
)


_SPOKEN_DIGITS = {"幺": "1", "一": "1", "二": "2", "两": "2", "三": "3", "四": "4", "五": "5",
                  "六": "6", "七": "7", "八": "8", "九": "9", "零": "0", "〇": "0"}
_SPOKEN_NUMBER = re.compile(f"[{''.join(_SPOKEN_DIGITS)}]{{3,}}")


def spoken_digits_to_arabic(text: str) -> str:
    """Numbers read digit by digit (幺二三九三, as on the phone) become 12393; shorter runs are words."""
    return _SPOKEN_NUMBER.sub(lambda m: "".join(_SPOKEN_DIGITS[c] for c in m.group()), text)


def normalise_width(text: str) -> str:
    """Full-width letters and digits to half-width, lower case, collapsed spaces, spoken digit runs."""
    text = unicodedata.normalize("NFKC", text)
    return spoken_digits_to_arabic(re.sub(r"\s+", " ", text).strip().lower())


def toneless_pinyin(text: str) -> list[str]:
    """One syllable per Han character; other characters pass through as they are."""
    return list(_toneless_pinyin(text))


MEMO_SIZE = 400_000  # texts remembered: every row of a 10,000-point base (about 95,000) and its queries


@lru_cache(maxsize=MEMO_SIZE)
def _toneless_pinyin(text: str) -> tuple[str, ...]:
    # Memoised: pypinyin is most of the time of indexing a corpus, and a re-index after one published
    # change (xiaozhi/hub/domain/knowledge_publish.py) sees every other text again.
    return tuple(lazy_pinyin(text, style=Style.NORMAL, errors=lambda chars: list(chars)))


# rjieba keeps one process-wide dictionary in a Rust cell: adding a word while another thread
# cuts text fails with "Already borrowed". Words are added once, and cutting takes the same lock.
_JIEBA_LOCK = threading.Lock()
_JIEBA_WORDS: set[str] = set()


def _add_words(words: list[str]) -> None:
    with _JIEBA_LOCK:
        for word in words:
            if word not in _JIEBA_WORDS:
                rjieba.add_word(word, None, None)
                _JIEBA_WORDS.add(word)


@dataclass(frozen=True)
class Lexicon:
    terms: tuple[str, ...]
    synonyms: dict[str, str]

    @classmethod
    def load(cls, path: Path = LEXICON_PATH) -> "Lexicon":
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        synonyms = {normalise_width(k): v for k, v in (doc.get("synonyms") or {}).items()}
        return cls(terms=tuple(doc.get("terms") or ()), synonyms=synonyms)


class TextProcessor:
    """Turns a text into the token streams the search backends index and query."""

    def __init__(self, lexicon: Lexicon | None = None) -> None:
        self.lexicon = lexicon or Lexicon.load()
        words = list(self.lexicon.terms)
        for canonical in self.lexicon.synonyms.values():
            words.extend(canonical.split())
        _add_words(words)
        # Longest synonym first, so 外省看病 wins over 看病-level rules.
        self._synonyms = sorted(self.lexicon.synonyms.items(), key=lambda kv: -len(kv[0]))
        # Memoised per processor: a re-index after one published change (knowledge_publish.py hands the
        # running knowledge base's processor to the new one) normalises and cuts only the changed texts.
        self._normalise_memo = lru_cache(maxsize=MEMO_SIZE)(self._normalise)
        self._words_memo = lru_cache(maxsize=MEMO_SIZE)(self._words)

    @cached_property
    def _homophone_index(self) -> dict[tuple[str, ...], str]:
        """Toneless pinyin of each domain term (3+ characters, or 2 listed ones) -> the term."""
        index: dict[tuple[str, ...], str] = {}
        for term in self.lexicon.terms:
            if len(term) >= 2 and all(_HAN.match(ch) for ch in term):
                index.setdefault(tuple(toneless_pinyin(term)), term)
        return index

    def correct_homophones(self, text: str) -> str:
        """Replace runs of characters that sound exactly like a domain term but are written otherwise.

        Speech recognisers produce near-homophones (评证 for 凭证); a run whose toneless pinyin
        equals a term's is rewritten to the term. Longer terms are tried first.
        """
        if not text:
            return text
        chars = list(text)
        syllables = toneless_pinyin(text)
        if len(syllables) != len(chars):  # pypinyin grouped non-Han runs: work per character
            syllables = [toneless_pinyin(ch)[0] if _HAN.match(ch) else ch for ch in chars]
        index = self._homophone_index
        lengths = sorted({len(k) for k in index}, reverse=True)
        out: list[str] = []
        i = 0
        while i < len(chars):
            for n in lengths:
                if i + n > len(chars):
                    continue
                term = index.get(tuple(syllables[i : i + n]))
                if term is not None and all(_HAN.match(c) for c in chars[i : i + n]):
                    out.append(term)
                    i += n
                    break
            else:
                out.append(chars[i])
                i += 1
        return "".join(out)

    def normalise(self, text: str, *, correct: bool = True) -> str:
        """Width/case folding, homophone correction, then colloquial synonyms appended as canon.

        Long answer texts may skip the per-character homophone pass (``correct=False``): they are
        written correctly, and it is the costliest step of indexing 10,000 entries.
        """
        return self._normalise_memo(text, correct)

    def _normalise(self, text: str, correct: bool) -> str:
        text = normalise_width(text)
        if correct:
            text = self.correct_homophones(text)
        additions = []
        for colloquial, canonical in self._synonyms:
            if colloquial in text and canonical not in text:
                additions.append(canonical)
        return text if not additions else text + " " + " ".join(additions)

    def words(self, text: str) -> list[str]:
        """Search-mode jieba words without stop words or punctuation (text already normalised)."""
        return list(self._words_memo(text))

    def _words(self, text: str) -> tuple[str, ...]:
        with _JIEBA_LOCK:
            cut = rjieba.cut_for_search(text)
        return tuple(
            w
            for w in cut
            if w.strip() and w not in STOPWORDS and not _TOKEN_JUNK.match(w)
        )

    @staticmethod
    def char_ngrams(text: str) -> list[str]:
        """Han character bigrams: robust where word segmentation of colloquial text goes wrong."""
        han = [c for c in text if _HAN.match(c)]
        return [a + b for a, b in zip(han, han[1:])]

    @staticmethod
    def pinyin_bigrams(text: str) -> list[str]:
        """Toneless pinyin bigrams of Han characters: homophones of a word share them."""
        han = "".join(c for c in text if _HAN.match(c))
        syl = toneless_pinyin(han)
        return [f"{a}_{b}" for a, b in zip(syl, syl[1:])]
