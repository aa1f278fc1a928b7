from pathlib import Path

import pytest
from typer.testing import CliRunner

from domaintune.cli import app
from domaintune.config import ConfigError, apply_override, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "project.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_and_relative_paths(tmp_path):
    cfg = load_config(write(tmp_path, "name: demo\nmodel:\n  cache_dir: cache\n"))
    assert cfg.output_dir == tmp_path / "runs" / "demo"
    assert cfg.model.cache_dir == tmp_path / "cache"
    assert cfg.model.name_or_path == "smollm2-135m-instruct"


def test_set_overrides_parse_yaml_values(tmp_path):
    cfg = load_config(write(tmp_path, "name: demo\n"), ["seed=7", "model.name_or_path=tiny-random-llama"])
    assert cfg.seed == 7 and cfg.model.name_or_path == "tiny-random-llama"


def test_set_override_into_list_by_index():
    data = {"data": {"sources": [{"path": "a.csv"}, {"path": "b.csv"}]}}
    apply_override(data, "data.sources.1.path=c.csv")
    assert data["data"]["sources"][1]["path"] == "c.csv"
    with pytest.raises(ConfigError, match="not an index"):
        apply_override(data, "data.sources.5.path=x")


def test_unknown_key_names_dotted_path(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "name: demo\nmodel:\n  nmae_or_path: x\n"))
    assert "model.nmae_or_path: unknown key" in str(info.value)


def test_wrong_type_names_field_and_expected(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "name: demo\n"), ["seed=abc"])
    message = str(info.value)
    assert "seed:" in message and "integer" in message and "'abc'" in message


def test_output_dir_option_wins(tmp_path):
    cfg = load_config(write(tmp_path, "name: demo\noutput_dir: elsewhere\n"), output_dir=tmp_path / "cli")
    assert cfg.output_dir == (tmp_path / "cli").resolve()


def test_cli_validate_reports_bad_field_with_exit_2(tmp_path):
    path = write(tmp_path, "name: demo\nmodel:\n  dtype: float64\n")
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert "model.dtype" in result.output


def test_cli_reference_lists_every_section():
    result = CliRunner().invoke(app, ["config-reference"])
    assert result.exit_code == 0
    for section in ("model.name_or_path", "`data`", "`train`", "`eval`", "`export`", "`serve`"):
        assert section in result.output


def test_docs_config_reference_is_current():
    """docs/config-reference.md is generated; regenerate with `domaintune config-reference > docs/config-reference.md`."""
    from domaintune.config_reference import render_reference

    committed = (Path(__file__).resolve().parents[2] / "docs" / "config-reference.md").read_text(encoding="utf-8")
    assert committed.strip() == render_reference().strip()
