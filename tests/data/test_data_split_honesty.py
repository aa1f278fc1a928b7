"""Honest splits: groups stay on one side, prompts are decontaminated at any length, the leakage table reads 0,
and a split that a step gutted (or that strays from its ratios, or is empty) fails the stage loudly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from domaintune.config import config_from_dict
from domaintune.data.overlap import PromptIndex, find_overlaps, row_prompt
from domaintune.data.pipeline import run_data
from domaintune.errors import UserError
from domaintune.layout import RunLayout

DISEASES = [f"condition{chr(97 + i % 26)}{chr(97 + i // 26)}" for i in range(120)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def read(tmp: Path, name: str, run: str) -> list[dict]:
    path = tmp / run / "data" / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def cfg_for(tmp: Path, **data):
    base = {
        "sources": [{"path": "in.jsonl", "fields": {"instruction": "q", "output": "a"}, "keep": ["doc", "cat"]}],
        "filters": {"outlier_sigma": None, "max_repetition": None},
        "dedup": {"near": False},
    }
    return config_from_dict({"name": "t", "data": {**base, **data}}, config_path=tmp / "p.yaml")


def repeated_questions(n_questions: int = 120, copies: int = 3) -> list[dict]:
    """MedQuAD's shape: each short question asked several times (case and spacing vary), different answers."""
    rows = []
    for k in range(copies):
        for i, d in enumerate(DISEASES[:n_questions]):
            q = f"What is (are) {d} ?" if k == 0 else f"what is are {d.upper() if k == 1 else d}?"
            rows.append({"q": q, "a": f"Answer {k} about {d}: text {i * 7 + k} more words here.", "doc": f"d{i}"})
    return rows


def prompts_by_split(tmp: Path, run: str) -> dict[str, set[str]]:
    from domaintune.data.text import prompt_key

    return {s: {prompt_key(row_prompt(r)) for r in read(tmp, s, run)} for s in ("train", "val", "test")}


def test_repeated_prompts_are_grouped_into_one_split(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", repeated_questions())
    report = run_data(cfg_for(tmp_path), RunLayout(tmp_path / "g"), progress=False)
    keys = prompts_by_split(tmp_path, "g")
    assert not (keys["train"] & keys["val"]) and not (keys["train"] & keys["test"]) and not (keys["val"] & keys["test"])
    assert report["decontaminate"]["dropped"] == 0  # nothing to remove: the copies were never split apart
    assert report["split"]["sizes"] == {"train": 288, "val": 36, "test": 36}
    assert report["split"]["groups"]["groups"] == 120 and report["split"]["groups"]["largest"] == 3
    assert all(p["exact"] == 0 and p["near"] == 0 for p in report["leakage"]["pairs"])
    assert not report["guards"]["violations"]


def test_without_groups_decontamination_catches_short_prompts_and_names_the_match(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", repeated_questions())
    cfg = cfg_for(tmp_path, split={"group_by": []}, guards={"on_violation": "warn"})
    report = run_data(cfg, RunLayout(tmp_path / "u"), progress=False)
    quarantined = [e for e in read(tmp_path, "quarantine", "u") if e["stage"] == "decontaminate"]
    assert quarantined and report["decontaminate"]["by_kind"] == {"exact": len(quarantined)}
    held = {r["id"]: (s, row_prompt(r)) for s in ("val", "test") for r in read(tmp_path, s, "u")}
    for e in quarantined:  # 4-word prompts: no 13-gram could have seen them
        split, prompt = held[e["matched_id"]]
        assert e["matched_split"] == split and e["match"] == "exact" and e["similarity"] == 1.0
        assert e["reason"].startswith(f"prompt repeats a {split} prompt")
        assert prompt.lower().replace("(", "").replace(")", "").split()[-2] in json.dumps(e["row"]).lower()
    assert all(p["exact"] == 0 and p["near"] == 0 for p in report["leakage"]["pairs"])
    # a third of train went: the removal guard names the step and points at the missing grouping
    assert any("not grouped by prompt" in v["message"] for v in report["guards"]["violations"])


def test_group_by_a_field_with_stratified_and_time_splits(tmp_path):
    rows = [
        {"q": f"Distinct question {i} on {DISEASES[i % 100]} please", "a": f"answer {i}", "doc": f"doc{i // 4}"}
        for i in range(400)
    ]
    for i, r in enumerate(rows):
        r["cat"] = "abc"[i % 3]
        r["day"] = f"2024-{1 + (i * 7) % 12:02d}-{1 + i % 28:02d}"
    write_jsonl(tmp_path / "in.jsonl", rows)
    for name, split in (
        ("strat", {"by": "stratified", "stratify_field": "cat", "group_by": ["prompt", "doc"]}),
        ("time", {"by": "time", "time_field": "day", "group_by": "doc"}),
    ):
        cfg = cfg_for(tmp_path, split=split)
        cfg.data.sources[0].keep = ["doc", "cat", "day"]
        report = run_data(cfg, RunLayout(tmp_path / name), progress=False)
        where = {r["doc"]: s for s in ("train", "val", "test") for r in read(tmp_path, s, name)}
        for s in ("train", "val", "test"):
            assert all(where[r["doc"]] == s for r in read(tmp_path, s, name)), (name, s)
        assert report["split"]["groups"]["largest"] == 4 and not report["guards"]["violations"]
    with pytest.raises(UserError, match="group_by: 'patient' is neither `prompt` nor kept"):
        run_data(cfg_for(tmp_path, split={"group_by": ["patient"]}), RunLayout(tmp_path / "bad"), progress=False)


def test_near_duplicate_prompts_are_grouped_or_decontaminated(tmp_path):
    base = "my grandmother has had a persistent dry cough for three weeks and a mild fever at night, what should we do"
    rows = [{"q": f"{base} about case {i}", "a": f"answer {i}"} for i in range(60)]
    rows += [{"q": f"{base} about case {i} now", "a": f"other answer {i}"} for i in range(60)]  # a word added
    rows += [{"q": f"Unrelated question number {i} on {DISEASES[i]}", "a": f"reply {i}"} for i in range(120)]
    write_jsonl(tmp_path / "in.jsonl", rows)
    grouped = run_data(cfg_for(tmp_path), RunLayout(tmp_path / "g"), progress=False)
    assert grouped["split"]["groups"]["links"].get("near prompt", 0) >= 50
    assert grouped["decontaminate"]["dropped"] == 0
    cfg = cfg_for(tmp_path, split={"group_by": []}, guards={"on_violation": "warn"})
    apart = run_data(cfg, RunLayout(tmp_path / "a"), progress=False)
    near = [e for e in read(tmp_path, "quarantine", "a") if e["stage"] == "decontaminate"]
    assert near and {e["match"] for e in near} == {"near"}
    assert all(0.85 <= e["similarity"] < 1 and e["matched_id"] for e in near)
    for run, report in (("g", grouped), ("a", apart)):
        assert all(p["exact"] == 0 and p["near"] == 0 for p in report["leakage"]["pairs"]), run


def test_prompt_overlaps_for_eval():
    train = [
        {"id": "t1", "messages": [{"role": "user", "content": "What is (are) Acromegaly ?"}]},
        {"id": "t2", "instruction": "ＷＨＡＴ ａｒｅ the symptoms of gout", "output": "x"},
        {"id": "t3", "conversations": [{"from": "human", "value": "How many people are affected by ataxia type 1 ?"}]},
        {"id": "t4", "instruction": "What are the treatments for Klippel-Trenaunay syndrome ?"},
        {"id": "t5", "text": "an unrelated document about diet"},
    ]
    test = [
        {
            "id": "q1",
            "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "what is are acromegaly"}],
        },
        {"id": "q2", "instruction": "What are the symptoms of Gout?"},
        {"id": "q3", "instruction": "How many people are affected by ataxia type 2 ?"},  # a different question
        {"id": "q4", "instruction": "What are the treatments for Klippel-Trenaunay Syndrome (KTS) ?"},
    ]
    found = {(o.row_id, o.matched_id, o.kind) for o in find_overlaps(train, test)}
    assert found == {("t1", "q1", "exact"), ("t2", "q2", "exact"), ("t4", "q4", "near")}
    assert find_overlaps(train, test, near_threshold=None) == [
        o for o in find_overlaps(train, test) if o.kind == "exact"
    ]
    index = PromptIndex(ngram=5)
    index.add(["h"], ["one two three four five six seven"])
    assert index.match(["zero two three four five six eight"])[0].kind == "ngram"


def test_removal_guard_fails_loudly_and_warns_on_request(tmp_path):
    """The issue's 500,000-row case, small: questions repeated with small variations, split without groups."""
    rows = []
    for i in range(40):
        for k in range(8):
            prompt = (
                f"Customer asks: how do I reset the password of account type {i} on the mobile app {'today' * (k % 2)}"
            )
            rows.append({"q": prompt + "?" * (k % 3), "a": f"Reply {i}-{k}: open settings, then security."})
    write_jsonl(tmp_path / "in.jsonl", rows)
    cfg = cfg_for(tmp_path, split={"group_by": []})
    with pytest.raises(
        UserError, match=r"(?s)step decontaminate removed \d+\.\d% .*of train .*limit 30%.*likely cause"
    ):
        run_data(cfg, RunLayout(tmp_path / "fail"), progress=False)
    report = json.loads((tmp_path / "fail" / "data" / "report.json").read_text(encoding="utf-8"))
    assert report["balanced"] and {v["check"] for v in report["guards"]["violations"]} >= {"removed", "ratio"}
    assert "step decontaminate removed" in (tmp_path / "fail" / "data" / "report.html").read_text(encoding="utf-8")
    warned = run_data(
        cfg_for(tmp_path, split={"group_by": []}, guards={"on_violation": "warn"}),
        RunLayout(tmp_path / "w"),
        progress=False,
    )
    assert warned["guards"]["violations"] and warned["split"]["sizes"]["train"] > 0
    grouped = run_data(cfg_for(tmp_path), RunLayout(tmp_path / "ok"), progress=False)  # the default prevents it
    assert not grouped["guards"]["violations"] and grouped["decontaminate"]["dropped"] == 0


def test_ratio_guard_names_a_giant_group(tmp_path):
    rows = [
        {"q": f"question {i} about {DISEASES[i % 100]}", "a": f"a {i}", "doc": "big" if i < 190 else f"d{i}"}
        for i in range(200)
    ]
    write_jsonl(tmp_path / "in.jsonl", rows)
    with pytest.raises(UserError, match=r"train holds 9\d\.\d% .*groups are too large: the largest holds 95.0%"):
        run_data(cfg_for(tmp_path, split={"group_by": ["doc"]}), RunLayout(tmp_path / "r"), progress=False)


def test_empty_outputs_fail_with_a_clear_message(tmp_path):
    (tmp_path / "in.csv").write_text("q,a\n", encoding="utf-8")
    src = {"path": "in.csv", "fields": {"instruction": "q", "output": "a"}}
    cfg = config_from_dict({"name": "t", "data": {"sources": [src]}}, config_path=tmp_path / "p.yaml")
    with pytest.raises(UserError, match="every split is empty: the sources hold no rows"):
        run_data(cfg, RunLayout(tmp_path / "header"), progress=False)
    (tmp_path / "in.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(UserError, match="every split is empty"):
        run_data(cfg_for(tmp_path), RunLayout(tmp_path / "empty"), progress=False)
    write_jsonl(tmp_path / "in.jsonl", [{"q": f"q{i}", "a": ""} for i in range(5)])
    with pytest.raises(UserError, match=r"5 rows read, 0 kept; most dropped: filter: empty:output 5"):
        run_data(cfg_for(tmp_path), RunLayout(tmp_path / "filtered"), progress=False)
    # a split the ratios leave out may be empty
    write_jsonl(tmp_path / "in.jsonl", [{"q": f"question {i}", "a": f"answer {i}"} for i in range(5)])
    report = run_data(cfg_for(tmp_path, split={"ratios": [1, 0, 0]}), RunLayout(tmp_path / "ok"), progress=False)
    assert report["split"]["sizes"] == {"train": 5, "val": 0, "test": 0}
