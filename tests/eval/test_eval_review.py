"""Blind review round trip: export pairs in random A/B order, reviewers fill files, import un-blinds them."""

from __future__ import annotations

import csv
import json

import pytest

from domaintune.errors import UserError
from domaintune.eval.review import export_review, import_review
from domaintune.layout import RunLayout
from domaintune.utils.io import write_jsonl


@pytest.fixture()
def run_dir(tmp_path):
    rows = [
        {
            "set": "test",
            "id": f"i{k}",
            "prompt": [{"role": "user", "content": f"问题{k}：头痛怎么办？"}],
            "reference": f"参考答案{k}",
            "answers": {"base": f"first answer {k}", "tuned": f"second answer {k}"},
            "scores": {},
        }
        for k in range(1, 5)
    ] + [
        {
            "set": "general",
            "id": "g1",
            "prompt": [{"role": "user", "content": "hi"}],
            "reference": "hello",
            "answers": {"base": "x", "tuned": "y"},
            "scores": {},
        }
    ]
    write_jsonl(tmp_path / "eval" / "items.jsonl", rows)
    return tmp_path


def _letter(key, item, model):
    mapping = key["items"][item]
    return "A" if mapping["A"] == model else "B"


def test_export_is_blind_and_keyed(run_dir):
    out = export_review(RunLayout(run_dir), n_items=10, seed=3)
    assert out["n_items"] == 4  # general items are not exported
    key = json.loads((run_dir / "eval/review/review_key.json").read_text())
    assert set(key["items"]) == {"i1", "i2", "i3", "i4"}
    assert {frozenset(m.values()) for m in key["items"].values()} == {frozenset({"base", "tuned"})}
    html = (run_dir / "eval/review/review.html").read_text()
    csv_text = (run_dir / "eval/review/review.csv").read_text(encoding="utf-8-sig")
    for text in (html, csv_text):
        assert "base" not in text and "tuned" not in text  # model names never shown to reviewers
        assert "问题1：头痛怎么办？" in text
        assert "参考答案1" not in text  # reference hidden unless show_reference
    assert "Download CSV" in html and "new Blob" in html and key["review_id"] in html
    # the order is random per item but the CSV shows each item's A and B as the key says
    for row in csv.DictReader(csv_text.splitlines()):
        mapping = key["items"][row["item_id"]]
        k = row["item_id"][1:]
        assert row["answer_a"] == {"base": f"first answer {k}", "tuned": f"second answer {k}"}[mapping["A"]]


def test_round_trip_win_rates_and_kappa(run_dir, tmp_path):
    export_review(RunLayout(run_dir), n_items=10, seed=5)
    review = run_dir / "eval" / "review"
    key = json.loads((review / "review_key.json").read_text())
    # reviewer 1 (the HTML form's download format)
    r1 = {"i1": "tuned", "i2": "tuned", "i3": "tuned", "i4": "base"}
    lines = ["review_id,item_id,reviewer,choice,comment"]
    lines += [f"{key['review_id']},{i},ann,{_letter(key, i, m)}," for i, m in r1.items()]
    (review / "review-ann.csv").write_text("\ufeff" + "\r\n".join(lines) + "\r\n", encoding="utf-8")
    # reviewer 2 (the exported spreadsheet with the choice column filled; name from the file name)
    r2 = {"i1": "tuned", "i2": "tuned", "i3": "base", "i4": "tie"}
    with (review / "review.csv").open(encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        m = r2[row["item_id"]]
        row["choice"] = "tie" if m == "tie" else _letter(key, row["item_id"], m).lower()
    with (review / "bob.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    result = import_review([review / "review-ann.csv", review / "bob.csv"])
    assert result["reviewers"] == {"ann": 4, "bob": 4}
    # per-item tuned outcome (win 1, tie .5): i1 1, i2 1, i3 .5, i4 .25 -> 0.6875
    assert result["win_rates"]["tuned"]["win_rate"] == pytest.approx(0.6875)
    assert result["win_rates"]["base"]["win_rate"] == pytest.approx(0.3125)
    assert result["win_rates"]["tuned"]["wins"] == 5 and result["win_rates"]["tuned"]["ties"] == 1
    lo, hi = result["win_rates"]["tuned"]["ci_low"], result["win_rates"]["tuned"]["ci_high"]
    assert 0.25 <= lo <= 0.6875 <= hi <= 1.0
    # kappa: p_o = 2/4; p_e = (3*2 + 1*1)/16 = 7/16 -> (0.5 - 0.4375) / 0.5625 = 1/9
    (pair,) = result["agreement"]
    assert pair["kappa"] == pytest.approx(1 / 9)
    assert any("< 0.85" in w for w in result["warnings"])

    # reviewers that agree: kappa 1, no warning
    agree = import_review(
        [review / "review-ann.csv", _copy_as(review / "review-ann.csv", tmp_path / "x.csv", "ann", "cy")],
        key_path=review / "review_key.json",
    )
    assert agree["agreement"][0]["kappa"] == pytest.approx(1.0)
    assert agree["warnings"] == []


def _copy_as(src, dst, old, new):
    dst.write_text(src.read_text(encoding="utf-8").replace(f",{old},", f",{new},"), encoding="utf-8")
    return dst


def test_import_errors_name_file_and_line(run_dir):
    export_review(RunLayout(run_dir), n_items=10, seed=1)
    review = run_dir / "eval" / "review"
    key = json.loads((review / "review_key.json").read_text())
    bad = review / "bad.csv"
    bad.write_text(f"review_id,item_id,reviewer,choice\n{key['review_id']},i1,z,A\n{key['review_id']},i2,z,maybe\n")
    with pytest.raises(UserError, match=r"bad.csv:3: choice 'maybe'"):
        import_review([bad])
    other = review / "other.csv"
    other.write_text("review_id,item_id,reviewer,choice\nffff,i1,z,A\n")
    with pytest.raises(UserError, match="does not match"):
        import_review([other])
    unknown = review / "unknown.csv"
    unknown.write_text("item_id,choice\nnope,A\n")
    with pytest.raises(UserError, match="'nope' is not in"):
        import_review([unknown])
    with pytest.raises(UserError, match="run `domaintune eval"):
        export_review(RunLayout(run_dir / "missing"))
