"""Exit codes every command keeps: 1 = an eval gate rejected the model, 2 = configuration/user error,
3 = a stage crashed. A script can tell a rejected model from a broken run."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from domaintune.cli import app, main
from domaintune.workflow.pipeline import RunResult


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "model": {"name_or_path": "tiny-random-llama"}}), encoding="utf-8")
    return path


def _invoke(args: list[str]):
    return CliRunner().invoke(app, args, env={"COLUMNS": "40"})


def test_configuration_error_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain: {max_steps: -3}\n", encoding="utf-8")
    result = _invoke(["run", str(bad)])
    assert result.exit_code == 2, result.output


def test_gate_rejection_exits_1(tmp_path, monkeypatch):
    def rejected(cfg, *args, **kwargs):
        return RunResult(tmp_path, [], False, ["rougeL_char_delta >= 1000"], None)

    monkeypatch.setattr("domaintune.workflow.pipeline.run_pipeline", rejected)
    monkeypatch.setattr("domaintune.workflow.summary.write_summary_html", lambda result: tmp_path / "s.html")
    result = _invoke(["run", str(_config(tmp_path))])
    assert result.exit_code == 1, result.output


def test_stage_crash_exits_3_not_1(tmp_path, monkeypatch):
    def crash(cfg, *args, **kwargs):
        raise AttributeError("'Qwen2ForCausalLM' object has no attribute 'merge_and_unload'")

    monkeypatch.setattr("domaintune.workflow.pipeline.run_pipeline", crash)
    result = _invoke(["run", str(_config(tmp_path))])
    assert result.exit_code == 3, result.output
    assert "crashed (AttributeError" in result.output


def test_an_exception_outside_any_command_wrapper_exits_3(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("domaintune.cli.app", broken)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 3
