"""`domaintune run --stages data,train` with data.kind preference: the data stage's splits are what dpo and kto
train on (no train.<method>.path), and a chat method refuses them by name."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from domaintune.config import load_config
from domaintune.errors import UserError
from domaintune.workflow.pipeline import run_pipeline

WORDS = ["mug", "lamp", "chair", "kettle", "scarf", "boots", "desk", "clock", "rug", "vase", "fan", "tent"]


def _pairs(n: int) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for i in range(n):
        a, b, c = rng.sample(WORDS, 3)
        q = f"Order {i}: can I return the {a} and the {b} I bought with a {c}?"
        rows.append(
            {  # LLaMA-Factory's alpaca ranking layout
                "instruction": q,
                "input": "",
                "chosen": f"Yes, order {i} can go back within 30 days with the receipt.",
                "rejected": f"No idea about the {a}, figure it out yourself.",
            }
        )
    return rows


def _project(tmp_path: Path, method: str, **train) -> Path:
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _pairs(40)), encoding="utf-8")
    project = {
        "name": "tiny",
        "output_dir": "run",
        "model": {"name_or_path": "tiny-random-llama"},
        "data": {"kind": "preference", "sources": [{"path": "pairs.jsonl"}], "filters": {"outlier_sigma": None}},
        "train": {
            "method": method,
            "max_steps": 2,
            "eval_steps": 2,
            "save_steps": 2,
            "batch_size": 4,
            "max_length": 64,
            "max_val_samples": 4,
            "tracking": "none",
            "precision": "fp32",
            **train,
        },
    }
    path = tmp_path / "project.yaml"
    path.write_text(yaml.safe_dump(project), encoding="utf-8")
    return path


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_run_data_then_train_reads_the_data_stages_pairs(tmp_path, method):
    config = _project(tmp_path, method)
    result = run_pipeline(load_config(config), stages=["data", "train"])
    assert {o.name: o.status for o in result.outcomes} == {"data": "ran", "train": "ran"}
    run = tmp_path / "run"
    report = json.loads((run / "data" / "report.json").read_text())
    n_train = sum(1 for _ in (run / "data" / "train.jsonl").open())
    n_val = sum(1 for _ in (run / "data" / "val.jsonl").open())
    assert report["kind"] == "preference" and n_train + n_val <= 40
    metrics = json.loads((run / "train" / "metrics.json").read_text())
    assert metrics["steps"] == 2
    data = metrics["data"]
    assert data["train_file"] == str(run / "data" / "train.jsonl")
    # dpo trains on each pair; kto on each pair's chosen (desirable) and rejected (undesirable) answer
    assert data["train"]["rows"] == (n_train if method == "dpo" else 2 * n_train)
    if method == "kto":
        assert data["train"]["desirable"] == data["train"]["undesirable"] == n_train
        assert data["val_file"] == str(run / "data" / "val.jsonl")
    assert json.loads((run / "model" / "domaintune.json").read_text())["method"] == method


def test_a_chat_method_refuses_preference_rows_by_name(tmp_path):
    config = _project(tmp_path, "lora")
    with pytest.raises(UserError, match=r"data\.kind is 'preference'"):
        run_pipeline(load_config(config), stages=["data", "train"])
