"""End to end on the tiny model: base vs a LoRA-tuned copy vs an OpenAI-compatible endpoint."""

from __future__ import annotations

import json
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from domaintune.config import config_from_dict
from domaintune.errors import UserError
from domaintune.eval.runner import run_eval
from domaintune.layout import RunLayout
from domaintune.utils.io import read_jsonl


def _row(i, q, a, **extra):
    return {
        "id": f"t{i}",
        "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
        "source": "test",
        **extra,
    }


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path_factory.mktemp("evalrun")
    (run / "data").mkdir()
    test = [
        _row(1, "头痛怎么办？", "多休息，必要时服用止痛药。", department="内科"),
        _row(2, "高血压吃什么药？", "常用降压药有氨氯地平。", department="心内科"),
        _row(3, "提取姓名和年龄：张三，30岁", '{"name": "张三", "age": 30}', department="内科"),
        _row(4, "Is this positive or negative: great!", "positive", department="心内科", label="positive"),
        _row(5, "Is this positive or negative: awful", "negative", department="内科", label="negative"),
        _row(6, "糖尿病患者饮食注意什么？", "控制碳水化合物摄入，少吃甜食。", department="内分泌科"),
    ]
    general = [_row(10 + i, f"Say hello to number {i}", f"Hello number {i}!") for i in range(3)]
    for name, rows in (("test", test), ("general", general)):
        (run / "data" / f"{name}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
        )
    # The "tuned" model: a LoRA adapter with random (non-zero) B matrices, so it really differs from its base.
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(run / "model")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(run / "model")
    (run / "glossary.txt").write_text("止痛药\n降压药\n糖尿病\n", encoding="utf-8")
    return run


def _cfg(run: Path, **eval_overrides):
    eval_section = {
        "decoding": {"max_new_tokens": 6, "batch_size": 4},
        "glossary": str(run / "glossary.txt"),
        "robustness": {"max_items": 2, "perturbations": ["typo", "width"]},
        "bootstrap_samples": 200,
        "worst_n": 3,
        "gates": ["perplexity_delta_ci_high < 1e12", "general.tuned.perplexity > 1"],
        "primary_metric": "chrf",
        "engine": "transformers",
    }
    eval_section.update(eval_overrides)
    return config_from_dict(
        {"name": "t", "output_dir": str(run), "model": {"name_or_path": "tiny-random-llama"}, "eval": eval_section}
    )


def test_run_eval_end_to_end_and_cache(run_dir):
    report = run_eval(_cfg(run_dir), RunLayout(run_dir))
    ev = run_dir / "eval"
    for name in ("predictions.jsonl", "items.jsonl", "report.json", "report.html", "perplexity.jsonl"):
        assert (ev / name).is_file(), name
    assert set(report["models"]) == {"base", "tuned"}
    assert report["models"]["tuned"]["identity"].startswith("adapter:")
    base, tuned = report["metrics"]["test"]["base"], report["metrics"]["test"]["tuned"]
    for metric in (
        "rougeL_char",
        "rougeL_word",
        "bleu",
        "chrf",
        "perplexity",
        "latency_p95_s",
        "tokens_per_s",
        "valid_json",
        "json_field_f1",
        "accuracy",
        "macro_f1",
        "term_coverage",
    ):
        assert metric in base and metric in tuned, metric
    assert base["classification_items"] == 2
    # the adapter changes the model: perplexities differ, and the delta has a bootstrap interval
    assert base["perplexity"] != pytest.approx(tuned["perplexity"])
    d = report["deltas"]["test"]["tuned"]["perplexity"]
    assert d["delta"] == pytest.approx(tuned["perplexity"] - base["perplexity"])
    assert d["ci_low"] <= d["delta"] <= d["ci_high"]
    assert report["deltas"]["test"]["tuned"]["chrf"]["n"] == 6
    # the untrained tiny base answers only newlines (stripped to ""): it scores 0 on the general set, so
    # retention is undefined and says so rather than dividing by zero
    assert report["retention"]["tuned"]["metric"] == "chrf"
    assert report["retention"]["tuned"]["ratio"] is None
    assert any("retention of tuned: base scores 0" in n for n in report["notes"])
    assert report["retention"]["tuned"]["perplexity_ratio"] == pytest.approx(
        report["metrics"]["general"]["tuned"]["perplexity"] / report["metrics"]["general"]["base"]["perplexity"]
    )
    assert report["strata"]["field"] == "department"
    assert set(report["strata"]["groups"]) == {"内科", "心内科", "内分泌科"}
    assert report["strata"]["groups"]["内科"]["n"] == 3
    assert set(report["robustness"]["models"]["tuned"]["drop"]) == {"typo", "width"}
    assert len(report["worst"]["lowest"]) == 3 and set(report["worst"]["lowest"][0]["answers"]) == {"base", "tuned"}
    assert report["judge"]["skipped"].startswith("no judge endpoint")
    assert report["perplexity_precision"]["value"] in {"fp32", "bf16"}
    assert report["perplexity_precision"]["reason"].startswith("eval.perplexity_precision")
    assert set(report["timing"]["perplexity_s"]) == {"base", "tuned"}
    assert report["gates"]["passed"], report["gates"]
    assert report["gate_values"]["retention"] is None
    html = (ev / "report.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") >= 4 and "内分泌科" in html
    # 6 test + 3 general answers, and 2 items x 2 perturbations, for each of 2 models
    first = list(read_jsonl(ev / "predictions.jsonl"))
    assert len(first) == 2 * (6 + 3 + 2 * 2)
    assert report["cache"]["answers_generated"] == len(first)
    # the same row answers carry the decoding settings and latency
    assert all(r["decoding"]["max_new_tokens"] == 6 and r["latency_s"] > 0 for r in first)

    again = run_eval(_cfg(run_dir), RunLayout(run_dir))
    assert again["cache"]["answers_generated"] == 0
    assert again["cache"]["answers_reused"] == len(first)
    assert again["metrics"] == report["metrics"]
    assert list(read_jsonl(ev / "predictions.jsonl")) == first
    assert again["cache"]["perplexity_reused"] > 0

    # the other scoring precision is its own perplexity cache entry; the answers are reused
    other = "bf16" if report["perplexity_precision"]["value"] == "fp32" else "fp32"
    switched = run_eval(_cfg(run_dir, perplexity_precision=other), RunLayout(run_dir))
    assert switched["perplexity_precision"] == {"value": other, "reason": "eval.perplexity_precision"}
    assert switched["cache"]["answers_generated"] == 0 and switched["cache"]["perplexity_reused"] == 0
    for name in ("base", "tuned"):
        assert switched["metrics"]["test"][name]["perplexity"] == pytest.approx(
            report["metrics"]["test"][name]["perplexity"], rel=0.05
        )

    # a different decoding setting is a different cache key: regenerated, old entries kept
    changed = run_eval(
        _cfg(run_dir, decoding={"max_new_tokens": 3, "batch_size": 4}, robustness={"enabled": False}),
        RunLayout(run_dir),
    )
    assert changed["cache"]["answers_generated"] == 2 * (6 + 3)
    assert len(list(read_jsonl(ev / "predictions.jsonl"))) == len(first) + 2 * (6 + 3)
    assert all(m["avg_new_tokens"] <= 3 for m in changed["metrics"]["test"].values())


def test_llamacpp_engine_is_reported_with_its_agreement_sample(run_dir, tmp_path, monkeypatch):
    from domaintune.eval.models import EvalModel
    from domaintune.llamacpp import converter_unavailable_reason, unavailable_reason

    reason = unavailable_reason() or converter_unavailable_reason()
    if reason:
        pytest.skip(reason)
    run = tmp_path / "run"
    run.mkdir()
    for name in ("data", "model"):
        shutil.copytree(run_dir / name, run / name)
    metrics = ["rouge", "chrf", "perplexity"]
    cfg = _cfg(run, engine="llamacpp", engine_check_items=3, robustness={"enabled": False}, metrics=metrics)
    alone = EvalModel._reference_nll_llamacpp
    passes: list[int] = []  # llama.cpp scoring passes of their own: none while every answer is generated
    monkeypatch.setattr(
        EvalModel,
        "_reference_nll_llamacpp",
        lambda self, prompts, *a, **kw: passes.append(len(prompts)) or alone(self, prompts, *a, **kw),
    )
    report = run_eval(cfg, RunLayout(run))
    assert passes == []
    engine = report["engine"]
    assert engine["name"] == "llamacpp" and engine["reason"] == "eval.engine=llamacpp"
    # references scored by llama.cpp while answering; transformers' perplexity of the check's references beside it
    assert engine["perplexity_by"] == "llamacpp" and report["perplexity_precision"]["value"] == "q8_0 (llama.cpp)"
    for name in ("base", "tuned"):
        c = engine["check"][name]
        assert c["perplexity_items"] == 3 and abs(c["perplexity_change"]) < 0.05  # q8_0 of the tiny model
    assert set(engine["check"]) == {"base", "tuned"}
    for name in ("base", "tuned"):  # flash attention chosen per machine, and why
        assert isinstance(engine["settings"][name]["flash_attention"]["on"], bool)
        assert engine["settings"][name]["flash_attention"]["reason"]
    check = engine["check"]["tuned"]
    assert check["items"] == 3 and 0 <= check["identical_answers"] <= 3
    assert 0.0 <= check["prefix_agreement"] <= 1.0 and check["metric"] == "chrf"
    # the check's transformers answers are cached beside the llama.cpp ones, under their own identity
    rows = list(read_jsonl(run / "eval" / "predictions.jsonl"))
    checked = [r for r in rows if r["set"] == "engine_check"]
    assert len(checked) == 2 * 3 and not any("llamacpp" in r["model_identity"] for r in checked)
    assert all("llamacpp" in r["model_identity"] for r in rows if r["set"] == "test")
    html = (run / "eval" / "report.html").read_text(encoding="utf-8")
    assert "engine: llamacpp" in html and "engine check (tuned, first 3 test items" in html
    again = run_eval(cfg, RunLayout(run))
    assert again["cache"]["answers_generated"] == 0 and again["engine"]["check"] == engine["check"]
    # answers cached but not their scores: llama.cpp scores them in a pass of their own, to the same figures
    scores = run / "eval" / "perplexity.jsonl"
    kept = [r for r in read_jsonl(scores) if r["set"] == "engine_check"]  # transformers' rows
    scores.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    rescored = run_eval(cfg, RunLayout(run))
    assert rescored["cache"]["answers_generated"] == 0 and sum(passes) == 2 * (6 + 3)  # every test/general row
    for set_name in ("test", "general"):
        for name in ("base", "tuned"):
            assert rescored["metrics"][set_name][name]["perplexity"] == pytest.approx(
                report["metrics"][set_name][name]["perplexity"], rel=1e-4
            )


def test_seeded_sampling_is_reproducible_and_retention_is_a_ratio(run_dir, tmp_path):
    def run(folder):
        folder.mkdir()
        (folder / "data").mkdir()
        for name in ("test.jsonl", "general.jsonl"):
            (folder / "data" / name).write_text((run_dir / "data" / name).read_text("utf-8"), encoding="utf-8")
        (folder / "model").symlink_to(run_dir / "model")
        cfg = config_from_dict(
            {
                "name": "t",
                "output_dir": str(folder),
                "seed": 5,
                "model": {"name_or_path": "tiny-random-llama"},
                "eval": {
                    "decoding": {"max_new_tokens": 8, "temperature": 1.0, "batch_size": 4},
                    "max_items": 2,
                    "metrics": ["chrf", "rouge"],
                    "primary_metric": "chrf",
                    "robustness": {"enabled": False},
                    "gates": ["retention > 0"],
                },
            }
        )
        return run_eval(cfg, RunLayout(folder)), list(read_jsonl(folder / "eval" / "items.jsonl"))

    report1, items1 = run(tmp_path / "a")
    _, items2 = run(tmp_path / "b")
    assert [r["answers"] for r in items1] == [r["answers"] for r in items2]  # same seed, same samples
    assert report1["decoding"]["seed"] == 5 and report1["decoding"]["greedy"] is False
    general = [r for r in items1 if r["set"] == "general"]
    base = sum(r["scores"]["base"]["chrf"] for r in general) / len(general)
    tuned = sum(r["scores"]["tuned"]["chrf"] for r in general) / len(general)
    assert base > 0
    assert report1["retention"]["tuned"]["ratio"] == pytest.approx(tuned / base)
    assert report1["gates"]["passed"]


def _said(result) -> str:
    """The command's output as one line: rich wraps console text at the terminal width (COLUMNS)."""
    return " ".join(result.output.split())


def test_cli_exits_1_and_names_the_failed_gate(run_dir, tmp_path):
    from domaintune.cli import app

    cfg_file = tmp_path / "p.yaml"
    cfg_file.write_text(
        "name: t\nmodel: {name_or_path: tiny-random-llama}\n"
        "eval:\n  decoding: {max_new_tokens: 6, batch_size: 4}\n  robustness: {enabled: false}\n"
        "  metrics: [rouge, bleu, chrf, perplexity]\n"
        "  gates: ['rougeL_char_delta >= 50', 'perplexity_ratio < 100']\n",
        encoding="utf-8",
    )
    result = CliRunner().invoke(app, ["eval", str(cfg_file), "--output-dir", str(run_dir)])
    assert result.exit_code == 1, result.output
    said = _said(result)
    assert "gate failed" in said and "rougeL_char_delta >= 50" in said
    assert "perplexity_ratio < 100" not in said.split("gate failed", 1)[1]
    ok = CliRunner().invoke(
        app,
        ["eval", "run", str(cfg_file), "--output-dir", str(run_dir), "--set", "eval.gates=['perplexity_ratio < 100']"],
    )
    assert ok.exit_code == 0, ok.output
    assert "gates passed" in _said(ok)
    # the review commands run on the same folder
    exp = CliRunner().invoke(app, ["eval", "export-review", str(cfg_file), "--output-dir", str(run_dir), "--n", "3"])
    assert exp.exit_code == 0, exp.output
    assert (run_dir / "eval" / "review" / "review.html").is_file()
    missing = CliRunner().invoke(app, ["eval", "import-review", str(tmp_path / "none.csv")])
    assert missing.exit_code == 2 and "not found" in _said(missing)


# ---------------------------------------------------------------- a real OpenAI-compatible server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def endpoint(tiny_model_dir):
    """A small FastAPI server speaking the OpenAI chat API: model `tiny` answers with the tiny model
    (greedy, stops at the end of turn); model `rule-judge` grades answers by a fixed rule."""
    import torch
    import uvicorn
    from fastapi import FastAPI
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from domaintune.model.loader import end_of_turn_token_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    eot = end_of_turn_token_ids(tokenizer)
    app = FastAPI()

    @app.post("/v1/chat/completions")
    def chat(body: dict):
        messages = body["messages"]
        if body["model"] == "rule-judge":
            answer = re.search(r"ANSWER:\n(.*)\n\nReply with JSON", messages[-1]["content"], re.S).group(1)
            text = json.dumps({"score": 1 + len(answer) % 5, "reason": "length rule"})
            n_prompt, n_new = 1, 1
        else:
            ids = tokenizer(
                tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                return_tensors="pt",
                add_special_tokens=False,
            )
            with torch.inference_mode():
                out = model.generate(
                    **ids,
                    max_new_tokens=body["max_tokens"],
                    do_sample=False,
                    eos_token_id=eot,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new = out[0, ids["input_ids"].shape[1] :].tolist()
            stop = next((k for k, t in enumerate(new) if t in eot), len(new))
            text = tokenizer.decode(new[:stop], skip_special_tokens=True).strip()
            n_prompt, n_new = ids["input_ids"].shape[1], len(new)
        return {
            "id": "cmpl-1",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new},
        }

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=10)


def test_endpoint_model_and_judge(run_dir, endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_EVAL_KEY", "secret")
    out = tmp_path / "run"
    out.mkdir()
    (out / "data").mkdir()
    for name in ("test.jsonl", "general.jsonl"):
        (out / "data" / name).write_text((run_dir / "data" / name).read_text(encoding="utf-8"), encoding="utf-8")
    cfg = config_from_dict(
        {
            "name": "t",
            "output_dir": str(out),
            "model": {"name_or_path": "tiny-random-llama"},
            "eval": {
                "tuned": False,
                "models": [{"name": "api", "url": endpoint, "model": "tiny", "api_key_env": "TEST_EVAL_KEY"}],
                # batch size 1: no padding, so the local run and the server run the very same computation
                "decoding": {"max_new_tokens": 5, "batch_size": 1},
                "robustness": {"enabled": False},
                "judge": {"url": endpoint, "model": "rule-judge", "api_key_env": "TEST_EVAL_KEY", "max_items": 4},
            },
        }
    )
    report = run_eval(cfg, RunLayout(out))
    items = [r for r in read_jsonl(out / "eval" / "items.jsonl") if r["set"] == "test"]
    # the same model behind HTTP, same prompts, same greedy decoding: the same answers
    assert [r["answers"]["api"] for r in items] == [r["answers"]["base"] for r in items]
    assert report["deltas"]["test"]["api"]["chrf"]["delta"] == pytest.approx(0.0)
    assert "perplexity" not in report["metrics"]["test"]["api"]
    assert any("perplexity not available for endpoint model 'api'" in n for n in report["notes"])
    expected = sum(1 + len(r["answers"]["base"]) % 5 for r in items[:4]) / 4
    assert report["judge"]["models"]["base"]["judge_score"] == pytest.approx(expected)
    assert report["judge"]["models"]["api"]["judge_score"] == pytest.approx(expected)
    assert report["gate_values"]["api.judge_score"] == pytest.approx(expected)


def test_interrupted_generation_keeps_finished_batches(run_dir, tmp_path, monkeypatch):
    from domaintune.eval.models import EvalModel

    out = tmp_path / "r"
    (out / "data").mkdir(parents=True)
    (out / "data" / "test.jsonl").write_text((run_dir / "data" / "test.jsonl").read_text("utf-8"), encoding="utf-8")
    cfg = config_from_dict(
        {
            "name": "t",
            "output_dir": str(out),
            "model": {"name_or_path": "tiny-random-llama"},
            "eval": {
                "tuned": False,
                "engine": "transformers",  # batches of 2 (llama.cpp hands over each answer as it finishes)
                "decoding": {"max_new_tokens": 4, "batch_size": 2},
                "robustness": {"enabled": False},
                "metrics": ["chrf"],
            },
        }
    )
    original = EvalModel.generate

    def interrupted(self, prompts, decoding, seed, desc="", on_batch=None):
        def first_batch_then_stop(idx, answers):
            on_batch(idx, answers)
            raise KeyboardInterrupt

        return original(self, prompts, decoding, seed, desc, first_batch_then_stop)

    monkeypatch.setattr(EvalModel, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_eval(cfg, RunLayout(out))
    assert len(list(read_jsonl(out / "eval" / "predictions.jsonl"))) == 2
    monkeypatch.setattr(EvalModel, "generate", original)
    report = run_eval(cfg, RunLayout(out))
    assert report["cache"]["answers_reused"] == 2 and report["cache"]["answers_generated"] == 4


def test_reference_nll_matches_a_plain_computation(tiny_model_dir):
    """Batched, left-padded, logits-trimmed NLL equals one unpadded forward pass per item."""
    import torch
    import torch.nn.functional as F

    from domaintune.config import config_from_dict as cfd
    from domaintune.eval.models import build_models

    cfg = cfd(
        {
            "name": "t",
            "model": {"name_or_path": "tiny-random-llama"},
            "eval": {"tuned": False, "perplexity_engine": "transformers"},
        }
    )
    (model,) = build_models(cfg, RunLayout(Path("/nonexistent")))
    prompts = [
        [{"role": "user", "content": "头痛怎么办？请详细说明。"}],
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
    ]
    refs = ["多休息，必要时服用止痛药。", "Hello! How can I help you today, my friend?", "4"]
    got = model.reference_nll(prompts, refs, max_length=512, batch_size=3, desc="nll")
    hf, tok = model._loaded
    for (nll, n), prompt, ref in zip(got, prompts, refs):
        p_text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        a_ids = tok(ref + "<|im_end|>", add_special_tokens=False).input_ids  # answer + end of turn only
        p_ids = tok(p_text, add_special_tokens=False).input_ids
        ids = torch.tensor([p_ids + a_ids])
        with torch.inference_mode():
            logits = hf(input_ids=ids).logits[0]
        expected = F.cross_entropy(logits[len(p_ids) - 1 : -1], torch.tensor(a_ids), reduction="sum")
        assert n == len(a_ids)
        assert nll == pytest.approx(float(expected), rel=1e-4)


def test_bf16_scoring_keeps_the_output_projection_in_fp32(tiny_model_dir):
    """bf16 reference scoring runs the layers under autocast but the logits in fp32, stays close to fp32 and
    leaves the model as it found it."""
    import torch

    from domaintune.config import config_from_dict as cfd
    from domaintune.eval.models import build_models, scoring_precision

    cfg = cfd(
        {
            "name": "t",
            "model": {"name_or_path": "tiny-random-llama"},
            "eval": {"tuned": False, "perplexity_engine": "transformers"},
        }
    )
    (model,) = build_models(cfg, RunLayout(Path("/nonexistent")))
    prompts = [[{"role": "user", "content": "头痛怎么办？"}], [{"role": "user", "content": "hi there"}]]
    refs = ["多休息，必要时服用止痛药。", "Hello! How can I help you today?"]
    fp32 = model.reference_nll(prompts, refs, max_length=512, batch_size=2, desc="fp32")
    bf16 = model.reference_nll(prompts, refs, max_length=512, batch_size=2, desc="bf16", precision="bf16")
    assert [n for _, n in bf16] == [n for _, n in fp32]
    assert [b for b, _ in bf16] == pytest.approx([a for a, _ in fp32], rel=0.02)
    assert [b for b, _ in bf16] != [a for a, _ in fp32]  # bf16 did run
    hf, _ = model._loaded
    head = hf.get_output_embeddings()
    assert "forward" not in vars(head)  # the fp32 projection was only borrowed
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert hf(input_ids=ids).logits.dtype == torch.bfloat16  # what plain autocast would score
        with scoring_precision(hf, "bf16"):
            assert hf(input_ids=ids).logits.dtype == torch.float32
    with pytest.raises(ValueError, match="fp16"), scoring_precision(hf, "fp16"):
        pass


def test_retention_uses_the_holdout_and_refuses_the_replay_set(tmp_path):
    from domaintune.errors import UserError

    data = tmp_path / "data"
    data.mkdir()
    rows = "".join(json.dumps(_row(i, f"q{i}", f"a{i}")) + "\n" for i in range(2))
    for name in ("test", "general", "general_holdout"):
        (data / f"{name}.jsonl").write_text(rows, encoding="utf-8")
    cfg = config_from_dict(
        {
            "name": "t",
            "model": {"name_or_path": "tiny-random-llama"},
            "train": {"replay": {"ratio": 0.2}},
            "eval": {"general_file": str(data / "general.jsonl")},
        }
    )
    with pytest.raises(UserError, match="also the replay set"):
        run_eval(cfg, RunLayout(tmp_path))  # refused before any model loads
    from domaintune.eval.runner import _default_general_file, _refuse_replayed_retention_set

    assert _default_general_file(RunLayout(tmp_path)) == data / "general_holdout.jsonl"
    _refuse_replayed_retention_set(cfg, RunLayout(tmp_path), data / "general_holdout.jsonl")  # held out: accepted
    (data / "general_holdout.jsonl").unlink()
    assert _default_general_file(RunLayout(tmp_path)) == data / "general.jsonl"


def test_eval_refuses_a_test_set_seen_in_training(run_dir, tmp_path):
    """A test prompt that is also in data/train.jsonl (or near it) is refused before any model loads."""
    out = tmp_path / "leaky"
    (out / "data").mkdir(parents=True)
    test_text = (run_dir / "data" / "test.jsonl").read_text("utf-8")
    (out / "data" / "test.jsonl").write_text(test_text, encoding="utf-8")
    leaked = json.loads(test_text.splitlines()[1])
    leaked["id"] = "train-7"
    leaked["messages"][0]["content"] = leaked["messages"][0]["content"].replace("？", "?") + " "  # same after folding
    other = _row(99, "感冒发烧怎么处理比较好呢？", "多喝水，注意休息。")
    (out / "data" / "train.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in (leaked, other)), encoding="utf-8"
    )
    cfg = config_from_dict(
        {
            "name": "t",
            "output_dir": str(out),
            "model": {"name_or_path": "tiny-random-llama"},
            "eval": {"tuned": False, "metrics": ["chrf"], "robustness": {"enabled": False}},
        }
    )
    with pytest.raises(UserError, match=r"1 test prompt\(s\) were seen in training \(test t2 ~ train train-7"):
        run_eval(cfg, RunLayout(out))
    allowed = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"allow_overlap": True, "max_items": 2})})
    report = run_eval(allowed, RunLayout(out))
    assert report["contamination"]["overlaps"] == 1 and report["contamination"]["test_ids"] == ["t2"]
    assert any(note.startswith("CONTAMINATED") for note in report["notes"])
