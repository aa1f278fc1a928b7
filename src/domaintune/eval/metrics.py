"""Per-item text metrics, tokenised correctly for Chinese as well as for space-separated languages.

Every score is on a 0-100 scale (like sacrebleu's BLEU and chrF) so gates such as
`rougeL_char_delta >= 2` read as points.

Tokenisers:
- `char_tokens`: each CJK character is a token, runs of latin letters/digits are words
  (punctuation and whitespace dropped). `rouge-score`'s own tokenizer keeps only [a-z0-9],
  so it scores any Chinese text as 0; we always pass it one of ours.
- `word_tokens`: jieba word segmentation (latin words stay whole).
BLEU uses sacrebleu with `tokenize='zh'` when the reference contains CJK, else `13a`.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

from domaintune.model.tools import parse_tool_calls

_CJK = (
    "\u2e80-\u2eff\u2f00-\u2fdf\u3040-\u309f\u30a0-\u30ff\u3100-\u312f\u3400-\u4dbf\u4e00-\u9fff"
    "\uac00-\ud7af\uf900-\ufaff\U00020000-\U0002ffff"
)
_CJK_RE = re.compile(f"[{_CJK}]")
_CHAR_TOKEN_RE = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+")
_WORDISH_RE = re.compile(r"\w")
_PUNCT_SPACE_RE = re.compile(r"[\W_]+")


def has_cjk(text: str) -> bool:
    return bool(_CJK_RE.search(text or ""))


def normalize(text: str) -> str:
    """NFKC (full-width -> half-width), lower case, collapsed whitespace."""
    text = unicodedata.normalize("NFKC", text or "").lower()
    return " ".join(text.split())


def char_tokens(text: str) -> list[str]:
    """CJK characters one by one, other scripts by word; punctuation dropped."""
    return _CHAR_TOKEN_RE.findall(normalize(text))


@lru_cache(maxsize=1)
def _jieba():
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
    return jieba


def word_tokens(text: str) -> list[str]:
    """jieba words for Chinese (latin words kept whole); punctuation and spaces dropped."""
    norm = normalize(text)
    if not has_cjk(norm):
        return _CHAR_TOKEN_RE.findall(norm)
    return [tok for tok in (t.strip() for t in _jieba().lcut(norm)) if tok and _WORDISH_RE.search(tok)]


class _Tokenizer:
    """Adapter giving rouge-score a `tokenize(text)` method."""

    def __init__(self, fn):
        self.fn = fn

    def tokenize(self, text: str) -> list[str]:
        return self.fn(text)


@lru_cache(maxsize=2)
def _rouge_scorer(level: str):
    from rouge_score import rouge_scorer

    fn = char_tokens if level == "char" else word_tokens
    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_Tokenizer(fn))


def rouge(prediction: str, reference: str, level: str = "char") -> dict[str, float]:
    """ROUGE-1/2/L F-measure x100 with `level` = 'char' or 'word' tokens."""
    scores = _rouge_scorer(level).score(reference or "", prediction or "")
    return {f"{name}_{level}": 100.0 * s.fmeasure for name, s in scores.items()}


def bleu_tokenizer_for(reference: str) -> str:
    return "zh" if has_cjk(reference) else "13a"


@lru_cache(maxsize=4)
def _bleu(tokenize: str):
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize=tokenize, effective_order=True)


@lru_cache(maxsize=1)
def _chrf():
    from sacrebleu.metrics import CHRF

    return CHRF()


def sentence_bleu(prediction: str, reference: str) -> float:
    return float(_bleu(bleu_tokenizer_for(reference)).sentence_score(prediction or "", [reference or ""]).score)


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> float | None:
    """Corpus BLEU; the tokenizer is 'zh' when most references contain CJK."""
    if not references:
        return None
    from sacrebleu.metrics import BLEU

    zh = sum(has_cjk(r) for r in references) * 2 >= len(references)
    return float(BLEU(tokenize="zh" if zh else "13a").corpus_score(list(predictions), [list(references)]).score)


def chrf(prediction: str, reference: str) -> float:
    return float(_chrf().sentence_score(prediction or "", [reference or ""]).score)


def exact_match(prediction: str, reference: str) -> float:
    """100 when equal after NFKC, lower-casing and removing punctuation/whitespace."""
    strip = lambda s: _PUNCT_SPACE_RE.sub("", normalize(s))  # noqa: E731
    return 100.0 if strip(prediction) == strip(reference) else 0.0


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style bag-of-tokens F1 x100 over `char_tokens` (characters for CJK)."""
    pred, ref = char_tokens(prediction), char_tokens(reference)
    if not pred and not ref:
        return 100.0
    if not pred or not ref:
        return 0.0
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 100.0 * 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------- JSON extraction


_FENCE_RE = re.compile(r"```(?:json)?\s*(.*?)```", re.S | re.I)


def parse_json_reference(text: str) -> Any | None:
    """The reference as JSON (object or array) if the whole text is JSON, else None."""
    text = (text or "").strip()
    fence = _FENCE_RE.fullmatch(text)
    if fence:
        text = fence.group(1).strip()
    if not text or text[0] not in "{[":
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, (dict, list)) else None


def extract_json(text: str) -> Any | None:
    """The first JSON object/array in a model's answer (inside ``` fences or bare), else None."""
    text = text or ""
    candidates = [m.group(1) for m in _FENCE_RE.finditer(text)] + [text]
    decoder = json.JSONDecoder()
    for candidate in candidates:
        for i, ch in enumerate(candidate):
            if ch in "{[":
                try:
                    value, _ = decoder.raw_decode(candidate[i:])
                except ValueError:
                    continue
                if isinstance(value, (dict, list)):
                    return value
    return None


def flatten_json(value: Any, prefix: str = "") -> set[tuple[str, str]]:
    """{"a": {"b": 1}, "c": [2]} -> {("a.b", "1"), ("c.0", "2")}; leaf values normalised."""
    out: set[tuple[str, str]] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            out |= flatten_json(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out |= flatten_json(item, f"{prefix}.{i}" if prefix else str(i))
    else:
        leaf = "null" if value is None else (json.dumps(value) if isinstance(value, bool) else str(value))
        out.add((prefix, normalize(leaf)))
    return out


def json_field_f1(prediction: Any | None, reference: Any) -> float:
    """Field-level F1 x100: (key path, value) pairs in both / in each."""
    ref = flatten_json(reference)
    pred = flatten_json(prediction) if prediction is not None else set()
    if not ref and not pred:
        return 100.0
    tp = len(ref & pred)
    if tp == 0:
        return 0.0
    precision, recall = tp / len(pred), tp / len(ref)
    return 100.0 * 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------- classification


def predicted_label(prediction: str, labels: Iterable[str]) -> str | None:
    """The label the answer states: whole answer equal to a label, else the label mentioned first
    (longest label wins a tie at the same position), else None."""
    norm_pred = _PUNCT_SPACE_RE.sub(" ", normalize(prediction)).strip()
    by_norm = {_PUNCT_SPACE_RE.sub(" ", normalize(label)).strip(): label for label in labels}
    if norm_pred in by_norm:
        return by_norm[norm_pred]
    best: tuple[int, int, str] | None = None
    padded = f" {norm_pred} "
    for norm_label, label in by_norm.items():
        if not norm_label:
            continue
        # Whole-word match for latin labels, substring for CJK labels.
        needle = norm_label if has_cjk(norm_label) else f" {norm_label} "
        pos = padded.find(needle)
        if pos >= 0 and (best is None or (pos, -len(norm_label)) < (best[0], best[1])):
            best = (pos, -len(norm_label), label)
    return best[2] if best else None


def classification_scores(gold: Sequence[str], predicted: Sequence[str | None]) -> dict[str, float]:
    """Accuracy and macro-F1 (x100) over the gold label set; a missing prediction counts as wrong."""
    if not gold:
        return {}
    correct = sum(g == p for g, p in zip(gold, predicted))
    f1s = []
    for label in sorted(set(gold)):
        tp = sum(g == label and p == label for g, p in zip(gold, predicted))
        fp = sum(g != label and p == label for g, p in zip(gold, predicted))
        fn = sum(g == label and p != label for g, p in zip(gold, predicted))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"accuracy": 100.0 * correct / len(gold), "macro_f1": 100.0 * sum(f1s) / len(f1s)}


# ---------------------------------------------------------------- glossary


def load_glossary(path) -> list[str]:
    """One term per line; blank lines and `#` comments ignored; duplicates removed."""
    from pathlib import Path

    from domaintune.errors import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"eval.glossary: {path} does not exist")
    terms: list[str] = []
    seen = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        term = line.split("#", 1)[0].strip()
        key = normalize(term)
        if term and key not in seen:
            seen.add(key)
            terms.append(term)
    if not terms:
        raise UserError(f"eval.glossary: {path} has no terms (one per line)")
    return terms


def term_coverage(prediction: str, reference: str, terms: Sequence[str]) -> float | None:
    """Share (x100) of glossary terms found in the reference that the prediction also contains;
    None when the reference contains no glossary term."""
    ref, pred = normalize(reference), normalize(prediction)
    wanted = [t for t in terms if contains_term(ref, t)]
    if not wanted:
        return None
    return 100.0 * sum(contains_term(pred, t) for t in wanted) / len(wanted)


@lru_cache(maxsize=4096)
def _term_pattern(term: str) -> re.Pattern:
    norm = normalize(term)
    if has_cjk(norm):
        return re.compile(re.escape(norm))  # Chinese has no word boundaries: substring
    # Latin terms match whole words only ("CT" must not match "correct").
    letter = f"[^\\W_{_CJK}]"  # a letter or digit of a space-separated script
    return re.compile(f"(?<!{letter})" + re.escape(norm) + f"(?!{letter})")


def contains_term(normalized_text: str, term: str) -> bool:
    return _term_pattern(term).search(normalized_text) is not None


# ---------------------------------------------------------------- tool calls


def _call_key(call: dict[str, Any]) -> tuple[str, str]:
    args = call["function"]["arguments"]
    if isinstance(args, str):
        args = json.loads(args)
    return call["function"]["name"], json.dumps(args, sort_keys=True, ensure_ascii=False)


def tool_call_scores(prediction: str, expected: list[dict[str, Any]]) -> dict[str, float]:
    """Tool-call correctness of one answer against the expected calls (order does not matter), x100:
    `tool_json_valid` the answer is calls whose arguments parse as JSON objects, `tool_name_acc` it calls the
    expected functions, `tool_args_exact` with exactly the expected arguments (JSON-equal)."""
    _, calls = parse_tool_calls(prediction)
    want = sorted(_call_key(c) for c in expected)
    got = sorted(_call_key(c) for c in calls)
    return {
        "tool_json_valid": 100.0 if calls else 0.0,
        "tool_name_acc": 100.0 if [n for n, _ in got] == [n for n, _ in want] else 0.0,
        "tool_args_exact": 100.0 if got == want else 0.0,
    }


# ---------------------------------------------------------------- one item


def score_item(prediction: str, reference: str, metrics: Iterable[str], glossary: Sequence[str] | None = None) -> dict:
    """Every per-item text metric asked for; values x100, None where a metric does not apply."""
    metrics = set(metrics)
    out: dict[str, float | None] = {}
    if "rouge" in metrics:
        out.update(rouge(prediction, reference, "char"))
        out.update(rouge(prediction, reference, "word"))
    if "bleu" in metrics:
        out["bleu"] = sentence_bleu(prediction, reference)
    if "chrf" in metrics:
        out["chrf"] = chrf(prediction, reference)
    if "exact_match" in metrics:
        out["exact_match"] = exact_match(prediction, reference)
    if "token_f1" in metrics:
        out["token_f1"] = token_f1(prediction, reference)
    if "term_coverage" in metrics and glossary:
        out["term_coverage"] = term_coverage(prediction, reference, glossary)
    if "json" in metrics:
        ref_json = parse_json_reference(reference)
        if ref_json is not None:
            pred_json = extract_json(prediction)
            out["valid_json"] = 100.0 if pred_json is not None else 0.0
            out["json_field_f1"] = json_field_f1(pred_json, ref_json)
    return out


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)
