"""train.generation_eval: greedy answers to a few val prompts scored at every evaluation, logged beside the
val loss (log history, metrics.json, progress line, loss.png) and usable by early stopping / best checkpoint."""

from __future__ import annotations

import json
import re

import pytest

from domaintune.layout import RunLayout
from domaintune.train.generation_eval import GenerationEvalCallback
from domaintune.train.runner import run_train
from train_helpers import make_run_dir, one_line, tiny_config


class HistoryProbe:
    """Keeps the Trainer's log history (run_train returns metrics only)."""

    def __init__(self):
        from transformers import TrainerCallback

        probe = self

        class _Callback(TrainerCallback):
            def on_train_end(self, args, state, control, **kwargs):
                probe.history = list(state.log_history)

        self.callback = _Callback()
        self.history: list[dict] = []


def test_metric_logged_at_every_evaluation_with_progress_and_plot(tmp_path, capsys):
    run = make_run_dir(tmp_path, n_train=16, n_val=6)
    probe = HistoryProbe()
    cfg = tiny_config(max_steps=4, eval_steps=2, save_steps=2, generation_eval={"items": 3, "max_new_tokens": 4})
    metrics = run_train(cfg, RunLayout(run), extra_callbacks=[probe.callback])

    evals = [h for h in probe.history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [0, 2, 4]
    assert all(0.0 <= h["eval_rougeL_char"] <= 100.0 for h in evals)  # eval.primary_metric's default
    gen = json.loads((run / "train" / "metrics.json").read_text())["generation_eval"]
    assert gen == metrics["generation_eval"]
    assert gen["metric"] == "rougeL_char" and gen["items"] == 3
    assert [step for step, _ in gen["curve"]] == [0, 2, 4]
    printed = one_line(capsys.readouterr().err)  # one line per logging step (not a terminal)
    assert f"rougeL_char {evals[-1]['eval_rougeL_char']:.2f}" in printed
    assert (run / "train" / "loss.png").stat().st_size > 0


def test_prompts_cached_left_padded_and_train_mode_restored(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from domaintune.model.loader import load_tokenizer
    from domaintune.train.generation_eval import build_generation_eval

    run = make_run_dir(tmp_path, n_train=4, n_val=5)
    cfg = tiny_config(generation_eval={"items": 3, "max_new_tokens": 3, "batch_size": 2})
    tokenizer = load_tokenizer(cfg.model, tiny_model_dir)
    callback = build_generation_eval(cfg.train, "token_f1", tokenizer, RunLayout(run).val_file)
    assert callback is not None and callback.key == "eval_token_f1" and len(callback.references) == 3
    assert [ids.shape[0] for ids, _ in callback.batches] == [2, 1]  # tokenised and batched once
    _ids, mask = callback.batches[0]
    assert bool((mask[:, -1] == 1).all())  # left padding: every prompt ends at the last position
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.train()
    assert len(callback.generate(model)) == 3 and model.training
    assert 0.0 <= callback.score(model) <= 100.0 and model.training


def test_off_by_default_keeps_the_val_loss_only(tmp_path):
    run = make_run_dir(tmp_path, n_train=8, n_val=4)
    metrics = run_train(tiny_config(), RunLayout(run))
    assert metrics["generation_eval"] is None


def test_early_stopping_and_best_checkpoint_follow_the_metric(tmp_path, monkeypatch):
    scripted = iter([10.0, 30.0, 20.0, 15.0, 50.0, 60.0, 70.0])
    monkeypatch.setattr(GenerationEvalCallback, "score", lambda self, model, autocast_dtype=None: next(scripted))
    run = make_run_dir(tmp_path, n_train=16, n_val=4)
    cfg = tiny_config(
        max_steps=6,
        eval_steps=1,
        save_steps=1,
        early_stopping_patience=2,
        early_stopping_metric="chrf",
        generation_eval={"items": 2, "metric": "chrf"},
    )
    metrics = run_train(cfg, RunLayout(run))
    assert metrics["stopped_early"] and metrics["steps"] == 3  # 30 at step 1, then 20 and 15
    assert metrics["best_checkpoint"].endswith("checkpoint-1")  # the highest chrf, not the lowest loss
    assert [value for _, value in metrics["generation_eval"]["curve"]] == [10.0, 30.0, 20.0, 15.0]


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"early_stopping_metric": "rougeL_char"}, "generation_eval.items > 0"),
        ({"early_stopping_metric": "accuracy", "generation_eval": {"items": 2}}, "text metric"),
        ({"early_stopping_metric": "bleu", "generation_eval": {"items": 2, "metric": "chrf"}}, "not what"),
        ({"generation_eval": {"items": 2, "metric": "perplexity"}}, "generation_eval.metric"),
    ],
)
def test_config_rejects_what_cannot_be_watched(train, message):
    from domaintune.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        tiny_config(**train)


def test_generation_runs_under_the_training_autocast_with_a_bf16_base(tmp_path):
    """bf16 training holds the frozen base in bf16 and the adapters in fp32: generating outside the Trainer's
    autocast crashed with a dtype mismatch (the main job, medical-zh, on a bf16 CPU)."""
    run = make_run_dir(tmp_path, n_train=8, n_val=4)
    cfg = tiny_config(max_steps=2, eval_steps=2, save_steps=2, precision="bf16",
                      generation_eval={"items": 2, "max_new_tokens": 3})  # fmt: skip
    metrics = run_train(cfg, RunLayout(run))
    assert [step for step, _ in metrics["generation_eval"]["curve"]] == [0, 2]
