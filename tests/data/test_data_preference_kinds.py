"""The data stage on preference, unpaired (KTO) and prompt-only (GRPO) rows (`data.kind`): every layout read,
bad rows quarantined with file + line and field, accounting, PII, dedup, group-aware split and decontamination as
for SFT rows; the split files are what the preference trainers read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from domaintune.config import config_from_dict
from domaintune.data.pipeline import run_data
from domaintune.errors import UserError
from domaintune.layout import SPLIT_NAMES, RunLayout
from domaintune.train.preference.rows import read_rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def run(tmp: Path, kind: str, rows: list[dict], **data) -> tuple[dict, dict[str, list[dict]], list[dict]]:
    write_jsonl(tmp / "in.jsonl", rows)
    body = {"kind": kind, "sources": [{"path": "in.jsonl", "keep": ["topic"]}], **data}
    body.setdefault("filters", {"outlier_sigma": None, "max_repetition": None})
    body.setdefault("guards", {"on_violation": "warn"})
    cfg = config_from_dict({"name": "t", "data": body}, config_path=tmp / "p.yaml")
    layout = RunLayout(tmp / "run")
    report = run_data(cfg, layout, progress=False)
    splits = {s: [json.loads(x) for x in layout.split_file(s).read_text().splitlines()] for s in SPLIT_NAMES}
    quarantine = [json.loads(x) for x in layout.quarantine_file.read_text().splitlines()]
    return report, splits, quarantine


def kept(splits: dict[str, list[dict]]) -> list[dict]:
    return [r for s in SPLIT_NAMES for r in splits[s]]


def question(i: int) -> str:
    return f"Customer {i} asks how long the return window is for order {i * 37 % 1000} of item {i * 11}?"


def pairs(n: int) -> list[dict]:
    """Four layouts in turn: explicit text, TRL conversational, LLaMA-Factory alpaca and sharegpt ranking rows."""
    rows: list[dict] = []
    for i in range(n):
        good, bad = f"Returns are accepted within 30 days, order {i}.", f"No idea about order {i}, sorry."
        q = question(i)
        layout = i % 5
        if layout == 0:
            row: dict = {"prompt": q, "chosen": good, "rejected": bad}
        elif layout == 1:
            row = {
                "prompt": [{"role": "user", "content": q}],
                "chosen": [{"role": "assistant", "content": good}],
                "rejected": [{"role": "assistant", "content": bad}],
            }
        elif layout == 2:  # TRL implicit prompt: two whole chats
            row = {
                "chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": good}],
                "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": bad}],
            }
        elif layout == 3:
            row = {"instruction": q, "input": "", "chosen": good, "rejected": bad}
        else:
            row = {
                "conversations": [{"from": "human", "value": q}],
                "chosen": {"from": "gpt", "value": good},
                "rejected": {"from": "gpt", "value": bad},
            }
        rows.append({**row, "topic": f"t{i % 3}"})
    return rows


def test_preference_layouts_are_read_accounted_and_written_in_the_trainers_form(tmp_path):
    rows = pairs(40)
    rows.append(
        {"prompt": "Is my email ann.lee@example.com on file for the return?", "chosen": "Yes.", "rejected": "No."}
    )
    rows.append({"prompt": "What now?", "chosen": "Same."})  # no rejected
    rows.append({"prompt": "What now, again?", "chosen": "Same.", "rejected": "Same."})  # teaches nothing
    rows.append({"prompt": "", "chosen": "a", "rejected": "b"})  # empty prompt
    rows.append(dict(rows[0]))  # exact duplicate
    report, splits, quarantine = run(tmp_path, "preference", rows)

    assert report["kind"] == "preference"
    written = kept(splits)
    totals = report["totals"]
    assert totals["input"] == len(rows) == totals["kept"] + totals["quarantined"]
    assert (totals["kept"], totals["quarantined"]) == (len(written), len(quarantine))
    for row in written:
        assert set(row) >= {"id", "prompt", "chosen", "rejected", "source"}
        assert row["prompt"][-1]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
        assert row["chosen"] != row["rejected"]
    # every layout made the same canonical row: 40 pairs + the PII row survive
    assert len(written) == 41
    assert {r["topic"] for r in written if "topic" in r} == {"t0", "t1", "t2"}
    redacted = next(r for r in written if "on file" in r["prompt"][-1]["content"])
    assert "ann.lee@example.com" not in json.dumps(redacted)

    reasons = {q["reason"] for q in quarantine}
    assert any("rejected" in r for r in reasons), reasons
    assert any("chosen equals rejected" in r for r in reasons)
    assert any("empty:prompt" in r for r in reasons)
    assert any("duplicate" in r for r in reasons)
    for q in quarantine:
        assert q["file"].endswith("in.jsonl") and q["loc"].startswith("line ")
    missing = next(q for q in quarantine if "rejected" in q["reason"])
    assert missing["loc"] == "line 42"

    # the dpo trainer's reader takes the files as they are (and kto reads each pair as two rows)
    train_rows, _ = read_rows(RunLayout(tmp_path / "run").train_file, "preference")
    assert len(train_rows) == len(splits["train"])
    unpaired, _ = read_rows(RunLayout(tmp_path / "run").train_file, "unpaired")
    assert len(unpaired) == 2 * len(splits["train"])


def test_split_keeps_a_prompt_together_and_decontaminates_train(tmp_path):
    rows = []
    for i in range(30):  # three different pairs per prompt: never on both sides of the split
        for j in range(3):
            chosen = [
                "Thirty days from delivery.",
                "You have a month to send it back.",
                "Within 30 days, with receipt.",
            ]
            rejected = ["Never.", "Ask someone else, I do not know.", "Returns are closed forever for everyone."]
            rows.append({"prompt": question(i), "chosen": chosen[j], "rejected": rejected[j]})
    _, splits, quarantine = run(tmp_path, "preference", rows, split={"ratios": [6, 2, 2], "seed": 3})
    assert len(kept(splits)) == 90 and not quarantine  # same prompt, different pairs: not duplicates by default
    sides = {s: {r["prompt"][-1]["content"] for r in splits[s]} for s in SPLIT_NAMES}
    assert sides["val"] and sides["test"]
    assert not (sides["train"] & sides["test"]) and not (sides["train"] & sides["val"])
    assert not (sides["val"] & sides["test"])

    # dedup on the prompt (data.dedup.on) keeps the first pair of each prompt
    _, splits2, quarantine2 = run(tmp_path, "preference", rows, dedup={"on": "prompt"})
    assert len(kept(splits2)) == 30 and len(quarantine2) == 60
    assert {q["stage"] for q in quarantine2} == {"dedup_exact"}

    # without the grouping, decontamination drops train rows whose prompt is a val/test prompt
    _, splits3, quarantine3 = run(tmp_path, "preference", rows, split={"group_by": [], "seed": 1})
    held = {r["prompt"][-1]["content"] for s in ("val", "test") for r in splits3[s]}
    assert not any(r["prompt"][-1]["content"] in held for r in splits3["train"])
    assert any(q["stage"] == "decontaminate" for q in quarantine3)
    assert len(kept(splits3)) + len(quarantine3) == 90


def test_near_duplicate_prompts_are_dropped_for_prompt_rows(tmp_path):
    base = "Please tell me the return window for the blue ceramic coffee mug I ordered last week from the shop"
    rows = [{"prompt": base + " online", "reference": "30 days"}, {"prompt": base + " online.", "reference": "x"}]
    rows += [{"prompt": question(i), "reference": "30 days"} for i in range(20)]
    _, splits, quarantine = run(tmp_path, "prompt", rows)
    assert len(kept(splits)) == 21
    assert [(q["stage"], q["loc"], q["duplicate_of"]) for q in quarantine] == [("dedup_near", "line 2", "in-000001")]


def test_unpaired_rows(tmp_path):
    rows = []
    for i in range(30):
        rows.append({"prompt": question(i), "completion": f"Thirty days, order {i}.", "label": True})
        rows.append({"prompt": question(i), "completion": f"Whatever, order {i}.", "desirable": False})
    rows.append({"prompt": "Where is my parcel number 5?", "completion": "On its way."})  # no label
    rows.append({"prompt": "Where is my parcel 6?", "chosen": "a", "rejected": "b"})  # a pair: not an unpaired row
    rows.append({"prompt": "Where is my parcel 7?", "completion": "", "label": True})
    report, splits, quarantine = run(tmp_path, "unpaired", rows)
    written = kept(splits)
    assert report["totals"]["input"] == 63 == report["totals"]["kept"] + report["totals"]["quarantined"]
    assert len(written) == 60 and len(quarantine) == 3
    assert sum(r["label"] is True for r in written) == 30
    assert all(set(r) >= {"prompt", "completion", "label"} for r in written)
    by_line = {q["loc"]: q["reason"] for q in quarantine}
    assert "label" in by_line["line 61"]
    assert "data.kind: preference" in by_line["line 62"]
    assert "empty:completion" in by_line["line 63"]
    kto, _ = read_rows(RunLayout(tmp_path / "run").train_file, "unpaired")
    assert len(kto) == len(splits["train"])


def test_prompt_rows_from_every_layout_keep_their_reference(tmp_path):
    rows = []
    for i in range(24):
        q, ref = question(i), f"{30 + i % 2} days"
        rows.append(
            [
                {"prompt": q, "reference": ref},
                {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ref}]},
                {"instruction": q, "input": "", "output": ref},
            ][i % 3]
        )
    rows.append({"answer": "no prompt here"})
    _, splits, quarantine = run(tmp_path, "prompt", rows, system_prompt="You are the shop's assistant.")
    written = kept(splits)
    assert len(written) == 24 and len(quarantine) == 1
    assert "prompt rows need" in quarantine[0]["reason"] and quarantine[0]["loc"] == "line 25"
    assert all(r["reference"] in ("30 days", "31 days") for r in written)
    assert all(r["prompt"][0] == {"role": "system", "content": "You are the shop's assistant."} for r in written)
    grpo, _ = read_rows(RunLayout(tmp_path / "run").train_file, "prompt")
    assert grpo[0]["reference"] in ("30 days", "31 days")


def test_config_errors_name_the_field(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", pairs(4))
    for data, needle in (
        ({"format": "alpaca"}, "data.format"),
        ({"sources": [{"path": "in.jsonl", "fields": {"output": "a"}}]}, "data.sources[0].fields: output"),
    ):
        body = {"kind": "preference", "sources": [{"path": "in.jsonl"}], **data}
        cfg = config_from_dict({"name": "t", "data": body}, config_path=tmp_path / "p.yaml")
        with pytest.raises(UserError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            run_data(cfg, RunLayout(tmp_path / "run"), progress=False)


def test_eval_reads_the_test_split_of_every_kind(tmp_path):
    """Eval scores a dpo/grpo run on the data stage's test split: the chosen answer / the reference is the reference
    answer; an undesirable kto completion is refused by file and line."""
    from domaintune.eval.items import load_items

    (tmp_path / "p").mkdir()
    _, splits, _ = run(tmp_path / "p", "preference", pairs(40))
    items = load_items(RunLayout(tmp_path / "p" / "run").test_file, None, "test")
    assert len(items) == len(splits["test"]) > 0
    assert items[0].reference == splits["test"][0]["chosen"][-1]["content"]
    assert items[0].prompt == splits["test"][0]["prompt"]

    rows = [{"prompt": question(i), "reference": f"{i} days"} for i in range(30)]
    (tmp_path / "g").mkdir()
    _, splits, _ = run(tmp_path / "g", "prompt", rows)
    items = load_items(RunLayout(tmp_path / "g" / "run").test_file, None, "test")
    assert [it.reference for it in items] == [r["reference"] for r in splits["test"]]

    bad = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": [{"role": "user", "content": "q"}], "completion": "x",
                                                 "label": False}])  # fmt: skip
    with pytest.raises(UserError, match=r"kto\.jsonl:1: an undesirable completion"):
        load_items(bad, None, "test")


def test_llamafactory_kto_rows_chats_with_a_label(tmp_path):
    rows = []
    for i in range(24):
        q, a = question(i), f"Within 30 days, order {i}." if i % 2 else f"No clue about order {i}."
        rows.append(
            [
                {
                    "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                    "label": i % 2 == 1,
                },
                {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}], "kto_tag": i % 2 == 1},
                {"instruction": q, "input": "", "output": a, "label": "true" if i % 2 else "false"},
            ][i % 3]
        )
    rows.append({"messages": [{"role": "user", "content": "Where is parcel 9?"}], "label": True})  # no answer
    report, splits, quarantine = run(tmp_path, "unpaired", rows)
    written = kept(splits)
    assert len(written) == 24 and report["totals"]["quarantined"] == 1
    assert "final assistant answer" in quarantine[0]["reason"] and quarantine[0]["loc"] == "line 25"
    for row in written:
        assert row["label"] is ("Within 30 days" in row["completion"][0]["content"])
        assert row["prompt"][-1]["role"] == "user" and "messages" not in row and "kto_tag" not in row


def test_a_pair_whose_answers_differ_in_one_word_is_not_repetition(tmp_path):
    """The repetition filter looks at each answer alone: minimal pairs are what DPO learns from."""
    rows = [
        {
            "prompt": question(i),
            "chosen": f"The return window for order {i} is thirty days from delivery, with the receipt.",
            "rejected": f"The return window for order {i} is fourteen days from delivery, with the receipt.",
        }
        for i in range(20)
    ]
    rows.append({"prompt": "Say it again?", "chosen": "again " * 30, "rejected": "No."})  # a repetitive answer
    # joined, the two answers of a pair repeat ~35% of their 3-grams; each alone repeats none
    _, splits, quarantine = run(tmp_path, "preference", rows, filters={"outlier_sigma": None, "max_repetition": 0.3})
    assert len(kept(splits)) == 20
    assert [q["reason"] for q in quarantine] == ["repetition>0.3"]
