"""PII redaction with typed placeholders; numbers are validated (ID check digit, Luhn) before redaction."""

from __future__ import annotations

import re
from collections import Counter

PLACEHOLDERS = {
    "url": "[URL]",
    "email": "[EMAIL]",
    "id_card": "[ID_CARD]",
    "bank_card": "[BANK_CARD]",
    "phone": "[PHONE]",
    "landline": "[LANDLINE]",
    "ipv4": "[IP]",
}
ALL_TYPES = tuple(PLACEHOLDERS)

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"

_URL_RE = re.compile(r"\b(?:https?://|ftp://|www\.)[^\s<>\"'，。；、）)】]+", re.I)
_EMAIL_RE = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_ID_RE = re.compile(
    r"(?<![0-9A-Za-z])\d{6}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx](?![0-9A-Za-z])"
)
# 16-19 contiguous digits, or groups of four separated by one space/hyphen (last group 1-4 digits)
_CARD_RE = re.compile(r"(?<![\d-])(?:\d{16,19}|\d{4}(?:[ -]\d{4}){3}(?:[ -]\d{1,3})?)(?![\d-])")
_MOBILE_RE = re.compile(r"(?<![\d+])(?:\+?86[ -]?)?1[3-9]\d[ -]?\d{4}[ -]?\d{4}(?!\d)")
# International numbers in E.164 style (+1 212 555 0199, +44 20 7946 0958, +44 7700 900123), North
# American 3-3-4 numbers with separators ((415) 555-0132, 415-555-0132) and national numbers with a
# trunk 0 and two hyphens (090-1234-5678). Separators (or the leading +) are required so that dosages
# and ranges ("120-130") never match.
_INTL_PHONE_RE = re.compile(
    r"(?<![\w+])(?:\+[1-9]\d{0,2}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{2,4}){2,4}"
    r"|\+[1-9]\d{0,2}[ .-]\d{2,5}[ .-]\d{5,8}"
    r"|(?:1[ .-]?)?\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}|(?:1[ .-])?\d{3}[.-]\d{3}[.-]\d{4}|0\d{1,3}-\d{3,4}-\d{4})(?![\w-])"
)
# North American toll-free numbers spelled with letters (1-800-CDC-INFO, 1-888-FLOWERS): the whole number,
# not `1-[PHONE]`; the digit forms (1-800-232-4636) are North American numbers above.
_TOLL_FREE_RE = re.compile(
    r"(?<![\w+])(?:\+?1[ .-])?\(?8(?:00|33|44|55|66|77|88)\)?[ .-](?=[A-Z0-9-]*[A-Z])[A-Z0-9]{3}-?[A-Z0-9]{4}(?![\w-])"
)
_LANDLINE_RE = re.compile(r"(?<![\d-])(?:\(0\d{2,3}\)\s?|0\d{2,3}[- ])[2-9]\d{6,7}(?:-\d{1,5})?(?!\d)")
_IPV4_RE = re.compile(
    r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.])"
)
_DIGITS_RE = re.compile(r"\d[\d .()-]{5,}\d")  # any number long enough to be a phone, ID, card or IP
_NUMERIC = ("id_card", "bank_card", "phone", "landline", "ipv4")
_TRAILING_PUNCT = ".,;:!?)]}'\""


def id_check_digit(first17: str) -> str:
    """The check character of a Chinese resident ID (GB 11643-1999, ISO 7064 MOD 11-2)."""
    total = sum(int(d) * w for d, w in zip(first17, _ID_WEIGHTS))
    return _ID_CHECK[total % 11]


def is_valid_id_card(number: str) -> bool:
    number = number.upper()
    if len(number) != 18 or not number[:17].isdigit():
        return False
    return id_check_digit(number[:17]) == number[17]


def luhn_valid(number: str) -> bool:
    digits = [int(c) for c in number if c.isdigit()]
    if not digits:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _sub(pattern: re.Pattern, kind: str, text: str, counts: Counter, check=None) -> str:
    def repl(match: re.Match) -> str:
        value = match.group(0)
        suffix = ""
        if kind == "url":
            while value and value[-1] in _TRAILING_PUNCT:
                suffix = value[-1] + suffix
                value = value[:-1]
        if check is not None and not check(value):
            return match.group(0)
        counts[kind] += 1
        return PLACEHOLDERS[kind] + suffix

    return pattern.sub(repl, text)


def _card_ok(value: str) -> bool:
    digits = re.sub(r"[ -]", "", value)
    return 16 <= len(digits) <= 19 and luhn_valid(digits)


def redact_pii(text: str, types: tuple[str, ...] | list[str] | None = None) -> tuple[str, dict[str, int]]:
    """Replace PII with typed placeholders; returns the new text and counts per type.

    Types: url, email, id_card (18-digit resident ID, check digit validated), bank_card (16-19
    digits, Luhn validated), phone (Chinese mobile, international +CC, North American 3-3-4 with or without
    the leading 1, toll-free numbers spelled with letters),
    landline, ipv4.
    """
    wanted = ALL_TYPES if types is None else tuple(types)
    counts: Counter = Counter()
    # cheap gates: most texts have no long digit run, no '@' and no URL marker
    if not _DIGITS_RE.search(text) and not _TOLL_FREE_RE.search(text):
        wanted = tuple(t for t in wanted if t not in _NUMERIC)
    if "@" not in text:
        wanted = tuple(t for t in wanted if t != "email")
    if "://" not in text and "www." not in text.lower():
        wanted = tuple(t for t in wanted if t != "url")
    if not wanted:
        return text, {}
    if "url" in wanted:
        text = _sub(_URL_RE, "url", text, counts)
    if "email" in wanted:
        text = _sub(_EMAIL_RE, "email", text, counts)
    if "id_card" in wanted:
        text = _sub(_ID_RE, "id_card", text, counts, is_valid_id_card)
    if "bank_card" in wanted:
        text = _sub(_CARD_RE, "bank_card", text, counts, _card_ok)
    if "phone" in wanted:
        text = _sub(_MOBILE_RE, "phone", text, counts)
        text = _sub(_TOLL_FREE_RE, "phone", text, counts)
        text = _sub(_INTL_PHONE_RE, "phone", text, counts)
    if "landline" in wanted:
        text = _sub(_LANDLINE_RE, "landline", text, counts)
    if "ipv4" in wanted:
        text = _sub(_IPV4_RE, "ipv4", text, counts)
    return text, dict(counts)
