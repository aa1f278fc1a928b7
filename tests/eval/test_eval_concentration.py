"""The template-learning alarm on hand-made per-item scores."""

from __future__ import annotations

import numpy as np
import pytest

from domaintune.eval.concentration import gain_concentration
from domaintune.eval.config import ConcentrationConfig

CFG = ConcentrationConfig()


def _ids(n: int) -> list[str]:
    return [f"i{k:02d}" for k in range(n)]


def test_a_gain_from_a_few_items_sounds_the_alarm_and_lists_them():
    # 40 items: 4 gain 40 points each (160), 36 gain 1 point each (36): 82% of the gain from 10% of the items
    base = np.full(40, 20.0)
    model = base + np.r_[np.full(4, 40.0), np.full(36, 1.0)]
    out = gain_concentration(base, model, _ids(40), None, CFG, samples=200)
    items = out["items"]
    assert out["flagged"] and items["flagged"]
    # the fewest items past half of 196: two (80) are not enough, three (120) are
    assert items["k"] == 3 and items["ids"] == ["i00", "i01", "i02"]
    assert items["share_of_gain"] == pytest.approx(120 / 196) and items["share_of_items"] == pytest.approx(3 / 40)
    w = items["without"]
    assert w["n"] == 37 and w["delta"] == pytest.approx((40 + 36) / 37)
    assert w["ci_low"] <= w["delta"] <= w["ci_high"]
    assert out["gain"] == pytest.approx(196 / 40) and out["stratum"] is None
    assert out["reasons"] == ["61% of the gain comes from 3 of 40 items (8%)"]


def test_a_broad_gain_is_not_flagged():
    rng = np.random.default_rng(0)
    base = rng.uniform(10, 30, 40)
    model = base + rng.uniform(2, 4, 40)  # every item gains about the same
    out = gain_concentration(base, model, _ids(40), ["a", "b"] * 20, CFG, samples=200)
    assert not out["flagged"] and not out["items"]["flagged"] and not out["stratum"]["flagged"]
    assert out["items"]["share_of_items"] >= 0.25 and "without" not in out["items"]


def test_one_minority_stratum_bringing_most_of_the_gain_is_flagged_with_the_gain_without_it():
    # stratum "treatment" (10 of 40 items) gains 12 each = 120; the other 30 gain 2 each = 60
    strata = ["treatment"] * 10 + ["symptoms"] * 15 + ["causes"] * 15
    base = np.zeros(40)
    model = np.r_[np.full(10, 12.0), np.full(30, 2.0)]
    out = gain_concentration(base, model, _ids(40), strata, CFG, samples=200)
    s = out["stratum"]
    assert s["flagged"] and s["value"] == "treatment" and s["share_of_gain"] == pytest.approx(120 / 180)
    assert s["without"]["delta"] == pytest.approx(2.0) and s["without"]["n"] == 30
    assert list(s["by_stratum"]) == ["treatment", "causes", "symptoms"]
    # the items rule needs 8 of 40 items (20%) to pass half of the gain: flagged too
    assert out["items"]["k"] == 8 and out["items"]["flagged"]
    # a stricter item threshold leaves only the stratum alarm
    strict = gain_concentration(base, model, _ids(40), strata, ConcentrationConfig(max_item_share=0.2), samples=200)
    assert strict["flagged"] and not strict["items"]["flagged"] and strict["stratum"]["flagged"]


def test_a_majority_stratum_or_no_gain_is_not_an_alarm():
    strata = ["big"] * 12 + ["small"] * 28
    base = np.zeros(40)
    model = np.r_[np.full(12, 3.0), np.full(28, 1.0)]  # the big stratum brings 56% of the gain with 30% of items
    out = gain_concentration(base, model, _ids(40), strata, CFG, samples=200)
    assert out["stratum"]["share_of_gain"] == pytest.approx(36 / 64) and not out["stratum"]["flagged"]
    assert out["stratum"]["share_of_items"] == pytest.approx(0.3) and not out["flagged"]
    worse = gain_concentration(model, base, _ids(40), strata, CFG)
    assert not worse["flagged"] and worse["items"] is None and worse["reasons"][0].startswith("no positive")


def test_a_few_large_gains_among_losses_are_flagged():
    # the mean gain is positive only thanks to two items; the rest lose a little
    base = np.full(20, 50.0)
    model = base + np.r_[[30.0, 30.0], np.full(18, -2.0)]
    out = gain_concentration(base, model, _ids(20), None, CFG, samples=200)
    assert out["items"]["k"] == 1 and out["flagged"]
    assert out["items"]["without"]["delta"] < 0 < out["gain"]


def test_misaligned_inputs_are_refused():
    with pytest.raises(ValueError, match="aligned"):
        gain_concentration([1.0, 2.0], [1.0], ["a", "b"], None, CFG)
