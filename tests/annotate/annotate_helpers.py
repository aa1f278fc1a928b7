"""Small annotation projects built in code for the annotate tests."""

from __future__ import annotations

from pathlib import Path

from domaintune.annotate.config import task_from_dict
from domaintune.annotate.project import Project, create_project

REPO = Path(__file__).resolve().parents[2]
INTENTS = ["cardio", "digestive", "respiratory"]


def items(n: int = 8) -> list[dict]:
    texts = [
        ("高血压能吃党参吗", "可以适量吃。"),
        ("胃痛怎么办", "规律饮食，必要时就医。"),
        ("咳嗽两周不好", "建议拍胸片。"),
        ("心慌胸闷是怎么回事", "需要做心电图。"),
        ("反酸烧心吃什么药", "可用抑酸药。"),
        ("哮喘能运动吗", "在控制良好时可以。"),
        ("血压160需要吃药吗", "需要，遵医嘱。"),
        ("拉肚子三天", "注意补液。"),
    ]
    return [
        {"id": f"r{k}", "fields": {"instruction": q, "output": a, "department": "内科"}, "origin": {}}
        for k, (q, a) in enumerate(texts[:n])
    ]


def task(**over) -> object:
    data = {
        "name": "demo",
        "sample": {"source": "x"},
        "schema": [
            {"name": "intent", "kind": "single", "labels": INTENTS},
            {"name": "topics", "kind": "multi", "labels": ["drug", "diet", "test"], "required": False},
            {"name": "entities", "kind": "spans", "labels": ["DISEASE", "SYMPTOM"], "field": "instruction"},
            {"name": "icd", "kind": "term", "codes": str(REPO / "examples/data/icd10-sample.tsv"), "required": False},
            {"name": "fixed_answer", "kind": "text", "field": "output", "required": False},
        ],
        "annotators": ["ann_a", "ann_b"],
        "arbitration": {"mode": "expert", "experts": ["dr_wang"]},
        "output_field": "fixed_answer",
    }
    data.update(over)
    return task_from_dict(data, REPO)


def make_project(folder: Path, n: int = 8, **over) -> Project:
    return create_project(folder, task(**over), items(n), {"test": True})
