"""Text the stage leaves as it was: Chinese punctuation (rows and system prompt alike), toll-free numbers
redacted whole; and a report that reads cleanly (rounded numbers, no negative bounds, no `..` in paths)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from domaintune.config import config_from_dict
from domaintune.data.pii import redact_pii
from domaintune.data.pipeline import run_data
from domaintune.layout import RunLayout

ROWS = [
    {"q": "医生，我头疼；怎么办？", "a": "建议：多休息，注意饮水。如不缓解（超过三天），请就医。"},
    {"q": "ＡＢＣ１２３ 是什么检查？", "a": "这是常规检查，无需空腹。"},
]
SYSTEM = "你是一名医生，请用简洁的中文回答：不要编造。"


def run(tmp: Path, name: str, **normalise) -> list[dict]:
    (tmp / "in.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    data = {
        "sources": [{"path": "in.jsonl", "fields": {"instruction": "q", "output": "a"}}],
        "split": {"ratios": [1, 0, 0]},
        "filters": {"outlier_sigma": None},
        "normalise": normalise,
        "system_prompt": SYSTEM,
    }
    cfg = config_from_dict({"name": "t", "data": data}, config_path=tmp / "p.yaml")
    run_data(cfg, RunLayout(tmp / name), progress=False)
    path = tmp / name / "data" / "train.jsonl"
    return [json.loads(line)["messages"] for line in path.read_text(encoding="utf-8").splitlines()]


def test_chinese_punctuation_is_kept_and_the_system_prompt_follows_the_same_rule(tmp_path):
    kept = run(tmp_path, "default")
    assert [m["content"] for m in kept[0]] == [SYSTEM, ROWS[0]["q"], ROWS[0]["a"]]
    assert kept[1][1]["content"] == "ABC123 是什么检查？"  # letters and digits are width-folded, ？ is not
    folded = run(tmp_path, "nfkc", nfkc=True)  # the old behaviour, asked for: rows and system prompt alike
    assert [m["content"] for m in folded[0]] == [
        "你是一名医生,请用简洁的中文回答:不要编造。",
        "医生,我头疼;怎么办?",
        "建议:多休息,注意饮水。如不缓解(超过三天),请就医。",
    ]


@pytest.mark.parametrize(
    "text",
    ["call 1-800-232-4636 now", "1-800-CDC-INFO", "1 (888) 555-0199", "+1-877-555-0199", "1-866-FLOWERS today"],
)
def test_north_american_toll_free_numbers_are_redacted_whole(text):
    redacted, counts = redact_pii(text)
    assert counts == {"phone": 1} and "[PHONE]" in redacted and "1-[PHONE]" not in redacted
    assert not any(ch.isdigit() for ch in redacted.replace("[PHONE]", ""))


def test_report_reads_cleanly(tmp_path):
    rows = [
        {"q": f"question {i} here?", "a": "word " * (1 + i % 7) + ("long " * 400 if i == 0 else "")} for i in range(40)
    ]
    (tmp_path / "in.json").write_text(json.dumps(rows), encoding="utf-8")
    (tmp_path / "proj").mkdir()
    data = {
        "sources": [{"path": "../in.json", "fields": {"instruction": "q", "output": "a"}}],
        "filters": {"outlier_sigma": 1.0, "max_repetition": None},
        "guards": {"max_removed": 1.0},
    }
    cfg = config_from_dict({"name": "t", "data": data}, config_path=tmp_path / "proj" / "p.yaml")
    report = run_data(cfg, RunLayout(tmp_path / "proj" / ".." / "run"), progress=False)
    assert report["outliers"]["low"] == 0.0  # mean - k·σ < 0: no negative bound
    for summary in report["lengths"].values():
        assert all(round(v, 1) == v for k, v in summary.items() if k in ("p5", "median", "p95"))
    assert ".." not in report["output_dir"]
    quarantine = (tmp_path / "run" / "data" / "quarantine.jsonl").read_text(encoding="utf-8")
    outlier = next(json.loads(x) for x in quarantine.splitlines() if '"outlier"' in x)
    assert outlier["loc"] == "record 1" and ".." not in outlier["file"]  # JSON records count from 1, like XML
    html = (tmp_path / "run" / "data" / "report.html").read_text(encoding="utf-8")
    assert "before the data.sample caps" not in html and "{&#39;" not in html and "{'" not in html
    assert "<th>easy</th>" in html and "Leakage" in html and "All checks passed" in html
