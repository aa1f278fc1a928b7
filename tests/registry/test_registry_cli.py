"""`domaintune registry ...` end to end through the real CLI (typer runner, real SQLite file)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from domaintune.cli import app

runner = CliRunner()


def _project(tmp_path: Path) -> Path:
    run = tmp_path / "runs" / "med"
    (run / "model").mkdir(parents=True)
    (run / "model" / "adapter_config.json").write_text('{"r": 4}')
    (run / "model" / "adapter_model.safetensors").write_bytes(b"\x00" * 1024)
    (run / "data").mkdir()
    (run / "data" / "train.jsonl").write_text('{"id": "1", "messages": []}\n')
    config = tmp_path / "med.yaml"
    config.write_text("name: med\noutput_dir: runs/med\nregistry: {name: med}\n", encoding="utf-8")
    return config


def _said(result) -> str:
    """The command's output as one line: rich wraps console text at the terminal width (COLUMNS)."""
    return " ".join(result.output.split())


def _ok(args: list[str]):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def test_registry_commands_round_trip(tmp_path):
    config = str(_project(tmp_path))
    _ok(["registry", "register", config])
    _ok(["registry", "register", config, "--bump", "minor", "--status", "candidate"])
    listed = json.loads(_ok(["registry", "list", "-c", config, "--json"]).stdout)
    v1, v2 = (row["version"] for row in listed)
    assert v1.startswith("v0.0.1_") and v2.startswith("v0.1.0_")
    assert listed[0]["status"] == "registered" and listed[1]["status"] == "candidate"

    _ok(["registry", "promote", "v0.0.1", "--alias", "production", "-c", config])
    _ok(["registry", "promote", v2, "--alias", "production", "-c", config])
    shown = json.loads(_ok(["registry", "show", "production", "-c", config, "--json"]).stdout)
    assert shown["version"] == v2 and shown["aliases"] == ["production"]
    assert shown["metadata"]["lineage"]["parent_version"] is None  # both trained from the base model

    rolled = _ok(["registry", "rollback", "production", "-c", config])
    assert v1 in _said(rolled)
    assert json.loads(_ok(["registry", "show", "production", "-c", config, "--json"]).stdout)["version"] == v1

    diff = json.loads(_ok(["registry", "diff", v1, v2, "-c", config, "--json"]).stdout)
    assert diff["status"] == {"a": "registered", "b": "candidate"}
    _ok(["registry", "archive", v2, "--reason", "superseded", "-c", config])
    db = tmp_path / "runs" / "registry" / "registry.db"
    assert db.is_file()
    by_url = json.loads(_ok(["registry", "list", "--url", f"sqlite:///{db}", "--json"]).stdout)
    assert [r["status"] for r in by_url] == ["registered", "archived"]

    # a tampered stored file: verify exits 1, and a promoted alias refuses to resolve
    stored = Path(shown["store_path"].replace(v2, v1)) / "model" / "adapter_model.safetensors"
    stored.write_bytes(b"\x01" * 1024)
    result = runner.invoke(app, ["registry", "verify", "production", "-c", config])
    assert result.exit_code == 1 and "adapter_model.safetensors" in _said(result)


def test_registry_errors_are_one_line_exit_2(tmp_path):
    config = str(_project(tmp_path))
    result = runner.invoke(app, ["registry", "show", "v9.9.9", "-c", config])
    assert result.exit_code == 2
    result = runner.invoke(app, ["registry", "list"])
    assert result.exit_code == 2 and "--config" in _said(result)
    _ok(["registry", "register", config])
    result = runner.invoke(app, ["registry", "rollback", "production", "-c", config])
    assert result.exit_code == 2 and "not set" in _said(result)
