"""A version records how it was tuned (method, reward definition, reference model) and `registry show` prints it."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from domaintune.cli import app
from domaintune.config import config_from_dict
from domaintune.layout import RunLayout
from domaintune.registry import register_run, registry_from_config
from domaintune.registry.training_record import describe, training_record

runner = CliRunner()
REWARDS = [
    {"type": "regex", "name": "window", "pattern": r"\b30 days\b", "weight": 2.0},
    {"type": "no_pii", "pass_at": 1.0},
]


def _run(tmp_path: Path, method: str) -> Path:
    run = tmp_path / "runs" / "cs"
    (run / "model").mkdir(parents=True)
    (run / "model" / "adapter_config.json").write_text('{"r": 4}')
    (run / "model" / "adapter_model.safetensors").write_bytes(b"\x00" * 1024)
    (run / "data").mkdir()
    (run / "data" / "train.jsonl").write_text('{"id": "1", "prompt": [], "reference": "30 days"}\n')
    (run / "train").mkdir()
    (run / "train" / "metrics.json").write_text(json.dumps({"method": method, "base_model": "smollm2-135m-instruct"}))
    return run


def test_grpo_version_records_its_verifiers_and_reference_and_show_prints_them(tmp_path):
    run = _run(tmp_path, "grpo")
    project = {
        "name": "cs",
        "output_dir": "runs/cs",
        "registry": {"name": "cs"},
        "train": {"method": "grpo", "grpo": {"rewards": REWARDS, "beta": 0.04}},
    }
    config = tmp_path / "cs.yaml"
    config.write_text(yaml.safe_dump(project), encoding="utf-8")
    cfg = config_from_dict(project, config_path=config)
    version = register_run(cfg, RunLayout(run))
    training = registry_from_config(cfg).show("cs", version)["metadata"]["training"]
    assert training["method"] == "grpo"
    assert training["reward"]["kind"] == "verifiers"
    assert [(c["name"], c["type"], c.get("weight", 1.0)) for c in training["reward"]["components"]] == [
        ("window", "regex", 2.0),
        ("no_pii", "no_pii", 1.0),
    ]
    assert training["reward"]["components"][0]["pattern"] == r"\b30 days\b"
    assert training["reference"] == {"model": "smollm2-135m-instruct", "kind": "base", "kl_coefficient": 0.04}
    assert training["settings"]["beta"] == 0.04 and "rewards" not in training["settings"]

    result = runner.invoke(app, ["registry", "show", version, "-c", str(config)])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "method grpo" in said
    assert "verifiers: window(w=2.0, pass_at=1.0), no_pii(w=1.0, pass_at=1.0)" in said
    assert "reference model smollm2-135m-instruct (base, KL coefficient 0.04)" in said


def test_each_method_names_its_reward_and_reference(tmp_path):
    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "adapter_model.safetensors").write_bytes(b"\x01" * 64)
    cases = {
        "dpo": {"dpo": {"beta": 0.2}},
        "kto": {"init_from": "runs/sft/model"},
        "orpo": {},
        "simpo": {},
        "reward": {},
        "ppo": {"ppo": {"reward_model": str(rm), "beta": 0.05}},
        "grpo": {"grpo": {"rewards": REWARDS, "beta": 0.0}},
        "lora": {},
    }
    records = {}
    for method, extra in cases.items():
        cfg = config_from_dict({"name": "t", "train": {"method": method, **extra}})
        records[method] = training_record(cfg, {"method": method, "base_model": "base-m"})
    assert records["dpo"]["reference"] == {"model": "base-m", "kind": "base", "kl_coefficient": 0.2}
    assert "log-ratio" in records["dpo"]["reward"]["definition"]
    assert records["kto"]["reference"]["kind"] == "init_from" and records["kto"]["reference"]["model"].endswith("model")
    assert records["orpo"]["reference"] is None and "reference-free" in records["orpo"]["reward"]["definition"]
    assert records["simpo"]["reference"] is None and records["reward"]["reference"] is None
    assert records["ppo"]["reward"]["model"] == str(rm) and len(records["ppo"]["reward"]["fingerprint"]) == 64
    assert records["ppo"]["reference"]["kl_coefficient"] == 0.05
    assert records["grpo"]["reference"] is None  # beta 0: no KL term, no reference model
    assert records["lora"] == {"method": "lora", "reward": None, "reference": None, "settings": None}
    assert describe(records["lora"]) == []
    assert dict(describe(records["ppo"]))["reward"].startswith(f"reward model {rm}")
