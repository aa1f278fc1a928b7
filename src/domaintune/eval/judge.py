"""Optional LLM-as-judge through an OpenAI-compatible endpoint: a rubric prompt, a 1-5 score and a reason."""

from __future__ import annotations

import json
import os
import re
from typing import Any

from domaintune.errors import UserError
from domaintune.eval.config import JudgeConfig

JUDGE_TEMPLATE = """You are a strict expert grader.
{rubric}

QUESTION:
{question}

REFERENCE:
{reference}

ANSWER:
{answer}

Reply with JSON only: {{"score": <integer 1-5>, "reason": "<one sentence>"}}"""

_SCORE_RE = re.compile(r'"?score"?\s*[:=]\s*"?([1-5])\b', re.I)


def parse_judgement(text: str) -> tuple[int | None, str]:
    """(score, reason) from the judge's reply; score None when the reply has no 1-5 score."""
    text = text or ""
    start = text.find("{")
    if start >= 0:
        try:
            value, _ = json.JSONDecoder().raw_decode(text[start:])
            score = value.get("score") if isinstance(value, dict) else None
            if isinstance(score, (int, float, str)) and str(score).strip().isdigit() and 1 <= int(score) <= 5:
                return int(score), str(value.get("reason", "")).strip()
        except ValueError:
            pass
    match = _SCORE_RE.search(text)
    if match:
        return int(match.group(1)), text.strip()[:300]
    return None, text.strip()[:300]


def judge_settings(cfg: JudgeConfig) -> dict[str, Any]:
    return {"url": cfg.url, "model": cfg.model, "rubric": cfg.rubric}


class Judge:
    def __init__(self, cfg: JudgeConfig):
        from openai import OpenAI

        if not cfg.url:
            raise UserError("eval.judge.url is not set")
        key = cfg.api_key or (os.environ.get(cfg.api_key_env) if cfg.api_key_env else None)
        self.cfg = cfg
        self.client = OpenAI(base_url=cfg.url, api_key=key or "no-key", timeout=cfg.timeout_s, max_retries=2)

    def score(self, question: str, reference: str, answer: str) -> dict[str, Any]:
        import openai

        prompt = JUDGE_TEMPLATE.format(rubric=self.cfg.rubric, question=question, reference=reference, answer=answer)
        try:
            resp = self.client.chat.completions.create(
                model=self.cfg.model,
                messages=[{"role": "user", "content": prompt}],
                temperature=0,
                max_tokens=200,
            )
        except openai.APIError as exc:
            raise UserError(f"eval.judge: endpoint {self.cfg.url} failed: {exc}") from None
        text = resp.choices[0].message.content if resp.choices else ""
        score, reason = parse_judgement(text or "")
        return {"score": score, "reason": reason, "raw": (text or "")[:500]}
