"""The data stage end to end on small real files: filters, dedup, split, decontamination, sampling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from domaintune.config import config_from_dict
from domaintune.data.pipeline import run_data
from domaintune.errors import UserError
from domaintune.layout import RunLayout


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def cfg_for(tmp: Path, data: dict, **top):
    data = {
        "sources": [
            {"path": "in.jsonl", "fields": {"instruction": "q", "output": "a"}, "keep": ["cat", "day", "score"]}
        ],
        **data,
    }
    return config_from_dict({"name": "t", "data": data, **top}, config_path=tmp / "p.yaml")


def read(tmp: Path, name: str, run: str = "run") -> list[dict]:
    path = tmp / run / "data" / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def corpus(n: int = 300) -> list[dict]:
    rows = []
    for i in range(n):
        rows.append(
            {
                "q": f"Question number {i} about topic {i % 7} and item {i * 13 % 101}?",
                "a": f"Answer {i}: take {i % 5} tablets after meals, words {i * 7} {i * 11} {i * 17}."
                + " more" * (i % 9),
                "cat": ["a", "b", "c"][i % 3],
                "day": f"2024-01-{1 + i % 28:02d}",
                "score": i % 10,
            }
        )
    return rows


def test_filters_with_reasons(tmp_path, tiny_model_dir):
    rows = [
        {"q": "ok question here?", "a": "a fine answer of some length."},
        {"q": "", "a": "no question"},
        {"q": "no answer"},
        {"q": "short?", "a": "x"},
        {"q": "long?", "a": "y" * 500},
        {"q": "rep?", "a": "very bad answer " * 12},
        {"q": "中文问题是什么?", "a": "这是一个中文回答,不是英文。"},
    ]
    write_jsonl(tmp_path / "in.jsonl", rows)
    cfg = cfg_for(
        tmp_path,
        {
            "filters": {
                "min_chars": {"output": 3},
                "max_chars": 300,
                "max_tokens": 120,
                "max_repetition": 0.5,
                "language": "en",
                "outlier_sigma": None,
            },
            "split": {"ratios": [1, 0, 0]},
            "decontaminate": {"enabled": False},
        },
        model={"name_or_path": "tiny-random-llama"},
    )
    report = run_data(cfg, RunLayout(tmp_path / "run"), progress=False)
    dropped = report["sources"]["in"]["dropped"]
    assert dropped == {
        "filter: empty:instruction": 1,
        "filter: missing:output": 1,
        "filter: min_chars:output<3": 1,
        "filter: max_chars:all>300": 1,
        "filter: repetition>0.5": 1,
        "filter: language:zh!=en": 1,
    }
    assert [r["id"] for r in read(tmp_path, "train")] == ["in-000001"]
    cfg2 = cfg_for(
        tmp_path,
        {"filters": {"max_tokens": 8, "outlier_sigma": None, "max_repetition": None}, "split": {"ratios": [1, 0, 0]}},
        model={"name_or_path": "tiny-random-llama"},
    )
    report2 = run_data(cfg2, RunLayout(tmp_path / "run2"), progress=False)
    assert report2["sources"]["in"]["dropped"]["filter: max_tokens>8"] >= 4


def test_outliers_dedup_clusters_and_quarantine(tmp_path):
    rows = corpus(60)
    rows.append(dict(rows[3]))  # exact duplicate
    rows.append({**rows[5], "q": rows[5]["q"].replace("?", " ?")})  # exact after whitespace-insensitive hash
    rows.append({**rows[7], "a": rows[7]["a"] + " ok"})  # near duplicate
    rows.append({"q": "outlier?", "a": "z " * 2000})
    write_jsonl(tmp_path / "in.jsonl", rows)
    cfg = cfg_for(
        tmp_path, {"dedup": {"word_ngram": 2}, "split": {"ratios": [1, 0, 0]}, "filters": {"max_repetition": None}}
    )
    report = run_data(cfg, RunLayout(tmp_path / "run"), progress=False)
    d = report["sources"]["in"]["dropped"]
    assert d["dedup_exact: exact duplicate"] == 2
    assert d["dedup_near: near duplicate"] == 1
    assert d["outlier: length long outlier"] == 1
    q = read(tmp_path, "quarantine")
    near = next(e for e in q if e["stage"] == "dedup_near")
    assert near["duplicate_of"] == "in-000008" and near["loc"] == "line 63"
    clusters = {c["kept"]["id"]: c for c in report["dedup"]["cluster_sample"]}
    assert set(clusters) == {"in-000004", "in-000006", "in-000008"}
    assert report["dedup"]["clusters"] == 3


def test_split_is_deterministic_and_stratified(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", corpus(300))
    data = {
        "split": {"by": "stratified", "stratify_field": "cat"},
        "decontaminate": {"enabled": False},
        "dedup": {"near": False},
        "filters": {"outlier_sigma": None},
    }
    run_data(cfg_for(tmp_path, data), RunLayout(tmp_path / "r1"), progress=False)
    rep = run_data(cfg_for(tmp_path, data), RunLayout(tmp_path / "r2"), progress=False)
    run_data(cfg_for(tmp_path, data, seed=7), RunLayout(tmp_path / "r3"), progress=False)
    for split in ("train", "val", "test"):
        assert read(tmp_path, split, "r1") == read(tmp_path, split, "r2")
    assert [r["id"] for r in read(tmp_path, "val", "r1")] != [r["id"] for r in read(tmp_path, "val", "r3")]
    assert rep["split"]["sizes"] == {"train": 240, "val": 30, "test": 30}
    assert rep["split"]["per_stratum"]["val"] == {"a": 10, "b": 10, "c": 10}
    train = read(tmp_path, "train", "r1")
    assert {r["difficulty"] for r in train} == {"easy", "medium", "hard"}


def test_time_split_difficulty_by_field_and_formats(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", corpus(100))
    data = {
        "split": {"by": "time", "time_field": "day"},
        "difficulty": {"by": "score"},
        "format": "alpaca",
        "system_prompt": "You are a doctor.",
        "decontaminate": {"enabled": False},
        "dedup": {"near": False},
    }
    run_data(cfg_for(tmp_path, data), RunLayout(tmp_path / "run"), progress=False)
    train, test = read(tmp_path, "train"), read(tmp_path, "test")
    assert max(r["day"] for r in train) <= min(r["day"] for r in test)
    assert train[0]["system"] == "You are a doctor." and "instruction" in train[0] and "output" in train[0]
    for r in train:
        assert r["difficulty"] == ("easy" if r["score"] <= 3 else "medium" if r["score"] <= 6 else "hard")
    run_data(cfg_for(tmp_path, {**data, "format": "sharegpt"}), RunLayout(tmp_path / "sg"), progress=False)
    sg = read(tmp_path, "train", "sg")[0]
    assert sg["system"] == "You are a doctor." and sg["conversations"][0]["from"] == "human"


def test_decontamination_drops_train_rows_sharing_ngrams(tmp_path):
    rows = corpus(200)
    for i in range(10):  # rows i and i+10 share a long distinct sentence
        shared = f"particular sentence {i} about chronic kidney disease stage {i} and its long term care"
        rows[i]["q"] = shared + " first"
        rows[i + 10]["q"] = shared + " second"
    write_jsonl(tmp_path / "in.jsonl", rows)
    data = {  # no grouping and no near check: only the shared 8-gram can find the pairs
        "split": {"ratios": [1, 1, 0], "group_by": []},
        "dedup": {"near": False},
        "decontaminate": {"ngram": 8, "near_threshold": None},
        "filters": {"outlier_sigma": None},
    }
    report = run_data(cfg_for(tmp_path, data), RunLayout(tmp_path / "run"), progress=False)
    val = {r["id"] for r in read(tmp_path, "val")}
    train = {r["id"] for r in read(tmp_path, "train")}
    expected = {}
    for i in range(10):
        a, b = f"in-{i + 1:06d}", f"in-{i + 11:06d}"
        if a in val and b not in val:
            expected[b] = a
        if b in val and a not in val:
            expected[a] = b
    quarantined = [e for e in read(tmp_path, "quarantine") if e["stage"] == "decontaminate"]
    dropped = {e["row"]["id"]: e["matched_id"] for e in quarantined}  # each names the val row it matched
    assert expected and dropped == expected and not (set(dropped) & train)
    assert {e["reason"] for e in quarantined} == {"shares a 8-gram with a val prompt"}
    assert report["decontaminate"]["dropped"] == len(expected) and report["balanced"]
    assert [(p["split"], p["against"], p["exact"]) for p in report["leakage"]["pairs"]] == [
        ("train", "val", 0),
        ("train", "test", 0),
        ("val", "test", 0),
    ]
    # scope "all": shared answer text also counts (the corpus answers share a long phrase)
    for r in rows:
        r["a"] = "the standard closing sentence of every answer in this clinic is long " + r["a"]
    write_jsonl(tmp_path / "in.jsonl", rows)
    prompt_only = run_data(cfg_for(tmp_path, data), RunLayout(tmp_path / "p"), progress=False)
    assert prompt_only["decontaminate"]["dropped"] == len(expected)
    # ... and then removes every train row: the removal guard fails the stage, naming the step and the cause
    everything = cfg_for(tmp_path, {**data, "decontaminate": {"ngram": 8, "scope": "all", "near_threshold": None}})
    with pytest.raises(UserError, match=r"(?s)step decontaminate removed 100.0% .* of train.*boilerplate"):
        run_data(everything, RunLayout(tmp_path / "all"), progress=False)
    failed = json.loads((tmp_path / "all" / "data" / "report.json").read_text(encoding="utf-8"))
    assert {v["check"] for v in failed["guards"]["violations"]} == {"removed", "ratio", "empty"}


def test_sampling_caps_are_accounted_as_sampled_out(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", corpus(200))
    data = {
        "split": {"ratios": [1, 1, 0]},
        "sample": {"train": 50, "val": 20},
        "dedup": {"near": False},
        "filters": {"outlier_sigma": None},
    }
    report = run_data(cfg_for(tmp_path, data), RunLayout(tmp_path / "run"), progress=False)
    s = report["sources"]["in"]
    assert s["kept"] == {"train": 50, "val": 20, "test": 0}
    assert s["balanced"] and s["input"] == 200
    assert s["dropped"] == {"sample: sampled out": 130}
    assert report["split"]["sizes_before_sampling"] == {"train": 100, "val": 100, "test": 0}
    assert sum(e["stage"] == "sample" for e in read(tmp_path, "quarantine")) == 130


def test_workers_give_the_same_output(tmp_path):
    rows = corpus(400)
    rows += [dict(r) for r in rows[:40]]
    write_jsonl(tmp_path / "in.jsonl", rows)
    data = {"batch_size": 32, "dedup": {"word_ngram": 2}}
    r1 = run_data(cfg_for(tmp_path, data), RunLayout(tmp_path / "w1"), workers=1, progress=False)
    r2 = run_data(cfg_for(tmp_path, data), RunLayout(tmp_path / "w2"), workers=2, progress=False)
    for split in ("train", "val", "test", "quarantine"):
        a, b = read(tmp_path, split, "w1"), read(tmp_path, split, "w2")
        assert a == b and (split != "quarantine" or len(a) >= 40)
    assert r1["sources"] == r2["sources"]


def test_general_set_one_row_per_instance(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", corpus(20))
    write_jsonl(
        tmp_path / "seed.jsonl",
        [
            {
                "id": "t0",
                "name": "n0",
                "instruction": "Add",
                "instances": [{"input": "1+1", "output": "2"}, {"input": "2+2", "output": "4"}],
            },
            {"id": "t1", "name": "n1", "instruction": "Greet", "instances": [{"input": "", "output": ""}]},
        ],
    )
    report = run_data(
        cfg_for(tmp_path, {"general": {"path": "seed.jsonl"}}), RunLayout(tmp_path / "run"), progress=False
    )
    gen = read(tmp_path, "general")
    assert [g["id"] for g in gen] == ["t0-0", "t0-1"]
    assert gen[0]["messages"] == [{"role": "user", "content": "Add\n\n1+1"}, {"role": "assistant", "content": "2"}]
    # a single usable task cannot be split: it stays in the replay pool and no holdout file is written
    assert not (tmp_path / "run" / "data" / "general_holdout.jsonl").exists()
    assert report["general"] == {
        "path": str(tmp_path / "seed.jsonl"),
        "input": 3,
        "written": 2,
        "replay_rows": 2,
        "holdout_rows": 0,
        "holdout_tasks": 0,
        "dropped": {"empty instruction/output": 1},
        "balanced": True,
    }


def test_general_holdout_keeps_whole_tasks_out_of_the_replay_pool(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", corpus(20))
    write_jsonl(
        tmp_path / "seed.jsonl",
        [
            {
                "id": f"t{i}",
                "instruction": f"Task {i}",
                "instances": [{"input": f"x{k}", "output": f"y{i}.{k}"} for k in range(2)],
            }
            for i in range(8)
        ],
    )
    cfg = cfg_for(tmp_path, {"general": {"path": "seed.jsonl", "holdout": 0.25}})
    report = run_data(cfg, RunLayout(tmp_path / "run"), progress=False)
    replay = read(tmp_path, "general")
    holdout = read(tmp_path, "general_holdout")
    task = lambda row: row["id"].rsplit("-", 1)[0]  # noqa: E731
    assert {task(r) for r in replay}.isdisjoint({task(r) for r in holdout})
    assert len({task(r) for r in holdout}) == 2 and len(holdout) == 4 and len(replay) == 12
    assert report["general"]["holdout_tasks"] == 2 and report["general"]["balanced"]
    again = run_data(cfg, RunLayout(tmp_path / "run2"), progress=False)  # the same seed holds out the same tasks
    assert again["general"] == report["general"]
    assert read(tmp_path, "general_holdout", "run2") == holdout
    with pytest.raises(UserError, match="holdout: 9 tasks"):
        run_data(
            cfg_for(tmp_path, {"general": {"path": "seed.jsonl", "holdout": 9}}),
            RunLayout(tmp_path / "run3"),
            progress=False,
        )


def test_normalise_and_pii_changes_are_counted(tmp_path):
    rows = [
        {"q": "ＷＨＡＴ is BP？", "a": "Call 13812345678 or mail a@b.com for an answer."},
        {"q": "plain question here", "a": "plain answer here"},
        {"q": "dropped &amp; redacted?", "a": "no: 13912345678"},  # filtered afterwards: still counted
    ]
    write_jsonl(tmp_path / "in.jsonl", rows)
    data = {"filters": {"min_chars": {"output": 16}, "outlier_sigma": None}, "split": {"ratios": [1, 0, 0]}}
    report = run_data(cfg_for(tmp_path, data), RunLayout(tmp_path / "run"), progress=False)
    assert report["normalise"]["rows_changed"] == 2
    assert report["pii"] == {"rows_changed": 2, "counts": {"phone": 2, "email": 1}}
    stages = {f["stage"]: f for f in report["funnel"]}
    assert stages["normalise"]["changed"] == 2 and stages["filter"]["dropped"] == 1
    q = read(tmp_path, "quarantine")
    assert "13912345678" not in json.dumps(q) and "[PHONE]" in json.dumps(q)  # quarantine is redacted too
    out = read(tmp_path, "train")[0]["messages"]
    assert out[0]["content"] == "WHAT is BP？" and out[1]["content"] == "Call [PHONE] or mail [EMAIL] for an answer."
