"""Kappa against hand-computed values; per-label, span and overall agreement; disputed fields."""

from __future__ import annotations

import pytest

from domaintune.annotate.agreement import agreement_report, disputed_fields, fleiss_kappa, kappa
from domaintune.annotate.config import LabelSpec


def test_cohen_kappa_hand_computed():
    a = ["x", "x", "y", "y", "x", "z"]
    b = ["x", "y", "y", "y", "x", "z"]
    # p_o = 5/6; p_e = (3*2 + 2*3 + 1*1) / 36 = 13/36; kappa = (30/36 - 13/36) / (23/36) = 17/23
    res = kappa([(("a", "b"), (p, q)) for p, q in zip(a, b)])
    assert res["method"] == "cohen"
    assert res["kappa"] == pytest.approx(17 / 23, abs=1e-4)
    assert res["observed"] == pytest.approx(5 / 6, abs=1e-4)


def test_fleiss_kappa_matches_the_worked_example():
    # Fleiss (1971) / Wikipedia worked example: 10 subjects, 14 raters, 5 categories -> kappa 0.2099
    table = [
        [0, 0, 0, 0, 14],
        [0, 2, 6, 4, 2],
        [0, 0, 3, 5, 6],
        [0, 3, 9, 2, 0],
        [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0],
        [3, 2, 6, 3, 0],
        [2, 5, 3, 2, 2],
        [6, 5, 2, 1, 0],
        [0, 2, 2, 3, 7],
    ]
    units = [[str(c) for c, n in enumerate(row) for _ in range(n)] for row in table]
    # P-bar = 0.37802, P-e = 0.21313 -> (0.37802 - 0.21313) / (1 - 0.21313)
    assert fleiss_kappa(units) == pytest.approx(0.2099, abs=5e-4)


def test_rotating_raters_use_fleiss_and_perfect_agreement_is_one():
    units = [(("a", "b"), ("x", "x")), (("b", "c"), ("y", "y")), (("a", "c"), ("x", "x"))]
    res = kappa(units)
    assert res["method"] == "fleiss" and res["kappa"] == pytest.approx(1.0)
    assert kappa([(("a", "b"), ("x", "x"))] * 3)["kappa"] is None  # one category only: undefined


def test_report_per_label_spans_and_overall():
    intent = LabelSpec(name="intent", kind="single", labels=["c", "d"])
    ents = LabelSpec(name="ents", kind="spans", labels=["D"], field="instruction")
    fix = LabelSpec(name="fix", kind="text", field="output")
    item = {"fields": {"instruction": "abcdef", "output": "x"}}
    pairs = [
        (
            item,
            {
                "a": {"intent": "c", "ents": [[0, 2, "D"]], "fix": "ok"},
                "b": {"intent": "c", "ents": [[0, 2, "D"]], "fix": "ok "},
            },
        ),
        (
            item,
            {
                "a": {"intent": "d", "ents": [[0, 3, "D"]], "fix": None},
                "b": {"intent": "c", "ents": [[0, 2, "D"]], "fix": "new"},
            },
        ),
        (item, {"a": {"intent": "d", "ents": []}, "b": {"intent": "d", "ents": []}}),
    ]
    rep = agreement_report([intent, ents, fix], pairs)
    # intent: p_o 2/3, a: c1 d2, b: c2 d1 -> p_e 4/9 -> kappa (6/9-4/9)/(5/9) = 0.4
    assert rep["fields"]["intent"]["kappa"] == pytest.approx(0.4, abs=1e-4)
    assert rep["fields"]["intent"]["per_label"]["c"]["kappa"] == pytest.approx(0.4, abs=1e-4)
    # spans: 18 characters, one disagrees (the 'c' of item 2); a tags D on 5, b on 4
    # p_o 17/18; p_e = (5*4 + 13*14)/324 = 202/324 -> kappa = (306-202)/(324-202) = 104/122
    assert rep["fields"]["ents"]["kappa"] == pytest.approx(104 / 122, abs=1e-4)
    assert rep["fields"]["fix"]["kappa"] is None and rep["fields"]["fix"]["observed"] == pytest.approx(
        2 / 3, abs=1e-3
    )  # item 3: both left it
    assert rep["overall_kappa"] == pytest.approx((0.4 + 104 / 122) / 2, abs=1e-3)
    assert rep["pairs"][0]["a"] == "a" and rep["pairs"][0]["units"] == 3
    assert disputed_fields([intent, ents, fix], pairs[1][1]) == ["intent", "ents", "fix"]
    assert disputed_fields([intent, ents, fix], pairs[0][1]) == []  # whitespace in text does not count
