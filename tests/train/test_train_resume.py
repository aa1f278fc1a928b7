"""kill -9 mid-run, then `domaintune train --resume` reaches the uninterrupted run's losses; early stopping."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from domaintune.cli import app
from domaintune.layout import RunLayout
from domaintune.train.runner import last_complete_checkpoint, run_train
from train_helpers import make_run_dir, one_line, tiny_config

RESUME_TRAIN = {"max_steps": 8, "eval_steps": 2, "save_steps": 4, "save_total_limit": 3, "lora": {"dropout": 0.1}}


def _yaml(run_dir, train: dict) -> str:
    return json.dumps(
        {
            "name": "t",
            "output_dir": str(run_dir),
            "model": {"name_or_path": "tiny-random-llama"},
            "train": {**tiny_config().train.model_dump(mode="json"), **train},
        }
    )


def test_resume_after_kill_9_matches_uninterrupted_run(tmp_path):
    reference = make_run_dir(tmp_path / "reference")
    expected = run_train(tiny_config(**RESUME_TRAIN), RunLayout(reference))

    killed = make_run_dir(tmp_path / "killed")
    config_path = tmp_path / "config.yaml"
    config_path.write_text(_yaml(killed, RESUME_TRAIN))  # JSON is valid YAML
    script = textwrap.dedent(
        f"""
        import os, signal
        from transformers import TrainerCallback
        from domaintune.config import load_config
        from domaintune.train.runner import run_train

        class KillAt(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step == 6:  # after checkpoint-4, mid-way to checkpoint-8
                    os.kill(os.getpid(), signal.SIGKILL)

        cfg = load_config({str(config_path)!r})
        run_train(cfg, cfg.layout, extra_callbacks=[KillAt()])
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (killed / "train" / "metrics.json").exists()
    assert last_complete_checkpoint(killed / "train" / "checkpoints").name == "checkpoint-4"

    result = CliRunner().invoke(app, ["train", str(config_path), "--resume"])
    assert result.exit_code == 0, result.output
    resumed = json.loads((killed / "train" / "metrics.json").read_text())
    assert resumed["resumed_from"].endswith("checkpoint-4")
    assert resumed["steps"] == expected["steps"] == 8
    assert resumed["step0_val_loss"] == pytest.approx(expected["step0_val_loss"], rel=1e-6)
    # Same optimizer/scheduler/RNG/data position: the whole curve matches, not only the end point.
    assert [s for s, _ in resumed["train_curve"]] == list(range(1, 9))
    for (_, got), (_, want) in zip(resumed["train_curve"], expected["train_curve"]):
        assert got == pytest.approx(want, rel=1e-4)
    assert resumed["final_val_loss"] == pytest.approx(expected["final_val_loss"], rel=1e-4)
    assert resumed["tokens_seen"] == expected["tokens_seen"]  # same data position: same examples seen
    # The resumed session itself processed only steps 5..8.
    assert resumed["tokens_this_session"] < expected["tokens_this_session"]


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    run = make_run_dir(tmp_path / "run")
    config_path = tmp_path / "config.yaml"
    config_path.write_text(_yaml(run, {}))
    result = CliRunner().invoke(app, ["train", str(config_path), "--resume"])
    assert result.exit_code == 2
    assert "no complete checkpoint" in one_line(result.output)


def test_early_stopping_stops_and_keeps_best_checkpoint(tmp_path):
    run = make_run_dir(tmp_path)
    # min_delta is larger than any possible improvement, so patience runs out at the first evaluations.
    cfg = tiny_config(max_steps=20, early_stopping_patience=1, early_stopping_min_delta=100.0, save_total_limit=1)
    metrics = run_train(cfg, RunLayout(run))
    assert metrics["stopped_early"] and metrics["steps"] <= 4
    assert metrics["best_checkpoint"] and os.path.isdir(metrics["best_checkpoint"])
    assert metrics["best_val_loss"] == min(loss for _, loss in metrics["val_curve"])


def test_outputs_metrics_plot_and_tensorboard(tmp_path):
    run = make_run_dir(tmp_path)
    metrics = run_train(tiny_config(tracking="tensorboard", max_steps=4), RunLayout(run))
    saved = json.loads((run / "train" / "metrics.json").read_text())
    for key in (
        "config",
        "data_fingerprint",
        "versions",
        "steps",
        "final_train_loss",
        "final_val_loss",
        "best_val_loss",
        "step0_val_loss",
        "tokens_seen",
        "tokens_per_second",
        "wall_seconds",
        "truncated",
    ):
        assert saved[key] is not None, key
    assert saved["versions"]["transformers"] and saved["config"]["method"] == "lora"
    assert len(saved["data_fingerprint"]) == 64 and metrics["tokens_seen"] > 0
    assert (run / "train" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert any((run / "train" / "tensorboard").iterdir())
    # Fingerprint follows the training files' contents.
    (run / "data" / "train.jsonl").write_text((run / "data" / "train.jsonl").read_text().replace("plus", "and"))
    again = run_train(tiny_config(tracking="none", max_steps=2), RunLayout(run))
    assert again["data_fingerprint"] != metrics["data_fingerprint"]


def test_resume_refuses_changed_data_or_method(tmp_path):
    from domaintune.errors import UserError

    run = make_run_dir(tmp_path)
    run_train(tiny_config(max_steps=2), RunLayout(run))
    with pytest.raises(UserError, match=r"train settings changed.*'lora'"):
        run_train(tiny_config(max_steps=4, lora={"r": 4}), RunLayout(run), resume=True)
    (run / "data" / "train.jsonl").write_text((run / "data" / "train.jsonl").read_text().replace("plus", "and"))
    with pytest.raises(UserError, match="training files changed"):
        run_train(tiny_config(max_steps=4), RunLayout(run), resume=True)
