"""Light, seeded perturbations of a prompt for the robustness check."""

from __future__ import annotations

import random
import unicodedata

from domaintune.eval.metrics import has_cjk


def _is_letter(ch: str) -> bool:
    return ch.isalpha() or has_cjk(ch)


def typo(text: str, rng: random.Random, rate: float = 0.05) -> str:
    """Swap with the next character, drop, or double a share `rate` of letters (CJK characters included)."""
    chars = list(text)
    positions = [i for i, ch in enumerate(chars) if _is_letter(ch)]
    if not positions:
        return text
    count = max(1, round(len(positions) * rate))
    for pos in sorted(rng.sample(positions, min(count, len(positions))), reverse=True):
        action = rng.choice(("swap", "drop", "double"))
        if action == "swap" and pos + 1 < len(chars):
            chars[pos], chars[pos + 1] = chars[pos + 1], chars[pos]
        elif action == "drop" and len(chars) > 1:
            del chars[pos]
        else:
            chars.insert(pos, chars[pos])
    return "".join(chars)


_FULL_PUNCT = {"，": ",", "。": ".", "？": "?", "！": "!", "：": ":", "；": ";", "（": "(", "）": ")", "　": " "}
_HALF_PUNCT = {v: k for k, v in _FULL_PUNCT.items() if v != "."}


def width_swap(text: str, rng: random.Random, rate: float = 0.5) -> str:
    """Swap full-width and half-width forms (ASCII letters/digits/punctuation and CJK punctuation)."""
    out = []
    for ch in text:
        swapped = ch
        if ch in _FULL_PUNCT:
            swapped = _FULL_PUNCT[ch]
        elif ch in _HALF_PUNCT:
            swapped = _HALF_PUNCT[ch]
        elif "\uff01" <= ch <= "\uff5e":
            swapped = unicodedata.normalize("NFKC", ch)
        elif "!" <= ch <= "~":
            swapped = chr(ord(ch) + 0xFEE0)
        out.append(swapped if swapped != ch and rng.random() < rate else ch)
    result = "".join(out)
    if result == text:  # guarantee a change where one is possible
        for i, ch in enumerate(text):
            if "!" <= ch <= "~":
                return text[:i] + chr(ord(ch) + 0xFEE0) + text[i + 1 :]
            if ch in _FULL_PUNCT:
                return text[:i] + _FULL_PUNCT[ch] + text[i + 1 :]
    return result


def extra_whitespace(text: str, rng: random.Random, rate: float = 0.05) -> str:
    """Leading/trailing blanks, doubled spaces and stray spaces between characters."""
    chars = []
    for ch in text:
        chars.append(ch)
        if ch == " " or rng.random() < rate:
            chars.append(" ")
    return "  " + "".join(chars) + " \n"


PERTURBATIONS = {"typo": typo, "width": width_swap, "whitespace": extra_whitespace}


def perturb_prompt(prompt: list[dict], kind: str, seed: int, rate: float) -> list[dict]:
    """Perturb the last user message of a prompt (other messages untouched); deterministic for a seed."""
    rng = random.Random(f"{kind}:{seed}")
    fn = PERTURBATIONS[kind]
    out = [dict(m) for m in prompt]
    for message in reversed(out):
        if message["role"] == "user":
            message["content"] = fn(message["content"], rng, rate if kind != "width" else 0.5)
            break
    return out
