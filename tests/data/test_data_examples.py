"""The shipped examples on the real shared data (skipped when ../shared/datasets is absent)."""

from __future__ import annotations

import json

from conftest import REPO_ROOT
from domaintune.config import load_config
from domaintune.data.pipeline import run_data
from domaintune.layout import RunLayout

EXAMPLES = REPO_ROOT / "examples"


def test_medical_zh_example(shared_datasets, tmp_path):
    cfg = load_config(EXAMPLES / "medical-zh.yaml", output_dir=tmp_path)
    cfg.data.sources[0].path = shared_datasets / "zh_medical_dialogue" / "internal_medicine_sample.csv"
    cfg.data.general.path = shared_datasets / "general_seed_tasks" / "seed_tasks.jsonl"
    report = run_data(cfg, RunLayout(tmp_path), progress=False)
    src = report["sources"]["zh_medical_dialogue"]
    assert src["input"] == 7644 and src["balanced"]
    # split 7:1:2 so that 200 test rows remain after the holdout departments are taken out; train keeps every row
    kept = {"train": 1033, "val": 146, "test": 200, "holdout": 367, "holdout_dev": 32}
    assert src["kept"] == kept
    assert [(p["exact"], p["near"]) for p in report["leakage"]["pairs"]] == [(0, 0)] * 10  # holdout and dev included
    assert report["normalise"]["rows_changed"] < 100  # Chinese punctuation is kept: few rows change
    assert src["dropped"]["dedup_exact: exact duplicate"] > 0
    assert src["dropped"]["dedup_near: near duplicate"] > 0  # CJK char 5-gram MinHash on the real corpus
    assert report["split"]["per_stratum"]["train"]["神经科"] > report["split"]["per_stratum"]["train"]["消化科"]
    # the out-of-source set: departments never trained on; of their 399 rows 32 are drawn first as the dev set the
    # sweep chooses on, the other 367 are the gated set; apart from every split and from each other
    held_out = {"内分泌科", "呼吸科", "肾内科", "血液科", "感染科", "风湿免疫科", "普通内科"}
    h = report["holdout"]
    assert set(h["per_stratum"]) == held_out and (h["rows_held_out"], h["before_sampling"]) == (399, 367)
    assert h["dev"]["rows"] == 32 and set(h["dev"]["per_stratum"]) <= held_out
    for split in ("train", "val", "test"):
        assert not held_out & set(report["split"]["per_stratum"][split]), split
    held = (tmp_path / "data" / "holdout_out_of_source.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(held) == 367 and {json.loads(line)["department"] for line in held} <= held_out
    dev = (tmp_path / "data" / "holdout_out_of_source_dev.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(dev) == 32 and not {json.loads(line)["id"] for line in dev} & {json.loads(line)["id"] for line in held}
    row = json.loads((tmp_path / "data" / "train.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
    assert row["department"] and row["difficulty"] in ("easy", "medium", "hard")
    assert len(row["messages"][2]["content"]) <= 130
    lines = (tmp_path / "data" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    asked = [json.loads(line)["messages"][1]["content"] for line in lines]
    assert sum("，" in q or "？" in q for q in asked) > len(asked) / 2  # the rows keep their Chinese punctuation
    assert report["general"]["input"] == report["general"]["written"] == 175  # one instance per seed task
    assert (report["general"]["replay_rows"], report["general"]["holdout_rows"]) == (131, 44)  # 25% of tasks held out
    quarantined = len((tmp_path / "data" / "quarantine.jsonl").read_text(encoding="utf-8").splitlines())
    assert quarantined == report["totals"]["quarantined"] == report["totals"]["dropped"]


def test_medical_en_example(shared_datasets, tmp_path):
    cfg = load_config(EXAMPLES / "medical-en.yaml", output_dir=tmp_path)
    folders = {
        "CancerGov": "1_CancerGov_QA",
        "GHR": "3_GHR_QA",
        "MPlus_Health_Topics": "4_MPlus_Health_Topics_QA",
        "NIDDK": "5_NIDDK_QA",
        "NINDS": "6_NINDS_QA",
        "MPlusDrugs": "11_MPlusDrugs_QA",
    }
    for src in cfg.data.sources:
        src.path = shared_datasets / "medquad" / folders[src.name]
    cfg.data.general = None
    cfg.data.sample = cfg.data.sample.model_copy(update={"train": None, "val": None, "test": None})  # every row
    report = run_data(cfg, RunLayout(tmp_path), progress=False)
    assert report["balanced"]
    drugs = report["sources"]["MPlusDrugs"]
    assert drugs["input"] > 10000 and drugs["kept_total"] == 0
    assert drugs["dropped"]["filter: empty:output"] == drugs["input"]
    # MedQuAD asks many questions twice (different answers): grouped by prompt, none is in two splits
    assert report["split"]["sizes"] == {"train": 2595, "val": 325, "test": 324}
    assert report["split"]["groups"]["rows_in_shared_groups"] > 100
    # every pair of train, val, test, holdout and the holdout's dev rows
    assert [(p["exact"], p["near"]) for p in report["leakage"]["pairs"]] == [(0, 0)] * 10
    # the out-of-source set: the whole NIDDK collection, never in train/val/test, 100 of its rows written after
    # dev_rows (32 asked, whole prompt groups) were set aside for a recipe search
    niddk = report["sources"]["NIDDK"]
    assert niddk["kept"] == {"train": 0, "val": 0, "test": 0, "holdout": 100, "holdout_dev": 31} and niddk["balanced"]
    assert report["holdout"]["by_source"]["NIDDK"] == 100 and report["holdout"]["before_sampling"] > 100
    assert sum(s["kept"]["holdout"] for s in report["sources"].values()) == 100
    assert not report["guards"]["violations"]
    rows = [json.loads(line) for line in (tmp_path / "data" / "test.jsonl").read_text().splitlines()]
    assert all(r["qtype"] and r["focus"] for r in rows)
    assert len(report["split"]["per_stratum"]["train"]) >= 8
