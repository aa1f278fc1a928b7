"""Bootstrap intervals, Cohen's kappa, gates and perturbations."""

from __future__ import annotations

import numpy as np
import pytest

from domaintune.eval.gates import evaluate_gates, parse_gate
from domaintune.eval.perturb import perturb_prompt
from domaintune.eval.stats import cohen_kappa, paired_bootstrap_delta, wilson_interval


def test_bootstrap_constant_shift_has_zero_width_interval():
    a = [10.0, 20.0, 30.0, 40.0]
    b = [12.0, 22.0, 32.0, 42.0]
    d = paired_bootstrap_delta(a, b, samples=500, seed=1)
    # Paired: every resample sees the same +2, whatever the spread of the items themselves.
    assert d["delta"] == pytest.approx(2.0)
    assert d["ci_low"] == pytest.approx(2.0) and d["ci_high"] == pytest.approx(2.0)


def test_bootstrap_is_seeded_and_covers_the_delta():
    rng = np.random.default_rng(0)
    a = rng.normal(50, 10, 200)
    b = a + rng.normal(3, 5, 200)
    d1 = paired_bootstrap_delta(a, b, samples=1000, seed=7)
    d2 = paired_bootstrap_delta(a, b, samples=1000, seed=7)
    assert d1 == d2
    assert d1["ci_low"] < d1["delta"] < d1["ci_high"]
    # The normal-theory interval for a paired mean difference: delta +- 1.96 * sd / sqrt(n)
    diff = b - a
    half = 1.96 * diff.std(ddof=1) / np.sqrt(diff.size)
    assert d1["ci_high"] - d1["ci_low"] == pytest.approx(2 * half, rel=0.15)
    assert d1["ci_low"] > 0  # a true +3 effect over 200 items is detected


def test_bootstrap_custom_statistic_and_errors():
    # rows (nll_sum, tokens): perplexity = exp(sum / sum)
    a = [(2.0, 2), (4.0, 2)]
    b = [(1.0, 2), (3.0, 2)]
    ppl = lambda r: float(np.exp(r[:, 0].sum() / r[:, 1].sum()))  # noqa: E731
    d = paired_bootstrap_delta(a, b, samples=200, seed=0, stat=ppl)
    assert d["delta"] == pytest.approx(np.exp(1.0) - np.exp(1.5))
    with pytest.raises(ValueError, match="aligned"):
        paired_bootstrap_delta([1, 2], [1, 2, 3])


def test_cohen_kappa_by_hand():
    # 10 items; agreement on 7. Rater 1: A x5, B x5; rater 2: A x4, B x6.
    r1 = ["A", "A", "A", "A", "A", "B", "B", "B", "B", "B"]
    r2 = ["A", "A", "A", "B", "B", "B", "B", "B", "B", "A"]
    # p_o = 7/10; p_e = (5*4 + 5*6)/100 = 0.5; kappa = (0.7-0.5)/0.5 = 0.4
    assert cohen_kappa(r1, r2) == pytest.approx(0.4)
    assert cohen_kappa(r1, r1) == pytest.approx(1.0)
    assert cohen_kappa(["A", "A"], ["A", "A"]) is None  # undefined: a single category
    assert cohen_kappa([], []) is None


def test_wilson_interval():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)


def test_parse_gate_accepts_rules_and_rejects_code():
    g = parse_gate("rougeL_char_delta >= 2")
    assert (g.name, g.op, g.threshold) == ("rougeL_char_delta", ">=", 2.0)
    assert parse_gate("retention>=95%").threshold == pytest.approx(0.95)
    assert parse_gate("general.tuned.perplexity < 1e3").threshold == 1000.0
    for bad in ("__import__('os').system('x') > 1", "rougeL >> 2", "retention >= high", "", "a >= 1 and b < 2"):
        with pytest.raises(ValueError, match="gate"):
            parse_gate(bad)


def test_evaluate_gates_reports_which_failed():
    values = {"rougeL_char_delta": 3.2, "retention": 0.91, "judge_score": None}
    out = evaluate_gates(["rougeL_char_delta >= 2", "retention >= 0.95", "judge_score >= 3", "rogue_delta > 0"], values)
    assert not out["passed"]
    assert [r["passed"] for r in out["results"]] == [True, False, False, False]
    assert out["failures"][0] == "retention >= 0.95: got retention = 0.91"
    assert "not measured" in out["failures"][1]
    assert "unknown metric 'rogue_delta'" in out["failures"][2]
    assert evaluate_gates([], values) == {"passed": True, "failures": [], "results": []}


def test_config_rejects_bad_gate_and_unknown_key():
    from domaintune.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match=r"eval\.gates"):
        config_from_dict({"name": "x", "eval": {"gates": ["retention => 0.9"]}})
    with pytest.raises(ConfigError, match=r"eval\.max_item"):
        config_from_dict({"name": "x", "eval": {"max_item": 3}})
    with pytest.raises(ConfigError, match="exactly one of"):
        config_from_dict({"name": "x", "eval": {"models": [{"name": "m"}]}})
    cfg = config_from_dict({"name": "x", "eval": {"max_items": 3, "gates": ["retention >= 0.9"]}})
    assert cfg.eval.max_items == 3 and cfg.eval.decoding.temperature == 0.0


@pytest.mark.parametrize("kind", ["typo", "width", "whitespace"])
def test_perturbations_change_only_the_last_user_message(kind):
    prompt = [
        {"role": "system", "content": "你是医生。"},
        {"role": "user", "content": "我最近头痛，血压140/90，需要吃药吗？"},
    ]
    out1 = perturb_prompt(prompt, kind, seed=3, rate=0.1)
    out2 = perturb_prompt(prompt, kind, seed=3, rate=0.1)
    assert out1 == out2  # deterministic
    assert out1[0] == prompt[0]
    assert out1[1]["content"] != prompt[1]["content"]
    assert prompt[1]["content"] == "我最近头痛，血压140/90，需要吃药吗？"  # input untouched
    if kind == "whitespace":
        assert "".join(out1[1]["content"].split()) == "".join(prompt[1]["content"].split())
    if kind == "width":
        import unicodedata

        assert unicodedata.normalize("NFKC", out1[1]["content"]).replace(",", "，") == unicodedata.normalize(
            "NFKC", prompt[1]["content"]
        ).replace(",", "，")
