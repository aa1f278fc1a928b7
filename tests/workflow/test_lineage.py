"""Reproducible lineage: `--continue-from` reads exactly the data a version was registered with, or refuses.

Regression: with `registry.artifacts: [model, export]`, `--continue-from registry://...@v0.0.1` read the
parent's run folder, which a later round had overwritten (161 registered rows, 165 read), and registered the
child as trained on v0.0.1's data. The registry's checksum was never compared.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from domaintune.cli import app
from domaintune.config import load_config
from domaintune.errors import UserError
from domaintune.registry import register_run, registry_from_config
from domaintune.utils.io import sha256_file
from domaintune.workflow.incremental import parent_data, prepare_continuation


def _rows(n: int, tag: str) -> str:
    return "".join(
        json.dumps(
            {
                "id": f"{tag}-{i}",
                "messages": [
                    {"role": "user", "content": f"{tag} question {i}?"},
                    {"role": "assistant", "content": f"{tag} answer {i}."},
                ],
            }
        )
        + "\n"
        for i in range(n)
    )


def _project(tmp_path: Path, **registry) -> Path:
    (tmp_path / "qa.jsonl").write_text(_rows(3, "raw"), encoding="utf-8")
    project = {
        "name": "tiny",
        "output_dir": "run",
        "model": {"name_or_path": "tiny-random-llama"},
        "data": {"sources": [{"path": "qa.jsonl", "reader": "messages"}]},
        "registry": {"url": "sqlite:///registry.db", "store": "artifacts", **registry},
    }
    path = tmp_path / "project.yaml"
    path.write_text(yaml.safe_dump(project), encoding="utf-8")
    return path


def _fake_run(root: Path, train_rows: int, tag: str) -> None:
    """A run folder as the stages leave it, without training: data splits and a model folder."""
    (root / "model").mkdir(parents=True, exist_ok=True)
    (root / "model" / "adapter_config.json").write_text('{"r": 4}', encoding="utf-8")
    (root / "data").mkdir(exist_ok=True)
    (root / "data" / "train.jsonl").write_text(_rows(train_rows, tag), encoding="utf-8")
    (root / "data" / "val.jsonl").write_text(_rows(2, "val"), encoding="utf-8")
    (root / "data" / "test.jsonl").write_text(_rows(2, "test"), encoding="utf-8")


def _two_rounds_in_one_folder(config: Path) -> tuple[str, str]:
    """v0.0.1 registered with 161 training rows, then a later round overwrites the same folder with 165."""
    cfg = load_config(config)
    _fake_run(cfg.layout.root, 161, "round1")
    v1 = register_run(cfg, cfg.layout)
    registered = sha256_file(cfg.layout.train_file)
    _fake_run(cfg.layout.root, 165, "round2")
    register_run(cfg, cfg.layout)
    return v1, registered


def test_overwritten_parent_folder_is_refused_with_both_checksums(tmp_path):
    config = _project(tmp_path, training_data="reference")
    v1, registered = _two_rounds_in_one_folder(config)
    overwritten = sha256_file(tmp_path / "run" / "data" / "train.jsonl")
    with pytest.raises(UserError) as info:
        prepare_continuation(load_config(config, output_dir=tmp_path / "child"), f"registry://tiny@{v1}")
    message = str(info.value)
    assert registered in message and overwritten in message
    assert "161 rows" in message and "165 rows" in message
    # through the CLI: one line, exit 2, nothing trained
    result = CliRunner().invoke(
        app, ["run", str(config), "--output-dir", str(tmp_path / "child"), "--continue-from", "registry://tiny@v0.0.1"]
    )
    assert result.exit_code == 2 and registered in "".join(result.output.split())


def test_stored_parent_data_is_read_and_recorded_as_merged(tmp_path):
    config = _project(tmp_path)  # registry.training_data: store (the default), artifacts: [model, export]
    v1, registered = _two_rounds_in_one_folder(config)
    registry = registry_from_config(load_config(config))
    stored = {a["path"] for a in registry.show("tiny", v1)["artifacts"]}
    assert {"data/train.jsonl", "data/val.jsonl", "data/test.jsonl"} <= stored
    parent = parent_data(registry, f"registry://tiny@{v1}", required=("train", "test"))
    assert parent.kept == "stored" and parent.rows["train"] == 161 and parent.sha256["train"] == registered

    child_cfg, version = prepare_continuation(
        load_config(config, output_dir=tmp_path / "child"), "registry://tiny@v0.0.1"
    )
    assert version == v1 and child_cfg.train.init_from == f"registry://tiny@{v1}"
    merged_file = Path(child_cfg.data.sources[-1].path)
    assert sha256_file(merged_file) == registered
    _fake_run(tmp_path / "child", 170, "child")
    child = register_run(child_cfg, child_cfg.layout)
    info = registry.show("tiny", child)
    assert info["parent"] == v1
    (merged,) = info["metadata"]["lineage"]["merged"]
    assert merged["sha256"] == registered and merged["rows"] == 161 and merged["from"] == f"registry://tiny@{v1}"

    # a stored copy changed behind the registry's back is refused too
    store_copy = Path(info["store_path"]).parent / v1 / "data" / "train.jsonl"
    store_copy.write_text(_rows(5, "tampered"), encoding="utf-8")
    with pytest.raises(UserError, match=r"tampered|sha256"):
        parent_data(registry, f"registry://tiny@{v1}")


def _long_rows(questions: list[str]) -> str:
    return "".join(
        json.dumps(
            {
                "id": f"more-{i}",
                "messages": [
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": f"A full and careful answer about {q.lower()} for the customer."},
                ],
            }
        )
        + "\n"
        for i, q in enumerate(questions)
    )


def test_a_round_merges_new_sources_once_and_rehearses_with_dry_run(tmp_path):
    from domaintune.workflow.round import RoundOptions, run_round

    config = _project(tmp_path)
    cfg = load_config(config)
    _fake_run(cfg.layout.root, 20, "parent")
    v1 = register_run(cfg, cfg.layout)  # records qa.jsonl by sha256 as merged
    registry_from_config(cfg).promote("tiny", v1, alias="production")
    rehearse = RoundOptions(dry_run=True)
    idle = run_round(cfg, "registry://tiny@production", rehearse)
    assert idle.status == "nothing_to_do" and "no new feedback" in idle.message

    new = [
        "How do I repot a fern without hurting its roots?",
        "Which soil suits a young lemon tree in a pot?",
        "How often should an orchid be watered in winter?",
        "test question 1?",  # repeats a prompt of the parent's test set
    ]
    (tmp_path / "more.jsonl").write_text(_long_rows(new), encoding="utf-8")
    cfg2 = load_config(config, ["data.sources.+={path: more.jsonl, reader: messages}"])
    planned = run_round(cfg2, "registry://tiny@production", rehearse)
    assert planned.status == "dry_run", planned.message
    summary = planned.summary
    assert summary["rows"]["new_rows"] == 3 and summary["rows"]["parent_train"] == 20
    assert [Path(s["path"]).name for s in summary["new_sources"]] == ["more.jsonl"]
    plan = json.loads((planned.folder / "round" / "plan.json").read_text())
    assert [Path(s["path"]).name for s in plan["new_sources"]] == ["more.jsonl"]
    assert {Path(i["path"]).name for i in plan["inputs"]} == {"qa.jsonl", "more.jsonl"}
    quarantine = [json.loads(line) for line in (planned.folder / "round" / "quarantine.jsonl").open()]
    assert [q["stage"] for q in quarantine] == ["decontaminate"]
    assert not (tmp_path / "run" / "rounds" / "latest.json").exists()  # a rehearsal is not in the history
    # the same round again (after a kill, say) uses the same folder and leaves its inputs untouched
    new_rows = planned.folder / "round" / "new_train.jsonl"
    stamp = new_rows.stat().st_mtime_ns
    assert run_round(cfg2, "registry://tiny@production", rehearse).folder == planned.folder
    assert new_rows.stat().st_mtime_ns == stamp
    assert len(registry_from_config(cfg).list("tiny")) == 1
