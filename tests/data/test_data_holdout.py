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
