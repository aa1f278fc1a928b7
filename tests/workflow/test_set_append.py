"""`--set key.+=value` appends to a list (a feedback export as one more data source, from the command line)."""

from __future__ import annotations

from pathlib import Path

import pytest

from domaintune.config import ConfigError, apply_override, load_config


def test_append_to_a_list_creates_and_extends():
    data: dict = {"data": {"sources": [{"path": "a.csv"}]}}
    apply_override(data, "data.sources.+={path: fb.jsonl, reader: messages}")
    apply_override(data, "data.sources+={path: c.csv}")
    assert data["data"]["sources"] == [{"path": "a.csv"}, {"path": "fb.jsonl", "reader": "messages"}, {"path": "c.csv"}]
    apply_override(data, "eval.gates.+=retention >= 0.9")  # unset: a new list
    assert data["eval"]["gates"] == ["retention >= 0.9"]
    apply_override(data, "data.sources.0.keep.+=category")  # inside a list item
    assert data["data"]["sources"][0]["keep"] == ["category"]


def test_append_refuses_a_non_list_and_index_errors_suggest_it():
    data: dict = {"seed": 1, "data": {"sources": [{"path": "a.csv"}]}}
    with pytest.raises(ConfigError, match="not a list"):
        apply_override(data, "seed.+=2")
    with pytest.raises(ConfigError, match=r"append with \+="):
        apply_override(data, "data.sources.1={path: b.csv}")


def test_appended_source_resolves_against_the_yaml(tmp_path: Path):
    config = tmp_path / "p.yaml"
    config.write_text("name: demo\ndata:\n  sources:\n    - {path: qa.jsonl}\n", encoding="utf-8")
    cfg = load_config(config, ["data.sources.+={path: feedback/sft.jsonl, reader: messages}"])
    assert [s.path for s in cfg.data.sources] == [tmp_path / "qa.jsonl", tmp_path / "feedback" / "sft.jsonl"]
    assert cfg.data.sources[1].reader == "messages"
