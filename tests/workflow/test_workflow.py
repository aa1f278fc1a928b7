"""`domaintune run` end to end on the tiny model: skip when unchanged, re-run what changed, gates, resume."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from domaintune.config import load_config
from domaintune.train.runner import last_complete_checkpoint
from domaintune.workflow.pipeline import run_pipeline

WORDS = [
    "fever",
    "cough",
    "insulin",
    "dosage",
    "kidney",
    "liver",
    "asthma",
    "allergy",
    "migraine",
    "vitamin",
    "sleep",
    "anxiety",
    "tablet",
    "syrup",
    "diet",
    "exercise",
    "pressure",
    "sugar",
    "cholesterol",
    "thyroid",
    "rash",
    "injury",
    "fracture",
    "infection",
    "vaccine",
    "therapy",
]


def _rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = rng.sample(WORDS, 4)
        rows.append(
            {
                "instruction": f"Patient {i} asks about {topic[0]} and {topic[1]}: what should they do about {topic[2]}?",
                "input": "",
                "output": f"For {topic[0]}, watch the {topic[3]} closely; case {i} needs rest, fluids and a follow-up visit.",
            }
        )
    return rows


def _project(tmp_path: Path, **overrides) -> Path:
    data_file = tmp_path / "qa.jsonl"
    if not data_file.exists():
        data_file.write_text("".join(json.dumps(r) + "\n" for r in _rows(60)), encoding="utf-8")
    general = tmp_path / "general.jsonl"
    if not general.exists():
        general.write_text(
            "".join(
                json.dumps(
                    {"instruction": f"Name a colour number {i}.", "instances": [{"input": "", "output": f"Blue {i}"}]}
                )
                + "\n"
                for i in range(6)
            ),
            encoding="utf-8",
        )
    project = {
        "name": "tiny",
        "output_dir": "run",
        "model": {"name_or_path": "tiny-random-llama"},
        "data": {
            "sources": [{"path": "qa.jsonl", "reader": "alpaca"}],
            "dedup": {"near": False},
            "filters": {"outlier_sigma": None},
            "decontaminate": {"enabled": False},
            "general": {"path": "general.jsonl"},
        },
        "train": {
            "method": "lora",
            "max_steps": 4,
            "eval_steps": 2,
            "save_steps": 2,
            "batch_size": 2,
            "max_length": 64,
            "precision": "fp32",
            "logging_steps": 1,
            "max_val_samples": 4,
        },
        "eval": {
            "max_items": 4,
            "max_general_items": 2,
            "decoding": {"max_new_tokens": 6, "batch_size": 4},
            "robustness": {"enabled": False},
            "bootstrap_samples": 100,
            "gates": [],
        },
        "export": {
            "gguf": [],
            "int8": False,
            "eval_rows": 2,
            "eval_items": 0,
            "speed_prompts": 1,
            "speed_new_tokens": 4,
        },
        "registry": {"url": "sqlite:///registry.db", "store": "artifacts"},
    }
    for dotted, value in overrides.items():
        node = project
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path = tmp_path / "project.yaml"
    path.write_text(yaml.safe_dump(project, allow_unicode=True), encoding="utf-8")
    return path


def _statuses(result) -> dict[str, str]:
    return {o.name: o.status for o in result.outcomes}


def test_run_skips_unchanged_and_reruns_what_changed(tmp_path):
    config = _project(tmp_path)
    first = run_pipeline(load_config(config))
    assert _statuses(first) == dict.fromkeys(("data", "train", "eval", "export", "register"), "ran")
    assert first.version and first.version.startswith("v0.0.1_")
    registered = json.loads((tmp_path / "run" / "run" / "registered.json").read_text())
    assert registered["status"] == "candidate"

    second = run_pipeline(load_config(config))
    assert set(_statuses(second).values()) == {"skipped"}

    # A training setting changed: data stays, everything downstream of train re-runs.
    third = run_pipeline(load_config(config, ["train.learning_rate=0.001"]))
    assert _statuses(third) == {"data": "skipped", "train": "ran", "eval": "ran", "export": "ran", "register": "ran"}
    assert third.version != first.version

    # --from forces a stage and the later ones even though nothing changed.
    fourth = run_pipeline(load_config(config, ["train.learning_rate=0.001"]), from_stage="export")
    assert _statuses(fourth) == {
        "data": "skipped",
        "train": "skipped",
        "eval": "skipped",
        "export": "ran",
        "register": "ran",
    }

    # An input file changed: the data stage notices through the file's size and mtime.
    with (tmp_path / "qa.jsonl").open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(_rows(1, seed=99)[0]) + "\n")
    fifth = run_pipeline(load_config(config, ["train.learning_rate=0.001"]), stages=["data"])
    assert _statuses(fifth) == {"data": "ran"}


def test_failed_gate_registers_rejected_and_cli_exits_1(tmp_path):
    config = _project(tmp_path, **{"eval.gates": ["rougeL_char_delta >= 1000"]})
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "domaintune", "run", str(config)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "eval gates failed" in proc.stderr
    registered = json.loads((tmp_path / "run" / "run" / "registered.json").read_text())
    assert registered["status"] == "rejected"
    assert any("rougeL_char_delta" in reason for reason in registered["reasons"])
    assert (tmp_path / "run" / "run" / "summary.html").is_file()
    from domaintune.registry import registry_from_config

    registry = registry_from_config(load_config(config))
    assert "candidate" not in registry.aliases("tiny")


def test_killed_run_resumes_training_from_its_checkpoint(tmp_path):
    config = _project(tmp_path, **{"train.max_steps": 40, "train.save_steps": 10, "train.eval_steps": 10})
    cmd = [sys.executable, "-m", "domaintune", "run", str(config), "--stages", "data,train"]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    checkpoints = tmp_path / "run" / "train" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and last_complete_checkpoint(checkpoints) is None:
        if proc.poll() is not None:
            pytest.fail(f"run exited with {proc.returncode} before its first checkpoint")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # kill -9: no cleanup code runs
    proc.wait()
    state = json.loads((tmp_path / "run" / "run" / "state.json").read_text())
    assert state["stages"]["data"]["status"] == "done"
    assert state["stages"]["train"]["status"] == "running"

    finished = run_pipeline(load_config(config), stages=["data", "train"])
    assert _statuses(finished) == {"data": "skipped", "train": "ran"}
    metrics = json.loads((tmp_path / "run" / "train" / "metrics.json").read_text())
    assert metrics["resumed_from"] and "checkpoint-" in metrics["resumed_from"]
    assert metrics["steps"] == 40


def test_continue_from_trains_on_parent_and_registers_a_child(tmp_path):
    from domaintune.registry import registry_from_config
    from domaintune.workflow.incremental import prepare_continuation

    config = _project(tmp_path, **{"registry.artifacts": ["model", "data/train.jsonl"], "export.gguf": []})
    first = run_pipeline(load_config(config))
    registry = registry_from_config(load_config(config))
    registry.promote("tiny", first.version, alias="production")
    parent_rows = sum(1 for _ in (tmp_path / "run" / "data" / "train.jsonl").open(encoding="utf-8"))

    cfg, parent = prepare_continuation(
        load_config(config, output_dir=tmp_path / "round2"), "registry://tiny@production"
    )
    assert parent == first.version
    assert cfg.train.init_from == f"registry://tiny@{first.version}"
    assert cfg.data.sources[-1].reader == "messages"
    second = run_pipeline(cfg, parent_version=parent)
    report = json.loads((tmp_path / "round2" / "data" / "report.json").read_text())
    # the parent's rows come back as one more source; near-identical new rows are deduplicated against them
    assert report["sources"][cfg.data.sources[-1].name]["input"] == parent_rows
    metrics = json.loads((tmp_path / "round2" / "train" / "metrics.json").read_text())
    assert metrics["init_from"] and first.version in metrics["init_from"]
    assert registry.show("tiny", second.version)["parent"] == first.version
