"""eval.sets on the tiny model: several named sets side by side, each with deltas, alarm and gates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from domaintune.config import config_from_dict
from domaintune.errors import UserError
from domaintune.eval.runner import run_eval
from domaintune.layout import RunLayout
from domaintune.utils.io import read_jsonl


def _row(i: str, q: str, a: str, **extra) -> dict:
    return {"id": i, "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], **extra}


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path_factory.mktemp("setsrun")
    layout = RunLayout(run)
    layout.data_dir.mkdir()
    depts = ["内科", "心内科", "内科", "内分泌科", "内科", "心内科"]
    _write(
        layout.test_file,
        [_row(f"t{k}", f"问题{k}：头痛怎么办？", f"多休息{k}。", department=d) for k, d in enumerate(depts)],
    )
    _write(
        layout.holdout_file("out_of_source"),
        [_row(f"h{k}", f"Question {k}: what helps a cough?", f"Rest and fluids {k}.") for k in range(4)],
    )
    _write(layout.train_file, [_row("r1", "完全不同的训练问题是什么？", "训练答案。")])
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(layout.model_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(layout.model_dir)
    return run


def _cfg(run: Path, **eval_overrides):
    section = {
        "decoding": {"max_new_tokens": 4, "batch_size": 8},
        "metrics": ["rouge", "chrf"],
        "robustness": {"enabled": False},
        "bootstrap_samples": 200,
        "primary_metric": "chrf",
        "engine": "transformers",
        **eval_overrides,
    }
    return config_from_dict(
        {"name": "t", "output_dir": str(run), "model": {"name_or_path": "tiny-random-llama"}, "eval": section}
    )


def test_two_sets_side_by_side_with_a_gate_on_the_second(run_dir):
    gates = [
        "chrf_delta_ci_high < 1e12",  # un-prefixed: still the test set
        "sets.out_of_source.chrf_delta_ci_high < 1e12",
        "sets.out_of_source.tuned.chrf >= 0",
        "sets.out_of_source.gain_concentrated <= 1",
        "sets.out_of_source.chrf_delta > 1000",  # fails: the second set's gate is checked on its own numbers
    ]
    report = run_eval(_cfg(run_dir, gates=gates), RunLayout(run_dir))
    sets = report["sets"]
    assert list(sets) == ["test", "out_of_source"]  # default: test, then the data stage's holdouts
    assert (sets["test"]["kind"], sets["out_of_source"]["kind"]) == ("in_distribution", "out_of_source")
    oos = sets["out_of_source"]
    assert oos["n_items"] == 4 and oos["file"].endswith("holdout_out_of_source.jsonl")
    assert set(oos["metrics"]) == {"base", "tuned"} and "chrf" in oos["metrics"]["tuned"]
    d = oos["deltas"]["tuned"]["chrf"]
    assert d["n"] == 4 and d["delta"] == pytest.approx(oos["metrics"]["tuned"]["chrf"] - oos["metrics"]["base"]["chrf"])
    assert oos["metrics"] == report["metrics"]["out_of_source"]  # the old per-set tables stay
    assert oos["contamination"]["overlaps"] == 0 and oos["retention"] is None
    alarm = oos["concentration"]["tuned"]
    assert alarm["metric"] == "chrf" and alarm["n"] == 4 and isinstance(alarm["flagged"], bool)
    assert sets["test"]["concentration"]["tuned"]["stratum_field"] == "department"
    # gate names: the second set by prefix; the test set both ways
    values = report["gate_values"]
    assert values["sets.out_of_source.chrf_delta"] == d["delta"]
    assert values["sets.test.chrf_delta_ci_low"] == values["chrf_delta_ci_low"]
    assert values["sets.out_of_source.gain_concentrated"] in (0.0, 1.0)
    results = {r["gate"]: r["passed"] for r in report["gates"]["results"]}
    assert results == dict.fromkeys(gates[:4], True) | {gates[4]: False}
    assert report["gates"]["failures"] == [f"{gates[4]}: got sets.out_of_source.chrf_delta = {d['delta']:.4g}"]
    html = (run_dir / "eval" / "report.html").read_text(encoding="utf-8")
    assert "Sets side by side" in html and "out_of_source set" in html and "Template-learning alarm" in html
    assert {r["set"] for r in read_jsonl(run_dir / "eval" / "items.jsonl")} == {"test", "out_of_source"}


def test_named_sets_from_a_csv_file_and_every_set_is_checked_against_training(run_dir, tmp_path):
    csv_file = tmp_path / "other.csv"
    csv_file.write_text(
        "instruction,input,output,category\nWhat is a fever?,,A raised temperature.,a\nAnd a rash?,On the arm,Skin.,b\n"
        "完全不同的训练问题是什么？,,copied.,a\n",
        encoding="utf-8",
    )
    sets = [{"name": "test", "max_items": 3}, {"name": "clinic_b", "file": str(csv_file), "max_items": 2}]
    report = run_eval(_cfg(run_dir, sets=sets, stratum_field="department"), RunLayout(run_dir))
    assert list(report["sets"]) == ["test", "clinic_b"]
    b = report["sets"]["clinic_b"]
    assert (b["kind"], b["n_items"]) == ("out_of_source", 2) and "chrf" in b["deltas"]["tuned"]
    assert b["concentration"]["tuned"]["stratum_field"] is None  # department is a test-set field only
    assert report["sets"]["test"]["n_items"] == 3
    # the third CSV row repeats a training prompt: refused, naming the set, before any model loads
    sets[1]["max_items"] = 3
    with pytest.raises(UserError, match=r"1 clinic_b prompt\(s\) were seen in training \(clinic_b other-4 ~ train r1"):
        run_eval(_cfg(run_dir, sets=sets), RunLayout(run_dir))


def test_set_configuration_errors_are_named(run_dir):
    with pytest.raises(Exception, match=r"eval\.sets must list `test`"):
        _cfg(run_dir, sets=[{"name": "out_of_source"}])
    with pytest.raises(Exception, match="duplicate names"):
        _cfg(run_dir, sets=[{"name": "test"}, {"name": "test"}])
    with pytest.raises(Exception, match="set name 'a-b'"):
        _cfg(run_dir, sets=[{"name": "test"}, {"name": "a-b"}])
    with pytest.raises(UserError, match=r"set 'elsewhere': .*holdout_elsewhere.jsonl does not exist .*holdout_group"):
        run_eval(_cfg(run_dir, sets=[{"name": "test"}, {"name": "elsewhere"}]), RunLayout(run_dir))


def test_a_concentrated_gain_is_flagged_in_gate_values_html_and_terminal(run_dir, capsys):
    """The alarm as each output shows it, on hand-made per-item scores (the tiny model gains nothing)."""
    from domaintune.cli.eval import _print_sets
    from domaintune.eval.items import Item
    from domaintune.eval.report import render_html
    from domaintune.eval.sets import set_concentration, set_gate_values

    items = [
        Item(f"q{k}", [{"role": "user", "content": f"Question {k}?"}], "ref", {"qtype": "t" if k < 2 else "o"})
        for k in range(12)
    ]
    base = [{"chrf": 10.0} for _ in items]
    tuned = [{"chrf": 50.0 if k < 2 else 11.0} for k in range(12)]  # 80 of 90 points from 2 of 12 items
    cfg = _cfg(run_dir).eval
    alarm = set_concentration(items, {"base": base, "tuned": tuned}, "base", cfg, seed=0)["tuned"]
    assert alarm["flagged"] and alarm["items"]["ids"] == ["q0", "q1"] and alarm["stratum_field"] == "qtype"
    assert alarm["items"]["questions"] == ["Question 0?", "Question 1?"]
    assert alarm["items"]["without"]["delta"] == pytest.approx(1.0)

    report = run_eval(_cfg(run_dir), RunLayout(run_dir))  # answers cached by the first test when it ran
    report["sets"]["out_of_source"]["concentration"]["tuned"] = alarm
    values = set_gate_values(report["sets"], "tuned")
    assert values["sets.out_of_source.gain_concentrated"] == 1.0
    assert values["sets.out_of_source.chrf_delta_without_top_items"] == pytest.approx(1.0)
    assert values["sets.out_of_source.chrf_delta_without_top_stratum"] == pytest.approx(1.0)
    html = render_html(report)
    assert "ALARM: " in html and "<td>q1</td>" in html and "Gain without these 2 items" in html
    _print_sets(report)
    out = " ".join(capsys.readouterr().err.split())  # the CLI's console writes to stderr; wrapping undone
    assert "template-learning alarm (out_of_source, tuned)" in out and "YES" in out


def test_a_dev_set_resolves_to_the_holdouts_dev_file(tmp_path):
    from domaintune.eval.sets import OUT_OF_SOURCE, resolve_sets

    layout = RunLayout(tmp_path / "run")
    layout.data_dir.mkdir(parents=True)
    for path in (layout.test_file, layout.holdout_file("out_of_source"), layout.holdout_dev_file("out_of_source")):
        _write(path, [_row("x", "Q?", "A.")])
    cfg = _cfg(tmp_path / "run", sets=[{"name": "test"}, {"name": "out_of_source_dev", "max_items": 3}])
    specs = {s.name: s for s in resolve_sets(cfg.eval, layout)}
    dev = specs["out_of_source_dev"]
    assert (dev.kind, dev.file, dev.max_items) == (OUT_OF_SOURCE, layout.holdout_dev_file("out_of_source"), 3)
    assert dev.file.name == "holdout_out_of_source_dev.jsonl"
    # default sets: the gated holdout and its dev rows, both out-of-source
    default = {s.name: s for s in resolve_sets(_cfg(tmp_path / "run").eval, layout)}
    assert default["out_of_source"].file == layout.holdout_file("out_of_source")
    assert default["out_of_source_dev"].kind == OUT_OF_SOURCE
    layout.holdout_dev_file("out_of_source").unlink()
    with pytest.raises(
        UserError,
        match=r"holdout_out_of_source_dev.jsonl does not exist .*holdout_group.dev_rows \(name: out_of_source\)",
    ):
        resolve_sets(cfg.eval, layout)
