"""Judged synthesis: validators, verdict parsing, the judge through the project's own server on loopback,
the augment hook's quarantine, and the judge's agreement with people."""

from __future__ import annotations

import pytest

from domaintune.annotate.judge import (
    JudgeConfig,
    ValidatorConfig,
    apply_judge,
    grounding,
    judge_agreement,
    judge_rows,
    parse_verdict,
    validate,
)
from serve_helpers import serve_config

PASSAGE = "Hypertension is treated with lifestyle changes and drugs such as ACE inhibitors and diuretics."
ROWS = [
    {
        "question": "How is hypertension treated?",
        "answer": "With lifestyle changes and ACE inhibitors.",
        "passage": PASSAGE,
    },
    {
        "question": "What treats hypertension?",
        "answer": "Diuretics and ACE inhibitors are drugs used.",
        "passage": PASSAGE,
    },
    {"question": "Who invented aspirin?", "answer": "Felix Hoffmann at Bayer in 1897.", "passage": PASSAGE},
    {"question": "Call me?", "answer": "hypertension drugs, call 13812345678", "passage": PASSAGE},
]


def test_validators():
    vc = ValidatorConfig()
    assert validate(ROWS[0], vc) is None
    assert "not grounded" in validate(ROWS[2], vc)
    assert validate(ROWS[3], ValidatorConfig(min_grounding=None)) == "PII (phone)"
    schema = {"type": "object", "required": ["icd"], "properties": {"icd": {"type": "string"}}}
    assert "JSON schema" in validate({"answer": '{"code": 1}'}, ValidatorConfig(json_schema=schema))
    assert validate({"answer": '{"icd": "I10"}'}, ValidatorConfig(json_schema=schema)) is None
    assert "does not match" in validate(ROWS[0], ValidatorConfig(must_match={"question": r"^What"}))
    assert "forbidden" in validate(ROWS[0], ValidatorConfig(must_not_match={"answer": "ACE"}))
    assert grounding("高血压用药", "高血压患者需要用药治疗") == 1.0


def test_parse_verdict_forms():
    assert parse_verdict("score: 4\nreason: grounded and clear") == (4.0, "grounded and clear")
    assert parse_verdict('{"score": 2, "reason": "wrong"}') == (2.0, "wrong")
    assert parse_verdict("评分：5\n理由：正确")[0] == 5.0
    assert parse_verdict("I think it's fine")[0] is None


def test_scripted_judge_threshold_summary_and_agreement_with_people():
    replies = {ROWS[0]["answer"]: "score: 5\nreason: good", ROWS[1]["answer"]: "score: 3\nreason: vague"}

    def ask(messages):
        return next(r for a, r in replies.items() if a in messages[-1]["content"])

    verdicts = judge_rows(ROWS, JudgeConfig(min_score=4), ask=ask)
    assert [v["accepted"] for v in verdicts] == [True, False, False, False]
    assert [v["stage"] for v in verdicts] == ["judge", "judge", "validator", "validator"]
    assert verdicts[1]["reason"] == "vague" and verdicts[1]["score"] == 3.0
    human = [True, True, False, False]
    # judge T F F F vs people T T F F: p_o 3/4, p_e (1*2 + 3*2)/16 = 1/2 -> kappa 0.5
    agree = judge_agreement(verdicts, human)
    assert agree == {"n": 4, "accuracy": 0.75, "kappa": 0.5, "precision": 1.0, "recall": 0.5}


class _Res:
    def __init__(self, rows):
        self.rows, self.extra, self.rejected = rows, {}, []


class _Ctx:
    def __init__(self):
        self.quarantined = []

    def reject(self, res, parent, reason, candidate):
        self.quarantined.append((parent["id"], reason, candidate))


def _row(k: int, q: str, a: str) -> dict:
    msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"id": f"s{k}", "messages": msgs, "derived_from": [f"p{k}"], "source": "src", "passage": PASSAGE}


def test_judge_through_the_projects_own_server_on_loopback(tmp_path, tiny_model_dir, monkeypatch):
    from domaintune.serve.server import BackgroundServer
    from domaintune.serve.state import build_state

    cfg = serve_config(tmp_path / "run", {"default_max_tokens": 8, "max_tokens_cap": 16})
    state = build_state(cfg)
    key = state.store.create_key("judge")[1]
    with BackgroundServer(state) as srv:
        jc = JudgeConfig(base_url=srv.url + "/v1", model="tiny-random-llama", max_tokens=8, concurrency=2)
        monkeypatch.setenv("DT_JUDGE_KEY", key)
        jc.api_key_env = "DT_JUDGE_KEY"
        res = _Res([_row(k, r["question"], r["answer"]) for k, r in enumerate(ROWS)])
        ctx = _Ctx()
        apply_judge(ctx, res, jc)
    summary = res.extra["judge"]
    # rows 2 and 3 never reach the judge; rows 0 and 1 do, over HTTP, and the random tiny model's reply has no
    # score, so they are rejected with that reason and its reply kept for review
    assert summary["rejected_by_validators"] == 2 and summary["rejected_by_judge"] == 2 and summary["accepted"] == 0
    assert res.rows == []
    by_id = {pid: (reason, cand) for pid, reason, cand in ctx.quarantined}
    assert by_id["p0"][0] == "judge: judge reply has no score" and by_id["p0"][1]["judge"]["raw"]
    assert by_id["p2"][0].startswith("validator: answer not grounded")
    assert by_id["p3"][1]["judge"]["stage"] == "validator"


def test_augment_config_takes_a_judge():
    from domaintune.data.augment.config import AugmentConfig

    cfg = AugmentConfig.model_validate({"judge": {"base_url": "http://127.0.0.1:1/v1", "model": "m", "min_score": 3}})
    assert cfg.judge is not None and cfg.judge.validators.min_grounding == 0.5
    with pytest.raises(ValueError):
        AugmentConfig.model_validate({"judge": {"min_score": 9}})
