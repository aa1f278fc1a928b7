"""Each reader on a real file written in a temp folder, through the whole data stage."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from domaintune.config import config_from_dict
from domaintune.data.pipeline import run_data
from domaintune.data.readers import detect_encoding, iter_source
from domaintune.errors import UserError
from domaintune.layout import RunLayout


def make_cfg(tmp: Path, sources: list[dict], **data) -> object:
    base = {
        "dedup": {"near": False, "exact": False},
        "filters": {"outlier_sigma": None, "max_repetition": None},
        "decontaminate": {"enabled": False},
        "split": {"ratios": [1, 0, 0]},
    }
    base.update(data)
    base["sources"] = sources
    return config_from_dict({"name": "t", "data": base}, config_path=tmp / "project.yaml")


def run(tmp: Path, sources: list[dict], **data) -> tuple[dict, list[dict]]:
    cfg = make_cfg(tmp, sources, **data)
    report = run_data(cfg, RunLayout(tmp / "run"), progress=False)
    rows = [json.loads(line) for line in (tmp / "run" / "data" / "train.jsonl").read_text().splitlines()]
    return report, rows


def user_texts(rows):
    return [next(m["content"] for m in r["messages"] if m["role"] == "user") for r in rows]


def test_csv_gb18030_detected_and_mapped(tmp_path):
    text = "department,title,ask,answer\n心血管科,高血压能吃党参吗？,我有高血压。,可以适量食用。\n消化科,胃痛怎么办,最近胃痛。,建议就医检查。\n"
    (tmp_path / "zh.csv").write_bytes(text.encode("gb18030"))
    assert detect_encoding(tmp_path / "zh.csv") == "gb18030"
    src = {"path": "zh.csv", "fields": {"instruction": ["title", "ask"], "output": "answer"}, "keep": ["department"]}
    report, rows = run(tmp_path, [src])
    assert report["balanced"] and len(rows) == 2
    assert rows[0]["messages"][0] == {"role": "user", "content": "高血压能吃党参吗？\n我有高血压。"}  # ？ kept
    assert rows[0]["messages"][1]["content"] == "可以适量食用。"
    assert rows[0]["department"] == "心血管科" and rows[0]["source"] == "zh"


def test_tsv_and_excel(tmp_path):
    (tmp_path / "a.tsv").write_text("q\ta\nWhat is BP?\tBlood pressure.\n", encoding="utf-8")
    import openpyxl

    wb = openpyxl.Workbook()
    ws = wb.active
    ws.title = "qa"
    ws.append(["question", "answer", "topic"])
    ws.append(["What is insulin?", "A hormone.", "endo"])
    ws.append([None, None, None])  # blank row: not a record
    ws.append(["What is a statin?", "A cholesterol drug.", "cardio"])
    wb.save(tmp_path / "b.xlsx")
    report, rows = run(
        tmp_path,
        [
            {"path": "a.tsv", "fields": {"instruction": "q", "output": "a"}},
            {
                "path": "b.xlsx",
                "sheet": "qa",
                "fields": {"instruction": "question", "output": "answer"},
                "keep": ["topic"],
            },
        ],
    )
    assert report["sources"]["a"]["input"] == 1 and report["sources"]["b"]["input"] == 2
    assert user_texts(rows) == ["What is BP?", "What is insulin?", "What is a statin?"]
    assert rows[2]["topic"] == "cardio"


def test_json_jsonl_parquet(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"data": {"items": [{"q": "Q1", "a": "A1"}, {"q": "Q2", "a": "A2"}]}}))
    (tmp_path / "b.jsonl").write_text('{"q": "Q3", "a": "A3"}\n\n{"q": "Q4", "a": "A4"}\n')
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"q": ["Q5", "Q6"], "a": ["A5", "A6"]}), tmp_path / "c.parquet")
    fields = {"instruction": "q", "output": "a"}
    report, rows = run(
        tmp_path,
        [
            {"path": "a.json", "json_records": "data.items", "fields": fields},
            {"path": "b.jsonl", "fields": fields},
            {"path": "c.parquet", "fields": fields},
        ],
    )
    assert user_texts(rows) == ["Q1", "Q2", "Q3", "Q4", "Q5", "Q6"]
    assert report["totals"]["input"] == 6 and report["balanced"]


MEDQUAD_LIKE = """<?xml version="1.0" encoding="UTF-8"?>
<Document id="1" source="X"><Focus>Asthma</Focus>
<QAPairs>
  <QAPair pid="1"><Question qid="1-1" qtype="information">What is asthma ?</Question>
    <Answer>Asthma is a lung disease &amp; it narrows airways.</Answer></QAPair>
  <QAPair pid="2"><Question qid="1-2" qtype="treatment">How to treat asthma ?</Question><Answer></Answer></QAPair>
</QAPairs></Document>
"""


def test_xml_record_path_attributes_and_ancestors(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "1.xml").write_text(MEDQUAD_LIKE)
    (tmp_path / "x" / "2.xml").write_text("<Document><QAPairs><QAPair>")  # broken file: quarantined
    src = {
        "path": "x",
        "glob": "*.xml",
        "reader": "xml",
        "record_path": ".//QAPair",
        "fields": {"instruction": "Question", "output": "Answer"},
        "keep": {"focus": "../../Focus", "qtype": "Question/@qtype"},
    }
    report, rows = run(tmp_path, [src])
    assert len(rows) == 1
    assert rows[0]["focus"] == "Asthma" and rows[0]["qtype"] == "information"
    assert rows[0]["messages"][1]["content"] == "Asthma is a lung disease & it narrows airways."
    s = report["sources"]["x"]
    assert s["input"] == 3 and s["balanced"]
    assert s["dropped"]["filter: empty:output"] == 1
    assert s["dropped"]["parse: invalid XML in this record"] == 1


def test_pdf_and_docx_as_text_records(tmp_path):
    import docx
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["pdf.fonttype"] = 42
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages

    with PdfPages(tmp_path / "guide.pdf") as pdf:
        for text in ("Hypertension guide page one", "Second page about diabetes care"):
            fig = plt.figure()
            fig.text(0.1, 0.5, text)
            pdf.savefig(fig)
            plt.close(fig)
    d = docx.Document()
    d.add_paragraph("Clinic policy: wash hands.")
    d.add_paragraph("Call 13812345678 for help.")
    d.save(tmp_path / "policy.docx")
    report, rows = run(tmp_path, [{"path": "guide.pdf", "pages": "page"}, {"path": "policy.docx"}])
    texts = [r["text"] for r in rows]
    assert texts[:2] == ["Hypertension guide page one", "Second page about diabetes care"]
    assert texts[2] == "Clinic policy: wash hands.\nCall [PHONE] for help."
    assert report["pii"]["counts"] == {"phone": 1}


def test_sql_on_a_real_sqlite_file(tmp_path):
    db = tmp_path / "qa.db"
    con = sqlite3.connect(db)
    con.execute("create table qa (id integer, question text, answer text, created text)")
    con.executemany(
        "insert into qa values (?, ?, ?, ?)",
        [
            (1, "What is fever?", "High body temperature.", "2024-01-01"),
            (2, "What is a cold?", "A viral infection.", "2024-02-01"),
            (3, "Ignored?", "no", "2024-03-01"),
        ],
    )
    con.commit()
    con.close()
    src = {
        "reader": "sql",
        "name": "db",
        "url": "sqlite:///qa.db",
        "query": "select question, answer, created from qa where id < 3 order by id",
        "fields": {"instruction": "question", "output": "answer"},
        "keep": ["created"],
    }
    _, rows = run(tmp_path, [src])
    assert user_texts(rows) == ["What is fever?", "What is a cold?"]
    assert rows[1]["created"] == "2024-02-01"
    bad = make_cfg(tmp_path, [{**src, "query": "select nope from qa"}])
    with pytest.raises(UserError, match="query failed"):
        run_data(bad, RunLayout(tmp_path / "bad"), progress=False)


def test_alpaca_sharegpt_messages_and_dataset_info(tmp_path):
    (tmp_path / "alpaca.json").write_text(
        json.dumps(
            [
                {"instruction": "Translate", "input": "hola", "output": "hello", "history": [["hi", "hello!"]]},
                {"instruction": "Say hi", "input": "", "output": "hi"},
            ]
        )
    )
    (tmp_path / "share.jsonl").write_text(
        json.dumps(
            {
                "conversations": [
                    {"from": "system", "value": "Be brief."},
                    {"from": "human", "value": "2+2?"},
                    {"from": "gpt", "value": "4"},
                ]
            }
        )
        + "\n"
    )
    (tmp_path / "chat.jsonl").write_text(
        json.dumps(
            {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]}
        )
        + "\n"
    )
    (tmp_path / "lf").mkdir()
    (tmp_path / "lf" / "d1.json").write_text(json.dumps([{"q": "LF question", "a": "LF answer"}]))
    (tmp_path / "lf" / "d2.json").write_text(
        json.dumps([{"chat": [{"role": "user", "text": "u1"}, {"role": "bot", "text": "b1"}]}])
    )
    (tmp_path / "lf" / "dataset_info.json").write_text(
        json.dumps(
            {
                "d1": {"file_name": "d1.json", "columns": {"prompt": "q", "response": "a"}},
                "d2": {
                    "file_name": "d2.json",
                    "formatting": "sharegpt",
                    "columns": {"messages": "chat"},
                    "tags": {"role_tag": "role", "content_tag": "text", "user_tag": "user", "assistant_tag": "bot"},
                },
            }
        )
    )
    report, rows = run(
        tmp_path,
        [
            {"path": "alpaca.json", "reader": "alpaca"},
            {"path": "share.jsonl", "reader": "sharegpt"},
            {"path": "chat.jsonl", "reader": "messages"},
            {"path": "lf", "name": "lf"},  # a folder holding dataset_info.json
        ],
    )
    assert report["balanced"] and len(rows) == 6
    assert [m["content"] for m in rows[0]["messages"]] == ["hi", "hello!", "Translate\n\nhola", "hello"]
    assert rows[2]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert rows[3]["messages"][1]["content"] == "Paris"
    assert rows[4]["messages"] == [
        {"role": "user", "content": "LF question"},
        {"role": "assistant", "content": "LF answer"},
    ]
    assert rows[5]["messages"] == [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "b1"}]


def test_iter_source_reports_location(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"q": 1}\n{"q": 2}\n')
    cfg = make_cfg(tmp_path, [{"path": "a.jsonl", "fields": {"instruction": "q", "output": "q"}}])
    recs = list(iter_source(cfg.data.sources[0], 0, tmp_path))
    assert [r.loc for r in recs] == ["line 1", "line 2"] and recs[0].file.endswith("a.jsonl")
