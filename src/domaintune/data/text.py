"""Text helpers shared by the data operations: normalisation, script detection, n-grams."""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Hashable, Sequence

_HTML_TAGS = (
    "a|abbr|b|big|blockquote|body|br|caption|center|code|col|colgroup|dd|del|div|dl|dt|em|font|h[1-6]|head|"
    "hr|html|i|img|ins|kbd|li|link|meta|ol|p|pre|q|s|small|span|strike|strong|sub|sup|table|tbody|td|"
    "tfoot|th|thead|title|tr|tt|u|ul"
)
# Only real HTML tags are stripped ("x<y and y>z" is left alone); script/style go with their content.
_TAG_RE = re.compile(rf"<!--.*?-->|<(script|style)\b[^>]*>.*?</\1\s*>|</?(?:{_HTML_TAGS})(?:\s[^<>]*)?/?>", re.S | re.I)
_SPACES_RE = re.compile(r"[ \t\u00a0\u3000]+")
_BLANKS_RE = re.compile(r"\n\s*\n\s*\n+")
_TRAIL_RE = re.compile(r" *\n *")
# C0/C1 controls except \t and \n, plus zero-width and BOM characters.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]")
_CJK_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af]")
_LATIN_RE = re.compile(r"[A-Za-z]")
_WORD_RE = re.compile(r"\w+", re.U)
_KEY_DROP_RE = re.compile(r"[\W_]+", re.U)  # punctuation, symbols and whitespace


def _width_table() -> dict[int, str]:
    """Full-width ASCII letters and digits → ASCII; half-width katakana, hangul and CJK punctuation
    (U+FF61-U+FFDC) → their full-width forms. CJK full-width punctuation (，？：；（）) is not touched."""
    table = {cp: chr(cp - 0xFEE0) for cp in (*range(0xFF10, 0xFF1A), *range(0xFF21, 0xFF3B), *range(0xFF41, 0xFF5B))}
    for cp in range(0xFF61, 0xFFDD):
        folded = unicodedata.normalize("NFKC", chr(cp))
        if len(folded) == 1 and folded != chr(cp):
            table[cp] = folded
    return table


_WIDTH_TABLE = _width_table()


def fold_width(text: str) -> str:
    """ＡＢＣ１２３ → ABC123 and ｶﾀｶﾅ → カタカナ; punctuation keeps its width (so Chinese keeps ，？：；)."""
    return text.translate(_WIDTH_TABLE)


def normalise_text(
    text: str,
    *,
    nfkc: bool = False,
    width: bool = True,
    html_clean: bool = True,
    control_chars: bool = True,
    whitespace: bool = True,
) -> str:
    """Width folding of letters and digits (or full NFKC), HTML entities/tags, control characters, whitespace."""
    if html_clean and ("&" in text or "<" in text):
        text = html.unescape(text)
        text = _TAG_RE.sub(" ", text)
    if nfkc:
        text = unicodedata.normalize("NFKC", text)
    elif width:
        text = fold_width(text)
    if control_chars:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        text = _CONTROL_RE.sub("", text)
    if whitespace:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        text = _SPACES_RE.sub(" ", text)
        text = _TRAIL_RE.sub("\n", text)
        text = _BLANKS_RE.sub("\n\n", text)
        text = text.strip()
    return text


def cjk_ratio(text: str) -> float:
    """Share of CJK characters among letters (CJK + Latin)."""
    cjk = len(_CJK_RE.findall(text))
    latin = len(_LATIN_RE.findall(text))
    total = cjk + latin
    return cjk / total if total else 0.0


def is_cjk(text: str) -> bool:
    return cjk_ratio(text) >= 0.3


def detect_language(text: str) -> str | None:
    """Script-based language guess: 'zh' (mostly Han), 'en' (Latin letters), else None."""
    cjk = len(_CJK_RE.findall(text))
    latin = len(_LATIN_RE.findall(text))
    if cjk + latin == 0:
        return None
    if cjk / (cjk + latin) >= 0.3:
        return "zh"
    visible = sum(not ch.isspace() for ch in text)
    return "en" if latin >= 0.35 * visible else None  # Latin letters dominate (digits/punctuation aside)


def prompt_key(text: str) -> str:
    """A prompt with case, width, punctuation and whitespace folded away: two prompts that differ only in
    those have the same key ("What is (are) Acromegaly ?" and "what is are acromegaly")."""
    return _KEY_DROP_RE.sub("", unicodedata.normalize("NFKC", text).casefold())


def loose_text(text: str) -> str:
    """The prompt as compared for near duplicates: NFKC, case folded, punctuation turned into spaces."""
    return _KEY_DROP_RE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


def ngrams(text: str, char_n: int, word_n: int) -> list[str]:
    """Character n-grams for CJK text (spaces removed), word n-grams otherwise."""
    if is_cjk(text):
        compact = re.sub(r"\s+", "", text)
        if len(compact) < char_n:
            return [compact] if compact else []
        return [compact[i : i + char_n] for i in range(len(compact) - char_n + 1)]
    toks = words(text)
    if len(toks) < word_n:
        return [" ".join(toks)] if toks else []
    return [" ".join(toks[i : i + word_n]) for i in range(len(toks) - word_n + 1)]


def repetition_ratio(text: str, char_n: int = 5, word_n: int = 3) -> float:
    """Fraction of n-gram occurrences that repeat an earlier n-gram of the same text (0 = no repetition)."""
    grams: Sequence[Hashable]
    if is_cjk(text):
        grams = ngrams(text, char_n, word_n)
    else:  # tuples of words: no string joins
        toks = words(text)
        grams = list(zip(*(toks[i:] for i in range(word_n)))) if len(toks) >= word_n else []
    if len(grams) < 4:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)
