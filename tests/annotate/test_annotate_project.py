"""Projects end to end in code and through the CLI: blind assignment, forms, Label Studio round trip,
arbitration (expert and majority), the gate, finalize, and `reader: annotations` through the data stage."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from annotate_helpers import INTENTS, REPO, make_project
from typer.testing import CliRunner

from domaintune.annotate.forms import arbitration_form, label_form
from domaintune.annotate.labelstudio import export_tasks, import_export, labeling_config
from domaintune.annotate.project import Project
from domaintune.errors import UserError

FIXTURE = Path(__file__).parent / "fixtures" / "labelstudio_export.json"


def _label_all(p: Project, flip: set[str]) -> None:
    """ann_a and ann_b label every item; on `flip` items ann_b picks another intent."""
    for who in ("ann_a", "ann_b"):
        entries = []
        for k, item in enumerate(p.items_of(who)):
            intent = INTENTS[k % 3]
            if who == "ann_b" and item["id"] in flip:
                intent = INTENTS[(k + 1) % 3]
            entries.append({"item": item["id"], "labels": {"intent": intent, "entities": [[0, 2, "DISEASE"]]}})
        p.add_labels(who, entries, via="test")


def test_blind_assignment_forms_and_validation(tmp_path):
    p = make_project(tmp_path / "p", annotators=["ann_a", "ann_b", "ann_c"])
    loads = {a: len(p.items_of(a)) for a in ("ann_a", "ann_b", "ann_c")}
    assert sum(loads.values()) == 16 and max(loads.values()) - min(loads.values()) <= 1
    assert all(len(set(who)) == 2 for who in p.assignments.values())
    other = next(i for i, who in p.assignments.items() if "ann_c" not in who)
    with pytest.raises(UserError, match="not assigned"):
        p.add_labels("ann_c", [{"item": other, "labels": {"intent": "cardio"}}], via="test")
    mine = p.items_of("ann_a")[0]["id"]
    with pytest.raises(UserError, match="not one of"):
        p.add_labels("ann_a", [{"item": mine, "labels": {"intent": "nope"}}], via="test")
    with pytest.raises(UserError, match="code list"):
        p.add_labels("ann_a", [{"item": mine, "labels": {"icd": "Z99"}}], via="test")
    partner = next(a for a in p.assignments[mine] if a != "ann_a")
    before = label_form(p, partner)
    p.add_labels("ann_a", [{"item": mine, "labels": {"intent": "cardio", "icd": "I10"}}], via="test")
    form = label_form(p, partner)
    assert mine in form and "I10" in form  # the code list is offered ...
    assert form == before and " checked" not in form  # ... but ann_a's label never reaches the partner's form
    assert form.count('class="item"') == len(p.items_of(partner))


def test_arbitration_expert_gate_and_finalize(tmp_path):
    p = make_project(tmp_path / "p")
    _label_all(p, flip={"r1", "r5"})
    ag = p.agreement()
    assert ag["fields"]["intent"]["method"] == "cohen" and ag["fields"]["entities"]["kappa"] == 1.0
    assert ag["fields"]["intent"]["observed"] == 0.75
    assert [q["item"] for q in p.queue()] == ["r1", "r5"]
    assert p.queue()[0]["values"]["intent"] == {"ann_a": "digestive", "ann_b": "respiratory"}
    with pytest.raises(UserError, match="not an expert"):
        p.decide("ann_a", [{"item": "r1", "field": "intent", "value": "digestive"}])
    assert "r5" in arbitration_form(p, "dr_wang")
    p.decide("dr_wang", [{"item": "r1", "field": "intent", "value": "respiratory"}], note="cough")
    p.decide("dr_wang", [{"item": "r1", "field": "intent", "value": "digestive"}], note="changed my mind")
    with pytest.raises(UserError, match="gate failed"):
        p.finalize()
    summary = p.finalize(force=True)
    assert summary == {"rows": 7, "pending": 1, "unlabelled": 0, "gate_passed": False}
    rows = {json.loads(line)["id"]: json.loads(line) for line in (p.folder / "annotations.jsonl").open()}
    assert rows["r1"]["intent"] == "digestive"  # the expert's last decision stands ...
    assert rows["r1"]["annotation"]["decided"] == {"intent": {"by": ["dr_wang"], "mode": "expert"}}
    assert len(p.decisions()) == 2  # ... and both decisions are kept with who made them
    assert rows["r0"]["entities"] == [[0, 2, "DISEASE"]] and "r5" not in rows


def test_majority_arbitration(tmp_path):
    arb = {"mode": "majority", "experts": ["e1", "e2", "e3"], "min_votes": 2}
    p = make_project(tmp_path / "p", arbitration=arb, min_kappa=0.0)
    _label_all(p, flip={"r2"})
    p.decide("e1", [{"item": "r2", "field": "intent", "value": "cardio"}])
    p.decide("e2", [{"item": "r2", "field": "intent", "value": "respiratory"}])
    assert p.queue() and p.resolve()["r2"]["pending"] == ["intent"]  # 1:1, no majority yet
    p.decide("e3", [{"item": "r2", "field": "intent", "value": "respiratory"}])
    verdict = p.resolve()["r2"]["decided"]["intent"]
    assert verdict["value"] == "respiratory" and verdict["by"] == ["e2", "e3"] and verdict["mode"] == "majority"
    assert p.finalize()["pending"] == 0


def test_labelstudio_round_trip_of_the_real_export_format(tmp_path):
    p = make_project(tmp_path / "p")
    xml = labeling_config(p)
    root = ET.fromstring(xml)  # well-formed, with a control per schema field bound to a <Text>
    texts = {t.get("name") for t in root.iter("Text")}
    controls = {c.get("name"): c for c in root if c.tag in ("Choices", "Labels", "TextArea")}
    assert set(controls) == {"intent", "topics", "entities", "icd", "fixed_answer"}
    assert all(c.get("toName") in texts for c in controls.values())
    assert controls["topics"].get("choice") == "multiple" and controls["icd"].find("Choice").get("alias") == "I10"
    tasks = export_tasks(p, "ann_a")
    assert tasks[0]["data"]["item_id"] == "r0" and set(tasks[0]) == {"data"}  # import format, no labels
    with pytest.raises(UserError, match="not mapped"):
        import_export(p, FIXTURE)
    counts = import_export(p, FIXTURE, users={"7": "ann_a", "8": "ann_b"})
    assert counts == {"ann_a": 2, "ann_b": 2}  # the cancelled annotation is skipped
    labels = p.labels()
    assert labels["r0"]["ann_a"] == {
        "intent": "cardio",
        "entities": [[0, 3, "DISEASE"]],
        "icd": "I10",
        "topics": ["diet", "drug"],
    }
    assert labels["r0"]["ann_b"]["fixed_answer"] == "可以适量吃，但需监测血压。"
    assert labels["r1"] == {"ann_a": {"intent": "digestive"}, "ann_b": {"intent": "cardio"}}


def test_cli_and_reader_annotations_through_the_data_stage(tmp_path):
    from domaintune.cli import app
    from domaintune.config import config_from_dict
    from domaintune.data.pipeline import run_data

    src = tmp_path / "qa.jsonl"
    src.write_text(
        "".join(
            json.dumps(
                {"q": f"问题{k}：胸口{k}天疼怎么办", "a": f"回答{k}：请就医检查心电图。", "dept": INTENTS[k % 3]},
                ensure_ascii=False,
            )
            + "\n"
            for k in range(12)
        ),
        encoding="utf-8",
    )
    project_yaml = tmp_path / "project.yaml"
    project_yaml.write_text(
        "name: t\ndata:\n  sources:\n    - {name: qa, path: qa.jsonl, fields: {instruction: q, output: a}, keep: [dept]}\n",
        encoding="utf-8",
    )
    task_yaml = tmp_path / "task.yaml"
    task_yaml.write_text(
        "name: dept\nsample: {source: qa, n: 10, seed: 1}\nannotators: [ann_a, ann_b]\nmin_kappa: 0.5\n"
        f"arbitration: {{experts: [dr_wang]}}\nschema:\n  - {{name: intent, kind: single, labels: {json.dumps(INTENTS)}}}\n",
        encoding="utf-8",
    )
    runner = CliRunner()
    folder = tmp_path / "proj"
    res = runner.invoke(app, ["annotate", "create", str(project_yaml), "--task", str(task_yaml), "--out", str(folder)])
    assert res.exit_code == 0, res.output
    p = Project(folder)
    assert len(p.items) == 10 and next(iter(p.items.values()))["fields"]["dept"] in INTENTS
    assert runner.invoke(app, ["annotate", "export", str(folder)]).exit_code == 0
    assert (folder / "forms" / "label-ann_a.html").is_file() and (folder / "forms" / "arbitrate-dr_wang.html").is_file()
    for who in ("ann_a", "ann_b"):
        entries = [{"item": i, "labels": {"intent": it["fields"]["dept"]}} for i, it in p.items.items()]
        if who == "ann_b":
            entries[0]["labels"]["intent"] = next(x for x in INTENTS if x != entries[0]["labels"]["intent"])
        doc = tmp_path / f"{who}.json"
        doc.write_text(
            json.dumps({"project": "dept", "mode": "label", "annotator": who, "labels": entries}), encoding="utf-8"
        )
        assert runner.invoke(app, ["annotate", "import", str(folder), str(doc)]).exit_code == 0
    res = runner.invoke(app, ["annotate", "status", str(folder)], env={"COLUMNS": "40"})
    assert "queue 1" in res.output and "gate >= 0.5: passed" in res.output, res.output
    first = entries[0]["item"]
    res = runner.invoke(
        app,
        [
            "annotate",
            "decide",
            str(folder),
            "--by",
            "dr_wang",
            "--item",
            first,
            "--field",
            "intent",
            "--value",
            p.items[first]["fields"]["dept"],
        ],
    )
    assert "queue now 0" in res.output, res.output
    assert "10 rows" in runner.invoke(app, ["annotate", "finalize", str(folder)]).output
    cfg = config_from_dict(
        {
            "name": "t",
            "output_dir": str(tmp_path / "run"),
            "data": {
                "sources": [{"name": "labelled", "path": str(folder), "reader": "annotations", "keep": ["intent"]}],
                "split": {"ratios": [8, 1, 1]},
                "guards": {"on_violation": "warn"},
            },
        },
        config_path=REPO / "x.yaml",
    )
    report = run_data(cfg, cfg.layout, progress=False)
    rows = [json.loads(line) for s in ("train", "val", "test") for line in cfg.layout.split_file(s).open()]
    assert report["sources"]["labelled"]["input"] == 10 and rows
    assert all(r["intent"] in INTENTS and r["messages"][-1]["role"] == "assistant" for r in rows)
