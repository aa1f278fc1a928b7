"""data.augment operations through the real data stage (run_data) on small real files, tiny model."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from domaintune.config import config_from_dict
from domaintune.data.augment.config import SyntheticQAOp
from domaintune.data.augment.ops import eda, load_glossary, overlap, qa_check, split_passages
from domaintune.data.pipeline import run_data
from domaintune.errors import UserError
from domaintune.layout import RunLayout


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def read(run: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (run / "data" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]


def corpus(n: int = 60) -> list[dict]:
    return [
        {
            "q": f"How should patient group {i} take medicine number {i * 7 % 31} for condition {i % 5}?",
            "a": f"Patients in group {i} take {i % 4 + 1} tablets of medicine {i * 7 % 31} after meals; "
            f"condition {i % 5} needs a check every {i % 6 + 1} weeks and a blood test {i * 3}.",
            "dept": "cardiology" if i % 6 == 0 else "general",
        }
        for i in range(n)
    ]


def cfg_for(tmp: Path, augment: dict, split=(8, 1, 1), model="tiny-random-llama", **data):
    write_jsonl(tmp / "in.jsonl", corpus())
    section = {
        "sources": [
            {"name": "qa", "path": "in.jsonl", "fields": {"instruction": "q", "output": "a"}, "keep": ["dept"]}
        ],
        "split": {"ratios": list(split)},
        "filters": {"outlier_sigma": None},
        "augment": augment,
        **data,
    }
    return config_from_dict(
        {"name": "t", "seed": 3, "model": {"name_or_path": model}, "data": section}, config_path=tmp / "p.yaml"
    )


def test_records_to_dialogue_from_sql_with_templates_and_pii(tmp_path):
    db = tmp_path / "emr.db"
    con = sqlite3.connect(db)
    con.execute("create table dx (patient_id text, diagnosis text, phone text)")
    con.executemany(
        "insert into dx values (?, ?, ?)",
        [("P001", "T2DM", "13812345678"), ("P002", "hypertension", ""), ("P003", None, "")],
    )
    con.commit()
    con.close()
    aug = {
        "ops": [
            {
                "op": "records_to_dialogue",
                "source": {
                    "name": "emr",
                    "reader": "sql",
                    "url": f"sqlite:///{db}",
                    "query": "select * from dx order by patient_id",
                },
                "instruction": "What is the diagnosis of patient {{ patient_id }}?{% if phone %} Call {{ phone }}.{% endif %}",
                "output": "Patient {{ patient_id }} has {{ diagnosis | default('no diagnosis on record', true) }}.",
            }
        ]
    }
    report = run_data(cfg_for(tmp_path, aug), RunLayout(tmp_path / "run"), progress=False)
    train = read(tmp_path / "run", "train")
    syn = [r for r in train if r.get("origin") == "synthetic/records_to_dialogue"]
    assert [r["messages"][0]["content"] for r in syn] == [
        "What is the diagnosis of patient P001? Call [PHONE].",
        "What is the diagnosis of patient P002?",
        "What is the diagnosis of patient P003?",
    ]
    assert syn[0]["messages"][1]["content"] == "Patient P001 has T2DM."
    assert syn[2]["messages"][1]["content"] == "Patient P003 has no diagnosis on record."
    assert syn[0]["derived_from"] == ["emr-000001"] and syn[0]["source"] == "emr"
    op = report["augment"]["ops"][0]
    assert op["created"] == 3 and op["from_rows"] == 3 and op["source_ids"][:2] == ["emr-000001", "emr-000002"]
    assert op["pii_redacted"] == {"phone": 1}
    # the real rows are unchanged and balance as before
    assert report["balanced"] and report["split"]["sizes"]["train"] == len(train) - 3
    assert "Augmentation" in (tmp_path / "run" / "data" / "report.html").read_text(encoding="utf-8")


def test_records_template_errors(tmp_path):
    (tmp_path / "recs.csv").write_text("patient_id,diagnosis\nP1,flu\n", encoding="utf-8")
    with pytest.raises(Exception, match="Jinja syntax error"):
        cfg_for(
            tmp_path,
            {
                "ops": [
                    {
                        "op": "records_to_dialogue",
                        "source": {"path": "recs.csv"},
                        "instruction": "{{ patient_id ",
                        "output": "x",
                    }
                ]
            },
        )
    # an undefined column: that record is quarantined with the reason, the run goes on
    aug = {
        "ops": [
            {
                "op": "records_to_dialogue",
                "source": {"path": "recs.csv"},
                "instruction": "Patient {{ patient_id }}?",
                "output": "{{ diagnosis }} {{ allergy }}",
            }
        ]
    }
    report = run_data(cfg_for(tmp_path, aug), RunLayout(tmp_path / "run"), progress=False)
    assert report["augment"]["ops"][0]["created"] == 0 and report["augment"]["quarantined"] == 1
    q = [json.loads(x) for x in (tmp_path / "run/data/quarantine.jsonl").read_text().splitlines()]
    assert q[-1]["stage"] == "augment/records_to_dialogue" and "'allergy' is undefined" in q[-1]["reason"]


def test_lexical_eda_with_glossary_english_and_chinese(tmp_path):
    rng = __import__("random").Random(0)
    gl = load_glossary({"tablets": ["pills"], "心悸": ["心慌"]})
    assert gl["pills"] == ["tablets"] and gl["心慌"] == ["心悸"]
    toks = ["take", "two", "tablets", "daily"]
    assert eda(toks, "synonym", 0.1, rng, gl) == ["take", "two", "pills", "daily"]
    swapped = eda(toks, "swap", 0.25, rng, gl)
    assert sorted(swapped) == sorted(toks) and swapped != toks
    deleted = eda(toks, "delete", 0.25, rng, gl)
    assert 1 <= len(deleted) < len(toks) and all(t in toks for t in deleted)
    (tmp_path / "gl.json").write_text(json.dumps({"medicine": ["drug"], "patient": ["person"]}), encoding="utf-8")
    aug = {"ops": [{"op": "lexical", "glossary": "gl.json", "n": 3, "rate": 0.1, "max_rows": 10}]}
    report = run_data(cfg_for(tmp_path, aug), RunLayout(tmp_path / "run"), progress=False)
    syn = [r for r in read(tmp_path / "run", "train") if r.get("origin") == "synthetic/lexical"]
    op = report["augment"]["ops"][0]
    assert op["created"] == len(syn) == 30 and op["from_rows"] == 10
    assert [r["eda"] for r in syn[:3]] == ["synonym", "swap", "delete"]
    assert "drug" in syn[0]["messages"][0]["content"] or "person" in syn[0]["messages"][0]["content"]
    # Chinese: jieba segmentation, glossary words kept whole
    from domaintune.data.augment.ops import _segment

    assert "心悸" in _segment("最近经常心悸怎么办", True, gl)
    with pytest.raises(UserError, match="not found"):
        load_glossary(tmp_path / "missing.json")


def test_balance_oversamples_rare_stratum_to_target(tmp_path):
    aug = {"ops": [{"op": "balance", "field": "dept", "target_share": 0.4}]}
    report = run_data(cfg_for(tmp_path, aug), RunLayout(tmp_path / "run"), progress=False)
    train = read(tmp_path / "run", "train")
    share = sum(r["dept"] == "cardiology" for r in train) / len(train)
    op = report["augment"]["ops"][0]
    assert op["shares_before"]["cardiology"] < 0.25 and 0.4 <= share < 0.45
    assert op["shares_after"]["cardiology"] == round(share, 4)
    syn = [r for r in train if r.get("origin") == "synthetic/balance"]
    real = {r["id"]: r for r in train if "origin" not in r}
    assert syn and all(real[s["derived_from"][0]]["messages"] == s["messages"] for s in syn)


def test_synthetic_rows_never_in_val_or_test(tmp_path):
    aug = {
        "ops": [
            {"op": "lexical", "methods": ["swap", "delete"], "n": 2},
            {"op": "balance", "field": "dept", "target_share": 0.3},
        ]
    }
    report = run_data(cfg_for(tmp_path, aug, split=(4, 3, 3)), RunLayout(tmp_path / "run"), progress=False)
    run = tmp_path / "run"
    val, test, train = read(run, "val"), read(run, "test"), read(run, "train")
    held = {r["id"] for r in val + test}
    assert val and test and not any("origin" in r for r in val + test)
    syn = [r for r in train if "origin" in r]
    assert len(syn) == report["augment"]["created"] > 0
    assert not held & {p for r in syn for p in r["derived_from"]}  # built only from train rows
    assert report["split"]["sizes"] == {"train": len(train) - len(syn), "val": len(val), "test": len(test)}


def test_qa_checks_and_passages():
    op = SyntheticQAOp(op="synthetic_qa", min_overlap=0.6)
    passage = "Metformin lowers blood glucose in type 2 diabetes. It is taken with meals to reduce stomach upset."
    assert (
        qa_check(op, "What does metformin do?", "Metformin lowers blood glucose in type 2 diabetes.", passage) is None
    )
    assert "not grounded" in qa_check(
        op, "What does metformin do?", "It cures cancer and heals broken bones fast.", passage
    )
    assert "stand alone" in qa_check(op, "What is the passage about?", "Metformin lowers blood glucose.", passage)
    assert "stand alone" in qa_check(
        op, "这段文字主要讲了哪些内容呢？", "二甲双胍可以降低血糖水平。", "二甲双胍可以降低血糖水平。"
    )
    assert "question length" in qa_check(op, "Why?", "Metformin lowers blood glucose.", passage)
    assert "PII" in qa_check(
        op,
        "Who to call about metformin?",
        "Call 13812345678 about metformin blood glucose.",
        passage + " Call 13812345678.",
    )
    assert overlap("二甲双胍降低血糖", "二甲双胍可以降低血糖水平") == 1.0
    text = ("Sentence one is here and fairly long. " * 10 + "\n\n" + "Second paragraph sentence. " * 20).strip()
    parts = split_passages(text, 200, 50)
    assert parts and all(50 <= len(p) <= 200 for p in parts)
    assert "".join(parts).replace(" ", "").replace("\n", "") == text.replace(" ", "").replace("\n", "")


def test_synthetic_rows_are_decontaminated_against_val_and_test(tmp_path):
    # records that render every corpus question again: those of val/test rows must not reach train
    lines = ["i,m,c"] + [f"{i},{i * 7 % 31},{i % 5}" for i in range(60)]
    (tmp_path / "recs.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    aug = {
        "ops": [
            {
                "op": "records_to_dialogue",
                "source": {"path": "recs.csv"},
                "instruction": "How should patient group {{ i }} take medicine number {{ m }} for condition {{ c }}?",
                "output": "Ask your doctor about medicine {{ m }}.",
            }
        ]
    }
    report = run_data(cfg_for(tmp_path, aug, decontaminate={"ngram": 8}), RunLayout(tmp_path / "run"), progress=False)
    run = tmp_path / "run"
    held = {r["messages"][0]["content"] for r in read(run, "val") + read(run, "test")}
    syn = [r for r in read(run, "train") if r.get("origin")]
    aug_rep = report["augment"]
    assert held and aug_rep["decontaminated"] == {"synthetic/records_to_dialogue": len(held)}
    assert aug_rep["written"] == len(syn) == 60 - len(held)
    assert not held & {r["messages"][0]["content"] for r in syn}
    q = [json.loads(x) for x in (run / "data/quarantine.jsonl").read_text().splitlines()]
    assert sum(e["stage"] == "augment/decontaminate" for e in q) == len(held)
