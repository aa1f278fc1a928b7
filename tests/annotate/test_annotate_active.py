"""Active learning ranking, and the simulated round on the shared Chinese medical data trained through `run`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from domaintune.annotate.active import (
    BigramNB,
    answer_perplexity,
    clusters,
    diverse_rank,
    margin_uncertainty,
    sample_disagreement,
)


def test_margin_uncertainty_and_diverse_ranking():
    nb = BigramNB().fit(["胸闷心慌", "心慌胸痛", "胃痛反酸", "反酸胃胀"], ["cardio", "cardio", "gastro", "gastro"])
    u = margin_uncertainty(nb, ["胸闷心慌胸痛", "胃痛反酸胃胀", "头晕"])
    assert nb.predict("心慌") == "cardio" and u[2] > max(u[0], u[1])  # unseen text: the classifier is unsure
    texts = ["高血压头晕怎么办啊医生", "高血压头晕怎么办呀医生", "胃痛反酸怎么回事", "咳嗽有痰发烧三天"]
    groups = clusters(texts, threshold=0.5)
    assert groups[0] == groups[1] and len(set(groups)) == 3
    # the two near-duplicates are the most uncertain, but one cluster gives one row per pass
    order = diverse_rank([0.9, 0.8, 0.5, 0.1], groups)
    assert order == [0, 2, 3, 1]
    assert sample_disagreement([["a b c", "a b c"], ["abc", "xyz"]]) == [0.0, 1.0]


def test_answer_perplexity_with_the_tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ppl = answer_perplexity(model, tok, [("hi", "hello there"), ("胸痛怎么办", "请尽快就医。")])
    assert all(p > 1 for p in ppl) and len(ppl) == 2


def test_simulated_round_on_the_chinese_data_trained_through_run(shared_datasets, tmp_path):
    from domaintune.annotate.project import Project
    from domaintune.annotate.simulate import simulate
    from domaintune.cli import app

    csv = shared_datasets / "zh_medical_dialogue" / "internal_medicine_sample.csv"
    figures = simulate(csv, tmp_path, n=60, errors={"ann_a": 0.0, "ann_b": 0.1}, seed=3)
    assert figures["method"] == "cohen" and figures["arbitrated"] > 0
    assert figures["wrong_labels_after_arbitration"] == 0 and figures["rows"] == 60
    p = Project(tmp_path / "project")
    assert len(p.decisions()) == figures["arbitrated"] and all(d["by"] == "expert" for d in p.decisions())
    runner = CliRunner()
    (tmp_path / "task.yaml").write_text(json.dumps(p.meta["task"], ensure_ascii=False), encoding="utf-8")
    res = runner.invoke(
        app,
        [
            "annotate",
            "select",
            str(tmp_path / "source.yaml"),
            "--task",
            str(tmp_path / "task.yaml"),
            "--n",
            "5",
            "--labelled",
            str(p.folder),
            "--out",
            str(tmp_path / "r2"),
        ],
    )
    assert res.exit_code == 0, res.output
    r2 = Project(tmp_path / "r2")
    assert len(r2.items) == 5 and not set(r2.items) & set(p.items)
    ranking = [json.loads(line) for line in (tmp_path / "r2" / "ranking.jsonl").open()]
    assert [r["rank"] for r in ranking[:3]] == [1, 2, 3] and ranking[0]["id"] in r2.items
    (tmp_path / "train.yaml").write_text(
        "name: labelled\nmodel: {name_or_path: tiny-random-llama}\ndata:\n"
        "  sources: [{name: labelled, path: project, reader: annotations, keep: [intent]}]\n"
        "  split: {ratios: [8, 1, 1]}\n  guards: {on_violation: warn}\n"
        "train: {method: lora, max_steps: 2, batch_size: 2, max_length: 96, eval_steps: 2, save_steps: 2, max_val_samples: 2}\n",
        encoding="utf-8",
    )
    res = runner.invoke(app, ["run", str(tmp_path / "train.yaml"), "--stages", "data,train"], env={"COLUMNS": "40"})
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (tmp_path / "runs" / "labelled" / "data" / "train.jsonl").open()]
    assert rows and all("intent" in r for r in rows)
    assert (tmp_path / "runs" / "labelled" / "model" / "adapter_config.json").is_file()
    res = runner.invoke(app, ["annotate", "round", str(p.folder), "--metric", "intent_accuracy=0.9"])
    assert "round 1" in res.output


@pytest.mark.parametrize("method", ["nope"])
def test_select_rejects_unknown_methods(method):
    from domaintune.annotate.active import score_rows
    from domaintune.errors import UserError

    with pytest.raises(UserError, match="unknown method"):
        score_rows(None, [], method, None, [])  # type: ignore[arg-type]
