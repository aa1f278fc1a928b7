"""Domain verifiers: GRPO's reward components, declared in `train.grpo.rewards`, and the pass rates eval reports.

Each verifier is a callable `v(prompts, completions, **row_fields) -> list[float]` (trl's reward-function form:
row fields such as `reference` arrive as lists aligned with the completions). Scores are in [0, 1] except the
reward model's (its logit). `build_verifiers` turns the config into named callables; `combined_scores` sums
them with their weights; `passes` says which completions pass every component at its `pass_at`.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from domaintune.errors import UserError
from domaintune.train.preference.config import VerifierSpec
from domaintune.train.preference.tool_rows import turns_of

log = logging.getLogger(__name__)

_NUMBER_RE = re.compile(r"-?\d+(?:[.,]\d+)*(?:\.\d+)?")
_JSON_BLOCK_RE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)
# A figure with its unit: the facts of a policy answer that any paraphrase must keep (English and Chinese units).
_UNITS = (
    r"business days?|working days?|days?|hours?|minutes?|weeks?|months?|years?|dollars?|euros?|percent|%|points?"
    r"|个?工作日|天|小时|分钟|周|个月|年|元|块"
)
FACT_RE = re.compile(
    rf"[$€£¥]\s?\d+(?:[.,]\d+)?|\d+(?:[.,]\d+)?(?:\s?[-–~到至]\s?\d+(?:[.,]\d+)?)?[\s-]?(?:{_UNITS})(?![a-z])", re.I
)
_CURRENCY = {"$": "dollar", "€": "euro", "£": "pound", "¥": "yuan"}
# PII types the no_pii verifier looks for (a URL in an answer is usually the shop's own page, not PII).
NO_PII_TYPES = ("email", "id_card", "bank_card", "phone", "landline", "ipv4")


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or trl's conversational form (a list of messages)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    return str(completion)


def prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list):
        return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in prompt if m.get("role") != "system")
    return str(prompt)


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s.%-]", " ", text.lower()).split()).strip(" .")


def _last_number(text: str) -> float | None:
    found = _NUMBER_RE.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def answer_match(text: str, reference: str, mode: str, tolerance: float) -> float:
    if mode == "numeric":
        got, want = _last_number(text), _last_number(reference)
        return float(got is not None and want is not None and abs(got - want) <= tolerance)
    if mode == "contains":
        return float(_norm(reference) in _norm(text))
    return float(_norm(text) == _norm(reference))


def phrase_score(text: str, phrases: Sequence[str], case_sensitive: bool, require_all: bool) -> float:
    hay = text if case_sensitive else text.lower()
    found = sum((p if case_sensitive else p.lower()) in hay for p in phrases)
    if require_all:
        return float(found == len(phrases))
    return found / len(phrases) if phrases else 1.0


def json_score(text: str, schema: dict[str, Any]) -> float:
    """1 when the completion (or its ```json block, or its outermost {...}) parses and validates against `schema`."""
    import jsonschema

    candidates = [m.group(1) for m in _JSON_BLOCK_RE.finditer(text)] + [text]
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start : end + 1])
    for candidate in candidates:
        try:
            value = json.loads(candidate.strip())
        except ValueError:
            continue
        try:
            jsonschema.validate(value, schema)
        except jsonschema.ValidationError:
            return 0.0
        return 1.0
    return 0.0


def glossary_score(text: str, reference: str | None, terms: Sequence[str], case_sensitive: bool) -> float:
    """Share of the relevant glossary terms the completion uses: the terms the reference uses, or all of them."""
    fold = (lambda s: s) if case_sensitive else str.lower
    relevant = [t for t in terms if reference and fold(t) in fold(reference)] or list(terms)
    if not relevant:
        return 1.0
    return sum(fold(t) in fold(text) for t in relevant) / len(relevant)


def _fact_key(fact: str) -> str:
    """One spelling per fact: `30-day` = `30 days`, `$75` = `75 dollars`, `3–5` = `3-5` = `3到5`."""
    fact = fact.lower().strip()
    if fact[0] in _CURRENCY:
        return f"{fact[1:].strip()}{_CURRENCY[fact[0]]}"
    fact = re.sub(r"\s*[-–~到至]\s*(?=\d)", "~", fact)  # a range: 3-5, 3–5, 3到5
    fact = re.sub(r"[\s-]+", "", fact)  # 30-day = 30 days; business days = businessdays
    return fact[:-1] if fact.endswith("s") else fact


def facts_in(text: str, pattern: re.Pattern[str] = FACT_RE) -> set[str]:
    return {_fact_key(m.group(0)) for m in pattern.finditer(text or "")}


def fact_pattern(spec: VerifierSpec) -> re.Pattern[str]:
    """What a reference_facts verifier counts as a fact: its `pattern`, else a figure with its unit."""
    return re.compile(spec.pattern, re.I) if spec.pattern else FACT_RE


def reference_facts_score(text: str, reference: str | None, pattern: re.Pattern[str] = FACT_RE) -> float:
    """Share of the reference's facts (figures with units) the completion states; 1 when the reference has none."""
    wanted = facts_in(reference or "", pattern)
    if not wanted:
        return 1.0
    return len(wanted & facts_in(text, pattern)) / len(wanted)


def length_score(text: str, min_words: int, max_words: int) -> float:
    """1 inside [min_words, max_words]; rises linearly below, decays linearly to 0 at twice the maximum."""
    n = len(text.split())
    if n < min_words:
        return n / min_words
    if n > max_words:
        return max(0.0, 1.0 - (n - max_words) / max_words)
    return 1.0


def pii_free_score(text: str) -> float:
    from domaintune.data.pii import redact_pii

    _, counts = redact_pii(text, NO_PII_TYPES)
    return float(not counts)


class Verifier:
    """A named reward component (trl reads `__name__` for its `rewards/<name>/mean` logs)."""

    def __init__(self, spec: VerifierSpec, name: str, score: Callable[[str, str, dict[str, Any]], float]):
        self.spec = spec
        self.__name__ = name
        self._score = score

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **fields: Any) -> list[float]:
        out = []
        for i, (prompt, completion) in enumerate(zip(turns_of(prompts, fields), completions, strict=False)):
            row = {k: v[i] for k, v in fields.items() if isinstance(v, list) and len(v) > i}
            out.append(float(self._score(prompt_text(prompt), completion_text(completion), row)))
        return out


class BatchVerifier(Verifier):
    """A component scoring a whole batch at once (reward model, python function)."""

    def __init__(self, spec: VerifierSpec, name: str, batch: Callable[..., list[float]]):
        super().__init__(spec, name, lambda p, c, r: 0.0)
        self._batch = batch

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **fields: Any) -> list[float]:
        return [float(x) for x in self._batch(turns_of(prompts, fields), list(completions), **fields)]


def _load_schema(spec: VerifierSpec) -> dict[str, Any]:
    if isinstance(spec.schema_, dict):
        return spec.schema_
    path = Path(str(spec.schema_))
    if not path.is_file():
        raise UserError(f"train.grpo.rewards: schema file {path} not found")
    return json.loads(path.read_text(encoding="utf-8"))


def _terms(spec: VerifierSpec) -> list[str]:
    terms = list(spec.terms)
    if spec.glossary_path is not None:
        path = Path(spec.glossary_path)
        if not path.is_file():
            raise UserError(f"train.grpo.rewards: glossary file {path} not found")
        terms += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return terms


def _text_scorer(spec: VerifierSpec) -> Callable[[str, str, dict[str, Any]], float]:
    """The per-completion scorer for the verifiers that need only the texts and the row."""
    if spec.type == "answer_match":
        return lambda p, c, row: answer_match(c, str(row.get(spec.field, "")), spec.mode, spec.tolerance)
    if spec.type == "regex":
        flags = 0 if spec.case_sensitive else re.I
        pattern = re.compile(str(spec.pattern), flags)
        return lambda p, c, row: float(pattern.search(c) is not None)
    if spec.type == "phrases":
        return lambda p, c, row: phrase_score(c, spec.phrases, spec.case_sensitive, spec.require_all)
    if spec.type == "json_schema":
        schema = _load_schema(spec)
        return lambda p, c, row: json_score(c, schema)
    if spec.type == "glossary":
        terms = _terms(spec)
        return lambda p, c, row: glossary_score(c, row.get(spec.field), terms, spec.case_sensitive)
    if spec.type == "reference_facts":
        found = fact_pattern(spec)
        return lambda p, c, row: reference_facts_score(c, row.get(spec.field), found)
    if spec.type == "length":
        return lambda p, c, row: length_score(c, spec.min_words, spec.max_words)
    if spec.type == "no_pii":
        return lambda p, c, row: pii_free_score(c)
    if spec.type == "llm_judge":
        return _judge_scorer(spec)
    raise ValueError(f"no text scorer for {spec.type}")


def _only_where_it_applies(spec: VerifierSpec, score: Callable[[str, str, dict[str, Any]], float]):
    if spec.applies_if is None:
        return score
    condition = re.compile(spec.applies_if, re.I)
    return lambda p, c, row: score(p, c, row) if condition.search(p) else 1.0


def applies(spec: VerifierSpec, prompt: Any, row: dict[str, Any] | None = None) -> bool:
    """Whether a component applies to a prompt (`applies_if`) and, for reference_facts, to its row (the reference
    states a fact)."""
    if spec.applies_if is not None and re.search(spec.applies_if, prompt_text(prompt), re.I) is None:
        return False
    if spec.type == "reference_facts" and row is not None:
        return bool(facts_in(str(row.get(spec.field) or ""), fact_pattern(spec)))
    return True


def build_verifier(spec: VerifierSpec, name: str) -> Verifier:
    if spec.type == "python":
        return BatchVerifier(spec, name, import_function(str(spec.function)))
    if spec.type == "reward_model":
        from domaintune.train.preference.reward import RewardModelScorer

        return BatchVerifier(spec, name, RewardModelScorer(Path(str(spec.reward_model))))
    return Verifier(spec, name, _only_where_it_applies(spec, _text_scorer(spec)))


def build_verifiers(specs: Sequence[VerifierSpec]) -> list[Verifier]:
    """Named callables for the configured components (a repeated type is numbered: regex, regex_2...)."""
    seen: dict[str, int] = {}
    out = []
    for spec in specs:
        base = spec.name or spec.type
        seen[base] = seen.get(base, 0) + 1
        out.append(build_verifier(spec, base if seen[base] == 1 else f"{base}_{seen[base]}"))
    return out


def import_function(path: str) -> Callable[..., list[float]]:
    """`package.module:function` (or `package.module.function`)."""
    module_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        func = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"train.grpo.rewards: cannot import reward function `{path}`: {exc}") from None
    if not callable(func):
        raise UserError(f"train.grpo.rewards: `{path}` is not callable")
    return func


def _judge_scorer(spec: VerifierSpec) -> Callable[[str, str, dict[str, Any]], float]:
    """Ask an OpenAI-compatible endpoint for a 0-10 score; an unreachable judge scores 0 and is logged."""
    import httpx

    key = os.environ.get(spec.api_key_env, "") if spec.api_key_env else ""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = str(spec.endpoint).rstrip("/") + "/chat/completions"

    def score(prompt: str, completion: str, row: dict[str, Any]) -> float:
        reference = row.get(spec.field)
        content = (
            f"{spec.rubric}\nReply with one integer from 0 (worst) to 10 (best) and nothing else.\n\n"
            f"Question:\n{prompt}\n\n" + (f"Reference answer:\n{reference}\n\n" if reference else "")
        ) + f"Answer to score:\n{completion}"
        body = {"model": spec.model, "messages": [{"role": "user", "content": content}], "temperature": 0}
        try:
            response = httpx.post(url, json=body, headers=headers, timeout=spec.timeout_s)
            response.raise_for_status()
            reply = response.json()["choices"][0]["message"]["content"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
            log.warning("llm_judge %s failed: %s (scored 0)", url, exc)
            return 0.0
        found = _NUMBER_RE.search(str(reply))  # the first number: "7", "7/10", "7 out of 10"
        number = float(found.group(0).replace(",", "")) if found else None
        return 0.0 if number is None or math.isnan(number) else min(max(number / 10.0, 0.0), 1.0)

    return score


def score_components(
    verifiers: Sequence[Verifier], prompts: Sequence[Any], completions: Sequence[Any], **fields: Any
) -> dict[str, list[float]]:
    """{component name: score per completion}."""
    return {v.__name__: v(prompts, completions, **fields) for v in verifiers}


def combined_scores(verifiers: Sequence[Verifier], components: dict[str, list[float]]) -> list[float]:
    """The weighted sum per completion (what GRPO optimises, up to trl's group normalisation)."""
    n = len(next(iter(components.values()), []))
    return [sum(v.spec.weight * components[v.__name__][i] for v in verifiers) for i in range(n)]


def passes(verifiers: Sequence[Verifier], components: dict[str, list[float]]) -> list[bool]:
    """Whether each completion reaches every component's `pass_at`."""
    n = len(next(iter(components.values()), []))
    return [all(components[v.__name__][i] >= v.spec.pass_at for v in verifiers) for i in range(n)]
