"""Every input row is accounted for, also on deliberately broken inputs; --strict names file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from domaintune.cli import app
from domaintune.config import config_from_dict
from domaintune.data.pipeline import run_data
from domaintune.errors import UserError
from domaintune.layout import RunLayout

BROKEN_JSONL = (
    '{"q": "What is asthma?", "a": "A lung disease."}\n'
    '{"q": "broken line", "a": \n'  # invalid JSON
    '["not", "an", "object"]\n'
    "\n"
    '{"q": "What is gout?", "a": "A type of arthritis."}\n'
)


def broken_csv_bytes() -> bytes:
    good = b"q,a\nWhat is flu?,A viral infection.\n"
    wrong_cols = b"too,many,columns\n"
    undecodable = b"What is \xff\xfe?,bad bytes\n"
    tail = "What is 咳嗽?,Coughing.\n".encode()
    return good + wrong_cols + undecodable + tail


def setup_inputs(tmp: Path) -> None:
    (tmp / "in.jsonl").write_text(BROKEN_JSONL, encoding="utf-8")
    (tmp / "in.csv").write_bytes(broken_csv_bytes())


def cfg(tmp: Path, **top):
    fields = {"instruction": "q", "output": "a"}
    data = {
        "sources": [
            {"path": "in.jsonl", "fields": fields},
            {"path": "in.csv", "name": "csv", "encoding": "utf-8", "fields": fields},
        ],
        "split": {"ratios": [1, 0, 0]},
        "filters": {"outlier_sigma": None},
    }
    return config_from_dict({"name": "t", "data": data, **top}, config_path=tmp / "p.yaml")


def test_broken_inputs_are_quarantined_and_balanced(tmp_path):
    setup_inputs(tmp_path)
    report = run_data(cfg(tmp_path), RunLayout(tmp_path / "run"), progress=False)
    j, c = report["sources"]["in"], report["sources"]["csv"]
    assert j["input"] == 4 and j["kept_total"] == 2 and j["balanced"]
    assert j["dropped"] == {"parse: invalid JSON": 1, "parse: expected a JSON object, got list": 1}
    assert c["input"] == 4 and c["kept_total"] == 2 and c["balanced"]
    assert c["dropped"] == {"parse: wrong column count": 1, "parse: undecodable bytes as utf-8 at byte 8": 1}
    q = [json.loads(line) for line in (tmp_path / "run" / "data" / "quarantine.jsonl").read_text().splitlines()]
    where = {(Path(e["file"]).name, e["loc"]): e["reason"] for e in q}
    assert where[("in.jsonl", "line 2")].startswith("invalid JSON")
    assert where[("in.jsonl", "line 3")] == "expected a JSON object, got list"
    assert where[("in.csv", "line 3")] == "wrong column count: expected 2, got 3"
    assert where[("in.csv", "line 4")].startswith("undecodable bytes")
    assert report["totals"] == {"input": 8, "kept": 4, "dropped": 4, "quarantined": 4}
    html = (tmp_path / "run" / "data" / "report.html").read_text()
    assert "balanced" in html and "data:image/png;base64," in html
    # every kept row is in exactly one output file
    kept = sum(
        len((tmp_path / "run" / "data" / f"{s}.jsonl").read_text().splitlines()) for s in ("train", "val", "test")
    )
    assert kept == 4


def test_strict_names_file_and_line(tmp_path):
    setup_inputs(tmp_path)
    with pytest.raises(UserError, match=r"in\.jsonl: line 2: invalid JSON"):
        run_data(cfg(tmp_path), RunLayout(tmp_path / "run"), strict=True, progress=False)


def test_cli_data_command_with_overrides_and_strict(tmp_path):
    setup_inputs(tmp_path)
    project = tmp_path / "p.yaml"
    project.write_text(
        "name: t\ndata:\n  sources:\n    - {path: in.csv, name: csv, fields: {instruction: q, output: a}}\n"
        "  split: {ratios: [1, 0, 0]}\n",
        encoding="utf-8",
    )
    runner = CliRunner()
    out_dir = tmp_path / "out"
    res = runner.invoke(
        app,
        [
            "data",
            str(project),
            "--output-dir",
            str(out_dir),
            "--workers",
            "2",
            "--set",
            "data.filters.outlier_sigma=null",
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads((out_dir / "data" / "report.json").read_text())
    assert report["balanced"] and report["workers"] == 2 and report["sources"]["csv"]["input"] == 4
    res = runner.invoke(app, ["data", str(project), "--output-dir", str(out_dir), "--strict"])
    assert res.exit_code == 2
    # the console wraps the one error line at its width, anywhere in the (tmp) path or the words: compare
    # the text without its whitespace, so the check does not depend on the terminal or the tmp folder
    assert _flat("in.csv: line 3: wrong column count: expected 2, got 3 (--strict)") in _flat(res.output)
    res = runner.invoke(app, ["data", str(project), "--set", "data.split.by=stratified"])
    assert res.exit_code == 2 and _flat("by: stratified needs stratify_field") in _flat(res.output)


def _flat(text: str) -> str:
    """`text` without any whitespace: the same for every width the console may wrap it at."""
    return "".join(text.split())


def test_unknown_stratify_field_is_a_clear_error(tmp_path):
    setup_inputs(tmp_path)
    c = cfg(tmp_path)
    c.data.split = c.data.split.model_copy(update={"by": "stratified", "stratify_field": "department"})
    with pytest.raises(UserError, match="stratify_field: 'department' is not kept"):
        run_data(c, RunLayout(tmp_path / "run"), progress=False)
