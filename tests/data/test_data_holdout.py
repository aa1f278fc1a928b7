"""data.split.holdout_group: whole groups held out of train/val/test, decontaminated and accounted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from domaintune.config import config_from_dict
from domaintune.data.pipeline import run_data
from domaintune.errors import UserError
from domaintune.layout import RunLayout


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _inputs(tmp: Path) -> None:
    # two sources; source b's question 0 is asked again in source a (it must not be trained on)
    a = [
        {"q": f"Question about topic {i} in clinic A?", "a": f"Answer {i} from A.", "dept": f"d{i % 3}"}
        for i in range(60)
    ]
    a.append({"q": "Shared question number 4 from clinic B?", "a": "Another answer.", "dept": "d0"})
    b = [
        {"q": f"Shared question number {i} from clinic B?", "a": f"Answer {i} from B.", "dept": "d9"} for i in range(12)
    ]
    _write(tmp / "a.jsonl", a)
    _write(tmp / "b.jsonl", b)
    dates = [
        {"q": f"Ticket {i} about order {i}?", "a": f"Reply {i}.", "day": f"2024-01-{i + 1:02d}"} for i in range(20)
    ]
    dates.append({"q": "Ticket with no date?", "a": "Reply.", "day": "someday"})
    _write(tmp / "t.jsonl", dates)


def _cfg(tmp: Path, split: dict, sources: list[str] = ("a", "b")):
    fields = {"instruction": "q", "output": "a"}
    data = {
        "sources": [{"path": f"{s}.jsonl", "name": s, "fields": fields, "keep": ["dept", "day"]} for s in sources],
        "split": {"ratios": [8, 1, 1], "group_by": [], **split},
        "filters": {"outlier_sigma": None},
        "dedup": {"near": False},
        "guards": {"on_violation": "warn"},
    }
    return config_from_dict({"name": "t", "data": data}, config_path=tmp / "p.yaml")


def test_a_held_out_source_is_written_apart_decontaminated_and_accounted(tmp_path):
    _inputs(tmp_path)
    layout = RunLayout(tmp_path / "run")
    (layout.data_dir).mkdir(parents=True)
    layout.holdout_file("stale").write_text("{}\n")  # an earlier config's holdout: removed
    cfg = _cfg(tmp_path, {"holdout_group": {"field": "source", "values": ["b"], "max_rows": 10}})
    report = run_data(cfg, layout, progress=False)

    held = _read(layout.holdout_file("out_of_source"))
    assert len(held) == 10 and {r["source"] for r in held} == {"b"}
    assert not layout.holdout_file("stale").exists()
    assert set(layout.holdout_files()) == {"out_of_source"}
    splits = {s: _read(layout.split_file(s)) for s in ("train", "val", "test")}
    assert all(r["source"] == "a" for rows in splits.values() for r in rows)
    # accounting: b's 12 rows = 10 held out + 2 sampled out; the books balance with the holdout counted as kept
    b = report["sources"]["b"]
    assert b["kept"] == {"train": 0, "val": 0, "test": 0, "holdout": 10} and b["balanced"]
    assert b["dropped"] == {"sample: sampled out": 2}
    assert report["sources"]["a"]["kept"]["holdout"] == 0
    assert report["sources"]["a"]["dropped"] == {"decontaminate: prompt repeats a holdout prompt": 1}
    assert report["balanced"] and report["totals"]["kept"] == sum(len(r) for r in splits.values()) + 10
    h = report["holdout"]
    assert (h["name"], h["field"], h["rows"], h["before_sampling"]) == ("out_of_source", "source", 10, 12)
    assert h["by_source"] == {"a": 0, "b": 10} and h["rows_per_value"] == {"a": 61, "b": 12}
    assert report["funnel"][-1]["note"].endswith("holdout=10")
    # a's copy of a held-out question is dropped (decontamination against the holdout), naming what it matched
    copy = "Shared question number 4 from clinic B?"
    assert copy in {r["messages"][-2]["content"] for r in held}
    assert copy not in {r["messages"][-2]["content"] for rows in splits.values() for r in rows}
    quarantined = [json.loads(line) for line in layout.quarantine_file.read_text(encoding="utf-8").splitlines()]
    [entry] = [q for q in quarantined if q["stage"] == "decontaminate"]
    assert entry["matched_split"] == "holdout" and entry["reason"].startswith("prompt repeats a holdout prompt")
    html = layout.data_report_html.read_text(encoding="utf-8")
    assert "Held out of train/val/test" in html and "holdout_out_of_source.jsonl" in html


def test_holdout_by_a_field_value_and_by_date(tmp_path):
    _inputs(tmp_path)
    by_dept = run_data(
        _cfg(tmp_path, {"holdout_group": {"field": "dept", "values": ["d1"], "name": "dept1"}}),
        RunLayout(tmp_path / "r1"),
        progress=False,
    )
    rows = _read(RunLayout(tmp_path / "r1").holdout_file("dept1"))
    assert len(rows) == by_dept["holdout"]["rows"] == 20 and {r["dept"] for r in rows} == {"d1"}

    layout = RunLayout(tmp_path / "r2")
    cfg = _cfg(tmp_path, {"holdout_group": {"field": "day", "after": "2024-01-15"}}, sources=["t"])
    report = run_data(cfg, layout, progress=False)
    latest = _read(layout.holdout_file("out_of_source"))
    assert sorted(r["day"] for r in latest) == [f"2024-01-{d}" for d in range(16, 21)]
    assert report["sources"]["t"]["dropped"] == {"split: unparseable date in day": 1}
    assert report["sources"]["t"]["balanced"]


def test_a_holdout_that_matches_nothing_or_names_an_unknown_field_fails_clearly(tmp_path):
    _inputs(tmp_path)
    with pytest.raises(UserError, match=r"no source is named \['c'\]"):
        run_data(_cfg(tmp_path, {"holdout_group": {"field": "source", "values": ["c"]}}), RunLayout(tmp_path / "r"))
    with pytest.raises(UserError, match=r"holdout_group.field: 'ward' is neither `source` nor kept"):
        run_data(_cfg(tmp_path, {"holdout_group": {"field": "ward", "values": ["x"]}}), RunLayout(tmp_path / "r"))
    with pytest.raises(UserError, match=r"the holdout 'out_of_source' is empty: no row kept has dept in \['d7'\]"):
        run_data(_cfg(tmp_path, {"holdout_group": {"field": "dept", "values": ["d7"]}}), RunLayout(tmp_path / "r"))
    with pytest.raises(Exception, match="exactly one of `values`"):
        _cfg(tmp_path, {"holdout_group": {"field": "dept"}})
    with pytest.raises(Exception, match=r"holdout_group\.name 'test'"):
        _cfg(tmp_path, {"holdout_group": {"field": "dept", "values": ["d1"], "name": "test"}})


def _ids(path: Path) -> set[str]:
    return {r["id"] for r in _read(path)}


def test_dev_rows_are_set_aside_from_the_holdout_disjoint_seeded_and_accounted(tmp_path):
    _inputs(tmp_path)
    layout = RunLayout(tmp_path / "run")
    split = {"holdout_group": {"field": "source", "values": ["b"], "max_rows": 5, "dev_rows": 4}}
    report = run_data(_cfg(tmp_path, split), layout, progress=False)

    dev, gated = _read(layout.holdout_dev_file("out_of_source")), _read(layout.holdout_file("out_of_source"))
    assert layout.holdout_dev_file("out_of_source").name == "holdout_out_of_source_dev.jsonl"
    assert set(layout.holdout_files()) == {"out_of_source", "out_of_source_dev"}
    assert len(dev) == 4 and len(gated) == 5 and {r["source"] for r in dev + gated} == {"b"}
    assert not {r["id"] for r in dev} & {r["id"] for r in gated}
    assert not {r["messages"][-2]["content"] for r in dev} & {r["messages"][-2]["content"] for r in gated}
    # b's 12 rows: 4 dev (drawn first, from all 12) + 5 gated (max_rows caps the other 8) + 3 sampled out
    b = report["sources"]["b"]
    assert b["kept"] == {"train": 0, "val": 0, "test": 0, "holdout": 5, "holdout_dev": 4} and b["balanced"]
    assert b["dropped"] == {"sample: sampled out": 3}
    assert report["balanced"]
    h = report["holdout"]
    assert (h["rows"], h["before_sampling"], h["dev_rows"], h["dev_drawn"]) == (5, 8, 4, 4)
    assert h["dev"] == {
        "set": "out_of_source_dev",
        "file": "data/holdout_out_of_source_dev.jsonl",
        "dev_rows": 4,
        "drawn": 4,
        "rows": 4,
        "by_source": {"a": 0, "b": 4},
        "per_stratum": h["dev"]["per_stratum"],
    }
    assert report["funnel"][-1]["note"].endswith("holdout=5, holdout_dev=4")
    assert "holdout_dev" in report["decontaminate"]["by_split"]
    # no train/val/test row repeats a dev prompt: a's copy of b's question 4 is gone wherever that question went
    splits = [r for s in ("train", "val", "test") for r in _read(layout.split_file(s))]
    assert not {r["messages"][-2]["content"] for r in splits} & {r["messages"][-2]["content"] for r in dev + gated}
    html = layout.data_report_html.read_text(encoding="utf-8")
    assert "holdout_out_of_source_dev.jsonl" in html and "<th>holdout dev</th>" in html

    # the same seed draws the same dev rows; without dev_rows the dev file is removed (never a stale dev set)
    again = RunLayout(tmp_path / "again")
    run_data(_cfg(tmp_path, split), again, progress=False)
    assert _ids(again.holdout_dev_file("out_of_source")) == {r["id"] for r in dev}
    assert _ids(again.holdout_file("out_of_source")) == {r["id"] for r in gated}
    split["holdout_group"].pop("dev_rows")
    run_data(_cfg(tmp_path, split), layout, progress=False)
    assert set(layout.holdout_files()) == {"out_of_source"}


def test_dev_rows_take_whole_groups_and_must_leave_gated_rows(tmp_path):
    rows = [{"q": f"Case {i} of ward W?", "a": f"Answer {i}.", "pair": i // 2} for i in range(20)]
    rows += [{"q": f"Question {i} of ward X?", "a": f"Reply {i}.", "pair": 100 + i} for i in range(40)]
    _write(tmp_path / "w.jsonl", rows[:20])
    _write(tmp_path / "x.jsonl", rows[20:])
    fields = {"instruction": "q", "output": "a"}

    def cfg(dev_rows: int, group_by: list[str]):
        data = {
            "sources": [{"path": f"{s}.jsonl", "name": s, "fields": fields, "keep": ["pair"]} for s in ("w", "x")],
            "split": {
                "group_by": group_by,
                "holdout_group": {"field": "source", "values": ["w"], "dev_rows": dev_rows, "name": "ward"},
            },
            "filters": {"outlier_sigma": None},
            "dedup": {"near": False},
            "guards": {"on_violation": "warn"},
        }
        return config_from_dict({"name": "t", "data": data}, config_path=tmp_path / "p.yaml")

    layout = RunLayout(tmp_path / "run")
    report = run_data(cfg(6, ["pair"]), layout, progress=False)
    dev, gated = _read(layout.holdout_dev_file("ward")), _read(layout.holdout_file("ward"))
    assert len(dev) == 6 and len(gated) == 14 and report["holdout"]["dev"]["rows"] == 6
    assert not {r["pair"] for r in dev} & {r["pair"] for r in gated}  # a pair is never split
    with pytest.raises(UserError, match=r"dev_rows: 20 asked for, the held-out groups have 20 rows"):
        run_data(cfg(20, []), RunLayout(tmp_path / "r2"), progress=False)
    _write(tmp_path / "w.jsonl", [dict(r, pair=i // 10) for i, r in enumerate(rows[:20])])  # two groups of 10
    for dev_rows in (4, 19):  # no group fits in 4 rows; 19 takes both, leaving nothing for the gates
        with pytest.raises(
            UserError, match=r"cannot be set aside by whole prompt groups .*2 groups, the largest of 10"
        ):
            run_data(cfg(dev_rows, ["pair"]), RunLayout(tmp_path / "r3"), progress=False)


def test_the_cli_table_shows_the_dev_rows(tmp_path):
    from typer.testing import CliRunner

    from domaintune.cli import app

    _inputs(tmp_path)
    project = tmp_path / "p.yaml"
    project.write_text(
        "name: t\ndata:\n  sources:\n"
        + "".join(f"    - {{path: {s}.jsonl, name: {s}, fields: {{instruction: q, output: a}}}}\n" for s in "ab")
        + "  split: {group_by: [], holdout_group: {field: source, values: [b], dev_rows: 4}}\n"
        + "  filters: {outlier_sigma: null}\n  guards: {on_violation: warn}\n",
        encoding="utf-8",
    )
    res = CliRunner().invoke(app, ["data", str(project), "--output-dir", str(tmp_path / "out")], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "holdout_dev" in res.output
    assert "choose recipes on set 'out_of_source_dev'; the gates read 'out_of_source'): 4 rows" in res.output
