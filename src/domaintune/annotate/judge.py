"""LLM-as-judge with validators for synthetic (and augmented) rows.

Validators run first (cheap, deterministic): JSON schema of the answer (when it must be JSON), regexes the
question/answer must (or must not) match, groundedness against the source passage (share of the answer's
words/characters found in it), and PII. A row that passes them is scored by a judge model through any
OpenAI-compatible endpoint (the project's own `domaintune serve` included) with a rubric; the reply must hold
`score: <1-5>` (or JSON {"score": n, "reason": "..."}). Rows below `min_score`, and rows whose judge reply
cannot be read, are rejected with the reason. `judge_agreement` compares the judge's accept/reject with a
human-labelled sample (Cohen's kappa, accuracy) so a team knows whether to trust it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import Field

from domaintune.utils.config_types import StrictModel

DEFAULT_RUBRIC = (
    "Score the question-answer pair from 1 (unusable) to 5 (excellent) for training a domain assistant: the "
    "question stands on its own, the answer is correct, complete and supported by the passage, and it is safe."
)
_SCORE_RE = re.compile(r"(?:score|评分|分数)\s*[:：=]\s*([1-5](?:\.\d+)?)", re.I)
_REASON_RE = re.compile(r"(?:reason|理由)\s*[:：]\s*(.+)", re.I | re.S)


class ValidatorConfig(StrictModel):
    json_schema: dict[str, Any] | None = Field(None, description="The answer must be JSON valid against this schema.")
    must_match: dict[str, str] = Field(default_factory=dict, description="{question|answer: regex} that must match.")
    must_not_match: dict[str, str] = Field(default_factory=dict, description="{question|answer: regex} that must not.")
    min_grounding: float | None = Field(
        0.5, ge=0, le=1, description="Share of the answer's words (CJK: characters) found in the passage; null: off."
    )
    pii: bool = Field(True, description="Reject rows with PII (data.pii detectors).")


class JudgeConfig(StrictModel):
    """`data.augment.judge`-shaped settings: an endpoint, a rubric, a threshold and validators."""

    base_url: str | None = Field(None, description="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1.")
    model: str | None = Field(None, description="Judge model id at the endpoint.")
    api_key_env: str | None = Field(None, description="Environment variable holding the API key.")
    rubric: str = Field(DEFAULT_RUBRIC, description="What the judge scores (shown to it verbatim).")
    min_score: float = Field(4.0, ge=1, le=5, description="Rows scoring below this are rejected.")
    max_tokens: int = Field(96, ge=1)
    timeout_s: float = Field(60.0, gt=0)
    concurrency: int = Field(4, ge=1)
    validators: ValidatorConfig = Field(default_factory=ValidatorConfig)


def _units(text: str) -> list[str]:
    cjk = re.findall(r"[\u3400-\u9fff]", text)
    return cjk if len(cjk) * 2 >= len(re.sub(r"\s", "", text)) else re.findall(r"\w+", text.lower())


def grounding(answer: str, passage: str) -> float:
    units = _units(answer)
    if not units:
        return 0.0
    have = set(_units(passage))
    return sum(u in have for u in units) / len(units)


def validate(row: dict[str, Any], vc: ValidatorConfig) -> str | None:
    """None when the row passes every validator; else the first failure."""
    q, a, passage = str(row.get("question", "")), str(row.get("answer", "")), row.get("passage")
    if vc.json_schema is not None:
        import jsonschema

        try:
            jsonschema.validate(json.loads(a), vc.json_schema)
        except (json.JSONDecodeError, jsonschema.ValidationError) as exc:
            return f"answer fails the JSON schema ({str(exc).splitlines()[0][:120]})"
    texts = {"question": q, "answer": a}
    for where, pattern in vc.must_match.items():
        if not re.search(pattern, texts[where]):
            return f"{where} does not match {pattern!r}"
    for where, pattern in vc.must_not_match.items():
        if re.search(pattern, texts[where]):
            return f"{where} matches forbidden {pattern!r}"
    if vc.min_grounding is not None and passage is not None:
        g = grounding(a, str(passage))
        if g < vc.min_grounding:
            return f"answer not grounded in the passage ({g:.2f} < {vc.min_grounding})"
    if vc.pii:
        from domaintune.data.pii import redact_pii

        _, counts = redact_pii(q + "\n" + a)
        if counts:
            return f"PII ({', '.join(sorted(counts))})"
    return None


def judge_messages(row: dict[str, Any], rubric: str) -> list[dict[str, str]]:
    passage = f"Passage:\n{row['passage']}\n\n" if row.get("passage") else ""
    return [
        {"role": "system", "content": "You are a strict data-quality judge. " + rubric},
        {
            "role": "user",
            "content": f"{passage}Question:\n{row.get('question', '')}\n\nAnswer:\n{row.get('answer', '')}\n\n"
            "Reply in exactly this form:\nscore: <1-5>\nreason: <one sentence>",
        },
    ]


def parse_verdict(text: str) -> tuple[float | None, str]:
    """(score, reason) from a judge reply; score None when it cannot be read."""
    try:
        doc = json.loads(text.strip().strip("`").removeprefix("json"))
        if isinstance(doc, dict) and "score" in doc:
            return float(doc["score"]), str(doc.get("reason", ""))
    except (json.JSONDecodeError, TypeError, ValueError):
        pass
    m = _SCORE_RE.search(text)
    reason = _REASON_RE.search(text)
    return (float(m.group(1)) if m else None), (reason.group(1).strip()[:300] if reason else text.strip()[:300])


def openai_judge(jc: JudgeConfig) -> Callable[[list[dict[str, str]]], str]:
    import os

    from openai import OpenAI

    key = os.environ.get(jc.api_key_env, "") if jc.api_key_env else "EMPTY"
    client = OpenAI(base_url=jc.base_url, api_key=key or "EMPTY", max_retries=1, timeout=jc.timeout_s)

    def ask(messages: list[dict[str, str]]) -> str:
        kwargs: dict[str, Any] = {"model": jc.model or "", "messages": messages, "max_tokens": jc.max_tokens}
        resp = client.chat.completions.create(temperature=0, **kwargs)
        return (resp.choices[0].message.content or "") if resp.choices else ""

    return ask


def judge_rows(rows: Sequence[dict[str, Any]], jc: JudgeConfig, ask: Callable | None = None) -> list[dict[str, Any]]:
    """A verdict per row: {accepted, stage: validator|judge, score, reason, raw}."""
    ask = ask or openai_judge(jc)
    verdicts: list[dict[str, Any]] = [{} for _ in rows]
    todo = []
    for i, row in enumerate(rows):
        failure = validate(row, jc.validators)
        if failure is None:
            todo.append(i)
        else:
            verdicts[i] = {"accepted": False, "stage": "validator", "score": None, "reason": failure}

    def one(i: int) -> dict[str, Any]:
        try:
            raw = ask(judge_messages(rows[i], jc.rubric))
        except Exception as exc:  # an endpoint failure rejects the row with the reason; the others go on
            return {
                "accepted": False,
                "stage": "judge",
                "score": None,
                "reason": f"judge error: {type(exc).__name__}: {exc}"[:300],
            }
        score, reason = parse_verdict(raw)
        if score is None:
            return {
                "accepted": False,
                "stage": "judge",
                "score": None,
                "reason": "judge reply has no score",
                "raw": raw[:300],
            }
        ok = score >= jc.min_score
        return {"accepted": ok, "stage": "judge", "score": score, "reason": reason, "raw": raw[:300]}

    with ThreadPoolExecutor(max_workers=jc.concurrency) as pool:
        for i, verdict in zip(todo, pool.map(one, todo)):
            verdicts[i] = verdict
    return verdicts


def judge_summary(verdicts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    scores = [v["score"] for v in verdicts if v.get("score") is not None]
    reasons: dict[str, int] = {}
    for v in verdicts:
        if not v["accepted"]:
            key = v["reason"].split(" (")[0][:80]
            reasons[key] = reasons.get(key, 0) + 1
    return {
        "rows": len(verdicts),
        "accepted": sum(v["accepted"] for v in verdicts),
        "rejected_by_validators": sum(v["stage"] == "validator" for v in verdicts),
        "rejected_by_judge": sum(v["stage"] == "judge" and not v["accepted"] for v in verdicts),
        "mean_score": round(sum(scores) / len(scores), 3) if scores else None,
        "reject_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
    }


def judge_agreement(verdicts: Sequence[dict[str, Any]], human: Sequence[bool]) -> dict[str, Any]:
    """How far the judge's accept/reject agrees with people's on the same rows."""
    from domaintune.eval.stats import cohen_kappa

    if len(verdicts) != len(human):
        raise ValueError("judge agreement needs a human label for every judged row")
    judge = [str(bool(v["accepted"])) for v in verdicts]
    people = [str(bool(h)) for h in human]
    tp = sum(j == "True" and h == "True" for j, h in zip(judge, people))
    k = cohen_kappa(judge, people)
    return {
        "n": len(judge),
        "accuracy": round(sum(j == h for j, h in zip(judge, people)) / len(judge), 4) if judge else None,
        "kappa": None if k is None else round(k, 4),
        "precision": round(tp / judge.count("True"), 4) if judge.count("True") else None,
        "recall": round(tp / people.count("True"), 4) if people.count("True") else None,
    }


JUDGED_OPS = ("synthetic_qa", "paraphrase", "back_translate", "lexical")


def apply_judge(ctx: Any, res: Any, jc: JudgeConfig, ask: Callable | None = None) -> None:
    """`data.augment.judge`: keep only the op's rows that pass the validators and the judge; the others go to the
    quarantine (reason, score, judge reply); the op's report gets the judge summary."""
    items = []
    for row in res.rows:
        q = next((m["content"] for m in row["messages"] if m["role"] == "user"), "")
        a = next((m["content"] for m in row["messages"] if m["role"] == "assistant"), "")
        items.append({"question": q, "answer": a, "passage": row.get("passage")})
    verdicts = judge_rows(items, jc, ask)
    kept = []
    for row, item, verdict in zip(res.rows, items, verdicts):
        row["judge"] = {k: verdict.get(k) for k in ("score", "reason", "stage")}
        if verdict["accepted"]:
            kept.append(row)
            continue
        parent = {"id": (row.get("derived_from") or [row["id"]])[0], "source": row.get("source", "augment")}
        ctx.reject(res, parent, f"{verdict['stage']}: {verdict['reason']}", {**item, "judge": verdict})
    res.rows = kept
    res.extra["judge"] = judge_summary(verdicts)
